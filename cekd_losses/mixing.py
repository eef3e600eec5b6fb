"""The mixing augmenter: MixUp, CutMix and SnapMix with per-sample parameters, on any device.

:class:`MixingAugmenter` draws a call's parameters (:mod:`cekd_losses.draws`) and runs the kernel of its method
(:mod:`cekd_losses.kernels`) on them, returning a :class:`~cekd_losses.MixedBatch`. The kernels, the batch record
and :func:`replay` are importable from here too, as from ``cekd_losses``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from . import _checks
from ._constants import cached, positions
from .draws import DrawSpec, draw_parameters, random_source
from .kernels import blend, choose, cutmix, mixup, paste, replay, snap, snapmix
from .mixed_batch import MixedBatch

__all__ = ["MixMethod", "MixedBatch", "MixingAugmenter", "cutmix", "mixup", "replay", "snapmix"]

MixMethod = Literal["mixup", "cutmix", "snapmix"]
"""The mixing methods of :class:`MixingAugmenter`."""
_METHODS = ("mixup", "cutmix", "snapmix")
_INDEX_DTYPES = (torch.int64, torch.int32)  # what index_select takes as it is
_TABLE_CLASSES = 1024  # up to this many classes the (K, K) table of smoothed one-hot rows is kept (<= 4 MiB)


@cached(maxsize=8)
def _smoothed_one_hot(classes: int, smoothing: float, device: torch.device) -> Tensor:
    """(K, K) float32 rows ``onehot * (1 - s) + s / K``, each value rounded once from float64."""
    table = torch.eye(classes, dtype=torch.float64, device=device) * (1.0 - smoothing) + smoothing / classes
    return table.float()


class MixingAugmenter(nn.Module):
    """Mix a batch with MixUp, CutMix or SnapMix and build its soft targets.

    Each sample draws its own lambda, box and mixing decision (``same_on_batch=True`` shares one
    draw over the batch) and is paired with a random partner (a permutation of the batch). A sample
    that is not mixed keeps its image and its (smoothed) target bit for bit and is its own partner.

    - ``"mixup"``: ``lam ~ Beta(mix_alpha, mix_alpha)``, pixels blended.
    - ``"cutmix"``: box of area fraction ``1 - lam`` at a uniform centre, clipped; ``lam`` then
      corrected to the pasted pixel fraction.
    - ``"snapmix"``: a target box (area from ``lam1``) and an independent partner box (from
      ``lam2``), both ``~ Beta(mix_alpha, mix_alpha)``; label weights from CAMs (see :func:`snapmix`).

    A list of methods makes a choice: each sample (the batch, with ``same_on_batch``) takes one of them with the
    probabilities ``method_p`` (timm's ``switch_prob`` between MixUp and CutMix is ``method_p=(1 - s, s)``), and
    its pixels and targets are exactly those its method's mixer gives it alone, in one call of a few more
    kernels than the methods' together, with no host read. Its :class:`MixedBatch` says each sample's method
    (``method``) and :func:`replay` replays it.

    Args:
        method: ``"mixup"``, ``"cutmix"`` or ``"snapmix"``, or a sequence of distinct ones to choose among.
        num_classes: K, the width of the targets.
        mix_alpha: parameter of the Beta distribution of the lambdas, > 0 (named apart from
            :class:`~cekd_losses.CEKDLoss`'s ``alpha``, the weight of cross distillation); with a list of
            methods, one value for all or one per method.
        p: per-sample probability of mixing, in [0, 1].
        method_p: with a list of methods, the probability of each (>= 0, summing to 1); equal by default.
        label_smoothing: in [0, 1): targets become ``t * (1 - s) + s / K`` before mixing.
        same_on_batch: one lambda, box and decision for the whole batch (the SnapMix code base's
            setting), drawn as the per-sample ones and broadcast: the same kernels, no host read.
        normalize_targets: snapmix only: rescale the two label weights to sum to 1.
        generator: optional ``torch.Generator`` for reproducible draws. Per-sample draws are made on
            its device (put it on the images' device to avoid a transfer), else on the images' device.

    Call: ``mixer(images (B, C, H, W) float, labels (B,) int or (B, K) float, cams (B, h, w) | None)``
    returns a :class:`MixedBatch`. ``cams`` is required for snapmix (also among a list): the CAM of each clean
    image for its own label, e.g. from :class:`~cekd_losses.cam.FeatureTap`. Set ``mixer.enabled = False`` to
    stop mixing (timm's ``mixup_enabled``; :func:`~cekd_losses.train_step`'s ``mix_off_step`` does it on a
    schedule): a call then returns the clean batch with its (smoothed) targets, and needs no ``cams``.

    A call launches a few dozen kernels at most and never reads a tensor value back to the host (on CPU
    tensors only, argument values are checked); ``torch.compile(mixer, fullgraph=True)`` traces every
    configuration whole and makes the same draws as eager for the same generator state. Counts and times:
    :doc:`/benchmarks`.

    Example:
        >>> mixer = MixingAugmenter("cutmix", num_classes=10, generator=torch.Generator().manual_seed(0))
        >>> batch = mixer(torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,)))
        >>> batch.images.shape, batch.targets.shape, torch.allclose(batch.targets.sum(1), torch.ones(8))
        (torch.Size([8, 3, 32, 32]), torch.Size([8, 10]), True)
        >>> timm_like = MixingAugmenter(["mixup", "cutmix"], 10, mix_alpha=[0.8, 1.0], method_p=[0.5, 0.5])
        >>> timm_like(torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,))).method.shape  # 0 mixup, 1 cutmix
        torch.Size([8])
    """

    def __init__(
        self,
        method: MixMethod | Sequence[MixMethod],
        num_classes: int,
        *,
        mix_alpha: float | Sequence[float] = 1.0,
        p: float = 1.0,
        method_p: Sequence[float] | None = None,
        label_smoothing: float = 0.0,
        same_on_batch: bool = False,
        normalize_targets: bool = False,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.method, self.method_p, self.mix_alpha = _method_choice(method, method_p, mix_alpha)
        self.num_classes = _checks.check_positive_int("num_classes", num_classes)
        self.p = _checks.check_in_range("p", p, 0.0, 1.0)
        self.label_smoothing = _checks.check_in_range("label_smoothing", label_smoothing, 0.0, 1.0, high_open=True)
        self.same_on_batch = bool(same_on_batch)
        if normalize_targets and "snapmix" not in self.methods:
            raise ValueError(
                f"`normalize_targets` applies to method 'snapmix' only (mixup and cutmix targets always "
                f"sum to 1), got normalize_targets=True with method {method!r}"
            )
        self.normalize_targets = bool(normalize_targets)
        self.generator = generator
        self.enabled = True  # False: calls return the clean batch (train_step's mix_off_step sets it)

    @property
    def methods(self) -> tuple[str, ...]:
        """The methods this mixer draws from: ``(method,)`` for one."""
        return (self.method,) if isinstance(self.method, str) else self.method

    @property
    def generator(self) -> torch.Generator | None:
        """The ``torch.Generator`` of the draws, or None for PyTorch's default one."""
        return self._source.generator

    @generator.setter
    def generator(self, generator: torch.Generator | None) -> None:
        self._source = random_source(generator, self)

    def extra_repr(self) -> str:
        return (
            f"method={self.method!r}, num_classes={self.num_classes}, mix_alpha={self.mix_alpha}, p={self.p}, "
            + (f"method_p={self.method_p}, " if self.method_p else "")
            + f"label_smoothing={self.label_smoothing}, same_on_batch={self.same_on_batch}"
            + (", normalize_targets=True" if self.normalize_targets else "")
        )

    def soft_targets(self, labels: Tensor, batch: int) -> Tensor:
        """(B, K) float32 targets from (B,) class ids or (B, K) soft targets, label smoothing applied.

        Class ids read rows of a cached (K, K) table of smoothed one-hot rows (one kernel; up to 1024 classes,
        4 MiB per device), or are scattered into a filled tensor for more classes.

        Example:
            >>> MixingAugmenter("mixup", 4, label_smoothing=0.2).soft_targets(torch.tensor([2, 0]), 2)
            tensor([[0.0500, 0.0500, 0.8500, 0.0500],
                    [0.8500, 0.0500, 0.0500, 0.0500]])
        """
        labels = _checks.check_tensor("labels", labels)
        if labels.ndim != 1:
            _checks.check_shape("labels", labels, (batch, self.num_classes))
            targets = _checks.check_floating("labels", labels).float()
            smoothing = self.label_smoothing
            return targets * (1.0 - smoothing) + smoothing / self.num_classes if smoothing > 0 else targets
        if labels.dtype not in _INDEX_DTYPES or labels.shape[0] != batch:
            _checks.check_shape("labels", labels, (batch,))
            labels = _checks.check_integer("labels", labels).long()
        try:  # indexing checks the ids itself (on CPU): the range check costs nothing until it fails
            return self._one_hot(labels)
        except (IndexError, RuntimeError):
            _checks.check_class_ids("labels", labels, self.num_classes)  # names the argument and the values
            raise

    def _one_hot(self, ids: Tensor) -> Tensor:
        smoothing, classes = self.label_smoothing, self.num_classes
        if classes <= _TABLE_CLASSES:  # rows of a cached table: one kernel
            return _smoothed_one_hot(classes, smoothing, ids.device).index_select(0, ids)
        targets = torch.full((ids.shape[0], classes), smoothing / classes, device=ids.device)
        return targets.scatter_(1, ids.view(-1, 1), 1.0 - smoothing + smoothing / classes)

    def forward(self, images: Tensor, labels: Tensor, cams: Tensor | None = None) -> MixedBatch:
        """Mix ``images`` (B, C, H, W) with ``labels`` (B,) ids or (B, K) soft targets; ``cams`` (B, h, w)
        for snapmix only. Returns the :class:`MixedBatch`.

        Runs outside any autocast region (its own precision rules hold under AMP), so a mix is the
        same with and without ``torch.autocast``."""
        images = _checks.check_images("images", images)
        targets = self.soft_targets(labels, images.shape[0])
        _checks.check_same_device("labels", targets, "images", images)
        if not self.enabled:  # the clean batch, its own partner (cams, if given, unused)
            return MixedBatch(images, targets, positions(images.shape[0], images.device), lam_b=_zero(images.device))
        cams = self._checked_cams(cams, images)
        with _checks.without_autocast(images.device):
            params = draw_parameters(self._spec(images), source=self._source, device=images.device)
            if params.method is not None:
                return choose(images, targets, cams, params, self.methods, self.normalize_targets)
            if self.method == "mixup":
                return blend(images, targets, params.partner, params.lam)
            assert params.corners is not None
            if self.method == "cutmix":
                return paste(images, targets, params.partner, params.corners)
            assert cams is not None
            return snap(images, targets, cams, params.partner, params.corners, self.normalize_targets)

    def _spec(self, images: Tensor) -> DrawSpec:
        batch, _, height, width = images.shape
        return DrawSpec(
            self.method,
            batch,
            height,
            width,
            self.mix_alpha,
            p=self.p,
            same_on_batch=self.same_on_batch,
            method_p=self.method_p,
        )

    def _checked_cams(self, cams: Tensor | None, images: Tensor) -> Tensor | None:
        if "snapmix" in self.methods and cams is None:
            raise ValueError(
                "`cams` is required for snapmix: pass the (B, h, w) class activation map of each clean "
                "image for its own label, e.g. cams = FeatureTap(model).cams(images, labels)"
            )
        if "snapmix" not in self.methods and cams is not None:
            raise ValueError(f"`cams` is used by method 'snapmix' only, got cams with method {self.method!r}")
        if cams is not None:
            cams = _checks.check_maps("cams", cams, (images.shape[0], "h", "w"))
            _checks.check_same_device("cams", cams, "images", images)
        return cams


