"""Tests for llmops_lab.bench.core: how the decode rows are timed (not how fast anything is)."""
import torch

from llmops_lab import fast_decode, measure
from llmops_lab.bench import BenchContext, core
from llmops_lab.measure import Timing


def test_decode_rows_time_the_eager_runners_together_and_the_compiled_one_after(monkeypatch):
    """ours eager against transformers is judged against a target (>= 1.0x on the CPU), so the
    eager runners are timed in alternation: timed one after the other, the machine's drift went
    into the ratio. The torch.compile'd runner stays out of those rounds: building it starts
    compiler worker processes that took host time from the eager decodes (data/bench run 2), so it
    is built on its first call, after them, and its workers are shut once it is timed.

    The timers are fakes that call each runner once (so its tokens are kept) and return set
    timings; the rows must carry exactly those numbers, under the names recorded runs use."""
    events = []
    eager_s = {"ours, eager": 0.5, "ours, static cache": 0.25, "transformers generate": 1.0}

    def fake_interleaved(fns, warmup, repeats, device):
        events.append(("interleaved", list(fns)))
        for fn in fns.values():
            fn()
        return {name: Timing([eager_s[name]]) for name in fns}

    def fake_time_fn(fn, warmup, repeats, device):
        events.append("time_fn")
        fn()
        return Timing([0.125])

    real_decoder = fast_decode.StaticDecoder

    def decoder(*args, compile=False, **kwargs):      # built as asked, but without compiling
        if compile:
            events.append("compiled decoder built")
        return real_decoder(*args, **kwargs)
    monkeypatch.setattr(measure, "time_interleaved", fake_interleaved)
    monkeypatch.setattr(measure, "time_fn", fake_time_fn)
    monkeypatch.setattr(fast_decode, "StaticDecoder", decoder)
    monkeypatch.setattr(core, "stop_compile_workers", lambda: events.append("workers stopped"))

    ctx = BenchContext(torch.device("cpu"), quick=True, compile=True)
    rows = core.decode_rows(ctx, bandwidth=10e9)

    assert events == [("interleaved", list(eager_s)), "time_fn", "compiled decoder built", "workers stopped"]
    new = 16                                                   # quick: 16 new tokens
    expected = {**{k: new / s for k, s in eager_s.items()}, "ours, static cache + torch.compile": new / 0.125}
    assert [r["name"] for r in rows] == ["decode roofline, embedded target b=1"] + [f"decode {k}" for k in expected]
    assert ctx.results["decode_tok_s"] == expected
    peer = new / 1.0
    for r in rows[1:]:
        label = r["name"].removeprefix("decode ")
        assert set(r) == {"suite", "name", "value", "unit", "peer", "peer_value", "ratio", "target",
                          "roofline_fraction", "greedy_tokens_identical", "prefix_agreement"} - (
            set() if label == "ours, eager" else {"target"})
        assert (r["value"], r["peer_value"], r["ratio"]) == (expected[label], peer, expected[label] / peer)
        assert isinstance(r["greedy_tokens_identical"], bool) and 0 <= r["prefix_agreement"] <= 1
    eager = rows[1]
    assert eager["target"] == ">= 1.0x transformers" and eager["ratio"] == 2.0
    assert rows[3]["greedy_tokens_identical"] and rows[3]["prefix_agreement"] == 1.0   # transformers against itself
