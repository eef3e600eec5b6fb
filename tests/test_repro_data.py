"""Specifications of the reproduction's data: the synthetic fine-grained set, augmentation, epoch order,
loaders, and the real datasets' layouts (on small fake copies)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from repro_helpers import TINY

from cekd_repro import data
from cekd_repro.data import Augmented, EpochBatches, EpochOrder, shift_crop
from cekd_repro.files import LayoutError, file_splits
from cekd_repro.synthetic import SyntheticSpec, draw_birds, synthetic_splits


def test_synthetic_set_is_deterministic_balanced_and_sized():
    spec = SyntheticSpec(num_classes=6, train_per_class=5, test_per_class=2, size=40, seed=3)
    a_train, a_test, classes = synthetic_splits(spec)
    b_train, _, _ = synthetic_splits(spec)
    assert classes == 6 and len(a_train) == 30 and len(a_test) == 12
    assert torch.equal(a_train.images, b_train.images) and torch.equal(a_train.labels, b_train.labels)
    assert a_train.images.shape == (30, 3, 40, 40) and a_train.images.dtype == torch.uint8
    assert torch.equal(torch.bincount(a_train.labels), torch.full((6,), 5))
    other, _, _ = synthetic_splits(replace(spec, seed=4))
    assert not torch.equal(other.images, a_train.images)


def test_synthetic_class_lives_in_small_parts():
    """Two images drawn with the same randomness differ only in the head mark and stripe patch."""
    labels = torch.tensor([0, 5])  # 4 colours x 3 orientations: different colour and orientation
    a = draw_birds(labels[:1], 64, 4, torch.Generator().manual_seed(1))
    b = draw_birds(labels[1:], 64, 4, torch.Generator().manual_seed(1))
    differ = (a != b).any(dim=1).float().mean().item()
    assert 0.0 < differ < 0.08  # the evidence covers a few percent of the image


def test_synthetic_class_count_must_factor():
    with pytest.raises(ValueError, match="--classes must be a product colours x orientations.*got 7"):
        SyntheticSpec(num_classes=7).factors()


def test_shift_crop_is_a_reflect_padded_random_crop():
    image = torch.arange(2 * 6 * 7, dtype=torch.uint8).view(2, 6, 7)
    padded = torch.nn.functional.pad(image[None].float(), (4,) * 4, mode="reflect")[0]
    seen = set()
    for seed in range(40):
        torch.manual_seed(seed)
        top, left = torch.randint(0, 9, (2,)).tolist()
        torch.manual_seed(seed)
        shifted = shift_crop(image)
        assert shifted.dtype == torch.uint8
        assert torch.equal(shifted.float(), padded[:, top : top + 6, left : left + 7])
        seen.add((top, left))
    assert len(seen) > 20  # the shift is random


def test_max_shift_sets_the_training_shift_and_leaves_the_test_set_alone():
    """--max-shift N: a training image moves by up to N pixels (0: not at all); the test images never move."""
    moved = {}
    for shift in (0, 4, 8):
        train_set, test_set, *_ = data.load_data(replace(TINY, max_shift=shift), say=lambda line: None)
        raw = train_set.dataset.images[0]
        offsets = set()
        for seed in range(60):
            image, _ = train_set[(seed, 0)]
            padded = (
                torch.nn.functional.pad(raw[None].float(), (shift,) * 4, mode="reflect")[0] if shift else raw.float()
            )
            offsets |= {
                (top - shift, left - shift)
                for top in range(2 * shift + 1)
                for left in range(2 * shift + 1)
                if torch.equal(padded[:, top : top + raw.shape[1], left : left + raw.shape[2]], image.float())
            }
        moved[shift] = max(max(abs(a), abs(b)) for a, b in offsets)
        assert torch.equal(test_set[(7, 0)][0], test_set.dataset.images[0])
    assert moved == {0: 0, 4: 4, 8: 8}


def test_augmentation_depends_only_on_the_item_seed_and_leaves_the_global_rng_alone():
    base = synthetic_splits(SyntheticSpec(num_classes=4, train_per_class=2, test_per_class=1, size=16))[0]
    augmented = Augmented(base, shift_crop)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    first, _ = augmented[(123, 1)]
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(augmented[(123, 1)][0], first)
    assert any(not torch.equal(augmented[(seed, 1)][0], first) for seed in range(5))
    assert torch.equal(augmented[1][0], augmented[(0, 1)][0]) and base[1][1] == augmented[1][1]


def test_epoch_order_is_a_seeded_permutation_split_across_ranks():
    one = list(EpochOrder(10, shuffle=True, seed=3))
    assert sorted(i for _, i in one) == list(range(10))
    assert one == list(EpochOrder(10, shuffle=True, seed=3))
    order = EpochOrder(10, shuffle=True, seed=3)
    order.set_epoch(1)
    assert [i for _, i in order] != [i for _, i in one]
    assert [i for _, i in EpochOrder(5, shuffle=False, seed=0)] == [0, 1, 2, 3, 4]
    ranks = [list(EpochOrder(10, shuffle=True, seed=3, rank=r, world=3)) for r in range(3)]
    assert [len(r) for r in ranks] == [4, 4, 4]
    assert {i for r in ranks for _, i in r} == set(range(10))  # padded to 12 by repeating, as DistributedSampler


def test_epoch_batches_run_epochs_back_to_back_and_resume_exactly():
    order = EpochOrder(10, shuffle=True, seed=3)
    run = list(EpochBatches(order, 4, start=0, end=3))
    assert len(run) == 6 and all(len(batch) == 4 for batch in run)  # 2 full batches an epoch, the rest dropped
    for epoch in range(3):
        order.set_epoch(epoch)
        assert run[2 * epoch : 2 * epoch + 2] == [list(order)[:4], list(order)[4:8]]
    assert list(EpochBatches(EpochOrder(10, shuffle=True, seed=3), 4, start=1, end=3)) == run[2:]  # a resume


def images_of(config):
    train, test, _, _, _ = data.load_data(config)
    return train.dataset.images, test.dataset.images


def test_data_seed_fixes_the_images_whatever_the_run_seed():
    """--data-seed D: every run seed draws the images of seed D (a table's seeds share them); without it, each
    run seed draws its own, and seed D's images are those of the run with --seed D."""
    fixed = [images_of(replace(TINY, seed=s, data_seed=5)) for s in (0, 1)]
    own = [images_of(replace(TINY, seed=s)) for s in (0, 5)]
    assert all(torch.equal(a, b) for a, b in zip(fixed[0], fixed[1], strict=True))
    assert all(torch.equal(a, b) for a, b in zip(fixed[0], own[1], strict=True))
    assert not torch.equal(own[0][0], own[1][0])
    colours = [images_of(replace(TINY, dataset="synthetic-colours", data_seed=d))[0] for d in (None, 5)]
    assert not torch.equal(colours[0], colours[1])  # and the source tasks' sets


def test_loader_batches_do_not_depend_on_worker_count():
    config = replace(TINY, train_per_class=4, batch_size=4, epochs=2)
    train_set = data.load_data(config)[0]
    batches = {}
    for workers in (0, 2):
        loader = data.train_loader(train_set, replace(config, workers=workers), torch.device("cpu"), start_epoch=0)
        batches[workers] = [(images.clone(), labels.clone()) for images, labels in loader]
        assert len(batches[workers]) == 2 * loader.batch_sampler.per_epoch == 8
    for (a, la), (b, lb) in zip(batches[0], batches[2], strict=True):
        assert a.dtype == torch.uint8 and torch.equal(a, b) and torch.equal(la, lb)
    resumed = data.train_loader(train_set, config, torch.device("cpu"), start_epoch=1)
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(resumed, batches[0][4:], strict=True))


