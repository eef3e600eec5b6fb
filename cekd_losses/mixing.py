"""Batched MixUp, CutMix and SnapMix with per-sample parameters, on any device.

The functional kernels :func:`mixup`, :func:`cutmix` and :func:`snapmix` take every random choice
as an explicit tensor (partners, lambdas, boxes) and are deterministic; :class:`MixingAugmenter`
draws those parameters (from an optional ``torch.Generator``, in three or four kernels) and calls
the kernel of its method from one table. Everything is vectorised over the batch: no Python loop
over samples and no host sync. SnapMix pastes with one ``grid_sample`` over a separable grid and
weighs labels with box sums of the resized CAMs; small constants (positions, one-hot rows, box offsets) are
built once per shape and device.

Mixing is differentiable: where the images require grad, gradients reach both images of each pair
(mixing feature maps, adversarial inputs, learned augmentation).

Boxes are (B, 4) integer tensors ``(x1, y1, x2, y2)`` in pixels, ``x2``/``y2`` exclusive; an empty
box (``x1 == x2`` or ``y1 == y2``) pastes nothing.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from typing import Literal, NamedTuple, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _checks
from .cam import _resized_maps

__all__ = ["MixMethod", "MixedBatch", "MixingAugmenter", "cutmix", "mixup", "replay", "snapmix"]

MixMethod = Literal["mixup", "cutmix", "snapmix"]
"""The mixing methods of :class:`MixingAugmenter`."""
_METHODS = ("mixup", "cutmix", "snapmix")


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

    ``lam_a``, ``lam_b``, ``applied`` and the boxes are computed when first read where they follow from the
    rest (MixUp's ``lam_b = 1 - lam_a``, CutMix's ``lam_a = 1 - lam_b``; a mix is applied where the partner
    differs and ``lam_b > 0``; integer boxes from the float corners the mix was made with): a training step
    that reads only ``images`` and ``targets`` launches no kernel for them. The kernels construct it with
    ``lam_a`` or ``lam_b`` (at least one; (B,), or (B, 1) or (1, 1) expanded when read) and, for box methods,
    the keyword ``corners``: (B, k, 2, 2) or (1, k, 2, 2) float ``[[x1, y1], [x2, y2]]`` of the target box (and
    the source box), clipped, made integer and expanded to the batch when read.

    With ``partner``, ``lam_a`` and the boxes, the kernels replay a mix exactly on another tensor of
    the same batch (a second view, a mask): ``cutmix(other, targets, batch.partner, batch.boxes)``.
    """

    __slots__ = ("images", "targets", "partner", "_lam_a", "_lam_b", "_applied", "_boxes", "_source_boxes", "_corners")

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
    ) -> None:
        if lam_a is None and lam_b is None:
            raise TypeError("MixedBatch needs `lam_a` or `lam_b` (the other is 1 minus it), got neither")
        self.images, self.targets, self.partner = images, targets, partner
        self._lam_a, self._lam_b, self._applied = lam_a, lam_b, applied
        self._boxes, self._source_boxes = boxes, source_boxes
        self._corners = corners  # (B or 1, k, 2, 2) corners of the k boxes, clipped and made integer when read

    @property
    def lam_a(self) -> Tensor:
        """(B,) float32 weight of the sample's own target."""
        if self._lam_a is None:
            self._lam_a = 1.0 - self.lam_b
        elif self._lam_a.ndim == 2:  # a kernel's (B or 1, 1) weight
            self._lam_a = self._lam_a.expand(self.partner.shape[0], 1).view(-1)
        return self._lam_a

    @property
    def lam_b(self) -> Tensor:
        """(B,) float32 weight of the partner's target."""
        if self._lam_b is None:
            self._lam_b = 1.0 - self.lam_a
        elif self._lam_b.ndim == 2:
            self._lam_b = self._lam_b.expand(self.partner.shape[0], 1).view(-1)
        return self._lam_b

    @property
    def applied(self) -> Tensor:
        """(B,) bool, True where the image received content from a different image."""
        if self._applied is None:
            others = self.partner != _positions(self.partner.shape[0], self.partner.device)
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
        clipped = _clipped(self._corners.select(1, which), *self.images.shape[-2:])
        return clipped.flatten(-2).long().expand(self.partner.shape[0], 4)

    def __repr__(self) -> str:
        fields = ("images", "targets", "partner", "lam_a", "lam_b", "applied", "boxes", "source_boxes")
        return "MixedBatch(" + ", ".join(f"{name}={getattr(self, name)!r}" for name in fields) + ")"


def _check_pairing(images: object, targets: object, partner: object) -> tuple[Tensor, Tensor, Tensor]:
    images = _checks.check_images("images", images)
    batch = images.shape[0]
    targets = _checks.check_shape("targets", targets, (batch, "K"))
    _checks.check_floating("targets", targets)
    partner = _checks.check_shape("partner", partner, (batch,))
    _checks.check_class_ids("partner", partner, batch, what="batch positions")
    for name, tensor in (("targets", targets), ("partner", partner)):
        _checks.check_same_device(name, tensor, "images", images)
    return images, targets, partner


def _float32(targets: Tensor) -> Tensor:
    return targets if targets.dtype == torch.float32 else targets.float()


# Small constant tensors (positions, one-hot rows, box offsets, sampling grids) are built once per shape and
# device: on a GPU each build would be kernel launches on every call. Under torch.compile they are built in the
# graph. Many shapes, class counts or devices seen in one process (tests, multi-scale training, sweeps) start the
# cache again rather than let it grow past 512 entries or 64 MiB.
_CONSTANTS: dict[tuple[object, ...], object] = {}
_CACHE_LIMITS = (512, 64 * 2**20)  # entries, bytes
_cached_bytes = 0
_Built = TypeVar("_Built")


