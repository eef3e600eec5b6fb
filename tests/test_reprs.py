"""Every public module prints its settings, as torch.nn modules do."""

from __future__ import annotations

import torchvision
from torch import nn

from cekd_losses import CEKDLoss, CollaborativeEnsemble, CrossDistillationLoss, FeatureTap, MixingAugmenter


def test_mixer_and_losses_print_their_settings():
    mixer = MixingAugmenter("snapmix", 7, mix_alpha=5.0, p=0.5, same_on_batch=True, normalize_targets=True)
    assert repr(mixer) == (
        "MixingAugmenter(method='snapmix', num_classes=7, mix_alpha=5.0, p=0.5, label_smoothing=0.0, "
        "same_on_batch=True, normalize_targets=True)"
    )
    assert (
        repr(CrossDistillationLoss(2.0, reduction="sum")) == "CrossDistillationLoss(temperature=2.0, reduction='sum')"
    )
    first = repr(CEKDLoss(4.0, alpha=0.5, beta=0.0, rampup_steps=10)).splitlines()[1].strip()
    assert first == "temperature=4.0, alpha=0.5, beta=0.0, rampup_steps=10, supervise_ensemble=True, reduction='mean'"


def test_ensemble_prints_members_classes_and_combine():
    members = [torchvision.models.resnet18(num_classes=3) for _ in range(3)]
    text = repr(CollaborativeEnsemble(members, "fusion"))  # the earlier name of "linear"
    assert text.splitlines()[1].strip() == "members=3, num_classes=3, combine='linear'"


def test_feature_tap_prints_where_it_reads():
    model = torchvision.models.resnet18(num_classes=4)
    tap = FeatureTap(model)
    expected = (
        "FeatureTap(model=ResNet, feature_map=NCHW input of AdaptiveAvgPool2d, "
        "classifier=Linear(in_features=512, out_features=4, bias=True))"
    )
    assert repr(tap) == expected
    tap.remove()
    assert repr(tap) == expected[:-1] + ", removed)"
    custom = nn.Sequential(nn.Conv2d(3, 5, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 2))
    assert repr(FeatureTap(custom, feature_module=custom[0], classifier=custom[3])) == (
        "FeatureTap(model=Sequential, feature_map=the given feature_module, "
        "classifier=Linear(in_features=5, out_features=2, bias=True))"
    )
