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

from ..checks import integer_ids
from ..kv import KVCache
from ..measure import synchronize
from .llm_engine import ban_tokens, sample_token
from .outputs import CompletionOutput, RequestMetrics, RequestOutput
from .sampling_params import SamplingParams, completion_text, stop_reason
from .sequence import Sequence


def left_pad(prompts: list[list[int]], pad_token_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts as one left-padded batch: ids [B, S] and attention mask [B, S] (1 = token), as in
    transformers."""
    prompts = [integer_ids(p) for p in prompts]    # torch.tensor([5.7]) into a long tensor is 5
    S = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), S), pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), S, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, S - len(p):] = torch.tensor(p)
        mask[b, S - len(p):] = 1
    return ids, mask


def row_limits(prompts: list[list[int]], params: list[SamplingParams], ctx: int) -> list[int]:
    """The most tokens each row may generate: its own ``max_tokens``, and what its own prompt leaves
    of the context (``stop_reason``'s length rule, as the engine applies it to the prompt alone:
    prompt + output up to ``ctx``). Not what the longest prompt of the batch leaves: a short prompt
    batched with a long one was cut short and reported ``"length"``."""
    limits = []
    for b, (p, sp) in enumerate(zip(prompts, params)):
        if len(p) >= ctx:
            raise ValueError(f"row {b}: a prompt of {len(p)} tokens leaves no room in the model's context of {ctx}")
        limits.append(min(sp.max_tokens, ctx - len(p)))
    return limits


def check_static_layout(limits: list[int], S: int, ctx: int) -> None:
    """The static cache (``StaticDecoder``) holds at most ``ctx`` slots, and left padding puts every
    row's tokens after the longest prompt's S: a row generating L tokens feeds L - 1 of them, up to
    slot S + L - 1. A row that needs more is refused rather than cut short. (The growing cache has
    no such limit: the context bounds positions, which count a row's own tokens, not slots.)"""
    for b, limit in enumerate(limits):
        if S + limit - 1 > ctx:
            raise ValueError(f"row {b}: {limit} new tokens after the batch's left-padded prompts of {S} "
                             f"need {S + limit - 1} cache slots; the static cache holds the model's "
                             f"context of {ctx}. Batch it with shorter prompts, lower its max_tokens to "
                             f"{ctx - S + 1}, or run with static_cache=False")


def decode_positions(prompts: list[list[int]], S: int, ctx: int, device):
    """``position_at(slot)``: each row's RoPE position [B, 1] for the token fed at cache slot
    ``slot`` of the left-padded layout (its own prompt length on, as the mask counts it). A finished
    row keeps running as padding, its logits thrown away: its position is clamped to the context's
    last, since counted on it would pass the context (and the model refuse the step) while a row
    with a shorter prompt goes on. Masking the finished rows' slots instead would break the mask's
    left-padding suffix, which the C decode kernel needs (it sent every such step to SDPA)."""
    start = torch.tensor([len(p) - S for p in prompts], device=device)
    return lambda slot: (start + slot).clamp(max=ctx - 1)[:, None]


def _clock(device) -> float:
    """``time.perf_counter()`` once the device has done what was launched: a GPU returns from a launch
    at once, so a bare read put the prefill's time in the first decode step and each step's in the
    next (the wait came in the next ``.tolist()``)."""
    synchronize(device)
    return time.perf_counter()


@torch.inference_mode()
def run_static_batch(model, prompts: list[list[int]], params: list[SamplingParams],
                     arrivals: list[float] | None = None, request_ids: list[str] | None = None,
                     tokenizer=None, generator: torch.Generator | None = None, pad_token_id: int = 0,
                     static_cache: bool | None = None, backend=None):
    """Run one static batch; returns (outputs, steps) where steps are per-step stat rows.
    Each row generates what it would alone (``row_limits``); the batch runs until its last row is
    done. ``static_cache``: decode on ``StaticDecoder``'s static cache, replayed as a CUDA graph on
    a GPU (default: on a CUDA device; elsewhere the growing contiguous cache), which refuses a batch
    whose left-padded layout it cannot hold (``check_static_layout``). ``backend``: the attention
    backend of the eager decode steps (default: the model's)."""
    B = len(prompts)
    if B == 0:
        raise ValueError("an empty batch")
    for name, xs in (("params", params), ("arrivals", arrivals), ("request_ids", request_ids)):
        if xs is not None and len(xs) != B:
            raise ValueError(f"{name} has {len(xs)} entries for {B} prompts; give one per prompt")
    for b, (p, sp) in enumerate(zip(prompts, params)):
        if len(p) == 0:        # left padding would make an all-padding row, decoded as garbage
            raise ValueError(f"row {b}: empty prompt")
        if sp.n != 1:          # one row a prompt: the other samples would be dropped, unseen
            raise ValueError(f"row {b}: n={sp.n}; static batching runs one sample per prompt (the engine runs n > 1)")
    dev, ctx = model.device, model.config.max_position_embeddings
    now = time.perf_counter()
    arrivals = arrivals or [now] * B
    request_ids = request_ids or [str(i) for i in range(B)]
    seqs = [Sequence(p, sampling_params=sp, request_id=r, arrival_time=a)
            for p, sp, r, a in zip(prompts, params, request_ids, arrivals)]
    done_at: list[float | None] = [None] * B      # when each row's own last token came
    S = max(len(p) for p in prompts)
    limits = row_limits(prompts, params, ctx)
    new = max(limits)                  # steps the batch runs: every row reaches its limit by then
    graph = dev.type == "cuda" if static_cache is None else static_cache
    if graph:
        check_static_layout(limits, S, ctx)
    # the last token is never fed back: S + new - 1 slots (a growing cache may pass ctx: a row's
    # positions count its own tokens, and stay within the context up to its own limit)
    slots = S + new - 1
    ids, prompt_mask = left_pad(prompts, pad_token_id)
    mask = torch.cat([prompt_mask, torch.ones(B, slots - S, dtype=torch.long)], dim=1)
    ids, mask = ids.to(dev), mask.to(dev)
    if graph:
        from ..fast_decode import StaticDecoder
        decoder = StaticDecoder(model, B, slots)
        decoder.capture()              # before the clock starts: a server captures its graphs ahead
    else:
        cache = KVCache.for_model(model, B, slots)
        position_at = decode_positions(prompts, S, ctx, dev)
    eos = set(model.config.eos_token_ids)
    gen = generator or torch.Generator(device="cpu").manual_seed(0)
    t0 = _clock(dev)
    if graph:
        logits = decoder.prefill(ids, mask[:, :S]).float()
    else:
        logits = model(ids, cache=cache, attention_mask=mask[:, :S], last_only=True)[:, -1].float()
    steps = [{"t_start": t0, "t_end": _clock(dev), "num_seqs": B, "num_active": B,
              "num_tokens": int(mask[:, :S].sum())}]
    done = [False] * B
    for step in range(new):
        t = _clock(dev)                                # the logits this step samples from are ready
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
            logits = model(torch.tensor(nxt, device=dev)[:, None], cache=cache, positions=position_at(cache.length),
                           attention_mask=mask[:, :cache.length + 1], backend=backend)[:, -1].float()
        steps.append({"t_start": t, "t_end": _clock(dev), "num_seqs": B, "num_active": active,
                      "num_tokens": B})
    end = _clock(dev)
    outs = []
    for s, done in zip(seqs, done_at):
        s.finish_reason = s.finish_reason or "length"
        s.scheduled_time, s.finish_time = t0, end            # answered when the batch ends
        m = RequestMetrics(s.arrival_time, t0, s.first_token_time, end, s.num_completion_tokens,
                           done or end)
        text = completion_text(tokenizer, s.output_token_ids, s.stop_reason, s.finish_reason,
                               s.sampling_params.include_stop_str_in_output, s.prompt_token_ids)
        outs.append(RequestOutput(s.request_id, None, s.prompt_token_ids,
                                  [CompletionOutput(0, text, s.output_token_ids, s.finish_reason,
                                                    s.stop_reason)], True, m))
    return outs, steps
