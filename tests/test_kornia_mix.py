"""Specifications of the Kornia-native mix augmentations: drop-ins for Kornia's own, SnapMix in Kornia's form."""

from __future__ import annotations

import warnings

import kornia.augmentation as KA
import pytest
import torch
import torch.nn.functional as F
import torchvision
from hypothesis import given
from hypothesis import strategies as st

from cekd_losses import (
    FeatureTap,
    RandomCutMix,
    RandomMixUp,
    RandomSnapMix,
    _checks,
    cutmix,
    kornia_soft_targets,
    mixup,
    snapmix,
)
from cekd_losses._launches import count_launches

KEYS = ["input", "class"]


def distinct_images(batch: int, size: int = 8, device="cpu") -> torch.Tensor:
    """Image b is the constant b + 1: every pixel says which image it came from."""
    return torch.arange(1.0, batch + 1, device=device).view(batch, 1, 1, 1).expand(batch, 3, size, size).contiguous()


def kornia_cutmix() -> KA.RandomCutMixV2:
    with warnings.catch_warnings():  # its lambda-convention deprecation notice
        warnings.simplefilter("ignore")
        return KA.RandomCutMixV2(data_keys=KEYS)


def assert_mixup_relation(images, out, labels):
    """out = (1 - lam) x + lam x[partner], the partner read from the label row (labels are batch positions)."""
    partner, lam = labels[:, 1].long(), labels[:, 2]
    expected = (1 - lam.view(-1, 1, 1, 1)) * images + lam.view(-1, 1, 1, 1) * images[partner]
    assert torch.allclose(out, expected, atol=1e-5)
    assert torch.equal(labels[:, 0].long(), torch.arange(images.shape[0], device=images.device))


def assert_cutmix_relation(images, out, labels):
    """lam is the partner's pixel share (images are distinct constants, labels their positions)."""
    rows = labels[0]
    partner = rows[:, 1].long()
    share = (out == images[partner]).float().mean(dim=(1, 2, 3))
    own = partner == torch.arange(images.shape[0], device=images.device)
    assert torch.allclose(rows[~own, 2], share[~own], atol=1e-6)
    assert ((rows[:, 2] >= 0) & (rows[:, 2] <= 1)).all()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mixup_keeps_kornias_relation_between_labels_and_pixels(seed):
    torch.manual_seed(seed)
    images, labels = torch.rand(6, 3, 8, 8), torch.arange(6)
    for aug in (KA.RandomMixUpV2(data_keys=KEYS), RandomMixUp(data_keys=KEYS)):
        out, rows = aug(images, labels)
        assert rows.shape == (6, 3) and rows.dtype == torch.float32
        assert_mixup_relation(images, out, rows)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cutmix_keeps_kornias_relation_between_labels_and_pixels(seed):
    torch.manual_seed(seed)
    images, labels = distinct_images(6), torch.arange(6)
    for aug in (kornia_cutmix(), RandomCutMix(data_keys=KEYS)):
        out, rows = aug(images, labels)
        assert rows.shape == (1, 6, 3)
        assert_cutmix_relation(images, out, rows)
    _, correct = RandomCutMix(data_keys=KEYS, use_correct_lambda=True, generator=torch.Generator().manual_seed(1))(
        images, labels
    )
    _, default = RandomCutMix(data_keys=KEYS, generator=torch.Generator().manual_seed(1))(images, labels)
    assert torch.allclose(correct[..., 2], 1 - default[..., 2])


def test_a_loss_written_for_kornias_labels_works_unchanged():
    """The loss of Kornia's RandomMixUpV2 docstring, on our labels, equals soft-target cross entropy."""

    def loss_mixup(y, logits):
        loss_a = F.cross_entropy(logits, y[:, 0].long(), reduction="none")
        loss_b = F.cross_entropy(logits, y[:, 1].long(), reduction="none")
        return ((1 - y[:, 2]) * loss_a + y[:, 2] * loss_b).mean()

    images, labels = torch.rand(8, 3, 8, 8), torch.randint(0, 5, (8,))
    logits = torch.randn(8, 5)
    for aug in (RandomMixUp(data_keys=KEYS), RandomCutMix(data_keys=KEYS)):
        _, rows = aug(images, labels)
        rows = rows[0] if rows.ndim == 3 else rows
        soft = kornia_soft_targets(rows, 5)
        assert torch.allclose(soft.sum(1), torch.ones(8))
        expected = -(soft * logits.log_softmax(1)).sum(1).mean()
        assert torch.allclose(loss_mixup(rows, logits), expected, atol=1e-6)


