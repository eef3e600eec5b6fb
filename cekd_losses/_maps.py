"""Resizing class activation maps, shared by :func:`~cekd_losses.normalize_cams` and the SnapMix kernel (an
internal API)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def resized_maps(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """(B, C, H, W) float32 maps: (B, C, h, w) ``maps`` resized bilinearly to ``size`` (``align_corners=False``,
    as SnapMix), or only made float32 where the size already matches."""
    maps = maps.float()
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps, size=size, mode="bilinear", align_corners=False)
