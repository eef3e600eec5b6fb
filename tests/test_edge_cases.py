"""Edge cases users meet: differentiable mixing, empty batches, masked (-inf) logits, and bad inputs
that must end in one short error naming the argument."""

from __future__ import annotations

import math

import pytest
import torch

from cekd_losses import (
    CEKDLoss,
    CrossDistillationLoss,
    FeatureTap,
    MixingAugmenter,
    distillation_kl,
    normalize_cams,
    soft_cross_entropy,
)

# ---------------------------------------------------------------- mixing is differentiable


@pytest.mark.parametrize("method", ["mixup", "cutmix", "snapmix"])
@pytest.mark.parametrize("same_on_batch", [False, True])
def test_mixing_passes_gradcheck(method, same_on_batch):
    """Gradients reach both images of every pair: gradcheck of the mixed images w.r.t. the input."""
    images = torch.rand(4, 2, 6, 5, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 1, 2, 0])
    cams = torch.rand(4, 3, 3, dtype=torch.float64) if method == "snapmix" else None

    def mixed(x: torch.Tensor) -> torch.Tensor:  # the same draws on every call (seed 4: every sample mixed)
        mixer = MixingAugmenter(method, 3, same_on_batch=same_on_batch, generator=torch.Generator().manual_seed(4))
        return mixer(x, labels, cams).images

    assert torch.autograd.gradcheck(mixed, (images,))
    mixer = MixingAugmenter(method, 3, same_on_batch=same_on_batch, generator=torch.Generator().manual_seed(4))
    batch = mixer(images, labels, cams)
    batch.images.sum().backward()
    partners = batch.partner[batch.applied]
    assert batch.applied.any() and (images.grad[partners].abs().sum(dim=(1, 2, 3)) > 0).all()


def test_mixing_without_grad_still_writes_in_place():
    """The out= fast path is kept where autograd does not need the graph: the result is correct either way."""
    images = torch.rand(4, 3, 8, 8)
    labels = torch.tensor([0, 1, 2, 3])
    mixer = lambda: MixingAugmenter("cutmix", 4, generator=torch.Generator().manual_seed(0))  # noqa: E731
    with torch.no_grad():
        plain = mixer()(images, labels).images
    tracked = mixer()(images.clone().requires_grad_(), labels).images
    assert torch.equal(plain, tracked.detach())


# ---------------------------------------------------------------- empty batches and masked classes


def test_losses_on_an_empty_batch_are_zero_not_nan():
    empty_logits, empty_target = torch.zeros(0, 5, requires_grad=True), torch.zeros(0, 5)
    assert soft_cross_entropy(empty_logits, empty_target).item() == 0.0
    assert soft_cross_entropy(empty_logits, torch.zeros(0, dtype=torch.long), "sum").item() == 0.0
    assert soft_cross_entropy(empty_logits, empty_target, "none").shape == (0,)
    assert distillation_kl(empty_logits, torch.zeros(0, 5), 3.0).item() == 0.0
    assert CrossDistillationLoss()(torch.zeros(2, 0, 5)).item() == 0.0
    loss = CEKDLoss()((torch.zeros(2, 0, 5, requires_grad=True), torch.zeros(0, 5)), empty_target)
    assert loss.item() == 0.0
    loss.backward()  # a step on no samples changes nothing