def _constant(key: tuple[object, ...], build: Callable[[], _Built]) -> _Built:
    global _cached_bytes
    if torch.compiler.is_compiling():
        return build()
    value = _CONSTANTS.get(key)
    if value is None:
        value = build()
        parts = value if isinstance(value, tuple) else (value,)
        size = sum(part.numel() * part.element_size() for part in parts if isinstance(part, Tensor))
        if len(_CONSTANTS) >= _CACHE_LIMITS[0] or _cached_bytes + size > _CACHE_LIMITS[1]:
            _CONSTANTS.clear()
            _cached_bytes = 0
        _CONSTANTS[key] = value
        _cached_bytes += size
    return value  # type: ignore[return-value]  # built by ``build`` for this key


def _positions(size: int, device: torch.device) -> Tensor:
    """(size,) int64 ``arange``."""
    return _constant(("arange", size, device), lambda: torch.arange(size, device=device))


class _ImageConstants(NamedTuple):
    """The small float32 constants of one image size on one device, found with one cache lookup. Tensor
    operands, not Python numbers: on CPU a number is cast to a tensor on every op."""

    zero: Tensor  # 0-dim 0
    one: Tensor  # 0-dim 1
    minus_one: Tensor  # 0-dim -1
    sizes: Tensor  # (2,) [W, H]: box sides, corner limits
    integer_sizes: Tensor  # (2,) int64 [W, H]
    half_sides: Tensor  # (2, 1) [[-0.5], [0.5]]: corner offsets from a box centre, in sides
    positions: Tensor  # (max(H, W),) arange, compared with corners
    steps: Tensor  # (2,) [k_x, k_y]: pixel p is at p * k - 1 in grid_sample's coordinates (align_corners=True)


def _image_constants(height: int, width: int, device: torch.device) -> _ImageConstants:
    """:class:`_ImageConstants` of an H x W image; ``k = 2 / (size - 1)`` (2 for a 1-pixel side)."""

    def build() -> _ImageConstants:
        def scalar(value: float) -> Tensor:
            return torch.tensor(value, device=device)

        sizes = torch.tensor([width, height], dtype=torch.float32, device=device)
        return _ImageConstants(
            scalar(0.0),
            scalar(1.0),
            scalar(-1.0),
            sizes,
            sizes.long(),
            torch.tensor([[-0.5], [0.5]], device=device),
            torch.arange(max(height, width), dtype=torch.float32, device=device),
            torch.tensor([2.0 / max(width - 1, 1), 2.0 / max(height - 1, 1)], device=device),
        )

    return _constant(("image constants", height, width, device), build)


def _box_masks(corners: Tensor, height: int, width: int) -> Tensor:
    """(..., H, W) bool masks, True inside boxes given by their (..., 2, 2) float corners ``[[x1, y1], [x2, y2]]``
    (a (..., 4) box ``(x1, y1, x2, y2)`` viewed as (..., 2, 2)); corners past the image clip implicitly. Each axis
    is marked ``lo <= i < hi`` as ``(i >= lo) xor (i >= hi)`` (one comparison for both corners, ``lo <= hi``), and
    the mask is the outer product of the rows' and the columns' marks."""
    positions = _image_constants(height, width, corners.device).positions  # (L,), L = max(H, W)
    past_low, past_high = (positions >= corners.unsqueeze(-1)).unbind(-3)  # (..., 2 axes, L) each
    columns, rows = (past_low ^ past_high).unbind(-2)  # (..., L) each
    if height != width:
        columns, rows = columns[..., :width], rows[..., :height]
    return rows.unsqueeze(-1) & columns.unsqueeze(-2)


def _paste(mask: Tensor, pasted: Tensor, images: Tensor) -> Tensor:
    """``where(mask, pasted, images)``, written into ``pasted`` (a fresh buffer) unless autograd must see it."""
    if torch.is_grad_enabled() and (pasted.requires_grad or images.requires_grad):
        return torch.where(mask, pasted, images)
    return torch.where(mask, pasted, images, out=pasted)


def replay(batch: MixedBatch, images: Tensor) -> Tensor:
    """The mix of ``batch`` made again on ``images``, another view of the same clean batch: the same partners,
    weights and boxes (SnapMix's resized paste included), so every view shares ``batch.targets``.

    Args:
        batch: a :class:`MixedBatch` from :class:`MixingAugmenter` or a kernel.
        images: (B, C, H, W) floating images of the batch's size, on its device (for example a differently
            cropped view of the clean images the batch was mixed from).

    Returns:
        (B, C, H, W) mixed images; ``replay(batch, clean)`` of the clean images the batch came from equals
        ``batch.images``.

    Example:
        >>> images = torch.stack([torch.zeros(1, 2, 2), torch.ones(1, 2, 2)])
        >>> batch = cutmix(images, torch.eye(2), torch.tensor([1, 0]), torch.tensor([[0, 0, 1, 2], [0, 0, 0, 0]]))
        >>> replay(batch, 1 - images)[0, 0]  # the other view gets the same box from the same partner
        tensor([[0., 1.],
                [0., 1.]])
    """
    images = _checks.check_images("images", images)
    expected = (batch.images.shape[0], images.shape[1], *batch.images.shape[2:])
    _checks.check_shape("images", images, expected)
    _checks.check_same_device("images", images, "batch.images", batch.images)
    partner, corners = batch.partner, batch._corners
    if corners is None:  # mixup
        weight = batch.lam_a.view(-1, 1, 1, 1)
        return torch.lerp(images.index_select(0, partner), images, weight.to(images.dtype))
    height, width = images.shape[-2:]
    masks = _box_masks(corners, height, width)
    if corners.shape[1] == 1:  # cutmix
        return _paste(masks, images.index_select(0, partner), images)
    low, high = corners.view(-1, 2, 2, 1, 1, 2).unbind(2)  # snapmix: the target box, then the source box
    return _resized_paste(images, partner, low, high - low, masks[:, :1])


