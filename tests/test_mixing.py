"""Specifications of the mixing kernels and MixingAugmenter."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from cekd_losses import MixedBatch, MixingAugmenter, cutmix, mixup, snapmix

FLOAT_DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def onehot(labels: torch.Tensor, k: int) -> torch.Tensor:
    return F.one_hot(labels, k).float()


def distinct_images(batch: int, channels: int, height: int, width: int, dtype=torch.float32, device="cpu"):
    """Image b is filled with the constant b + 1, so every pixel tells which image it came from."""
    values = torch.arange(1, batch + 1, dtype=dtype, device=device)
    return values.view(batch, 1, 1, 1).expand(batch, channels, height, width).contiguous()


# ---------------------------------------------------------------- exact values on tiny tensors


def test_mixup_exact_values():
    images = torch.tensor([[[[0.0, 1.0], [2.0, 3.0]]], [[[4.0, 5.0], [6.0, 7.0]]]])
    out = mixup(images, torch.eye(2), torch.tensor([1, 0]), torch.tensor([0.25, 1.0]))
    assert torch.equal(out.images[0], torch.tensor([[[3.0, 4.0], [5.0, 6.0]]]))  # 0.25*x0 + 0.75*x1
    assert torch.equal(out.images[1], images[1])
    assert torch.equal(out.targets, torch.tensor([[0.25, 0.75], [0.0, 1.0]]))
    assert torch.equal(out.lam_a, torch.tensor([0.25, 1.0]))
    assert torch.equal(out.lam_b, torch.tensor([0.75, 0.0]))
    assert out.applied.tolist() == [True, False]


def test_cutmix_exact_values():
    images = distinct_images(2, 1, 4, 4)
    boxes = torch.tensor([[1, 1, 3, 4], [0, 0, 4, 1]])  # 2x3 box in sample 0, top row in sample 1
    out = cutmix(images, torch.eye(2), torch.tensor([1, 0]), boxes)
    expected0 = torch.ones(4, 4)
    expected0[1:4, 1:3] = 2.0
    expected1 = torch.full((4, 4), 2.0)
    expected1[0, :] = 1.0
    assert torch.equal(out.images[0, 0], expected0)
    assert torch.equal(out.images[1, 0], expected1)
    assert torch.equal(out.lam_b, torch.tensor([6 / 16, 4 / 16]))
    assert torch.equal(out.lam_a, torch.tensor([10 / 16, 12 / 16]))
    assert torch.equal(out.targets, torch.tensor([[10 / 16, 6 / 16], [4 / 16, 12 / 16]]))


def test_snapmix_exact_values_same_size_boxes():
    # sample 1's bottom-right 2x2 block is copied unchanged into sample 0's top-left 2x2 block.
    images = torch.arange(32, dtype=torch.float32).view(2, 1, 4, 4)
    cams = torch.zeros(2, 4, 4)
    cams[0, 0, 0] = 1.0  # all of sample 0's evidence sits in its top-left pixel: covered
    cams[1, 3, 3] = 3.0  # sample 1: 3/4 of the mass in its bottom-right pixel ...
    cams[1, 0, 0] = 1.0  # ... and 1/4 in its top-left pixel, outside the source box
    out = snapmix(
        images,
        torch.eye(2),
        cams,
        torch.tensor([1, 0]),
        target_boxes=torch.tensor([[0, 0, 2, 2], [0, 0, 0, 0]]),
        source_boxes=torch.tensor([[2, 2, 4, 4], [0, 0, 0, 0]]),
    )
    expected = images[0, 0].clone()
    expected[0:2, 0:2] = images[1, 0, 2:4, 2:4]
    assert torch.allclose(out.images[0, 0], expected, atol=1e-5)
    assert torch.equal(out.images[1], images[1])
    assert torch.allclose(out.lam_a, torch.tensor([0.0, 1.0]))
    assert torch.allclose(out.lam_b, torch.tensor([0.75, 0.0]))
    assert torch.allclose(out.targets, torch.tensor([[0.0, 0.75], [0.0, 1.0]]))
    assert out.applied.tolist() == [True, False]


def test_snapmix_resizes_with_corners_aligned():
    # a 2x2 source block [[0, 3], [6, 9]] stretched over a 4x4 target: corners kept, steps of 1/3.
    images = torch.zeros(2, 1, 4, 4)
    images[1, 0, :2, :2] = torch.tensor([[0.0, 3.0], [6.0, 9.0]])
    out = snapmix(
        images,
        torch.eye(2),
        torch.rand(2, 4, 4),
        torch.tensor([1, 0]),
        target_boxes=torch.tensor([[0, 0, 4, 4], [0, 0, 0, 0]]),
        source_boxes=torch.tensor([[0, 0, 2, 2], [0, 0, 0, 0]]),
    )
    expected = torch.tensor([[0.0, 1, 2, 3], [2, 3, 4, 5], [4, 5, 6, 7], [6, 7, 8, 9]])
    assert torch.allclose(out.images[0, 0], expected, atol=1e-5)


def test_snapmix_same_label_pair_adds_weights():
    images = torch.rand(2, 1, 4, 4)
    cams = torch.rand(2, 4, 4)
    same = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    out = snapmix(
        images,
        same,
        cams,
        torch.tensor([1, 0]),
        target_boxes=torch.tensor([[0, 0, 2, 2], [1, 1, 4, 3]]),
        source_boxes=torch.tensor([[1, 1, 3, 4], [0, 0, 2, 2]]),
    )
    assert torch.allclose(out.targets[:, 0], out.lam_a + out.lam_b)
    assert torch.equal(out.targets[:, 1], torch.zeros(2))


def test_snapmix_falls_back_to_area_without_cam_mass():
    images = torch.rand(3, 1, 4, 4)
    cams = torch.stack([torch.zeros(4, 4), torch.full((4, 4), float("nan")), torch.rand(4, 4)])
    out = snapmix(
        images,
        torch.eye(3),
        cams,
        torch.tensor([1, 2, 0]),
        target_boxes=torch.tensor([[0, 0, 2, 2], [0, 0, 4, 1], [0, 0, 1, 1]]),
        source_boxes=torch.tensor([[1, 1, 3, 3], [0, 0, 4, 4], [2, 2, 4, 4]]),
    )
    # sample 0: own CAM flat -> lam_a = 1 - 4/16; partner 1 has a NaN CAM -> lam_b = 4/16.
    assert out.lam_a[0].item() == pytest.approx(0.75)
    assert out.lam_b[0].item() == pytest.approx(0.25)
    # sample 1: own CAM NaN -> 1 - 4/16; partner 2 has a real CAM covering all of it -> 1.
    assert out.lam_a[1].item() == pytest.approx(0.75)
    assert out.lam_b[1].item() == pytest.approx(1.0)
    # sample 2: partner 0's CAM is flat -> target area fraction 1/16.
    assert out.lam_b[2].item() == pytest.approx(1 / 16)
    assert torch.isfinite(out.targets).all()


def test_snapmix_falls_back_to_area_for_infinite_cam_mass():
    """An infinite pixel, or finite pixels whose sum overflows: the total is not finite, so no share of it is
    evidence; the target box's area fraction stands in (a 1-pixel box of finite mass would otherwise read 0)."""
    overflow = torch.full((4, 4), 3e38)
    overflow[3, 3] = 0.0  # minimum 0: every other pixel keeps 3e38, the sum overflows
    infinite = torch.rand(4, 4)
    infinite[0, 0] = float("inf")
    out = snapmix(
        torch.rand(2, 1, 4, 4),
        torch.eye(2),
        torch.stack([overflow, infinite]),
        torch.tensor([1, 0]),
        target_boxes=torch.tensor([[0, 0, 1, 1], [1, 1, 3, 3]]),
        source_boxes=torch.tensor([[2, 2, 4, 4], [0, 0, 2, 1]]),
    )
    assert torch.equal(out.lam_a, torch.tensor([1 - 1 / 16, 1 - 4 / 16]))
    assert torch.equal(out.lam_b, torch.tensor([1 / 16, 4 / 16]))


