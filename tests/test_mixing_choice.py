"""MixingAugmenter choosing among methods: each sample (or the batch) takes one method of a list with given
probabilities, and gets exactly what that method's kernel gives it alone; the switch off (``enabled`` and
train_step's ``mix_off_step``)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from cekd_losses import MixingAugmenter, SoftTargetCrossEntropy, cutmix, mixup, replay, snapmix, train_step
from cekd_losses.draws import METHOD_IDS, UNMIXED

CHOICES = [("mixup", "cutmix"), ("cutmix", "snapmix"), ("snapmix", "mixup"), ("mixup", "cutmix", "snapmix")]


def onehot(labels: torch.Tensor, k: int) -> torch.Tensor:
    return torch.eye(k)[labels]


def per_method_reference(images, targets, cams, batch):
    """What each method's public kernel makes of the batch's own partners, weights and boxes, row by row."""
    empty = torch.zeros_like(batch.boxes) if batch.boxes is not None else None
    reference = {"mixup": mixup(images, targets, batch.partner, batch.lam_a)}
    if batch.boxes is not None:
        reference["cutmix"] = cutmix(images, targets, batch.partner, batch.boxes)
    if batch.source_boxes is not None and cams is not None:
        reference["snapmix"] = snapmix(images, targets, cams, batch.partner, batch.boxes, batch.source_boxes)
    return reference, empty


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    methods=st.sampled_from(CHOICES),
    batch=st.integers(1, 7),
    size=st.tuples(st.integers(1, 12), st.integers(1, 12)),
    p=st.sampled_from([1.0, 0.6]),
    same_on_batch=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_each_sample_gets_exactly_what_its_method_gives_it(seed, methods, batch, size, p, same_on_batch, dtype):
    """Pixels equal, to the bit, the method's kernel on the same partner, weight and boxes; targets equal its
    targets to float32 rounding; an unmixed sample keeps its image and target."""
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, 2, *size, generator=g).to(dtype)
    labels = torch.randint(0, 4, (batch,), generator=g)
    cams = torch.rand(batch, 3, 2, generator=g) if "snapmix" in methods else None
    mixer = MixingAugmenter(
        methods,
        4,
        p=p,
        same_on_batch=same_on_batch,
        mix_alpha=[0.5 + i for i in range(len(methods))],
        generator=torch.Generator().manual_seed(seed),
    )
    out = mixer(images, labels, cams)
    assert out.method is not None and out.method.shape == (batch,)
    assert set(out.method.tolist()) <= {METHOD_IDS[m] for m in methods} | {UNMIXED}
    if same_on_batch:
        assert len(set(out.method.tolist())) == 1
    targets = onehot(labels, 4)
    reference, _ = per_method_reference(images, targets, cams, out)
    for i, method_id in enumerate(out.method.tolist()):
        if method_id == UNMIXED:
            assert torch.equal(out.images[i], images[i]) and torch.equal(out.targets[i], targets[i])
            assert out.partner[i] == i and not out.applied[i]
            continue
        expected = reference[list(METHOD_IDS)[method_id]]
        assert torch.equal(out.images[i], expected.images[i])
        assert torch.allclose(out.targets[i], expected.targets[i], rtol=0, atol=4e-7)
        assert torch.equal(out.lam_a[i], expected.lam_a[i]) and torch.equal(out.lam_b[i], expected.lam_b[i])
        assert out.applied[i] == expected.applied[i]
    assert torch.equal(replay(out, images), out.images)  # the record replays the mix


def test_exact_values_of_a_hand_built_choice():
    """Four 1x2 images, partners reversed: a MixUp sample, a CutMix sample, an unmixed one, a MixUp one."""
    from cekd_losses.draws import MixParameters
    from cekd_losses.kernels import choose

    images = torch.tensor([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0], [3.0, 3.0]]).view(4, 1, 1, 2)
    targets = torch.eye(4)
    params = MixParameters(
        partner=torch.tensor([3, 2, 2, 0]),
        lam=torch.tensor([0.25, 1.0, 1.0, 0.5]).view(4, 1, 1, 1),
        corners=torch.tensor([[[0, 0], [0, 0]], [[1, 0], [2, 1]], [[0, 0], [0, 0]], [[0, 0], [0, 0]]])
        .float()
        .view(4, 1, 2, 2),
        mixed=None,
        method=torch.tensor([0, 1, 3, 0]),
    )
    out = choose(images, targets, None, params, ("mixup", "cutmix"), False)
    assert out.images.flatten().tolist() == [2.25, 2.25, 1.0, 2.0, 2.0, 2.0, 1.5, 1.5]
    assert out.lam_a.tolist() == [0.25, 0.5, 1.0, 0.5] and out.lam_b.tolist() == [0.75, 0.5, 0.0, 0.5]
    assert out.targets[0].tolist() == [0.25, 0, 0, 0.75] and out.targets[1].tolist() == [0, 0.5, 0.5, 0]
    assert out.boxes.tolist() == [[0, 0, 0, 0], [1, 0, 2, 1], [0, 0, 0, 0], [0, 0, 0, 0]]


@pytest.mark.parametrize("same_on_batch", [False, True])
def test_methods_are_chosen_with_their_probabilities(same_on_batch):
    """Over many samples (or batches) each method's share, and the unmixed share 1 - p, follow method_p and p:
    a chi-square test at p = 1e-6 (3 degrees of freedom)."""
    shares, p = (0.2, 0.3, 0.5), 0.8
    mixer = MixingAugmenter(
        ["snapmix", "mixup", "cutmix"],
        3,
        p=p,
        method_p=shares,
        same_on_batch=same_on_batch,
        generator=torch.Generator().manual_seed(0),
    )
    images, labels, cams = torch.rand(16, 1, 4, 4), torch.arange(16) % 3, torch.rand(16, 2, 2)
    ids = torch.cat([mixer(images, labels, cams).method[: 1 if same_on_batch else 16] for _ in range(400)])
    counts = torch.bincount(ids, minlength=4).double()
    expected = torch.tensor([0.3 * p, 0.5 * p, 0.2 * p, 1 - p], dtype=torch.float64) * ids.numel()
    assert float(((counts - expected) ** 2 / expected).sum()) < 30.7, counts


def test_each_method_draws_with_its_own_alpha():
    """MixUp at alpha 100 (weights near 0.5), CutMix at 0.05 (box sides' draws near 0 or 1, so many boxes nearly
    empty): swapped columns would show at once. MixUp's weights also pass a KS test against Beta(100, 100)."""
    mixer = MixingAugmenter(["mixup", "cutmix"], 2, mix_alpha=[100.0, 0.05], generator=torch.Generator().manual_seed(1))
    images, labels = torch.rand(64, 1, 32, 32), torch.arange(64) % 2
    batches = [mixer(images, labels) for _ in range(30)]
    lam = torch.cat([b.lam_a[b.method == 0] for b in batches]).double()
    assert stats.kstest(lam.numpy(), stats.beta(100, 100).cdf).pvalue > 1e-4
    fractions = torch.cat([b.lam_b[b.method == 1] for b in batches])
    assert float((fractions < 0.01).double().mean()) > 0.25  # Beta(100, 100) sides: none below 0.1


