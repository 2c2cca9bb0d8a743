"""The KV-memory calculator against numbers worked by hand."""
import numpy as np
import pytest

from llmops_lab.config import ModelConfig
from llmops_lab.kv import kv_cache_budget
from llmops_lab.kv.calculator import concurrency_curve
from llmops_lab.presets import get_preset

SMALL = ModelConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
                    num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64, name="small")


def test_small_model_by_hand():
    # 2 x L 2 x Hkv 2 x D 4 x 2 bytes = 64 bytes/token; 10000 x 0.5 - 1000 = 4000 bytes; 4000 // 256 = 15 blocks.
    b = kv_cache_budget(SMALL, 10_000, 0.5, dtype_bytes=2, block_size=4, weight_bytes=1000, max_model_len=10)
    assert b.bytes_per_token == 64 and b.bytes_per_block == 256
    assert b.kv_bytes_available == 4000 and b.num_gpu_blocks == 15 and b.num_tokens == 60
    assert b.blocks_per_sequence == 3 and b.max_concurrency == 5.0 and b.max_num_seqs == 5
    assert "# GPU blocks: 15" in b.log_line() and "5.00x" in b.log_line()


def test_activations_and_partial_blocks():
    # 4000 - 300 = 3700 bytes -> 14 blocks (3584 bytes), 56 tokens; a 64-token request needs 16 blocks.
    b = kv_cache_budget(SMALL, 10_000, 0.5, block_size=4, weight_bytes=1000, activation_bytes=300)
    assert b.num_gpu_blocks == 14 and b.num_tokens == 56
    assert b.max_model_len == 64 and b.blocks_per_sequence == 16
    assert b.max_concurrency == 14 / 16 and b.max_num_seqs == 0


def test_llama_2_7b_on_an_80_gib_gpu():
    # Weights: 6,738,415,616 parameters x 2 bytes = 13,476,831,232 bytes (default from the config).
    # 80 GiB x 0.9 = 77,309,411,328; minus weights = 63,832,580,096 bytes for the KV cache.
    # A token: 2 x 32 x 32 x 128 x 2 = 524,288 bytes; a 16-token block 8,388,608 bytes -> 7,609 blocks.
    b = kv_cache_budget("llama-2-7b", 80 * 2**30, 0.9, dtype_bytes=2, block_size=16)
    assert b.weight_bytes == 13_476_831_232
    assert b.kv_bytes_available == pytest.approx(63_832_580_096)
    assert b.bytes_per_token == 524_288 and b.num_gpu_blocks == 7_609 and b.num_tokens == 121_744
    # 4096 tokens = 256 blocks per request: 7609 / 256 = 29.72x.
    assert b.max_concurrency == pytest.approx(29.72, abs=5e-3) and b.max_num_seqs == 29


def test_grouped_query_attention_fits_more():
    # Llama-2-70B with 8 KV heads against the document's 64: 8x fewer bytes per token, so with the same
    # weights and memory 8x more blocks (to within a block's rounding).
    kw = dict(gpu_memory_bytes=4 * 80 * 2**30, weight_bytes=140e9, block_size=16)
    gqa, mha = kv_cache_budget("llama-2-70b", **kw), kv_cache_budget("doc-70b-as-written", **kw)
    assert mha.bytes_per_token == 8 * gqa.bytes_per_token
    assert mha.num_gpu_blocks * 8 <= gqa.num_gpu_blocks < (mha.num_gpu_blocks + 1) * 8


def test_a_sliding_window_bounds_the_blocks_a_sequence_holds():
    # Mistral-7B: a 4,096-token window in a 32,768-token context. The newest query sees its last
    # 4,096 tokens; blocks wholly before them are freed, so a sequence holds 4096/16 = 256 blocks
    # plus the one the window's unaligned start straddles: 257, not 2,048.
    from llmops_lab import formulas
    b = kv_cache_budget("mistral-7b", 80 * 2**30, 0.9)
    assert b.sliding_window == 4096 and b.blocks_per_sequence == 257
    assert b.max_concurrency == b.num_gpu_blocks / 257 and b.max_num_seqs == b.num_gpu_blocks // 257
    assert kv_cache_budget("mistral-7b", 80 * 2**30, 0.9, max_model_len=4000).blocks_per_sequence == 250
    assert formulas.window_blocks(100, 16, None) == formulas.num_blocks(100, 16) == 7
    assert formulas.window_blocks(100, 16, 32) == 3 and formulas.window_blocks(20, 16, 32) == 2
    with pytest.raises(ValueError, match="window"):
        formulas.window_blocks(100, 16, 0)
    assert kv_cache_budget("llama-2-7b", 80 * 2**30, 0.9).sliding_window is None


