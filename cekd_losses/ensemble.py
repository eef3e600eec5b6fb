"""CollaborativeEnsemble: N >= 2 user models trained together, with their ensemble.

The ensemble's logits combine the members' logits (``"mean"``), or are weighted by a learned
per-sample gate over members (``"gate"``, after ONE, Lan et al. 2018, on the members' pooled features
rather than a shared trunk's), or come from a linear classifier on the members' concatenated pooled features
(``"linear"``: PCL's peer ensemble teacher; FFL's own fusion module works on the feature maps, see
:class:`~cekd_losses.FeatureFusion`).
Gate and linear read the pooled features through :class:`~cekd_losses.cam.FeatureTap` hooks during
the members' own forward: no second forward.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, NamedTuple

import torch
from torch import Tensor, nn

from . import _checks
from .cam import FeatureTap, find_classifier

__all__ = ["CollaborativeEnsemble", "Combine", "EnsembleOutput"]

Combine = Literal["mean", "gate", "linear"]
"""How :class:`CollaborativeEnsemble` makes the ensemble's logits: ``"mean"``, ``"gate"`` or ``"linear"``."""
_COMBINES = ("mean", "gate", "linear")
_RENAMED = {"fusion": "linear"}  # the earlier name, still read (saved runs and configs resume)


class EnsembleOutput(NamedTuple):
    """What :class:`CollaborativeEnsemble` returns.

    Attributes:
        member_logits: (N, B, K) logits of every member.
        ensemble_logits: (B, K) logits of the ensemble.
    """

    member_logits: Tensor
    ensemble_logits: Tensor


def _num_classes(model: nn.Module) -> int | None:
    head = find_classifier(model)
    return head.out_features if head is not None else None


def _check_members(members: object) -> None:
    if not isinstance(members, (list, tuple, nn.ModuleList)):
        raise TypeError(f"`members` must be a list of nn.Module, got {type(members).__name__}")
    for i, member in enumerate(members):
        if not isinstance(member, nn.Module):
            raise TypeError(f"`members[{i}]` must be a torch.nn.Module, got {type(member).__name__}")
    if len(members) < 2:
        raise ValueError(f"`members` must hold N >= 2 models, got N = {len(members)}")


def _member_taps(
    members: Sequence[nn.Module], taps: Sequence[FeatureTap | None] | None, combine: str
) -> list[FeatureTap]:
    """One :class:`~cekd_losses.FeatureTap` per member for a gate or linear combiner: the given ones (each of its
    member), and for None entries one found automatically."""
    if taps is not None and (not isinstance(taps, (list, tuple)) or len(taps) != len(members)):
        raise ValueError(f"`taps` must be a list of N = {len(members)} FeatureTap or None entries, got {taps!r}"[:200])
    given = list(taps) if taps is not None else [None] * len(members)
    for i, (member, tap) in enumerate(zip(members, given, strict=True)):
        if tap is not None and (not isinstance(tap, FeatureTap) or tap.model is not member):
            raise ValueError(f"`taps[{i}]` must be a FeatureTap of members[{i}], got {type(tap).__name__}")
        if tap is None and find_classifier(member) is None:
            raise ValueError(
                f"combine={combine!r} reads the input of each member's linear classifier, and none was "
                f"found in members[{i}] ({type(member).__name__}); pass taps=[..., "
                f"FeatureTap(members[{i}], classifier=<its nn.Linear head>), ...] (None for the others)"
            )
    return [tap if tap is not None else FeatureTap(member) for member, tap in zip(members, given, strict=True)]


