"""MixUp as a Kornia augmentation: :class:`RandomMixUp`, a drop-in for ``kornia.augmentation.RandomMixUpV2``."""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import Tensor

from .. import _checks
from .base import KorniaMix, MixParameterGenerator, Params


class MixUpGenerator(MixParameterGenerator):
    def __init__(self, mix_alpha: float, p_batch: float, lambda_val: tuple[float, float] | None, generator: Any):
        super().__init__("mixup", mix_alpha, p_batch, generator, None if lambda_val is None else self._uniform)
        self.lambda_val = lambda_val

    def __repr__(self) -> str:
        return f"lambda_val={self.lambda_val}" + (f", mix_alpha={self.mix_alpha}" if self.mix_alpha != 1.0 else "")

    def _uniform(self, lam: Tensor) -> Tensor:
        """Uniform(0, 1) draws of the image's own weight -> its own weight when the partner's is Uniform(min, max)."""
        assert self.lambda_val is not None
        low, high = self.lambda_val
        return lam * (high - low) + (1.0 - high)

    def _lambdas(self, lam: Tensor, dtype: torch.dtype) -> Tensor:
        return lam.to(dtype)  # rounded as the pixels' blend rounds it, so the rows match the pixels exactly

    def kornia_keys(self, params: Params, height: int, width: int) -> Params:
        """Kornia's ``mixup_pairs`` (B,) and ``mixup_lambdas`` (B,): the partner's weight, 0 where unmixed."""
        return {"mixup_pairs": params["mix_pairs"], "mixup_lambdas": 1.0 - params["mix_lambdas"][:, 0]}


class RandomMixUp(KorniaMix):
    """MixUp as a Kornia augmentation, a drop-in for ``kornia.augmentation.RandomMixUpV2``.

    Every image draws its own ``lam ~ Beta(mix_alpha, mix_alpha)`` (Uniform(0, 1) at the default 1, Kornia's
    default ``lambda_val``; ``lambda_val=(min, max)`` draws it from Uniform(min, max) as Kornia) and a partner
    from a permutation of the batch: ``out = (1 - lam) x + lam x[partner]`` (``lam`` rounded to the image dtype,
    so labels match pixels exactly).

    Args:
        mix_alpha: Beta parameter of the lambdas, > 0.
        same_on_batch: one lambda for the whole batch.
        p: probability of mixing the batch (a batch-wide gate, as Kornia's mix classes).
        keepdim: keep the input's rank (Kornia's convention).
        data_keys: Kornia's; ``["input", "class"]`` returns ``[images, labels]``.
        lambda_val: Kornia's ``(min, max)`` range of ``lam``, within [0, 1] (keyword; with the default
            ``mix_alpha`` only).
        generator: optional ``torch.Generator`` for reproducible draws.

    Labels: (B, 3) rows ``[label, partner label, lam]``, floats in the image dtype (float32 for half images);
    a batch the gate leaves alone has rows ``[label, label, 0]``. ``_params`` also holds Kornia's
    ``mixup_pairs`` (B,) and ``mixup_lambdas`` (B,) (the partner's weight, 0 where unmixed).

    Example:
        >>> aug = RandomMixUp(data_keys=["input", "class"], generator=torch.Generator().manual_seed(0))
        >>> images, labels = aug(torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 3]))
        >>> images.shape, labels.shape
        (torch.Size([4, 3, 8, 8]), torch.Size([4, 3]))
    """

    def __init__(
        self,
        mix_alpha: float = 1.0,
        same_on_batch: bool = False,
        p: float = 1.0,
        keepdim: bool = False,
        data_keys: list[Any] | None = None,
        *,
        lambda_val: tuple[float, float] | Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        if lambda_val is not None and mix_alpha != 1.0:
            raise ValueError(
                "`lambda_val` draws lam from Uniform(min, max) as Kornia, which is Beta(1, 1) rescaled: give it with "
                f"the default mix_alpha=1.0, got mix_alpha={mix_alpha!r}"
            )
        mix_alpha, p = _checks.check_positive("mix_alpha", mix_alpha), _checks.check_in_range("p", p, 0.0, 1.0)
        interval = None if lambda_val is None else _checks.check_interval("lambda_val", lambda_val, 0.0, 1.0)
        super().__init__(MixUpGenerator(mix_alpha, p, interval, generator), same_on_batch, p, keepdim, data_keys)

    @property
    def lambda_val(self) -> tuple[float, float] | None:
        """Kornia's ``(min, max)`` range of ``lam``, or None."""
        return cast(MixUpGenerator, self._param_generator).lambda_val

    def apply_transform(self, input: Tensor, params: Params, flags: dict[str, Any]) -> Tensor:
        partner = params["mix_pairs"].to(input.device, non_blocking=True)
        own_weight = params["mix_lambdas"][:, :1].to(input.device, input.dtype, non_blocking=True)
        return torch.lerp(input.index_select(0, partner), input, own_weight.view(-1, 1, 1, 1))

    def apply_transform_class(self, input: Tensor, params: Params, flags: dict[str, Any]) -> Tensor:
        own, partner, _ = self._pairing(input, params)
        lam = 1.0 - params["mix_lambdas"][:, 0].to(own.device, non_blocking=True)
        return torch.stack([own, partner, lam], dim=-1)

    def apply_non_transform_class(self, input: Tensor, params: Params, flags: dict[str, Any]) -> Tensor:
        return self._unmixed_rows(input, params, [0.0])
