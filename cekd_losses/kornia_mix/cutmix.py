"""CutMix as a Kornia augmentation: :class:`RandomCutMix`, a drop-in for ``kornia.augmentation.RandomCutMixV2``."""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import Tensor

from .. import _checks
from .._constants import cached
from ..kernels import paste_boxes
from .base import KorniaMix, MixParameterGenerator, Params


class CutMixGenerator(MixParameterGenerator):
    def __init__(self, mix_alpha: float, p_batch: float, cut_size: tuple[float, float] | None, generator: Any):
        super().__init__("cutmix", mix_alpha, p_batch, generator, None if cut_size is None else self._clamp)
        self.cut_size = cut_size

    def __repr__(self) -> str:
        return f"cut_size={self.cut_size}, beta={None if self.mix_alpha == 1.0 else self.mix_alpha}, num_mix=1"

    def _clamp(self, lam: Tensor) -> Tensor:
        """The box-area draws ``u`` -> ``1 - clamp(1 - u, min, max)``, Kornia's clamp of ``lambda = 1 - u``."""
        assert self.cut_size is not None
        low, high = self.cut_size
        return lam.clamp(1.0 - high, 1.0 - low)

    def kornia_keys(self, params: Params, height: int, width: int) -> Params:
        """Kornia's ``crop_src``: (1, B, 4, 2) vertices ``(x1, y1), (x2 - 1, y1), (x2 - 1, y2 - 1), (x1, y2 - 1)``
        of the boxes, and ``image_shape`` (H, W)."""
        index, offset, shape = _vertex_table(height, width, params["mix_pairs"].device)
        corners = params["mix_boxes"][:, 0].float()  # (B, 4): x1, y1, x2, y2
        return {"crop_src": (corners.index_select(1, index) - offset).view(1, -1, 4, 2), "image_shape": shape}


