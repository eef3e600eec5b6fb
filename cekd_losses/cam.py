"""Class activation maps (CAMs) and a feature tap that reads them from a model's normal forward.

A CAM (Zhou et al., 2016) is the classifier's score for one class evaluated at every position of
the last feature map: ``cam[b, y, x] = w[label_b] . F[b, :, y, x] + bias[label_b]``. For a model
that ends in global average pooling and a linear layer, its spatial mean is the class logit.
SnapMix uses CAMs normalised per image to a spatial distribution (minimum subtracted, then divided
by the sum) to measure how much of a class's evidence a box holds.
"""

from __future__ import annotations

from types import TracebackType
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _checks

__all__ = ["FeatureTap", "class_activation_maps", "find_classifier", "normalize_cams"]


def _check_size(size: object) -> tuple[int, int] | None:
    """``size`` as (H, W): None, an int (a square) or a pair of ints >= 1."""
    if size is None:
        return None
    pair = (size, size) if isinstance(size, int) and not isinstance(size, bool) else size
    if (not isinstance(pair, (tuple, list)) or len(pair) != 2
            or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in pair)):
        raise ValueError(f"`size` must be None, an int >= 1 or a pair (H, W) of ints >= 1, got {size!r}")
    return int(pair[0]), int(pair[1])


def normalize_cams(cams: Tensor, size: int | tuple[int, int] | None = None) -> Tensor:
    """Normalise CAMs per image as SnapMix does: subtract the minimum, divide by the sum.

    Args:
        cams: (B, h, w) floating maps, h, w >= 1.
        size: optional (H, W), or an int for a square, to resize to first (bilinear,
            ``align_corners=False``, as SnapMix).

    Returns:
        (B, H, W) float32 maps that are >= 0 and sum to 1 per image. A map with no finite positive
        mass after the minimum is subtracted (constant, or holding NaN/inf) has no evidence to
        distribute: it is returned as all zeros.

    Example:
        >>> normalize_cams(torch.tensor([[[1.0, 2.0], [3.0, 1.0]]]))
        tensor([[[0.0000, 0.3333],
                 [0.6667, 0.0000]]])
    """
    cams = _checks.check_maps("cams", cams, ("B", "h", "w"))
    size = _check_size(size)
    maps = cams.float()
    if size is not None and size != tuple(maps.shape[-2:]):
        maps = F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    shifted = maps - maps.amin(dim=(1, 2), keepdim=True)
    total = shifted.sum(dim=(1, 2), keepdim=True)
    valid = torch.isfinite(total) & (total > 0)
    return torch.where(valid, shifted / torch.where(valid, total, torch.ones_like(total)), 0.0)


def class_activation_maps(
    feature_maps: Tensor,
    classifier_weight: Tensor,
    labels: Tensor,
    classifier_bias: Tensor | None = None,
    size: int | tuple[int, int] | None = None,
) -> Tensor:
    """The CAM of each image for its own label, SnapMix-normalised (see :func:`normalize_cams`).

    Computed without gradient and in float32, whatever the input dtype.

    Args:
        feature_maps: (B, D, h, w) last feature map, the one the model pools before its linear head
            (h, w >= 1).
        classifier_weight: (K, D) weight of the linear head.
        labels: (B,) class id of each image.
        classifier_bias: optional (K,) bias of the head. It adds a constant per map, which the
            normalisation removes; accepted so raw and normalised CAMs come from one formula.
        size: optional (H, W) (or an int for a square), usually the image size, to upsample the maps to.

    Returns:
        (B, H, W) float32 maps, >= 0, each summing to 1 (all zeros where a map is flat).

    Example:
        >>> feats = torch.rand(2, 8, 7, 7)
        >>> head = torch.nn.Linear(8, 5)
        >>> cams = class_activation_maps(feats, head.weight, torch.tensor([0, 3]), head.bias, size=(32, 32))
        >>> cams.shape, cams.sum(dim=(1, 2)).round(decimals=4)
        (torch.Size([2, 32, 32]), tensor([1., 1.]))
    """
    feature_maps = _checks.check_maps("feature_maps", feature_maps, ("B", "D", "h", "w"))
    size = _check_size(size)
    batch, depth = feature_maps.shape[:2]
    _checks.check_shape("classifier_weight", classifier_weight, ("K", depth))
    num_classes = classifier_weight.shape[0]
    _checks.check_shape("labels", labels, (batch,))
    _checks.check_class_ids("labels", labels, num_classes)
    if classifier_bias is not None:
        _checks.check_shape("classifier_bias", classifier_bias, (num_classes,))
    with torch.no_grad():
        weights = classifier_weight.detach()[labels].float()
        maps = torch.einsum("bd,bdhw->bhw", weights, feature_maps.detach().float())
        if classifier_bias is not None:
            maps = maps + classifier_bias.detach()[labels].float()[:, None, None]
        return normalize_cams(maps, size)