def mixup(images: Tensor, targets: Tensor, partner: Tensor, lam: Tensor) -> MixedBatch:
    """MixUp with explicit parameters: ``x = lam * x + (1 - lam) * x[partner]``.

    The blend runs in the images' dtype with ``lam`` rounded to that dtype; the returned
    ``lam_a``/``lam_b`` are the rounded values, so targets match the pixels exactly.

    Args:
        images: (B, C, H, W) floating images.
        targets: (B, K) floating soft targets (one-hot rows for hard labels).
        partner: (B,) integer partner of each sample.
        lam: (B,) weight of each sample's own image, in [0, 1].

    Returns:
        :class:`MixedBatch`; ``applied`` is ``lam < 1`` with a partner other than itself.

    Example:
        >>> images = torch.tensor([0.0, 1.0]).view(2, 1, 1, 1)
        >>> out = mixup(images, torch.eye(2), torch.tensor([1, 0]), torch.tensor([0.75, 1.0]))
        >>> out.images.flatten(), out.targets
        (tensor([0.2500, 1.0000]), tensor([[0.7500, 0.2500],
                [0.0000, 1.0000]]))
    """
    images, targets, partner = _check_pairing(images, targets, partner)
    batch = images.shape[0]
    lam = _checks.check_shape("lam", lam, (batch,))
    _checks.check_floating("lam", lam)
    _checks.check_same_device("lam", lam, "images", images)
    if _checks.can_read_values(lam) and not bool(((lam >= 0) & (lam <= 1)).all()):
        raise ValueError(f"`lam` must be in [0, 1], got values in [{float(lam.min())}, {float(lam.max())}]")
    return _mixup(images, targets, partner.long(), lam.view(batch, 1, 1, 1))


def _mixup(images: Tensor, targets: Tensor, partner: Tensor, lam: Tensor) -> MixedBatch:
    """:func:`mixup` on checked input (``partner`` int64, ``lam`` (B, 1, 1, 1), or (1, 1, 1, 1) for all)."""
    weight = lam if lam.dtype == images.dtype else lam.to(images.dtype)
    mixed = torch.lerp(images.index_select(0, partner), images, weight)
    lam_a = _float32(weight).view(-1, 1)
    own = _float32(targets)  # exactly own where lam_a == 1
    return MixedBatch(mixed, torch.lerp(own.index_select(0, partner), own, lam_a), partner, lam_a)


def cutmix(images: Tensor, targets: Tensor, partner: Tensor, boxes: Tensor) -> MixedBatch:
    """CutMix with explicit parameters: paste ``images[partner]`` inside each sample's box.

    The label weight of the partner is the exact pasted pixel fraction (the CutMix paper's
    correction): ``lam_b = box area / (H * W)``, ``lam_a = 1 - lam_b``.

    Args:
        images: (B, C, H, W) floating images.
        targets: (B, K) floating soft targets.
        partner: (B,) integer partner of each sample.
        boxes: (B, 4) integer ``(x1, y1, x2, y2)``, exclusive ``x2``/``y2``, inside the image.

    Returns:
        :class:`MixedBatch`; ``applied`` is a non-empty box with a partner other than itself.

    Example:
        >>> images = torch.stack([torch.zeros(1, 2, 2), torch.ones(1, 2, 2)])
        >>> out = cutmix(images, torch.eye(2), torch.tensor([1, 0]), torch.tensor([[0, 0, 1, 2], [0, 0, 0, 0]]))
        >>> out.images[0, 0], out.lam_b
        (tensor([[1., 0.],
                [1., 0.]]), tensor([0.5000, 0.0000]))
    """
    images, targets, partner = _check_pairing(images, targets, partner)
    batch, _, height, width = images.shape
    boxes = _checks.check_boxes("boxes", boxes, batch, height, width)
    _checks.check_same_device("boxes", boxes, "images", images)
    return _cutmix(images, targets, partner.long(), boxes.float().view(batch, 1, 2, 2))


def _cutmix(images: Tensor, targets: Tensor, partner: Tensor, corners: Tensor) -> MixedBatch:
    """:func:`cutmix` on checked input: ``partner`` int64, ``corners`` (B, 1, 2, 2) float32 of each box, or
    (1, 1, 2, 2) of one box for all, integer-valued (they may reach past the image: the mask clips them,
    :class:`MixedBatch` clips its integer boxes)."""
    height, width = images.shape[-2:]
    mask = _box_masks(corners, height, width)  # (B or 1, 1, H, W)
    mixed = _paste(mask, images.index_select(0, partner), images)
    lam_b = mask.mean(dim=(2, 3), dtype=torch.float32)  # (B or 1, 1): the pasted pixel fraction, area / (H * W)
    own = _float32(targets)  # exactly own where lam_b == 0
    targets = torch.lerp(own, own.index_select(0, partner), lam_b)
    return MixedBatch(mixed, targets, partner, lam_b=lam_b, corners=corners)


