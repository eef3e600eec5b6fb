"""Specifications of OnlineDistillationLoss: each method's objective written out from its paper, term by term."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from cekd_losses import METHODS, CEKDLoss, OnlineDistillationLoss, OnlineOutput, rampup, train_step


def kl_by_hand(teacher: torch.Tensor, student: torch.Tensor, temperature: float) -> float:
    """T^2 sum_k p_t log(p_t / p_s) of two (K,) float64 logit rows, softmax written out."""
    p_t = torch.exp(teacher / temperature) / torch.exp(teacher / temperature).sum()
    p_s = torch.exp(student / temperature) / torch.exp(student / temperature).sum()
    return temperature**2 * float((p_t * torch.log(p_t / p_s)).sum())


def ce_by_hand(logits: torch.Tensor, target: torch.Tensor) -> float:
    """-sum_k y_k log softmax(z)_k of one (K,) row and its (K,) target weights."""
    return -float((target * (logits - torch.log(torch.exp(logits).sum()))).sum())


def objective_by_hand(method, members, target, teacher, means, temperature, ramp, weights):
    """Per-sample totals (B,) of the family's equations (docs/online.rst), with plain loops in float64."""
    n, batch, _ = members.shape
    totals = []
    for b in range(batch):
        z = members[:, b].double()
        kl = lambda t, s: kl_by_hand(t, s, temperature)  # noqa: E731
        value = sum(ce_by_hand(z[i], target[b]) for i in range(n))
        distill = 0.0
        if method in ("one", "ffl", "pcl", "cekd"):
            t = teacher[b].double()
            value += ce_by_hand(t, target[b])
            distill += sum(kl(t, z[i]) for i in range(n))
        if method in ("dml", "cekd"):
            distill += sum(kl(z[j], z[i]) for i in range(n) for j in range(n) if j != i) / (n - 1)
        if method == "ffl":
            distill += kl(z.mean(0), teacher[b].double())
        if method == "pcl":
            distill += sum(kl(means[i, j, b].double(), z[i]) for i in range(n) for j in range(n) if j != i) / (n - 1)
        if method == "mcl":  # MCL-OKD: the members' mean teaches the last member
            distill += kl(z.mean(0), z[n - 1])
        totals.append(value + ramp * float(weights[b]) * distill)
    return torch.tensor(totals, dtype=torch.float64)


@given(
    seed=st.integers(0, 2**31 - 1),
    method=st.sampled_from(sorted(METHODS)),
    members=st.integers(2, 4),
    batch=st.integers(1, 5),
    classes=st.integers(2, 6),
    temperature=st.floats(0.5, 5.0),
    step=st.integers(0, 12),
    weighted=st.booleans(),
)
def test_every_method_equals_its_equation(seed, method, members, batch, classes, temperature, step, weighted):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(members, batch, classes, generator=g) * 2
    teacher = torch.randn(batch, classes, generator=g) * 2
    means = torch.randn(members, members, batch, classes, generator=g) * 2
    target = torch.rand(batch, classes, generator=g)
    weights = torch.rand(batch, generator=g) if weighted else torch.ones(batch)
    criterion = OnlineDistillationLoss(method, temperature, rampup_steps=10, reduction="none")
    got = criterion(
        logits,
        target,
        teacher_logits=teacher if METHODS[method].teacher else None,
        mean_logits=means if method == "pcl" else None,
        step=step,
        weights=weights if weighted else None,
    )
    want = objective_by_hand(method, logits, target, teacher, means, temperature, rampup(step, 10), weights)
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-4)


def test_dml_by_hand_on_two_classes():
    # p_1 = (1/2, 1/2), p_2 = (3/4, 1/4) at T = 1 (DML's default); targets are class 0
    members = torch.tensor([[[0.0, 0.0]], [[math.log(3.0), 0.0]]])
    parts = OnlineDistillationLoss("dml").components(members, torch.tensor([0]))
    kl_21 = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)  # member 2 teaches member 1
    kl_12 = 0.5 * math.log(2 / 3) + 0.5 * math.log(2.0)
    assert parts["peers"].item() == pytest.approx(kl_21 + kl_12, abs=1e-6)
    assert parts["supervised"].item() == pytest.approx(math.log(2.0) + math.log(4 / 3), abs=1e-6)
    assert list(parts) == ["total", "supervised", "peers"]


