"""Specifications of the timm drop-in: timm's own ``Mixup`` and ours give the same images and targets on the same
draws (timm's draws, made by timm's own functions, injected into our kernels), and our draws follow timm's laws."""

from __future__ import annotations

import numpy as np
import pytest
import timm.data.mixup as timm_mixup
import torch
from hypothesis import given
from hypothesis import strategies as st
from scipy import stats

from cekd_losses import Mixup, _checks, snapmix
from cekd_losses._launches import count_launches
from cekd_losses.timm_mix import TimmMixParameters

CONFIGS = {  # timm's keywords
    "mixup": {"mixup_alpha": 0.8, "cutmix_alpha": 0.0},
    "cutmix": {"mixup_alpha": 0.0, "cutmix_alpha": 1.0},
    "switch": {"mixup_alpha": 0.8, "cutmix_alpha": 1.0, "switch_prob": 0.5},
    "deit": {"mixup_alpha": 0.8, "cutmix_alpha": 1.0, "prob": 0.5, "label_smoothing": 0.1},
    "uncorrected": {"mixup_alpha": 0.0, "cutmix_alpha": 1.0, "correct_lam": False},
    "minmax": {"mixup_alpha": 0.0, "cutmix_minmax": (0.2, 0.8)},
}


def timm_draws(mixer: timm_mixup.Mixup, shape: tuple[int, ...]) -> tuple[TimmMixParameters, int]:
    """The parameters timm's ``Mixup`` draws for a batch of ``shape``, made by timm's own functions in the order
    its call makes them (so a NumPy seed gives the same draws), as one set per batch, pair or image."""
    batch = shape[0]
    if mixer.mode == "batch":
        lam, cut = mixer._params_per_batch()
        lams, cuts = np.array([lam], dtype=np.float64), np.array([cut])
    else:
        lams, cuts = mixer._params_per_elem(batch // 2 if mixer.mode == "pair" else batch)
        lams = lams.astype(np.float64)
    corners, blend = np.zeros((len(lams), 1, 2, 2), dtype=np.float32), lams.copy()
    used = np.zeros(len(lams), dtype=bool)
    for i, (lam, cut) in enumerate(zip(lams, cuts, strict=True)):
        if lam != 1.0 and cut:
            (yl, yh, xl, xh), lams[i] = timm_mixup.cutmix_bbox_and_lam(
                shape[1:], lam, ratio_minmax=mixer.cutmix_minmax, correct_lam=mixer.correct_lam
            )
            corners[i, 0], blend[i], used[i] = [[xl, yl], [xh, yh]], 1.0, True
    params = TimmMixParameters(
        torch.tensor(lams, dtype=torch.float32),
        torch.from_numpy(used),
        torch.from_numpy(corners),
        torch.tensor(blend, dtype=torch.float32),
    )
    return params, len(lams)


@pytest.mark.parametrize("mode", ["batch", "pair", "elem"])
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_timm_and_ours_mix_alike_on_timms_draws(config, mode, seed):
    kwargs = {"label_smoothing": 0.0, **CONFIGS[config], "mode": mode, "num_classes": 5}
    images, labels = torch.rand(8, 3, 12, 10, generator=torch.Generator().manual_seed(seed)), torch.arange(8) % 5
    np.random.seed(seed)
    theirs = timm_mixup.Mixup(**kwargs)
    their_images, their_targets = theirs(images.clone(), labels)
    np.random.seed(seed)
    params, sets = timm_draws(timm_mixup.Mixup(**kwargs), tuple(images.shape))
    if mode == "pair":  # ours holds one set per pair and the middle of an odd batch: 8 images, 4 pairs
        assert sets == 4
    ours = Mixup(**kwargs)
    our_images, our_targets = ours.apply(images, ours.smoothed_targets(labels, 8), params)
    # equal up to float32 rounding: our blend is one lerp where timm multiplies and adds
    assert torch.allclose(our_images, their_images, atol=1e-6)
    assert torch.allclose(our_targets, their_targets, atol=1e-6)


def test_smoothed_targets_are_timms():
    for smoothing in (0.0, 0.1, 0.3):
        ours = Mixup(num_classes=7, label_smoothing=smoothing).smoothed_targets(torch.tensor([3, 0, 6]), 3)
        assert torch.equal(ours, timm_mixup.mixup_target(torch.tensor([3, 0, 6]), 7, 1.0, smoothing))
    dense = torch.tensor([[1.0, 0.0, 1.0]])
    ours = Mixup(num_classes=3, label_smoothing=0.2, multi_label=True).smoothed_targets(dense, 1)
    assert torch.allclose(ours, torch.tensor([[0.9, 0.1, 0.9]]))


@given(seed=st.integers(0, 2**31 - 1), batch=st.integers(1, 9), mode=st.sampled_from(["batch", "pair", "elem"]))
def test_any_batch_size_mixes_each_image_with_the_other_end_and_keeps_targets_exact(seed, batch, mode):
    """Odd sizes too (timm refuses them): the middle image of an odd batch is its own partner and unchanged;
    every row of targets sums to 1 and holds only the image's and its partner's classes."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.arange(1.0, batch + 1).view(batch, 1, 1, 1).expand(batch, 1, 6, 6).contiguous()
    kwargs = {"mode": mode, "label_smoothing": 0.0, "num_classes": batch, "generator": generator}
    mixer = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, **kwargs)
    out, targets = mixer(images, torch.arange(batch))
    partner = torch.arange(batch - 1, -1, -1)
    assert torch.allclose(targets.sum(1), torch.ones(batch), atol=1e-6)
    others = torch.ones(batch, batch, dtype=torch.bool)
    others[torch.arange(batch), torch.arange(batch)] = others[torch.arange(batch), partner] = False
    assert (targets[others] == 0).all()
    if batch % 2:
        assert torch.equal(out[batch // 2], images[batch // 2])
    low, high = torch.minimum(images, images[partner]), torch.maximum(images, images[partner])
    assert ((out >= low - 1e-6) & (out <= high + 1e-6)).all()  # blended or pasted from the partner only
    if mode == "pair":  # a pair shares its lambda
        assert torch.allclose(targets[torch.arange(batch), torch.arange(batch)], targets[partner, partner])


def test_our_draws_follow_timms_laws():
    """Mixing rate prob, CutMix rate switch_prob, MixUp's lambda Beta(alpha, alpha), minmax boxes inside the image
    with sides in [min, max) of each side (20000 sets, 1e-3 tails)."""
    mixer = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, prob=0.7, switch_prob=0.3, mode="elem", correct_lam=False)
    mixer.generator = torch.Generator().manual_seed(0)
    params = mixer.draw((20000, 3, 32, 32), torch.device("cpu"))
    mixed = params.lam != 1
    assert abs(mixed.float().mean() - 0.7) < 0.012 and abs(params.use_cutmix[mixed].float().mean() - 0.3) < 0.012
    mixup_lam = params.lam[mixed & ~params.use_cutmix].double().numpy()
    assert stats.kstest(mixup_lam, stats.beta(0.8, 0.8).cdf).pvalue > 1e-3
    seeded = {"mode": "elem", "generator": torch.Generator().manual_seed(2)}
    boxes = Mixup(mixup_alpha=0.0, cutmix_minmax=(0.25, 0.75), **seeded).draw((5000, 3, 40, 24), torch.device("cpu"))
    sides = boxes.corners[:, 0, 1] - boxes.corners[:, 0, 0]  # (x, y)
    assert (boxes.corners >= 0).all() and (boxes.corners[..., 0] <= 24).all() and (boxes.corners[..., 1] <= 40).all()
    assert sides[:, 0].min() == 6 and sides[:, 0].max() == 17 and sides[:, 1].min() == 10 and sides[:, 1].max() == 29
    area = sides.prod(1) / (40 * 24)
    assert torch.allclose(boxes.lam, 1 - area)  # minmax boxes always correct lambda, as timm
    for correct in (True, False):  # Beta boxes: lambda corrected to the clipped box, or the draw itself
        mixer = Mixup(mixup_alpha=0.0, cutmix_alpha=1.0, correct_lam=correct, **seeded)
        drawn = mixer.draw((2000, 3, 16, 16), torch.device("cpu"))
        area = (drawn.corners[:, 0, 1] - drawn.corners[:, 0, 0]).prod(1) / 256
        assert torch.allclose(drawn.lam, 1 - area) == correct


def test_off_switch_and_host_reads():
    """mixup_enabled = False (timm's --mixup-off-epoch) leaves the images and smooths the targets; a call reads
    no value back to the host."""
    mixer = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, mode="elem", num_classes=4)
    images, labels = torch.rand(6, 3, 8, 8), torch.arange(6) % 4
    mixer.mixup_enabled = False
    out, targets = mixer(images, labels)
    assert out is images and torch.equal(targets, mixer.smoothed_targets(labels, 6))
    mixer.mixup_enabled = True
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_checks, "can_read_values", lambda tensor: False)  # as on a GPU
        assert count_launches(lambda: mixer(images, labels)).reads == 0


def test_it_compiles_whole():
    torch._dynamo.reset()
    mixer = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, mode="elem", num_classes=4)
    images, labels = torch.rand(6, 3, 8, 8), torch.arange(6) % 4
    compiled = torch.compile(lambda x, y: mixer(x, y), fullgraph=True, backend="eager")
    torch.manual_seed(3)
    eager = mixer(images, labels)
    torch.manual_seed(3)
    traced = compiled(images, labels)
    assert all(torch.equal(a, b) for a, b in zip(eager, traced, strict=True))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"mixup_alpha": 0.0, "cutmix_alpha": 0.0},
            "one of `mixup_alpha` > 0, `cutmix_alpha` > 0, `cutmix_minmax` or `snapmix_alpha`",
        ),
        ({"mixup_alpha": -1.0}, "`mixup_alpha` must be >= 0"),
        ({"mode": "sample"}, "`mode` must be one of 'batch', 'pair', 'elem', got 'sample'"),
        ({"prob": 1.5}, r"`prob` must be in \[0.0, 1.0\], got 1.5"),
        ({"cutmix_minmax": (0.8, 0.2)}, "`cutmix_minmax` must be a"),
        ({"label_smoothing": 1.0}, r"`label_smoothing` must be in \[0.0, 1.0\)"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        Mixup(**kwargs)
    with pytest.raises(ValueError, match=r"`target` must hold class ids in \[0, 3\), got values in \[0, 5\]"):
        Mixup(num_classes=3)(torch.rand(2, 3, 4, 4), torch.tensor([0, 5]))


def snapmix_setup(mode: str = "elem", **kwargs):
    g = torch.Generator().manual_seed(4)
    images, labels, cams = torch.rand(7, 3, 16, 12, generator=g), torch.arange(7) % 5, torch.rand(7, 4, 3, generator=g)
    mixup_fn = Mixup(
        num_classes=5, label_smoothing=0.0, mode=mode, generator=torch.Generator().manual_seed(1), **kwargs
    )
    return mixup_fn, images, labels, cams


@pytest.mark.parametrize("mode", ["batch", "pair", "elem"])
def test_snapmix_rows_are_the_snapmix_kernels(mode):
    """Each SnapMix row equals the public kernel on the same partner (B - 1 - i) and boxes, to the bit."""
    mixup_fn, images, labels, cams = snapmix_setup(mode, mixup_alpha=0.0, snapmix_alpha=2.0)
    targets = mixup_fn.smoothed_targets(labels, 7)
    params = mixup_fn.draw(tuple(images.shape), images.device)
    our_images, our_targets = mixup_fn.apply(images, targets, params, cams)
    sets = {"batch": [0] * 7, "pair": [0, 1, 2, 3, 2, 1, 0], "elem": list(range(7))}[mode]
    boxes = clipped_boxes(params.snap_corners[sets], 16, 12)
    expected = snapmix(images, targets, cams, torch.arange(6, -1, -1), boxes[:, 0], boxes[:, 1])
    assert torch.equal(our_images, expected.images) and torch.equal(our_targets, expected.targets)


def clipped_boxes(corners: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, 2, 4) int64 boxes of (B, 2, 2, 2) corners clipped to the image, written out."""
    x = corners[..., 0].clamp(0, width)
    y = corners[..., 1].clamp(0, height)
    return torch.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], dim=-1).long()