@cached(maxsize=16)
def _vertex_table(height: int, width: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Which of ``(x1, y1, x2, y2)`` each of ``crop_src``'s 8 coordinates takes, less what, and (H, W)."""
    return (
        torch.tensor([0, 1, 2, 1, 2, 3, 0, 3], device=device),
        torch.tensor([0.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0, 1.0], device=device),
        torch.tensor([float(height), float(width)], device=device),
    )


class RandomCutMix(KorniaMix):
    """CutMix as a Kornia augmentation, a drop-in for ``kornia.augmentation.RandomCutMixV2`` (one mix).

    Every image draws its own box (side ``size * sqrt(u)``, ``u ~ Beta(mix_alpha, mix_alpha)``, around a uniform
    centre, clipped) and a partner, whose pixels it receives inside the box. Kornia's ``cut_size=(min, max)``
    clamps its ``lambda = 1 - u`` into the range (a larger ``cut_size``, a smaller cut), as Kornia.

    Args:
        num_mix: 1 (Kornia's several sequential cuts are refused: a later cut may cover an earlier one, so the
            label rows would no longer be the pixel shares).
        mix_alpha: Beta parameter of the box sizes, > 0 (Kornia's ``beta``).
        same_on_batch: one box for the whole batch.
        p: probability of mixing the batch (a batch-wide gate, as Kornia's mix classes).
        keepdim: keep the input's rank.
        data_keys: Kornia's; ``["input", "class"]`` returns ``[images, labels]``.
        use_correct_lambda: as Kornia: False (its default) gives ``lam`` = the partner's pixel share, True
            ``1 -`` that, the image's own share. Either is exact.
        cut_size: Kornia's ``(min, max)`` clamp of ``lambda``, within [0, 1] with ``min < 1`` (keyword).
        beta: Kornia's name for ``mix_alpha`` (keyword; give one of them).
        generator: optional ``torch.Generator`` for reproducible draws.

    Labels: (1, B, 3) rows ``[label, partner label, lam]``; a batch the gate leaves alone has rows
    ``[label, label, 0]`` (either ``use_correct_lambda``, as Kornia). ``_params`` also holds Kornia's
    ``crop_src`` (1, B, 4, 2) box vertices (inclusive pixels, clockwise from the top left) and ``image_shape``;
    its ``mix_pairs`` is (B,) where Kornia's is (num_mix, B).

    Example:
        >>> aug = RandomCutMix(data_keys=["input", "class"], generator=torch.Generator().manual_seed(0))
        >>> images, labels = aug(torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 3]))
        >>> labels.shape
        torch.Size([1, 4, 3])
    """

    def __init__(
        self,
        num_mix: int = 1,
        mix_alpha: float = 1.0,
        same_on_batch: bool = False,
        p: float = 1.0,
        keepdim: bool = False,
        data_keys: list[Any] | None = None,
        use_correct_lambda: bool = False,
        *,
        cut_size: tuple[float, float] | Tensor | None = None,
        beta: float | Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        if num_mix != 1:
            raise ValueError(
                f"`num_mix` must be 1 (one box per image), got {num_mix!r}: Kornia's later cuts paste over the "
                "earlier ones while each label row keeps its whole cut's area, so the rows would no longer be "
                "the pixel shares that this class's labels are exact to"
            )
        mix_alpha = _beta_or_mix_alpha(beta, mix_alpha)
        p = _checks.check_in_range("p", p, 0.0, 1.0)
        interval = None if cut_size is None else _checks.check_interval("cut_size", cut_size, 0.0, 1.0)
        if interval is not None and interval[0] >= 1.0:
            raise ValueError(
                f"`cut_size` minimum must be < 1: it clamps lambda, and lambda = 1 cuts nothing, got {cut_size!r}"
            )
        super().__init__(CutMixGenerator(mix_alpha, p, interval, generator), same_on_batch, p, keepdim, data_keys)
        self.use_correct_lambda = bool(use_correct_lambda)

    @property
    def cut_size(self) -> tuple[float, float] | None:
        """Kornia's ``(min, max)`` clamp of ``lambda``, or None."""
        return cast(CutMixGenerator, self._param_generator).cut_size

    def apply_transform(self, input: Tensor, params: Params, flags: dict[str, Any]) -> Tensor:
        partner = params["mix_pairs"].to(input.device, non_blocking=True)
        corners = params["mix_boxes"].to(input.device, non_blocking=True).float().view(-1, 1, 2, 2)
        return paste_boxes(input, partner, corners)[0]

    def apply_transform_class(self, input: Tensor, params: Params, flags: dict[str, Any]) -> Tensor:
        own, partner, _ = self._pairing(input, params)
        boxes = params["mix_boxes"][:, 0].to(own.device, non_blocking=True)  # (B, 4), clipped
        area = (boxes[:, 2:] - boxes[:, :2]).prod(dim=1)
        share = area.to(own.dtype) / params["image_shape"].to(own.device, own.dtype, non_blocking=True).prod()
        if self.use_correct_lambda:  # the image's own share; as Kornia, 0 where the gate left the batch alone
            share = (1.0 - share) * params["batch_prob"].to(own.device, own.dtype, non_blocking=True)
        return torch.stack([own, partner, share], dim=-1)[None]

    def apply_non_transform_class(self, input: Tensor, params: Params, flags: dict[str, Any]) -> Tensor:
        return self._unmixed_rows(input, params, [0.0])[None]


def _beta_or_mix_alpha(beta: float | Tensor | None, mix_alpha: float) -> float:
    """The Beta parameter from Kornia's ``beta`` or this library's ``mix_alpha`` (one of them may be given)."""
    if beta is None:
        return _checks.check_positive("mix_alpha", mix_alpha)
    if mix_alpha != 1.0:
        raise ValueError(
            f"`beta` is Kornia's name for `mix_alpha`: give one, got beta={beta!r} and mix_alpha={mix_alpha!r}"
        )
    return _checks.check_positive("beta", float(beta) if isinstance(beta, Tensor) else beta)
