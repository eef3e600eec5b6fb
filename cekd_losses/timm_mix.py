"""timm's ``Mixup`` as a drop-in: its constructor, its call and its target layout, on this library's kernels.

``from cekd_losses import Mixup`` in the place of ``from timm.data import Mixup``: the same keywords and defaults
(``mixup_alpha``, ``cutmix_alpha``, ``cutmix_minmax``, ``prob``, ``switch_prob``, ``mode`` ``"batch"`` / ``"pair"`` /
``"elem"``, ``correct_lam``, ``label_smoothing``, ``num_classes``, ``multi_label``), the call ``x, target =
mixup_fn(x, target)`` and the (B, K) soft targets ``lam * y + (1 - lam) * y.flip(0)``, with each image mixed with
the one at the other end of the batch as timm does. What differs: the parameters are drawn with torch on the
images' device (an optional ``torch.Generator``, no NumPy, no Python loop over the batch, no host read), the
batch is not modified in place, and a batch of odd size is accepted (its middle image is its own partner and
stays as it is).
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
from torch import Tensor

from . import _checks
from ._boxes import box_masks, clipped, corners_from_draws, image_limits
from ._constants import cached
from .draws import sample_beta

__all__ = ["Mixup", "TimmMixParameters"]

TimmMode = Literal["batch", "pair", "elem"]


class TimmMixParameters(NamedTuple):
    """The parameters of one call, one set per batch (``"batch"``), per pair (``"pair"``: sample i and its partner
    B - 1 - i share one) or per image (``"elem"``); P sets.

    Attributes:
        lam: (P,) float32 weight of each image's own target (1 where nothing is mixed): the Beta draw, or for
            CutMix with ``correct_lam`` (always with ``cutmix_minmax``) 1 minus the pasted box's area fraction.
        use_cutmix: (P,) bool, CutMix (a box pasted) rather than MixUp (pixels blended).
        corners: (P, 1, 2, 2) float32 corners ``[[x1, y1], [x2, y2]]`` of the pasted box, clipped; empty where
            MixUp or nothing is mixed.
        blend: (P,) float32 weight of each image's own pixels in MixUp's blend (1 where CutMix or unmixed).
    """

    lam: Tensor
    use_cutmix: Tensor
    corners: Tensor
    blend: Tensor


@cached(maxsize=64)
def _flipped(batch: int, device: torch.device) -> Tensor:
    """(B,) int64 ``B - 1 - i``: timm's partner of each image."""
    return torch.arange(batch - 1, -1, -1, device=device)


@cached(maxsize=64)
def _set_of_sample(mode: str, batch: int, device: torch.device) -> Tensor:
    """(B,) int64: the parameter set each image takes (batch: all 0; pair: min(i, B - 1 - i); elem: i)."""
    index = torch.arange(batch, device=device)
    if mode == "batch":
        return torch.zeros_like(index)
    return torch.minimum(index, batch - 1 - index) if mode == "pair" else index


