"""Training engine of the reproduction: one run of one method, with checkpoints, resume, AMP and DDP."""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import re
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader

from cekd_losses import (
    CEKDLoss,
    CollaborativeEnsemble,
    FeatureTap,
    MixingAugmenter,
    SoftTargetCrossEntropy,
    train_step,
)

from .data import Augmented, EpochOrder, SyntheticSpec, file_splits, shift_crop, synthetic_splits
from .models import build_model, head_parameters

METHODS = ("baseline", "mixup", "cutmix", "snapmix", "cekd")
CEKD_OPTIONS = ("mix", "members", "temperature", "alpha", "beta", "combine", "rampup_epochs", "no_cross", "no_ensemble")
MIXING_OPTIONS = ("mix_alpha", "mix_p", "same_on_batch")
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
    keep: str = "checkpoint"  # at the end: "checkpoint" (resumable) or "weights" (weights.pt only)
    quiet: bool = False

    def applies(self, name: str) -> bool:
        """Whether the option ``name`` takes part in this run (config.json records only those)."""
        synthetic = self.dataset == "synthetic"
        if name in ("classes", "train_per_class", "test_per_class"):
            return synthetic
        if name in ("data_root", "resize"):
            return not synthetic
        if name in CEKD_OPTIONS:
            return self.method == "cekd"
        if name in MIXING_OPTIONS:
            return self.mixing is not None
        if name == "milestones":
            return self.schedule == "multistep"
        return True

    def saved(self) -> dict:
        """The options that apply to this run, as written to config.json (a resume fills the rest
        with their defaults, which this run never reads)."""
        return {name: value for name, value in asdict(self).items() if self.applies(name)}

    def archs(self) -> list[str]:
        names = self.arch.split(",")
        count = self.members if self.method == "cekd" else 1
        if len(names) == 1:
            return names * count
        if len(names) != count:
            raise ValueError(f"--arch gives {len(names)} architectures for {count} members")
        return names


    @property
    def mixing(self) -> str | None:
        """The mixing this run applies: the method's own, cekd's ``mix``, or None for the baseline."""
        if self.method == "cekd":
            return self.mix
        return None if self.method == "baseline" else self.method

    def validate(self) -> None:
        """Raise ValueError naming the flag for any value a run cannot use."""
        if self.method not in METHODS:
            raise ValueError(f"--method must be one of {', '.join(METHODS)}, got {self.method!r}")
        for flag, value in (("--batch-size", self.batch_size), ("--image-size", self.image_size),
                            ("--epochs", self.epochs), ("--members", self.members), ("--resize", self.resize),
                            ("--classes", self.classes), ("--train-per-class", self.train_per_class),
                            ("--test-per-class", self.test_per_class)):
            if value < 1:
                raise ValueError(f"{flag} must be >= 1, got {value}")
        for flag, value in (("--workers", self.workers), ("--seed", self.seed), ("--rampup-epochs", self.rampup_epochs)):
            if value < 0:
                raise ValueError(f"{flag} must be >= 0, got {value}")
        for flag, value in (("--lr", self.lr), ("--head-lr", self.head_lr), ("--clip-grad", self.clip_grad),
                            ("--mix-alpha", self.mix_alpha), ("--temperature", self.temperature)):
            if value is not None and not value > 0:
                raise ValueError(f"{flag} must be > 0, got {value}")
        if not 0 <= self.mix_p <= 1:
            raise ValueError(f"--mix-p must be in [0, 1], got {self.mix_p}")
        if self.dataset != "synthetic" and self.image_size > self.resize:
            raise ValueError(f"--image-size {self.image_size} must be <= --resize {self.resize} (images are cropped "
                             "from the resized image)")
        self.archs()
        run_device(self.device)
        if self.amp == "fp16" and not self.device.startswith("cuda"):
            raise ValueError("--amp fp16 needs a CUDA device; use --amp bf16 on CPU")


