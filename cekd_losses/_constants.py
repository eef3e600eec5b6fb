"""Small constant tensors built once per shape and device, for the mixing core (an internal API).

On a GPU, building a constant (an ``arange``, a table of one-hot rows, a sampling grid) costs kernel launches
on every call; a mixing call is a few dozen launches, so rebuilding them would be a large share of it. The
builders decorated with :func:`cached` keep their last few results (least recently used first out, so many
shapes, class counts or devices in one process keep memory bounded); under ``torch.compile`` they run in the
graph instead, where the compiler folds them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Hashable
from typing import TypeVar

import torch
from torch import Tensor

Built = TypeVar("Built")


def cached(maxsize: int) -> Callable[[Callable[..., Built]], Callable[..., Built]]:
    """A builder of constants keeps its last ``maxsize`` results by (positional, hashable) arguments; under
    ``torch.compile`` it builds in the graph instead.

    Example:
        >>> @cached(maxsize=4)
        ... def ones(size: int) -> Tensor:
        ...     return torch.ones(size)
        >>> ones(3) is ones(3)
        True
    """

    def decorate(build: Callable[..., Built]) -> Callable[..., Built]:
        kept = functools.lru_cache(maxsize=maxsize)(build)

        @functools.wraps(build)
        def constant(*args: Hashable) -> Built:
            if torch.compiler.is_compiling():
                return build(*args)
            return kept(*args)

        constant.cache_clear = kept.cache_clear  # type: ignore[attr-defined]
        constant.cache_info = kept.cache_info  # type: ignore[attr-defined]
        return constant

    return decorate


@cached(maxsize=64)
def positions(size: int, device: torch.device) -> Tensor:
    """(size,) int64 ``arange(size)`` on ``device``: each sample's own batch position."""
    return torch.arange(size, device=device)
