"""Tests for llmops_lab.measure: timing statistics and measured (not computed) memory."""
import time

import pytest
import torch

from llmops_lab import measure
from llmops_lab.measure import PeakMemory, Timing

MB = 1 << 20


def test_timing_statistics():
    t = Timing([0.001 * i for i in range(1, 11)])  # 1..10 ms
    assert t.median == pytest.approx(0.0055)
    assert t.mean == pytest.approx(0.0055)
    assert (t.min, t.max) == (0.001, 0.010)
    assert t.p10 == pytest.approx(0.0019)
    assert t.p90 == pytest.approx(0.0091)
    assert t.spread == pytest.approx(t.p90 - t.p10)
    assert t.stdev > 0
    d = t.to_dict()
    assert d["n"] == 10 and d["median"] == t.median and len(d["samples"]) == 10
    assert str(t).startswith("5.5 ms ±") and "(median of 10)" in str(t)


def test_timing_single_sample_and_empty():
    assert Timing([2.0]).stdev == 0.0 and Timing([2.0]).spread == 0.0
    assert "s ±" in str(Timing([2.0]))
    with pytest.raises(ValueError):
        Timing([])
    for bad in ([float("nan"), 1.0], [-1.0], [float("inf")]):     # NaN printed "nan ns"
        with pytest.raises(ValueError, match="finite"):
            Timing(bad)
    for kw in (dict(repeats=2.5), dict(repeats=float("nan")), dict(warmup="1"), dict(min_time_s=float("nan"))):
        with pytest.raises(ValueError, match="repeats|min_time_s"):
            measure.time_fn(lambda: None, **kw)


def test_time_fn_counts_warmup_and_repeats():
    calls = []
    t = measure.time_fn(lambda x, y=0: calls.append((x, y)), 1, y=2, warmup=3, repeats=5)
    assert len(calls) == 8 and calls[0] == (1, 2)
    assert len(t.samples) == 5 and all(s >= 0 for s in t.samples)


def test_time_fn_measures_sleep():
    t = measure.time_fn(time.sleep, 0.005, warmup=0, repeats=3)
    assert 0.004 < t.median < 0.1


def test_time_fn_min_time_repeats_more_but_is_capped():
    t = measure.time_fn(time.sleep, 0.002, warmup=0, repeats=2, min_time_s=0.02)
    assert 2 < len(t.samples) <= 20
    t = measure.time_fn(lambda: None, warmup=0, repeats=2, min_time_s=10.0)
    assert len(t.samples) == 20


def test_time_interleaved_alternates_and_times_each():
    calls = []
    fns = {"a": lambda: calls.append("a"), "b": lambda: (calls.append("b"), time.sleep(0.004))}
    t = measure.time_interleaved(fns, warmup=1, repeats=3)
    # one warm-up round, then three timed rounds, each starting one function later
    assert calls == ["a", "b"] + ["a", "b"] + ["b", "a"] + ["a", "b"]
    assert set(t) == {"a", "b"} and all(len(x.samples) == 3 for x in t.values())
    assert t["b"].median > 0.003 > t["a"].median
    with pytest.raises(ValueError):
        measure.time_interleaved(fns, repeats=0)


def test_time_interleaved_ratio_survives_a_machine_that_slows_down(monkeypatch):
    """The machine slows down over the run (as a shared one does); B always costs twice A. Timed
    one after the other, B/A would read 4 here; alternated, it reads 2. On a clock the two
    functions advance themselves: real sleeps on a loaded runner overslept by milliseconds and
    made the medians' ratio a matter of luck."""
    import types
    now, slow = [0.0], [1.0]
    monkeypatch.setattr(measure, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))

    def a():
        now[0] += 0.002 * slow[0]

    def b():
        now[0] += 0.004 * slow[0]
        slow[0] += 0.5
    t = measure.time_interleaved({"a": a, "b": b}, warmup=0, repeats=5)
    assert t["b"].median / t["a"].median == pytest.approx(2.0)
    now[0], slow[0] = 0.0, 1.0                     # one after the other: the drift lands on B
    ta = measure.time_interleaved({"a": a}, warmup=0, repeats=5)
    tb = measure.time_interleaved({"b": b}, warmup=0, repeats=5)
    assert tb["b"].median / ta["a"].median == pytest.approx(4.0)