def snapmix(
    images: Tensor,
    targets: Tensor,
    cams: Tensor,
    partner: Tensor,
    target_boxes: Tensor,
    source_boxes: Tensor,
    *,
    normalize_targets: bool = False,
) -> MixedBatch:
    """SnapMix (Huang et al., AAAI 2021) with explicit parameters.

    The partner's ``source_boxes`` region is resized (bilinear, corners aligned) into each
    sample's ``target_boxes`` region. Label weights come from the CAMs, normalised per image
    (:func:`~cekd_losses.cam.normalize_cams`): ``lam_a = 1 - own CAM mass inside the target box``
    and ``lam_b = partner CAM mass inside the source box``. Where a CAM has no finite positive mass,
    the weight falls back to the target box's area fraction (as the SnapMix reference code does).
    Targets are ``lam_a * own + lam_b * partner``, not renormalised, so a row may sum to more or
    less than 1; a same-label pair simply gets ``(lam_a + lam_b) * onehot``.

    A sample paired with itself, or with an empty target or source box, is left as it is
    (``lam_a = 1``, ``lam_b = 0``).

    Args:
        images: (B, C, H, W) floating images.
        targets: (B, K) floating soft targets.
        cams: (B, h, w) floating CAM of each image for its own label, raw or normalised; resized
            bilinearly to (H, W) when its size differs.
        partner: (B,) integer partner of each sample.
        target_boxes: (B, 4) integer box of each sample that receives the partner's content.
        source_boxes: (B, 4) integer box of the partner that is cut out.
        normalize_targets: rescale ``lam_a, lam_b`` to sum to 1 (area fractions where both are 0).

    Returns:
        :class:`MixedBatch`.

    Example:
        >>> images = torch.stack([torch.zeros(1, 2, 2), torch.ones(1, 2, 2)])
        >>> cams = torch.tensor([[[1.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 3.0]]])
        >>> out = snapmix(images, torch.eye(2), cams, torch.tensor([1, 0]),
        ...               torch.tensor([[0, 0, 1, 1], [0, 0, 0, 0]]), torch.tensor([[1, 1, 2, 2], [0, 0, 0, 0]]))
        >>> out.lam_a, out.lam_b, out.images[0, 0]
        (tensor([0., 1.]), tensor([1., 0.]), tensor([[1., 0.],
                [0., 0.]]))
    """
    images, targets, partner = _check_pairing(images, targets, partner)
    batch, _, height, width = images.shape
    cams = _checks.check_maps("cams", cams, (batch, "h", "w"))
    target_boxes = _checks.check_boxes("target_boxes", target_boxes, batch, height, width)
    source_boxes = _checks.check_boxes("source_boxes", source_boxes, batch, height, width)
    for name, tensor in (("cams", cams), ("target_boxes", target_boxes), ("source_boxes", source_boxes)):
        _checks.check_same_device(name, tensor, "images", images)

    corners = torch.stack([target_boxes, source_boxes], dim=1).float().view(batch, 2, 2, 2)
    return _snapmix(images, targets, cams, partner.long(), corners, normalize_targets)


