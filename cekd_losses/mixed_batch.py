"""The record of one mixed batch: the images, their soft targets and how they were made."""

from __future__ import annotations

from torch import Tensor

from ._boxes import integer_boxes
from ._constants import positions

__all__ = ["MixedBatch"]


class MixedBatch:
    """A mixed batch and how it was made.

    Attributes:
        images: (B, C, H, W) mixed images, same dtype and device as the input.
        targets: (B, K) float32 soft targets, ``lam_a * own target + lam_b * partner target``.
        partner: (B,) int64 batch position of each sample's partner (a sample left unmixed is its own
            partner).
        lam_a: (B,) float32 weight of the sample's own target.
        lam_b: (B,) float32 weight of the partner's target.
        applied: (B,) bool, True where the image received content from a different image.
        boxes: cutmix and snapmix: (B, 4) int64 box ``(x1, y1, x2, y2)`` of each sample that received
            the partner's content (empty where nothing was pasted); mixup: None.
        source_boxes: snapmix: (B, 4) int64 box of the partner that was cut out and resized into
            ``boxes``; otherwise None.
        method: for a batch mixed by a choice among methods, (B,) int64 id of each sample's method
            (:data:`~cekd_losses.draws.METHOD_IDS`: mixup 0, cutmix 1, snapmix 2; 3 where it was left as it is);
            its ``boxes`` are then CutMix's and SnapMix's (empty for MixUp), its ``source_boxes`` (with SnapMix
            among the methods) SnapMix's, and a CutMix sample's own box. None for a single method.

    The fields that follow from the others are computed when first read (MixUp's ``lam_b = 1 - lam_a``,
    CutMix's ``lam_a = 1 - lam_b``; a mix is applied where the partner differs and ``lam_b > 0``; the integer
    boxes from the float corners the mix was made with), so a training step that reads only ``images`` and
    ``targets`` launches no kernel for them. The kernels construct it with ``lam_a`` or ``lam_b`` (at least
    one: (B,), or (B, 1) or (1, 1), expanded when read) and, for box methods, the keyword ``corners``: (B or 1,
    k, 2, 2) float ``[[x1, y1], [x2, y2]]`` of the target box (and the source box).

    With ``partner``, ``lam_a`` and the boxes, the kernels replay a mix exactly on another tensor of the same
    batch (a second view, a mask): :func:`~cekd_losses.replay`, or ``cutmix(other, targets, batch.partner,
    batch.boxes)``.

    Example:
        >>> import torch
        >>> images, targets, partner = torch.zeros(2, 1, 1, 1), torch.eye(2), torch.tensor([1, 0])
        >>> batch = MixedBatch(images, targets, partner, lam_a=torch.tensor([1.0, 0.5]))
        >>> batch.lam_b, batch.applied
        (tensor([0.0000, 0.5000]), tensor([False,  True]))
    """

    __slots__ = (
        "images",
        "targets",
        "partner",
        "method",
        "_lam_a",
        "_lam_b",
        "_applied",
        "_boxes",
        "_source_boxes",
        "_corners",
    )

    def __init__(
        self,
        images: Tensor,
        targets: Tensor,
        partner: Tensor,
        lam_a: Tensor | None = None,
        lam_b: Tensor | None = None,
        applied: Tensor | None = None,
        boxes: Tensor | None = None,
        source_boxes: Tensor | None = None,
        *,
        corners: Tensor | None = None,
        method: Tensor | None = None,
    ) -> None:
        if lam_a is None and lam_b is None:
            raise TypeError("MixedBatch needs `lam_a` or `lam_b` (the other is 1 minus it), got neither")
        self.images, self.targets, self.partner, self.method = images, targets, partner, method
        self._lam_a, self._lam_b, self._applied = lam_a, lam_b, applied
        self._boxes, self._source_boxes = boxes, source_boxes
        self._corners = corners

    def _per_sample(self, weight: Tensor) -> Tensor:
        """A kernel's (B or 1, 1) weight as (B,)."""
        return weight.expand(self.partner.shape[0], 1).view(-1) if weight.ndim == 2 else weight

    @property
    def lam_a(self) -> Tensor:
        """(B,) float32 weight of the sample's own target."""
        self._lam_a = self._per_sample(self._lam_a) if self._lam_a is not None else 1.0 - self.lam_b
        return self._lam_a

    @property
    def lam_b(self) -> Tensor:
        """(B,) float32 weight of the partner's target."""
        self._lam_b = self._per_sample(self._lam_b) if self._lam_b is not None else 1.0 - self.lam_a
        return self._lam_b

    @property
    def applied(self) -> Tensor:
        """(B,) bool, True where the image received content from a different image."""
        if self._applied is None:
            others = self.partner != positions(self.partner.shape[0], self.partner.device)
            self._applied = others & (self.lam_b > 0)
        return self._applied

    @property
    def boxes(self) -> Tensor | None:
        """cutmix and snapmix: (B, 4) int64 box ``(x1, y1, x2, y2)`` that received the partner's content."""
        if self._boxes is None and self._corners is not None:
            self._boxes = self._integer_boxes(0)
        return self._boxes

    @property
    def source_boxes(self) -> Tensor | None:
        """snapmix: (B, 4) int64 box of the partner that was cut out and resized into ``boxes``."""
        if self._source_boxes is None and self._corners is not None and self._corners.shape[1] > 1:
            self._source_boxes = self._integer_boxes(1)
        return self._source_boxes

    def _integer_boxes(self, which: int) -> Tensor:
        assert self._corners is not None
        height, width = self.images.shape[-2:]
        return integer_boxes(self._corners.select(1, which), height, width, self.partner.shape[0])

    def __repr__(self) -> str:
        fields = ("images", "targets", "partner", "lam_a", "lam_b", "applied", "boxes", "source_boxes")
        chosen = f", method={self.method!r}" if self.method is not None else ""
        return "MixedBatch(" + ", ".join(f"{name}={getattr(self, name)!r}" for name in fields) + chosen + ")"