def test_snapmix_normalize_targets():
    images = torch.rand(2, 1, 4, 4)
    cams = torch.rand(2, 4, 4)
    args = (
        images,
        torch.eye(2),
        cams,
        torch.tensor([1, 0]),
        torch.tensor([[0, 0, 2, 2], [1, 1, 4, 3]]),
        torch.tensor([[1, 1, 3, 4], [0, 0, 2, 2]]),
    )
    raw = snapmix(*args)
    normed = snapmix(*args, normalize_targets=True)
    total = raw.lam_a + raw.lam_b
    assert torch.allclose(normed.lam_a, raw.lam_a / total)
    assert torch.allclose(normed.targets.sum(1), torch.ones(2))
    assert torch.equal(normed.images, raw.images)


def test_snapmix_resizes_feature_level_cams():
    images = torch.rand(2, 1, 8, 8)
    small = torch.rand(2, 2, 2)
    args = (
        torch.eye(2),
        None,
        torch.tensor([1, 0]),
        torch.tensor([[0, 0, 4, 4], [2, 2, 8, 8]]),
        torch.tensor([[4, 4, 8, 8], [0, 0, 3, 5]]),
    )
    up = F.interpolate(small[:, None], size=(8, 8), mode="bilinear", align_corners=False)[:, 0]
    a = snapmix(images, args[0], small, *args[2:])
    b = snapmix(images, args[0], up, *args[2:])
    assert torch.allclose(a.lam_a, b.lam_a) and torch.allclose(a.lam_b, b.lam_b)


# ---------------------------------------------------------------- slow reference for snapmix


