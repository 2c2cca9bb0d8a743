"""Autoregressive generation with a KV cache: greedy, temperature, top-k and top-p sampling.

Prefill runs the whole prompt once and fills the cache; each decode step then feeds one token.
Top-p is Holtzman et al. 2019 (nucleus sampling). ``logits_to_probs`` is the one place logits
become a distribution, so speculative decoding can process target and draft identically.
"""
from __future__ import annotations

import math
import warnings

import torch

from .checks import is_int as _integer
from .checks import is_real as _real
from .kv import KVCache


def check_attention_mask(attention_mask, input_ids: torch.Tensor) -> None:
    """A prompt mask, if given, is input_ids' shape, of 0/1, left padding only (0s then 1s in each
    row) and at least one token a row: anything else gave other tokens without a word (a 2 doubled
    a row's positions, right padding put the new tokens after the pads, an empty row generated from
    nothing). Reads the mask once, on the host side of a generate call."""
    if attention_mask is None:
        return
    if not torch.is_tensor(attention_mask) or attention_mask.shape != input_ids.shape:
        # a [1, S] mask would broadcast over every row without a word
        raise ValueError(f"attention_mask must have input_ids' shape {tuple(input_ids.shape)}, got "
                         f"{tuple(attention_mask.shape) if torch.is_tensor(attention_mask) else type(attention_mask).__name__}")
    m = attention_mask.long()
    if not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
        raise ValueError("attention_mask must hold 0 (padding) and 1 (token) only")
    if not bool((m[:, 1:] >= m[:, :-1]).all()):
        raise ValueError("attention_mask must pad on the left (0s, then 1s, in each row): right padding "
                         "would put the new tokens after the pads; pad with tokenizer.padding_side = 'left'")
    if not bool(m[:, -1].all()):
        raise ValueError("every row of attention_mask needs at least one token (a 1)")


