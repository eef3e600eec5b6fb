"""torchvision's ``transforms.v2.MixUp`` and ``CutMix`` as drop-ins, on this library's kernels.

``from cekd_losses import MixUp, CutMix`` in the place of ``from torchvision.transforms.v2 import MixUp, CutMix``:
the same keywords (``alpha``, ``num_classes``, ``labels_getter``), the same calls (``mix(images, labels)``, a
``(images, labels)`` pair or list from a DataLoader, a dict with a label-like key, or inside a collate function)
and the same mix: one lambda per batch, each image paired with the one before it (``roll(1)``), labels as (B)
class ids or (B, K) one-hot or soft rows. What differs: the lambda and the box are drawn with torch on the images'
device (an optional ``torch.Generator``), nothing is read back to the host, and the targets are float32.
torchvision is not needed to import them; its ``tv_tensors.Image`` and ``Video`` are mixed and come back as such.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from . import _checks
from ._boxes import image_limits
from ._constants import cached
from .draws import sample_beta
from .kernels import blend, paste
from .mixed_batch import MixedBatch

__all__ = ["CutMix", "MixUp"]

LabelsGetter = Callable[[Any], Any]


@cached(maxsize=64)
def _previous(batch: int, device: torch.device) -> Tensor:
    """(B,) int64 ``(i - 1) mod B``: torchvision's partner of each image (its batch rolled by one)."""
    return torch.arange(-1, batch - 1, device=device) % batch


def default_labels(sample: Any) -> Any:
    """torchvision's default rule for where the labels are: the second item of a tuple or list (a tensor, or a
    dict holding them), or in a dict the key ``"labels"`` (any case), else the first key containing ``"label"``.

    Example:
        >>> default_labels((torch.zeros(2, 3, 4, 4), torch.tensor([0, 1])))
        tensor([0, 1])
    """
    if isinstance(sample, (tuple, list)) and len(sample) > 1:
        sample = sample[1]
    if type(sample) is Tensor:
        return sample
    if not isinstance(sample, Mapping):
        raise ValueError(
            "When using the default labels_getter, the input must be (images, labels), a tuple or list whose second "
            "item is the labels or a dict holding them, or such a dict; pass labels_getter=<a function of the input "
            f"that returns the labels> otherwise. Got {_checks.describe(sample)}"
        )
    keys = [key for key in sample if isinstance(key, str) and key.lower() == "labels"]
    keys = keys or [key for key in sample if isinstance(key, str) and "label" in key.lower()]
    if not keys:
        raise ValueError(
            f"Could not infer where the labels are in a dict with keys {list(sample)}: name their key 'labels' or "
            "pass labels_getter=<a function of the input that returns the labels>"
        )
    return sample[keys[0]]


