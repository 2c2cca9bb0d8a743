"""Decoding at the speed of memory: a static KV cache and a CUDA graph around the decode step.

At batch 1 a decode step reads every weight once and does little arithmetic, so its ceiling is
memory bandwidth / bytes per token (the decode roofline). In eager PyTorch the hundreds of small
kernel launches per step cost more than the reads on a fast GPU; capturing the step once in a CUDA
graph (as gpt-fast does with torch.compile's "reduce-overhead") replays them with one launch. That
needs static shapes: the cache is preallocated and the step attends over its whole buffer under a
mask (``LlamaModel.decode_step_static``). On a CPU the same code runs eagerly.

The graph still holds thousands of small kernels per token (norms, RoPE, SwiGLU: a few each per
layer). ``StaticDecoder(compile=True)`` compiles one decoder layer with torch.compile, which fuses
them, and every layer reuses that one graph (its cache tensors are arguments): on an H200 this took
the 7B decode from 0.45 to 0.60 of the bandwidth roofline (``data/bench/``).
"""
from __future__ import annotations

import torch

from .generation import check_attention_mask, check_sampling, sample
from .kv import KVCache
from .kv.cache import write_at


class _LayerCache:
    """One layer's static cache buffers k, v [B, Hkv, S_max, D] behind the ``KVCache.update``
    interface (the layer index it is given is ignored: these are that layer's tensors)."""

    def __init__(self, k, v):
        self.k, self.v = k, v

    def update(self, layer, k, v, start):
        return write_at(self.k, self.v, k, v, start)


def run_layer(layer, x, cos, sin, k, v, pos, mask, backend):
    """A decoder layer's static decode step on its own cache tensors (what gets compiled)."""
    return layer(x, cos, sin, _LayerCache(k, v), pos, mask, False, backend)


def compiled_layer():
    return torch.compile(run_layer, fullgraph=True, dynamic=False)


