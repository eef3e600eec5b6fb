"""The networks of the methods that train N members together: CEKD's ensemble and the online-distillation
methods' (DML, ONE, FFL, PCL).

CEKD's is :func:`cekd_ensemble`. Each online method's is the library's pieces composed as docs/online.rst
describes, in :class:`Peers`: N members (whole models, or the branches of a :class:`~cekd_losses.SharedTrunk`
with ``--branches-from``) and the teacher the method adds, returning an :class:`~cekd_losses.OnlineOutput` for
:class:`~cekd_losses.OnlineDistillationLoss`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from cekd_losses import (
    BranchGate,
    CollaborativeEnsemble,
    FeatureFusion,
    FeatureTap,
    OnlineOutput,
    PeerContrast,
    PeerViews,
    SharedTrunk,
    TemporalMean,
    TrunkMember,
)

from .config import SYNTHETIC, RunConfig

ONLINE_METHODS = ("dml", "one", "ffl", "pcl", "mcl")
PCL_MAX_DECAY = 0.999  # the temporal mean's largest decay (PCL's)
MCL_BETA = 0.025  # the weight of MCL-OKD's contrastive term (its code's)


def _trunk_channels(trunk: nn.Module, image_size: int) -> int:
    """The channel count of a trunk's output, from one no-grad forward of a blank image in eval mode."""
    mode = trunk.training
    with torch.no_grad():
        channels = int(trunk.eval()(torch.zeros(1, 3, image_size, image_size)).shape[-1 if _tokens(trunk) else 1])
    trunk.train(mode)
    return channels


def _tokens(trunk: nn.Module) -> bool:
    return not isinstance(trunk, nn.Sequential)  # a ViT's trunk gives (B, T, D) tokens; a CNN's is a Sequential


class Teacher(NamedTuple):
    """How a method makes its teacher: the module's attribute name on :class:`Peers`, its builder from
    ``(peers, widths of the members' pooled features, classes, image size)``, and its reading of the members'
    output and taps."""

    name: str
    build: Callable[[Peers, list[int], int, int], nn.Module]
    read: Callable[[nn.Module, Any, list[FeatureTap]], Tensor]


def _gate(peers: Peers, widths: list[int], classes: int, image_size: int) -> nn.Module:
    """ONE's gate: on the trunk's output, or on the members' concatenated pooled features without a trunk."""
    trunk = getattr(peers.members, "trunk", None)
    return BranchGate(_trunk_channels(trunk, image_size) if trunk is not None else sum(widths), peers.count)


def _gated(gate: nn.Module, out: Any, taps: list[FeatureTap]) -> Tensor:
    features = out.features if not taps else torch.cat([tap.pooled for tap in taps], dim=1)
    features = features.mean(1) if features.ndim == 3 else features  # ViT tokens
    return gate.teacher(gate(features), out.member_logits)  # type: ignore[operator]


TEACHERS: dict[str, Teacher | None] = {
    "dml": None,
    "mcl": None,  # its teacher, the members' mean, is the loss's own (OnlineDistillationLoss("mcl"))
    "one": Teacher("gate", _gate, _gated),
    "ffl": Teacher(
        "fusion",
        lambda peers, widths, classes, size: FeatureFusion(widths, classes),
        lambda fusion, out, taps: fusion([tap.features for tap in taps]),
    ),
    "pcl": Teacher(
        "ensemble",
        lambda peers, widths, classes, size: nn.Linear(sum(widths), classes),
        lambda linear, out, taps: linear(torch.cat([tap.pooled for tap in taps], dim=1)),
    ),
}
"""Each online method's teacher (DML has none): ONE's gated teacher, FFL's fused classifier, PCL's peer ensemble."""


def shared_trunk(models: list[nn.Module], stage: str) -> SharedTrunk:
    """The library's :class:`~cekd_losses.SharedTrunk`, its error about the stage naming the flag that gave it."""
    try:
        return SharedTrunk(models, stage)
    except ValueError as error:
        raise ValueError(f"--branches-from {stage}: {str(error).replace('`stage`', 'the stage', 1)}") from None


