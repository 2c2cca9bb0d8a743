"""Each formula of llmops_lab.formulas pinned to a hand-worked number, and its input checks."""
import math

import numpy as np
import pytest

from llmops_lab import formulas as F
from llmops_lab.presets import get_preset


# --- KV cache ---------------------------------------------------------------------------------

def test_kv_cache_doc_example_as_written():
    b = F.kv_cache_bytes_as_written(80, 64, 128, 4096, 2)
    assert b == 2 * 80 * 64 * 128 * 4096 * 2 == 10_737_418_240
    assert round(F.to_gb(b), 2) == 10.74
    assert F.to_gib(b) == 10.0
    assert F.to_gb(0) == 0.0 and F.to_gib(0) == 0.0
    for fn in (F.to_gb, F.to_gib):          # a size is never negative (to_gb(-5) was -5e-09)
        with pytest.raises(ValueError, match="num_bytes must be >= 0"):
            fn(-1)


def test_kv_cache_gqa_and_batch():
    assert F.kv_cache_bytes(80, 8, 128, 4096, 2) == 1_342_177_280
    assert round(F.to_gb(F.kv_cache_bytes(80, 8, 128, 4096, 2)), 2) == 1.34
    assert F.kv_cache_bytes(80, 8, 128, 4096, 2, batch_size=3) == 3 * 1_342_177_280
    # With one KV head per query head it is the document's formula.
    assert F.kv_cache_bytes(80, 64, 128, 4096, 2) == F.kv_cache_bytes_as_written(80, 64, 128, 4096, 2)


def test_kv_cache_from_config():
    assert F.kv_cache_bytes_for(get_preset("llama-2-70b"), 4096) == 1_342_177_280
    assert F.kv_cache_bytes_for(get_preset("doc-70b-as-written"), 4096) == 10_737_418_240
    # Llama-2-7B: 2 x 32 x 32 x 128 x 2 = 512 KiB per token.
    assert F.kv_cache_bytes_per_token(get_preset("llama-2-7b")) == 524_288
    assert F.kv_cache_bytes_for(get_preset("llama-2-7b"), 10, batch_size=2, dtype_bytes=4) == 2 * 10 * 2 * 524_288
    assert F.kv_cache_capacity_tokens(524_288 * 100 + 5, get_preset("llama-2-7b")) == 100


def test_sliding_window_tokens():
    assert F.sliding_window_kv_tokens(1000, 4096) == 1000
    assert F.sliding_window_kv_tokens(10_000, 4096) == 4096
    with pytest.raises(ValueError):
        F.sliding_window_kv_tokens(10, 0)


@pytest.mark.parametrize("args", [(-1, 64, 128, 4096, 2), (80, 64, 128, -5, 2), (80, 64, 128, 4096, 0)])
def test_kv_cache_rejects_bad_sizes(args):
    with pytest.raises(ValueError):
        F.kv_cache_bytes_as_written(*args)
    with pytest.raises(ValueError):
        F.kv_cache_bytes(*args)


# --- quantization -----------------------------------------------------------------------------

def test_quant_asymmetric():
    # 4 bits over [-1, 1]: 15 steps of 2/15; the bound is half a step, 2/30.
    assert F.quant_step_asymmetric(-1.0, 1.0, 4) == pytest.approx(2 / 15)
    assert F.quant_error_bound_asymmetric(-1.0, 1.0, 4) == pytest.approx(2 / 30)
    for bits in (1, 2, 3, 4, 8):
        assert F.quant_error_bound_asymmetric(-0.3, 0.7, bits) == pytest.approx(
            F.quant_step_asymmetric(-0.3, 0.7, bits) / 2)
    # 8 bits over [0, 255]: step exactly 1.
    assert F.quant_step_asymmetric(0.0, 255.0, 8) == 1.0


def test_quant_symmetric():
    # int8 absmax: codes -127..127, step 1/127 for abs_max 1, bound 1/254 = abs_max/(2^8 - 2).
    assert F.quant_step_symmetric(1.0, 8) == pytest.approx(1 / 127)
    assert F.quant_error_bound_symmetric(1.0, 8) == pytest.approx(1 / 254)
    assert F.quant_error_bound_symmetric(2.0, 4) == pytest.approx(2.0 / 14)
    with pytest.raises(ValueError):
        F.quant_step_symmetric(1.0, 1)


