"""Offline distillation: KDLoss and CCDLoss against their equations written out in float64, and train_step with a
fixed teacher (what the teacher sees, CCD's pairing, the reuse of SnapMix's clean teacher forward, the errors)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from cekd_losses import (
    CCDLoss,
    CEKDLoss,
    CollaborativeEnsemble,
    FeatureTap,
    KDLoss,
    MixingAugmenter,
    PeerViews,
    train_step,
)


def tiny(classes: int = 5, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(6, classes),
    )  # fmt: skip


def kl64(teacher: list[float], student: list[float], t: float) -> float:
    """T^2 KL(softmax(teacher / T) || softmax(student / T)), one row, in float64 Python arithmetic."""
    p = [math.exp(z / t) for z in teacher]
    q = [math.exp(z / t) for z in student]
    p, q = [v / sum(p) for v in p], [v / sum(q) for v in q]
    return t * t * sum(a * math.log(a / b) for a, b in zip(p, q, strict=True) if a > 0)


def ce64(student: list[float], target: list[float]) -> float:
    log_z = math.log(sum(math.exp(z) for z in student))
    return -sum(w * (z - log_z) for w, z in zip(target, student, strict=True))


def cos64(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / max(math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)), 1e-8)


def test_kd_by_hand():
    """Student [0, 0], teacher [2 ln 3, 0] at T = 2: the teacher's soft targets are [3/4, 1/4]; label 0."""
    student, teacher = torch.zeros(1, 2), torch.tensor([[2 * math.log(3.0), 0.0]])
    parts = KDLoss(temperature=2.0, alpha=0.3, beta=0.6).components(student, teacher, torch.tensor([0]))
    kl = 4 * (0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5))
    assert parts["supervised"].item() == pytest.approx(0.3 * math.log(2), rel=1e-6)
    assert parts["distillation"].item() == pytest.approx(0.6 * kl, rel=1e-6)
    assert parts["total"].item() == pytest.approx(0.3 * math.log(2) + 0.6 * kl, rel=1e-6)


def test_kd_defaults_are_the_reference_codes():
    criterion = KDLoss()
    assert (criterion.temperature, criterion.alpha, criterion.beta) == (4.0, 0.5, 0.5)
    assert KDLoss(alpha=0.1).beta == pytest.approx(0.9)  # beta = 1 - alpha unless given


logits = st.lists(st.floats(-6, 6), min_size=3, max_size=3)


@given(
    rows=st.lists(st.tuples(logits, logits, st.lists(st.floats(0, 1), min_size=3, max_size=3)), min_size=1, max_size=5),
    temperature=st.floats(0.5, 6),
    alpha=st.floats(0, 2),
    beta=st.floats(0, 2),
)
def test_kd_is_its_equation(rows, temperature, alpha, beta):
    student = torch.tensor([r[0] for r in rows], dtype=torch.float64)
    teacher = torch.tensor([r[1] for r in rows], dtype=torch.float64)
    target = torch.tensor([r[2] for r in rows], dtype=torch.float64)
    got = KDLoss(temperature, alpha, beta).components(student, teacher, target)["total"].item()
    want = sum(alpha * ce64(s, y) + beta * kl64(t, s, temperature) for s, t, y in rows) / len(rows)
    assert got == pytest.approx(want, rel=1e-5, abs=1e-5)  # float32 inside: relative 1e-5 of terms up to ~50


@given(
    pairs=st.lists(st.tuples(logits, logits, logits, logits, st.integers(0, 2)), min_size=1, max_size=4),
    temperature=st.floats(0.5, 6),
    alpha=st.floats(0, 1),
)
def test_ccd_is_its_reference_equation(pairs, temperature, alpha):
    """alpha * mean over 2B of CE + (1 - alpha) T^2 (mean KL_original + mean (1 + cos) KL_augmented) / 2, as
    SingleCCD.py computes it (its interleaved rows stacked as halves here)."""
    s_orig, s_aug, t_orig, t_aug = ([list(p[i]) for p in pairs] for i in range(4))
    ids = [p[4] for p in pairs]
    student = torch.tensor(s_orig + s_aug, dtype=torch.float64)
    teacher = torch.tensor(t_orig + t_aug, dtype=torch.float64)
    got = CCDLoss(temperature, alpha).components(student, teacher, torch.tensor(ids + ids))["total"].item()
    one_hot = [[float(i == k) for i in range(3)] for k in ids]
    ce = sum(ce64(s, y) for s, y in zip(s_orig + s_aug, one_hot + one_hot, strict=True)) / (2 * len(pairs))
    kl_orig = sum(kl64(t, s, 1.0 * temperature) for s, t in zip(s_orig, t_orig, strict=True)) / len(pairs)
    kl_aug = sum(
        (1 + cos64(ta, to)) * kl64(ta, sa, temperature) for sa, ta, to in zip(s_aug, t_aug, t_orig, strict=True)
    ) / len(pairs)
    want = alpha * ce + (1 - alpha) * (kl_orig + kl_aug) / 2
    assert got == pytest.approx(want, rel=1e-5, abs=1e-5)


