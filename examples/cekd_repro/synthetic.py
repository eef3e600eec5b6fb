"""The reproduction's procedural fine-grained set ("birds") and its source tasks for transfer.

The synthetic set carries the problem CEKD addresses: a large object with random pose,
scale and colour on a cluttered background, drawn the same way for every class, and a class decided
only by two small parts on the object: the colour of a head mark and the orientation of a stripe
patch, each a few percent of the image. A CutMix box therefore often removes or adds the evidence
while its area says otherwise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import Dataset

MARK_COLOURS = [
    (0.95, 0.1, 0.1),
    (0.1, 0.85, 0.1),
    (0.15, 0.35, 1.0),
    (1.0, 0.85, 0.0),
    (0.9, 0.2, 0.9),
    (0.0, 0.9, 0.9),
]
STRIPE_ANGLES = [0, 60, 120, 30, 90, 150]  # degrees; no horizontal flips are used on this set
SOURCE_SEED_OFFSET = 1_000  # the source task's images are drawn from seeds apart from the target's


@dataclass(frozen=True)
class SyntheticSpec:
    """How much synthetic data to draw: classes = colours x orientations."""

    num_classes: int = 12
    train_per_class: int = 80
    test_per_class: int = 40
    size: int = 64
    seed: int = 0
    decoys: int = 2

    def factors(self) -> tuple[int, int]:
        # the most balanced split, colours >= orientations: 12 -> 4 colours x 3 orientations
        for colours in range(math.isqrt(self.num_classes - 1) + 1, len(MARK_COLOURS) + 1):
            if self.num_classes % colours == 0 and self.num_classes // colours <= len(STRIPE_ANGLES):
                return colours, self.num_classes // colours
        raise ValueError(
            f"--classes must be a product colours x orientations with colours <= {len(MARK_COLOURS)} and "
            f"orientations <= {len(STRIPE_ANGLES)}, got {self.num_classes}"
        )


def draw_birds(labels: Tensor, size: int, colours: int, generator: torch.Generator, decoys: int = 2) -> Tensor:
    """(N, 3, size, size) float images in [0, 1] of the synthetic fine-grained classes ``labels``, with
    ``decoys`` part-like distractors (a disc and a striped square each) in the background."""
    n = labels.shape[0]
    u = lambda *shape: torch.rand(*shape, generator=generator)  # noqa: E731
    ys, xs = torch.meshgrid(
        torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32), indexing="ij"
    )
    ys, xs = ys[None], xs[None]
    # clutter: smooth colour blobs and pixel noise, the same for every class
    images = 0.25 + 0.2 * u(n, 3, 1, 1) + 0.08 * torch.randn(n, 3, size, size, generator=generator)
    for _ in range(6):
        cy, cx, radius = size * u(n, 1, 1), size * u(n, 1, 1), size * (0.05 + 0.15 * u(n, 1, 1))
        blob = torch.exp(-((ys - cy) ** 2 + (xs - cx) ** 2) / (2 * radius**2))
        images = images + 0.35 * (u(n, 3, 1, 1) - 0.5) * blob[:, None]
    # decoys: part-like clutter (discs in the mark colours, striped squares at any orientation) in the
    # background, so the evidence is only where it sits on the body, not anywhere in the image
    palette = torch.tensor(MARK_COLOURS[:colours])
    for _ in range(decoys):
        dy, dx = size * u(n, 1, 1), size * u(n, 1, 1)
        disc = (ys - dy) ** 2 + (xs - dx) ** 2 <= (size * 0.06) ** 2
        colour = palette[torch.randint(0, colours, (n,), generator=generator)]
        images = torch.where(disc[:, None], colour[:, :, None, None], images)
        sy, sx, theta = size * u(n, 1, 1), size * u(n, 1, 1), math.pi * u(n, 1, 1)
        square = ((ys - sy).abs() <= size * 0.08) & ((xs - sx).abs() <= size * 0.08)
        lines = (
            torch.sin(((xs - sx) * torch.cos(theta) + (ys - sy) * torch.sin(theta)) * (2 * math.pi / (size * 0.06))) > 0
        )
        images = torch.where(square[:, None], (0.1 + 0.8 * lines.float())[:, None].expand(n, 3, size, size), images)
    # body: a rotated ellipse of random pose, scale and colour
    cy, cx = size * (0.35 + 0.3 * u(n, 1, 1)), size * (0.35 + 0.3 * u(n, 1, 1))
    angle = 2 * math.pi * u(n, 1, 1)
    length, width = size * (0.22 + 0.08 * u(n, 1, 1)), size * (0.12 + 0.04 * u(n, 1, 1))
    cos, sin = torch.cos(angle), torch.sin(angle)
    along = (xs - cx) * cos + (ys - cy) * sin
    across = -(xs - cx) * sin + (ys - cy) * cos
    body = (along / length) ** 2 + (across / width) ** 2 <= 1
    body_colour = 0.3 + 0.4 * u(n, 1, 1, 1) + 0.1 * (u(n, 3, 1, 1) - 0.5)
    images = torch.where(body[:, None], body_colour.expand(n, 3, 1, 1), images)
    # head mark (class part 1): a small disc of the class colour at the front of the body
    mark = torch.tensor(MARK_COLOURS[:colours])[labels % colours]
    head_y, head_x = cy + 0.75 * length * sin, cx + 0.75 * length * cos
    radius = size * 0.06
    head = (ys - head_y) ** 2 + (xs - head_x) ** 2 <= radius**2
    images = torch.where(head[:, None], mark[:, :, None, None], images)
    # stripe patch (class part 2): a small square at the rear whose stripes have the class orientation
    stripe_angle = torch.tensor(STRIPE_ANGLES, dtype=torch.float32)[labels // colours].view(n, 1, 1) * math.pi / 180
    patch_y, patch_x = cy - 0.45 * length * sin, cx - 0.45 * length * cos
    half = size * 0.08
    in_patch = ((ys - patch_y).abs() <= half) & ((xs - patch_x).abs() <= half)
    phase = (xs - patch_x) * torch.cos(stripe_angle) + (ys - patch_y) * torch.sin(stripe_angle)
    stripes = (torch.sin(phase * (2 * math.pi / (size * 0.06))) > 0).float()
    images = torch.where(in_patch[:, None], (0.1 + 0.8 * stripes)[:, None].expand(n, 3, size, size), images)
    return images.clamp(0, 1)


class TensorImages(Dataset):
    """Images held in memory as a (N, C, H, W) uint8 tensor; items are (uint8 image, label)."""

    def __init__(self, images: Tensor, labels: Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return self.images[i], int(self.labels[i])


def synthetic_splits(spec: SyntheticSpec) -> tuple[TensorImages, TensorImages, int]:
    """(train, test, num_classes), deterministic for ``spec.seed``; drawn in memory in seconds."""
    colours, _ = spec.factors()
    splits = []
    for offset, per_class in ((0, spec.train_per_class), (1, spec.test_per_class)):
        generator = torch.Generator().manual_seed(spec.seed * 2 + offset)
        labels = torch.arange(spec.num_classes).repeat_interleave(per_class)
        labels = labels[torch.randperm(labels.numel(), generator=generator)]
        images = draw_birds(labels, spec.size, colours, generator, spec.decoys)
        splits.append(TensorImages((images * 255).round().to(torch.uint8), labels))
    return splits[0], splits[1], spec.num_classes


def source_pairs(spec: SyntheticSpec, kind: str = "near") -> list[int]:
    """The transfer proxy's source classes, as labels of the full 6 x 6 grid (colour + 6 x orientation) of
    (head colour, stripe orientation) pairs, drawn the same way as the target task of ``spec.num_classes``:

    - ``near`` (``--dataset synthetic-source``): every pair the target does not use. The classes are
      disjoint, but each of the target's colours and orientations is a part of some source class (12
      target classes leave 24 source classes);
    - ``colours`` (``--dataset synthetic-colours``): the target's colours (and the others) on stripe
      orientations the target never uses (18 classes for 12 target classes);
    - ``distant`` (``--dataset synthetic-distant``): the pairs that share neither colour nor orientation
      with any target class (12 target classes leave 6): the target's parts are never a source class's."""
    colours, orientations = spec.factors()
    keep = {
        "near": lambda c, a: c >= colours or a >= orientations,
        "colours": lambda c, a: a >= orientations,
        "distant": lambda c, a: c >= colours and a >= orientations,
    }[kind]
    grid = len(MARK_COLOURS)
    return [c + grid * a for a in range(len(STRIPE_ANGLES)) for c in range(grid) if keep(c, a)]


def source_splits(spec: SyntheticSpec, kind: str = "near") -> tuple[TensorImages, TensorImages, int]:
    """(train, test, num_classes) of the source task (:func:`source_pairs`), ``spec.train_per_class`` and
    ``spec.test_per_class`` images per class, deterministic for ``spec.seed`` (drawn apart from the target)."""
    pairs = torch.tensor(source_pairs(spec, kind))
    splits = []
    for offset, per_class in ((0, spec.train_per_class), (1, spec.test_per_class)):
        generator = torch.Generator().manual_seed(spec.seed * 2 + offset + SOURCE_SEED_OFFSET)
        labels = torch.arange(len(pairs)).repeat_interleave(per_class)
        labels = labels[torch.randperm(labels.numel(), generator=generator)]
        images = draw_birds(pairs[labels], spec.size, len(MARK_COLOURS), generator, spec.decoys)
        splits.append(TensorImages((images * 255).round().to(torch.uint8), labels))
    return splits[0], splits[1], len(pairs)
