"""Soft targets from the label rows of the Kornia mix classes and of Kornia's own."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _checks


def kornia_soft_targets(labels: Tensor, num_classes: int) -> Tensor:
    """(B, K) float32 soft targets from the label rows of :class:`RandomMixUp` (B, 3), :class:`RandomCutMix`
    (1, B, 3) with its default ``use_correct_lambda=False``, Kornia's ``RandomMixUpV2`` / ``RandomCutMixV2``
    in the same meanings, or :class:`RandomSnapMix` (B, 4).

    Example:
        >>> kornia_soft_targets(torch.tensor([[0.0, 2.0, 0.25]]), 3)
        tensor([[0.7500, 0.0000, 0.2500]])
        >>> kornia_soft_targets(torch.tensor([[0.0, 2.0, 0.5, 0.75]]), 3)
        tensor([[0.5000, 0.0000, 0.7500]])
    """
    labels = _checks.check_tensor("labels", labels)
    _checks.check_positive_int("num_classes", num_classes)
    if labels.ndim == 3 and labels.shape[0] == 1 and labels.shape[-1] == 3:
        labels = labels[0]
    if labels.ndim != 2 or labels.shape[-1] not in (3, 4):
        raise ValueError(
            "`labels` must be mix label rows: (B, 3) [label, partner, lam], (1, B, 3) or (B, 4) "
            f"[label, partner, lam_a, lam_b], got shape {tuple(labels.shape)}"
        )
    rows = labels.float()
    weights = torch.stack([1.0 - rows[:, 2], rows[:, 2]], dim=1) if rows.shape[1] == 3 else rows[:, 2:]
    ids = rows[:, :2].round().long()
    _checks.check_class_ids("labels", ids, num_classes)
    targets = torch.zeros(rows.shape[0], num_classes, device=labels.device)
    return targets.scatter_add_(1, ids, weights)
