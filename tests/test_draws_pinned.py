"""The draws of a given generator state, pinned: the partners, lambdas, boxes and mixing decisions that
``MixingAugmenter`` and the Kornia classes drew at commit 82cf9f1, before the mixing core was split into
modules. A refactor of the draws must leave every one of them bit for bit (the lambdas are float32 values,
compared exactly); the pixels and targets follow from them through the kernels, tested elsewhere."""

from __future__ import annotations

import pytest
import torch

from cekd_losses import MixingAugmenter, RandomCutMix, RandomMixUp

# (method, same_on_batch, p, (H, W)) -> two consecutive calls of one mixer: its MixedBatch's fields
MIXER_DRAWS = {
    ("mixup", False, 0.5, (8, 8)): [
        {
            "partner": [1, 0, 2, 4, 4],
            "applied": [True, True, False, True, False],
            "lam_a": [0.09311738610267639, 0.6894961595535278, 1.0, 0.2890000343322754, 1.0],
        },
        {
            "partner": [0, 1, 2, 3, 4],
            "applied": [False, False, False, False, False],
            "lam_a": [0.48213255405426025, 0.8440133333206177, 1.0, 1.0, 1.0],
        },
    ],
    ("mixup", True, 1.0, (8, 8)): [
        {
            "partner": [1, 0, 3, 4, 2],
            "applied": [True, True, True, True, True],
            "lam_a": [
                0.09311738610267639,
                0.09311738610267639,
                0.09311738610267639,
                0.09311738610267639,
                0.09311738610267639,
            ],
        },
        {
            "partner": [0, 3, 4, 1, 2],
            "applied": [False, True, True, True, True],
            "lam_a": [
                0.9878230094909668,
                0.9878230094909668,
                0.9878230094909668,
                0.9878230094909668,
                0.9878230094909668,
            ],
        },
    ],
    ("cutmix", False, 0.5, (6, 10)): [
        {
            "partner": [0, 0, 2, 4, 2],
            "applied": [False, True, False, True, True],
            "boxes": [[0, 0, 0, 0], [5, 0, 10, 4], [0, 0, 0, 0], [3, 2, 8, 5], [5, 0, 10, 4]],
        },
        {
            "partner": [0, 1, 2, 2, 4],
            "applied": [False, False, False, True, False],
            "boxes": [[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 4, 2], [0, 0, 0, 0]],
        },
    ],
    ("cutmix", True, 0.5, (8, 8)): [
        {
            "partner": [0, 1, 2, 3, 4],
            "applied": [False, False, False, False, False],
            "boxes": [[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]],
        },
        {
            "partner": [4, 1, 0, 2, 3],
            "applied": [True, False, True, True, True],
            "boxes": [[1, 4, 4, 7], [1, 4, 4, 7], [1, 4, 4, 7], [1, 4, 4, 7], [1, 4, 4, 7]],
        },
    ],
    ("snapmix", False, 1.0, (6, 10)): [
        {
            "partner": [1, 0, 3, 4, 2],
            "applied": [True, True, True, True, True],
            "boxes": [[1, 1, 4, 2], [5, 1, 10, 4], [2, 2, 10, 6], [0, 0, 6, 3], [0, 5, 1, 6]],
            "source_boxes": [[0, 1, 4, 5], [5, 3, 10, 6], [0, 3, 6, 6], [7, 2, 10, 4], [3, 2, 7, 4]],
        },
        {
            "partner": [1, 0, 4, 2, 3],
            "applied": [True, True, True, True, True],
            "boxes": [[0, 3, 6, 6], [3, 0, 6, 1], [0, 3, 4, 6], [1, 2, 5, 4], [5, 0, 10, 2]],
            "source_boxes": [[6, 1, 10, 3], [2, 2, 10, 6], [4, 0, 7, 1], [2, 1, 10, 6], [5, 0, 8, 2]],
        },
    ],
    ("snapmix", True, 0.5, (8, 8)): [
        {
            "partner": [1, 0, 3, 4, 2],
            "applied": [True, True, True, True, True],
            "boxes": [[5, 1, 7, 3], [5, 1, 7, 3], [5, 1, 7, 3], [5, 1, 7, 3], [5, 1, 7, 3]],
            "source_boxes": [[0, 4, 5, 8], [0, 4, 5, 8], [0, 4, 5, 8], [0, 4, 5, 8], [0, 4, 5, 8]],
        },
        {
            "partner": [3, 4, 1, 2, 0],
            "applied": [True, True, True, True, True],
            "boxes": [[4, 3, 8, 8], [4, 3, 8, 8], [4, 3, 8, 8], [4, 3, 8, 8], [4, 3, 8, 8]],
            "source_boxes": [[0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 1, 1]],
        },
    ],
}

