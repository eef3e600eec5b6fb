"""Datasets for the reproduction: a procedural fine-grained set, and CUB / Cars / Aircraft / ImageFolder loaders.

The synthetic set ("birds") carries the problem CEKD addresses: a large object with random pose,
scale and colour on a cluttered background, drawn the same way for every class, and a class decided
only by two small parts on the object: the colour of a head mark and the orientation of a stripe
patch, each a few percent of the image. A CutMix box therefore often removes or adds the evidence
while its area says otherwise.
"""

from __future__ import annotations

import collections
import math
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from .config import SOURCE_TASKS, SYNTHETIC

if TYPE_CHECKING:
    from .config import RunConfig

MARK_COLOURS = [
    (0.95, 0.1, 0.1),
    (0.1, 0.85, 0.1),
    (0.15, 0.35, 1.0),
    (1.0, 0.85, 0.0),
    (0.9, 0.2, 0.9),
    (0.0, 0.9, 0.9),
]
STRIPE_ANGLES = [0, 60, 120, 30, 90, 150]  # degrees; no horizontal flips are used on this set
SOURCE_SEED_OFFSET = 1_000  # the source task's images are drawn from seeds apart from the target's
EPOCH_SEED_STRIDE = 1_000_003  # a prime: the order of epoch e of seed s is drawn from seed s * stride + e


@dataclass(frozen=True)
class SyntheticSpec:
    """How much synthetic data to draw: classes = colours x orientations."""

    num_classes: int = 12
    train_per_class: int = 80
    test_per_class: int = 40
    size: int = 64
    seed: int = 0
    decoys: int = 2

    def factors(self) -> tuple[int, int]:
        # the most balanced split, colours >= orientations: 12 -> 4 colours x 3 orientations
        for colours in range(math.isqrt(self.num_classes - 1) + 1, len(MARK_COLOURS) + 1):
            if self.num_classes % colours == 0 and self.num_classes // colours <= len(STRIPE_ANGLES):
                return colours, self.num_classes // colours
        raise ValueError(
            f"--classes must be a product colours x orientations with colours <= {len(MARK_COLOURS)} and "
            f"orientations <= {len(STRIPE_ANGLES)}, got {self.num_classes}"
        )