class Mixup:
    """Mixup/CutMix with timm's interface (``timm.data.Mixup``), drawn on the device.

    Args:
        mixup_alpha: Beta parameter of MixUp's lambda; MixUp is active if > 0.
        cutmix_alpha: Beta parameter of CutMix's lambda; CutMix is active if > 0.
        cutmix_minmax: CutMix box sides as ``(min, max)`` fractions of the image's, drawn uniformly per axis (the
            box inside the image; CutMix active and ``cutmix_alpha`` set to 1, as timm).
        prob: probability of mixing, per batch (``"batch"``), pair or image.
        switch_prob: probability of CutMix rather than MixUp when both are active.
        mode: ``"batch"`` (one draw for the batch), ``"pair"`` (one per pair of images i, B - 1 - i) or ``"elem"``
            (one per image).
        correct_lam: CutMix's lambda is 1 minus the clipped box's area fraction (else the Beta draw itself).
        label_smoothing: targets ``onehot * (1 - s) + s / K`` before mixing (multi-label: towards 0.5).
        num_classes: K.
        multi_label: the targets are dense (B, K) multi-label rows, not class ids.
        generator: optional ``torch.Generator`` of the draws, on the images' device (keyword; not timm's).

    Call: ``x, target = mixup_fn(x (B, C, H, W), target (B,) ids or (B, K) with multi_label)``; ``target`` comes
    back (B, K) float32. Set ``mixup_fn.mixup_enabled = False`` to stop mixing (timm's ``--mixup-off-epoch``).

    Example:
        >>> generator = torch.Generator().manual_seed(0)
        >>> mixup_fn = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, num_classes=10, generator=generator)
        >>> x, target = mixup_fn(torch.rand(6, 3, 16, 16), torch.arange(6))
        >>> x.shape, target.shape, torch.allclose(target.sum(1), torch.ones(6))
        (torch.Size([6, 3, 16, 16]), torch.Size([6, 10]), True)
    """

    def __init__(
        self,
        mixup_alpha: float = 1.0,
        cutmix_alpha: float = 0.0,
        cutmix_minmax: tuple[float, float] | None = None,
        prob: float = 1.0,
        switch_prob: float = 0.5,
        mode: TimmMode = "batch",
        correct_lam: bool = True,
        label_smoothing: float = 0.1,
        num_classes: int = 1000,
        multi_label: bool = False,
        *,
        generator: torch.Generator | None = None,
    ) -> None:
        self.mixup_alpha = _non_negative("mixup_alpha", mixup_alpha)
        self.cutmix_alpha = _non_negative("cutmix_alpha", cutmix_alpha)
        self.cutmix_minmax = (
            None if cutmix_minmax is None else _checks.check_interval("cutmix_minmax", cutmix_minmax, 0, 1)
        )
        if self.cutmix_minmax is not None:
            self.cutmix_alpha = 1.0  # as timm: CutMix active, its lambda from the box
        if self.mixup_alpha == 0 and self.cutmix_alpha == 0:
            raise ValueError("one of `mixup_alpha` > 0, `cutmix_alpha` > 0 or `cutmix_minmax` must be given, got none")
        self.mix_prob = _checks.check_in_range("prob", prob, 0.0, 1.0)
        self.switch_prob = _checks.check_in_range("switch_prob", switch_prob, 0.0, 1.0)
        self.mode = _checks.check_choice("mode", mode, ("batch", "pair", "elem"))
        self.correct_lam = bool(correct_lam)
        self.label_smoothing = _checks.check_in_range("label_smoothing", label_smoothing, 0.0, 1.0, high_open=True)
        self.num_classes = _checks.check_positive_int("num_classes", num_classes)
        self.multi_label = bool(multi_label)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"`generator` must be a torch.Generator or None, got {type(generator).__name__}")
        self.generator = generator
        self.mixup_enabled = True  # the train loop sets it to False to stop mixing

    def __repr__(self) -> str:
        return (
            f"Mixup(mixup_alpha={self.mixup_alpha}, cutmix_alpha={self.cutmix_alpha}, cutmix_minmax="
            f"{self.cutmix_minmax}, prob={self.mix_prob}, switch_prob={self.switch_prob}, mode={self.mode!r}, "
            f"correct_lam={self.correct_lam}, label_smoothing={self.label_smoothing}, num_classes={self.num_classes})"
        )

    def __call__(self, x: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        x = _checks.check_images("x", x)
        targets = self.smoothed_targets(target, x.shape[0])
        _checks.check_same_device("target", targets, "x", x)
        if not self.mixup_enabled:
            return x, targets
        with _checks.without_autocast(x.device):
            return self.apply(x, targets, self.draw(tuple(x.shape), x.device))

    def smoothed_targets(self, target: Tensor, batch: int) -> Tensor:
        """(B, K) float32 targets before mixing: class ids (B,) as timm's smoothed one-hot rows (``s / K`` off,
        ``1 - s + s / K`` on), dense (B, K) rows smoothed towards ``s / K`` (towards 0.5 with ``multi_label``).

        Example:
            >>> Mixup(num_classes=4, label_smoothing=0.2).smoothed_targets(torch.tensor([2]), 1)
            tensor([[0.0500, 0.0500, 0.8500, 0.0500]])
        """
        target = _checks.check_tensor("target", target)
        smoothing, classes = self.label_smoothing, self.num_classes
        if self.multi_label or target.ndim == 2:
            dense = _checks.check_floating("target", _checks.check_shape("target", target, (batch, classes))).float()
            return dense * (1.0 - smoothing) + (0.5 if self.multi_label else 1.0 / classes) * smoothing
        ids = _checks.check_integer("target", _checks.check_shape("target", target, (batch,)))
        _checks.check_class_ids("target", ids, classes)
        off = smoothing / classes
        return torch.full((batch, classes), off, device=ids.device).scatter_(
            1, ids.long().view(-1, 1), 1.0 - smoothing + off
        )

    def draw(self, shape: tuple[int, ...], device: torch.device) -> TimmMixParameters:
        """The parameters of one call on a (B, C, H, W) batch, on ``device`` (drawn on the generator's device)."""
        batch, height, width = shape[0], shape[-2], shape[-1]
        sets = 1 if self.mode == "batch" else (batch + 1) // 2 if self.mode == "pair" else batch
        generator = self.generator
        draw_device = generator.device if generator is not None else device
        mixed = torch.rand(sets, generator=generator, device=draw_device) < self.mix_prob
        use_cutmix = self._choices(sets, generator, draw_device) & mixed
        lam = self._lambdas(use_cutmix, generator, draw_device)
        corners = self._boxes(lam, sets, height, width, generator, draw_device) * use_cutmix.view(-1, 1, 1, 1)
        if self.correct_lam or self.cutmix_minmax is not None:
            sides = corners[..., 1, :] - corners[..., 0, :]
            lam = torch.where(use_cutmix, 1.0 - sides.prod(dim=-1).view(-1) / (height * width), lam)
        lam = torch.where(mixed, lam, 1.0)
        blend = torch.where(use_cutmix, 1.0, lam)
        params = TimmMixParameters(lam, use_cutmix, corners, blend)
        return TimmMixParameters(*(t.to(device, non_blocking=True) for t in params))

    def _choices(self, sets: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
        """(P,) bool: CutMix rather than MixUp (timm's switch when both are active)."""
        if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
            return torch.rand(sets, generator=generator, device=device) < self.switch_prob
        return torch.full((sets,), self.cutmix_alpha > 0, device=device)

    def _lambdas(self, use_cutmix: Tensor, generator: torch.Generator | None, device: torch.device) -> Tensor:
        """(P,) float32 Beta draws, MixUp's or CutMix's parameter each as the set's method."""
        sets = use_cutmix.shape[0]
        mixup = sample_beta(self.mixup_alpha, (sets,), generator, device) if self.mixup_alpha > 0 else None
        cutmix = sample_beta(self.cutmix_alpha, (sets,), generator, device) if self.cutmix_alpha > 0 else None
        if mixup is not None and cutmix is not None:
            return torch.where(use_cutmix, cutmix, mixup)
        drawn = mixup if mixup is not None else cutmix
        assert drawn is not None
        return drawn

    def _boxes(
        self, lam: Tensor, sets: int, height: int, width: int, generator: torch.Generator | None, device: torch.device
    ) -> Tensor:
        """(P, 1, 2, 2) clipped corners: timm's box of area ``1 - lam`` about a uniform centre, or with
        ``cutmix_minmax`` sides uniform in ``[min * size, max * size)`` placed uniformly inside the image."""
        if self.cutmix_minmax is None:
            centres = torch.randint(0, 2**62, (sets, 1, 1, 2), generator=generator, device=device)
            return clipped(corners_from_draws((1.0 - lam).view(-1, 1, 1, 1), centres, height, width), height, width)
        low, high = self.cutmix_minmax
        sizes = image_limits(height, width, device).high  # (2,) [W, H], cached: no copy to the device per call
        smallest, largest = (sizes * low).floor(), (sizes * high).floor()  # as timm's int(size * min), int(size * max)
        uniform = torch.rand(sets, 2, 2, generator=generator, device=device)
        sides = smallest + (uniform[:, 0] * (largest - smallest)).floor()
        start = (uniform[:, 1] * (sizes - sides + 1)).floor()
        return torch.stack([start, start + sides], dim=1).view(sets, 1, 2, 2)

    def apply(self, x: Tensor, targets: Tensor, params: TimmMixParameters) -> tuple[Tensor, Tensor]:
        """The mix of ``params`` (drawn, or timm's own) on ``x`` (B, C, H, W) and its (B, K) float32 ``targets``:
        each image with its partner B - 1 - i, MixUp's blend or CutMix's box as its set has it."""
        batch, _, height, width = x.shape
        sets = _set_of_sample(self.mode, batch, x.device)
        lam, _, corners, blend = (t.index_select(0, sets) for t in params)
        partner = _flipped(batch, x.device)
        source = x.index_select(0, partner)
        blended = torch.lerp(source, x, blend.view(-1, 1, 1, 1).to(x.dtype))
        images = torch.where(box_masks(corners, height, width), source, blended)
        return images, torch.lerp(targets.index_select(0, partner), targets, lam.view(-1, 1))


def _non_negative(name: str, value: object) -> float:
    number = _checks.check_real(name, value)
    if number < 0:
        raise ValueError(f"`{name}` must be >= 0 (0 switches the method off), got {value!r}")
    return number
