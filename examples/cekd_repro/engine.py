"""Training engine of the reproduction: one run of one method, with checkpoints, resume, AMP and DDP."""

from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, DistributedSampler

from cekd_losses import CEKDLoss, CollaborativeEnsemble, FeatureTap, MixingAugmenter, soft_cross_entropy

from .data import SyntheticSpec, file_splits, synthetic_splits
from .models import build_model, head_parameters

METHODS = ("baseline", "mixup", "cutmix", "snapmix", "cekd")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass
class RunConfig:
    """Everything that defines a run; saved as config.json in the run dir."""

    method: str = "cekd"
    mix: str = "cutmix"  # cekd's mixing: cutmix | snapmix | mixup
    dataset: str = "synthetic"
    data_root: str | None = None
    classes: int = 12  # synthetic only
    train_per_class: int = 80
    test_per_class: int = 40
    image_size: int = 64  # synthetic: drawn size; real data: crop size
    resize: int = 512  # real data: images warped to resize x resize before cropping
    arch: str = "resnet18"  # comma-separated: one per cekd member, or one for all
    members: int = 2
    pretrained: str | None = None
    epochs: int = 30
    batch_size: int = 64
    lr: float = 0.1
    head_lr: float | None = None  # None: same as lr
    momentum: float = 0.9
    weight_decay: float = 5e-4
    clip_grad: float | None = None  # max global L2 norm of the gradient; None: no clipping
    schedule: str = "onecycle"  # onecycle | multistep
    milestones: list[int] = field(default_factory=lambda: [80, 150, 180])
    mix_alpha: float = 1.0
    mix_p: float = 0.5
    same_on_batch: bool = False
    temperature: float = 3.0
    alpha: float = 1.0
    beta: float = 1.0
    combine: str = "mean"
    rampup_epochs: int = 5
    no_cross: bool = False
    no_ensemble: bool = False
    amp: str = "none"
    channels_last: bool = False
    compile: bool = False
    workers: int = 0
    seed: int = 0
    device: str = "cpu"
    visualize_cams: int = 0
    quiet: bool = False

    def archs(self) -> list[str]:
        names = self.arch.split(",")
        count = self.members if self.method == "cekd" else 1
        if len(names) == 1:
            return names * count
        if len(names) != count:
            raise ValueError(f"--arch gives {len(names)} architectures for {count} members")
        return names


def _progress(iterable, quiet: bool, **kwargs):
    from tqdm import tqdm

    return tqdm(iterable, disable=quiet or not sys.stderr.isatty(), leave=False, **kwargs)


def _shift_crop(image: Tensor, pad: int = 4) -> Tensor:
    """Random translation by up to ``pad`` pixels (reflect padding): the synthetic set's augmentation."""
    size = image.shape[-2:]
    padded = F.pad(image[None], (pad,) * 4, mode="reflect")[0]
    top, left = torch.randint(0, 2 * pad + 1, (2,)).tolist()
    return padded[:, top : top + size[0], left : left + size[1]]


def load_data(config: RunConfig):
    """(train set, test set, num classes, normalisation mean, std)."""
    if config.dataset == "synthetic":
        spec = SyntheticSpec(config.classes, config.train_per_class, config.test_per_class, config.image_size, config.seed)
        train, test, classes = synthetic_splits(spec)
        train.transform = _shift_crop
        return train, test, classes, (0.5,) * 3, (0.25,) * 3
    import torchvision.transforms as T

    train, test, classes = file_splits(config.dataset, config.data_root)
    warp = (config.resize, config.resize)
    train.transform = T.Compose([T.Resize(warp), T.RandomCrop(config.image_size), T.RandomHorizontalFlip(), T.ToTensor()])
    test.transform = T.Compose([T.Resize(warp), T.CenterCrop(config.image_size), T.ToTensor()])
    return train, test, classes, IMAGENET_MEAN, IMAGENET_STD


class RunDirExists(FileExistsError):
    """A run dir that already holds a run and was not asked to be resumed."""


def _write_atomic(path: Path, payload: object) -> None:
    partial = path.with_name(path.name + ".partial")
    torch.save(payload, partial)
    os.replace(partial, path)


def _rng_states() -> dict:
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }


def _set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    if states["cuda"]:
        torch.cuda.set_rng_state_all(states["cuda"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])


