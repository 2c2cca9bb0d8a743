"""Workloads for the batching experiments, and running one through the engine or the static baseline.

A workload is a list of ``WorkloadRequest``: prompt tokens (windows of the held-out text), sampling
parameters (greedy, ``ignore_eos`` so output lengths are exactly what was drawn) and an arrival
offset in seconds (Poisson arrivals at a given rate, or all at once). ``run_continuous`` and
``run_static`` replay it in real time (a request is not seen before its arrival; an idle server
sleeps until the next one) and return a ``RunResult`` with per-request and per-step rows.
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from ..checks import is_int, is_real
from .config import EngineConfig
from .llm_engine import LLMEngine
from .sampling_params import SamplingParams, final_only
from .static import run_static_batch


@dataclass
class WorkloadRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival: float = 0.0              # seconds after the run starts

    def __post_init__(self) -> None:
        # NaN never arrives (the replay loop spun for ever), inf overflowed time.sleep, and a negative
        # one counted time before the run as waiting
        if not is_real(self.arrival) or not 0 <= self.arrival < math.inf:
            raise ValueError(f"request {self.request_id}: arrival must be a finite number of seconds >= 0, "
                             f"got {self.arrival!r}")


def output_lengths(n: int, mean: float, spread: float, max_len: int, seed: int = 0) -> list[int]:
    """n output lengths with the given mean and spread: log-normal with sigma = spread (0 = all
    equal), clipped to [1, max_len]. A spread of 1 gives a max/mean of about 4-6 over 64 draws."""
    if not is_int(n) or n < 0:
        raise ValueError(f"n must be an integer >= 0, got {n!r}")
    if not is_real(mean) or not 0 < mean < math.inf:
        raise ValueError(f"mean must be a finite number > 0, got {mean!r}")
    if not is_real(spread) or not 0 <= spread < math.inf:
        raise ValueError(f"spread must be a finite number >= 0 (0 = all equal), got {spread!r}")
    if not is_int(max_len) or max_len < 1:       # 0 was ignored: every length came out 1
        raise ValueError(f"max_len must be an integer >= 1, got {max_len!r}")
    if not is_int(seed):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    rng = random.Random(seed)
    mu = math.log(mean) - spread ** 2 / 2
    return [max(1, min(max_len, round(rng.lognormvariate(mu, spread)))) for _ in range(n)]


def make_workload(tokens: list[int], n: int, prompt_len: tuple[int, int] = (8, 64), mean_output: float = 64,
                  spread: float = 1.0, max_output: int = 512, arrival_rate: float = math.inf,
                  seed: int = 0, temperature: float = 0.0) -> list[WorkloadRequest]:
    """n requests whose prompts are random windows of ``tokens`` (e.g. the held-out text)."""
    if not is_int(n) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    if not is_int(seed):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    if not isinstance(prompt_len, (tuple, list)) or len(prompt_len) != 2 or not all(map(is_int, prompt_len)):
        raise ValueError(f"prompt_len must be two integers (lo, hi), got {prompt_len!r}")
    lo, hi = prompt_len
    if not 1 <= lo <= hi or hi >= len(tokens):
        raise ValueError(f"prompt_len {prompt_len} must satisfy 1 <= lo <= hi < len(tokens)={len(tokens)}")
    if not is_real(arrival_rate) or math.isnan(arrival_rate) or arrival_rate <= 0:
        raise ValueError(f"arrival_rate must be > 0 (inf = all at once), got {arrival_rate}")
    if not (is_real(mean_output) and math.isfinite(mean_output) and mean_output > 0):
        raise ValueError(f"mean_output must be a finite number > 0, got {mean_output!r}")
    if not (is_real(spread) and math.isfinite(spread) and spread >= 0):
        raise ValueError(f"spread must be a finite number >= 0 (0 = all outputs equal), got {spread!r}")
    if not is_int(max_output) or max_output < 1:
        raise ValueError(f"max_output must be an integer >= 1, got {max_output!r}")
    rng = random.Random(seed + 1)
    outs = output_lengths(n, mean_output, spread, max_output, seed)
    t, reqs = 0.0, []
    for i, out in enumerate(outs):
        plen = rng.randint(lo, hi)
        start = rng.randrange(0, len(tokens) - plen)
        if math.isfinite(arrival_rate):
            t += rng.expovariate(arrival_rate)
        reqs.append(WorkloadRequest(f"r{i}", tokens[start:start + plen],
                                    SamplingParams(temperature=temperature, max_tokens=out, ignore_eos=True,
                                                   seed=seed + i), t))
    return reqs


@dataclass
class RunResult:
    name: str
    requests: list[dict] = field(default_factory=list)   # one row per request: times and lengths
    steps: list[dict] = field(default_factory=list)      # one row per model step
    makespan: float = 0.0
    outputs: dict = field(default_factory=dict)          # request id -> output token ids

    @property
    def output_tokens(self) -> int:
        """Tokens generated over the run: every sample of every request."""
        return sum(r["n_out"] for r in self.requests)

    @property
    def throughput(self) -> float:
        """Output tokens per second over the whole run."""
        if not self.requests:
            raise ValueError(f"run {self.name!r} has no requests, so no throughput")
        if self.makespan <= 0:
            raise ValueError(f"run {self.name!r} has makespan {self.makespan}, so no throughput")
        return self.output_tokens / self.makespan

    def _values(self, key: str, strict: bool = True) -> list:
        """The rows' values of ``key`` where measured (TPOT is None for a one-token output)."""
        if strict and self.requests and not any(key in r for r in self.requests):   # a typo read as "not measured"
            raise KeyError(f"run {self.name!r} has no {key!r} in its rows; keys: {sorted(self.requests[0])}")
        return [r[key] for r in self.requests if r.get(key) is not None]

    def mean(self, key: str, strict: bool = True) -> float:
        """Mean of ``key`` over the requests that have it; NaN when none does (with ``strict``, a key
        no row holds at all is a KeyError: a typo, not a missing measurement)."""
        vals = self._values(key, strict)
        return sum(vals) / len(vals) if vals else float("nan")

    def percentile(self, key: str, q: float, strict: bool = True) -> float:
        """The q-th percentile (0-100, nearest rank) of ``key``: the smallest value with at least q%
        of the values at or below it (q = 0: the smallest); NaN when no request has it."""
        if not is_real(q) or not 0 <= q <= 100:         # -50 wrapped to the end of the list
            raise ValueError(f"q must be a percentile in [0, 100], got {q!r}")
        vals = sorted(self._values(key, strict))
        if not vals:
            return float("nan")
        # rank ceil(q N / 100), counted from 1; q * N / 100 rather than q / 100 * N, which is exact
        # for a whole q (0.07 * 100 is 7.000000000000001, one rank too high again)
        return vals[max(0, math.ceil(q * len(vals) / 100) - 1)]

    def summary(self) -> dict:
        return {"name": self.name, "requests": len(self.requests), "output_tokens": self.output_tokens,
                "makespan_s": self.makespan, "throughput_tok_s": self.throughput,
                # a hand-built run may lack the latency columns: those show as not measured
                "mean_ttft_s": self.mean("ttft", False), "mean_tpot_s": self.mean("tpot", False),
                "mean_e2e_s": self.mean("e2e", False), "p90_e2e_s": self.percentile("e2e", 90, False),
                "mean_batch": (sum(s["num_seqs"] for s in self.steps) / len(self.steps)) if self.steps else 0.0}


