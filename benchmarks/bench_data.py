"""Input pipeline of the reproduction: the loader alone, and (with --step, or on CUDA) loader + training step.

Writes a CUB-like ImageFolder of JPEG files (300-600 px sides, textured, quality 90) into a temporary
directory, then in one run:

1. loader alone, images/s in steady state (the second epoch), for each worker count: this engine's
   loader reading the decode-once cache (crop and flip only), the same loader decoding every image
   (PIL decode, resize, crop and flip, uint8 tensors), and the previous pipeline (float32 ``ToTensor``
   on the workers, workers re-spawned every epoch);
2. with ``--step`` (default on CUDA): the paper preset's CEKD step (2 members, SnapMix, the run's
   ``run_step``) fed by the loader, against the same step on one in-memory batch; the ratio is the
   share of the in-memory step rate the loader sustains (goal on a GPU: >= 0.95).

3. with ``--simulate-step-ms MS``: a consumer that sleeps MS per batch as a GPU step would, over
   ``--epochs`` epochs of ``--images / --batch`` batches: loader efficiency, the wait for the first batch of
   an epoch against the steady worst and median, and the main thread's CPU time per batch, for this
   engine's one-stream loader against a per-epoch iterator (the previous engine's).

    python benchmarks/bench_data.py [--images 256] [--workers 0,2] [--device cpu|cuda] [--step]
        [--arch resnet50] [--size 448] [--resize 512] [--batch 16] [--steps 20] [--amp bf16]
        [--simulate-step-ms 250 --epochs 3]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

from cekd_repro.config import RunConfig  # noqa: E402
from cekd_repro.data import EpochOrder, load_data, train_batches, train_loader  # noqa: E402
from cekd_repro.device import Placement  # noqa: E402
from cekd_repro.engine import build_run, run_step  # noqa: E402
from cekd_repro.synthetic import draw_birds  # noqa: E402


def write_jpeg_folder(root: Path, count: int, classes: int = 4, seed: int = 0) -> float:
    """``count`` JPEGs split over train/<class>/ (and one test image per class); returns the mean file size in KB."""
    from PIL import Image

    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(count) % classes
    small = draw_birds(labels, 96, 4, generator)
    sizes = []
    for i in range(count):
        height, width = torch.randint(300, 601, (2,), generator=generator).tolist()
        image = F.interpolate(small[i : i + 1], size=(height, width), mode="bilinear", align_corners=False)[0]
        image = (image + 0.04 * torch.randn(image.shape, generator=generator)).clamp(0, 1)  # photo-like texture
        pixels = (image.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
        for split in ("train",) + (("test",) if i < classes else ()):
            path = root / split / f"class{int(labels[i])}" / f"{i}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(path, quality=90)
        sizes.append(path.stat().st_size)
    return sum(sizes) / len(sizes) / 1024


def previous_loader(config: RunConfig, epoch: int) -> DataLoader:
    """The pipeline before: float32 ToTensor on the workers, a new loader (and new workers) every epoch."""
    import torchvision.transforms as T

    from cekd_repro.files import file_splits

    train, _, _ = file_splits("imagefolder", config.data_root)
    transform = T.Compose(
        [
            T.Resize((config.resize, config.resize)),
            T.RandomCrop(config.image_size),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
        ]
    )

    class Transformed(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(train)

        def __getitem__(self, i: int):
            image, label = train[i]
            return transform(image), label

    generator = torch.Generator().manual_seed(epoch)
    return DataLoader(
        Transformed(), config.batch_size, shuffle=True, generator=generator, num_workers=config.workers, drop_last=True
    )


def quiet(line: str) -> None:
    """The cache's lines (built, reused) are not part of the figures."""


def loader_rate(config: RunConfig, previous: bool) -> float:
    """Images/s of the second epoch (steady state) of the loader alone."""
    if previous:
        rate = 0.0
        for epoch in range(2):
            start, seen = time.perf_counter(), 0
            for images, _ in previous_loader(config, epoch):
                seen += images.shape[0]
            rate = seen / (time.perf_counter() - start)
        return rate
    loader = train_loader(load_data(config, say=quiet)[0], replace(config, epochs=2), torch.device("cpu"))
    per_epoch, seen, start = loader.batch_sampler.per_epoch, 0, 0.0
    for step, (images, _) in enumerate(loader):
        if step == per_epoch:
            start, seen = time.perf_counter(), 0
        seen += images.shape[0]
    return seen / (time.perf_counter() - start)


