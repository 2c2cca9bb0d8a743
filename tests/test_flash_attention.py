"""Flash attention: the tiled PyTorch algorithm and the Triton kernel against the naive reference.

The kernel runs under TRITON_INTERPRET=1 on a CPU (set by scripts/test), at small sizes."""

import pytest
import torch

from llmops_lab.attention import naive_attention
from llmops_lab.attention import triton_flash
from llmops_lab.attention.tiled import tiled_attention

needs_triton = pytest.mark.skipif(not triton_flash.available(),
                                  reason="needs CUDA or TRITON_INTERPRET=1 with triton installed")
TOL = {torch.float32: 2e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}
DEV = "cuda" if torch.cuda.is_available() else "cpu"  # kernels: a GPU, or the interpreter on CPU tensors


def qkv(B, H, Hkv, Sq, Sk, D, dtype=torch.float32, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    mk = lambda h, s: torch.randn(B, h, s, D, generator=g).to(device=device, dtype=dtype)
    return mk(H, Sq), mk(Hkv, Sk), mk(Hkv, Sk)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("Sq, Sk, bm, bn", [(37, 37, 16, 8), (1, 50, 16, 16), (20, 45, 8, 16), (64, 64, 64, 64)])
def test_tiled_equals_naive(causal, Sq, Sk, bm, bn):
    q, k, v = qkv(2, 4, 2, Sq, Sk, 16)
    want = naive_attention(q, k, v, is_causal=causal)
    assert (tiled_attention(q, k, v, is_causal=causal, block_m=bm, block_n=bn) - want).abs().max() < 1e-5


def test_tiled_trace_records_running_statistics():
    q, k, v = qkv(1, 1, 1, 8, 32, 16)
    trace = []
    tiled_attention(q, k, v, is_causal=False, block_m=8, block_n=8, trace=trace)
    assert len(trace) == 4 and all(b["sum"] >= a["sum"] * 0 for a, b in zip(trace, trace[1:]))
    assert [t["max"] for t in trace] == sorted(t["max"] for t in trace)  # the running max never falls


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("B, H, Hkv, Sq, Sk, D", [
    (2, 4, 2, 33, 33, 16),      # GQA, odd length
    (1, 2, 2, 17, 40, 32),      # more keys than queries (queries aligned at the end)
    (1, 4, 1, 1, 23, 64),       # one query (decode)
])
def test_kernel_matches_reference(dtype, causal, B, H, Hkv, Sq, Sk, D):
    q, k, v = qkv(B, H, Hkv, Sq, Sk, D, dtype, device=DEV)
    want = naive_attention(q.float(), k.float(), v.float(), is_causal=causal)
    got, lse = triton_flash.flash_attention(q, k, v, is_causal=causal, return_lse=True)
    assert got.dtype == dtype and got.shape == q.shape
    assert (got.float() - want).abs().max().item() < TOL[dtype]
    # the log-sum-exp of each row's scores, against float64 (the kernel's fp32 statistics)
    kr = k.double().repeat_interleave(H // Hkv, 1)
    scores = q.double() @ kr.transpose(-1, -2) / D ** 0.5
    if causal:
        scores = scores.masked_fill(~torch.ones(Sq, Sk, dtype=torch.bool, device=DEV).tril(Sk - Sq), float("-inf"))
    assert lse.shape == (B, H, Sq) and (lse.double() - scores.logsumexp(-1)).abs().max() < 1e-3


@needs_triton
@pytest.mark.parametrize("varlen", [False, True])
def test_reversed_query_block_order_gives_the_same_output(monkeypatch, varlen):
    """REVERSE_M (a candidate the GPU autotuner times: causal query blocks launched heaviest first)
    only reorders the grid: the same output, for a fixed and a packed batch."""
    q, k, v = qkv(2, 4, 2, 45, 45, 16, device=DEV)
    if varlen:
        q, k, v = (t.transpose(1, 2).reshape(-1, t.shape[1], 16) for t in (q, k, v))
        cu = torch.tensor([0, 45, 90], dtype=torch.int32, device=DEV)
        run = lambda: triton_flash.flash_attention_varlen(q, k, v, cu, cu, 45, is_causal=True)
    else:
        run = lambda: triton_flash.flash_attention(q, k, v, is_causal=True)
    monkeypatch.setattr(triton_flash, "TUNE", False)
    want = run()
    monkeypatch.setattr(triton_flash, "REVERSE_M", True)
    assert torch.equal(run(), want)


@needs_triton
def test_kernel_head_dim_128_bf16():
    q, k, v = qkv(1, 2, 1, 19, 19, 128, torch.bfloat16, device=DEV)
    want = naive_attention(q.float(), k.float(), v.float(), is_causal=True)
    assert (triton_flash.flash_attention(q, k, v, is_causal=True).float() - want).abs().max() < TOL[torch.bfloat16]


@needs_triton
def test_varlen_packed_batch_equals_each_sequence_alone():
    lens = [5, 17, 9]
    H, Hkv, D = 4, 2, 16
    g = torch.Generator().manual_seed(1)
    q = torch.randn(sum(lens), H, D, generator=g).to(DEV)
    k = torch.randn(sum(lens), Hkv, D, generator=g).to(DEV)
    v = torch.randn(sum(lens), Hkv, D, generator=g).to(DEV)
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32, device=DEV)
    out = triton_flash.flash_attention_varlen(q, k, v, cu, cu, max(lens), is_causal=True)
    for i, n in enumerate(lens):
        s, e = int(cu[i]), int(cu[i + 1])
        want = naive_attention(q[s:e].transpose(0, 1)[None], k[s:e].transpose(0, 1)[None],
                               v[s:e].transpose(0, 1)[None], is_causal=True)[0].transpose(0, 1)
        assert (out[s:e] - want).abs().max() < 2e-4, i


@pytest.mark.parametrize("fn", [tiled_attention, triton_flash.flash_attention])
def test_bad_input_is_a_clear_error(fn):
    q, k, v = qkv(1, 2, 2, 8, 8, 16, device=DEV)
    with pytest.raises(ValueError, match="head dims"):
        fn(q, k[..., :8], v)
    with pytest.raises(ValueError, match="differ"):
        fn(q, k, v[:, :, :5])
    with pytest.raises(ValueError, match="empty"):
        fn(q[:, :, :0], k, v)
    if fn is triton_flash.flash_attention:
        with pytest.raises(TypeError, match="supports"):
            fn(q.double(), k.double(), v.double())
        with pytest.raises(ValueError, match="head dim 24"):
            fn(*qkv(1, 2, 2, 8, 8, 24))


@needs_triton
def test_flash_is_a_runtime_backend():
    from llmops_lab.config import ModelConfig
    from llmops_lab.kv import KVCache
    from llmops_lab.model import LlamaModel
    torch.manual_seed(0)
    m = LlamaModel(ModelConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)).eval().to(DEV)
    ids = torch.randint(0, 64, (2, 21), device=DEV)
    with torch.no_grad():
        assert (m(ids, backend="flash") - m(ids, backend="sdpa")).abs().max() < 1e-4
        cache = KVCache.for_model(m, 2, 32)
        m(ids[:, :20], cache=cache, backend="flash")
        step = m(ids[:, 20:], cache=cache, backend="flash")          # decode: one query, all keys
        assert (step[:, -1] - m(ids, backend="sdpa")[:, -1]).abs().max() < 1e-4
        with pytest.raises(ValueError, match="mask"):
            m(ids, attention_mask=torch.ones(2, 21, dtype=torch.long, device=DEV), backend="flash")


