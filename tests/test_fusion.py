"""Specifications of FFL's fusion module: its layers as the paper's, heterogeneous members aligned, gradients
to every member's map, named errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision

from cekd_losses import FeatureFusion, FeatureTap


def test_same_members_fuse_as_ffls_module():
    """Two 4-channel maps: concat (8 channels), depthwise 3x3 with one filter per channel + BN + ReLU, pointwise
    1x1 to 4 + BN + ReLU, global average pooling, linear; written out here with the module's own weights."""
    torch.manual_seed(0)
    fusion = FeatureFusion([4, 4], num_classes=3).eval()
    for bn in (fusion.depthwise[1], fusion.pointwise[1]):  # non-trivial running statistics
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2), bn.weight.data.uniform_(0.5, 2)
    maps = [torch.randn(2, 4, 5, 5), torch.randn(2, 4, 5, 5)]
    assert fusion.depthwise[0].weight.shape == (8, 1, 3, 3) and fusion.pointwise[0].weight.shape == (4, 8, 1, 1)

    def bn(x, layer):
        scale = layer.weight / (layer.running_var + layer.eps).sqrt()
        return (x - layer.running_mean[:, None, None]) * scale[:, None, None] + layer.bias[:, None, None]

    x = torch.cat(maps, dim=1)
    x = bn(F.conv2d(x, fusion.depthwise[0].weight, padding=1, groups=8), fusion.depthwise[1]).relu()
    x = bn(F.conv2d(x, fusion.pointwise[0].weight), fusion.pointwise[1]).relu()
    expected = x.mean(dim=(2, 3)) @ fusion.classifier.weight.T + fusion.classifier.bias
    assert torch.allclose(fusion(maps), expected, atol=1e-5)


def test_heterogeneous_members_are_aligned_and_all_get_gradient():
    """resnet18 beside mobilenet_v3_small: 512 and 576 channels; 64 px and 96 px inputs give 2x2 and 3x3 maps."""
    members = [torchvision.models.resnet18(num_classes=5), torchvision.models.mobilenet_v3_small(num_classes=5)]
    taps = [FeatureTap(m) for m in members]
    for member, size in zip(members, (64, 96), strict=True):
        member(torch.rand(2, 3, size, size))
    maps = [tap.features for tap in taps]
    assert [tuple(m.shape) for m in maps] == [(2, 512, 2, 2), (2, 576, 3, 3)]
    fusion = FeatureFusion([512, 576], num_classes=5)
    assert isinstance(fusion.align[0], torch.nn.Identity) and fusion.align[1].weight.shape == (512, 576, 1, 1)
    logits = fusion(maps)
    assert logits.shape == (2, 5)
    logits.sum().backward()
    # the fused loss reaches both members' backbones through their maps, down to the first convolution
    assert members[0].conv1.weight.grad.abs().sum() > 0 and members[1].features[0][0].weight.grad.abs().sum() > 0
    assert fusion.align[1].weight.grad.abs().sum() > 0


def test_maps_pool_to_the_smallest_size():
    fusion = FeatureFusion([3, 3], num_classes=2, channels=3).eval()
    small, large = torch.rand(1, 3, 2, 2), torch.rand(1, 3, 4, 4)
    pooled = F.avg_pool2d(large, 2)  # 4x4 -> 2x2 by adaptive pooling is 2x2 blocks
    assert torch.allclose(fusion([small, large]), fusion([small, pooled]), atol=1e-6)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: FeatureFusion([512], 5), r"`in_channels` must list N >= 2 channel counts"),
        (lambda: FeatureFusion([512, 0], 5), r"`in_channels` must be >= 1, got 0"),
        (lambda: FeatureFusion([4, 4], 0), r"`num_classes` must be >= 1, got 0"),
        (lambda: FeatureFusion([4, 4], 3)([torch.rand(2, 4, 3, 3)]), r"`maps` must be a list of N = 2 feature maps"),
        (
            lambda: FeatureFusion([4, 4], 3)([torch.rand(2, 4, 3, 3), torch.rand(2, 5, 3, 3)]),
            r"`maps\[1\]` must have shape \(2, 4, H, W\), got shape \(2, 5, 3, 3\)",
        ),
        (
            lambda: FeatureFusion([4, 4], 3)([torch.rand(2, 4, 3, 3), torch.rand(3, 4, 3, 3)]),
            r"`maps\[1\]` must have shape \(2, 4, H, W\), got shape \(3, 4, 3, 3\)",
        ),
    ],
)
def test_bad_input_is_named(call, message):
    with pytest.raises(ValueError, match=message):
        call()
