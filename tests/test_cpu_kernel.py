"""The CPU paged decode kernel (paged/csrc/paged_decode_cpu.c) against the naive math: every head
dim and query-group size it has a variant for, block sizes that do and do not divide its 8-token
tile, ragged lengths (1 token, a block's edge, many blocks), shuffled block tables, a sliding
window; and the engine produces the same greedy tokens with it as with the gather+SDPA reference."""
import pytest
import torch

from llmops_lab.attention import naive_attention
from llmops_lab.paged import cpu_kernel
from llmops_lab.paged.experiment import paged_inputs
from llmops_lab.paged.varlen import PackedBatch

needs_cc = pytest.mark.skipif(not cpu_kernel.available(), reason=f"no CPU kernel: {cpu_kernel.reason()}")


def paged_case(lens, H, Hkv, D, bs, seed=0):
    """``paged.experiment.paged_inputs`` (shuffled block tables) with the pools token-major,
    [N, bs, Hkv, D] as the engine keeps them, and one more column of table padding."""
    q, kp, vp, bt, lens = paged_inputs(lens, H, Hkv, D, bs, seed=seed)
    kp, vp = (p.transpose(1, 2).contiguous() for p in (kp, vp))
    return q, kp, vp, torch.cat([bt, torch.zeros_like(bt[:, :1])], dim=1), lens


def reference(q, kp, vp, bt, lens, window=None):
    out = []
    for b, L in enumerate(lens.tolist()):
        rows = torch.cat([kp[i] for i in bt[b].tolist()])[:L], torch.cat([vp[i] for i in bt[b].tolist()])[:L]
        lo = max(0, L - window) if window else 0
        k, v = (x[lo:].permute(1, 0, 2)[None] for x in rows)          # [1, Hkv, n, D]
        out.append(naive_attention(q[b][None, :, None], k, v)[0, :, 0])
    return torch.stack(out)


@needs_cc
@pytest.mark.parametrize("D", cpu_kernel.HEAD_DIMS)
@pytest.mark.parametrize("R", cpu_kernel.GROUP_SIZES)
def test_every_variant_matches_the_math(D, R):
    Hkv = 2
    args = paged_case([1, 15, 16, 17, 40, 100], Hkv * R, Hkv, D, bs=16, seed=D + R)
    torch.testing.assert_close(cpu_kernel.paged_decode_cpu(*args), reference(*args), rtol=1e-5, atol=1e-5)


@needs_cc
@pytest.mark.parametrize("bs", [1, 3, 4, 8, 12, 32, 64])
def test_block_sizes_other_than_the_tile(bs):
    args = paged_case([1, 3, 31, 33, 64, 65, 130], 8, 2, 32, bs=bs, seed=bs)
    torch.testing.assert_close(cpu_kernel.paged_decode_cpu(*args), reference(*args), rtol=1e-5, atol=1e-5)


@needs_cc
@pytest.mark.parametrize("window", [1, 5, 16, 37, 1000])
def test_sliding_window_keeps_the_last_tokens(window):
    args = paged_case([1, 10, 16, 50, 90], 4, 4, 64, bs=8, seed=window)
    torch.testing.assert_close(cpu_kernel.paged_decode_cpu(*args, sliding_window=window),
                               reference(*args, window=window), rtol=1e-5, atol=1e-5)


@needs_cc
def test_large_scores_stay_finite():
    """Scores in the hundreds (softmax needs its maximum subtracted) and a long row (2000 tokens)."""
    q, kp, vp, bt, lens = paged_case([2000, 7], 8, 2, 32, bs=16, seed=3)
    q = q * 30
    got = cpu_kernel.paged_decode_cpu(q, kp, vp, bt, lens)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, reference(q, kp, vp, bt, lens), rtol=1e-4, atol=1e-4)