class CollaborativeEnsemble(nn.Module):
    """Wrap N >= 2 classifiers (any ``nn.Module`` mapping images to (B, K) logits) as one ensemble.

    Architectures may differ (e.g. a timm resnet18 with a torchvision mobilenet_v3_small) as long
    as they predict the same K classes.

    Args:
        members: the N models.
        combine: ``"mean"`` of member logits; ``"gate"``: ``sum_i g_i(x) z_i`` with
            ``g = softmax(Linear(concat pooled features))``; ``"linear"``: ``Linear(concat pooled
            features)``, PCL's peer ensemble teacher. Gate and linear read the input of each member's linear classifier
            through a :class:`~cekd_losses.cam.FeatureTap` (found automatically for timm and
            torchvision classifiers, see :func:`~cekd_losses.find_classifier`).
        taps: gate and linear only: one entry per member, a :class:`~cekd_losses.cam.FeatureTap` of
            that member (``FeatureTap(member, classifier=...)`` for a custom model) or None to find
            it automatically.

    Call: ``ensemble(x)`` feeds the same (B, C, H, W) input to every member, ``ensemble([x_1, ...,
    x_N])`` one view per member; returns :class:`EnsembleOutput`.

    Example:
        >>> import torchvision
        >>> ensemble = CollaborativeEnsemble([torchvision.models.resnet18(num_classes=5) for _ in range(2)])
        >>> out = ensemble(torch.rand(4, 3, 32, 32))
        >>> out.member_logits.shape, out.ensemble_logits.shape
        (torch.Size([2, 4, 5]), torch.Size([4, 5]))
    """

    def __init__(
        self,
        members: Sequence[nn.Module],
        combine: Combine = "mean",
        taps: Sequence[FeatureTap | None] | None = None,
    ) -> None:
        super().__init__()
        _check_members(members)
        self.combine = _checks.check_choice("combine", _RENAMED.get(combine, combine), _COMBINES)
        self.members = nn.ModuleList(members)
        classes = [_num_classes(member) for member in members]
        known = {k for k in classes if k is not None}
        if len(known) > 1:
            raise ValueError(f"every member must predict the same number of classes K, got K = {classes} per member")
        self.num_classes = known.pop() if known else None
        if taps is not None and self.combine == "mean":
            raise ValueError("`taps` are read by combine='gate' or 'linear' only, got taps with combine='mean'")
        self._taps: list[FeatureTap] = [] if self.combine == "mean" else _member_taps(members, taps, self.combine)
        if self._taps:
            depth = sum(tap.classifier.in_features for tap in self._taps)
            out = len(members) if self.combine == "gate" else self._taps[0].classifier.out_features
            self.head = nn.Linear(depth, out)

    def __len__(self) -> int:
        return len(self.members)

    def extra_repr(self) -> str:
        return f"members={len(self.members)}, num_classes={self.num_classes}, combine={self.combine!r}"

    def member(self, i: int) -> nn.Module:
        """The i-th wrapped model, as given (for export or single-model inference)."""
        return self.members[i]

    def forward(self, x: Tensor | Sequence[Tensor]) -> EnsembleOutput:
        """Run every member on ``x`` (B, C, H, W), or member i on ``x[i]``; combine their (B, K) logits.

        Returns :class:`EnsembleOutput` with (N, B, K) member logits and (B, K) ensemble logits."""
        if isinstance(x, Tensor):
            views: Sequence[Tensor] = [x] * len(self.members)
        elif isinstance(x, Sequence) and len(x) == len(self.members):
            views = x
        else:
            got = f"a sequence of {len(x)} inputs" if isinstance(x, Sequence) else type(x).__name__
            raise ValueError(f"`x` must be one input tensor or a sequence of N = {len(self.members)} inputs, got {got}")
        outputs = [member(view) for member, view in zip(self.members, views, strict=True)]
        reference = None
        for i, logits in enumerate(outputs):
            if not isinstance(logits, Tensor) or logits.ndim != 2:
                got = f"shape {tuple(logits.shape)}" if isinstance(logits, Tensor) else type(logits).__name__
                raise ValueError(f"member {i} must return (B, K) logits, got {got}")
            if reference is None:
                reference = logits.shape
            elif logits.shape != reference:
                raise ValueError(
                    f"every member must return logits of one shape (B, K), got {[tuple(o.shape) for o in outputs]}"
                )
        member_logits = torch.stack(outputs)
        return EnsembleOutput(member_logits, self._combine(member_logits))

    def _combine(self, member_logits: Tensor) -> Tensor:
        if self.combine == "mean":
            return member_logits.mean(dim=0)
        pooled = torch.cat([tap.pooled.flatten(1) for tap in self._taps], dim=1)
        scores: Tensor = self.head(pooled)
        if self.combine == "linear":
            return scores
        gate = scores.softmax(dim=1).to(member_logits.dtype)  # (B, N)
        return torch.einsum("bn,nbk->bk", gate, member_logits)

    def predict(self, x: Tensor | Sequence[Tensor]) -> Tensor:
        """(B, K) ensemble logits for ``x`` (same convention as :meth:`forward`)."""
        return self.forward(x).ensemble_logits