# two consecutive parameter draws of a 5 x 1 x 8 x 8 batch
KORNIA_DRAWS = {
    "mixup": [
        {
            "mix_pairs": [0, 3, 1, 4, 2],
            "mix_lambdas": [
                [0.6968502998352051],
                [0.4110572338104248],
                [0.7614887356758118],
                [0.6573664546012878],
                [0.6747893691062927],
            ],
            "batch_prob": [1.0, 1.0, 1.0, 1.0, 1.0],
        },
        {
            "mix_pairs": [4, 1, 0, 2, 3],
            "mix_lambdas": [
                [0.5402514934539795],
                [0.5120843648910522],
                [0.752286434173584],
                [0.789365291595459],
                [0.5685142278671265],
            ],
            "batch_prob": [1.0, 1.0, 1.0, 1.0, 1.0],
        },
    ],
    "cutmix": [
        {
            "mix_pairs": [0, 3, 1, 4, 2],
            "mix_lambdas": [
                [0.699999988079071],
                [0.20000000298023224],
                [0.699999988079071],
                [0.6434161067008972],
                [0.6869733929634094],
            ],
            "batch_prob": [1.0, 1.0, 1.0, 1.0, 1.0],
            "mix_boxes": [[[0, 0, 4, 3]], [[5, 4, 8, 7]], [[1, 0, 7, 6]], [[0, 0, 5, 6]], [[4, 0, 8, 5]]],
        },
        {
            "mix_pairs": [0, 1, 2, 3, 4],
            "mix_lambdas": [
                [0.5918230414390564],
                [0.699999988079071],
                [0.6810191869735718],
                [0.20000000298023224],
                [0.20000000298023224],
            ],
            "batch_prob": [0.0, 0.0, 0.0, 0.0, 0.0],
            "mix_boxes": [[[0, 0, 0, 0]], [[0, 0, 0, 0]], [[0, 0, 0, 0]], [[0, 0, 0, 0]], [[0, 0, 0, 0]]],
        },
    ],
}


@pytest.mark.parametrize("config", list(MIXER_DRAWS), ids=lambda c: "-".join(map(str, c)))
def test_the_mixers_draws_are_those_pinned(config):
    method, same_on_batch, p, (height, width) = config
    generator = torch.Generator().manual_seed(1)
    images, cams = torch.rand(5, 1, height, width, generator=generator), torch.rand(5, 3, 2, generator=generator)
    mixer = MixingAugmenter(
        method, 5, mix_alpha=0.7, p=p, same_on_batch=same_on_batch, generator=torch.Generator().manual_seed(3)
    )
    for pinned in MIXER_DRAWS[config]:
        batch = mixer(images, torch.arange(5), cams if method == "snapmix" else None)
        for name, values in pinned.items():
            dtype = torch.float32 if name == "lam_a" else None
            assert torch.equal(getattr(batch, name), torch.tensor(values, dtype=dtype)), name


@pytest.mark.parametrize("name", list(KORNIA_DRAWS))
def test_the_kornia_classes_draws_are_those_pinned(name):
    generator = torch.Generator().manual_seed(4)
    if name == "mixup":
        aug = RandomMixUp(lambda_val=(0.2, 0.6), generator=generator)
    else:
        aug = RandomCutMix(cut_size=(0.3, 0.8), p=0.5, generator=generator)
    for pinned in KORNIA_DRAWS[name]:
        params = aug.forward_parameters((5, 1, 8, 8))
        for key, values in pinned.items():
            expected = torch.tensor(values, dtype=params[key].dtype)
            assert torch.equal(params[key], expected), key
