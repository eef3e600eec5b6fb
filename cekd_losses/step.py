"""train_step: the forward half of a training step (CAMs, mixing, forward, loss), to call in any loop.

It stops at the loss: backward, gradient clipping, the optimizer, AMP scaling and DDP stay the
caller's, as in timm's task modules. The reproduction engine and the quickstarts use it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from . import _checks
from .cam import FeatureTap
from .ensemble import EnsembleOutput
from .mixing import MixedBatch, MixingAugmenter, replay
from .objective import CEKDLoss
from .offline import CCDLoss, KDLoss
from .online import OnlineDistillationLoss, OnlineOutput
from .views import PeerViews

__all__ = ["StepOutput", "train_step"]

Output = EnsembleOutput | OnlineOutput | Tensor


class StepOutput(NamedTuple):
    """What :func:`train_step` returns.

    Attributes:
        loss: scalar loss to call ``backward()`` on.
        parts: named loss terms, not detached (``{"total", "supervised", "cross", "ensemble"}`` for
            :class:`~cekd_losses.CEKDLoss`, the method's terms for :class:`~cekd_losses.OnlineDistillationLoss`,
            ``{"total", "supervised", "distillation"}`` for :class:`~cekd_losses.KDLoss` and
            :class:`~cekd_losses.CCDLoss`, ``{"total"}`` otherwise).
        output: the model's output: an :class:`~cekd_losses.EnsembleOutput` or (B, K) logits; with
            :class:`~cekd_losses.CCDLoss`, (2B, K): the clean images' logits, then their mixes'.
        batch: the :class:`~cekd_losses.MixedBatch` the model saw (the first view's with ``views``), or None
            without a mixer.
    """

    loss: Tensor
    parts: dict[str, Tensor]
    output: Output
    batch: MixedBatch | None


def train_step(
    model: nn.Module,
    criterion: CEKDLoss | OnlineDistillationLoss | KDLoss | Callable[[Tensor, Tensor], Tensor],
    images: Tensor,
    labels: Tensor,
    *,
    mixer: MixingAugmenter | None = None,
    tap: FeatureTap | None = None,
    step: int | None = None,
    eval_mode_cams: bool = False,
    views: PeerViews | None = None,
    mix_off_step: int | None = None,
    teacher: nn.Module | None = None,
) -> StepOutput:
    """Mix a batch, run the model on it (and a fixed ``teacher`` beside it) and compute the loss.

    SnapMix needs the clean images' CAMs: pass the ``tap`` of one member (or of the single model);
    they come from one no-grad forward, in the model's current mode unless ``eval_mode_cams`` (see
    :meth:`FeatureTap.cams <cekd_losses.FeatureTap.cams>`).

    Args:
        model: a :class:`~cekd_losses.CollaborativeEnsemble` (possibly inside DDP), a network returning an
            :class:`~cekd_losses.OnlineOutput`, or a classifier.
        criterion: :class:`~cekd_losses.CEKDLoss` or :class:`~cekd_losses.OnlineDistillationLoss` (given
            ``step`` for the ramp-up; the model then returns an :class:`~cekd_losses.EnsembleOutput` or an
            :class:`~cekd_losses.OnlineOutput`), :class:`~cekd_losses.KDLoss` or :class:`~cekd_losses.CCDLoss`
            (with a ``teacher``), or any ``loss(output, target)`` such as :class:`~cekd_losses.SoftTargetCrossEntropy`.
        images: (B, C, H, W) floating images on the model's device.
        labels: (B,) class ids or (B, K) soft targets.
        mixer: optional :class:`~cekd_losses.MixingAugmenter`; without it the clean batch is used.
        tap: :class:`~cekd_losses.FeatureTap` for SnapMix's CAMs (required for snapmix only).
        step: optimizer steps taken so far, for :class:`~cekd_losses.CEKDLoss`'s ramp-up.
        eval_mode_cams: run the CAM forward in eval mode (BatchNorm statistics left alone).
        views: optional :class:`~cekd_losses.PeerViews`: the model gets a list of N views of the batch (one per
            member), the first mixed (its CAMs for SnapMix) and the same mix replayed on the others
            (:func:`~cekd_losses.replay`), so every view shares the targets.
        mix_off_step: stop mixing from this optimizer step on (needs ``step``): the mixer's ``enabled`` is set
            to ``step < mix_off_step``, so the last steps train on clean images with the mixer's (smoothed)
            targets and no CAM forward. timm's ``--mixup-off-epoch E`` is ``E * steps_per_epoch``.
        teacher: a fixed teacher for offline distillation (``criterion`` a :class:`~cekd_losses.KDLoss` or
            :class:`~cekd_losses.CCDLoss`), any module returning (B, K) logits or an
            :class:`~cekd_losses.EnsembleOutput` (its ensemble's logits teach). It is put in eval mode and run
            without gradient on the images the student sees: the mixed batch (KD), or the clean batch and its
            mixes (CCD, whose student sees both, 2B images; the clean half's targets are the mixer's). With
            SnapMix and a ``tap`` on the teacher, its CAM forward on the clean images gives CCD's clean teacher
            logits too (one forward for both).

    Returns:
        :class:`StepOutput` (loss, named parts, model output, mixed batch).

    Example:
        >>> import torchvision
        >>> from cekd_losses import CollaborativeEnsemble
        >>> ensemble = CollaborativeEnsemble([torchvision.models.resnet18(num_classes=5) for _ in range(2)])
        >>> mixer = MixingAugmenter("cutmix", 5, generator=torch.Generator().manual_seed(0))
        >>> out = train_step(ensemble, CEKDLoss(), torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 2, 3]), mixer=mixer)
        >>> out.loss.backward()
        >>> sorted(out.parts), out.batch.targets.shape
        (['cross', 'ensemble', 'supervised', 'total'], torch.Size([4, 5]))
    """
    _check_mixing(mixer, tap, step, mix_off_step)
    if teacher is not None:
        if views is not None:
            raise ValueError("`views` are for online peers; a `teacher` distils into one student: drop `views`")
        return _distilled(model, criterion, teacher, images, labels, mixer, tap, eval_mode_cams)
    batch = None
    peers = list(views(images).unbind(0)) if views is not None else [images]
    inputs, targets = peers, labels
    if mixer is not None:
        cams = tap.cams(peers[0], labels, eval_mode=eval_mode_cams) if tap is not None and mixer.enabled else None
        batch = mixer(peers[0], labels, cams)
        inputs, targets = [batch.images, *(replay(batch, view) for view in peers[1:])], batch.targets
    output = model(inputs if views is not None else inputs[0])
    if isinstance(criterion, (KDLoss, CCDLoss)):
        raise ValueError(f"{type(criterion).__name__} distils a fixed teacher: pass `teacher=`")
    if isinstance(criterion, (CEKDLoss, OnlineDistillationLoss)):
        parts = criterion.components(output, targets, step=step)
    else:
        parts = {"total": criterion(output, targets)}
    return StepOutput(parts["total"], parts, output, batch)


def _check_mixing(
    mixer: MixingAugmenter | None, tap: FeatureTap | None, step: int | None, mix_off_step: int | None
) -> None:
    """A tap exactly for SnapMix; ``mix_off_step`` sets the mixer's ``enabled`` to ``step < mix_off_step``."""
    snapmix = mixer is not None and "snapmix" in mixer.methods
    if mix_off_step is not None:
        if mixer is None or step is None:
            raise ValueError(f"`mix_off_step` needs a `mixer` and the `step`, got mixer={mixer!r}, step={step!r}")
        mixer.enabled = step < mix_off_step
    if snapmix and tap is None:
        raise ValueError("`tap` is required with a snapmix mixer: pass tap=FeatureTap(<a member or the model>)")
    if tap is not None and not snapmix:
        raise ValueError("`tap` is used by a snapmix mixer only; drop it or use MixingAugmenter('snapmix', ...)")


