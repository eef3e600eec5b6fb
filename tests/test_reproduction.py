"""Specifications of the reproduction example (examples/reproduce_cekd.py and examples/cekd_repro)."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
sys.path.insert(0, str(EXAMPLES))

from cekd_repro import engine  # noqa: E402
from cekd_repro.data import (  # noqa: E402
    Augmented,
    EpochOrder,
    LayoutError,
    SyntheticSpec,
    draw_birds,
    file_splits,
    shift_crop,
    synthetic_splits,
)
from cekd_repro.engine import Placement, RunConfig, RunDirExists, train  # noqa: E402
from cekd_repro.models import build_model  # noqa: E402

from cekd_losses import CollaborativeEnsemble  # noqa: E402

TINY = RunConfig(classes=4, train_per_class=6, test_per_class=3, image_size=32, arch="resnet18", epochs=1,
                 batch_size=8, lr=0.05, rampup_epochs=1, quiet=True)


def history(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------- synthetic data


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


def test_loader_batches_do_not_depend_on_worker_count():
    config = replace(TINY, train_per_class=4, batch_size=4)
    train_set = engine.load_data(config)[0]
    batches = {}
    for workers in (0, 2):
        loader = engine.make_loader(train_set, replace(config, workers=workers), True, torch.device("cpu"))
        loader.sampler.set_epoch(1)
        batches[workers] = [(images.clone(), labels.clone()) for images, labels in loader]
        assert loader.persistent_workers == (workers > 0)
    for (a, la), (b, lb) in zip(batches[0], batches[2]):
        assert a.dtype == torch.uint8 and torch.equal(a, b) and torch.equal(la, lb)


# ---------------------------------------------------------------- devices


def test_placement_normalises_uint8_on_the_device(device):
    place = Placement(device, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.5), channels_last=True)
    images = torch.randint(0, 256, (2, 3, 5, 4), dtype=torch.uint8)
    moved, labels = place.batch(images, torch.tensor([1, 0]))
    expected = (images.double() / 255 - torch.tensor([0.5, 0.4, 0.3]).double().view(1, 3, 1, 1)) / torch.tensor(
        [0.2, 0.25, 0.5]).double().view(1, 3, 1, 1)
    assert moved.device.type == device.type and labels.device.type == device.type
    assert moved.dtype == torch.float32 and moved.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(moved.cpu().double(), expected, atol=1e-5)
    as_float, _ = place.batch(images.float() / 255, torch.tensor([1, 0]))  # [0, 1] floats give the same
    assert torch.allclose(as_float, moved, atol=1e-5)


@pytest.mark.parametrize("overrides", [{"method": "cekd", "mix": "snapmix", "combine": "gate"},
                                       {"method": "baseline"}, {"method": "mixup"}],
                         ids=["cekd-snapmix-gate", "baseline", "mixup"])
def test_every_tensor_of_a_run_stays_on_its_device(overrides, tmp_path, monkeypatch):
    """The engine on the ``meta`` device, a stand-in accelerator that CPU-only CI has: a label, image,
    logit or metric that is not moved by the engine's Placement meets a meta tensor and raises, as it
    would on a GPU; a host read outside ``Placement.read`` raises too (meta tensors hold no values)."""
    reads = []

    def read(values):
        reads.append({name: value.device.type for name, value in values.items()})
        # every count and sum 1, and a clean divergence verdict (all zeros: nothing non-finite)
        return {name: [0.0 if name == "verdict" else 1.0] * value.numel() for name, value in values.items()}

    monkeypatch.setattr(Placement, "read", staticmethod(read))
    record = train(replace(TINY, device="meta", **overrides), tmp_path / "run")
    assert reads and all(kind == "meta" for read_ in reads for kind in read_.values())
    assert record["epoch"] == 1 and all(v == 100.0 for k, v in record.items() if k.startswith("top1_"))


def test_distributed_backend_follows_the_run_device(monkeypatch):
    backends = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU machine
    monkeypatch.setattr(engine.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(engine.dist, "init_process_group", lambda backend: backends.append(backend))
    monkeypatch.setattr(engine.dist, "get_rank", lambda: 0)
    engine._distributed("cpu")
    engine._distributed("cuda")
    assert backends == ["gloo", "nccl"]


# ---------------------------------------------------------------- real-data loaders on fake copies of their layouts


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
    import numpy as np

    def annotations(names, classes):
        dtype = [("fname", "O"), ("class", "O")]
        return {"annotations": np.array([[(n, np.array([[c]])) for n, c in zip(names, classes)]], dtype=dtype)}

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


# ---------------------------------------------------------------- models


def test_build_model_and_local_pretrained_weights(tmp_path):
    source = build_model("resnet18", 10)
    torch.save(source.state_dict(), tmp_path / "w.pth")
    model = build_model("resnet18", 3, pretrained=str(tmp_path / "w.pth"))
    assert model.fc.out_features == 3
    assert torch.equal(model.conv1.weight, source.conv1.weight)
    assert build_model("timm:resnet18", 3).get_classifier().out_features == 3
    with pytest.raises(FileNotFoundError, match="--pretrained .*missing.pth: no such file"):
        build_model("resnet18", 3, pretrained=str(tmp_path / "missing.pth"))
    with pytest.raises(ValueError, match="does not fit ResNet"):
        torch.save(build_model("resnet34", 3).state_dict(), tmp_path / "r34.pth")
        build_model("resnet18", 3, pretrained=str(tmp_path / "r34.pth"))
    with pytest.raises(ValueError, match="unknown torchvision classification model 'resnet19'"):
        build_model("resnet19", 3)


# ---------------------------------------------------------------- training runs


@pytest.mark.parametrize(
    "overrides",
    [{"method": "baseline"}, {"method": "mixup"}, {"method": "cutmix"}, {"method": "snapmix"},
     {"method": "cekd", "mix": "cutmix"}, {"method": "cekd", "mix": "snapmix", "combine": "gate"},
     {"method": "cekd", "no_cross": True, "arch": "resnet18,timm:resnet18"},
     {"method": "cekd", "no_ensemble": True, "amp": "bf16", "channels_last": True},
     {"method": "snapmix", "arch": "timm:vit_tiny_patch16_224"},
     {"method": "cekd", "mix": "snapmix", "combine": "fusion", "arch": "resnet18,timm:deit_tiny_patch16_224"}],
    ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()),
)
def test_smoke_every_method(overrides, tmp_path):
    record = train(replace(TINY, **overrides), tmp_path / "run")
    keys = {k for k in record if k.startswith("top1_")}
    expected = {"top1_model"} if overrides["method"] != "cekd" else {"top1_member0", "top1_member1", "top1_ensemble"}
    assert keys == expected
    assert all(0 <= record[k] <= 100 for k in keys)
    assert record["images_per_s"] > 0 and "loss_total" in record
    if overrides["method"] == "cekd":
        assert {"loss_supervised", "loss_cross", "loss_ensemble"} <= set(record)
    assert (tmp_path / "run" / "checkpoint.pt").exists() and len(history(tmp_path / "run")) == 1


def test_killed_and_resumed_run_ends_like_an_uninterrupted_one(tmp_path, monkeypatch):
    config = replace(TINY, method="cekd", mix="snapmix", epochs=3, workers=1)  # a persistent loader worker
    straight = train(config, tmp_path / "straight")

    real_evaluate, calls = engine.evaluate, []

    def killed_in_epoch_two(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the process dies after epoch 1's checkpoint
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(engine, "evaluate", killed_in_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        train(config, tmp_path / "resumed")
    monkeypatch.setattr(engine, "evaluate", real_evaluate)
    assert torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=False)["epoch"] == 1
    resumed = train(engine.resumed_config(tmp_path / "resumed"), tmp_path / "resumed", resume=True)
    strip = lambda records: [{k: v for k, v in r.items() if k not in ("images_per_s", "epoch_s")} for r in records]  # noqa: E731
    assert strip(history(tmp_path / "resumed")) == strip(history(tmp_path / "straight"))
    assert strip([resumed]) == strip([straight])


def test_clip_grad_bounds_every_update(tmp_path):
    """Plain SGD (no momentum, no weight decay, constant lr): 3 steps move the parameters by at most 3 lr clip."""
    config = replace(TINY, method="cekd", momentum=0.0, weight_decay=0.0, schedule="multistep", milestones=[99])
    torch.manual_seed(config.seed)  # the engine builds its members right after seeding
    start = CollaborativeEnsemble([build_model("resnet18", 4, None) for _ in range(2)])

    def distance_moved(run: str, clip: float | None) -> tuple[float, dict]:
        record = train(replace(config, clip_grad=clip), tmp_path / run)
        end = CollaborativeEnsemble([build_model("resnet18", 4, None) for _ in range(2)])
        end.load_state_dict(torch.load(tmp_path / run / "checkpoint.pt", weights_only=False)["model"])
        moved = torch.cat([(a - b).flatten() for a, b in zip(end.parameters(), start.parameters())])
        return moved.norm().item(), record

    clipped, record = distance_moved("clipped", 1e-3)
    free, _ = distance_moved("free", None)
    assert record["grad_norm"] > 1.0  # the clip was active: grad_norm is measured before clipping
    assert clipped <= 3 * config.lr * 1e-3 * (1 + 1e-4)
    assert free > 100 * clipped


def test_run_dir_is_never_overwritten(tmp_path):
    train(TINY, tmp_path / "run")
    with pytest.raises(RunDirExists, match="already holds a run; pass --resume"):
        train(TINY, tmp_path / "run")


def test_a_run_that_died_before_its_first_checkpoint_is_no_dead_end(tmp_path, monkeypatch):
    """Killed in epoch 1 (or while writing the first checkpoint): the dir can be reused or resumed."""
    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    for where in ("evaluate", "_write_atomic"):
        run_dir = tmp_path / where
        with monkeypatch.context() as patch:
            patch.setattr(engine, where, killed)
            with pytest.raises(KeyboardInterrupt):
                train(TINY, run_dir)
        assert not (run_dir / "checkpoint.pt").exists() and (run_dir / "config.json").exists()
        if where == "_write_atomic":
            (run_dir / "checkpoint.pt.partial").write_bytes(b"half a checkpoint")
            assert train(engine.resumed_config(run_dir), run_dir, resume=True)["epoch"] == 1  # resumed from epoch 0
        else:
            assert train(TINY, run_dir)["epoch"] == 1  # reused by a new run
        assert len(history(run_dir)) == 1 and (run_dir / "checkpoint.pt").exists()


def test_a_dir_with_other_files_is_not_taken(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    with pytest.raises(RunDirExists, match=r"holds other files \(notes.txt\)"):
        train(TINY, tmp_path / "run")


def test_damaged_run_files_are_named(tmp_path):
    train(TINY, tmp_path / "run")
    (tmp_path / "run" / "checkpoint.pt").write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match=r"checkpoint.pt is not a readable checkpoint .*delete it to restart"):
        train(engine.resumed_config(tmp_path / "run"), tmp_path / "run", resume=True)
    (tmp_path / "run" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config.json is not a run config"):
        engine.resumed_config(tmp_path / "run")
    (tmp_path / "run" / "config.json").write_text('{"lr": 0.1, "colour": "red"}')
    with pytest.raises(ValueError, match=r"config.json is not a run config .*colour"):
        engine.resumed_config(tmp_path / "run")


def test_resume_changes_only_what_it_may(tmp_path):
    config = replace(TINY, schedule="multistep", milestones=[5])
    train(config, tmp_path / "run")
    with pytest.raises(ValueError, match=r"cannot change --batch-size, --lr \(it may change --epochs"):
        engine.resumed_config(tmp_path / "run", lr=0.5, batch_size=2)
    with pytest.raises(ValueError, match=r"--device cuda: this run trains on cpu and resumes on that kind of device"):
        engine.resumed_config(tmp_path / "run", device="cuda")
    with pytest.raises(ValueError, match=r"--epochs 0: a resumed run keeps its 1 epochs"):
        engine.resumed_config(tmp_path / "run", epochs=0)
    record = train(engine.resumed_config(tmp_path / "run", epochs=2), tmp_path / "run", resume=True)
    assert record["epoch"] == 2 and [r["epoch"] for r in history(tmp_path / "run")] == [1, 2]
    train(TINY, tmp_path / "onecycle")
    with pytest.raises(ValueError, match=r"extends them with the multistep schedule only \(this run's schedule: onecycle\)"):
        engine.resumed_config(tmp_path / "onecycle", epochs=2)


def test_keep_weights_leaves_only_the_weights(tmp_path):
    train(replace(TINY, method="cekd", keep="weights"), tmp_path / "run")
    files = {p.name for p in (tmp_path / "run").iterdir()}
    assert files == {"config.json", "metrics.jsonl", "weights.pt"}
    ensemble = CollaborativeEnsemble([build_model("resnet18", 4) for _ in range(2)])
    ensemble.load_state_dict(torch.load(tmp_path / "run" / "weights.pt"))
    with pytest.raises(RunDirExists, match="already holds a run"):
        train(TINY, tmp_path / "run")
    with pytest.raises(ValueError, match="kept only weights.pt .*nothing to resume"):
        train(engine.resumed_config(tmp_path / "run"), tmp_path / "run", resume=True)


def test_cam_figure_is_a_png(tmp_path):
    train(replace(TINY, method="cekd", visualize_cams=3), tmp_path / "run")
    png = (tmp_path / "run" / "cams.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000


# ---------------------------------------------------------------- the CLI


def cli(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(EXAMPLES / "reproduce_cekd.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=900, env=env)


TINY_ARGS = ["--classes", "4", "--train-per-class", "4", "--test-per-class", "2", "--image-size", "32",
             "--epochs", "1", "--batch-size", "8", "--quiet"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--dataset", "cub", "--data-root", "no/such/dir"], "cub: no/such/dir not found; expected layout"),
        (["--dataset", "aircraft"], "--dataset aircraft needs --data-root"),
        (["--pretrained", "missing.pth"], "--pretrained missing.pth: no such file"),
        (["--arch", "resnet18,resnet18,resnet18"], "--arch gives 3 architectures for 2 members"),
        (["--resume", "nothing-here"], "--resume nothing-here: no run there (no config.json)"),
        (["--pretrained", "garbage.pth"], "--pretrained garbage.pth: not a PyTorch state-dict file"),
        (["--amp", "fp16", "--device", "cpu"], "--amp fp16 needs a CUDA device"),
        (["--clip-grad", "0"], "--clip-grad must be > 0, got 0.0"),
        (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
        (["--batch-size", "64"], "--batch-size 64 is larger than this rank's 16 training images"),
        (["--image-size", "0"], "--image-size must be >= 1, got 0"),
        (["--epochs", "0"], "--epochs must be >= 1, got 0"),
        (["--epochs", "-1"], "--epochs must be >= 1, got -1"),
        (["--workers", "-1"], "--workers must be >= 0, got -1"),
        (["--seed", "-1"], "--seed must be >= 0, got -1"),
        (["--mix-p", "1.5"], "--mix-p must be in [0, 1], got 1.5"),
        (["--device", "banana"], "--device must be a torch device such as cpu, cuda or cuda:1, got 'banana'"),
        (["--ablation", "--seeds", "0"], "--seeds must be >= 1, got 0"),
    ],
)
def test_cli_errors(args, message, tmp_path, monkeypatch):
    """Each bad flag ends the CLI with one line naming it (in-process: the same main() as the script)."""
    import reproduce_cekd as cli_module

    monkeypatch.chdir(tmp_path)
    (tmp_path / "garbage.pth").write_text("not a checkpoint")
    with pytest.raises(SystemExit) as exit_:
        cli_module.main([*TINY_ARGS, *args])
    text = str(exit_.value.code)
    assert message in text and "\n" not in text and text.startswith(("error: ", "--"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cli_cuda_without_a_gpu(tmp_path):
    result = cli(*TINY_ARGS, "--device", "cuda", cwd=tmp_path)
    assert result.returncode != 0 and "error: --device cuda: no CUDA GPU is visible here" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_prints_a_line_per_epoch_and_where_the_results_are(tmp_path):
    """Read as a log file (stdout is a pipe): one line per epoch, the table, then the run dir alone on the last line."""
    args = [a for a in TINY_ARGS if a != "--quiet"]
    result = cli(*args, "--epochs", "2", "--run-dir", "out", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    epochs = [line for line in lines if line.startswith("epoch ")]
    assert [line.split()[1] for line in epochs] == ["1/2", "2/2"]
    assert all("top-1 member0" in line and "ensemble" in line and "img/s" in line for line in epochs)
    assert lines[-1].startswith("results in out (") and len(result.stdout) < 1500


def test_cli_resume_refuses_flags_it_would_ignore(tmp_path, monkeypatch):
    import reproduce_cekd as cli_module

    monkeypatch.chdir(tmp_path)
    cli_module.main([*TINY_ARGS, "--run-dir", "run"])
    for args, message in ((["--lr", "0.5"], "cannot change --lr"), (["--run-dir", "x"], "cannot take --run-dir"),
                          (["--epochs", "3"], "extends them with the multistep schedule only")):
        with pytest.raises(SystemExit) as exit_:
            cli_module.main(["--resume", "run", *args])
        assert message in str(exit_.value.code)


def test_cli_ablation_resumes_from_its_saved_plan(tmp_path, monkeypatch):
    import reproduce_cekd as cli_module

    from cekd_repro import ablation

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(ablation, "ABLATION", ablation.ABLATION[:2])  # baseline and cutmix
    real_train, calls = ablation.train, []

    def dies_on_the_second_run(config, run_dir, resume=False):
        calls.append((config.method, resume))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_train(config, run_dir, resume)

    monkeypatch.setattr(ablation, "train", dies_on_the_second_run)
    with pytest.raises(KeyboardInterrupt):
        cli_module.main([*TINY_ARGS, "--ablation", "--seeds", "1", "--run-dir", "abl"])
    monkeypatch.setattr(ablation, "train", real_train)
    with pytest.raises(SystemExit, match="already holds an ablation"):
        cli_module.main([*TINY_ARGS, "--ablation", "--seeds", "1", "--run-dir", "abl"])
    with pytest.raises(SystemExit, match="holds an ablation: add --ablation"):
        cli_module.main(["--resume", "abl"])
    assert cli_module.main(["--resume", "abl", "--ablation", "--quiet"]) == 0
    assert calls == [("baseline", False), ("cutmix", False)]
    assert "| cutmix |" in (tmp_path / "abl" / "results.md").read_text()


def test_cli_trains_a_token_model_beside_a_cnn(tmp_path, monkeypatch, capsys):
    import reproduce_cekd as cli_module

    monkeypatch.chdir(tmp_path)
    assert cli_module.main([*TINY_ARGS, "--arch", "resnet18,timm:vit_tiny_patch16_224", "--mix", "snapmix",
                            "--run-dir", "run"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("results in run")
    assert json.loads((tmp_path / "run" / "config.json").read_text())["arch"] == "resnet18,timm:vit_tiny_patch16_224"


def test_cli_paper_preset_without_pretrained_warns(tmp_path, monkeypatch, capsys):
    import reproduce_cekd as cli_module

    monkeypatch.chdir(tmp_path)
    for pretrained in ([], ["--pretrained", "w.pth"]):
        with pytest.raises(SystemExit):  # stops at the missing dataset, after the warning
            cli_module.main(["--preset", "paper", "--dataset", "cub", "--data-root", "nowhere", *pretrained])
        warned = "warning: --preset paper is the fine-tuning recipe" in capsys.readouterr().err
        assert warned == (not pretrained)


def test_cli_help_shows_each_presets_defaults(capsys):
    import reproduce_cekd as cli_module

    with pytest.raises(SystemExit):
        cli_module.parse(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "[quick: 0.1; paper: 0.001]" in text  # --lr
    assert "[quick: 5; paper: -]" in text  # --clip-grad
    assert "[quick: resnet18; paper: resnet50]" in text and "[default: 3]" in text
    assert "paper: 5 snapmix, 3 cutmix, 1 mixup" in text


def test_cli_bad_choice(tmp_path):
    result = cli("--method", "mixcut", cwd=tmp_path)
    assert result.returncode == 2 and "invalid choice: 'mixcut'" in result.stderr


def test_cli_ablation_writes_results(tmp_path):
    result = cli(*TINY_ARGS, "--ablation", "--seeds", "1", "--run-dir", "abl", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for mix in ("cutmix", "snapmix"):  # CEKD over both mixings, with both module switches
        for name in (mix, f"cekd+{mix} w/o cross", f"cekd+{mix} w/o ensemble", f"cekd+{mix}"):
            assert f"| {name} |" in result.stdout
    assert "| baseline |" in result.stdout and result.stdout.splitlines()[-1].startswith("results in abl")
    out = tmp_path / "abl"
    assert (out / "results.csv").read_text().startswith("method,seed,model,top1")
    assert "| cekd+snapmix |" in (out / "results.md").read_text()
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_two_process_ddp_run_with_torchrun(tmp_path):
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29517",
               str(EXAMPLES / "reproduce_cekd.py"), *TINY_ARGS, "--method", "cekd", "--run-dir", "ddp"]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    records = history(tmp_path / "ddp")
    assert len(records) == 1 and "top1_ensemble" in records[0]
    assert result.stdout.count("final test top-1") == 2  # both ranks report the same reduced metrics


def test_presets_and_explicit_arguments():
    import reproduce_cekd as cli_module

    def config(*args):
        return cli_module.build_config(cli_module.parse(list(args)))

    quick = config()
    assert (quick.method, quick.dataset, quick.arch, quick.image_size) == ("cekd", "synthetic", "resnet18", 64)
    assert (quick.lr, quick.clip_grad) == (0.1, 5.0) and config("--clip-grad", "2").clip_grad == 2.0
    assert config("--preset", "paper", "--dataset", "cub", "--data-root", "x").clip_grad is None
    paper = config("--preset", "paper", "--dataset", "cub", "--data-root", "x", "--mix", "snapmix")
    assert (paper.arch, paper.resize, paper.image_size, paper.batch_size, paper.epochs) == ("resnet50", 512, 448, 16, 200)
    assert (paper.lr, paper.head_lr, paper.weight_decay, paper.milestones) == (0.001, 0.01, 1e-4, [80, 150, 180])
    assert (paper.mix_alpha, paper.mix_p, paper.same_on_batch) == (5.0, 1.0, True)
    assert config("--preset", "paper", "--dataset", "cub", "--data-root", "x", "--method", "cutmix").mix_alpha == 3.0
    assert config("--preset", "paper", "--dataset", "cub", "--data-root", "x", "--mix-alpha", "2").mix_alpha == 2.0
    assert config("--epochs", "3", "--no-cross").epochs == 3 and config("--no-cross").no_cross


# ---------------------------------------------------------------- divergence, safe checkpoints, what a run says


def plant(path: str) -> None:
    """What a malicious checkpoint would run on load."""
    Path(path).write_text("ran")


class Planted:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return plant, (self.path,)


def diverging_from_epoch_two(monkeypatch) -> None:
    """From the second epoch on, the training images hold NaN (a bad data file): loss, gradient and weights follow."""
    real_step = engine.run_step

    def run_step(run, images, labels):
        if run.scheduler.last_epoch >= 3:  # TINY: 24 images, batch 8, 3 steps per epoch
            images = images * float("nan")
        return real_step(run, images, labels)

    monkeypatch.setattr(engine, "run_step", run_step)


def test_a_diverging_epoch_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    config = replace(TINY, method="cekd", epochs=3, schedule="multistep", milestones=[9])
    good = train(replace(config, epochs=1), tmp_path / "run")  # epoch 1's checkpoint, then extend
    saved = (tmp_path / "run" / "checkpoint.pt").read_bytes()
    with monkeypatch.context() as patch:
        diverging_from_epoch_two(patch)
        with pytest.raises(engine.Diverged, match=r"^epoch 2 diverged: loss total, supervised, cross, ensemble went "
                                                  r"non-finite; checkpoint.pt of epoch 1 is kept: --resume .*run "
                                                  r"--clip-grad 5 continues from it"):
            train(engine.resumed_config(tmp_path / "run", epochs=3), tmp_path / "run", resume=True)
    assert (tmp_path / "run" / "checkpoint.pt").read_bytes() == saved  # untouched: no checkpoint of a bad epoch
    records = history(tmp_path / "run")
    assert records[0] == good and records[1]["epoch"] == 2
    assert records[1]["diverged"] == ["total", "supervised", "cross", "ensemble", "grad_norm"]
    # the last good state goes on, with what a resume may change after a divergence
    resumed = train(engine.resumed_config(tmp_path / "run", epochs=3, clip_grad=5.0), tmp_path / "run", resume=True)
    assert [r["epoch"] for r in history(tmp_path / "run")] == [1, 2, 3] and resumed["epoch"] == 3
    assert all(math.isfinite(v) for k, v in resumed.items() if k.startswith(("loss_", "top1_")))


def test_weights_that_overflow_with_finite_losses_are_caught(tmp_path, monkeypatch):
    """The last step of epoch 1 overflows a weight (its loss was finite): no checkpoint of that state."""
    real_step = engine.run_step

    def run_step(run, images, labels):
        parts = real_step(run, images, labels)
        if run.scheduler.last_epoch == 3:  # TINY: 3 steps per epoch
            with torch.no_grad():
                next(run.net.parameters()).mul_(float("inf"))
        return parts

    monkeypatch.setattr(engine, "run_step", run_step)
    with pytest.raises(engine.Diverged, match=r"^epoch 1 diverged: the weights went non-finite; no epoch finished: "
                                              r"start again with a lower --lr"):
        train(replace(TINY, clip_grad=None), tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoint.pt").exists()
    assert history(tmp_path / "run") == [{"epoch": 1, "diverged": ["weights"],
                                          "epoch_s": history(tmp_path / "run")[0]["epoch_s"]}]
    monkeypatch.setattr(engine, "run_step", real_step)
    assert train(TINY, tmp_path / "run")["epoch"] == 1  # no dead end: the dir is reused


def test_cli_divergence_is_one_line_and_a_failure(tmp_path):
    """The issue's command: it used to print nan losses, exit 0 and overwrite the checkpoint with NaN weights."""
    result = cli("--lr", "1e5", "--epochs", "3", "--classes", "4", "--train-per-class", "8", "--test-per-class", "4",
                 "--image-size", "32", "--batch-size", "8", "--run-dir", "run", cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    error = result.stderr.strip().splitlines()
    assert len(error) == 1 and re.match(r"error: epoch \d diverged: .* went non-finite", error[0])
    checkpoint = tmp_path / "run" / "checkpoint.pt"
    if checkpoint.exists():  # whatever epoch diverged, what was kept is finite
        state = torch.load(checkpoint, weights_only=True)
        assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())


