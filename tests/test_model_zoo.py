"""Every common classifier family of torchvision and timm works with the tap, SnapMix and gate/fusion
ensembles: random weights, small images, CPU, no downloads."""

from __future__ import annotations

import pytest
import timm
import torch
import torchvision

from cekd_losses import CEKDLoss, CollaborativeEnsemble, FeatureTap, MixingAugmenter, train_step

CLASSES = 4
# (source, name, image size): small images whose last feature map is still 2 x 2 (a 1 x 1 map has no CAM)
ZOO = [
    ("torchvision", "resnet18", 64),
    ("torchvision", "mobilenet_v3_small", 64),
    ("torchvision", "efficientnet_b0", 64),
    ("torchvision", "convnext_tiny", 64),
    ("torchvision", "regnet_y_400mf", 64),
    ("torchvision", "vgg11_bn", 64),
    ("torchvision", "vit_b_16", 32),
    ("torchvision", "swin_t", 64),
    ("timm", "resnet18", 64),
    ("timm", "efficientnet_b0", 64),
    ("timm", "convnext_atto", 64),
    ("timm", "vit_tiny_patch16_224", 32),
    ("timm", "deit_tiny_patch16_224", 32),
    ("timm", "swin_tiny_patch4_window7_224", 64),
]


def build(source: str, name: str, size: int) -> torch.nn.Module:
    torch.manual_seed(0)
    if source == "timm":
        sized = {"img_size": size} if ("vit" in name or "deit" in name or "swin" in name) else {}
        return timm.create_model(name, pretrained=False, num_classes=CLASSES, **sized)
    sized = {"image_size": size} if name.startswith("vit") else {}
    model = torchvision.models.get_model(name, weights=None, num_classes=CLASSES, **sized)
    if name.startswith("vit"):  # torchvision starts ViT's head at zero: every CAM would be flat
        torch.nn.init.normal_(model.heads.head.weight, std=0.02)
    return model


@pytest.mark.parametrize(("source", "name", "size"), ZOO, ids=[f"{s}-{n}" for s, n, _ in ZOO])
def test_tap_cams_and_snapmix_on_every_family(source, name, size):
    model = build(source, name, size).eval()
    images, labels = torch.rand(2, 3, size, size), torch.tensor([1, 3])
    tap = FeatureTap(model)
    cams = tap.cams(images, labels)
    batch, depth, height, width = tap.features.shape
    assert batch == 2 and cams.shape == (2, height, width) == (2, 2, 2)
    assert (cams >= 0).all() and torch.allclose(cams.sum(dim=(1, 2)), torch.ones(2), atol=1e-5)
    assert tap.pooled.shape[0] == 2 and tap.pooled.shape[1] == tap.classifier.in_features
    mixed = MixingAugmenter("snapmix", CLASSES, generator=torch.Generator().manual_seed(0))(images, labels, cams)
    assert mixed.images.shape == images.shape and torch.isfinite(mixed.targets).all()
    assert tap.cams(images, labels, size=size).shape == (2, size, size)


@pytest.mark.parametrize(
    ("source", "name"),
    [
        ("torchvision", "resnet18"),
        ("torchvision", "regnet_y_400mf"),
        ("torchvision", "efficientnet_b0"),
        ("timm", "resnet18"),
        ("timm", "efficientnet_b0"),
    ],
)
def test_cam_of_a_gap_linear_cnn_averages_to_the_logit(source, name):
    """For global average pooling and a linear head, the mean of the raw CAM over positions is the logit."""
    model = build(source, name, 64).eval()
    images, labels = torch.rand(3, 3, 64, 64), torch.tensor([0, 2, 3])
    with FeatureTap(model) as tap, torch.no_grad():
        logits = model(images)
        raw = tap.cams(images, labels, normalized=False)
    assert torch.allclose(raw.mean(dim=(1, 2)), logits[torch.arange(3), labels], atol=1e-4)


def test_vit_cam_is_the_head_on_each_normalised_patch_token():
    model = build("timm", "vit_tiny_patch16_224", 48).eval()
    images, labels = torch.rand(2, 3, 48, 48), torch.tensor([1, 2])
    with FeatureTap(model) as tap, torch.no_grad():
        raw = tap.cams(images, labels, normalized=False)
        tokens = model.forward_features(images)[:, model.num_prefix_tokens :]  # final norm applied, class token dropped
        by_hand = model.head(model.fc_norm(tokens))[torch.arange(2), :, labels]
    assert raw.shape == (2, 3, 3) and torch.allclose(raw.flatten(1), by_hand, atol=1e-5)


def heterogeneous_pair() -> list[torch.nn.Module]:
    return [build("timm", "vit_tiny_patch16_224", 32), build("torchvision", "resnet18", 32)]


@pytest.mark.parametrize("combine", ["gate", "linear"])
def test_cekd_step_on_a_token_model_and_a_cnn(combine):
    members = heterogeneous_pair()
    ensemble = CollaborativeEnsemble(members, combine=combine)
    mixer = MixingAugmenter("snapmix", CLASSES, generator=torch.Generator().manual_seed(0))
    images, labels = torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    out = train_step(ensemble, CEKDLoss(), images, labels, mixer=mixer, tap=FeatureTap(members[0]))
    out.loss.backward()
    assert torch.isfinite(out.loss) and ensemble.head.weight.grad.abs().sum() > 0
    assert all(p.grad is not None for member in members for p in member.parameters() if p.requires_grad)


@pytest.mark.slow
def test_cekd_step_with_a_token_model_compiles():
    """The CEKD step of a ViT beside a CNN traces whole through dynamo and AOT autograd and equals eager (backend
    aot_eager: the library's part of compiling; inductor's code generation is tested on the mixer in
    test_launch_floor.py, at a fraction of this graph's cold compile time).
    Small members keep the trace short: a two-block ViT and timm's test_resnet."""
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=CLASSES, img_size=32, depth=2)
    members = [vit, timm.create_model("test_resnet", num_classes=CLASSES)]
    ensemble = CollaborativeEnsemble(members, combine="gate")
    criterion = CEKDLoss()
    images, labels = torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    batch = MixingAugmenter("cutmix", CLASSES, generator=torch.Generator().manual_seed(0))(images, labels)

    def step() -> tuple[torch.Tensor, torch.Tensor]:
        ensemble.zero_grad()
        loss = criterion(ensemble(batch.images), batch.targets)
        loss.backward()
        return loss.detach(), members[0].head.weight.grad.clone()

    eager_loss, eager_grad = step()
    loss, grad = torch.compile(step, backend="aot_eager")()
    assert torch.allclose(loss, eager_loss, atol=1e-4) and torch.allclose(grad, eager_grad, atol=1e-4)