def test_ffl_by_hand_directions():
    # members (0, 0) and (2, 0): their mean (1, 0) teaches the fused (0, 0); the fused teaches both members
    members = torch.tensor([[[0.0, 0.0]], [[2.0, 0.0]]])
    fused = torch.zeros(1, 2)
    parts = OnlineDistillationLoss("ffl", temperature=1.0).components(members, torch.tensor([1]), teacher_logits=fused)
    p = 1 / (1 + math.exp(-1.0))  # softmax((1, 0))[0]
    to_teacher = p * math.log(2 * p) + (1 - p) * math.log(2 * (1 - p))
    q = 1 / (1 + math.exp(-2.0))  # softmax((2, 0))[0]
    teacher = 0.5 * math.log(0.5 / q) + 0.5 * math.log(0.5 / (1 - q))  # member 2; member 1 agrees with the fused
    assert parts["to_teacher"].item() == pytest.approx(to_teacher, abs=1e-6)
    assert parts["teacher"].item() == pytest.approx(teacher, abs=1e-6)


@given(seed=st.integers(0, 2**31 - 1), temperature=st.floats(0.5, 5.0), step=st.integers(0, 12), soft=st.booleans())
def test_cekd_preset_equals_cekd_loss(seed, temperature, step, soft):
    g = torch.Generator().manual_seed(seed)
    logits, ensemble = torch.randn(3, 4, 5, generator=g), torch.randn(4, 5, generator=g)
    target = torch.rand(4, 5, generator=g) if soft else torch.randint(0, 5, (4,), generator=g)
    ours = OnlineDistillationLoss("cekd", temperature, rampup_steps=10).components(
        logits, target, teacher_logits=ensemble, step=step
    )
    theirs = CEKDLoss(temperature, rampup_steps=10).components((logits, ensemble), target, step=step)
    for name, their_name in [
        ("total", "total"),
        ("supervised", "supervised"),
        ("peers", "cross"),
        ("teacher", "ensemble"),
    ]:
        assert torch.allclose(ours[name], theirs[their_name], atol=1e-5)


def test_pcl_with_one_view_equals_every_view_the_same():
    g = torch.Generator().manual_seed(0)
    logits, teacher, means = (
        torch.randn(3, 4, 5, generator=g),
        torch.randn(4, 5, generator=g),
        torch.randn(3, 4, 5, generator=g),
    )
    criterion = OnlineDistillationLoss("pcl")
    one_view = criterion.components(logits, torch.arange(4), teacher_logits=teacher, mean_logits=means)
    every_view = criterion.components(
        logits, torch.arange(4), teacher_logits=teacher, mean_logits=means.expand(3, 3, 4, 5)
    )
    assert torch.allclose(one_view["mean_teachers"], every_view["mean_teachers"])


@pytest.mark.parametrize("method", sorted(METHODS))
def test_teachers_take_no_gradient_from_distillation(method):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 4, 5, generator=g).requires_grad_()
    teacher = torch.randn(4, 5, generator=g).requires_grad_()
    means = torch.randn(3, 3, 4, 5, generator=g).requires_grad_()
    parts = OnlineDistillationLoss(method).components(
        logits,
        torch.arange(4),
        teacher_logits=teacher if METHODS[method].teacher else None,
        mean_logits=means if method == "pcl" else None,
    )
    for name in METHODS[method].terms:
        members_grad, teacher_grad, means_grad = torch.autograd.grad(
            parts[name], [logits, teacher, means], retain_graph=True, allow_unused=True
        )
        student_grad, taught_by = (teacher_grad, members_grad) if name == "to_teacher" else (members_grad, teacher_grad)
        assert student_grad is not None and student_grad.abs().sum() > 0, name
        assert taught_by is None or not taught_by.any(), name  # teachers are detached
        assert means_grad is None, name  # the mean models never take one


def test_peers_gradient_is_the_students_own():
    # with the teachers frozen as constants, member i's gradient of "peers" is the same: teachers are detached
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 3, 4, generator=g).requires_grad_()
    (grad,) = torch.autograd.grad(OnlineDistillationLoss("dml").components(logits, torch.arange(3))["peers"], logits)
    frozen = logits.detach()
    expected = []
    for i in range(2):
        student = logits[i].detach().requires_grad_()
        teacher_probs = torch.softmax(frozen[1 - i], dim=1)
        value = (teacher_probs * (teacher_probs.log() - torch.log_softmax(student, dim=1))).sum(1).mean()
        expected.append(torch.autograd.grad(value, student)[0])
    assert torch.allclose(grad, torch.stack(expected), atol=1e-6)