def test_time_interleaved_rotates_which_function_goes_first():
    """Three functions: the three rotations, then the same reversed (a Williams design for odd n)."""
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    t = measure.time_interleaved(fns, warmup=1, repeats=7)
    rounds = ["".join(calls[i:i + 3]) for i in range(0, len(calls), 3)]
    assert rounds == ["abc", "abc", "bca", "cab", "cba", "acb", "bac", "abc"]   # warm-up in order first
    assert list(t) == ["a", "b", "c"] and all(len(x.samples) == 7 for x in t.values())
    assert measure.time_interleaved({}, warmup=1, repeats=2) == {}


def _fake_clock(monkeypatch):
    import types
    now = [0.0]
    monkeypatch.setattr(measure, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
    return now


def _fixed_order_medians(fns, repeats):
    """The rounds as time_interleaved timed them before rotation: the same order every round."""
    samples = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            samples[name].append(measure._time_once(fn, (), {}, torch.device("cpu")))
    return {name: Timing(xs).median for name, xs in samples.items()}


def test_time_interleaved_rotation_spreads_the_cost_of_opening_a_round(monkeypatch):
    """The first call of every round runs slow (say, after the bookkeeping between rounds). In a
    fixed order A paid it every round; rotated, each function pays it once in three rounds."""
    now, calls = _fake_clock(monkeypatch), [0]

    def make():
        def fn():
            now[0] += 0.001 * (3 if calls[0] % 3 == 0 else 1)
            calls[0] += 1
        return fn
    fns = {n: make() for n in "abc"}
    t = measure.time_interleaved(fns, warmup=0, repeats=3)
    assert [x.median for x in t.values()] == pytest.approx([0.001] * 3)
    calls[0] = 0
    assert list(_fixed_order_medians(fns, 3).values()) == pytest.approx([0.003, 0.001, 0.001])


def test_time_interleaved_rotation_spreads_what_one_call_leaves_the_next(monkeypatch):
    """Of two functions, a call right after B runs slow (B leaves the cache cold, say). In a fixed
    order A always followed B and read 3x slower; rotated (A B, B A, ...) each follows the other as
    often, and their medians agree."""
    now, last = _fake_clock(monkeypatch), [None]

    def make(name):
        def fn():
            now[0] += 0.001 * (3 if last[0] == "b" else 1)
            last[0] = name
        return fn
    fns = {n: make(n) for n in "ab"}
    t = measure.time_interleaved(fns, warmup=0, repeats=5)
    assert t["a"].median == pytest.approx(t["b"].median)
    last[0] = None
    fixed = _fixed_order_medians(fns, 5)
    assert fixed["a"] / fixed["b"] == pytest.approx(3.0)


def test_decode_throughput_subtracts_the_one_token_run_of_the_same_round(monkeypatch):
    """A generate call costs (prefill + n steps) times the machine's slowness, which grows every
    round. The per-step samples must be exactly one step at that round's speed: the prefill and
    the drift cancel within a round. Timed one run after the other and subtracting the other run's
    median, the prefill's drift was read as decode time."""
    import types

    from llmops_lab import roofline
    now, calls = [0.0], [0]
    prefill, step = 0.010, 0.001
    monkeypatch.setattr(measure, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))

    def slowness():            # steady within a round of two calls, 50% slower each round
        return 1.0 + 0.5 * (calls[0] // 2)

    def generate(ids, max_new_tokens, stop_token_ids):
        now[0] += slowness() * (prefill + max_new_tokens * step)
        calls[0] += 1
    model = types.SimpleNamespace(
        config=types.SimpleNamespace(max_position_embeddings=64, vocab_size=32),
        device=torch.device("cpu"), generate=generate)
    t = roofline.decode_throughput(model, 1, prompt_len=4, new_tokens=9, repeats=3)
    assert calls[0] == 2 + 2 * 3                                # one warm-up round, three timed
    assert t.samples == pytest.approx([step * s for s in (1.5, 2.0, 2.5)])


def test_time_fn_rejects_cuda_without_gpu():
    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    with pytest.raises(ValueError, match="cuda"):
        measure.time_fn(lambda: None, device="cuda")


def test_peak_memory_sees_a_4mb_tensor_and_returns_the_result():
    x = torch.randn(256, 256)

    def fn():
        a = torch.empty(MB).fill_(1)  # 4 MB float32
        return a.sum() + (x @ x).sum()  # plus a 256 KB matmul output

    pm = measure.peak_memory(fn)
    assert isinstance(pm, PeakMemory) and pm.method == "cpu-profiler"
    assert 4 * MB + 256 * 1024 <= pm.peak_bytes <= 2 * (4 * MB + 256 * 1024)
    assert pm.result == pytest.approx(MB + (x @ x).sum().item(), rel=1e-3)
    assert "result" not in repr(pm)


def test_peak_memory_sees_attention_scores_freed_inside_fn():
    B, H, S, D = 1, 4, 384, 16
    q, k = torch.randn(B, H, S, D), torch.randn(B, H, S, D)
    scores_bytes = B * H * S * S * 4

    def attention_sum():
        scores = (q @ k.transpose(-1, -2)).softmax(-1)  # B, H, S, S; freed before returning
        return scores.sum()

    pm = measure.peak_memory(attention_sum)
    assert scores_bytes <= pm.peak_bytes <= 2.5 * scores_bytes  # scores + softmax output
    assert measure.peak_memory(lambda: torch.ones(1)).peak_bytes < scores_bytes // 100


def test_peak_memory_ignores_what_existed_before():
    keep = torch.ones(MB)
    pm = measure.peak_memory(lambda t: t * 1, keep[:1024])
    assert pm.peak_bytes < 64 * 1024


@pytest.mark.gpu
def test_time_and_peak_memory_on_cuda():
    x = torch.randn(1024, 1024, device="cuda")
    assert measure.time_fn(torch.mm, x, x, device="cuda").median > 0
    pm = measure.peak_memory(lambda: torch.empty(MB, device="cuda"), device="cuda")
    assert pm.method == "cuda-allocator" and pm.peak_bytes >= 4 * MB


def test_tensor_and_module_bytes():
    t = torch.zeros(100, 10)
    assert measure.tensor_bytes(t) == 4000
    assert measure.tensor_bytes(t[:10]) == 4000  # a view keeps its base's storage alive
    emb = torch.nn.Embedding(50, 8)
    head = torch.nn.Linear(8, 50, bias=False)
    head.weight = emb.weight  # tied
    model = torch.nn.Sequential(emb, head)
    assert measure.parameter_count(model) == 400
    assert measure.module_bytes(model) == 1600
    model.register_buffer("packed", torch.zeros(64, dtype=torch.uint8))  # int4 pairs in uint8
    model.register_buffer("packed_view", model.packed[:32])
    assert measure.module_bytes(model) == 1664
    assert measure.module_bytes(model, include_buffers=False) == 1600


def test_meta_tensors_are_not_merged():
    with torch.device("meta"):
        model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    assert measure.module_bytes(model) == 2 * (16 + 4) * 4


def test_bandwidth_and_tflops():
    assert measure.bandwidth_gbs(2e9, 0.5) == 4.0
    assert measure.tflops(3e12, 1.5) == 2.0
    with pytest.raises(ValueError):
        measure.bandwidth_gbs(1, 0)
    for f in (measure.bandwidth_gbs, measure.tflops):            # NaN or negative rates came back as such
        for amount, seconds in ((1e9, float("nan")), (-1e9, 1.0), (float("nan"), 1.0), (1e9, float("inf"))):
            with pytest.raises(ValueError):
                f(amount, seconds)
    from llmops_lab import roofline
    for nbytes in (3, -8, 6, 4.0):                # 3 bytes copied nothing and reported 3.2 MB/s
        with pytest.raises(ValueError, match="nbytes"):
            roofline.copy_bandwidth("cpu", nbytes)


def test_peak_memory_refuses_to_nest():
    """The inner call used to stop the outer one's profiler: the outer peak came back as 0."""
    from llmops_lab import measure
    with pytest.raises(RuntimeError, match="nested"):
        measure.peak_memory(lambda: measure.peak_memory(lambda: torch.zeros(1000)))
    assert measure.peak_memory(lambda: torch.zeros(1 << 20)).peak_bytes >= 4 << 20     # usable again


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6, 7])
def test_williams_orders_balance_place_and_predecessor(n):
    from collections import Counter
    rows = measure.williams_orders(n)
    assert len(rows) == (2 * n if n % 2 and n > 1 else n) and all(sorted(r) == list(range(n)) for r in rows)
    places = Counter((i, p) for r in rows for p, i in enumerate(r))
    assert set(places.values()) == {len(rows) // n}                      # each function in each place alike
    if n > 1:
        pairs = Counter((a, b) for r in rows for a, b in zip(r, r[1:]))
        assert len(pairs) == n * (n - 1) and len(set(pairs.values())) == 1   # each ordered pair alike
    with pytest.raises(ValueError):
        measure.williams_orders(0)
