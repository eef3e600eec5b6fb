"""Specifications of soft cross entropy, distillation KL and CrossDistillationLoss."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from cekd_losses import CrossDistillationLoss, SoftTargetCrossEntropy, distillation_kl, soft_cross_entropy


def slow_kl(teacher_logits, student_logits, temperature):
    """T^2 * sum_k p_t log(p_t / p_s), per sample, from explicit softmaxes in float64."""
    p_t = torch.softmax(teacher_logits.double() / temperature, dim=1)
    p_s = torch.softmax(student_logits.double() / temperature, dim=1)
    return temperature**2 * (p_t * (p_t.log() - p_s.log())).sum(dim=1)


def slow_cross_distillation(member_logits, temperature):
    """(N, B): for each student i, the mean over peers j != i of slow_kl(z_j, z_i)."""
    n = len(member_logits)
    return torch.stack(
        [
            sum(slow_kl(member_logits[j], member_logits[i], temperature) for j in range(n) if j != i) / (n - 1)
            for i in range(n)
        ]
    )


# ---------------------------------------------------------------- soft cross entropy


def test_soft_cross_entropy_exact_values():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])  # softmax rows [1/2, 1/2] and [3/4, 1/4]
    target = torch.tensor([[0.5, 0.5], [0.3, 0.9]])  # rows need not sum to 1 (SnapMix weights)
    expected = torch.tensor([math.log(2.0), -(0.3 * math.log(0.75) + 0.9 * math.log(0.25))])
    assert torch.allclose(soft_cross_entropy(logits, target, "none"), expected)
    assert torch.allclose(soft_cross_entropy(logits, target), expected.mean())
    assert torch.allclose(soft_cross_entropy(logits, target, "sum"), expected.sum())
    assert torch.allclose(SoftTargetCrossEntropy("none")(logits, target), expected)


def test_soft_cross_entropy_with_class_ids_is_cross_entropy():
    logits, labels = torch.randn(6, 5), torch.randint(0, 5, (6,))
    assert torch.allclose(soft_cross_entropy(logits, labels), F.cross_entropy(logits, labels))
    assert torch.allclose(soft_cross_entropy(logits, F.one_hot(labels, 5).float()), F.cross_entropy(logits, labels))


def test_soft_cross_entropy_runs_in_float32():
    logits = torch.randn(4, 3).bfloat16()
    loss = soft_cross_entropy(logits, torch.tensor([0, 1, 2, 0]))
    assert loss.dtype == torch.float32
    assert torch.allclose(loss, F.cross_entropy(logits.float(), torch.tensor([0, 1, 2, 0])))


# ---------------------------------------------------------------- distillation KL


def test_distillation_kl_exact_value_and_temperature_scaling():
    student, teacher = torch.tensor([[0.0, 0.0]]), torch.tensor([[2.0, 0.0]])
    p = torch.tensor([math.e / (1 + math.e), 1 / (1 + math.e)])
    expected = 4.0 * (p * (p / 0.5).log()).sum()
    assert torch.allclose(distillation_kl(student, teacher, 2.0), expected)
    # T^2 factor: logits scaled by T at temperature T give T^2 times the T = 1 divergence
    s, t = torch.randn(5, 7), torch.randn(5, 7)
    assert torch.allclose(distillation_kl(3 * s, 3 * t, 3.0), 9 * distillation_kl(s, t, 1.0), atol=1e-5)


def test_distillation_kl_gradient_reaches_student_only():
    student = torch.randn(3, 4, requires_grad=True)
    teacher = torch.randn(3, 4, requires_grad=True)
    distillation_kl(student, teacher, 2.0).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None


@given(
    seed=st.integers(0, 2**31 - 1),
    batch=st.integers(1, 8),
    classes=st.integers(2, 10),
    temperature=st.floats(0.5, 8.0),
    scale=st.floats(0.1, 10.0),
)
def test_distillation_kl_properties(seed, batch, classes, temperature, scale):
    g = torch.Generator().manual_seed(seed)
    student = scale * torch.randn(batch, classes, generator=g)
    teacher = scale * torch.randn(batch, classes, generator=g)
    per_sample = distillation_kl(student, teacher, temperature, "none")
    assert torch.allclose(per_sample.double(), slow_kl(teacher, student, temperature), atol=1e-4, rtol=1e-4)
    assert (per_sample >= -1e-6).all()
    assert torch.allclose(distillation_kl(teacher, teacher, temperature, "none"), torch.zeros(batch), atol=1e-6)
    shifted = teacher + 5.0  # the same softmax: no divergence (float32 rounding of the shift, scaled by T^2)
    assert torch.allclose(
        distillation_kl(shifted, teacher, temperature, "none"), torch.zeros(batch), atol=1e-6 * temperature**2
    )


# ---------------------------------------------------------------- cross distillation


def test_cross_distillation_two_members_is_mutual_kd():
    z0, z1 = torch.randn(4, 6), torch.randn(4, 6)
    loss = CrossDistillationLoss(temperature=3.0)
    expected = distillation_kl(z0, z1, 3.0) + distillation_kl(z1, z0, 3.0)
    assert torch.allclose(loss([z0, z1]), expected)
    assert torch.allclose(loss(torch.stack([z0, z1])), expected)


@pytest.mark.parametrize("members", [2, 3, 4])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_distillation_matches_peer_average(members, reduction):
    torch.manual_seed(members)
    logits = [torch.randn(5, 7) * 2 for _ in range(members)]
    weights = torch.rand(5)
    reference = slow_cross_distillation(logits, 2.0) * weights.double()  # (N, B)
    got = CrossDistillationLoss(2.0, reduction)(logits, weights)
    expected = {"none": reference, "sum": reference.sum(), "mean": reference.sum(0).mean()}[reduction]
    assert torch.allclose(got.double(), expected, atol=1e-5)


def test_cross_distillation_member_gets_no_gradient_as_teacher():
    logits = [torch.randn(3, 5, requires_grad=True) for _ in range(3)]
    per_member = CrossDistillationLoss(2.0, "none")(logits)
    for i in range(3):
        grads = torch.autograd.grad(per_member[i].sum(), logits, retain_graph=True)
        for j in range(3):
            if j == i:
                assert grads[j].abs().sum() > 0  # the student learns
            else:
                assert torch.equal(grads[j], torch.zeros_like(grads[j]))  # its teachers do not


@given(
    seed=st.integers(0, 2**31 - 1),
    members=st.integers(2, 4),
    batch=st.integers(1, 6),
    classes=st.integers(2, 8),
    temperature=st.floats(0.5, 6.0),
)
def test_cross_distillation_properties(seed, members, batch, classes, temperature):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(members, batch, classes, generator=g) * 3
    loss = CrossDistillationLoss(temperature, "none")
    per_member = loss(logits)
    assert per_member.shape == (members, batch)
    assert (per_member >= -1e-6).all()
    assert torch.allclose(per_member.double(), slow_cross_distillation(list(logits), temperature), atol=1e-4)
    agree = logits[:1].expand(members, batch, classes)
    assert torch.allclose(loss(agree), torch.zeros(members, batch), atol=1e-6)
    # permuting members permutes the per-member terms
    order = torch.randperm(members, generator=g)
    assert torch.allclose(loss(logits[order]), per_member[order], atol=1e-6)


def test_cross_distillation_in_float32_under_bf16():
    logits = torch.randn(2, 4, 5).bfloat16()
    out = CrossDistillationLoss(2.0)(logits)
    assert out.dtype == torch.float32
    assert torch.allclose(out, CrossDistillationLoss(2.0)(logits.float()))


# ---------------------------------------------------------------- bad input


def test_loss_argument_errors():
    with pytest.raises(ValueError, match=r"`temperature` must be > 0, got 0"):
        CrossDistillationLoss(temperature=0)
    with pytest.raises(ValueError, match=r"`temperature` must be > 0, got -1.0"):
        distillation_kl(torch.zeros(1, 2), torch.zeros(1, 2), -1.0)
    with pytest.raises(ValueError, match=r"`reduction` must be one of 'mean', 'sum', 'none', got 'avg'"):
        SoftTargetCrossEntropy("avg")
    with pytest.raises(ValueError, match=r"`member_logits` must hold N >= 2 members, got N = 1"):
        CrossDistillationLoss()([torch.zeros(2, 3)])
    with pytest.raises(
        ValueError, match=r"`member_logits` must all have one shape \(B, K\), got shapes \[\(2, 3\), \(2, 4\)\]"
    ):
        CrossDistillationLoss()([torch.zeros(2, 3), torch.zeros(2, 4)])
    with pytest.raises(ValueError, match=r"`member_logits\[1\]` must have shape \(B, K\), got shape \(2,\)"):
        CrossDistillationLoss()([torch.zeros(2, 3), torch.zeros(2)])
    with pytest.raises(ValueError, match=r"`weights` must have shape \(2,\), got shape \(3,\)"):
        CrossDistillationLoss()([torch.zeros(2, 3), torch.zeros(2, 3)], torch.ones(3))
    with pytest.raises(ValueError, match=r"`target` must have shape \(2, 3\), got shape \(2, 4\)"):
        soft_cross_entropy(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"`target` must hold class ids in \[0, 3\), got values in \[0, 3\]"):
        soft_cross_entropy(torch.zeros(2, 3), torch.tensor([0, 3]))
    with pytest.raises(
        ValueError, match=r"`teacher_logits` must have the shape of `student_logits` \(2, 3\), got shape \(3, 3\)"
    ):
        distillation_kl(torch.zeros(2, 3), torch.zeros(3, 3), 1.0)
    with pytest.raises(TypeError, match=r"`member_logits` must be a \(N, B, K\) tensor or a sequence"):
        CrossDistillationLoss()(3)
