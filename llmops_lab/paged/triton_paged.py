"""A paged decode-attention kernel in Triton: one new query per sequence, keys read through its block table.

Kwon et al. 2023 (PagedAttention, vLLM) for the paged layout; Dao et al. 2023 (Flash-Decoding) for
splitting a long context over several programs and merging their partial results by log-sum-exp.

Each program owns one (sequence, KV head, split): it loads the GROUP query heads that share that
KV head as one [GROUP_PAD, D] tile, then walks its range of the context BLOCK_N tokens at a time.
Each token's slot is looked up in the block table (block_tables[b, pos // BLOCK_SIZE]) and its K/V
row is loaded straight from the pool, so nothing is gathered into a contiguous copy, and each
K/V byte is read from memory once for the whole group of query heads, which is what makes decode
reach the bandwidth limit with grouped-query attention. With several splits each program stores
its normalised partial output and log-sum-exp; a second small kernel merges them.

Reference: ``attention.paged_decode_reference`` gathers every block into a contiguous
[B, Hkv, S, D] copy first (reads the KV once, writes it once, reads it again: 3x the kernel's
traffic), then runs the naive softmax. Runs on a CPU under TRITON_INTERPRET=1 at small sizes.
"""
from __future__ import annotations

import math
import os

import torch

from ..attention.triton_flash import head_contiguous
from ..checks import is_int

try:
    import triton
    import triton.language as tl

    from ..attention.triton_flash import online_softmax_step
except ImportError:  # the package works without triton; only this kernel needs it
    triton = None


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def available(device: str | torch.device | None = None) -> bool:
    """Whether the kernel can run on ``device`` (default: CUDA if present): a GPU, or the interpreter."""
    if triton is None:
        return False
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return dev.type == "cuda" or _interpret()