def reference_snapmix(images, targets, cams, index, target_boxes, source_boxes):
    """Per-sample loops, straight from the SnapMix paper and reference code (without the same-label double count)."""
    batch, _, height, width = images.shape
    out = images.clone()
    maps = F.interpolate(cams.double()[:, None], size=(height, width), mode="bilinear", align_corners=False)[:, 0]
    normalised = []
    for b in range(batch):
        shifted = maps[b] - maps[b].min()
        total = shifted.sum()
        normalised.append(shifted / total if torch.isfinite(total) and total > 0 else None)
    lam_a = torch.ones(batch, dtype=torch.float64)
    lam_b = torch.zeros(batch, dtype=torch.float64)
    for b in range(batch):
        j = int(index[b])
        tx1, ty1, tx2, ty2 = (int(v) for v in target_boxes[b])
        sx1, sy1, sx2, sy2 = (int(v) for v in source_boxes[b])
        if j == b or tx2 == tx1 or ty2 == ty1 or sx2 == sx1 or sy2 == sy1:
            continue
        patch = images[j : j + 1, :, sy1:sy2, sx1:sx2].double()
        resized = F.interpolate(patch, size=(ty2 - ty1, tx2 - tx1), mode="bilinear", align_corners=True)
        out[b, :, ty1:ty2, tx1:tx2] = resized[0].to(images.dtype)
        fraction = (ty2 - ty1) * (tx2 - tx1) / (height * width)
        own, partner = normalised[b], normalised[j]
        lam_a[b] = 1 - own[ty1:ty2, tx1:tx2].sum() if own is not None else 1 - fraction
        lam_b[b] = partner[sy1:sy2, sx1:sx2].sum() if partner is not None else fraction
    mixed_targets = torch.stack(
        [lam_a[b] * targets[b].double() + lam_b[b] * targets[int(index[b])].double() for b in range(batch)]
    )
    return out, mixed_targets, lam_a, lam_b


def random_box(generator: torch.Generator, height: int, width: int) -> list[int]:
    xs = torch.randint(0, width + 1, (2,), generator=generator).sort().values
    ys = torch.randint(0, height + 1, (2,), generator=generator).sort().values
    return [int(xs[0]), int(ys[0]), int(xs[1]), int(ys[1])]


@given(
    seed=st.integers(0, 2**31 - 1),
    batch=st.integers(1, 6),
    height=st.integers(1, 12),
    width=st.integers(1, 12),
    num_classes=st.integers(1, 3),  # few classes: many same-label pairs
    cam_size=st.sampled_from([None, (3, 3)]),
)
def test_snapmix_matches_slow_reference(seed, batch, height, width, num_classes, cam_size):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, 2, height, width, generator=g)
    targets = onehot(torch.randint(0, num_classes, (batch,), generator=g), num_classes)
    cams = torch.randn(batch, *(cam_size or (height, width)), generator=g)
    cams[torch.rand(batch, generator=g) < 0.3] = 0.0  # zero CAMs: area fallback
    index = torch.randint(0, batch, (batch,), generator=g)
    target_boxes = torch.tensor([random_box(g, height, width) for _ in range(batch)])
    source_boxes = torch.tensor([random_box(g, height, width) for _ in range(batch)])

    out = snapmix(images, targets, cams, index, target_boxes, source_boxes)
    ref_images, ref_targets, ref_a, ref_b = reference_snapmix(images, targets, cams, index, target_boxes, source_boxes)
    assert torch.allclose(out.images, ref_images, atol=1e-5)
    assert torch.allclose(out.lam_a.double(), ref_a, atol=1e-5)
    assert torch.allclose(out.lam_b.double(), ref_b, atol=1e-5)
    assert torch.allclose(out.targets.double(), ref_targets, atol=1e-5)


# ---------------------------------------------------------------- properties of the augmenter


@given(
    seed=st.integers(0, 2**31 - 1),
    method=st.sampled_from(["mixup", "cutmix"]),
    batch=st.integers(1, 8),
    height=st.integers(1, 16),
    width=st.integers(1, 16),
    num_classes=st.integers(1, 6),
    alpha=st.floats(0.05, 8.0),
    p=st.floats(0.0, 1.0),
    same_on_batch=st.booleans(),
    dtype=st.sampled_from(FLOAT_DTYPES),
)
def test_mixup_cutmix_properties(seed, method, batch, height, width, num_classes, alpha, p, same_on_batch, dtype):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, 3, height, width, generator=g).to(dtype)
    labels = torch.randint(0, num_classes, (batch,), generator=g)
    mixer = MixingAugmenter(method, num_classes, mix_alpha=alpha, p=p, same_on_batch=same_on_batch, generator=g)
    out = mixer(images, labels)

    assert out.images.dtype == dtype and out.images.shape == images.shape
    assert out.targets.dtype == torch.float32 and out.targets.shape == (batch, num_classes)
    assert ((out.lam_a >= 0) & (out.lam_a <= 1)).all() and ((out.lam_b >= 0) & (out.lam_b <= 1)).all()
    assert torch.allclose(out.lam_a + out.lam_b, torch.ones(batch))
    assert torch.allclose(out.targets.sum(1), torch.ones(batch), atol=1e-6)
    expected = out.lam_a[:, None] * onehot(labels, num_classes) + out.lam_b[:, None] * onehot(
        labels[out.partner], num_classes
    )
    assert torch.allclose(out.targets, expected)
    unmixed = out.partner == torch.arange(batch)
    assert torch.equal(out.images[unmixed], images[unmixed])
    assert torch.equal(out.targets[unmixed], onehot(labels, num_classes)[unmixed])
    assert not out.applied[unmixed].any()
    if same_on_batch:
        assert (out.lam_a == out.lam_a[0]).all()


