"""Where an engine step's time goes: ``torch.profiler`` over decode steps of a full batch, or
over mixed steps (``--mixed``: a prompt's prefill joins the decodes, as when a seat is refilled).

    python -m llmops_lab.engine.profile [--preset llama-2-7b] [--device cuda] [--batch 16] [--mixed]
                                        [--compare-eager] [--async-scheduling] [--fused-ops]

On a GPU an eager step of a 7B model reads 13 GB of weights (a few milliseconds at HBM speed), and
the host has to launch every kernel of every layer before the GPU can run it. The tables show which
of the two bounds a step: the operators sorted by host (CPU) time and by device time, and the step's
wall time next to the sum of its device time. On a GPU the engine's decode steps replay CUDA graphs
(``cuda_graph``); ``--compare-eager`` profiles the same steps with ``enforce_eager=True`` as well.
Mixed steps always run eagerly: on the H100 (2026-11-26, run 4) 16 of them took 5.2 s of the
batching bench's 7.2 s, a median of 119 ms each against 13 ms for a graphed decode step, and
``--mixed`` is the measurement that says why.
"""
from __future__ import annotations

import argparse
import time

import torch

from ..measure import synchronize
from .config import EngineConfig
from .llm_engine import LLMEngine
from .sampling_params import RequestOutputKind, SamplingParams

FINAL = RequestOutputKind.FINAL_ONLY     # no output built for a running request: the step is what is timed


@torch.inference_mode()
def profile_decode_steps(model, batch_size: int = 16, prompt_len: int = 128, steps: int = 10,
                         row_limit: int = 12, enforce_eager: bool = False, mixed: bool = False,
                         async_scheduling: bool = False, fused_ops: bool = False) -> dict:
    """Profile ``steps`` engine steps in which ``batch_size`` sequences each decode one token, or
    (``mixed``) in which ``batch_size - 1`` sequences decode and one new prompt of ``prompt_len``
    tokens is prefilled (it asks for one token, so its seat is free again for the next step's).

    Returns {"step_ms": wall ms per step, "device_ms": device ms per step (summed kernel time),
    "graphs": whether the steps replayed CUDA graphs, "mixed": bool, "fused": whether the graphed
    steps ran the fused ops (``fused_ops`` needs the graphs), "cpu_table": str, "device_table": str}."""
    if mixed and batch_size < 2:
        raise ValueError("a mixed step needs batch_size >= 2: one prefill beside the decodes")
    dev = model.device
    engine = LLMEngine(model, config=EngineConfig(max_num_seqs=batch_size, max_num_batched_tokens=batch_size * prompt_len,
                                                  enforce_eager=enforce_eager, async_scheduling=async_scheduling,
                                                  fused_ops=fused_ops))
    g = torch.Generator().manual_seed(0)
    prompt = lambda: torch.randint(3, model.config.vocab_size, (prompt_len,), generator=g).tolist()
    for i in range(batch_size - mixed):
        engine.add_request(str(i), prompt(), SamplingParams(max_tokens=2 * steps + 8, ignore_eos=True, temperature=0.0,
                                                            output_kind=FINAL))
    newcomer = iter(range(batch_size, batch_size + 2 * steps + 8))

    def step():
        if mixed:
            engine.add_request(str(next(newcomer)), prompt(), SamplingParams(max_tokens=1, temperature=0.0, output_kind=FINAL))
        engine.step()
    for _ in range(4):                       # the prefill, then warm steps (kernels compiled)
        step()
    synchronize(dev)
    graphs_before = engine.runner.graph_steps
    activities = [torch.profiler.ProfilerActivity.CPU]
    if dev.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        synchronize(dev)
        wall = (time.perf_counter() - t0) / steps
    graphs = engine.runner.graph_steps - graphs_before == steps
    fused = engine.runner.graphs is not None and engine.runner.graphs.fused
    engine.runner.release()
    events = prof.key_averages()
    device_us = sum(getattr(e, "self_device_time_total", 0) for e in events)
    sort_dev = "self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total"
    return {"step_ms": wall * 1e3, "device_ms": device_us / 1e3 / steps, "graphs": graphs, "mixed": mixed,
            "fused": fused,
            "cpu_table": events.table(sort_by="self_cpu_time_total", row_limit=row_limit),
            "device_table": events.table(sort_by=sort_dev, row_limit=row_limit)}


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m llmops_lab.engine.profile", description=__doc__.splitlines()[0])
    ap.add_argument("--preset", help="a shape preset with random weights (default: the embedded target)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--compare-eager", action="store_true", help="also profile with enforce_eager=True")
    ap.add_argument("--mixed", action="store_true",
                    help="also profile mixed steps: batch-1 decodes and one prompt's prefill")
    ap.add_argument("--async-scheduling", action="store_true",
                    help="also profile decode steps with async scheduling (each launched before the last is read)")
    ap.add_argument("--fused-ops", action="store_true",
                    help="also profile decode steps with async scheduling and the fused elementwise kernels")
    a = ap.parse_args(argv)
    if a.preset:
        from ..presets import random_model
        model = random_model(a.preset, device=a.device, dtype=torch.bfloat16 if a.device == "cuda" else torch.float32)
    else:
        from ..loader import load_model
        model = load_model("target", device=a.device, dtype=torch.float32)
    # (enforce_eager, mixed, async_scheduling, fused_ops) of each profiled run
    runs = ([(False, False, False, False)] + [(True, False, False, False)] * a.compare_eager
            + [(False, True, False, False)] * a.mixed + [(False, False, True, False)] * a.async_scheduling
            + [(False, False, True, True)] * a.fused_ops)
    for eager, mixed, overlap, fused in runs:
        r = profile_decode_steps(model, a.batch, a.prompt_len, a.steps, enforce_eager=eager, mixed=mixed,
                                 async_scheduling=overlap, fused_ops=fused)
        how = (("CUDA graphs" if r["graphs"] else "eager") + (", async scheduling" if overlap else "")
               + (", fused ops" if r["fused"] else ""))
        what = f"{a.batch - 1} decodes and a {a.prompt_len}-token prefill" if mixed else f"{a.batch} decodes"
        print(f"{how}: {what} per step: {r['step_ms']:.2f} ms per step (wall), "
              f"{r['device_ms']:.2f} ms of device time")
        print("--- by host time\n" + r["cpu_table"])
        if a.device == "cuda":
            print("--- by device time\n" + r["device_table"])


if __name__ == "__main__":
    main()
