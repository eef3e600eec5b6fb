"""MixUp, CutMix and SnapMix with explicit parameters, and :func:`replay` of a mix on another view.

The public kernels :func:`mixup`, :func:`cutmix` and :func:`snapmix` take every random choice as a tensor
(partners, lambdas, boxes), check it and are deterministic. Everything is vectorised over the batch: no Python
loop over samples, no host read. Mixing is differentiable: where the images require grad, gradients reach both
images of each pair (mixing feature maps, adversarial inputs, learned augmentation).

Boxes are (B, 4) integer tensors ``(x1, y1, x2, y2)`` in pixels, ``x2``/``y2`` exclusive; an empty box
(``x1 == x2`` or ``y1 == y2``) pastes nothing.

Internal API (for :class:`~cekd_losses.MixingAugmenter` and the Kornia classes, on checked input):
:func:`blend`, :func:`paste` and :func:`snap` make a :class:`~cekd_losses.MixedBatch` from float corners
(:mod:`cekd_losses._boxes`); :func:`paste_boxes` and :func:`paste_resized` make the pixels alone,
:func:`snap_boxes` SnapMix's boxes and :func:`snapmix_weights` its label weights.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _checks
from ._boxes import box_masks, clipped, grid_steps, scaled_pixel_grid
from ._constants import positions
from ._maps import resized_maps
from .draws import METHOD_IDS, MixParameters
from .mixed_batch import MixedBatch

__all__ = ["cutmix", "mixup", "replay", "snapmix"]


def _check_pairing(images: object, targets: object, partner: object) -> tuple[Tensor, Tensor, Tensor]:
    images = _checks.check_images("images", images)
    batch = images.shape[0]
    targets = _checks.check_shape("targets", targets, (batch, "K"))
    _checks.check_floating("targets", targets)
    partner = _checks.check_shape("partner", partner, (batch,))
    _checks.check_class_ids("partner", partner, batch, what="batch positions")
    for name, tensor in (("targets", targets), ("partner", partner)):
        _checks.check_same_device(name, tensor, "images", images)
    return images, targets, partner.long()


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
    return blend(images, targets, partner, lam.view(batch, 1, 1, 1))


def blend(images: Tensor, targets: Tensor, partner: Tensor, lam: Tensor) -> MixedBatch:
    """:func:`mixup` on checked input: ``partner`` int64, ``lam`` (B, 1, 1, 1), or (1, 1, 1, 1) for all."""
    weight = lam.to(images.dtype)
    mixed = torch.lerp(images.index_select(0, partner), images, weight)
    lam_a = weight.float().view(-1, 1)
    own = targets.float()  # exactly own where lam_a == 1
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
    return paste(images, targets, partner, boxes.float().view(batch, 1, 2, 2))


def paste_boxes(images: Tensor, partner: Tensor, corners: Tensor) -> tuple[Tensor, Tensor]:
    """CutMix's pixels: ``images[partner]`` inside the boxes of (B or 1, 1, 2, 2) corners; returns the mixed
    images and the (B or 1, 1, H, W) masks."""
    mask = box_masks(corners, *images.shape[-2:])
    return torch.where(mask, images.index_select(0, partner), images), mask


def paste(images: Tensor, targets: Tensor, partner: Tensor, corners: Tensor) -> MixedBatch:
    """:func:`cutmix` on checked input: ``partner`` int64, ``corners`` (B, 1, 2, 2) float32 of each box, or
    (1, 1, 2, 2) of one box for all, integer-valued (they may reach past the image: the mask clips them,
    :class:`MixedBatch` clips its integer boxes)."""
    mixed, mask = paste_boxes(images, partner, corners)
    lam_b = mask.mean(dim=(2, 3), dtype=torch.float32)  # (B or 1, 1): the pasted pixel fraction, area / (H * W)
    own = targets.float()  # exactly own where lam_b == 0
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
    return snap(images, targets, cams, partner, corners, normalize_targets)


def resized_patches(sources: Tensor, corners: Tensor) -> Tensor:
    """SnapMix's patches: each partner's source box resized (bilinear, corners aligned) over the sample's target
    box, the (B, C, H, W) images to paste inside the target boxes. ``sources``: (B, C, H, W) each sample's
    partner image; ``corners``: (n, 2 boxes, 2, 2) clipped, the target box then the source box (n = 1: one pair
    for all)."""
    batch, _, height, width = sources.shape
    low, high = corners.view(-1, 2, 2, 1, 1, 2).unbind(2)  # (n, 2 boxes, 1, 1, 2 axes) each
    # Target pixel i of an axis reads source pixel lo_s + (i - lo_t) * (side_s - 1) / (side_t - 1) (a 1-pixel
    # target side reads the first source pixel), as one grid_sample over a separable grid in normalised
    # coordinates n = p * k - 1: with the cached grid of i * k, n = (k * (lo_s - lo_t * scale) - 1) + scale * i * k.
    target_steps, source_steps = (high - low - 1).unbind(1)
    scale = source_steps / target_steps.clamp(min=1)  # (n, 1, 1, 2 axes): source pixels per target pixel
    target_low, source_low = low.unbind(1)
    start = torch.addcmul(source_low, target_low, scale, value=-1) * grid_steps(height, width, sources.device) - 1
    sample_dtype = torch.float64 if sources.dtype == torch.float64 else torch.float32  # half: inexact past 256 px
    grid = torch.addcmul(start, scale, scaled_pixel_grid(height, width, sample_dtype, sources.device))
    patches = F.grid_sample(
        sources.to(sample_dtype),
        grid.expand(batch, -1, -1, -1),
        mode="bilinear",
        padding_mode="zeros",
        align_corners=True,
    )
    return patches.to(sources.dtype)


def paste_resized(images: Tensor, partner: Tensor, corners: Tensor, mask: Tensor) -> Tensor:
    """SnapMix's pixels: :func:`resized_patches` of (n, 2, 2, 2) clipped ``corners`` pasted where ``mask`` (B, 1,
    H, W), the target boxes that receive a paste, holds."""
    return torch.where(mask, resized_patches(images.index_select(0, partner), corners), images)


def snapmix_weights(cams: Tensor, partner: Tensor, masks: Tensor, normalize: bool) -> tuple[Tensor, Tensor]:
    """SnapMix's (B, 1) label weights ``lam_a``, ``lam_b`` from (B, h, w) CAMs and the (B, 2, H, W) masks of each
    pair's target and source boxes (empty where the pair does not mix)."""
    batch, _, height, width = masks.shape
    full = resized_maps(cams.unsqueeze(1), (height, width))  # (B, 1, H, W) float32
    shifted = full - full.amin(dim=(2, 3), keepdim=True)
    pair = torch.stack([positions(batch, partner.device), partner], dim=1).view(2 * batch)  # own, partner's
    maps = shifted.index_select(0, pair).view(batch, 2, height, width)
    totals = maps.sum(dim=(2, 3))  # (B, 2)
    # In [0, 1] without a clamp: the masked sum runs the total's reduction (same shape, same order) on the map
    # with zeros outside the box, and rounding is monotone, so 0 <= masked sum <= total (equal for a full box).
    inside = (maps * masks).sum(dim=(2, 3))
    target_fraction = masks[:, :1].mean(dim=(2, 3), dtype=torch.float32)  # (B, 1), 0 where the pair does not mix
    # No finite positive mass (a flat, NaN or infinite map; NaN fails both comparisons): the target box's area
    # fraction, as the SnapMix code
    has_mass = (totals > 0) & (totals < math.inf)
    share = torch.where(has_mass, inside / totals, target_fraction)
    own_share, lam_b = share.chunk(2, dim=1)
    lam_a = 1.0 - own_share
    if normalize:
        total = lam_a + lam_b
        some = total > 0
        safe_total = torch.where(some, total, 1.0)
        lam_a = torch.where(some, lam_a / safe_total, 1.0 - target_fraction)
        lam_b = torch.where(some, lam_b / safe_total, target_fraction)
    return lam_a, lam_b


