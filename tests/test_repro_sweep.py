"""Specifications of the schedule sweep: lengths and milestones, sparse evaluation, claims that let two
processes share one table, the sweep's order, files and resume."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from dataclasses import replace

import pytest
from repro_helpers import TINY, TINY_ARGS, history

from cekd_repro import ablation, sweep
from cekd_repro.engine import train
from cekd_repro.rundir import claimed


def test_lengths_parse_with_their_seeds_and_milestones_follow_the_paper():
    assert sweep.parse_lengths(["30", "270:3"]) == [(30, 1), (270, 3)]
    for epochs, milestones in ((30, [12, 22, 27]), (90, [36, 67, 81]), (200, [80, 150, 180]), (810, [324, 607, 729])):
        config = sweep.length_config(TINY, epochs)
        assert (config.epochs, config.milestones) == (epochs, milestones)
    assert [sweep.length_config(TINY, e).eval_every for e in (30, 90, 270, 810)] == [1, 2, 6, 18]
    assert sweep.length_config(replace(TINY, eval_every=5), 30).eval_every == 5
    with pytest.raises(ValueError, match="--sweep 4: too short for the paper's three learning-rate drops"):
        sweep.parse_lengths(["4"])


def test_sparse_evaluation_changes_no_training_value(tmp_path):
    """--eval-every 2 over 3 epochs evaluates after epochs 2 and 3 (the last always), and every training
    value is the same as with evaluation after every epoch: evaluating draws nothing and changes no weight."""
    base = replace(TINY, epochs=3, method="cutmix", arch="timm:test_resnet", schedule="multistep", milestones=[2])
    train(base, tmp_path / "every")
    train(replace(base, eval_every=2), tmp_path / "sparse")
    every, sparse = history(tmp_path / "every"), history(tmp_path / "sparse")
    assert ["top1_model" in r for r in sparse] == [False, True, True]
    for dense, thin in zip(every, sparse, strict=True):
        assert {k: v for k, v in dense.items() if k.startswith(("loss_", "grad_norm"))} == {
            k: v for k, v in thin.items() if k.startswith(("loss_", "grad_norm"))
        }
    assert sparse[-1]["top1_model"] == every[-1]["top1_model"]
    assert ablation.main_curve(sparse) == [(2, every[1]["top1_model"]), (3, every[2]["top1_model"])]


def test_a_run_claimed_by_a_live_process_is_left_to_it_and_a_dead_ones_claim_is_taken(tmp_path, capsys):
    run_dir = tmp_path / "table" / "baseline-seed0"
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / "table").mkdir()
        (tmp_path / "table" / ".baseline-seed0.claim").write_text(str(other.pid))
        assert ablation.complete_run(TINY, run_dir) is None
        assert "being trained by another process" in capsys.readouterr().out and not run_dir.exists()
    finally:
        other.kill()
        other.wait()
    records = ablation.complete_run(TINY, run_dir)  # its owner is gone: this process trains it
    assert records is not None and records[-1]["epoch"] == 1
    assert not (tmp_path / "table" / ".baseline-seed0.claim").exists()  # released after the run
    with claimed(run_dir) as mine, claimed(run_dir) as again:
        assert mine and not again  # a claim is held once, even within one process


def test_a_table_holds_the_runs_another_process_finished_while_this_one_trained(tmp_path, monkeypatch, capsys):
    """Two processes share a table: a run the other process held when this one passed it, and finished while
    this one trained its own, is in the table this one writes (the last to end writes all of it)."""
    real_complete = ablation.complete_run

    def the_other_process_holds_the_baseline(config, run_dir, resume_changes=None):
        if config.method == "baseline":
            ablation.train(config, run_dir)  # the other process trains it meanwhile
            return None  # left to it, as a held claim
        return real_complete(config, run_dir, resume_changes)

    monkeypatch.setattr(ablation, "complete_run", the_other_process_holds_the_baseline)
    table = ablation.run_ablation(TINY, 1, tmp_path / "shared", variants=ablation.ABLATION[:2])
    assert "| baseline | -" not in table and "| baseline |" in table and "| cutmix |" in table
    assert "still trained by another process" not in capsys.readouterr().out


def test_the_sweep_runs_every_lengths_first_seed_first_and_tables_them(tmp_path, monkeypatch):
    order = []

    def fake_run(config, run_dir, resume_changes=None):
        order.append((config.epochs, config.seed, config.method, config.mix if config.method == "cekd" else None))
        top1 = {"top1_member0": 50.0, "top1_member1": 52.0, "top1_ensemble": 60.0 + config.seed}
        final = top1 if config.method == "cekd" else {"top1_model": 40.0 + config.epochs / 10}
        records = [{"epoch": 1, "epoch_s": 3.0}, {"epoch": config.epochs, "epoch_s": 3.0, **final}]
        run_dir.mkdir(parents=True)
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
        return records

    monkeypatch.setattr(sweep, "complete_run", fake_run)
    table = sweep.run_sweep(TINY, [(10, 1), (20, 2)], tmp_path)
    assert [(e, s) for e, s, *_ in order] == [(10, 0)] * 4 + [(20, 0)] * 4 + [(20, 1)] * 4
    assert [m for *_, m, _ in order[:4]] == ["baseline", "cutmix", "snapmix", "cekd"]
    assert "| cekd+snapmix | 60.00 ± 0.00 (1) | 60.50 ± 0.71 (2) |" in table
    assert "| baseline | 41.00 ± 0.00 (1) | 42.00 ± 0.00 (2) |" in table
    assert "| wall time (min) | 0.4 | 0.8 |" in table  # 4 and 8 runs of 6 s
    rows = list(csv.DictReader(open(tmp_path / "sweep.csv")))
    assert len(rows) == 12 and rows[-1]["ensemble"] == "61.0" and rows[0]["member1"] == ""
    assert (tmp_path / "sweep.png").stat().st_size > 0 and (tmp_path / "sweep.md").read_text().endswith(table)
    with pytest.raises(FileExistsError, match="already holds a sweep"):
        sweep.run_sweep(TINY, [(10, 1)], tmp_path)


@pytest.mark.slow
def test_the_sweep_command_pretrains_fine_tunes_and_resumes(tmp_path, monkeypatch, capsys):
    import reproduce_cekd as cli_module

    monkeypatch.chdir(tmp_path)
    args = [*TINY_ARGS, "--preset", "transfer-tiny", "--transfer", "--source-per-class", "4", "--source-epochs", "1"]
    assert cli_module.main([*args, "--sweep", "5:2", "--run-dir", "sw"]) == 0
    out = capsys.readouterr().out
    assert "| method | 5 epochs |" in out
    assert (tmp_path / "sw" / "colours-timm-test_resnet-4x1-seed0" / "weights.pt").exists()  # the tiny preset's source
    assert sorted(p.name for p in (tmp_path / "sw" / "sweep" / "e5").iterdir()) == [
        f"{row}-seed{seed}" for row in ("baseline", "cekd-snapmix", "cutmix", "snapmix") for seed in (0, 1)
    ]
    table = out[out.index("| method") : out.index("linear probe")]
    assert cli_module.main(["--transfer", "--resume", "sw"]) == 0  # every run finished: the same table
    assert table in capsys.readouterr().out
