"""The online-distillation family in a few lines each: DML, ONE, FFL, PCL, MCL-OKD and CEKD, every one over CutMix.

Each method is built from the library's pieces on small timm models and trained for a few steps on random
images (put your loader's batches there); one line per method prints its loss terms. docs/online.rst
explains each method and what to evaluate.

    python examples/online_family.py [--steps 3] [--arch test_resnet]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import timm
import torch
from torch import Tensor, nn

from cekd_losses import (
    BranchGate,
    CollaborativeEnsemble,
    FeatureFusion,
    FeatureTap,
    MixingAugmenter,
    OnlineDistillationLoss,
    PeerContrast,
    SharedTrunk,
    TemporalMean,
)

CLASSES = 10
SAMPLES = 64  # the training set's size, for MCL-OKD's memory (the random batches below stand in for it)
Parts = Callable[[Tensor, Tensor, int], dict[str, Tensor]]  # (mixed images, soft targets, step) -> loss terms


def models(arch: str, count: int) -> list[nn.Module]:
    return [timm.create_model(arch, num_classes=CLASSES) for _ in range(count)]


def dml(arch: str, rampup: int) -> tuple[nn.Module, Parts]:
    """DML: two peers, each taught by the other (T = 1, no teacher)."""
    ensemble = CollaborativeEnsemble(models(arch, 2))
    criterion = OnlineDistillationLoss("dml")
    return ensemble, lambda x, y, step: criterion.components(ensemble(x).member_logits, y)


def one(arch: str, rampup: int) -> tuple[nn.Module, Parts]:
    """ONE: three branches on a shared trunk (ResNet split after layer2), gated by the trunk's features."""
    peers = models(arch, 3)
    channels = next(info["num_chs"] for info in peers[0].feature_info if info["module"] == "layer2")
    branches = SharedTrunk(peers, stage="layer3")
    gate = BranchGate(in_features=channels, branches=3)  # reads the trunk's output, pooled
    criterion = OnlineDistillationLoss("one", rampup_steps=rampup)

    def parts(x: Tensor, y: Tensor, step: int) -> dict[str, Tensor]:
        out = branches(x)
        teacher = gate.teacher(gate(out.features), out.member_logits)
        return criterion.components(out.member_logits, y, teacher_logits=teacher, step=step)

    return nn.ModuleList([branches, gate]), parts


def ffl(arch: str, rampup: int) -> tuple[nn.Module, Parts]:
    """FFL: two peers and a fused classifier on their last feature maps, distilling both ways."""
    peers = models(arch, 2)
    ensemble, taps = CollaborativeEnsemble(peers), [FeatureTap(peer) for peer in peers]
    fusion = FeatureFusion([tap.classifier.in_features for tap in taps], CLASSES)
    criterion = OnlineDistillationLoss("ffl", rampup_steps=rampup)

    def parts(x: Tensor, y: Tensor, step: int) -> dict[str, Tensor]:
        member_logits = ensemble(x).member_logits  # the taps hold each peer's last feature map now
        fused = fusion([tap.features for tap in taps])
        return criterion.components(member_logits, y, teacher_logits=fused, step=step)

    return nn.ModuleList([ensemble, fusion]), parts


class PeersWithMeans(nn.Module):
    """PCL's peers, their peer ensemble teacher (a linear classifier on the pooled features) and their
    temporal mean models, which are what PCL evaluates and keeps; :meth:`update` after each optimizer step."""

    def __init__(self, peers: list[nn.Module]) -> None:
        super().__init__()
        # copied before the ensemble's linear combiner taps the peers' features (a copy would carry the hooks);
        # statistics of their own, as PCL's code (its mean models run forward in train mode)
        self.means = nn.ModuleList(TemporalMean(peer, max_decay=0.999, buffers="own") for peer in peers)
        self.ensemble = CollaborativeEnsemble(peers, combine="linear")

    def update(self) -> None:
        for mean, peer in zip(self.means, self.ensemble.members, strict=True):
            mean.update(peer)


def pcl(arch: str, rampup: int) -> tuple[nn.Module, Parts]:
    """PCL: three peers, the peer ensemble teacher and the mean models of the other peers teach each peer."""
    model = PeersWithMeans(models(arch, 3))
    criterion = OnlineDistillationLoss("pcl", rampup_steps=rampup)

    def parts(x: Tensor, y: Tensor, step: int) -> dict[str, Tensor]:
        out = model.ensemble(x)
        means = torch.stack([mean(x) for mean in model.means])  # (N, B, K): every peer saw the same images
        return criterion.components(out.member_logits, y, out.ensemble_logits, mean_logits=means, step=step)

    return model, parts


def mcl(arch: str, rampup: int) -> tuple[nn.Module, Parts]:
    """MCL-OKD: three branches on a shared trunk; their mean teaches the last, and each branch's embeddings are
    contrasted with the other branches' memories of the same samples (weight 0.025, as its code)."""
    branches = SharedTrunk(models(arch, 3), stage="layer3")
    taps = [FeatureTap(branch) for branch in branches.branches]  # their pooled features feed the embedding heads
    contrast = PeerContrast([tap.classifier.in_features for tap in taps], num_samples=SAMPLES, negatives=32)
    criterion = OnlineDistillationLoss("mcl", rampup_steps=rampup)

    def parts(x: Tensor, y: Tensor, step: int) -> dict[str, Tensor]:
        terms = criterion.components(branches(x).member_logits, y, step=step)
        index = (torch.arange(x.shape[0]) + step * x.shape[0]) % SAMPLES  # the batch's dataset indices
        terms["contrast"] = 0.025 * contrast([tap.pooled for tap in taps], index)
        return {**terms, "total": terms["total"] + terms["contrast"]}

    return nn.ModuleList([branches, contrast]), parts


def cekd(arch: str, rampup: int) -> tuple[nn.Module, Parts]:
    """CEKD: two members, cross distillation and their ensemble teaching both."""
    ensemble = CollaborativeEnsemble(models(arch, 2))
    criterion = OnlineDistillationLoss("cekd", rampup_steps=rampup)

    def parts(x: Tensor, y: Tensor, step: int) -> dict[str, Tensor]:
        out = ensemble(x)
        return criterion.components(out.member_logits, y, teacher_logits=out.ensemble_logits, step=step)

    return ensemble, parts


METHODS = {"dml": dml, "one": one, "ffl": ffl, "pcl": pcl, "mcl": mcl, "cekd": cekd}


def train(name: str, arch: str, steps: int) -> str:
    """A few steps of one method on random 32 px images; the last step's loss terms as one line."""
    torch.manual_seed(0)
    model, parts = METHODS[name](arch, rampup=steps)
    mixer = MixingAugmenter("cutmix", CLASSES, generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for step in range(steps):
        images, labels = torch.rand(8, 3, 32, 32), torch.randint(0, CLASSES, (8,))
        batch = mixer(images, labels)
        terms = parts(batch.images, batch.targets, step)
        optimizer.zero_grad()
        terms["total"].backward()
        optimizer.step()
        if isinstance(model, PeersWithMeans):
            model.update()
    return f"{name:5} " + "  ".join(f"{term} {value.item():.3f}" for term, value in terms.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--arch", default="test_resnet", help="a timm ResNet (ONE splits it at layer3)")
    args = parser.parse_args()
    for name in METHODS:
        print(train(name, args.arch, args.steps))
    print("every method trained; docs/online.rst says what each one evaluates")


if __name__ == "__main__":
    main()
