"""Specifications of ONE's gate: its formula, weights that sum to 1, the gated teacher, gradients, errors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from cekd_losses import BranchGate


def test_the_gate_is_ones_formula():
    """g = softmax(ReLU(BN1d(Linear(pool(f))))), written out with the module's weights (BN in eval mode)."""
    torch.manual_seed(0)
    gate = BranchGate(6, 3).eval()
    gate.norm.running_mean.uniform_(-1, 1), gate.norm.running_var.uniform_(0.5, 2)
    maps = torch.randn(5, 6, 4, 4)
    pooled = maps.mean(dim=(2, 3))
    scores = pooled @ gate.linear.weight.T + gate.linear.bias
    normed = (scores - gate.norm.running_mean) / (gate.norm.running_var + gate.norm.eps).sqrt()
    expected = (normed * gate.norm.weight + gate.norm.bias).clamp(min=0).softmax(dim=1)
    assert torch.allclose(gate(maps), expected, atol=1e-6) and torch.allclose(gate(pooled), expected, atol=1e-6)


@given(seed=st.integers(0, 2**31 - 1), batch=st.integers(2, 6), branches=st.integers(2, 4), classes=st.integers(2, 5))
def test_weights_are_a_distribution_and_the_teacher_their_mix(seed, batch, branches, classes):
    torch.manual_seed(seed)
    gate = BranchGate(4, branches)
    weights = gate(torch.randn(batch, 4))
    assert weights.shape == (batch, branches) and (weights >= 0).all()
    assert torch.allclose(weights.sum(1), torch.ones(batch), atol=1e-6)
    logits = torch.randn(branches, batch, classes)
    by_hand = sum(weights[:, i : i + 1] * logits[i] for i in range(branches))
    assert torch.allclose(gate.teacher(weights, logits), by_hand, atol=1e-5)


def test_gradient_reaches_the_gate_and_its_features():
    gate = BranchGate(4, 2)
    features = torch.randn(3, 4, requires_grad=True)
    logits = torch.randn(2, 3, 5, requires_grad=True)
    gate.teacher(gate(features), logits).square().sum().backward()
    assert features.grad.abs().sum() > 0 and gate.linear.weight.grad.abs().sum() > 0 and logits.grad is not None


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: BranchGate(4, 1), r"`branches` must be N >= 2, got 1"),
        (lambda: BranchGate(0, 2), r"`in_features` must be >= 1, got 0"),
        (lambda: BranchGate(4, 2)(torch.rand(3, 5)), r"`features` must have shape \(B, 4\), got shape \(3, 5\)"),
        (
            lambda: BranchGate(4, 2).teacher(torch.rand(3, 3), torch.rand(2, 3, 5)),
            r"`weights` must have shape \(3, 2\), got shape \(3, 3\)",
        ),
    ],
)
def test_bad_input_is_named(call, message):
    with pytest.raises(ValueError, match=message):
        call()