def test_quant_bound_holds_on_a_grid():
    # Round-to-nearest on the asymmetric grid never errs by more than the bound.
    w_min, w_max, bits = -0.37, 0.91, 3
    step, bound = F.quant_step_asymmetric(w_min, w_max, bits), F.quant_error_bound_asymmetric(w_min, w_max, bits)
    for i in range(1001):
        w = w_min + (w_max - w_min) * i / 1000
        q = min(max(round((w - w_min) / step), 0), 2**bits - 1)
        assert abs(w - (w_min + q * step)) <= bound + 1e-12


@pytest.mark.parametrize("bad", [0, -3])
def test_quant_rejects_bits_below_one(bad):
    with pytest.raises(ValueError, match="bits"):
        F.quant_error_bound_asymmetric(0.0, 1.0, bad)
    with pytest.raises(ValueError, match="bits"):
        F.quant_step_asymmetric(0.0, 1.0, bad)


def test_quant_rejects_inverted_range():
    with pytest.raises(ValueError, match="w_max"):
        F.quant_error_bound_asymmetric(1.0, 0.0, 4)


def test_memory_reduction_matches_doc_table():
    assert F.memory_reduction(16, 8) == 2.0
    assert F.memory_reduction(16, 4) == 4.0
    for row in F.DOC_QUANT_TABLE:
        if isinstance(row["bits"], int):
            assert F.memory_reduction(16, row["bits"]) == row["memory_reduction_x"]
    with pytest.raises(ValueError):
        F.memory_reduction(16, 0)


def test_quantized_sizes():
    assert F.quantized_bits_per_weight(4, 128, scale_bits=16, zero_bits=4) == pytest.approx(4 + 20 / 128)
    assert F.quantized_bits_per_weight(8) == 8.0
    cfg = get_preset("llama-2-7b")
    assert F.weight_bytes(cfg, 16) == cfg.num_parameters() * 2
    assert F.to_gb(F.weight_bytes(cfg, 16)) == pytest.approx(13.48, abs=0.01)
    # The document's "~4GB instead of ~14GB": 4-bit linears, 16-bit embeddings and head.
    assert 3.6 < F.to_gb(F.quantized_model_bytes(cfg, 4, group_size=128)) < 4.1
    n_emb = 2 * cfg.vocab_size * cfg.hidden_size
    norms = (2 * cfg.num_hidden_layers + 1) * cfg.hidden_size
    assert F.linear_weight_count(cfg) == cfg.num_parameters() - n_emb - norms


def test_quant_speedup_as_written_takes_an_integer_bit_width():
    assert F.quant_speedup_as_written(16) == 1.0 and F.quant_speedup_as_written(8) == 1.5
    with pytest.raises(ValueError, match="bits must be an integer"):   # 8.0 was looked up as 8
        F.quant_speedup_as_written(8.0)
    with pytest.raises(TypeError):
        F.quant_speedup_as_written(True)


# --- speculative decoding ---------------------------------------------------------------------

def test_expected_tokens_leviathan():
    assert F.expected_tokens_per_step(0.8, 4) == pytest.approx((1 - 0.8**5) / 0.2) == pytest.approx(3.3616)
    assert F.expected_tokens_per_step(0.0, 4) == 1.0
    assert F.expected_tokens_per_step(1.0, 4) == 5.0
    assert F.expected_tokens_per_step(0.999999, 4) == pytest.approx(5.0, rel=1e-5)


def test_speculative_speedup():
    assert F.speculative_speedup(0.8, 4, 0.05) == pytest.approx(3.3616 / 1.2)
    assert F.speculative_speedup(0.8, 4, 0.0) == pytest.approx(3.3616)
    # alpha = 0 costs the drafts for nothing: a slowdown.
    assert F.speculative_speedup(0.0, 4, 0.1) == pytest.approx(1 / 1.4)
    assert F.speculative_speedup_with_verify_cost(0.8, 4, 0.05, 1.0) == F.speculative_speedup(0.8, 4, 0.05)
    assert F.speculative_speedup_with_verify_cost(0.8, 4, 0.05, 1.3) == pytest.approx(3.3616 / 1.5)
    k = F.best_draft_length(0.8, 0.05)
    assert all(F.speculative_speedup(0.8, k, 0.05) >= F.speculative_speedup(0.8, j, 0.05) for j in range(1, 17))


