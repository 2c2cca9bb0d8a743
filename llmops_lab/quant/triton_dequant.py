"""A fused dequantize-matmul kernel in Triton: y = x @ dequant(W)^T reading the packed codes directly.

What it teaches: at decode (a handful of tokens, M = 1..64) a linear layer is memory-bound, so its
time is the bytes of the weight it reads. A weight-only quantized layer only pays off if the kernel
reads the 4-bit (or 8-bit) codes and their per-group scales and turns them into floats in
registers, tile by tile, without ever writing the float weight back to memory (the idea behind
GPTQ's and AWQ's CUDA kernels, Frantar et al. 2022, Lin et al. 2023, and gpt-fast's int4 path).

The naive reference, ``QuantLinear``'s PyTorch path, for W [N, K] at 4 bits with fp16 activations:

    w = dequantize(codes, scales, zeros)   # reads N*K/2 bytes of codes, writes N*K*2 bytes of fp16
    y = x @ w.T                            # reads the N*K*2 bytes again (+ x, y: M*(K+N)*2)

so about 4.5 bytes per weight move, 9x the 0.5 the codes take (and more than the 2 bytes of an fp16
layer: the naive path is slower than not quantizing). This kernel moves N*K/2 bytes of codes plus
N*K/group_size*2 (*2 with zero points) bytes of scales (and zeros), about 0.53 bytes per weight at
group size 128: the 4x saving over fp16 that decode speed can reach.

One program computes a BLOCK_M x BLOCK_N tile of y and walks K in BLOCK_K steps: it loads a
[BLOCK_N, BLOCK_K/2] tile of packed bytes, splits each byte into its low and high nibble
(interleaved back into column order), subtracts the zero point and multiplies by the group's scale
in fp32, casts to the activation dtype and accumulates x_tile @ w_tile^T with ``tl.dot`` in fp32.
With few rows (decode) there are few output tiles, so K can be split over ``SPLIT_K`` programs that
add their partial sums atomically into an fp32 output. 8-bit codes are stored one per int8 and take
the same path without the unpacking; 2, 3 and 5-7-bit codes are a bit stream, each code read from
the one or two bytes it spans. Storage layout: ``packing``.

For 1 to 4 rows (``GEMV_MAX_ROWS``) a second kernel, ``dequant_gemv_kernel`` (``kernel="gemv"``),
skips ``tl.dot``: a 16-row ``tl.dot`` tile is 15/16 padding at batch 1, and split-K needs a zeroed
fp32 output and a cast afterwards, three kernels per layer where a 4096x4096 int4 weight takes ~3 us
to read (8.4 MB of codes at the 2.9 TB/s copy bandwidth the H100 measured in run 3). Each program
owns BLOCK_N output features over the whole of K, multiplies the dequantized tile by x in registers,
sums over K once at the end and stores y in the activations' dtype: one kernel, no atomics (the
layout of gpt-fast's and llama.cpp's GEMV kernels for quantized decode). It is not the default: its
first version (a reduction across threads in every K step) ran at 0.37x bf16 at batch 1 on an H100
(run 3), where the tiled kernel ran at 1.20x (run 4; 1.02-1.15x at batch 2-16; both in
``data/bench/``), and the version here is timed by ``python -m llmops_lab.quant.tune_gemv`` against
the tiled kernel.

At 4 bits either kernel can leave the nibbles where they are (``split_nibbles``): the low nibbles of
a row of bytes are the weight's even columns and the high nibbles its odd ones, so the tile is two
half-width tiles multiplied by x's even and odd columns, with no interleave. In the tuning run of
2026-11-26 (H100, ``data/bench/logs/``) the interleaving int4 GEMV slowed when its K tile went from
128 to 256 codes (BLOCK_N 16, 4 warps): 591 to 187 GB/s at 4096x4096, 646 to 286 and 998 to 174 at
the two shapes with 11008. The int8 GEMV, with nothing to interleave, did not: 814 to 1501, 540 to
971 and 1256 to 1269 GB/s. (int8 itself ranged widely over the tiles, 540-1754 GB/s, so its tiles
matter too.) The interleave is the suspect. The split variant is checked under the interpreter; no
GPU has timed it yet, so it is not the default. Nor is ``fast_convert``, the other candidate: codes
become floats by bit arithmetic (``_codes_to_float``) instead of an int-to-float instruction, which
the CUDA programming guide's throughput table lists at a fraction of the float-add rate; the GEMV
needs one per weight, and at 4 bits reads only half a byte per weight.

Runs on a CPU under TRITON_INTERPRET=1 at small sizes (tests/test_quant_kernel.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# available(device): CUDA, or the interpreter on a CPU; one rule for every kernel of the package
from ..paged.triton_paged import _interpret, available  # noqa: F401
from ..checks import is_int
from .packing import codes_per_row, packed_width, storage_offset, unpack_bits

try:
    import triton
    import triton.language as tl
except ImportError:  # the package works without triton; only this kernel needs it
    triton = None


# ---- the reference ----------------------------------------------------------------------------

def dequantize_stored(qweight, scales, zeros, bits: int, sym: bool, dtype=torch.float32,
                      K: int | None = None) -> torch.Tensor:
    """The float weight [N, K] of stored codes: scales * (codes - zeros), in fp32 then cast.
    ``K`` (in_features) is needed for a bit stream (2, 3, 5-7 bits) whose rows end mid-byte.

    Written for speed on a CPU: the nibbles go straight into one fp32 buffer (low nibble first, as
    ``packing.unpack_int4``) and the storage offset joins the zero point, so the only full-size
    passes are the unpack and one in-place subtract and multiply (3x faster than unpack_codes)."""
    N, G = scales.shape
    if bits == 4:
        w = torch.empty(N, qweight.shape[1], 2, device=qweight.device)
        w[..., 0] = qweight & 0x0F
        w[..., 1] = qweight >> 4
        w = w.view(N, -1)                                                  # [N, K]
    elif bits == 8:
        w = qweight.float()
    else:
        w = unpack_bits(qweight, bits, codes_per_row(qweight.shape[1], bits, K)).float()
    shift = zeros.float() - storage_offset(bits, sym)                      # code = stored + offset
    w.view(N, G, -1).sub_(shift[..., None]).mul_(scales.float()[..., None])
    return w.to(dtype)


def dequant_matmul_reference(x, qweight, scales, zeros, bits: int, group_size: int, sym: bool, bias=None):
    """x [M, K] @ dequant(W)^T (+ bias) the naive way: unpack, materialise W [N, K], matmul."""
    w = dequantize_stored(qweight, scales, zeros, bits, sym, x.dtype, K=x.shape[-1])
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


# ---- the kernels ------------------------------------------------------------------------------

if triton is not None:
    @triton.jit
    def _codes_to_float(codes, OFFSET: tl.constexpr, SIGNED: tl.constexpr, FAST_CONVERT: tl.constexpr):
        """float32(codes + OFFSET) for int32 codes in [0, 2^bits) (or [-128, 128) when SIGNED).

        FAST_CONVERT does it without an int-to-float instruction (slower than a float add on NVIDIA
        GPUs, by the CUDA programming guide's throughput table): 2^23 + u, for 0 <= u < 2^23, is the float whose
        mantissa bits are u, so OR-ing (or adding) u into the bits of 2^23 and reading them as a
        float gives 2^23 + u exactly; one subtraction then leaves u + OFFSET (the trick of
        FasterTransformer's and Marlin's int4 converters)."""
        if FAST_CONVERT:
            if SIGNED:       # int8 codes: shift into [0, 256) with the same add that sets the bits
                f = (codes + (0x4B000000 + 128)).to(tl.float32, bitcast=True)
                return f - (8388608.0 + 128 - OFFSET)
            f = (codes | 0x4B000000).to(tl.float32, bitcast=True)
            return f - (8388608.0 - OFFSET)
        return (codes + OFFSET).to(tl.float32)

    @triton.jit
    def _dequantized_tile(q_ptr, s_ptr, z_ptr, offs_n, in_n, k0, offs_k, in_k, k_hi,
                          stride_qn, stride_qk, stride_sn, stride_sg,
                          GROUP_SIZE: tl.constexpr, OFFSET: tl.constexpr, BITS: tl.constexpr,
                          HAS_ZEROS: tl.constexpr, ONE_GROUP_PER_TILE: tl.constexpr, BLOCK_K: tl.constexpr,
                          FAST_CONVERT: tl.constexpr = False):
        """The fp32 weight tile [BLOCK_N, BLOCK_K] at rows offs_n, columns k0.. (< k_hi): codes read
        (and unpacked), zero point subtracted, scaled; 0 outside the weight (s = 0 there)."""
        if BITS == 4:    # two 4-bit codes per byte, column 2j in the low nibble of byte j
            offs_b = k0 // 2 + tl.arange(0, BLOCK_K // 2)
            raw = tl.load(q_ptr + offs_n[:, None] * stride_qn + offs_b[None, :] * stride_qk,
                          mask=in_n[:, None] & (offs_b < k_hi // 2)[None, :], other=0).to(tl.int32)
            codes = tl.interleave(raw & 0xF, raw >> 4)
        elif BITS == 8:  # one code per int8
            codes = tl.load(q_ptr + offs_n[:, None] * stride_qn + offs_k[None, :] * stride_qk,
                            mask=in_n[:, None] & in_k[None, :], other=0).to(tl.int32)
        else:            # a bit stream: code k in bits k*BITS.., which span one byte or two
            first = offs_k * BITS
            byte, shift = first // 8, first % 8
            row = q_ptr + offs_n[:, None] * stride_qn
            inside = in_n[:, None] & in_k[None, :]
            lo = tl.load(row + byte[None, :] * stride_qk, mask=inside, other=0).to(tl.int32)
            spans = (shift + BITS > 8)[None, :]            # then the next byte is in the row too
            hi = tl.load(row + (byte + 1)[None, :] * stride_qk, mask=inside & spans, other=0).to(tl.int32)
            codes = ((lo | (hi << 8)) >> shift[None, :]) & ((1 << BITS) - 1)
        w = _codes_to_float(codes, OFFSET, BITS == 8, FAST_CONVERT)
        if ONE_GROUP_PER_TILE:   # the whole K tile lies in one group: one scale per row
            g = k0 // GROUP_SIZE
            s = tl.load(s_ptr + offs_n * stride_sn + g * stride_sg, mask=in_n, other=0.0).to(tl.float32)[:, None]
            if HAS_ZEROS:
                z = tl.load(z_ptr + offs_n * stride_sn + g * stride_sg, mask=in_n, other=0.0).to(tl.float32)[:, None]
        else:                    # groups narrower than the tile, or not aligned to it
            g = offs_k // GROUP_SIZE
            mask_s = in_n[:, None] & in_k[None, :]
            s = tl.load(s_ptr + offs_n[:, None] * stride_sn + g[None, :] * stride_sg, mask=mask_s,
                        other=0.0).to(tl.float32)
            if HAS_ZEROS:
                z = tl.load(z_ptr + offs_n[:, None] * stride_sn + g[None, :] * stride_sg, mask=mask_s,
                            other=0.0).to(tl.float32)
        if HAS_ZEROS:
            w = w - z
        return w * s

    @triton.jit
    def _dequantized_nibbles(q_ptr, s_ptr, z_ptr, offs_n, in_n, k0, k_hi,
                             stride_qn, stride_qk, stride_sn, stride_sg,
                             GROUP_SIZE: tl.constexpr, OFFSET: tl.constexpr, HAS_ZEROS: tl.constexpr,
                             ONE_GROUP_PER_TILE: tl.constexpr, BLOCK_K: tl.constexpr,
                             FAST_CONVERT: tl.constexpr = False):
        """A 4-bit weight tile at columns k0.. as its two nibble halves, fp32 [BLOCK_N, BLOCK_K/2]
        each: the even columns k0, k0+2, ... (low nibbles) and the odd ones (high nibbles). The
        caller multiplies them by the even and odd columns of x, so the codes never have to be
        interleaved back into column order (``tl.interleave`` shuffles registers between threads)."""
        offs_b = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        raw = tl.load(q_ptr + offs_n[:, None] * stride_qn + offs_b[None, :] * stride_qk,
                      mask=in_n[:, None] & (offs_b < k_hi // 2)[None, :], other=0).to(tl.int32)
        lo = _codes_to_float(raw & 0xF, OFFSET, False, FAST_CONVERT)
        hi = _codes_to_float(raw >> 4, OFFSET, False, FAST_CONVERT)
        if ONE_GROUP_PER_TILE:   # both halves lie in the tile's one group: one scale per row
            g = k0 // GROUP_SIZE
            s = tl.load(s_ptr + offs_n * stride_sn + g * stride_sg, mask=in_n, other=0.0).to(tl.float32)[:, None]
            if HAS_ZEROS:
                z = tl.load(z_ptr + offs_n * stride_sn + g * stride_sg, mask=in_n, other=0.0).to(tl.float32)[:, None]
                lo, hi = lo - z, hi - z
            lo, hi = lo * s, hi * s
        else:                    # groups narrower than the tile: each column's own group
            mask_s = in_n[:, None] & (offs_b < k_hi // 2)[None, :]
            rows = offs_n[:, None] * stride_sn
            g_lo = ((2 * offs_b) // GROUP_SIZE)[None, :] * stride_sg
            g_hi = ((2 * offs_b + 1) // GROUP_SIZE)[None, :] * stride_sg   # another group when the size is odd
            if HAS_ZEROS:
                lo -= tl.load(z_ptr + rows + g_lo, mask=mask_s, other=0.0).to(tl.float32)
                hi -= tl.load(z_ptr + rows + g_hi, mask=mask_s, other=0.0).to(tl.float32)
            lo *= tl.load(s_ptr + rows + g_lo, mask=mask_s, other=0.0).to(tl.float32)
            hi *= tl.load(s_ptr + rows + g_hi, mask=mask_s, other=0.0).to(tl.float32)
        return lo, hi

    @triton.jit
    def _even_odd_columns(x_ptr, offs_m, in_m, k0, k_hi, stride_xm, stride_xk, BLOCK_K: tl.constexpr):
        """x's columns k0, k0+2, ... and k0+1, k0+3, ... ([BLOCK_M, BLOCK_K/2] each, 0 past k_hi):
        the partners of ``_dequantized_nibbles``' low and high halves."""
        offs_e = k0 + 2 * tl.arange(0, BLOCK_K // 2)
        ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_e[None, :] * stride_xk
        x_e = tl.load(ptrs, mask=in_m[:, None] & (offs_e < k_hi)[None, :], other=0.0)
        x_o = tl.load(ptrs + stride_xk, mask=in_m[:, None] & (offs_e + 1 < k_hi)[None, :], other=0.0)
        return x_e, x_o

    @triton.jit
    def dequant_matmul_kernel(x_ptr, q_ptr, s_ptr, z_ptr, b_ptr, y_ptr,
                              M, N, K, K_PER_SPLIT,
                              stride_xm, stride_xk, stride_qn, stride_qk, stride_sn, stride_sg,
                              stride_ym, stride_yn,
                              GROUP_SIZE: tl.constexpr, OFFSET: tl.constexpr, BITS: tl.constexpr,
                              HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr, ONE_GROUP_PER_TILE: tl.constexpr,
                              SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                              BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                              SPLIT_NIBBLES: tl.constexpr, FAST_CONVERT: tl.constexpr):
        pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        in_m, in_n = offs_m < M, offs_n < N
        k_lo = pid_k * K_PER_SPLIT                             # K_PER_SPLIT is a multiple of BLOCK_K
        k_hi = tl.minimum(k_lo + K_PER_SPLIT, K)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            if BITS == 4 and SPLIT_NIBBLES:     # two half-K products: even columns, odd columns
                x_e, x_o = _even_odd_columns(x_ptr, offs_m, in_m, k0, k_hi, stride_xm, stride_xk, BLOCK_K)
                w_lo, w_hi = _dequantized_nibbles(q_ptr, s_ptr, z_ptr, offs_n, in_n, k0, k_hi,
                                                  stride_qn, stride_qk, stride_sn, stride_sg, GROUP_SIZE,
                                                  OFFSET, HAS_ZEROS, ONE_GROUP_PER_TILE, BLOCK_K, FAST_CONVERT)
                if UPCAST:
                    x_e, x_o = x_e.to(tl.float32), x_o.to(tl.float32)
                else:
                    w_lo, w_hi = w_lo.to(x_e.dtype), w_hi.to(x_e.dtype)
                acc += tl.dot(x_e, tl.trans(w_lo), input_precision=DOT_PRECISION)
                acc += tl.dot(x_o, tl.trans(w_hi), input_precision=DOT_PRECISION)
            else:
                offs_k = k0 + tl.arange(0, BLOCK_K)
                in_k = offs_k < k_hi
                x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                            mask=in_m[:, None] & in_k[None, :], other=0.0)             # [BM, BK]
                w = _dequantized_tile(q_ptr, s_ptr, z_ptr, offs_n, in_n, k0, offs_k, in_k, k_hi,
                                      stride_qn, stride_qk, stride_sn, stride_sg, GROUP_SIZE, OFFSET, BITS,
                                      HAS_ZEROS, ONE_GROUP_PER_TILE, BLOCK_K, FAST_CONVERT)   # [BN, BK]
                if UPCAST:   # Triton's CPU interpreter computes bf16 dots wrongly; on a GPU this is off
                    x = x.to(tl.float32)
                else:
                    w = w.to(x.dtype)
                acc += tl.dot(x, tl.trans(w), input_precision=DOT_PRECISION)
        if HAS_BIAS:
            if pid_k == 0:           # one split adds the bias
                acc += tl.load(b_ptr + offs_n, mask=in_n, other=0.0).to(tl.float32)[None, :]
        y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
        mask_y = in_m[:, None] & in_n[None, :]
        if SPLIT_K == 1:
            tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_y)
        else:                        # y is fp32 and zeroed: partial sums over K add up
            tl.atomic_add(y_ptrs, acc, mask=mask_y)

    @triton.jit
    def dequant_gemv_kernel(x_ptr, q_ptr, s_ptr, z_ptr, b_ptr, y_ptr, M, N, K,
                            stride_xm, stride_xk, stride_qn, stride_qk, stride_sn, stride_sg,
                            stride_ym, stride_yn,
                            GROUP_SIZE: tl.constexpr, OFFSET: tl.constexpr, BITS: tl.constexpr,
                            HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr, ONE_GROUP_PER_TILE: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                            SPLIT_NIBBLES: tl.constexpr, FAST_CONVERT: tl.constexpr):
        """y[:M, n-tile] = x[:M] @ dequant(W[n-tile])^T for M <= BLOCK_M (a handful of rows)."""
        pid_n = tl.program_id(0)
        offs_m = tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        in_m, in_n = offs_m < M, offs_n < N
        # Products accumulate elementwise, each thread along its own stretch of K, and are summed
        # across K once after the loop: a reduction across threads in every iteration (the first
        # version) ran at 97-234 GB/s at 4 bits and 166-725 GB/s at 8 bits on an H100 (1-4 rows,
        # run 3 in data/bench/).
        if BITS == 4 and SPLIT_NIBBLES:         # low nibbles times even columns, high times odd
            acc3 = tl.zeros([BLOCK_M, BLOCK_N, BLOCK_K // 2], dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                w_lo, w_hi = _dequantized_nibbles(q_ptr, s_ptr, z_ptr, offs_n, in_n, k0, K,
                                                  stride_qn, stride_qk, stride_sn, stride_sg, GROUP_SIZE,
                                                  OFFSET, HAS_ZEROS, ONE_GROUP_PER_TILE, BLOCK_K, FAST_CONVERT)
                x_e, x_o = _even_odd_columns(x_ptr, offs_m, in_m, k0, K, stride_xm, stride_xk, BLOCK_K)
                acc3 += x_e.to(tl.float32)[:, None, :] * w_lo[None, :, :]
                acc3 += x_o.to(tl.float32)[:, None, :] * w_hi[None, :, :]
        else:
            acc3 = tl.zeros([BLOCK_M, BLOCK_N, BLOCK_K], dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                in_k = offs_k < K
                w = _dequantized_tile(q_ptr, s_ptr, z_ptr, offs_n, in_n, k0, offs_k, in_k, K,
                                      stride_qn, stride_qk, stride_sn, stride_sg, GROUP_SIZE, OFFSET, BITS,
                                      HAS_ZEROS, ONE_GROUP_PER_TILE, BLOCK_K, FAST_CONVERT)   # [BN, BK]
                x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                            mask=in_m[:, None] & in_k[None, :], other=0.0).to(tl.float32)  # [BM, BK]
                acc3 += x[:, None, :] * w[None, :, :]
        acc = tl.sum(acc3, axis=2)                                                  # [BM, BN]
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=in_n, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn,
                 acc.to(y_ptr.dtype.element_ty), mask=in_m[:, None] & in_n[None, :])