@given(
    seed=st.integers(0, 2**31 - 1),
    batch=st.integers(2, 8),
    height=st.integers(1, 20),
    width=st.integers(1, 20),
    alpha=st.floats(0.1, 4.0),
    same_on_batch=st.booleans(),
)
def test_cutmix_lambda_is_pasted_fraction(seed, batch, height, width, alpha, same_on_batch):
    g = torch.Generator().manual_seed(seed)
    images = distinct_images(batch, 2, height, width)
    out = MixingAugmenter("cutmix", 4, mix_alpha=alpha, same_on_batch=same_on_batch, generator=g)(
        images, torch.zeros(batch, dtype=torch.long)
    )
    partner_value = (out.partner + 1).float().view(batch, 1, 1, 1)
    pasted = (out.images == partner_value).float().mean(dim=(1, 2, 3))
    own = out.partner != torch.arange(batch)
    assert torch.allclose(out.lam_b[own], pasted[own])
    assert torch.equal(out.applied, own & (out.lam_b > 0))


@given(
    seed=st.integers(0, 2**31 - 1),
    batch=st.integers(1, 6),
    size=st.integers(2, 16),
    alpha=st.floats(0.1, 6.0),
    p=st.floats(0.0, 1.0),
    same_on_batch=st.booleans(),
    normalize_targets=st.booleans(),
)
def test_snapmix_augmenter_properties(seed, batch, size, alpha, p, same_on_batch, normalize_targets):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, 3, size, size, generator=g)
    labels = torch.randint(0, 3, (batch,), generator=g)
    cams = torch.rand(batch, 4, 4, generator=g)
    mixer = MixingAugmenter(
        "snapmix",
        3,
        mix_alpha=alpha,
        p=p,
        same_on_batch=same_on_batch,
        normalize_targets=normalize_targets,
        generator=g,
    )
    out = mixer(images, labels, cams)
    assert ((out.lam_a >= 0) & (out.lam_a <= 1)).all() and ((out.lam_b >= 0) & (out.lam_b <= 1)).all()
    expected = out.lam_a[:, None] * onehot(labels, 3) + out.lam_b[:, None] * onehot(labels[out.partner], 3)
    assert torch.allclose(out.targets, expected)
    if normalize_targets:
        assert torch.allclose(out.targets.sum(1), torch.ones(batch), atol=1e-6)
    untouched = ~out.applied
    assert torch.equal(out.images[untouched], images[untouched])
    assert torch.equal(out.lam_a[untouched], torch.ones(int(untouched.sum())))


@given(
    seed=st.integers(0, 2**31 - 1),
    batch=st.integers(2, 6),
    size=st.integers(1, 12),
    spread=st.floats(0.0, 30.0),
)
def test_snapmix_box_shares_stay_in_unit_interval_unclamped(seed, batch, size, spread):
    """CAM values over many orders of magnitude and boxes up to the whole image: a box's share of a map's mass
    is in [0, 1] (the kernel does not clamp it), and a box over the whole image holds exactly all of it."""
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, 1, size, size, generator=g)
    cams = torch.exp(torch.randn(batch, size, size, generator=g) * spread)  # up to ~1e39: some maps overflow
    boxes = torch.tensor([random_box(g, size, size) for _ in range(2 * batch)]).view(2, batch, 4)
    boxes[:, 0] = torch.tensor([0, 0, size, size])  # the first sample's boxes cover the whole image
    partner = torch.roll(torch.arange(batch), 1)
    out = snapmix(images, onehot(torch.zeros(batch, dtype=torch.long), 2), cams, partner, boxes[0], boxes[1])
    assert ((out.lam_a >= 0) & (out.lam_a <= 1)).all() and ((out.lam_b >= 0) & (out.lam_b <= 1)).all()
    if torch.isfinite(cams[0].sum()) and cams[0].amax() > cams[0].amin():
        assert out.lam_a[0] == 0.0  # the whole own map is in the target box


@pytest.mark.parametrize("method", ["mixup", "cutmix", "snapmix"])
def test_p_zero_is_identity(method, device):
    images = torch.rand(5, 3, 8, 8, device=device)
    labels = torch.tensor([0, 1, 2, 3, 1], device=device)
    cams = torch.rand(5, 8, 8, device=device) if method == "snapmix" else None
    out = MixingAugmenter(method, 4, p=0.0, label_smoothing=0.2)(images, labels, cams)
    smoothed = onehot(labels, 4) * 0.8 + 0.05
    assert torch.equal(out.images, images)
    assert torch.equal(out.targets, smoothed)
    assert torch.equal(out.partner, torch.arange(5, device=device))
    assert not out.applied.any()