def test_speculative_as_written_and_where_it_breaks():
    # alpha*k = 0.4: 1 / (0.1*0.4 + 0.6) = 1.5625
    assert F.speculative_speedup_as_written(1.0, 0.1, 0.1, 4) == pytest.approx(1 / 0.64)
    assert F.speculative_speedup_as_written(1.0, 0.1, 0.0, 4) == 1.0   # drafting treated as free
    assert F.speculative_speedup_as_written(1.0, 0.1, 0.25, 4) == pytest.approx(10.0)  # alpha*k = 1
    # Denominator 1 - alpha*k*0.9 vanishes at alpha*k = 1/0.9, then turns negative.
    assert F.speculative_speedup_as_written(1.0, 0.1, 0.27, 4) == pytest.approx(1 / 0.028)
    assert F.speculative_speedup_as_written(1.0, 0.1, 0.28, 4) == pytest.approx(-1 / 0.008)
    assert F.speculative_speedup_as_written(1.0, 0.1, 0.8, 4) < 0
    assert F.speculative_speedup_as_written(1.0, 0.0, 0.5, 2) == math.inf


@pytest.mark.parametrize("alpha", [-0.1, 1.5])
def test_speculative_rejects_alpha(alpha):
    for fn in (lambda: F.expected_tokens_per_step(alpha, 4), lambda: F.speculative_speedup(alpha, 4, 0.1),
               lambda: F.speculative_speedup_as_written(1.0, 0.1, alpha, 4)):
        with pytest.raises(ValueError, match="alpha"):
            fn()


@pytest.mark.parametrize("k", [0, -2])
def test_speculative_rejects_k(k):
    with pytest.raises(ValueError, match="k"):
        F.expected_tokens_per_step(0.5, k)
    with pytest.raises(ValueError, match="k"):
        F.speculative_speedup_as_written(1.0, 0.1, 0.5, k)


# --- batching ---------------------------------------------------------------------------------

def test_batching_doc_example():
    lens = [10, 50, 20]  # requests A, B, C of the document's diagram
    t = 0.02
    # 80 tokens in 50 steps of 20 ms = 80 tokens/s.
    assert F.throughput_as_written(3, 80 / 3, 50, t) == pytest.approx(80.0)
    assert F.static_batching_throughput(lens, t) == pytest.approx(80.0)
    assert F.static_batching_throughput(lens, lambda n: 0.01 * n) == pytest.approx(80 / (50 * 0.03))
    assert F.continuous_batching_throughput(3, t) == pytest.approx(150.0)
    assert F.static_batching_utilization(lens) == pytest.approx(80 / 150)
    assert F.continuous_batching_gain(lens) == pytest.approx(150 / 80)
    assert F.continuous_batching_gain([7, 7, 7]) == 1.0


def test_batching_rejects_bad_input():
    with pytest.raises(ValueError):
        F.static_batching_throughput([], 0.01)
    with pytest.raises(ValueError):
        F.static_batching_throughput([3, -1], 0.01)
    with pytest.raises(ValueError):
        F.throughput_as_written(-1, 10, 20, 0.01)
    with pytest.raises(ValueError):
        F.continuous_batching_throughput(4, 0.0)


# --- attention memory and FLOPs ---------------------------------------------------------------

def test_attention_memory():
    assert F.attention_scores_bytes(2, 32, 4096, 2) == 2 * 32 * 4096 * 4096 * 2
    assert F.attention_scores_bytes(1, 1, 3, 2, seq_k=5) == 30
    assert F.flash_attention_extra_bytes(2, 32, 4096, 128, 2) == 2 * 32 * 4096 * (128 * 2 + 4)
    # Like with like: naive writes S, P and O; flash writes O and the logsumexp. It compared one
    # score matrix against O + lse (31.5 here), counting O on one side only.
    assert F.standard_attention_written_bytes(2, 32, 4096, 128, 2) == 2 * 32 * (2 * 4096**2 + 4096 * 128) * 2
    assert F.attention_memory_saving(4096, 128, 2) == pytest.approx(64.0)
    assert F.attention_memory_saving(4096, 128, 2) == pytest.approx(
        F.standard_attention_written_bytes(3, 5, 4096, 128, 2) / F.flash_attention_extra_bytes(3, 5, 4096, 128, 2))
    # Doubling n: quadratic vs linear.
    assert F.attention_scores_bytes(1, 1, 2048, 2) == 4 * F.attention_scores_bytes(1, 1, 1024, 2)
    assert F.flash_attention_extra_bytes(1, 1, 2048, 64, 2) == 2 * F.flash_attention_extra_bytes(1, 1, 1024, 64, 2)
    assert F.attention_hbm_accesses_standard(1024, 64) == 1024 * 64 + 1024**2
    assert F.attention_hbm_accesses_flash(1024, 64, 100_000) == pytest.approx(1024**2 * 64**2 / 100_000)
    with pytest.raises(ValueError):
        F.attention_scores_bytes(1, 1, -4, 2)