class StaticDecoder:
    """Runs ``model.decode_step_static`` on fixed buffers; on CUDA, as a captured CUDA graph."""

    def __init__(self, model, batch_size: int, max_seq_len: int, cuda_graph: bool | None = None,
                 compile: bool = False):
        ctx = model.config.max_position_embeddings
        for name, v, hi in (("batch_size", batch_size, None), ("max_seq_len", max_seq_len, ctx)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1 or (hi is not None and v > hi):
                raise ValueError(f"{name} must be an integer in 1..{hi or 'inf'}, got {v!r}")
        self.model = model
        self.length = 0         # tokens in the cache, counted on the host (reading pos would sync)
        # torch.compile fuses each layer's small elementwise kernels (norms, RoPE, SwiGLU, the
        # cache write); the matmuls stay cuBLAS. One layer is compiled, with its cache tensors as
        # arguments, so every layer reuses the one graph: seconds of compiling, not a minute.
        self._run_layer = compiled_layer() if compile else None
        dev = model.device
        self.cache = KVCache.for_model(model, batch_size, max_seq_len)
        self.tok = torch.zeros(batch_size, 1, dtype=torch.long, device=dev)
        self.pos = torch.zeros(batch_size, dtype=torch.long, device=dev)   # cache slot of the new token
        self.rope_pos = torch.zeros(batch_size, dtype=torch.long, device=dev)  # its RoPE position
        self.key_mask = torch.ones(batch_size, max_seq_len, dtype=torch.bool, device=dev)
        self.use_graph = dev.type == "cuda" if cuda_graph is None else cuda_graph
        self.graph = None
        self.logits = None

    def _step(self):
        return self.model.decode_step_static(self.tok, self.pos, self.cache, self.key_mask, self.rope_pos,
                                             run_layer=self._run_layer)

    def capture(self):
        """Capture the decode graph now, not at the first step: a caller that times its steps
        (static batching's baseline) keeps the warm-up and capture, 150-200 ms on a GPU, out of the
        run. Safe before ``prefill``: the warm-up steps write only slot 0, which the prompt
        overwrites. Nothing to do without a graph."""
        if self.use_graph and self.graph is None:
            self._capture()

    def _capture(self):
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):  # warm up outside the graph (allocator, cuBLAS handles)
            for _ in range(2):
                self._step()
        torch.cuda.current_stream().wait_stream(s)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._step()

    @torch.inference_mode()
    def prefill(self, input_ids, attention_mask=None):
        """Fill the cache with the prompt [B, S] the ordinary way; returns last-position logits."""
        B, S = input_ids.shape
        if B != self.cache.batch_size or S > self.cache.max_seq_len:
            raise ValueError(f"a prompt of {B} x {S} tokens does not fit this decoder's "
                             f"{self.cache.batch_size} x {self.cache.max_seq_len} cache")
        self.cache.reset()
        self.key_mask.fill_(True)
        if attention_mask is not None:
            self.key_mask[:, :S] = attention_mask.bool()
        logits = self.model(input_ids, cache=self.cache, attention_mask=attention_mask, last_only=True)
        self.pos.fill_(S)
        pads = (S - attention_mask.long().sum(-1)) if attention_mask is not None else 0
        self.rope_pos.copy_(self.pos - pads)
        self.length = S
        return logits[:, -1]

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row [B] at the current positions; returns next-token logits [B, V]."""
        if self.length >= self.cache.max_seq_len:
            raise ValueError(f"the decoder's cache of {self.cache.max_seq_len} tokens is full")
        self.tok.copy_(tokens[:, None])
        if self.use_graph:
            if self.graph is None:
                self._capture()
            self.graph.replay()
            out = self.logits
        else:
            out = self._step()
        self.pos += 1
        self.rope_pos += 1
        self.length += 1
        return out[:, -1]


def check_fixed_length(model, input_ids, max_new_tokens, temperature, top_k, top_p,
                       attention_mask=None) -> tuple[int, int]:
    """Arguments of a generation that runs every row ``max_new_tokens`` (no stop tokens): (B, S).
    The mask as ``generate`` takes it: right padding or a row of none gave other tokens silently."""
    model.check_ids(input_ids)
    check_attention_mask(attention_mask, input_ids)
    check_sampling(temperature, top_k, top_p)
    B, S = input_ids.shape
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int):
        raise ValueError(f"max_new_tokens must be an integer, got {max_new_tokens!r}")
    # the last new token is never fed back: the model sees S + max_new_tokens - 1 positions
    if max_new_tokens < 1 or S + max_new_tokens - 1 > model.config.max_position_embeddings:
        raise ValueError(f"need 1 <= max_new_tokens and prompt + new tokens - 1 <= context "
                         f"({S} + {max_new_tokens} - 1 > {model.config.max_position_embeddings})")
    return B, S


@torch.inference_mode()
def generate_static(model, input_ids, max_new_tokens: int = 32, temperature: float = 0.0,
                    top_k=None, top_p=None, attention_mask=None, generator=None,
                    cuda_graph: bool | None = None, decoder: StaticDecoder | None = None) -> torch.Tensor:
    """Like ``generation.generate`` without stop tokens (every row runs ``max_new_tokens``), on a
    static cache; pass a ``decoder`` to reuse its captured graph across calls of the same shape."""
    B, S = check_fixed_length(model, input_ids, max_new_tokens, temperature, top_k, top_p, attention_mask)
    dec = decoder or StaticDecoder(model, B, S + max_new_tokens - 1, cuda_graph)
    if dec.model is not model:      # it decodes with its own model's weights: another's tokens came back
        raise ValueError("the decoder was built for another model; build one with StaticDecoder(model, ...)")
    if dec.cache.batch_size != B or dec.cache.max_seq_len < S + max_new_tokens - 1:
        raise ValueError(f"the decoder holds {dec.cache.batch_size} rows of {dec.cache.max_seq_len} tokens; this "
                         f"generation needs {B} of {S + max_new_tokens - 1}")
    logits = dec.prefill(input_ids, attention_mask)
    out = [input_ids]
    for i in range(max_new_tokens):
        tok = sample(logits, temperature, top_k, top_p, generator)
        out.append(tok[:, None])
        if i < max_new_tokens - 1:
            logits = dec.step(tok)
    return torch.cat(out, 1)