@pytest.mark.parametrize("Sq, Sk", [(1, 4), (2, 4), (4, 4)])
def test_backends_agree_on_causal_alignment(Sq, Sk):
    """A causal pass with fewer queries than keys (new queries after a cached prefix): every
    backend aligns the last query with the last key. SDPA's own is_causal aligns the first with
    the first, so sdpa_attention passes an explicit mask there."""
    from llmops_lab.attention import get_backend
    q, k, v = qkv(1, 4, 2, Sq, Sk, 8)
    want = naive_attention(q, k, v, is_causal=True)
    for name in ("sdpa", "cpu_decode", "tiled"):
        torch.testing.assert_close(get_backend(name)(q, k, v, is_causal=True), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tiled_attention(q, k, v, is_causal=True, block_m=2, block_n=2), want,
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["naive", "sdpa", "cpu_decode"])
def test_backends_refuse_what_they_would_read_differently(name):
    """A float mask (SDPA adds it, the naive backend cannot invert it), no keys, and a causal pass
    with more queries than keys: a clear error from every backend, not four different answers."""
    from llmops_lab.attention import get_backend
    fn = get_backend(name)
    q, k, v = qkv(1, 2, 2, 3, 4, 8)
    with pytest.raises(TypeError, match="boolean"):
        fn(q, k, v, mask=torch.ones(1, 1, 3, 4))
    with pytest.raises(ValueError, match="at least one key"):
        fn(q, k[:, :, :0], v[:, :, :0])
    with pytest.raises(ValueError, match="more queries"):
        fn(*qkv(1, 2, 2, 5, 4, 8), is_causal=True)


