"""KV caches: the keys and values of past tokens, kept so decoding never recomputes them.

``KVCache`` keeps everything (contiguous, preallocated). The compressing caches plug into the
runtime the same way and keep less: ``SlidingWindowKVCache`` (recent tokens), ``SinkKVCache``
(StreamingLLM's attention sinks + recent tokens), ``HeavyHitterKVCache`` (H2O) and
``Int8KVCache`` (every token, in 8 bits). ``kv_cache_budget`` says how much fits on a GPU.
"""
from .cache import KVCache
from .calculator import GPU_MEMORY, KVBudget, concurrency_curve, kv_cache_budget
from .h2o import HeavyHitterKVCache
from .quantized import Int8KVCache, quantized_kv_cache_bytes
from .sliding_window import (DocumentSlidingWindowCache, SinkKVCache, SlidingWindowKVCache,
                             document_sliding_window_update)

__all__ = ["KVCache", "SlidingWindowKVCache", "SinkKVCache", "HeavyHitterKVCache", "Int8KVCache",
           "DocumentSlidingWindowCache", "document_sliding_window_update", "quantized_kv_cache_bytes",
           "KVBudget", "kv_cache_budget", "concurrency_curve", "GPU_MEMORY"]
