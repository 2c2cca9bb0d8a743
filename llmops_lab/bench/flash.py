"""Flash attention bench: our Triton kernel against SDPA's flash and cuDNN backends, same run.

GPU: B=4, H=32, D=128, bf16, S = 1k, 4k, 16k, causal and not (causal FLOPs count the S(S+1)/2 pairs the mask keeps).
On a CPU only the PyTorch implementations run (the Triton kernel needs a GPU outside the
interpreter), at small sizes.
"""
from __future__ import annotations

import torch

from ..attention import experiment
from . import BenchContext, row


def run(ctx: BenchContext) -> list[dict]:
    gpu = ctx.device.type == "cuda"
    if gpu and not ctx.quick:
        B, H, D, dtype, lens = 4, 32, 128, torch.bfloat16, (1024, 4096, 16384)
    else:
        B, H, D, dtype, lens = 1, 8, 64, (torch.bfloat16 if gpu else torch.float32), (256, 512)
    impls = experiment.implementations(ctx.device, include_triton=gpu)  # the interpreter is for tests, not timing
    if gpu:
        impls = {k: v for k, v in impls.items() if k in ("ours (Triton)", "SDPA flash", "SDPA cudnn", "flash-attn")}
    rows = []
    for causal in (True, False):
        for S in lens:
            res = {name: experiment.latency_row(name, fn, B, H, H, S, D, dtype, ctx.device, causal)
                   for name, fn in impls.items()}
            label = f"S={S} {'causal' if causal else 'full'}"
            ours = res.get("ours (Triton)")
            err = _max_err(impls, B, H, S, D, dtype, ctx.device, causal) if ours else None
            if ours and gpu:                       # which tiles the autotuner kept for this shape
                from ..attention import triton_flash
                tuned = getattr(triton_flash, "flash_fwd_tuned", None)
                err = dict(err or {}, config=str(getattr(tuned, "best_config", None)) if triton_flash.TUNE else "fixed")
            for peer, need in (("SDPA flash", ">= 1.0x"), ("SDPA cudnn", ">= 0.7x")):
                if ours and peer in res:
                    rows.append(row("flash", f"{label}: ours vs {peer}", ours["tflops"], "TFLOP/s", peer=peer,
                                    peer_value=res[peer]["tflops"], target=need if gpu else None, **(err or {})))
            rows += [row("flash", f"{label}: {name}", r["tflops"], "TFLOP/s") for name, r in res.items()
                     if name != "ours (Triton)" or not any(p in res for p in ("SDPA flash", "SDPA cudnn"))]
    return rows


def _max_err(impls, B, H, S, D, dtype, device, causal) -> dict | None:
    """Our kernel's largest absolute difference from SDPA's output on the bench inputs."""
    ref_name = next((n for n in ("SDPA flash", "SDPA cudnn", "SDPA efficient") if n in impls), None)
    if ref_name is None:
        return None
    q, k, v = experiment.inputs(B, H, H, S, D, dtype, device)
    with torch.inference_mode():
        err = (impls["ours (Triton)"](q, k, v, causal).float() - impls[ref_name](q, k, v, causal).float()).abs().max()
    return {"max_err": err.item(), "max_err_against": ref_name}
