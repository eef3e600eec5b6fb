"""The tables over seeds: the paper's ablation (baseline, CutMix, SnapMix, and CEKD over CutMix and over SnapMix,
each with the module switches: without cross distillation, without the ensemble) and the online-distillation
comparison (baseline, a mixing alone, and DML, ONE, FFL, PCL, MCL-OKD and CEKD without mixing and over it)."""

from __future__ import annotations

import csv
import json
import statistics
from dataclasses import asdict, replace
from pathlib import Path

from .config import RunConfig
from .engine import train
from .rundir import RunDirExists, apply_resume_changes, claimed, resumed_config

ABLATION = [
    ("baseline", {"method": "baseline"}),
    ("cutmix", {"method": "cutmix"}),
    ("snapmix", {"method": "snapmix"}),
    ("cekd+cutmix w/o cross", {"method": "cekd", "mix": "cutmix", "no_cross": True}),
    ("cekd+cutmix w/o ensemble", {"method": "cekd", "mix": "cutmix", "no_ensemble": True}),
    ("cekd+cutmix", {"method": "cekd", "mix": "cutmix"}),
    ("cekd+snapmix w/o cross", {"method": "cekd", "mix": "snapmix", "no_cross": True}),
    ("cekd+snapmix w/o ensemble", {"method": "cekd", "mix": "snapmix", "no_ensemble": True}),
    ("cekd+snapmix", {"method": "cekd", "mix": "snapmix"}),
]
# the transfer table adds MixUp (the paper compares it too)
ALL_ROWS = [*ABLATION[:1], ("mixup", {"method": "mixup"}), *ABLATION[1:]]
COLUMNS = ("member0", "member1", "ensemble")
MEAN_COLUMNS = ("mean0", "mean1")  # PCL's temporal mean models, shown where a row has them
COMPARED = ("dml", "one", "ffl", "pcl", "mcl", "cekd")


def compare_rows(mix: str, offline: bool = False) -> list[tuple[str, dict]]:
    """The online-distillation table over ``mix``: the baseline, the mixing alone, then every online method
    without mixing and over ``mix``; the trunk (``--branches-from``) goes to every online method. ``offline`` (a
    --teacher given) adds KD without mixing and over ``mix``, and CCD over ``mix``, each a student alone."""
    whole = {"branches_from": None}
    rows = [("baseline", {"method": "baseline", **whole}), (mix, {"method": mix, **whole})]
    for method in COMPARED:
        rows += [(method, {"method": method, "mix": "none"}), (f"{method}+{mix}", {"method": method, "mix": mix})]
    if offline:
        rows += [
            ("kd", {"method": "kd", "mix": "none", **whole}),
            (f"kd+{mix}", {"method": "kd", "mix": mix, **whole}),
            (f"ccd+{mix}", {"method": "ccd", "mix": mix, **whole}),
        ]
    return rows


KNOWN_ROWS = dict(ALL_ROWS) | {
    name: row for mix in ("mixup", "cutmix", "snapmix") for name, row in compare_rows(mix, offline=True)
}


def _epochs_done(metrics: Path) -> int:
    """Epochs finished and checkpointed (a diverged epoch's record does not count)."""
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    finished = [record["epoch"] for record in records if "diverged" not in record]
    return finished[-1] if finished else 0


def saved_plan(out_dir: Path) -> tuple[RunConfig, int, list[str]]:
    """The base configuration, the number of seeds and the row names an ablation saved in ``out_dir``."""
    plan = out_dir / "ablation.json"
    if not plan.exists():
        raise ValueError(f"--resume {out_dir}: no ablation there (no ablation.json)")
    saved = json.loads(plan.read_text())
    return RunConfig(**saved["base"]), saved["seeds"], saved.get("rows", [name for name, _ in ABLATION])


def mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} ± {spread:.2f}"


def finished_history(config: RunConfig, run_dir: Path) -> list[dict] | None:
    """The metrics records of the run ``config`` in ``run_dir`` if it has finished (by any process), else None."""
    metrics = run_dir / "metrics.jsonl"
    if not metrics.exists() or _epochs_done(metrics) < config.epochs:
        return None
    return [json.loads(line) for line in metrics.read_text().splitlines()]


def complete_run(config: RunConfig, run_dir: Path, resume_changes: dict | None = None) -> list[dict] | None:
    """The metrics records of the run ``config`` in ``run_dir`` once it has finished: kept when finished,
    continued when started (with ``resume_changes``), trained when missing. None, and a line saying so,
    while another process trains it (:func:`~cekd_repro.rundir.claimed`): run the same command twice to
    use two cores."""
    if finished_history(config, run_dir) is None:
        with claimed(run_dir) as mine:
            if not mine:
                print(f"{run_dir}: being trained by another process, left to it")
                return None
            if finished_history(config, run_dir) is None:  # the other process may have finished it meanwhile
                started = (run_dir / "config.json").exists()
                train(resumed_config(run_dir, **(resume_changes or {})) if started else config, run_dir, resume=started)
    return finished_history(config, run_dir)


