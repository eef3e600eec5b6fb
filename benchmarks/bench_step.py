"""Time and peak memory of a training step: plain CutMix vs. CEKD with 2 members vs. CEKD with SnapMix,
and 3 whole members vs. 3 branches of a shared trunk.

(a) one resnet18, CutMix, soft-target CE; (b) CEKD: CollaborativeEnsemble of 2 resnet18 + CEKDLoss,
same CutMix batch; (c) like (b) with SnapMix, whose CAMs need one no-grad forward of member 0 on the
clean batch; (d) CEKD with 3 whole resnet18; (e) the same objective on 3 branches of a SharedTrunk split
at layer3 (ONE's split: conv1 to layer2 run once). Prints medians, (b) / (2 x a) (the members' own compute
is the floor: the library's overhead is what exceeds 1), the share of (c) spent in the CAM forward, and
(e) / (d) in time, memory and kernel-launching ops of one step.

Each configuration runs in its own process so its peak memory can be read: on CUDA
``torch.cuda.max_memory_allocated``, on CPU the peak resident set size above the process's size
after set-up (Linux).

    python benchmarks/bench_step.py [--batch 32] [--size 224] [--steps 10] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
import torchvision

from cekd_losses import (
    CEKDLoss,
    CollaborativeEnsemble,
    FeatureTap,
    MixedBatch,
    MixingAugmenter,
    SharedTrunk,
    soft_cross_entropy,
)
from cekd_losses._launches import count_launches

CONFIGS = {
    "a": "plain resnet18 + cutmix + soft CE",
    "b": "CEKD 2 x resnet18 + cutmix",
    "c": "CEKD 2 x resnet18 + snapmix",
    "d": "CEKD 3 x resnet18 + cutmix",
    "e": "CEKD 3 branches at layer3 + cutmix",
}


def resident_mib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / 2**20


def make_step(
    config: str, images: torch.Tensor, labels: torch.Tensor, classes: int, device: torch.device
) -> tuple[Callable[[], None], list[float]]:
    """One training step of ``config`` (forward, loss, backward, optimizer) and the list its CAM times go to."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    cam_times: list[float] = []
    make = lambda: torchvision.models.resnet18(num_classes=classes)  # noqa: E731
    if config == "a":
        model: torch.nn.Module = make().to(device)
        mixer = MixingAugmenter("cutmix", classes)
        forward_loss = lambda batch_: soft_cross_entropy(model(batch_.images), batch_.targets)  # noqa: E731
    else:
        count = 2 if config in "bc" else 3
        members = [make() for _ in range(count)]
        model = (SharedTrunk(members, "layer3") if config == "e" else CollaborativeEnsemble(members)).to(device)
        criterion = CEKDLoss()
        mixer = MixingAugmenter("snapmix" if config == "c" else "cutmix", classes)
        tap = FeatureTap(members[0]) if config == "c" else None

        def forward_loss(batch_: MixedBatch) -> torch.Tensor:
            logits = model(batch_.images).member_logits
            return criterion((logits, logits.mean(0)), batch_.targets)

    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step() -> None:
        cams = None
        if config == "c" and tap is not None:
            sync()
            start = time.perf_counter()
            cams = tap.cams(images, labels)
            sync()
            cam_times.append(time.perf_counter() - start)
        loss = forward_loss(mixer(images, labels, cams))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return step, cam_times


def run_config(config: str, batch: int, size: int, steps: int, device: torch.device, classes: int = 200) -> dict:
    torch.manual_seed(0)
    images = torch.rand(batch, 3, size, size, device=device)
    labels = torch.randint(0, classes, (batch,), device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    step, cam_times = make_step(config, images, labels, classes, device)
    step()  # warm-up (allocator, cudnn autotune)
    cam_times.clear()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    baseline = resident_mib()
    times = []
    for _ in range(steps):
        sync()
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - baseline
    result = {"ms": 1000 * statistics.median(times), "peak_mib": peak, "ops": len(count_launches(step, warm=False).ops)}
    if cam_times:
        result["cam_ms"] = 1000 * statistics.median(cam_times)
    return result


def measured(config: str, args: argparse.Namespace) -> dict:
    """One configuration in a process of its own (its peak memory apart from the others'), as a dict."""
    flags = ["--batch", str(args.batch), "--size", str(args.size), "--steps", str(args.steps), "--device", args.device]
    command = [sys.executable, __file__, "--config", config, *flags]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    result: dict = json.loads(output.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--config", choices=sorted(CONFIGS), help="run one configuration and print JSON (internal)")
    args = parser.parse_args()
    device = torch.device(args.device)

    if args.config:
        print(json.dumps(run_config(args.config, args.batch, args.size, args.steps, device)))
        return

    results = {config: measured(config, args) for config in CONFIGS}
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"{platform.machine()}, {torch.get_num_threads()} threads"
    )
    memory = "peak allocated" if device.type == "cuda" else "peak RSS above set-up"
    print(
        f"batch {args.batch}x3x{args.size}x{args.size}, 200 classes, on {device} ({name}); torch {torch.__version__}; "
        f"median of {args.steps} steps"
    )
    print(f"{'step':36} {'ms':>9} {memory + ' MiB':>28}")
    for config, label in CONFIGS.items():
        print(f"({config}) {label:32} {results[config]['ms']:9.1f} {results[config]['peak_mib']:28.0f}")
    a, b, c, d, e = (results[k] for k in "abcde")
    print(f"\n(b) / (2 x a) time:   {b['ms'] / (2 * a['ms']):.3f}   (goal <= 1.05)")
    print(f"(b) / (2 x a) memory: {b['peak_mib'] / (2 * a['peak_mib']):.3f}")
    print(
        f"(c): CAM forward {c['cam_ms']:.1f} ms = {c['cam_ms'] / c['ms']:.1%} of the step; "
        f"(c) / (b) = {c['ms'] / b['ms']:.3f}"
    )
    print(
        f"(e) / (d), shared trunk vs whole members: time {e['ms'] / d['ms']:.3f}, memory "
        f"{e['peak_mib'] / d['peak_mib']:.3f}, kernel-launching ops of one step {e['ops']} / {d['ops']}"
    )


if __name__ == "__main__":
    main()
