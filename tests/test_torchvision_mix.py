"""The torchvision drop-ins: torchvision's own MixUp / CutMix given the same draws make the same batch; the draws
follow the same laws; every input structure torchvision documents; named errors; no host read."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats
from torch.utils.data import DataLoader, default_collate
from torchvision import tv_tensors
from torchvision.transforms import v2

from cekd_losses import CutMix, MixUp, _checks
from cekd_losses._launches import count_launches
from cekd_losses.torchvision_mix import cutmix_corners, default_labels


def batch(size: int = 6, classes: int = 5, height: int = 10, width: int = 12, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(size, 3, height, width, generator=g), torch.randint(0, classes, (size,), generator=g)


@pytest.mark.parametrize("lam", [0.0, 0.137, 0.5, 0.93, 1.0])
def test_mixup_equals_torchvisions_on_the_same_lambda(lam):
    images, labels = batch()
    theirs = v2.MixUp(num_classes=5)
    theirs.make_params = lambda flat_inputs: {"lam": lam}  # torchvision's draw, injected
    ours = MixUp(num_classes=5)
    ours.draw = lambda images: torch.tensor(lam).view(1, 1, 1, 1)
    (expected_images, expected_targets), (got_images, got_targets) = theirs(images, labels), ours(images, labels)
    assert torch.allclose(got_images, expected_images, rtol=0, atol=3e-7)  # lerp vs mul + add: one rounding apart
    assert torch.allclose(got_targets, expected_targets, rtol=0, atol=3e-7)


@pytest.mark.parametrize("box", [(0, 0, 0, 0), (2, 3, 9, 10), (0, 0, 12, 10), (5, 0, 6, 1)])
@pytest.mark.parametrize("one_hot", [False, True])
def test_cutmix_equals_torchvisions_on_the_same_box(box, one_hot):
    images, labels = batch()
    targets = torch.nn.functional.one_hot(labels, 5) if one_hot else labels
    x1, y1, x2, y2 = box
    theirs = v2.CutMix(num_classes=5)
    theirs.make_params = lambda flat_inputs: {"box": box, "lam_adjusted": 1.0 - (x2 - x1) * (y2 - y1) / 120}
    ours = CutMix(num_classes=5)
    ours.draw = lambda images: torch.tensor([[x1, y1], [x2, y2]], dtype=torch.float32).view(1, 1, 2, 2)
    # torchvision's own with class ids (its releases before 0.24 or so take no one-hot labels): the same mix
    (expected_images, expected_targets), (got_images, got_targets) = theirs(images, labels), ours(images, targets)
    assert torch.equal(got_images, expected_images)
    assert torch.allclose(got_targets, expected_targets.float(), rtol=0, atol=3e-7)


@settings(max_examples=200, deadline=None)
@given(
    lam=st.floats(0, 1, width=32),
    height=st.integers(1, 64),
    width=st.integers(1, 64),
    fraction=st.tuples(st.floats(0, 1, exclude_max=True), st.floats(0, 1, exclude_max=True)),
)
def test_cutmix_box_is_torchvisions_equation(lam, height, width, fraction):
    """torchvision's make_params, written out in Python floats: half sides int(0.5 * sqrt(1 - lam) * size) about
    the centre pixel, clipped to the image (ours computes in float32: an integer boundary may round apart)."""
    cx, cy = int(fraction[0] * width), int(fraction[1] * height)
    r = 0.5 * (1.0 - lam) ** 0.5
    half_w, half_h = int(r * width), int(r * height)
    expected = [max(cx - half_w, 0), max(cy - half_h, 0), min(cx + half_w, width), min(cy + half_h, height)]
    corners = cutmix_corners(torch.tensor([lam]), torch.tensor([[cx, cy]]), height, width)
    got = corners.flatten().long().tolist()
    near_boundary = any(abs(r * size - round(r * size)) < 1e-5 for size in (width, height))
    assert got == expected or near_boundary, (got, expected)


@pytest.mark.parametrize("alpha", [0.4, 1.0])
def test_the_draws_follow_torchvisions_laws(alpha):
    """Our lambdas are Beta(alpha, alpha) (KS); our CutMix's pasted areas and torchvision's, drawn by each, come
    from one law (two-sample KS); no test of a seed: the streams differ by design."""
    images, labels = batch(4, 5, 16, 20)[0], torch.tensor([0, 1, 2, 3])
    mixup = MixUp(alpha=alpha, num_classes=5, generator=torch.Generator().manual_seed(0))
    lam = torch.cat([mixup.draw(images).flatten() for _ in range(3000)]).double().numpy()
    assert stats.kstest(lam, stats.beta(alpha, alpha).cdf).pvalue > 1e-4
    ours = CutMix(alpha=alpha, num_classes=5, generator=torch.Generator().manual_seed(1))
    areas = [float(ours(images, labels)[1][0, 3]) for _ in range(1500)]  # row 0's partner is row 3: its share
    torch.manual_seed(2)
    theirs = v2.CutMix(alpha=alpha, num_classes=5)
    their_areas = [1.0 - theirs.make_params([images])["lam_adjusted"] for _ in range(1500)]
    assert stats.ks_2samp(areas, their_areas).pvalue > 1e-4


class Numbered(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 8

    def __getitem__(self, index: int):
        return torch.rand(3, 12, 12), index


@pytest.mark.parametrize("T", [MixUp, CutMix])
def test_every_input_structure_torchvision_documents(T):
    """After the DataLoader (unpacked or packed), in a collate function, a dict with a label-like key, tv_tensors
    images and videos (kept as such), one-hot labels with or without num_classes."""
    mix = T(num_classes=10, generator=torch.Generator().manual_seed(0))
    images, labels = next(iter(DataLoader(Numbered(), batch_size=8)))
    for out_images, targets in (mix(images, labels), mix([images, labels])):
        assert out_images.shape == images.shape and targets.shape == (8, 10)
        assert torch.allclose(targets.sum(1), torch.ones(8)) and ((targets > 0).sum(1) <= 2).all()
    loader = DataLoader(Numbered(), batch_size=8, collate_fn=lambda items: mix(*default_collate(items)))
    assert next(iter(loader))[1].shape == (8, 10)
    out = mix({"image": tv_tensors.Image(images), "Some_Label_Key": labels, "meta": "kept"})
    assert type(out["image"]) is tv_tensors.Image and out["Some_Label_Key"].shape == (8, 10) and out["meta"] == "kept"
    video = tv_tensors.Video(torch.rand(8, 2, 3, 6, 6))
    mixed_video, _ = mix(video, labels)
    assert type(mixed_video) is tv_tensors.Video and mixed_video.shape == video.shape
    one_hot = torch.nn.functional.one_hot(labels, 10)
    assert T(generator=torch.Generator())(images, one_hot)[1].dtype == torch.float32
    soft = torch.softmax(torch.rand(8, 10), 1)
    assert torch.allclose(T(generator=torch.Generator())(images, soft)[1].sum(1), torch.ones(8))
    getter = T(num_classes=10, labels_getter=lambda sample: sample["y"], generator=torch.Generator())
    assert getter({"x": images, "y": labels})["y"].shape == (8, 10)


def test_the_default_labels_rule():
    labels = torch.arange(3)
    assert default_labels((torch.zeros(3, 1, 2, 2), labels)) is labels
    assert default_labels({"LaBeLs": labels, "label_other": 0}) is labels
    assert default_labels({"my_label": labels}) is labels
    assert default_labels([torch.zeros(1), {"labels": labels}]) is labels


@pytest.mark.parametrize("T", [MixUp, CutMix])
@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda m, x, y: m(x), "labels should be index based"),
        (lambda m, x, y: m(x, "not a tensor"), "When using the default labels_getter"),
        (lambda m, x, y: m({"img": x, "other": 3}), "Could not infer where the labels are"),
        (lambda m, x, y: m(x[None], y), "Expected a batched input with 4 dims"),
        (lambda m, x, y: m(x, torch.zeros(7, dtype=torch.long)), "does not match the batch size of the labels"),
        (lambda m, x, y: m(x, torch.rand(6, 4)), "When passing 2D labels"),
        (lambda m, x, y: m(x, y + 5), r"`labels` must hold class ids in \[0, 5\)"),
        (lambda m, x, y: m(tv_tensors.Mask(torch.zeros(10, 12))), r"does not support PIL images, bounding boxes"),
        (lambda m, x, y: m(x.to(torch.uint8), y), "must be a floating point tensor"),
        (lambda m, x, y: type(m)()(x, y), "num_classes must be passed"),
    ],
)
def test_bad_input_is_named(T, call, message):
    images, labels = batch()
    with pytest.raises((ValueError, TypeError), match=message):
        call(T(num_classes=5), images, labels)


@pytest.mark.parametrize("kwargs", [{"alpha": 0.0}, {"num_classes": 0}, {"labels_getter": "labels"}])
def test_bad_keywords_are_named(kwargs):
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=f"`{name}` must"):
        MixUp(**kwargs)


@pytest.mark.parametrize("T", [MixUp, CutMix])
def test_no_host_read_and_everything_on_the_images_device(T, monkeypatch):
    images, labels = batch()
    mix = T(num_classes=5, generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(_checks, "can_read_values", lambda tensor: False)  # as on a GPU
    launches = count_launches(lambda: mix(images, labels))
    assert launches.reads == 0 and len(launches.ops) <= 25, launches.ops
    meta_images, meta_labels = torch.empty(6, 3, 10, 12, device="meta"), torch.empty(6, dtype=torch.long, device="meta")
    out_images, targets = mix(meta_images, meta_labels)
    assert out_images.device.type == targets.device.type == "meta"


@pytest.mark.parametrize("T", [MixUp, CutMix])
def test_a_generator_makes_the_mix_reproducible(T):
    images, labels = batch()
    first = T(num_classes=5, generator=torch.Generator().manual_seed(3))(images, labels)
    again = T(num_classes=5, generator=torch.Generator().manual_seed(3))(images, labels)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
