"""ONE's gate (Lan et al., "Knowledge Distillation by On-the-Fly Native Ensemble", NeurIPS 2018): per-sample
weights over N branches, from features the user chooses, and the gated teacher they make."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from . import _checks


class BranchGate(nn.Module):
    """ONE's gate: ``g = softmax(ReLU(BN1d(Linear(f))))`` over N branches, and the gated teacher ``sum_i g_i z_i``.

    ``f`` is what the gate reads: in ONE, the shared trunk's output, globally average-pooled; here any (B, D)
    features or (B, D, h, w) map (pooled over h, w), for example a :class:`~cekd_losses.FeatureTap`'s ``pooled``
    of one member, or the members' pooled features concatenated.

    Args:
        in_features: D.
        branches: N >= 2.

    Call: ``gate(features)`` -> (B, N) weights (rows sum to 1; in training mode B >= 2, for the BatchNorm);
    :meth:`teacher` combines (N, B, K) branch logits with them into the (B, K) teacher (detach it where it
    teaches the branches, as ONE does).

    Example:
        >>> gate = BranchGate(in_features=8, branches=3)
        >>> weights = gate(torch.rand(4, 8, 5, 5))
        >>> weights.shape, bool(torch.allclose(weights.sum(1), torch.ones(4)))
        (torch.Size([4, 3]), True)
        >>> gate.teacher(weights, torch.rand(3, 4, 10)).shape
        torch.Size([4, 10])
    """

    def __init__(self, in_features: int, branches: int) -> None:
        super().__init__()
        _checks.check_positive_int("in_features", in_features)
        if _checks.check_positive_int("branches", branches) < 2:
            raise ValueError(f"`branches` must be N >= 2, got {branches}")
        self.linear = nn.Linear(in_features, branches)
        self.norm = nn.BatchNorm1d(branches)

    def forward(self, features: Tensor) -> Tensor:
        """(B, N) gate weights from (B, D) features or a (B, D, h, w) map."""
        if isinstance(features, Tensor) and features.ndim == 4:
            features = features.mean(dim=(2, 3))
        features = _checks.check_shape("features", features, ("B", self.linear.in_features))
        return torch.relu(self.norm(self.linear(features))).softmax(dim=1)

    def teacher(self, weights: Tensor, member_logits: Tensor) -> Tensor:
        """(B, K) gated teacher ``sum_i g_i z_i`` of (B, N) ``weights`` and the (N, B, K) ``member_logits`` of
        the branches."""
        logits = _checks.check_member_logits(member_logits)
        _checks.check_shape("weights", weights, (logits.shape[1], logits.shape[0]))
        return torch.einsum("bn,nbk->bk", weights.to(logits.dtype), logits)
