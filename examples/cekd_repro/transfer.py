"""The paper's regime on a proxy: members pretrained on a large synthetic source task, then fine-tuned on
the target task with few images per class, through ``--pretrained`` and the paper's fine-tuning recipe.

The source task (``--dataset synthetic-source``) draws the same "birds" as the target, with the (head
colour, stripe orientation) classes the target does not use: the low-level statistics are shared, the
classes are disjoint, as ImageNet and CUB; ``--dataset synthetic-colours`` keeps the classes whose stripe
orientation the target never uses, ``--dataset synthetic-distant`` those sharing no part with the target's.
Pretraining runs once per source, architecture and source size and is reused (its ``weights.pt`` is an
ordinary state-dict file); then every row of the table fine-tunes from it with the ``transfer`` preset (the
paper preset's recipe on the synthetic target, its schedule scaled), and a linear probe tells how much of
the target the frozen source features already solve.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cekd_losses import find_classifier

from .ablation import ALL_ROWS, run_ablation, saved_plan
from .config import SOURCE_TASKS, RunConfig
from .data import load_data
from .engine import train
from .models import build_model
from .rundir import resumed_config
from .sweep import run_sweep, saved_sweep

SOURCE_PER_CLASS = 200  # source images per class (24 classes for a 12-class target): 4,800 images
SOURCE_EPOCHS = 15
# source dataset -> its run dir's prefix: "source" for the near one, else its kind (cekd_repro.synthetic.source_pairs)
SOURCES = {name: "source" if kind == "near" else kind for name, kind in SOURCE_TASKS.items()}
DEFAULT_SOURCE = "synthetic-source"
TINY_SOURCE = "synthetic-colours"  # the transfer-tiny preset's: the paper's gap between probe and fine-tuning
COLOURS_PRESETS = ("transfer-tiny", "transfer-room")  # the presets whose --transfer source is TINY_SOURCE


def source_config(base: RunConfig, per_class: int, epochs: int, source: str = DEFAULT_SOURCE) -> RunConfig:
    """The pretraining run of ``base``'s architecture: a plain model on the ``source`` task (one of
    :data:`SOURCES`), from scratch, with the quick preset's from-scratch recipe (one-cycle at lr 0.1, gradient
    clipping)."""
    if source not in SOURCES:
        raise ValueError(f"--source-dataset must be one of {', '.join(SOURCES)}, got {source!r}")
    archs = set(base.archs())
    if len(archs) != 1:
        raise ValueError(f"--transfer pretrains one architecture for every member, got --arch {base.arch}")
    return replace(
        base,
        method="baseline",
        dataset=source,
        arch=archs.pop(),
        train_per_class=per_class,
        test_per_class=20,
        data_seed=None,  # the source's images follow its seed (its run dir's name), --data-seed the target's
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


def pretrained_weights(
    base: RunConfig, out_dir: Path, per_class: int, epochs: int, source_dataset: str = DEFAULT_SOURCE
) -> Path:
    """The source weights for ``base``'s architecture: trained into ``out_dir`` once, reused after."""
    source = source_config(base, per_class, epochs, source_dataset)
    name = f"{SOURCES[source_dataset]}-{source.arch.replace(':', '-')}-{per_class}x{epochs}-seed{source.seed}"
    run_dir = out_dir / name
    weights = run_dir / "weights.pt"
    if not weights.exists():
        started = (run_dir / "config.json").exists()
        train(resumed_config(run_dir) if started else source, run_dir, resume=started)
    return weights


