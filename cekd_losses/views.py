"""PeerViews: a different random view of the batch for every peer, made on the batch's device (PCL's per-peer
augmentation); :func:`~cekd_losses.replay` then gives every view the same mix."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from . import _checks

__all__ = ["PeerViews"]


def _reflected(positions: Tensor, size: int) -> Tensor:
    """Indices reflected into ``[0, size)`` (as ``F.pad(mode="reflect")``), for shifts below ``size``."""
    index = positions.abs()
    return torch.where(index >= size, 2 * (size - 1) - index, index)


class PeerViews(nn.Module):
    """N random views of a batch, one per peer: every sample of every view shifted by whole pixels, reflected at
    the border, and mirrored left-right at random unless ``flip=False``.

    Each view of each sample draws a shift of ``-max_shift`` to ``max_shift`` pixels along each axis (what
    padding by ``max_shift`` with reflection and cropping back does) and, with ``flip``, a left-right flip with
    probability 1/2. The pixels are copied, not resampled, so any dtype works (uint8 included) and a view of a
    shift of 0 is the image itself. The draws come from ``generator`` (on the images' device), so views are
    reproducible; no value is read back to the host. ``torch.compile(fullgraph=True)`` traces it without a
    generator only (a generator cannot enter a graph): call it outside a compiled region, as
    :func:`~cekd_losses.train_step` does.

    Args:
        views: N >= 1, the number of peers.
        max_shift: the largest shift in pixels, >= 0 (PCL's CIFAR crops: 4 of 32).
        flip: mirror left-right with probability 1/2 (leave it off where orientation is the class).
        generator: optional torch.Generator on the images' device.

    Call: ``views(images)`` with (B, C, H, W) images -> (N, B, C, H, W); with a mix, give peer i
    ``replay(batch, views_[i])`` of the :class:`~cekd_losses.MixedBatch` made from ``views_[0]``.

    Example:
        >>> views = PeerViews(3, max_shift=2, generator=torch.Generator().manual_seed(0))
        >>> views(torch.rand(4, 3, 8, 8)).shape
        torch.Size([3, 4, 3, 8, 8])
    """

    def __init__(
        self, views: int, max_shift: int = 4, flip: bool = True, generator: torch.Generator | None = None
    ) -> None:
        super().__init__()
        self.views = _checks.check_positive_int("views", views)
        if isinstance(max_shift, bool) or not isinstance(max_shift, int) or max_shift < 0:
            raise ValueError(f"`max_shift` must be an int >= 0 (pixels), got {max_shift!r}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"`generator` must be a torch.Generator or None, got {type(generator).__name__}")
        self.max_shift, self.flip, self.generator = max_shift, bool(flip), generator

    def extra_repr(self) -> str:
        return f"views={self.views}, max_shift={self.max_shift}, flip={self.flip}"

    def forward(self, images: Tensor) -> Tensor:
        """(N, B, C, H, W) views of the (B, C, H, W) ``images``."""
        images = _checks.check_shape("images", images, ("B", "C", "H", "W"))
        batch, channels, height, width = images.shape
        if self.max_shift >= min(height, width):
            raise ValueError(f"`max_shift` {self.max_shift} must be below the images' sides {height} x {width}")
        draws = torch.rand(self.views * batch, 3, 1, generator=self.generator, device=images.device)
        shifts = (draws[:, :2] * (2 * self.max_shift + 1)).floor().long() - self.max_shift  # (NB, 2, 1): y, x
        rows = _reflected(torch.arange(height, device=images.device) + shifts[:, 0], height)  # (NB, H)
        columns = torch.arange(width, device=images.device)
        if self.flip:
            columns = torch.where(draws[:, 2] < 0.5, width - 1 - columns, columns)  # (NB, W)
        columns = _reflected(columns + shifts[:, 1], width)
        index = (rows[:, :, None] * width + columns[:, None, :]).view(self.views, batch, 1, height * width)
        flat = images.flatten(2).expand(self.views, batch, channels, height * width)
        return flat.gather(3, index.expand(-1, -1, channels, -1)).view(self.views, batch, channels, height, width)