def test_the_kernels_replay_a_kornia_call():
    images, labels = torch.rand(5, 3, 12, 10), torch.tensor([0, 1, 2, 3, 1])
    targets = torch.eye(4)[labels]
    aug = RandomMixUp(data_keys=KEYS)
    out, _ = aug(images, labels)
    params = aug._params
    assert torch.equal(out, mixup(images, targets, params["mix_pairs"], params["mix_lambdas"][:, 0]).images)
    aug = RandomCutMix(data_keys=KEYS)
    out, _ = aug(images, labels)
    assert torch.equal(out, cutmix(images, targets, aug._params["mix_pairs"], aug._params["mix_boxes"][:, 0]).images)


@pytest.mark.parametrize("aug_class", [RandomMixUp, RandomCutMix])
def test_a_recorded_draw_replays_on_a_second_view(aug_class):
    images, labels = torch.rand(6, 3, 8, 8), torch.arange(6)
    aug = aug_class(data_keys=KEYS, generator=torch.Generator().manual_seed(3))
    out, rows = aug(images, labels)
    second = images.flip(-1)
    out2, rows2 = aug(second, labels, params=aug._params)
    assert torch.equal(rows, rows2)
    if aug_class is RandomMixUp:
        assert_mixup_relation(second, out2, rows2)
    else:
        box_mask = out != images  # where the partner's pixels went in the first view
        assert torch.equal(out2[box_mask], second[rows[0, :, 1].long()][box_mask])


def snapmix_setup(seed: int = 0):
    torch.manual_seed(seed)
    model = torchvision.models.resnet18(num_classes=5).eval()
    return model, torch.rand(4, 3, 64, 64), torch.tensor([0, 1, 2, 4])


def test_snapmix_in_kornias_form_equals_the_kernel():
    model, images, labels = snapmix_setup()
    tap = FeatureTap(model)
    aug = RandomSnapMix(tap, data_keys=KEYS, generator=torch.Generator().manual_seed(0))
    out, rows = aug(images, labels)
    assert rows.shape == (4, 4) and torch.equal(rows[:, 0].long(), labels)
    params = aug._params
    cams = tap.cams(images, labels)
    boxes = params["mix_boxes"]
    reference = snapmix(images, torch.eye(5)[labels], cams, params["mix_pairs"], boxes[:, 0], boxes[:, 1])
    assert torch.allclose(out, reference.images, atol=1e-6)
    assert torch.allclose(rows[:, 2:], torch.stack([reference.lam_a, reference.lam_b], 1), atol=1e-6)
    assert torch.allclose(kornia_soft_targets(rows, 5), reference.targets, atol=1e-6)
    assert torch.equal(rows[:, 1].long(), labels[params["mix_pairs"]])


@given(
    seed=st.integers(0, 2**31 - 1), batch=st.integers(1, 6), same_on_batch=st.booleans(), mix_alpha=st.floats(0.2, 5)
)
def test_properties(seed, batch, same_on_batch, mix_alpha):
    images, labels = distinct_images(batch), torch.arange(batch)
    for aug_class in (RandomMixUp, RandomCutMix):

        def make(aug_class=aug_class):
            generator = torch.Generator().manual_seed(seed)
            return aug_class(mix_alpha=mix_alpha, same_on_batch=same_on_batch, data_keys=KEYS, generator=generator)

        (out, rows), (again, rows_again) = make()(images, labels), make()(images, labels)
        assert torch.equal(out, again) and torch.equal(rows, rows_again)  # seeded: reproducible
        rows = rows.reshape(-1, 3)
        assert ((rows[:, 2] >= 0) & (rows[:, 2] <= 1)).all()
        assert torch.allclose(kornia_soft_targets(rows, batch).sum(1), torch.ones(batch), atol=1e-6)
        if same_on_batch and aug_class is RandomMixUp:
            assert (rows[:, 2] == rows[0, 2]).all()
        if same_on_batch and aug_class is RandomCutMix:
            mixed = make()
            mixed(images, labels)
            boxes = mixed._params["mix_boxes"][:, 0]
            assert (boxes == boxes[0]).all()


