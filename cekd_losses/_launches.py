"""Kernel launches and host reads of a call, counted on any device: the CPU proxy of a GPU call's launch cost.

On a GPU a small call costs its kernel launches (10-30 us each on an H100) and its host reads of tensor
values (each waits for the GPU), not its bytes. :func:`count_launches` runs a call under a
``TorchDispatchMode`` and records every aten op that would launch a kernel (views and other metadata-only
ops excluded) and every read of a value (``.item()``, ``int(t)``, ``bool(t)``, ``.tolist()``). Used by the
tests that hold the mixer's op budgets and by ``benchmarks/bench_mixing.py --ops``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_METADATA_ONLY = {"lift_fresh", "_unsafe_view", "_local_scalar_dense"}  # besides views


@dataclass
class Launches:
    """What one call did: the kernel-launching ops in order, and the host reads of tensor values."""

    ops: list[str] = field(default_factory=list)
    reads: int = 0


class _Counter(TorchDispatchMode):  # type: ignore[no-untyped-call]
    def __init__(self, launches: Launches) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.launches = launches

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = func.overloadpacket.__name__
        if name == "_local_scalar_dense":
            self.launches.reads += 1
        elif not func.is_view and name not in _METADATA_ONLY:
            self.launches.ops.append(name)
        return func(*args, **(kwargs or {}))


def count_launches(call: Callable[[], object], *, warm: bool = True) -> Launches:
    """Run ``call`` (after one warm-up call, which builds cached constants) and count what it launches and reads.

    Example:
        >>> x = torch.rand(4)
        >>> launches = count_launches(lambda: float((x + 1).sum()))
        >>> launches.ops, launches.reads
        (['add', 'sum'], 1)
    """
    if warm:
        call()
    launches = Launches()
    real_tolist = torch.Tensor.tolist

    def tolist(tensor: torch.Tensor) -> Any:  # a C++ read that does not pass the dispatcher
        launches.reads += 1
        return real_tolist(tensor)

    torch.Tensor.tolist = tolist  # type: ignore[method-assign,assignment]
    try:
        with _Counter(launches):
            call()
    finally:
        torch.Tensor.tolist = real_tolist  # type: ignore[method-assign]
    return launches
