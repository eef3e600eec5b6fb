"""FFL's fusion module (Kim et al., "Feature Fusion for Online Mutual Knowledge Distillation", 2019): a fused
classifier on the members' last feature maps."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _checks


class FeatureFusion(nn.Module):
    """A fused classifier on N members' last feature maps, as FFL's fusion module.

    The maps are concatenated along channels (N x C), then a depthwise 3x3 convolution (one filter per
    channel) + BatchNorm + ReLU and a pointwise 1x1 convolution (N x C -> C) + BatchNorm + ReLU fuse them,
    and global average pooling and a linear layer give the fused logits. Members that differ (a resnet18
    beside a mobilenet or a ConvNeXt) are aligned first: a map with another channel count than ``channels``
    goes through its own 1x1 convolution to ``channels``, and every map is average-pooled to the smallest
    height and width among them (adaptive pooling: an identity for the smallest map itself).

    Args:
        in_channels: the channel count of each member's map, N >= 2 entries (``tap.features.shape[1]`` of a
            :class:`~cekd_losses.FeatureTap`).
        num_classes: K, the fused classifier's classes.
        channels: C, the fused width (default: the first member's channels).

    Call: ``fusion([map_1, ..., map_N])`` with (B, C_i, H_i, W_i) maps -> (B, K) fused logits.

    Example:
        >>> fusion = FeatureFusion([512, 96], num_classes=5)
        >>> fusion([torch.rand(2, 512, 4, 4), torch.rand(2, 96, 8, 8)]).shape
        torch.Size([2, 5])
    """

    def __init__(self, in_channels: Sequence[int], num_classes: int, channels: int | None = None) -> None:
        super().__init__()
        if not isinstance(in_channels, (list, tuple)) or len(in_channels) < 2:
            raise ValueError(f"`in_channels` must list N >= 2 channel counts, one per member, got {in_channels!r}")
        counts = [_checks.check_positive_int("in_channels", c) for c in in_channels]
        _checks.check_positive_int("num_classes", num_classes)
        width = counts[0] if channels is None else _checks.check_positive_int("channels", channels)
        self.in_channels, self.channels = counts, width
        self.align = nn.ModuleList(nn.Identity() if c == width else nn.Conv2d(c, width, 1, bias=False) for c in counts)
        stacked = width * len(counts)
        self.depthwise = nn.Sequential(
            nn.Conv2d(stacked, stacked, 3, padding=1, groups=stacked, bias=False), nn.BatchNorm2d(stacked), nn.ReLU()
        )
        self.pointwise = nn.Sequential(nn.Conv2d(stacked, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.classifier = nn.Linear(width, num_classes)

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, channels={self.channels}"

    def forward(self, maps: Sequence[Tensor]) -> Tensor:
        """(B, K) fused logits of the N maps (B, C_i, H_i, W_i)."""
        if not isinstance(maps, (list, tuple)) or len(maps) != len(self.align):
            raise ValueError(f"`maps` must be a list of N = {len(self.align)} feature maps, got {type(maps).__name__}")
        for i, (features, count) in enumerate(zip(maps, self.in_channels, strict=True)):
            _checks.check_shape(f"maps[{i}]", features, (maps[0].shape[0], count, "H", "W"))
        size = (min(m.shape[-2] for m in maps), min(m.shape[-1] for m in maps))
        aligned = []
        for align, features in zip(self.align, maps, strict=True):
            features = align(features)
            aligned.append(features if features.shape[-2:] == size else F.adaptive_avg_pool2d(features, size))
        fused = self.pointwise(self.depthwise(torch.cat(aligned, dim=1)))
        logits: Tensor = self.classifier(fused.mean(dim=(2, 3)))
        return logits