def run_device(name: str, local_rank: int = 0) -> torch.device:
    """The torch device of ``--device name`` (under torchrun, ``cuda`` means this rank's GPU); a clear error if unusable."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device must be a torch device such as cpu, cuda or cuda:1, got {name!r}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: no CUDA GPU is visible here (torch.cuda.is_available() is False)")
        index = local_rank if device.index is None else device.index
        if index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: there are only {torch.cuda.device_count()} CUDA device(s)")
        return torch.device("cuda", index)
    return device


def _progress(iterable, quiet: bool, **kwargs):
    from tqdm import tqdm

    return tqdm(iterable, disable=quiet or not sys.stderr.isatty(), leave=False, **kwargs)


class Placement:
    """The one place where the engine moves tensors to the run's device and reads values back.

    Batches arrive from the loader as uint8 images (B, C, H, W) and int64 labels (B,) in pinned host
    memory; :meth:`batch` copies them without blocking, converts and normalises the images on the
    device, and applies the memory format. :meth:`read` is the only host read of the run (once per
    epoch). Tests run the engine on the ``meta`` device, where any tensor that missed this class
    meets a device tensor and fails, as it would on a GPU.
    """

    def __init__(self, device: torch.device, mean: tuple[float, ...], std: tuple[float, ...],
                 channels_last: bool = False, amp: str = "none") -> None:
        self.device = device
        # x / 255 normalised = x * scale - shift, one fused multiply-add on the device
        self.scale = (1.0 / (255.0 * torch.tensor(std))).view(1, -1, 1, 1).to(device)
        self.neg_shift = (-torch.tensor(mean) / torch.tensor(std)).view(1, -1, 1, 1).to(device)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)

    def module(self, module: nn.Module) -> nn.Module:
        return module.to(self.device, memory_format=self.memory_format)

    def images(self, images: Tensor) -> Tensor:
        """uint8 (or [0, 1] float) host images -> normalised float32 images on the device."""
        # the memory format is applied to the small uint8 batch; the float ops below keep it
        images = images.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)
        scale = self.scale if images.dtype == torch.uint8 else self.scale * 255.0
        normalised = torch.addcmul(self.neg_shift, images.float(), scale)
        return normalised.contiguous(memory_format=self.memory_format)  # a no-op when the layout was kept

    def batch(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        return self.images(images), labels.to(self.device, non_blocking=True)

    def generator(self, seed: int) -> torch.Generator:
        """A seeded generator for the mixer's draws: on the GPU for a CUDA run (no per-step transfer)."""
        return torch.Generator(device=self.device if self.device.type == "cuda" else "cpu").manual_seed(seed)

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    @staticmethod
    def read(values: dict[str, Tensor]) -> dict[str, list[float]]:
        """Host values of device tensors (one sync for all of them)."""
        names = list(values)
        flat = torch.cat([values[name].detach().double().flatten() for name in names]).tolist()
        out, start = {}, 0
        for name in names:
            count = values[name].numel()
            out[name], start = flat[start : start + count], start + count
        return out


def load_data(config: RunConfig):
    """(train set, test set, num classes, normalisation mean, std); items are (uint8 image, label)."""
    if config.dataset == "synthetic":
        spec = SyntheticSpec(config.classes, config.train_per_class, config.test_per_class, config.image_size, config.seed)
        train, test, classes = synthetic_splits(spec)
        return Augmented(train, shift_crop), Augmented(test), classes, (0.5,) * 3, (0.25,) * 3
    import torchvision.transforms as T

    train, test, classes = file_splits(config.dataset, config.data_root)
    warp = (config.resize, config.resize)
    train_transform = T.Compose([T.Resize(warp), T.RandomCrop(config.image_size), T.RandomHorizontalFlip(), T.PILToTensor()])
    test_transform = T.Compose([T.Resize(warp), T.CenterCrop(config.image_size), T.PILToTensor()])
    return Augmented(train, train_transform), Augmented(test, test_transform), classes, IMAGENET_MEAN, IMAGENET_STD


