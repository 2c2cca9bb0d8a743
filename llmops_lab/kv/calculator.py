"""KV-memory calculator: how many tokens, blocks and sequences fit on a GPU.

vLLM (Kwon et al. 2023) sizes its KV cache at start-up: of the GPU's memory it takes the fraction
``gpu_memory_utilization``, subtracts the weights and the peak activation memory of a profiling
run, and cuts the rest into blocks of ``block_size`` tokens. It then logs "# GPU blocks", the "GPU
KV cache size" in tokens and the "Maximum concurrency for N tokens per request". This module
does that sum for any ``ModelConfig`` with the formulas of ``llmops_lab.formulas``; activation
memory is an input (``activation_bytes``), since here nothing is profiled.

With tensor parallelism over ``tensor_parallel_size`` GPUs (Megatron-LM's split, as vLLM runs a
70B model) each GPU holds 1/tp of the weights and the KV heads of its share of the attention heads:
Hkv/tp of them, or one (replicated) when there are fewer KV heads than GPUs. Every GPU caches every
token, for its own heads, so the figures are one GPU's: its blocks, and the tokens they hold.

A model with a sliding window (Mistral-7B's 4,096 tokens) attends only to its latest tokens, and
vLLM frees the blocks that leave the window: a sequence then holds about the window's blocks
however long it grows, and that is what the concurrency figures count.

Where this differs from what vLLM logs (the figures are vLLM's sum, not a measurement of it):

* **Memory left out, so the block counts are upper bounds.** vLLM subtracts the peak activations
  of its profiling run *and* the memory allocated outside PyTorch (the CUDA context, cuBLAS and NCCL
  workspaces: about 0.5 to 1+ GiB per GPU). Here ``activation_bytes`` and ``non_torch_bytes``
  default to 0: give them to come closer.
* **A sliding-window sequence also holds a prefill chunk.** vLLM v1 counts a sliding-window layer's
  blocks per request as cdiv(min(W - 1 + max_num_batched_tokens, max_model_len), block_size) + 1
  (``SlidingWindowSpec.max_memory_usage_bytes``: during chunked prefill the last W - 1 computed
  tokens stay beside the newly scheduled ones). Give ``max_num_batched_tokens`` (vLLM's default
  depends on its version and the GPU) for that count; without it a sequence holds the window's
  blocks alone (``formulas.window_blocks``), fewer, and the concurrency is an upper bound.

KV dtypes are named in ``KV_CACHE_DTYPES``: bytes per element, and bytes of the scale stored with
each cached vector. vLLM's fp8 cache keeps per-tensor scales (nothing per token); this package's
``Int8KVCache`` keeps one fp16 scale per token and KV head, which the int8 entry counts.
"""
from __future__ import annotations

from dataclasses import dataclass

from .. import formulas
from ..config import ModelConfig
from .quantized import SCALE_BYTES, quantized_vector_bytes

# Total memory of common GPUs in bytes, as nvidia-smi reports it (MiB): not the name's "80GB" (an
# H100 80GB has 81,559 MiB, 79.6 GiB). CUDA's own total, which vLLM reads (torch.cuda.mem_get_info),
# is a few hundred MiB less again; give the exact bytes (the CLI's --gpu-memory-gib) where it matters.
GPU_MEMORY = {"H100 80GB": 81559 * 2**20, "H200 141GB": 143771 * 2**20, "A100 80GB": 81920 * 2**20,
              "A100 40GB": 40960 * 2**20, "L4 24GB": 23034 * 2**20, "RTX 4090 24GB": 24564 * 2**20}

# KV cache dtypes: bytes per cached element, and bytes of the scale stored with each cached key or
# value vector (one token, one KV head). fp8 as vLLM's kv_cache_dtype="fp8" (per-tensor scales:
# nothing per token); int8 as this package's Int8KVCache (an fp16 scale per vector:
# 1 + 2 / head_dim bytes per element, ``quantized.quantized_vector_bytes``).
KV_CACHE_DTYPES = {"fp32": dict(dtype_bytes=4, scale_bytes=0), "fp16": dict(dtype_bytes=2, scale_bytes=0),
                   "bf16": dict(dtype_bytes=2, scale_bytes=0), "fp8": dict(dtype_bytes=1, scale_bytes=0),
                   "int8": dict(dtype_bytes=1, scale_bytes=SCALE_BYTES)}


