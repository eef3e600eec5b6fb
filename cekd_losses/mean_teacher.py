"""Temporal mean models: the exponential moving average of a network's weights that PCL (Wu and Gong, AAAI
2021) uses as each peer's mean teacher."""

from __future__ import annotations

import copy
from typing import Any, Literal

import torch
from torch import nn

from . import _checks

MeanBuffers = Literal["copied", "averaged", "own"]
"""What :class:`TemporalMean` does with the network's buffers (BatchNorm's running statistics) at each update."""


class TemporalMean(nn.Module):
    """A network's temporal mean: a copy whose weights follow the network's as an exponential moving average.

    After each optimizer step, :meth:`update` moves every parameter ``theta'`` of the copy towards the network's
    ``theta``: ``theta' <- d theta' + (1 - d) theta`` with ``d = min(1 - 1 / (n + 1), max_decay)``, ``n`` the
    number of updates before this one (PCL's decay, so the first update copies the network and the mean then
    averages ever more steps, up to a horizon of about ``1 / (1 - max_decay)`` steps). The copy takes no
    gradient: its parameters do not require one and :meth:`forward` runs without autograd, so its outputs are
    teachers' targets. Its state dict holds the copy's weights, buffers and the update count, so a checkpoint of
    it resumes exactly.

    Three conventions exist for the buffers (BatchNorm's running statistics and counts), and ``buffers`` picks one:

    - ``"copied"``: each update copies the network's, so the mean runs averaged weights with the live network's
      statistics (timm's ``ModelEmaV3(apply_buffer_ema=False)``);
    - ``"averaged"``: floating buffers follow the same moving average as the weights, the others are copied
      (timm's ``ModelEmaV3`` default);
    - ``"own"``: updates leave them alone; the mean keeps statistics of its own, gathered by its forwards in
      training mode (PCL's reference code, whose mean models run forward in train mode every step).

    Build it before hooking the network (a :class:`~cekd_losses.FeatureTap`, a combiner that taps features): the
    deep copy would carry the hooks and run them on every forward of the mean.

    Args:
        model: the network to follow; it is deep-copied once, here.
        max_decay: the largest decay, in [0, 1) (PCL: 0.999).
        buffers: ``"copied"``, ``"averaged"`` or ``"own"``.

    Example:
        >>> net = nn.Linear(3, 2)
        >>> mean = TemporalMean(net)
        >>> with torch.no_grad():
        ...     _ = net.weight.add_(1.0)
        >>> mean.update(net)  # the first update copies: d = 0
        >>> torch.equal(mean.model.weight, net.weight), mean.updates
        (True, 1)
        >>> mean(torch.rand(4, 3)).requires_grad
        False
    """

    def __init__(self, model: nn.Module, max_decay: float = 0.999, buffers: MeanBuffers = "copied") -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"`model` must be an nn.Module, got {type(model).__name__}")
        self.max_decay = _checks.check_in_range("max_decay", max_decay, 0.0, 1.0, high_open=True)
        self.buffers_rule = _checks.check_choice("buffers", buffers, ("copied", "averaged", "own"))
        self.model = copy.deepcopy(model)
        self.model.requires_grad_(False)
        self.updates = 0

    def decay(self) -> float:
        """The decay of the next :meth:`update`: ``min(1 - 1 / (updates + 1), max_decay)``."""
        return min(1.0 - 1.0 / (self.updates + 1), self.max_decay)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the mean towards ``model`` (the network it follows, after its optimizer step): one lerp over
        all parameters, the buffers as ``buffers`` says. ``model`` must have the copy's parameter and buffer names
        and shapes."""
        own, theirs = dict(self.model.named_parameters()), dict(model.named_parameters())
        own_buffers, their_buffers = dict(self.model.named_buffers()), dict(model.named_buffers())
        for kind, mine, other in (("parameters", own, theirs), ("buffers", own_buffers, their_buffers)):
            if mine.keys() != other.keys() or any(mine[k].shape != other[k].shape for k in mine):
                differ = sorted(set(mine) ^ set(other)) or [k for k in mine if mine[k].shape != other[k].shape]
                raise ValueError(
                    f"`model` must have the {kind} of the network this mean follows (names and shapes), got "
                    f"{type(model).__name__} differing at {differ[:3]}"
                )
        averaged = (
            [k for k, b in own_buffers.items() if b.is_floating_point()] if self.buffers_rule == "averaged" else []
        )
        means = [own[k] for k in own] + [own_buffers[k] for k in averaged]
        followed = [theirs[k].detach() for k in own] + [their_buffers[k] for k in averaged]
        torch._foreach_lerp_(means, followed, 1.0 - self.decay())
        if self.buffers_rule != "own":  # "copied", and "averaged"'s integer buffers (BatchNorm's counts)
            for name in own_buffers.keys() - set(averaged):
                own_buffers[name].copy_(their_buffers[name])
        self.updates += 1

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The mean network's output, without autograd (a teacher's target)."""
        with torch.no_grad():
            return self.model(*args, **kwargs)

    def get_extra_state(self) -> dict[str, int | str]:
        return {"updates": self.updates, "buffers": self.buffers_rule}

    def set_extra_state(self, state: dict[str, int | str]) -> None:
        rule = state.get("buffers", "copied")  # state dicts saved before the rule was a choice copied the buffers
        if rule != self.buffers_rule:
            raise ValueError(
                f"the state dict is of a TemporalMean with buffers={rule!r}, this one has buffers="
                f"{self.buffers_rule!r}: build it with buffers={rule!r} to load it"
            )
        self.updates = int(state["updates"])

    def extra_repr(self) -> str:
        return f"max_decay={self.max_decay}, buffers={self.buffers_rule!r}, updates={self.updates}"
