"""Specifications of CEKDLoss, and a CEKD training step end to end."""

from __future__ import annotations

import math

import pytest
import timm
import torch
import torchvision
from hypothesis import given
from hypothesis import strategies as st

from cekd_losses import (
    CEKDLoss,
    CollaborativeEnsemble,
    CrossDistillationLoss,
    FeatureTap,
    MixingAugmenter,
    distillation_kl,
    rampup,
    soft_cross_entropy,
    train_step,
)


def by_hand(members, ensemble, target, temperature, alpha, beta, ramp, supervise_ensemble=True, weights=None):
    """The objective of docs/method.rst written term by term from the separately tested pieces."""
    weights = torch.ones(members.shape[1]) if weights is None else weights
    supervised = sum(soft_cross_entropy(z, target, "none") for z in members)
    if supervise_ensemble:
        supervised = supervised + soft_cross_entropy(ensemble, target, "none")
    cross = alpha * ramp * CrossDistillationLoss(temperature, "none")(members).sum(0) * weights
    to_members = beta * ramp * sum(distillation_kl(z, ensemble, temperature, "none") for z in members) * weights
    return supervised.mean(), cross.mean(), to_members.mean()


@given(
    seed=st.integers(0, 2**31 - 1),
    members=st.integers(2, 4),
    batch=st.integers(1, 6),
    classes=st.integers(2, 7),
    temperature=st.floats(0.5, 6.0),
    alpha=st.floats(0.0, 3.0),
    beta=st.floats(0.0, 3.0),
    soft=st.booleans(),
    weighted=st.booleans(),
)
def test_components_equal_the_equations(seed, members, batch, classes, temperature, alpha, beta, soft, weighted):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(members, batch, classes, generator=g) * 2
    ensemble = logits.mean(0)
    target = torch.rand(batch, classes, generator=g) if soft else torch.randint(0, classes, (batch,), generator=g)
    weights = torch.rand(batch, generator=g) if weighted else None
    parts = CEKDLoss(temperature, alpha, beta).components((logits, ensemble), target, weights=weights)
    supervised, cross, to_members = by_hand(logits, ensemble, target, temperature, alpha, beta, 1.0, weights=weights)
    assert torch.allclose(parts["supervised"], supervised, atol=1e-5)
    assert torch.allclose(parts["cross"], cross, atol=1e-5)
    assert torch.allclose(parts["ensemble"], to_members, atol=1e-5)
    assert torch.allclose(parts["total"], supervised + cross + to_members, atol=1e-5)
    assert all(value >= -1e-6 for value in parts.values())


def test_ablations_reduce_exactly_to_the_smaller_objectives():
    torch.manual_seed(0)
    logits, target = torch.randn(2, 4, 6), torch.randint(0, 6, (4,))
    ensemble = logits.mean(0)
    ce = [soft_cross_entropy(z, target) for z in logits]
    ce_ensemble = soft_cross_entropy(ensemble, target)
    kd_to_members = distillation_kl(logits[0], ensemble, 3.0) + distillation_kl(logits[1], ensemble, 3.0)
    cross = CrossDistillationLoss(3.0)(logits)
    output = (logits, ensemble)

    def close(a, b):
        return torch.allclose(a, b, rtol=1e-6, atol=0.0)

    # no cross distillation: supervised + ensemble distillation
    parts = CEKDLoss(alpha=0.0).components(output, target)
    assert torch.equal(parts["cross"], torch.tensor(0.0))
    assert close(parts["total"], ce[0] + ce[1] + ce_ensemble + kd_to_members)
    # no collaborative ensemble: independent CE plus mutual distillation (DML-style)
    parts = CEKDLoss(beta=0.0, supervise_ensemble=False).components(output, target)
    assert torch.equal(parts["ensemble"], torch.tensor(0.0))
    assert close(parts["total"], ce[0] + ce[1] + cross)
    # neither: independently trained members
    parts = CEKDLoss(alpha=0.0, beta=0.0, supervise_ensemble=False).components(output, target)
    assert torch.equal(parts["cross"] + parts["ensemble"], torch.tensor(0.0))
    assert close(parts["total"], ce[0] + ce[1])


def test_ramp_up():
    assert rampup(0, 100) == pytest.approx(math.exp(-5))
    assert rampup(50, 100) == pytest.approx(math.exp(-1.25))
    assert rampup(100, 100) == 1.0 and rampup(10**6, 100) == 1.0 and rampup(3, 0) == 1.0
    torch.manual_seed(1)
    logits, target = torch.randn(2, 3, 4), torch.tensor([0, 1, 2])
    ensemble = logits.mean(0)
    loss = CEKDLoss(rampup_steps=10)
    parts = loss.components((logits, ensemble), target, step=5)
    full = CEKDLoss().components((logits, ensemble), target)
    assert torch.allclose(parts["cross"], full["cross"] * math.exp(-1.25))
    assert torch.allclose(parts["ensemble"], full["ensemble"] * math.exp(-1.25))
    assert torch.equal(parts["supervised"], full["supervised"])
    with pytest.raises(ValueError, match=r"`step` is required when rampup_steps > 0 \(rampup_steps=10\), got None"):
        loss((logits, ensemble), target)