@dataclass(frozen=True)
class KVBudget:
    """The result of ``kv_cache_budget``: bytes in, tokens, blocks and sequences out."""

    model: str
    gpu_memory_bytes: float
    gpu_memory_utilization: float
    weight_bytes: float
    activation_bytes: float
    kv_bytes_available: float     # gpu x utilization - weights - activations - non-torch memory
    bytes_per_token: float        # 2 x L x n_kv_heads x (d_head x sizeof(dtype) + scale_bytes)
    block_size: int
    num_gpu_blocks: int           # whole blocks that fit (on each GPU)
    max_model_len: int
    tensor_parallel_size: int = 1  # weights, activations and KV bytes above are one GPU's
    sliding_window: int | None = None  # attention sees only this many latest tokens (Mistral)
    non_torch_bytes: float = 0      # CUDA context and other memory outside PyTorch (one GPU's)
    scale_bytes: float = 0          # the scale stored with each cached vector (int8: Int8KVCache's fp16)
    max_num_batched_tokens: int | None = None  # vLLM's prefill chunk, held beside a sliding window

    @property
    def bytes_per_block(self) -> float:
        return self.bytes_per_token * self.block_size

    @property
    def num_tokens(self) -> int:
        """Token slots in the whole blocks: vLLM's "GPU KV cache size"."""
        return self.num_gpu_blocks * self.block_size

    @property
    def blocks_per_sequence(self) -> int:
        """Blocks one sequence of ``max_model_len`` tokens holds: ceil(max_model_len / block_size).

        With a sliding window, and ``max_num_batched_tokens`` given, vLLM v1's count
        (``sliding_window_blocks``: the window, a prefill chunk, and the block the window may
        straddle). Without it, the window's blocks plus the one it may straddle, at most the full
        count (``formulas.window_blocks``): the chunk is left out, so this is a lower bound on
        vLLM's blocks per sequence and ``max_concurrency`` an upper bound."""
        if self.sliding_window is not None and self.max_num_batched_tokens is not None:
            return sliding_window_blocks(self.max_model_len, self.block_size, self.sliding_window,
                                         self.max_num_batched_tokens)
        return formulas.window_blocks(self.max_model_len, self.block_size, self.sliding_window)

    @property
    def max_concurrency(self) -> float:
        """Sequences of ``max_model_len`` tokens that fit at once, fractional, as vLLM logs it."""
        return self.num_gpu_blocks / self.blocks_per_sequence

    @property
    def max_num_seqs(self) -> int:
        """Whole sequences of ``max_model_len`` tokens that fit at once."""
        return self.num_gpu_blocks // self.blocks_per_sequence

    def log_line(self) -> str:
        """vLLM's start-up lines, with these numbers: upper bounds on what vLLM logs unless its
        activations, non-torch memory and (with a sliding window) ``max_num_batched_tokens`` were
        given (see the module's docstring)."""
        return (f"# GPU blocks: {self.num_gpu_blocks:,}; GPU KV cache size: {self.num_tokens:,} tokens; "
                f"Maximum concurrency for {self.max_model_len:,} tokens per request: {self.max_concurrency:.2f}x")


def default_weight_bits(dtype_bytes: float) -> float:
    """Bits per weight beside a KV cache of ``dtype_bytes`` per element: the model's own bf16/fp16,
    or fp32 beside an fp32 cache. An fp8 or int8 KV cache (vLLM's ``kv_cache_dtype``) leaves the
    weights as they were: sizing them by it would count half their memory as free."""
    return 8 * max(dtype_bytes, 2)