def _row(out, t0: float) -> dict:
    """A finished request's row. ``n_out`` counts the tokens of every sample (n > 1): all were
    generated, so throughput counts them all; the latencies are the request's (``LLMEngine._output``).
    ``finish_reason`` is the samples' reasons, each once, comma-separated ("length,stop");
    ``preemptions`` the samples' preemptions added up."""
    m = out.metrics
    rel = (lambda x: None if x is None else x - t0)
    return {"request_id": out.request_id, "arrival": rel(m.arrival_time), "start": rel(m.first_scheduled_time),
            "first_token": rel(m.first_token_time), "finish": rel(m.finish_time),
            "last_token": rel(m.last_token_time if m.last_token_time is not None else m.finish_time),
            "n_in": len(out.prompt_token_ids), "n_out": sum(len(c.token_ids) for c in out.outputs),
            "n_out_longest": max(len(c.token_ids) for c in out.outputs),      # the request's own length
            "ttft": m.ttft, "tpot": m.tpot, "e2e": m.e2e,
            # every sample's: with n > 1 one may stop while another runs to its length, and each
            # sequence is preempted on its own
            "finish_reason": ",".join(sorted({c.finish_reason for c in out.outputs})),
            "preemptions": sum(c.num_preemptions for c in out.outputs)}


