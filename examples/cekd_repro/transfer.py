"""The paper's regime on a proxy: members pretrained on a large synthetic source task, then fine-tuned on
the target task with few images per class, through ``--pretrained`` and the paper's fine-tuning recipe.

The source task (``--dataset synthetic-source``) draws the same "birds" as the target, with the (head
colour, stripe orientation) classes the target does not use: the low-level statistics are shared, the
classes are disjoint, as ImageNet and CUB. Pretraining runs once per architecture and source size and is
reused (its ``weights.pt`` is an ordinary state-dict file); then every row of the table fine-tunes from
it with the ``transfer`` preset (the paper preset's recipe on the synthetic target, its schedule scaled).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from .ablation import ALL_ROWS, run_ablation
from .config import RunConfig
from .engine import train
from .rundir import resumed_config

SOURCE_PER_CLASS = 200  # source images per class (24 classes for a 12-class target): 4,800 images
SOURCE_EPOCHS = 15


def source_config(base: RunConfig, per_class: int, epochs: int) -> RunConfig:
    """The pretraining run of ``base``'s architecture: a plain model on the source task, from scratch, with
    the quick preset's from-scratch recipe (one-cycle at lr 0.1, gradient clipping)."""
    archs = set(base.archs())
    if len(archs) != 1:
        raise ValueError(f"--transfer pretrains one architecture for every member, got --arch {base.arch}")
    return replace(
        base,
        method="baseline",
        dataset="synthetic-source",
        arch=archs.pop(),
        train_per_class=per_class,
        test_per_class=20,
        epochs=epochs,
        batch_size=64,
        lr=0.1,
        head_lr=None,
        schedule="onecycle",
        clip_grad=5.0,
        pretrained=None,
        keep="weights",
        visualize_cams=0,
    )


def pretrained_weights(base: RunConfig, out_dir: Path, per_class: int, epochs: int) -> Path:
    """The source weights for ``base``'s architecture: trained into ``out_dir`` once, reused after."""
    source = source_config(base, per_class, epochs)
    run_dir = out_dir / f"source-{source.arch.replace(':', '-')}-{per_class}x{epochs}-seed{source.seed}"
    weights = run_dir / "weights.pt"
    if not weights.exists():
        started = (run_dir / "config.json").exists()
        train(resumed_config(run_dir) if started else source, run_dir, resume=started)
    return weights


def run_transfer(
    base: RunConfig | None,
    seeds: int | None,
    out_dir: Path,
    per_class: int = SOURCE_PER_CLASS,
    epochs: int = SOURCE_EPOCHS,
    resume: bool = False,
) -> str:
    """Pretrain (or reuse), then fine-tune every row of the table for every seed under ``out_dir/finetune``;
    returns the table. ``resume``: continue the table in ``out_dir`` as saved."""
    if resume:
        return run_ablation(None, None, out_dir / "finetune", resume_changes={})
    assert base is not None and seeds is not None
    weights = pretrained_weights(base, out_dir, per_class, epochs)
    return run_ablation(replace(base, pretrained=str(weights)), seeds, out_dir / "finetune", variants=ALL_ROWS)
