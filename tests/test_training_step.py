"""A whole CEKD step under torch.compile, and under DistributedDataParallel with 2 CPU processes."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from cekd_losses import CEKDLoss, CollaborativeEnsemble, MixingAugmenter


def tiny_member(classes: int = 4) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, classes)
    )


def test_cekd_step_under_torch_compile_matches_eager():
    """The whole step, mixer included, traced by dynamo and AOT autograd (forward and backward) equals eager.
    Backend aot_eager: the library's part of compiling; inductor's code generation is tested on the mixer in
    test_launch_floor.py (a cold inductor compile of this step costs 15-20 s on 2 cores)."""
    torch.manual_seed(0)
    ensemble = CollaborativeEnsemble([tiny_member(), tiny_member()])
    criterion = CEKDLoss()
    images, labels = torch.rand(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])

    def step(mixer: MixingAugmenter) -> tuple[torch.Tensor, list[torch.Tensor]]:
        ensemble.zero_grad()
        batch = mixer(images, labels)
        loss = criterion(ensemble(batch.images), batch.targets)
        loss.backward()
        return loss, [p.grad.clone() for p in ensemble.parameters()]

    compiled = torch.compile(step, backend="aot_eager")
    for method in ("mixup", "cutmix"):
        eager_loss, eager_grads = step(MixingAugmenter(method, 4, generator=torch.Generator().manual_seed(1)))
        loss, grads = compiled(MixingAugmenter(method, 4, generator=torch.Generator().manual_seed(1)))
        assert torch.allclose(loss, eager_loss, atol=1e-5)
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(grads, eager_grads, strict=True))


def _ddp_worker(rank: int, world_size: int, init_file: str, results: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    torch.manual_seed(rank)  # different initial weights: DDP must broadcast rank 0's
    ensemble = nn.parallel.DistributedDataParallel(CollaborativeEnsemble([tiny_member(), tiny_member()]))
    initial = torch.cat([p.detach().flatten().clone() for p in ensemble.parameters()])
    optimizer = torch.optim.SGD(ensemble.parameters(), lr=0.5)
    mixer = MixingAugmenter("cutmix", 4, generator=torch.Generator().manual_seed(10 + rank))
    images, labels = torch.rand(4, 3, 16, 16), torch.randint(0, 4, (4,))  # different data on each rank
    batch = mixer(images, labels)
    loss = CEKDLoss()(ensemble(batch.images), batch.targets)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    params = torch.cat([p.detach().flatten() for p in ensemble.parameters()])
    gathered = [torch.empty_like(params) for _ in range(world_size)]
    dist.all_gather(gathered, params)
    if rank == 0:
        torch.save({"gathered": gathered, "initial": initial}, results)
    dist.destroy_process_group()
    # Seen once in a full CI run: a spawned rank aborted in interpreter teardown ("terminate called without an
    # active exception", a C++ thread still joinable at exit) after all of the above had finished. The results
    # are on disk and checked by the parent; leave without the teardown.
    os._exit(0)


def test_ddp_two_cpu_processes_keep_identical_parameters(tmp_path):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    results = tmp_path / "results.pt"
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(results)), nprocs=2, join=True)
    saved = torch.load(results)
    rank0, rank1 = saved["gathered"]
    assert torch.equal(rank0, rank1)
    assert not torch.allclose(rank0, saved["initial"])  # the step did change them


@pytest.mark.parametrize("combine", ["gate", "linear"])
def test_gate_and_fusion_heads_train(combine):
    import torchvision

    torch.manual_seed(0)
    ensemble = CollaborativeEnsemble([torchvision.models.resnet18(num_classes=3) for _ in range(2)], combine=combine)
    batch = MixingAugmenter("mixup", 3)(torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 2, 0]))
    CEKDLoss()(ensemble(batch.images), batch.targets).backward()
    assert ensemble.head.weight.grad is not None and ensemble.head.weight.grad.abs().sum() > 0
