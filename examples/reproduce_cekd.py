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
from dataclasses import fields
from pathlib import Path

from cekd_repro.ablation import run_ablation
from cekd_repro.config import (
    FINE_TUNING_PRESETS,
    METHODS,
    PAPER_MIX_ALPHA,
    PRESETS,
    SYNTHETIC,
    RunConfig,
    preset_config,
)
from cekd_repro.engine import Diverged, train
from cekd_repro.rundir import RunDirExists, resumed_config
from cekd_repro.sweep import SWEEP_ROWS, parse_lengths
from cekd_repro.transfer import DEFAULT_SOURCE, SOURCE_EPOCHS, SOURCE_PER_CLASS, SOURCES, TINY_SOURCE, run_transfer

PAPER_FROM_SCRATCH = (
    "warning: --preset paper is the fine-tuning recipe of the paper (ImageNet-pretrained members, lr 0.001/0.01, "
    "no clipping); without --pretrained it trains from scratch, where 2 x resnet50 at 448 px diverged in our runs "
    "(epoch-1 loss ~250, gradient norm ~500). Pass --pretrained imagenet (or a local state-dict), or add --clip-grad 5 "
    "(see docs/reproduction.rst)"
)


def _default(name: str) -> str:
    """The effective default of a RunConfig field under each preset, for --help."""
    base = RunConfig()
    values = {preset: PRESETS[preset].get(name, getattr(base, name)) for preset in PRESETS}
    if name == "mix_alpha":  # the fine-tuning presets take each mixing's own
        for preset in FINE_TUNING_PRESETS:
            values[preset] = ", ".join(f"{v:g} {k}" for k, v in PAPER_MIX_ALPHA.items())
    if name == "milestones":  # the quick preset's schedule is one-cycle
        values["quick"] = None
        values = {k: " ".join(map(str, v)) if v else v for k, v in values.items()}
    shown = {k: ("-" if v is None else f"{v:g}" if isinstance(v, float) else str(v)) for k, v in values.items()}
    if len(set(shown.values())) == 1:
        return f"default: {shown['quick']}"
    return "; ".join(f"{preset}: {value}" for preset, value in shown.items())


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[1:]),
    )

    def add(flag: str, help: str = "", **kwargs) -> None:
        dest = kwargs.get("dest", flag[2:].replace("-", "_"))
        if dest in {f.name for f in fields(RunConfig)} and kwargs.get("action") != "store_const":
            help = f"{help} [{_default(dest)}]".strip()
        parser.add_argument(flag, help=help, **kwargs)

    add("--preset", choices=sorted(PRESETS), help="base values of every option below [default: quick]")
    add("--method", choices=METHODS)
    add("--mix", choices=["cutmix", "snapmix", "mixup"], help="cekd's mixing augmentation")
    add("--dataset", choices=[*SYNTHETIC, "cub", "cars", "aircraft", "imagefolder"])
    add("--data-root", dest="data_root", help="real datasets: their folder in its native layout")
    add("--classes", type=int, help="synthetic: number of classes (colours x orientations)")
    add("--train-per-class", dest="train_per_class", type=int, help="synthetic: training images per class")
    add("--test-per-class", dest="test_per_class", type=int, help="synthetic: test images per class")
    add("--image-size", dest="image_size", type=int, help="synthetic: drawn size; real data: crop size")
    add("--resize", type=int, help="real data: warp to resize x resize before cropping")
    add(
        "--cache-dir",
        dest="cache_dir",
        metavar="DIR",
        help="real data: where the decoded, resized images are kept (- : ~/.cache/cekd-losses)",
    )
    add(
        "--no-cache",
        dest="no_cache",
        action="store_const",
        const=True,
        help="real data: decode every image every epoch instead of once",
    )
    add("--arch", help="torchvision name or timm:<name>; comma-separated for one per member")
    add("--members", type=int, help="cekd: number of members")
    add(
        "--pretrained",
        metavar="imagenet|FILE",
        help="imagenet: the architecture's default ImageNet weights (torchvision's or timm's cache, under TORCH_HOME "
        "or HF_HOME; fetched there when online); FILE: a local state-dict",
    )
    add("--epochs", type=int)
    add(
        "--milestones",
        type=int,
        nargs="+",
        metavar="EPOCH",
        help="multistep schedule (paper, transfer): epochs after which the learning rates drop 10x; give them "
        "with a changed --epochs",
    )
    add("--batch-size", dest="batch_size", type=int)
    add("--lr", type=float, help="peak learning rate")
    add("--head-lr", dest="head_lr", type=float, help="learning rate of the classifier heads (-: as --lr)")
    add("--weight-decay", dest="weight_decay", type=float)
    add("--clip-grad", dest="clip_grad", type=float, metavar="NORM", help="clip the gradient's global L2 norm to NORM")
    add("--mix-alpha", dest="mix_alpha", type=float, help="Beta(alpha, alpha) of the mixing lambdas")
    add("--mix-p", dest="mix_p", type=float, help="probability that a sample is mixed")
    add("--temperature", type=float, help="cekd: distillation temperature T")
    add("--alpha", type=float, help="cekd: weight of cross distillation")
    add("--beta", type=float, help="cekd: weight of ensemble-to-member distillation")
    add("--combine", choices=["mean", "gate", "fusion"], help="cekd: how member logits make the ensemble's")
    add("--rampup-epochs", dest="rampup_epochs", type=int, help="cekd: epochs over which alpha and beta ramp up")
    add("--no-cross", dest="no_cross", action="store_const", const=True, help="ablation: alpha = 0")
    add(
        "--no-ensemble",
        dest="no_ensemble",
        action="store_const",
        const=True,
        help="ablation: no collaborative ensemble",
    )
    add("--amp", choices=["none", "bf16", "fp16"], help="mixed precision (fp16 on CUDA only)")
    add("--channels-last", dest="channels_last", action="store_const", const=True, help="channels-last memory format")
    add("--compile", action="store_const", const=True, help="torch.compile the members")
    add("--workers", type=int, help="data loader worker processes")
    add("--seed", type=int)
    add("--device", help="cpu, cuda or cuda:N (under torchrun, cuda is each rank's GPU)")
    add(
        "--eval-every",
        dest="eval_every",
        type=int,
        metavar="N",
        help="evaluate on the test set every N epochs (and after the last)",
    )
    add("--visualize-cams", dest="visualize_cams", type=int, metavar="K", help="save a figure of K test images' CAMs")
    add(
        "--keep",
        choices=["checkpoint", "weights"],
        help="at the end of the run keep the resumable checkpoint.pt, or only weights.pt (the models' weights)",
    )
    add("--quiet", action="store_const", const=True, help="no per-epoch lines, no progress bars")
    add("--run-dir", dest="run_dir", help="where to write (default runs/<method>-<time>); never overwritten")
    add(
        "--resume",
        metavar="RUN_DIR",
        help="continue the run (or ablation) in RUN_DIR with its saved config; may change --epochs (multistep "
        "schedule only), --workers, --device (same kind), --quiet, --clip-grad, --amp, --cache-dir, --no-cache, "
        "--eval-every; a second process resuming a table at once trains the runs the first has not taken",
    )
    add("--ablation", action="store_true", help="run the ablation table instead of one method")
    add(
        "--transfer",
        action="store_true",
        help="the transfer proxy: pretrain on the synthetic source task (once, reused), then fine-tune every "
        "method of the table on the target (use with --preset transfer)",
    )
    add("--source-per-class", dest="source_per_class", type=int, help="--transfer: source images per class [200]")
    add("--source-epochs", dest="source_epochs", type=int, help="--transfer: pretraining epochs [15]")
    add(
        "--source-dataset",
        dest="source_dataset",
        choices=list(SOURCES),
        help="--transfer: the source task: the target's unused classes, those of its colours on other "
        f"orientations, or those sharing no part with it [{DEFAULT_SOURCE}; transfer-tiny: {TINY_SOURCE}]",
    )
    add(
        "--sweep",
        nargs="+",
        metavar="EPOCHS[:SEEDS]",
        help=f"--transfer: fine-tune {', '.join(SWEEP_ROWS)} at each schedule length (milestones at the paper's "
        "40/75/90%%), one seed or SEEDS each, every length's first seed first",
    )
    add("--seeds", type=int, help="ablation: seeds per method [default: 3]")
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
    kind = "transfer" if args.transfer else "ablation"
    out = Path(args.resume or args.run_dir or f"runs/{kind}-{time.strftime('%Y%m%d-%H%M%S')}")
    if args.resume:
        resume = run_transfer if args.transfer else run_ablation
        return resume(None, None, out, resume_changes=changes), out
    assert config is not None
    if not args.transfer:
        return run_ablation(config, seeds, out), out
    source = (args.source_per_class or SOURCE_PER_CLASS, args.source_epochs or SOURCE_EPOCHS)
    dataset = args.source_dataset or (TINY_SOURCE if args.preset == "transfer-tiny" else DEFAULT_SOURCE)
    sweep = parse_lengths(args.sweep) if args.sweep else None
    return run_transfer(config, seeds, out, *source, source_dataset=dataset, sweep=sweep), out


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
            if args.preset == "paper" and config.pretrained is None:
                print(PAPER_FROM_SCRATCH, file=sys.stderr)
        if args.sweep and (not args.transfer or args.resume):
            raise ValueError("--sweep plans the schedule sweep of a new --transfer (a resume continues its plan)")
        if args.sweep and args.seeds is not None:
            raise ValueError("--sweep gives each length its seeds (EPOCHS:SEEDS); it cannot take --seeds")
        seeds = 3 if args.seeds is None else args.seeds
        if seeds < 1:
            raise ValueError(f"--seeds must be >= 1, got {seeds}")
        if args.transfer or args.ablation:
            table, out = run_table(args, config, changes, seeds)
            print(table)
            print(f"results in {out} ({time.time() - start:.0f} s)")
            return 0
        if args.resume:
            run_dir = Path(args.resume)
            if (run_dir / "ablation.json").exists():
                raise ValueError(f"--resume {run_dir} holds an ablation: add --ablation")
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
