"""Specifications of CollaborativeEnsemble."""

from __future__ import annotations

import io

import pytest
import timm
import torch
import torchvision
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from cekd_losses import CollaborativeEnsemble, EnsembleOutput, FeatureTap


def tiny_resnets(n: int, classes: int = 4) -> list[nn.Module]:
    torch.manual_seed(n)
    return [torchvision.models.resnet18(num_classes=classes) for _ in range(n)]


class Flat(nn.Module):
    """A linear classifier on flattened images: the fastest possible member."""

    def __init__(self, classes: int = 3, pixels: int = 12) -> None:
        super().__init__()
        self.fc = nn.Linear(pixels, classes)

    def forward(self, x):
        return self.fc(x.flatten(1))


def test_mean_combine_shapes_and_values():
    members = [Flat() for _ in range(3)]
    ensemble = CollaborativeEnsemble(members)
    x = torch.rand(5, 3, 2, 2)
    out = ensemble(x)
    assert isinstance(out, EnsembleOutput)
    expected = torch.stack([m(x) for m in members])
    assert torch.allclose(out.member_logits, expected)
    assert torch.allclose(out.ensemble_logits, expected.mean(0))
    assert torch.allclose(ensemble.predict(x), expected.mean(0))
    assert ensemble.member(1) is members[1] and len(ensemble) == 3


@given(seed=st.integers(0, 2**31 - 1), members=st.integers(2, 5))
def test_mean_combiner_is_invariant_to_member_order(seed, members):
    torch.manual_seed(seed)
    models = [Flat() for _ in range(members)]
    x = torch.rand(4, 3, 2, 2)
    order = torch.randperm(members).tolist()
    a = CollaborativeEnsemble(models)(x).ensemble_logits
    b = CollaborativeEnsemble([models[i] for i in order])(x).ensemble_logits
    assert torch.allclose(a, b, atol=1e-6)


def test_one_view_per_member():
    members = [Flat(), Flat()]
    views = [torch.rand(2, 3, 2, 2), torch.rand(2, 3, 2, 2)]
    out = CollaborativeEnsemble(members)(views)
    assert torch.allclose(out.member_logits[0], members[0](views[0]))
    assert torch.allclose(out.member_logits[1], members[1](views[1]))


def test_heterogeneous_timm_and_torchvision_members():
    members = [
        timm.create_model("resnet18", pretrained=False, num_classes=5),
        torchvision.models.mobilenet_v3_small(num_classes=5),
    ]
    ensemble = CollaborativeEnsemble(members).eval()
    out = ensemble(torch.rand(2, 3, 32, 32))
    assert out.member_logits.shape == (2, 2, 5) and ensemble.num_classes == 5


@pytest.mark.parametrize("combine", ["gate", "linear", "fusion"])
def test_gate_and_linear_read_pooled_features_from_the_members_forward(combine):
    members = tiny_resnets(2)
    ensemble = CollaborativeEnsemble(members, combine=combine).eval()
    calls = []
    for member in members:
        member.register_forward_hook(lambda *args: calls.append(1))
    x = torch.rand(3, 3, 32, 32)
    out = ensemble(x)
    assert len(calls) == 2  # one forward per member, no second pass for the features
    pooled = torch.cat(
        [
            torch.flatten(m.avgpool(m.layer4(m.layer3(m.layer2(m.layer1(m.maxpool(m.relu(m.bn1(m.conv1(x))))))))), 1)
            for m in members
        ],
        dim=1,
    )
    if combine in ("linear", "fusion"):  # "fusion": the earlier name of "linear"
        expected = ensemble.head(pooled)
    else:
        gate = ensemble.head(pooled).softmax(1)
        expected = (gate.T[:, :, None] * out.member_logits).sum(0)
        low, high = out.member_logits.min(0).values, out.member_logits.max(0).values
        assert ((out.ensemble_logits >= low - 1e-5) & (out.ensemble_logits <= high + 1e-5)).all()
    assert torch.allclose(out.ensemble_logits, expected, atol=1e-5)


