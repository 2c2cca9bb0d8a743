"""Static batching in the same runtime: the baseline continuous batching is measured against.

Requests are taken in arrival order, up to ``batch_size`` at a time; the batch is left-padded,
prefilled together on a contiguous KV cache, and decoded step by step until its *last* row is done.
Rows that finished early keep occupying their slot (their steps are computed and thrown away) and no
new request can join: every request of the batch is answered when the batch ends. This is what the
documents' throughput formula N * T_out / (max(L_i) * T_token) describes.

On a GPU each batch's decode steps replay a CUDA graph (``fast_decode.StaticDecoder``), as the
engine's do, so the two differ in scheduling, not in how a step is launched. Attention runs on the
contiguous cache through SDPA, the layout it is made for (the engine's paged pool needs its own
kernels); ``backend`` can swap it, e.g. for the C decode kernel on a CPU
(``attention.backends.cpu_decode_attention``), which the batching bench times both ways.
"""
from __future__ import annotations

import time

import torch

from ..kv import KVCache
from .llm_engine import ban_tokens, sample_token
from .outputs import CompletionOutput, RequestMetrics, RequestOutput
from .sampling_params import SamplingParams, completion_text, stop_reason
from .sequence import Sequence


def left_pad(prompts: list[list[int]], pad_token_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts as one left-padded batch: ids [B, S] and attention mask [B, S] (1 = token), as in
    transformers."""
    S = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), S), pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), S, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, S - len(p):] = torch.tensor(p)
        mask[b, S - len(p):] = 1
    return ids, mask


@torch.inference_mode()
def run_static_batch(model, prompts: list[list[int]], params: list[SamplingParams],
                     arrivals: list[float] | None = None, request_ids: list[str] | None = None,
                     tokenizer=None, generator: torch.Generator | None = None, pad_token_id: int = 0,
                     static_cache: bool | None = None, backend=None):
    """Run one static batch; returns (outputs, steps) where steps are per-step stat rows.
    ``static_cache``: decode on ``StaticDecoder``'s static cache, replayed as a CUDA graph on a GPU
    (default: on a CUDA device; elsewhere the growing contiguous cache). ``backend``: the attention
    backend of the eager decode steps (default: the model's)."""
    B = len(prompts)
    if B == 0:
        raise ValueError("an empty batch")
    for name, xs in (("params", params), ("arrivals", arrivals), ("request_ids", request_ids)):
        if xs is not None and len(xs) != B:
            raise ValueError(f"{name} has {len(xs)} entries for {B} prompts; give one per prompt")
    dev, ctx = model.device, model.config.max_position_embeddings
    now = time.perf_counter()
    arrivals = arrivals or [now] * B
    request_ids = request_ids or [str(i) for i in range(B)]
    seqs = [Sequence(p, sampling_params=sp, request_id=r, arrival_time=a)
            for p, sp, r, a in zip(prompts, params, request_ids, arrivals)]
    done_at: list[float | None] = [None] * B      # when each row's own last token came
    S = max(len(p) for p in prompts)
    new = min(max(sp.max_tokens for sp in params), ctx - S)
    if new < 1:
        raise ValueError(f"a prompt of {S} tokens leaves no room in the model's context of {ctx}")
    ids, prompt_mask = left_pad(prompts, pad_token_id)
    mask = torch.cat([prompt_mask, torch.ones(B, new, dtype=torch.long)], dim=1)
    ids, mask = ids.to(dev), mask.to(dev)
    graph = dev.type == "cuda" if static_cache is None else static_cache
    if graph:
        from ..fast_decode import StaticDecoder
        decoder = StaticDecoder(model, B, S + new)
    else:
        cache = KVCache.for_model(model, B, S + new)
    eos = set(model.config.eos_token_ids)
    gen = generator or torch.Generator(device="cpu").manual_seed(0)
    t0 = time.perf_counter()
    if graph:
        logits = decoder.prefill(ids, mask[:, :S]).float()
    else:
        logits = model(ids, cache=cache, attention_mask=mask[:, :S], last_only=True)[:, -1].float()
    steps = [{"t_start": t0, "t_end": time.perf_counter(), "num_seqs": B, "num_active": B,
              "num_tokens": int(mask[:, :S].sum())}]
    done = [False] * B
    for step in range(new):
        t = time.perf_counter()
        nxt = []
        ban_tokens(logits, [s.sampling_params.banned_tokens(eos, s.num_completion_tokens) for s in seqs])
        # every greedy row's token in one reduction and one device-to-host copy, as the engine does
        argmax = logits.argmax(-1).tolist() if any(sp.greedy for sp in params) else None
        for b, s in enumerate(seqs):
            if done[b]:
                nxt.append(s.token_ids[-1])          # a finished row still runs: padding work
                continue
            tok = argmax[b] if s.sampling_params.greedy else sample_token(logits[b], s.sampling_params, gen)
            s.append_token(tok)
            nxt.append(tok)
            if s.first_token_time is None:
                s.first_token_time = t
            reason, why = stop_reason(s, tok, eos, ctx, tokenizer)
            if reason is not None:
                done[b], s.finish_reason, s.stop_reason = True, reason, why
                done_at[b] = t
        if all(done):
            break
        active = B - sum(done)
        if graph:
            logits = decoder.step(torch.tensor(nxt, device=dev)).float()
        else:
            logits = model(torch.tensor(nxt, device=dev)[:, None], cache=cache,
                           attention_mask=mask[:, :cache.length + 1], backend=backend)[:, -1].float()
        steps.append({"t_start": t, "t_end": time.perf_counter(), "num_seqs": B, "num_active": active,
                      "num_tokens": B})
    end = time.perf_counter()
    outs = []
    for s, done in zip(seqs, done_at):
        s.finish_reason = s.finish_reason or "length"
        s.scheduled_time, s.finish_time = t0, end            # answered when the batch ends
        m = RequestMetrics(s.arrival_time, t0, s.first_token_time, end, s.num_completion_tokens,
                           done or end)
        text = completion_text(tokenizer, s.output_token_ids, s.stop_reason, s.finish_reason,
                               s.sampling_params.include_stop_str_in_output)
        outs.append(RequestOutput(s.request_id, None, s.prompt_token_ids,
                                  [CompletionOutput(0, text, s.output_token_ids, s.finish_reason,
                                                    s.stop_reason)], True, m))
    return outs, steps
