"""Sliding-window and attention-sink KV caches: keep the recent tokens (and the first few).

A sliding window (Beltagy et al. 2020, Longformer; Jiang et al. 2023, Mistral 7B) keeps the last W
tokens, so the cache stops growing at W. StreamingLLM (Xiao et al. 2023, "Efficient Streaming
Language Models with Attention Sinks") found that dropping the very first tokens breaks the model:
they soak up attention ("attention sinks") whatever their content, so it keeps the first
``num_sinks`` tokens as well. Both are the same ring buffer here: ``num_sinks`` fixed slots, then
``window_size`` slots reused in turn.

Keys arrive after RoPE (the model rotates them before ``update``), so a kept key keeps the position
it was computed at and dropping others does not disturb it. StreamingLLM instead caches keys before
RoPE and renumbers positions inside the cache, which lets it run past the pretrained context; with
true positions we stay inside the model's context, which ``LlamaModel`` enforces.

Rows of a batch must have equal lengths (no ``attention_mask``): a padding mask covers every
position, and an evicting cache no longer holds them all.

The source document's ``SlidingWindowKVCache`` is kept as written in ``document_sliding_window_update``.
"""
from __future__ import annotations

import torch

from ..checks import is_int
from .cache import check_dims, check_new_kv, check_start


def document_sliding_window_update(key_states: torch.Tensor, value_states: torch.Tensor,
                                   window_size: int = 2048):
    """The document's ``SlidingWindowKVCache.update``, as written (its default W = 2048).

    ``if key_states.shape[-2] > window_size: key_states = key_states[..., -window_size:, :]``,
    the same for values. It keeps nothing between calls, so it is not a cache: handed one step's
    new key it returns that key alone (the token would attend only to itself), and handed the
    whole history it returns a view of the last W tokens while the caller still holds all of
    them (the view keeps the full storage alive, so no memory is freed). It has no layer index,
    and nothing records how many positions were seen, so RoPE positions cannot be kept right.
    """
    if key_states.shape[-2] > window_size:
        key_states = key_states[..., -window_size:, :]
        value_states = value_states[..., -window_size:, :]
    return key_states, value_states


class DocumentSlidingWindowCache:
    """The document's class plugged into the runtime the only way its ``update(k, v)`` allows.

    Each layer hands it the step's new keys and values and attends to what comes back. After the
    prompt, every decoded token sees only itself: what "a sliding window" becomes without storage.
    Kept to be measured, not used.
    """

    evicts = True

    def __init__(self, window_size: int = 2048):
        # the document's slice [..., -W:, :] keeps everything at W = 0 and drops the first 3 at W = -3
        if not is_int(window_size) or window_size < 1:
            raise ValueError(f"window_size must be an integer >= 1, got {window_size!r}")
        self.window_size = window_size
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, start):
        return document_sliding_window_update(k, v, self.window_size)

    def reset(self) -> None:
        self.length = 0

    @property
    def nbytes(self) -> int:
        return 0


def check_prefill_or_decode(start, S: int, length: int) -> None:
    """An evicting cache takes a prefill (start 0, any length) or one decode token, nothing else,
    each starting where the positions this layer has seen (``length``) end.

    A chunk of several tokens after the prompt would need a mask over the kept tokens that the
    model does not build (it masks by position, and positions are gone once tokens are evicted).
    A token written past ``length`` would leave unwritten slots that the next step attends to; one
    written before it would attend to tokens it should not see.
    """
    if torch.is_tensor(start):
        raise ValueError("this cache does not support the static-shape decode step (per-row start)")
    check_start(start)
    if start != length:
        raise ValueError(f"this cache has seen {length} positions, so the next write starts at {length}, "
                         f"got {start}" + (" (reset() to begin a new sequence)" if start == 0 else ""))
    if start != 0 and S != 1:
        raise ValueError(f"a compressing KV cache takes a prefill (start 0) or one token at a time; got "
                         f"{S} tokens at position {start} (chunked prefill is not supported)")


def check_budget(budget: int, context_len: int | None, what: str) -> None:
    if not is_int(budget) or budget < 1:
        raise ValueError(f"{what} must be >= 1, got {budget}")
    if context_len is not None and budget > context_len:
        raise ValueError(f"{what} of {budget} tokens exceeds the model's context of {context_len}")


def model_dims(model, dtype=None, device=None, evicts: bool = True) -> dict:
    """The cache dimensions of a model: layers, KV heads, head size, dtype, device, context.

    An evicting cache needs a model that attends to whatever the cache returns at a decode step;
    a model with its own sliding window (Mistral's ``sliding_window``) masks by position instead,
    which assumes every position is still cached.
    """
    c, p = model.config, next(model.parameters())
    if evicts and c.sliding_window is not None:
        raise ValueError(f"the model has its own sliding window ({c.sliding_window} tokens), whose mask assumes "
                         f"every position is cached; use KVCache (or a model config without sliding_window)")
    return dict(num_layers=c.num_hidden_layers, num_kv_heads=c.num_key_value_heads, head_dim=c.head_dim,
                dtype=dtype or p.dtype, device=device or p.device, context_len=c.max_position_embeddings)


