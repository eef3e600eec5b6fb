"""Class activation maps (CAMs) and a feature tap that reads them from a model's normal forward.

A CAM (Zhou et al., 2016) is the classifier's score for one class evaluated at every position of
the last feature map: ``cam[b, y, x] = w[label_b] . F[b, :, y, x] + bias[label_b]``. For a model
that ends in global average pooling and a linear layer, its spatial mean is the logit.
SnapMix uses CAMs normalised per image to a spatial distribution (minimum subtracted, then divided
by the sum) to measure how much of a class's evidence a box holds.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from types import TracebackType
from typing import Any

import torch
from torch import Tensor, nn

from . import _checks
from ._maps import resized_maps
from ._sites import FeatureSite, feature_map, find_feature_site, uniform_features

__all__ = ["FeatureTap", "find_classifier", "normalize_cams"]


def _check_size(size: object) -> tuple[int, int] | None:
    """``size`` as (H, W): None, an int (a square) or a pair of ints >= 1."""
    if size is None:
        return None
    pair = (size, size) if isinstance(size, int) and not isinstance(size, bool) else size
    if (
        not isinstance(pair, (tuple, list))
        or len(pair) != 2
        or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in pair)
    ):
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
    maps = cams.float() if size is None else resized_maps(cams[:, None], size)[:, 0]
    shifted = maps - maps.amin(dim=(1, 2), keepdim=True)
    total = shifted.sum(dim=(1, 2), keepdim=True)
    valid = torch.isfinite(total) & (total > 0)
    return torch.where(valid, shifted / torch.where(valid, total, torch.ones_like(total)), 0.0)


def _linear_cams(
    feature_maps: Tensor,
    classifier_weight: Tensor,
    labels: Tensor,
    classifier_bias: Tensor | None = None,
) -> Tensor:
    """Raw (B, h, w) float32 CAMs ``w[label] . F + b`` of a (B, D, h, w) feature map and a (K, D) linear head,
    without gradient (the read-out of :meth:`FeatureTap.cams` for a named ``feature_module``)."""
    feature_maps = _checks.check_maps("feature_maps", feature_maps, ("B", "D", "h", "w"))
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
        return maps


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


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """The model in eval mode inside the block; every module's own mode restored after."""
    modes = {module: module.training for module in model.modules()}
    try:
        model.eval()
        yield
    finally:
        for module, training in modes.items():
            module.training = training


def _linear_head(model: nn.Module, classifier: nn.Module | None) -> nn.Linear:
    """The given ``classifier``, or the one :func:`find_classifier` finds, checked to be a linear layer."""
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
    return head


def _no_feature_map(model: nn.Module) -> ValueError:
    return ValueError(
        f"could not find the last feature map of {type(model).__name__} (found for timm models and "
        "torchvision classifiers with `avgpool` or a class token); pass feature_module=<the module "
        "whose output is the last (B, D, h, w) feature map> and classifier=<its linear head>"
    )