def write_png(path: Path, value: int) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (12, 10), (value, value, value)).save(path)


def test_cub_layout(tmp_path):
    lines = {"images.txt": [], "image_class_labels.txt": [], "train_test_split.txt": []}
    for i, (cls, train) in enumerate([(1, 1), (1, 0), (2, 1), (2, 0), (2, 1)], start=1):
        rel = f"{cls:03d}.Bird_{cls}/img_{i}.jpg"
        write_png(tmp_path / "images" / rel, 10 * i)
        lines["images.txt"].append(f"{i} {rel}")
        lines["image_class_labels.txt"].append(f"{i} {cls}")
        lines["train_test_split.txt"].append(f"{i} {train}")
    for name, rows in lines.items():
        (tmp_path / name).write_text("\n".join(rows) + "\n")
    train_set, test_set, classes = file_splits("cub", tmp_path)
    assert classes == 2 and len(train_set) == 3 and len(test_set) == 2
    assert sorted(train_set.labels) == [0, 1, 1]
    image, label = train_set[0]
    assert image.size == (12, 10) and label == 0


def test_aircraft_layout(tmp_path):
    data = tmp_path / "data"
    rows = {"trainval": [("100", "Boeing 737-300"), ("101", "A320")], "test": [("102", "A320")]}
    for split, items in rows.items():
        for image_id, _ in items:
            write_png(data / "images" / f"{image_id}.jpg", 50)
        (data / f"images_variant_{split}.txt").write_text("".join(f"{i} {v}\n" for i, v in items))
    train_set, test_set, classes = file_splits("aircraft", tmp_path)
    assert classes == 2 and len(train_set) == 2 and test_set.labels == [0]  # "A320" < "Boeing 737-300"
    assert train_set.labels == [1, 0]


