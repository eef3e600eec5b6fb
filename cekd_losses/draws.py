"""The random parameters of a mix, drawn from one frozen :class:`DrawSpec`: partners, lambdas, boxes and mixing
decisions, on the images' device, from an optional ``torch.Generator``.

One call makes every random choice in three or four generator calls (a permutation, Beta draws, box centres,
uniforms for the decisions) and never reads a value back to the host. Under ``torch.compile`` the same calls run
as one opaque custom op that finds the generator by key, so a compiled mixer draws exactly what an eager one
draws for the same generator state. :class:`~cekd_losses.MixingAugmenter` and the Kornia classes draw here.
"""

from __future__ import annotations

import itertools
import math
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from ._boxes import corners_from_draws
from ._constants import cached, positions

__all__ = [
    "DRAWS_PER_SAMPLE",
    "METHOD_IDS",
    "UNMIXED",
    "DrawSpec",
    "MixParameters",
    "RandomSource",
    "draw_parameters",
    "random_source",
]

# method -> (Beta draws, boxes) per sample: MixUp's lambda; CutMix's box; SnapMix's target box and source box
DRAWS_PER_SAMPLE = {"mixup": (1, 0), "cutmix": (1, 1), "snapmix": (2, 2)}
METHOD_IDS = {"mixup": 0, "cutmix": 1, "snapmix": 2}
"""The id a choice among methods gives each sample's method (:attr:`MixedBatch.method <cekd_losses.MixedBatch>`)."""
UNMIXED = 3
"""The id of a sample a choice among methods leaves as it is."""


@dataclass(frozen=True)
class DrawSpec:
    """What one call draws, for a (B, C, H, W) batch.

    Attributes:
        method: ``"mixup"``, ``"cutmix"`` or ``"snapmix"`` (its draws per sample: :data:`DRAWS_PER_SAMPLE`), or a
            tuple of them: each sample (each batch, with ``same_on_batch``) takes one, drawn with ``method_p``.
        batch, height, width: B, H and W.
        alpha: the Beta(alpha, alpha) parameter of the lambdas (and so of the box sides); a tuple gives one per
            method of a tuple ``method``.
        p: probability that a sample mixes (with ``batch_gate``: that the batch does).
        same_on_batch: one set of lambdas and boxes, and one decision, for the whole batch.
        batch_gate: one decision for the whole batch (Kornia's ``p_batch``), even with per-sample lambdas.
        method_p: with a tuple ``method``, the probability of each (summing to 1); empty for one method.

    Example:
        >>> DrawSpec("cutmix", batch=8, height=32, width=32, alpha=1.0).lambdas
        1
        >>> DrawSpec(("mixup", "snapmix"), batch=8, height=32, width=32, alpha=(0.8, 5.0), method_p=(0.5, 0.5)).alphas
        (0.8, 5.0, 5.0)
    """

    method: str | tuple[str, ...]
    batch: int
    height: int
    width: int
    alpha: float | tuple[float, ...]
    p: float = 1.0
    same_on_batch: bool = False
    batch_gate: bool = False
    method_p: tuple[float, ...] = ()

    @property
    def methods(self) -> tuple[str, ...]:
        """The methods drawn from (one for a single method), in the order of ``method``."""
        return (self.method,) if isinstance(self.method, str) else self.method

    @property
    def alphas(self) -> tuple[float, ...]:
        """The Beta parameter of each lambda column: each method's lambdas in turn."""
        alphas = (self.alpha,) * len(self.methods) if isinstance(self.alpha, (int, float)) else self.alpha
        return tuple(a for m, a in zip(self.methods, alphas, strict=True) for _ in range(DRAWS_PER_SAMPLE[m][0]))

    @property
    def lambdas(self) -> int:
        """Beta draws per sample: every method's, in turn."""
        return sum(DRAWS_PER_SAMPLE[m][0] for m in self.methods)

    @property
    def boxes(self) -> int:
        """Boxes per sample: one per lambda column where a method has boxes (MixUp's column then makes one
        unused), else none."""
        return self.lambdas if any(DRAWS_PER_SAMPLE[m][1] for m in self.methods) else 0