def test_concurrency_falls_with_request_length():
    curve = concurrency_curve(SMALL, [4, 8, 16], gpu_memory_bytes=10_000, gpu_memory_utilization=0.5,
                              block_size=4, weight_bytes=1000)
    assert curve == [15.0, 7.5, 3.75]


@pytest.mark.parametrize("kwargs, match", [
    (dict(gpu_memory_utilization=0.0), "gpu_memory_utilization"),
    (dict(gpu_memory_utilization=1.5), "gpu_memory_utilization"),
    (dict(block_size=0), "block_size"),
    (dict(block_size=2.5), "block_size"),
    (dict(weight_bytes=4900), "no room"),
    (dict(gpu_memory_bytes=-1), "gpu_memory_bytes"),
    (dict(gpu_memory_bytes=float("nan")), "gpu_memory_bytes must be finite, got nan"),
    (dict(gpu_memory_bytes=float("inf")), "gpu_memory_bytes must be finite, got inf"),
    (dict(gpu_memory_utilization=float("nan")), "gpu_memory_utilization must be finite, got nan"),
    (dict(dtype_bytes=float("nan")), "dtype_bytes must be finite, got nan"),
    (dict(dtype_bytes=0), "dtype_bytes must be > 0, got 0"),
    (dict(activation_bytes=float("nan")), "activation_bytes must be finite, got nan"),
    (dict(activation_bytes=-1), "activation_bytes must be >= 0, got -1"),
    (dict(weight_bytes=float("nan")), "weight_bytes must be finite, got nan"),
    (dict(weight_bytes=-1e12), "weight_bytes must be >= 0"),
    (dict(weight_bytes=None, dtype_bytes=float("inf")), "dtype_bytes must be finite, got inf"),
    (dict(max_model_len=0), "max_model_len must be >= 1, got 0"),
    (dict(max_model_len=-5), "max_model_len must be >= 1, got -5"),
    (dict(max_model_len=2.5), "max_model_len must be an integer, got 2.5"),
    (dict(max_model_len=65), r"max_model_len \(65\) is larger than the model's context.* = 64"),
])
def test_bad_input(kwargs, match):
    args = dict(gpu_memory_bytes=10_000, gpu_memory_utilization=0.5, block_size=4, weight_bytes=1000)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        kv_cache_budget(SMALL, **args)


@pytest.mark.parametrize("kwargs, match", [
    (dict(gpu_memory_bytes="80GB"), "gpu_memory_bytes must be a real number, got '80GB'"),
    (dict(gpu_memory_utilization=None), "gpu_memory_utilization must be a real number, got None"),
    (dict(block_size="16"), "block_size must be an integer, got '16'"),
    (dict(max_model_len="4096"), "max_model_len must be an integer, got '4096'"),
    (dict(weight_bytes="1000"), "weight_bytes must be a real number"),
])
def test_bad_input_type(kwargs, match):
    args = dict(gpu_memory_bytes=10_000, gpu_memory_utilization=0.5, block_size=4, weight_bytes=1000)
    args.update(kwargs)
    with pytest.raises(TypeError, match=match):
        kv_cache_budget(SMALL, **args)