def test_flops():
    assert F.matmul_flops(2, 3, 4) == 48
    assert F.attention_flops(1, 2, 8, 8, 16) == 4 * 2 * 8 * 8 * 16
    assert F.attention_flops(1, 2, 8, 8, 16, causal=True) == 4 * 2 * (8 * 9 // 2) * 16   # half and the diagonal
    assert F.forward_flops_per_token(7e9) == 14e9
    with pytest.raises(ValueError):
        F.matmul_flops(2, -3, 4)


def test_causal_attention_flops_count_the_pairs_the_mask_keeps():
    """Causal used to halve S_q x S_k whatever the shapes: a decode query (S_q = 1), which sees every
    key, was counted at half its FLOPs. Bottom-right aligned, query i sees keys 0..S_k - S_q + i."""
    assert F.attention_flops(1, 1, 1, 100, 8, causal=True) == F.attention_flops(1, 1, 1, 100, 8) == 3200
    for sq, sk in ((1, 5), (2, 4), (3, 7), (6, 6)):
        pairs = sum(sk - sq + i + 1 for i in range(sq))
        assert F.attention_flops(2, 3, sq, sk, 4, causal=True) == 4 * 2 * 3 * pairs * 4
    with pytest.raises(ValueError, match="seq_q .5. greater than seq_k .4."):   # rows with no key, as the backends say
        F.attention_flops(1, 1, 5, 4, 8, causal=True)


def test_decode_roofline():
    cfg = get_preset("llama-2-7b")
    per_step = F.decode_bytes_per_token(cfg.num_parameters(), 2)
    assert per_step == cfg.num_parameters() * 2
    assert F.decode_tokens_per_s_bound(3.35e12, per_step) == pytest.approx(248.6, abs=0.1)
    assert F.decode_tokens_per_s_bound(1e12, 1e9, batch_size=8) == pytest.approx(8000.0)
    assert F.decode_bytes_per_token(10, 2, kv_bytes_read=5) == 25
    assert F.arithmetic_intensity(100, 50) == 2.0
    assert F.ridge_point(1e15, 3.35e12) == pytest.approx(298.5, abs=0.1)
    assert F.roofline_flops_bound(1e15, 1e12, 10) == 1e13
    assert F.roofline_flops_bound(1e15, 1e12, 10_000) == 1e15
    with pytest.raises(ValueError):
        F.decode_tokens_per_s_bound(1e12, 0)


# --- paging -----------------------------------------------------------------------------------

@pytest.mark.parametrize("seq_len,blocks,reserved,waste", [
    (0, 0, 0, 0), (1, 1, 16, 15), (15, 1, 16, 1), (16, 1, 16, 0), (17, 2, 32, 15), (100, 7, 112, 12)])
def test_paging(seq_len, blocks, reserved, waste):
    assert F.num_blocks(seq_len, 16) == blocks
    assert F.paged_reserved_tokens(seq_len, 16) == reserved
    assert F.internal_fragmentation(seq_len, 16) == waste


def test_waste_fractions():
    assert F.contiguous_reserved_bytes(2048, 524_288, batch_size=4) == 2048 * 524_288 * 4
    assert F.kv_waste_fraction_contiguous([512, 1024], 2048) == pytest.approx(1 - 1536 / 4096)
    assert F.kv_waste_fraction_paged([17, 32], 16) == pytest.approx(1 - 49 / 64)
    assert F.kv_waste_fraction_paged([0], 16) == 0.0
    with pytest.raises(ValueError):
        F.kv_waste_fraction_contiguous([3000], 2048)
    with pytest.raises(ValueError):
        F.num_blocks(10, 0)


# --- input checks shared by every formula ------------------------------------------------------

NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("call, match", [
    (lambda: F.kv_cache_bytes(NAN, 8, 128, 4096, 2), "num_layers.*nan"),
    (lambda: F.kv_cache_bytes(80, 8, 128, 4096, NAN), "dtype_bytes must be finite, got nan"),
    (lambda: F.kv_cache_bytes(80, 8, 128, 4096, INF), "dtype_bytes must be finite, got inf"),
    (lambda: F.kv_cache_capacity_tokens(INF, get_preset("llama-2-7b")), "free_bytes must be finite, got inf"),
    (lambda: F.kv_cache_capacity_tokens(NAN, get_preset("llama-2-7b")), "free_bytes must be finite, got nan"),
    (lambda: F.roofline_flops_bound(1e15, 3e12, NAN), "intensity must be finite, got nan"),
    (lambda: F.roofline_flops_bound(1e15, 3e12, INF), "intensity must be finite, got inf"),
    (lambda: F.ridge_point(NAN, 3e12), "peak_flops must be finite"),
    (lambda: F.best_draft_length(0.8, NAN), "c must be finite, got nan"),
    (lambda: F.speculative_speedup(0.8, 4, INF), "c must be finite, got inf"),
    (lambda: F.expected_tokens_per_step(NAN, 4), "alpha"),
    (lambda: F.speculative_speedup_as_written(NAN, 0.1, 0.5, 4), "t_target must be finite"),
    (lambda: F.quant_step_asymmetric(NAN, 1.0, 4), "w_min must be finite, got nan"),
    (lambda: F.quant_error_bound_asymmetric(0.0, INF, 4), "w_max must be finite, got inf"),
    (lambda: F.quant_step_symmetric(NAN, 8), "abs_max must be finite"),
    (lambda: F.memory_reduction(16, NAN), "bits_after must be finite"),
    (lambda: F.weight_bytes(get_preset("llama-2-7b"), INF), "bits must be finite"),
    (lambda: F.continuous_batching_throughput(NAN, 0.02), "mean_batch_size must be finite"),
    (lambda: F.static_batching_throughput([3, 5], INF), "step_time must be finite"),
    (lambda: F.decode_bytes_per_token(NAN, 2), "num_params must be finite"),
])
def test_rejects_nan_and_inf(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize("call, match", [
    (lambda: F.kv_cache_bytes("80", 8, 128, 4096, 2), "num_layers must be an integer, got '80'"),
    (lambda: F.kv_cache_bytes(80, 8, 128, 4096, None), "dtype_bytes must be a real number, got None"),
    (lambda: F.kv_cache_bytes(80, 8, 128, 4096, "2"), "dtype_bytes must be a real number, got '2'"),
    (lambda: F.roofline_flops_bound(1e15, "3e12", 10), "bandwidth_bytes_per_s must be a real number"),
    (lambda: F.expected_tokens_per_step("0.5", 4), "alpha must be a real number"),
    (lambda: F.expected_tokens_per_step(0.5, None), r"k \(draft length\) must be an integer, got None"),
    (lambda: F.num_blocks(None, 16), "seq_len must be an integer, got None"),
    (lambda: F.num_blocks(True, 16), "seq_len must be an integer, got True"),
    (lambda: F.memory_reduction(True, 4), "bits_before must be a real number, got True"),
])
def test_rejects_non_numbers(call, match):
    with pytest.raises(TypeError, match=match):
        call()


@pytest.mark.parametrize("call, match", [
    (lambda: F.num_blocks(10, 2.5), "block_size must be an integer, got 2.5"),
    (lambda: F.num_blocks(10, 16.0), "block_size must be an integer, got 16.0"),
    (lambda: F.num_blocks(10.5, 16), "seq_len must be an integer, got 10.5"),
    (lambda: F.expected_tokens_per_step(0.5, 2.5), r"k \(draft length\) must be an integer, got 2.5"),
    (lambda: F.best_draft_length(0.8, 0.05, k_max=4.5), "k_max must be an integer, got 4.5"),
    (lambda: F.best_draft_length(0.8, 0.05, k_max=10**400), "k_max is too large"),      # looped for ever
    (lambda: F.best_draft_length(0.8, 0.05, k_max=10**6), "k_max must be at most"),
    (lambda: F.kv_cache_bytes(80, 8, 128, 4096.5, 2), "seq_len must be an integer"),
    (lambda: F.kv_cache_bytes(80, 8, 128, 4096, 2, batch_size=1.5), "batch_size must be an integer"),
    (lambda: F.sliding_window_kv_tokens(10, 4.5), "window_size must be an integer"),
    (lambda: F.quant_step_asymmetric(0.0, 1.0, 4.5), "bits must be an integer, got 4.5"),
    (lambda: F.quantized_bits_per_weight(4, 128.5), "group_size must be an integer"),
    (lambda: F.attention_flops(1, 2.5, 8, 8, 16), "heads must be an integer"),
    (lambda: F.matmul_flops(2, 3, np.float64(4.0)), "k must be an integer"),
    (lambda: F.throughput_as_written(2.5, 10, 20, 0.01), "batch_size must be an integer"),
    (lambda: F.decode_tokens_per_s_bound(1e12, 1e9, batch_size=0.5), "batch_size must be an integer"),
    (lambda: F.static_batching_throughput([3, 4.5], 0.01), r"output_lens\[1\] must be an integer"),
])
def test_counts_must_be_integers(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_counts_take_numpy_integers_and_reals_stay_real():
    assert F.num_blocks(np.int64(17), np.int32(16)) == 2
    assert F.kv_cache_bytes(np.int64(80), 8, 128, 4096, np.float32(2)) == 1_342_177_280
    assert F.expected_tokens_per_step(np.float64(0.0), np.int64(4)) == 1.0
    # Mean bits per parameter and the roofline's batch are real numbers.
    cfg = get_preset("llama-2-7b")
    assert F.weight_bytes(cfg, 4.5) == cfg.num_parameters() * 4.5 / 8
    assert F.weight_only_speedup(8.0, 4, 1e15, 1e12) == F.weight_only_speedup(8, 4, 1e15, 1e12)
    assert F.kv_cache_bytes(2, 2, 1, 10, 64 * 8 / 8 + 2) == 2 * 2 * 2 * 10 * 66


@pytest.mark.parametrize("call, match", [
    (lambda: F.static_batching_utilization([5, -3]), r"output_lens\[1\] must be >= 0, got -3"),
    (lambda: F.continuous_batching_gain([5, -5]), r"output_lens\[1\] must be >= 0, got -5"),
    (lambda: F.continuous_batching_gain([0, 0]), "positive total"),
    (lambda: F.static_batching_utilization([]), "output_lens is empty"),
    (lambda: F.continuous_batching_gain([]), "output_lens is empty"),
    (lambda: F.kv_waste_fraction_paged([], 16), "seq_lens is empty"),
    (lambda: F.kv_waste_fraction_contiguous([], 2048), "seq_lens is empty"),
    (lambda: F.kv_waste_fraction_paged([4, -1], 16), r"seq_lens\[1\] must be >= 0, got -1"),
    (lambda: F.kv_waste_fraction_contiguous([4, -1], 2048), r"seq_lens\[1\] must be >= 0, got -1"),
    (lambda: F.kv_waste_fraction_paged([4], 0), "block_size must be >= 1, got 0"),
])
def test_lengths_must_be_non_negative_and_non_empty(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# --- tables -----------------------------------------------------------------------------------

def test_doc_tables():
    assert [r["method"] for r in F.DOC_QUANT_TABLE] == [
        "FP16 (baseline)", "INT8", "INT4 (GPTQ)", "INT4 (AWQ)", "GGUF (llama.cpp)"]
    assert [r["technique"] for r in F.DOC_OPTIMIZATION_SUMMARY] == [
        "INT8 Quantization", "INT4 Quantization", "PagedAttention", "Continuous Batching",
        "Speculative Decoding", "Flash Attention"]
    assert F.DOC_OPTIMIZATION_SUMMARY[5]["memory_reduction"] == "5-20x"


def test_huge_integers_bits_and_non_configs_are_clear_errors():
    """An integer past a float's range was an OverflowError from inside a division, and 2**bits with
    a huge bits ran for ever; a config that is not a ModelConfig failed on a missing attribute."""
    big = 10**400
    for call in (lambda: F.to_gib(big), lambda: F.to_gb(big),
                 lambda: F.memory_reduction(big, 4), lambda: F.ridge_point(big, 1e12),
                 lambda: F.throughput_as_written(big, 100, 0.05, 200),
                 lambda: F.quantized_bits_per_weight(big)):
        with pytest.raises(ValueError, match="too large|must be <="):
            call()
    for bits in (65, 10**400):
        with pytest.raises(ValueError, match="bits must be <= 64|too large"):
            F.quant_step_symmetric(1.0, bits)
        with pytest.raises(ValueError, match="bits must be <= 64|too large"):
            F.quant_error_bound_asymmetric(-1.0, 1.0, bits)
    assert F.quant_step_symmetric(1.0, 64) == 1.0 / (2**63 - 1)
    for call in (lambda: F.kv_cache_bytes_per_token(2), lambda: F.weight_bytes({"hidden_size": 8}, 4),
                 lambda: F.linear_weight_count("llama-2-7b"), lambda: F.kv_cache_bytes_for(None, 16),
                 lambda: F.quantized_model_bytes(3, 4), lambda: F.kv_cache_capacity_tokens(1e9, 7)):
        with pytest.raises(TypeError, match="ModelConfig"):
            call()