class _BatchMix(nn.Module):
    """What MixUp and CutMix share: the keywords, finding the labels and images in the input, the targets."""

    def __init__(
        self,
        *,
        alpha: float = 1.0,
        num_classes: int | None = None,
        labels_getter: str | LabelsGetter | None = "default",
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.alpha = _checks.check_positive("alpha", alpha)
        self.num_classes = None if num_classes is None else _checks.check_positive_int("num_classes", num_classes)
        if labels_getter == "default":
            self.labels_getter: LabelsGetter = default_labels
        elif callable(labels_getter):
            self.labels_getter = labels_getter
        elif labels_getter is None:
            self.labels_getter = lambda sample: None
        else:
            raise ValueError(f"`labels_getter` must be 'default', a callable or None, got {labels_getter!r}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"`generator` must be a torch.Generator or None, got {type(generator).__name__}")
        self.generator = generator

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, num_classes={self.num_classes}"

    def forward(self, *inputs: Any) -> Any:
        """Mix the batch in ``inputs`` (as torchvision's call); returns the input's structure with the images mixed
        and the labels replaced by (B, K) float32 mixed targets."""
        sample = inputs if len(inputs) > 1 else inputs[0]
        leaves = _leaves(sample)
        kinds = [_kind(leaf) for leaf in leaves]
        if "unsupported" in kinds:
            raise ValueError(
                f"{type(self).__name__}() does not support PIL images, bounding boxes, keypoints and masks: it mixes "
                "batched image tensors (B, C, H, W) or videos (B, T, C, H, W)"
            )
        labels = self.labels_getter(sample)
        targets = self._targets(labels)
        images = _images(leaves, kinds, labels)
        flat = [_flat(leaf, kind, targets.shape[0]) for leaf, kind in images]
        _checks.check_same_device("labels", targets, "images", flat[0])
        replaced: dict[int, Tensor] = {}
        with _checks.without_autocast(flat[0].device):
            params = self.draw(flat[0])
            for (leaf, _), pixels in zip(images, flat, strict=True):
                batch = self.mix(pixels, targets, params)
                replaced[id(leaf)] = batch.images.view(leaf.shape).as_subclass(type(leaf))
        replaced[id(labels)] = batch.targets
        return _rebuilt(sample, replaced)

    def _targets(self, labels: object) -> Tensor:
        """(B, K) float32 rows of ``labels``: (B,) class ids one-hot (``num_classes`` needed), (B, K) as given."""
        if not isinstance(labels, Tensor):
            raise ValueError(f"The labels must be a tensor, got {_checks.describe(labels)}")
        if labels.ndim == 1:
            if self.num_classes is None:
                raise ValueError("num_classes must be passed for labels given as (B,) class ids (one-hot: (B, K))")
            ids = _checks.check_class_ids("labels", _checks.check_integer("labels", labels), self.num_classes)
            rows = torch.zeros(ids.shape[0], self.num_classes, device=ids.device)  # F.one_hot reads the ids' range
            return rows.scatter_(1, ids.long().view(-1, 1), 1.0)
        if labels.ndim != 2:
            raise ValueError(
                f"labels should be index based with shape (batch_size,) or one-hot / soft with shape (batch_size, "
                f"num_classes), but got a tensor of shape {tuple(labels.shape)}"
            )
        if self.num_classes is not None and labels.shape[1] != self.num_classes:
            raise ValueError(
                f"When passing 2D labels, their last dim must be num_classes ({self.num_classes}), got shape "
                f"{tuple(labels.shape)}; leave num_classes=None to take it from the labels"
            )
        return labels.float()

    def draw(self, images: Tensor) -> Tensor:
        """The random parameters of one call on (B, C, H, W) ``images``, on their device."""
        raise NotImplementedError

    def _draw_device(self, images: Tensor) -> torch.device:
        """Where the draws are made: the generator's device, or the images' with PyTorch's default generator."""
        return self.generator.device if self.generator is not None else images.device

    def mix(self, images: Tensor, targets: Tensor, params: Tensor) -> MixedBatch:
        """The mix of ``params`` (drawn, or given) on ``images`` (B, C, H, W) and their (B, K) ``targets``."""
        raise NotImplementedError


class MixUp(_BatchMix):
    """torchvision's ``transforms.v2.MixUp``: ``x = lam * x + (1 - lam) * x.roll(1, 0)``, one ``lam ~
    Beta(alpha, alpha)`` per batch, targets mixed alike.

    Args:
        alpha: Beta parameter, > 0.
        num_classes: K; needed for (B,) class-id labels, checked against (B, K) ones.
        labels_getter: ``"default"`` (see :func:`default_labels`), a function of the input returning the labels,
            or None.
        generator: optional ``torch.Generator`` of the draws, on the images' device (keyword; not torchvision's).

    Example:
        >>> mixup = MixUp(num_classes=10, generator=torch.Generator().manual_seed(0))
        >>> images, targets = mixup(torch.rand(4, 3, 16, 16), torch.tensor([0, 1, 2, 3]))
        >>> images.shape, targets.shape, torch.allclose(targets.sum(1), torch.ones(4))
        (torch.Size([4, 3, 16, 16]), torch.Size([4, 10]), True)
    """

    def draw(self, images: Tensor) -> Tensor:
        """(1, 1, 1, 1) float32 ``lam``, each image's own weight."""
        lam = sample_beta(self.alpha, (1, 1, 1, 1), self.generator, self._draw_device(images))
        return lam.to(images.device, non_blocking=True)

    def mix(self, images: Tensor, targets: Tensor, params: Tensor) -> MixedBatch:
        """``lam * images + (1 - lam) * images.roll(1, 0)`` with ``lam`` = ``params`` (1, 1, 1, 1), targets alike."""
        return blend(images, targets, _previous(images.shape[0], images.device), params)


class CutMix(_BatchMix):
    """torchvision's ``transforms.v2.CutMix``: one box per batch pasted from ``x.roll(1, 0)``, of half sides
    ``floor(sqrt(1 - lam) / 2 * size)`` about a uniform centre pixel, clipped; ``lam ~ Beta(alpha, alpha)``, the
    targets' weight corrected to the pasted area. Its arguments are :class:`MixUp`'s.

    Example:
        >>> cutmix = CutMix(num_classes=10, generator=torch.Generator().manual_seed(0))
        >>> images, targets = cutmix(torch.rand(4, 3, 16, 16), torch.tensor([0, 1, 2, 3]))
        >>> torch.allclose(targets.sum(1), torch.ones(4))
        True
    """

    def draw(self, images: Tensor) -> Tensor:
        """(1, 1, 2, 2) float32 corners ``[[x1, y1], [x2, y2]]`` of the box (:func:`cutmix_corners`)."""
        generator, device = self.generator, self._draw_device(images)
        height, width = images.shape[-2:]
        lam = sample_beta(self.alpha, (1,), generator, device)
        x, y = (torch.randint(0, size, (1,), generator=generator, device=device) for size in (width, height))
        return cutmix_corners(lam, torch.stack([x, y], dim=1), height, width).to(images.device, non_blocking=True)

    def mix(self, images: Tensor, targets: Tensor, params: Tensor) -> MixedBatch:
        """``images.roll(1, 0)`` pasted inside the box of corners ``params`` (1, 1, 2, 2); targets by its area."""
        return paste(images, targets, _previous(images.shape[0], images.device), params)


def cutmix_corners(lam: Tensor, centre: Tensor, height: int, width: int) -> Tensor:
    """(1, 1, 2, 2) float32 corners of torchvision's CutMix box from a (1,) ``lam`` and a (1, 2) centre ``[x,
    y]``: half sides ``floor(sqrt(1 - lam) / 2 * [W, H])``, clipped to the image."""
    sizes = image_limits(height, width, lam.device).high  # (2,) [W, H], cached
    half = ((1.0 - lam).sqrt().view(1, 1) * 0.5 * sizes).floor()
    low, high = (centre - half).clamp(min=0), torch.minimum(centre + half, sizes)
    return torch.stack([low, high], dim=1).view(1, 1, 2, 2)


def _leaves(sample: Any) -> list[Any]:
    """The leaves of nested tuples, lists and dicts, depth first."""
    if isinstance(sample, (tuple, list)):
        return [leaf for item in sample for leaf in _leaves(item)]
    if isinstance(sample, dict):
        return [leaf for item in sample.values() for leaf in _leaves(item)]
    return [sample]


def _rebuilt(sample: Any, replaced: dict[int, Tensor]) -> Any:
    """``sample`` with the leaves whose ``id`` is in ``replaced`` replaced."""
    if isinstance(sample, (tuple, list)):
        return type(sample)(_rebuilt(item, replaced) for item in sample)
    if isinstance(sample, dict):
        return {key: _rebuilt(item, replaced) for key, item in sample.items()}
    return replaced.get(id(sample), sample)


def _kind(leaf: Any) -> str:
    """ "tensor" (a plain tensor), "image" / "video" (torchvision's ``tv_tensors``), "unsupported" (a PIL image, a
    mask, boxes, keypoints) or "other" (passed through)."""
    if type(leaf) is Tensor:
        return "tensor"
    if type(leaf).__module__.startswith("PIL."):
        return "unsupported"
    if isinstance(leaf, Tensor):
        try:
            from torchvision import tv_tensors
        except ImportError:  # a tensor subclass of another library: passed through
            return "other"
        if isinstance(leaf, tv_tensors.Video):
            return "video"
        if isinstance(leaf, tv_tensors.Image):
            return "image"
        return "unsupported" if isinstance(leaf, tv_tensors.TVTensor) else "other"
    return "other"


def _images(leaves: list[Any], kinds: list[str], labels: object) -> list[tuple[Tensor, str]]:
    """The leaves to mix: every ``tv_tensors`` image and video, or without them the first plain tensor other than
    the labels (torchvision's rule for plain tensors)."""
    chosen = [(leaf, kind) for leaf, kind in zip(leaves, kinds, strict=True) if kind in ("image", "video")]
    if not chosen:
        chosen = [
            (leaf, kind) for leaf, kind in zip(leaves, kinds, strict=True) if kind == "tensor" and leaf is not labels
        ][:1]
    if not chosen:
        raise ValueError("found no image tensor in the input besides the labels: pass (images, labels)")
    return chosen


def _flat(leaf: Tensor, kind: str, batch: int) -> Tensor:
    """A plain (B, C, H, W) view of an image batch (a video's frames and channels folded together), checked."""
    dims = 5 if kind == "video" else 4
    if leaf.ndim != dims:
        raise ValueError(
            f"Expected a batched input with {dims} dims, {'(B, T, C, H, W)' if dims == 5 else '(B, C, H, W)'}, "
            f"got a tensor of shape {tuple(leaf.shape)}"
        )
    if leaf.shape[0] != batch:
        raise ValueError(
            f"The batch size of the images ({leaf.shape[0]}) does not match the batch size of the labels ({batch})"
        )
    pixels = leaf.as_subclass(Tensor)
    return _checks.check_images("images", pixels.flatten(1, 2) if dims == 5 else pixels)
