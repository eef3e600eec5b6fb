"""The mixer at the launch floor: few kernels per call, no host reads, one whole graph under torch.compile.

On a GPU a mixing call costs its kernel launches (10-30 us each on an H100), not its bytes. These tests count,
on CPU, the aten ops that would launch a kernel (view and other metadata-only ops excluded) and the host reads
of tensor values (each a sync on CUDA), with the value checks that only run on CPU tensors switched off as on
a GPU; and they compile every configuration with ``fullgraph=True``.
"""

from __future__ import annotations

import pytest
import torch

from cekd_losses import MixingAugmenter, _checks
from cekd_losses._launches import Launches, count_launches

# regression ceilings: 1.25x the counts when they were set (7, 17 and 47 kernels a call, 2026-12-03, see
# docs/benchmarks.rst); a change that adds kernels beyond them must say what a GPU gets for them
BUDGETS = {"mixup": 9, "cutmix": 22, "snapmix": 59}


def count_call(call, monkeypatch) -> Launches:
    monkeypatch.setattr(_checks, "can_read_values", lambda tensor: False)  # what a CUDA call does
    return count_launches(call)


def mixer_call(method: str, same_on_batch: bool, p: float, device: str = "cpu", seed: int = 0):
    generator = torch.Generator(device=device).manual_seed(seed)
    mixer = MixingAugmenter(method, 200, mix_alpha=1.0, p=p, same_on_batch=same_on_batch, generator=generator)
    images = torch.rand(32, 3, 64, 64, device=device)
    labels = torch.randint(0, 200, (32,), device=device)
    cams = torch.rand(32, 2, 2, device=device) if method == "snapmix" else None
    return mixer, (images, labels, cams)


@pytest.mark.parametrize("same_on_batch", [False, True], ids=["per-sample", "same_on_batch"])
@pytest.mark.parametrize("method", list(BUDGETS))
def test_op_budget_and_no_host_reads(method, same_on_batch, monkeypatch):
    mixer, inputs = mixer_call(method, same_on_batch, p=1.0)
    counter = count_call(lambda: mixer(*inputs), monkeypatch)
    assert counter.reads == 0
    assert len(counter.ops) <= BUDGETS[method], counter.ops


@pytest.mark.parametrize("method", list(BUDGETS))
def test_mixing_some_samples_only_costs_a_few_ops_more(method, monkeypatch):
    """p < 1: one uniform draw, a comparison and the selections that leave unmixed samples alone."""
    mixer, inputs = mixer_call(method, False, p=0.5)
    counter = count_call(lambda: mixer(*inputs), monkeypatch)
    assert counter.reads == 0 and len(counter.ops) <= BUDGETS[method] + 4, counter.ops


# a choice among methods runs the union of its methods' pixels and weights: 1.25x its counts of 2026-12-03
# (34, 74 and 81 kernels; the methods alone: 7 + 17, 17 + 47, 7 + 17 + 47)
CHOICE_BUDGETS = {("mixup", "cutmix"): 42, ("cutmix", "snapmix"): 92, ("mixup", "cutmix", "snapmix"): 101}


@pytest.mark.parametrize("p", [1.0, 0.5])
@pytest.mark.parametrize("same_on_batch", [False, True], ids=["per-sample", "same_on_batch"])
@pytest.mark.parametrize("methods", list(CHOICE_BUDGETS), ids="+".join)
def test_a_choice_among_methods_costs_about_its_methods_together(methods, same_on_batch, p, monkeypatch):
    mixer = MixingAugmenter(list(methods), 200, p=p, same_on_batch=same_on_batch, generator=torch.Generator())
    images, labels = torch.rand(32, 3, 64, 64), torch.randint(0, 200, (32,))
    cams = torch.rand(32, 2, 2) if "snapmix" in methods else None
    counter = count_call(lambda: mixer(images, labels, cams), monkeypatch)
    assert counter.reads == 0 and len(counter.ops) <= CHOICE_BUDGETS[methods] + (4 if p < 1 else 0), counter.ops


def test_the_counter_sees_ops_and_host_reads(monkeypatch):
    """The counter itself: kernels and reads where the code makes them, views free."""
    x = torch.rand(4, 2)
    counter = count_call(lambda: (float((x.t()[0] + 1).sum()), x.tolist()), monkeypatch)
    assert counter.ops == ["add", "sum"] and counter.reads == 2


FIELDS = ("images", "targets", "partner", "lam_a", "lam_b", "applied", "boxes", "source_boxes")


def assert_same_batch(a, b, atol: float = 0.0) -> None:
    for field in FIELDS:
        x, y = getattr(a, field), getattr(b, field)
        assert (x is None) == (y is None), field
        if x is not None:
            assert torch.allclose(x.double(), y.double(), rtol=0.0, atol=atol), field


