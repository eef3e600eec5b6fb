"""The schedule sweep of the transfer proxy: the same fine-tuning rows at several schedule lengths, the
multistep milestones at the paper's fractions of each length (epochs 80, 150 and 180 of 200), so that a reader
sees where each method converges and whether mixing overtakes the baseline as the schedule grows.

A sweep is planned as lengths with their seeds (``--sweep 30 90 270:3 810:3``: one seed at 30 and 90 epochs,
three at 270 and 810) and run seed by seed: every length's seed 0 first, so the question has a first answer
before the extra seeds start. Its plan is saved to ``sweep.json``; ``--resume`` continues it, and a second
process running the same ``--resume`` at once takes the runs the first has not claimed.
"""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, replace
from pathlib import Path

from .ablation import (
    ALL_ROWS,
    collected,
    complete_run,
    final_top1,
    main_curve,
    mean_std,
    new_figure,
    plot_curves,
    run_name,
    save_figure,
)
from .config import RunConfig
from .rundir import RunDirExists, apply_resume_changes

SWEEP_ROWS = ("baseline", "cutmix", "snapmix", "cekd+snapmix")
PAPER_MILESTONES = (80, 150, 180)  # of the paper's 200 epochs
EVALUATIONS = 45  # a run of a sweep evaluates at least every epochs // EVALUATIONS epochs (and after its last)


def parse_lengths(values: list[str]) -> list[tuple[int, int]]:
    """``["30", "270:3"]`` -> ``[(30, 1), (270, 3)]``: schedule lengths in epochs, each with its number of seeds."""
    plan = []
    for value in values:
        epochs, _, seeds = value.partition(":")
        try:
            length = (int(epochs), int(seeds or 1))
        except ValueError:
            raise ValueError(f"--sweep takes EPOCHS or EPOCHS:SEEDS, got {value!r}") from None
        if min(length) < 1:
            raise ValueError(f"--sweep {value}: epochs and seeds must be >= 1")
        _milestones(length[0])
        plan.append(length)
    if len({epochs for epochs, _ in plan}) != len(plan):
        raise ValueError(f"--sweep names a length twice: {' '.join(values)}")
    return plan


def _milestones(epochs: int) -> list[int]:
    """The epochs after which the learning rate drops: the paper's fractions of its 200 epochs, rounded down."""
    milestones = [epochs * m // 200 for m in PAPER_MILESTONES]
    if milestones[0] < 1 or len(set(milestones)) < len(milestones):
        raise ValueError(f"--sweep {epochs}: too short for the paper's three learning-rate drops (>= 5 epochs)")
    return milestones


def length_config(base: RunConfig, epochs: int) -> RunConfig:
    """``base`` at ``epochs`` epochs: the milestones at the paper's fractions of its 200 (30 epochs: 12, 22,
    27), evaluated at least every ``epochs // EVALUATIONS`` epochs."""
    every = max(base.eval_every, epochs // EVALUATIONS)
    return replace(base, epochs=epochs, milestones=_milestones(epochs), eval_every=every)


def _plan(base: RunConfig | None, lengths: list[tuple[int, int]] | None, out_dir: Path, changes: dict | None):
    """The sweep's base and lengths: saved to sweep.json when new (``changes`` None), read back on a resume."""
    path = out_dir / "sweep.json"
    if changes is None:
        if path.exists():
            raise RunDirExists(f"{out_dir} already holds a sweep; pass --resume to continue it, or another --run-dir")
        out_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"base": asdict(base), "lengths": lengths, "rows": list(SWEEP_ROWS)}, indent=2))
        return base, lengths, list(SWEEP_ROWS)
    base, lengths, rows = saved_sweep(out_dir)
    return apply_resume_changes(base, changes, path), lengths, rows


def saved_sweep(out_dir: Path) -> tuple[RunConfig, list[tuple[int, int]], list[str]]:
    """The base configuration, the lengths with their seeds and the rows a sweep saved in ``out_dir``."""
    saved = json.loads((out_dir / "sweep.json").read_text())
    return RunConfig(**saved["base"]), [(epochs, seeds) for epochs, seeds in saved["lengths"]], saved["rows"]


def run_sweep(
    base: RunConfig | None,
    lengths: list[tuple[int, int]] | None,
    out_dir: Path,
    resume_changes: dict | None = None,
) -> str:
    """Fine-tune :data:`SWEEP_ROWS` from ``base`` (its ``pretrained`` weights) at every length of ``lengths``
    (``(epochs, seeds)``), every length's first seed before any second; write sweep.csv, sweep.md (top-1 per
    method and length, wall time per length) and sweep.png (the curves, a panel per length); return the table.
    A resume (``base=lengths=None``, the ``resume_changes`` of :func:`~cekd_repro.rundir.resumed_config`)
    keeps finished runs and continues the rest."""
    base, lengths, rows = _plan(base, lengths, out_dir, resume_changes)
    known = dict(ALL_ROWS)
    planned = []
    for seed in range(max(seeds for _, seeds in lengths)):
        for epochs, seeds in lengths:
            if seed >= seeds:
                continue
            for row in rows:
                config = replace(length_config(base, epochs), seed=base.seed + seed, **known[row])
                planned.append((row, config, out_dir / f"e{epochs}" / run_name(row, config.seed)))
    for _, config, run_dir in planned:
        complete_run(config, run_dir, resume_changes)
    results, curves = [], {}
    for row, config, history in collected(planned):
        wall_s = sum(record["epoch_s"] for record in history if "diverged" not in record)
        result = {"method": row, "epochs": config.epochs, "seed": config.seed, "wall_s": round(wall_s)}
        results.append(result | final_top1(history))
        curves.setdefault(config.epochs, {}).setdefault(row, []).append(main_curve(history))
    return _write(results, curves, lengths, rows, out_dir)


def _write(results: list[dict], curves: dict, lengths: list, rows: list[str], out_dir: Path) -> str:
    """sweep.csv (one line per run), sweep.md (the table) and sweep.png; returns the table."""
    columns = ["method", "epochs", "seed", "wall_s", "member0", "member1", "ensemble"]
    with open(out_dir / "sweep.csv", "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(results)
    judged = lambda r: r.get("ensemble", r["member0"])  # noqa: E731
    cell = lambda row, epochs: [judged(r) for r in results if (r["method"], r["epochs"]) == (row, epochs)]  # noqa: E731
    header = "| method | " + " | ".join(f"{epochs} epochs" for epochs, _ in lengths) + " |\n"
    lines = [header + "|---|" + "---|" * len(lengths)]
    for row in rows:
        cells = [f"{mean_std(cell(row, e))} ({len(cell(row, e))})" for e, _ in lengths]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    minutes = [sum(r["wall_s"] for r in results if r["epochs"] == e) / 60 for e, _ in lengths]
    lines.append("| wall time (min) | " + " | ".join(f"{m:.1f}" for m in minutes) + " |")
    table = "\n".join(lines) + "\n"
    (out_dir / "sweep.md").write_text(
        "Test top-1 (%) after the last epoch, mean ± std (seeds); the ensemble for CEKD; wall time: the runs' "
        "epochs summed.\n\n" + table
    )
    figure, axes = new_figure(len(lengths))
    for axis, (epochs, _) in zip(axes, lengths, strict=True):
        plot_curves(axis, curves.get(epochs, {}))
        axis.set_title(f"{epochs} epochs", fontsize=9)
    save_figure(figure, out_dir / "sweep.png")
    return table