def _check_workload(workload) -> list[WorkloadRequest]:
    """The workload's requests, each checked again (a field set after construction is not)."""
    reqs = list(workload)
    for r in reqs:
        if not isinstance(r, WorkloadRequest):
            raise TypeError(f"a workload is a list of WorkloadRequest, got a {type(r).__name__}")
        r.__post_init__()
    return reqs


def _wait_until(t: float) -> None:
    d = t - time.perf_counter()
    if d > 0:
        time.sleep(d)


def run_continuous(model, workload: list[WorkloadRequest], config: EngineConfig | None = None,
                   tokenizer=None, progress: bool = True, name: str = "continuous") -> RunResult:
    """Replay the workload through a fresh ``LLMEngine`` in real time."""
    pending = sorted(_check_workload(workload), key=lambda r: r.arrival)
    engine = LLMEngine(model, tokenizer, config or EngineConfig())
    res, i = RunResult(name), 0
    bar = tqdm(total=len(pending), desc=name, disable=not progress)
    t0 = time.perf_counter()
    while i < len(pending) or engine.has_unfinished_requests():
        now = time.perf_counter()
        while i < len(pending) and t0 + pending[i].arrival <= now:
            r = pending[i]
            engine.add_request(r.request_id, r.prompt_token_ids, final_only(r.params), arrival_time=t0 + r.arrival)
            i += 1
        if not engine.has_unfinished_requests():
            _wait_until(t0 + pending[i].arrival)
            continue
        for out in engine.step():
            res.requests.append(_row(out, t0))
            res.outputs[out.request_id] = out.outputs[0].token_ids
            engine.release(out.request_id)
            bar.update(1)
    res.makespan = time.perf_counter() - t0
    bar.close()
    res.steps = [dict(s, t_start=s["t_start"] - t0, t_end=s["t_end"] - t0) for s in engine.step_stats]
    engine.runner.release()              # the statistics stay; the pool's memory goes back
    res.engine = engine
    return res


def run_static(model, workload: list[WorkloadRequest], batch_size: int, tokenizer=None,
               progress: bool = True, name: str = "static") -> RunResult:
    """Replay the workload with static batching: whenever the server is idle it takes up to
    ``batch_size`` requests that have arrived and runs them to the end of the longest."""
    if not is_int(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    pending = sorted(_check_workload(workload), key=lambda r: r.arrival)
    res, i = RunResult(name), 0
    bar = tqdm(total=len(pending), desc=name, disable=not progress)
    gen = torch.Generator(device="cpu").manual_seed(0)
    t0 = time.perf_counter()
    while i < len(pending):
        _wait_until(t0 + pending[i].arrival)
        now = time.perf_counter()
        j = i
        while j < len(pending) and j - i < batch_size and t0 + pending[j].arrival <= now:
            j += 1
        batch = pending[i:j]
        outs, steps = run_static_batch(model, [r.prompt_token_ids for r in batch], [r.params for r in batch],
                                       [t0 + r.arrival for r in batch], [r.request_id for r in batch],
                                       tokenizer, gen)
        for out in outs:
            res.requests.append(_row(out, t0))
            res.outputs[out.request_id] = out.outputs[0].token_ids
        res.steps += [dict(s, t_start=s["t_start"] - t0, t_end=s["t_end"] - t0) for s in steps]
        bar.update(len(batch))
        i = j
    res.makespan = time.perf_counter() - t0
    bar.close()
    return res
