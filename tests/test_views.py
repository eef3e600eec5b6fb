"""Specifications of per-peer views: PeerViews against a pixel-by-pixel reference, replay of a mix on another view
against the kernels run with the recorded parameters, and train_step feeding one view per member."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from cekd_losses import MixingAugmenter, PeerViews, cutmix, mixup, replay, snapmix, train_step


def reflect(i: int, size: int) -> int:
    i = abs(i)
    return 2 * (size - 1) - i if i >= size else i


def views_by_hand(images, count, max_shift, flip, seed):
    """Each view pixel by pixel: the same draws (rand (N * B, 3): y shift, x shift, flip), read with loops."""
    batch, _, height, width = images.shape
    draws = torch.rand(count * batch, 3, 1, generator=torch.Generator().manual_seed(seed))[:, :, 0].tolist()
    out = torch.empty(count, *images.shape, dtype=images.dtype)
    for k, (u_y, u_x, u_flip) in enumerate(draws):
        n, b = divmod(k, batch)
        dy, dx = (int(u * (2 * max_shift + 1)) - max_shift for u in (u_y, u_x))
        for y in range(height):
            for x in range(width):
                source_x = width - 1 - x if flip and u_flip < 0.5 else x
                out[n, b, :, y, x] = images[b, :, reflect(y + dy, height), reflect(source_x + dx, width)]
    return out


@given(
    seed=st.integers(0, 2**31 - 1),
    count=st.integers(1, 3),
    batch=st.integers(1, 3),
    height=st.integers(3, 7),
    width=st.integers(3, 7),
    max_shift=st.integers(0, 2),
    flip=st.booleans(),
)
def test_views_equal_their_pixel_by_pixel_reference(seed, count, batch, height, width, max_shift, flip):
    images = torch.randint(0, 256, (batch, 2, height, width), dtype=torch.uint8)
    views = PeerViews(count, max_shift, flip, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(views(images), views_by_hand(images, count, max_shift, flip, seed))


def test_views_without_shift_or_flip_are_the_images_and_views_differ_by_peer():
    images = torch.rand(4, 3, 16, 16)
    assert torch.equal(PeerViews(2, 0, flip=False)(images), images.expand(2, -1, -1, -1, -1))
    views = PeerViews(2, 4, generator=torch.Generator().manual_seed(0))(images)
    assert not torch.equal(views[0], views[1])


@given(
    seed=st.integers(0, 2**31 - 1),
    method=st.sampled_from(["mixup", "cutmix", "snapmix"]),
    p=st.sampled_from([0.5, 1.0]),
)
def test_replay_on_the_same_images_is_the_mix_and_on_a_view_the_kernel_with_its_parameters(seed, method, p):
    g = torch.Generator().manual_seed(seed)
    images, view = torch.rand(5, 3, 12, 10, generator=g), torch.rand(5, 3, 12, 10, generator=g)
    labels, cams = torch.randint(0, 4, (5,), generator=g), torch.rand(5, 3, 3, generator=g)
    batch = MixingAugmenter(method, 4, p=p, generator=g)(images, labels, cams if method == "snapmix" else None)
    assert torch.equal(replay(batch, images), batch.images)
    targets = torch.eye(4)[labels]
    if method == "mixup":
        expected = mixup(view, targets, batch.partner, batch.lam_a).images
    elif method == "cutmix":
        expected = cutmix(view, targets, batch.partner, batch.boxes).images
    else:
        expected = snapmix(view, targets, cams, batch.partner, batch.boxes, batch.source_boxes).images
    assert torch.allclose(replay(batch, view), expected, atol=1e-6)


def test_train_step_feeds_one_view_per_member_with_the_same_mix():
    seen = []

    class Recorder(torch.nn.Module):
        def forward(self, inputs):
            seen.append(inputs)
            return torch.zeros(inputs[0].shape[0], 4, requires_grad=True)

    images, labels = torch.rand(6, 3, 8, 8), torch.randint(0, 4, (6,))
    views = PeerViews(3, 2, generator=torch.Generator().manual_seed(0))
    mixer = MixingAugmenter("cutmix", 4, generator=torch.Generator().manual_seed(1))
    criterion = lambda output, target: (output * target).sum()  # noqa: E731
    out = train_step(Recorder(), criterion, images, labels, mixer=mixer, views=views)
    expected_views = PeerViews(3, 2, generator=torch.Generator().manual_seed(0))(images)
    (inputs,) = seen
    assert len(inputs) == 3 and torch.equal(inputs[0], out.batch.images)
    assert all(torch.equal(inputs[i], replay(out.batch, expected_views[i])) for i in (1, 2))
    assert torch.equal(out.batch.images, replay(out.batch, expected_views[0]))


def test_bad_views_and_replays_are_named():
    with pytest.raises(ValueError, match="`views` must be"):
        PeerViews(0)
    with pytest.raises(ValueError, match=r"`max_shift` must be an int >= 0 \(pixels\), got -1"):
        PeerViews(2, -1)
    with pytest.raises(TypeError, match="`generator` must be a torch.Generator"):
        PeerViews(2, generator=0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`max_shift` 4 must be below the images' sides 4 x 8"):
        PeerViews(2, 4)(torch.rand(1, 3, 4, 8))
    batch = MixingAugmenter("cutmix", 4)(torch.rand(3, 3, 8, 8), torch.arange(3))
    with pytest.raises(ValueError, match="`images` must have shape"):
        replay(batch, torch.rand(3, 3, 8, 9))
