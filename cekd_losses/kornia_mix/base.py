"""The base of the Kornia mix classes: a Kornia parameter generator over this library's draws, and a
``MixAugmentationBaseV2`` whose pixels and label rows come from this library's kernels."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import torch
from kornia.augmentation import MixAugmentationBaseV2
from kornia.augmentation.random_generator.base import RandomGeneratorBase
from kornia.constants import DataKey, DType
from torch import Tensor

from .. import _checks
from .._boxes import clipped
from .._constants import cached
from ..draws import DrawSpec, draw_parameters, random_source

Params = dict[str, Tensor]


@cached(maxsize=16)
def ones(size: int, device: torch.device) -> Tensor:
    return torch.ones(size, device=device)


class MixParameterGenerator(RandomGeneratorBase):
    """A Kornia parameter generator over this library's draws: ``mix_pairs`` (B,) partners (an image left alone is
    its own), ``mix_lambdas`` (B, n) Beta draws, for box methods ``mix_boxes`` (B, n, 4) int64 ``(x1, y1, x2,
    y2)``, and Kornia's ``batch_prob`` (B,) float32 (1 where the batch is mixed) and the class's own keys.

    Floats come in the rows' dtype (the images' for float32 and float64, else float32). ``forward`` takes the
    images' device and dtype as keywords (Kornia's generators take them from ``set_rng_device_and_dtype``)."""

    def __init__(
        self,
        method: str,
        mix_alpha: float,
        p_batch: float,
        generator: torch.Generator | None,
        lam_map: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        super().__init__()
        self.method, self.mix_alpha, self.p_batch, self.lam_map = method, mix_alpha, p_batch, lam_map
        self.source = random_source(generator, self)

    def make_samplers(self, device: torch.device, dtype: torch.dtype) -> None:
        """Nothing to build: each call draws on the device it is given."""

    def forward(
        self,
        batch_shape: tuple[int, ...],
        same_on_batch: bool = False,
        *,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> Params:
        batch, height, width = batch_shape[0], batch_shape[-2], batch_shape[-1]
        spec = DrawSpec(
            self.method,
            batch,
            height,
            width,
            self.mix_alpha,
            p=self.p_batch,
            same_on_batch=same_on_batch,
            batch_gate=True,
        )
        device = torch.device(self.device or "cpu") if device is None else device
        drawn = draw_parameters(spec, source=self.source, device=device, lam_map=self.lam_map)
        dtype = dtype or self.dtype
        lam = self._lambdas(drawn.lam.flatten(1).expand(batch, -1), dtype)
        params = {"mix_pairs": drawn.partner, "mix_lambdas": lam.to(row_dtype(dtype))}
        params["batch_prob"] = ones(batch, device) if drawn.mixed is None else drawn.mixed.float()
        if drawn.corners is not None:
            params["mix_boxes"] = clipped(drawn.corners, height, width).expand(batch, -1, -1, -1).flatten(-2).long()
        return {**params, **self.kornia_keys(params, height, width)}

    def _lambdas(self, lam: Tensor, dtype: torch.dtype) -> Tensor:
        """The (B, n) Beta draws as recorded, for images of ``dtype`` (MixUp rounds them as its blend does)."""
        return lam

    def kornia_keys(self, params: Params, height: int, width: int) -> Params:
        """The keys of Kornia's own class with their meaning (none here)."""
        return {}