class MixParameters(NamedTuple):
    """One call's parameters on the images' device, the samples left unmixed already folded in.

    Attributes:
        partner: (B,) int64 partner of each sample (a sample left unmixed is its own).
        lam: (B, lambdas, 1, 1) float32 lambdas, (1, lambdas, 1, 1) with ``same_on_batch``; MixUp: each sample's
            own weight, 1 where unmixed; box methods: the box sides' draws. A choice among methods: (B or 1, 1, 1,
            1) MixUp's weight, 1 where a sample takes another method or none.
        corners: box methods: (B or 1, boxes, 2, 2) float32 integer-valued corners ``[[x1, y1], [x2, y2]]``, not
            clipped, empty where unmixed (then (B, ...)); MixUp: None. A choice: (B or 1, 1 or 2, 2, 2), CutMix's
            box or SnapMix's target and source boxes (2 with SnapMix among the methods; CutMix's box is then its
            own source box too), empty where a sample blends or is left unmixed.
        mixed: (B,) bool mixing decisions; None when every sample mixes (p = 1).
        method: a choice among methods: (B,) int64 :data:`METHOD_IDS` of each sample's method, :data:`UNMIXED`
            where none; None for one method.
    """

    partner: Tensor
    lam: Tensor
    corners: Tensor | None
    mixed: Tensor | None
    method: Tensor | None = None


class RandomSource(NamedTuple):
    """Where a call's random numbers come from: a ``torch.Generator`` (None: PyTorch's default one) and the key
    by which the compiled draws find it (0 for the default); made by :func:`random_source`."""

    generator: torch.Generator | None
    key: int = 0


def draw_parameters(
    spec: DrawSpec,
    *,
    source: RandomSource,
    device: torch.device,
    lam_map: Callable[[Tensor], Tensor] | None = None,
) -> MixParameters:
    """The random parameters of one call of ``spec``, on ``device`` (drawn on the generator's device, or
    ``device`` with PyTorch's default generator). ``lam_map`` maps the Beta draws before they make boxes (the
    Kornia classes' ranges).

    Example:
        >>> spec = DrawSpec("cutmix", batch=4, height=8, width=8, alpha=1.0, p=0.5)
        >>> source = RandomSource(torch.Generator().manual_seed(0))  # eager only: random_source() for compile
        >>> params = draw_parameters(spec, source=source, device=torch.device("cpu"))
        >>> params.partner.shape, params.corners.shape, params.mixed.dtype
        (torch.Size([4]), torch.Size([4, 1, 2, 2]), torch.bool)
    """
    counts, generator = _counts(spec), source.generator
    draw_device = generator.device if generator is not None else device
    if torch.compiler.is_compiling():
        partner, lam, centres, decision = _compiled_draws(list(counts), list(spec.alphas), source.key, draw_device)
        centres = centres if counts.boxes else None  # the op returns an empty tensor for a draw not made
        decision = decision if counts.decisions else None
    else:
        partner, lam, centres, decision = _random_draws(counts, spec.alphas, generator, draw_device)
    if draw_device != device:
        partner, lam = partner.to(device, non_blocking=True), lam.to(device, non_blocking=True)
        centres = centres.to(device, non_blocking=True) if centres is not None else None
        decision = decision.to(device, non_blocking=True) if decision is not None else None
    if lam_map is not None:
        lam = lam_map(lam)
    corners = corners_from_draws(lam, centres, spec.height, spec.width) if centres is not None else None
    if len(spec.methods) > 1:
        assert decision is not None and corners is not None
        return _chosen(spec, partner, lam, corners, decision)
    if decision is None:
        return MixParameters(partner, lam, corners, None)
    mixed = (decision < spec.p).expand(spec.batch)  # unmixed: their own partner, lam 1, empty boxes
    partner = torch.where(mixed, partner, positions(spec.batch, device))
    if corners is not None:
        return MixParameters(partner, lam, torch.where(mixed.view(-1, 1, 1, 1), corners, 0.0), mixed)
    return MixParameters(partner, torch.where(mixed.view(-1, 1, 1, 1), lam, 1.0), None, mixed)