def test_snapmix_takes_its_share_and_leaves_the_other_draws_alone():
    """With MixUp and CutMix active, SnapMix is drawn for about snapmix_prob of the mixed images (binomial test)
    and every other image is mixed exactly as without SnapMix."""
    mixup_fn, images, labels, cams = snapmix_setup(
        mixup_alpha=0.8, cutmix_alpha=1.0, snapmix_alpha=5.0, snapmix_prob=0.3
    )
    without, *_ = snapmix_setup(mixup_alpha=0.8, cutmix_alpha=1.0)
    drawn = 0
    for seed in range(200):  # each call from the same generator state: SnapMix's draws come after the others
        mixup_fn.generator.manual_seed(seed)
        without.generator.manual_seed(seed)
        params = mixup_fn.draw(tuple(images.shape), images.device)
        plain = without.draw(tuple(images.shape), images.device)
        snapped = params.snap_corners.flatten(1).ne(0).any(dim=1)
        drawn += int(snapped.sum())
        for field in ("lam", "use_cutmix", "blend"):
            assert torch.equal(getattr(params, field)[~snapped], getattr(plain, field)[~snapped])
        assert torch.equal(params.corners[~snapped], plain.corners[~snapped])
    assert stats.binomtest(drawn, 200 * 7, 0.3).pvalue > 1e-4


def test_snapmix_cams_come_from_the_tap_or_the_call():
    import torchvision

    from cekd_losses import FeatureTap

    model = torchvision.models.resnet18(num_classes=5).eval()
    tap = FeatureTap(model)
    images, labels = torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    by_tap = Mixup(
        snapmix_alpha=5.0, mixup_alpha=0.0, num_classes=5, tap=tap, generator=torch.Generator().manual_seed(0)
    )
    by_call = Mixup(snapmix_alpha=5.0, mixup_alpha=0.0, num_classes=5, generator=torch.Generator().manual_seed(0))
    first, second = by_tap(images, labels), by_call(images, labels, cams=tap.cams(images, labels))
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    with pytest.raises(ValueError, match="needs CAMs: pass tap=FeatureTap"):
        Mixup(snapmix_alpha=5.0, num_classes=5)(images, labels)
    with pytest.raises(ValueError, match="needs class ids"):
        Mixup(snapmix_alpha=5.0, num_classes=5, multi_label=True)
    with pytest.raises(TypeError, match="`tap` must be a FeatureTap"):
        Mixup(snapmix_alpha=5.0, num_classes=5, tap=model)
