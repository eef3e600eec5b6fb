"""Training engine of the reproduction: one run of one method, as the paper's Algorithm 1 (build, then per
epoch: train, evaluate, record, checkpoint), with resume, AMP and DDP.

:func:`train` is that loop; :func:`build_run` builds what a step needs, :func:`run_step` is one step,
:func:`train_one_epoch` and :func:`evaluate` the two passes of an epoch, :func:`record_epoch` turns an
epoch's device sums into its metrics record (or stops a diverged run).
"""

from __future__ import annotations

import itertools
import math
import random
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader

from cekd_losses import (
    CEKDLoss,
    CollaborativeEnsemble,
    FeatureTap,
    MixingAugmenter,
    SoftTargetCrossEntropy,
    train_step,
)

from .checkpoints import load_checkpoint, save_checkpoint, write_atomic
from .config import RunConfig
from .data import load_data, test_loader, train_batches
from .device import Placement, distributed_ranks, run_device
from .models import build_model, head_parameters
from .rundir import append_record, prepare_run_dir, write_run_files

HEARTBEAT_S = 30.0  # without a terminal (a log file), a progress line once an epoch runs this long unreported
MIXER_SEED_STRIDE = 7919  # a prime: rank r of seed s draws its mixing from seed s * stride + r, apart from others


class Diverged(RuntimeError):
    """An epoch whose losses, gradients or weights went non-finite: the run stopped before checkpointing it."""


@dataclass
class Run:
    """What a training step needs, built once from a :class:`RunConfig` by :func:`build_run`."""

    members: list[nn.Module]  # the user's models (one unless cekd)
    net: nn.Module  # the CollaborativeEnsemble, or the single model
    model: nn.Module  # what is called: ``net``, or ``net`` inside DistributedDataParallel
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    place: Placement
    mixer: MixingAugmenter | None  # None for the baseline
    tap: FeatureTap | None  # on member 0, for SnapMix's CAMs
    criterion: CEKDLoss | SoftTargetCrossEntropy  # CEKD, or soft-target CE of the single model
    clip_grad: float | None
    ensemble: bool  # a CollaborativeEnsemble of members (cekd), not a single model


def build_run(
    config: RunConfig, num_classes: int, place: Placement, steps_per_epoch: int, rank: int = 0, world: int = 1
) -> Run:
    """Models on the device, optimizer (10x head lr as the paper), schedule, mixer, CAM tap and loss of a run."""
    models = [build_model(arch, num_classes, config.pretrained, config.image_size) for arch in config.archs()]
    net = place.module(CollaborativeEnsemble(models, config.combine) if config.method == "cekd" else models[0])
    if config.compile:
        for model in models:
            model.compile()
    device = place.device
    model = (
        nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
        if world > 1
        else net
    )
    heads = {id(p) for member in models for p in head_parameters(member)}
    groups = [
        {"params": [p for p in net.parameters() if id(p) not in heads], "lr": config.lr},
        {"params": [p for p in net.parameters() if id(p) in heads], "lr": config.head_lr or config.lr},
    ]
    optimizer = torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    if config.schedule == "onecycle":
        scheduler: torch.optim.lr_scheduler.LRScheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=[g["lr"] for g in groups], total_steps=steps_per_epoch * config.epochs
        )
    else:
        boundaries = [m * steps_per_epoch for m in config.milestones]
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.1 ** sum(s >= b for b in boundaries))
    mixer = None
    if config.mixer_method is not None:
        mixer = MixingAugmenter(
            config.mixer_method,
            num_classes,
            mix_alpha=config.mix_alpha,
            p=config.mix_p,
            same_on_batch=config.same_on_batch,
            generator=place.generator(config.seed * MIXER_SEED_STRIDE + rank),
        )
    criterion: CEKDLoss | SoftTargetCrossEntropy = SoftTargetCrossEntropy()
    if config.method == "cekd":
        criterion = CEKDLoss(
            config.temperature,
            0.0 if config.no_cross else config.alpha,
            0.0 if config.no_ensemble else config.beta,
            config.rampup_epochs * steps_per_epoch,
            supervise_ensemble=not config.no_ensemble,
        )
    return Run(
        models,
        net,
        model,
        optimizer,
        scheduler,
        torch.amp.GradScaler(device.type, enabled=config.amp == "fp16"),
        place,
        mixer,
        FeatureTap(models[0]) if config.mixer_method == "snapmix" else None,
        criterion,
        config.clip_grad,
        ensemble=config.method == "cekd",
    )


