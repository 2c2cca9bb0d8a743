"""Attention over a paged KV cache: the PyTorch references that gather blocks, and the runtime backend.

Kwon et al. 2023 (PagedAttention). A pool holds the keys (or values) of every sequence as
[num_blocks, Hkv, block_size, D]; sequence b's logical block j is physical block
block_tables[b, j], and token position p lives at slot block_tables[b, p // block_size] *
block_size + p % block_size. Heads before slots, so one (block, head) tile of block_size x D is
contiguous in memory: the decode kernel streams it in one coalesced read, and a gather is a plain
index of the first dimension.

The references gather each sequence's blocks into a contiguous [B, Hkv, S, D] copy and run the
ordinary attention on it; the Triton kernel (``triton_paged``) and, on a CPU, the C kernel
(``cpu_kernel``) read through the table instead.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..attention import naive_attention, sdpa_attention
from . import cpu_kernel, triton_paged


def gather_kv(pool: torch.Tensor, block_tables: torch.Tensor, length: int) -> torch.Tensor:
    """Contiguous [B, Hkv, length, D] from pool [N, Hkv, bs, D] through block_tables [B, >= ceil(length/bs)]."""
    bs = pool.shape[2]
    n = -(-length // bs)
    if block_tables.shape[1] < n:
        raise ValueError(f"block tables hold {block_tables.shape[1]} blocks, {length} tokens need {n}")
    B, (N, Hkv, _, D) = block_tables.shape[0], pool.shape
    # index_select of whole blocks as rows: one memcpy per block, 2-3x faster on a CPU than
    # advanced indexing of the 4-d pool
    x = pool.reshape(N, -1).index_select(0, block_tables[:, :n].reshape(-1).long()).view(B, n, Hkv, bs, D)
    return x.transpose(1, 2).reshape(B, Hkv, n * bs, D)[:, :, :length]


def store_kv(k: torch.Tensor, v: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Write k, v [T, Hkv, D] (one row per token) into their slots; a slot of -1 is skipped (a token
    whose KV is already in a shared, prefix-cached block)."""
    if k.shape != v.shape or k.dim() != 3 or slot_mapping.shape != k.shape[:1]:
        raise ValueError(f"k, v must be [T, Hkv, D] with one slot each; got {tuple(k.shape)}, "
                         f"{tuple(v.shape)}, slots {tuple(slot_mapping.shape)}")
    keep = slot_mapping >= 0
    if not bool(keep.all()):
        k, v, slot_mapping = k[keep], v[keep], slot_mapping[keep]
    bs = k_pool.shape[2]
    block, offset = slot_mapping // bs, slot_mapping % bs
    k_pool[block, :, offset] = k                     # advanced indices around a slice: [T, Hkv, D]
    v_pool[block, :, offset] = v


def paged_decode_reference(q, k_pool, v_pool, block_tables, context_lens, return_lse: bool = False):
    """The PyTorch twin of ``triton_paged.paged_decode``: gather, mask each row at its length, naive
    softmax in fp32. q [B, H, D] -> [B, H, D]."""
    triton_paged._check(q, k_pool, v_pool, block_tables, context_lens)
    L = int(context_lens.max())
    k, v = gather_kv(k_pool, block_tables, L), gather_kv(v_pool, block_tables, L)
    valid = torch.arange(L, device=q.device)[None, :] < context_lens[:, None].to(q.device)  # [B, L]
    out = naive_attention(q[:, :, None], k, v, mask=valid[:, None, None, :])[:, :, 0]
    if not return_lse:
        return out
    n_rep = q.shape[1] // k.shape[1]
    scores = (q.float()[:, :, None] @ k.float().repeat_interleave(n_rep, 1).transpose(-1, -2))[:, :, 0]
    scores = scores / q.shape[-1] ** 0.5
    return out, scores.masked_fill(~valid[:, None], float("-inf")).logsumexp(-1)


