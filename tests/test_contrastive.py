"""MCL-OKD's contrastive term and its preset: the NCE loss, the memory's update and the mean-to-last
distillation, each against its equation written out in float64 (MCL-OKD's code, winycg/MCL-OKD, read
2026-12-03); gradients where they belong; named errors."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cekd_losses import OnlineDistillationLoss, PeerContrast


def reference_loss(memory, embeddings, index, negatives, temperature, num_samples):
    """sum over ordered pairs (i != j) of NCE's loss, sample by sample in float64 (MCL-OKD's ContrastMemory and
    ContrastLoss): scores exp(M_j[k] . e_i / T) normalised by their mean times n, noise K / n."""
    peers, batch = embeddings.shape[:2]
    k = negatives.shape[1]
    noise = k / num_samples
    total = 0.0
    for i in range(peers):
        for j in range(peers):
            if i == j:
                continue
            rows = [[int(index[b])] + [int(n) for n in negatives[b]] for b in range(batch)]
            scores = [
                [math.exp(float(memory[j, r] @ embeddings[i, b]) / temperature) for r in rows[b]] for b in range(batch)
            ]
            z = sum(sum(row) for row in scores) / (batch * (k + 1)) * num_samples
            loss = 0.0
            for b in range(batch):
                p = [s / z for s in scores[b]]
                loss += math.log(p[0] / (p[0] + noise + 1e-7))
                loss += sum(math.log(noise / (q + noise + 1e-7)) for q in p[1:])
            total += -loss / batch
    return total


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), peers=st.integers(2, 3), batch=st.integers(1, 5), k=st.integers(1, 6))
def test_the_loss_is_mcl_okds_nce_between_every_ordered_pair_of_peers(seed, peers, batch, k):
    g = torch.Generator().manual_seed(seed)
    contrast = PeerContrast([5] * peers, num_samples=20, embed_dim=4, negatives=k, generator=g).double()
    features = [torch.randn(batch, 5, generator=g, dtype=torch.float64) for _ in range(peers)]
    index = torch.randperm(20, generator=g)[:batch]
    negatives = torch.randint(0, 20, (batch, k), generator=g)
    memory = contrast.memory.clone()
    embeddings = contrast.embed(features).detach()
    expected = reference_loss(memory, embeddings, index, negatives, 0.1, 20)
    got = contrast(features, index, negatives)
    assert math.isclose(float(got.detach()), expected, rel_tol=1e-9, abs_tol=1e-9)


def test_the_memory_follows_mcl_okds_update_and_only_at_the_batchs_rows():
    g = torch.Generator().manual_seed(0)
    contrast = PeerContrast([3, 3], num_samples=10, embed_dim=4, negatives=3, momentum=0.5, generator=g).double()
    features = [torch.randn(2, 3, generator=g, dtype=torch.float64) for _ in range(2)]
    index = torch.tensor([7, 2])
    before, embeddings = contrast.memory.clone(), contrast.embed(features).detach()
    contrast(features, index)
    for peer in range(2):
        for b, row in enumerate(index.tolist()):
            mixed = 0.5 * before[peer, row] + 0.5 * embeddings[peer, b]
            assert torch.allclose(contrast.memory[peer, row], mixed / mixed.norm(), atol=1e-12)
    untouched = [r for r in range(10) if r not in (7, 2)]
    assert torch.equal(contrast.memory[:, untouched], before[:, untouched])


def test_gradients_reach_the_heads_and_features_not_the_memory():
    contrast = PeerContrast([6, 4], num_samples=30, negatives=8, generator=torch.Generator().manual_seed(1))
    features = [torch.randn(5, 6, requires_grad=True), torch.randn(5, 4, requires_grad=True)]
    contrast(features, torch.arange(5)).backward()
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in features)
    assert all(p.grad is not None for p in contrast.heads.parameters())
    assert not contrast.memory.requires_grad and contrast.memory.shape == (2, 30, 128)


def test_the_negatives_are_uniform_draws_reproducible_from_the_generator():
    a = PeerContrast([4, 4], num_samples=50, negatives=1000, generator=torch.Generator().manual_seed(3))
    b = PeerContrast([4, 4], num_samples=50, negatives=1000, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a.memory, b.memory)
    index = torch.tensor([0, 1])
    drawn = a._negatives(index, None)
    assert torch.equal(drawn, b._negatives(index, None)) and drawn.shape == (2, 1000)
    counts = torch.bincount(drawn.flatten(), minlength=50).double()
    chi_square = float(((counts - 40) ** 2 / 40).sum())
    assert chi_square < 111.0  # the 1e-6 tail of chi-square with 49 degrees of freedom


def test_mcl_distils_the_members_mean_into_the_last_member():
    """MCL-OKD's objective beside the contrast: every member's CE plus T^2 KL(mean of the members || last)."""
    g = torch.Generator().manual_seed(0)
    members, target = torch.randn(3, 4, 5, generator=g), torch.tensor([0, 1, 2, 3])
    parts = OnlineDistillationLoss("mcl").components(members, target)
    assert list(parts) == ["total", "supervised", "mean_to_last"]
    m = members.double()
    teacher = torch.softmax(m.mean(0) / 3, dim=1)
    student = torch.log_softmax(m[-1] / 3, dim=1)
    expected = 9 * (teacher * (teacher.log() - student)).sum(1).mean()
    ce = sum(torch.nn.functional.cross_entropy(z, target, reduction="mean") for z in m)
    assert math.isclose(float(parts["mean_to_last"]), float(expected), rel_tol=1e-5)
    assert math.isclose(float(parts["supervised"]), float(ce), rel_tol=1e-5)
    with pytest.raises(ValueError, match="not used by method 'mcl'"):
        OnlineDistillationLoss("mcl").components(members, target, teacher_logits=members[0])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"in_features": [8]}, "N >= 2 peers"),
        ({"negatives": 0}, "`negatives` must be"),
        ({"momentum": 1.0}, r"`momentum` must be in \[0.0, 1.0\)"),
        ({"temperature": 0.0}, "`temperature` must be > 0"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PeerContrast(**{"in_features": [8, 8], "num_samples": 100, **kwargs})


def test_bad_calls_are_named():
    contrast = PeerContrast([4, 4], num_samples=10, negatives=2)
    features = [torch.rand(3, 4), torch.rand(3, 4)]
    with pytest.raises(ValueError, match="one tensor per peer"):
        contrast(features[:1], torch.arange(3))
    with pytest.raises(ValueError, match=r"`index` must hold dataset indices in \[0, 10\)"):
        contrast(features, torch.tensor([0, 1, 10]))
    with pytest.raises(ValueError, match=r"`index` must have shape \(3,\)"):
        contrast(features, torch.arange(4))
