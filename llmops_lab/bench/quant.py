"""Quantization bench: the linear layers of one decoder layer at decode, quantized against float.

Llama-2-7B's seven linears (q, k, v, o 4096x4096; gate, up 11008x4096; down 4096x11008) run once
per token at batch sizes 1..64, as ``F.linear`` on bf16 weights, as our int4 weights (group 128,
zero point) and int8 weight-only weights (per channel), and as bitsandbytes' LLM.int8() and NF4
where it is importable. On a GPU ours go through the fused Triton kernel (``quant.triton_dequant``)
and each timing is a CUDA graph of ten layer passes, so Python launch overhead is not what is
measured (bitsandbytes' modules are timed eagerly: LLM.int8() picks outlier columns at run time).
On a GPU the kernel's candidates for the default, which no GPU has timed yet, get rows of their
own (``quant.speed.CANDIDATES``): int4 with the split-nibble tile (``split_nibbles``); int4 with
split nibbles, codes turned into floats by bit arithmetic (``fast_convert``) and the GEMV kernel
for 1-4 rows; int8 with the last two.
Decode reads every weight once per step, so 4 bits should approach 4x bf16 at batch 1 and stay
ahead while the batch is small; targets: int4 >= 3x at batch 1 and not slower up to batch 16,
int8 >= 1.6x at batch 1. On a CPU our PyTorch path dequantizes the whole weight every call, so it
is slower than fp32: the rows show by how much. Values are tokens per second through the layer's
linears (batch / time); the ratio is against float in the same run.
"""
from __future__ import annotations

import torch

from ..quant import bnb, experiment
from ..quant.speed import CANDIDATES, INT4_FAST, INT4_SPLIT, INT8_FAST
from . import BenchContext, row

BATCHES = (1, 2, 4, 8, 16, 32, 64)


def _targets(method: str, batch: int) -> str | None:
    bits = CANDIDATES[method][0] if method in CANDIDATES else {"int4": 4, "int8": 8}.get(method)
    if bits == 4:
        return ">= 3.0x" if batch == 1 else ">= 1.0x" if batch <= 16 else None
    if bits == 8 and batch == 1:
        return ">= 1.6x"
    return None


def candidate_rows(method: str, batches, shapes, device, dtype, repeats: int, label: str) -> tuple[list[dict], list[dict]]:
    """(linear_speed rows of one candidate of ``CANDIDATES``, each with ``float_ms`` from its own
    pass, or [] and one row saying why it failed): a candidate that fails to compile or run on a
    GPU must not take the suite's other rows with it."""
    try:
        res = experiment.linear_speed(batches, [method], shapes, device, dtype, repeats=repeats, calls=10)
    except Exception as e:
        return [], [row("quant", f"{label}: failed", float("nan"), "", error=f"{type(e).__name__}: {e}"[:300])]
    floats = {f["batch"]: f["ms"] for f in res if f["method"] == experiment.FLOAT}
    return [dict(r, float_ms=floats[r["batch"]]) for r in res if r["method"] == method], []


def run(ctx: BenchContext) -> list[dict]:
    gpu = ctx.device.type == "cuda"
    shapes = experiment.QUICK_SHAPES if ctx.quick else experiment.preset_shapes("llama-2-7b")
    batches = (1, 4, 16, 64) if ctx.quick and not gpu else BATCHES
    methods = list(experiment.METHODS)
    if bnb.available() and (gpu or not ctx.quick):
        methods += list(bnb.BNB_METHODS)
    dtype = torch.bfloat16 if gpu else torch.float32
    path = "Triton" if gpu else "torch"
    labels = {experiment.FLOAT: f"{'bf16' if gpu else 'fp32'} F.linear", "int4": f"int4 g128 ours ({path})",
              "int8": f"int8 w-only ours ({path})", "bnb_int8": "bnb LLM.int8()", "bnb_nf4": "bnb NF4",
              INT4_SPLIT: "int4 g128 ours, split nibbles (Triton, candidate)",
              INT4_FAST: "int4 g128 ours, split + fast convert + GEMV (Triton, candidate)",
              INT8_FAST: "int8 w-only ours, fast convert + GEMV (Triton, candidate)"}
    res = experiment.linear_speed(batches, methods, shapes, ctx.device, dtype,
                                  repeats=3 if ctx.quick else 20, calls=10)
    failed = []
    if gpu:
        for method in CANDIDATES:
            rows, bad = candidate_rows(method, batches, shapes, ctx.device, dtype,
                                       repeats=3 if ctx.quick else 20, label=labels[method])
            res += rows
            failed += bad
    base = {r["batch"]: r for r in res if r["method"] == experiment.FLOAT}
    shape = "small" if ctx.quick else "7B"
    rows = []
    for r in res:
        b, m = r["batch"], r["method"]
        extra = dict(batch=b, ms=r["ms"], weight_bytes=r["weight_bytes"], weight_gb_s=r["gb_s"],
                     cuda_graph=r["cuda_graph"])
        name = f"{shape} linears b={b}: {labels[m]}"
        if m == experiment.FLOAT:
            rows.append(row("quant", name, b / r["ms"] * 1e3, "tok/s", **extra))
        else:
            float_ms = r.get("float_ms", base[b]["ms"])
            rows.append(row("quant", name, b / r["ms"] * 1e3, "tok/s", peer=labels[experiment.FLOAT],
                            peer_value=b / float_ms * 1e3, target=_targets(m, b) if gpu else None, **extra))
    return rows + failed