def test_checkpoints_load_safely(tmp_path):
    train(TINY, tmp_path / "run")
    path = tmp_path / "run" / "checkpoint.pt"
    state = torch.load(path, weights_only=True)  # tensors and plain types only
    # a checkpoint of the previous format (NumPy's RNG state as an array) still resumes
    state["rng"]["numpy"] = np.random.RandomState(3).get_state()
    torch.save(state, path)
    resumed = engine.resumed_config(tmp_path / "run", epochs=1)
    assert train(resumed, tmp_path / "run", resume=True)["epoch"] == 1
    # a crafted one is refused by name, and its code never runs
    marker = tmp_path / "planted"
    state["history"] = [Planted(str(marker))]
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"checkpoint.pt holds pickled objects \(.*plant\) that a safe load refuses"):
        train(resumed, tmp_path / "run", resume=True)
    assert not marker.exists()


def test_config_json_records_the_options_that_apply(tmp_path):
    train(replace(TINY, method="baseline"), tmp_path / "baseline")
    saved = json.loads((tmp_path / "baseline" / "config.json").read_text())
    assert {"resize", "data_root", "milestones", "mix", "mix_alpha", "temperature", "alpha"}.isdisjoint(saved)
    assert saved["classes"] == 4 and saved["schedule"] == "onecycle"
    cekd = replace(TINY, method="cekd", mix="snapmix", schedule="multistep", milestones=[5])
    assert {"mix", "mix_alpha", "temperature", "milestones"} <= set(cekd.saved()) and "resize" not in cekd.saved()
    real = replace(TINY, dataset="cub", data_root="/data/cub")
    assert {"resize", "data_root"} <= set(real.saved()) and "classes" not in real.saved()
    # a run dir written before (every option recorded) still resumes
    (tmp_path / "baseline" / "config.json").write_text(json.dumps(dataclasses.asdict(replace(TINY, method="baseline"))))
    assert engine.resumed_config(tmp_path / "baseline") == replace(TINY, method="baseline")


