"""MixUp, CutMix and SnapMix as Kornia augmentations, running this library's kernels.

For pipelines built from ``kornia.augmentation`` modules: :class:`RandomMixUp` and :class:`RandomCutMix` are
drop-ins for Kornia's ``RandomMixUpV2`` and ``RandomCutMixV2`` (the same constructor conventions, call
``aug(images, labels) -> [images, labels]`` with ``data_keys=["input", "class"]``, the same label layout and
meaning, parameter replay through ``params=``), and :class:`RandomSnapMix` adds SnapMix, which Kornia lacks.
They subclass ``kornia.augmentation.MixAugmentationBaseV2``. Their draws come from this library (per-row
lambdas and boxes from one or two generator calls, a ``torch.Generator`` if given) and they read no tensor
value back to the host.

Label layouts, one row per image:

- :class:`RandomMixUp`: (B, 3) ``[label, partner label, lam]``; the image is ``(1 - lam) x + lam x[partner]``.
- :class:`RandomCutMix`: (1, B, 3) ``[label, partner label, lam]`` with ``lam`` the partner's pixel share
  (Kornia's ``use_correct_lambda=False`` meaning; ``use_correct_lambda=True`` gives ``1 - lam``, the image's own
  share), exact for every box.
- :class:`RandomSnapMix`: (B, 4) ``[label, partner label, lam_a, lam_b]``, the two SnapMix weights of the image's
  own label and its partner's, from class activation maps; they need not sum to 1.

:func:`kornia_soft_targets` turns any of these into (B, K) soft targets.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from kornia.augmentation import MixAugmentationBaseV2
from kornia.augmentation.utils import _transform_output_shape
from kornia.constants import DataKey, DType
from torch import Tensor

from . import _checks
from .cam import FeatureTap
from .mixing import _KERNELS, MixedBatch, _clipped, _constant, _Draw, _draw, _register

__all__ = ["RandomCutMix", "RandomMixUp", "RandomSnapMix", "kornia_soft_targets"]


class _KorniaMix(MixAugmentationBaseV2):
    """A Kornia mix augmentation whose parameters and pixels come from this library's kernels.

    ``forward`` follows ``MixAugmentationBaseV2.forward`` (inputs paired with ``data_keys`` in order, tensors
    beyond them ignored; ``params=`` to replay a draw; ``keepdim``) with the draw made on the images' device and
    no read of tensor values. The recorded ``_params`` hold this library's keys (``mix_pairs``, ``mix_lambdas``,
    ``mix_boxes``) and Kornia's (``batch_prob``, ``dtype`` and each class's own)."""

    method: str

    def __init__(
        self,
        mix_alpha: float,
        same_on_batch: bool,
        p: float,
        keepdim: bool,
        data_keys: list[Any] | None,
        generator: torch.Generator | None,
    ) -> None:
        # as Kornia's mix classes: p gates the whole batch (all images mixed, or none)
        p = _checks.check_in_range("p", p, 0.0, 1.0)
        super().__init__(p=1.0, p_batch=p, same_on_batch=same_on_batch, keepdim=keepdim, data_keys=data_keys)
        self.mix_alpha = _checks.check_positive("mix_alpha", mix_alpha)
        self.generator = _register(generator)
        self._kernel = _KERNELS[self.method]

    def __repr__(self) -> str:
        """Kornia's form: the draw's settings, then ``p``, ``p_batch`` and ``same_on_batch``, then this library's."""
        kornia = f"p={self.p}, p_batch={self.p_batch}, same_on_batch={self.same_on_batch}"
        return f"{type(self).__name__}({', '.join(filter(None, [self._settings(), kornia, self._extra()]))})"

    def _settings(self) -> str:
        return f"mix_alpha={self.mix_alpha}"

    def _lam_map(self) -> Callable[[Tensor], Tensor] | None:
        """What maps the Beta draws before use (Kornia's ``lambda_val`` and ``cut_size`` ranges), or None."""
        return None

    def _extra(self) -> str:
        return ""

    def _draw_parameters(self, shape: tuple[int, ...], device: torch.device) -> dict[str, Tensor]:
        """One call's draw: ``mix_pairs`` (B,) partners (an image left alone is its own), ``mix_lambdas``
        (B, n) Beta draws, for box methods ``mix_boxes`` (B, n, 4) int64 ``(x1, y1, x2, y2)``; Kornia's
        ``batch_prob`` (B,) float32 (1 where the batch is mixed) and the class's own keys."""
        batch, height, width = shape[0], shape[-2], shape[-1]
        draw = _draw(
            self._kernel,
            (batch, height, width),
            device,
            self.generator,
            self.mix_alpha,
            self.same_on_batch,
            self.p_batch,
            1,
            self._lam_map(),
        )
        params = {"mix_pairs": draw.partner, "mix_lambdas": draw.lam.flatten(1).expand(batch, -1)}
        if draw.mixed is None:  # p = 1: every image mixes (a constant; params are read, not written)
            ones = _constant(("ones", batch, device), lambda: torch.ones(batch, device=device))
            params["batch_prob"] = ones
        else:
            params["batch_prob"] = draw.mixed.float()
        if draw.boxes is not None:
            clipped = _clipped(draw.boxes, height, width).expand(batch, -1, -1, -1)  # (B, n, 2, 2)
            params["mix_boxes"] = clipped.flatten(-2).long()
            params.update(self._kornia_boxes(clipped, height, width, device))
        params.update(self._kornia_lambdas(params))
        return params

    def _kornia_boxes(self, clipped: Tensor, height: int, width: int, device: torch.device) -> dict[str, Tensor]:
        return {}

    def _kornia_lambdas(self, params: dict[str, Tensor]) -> dict[str, Tensor]:
        return {}

    def forward_parameters(self, batch_shape: tuple[int, ...]) -> dict[str, Tensor]:
        """A draw for a batch of ``batch_shape`` (B, C, H, W), on the generator's device (Kornia's API)."""
        return self._draw_parameters(
            batch_shape, self.generator.device if self.generator is not None else torch.device("cpu")
        )

    def _inputs(self, inputs: tuple[Tensor, ...], data_keys: Any) -> tuple[list[DataKey], Tensor, Tensor | None]:
        """The keys in use, the images and the labels (or None): as Kornia, the inputs pair with ``data_keys``
        in order and tensors beyond the keys are ignored."""
        keys = [DataKey.get(key) for key in (data_keys if data_keys is not None else self.data_keys)]
        names = [
            "input" if key == DataKey.INPUT else "class" if key == DataKey.CLASS else key.name.lower() for key in keys
        ]
        if any(key not in (DataKey.INPUT, DataKey.CLASS) for key in keys) or DataKey.INPUT not in keys:
            raise ValueError(f"{type(self).__name__} takes data_keys 'input' and optionally 'class', got {names}")
        keys = keys[: len(inputs)]
        if DataKey.INPUT not in keys:
            raise ValueError(f"{type(self).__name__} got {len(inputs)} tensors for data_keys {names}: no 'input'")
        labels = inputs[keys.index(DataKey.CLASS)] if DataKey.CLASS in keys else None
        return keys, inputs[keys.index(DataKey.INPUT)], labels

    def forward(  # type: ignore[override]  # MixAugmentationBaseV2's signature, not the base's
        self, *inputs: Tensor, params: dict[str, Tensor] | None = None, data_keys: Any = None
    ) -> Any:
        """``aug(images)`` or, with ``data_keys=["input", "class"]``, ``aug(images, labels) -> [images, labels]``;
        ``params=aug._params`` replays the last draw on other tensors of the batch."""
        keys, original, labels = self._inputs(inputs, data_keys)
        images = _checks.check_images("input", self.transform_tensor(original))
        if labels is not None:
            labels = _checks.check_shape("labels", labels, (images.shape[0],))
            _checks.check_same_device("labels", labels, "input", images)
        if params is None:
            params = self._draw_parameters(tuple(images.shape), images.device)
        params = {name: t.to(images.device, non_blocking=True) for name, t in params.items() if name != "dtype"}
        code = DType.get(images.dtype).value  # Kornia's code of the image dtype, kept on the host as Kornia's
        params["dtype"] = _constant(("kornia dtype", code), lambda: torch.tensor(code))
        self._params = params
        with _checks.without_autocast(images.device):
            mixed = self._mix(images, labels, params)
        out_images = _transform_output_shape(mixed.images, original.shape) if self.keepdim else mixed.images
        outputs: list[Tensor] = []
        for key in keys:
            if key == DataKey.INPUT:
                outputs.append(out_images)
            else:
                assert labels is not None
                dtype = images.dtype if images.dtype in (torch.float32, torch.float64) else torch.float32
                own = labels.to(dtype)
                weights = torch.stack([mixed.lam_a, mixed.lam_b], dim=-1).to(dtype)
                outputs.append(self._layout(own, own.index_select(0, mixed.partner), weights, params))
        return outputs[0] if len(outputs) == 1 else outputs

    def _mix(self, images: Tensor, labels: Tensor | None, params: dict[str, Tensor]) -> MixedBatch:
        """The library's kernel on the draw in ``params`` (the targets it mixes are placeholders: the Kornia
        layout carries label ids and weights)."""
        batch = images.shape[0]
        placeholder = _constant(("zeros", batch, images.device), lambda: torch.zeros(batch, 1, device=images.device))
        return self._kernel.apply(images, placeholder, self._cams(images, labels), _params_draw(params), False)

    def _cams(self, images: Tensor, labels: Tensor | None) -> Tensor | None:
        return None

    def _layout(self, own: Tensor, partner: Tensor, weights: Tensor, params: dict[str, Tensor]) -> Tensor:
        raise NotImplementedError


