"""A kornia.augmentation pipeline on the GPU (geometric and colour augmentations), then the mixer.

Two ways to end the pipeline, on the same batch:

1. the Kornia-native mixers (``RandomCutMix``, ``RandomSnapMix``), called as Kornia's own mix classes:
   ``images, labels = mix(images, labels)`` with Kornia's label rows, turned into soft targets by
   ``kornia_soft_targets``;
2. ``MixingAugmenter``, which returns a ``MixedBatch`` (soft targets, partners, boxes).

Saves a picture of the augmented and mixed batch (``--out``, needs matplotlib).

    python examples/kornia_pipeline.py [--device cuda] [--batch 8] [--out runs/kornia_pipeline.png]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import kornia.augmentation as KA
import torch
import torchvision
from demo_mixing import MARK_COLOURS, draw_batch

from cekd_losses import FeatureTap, MixingAugmenter, RandomCutMix, RandomSnapMix, kornia_soft_targets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--classes", type=int, default=len(MARK_COLOURS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="runs/kornia_pipeline.png")
    args = parser.parse_args()
    device = torch.device(args.device)
    generator = torch.Generator(device=device).manual_seed(0)

    # a stand-in for a loader's batch: the demo's generated "birds" (class = colour of the head mark)
    torch.manual_seed(0)
    images, labels = draw_batch(args.batch, args.size, torch.Generator().manual_seed(0))
    images, labels = images.to(device), labels.to(device)
    model = torchvision.models.resnet18(num_classes=args.classes).to(device)

    # geometric and colour augmentation on the device, as Kornia users build it
    pipeline = torch.nn.Sequential(
        KA.RandomHorizontalFlip(),
        KA.RandomAffine(degrees=10.0, translate=(0.1, 0.1), scale=(0.9, 1.1), p=0.8),
        KA.ColorJitter(0.2, 0.2, 0.2, 0.05, p=0.8),
    ).to(device)
    augmented = pipeline(images)

    # 1. the Kornia-native mixers: Kornia's call and label rows
    cutmix = RandomCutMix(data_keys=["input", "class"], generator=generator)
    cut_images, cut_rows = cutmix(augmented, labels)
    snapmix = RandomSnapMix(FeatureTap(model), data_keys=["input", "class"], generator=generator)
    snap_images, snap_rows = snapmix(augmented, labels)
    targets = kornia_soft_targets(snap_rows, args.classes)  # (B, K), weighed by the CAMs
    print(f"RandomCutMix rows (label, partner, partner's pixel share):\n{cut_rows[0, :3].cpu()}")
    print(f"RandomSnapMix rows (label, partner, lam_a, lam_b):\n{snap_rows[:3].cpu()}")
    print(f"soft targets from them: {tuple(targets.shape)}, rows sum to {targets.sum(1)[:3].cpu().tolist()}")

    # 2. the same pipeline ending in MixingAugmenter: a MixedBatch
    mixer = MixingAugmenter("snapmix", args.classes, mix_alpha=5.0, generator=generator)
    batch = mixer(augmented, labels, FeatureTap(model).cams(augmented, labels))
    print(f"MixingAugmenter: images {tuple(batch.images.shape)}, targets {tuple(batch.targets.shape)}")

    save_picture(
        [images, augmented, cut_images, snap_images, batch.images],
        ["input", "kornia pipeline", "+ RandomCutMix", "+ RandomSnapMix", "+ MixingAugmenter"],
        args.out,
    )


def save_picture(rows: list[torch.Tensor], titles: list[str], out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    count = min(6, rows[0].shape[0])
    figure, axes = plt.subplots(len(rows), count, figsize=(1.6 * count, 1.6 * len(rows)), squeeze=False)
    for r, (images, title) in enumerate(zip(rows, titles, strict=True)):
        for c in range(count):
            axes[r, c].imshow(images[c].detach().clamp(0, 1).permute(1, 2, 0).cpu().numpy())
            axes[r, c].axis("off")
        axes[r, 0].set_title(title, fontsize=8, loc="left")
    figure.tight_layout()
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    print(f"picture in {path}")


if __name__ == "__main__":
    main()