class SnapBoxes(NamedTuple):
    """SnapMix's boxes of a batch: ``corners`` (n, 2, 2, 2) clipped (the target box, then the source box; n = 1
    for one pair for all), ``boxes`` (B, 2, 2, 2) the same emptied where a pair does not mix, their ``masks``
    (B, 2, H, W) and ``active`` (B,) bool, the pairs that mix (another image, neither box empty)."""

    corners: Tensor
    boxes: Tensor
    masks: Tensor
    active: Tensor


def snap_boxes(corners: Tensor, partner: Tensor, height: int, width: int) -> SnapBoxes:
    """:class:`SnapBoxes` of (B or 1, 2, 2, 2) integer-valued corners and (B,) int64 partners."""
    batch = partner.shape[0]
    corners = clipped(corners, height, width)
    sides = corners[..., 1, :] - corners[..., 0, :]
    active = torch.logical_and(partner != positions(batch, partner.device), sides.flatten(1).prod(dim=1))
    boxes = corners * active.view(batch, 1, 1, 1)  # emptied where the pair does not mix
    return SnapBoxes(corners, boxes, box_masks(boxes, height, width), active)


def snap(
    images: Tensor, targets: Tensor, cams: Tensor, partner: Tensor, corners: Tensor, normalize: bool
) -> MixedBatch:
    """:func:`snapmix` on checked input: ``partner`` int64, ``corners`` (B or 1, 2, 2, 2) float32 integer-valued
    corners of the target box, then of the partner's source box; clipped here."""
    boxes = snap_boxes(corners, partner, *images.shape[-2:])
    mixed = paste_resized(images, partner, boxes.corners, boxes.masks[:, :1])
    lam_a, lam_b = snapmix_weights(cams, partner, boxes.masks, normalize)
    own = targets.float()
    targets = torch.addcmul(lam_a * own, lam_b, own.index_select(0, partner))
    return MixedBatch(mixed, targets, partner, lam_a, lam_b, boxes.active, corners=boxes.boxes)