def make_loader(dataset, config: RunConfig, train: bool, device: torch.device, rank: int = 0, world: int = 1) -> DataLoader:
    """A loader built once per run: persistent workers, prefetching, pinned memory for a GPU. Call
    ``loader.sampler.set_epoch(epoch)`` before each epoch."""
    sampler = EpochOrder(len(dataset), shuffle=train, seed=config.seed, rank=rank, world=world)
    workers = config.workers
    return DataLoader(dataset, config.batch_size, sampler=sampler, num_workers=workers, drop_last=train,
                      pin_memory=device.type == "cuda", persistent_workers=workers > 0,
                      prefetch_factor=4 if workers > 0 else None,
                      generator=torch.Generator().manual_seed(config.seed))  # leaves the global RNG alone


def epoch_line(record: dict, epochs: int) -> str:
    """One readable line per epoch: losses, top-1 of every member and the ensemble, speed."""
    losses = " ".join(f"{k[len('loss_'):]} {v:.3f}" for k, v in record.items() if k.startswith("loss_"))
    top1 = " ".join(f"{k[len('top1_'):]} {v:.1f}" for k, v in record.items() if k.startswith("top1_"))
    skipped = f"  {record['skipped_steps']} steps skipped (fp16 overflow)" if record.get("skipped_steps") else ""
    return (f"epoch {record['epoch']}/{epochs}  loss {losses}  top-1 {top1}  "
            f"{record['images_per_s']:.0f} img/s  {record['epoch_s']:.0f} s{skipped}")


class RunDirExists(FileExistsError):
    """A run dir that already holds a run and was not asked to be resumed."""


def _write_atomic(path: Path, payload: object) -> None:
    partial = path.with_name(path.name + ".partial")
    torch.save(payload, partial)
    os.replace(partial, path)


def _rng_states() -> dict:
    """Every random stream of the process, as tensors and plain Python values (a weights_only load reads them)."""
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [kind, keys.tolist(), position, has_gauss, gauss],
        "python": random.getstate(),
    }


def _set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    if states["cuda"]:
        torch.cuda.set_rng_state_all(states["cuda"])
    kind, keys, position, has_gauss, gauss = states["numpy"]  # older checkpoints hold an array of keys
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), position, has_gauss, gauss))
    random.setstate(states["python"])


