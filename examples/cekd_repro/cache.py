"""Decode-once cache of a file dataset (CUB, Cars, Aircraft, ImageFolder).

Every image is decoded, converted to RGB and resized to ``resize x resize`` once and stored as uint8 in a
memory-mapped file, ``<cache dir>/<key>.u8`` with ``<key>.json`` beside it; later epochs, later runs and
every DDP rank read it, so the workers only crop and flip. The key hashes the file list, each file's size
and modification time and the resize: a changed dataset gets a new cache, never a stale one.

A build writes ``<key>.u8.partial`` and renames it, then writes the ``.json`` last (atomically): a build
killed at any point leaves no ``.json`` and is started again by the next run; a data file whose size does
not match its ``.json`` is rebuilt. A full disk or an unwritable directory ends the build with one line
naming the path, and the run goes on decoding every epoch.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

CACHE_FORMAT = 1  # bump when the stored layout changes: old caches are then ignored, not misread


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/cekd-losses``, else ``~/.cache/cekd-losses``."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cekd-losses"


def cache_key(paths: list[Path], resize: int) -> str:
    """A hash of the file list, each file's size and modification time, the resize and the format."""
    digest = hashlib.sha256(f"format {CACHE_FORMAT} resize {resize}\n".encode())
    for path in paths:
        stat = path.stat()
        digest.update(f"{path.resolve()} {stat.st_size} {stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:24]


class DecodedImages(Dataset):
    """Items ``(uint8 (3, R, R) image, label)`` of a built cache, read from its memory map (opened lazily,
    once per loader worker)."""

    def __init__(self, path: Path, labels: list[int], resize: int) -> None:
        self.path, self.labels, self.resize = path, labels, resize
        self._array: np.memmap | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        if self._array is None:  # copy-on-write: tensors view the file's pages, nothing is copied or written back
            shape = (len(self.labels), 3, self.resize, self.resize)
            self._array = np.memmap(self.path, dtype=np.uint8, mode="c", shape=shape)
        return torch.from_numpy(self._array[i]), self.labels[i]

    def __getstate__(self) -> dict:  # a worker opens its own map
        return {**self.__dict__, "_array": None}


class _Decoded(Dataset):
    """Items ``(index, uint8 (3, R, R) image)``: one file decoded, converted to RGB and resized."""

    def __init__(self, files: Dataset, resize: int) -> None:
        import torchvision.transforms as T

        self.files = files
        self.transform = T.Compose([T.Resize((resize, resize)), T.PILToTensor()])

    def __len__(self) -> int:
        return len(self.files)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[int, Tensor]:
        return i, self.transform(self.files[i][0])


def cached_images(
    files: Dataset,
    paths: list[Path],
    labels: list[int],
    resize: int,
    cache_dir: Path,
    workers: int,
    build: bool,
    say: Callable[[str], None],
) -> DecodedImages | None:
    """The decoded images of ``files`` from the cache in ``cache_dir``, built first when ``build`` (rank 0)
    and missing or damaged; None (with one line saying why) when it cannot be written."""
    key = cache_key(paths, resize)
    data, meta = cache_dir / f"{key}.u8", cache_dir / f"{key}.json"
    expected = {
        "format": CACHE_FORMAT,
        "key": key,
        "images": len(paths),
        "resize": resize,
        "bytes": len(paths) * 3 * resize * resize,
    }
    if not _is_whole(data, meta, expected):
        if not build:
            return None
        try:
            _build(files, data, meta, expected, workers, say)
        except OSError as error:
            say(
                f"cache: cannot write {data} ({error.strerror or error}); going on without it, decoding every epoch "
                "(--cache-dir DIR to put it elsewhere, --no-cache to silence this)"
            )
            for leftover in (data.with_name(data.name + ".partial"), meta.with_name(meta.name + ".partial")):
                with contextlib.suppress(OSError):  # nothing half-written is left where it could be
                    leftover.unlink()
            return None
    else:
        say(f"decoded images: {data} ({expected['bytes'] / 1e9:.2f} GB, {len(paths)} images at {resize} px)")
    return DecodedImages(data, labels, resize)


def _is_whole(data: Path, meta: Path, expected: dict) -> bool:
    try:
        return json.loads(meta.read_text()) == expected and data.stat().st_size == expected["bytes"]
    except (OSError, ValueError):
        return False


def _build(files: Dataset, data: Path, meta: Path, expected: dict, workers: int, say: Callable[[str], None]) -> None:
    from tqdm import tqdm

    count, resize = expected["images"], expected["resize"]
    say(
        f"decoding {count} images once into {data} ({expected['bytes'] / 1e9:.2f} GB at {resize} px); later runs "
        "reuse it"
    )
    data.parent.mkdir(parents=True, exist_ok=True)
    partial = data.with_name(data.name + ".partial")
    with open(partial, "wb") as file:  # the space is taken now: a full disk is an OSError here, not a crash later
        try:
            os.posix_fallocate(file.fileno(), 0, expected["bytes"])
        except (AttributeError, OSError) as error:
            if getattr(error, "errno", None) == errno.ENOSPC:
                raise
            file.truncate(expected["bytes"])  # a file system without fallocate
    array = np.memmap(partial, dtype=np.uint8, mode="r+", shape=(count, 3, resize, resize))
    loader = DataLoader(_Decoded(files, resize), batch_size=None, num_workers=workers)
    for index, image in tqdm(loader, total=count, desc="decoding", leave=False, disable=not os.isatty(2)):
        array[index] = image.numpy()
    array.flush()
    del array
    os.replace(partial, data)
    meta_partial = meta.with_name(meta.name + ".partial")
    meta_partial.write_text(json.dumps(expected))
    os.replace(meta_partial, meta)  # written last: a .json means a whole data file
