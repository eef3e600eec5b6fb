"""Where a timm or torchvision classifier's last feature map is read, and how its own head turns features into
logits (an internal API of :class:`~cekd_losses.FeatureTap`)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

Layout = Literal["NCHW", "NHWC", "tokens"]


@dataclass(frozen=True)
class FeatureSite:
    """Where a model's last feature map is read and how its head turns features into logits.

    Attributes:
        module: the hooked module: its input is read (a pooling layer) or its output (a token model's norm).
        take_input: whether the module's input, not its output, is the feature map.
        layout: NCHW, NHWC (timm Swin), or tokens (B, N, D) with ``prefix`` class/register tokens first.
        head: features in ``layout`` -> (N, K) logits: the model's pooling, normalisation and classifier.
        prefix: class and register tokens before the patch tokens.
        patch: the patch size (H, W) of a token model.
    """

    module: nn.Module
    take_input: bool
    layout: Layout
    head: Callable[[Tensor], Tensor]
    prefix: int = 0
    patch: tuple[int, int] = (1, 1)


def _submodule(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def find_feature_site(model: nn.Module) -> FeatureSite | None:
    """The :class:`FeatureSite` of a timm model (any family) or a torchvision classifier, or None."""
    if callable(getattr(model, "forward_head", None)):  # timm: forward = forward_head(forward_features(x))
        return _timm_site(model)
    encoder, heads = _submodule(model, "encoder"), _submodule(model, "heads")
    if encoder is not None and heads is not None and hasattr(model, "class_token"):  # torchvision ViT
        size = int(getattr(model, "patch_size"))  # noqa: B009 (an int attribute of that model)
        return FeatureSite(encoder, False, "tokens", lambda tokens: heads(tokens[:, 0]), 1, (size, size))
    return _torchvision_cnn_site(model)


def _timm_site(model: nn.Module) -> FeatureSite | None:
    """A token model's final norm output (ViT, DeiT and the like), else the input of its global pooling."""
    head: Callable[[Tensor], Tensor] = model.forward_head  # type: ignore[assignment]
    prefix, norm = getattr(model, "num_prefix_tokens", None), _submodule(model, "norm")
    if prefix is not None and norm is not None:
        patch = tuple(getattr(getattr(model, "patch_embed", None), "patch_size", (1, 1)))
        return FeatureSite(norm, False, "tokens", head, int(prefix), (int(patch[0]), int(patch[-1])))
    pool = _submodule(model, "global_pool") or _submodule(model, "head.global_pool")
    if pool is None:
        return None
    layout: Layout = "NHWC" if getattr(model, "output_fmt", "NCHW") == "NHWC" else "NCHW"
    return FeatureSite(pool, True, layout, head)


def _torchvision_cnn_site(model: nn.Module) -> FeatureSite | None:
    """The input of ``avgpool``, with the pooling and the classifier (``fc``, ``classifier`` or ``head``)."""
    pool = _submodule(model, "avgpool")
    head = next(
        (m for m in (getattr(model, n, None) for n in ("fc", "classifier", "head")) if isinstance(m, nn.Module)), None
    )
    if pool is None or head is None:
        return None
    flattens = any(isinstance(m, nn.Flatten) for m in head.modules())  # ConvNeXt's head flattens itself

    def pool_and_head(features: Tensor) -> Tensor:
        pooled = pool(features)
        logits: Tensor = head(pooled if flattens else torch.flatten(pooled, 1))
        return logits

    return FeatureSite(pool, True, "NCHW", pool_and_head)


def feature_map(captured: Tensor, site: FeatureSite, image_size: tuple[int, int]) -> Tensor:
    """(B, D, h, w): the captured features of ``site`` as a map (NHWC permuted; patch tokens on their grid, the
    prefix tokens dropped) for an image of ``image_size``."""
    if site.layout == "NCHW":
        return captured
    if site.layout == "NHWC":
        return captured.permute(0, 3, 1, 2)
    batch, count, depth = captured.shape
    patches = count - site.prefix
    (height, width), (ph, pw) = image_size, site.patch
    for rows, cols in ((height // ph, width // pw), (math.ceil(height / ph), math.ceil(width / pw))):
        if rows * cols == patches:
            return captured[:, site.prefix :].reshape(batch, rows, cols, depth).permute(0, 3, 1, 2)
    raise ValueError(
        f"{patches} patch tokens do not form the patch grid of a {height}x{width} image with "
        f"{ph}x{pw} patches; pass feature_module= and classifier= for this model"
    )


def uniform_features(positions: Tensor, site: FeatureSite) -> Tensor:
    """A feature input of ``site``'s head per position: (P, D) position features -> every location of a 1 x 1 map
    (NCHW, NHWC), or every token (the prefix tokens too: any pooling returns the feature itself)."""
    if site.layout == "NCHW":
        return positions[:, :, None, None]
    if site.layout == "NHWC":
        return positions[:, None, None, :]
    return positions[:, None, :].expand(-1, site.prefix + 1, -1)
