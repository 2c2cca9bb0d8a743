"""Measurements for the batching notebook and bench: static against continuous batching, against the
formulas.

- ``compare``: one workload through both, same model, same seats (``max_num_seqs`` = static batch).
- ``sweep``: the comparison over arrival rates or output-length spreads.
- ``decode_step_times``: the engine's decode step time against batch size and context, measured,
  and ``fit_step_time``: t(B, ctx) = a + b*B + c*B*ctx fitted to it, the input of the formulas.
- ``predict``: the document's formula (static batching's, as the documents write it) and the
  continuous formula (mean running batch / step time at that batch), fed measured numbers.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import formulas
from ..checks import is_int, is_real
from ..evaluate import common_prefix
from ..measure import synchronize, time_fn
from .config import EngineConfig
from .model_runner import ModelRunner
from .scheduler import ScheduledBatch
from .sequence import Sequence
from .static import left_pad
from .workload import RunResult, make_workload, run_continuous, run_static


def compare(model, workload, max_num_seqs: int = 16, block_size: int = 16, num_kv_blocks: int | None = None,
            max_num_batched_tokens: int = 512, tokenizer=None, progress: bool = False,
            bracket: bool = False, rounds: int = 1) -> dict:
    """Run ``workload`` with static batching (batches of max_num_seqs) and with the engine.

    Returns {"static": RunResult, "continuous": RunResult} (the last run of each). ``bracket``: the
    two alternate, the engine first and last, ``rounds`` static runs between ``rounds + 1`` engine
    runs (continuous, static, continuous; with 2 rounds continuous, static, continuous, static,
    continuous), all kept in order under "continuous_runs" and "static_runs". On a machine whose
    speed drifts during the comparison both kinds then sample the whole stretch of time, centred on
    its middle, and ``continuous_throughput`` / ``static_throughput`` pool each kind's runs, so a
    drift linear in time cancels out of the ratio instead of landing on one side of it, and a slow
    or fast spell weighs on both.
    """
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be an integer >= 1, got {rounds!r}")
    config = EngineConfig(max_num_seqs=max_num_seqs, block_size=block_size, num_kv_blocks=num_kv_blocks,
                          max_num_batched_tokens=max_num_batched_tokens)
    cont = lambda: run_continuous(model, workload, config, tokenizer, progress)
    stat = lambda: run_static(model, workload, max_num_seqs, tokenizer, progress)
    if not bracket:
        return {"static": stat(), "continuous": cont()}
    res = {"continuous_runs": [cont()], "static_runs": []}
    for _ in range(rounds):
        res["static_runs"].append(stat())
        res["continuous_runs"].append(cont())
    res["static"], res["continuous"] = res["static_runs"][-1], res["continuous_runs"][-1]
    return res


def _pooled(results: dict, kind: str) -> float:
    """Output tokens per second of a kind's runs in a ``compare`` result: every run pooled (tokens
    over summed makespans) when it was bracketed."""
    runs = results.get(f"{kind}_runs") or ([results[kind]] if kind in results else [])
    if not runs:
        raise ValueError(f"no {kind} runs in results (keys: {sorted(results)})")
    if sum(r.makespan for r in runs) <= 0:
        raise ValueError(f"the {kind} runs have no makespan, so no throughput")
    return sum(r.output_tokens for r in runs) / sum(r.makespan for r in runs)


def continuous_throughput(results: dict) -> float:
    """The engine's output tokens per second in a ``compare`` result (its runs pooled)."""
    return _pooled(results, "continuous")


def static_throughput(results: dict) -> float:
    """Static batching's output tokens per second in a ``compare`` result (its runs pooled)."""
    return _pooled(results, "static")