@pytest.mark.parametrize("p", [1.0, 0.5])
@pytest.mark.parametrize("same_on_batch", [False, True], ids=["per-sample", "same_on_batch"])
@pytest.mark.parametrize("method", list(BUDGETS))
def test_every_configuration_compiles_whole_and_draws_as_eager(method, same_on_batch, p):
    """fullgraph=True: no graph break. Same generator state, same batch as eager, call after call."""
    torch._dynamo.reset()
    mixer, inputs = mixer_call(method, same_on_batch, p, seed=7)
    compiled = torch.compile(mixer, fullgraph=True, backend="eager")
    eager = [mixer(*inputs) for _ in range(2)]
    after_eager = mixer.generator.get_state()
    mixer.generator.manual_seed(7)
    traced = [compiled(*inputs) for _ in range(2)]
    for a, b in zip(eager, traced, strict=True):
        assert_same_batch(a, b)  # backend "eager" runs the traced ops themselves: equal to the bit
    assert torch.equal(mixer.generator.get_state(), after_eager)  # and the generator moved on alike


@pytest.mark.slow
def test_inductor_compiled_snapmix_matches_eager():
    torch._dynamo.reset()
    mixer, inputs = mixer_call("snapmix", False, 0.5, seed=3)
    eager = mixer(*inputs)
    mixer.generator.manual_seed(3)
    # inductor fuses the float32 sampling arithmetic differently: pixels read at positions that differ by
    # a few float32 roundings of a 64 px coordinate (~1e-5 of a pixel) and sums taken in another order
    assert_same_batch(eager, torch.compile(mixer, fullgraph=True)(*inputs), atol=1e-4)


def test_global_rng_draws_compile_too():
    """Without a generator the draws come from PyTorch's default one, in the compiled mixer as in eager."""
    torch._dynamo.reset()
    mixer = MixingAugmenter("cutmix", 5)
    images, labels = torch.rand(6, 3, 16, 16), torch.arange(6) % 5
    compiled = torch.compile(mixer, fullgraph=True, backend="eager")
    torch.manual_seed(11)
    eager = mixer(images, labels)
    torch.manual_seed(11)
    assert_same_batch(eager, compiled(images, labels))


@pytest.mark.parametrize("method", list(BUDGETS))
def test_derived_fields_cost_kernels_only_when_read(method, monkeypatch):
    """A step that reads images and targets only pays for the fields that follow from the rest (MixUp's lam_b,
    CutMix's lam_a, applied, the integer boxes); read, they hold their definitions."""
    mixer, inputs = mixer_call(method, False, p=1.0)
    batch = None

    def call() -> None:
        nonlocal batch
        batch = mixer(*inputs)

    plain = count_call(call, monkeypatch)
    assert batch is not None and len(plain.ops) <= BUDGETS[method]
    monkeypatch.setattr(_checks, "can_read_values", lambda tensor: False)
    derived = ("lam_a", "lam_b", "applied", "boxes", "source_boxes")
    read = count_launches(lambda: [getattr(batch, name) for name in derived], warm=False)
    assert len(read.ops) > 0 and read.reads == 0
    again = count_launches(lambda: [getattr(batch, name) for name in derived], warm=False)
    assert len(again.ops) == 0  # computed once
    if method == "snapmix":  # weights from the CAMs; the boxes made integer when read
        assert batch.boxes.dtype == batch.source_boxes.dtype == torch.int64 and batch.boxes.shape == (32, 4)
    else:
        assert torch.allclose(batch.lam_a + batch.lam_b, torch.ones(32), atol=1e-6)
        expected = (batch.partner != torch.arange(32)) & (batch.lam_b > 0)
        assert torch.equal(batch.applied, expected)
    if method == "cutmix":
        x1, y1, x2, y2 = batch.boxes.unbind(1)
        assert batch.boxes.dtype == torch.int64
        assert torch.equal(batch.lam_b, (x2 - x1) * (y2 - y1) / (64 * 64))  # the pasted pixel fraction


def test_cached_constants_stay_within_their_limits():
    """Constants built once per shape, class count and device (one-hot tables, positions) must not pile up in a
    long process that sees many of them: each builder keeps its last few, and a kept constant is reused."""
    from cekd_losses import _constants, mixing

    for classes in range(1000, 1040):  # 40 one-hot tables of about 4 MiB: 160 MiB if all were kept
        table = mixing._smoothed_one_hot(classes, 0.1, torch.device("cpu"))
        assert table.shape == (classes, classes)
        assert mixing._smoothed_one_hot.cache_info().currsize <= 8  # at most 32 MiB of tables
    for size in range(1, 600):  # many small constants: entries bounded too
        assert torch.equal(_constants.positions(size, torch.device("cpu")), torch.arange(size))
        assert _constants.positions.cache_info().currsize <= 64
    again = _constants.positions(599, torch.device("cpu"))
    assert _constants.positions(599, torch.device("cpu")) is again  # a cached constant is reused


def test_the_compiled_draws_find_only_live_mixers_generators():
    """The registry the compiled draws read holds a generator while the module that draws with it lives."""
    import gc

    from cekd_losses import draws

    gc.collect()
    before = len(draws._GENERATORS)
    mixers = [MixingAugmenter("mixup", 3, generator=torch.Generator()) for _ in range(20)]
    assert len(draws._GENERATORS) == before + 20 and all(m.generator in draws._GENERATORS.values() for m in mixers)
    del mixers
    gc.collect()
    assert len(draws._GENERATORS) == before