@pytest.mark.parametrize("method", ["mixup", "cutmix", "snapmix"])
def test_seeded_generator_reproduces(method, device):
    images = torch.rand(6, 3, 16, 16, device=device)
    labels = torch.randint(0, 5, (6,), device=device)
    cams = torch.rand(6, 4, 4, device=device) if method == "snapmix" else None
    runs = [
        MixingAugmenter(method, 5, p=0.7, generator=torch.Generator(device=device).manual_seed(3))(images, labels, cams)
        for _ in range(2)
    ]
    for field in ("images", "targets", "partner", "lam_a", "lam_b", "applied"):
        assert torch.equal(getattr(runs[0], field), getattr(runs[1], field)), field
    other = MixingAugmenter(method, 5, generator=torch.Generator(device=device).manual_seed(4))(images, labels, cams)
    assert not torch.equal(other.images, runs[0].images)


@pytest.mark.parametrize("method", ["mixup", "cutmix", "snapmix"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_dtype_and_device_preserved(method, dtype, device):
    images = torch.rand(4, 3, 8, 8, device=device).to(dtype)
    cams = torch.rand(4, 8, 8, device=device) if method == "snapmix" else None
    out = MixingAugmenter(method, 3)(images, torch.tensor([0, 1, 2, 0], device=device), cams)
    assert out.images.dtype == dtype
    for tensor in (out.images, out.targets, out.partner, out.lam_a, out.lam_b, out.applied):
        assert tensor.device.type == device.type


@pytest.mark.parametrize("p", [1.0, 0.5])
@pytest.mark.parametrize("same_on_batch", [False, True])
@pytest.mark.parametrize("method", ["mixup", "cutmix", "snapmix"])
def test_every_output_stays_on_the_images_device(method, same_on_batch, p):
    """The meta device stands in for an accelerator: a CPU generator draws, everything else (cached constants
    included) must be on the images' device, and no value may be read back (meta tensors hold none)."""
    mixer = MixingAugmenter(method, 5, p=p, same_on_batch=same_on_batch, generator=torch.Generator().manual_seed(0))
    images, labels = torch.empty(4, 3, 8, 6, device="meta"), torch.empty(4, dtype=torch.long, device="meta")
    out = mixer(images, labels, torch.empty(4, 2, 3, device="meta") if method == "snapmix" else None)
    fields = (out.images, out.targets, out.partner, out.lam_a, out.lam_b, out.applied, out.boxes, out.source_boxes)
    assert all(tensor.device.type == "meta" for tensor in fields if tensor is not None)
    assert out.images.shape == (4, 3, 8, 6) and out.targets.shape == (4, 5) and out.lam_a.shape == (4,)
    assert (out.boxes is None) == (method == "mixup") and (out.source_boxes is None) == (method != "snapmix")


def test_a_mixed_batch_needs_one_of_its_label_weights():
    """The other follows from it (1 minus it); with neither there is nothing to report."""
    images, targets, partner = torch.rand(2, 1, 2, 2), torch.eye(2), torch.tensor([1, 0])
    with pytest.raises(
        TypeError, match=r"MixedBatch needs `lam_a` or `lam_b` \(the other is 1 minus it\), got neither"
    ):
        MixedBatch(images, targets, partner)
    assert torch.equal(
        MixedBatch(images, targets, partner, lam_b=torch.tensor([0.25, 0.0])).lam_a, torch.tensor([0.75, 1.0])
    )
    assert torch.equal(MixedBatch(images, targets, partner, torch.tensor([0.25, 1.0])).lam_b, torch.tensor([0.75, 0.0]))


def test_soft_label_input_and_smoothing():
    soft = torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])
    out = MixingAugmenter("mixup", 3, p=0.0, label_smoothing=0.3)(torch.rand(2, 1, 2, 2), soft)
    assert torch.allclose(out.targets, soft * 0.7 + 0.1)


@pytest.mark.parametrize("classes", [3, 1025], ids=["table", "scatter"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.3])
def test_label_ids_become_smoothed_one_hot_rows(classes, smoothing):
    """Up to 1024 classes the rows come from a cached table, above from a scatter: both are the smoothed
    one-hot rows, each value rounded once to float32; any integer dtype; a fresh tensor each call."""
    mixer = MixingAugmenter("mixup", classes, label_smoothing=smoothing)
    labels = torch.tensor([0, classes - 1, 1, 1])
    expected = (F.one_hot(labels, classes).double() * (1 - smoothing) + smoothing / classes).float()
    for dtype in (torch.int64, torch.int32, torch.uint8 if classes < 256 else torch.int16):
        targets = mixer.soft_targets(labels.to(dtype), 4)
        assert targets.dtype == torch.float32 and torch.equal(targets, expected)
    targets.zero_()
    assert torch.equal(mixer.soft_targets(labels, 4), expected)
    with pytest.raises(
        ValueError, match=rf"`labels` must hold class ids in \[0, {classes}\), got values in \[0, {classes}\]"
    ):
        mixer.soft_targets(torch.tensor([0, classes]), 2)