def _teacher_logits(output: Any, classes: int) -> Tensor:
    """A teacher's (B, K) logits from its output (an ensemble's combined logits), of the student's classes."""
    logits = _checks.check_logits(
        "teacher(images)", output.ensemble_logits if isinstance(output, EnsembleOutput) else output
    )
    if logits.shape[1] != classes:
        raise ValueError(
            f"`teacher` must score the student's {classes} classes, got logits of {logits.shape[1]} classes"
        )
    return logits


def _distilled(
    model: nn.Module,
    criterion: object,
    teacher: nn.Module,
    images: Tensor,
    labels: Tensor,
    mixer: MixingAugmenter | None,
    tap: FeatureTap | None,
    eval_mode_cams: bool,
) -> StepOutput:
    """Offline distillation's step: KD on the mixed batch, CCD on the clean batch and its mixes."""
    if not isinstance(criterion, KDLoss):
        raise TypeError(f"a `teacher` needs criterion=KDLoss() or CCDLoss(), got {type(criterion).__name__}")
    paired = isinstance(criterion, CCDLoss)
    if paired and mixer is None:
        raise ValueError("CCDLoss pairs each image with its mix: pass a `mixer`")
    teacher.eval()
    clean_teacher, cams, batch = None, None, None
    if mixer is not None:
        if tap is not None and mixer.enabled:  # SnapMix: with a tap on the teacher, its clean logits come along
            clean_teacher, cams = tap.logits_and_cams(images, labels, eval_mode=eval_mode_cams)
            clean_teacher = clean_teacher if tap.model is teacher and paired else None
        batch = mixer(images, labels, cams)
    mixed, targets = (batch.images, batch.targets) if batch is not None else (images, labels)
    inputs = torch.cat([images, mixed]) if paired else mixed
    if paired:  # the clean half's targets as the mixer makes them (its label smoothing too)
        assert mixer is not None  # checked above: CCD pairs each image with its mix
        targets = torch.cat([mixer.soft_targets(labels, images.shape[0]), targets])
    output = _checks.check_logits("model(images)", model(inputs))
    with torch.no_grad():
        taught = _teacher_logits(teacher(mixed if clean_teacher is not None else inputs), output.shape[1])
        if clean_teacher is not None:
            taught = torch.cat([_teacher_logits(clean_teacher, output.shape[1]), taught])
    parts = criterion.components(output, taught, targets)
    return StepOutput(parts["total"], parts, output, batch)