def _distributed(device_name: str) -> tuple[int, int, int]:
    """(rank, world size, local rank); under torchrun, initialises the process group with the backend
    of the run's device (nccl for CUDA, gloo otherwise), whatever else the machine has."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device_name.startswith("cuda") else "gloo")
    rank = dist.get_rank() if world > 1 else 0
    return rank, world, int(os.environ.get("LOCAL_RANK", "0"))


@dataclass
class Run:
    """What a training step needs, built once from a :class:`RunConfig` by :func:`build_run`."""

    members: list[nn.Module]  # the user's models (one unless cekd)
    net: nn.Module  # the CollaborativeEnsemble, or the single model
    model: nn.Module  # what is called: ``net``, or ``net`` inside DistributedDataParallel
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    place: Placement
    mixer: MixingAugmenter | None  # None for the baseline
    tap: FeatureTap | None  # on member 0, for SnapMix's CAMs
    criterion: CEKDLoss | SoftTargetCrossEntropy  # CEKD, or soft-target CE of the single model
    clip_grad: float | None


def build_run(config: RunConfig, num_classes: int, place: Placement, steps_per_epoch: int, rank: int = 0,
              world: int = 1) -> Run:
    """Models on the device, optimizer (10x head lr as the paper), schedule, mixer, CAM tap and loss of a run."""
    models = [build_model(arch, num_classes, config.pretrained, config.image_size) for arch in config.archs()]
    net = place.module(CollaborativeEnsemble(models, config.combine) if config.method == "cekd" else models[0])
    if config.compile:
        for model in models:
            model.compile()
    device = place.device
    model = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else net
    heads = {id(p) for member in models for p in head_parameters(member)}
    groups = [{"params": [p for p in net.parameters() if id(p) not in heads], "lr": config.lr},
              {"params": [p for p in net.parameters() if id(p) in heads], "lr": config.head_lr or config.lr}]
    optimizer = torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    if config.schedule == "onecycle":
        scheduler: torch.optim.lr_scheduler.LRScheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=[g["lr"] for g in groups], total_steps=steps_per_epoch * config.epochs)
    else:
        boundaries = [m * steps_per_epoch for m in config.milestones]
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.1 ** sum(s >= b for b in boundaries))
    mixer = None
    if config.mixing is not None:
        mixer = MixingAugmenter(config.mixing, num_classes, mix_alpha=config.mix_alpha, p=config.mix_p,
                                same_on_batch=config.same_on_batch, generator=place.generator(config.seed * 7919 + rank))
    criterion: CEKDLoss | SoftTargetCrossEntropy = SoftTargetCrossEntropy()
    if config.method == "cekd":
        criterion = CEKDLoss(config.temperature, 0.0 if config.no_cross else config.alpha,
                             0.0 if config.no_ensemble else config.beta, config.rampup_epochs * steps_per_epoch,
                             supervise_ensemble=not config.no_ensemble)
    return Run(models, net, model, optimizer, scheduler, torch.amp.GradScaler(device.type, enabled=config.amp == "fp16"),
               place, mixer, FeatureTap(models[0]) if config.mixing == "snapmix" else None, criterion, config.clip_grad)


def run_step(run: Run, images: Tensor, labels: Tensor) -> dict[str, Tensor]:
    """One optimizer step on a device batch (normalised images (B, C, H, W), labels (B,)): the library's
    :func:`~cekd_losses.train_step` (CAMs, mixing, forward, loss) under autocast, then backward,
    clipping, optimizer and schedule. Returns the detached loss terms and the gradient norm before
    clipping, on the device (no host sync)."""
    with run.place.autocast():
        out = train_step(run.model, run.criterion, images, labels, mixer=run.mixer, tap=run.tap,
                         step=run.scheduler.last_epoch)
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(out.loss).backward()
    run.scaler.unscale_(run.optimizer)
    grad_norm = nn.utils.clip_grad_norm_(run.net.parameters(), run.clip_grad or math.inf)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.scheduler.step()
    return {**{name: value.detach().float() for name, value in out.parts.items()}, "grad_norm": grad_norm.detach().float()}


def save_checkpoint(run: Run, path: Path, epoch: int, history: list[dict]) -> None:
    """Everything a resume needs after ``epoch`` epochs, written atomically (a kill mid-write leaves the
    previous checkpoint whole)."""
    _write_atomic(path, {
        "epoch": epoch, "model": run.net.state_dict(), "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(), "scaler": run.scaler.state_dict(), "rng": _rng_states(),
        "mixer_generator": run.mixer.generator.get_state() if run.mixer is not None and run.mixer.generator else None,
        "history": history,
    })


# Checkpoints written before they held plain types keep NumPy's RNG state as an array: rebuilding an
# array runs no code, so a safe load may accept these globals.
_OLD_CHECKPOINT_GLOBALS = [np.ndarray, np.dtype, type(np.dtype(np.uint32)), np.zeros(1).__reduce__()[0]]


def read_checkpoint(path: Path, flag: str) -> dict:
    """A checkpoint's contents, loaded with ``weights_only=True`` (tensors and plain types only: a
    file that holds any other pickled object is refused by name, and none of its code runs)."""
    try:
        with torch.serialization.safe_globals(_OLD_CHECKPOINT_GLOBALS):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated, corrupted or foreign files raise many types
        objects = list(dict.fromkeys(re.findall(r"GLOBAL (\S+)", str(error))))
        if objects:
            raise ValueError(f"{flag} {path.parent}: {path} holds pickled objects ({', '.join(objects)}) that a safe "
                             "load refuses; it was not written by this program: do not resume it") from None
        raise ValueError(f"{flag} {path.parent}: {path} is not a readable checkpoint ({type(error).__name__}); "
                         "it is written atomically, so it was damaged after the run: delete it to restart from "
                         "epoch 0") from None
    if not isinstance(state, dict) or not {"epoch", "model", "optimizer", "history"} <= set(state):
        raise ValueError(f"{flag} {path.parent}: {path} is not a checkpoint of this program (no epoch, model, "
                         "optimizer and history)")
    return state


def load_checkpoint(run: Run, path: Path) -> tuple[int, list[dict]]:
    """Restore ``run`` and the RNGs from :func:`save_checkpoint`'s file; returns (epochs done, history)."""
    state = read_checkpoint(path, flag="--resume")
    run.net.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    if state["scaler"]:  # empty when saved without fp16 (a resume may switch --amp)
        run.scaler.load_state_dict(state["scaler"])
    if run.mixer is not None and run.mixer.generator is not None:
        run.mixer.generator.set_state(state["mixer_generator"])
    _set_rng_states(state["rng"])
    return state["epoch"], state["history"]


