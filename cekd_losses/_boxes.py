"""Box geometry of the mixing core (an internal API): corners from the random draws, clipping, pixel masks and
the sampling grid of SnapMix's resized paste.

A box is held as float ``corners`` ``[[x1, y1], [x2, y2]]`` of shape (..., 2, 2), integer-valued, ``x2`` and
``y2`` exclusive; its public form is the (B, 4) int64 ``(x1, y1, x2, y2)`` of :class:`~cekd_losses.MixedBatch`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ._constants import cached


class Limits(NamedTuple):
    """An image's limits per axis ``[x, y]`` (``clamp`` takes tensor bounds on both sides or on neither)."""

    low: Tensor  # (2,) float32 zeros
    high: Tensor  # (2,) float32 [W, H]
    sides: Tensor  # (2,) int64 [W, H]


@cached(maxsize=64)
def image_limits(height: int, width: int, device: torch.device) -> Limits:
    """The :class:`Limits` of an H x W image."""
    high = torch.tensor([width, height], dtype=torch.float32, device=device)
    return Limits(torch.zeros(2, device=device), high, high.long())


@cached(maxsize=64)
def _pixel_positions(length: int, device: torch.device) -> Tensor:
    return torch.arange(length, dtype=torch.float32, device=device)


@cached(maxsize=8)
def _half_sides(device: torch.device) -> Tensor:
    return torch.tensor([[-0.5], [0.5]], device=device)  # corner offsets from a box's centre, in sides


def corners_from_draws(side_draws: Tensor, centres: Tensor, height: int, width: int) -> Tensor:
    """(n, k, 2, 2) corners of k boxes per sample, not yet clipped, from (n, k, 1, 1) draws ``u`` in [0, 1] and
    (n, k, 1, 2) centres: sides ``floor(size * sqrt(u))`` about the centre (timm's CutMix box, with ``u`` in the
    place of ``1 - lam``: the Beta(alpha, alpha) law is symmetric). Centres are float32 pixels, or int64 draws in
    [0, 2**62) reduced here modulo each side."""
    limits = image_limits(height, width, side_draws.device)
    lengths = (limits.high * side_draws.sqrt()).floor()  # (n, k, 1, 2)
    if centres.dtype == torch.int64:
        centres = centres % limits.sides
    return torch.addcmul(centres, lengths, _half_sides(side_draws.device)).ceil()


def clipped(corners: Tensor, height: int, width: int) -> Tensor:
    """(..., 2, 2) float32 corners clipped to the image."""
    limits = image_limits(height, width, corners.device)
    return corners.clamp(min=limits.low, max=limits.high)


def integer_boxes(corners: Tensor, height: int, width: int, batch: int) -> Tensor:
    """(B, 4) int64 ``(x1, y1, x2, y2)`` of (B or 1, 2, 2) corners, clipped and expanded to the batch."""
    return clipped(corners, height, width).flatten(-2).long().expand(batch, 4)


def box_masks(corners: Tensor, height: int, width: int) -> Tensor:
    """(..., H, W) bool masks, True inside the boxes of (..., 2, 2) corners; corners past the image clip
    implicitly. Each axis is marked ``lo <= i < hi`` as ``(i >= lo) xor (i >= hi)`` (one comparison for both
    corners, since ``lo <= hi``), and a mask is the outer product of its rows' and columns' marks."""
    positions = _pixel_positions(max(height, width), corners.device)  # (L,)
    past_low, past_high = (positions >= corners.unsqueeze(-1)).unbind(-3)  # (..., 2 axes, L) each
    columns, rows = (past_low ^ past_high).unbind(-2)  # (..., L) each
    return rows[..., :height].unsqueeze(-1) & columns[..., :width].unsqueeze(-2)


@cached(maxsize=16)
def grid_steps(height: int, width: int, device: torch.device) -> Tensor:
    """(2,) ``[k_x, k_y]``: pixel p sits at ``p * k - 1`` in ``grid_sample``'s coordinates (``align_corners=True``),
    ``k = 2 / (size - 1)`` (2 for a one-pixel side)."""
    return torch.tensor([2.0 / max(width - 1, 1), 2.0 / max(height - 1, 1)], device=device)


@cached(maxsize=16)
def scaled_pixel_grid(height: int, width: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """(H, W, 2) ``(x * k_x, y * k_y)`` at each pixel (``k``: :func:`grid_steps`), in ``dtype``."""
    step = grid_steps(height, width, device).to(dtype)
    x = torch.arange(width, dtype=dtype, device=device) * step[0]
    y = torch.arange(height, dtype=dtype, device=device) * step[1]
    return torch.stack([x.expand(height, width), y[:, None].expand(height, width)], dim=-1)
