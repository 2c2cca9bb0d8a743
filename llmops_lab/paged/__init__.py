"""PagedAttention (Kwon et al. 2023, vLLM): the KV cache in fixed-size blocks, read through block tables.

``PagedKVCache`` plugs into the runtime like ``KVCache``; ``paged_generate`` is greedy/sampled
generation with it; ``paged_decode`` and ``paged_prefill`` run the Triton kernels
(``triton_paged``, ``triton_prefill``) where they can (decode on a CPU: the C kernel of
``cpu_kernel``) and their gather-then-attend PyTorch twins (``*_reference``) elsewhere; ``simulate`` replays request-length mixes through the block manager
to measure reserved and wasted KV memory.
"""
from .attention import (PagedView, gather_kv, paged_attention, paged_decode, paged_decode_reference,
                        paged_prefill, paged_prefill_reference, store_kv)
from .cache import PagedKVCache
from .generate import paged_generate

__all__ = ["PagedKVCache", "PagedView", "gather_kv", "paged_attention", "paged_decode",
           "paged_decode_reference", "paged_generate", "paged_prefill", "paged_prefill_reference",
           "store_kv"]