RUN_FILES = {"config.json", "metrics.jsonl", "checkpoint.pt", "checkpoint.pt.partial", "cams.png"}
# what --resume may change; the rest is the run. --clip-grad and --amp let a diverged run go on from its last good epoch
RESUME_CHANGES = ("epochs", "workers", "device", "quiet", "clip_grad", "amp")
# (--device only within its kind: cuda:0 -> cuda:1, not cuda -> cpu)


def _read_config(run_dir: Path) -> dict:
    path = run_dir / "config.json"
    try:
        saved = json.loads(path.read_text())
        RunConfig(**saved)
    except FileNotFoundError:
        raise ValueError(f"--resume {run_dir}: no run there (no config.json)") from None
    except (ValueError, TypeError) as error:
        raise ValueError(f"--resume {run_dir}: {path} is not a run config ({error}); start a new run with another "
                         "--run-dir") from None
    return saved


def resumed_config(run_dir: str | Path, **changes) -> RunConfig:
    """The config saved in ``run_dir`` with the few values a resume may change (see :func:`apply_resume_changes`)."""
    run_dir = Path(run_dir)
    return apply_resume_changes(RunConfig(**_read_config(run_dir)), changes, run_dir / "config.json")


def apply_resume_changes(saved: RunConfig, changes: dict, source: Path) -> RunConfig:
    """``saved`` with ``changes`` of the fields in ``RESUME_CHANGES`` only; ``epochs`` may only grow, and
    only with the multistep schedule (a one-cycle schedule is fixed by its length)."""
    refused = sorted(set(changes) - set(RESUME_CHANGES))
    if refused:
        raise ValueError(f"--resume continues the run as saved in {source}; it cannot change "
                         + ", ".join("--" + name.replace("_", "-") for name in refused)
                         + f" (it may change {', '.join('--' + n for n in RESUME_CHANGES)})")
    device = changes.get("device", saved.device)
    if device.split(":")[0] != saved.device.split(":")[0]:
        raise ValueError(f"--device {device}: this run trains on {saved.device} and resumes on that kind of device "
                         "(its mixer's random stream lives there); another index of it is fine")
    epochs = changes.get("epochs", saved.epochs)
    if epochs < saved.epochs or (epochs != saved.epochs and saved.schedule == "onecycle"):
        raise ValueError(f"--epochs {epochs}: a resumed run keeps its {saved.epochs} epochs, or extends them with "
                         f"the multistep schedule only (this run's schedule: {saved.schedule})")
    return replace(saved, **changes)