class RandomMixUp(_KorniaMix):
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

    method = "mixup"

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
        super().__init__(mix_alpha, same_on_batch, p, keepdim, data_keys, generator)
        self.lambda_val = None if lambda_val is None else _checks.check_interval("lambda_val", lambda_val, 0.0, 1.0)

    def _settings(self) -> str:
        alpha = f", mix_alpha={self.mix_alpha}" if self.mix_alpha != 1.0 else ""
        return f"lambda_val={self.lambda_val}{alpha}"

    def _lam_map(self) -> Callable[[Tensor], Tensor] | None:
        return None if self.lambda_val is None else self._uniform

    def _uniform(self, lam: Tensor) -> Tensor:
        """Uniform(0, 1) draws of the image's own weight -> its own weight when the partner's is Uniform(min, max)."""
        assert self.lambda_val is not None
        low, high = self.lambda_val
        return lam * (high - low) + (1.0 - high)

    def _kornia_lambdas(self, params: dict[str, Tensor]) -> dict[str, Tensor]:
        return {"mixup_pairs": params["mix_pairs"], "mixup_lambdas": 1.0 - params["mix_lambdas"][:, 0]}

    def _layout(self, own: Tensor, partner: Tensor, weights: Tensor, params: dict[str, Tensor]) -> Tensor:
        return torch.stack([own, partner, weights[:, 1]], dim=-1)