class FeatureTap:
    """Capture a model's last feature map and pooled features during its normal forward; read CAMs.

    :meth:`cams` is the one way to get class activation maps (a no-grad forward on the clean images,
    then the read-out below). Forward hooks record, on every forward of ``model``, its last feature map
    (:attr:`features`) and the (B, D) pooled features its linear classifier receives (:attr:`pooled`),
    which a gate or linear :class:`~cekd_losses.CollaborativeEnsemble` reads: no second forward is run.
    Found automatically for timm models (CNNs, NHWC models such as Swin, and token models such as ViT
    and DeiT) and torchvision classifiers with an ``avgpool`` layer (ResNet, RegNet, EfficientNet,
    MobileNet v3, ConvNeXt, VGG, Swin) or a class token (ViT); see :doc:`/models`.

    The CAM of a position is the model's own head (its pooling, normalisation and classifier) applied
    to a feature map holding that position's features everywhere: ``w[label] . F[:, y, x] + b`` for
    global average pooling and a linear layer (Zhou et al., 2016), whose spatial mean is the logit;
    the head applied to each normalised patch token for a token model (class and register tokens
    dropped). The head runs in eval mode (no dropout), without gradient.

    For a custom model name ``feature_module`` (its *output* is the (B, D, h, w) feature map) and
    ``classifier`` (the ``nn.Linear`` that reads its pooled features): the CAM is then the linear
    read-out ``w[label] . F + b``.

    The captured tensors keep their autograd graph (so pooled features can feed a trainable
    combiner); CAMs are detached. Call :meth:`remove` (or use the tap as a context manager) to unhook.

    Example:
        >>> import torchvision
        >>> model = torchvision.models.resnet18(num_classes=10)
        >>> tap = FeatureTap(model)
        >>> images, labels = torch.rand(4, 3, 64, 64), torch.tensor([0, 1, 2, 3])
        >>> with torch.no_grad():
        ...     logits = model(images)
        >>> tap.features.shape, tap.pooled.shape
        (torch.Size([4, 512, 2, 2]), torch.Size([4, 512]))
        >>> tap.cams(images, labels, size=(64, 64)).shape
        torch.Size([4, 64, 64])
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        feature_module: nn.Module | None = None,
        classifier: nn.Module | None = None,
    ) -> None:
        self.classifier: nn.Linear = _linear_head(model, classifier)
        if feature_module is not None and not isinstance(feature_module, nn.Module):
            raise TypeError(f"`feature_module` must be a torch.nn.Module, got {type(feature_module).__name__}")
        self.model = model
        # where the feature map is read: the given module's output, else a site found in the model (None: not
        # found; pooled features, for gate and linear ensembles, still work, CAMs do not)
        self._feature_module = feature_module
        self._site: FeatureSite | None = None if feature_module is not None else find_feature_site(model)
        self._features: Tensor | None = None
        self._pooled: Tensor | None = None
        self._image_size: tuple[int, int] = (0, 0)
        self._handles = self._hook()

    def _hook(self) -> list[torch.utils.hooks.RemovableHandle]:
        """The forward hooks that capture the feature map, the classifier's input and the image size."""
        handles = [
            self.classifier.register_forward_pre_hook(self._save_classifier_input),
            self.model.register_forward_pre_hook(self._save_image_size),
        ]
        if self._feature_module is not None:
            handles.append(self._feature_module.register_forward_hook(self._save_output))
        elif self._site is not None and self._site.take_input:
            handles.append(self._site.module.register_forward_pre_hook(self._save_input))
        elif self._site is not None:
            handles.append(self._site.module.register_forward_hook(self._save_output))
        return handles

    def __repr__(self) -> str:
        site = self._site
        if self._feature_module is not None:
            where = "the given feature_module"
        elif site is None:
            where = "not found (pooled features only)"
        else:
            where = f"{site.layout} {'input' if site.take_input else 'output'} of {type(site.module).__name__}"
        state = "" if self._handles else ", removed"
        return (
            f"FeatureTap(model={type(self.model).__name__}, feature_map={where}, classifier={self.classifier}{state})"
        )

    def _save_image_size(self, module: nn.Module, inputs: tuple[Any, ...]) -> None:
        if inputs and isinstance(inputs[0], Tensor) and inputs[0].ndim == 4:
            self._image_size = (int(inputs[0].shape[-2]), int(inputs[0].shape[-1]))

    def _save_output(self, module: nn.Module, inputs: Any, output: Tensor) -> None:
        self._features = output

    def _save_input(self, module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
        self._features = inputs[0]

    def _save_classifier_input(self, module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
        self._pooled = inputs[0]

    @contextlib.contextmanager
    def _captures_kept(self) -> Iterator[None]:
        """The model's own head runs inside (for the CAM read-out), its hooks fire; what the model's
        forward captured is put back afterwards."""
        kept = self._features, self._pooled, self._image_size
        try:
            yield
        finally:
            self._features, self._pooled, self._image_size = kept

    @property
    def features(self) -> Tensor:
        """(B, D, h, w) feature map of the last forward (NHWC maps permuted; patch tokens on their grid)."""
        if self._feature_module is None and self._site is None:
            raise _no_feature_map(self.model)
        if self._features is None:
            raise RuntimeError("FeatureTap has captured nothing yet: run a forward of the model first")
        if self._site is None:
            return self._features
        return feature_map(self._features, self._site, self._image_size)

    @property
    def pooled(self) -> Tensor:
        """(B, D) features the linear classifier received in the last forward."""
        if self._pooled is None:
            raise RuntimeError("FeatureTap has captured nothing yet: run a forward of the model first")
        return self._pooled

    def cams(
        self,
        images: Tensor,
        labels: Tensor,
        *,
        size: int | tuple[int, int] | None = None,
        eval_mode: bool = False,
        normalized: bool = True,
    ) -> Tensor:
        """The class activation map of each image for its label: the library's one way to get CAMs.

        Runs one no-grad forward of the tapped model on ``images`` (B, C, H, W) and reads, for
        ``labels`` (B,), SnapMix-normalised maps (see :func:`normalize_cams`) at the feature map's size,
        (B, h, w) (what :class:`~cekd_losses.MixingAugmenter` takes; it resizes them itself), or
        (B, H, W) with ``size``. ``normalized=False`` gives the raw float32 scores at the feature map's
        size instead (``size`` must then be None): for a global-average-pooled linear head their
        spatial mean is the logit. CAMs carry no gradient.

        ``eval_mode`` decides what BatchNorm does in that forward. False (default, as the SnapMix
        reference code): the model runs in its current mode, so during training BatchNorm normalises
        with the clean batch's statistics and updates its running statistics a second time per step.
        True: the forward runs in eval mode (running statistics used and left alone, dropout off) and
        every module's mode is restored afterwards.

        Example:
            >>> import torchvision
            >>> model = torchvision.models.resnet18(num_classes=10)
            >>> tap = FeatureTap(model)
            >>> images, labels = torch.rand(4, 3, 64, 64), torch.tensor([0, 1, 2, 3])
            >>> tap.cams(images, labels, eval_mode=True).shape
            torch.Size([4, 2, 2])
            >>> tap.cams(images, labels, size=64).sum(dim=(1, 2)).round(decimals=4)
            tensor([1., 1., 1., 1.])
        """
        if not normalized and size is not None:
            raise ValueError(f"`size` is for normalised CAMs only, got size={size!r} with normalized=False")
        maps = self._forward_maps(images, labels, eval_mode)[1]
        return normalize_cams(maps, size) if normalized else maps

    def logits_and_cams(self, images: Tensor, labels: Tensor, *, eval_mode: bool = False) -> tuple[Any, Tensor]:
        """:meth:`cams` at the feature map's size, and the output of the forward that made them (the tapped
        model's logits), no grad: one forward where both are needed, such as a fixed teacher's clean logits and
        its CAMs for SnapMix.

        Example:
            >>> import torchvision
            >>> model = torchvision.models.resnet18(num_classes=10).eval()
            >>> logits, cams = FeatureTap(model).logits_and_cams(torch.rand(2, 3, 64, 64), torch.tensor([0, 1]))
            >>> logits.shape, cams.shape
            (torch.Size([2, 10]), torch.Size([2, 2, 2]))
        """
        output, maps = self._forward_maps(images, labels, eval_mode)
        return output, normalize_cams(maps)

    def _forward_maps(self, images: Tensor, labels: Tensor, eval_mode: bool) -> tuple[Any, Tensor]:
        """One no-grad forward of the model on ``images``: its output and the raw CAMs of ``labels``."""
        images = _checks.check_images("images", images)
        with torch.no_grad(), _eval_mode(self.model) if eval_mode else contextlib.nullcontext():
            output = self.model(images)
        return output, self._raw_cams(labels)

    def _raw_cams(self, labels: Tensor) -> Tensor:
        """(B, h, w) float32 raw CAMs of the last forward for ``labels``."""
        features = self.features
        if features.ndim != 4:
            raise ValueError(
                f"the tapped feature map must have shape (B, D, h, w), got shape {tuple(features.shape)}; "
                "pass feature_module=<a module whose output is a spatial feature map>"
            )
        if self._site is None:  # a given feature_module: the linear read-out
            if features.shape[1] != self.classifier.in_features:
                raise ValueError(
                    f"the classifier {self.classifier} does not read the tapped feature map ({features.shape[1]} "
                    "channels): pass a feature_module whose output the classifier reads after pooling"
                )
            return _linear_cams(features, self.classifier.weight, labels, self.classifier.bias)
        _checks.check_shape("labels", labels, (features.shape[0],))
        _checks.check_class_ids("labels", labels, self.classifier.out_features)
        return self._head_cams(features, labels, self._site)

    def _head_cams(self, features: Tensor, labels: Tensor, site: FeatureSite) -> Tensor:
        """The model's own head on every position's features (eval mode, no gradient, no autocast), read for
        ``labels``."""
        batch, depth, height, width = features.shape
        positions = features.detach().permute(0, 2, 3, 1).reshape(-1, depth).to(self.classifier.weight.dtype)
        with self._captures_kept(), torch.no_grad(), _eval_mode(self.model):
            with _checks.without_autocast(positions.device):
                scores = site.head(uniform_features(positions, site)).float()  # (B * h * w, K)
        index = labels.long()[:, None, None].expand(-1, height * width, 1)
        return scores.view(batch, height * width, -1).gather(2, index).view(batch, height, width)

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