def test_mixup_blends_in_image_dtype_and_reports_rounded_lambda():
    images = torch.rand(2, 3, 4, 4).bfloat16()
    lam = torch.tensor([0.123456, 0.7])
    out = mixup(images, torch.eye(2), torch.tensor([1, 0]), lam)
    assert torch.equal(out.lam_a, lam.bfloat16().float())
    expected = torch.lerp(images[[1, 0]], images, lam.bfloat16().view(2, 1, 1, 1))
    assert torch.equal(out.images, expected)


def test_per_sample_draws_differ():
    out = MixingAugmenter("mixup", 3, generator=torch.Generator().manual_seed(0))(
        torch.rand(16, 1, 2, 2), torch.zeros(16, dtype=torch.long)
    )
    assert out.lam_a.unique().numel() > 8


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"method": "mixcut"}, ValueError, ["method", "'mixup'", "mixcut"]),
        ({"mix_alpha": 0.0}, ValueError, ["mix_alpha", "> 0", "0.0"]),
        ({"mix_alpha": -1.0}, ValueError, ["mix_alpha", "-1.0"]),
        ({"p": 1.5}, ValueError, ["p", "[0.0, 1.0]", "1.5"]),
        ({"p": -0.1}, ValueError, ["p", "-0.1"]),
        ({"label_smoothing": 1.0}, ValueError, ["label_smoothing", "1.0"]),
        ({"num_classes": 0}, ValueError, ["num_classes", ">= 1", "0"]),
        ({"num_classes": 2.5}, TypeError, ["num_classes", "int", "2.5"]),
        ({"mix_alpha": "1"}, TypeError, ["mix_alpha", "real number", "'1'"]),
        ({"normalize_targets": True}, ValueError, ["normalize_targets", "snapmix", "cutmix"]),
        ({"generator": 3}, TypeError, ["generator", "int"]),
    ],
)
def test_bad_constructor_arguments(kwargs, error, words):
    arguments = {"method": "cutmix", "num_classes": 4, **kwargs}
    with pytest.raises(error) as info:
        MixingAugmenter(arguments.pop("method"), arguments.pop("num_classes"), **arguments)
    for word in words:
        assert word in str(info.value)


@pytest.mark.parametrize(
    ("images", "labels", "error", "words"),
    [
        (torch.rand(4, 3, 8), torch.zeros(4, dtype=torch.long), ValueError, ["images", "(B, C, H, W)", "(4, 3, 8)"]),
        (
            torch.zeros(4, 3, 8, 8, dtype=torch.uint8),
            torch.zeros(4, dtype=torch.long),
            TypeError,
            ["images", "floating", "uint8"],
        ),
        (torch.rand(4, 3, 8, 8).numpy(), torch.zeros(4, dtype=torch.long), TypeError, ["images", "Tensor", "ndarray"]),
        (torch.rand(4, 3, 8, 8), torch.zeros(3, dtype=torch.long), ValueError, ["labels", "(4,)", "(3,)"]),
        (torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 4, 2]), ValueError, ["labels", "[0, 4)", "[0, 4]"]),
        (torch.rand(4, 3, 8, 8), torch.tensor([0, -1, 3, 2]), ValueError, ["labels", "[-1, 3]"]),
        (torch.rand(4, 3, 8, 8), torch.rand(4, 5), ValueError, ["labels", "(4, 4)", "(4, 5)"]),
        (torch.rand(4, 3, 8, 8), torch.ones(4, 4, dtype=torch.long), TypeError, ["labels", "floating", "int64"]),
        (torch.rand(4, 3, 8, 8), torch.zeros(4).float(), TypeError, ["labels", "integer", "float32"]),
    ],
)
def test_bad_call_arguments(images, labels, error, words):
    with pytest.raises(error) as info:
        MixingAugmenter("cutmix", 4)(images, labels)
    for word in words:
        assert word in str(info.value)


def test_snapmix_without_cams_says_how_to_get_them():
    with pytest.raises(ValueError, match="cams.*required.*FeatureTap"):
        MixingAugmenter("snapmix", 4)(torch.rand(2, 3, 8, 8), torch.tensor([0, 1]))


def test_snapmix_cams_of_wrong_shape():
    with pytest.raises(ValueError, match=r"`cams` must have shape \(2, h, w\), got shape \(3, 8, 8\)"):
        MixingAugmenter("snapmix", 4)(torch.rand(2, 3, 8, 8), torch.tensor([0, 1]), torch.rand(3, 8, 8))
    with pytest.raises(TypeError, match="`cams` must be a floating point tensor, got dtype torch.int64"):
        MixingAugmenter("snapmix", 4)(
            torch.rand(2, 3, 8, 8), torch.tensor([0, 1]), torch.ones(2, 8, 8, dtype=torch.long)
        )


def test_cams_given_to_other_method():
    with pytest.raises(ValueError, match="`cams` is used by method 'snapmix' only"):
        MixingAugmenter("mixup", 4)(torch.rand(2, 3, 8, 8), torch.tensor([0, 1]), torch.rand(2, 8, 8))


