"""A paged prefill-attention kernel in Triton: flash attention whose keys come through a block table.

Kwon et al. 2023 (PagedAttention) for the layout, Dao 2023 (FlashAttention-2) for the loop. The
queries are the last S positions of each sequence (a whole prompt, or the part a prefix-cache hit
left to compute); their keys and values are already stored in the pool. Each program owns
BLOCK_M queries of one head and streams the keys they may see (causal: up to their own position),
looking each key's slot up in the block table; the S x context score matrix never leaves the chip.
Prefill is compute-bound, so unlike the decode kernel each query head reads its KV head itself.

Reference: ``attention.paged_prefill_reference`` (gather the blocks, then SDPA with a causal mask).
Runs on a CPU under TRITON_INTERPRET=1 at small sizes.
"""
from __future__ import annotations

import math

import torch

from ..attention.triton_flash import head_contiguous
from .triton_paged import _check_dtypes, _check_prefill, _interpret, _paged_tiles, triton

if triton is not None:
    import triton.language as tl

    # seq_q and the block-table width (stride_btb) vary from step to step; specialised (Triton
    # compiles a variant for an integer of 1, one divisible by 16, and any other) they would
    # compile again inside a served step
    @triton.jit(do_not_specialize=["seq_q", "stride_btb"])
    def paged_prefill_kernel(q_ptr, k_pool_ptr, v_pool_ptr, block_tables_ptr, context_lens_ptr, o_ptr,
                             stride_qb, stride_qh, stride_qs, stride_kn, stride_kh, stride_ks,
                             stride_vn, stride_vh, stride_vs, stride_btb, stride_ob, stride_oh, stride_os,
                             H, GROUP, seq_q, qk_scale_log2,
                             HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr,
                             BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
        pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
        b, h = pid_bh // H, pid_bh % H
        context_len = tl.load(context_lens_ptr + b)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM)
        in_q = offs_m < seq_q
        q_pos = context_len - seq_q + offs_m                  # where each query sits in its sequence
        q = tl.load(q_ptr + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :],
                    mask=in_q[:, None], other=0.0)
        if UPCAST:  # Triton's CPU interpreter computes bf16 dots wrongly; on a GPU this is off
            q = q.to(tl.float32)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        table = block_tables_ptr + b * stride_btb
        k_head = k_pool_ptr + (h // GROUP) * stride_kh
        v_head = v_pool_ptr + (h // GROUP) * stride_vh
        hi = tl.minimum(context_len - seq_q + (pid_m + 1) * BLOCK_M, context_len)  # causal: no key after the last query
        acc, m_i, l_i = _paged_tiles(acc, m_i, l_i, q, table, k_head, v_head, stride_kn, stride_ks, stride_vn,
                                     stride_vs, offs_d, q_pos, 0, hi, qk_scale_log2, True, BLOCK_SIZE, BLOCK_N,
                                     DOT_PRECISION, UPCAST)
        acc = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(o_ptr + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :],
                 acc.to(o_ptr.dtype.element_ty), mask=in_q[:, None])


def paged_prefill(q, k_pool, v_pool, block_tables, context_lens):
    """Causal attention of q [B, H, S, D], the last S positions of each row's context of
    context_lens[b] (>= S) tokens, over keys and values already stored in the pools. -> [B, H, S, D]."""
    _check_prefill(q, k_pool, v_pool, block_tables, context_lens)
    if triton is None:
        raise RuntimeError("triton is not installed")
    _check_dtypes(q, k_pool, v_pool, "prefill")
    B, H, S, D = q.shape
    if D & (D - 1) or D < 16:
        raise ValueError(f"head dim {D} not supported: the kernel needs a power of two >= 16")
    q, k_pool, v_pool = head_contiguous(q), head_contiguous(k_pool), head_contiguous(v_pool)
    interpret = _interpret()
    block_m, block_n = (16, 16) if interpret else (64, 64)
    block_tables, context_lens = block_tables.to(torch.int32), context_lens.to(torch.int32)
    out = torch.empty_like(q)
    paged_prefill_kernel[(triton.cdiv(S, block_m), B * H)](
        q, k_pool, v_pool, block_tables, context_lens, out,
        q.stride(0), q.stride(1), q.stride(2), *k_pool.stride()[:3], *v_pool.stride()[:3], block_tables.stride(0),
        out.stride(0), out.stride(1), out.stride(2), H, H // k_pool.shape[1], S,
        (1.0 / math.sqrt(D)) * 1.4426950408889634,
        HEAD_DIM=D, BLOCK_SIZE=k_pool.shape[2], BLOCK_M=block_m, BLOCK_N=block_n,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32", UPCAST=interpret and q.dtype == torch.bfloat16,
        num_warps=4, num_stages=1 if interpret else 2)
    return out
