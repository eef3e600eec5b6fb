"""Specifications of class activation maps and the feature tap."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from cekd_losses import FeatureTap, MixingAugmenter, normalize_cams


def slow_shifted_cams(features, weight, bias, labels, size):
    """float64 CAMs with explicit loops over images and channels, resized, minimum subtracted."""
    maps = []
    for b in range(features.shape[0]):
        raw = torch.zeros(features.shape[2:], dtype=torch.float64)
        for d in range(features.shape[1]):
            raw += weight[labels[b], d].double() * features[b, d].double()
        raw += bias[labels[b]].double()
        raw = F.interpolate(raw[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
        maps.append(raw - raw.min())
    return torch.stack(maps)


def slow_cams(features, weight, bias, labels, size):
    """:func:`slow_shifted_cams` divided by their sums: SnapMix's normalisation."""
    shifted = slow_shifted_cams(features, weight, bias, labels, size)
    return shifted / shifted.sum(dim=(1, 2), keepdim=True)


def float32_cam_tolerance(features, weight, bias, labels, size):
    """Per-pixel bound on the error of float32 normalised CAMs against the float64 reference.

    A raw score sums D products and a bias: float32 rounding leaves it within (D + 2) eps m of the
    true value, m = the largest sum of |terms| of the map. Bilinear resizing (convex weights), the
    minimum's subtraction and the sum add a few eps m more: each shifted pixel is off by at most
    E = (2 D + 10) eps m. Dividing by the total T (off by at most H W (E + eps T)) moves a
    normalised value n by at most E / T (1 + H W n) + (H W + 1) eps n. Twice that, for slack. A map
    that is nearly flat has a tiny T: its bound grows as it must (rounding dominates its shape).
    """
    eps = torch.finfo(torch.float32).eps
    depth, pixels = features.shape[1], size[0] * size[1]
    terms = weight[labels].double().abs()[:, :, None, None] * features.double().abs()
    magnitude = terms.sum(1).flatten(1).amax(1) + bias[labels].double().abs()
    shifted = slow_shifted_cams(features, weight, bias, labels, size)
    total = shifted.sum(dim=(1, 2))
    error = (2 * depth + 10) * eps * magnitude
    normalised = shifted / total[:, None, None]
    bound = (error / total)[:, None, None] * (1 + pixels * normalised) + (pixels + 1) * eps * normalised
    return 2 * bound


def test_normalize_cams_exact():
    cams = torch.tensor([[[1.0, 2.0], [3.0, 1.0]], [[5.0, 5.0], [5.0, 5.0]], [[0.0, float("nan")], [1.0, 2.0]]])
    out = normalize_cams(cams)
    assert torch.allclose(out[0], torch.tensor([[0.0, 1 / 3], [2 / 3, 0.0]]))
    assert torch.equal(out[1], torch.zeros(2, 2))  # flat: no evidence
    assert torch.equal(out[2], torch.zeros(2, 2))  # NaN: no finite mass