def _chosen(spec: DrawSpec, partner: Tensor, lam: Tensor, corners: Tensor, uniform: Tensor) -> MixParameters:
    """A choice among methods: one uniform ``u`` per sample (per batch) picks its method, the one whose slice of
    ``[0, p)`` holds it (``u >= p``: none), and the method's lambda columns and boxes become the sample's."""
    device = partner.device
    method = torch.bucketize(uniform, _choice_bounds(spec.methods, spec.method_p, spec.p, device), right=True)
    picked = {name: (method == METHOD_IDS[name]).view(-1, 1, 1, 1) for name in spec.methods}
    offsets, column = {}, 0  # each method's first lambda column
    for name in spec.methods:
        offsets[name], column = column, column + DRAWS_PER_SAMPLE[name][0]
    weight = _unit(device)
    if "mixup" in picked:
        weight = torch.where(picked["mixup"], lam.narrow(1, offsets["mixup"], 1), 1.0)
    boxes: Tensor | float = 0.0
    for name in ("cutmix", "snapmix"):  # CutMix's box broadcasts into SnapMix's two columns: its own source box
        if name in picked:
            own = corners.narrow(1, offsets[name], DRAWS_PER_SAMPLE[name][1])
            boxes = torch.where(picked[name], own, boxes)
    assert isinstance(boxes, Tensor)
    method = method.expand(spec.batch)
    if spec.p >= 1:
        return MixParameters(partner, weight, boxes, None, method)
    mixed = method != UNMIXED
    return MixParameters(torch.where(mixed, partner, positions(spec.batch, device)), weight, boxes, mixed, method)


@cached(maxsize=16)
def _unit(device: torch.device) -> Tensor:
    return torch.ones(1, 1, 1, 1, device=device)


@cached(maxsize=16)
def _choice_bounds(methods: tuple[str, ...], method_p: tuple[float, ...], p: float, device: torch.device) -> Tensor:
    """(3,) float32 upper ends of each method's slice of ``[0, p)``, in :data:`METHOD_IDS` order (an absent
    method's slice is empty); the last method's ends at ``p`` exactly."""
    total = sum(method_p)
    shares = dict(zip(methods, method_p, strict=True))
    ends = [p * (sum(shares.get(m, 0.0) for m in list(METHOD_IDS)[: i + 1]) / total) for i in range(len(METHOD_IDS))]
    return torch.tensor(ends, dtype=torch.float32, device=device)


class _Counts(NamedTuple):
    """How many of each draw a call makes (the custom op's ``counts``, in this order)."""

    batch: int  # the partners' permutation
    draws: int  # sets of lambdas and boxes: 1 with same_on_batch, else B
    lambdas: int
    boxes: int
    centre_range: int  # box centres are drawn in [0, centre_range): see _counts
    decisions: int  # uniforms for the mixing decisions (and a choice's methods): 0 at p = 1 for one method


def _counts(spec: DrawSpec) -> _Counts:
    """A square image draws its centres as pixels; another draws them in [0, 2**62) (reduced modulo each side by
    :func:`~cekd_losses._boxes.corners_from_draws`), one draw for both axes."""
    one_decision = spec.same_on_batch or spec.batch_gate
    decides = spec.p < 1 or len(spec.methods) > 1  # a choice among methods draws its uniforms at any p
    decisions = 0 if not decides else 1 if one_decision else spec.batch
    centre_range = spec.height if spec.height == spec.width else 2**62
    draws = 1 if spec.same_on_batch else spec.batch
    return _Counts(spec.batch, draws, spec.lambdas, spec.boxes, centre_range, decisions)


def _centre_dtype(centre_range: int) -> torch.dtype:
    """float32 where it holds every centre exactly (as the corners it makes), else int64."""
    return torch.float32 if centre_range <= 2**24 else torch.int64