def as_stop_token_ids(stop_token_ids, vocab_size: int, default=()) -> tuple[int, ...]:
    """Stop tokens as a tuple of ids in the vocabulary: one integer (as transformers' eos_token_id
    takes it), an iterable of them, or None for ``default``. A float, a string or an id outside the
    vocabulary is a ValueError: such a stop would never match and the row would run to the end."""
    if stop_token_ids is None:
        return tuple(default)
    if _integer(stop_token_ids):
        stop_token_ids = (stop_token_ids,)
    if torch.is_tensor(stop_token_ids):
        stop_token_ids = stop_token_ids.reshape(-1).tolist()
    if isinstance(stop_token_ids, (str, bytes)) or not hasattr(stop_token_ids, "__iter__"):
        raise ValueError(f"stop_token_ids must be a token id or a sequence of them, got {stop_token_ids!r}")
    stops = tuple(stop_token_ids)
    bad = [t for t in stops if not _integer(t) or not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"stop_token_ids must be token ids in [0, {vocab_size}), got {bad[:3]}")
    return tuple(int(t) for t in stops)


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Refuse what would sample wrongly rather than fail: a NaN passes every comparison, and a NaN
    or infinite temperature turns the distribution into NaN."""
    if not _real(temperature) or not 0 <= temperature < math.inf:
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (not _integer(top_k) or top_k < 1):
        raise ValueError(f"top_k must be an integer >= 1 or None, got {top_k!r}")
    if top_p is not None and (not _real(top_p) or not 0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p!r}")


def logits_to_probs(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                    top_p: float | None = None) -> torch.Tensor:
    """Next-token distribution [..., V] after temperature, top-k and top-p (temperature > 0)."""
    check_sampling(temperature, top_k, top_p)
    if temperature == 0:
        raise ValueError("temperature 0 is greedy: take the argmax, there is no distribution to sample")
    return _probs(logits, temperature, top_k, top_p)


def _probs(logits, temperature, top_k, top_p):
    """``logits_to_probs`` on arguments already checked."""
    logits = logits.float()
    # the max taken off first (softmax does not change): a tiny temperature (1e-39) divided the
    # logits to inf and softmax gave NaN; now the largest is 0 and the others run to -inf at worst
    logits = (logits - logits.amax(-1, keepdim=True)) / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the tokens ranked above it already reach top_p (the first always stays).
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= top_p
        drop = drop_sorted.scatter(-1, idx, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits.softmax(-1)


def sample(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
           top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row from logits [B, V]; temperature 0 is argmax."""
    check_sampling(temperature, top_k, top_p)
    if temperature == 0:
        return logits.argmax(-1)
    probs = _probs(logits, temperature, top_k, top_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def generate(model, input_ids: torch.Tensor, max_new_tokens: int = 32, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, stop_token_ids=None,
             attention_mask: torch.Tensor | None = None, pad_token_id: int | None = None,
             generator: torch.Generator | None = None, backend=None) -> torch.Tensor:
    """Generate up to ``max_new_tokens`` after ``input_ids`` [B, S]; returns [B, S + n].

    Batches of different lengths are left-padded with an ``attention_mask`` as in transformers.
    A row stops at any of ``stop_token_ids`` (default: the config's eos ids; ``()`` for none) and
    is filled with ``pad_token_id`` afterwards; generation also stops at the model's context.
    """
    if not torch.is_tensor(input_ids) or input_ids.dtype.is_floating_point or input_ids.dtype in (torch.bool, torch.complex64):
        raise TypeError(f"input_ids must be an integer tensor of token ids, got "
                        f"{input_ids.dtype if torch.is_tensor(input_ids) else type(input_ids).__name__}")
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
        if torch.is_tensor(attention_mask) and attention_mask.dim() == 1:
            attention_mask = attention_mask[None]     # one prompt: its mask goes with it
    check_attention_mask(attention_mask, input_ids)
    model.check_ids(input_ids)
    check_sampling(temperature, top_k, top_p)
    if not _integer(max_new_tokens) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    stops = as_stop_token_ids(stop_token_ids, model.config.vocab_size, model.config.eos_token_ids)
    if pad_token_id is not None and (not _integer(pad_token_id) or not 0 <= pad_token_id < model.config.vocab_size):
        raise ValueError(f"pad_token_id must be a token id in [0, {model.config.vocab_size}), got {pad_token_id!r}")
    B, S = input_ids.shape
    ctx = model.config.max_position_embeddings
    # the last new token is sampled, never fed back: a prompt of the whole context still gets one
    # (as in transformers), and prompt + new tokens may reach the context plus one
    if S > ctx:
        raise ValueError(f"prompt of {S} tokens exceeds the model's context of {ctx}")
    if S + max_new_tokens - 1 > ctx:
        warnings.warn(f"generation truncated at the model's context: {ctx - S + 1} new tokens, not {max_new_tokens}")
        max_new_tokens = ctx - S + 1
    if pad_token_id is None:
        pad_token_id = stops[0] if stops else 0
    device = input_ids.device
    cache = KVCache.for_model(model, B, S + max_new_tokens - 1)
    mask = attention_mask.to(device) if attention_mask is not None else None

    out = [input_ids]
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    stop_t = torch.tensor(stops, device=device) if stops else None
    logits = model(input_ids, cache=cache, attention_mask=mask, backend=backend, last_only=True)[:, -1]
    for step in range(max_new_tokens):
        tok = sample(logits, temperature, top_k, top_p, generator)
        tok = torch.where(finished, torch.full_like(tok, pad_token_id), tok)
        out.append(tok[:, None])
        if stop_t is not None:
            finished |= torch.isin(tok, stop_t)
        if step == max_new_tokens - 1 or bool(finished.all()):
            break
        if mask is not None:
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        logits = model(tok[:, None], cache=cache, attention_mask=mask, backend=backend)[:, -1]
    return torch.cat(out, dim=1)