class Peers(nn.Module):
    """The members of an online-distillation method and its teacher (:data:`TEACHERS`); ``peers(images)`` ->
    OnlineOutput. PCL adds the temporal mean of every member (:meth:`update` after each optimizer step; on
    whole members each peer trains on its own view, :func:`peer_views`)."""

    def __init__(
        self,
        method: str,
        models: list[nn.Module],
        num_classes: int,
        stage: str | None,
        image_size: int,
        mean_buffers: str = "own",
        every_view: bool = False,
        contrast: tuple[int, int] | None = None,
    ):
        super().__init__()
        self.method, self.teacher, self.count = method, TEACHERS[method], len(models)
        self.every_view = every_view  # PCL: every mean model on every peer's view (runs saved before 94be06b)
        self.members: nn.Module = shared_trunk(models, stage) if stage else CollaborativeEnsemble(models)
        if method == "pcl":  # copied before any tap hooks the members: the mean models run no tap
            self.means = TemporalMean(self.members, max_decay=PCL_MAX_DECAY, buffers=mean_buffers)
        branches = list(self.members.branches if stage else self.members.members)  # type: ignore[union-attr]
        tapped = method in ("ffl", "pcl", "mcl") or (method == "one" and not stage)  # they read pooled features
        self.taps = [FeatureTap(branch) for branch in branches] if tapped else []
        if method == "mcl":  # MCL-OKD's contrast between the members' embeddings: (training set size, negatives)
            if contrast is None:
                raise ValueError("MCL-OKD's Peers need contrast=(training set size, negatives)")
            widths = [tap.classifier.in_features for tap in self.taps]
            self.contrast = PeerContrast(widths, num_samples=contrast[0], negatives=contrast[1])
            self.sample_index: Tensor | None = None  # the batch's dataset indices, set before each training forward
            self.contrast_term: Tensor | None = None
        if self.teacher is not None:
            widths = [tap.classifier.in_features for tap in self.taps]
            setattr(self, self.teacher.name, self.teacher.build(self, widths, num_classes, image_size))

    def forward(self, images: Tensor | list[Tensor]) -> OnlineOutput:
        """The members on ``images``, or member i on ``images[i]`` (PCL's per-peer views)."""
        out = self.members(images)
        teacher = None
        if self.teacher is not None:
            teacher = self.teacher.read(getattr(self, self.teacher.name), out, self.taps)
        if self.method == "mcl" and self.training:
            if self.sample_index is None:
                raise ValueError("MCL-OKD's training forward needs the batch's dataset indices (peers.sample_index)")
            self.contrast_term = MCL_BETA * self.contrast([tap.pooled for tap in self.taps], self.sample_index)
        return OnlineOutput(out.member_logits, teacher, self._mean_logits(images))

    def _mean_logits(self, images: Tensor | list[Tensor]) -> Tensor | None:
        """PCL's mean models, (N, B, K): mean j on view j (PCL's code: a mean teacher sees its own peer's
        augmentation; on one input, every mean on it). ``every_view``: (N, N, B, K), [i, j] mean j on view i."""
        if self.method != "pcl":
            return None
        if isinstance(images, Tensor) or not self.every_view:
            return self.means(images).member_logits
        return torch.stack([self.means(view).member_logits for view in images])

    def update(self) -> None:
        """After an optimizer step: PCL's temporal means follow their members (the others have none)."""
        if self.method == "pcl":
            self.means.update(self.members)


def cekd_ensemble(models: list[nn.Module], combine: str, stage: str | None) -> nn.Module:
    """CEKD's ensemble of whole members or, from ``stage`` on, of the branches of one :class:`SharedTrunk`: the
    trunk runs once and the ensemble combines its branches' logits (its gate reads the branches' pooled features)."""
    if stage is None:
        return CollaborativeEnsemble(models, combine)  # type: ignore[arg-type]
    shared = shared_trunk(models, stage)
    return nn.Sequential(shared.trunk, CollaborativeEnsemble(list(shared.branches), combine))  # type: ignore[arg-type]


def peer_views(config: RunConfig, generator: torch.Generator) -> PeerViews | None:
    """PCL's per-peer views, on whole members or a trunk's branches (the trunk then runs once per view): shifts
    of up to 4 px on the synthetic set (its own augmentation; no flips, orientation is its class), an eighth of the
    side and flips on real images (PCL's CIFAR crops); None for the other methods (and a trunk's PCL run saved up
    to 94be06b, one input for all)."""
    if config.method != "pcl" or (config.branches_from and config.pcl_legacy):
        return None
    synthetic = config.dataset in SYNTHETIC
    return PeerViews(config.members, 4 if synthetic else config.image_size // 8, not synthetic, generator)


def evaluated(output: OnlineOutput) -> dict[str, Tensor]:
    """The logits a method is evaluated by: every member, the teacher (as "ensemble"; DML: the members' mean) and
    PCL's mean models ("mean0", ...)."""
    members = output.member_logits
    teacher = output.teacher_logits if output.teacher_logits is not None else members.mean(0)
    logits = {f"member{i}": z for i, z in enumerate(members)} | {"ensemble": teacher}
    if output.mean_logits is not None:
        logits |= {f"mean{i}": z for i, z in enumerate(output.mean_logits)}
    return logits


def cam_tap(net: nn.Module, models: list[nn.Module], stage: str | None) -> FeatureTap:
    """SnapMix's CAMs: from member 0 whole, or on a trunk (``--branches-from``) from the trunk and branch 0."""
    if stage is None:
        return FeatureTap(models[0])
    shared = net.members if isinstance(net, Peers) else None
    trunk = shared.trunk if isinstance(shared, SharedTrunk) else net[0]  # CEKD's: Sequential(trunk, ensemble)
    return FeatureTap(TrunkMember(trunk, models[0]))  # a CNN's branch 0 is model 0 from the stage on