def test_max_model_len_bounds_and_numpy_numbers():
    kw = dict(gpu_memory_bytes=10_000, gpu_memory_utilization=0.5, block_size=4, weight_bytes=1000)
    assert kv_cache_budget(SMALL, max_model_len=64, **kw).max_model_len == 64       # the whole context
    assert kv_cache_budget(SMALL, max_model_len=None, **kw).max_model_len == 64
    assert kv_cache_budget(SMALL, max_model_len=1, **kw).blocks_per_sequence == 1
    b = kv_cache_budget(SMALL, np.float64(10_000), block_size=np.int64(4), weight_bytes=np.int64(1000),
                        gpu_memory_utilization=0.5, max_model_len=np.int64(10))
    assert b.num_gpu_blocks == 15 and b.max_concurrency == 5.0
    with pytest.raises(ValueError, match="4097.*4096"):
        kv_cache_budget("llama-2-7b", 80 * 2**30, max_model_len=4097)


@pytest.mark.parametrize("lengths, match", [
    ([4, 0], "max_model_len must be >= 1, got 0"),
    ([4, 100], r"max_model_len \(100\) is larger than the model's context"),
])
def test_concurrency_curve_rejects_bad_lengths(lengths, match):
    with pytest.raises(ValueError, match=match):
        concurrency_curve(SMALL, lengths, gpu_memory_bytes=10_000, gpu_memory_utilization=0.5,
                          block_size=4, weight_bytes=1000)


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset"):
        kv_cache_budget("llama-9-1t", 80 * 2**30)


def test_tensor_parallel_splits_weights_and_kv_heads():
    """Per GPU: 1/tp of the weights, Hkv/tp KV heads (one, replicated, when tp > Hkv)."""
    from llmops_lab.kv.calculator import kv_heads_per_gpu
    from llmops_lab.presets import get_preset
    c = get_preset("llama-2-70b")                             # 64 query heads, 8 KV heads
    one = kv_cache_budget(c, 10 * 2**40, 0.9)                 # an imaginary 10 TiB GPU
    four = kv_cache_budget(c, 80 * 2**30, 0.9, tensor_parallel_size=4)
    assert four.weight_bytes == one.weight_bytes / 4 and four.bytes_per_token == one.bytes_per_token / 4
    assert four.tensor_parallel_size == 4
    assert kv_cache_budget(c, 80 * 2**30, 0.9, tensor_parallel_size=np.int64(4)) == four    # numpy, as elsewhere
    assert [kv_heads_per_gpu(c, tp) for tp in (1, 2, 8, 16, 64)] == [8, 4, 1, 1, 1]
    for tp in (3, 128):                                       # heads that do not split evenly
        with pytest.raises(ValueError, match="split"):
            kv_cache_budget(c, 80 * 2**30, 0.9, tensor_parallel_size=tp)
    for tp in (0, 2.0, True):
        with pytest.raises((TypeError, ValueError)):
            kv_cache_budget(c, 80 * 2**30, 0.9, tensor_parallel_size=tp)
    with pytest.raises(ValueError, match="tensor_parallel_size"):   # the hint where one GPU is too small
        kv_cache_budget(c, 80 * 2**30, 0.9)


def test_an_fp8_kv_cache_leaves_the_weights_in_16_bits():
    """The default weight memory followed the KV dtype: an fp8 cache sized Llama-2-7B's bf16 weights
    at one byte each, and counted the other 6.3 GiB as free for the cache."""
    fp8, bf16 = (kv_cache_budget("llama-2-7b", 80 * 2**30, 0.9, dtype_bytes=d) for d in (1, 2))
    assert fp8.weight_bytes == bf16.weight_bytes == get_preset("llama-2-7b").num_parameters() * 2
    assert fp8.bytes_per_token * 2 == bf16.bytes_per_token
    assert kv_cache_budget("llama-2-7b", 80 * 2**30, 0.9, dtype_bytes=4).weight_bytes == 2 * bf16.weight_bytes