@needs_cc
def test_unsupported_inputs_are_clear_errors():
    q, kp, vp, bt, lens = paged_case([5, 40], 8, 2, 32, bs=16)
    assert cpu_kernel.supports(q, kp, 2)
    assert not cpu_kernel.supports(q[..., :24].contiguous(), kp[..., :24].contiguous(), 2)   # head dim 24
    assert not cpu_kernel.supports(q.bfloat16(), kp.bfloat16(), 2)
    assert not cpu_kernel.supports(torch.randn(2, 6, 32), kp, 2)                             # 3 per KV head
    with pytest.raises(ValueError, match="no CPU kernel variant"):
        cpu_kernel.paged_decode_cpu(q.bfloat16(), kp.bfloat16(), vp.bfloat16(), bt, lens)
    with pytest.raises(ValueError, match="int32"):
        cpu_kernel.paged_decode_cpu(q, kp, vp, bt.long(), lens)
    with pytest.raises(ValueError, match="longer than its block table"):
        cpu_kernel.paged_decode_cpu(q, kp, vp, bt[:, :1], lens)
    with pytest.raises(ValueError, match="block tables"):
        cpu_kernel.paged_decode_cpu(q, kp, vp, bt[:1], lens)
    bad = bt.clone()
    bad[1, 0] = kp.shape[0]                                   # one past the pool: never read out of bounds
    with pytest.raises(ValueError, match="the pool has"):
        cpu_kernel.paged_decode_cpu(q, kp, vp, bad, lens)
    with pytest.raises(ValueError, match="at least 1 token"):
        cpu_kernel.paged_decode_cpu(q, kp, vp, bt, torch.tensor([0, 5], dtype=torch.int32))
    with pytest.raises(ValueError, match="sliding_window"):
        cpu_kernel.paged_decode_cpu(q, kp, vp, bt, lens, sliding_window=0)
    qc, kc, vc = torch.randn(2, 8, 32), torch.randn(2, 2, 10, 32), torch.randn(2, 2, 10, 32)
    for starts in ([0, 10], [-1, 0]):
        with pytest.raises(ValueError, match="starts must lie"):
            cpu_kernel.contiguous_decode_cpu(qc, kc, vc, torch.tensor(starts, dtype=torch.int32))


@needs_cc
def test_the_engine_step_reads_its_tables_once(monkeypatch):
    """A step's decode attention runs once per layer over the same tables and lengths: only the
    first call reads their values (two reductions each); the rest pass values_checked."""
    q, kp, vp, bt, lens = paged_case([5, 40], 8, 2, 32, bs=16)
    want = cpu_kernel.paged_decode_cpu(q, kp, vp, bt, lens)
    assert torch.equal(cpu_kernel.paged_decode_cpu(q, kp, vp, bt, lens, values_checked=True), want)
    seen = []
    real = cpu_kernel.paged_decode_cpu
    monkeypatch.setattr(cpu_kernel, "paged_decode_cpu", lambda *a, **k: seen.append(k["values_checked"]) or real(*a, **k))
    batch = PackedBatch([kp] * 3, [vp] * 3, slot_mapping=torch.tensor([-1, -1]), query_start=[0, 1, 2],
                        context_lens=lens.tolist(), block_tables=bt)
    for layer in range(3):
        batch._layer = layer
        torch.testing.assert_close(batch.attend(q.transpose(0, 1)[None])[0].transpose(0, 1), want)
    assert seen == [False, True, True]


def test_no_compiler_means_the_reference(monkeypatch, tmp_path):
    """Without a C compiler the kernel is unavailable, says why, and the packed batch falls back to
    gather+SDPA with the same result."""
    monkeypatch.setattr(cpu_kernel, "_lib", None)
    monkeypatch.setattr(cpu_kernel, "_why_not", None)
    monkeypatch.setattr(cpu_kernel, "_threaded", cpu_kernel._threaded)
    monkeypatch.setenv("CC", "no-such-compiler-xyz")
    assert not cpu_kernel.available() and "no C compiler" in cpu_kernel.reason()
    q, kp, vp, bt, lens = paged_case([5, 20], 8, 2, 32, bs=16)
    batch = PackedBatch([kp], [vp], slot_mapping=torch.tensor([0, 1]), query_start=[0, 1, 2],
                        context_lens=lens.tolist(), block_tables=bt)
    got = batch._decode(q, kp, vp)
    assert batch.cpu_kernel_calls == 0
    torch.testing.assert_close(got, reference(q, kp, vp, bt, lens), rtol=1e-5, atol=1e-5)