def test_a_one_item_list_is_that_method_with_its_draws():
    images, labels = torch.rand(6, 3, 8, 8), torch.arange(6) % 3
    listed = MixingAugmenter(["cutmix"], 3, p=0.5, generator=torch.Generator().manual_seed(4))(images, labels)
    plain = MixingAugmenter("cutmix", 3, p=0.5, generator=torch.Generator().manual_seed(4))(images, labels)
    assert listed.method is None and torch.equal(listed.images, plain.images)
    assert torch.equal(listed.targets, plain.targets)


@pytest.mark.parametrize("methods", CHOICES)
def test_a_choice_replays_on_another_view(methods):
    """The other view gets, sample by sample, what its method's own replay makes of it."""
    g = torch.Generator().manual_seed(3)
    images, labels = torch.rand(8, 3, 12, 10, generator=g), torch.arange(8) % 4
    cams = torch.rand(8, 3, 3, generator=g) if "snapmix" in methods else None
    batch = MixingAugmenter(methods, 4, generator=g)(images, labels, cams)
    view = images.flip(-1)
    replayed = replay(batch, view)
    reference, _ = per_method_reference(view, onehot(labels, 4), cams, batch)
    for i, method_id in enumerate(batch.method.tolist()):
        assert torch.equal(replayed[i], reference[list(METHOD_IDS)[method_id]].images[i])


def test_a_choice_compiles_whole_and_draws_as_eager():
    torch._dynamo.reset()
    mixer = MixingAugmenter(
        ["mixup", "cutmix", "snapmix"], 5, p=0.7, mix_alpha=[0.5, 1.0, 2.0], generator=torch.Generator().manual_seed(3)
    )
    images, labels, cams = torch.rand(8, 3, 16, 16), torch.arange(8) % 5, torch.rand(8, 4, 4)
    eager = [mixer(images, labels, cams) for _ in range(2)]
    mixer.generator.manual_seed(3)
    compiled = torch.compile(mixer, fullgraph=True, backend="eager")
    for a in eager:
        b = compiled(images, labels, cams)
        assert torch.equal(a.method, b.method) and torch.equal(a.images, b.images)
        assert torch.equal(a.targets, b.targets) and torch.equal(a.partner, b.partner)