def paged_prefill_reference(q, k_pool, v_pool, block_tables, context_lens):
    """Prefill (or a chunk of it) over a paged cache: q [B, H, S, D] are the last S positions of each
    row's context of context_lens[b] tokens (already stored); causal. Gather, then SDPA with a mask."""
    # the lengths on the host: the gather reads them anyway, so they are checked wherever they live
    triton_paged._check_prefill(q, k_pool, v_pool, block_tables, context_lens.cpu())
    S = q.shape[2]
    L = int(context_lens.max())
    k, v = gather_kv(k_pool, block_tables, L), gather_kv(v_pool, block_tables, L)
    lens = context_lens.to(q.device).long()
    qpos = lens[:, None] - S + torch.arange(S, device=q.device)[None, :]   # [B, S]
    kpos = torch.arange(L, device=q.device)
    allowed = (kpos[None, None, :] <= qpos[:, :, None]) & (kpos[None, None, :] < lens[:, None, None])
    return sdpa_attention(q, k, v, mask=allowed[:, None])


def paged_decode(q, k_pool, v_pool, block_tables, context_lens, **kwargs):
    """The Triton kernel on CUDA; on a CPU the C kernel (``cpu_kernel``) where it has a variant, else
    the Triton kernel under TRITON_INTERPRET=1; the gather reference elsewhere. ``kwargs`` are the
    Triton kernel's (the C kernel takes none but ``max_context_len``, which it has no use for)."""
    if q.device.type == "cpu" and set(kwargs) <= {"max_context_len"}:
        if (cpu_kernel.same_layout(k_pool, v_pool) and cpu_kernel.supports(q, k_pool, k_pool.shape[1])
                and cpu_kernel.available()):
            return cpu_kernel.paged_decode_cpu(q, k_pool, v_pool, block_tables, context_lens, heads_first=True)
    if triton_paged.available(q.device):
        return triton_paged.paged_decode(q, k_pool, v_pool, block_tables, context_lens, **kwargs)
    return paged_decode_reference(q, k_pool, v_pool, block_tables, context_lens)


@dataclass
class PagedView:
    """What ``PagedKVCache.update`` returns in kernel mode instead of contiguous keys or values: a
    layer's pool and the metadata to read it (passed explicitly, never kept in a global)."""

    pool: torch.Tensor            # [num_blocks, Hkv, block_size, D]
    block_tables: torch.Tensor    # [B, max_blocks] int32
    context_lens: torch.Tensor    # [B] int32
    length: int                   # max(context_lens): what a gather needs

    def gather(self) -> torch.Tensor:
        return gather_kv(self.pool, self.block_tables, self.length)


def paged_prefill(q, k_pool, v_pool, block_tables, context_lens):
    """The Triton prefill kernel where it runs, the gather reference elsewhere."""
    if triton_paged.available(q.device):
        from .triton_prefill import paged_prefill as kernel
        return kernel(q, k_pool, v_pool, block_tables, context_lens)
    return paged_prefill_reference(q, k_pool, v_pool, block_tables, context_lens)


def paged_attention(q, k, v, mask=None, is_causal=False):
    """Runtime backend for a ``PagedKVCache``: with ``PagedView``s, decode (one query) and a causal
    prefill from position 0 read the pool through the block table with the kernels (``paged_decode``,
    ``paged_prefill``); other
    masks (a prefill after a prefix-cache hit, padding, a sliding window) and contiguous tensors
    run SDPA on gathered keys and values."""
    if isinstance(k, PagedView):
        if q.shape[2] == 1 and mask is None:
            return paged_decode(q[:, :, 0], k.pool, v.pool, k.block_tables, k.context_lens,
                                max_context_len=k.length)[:, :, None]
        if mask is None and q.shape[2] == k.length:
            return paged_prefill(q, k.pool, v.pool, k.block_tables, k.context_lens)
        k, v = k.gather(), v.gather()
    return sdpa_attention(q, k, v, mask, is_causal)
