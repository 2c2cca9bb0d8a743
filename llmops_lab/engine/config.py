"""EngineConfig: the serving engine's knobs, with vLLM's names (``LLM(...)`` keyword arguments).

Frozen and validated on construction. What is derived at run time (how many KV blocks fit) lives in
the engine, never written back here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..checks import is_int, is_real


@dataclass(frozen=True)
class EngineConfig:
    block_size: int = 16                  # tokens per KV block
    max_num_seqs: int = 256               # sequences in the running batch at most
    max_num_batched_tokens: int = 8192    # tokens computed in one step at most (prefill chunks + decodes)
    gpu_memory_utilization: float = 0.9   # CUDA: share of the GPU's memory for weights, activations and KV
    kv_cache_memory_bytes: int | None = None  # the KV pool's size in bytes, instead of the rule above
    num_kv_blocks: int | None = None      # or the pool's size in blocks (tests, the notebook's slider)
    cpu_kv_cache_space_gib: float = 4.0   # CPU: the budget gpu_memory_utilization is a share of
    max_model_len: int | None = None      # default: the model's context
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    enforce_eager: bool = False           # CUDA: no graphs of decode steps (they are captured by default)
    prefill_graphs: bool = False          # CUDA: new whole prompts (up to 512 tokens a step) by captured graphs too (a candidate)
    # schedule and launch each step before the previous step's tokens reach the host, so the host's
    # work hides behind the GPU's (greedy n=1 requests; others run in lockstep): a candidate
    async_scheduling: bool = False
    # CUDA: the captured steps run each layer's elementwise ops as one Triton kernel each (norms,
    # rotary, SwiGLU's gate, the residual add beside the second norm): ``fused_ops``, a candidate
    fused_ops: bool = False
    cpu_paged_kernel: bool = True         # CPU: decode attention by the C kernel (paged.cpu_kernel) where it can
    seed: int = 0

    def __post_init__(self):
        def bad(msg):
            raise ValueError(f"EngineConfig: {msg}")
        # types first: a float block size or a string flag would fail later, or pass as something else
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens", "seed"):
            if not is_int(getattr(self, name)):
                bad(f"{name} must be an integer, got {getattr(self, name)!r}")
        for name in ("num_kv_blocks", "kv_cache_memory_bytes", "max_model_len"):
            if getattr(self, name) is not None and not is_int(getattr(self, name)):
                bad(f"{name} must be an integer or None, got {getattr(self, name)!r}")
        for name in ("gpu_memory_utilization", "cpu_kv_cache_space_gib"):
            if not is_real(getattr(self, name)) or not math.isfinite(getattr(self, name)):
                bad(f"{name} must be a finite number, got {getattr(self, name)!r}")
        for name in ("enable_prefix_caching", "enable_chunked_prefill", "enforce_eager", "prefill_graphs",
                     "async_scheduling", "fused_ops", "cpu_paged_kernel"):
            if not isinstance(getattr(self, name), bool):
                bad(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.cpu_kv_cache_space_gib <= 0:
            bad(f"cpu_kv_cache_space_gib must be > 0, got {self.cpu_kv_cache_space_gib}")
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            bad(f"block_size must be a power of two >= 1, got {self.block_size}")
        if self.max_num_seqs < 1:
            bad(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            bad(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        if not 0 < self.gpu_memory_utilization <= 1:
            bad(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            bad(f"num_kv_blocks must be >= 1, got {self.num_kv_blocks}")
        if self.kv_cache_memory_bytes is not None and self.kv_cache_memory_bytes < 1:
            bad(f"kv_cache_memory_bytes must be >= 1, got {self.kv_cache_memory_bytes}")
        if self.max_model_len is not None and self.max_model_len < 2:
            bad(f"max_model_len must be >= 2, got {self.max_model_len}")
        if not self.enable_chunked_prefill and self.max_model_len and self.max_num_batched_tokens < self.max_model_len:
            bad(f"without chunked prefill, max_num_batched_tokens ({self.max_num_batched_tokens}) must "
                f"hold a whole prompt of max_model_len ({self.max_model_len})")
