"""The paper's visual analysis: each member's class activation map on a few test images."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from cekd_losses import FeatureTap


@torch.no_grad()
def save_cam_figure(models: list[nn.Module], dataset, place, count: int, path: Path) -> None:
    """A PNG with ``count`` test images (rows) and each member's CAM for the true class (columns)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    count = min(count, len(dataset))
    images = torch.stack([dataset[i][0] for i in range(count)])
    labels = torch.tensor([dataset[i][1] for i in range(count)])
    inputs, device_labels = place.batch(images, labels)
    maps, predictions = [], []
    for model in models:
        model.eval()
        with FeatureTap(model) as tap, torch.no_grad():
            predictions.append(model(inputs).argmax(1).cpu())
            maps.append(tap.cams(inputs, device_labels, size=tuple(images.shape[-2:])).cpu())
    figure, axes = plt.subplots(count, len(models) + 1, figsize=(2.2 * (len(models) + 1), 2.2 * count), squeeze=False)
    for row in range(count):
        picture = images[row].permute(1, 2, 0).numpy()  # uint8 (H, W, C)
        axes[row, 0].imshow(picture)
        axes[row, 0].set_title(f"class {int(labels[row])}", fontsize=8)
        for column, (cam, predicted) in enumerate(zip(maps, predictions, strict=True), start=1):
            axes[row, column].imshow(picture)
            axes[row, column].imshow(cam[row].numpy(), cmap="jet", alpha=0.5)
            axes[row, column].set_title(f"member {column - 1}: pred {int(predicted[row])}", fontsize=8)
    for axis in axes.flat:
        axis.axis("off")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