class SinkKVCache:
    """The first ``num_sinks`` tokens and the last ``window_size`` tokens (StreamingLLM).

    Buffers are [B, Hkv, num_sinks + window_size, D] per layer: position p lives in slot p while
    p < num_sinks, and in slot num_sinks + (p - num_sinks) % window_size after, overwriting the
    token that leaves the window. Attention is order-free given RoPE'd keys, so the ring's order
    does not matter. A decoded token attends to exactly the tokens held (itself included), at most
    num_sinks + window_size; a prompt's queries are masked the same way (``prefill_mask``), so a
    long prompt prefilled at once sees what it would have seen streamed token by token.
    """

    evicts = True        # holds some positions only: a padding mask over all of them cannot apply

    def __init__(self, num_layers: int, batch_size: int, num_kv_heads: int, head_dim: int,
                 window_size: int, num_sinks: int = 4, dtype=torch.float32, device="cpu",
                 context_len: int | None = None):
        if not is_int(num_sinks) or num_sinks < 0:
            raise ValueError(f"num_sinks must be an integer >= 0, got {num_sinks!r}")
        check_budget(window_size, None, "window_size")
        check_budget(num_sinks + window_size, context_len, "num_sinks + window_size")
        check_dims(num_layers=num_layers, batch_size=batch_size, num_kv_heads=num_kv_heads, head_dim=head_dim)
        self.num_sinks, self.window_size = num_sinks, window_size
        self.capacity = num_sinks + window_size
        shape = (batch_size, num_kv_heads, self.capacity, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.batch_size = batch_size
        self.length = 0  # positions seen, not tokens held: RoPE positions keep counting
        self.written = [0] * num_layers  # positions each layer has stored: the next write starts there

    @classmethod
    def for_model(cls, model, batch_size: int, window_size: int, num_sinks: int = 4, dtype=None, device=None):
        return cls(batch_size=batch_size, window_size=window_size, num_sinks=num_sinks,
                   **model_dims(model, dtype, device))

    def slot(self, positions: torch.Tensor) -> torch.Tensor:
        """Ring slot of each position."""
        s = self.num_sinks
        return torch.where(positions < s, positions, s + (positions - s) % self.window_size)

    def kept_positions(self, end: int) -> torch.Tensor:
        """Positions held once ``end`` positions have been seen."""
        pos = torch.arange(end)
        return pos[(pos < self.num_sinks) | (pos >= end - self.window_size)]

    def prefill_mask(self, S: int, device=None) -> torch.Tensor | None:
        """Boolean [1, 1, S, S] mask (True = attend) for a prefill of S tokens, or None when plain
        causal attention is already right (S <= num_sinks + window_size: every query's reach holds
        the whole prompt so far).

        Query q sees key k <= q if k is a sink (k < num_sinks) or inside its window (k > q - W):
        exactly the tokens a decode step at position q would find held. ``LlamaModel.forward`` asks
        a cache for this mask, so a prompt prefilled in one pass gives the logits it would give fed
        one token at a time, whatever its length.
        """
        if S <= self.capacity:
            return None
        q = torch.arange(S, device=device)[:, None]
        k = torch.arange(S, device=device)[None, :]
        return ((k <= q) & ((k < self.num_sinks) | (k > q - self.window_size)))[None, None]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, start):
        """Store k, v [B, Hkv, S, D] for positions start..start+S; return what to attend to."""
        S = k.shape[2]
        check_new_kv(layer, self.k, k, v, self.batch_size)
        check_prefill_or_decode(start, S, self.written[layer])
        end = start + S
        self.written[layer] = end
        if S > 1:  # a prefill: store the prompt's kept tokens, attend to all of it (``prefill_mask`` windows)
            keep = self.kept_positions(end)
            slots, local = self.slot(keep).to(k.device), keep.to(k.device)
            self.k[layer][:, :, slots] = k[:, :, local]
            self.v[layer][:, :, slots] = v[:, :, local]
            return k, v
        slot = int(self.slot(torch.tensor(start)))       # a new token always stays: overwrite the oldest
        self.k[layer][:, :, slot] = k[:, :, 0]
        self.v[layer][:, :, slot] = v[:, :, 0]
        held = min(end, self.capacity)
        return self.k[layer][:, :, :held], self.v[layer][:, :, :held]

    def reset(self) -> None:
        self.length = 0
        self.written = [0] * len(self.k)

    @property
    def nbytes(self) -> int:
        """Bytes allocated for keys and values: fixed by num_sinks + window_size, not by length."""
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


class SlidingWindowKVCache(SinkKVCache):
    """The document's sliding window made a cache: the last ``window_size`` tokens, in a ring.

    The document's class only slices the tensors it is handed (``document_sliding_window_update``):
    it stores nothing, so it cannot be a cache. This one holds [B, Hkv, W, D] per layer and
    overwrites the oldest slot with each new token, so memory is bounded by W
    (``formulas.sliding_window_kv_tokens``). A decoded token at position p attends to positions
    p-W+1..p, as in Mistral's sliding-window attention.

    A prompt longer than W is windowed too (``prefill_mask``: query q sees q-W+1..q), as Mistral
    windows its prompt, so decoding through this cache is exactly Mistral's sliding-window attention
    at every prompt length (a test checks it against the runtime's Mistral model).
    """

    def __init__(self, num_layers: int, batch_size: int, num_kv_heads: int, head_dim: int,
                 window_size: int, dtype=torch.float32, device="cpu", context_len: int | None = None):
        super().__init__(num_layers, batch_size, num_kv_heads, head_dim, window_size, 0, dtype, device,
                         context_len)

    @classmethod
    def for_model(cls, model, batch_size: int, window_size: int, dtype=None, device=None):
        return cls(batch_size=batch_size, window_size=window_size, **model_dims(model, dtype, device))
