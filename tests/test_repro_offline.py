"""The reproduction's offline distillation: --method kd and ccd from a finished run (--teacher), frozen, its test
top-1 said once, resumed exactly, refused with one line naming the flag; --compare's offline rows."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from repro_helpers import TINY, history

from cekd_repro import rundir
from cekd_repro.ablation import compare_rows
from cekd_repro.config import RunConfig
from cekd_repro.engine import train
from cekd_repro.teacher import teacher_config


@pytest.fixture(scope="module")
def teachers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A finished baseline and a finished CEKD ensemble (2 epochs of TINY), one kept as weights.pt."""
    root = tmp_path_factory.mktemp("teachers")
    train(replace(TINY, method="baseline", epochs=2), root / "baseline")
    train(replace(TINY, method="cekd", epochs=2, keep="weights"), root / "cekd")
    return {"baseline": root / "baseline", "cekd": root / "cekd"}


def student(teacher: Path, **overrides) -> RunConfig:
    return replace(TINY, **{"method": "kd", "teacher": str(teacher), **overrides})


@pytest.mark.parametrize(
    ("teacher", "overrides"),
    [("baseline", {"mix": "none"}), ("cekd", {"mix": "cutmix"}), ("cekd", {"method": "ccd", "mix": "snapmix"})],
    ids=["kd-baseline", "kd-cekd-cutmix", "ccd-cekd-snapmix"],
)
def test_a_student_distils_a_finished_run_left_unchanged(teachers, teacher, overrides, tmp_path):
    source = teachers[teacher]
    weights = source / ("weights.pt" if teacher == "cekd" else "checkpoint.pt")
    before = weights.read_bytes()
    record = train(student(source, **overrides), tmp_path / "run")
    assert {k for k in record if k.startswith("loss_")} == {"loss_total", "loss_supervised", "loss_distillation"}
    assert [k for k in record if k.startswith("top1_")] == ["top1_model"]
    assert weights.read_bytes() == before
    saved = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["model"]
    assert not any("members" in name for name in saved)  # the student's weights only, not the teacher's


def test_the_teachers_test_top1_is_said_once(teachers, tmp_path, capsys):
    train(student(teachers["cekd"], quiet=False), tmp_path / "run")
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("teacher ")]
    assert len(lines) == 1 and lines[0].startswith(f"teacher {teachers['cekd']}: test top-1 ")


def test_a_resumed_student_ends_as_an_uninterrupted_one(teachers, tmp_path):
    config = student(teachers["cekd"], method="ccd", mix="cutmix", epochs=2, schedule="multistep", milestones=[9])
    whole = train(config, tmp_path / "whole")
    train(replace(config, epochs=1), tmp_path / "split")
    resumed = train(rundir.resumed_config(tmp_path / "split", epochs=2), tmp_path / "split", resume=True)
    strip = lambda records: [{k: v for k, v in r.items() if k not in ("images_per_s", "epoch_s")} for r in records]  # noqa: E731
    assert strip(history(tmp_path / "split")) == strip(history(tmp_path / "whole"))
    assert resumed["top1_model"] == whole["top1_model"]


def test_every_tensor_of_a_student_run_stays_on_its_device(teachers, tmp_path, monkeypatch):
    """As test_repro_engine's meta-device test: the teacher is moved by the engine's Placement too."""
    from cekd_repro.device import Placement

    def read(values):
        return {name: [0.0 if name == "verdict" else 1.0] * value.numel() for name, value in values.items()}

    monkeypatch.setattr(Placement, "read", staticmethod(read))
    record = train(student(teachers["cekd"], method="ccd", mix="snapmix", device="meta"), tmp_path / "run")
    assert record["top1_model"] == 100.0


def test_bad_teachers_are_refused_in_one_line_naming_the_flag(teachers, tmp_path):
    with pytest.raises(ValueError, match="--method kd distils a finished run: give --teacher RUN_DIR"):
        train(replace(TINY, method="kd"), tmp_path / "a")
    with pytest.raises(ValueError, match=r"--teacher .*nowhere: no run there \(no config.json\)"):
        train(student(tmp_path / "nowhere"), tmp_path / "b")
    train(replace(TINY, method="dml"), tmp_path / "dml")
    with pytest.raises(ValueError, match="a run of --method dml; a teacher is a run of --method baseline"):
        train(student(tmp_path / "dml"), tmp_path / "c")
    with pytest.raises(ValueError, match="it learnt --dataset synthetic \\(4 classes\\); this run trains on"):
        train(student(teachers["baseline"], classes=6), tmp_path / "d")
    with pytest.raises(ValueError, match="--method ccd pairs each image with its mix"):
        train(student(teachers["baseline"], method="ccd", mix="none"), tmp_path / "e")


def test_an_unfinished_teacher_is_refused(teachers, tmp_path):
    train(replace(TINY, method="baseline", epochs=1), tmp_path / "short")
    config = rundir.resumed_config(tmp_path / "short")
    (tmp_path / "short" / "config.json").write_text(
        (tmp_path / "short" / "config.json").read_text().replace('"epochs": 1', '"epochs": 3')
    )
    assert teacher_config(tmp_path / "short").epochs == 3 and config.epochs == 1
    with pytest.raises(ValueError, match="the run stopped after epoch 1 of 3; finish it first"):
        train(student(tmp_path / "short"), tmp_path / "run")


def test_compare_gains_the_offline_rows_with_a_teacher():
    names = [name for name, _ in compare_rows("cutmix", offline=True)]
    assert names[-3:] == ["kd", "kd+cutmix", "ccd+cutmix"] and "kd" not in [n for n, _ in compare_rows("cutmix")]
    rows = dict(compare_rows("snapmix", offline=True))
    assert rows["ccd+snapmix"] == {"method": "ccd", "mix": "snapmix", "branches_from": None}