def _find_pooling(model: nn.Module) -> nn.Module | None:
    """The global pooling module of a torchvision ResNet-style model or a timm model, if any."""
    for path in ("global_pool", "head.global_pool", "avgpool"):
        try:
            module = model.get_submodule(path)
        except AttributeError:
            continue
        return module
    return None


def find_classifier(model: nn.Module) -> nn.Linear | None:
    """The linear layer that produces ``model``'s logits, or None if it is not found.

    Looks at timm's ``get_classifier()``, then the attributes torchvision and timm models name their
    head: ``fc`` (ResNet, RegNet, ...), ``classifier`` (MobileNet, EfficientNet, ConvNeXt, VGG,
    DenseNet; the last linear layer of a sequential head), ``head`` (Swin, timm ViT) and ``heads``
    (torchvision ViT). One finder for the tap, the ensemble and the reproduction's head learning rate.

    Example:
        >>> import torchvision
        >>> find_classifier(torchvision.models.mobilenet_v3_small(num_classes=7)).out_features
        7
    """
    get_classifier = getattr(model, "get_classifier", None)  # timm models
    if callable(get_classifier):
        head = get_classifier()
        if isinstance(head, nn.Linear):
            return head
    for name in ("fc", "classifier", "head", "heads"):
        module = getattr(model, name, None)
        if isinstance(module, nn.Module):
            linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
            if linears:
                return linears[-1]
    return None


