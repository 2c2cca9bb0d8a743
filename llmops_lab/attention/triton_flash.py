"""A flash-attention forward kernel in Triton: the tiled online softmax of ``tiled.py`` on a GPU.

Dao et al. 2022 / Dao 2023 (FlashAttention-2 loop order: queries outer, one program per query
block and head). Each program keeps a BLOCK_M x D query tile and its running max, sum and output
in registers and streams K/V tiles through them, so HBM traffic is Q, K, V read once per query
block and O written once; the S x S score matrix never leaves the chip. Grouped-query heads read
their shared KV head; causal runs the unmasked tiles first and only the diagonal band masked;
a packed variable-length batch (``cu_seqlens``) serves prefill of many prompts in one launch.

Reference: ``backends.naive_attention`` (reads Q, K once, writes and re-reads the B x H x S x S
scores and probabilities, reads V: O(S^2) memory traffic). Runs on a CPU under TRITON_INTERPRET=1.
"""
from __future__ import annotations

import math

import torch

from ..checks import is_int

try:
    import triton
    import triton.language as tl
except ImportError:  # the package works without triton; only this backend needs it
    triton = None


def available() -> bool:
    import os
    return triton is not None and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")


if triton is not None:
    @triton.jit
    def online_softmax_step(acc, m_i, l_i, s, v, DOT_PRECISION: tl.constexpr):
        """Fold one tile of scores s [rows, n] (log2 units, masked = -inf) and its values v [n, D]
        into the running output acc, max m and sum l; rows that have seen no key stay at zero."""
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])
        correction = tl.math.exp2(m_i - m_safe)
        l_i = l_i * correction + tl.sum(p, 1)
        acc = acc * correction[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        return acc, m_new, l_i

    @triton.jit
    def _attend_tiles(acc, m_i, l_i, q, k_base, v_base, stride_ks, stride_vs, offs_m, offs_d,
                      lo, hi, seq_k, causal_offset, qk_scale,
                      MASKED: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
                      UPCAST: tl.constexpr):
        """Fold key/value tiles [lo, hi) into the running (acc, m, l); scores are in log2 units."""
        for start_n in range(lo, hi, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            in_k = offs_n < seq_k
            k = tl.load(k_base + offs_n[:, None] * stride_ks + offs_d[None, :], mask=in_k[:, None], other=0.0)
            if UPCAST:
                k = k.to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N]
            keep = in_k[None, :]
            if MASKED:
                keep = keep & (offs_n[None, :] <= offs_m[:, None] + causal_offset)
            s = tl.where(keep, s, float("-inf"))
            v = tl.load(v_base + offs_n[:, None] * stride_vs + offs_d[None, :], mask=in_k[:, None], other=0.0)
            if UPCAST:
                v = v.to(tl.float32)
            acc, m_i, l_i = online_softmax_step(acc, m_i, l_i, s, v, DOT_PRECISION)
        return acc, m_i, l_i

    @triton.jit
    def flash_fwd_kernel(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, cu_q_ptr, cu_k_ptr,
                         stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks,
                         stride_vb, stride_vh, stride_vs, stride_ob, stride_oh, stride_os,
                         H, GROUP, seq_q_fixed, seq_k_fixed, qk_scale_log2, tune_len,
                         IS_CAUSAL: tl.constexpr, VARLEN: tl.constexpr, HEAD_DIM: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
                         UPCAST: tl.constexpr, REVERSE_M: tl.constexpr):
        pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
        if REVERSE_M:    # causal: the last query blocks see the most keys; start them first, so the
            pid_m = tl.num_programs(0) - 1 - pid_m      # light ones fill the tail of the grid

        b, h = pid_bh // H, pid_bh % H
        h_kv = h // GROUP                                  # grouped-query: the KV head this head reads
        if VARLEN:                                         # packed batch: sequence b is rows [start, end)
            q_start, k_start = tl.load(cu_q_ptr + b), tl.load(cu_k_ptr + b)
            seq_q = tl.load(cu_q_ptr + b + 1) - q_start
            seq_k = tl.load(cu_k_ptr + b + 1) - k_start
        else:
            q_start, k_start, seq_q, seq_k = 0, 0, seq_q_fixed, seq_k_fixed
        if pid_m * BLOCK_M >= seq_q:
            return
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM)
        in_q = offs_m < seq_q
        q_base = q_ptr + b * stride_qb + h * stride_qh + q_start * stride_qs
        k_base = k_ptr + b * stride_kb + h_kv * stride_kh + k_start * stride_ks
        v_base = v_ptr + b * stride_vb + h_kv * stride_vh + k_start * stride_vs
        q = tl.load(q_base + offs_m[:, None] * stride_qs + offs_d[None, :], mask=in_q[:, None], other=0.0)
        if UPCAST:  # Triton's CPU interpreter computes bf16 dots wrongly; on a GPU this is off
            q = q.to(tl.float32)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        if IS_CAUSAL:
            causal_offset = seq_k - seq_q                  # the last query sees the last key
            # Tiles wholly below the diagonal need no mask; the band crossing it does.
            band_lo = tl.maximum(pid_m * BLOCK_M + causal_offset, 0) // BLOCK_N * BLOCK_N
            band_hi = tl.minimum((pid_m + 1) * BLOCK_M + causal_offset, seq_k)
            acc, m_i, l_i = _attend_tiles(acc, m_i, l_i, q, k_base, v_base, stride_ks, stride_vs, offs_m,
                                          offs_d, 0, band_lo, seq_k, causal_offset, qk_scale_log2, False, BLOCK_N,
                                          DOT_PRECISION, UPCAST)
            acc, m_i, l_i = _attend_tiles(acc, m_i, l_i, q, k_base, v_base, stride_ks, stride_vs, offs_m,
                                          offs_d, band_lo, band_hi, seq_k, causal_offset, qk_scale_log2, True,
                                          BLOCK_N, DOT_PRECISION, UPCAST)
        else:
            acc, m_i, l_i = _attend_tiles(acc, m_i, l_i, q, k_base, v_base, stride_ks, stride_vs, offs_m,
                                          offs_d, 0, seq_k, seq_k, 0, qk_scale_log2, False, BLOCK_N, DOT_PRECISION, UPCAST)
        acc = acc / l_i[:, None]
        o_base = o_ptr + b * stride_ob + h * stride_oh + q_start * stride_os
        tl.store(o_base + offs_m[:, None] * stride_os + offs_d[None, :], acc.to(o_ptr.dtype.element_ty),
                 mask=in_q[:, None])
        # log-sum-exp of each row's scores, natural log (what a backward pass or a split-KV merge needs);
        # [B*H, seq_q_fixed]. The packed (VARLEN) path returns none, so it stores none.
        if not VARLEN:
            lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453
            tl.store(lse_ptr + pid_bh * seq_q_fixed + offs_m, lse, mask=in_q)

    def _tile_configs():
        """Candidate (BLOCK_M, BLOCK_N, warps, stages) for 16-bit inputs; the autotuner times them
        on the first call of each (length bucket, head dim, causal) and keeps the fastest. Configs
        that do not fit shared memory at a head dim are skipped by the autotuner."""
        shapes = [(128, 64, 8, 3), (128, 128, 8, 2), (128, 64, 8, 4), (128, 64, 4, 3), (64, 64, 4, 3),
                  (128, 32, 4, 3),
                  # since 2026-11-26 (untimed then): wider key tiles, and the two tiles the H100 and
                  # H200 runs chose with the heaviest query blocks started first (REVERSE_M)
                  (128, 128, 8, 3), (64, 128, 4, 3)]
        reverse = [(128, 64, 8, 3), (64, 64, 4, 3)]
        return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "REVERSE_M": r}, num_warps=w, num_stages=st)
                for r, tiles in ((False, shapes), (True, reverse)) for m, n, w, st in tiles]

    # the GPU path: the same kernel, its tiles chosen by measurement (tune_len buckets the length)
    flash_fwd_tuned = triton.autotune(configs=_tile_configs(), key=["tune_len", "HEAD_DIM", "IS_CAUSAL", "VARLEN"])(
        flash_fwd_kernel)


SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128, 256)
TUNE = True   # on a GPU, 16-bit inputs: pick the tiles by measurement (False: the fixed _config)
REVERSE_M = False   # the fixed tiles' causal grid order (the autotuner times both orders)


def _config(head_dim: int, dtype, interpret: bool):
    if interpret:                                           # small tiles: the interpreter is slow
        return 16, 16, 4, 1
    if dtype == torch.float32:
        return 64, 32, 4, 2
    if head_dim >= 256:                                     # 128x64 tiles at D=256 overflow shared memory
        return 64, 64, 8, 2
    return (128, 64, 8, 3) if head_dim >= 128 else (128, 64, 4, 3)


def _validate(q, k, v, is_causal):
    if q.dtype not in SUPPORTED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"flash attention supports {SUPPORTED_DTYPES} with q, k, v of one dtype; "
                        f"got {q.dtype}, {k.dtype}, {v.dtype}")
    D = q.shape[-1]
    if k.shape[-1] != D or v.shape[-1] != D:
        raise ValueError(f"head dims differ: q {D}, k {k.shape[-1]}, v {v.shape[-1]}")
    if D not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head dim {D} not supported (one of {SUPPORTED_HEAD_DIMS})")
    if triton is None:
        raise RuntimeError("triton is not installed")


def head_contiguous(t: torch.Tensor) -> torch.Tensor:
    """t itself, or a contiguous copy where its last (head) dimension has a stride other than 1: the
    kernels index along D as offsets 0..D-1 and take strides for the other dimensions only."""
    return t if t.stride(-1) == 1 else t.contiguous()


