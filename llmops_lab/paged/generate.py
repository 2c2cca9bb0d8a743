"""Generation with the paged KV cache: prefill, then one token per step, through ``model(...)``.

The same loop as ``generation.generate`` with a ``PagedKVCache`` in place of the contiguous one,
so greedy output can be compared token for token. Before each forward the cache's sequences get
their tokens (the block manager allocates, finds prefix-cache hits, copies shared blocks); the
model then writes K/V into their slots and the ``paged_attention`` backend reads them back.
``n`` > 1 is parallel sampling: the prompt is computed once and forked, so its blocks are shared
and only a block a sample writes into is copied (copy-on-write).
"""
from __future__ import annotations

import torch

from ..checks import is_int
from ..engine import NoFreeBlocksError
from ..generation import check_sampling, sample
from . import triton_paged
from .attention import paged_attention
from .cache import PagedKVCache


@torch.inference_mode()
def paged_generate(model, input_ids: torch.Tensor, max_new_tokens: int = 32, block_size: int | None = None,
                   num_blocks: int | None = None, cache: PagedKVCache | None = None, n: int = 1,
                   temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                   generator: torch.Generator | None = None, attention: str | None = None) -> torch.Tensor:
    """Generate ``max_new_tokens`` after each row of input_ids [B, S] (no padding, no stop tokens).

    Args:
        cache: a pool to run in (its earlier sequences stay, so their full blocks are prefix-cache
            hits); default: a new one of ``num_blocks`` blocks of ``block_size`` tokens (16).
        n: samples per prompt (rows of the output are prompt 0's samples, then prompt 1's, ...).
        attention: "kernel" (Triton decode) or "gather" (PyTorch reference); default: the kernel
            where it runs (CUDA, or TRITON_INTERPRET=1).

    Returns:
        [B * n, S + max_new_tokens] token ids. The sequences stay in ``cache`` (``cache.release()``
        frees them), so their block tables can be inspected; they hold every token whose KV was
        computed, i.e. all but the last one sampled. When the pool runs out of blocks partway,
        ``NoFreeBlocksError`` says so and the sequences stay as they were before the refused step
        (consistent, inspectable; ``cache.release()`` frees them for the next call).
    """
    if torch.is_tensor(input_ids) and input_ids.dim() == 1:   # anything else: check_ids names it
        input_ids = input_ids[None]
    model.check_ids(input_ids)
    check_sampling(temperature, top_k, top_p)
    if not (is_int(max_new_tokens) and is_int(n)) or max_new_tokens < 1 or n < 1:
        raise ValueError(f"need integers max_new_tokens >= 1 and n >= 1, got {max_new_tokens!r}, {n!r}")
    B, S = input_ids.shape
    if S + max_new_tokens > model.config.max_position_embeddings:
        raise ValueError(f"{S} + {max_new_tokens} tokens exceed the model's context of "
                         f"{model.config.max_position_embeddings}")
    if attention not in (None, "kernel", "gather"):
        raise ValueError(f"attention must be 'kernel', 'gather' or None, got {attention!r}")
    if cache is None:
        cache = PagedKVCache.for_model(model, B * n, num_blocks, 16 if block_size is None else block_size)
    elif (block_size is not None and block_size != cache.block_size) or num_blocks is not None:
        raise ValueError(f"block_size and num_blocks describe a new pool; the cache given has its own "
                         f"({cache.block_size}-token blocks, {len(cache.block_manager.blocks)} of them)")
    else:
        cache.check_model(model)                  # before add_prompts: a misfit fails deep in the forward
    cache.attention = attention or ("kernel" if triton_paged.available(model.device) else "gather")
    start = cache.add_prompts(input_ids)          # all rows or none: nothing allocated when refused
    logits = model(input_ids[:, start:], cache=cache, backend=paged_attention, last_only=True)[:, -1]
    out = [input_ids]
    if n > 1:
        cache.fork(n)
        out, logits = [input_ids.repeat_interleave(n, 0)], logits.repeat_interleave(n, 0)
    for step in range(max_new_tokens):
        tok = sample(logits, temperature, top_k, top_p, generator)
        out.append(tok[:, None])
        if step == max_new_tokens - 1:
            break
        try:
            cache.append_tokens(tok)
        except NoFreeBlocksError as e:
            raise NoFreeBlocksError(f"{e} after {step + 1} new tokens; the batch's sequences stay in the "
                                    f"cache as they were (cache.release() frees them)") from None
        logits = model(tok[:, None], cache=cache, backend=paged_attention)[:, -1]
    return torch.cat(out, dim=1)
