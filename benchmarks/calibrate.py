"""This machine's speed in one figure, to scale the times the docs quote: a torchvision resnet18 forward and
backward of a 16 x 3 x 64 x 64 batch on 2 threads (median of 15 after 3 warm-up steps).

    python benchmarks/calibrate.py

The docs quote it beside every CPU time (154 ms on the slowest 2-core machine measured, 88 ms on a fast one);
machines of one kind and one machine over a day differ 2x, so time a command right after this figure.
"""

from __future__ import annotations

import statistics
import time

import torch
import torchvision


def calibration_ms(threads: int = 2, rounds: int = 15) -> float:
    """Median milliseconds of one resnet18 forward + backward of 16 x 3 x 64 x 64 on ``threads`` threads."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    images = torch.rand(16, 3, 64, 64)
    times = []
    for step in range(rounds + 3):
        start = time.perf_counter()
        model(images).sum().backward()
        if step >= 3:
            times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


if __name__ == "__main__":
    print(f"resnet18 forward + backward, 16 x 3 x 64 x 64, 2 threads: {calibration_ms():.0f} ms")
