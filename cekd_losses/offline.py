"""Offline distillation from a fixed teacher: Hinton's KD and cosine confidence distillation (CCD).

For student logits z_s, the frozen teacher's z_t on the same images, targets y (class ids or soft rows) and
temperature T::

    KD   L = alpha CE(z_s, y) + beta T^2 KL(softmax(z_t / T) || softmax(z_s / T))

    CCD  the batch is B originals and their B augmented copies (copy b made from original b);
         L = alpha mean_2B CE(z_s, y) + beta T^2 (mean_B KL_original + mean_B (1 + cos(z_t~, z_t)) KL_augmented) / 2

where cos(z_t~, z_t) is the cosine similarity of the teacher's logits on an augmented copy and on its original:
an augmented sample whose teacher view moved far from its original's teaches less. CCD is from "What Role Does
Data Augmentation Play in Knowledge Distillation?" (Li et al., ACCV 2022); its code (Klayand/PCKA,
``classification/losses/SingleCCD.py``) interleaves originals and copies where this module stacks the halves, and
its training script scales the whole loss by 2 (``--kd_weight``), left to the caller here. Both default to that
code's T = 4, alpha = 0.5 and beta = 1 - alpha.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _checks
from ._terms import reduce
from .losses import Reduction, distillation_kl, soft_cross_entropy

__all__ = ["CCDLoss", "KDLoss"]


class KDLoss(nn.Module):
    """Knowledge distillation from a fixed teacher (Hinton et al., 2015) over any targets, mixed ones included.

    ``loss = alpha * CE(z_s, y) + beta * T^2 * KL(softmax(z_t / T) || softmax(z_s / T))``, the teacher detached.
    With mixing, the teacher sees the same mixed images as the student (timm's distillation task, DeiT) and ``y``
    is the mix's soft targets.

    Args:
        temperature: T > 0.
        alpha: >= 0 weight of the supervised cross entropy.
        beta: >= 0 weight of the distillation term; None: ``1 - alpha``.
        reduction: ``"mean"`` over the batch, ``"sum"``, or ``"none"`` (B,).

    Call: ``loss(student_logits (B, K), teacher_logits (B, K), target (B,) ids or (B, K) weights)``;
    :meth:`components` returns the named terms for logging.

    Example:
        >>> criterion = KDLoss(temperature=4.0, alpha=0.5)
        >>> same = torch.tensor([[2.0, 0.0, 0.0]])
        >>> parts = criterion.components(same, same, torch.tensor([0]))  # a teacher that agrees teaches nothing
        >>> {name: round(value.item(), 4) for name, value in parts.items()}  # 0.5 * CE
        {'total': 0.1198, 'supervised': 0.1198, 'distillation': 0.0}
    """

    def __init__(
        self, temperature: float = 4.0, alpha: float = 0.5, beta: float | None = None, reduction: Reduction = "mean"
    ) -> None:
        super().__init__()
        self.temperature = _checks.check_positive("temperature", temperature)
        self.alpha = _checks.check_in_range("alpha", alpha, 0.0, float("inf"))
        self.beta = _checks.check_in_range("beta", 1.0 - self.alpha if beta is None else beta, 0.0, float("inf"))
        self.reduction = _checks.check_reduction(reduction)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, alpha={self.alpha}, beta={self.beta}, reduction={self.reduction!r}"

    def components(
        self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor, weights: Tensor | None = None
    ) -> dict[str, Tensor]:
        """The reduced terms ``{"total", "supervised", "distillation"}``, each with its weight; total is their
        sum. Optional per-sample ``weights`` (B,) scale the distillation term."""
        student = _checks.check_logits("student_logits", student_logits)
        batch, num_classes = student.shape
        teacher = _checks.check_shape("teacher_logits", teacher_logits, (batch, num_classes))
        _checks.check_floating("teacher_logits", teacher)
        target = _checks.check_target(target, batch, num_classes)
        weights = _checks.check_weights(weights, batch)
        supervised = self.alpha * soft_cross_entropy(student, target, "none")
        distillation = self.beta * distillation_kl(student, teacher, self.temperature, "none")
        if weights is not None:
            distillation = distillation * weights.float()
        parts = {"total": supervised + distillation, "supervised": supervised, "distillation": distillation}
        return {name: reduce(value, self.reduction) for name, value in parts.items()}

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor) -> Tensor:
        """The total loss, a scalar (or (B,) with ``reduction="none"``); see :meth:`components`."""
        return self.components(student_logits, teacher_logits, target)["total"]


class CCDLoss(KDLoss):
    """Cosine confidence distillation (Li et al., ACCV 2022): KD on originals and on their augmented copies,
    each copy's term weighted by 1 + the cosine similarity of the teacher's logits on it and on its original.

    The batch holds B originals then their B copies (row B + b made from row b); :func:`~cekd_losses.train_step`
    with a ``teacher`` and a mixer builds it (the clean images, then their mixes). Over that batch CCD is
    :class:`KDLoss` with per-sample weights 1 (originals) and ``1 + cos`` (copies): the mean over 2B rows is
    the reference's ``(mean KL_original + mean weighted KL_augmented) / 2``.

    Args: as :class:`KDLoss`; ``reduction="none"`` gives (2B,).

    Call: ``loss(student_logits (2B, K), teacher_logits (2B, K), target (2B,) ids or (2B, K) weights)``.

    Example:
        >>> criterion = CCDLoss()
        >>> teacher = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])  # the copy turned the teacher around: cos = -1
        >>> criterion.confidence(teacher)  # the copy's distillation weight
        tensor([0.])
    """

    def confidence(self, teacher_logits: Tensor) -> Tensor:
        """(B,) weights ``1 + cos(z_t[B + b], z_t[b])`` of the copies, in [0, 2], from (2B, K) teacher logits."""
        teacher = _checks.check_logits("teacher_logits", teacher_logits)
        if teacher.shape[0] % 2:
            raise ValueError(
                f"`teacher_logits` must hold 2B rows (B originals, then their B copies), got {teacher.shape[0]} rows"
            )
        originals, copies = teacher.detach().float().chunk(2)
        return 1.0 + F.cosine_similarity(copies, originals, dim=1)

    def components(
        self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor, weights: Tensor | None = None
    ) -> dict[str, Tensor]:
        """The reduced terms ``{"total", "supervised", "distillation"}`` over the 2B rows; ``weights`` (2B,),
        when given, multiply the confidence weights."""
        confidence = self.confidence(teacher_logits)
        paired = torch.cat([torch.ones_like(confidence), confidence])
        weights = _checks.check_weights(weights, paired.shape[0])
        if weights is not None:
            paired = paired * weights.float()
        return super().components(student_logits, teacher_logits, target, paired)
