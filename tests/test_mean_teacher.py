"""Specifications of the temporal mean model: PCL's decay, exact against its formula; its three rules for buffers; no
gradient; exact resume from its state dict; named errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cekd_losses import TemporalMean


def small() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))


@pytest.mark.parametrize("max_decay", [0.999, 0.5, 0.0])
def test_each_update_is_pcls_formula(max_decay):
    """theta' <- d theta' + (1 - d) theta, d = min(1 - 1 / (n + 1), max_decay), against a float64 reference."""
    model = small()
    mean = TemporalMean(model, max_decay=max_decay)
    reference = {k: v.double().clone() for k, v in model.state_dict().items() if "weight" in k or "bias" in k}
    generator = torch.Generator().manual_seed(1)
    for n in range(6):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=generator))
            model[1].running_mean.add_(1.0)
        decay = min(1 - 1 / (n + 1), max_decay)
        assert mean.decay() == decay
        mean.update(model)
        for name, value in model.state_dict().items():
            if name in reference:
                reference[name] = decay * reference[name] + (1 - decay) * value.double()
                assert torch.allclose(mean.model.state_dict()[name].double(), reference[name], atol=1e-6), name
            else:  # buffers: copied as they are
                assert torch.equal(mean.model.state_dict()[name], value), name
    assert mean.updates == 6


def test_the_first_update_copies_the_network_exactly():
    model = small()
    mean = TemporalMean(model)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0).add_(0.1)
    mean.update(model)
    pairs = zip(mean.model.state_dict().values(), model.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)


def test_the_mean_takes_no_gradient_and_its_outputs_are_targets():
    model = small()
    mean = TemporalMean(model)
    images = torch.rand(5, 3)
    teacher = mean(images)
    student = model(images)
    assert not teacher.requires_grad and all(not p.requires_grad for p in mean.parameters())
    (student - teacher).square().sum().backward()
    assert all(p.grad is None for p in mean.parameters()) and all(p.grad is not None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())  # the network it follows is left alone


def test_its_state_dict_resumes_exactly():
    model, other = small(), small()
    mean = TemporalMean(model, max_decay=0.9)
    for _ in range(3):
        with torch.no_grad():
            model[0].weight.add_(0.5)
        mean.update(model)
    restored = TemporalMean(other, max_decay=0.9)
    restored.load_state_dict(mean.state_dict())
    assert restored.updates == 3 and restored.decay() == mean.decay()
    mean.update(model)
    restored.update(model)
    ours, theirs = mean.model.state_dict(), restored.model.state_dict()
    assert (
        mean.state_dict()["_extra_state"]
        == restored.state_dict()["_extra_state"]
        == {"updates": 4, "buffers": "copied"}
    )
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert repr(restored).startswith("TemporalMean(\n  max_decay=0.9, buffers='copied', updates=4")


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda: TemporalMean(small(), max_decay=1.0), ValueError, r"`max_decay` must be in \[0.0, 1.0\), got 1.0"),
        (lambda: TemporalMean(small(), max_decay=-0.1), ValueError, r"`max_decay` must be in \[0.0, 1.0\)"),
        (lambda: TemporalMean("net"), TypeError, r"`model` must be an nn.Module, got str"),
        (
            lambda: TemporalMean(small()).update(nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5), nn.Linear(5, 2))),
            ValueError,
            r"`model` must have the parameters of the network this mean follows .* differing at \['0.weight'",
        ),
    ],
)
def test_bad_input_is_named(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_averaged_buffers_follow_the_moving_average_and_counts_are_copied():
    """buffers="averaged" (timm's ModelEmaV3): running statistics as d * own + (1 - d) * network's, in float64
    against the formula; the integer count copied."""
    model = small()
    mean = TemporalMean(model, max_decay=0.5, buffers="averaged")
    reference = mean.model[1].running_mean.double().clone()
    for n in range(5):
        with torch.no_grad():
            model[1].running_mean.add_(float(n + 1))
            model[1].num_batches_tracked.add_(3)
        decay = mean.decay()
        mean.update(model)
        reference = decay * reference + (1 - decay) * model[1].running_mean.double()
        assert torch.allclose(mean.model[1].running_mean.double(), reference, atol=1e-6)
        assert torch.equal(mean.model[1].num_batches_tracked, model[1].num_batches_tracked)


def test_own_buffers_are_left_to_the_means_forwards():
    """buffers="own" (PCL's reference): updates never touch the mean's statistics; its forwards in train mode
    gather them from the batches it sees, in eval mode they are used as they are."""
    model = small()
    mean = TemporalMean(model, max_decay=0.5, buffers="own")
    start = mean.model[1].running_mean.clone()
    with torch.no_grad():
        model[1].running_mean.add_(5.0)
    mean.update(model)
    assert torch.equal(mean.model[1].running_mean, start)  # the network's statistics were not taken
    batch = torch.rand(16, 3) * 4
    mean.train()(batch)
    expected = 0.9 * start + 0.1 * mean.model[0](batch).mean(0)  # BatchNorm's momentum 0.1 on its own forward
    assert torch.allclose(mean.model[1].running_mean, expected, atol=1e-5)
    frozen = mean.model[1].running_mean.clone()
    mean.eval()(batch)
    assert torch.equal(mean.model[1].running_mean, frozen)


def test_the_buffers_rule_is_named():
    with pytest.raises(ValueError, match="`buffers` must be one of 'copied', 'averaged', 'own'"):
        TemporalMean(small(), buffers="mean")  # type: ignore[arg-type]


def test_a_state_dict_loads_only_into_a_mean_of_its_buffers_rule():
    """A checkpoint says how its mean treated the buffers; one from before the choice copied them."""
    saved = TemporalMean(small(), buffers="own").state_dict()
    TemporalMean(small(), buffers="own").load_state_dict(saved)
    with pytest.raises(ValueError, match="buffers='own', this one has buffers='copied'"):
        TemporalMean(small()).load_state_dict(saved)
    old = {**saved, "_extra_state": {"updates": 3}}  # as TemporalMean saved it before
    restored = TemporalMean(small(), buffers="copied")
    restored.load_state_dict(old)
    assert restored.updates == 3
    with pytest.raises(ValueError, match="buffers='copied', this one has buffers='own'"):
        TemporalMean(small(), buffers="own").load_state_dict(old)
