"""On a CUDA machine: mixing and a whole CEKD step never synchronise with the host (skipped without a GPU;
the project's GPU check runs it)."""

from __future__ import annotations

import pytest
import torch
import torchvision

from cekd_losses import CEKDLoss, CollaborativeEnsemble, FeatureTap, MixingAugmenter, train_step

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def without_host_sync(call):
    call()  # warm-up: lazy initialisation may synchronise once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        return call()
    finally:
        torch.cuda.set_sync_debug_mode(0)


@pytest.mark.parametrize("method", ["mixup", "cutmix", "snapmix"])
@pytest.mark.parametrize("same_on_batch", [False, True])
def test_mixing_on_cuda_never_syncs(method, same_on_batch):
    images = torch.rand(8, 3, 64, 64, device="cuda")
    labels = torch.randint(0, 4, (8,), device="cuda")
    cams = torch.rand(8, 7, 7, device="cuda") if method == "snapmix" else None
    mixer = MixingAugmenter(
        method, 4, same_on_batch=same_on_batch, generator=torch.Generator(device="cuda").manual_seed(0)
    )
    batch = without_host_sync(lambda: mixer(images, labels, cams))
    assert batch.images.device.type == "cuda" and batch.targets.device.type == "cuda"


def test_cekd_snapmix_step_on_cuda_never_syncs():
    members = [torchvision.models.resnet18(num_classes=4) for _ in range(2)]
    ensemble = CollaborativeEnsemble(members).cuda()
    tap = FeatureTap(members[0])
    mixer = MixingAugmenter("snapmix", 4, generator=torch.Generator(device="cuda").manual_seed(0))
    optimizer = torch.optim.SGD(ensemble.parameters(), lr=0.01, momentum=0.9)
    criterion = CEKDLoss(rampup_steps=10)
    images = torch.rand(8, 3, 64, 64, device="cuda")
    labels = torch.randint(0, 4, (8,), device="cuda")

    def step() -> torch.Tensor:
        out = train_step(ensemble, criterion, images, labels, mixer=mixer, tap=tap, step=3)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(ensemble.parameters(), 5.0)
        optimizer.step()
        return out.loss.detach()

    assert torch.isfinite(without_host_sync(step)).item()
