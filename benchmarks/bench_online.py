"""What each online-distillation method costs: one training step of DML, ONE, FFL, PCL, MCL-OKD and CEKD against N plain
steps.

Every step is the reproduction example's own (its ``build_run`` and ``run_step``: CutMix, forward, loss, backward,
SGD), on N members of one architecture, with whole members and with branches of one trunk (``--branches-from``);
the plain step is one member over CutMix with soft-target CE. The configurations run in interleaved rounds in
one process, and the table gives medians and step / (N x plain step): 1 is the cost of N independent models,
what exceeds it the method's teachers and views, what falls below it the shared trunk. Also the
kernel-launching ops of one step (the library's launch counter).

    python benchmarks/bench_online.py [--arch timm:test_resnet] [--stage layer3] [--members 2] [--batch 16]
        [--size 64] [--rounds 10] [--nce-k 1024] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

from cekd_losses._launches import count_launches  # noqa: E402
from cekd_repro.config import RunConfig  # noqa: E402
from cekd_repro.device import Placement  # noqa: E402
from cekd_repro.engine import build_run, run_step  # noqa: E402

CLASSES = 12


def configurations(base: RunConfig, stage: str) -> dict[str, RunConfig]:
    """The plain step, then every method on whole members and on a trunk's branches."""
    configs = {"plain cutmix": replace(base, method="cutmix")}
    for method in ("dml", "one", "ffl", "pcl", "mcl", "cekd"):
        configs[method] = replace(base, method=method)
        configs[f"{method} (trunk)"] = replace(base, method=method, branches_from=stage)
    return configs


def step_of(config: RunConfig, images: torch.Tensor, labels: torch.Tensor, place: Placement) -> Callable[[], None]:
    torch.manual_seed(0)
    samples = 1000  # MCL-OKD's memory rows: the batch is samples 0..B-1 of a set this large
    run = build_run(config, CLASSES, place, steps_per_epoch=1000, train_size=samples)
    run.model.train()
    sync = torch.cuda.synchronize if place.device.type == "cuda" else (lambda: None)
    index = torch.arange(images.shape[0], device=images.device)

    def step() -> None:
        run_step(run, images, labels, index)
        sync()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="timm:test_resnet")
    parser.add_argument("--stage", default="layer3", help="where the trunk's branches start")
    parser.add_argument("--members", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--nce-k", type=int, default=1024, help="MCL-OKD's negatives (its code: 16384)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    base = RunConfig(
        arch=args.arch, members=args.members, image_size=args.size, mix="cutmix", device=args.device, nce_k=args.nce_k
    )
    place = Placement(device, (0.5,) * 3, (0.25,) * 3)
    images = torch.rand(args.batch, 3, args.size, args.size, device=device)
    labels = torch.randint(0, CLASSES, (args.batch,), device=device)
    steps = {name: step_of(config, images, labels, place) for name, config in configurations(base, args.stage).items()}
    ops = {name: len(count_launches(step).ops) for name, step in steps.items()}  # also the warm-up
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"{platform.machine()}, {torch.get_num_threads()} threads"
    )
    print(
        f"{args.members} x {args.arch}, batch {args.batch}x3x{args.size}x{args.size}, CutMix, {CLASSES} classes, "
        f"on {device} ({name}); torch {torch.__version__}; median of {args.rounds} interleaved rounds"
    )
    plain = statistics.median(times["plain cutmix"])
    print(f"{'step':16} {'ms':>8} {'/ (N x plain)':>14} {'ops':>6}")
    for label, values in times.items():
        ms = statistics.median(values)
        ratio = ms / plain if label == "plain cutmix" else ms / (args.members * plain)
        print(f"{label:16} {1000 * ms:8.1f} {ratio:14.2f} {ops[label]:6d}")


if __name__ == "__main__":
    main()