def _prepare_run_dir(run_dir: Path, resume: bool) -> None:
    """A new run may use an empty dir, or one whose run never finished an epoch (no checkpoint.pt: a
    run that failed or was killed before its first checkpoint); anything else is refused."""
    if resume and not (run_dir / "checkpoint.pt").exists() and (run_dir / "weights.pt").exists():
        raise ValueError(f"--resume {run_dir}: the run finished and kept only weights.pt (--keep weights); "
                         "nothing to resume")
    if resume or not run_dir.exists():
        return
    if (run_dir / "checkpoint.pt").exists() or (run_dir / "weights.pt").exists():
        raise RunDirExists(f"run dir {run_dir} already holds a run; pass --resume {run_dir} to continue it, "
                           "or choose another --run-dir")
    foreign = sorted(p.name for p in run_dir.iterdir() if p.name not in RUN_FILES)
    if foreign:
        raise RunDirExists(f"run dir {run_dir} holds other files ({', '.join(foreign[:3])}); choose another --run-dir")


HEARTBEAT_S = 30.0  # without a terminal (a log file), a progress line once an epoch runs this long unreported


class Diverged(RuntimeError):
    """An epoch whose losses, gradients or weights went non-finite: the run stopped before checkpointing it."""


def describe_run(config: RunConfig, run_dir: Path, train_size: int, test_size: int, num_classes: int) -> str:
    """The run's first line: what is trained, on which data, on which device, and where the results go."""
    archs = config.archs()
    models = f"{len(archs)} x {archs[0]}" if len(set(archs)) == 1 else " + ".join(archs)
    what = {"baseline": "baseline (no mixing)", "cekd": f"cekd over {config.mix}"}.get(config.method, config.method)
    data = "synthetic" if config.dataset == "synthetic" else f"{config.dataset} ({config.data_root})"
    return (f"training {what}: {models}, {data} {num_classes} classes, {train_size} train / {test_size} test images "
            f"at {config.image_size} px, {config.device}, {config.epochs} epochs of batch {config.batch_size} "
            f"-> {run_dir}")


@dataclass
class EpochTotals:
    """One epoch's training sums, kept on the device and read once at its end (no per-step host sync).

    A step counts where its loss terms and gradient norm are all finite; the others are skipped steps
    (with fp16, the GradScaler skipped them; otherwise the run diverged)."""

    names: list[str]  # the loss terms, then "grad_norm"
    sums: Tensor  # (P,): per-sample sums of the loss terms, per-step sum of the gradient norm, over counted steps
    counted: Tensor  # (): steps counted
    nonfinite: Tensor  # (P,) bool: the term was non-finite in some step
    steps: int = 0
    seen: int = 0


def train_one_epoch(run: Run, loader: DataLoader, epoch: int, config: RunConfig, heartbeat: Callable[[str], None]) -> EpochTotals:
    """One pass over ``loader`` (the sampler already set to ``epoch``); ``heartbeat`` gets a progress
    line it may print."""
    run.model.train()
    started = time.perf_counter()
    totals: EpochTotals | None = None
    for images, labels in _progress(loader, config.quiet, desc=f"epoch {epoch + 1}"):
        parts = run_step(run, *run.place.batch(images, labels))
        values = torch.stack(list(parts.values()))
        finite = torch.isfinite(values)
        counted = finite.all()
        if totals is None:  # per-sample weights of the loss terms (the last batch of an epoch is dropped: B is fixed)
            scale = torch.full_like(values, float(labels.shape[0]))
            scale[-1] = 1.0
            totals = EpochTotals(list(parts), torch.zeros_like(values), torch.zeros_like(values[0]), ~finite)
        totals.sums = totals.sums + torch.where(counted, values * scale, 0.0)
        totals.counted = totals.counted + counted
        totals.nonfinite = totals.nonfinite | ~finite
        totals.steps += 1
        totals.seen += labels.shape[0]
        heartbeat(f"  epoch {epoch + 1}/{config.epochs}: {totals.steps}/{len(loader)} batches, "
                  f"{time.perf_counter() - started:.0f} s")
    assert totals is not None, "the loader yields at least one batch (checked when it is built)"
    return totals