def collected(planned: list[tuple[str, RunConfig, Path]]) -> list[tuple[str, RunConfig, list[dict]]]:
    """Every planned ``(row, config, run dir)`` whose run has finished, read from disk after this process's
    share of the training, so that the last of several processes sharing a table writes all of it; a line
    says how many runs another process still holds."""
    done = [(name, config, finished_history(config, run_dir)) for name, config, run_dir in planned]
    missing = sum(history is None for _, _, history in done)
    if missing:
        print(f"{missing} run(s) still trained by another process: its end writes the whole table")
    return [(name, config, history) for name, config, history in done if history is not None]


def final_top1(history: list[dict]) -> dict[str, float]:
    """Test top-1 of every model after the last epoch: ``member0`` for a single model, then ``member1``... and
    ``ensemble`` for an ensemble."""
    return {
        "member0" if key == "top1_model" else key[len("top1_") :]: value
        for key, value in history[-1].items()
        if key.startswith("top1_")
    }


def main_curve(history: list[dict]) -> list[tuple[int, float]]:
    """(epoch, test top-1) of the model a method is judged by (the ensemble's for an ensemble) on the epochs
    that evaluated."""
    main = "top1_ensemble" if "top1_ensemble" in history[-1] else "top1_model"
    return [(record["epoch"], record[main]) for record in history if main in record]


def run_name(row: str, seed: int) -> str:
    """The run dir name of a table row and seed."""
    return f"{row.replace(' ', '_').replace('/', '').replace('+', '-')}-seed{seed}"


def run_ablation(
    base: RunConfig | None,
    seeds: int | None,
    out_dir: Path,
    resume_changes: dict | None = None,
    variants: list[tuple[str, dict]] = ABLATION,
) -> str:
    """Train every variant (``variants``: the rows of the table, :data:`ABLATION` by default) for every seed
    under ``out_dir``; write results.csv, results.md and curves.png; return the table.

    A new ablation (``base`` and ``seeds`` given) saves them to ``ablation.json`` in ``out_dir``, which
    must not hold an ablation yet. To resume, pass ``base=seeds=None`` and the ``resume_changes``
    (see :func:`~cekd_repro.rundir.resumed_config`): finished runs are kept, unfinished ones continue,
    missing ones start."""
    plan = out_dir / "ablation.json"
    if resume_changes is None:
        if plan.exists():
            raise RunDirExists(
                f"{out_dir} already holds an ablation; pass --resume {out_dir} to continue it, "
                "or choose another --run-dir"
            )
        out_dir.mkdir(parents=True, exist_ok=True)
        plan.write_text(
            json.dumps({"seeds": seeds, "base": asdict(base), "rows": [name for name, _ in variants]}, indent=2)
        )
    else:
        saved_base, seeds, names = saved_plan(out_dir)
        base = apply_resume_changes(saved_base, resume_changes, plan)
        variants = [(name, KNOWN_ROWS[name]) for name in names]
    planned = []
    for name, overrides in variants:
        for seed in range(seeds):
            config = replace(base, seed=base.seed + seed, **overrides)
            planned.append((name, config, out_dir / run_name(name, config.seed)))
    for _, config, run_dir in planned:
        complete_run(config, run_dir, resume_changes)
    rows, curves = [], {}
    for name, config, history in collected(planned):
        for member, value in final_top1(history).items():
            rows.append({"method": name, "seed": config.seed, "model": member, "top1": value})
        curves.setdefault(name, []).append(main_curve(history))

    return write_results(out_dir, rows, [name for name, _ in variants], seeds, curves)


def write_results(out_dir: Path, rows: list[dict], names: list[str], seeds: int, curves: dict) -> str:
    """results.csv (every run's every model), results.md (the table, mean ± std over seeds) and curves.png;
    returns the table."""
    with open(out_dir / "results.csv", "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=["method", "seed", "model", "top1"])
        writer.writeheader()
        writer.writerows(rows)
    columns = [*COLUMNS, *(c for c in MEAN_COLUMNS if any(r["model"] == c for r in rows))]
    header = "| method | " + " | ".join(columns) + " |\n|---|" + "---|" * len(columns) + "\n"
    lines = []
    for name in names:
        cells = [mean_std([r["top1"] for r in rows if r["method"] == name and r["model"] == c]) for c in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    table = header + "\n".join(lines) + "\n"
    (out_dir / "results.md").write_text(
        f"Test top-1 (%), mean ± std over {seeds} seed(s); single-model methods fill member0; ensemble: each "
        "method's ensemble or teacher (DML: the members' mean).\n\n" + table
    )
    figure, axis = new_figure(1)
    plot_curves(axis[0], curves)
    save_figure(figure, out_dir / "curves.png")
    return table


def new_figure(panels: int):
    """A figure of ``panels`` side by side (matplotlib, drawn without a display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, panels, figsize=(7 if panels == 1 else 4 * panels, 4.5), squeeze=False)
    return figure, list(axes[0])


def plot_curves(axis, curves: dict[str, list[list[tuple[int, float]]]]) -> None:
    """The mean over seeds of each method's (epoch, top-1) curve, on the epochs every seed evaluated."""
    for name, runs in curves.items():
        epochs = sorted(set.intersection(*(set(dict(run)) for run in runs)))
        mean = [statistics.mean(dict(run)[e] for run in runs) for e in epochs]
        axis.plot(epochs, mean, label=name + (" (ensemble)" if name.startswith("cekd") else ""))
    axis.set_xlabel("epoch")
    axis.set_ylabel("test top-1 (%)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)


def save_figure(figure, path: Path) -> None:
    import matplotlib.pyplot as plt

    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