def test_int8_counts_the_scales_int8kvcache_stores():
    """An int8 KV cache was sized at 1 byte per element; Int8KVCache also stores an fp16 scale per
    token and KV head (qwen2.5-0.5b: 6,336 bytes per token, not 6,144). fp8 stays at 1 byte (vLLM's
    fp8 cache has per-tensor scales only)."""
    from llmops_lab.kv import Int8KVCache
    from llmops_lab.kv.calculator import KV_CACHE_DTYPES
    from llmops_lab.kv.quantized import quantized_vector_bytes
    from llmops_lab.presets import PRESETS
    assert quantized_vector_bytes(64) == 66 and quantized_vector_bytes(128, 2, 0) == 256
    for name, c in PRESETS.items():
        b = kv_cache_budget(c, 10 * 2**40, **KV_CACHE_DTYPES["int8"])
        meta = Int8KVCache(c.num_hidden_layers, 1, c.num_key_value_heads, c.head_dim, 1, device="meta")
        assert b.bytes_per_token == meta.nbytes, name
        fp8, bf16 = (kv_cache_budget(c, 10 * 2**40, **KV_CACHE_DTYPES[d]) for d in ("fp8", "bf16"))
        assert fp8.bytes_per_token * 2 == bf16.bytes_per_token, name
        assert b.weight_bytes == fp8.weight_bytes == bf16.weight_bytes         # the weights stay bf16
    assert kv_cache_budget("qwen2.5-0.5b", 80 * 2**30, **KV_CACHE_DTYPES["int8"]).bytes_per_token == 6336
    # per tensor-parallel shard: the scales of the GPU's own KV heads
    four = kv_cache_budget("llama-2-70b", 80 * 2**30, tensor_parallel_size=4, **KV_CACHE_DTYPES["int8"])
    assert four.bytes_per_token == 2 * 80 * 2 * (128 + 2)


def test_non_torch_memory_is_subtracted_like_activations():
    # 10000 x 0.5 - 1000 - 300 - 500 = 3200 bytes -> 12 blocks of 256 bytes.
    b = kv_cache_budget(SMALL, 10_000, 0.5, block_size=4, weight_bytes=1000, activation_bytes=300,
                        non_torch_bytes=500)
    assert b.kv_bytes_available == 3200 and b.num_gpu_blocks == 12 and b.non_torch_bytes == 500
    with pytest.raises(ValueError, match="non-torch memory"):
        kv_cache_budget(SMALL, 10_000, 0.5, block_size=4, weight_bytes=1000, non_torch_bytes=3900)


def test_vllm_counts_a_prefill_chunk_beside_the_sliding_window():
    """vLLM v1 (SlidingWindowSpec.max_memory_usage_bytes): cdiv(min(W - 1 + max_num_batched_tokens,
    max_model_len), block_size) + 1 blocks per request. Mistral-7B, W = 4096, 8192 batched tokens:
    min(4095 + 8192, 32768) = 12287 tokens -> 768 blocks + 1 = 769, not the window's 257."""
    from llmops_lab.kv.calculator import sliding_window_blocks
    b = kv_cache_budget("mistral-7b", 80 * 2**30, 0.9, max_num_batched_tokens=8192)
    assert b.blocks_per_sequence == sliding_window_blocks(32768, 16, 4096, 8192) == 769
    assert b.max_concurrency == b.num_gpu_blocks / 769
    assert kv_cache_budget("mistral-7b", 80 * 2**30, 0.9).blocks_per_sequence == 257   # the chunk left out
    # capped by max_model_len, and (as vLLM's sum) one block more than the full count then
    assert sliding_window_blocks(4000, 16, 4096, 8192) == 250 + 1
    assert sliding_window_blocks(100, 16, 32, 1) == 3          # 32 tokens: 2 blocks + the straddled one
    # a model without a window ignores it, as vLLM's full-attention spec does
    assert kv_cache_budget("llama-2-7b", 80 * 2**30, max_num_batched_tokens=8192).blocks_per_sequence == 256
    for bad in (0, 2.5, -1):
        with pytest.raises((TypeError, ValueError), match="max_num_batched_tokens"):
            kv_cache_budget("mistral-7b", 80 * 2**30, max_num_batched_tokens=bad)


@pytest.mark.parametrize("kwargs, match", [
    (dict(non_torch_bytes=-1), "non_torch_bytes must be >= 0"),
    (dict(non_torch_bytes=float("nan")), "non_torch_bytes must be finite"),
    (dict(scale_bytes=-2), "scale_bytes must be >= 0"),
])
def test_bad_memory_and_scale_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        kv_cache_budget(SMALL, 10_000, 0.5, block_size=4, weight_bytes=1000, **kwargs)