def step_breakdown(result: RunResult) -> dict:
    """Where a run's time went: its steps in which every sequence decoded one token (on a GPU, the
    CUDA-graph replays) against those that also computed prompt tokens (always eager; a static
    run's prefills): how many of each, their median duration and their total."""
    decodes = lambda s: s.get("num_decode", s["num_tokens"]) == s["num_seqs"]     # static rows: B tokens
    out = {}
    for kind, pick in (("decode", decodes), ("mixed", lambda s: not decodes(s))):
        ms = sorted((s["t_end"] - s["t_start"]) * 1e3 for s in result.steps if pick(s))
        out[f"{kind}_steps"] = len(ms)
        out[f"{kind}_step_ms"] = ms[len(ms) // 2] if ms else None
        out[f"{kind}_total_s"] = sum(ms) / 1e3
    return out


def same_outputs(results: dict) -> bool:
    """Greedy runs must produce the same tokens for every request, however they were batched (a
    bracketed ``compare``'s lists of runs included)."""
    runs = [r for v in results.values() for r in (v if isinstance(v, list) else [v])]
    if len(runs) < 2:                     # nothing compared is no evidence of agreement
        raise ValueError(f"same_outputs compares two runs or more, got {len(runs)}")
    outs = [r.outputs for r in runs]
    return all(o == outs[0] for o in outs[1:])


def agreement(a: RunResult, b: RunResult) -> dict:
    """How far two runs' greedy outputs agree, request by request: the share of requests whose
    first token matches and the mean share of each output before the first difference. In fp32
    both are 1 (``same_outputs``); in bf16 a different batch mix rounds differently and near-tied
    logits can flip, so agreement below 1 is expected there, but a broken kernel shows as far less."""
    common = [r for r in a.outputs if r in b.outputs]
    if not common:
        raise ValueError("the two runs share no request ids")
    if all(not a.outputs[r] and not b.outputs[r] for r in common):   # 0 of 0 tokens is not disagreement
        raise ValueError("the two runs produced no output tokens to compare")
    first, prefix = 0, 0.0
    for r in common:
        x, y = a.outputs[r], b.outputs[r]
        n = common_prefix(x, y)
        first += n > 0
        prefix += n / max(len(x), len(y), 1)
    return {"first_token": first / len(common), "prefix": prefix / len(common)}


def sweep(model, tokens, param: str, values, n: int = 48, max_num_seqs: int = 16, base: dict | None = None,
          step_time: dict | None = None, progress: bool = True, **compare_kwargs) -> list[dict]:
    """Static vs continuous over ``param`` in ("arrival_rate", "spread", "mean_output"); one row per
    (value, kind) with the run's summary, plus the ratio continuous/static in the continuous row and,
    given fitted step times ``{"static": t(B, ctx), "continuous": t(B, ctx)}``, each formula's
    prediction (``predicted_tok_s``)."""
    if param not in ("arrival_rate", "spread", "mean_output"):
        raise ValueError(f"param must be arrival_rate, spread or mean_output, got {param!r}")
    rows = []
    for v in tqdm(values, desc=f"sweep {param}", disable=not progress):
        kw = dict(base or {})
        kw[param] = v
        wl = make_workload(tokens, n, **kw)
        res = compare(model, wl, max_num_seqs, **compare_kwargs)
        s, c = res["static"].summary(), res["continuous"].summary()
        if step_time is not None:
            for kind, row_ in (("static", s), ("continuous", c)):
                row_["predicted_tok_s"] = predict(res[kind], step_time[kind], kind, max_num_seqs)["throughput_tok_s"]
        rows.append(dict(s, **{param: v, "kind": "static"}))
        rows.append(dict(c, **{param: v, "kind": "continuous", "speedup": c["throughput_tok_s"] / s["throughput_tok_s"],
                                "same_outputs": same_outputs(res)}))
    return rows


# -- step time -----------------------------------------------------------------------------------
@torch.inference_mode()
def decode_step_times(model, batch_sizes=(1, 2, 4, 8, 16, 32), contexts=(64, 256), block_size: int = 16,
                      repeats: int = 5) -> list[dict]:
    """Median time of one engine decode step (one token for each of B sequences of ``ctx`` tokens
    already cached), through the same ModelRunner the engine uses."""
    rows = []
    for ctx in contexts:
        nb = math.ceil((ctx + 1) / block_size)
        runner = ModelRunner(model, max(batch_sizes) * nb, block_size)
        for B in batch_sizes:
            batch = ScheduledBatch()
            for b in range(B):
                s = Sequence([2] * (ctx + 1))
                s.block_table = list(range(b * nb, (b + 1) * nb))
                s.num_computed_tokens = ctx
                batch.add(s, 1)
            t = time_fn(runner.execute, batch, warmup=1, repeats=repeats, device=model.device)
            rows.append({"batch": B, "context": ctx, "step_s": t.median})
    return rows


@torch.inference_mode()
def static_step_times(model, batch_sizes=(1, 2, 4, 8, 16, 32), contexts=(64, 256), repeats: int = 5,
                      backend=None) -> list[dict]:
    """Median time of one static-batching decode step (B rows of ``ctx`` cached tokens on a
    contiguous cache, with the padding mask ``run_static_batch`` passes): its T_token. ``backend``:
    the attention backend (default: the model's, as ``run_static_batch``)."""
    from ..kv import KVCache
    rows = []
    for ctx in contexts:
        for B in batch_sizes:
            cache = KVCache.for_model(model, B, ctx + 1)
            cache.length = ctx
            ids = torch.full((B, 1), 2, device=model.device)
            mask = torch.ones(B, ctx + 1, dtype=torch.long, device=model.device)

            def step():
                cache.length = ctx
                return model(ids, cache=cache, attention_mask=mask, backend=backend)
            t = time_fn(step, warmup=1, repeats=repeats, device=model.device)
            rows.append({"batch": B, "context": ctx, "step_s": t.median})
    return rows


def fit_step_time(rows: list[dict]):
    """Least-squares t(B, ctx) = a + b*B + c*B*ctx over measured rows, with a, b, c >= 0 (a time
    cannot shrink as work is added; noise must not make the fit say so): the best fit over every
    subset of the three terms whose coefficients come out non-negative. Returns (fn, (a, b, c))."""
    from itertools import combinations
    if not rows:
        raise ValueError("no rows to fit the step time to")
    for r in rows:
        if not isinstance(r, dict) or not {"batch", "context", "step_s"} <= set(r):
            raise ValueError(f"each row holds batch, context and step_s, got {r!r}")
        if not all(is_real(r[key]) and math.isfinite(r[key]) for key in ("batch", "context", "step_s")):
            raise ValueError(f"rows must hold finite batch, context and step_s, got {r}")
        if r["step_s"] <= 0 or r["batch"] < 1 or r["context"] < 0:   # a fit of (0, 0, 0) predicted infinite speed
            raise ValueError(f"rows need step_s > 0, batch >= 1 and context >= 0, got {r}")
    X = np.array([[1.0, r["batch"], r["batch"] * r["context"]] for r in rows])
    y = np.array([r["step_s"] for r in rows])
    best, best_err = np.zeros(3), float(np.sum(y ** 2))
    for k in (1, 2, 3):
        for cols in combinations(range(3), k):
            coef, *_ = np.linalg.lstsq(X[:, cols], y, rcond=None)
            if (coef < 0).any():
                continue
            err = float(np.sum((X[:, cols] @ coef - y) ** 2))
            if err < best_err:
                best, best_err = np.zeros(3), err
                best[list(cols)] = coef
    a, b, c = (float(v) for v in best)
    return (lambda B, ctx=0.0: a + b * B + c * B * ctx), (a, b, c)


def predict(result: RunResult, step_time, kind: str, max_num_seqs: int) -> dict:
    """Throughput the formulas predict for a finished run, fed its own measured lengths.

    static: the document's N * T_out / (max(L_i) * T_token) per batch (arrival order, batches of
    max_num_seqs), T_token = step_time(N, mean context), fitted on ``static_step_times``;
    continuous: mean running batch (measured) over step_time at that batch and mean context, fitted
    on ``decode_step_times`` (the engine's own step).
    """
    if kind not in ("static", "continuous"):
        raise ValueError(f"kind must be 'static' or 'continuous', got {kind!r}")
    if not is_int(max_num_seqs) or max_num_seqs < 1:
        raise ValueError(f"max_num_seqs must be an integer >= 1, got {max_num_seqs!r}")
    reqs = result.requests
    if not reqs:
        raise ValueError(f"run {result.name!r} has no requests to predict from")
    if any(r["n_out"] < 1 for r in reqs):   # the formula's max(L_i) must be >= 1: it failed naming max_len
        raise ValueError(f"run {result.name!r} has requests with no output tokens (failed or aborted): "
                         f"the formulas predict completed requests only")
    # a request's length is its longest sample's (n_out counts every sample's tokens; the rows
    # without n_out_longest, transformers' and hand-made ones, hold one sample)
    ctx = sum(r["n_in"] + r.get("n_out_longest", r["n_out"]) / 2 for r in reqs) / len(reqs)
    if kind == "static":
        order = sorted(reqs, key=lambda r: (r["arrival"], r["request_id"]))
        tokens = seconds = 0.0
        for i in range(0, len(order), max_num_seqs):
            lens = [r["n_out"] for r in order[i:i + max_num_seqs]]
            N = len(lens)
            t = step_time(N, ctx)
            per_batch = formulas.throughput_as_written(N, sum(lens) / N, max(lens), t)
            tokens += sum(lens)
            seconds += sum(lens) / per_batch
        return {"formula": "document (static)", "throughput_tok_s": tokens / seconds}
    busy = [s["num_seqs"] for s in result.steps]
    if not busy:
        raise ValueError(f"run {result.name!r} has no steps to take the mean batch from")
    mean_batch = sum(busy) / len(busy)
    return {"formula": "continuous: mean batch / t(batch)", "mean_batch": mean_batch,
            "throughput_tok_s": formulas.continuous_batching_throughput(mean_batch, step_time(mean_batch, ctx))}


@torch.inference_mode()
def run_transformers_static(model, workload, batch_size: int, progress: bool = False) -> RunResult:
    """The peer: transformers' ``generate`` with left padding, batches of ``batch_size`` in arrival
    order (all requests assumed arrived), each run for its longest request's output length; a
    request's useful tokens are its own first ``max_tokens``. Same weights (``hf_twin``)."""
    import time

    from ..peers import hf_twin
    hf = hf_twin(model)
    dev = model.device
    res = RunResult("transformers static")
    t0 = time.perf_counter()
    for batch in tqdm(padded_batches(workload, batch_size), desc="transformers", disable=not progress):
        ids, mask = left_pad([r.prompt_token_ids for r in batch])
        S = ids.shape[1]
        new = max(r.params.max_tokens for r in batch)
        out = hf.generate(ids.to(dev), attention_mask=mask.to(dev), max_new_tokens=new, min_new_tokens=new,
                          do_sample=False, eos_token_id=None, pad_token_id=0)
        synchronize(dev)
        end = time.perf_counter() - t0
        for b, r in enumerate(batch):
            toks = out[b, S:S + r.params.max_tokens].tolist()
            res.outputs[r.request_id] = toks
            res.requests.append({"request_id": r.request_id, "arrival": r.arrival, "finish": end,
                                 "n_in": len(r.prompt_token_ids), "n_out": len(toks), "e2e": end - r.arrival})
    res.makespan = time.perf_counter() - t0
    return res


def padded_batches(workload, batch_size: int) -> list[list]:
    """The batches padded ``generate`` runs (``run_transformers_static``): ``batch_size`` requests
    at a time in arrival order."""
    if not is_int(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    order = sorted(workload, key=lambda r: r.arrival)
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def padded_generate_steps(workload, batch_size: int) -> int:
    """Decode steps padded ``generate`` takes on ``workload``: each batch runs for its longest
    request's output. Against the engine's step count it is the part of a throughput ratio that
    comes from running fewer steps, whatever a step costs; the rest is each step's cost."""
    return sum(max(r.params.max_tokens for r in batch) for batch in padded_batches(workload, batch_size))