class LinearProbe(nn.Module):
    """Its "images" are the feature maps themselves: an identity feature module, average pooling, a linear head."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        super().__init__()
        self.features = nn.Identity()
        self.head = nn.Linear(weight.shape[1], weight.shape[0])
        with torch.no_grad():
            self.head.weight.copy_(weight)
            self.head.bias.copy_(bias)

    def forward(self, x):
        return self.head(self.features(x).mean(dim=(2, 3)))


def probe_cams(features, weight, bias, labels, **kwargs):
    model = LinearProbe(weight, bias)
    with FeatureTap(model, feature_module=model.features, classifier=model.head) as tap:
        return tap.cams(features, labels, **kwargs)


def test_cams_exact():
    features = torch.tensor([[[[1.0, 2.0]], [[3.0, 0.0]]]])  # (1, 2, 1, 2)
    weight = torch.tensor([[1.0, 1.0], [2.0, -1.0]])
    bias = torch.tensor([0.0, 10.0])
    # label 1: 2*[1, 2] - [3, 0] + 10 = [9, 14] -> minus min [0, 5] -> normalised [0, 1]
    assert torch.equal(probe_cams(features, weight, bias, torch.tensor([1])), torch.tensor([[[0.0, 1.0]]]))
    assert torch.equal(
        probe_cams(features, weight, bias, torch.tensor([1]), normalized=False), torch.tensor([[[9.0, 14.0]]])
    )
    # label 0: [4, 2] -> [2, 0] -> [1, 0]
    assert torch.equal(probe_cams(features, weight, bias, torch.tensor([0])), torch.tensor([[[1.0, 0.0]]]))


@given(
    seed=st.integers(0, 2**31 - 1),
    batch=st.integers(1, 4),
    depth=st.integers(1, 6),
    side=st.integers(1, 5),
    size=st.integers(4, 12),
)
def test_cams_match_slow_loops(seed, batch, depth, side, size):
    g = torch.Generator().manual_seed(seed)
    features = torch.rand(batch, depth, side, side + 1, generator=g)
    weight, bias = torch.randn(5, depth, generator=g), torch.randn(5, generator=g)
    labels = torch.randint(0, 5, (batch,), generator=g)
    cams = probe_cams(features, weight, bias, labels, size=(size, size))
    reference = slow_cams(features, weight, bias, labels, (size, size))
    tolerance = float32_cam_tolerance(features, weight, bias, labels, (size, size))
    assert ((cams.double() - reference).abs() <= tolerance).all()
    assert (cams >= 0).all()
    sums = cams.double().sum(dim=(1, 2))  # each map a distribution, or all zeros where rounding left no mass
    assert (((sums - 1).abs() <= 1e-5) | (sums == 0)).all()


def hand_torchvision_features(model, images):
    x = model.maxpool(model.relu(model.bn1(model.conv1(images))))
    return model.layer4(model.layer3(model.layer2(model.layer1(x))))


@pytest.mark.parametrize("source", ["torchvision", "timm"])
def test_tap_on_resnet18_matches_hand_computation(source, device):
    torch.manual_seed(0)
    if source == "torchvision":
        model = torchvision.models.resnet18(num_classes=6)
    else:
        model = timm.create_model("resnet18", pretrained=False, num_classes=6)
    model = model.to(device).eval()
    images = torch.rand(3, 3, 64, 64, device=device)
    labels = torch.tensor([0, 5, 2], device=device)
    tap = FeatureTap(model)
    with torch.no_grad():
        logits = model(images)
        hand = hand_torchvision_features(model, images) if source == "torchvision" else model.forward_features(images)
    assert torch.allclose(tap.features, hand, atol=1e-5)
    assert torch.allclose(tap.pooled, hand.mean(dim=(2, 3)), atol=1e-5)
    assert torch.allclose(model.fc(tap.pooled), logits, atol=1e-4)
    cams = tap.cams(images, labels, size=(64, 64))
    reference = slow_cams(hand.cpu(), model.fc.weight.cpu(), model.fc.bias.cpu(), labels.cpu(), (64, 64))
    assert cams.shape == (3, 64, 64)
    assert torch.allclose(cams.cpu().double(), reference, atol=1e-5)


def test_tap_keeps_graph_for_pooled_features_and_detaches_cams():
    model = torchvision.models.resnet18(num_classes=4)
    tap = FeatureTap(model)
    images = torch.rand(2, 3, 32, 32)
    model(images)
    assert tap.pooled.requires_grad
    assert not tap.cams(images, torch.tensor([0, 1])).requires_grad


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.body(x).amax(dim=(2, 3)))


def test_tap_on_any_model_with_named_modules():
    model = TinyNet()
    images = torch.rand(2, 3, 8, 8)
    with FeatureTap(model, feature_module=model.body, classifier=model.head) as tap:
        model(images)
        features = model.body(images)
        assert torch.equal(tap.features, features)
        assert torch.equal(tap.pooled, features.amax(dim=(2, 3)))
        cams = tap.cams(images, torch.tensor([2, 1]))
        reference = slow_cams(features, model.head.weight, model.head.bias, torch.tensor([2, 1]), (8, 8))
        assert torch.allclose(cams.double(), reference, atol=1e-5)
    with pytest.raises(RuntimeError, match="captured nothing"):
        tap.features  # noqa: B018  (removed: the captured tensors are gone)
    model(images)
    with pytest.raises(RuntimeError, match="captured nothing"):
        tap.pooled  # noqa: B018  (and no new forward is captured)


def test_tap_errors():
    unnamed_head = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    with pytest.raises(ValueError, match="could not find the linear classifier of Sequential.*classifier="):
        FeatureTap(unnamed_head)
    tap = FeatureTap(TinyNet())  # its head is found, its feature map is not: pooled features work, CAMs say why not
    tap.model(torch.rand(2, 3, 8, 8))
    assert tap.pooled.shape == (2, 4)
    with pytest.raises(ValueError, match="could not find the last feature map of TinyNet.*feature_module="):
        tap.cams(torch.rand(2, 3, 8, 8), torch.tensor([0, 1]))
    mobilenet = torchvision.models.mobilenet_v3_small(num_classes=3)
    tap = FeatureTap(mobilenet, feature_module=mobilenet.features)  # a linear read-out that does not fit
    mobilenet(torch.rand(2, 3, 32, 32))
    assert tap.pooled.shape == (2, 1024) and tap.features.shape[1] == 576
    with pytest.raises(
        ValueError,
        match=r"Linear\(in_features=1024, out_features=3.*does not read the tapped "
        r"feature map \(576 channels\)",
    ):
        tap.cams(torch.rand(2, 3, 32, 32), torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="`classifier` must be the model's linear head.*got Sequential"):
        FeatureTap(mobilenet, classifier=mobilenet.classifier)
    with pytest.raises(TypeError, match="`model` must be a torch.nn.Module, got str"):
        FeatureTap("resnet18")
    tap = FeatureTap(torchvision.models.resnet18(num_classes=3))
    with pytest.raises(RuntimeError, match="run a forward of the model first"):
        tap.features  # noqa: B018


def test_cam_argument_errors():
    weight, bias = torch.rand(5, 4), torch.rand(5)
    with pytest.raises(ValueError, match=r"`labels` must hold class ids in \[0, 5\), got values in \[0, 7\]"):
        probe_cams(torch.rand(2, 4, 3, 3), weight, bias, torch.tensor([0, 7]))
    with pytest.raises(ValueError, match=r"`labels` must have shape \(2,\), got shape \(3,\)"):
        probe_cams(torch.rand(2, 4, 3, 3), weight, bias, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"`images` must have shape \(B, C, H, W\), got shape \(2, 4\)"):
        probe_cams(torch.rand(2, 4), weight, bias, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"`size` is for normalised CAMs only"):
        probe_cams(torch.rand(2, 4, 3, 3), weight, bias, torch.tensor([0, 1]), size=8, normalized=False)


def test_snapmix_with_cams_from_the_tap():
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=4).eval()
    tap = FeatureTap(model)
    images, labels = torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    cams = tap.cams(images, labels)  # feature resolution; the mixer resizes
    out = MixingAugmenter("snapmix", 4, generator=torch.Generator().manual_seed(1))(images, labels, cams)
    assert out.applied.any()
    assert ((out.lam_a >= 0) & (out.lam_a <= 1) & (out.lam_b >= 0) & (out.lam_b <= 1)).all()


@pytest.mark.parametrize("eval_mode", [False, True])
def test_tap_cams_is_the_three_step_recipe_in_one_call(eval_mode):
    """cams() is a no-grad forward and the read-out of its features; eval_mode leaves BatchNorm statistics
    alone and restores every module's mode; the default updates them, as the SnapMix reference code does."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=4).train()
    model.layer1[0].train(False)  # a mixed-mode model: the exact modes must come back
    images, labels = torch.rand(3, 3, 64, 64), torch.tensor([0, 3, 1])
    reference = copy.deepcopy(model)
    if eval_mode:
        reference.eval()
    with torch.no_grad():  # the raw CAM by hand, w[label] . F + b, on the same forward
        features = hand_torchvision_features(reference, images)
        weight, bias = reference.fc.weight[labels], reference.fc.bias[labels]
        expected = torch.einsum("bd,bdhw->bhw", weight, features) + bias[:, None, None]
    modes = [m.training for m in model.modules()]
    running = model.bn1.running_mean.clone()
    with FeatureTap(model) as tap:
        cams = tap.cams(images, labels, eval_mode=eval_mode, normalized=False)
        assert cams.shape == (3, 2, 2) and torch.allclose(cams, expected, atol=1e-4) and not cams.requires_grad
        assert [m.training for m in model.modules()] == modes
        assert torch.equal(model.bn1.running_mean, running) == eval_mode
        assert tap.cams(images, labels).shape == (3, 2, 2)  # normalised, at the feature map's own size by default


