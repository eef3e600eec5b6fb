"""Demo of the mixing augmenter: MixUp, CutMix and SnapMix on a small generated batch.

Draws a batch of 64 px "birds" (a body blob on clutter, the class given by the colour of a small
head mark), mixes it with each method, prints what each did to the labels and how long it took,
and saves a picture of the mixed images (``--out``, needs matplotlib).

    python examples/demo_mixing.py [--batch 16] [--out runs/demo_mixing.png] [--device cpu]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torchvision

from cekd_losses import FeatureTap, MixedBatch, MixingAugmenter

MARK_COLOURS = torch.tensor([[1.0, 0.1, 0.1], [0.1, 0.9, 0.1], [0.1, 0.3, 1.0], [1.0, 0.9, 0.1]])


def draw_batch(batch: int, size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (B, 3, size, size) of a grey body on noise with a small coloured head mark; labels = mark colour."""
    labels = torch.randint(0, len(MARK_COLOURS), (batch,), generator=generator)
    images = 0.3 * torch.rand(batch, 3, size, size, generator=generator)
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    centre = size * (0.3 + 0.4 * torch.rand(batch, 2, generator=generator))
    body = ((ys - centre[:, 0, None, None]) / (0.25 * size)) ** 2 + (
        (xs - centre[:, 1, None, None]) / (0.18 * size)
    ) ** 2 < 1
    images = torch.where(body[:, None], torch.full_like(images, 0.6), images)
    head = (ys - (centre[:, 0, None, None] - 0.2 * size)).abs().le(2) & (xs - centre[:, 1, None, None]).abs().le(2)
    return torch.where(head[:, None], MARK_COLOURS[labels][:, :, None, None], images), labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="runs/demo_mixing.png", help="picture of the mixed batches ('' to skip)")
    args = parser.parse_args()

    device = torch.device(args.device)
    generator = torch.Generator().manual_seed(0)
    images, labels = draw_batch(args.batch, args.size, generator)
    images, labels = images.to(device), labels.to(device)
    num_classes = len(MARK_COLOURS)

    # SnapMix weighs labels by class activation maps: read them from a model's own forward.
    model = torchvision.models.resnet18(num_classes=num_classes).to(device)
    cams = FeatureTap(model).cams(images, labels, size=args.size, eval_mode=True)

    rows = []
    print(f"batch {tuple(images.shape)} on {device}, {num_classes} classes")
    print(f"{'method':8} {'mixed':>6} {'mean lam_a':>10} {'mean lam_b':>10} {'row sum':>12} {'ms/call':>8}")
    for method in ("mixup", "cutmix", "snapmix"):
        mixer = MixingAugmenter(
            method, num_classes, mix_alpha=1.0, generator=torch.Generator(device=device).manual_seed(1)
        )
        extra = cams if method == "snapmix" else None
        start = time.perf_counter()
        out = mixer(images, labels, extra)
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = 1000 * (time.perf_counter() - start)
        sums = out.targets.sum(1)
        print(
            f"{method:8} {int(out.applied.sum()):>6} {out.lam_a.mean():>10.3f} {out.lam_b.mean():>10.3f} "
            f"{sums.min():>5.2f}-{sums.max():<5.2f} {elapsed:>8.1f}"
        )
        rows.append((method, out))

    if args.out:
        save_figure(images, labels, rows, args.out)


def save_figure(images: torch.Tensor, labels: torch.Tensor, rows: list[tuple[str, MixedBatch]], out: str) -> None:
    """The clean batch above each method's mix of it (up to 8 columns), with each image's weights and partner."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = min(8, len(images))
    figure, axes = plt.subplots(len(rows) + 1, shown, figsize=(1.6 * shown, 1.8 * (len(rows) + 1)))
    for column in range(shown):
        axes[0, column].imshow(images[column].permute(1, 2, 0).cpu().clamp(0, 1).numpy())
        axes[0, column].set_title(f"class {int(labels[column])}", fontsize=7)
        for row, (method, mixed) in enumerate(rows, start=1):
            axes[row, column].imshow(mixed.images[column].permute(1, 2, 0).cpu().float().clamp(0, 1).numpy())
            partner = int(labels[mixed.partner[column]])
            axes[row, column].set_title(
                f"{method} {mixed.lam_a[column]:.2f}/{mixed.lam_b[column]:.2f} c{partner}", fontsize=6
            )
    for axis in axes.flat:
        axis.axis("off")
    figure.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=120)
    print(f"saved {out}")


if __name__ == "__main__":
    main()
