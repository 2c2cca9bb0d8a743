"""The decode roofline: how fast decoding can possibly be on this machine, and how fast it is.

Williams et al. 2009 (the roofline model). A decode step at batch B reads every weight once and
each sequence's KV cache, and does about 2 x parameters FLOPs per token, so

    tokens/s <= min(B x bandwidth / bytes per step,  peak FLOP/s / (2 x parameters)).

The bound's inputs are measured here (copy bandwidth, GEMM FLOP/s), then set against measured
decode throughput; the formulas live in ``formulas``.
"""
from __future__ import annotations

import torch

from . import formulas, measure
from .checks import is_int


def copy_bandwidth(device="cpu", nbytes: int = 1 << 28) -> float:
    """Bytes/s of a large device-local copy, reads plus writes counted."""
    if not is_int(nbytes) or nbytes < 4 or nbytes % 4:
        # the copy moves float32 elements: 3 bytes copied nothing and reported a rate
        raise ValueError(f"nbytes must be a positive multiple of 4, got {nbytes!r}")
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    t = measure.time_fn(dst.copy_, src, warmup=3, repeats=20, device=device)
    return 2 * nbytes / t.median


def matmul_flops_per_s(device="cpu", n: int = 1024, dtype=torch.float32) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = measure.time_fn(torch.matmul, a, b, warmup=2, repeats=10, device=device)
    return formulas.matmul_flops(n, n, n) / t.median


def weight_bytes_read(model) -> int:
    """Bytes of weights one decode step reads: all of them, except that the embedding table
    contributes one row per token (when it is not tied to the LM head)."""
    weights = measure.module_bytes(model, include_buffers=False)
    if not model.config.tie_word_embeddings:
        emb = model.model.embed_tokens.weight
        weights -= emb.numel() * emb.element_size()
    return weights


def bytes_per_step(model, batch_size: int, context_len: int) -> int:
    c = model.config
    kv = formulas.kv_cache_bytes(c.num_hidden_layers, c.num_key_value_heads, c.head_dim, context_len,
                                 model.dtype.itemsize, batch_size)
    return formulas.decode_bytes_per_token(weight_bytes_read(model), 1, kv)


def decode_bound(model, batch_size: int, context_len: int, bandwidth: float, flops: float | None = None) -> float:
    """Tokens/s ceiling at this batch size: memory-bound, and compute-bound when ``flops`` is given.

    batch_size: sequences decoded together (>= 1). context_len: tokens in each sequence's KV cache.
    bandwidth: bytes/s. flops: FLOP/s.
    """
    formulas._positive_int(batch_size=batch_size)
    formulas._nonneg_int(context_len=context_len)
    if flops is not None:
        formulas._positive(flops=flops)
    bound = formulas.decode_tokens_per_s_bound(bandwidth, bytes_per_step(model, batch_size, context_len), batch_size)
    if flops is not None:
        n_params = sum(p.numel() for p in model.parameters())
        bound = min(bound, flops / (2 * n_params))
    return bound


def decode_throughput(model, batch_size: int = 1, prompt_len: int = 16, new_tokens: int = 32,
                      repeats: int = 3, static: bool = False) -> measure.Timing:
    """Measured seconds per decode step (prefill excluded: the time of ``new_tokens`` generated
    minus the time of one, over new_tokens - 1) for a random prompt batch; tokens/s is
    ``batch_size / timing.median``. One sample per repeat: the two runs of that round's pair."""
    formulas._positive_int(batch_size=batch_size, prompt_len=prompt_len)
    formulas._integer("new_tokens", new_tokens, 2)  # the time of 1 token is taken off the time of new_tokens
    ctx = model.config.max_position_embeddings
    if prompt_len + new_tokens > ctx:  # generation would stop early and the per-step time would be wrong
        raise ValueError(f"prompt_len {prompt_len} + new_tokens {new_tokens} exceeds the model's context of {ctx}")
    from .fast_decode import generate_static
    g = torch.Generator(device=model.device).manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (batch_size, prompt_len), device=model.device, generator=g)
    if static:
        run = lambda n: generate_static(model, ids, n)
    else:
        run = lambda n: model.generate(ids, max_new_tokens=n, stop_token_ids=())
    # The two runs are timed in alternation and subtracted round by round (sample i of each comes
    # from round i), so the prefill is taken off at the speed the machine had in that round. Timed
    # one after the other, the two runs sat at different points of the machine's drift (10-30% on
    # a shared machine), and the change in speed between them was read as decode time.
    times = measure.time_interleaved({"full": lambda: run(new_tokens), "first": lambda: run(1)},
                                     warmup=1, repeats=repeats, device=model.device)
    per_step = [(f - o) / (new_tokens - 1) for f, o in zip(times["full"].samples, times["first"].samples)]
    return measure.Timing(per_step)


def config_decode_bound(config, batch_size: int, context_len: int, bandwidth: float,
                        dtype_bytes: float = 2) -> float:
    """The same memory-bound ceiling from a shape alone (a preset; no weights needed).

    A model with a sliding window (Mistral's ``sliding_window``) holds and reads at most that many
    tokens of KV per sequence (``formulas.sliding_window_kv_tokens``), however long the context.
    """
    formulas._positive_int(batch_size=batch_size)
    formulas._nonneg_int(context_len=context_len)
    weights = config.num_parameters() * dtype_bytes
    if not config.tie_word_embeddings:
        weights -= config.vocab_size * config.hidden_size * dtype_bytes  # one embedding row is read
    held = (context_len if config.sliding_window is None
            else formulas.sliding_window_kv_tokens(context_len, config.sliding_window))
    kv = formulas.kv_cache_bytes_for(config, held, batch_size, dtype_bytes)
    return formulas.decode_tokens_per_s_bound(bandwidth, weights + kv, batch_size)


# Published peak memory bandwidths (bytes/s), for the widget's "what would a GPU do" choice.
GPU_BANDWIDTH = {"H100 SXM (3.35 TB/s)": 3.35e12, "H200 (4.8 TB/s)": 4.8e12, "A100 80GB (2.0 TB/s)": 2.04e12,
                 "RTX 4090 (1.0 TB/s)": 1.01e12}
