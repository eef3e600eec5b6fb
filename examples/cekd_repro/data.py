"""What a run loads: the datasets with their augmentation, and the loaders that feed the training loop.

The synthetic sets come from :mod:`cekd_repro.synthetic`, the file datasets from :mod:`cekd_repro.files`;
every epoch's order and augmentation are a function of the seed and the epoch only (exact resume).
"""

from __future__ import annotations

import collections
import functools
import queue
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from .config import SOURCE_TASKS, SYNTHETIC
from .files import FileImages, file_splits
from .synthetic import SyntheticSpec, source_splits, synthetic_splits

if TYPE_CHECKING:
    from .config import RunConfig

EPOCH_SEED_STRIDE = 1_000_003  # a prime: the order of epoch e of seed s is drawn from seed s * stride + e


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


class Indexed(Dataset):
    """A dataset whose items carry their own index: ``(image, label, index)`` (MCL-OKD's memory rows)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: int | tuple[int, int]):
        index = key[1] if isinstance(key, tuple) else key
        return (*self.dataset[key], index)


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


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
PREFETCH_BATCHES = 4  # per loader worker


def load_data(config: RunConfig, rank: int = 0, world: int = 1, say: Callable[[str], None] = print):
    """(train set, test set, num classes, normalisation mean, std); items are (uint8 image, label).

    File datasets are decoded and resized once into the cache (:mod:`cekd_repro.cache`; rank 0 builds it,
    the other ranks wait and read it) and cropped and flipped from there, unless ``config.no_cache``."""
    if config.dataset in SYNTHETIC:
        seed = config.seed if config.data_seed is None else config.data_seed
        spec = SyntheticSpec(config.classes, config.train_per_class, config.test_per_class, config.image_size, seed)
        if config.dataset == "synthetic":
            train, test, classes = synthetic_splits(spec)
        else:
            train, test, classes = source_splits(spec, SOURCE_TASKS[config.dataset])
        shift = functools.partial(shift_crop, pad=config.max_shift)
        return Augmented(train, shift), Augmented(test), classes, (0.5,) * 3, (0.25,) * 3
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
