"""Specifications of the reproduction's decode-once cache of file datasets."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from cekd_repro import cache, data
from cekd_repro.config import RunConfig

CONFIG = RunConfig(dataset="imagefolder", image_size=24, resize=32, batch_size=2, quiet=True)


def write_folder(root: Path) -> None:
    """Textured RGB images of several sizes (and one grey-level file): resizing and cropping show."""
    from PIL import Image

    generator = np.random.default_rng(0)
    for split, count in (("train", 3), ("test", 2)):
        for c, name in enumerate(("ant", "bee")):
            for i in range(count):
                size = (40 + 7 * i, 30 + 5 * c)
                pixels = generator.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
                image = Image.fromarray(pixels)
                if split == "train" and i == 0 and c == 1:
                    image = image.convert("L")  # decoded then converted to RGB, as every image
                path = root / split / name / f"{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                image.save(path)


def config_for(tmp_path: Path, **changes) -> RunConfig:
    return replace(CONFIG, data_root=str(tmp_path / "data"), cache_dir=str(tmp_path / "cache"), **changes)


def items(dataset, seeds=(0, 1, 2, 3)) -> list[torch.Tensor]:
    return [dataset[(seed, index)][0] for seed in seeds for index in range(len(dataset))]


def test_cached_pixels_equal_the_decoding_path(tmp_path):
    write_folder(tmp_path / "data")
    lines = []
    cached = data.load_data(config_for(tmp_path), say=lines.append)
    decoding = data.load_data(config_for(tmp_path, no_cache=True))
    assert isinstance(cached[0].dataset, cache.DecodedImages) and not isinstance(
        decoding[0].dataset, cache.DecodedImages
    )
    for split in (0, 1):  # train: random crop and flip from the same seeds; test: centre crop
        for a, b in zip(items(cached[split]), items(decoding[split]), strict=True):
            assert a.dtype == torch.uint8 and a.shape == (3, 24, 24) and torch.equal(a, b)
    assert len(lines) == 2 and all(line.startswith("decoding ") and "once into" in line for line in lines)


def test_the_cache_is_reused_and_rebuilt_when_the_dataset_changes(tmp_path):
    write_folder(tmp_path / "data")
    lines = []
    data.load_data(config_for(tmp_path), say=lines.append)
    built = sorted((tmp_path / "cache").glob("*.u8"))
    stamps = [path.stat().st_mtime_ns for path in built]
    lines.clear()
    data.load_data(config_for(tmp_path), say=lines.append)
    assert [p.stat().st_mtime_ns for p in built] == stamps and all(
        line.startswith("decoded images: ") for line in lines
    )
    changed = tmp_path / "data" / "train" / "ant" / "1.png"
    changed.write_bytes(changed.read_bytes() + b"\x00")  # another size: another key
    lines.clear()
    data.load_data(config_for(tmp_path), say=lines.append)
    assert lines[0].startswith("decoding ") and len(list((tmp_path / "cache").glob("*.u8"))) == 3


def test_a_killed_or_damaged_build_is_never_read(tmp_path):
    write_folder(tmp_path / "data")
    config = config_for(tmp_path)
    data.load_data(config)
    train_data = sorted((tmp_path / "cache").glob("*.u8"), key=lambda p: p.stat().st_size)[-1]
    meta = train_data.with_suffix(".json")
    # killed before its .json was written: no .json, so it is built again
    meta.unlink()
    lines = []
    data.load_data(config, say=lines.append)
    assert any(line.startswith("decoding ") for line in lines) and meta.exists()
    # damaged afterwards: a data file of the wrong size is rebuilt
    with open(train_data, "r+b") as file:
        file.truncate(100)
    lines.clear()
    cached = data.load_data(config, say=lines.append)
    assert any(line.startswith("decoding ") for line in lines) and train_data.stat().st_size == 6 * 3 * 32 * 32
    decoding = data.load_data(replace(config, no_cache=True))
    assert all(torch.equal(a, b) for a, b in zip(items(cached[0]), items(decoding[0]), strict=True))


def test_an_unwritable_cache_dir_goes_on_without_the_cache_and_says_so(tmp_path):
    write_folder(tmp_path / "data")
    (tmp_path / "a-file").write_text("not a directory")  # unwritable for anyone, root included
    lines = []
    config = replace(config_for(tmp_path), cache_dir=str(tmp_path / "a-file" / "cache"))
    train, *_ = data.load_data(config, say=lines.append)
    assert not isinstance(train.dataset, cache.DecodedImages)
    assert (
        lines[-1].startswith(f"cache: cannot write {tmp_path / 'a-file' / 'cache'}")
        and "going on without it" in lines[-1]
    )


def test_a_failing_write_goes_on_without_the_cache_and_says_so(tmp_path, monkeypatch):
    """A full disk (or a read-only one), as the allocation of the data file reports it."""
    write_folder(tmp_path / "data")

    def full(fd, offset, length):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    lines = []
    train, *_ = data.load_data(config_for(tmp_path), say=lines.append)
    assert not isinstance(train.dataset, cache.DecodedImages)
    assert "cache: cannot write" in lines[-1] and "(No space left on device); going on without it" in lines[-1]
    assert not list((tmp_path / "cache").glob("*.partial"))  # nothing half-written left behind


def test_cache_flags_on_the_command_line(tmp_path):
    import reproduce_cekd as cli_module

    args = cli_module.parse(["--dataset", "cub", "--data-root", "x", "--cache-dir", "/tmp/c", "--no-cache"])
    config = cli_module.build_config(args)
    assert config.cache_dir == "/tmp/c" and config.no_cache
    assert "cache_dir" in config.saved() and "cache_dir" not in RunConfig().saved()  # synthetic: not recorded
