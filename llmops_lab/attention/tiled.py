"""Flash attention's algorithm in plain PyTorch: tiles of queries and keys, and an online softmax.

Dao et al. 2022 (FlashAttention), after Milakov & Gimelshein 2018 (online softmax). For each block
of queries we stream blocks of keys and values, keeping per query a running maximum m, a running
sum l of exp(score - m), and an unnormalised output acc. A new key block with scores s updates

    m' = max(m, rowmax(s));  l' = l * exp(m - m') + rowsum(exp(s - m'));
    acc' = acc * exp(m - m') + exp(s - m') @ V_block

and at the end out = acc / l. No S x S matrix exists at any time: extra memory is O(S x block),
not O(S^2). This is the version to step through; ``triton_flash`` is the same loop as a kernel.
"""
from __future__ import annotations

import math

import torch

from ..checks import is_int
from .backends import _check


def tiled_attention(q, k, v, mask=None, is_causal: bool = False, block_m: int = 64, block_n: int = 64,
                    trace: list | None = None):
    """Exact attention, q [B, H, Sq, D], k/v [B, Hkv, Sk, D], computed tile by tile.

    A runtime backend like the others, ``(q, k, v, mask, is_causal)``, that applies no explicit
    mask: ``mask`` must be None (a padding mask or a sliding window needs another backend).
    Causal masking aligns the last query with the last key (query i sees keys <= i + Sk - Sq).
    Inputs are checked as for every backend (``backends._check``: equal batch sizes, one floating
    dtype, head dim >= 1).
    If ``trace`` is a list, each (query block, key block) step appends its running max and sum for
    the block's first query, for the notebook's picture.
    """
    if isinstance(mask, bool):  # the old signature's fourth argument was is_causal
        raise TypeError(f"tiled_attention's fourth argument is the mask, as in every backend "
                        f"(q, k, v, mask, is_causal); got {mask!r}: pass is_causal={mask} by name")
    if mask is not None:
        raise ValueError("tiled_attention applies no explicit mask, only is_causal; "
                         "use the naive or sdpa backend for a padding mask or a sliding window")
    if q.dim() == k.dim() == 4 and 0 in (q.shape[2], k.shape[2]):
        raise ValueError("empty sequence: attention needs at least one query and one key")
    _check(q, k, v, None, is_causal)
    B, H, Sq, D = q.shape
    Sk = k.shape[2]
    for name, size in (("block_m", block_m), ("block_n", block_n)):
        if not is_int(size) or size < 1:
            raise ValueError(f"{name} must be a positive integer, got {size!r}")
    if trace is not None and (B == 0 or H == 0):  # the trace follows batch row 0, head 0
        raise ValueError(f"trace needs at least one batch row and one head, got q of shape {tuple(q.shape)}")
    rep = H // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    scale = 1.0 / math.sqrt(D)
    out = torch.empty_like(q)
    offset = Sk - Sq
    for i0 in range(0, Sq, block_m):
        qb = q[:, :, i0:i0 + block_m].float() * scale                  # [B, H, bm, D]
        rows = torch.arange(i0, i0 + qb.shape[2], device=q.device)
        m = torch.full(qb.shape[:3], float("-inf"), device=q.device)    # running max
        l = torch.zeros(qb.shape[:3], device=q.device)                  # running sum
        acc = torch.zeros_like(qb)                                      # unnormalised output
        k_end = min(Sk, i0 + qb.shape[2] + offset) if is_causal else Sk
        for j0 in range(0, k_end, block_n):
            kb, vb = k[:, :, j0:j0 + block_n].float(), v[:, :, j0:j0 + block_n].float()
            s = qb @ kb.transpose(-1, -2)                               # [B, H, bm, bn]: one tile
            if is_causal:
                cols = torch.arange(j0, j0 + kb.shape[2], device=q.device)
                s = s.masked_fill(cols[None, :] > rows[:, None] + offset, float("-inf"))
            m_new = torch.maximum(m, s.amax(-1))
            p = torch.exp(s - m_new[..., None])
            correction = torch.exp(m - m_new)                           # rescales what came before
            l = l * correction + p.sum(-1)
            acc = acc * correction[..., None] + p @ vb
            m = m_new
            if trace is not None:
                trace.append({"q_block": i0 // block_m, "k_block": j0 // block_n,
                              "max": m[0, 0, 0].item(), "sum": l[0, 0, 0].item()})
        out[:, :, i0:i0 + block_m] = (acc / l[..., None]).to(q.dtype)
    return out
