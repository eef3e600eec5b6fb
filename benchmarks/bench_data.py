"""Input pipeline of the reproduction: the loader alone, and (with --step, or on CUDA) loader + training step.

Writes a CUB-like ImageFolder of JPEG files (300-600 px sides, textured, quality 90) into a temporary
directory, then in one run:

1. loader alone, images/s in steady state (the second epoch), for each worker count: this engine's
   loader (PIL decode, resize, crop and flip, uint8 tensors, persistent workers, prefetching) against
   the previous pipeline (float32 ``ToTensor`` on the workers, workers re-spawned every epoch);
2. with ``--step`` (default on CUDA): the paper preset's CEKD step (2 members, SnapMix, the run's
   ``run_step``) fed by the loader, against the same step on one in-memory batch; the ratio is the
   share of the in-memory step rate the loader sustains (goal on a GPU: >= 0.95).

    python benchmarks/bench_data.py [--images 256] [--workers 0,2] [--device cpu|cuda] [--step]
        [--arch resnet50] [--size 448] [--resize 512] [--batch 16] [--steps 20] [--amp bf16]
"""

from __future__ import annotations

import argparse
import platform
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
from cekd_repro.data import draw_birds, load_data, make_loader  # noqa: E402
from cekd_repro.device import Placement  # noqa: E402
from cekd_repro.engine import build_run, run_step  # noqa: E402


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

    from cekd_repro.data import file_splits

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


def loader_rate(config: RunConfig, previous: bool) -> float:
    """Images/s of the second epoch (steady state) of the loader alone."""
    persistent = None if previous else make_loader(load_data(config)[0], config, True, torch.device("cpu"))
    rate = 0.0
    for epoch in range(2):
        loader = previous_loader(config, epoch) if previous else persistent
        if not previous:
            loader.sampler.set_epoch(epoch)
        start, seen = time.perf_counter(), 0
        for images, _ in loader:
            seen += images.shape[0]
        rate = seen / (time.perf_counter() - start)
    return rate


def step_rates(config: RunConfig, steps: int) -> tuple[float, float]:
    """(images/s of the step on one in-memory batch, images/s of the step fed by the loader)."""
    device = torch.device(config.device)
    train_set, _, classes, mean, std = load_data(config)
    place = Placement(device, mean, std, config.channels_last, config.amp)
    loader = make_loader(train_set, config, True, device)
    run = build_run(config, classes, place, len(loader))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fixed_images, fixed_labels = next(iter(loader))
    if device.type == "cuda":
        fixed_images, fixed_labels = fixed_images.pin_memory(), fixed_labels.pin_memory()

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

    def from_loader():
        epoch, produced = 0, 0
        while True:
            loader.sampler.set_epoch(epoch)
            for batch in loader:
                yield batch
                produced += 1
                if produced == steps + 3:
                    return
            epoch += 1

    return in_memory, timed(from_loader())


def main() -> None:
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
    args = parser.parse_args()
    import torchvision

    print(
        f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"torchvision {torchvision.__version__}, device {args.device}"
        + (f" ({torch.cuda.get_device_name()})" if args.device.startswith("cuda") else "")
    )
    with tempfile.TemporaryDirectory() as folder:
        kb = write_jpeg_folder(Path(folder), args.images)
        print(
            f"{args.images} JPEG files, 300-600 px, mean {kb:.0f} KB; resize {args.resize}, crop {args.size}, "
            f"batch {args.batch}"
        )
        config = RunConfig(
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
        )
        print("\nloader alone, images/s (second epoch)")
        print(f"{'workers':>8} {'this engine':>12} {'previous':>10} {'ratio':>7}")
        for workers in [int(w) for w in args.workers.split(",")]:
            ours = loader_rate(replace(config, workers=workers), previous=False)
            before = loader_rate(replace(config, workers=workers), previous=True)
            print(f"{workers:>8} {ours:>12.1f} {before:>10.1f} {ours / before:>6.2f}x")
        if args.step or args.device.startswith("cuda"):
            workers = max(int(w) for w in args.workers.split(","))
            memory, loaded = step_rates(replace(config, workers=workers), args.steps)
            print(
                f"\nCEKD step (2 x {args.arch}, SnapMix, amp {args.amp}), images/s over "
                f"{args.steps} steps after 3 warm-up steps, {workers} workers"
            )
            print(
                f"  in-memory batch {memory:.1f}; from the loader {loaded:.1f}; "
                f"ratio {loaded / memory:.2f} (goal >= 0.95)"
            )


if __name__ == "__main__":
    main()
