"""Specifications of --pretrained imagenet without a network: weights generated here and placed where
torchvision's and timm's caches look load into every member with a new head; offline misses are one line."""

from __future__ import annotations

import urllib.error
from dataclasses import replace

import pytest
import torch
import torchvision
from huggingface_hub import constants
from repro_helpers import TINY

from cekd_repro.device import Placement
from cekd_repro.engine import build_run
from cekd_repro.models import build_model


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """No network: torch.hub's downloads fail as they do offline, the Hugging Face hub is in offline mode, and both
    caches are empty folders of this test."""

    def no_network(url, *args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return tmp_path


def test_torchvision_weights_in_torch_hubs_cache_load_into_every_member(offline):
    weights = torchvision.models.ResNet18_Weights.DEFAULT
    source = torchvision.models.resnet18(num_classes=1000)  # ImageNet's head: 1000 classes
    cached = offline / "torch" / "hub" / "checkpoints" / weights.url.rsplit("/", 1)[-1]
    cached.parent.mkdir(parents=True)
    torch.save(source.state_dict(), cached)
    config = replace(TINY, method="cekd", arch="resnet18", pretrained="imagenet")
    run = build_run(config, 4, Placement(torch.device("cpu"), (0.5,) * 3, (0.25,) * 3), steps_per_epoch=1)
    for member in run.members:
        assert torch.equal(member.conv1.weight, source.conv1.weight)
        assert torch.equal(member.layer4[1].bn2.running_mean, source.layer4[1].bn2.running_mean)
        assert member.fc.weight.shape == (4, 512) and not torch.equal(member.fc.weight, source.fc.weight[:4])


def test_timm_weights_in_the_hugging_face_cache_load_with_a_new_head(offline):
    from safetensors.torch import save_file

    source = build_model("timm:test_resnet", 1000)
    config = source.pretrained_cfg
    snapshot = offline / "hf" / f"models--{config['hf_hub_id'].replace('/', '--')}" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    save_file(source.state_dict(), str(snapshot / "model.safetensors"))
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0" * 40)
    model = build_model("timm:test_resnet", 5, pretrained="imagenet")
    assert torch.equal(model.conv1[0].weight, source.conv1[0].weight)
    assert model.get_classifier().out_features == 5


def test_offline_misses_name_the_cache_to_fill(offline):
    with pytest.raises(FileNotFoundError) as error:
        build_model("resnet18", 3, pretrained="imagenet")
    text = str(error.value)
    cached = offline / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    assert f"torchvision's cache ({cached})" in text and "TORCH_HOME" in text and "\n" not in text
    with pytest.raises(FileNotFoundError) as error:
        build_model("timm:test_resnet", 3, pretrained="imagenet")
    text = str(error.value)
    assert "timm/test_resnet.r160_in1k" in text and str(offline / "hf") in text and "HF_HOME" in text
    assert "\n" not in text