@needs_triton
def test_flash_reads_a_head_dim_that_is_not_contiguous():
    """q, k, v whose D has a stride other than 1 (a D-major layout) were refused; the kernels take no
    stride along D, so such a tensor is copied once and computed."""
    d_major = lambda t: t.mT.contiguous().mT                 # the same values, D's stride not 1
    q, k, v = qkv(2, 4, 2, 9, 13, 16, device=DEV)
    want = naive_attention(q, k, v, is_causal=True)
    got = triton_flash.flash_attention(d_major(q), k, d_major(v), is_causal=True)
    assert (got - want).abs().max() < 2e-4
    cu = torch.tensor([0, 9, 18], dtype=torch.int32, device=DEV)
    packed = lambda t: t.transpose(1, 2).reshape(-1, t.shape[1], t.shape[3])   # [B*S, heads, D]
    got = triton_flash.flash_attention_varlen(d_major(packed(q)), packed(k[:, :, :9]), d_major(packed(v[:, :, :9])),
                                              cu, cu, 9)
    want = naive_attention(q, k[:, :, :9], v[:, :, :9], is_causal=True)
    assert (got - packed(want)).abs().max() < 2e-4


def test_cpu_decode_answers_layouts_its_kernel_cannot_read():
    """One fp32 query with grouped heads goes to the C kernel, which needs k and v laid out alike
    with D consecutive: v a view of a longer cache, or a strided D, raised a ValueError where every
    other backend answered (found by a bad-input probe). They now run SDPA."""
    from llmops_lab.attention.backends import cpu_decode_attention
    q, k, v = qkv(2, 4, 2, 1, 9, 32)
    longer = torch.cat([v, torch.randn(2, 2, 7, 32)], 2)[:, :, :9]          # v's values, another layout
    torch.testing.assert_close(cpu_decode_attention(q, k, longer), naive_attention(q, k, v), rtol=1e-5, atol=1e-5)
    d_major = lambda t: t.mT.contiguous().mT
    torch.testing.assert_close(cpu_decode_attention(q, d_major(k), d_major(v)), naive_attention(q, k, v),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad", [0, -16, 2.5, True])
def test_tiled_block_sizes_must_be_positive_integers(bad):
    q, k, v = qkv(1, 2, 2, 4, 4, 8)
    for kw in ("block_m", "block_n"):
        with pytest.raises(ValueError, match=kw):
            tiled_attention(q, k, v, **{kw: bad})


@needs_triton
def test_flash_refuses_inputs_the_kernel_would_misread():
    """Found by an adversarial probe: each of these returned uninitialised memory, read past its
    inputs (one aborted the process) or dropped rows, with no error."""
    q, k, v = qkv(2, 2, 1, 5, 7, 16, device=DEV)
    with pytest.raises(ValueError, match="batch"):                    # q batch 2, k/v batch 1
        triton_flash.flash_attention(q, k[:1], v[:1])
    x = torch.randn(40, 2, 16, device=DEV)
    cu = torch.tensor([0, 8, 40], dtype=torch.int32, device=DEV)
    bad = [(dict(max_seqlen_q=8), "max_seqlen_q"), (dict(max_seqlen_q=0), "max_seqlen_q"),
           (dict(cu_seqlens_q=cu + 4), "start at 0"), (dict(cu_seqlens_q=torch.tensor([0, 8, 24], dtype=torch.int32)), "end"),
           (dict(cu_seqlens_q=torch.tensor([0, 8, 48], dtype=torch.int32)), "end"),
           (dict(cu_seqlens_q=torch.tensor([0], dtype=torch.int32)), "B\\+1"),
           (dict(k=torch.randn(40, 3, 16, device=DEV), v=torch.randn(40, 3, 16, device=DEV)), "multiple"),
           (dict(v=torch.randn(39, 2, 16, device=DEV)), "alike")]
    for change, match in bad:
        args = dict(q=x, k=x, v=x, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=32) | change
        with pytest.raises(ValueError, match=match):
            triton_flash.flash_attention_varlen(**args)


@pytest.mark.parametrize("name", ["naive", "sdpa", "cpu_decode"])
def test_backends_refuse_a_mask_with_is_causal(name):
    """A mask and is_causal=True together: every backend read the mask alone and dropped the causal
    condition without a word (the result was exactly the non-causal one). PyTorch's SDPA refuses the
    pair too."""
    from llmops_lab.attention import get_backend
    q, k, v = qkv(1, 2, 2, 4, 4, 8)
    with pytest.raises(ValueError, match="not both"):
        get_backend(name)(q, k, v, mask=torch.ones(4, 4, dtype=torch.bool), is_causal=True)


@pytest.mark.parametrize("name", ["naive", "sdpa", "cpu_decode", "tiled"])
def test_backends_refuse_batch_and_head_mismatches(name):
    """q of batch 1 against k, v of batch 3 was broadcast to 3 rows by the naive backend and SDPA (a
    raw "expanded size" error from tiled_attention); SDPA also broadcast one value head over two key
    heads; no key/value heads was a ZeroDivisionError."""
    from llmops_lab.attention import get_backend
    fn = tiled_attention if name == "tiled" else get_backend(name)
    q, k, v = qkv(1, 2, 2, 4, 4, 8)
    k3, v3 = torch.cat([k] * 3), torch.cat([v] * 3)
    with pytest.raises(ValueError, match="batch sizes differ: q 1, k 3, v 3"):
        fn(q, k3, v3)
    with pytest.raises(ValueError, match="batch sizes differ"):
        fn(torch.cat([q] * 3), k3, v)
    with pytest.raises(ValueError, match="key and value heads differ"):
        fn(torch.cat([q] * 2, 1), torch.cat([k] * 2, 1), v)
    with pytest.raises(ValueError, match="at least one key/value head"):
        fn(q[:, :0], k[:, :0], v[:, :0])


def test_a_row_with_no_key_is_refused_by_the_reference():
    """A mask row that is all False: the naive backend gave NaN, SDPA and cpu_decode zeros, though
    the backends promise to agree. The naive reference now refuses it (it reads the mask's values,
    which _check, on the engine's path, does not); SDPA keeps its zeros, which the engine's padded
    rows rely on."""
    from llmops_lab.attention import sdpa_attention
    q, k, v = qkv(1, 2, 2, 4, 4, 8)
    mask = torch.ones(4, 4, dtype=torch.bool)
    mask[1] = False
    with pytest.raises(ValueError, match="no key to attend to"):
        naive_attention(q, k, v, mask=mask)
    assert sdpa_attention(q, k, v, mask=mask)[:, :, 1].eq(0).all()
    keys = torch.tensor([True, True, False, False])[None, None, None]   # one key mask for every row
    torch.testing.assert_close(naive_attention(q, k, v, mask=keys), sdpa_attention(q, k, v, mask=keys))


def test_tiled_refuses_head_dim_0_and_a_trace_of_nothing():
    """Head dim 0 was a ZeroDivisionError (1 / sqrt(D)); a trace over an empty batch an IndexError
    (the trace follows batch row 0, head 0). An empty batch without a trace stays an empty result."""
    q, k, v = qkv(1, 2, 2, 4, 4, 8)
    with pytest.raises(ValueError, match="head dim of at least 1"):
        tiled_attention(q[..., :0], k[..., :0], v[..., :0])
    for args in ((q[:0], k[:0], v[:0]), (q[:, :0], k, v)):    # no batch row, no query head
        with pytest.raises(ValueError, match="trace needs at least one batch row and one head"):
            tiled_attention(*args, trace=[])
    assert tiled_attention(q[:0], k[:0], v[:0]).shape == (0, 2, 4, 8)


def test_plot_tiles_checks_that_the_trace_fits_the_grid():
    """A trace of 4 query blocks drawn on a 2 x 2 grid was an IndexError; a negative block wrapped
    round to the far edge; a larger grid drew blank tiles that look causally skipped, and two calls'
    traces in one list overwrote each other's tiles."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from llmops_lab.attention import viz
    q, k, v = qkv(1, 1, 1, 64, 64, 8)
    trace = []
    tiled_attention(q, k, v, is_causal=True, block_m=16, block_n=16, trace=trace)
    fig, (a, b) = plt.subplots(1, 2)
    try:
        for grid, match in (((2, 2), "outside the 2 x 2 grid"), ((4, 5), "last row or column"),
                            ((0, 4), "n_q_blocks must be a positive integer")):
            with pytest.raises(ValueError, match=match):
                viz.plot_tiles(a, b, trace, *grid)
        with pytest.raises(ValueError, match="outside"):
            viz.plot_tiles(a, b, trace + [dict(trace[0], q_block=-1)], 4, 4)
        with pytest.raises(ValueError, match="twice"):
            viz.plot_tiles(a, b, trace + trace, 4, 4)
        with pytest.raises(ValueError, match="empty"):
            viz.plot_tiles(a, b, [], 4, 4)
        viz.plot_tiles(a, b, trace, 4, 4)
        assert len(b.get_lines()[0].get_xdata()) == 4          # the last query block's 4 key blocks
    finally:
        plt.close(fig)


@needs_triton
def test_varlen_allocates_no_log_sum_exp_buffer():
    """The packed path allocated a [B*H, T] fp32 log-sum-exp buffer it never returned, of which it
    wrote H x T entries: for 64 one-token sequences, 4x the bytes of q. It now stores none; besides
    its output it allocates only a few integers per sequence (the lengths)."""
    from llmops_lab import measure
    T, H, D = 64, 8, 16
    g = torch.Generator().manual_seed(0)
    q, kv = torch.randn(T, H, D, generator=g).to(DEV), torch.randn(T, 2, D, generator=g).to(DEV)
    cu = torch.arange(T + 1, dtype=torch.int32, device=DEV)                 # 64 sequences of 1 token
    pm = measure.peak_memory(triton_flash.flash_attention_varlen, q, kv, kv, cu, cu, 1, device=DEV)
    assert pm.peak_bytes - q.numel() * q.element_size() <= 16 * len(cu)
    want = naive_attention(q[:, :, None], kv[:, :, None], kv[:, :, None])[:, :, 0]   # each token alone
    assert (pm.result - want).abs().max() < 2e-4


@needs_triton
def test_memory_row_measures_what_its_formulas_count():
    """Both sides leave the output out: the O(S) line was the output plus the statistics (65x the
    statistics at D=64 fp32) against a measurement with the output subtracted, and the O(S^2) line
    one score matrix in q's dtype against a naive backend holding S and P in fp32."""
    from llmops_lab.attention import experiment
    B, H, S, D = 2, 3, 72, 16
    flash = lambda q, k, v, c: triton_flash.flash_attention(q, k, v, is_causal=c)
    naive = lambda q, k, v, c: naive_attention(q, k, v, is_causal=c)
    for causal in (False, True):
        row = experiment.memory_row("ours", flash, B, H, H, S, D, torch.float32, DEV, causal)
        assert row["flash_formula_bytes"] == B * H * S * 4                # one fp32 log-sum-exp per row
        assert row["extra_bytes"] == row["flash_formula_bytes"]           # the kernel's only extra allocation
        row = experiment.memory_row("naive", naive, B, H, H, S, D, torch.float32, DEV, causal)
        assert row["naive_formula_bytes"] == 2 * B * H * S * S * 4       # S and P, fp32
        # the formula leaves out the causal mask, one S x S boolean shared by the heads
        assert row["naive_formula_bytes"] <= row["extra_bytes"] <= row["naive_formula_bytes"] + S * S
    # 16-bit inputs: the naive backend still builds S and P in fp32
    row = experiment.memory_row("naive", naive, B, H, H, S, D, torch.bfloat16, DEV)
    assert row["naive_formula_bytes"] == 2 * B * H * S * S * 4 and row["extra_bytes"] >= row["naive_formula_bytes"]
    assert row["flash_formula_bytes"] == B * H * S * 4


@needs_triton
def test_flash_refuses_zero_key_value_heads():
    """No key/value heads was a ZeroDivisionError (H % Hkv) in both entry points. No query heads is
    an empty result, as from every other backend, without launching a grid with a zero dimension."""
    q, k, v = qkv(1, 2, 2, 4, 4, 16, device=DEV)
    with pytest.raises(ValueError, match="at least one key/value head"):
        triton_flash.flash_attention(q, k[:, :0], v[:, :0])
    assert triton_flash.flash_attention(q[:, :0], k, v).shape == (1, 0, 4, 16)
    x = torch.randn(8, 2, 16, device=DEV)
    cu = torch.tensor([0, 8], dtype=torch.int32, device=DEV)
    with pytest.raises(ValueError, match="at least one key/value head"):
        triton_flash.flash_attention_varlen(x, x[:, :0], x[:, :0], cu, cu, 8)
    assert triton_flash.flash_attention_varlen(x[:, :0], x, x, cu, cu, 8).shape == (8, 0, 16)


@pytest.mark.parametrize("name", ["naive", "sdpa", "cpu_decode", "tiled"])
def test_backends_refuse_an_empty_sequence(name):
    """No queries: naive, SDPA and cpu_decode gave an empty tensor, tiled and flash refused it."""
    from llmops_lab.attention.backends import get_backend
    q, k, v = qkv(1, 2, 2, 4, 4, 16)
    with pytest.raises(ValueError, match="empty sequence"):
        get_backend(name)(q[:, :, :0], k, v, None, False)


@pytest.mark.parametrize("name", ["naive", "sdpa", "cpu_decode", "tiled"])
def test_backends_refuse_mixed_and_integer_dtypes(name):
    """fp16 q against fp32 k, v came back in fp16 from the naive and tiled backends (SDPA refused),
    and integer inputs were truncated to nonsense: every backend now wants one floating dtype."""
    from llmops_lab.attention import get_backend
    fn = get_backend(name)
    q, k, v = qkv(1, 4, 2, 1, 6, 32)                      # one query with grouped heads: cpu_decode's kernel path
    for args in ((q.half(), k, v), (q, k, v.double()), (q.long(), k.long(), v.long())):
        with pytest.raises(TypeError, match="one floating dtype"):
            fn(*args)


def test_cpu_decode_checks_its_inputs_before_the_kernel():
    """One fp32 query with grouped heads on a CPU goes to the C kernel, which named a missing kernel
    variant for no keys or a batch mismatch: the shared checks now run first."""
    from llmops_lab.attention.backends import cpu_decode_attention
    q, k, v = qkv(2, 4, 2, 1, 5, 32)
    with pytest.raises(ValueError, match="at least one key"):
        cpu_decode_attention(q, k[:, :, :0], v[:, :, :0])
    with pytest.raises(ValueError, match="batch sizes differ"):
        cpu_decode_attention(q, k[:1], v[:1])


def test_tiled_is_a_runtime_backend():
    """tiled_attention takes the backends' (q, k, v, mask, is_causal): a model runs on it by function
    or by name, prefill and decode; a mask is refused, and so is is_causal in the mask's place."""
    from llmops_lab.config import ModelConfig
    from llmops_lab.kv import KVCache
    from llmops_lab.model import LlamaModel
    torch.manual_seed(0)
    m = LlamaModel(ModelConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)).eval()
    ids = torch.randint(0, 64, (2, 21))
    with torch.no_grad():
        want = m(ids, backend="sdpa")
        assert (m(ids, backend=tiled_attention) - want).abs().max() < 1e-4
        cache = KVCache.for_model(m, 2, 32)
        m(ids[:, :20], cache=cache, backend="tiled")
        step = m(ids[:, 20:], cache=cache, backend="tiled")          # decode: one query, all keys
        assert (step[:, -1] - want[:, -1]).abs().max() < 1e-4
        with pytest.raises(ValueError, match="no explicit mask"):
            m(ids, attention_mask=torch.ones(2, 21, dtype=torch.long), backend="tiled")
    q, k, v = qkv(1, 2, 2, 4, 4, 8)
    with pytest.raises(TypeError, match="fourth argument is the mask"):
        tiled_attention(q, k, v, True)


def test_implementations_are_admitted_in_the_dtype_asked_for(monkeypatch):
    # notebook 06 timed in fp32 the SDPA backends admitted in bf16 on CUDA: flash and cuDNN refuse fp32
    from llmops_lab.attention import experiment
    asked = []
    monkeypatch.setattr(experiment, "works", lambda fn, device, dtype=None: asked.append(dtype) or dtype is None)
    assert "SDPA math" not in experiment.implementations("cpu", include_triton=False, dtype=torch.float16)
    assert "SDPA math" in experiment.implementations("cpu", include_triton=False)
    assert set(asked) == {torch.float16, None}
