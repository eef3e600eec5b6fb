"""An epoch's numbers: the device sums of its training steps, its metrics record (or a diverged run's stop),
the test top-1 of everything a method is evaluated by, and the lines a person reads."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader

from cekd_losses import EnsembleOutput, OnlineOutput

from .config import OFFLINE, ONLINE, RunConfig
from .device import Placement
from .methods import evaluated
from .run import Run
from .rundir import append_record


class Diverged(RuntimeError):
    """An epoch whose losses, gradients or weights went non-finite: the run stopped before checkpointing it."""


@dataclass
class EpochTotals:
    """One epoch's training sums, kept on the device and read once at its end (no per-step host sync).

    A step counts where its loss terms and gradient norm are all finite; the others are skipped steps
    (with fp16, the GradScaler skipped them; otherwise the run diverged)."""

    names: list[str]  # the loss terms, then "grad_norm"
    sums: Tensor  # (P,): per-sample sums of the loss terms, per-step sum of the gradient norm, over counted steps
    counted: Tensor  # (): steps counted
    nonfinite: Tensor  # (P,) bool: the term was non-finite in some step
    started: float  # perf_counter() at the epoch's start
    steps: int = 0
    seen: int = 0
    train_s: float = 0.0  # seconds of the training pass


def finite_weights(module: nn.Module) -> Tensor:
    """() bool on the device: every parameter and buffer of ``module`` is finite."""
    tensors = [t for t in [*module.parameters(), *module.buffers()] if t.is_floating_point()]
    return torch.stack([torch.isfinite(t).all() for t in tensors]).all()


def record_epoch(
    run: Run,
    totals: EpochTotals,
    top1: dict[str, float],
    epoch: int,
    config: RunConfig,
    rank: int,
    world: int,
    run_dir: Path,
) -> dict:
    """The epoch's metrics record, from one host read of its sums; a diverged epoch is recorded in
    metrics.jsonl and raises :class:`Diverged` on every rank (they decide on the same reduced verdict)."""
    # what every rank must agree on: non-finite terms, skipped steps, non-finite weights
    verdict = torch.cat(
        [
            totals.nonfinite.double(),
            (totals.steps - totals.counted)[None].double(),
            (~finite_weights(run.net))[None].double(),
        ]
    )
    if world > 1:
        dist.all_reduce(verdict)
    read = run.place.read({"sums": totals.sums, "counted": totals.counted, "verdict": verdict})
    terms = len(totals.names)
    bad = [name for name, flag in zip(totals.names, read["verdict"][:terms], strict=True) if flag]
    skipped, bad_weights = int(read["verdict"][terms]), read["verdict"][terms + 1] > 0
    counted = read["counted"][0]
    epoch_s = time.perf_counter() - totals.started
    if bad_weights or (skipped and config.amp != "fp16") or counted == 0:
        if rank == 0:
            append_record(run_dir, {"epoch": epoch + 1, "diverged": bad or ["weights"], "epoch_s": epoch_s})
        raise Diverged(_divergence_message(epoch + 1, bad, config, run_dir))
    per_sample = counted * config.batch_size
    return {
        "epoch": epoch + 1,
        **{f"loss_{k}": v / per_sample for k, v in zip(totals.names[:-1], read["sums"][:-1], strict=True)},
        "grad_norm": read["sums"][-1] / counted,
        **({"skipped_steps": skipped} if config.amp == "fp16" else {}),
        **{f"top1_{k}": v for k, v in top1.items()},
        "lr": run.optimizer.param_groups[0]["lr"],
        "images_per_s": totals.seen * world / totals.train_s,
        "epoch_s": epoch_s,
    }


def _divergence_message(epoch: int, bad: list[str], config: RunConfig, run_dir: Path) -> str:
    """One line: which epoch and term went non-finite, what was kept, how to go on."""
    losses = [name for name in bad if name != "grad_norm"]
    if losses:
        what = f"loss {', '.join(losses)} went non-finite"
    else:
        what = f"the {'gradient' if bad else 'weights'} went non-finite"
    if config.amp == "fp16":
        change = "--amp bf16"
    elif config.clip_grad is None:
        change = "--clip-grad 5"
    else:
        change = ""
    if epoch == 1:
        return f"epoch 1 diverged: {what}; no epoch finished: start again with a lower --lr" + (
            f" or {change}" if change else ""
        )
    if change:
        return (
            f"epoch {epoch} diverged: {what}; checkpoint.pt of epoch {epoch - 1} is kept: --resume {run_dir} "
            f"{change} continues from it, or start again with a lower --lr"
        )
    return (
        f"epoch {epoch} diverged: {what}; checkpoint.pt of epoch {epoch - 1} is kept in {run_dir}: start "
        "again with a lower --lr (a resume keeps the run's learning rate)"
    )


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, place: Placement, world: int = 1) -> dict[str, float]:
    """Top-1 (%) of everything the method is evaluated by, reduced across ranks: every member and the ensemble
    of a CollaborativeEnsemble, every member, the teacher and PCL's mean models of an online method's Peers
    (:func:`~cekd_repro.methods.evaluated`), or the single model. Counts stay on the device until the one
    read at the end."""
    model.eval()
    correct: Tensor | None = None
    names: list[str] = []
    total = torch.zeros((), dtype=torch.float64, device=place.device)
    for images, labels in loader:
        images, labels = place.batch(images, labels)
        with place.autocast():
            named = _named_logits(model(images))
        names = list(named)
        hits = (torch.stack(list(named.values())).argmax(dim=2) == labels[None]).sum(dim=1).double()
        correct = hits if correct is None else correct + hits
        total = total + labels.shape[0]
    if correct is None:
        raise ValueError("the test set is empty: nothing to evaluate")
    counts = torch.cat([correct, total[None]])
    if world > 1:
        dist.all_reduce(counts)
    counts = place.read({"counts": counts})["counts"]
    return {name: 100 * c / counts[-1] for name, c in zip(names, counts[:-1], strict=True)}


def _named_logits(output: EnsembleOutput | OnlineOutput | Tensor) -> dict[str, Tensor]:
    if isinstance(output, OnlineOutput):
        return evaluated(output)
    if isinstance(output, EnsembleOutput):
        return {f"member{i}": z for i, z in enumerate(output.member_logits)} | {"ensemble": output.ensemble_logits}
    return {"model": output}


def describe_run(config: RunConfig, run_dir: Path, train_size: int, test_size: int, num_classes: int) -> str:
    """The run's first line: what is trained, on which data, on which device, and where the results go."""
    archs = config.archs()
    models = f"{len(archs)} x {archs[0]}" if len(set(archs)) == 1 else " + ".join(archs)
    what = {"baseline": "baseline (no mixing)"}.get(config.method, config.method)
    if config.method in ONLINE:
        what += f" over {config.mix}" if config.mix != "none" else " without mixing"
        what += f" (switch {config.switch_prob:g})" if config.switch_prob is not None else ""
        what += f", branches from {config.branches_from} of one trunk" if config.branches_from else ""
    if config.method in OFFLINE:
        what += f" from the teacher {config.teacher}" + (f" over {config.mix}" if config.mix != "none" else "")
    if config.mix_off_epoch is not None:
        what += f", mixing off after epoch {config.mix_off_epoch}"
    data = config.dataset if config.data_root is None else f"{config.dataset} ({config.data_root})"
    # a CPU run's numbers depend on its thread count (the kernels' summation order), so the line says it
    device = f"cpu ({torch.get_num_threads()} threads)" if config.device == "cpu" else config.device
    return (
        f"training {what}: {models}, {data} {num_classes} classes, {train_size} train / {test_size} test images "
        f"at {config.image_size} px, {device}, {config.epochs} epochs of batch {config.batch_size} "
        f"-> {run_dir}"
    )


def epoch_line(record: dict, epochs: int) -> str:
    """One readable line per epoch: losses, top-1 of every member and the ensemble (on the epochs that
    evaluate, see ``--eval-every``), speed."""
    losses = " ".join(f"{k[len('loss_') :]} {v:.3f}" for k, v in record.items() if k.startswith("loss_"))
    top1 = " ".join(f"{k[len('top1_') :]} {v:.1f}" for k, v in record.items() if k.startswith("top1_"))
    tested = f"top-1 {top1}  " if top1 else ""
    skipped = f"  {record['skipped_steps']} steps skipped (fp16 overflow)" if record.get("skipped_steps") else ""
    return (
        f"epoch {record['epoch']}/{epochs}  loss {losses}  {tested}"
        f"{record['images_per_s']:.0f} img/s  {record['epoch_s']:.0f} s{skipped}"
    )
