"""Speculative decoding bench: the embedded pair, greedy, batch 1, against the target alone and
against transformers' assisted generation on the same weights; then speedup against batch size
(where speculation stops paying). The target alone runs through the same lean forward
(``llmops_lab.lean``) the speculative decoder uses, so the ratio measures speculation only.

On a GPU these small models are launch-bound: a step's cost follows its layer count, not its
parameters, so c (draft step over target step) is about the layer ratio plus the launches every
step makes whatever its depth: 0.29-0.30 recorded on an H200 and an H100 (2 layers against 8); the
row's ``c`` says so.
"""
from __future__ import annotations

import torch

from . import BenchContext, row


def run(ctx: BenchContext) -> list[dict]:
    from .. import corpus
    from ..evaluate import held_out_prompts
    from ..loader import load_model, load_tokenizer
    from ..speculative import experiment
    tok = load_tokenizer("target")
    target, draft = (load_model(w, device=ctx.device, dtype=torch.float32) for w in ("target", "draft"))
    gpu = ctx.device.type == "cuda"
    # the GPU keeps a short sweep: the whole bench has to fit in five minutes there
    prompts = held_out_prompts(tok, corpus.read_slice("validation"), n=2 if ctx.quick else 4 if gpu else 8,
                               prompt_tokens=32)
    new = 32 if ctx.quick else 128
    ks = (2, 4) if ctx.quick else (1, 2, 4) if gpu else (1, 2, 3, 4, 5, 6, 8)
    repeats = 1 if ctx.quick else 2 if gpu else 3
    rows_k = experiment.sweep_k(target, draft, prompts, ks=ks, new_tokens=new, repeats=repeats)
    best = max(rows_k, key=lambda r: r["speedup"])
    peer = experiment.compare_assisted(target, draft, prompts, new_tokens=new, k=best["k"], repeats=repeats)
    out = [row("spec", f"k={r['k']} speedup vs target alone", r["speedup"], "x", alpha=r["alpha"], c=r["c"],
               verify_cost=r["verify_cost"], predicted_leviathan=r["predicted_leviathan"],
               predicted_with_verify_cost=r["predicted_with_verify_cost"], c_in_loop=r["c_in_loop"],
               verify_cost_in_loop=r["verify_cost_in_loop"], predicted_in_loop=r["predicted_in_loop"])
           for r in rows_k]
    out.append(row("spec", f"best k={best['k']}: ours vs target alone, {len(prompts)} prompts", 1 / peer["ours_s"], "runs/s",
                   peer="target alone (ours, greedy)", peer_value=1 / peer["target_s"], target=">= 1.5x"))
    # the same fixed k on both sides where transformers allows it; else its own drafting schedule
    policy = f"k={best['k']}" if peer["assisted_fixed_k"] else "its default drafting policy"
    out.append(row("spec", f"best k={best['k']}: ours vs assisted", 1 / peer["ours_s"], "runs/s",
                   peer=f"transformers assisted ({policy})", peer_value=1 / peer["assisted_s"], target=">= 1.0x",
                   same_tokens=peer["same_tokens"], assisted_fixed_k=peer["assisted_fixed_k"]))
    batch_ids = torch.stack(prompts)
    for r in experiment.sweep_batch(target, draft, batch_ids, batch_sizes=(1, 2) if ctx.quick else (1, 2, 4) if gpu else (1, 2, 4, 8),
                                    k=best["k"], new_tokens=16 if ctx.quick else 64, repeats=repeats):
        out.append(row("spec", f"b={r['batch_size']} k={r['k']}: speedup vs target alone", r["speedup"], "x",
                       alpha=r["alpha"], batch=r["batch_size"], target_tokens_per_s=r["target_tokens_per_s"],
                       speculative_tokens_per_s=r["speculative_tokens_per_s"]))
    return out