def run_step(run: Run, images: Tensor, labels: Tensor) -> dict[str, Tensor]:
    """One optimizer step on a device batch (normalised images (B, C, H, W), labels (B,)): the library's
    :func:`~cekd_losses.train_step` (CAMs, mixing, forward, loss) under autocast, then backward,
    clipping, optimizer and schedule. Returns the detached loss terms and the gradient norm before
    clipping, on the device (no host sync)."""
    with run.place.autocast():
        out = train_step(
            run.model, run.criterion, images, labels, mixer=run.mixer, tap=run.tap, step=run.scheduler.last_epoch
        )
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(out.loss).backward()
    run.scaler.unscale_(run.optimizer)
    grad_norm = nn.utils.clip_grad_norm_(run.net.parameters(), run.clip_grad or math.inf)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.scheduler.step()
    return {
        **{name: value.detach().float() for name, value in out.parts.items()},
        "grad_norm": grad_norm.detach().float(),
    }


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


class Log:
    """What a person watching the run reads (rank 0, unless ``--quiet``): lines that stay above tqdm's bars,
    and without a terminal a progress line when an epoch runs :data:`HEARTBEAT_S` seconds without one."""

    def __init__(self, speaks: bool) -> None:
        self.speaks, self.last = speaks, time.perf_counter()

    def line(self, text: str) -> None:
        if self.speaks:
            from tqdm import tqdm

            tqdm.write(text, file=sys.stdout)
            sys.stdout.flush()
            self.last = time.perf_counter()

    def progress(self, text: str) -> None:
        if not sys.stderr.isatty() and time.perf_counter() - self.last >= HEARTBEAT_S:
            self.line(text)

    def bar(self, iterable, **kwargs):
        """``iterable`` with a tqdm progress bar on a terminal."""
        from tqdm import tqdm

        return tqdm(iterable, disable=not self.speaks or not sys.stderr.isatty(), leave=False, **kwargs)