def per_epoch_loader(dataset, config: RunConfig) -> DataLoader:
    """The loader of the previous engine: one iterator per epoch over persistent workers (the queue is
    empty when an epoch starts), for the epoch-boundary comparison."""
    order = EpochOrder(len(dataset), shuffle=True, seed=config.seed)
    return DataLoader(
        dataset,
        config.batch_size,
        sampler=order,
        num_workers=config.workers,
        drop_last=True,
        persistent_workers=config.workers > 0,
        prefetch_factor=4 if config.workers else None,
    )


def simulate(config: RunConfig, step_ms: float, epochs: int, run_long: bool) -> dict[str, float]:
    """A consumer that sleeps ``step_ms`` per batch as a GPU step would, over ``epochs`` epochs: loader
    efficiency (batches x step time / wall time), waits for a batch at epoch starts and in steady state, and
    the main thread's CPU time per batch (receiving it)."""
    dataset = load_data(config, say=quiet)[0]
    waits, starts, cpu, freeing = [], [], [], []
    wall = time.perf_counter()
    if run_long:
        loader = train_loader(dataset, replace(config, epochs=epochs), torch.device("cpu"))
        per_epoch = loader.batch_sampler.per_epoch
        stream = train_batches(dataset, replace(config, epochs=epochs), torch.device("cpu"))
        epoch_iterators = [(stream, per_epoch)] * epochs
    else:
        loader = per_epoch_loader(dataset, config)
        per_epoch = len(loader)
        epoch_iterators = []
    for epoch in range(epochs):
        if run_long:
            batches = epoch_iterators[epoch][0]
        else:
            loader.sampler.set_epoch(epoch)
            batches = iter(loader)
        for step in range(per_epoch):
            cpu_start, wait_start = time.thread_time(), time.perf_counter()
            batch = next(batches)
            wait = time.perf_counter() - wait_start
            cpu.append(time.thread_time() - cpu_start)
            (starts if step == 0 else waits).append(wait)
            time.sleep(step_ms / 1000)
            cpu_start = time.thread_time()
            del batch  # releasing the batch's shared memory, the main thread's other cost per batch
            freeing.append(time.thread_time() - cpu_start)
    wall = time.perf_counter() - wall
    return {
        "efficiency": epochs * per_epoch * step_ms / 1000 / wall,
        "epoch_start_wait_ms": 1000 * max(starts[1:] or starts),
        "steady_worst_ms": 1000 * max(waits[per_epoch:] or waits),
        "steady_median_ms": 1000 * statistics.median(waits),
        "main_cpu_ms": 1000 * statistics.median(cpu),
        "free_cpu_ms": 1000 * statistics.median(freeing),
    }


def step_rates(config: RunConfig, steps: int) -> tuple[float, float]:
    """(images/s of the step on one in-memory batch, images/s of the step fed by the loader)."""
    device = torch.device(config.device)
    train_set, _, classes, mean, std = load_data(config, say=quiet)
    place = Placement(device, mean, std, config.channels_last, config.amp)
    loader = train_loader(train_set, replace(config, epochs=10_000), device)
    run = build_run(config, classes, place, loader.batch_sampler.per_epoch)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    stream = iter(loader)
    fixed_images, fixed_labels = next(stream)

    def timed(batches) -> float:
        seen, start = 0, None
        for i, (images, labels) in enumerate(batches):
            if i == 3:  # warm-up steps (cuDNN autotuning, allocator) are not timed
                sync()
                start, seen = time.perf_counter(), 0
            run_step(run, *place.batch(images, labels))
            seen += images.shape[0]
        sync()
        return seen / (time.perf_counter() - start)

    in_memory = timed((fixed_images, fixed_labels) for _ in range(steps + 3))
    return in_memory, timed(next(stream) for _ in range(steps + 3))


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--workers", default="0,2", help="comma-separated worker counts")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--step", action="store_true", help="also time loader + step (always on CUDA)")
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--size", type=int, default=448)
    parser.add_argument("--resize", type=int, default=512)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--amp", default="bf16" if torch.cuda.is_available() else "none")
    parser.add_argument(
        "--simulate-step-ms",
        type=float,
        default=0.0,
        help="a consumer that sleeps this long per batch, as a GPU step: epoch-boundary figures",
    )
    parser.add_argument("--epochs", type=int, default=3, help="epochs of the simulation")
    return parser.parse_args()