def _random_draws(
    counts: _Counts, alphas: Sequence[float], generator: torch.Generator | None, device: torch.device
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """Every random choice of one call: a (B,) permutation of partners, (draws, lambdas, 1, 1) Beta(alpha, alpha)
    values (``alphas``: one per lambda column), (draws, boxes, 1, 2) box centres (None for MixUp) and (decisions,)
    uniforms (None at p = 1 for one method)."""
    partner = torch.randperm(counts.batch, generator=generator, device=device)
    if len(set(alphas)) == 1:
        lam = sample_beta(alphas[0], (counts.draws, counts.lambdas, 1, 1), generator, device)
    else:  # methods of a choice with their own alphas: a column each
        lam = torch.cat([sample_beta(a, (counts.draws, 1, 1, 1), generator, device) for a in alphas], dim=1)
    centres = None
    if counts.boxes:
        shape, dtype = (counts.draws, counts.boxes, 1, 2), _centre_dtype(counts.centre_range)
        centres = torch.randint(0, counts.centre_range, shape, generator=generator, dtype=dtype, device=device)
    decision = torch.rand(counts.decisions, generator=generator, device=device) if counts.decisions else None
    return partner, lam, centres, decision


_HAS_DIRICHLET = hasattr(torch, "_sample_dirichlet")


@cached(maxsize=32)
def _concentration(alpha: float, shape: tuple[int, ...], device: torch.device) -> Tensor:
    return torch.full((*shape, 2), alpha, device=device)


def sample_beta(
    alpha: float, shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device
) -> Tensor:
    """float32 draws of Beta(alpha, alpha) of the given ``shape``, seeded by ``generator`` (an internal API, shared
    with the timm drop-in).

    PyTorch's Dirichlet sampler (one kernel) where this torch has it; it is private API, so otherwise
    two Gamma draws with public ops: Beta = G1 / (G1 + G2)."""
    if _HAS_DIRICHLET:
        return torch._sample_dirichlet(_concentration(alpha, shape, device), generator=generator).select(-1, 0)
    gammas = _sample_gamma(alpha, 2 * math.prod(shape), generator, device).view(*shape, 2)
    return gammas.select(-1, 0) / gammas.sum(dim=-1)


def _sample_gamma(shape: float, count: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
    """(count,) Gamma(shape, 1) draws with public ops: Marsaglia and Tsang's method (2000), vectorised
    with 16 candidates per draw, the first accepted one kept (all 16 rejected: p < 1e-20); shape < 1
    is boosted as Gamma(shape + 1) * U^(1 / shape)."""
    boosted = shape + 1.0 if shape < 1 else shape
    d = boosted - 1.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)
    x = torch.randn(count, 16, generator=generator, device=device)
    u = torch.rand(count, 16, generator=generator, device=device)
    v = (1.0 + c * x) ** 3
    accepted = (v > 0) & (u.log() < 0.5 * x * x + d - d * v + d * v.clamp(min=1e-30).log())
    first = accepted.to(torch.uint8).argmax(dim=1, keepdim=True)
    draws = d * v.gather(1, first)[:, 0].clamp(min=1e-30)
    if shape < 1:
        draws = draws * torch.rand(count, generator=generator, device=device) ** (1.0 / shape)
    return draws


# torch.compile cannot take a torch.Generator into a graph: the compiled draws find it by key here, for as long as
# the module that owns it lives (a plain dict: a generator is not weakly referenceable before torch 2.10 or so)
_GENERATORS: dict[int, torch.Generator] = {}
_KEYS = itertools.count(1)


def random_source(generator: object, owner: object) -> RandomSource:
    """``generator`` checked (a ``torch.Generator`` or None) and made findable by the compiled draws until
    ``owner`` (the module that draws with it) is garbage-collected.

    Example:
        >>> random_source(None, object()).key
        0
    """
    if generator is None:
        return RandomSource(None)
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"`generator` must be a torch.Generator or None, got {type(generator).__name__}")
    key = next(_KEYS)
    _GENERATORS[key] = generator
    weakref.finalize(owner, _GENERATORS.pop, key, None)
    return RandomSource(generator, key)


@torch.library.custom_op("cekd_losses::random_draws", mutates_args=(), tags=(torch.Tag.nondeterministic_seeded,))
def _compiled_draws(counts: list[int], alphas: list[float], generator_key: int, device: torch.device) -> list[Tensor]:
    draws = _random_draws(_Counts(*counts), alphas, _GENERATORS.get(generator_key), device)
    return [torch.empty(0, device=device) if t is None else t.contiguous() for t in draws]


@_compiled_draws.register_fake
def _(counts: list[int], alphas: list[float], generator_key: int, device: torch.device) -> list[Tensor]:
    batch, draws, lambdas, boxes, centre_range, decisions = counts
    return [
        torch.empty(batch, dtype=torch.long, device=device),
        torch.empty(draws, lambdas, 1, 1, device=device),
        torch.empty((draws, boxes, 1, 2) if boxes else (0,), dtype=_centre_dtype(centre_range), device=device),
        torch.empty(decisions, device=device),
    ]