def test_a_choice_stays_on_the_images_device():
    mixer = MixingAugmenter(["cutmix", "snapmix", "mixup"], 5, p=0.5, generator=torch.Generator().manual_seed(0))
    images, labels = torch.empty(4, 3, 8, 6, device="meta"), torch.empty(4, dtype=torch.long, device="meta")
    out = mixer(images, labels, torch.empty(4, 2, 3, device="meta"))
    fields = (out.images, out.targets, out.partner, out.lam_a, out.lam_b, out.applied, out.boxes, out.source_boxes)
    assert all(t.device.type == "meta" for t in (*fields, out.method))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"method": ["cutmix", "cutmix"]}, "each method once"),
        ({"method": ["cutmix", "blend"]}, "`method` must be one of"),
        ({"method": []}, "`method` must be one of"),
        ({"method": ["cutmix", "mixup"], "method_p": [0.5]}, "one probability per method summing to 1"),
        ({"method": ["cutmix", "mixup"], "method_p": [0.5, 0.6]}, "one probability per method summing to 1"),
        ({"method": ["cutmix", "mixup"], "method_p": [1.5, -0.5]}, "`method_p` must be in"),
        ({"method": ["cutmix", "mixup"], "mix_alpha": [1.0, 2.0, 3.0]}, "one value per method"),
        ({"method": ["cutmix", "mixup"], "mix_alpha": [1.0, 0.0]}, "`mix_alpha` must be > 0"),
        ({"method": "cutmix", "method_p": [0.5, 0.5]}, "applies to a list of methods"),
        ({"method": ["cutmix", "mixup"], "normalize_targets": True}, "'snapmix' only"),
    ],
)
def test_bad_choices_are_named(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        MixingAugmenter(num_classes=3, **kwargs)


def test_cams_follow_snapmix_in_the_list():
    images, labels = torch.rand(2, 3, 8, 8), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="`cams` is required for snapmix"):
        MixingAugmenter(["cutmix", "snapmix"], 3)(images, labels)
    with pytest.raises(ValueError, match="used by method 'snapmix' only"):
        MixingAugmenter(["cutmix", "mixup"], 3)(images, labels, torch.rand(2, 4, 4))


def test_a_disabled_mixer_returns_the_clean_batch_and_draws_nothing():
    generator = torch.Generator().manual_seed(0)
    mixer = MixingAugmenter(["snapmix", "cutmix"], 3, label_smoothing=0.3, generator=generator)
    mixer.enabled = False
    state = generator.get_state()
    images, labels = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 0])
    out = mixer(images, labels)  # no CAMs needed
    assert torch.equal(out.images, images) and torch.equal(out.targets, mixer.soft_targets(labels, 4))
    assert out.partner.tolist() == [0, 1, 2, 3] and not out.applied.any() and out.lam_a.tolist() == [1.0] * 4
    assert torch.equal(generator.get_state(), state)


def test_train_step_switches_mixing_off_at_its_step():
    """Before mix_off_step the batch is mixed; from it on the model sees the clean images, and SnapMix's CAM
    forward (the tap) is not run."""
    from cekd_losses import FeatureTap

    torch.manual_seed(0)
    nn = torch.nn
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    tap = FeatureTap(model, classifier=model[-1])
    calls = []
    tap.cams = lambda *args, **kwargs: calls.append(1) or torch.rand(4, 6, 6)  # type: ignore[method-assign]
    mixer = MixingAugmenter(["snapmix", "mixup"], 3, generator=torch.Generator().manual_seed(0))
    images, labels = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 0])
    loss = SoftTargetCrossEntropy()
    on = train_step(model, loss, images, labels, mixer=mixer, tap=tap, step=9, mix_off_step=10)
    assert on.batch.applied.any() and len(calls) == 1
    off = train_step(model, loss, images, labels, mixer=mixer, tap=tap, step=10, mix_off_step=10)
    assert torch.equal(off.batch.images, images) and not off.batch.applied.any() and len(calls) == 1
    with pytest.raises(ValueError, match="`mix_off_step` needs a `mixer` and the `step`"):
        train_step(model, loss, images, labels, mixer=mixer, tap=tap, mix_off_step=10)
