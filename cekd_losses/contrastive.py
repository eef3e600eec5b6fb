"""MCL-OKD's contrastive term between peers: embedding heads, a memory of every training sample's embeddings,
and noise-contrastive estimation (NCE) between each peer's embeddings and the other peers' memories.

MCL-OKD (Yang et al., "Multi-View Contrastive Learning for Online Knowledge Distillation", ICASSP 2021; code:
winycg/MCL-OKD) adds this term, weighted by ``beta`` (its code: 0.025), to the members' cross entropies and the
distillation of the members' mean into the last member (:class:`~cekd_losses.OnlineDistillationLoss`'s ``"mcl"``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _checks

__all__ = ["PeerContrast"]

EPS = 1e-7  # MCL-OKD's, in the NCE ratios


class PeerContrast(nn.Module):
    """MCL-OKD's contrastive loss between N peers, with its embedding heads and memory.

    Each peer i has a head ``e_i = normalize(W_i f_i)`` from its pooled features ``f_i`` (B, D_i) to
    ``embed_dim`` and a memory ``M_i`` (``num_samples``, ``embed_dim``) of every training sample's embedding (an
    exponential moving average, renormalised, updated in each call after the loss is taken). For a batch of
    dataset indices ``index`` and ``K`` negatives per sample drawn uniformly from the memory, each ordered pair of
    peers (i, j), i != j, scores ``s = exp(M_j[k] . e_i / T)`` for the sample's own index k (the positive) and its
    negatives, normalises them by ``Z = mean(s) * num_samples`` (detached) and takes NCE's loss with noise
    ``P_n = 1 / num_samples``::

        L_ij = -(1 / B) sum_b [log(P_0 / (P_0 + K P_n + eps)) + sum_k log(K P_n / (P_k + K P_n + eps))]

    and the loss is ``sum_{i != j} L_ij``. Memories and negatives carry no gradient; the heads and (through them)
    the peers do.

    Args:
        in_features: each peer's pooled feature width D_i (N >= 2 of them).
        num_samples: the training set's size: one memory row per sample.
        embed_dim: the embeddings' width (MCL-OKD: 128).
        negatives: K, negatives per sample, drawn with replacement (MCL-OKD: 16384, whatever the set's size).
        temperature: T (MCL-OKD: 0.1).
        momentum: the memory's update ``M[k] <- normalize(m M[k] + (1 - m) e)`` (MCL-OKD: 0.5).
        generator: optional ``torch.Generator`` of the negatives and the memory's initial values.

    Call: ``contrast(features, index)``: ``features`` N (B, D_i) tensors, ``index`` (B,) int64 dataset indices
    of the batch's samples; optional ``negatives`` (B, K) indices instead of the uniform draw. Returns the scalar.

    Example:
        >>> contrast = PeerContrast([8, 8], num_samples=100, negatives=16, generator=torch.Generator().manual_seed(0))
        >>> loss = contrast([torch.rand(4, 8), torch.rand(4, 8)], torch.tensor([0, 5, 9, 42]))
        >>> loss.shape, bool(loss > 0)
        (torch.Size([]), True)
    """

    def __init__(
        self,
        in_features: Sequence[int],
        num_samples: int,
        *,
        embed_dim: int = 128,
        negatives: int = 16384,
        temperature: float = 0.1,
        momentum: float = 0.5,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        widths = [_checks.check_positive_int("in_features", width) for width in in_features]
        if len(widths) < 2:
            raise ValueError(f"`in_features` must give N >= 2 peers' widths, got {list(in_features)}")
        self.num_samples = _checks.check_positive_int("num_samples", num_samples)
        self.embed_dim = _checks.check_positive_int("embed_dim", embed_dim)
        self.negatives = _checks.check_positive_int("negatives", negatives)
        self.temperature = _checks.check_positive("temperature", temperature)
        self.momentum = _checks.check_in_range("momentum", momentum, 0.0, 1.0, high_open=True)
        self.generator = generator
        self.heads = nn.ModuleList(nn.Linear(width, embed_dim) for width in widths)
        bound = 1.0 / math.sqrt(embed_dim / 3)  # MCL-OKD's initial memory: uniform in [-bound, bound)
        device = generator.device if generator is not None else None
        initial = (
            torch.rand(len(widths), num_samples, embed_dim, generator=generator, device=device) * (2 * bound) - bound
        )
        self.memory: Tensor
        self.register_buffer("memory", initial)

    def extra_repr(self) -> str:
        return (
            f"peers={len(self.heads)}, num_samples={self.num_samples}, embed_dim={self.embed_dim}, "
            f"negatives={self.negatives}, temperature={self.temperature}, momentum={self.momentum}"
        )

    def embed(self, features: Sequence[Tensor]) -> Tensor:
        """(N, B, embed_dim) unit embeddings of the peers' (B, D_i) pooled features."""
        if len(features) != len(self.heads):
            raise ValueError(f"`features` must hold one tensor per peer ({len(self.heads)}), got {len(features)}")
        heads = zip(self.heads, features, strict=True)
        return torch.stack([F.normalize(head(f.flatten(1)), dim=1, eps=0.0) for head, f in heads])

    def forward(self, features: Sequence[Tensor], index: Tensor, negatives: Tensor | None = None) -> Tensor:
        embeddings = self.embed(features).to(self.memory.dtype)
        peers, batch, _ = embeddings.shape
        index = _checks.check_class_ids(
            "index", _checks.check_shape("index", index, (batch,)), self.num_samples, what="dataset indices"
        ).long()
        rows = torch.cat([index.view(-1, 1), self._negatives(index, negatives)], dim=1)  # (B, 1 + K)
        bank = self.memory.index_select(1, rows.view(-1)).view(peers, batch, -1, self.embed_dim)  # no gradient
        scores = torch.einsum("jbke,ibe->ijbk", bank, embeddings).div(self.temperature).exp()  # student i, memory j
        probs = scores / (scores.mean(dim=(2, 3), keepdim=True).detach() * self.num_samples)
        noise = (rows.shape[1] - 1) / self.num_samples  # K P_n
        positive = torch.log(probs[..., 0] / (probs[..., 0] + noise + EPS))  # (N, N, B)
        negative = torch.log(noise / (probs[..., 1:] + noise + EPS)).sum(dim=3)
        pairs = -(positive + negative).sum(dim=2) / batch  # (N, N): L_ij
        others = ~torch.eye(peers, dtype=torch.bool, device=pairs.device)
        self._remember(embeddings.detach(), index)
        return (pairs * others).sum()

    def _negatives(self, index: Tensor, given: Tensor | None) -> Tensor:
        """(B, K) negatives: ``given``, or uniform draws over the memory (with replacement, as MCL-OKD's)."""
        if given is not None:
            given = _checks.check_shape("negatives", given, (index.shape[0], "K"))
            return _checks.check_class_ids("negatives", given, self.num_samples, what="dataset indices").long()
        generator = self.generator
        device = generator.device if generator is not None else index.device
        shape = (index.shape[0], self.negatives)
        return torch.randint(0, self.num_samples, shape, generator=generator, device=device).to(index.device)

    @torch.no_grad()
    def _remember(self, embeddings: Tensor, index: Tensor) -> None:
        """The memory's update at the batch's rows: ``normalize(m M[k] + (1 - m) e)``, every peer at once."""
        rows = self.memory.index_select(1, index)
        updated = F.normalize(torch.lerp(embeddings, rows, self.momentum), dim=2, eps=0.0)
        self.memory.index_copy_(1, index, updated)