def describe_run(config: RunConfig, run_dir: Path, train_size: int, test_size: int, num_classes: int) -> str:
    """The run's first line: what is trained, on which data, on which device, and where the results go."""
    archs = config.archs()
    models = f"{len(archs)} x {archs[0]}" if len(set(archs)) == 1 else " + ".join(archs)
    what = {"baseline": "baseline (no mixing)", "cekd": f"cekd over {config.mix}"}.get(config.method, config.method)
    data = config.dataset if config.data_root is None else f"{config.dataset} ({config.data_root})"
    return (
        f"training {what}: {models}, {data} {num_classes} classes, {train_size} train / {test_size} test images "
        f"at {config.image_size} px, {config.device}, {config.epochs} epochs of batch {config.batch_size} "
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


def train(config: RunConfig, run_dir: str | Path, resume: bool = False) -> dict:
    """Run (or resume) one training run; returns its final epoch record. Only rank 0 writes.

    To resume, pass :func:`~cekd_repro.rundir.resumed_config` of the run dir. A resumed run dir without a
    checkpoint (killed before its first epoch ended) starts again from epoch 0. An epoch whose loss,
    gradient or weights go non-finite raises :class:`Diverged` on every rank, after recording it in
    metrics.jsonl and before any checkpoint of it: the last good checkpoint stays."""
    run_dir = Path(run_dir)
    config.validate()
    rank, world, local_rank = distributed_ranks(config.device)
    if rank == 0:
        prepare_run_dir(run_dir, resume)
    device = run_device(config.device, local_rank)
    seed_everything(config.seed)

    log = Log(rank == 0 and not config.quiet)
    train_set, test_set, num_classes, mean, std = load_data(config, rank, world, log.line)
    log.line(describe_run(config, run_dir, len(train_set), len(test_set), num_classes))
    place = Placement(device, mean, std, config.channels_last, config.amp)
    per_rank = -(-len(train_set) // world)
    steps_per_epoch = per_rank // config.batch_size
    if steps_per_epoch == 0:
        raise ValueError(
            f"--batch-size {config.batch_size} is larger than this rank's {per_rank} "
            "training images: no full batch to train on"
        )
    run = build_run(config, num_classes, place, steps_per_epoch, rank, world)
    checkpoint = run_dir / "checkpoint.pt"
    start_epoch, history = load_checkpoint(run, checkpoint) if resume and checkpoint.exists() else (0, [])
    if rank == 0:
        write_run_files(run_dir, config, history)
    batches = train_batches(train_set, config, device, start_epoch, rank, world)  # every epoch, one stream
    tests = test_loader(test_set, config, device, rank, world)

    for epoch in log.bar(range(start_epoch, config.epochs), desc="epochs", initial=start_epoch, total=config.epochs):
        totals = train_one_epoch(
            run, itertools.islice(batches, steps_per_epoch), steps_per_epoch, epoch, config.epochs, log
        )
        tested = (epoch + 1) % config.eval_every == 0 or epoch + 1 == config.epochs
        top1 = evaluate(run.model, tests, place, world, run.ensemble) if tested else {}
        record = record_epoch(run, totals, top1, epoch, config, rank, world, run_dir)
        history.append(record)
        if rank == 0:
            append_record(run_dir, record)
            save_checkpoint(run, checkpoint, epoch + 1, history)
        log.line(epoch_line(record, config.epochs))

    if rank == 0 and config.visualize_cams:
        from .cams import save_cam_figure

        save_cam_figure(run.members, test_set, place, config.visualize_cams, run_dir / "cams.png")
    if rank == 0 and config.keep == "weights" and history and history[-1]["epoch"] == config.epochs:
        write_atomic(run_dir / "weights.pt", run.net.state_dict())
        checkpoint.unlink(missing_ok=True)
    if run.tap is not None:
        run.tap.remove()
    return history[-1] if history else {}


def seed_everything(seed: int) -> None:
    """The torch, NumPy and Python generators of this process, seeded for a reproducible run."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def train_one_epoch(
    run: Run, batches: Iterable[tuple[Tensor, Tensor]], steps: int, epoch: int, epochs: int, log: Log
) -> EpochTotals:
    """One epoch: a step on each of the ``steps`` host ``batches`` (images, labels), the sums kept on the
    device."""
    run.model.train()
    started = time.perf_counter()
    totals: EpochTotals | None = None
    for images, labels in log.bar(batches, desc=f"epoch {epoch + 1}", total=steps):
        parts = run_step(run, *run.place.batch(images, labels))
        values = torch.stack(list(parts.values()))
        finite = torch.isfinite(values)
        counted = finite.all()
        if totals is None:  # per-sample weights of the loss terms (the last batch of an epoch is dropped: B is fixed)
            scale = torch.full_like(values, float(labels.shape[0]))
            scale[-1] = 1.0
            totals = EpochTotals(list(parts), torch.zeros_like(values), torch.zeros_like(values[0]), ~finite, started)
        totals.sums = totals.sums + torch.where(counted, values * scale, 0.0)
        totals.counted = totals.counted + counted
        totals.nonfinite = totals.nonfinite | ~finite
        totals.steps += 1
        totals.seen += labels.shape[0]
        log.progress(
            f"  epoch {epoch + 1}/{epochs}: {totals.steps}/{steps} batches, {time.perf_counter() - started:.0f} s"
        )
    assert totals is not None, "the loader yields at least one batch (checked when it is built)"
    totals.train_s = time.perf_counter() - started
    return totals


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
def evaluate(
    model: nn.Module, loader: DataLoader, place: Placement, world: int = 1, ensemble: bool = False
) -> dict[str, float]:
    """Top-1 (%) of every member and of the ensemble (or of the single model), reduced across ranks.

    ``model`` is the trained module: with ``ensemble``, a :class:`CollaborativeEnsemble` (possibly inside
    DDP) whose output holds member and ensemble logits; otherwise a classifier. Counts stay on the device
    until the one read at the end."""
    model.eval()
    correct: Tensor | None = None
    total = torch.zeros((), dtype=torch.float64, device=place.device)
    for images, labels in loader:
        images, labels = place.batch(images, labels)
        with place.autocast():
            output = model(images)
        logits = torch.cat([output.member_logits, output.ensemble_logits[None]]) if ensemble else output[None]
        hits = (logits.argmax(dim=2) == labels[None]).sum(dim=1).double()
        correct = hits if correct is None else correct + hits
        total = total + labels.shape[0]
    if correct is None:
        raise ValueError("the test set is empty: nothing to evaluate")
    counts = torch.cat([correct, total[None]])
    if world > 1:
        dist.all_reduce(counts)
    counts = place.read({"counts": counts})["counts"]
    accuracy = [100 * c / counts[-1] for c in counts[:-1]]
    names = [f"member{i}" for i in range(len(accuracy) - 1)] + ["ensemble"] if ensemble else ["model"]
    return dict(zip(names, accuracy, strict=True))
