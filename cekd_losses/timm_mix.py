"""timm's ``Mixup`` as a drop-in: its constructor, its call and its target layout, on this library's kernels.

``from cekd_losses import Mixup`` in the place of ``from timm.data import Mixup``: the same keywords and defaults
(``mixup_alpha``, ``cutmix_alpha``, ``cutmix_minmax``, ``prob``, ``switch_prob``, ``mode`` ``"batch"`` / ``"pair"`` /
``"elem"``, ``correct_lam``, ``label_smoothing``, ``num_classes``, ``multi_label``), the call ``x, target =
mixup_fn(x, target)`` and the (B, K) soft targets ``lam * y + (1 - lam) * y.flip(0)``, with each image mixed with
the one at the other end of the batch as timm does. What differs: the parameters are drawn with torch on the
images' device (an optional ``torch.Generator``, no NumPy, no Python loop over the batch, no host read), the
batch is not modified in place, and a batch of odd size is accepted (its middle image is its own partner and
stays as it is). SnapMix is a further choice (``snapmix_alpha`` > 0), its CAMs from a
:class:`~cekd_losses.FeatureTap` given as ``tap`` or passed to the call.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
from torch import Tensor

from . import _checks
from ._boxes import box_masks, clipped, corners_from_draws, image_limits
from ._constants import cached
from .cam import FeatureTap
from .draws import sample_beta
from .kernels import snap

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
        snap_corners: with SnapMix active, (P, 2, 2, 2) float32 corners of its target box and the partner's source
            box, not clipped, empty where another method or none is drawn; else None.
    """

    lam: Tensor
    use_cutmix: Tensor
    corners: Tensor
    blend: Tensor
    snap_corners: Tensor | None = None


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
        snapmix_alpha: Beta parameter of SnapMix's two box draws; SnapMix is active if > 0 (keyword; not timm's).
        snapmix_prob: probability of SnapMix rather than MixUp or CutMix when one of them is active too.
        tap: a :class:`~cekd_losses.FeatureTap` of the model being trained: with SnapMix active, each call runs it
            for the CAMs of the clean batch (or pass ``cams`` to the call).
        generator: optional ``torch.Generator`` of the draws, on the images' device (keyword; not timm's).

    Call: ``x, target = mixup_fn(x (B, C, H, W), target (B,) ids or (B, K) with multi_label, cams=None)``;
    ``target`` comes back (B, K) float32. Set ``mixup_fn.mixup_enabled = False`` to stop mixing (timm's
    ``--mixup-off-epoch``). A SnapMix row's target is ``lam_a * own + lam_b * partner`` with weights from the CAMs
    (:func:`~cekd_losses.snapmix`), and needs class ids.

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
        snapmix_alpha: float = 0.0,
        snapmix_prob: float = 0.5,
        tap: FeatureTap | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        self._set_alphas(mixup_alpha, cutmix_alpha, cutmix_minmax, snapmix_alpha)
        self.snapmix_prob = _checks.check_in_range("snapmix_prob", snapmix_prob, 0.0, 1.0)
        self.mix_prob = _checks.check_in_range("prob", prob, 0.0, 1.0)
        self.switch_prob = _checks.check_in_range("switch_prob", switch_prob, 0.0, 1.0)
        self.mode = _checks.check_choice("mode", mode, ("batch", "pair", "elem"))
        self.correct_lam = bool(correct_lam)
        self.label_smoothing = _checks.check_in_range("label_smoothing", label_smoothing, 0.0, 1.0, high_open=True)
        self.num_classes = _checks.check_positive_int("num_classes", num_classes)
        self.multi_label = bool(multi_label)
        if self.snapmix_alpha > 0 and self.multi_label:
            raise ValueError("`snapmix_alpha` > 0 needs class ids (a CAM for each image's label), not multi_label")
        if tap is not None and not isinstance(tap, FeatureTap):
            raise TypeError(f"`tap` must be a FeatureTap or None, got {type(tap).__name__}")
        self.tap = tap
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"`generator` must be a torch.Generator or None, got {type(generator).__name__}")
        self.generator = generator
        self.mixup_enabled = True  # the train loop sets it to False to stop mixing

    def _set_alphas(self, mixup: object, cutmix: object, minmax: object, snapmix: object) -> None:
        """The methods' Beta parameters, checked (``cutmix_minmax`` makes CutMix active, as in timm)."""
        self.mixup_alpha = _non_negative("mixup_alpha", mixup)
        self.cutmix_alpha = _non_negative("cutmix_alpha", cutmix)
        self.cutmix_minmax = None if minmax is None else _checks.check_interval("cutmix_minmax", minmax, 0, 1)
        if self.cutmix_minmax is not None:
            self.cutmix_alpha = 1.0  # as timm: CutMix active, its lambda from the box
        self.snapmix_alpha = _non_negative("snapmix_alpha", snapmix)
        if self.mixup_alpha == 0 and self.cutmix_alpha == 0 and self.snapmix_alpha == 0:
            raise ValueError(
                "one of `mixup_alpha` > 0, `cutmix_alpha` > 0, `cutmix_minmax` or `snapmix_alpha` > 0 must be given, "
                "got none"
            )

    def __repr__(self) -> str:
        return (
            f"Mixup(mixup_alpha={self.mixup_alpha}, cutmix_alpha={self.cutmix_alpha}, cutmix_minmax="
            f"{self.cutmix_minmax}, prob={self.mix_prob}, switch_prob={self.switch_prob}, mode={self.mode!r}, "
            f"correct_lam={self.correct_lam}, label_smoothing={self.label_smoothing}, num_classes={self.num_classes}"
            + (
                f", snapmix_alpha={self.snapmix_alpha}, snapmix_prob={self.snapmix_prob})"
                if self.snapmix_alpha
                else ")"
            )
        )

    def __call__(self, x: Tensor, target: Tensor, cams: Tensor | None = None) -> tuple[Tensor, Tensor]:
        x = _checks.check_images("x", x)
        targets = self.smoothed_targets(target, x.shape[0])
        _checks.check_same_device("target", targets, "x", x)
        if not self.mixup_enabled:
            return x, targets
        if self.snapmix_alpha > 0 and cams is None:
            if self.tap is None:
                raise ValueError("SnapMix (`snapmix_alpha` > 0) needs CAMs: pass tap=FeatureTap(model), or cams=")
            cams = self.tap.cams(x, target)
        with _checks.without_autocast(x.device):
            return self.apply(x, targets, self.draw(tuple(x.shape), x.device), cams)

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
        boxes, snap_corners = self._boxes(lam, sets, height, width, generator, draw_device), None
        if self.snapmix_alpha > 0:  # drawn after the others, which stay as they are without SnapMix
            use_snapmix, snap_corners = self._snap_boxes(mixed, height, width, generator, draw_device)
            use_cutmix, mixed = use_cutmix & ~use_snapmix, mixed & ~use_snapmix
        corners = boxes * use_cutmix.view(-1, 1, 1, 1)
        if self.correct_lam or self.cutmix_minmax is not None:
            sides = corners[..., 1, :] - corners[..., 0, :]
            lam = torch.where(use_cutmix, 1.0 - sides.prod(dim=-1).view(-1) / (height * width), lam)
        lam = torch.where(mixed, lam, 1.0)
        blend = torch.where(use_cutmix, 1.0, lam)
        lam, use_cutmix, corners, blend = (t.to(device, non_blocking=True) for t in (lam, use_cutmix, corners, blend))
        snap_corners = None if snap_corners is None else snap_corners.to(device, non_blocking=True)
        return TimmMixParameters(lam, use_cutmix, corners, blend, snap_corners)

    def _snap_boxes(
        self, mixed: Tensor, height: int, width: int, generator: torch.Generator | None, device: torch.device
    ) -> tuple[Tensor, Tensor]:
        """(P,) bool: SnapMix drawn; (P, 2, 2, 2) its target and source boxes (empty elsewhere), each from a
        Beta(snapmix_alpha) draw about a uniform centre, as :class:`~cekd_losses.MixingAugmenter`'s."""
        sets = mixed.shape[0]
        alone = self.mixup_alpha == 0 and self.cutmix_alpha == 0
        chosen = mixed if alone else mixed & (torch.rand(sets, generator=generator, device=device) < self.snapmix_prob)
        sides = sample_beta(self.snapmix_alpha, (sets, 2, 1, 1), generator, device)
        centres = torch.randint(0, 2**62, (sets, 2, 1, 2), generator=generator, device=device)
        return chosen, corners_from_draws(sides, centres, height, width) * chosen.view(-1, 1, 1, 1)

    def _choices(self, sets: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
        """(P,) bool: CutMix rather than MixUp (timm's switch when both are active)."""
        if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
            return torch.rand(sets, generator=generator, device=device) < self.switch_prob
        return torch.full((sets,), self.cutmix_alpha > 0, device=device)

    def _lambdas(self, use_cutmix: Tensor, generator: torch.Generator | None, device: torch.device) -> Tensor:
        """(P,) float32 Beta draws, MixUp's or CutMix's parameter each as the set's method (ones with SnapMix
        alone)."""
        sets = use_cutmix.shape[0]
        mixup = sample_beta(self.mixup_alpha, (sets,), generator, device) if self.mixup_alpha > 0 else None
        cutmix = sample_beta(self.cutmix_alpha, (sets,), generator, device) if self.cutmix_alpha > 0 else None
        if mixup is not None and cutmix is not None:
            return torch.where(use_cutmix, cutmix, mixup)
        drawn = mixup if mixup is not None else cutmix
        return drawn if drawn is not None else torch.ones(sets, device=device)  # SnapMix alone: no blend weights

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

    def apply(
        self, x: Tensor, targets: Tensor, params: TimmMixParameters, cams: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """The mix of ``params`` (drawn, or timm's own) on ``x`` (B, C, H, W) and its (B, K) float32 ``targets``:
        each image with its partner B - 1 - i, MixUp's blend, CutMix's box or SnapMix's (with ``cams`` (B, h, w))
        as its set has it."""
        batch, _, height, width = x.shape
        sets = _set_of_sample(self.mode, batch, x.device)
        lam, corners, blend = (t.index_select(0, sets) for t in (params.lam, params.corners, params.blend))
        partner = _flipped(batch, x.device)
        source = x.index_select(0, partner)
        blended = torch.lerp(source, x, blend.view(-1, 1, 1, 1).to(x.dtype))
        images = torch.where(box_masks(corners, height, width), source, blended)
        mixed_targets = torch.lerp(targets.index_select(0, partner), targets, lam.view(-1, 1))
        if params.snap_corners is None:
            return images, mixed_targets
        if cams is None:
            raise ValueError("`cams` (B, h, w) are needed to apply parameters with SnapMix boxes")
        cams = _checks.check_maps("cams", cams, (batch, "h", "w"))
        snap_corners = params.snap_corners.index_select(0, sets)
        snapped = snap(x, targets, cams, partner, snap_corners, False)
        rows = snap_corners.flatten(1).ne(0).any(dim=1)  # SnapMix drawn (an all-zero pair of boxes pastes nothing)
        images = torch.where(rows.view(-1, 1, 1, 1), snapped.images, images)
        return images, torch.where(rows.view(-1, 1), snapped.targets, mixed_targets)


def _non_negative(name: str, value: object) -> float:
    number = _checks.check_real(name, value)
    if number < 0:
        raise ValueError(f"`{name}` must be >= 0 (0 switches the method off), got {value!r}")
    return number
