"""The fused dequantize-matmul Triton kernels (tiled, and GEMV for 1-4 rows) against the naive
reference (unpack, dequantize, matmul): odd shapes and exact block boundaries, group sizes
16/32/64/128 and per channel, sym and asym, 4 and 8 bits (and 3), bias, batch 1 and more, split-K;
QuantLinear routes through them.

The kernel runs under TRITON_INTERPRET=1 on a CPU (set by scripts/test), at small sizes."""
import pytest
import torch

from llmops_lab.quant import QuantLinear, quantize
from llmops_lab.quant.packing import pack_codes
from llmops_lab.quant.rtn import quantize_rtn
from llmops_lab.quant.triton_dequant import (available, bytes_moved, dequant_matmul,
                                             dequant_matmul_reference)

DEV = "cuda" if torch.cuda.is_available() else "cpu"   # a GPU, or the interpreter on CPU tensors
needs_kernel = pytest.mark.skipif(not available(DEV), reason="needs CUDA or TRITON_INTERPRET=1")


def stored(N, K, bits, group_size, sym, seed=0):
    """Random weight [N, K] quantized by RTN, in QuantLinear's storage: (qweight, scales, zeros, g)."""
    w = torch.randn(N, K, generator=torch.Generator().manual_seed(seed))
    qw = quantize_rtn(w, bits=bits, group_size=group_size, sym=sym)
    return (pack_codes(qw.codes, bits, sym).to(DEV), qw.scales.half().to(DEV), qw.zeros.half().to(DEV),
            qw.group_size)


def check(M, N, K, bits, group_size, sym, bias, split_k=None, dtype=torch.float32, tol=1e-5, kernel=None):
    q, s, z, g = stored(N, K, bits, group_size, sym)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(M, K, generator=gen).to(DEV, dtype)
    b = torch.randn(N, generator=gen).to(DEV) if bias else None
    got = dequant_matmul(x, q, s, z, bits, g, sym, b, split_k=split_k, kernel=kernel)
    want = dequant_matmul_reference(x.float(), q, s, z, bits, g, sym, b)   # fp32 reference
    assert got.shape == (M, N) and got.dtype == dtype
    err = (got.float() - want).abs().max().item()
    assert err <= tol * want.abs().max().item(), (err, want.abs().max().item())


@needs_kernel
@pytest.mark.parametrize("M", [1, 5])
@pytest.mark.parametrize("N, K", [(37, 96), (16, 64), (50, 160)])   # odd N; K a block multiple or not
@pytest.mark.parametrize("bits, group_size, sym", [(4, 32, False), (4, 32, True), (4, -1, False),
                                                    (8, -1, True), (8, 32, False)])
def test_kernel_matches_reference(M, N, K, bits, group_size, sym):
    check(M, N, K, bits, group_size, sym, bias=M > 1)


@needs_kernel
@pytest.mark.parametrize("group_size", [16, 32, 64, 128, None])    # 16: several groups per K tile
@pytest.mark.parametrize("bits, sym", [(4, False), (4, True), (8, True), (3, False)])
def test_kernel_group_sizes(group_size, bits, sym):
    check(3, 24, 256, bits, group_size, sym, bias=True)


@needs_kernel
@pytest.mark.parametrize("kernel", ["gemv", "tiled"])
@pytest.mark.parametrize("bits, sym", [(2, False), (2, True), (3, True), (5, False), (6, True), (7, False)])
@pytest.mark.parametrize("K", [96, 100])     # 100: rows end mid-byte at 3, 5 and 7 bits; codes span bytes
def test_kernel_reads_bit_streams(kernel, bits, sym, K):
    """2, 3 and 5-7-bit codes are a bit stream (packing.pack_bits): each code read from the one or
    two bytes it spans, per channel (one group) and with groups of 32 or 4 (K = 100)."""
    check(2, 19, K, bits, 32 if K == 96 else 4, sym, bias=True, kernel=kernel)


@needs_kernel
@pytest.mark.parametrize("split_k", [2, 3, 8])
@pytest.mark.parametrize("bits", [4, 8])
def test_split_k_adds_partial_sums(split_k, bits):
    check(4, 40, 224, bits, 32, False, bias=True, split_k=split_k)   # 224 = 7 K tiles: uneven splits