def test_ccd_copy_the_teacher_turned_around_teaches_nothing():
    """cos = -1: weight 0, so the copy's student row gets the cross entropy's gradient alone."""
    teacher = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    student = torch.tensor([[0.0, 0.0], [0.5, -0.5]], requires_grad=True)
    CCDLoss(alpha=0.5).components(student, teacher, torch.tensor([0, 0]))["total"].backward()
    ce_only = torch.tensor([[0.0, 0.0], [0.5, -0.5]], requires_grad=True)
    (0.5 * F.cross_entropy(ce_only, torch.tensor([0, 0]), reduction="sum") / 2).backward()
    assert torch.allclose(student.grad[1], ce_only.grad[1], atol=1e-7)
    assert not torch.allclose(student.grad[0], ce_only.grad[0])  # the original still distils


def test_losses_refuse_bad_arguments():
    with pytest.raises(ValueError, match="`temperature`"):
        KDLoss(temperature=0)
    with pytest.raises(ValueError, match="`alpha`"):
        KDLoss(alpha=-1)
    with pytest.raises(ValueError, match="`beta`"):
        KDLoss(alpha=2.0)  # beta = 1 - alpha < 0
    with pytest.raises(ValueError, match=r"`teacher_logits` must have shape \(2, 5\), got shape \(2, 4\)"):
        KDLoss()(torch.zeros(2, 5), torch.zeros(2, 4), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="2B rows .* got 3 rows"):
        CCDLoss()(torch.zeros(3, 5), torch.zeros(3, 5), torch.tensor([0, 1, 2]))


class Recording(nn.Module):
    """A teacher that records what it saw and whether gradients were on."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net, self.seen, self.grad_on = net, [], []

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.seen.append(images.detach().clone())
        self.grad_on.append(torch.is_grad_enabled())
        return self.net(images)


def batch_of(size: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.rand(size, 3, 16, 16, generator=torch.Generator().manual_seed(3)), torch.arange(size) % 5


def test_kd_step_teacher_sees_the_mixed_batch_in_eval_mode_without_grad():
    student, teacher = tiny(seed=0), Recording(tiny(seed=1)).train()
    images, labels = batch_of()
    mixer = MixingAugmenter("cutmix", 5, p=1.0, generator=torch.Generator().manual_seed(0))
    out = train_step(student, KDLoss(), images, labels, mixer=mixer, teacher=teacher)
    assert not teacher.training and teacher.grad_on == [False]
    assert torch.equal(teacher.seen[0], out.batch.images)
    with torch.no_grad():
        taught = teacher.net(out.batch.images)
    assert torch.allclose(out.loss, KDLoss()(student(out.batch.images), taught, out.batch.targets), atol=1e-6)
    out.loss.backward()
    assert all(p.grad is None for p in teacher.parameters())


def test_ccd_step_pairs_each_clean_image_with_its_mix():
    student, teacher = tiny(seed=0).eval(), Recording(tiny(seed=1))
    images, labels = batch_of()
    mixer = MixingAugmenter("mixup", 5, p=1.0, generator=torch.Generator().manual_seed(0))
    out = train_step(student, CCDLoss(), images, labels, mixer=mixer, teacher=teacher)
    paired = torch.cat([images, out.batch.images])
    assert out.output.shape == (12, 5) and torch.equal(teacher.seen[0], paired)
    targets = torch.cat([F.one_hot(labels, 5).float(), out.batch.targets])
    with torch.no_grad():
        want = CCDLoss()(student(paired), teacher.net(paired), targets)
    assert torch.allclose(out.loss, want, atol=1e-6)


def tap_on(model: nn.Module, net: nn.Module) -> FeatureTap:
    """A tap on ``model`` (``net`` or a wrapper of it) reading ``tiny``'s feature map and classifier."""
    return FeatureTap(model, feature_module=net[2], classifier=net[5])


def test_ccd_clean_half_takes_the_mixers_targets_label_smoothing_included():
    student, teacher = tiny(seed=0).eval(), tiny(seed=1)
    images, labels = batch_of()
    mixer = MixingAugmenter("cutmix", 5, p=1.0, label_smoothing=0.2, generator=torch.Generator().manual_seed(0))
    out = train_step(student, CCDLoss(), images, labels, mixer=mixer, teacher=teacher)
    paired = torch.cat([images, out.batch.images])
    smoothed = F.one_hot(labels, 5).float() * 0.8 + 0.2 / 5
    with torch.no_grad():
        want = CCDLoss()(student(paired), teacher(paired), torch.cat([smoothed, out.batch.targets]))
    assert torch.allclose(out.loss, want, atol=1e-6)