if triton is not None:
    @triton.jit
    def _paged_tiles(acc, m_i, l_i, q, table, k_head, v_head, stride_kn, stride_ks, stride_vn, stride_vs,
                     offs_d, q_pos, lo, hi, qk_scale_log2, CAUSAL: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                     BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
        """Fold the keys/values of positions [lo, hi), found through the block table, into the
        running (acc, max, sum) of an online softmax; scores in log2 units. Shared by the decode
        and prefill kernels; CAUSAL masks keys after each query's position q_pos."""
        for start_n in range(lo, hi, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            in_n = offs_n < hi
            # The page-table walk: logical position -> physical block, offset inside it.
            block = tl.load(table + offs_n // BLOCK_SIZE, mask=in_n, other=0).to(tl.int64)
            slot = offs_n % BLOCK_SIZE
            k = tl.load(k_head + block[:, None] * stride_kn + slot[:, None] * stride_ks + offs_d[None, :],
                        mask=in_n[:, None], other=0.0)
            if UPCAST:
                k = k.to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale_log2  # [rows, BLOCK_N]
            keep = in_n[None, :]
            if CAUSAL:
                keep = keep & (offs_n[None, :] <= q_pos[:, None])
            s = tl.where(keep, s, float("-inf"))
            v = tl.load(v_head + block[:, None] * stride_vn + slot[:, None] * stride_vs + offs_d[None, :],
                        mask=in_n[:, None], other=0.0)
            if UPCAST:
                v = v.to(tl.float32)
            acc, m_i, l_i = online_softmax_step(acc, m_i, l_i, s, v, DOT_PRECISION)
        return acc, m_i, l_i

    # Triton compiles a variant for each integer argument that is 1, divisible by 16, or neither. The
    # arguments that change from one eager engine step to the next stay unspecialised, so one
    # variant (compiled at startup) serves every step: tune_len (only the autotuner's key), the
    # block-table width of the step's longest sequence (stride_btb: 1, 16, 32 blocks...) and the
    # log-sum-exp strides (one split: [B, H, 1] with stride 1; several: [B, H, splits]).
    @triton.jit(do_not_specialize=["tune_len", "stride_btb", "stride_lb", "stride_lh"])
    def paged_decode_kernel(q_ptr, k_pool_ptr, v_pool_ptr, block_tables_ptr, context_lens_ptr, o_ptr, lse_ptr,
                            stride_qb, stride_qh, stride_kn, stride_kh, stride_ks, stride_vn, stride_vh, stride_vs,
                            stride_btb, stride_ob, stride_oh, stride_os, stride_lb, stride_lh,
                            tokens_per_split, qk_scale_log2, tune_len,
                            GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
                            BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
                            UPCAST: tl.constexpr):
        b, h_kv, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        context_len = tl.load(context_lens_ptr + b)
        lo = split * tokens_per_split
        hi = tl.minimum(lo + tokens_per_split, context_len)
        offs_g = tl.arange(0, GROUP_PAD)                   # the query heads sharing this KV head
        offs_d = tl.arange(0, HEAD_DIM)
        in_g = offs_g < GROUP
        heads = h_kv * GROUP + offs_g
        q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :], mask=in_g[:, None], other=0.0)
        if UPCAST:  # Triton's CPU interpreter computes bf16 dots wrongly; on a GPU this is off
            q = q.to(tl.float32)
        m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
        l_i = tl.zeros([GROUP_PAD], tl.float32)
        acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
        table = block_tables_ptr + b * stride_btb
        k_head = k_pool_ptr + h_kv * stride_kh
        v_head = v_pool_ptr + h_kv * stride_vh
        acc, m_i, l_i = _paged_tiles(acc, m_i, l_i, q, table, k_head, v_head, stride_kn, stride_ks, stride_vn,
                                     stride_vs, offs_d, offs_g, lo, hi, qk_scale_log2, False, BLOCK_SIZE, BLOCK_N,
                                     DOT_PRECISION, UPCAST)
        # An empty split (context shorter than its start) leaves l = 0: output 0, lse -inf, weight 0.
        nonempty = l_i > 0
        acc = acc / tl.where(nonempty, l_i, 1.0)[:, None]
        lse = tl.where(nonempty, (m_i + tl.math.log2(tl.where(nonempty, l_i, 1.0))) * 0.6931471805599453,
                       float("-inf"))
        tl.store(o_ptr + b * stride_ob + heads[:, None] * stride_oh + split * stride_os + offs_d[None, :],
                 acc.to(o_ptr.dtype.element_ty), mask=in_g[:, None])
        tl.store(lse_ptr + b * stride_lb + heads * stride_lh + split, lse, mask=in_g)

    # One compiled variant for every split count: the count is a plain (unspecialised) argument
    # and the splits are read SPLITS_BLOCK at a time. With the count's power of two as a constexpr
    # (the first version), a step whose context first needed 2, then 4 splits compiled the kernel
    # again inside that step, a second or so each: the engine's eager (mixed) steps choose their
    # split count from their longest context, and its warm-up runs too short a context to split.
    @triton.jit(do_not_specialize=["num_splits"])
    def merge_splits_kernel(o_part_ptr, lse_part_ptr, o_ptr, lse_ptr, num_splits, H,
                            stride_pb, stride_ph, stride_ps, stride_ob, stride_oh,
                            HEAD_DIM: tl.constexpr, SPLITS_BLOCK: tl.constexpr):
        """out = sum_s exp(lse_s - lse) o_s with lse = log sum_s exp(lse_s): the softmax over all
        keys, rebuilt from each split's softmax over its own keys."""
        pid = tl.program_id(0)
        b, h = pid // H, pid % H
        offs_d = tl.arange(0, HEAD_DIM)
        lse_row = lse_part_ptr + pid * num_splits
        m = tl.full([SPLITS_BLOCK], float("-inf"), tl.float32)
        for s0 in range(0, num_splits, SPLITS_BLOCK):          # the largest lse: finite, split 0 has a key
            offs_s = s0 + tl.arange(0, SPLITS_BLOCK)
            m = tl.maximum(m, tl.load(lse_row + offs_s, mask=offs_s < num_splits, other=float("-inf")))
        m_all = tl.max(m, 0)
        total = tl.zeros([SPLITS_BLOCK], tl.float32)
        acc = tl.zeros([HEAD_DIM], tl.float32)
        for s0 in range(0, num_splits, SPLITS_BLOCK):
            offs_s = s0 + tl.arange(0, SPLITS_BLOCK)
            in_s = offs_s < num_splits
            w = tl.math.exp(tl.load(lse_row + offs_s, mask=in_s, other=float("-inf")) - m_all)
            o_s = tl.load(o_part_ptr + b * stride_pb + h * stride_ph + offs_s[:, None] * stride_ps + offs_d[None, :],
                          mask=in_s[:, None], other=0.0)
            total += w
            acc += tl.sum(w[:, None] * o_s, 0)
        t = tl.sum(total, 0)
        tl.store(o_ptr + b * stride_ob + h * stride_oh + offs_d, (acc / t).to(o_ptr.dtype.element_ty))
        tl.store(lse_ptr + pid, m_all + tl.math.log(t))

    # (BLOCK_N, warps, stages) candidates; ``tune=True`` times them once per shape and keeps the fastest
    TILE_CONFIGS = [(64, 4, 3), (64, 4, 2), (64, 8, 3), (128, 4, 2), (128, 8, 2), (32, 4, 4), (128, 4, 3)]
    paged_decode_tuned = triton.autotune(
        configs=[triton.Config({"BLOCK_N": n}, num_warps=w, num_stages=st) for n, w, st in TILE_CONFIGS],
        key=["GROUP", "HEAD_DIM", "BLOCK_SIZE", "tune_len", "tokens_per_split"])(paged_decode_kernel)


SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
BLOCK_N = 64          # tokens per loop step (several 16-token blocks); 16 under the interpreter
SPLITS_BLOCK = 8      # splits the merge kernel reads at a time (the default picks at most 64)


def _check(q, k_pool, v_pool, block_tables, context_lens):
    if q.dim() != 3:
        raise ValueError(f"q must be [B, H, D] (one query per sequence), got {tuple(q.shape)}")
    if k_pool.dim() != 4 or k_pool.shape != v_pool.shape:
        raise ValueError(f"pools must be [num_blocks, Hkv, block_size, D] and equal; got "
                         f"{tuple(k_pool.shape)}, {tuple(v_pool.shape)}")
    B, H, D = q.shape
    _, Hkv, block_size, Dk = k_pool.shape
    if Dk != D:
        raise ValueError(f"head dims differ: q {D}, pool {Dk}")
    if H % Hkv:
        raise ValueError(f"query heads ({H}) must be a multiple of key/value heads ({Hkv})")
    if block_size < 1 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two >= 1, got {block_size}")
    if block_tables.dim() != 2 or block_tables.shape[0] != B or context_lens.shape != (B,):
        raise ValueError(f"block_tables must be [B, max_blocks] and context_lens [B] for B={B}; got "
                         f"{tuple(block_tables.shape)}, {tuple(context_lens.shape)}")
    for name, t in (("block_tables", block_tables), ("context_lens", context_lens)):
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise TypeError(f"{name} must hold integers, got {t.dtype}")
    if B and context_lens.device.type == "cpu" and block_tables.device.type == "cpu":
        # The values, where reading them costs no device sync (a GPU step must not wait on its host;
        # the engine's scheduler vouches for what it sends there): a length of 0 returns zeros, a
        # table entry past the pool reads another sequence's memory or none at all.
        lens = context_lens.long()
        if int(lens.min()) < 1 or int(lens.max()) > block_tables.shape[1] * block_size:
            raise ValueError(f"context_lens must lie in 1..{block_tables.shape[1] * block_size} (the block "
                             f"table's width x block_size), got {lens.min().item()}..{lens.max().item()}")
        # every entry, padding too: the gather references read a table to its full width
        if int(block_tables.min()) < 0 or int(block_tables.max()) >= k_pool.shape[0]:
            raise ValueError(f"block tables point at blocks {block_tables.min().item()}.."
                             f"{block_tables.max().item()}, outside the pool's 0..{k_pool.shape[0] - 1}")


def _check_prefill(q, k_pool, v_pool, block_tables, context_lens):
    """``_check`` for q [B, H, S, D], the last S >= 1 positions of each row's context; where the
    lengths are on the host, each context must hold its S queries (a shorter one gave finite
    numbers from the kernel, with no error)."""
    if q.dim() != 4:
        raise ValueError(f"q must be [B, H, S, D], got {tuple(q.shape)}")
    if q.shape[2] == 0:
        raise ValueError(f"q {tuple(q.shape)} holds no query: a prefill needs at least one (S >= 1)")
    _check(q[:, :, 0], k_pool, v_pool, block_tables, context_lens)
    S = q.shape[2]
    if q.shape[0] and context_lens.device.type == "cpu" and int(context_lens.min()) < S:
        raise ValueError(f"each row's context must hold its {S} queries; got context_lens down to "
                         f"{int(context_lens.min())}")


def _check_dtypes(q, k_pool, v_pool, kernel: str) -> None:
    if q.dtype not in SUPPORTED_DTYPES or k_pool.dtype != q.dtype or v_pool.dtype != q.dtype:
        raise TypeError(f"paged {kernel} supports {SUPPORTED_DTYPES}, with q and pools of one dtype; "
                        f"got {q.dtype}, {k_pool.dtype}, {v_pool.dtype}")


def paged_decode(q, k_pool, v_pool, block_tables, context_lens, num_splits: int | None = None,
                 max_context_len: int | None = None, return_lse: bool = False, tune: bool = False):
    """Decode attention over a paged KV cache, on a GPU (or the Triton interpreter).

    Args:
        q: [B, H, D], the one new query of each sequence.
        k_pool, v_pool: [num_blocks, Hkv, block_size, D].
        block_tables: [B, max_blocks] int32, physical block of each logical block (extra entries
            beyond a sequence's length are never read).
        context_lens: [B] int32, keys each sequence attends to (>= 1).
        num_splits: programs per (sequence, KV head) along the context; None picks enough to fill
            the GPU. Splitting needs ``max_context_len`` (else it is read from context_lens).
        tune: on a GPU, time the candidate tiles (``TILE_CONFIGS``) on the first call for this
            head layout, context length (rounded up to a power of two) and split length, and use
            the fastest from then on; ``paged_decode_tuned.cache`` maps each key to its choice.
            Off by default: tuning takes a second or two, which the engine should not spend inside
            a timed step.

    Returns:
        [B, H, D] in q's dtype (and the natural-log log-sum-exp [B, H] with ``return_lse``).
    """
    _check(q, k_pool, v_pool, block_tables, context_lens)
    if max_context_len is not None:         # it sizes the splits: too small, the tail is never read
        if not is_int(max_context_len) or max_context_len < 1:
            raise ValueError(f"max_context_len must be an integer >= 1, got {max_context_len!r}")
        if q.shape[0] and context_lens.device.type == "cpu" and max_context_len < int(context_lens.max()):
            raise ValueError(f"max_context_len {max_context_len} is shorter than a context of "
                             f"{int(context_lens.max())} tokens")
    if num_splits is not None and (not is_int(num_splits) or num_splits < 1):
        raise ValueError(f"num_splits must be an integer >= 1, got {num_splits!r}")
    if triton is None:
        raise RuntimeError("triton is not installed")
    _check_dtypes(q, k_pool, v_pool, "decode")
    B, H, D = q.shape
    Hkv, block_size = k_pool.shape[1], k_pool.shape[2]
    if D & (D - 1) or D < 16:
        raise ValueError(f"head dim {D} not supported: the kernel needs a power of two >= 16")
    q, k_pool, v_pool = head_contiguous(q), head_contiguous(k_pool), head_contiguous(v_pool)
    interpret = _interpret()
    tune = tune and not interpret
    block_n = 16 if interpret else 128 if tune else BLOCK_N     # tuned: splits fit every candidate tile
    if num_splits is None:
        num_splits = _default_splits(q.device, B * Hkv, max_context_len, block_n)
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    if num_splits == 1:
        tokens_per_split = 1 << 30
    else:
        if max_context_len is None:
            max_context_len = int(context_lens.max())
        tokens_per_split = triton.cdiv(triton.cdiv(max_context_len, num_splits), block_n) * block_n
    block_tables = block_tables.to(torch.int32)
    context_lens = context_lens.to(torch.int32)
    out = torch.empty_like(q)
    lse = torch.empty(B, H, device=q.device, dtype=torch.float32)
    if num_splits == 1:  # write the final output directly
        o_part, lse_part = out[:, :, None], lse[:, :, None]
    else:
        o_part = torch.empty(B, H, num_splits, D, device=q.device, dtype=torch.float32)
        lse_part = torch.empty(B, H, num_splits, device=q.device, dtype=torch.float32)
    group = H // Hkv
    args = (q, k_pool, v_pool, block_tables, context_lens, o_part, lse_part,
            q.stride(0), q.stride(1), *k_pool.stride()[:3], *v_pool.stride()[:3], block_tables.stride(0),
            o_part.stride(0), o_part.stride(1), o_part.stride(2), lse_part.stride(0), lse_part.stride(1),
            tokens_per_split, (1.0 / math.sqrt(D)) * 1.4426950408889634,
            triton.next_power_of_2(max_context_len or int(block_tables.shape[1]) * block_size))
    flags = dict(GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=D, BLOCK_SIZE=block_size,
                 DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
                 UPCAST=interpret and q.dtype == torch.bfloat16)
    if tune:
        paged_decode_tuned[(B, Hkv, num_splits)](*args, **flags)
    else:
        paged_decode_kernel[(B, Hkv, num_splits)](*args, **flags, BLOCK_N=block_n, num_warps=4,
                                                  num_stages=1 if interpret else 3)
    if num_splits > 1:
        merge_splits_kernel[(B * H,)](o_part, lse_part, out, lse, num_splits, H,
                                      o_part.stride(0), o_part.stride(1), o_part.stride(2),
                                      out.stride(0), out.stride(1),
                                      HEAD_DIM=D, SPLITS_BLOCK=SPLITS_BLOCK)
    return (out, lse) if return_lse else out


def _default_splits(device, programs: int, max_context_len: int | None, block_n: int) -> int:
    """Enough splits for about two programs per SM, each over at least four tiles of the context."""
    if torch.device(device).type != "cuda" or max_context_len is None:
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    want = triton.cdiv(2 * sms, programs)
    return max(1, min(want, max_context_len // (4 * block_n), 64))
