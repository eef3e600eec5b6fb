"""Reproduce CEKD (Zhang et al., 2022): train fine-grained classifiers with mixing and cross ensemble distillation.

Quick default (synthetic fine-grained data, CPU-sized)::

    python examples/reproduce_cekd.py                      # CEKD over CutMix, prints members' and ensemble's top-1
    python examples/reproduce_cekd.py --ablation --seeds 3 # the paper's ablation table on the synthetic set

The paper's setting on a real dataset (a GPU and the dataset on disk; ImageNet weights from torchvision's or
timm's cache, downloaded there once when online, or ``--pretrained FILE``)::

    python examples/reproduce_cekd.py --preset paper --dataset cub --data-root /data/CUB_200_2011 \\
        --arch resnet101 --pretrained imagenet --method cekd --mix snapmix --device cuda --amp bf16
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import fields, replace
from pathlib import Path

from cekd_repro.ablation import compare_rows, run_ablation
from cekd_repro.config import (
    OFFLINE,
    RunConfig,
    preset_config,
)
from cekd_repro.engine import Diverged, train
from cekd_repro.flags import add_flags, preset_defaults
from cekd_repro.rundir import RunDirExists, resumed_config
from cekd_repro.sweep import parse_lengths
from cekd_repro.transfer import (
    COLOURS_PRESETS,
    DEFAULT_SOURCE,
    SOURCE_EPOCHS,
    SOURCE_PER_CLASS,
    TINY_SOURCE,
    run_transfer,
)

PAPER_FROM_SCRATCH = (
    "warning: --preset paper is the fine-tuning recipe of the paper (ImageNet-pretrained members, lr 0.001/0.01, "
    "no clipping); without --pretrained it trains from scratch, where 2 x resnet50 at 448 px diverged in our runs "
    "(epoch-1 loss ~250, gradient norm ~500). Pass --pretrained imagenet (or a local state-dict), or add --clip-grad 5 "
    "(see docs/example.rst)"
)


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[1:]),
    )

    def add(flag: str, help: str = "", **kwargs) -> None:
        dest = kwargs.get("dest", flag[2:].replace("-", "_"))
        if dest in {f.name for f in fields(RunConfig)} and kwargs.get("action") != "store_const":
            help = f"{help} [{preset_defaults(dest)}]".strip()
        parser.add_argument(flag, help=help, **kwargs)

    add_flags(add)
    return parser.parse_args(argv)


def given_values(args: argparse.Namespace) -> dict:
    """The RunConfig values given on the command line."""
    return {f.name: getattr(args, f.name) for f in fields(RunConfig) if getattr(args, f.name, None) is not None}


def build_config(args: argparse.Namespace) -> RunConfig:
    return preset_config(args.preset or "quick", given_values(args))


def print_table(record: dict) -> None:
    print("\nfinal test top-1 (%):")
    for key, value in record.items():
        if key.startswith("top1_"):
            print(f"  {key[len('top1_') :]:10} {value:6.2f}")


def _one_line(error: BaseException) -> str:
    """The last line of an error's message (a loader worker's error carries the worker's traceback)."""
    lines = str(error).strip().splitlines()
    return lines[-1] if lines else type(error).__name__


def run_table(args: argparse.Namespace, config: RunConfig | None, changes: dict | None, seeds: int) -> tuple[str, Path]:
    """The ablation, the transfer table or the sweep the flags ask for (a new one, or ``changes`` to resume one);
    returns the table and its dir."""
    kind = "transfer" if args.transfer else "compare" if args.compare else "ablation"
    out = Path(args.resume or args.run_dir or f"runs/{kind}-{time.strftime('%Y%m%d-%H%M%S')}")
    if args.resume:
        resume = run_transfer if args.transfer else run_ablation
        return resume(None, None, out, resume_changes=changes), out
    assert config is not None
    rows = comparison(config) if args.compare else None
    if not args.transfer:
        return run_ablation(config, seeds, out, **({"variants": rows} if rows else {})), out
    source = (args.source_per_class or SOURCE_PER_CLASS, args.source_epochs or SOURCE_EPOCHS)
    dataset = args.source_dataset or (TINY_SOURCE if args.preset in COLOURS_PRESETS else DEFAULT_SOURCE)
    sweep = parse_lengths(args.sweep) if args.sweep else None
    table = run_transfer(
        config, seeds, out, *source, source_dataset=dataset, sweep=sweep, **({"rows": rows} if rows else {})
    )
    return table, out


def comparison(config: RunConfig) -> list[tuple[str, dict]]:
    """The rows of ``--compare`` over the config's mixing, every one checked before any trains."""
    if config.mix == "none":
        raise ValueError(
            "--compare sets each method without mixing beside it over --mix: give --mix cutmix, snapmix or mixup"
        )
    if "," in config.mix:
        raise ValueError(f"--compare sets --mix alone beside the online methods: give one mixing, not {config.mix}")
    rows = compare_rows(config.mix, offline=config.teacher is not None)
    for _, overrides in rows:
        replace(config, **overrides).validate()
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    start = time.time()
    config, changes = None, None
    try:
        if args.resume:
            extra = [
                flag
                for flag, value in (("--preset", args.preset), ("--run-dir", args.run_dir), ("--seeds", args.seeds))
                if value is not None
            ]
            if extra:
                raise ValueError(f"--resume continues the run as saved; it cannot take {', '.join(extra)}")
            changes = given_values(args)
        else:
            config = build_config(args)
            if config.teacher and config.method not in OFFLINE and not args.compare:
                raise ValueError(
                    f"--teacher applies to --method {', '.join(OFFLINE)} (and --compare), not {config.method}"
                )
            if args.preset == "paper" and config.pretrained is None:
                print(PAPER_FROM_SCRATCH, file=sys.stderr)
        if args.sweep and (not args.transfer or args.resume):
            raise ValueError("--sweep plans the schedule sweep of a new --transfer (a resume continues its plan)")
        if args.sweep and args.seeds is not None:
            raise ValueError("--sweep gives each length its seeds (EPOCHS:SEEDS); it cannot take --seeds")
        seeds = 3 if args.seeds is None else args.seeds
        if seeds < 1:
            raise ValueError(f"--seeds must be >= 1, got {seeds}")
        if args.compare and (args.ablation or args.sweep):
            raise ValueError(
                "--compare is a table of its own (with --transfer: fine-tuned): drop --ablation or --sweep"
            )
        if args.transfer or args.ablation or args.compare:
            table, out = run_table(args, config, changes, seeds)
            print(table)
            print(f"results in {out} ({time.time() - start:.0f} s)")
            return 0
        if args.resume:
            run_dir = Path(args.resume)
            if (run_dir / "ablation.json").exists():
                raise ValueError(f"--resume {run_dir} holds a table: add --ablation (or --compare)")
            config = resumed_config(run_dir, **(changes or {}))
            if not config.quiet:
                print(f"resuming {run_dir}" + (f" with {changes}" if changes else ""))
        else:
            assert config is not None
            run_dir = Path(args.run_dir or f"runs/{config.method}-{time.strftime('%Y%m%d-%H%M%S')}")
        record = train(config, run_dir, resume=bool(args.resume))
    except (RunDirExists, Diverged, OSError, ValueError) as error:
        raise SystemExit(f"error: {_one_line(error)}") from None
    print_table(record)
    print(f"results in {run_dir} ({time.time() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