def finite_weights(module: nn.Module) -> Tensor:
    """() bool on the device: every parameter and buffer of ``module`` is finite."""
    tensors = [t for t in [*module.parameters(), *module.buffers()] if t.is_floating_point()]
    return torch.stack([torch.isfinite(t).all() for t in tensors]).all()


def train(config: RunConfig, run_dir: str | Path, resume: bool = False) -> dict:
    """Run (or resume) one training run; returns its final epoch record. Only rank 0 writes.

    To resume, pass :func:`resumed_config` of the run dir. A resumed run dir without a checkpoint
    (killed before its first epoch ended) starts again from epoch 0. An epoch whose loss, gradient or
    weights go non-finite raises :class:`Diverged` on every rank, after recording it in metrics.jsonl
    and before any checkpoint of it: the last good checkpoint stays."""
    run_dir = Path(run_dir)
    config.validate()
    rank, world, local_rank = _distributed(config.device)
    if rank == 0:
        _prepare_run_dir(run_dir, resume)
    device = run_device(config.device, local_rank)
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    np.random.seed(config.seed)

    train_set, test_set, num_classes, mean, std = load_data(config)
    speaks = rank == 0 and not config.quiet
    if speaks:
        _print_line(describe_run(config, run_dir, len(train_set), len(test_set), num_classes))
    place = Placement(device, mean, std, config.channels_last, config.amp)
    train_loader = make_loader(train_set, config, True, device, rank, world)
    test_loader = make_loader(test_set, config, False, device, rank, world)
    if len(train_loader) == 0:
        raise ValueError(f"--batch-size {config.batch_size} is larger than this rank's {len(train_loader.sampler)} "
                         "training images: no full batch to train on")
    run = build_run(config, num_classes, place, len(train_loader), rank, world)

    history: list[dict] = []
    start_epoch = 0
    checkpoint_path = run_dir / "checkpoint.pt"
    if resume and checkpoint_path.exists():
        start_epoch, history = load_checkpoint(run, checkpoint_path)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(config.saved(), indent=2))
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(record) + "\n" for record in history))

    last_line = time.perf_counter()

    def heartbeat(line: str) -> None:  # progress in a log without a terminal, where tqdm's bars are off
        nonlocal last_line
        if speaks and not sys.stderr.isatty() and time.perf_counter() - last_line >= HEARTBEAT_S:
            _print_line(line)
            last_line = time.perf_counter()

    for epoch in _progress(range(start_epoch, config.epochs), config.quiet, desc="epochs", initial=start_epoch, total=config.epochs):
        train_loader.sampler.set_epoch(epoch)
        start = time.perf_counter()
        totals = train_one_epoch(run, train_loader, epoch, config, heartbeat)
        train_time = time.perf_counter() - start
        top1 = evaluate(run.model, test_loader, place, world)
        # what every rank must agree on: non-finite terms, skipped steps, non-finite weights
        verdict = torch.cat([totals.nonfinite.double(), (totals.steps - totals.counted)[None].double(),
                             (~finite_weights(run.net))[None].double()])
        if world > 1:
            dist.all_reduce(verdict)
        read = place.read({"sums": totals.sums, "counted": totals.counted, "verdict": verdict})
        terms = len(totals.names)
        bad = [name for name, flag in zip(totals.names, read["verdict"][:terms]) if flag]
        skipped, bad_weights = int(read["verdict"][terms]), read["verdict"][terms + 1] > 0
        counted = read["counted"][0]
        record: dict = {"epoch": epoch + 1}
        if bad_weights or (skipped and config.amp != "fp16") or counted == 0:
            record.update(diverged=bad or ["weights"], epoch_s=time.perf_counter() - start)
            if rank == 0:
                with open(run_dir / "metrics.jsonl", "a") as log:
                    log.write(json.dumps(record) + "\n")
            raise Diverged(_divergence_message(epoch + 1, bad, config, run_dir))
        per_sample = counted * config.batch_size
        record.update({
            **{f"loss_{k}": v / per_sample for k, v in zip(totals.names[:-1], read["sums"])},
            "grad_norm": read["sums"][-1] / counted,
            **({"skipped_steps": skipped} if config.amp == "fp16" else {}),
            **{f"top1_{k}": v for k, v in top1.items()}, "lr": run.optimizer.param_groups[0]["lr"],
            "images_per_s": totals.seen * world / train_time, "epoch_s": time.perf_counter() - start,
        })
        history.append(record)
        if rank == 0:
            with open(run_dir / "metrics.jsonl", "a") as log:
                log.write(json.dumps(record) + "\n")
            save_checkpoint(run, checkpoint_path, epoch + 1, history)
        if speaks:
            _print_line(epoch_line(record, config.epochs))
            last_line = time.perf_counter()
    if rank == 0 and config.visualize_cams:
        from .cams import save_cam_figure

        save_cam_figure(run.members, test_set, place, config.visualize_cams, run_dir / "cams.png")
    if rank == 0 and config.keep == "weights" and history and history[-1]["epoch"] == config.epochs:
        _write_atomic(run_dir / "weights.pt", run.net.state_dict())
        checkpoint_path.unlink(missing_ok=True)
    if run.tap is not None:
        run.tap.remove()
    return history[-1] if history else {}