def _distributed() -> tuple[int, int, int]:
    """(rank, world size, local rank); initialises the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank() if world > 1 else 0
    return rank, world, int(os.environ.get("LOCAL_RANK", "0"))


def train(config: RunConfig, run_dir: str | Path, resume: bool = False) -> dict:
    """Run (or resume) one training run; returns its final epoch record. Only rank 0 writes."""
    run_dir = Path(run_dir)
    rank, world, local_rank = _distributed()
    if resume:
        saved = json.loads((run_dir / "config.json").read_text())
        config = RunConfig(**{**saved, "quiet": config.quiet})
    elif rank == 0 and run_dir.exists() and any(run_dir.iterdir()):
        raise RunDirExists(f"run dir {run_dir} already holds a run; pass --resume {run_dir} to continue it, "
                           "or choose another --run-dir")
    if config.method not in METHODS:
        raise ValueError(f"--method must be one of {', '.join(METHODS)}, got {config.method!r}")
    device = torch.device(f"cuda:{local_rank}" if config.device == "cuda" and world > 1 else config.device)
    if config.clip_grad is not None and not config.clip_grad > 0:
        raise ValueError(f"--clip-grad must be > 0, got {config.clip_grad}")
    if config.amp == "fp16" and device.type != "cuda":
        raise ValueError("--amp fp16 needs a CUDA device; use --amp bf16 on CPU")
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    np.random.seed(config.seed)

    train_set, test_set, num_classes, mean, std = load_data(config)
    mean_t = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=device).view(1, 3, 1, 1)
    models = [build_model(arch, num_classes, config.pretrained) for arch in config.archs()]
    net: nn.Module = CollaborativeEnsemble(models, config.combine) if config.method == "cekd" else models[0]
    net = net.to(device, memory_format=torch.channels_last if config.channels_last else torch.preserve_format)
    if config.compile:
        for model in models:
            model.compile()
    trained = nn.parallel.DistributedDataParallel(net, device_ids=[local_rank] if device.type == "cuda" else None) if world > 1 else net

    heads = {id(p) for model in models for p in head_parameters(model)}
    groups = [{"params": [p for p in net.parameters() if id(p) not in heads], "lr": config.lr},
              {"params": [p for p in net.parameters() if id(p) in heads], "lr": config.head_lr or config.lr}]
    optimizer = torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    steps_per_epoch = -(-len(train_set) // (config.batch_size * world))
    total_steps = steps_per_epoch * config.epochs
    if config.schedule == "onecycle":
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=[g["lr"] for g in groups], total_steps=total_steps)
    else:
        boundaries = [m * steps_per_epoch for m in config.milestones]
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.1 ** sum(s >= b for b in boundaries))
    scaler = torch.amp.GradScaler(device.type, enabled=config.amp == "fp16")
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.amp)

    mixing = config.mix if config.method == "cekd" else config.method
    mixer = None
    if mixing in ("mixup", "cutmix", "snapmix"):
        mixer = MixingAugmenter(mixing, num_classes, alpha=config.mix_alpha, p=config.mix_p,
                                same_on_batch=config.same_on_batch,
                                generator=torch.Generator().manual_seed(config.seed * 7919 + rank))
    tap = FeatureTap(models[0]) if mixing == "snapmix" else None
    criterion = None
    if config.method == "cekd":
        criterion = CEKDLoss(config.temperature, 0.0 if config.no_cross else config.alpha,
                             0.0 if config.no_ensemble else config.beta, config.rampup_epochs * steps_per_epoch,
                             supervise_ensemble=not config.no_ensemble)

    history: list[dict] = []
    start_epoch = 0
    checkpoint_path = run_dir / "checkpoint.pt"
    if resume:
        state = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
        net.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        if mixer is not None:
            mixer.generator.set_state(state["mixer_generator"])
        _set_rng_states(state["rng"])
        history, start_epoch = state["history"], state["epoch"]
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(asdict(config), indent=2))
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(record) + "\n" for record in history))

    def loader(dataset, shuffle: bool, epoch: int) -> DataLoader:
        generator = torch.Generator().manual_seed(config.seed * 1_000_003 + epoch)
        sampler = DistributedSampler(dataset, world, rank, shuffle=shuffle, seed=config.seed) if world > 1 else None
        if sampler is not None:
            sampler.set_epoch(epoch)
        return DataLoader(dataset, config.batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
                          generator=generator, num_workers=config.workers, drop_last=shuffle,
                          pin_memory=device.type == "cuda")

    def prepare(images: Tensor) -> Tensor:
        images = (images.to(device, non_blocking=True) - mean_t) / std_t
        return images.contiguous(memory_format=torch.channels_last) if config.channels_last else images

    def autocast():
        return torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None)

    for epoch in _progress(range(start_epoch, config.epochs), config.quiet, desc="epochs", initial=start_epoch, total=config.epochs):
        trained.train()
        sums: dict[str, Tensor] = {}  # on the device: read once per epoch, not once per step
        seen, steps, norms, start = 0, 0, torch.zeros((), device=device), time.perf_counter()
        for images, labels in _progress(loader(train_set, True, epoch), config.quiet, desc=f"epoch {epoch}"):
            images, labels = prepare(images), labels.to(device, non_blocking=True)
            step = scheduler.last_epoch  # optimizer steps taken so far
            with autocast():
                cams = None
                if tap is not None:
                    with torch.no_grad():
                        models[0](images)
                    cams = tap.class_activation_maps(labels)
                inputs, targets = images, labels
                if mixer is not None:
                    mixed = mixer(images, labels, cams)
                    inputs, targets = mixed.images, mixed.targets
                output = trained(inputs)
                if criterion is not None:
                    parts = criterion.components(output, targets, step=step)
                else:
                    parts = {"total": soft_cross_entropy(output, targets)}
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(parts["total"]).backward()
            scaler.unscale_(optimizer)
            grad_norm = nn.utils.clip_grad_norm_(net.parameters(), config.clip_grad or math.inf)  # before clipping
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            for name, value in parts.items():
                weighted = value.detach().float() * labels.shape[0]
                sums[name] = sums[name] + weighted if name in sums else weighted
            norms = norms + grad_norm.detach().float()
            steps += 1
            seen += labels.shape[0]
        train_time = time.perf_counter() - start
        top1 = evaluate(trained, net, loader(test_set, False, epoch), prepare, autocast, world, config.quiet)
        record = {"epoch": epoch + 1, **{f"loss_{k}": v.item() / max(seen, 1) for k, v in sums.items()},
                  "grad_norm": norms.item() / max(steps, 1),
                  **{f"top1_{k}": v for k, v in top1.items()}, "lr": optimizer.param_groups[0]["lr"],
                  "images_per_s": seen * world / train_time, "epoch_s": time.perf_counter() - start}
        history.append(record)
        if rank == 0:
            with open(run_dir / "metrics.jsonl", "a") as log:
                log.write(json.dumps(record) + "\n")
            _write_atomic(checkpoint_path, {
                "epoch": epoch + 1, "model": net.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "rng": _rng_states(),
                "mixer_generator": mixer.generator.get_state() if mixer is not None else None, "history": history,
            })
    if rank == 0 and config.visualize_cams:
        from .cams import save_cam_figure

        save_cam_figure(models, test_set, prepare, config.visualize_cams, run_dir / "cams.png")
    if tap is not None:
        tap.remove()
    return history[-1] if history else {}


@torch.no_grad()
def evaluate(trained: nn.Module, net: nn.Module, loader: DataLoader, prepare, autocast, world: int, quiet: bool) -> dict[str, float]:
    """Top-1 (%) of every member and of the ensemble (or of the single model), reduced across ranks."""
    trained.eval()
    correct: Tensor | None = None
    total = 0
    for images, labels in _progress(loader, quiet, desc="test"):
        images, labels = prepare(images), labels.to(images.device)
        with autocast():
            output = trained(images)
        logits = torch.cat([output.member_logits, output.ensemble_logits[None]]) if isinstance(net, CollaborativeEnsemble) else output[None]
        hits = (logits.argmax(dim=2) == labels[None]).sum(dim=1).double()
        correct = hits if correct is None else correct + hits
        total += labels.shape[0]
    counts = torch.cat([correct, torch.tensor([float(total)], dtype=torch.float64, device=correct.device)])
    if world > 1:
        dist.all_reduce(counts)
    accuracy = (100 * counts[:-1] / counts[-1]).tolist()
    if isinstance(net, CollaborativeEnsemble):
        names = [f"member{i}" for i in range(len(net))] + ["ensemble"]
    else:
        names = ["model"]
    return dict(zip(names, accuracy))