def kv_cache_budget(config: ModelConfig | str, gpu_memory_bytes: float, gpu_memory_utilization: float = 0.9,
                    dtype_bytes: float = 2, block_size: int = 16, weight_bytes: float | None = None,
                    activation_bytes: float = 0, max_model_len: int | None = None,
                    tensor_parallel_size: int = 1, scale_bytes: float = 0, non_torch_bytes: float = 0,
                    max_num_batched_tokens: int | None = None) -> KVBudget:
    """What fits in a GPU's KV cache.

    Args:
        config: a ``ModelConfig`` or a preset name (``llmops_lab.presets``).
        gpu_memory_bytes: the GPU's total memory, in bytes.
        gpu_memory_utilization: the fraction of it the engine may use (vLLM's default 0.9).
        dtype_bytes: bytes per cached element (2 for fp16/bf16, 1 for an fp8 or int8 KV cache).
        scale_bytes: bytes of the scale stored with each cached key or value vector (one token, one
            KV head): 0 for fp16/bf16 and vLLM's fp8 (per-tensor scales), 2 for int8 as ``Int8KVCache``
            stores it (``KV_CACHE_DTYPES`` names both; ``quantized.quantized_vector_bytes``).
        block_size: tokens per KV block.
        weight_bytes: memory of the weights; default ``config.num_parameters() x max(dtype_bytes, 2)``:
            the model's own bf16/fp16 (fp32 beside an fp32 cache), since an fp8 or int8 KV cache
            (vLLM's ``kv_cache_dtype``) does not shrink the weights.
        activation_bytes: peak activation memory of a forward pass (vLLM profiles it; default 0).
        non_torch_bytes: memory allocated outside PyTorch on each GPU (CUDA context, cuBLAS and NCCL
            workspaces; vLLM measures it at start-up, about 0.5 to 1+ GiB); default 0. With both at
            0 the block counts are upper bounds on vLLM's.
        max_model_len: the per-request length for the concurrency figure, 1 to the model's context
            (``config.max_position_embeddings``); default the model's context.
        tensor_parallel_size: GPUs the model is split over (``gpu_memory_bytes`` and
            ``activation_bytes`` are each GPU's; ``weight_bytes`` the whole model's). The KV heads
            must split evenly over them, or the GPUs evenly over the KV heads (``kv_heads_per_gpu``).
        max_num_batched_tokens: vLLM's scheduler budget per step; only a sliding-window model uses
            it, for the prefill chunk its sequences hold (``KVBudget.blocks_per_sequence``). None
            leaves the chunk out.

    Returns:
        KVBudget. Raises ValueError when the weights, activations and non-torch memory leave no room
        for one block, and TypeError or ValueError for a bad argument (NaN and inf included).
    """
    if isinstance(config, str):
        from ..presets import get_preset
        config = get_preset(config)
    formulas._check_config(config)
    formulas._positive(gpu_memory_bytes=gpu_memory_bytes, dtype_bytes=dtype_bytes)
    formulas._finite(gpu_memory_utilization=gpu_memory_utilization)
    if not 0 < gpu_memory_utilization <= 1:
        raise ValueError(f"gpu_memory_utilization must lie in (0, 1], got {gpu_memory_utilization}")
    formulas._positive_int(block_size=block_size)
    formulas._nonneg(activation_bytes=activation_bytes, non_torch_bytes=non_torch_bytes, scale_bytes=scale_bytes)
    formulas._positive_int(tensor_parallel_size=tensor_parallel_size)
    if max_num_batched_tokens is not None:
        formulas._positive_int(max_num_batched_tokens=max_num_batched_tokens)
    if weight_bytes is None:
        weight_bytes = formulas.weight_bytes(config, default_weight_bits(dtype_bytes))
    formulas._nonneg(weight_bytes=weight_bytes)
    max_model_len = _check_max_model_len(config, max_model_len)
    tp = int(tensor_parallel_size)          # a numpy integer too
    weight_bytes = weight_bytes / tp
    available = gpu_memory_bytes * gpu_memory_utilization - weight_bytes - activation_bytes - non_torch_bytes
    # 2 x L x Hkv vectors per token (Hkv of this GPU's shard), each D elements and its scale
    per_token = formulas.kv_cache_bytes(config.num_hidden_layers, kv_heads_per_gpu(config, tp), 1, 1,
                                        quantized_vector_bytes(config.head_dim, dtype_bytes, scale_bytes))
    blocks = int(max(available, 0) // (per_token * block_size))
    if blocks < 1:
        usable = formulas.to_gib(gpu_memory_bytes * gpu_memory_utilization)
        gpus = f" per GPU at tensor_parallel_size {tp}" if tp > 1 else ""
        raise ValueError(f"no room for the KV cache: {usable:.2f} GiB usable{gpus}, "
                         f"{formulas.to_gib(weight_bytes + activation_bytes + non_torch_bytes):.2f} GiB of "
                         f"weights, activations and non-torch memory; one block needs "
                         f"{per_token * block_size:,.0f} bytes more"
                         + ("" if tp > 1 or weight_bytes < gpu_memory_bytes * gpu_memory_utilization
                            else " (a model this size is split over GPUs: tensor_parallel_size, "
                                 "-tp on the command line)"))
    return KVBudget(model=config.name, gpu_memory_bytes=gpu_memory_bytes,
                    gpu_memory_utilization=gpu_memory_utilization, weight_bytes=weight_bytes,
                    activation_bytes=activation_bytes, kv_bytes_available=available,
                    bytes_per_token=per_token, block_size=block_size, num_gpu_blocks=blocks,
                    max_model_len=max_model_len, tensor_parallel_size=tp, sliding_window=config.sliding_window,
                    non_torch_bytes=non_torch_bytes, scale_bytes=scale_bytes,
                    max_num_batched_tokens=max_num_batched_tokens)


def sliding_window_blocks(max_model_len: int, block_size: int, window: int, max_num_batched_tokens: int) -> int:
    """Blocks vLLM v1 counts per request of a sliding-window layer for its concurrency figure
    (``SlidingWindowSpec.max_memory_usage_bytes`` over the page size):
    cdiv(min(window - 1 + max_num_batched_tokens, max_model_len), block_size) + 1.

    During chunked prefill it holds the last window - 1 computed tokens plus the newly scheduled
    ones (up to ``max_num_batched_tokens``), never more than ``max_model_len``; the + 1 is the
    block the window's unaligned start may straddle. Unlike ``formulas.window_blocks`` it is not
    capped at the full count: vLLM's own sum is not."""
    formulas._positive_int(max_model_len=max_model_len, block_size=block_size, window=window,
                           max_num_batched_tokens=max_num_batched_tokens)
    return formulas.num_blocks(min(window - 1 + max_num_batched_tokens, max_model_len), block_size) + 1


def kv_heads_per_gpu(config: ModelConfig, tensor_parallel_size: int) -> int:
    """KV heads each GPU caches under tensor parallelism: Hkv / tp, or 1 (each replicated) when
    tp is a multiple of Hkv. Query heads must split evenly too; anything else is refused."""
    formulas._positive_int(tensor_parallel_size=tensor_parallel_size)
    tp, hkv, h = int(tensor_parallel_size), config.num_key_value_heads, config.num_attention_heads
    if h % tp:
        raise ValueError(f"{h} attention heads do not split over tensor_parallel_size {tp}")
    if hkv % tp == 0:
        return hkv // tp
    if tp % hkv == 0:
        return 1
    raise ValueError(f"{hkv} KV heads do not split over tensor_parallel_size {tp}, nor {tp} over {hkv}")


def _check_max_model_len(config: ModelConfig, max_model_len: int | None) -> int:
    """max_model_len, or the model's context when None; refused below 1 or beyond the context."""
    context = config.max_position_embeddings
    if max_model_len is None:
        return context
    formulas._positive_int(max_model_len=max_model_len)
    if max_model_len > context:
        raise ValueError(f"max_model_len ({max_model_len}) is larger than the model's context "
                         f"(config.max_position_embeddings = {context})")
    return max_model_len


def concurrency_curve(config: ModelConfig | str, max_model_lens, **kwargs) -> list[float]:
    """``max_concurrency`` of ``kv_cache_budget`` at each max_model_len (the widget's curve)."""
    return [kv_cache_budget(config, max_model_len=n, **kwargs).max_concurrency for n in max_model_lens]
