"""--teacher: a finished run of this example (one model, or CEKD's ensemble) rebuilt from its config.json and
loaded with its weights only (a safe load), frozen, on the run's device: the fixed teacher of --method kd and ccd."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .checkpoints import read_checkpoint
from .config import SYNTHETIC, TEACHERS, RunConfig
from .device import Placement
from .methods import cekd_ensemble
from .models import build_model
from .rundir import resumed_config


def teacher_config(run_dir: Path) -> RunConfig:
    """The saved config of the teacher's run, with errors that name --teacher."""
    try:
        saved = resumed_config(run_dir)
    except ValueError as error:
        raise ValueError(str(error).replace("--resume", "--teacher", 1)) from None
    if saved.method not in TEACHERS:
        raise ValueError(
            f"--teacher {run_dir}: a run of --method {saved.method}; a teacher is a run of --method "
            f"{', '.join(TEACHERS)}"
        )
    return saved


def teacher_weights(run_dir: Path, saved: RunConfig) -> dict:
    """The finished run's weights: weights.pt, or the model of a checkpoint.pt of its last epoch."""
    weights, checkpoint = run_dir / "weights.pt", run_dir / "checkpoint.pt"
    if weights.exists():
        return torch.load(weights, map_location="cpu", weights_only=True)
    if not checkpoint.exists():
        raise ValueError(f"--teacher {run_dir}: no weights.pt or checkpoint.pt there")
    state = read_checkpoint(checkpoint, flag="--teacher")
    if state["epoch"] != saved.epochs:
        raise ValueError(
            f"--teacher {run_dir}: the run stopped after epoch {state['epoch']} of {saved.epochs}; "
            f"finish it first (--resume {run_dir})"
        )
    return state["model"]


def load_teacher(run_dir: str, config: RunConfig, num_classes: int, place: Placement) -> nn.Module:
    """The teacher of ``config`` (--teacher ``run_dir``) for ``num_classes`` classes, frozen and in eval mode."""
    source = Path(run_dir)
    saved = teacher_config(source)
    same_task = saved.dataset == config.dataset and (config.dataset not in SYNTHETIC or saved.classes == config.classes)
    if not same_task:
        raise ValueError(
            f"--teacher {source}: it learnt --dataset {saved.dataset} ({saved.classes} classes); this run trains "
            f"on --dataset {config.dataset} ({num_classes} classes)"
        )
    models = [build_model(arch, num_classes, None, saved.image_size) for arch in saved.archs()]
    net = cekd_ensemble(models, saved.combine, saved.branches_from) if saved.method == "cekd" else models[0]
    try:
        net.load_state_dict(teacher_weights(source, saved))
    except RuntimeError as error:
        raise ValueError(f"--teacher {source}: its weights do not fit its config.json ({error})") from None
    return place.module(net.requires_grad_(False).eval())
