"""Argument and tensor validation with messages that name the argument, the expected and the received value.

Shape and dtype checks always run. Checks of tensor *values* (class ids in range, boxes inside the
image) run only for CPU tensors in eager mode: on an accelerator they would need a host sync every
step, under ``torch.compile`` a graph break, and out-of-range ids there still fail loudly in the
indexing that uses them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from torch import Tensor


def describe(value: object) -> str:
    """A short description of a received value: a tensor's dtype and shape, a scalar's repr, else its type."""
    if isinstance(value, Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    if value is None or isinstance(value, (bool, int, float, str)):
        text = repr(value)
        return f"{text[:60]}... ({type(value).__name__})" if len(text) > 60 else f"{text} ({type(value).__name__})"
    return f"a {type(value).__name__}"


def check_tensor(name: str, value: object) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {describe(value)}")
    return value


def check_shape(name: str, value: object, expected: Sequence[int | str]) -> Tensor:
    """Check ``value`` has ``len(expected)`` dims; int entries must match exactly, str entries are labels."""
    tensor = check_tensor(name, value)
    shape = tensor.shape
    if len(shape) == len(expected):
        for size, wanted_size in zip(shape, expected, strict=True):
            if isinstance(wanted_size, int) and size != wanted_size:
                break
        else:
            return tensor
    wanted = "(" + ", ".join(str(e) for e in expected) + ("," if len(expected) == 1 else "") + ")"
    raise ValueError(f"`{name}` must have shape {wanted}, got shape {tuple(shape)}")


def check_floating(name: str, value: Tensor) -> Tensor:
    if not value.is_floating_point():
        raise TypeError(f"`{name}` must be a floating point tensor, got dtype {value.dtype}")
    return value


def check_integer(name: str, value: Tensor) -> Tensor:
    if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
        raise TypeError(f"`{name}` must be an integer tensor, got dtype {value.dtype}")
    return value


def check_images(name: str, value: object) -> Tensor:
    if isinstance(value, Tensor) and value.ndim == 4 and value.shape[0] > 0 and value.is_floating_point():
        return value  # the common case, in as few Python calls as possible
    images = check_shape(name, value, ("B", "C", "H", "W"))
    check_floating(name, images)
    if images.shape[0] == 0:
        raise ValueError(f"`{name}` must hold at least one image, got shape {tuple(images.shape)}")
    return images


def check_maps(name: str, value: object, dims: Sequence[int | str]) -> Tensor:
    """Floating maps whose last two dims (the spatial size) are at least 1 x 1."""
    maps = check_floating(name, check_shape(name, value, dims))
    if maps.shape[-1] == 0 or maps.shape[-2] == 0:
        raise ValueError(f"`{name}` must have a spatial size of at least 1 x 1, got shape {tuple(maps.shape)}")
    return maps


def can_read_values(tensor: Tensor) -> bool:
    """Whether checking ``tensor``'s values is free: a CPU tensor outside ``torch.compile``."""
    return tensor.device.type == "cpu" and tensor.numel() > 0 and not torch.compiler.is_compiling()


def check_class_ids(name: str, value: Tensor, num_classes: int, *, what: str = "class ids") -> Tensor:
    check_integer(name, value)
    if can_read_values(value):
        bounds = torch.aminmax(value)
        low, high = int(bounds.min), int(bounds.max)
        if low < 0 or high >= num_classes:
            raise ValueError(f"`{name}` must hold {what} in [0, {num_classes}), got values in [{low}, {high}]")
    return value


def check_positive(name: str, value: object) -> float:
    number = check_real(name, value)
    if not number > 0:
        raise ValueError(f"`{name}` must be > 0, got {value!r}")
    return number


def check_in_range(name: str, value: object, low: float, high: float, *, high_open: bool = False) -> float:
    number = check_real(name, value)
    inside = low <= number < high if high_open else low <= number <= high
    if not inside:
        bracket = ")" if high_open else "]"
        raise ValueError(f"`{name}` must be in [{low}, {high}{bracket}, got {value!r}")
    return number


def check_real(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"`{name}` must be a real number, got {describe(value)}")
    number = float(value)
    if number != number or number in (float("inf"), float("-inf")):
        raise ValueError(f"`{name}` must be finite, got {value!r}")
    return number


def check_interval(name: str, value: object, low: float, high: float) -> tuple[float, float]:
    """A ``(min, max)`` pair inside ``[low, high]`` with ``min <= max``, given as a sequence of two reals or a
    tensor of two values (read once, at construction)."""
    items = value.tolist() if isinstance(value, Tensor) and value.numel() == 2 else value
    if not isinstance(items, (tuple, list)) or len(items) != 2:
        raise TypeError(f"`{name}` must be a (min, max) pair, got {describe(value)}")
    lo, hi = (check_real(name, item) for item in items)
    if not low <= lo <= hi <= high:
        raise ValueError(f"`{name}` must be a (min, max) pair with {low} <= min <= max <= {high}, got {value!r}")
    return lo, hi


