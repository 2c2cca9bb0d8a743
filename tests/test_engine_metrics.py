"""What the batching experiments measure: the runs' percentiles, a request's metrics when it has
several samples, the static baseline's per-row lengths and its clock on an asynchronous device."""
import math
from fractions import Fraction

import pytest
import torch

from llmops_lab.config import ModelConfig
from llmops_lab.engine import EngineConfig, LLMEngine, SamplingParams
from llmops_lab.engine import static as static_mod
from llmops_lab.engine.static import run_static_batch
from llmops_lab.engine.workload import RunResult, WorkloadRequest, run_continuous
from llmops_lab.generation import generate

TINY = ModelConfig(vocab_size=320, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                   bos_token_id=0, eos_token_id=1)
CTX = TINY.max_position_embeddings
GREEDY = dict(temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny(random_llama):
    return random_llama(TINY)


def alone(model, p, n):
    return generate(model, torch.tensor([p]), max_new_tokens=n, stop_token_ids=())[0, len(p):].tolist()


def engine_alone(model, p, params):
    """What the continuous engine gives for one prompt on its own (default config)."""
    eng = LLMEngine(model, config=EngineConfig())
    eng.add_request("x", p, params)
    out = None
    while eng.has_unfinished_requests():
        out = next((o for o in eng.step() if o.finished), out)
    return out


def ramp(n, start=2):
    return [start + (i * 37) % (TINY.vocab_size - start) for i in range(n)]


# -- RunResult.percentile: nearest rank -------------------------------------------------------------
def run_of(values):
    return RunResult("x", requests=[{"e2e": float(v)} for v in values])


def test_percentile_is_nearest_rank_where_q_n_is_whole():
    ten = run_of(range(1, 11))
    assert ten.percentile("e2e", 90) == 9.0      # was 10.0: one rank too high
    assert ten.percentile("e2e", 50) == 5.0      # was 6.0
    assert ten.percentile("e2e", 10) == 1.0 and ten.percentile("e2e", 11) == 2.0
    assert run_of([1, 2]).percentile("e2e", 50) == 1.0
    assert ten.percentile("e2e", 0) == 1.0 and ten.percentile("e2e", 100) == 10.0
    assert run_of([7]).percentile("e2e", 0) == 7.0 and run_of([7]).percentile("e2e", 100) == 7.0


def test_percentile_matches_the_nearest_rank_definition():
    """The smallest value with at least q% of the values at or below it, counted exactly."""
    for n in range(1, 30):
        r = run_of(range(1, n + 1))
        for q in range(0, 101):
            rank = max(1, math.ceil(Fraction(q * n, 100)))
            assert r.percentile("e2e", q) == rank, (n, q)


@pytest.mark.parametrize("q", [-1, 100.5, float("nan"), float("inf"), "90", True])
def test_percentile_refuses_bad_q(q):
    with pytest.raises(ValueError, match="percentile"):
        run_of([1, 2, 3]).percentile("e2e", q)


# -- a request of n samples: metrics per request, tokens of every sample ------------------------
def seeded_samples(model, max_tokens: int, stops: int, want):
    """A seeded n=2 request whose sample lengths satisfy ``want(lens)`` (stop tokens among the
    first ``stops`` ids end samples early, at different points)."""
    for seed in range(400):
        params = SamplingParams(n=2, temperature=1.5, seed=seed, max_tokens=max_tokens, ignore_eos=True,
                                stop_token_ids=list(range(2, stops)))
        out = engine_alone(model, ramp(6), params)
        if want([len(c.token_ids) for c in out.outputs]):
            return params, out
    pytest.fail("no seed gave samples of the lengths wanted")


def uneven_samples(model):
    """Sample 0 the shorter by more than 4 tokens: where the request's length used to be taken."""
    return seeded_samples(model, 20, 40, lambda lens: lens[0] < lens[1] - 4)


def test_n_samples_metrics_follow_the_longest_sample(tiny):
    params, out = uneven_samples(tiny)
    lens = [len(c.token_ids) for c in out.outputs]
    m = out.metrics
    assert m.num_output_tokens == max(lens)              # was sample 0's length
    # the request's decode: first token to last, over the steps its longest sample took
    assert m.tpot == pytest.approx((m.e2e - m.ttft) / (max(lens) - 1))


def test_one_token_sample_does_not_hide_the_requests_tpot(tiny):
    """Sample 0 stops after its first token while the other runs on: TPOT is still measured."""
    _, out = seeded_samples(tiny, 12, 60, lambda lens: lens[0] == 1 and lens[1] > 2)
    lens = [len(c.token_ids) for c in out.outputs]
    assert out.metrics.num_output_tokens == lens[1]
    assert out.metrics.tpot is not None and out.metrics.tpot > 0     # was None


def test_workload_rows_count_every_samples_tokens(tiny):
    params, out = uneven_samples(tiny)
    res = run_continuous(tiny, [WorkloadRequest("a", ramp(6), params)], progress=False)
    row = res.requests[0]
    assert row["n_out"] == sum(len(c.token_ids) for c in out.outputs)     # was sample 0's only
    assert res.output_tokens == row["n_out"]
    assert res.throughput == pytest.approx(row["n_out"] / res.makespan)
    assert row["tpot"] == pytest.approx((row["e2e"] - row["ttft"]) / (max(len(c.token_ids) for c in out.outputs) - 1))
    # every sample's finish reason (sample 0 stopped early; the row said only that) and preemptions
    assert out.outputs[0].finish_reason == "stop"
    assert row["finish_reason"].split(",") == sorted({c.finish_reason for c in out.outputs})
    assert row["preemptions"] == sum(c.num_preemptions for c in out.outputs)


# -- the static baseline: each row stops at its own limit ---------------------------------------
@pytest.mark.parametrize("static_cache", [False, True])
def test_static_rows_stop_at_their_own_limit(tiny, static_cache):
    """A short prompt batched with one near the context gets the tokens it gets alone. The static
    cache holds the left-padded layout within the context: the short row may run one token longer
    than the long one there."""
    long_len = CTX - 6
    p_long, p_short = ramp(long_len), ramp(10, start=5)
    want_short = 7 if static_cache else 10
    params = [SamplingParams(max_tokens=10, **GREEDY), SamplingParams(max_tokens=want_short, **GREEDY)]
    outs, steps = run_static_batch(tiny, [p_long, p_short], params, static_cache=static_cache)
    for o, p, sp in zip(outs, (p_long, p_short), params):
        ref = engine_alone(tiny, p, sp).outputs[0]
        assert o.outputs[0].token_ids == ref.token_ids == alone(tiny, p, len(ref.token_ids))
        assert o.outputs[0].finish_reason == ref.finish_reason == "length"
        assert o.metrics.num_output_tokens == len(ref.token_ids)
    assert [len(o.outputs[0].token_ids) for o in outs] == [6, want_short]   # the short row was cut at 6
    assert len(steps) == want_short and steps[-1]["num_active"] == 1    # runs as long as its longest row


def test_static_cache_refuses_a_batch_its_layout_cannot_hold(tiny):
    """On the static cache the short row would need slots past the context: a clear error, not a
    silently shorter output."""
    p_long, p_short = ramp(CTX - 6), ramp(10, start=5)
    params = [SamplingParams(max_tokens=10, **GREEDY)] * 2
    with pytest.raises(ValueError, match=r"row 1: 10 new tokens .* 259 cache slots.*static_cache=False"):
        run_static_batch(tiny, [p_long, p_short], params, static_cache=True)


def test_static_batch_refuses_a_prompt_that_fills_the_context(tiny):
    with pytest.raises(ValueError, match=f"row 1: a prompt of {CTX} tokens leaves no room"):
        run_static_batch(tiny, [ramp(5), ramp(CTX)], [SamplingParams(max_tokens=3, **GREEDY)] * 2)


def test_static_batch_lengths_unchanged_for_ordinary_batches(tiny):
    """Far from the context: every row its own max_tokens, the batch as long as the longest."""
    ps = [ramp(n, start=s) for n, s in ((3, 2), (17, 9), (30, 4))]
    lens = (5, 1, 8)
    for static_cache in (False, True):
        outs, steps = run_static_batch(tiny, ps, [SamplingParams(max_tokens=n, **GREEDY) for n in lens],
                                       static_cache=static_cache)
        assert [o.outputs[0].token_ids for o in outs] == [alone(tiny, p, n) for p, n in zip(ps, lens)]
        assert len(steps) == max(lens)


# -- the static baseline's clock waits for the device -------------------------------------------
def test_static_clock_reads_wait_for_the_device(tiny, monkeypatch):
    """On a GPU a launch returns at once: every time the batch records (a step's end, a token's time,
    the batch's end) is read only after the device has finished what was launched."""
    events = []
    real_clock = static_mod.time.perf_counter

    class Clock:
        @staticmethod
        def perf_counter():
            events.append("clock")
            return real_clock()

    monkeypatch.setattr(static_mod, "time", Clock)
    monkeypatch.setattr(static_mod, "synchronize", lambda device=None: events.append(("sync", device)))
    outs, steps = run_static_batch(tiny, [ramp(4), ramp(9)], [SamplingParams(max_tokens=n, **GREEDY) for n in (2, 4)],
                                   arrivals=[0.0, 0.0])
    assert [len(o.outputs[0].token_ids) for o in outs] == [2, 4]
    syncs = [e for e in events if e != "clock"]
    assert syncs and all(e == ("sync", tiny.device) for e in syncs)
    # every clock read after the batch starts (t0 on) directly follows a synchronize
    first = events.index(syncs[0])
    reads = [i for i, e in enumerate(events) if e == "clock" and i > first]
    assert reads and all(events[i - 1] != "clock" for i in reads)
    assert len(reads) >= len(steps) + 1


@pytest.mark.parametrize("prompts, n, match", [([[5, 6], []], 1, "row 1: empty prompt"),
                                               ([[5, 6], [7]], 2, "row 0: n=2")])
def test_static_batch_refuses_what_it_would_drop_or_garble(tiny, prompts, n, match):
    """A static batch has one row a prompt: an empty one would be all padding, and n > 1 samples
    beyond the first were silently dropped."""
    sp = SamplingParams(temperature=0 if n == 1 else 1.0, max_tokens=3, n=n)
    with pytest.raises(ValueError, match=match):
        run_static_batch(tiny, prompts, [sp] * len(prompts))


def test_static_batch_captures_its_graph_before_the_clock_starts(tiny, monkeypatch):
    """The static decoder's CUDA graph (warm-up and capture, 150-200 ms a batch on a GPU) is not
    part of the timed run, as the engine's graphs are captured before it serves."""
    from llmops_lab import fast_decode
    events = []
    monkeypatch.setattr(fast_decode.StaticDecoder, "capture", lambda self: events.append("capture"))
    clock = static_mod._clock
    monkeypatch.setattr(static_mod, "_clock", lambda dev: events.append("clock") or clock(dev))
    run_static_batch(tiny, [[5, 6, 7], [8]], [SamplingParams(**GREEDY, max_tokens=3)] * 2, static_cache=True)
    assert events[0] == "capture" and events.count("capture") == 1


def test_the_continuous_formula_reads_each_requests_own_length():
    """n_out counts every sample's tokens (throughput); the formulas' mean context takes the
    request's longest sample, n_out_longest, so n > 1 does not stretch the context."""
    from llmops_lab.engine import experiment
    rows = [{"n_in": 10, "n_out": 40, "n_out_longest": 20, "request_id": "a", "arrival": 0.0},
            {"n_in": 10, "n_out": 20, "n_out_longest": 20, "request_id": "b", "arrival": 0.0}]
    run = RunResult("x", requests=rows, steps=[{"num_seqs": 2}])
    seen = []
    experiment.predict(run, lambda n, ctx: seen.append(ctx) or 0.01, "continuous", 2)
    assert seen == [20.0]                              # 10 + 20 / 2 for both, not 10 + 40 / 2 for one
