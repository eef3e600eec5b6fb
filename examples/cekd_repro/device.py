"""Devices of a run: the ``--device`` flag, the process group under torchrun, and the one place that
moves tensors to the device and reads values back (:class:`Placement`)."""

from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist
from torch import Tensor, nn


def run_device(name: str, local_rank: int = 0) -> torch.device:
    """The torch device of ``--device name`` (under torchrun, ``cuda`` means this rank's GPU); a clear error
    if it is unusable."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device must be a torch device such as cpu, cuda or cuda:1, got {name!r}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: no CUDA GPU is visible here (torch.cuda.is_available() is False)")
        index = local_rank if device.index is None else device.index
        if index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: there are only {torch.cuda.device_count()} CUDA device(s)")
        return torch.device("cuda", index)
    return device


def distributed_ranks(device_name: str) -> tuple[int, int, int]:
    """(rank, world size, local rank); under torchrun, initialises the process group with the backend
    of the run's device (nccl for CUDA, gloo otherwise), whatever else the machine has."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device_name.startswith("cuda") else "gloo")
    rank = dist.get_rank() if world > 1 else 0
    return rank, world, int(os.environ.get("LOCAL_RANK", "0"))


class Placement:
    """The one place where the engine moves tensors to the run's device and reads values back.

    Batches arrive from the loader as uint8 images (B, C, H, W) and int64 labels (B,) in pinned host
    memory; :meth:`batch` copies them without blocking, converts and normalises the images on the
    device, and applies the memory format. :meth:`read` is the only host read of the run (once per
    epoch). Tests run the engine on the ``meta`` device, where any tensor that missed this class
    meets a device tensor and fails, as it would on a GPU.
    """

    def __init__(
        self,
        device: torch.device,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        channels_last: bool = False,
        amp: str = "none",
    ) -> None:
        self.device = device
        # x / 255 normalised = x * scale - shift, one fused multiply-add on the device
        self.scale = (1.0 / (255.0 * torch.tensor(std))).view(1, -1, 1, 1).to(device)
        self.neg_shift = (-torch.tensor(mean) / torch.tensor(std)).view(1, -1, 1, 1).to(device)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)

    def module(self, module: nn.Module) -> nn.Module:
        return module.to(self.device, memory_format=self.memory_format)

    def images(self, images: Tensor) -> Tensor:
        """uint8 (or [0, 1] float) host images -> normalised float32 images on the device."""
        # the memory format is applied to the small uint8 batch; the float ops below keep it
        images = images.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)
        scale = self.scale if images.dtype == torch.uint8 else self.scale * 255.0
        normalised = torch.addcmul(self.neg_shift, images.float(), scale)
        return normalised.contiguous(memory_format=self.memory_format)  # a no-op when the layout was kept

    def batch(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        return self.images(images), labels.to(self.device, non_blocking=True)

    def generator(self, seed: int) -> torch.Generator:
        """A seeded generator for the mixer's draws: on the GPU for a CUDA run (no per-step transfer)."""
        return torch.Generator(device=self.device if self.device.type == "cuda" else "cpu").manual_seed(seed)

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    @staticmethod
    def read(values: dict[str, Tensor]) -> dict[str, list[float]]:
        """Host values of device tensors (one sync for all of them)."""
        names = list(values)
        flat = torch.cat([values[name].detach().double().flatten() for name in names]).tolist()
        out, start = {}, 0
        for name in names:
            count = values[name].numel()
            out[name], start = flat[start : start + count], start + count
        return out
