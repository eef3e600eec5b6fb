"""What a training step needs, built once per run: the network of the method, optimizer, schedule, mixer and loss."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from cekd_losses import (
    CCDLoss,
    CEKDLoss,
    FeatureTap,
    KDLoss,
    MixingAugmenter,
    OnlineDistillationLoss,
    PeerViews,
    SoftTargetCrossEntropy,
)

from .config import OFFLINE, RunConfig
from .device import Placement
from .methods import ONLINE_METHODS, Peers, cam_tap, cekd_ensemble, peer_views
from .models import build_model, head_parameters
from .teacher import load_teacher

MIXER_SEED_STRIDE = 7919  # a prime: rank r of seed s draws its mixing from seed s * stride + r, apart from others
VIEW_SEED_OFFSET = 3571  # PCL's per-peer views draw from seed s * stride + offset + r, apart from the mixing
Criterion = CEKDLoss | OnlineDistillationLoss | KDLoss | SoftTargetCrossEntropy


@dataclass
class Run:
    """What a training step needs, built once from a :class:`RunConfig` by :func:`build_run`."""

    members: list[nn.Module]  # the user's models (one unless an ensemble or an online method)
    net: nn.Module  # CEKD's CollaborativeEnsemble (maybe after a trunk), an online method's Peers, or one model
    model: nn.Module  # what is called: ``net``, or ``net`` inside DistributedDataParallel
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    place: Placement
    mixer: MixingAugmenter | None  # None for the baseline
    tap: FeatureTap | None  # on member 0, for SnapMix's CAMs
    criterion: Criterion  # CEKD, an online method's objective, or soft-target CE of the single model
    clip_grad: float | None
    after_step: Callable[[], None] | None = None  # after each optimizer step (PCL's temporal means)
    views: PeerViews | None = None  # PCL on whole members: one view of the batch per peer
    mix_off_step: int | None = None  # --mix-off-epoch in optimizer steps: clean batches from this step on
    teacher: nn.Module | None = None  # kd, ccd: the --teacher run's network, frozen


def build_run(
    config: RunConfig,
    num_classes: int,
    place: Placement,
    steps_per_epoch: int,
    rank: int = 0,
    world: int = 1,
    train_size: int = 0,
) -> Run:
    """Models on the device, optimizer (10x head lr as the paper), schedule, mixer, CAM tap and loss of a run."""
    models = [build_model(arch, num_classes, config.pretrained, config.image_size) for arch in config.archs()]
    net = place.module(_network(config, models, num_classes, train_size))
    if config.compile:
        for model in models:
            model.compile()
    device = place.device
    model = (
        nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
        if world > 1
        else net
    )
    optimizer = _optimizer(config, net, models)
    mixer = None
    if config.mixer_methods:
        mixer = MixingAugmenter(
            list(config.mixer_methods),
            num_classes,
            mix_alpha=config.mixer_alpha,
            p=config.mix_p,
            method_p=config.method_p,
            same_on_batch=config.same_on_batch,
            generator=place.generator(config.seed * MIXER_SEED_STRIDE + rank),
        )
    return Run(
        models,
        net,
        model,
        optimizer,
        _scheduler(config, optimizer, steps_per_epoch),
        torch.amp.GradScaler(device.type, enabled=config.amp == "fp16"),
        place,
        mixer,
        cam_tap(net, models, config.branches_from) if "snapmix" in config.mixer_methods else None,
        _criterion(config, steps_per_epoch),
        config.clip_grad,
        net.update if isinstance(net, Peers) and config.method == "pcl" else None,
        peer_views(config, place.generator(config.seed * MIXER_SEED_STRIDE + VIEW_SEED_OFFSET + rank)),
        None if config.mix_off_epoch is None else config.mix_off_epoch * steps_per_epoch,
        load_teacher(config.teacher, config, num_classes, place) if config.method in OFFLINE else None,  # type: ignore[arg-type]
    )


def _network(config: RunConfig, models: list[nn.Module], num_classes: int, train_size: int) -> nn.Module:
    """What a step calls: CEKD's ensemble, an online method's Peers (MCL-OKD's with a memory row per training
    image), or the single model."""
    if config.method == "cekd":
        return cekd_ensemble(models, config.combine, config.branches_from)
    if config.method in ONLINE_METHODS:
        return Peers(
            config.method,
            models,
            num_classes,
            config.branches_from,
            config.image_size,
            config.mean_buffers,
            config.pcl_legacy,
            (train_size, config.nce_k) if config.method == "mcl" else None,
        )
    return models[0]


def _optimizer(config: RunConfig, net: nn.Module, models: list[nn.Module]) -> torch.optim.Optimizer:
    """SGD with the heads' learning rate in a group of their own (``--head-lr``)."""
    heads = {id(p) for member in models for p in head_parameters(member)}
    groups = [
        {"params": [p for p in net.parameters() if id(p) not in heads], "lr": config.lr},
        {"params": [p for p in net.parameters() if id(p) in heads], "lr": config.head_lr or config.lr},
    ]
    return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)


def _scheduler(
    config: RunConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """One-cycle over the run, or 10x drops after the milestones (per step either way)."""
    if config.schedule == "onecycle":
        peaks = [group["lr"] for group in optimizer.param_groups]
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=peaks, total_steps=steps_per_epoch * config.epochs)
    boundaries = [m * steps_per_epoch for m in config.milestones]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.1 ** sum(s >= b for b in boundaries))


def _criterion(config: RunConfig, steps_per_epoch: int) -> Criterion:
    """CEKD's objective with its switches, an online method's (the paper's temperature), KD's or CCD's, or
    soft-target CE."""
    rampup = config.rampup_epochs * steps_per_epoch
    if config.method == "cekd":
        return CEKDLoss(
            config.temperature,
            0.0 if config.no_cross else config.alpha,
            0.0 if config.no_ensemble else config.beta,
            rampup,
            supervise_ensemble=not config.no_ensemble,
        )
    if config.method in ONLINE_METHODS:
        ramps = config.method not in ("dml", "mcl") or config.dml_ramp  # DML's and MCL-OKD's code: no ramp
        return OnlineDistillationLoss(config.method, rampup_steps=rampup if ramps else 0)  # type: ignore[arg-type]
    if config.method in OFFLINE:  # the reference code's T = 4, alpha = beta = 0.5
        return CCDLoss() if config.method == "ccd" else KDLoss()
    return SoftTargetCrossEntropy()
