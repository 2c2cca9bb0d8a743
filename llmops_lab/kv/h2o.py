"""Heavy-hitter eviction: keep the recent tokens and those that have drawn the most attention.

H2O (Zhang et al. 2023, "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large
Language Models") observed that a few tokens receive most of the attention mass, and that the
running sum of the attention a token has received predicts it well. The cache keeps
``recent_size`` recent tokens plus ``heavy_size`` others with the largest accumulated attention,
chosen per KV head; everything else is evicted, one token per decode step once the budget is full.

The cache needs the attention weights, so it asks the model for the queries (``needs_query``) and
computes softmax(q k^T / sqrt(D)) over the keys it returns (a second time: the runtime's backend
does not hand its weights back). With grouped-query attention the weights of the H / Hkv query heads
that share a KV head are summed into that head's score. Keys arrive after RoPE, so the survivors
keep their true positions.
"""
from __future__ import annotations

import math

import torch

from ..checks import is_int
from .cache import check_dims, check_new_kv
from .sliding_window import check_budget, check_prefill_or_decode, model_dims


def attention_weights(q: torch.Tensor, k: torch.Tensor, causal: bool) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) of q [B, H, S, D] over k [B, Hkv, N, D], summed per KV head: [B, Hkv, S, N].

    causal: query i sits at key position N - S + i and sees keys up to it.
    """
    B, H, S, D = q.shape
    Hkv, N = k.shape[1], k.shape[2]
    qg = q.float().view(B, Hkv, H // Hkv, S, D)                         # query heads grouped by KV head
    scores = qg @ k.float()[:, :, None].transpose(-1, -2) / math.sqrt(D)  # [B, Hkv, H/Hkv, S, N]
    if causal:
        allowed = torch.ones(S, N, dtype=torch.bool, device=q.device).tril(N - S)
        scores = scores.masked_fill(~allowed, float("-inf"))
    return scores.softmax(-1).sum(2)


class HeavyHitterKVCache:
    """H2O: ``recent_size`` recent tokens + ``heavy_size`` heavy hitters per KV head.

    Per layer: k, v [B, Hkv, budget, D] and the accumulated attention [B, Hkv, budget] (fp32), with
    budget = heavy_size + recent_size, slots in position order. At a decode step with the cache full,
    the lowest-scoring token outside the recent window is evicted first, then the new token is
    stored and its query's weights added to every held token's score, so a decoded token attends
    to exactly ``budget`` tokens (itself included). ``heavy_size=0`` is a sliding window.
    """

    needs_query = True
    evicts = True        # holds some positions only: a padding mask over all of them cannot apply

    def __init__(self, num_layers: int, batch_size: int, num_kv_heads: int, head_dim: int,
                 heavy_size: int, recent_size: int, dtype=torch.float32, device="cpu",
                 context_len: int | None = None):
        if not is_int(heavy_size) or heavy_size < 0:
            raise ValueError(f"heavy_size must be an integer >= 0, got {heavy_size!r}")
        check_budget(recent_size, None, "recent_size")  # the new token is always recent
        check_budget(heavy_size + recent_size, context_len, "heavy_size + recent_size")
        check_dims(num_layers=num_layers, batch_size=batch_size, num_kv_heads=num_kv_heads, head_dim=head_dim)
        self.heavy_size, self.recent_size = heavy_size, recent_size
        self.budget = heavy_size + recent_size
        shape = (batch_size, num_kv_heads, self.budget, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.score = [torch.zeros(shape[:3], dtype=torch.float32, device=device) for _ in range(num_layers)]
        self.batch_size = batch_size
        self.length = 0  # positions seen
        self.written = [0] * num_layers  # positions each layer has stored: the next write starts there

    @classmethod
    def for_model(cls, model, batch_size: int, heavy_size: int, recent_size: int, dtype=None, device=None):
        return cls(batch_size=batch_size, heavy_size=heavy_size, recent_size=recent_size,
                   **model_dims(model, dtype, device))

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, start, q: torch.Tensor | None = None):
        """Store k, v [B, Hkv, S, D] (q [B, H, S, D] scores them); return what to attend to."""
        S = k.shape[2]
        if q is None:
            raise ValueError("HeavyHitterKVCache needs the queries: update(..., q=q)")
        check_new_kv(layer, self.k, k, v, self.batch_size)
        check_prefill_or_decode(start, S, self.written[layer])
        B, Hkv, _, D = k.shape
        if q.dim() != 4 or (q.shape[0], q.shape[2], q.shape[3]) != (B, S, D) or q.shape[1] % Hkv:
            # scores of other tokens, or of a batch broadcast over the keys, would evict the wrong ones
            raise ValueError(f"q must be [B={B}, H (a multiple of {Hkv}), S={S}, D={D}], got {tuple(q.shape)}")
        self.written[layer] = start + S
        if S > 1:
            self._prefill(layer, k, v, q)
            return k, v  # the prompt attends to all of itself
        K, V, score = self.k[layer], self.v[layer], self.score[layer]
        held = min(start, self.budget)
        if held == self.budget:
            self._evict_one(K, V, score)
            held -= 1
        K[:, :, held], V[:, :, held], score[:, :, held] = k[:, :, 0], v[:, :, 0], 0.0
        held += 1
        score[:, :, :held] += attention_weights(q, K[:, :, :held], causal=False)[:, :, 0]
        return K[:, :, :held], V[:, :, :held]

    def _prefill(self, layer, k, v, q) -> None:
        S = k.shape[2]
        acc = attention_weights(q, k, causal=True).sum(2)                     # [B, Hkv, S]
        if S <= self.budget:
            keep = torch.arange(S, device=k.device).expand(*acc.shape)
        else:
            old = S - self.recent_size  # tokens 0..old-1 compete for the heavy slots
            heavy = acc[:, :, :old].topk(self.heavy_size, dim=-1).indices.sort(-1).values
            recent = torch.arange(old, S, device=k.device).expand(*acc.shape[:2], -1)
            keep = torch.cat([heavy, recent], dim=-1)                         # [B, Hkv, budget]
        n = keep.shape[-1]
        self.k[layer][:, :, :n] = k.gather(2, keep[..., None].expand(-1, -1, -1, k.shape[-1]))
        self.v[layer][:, :, :n] = v.gather(2, keep[..., None].expand(-1, -1, -1, v.shape[-1]))
        self.score[layer][:, :, :n] = acc.gather(2, keep)

    def _evict_one(self, K, V, score) -> None:
        """Drop the lowest-scoring token among the oldest heavy_size + 1 slots; shift the rest down.

        The recent_size - 1 newest tokens are protected: with the new token they make the window.
        """
        h = self.heavy_size
        if h:
            keep = score[:, :, : h + 1].topk(h, dim=-1).indices.sort(-1).values   # [B, Hkv, h]
            idx = keep[..., None].expand(-1, -1, -1, K.shape[-1])
            K[:, :, :h], V[:, :, :h] = K[:, :, : h + 1].gather(2, idx), V[:, :, : h + 1].gather(2, idx)
            score[:, :, :h] = score[:, :, : h + 1].gather(2, keep)
        for t in (K, V, score):  # the window slides by one
            t[:, :, h: self.budget - 1] = t[:, :, h + 1: self.budget].clone()

    def reset(self) -> None:
        self.length = 0
        self.written = [0] * len(self.k)

    @property
    def nbytes(self) -> int:
        """Bytes allocated: keys and values for ``budget`` tokens plus the fp32 attention scores."""
        return sum(t.numel() * t.element_size() for t in self.k + self.v + self.score)