def test_ccd_snapmix_reuses_the_teachers_cam_forward():
    """A tap on the teacher: its CAM forward on the clean images gives the clean logits too, so the teacher runs
    on B clean and then B mixed images (not B + 2B), and the loss is CCD's on both halves."""
    student, teacher = tiny(seed=0).eval(), Recording(tiny(seed=1))
    images, labels = batch_of()
    mixer = MixingAugmenter("snapmix", 5, p=1.0, generator=torch.Generator().manual_seed(0))
    tap = tap_on(teacher, teacher.net)
    out = train_step(student, CCDLoss(), images, labels, mixer=mixer, tap=tap, teacher=teacher)
    assert [len(seen) for seen in teacher.seen] == [6, 6] and teacher.grad_on == [False, False]
    assert torch.equal(teacher.seen[0], images) and torch.equal(teacher.seen[1], out.batch.images)
    paired = torch.cat([images, out.batch.images])
    targets = torch.cat([F.one_hot(labels, 5).float(), out.batch.targets])
    with torch.no_grad():
        want = CCDLoss()(student(paired), teacher.net(paired), targets)
    assert torch.allclose(out.loss, want, atol=1e-6)


def test_an_ensemble_teaches_by_its_ensemble_logits():
    teacher = CollaborativeEnsemble([tiny(seed=1), tiny(seed=2)])
    student, (images, labels) = tiny(seed=0), batch_of()
    out = train_step(student, KDLoss(), images, labels, teacher=teacher)
    with torch.no_grad():
        taught = teacher(images).ensemble_logits
    assert torch.allclose(out.loss, KDLoss()(student(images), taught, labels), atol=1e-6)


def test_offline_step_errors_name_the_argument():
    student, (images, labels) = tiny(), batch_of()
    with pytest.raises(ValueError, match="`teacher` must score the student's 5 classes, got logits of 7 classes"):
        train_step(student, KDLoss(), images, labels, teacher=tiny(classes=7))
    with pytest.raises(TypeError, match="a `teacher` needs criterion=KDLoss"):
        train_step(student, CEKDLoss(), images, labels, teacher=tiny())
    with pytest.raises(ValueError, match="KDLoss distils a fixed teacher: pass `teacher=`"):
        train_step(student, KDLoss(), images, labels)
    with pytest.raises(ValueError, match="CCDLoss pairs each image with its mix: pass a `mixer`"):
        train_step(student, CCDLoss(), images, labels, teacher=tiny())
    with pytest.raises(ValueError, match="drop `views`"):
        train_step(student, KDLoss(), images, labels, teacher=tiny(), views=PeerViews(2, 2))


def test_logits_and_cams_is_one_forward_of_both():
    model = tiny().eval()
    images, labels = batch_of()
    tap = tap_on(model, model)
    logits, cams = tap.logits_and_cams(images, labels)
    with torch.no_grad():
        assert torch.equal(logits, model(images))
    assert torch.equal(cams, tap.cams(images, labels))


def test_ccd_weights_multiply_the_confidence():
    """Per-sample ``weights`` (2B,) scale each row's distillation on top of CCD's own 1 / 1 + cos."""
    student, teacher = torch.randn(4, 3, generator=torch.Generator().manual_seed(1)), torch.randn(4, 3)
    target, criterion = torch.tensor([0, 1, 0, 1]), CCDLoss(reduction="none")
    plain = criterion.components(student, teacher, target)
    halved = criterion.components(student, teacher, target, weights=torch.full((4,), 0.5))
    assert torch.allclose(halved["distillation"], plain["distillation"] / 2)
    assert torch.equal(halved["supervised"], plain["supervised"])


def test_ccd_step_under_torch_compile_matches_eager():
    """The offline step's forward, mixer and teacher included, traced whole by dynamo (fullgraph) and AOT
    autograd, gives eager's loss and gradients (backend aot_eager, as the CEKD step's test in
    test_training_step.py)."""
    student, teacher = tiny(seed=0), tiny(seed=1)
    images, labels = batch_of()

    def forward(mixer: MixingAugmenter) -> torch.Tensor:
        return train_step(student, CCDLoss(), images, labels, mixer=mixer, teacher=teacher).loss

    def step(forward, mixer: MixingAugmenter) -> tuple[torch.Tensor, list[torch.Tensor]]:
        student.zero_grad()
        loss = forward(mixer)
        loss.backward()
        return loss, [p.grad.clone() for p in student.parameters()]

    compiled = torch.compile(forward, backend="aot_eager", fullgraph=True)
    for method in ("mixup", "cutmix"):
        eager_loss, eager_grads = step(forward, MixingAugmenter(method, 5, generator=torch.Generator().manual_seed(1)))
        loss, grads = step(compiled, MixingAugmenter(method, 5, generator=torch.Generator().manual_seed(1)))
        assert torch.allclose(loss, eager_loss, atol=1e-5)
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(grads, eager_grads, strict=True))