def test_reductions():
    torch.manual_seed(2)
    logits, target = torch.randn(3, 5, 4), torch.randint(0, 4, (5,))
    output = (logits, logits.mean(0))
    per_sample = CEKDLoss(reduction="none")(output, target)
    assert per_sample.shape == (5,)
    assert torch.allclose(CEKDLoss(reduction="sum")(output, target), per_sample.sum())
    assert torch.allclose(CEKDLoss()(output, target), per_sample.mean())


def test_terms_in_float32_under_bf16_autocast():
    model = torch.nn.Linear(8, 5)
    ensemble = CollaborativeEnsemble([model, torch.nn.Linear(8, 5)])
    x, target = torch.randn(4, 8), torch.tensor([0, 1, 2, 3])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output = ensemble(x)
        parts = CEKDLoss().components(output, target)
    assert output.member_logits.dtype == torch.bfloat16
    assert all(value.dtype == torch.float32 for value in parts.values())
    reference = CEKDLoss().components((output.member_logits.float(), output.ensemble_logits.float()), target)
    assert all(torch.allclose(parts[name], reference[name]) for name in parts)


def test_objective_errors():
    good = (torch.zeros(2, 3, 4), torch.zeros(3, 4))
    with pytest.raises(ValueError, match=r"`temperature` must be > 0, got 0.0"):
        CEKDLoss(temperature=0.0)
    with pytest.raises(ValueError, match=r"`alpha` must be in \[0.0, inf\], got -0.5"):
        CEKDLoss(alpha=-0.5)
    with pytest.raises(ValueError, match=r"`beta` must be in \[0.0, inf\], got -1"):
        CEKDLoss(beta=-1)
    with pytest.raises(ValueError, match=r"`rampup_steps` must be an int >= 0, got -3"):
        CEKDLoss(rampup_steps=-3)
    with pytest.raises(ValueError, match=r"`ensemble_logits` must have shape \(3, 4\), got shape \(2, 4\)"):
        CEKDLoss()((good[0], torch.zeros(2, 4)), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"`target` must have shape \(3,\), got shape \(2,\)"):
        CEKDLoss()(good, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"`target` must have shape \(3, 4\), got shape \(3, 5\)"):
        CEKDLoss()(good, torch.zeros(3, 5))
    with pytest.raises(ValueError, match=r"`member_logits` must hold N >= 2 members, got N = 1"):
        CEKDLoss()((torch.zeros(1, 3, 4), torch.zeros(3, 4)), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"`weights` must have shape \(3,\), got shape \(4,\)"):
        CEKDLoss()(good, torch.tensor([0, 1, 2]), weights=torch.ones(4))


@pytest.mark.slow
def test_cekd_with_snapmix_overfits_a_fixed_batch():
    """torchvision + timm resnet18 on SnapMix batches whose CAMs come from a no-grad forward of member 0
    (through train_step, the forward half of a step that the quickstarts and the engine use)."""
    torch.manual_seed(0)
    classes, size = 4, 32
    images = torch.rand(8, 3, size, size)
    labels = torch.arange(8) % classes
    members = [
        torchvision.models.resnet18(num_classes=classes),
        timm.create_model("resnet18", pretrained=False, num_classes=classes),
    ]
    ensemble = CollaborativeEnsemble(members)
    tap = FeatureTap(members[0])
    mixer = MixingAugmenter("snapmix", classes, mix_alpha=5.0, p=0.5, generator=torch.Generator().manual_seed(0))
    criterion = CEKDLoss(temperature=3.0)
    optimizer = torch.optim.Adam(ensemble.parameters(), lr=1e-3)
    losses = []
    for step in range(40):
        loss = train_step(ensemble, criterion, images, labels, mixer=mixer, tap=tap, step=step).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    ensemble.eval()
    with torch.no_grad():
        accuracy = (ensemble.predict(images).argmax(1) == labels).float().mean().item()
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.5 * first, losses
    assert accuracy == 1.0


def test_train_step_is_mixing_forward_and_loss():
    """train_step returns what the three library calls give by hand, and names what it needs."""
    torch.manual_seed(0)
    ensemble = CollaborativeEnsemble([torchvision.models.resnet18(num_classes=3) for _ in range(2)])
    images, labels = torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    tap = FeatureTap(ensemble.member(0))
    criterion = CEKDLoss(rampup_steps=10)
    mixer = lambda: MixingAugmenter("snapmix", 3, generator=torch.Generator().manual_seed(2))  # noqa: E731
    ensemble.eval()  # deterministic forwards: the CAM forward must not change what the next one sees
    out = train_step(ensemble, criterion, images, labels, mixer=mixer(), tap=tap, step=4)
    batch = mixer()(images, labels, tap.cams(images, labels))
    parts = criterion.components(ensemble(batch.images), batch.targets, step=4)
    assert torch.equal(out.batch.images, batch.images)
    assert all(torch.allclose(out.parts[k], parts[k]) for k in parts) and out.loss is out.parts["total"]
    plain = train_step(ensemble.member(1), soft_cross_entropy, images, labels)
    assert plain.batch is None and set(plain.parts) == {"total"}
    assert torch.allclose(plain.loss, soft_cross_entropy(ensemble.member(1)(images), labels))
    with pytest.raises(ValueError, match="`tap` is required with a snapmix mixer"):
        train_step(ensemble, criterion, images, labels, mixer=mixer())
    with pytest.raises(ValueError, match="`tap` is used by a snapmix mixer only"):
        train_step(ensemble, criterion, images, labels, tap=tap)
