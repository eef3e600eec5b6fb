"""Training engine of the reproduction: one run of one method, as the paper's Algorithm 1 (build, then per
epoch: train, evaluate, record, checkpoint), with resume, AMP and DDP.

:func:`train` is that loop; :func:`~cekd_repro.run.build_run` builds what a step needs, :func:`run_step` is one
step, :func:`train_one_epoch` and :func:`~cekd_repro.metrics.evaluate` the two passes of an epoch,
:func:`~cekd_repro.metrics.record_epoch` turns an epoch's device sums into its metrics record (or stops a
diverged run).
"""

from __future__ import annotations

import itertools
import math
import random
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from cekd_losses import train_step

from .checkpoints import load_checkpoint, save_checkpoint, write_atomic
from .config import RunConfig
from .data import Indexed, load_data, test_loader, train_batches
from .device import Placement, distributed_ranks, run_device
from .metrics import Diverged, EpochTotals, describe_run, epoch_line, evaluate, record_epoch
from .run import Run, build_run
from .rundir import append_record, prepare_run_dir, write_run_files

__all__ = ["Diverged", "Log", "build_run", "epoch_line", "evaluate", "run_step", "train", "train_one_epoch"]

HEARTBEAT_S = 30.0  # without a terminal (a log file), a progress line once an epoch runs this long unreported


def run_step(run: Run, images: Tensor, labels: Tensor, index: Tensor | None = None) -> dict[str, Tensor]:
    """One optimizer step on a device batch (normalised images (B, C, H, W), labels (B,), for MCL-OKD the
    samples' dataset indices (B,)): the library's :func:`~cekd_losses.train_step` (CAMs, mixing, forward, loss)
    under autocast, then backward, clipping, optimizer and schedule. Returns the detached loss terms and the
    gradient norm before clipping, on the device (no host sync)."""
    contrasted = getattr(run.net, "method", None) == "mcl"
    if contrasted:
        run.net.sample_index = index
    with run.place.autocast():
        out = train_step(
            run.model,
            run.criterion,
            images,
            labels,
            mixer=run.mixer,
            tap=run.tap,
            step=run.scheduler.last_epoch,
            views=run.views,
            mix_off_step=run.mix_off_step,
            teacher=run.teacher,
        )
    loss, terms = out.loss, out.parts
    if contrasted:  # MCL-OKD's contrast, computed by the members' forward beside the loss's own terms
        contrast = run.net.contrast_term
        terms = {**terms, "total": loss + contrast, "contrast": contrast}
        loss = terms["total"]
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    run.scaler.unscale_(run.optimizer)
    grad_norm = nn.utils.clip_grad_norm_(run.net.parameters(), run.clip_grad or math.inf)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.scheduler.step()
    if run.after_step is not None:
        run.after_step()
    return {
        **{name: value.detach().float() for name, value in terms.items()},
        "grad_norm": grad_norm.detach().float(),
    }


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


def train(config: RunConfig, run_dir: str | Path, resume: bool = False) -> dict:
    """Run (or resume) one training run; returns its final epoch record. Only rank 0 writes.

    To resume, pass :func:`~cekd_repro.rundir.resumed_config` of the run dir. A resumed run dir without a
    checkpoint (killed before its first epoch ended) starts again from epoch 0. An epoch whose loss,
    gradient or weights go non-finite raises :class:`Diverged` on every rank, after recording it in
    metrics.jsonl and before any checkpoint of it: the last good checkpoint stays."""
    run_dir = Path(run_dir)
    config = config.with_mixing_alpha()
    config.validate()
    rank, world, local_rank = distributed_ranks(config.device)
    if rank == 0:
        prepare_run_dir(run_dir, resume)
    device = run_device(config.device, local_rank)
    seed_everything(config.seed)

    log = Log(rank == 0 and not config.quiet)
    train_set, test_set, num_classes, mean, std = load_data(config, rank, world, log.line)
    if config.method == "mcl":
        if world > 1:
            raise ValueError("--method mcl trains in one process: its memory of embeddings is not shared across ranks")
        train_set = Indexed(train_set)  # its items carry their index: MCL-OKD's memory rows
    place = Placement(device, mean, std, config.channels_last, config.amp)
    per_rank = -(-len(train_set) // world)
    steps_per_epoch = per_rank // config.batch_size
    if steps_per_epoch == 0:
        raise ValueError(
            f"--batch-size {config.batch_size} is larger than this rank's {per_rank} "
            "training images: no full batch to train on"
        )
    run = build_run(config, num_classes, place, steps_per_epoch, rank, world, len(train_set))  # a bad --arch fails
    log.line(describe_run(config, run_dir, len(train_set), len(test_set), num_classes))
    checkpoint = run_dir / "checkpoint.pt"
    start_epoch, history = load_checkpoint(run, checkpoint) if resume and checkpoint.exists() else (0, [])
    if rank == 0:
        write_run_files(run_dir, config, history)
    batches = train_batches(train_set, config, device, start_epoch, rank, world)  # every epoch, one stream
    tests = test_loader(test_set, config, device, rank, world)
    if run.teacher is not None:  # its own test top-1, once
        top1 = evaluate(run.teacher, tests, place, world)
        log.line(f"teacher {config.teacher}: test top-1 {top1['ensemble' if 'ensemble' in top1 else 'model']:.2f}%")

    for epoch in log.bar(range(start_epoch, config.epochs), desc="epochs", initial=start_epoch, total=config.epochs):
        totals = train_one_epoch(
            run, itertools.islice(batches, steps_per_epoch), steps_per_epoch, epoch, config.epochs, log
        )
        tested = (epoch + 1) % config.eval_every == 0 or epoch + 1 == config.epochs
        top1 = evaluate(run.model, tests, place, world) if tested else {}
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
    for images, labels, *index in log.bar(batches, desc=f"epoch {epoch + 1}", total=steps):
        indices = index[0].to(run.place.device, non_blocking=True) if index else None  # MCL-OKD's memory rows
        parts = run_step(run, *run.place.batch(images, labels), indices)
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
