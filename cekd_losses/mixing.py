"""Batched MixUp, CutMix and SnapMix with per-sample parameters, on any device.

The functional kernels :func:`mixup`, :func:`cutmix` and :func:`snapmix` take every random choice
as an explicit tensor (partners, lambdas, boxes) and are deterministic; :class:`MixingAugmenter`
draws those parameters (from an optional ``torch.Generator``) and calls them. Everything is
vectorised over the batch: no Python loop over samples and no host sync.

Mixing is differentiable: where the images require grad, gradients reach both images of each pair
(mixing feature maps, adversarial inputs, learned augmentation).

Boxes are (B, 4) integer tensors ``(x1, y1, x2, y2)`` in pixels, ``x2``/``y2`` exclusive; an empty
box (``x1 == x2`` or ``y1 == y2``) pastes nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import kornia.geometry.transform
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _checks

__all__ = ["MixMethod", "MixedBatch", "MixingAugmenter", "cutmix", "mixup", "snapmix"]

MixMethod = Literal["mixup", "cutmix", "snapmix"]
"""The mixing methods of :class:`MixingAugmenter`."""
_METHODS = ("mixup", "cutmix", "snapmix")


@dataclass(frozen=True)
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

    With ``partner``, ``lam_a`` and the boxes, the kernels replay a mix exactly on another tensor of
    the same batch (a second view, a mask): ``cutmix(other, targets, batch.partner, batch.boxes)``.
    """

    images: Tensor
    targets: Tensor
    partner: Tensor
    lam_a: Tensor
    lam_b: Tensor
    applied: Tensor
    boxes: Tensor | None = None
    source_boxes: Tensor | None = None


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


def _mix_targets(targets: Tensor, partner: Tensor, lam_a: Tensor, lam_b: Tensor) -> Tensor:
    own = targets.float()
    return lam_a[:, None] * own + lam_b[:, None] * own[partner]


def _box_area(boxes: Tensor) -> Tensor:
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def _box_indicators(boxes: Tensor, height: int, width: int) -> tuple[Tensor, Tensor]:
    """(B, H) bool rows and (B, W) bool columns inside each box."""
    rows = torch.arange(height, device=boxes.device)
    cols = torch.arange(width, device=boxes.device)
    inside_rows = (rows >= boxes[:, 1, None]) & (rows < boxes[:, 3, None])
    inside_cols = (cols >= boxes[:, 0, None]) & (cols < boxes[:, 2, None])
    return inside_rows, inside_cols


def _box_masks(boxes: Tensor, height: int, width: int) -> Tensor:
    """(B, 1, H, W) bool masks, True inside each box."""
    rows, cols = _box_indicators(boxes, height, width)
    return rows[:, None, :, None] & cols[:, None, None, :]


def _paste(mask: Tensor, pasted: Tensor, images: Tensor) -> Tensor:
    """``where(mask, pasted, images)``, written into ``pasted`` (a fresh buffer) unless autograd must see it."""
    if torch.is_grad_enabled() and (pasted.requires_grad or images.requires_grad):
        return torch.where(mask, pasted, images)
    return torch.where(mask, pasted, images, out=pasted)


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
    weight = lam.to(images.dtype)
    mixed = torch.lerp(images[partner], images, weight.view(batch, 1, 1, 1))
    lam_a = weight.float()
    lam_b = 1.0 - lam_a
    applied = (partner != torch.arange(batch, device=partner.device)) & (lam_a < 1)
    return MixedBatch(mixed, _mix_targets(targets, partner, lam_a, lam_b), partner.long(), lam_a, lam_b, applied)


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
    return _cutmix(images, targets, partner, boxes, shared_box=None)


def _cutmix(
    images: Tensor, targets: Tensor, partner: Tensor, boxes: Tensor, shared_box: tuple[int, ...] | None
) -> MixedBatch:
    """:func:`cutmix` on checked input; ``shared_box``, every row of ``boxes`` known on the host, pastes by slicing."""
    batch, _, height, width = images.shape
    if shared_box is None:
        mixed = _paste(_box_masks(boxes, height, width), images[partner], images)
    else:
        x1, y1, x2, y2 = shared_box
        mixed = images.clone()
        mixed[:, :, y1:y2, x1:x2] = images[partner, :, y1:y2, x1:x2]
    area = _box_area(boxes)
    lam_b = area.float() / (height * width)
    lam_a = 1.0 - lam_b
    applied = (partner != torch.arange(batch, device=partner.device)) & (area > 0)
    return MixedBatch(
        mixed, _mix_targets(targets, partner, lam_a, lam_b), partner.long(), lam_a, lam_b, applied, boxes.long()
    )