def test_kernel_parameter_errors():
    images, targets = torch.rand(2, 1, 4, 4), torch.eye(2)
    with pytest.raises(ValueError, match=r"`boxes` must hold boxes .* got \[0, 0, 5, 2\] at row 1"):
        cutmix(images, targets, torch.tensor([1, 0]), torch.tensor([[0, 0, 2, 2], [0, 0, 5, 2]]))
    with pytest.raises(ValueError, match=r"`boxes` must have shape \(2, 4\), got shape \(2, 2\)"):
        cutmix(images, targets, torch.tensor([1, 0]), torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(TypeError, match="`boxes` must be an integer tensor, got dtype torch.float32"):
        cutmix(images, targets, torch.tensor([1, 0]), torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"`partner` must hold batch positions in \[0, 2\), got values in \[0, 2\]"):
        mixup(images, targets, torch.tensor([2, 0]), torch.tensor([0.5, 0.5]))
    with pytest.raises(ValueError, match=r"`lam` must be in \[0, 1\], got values in \[0.5, 1.5\]"):
        mixup(images, targets, torch.tensor([1, 0]), torch.tensor([0.5, 1.5]))
    with pytest.raises(ValueError, match=r"`targets` must have shape \(2, K\), got shape \(3, 2\)"):
        mixup(images, torch.eye(3, 2), torch.tensor([1, 0]), torch.tensor([0.5, 0.5]))
    with pytest.raises(ValueError, match=r"`target_boxes` must hold boxes"):
        snapmix(
            images,
            targets,
            torch.rand(2, 4, 4),
            torch.tensor([1, 0]),
            torch.tensor([[3, 0, 2, 2], [0, 0, 1, 1]]),
            torch.zeros(2, 4, dtype=torch.long),
        )


@given(seed=st.integers(0, 2**31 - 1), height=st.integers(1, 64), width=st.integers(1, 64), square=st.booleans())
def test_boxes_are_timm_cutmix_boxes(seed, height, width, square):
    """Side int(size * sqrt(u)) (u ~ Beta, in the place of 1 - lam), centred on a uniform pixel, clipped: the
    vectorised float construction equals the integer recipe of timm's rand_bbox, written here per box. Centres
    come as int64 in [0, 2**62) (reduced per axis), or for a square image as float32 pixels."""
    from cekd_losses._boxes import clipped, corners_from_draws

    g = torch.Generator().manual_seed(seed)
    u = torch.rand(64, 2, generator=g)
    if square:
        width = height
        centres = torch.randint(0, height, (64, 2, 2), generator=g, dtype=torch.float32)
    else:
        centres = torch.randint(0, 2**62, (64, 2, 2), generator=g)
    boxes = clipped(corners_from_draws(u[..., None, None], centres[:, :, None], height, width), height, width)
    assert boxes.shape == (64, 2, 2, 2) and boxes.dtype == torch.float32
    boxes = boxes.flatten(-2)
    for n in range(64):
        for k in range(2):
            expected = []
            for axis, size in ((0, width), (1, height)):
                cut = int(torch.tensor(size, dtype=torch.float32) * u[n, k].sqrt())  # float32, as the mixer
                centre = int(centres[n, k, axis]) % size
                expected.append((min(max(centre - cut // 2, 0), size), min(max(centre + (cut + 1) // 2, 0), size)))
            (x1, x2), (y1, y2) = expected
            assert boxes[n, k].tolist() == [x1, y1, x2, y2]


@pytest.mark.parametrize(("height", "width"), [(6, 6), (4, 7)])
def test_box_centres_are_uniform_over_the_pixels(height, width):
    """The drawn centres, reduced as the boxes use them, cover every pixel of each axis equally (a square
    image draws its pixels directly, another image reduces 62-bit draws): chi-square test at p = 1e-6."""
    from cekd_losses import draws as draws_module

    draws = 6000
    spec = draws_module.DrawSpec("cutmix", batch=draws, height=height, width=width, alpha=1.0)
    centres = draws_module._random_draws(draws_module._counts(spec), spec.alphas, None, torch.device("cpu"))[2]
    assert centres is not None and centres.shape == (draws, 1, 1, 2)
    for axis, size in ((0, width), (1, height)):
        counts = torch.bincount(centres[..., axis].flatten().long() % size, minlength=size).double()
        assert counts.shape == (size,)
        expected = draws / size
        chi_square = float(((counts - expected) ** 2 / expected).sum())
        assert chi_square < 38.3, (axis, counts)  # 1e-6 tail of chi-square with <= 6 degrees of freedom


@given(
    seed=st.integers(0, 2**31 - 1),
    batch=st.integers(1, 6),
    height=st.integers(1, 12),
    width=st.integers(1, 12),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
)
def test_shared_box_slicing_path_equals_general_kernels(seed, batch, height, width, dtype):
    """same_on_batch draws one box (pair) for the batch and pastes it broadcast; replaying the boxes it returns
    through the public kernels gives the same batch."""
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, 3, height, width, generator=g).to(dtype)
    labels = torch.randint(0, 3, (batch,), generator=g)
    targets = onehot(labels, 3)
    cams = torch.rand(batch, height, width, generator=g)

    mixer = MixingAugmenter("cutmix", 3, same_on_batch=True, generator=torch.Generator().manual_seed(seed))
    sliced = mixer(images, labels)
    general = cutmix(images, targets, sliced.partner, sliced.boxes)
    assert torch.equal(general.images, sliced.images) and torch.equal(general.targets, sliced.targets)

    mixer = MixingAugmenter("snapmix", 3, same_on_batch=True, generator=torch.Generator().manual_seed(seed))
    sliced = mixer(images, labels, cams)
    general = snapmix(images, targets, cams, sliced.partner, sliced.boxes, sliced.source_boxes)
    tolerance = 1e-2 if dtype == torch.bfloat16 else 1e-5  # bilinear via grid_sample vs interpolate, one rounding apart
    assert torch.allclose(general.images.double(), sliced.images.double(), atol=tolerance)
    assert torch.equal(general.targets, sliced.targets) and torch.equal(general.applied, sliced.applied)


@pytest.mark.parametrize("method", ["cutmix", "snapmix"])
def test_same_on_batch_shares_one_box(method):
    batch = 6
    images = distinct_images(batch, 1, 16, 16)
    cams = torch.rand(batch, 16, 16) if method == "snapmix" else None
    out = MixingAugmenter(method, 3, same_on_batch=True, generator=torch.Generator().manual_seed(5))(
        images, torch.zeros(batch, dtype=torch.long), cams
    )
    changed = out.images != images
    mixed = out.applied.nonzero()[:, 0]
    assert mixed.numel() > 1
    assert all(torch.equal(changed[i], changed[mixed[0]]) for i in mixed)


@pytest.mark.parametrize("method", ["cutmix", "snapmix"])
@pytest.mark.parametrize("same_on_batch", [False, True])
def test_mixed_batch_keeps_its_boxes_so_a_mix_can_be_replayed(method, same_on_batch):
    g = torch.Generator().manual_seed(5)
    images, labels = torch.rand(6, 3, 16, 12, generator=g), torch.arange(6) % 4
    cams = torch.rand(6, 4, 3, generator=g) if method == "snapmix" else None
    batch = MixingAugmenter(method, 4, same_on_batch=same_on_batch, generator=g)(images, labels, cams)
    assert batch.boxes.shape == (6, 4) and batch.boxes.dtype == torch.int64
    assert (batch.source_boxes is not None) == (method == "snapmix")
    targets = torch.eye(4)[labels]
    second_view = images.flip(-1)  # another tensor of the same batch
    if method == "cutmix":
        replayed = cutmix(images, targets, batch.partner, batch.boxes)
        assert torch.equal(
            cutmix(second_view, targets, batch.partner, batch.boxes).images[~batch.applied], second_view[~batch.applied]
        )
    else:
        replayed = snapmix(images, targets, cams, batch.partner, batch.boxes, batch.source_boxes)
    assert torch.allclose(replayed.images, batch.images) and torch.allclose(replayed.targets, batch.targets)
    assert MixingAugmenter("mixup", 4)(images, labels).boxes is None


@pytest.mark.parametrize("alpha", [0.5, 1.0, 5.0])
def test_beta_draws_without_private_torch_api(alpha, monkeypatch):
    """The public Gamma-ratio fallback (used where torch lacks _sample_dirichlet) draws Beta(alpha, alpha)."""
    from scipy import stats

    from cekd_losses import draws as draws_module

    monkeypatch.delattr(torch, "_sample_dirichlet")
    monkeypatch.setattr(draws_module, "_HAS_DIRICHLET", False)  # as decided at import on such a torch
    draws = draws_module.sample_beta(alpha, (20000,), torch.Generator().manual_seed(0), torch.device("cpu"))
    again = draws_module.sample_beta(alpha, (20000,), torch.Generator().manual_seed(0), torch.device("cpu"))
    assert torch.equal(draws, again) and ((draws >= 0) & (draws <= 1)).all()
    assert stats.kstest(draws.double().numpy(), stats.beta(alpha, alpha).cdf).pvalue > 1e-3
    batch = MixingAugmenter("mixup", 3, mix_alpha=alpha)(torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 0]))
    assert ((batch.lam_a >= 0) & (batch.lam_a <= 1)).all()


@pytest.mark.parametrize("method", ["mixup", "cutmix", "snapmix"])
def test_a_mix_is_the_same_under_autocast(method):
    """The engine mixes inside its AMP region: the mixer's own precision rules must hold there."""
    images, labels = torch.rand(6, 3, 20, 20), torch.arange(6) % 3
    cams = torch.rand(6, 5, 5) if method == "snapmix" else None
    mixer = lambda: MixingAugmenter(method, 3, generator=torch.Generator().manual_seed(1))  # noqa: E731
    plain = mixer()(images, labels, cams)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_amp = mixer()(images, labels, cams)
    assert under_amp.images.dtype == torch.float32
    assert torch.equal(plain.images, under_amp.images) and torch.equal(plain.targets, under_amp.targets)