def mixed_pixels(
    images: Tensor, partner: Tensor, weight: Tensor | None, cut_mask: Tensor, snap: tuple[Tensor, Tensor] | None
) -> Tensor:
    """A choice's pixels: each image blended with its partner by MixUp's ``weight`` (B or 1, 1, 1, 1) (None: no
    blend), the partner pasted where ``cut_mask`` (B, 1, H, W) holds (CutMix), and with ``snap`` = (corners (B, 2,
    2, 2), target masks (B, 1, H, W)) SnapMix's resized patches pasted in their target boxes. A sample outside
    a method's rows (weight 1, empty masks) gets exactly the other methods' pixels."""
    sources = images.index_select(0, partner)
    pixels = images if weight is None else torch.lerp(sources, images, weight.to(images.dtype))
    pixels = torch.where(cut_mask, sources, pixels)
    if snap is not None:
        pixels = torch.where(snap[1], resized_patches(sources, snap[0]), pixels)
    return pixels


def choose(
    images: Tensor, targets: Tensor, cams: Tensor | None, params: MixParameters, methods: Sequence[str], normalize: bool
) -> MixedBatch:
    """A choice among ``methods`` on checked input: each sample mixed by its ``params.method`` (MixUp's weight in
    ``params.lam``, CutMix's box in ``params.corners[:, :1]``, SnapMix's two boxes in ``params.corners`` with
    ``cams`` (B, h, w)) as :func:`blend`, :func:`paste` or :func:`snap` would mix it alone: the same pixels, bit
    for bit, and targets ``lam_a * own + lam_b * partner`` with that method's weights."""
    assert params.method is not None and params.corners is not None
    batch, _, height, width = images.shape
    partner, method = params.partner, params.method.view(-1, 1, 1, 1)
    cut_corners = torch.where(method == METHOD_IDS["cutmix"], params.corners[:, :1], 0.0)
    cut_mask = box_masks(cut_corners, height, width)
    lam_b = cut_mask.mean(dim=(2, 3), dtype=torch.float32)  # (B, 1): CutMix's pasted fraction, 0 elsewhere
    lam_a, weight, snapped, applied = 1.0 - lam_b, None, None, None
    if "mixup" in methods:
        weight = params.lam.to(images.dtype)
        own_weight = weight.float().view(-1, 1)  # 1 outside MixUp's rows, as lam_b is 0 outside CutMix's
        lam_a, lam_b = own_weight - lam_b, (1.0 - own_weight) + lam_b
    if "snapmix" in methods:
        assert cams is not None
        is_snap = method == METHOD_IDS["snapmix"]
        snapped = snap_boxes(torch.where(is_snap, params.corners, 0.0), partner, height, width)
        snap_a, snap_b = snapmix_weights(cams, partner, snapped.masks, normalize)
        rows = is_snap.view(-1, 1)
        lam_a, lam_b = torch.where(rows, snap_a, lam_a), torch.where(rows, snap_b, lam_b)
        others = (partner != positions(batch, partner.device)) & (lam_b.view(-1) > 0)
        applied = torch.where(rows.view(-1), snapped.active, others)
    snap = None if snapped is None else (snapped.boxes, snapped.masks[:, :1])
    pixels = mixed_pixels(images, partner, weight, cut_mask, snap)
    own = targets.float()
    mixed_targets = torch.addcmul(lam_a * own, lam_b, own.index_select(0, partner))
    corners = cut_corners if snap is None else torch.where(method == METHOD_IDS["snapmix"], snap[0], cut_corners)
    return MixedBatch(pixels, mixed_targets, partner, lam_a, lam_b, applied, corners=corners, method=params.method)