class RandomCutMix(_KorniaMix):
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

    method = "cutmix"

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
        if beta is not None:
            if mix_alpha != 1.0:
                raise ValueError(
                    f"`beta` is Kornia's name for `mix_alpha`: give one, got beta={beta!r} and mix_alpha={mix_alpha!r}"
                )
            mix_alpha = _checks.check_positive("beta", float(beta) if isinstance(beta, Tensor) else beta)
        super().__init__(mix_alpha, same_on_batch, p, keepdim, data_keys, generator)
        self.use_correct_lambda = bool(use_correct_lambda)
        self.cut_size = None if cut_size is None else _checks.check_interval("cut_size", cut_size, 0.0, 1.0)
        if self.cut_size is not None and self.cut_size[0] >= 1.0:
            raise ValueError(
                f"`cut_size` minimum must be < 1: it clamps lambda, and lambda = 1 cuts nothing, got {cut_size!r}"
            )

    def _settings(self) -> str:
        beta = None if self.mix_alpha == 1.0 else self.mix_alpha
        return f"cut_size={self.cut_size}, beta={beta}, num_mix=1"

    def _lam_map(self) -> Callable[[Tensor], Tensor] | None:
        return None if self.cut_size is None else self._clamp

    def _clamp(self, lam: Tensor) -> Tensor:
        """The box-area draws ``u`` -> ``1 - clamp(1 - u, min, max)``, Kornia's clamp of ``lambda = 1 - u``."""
        assert self.cut_size is not None
        low, high = self.cut_size
        return lam.clamp(1.0 - high, 1.0 - low)

    def _kornia_boxes(self, clipped: Tensor, height: int, width: int, device: torch.device) -> dict[str, Tensor]:
        """Kornia's ``crop_src``: (1, B, 4, 2) vertices ``(x1, y1), (x2 - 1, y1), (x2 - 1, y2 - 1), (x1, y2 - 1)``
        of the (B, 1, 2, 2) clipped corners, and ``image_shape`` (H, W)."""
        index, offset, shape = _constant(
            ("kornia crop_src", height, width, device),
            lambda: (
                torch.tensor([0, 1, 2, 1, 2, 3, 0, 3], device=device),
                torch.tensor([0.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0, 1.0], device=device),
                torch.tensor([float(height), float(width)], device=device),
            ),
        )
        corners = clipped.flatten(1)  # (B, 4): x1, y1, x2, y2
        return {"crop_src": (corners.index_select(1, index) - offset).view(1, -1, 4, 2), "image_shape": shape}

    def _layout(self, own: Tensor, partner: Tensor, weights: Tensor, params: dict[str, Tensor]) -> Tensor:
        lam = weights[:, 1]
        if self.use_correct_lambda:  # the image's own share; as Kornia, 0 where the gate left the batch alone
            gate = params.get("batch_prob")
            lam = weights[:, 0] if gate is None else weights[:, 0] * gate
        return torch.stack([own, partner, lam], dim=-1)[None]