def _box_to_box_grid(target_boxes: Tensor, source_boxes: Tensor, height: int, width: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Normalised sampling maps (B, H, W) sending each target box's pixels onto its source box, as
    bilinear resizing with ``align_corners=True`` does (corners onto corners; a 1-pixel side reads
    the first pixel). Built per axis and normalised before expanding: cheap."""

    def axis(dst_start: Tensor, dst_len: Tensor, src_start: Tensor, src_len: Tensor, size: int) -> Tensor:
        scale = torch.where(dst_len > 1, (src_len - 1) / (dst_len - 1).clamp(min=1), torch.zeros_like(dst_len))
        positions = torch.arange(size, device=dst_start.device, dtype=dtype)
        pixels = src_start[:, None] + (positions[None] - dst_start[:, None]) * scale[:, None]
        return pixels * (2.0 / max(size - 1, 1)) - 1.0

    t = target_boxes.to(dtype)
    s = source_boxes.to(dtype)
    grid_x = axis(t[:, 0], t[:, 2] - t[:, 0], s[:, 0], s[:, 2] - s[:, 0], width)
    grid_y = axis(t[:, 1], t[:, 3] - t[:, 1], s[:, 1], s[:, 3] - s[:, 1], height)
    batch = target_boxes.shape[0]
    return grid_x[:, None, :].expand(batch, height, width), grid_y[:, :, None].expand(batch, height, width)


def _bilinear_weights(out_size: int, in_size: int, device: torch.device) -> Tensor:
    """(out, in) float64 matrix of 1-D bilinear resizing with ``align_corners=False`` (as
    ``F.interpolate``); its rows sum to 1. The identity when the sizes agree."""
    if out_size == in_size:
        return torch.eye(in_size, dtype=torch.float64, device=device)
    source = ((torch.arange(out_size, dtype=torch.float64, device=device) + 0.5) * (in_size / out_size) - 0.5).clamp(min=0)
    low = source.floor().long().clamp(max=in_size - 1)
    high = (low + 1).clamp(max=in_size - 1)
    fraction = source - low
    rows = torch.arange(out_size, device=device)
    weights = torch.zeros(out_size, in_size, dtype=torch.float64, device=device)
    weights.index_put_((rows, low), 1.0 - fraction, accumulate=True)
    weights.index_put_((rows, high), fraction, accumulate=True)
    return weights


def _cam_box_fractions(
    cams: Tensor, partner: Tensor, target_boxes: Tensor, source_boxes: Tensor, height: int, width: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Own CAM mass inside the target box and partner CAM mass inside the source box, as fractions
    of each SnapMix-normalised (resized to H x W, minimum subtracted, divided by the sum) map, and
    whether each map has finite positive mass at all.

    Resizing is linear and separable, ``up = Uy @ cam @ Ux^T`` with rows of ``Uy``, ``Ux`` summing
    to 1, so box sums of ``up - min`` are taken on the small map in float64: the full-size map is
    formed only for its minimum."""
    maps = cams.float()
    h, w = maps.shape[-2:]
    uy = _bilinear_weights(height, h, maps.device)
    ux = _bilinear_weights(width, w, maps.device)
    full = maps if (h, w) == (height, width) else uy.float() @ maps @ ux.float().T
    shifted = maps.double() - full.amin(dim=(1, 2)).double()[:, None, None]

    def box_sums(small: Tensor, boxes: Tensor) -> Tensor:
        rows, cols = _box_indicators(boxes, height, width)
        return torch.einsum("bi,bij,bj->b", rows.double() @ uy, small, cols.double() @ ux)

    total = torch.einsum("i,bij,j->b", uy.sum(0), shifted, ux.sum(0))
    has_mass = torch.isfinite(total) & (total > 0)
    own = box_sums(shifted, target_boxes) / total
    partner_mass = box_sums(shifted[partner], source_boxes) / total[partner]
    return own.float(), partner_mass.float(), has_mass


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

    return _snapmix(images, targets, cams, partner, target_boxes, source_boxes, normalize_targets, shared_boxes=None)


def _snapmix(
    images: Tensor,
    targets: Tensor,
    cams: Tensor,
    partner: Tensor,
    target_boxes: Tensor,
    source_boxes: Tensor,
    normalize_targets: bool,
    shared_boxes: tuple[tuple[int, ...], tuple[int, ...]] | None,
) -> MixedBatch:
    """:func:`snapmix` on checked input; ``shared_boxes``, the (target, source) box of every row known
    on the host, pastes by slicing and resizing just the boxes."""
    batch, _, height, width = images.shape
    target_area = _box_area(target_boxes)
    active = (partner != torch.arange(batch, device=partner.device)) & (target_area > 0) & (_box_area(source_boxes) > 0)

    # resample in float32 (float64 images: float64): half-precision pixel coordinates are inexact past 256 px
    sample_dtype = torch.float64 if images.dtype == torch.float64 else torch.float32
    if shared_boxes is None:
        grid_x, grid_y = _box_to_box_grid(target_boxes, source_boxes, height, width, sample_dtype)
        patches = kornia.geometry.transform.remap(
            images[partner].to(sample_dtype), grid_x, grid_y, mode="bilinear", align_corners=True,
            normalized_coordinates=True,
        ).to(images.dtype)
        mixed = _paste(_box_masks(target_boxes, height, width) & active[:, None, None, None], patches, images)
    else:
        (tx1, ty1, tx2, ty2), (sx1, sy1, sx2, sy2) = shared_boxes
        mixed = images.clone()
        if tx2 > tx1 and ty2 > ty1 and sx2 > sx1 and sy2 > sy1:
            source = images[partner, :, sy1:sy2, sx1:sx2].to(sample_dtype)
            patch = F.interpolate(source, size=(ty2 - ty1, tx2 - tx1), mode="bilinear", align_corners=True)
            region = mixed[:, :, ty1:ty2, tx1:tx2]
            region.copy_(torch.where(active[:, None, None, None], patch.to(images.dtype), region))

    own_inside, partner_inside, has_mass = _cam_box_fractions(cams, partner, target_boxes, source_boxes, height, width)
    area_fraction = target_area.float() / (height * width)
    lam_a = torch.where(has_mass, 1.0 - own_inside, 1.0 - area_fraction).clamp(0.0, 1.0)
    lam_b = torch.where(has_mass[partner], partner_inside, area_fraction).clamp(0.0, 1.0)
    lam_a = torch.where(active, lam_a, 1.0)
    lam_b = torch.where(active, lam_b, 0.0)
    if normalize_targets:
        total = lam_a + lam_b
        some = total > 0
        safe_total = torch.where(some, total, torch.ones_like(total))
        lam_a = torch.where(some, lam_a / safe_total, 1.0 - area_fraction)
        lam_b = torch.where(some, lam_b / safe_total, area_fraction)
    return MixedBatch(
        mixed, _mix_targets(targets, partner, lam_a, lam_b), partner.long(), lam_a, lam_b, active,
        target_boxes.long(), source_boxes.long(),
    )


def _sample_beta(alpha: float, count: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
    """(count,) float32 draws of Beta(alpha, alpha), seeded by ``generator``.

    PyTorch's Dirichlet sampler (one kernel) where this torch has it; it is private API, so otherwise
    two Gamma draws with public ops: Beta = G1 / (G1 + G2)."""
    if hasattr(torch, "_sample_dirichlet"):
        concentration = torch.full((count, 2), alpha, device=device)
        return torch._sample_dirichlet(concentration, generator=generator)[:, 0]
    gammas = _sample_gamma(alpha, 2 * count, generator, device).view(count, 2)
    return gammas[:, 0] / gammas.sum(dim=1)


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


def _sample_boxes(lam: Tensor, height: int, width: int, generator: torch.Generator | None) -> Tensor:
    """CutMix boxes: side ``int(size * sqrt(1 - lam))`` around a uniform centre, clipped (as timm)."""
    ratio = torch.sqrt(1.0 - lam)
    count, device = lam.shape[0], lam.device
    boxes = []
    for size in (width, height):
        cut = (size * ratio).long()
        centre = torch.randint(0, size, (count,), generator=generator, device=device)
        boxes.append(((centre - cut // 2).clamp(0, size), (centre + (cut + 1) // 2).clamp(0, size)))
    (x1, x2), (y1, y2) = boxes
    return torch.stack([x1, y1, x2, y2], 1)


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
            setting). The draw is made on the host unless a CUDA ``generator`` is given, so the box
            is known without a device sync and only it is pasted.
        normalize_targets: snapmix only: rescale the two label weights to sum to 1.
        generator: optional ``torch.Generator`` for reproducible draws. Per-sample draws are made on
            its device (put it on the images' device to avoid a transfer), else on the images' device.

    Call: ``mixer(images (B, C, H, W) float, labels (B,) int or (B, K) float, cams (B, h, w) | None)``
    returns a :class:`MixedBatch`. ``cams`` is required for snapmix: the CAM of each clean image
    for its own label, e.g. from :class:`~cekd_losses.cam.FeatureTap`.

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
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"`generator` must be a torch.Generator or None, got {type(generator).__name__}")
        self.generator = generator

    def extra_repr(self) -> str:
        return (
            f"method={self.method!r}, num_classes={self.num_classes}, mix_alpha={self.mix_alpha}, p={self.p}, "
            f"label_smoothing={self.label_smoothing}, same_on_batch={self.same_on_batch}"
            + (", normalize_targets=True" if self.normalize_targets else "")
        )

    def soft_targets(self, labels: Tensor, batch: int) -> Tensor:
        """(B, K) float32 targets from (B,) class ids or (B, K) soft targets, label smoothing applied."""
        labels = _checks.check_tensor("labels", labels)
        if labels.ndim == 1:
            _checks.check_shape("labels", labels, (batch,))
            _checks.check_class_ids("labels", labels, self.num_classes)
            targets = torch.zeros(batch, self.num_classes, device=labels.device)
            targets.scatter_(1, labels.long()[:, None], 1.0)
        else:
            _checks.check_shape("labels", labels, (batch, self.num_classes))
            _checks.check_floating("labels", labels)
            targets = labels.float()
        if self.label_smoothing > 0:
            targets = targets * (1.0 - self.label_smoothing) + self.label_smoothing / self.num_classes
        return targets

    def forward(self, images: Tensor, labels: Tensor, cams: Tensor | None = None) -> MixedBatch:
        """Mix ``images`` (B, C, H, W) with ``labels`` (B,) ids or (B, K) soft targets; ``cams`` (B, h, w)
        for snapmix only. Returns the :class:`MixedBatch`.

        Runs outside any autocast region (its own precision rules hold under AMP), so a mix is the
        same with and without ``torch.autocast``."""
        images = _checks.check_images("images", images)
        with _checks.without_autocast(images.device):
            return self._mix(images, labels, cams)

    def _mix(self, images: Tensor, labels: Tensor, cams: Tensor | None) -> MixedBatch:
        batch, _, height, width = images.shape
        _checks.check_same_device("labels", _checks.check_tensor("labels", labels), "images", images)
        targets = self.soft_targets(labels, batch)
        if self.method == "snapmix" and cams is None:
            raise ValueError(
                "`cams` is required for snapmix: pass the (B, h, w) class activation map of each clean "
                "image for its own label, e.g. tap = FeatureTap(model); with torch.no_grad(): model(images); "
                "cams = tap.class_activation_maps(labels)"
            )
        if self.method != "snapmix" and cams is not None:
            raise ValueError(f"`cams` is used by method 'snapmix' only, got cams with method {self.method!r}")

        generator = self.generator
        # One shared draw is made on the host (as the SnapMix and CutMix reference code does), so its
        # box is known without a device sync and the kernels paste by slicing just that box.
        on_host = self.same_on_batch and (generator is None or generator.device.type == "cpu")
        device = generator.device if generator is not None else torch.device("cpu") if on_host else images.device
        draws = 1 if self.same_on_batch else batch
        apply = torch.rand(draws, generator=generator, device=device) < self.p
        partner = torch.randperm(batch, generator=generator, device=device)
        if self.method == "mixup":
            lam = _sample_beta(self.mix_alpha, draws, generator, device)
        else:
            target_boxes = _sample_boxes(_sample_beta(self.mix_alpha, draws, generator, device), height, width, generator)
            target_boxes = torch.where(apply[:, None], target_boxes, 0)
        if self.method == "snapmix":
            source_boxes = _sample_boxes(_sample_beta(self.mix_alpha, draws, generator, device), height, width, generator)
            source_boxes = torch.where(apply[:, None], source_boxes, 0)

        def to_batch(tensor: Tensor) -> Tensor:
            """Broadcast a shared draw over the batch and move it next to the images."""
            return tensor.expand(batch, *tensor.shape[1:]).to(images.device, non_blocking=True)

        apply = to_batch(apply)
        partner = torch.where(apply, partner.to(images.device, non_blocking=True), torch.arange(batch, device=images.device))
        if self.method == "mixup":
            return mixup(images, targets, partner, torch.where(apply, to_batch(lam), 1.0))
        shared_target = tuple(target_boxes[0].tolist()) if on_host else None
        if self.method == "cutmix":
            return _cutmix(images, targets, partner, to_batch(target_boxes), shared_target)
        cams = _checks.check_maps("cams", cams, (batch, "h", "w"))
        _checks.check_same_device("cams", cams, "images", images)
        shared = (tuple(target_boxes[0].tolist()), tuple(source_boxes[0].tolist())) if on_host else None
        return _snapmix(
            images, targets, cams, partner, to_batch(target_boxes), to_batch(source_boxes), self.normalize_targets, shared
        )