def test_reductions_and_repr():
    logits, target = torch.randn(2, 3, 4), torch.arange(3)
    per_sample = OnlineDistillationLoss("dml", reduction="none")(logits, target)
    assert per_sample.shape == (3,)
    assert torch.allclose(OnlineDistillationLoss("dml", reduction="sum")(logits, target), per_sample.sum())
    assert torch.allclose(OnlineDistillationLoss("dml")(logits, target), per_sample.mean())
    assert repr(OnlineDistillationLoss("one", rampup_steps=5)) == (
        "OnlineDistillationLoss(method='one', temperature=3.0, rampup_steps=5, reduction='mean')"
    )


def test_bad_input_is_named():
    logits, target, teacher = torch.randn(2, 3, 4), torch.arange(3), torch.randn(3, 4)
    with pytest.raises(ValueError, match=r"`method` must be one of .*'dml'.*got 'kd'"):
        OnlineDistillationLoss("kd")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`temperature`"):
        OnlineDistillationLoss("one", temperature=0.0)
    with pytest.raises(ValueError, match="`rampup_steps` must be an int >= 0, got -1"):
        OnlineDistillationLoss("one", rampup_steps=-1)
    with pytest.raises(ValueError, match="`teacher_logits` is required by method 'one': the gated teacher"):
        OnlineDistillationLoss("one")(logits, target)
    with pytest.raises(ValueError, match="`teacher_logits` is not used by method 'dml'"):
        OnlineDistillationLoss("dml")(logits, target, teacher_logits=teacher)
    with pytest.raises(ValueError, match="`teacher_logits` must have shape"):
        OnlineDistillationLoss("ffl")(logits, target, teacher_logits=torch.randn(3, 5))
    with pytest.raises(ValueError, match="`mean_logits` is required by method 'pcl'"):
        OnlineDistillationLoss("pcl")(logits, target, teacher_logits=teacher)
    with pytest.raises(ValueError, match="`mean_logits` is used by method 'pcl' only, not 'one'"):
        OnlineDistillationLoss("one")(logits, target, teacher_logits=teacher, mean_logits=logits)
    with pytest.raises(ValueError, match="`mean_logits` must have shape"):
        OnlineDistillationLoss("pcl")(logits, target, teacher_logits=teacher, mean_logits=torch.randn(2, 3, 3, 4))
    with pytest.raises(ValueError, match="N >= 2 members, got N = 1"):
        OnlineDistillationLoss("dml")(logits[:1], target)
    with pytest.raises(ValueError, match="`step` is required when rampup_steps > 0"):
        OnlineDistillationLoss("dml", rampup_steps=3)(logits, target)


def test_an_online_output_carries_every_logit_and_train_step_passes_it_on():
    g = torch.Generator().manual_seed(3)
    logits, teacher, means = (
        torch.randn(2, 4, 5, generator=g),
        torch.randn(4, 5, generator=g),
        torch.randn(2, 4, 5, generator=g),
    )
    criterion = OnlineDistillationLoss("pcl")
    target = torch.arange(4)
    packed = criterion.components(OnlineOutput(logits, teacher, means), target)
    apart = criterion.components(logits, target, teacher_logits=teacher, mean_logits=means)
    assert all(torch.equal(packed[name], apart[name]) for name in apart)
    with pytest.raises(ValueError, match="in the OnlineOutput or beside it, not both"):
        criterion(OnlineOutput(logits, teacher, means), target, teacher_logits=teacher)

    class Peers(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.peers = torch.nn.ModuleList(torch.nn.Linear(12, 5) for _ in range(2))

        def forward(self, images: torch.Tensor) -> OnlineOutput:
            flat = images.flatten(1)
            member_logits = torch.stack([peer(flat) for peer in self.peers])
            return OnlineOutput(member_logits, member_logits.mean(0))

    out = train_step(Peers(), OnlineDistillationLoss("cekd"), torch.rand(4, 3, 2, 2), target)
    assert list(out.parts) == ["total", "supervised", "peers", "teacher"]
    out.loss.backward()


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_objective_traces_whole_and_matches_eager(method):
    g = torch.Generator().manual_seed(4)
    logits, teacher, means = (
        torch.randn(3, 4, 5, generator=g),
        torch.randn(4, 5, generator=g),
        torch.randn(3, 3, 4, 5, generator=g),
    )
    output = OnlineOutput(logits, teacher if METHODS[method].teacher else None, means if method == "pcl" else None)
    criterion = OnlineDistillationLoss(method, rampup_steps=10)
    target = torch.rand(4, 5, generator=g)
    compiled = torch.compile(lambda o, y: criterion.components(o, y, step=3), fullgraph=True, backend="eager")
    got, want = compiled(output, target), criterion.components(output, target, step=3)
    assert all(torch.allclose(got[name], want[name], atol=1e-6) for name in want)
