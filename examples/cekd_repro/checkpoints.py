"""Checkpoints of a run: written atomically after every epoch, holding tensors and plain Python values
only, read back with ``weights_only=True``."""

from __future__ import annotations

import os
import random
import re
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from .run import Run


def write_atomic(path: Path, payload: object) -> None:
    partial = path.with_name(path.name + ".partial")
    torch.save(payload, partial)
    os.replace(partial, path)


def _rng_states() -> dict:
    """Every random stream of the process, as tensors and plain Python values (a weights_only load reads them)."""
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [kind, keys.tolist(), position, has_gauss, gauss],
        "python": random.getstate(),
    }


def _set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    if states["cuda"]:
        torch.cuda.set_rng_state_all(states["cuda"])
    kind, keys, position, has_gauss, gauss = states["numpy"]  # older checkpoints hold an array of keys
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), position, has_gauss, gauss))
    random.setstate(states["python"])


def save_checkpoint(run: Run, path: Path, epoch: int, history: list[dict]) -> None:
    """Everything a resume needs after ``epoch`` epochs, written atomically (a kill mid-write leaves the
    previous checkpoint whole)."""
    write_atomic(
        path,
        {
            "epoch": epoch,
            "model": run.net.state_dict(),
            "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict(),
            "scaler": run.scaler.state_dict(),
            "rng": _rng_states(),
            "mixer_generator": run.mixer.generator.get_state()
            if run.mixer is not None and run.mixer.generator
            else None,
            "views_generator": run.views.generator.get_state() if run.views and run.views.generator else None,
            "history": history,
        },
    )


# Checkpoints written before they held plain types keep NumPy's RNG state as an array: rebuilding an
# array runs no code, so a safe load may accept these globals.
_OLD_CHECKPOINT_GLOBALS = [np.ndarray, np.dtype, type(np.dtype(np.uint32)), np.zeros(1).__reduce__()[0]]


def read_checkpoint(path: Path, flag: str) -> dict:
    """A checkpoint's contents, loaded with ``weights_only=True`` (tensors and plain types only: a
    file that holds any other pickled object is refused by name, and none of its code runs)."""
    try:
        with torch.serialization.safe_globals(_OLD_CHECKPOINT_GLOBALS):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated, corrupted or foreign files raise many types
        objects = list(dict.fromkeys(re.findall(r"GLOBAL (\S+)", str(error))))
        if objects:
            raise ValueError(
                f"{flag} {path.parent}: {path} holds pickled objects ({', '.join(objects)}) that a safe "
                "load refuses; it was not written by this program: do not resume it"
            ) from None
        raise ValueError(
            f"{flag} {path.parent}: {path} is not a readable checkpoint ({type(error).__name__}); "
            "it is written atomically, so it was damaged after the run: delete it to restart from "
            "epoch 0"
        ) from None
    if not isinstance(state, dict) or not {"epoch", "model", "optimizer", "history"} <= set(state):
        raise ValueError(
            f"{flag} {path.parent}: {path} is not a checkpoint of this program (no epoch, model, optimizer and history)"
        )
    return state


def load_checkpoint(run: Run, path: Path) -> tuple[int, list[dict]]:
    """Restore ``run`` and the RNGs from :func:`save_checkpoint`'s file; returns (epochs done, history)."""
    state = read_checkpoint(path, flag="--resume")
    run.net.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    if state["scaler"]:  # empty when saved without fp16 (a resume may switch --amp)
        run.scaler.load_state_dict(state["scaler"])
    if run.mixer is not None and run.mixer.generator is not None:
        run.mixer.generator.set_state(state["mixer_generator"])
    if run.views is not None and run.views.generator is not None:
        run.views.generator.set_state(state["views_generator"])
    _set_rng_states(state["rng"])
    return state["epoch"], state["history"]