@pytest.mark.parametrize("aug_class", [RandomMixUp, RandomCutMix])
def test_p_zero_leaves_the_batch_alone(aug_class, device):
    images, labels = torch.rand(4, 3, 8, 8, device=device), torch.tensor([3, 1, 0, 2], device=device)
    out, rows = aug_class(p=0.0, data_keys=KEYS)(images, labels)
    rows = rows.reshape(-1, 3)
    assert torch.equal(out, images) and out.device.type == device.type
    assert torch.equal(rows[:, 0], labels.float()) and torch.equal(rows[:, 1], labels.float())
    assert (rows[:, 2] == 0).all()


def test_keepdim_and_images_alone():
    image = torch.rand(3, 8, 8)
    assert RandomMixUp(keepdim=True)(image).shape == (3, 8, 8)
    assert RandomCutMix()(image).shape == (1, 3, 8, 8)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: RandomMixUp(p=1.5), r"`p` must be in \[0.0, 1.0\], got 1.5"),
        (lambda: RandomCutMix(mix_alpha=0.0), r"`mix_alpha` must be > 0, got 0.0"),
        (lambda: RandomCutMix(num_mix=2), r"`num_mix` must be 1 \(one box per image\), got 2"),
        (lambda: RandomSnapMix("model"), r"`tap` must be a FeatureTap of the model being trained, got str"),
        (lambda: RandomMixUp(generator=3), r"`generator` must be a torch.Generator or None, got int"),
    ],
)
def test_bad_arguments_are_named(make, message):
    with pytest.raises((ValueError, TypeError), match=message):
        make()


def test_bad_calls_are_named():
    images = torch.rand(4, 3, 8, 8)
    with pytest.raises(ValueError, match=r"takes data_keys 'input' and optionally 'class', got \['input', 'mask'\]"):
        RandomMixUp(data_keys=["input", "mask"])(images, images)
    with pytest.raises(ValueError, match=r"`labels` must have shape \(4,\), got shape \(3,\)"):
        RandomCutMix(data_keys=KEYS)(images, torch.tensor([0, 1, 2]))
    model, images, labels = snapmix_setup()
    with pytest.raises(ValueError, match=r"needs the labels for its CAMs: data_keys=\['input', 'class'\]"):
        RandomSnapMix(FeatureTap(model))(images)
    with pytest.raises(ValueError, match=r"`labels` must be mix label rows"):
        kornia_soft_targets(torch.zeros(4, 5), 3)


@pytest.mark.parametrize(
    "make_ours",
    [lambda: RandomMixUp(data_keys=KEYS), lambda: RandomCutMix(data_keys=KEYS)],
    ids=["mixup", "cutmix"],
)
def test_no_host_reads(make_ours, monkeypatch):
    """Kornia's own classes read 3 values per call on CPU (a GPU sync each on CUDA); ours none."""
    monkeypatch.setattr(_checks, "can_read_values", lambda tensor: False)
    images, labels = torch.rand(8, 3, 16, 16), torch.randint(0, 5, (8,))
    ours = make_ours()
    assert count_launches(lambda: ours(images, labels)).reads == 0
    theirs = KA.RandomMixUpV2(data_keys=KEYS)
    assert count_launches(lambda: theirs(images, labels)).reads >= 1  # the counter sees Kornia's reads


def test_snapmix_reads_nothing_but_its_cam_forward(monkeypatch):
    monkeypatch.setattr(_checks, "can_read_values", lambda tensor: False)
    model, images, labels = snapmix_setup()
    aug = RandomSnapMix(FeatureTap(model), data_keys=KEYS)
    assert count_launches(lambda: aug(images, labels)).reads == 0