def check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"`{name}` must be an int, got {describe(value)}")
    if value < 1:
        raise ValueError(f"`{name}` must be >= 1, got {value!r}")
    return value


def check_nonnegative_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"`{name}` must be an int >= 0, got {value!r}")
    return value


def check_choice(name: str, value: object, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return str(value)


def check_same_device(name: str, value: Tensor, reference_name: str, reference: Tensor) -> Tensor:
    if value.device != reference.device:
        raise ValueError(
            f"`{name}` must be on the same device as `{reference_name}` ({reference.device}), got {value.device}"
        )
    return value


def check_boxes(name: str, value: object, batch: int, height: int, width: int) -> Tensor:
    """Boxes (B, 4) integer as (x1, y1, x2, y2), x2/y2 exclusive, 0 <= x1 <= x2 <= W (value check on CPU only)."""
    boxes = check_shape(name, value, (batch, 4))
    check_integer(name, boxes)
    if can_read_values(boxes):
        x1, y1, x2, y2 = boxes.unbind(1)
        inside = (x1 >= 0) & (x1 <= x2) & (x2 <= width) & (y1 >= 0) & (y1 <= y2) & (y2 <= height)
        if not bool(inside.all()):
            bad = int((~inside).nonzero()[0, 0])
            raise ValueError(
                f"`{name}` must hold boxes (x1, y1, x2, y2) with 0 <= x1 <= x2 <= {width} and "
                f"0 <= y1 <= y2 <= {height}, got {boxes[bad].tolist()} at row {bad}"
            )
    return boxes


def autocast_on(device: torch.device) -> bool:
    """Whether autocast is on for ``device`` (CPU and CUDA; other devices have none to turn off)."""
    kind = device.type
    return (kind == "cpu" or kind == "cuda") and torch.is_autocast_enabled(kind)


def without_autocast(device: torch.device) -> contextlib.AbstractContextManager[None]:
    """A region where autocast is off on ``device`` (CPU and CUDA; other devices have none to turn off)."""
    if autocast_on(device):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


# ---------------------------------------------------------------- losses

REDUCTIONS = ("mean", "sum", "none")


def check_reduction(value: object) -> str:
    return check_choice("reduction", value, REDUCTIONS)


def check_logits(name: str, logits: object) -> Tensor:
    logits = check_shape(name, logits, ("B", "K"))
    return check_floating(name, logits)


def check_target(target: object, batch: int, num_classes: int) -> Tensor:
    """Validate a (B,) class-id or (B, K) soft target (weights >= 0) against logits of shape (batch, num_classes)."""
    if not isinstance(target, Tensor) and isinstance(getattr(target, "targets", None), Tensor):
        raise TypeError(f"`target` must be a tensor, got a {type(target).__name__}; pass its `.targets`")
    target = check_tensor("target", target)
    if target.ndim == 1:
        check_shape("target", target, (batch,))
        return check_class_ids("target", target, num_classes)
    check_shape("target", target, (batch, num_classes))
    check_floating("target", target)
    if can_read_values(target) and bool((target < 0).any()):
        raise ValueError(f"`target` must hold weights >= 0, got a minimum of {float(target.min())}")
    return target


def check_member_logits(member_logits: Tensor | Sequence[Tensor]) -> Tensor:
    """(N, B, K) logits of N >= 2 members from a tensor or a sequence of (B, K) tensors (stacked), checked."""
    if isinstance(member_logits, Tensor):
        stacked = check_shape("member_logits", member_logits, ("N", "B", "K"))
    else:
        if not isinstance(member_logits, Sequence):
            raise TypeError(
                "`member_logits` must be a (N, B, K) tensor or a sequence of (B, K) tensors, "
                f"got {type(member_logits).__name__}"
            )
        for i, logits in enumerate(member_logits):
            check_logits(f"member_logits[{i}]", logits)
        shapes = {tuple(logits.shape) for logits in member_logits}
        if len(shapes) > 1:
            raise ValueError(
                "`member_logits` must all have one shape (B, K), got shapes "
                f"{[tuple(logits.shape) for logits in member_logits]}"
            )
        stacked = torch.stack(list(member_logits)) if member_logits else torch.empty(0, 0, 0)
    check_floating("member_logits", stacked)
    if stacked.shape[0] < 2:
        raise ValueError(f"`member_logits` must hold N >= 2 members, got N = {stacked.shape[0]}")
    return stacked


def check_weights(weights: Tensor | None, batch: int) -> Tensor | None:
    """Validate optional per-sample weights (B,)."""
    if weights is None:
        return None
    weights = check_shape("weights", weights, (batch,))
    return check_floating("weights", weights)