class RandomSnapMix(_KorniaMix):
    """SnapMix (Huang et al., AAAI 2021) as a Kornia augmentation.

    Every image draws a target box and an independent box of its partner (sides from ``Beta(mix_alpha,
    mix_alpha)``); the partner's box is resized into the target box, and the labels are weighed by class
    activation maps (see :func:`~cekd_losses.snapmix`).

    The maps come from ``tap``, a :class:`~cekd_losses.FeatureTap` of the model being trained, bound here at
    construction: the call stays Kornia's ``aug(images, labels)``, so the augmentation fits an
    ``AugmentationSequential`` or any loop written for Kornia's mix classes, and the CAMs are those of the
    images as they reach the mixer (after the pipeline's other augmentations). Each call runs one no-grad
    forward of the tapped model on the clean images (``tap.cams(images, labels, eval_mode=eval_mode_cams)``).

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
        >>> model = torchvision.models.resnet18(num_classes=5)
        >>> aug = RandomSnapMix(FeatureTap(model), data_keys=["input", "class"])
        >>> images, labels = aug(torch.rand(4, 3, 64, 64), torch.tensor([0, 1, 2, 3]))
        >>> labels.shape, kornia_soft_targets(labels, 5).shape
        (torch.Size([4, 4]), torch.Size([4, 5]))
    """

    method = "snapmix"

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
        super().__init__(mix_alpha, same_on_batch, p, keepdim, data_keys, generator)
        self.tap = tap
        self.eval_mode_cams = bool(eval_mode_cams)

    def _cams(self, images: Tensor, labels: Tensor | None) -> Tensor:
        if labels is None:
            raise ValueError("RandomSnapMix needs the labels for its CAMs: data_keys=['input', 'class']")
        return self.tap.cams(images, labels, eval_mode=self.eval_mode_cams)

    def _settings(self) -> str:
        return f"mix_alpha={self.mix_alpha}"

    def _extra(self) -> str:
        return f"eval_mode_cams={self.eval_mode_cams}"

    def _layout(self, own: Tensor, partner: Tensor, weights: Tensor, params: dict[str, Tensor]) -> Tensor:
        return torch.cat([own[:, None], partner[:, None], weights], dim=-1)


def _params_draw(params: dict[str, Tensor]) -> _Draw:
    """The kernels' draw from a parameter dictionary (recorded by a call, or given to replay it)."""
    boxes = params.get("mix_boxes")
    lambdas = params["mix_lambdas"]
    corners = boxes.float().view(*boxes.shape[:-1], 2, 2) if boxes is not None else None
    return _Draw(params["mix_pairs"].long(), lambdas.view(*lambdas.shape, 1, 1), corners)


def kornia_soft_targets(labels: Tensor, num_classes: int) -> Tensor:
    """(B, K) float32 soft targets from the label rows of :class:`RandomMixUp` (B, 3), :class:`RandomCutMix`
    (1, B, 3) with its default ``use_correct_lambda=False``, Kornia's ``RandomMixUpV2`` / ``RandomCutMixV2``
    in the same meanings, or :class:`RandomSnapMix` (B, 4).

    Example:
        >>> kornia_soft_targets(torch.tensor([[0.0, 2.0, 0.25]]), 3)
        tensor([[0.7500, 0.0000, 0.2500]])
        >>> kornia_soft_targets(torch.tensor([[0.0, 2.0, 0.5, 0.75]]), 3)
        tensor([[0.5000, 0.0000, 0.7500]])
    """
    labels = _checks.check_tensor("labels", labels)
    _checks.check_positive_int("num_classes", num_classes)
    if labels.ndim == 3 and labels.shape[0] == 1 and labels.shape[-1] == 3:
        labels = labels[0]
    if labels.ndim != 2 or labels.shape[-1] not in (3, 4):
        raise ValueError(
            "`labels` must be mix label rows: (B, 3) [label, partner, lam], (1, B, 3) or (B, 4) "
            f"[label, partner, lam_a, lam_b], got shape {tuple(labels.shape)}"
        )
    rows = labels.float()
    weights = torch.stack([1.0 - rows[:, 2], rows[:, 2]], dim=1) if rows.shape[1] == 3 else rows[:, 2:]
    ids = rows[:, :2].round().long()
    _checks.check_class_ids("labels", ids, num_classes)
    targets = torch.zeros(rows.shape[0], num_classes, device=labels.device)
    return targets.scatter_add_(1, ids, weights)