@needs_kernel
@pytest.mark.parametrize("kernel", ["gemv", "tiled"])
@pytest.mark.parametrize("M", [1, 2, 3, 4])
@pytest.mark.parametrize("bits, group_size, sym, N, K", [(4, 32, False, 37, 96), (4, 16, True, 24, 256),
                                                          (8, -1, True, 50, 160), (3, 64, False, 20, 192),
                                                          (4, None, False, 9, 100)])
def test_gemv_and_tiled_kernels_agree_on_few_rows(kernel, M, bits, group_size, sym, N, K):
    check(M, N, K, bits, group_size, sym, bias=M % 2 == 0, kernel=kernel)


@needs_kernel
def test_gemv_kernel_refuses_more_rows_and_unknown_kernels():
    from llmops_lab.quant.triton_dequant import GEMV_MAX_ROWS
    q, s, z, g = stored(16, 64, 4, 32, False)
    with pytest.raises(ValueError, match="GEMV kernel takes"):
        dequant_matmul(torch.randn(GEMV_MAX_ROWS + 1, 64, device=DEV), q, s, z, 4, g, False, kernel="gemv")
    with pytest.raises(ValueError, match="kernel must be"):
        dequant_matmul(torch.randn(1, 64, device=DEV), q, s, z, 4, g, False, kernel="fast")


@needs_kernel
@pytest.mark.parametrize("dtype, tol", [(torch.float16, 3e-3), (torch.bfloat16, 2e-2)])
def test_gemv_half_activations(dtype, tol):
    check(1, 48, 128, 4, 64, False, bias=True, dtype=dtype, tol=tol, kernel="gemv")


@needs_kernel
def test_odd_in_features_per_channel_int8():
    check(2, 9, 100, 8, None, False, bias=False)                      # K not a multiple of anything


@needs_kernel
@pytest.mark.parametrize("dtype, tol", [(torch.float16, 3e-3), (torch.bfloat16, 2e-2)])
def test_half_activations(dtype, tol):
    check(6, 48, 128, 4, 64, False, bias=True, dtype=dtype, tol=tol)


@needs_kernel
def test_quant_linear_routes_through_kernel():
    lin = torch.nn.Linear(96, 40, bias=True)
    q = QuantLinear.from_linear(lin, quantize_rtn(lin.weight.detach(), bits=4, group_size=32, scale_dtype=torch.float16)).to(DEV)
    x = torch.randn(2, 3, 96, device=DEV)                            # [B, S, in]: 6 tokens
    q.kernel = "torch"
    want = q(x)
    q.kernel = "triton"
    assert q.uses_kernel(x)
    assert torch.allclose(q(x), want, atol=1e-5, rtol=1e-5)


@needs_kernel
def test_quantized_model_same_logits_with_kernel(random_llama):
    from llmops_lab.config import ModelConfig
    cfg = ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    m = quantize(random_llama(cfg), bits=4, group_size=32, progress=False).to(DEV)
    ids = torch.randint(0, 128, (2, 5), device=DEV)
    want = m(ids)
    for mod in m.modules():
        if isinstance(mod, QuantLinear):
            mod.kernel = "triton"
    assert torch.allclose(m(ids), want, atol=1e-4, rtol=1e-4)


def test_auto_uses_plain_path_on_cpu_and_checks_the_choice():
    lin = torch.nn.Linear(64, 8)
    q = QuantLinear.from_linear(lin, quantize_rtn(lin.weight.detach(), bits=4, group_size=32, scale_dtype=torch.float16))
    assert not q.uses_kernel(torch.randn(1, 64))                      # CPU: PyTorch path
    q.kernel = "fast"
    with pytest.raises(ValueError, match="kernel must be"):
        q(torch.randn(1, 64))


@needs_kernel
def test_shape_mismatch_is_a_clear_error():
    q, s, z, g = stored(16, 64, 4, 32, False)
    with pytest.raises(ValueError, match="does not match"):
        dequant_matmul(torch.randn(1, 96, device=DEV), q, s, z, 4, g, False)


def test_kernel_moves_fewer_bytes_than_float_and_reference():
    b = bytes_moved(1, 4096, 4096, bits=4, group_size=128, sym=False)
    assert b["kernel"] < b["float"] / 3.5 < b["reference"]          # ~0.53 vs 2 vs 4.5 bytes per weight


@needs_kernel
@pytest.mark.parametrize("kernel", ["gemv", "tiled"])
@pytest.mark.parametrize("M", [1, 3])
@pytest.mark.parametrize("group_size, sym, N, K", [(32, False, 37, 96), (16, True, 24, 256), (None, False, 9, 100),
                                                    (7, False, 11, 98), (14, True, 13, 70)])
