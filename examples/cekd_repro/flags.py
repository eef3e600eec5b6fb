"""The command line's flags, in groups, and each option's default under every preset (for --help)."""

from __future__ import annotations

from collections.abc import Callable

from .config import FINE_TUNING_PRESETS, METHODS, MIXES, PAPER_MIX_ALPHA, PRESETS, SYNTHETIC, RunConfig
from .sweep import SWEEP_ROWS
from .transfer import COLOURS_PRESETS, DEFAULT_SOURCE, SOURCES, TINY_SOURCE


def add_flags(add: Callable[..., None]) -> None:
    """Every flag, through ``add(flag, help, **argparse keywords)``."""
    for group in (_run_flags, _data_flags, _model_flags, _training_flags, _system_flags, _table_flags):
        group(add)


def preset_defaults(name: str) -> str:
    """The effective default of a RunConfig field under each preset, for --help."""
    base = RunConfig()
    values = {preset: PRESETS[preset].get(name, getattr(base, name)) for preset in PRESETS}
    if name == "mix_alpha":  # the fine-tuning presets take each mixing's own
        for preset in FINE_TUNING_PRESETS:
            values[preset] = ", ".join(f"{v:g} {k}" for k, v in PAPER_MIX_ALPHA.items())
    if name == "milestones":  # a one-cycle schedule has none
        values = {k: None if PRESETS[k].get("schedule", base.schedule) == "onecycle" else v for k, v in values.items()}
        values = {k: " ".join(map(str, v)) if v else v for k, v in values.items()}
    shown = {k: ("-" if v is None else f"{v:g}" if isinstance(v, float) else str(v)) for k, v in values.items()}
    if len(set(shown.values())) == 1:
        return f"default: {shown['quick']}"
    return "; ".join(f"{preset}: {value}" for preset, value in shown.items())


def _run_flags(add: Callable[..., None]) -> None:
    """What is trained: the preset and the method."""
    add("--preset", choices=sorted(PRESETS), help="base values of every option below [default: quick]")
    add("--method", choices=METHODS)
    add(
        "--mix",
        metavar="|".join(MIXES),
        help="the online (cekd, dml, one, ffl, pcl, mcl) and offline (kd, ccd) methods' mixing augmentation, or a "
        "comma-separated list of them to choose among per sample (cutmix,mixup)",
    )
    add(
        "--teacher",
        metavar="RUN_DIR",
        help="kd, ccd (and --compare's offline rows): a finished run of this example (--method baseline, a mixing, "
        "or cekd) that teaches, loaded with its weights only",
    )


def _data_flags(add: Callable[..., None]) -> None:
    """The dataset and its images."""
    add("--dataset", choices=[*SYNTHETIC, "cub", "cars", "aircraft", "imagefolder"])
    add("--data-root", dest="data_root", help="real datasets: their folder in its native layout")
    add("--classes", type=int, help="synthetic: number of classes (colours x orientations)")
    add("--train-per-class", dest="train_per_class", type=int, help="synthetic: training images per class")
    add("--test-per-class", dest="test_per_class", type=int, help="synthetic: test images per class")
    add(
        "--data-seed",
        dest="data_seed",
        type=int,
        help="synthetic: draw the images from this seed, whatever --seed (a table's seeds then share their images)",
    )
    add("--image-size", dest="image_size", type=int, help="synthetic: drawn size; real data: crop size")
    add(
        "--max-shift",
        dest="max_shift",
        type=int,
        metavar="PX",
        help="synthetic: the training images' augmentation, a random translation of up to PX pixels (reflected at "
        "the border; 0: none)",
    )
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


def _model_flags(add: Callable[..., None]) -> None:
    """The members and their weights."""
    add("--arch", help="torchvision name or timm:<name>; comma-separated for one per member")
    add("--members", type=int, help="cekd, dml, one, ffl, pcl, mcl: number of members (peers, branches)")
    add(
        "--branches-from",
        dest="branches_from",
        metavar="STAGE",
        help="cekd, dml, one, ffl, pcl, mcl: the members are branches of one trunk split at this module (layer3 of a "
        "ResNet, stages.2 of a timm ConvNeXt, blocks.6 of a timm ViT), the trunk run once per batch",
    )
    add(
        "--pretrained",
        metavar="imagenet|FILE",
        help="imagenet: the architecture's default ImageNet weights (torchvision's or timm's cache, under TORCH_HOME "
        "or HF_HOME; fetched there when online); FILE: a local state-dict",
    )


def _training_flags(add: Callable[..., None]) -> None:
    """The schedule, the optimizer, the mixing and the distillation."""
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
    add(
        "--switch-prob",
        dest="switch_prob",
        type=float,
        metavar="P",
        help="a --mix list: a mixed sample takes the first with 1 - P, the others share P (timm's switch; -: equal)",
    )
    add(
        "--mix-off-epoch",
        dest="mix_off_epoch",
        type=int,
        metavar="E",
        help="train on clean images after the first E epochs (timm's --mixup-off-epoch E)",
    )
    add("--temperature", type=float, help="cekd: distillation temperature T")
    add("--alpha", type=float, help="cekd: weight of cross distillation")
    add("--beta", type=float, help="cekd: weight of ensemble-to-member distillation")
    add(
        "--combine",
        choices=["mean", "gate", "linear"],
        help="cekd: how member logits make the ensemble's (linear: a classifier on the members' pooled features)",
    )
    add(
        "--rampup-epochs",
        dest="rampup_epochs",
        type=int,
        help="cekd, one, ffl, pcl: epochs over which the distillation weights ramp up (not dml, mcl: their code)",
    )
    add("--nce-k", dest="nce_k", type=int, metavar="K", help="mcl: negatives per sample of its contrastive term")
    add(
        "--mean-buffers",
        dest="mean_buffers",
        choices=["own", "averaged", "copied"],
        help="pcl: the temporal means' BatchNorm statistics: their own (PCL's code), averaged (timm's EMA) or copied",
    )
    add("--no-cross", dest="no_cross", action="store_const", const=True, help="ablation: alpha = 0")
    add(
        "--no-ensemble",
        dest="no_ensemble",
        action="store_const",
        const=True,
        help="ablation: no collaborative ensemble",
    )


def _system_flags(add: Callable[..., None]) -> None:
    """Precision, devices, loading, logging, run dirs and resuming."""
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


def _table_flags(add: Callable[..., None]) -> None:
    """The tables: ablation, comparison, transfer proxy, sweep."""
    add("--ablation", action="store_true", help="run the ablation table instead of one method")
    add(
        "--compare",
        action="store_true",
        help="the online-distillation table: baseline, --mix alone, and dml, one, ffl, pcl, mcl, cekd without mixing "
        "and over --mix (results.md, results.csv, curves.png; with --transfer, fine-tuned on the transfer proxy; "
        "resume it with --resume DIR --compare)",
    )
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
        help="--transfer: the source task: the target's unused classes, those of its colours on other orientations, "
        f"or those sharing no part with it [{DEFAULT_SOURCE}; {', '.join(COLOURS_PRESETS)}: {TINY_SOURCE}]",
    )
    add(
        "--sweep",
        nargs="+",
        metavar="EPOCHS[:SEEDS]",
        help=f"--transfer: fine-tune {', '.join(SWEEP_ROWS)} at each schedule length (milestones at the paper's "
        "40/75/90%%), one seed or SEEDS each, every length's first seed first",
    )
    add("--seeds", type=int, help="ablation: seeds per method [default: 3]")