def test_masked_classes_give_the_loss_on_the_remaining_classes():
    """-inf logits on a class with zero target / zero teacher probability add nothing (were NaN)."""
    logits = torch.tensor([[1.0, 2.0, -math.inf], [0.5, -math.inf, -1.0]], requires_grad=True)
    peer = torch.tensor([[0.0, 1.0, -math.inf], [2.0, -math.inf, 0.0]])
    target = torch.tensor([[0.3, 0.7, 0.0], [1.0, 0.0, 0.0]])
    finite = [[0, 1], [0, 2]]
    ce = soft_cross_entropy(logits, target, "none")
    kd = distillation_kl(logits, peer, 2.0, "none")
    cross = CrossDistillationLoss(2.0, "none")([logits, peer])
    for row, keep in enumerate(finite):
        sub = lambda x, row=row, keep=keep: x[row : row + 1, keep]  # noqa: E731
        assert torch.allclose(ce[row], soft_cross_entropy(sub(logits), sub(target)))
        assert torch.allclose(kd[row], distillation_kl(sub(logits), sub(peer), 2.0))
        assert torch.allclose(cross[:, row], CrossDistillationLoss(2.0, "none")([sub(logits), sub(peer)])[:, 0])
    (ce.sum() + kd.sum() + cross.sum()).backward()
    assert torch.isfinite(logits.grad).all()
    # a class that carries target weight but has -inf logit: the true loss is inf, not NaN
    assert soft_cross_entropy(logits[:1], torch.tensor([[0.0, 0.0, 1.0]])).item() == math.inf


# ---------------------------------------------------------------- bad inputs: one short error naming the argument


def _mixed_batch():
    return MixingAugmenter("mixup", 3)(torch.rand(2, 3, 4, 4), torch.tensor([0, 1]))


BAD_INPUTS = [
    (
        "negative soft target",
        lambda: soft_cross_entropy(torch.zeros(1, 2), torch.tensor([[1.2, -0.2]])),
        ValueError,
        "`target` must hold weights >= 0, got a minimum of -0.2",
    ),
    (
        "MixedBatch as target",
        lambda: soft_cross_entropy(torch.zeros(2, 3), _mixed_batch()),
        TypeError,
        "`target` must be a tensor, got a MixedBatch; pass its `.targets`",
    ),
    (
        "MixedBatch to CEKDLoss",
        lambda: CEKDLoss()((torch.zeros(2, 2, 3), torch.zeros(2, 3)), _mixed_batch()),
        TypeError,
        "pass its `.targets`",
    ),
    ("negative step", lambda: CEKDLoss(rampup_steps=10).ramp(-1), ValueError, "`step` must be an int >= 0"),
    ("float step", lambda: CEKDLoss(rampup_steps=10).ramp(2.5), ValueError, "got 2.5"),
    (
        "0x0 CAMs",
        lambda: normalize_cams(torch.zeros(2, 0, 0)),
        ValueError,
        "`cams` must have a spatial size of at least 1 x 1, got shape (2, 0, 0)",
    ),
    (
        "bad size",
        lambda: normalize_cams(torch.rand(1, 2, 2), size=(4,)),
        ValueError,
        "`size` must be None, an int >= 1 or a pair (H, W) of ints >= 1, got (4,)",
    ),
    (
        "0x0 CAMs to snapmix",
        lambda: MixingAugmenter("snapmix", 3)(torch.rand(2, 3, 4, 4), torch.tensor([0, 1]), torch.zeros(2, 0, 0)),
        ValueError,
        "`cams` must have a spatial size of at least 1 x 1",
    ),
    (
        "an object where a tensor goes",
        lambda: soft_cross_entropy(torch.nn.Linear(300, 300), torch.tensor([0])),
        TypeError,
        "`logits` must be a torch.Tensor, got a Linear",
    ),
]


@pytest.mark.parametrize(("case", "call", "error", "message"), BAD_INPUTS, ids=[case for case, *_ in BAD_INPUTS])
def test_bad_input_gets_a_short_error(case, call, error, message):
    with pytest.raises(error) as raised:
        call()
    text = str(raised.value)
    assert message in text and len(text) < 200, text


def test_cam_size_may_be_an_int():
    import torchvision

    model = torchvision.models.resnet18(num_classes=3).eval()
    images = torch.rand(2, 3, 32, 32)
    with FeatureTap(model) as tap:
        square = tap.cams(images, torch.tensor([0, 2]), size=32)
        pair = tap.cams(images, torch.tensor([0, 2]), size=(32, 32))
    assert square.shape == (2, 32, 32) and torch.equal(square, pair)
    assert torch.allclose(normalize_cams(torch.rand(1, 3, 3), 5).sum(), torch.tensor(1.0))