# ---- the wrapper ------------------------------------------------------------------------------

def _config(M: int, N: int, K: int, group_size: int, device: torch.device, interpret: bool):
    """(BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages): one hand-picked default."""
    if interpret:                                   # small tiles: the interpreter is slow
        return 16, 16, 32, 1, 4, 1
    block_m = 16 if M <= 16 else 32 if M <= 32 else 64
    # a power of two (tl.arange needs one) that divides the group where it can: its lowest set bit
    block_k = 128 if group_size % 128 == 0 or group_size >= K else max(32, min(128, group_size & -group_size))
    block_n = 64
    tiles = triton.cdiv(M, block_m) * triton.cdiv(N, block_n)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    # Decode has few output tiles: split K until there are about two programs per SM, keeping at
    # least 4 K tiles per program so each still streams a useful run of codes.
    split_k = max(1, min(triton.cdiv(2 * sms, tiles), K // (4 * block_k)))
    return block_m, block_n, block_k, split_k, 4, 3


GEMV_MAX_ROWS = 4


def _gemv_config(M: int, N: int, K: int, group_size: int, device: torch.device, interpret: bool):
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) of the GEMV kernel: hand-picked
    (``quant.tune_gemv`` times the candidates)."""
    block_m = triton.next_power_of_2(M)
    if interpret:
        return block_m, 16, 32, 4, 1
    # About two programs per SM: Llama-2-7B's 4096 outputs in tiles of 16 give 256 programs.
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    block_n = 16 if triton.cdiv(N, 32) < 2 * sms else 32
    block_k = 256 if block_m <= 2 else 128       # the [M, N, K] product tile stays in registers
    if group_size < K and group_size & (group_size - 1) == 0 and group_size >= 32:
        block_k = min(block_k, group_size)       # a K tile inside one group: one scale per row
    return block_m, block_n, block_k, 4, 3


def dequant_matmul(x, qweight, scales, zeros, bits: int, group_size: int, sym: bool, bias=None,
                   split_k: int | None = None, kernel: str | None = None,
                   gemv_config: tuple[int, int, int, int] | None = None,
                   split_nibbles: bool = False, fast_convert: bool = False) -> torch.Tensor:
    """y [..., N] = x [..., K] @ dequant(W)^T + bias with W stored as in ``QuantLinear``.

    Args:
        qweight: uint8 [N, ceil(K*bits/8)] below 8 bits, int8 [N, K] at 8 (``packing.pack_codes``).
        scales, zeros: [N, K/group_size] (fp16 by default); zeros are ignored when ``sym``.
        split_k: programs sharing one output tile's K range (None: the default config's choice);
            the tiled kernel only.
        kernel: "gemv" (at most ``GEMV_MAX_ROWS`` rows), "tiled", or None (the default, "tiled":
            the GEMV kernel has not yet been measured faster; see the module docstring).
        gemv_config: (BLOCK_N, BLOCK_K, num_warps, num_stages) of the GEMV kernel instead of the
            default's (``quant.tune_gemv`` times candidates).
        split_nibbles: at 4 bits, multiply the low nibbles by x's even columns and the high nibbles
            by its odd columns instead of interleaving the codes back into column order (either
            kernel; same sums in a different order). Not the default until a GPU has timed it:
            on an H100 (run 4's tuning log) the interleaving int4 GEMV fell from 591 to 187 GB/s at
            4096x4096 when its K tile grew from 128 to 256 codes, while the int8 one, which
            interleaves nothing, rose from 814 to 1501 GB/s (the same at the other two shapes: int4
            slower, int8 as fast or faster; see the module docstring).
        fast_convert: turn codes into floats by bit arithmetic instead of an int-to-float
            conversion (``_codes_to_float``; exact, so the same result). Not the default until a
            GPU has timed it (``quant.tune_gemv``).
    """
    if triton is None:
        raise RuntimeError("triton is not installed")
    K = x.shape[-1]
    N, G = scales.shape
    if bits == 4 and K % 2:
        raise ValueError(f"4-bit codes are read two per byte: K must be even, got {K}")
    if qweight.shape != (N, packed_width(K, bits)) or G * group_size != K or zeros.shape != scales.shape:
        raise ValueError(f"x [..., {K}] does not match qweight {tuple(qweight.shape)}, scales "
                         f"{tuple(scales.shape)}, zeros {tuple(zeros.shape)} at {bits} bits, group_size {group_size}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"activations must be fp16, bf16 or fp32, got {x.dtype}")
    want = torch.int8 if bits == 8 else torch.uint8          # packing's storage: a sign-extended nibble is another code
    if qweight.dtype != want:
        raise TypeError(f"{bits}-bit codes are stored as {want}, got {qweight.dtype}")
    if bias is not None and bias.shape != (N,):               # the kernel reads N values of it
        raise ValueError(f"bias must be [{N}], got {tuple(bias.shape)}")
    if split_k is not None and (not is_int(split_k) or split_k < 1):
        raise ValueError(f"split_k must be an integer >= 1, got {split_k!r}")
    # the kernels read zeros with scales' strides and bias as contiguous: copies when they are not
    if not sym and zeros.stride() != scales.stride():
        scales, zeros = scales.contiguous(), zeros.contiguous()
    if bias is not None:
        bias = bias.contiguous()
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)                                           # [M, K]
    M = x2.shape[0]
    interpret = _interpret()
    if kernel not in (None, "gemv", "tiled"):
        raise ValueError(f"kernel must be 'gemv', 'tiled' or None, got {kernel!r}")
    if kernel is None:        # the GEMV kernel measured slower than the tiled one on an H100 (tune_gemv)
        kernel = "tiled"
    if kernel == "gemv":
        if not 0 < M <= GEMV_MAX_ROWS:
            raise ValueError(f"the GEMV kernel takes 1 to {GEMV_MAX_ROWS} rows, got {M}")
        block_m, block_n, block_k, warps, stages = _gemv_config(M, N, K, group_size, x.device, interpret)
        if gemv_config is not None:
            block_n, block_k, warps, stages = gemv_config
        y = torch.empty(M, N, device=x.device, dtype=x.dtype)
        dequant_gemv_kernel[(triton.cdiv(N, block_n),)](
            x2, qweight, scales, zeros, bias if bias is not None else scales, y,
            M, N, K, x2.stride(0), x2.stride(1), qweight.stride(0), qweight.stride(1),
            scales.stride(0), scales.stride(1), y.stride(0), y.stride(1),
            GROUP_SIZE=group_size, OFFSET=storage_offset(bits, sym), BITS=bits, HAS_ZEROS=not sym,
            HAS_BIAS=bias is not None, ONE_GROUP_PER_TILE=group_size % block_k == 0 or group_size == K,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_NIBBLES=split_nibbles,
            FAST_CONVERT=fast_convert, num_warps=warps, num_stages=stages)
        return y.reshape(*lead, N)
    block_m, block_n, block_k, auto_split, warps, stages = _config(M, N, K, group_size, x.device, interpret)
    split_k = auto_split if split_k is None else split_k
    k_per_split = triton.cdiv(triton.cdiv(K, split_k), block_k) * block_k
    split_k = triton.cdiv(K, k_per_split)                          # no empty splits
    y = (torch.empty if split_k == 1 else torch.zeros)(M, N, device=x.device,
                                                       dtype=x.dtype if split_k == 1 else torch.float32)
    if M == 0:
        return y.to(x.dtype).reshape(*lead, N)
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n), split_k)
    dequant_matmul_kernel[grid](
        x2, qweight, scales, zeros, bias if bias is not None else scales, y,
        M, N, K, k_per_split, x2.stride(0), x2.stride(1), qweight.stride(0), qweight.stride(1),
        scales.stride(0), scales.stride(1), y.stride(0), y.stride(1),
        GROUP_SIZE=group_size, OFFSET=storage_offset(bits, sym), BITS=bits, HAS_ZEROS=not sym,
        HAS_BIAS=bias is not None, ONE_GROUP_PER_TILE=group_size % block_k == 0 or group_size == K,
        SPLIT_K=split_k, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        UPCAST=interpret and x.dtype == torch.bfloat16, SPLIT_NIBBLES=split_nibbles,
        FAST_CONVERT=fast_convert, num_warps=warps, num_stages=stages)
    return y.to(x.dtype).reshape(*lead, N)


def bytes_moved(M: int, N: int, K: int, bits: int, group_size: int, sym: bool, act_bytes: int = 2,
                scale_bytes: int = 2) -> dict[str, int]:
    """Bytes the kernel and the naive reference move for one call (the docstring's arithmetic)."""
    codes = N * packed_width(K, bits)
    meta = N * (K // group_size) * scale_bytes * (1 if sym else 2)
    io = (M * K + M * N) * act_bytes
    return {"kernel": codes + meta + io, "reference": codes + meta + 2 * N * K * act_bytes + io,
            "float": N * K * act_bytes + io}