def test_params_hold_kornias_keys_with_kornias_meaning():
    """Kornia's handlers' formulas, applied to our recorded params, give our images and label rows: MixUp's
    ``mixup_pairs``/``mixup_lambdas`` and CutMix's ``crop_src`` (through Kornia's own bbox_to_mask and
    infer_bbox_shape), with ``batch_prob``, ``image_shape`` and ``dtype`` as Kornia fills them."""
    from kornia.constants import DType
    from kornia.geometry.bbox import bbox_to_mask, infer_bbox_shape

    images, labels = distinct_images(6, size=10), torch.arange(6)
    aug = RandomMixUp(data_keys=KEYS, generator=torch.Generator().manual_seed(4))
    out, rows = aug(images, labels)
    params = aug._params
    lam = params["mixup_lambdas"].view(-1, 1, 1, 1)
    assert torch.allclose(out, images * (1 - lam) + images[params["mixup_pairs"]] * lam, atol=1e-6)
    assert torch.equal(rows[:, 2], params["mixup_lambdas"]) and torch.equal(params["batch_prob"], torch.ones(6))
    assert int(params["dtype"]) == DType.get(torch.float32).value

    aug = RandomCutMix(data_keys=KEYS, generator=torch.Generator().manual_seed(5))
    out, rows = aug(images.double(), labels)
    params = aug._params
    crops = params["crop_src"]
    assert crops.shape == (1, 6, 4, 2) and params["image_shape"].tolist() == [10.0, 10.0]
    mask = bbox_to_mask(crops[0], 10, 10).bool()[:, None].expand_as(images)
    assert torch.equal(out, torch.where(mask, images.double()[params["mix_pairs"]], images.double()))
    width, height = infer_bbox_shape(crops[0])
    assert torch.allclose(rows[0, :, 2], (width * height / 100).double())
    assert int(params["dtype"]) == DType.get(torch.float64).value


@pytest.mark.parametrize("p", [0.0, 1.0])
def test_batch_prob_is_the_batch_gate(p):
    images, labels = torch.rand(5, 3, 8, 8), torch.arange(5)
    for aug in (RandomMixUp(p=p, data_keys=KEYS), RandomCutMix(p=p, data_keys=KEYS)):
        aug(images, labels)
        assert aug._params["batch_prob"].dtype == torch.float32 and torch.equal(
            aug._params["batch_prob"], torch.full((5,), p)
        )


def test_tensors_beyond_the_data_keys_are_ignored_as_kornia_does():
    images, other = torch.rand(4, 3, 8, 8), torch.rand(4, 3, 8, 8)
    theirs = KA.RandomMixUpV2()(images, other)  # data_keys=["input"]: the second tensor is not touched
    for ours in (RandomMixUp(), RandomCutMix()):
        out = ours(images, other)
        assert isinstance(out, torch.Tensor) and out.shape == theirs.shape == images.shape
    out = RandomMixUp(data_keys=KEYS)(images)  # keys beyond the inputs: only what was given comes back
    assert isinstance(out, torch.Tensor) and out.shape == images.shape
    with pytest.raises(ValueError, match=r"got 1 tensors for data_keys \['class', 'input'\]: no 'input'"):
        RandomMixUp(data_keys=["class", "input"])(torch.arange(4))


def test_an_unmixed_cutmix_row_is_label_label_zero_with_either_lambda():
    """Kornia's documented p=0 rows, [label, label, 0], for use_correct_lambda True and False (ours returned 1 for
    True); in a mixed batch a self-paired row keeps 1 - its box's area ratio with use_correct_lambda, as Kornia's."""
    images, labels = torch.rand(4, 3, 8, 8), torch.tensor([3, 1, 0, 2])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = KA.RandomCutMixV2(p=0.0, data_keys=KEYS, use_correct_lambda=True)(images, labels)[1]
    for correct in (True, False):
        _, rows = RandomCutMix(p=0.0, data_keys=KEYS, use_correct_lambda=correct)(images, labels)
        assert torch.equal(rows, theirs) and torch.equal(rows[0, :, 2], torch.zeros(4))
    one = torch.rand(1, 3, 8, 8)  # a batch of one pairs the image with itself: Kornia's 1 - area ratio
    aug = RandomCutMix(data_keys=KEYS, use_correct_lambda=True)
    _, rows = aug(one, torch.tensor([2]))
    x1, y1, x2, y2 = aug._params["mix_boxes"][0, 0].tolist()
    assert rows.tolist() == [[[2.0, 2.0, 1 - (x2 - x1) * (y2 - y1) / 64]]]