def draw_birds(labels: Tensor, size: int, colours: int, generator: torch.Generator, decoys: int = 2) -> Tensor:
    """(N, 3, size, size) float images in [0, 1] of the synthetic fine-grained classes ``labels``, with
    ``decoys`` part-like distractors (a disc and a striped square each) in the background."""
    n = labels.shape[0]
    u = lambda *shape: torch.rand(*shape, generator=generator)  # noqa: E731
    ys, xs = torch.meshgrid(
        torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32), indexing="ij"
    )
    ys, xs = ys[None], xs[None]
    # clutter: smooth colour blobs and pixel noise, the same for every class
    images = 0.25 + 0.2 * u(n, 3, 1, 1) + 0.08 * torch.randn(n, 3, size, size, generator=generator)
    for _ in range(6):
        cy, cx, radius = size * u(n, 1, 1), size * u(n, 1, 1), size * (0.05 + 0.15 * u(n, 1, 1))
        blob = torch.exp(-((ys - cy) ** 2 + (xs - cx) ** 2) / (2 * radius**2))
        images = images + 0.35 * (u(n, 3, 1, 1) - 0.5) * blob[:, None]
    # decoys: part-like clutter (discs in the mark colours, striped squares at any orientation) in the
    # background, so the evidence is only where it sits on the body, not anywhere in the image
    palette = torch.tensor(MARK_COLOURS[:colours])
    for _ in range(decoys):
        dy, dx = size * u(n, 1, 1), size * u(n, 1, 1)
        disc = (ys - dy) ** 2 + (xs - dx) ** 2 <= (size * 0.06) ** 2
        colour = palette[torch.randint(0, colours, (n,), generator=generator)]
        images = torch.where(disc[:, None], colour[:, :, None, None], images)
        sy, sx, theta = size * u(n, 1, 1), size * u(n, 1, 1), math.pi * u(n, 1, 1)
        square = ((ys - sy).abs() <= size * 0.08) & ((xs - sx).abs() <= size * 0.08)
        lines = (
            torch.sin(((xs - sx) * torch.cos(theta) + (ys - sy) * torch.sin(theta)) * (2 * math.pi / (size * 0.06))) > 0
        )
        images = torch.where(square[:, None], (0.1 + 0.8 * lines.float())[:, None].expand(n, 3, size, size), images)
    # body: a rotated ellipse of random pose, scale and colour
    cy, cx = size * (0.35 + 0.3 * u(n, 1, 1)), size * (0.35 + 0.3 * u(n, 1, 1))
    angle = 2 * math.pi * u(n, 1, 1)
    length, width = size * (0.22 + 0.08 * u(n, 1, 1)), size * (0.12 + 0.04 * u(n, 1, 1))
    cos, sin = torch.cos(angle), torch.sin(angle)
    along = (xs - cx) * cos + (ys - cy) * sin
    across = -(xs - cx) * sin + (ys - cy) * cos
    body = (along / length) ** 2 + (across / width) ** 2 <= 1
    body_colour = 0.3 + 0.4 * u(n, 1, 1, 1) + 0.1 * (u(n, 3, 1, 1) - 0.5)
    images = torch.where(body[:, None], body_colour.expand(n, 3, 1, 1), images)
    # head mark (class part 1): a small disc of the class colour at the front of the body
    mark = torch.tensor(MARK_COLOURS[:colours])[labels % colours]
    head_y, head_x = cy + 0.75 * length * sin, cx + 0.75 * length * cos
    radius = size * 0.06
    head = (ys - head_y) ** 2 + (xs - head_x) ** 2 <= radius**2
    images = torch.where(head[:, None], mark[:, :, None, None], images)
    # stripe patch (class part 2): a small square at the rear whose stripes have the class orientation
    stripe_angle = torch.tensor(STRIPE_ANGLES, dtype=torch.float32)[labels // colours].view(n, 1, 1) * math.pi / 180
    patch_y, patch_x = cy - 0.45 * length * sin, cx - 0.45 * length * cos
    half = size * 0.08
    in_patch = ((ys - patch_y).abs() <= half) & ((xs - patch_x).abs() <= half)
    phase = (xs - patch_x) * torch.cos(stripe_angle) + (ys - patch_y) * torch.sin(stripe_angle)
    stripes = (torch.sin(phase * (2 * math.pi / (size * 0.06))) > 0).float()
    images = torch.where(in_patch[:, None], (0.1 + 0.8 * stripes)[:, None].expand(n, 3, size, size), images)
    return images.clamp(0, 1)


class TensorImages(Dataset):
    """Images held in memory as a (N, C, H, W) uint8 tensor; items are (uint8 image, label)."""

    def __init__(self, images: Tensor, labels: Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return self.images[i], int(self.labels[i])


def shift_crop(image: Tensor, pad: int = 4) -> Tensor:
    """Random translation of a (C, H, W) image by up to ``pad`` pixels, reflecting at the border
    (as ``F.pad(mode="reflect")`` then a random crop); any dtype, uint8 included. The synthetic set's
    augmentation."""
    height, width = image.shape[-2:]
    top, left = torch.randint(0, 2 * pad + 1, (2,)).tolist()

    def reflected(size: int, shift: int) -> Tensor:
        index = (torch.arange(size) + shift - pad).abs()
        return torch.where(index >= size, 2 * (size - 1) - index, index)

    return image[:, reflected(height, top)][:, :, reflected(width, left)]


class Augmented(Dataset):
    """A dataset whose items pass through ``transform`` with the torch RNG seeded per item.

    Items are addressed as ``(seed, index)`` (see :class:`EpochOrder`) or by a plain index (seed 0),
    so the augmentation of a sample depends only on its seed: the same in the main process and in
    any worker, and the same again when a run is resumed. The global RNG is restored afterwards.
    """

    def __init__(self, dataset: Dataset, transform=None) -> None:
        self.dataset, self.transform = dataset, transform

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: int | tuple[int, int]):
        seed, index = key if isinstance(key, tuple) else (0, key)
        image, label = self.dataset[index]
        if self.transform is not None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                image = self.transform(image)
        return image, label


class EpochOrder(Sampler):
    """One rank's ``(seed, index)`` items of each epoch: shuffled (or in order) and seeded from
    ``(seed, epoch)`` only, so an epoch is replayed exactly after a resume, with any worker count.

    As ``DistributedSampler``, the order is padded to a multiple of ``world`` and split by rank;
    call :meth:`set_epoch` before each epoch (persistent loader workers see the new order).
    """

    def __init__(self, size: int, shuffle: bool, seed: int, rank: int = 0, world: int = 1) -> None:
        self.size, self.shuffle, self.seed, self.rank, self.world = size, shuffle, seed, rank, world
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return -(-self.size // self.world)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * EPOCH_SEED_STRIDE + self.epoch)
        order = torch.randperm(self.size, generator=generator) if self.shuffle else torch.arange(self.size)
        order = torch.cat([order, order[: len(self) * self.world - self.size]])[self.rank :: self.world]
        seeds = torch.randint(0, 2**62, (len(self),), generator=generator)
        return iter(zip(seeds.tolist(), order.tolist(), strict=True))


def synthetic_splits(spec: SyntheticSpec) -> tuple[TensorImages, TensorImages, int]:
    """(train, test, num_classes), deterministic for ``spec.seed``; drawn in memory in seconds."""
    colours, _ = spec.factors()
    splits = []
    for offset, per_class in ((0, spec.train_per_class), (1, spec.test_per_class)):
        generator = torch.Generator().manual_seed(spec.seed * 2 + offset)
        labels = torch.arange(spec.num_classes).repeat_interleave(per_class)
        labels = labels[torch.randperm(labels.numel(), generator=generator)]
        images = draw_birds(labels, spec.size, colours, generator, spec.decoys)
        splits.append(TensorImages((images * 255).round().to(torch.uint8), labels))
    return splits[0], splits[1], spec.num_classes


def source_pairs(spec: SyntheticSpec, kind: str = "near") -> list[int]:
    """The transfer proxy's source classes, as labels of the full 6 x 6 grid (colour + 6 x orientation) of
    (head colour, stripe orientation) pairs, drawn the same way as the target task of ``spec.num_classes``:

    - ``near`` (``--dataset synthetic-source``): every pair the target does not use. The classes are
      disjoint, but each of the target's colours and orientations is a part of some source class (12
      target classes leave 24 source classes);
    - ``colours`` (``--dataset synthetic-colours``): the target's colours (and the others) on stripe
      orientations the target never uses (18 classes for 12 target classes);
    - ``distant`` (``--dataset synthetic-distant``): the pairs that share neither colour nor orientation
      with any target class (12 target classes leave 6): the target's parts are never a source class's."""
    colours, orientations = spec.factors()
    keep = {
        "near": lambda c, a: c >= colours or a >= orientations,
        "colours": lambda c, a: a >= orientations,
        "distant": lambda c, a: c >= colours and a >= orientations,
    }[kind]
    grid = len(MARK_COLOURS)
    return [c + grid * a for a in range(len(STRIPE_ANGLES)) for c in range(grid) if keep(c, a)]


def source_splits(spec: SyntheticSpec, kind: str = "near") -> tuple[TensorImages, TensorImages, int]:
    """(train, test, num_classes) of the source task (:func:`source_pairs`), ``spec.train_per_class`` and
    ``spec.test_per_class`` images per class, deterministic for ``spec.seed`` (drawn apart from the target)."""
    pairs = torch.tensor(source_pairs(spec, kind))
    splits = []
    for offset, per_class in ((0, spec.train_per_class), (1, spec.test_per_class)):
        generator = torch.Generator().manual_seed(spec.seed * 2 + offset + SOURCE_SEED_OFFSET)
        labels = torch.arange(len(pairs)).repeat_interleave(per_class)
        labels = labels[torch.randperm(labels.numel(), generator=generator)]
        images = draw_birds(pairs[labels], spec.size, len(MARK_COLOURS), generator, spec.decoys)
        splits.append(TensorImages((images * 255).round().to(torch.uint8), labels))
    return splits[0], splits[1], len(pairs)


# ---------------------------------------------------------------- real datasets in their native layouts

LAYOUTS = {
    "cub": "ROOT/images/<class>/<file>.jpg, ROOT/images.txt (id path), ROOT/image_class_labels.txt (id class), "
    "ROOT/train_test_split.txt (id is_train) -- the CUB_200_2011 folder",
    "aircraft": "ROOT/data/images/<id>.jpg, ROOT/data/images_variant_trainval.txt and "
    "ROOT/data/images_variant_test.txt (id variant) -- the fgvc-aircraft-2013b folder",
    "cars": "ROOT/stanford_cars/{cars_train,cars_test}/<file>.jpg, ROOT/stanford_cars/devkit/{cars_train_annos.mat,"
    "cars_meta.mat} and ROOT/stanford_cars/cars_test_annos_withlabels.mat, as torchvision.datasets.StanfordCars reads",
    "imagefolder": "ROOT/train/<class>/<image> and ROOT/test/<class>/<image> (other files than images are ignored)",
}


class LayoutError(ValueError):
    """A dataset root is missing or does not have the expected layout."""


def _require(path: Path, dataset: str) -> Path:
    if not path.exists():
        raise LayoutError(f"{dataset}: {path} not found; expected layout: {LAYOUTS[dataset]}")
    return path


def _read_table(path: Path, dataset: str, columns: int) -> list[list[str]]:
    rows = [line.split() for line in _require(path, dataset).read_text().splitlines() if line.strip()]
    if dataset == "aircraft":  # "<id> <variant name with spaces>"
        rows = [
            [line.split(" ", 1)[0], line.split(" ", 1)[1]] for line in path.read_text().splitlines() if line.strip()
        ]
    bad = [row for row in rows if len(row) != columns]
    if bad or not rows:
        raise LayoutError(
            f"{dataset}: {path} is malformed (expected {columns} columns per line, got {bad[:1] or 'no lines'}); "
            f"expected layout: {LAYOUTS[dataset]}"
        )
    return rows


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")


class FileImages(Dataset):
    """Image files with integer labels; items are (RGB PIL image, label).

    A file that cannot be decoded stops the run with an ``OSError`` naming it (a dataset with broken
    files should be repaired, not silently trained on a subset).
    """

    def __init__(self, paths: list[Path], labels: list[int]) -> None:
        self.paths, self.labels = paths, labels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        from PIL import Image

        try:
            with Image.open(self.paths[i]) as image:
                return image.convert("RGB"), self.labels[i]
        except OSError as error:
            raise OSError(f"cannot read image {self.paths[i]}: {error}") from error


def file_splits(dataset: str, root: str | Path) -> tuple[FileImages, FileImages, int]:
    """(train, test, num_classes) of a real dataset in its native layout, without transforms."""
    root = Path(root)
    if dataset not in LAYOUTS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {', '.join(LAYOUTS)} or synthetic")
    _require(root, dataset)
    if dataset == "cub":
        paths = dict(_read_table(root / "images.txt", dataset, 2))
        labels = {i: int(c) - 1 for i, c in _read_table(root / "image_class_labels.txt", dataset, 2)}
        split = {i: s == "1" for i, s in _read_table(root / "train_test_split.txt", dataset, 2)}
        parts = [[i for i in paths if split.get(i) == train] for train in (True, False)]
        made = [
            FileImages([_require(root / "images" / paths[i], dataset) for i in ids], [labels[i] for i in ids])
            for ids in parts
        ]
        return made[0], made[1], len(set(labels.values()))
    if dataset == "aircraft":
        tables = [
            _read_table(root / "data" / f"images_variant_{name}.txt", dataset, 2) for name in ("trainval", "test")
        ]
        classes = sorted({variant for table in tables for _, variant in table})
        index = {name: i for i, name in enumerate(classes)}
        made = [
            FileImages(
                [_require(root / "data" / "images" / f"{i}.jpg", dataset) for i, _ in table],
                [index[v] for _, v in table],
            )
            for table in tables
        ]
        return made[0], made[1], len(classes)
    if dataset == "cars":
        import torchvision

        _require(root / "stanford_cars", dataset)
        try:
            train, test = (torchvision.datasets.StanfordCars(str(root), split=s) for s in ("train", "test"))
        except (RuntimeError, OSError, TypeError, KeyError, ValueError) as error:  # missing or malformed .mat files
            raise LayoutError(f"cars: {error or type(error).__name__}; expected layout: {LAYOUTS[dataset]}") from error
        made = [FileImages([Path(p) for p, _ in d._samples], [c for _, c in d._samples]) for d in (train, test)]
        return made[0], made[1], len(train.classes)
    # imagefolder
    splits = [_require(root / name, dataset) for name in ("train", "test")]
    classes = sorted(d.name for d in splits[0].iterdir() if d.is_dir())
    if not classes:
        raise LayoutError(f"imagefolder: {splits[0]} holds no class folders; expected layout: {LAYOUTS[dataset]}")
    made = []
    for folder in splits:
        items = [
            (p, i)
            for i, c in enumerate(classes)
            for p in sorted((folder / c).glob("*"))
            if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
        ]
        if not items:
            raise LayoutError(
                f"imagefolder: {folder} holds no images in {classes}; expected layout: {LAYOUTS[dataset]}"
            )
        made.append(FileImages([p for p, _ in items], [c for _, c in items]))
    return made[0], made[1], len(classes)


# ---------------------------------------------------------------- what a run loads

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
PREFETCH_BATCHES = 4  # per loader worker


def load_data(config: RunConfig, rank: int = 0, world: int = 1, say: Callable[[str], None] = print):
    """(train set, test set, num classes, normalisation mean, std); items are (uint8 image, label).

    File datasets are decoded and resized once into the cache (:mod:`cekd_repro.cache`; rank 0 builds it,
    the other ranks wait and read it) and cropped and flipped from there, unless ``config.no_cache``."""
    if config.dataset in SYNTHETIC:
        spec = SyntheticSpec(
            config.classes, config.train_per_class, config.test_per_class, config.image_size, config.seed
        )
        if config.dataset == "synthetic":
            train, test, classes = synthetic_splits(spec)
        else:
            train, test, classes = source_splits(spec, SOURCE_TASKS[config.dataset])
        return Augmented(train, shift_crop), Augmented(test), classes, (0.5,) * 3, (0.25,) * 3
    import torchvision.transforms as T

    train, test, classes = file_splits(config.dataset, config.data_root)
    warp = T.Resize((config.resize, config.resize))
    crop_and_flip = [T.RandomCrop(config.image_size), T.RandomHorizontalFlip()]
    centre = T.CenterCrop(config.image_size)
    splits = []
    for files, random in ((train, True), (test, False)):
        decoded = None if config.no_cache else _decoded_once(files, config, rank, world, say)
        if decoded is not None:  # the same pixels as decoding: crop and flip commute with PILToTensor
            splits.append(Augmented(decoded, T.Compose(crop_and_flip) if random else centre))
        else:
            steps = [warp, *(crop_and_flip if random else [centre]), T.PILToTensor()]
            splits.append(Augmented(files, T.Compose(steps)))
    return splits[0], splits[1], classes, IMAGENET_MEAN, IMAGENET_STD


def _decoded_once(files: FileImages, config: RunConfig, rank: int, world: int, say: Callable[[str], None]):
    from .cache import cached_images, default_cache_dir

    cache_dir = Path(config.cache_dir) if config.cache_dir else default_cache_dir()
    arguments = (files, files.paths, files.labels, config.resize, cache_dir, config.workers)
    decoded = cached_images(*arguments, build=rank == 0, say=say)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()  # rank 0 has built it (or could not)
        if rank != 0:
            decoded = cached_images(*arguments, build=False, say=lambda line: None)
    return decoded


class EpochBatches(Sampler):
    """One rank's training batches of epochs ``start`` to ``end - 1``, back to back.

    Each epoch is :class:`EpochOrder`'s (a function of the seed and the epoch only) cut into full
    batches, the last partial one dropped. A loader over this sampler is iterated once for the whole
    run: its workers build the next epoch's first batches while the current epoch's last ones train,
    so no epoch starts with an empty queue. Any ``start`` gives the same batches for an epoch (resume)."""

    def __init__(self, order: EpochOrder, batch_size: int, start: int, end: int) -> None:
        self.order, self.batch_size, self.start, self.end = order, batch_size, start, end
        self.per_epoch = len(order) // batch_size

    def __len__(self) -> int:
        return self.per_epoch * max(self.end - self.start, 0)

    def __iter__(self):
        for epoch in range(self.start, self.end):
            self.order.set_epoch(epoch)
            items = list(self.order)
            for first in range(0, self.per_epoch * self.batch_size, self.batch_size):
                yield items[first : first + self.batch_size]


def _loader(dataset, config: RunConfig, device: torch.device, persistent: bool, **sampling) -> DataLoader:
    workers = config.workers
    return DataLoader(
        dataset,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=persistent and workers > 0,
        prefetch_factor=PREFETCH_BATCHES if workers > 0 else None,
        generator=torch.Generator().manual_seed(config.seed),  # leaves the global RNG alone
        **sampling,
    )


def train_loader(
    dataset, config: RunConfig, device: torch.device, start_epoch: int = 0, rank: int = 0, world: int = 1
) -> DataLoader:
    """The training batches of every remaining epoch (:class:`EpochBatches`), iterated once for the run:
    prefetching, pinned memory for a GPU. ``loader.batch_sampler.per_epoch`` batches make an epoch."""
    order = EpochOrder(len(dataset), shuffle=True, seed=config.seed, rank=rank, world=world)
    batches = EpochBatches(order, config.batch_size, start_epoch, config.epochs)
    return _loader(dataset, config, device, persistent=False, batch_sampler=batches)


class ReceivedInBackground:
    """A loader's batches received from its workers by a background thread, so that the main thread (the
    one that launches a GPU's kernels) only takes them from a queue and never frees their shared memory.

    With pinned memory (CUDA runs) the DataLoader's own pin-memory thread does this already; this does the
    same for loaders without it. Iterate it once; the thread stops at the end of the loader or when this
    object is garbage-collected."""

    _END = object()

    def __init__(self, loader: DataLoader, depth: int = 2) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._receive, args=(loader,), daemon=True)
        self._thread.start()

    def _receive(self, loader: DataLoader) -> None:
        # The thread keeps the last few batches it handed out and lets go of the oldest: a batch the main
        # thread has finished with is then freed here (its shared memory unmapped), not on the main thread.
        handed: collections.deque = collections.deque(maxlen=self._queue.maxsize + 2)
        try:
            for batch in loader:
                while not self._stop.is_set():
                    try:
                        self._queue.put(batch, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
                handed.append(batch)
                del batch
            self._queue.put(self._END)
        except BaseException as error:  # handed to the main thread, raised there
            self._queue.put(error)

    def __iter__(self) -> ReceivedInBackground:
        return self

    def __next__(self):
        item = self._queue.get()
        if item is self._END:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def __del__(self) -> None:
        self._stop.set()


def train_batches(
    dataset, config: RunConfig, device: torch.device, start_epoch: int = 0, rank: int = 0, world: int = 1
):
    """The run's stream of training batches: :func:`train_loader`, received in a background thread when the
    loader has workers and no pin-memory thread of its own."""
    loader = train_loader(dataset, config, device, start_epoch, rank, world)
    return ReceivedInBackground(loader) if loader.num_workers > 0 and not loader.pin_memory else iter(loader)


def test_loader(dataset, config: RunConfig, device: torch.device, rank: int = 0, world: int = 1) -> DataLoader:
    """The test batches, in order; built once per run with persistent workers and iterated every epoch."""
    order = EpochOrder(len(dataset), shuffle=False, seed=config.seed, rank=rank, world=world)
    return _loader(dataset, config, device, persistent=True, sampler=order, batch_size=config.batch_size)