@cached(maxsize=8)
def _zero(device: torch.device) -> Tensor:
    return torch.zeros(1, 1, device=device)


def _method_choice(
    method: object, method_p: Sequence[float] | None, mix_alpha: object
) -> tuple[str | tuple[str, ...], tuple[float, ...], float | tuple[float, ...]]:
    """``method``, ``method_p`` and ``mix_alpha`` checked: one method (a one-item list is that method) with one
    alpha and no probabilities, or a tuple of distinct methods with one alpha each (or one for all) and
    probabilities (equal by default)."""
    if isinstance(method, str):
        methods: tuple[str, ...] = (method,)
    elif isinstance(method, Sequence) and method:
        methods = tuple(method)
    else:
        raise TypeError(f"`method` must be one of {', '.join(map(repr, _METHODS))} or a list of them, got {method!r}")
    for name in methods:
        _checks.check_choice("method", name, _METHODS)
    if len(set(methods)) != len(methods):
        raise ValueError(f"`method` must list each method once, got {list(methods)}")
    alphas = tuple(_checks.check_positive("mix_alpha", a) for a in _per_method("mix_alpha", mix_alpha, methods))
    if len(methods) == 1:
        if method_p is not None and tuple(method_p) != (1.0,):
            raise ValueError(f"`method_p` applies to a list of methods, got method_p={method_p!r} with {method!r}")
        return methods[0], (), alphas[0]
    shares = tuple(float(_checks.check_in_range("method_p", q, 0.0, 1.0)) for q in method_p or ())
    if method_p is None:
        shares = (1.0 / len(methods),) * len(methods)
    if len(shares) != len(methods) or abs(sum(shares) - 1.0) > 1e-6:
        raise ValueError(f"`method_p` must give one probability per method summing to 1, got {method_p!r}: {methods}")
    return methods, shares, alphas[0] if len(set(alphas)) == 1 else alphas


def _per_method(name: str, value: object, methods: tuple[str, ...]) -> tuple[object, ...]:
    if isinstance(value, Sequence) and not isinstance(value, str):
        if len(value) != len(methods):
            raise ValueError(f"`{name}` must give one value per method ({len(methods)}), got {list(value)}")
        return tuple(value)
    return (value,) * len(methods)
