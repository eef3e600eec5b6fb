"""SnapMix as a Kornia augmentation: :class:`RandomSnapMix`, its CAMs from a bound :class:`~cekd_losses.FeatureTap`."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .. import _checks
from ..cam import FeatureTap
from ..kernels import paste_resized, snap_boxes, snapmix_weights
from .base import KorniaMix, MixParameterGenerator, Params


class RandomSnapMix(KorniaMix):
    """SnapMix (Huang et al., AAAI 2021) as a Kornia augmentation.

    Every image draws a target box and an independent box of its partner (sides from ``Beta(mix_alpha,
    mix_alpha)``); the partner's box is resized into the target box, and the labels are weighed by class
    activation maps (see :func:`~cekd_losses.snapmix`).

    The maps come from ``tap``, a :class:`~cekd_losses.FeatureTap` of the model being trained, bound here at
    construction: the call stays Kornia's ``aug(images, labels)``, so the augmentation fits an
    ``AugmentationSequential`` or any loop written for Kornia's mix classes, and the CAMs are those of the
    images as they reach the mixer (after the pipeline's other augmentations). Each call runs one no-grad
    forward of the tapped model on the clean images (``tap.cams(images, labels, eval_mode=eval_mode_cams)``);
    their label weights are part of the draw (``_params["mix_weights"]``), so a replay through ``params=``
    gives another view the same rows.

    Args:
        tap: the :class:`~cekd_losses.FeatureTap` whose model gives the CAMs.
        mix_alpha: Beta parameter of the box sizes, > 0 (the SnapMix code base uses 5).
        same_on_batch: one pair of boxes for the whole batch (the SnapMix code base's setting).
        p: probability of mixing the batch (a batch-wide gate, as Kornia's mix classes).
        keepdim: keep the input's rank.
        data_keys: must include ``"input"`` and ``"class"``: the CAMs need the labels.
        eval_mode_cams: run the CAM forward in eval mode (BatchNorm statistics left alone).
        generator: optional ``torch.Generator`` for reproducible draws.

    Labels: (B, 4) rows ``[label, partner label, lam_a, lam_b]``; :func:`kornia_soft_targets` makes the
    (B, K) targets ``lam_a * onehot(label) + lam_b * onehot(partner label)``.

    Example:
        >>> import torchvision
        >>> from cekd_losses import kornia_soft_targets
        >>> model = torchvision.models.resnet18(num_classes=5)
        >>> aug = RandomSnapMix(FeatureTap(model), data_keys=["input", "class"])
        >>> images, labels = aug(torch.rand(4, 3, 64, 64), torch.tensor([0, 1, 2, 3]))
        >>> labels.shape, kornia_soft_targets(labels, 5).shape
        (torch.Size([4, 4]), torch.Size([4, 5]))
    """

    def __init__(
        self,
        tap: FeatureTap,
        mix_alpha: float = 5.0,
        same_on_batch: bool = False,
        p: float = 1.0,
        keepdim: bool = False,
        data_keys: list[Any] | None = None,
        eval_mode_cams: bool = False,
        *,
        generator: torch.Generator | None = None,
    ) -> None:
        if not isinstance(tap, FeatureTap):
            raise TypeError(f"`tap` must be a FeatureTap of the model being trained, got {type(tap).__name__}")
        mix_alpha, p = _checks.check_positive("mix_alpha", mix_alpha), _checks.check_in_range("p", p, 0.0, 1.0)
        super().__init__(SnapMixGenerator(mix_alpha, p, generator), same_on_batch, p, keepdim, data_keys)
        self.tap = tap
        self.flags = {"eval_mode_cams": bool(eval_mode_cams)}  # Kornia's static settings, printed by its repr

    @property
    def eval_mode_cams(self) -> bool:
        """Whether the CAM forward runs in eval mode."""
        return bool(self.flags["eval_mode_cams"])

    def _with_weights(self, params: Params, images: Tensor, labels: Tensor | None) -> Params:
        """The draw with ``mix_weights`` (B, 2): ``lam_a``, ``lam_b`` from the CAMs of the clean images."""
        if labels is None:
            raise ValueError("RandomSnapMix needs the labels for its CAMs: data_keys=['input', 'class']")
        cams = self.tap.cams(images, labels, eval_mode=self.eval_mode_cams)
        partner = params["mix_pairs"]
        with _checks.without_autocast(images.device):
            boxes = snap_boxes(params["mix_boxes"].float().view(-1, 2, 2, 2), partner, *images.shape[-2:])
            weights = torch.cat(snapmix_weights(cams, partner, boxes.masks, normalize=False), dim=1)
        return {**params, "mix_weights": weights.to(params["mix_lambdas"].dtype)}

    def apply_transform(self, input: Tensor, params: Params, flags: dict[str, Any]) -> Tensor:
        partner = params["mix_pairs"].to(input.device, non_blocking=True)
        corners = params["mix_boxes"].to(input.device, non_blocking=True).float().view(-1, 2, 2, 2)
        boxes = snap_boxes(corners, partner, *input.shape[-2:])
        return paste_resized(input, partner, boxes.corners, boxes.masks[:, :1])

    def apply_transform_class(self, input: Tensor, params: Params, flags: dict[str, Any]) -> Tensor:
        own, partner, _ = self._pairing(input, params)
        if "mix_weights" not in params:
            raise ValueError(
                "RandomSnapMix's label rows take the CAM weights of a call (params['mix_weights']); replay the "
                "params of a call, aug._params, rather than a bare forward_parameters() draw"
            )
        weights = params["mix_weights"].to(own.device, own.dtype, non_blocking=True)
        return torch.cat([own[:, None], partner[:, None], weights], dim=-1)

    def apply_non_transform_class(self, input: Tensor, params: Params, flags: dict[str, Any]) -> Tensor:
        return self._unmixed_rows(input, params, [1.0, 0.0])


class SnapMixGenerator(MixParameterGenerator):
    def __init__(self, mix_alpha: float, p_batch: float, generator: Any):
        super().__init__("snapmix", mix_alpha, p_batch, generator)

    def __repr__(self) -> str:
        return f"mix_alpha={self.mix_alpha}"
