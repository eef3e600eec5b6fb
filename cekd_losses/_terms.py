"""The pieces the losses share (an internal API): the reduction, elementwise KL and weighted logs that are 0
where a weight is 0, sums over members, means over peers, and the ramp-up of the distillation weights."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor


def reduce(per_sample: Tensor, reduction: str) -> Tensor:
    """Reduce (B,) per-sample losses; the mean of an empty batch is 0, so a step on no samples changes nothing."""
    if reduction == "mean":
        return per_sample.sum() / max(per_sample.shape[-1], 1)
    if reduction == "sum":
        return per_sample.sum()
    return per_sample


def weighted_log(weights: Tensor, log_values: Tensor) -> Tensor:
    """``weights * log_values`` with 0 where a weight is 0, even where the log is -inf (masked classes)."""
    return torch.where(weights == 0, 0.0, weights * log_values)


def kl(teacher_log_probs: Tensor, student_log_probs: Tensor) -> Tensor:
    """Elementwise ``p_t (log p_t - log p_s)``; 0 where ``p_t`` is 0 (also where both logs are -inf)."""
    teacher_probs = teacher_log_probs.exp()
    return torch.where(teacher_probs == 0, 0.0, teacher_probs * (teacher_log_probs - student_log_probs))


def mean_over_peers(student_log_probs: Tensor, teacher_log_probs: Tensor, scale: float = 1.0) -> Tensor:
    """(N, B) ``scale * mean_{j != i} KL(p_t[i, j] || p_s[i])`` of (N, B, K) student log-probabilities and teacher
    ones, (N, N, B, K) (teacher j as seen by student i) or (1, N, B, K) (teacher j, the same for every student);
    ``scale`` (T^2) joins the mean's 1 / (N - 1) in one multiplication."""
    members = student_log_probs.shape[0]
    # divergence[i, j, b] = sum_k p_t (log p_t - log p_s): student i, teacher j
    divergence = kl(teacher_log_probs, student_log_probs[:, None]).sum(dim=3)
    peers = ~torch.eye(members, dtype=torch.bool, device=divergence.device)
    return (divergence * peers[:, :, None]).sum(dim=1) * (scale / (members - 1))


def summed_over_members(member_logits: Tensor, term: Callable[[Tensor], Tensor]) -> Tensor:
    """(B,) ``sum_i term(z_i)`` of a per-sample ``term`` over the (N, B, K) logits' members."""
    return torch.stack([term(logits) for logits in member_logits.unbind(0)]).sum(0)


def rampup(step: int, rampup_steps: int) -> float:
    """The usual online-distillation ramp ``exp(-5 (1 - t)^2)``, t = step / rampup_steps, 1 from then on.

    Example:
        >>> rampup(0, 100), rampup(50, 100), rampup(100, 100), rampup(7, 0)
        (0.006737946999085467, 0.2865047968601901, 1.0, 1.0)
    """
    if rampup_steps <= 0 or step >= rampup_steps:
        return 1.0
    return math.exp(-5.0 * (1.0 - step / rampup_steps) ** 2)


def ramp_factor(step: int | None, rampup_steps: int) -> float:
    """:func:`rampup` of a loss's ``step`` argument, checked: 1 without a ramp (``rampup_steps`` 0), and a step
    (an int >= 0) required with one."""
    if step is not None and (isinstance(step, bool) or not isinstance(step, int) or step < 0):
        raise ValueError(f"`step` must be an int >= 0 (the number of optimizer steps taken) or None, got {step!r}")
    if rampup_steps == 0:
        return 1.0
    if step is None:
        raise ValueError(f"`step` is required when rampup_steps > 0 (rampup_steps={rampup_steps}), got None")
    return rampup(step, rampup_steps)