def test_imagefolder_layout(tmp_path):
    for split, count in (("train", 2), ("test", 1)):
        for cls in ("ant", "bee"):
            for i in range(count):
                write_png(tmp_path / split / cls / f"{i}.png", 90)
    (tmp_path / "train" / "ant" / "readme.txt").write_text("not an image")
    (tmp_path / "train" / "bee" / ".DS_Store").write_bytes(b"\x00")
    train_set, test_set, classes = file_splits("imagefolder", tmp_path)
    assert classes == 2 and len(train_set) == 4 and sorted(test_set.labels) == [0, 1]


def test_a_broken_image_is_named(tmp_path):
    write_png(tmp_path / "train" / "ant" / "good.png", 90)
    good = (tmp_path / "train" / "ant" / "good.png").read_bytes()
    (tmp_path / "train" / "ant" / "truncated.png").write_bytes(good[: len(good) // 2])
    write_png(tmp_path / "test" / "ant" / "0.png", 90)
    train_set, _, _ = file_splits("imagefolder", tmp_path)
    index = [p.name for p in train_set.paths].index("truncated.png")
    with pytest.raises(OSError, match=r"cannot read image .*truncated.png"):
        train_set[index]


def test_cars_layout(tmp_path):
    import scipy.io as scipy_io

    devkit = tmp_path / "stanford_cars" / "devkit"
    devkit.mkdir(parents=True)

    def annotations(names, classes):
        dtype = [("fname", "O"), ("class", "O")]
        return {
            "annotations": np.array([[(n, np.array([[c]])) for n, c in zip(names, classes, strict=True)]], dtype=dtype)
        }

    for split, names, classes in (("train", ["a.jpg", "b.jpg"], [1, 2]), ("test", ["c.jpg", "d.jpg"], [2, 1])):
        for name in names:
            write_png(tmp_path / "stanford_cars" / f"cars_{split}" / name, 70)
        file = devkit / "cars_train_annos.mat" if split == "train" else devkit.parent / "cars_test_annos_withlabels.mat"
        scipy_io.savemat(file, annotations(names, classes))
    scipy_io.savemat(devkit / "cars_meta.mat", {"class_names": np.array([["Audi A4", "BMW M3"]], dtype=object)})
    train_set, test_set, classes = file_splits("cars", tmp_path)
    assert classes == 2 and train_set.labels == [0, 1] and test_set.labels == [1, 0]


@pytest.mark.parametrize("dataset", ["cub", "aircraft", "cars", "imagefolder"])
def test_missing_root_names_the_expected_layout(dataset, tmp_path):
    with pytest.raises(LayoutError, match=rf"{dataset}: .* not found; expected layout: .*ROOT"):
        file_splits(dataset, tmp_path / "nowhere")


def test_malformed_cub_index(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images.txt").write_text("1\n")
    with pytest.raises(LayoutError, match=r"cub: .*images.txt is malformed \(expected 2 columns"):
        file_splits("cub", tmp_path)


class Failing(torch.utils.data.Dataset):
    """Items 0-5; item 5 is a file that cannot be read."""

    def __len__(self) -> int:
        return 6

    def __getitem__(self, key):
        _, index = key if isinstance(key, tuple) else (0, key)
        if index == 5:
            raise OSError("cannot read image broken.jpg: truncated")
        return torch.full((3, 2, 2), index, dtype=torch.uint8), index


def test_batches_received_in_background_are_the_loaders_and_so_are_its_errors():
    config = replace(TINY, train_per_class=4, batch_size=4, epochs=2, workers=1)
    train_set = data.load_data(config)[0]
    expected = list(data.train_loader(train_set, replace(config, workers=0), torch.device("cpu")))
    stream = data.train_batches(train_set, config, torch.device("cpu"))
    assert isinstance(stream, data.ReceivedInBackground)
    received = list(stream)
    assert len(received) == len(expected) == 8
    assert all(torch.equal(a, b) and torch.equal(la, lb) for (a, la), (b, lb) in zip(received, expected, strict=True))
    failing = data.train_batches(Failing(), replace(config, batch_size=6, epochs=1), torch.device("cpu"))
    with pytest.raises(OSError, match="cannot read image broken.jpg: truncated"):
        next(failing)