def bench_config(args: argparse.Namespace, folder: str) -> RunConfig:
    """The fine-tuning recipe's CEKD over SnapMix on the JPEG folder (the paper's regime)."""
    return RunConfig(
        method="cekd",
        mix="snapmix",
        dataset="imagefolder",
        data_root=folder,
        arch=args.arch,
        image_size=args.size,
        resize=args.resize,
        batch_size=args.batch,
        epochs=1,
        lr=0.001,
        head_lr=0.01,
        weight_decay=1e-4,
        schedule="multistep",
        mix_p=1.0,
        mix_alpha=5.0,
        same_on_batch=True,
        rampup_epochs=0,
        amp=args.amp,
        channels_last=args.device.startswith("cuda"),
        device=args.device,
        quiet=True,
        cache_dir=str(Path(folder) / "cache"),
    )


def loader_table(config: RunConfig, workers: list[int]) -> None:
    print("\nloader alone, images/s (second epoch); cached: decoded once (the first run builds the cache)")
    print(f"{'workers':>8} {'cached':>10} {'decoding':>10} {'previous':>10} {'cached/decoding per worker':>28}")
    for count in workers:
        cached = loader_rate(replace(config, workers=count), previous=False)
        decoding = loader_rate(replace(config, workers=count, no_cache=True), previous=False)
        before = loader_rate(replace(config, workers=count), previous=True)
        print(f"{count:>8} {cached:>10.1f} {decoding:>10.1f} {before:>10.1f} {cached / decoding:>27.1f}x")


def simulation_table(config: RunConfig, args: argparse.Namespace, workers: int) -> None:
    print(
        f"\nsimulated {args.simulate_step_ms:g} ms step, {workers} workers, {args.epochs} epochs of "
        f"{args.images // args.batch} batches"
    )
    print(
        f"{'loader':>30} {'efficiency':>10} {'epoch-start wait ms':>20} {'steady worst / median ms':>25} "
        f"{'main-thread CPU ms/batch (receive, release)':>44}"
    )
    rows = (
        ("one stream, cached (this)", True, False),
        ("one stream, decoding", True, True),
        ("per-epoch, decoding (previous)", False, True),
    )
    for name, run_long, no_cache in rows:
        r = simulate(replace(config, workers=workers, no_cache=no_cache), args.simulate_step_ms, args.epochs, run_long)
        print(
            f"{name:>30} {r['efficiency']:>10.3f} {r['epoch_start_wait_ms']:>20.1f} "
            f"{r['steady_worst_ms']:>12.1f} / {r['steady_median_ms']:<10.1f} "
            f"{r['main_cpu_ms']:>32.2f}, {r['free_cpu_ms']:.2f}"
        )


def step_line(config: RunConfig, args: argparse.Namespace, workers: int) -> None:
    memory, loaded = step_rates(replace(config, workers=workers), args.steps)
    print(
        f"\nCEKD step (2 x {args.arch}, SnapMix, amp {args.amp}), images/s over "
        f"{args.steps} steps after 3 warm-up steps, {workers} workers"
    )
    print(f"  in-memory batch {memory:.1f}; from the loader {loaded:.1f}; ratio {loaded / memory:.2f} (goal >= 0.95)")


def main() -> None:
    args = arguments()
    import torchvision

    print(
        f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"torchvision {torchvision.__version__}, device {args.device}"
        + (f" ({torch.cuda.get_device_name()})" if args.device.startswith("cuda") else "")
    )
    workers = [int(w) for w in args.workers.split(",")]
    with tempfile.TemporaryDirectory() as folder:
        kb = write_jpeg_folder(Path(folder), args.images)
        print(
            f"{args.images} JPEG files, 300-600 px, mean {kb:.0f} KB; resize {args.resize}, crop {args.size}, "
            f"batch {args.batch}"
        )
        config = bench_config(args, folder)
        loader_table(config, workers)
        if args.simulate_step_ms:
            simulation_table(config, args, max(workers))
        if args.step or args.device.startswith("cuda"):
            step_line(config, args, max(workers))


if __name__ == "__main__":
    main()