class FeatureTap:
    """Capture a model's last feature map and pooled features during its normal forward.

    Forward hooks record, on every forward of ``model``, the (B, D, h, w) feature map the model
    pools and the (B, D) pooled features its linear classifier receives: no second forward is run.

    Found automatically for torchvision ResNets (input of ``avgpool``, classifier ``fc``) and timm
    CNNs (input of ``global_pool`` or ``head.global_pool``, classifier ``get_classifier()``). For
    any other model, name ``feature_module`` (its *output* is the feature map) and ``classifier``
    (an ``nn.Linear``).

    The captured tensors keep their autograd graph (so pooled features can feed a trainable
    combiner); :meth:`class_activation_maps` detaches. Call :meth:`remove` (or use the tap as a
    context manager) to unhook.

    Example:
        >>> import torchvision
        >>> model = torchvision.models.resnet18(num_classes=10)
        >>> tap = FeatureTap(model)
        >>> images, labels = torch.rand(4, 3, 64, 64), torch.tensor([0, 1, 2, 3])
        >>> with torch.no_grad():
        ...     logits = model(images)
        >>> tap.features.shape, tap.pooled.shape
        (torch.Size([4, 512, 2, 2]), torch.Size([4, 512]))
        >>> tap.class_activation_maps(labels, size=(64, 64)).shape
        torch.Size([4, 64, 64])
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        feature_module: nn.Module | None = None,
        classifier: nn.Module | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
        head = classifier if classifier is not None else find_classifier(model)
        if head is None:
            raise ValueError(
                f"could not find the linear classifier of {type(model).__name__} (looked for timm's "
                "`get_classifier()`, `fc`, `classifier`, `head`, `heads`); pass classifier=<the nn.Linear "
                "that produces the logits>"
            )
        if not isinstance(head, nn.Linear):
            raise TypeError(
                "`classifier` must be the model's linear head (torch.nn.Linear), got "
                f"{type(head).__name__}; pass classifier=<the nn.Linear that produces the logits>"
            )
        self.model = model
        self.classifier: nn.Linear = head
        self._features: Tensor | None = None
        self._pooled: Tensor | None = None
        if feature_module is not None:
            if not isinstance(feature_module, nn.Module):
                raise TypeError(
                    f"`feature_module` must be a torch.nn.Module, got {type(feature_module).__name__}"
                )
            feature_hook = feature_module.register_forward_hook(self._save_output)
        else:
            pooling = _find_pooling(model)
            if pooling is None:
                raise ValueError(
                    f"could not find the global pooling layer of {type(model).__name__} (looked for "
                    "`global_pool`, `head.global_pool`, `avgpool`); pass feature_module=<the module "
                    "whose output is the last (B, D, h, w) feature map>"
                )
            feature_hook = pooling.register_forward_pre_hook(self._save_pool_input)
        self._handles = [feature_hook, head.register_forward_pre_hook(self._save_classifier_input)]

    def _save_output(self, module: nn.Module, inputs: Any, output: Tensor) -> None:
        self._features = output

    def _save_pool_input(self, module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
        self._features = inputs[0]

    def _save_classifier_input(self, module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
        self._pooled = inputs[0]

    @property
    def features(self) -> Tensor:
        """(B, D, h, w) feature map of the last forward."""
        if self._features is None:
            raise RuntimeError("FeatureTap has captured nothing yet: run a forward of the model first")
        return self._features

    @property
    def pooled(self) -> Tensor:
        """(B, D) features the linear classifier received in the last forward."""
        if self._pooled is None:
            raise RuntimeError("FeatureTap has captured nothing yet: run a forward of the model first")
        return self._pooled

    def class_activation_maps(self, labels: Tensor, size: int | tuple[int, int] | None = None) -> Tensor:
        """(B, H, W) normalised CAMs of the last forward for ``labels`` (B,); see :func:`class_activation_maps`."""
        features = self.features
        if features.ndim != 4:
            raise ValueError(
                f"the tapped feature map must have shape (B, D, h, w), got shape {tuple(features.shape)}; "
                "pass feature_module=<a module whose output is a spatial feature map>"
            )
        if features.shape[1] != self.classifier.in_features:
            raise ValueError(
                f"the classifier {self.classifier} does not read the tapped feature map ({features.shape[1]} "
                "channels): the model's head has hidden layers between pooling and logits, so its class "
                "activation map is not a linear read-out; pass feature_module= and classifier= that match"
            )
        return class_activation_maps(features, self.classifier.weight, labels, self.classifier.bias, size)

    def cams(
        self, images: Tensor, labels: Tensor, *, size: int | tuple[int, int] | None = None, eval_mode: bool = False
    ) -> Tensor:
        """SnapMix's CAMs in one call: a no-grad forward of the tapped model on ``images``, then the
        normalised CAM of each image for its label, (B, h, w) at the feature map's size (what
        :class:`~cekd_losses.MixingAugmenter` takes; it resizes them itself) or (B, H, W) with ``size``.

        ``eval_mode`` decides what BatchNorm does in that extra forward. False (default, as the SnapMix
        reference code): the model runs in its current mode, so during training BatchNorm normalises
        with the clean batch's statistics and updates its running statistics a second time per step.
        True: the forward runs in eval mode (running statistics used and left alone, dropout off) and
        every module's mode is restored afterwards.

        Example:
            >>> import torchvision
            >>> model = torchvision.models.resnet18(num_classes=10)
            >>> tap = FeatureTap(model)
            >>> tap.cams(torch.rand(4, 3, 64, 64), torch.tensor([0, 1, 2, 3]), eval_mode=True).shape
            torch.Size([4, 2, 2])
        """
        images = _checks.check_images("images", images)
        modes = {module: module.training for module in self.model.modules()} if eval_mode else {}
        try:
            if eval_mode:
                self.model.eval()
            with torch.no_grad():
                self.model(images)
        finally:
            for module, training in modes.items():
                module.training = training
        return self.class_activation_maps(labels, size)

    def remove(self) -> None:
        """Unhook from the model and drop the captured tensors."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._features = self._pooled = None

    def __enter__(self) -> FeatureTap:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.remove()