def row_dtype(dtype: torch.dtype) -> torch.dtype:
    """Kornia's dtype of label rows: the images' for float32 and float64, else float32 (exact class ids)."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


class KorniaMix(MixAugmentationBaseV2):
    """The Kornia mix augmentation of one of this library's methods (see the module's docstring)."""

    def __init__(
        self,
        parameters: MixParameterGenerator,
        same_on_batch: bool,
        p: float,
        keepdim: bool,
        data_keys: list[Any] | None,
    ) -> None:
        super().__init__(p=1.0, p_batch=p, same_on_batch=same_on_batch, keepdim=keepdim, data_keys=data_keys)
        self._param_generator = parameters

    @property
    def parameter_generator(self) -> MixParameterGenerator:
        """The generator of the draws (Kornia's ``_param_generator``, typed as this class's)."""
        return cast(MixParameterGenerator, self._param_generator)

    @property
    def generator(self) -> torch.Generator | None:
        """The ``torch.Generator`` of the draws, or None for PyTorch's default one."""
        return self.parameter_generator.source.generator

    @generator.setter
    def generator(self, generator: torch.Generator | None) -> None:
        self.parameter_generator.source = random_source(generator, self.parameter_generator)

    @property
    def mix_alpha(self) -> float:
        """The Beta parameter of the lambdas (of the box sides for box methods)."""
        return self.parameter_generator.mix_alpha

    def forward(  # type: ignore[override]  # MixAugmentationBaseV2's signature, not the base's
        self, *inputs: Tensor, params: Params | None = None, data_keys: Any = None
    ) -> Any:
        """Kornia's ``forward``, with a new draw made on the images' device and in their dtype: Kornia's
        ``forward_parameters`` gets their shape alone and draws on the module's device. ``aug(images)`` or,
        with ``data_keys=["input", "class"]``, ``aug(images, labels) -> [images, labels]``; ``params=aug._params``
        replays the last draw on other tensors of the batch."""
        images, labels = self._inputs(inputs, data_keys)
        if params is None:
            shape = tuple(images.shape)
            params = self.parameter_generator(shape, self.same_on_batch, device=images.device, dtype=images.dtype)
            params = self._with_weights(params, images, labels)
            # Kornia's code of the image dtype, which Kornia 0.8's forward records for its own draws only
            params["dtype"] = torch.full((), DType.get(images.dtype).value, dtype=torch.long)
        return super().forward(*inputs, params=params, data_keys=data_keys)

    def _inputs(self, inputs: tuple[Tensor, ...], data_keys: Any) -> tuple[Tensor, Tensor | None]:
        """The images (B, C, H, W) and the labels (or None): as Kornia, the inputs pair with ``data_keys`` in
        order and tensors beyond the keys are ignored."""
        keys = [DataKey.get(key) for key in (data_keys if data_keys is not None else self.data_keys)]
        names = [{DataKey.INPUT: "input", DataKey.CLASS: "class"}.get(key, key.name.lower()) for key in keys]
        if any(key not in (DataKey.INPUT, DataKey.CLASS) for key in keys) or DataKey.INPUT not in keys:
            raise ValueError(f"{type(self).__name__} takes data_keys 'input' and optionally 'class', got {names}")
        keys = keys[: len(inputs)]
        if DataKey.INPUT not in keys:
            raise ValueError(f"{type(self).__name__} got {len(inputs)} tensors for data_keys {names}: no 'input'")
        images = _checks.check_images("input", self.transform_tensor(inputs[keys.index(DataKey.INPUT)]))
        labels = inputs[keys.index(DataKey.CLASS)] if DataKey.CLASS in keys else None
        return images, labels

    def _with_weights(self, params: Params, images: Tensor, labels: Tensor | None) -> Params:
        """The draw, with whatever of the label weights depends on the images (SnapMix's CAM weights)."""
        return params

    def forward_parameters(self, batch_shape: tuple[int, ...]) -> Params:
        """A draw for a batch of ``batch_shape`` (B, C, H, W), on the generator's device (Kornia's API). Kornia's
        own draws its batch gate apart, from the global random stream; here the gate is one of the draws, folded
        into the partners and boxes."""
        params: Params = self.parameter_generator(tuple(batch_shape), self.same_on_batch)
        return params

    def transform_input(self, input: Tensor, params: Params, flags: dict[str, Any]) -> Tensor:
        """Kornia's, without its host read (``bool(to_apply.any())``): an image the gate leaves alone is its own
        partner with an empty box or a weight of 1, so the mix runs on every image and leaves it as it was."""
        images = _checks.check_images("input", self.transform_tensor(input))
        with _checks.without_autocast(images.device):
            mixed = self.apply_transform(images, params, flags)
        return self.transform_output_tensor(mixed, input.shape)

    def transform_class(self, input: Tensor, params: Params, flags: dict[str, Any]) -> Tensor:
        """Kornia's, without its host reads (``sum(to_apply)``): the row of an image the gate leaves alone is
        already ``[label, label, 0]``."""
        return self.apply_transform_class(input, params, flags)

    def _pairing(self, labels: Tensor, params: Params) -> tuple[Tensor, Tensor, Tensor]:
        """Own and partner labels in the rows' dtype, and the partners, checked against the draw."""
        partner = params["mix_pairs"].to(labels.device, non_blocking=True)
        labels = _checks.check_shape("labels", labels, (partner.shape[0],))
        own = labels.to(params["mix_lambdas"].dtype)
        return own, own.index_select(0, partner), partner

    def _unmixed_rows(self, labels: Tensor, params: Params, weights: list[float]) -> Tensor:
        own = self._pairing(labels, params)[0]
        return torch.stack([own, own, *(torch.full_like(own, weight) for weight in weights)], dim=-1)