def test_split_nibbles_match_the_reference(kernel, M, group_size, sym, N, K):
    """4-bit codes multiplied as two halves (low nibbles by x's even columns, high by its odd ones)
    give the reference's sums: per channel, groups narrower than the K tile, and odd group sizes
    (7, and 14 whose groups start at odd columns), where a code pair straddles two groups."""
    q, s, z, g = stored(N, K, 4, group_size, sym)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(M, K, generator=gen).to(DEV)
    b = torch.randn(N, generator=gen).to(DEV)
    got = dequant_matmul(x, q, s, z, 4, g, sym, b, kernel=kernel, split_nibbles=True)
    want = dequant_matmul_reference(x, q, s, z, 4, g, sym, b)
    assert (got - want).abs().max().item() <= 1e-5 * want.abs().max().item()


@needs_kernel
@pytest.mark.parametrize("dtype, tol", [(torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
def test_split_nibbles_half_activations(dtype, tol):
    for kernel in ("gemv", "tiled"):
        q, s, z, g = stored(40, 256, 4, 64, False)
        x = torch.randn(2, 256, generator=torch.Generator().manual_seed(2)).to(DEV, dtype)
        got = dequant_matmul(x, q, s, z, 4, g, False, kernel=kernel, split_nibbles=True)
        want = dequant_matmul_reference(x.float(), q, s, z, 4, g, False)
        assert got.dtype == dtype
        assert (got.float() - want).abs().max().item() <= tol * want.abs().max().item()


@needs_kernel
@pytest.mark.parametrize("kernel", ["gemv", "tiled"])
@pytest.mark.parametrize("bits, sym, split", [(4, False, False), (4, True, False), (4, False, True), (4, True, True),
                                              (8, True, False), (8, False, False), (3, False, False),
                                              (2, True, False), (7, False, False)])
def test_fast_convert_is_exact(kernel, bits, sym, split):
    """Codes turned into floats by bit arithmetic (2^23 + u read as a float) give the same products
    as the int-to-float conversion: every code value of every width, signed int8 storage (sym and
    asym store different ranges), groups narrower than the tile, K not a tile multiple."""
    N, K = 19, 112                                    # 3.5 of the interpreter's K tiles
    q, s, z, g = stored(N, K, bits, 16 if bits == 4 else None, sym, seed=3)
    x = torch.randn(2, K, generator=torch.Generator().manual_seed(4)).to(DEV)
    kw = dict(kernel=kernel, split_nibbles=split)
    got = dequant_matmul(x, q, s, z, bits, g, sym, fast_convert=True, **kw)
    plain = dequant_matmul(x, q, s, z, bits, g, sym, **kw)
    want = dequant_matmul_reference(x, q, s, z, bits, g, sym)
    assert (got - want).abs().max().item() <= 1e-5 * want.abs().max().item()
    torch.testing.assert_close(got, plain, rtol=1e-6, atol=1e-6)


@needs_kernel
def test_fast_convert_covers_every_code():
    """One weight row per code value at 8 bits (sym -128..127, GPTQ's grid using -128; asym 0..255
    stored as int8 -128..127) and at 4 bits: identity activations read the dequantized weight back
    exactly."""
    for bits, sym in ((8, True), (8, False), (4, True), (4, False)):
        lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if sym else (0, 2 ** bits - 1)
        codes = torch.arange(lo, hi + 1, dtype=torch.int32)[:, None].repeat(1, 32)       # [codes, K]
        q = pack_codes(codes, bits, sym).to(DEV)
        scales = torch.full((codes.shape[0], 1), 0.5, dtype=torch.float16, device=DEV)
        zeros = torch.full_like(scales, 0.0 if sym else 3.0)
        x = torch.eye(32, device=DEV)[:4]                                                # 4 rows: GEMV too
        for kernel in ("gemv", "tiled"):
            got = dequant_matmul(x, q, scales, zeros, bits, 32, sym, kernel=kernel, fast_convert=True)
            want = dequant_matmul_reference(x, q, scales, zeros, bits, 32, sym)
            assert torch.equal(got, want), (bits, sym, kernel)


@needs_kernel
def test_tune_gemv_times_every_variant_and_checks_it():
    """The GPU tuning table, run small: each kernel variant is timed and its output compared with
    the tiled kernel's; at 4 bits each also with split nibbles (and fast conversion), at 8 bits
    with fast conversion."""
    from llmops_lab.quant.tune_gemv import tune
    reported = []                       # each shape's rows as soon as they are timed
    rows = tune(rows=1, candidates=[(16, 32, 4, 1)], device=DEV, shapes=[(24, 64)], report=reported.append)
    assert [len(g) for g in reported] == [7, 5] and sum(reported, []) == rows
    configs = {(r["method"], str(r["config"])) for r in rows}
    assert configs == {("int4", c) for c in ("bf16 F.linear", "tiled (default)", "tiled split", "tiled split fast",
                                             "(16, 32, 4, 1)", "(16, 32, 4, 1) split", "(16, 32, 4, 1) split fast")} | {
        ("int8", c) for c in ("bf16 F.linear", "tiled (default)", "tiled fast", "(16, 32, 4, 1)", "(16, 32, 4, 1) fast")}
    assert not [r for r in rows if "error" in r]
    assert all(r["max_err"] < 0.05 for r in rows if "max_err" in r)      # bf16 activations


@pytest.mark.parametrize("method", ["int4_split", "int4_gemv_fast", "int8_gemv_fast"])
def test_bench_linears_can_run_each_candidate(method):
    """The quant bench's kernel candidates are QuantLinear options: the same stored weight, and the
    kernel's output with them equals the PyTorch path's, through the GEMV kernel for 1-4 rows and
    the tiled one above."""
    from llmops_lab.quant.speed import CANDIDATES, make_linears
    bits, options = CANDIDATES[method]
    (a,), (b,) = (make_linears(m, [("q", 16, 64)], "cpu", torch.float32) for m in (f"int{bits}", method))
    assert all(getattr(b, k) == v and getattr(a, k) != v for k, v in options.items())
    assert torch.equal(a.qweight, b.qweight)
    if available(DEV):                       # QuantLinear hands the choice to the kernel
        a, b = a.to(DEV), b.to(DEV)
        a.kernel, b.kernel = "torch", "triton"
        for rows in (1, 3, 5):               # GEMV_MAX_ROWS is 4
            x = torch.randn(rows, 64, generator=torch.Generator().manual_seed(rows)).to(DEV)
            torch.testing.assert_close(b(x), a(x), rtol=1e-5, atol=1e-5)


@needs_kernel
def test_kernel_and_quant_linear_refuse_what_they_would_misread():
    """A 3-value bias for 8 outputs was read past its end, 4-bit codes in int8 storage were
    sign-extended into other codes, and integer activations gave integer zeros (found by an
    adversarial probe)."""
    qweight, scales, zeros, g = stored(8, 32, 4, 16, False)
    x = torch.randn(2, 32, device=DEV)
    for kw, err, match in ((dict(bias=torch.zeros(3, device=DEV)), ValueError, "bias"),
                           (dict(bias=torch.zeros(8, 1, device=DEV)), ValueError, "bias"),
                           (dict(split_k=0), ValueError, "split_k"), (dict(split_k=1.5), ValueError, "split_k")):
        with pytest.raises(err, match=match):
            dequant_matmul(x, qweight, scales, zeros, 4, g, False, **kw)
    with pytest.raises(TypeError, match="uint8"):
        dequant_matmul(x, qweight.view(torch.int8), scales, zeros, 4, g, False)
    lin = torch.nn.Linear(32, 8)
    ql = QuantLinear.from_linear(lin, quantize_rtn(lin.weight.detach(), bits=4, group_size=16, sym=False, scale_dtype=torch.float16))
    with pytest.raises(TypeError, match="floating-point"):
        ql(torch.ones(2, 32, dtype=torch.long))


@needs_kernel
@pytest.mark.parametrize("kernel", ["gemv", "tiled"])
def test_zeros_and_bias_laid_out_unlike_scales_match_the_reference(kernel):
    """The kernels read zeros with scales' strides and bias as contiguous: a column-major zeros gave
    a product off by 0.68 and a strided bias one off by 1.6, with no error (an adversarial probe)."""
    q, s, z, g = stored(8, 32, 4, 16, False)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 32, generator=gen).to(DEV)
    bias = torch.randn(16, generator=gen).to(DEV)[::2]                    # shape (8,), stride 2
    want = dequant_matmul_reference(x, q, s, z, 4, g, False, bias.contiguous())
    column_major = lambda t: t.t().contiguous().t()                       # same values, strides (1, N)
    for scales, zeros in ((s, column_major(z)), (column_major(s), z), (s, z)):
        got = dequant_matmul(x, q, scales, zeros, 4, g, False, bias, kernel=kernel)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