def replay(batch: MixedBatch, images: Tensor) -> Tensor:
    """The mix of ``batch`` made again on ``images``, another view of the same clean batch: the same partners,
    weights and boxes (SnapMix's resized paste included), so every view shares ``batch.targets``.

    Args:
        batch: a :class:`MixedBatch` from :class:`~cekd_losses.MixingAugmenter` or a kernel.
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
    partner, boxes, source_boxes = batch.partner, batch.boxes, batch.source_boxes
    if batch.method is not None:
        return _replay_choice(batch, images)
    if boxes is None:  # mixup
        return torch.lerp(images.index_select(0, partner), images, batch.lam_a.view(-1, 1, 1, 1).to(images.dtype))
    if source_boxes is None:  # cutmix
        return paste_boxes(images, partner, boxes.float().view(-1, 1, 2, 2))[0]
    corners = torch.stack([boxes, source_boxes], dim=1).float().view(-1, 2, 2, 2)  # snapmix
    return paste_resized(images, partner, corners, box_masks(corners[:, :1], *images.shape[-2:]))


def _replay_choice(batch: MixedBatch, images: Tensor) -> Tensor:
    """:func:`replay` of a batch mixed by a choice among methods: each sample's method from ``batch.method``."""
    assert batch.boxes is not None and batch.method is not None
    height, width = images.shape[-2:]
    method = batch.method.view(-1, 1, 1, 1)
    weight = torch.where(method == METHOD_IDS["mixup"], batch.lam_a.view(-1, 1, 1, 1), 1.0)
    cut_mask = box_masks(
        torch.where(method == METHOD_IDS["cutmix"], batch.boxes.float().view(-1, 1, 2, 2), 0.0), height, width
    )
    snap = None
    if batch.source_boxes is not None:
        corners = torch.stack([batch.boxes, batch.source_boxes], dim=1).float().view(-1, 2, 2, 2)
        corners = torch.where(method == METHOD_IDS["snapmix"], corners, 0.0)
        snap = (corners, box_masks(corners[:, :1], height, width))
    return mixed_pixels(images, batch.partner, weight, cut_mask, snap)
