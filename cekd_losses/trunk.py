"""SharedTrunk: N models split at one stage into a trunk that runs once per batch and N branches, as ONE, FFL and
PCL build their members (the low layers shared, each branch with its own high layers and head)."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

__all__ = ["SharedTrunk", "TrunkMember", "TrunkOutput"]


class TrunkOutput(NamedTuple):
    """What :class:`SharedTrunk` returns.

    Attributes:
        member_logits: (N, B, K) logits of every branch.
        features: the trunk's output, the branches' common input: (B, C, h, w) for a CNN, (B, T, D) tokens for
            a ViT (ONE's gate reads it, see :class:`~cekd_losses.BranchGate`).
    """

    member_logits: Tensor
    features: Tensor


class _ViTTrunk(nn.Module):
    """A timm VisionTransformer up to (not including) block ``stage``: patch and position embedding, blocks."""

    def __init__(self, model: Any, stage: int) -> None:
        super().__init__()
        self.model = model
        model.blocks = model.blocks[:stage]
        model.norm, model.fc_norm, model.head = nn.Identity(), nn.Identity(), nn.Identity()

    def forward(self, images: Tensor) -> Tensor:
        model: Any = self.model
        tokens = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))
        out: Tensor = model.blocks(tokens)
        return out


class _ViTBranch(nn.Module):
    """A timm VisionTransformer from block ``stage`` on: the later blocks, the final norm and the head."""

    def __init__(self, model: Any, stage: int) -> None:
        super().__init__()
        self.model = model
        model.blocks = model.blocks[stage:]
        model.patch_embed = nn.Identity()
        for name in ("cls_token", "reg_token", "pos_embed"):
            if isinstance(getattr(model, name, None), nn.Parameter):
                model.register_parameter(name, None)

    def forward(self, tokens: Tensor) -> Tensor:
        model: Any = self.model
        out: Tensor = model.forward_head(model.norm(model.blocks(tokens)))
        return out

    def get_classifier(self) -> nn.Module:
        """The ViT's head, as timm names it (so :func:`~cekd_losses.find_classifier` finds the branch's head)."""
        head: nn.Module = self.model.get_classifier()
        return head


def _is_timm_vit(model: nn.Module) -> bool:
    return all(hasattr(model, name) for name in ("patch_embed", "_pos_embed", "blocks", "forward_head"))


def _split_vit(models: Sequence[nn.Module], stage: str) -> tuple[nn.Module, list[nn.Module]]:
    depth = len(models[0].blocks)  # type: ignore[arg-type]
    index = stage.removeprefix("blocks.")
    if not (stage.startswith("blocks.") and index.isdigit() and 0 < int(index) < depth):
        raise ValueError(f"`stage` of a ViT must be 'blocks.<i>' with 0 < i < {depth} (its depth), got {stage!r}")
    trunk = _ViTTrunk(copy.deepcopy(models[0]), int(index))
    return trunk, [_ViTBranch(model, int(index)) for model in models]


def _prefix(model: nn.Module, stage: str) -> list[tuple[nn.Module, str]]:
    """(parent, name) of every module that runs before ``stage``: the model's children registered before the
    stage's top-level module, then, for ``"parent.i"``, the Sequential parent's children before ``i``."""
    top, _, inner = stage.partition(".")
    names = [name for name, _ in model.named_children()]
    if top not in names or (inner and not isinstance(getattr(model, top), nn.Sequential)):
        raise ValueError(
            f"`stage` must name a child of the model or a child of one of its Sequential children, "
            f"one of {names} or '<Sequential>.<i>', got {stage!r}"
        )
    prefix = [(model, name) for name in names[: names.index(top)]]
    if inner:
        parent = getattr(model, top)
        inner_names = [name for name, _ in parent.named_children()]
        if inner not in inner_names:
            raise ValueError(f"`stage` {stage!r} must name a child of {top!r}, one of {inner_names}")
        prefix += [(parent, name) for name in inner_names[: inner_names.index(inner)]]
    if not prefix:
        raise ValueError(f"`stage` {stage!r} is the model's first module: the trunk would be empty")
    return prefix


def _split_prefix(models: Sequence[nn.Module], stage: str) -> tuple[nn.Module, list[nn.Module]]:
    prefixes = [_prefix(model, stage) for model in models]
    trunk = nn.Sequential(*(getattr(parent, name) for parent, name in prefixes[0]))
    shapes = [
        [tuple(p.shape) for parent, name in prefix for p in getattr(parent, name).parameters()] for prefix in prefixes
    ]
    for i, prefix_shapes in enumerate(shapes[1:], start=1):
        if prefix_shapes != shapes[0]:
            raise ValueError(f"`models` must share the trunk's architecture up to {stage!r}: model {i} differs from 0")
    for prefix in prefixes:
        for parent, name in prefix:
            setattr(parent, name, nn.Identity())
    return trunk, list(models)


class SharedTrunk(nn.Module):
    """N models of one architecture as one trunk and N branches: the trunk runs once per batch.

    The modules before ``stage`` are taken from the first model into the trunk (and replaced by identities in
    every model); each model, from ``stage`` on, becomes a branch with its own layers and head, so the N models'
    own initialisations (pretrained weights, seeds, new heads) carry over. The trunk's gradient gathers from
    every branch. Supported splits:

    - models whose forward runs their children in registration order up to ``stage`` (timm and torchvision
      ResNets, ConvNeXts, EfficientNets, MobileNets): ``stage`` names a child (``"layer3"``) or a child of a
      Sequential child (``"stages.2"`` of a timm ConvNeXt, ``"features.4"`` of a torchvision one);
    - timm VisionTransformers, split between blocks: ``"blocks.<i>"`` (the trunk: embeddings and blocks
      before i; the branches: blocks i..., the final norm and the head).

    Args:
        models: N >= 2 distinct models of one architecture. They are taken apart: afterwards they are the
            branches (as ``branches[i]``).
        stage: the first module of the branches.

    Call: ``model(images)`` -> :class:`TrunkOutput` (member logits (N, B, K), the trunk's features); ``model([view_1,
    ..., view_N])`` runs the trunk once per view and branch i on view i (PCL's per-peer views).

    Example:
        >>> import torchvision
        >>> model = SharedTrunk([torchvision.models.resnet18(num_classes=5) for _ in range(3)], stage="layer3")
        >>> out = model(torch.rand(2, 3, 32, 32))
        >>> out.member_logits.shape, out.features.shape
        (torch.Size([3, 2, 5]), torch.Size([2, 128, 4, 4]))
    """

    def __init__(self, models: Sequence[nn.Module], stage: str) -> None:
        super().__init__()
        if not isinstance(models, (list, tuple)) or len(models) < 2:
            raise ValueError(f"`models` must list N >= 2 models, got {type(models).__name__} of {len(models)}")
        if len({id(model) for model in models}) < len(models):
            raise ValueError("`models` must be distinct objects (build one model per branch), got a repeated one")
        kinds = [type(model).__name__ for model in models]
        if len(set(kinds)) > 1:
            raise ValueError(f"`models` must share one architecture, got {kinds}")
        if not isinstance(stage, str):
            raise TypeError(f"`stage` must be a module name such as 'layer3', got {type(stage).__name__}")
        self.stage = stage
        split = _split_vit if _is_timm_vit(models[0]) else _split_prefix
        trunk, branches = split(models, stage)
        self.trunk = trunk
        self.branches = nn.ModuleList(branches)

    def extra_repr(self) -> str:
        return f"stage={self.stage!r}, branches={len(self.branches)}"

    def forward(self, images: Tensor | Sequence[Tensor]) -> TrunkOutput:
        """The trunk on (B, C, H, W) ``images`` once, then every branch on its output; or, given N views of the
        batch (one per branch, PCL's :class:`~cekd_losses.PeerViews`), the trunk on each view and branch i on view
        i's features (``features`` then (N, B, ...))."""
        if isinstance(images, Tensor):
            features = self.trunk(images)
            return TrunkOutput(torch.stack([branch(features) for branch in self.branches]), features)
        if len(images) != len(self.branches):
            raise ValueError(
                f"`images` must be one batch or one view per branch ({len(self.branches)}), got {len(images)}"
            )
        views = [self.trunk(view) for view in images]
        logits = [branch(view) for branch, view in zip(self.branches, views, strict=True)]
        return TrunkOutput(torch.stack(logits), torch.stack(views))

    def member(self, index: int) -> TrunkMember:
        """Member ``index`` as a whole network, the trunk then its branch (the same modules, not copies): what a
        :class:`~cekd_losses.FeatureTap` of one member taps, e.g. for SnapMix's CAMs on a trunk.

        Example:
            >>> import torchvision
            >>> from cekd_losses import FeatureTap
            >>> shared = SharedTrunk([torchvision.models.resnet18(num_classes=5) for _ in range(2)], "layer3")
            >>> FeatureTap(shared.member(0)).cams(torch.rand(2, 3, 64, 64), torch.tensor([0, 4])).shape
            torch.Size([2, 2, 2])
        """
        if not 0 <= index < len(self.branches):
            raise ValueError(f"`index` must be a branch in [0, {len(self.branches)}), got {index!r}")
        return TrunkMember(self.trunk, self.branches[index])


class TrunkMember(nn.Module):
    """One member of a :class:`SharedTrunk` as a whole network: ``branch(trunk(images))``. Attributes it lacks
    are the branch's (its ``fc``, ``avgpool``, ``forward_head``, ...), so a :class:`~cekd_losses.FeatureTap` finds
    its feature map and head as on the model the branch was cut from (CNN splits; a ViT's branch is not that
    model). Made by :meth:`SharedTrunk.member`; it shares the modules, so keep it out of a module whose state is
    saved (the parameters would be saved twice).
    """

    def __init__(self, trunk: nn.Module, branch: nn.Module) -> None:
        super().__init__()
        self.trunk, self.branch = trunk, branch

    def forward(self, images: Tensor) -> Tensor:
        logits: Tensor = self.branch(self.trunk(images))
        return logits

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("trunk", "branch"):
                raise
            return getattr(super().__getattr__("branch"), name)
