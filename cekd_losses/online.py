"""The online-distillation family as presets over shared terms: DML, ONE, FFL, PCL, MCL-OKD and CEKD.

Notation: members (peers, branches) z_1..z_N, teacher logits z_t, KL_T(p -> q) = T^2 KL(sg softmax(p / T) ||
softmax(q / T)), w = r(step) the ramp-up of :func:`~cekd_losses.rampup`. Every method has
``supervised = sum_i CE(z_i, y) [+ CE(z_t, y) where it has a teacher]`` and adds its own terms, each times w:

=============  ==================================================================  =====
term           value                                                                used by
=============  ==================================================================  =====
peers          ``sum_i mean_{j != i} KL_T(z_j -> z_i)``                            DML, CEKD
teacher        ``sum_i KL_T(z_t -> z_i)``                                           ONE, FFL, PCL, CEKD
to_teacher     ``KL_T(mean_i z_i -> z_t)``                                          FFL
mean_teachers  ``sum_i mean_{j != i} KL_T(z'_ij -> z_i)``, z'_ij: mean model j      PCL
               (on its own view; or on peer i's)
mean_to_last   ``KL_T(mean_i z_i -> z_N)``                                          MCL-OKD
=============  ==================================================================  =====

MCL-OKD's contrastive term between the peers' embeddings is :class:`~cekd_losses.PeerContrast`, added beside.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, NamedTuple

import torch.nn.functional as F
from torch import Tensor, nn

from . import _checks
from ._terms import mean_over_peers, ramp_factor, reduce, summed_over_members
from .losses import Reduction, distillation_kl, soft_cross_entropy

__all__ = ["METHODS", "MethodTerms", "OnlineDistillationLoss", "OnlineMethod", "OnlineOutput"]

OnlineMethod = Literal["dml", "one", "ffl", "pcl", "mcl", "cekd"]
"""A method of :class:`OnlineDistillationLoss`: ``"dml"``, ``"one"``, ``"ffl"``, ``"pcl"``, ``"mcl"`` or ``"cekd"``."""


class OnlineOutput(NamedTuple):
    """What a network trained with an online-distillation method gives its loss, in one value.

    Attributes:
        member_logits: (N, B, K) logits of the members (peers, branches).
        teacher_logits: (B, K) logits of the method's teacher (ONE's gated teacher, FFL's fused classifier,
            PCL's peer ensemble, CEKD's ensemble), or None (DML).
        mean_logits: PCL's temporal mean models' logits, (N, N, B, K) or (N, B, K), or None.

    ``loss(output, target)`` of :class:`OnlineDistillationLoss` reads all three from it, and
    :func:`~cekd_losses.train_step` passes a model's ``OnlineOutput`` on that way.
    """

    member_logits: Tensor
    teacher_logits: Tensor | None = None
    mean_logits: Tensor | None = None


class MethodTerms(NamedTuple):
    """One method's preset: its default temperature, its teacher (None: it has none) and its terms.

    Attributes:
        temperature: the method's default T (its paper's code).
        teacher: what the method's teacher logits are, for messages; None for a method without a teacher.
        terms: the names of its distillation terms, in the order of :meth:`OnlineDistillationLoss.components`.
    """

    temperature: float
    teacher: str | None
    terms: tuple[str, ...]


METHODS: dict[str, MethodTerms] = {
    "dml": MethodTerms(1.0, None, ("peers",)),
    "one": MethodTerms(3.0, "the gated teacher's logits (BranchGate.teacher)", ("teacher",)),
    "ffl": MethodTerms(3.0, "the fused classifier's logits (FeatureFusion)", ("teacher", "to_teacher")),
    "pcl": MethodTerms(
        3.0, "the peer ensemble teacher's logits (Linear on the pooled features)", ("teacher", "mean_teachers")
    ),
    "mcl": MethodTerms(3.0, None, ("mean_to_last",)),
    "cekd": MethodTerms(3.0, "the ensemble's logits (CollaborativeEnsemble)", ("peers", "teacher")),
}
"""The presets of :class:`OnlineDistillationLoss`, by method name."""


class OnlineDistillationLoss(nn.Module):
    """The objective of an online-distillation method (DML, ONE, FFL, PCL or CEKD), with every weight at 1.

    Args:
        method: ``"dml"`` (Zhang et al., CVPR 2018), ``"one"`` (Lan et al., NeurIPS 2018), ``"ffl"`` (Kim et al.,
            2019), ``"pcl"`` (Wu and Gong, AAAI 2021), ``"mcl"`` (MCL-OKD, Yang et al., ICASSP 2021; its
            contrastive term is :class:`~cekd_losses.PeerContrast`) or ``"cekd"`` (Zhang et al., 2022); see
            :data:`METHODS`.
        temperature: T > 0; default: the method's (DML 1, the others 3).
        rampup_steps: steps over which every distillation term ramps up from ~0 (0: no ramp; the papers' code
            ramps over their first 80 epochs, DML does not ramp).
        reduction: ``"mean"`` over the batch, ``"sum"``, or ``"none"`` (B,).

    Call: ``loss(member_logits, target, teacher_logits=None, mean_logits=None, step=None, weights=None)`` with
    (N, B, K) ``member_logits`` (or N (B, K) tensors, or an :class:`OnlineOutput` holding all three logits),
    ``target`` (B,) class ids or (B, K) soft targets, the
    method's (B, K) ``teacher_logits`` (ONE, FFL, PCL, CEKD), PCL's ``mean_logits`` of the N temporal mean
    models, (N, B, K) with ``[j]`` = mean model j on its own peer's view (PCL's code) or on the one view all
    peers saw, or (N, N, B, K) with ``[i, j]`` = mean model j on peer i's view, the global ``step`` (required
    when ``rampup_steps > 0``) and optional per-sample ``weights`` (B,) that scale the distillation terms.
    Teachers are detached where they teach. :meth:`components` returns
    the named terms (the module docstring's table) for logging.

    Example:
        >>> criterion = OnlineDistillationLoss("ffl")
        >>> members, fused = torch.zeros(2, 4, 10), torch.zeros(4, 10)  # everyone agrees: no distillation
        >>> parts = criterion.components(members, torch.tensor([0, 1, 2, 3]), teacher_logits=fused)
        >>> {name: round(value.item(), 4) for name, value in parts.items()}  # 3 * log(10)
        {'total': 6.9078, 'supervised': 6.9078, 'teacher': 0.0, 'to_teacher': 0.0}
    """

    def __init__(
        self,
        method: OnlineMethod,
        temperature: float | None = None,
        rampup_steps: int = 0,
        reduction: Reduction = "mean",
    ) -> None:
        super().__init__()
        self.method = _checks.check_choice("method", method, tuple(METHODS))
        preset = METHODS[self.method]
        temperature = preset.temperature if temperature is None else temperature
        self.temperature = _checks.check_positive("temperature", temperature)
        self.rampup_steps = _checks.check_nonnegative_int("rampup_steps", rampup_steps)
        self.reduction = _checks.check_reduction(reduction)

    @property
    def terms(self) -> tuple[str, ...]:
        """The names of this method's distillation terms."""
        return METHODS[self.method].terms

    def extra_repr(self) -> str:
        return (
            f"method={self.method!r}, temperature={self.temperature}, rampup_steps={self.rampup_steps}, "
            f"reduction={self.reduction!r}"
        )

    def ramp(self, step: int | None) -> float:
        """r(step), the factor of every distillation term; ``step`` is an int >= 0, or None without a ramp."""
        return ramp_factor(step, self.rampup_steps)

    def components(
        self,
        member_logits: Tensor | Sequence[Tensor] | OnlineOutput,
        target: Tensor,
        teacher_logits: Tensor | None = None,
        mean_logits: Tensor | None = None,
        step: int | None = None,
        weights: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """The reduced terms ``{"total", "supervised", <the method's terms>}``; total is their sum, each
        distillation term includes the ramp."""
        if isinstance(member_logits, OnlineOutput):
            if teacher_logits is not None or mean_logits is not None:
                raise ValueError(
                    "pass the teacher's and mean models' logits in the OnlineOutput or beside it, not both"
                )
            member_logits, teacher_logits, mean_logits = member_logits
        members = _checks.check_member_logits(member_logits)
        _, batch, num_classes = members.shape
        target = _checks.check_target(target, batch, num_classes)
        teacher = self._check_teacher(teacher_logits, batch, num_classes)
        means = self._check_mean_logits(mean_logits, members.shape)
        weights = _checks.check_weights(weights, batch)
        ramp = self.ramp(step)

        supervised = summed_over_members(members, lambda logits: soft_cross_entropy(logits, target, "none"))
        if teacher is not None:
            supervised = supervised + soft_cross_entropy(teacher, target, "none")
        parts = {"supervised": supervised}
        for name in self.terms:
            term = self._term(name, members, teacher, means) * ramp
            parts[name] = term * weights.float() if weights is not None else term
        parts = {"total": sum(parts.values()), **parts}  # type: ignore[dict-item]
        return {name: reduce(value, self.reduction) for name, value in parts.items()}

    def forward(
        self,
        member_logits: Tensor | Sequence[Tensor] | OnlineOutput,
        target: Tensor,
        teacher_logits: Tensor | None = None,
        mean_logits: Tensor | None = None,
        step: int | None = None,
        weights: Tensor | None = None,
    ) -> Tensor:
        """The total loss, a scalar (or (B,) with ``reduction="none"``); see :meth:`components`."""
        return self.components(member_logits, target, teacher_logits, mean_logits, step, weights)["total"]

    def _term(self, name: str, members: Tensor, teacher: Tensor | None, means: Tensor | None) -> Tensor:
        """(B,) per-sample value of the distillation term ``name`` (the module docstring's table), before the ramp."""
        scale = self.temperature
        if name == "mean_to_last":  # MCL-OKD: the members' mean teaches the last member
            return distillation_kl(members[-1], members.mean(0), scale, "none")
        if name in ("teacher", "to_teacher") and teacher is not None:
            if name == "to_teacher":
                return distillation_kl(teacher, members.mean(0), scale, "none")
            return summed_over_members(members, lambda logits: distillation_kl(logits, teacher, scale, "none"))
        log_probs = F.log_softmax(members.float() / scale, dim=2)
        teachers = log_probs.detach()[None]  # peers: member j teaches member i
        if name == "mean_teachers" and means is not None:
            teachers = F.log_softmax(means.detach().float() / scale, dim=-1)
            teachers = teachers if teachers.ndim == 4 else teachers[None]
        return mean_over_peers(log_probs, teachers, scale**2).sum(0)

    def _check_teacher(self, teacher_logits: Tensor | None, batch: int, num_classes: int) -> Tensor | None:
        what = METHODS[self.method].teacher
        if what is None:
            if teacher_logits is not None:
                raise ValueError(f"`teacher_logits` is not used by method {self.method!r} (it has no teacher); drop it")
            return None
        if teacher_logits is None:
            raise ValueError(f"`teacher_logits` is required by method {self.method!r}: {what}, (B, K), got None")
        _checks.check_shape("teacher_logits", teacher_logits, (batch, num_classes))
        return _checks.check_floating("teacher_logits", teacher_logits)

    def _check_mean_logits(self, mean_logits: Tensor | None, shape: Sequence[int]) -> Tensor | None:
        if "mean_teachers" not in self.terms:
            if mean_logits is not None:
                raise ValueError(f"`mean_logits` is used by method 'pcl' only, not {self.method!r}; drop it")
            return None
        if mean_logits is None:
            raise ValueError(
                "`mean_logits` is required by method 'pcl': the mean models' logits (N, N, B, K) or (N, B, K), got None"
            )
        members, batch, num_classes = shape
        mean_logits = _checks.check_tensor("mean_logits", mean_logits)
        expected = (members, batch, num_classes) if mean_logits.ndim == 3 else (members, members, batch, num_classes)
        _checks.check_shape("mean_logits", mean_logits, expected)
        return _checks.check_floating("mean_logits", mean_logits)