def flash_attention(q, k, v, mask=None, is_causal: bool = False, return_lse: bool = False):
    """softmax(QK^T/sqrt(D))V with q [B, H, Sq, D], k/v [B, Hkv, Sk, D]; same signature as the
    other attention backends (``mask`` must be None: causal is the only mask it applies)."""
    if mask is not None:
        raise ValueError("the flash kernel takes no explicit mask; use is_causal or another backend")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be [B, H, S, D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    _validate(q, k, v, is_causal)
    B, H, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(f"key and value shapes differ: {tuple(k.shape)} vs {tuple(v.shape)}")
    if k.shape[0] != B:                  # the kernel indexes k and v by q's batch row: no broadcasting
        raise ValueError(f"q has batch {B}, k and v have {k.shape[0]}")
    if Hkv == 0:
        raise ValueError("attention needs at least one key/value head; got k, v with 0 heads")
    if H % Hkv:
        raise ValueError(f"query heads ({H}) must be a multiple of key/value heads ({Hkv})")
    if Sq == 0 or Sk == 0:
        raise ValueError("empty sequence: attention needs at least one query and one key")
    if is_causal and Sq > Sk:
        raise ValueError(f"causal attention with more queries ({Sq}) than keys ({Sk}) leaves rows with no key")
    q, k, v = head_contiguous(q), head_contiguous(k), head_contiguous(v)
    o = torch.empty_like(q)
    lse = torch.empty(B * H, Sq, device=q.device, dtype=torch.float32)
    _launch(q, k, v, o, lse, B, H, Hkv, Sq, Sk, (q.stride(0), q.stride(1), q.stride(2)),
            (k.stride(0), k.stride(1), k.stride(2)), (v.stride(0), v.stride(1), v.stride(2)),
            (o.stride(0), o.stride(1), o.stride(2)), is_causal, None, None)
    return (o, lse.view(B, H, Sq)) if return_lse else o


def flash_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, is_causal: bool = True):
    """Packed variable-length batch: q [Tq, H, D], k/v [Tk, Hkv, D], sequence i is rows
    cu_seqlens[i]:cu_seqlens[i+1] (int32, length B+1), as in flash-attn's varlen API."""
    _validate(q, k, v, is_causal)
    if q.dim() != 3 or k.dim() != 3 or v.shape != k.shape:
        raise ValueError(f"varlen inputs are packed [tokens, heads, head_dim], k and v alike; got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape[1] == 0:
        raise ValueError("attention needs at least one key/value head; got k, v with 0 heads")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]})")
    # The kernel trusts these: rows past max_seqlen_q are never written, offsets past the tensors
    # read (or write) other memory.
    for name, cu, total in (("cu_seqlens_q", cu_seqlens_q, q.shape[0]), ("cu_seqlens_k", cu_seqlens_k, k.shape[0])):
        if not torch.is_tensor(cu) or cu.dim() != 1 or len(cu) < 2 or cu.dtype.is_floating_point or cu.dtype == torch.bool:
            raise ValueError(f"{name} must be a 1-D integer tensor of B+1 >= 2 offsets")
        if int(cu[0]) != 0 or int(cu[-1]) != total:
            raise ValueError(f"{name} must start at 0 and end at the {total} packed tokens, got {int(cu[0])}..{int(cu[-1])}")
    lens_q, lens_k = cu_seqlens_q.diff(), cu_seqlens_k.diff()
    if len(lens_q) != len(lens_k) or bool((lens_q <= 0).any()) or bool((lens_k <= 0).any()):
        raise ValueError("cu_seqlens must describe the same number of non-empty sequences")
    if not is_int(max_seqlen_q) or max_seqlen_q < int(lens_q.max()):
        raise ValueError(f"max_seqlen_q must be an integer >= the longest query sequence ({int(lens_q.max())}), "
                         f"got {max_seqlen_q!r}")
    if is_causal and bool((lens_q > lens_k).any()):
        raise ValueError("causal attention with more queries than keys in some sequence")
    B, H, Hkv = len(lens_q), q.shape[1], k.shape[1]
    q, k, v = head_contiguous(q), head_contiguous(k), head_contiguous(v)
    o = torch.empty_like(q)
    # no log-sum-exp buffer: the kernel stores none on the packed path (o only fills the pointer slot)
    _launch(q, k, v, o, o, B, H, Hkv, max_seqlen_q, 0, (0, q.stride(1), q.stride(0)),
            (0, k.stride(1), k.stride(0)), (0, v.stride(1), v.stride(0)), (0, o.stride(1), o.stride(0)),
            is_causal, cu_seqlens_q.to(torch.int32), cu_seqlens_k.to(torch.int32))
    return o