def _divergence_message(epoch: int, bad: list[str], config: RunConfig, run_dir: Path) -> str:
    """One line: which epoch and term went non-finite, what was kept, how to go on."""
    losses = [name for name in bad if name != "grad_norm"]
    if losses:
        what = f"loss {', '.join(losses)} went non-finite"
    else:
        what = f"the {'gradient' if bad else 'weights'} went non-finite"
    if config.amp == "fp16":
        change = "--amp bf16"
    elif config.clip_grad is None:
        change = "--clip-grad 5"
    else:
        change = ""
    if epoch == 1:
        return f"epoch 1 diverged: {what}; no epoch finished: start again with a lower --lr" + (
            f" or {change}" if change else "")
    if change:
        return (f"epoch {epoch} diverged: {what}; checkpoint.pt of epoch {epoch - 1} is kept: --resume {run_dir} "
                f"{change} continues from it, or start again with a lower --lr")
    return (f"epoch {epoch} diverged: {what}; checkpoint.pt of epoch {epoch - 1} is kept in {run_dir}: start "
            "again with a lower --lr (a resume keeps the run's learning rate)")


def _print_line(line: str) -> None:
    """A line that stays on screen above the progress bars (plain print when stdout is not a terminal)."""
    from tqdm import tqdm

    tqdm.write(line, file=sys.stdout)
    sys.stdout.flush()


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, place: Placement, world: int = 1) -> dict[str, float]:
    """Top-1 (%) of every member and of the ensemble (or of the single model), reduced across ranks.

    ``model`` is the trained module (a :class:`CollaborativeEnsemble`, possibly inside DDP, or a
    classifier); counts stay on the device until the one read at the end."""
    model.eval()
    correct: Tensor | None = None
    total = torch.zeros((), dtype=torch.float64, device=place.device)
    ensemble = None
    for images, labels in loader:
        images, labels = place.batch(images, labels)
        with place.autocast():
            output = model(images)
        ensemble = isinstance(output, tuple)
        logits = torch.cat([output.member_logits, output.ensemble_logits[None]]) if ensemble else output[None]
        hits = (logits.argmax(dim=2) == labels[None]).sum(dim=1).double()
        correct = hits if correct is None else correct + hits
        total = total + labels.shape[0]
    if correct is None:
        raise ValueError("the test set is empty: nothing to evaluate")
    counts = torch.cat([correct, total[None]])
    if world > 1:
        dist.all_reduce(counts)
    counts = place.read({"counts": counts})["counts"]
    accuracy = [100 * c / counts[-1] for c in counts[:-1]]
    names = [f"member{i}" for i in range(len(accuracy) - 1)] + ["ensemble"] if ensemble else ["model"]
    return dict(zip(names, accuracy))