def test_a_run_says_what_it_trains_at_once_and_shows_progress_in_a_log(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(engine, "HEARTBEAT_S", 0.0)  # every batch is "slow": one progress line each
    train(replace(TINY, method="cekd", quiet=False), tmp_path / "run")
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == (f"training cekd over cutmix: 2 x resnet18, synthetic 4 classes, 24 train / 12 test images at "
                        f"32 px, cpu, 1 epochs of batch 8 -> {tmp_path / 'run'}")
    assert [re.sub(r"\d+ s$", "T", line) for line in lines[1:4]] == [
        f"  epoch 1/1: {step}/3 batches, T" for step in (1, 2, 3)]
    assert lines[4].startswith("epoch 1/1  loss total") and len(lines) == 5


def test_epoch_line_shows_skipped_fp16_steps():
    record = {"epoch": 2, "loss_total": 1.0, "top1_model": 50.0, "images_per_s": 10.0, "epoch_s": 3.0}
    assert "skipped" not in engine.epoch_line({**record, "skipped_steps": 0}, 5)
    assert engine.epoch_line({**record, "skipped_steps": 3}, 5).endswith("3 s  3 steps skipped (fp16 overflow)")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fp16_steps_the_scaler_skips_are_counted_not_taken_for_divergence(tmp_path, monkeypatch):
    real_build = engine.build_run

    def build_run(*args, **kwargs):  # a loss scale far too high: the first steps overflow in fp16 and are skipped
        run = real_build(*args, **kwargs)
        run.scaler = torch.amp.GradScaler("cuda", init_scale=2.0**40)
        return run

    monkeypatch.setattr(engine, "build_run", build_run)
    record = train(replace(TINY, device="cuda", amp="fp16", train_per_class=40), tmp_path / "run")  # 20 steps
    assert 1 <= record["skipped_steps"] < 20 and math.isfinite(record["loss_total"])