@needs_cc
def test_the_library_is_built_once_per_cpu_and_source(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMOPS_LAB_CACHE", str(tmp_path))
    path = cpu_kernel.library_path(cpu_kernel._compiler())
    assert path.parent == tmp_path and path.name.startswith("paged_decode_cpu-")
    builds = []
    for _ in range(2):                                                   # the second finds the first's build
        monkeypatch.setattr(cpu_kernel, "_lib", None)
        monkeypatch.setattr(cpu_kernel, "_why_not", None)
        monkeypatch.setattr(cpu_kernel, "_threaded", cpu_kernel._threaded)
        assert cpu_kernel.available()
        builds.append({p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()})
    assert builds[0] == builds[1] and len(builds[0]) == 1                # no temporary left behind
    assert next(iter(builds[0])).startswith("paged_decode_cpu-")


@needs_cc
def test_threads_share_rows_and_give_the_same_bits():
    """Built with OpenMP where PyTorch's libgomp is loaded, the kernel shares a call's rows among
    PyTorch's threads (one runtime in the process, sized by torch.set_num_threads); the output is
    bit for bit the same with one thread or two, each row being one thread's work."""
    args = paged_case([1, 9, 70, 200, 33, 5, 128, 64], 8, 2, 32, bs=16, seed=11)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu_kernel.paged_decode_cpu(*args)
        torch.set_num_threads(2)
        two = cpu_kernel.paged_decode_cpu(*args)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)
    torch.testing.assert_close(one, reference(*args), rtol=1e-5, atol=1e-5)
    if cpu_kernel.shares_torch_threads():
        assert cpu_kernel.torch_runs_libgomp() and len(cpu_kernel._gomp_libraries()) == 1


@needs_cc
def test_single_threaded_build_where_torch_runs_no_libgomp(tmp_path, monkeypatch):
    """Where PyTorch's threads are not libgomp's, the kernel is built without OpenMP (no second
    runtime beside PyTorch's) and gives the same result on the calling thread."""
    args = paged_case([3, 40, 17], 4, 2, 64, bs=8, seed=5)
    want = cpu_kernel.paged_decode_cpu(*args)
    monkeypatch.setenv("LLMOPS_LAB_CACHE", str(tmp_path))
    monkeypatch.setattr(cpu_kernel, "_lib", None)
    monkeypatch.setattr(cpu_kernel, "_why_not", None)
    monkeypatch.setattr(cpu_kernel, "_threaded", cpu_kernel._threaded)
    monkeypatch.setattr(cpu_kernel, "torch_runs_libgomp", lambda: False)
    assert cpu_kernel.available() and not cpu_kernel.shares_torch_threads()
    assert [p.name for p in tmp_path.iterdir()] == [cpu_kernel.library_path(cpu_kernel._compiler()).name]
    assert torch.equal(cpu_kernel.paged_decode_cpu(*args), want)


@needs_cc
def test_engine_greedy_tokens_same_with_kernel_and_reference():
    from llmops_lab.engine import LLMEngine, SamplingParams
    from llmops_lab.engine.config import EngineConfig
    from llmops_lab.loader import load_model
    model = load_model("target", dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, model.config.vocab_size, (n,), generator=g).tolist() for n in (5, 17, 33, 2, 60)]
    outs = {}
    for kernel in (True, False):
        engine = LLMEngine(model, config=EngineConfig(max_num_seqs=3, num_kv_blocks=64, cpu_paged_kernel=kernel))
        for i, p in enumerate(prompts):
            engine.add_request(str(i), p, SamplingParams(max_tokens=12 + 7 * i, temperature=0.0, ignore_eos=True))
        while engine.has_unfinished_requests():
            engine.step()
        outs[kernel] = [engine.get_output(str(i)).outputs[0].token_ids for i in range(len(prompts))]
        assert (engine.runner.cpu_kernel_calls > 0) == kernel
    assert outs[True] == outs[False]


def left_padded_case(B=5, H=8, Hkv=2, D=32, S=40, S_max=64, seed=0):
    """q [B, H, 1, D] and a view k, v [B, Hkv, S, D] of a longer cache, as KVCache.update returns."""
    g = torch.Generator().manual_seed(seed)
    kb, vb = (torch.randn(B, Hkv, S_max, D, generator=g) for _ in range(2))
    return torch.randn(B, H, 1, D, generator=g), kb[:, :, :S], vb[:, :, :S]


@needs_cc
@pytest.mark.parametrize("D, H, Hkv", [(32, 8, 2), (64, 4, 4), (128, 8, 1)])
def test_cpu_decode_backend_matches_sdpa_with_left_padding(D, H, Hkv):
    from llmops_lab.attention.backends import cpu_decode_attention, sdpa_attention, suffix_starts
    q, k, v = left_padded_case(H=H, Hkv=Hkv, D=D)
    pads = torch.tensor([0, 3, 17, 39, 1])
    mask = (torch.arange(40)[None, :] >= pads[:, None])[:, None, None, :]
    assert suffix_starts(mask, 5, 40).tolist() == pads.tolist()
    torch.testing.assert_close(cpu_decode_attention(q, k, v, mask), sdpa_attention(q, k, v, mask),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cpu_decode_attention(q, k, v), sdpa_attention(q, k, v), rtol=1e-5, atol=1e-5)


