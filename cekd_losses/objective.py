"""CEKDLoss: the full CEKD objective (Zhang et al., 2022), composed from losses.py.

For member logits z_1..z_N, ensemble logits z_e and soft targets y (rows need not sum to 1)::

    L = sum_i CE(z_i, y) + CE(z_e, y)                                         supervised
      + a(t) T^2 sum_i mean_{j != i} KL(sg(softmax(z_j/T)) || softmax(z_i/T))   cross distillation
      + b(t) T^2 sum_i KL(sg(softmax(z_e/T)) || softmax(z_i/T))                collaborative ensemble

with a(t) = alpha r(t), b(t) = beta r(t) and the ramp-up r(t) = exp(-5 (1 - t)^2) for
t = step / rampup_steps < 1, else 1.
"""

from __future__ import annotations

import math

from torch import Tensor, nn

from . import _checks
from ._terms import ramp_factor, rampup, reduce, summed_over_members
from .ensemble import EnsembleOutput
from .losses import CrossDistillationLoss, Reduction, distillation_kl, soft_cross_entropy

__all__ = ["CEKDLoss", "rampup"]


class CEKDLoss(nn.Module):
    """The CEKD objective: supervised CE of members and ensemble, cross distillation, ensemble distillation.

    Args:
        temperature: T > 0 of both distillation terms.
        alpha: >= 0 weight of the cross distillation term (0 removes CEKD's cross distillation module).
        beta: >= 0 weight of the ensemble-to-member term (0 together with
            ``supervise_ensemble=False`` removes the collaborative ensemble module).
        rampup_steps: steps over which both weights ramp up from ~0 (0: no ramp).
        supervise_ensemble: include ``CE(z_e, y)`` in the supervised term.
        reduction: ``"mean"`` over the batch, ``"sum"``, or ``"none"`` (B,).

    Call: ``loss(output, target, step=None, weights=None)`` with an :class:`~cekd_losses.EnsembleOutput`
    (or any ``(member_logits (N, B, K), ensemble_logits (B, K))`` pair), ``target`` (B,) class ids or
    (B, K) soft targets (e.g. ``MixedBatch.targets``), the global ``step`` (required when
    ``rampup_steps > 0``) and optional per-sample ``weights`` (B,) that scale the distillation
    terms. :meth:`components` returns the named terms for logging.

    Example:
        >>> criterion = CEKDLoss(temperature=3.0)
        >>> member_logits = torch.zeros(2, 4, 10)  # two members that agree with their ensemble
        >>> parts = criterion.components((member_logits, member_logits.mean(0)), torch.tensor([0, 1, 2, 3]))
        >>> {name: round(value.item(), 4) for name, value in parts.items()}  # 3 * log(10); no distillation
        {'total': 6.9078, 'supervised': 6.9078, 'cross': 0.0, 'ensemble': 0.0}
    """

    def __init__(
        self,
        temperature: float = 3.0,
        alpha: float = 1.0,
        beta: float = 1.0,
        rampup_steps: int = 0,
        supervise_ensemble: bool = True,
        reduction: Reduction = "mean",
    ) -> None:
        super().__init__()
        self.cross = CrossDistillationLoss(temperature, reduction="none")  # checks and holds the temperature
        self.alpha = _checks.check_in_range("alpha", alpha, 0.0, math.inf)
        self.beta = _checks.check_in_range("beta", beta, 0.0, math.inf)
        self.rampup_steps = _checks.check_nonnegative_int("rampup_steps", rampup_steps)
        self.supervise_ensemble = bool(supervise_ensemble)
        self.reduction = _checks.check_reduction(reduction)

    @property
    def temperature(self) -> float:
        """T of both distillation terms (held by the cross distillation term)."""
        return self.cross.temperature

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, alpha={self.alpha}, beta={self.beta}, "
            f"rampup_steps={self.rampup_steps}, supervise_ensemble={self.supervise_ensemble}, "
            f"reduction={self.reduction!r}"
        )

    def ramp(self, step: int | None) -> float:
        """r(step): the ramp-up factor of both distillation weights; ``step`` is an int >= 0 or None."""
        return ramp_factor(step, self.rampup_steps)

    def components(
        self,
        output: EnsembleOutput | tuple[Tensor, Tensor],
        target: Tensor,
        step: int | None = None,
        weights: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """The reduced terms ``{"total", "supervised", "cross", "ensemble"}``; total is their sum.

        "cross" and "ensemble" include their weights a(t) and b(t)."""
        member_logits, ensemble_logits = output
        members = _checks.check_member_logits(member_logits)
        _, batch, num_classes = members.shape
        ensemble_logits = _checks.check_shape("ensemble_logits", ensemble_logits, (batch, num_classes))
        _checks.check_floating("ensemble_logits", ensemble_logits)
        target = _checks.check_target(target, batch, num_classes)
        weights = _checks.check_weights(weights, batch)
        ramp = self.ramp(step)

        supervised = summed_over_members(members, lambda logits: soft_cross_entropy(logits, target, "none"))
        if self.supervise_ensemble:
            supervised = supervised + soft_cross_entropy(ensemble_logits, target, "none")
        zero = supervised.new_zeros(batch)
        cross = self.alpha * ramp * self.cross(members).sum(0) if self.alpha > 0 else zero
        ensemble = zero
        if self.beta > 0:
            to_members = summed_over_members(
                members, lambda logits: distillation_kl(logits, ensemble_logits, self.temperature, "none")
            )
            ensemble = self.beta * ramp * to_members
        if weights is not None:
            cross, ensemble = cross * weights.float(), ensemble * weights.float()
        parts = {"supervised": supervised, "cross": cross, "ensemble": ensemble}
        parts = {"total": supervised + cross + ensemble, **parts}
        return {name: reduce(value, self.reduction) for name, value in parts.items()}

    def forward(
        self,
        output: EnsembleOutput | tuple[Tensor, Tensor],
        target: Tensor,
        step: int | None = None,
        weights: Tensor | None = None,
    ) -> Tensor:
        """The total loss, a scalar (or (B,) with ``reduction="none"``); see :meth:`components`."""
        return self.components(output, target, step, weights)["total"]
