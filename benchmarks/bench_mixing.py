"""Time this library's mixing against its peers on one batch, in one run, and print ratios.

Peers: timm's Mixup (``elem`` = per-sample parameters through a Python loop over the batch,
``batch`` = one draw for the whole batch), Kornia's RandomMixUpV2 / RandomCutMixV2, and a
loop-based SnapMix reference that follows the SnapMix authors' algorithm (one box pair and lambda
per batch, per-image CAM normalisation loops). All candidates run interleaved, round after round,
and each one's median milliseconds per call is reported.

    python benchmarks/bench_mixing.py [--batch 32] [--size 224] [--rounds 30] [--device cpu|cuda]

Two CPU proxies of the launch-bound GPU cost (see docs/benchmarks.rst):

    python benchmarks/bench_mixing.py --ops        # kernel-launching ops and host reads per call, 32x3x64x64
    python benchmarks/bench_mixing.py --overhead   # median us per call on a tiny batch, 32x3x8x8, one thread
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
import warnings
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from cekd_losses import MixingAugmenter, RandomCutMix, RandomMixUp


def reference_snapmix(images, labels, raw_cams, alpha):
    """SnapMix as in the authors' code: one lambda pair and box pair for the batch, loops per image."""
    batch, _, height, width = images.shape
    maps = F.interpolate(raw_cams[:, None], size=(height, width), mode="bilinear", align_corners=False)[:, 0]
    for i in range(batch):
        maps[i] -= maps[i].min()
        maps[i] /= maps[i].sum()
    lam_a = torch.ones(batch, device=images.device)
    lam_b = 1 - lam_a
    index = torch.randperm(batch, device=images.device)
    labels_b = labels[index]
    maps_b = maps[index]
    same_label = labels == labels_b

    def rand_bbox(lam):
        cut = np.sqrt(1.0 - lam)
        cut_h, cut_w = int(height * cut), int(width * cut)
        cy, cx = np.random.randint(height), np.random.randint(width)
        y1, y2 = np.clip(cy - cut_h // 2, 0, height), np.clip(cy + cut_h // 2, 0, height)
        x1, x2 = np.clip(cx - cut_w // 2, 0, width), np.clip(cx + cut_w // 2, 0, width)
        return y1, y2, x1, x2

    y1, y2, x1, x2 = rand_bbox(np.random.beta(alpha, alpha))
    sy1, sy2, sx1, sx2 = rand_bbox(np.random.beta(alpha, alpha))
    area, source_area = (y2 - y1) * (x2 - x1), (sy2 - sy1) * (sx2 - sx1)
    if area > 0 and source_area > 0:
        patch = images[index, :, sy1:sy2, sx1:sx2].clone()
        patch = F.interpolate(patch, size=(y2 - y1, x2 - x1), mode="bilinear", align_corners=True)
        images[:, :, y1:y2, x1:x2] = patch
        lam_a = 1 - maps[:, y1:y2, x1:x2].sum(2).sum(1) / (maps.sum(2).sum(1) + 1e-8)
        lam_b = maps_b[:, sy1:sy2, sx1:sx2].sum(2).sum(1) / (maps_b.sum(2).sum(1) + 1e-8)
        own = lam_a.clone()
        lam_a[same_label] += lam_b[same_label]
        lam_b[same_label] += own[same_label]
        fraction = area / (height * width)
        lam_a[torch.isnan(lam_a)] = 1 - fraction
        lam_b[torch.isnan(lam_b)] = fraction
    return images, labels, labels_b, lam_a, lam_b


def time_interleaved(
    candidates: dict[str, Callable[[], object]], rounds: int, device: torch.device
) -> dict[str, float]:
    """Median ms per call of every candidate, timed one call each per round, rounds interleaved."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for fn in candidates.values():  # warm-up
        for _ in range(3):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, fn in candidates.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            samples[name].append(1000 * (time.perf_counter() - start))
    return {name: statistics.median(values) for name, values in samples.items()}


CONFIGS = [(method, same) for method in ("mixup", "cutmix", "snapmix") for same in (False, True)]
OP_BUDGETS = {"mixup": 9, "cutmix": 22, "snapmix": 59}  # tests/test_launch_floor.py: 1.25x the counts of 2026-12-03


def peer_calls(images: torch.Tensor, labels: torch.Tensor, classes: int) -> dict[str, Callable[[], object]]:
    """timm Mixup (elem and batch modes), torchvision v2 and Kornia on the same batch, p = 1."""
    import kornia.augmentation as KA
    from timm.data import Mixup
    from torchvision.transforms import v2

    calls: dict[str, Callable[[], object]] = {}
    for mode in ("elem", "batch"):
        for name, alphas in (("mixup", (1.0, 0.0)), ("cutmix", (0.0, 1.0))):
            mixer = Mixup(
                mixup_alpha=alphas[0], cutmix_alpha=alphas[1], mode=mode, label_smoothing=0.0, num_classes=classes
            )
            calls[f"timm {name} {mode}"] = lambda m=mixer: m(images.clone(), labels.clone())  # timm mixes in place
    others = {
        "torchvision v2 mixup batch": v2.MixUp(num_classes=classes),
        "torchvision v2 cutmix batch": v2.CutMix(num_classes=classes),
        "kornia mixup elem": KA.RandomMixUpV2(p=1.0, data_keys=["input", "class"]),
        "kornia cutmix elem": KA.RandomCutMixV2(p=1.0, data_keys=["input", "class"]),
    }
    for name, augmentation in others.items():
        calls[name] = lambda a=augmentation: a(images, labels)
    return calls


def our_calls(
    images: torch.Tensor, labels: torch.Tensor, cams: torch.Tensor, classes: int
) -> dict[str, Callable[[], object]]:
    calls: dict[str, Callable[[], object]] = {}
    for method, same in CONFIGS:
        mixer = MixingAugmenter(method, classes, same_on_batch=same)
        calls[f"ours {method} {'batch' if same else 'elem'}"] = (
            lambda m=mixer, c=(cams if method == "snapmix" else None): m(images, labels, c)
        )
    for methods in (["mixup", "cutmix"], ["cutmix", "snapmix"]):  # a choice per sample, as timm's switch
        mixer = MixingAugmenter(methods, classes)
        calls[f"ours {'+'.join(methods)} elem"] = lambda m=mixer, c=(cams if "snapmix" in methods else None): m(
            images, labels, c
        )
    keys = ["input", "class"]  # the Kornia-native classes, called as Kornia's own
    for name, augmentation in (
        ("RandomMixUp", RandomMixUp(data_keys=keys)),
        ("RandomCutMix", RandomCutMix(data_keys=keys)),
    ):
        calls[f"ours {name} (kornia form)"] = lambda a=augmentation: a(images, labels)
    return calls


def print_ops() -> None:
    """Kernel-launching ops and host reads per call at 32x3x64x64 on CPU, value checks off (as on a GPU)."""
    from cekd_losses import _checks
    from cekd_losses._launches import count_launches

    _checks.can_read_values = lambda tensor: False  # CPU-only value checks: not what a CUDA call runs
    torch.manual_seed(0)
    images, labels, cams = torch.rand(32, 3, 64, 64), torch.randint(0, 200, (32,)), torch.rand(32, 2, 2)
    print(f"kernel-launching aten ops and host reads per call, 32x3x64x64, 200 classes; torch {torch.__version__}")
    for name, call in {**our_calls(images, labels, cams, 200), **peer_calls(images, labels, 200)}.items():
        launches = count_launches(call)
        method = name.split()[1]
        budget = f"  (budget {OP_BUDGETS[method]}, 0 reads)" if name.startswith("ours") and method in OP_BUDGETS else ""
        print(f"{name:30} {len(launches.ops):4d} ops {launches.reads:3d} host reads{budget}")


def print_overhead(rounds: int) -> None:
    """Median us per call on a tiny batch, interleaved with the peers, and the ratios against their ceilings."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    images, labels, cams = torch.rand(32, 3, 8, 8), torch.randint(0, 10, (32,)), torch.rand(32, 2, 2)
    calls = {**our_calls(images, labels, cams, 10), **peer_calls(images, labels, 10)}
    batched = {name: (lambda f=f: [f() for _ in range(20)]) for name, f in calls.items()}  # 20 calls a sample
    us = {name: ms * 1000 / 20 for name, ms in time_interleaved(batched, rounds, torch.device("cpu")).items()}
    print(
        f"median us per call, 32x3x8x8, 10 classes, one thread, {rounds} interleaved rounds; torch {torch.__version__}"
    )
    for name, value in us.items():
        print(f"{name:30} {value:8.0f}")
    print("\nratio                                   value   ceiling (a regression guard, not a target)")
    for method, same in CONFIGS:
        ours = us[f"ours {method} {'batch' if same else 'elem'}"]
        if method == "snapmix":
            label, peer, goal = (
                f"snapmix {'same_on_batch' if same else 'per-sample'} / timm cutmix batch",
                us["timm cutmix batch"],
                5.2,
            )
        elif same:
            label, peer, goal = f"{method} same_on_batch / timm batch", us[f"timm {method} batch"], 1.4
        else:
            fastest = min((v, k) for k, v in us.items() if k.split()[-1] == "elem" and method in k and "ours" not in k)
            label, peer, goal = f"{method} per-sample / {fastest[1]}", fastest[0], 0.5
        print(f"{label:38} {ours / peer:6.2f}x  <= {goal}")


def candidates(args: argparse.Namespace, device: torch.device) -> dict[str, Callable[[], object]]:
    """This library's mixers, timm's, Kornia's and the loop reference on one seeded batch, by name."""
    import kornia.augmentation as KA
    from timm.data import Mixup

    torch.manual_seed(0)
    np.random.seed(0)
    images = torch.rand(args.batch, 3, args.size, args.size, device=device)
    labels = torch.randint(0, args.classes, (args.batch,), device=device)
    raw_cams = torch.randn(args.batch, args.size // 32, args.size // 32, device=device)  # ResNet-level CAMs
    k = args.classes

    def ours(method: str, same_on_batch: bool = False) -> Callable[[], object]:
        mixer = MixingAugmenter(method, k, same_on_batch=same_on_batch)
        cams = raw_cams if method == "snapmix" else None
        return lambda: mixer(images, labels, cams)

    def timm_mixup(mode: str, cutmix: bool) -> Callable[[], object]:
        mixer = Mixup(
            mixup_alpha=0.0 if cutmix else 1.0,
            cutmix_alpha=1.0 if cutmix else 0.0,
            mode=mode,
            label_smoothing=0.0,
            num_classes=k,
        )
        scratch = images.clone()  # timm mixes in place
        return lambda: mixer(scratch, labels)

    kornia_mixup = KA.RandomMixUpV2(data_keys=["input", "class"])
    our_kornia_mixup = RandomMixUp(data_keys=["input", "class"])
    our_kornia_cutmix = RandomCutMix(data_keys=["input", "class"])
    kornia_cutmix = KA.RandomCutMixV2(data_keys=["input", "class"], use_correct_lambda=True)
    scratch_ref = images.clone()

    return {
        "ours mixup (per-sample)": ours("mixup"),
        "ours mixup (same_on_batch)": ours("mixup", True),
        "timm mixup elem": timm_mixup("elem", False),
        "timm mixup batch": timm_mixup("batch", False),
        "kornia RandomMixUpV2": lambda: kornia_mixup(images, labels),
        "ours RandomMixUp (kornia form)": lambda: our_kornia_mixup(images, labels),
        "ours cutmix (per-sample)": ours("cutmix"),
        "ours cutmix (same_on_batch)": ours("cutmix", True),
        "timm cutmix elem": timm_mixup("elem", True),
        "timm cutmix batch": timm_mixup("batch", True),
        "kornia RandomCutMixV2": lambda: kornia_cutmix(images, labels),
        "ours RandomCutMix (kornia form)": lambda: our_kornia_cutmix(images, labels),
        "ours snapmix (per-sample)": ours("snapmix"),
        "ours snapmix (same_on_batch)": ours("snapmix", True),
        "snapmix reference (loops)": lambda: reference_snapmix(scratch_ref, labels, raw_cams.clone(), 1.0),
    }


RATIOS = [
    ("mixup per-sample / timm elem", "ours mixup (per-sample)", "timm mixup elem"),
    ("mixup same_on_batch / timm batch", "ours mixup (same_on_batch)", "timm mixup batch"),
    ("mixup per-sample / kornia", "ours mixup (per-sample)", "kornia RandomMixUpV2"),
    ("RandomMixUp / kornia RandomMixUpV2", "ours RandomMixUp (kornia form)", "kornia RandomMixUpV2"),
    ("cutmix per-sample / timm elem", "ours cutmix (per-sample)", "timm cutmix elem"),
    ("cutmix same_on_batch / timm batch", "ours cutmix (same_on_batch)", "timm cutmix batch"),
    ("cutmix per-sample / kornia", "ours cutmix (per-sample)", "kornia RandomCutMixV2"),
    ("RandomCutMix / kornia RandomCutMixV2", "ours RandomCutMix (kornia form)", "kornia RandomCutMixV2"),
    ("snapmix per-sample / reference", "ours snapmix (per-sample)", "snapmix reference (loops)"),
    ("snapmix same_on_batch / reference", "ours snapmix (same_on_batch)", "snapmix reference (loops)"),
]
"""The ratios printed: (label, ours, peer)."""


def print_table(medians: dict[str, float], args: argparse.Namespace, device: torch.device) -> None:
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"
    )
    print(
        f"batch {args.batch}x3x{args.size}x{args.size} float32 on {device} ({name}); torch {torch.__version__}; "
        f"median of {args.rounds} rounds"
    )
    print(f"{'candidate':32} {'ms/call':>9}")
    for candidate, ms in medians.items():
        print(f"{candidate:32} {ms:9.2f}")
    print("\nratios (ours / peer; < 1 means ours is faster)")
    for label, a, b in RATIOS:
        print(f"{label:36} {medians[a] / medians[b]:6.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--classes", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--ops", action="store_true", help="count kernel-launching ops and host reads per call")
    parser.add_argument("--overhead", action="store_true", help="per-call time on a tiny batch against the peers")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")  # the peers' deprecation notices
    if args.ops:
        print_ops()
        return
    if args.overhead:
        print_overhead(args.rounds)
        return
    device = torch.device(args.device)
    print_table(time_interleaved(candidates(args, device), args.rounds, device), args, device)


if __name__ == "__main__":
    main()