def _launch(q, k, v, o, lse, B, H, Hkv, Sq, Sk, sq, sk, sv, so, is_causal, cu_q, cu_k):
    import os
    if B * H == 0:  # no query head or no batch row: nothing to compute, and no grid to launch
        return
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    D = q.shape[-1]
    args = (q, k, v, o, lse, cu_q if cu_q is not None else q, cu_k if cu_k is not None else q,
            *sq, *sk, *sv, *so, H, H // Hkv, Sq, Sk,
            (1.0 / math.sqrt(D)) * 1.4426950408889634, triton.next_power_of_2(max(Sq, Sk)))
    flags = dict(IS_CAUSAL=is_causal, VARLEN=cu_q is not None, HEAD_DIM=D,
                 DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
                 UPCAST=interpret and q.dtype == torch.bfloat16)
    global TUNE
    if TUNE and not interpret and q.dtype != torch.float32 and D <= 128:
        try:
            flash_fwd_tuned[lambda meta: (triton.cdiv(Sq, meta["BLOCK_M"]), B * H)](*args, **flags)
            return
        except Exception as e:  # noqa: BLE001 - keep working on the fixed tiles, and say so
            import warnings
            warnings.warn(f"flash autotuning failed ({type(e).__name__}: {e}); using the fixed tiles from now on")
            TUNE = False
    block_m, block_n, warps, stages = _config(D, q.dtype, interpret)
    flash_fwd_kernel[(triton.cdiv(Sq, block_m), B * H)](*args, **flags, BLOCK_M=block_m, BLOCK_N=block_n,
                                                        REVERSE_M=REVERSE_M and is_causal,
                                                        num_warps=warps, num_stages=stages)
