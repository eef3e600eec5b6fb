"""Specifications of the reproduction's run directories: never overwritten, never a dead end, exact resume,
safe checkpoints, the recorded config."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from repro_helpers import TINY, history

from cekd_losses import CollaborativeEnsemble
from cekd_repro import checkpoints, engine, rundir
from cekd_repro.engine import train
from cekd_repro.models import build_model
from cekd_repro.rundir import RunDirExists


@pytest.mark.parametrize(
    "overrides",
    [
        {"method": "cekd", "mix": "snapmix", "workers": 1},  # a persistent loader worker
        {"method": "pcl", "arch": "timm:test_resnet", "branches_from": "layer3"},
        {"method": "one", "arch": "timm:test_resnet", "branches_from": "layer3"},
        {"method": "ffl", "arch": "timm:test_resnet", "mix": "mixup"},
        {"method": "dml", "arch": "timm:test_resnet"},
        {"method": "pcl", "arch": "timm:test_resnet", "members": 3},  # one view per peer, its generator restored
    ],
    ids=["cekd", "pcl-trunk", "one-trunk", "ffl", "dml", "pcl-views"],
)
def test_killed_and_resumed_run_ends_like_an_uninterrupted_one(overrides, tmp_path, monkeypatch):
    config = replace(TINY, epochs=3, **overrides)
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
    resumed = train(rundir.resumed_config(tmp_path / "resumed"), tmp_path / "resumed", resume=True)
    strip = lambda records: [{k: v for k, v in r.items() if k not in ("images_per_s", "epoch_s")} for r in records]  # noqa: E731
    assert strip(history(tmp_path / "resumed")) == strip(history(tmp_path / "straight"))
    assert strip([resumed]) == strip([straight])


def test_run_dir_is_never_overwritten(tmp_path):
    train(TINY, tmp_path / "run")
    with pytest.raises(RunDirExists, match="already holds a run; pass --resume"):
        train(TINY, tmp_path / "run")


def test_a_run_that_died_before_its_first_checkpoint_is_no_dead_end(tmp_path, monkeypatch):
    """Killed in epoch 1 (or while writing the first checkpoint): the dir can be reused or resumed."""

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    for where in ("evaluate", "write_atomic"):
        run_dir = tmp_path / where
        with monkeypatch.context() as patch:
            patch.setattr(checkpoints if where == "write_atomic" else engine, where, killed)
            with pytest.raises(KeyboardInterrupt):
                train(TINY, run_dir)
        assert not (run_dir / "checkpoint.pt").exists() and (run_dir / "config.json").exists()
        if where == "write_atomic":
            (run_dir / "checkpoint.pt.partial").write_bytes(b"half a checkpoint")
            assert train(rundir.resumed_config(run_dir), run_dir, resume=True)["epoch"] == 1  # resumed from epoch 0
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
        train(rundir.resumed_config(tmp_path / "run"), tmp_path / "run", resume=True)
    (tmp_path / "run" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config.json is not a run config"):
        rundir.resumed_config(tmp_path / "run")
    (tmp_path / "run" / "config.json").write_text('{"lr": 0.1, "colour": "red"}')
    with pytest.raises(ValueError, match=r"config.json is not a run config .*colour"):
        rundir.resumed_config(tmp_path / "run")


def help_text() -> str:
    """The command line's --help text."""
    import reproduce_cekd as cli_module

    with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.suppress(SystemExit):
        cli_module.parse(["--help"])
    return out.getvalue()


def test_resume_changes_only_what_it_may(tmp_path):
    config = replace(TINY, schedule="multistep", milestones=[5])
    train(config, tmp_path / "run")
    with pytest.raises(ValueError, match=r"cannot change --batch-size, --lr \(it may change --epochs") as refused:
        rundir.resumed_config(tmp_path / "run", lr=0.5, batch_size=2)
    named = re.findall(r"--[a-z-]+", str(refused.value))  # every flag as the parser takes it
    assert "--clip-grad" in named and "--no-cache" in named and not re.search(r"--\w*_", str(refused.value))
    parser_flags = set(re.findall(r"--[a-z-]+", help_text()))
    assert set(named) <= parser_flags
    with pytest.raises(ValueError, match=r"--device cuda: this run trains on cpu and resumes on that kind of device"):
        rundir.resumed_config(tmp_path / "run", device="cuda")
    with pytest.raises(ValueError, match=r"--epochs 0: a resumed run keeps its 1 epochs"):
        rundir.resumed_config(tmp_path / "run", epochs=0)
    record = train(rundir.resumed_config(tmp_path / "run", epochs=2), tmp_path / "run", resume=True)
    assert record["epoch"] == 2 and [r["epoch"] for r in history(tmp_path / "run")] == [1, 2]
    train(TINY, tmp_path / "onecycle")
    with pytest.raises(
        ValueError, match=r"extends them with the multistep schedule only \(this run's schedule: onecycle\)"
    ):
        rundir.resumed_config(tmp_path / "onecycle", epochs=2)


def test_keep_weights_leaves_only_the_weights(tmp_path):
    train(replace(TINY, method="cekd", keep="weights"), tmp_path / "run")
    files = {p.name for p in (tmp_path / "run").iterdir()}
    assert files == {"config.json", "metrics.jsonl", "weights.pt"}
    ensemble = CollaborativeEnsemble([build_model(TINY.arch, 4) for _ in range(2)])
    ensemble.load_state_dict(torch.load(tmp_path / "run" / "weights.pt"))
    with pytest.raises(RunDirExists, match="already holds a run"):
        train(TINY, tmp_path / "run")
    with pytest.raises(ValueError, match="kept only weights.pt .*nothing to resume"):
        train(rundir.resumed_config(tmp_path / "run"), tmp_path / "run", resume=True)


def plant(path: str) -> None:
    """What a malicious checkpoint would run on load."""
    Path(path).write_text("ran")


class Planted:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return plant, (self.path,)


def test_checkpoints_load_safely(tmp_path):
    train(TINY, tmp_path / "run")
    path = tmp_path / "run" / "checkpoint.pt"
    state = torch.load(path, weights_only=True)  # tensors and plain types only
    # a checkpoint of the previous format (NumPy's RNG state as an array) still resumes
    state["rng"]["numpy"] = np.random.RandomState(3).get_state()
    torch.save(state, path)
    resumed = rundir.resumed_config(tmp_path / "run", epochs=1)
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
    assert rundir.resumed_config(tmp_path / "baseline") == replace(TINY, method="baseline")