@given(seed=st.integers(0, 2**31 - 1), low=st.floats(0, 1), width=st.floats(0, 1), same_on_batch=st.booleans())
def test_kornias_ranges_map_the_same_draws(seed, low, width, same_on_batch):
    """lambda_val=(lo, hi) makes the partner's MixUp weight lo + (hi - lo) * v of the same uniform draw; cut_size
    clamps CutMix's lambda = 1 - u of the same Beta draw (Kornia's definitions)."""
    high = min(1.0, low + width)
    images, labels = torch.rand(6, 3, 8, 8), torch.arange(6)

    def params(aug_class, **kwargs):
        aug = aug_class(
            data_keys=KEYS, same_on_batch=same_on_batch, generator=torch.Generator().manual_seed(seed), **kwargs
        )
        aug(images, labels)
        return aug._params

    plain, ranged = params(RandomMixUp), params(RandomMixUp, lambda_val=(low, high))
    expected = low + (high - low) * plain["mixup_lambdas"]  # the partner weight is 1 - own, own = 1 - v
    assert torch.allclose(ranged["mixup_lambdas"], expected, atol=1e-6)
    assert ((ranged["mixup_lambdas"] >= low - 1e-6) & (ranged["mixup_lambdas"] <= high + 1e-6)).all()
    if low < 1:
        plain, clamped = params(RandomCutMix), params(RandomCutMix, cut_size=(low, high))
        assert torch.equal(clamped["mix_lambdas"], plain["mix_lambdas"].clamp(1 - high, 1 - low))


def test_beta_is_kornias_name_of_mix_alpha():
    images, labels = torch.rand(6, 3, 8, 8), torch.arange(6)
    outs = []
    for kwargs in ({"mix_alpha": 2.5}, {"beta": 2.5}, {"beta": torch.tensor(2.5)}):
        aug = RandomCutMix(data_keys=KEYS, generator=torch.Generator().manual_seed(0), **kwargs)
        outs.append(aug(images, labels))
    assert all(torch.equal(out[0], outs[0][0]) and torch.equal(out[1], outs[0][1]) for out in outs)


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        (lambda: RandomMixUp(), lambda: KA.RandomMixUpV2()),
        (
            lambda: RandomMixUp(lambda_val=(0.2, 0.4), p=0.5, same_on_batch=True),
            lambda: KA.RandomMixUpV2(lambda_val=(0.2, 0.4), p=0.5, same_on_batch=True),
        ),
        (lambda: RandomCutMix(), lambda: KA.RandomCutMixV2()),
        (
            lambda: RandomCutMix(cut_size=(0.2, 0.5), beta=2.0, p=0.3),
            lambda: KA.RandomCutMixV2(cut_size=(0.2, 0.5), beta=2.0, p=0.3),
        ),
    ],
)
def test_reprs_are_kornias(ours, theirs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = repr(theirs())
    assert repr(ours()).replace("Random", "", 1) == expected.replace("Random", "", 1).replace("V2(", "(")


def test_the_kornia_classes_pickle():
    """Kornia's multiprocessing tests hand augmentations to loader workers; the ranges are state, not closures."""
    import pickle

    images, labels = torch.rand(4, 3, 8, 8), torch.arange(4)
    for aug in (RandomMixUp(lambda_val=(0.1, 0.3), data_keys=KEYS), RandomCutMix(cut_size=(0.2, 0.6), data_keys=KEYS)):
        copy = pickle.loads(pickle.dumps(aug))
        assert repr(copy) == repr(aug)
        _, rows = copy(images, labels)
        assert rows.shape[-1] == 3


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: RandomMixUp(mix_alpha=2.0, lambda_val=(0.1, 0.2)), r"give it with the default mix_alpha=1.0"),
        (lambda: RandomMixUp(lambda_val=(0.5, 0.2)), r"`lambda_val` must be a \(min, max\) pair with 0.0 <= min"),
        (lambda: RandomMixUp(lambda_val=0.5), r"`lambda_val` must be a \(min, max\) pair, got 0.5 \(float\)"),
        (lambda: RandomCutMix(cut_size=(1.0, 1.0)), r"`cut_size` minimum must be < 1"),
        (lambda: RandomCutMix(cut_size=(0.2, 1.5)), r"`cut_size` must be a \(min, max\) pair with 0.0 <= min"),
        (lambda: RandomCutMix(beta=2.0, mix_alpha=3.0), r"`beta` is Kornia's name for `mix_alpha`: give one"),
        (lambda: RandomCutMix(beta=0.0), r"`beta` must be > 0, got 0.0"),
        (lambda: RandomCutMix(num_mix=3), r"got 3: Kornia's later cuts paste over the earlier ones"),
    ],
)
def test_bad_kornia_arguments_are_named(make, message):
    with pytest.raises((ValueError, TypeError), match=message):
        make()
