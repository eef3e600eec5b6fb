"""Run directories: a new run takes an empty or reusable dir (never another run's), a resume reads the
saved config and may change only a few options, and the files every run writes."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import replace
from pathlib import Path

from .config import RunConfig


class RunDirExists(FileExistsError):
    """A run dir that already holds a run and was not asked to be resumed."""


RUN_FILES = {"config.json", "metrics.jsonl", "checkpoint.pt", "checkpoint.pt.partial", "cams.png"}
# what --resume may change; the rest is the run. --clip-grad and --amp let a diverged run go on from its last
# good epoch; the cache gives the same pixels as decoding; evaluation draws no random number and changes no weight
RESUME_CHANGES = ("epochs", "workers", "device", "quiet", "clip_grad", "amp", "cache_dir", "no_cache", "eval_every")
# (--device only within its kind: cuda:0 -> cuda:1, not cuda -> cpu)


def _read_config(run_dir: Path) -> dict:
    path = run_dir / "config.json"
    try:
        saved = json.loads(path.read_text())
        RunConfig(**saved)
    except FileNotFoundError:
        raise ValueError(f"--resume {run_dir}: no run there (no config.json)") from None
    except (ValueError, TypeError) as error:
        raise ValueError(
            f"--resume {run_dir}: {path} is not a run config ({error}); start a new run with another --run-dir"
        ) from None
    return saved


def resumed_config(run_dir: str | Path, **changes) -> RunConfig:
    """The config saved in ``run_dir`` with the few values a resume may change (see :func:`apply_resume_changes`)."""
    run_dir = Path(run_dir)
    saved = _read_config(run_dir)
    if saved.get("method") == "pcl" and "mean_buffers" not in saved:  # saved before PCL followed its code
        saved.update(mean_buffers="copied", pcl_legacy=True)  # statistics copied, every mean on every view
    if saved.get("method") == "dml" and "rampup_epochs" in saved:
        saved.setdefault("dml_ramp", True)  # DML runs saved before it followed its paper ramped as the others
    return apply_resume_changes(RunConfig(**saved), changes, run_dir / "config.json")


def _flags(names: Iterable[str]) -> str:
    """Option names as the command line spells them: ``clip_grad`` -> ``--clip-grad``."""
    return ", ".join("--" + name.replace("_", "-") for name in names)


def apply_resume_changes(saved: RunConfig, changes: dict, source: Path) -> RunConfig:
    """``saved`` with ``changes`` of the fields in ``RESUME_CHANGES`` only; ``epochs`` may only grow, and
    only with the multistep schedule (a one-cycle schedule is fixed by its length)."""
    refused = sorted(set(changes) - set(RESUME_CHANGES))
    if refused:
        raise ValueError(
            f"--resume continues the run as saved in {source}; it cannot change {_flags(refused)} "
            f"(it may change {_flags(RESUME_CHANGES)})"
        )
    device = changes.get("device", saved.device)
    if device.split(":")[0] != saved.device.split(":")[0]:
        raise ValueError(
            f"--device {device}: this run trains on {saved.device} and resumes on that kind of device "
            "(its mixer's random stream lives there); another index of it is fine"
        )
    epochs = changes.get("epochs", saved.epochs)
    if epochs < saved.epochs or (epochs != saved.epochs and saved.schedule == "onecycle"):
        raise ValueError(
            f"--epochs {epochs}: a resumed run keeps its {saved.epochs} epochs, or extends them with "
            f"the multistep schedule only (this run's schedule: {saved.schedule})"
        )
    return replace(saved, **changes)


def prepare_run_dir(run_dir: Path, resume: bool) -> None:
    """A new run may use an empty dir, or one whose run never finished an epoch (no checkpoint.pt: a
    run that failed or was killed before its first checkpoint); anything else is refused."""
    if resume and not (run_dir / "checkpoint.pt").exists() and (run_dir / "weights.pt").exists():
        raise ValueError(
            f"--resume {run_dir}: the run finished and kept only weights.pt (--keep weights); nothing to resume"
        )
    if resume or not run_dir.exists():
        return
    if (run_dir / "checkpoint.pt").exists() or (run_dir / "weights.pt").exists():
        raise RunDirExists(
            f"run dir {run_dir} already holds a run; pass --resume {run_dir} to continue it, "
            "or choose another --run-dir"
        )
    foreign = sorted(p.name for p in run_dir.iterdir() if p.name not in RUN_FILES)
    if foreign:
        raise RunDirExists(f"run dir {run_dir} holds other files ({', '.join(foreign[:3])}); choose another --run-dir")


def write_run_files(run_dir: Path, config: RunConfig, history: list[dict]) -> None:
    """config.json (the options that apply to the run) and metrics.jsonl (one line per finished epoch)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(config.saved(), indent=2))
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(record) + "\n" for record in history))


def append_record(run_dir: Path, record: dict) -> None:
    """One epoch's line in metrics.jsonl."""
    with open(run_dir / "metrics.jsonl", "a") as log:
        log.write(json.dumps(record) + "\n")


def _held_by_another(claim: Path) -> bool:
    """Whether the process named in ``claim`` (its pid) still runs on this machine."""
    try:
        os.kill(int(claim.read_text()), 0)
    except ProcessLookupError:
        return False
    except (ValueError, FileNotFoundError, PermissionError):  # being written, just released, another user's
        return True
    return True


@contextlib.contextmanager
def claimed(run_dir: Path) -> Iterator[bool]:
    """Hold ``run_dir`` for this process while the block runs, so that several processes on one machine can
    work through one table side by side; yields False when another live process holds it. The claim is a
    file ``.<name>.claim`` beside the run dir holding the owner's pid; a dead owner's claim is taken over."""
    claim = run_dir.parent / f".{run_dir.name}.claim"
    claim.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            handle = os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            if _held_by_another(claim):
                break
            claim.unlink(missing_ok=True)  # its owner died
            continue
        os.write(handle, str(os.getpid()).encode())
        os.close(handle)
        try:
            yield True
        finally:
            claim.unlink(missing_ok=True)
        return
    yield False
