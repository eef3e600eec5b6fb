"""Soft-target cross entropy and (cross) knowledge distillation losses.

All reductions and log-softmaxes run in float32, so the losses are safe under fp16/bf16 autocast.
``reduction`` follows ``torch.nn`` losses: ``"mean"`` (over the batch), ``"sum"`` or ``"none"``.

Defined edge cases:

- an empty batch (B = 0) gives 0 for ``"mean"`` and ``"sum"`` (an empty tensor for ``"none"``),
  so a step on no samples changes nothing instead of turning the loss into NaN;
- logits of ``-inf`` (masked classes) are allowed: a class with zero target weight (or zero teacher
  probability) adds 0, so the loss is finite wherever its true value is. A class with positive weight
  but ``-inf`` logit gives ``inf``, the true value.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch.nn.functional as F
from torch import Tensor, nn

from . import _checks
from ._terms import kl, mean_over_peers, reduce, weighted_log

__all__ = [
    "CrossDistillationLoss",
    "Reduction",
    "SoftTargetCrossEntropy",
    "distillation_kl",
    "soft_cross_entropy",
]

Reduction = Literal["mean", "sum", "none"]
"""The ``reduction`` of every loss, as in ``torch.nn``: ``"mean"`` over the batch, ``"sum"``, or ``"none"``."""


def soft_cross_entropy(logits: Tensor, target: Tensor, reduction: Reduction = "mean") -> Tensor:
    """Cross entropy against class ids or soft target weights, in float32.

    ``loss[b] = -sum_k target[b, k] * log_softmax(logits[b])[k]``. Soft rows need not sum to 1
    (SnapMix weights do not); a row of class ids is the usual cross entropy.

    Args:
        logits: (B, K) floating logits.
        target: (B,) integer class ids or (B, K) floating weights.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (B,).

    Example:
        >>> logits = torch.tensor([[0.0, 0.0]])
        >>> soft_cross_entropy(logits, torch.tensor([[0.5, 0.5]]))  # log 2
        tensor(0.6931)
    """
    _checks.check_reduction(reduction)
    logits = _checks.check_logits("logits", logits)
    target = _checks.check_target(target, *logits.shape)
    log_probs = F.log_softmax(logits.float(), dim=1)
    if target.ndim == 1:
        per_sample = -log_probs.gather(1, target.long()[:, None])[:, 0]
    else:
        per_sample = -weighted_log(target.float(), log_probs).sum(dim=1)
    return reduce(per_sample, reduction)


class SoftTargetCrossEntropy(nn.Module):
    """Module form of :func:`soft_cross_entropy`.

    Call: ``loss(logits (B, K), target (B,) ids or (B, K) weights)``.

    Example:
        >>> criterion = SoftTargetCrossEntropy()
        >>> criterion(torch.zeros(2, 4), torch.tensor([0, 3]))  # log 4
        tensor(1.3863)
    """

    def __init__(self, reduction: Reduction = "mean") -> None:
        super().__init__()
        self.reduction = _checks.check_reduction(reduction)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        """:func:`soft_cross_entropy` of (B, K) ``logits`` and (B,) ids or (B, K) weights, reduced."""
        return soft_cross_entropy(logits, target, self.reduction)  # type: ignore[arg-type]


def distillation_kl(
    student_logits: Tensor, teacher_logits: Tensor, temperature: float, reduction: Reduction = "mean"
) -> Tensor:
    """Knowledge distillation loss ``T^2 * KL(softmax(teacher / T) || softmax(student / T))``.

    The teacher is detached: only the student receives a gradient. Computed in float32; the KL
    is summed over classes.

    Args:
        student_logits: (B, K) floating logits.
        teacher_logits: (B, K) floating logits.
        temperature: T > 0. The T^2 factor keeps gradient magnitudes comparable across T.
        reduction: ``"mean"`` (over the batch), ``"sum"`` or ``"none"`` (B,).

    Example:
        >>> student, teacher = torch.tensor([[0.0, 0.0]]), torch.tensor([[2.0, 0.0]])
        >>> distillation_kl(student, teacher, temperature=2.0)  # 4 * KL([e/(1+e), 1/(1+e)] || [1/2, 1/2])
        tensor(0.4438)
    """
    _checks.check_reduction(reduction)
    temperature = _checks.check_positive("temperature", temperature)
    student_logits = _checks.check_logits("student_logits", student_logits)
    teacher_logits = _checks.check_logits("teacher_logits", teacher_logits)
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"`teacher_logits` must have the shape of `student_logits` {tuple(student_logits.shape)}, "
            f"got shape {tuple(teacher_logits.shape)}"
        )
    student = F.log_softmax(student_logits.float() / temperature, dim=1)
    teacher = F.log_softmax(teacher_logits.detach().float() / temperature, dim=1)
    per_sample = kl(teacher, student).sum(dim=1)
    return reduce(per_sample * temperature**2, reduction)


class CrossDistillationLoss(nn.Module):
    """Cross distillation between N >= 2 members trained together (CEKD's cross distillation module).

    Each member i is a student of every peer j != i, which acts as a detached teacher on the same
    input: ``loss_i = mean_{j != i} T^2 * KL(sg(softmax(z_j / T)) || softmax(z_i / T))``.
    A member's gradient therefore comes only from its role as a student.

    Args:
        temperature: T > 0.
        reduction: ``"mean"``: summed over members, mean over the batch; ``"sum"``: summed over
            members and batch; ``"none"``: (N, B).

    Call: ``loss(member_logits (N, B, K) or sequence of N (B, K), weights (B,) | None)``; optional
    per-sample ``weights`` scale each sample's term before the reduction.

    Example:
        >>> loss = CrossDistillationLoss(temperature=1.0)
        >>> same = torch.tensor([[1.0, 2.0, 3.0]])
        >>> loss([same, same])  # members that agree teach nothing
        tensor(0.)
    """

    def __init__(self, temperature: float = 3.0, reduction: Reduction = "mean") -> None:
        super().__init__()
        self.temperature = _checks.check_positive("temperature", temperature)
        self.reduction = _checks.check_reduction(reduction)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, reduction={self.reduction!r}"

    def forward(self, member_logits: Tensor | Sequence[Tensor], weights: Tensor | None = None) -> Tensor:
        """The cross distillation of (N, B, K) ``member_logits`` (or N (B, K) tensors), optionally
        weighted per sample by ``weights`` (B,); a scalar, or (N, B) with ``reduction="none"``."""
        logits = _checks.check_member_logits(member_logits)
        weights = _checks.check_weights(weights, logits.shape[1])
        log_probs = F.log_softmax(logits.float() / self.temperature, dim=2)  # (N, B, K), as students
        per_member = mean_over_peers(log_probs, log_probs.detach()[None], self.temperature**2)  # (N, B)
        if weights is not None:
            per_member = per_member * weights.float()[None]
        if self.reduction == "none":
            return per_member
        return reduce(per_member.sum(dim=0), self.reduction)