def _normalised_grid(height: int, width: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """(H, W, 2) ``(x * k_x, y * k_y)`` at each pixel (``k``: :attr:`_ImageConstants.steps`)."""

    def build() -> Tensor:
        step = _image_constants(height, width, device).steps.to(dtype)
        x = torch.arange(width, dtype=dtype, device=device) * step[0]
        y = torch.arange(height, dtype=dtype, device=device) * step[1]
        return torch.stack([x.expand(height, width), y[:, None].expand(height, width)], dim=-1)

    return _constant(("normalised grid", height, width, dtype, device), build)


def _resized_paste(images: Tensor, partner: Tensor, low: Tensor, sides: Tensor, mask: Tensor) -> Tensor:
    """SnapMix's paste: each partner's source box resized into the sample's target box (``mask``, (B, 1, H, W));
    ``low`` and ``sides`` (n, 2 boxes, 1, 1, 2 axes) are the boxes' first corners and side lengths."""
    batch, _, height, width = images.shape
    constants = _image_constants(height, width, images.device)
    one = constants.one
    # The paste: target pixel i of each axis reads source pixel lo_s + (i - lo_t) * (side_s - 1) / (side_t - 1),
    # bilinear resizing with corners aligned (a 1-pixel target side reads the first source pixel), as one
    # grid_sample over a separable grid in normalised coordinates n = p * k - 1, k = 2 / (size - 1): with a
    # cached grid of i * k, n = (k * (lo_s - lo_t * scale) - 1) + scale * (i * k), one op for the whole grid.
    sample_dtype = torch.float64 if images.dtype == torch.float64 else torch.float32  # half: inexact past 256 px
    target_steps, source_steps = (sides - one).unbind(1)
    scale = source_steps / target_steps.clamp(min=1)  # (n, 1, 1, 2 axes): source pixels per target pixel
    target_low, source_low = low.unbind(1)
    offset = torch.addcmul(source_low, target_low, scale, value=-1)  # source pixel at target pixel 0
    start = torch.addcmul(constants.minus_one, offset, constants.steps)  # normalised source coordinate at pixel 0
    grid = torch.addcmul(start, scale, _normalised_grid(height, width, sample_dtype, images.device))  # (n, H, W, 2)
    partner_images = images.index_select(0, partner)
    patches = F.grid_sample(
        partner_images if images.dtype == sample_dtype else partner_images.to(sample_dtype),
        grid if grid.shape[0] == batch else grid.expand(batch, -1, -1, -1),
        mode="bilinear",
        padding_mode="zeros",
        align_corners=True,
    )
    if patches.dtype != images.dtype:
        patches = patches.to(images.dtype)
    return _paste(mask, patches, images)


def _snapmix(
    images: Tensor,
    targets: Tensor,
    cams: Tensor,
    partner: Tensor,
    corners: Tensor,
    normalize_targets: bool,
) -> MixedBatch:
    """:func:`snapmix` on checked input: ``partner`` int64, ``corners`` (B or 1, 2, 2, 2) float32 integer-valued
    corners of the target box, then of the partner's source box; clipped here."""
    batch, _, height, width = images.shape
    constants = _image_constants(height, width, images.device)
    zero, one = constants.zero, constants.one
    corners = _clipped(corners, height, width)  # (n, 2, 2, 2), n = 1 with one box pair for the batch
    low, high = corners.view(-1, 2, 2, 1, 1, 2).unbind(2)  # (n, 2 boxes, 1, 1, 2 axes (x, y)) each
    sides = high - low
    # a pair mixes where the partner is another image and neither box is empty; both its boxes are emptied otherwise
    positions = _positions(batch, partner.device)
    active = torch.logical_and(partner != positions, sides.flatten(1).prod(dim=1))
    boxes = torch.where(active.view(batch, 1, 1, 1), corners, zero)  # (B, 2, 2, 2)
    masks = _box_masks(boxes, height, width)  # (B, 2, H, W)
    mask = masks[:, :1]  # (B, 1, H, W): the target box

    mixed = _resized_paste(images, partner, low, sides, mask)

    # Label weights: each map resized to the image (bilinear), minimum subtracted; the share of its mass in the
    # target box (own map) and in the source box (partner's map). No mass (flat, NaN, inf): the target box's
    # area fraction, as the SnapMix reference code.
    full = _resized_maps(cams.unsqueeze(1), (height, width))  # (B, 1, H, W)
    shifted = full - full.amin(dim=(2, 3), keepdim=True)
    pair = torch.stack([positions, partner], dim=1).view(2 * batch)  # own, partner's
    maps = shifted.index_select(0, pair).view(batch, 2, height, width)
    totals = maps.sum(dim=(2, 3))  # (B, 2)
    totals = torch.addcmul(totals, totals, zero)  # an infinite total becomes NaN (inf * 0)
    # In [0, 1] without a clamp: the masked sum runs the total's reduction (same shape, same order) on the
    # map with zeros outside the box, and rounding is monotone, so 0 <= masked sum <= total (equal for a full box).
    fraction = torch.where(masks, maps, zero).sum(dim=(2, 3)) / totals  # NaN for a total of 0 (0 / 0), inf or NaN
    target_fraction = mask.mean(dim=(2, 3), dtype=torch.float32)  # (B, 1), 0 where the pair does not mix
    share = torch.where(fraction == fraction, fraction, target_fraction)
    own_share, lam_b = share.chunk(2, dim=1)  # (B, 1) each
    lam_a = one - own_share
    if normalize_targets:
        total = lam_a + lam_b
        some = total > 0
        safe_total = torch.where(some, total, 1.0)
        lam_a = torch.where(some, lam_a / safe_total, 1.0 - target_fraction)
        lam_b = torch.where(some, lam_b / safe_total, target_fraction)
    own = _float32(targets)
    targets = torch.addcmul(lam_a * own, lam_b, own.index_select(0, partner))
    return MixedBatch(mixed, targets, partner, lam_a, lam_b, active, corners=boxes)


_HAS_DIRICHLET = hasattr(torch, "_sample_dirichlet")


def _sample_beta(
    alpha: float, shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device
) -> Tensor:
    """float32 draws of Beta(alpha, alpha) of the given ``shape``, seeded by ``generator``.

    PyTorch's Dirichlet sampler (one kernel) where this torch has it; it is private API, so otherwise
    two Gamma draws with public ops: Beta = G1 / (G1 + G2)."""
    if _HAS_DIRICHLET:
        concentration = _constant(
            ("concentration", alpha, shape, device), lambda: torch.full((*shape, 2), alpha, device=device)
        )
        return torch._sample_dirichlet(concentration, generator=generator).select(-1, 0)
    gammas = _sample_gamma(alpha, 2 * math.prod(shape), generator, device).view(*shape, 2)
    return gammas.select(-1, 0) / gammas.sum(dim=-1)


def _sample_gamma(shape: float, count: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
    """(count,) Gamma(shape, 1) draws with public ops: Marsaglia and Tsang's method (2000), vectorised
    with 16 candidates per draw, the first accepted one kept (all 16 rejected: p < 1e-20); shape < 1
    is boosted as Gamma(shape + 1) * U^(1 / shape)."""
    boosted = shape + 1.0 if shape < 1 else shape
    d = boosted - 1.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)
    x = torch.randn(count, 16, generator=generator, device=device)
    u = torch.rand(count, 16, generator=generator, device=device)
    v = (1.0 + c * x) ** 3
    accepted = (v > 0) & (u.log() < 0.5 * x * x + d - d * v + d * v.clamp(min=1e-30).log())
    first = accepted.to(torch.uint8).argmax(dim=1, keepdim=True)
    draws = d * v.gather(1, first)[:, 0].clamp(min=1e-30)
    if shape < 1:
        draws = draws * torch.rand(count, generator=generator, device=device) ** (1.0 / shape)
    return draws


def _centre_range(height: int, width: int) -> int:
    """Box centres are drawn in [0, range): a square image's side (the pixels themselves), else 2**62 (reduced
    modulo each side by :func:`_boxes_from_draws`)."""
    return height if height == width else 2**62


def _centre_dtype(centre_range: int) -> torch.dtype:
    """float32 where it holds every centre exactly (as the corners it makes), else int64."""
    return torch.float32 if centre_range <= 2**24 else torch.int64


def _random_draws(
    batch: int,
    draws: int,
    lambdas: int,
    boxes: int,
    centre_range: int,
    decisions: int,
    alpha: float,
    generator: torch.Generator | None,
    device: torch.device,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """Every random choice of one call, made on ``device`` with ``generator`` in three or four kernels:
    a permutation (B,) of partners, (draws, lambdas, 1, 1) Beta(alpha, alpha) values, (draws, boxes, 1, 2)
    box centres uniform in [0, centre_range) (:func:`_centre_range`), and (decisions,) uniforms for the mixing
    decision (none when ``decisions`` is 0)."""
    partner = torch.randperm(batch, generator=generator, device=device)
    lam = _sample_beta(alpha, (draws, lambdas, 1, 1), generator, device)
    centres = None
    if boxes:
        shape, dtype = (draws, boxes, 1, 2), _centre_dtype(centre_range)
        centres = torch.randint(0, centre_range, shape, generator=generator, dtype=dtype, device=device)
    decision = torch.rand(decisions, generator=generator, device=device) if decisions else None
    return partner, lam, centres, decision


# torch.compile cannot take a torch.Generator into a graph. Under compile the draws run as one opaque
# custom op that finds the mixer's generator by key, so a compiled mixer makes exactly the eager draws.
_GENERATORS: weakref.WeakValueDictionary[int, torch.Generator] = weakref.WeakValueDictionary()


def _register(generator: object) -> torch.Generator | None:
    """``generator`` checked and made findable by the compiled draws."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"`generator` must be a torch.Generator or None, got {type(generator).__name__}")
    if generator is not None:
        _GENERATORS[id(generator)] = generator
    return generator


@torch.library.custom_op("cekd_losses::random_draws", mutates_args=(), tags=(torch.Tag.nondeterministic_seeded,))
def _compiled_draws(
    batch: int,
    draws: int,
    lambdas: int,
    boxes: int,
    centre_range: int,
    decisions: int,
    alpha: float,
    generator_key: int,
    device: torch.device,
) -> list[Tensor]:
    generator = _GENERATORS.get(generator_key)
    found = _random_draws(batch, draws, lambdas, boxes, centre_range, decisions, alpha, generator, device)
    return [t.contiguous() if t is not None else torch.empty(0, device=device) for t in found]


@_compiled_draws.register_fake
def _(
    batch: int,
    draws: int,
    lambdas: int,
    boxes: int,
    centre_range: int,
    decisions: int,
    alpha: float,
    generator_key: int,
    device: torch.device,
) -> list[Tensor]:
    return [
        torch.empty(batch, dtype=torch.long, device=device),
        torch.empty(draws, lambdas, 1, 1, device=device),
        torch.empty(
            (draws, boxes, 1, 2) if boxes else (0,),
            dtype=_centre_dtype(centre_range) if boxes else torch.float32,
            device=device,
        ),
        torch.empty(decisions, device=device),
    ]


def _boxes_from_draws(side_draws: Tensor, centres: Tensor, height: int, width: int) -> Tensor:
    """(n, k, 2, 2) float32 corners ``[[x1, y1], [x2, y2]]`` from (n, k, 1, 1) Beta draws ``u`` and (n, k, 1, 2)
    centres (:func:`_random_draws`; int64 ones reduced modulo each side here): sides ``floor(size * sqrt(u))``
    around a centre uniform over the pixels, not yet clipped to the image (:func:`_clipped`; a box mask needs no
    clipping). As CutMix (timm), with ``u`` in the place of ``1 - lam``: the Beta(alpha, alpha) law is symmetric."""
    constants = _image_constants(height, width, side_draws.device)
    sides = (constants.sizes * side_draws.sqrt()).floor()  # (n, k, 1, 2)
    if centres.dtype == torch.int64:  # uniform in [0, 2**62): each axis modulo its side
        centres = centres % constants.integer_sizes
    return torch.addcmul(centres, sides, constants.half_sides).ceil()


def _clipped(corners: Tensor, height: int, width: int) -> Tensor:
    """(..., 2, 2) corners ``[[x1, y1], [x2, y2]]`` clipped to the image, as float32."""
    constants = _image_constants(height, width, corners.device)
    return corners.clamp(min=constants.zero, max=constants.sizes)


_INDEX_DTYPES = (torch.int64, torch.int32)  # what index_select takes as it is
_TABLE_CLASSES = 1024  # up to this many classes the (K, K) table of smoothed one-hot rows is kept (<= 4 MiB)


def _smoothed_one_hot(classes: int, smoothing: float, device: torch.device) -> Tensor:
    """(K, K) float32 rows ``onehot * (1 - s) + s / K``, each value rounded once from float64."""

    def build() -> Tensor:
        table = torch.eye(classes, dtype=torch.float64, device=device) * (1.0 - smoothing) + smoothing / classes
        return table.float()

    return _constant(("one-hot", classes, smoothing, device), build)


class _Draw(NamedTuple):
    """One call's parameters on the images' device; unmixed samples already folded in."""

    partner: Tensor  # (B,) int64, a sample left unmixed is its own partner
    lam: Tensor  # (B, lambdas, 1, 1) float32; (1, lambdas, 1, 1) with same_on_batch
    boxes: Tensor | None  # (B or 1, k, 2, 2) float32 integer-valued corners [[x1, y1], [x2, y2]], not clipped
    mixed: Tensor | None = None  # (B,) bool, the mixing decisions; None when every sample mixes (p = 1)


def _apply_mixup(images: Tensor, targets: Tensor, cams: Tensor | None, draw: _Draw, normalize: bool) -> MixedBatch:
    return _mixup(images, targets, draw.partner, draw.lam)


def _apply_cutmix(images: Tensor, targets: Tensor, cams: Tensor | None, draw: _Draw, normalize: bool) -> MixedBatch:
    assert draw.boxes is not None
    return _cutmix(images, targets, draw.partner, draw.boxes)


def _apply_snapmix(images: Tensor, targets: Tensor, cams: Tensor | None, draw: _Draw, normalize: bool) -> MixedBatch:
    assert cams is not None and draw.boxes is not None
    return _snapmix(images, targets, cams, draw.partner, draw.boxes, normalize)


class _Method(NamedTuple):
    lambdas: int  # Beta draws per sample (mixup: its lam; cutmix, snapmix: one per box)
    boxes: int  # boxes per sample
    needs_cams: bool  # the call takes the clean images' CAMs
    apply: Callable[[Tensor, Tensor, Tensor | None, _Draw, bool], MixedBatch]  # the kernel on its draw


_KERNELS: dict[str, _Method] = {
    "mixup": _Method(1, 0, False, _apply_mixup),
    "cutmix": _Method(1, 1, False, _apply_cutmix),
    "snapmix": _Method(2, 2, True, _apply_snapmix),  # the target box, then the partner's source box
}


class MixingAugmenter(nn.Module):
    """Mix a batch with MixUp, CutMix or SnapMix and build its soft targets.

    Each sample draws its own lambda, box and mixing decision (``same_on_batch=True`` shares one
    draw over the batch) and is paired with a random partner (a permutation of the batch). A sample
    that is not mixed keeps its image and its (smoothed) target bit for bit and is its own partner.

    - ``"mixup"``: ``lam ~ Beta(mix_alpha, mix_alpha)``, pixels blended.
    - ``"cutmix"``: box of area fraction ``1 - lam`` at a uniform centre, clipped; ``lam`` then
      corrected to the pasted pixel fraction.
    - ``"snapmix"``: a target box (area from ``lam1``) and an independent partner box (from
      ``lam2``), both ``~ Beta(mix_alpha, mix_alpha)``; label weights from CAMs (see :func:`snapmix`).

    Args:
        method: ``"mixup"``, ``"cutmix"`` or ``"snapmix"``.
        num_classes: K, the width of the targets.
        mix_alpha: parameter of the Beta distribution of the lambdas, > 0 (named apart from
            :class:`~cekd_losses.CEKDLoss`'s ``alpha``, the weight of cross distillation).
        p: per-sample probability of mixing, in [0, 1].
        label_smoothing: in [0, 1): targets become ``t * (1 - s) + s / K`` before mixing.
        same_on_batch: one lambda, box and decision for the whole batch (the SnapMix code base's
            setting), drawn as the per-sample ones and broadcast: the same kernels, no host read.
        normalize_targets: snapmix only: rescale the two label weights to sum to 1.
        generator: optional ``torch.Generator`` for reproducible draws. Per-sample draws are made on
            its device (put it on the images' device to avoid a transfer), else on the images' device.

    Call: ``mixer(images (B, C, H, W) float, labels (B,) int or (B, K) float, cams (B, h, w) | None)``
    returns a :class:`MixedBatch`. ``cams`` is required for snapmix: the CAM of each clean image
    for its own label, e.g. from :class:`~cekd_losses.cam.FeatureTap`.

    A call launches few kernels and never reads a tensor value back to the host (on CPU tensors
    only, argument values are checked): per call 7 kernels for MixUp, 17 for CutMix and 44 for
    SnapMix, in either mode, on square images (one more for box methods on other shapes, whose
    box centres are reduced per axis). ``torch.compile(mixer, fullgraph=True)`` traces every
    configuration whole and makes the same draws as eager for the same generator state (see
    :doc:`/benchmarks`).

    Example:
        >>> mixer = MixingAugmenter("cutmix", num_classes=10, generator=torch.Generator().manual_seed(0))
        >>> batch = mixer(torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,)))
        >>> batch.images.shape, batch.targets.shape, torch.allclose(batch.targets.sum(1), torch.ones(8))
        (torch.Size([8, 3, 32, 32]), torch.Size([8, 10]), True)
    """

    def __init__(
        self,
        method: MixMethod,
        num_classes: int,
        *,
        mix_alpha: float = 1.0,
        p: float = 1.0,
        label_smoothing: float = 0.0,
        same_on_batch: bool = False,
        normalize_targets: bool = False,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.method = _checks.check_choice("method", method, _METHODS)
        self.num_classes = _checks.check_positive_int("num_classes", num_classes)
        self.mix_alpha = _checks.check_positive("mix_alpha", mix_alpha)
        self.p = _checks.check_in_range("p", p, 0.0, 1.0)
        self.label_smoothing = _checks.check_in_range("label_smoothing", label_smoothing, 0.0, 1.0, high_open=True)
        self.same_on_batch = bool(same_on_batch)
        if normalize_targets and method != "snapmix":
            raise ValueError(
                f"`normalize_targets` applies to method 'snapmix' only (mixup and cutmix targets always "
                f"sum to 1), got normalize_targets=True with method {method!r}"
            )
        self.normalize_targets = bool(normalize_targets)
        self.generator = generator

    @property
    def generator(self) -> torch.Generator | None:
        """The ``torch.Generator`` of the draws, or None for PyTorch's default one."""
        return self._generator

    @generator.setter
    def generator(self, generator: torch.Generator | None) -> None:
        self._generator = _register(generator)

    def extra_repr(self) -> str:
        return (
            f"method={self.method!r}, num_classes={self.num_classes}, mix_alpha={self.mix_alpha}, p={self.p}, "
            f"label_smoothing={self.label_smoothing}, same_on_batch={self.same_on_batch}"
            + (", normalize_targets=True" if self.normalize_targets else "")
        )

    def soft_targets(self, labels: Tensor, batch: int) -> Tensor:
        """(B, K) float32 targets from (B,) class ids or (B, K) soft targets, label smoothing applied.

        Class ids read rows of a cached (K, K) table of smoothed one-hot rows (one kernel; up to 1024 classes,
        4 MiB per device), or are scattered into a filled tensor for more classes.

        Example:
            >>> MixingAugmenter("mixup", 4, label_smoothing=0.2).soft_targets(torch.tensor([2, 0]), 2)
            tensor([[0.0500, 0.0500, 0.8500, 0.0500],
                    [0.8500, 0.0500, 0.0500, 0.0500]])
        """
        smoothing, classes = self.label_smoothing, self.num_classes
        labels = _checks.check_tensor("labels", labels)
        if labels.ndim == 1:
            if labels.dtype in _INDEX_DTYPES and labels.shape[0] == batch:
                ids = labels  # the common case, in as few Python calls as possible
            else:
                _checks.check_shape("labels", labels, (batch,))
                ids = _checks.check_integer("labels", labels).long()
            try:  # on CPU indexing checks the ids itself: the range check costs nothing until it fails
                if classes <= _TABLE_CLASSES:  # rows of a cached table: one kernel
                    return _smoothed_one_hot(classes, smoothing, labels.device).index_select(0, ids)
                targets = torch.full((batch, classes), smoothing / classes, device=labels.device)
                return targets.scatter_(1, ids.view(batch, 1), 1.0 - smoothing + smoothing / classes)
            except (IndexError, RuntimeError):
                _checks.check_class_ids("labels", labels, classes)  # names the argument and the values
                raise
        _checks.check_shape("labels", labels, (batch, classes))
        _checks.check_floating("labels", labels)
        targets = labels.float()
        return targets * (1.0 - smoothing) + smoothing / classes if smoothing > 0 else targets

    def forward(self, images: Tensor, labels: Tensor, cams: Tensor | None = None) -> MixedBatch:
        """Mix ``images`` (B, C, H, W) with ``labels`` (B,) ids or (B, K) soft targets; ``cams`` (B, h, w)
        for snapmix only. Returns the :class:`MixedBatch`.

        Runs outside any autocast region (its own precision rules hold under AMP), so a mix is the
        same with and without ``torch.autocast``."""
        images = _checks.check_images("images", images)
        if _checks.autocast_on(images.device):
            with torch.autocast(images.device.type, enabled=False):
                return self._mix(images, labels, cams)
        return self._mix(images, labels, cams)

    def _mix(self, images: Tensor, labels: Tensor, cams: Tensor | None) -> MixedBatch:
        batch = images.shape[0]
        targets = self.soft_targets(labels, batch)
        _checks.check_same_device("labels", targets, "images", images)
        kernel = _KERNELS[self.method]
        if kernel.needs_cams and cams is None:
            raise ValueError(
                "`cams` is required for snapmix: pass the (B, h, w) class activation map of each clean "
                "image for its own label, e.g. cams = FeatureTap(model).cams(images, labels)"
            )
        if not kernel.needs_cams and cams is not None:
            raise ValueError(f"`cams` is used by method 'snapmix' only, got cams with method {self.method!r}")
        if cams is not None:
            cams = _checks.check_maps("cams", cams, (batch, "h", "w"))
            _checks.check_same_device("cams", cams, "images", images)
        _, _, height, width = images.shape
        same = self.same_on_batch  # one draw of lambdas, boxes and decision for the batch
        draw = _draw(
            kernel,
            (batch, height, width),
            images.device,
            self.generator,
            self.mix_alpha,
            same,
            self.p,
            1 if same else batch,
        )
        return kernel.apply(images, targets, cams, draw, self.normalize_targets)


def _draw(
    kernel: _Method,
    shape: tuple[int, int, int],
    device: torch.device,
    generator: torch.Generator | None,
    alpha: float,
    same_on_batch: bool,
    p: float,
    decisions: int,
    lam_map: Callable[[Tensor], Tensor] | None = None,
) -> _Draw:
    """The random parameters of one call on a (B, H, W) batch, on ``device``: one set of lambdas and boxes
    with ``same_on_batch``; ``decisions`` mixing decisions of probability ``p`` (1: one for the batch);
    ``lam_map`` maps the Beta draws before they make boxes (the Kornia classes' ranges)."""
    batch, height, width = shape
    draws = 1 if same_on_batch else batch
    decisions = decisions if p < 1 else 0
    arguments = (batch, draws, kernel.lambdas, kernel.boxes, _centre_range(height, width), decisions, alpha)
    draw_device = generator.device if generator is not None else device
    if torch.compiler.is_compiling():
        found = _compiled_draws(*arguments, id(generator) if generator is not None else 0, draw_device)
        partner, lam = found[0], found[1]
        centres = found[2] if kernel.boxes else None
        decision = found[3] if decisions else None
    else:
        partner, lam, centres, decision = _random_draws(*arguments, generator, draw_device)
    if draw_device != device:
        partner, lam = partner.to(device, non_blocking=True), lam.to(device, non_blocking=True)
        centres = centres.to(device, non_blocking=True) if centres is not None else None
        decision = decision.to(device, non_blocking=True) if decision is not None else None
    if lam_map is not None:
        lam = lam_map(lam)
    boxes = None
    if centres is not None:
        boxes = _boxes_from_draws(lam, centres, height, width)  # one box set for the batch with same_on_batch
    mixed = None
    if decision is not None:  # unmixed samples: their own partner, lam 1, empty boxes
        mixed = (decision < p).expand(batch)
        partner = torch.where(mixed, partner, _positions(batch, device))
        if boxes is not None:  # (B, k, 2, 2) from here
            boxes = torch.where(mixed.view(batch, 1, 1, 1), boxes, 0.0)
        else:
            lam = torch.where(mixed.view(batch, 1, 1, 1), lam, 1.0)
    return _Draw(partner, lam, boxes, mixed)