def probe_top1(model: nn.Module, train: tuple[Tensor, Tensor], test: tuple[Tensor, Tensor], classes: int) -> float:
    """Test top-1 (%) of a linear probe: a new linear classifier fitted on ``model``'s frozen features (the
    input of its classifier head), standardised, by L2-regularised multinomial logistic regression (full-batch
    L-BFGS from zeros: a convex problem, so one answer). ``train``/``test``: (images, labels), images already
    normalised as the model expects."""
    head = find_classifier(model)
    if head is None:
        raise ValueError(f"{type(model).__name__} has no linear classifier head to probe below")
    captured: list[Tensor] = []
    hook = head.register_forward_pre_hook(lambda module, inputs: captured.append(inputs[0].flatten(1)))
    try:
        with torch.no_grad():
            features = []
            for images, _ in (train, test):
                captured.clear()
                model.eval()(images)
                features.append(captured[0].double())
    finally:
        hook.remove()
    mean, std = features[0].mean(dim=0), features[0].std(dim=0).clamp(min=1e-6)
    train_features, test_features = ((f - mean) / std for f in features)
    weight = torch.zeros(classes, train_features.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=500, line_search_fn="strong_wolfe")

    def loss() -> Tensor:
        optimizer.zero_grad()
        value = F.cross_entropy(train_features @ weight.T + bias, train[1]) + 1e-3 * weight.square().sum()
        value.backward()
        return value

    optimizer.step(loss)
    predictions = (test_features @ weight.T + bias).argmax(dim=1)
    return 100.0 * (predictions == test[1]).double().mean().item()


def source_probe(base: RunConfig, seeds: int) -> list[float]:
    """:func:`probe_top1` of ``base.pretrained`` (the source weights) on the target of each seed's run: how much
    of the target the source features solve before any fine-tuning."""
    results = []
    for seed in range(base.seed, base.seed + seeds):
        config = replace(base, seed=seed)
        train_set, test_set, classes, mean, std = load_data(config)
        model = build_model(config.archs()[0], classes, config.pretrained, config.image_size)
        shift, scale = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)
        splits = [((s.dataset.images.float() / 255 - shift) / scale, s.dataset.labels) for s in (train_set, test_set)]
        results.append(probe_top1(model, splits[0], splits[1], classes))
    return results


def _probe_line(base: RunConfig, seeds: int, out_dir: Path) -> str:
    """The linear probe's line under the table, computed once per transfer dir (probe.json)."""
    saved = out_dir / "probe.json"
    if saved.exists():
        top1 = json.loads(saved.read_text())["top1"]
    else:
        top1 = source_probe(base, seeds)
        saved.write_text(json.dumps({"top1": top1}))
    spread = f" ± {statistics.stdev(top1):.2f}" if len(top1) > 1 else ""
    return (
        f"linear probe of the source features (a new head on the frozen backbone): {statistics.mean(top1):.2f}"
        f"{spread} over {len(top1)} seed(s); the fine-tuned baseline shows what fine-tuning adds"
    )


def run_transfer(
    base: RunConfig | None,
    seeds: int | None,
    out_dir: Path,
    per_class: int = SOURCE_PER_CLASS,
    epochs: int = SOURCE_EPOCHS,
    resume_changes: dict | None = None,
    source_dataset: str = DEFAULT_SOURCE,
    sweep: list[tuple[int, int]] | None = None,
    rows: list[tuple[str, dict]] = ALL_ROWS,
) -> str:
    """Pretrain (or reuse), then fine-tune every row of the table (``rows``: the ablation's with MixUp, or the
    online-distillation comparison's) for every seed under ``out_dir/finetune``
    (with ``sweep``, the rows of :func:`~cekd_repro.sweep.run_sweep` at its lengths under ``out_dir/sweep``),
    and probe the source features linearly on the target (:func:`source_probe`); returns the table and the
    probe. ``resume_changes`` (a dict, maybe empty): continue the table or sweep in ``out_dir`` as saved."""
    if resume_changes is not None:
        if (out_dir / "sweep" / "sweep.json").exists():
            table = run_sweep(None, None, out_dir / "sweep", resume_changes)
            base = saved_sweep(out_dir / "sweep")[0]
            seeds = 1
        else:
            table = run_ablation(None, None, out_dir / "finetune", resume_changes=resume_changes)
            base, seeds, _ = saved_plan(out_dir / "finetune")
    else:
        assert base is not None and seeds is not None
        weights = pretrained_weights(base, out_dir, per_class, epochs, source_dataset)
        base = replace(base, pretrained=str(weights))
        if sweep is not None:
            table = run_sweep(base, sweep, out_dir / "sweep")
            seeds = 1
        else:
            table = run_ablation(base, seeds, out_dir / "finetune", variants=rows)
    return f"{table}\n{_probe_line(base, seeds, out_dir)}"