def test_cpu_decode_backend_falls_back_where_it_must():
    """A mask with a hole, a prefill (several queries), bf16: SDPA's own answer, never a wrong one."""
    from llmops_lab.attention.backends import cpu_decode_attention, sdpa_attention, suffix_starts
    q, k, v = left_padded_case()
    holes = torch.ones(5, 1, 1, 40, dtype=torch.bool)
    holes[2, ..., 10] = False                                   # not a suffix
    assert suffix_starts(holes, 5, 40) is False
    torch.testing.assert_close(cpu_decode_attention(q, k, v, holes), sdpa_attention(q, k, v, holes))
    q3 = torch.randn(5, 8, 3, 32)
    torch.testing.assert_close(cpu_decode_attention(q3, k, v, is_causal=True), sdpa_attention(q3, k, v, is_causal=True))
    qb, kb, vb = q.bfloat16(), k.bfloat16(), v.bfloat16()
    torch.testing.assert_close(cpu_decode_attention(qb, kb, vb), sdpa_attention(qb, kb, vb))


@needs_cc
def test_static_batching_through_the_kernel_gives_the_same_tokens(monkeypatch):
    """Static batching's greedy tokens with the C kernel as its decode backend equal those with its
    default SDPA (a left-padded batch: the kernel starts each row after its padding)."""
    from llmops_lab.attention.backends import cpu_decode_attention
    from llmops_lab.engine.sampling_params import SamplingParams
    from llmops_lab.engine.static import run_static_batch
    from llmops_lab.loader import load_model
    model = load_model("target", dtype=torch.float32)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, model.config.vocab_size, (n,), generator=g).tolist() for n in (3, 30, 11)]
    params = [SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True) for m in (20, 5, 33)]
    calls = []
    kernel = cpu_kernel.contiguous_decode_cpu
    monkeypatch.setattr(cpu_kernel, "contiguous_decode_cpu", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    with_kernel = [o.outputs[0].token_ids for o in run_static_batch(model, prompts, params, backend=cpu_decode_attention)[0]]
    assert len(calls) == 32 * model.config.num_hidden_layers     # every decode step of every layer
    calls.clear()
    with_sdpa = [o.outputs[0].token_ids for o in run_static_batch(model, prompts, params)[0]]
    assert with_kernel == with_sdpa and not calls


@needs_cc
def test_heads_first_pools_and_the_paged_cache_backend():
    """PagedKVCache's pools are [N, Hkv, block_size, D]: the same kernel reads them (strides), and
    paged.attention.paged_decode on a CPU takes it for the shapes it has a variant for."""
    from llmops_lab.paged.attention import paged_decode, paged_decode_reference
    x = paged_inputs([1, 16, 17, 70], H=8, Hkv=2, D=64, block_size=16, dtype=torch.float32)
    got = cpu_kernel.paged_decode_cpu(*x, heads_first=True)
    want = paged_decode_reference(*x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(paged_decode(*x), want, rtol=1e-5, atol=1e-5)


@needs_cc
def test_notebook_03_measures_the_c_kernel_on_a_cpu():
    from llmops_lab.loader import load_model
    from llmops_lab.paged import experiment
    res = experiment.decode_attention_latencies(B=2, H=8, Hkv=2, context=64, D=32, dtype=torch.float32, repeats=2)
    assert res["ours: C paged decode (CPU)"]["max_err"] < 1e-5
    steps = experiment.decode_step_latency(load_model("target", dtype=torch.float32), batch_size=2, context=32,
                                           new_tokens=2, repeats=1)
    assert set(steps) == {"contiguous KVCache", "paged, gather + SDPA", "paged, C kernel"}


@needs_cc
def test_timing_cli_runs_and_refuses_bad_contexts(capsys):
    from llmops_lab.paged import experiment
    experiment.main(["--contexts", "16", "--repeats", "1"])
    out = capsys.readouterr().out
    assert "context 16" in out and "ours: C paged decode (CPU)" in out
    for bad in (["--contexts", "20"], ["--contexts", "0"], ["--repeats", "0"], ["--engine", "-1"]):
        with pytest.raises(SystemExit):
            experiment.main(bad)
    assert "must be" in capsys.readouterr().err