FINDER_ZOO = [
    ("torchvision", "resnet18", 32),
    ("torchvision", "mobilenet_v3_small", 32),
    ("torchvision", "efficientnet_b0", 32),
    ("torchvision", "convnext_tiny", 32),
    ("torchvision", "regnet_y_400mf", 32),
    ("torchvision", "densenet121", 32),
    ("torchvision", "swin_t", 64),
    ("timm", "resnet18", 32),
    ("timm", "mobilenetv3_small_100", 32),
    ("timm", "convnext_atto", 32),
    ("timm", "vit_tiny_patch16_224", 32),
]


@pytest.mark.parametrize(("source", "name", "size"), FINDER_ZOO, ids=[f"{s}-{n}" for s, n, _ in FINDER_ZOO])
def test_find_classifier_finds_the_layer_that_makes_the_logits(source, name, size):
    from cekd_losses import find_classifier

    if source == "timm":
        extra = {"img_size": size} if name.startswith("vit") else {}
        model = timm.create_model(name, pretrained=False, num_classes=5, **extra)
    else:
        model = torchvision.models.get_model(name, weights=None, num_classes=5)
    head = find_classifier(model.eval())
    produced = []
    handle = head.register_forward_hook(lambda module, inputs, output: produced.append(output))
    with torch.no_grad():
        logits = model(torch.rand(2, 3, size, size))
    handle.remove()
    assert head.out_features == 5 and len(produced) == 1 and torch.equal(produced[0], logits)


def test_find_classifier_without_a_head():
    from cekd_losses import find_classifier

    assert find_classifier(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten())) is None