@pytest.mark.parametrize("combine", ["mean", "gate", "linear"])
def test_state_dict_round_trip(combine):
    source = CollaborativeEnsemble(tiny_resnets(2), combine=combine).eval()
    buffer = io.BytesIO()
    torch.save(source.state_dict(), buffer)
    buffer.seek(0)
    target = CollaborativeEnsemble(tiny_resnets(3)[:2], combine=combine).eval()
    target.load_state_dict(torch.load(buffer))
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(source(x).ensemble_logits, target(x).ensemble_logits)


def test_gradients_reach_every_member_through_the_ensemble():
    members = [Flat(), Flat()]
    CollaborativeEnsemble(members)(torch.rand(2, 3, 2, 2)).ensemble_logits.sum().backward()
    assert all(m.fc.weight.grad is not None and m.fc.weight.grad.abs().sum() > 0 for m in members)


class Broken(nn.Module):
    def forward(self, x):
        return x.flatten(1)[:, :3, None]


def test_ensemble_errors():
    with pytest.raises(ValueError, match=r"`members` must hold N >= 2 models, got N = 1"):
        CollaborativeEnsemble([Flat()])
    with pytest.raises(TypeError, match=r"`members\[1\]` must be a torch.nn.Module, got str"):
        CollaborativeEnsemble([Flat(), "resnet"])
    with pytest.raises(TypeError, match=r"`members` must be a list of nn.Module, got Flat"):
        CollaborativeEnsemble(Flat())
    with pytest.raises(ValueError, match=r"same number of classes K, got K = \[3, 5\]"):
        CollaborativeEnsemble([Flat(3), Flat(5)])
    with pytest.raises(ValueError, match=r"`combine` must be one of 'mean', 'gate', 'linear', got 'max'"):
        CollaborativeEnsemble([Flat(), Flat()], combine="max")
    headless = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))  # no named head: the error says how to give one
    with pytest.raises(
        ValueError,
        match=r"none was found in members\[1\] \(Sequential\); pass taps=\[..., "
        r"FeatureTap\(members\[1\], classifier=",
    ):
        CollaborativeEnsemble([Flat(), headless], combine="gate")
    ensemble = CollaborativeEnsemble(
        [Flat(), headless], combine="linear", taps=[None, FeatureTap(headless, classifier=headless[1])]
    )
    assert ensemble(torch.rand(2, 3, 2, 2)).ensemble_logits.shape == (2, 3)
    with pytest.raises(ValueError, match=r"`taps\[0\]` must be a FeatureTap of members\[0\]"):
        CollaborativeEnsemble(
            [Flat(), headless], combine="gate", taps=[FeatureTap(headless, classifier=headless[1]), None]
        )
    with pytest.raises(ValueError, match=r"`taps` are read by combine='gate' or 'linear' only"):
        CollaborativeEnsemble([Flat(), Flat()], taps=[None, None])
    with pytest.raises(ValueError, match=r"member 1 must return \(B, K\) logits, got shape \(2, 3, 1\)"):
        CollaborativeEnsemble([Flat(), Broken()])(torch.rand(2, 3, 2, 2))
    with pytest.raises(
        ValueError, match=r"`x` must be one input tensor or a sequence of N = 2 inputs, got a sequence of 3"
    ):
        CollaborativeEnsemble([Flat(), Flat()])([torch.rand(2, 3, 2, 2)] * 3)
    wide = nn.Sequential(nn.Flatten(), nn.Linear(12, 4))  # K not readable up front: checked at forward
    with pytest.raises(ValueError, match=r"logits of one shape \(B, K\), got \[\(2, 3\), \(2, 4\)\]"):
        CollaborativeEnsemble([Flat(), wide])(torch.rand(2, 3, 2, 2))
