"""The formulas of LLM inference optimisation, one named pure-Python function each.

Every equation of the source document (``llm-inference-optimization``) is here, quoted as written
in its docstring with its units and its origin; where the document is wrong, its version is kept as
``..._as_written`` beside the corrected one, so a notebook can plot both against a measurement.
Sources: the KV cache and grouped-query attention (Pope et al. 2022, "Efficiently Scaling
Transformer Inference"; Ainslie et al. 2023, GQA), uniform quantization (Jacob et al. 2018; GPTQ,
Frantar et al. 2022; AWQ, Lin et al. 2023), speculative decoding (Leviathan et al. 2023), continuous
batching (Yu et al. 2022, Orca), PagedAttention (Kwon et al. 2023, vLLM), FlashAttention (Dao et
al. 2022) and the roofline model (Williams et al. 2009). No torch: these are plain numbers.
"""
from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence

from .checks import is_int, is_real
from .config import ModelConfig

# ---------------------------------------------------------------------------------------------
# Input checks. Each names the argument and the bad value. A non-number raises TypeError; a
# number out of range raises ValueError. NaN and inf are refused: they pass "< 0" and "<= 0"
# and would come out as a silent NaN.


def _real(name: str, v) -> None:
    """v must be a finite real number (numpy's too); a bool is not one. An integer beyond the
    largest float is refused too: the formulas divide, and its quotient would raise OverflowError
    (or, raised to a power, run for ever)."""
    if not is_real(v):
        raise TypeError(f"{name} must be a real number, got {v!r}")
    if not is_int(v) and not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {v}")
    if is_int(v) and abs(v) > sys.float_info.max:
        raise ValueError(f"{name} is too large ({len(str(abs(int(v))))} digits): beyond a float's range")


def _integer(name: str, v, minimum: int) -> None:
    """v must be an integer (Python's or numpy's, not a bool) >= minimum. 16.0 is refused too."""
    if not is_real(v):
        raise TypeError(f"{name} must be an integer, got {v!r}")
    if not is_int(v):
        raise ValueError(f"{name} must be an integer, got {v!r}")
    if v < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {v}")
    _real(name, v)


def _finite(**values) -> None:
    for name, v in values.items():
        _real(name, v)


def _nonneg(**values) -> None:
    for name, v in values.items():
        _real(name, v)
        if v < 0:
            raise ValueError(f"{name} must be >= 0, got {v}")


def _positive(**values) -> None:
    for name, v in values.items():
        _real(name, v)
        if v <= 0:
            raise ValueError(f"{name} must be > 0, got {v}")


def _nonneg_int(**values) -> None:
    """Counts that may be 0: tokens, layers, heads, batch sizes."""
    for name, v in values.items():
        _integer(name, v, 0)


def _positive_int(**values) -> None:
    """Counts that must be at least 1: block sizes, window sizes, group sizes."""
    for name, v in values.items():
        _integer(name, v, 1)


def _check_lengths(name: str, lens: Sequence[int]) -> None:
    """A non-empty list of token counts, each an integer >= 0."""
    if len(lens) == 0:
        raise ValueError(f"{name} is empty")
    _nonneg_int(**{f"{name}[{i}]": n for i, n in enumerate(lens)})


MAX_BITS = 64        # the widest integer format a weight is quantized to here; 2**bits is computed


def _check_bits(bits: int, minimum: int = 1) -> None:
    _integer("bits", bits, minimum)
    if bits > MAX_BITS:
        raise ValueError(f"bits must be <= {MAX_BITS}, got {bits}")


def _check_config(config) -> None:
    if not isinstance(config, ModelConfig):
        raise TypeError(f"config must be a ModelConfig (llmops_lab.config, or presets.get_preset(name)), "
                        f"got {type(config).__name__}")


def _check_range(w_min: float, w_max: float) -> None:
    _finite(w_min=w_min, w_max=w_max)
    if w_max < w_min:
        raise ValueError(f"w_max ({w_max}) must be >= w_min ({w_min})")


def _check_alpha(alpha: float) -> None:
    _real("alpha", alpha)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha (acceptance rate) must lie in [0, 1], got {alpha}")


def _check_k(k: int) -> None:
    _integer("k (draft length)", k, 1)


def to_gb(num_bytes: float) -> float:
    """Bytes to decimal gigabytes (1 GB = 1e9 bytes), the unit the document's "10.7 GB" uses."""
    _nonneg(num_bytes=num_bytes)
    return num_bytes / 1e9


def to_gib(num_bytes: float) -> float:
    """Bytes to binary gibibytes (1 GiB = 2**30 bytes), the unit of ``torch.cuda`` memory stats."""
    _nonneg(num_bytes=num_bytes)
    return num_bytes / 2**30


# ---------------------------------------------------------------------------------------------
# KV cache (Pope et al. 2022; Ainslie et al. 2023)


def kv_cache_bytes_as_written(num_layers: int, num_heads: int, head_dim: int, seq_len: int,
                              dtype_bytes: float) -> float:
    """The document's KV-cache size, in bytes, for one sequence.

    As written: KV Cache Size = 2 x L x n_heads x d_head x s x sizeof(dtype) (2 = one K and one V).
    Its example, 2 x 80 x 64 x 128 x 4096 x 2 = 10,737,418,240 bytes = 10.7 GB, counts one KV head
    per query head; that is right for multi-head attention but not for Llama-2-70B, whose 64 query
    heads share 8 KV heads (see ``kv_cache_bytes``).
    """
    _nonneg_int(num_layers=num_layers, num_heads=num_heads, head_dim=head_dim, seq_len=seq_len)
    _positive(dtype_bytes=dtype_bytes)
    return 2 * num_layers * num_heads * head_dim * seq_len * dtype_bytes


def kv_cache_bytes(num_layers: int, num_kv_heads: int, head_dim: int, seq_len: int,
                   dtype_bytes: float, batch_size: int = 1) -> float:
    """Corrected KV-cache size in bytes: 2 x L x B x n_kv_heads x d_head x s x sizeof(dtype).

    Only key/value heads are cached, and with grouped-query attention (Ainslie et al. 2023) there are
    fewer of them than query heads: Llama-2-70B's 8 KV heads give 1,342,177,280 bytes = 1.34 GB at
    4096 tokens, 8x less than the document's 10.7 GB. Every sequence of a batch has its own cache.
    """
    _nonneg_int(num_layers=num_layers, num_kv_heads=num_kv_heads, head_dim=head_dim, seq_len=seq_len,
                batch_size=batch_size)
    _positive(dtype_bytes=dtype_bytes)
    return 2 * num_layers * batch_size * num_kv_heads * head_dim * seq_len * dtype_bytes


def kv_cache_bytes_per_token(config, dtype_bytes: float = 2) -> float:
    """Bytes one token adds to the cache of a ``ModelConfig``: 2 x L x n_kv_heads x d_head x sizeof."""
    _check_config(config)
    return kv_cache_bytes(config.num_hidden_layers, config.num_key_value_heads, config.head_dim, 1,
                          dtype_bytes)


def kv_cache_bytes_for(config, seq_len: int, batch_size: int = 1, dtype_bytes: float = 2) -> float:
    """``kv_cache_bytes`` with L, n_kv_heads and d_head read from a ``ModelConfig`` (bytes)."""
    _check_config(config)
    return kv_cache_bytes(config.num_hidden_layers, config.num_key_value_heads, config.head_dim,
                          seq_len, dtype_bytes, batch_size)


def kv_cache_capacity_tokens(free_bytes: float, config, dtype_bytes: float = 2) -> int:
    """How many tokens of KV cache fit in ``free_bytes`` (what vLLM turns into its block count)."""
    _nonneg(free_bytes=free_bytes)
    return int(free_bytes // kv_cache_bytes_per_token(config, dtype_bytes))


def sliding_window_kv_tokens(seq_len: int, window_size: int) -> int:
    """Tokens a sliding-window cache holds: min(s, W) (the document's ``SlidingWindowKVCache``).

    Memory stops growing at W tokens (Mistral 7B: W = 4096; Jiang et al. 2023); tokens older than the
    window are dropped, so attention beyond W is no longer exact full attention.
    """
    _nonneg_int(seq_len=seq_len)
    _positive_int(window_size=window_size)
    return min(seq_len, window_size)


# ---------------------------------------------------------------------------------------------
# Quantization (Jacob et al. 2018; GPTQ, Frantar et al. 2022; AWQ, Lin et al. 2023)


def quant_step_asymmetric(w_min: float, w_max: float, bits: int) -> float:
    """Step Delta of asymmetric (min-max, zero-point) quantization: (w_max - w_min) / (2^b - 1).

    2^b codes 0..2^b-1 span [w_min, w_max] in 2^b - 1 equal steps; units of w.
    """
    _check_bits(bits)
    _check_range(w_min, w_max)
    return (w_max - w_min) / (2**bits - 1)


def quant_error_bound_asymmetric(w_min: float, w_max: float, bits: int) -> float:
    """The document's quantization error bound (units of w), which is right for min-max rounding.

    As written: eps = |w - quantize(w, b)| <= Delta/2 = (w_max - w_min) / (2^(b+1) - 2).
    With Delta = (w_max - w_min)/(2^b - 1), Delta/2 = (w_max - w_min)/(2^(b+1) - 2): round to nearest
    is off by at most half a step, for a grid whose ends sit at w_min and w_max. An integer zero
    point in [0, 2^b - 1] (GPTQ/AWQ ``zero_point``) puts 0 on the grid, so the grid must span
    [min(w_min, 0), max(w_max, 0)] (``quant.rtn`` widens the range to it), and the bound holds with
    that range, not the group's own: for a group whose weights share one sign the bound as written
    fails (``[1.00, 1.01, 1.02, 1.03]`` at 4 bits errs 30x past it). w_min, w_max are per group
    (``group_size`` weights), not per tensor.
    """
    _check_bits(bits)
    _check_range(w_min, w_max)
    return (w_max - w_min) / (2 ** (bits + 1) - 2)


def quant_step_symmetric(abs_max: float, bits: int) -> float:
    """Step Delta of symmetric absmax quantization: abs_max / (2^(b-1) - 1) (``sym=True``).

    Codes -(2^(b-1)-1)..(2^(b-1)-1), zero exactly representable, the code -2^(b-1) left unused so
    the grid is symmetric (int8: -127..127). Needs b >= 2.
    """
    _check_bits(bits, minimum=2)
    _nonneg(abs_max=abs_max)
    return abs_max / (2 ** (bits - 1) - 1)


def quant_error_bound_symmetric(abs_max: float, bits: int) -> float:
    """Error bound of symmetric absmax quantization: Delta/2 = abs_max / (2^b - 2), units of w.

    Derivation: with codes q in -(2^(b-1)-1)..(2^(b-1)-1) and Delta = abs_max/(2^(b-1)-1), every
    |w| <= abs_max lies inside [-abs_max, abs_max] = the grid's span, so rounding to the nearest code
    errs by at most Delta/2 = abs_max/(2^b - 2). For weights symmetric about 0 (w_max - w_min =
    2 abs_max) this is a little looser than the asymmetric abs_max/(2^b - 1): one code is unused.
    """
    return quant_step_symmetric(abs_max, bits) / 2


def memory_reduction(bits_before: float, bits_after: float) -> float:
    """Weight-memory reduction factor bits_before / bits_after (FP16 -> INT4: 16/4 = 4.0x)."""
    _positive(bits_before=bits_before, bits_after=bits_after)
    return bits_before / bits_after


def quantized_bits_per_weight(bits: int, group_size: int | None = None, scale_bits: int = 16,
                              zero_bits: int = 0) -> float:
    """Stored bits per weight with group-wise scales: b + (scale_bits + zero_bits) / group_size.

    GPTQ/AWQ with ``group_size=128``, an fp16 scale and a packed 4-bit zero point:
    4 + 20/128 = 4.156 bits per weight. ``group_size=None`` means per-tensor (overhead ~ 0).
    """
    _check_bits(bits)
    _nonneg_int(scale_bits=scale_bits, zero_bits=zero_bits)
    if group_size is None:
        return float(bits)
    _positive_int(group_size=group_size)
    return bits + (scale_bits + zero_bits) / group_size


def weight_bytes(config, bits: float) -> float:
    """Bytes of all weights of a ``ModelConfig`` stored at ``bits`` per parameter: N x b / 8.

    ``bits`` is a mean over the parameters, so it may be fractional (4.156 with group scales).
    """
    _check_config(config)
    _positive(bits=bits)
    return config.num_parameters() * bits / 8


def linear_weight_count(config) -> int:
    """Parameters in the decoder's linear layers (q, k, v, o, gate, up, down): what GPTQ/AWQ quantize."""
    _check_config(config)
    d, q = config.hidden_size, config.num_attention_heads * config.head_dim
    kv = config.num_key_value_heads * config.head_dim
    per_layer = 2 * d * q + 2 * d * kv + 3 * d * config.intermediate_size
    return config.num_hidden_layers * per_layer


def quantized_model_bytes(config, bits: int, group_size: int | None = 128, scale_bits: int = 16,
                          zero_bits: int = 0, other_bits: int = 16) -> float:
    """Bytes of a GPTQ/AWQ-style model: decoder linears at ``bits`` (+ group scales), rest at ``other_bits``.

    Embeddings, LM head, norms and biases stay in 16 bits. Llama-2-7B, 4-bit, g128: ~3.9 GB, the
    document's "~4GB instead of ~14GB for FP16" (13.5 GB = 6.74e9 x 2 bytes).
    """
    _nonneg_int(other_bits=other_bits)
    n_lin = linear_weight_count(config)
    rest = config.num_parameters() - n_lin
    return (n_lin * quantized_bits_per_weight(bits, group_size, scale_bits, zero_bits)
            + rest * other_bits) / 8


def quant_speedup_as_written(bits: int) -> float:
    """The document's speedup over FP16 (dimensionless): INT8 ~1.5x, INT4 ~2.5x, FP16 1.0x.

    As written in its table: one constant per bit width, with no batch size, hardware or kernel.
    """
    _check_bits(bits)       # an integer, as every count here: 8.0 is refused, not looked up
    table = {16: 1.0, 8: 1.5, 4: 2.5}
    if bits not in table:
        raise ValueError(f"the document gives a speedup for bits in {sorted(table)}, not {bits}")
    return table[bits]


def weight_only_speedup(batch: int, bits: float, peak_flops: float, bandwidth_bytes_per_s: float,
                        base_bits: float = 16) -> float:
    """Roofline speedup of a weight-only quantized linear over a float one, at ``batch`` tokens.

    Per weight a linear does 2 x B FLOPs and reads b/8 bytes, so its time is
    max(2B / peak_flops, b / (8 x bandwidth)) (Williams et al. 2009). The ratio of the float and
    quantized times is base_bits / bits while both are memory-bound (small B); it starts falling
    when the quantized linear turns compute-bound, at B = peak x bits / (16 x bandwidth), and reaches
    1 when the float one does too (``weight_only_crossover_batch``). It assumes a kernel that
    dequantizes for free while streaming the codes (what a fused GPU kernel approaches).
    ``batch`` and ``bits`` may be fractional: the roofline is a curve in both, and the crossover
    batch is a real number.
    """
    _positive(batch=batch, bits=bits, base_bits=base_bits, peak_flops=peak_flops,
              bandwidth_bytes_per_s=bandwidth_bytes_per_s)

    def t(b):
        return max(2 * batch / peak_flops, b / (8 * bandwidth_bytes_per_s))
    return t(base_bits) / t(bits)


def weight_only_crossover_batch(peak_flops: float, bandwidth_bytes_per_s: float, base_bits: float = 16) -> float:
    """Batch (tokens) from which weight-only quantization stops paying on the roofline:
    peak_flops x base_bits / (16 x bandwidth), the float linear's ridge point (see
    ``weight_only_speedup``); the same for every bit width."""
    _positive(base_bits=base_bits, peak_flops=peak_flops, bandwidth_bytes_per_s=bandwidth_bytes_per_s)
    return peak_flops * base_bits / (16 * bandwidth_bytes_per_s)


# ---------------------------------------------------------------------------------------------
# Speculative decoding (Leviathan et al. 2023; Chen et al. 2023)


def speculative_speedup_as_written(t_target: float, t_draft: float, alpha: float, k: int) -> float:
    """The document's speculative-decoding speedup (dimensionless), kept to show where it breaks.

    As written: Speedup = T_target / (T_draft * alpha * k + T_target * (1 - alpha * k)), with T the
    per-token costs, k the draft length, alpha the acceptance rate. The denominator is
    T_target - alpha*k*(T_target - T_draft): it reaches 0 (speedup infinite) at
    alpha*k = T_target/(T_target - T_draft) = 1/(1 - c) and goes negative beyond. It reads
    alpha*k as the fraction of tokens the draft supplies and 1 - alpha*k as the target's, a
    fraction that turns negative once alpha*k > 1 (alpha = 0.3 at k = 4 already), although
    alpha*k is the expected number of accepted drafts, which may well exceed 1. It also ignores
    the k draft passes paid even when nothing is accepted (alpha = 0 gives 1.0, not a slowdown).
    Use ``speculative_speedup``.
    """
    _positive(t_target=t_target)
    _nonneg(t_draft=t_draft)
    _check_alpha(alpha)
    _check_k(k)
    denom = t_draft * alpha * k + t_target * (1 - alpha * k)
    return math.inf if denom == 0 else t_target / denom


def expected_tokens_per_step(alpha: float, k: int) -> float:
    """Expected tokens per target pass: E = (1 - alpha^(k+1)) / (1 - alpha) (Leviathan eq. 1).

    Each of k drafts is accepted independently with probability alpha until the first rejection;
    the target pass always adds one token of its own (the correction, or a bonus after k accepts),
    so E runs from 1 (alpha = 0) to k + 1 (alpha = 1).
    """
    _check_alpha(alpha)
    _check_k(k)
    if alpha == 1.0:
        return float(k + 1)
    return (1 - alpha ** (k + 1)) / (1 - alpha)


def speculative_speedup(alpha: float, k: int, c: float) -> float:
    """Walltime speedup over target-only decoding: E / (c*k + 1), c = T_draft / T_target.

    Leviathan et al. 2023, Theorem 3.8: one step costs k draft passes (c*k target-pass units) plus one
    target pass verifying k+1 positions at the cost of one decode step, and yields E tokens.
    """
    _nonneg(c=c)
    return expected_tokens_per_step(alpha, k) / (c * k + 1)


def speculative_speedup_with_verify_cost(alpha: float, k: int, c: float, verify_cost: float) -> float:
    """Speedup when verifying k+1 tokens costs ``verify_cost`` x T_target: E / (c*k + verify_cost).

    Theorem 3.8 assumes verify_cost = 1 (decoding is memory-bound, so k+1 tokens cost one step);
    measured, the k+1-token pass costs somewhat more, more so at large batch where decode turns
    compute-bound.
    """
    _nonneg(c=c)
    _positive(verify_cost=verify_cost)
    return expected_tokens_per_step(alpha, k) / (c * k + verify_cost)


MAX_DRAFT_LENGTH = 100_000


def best_draft_length(alpha: float, c: float, k_max: int = 16, verify_cost: float = 1.0) -> int:
    """The draft length k in 1..k_max with the largest ``speculative_speedup_with_verify_cost``
    (k_max at most ``MAX_DRAFT_LENGTH``: each k is tried)."""
    _integer("k_max", k_max, 1)
    if k_max > MAX_DRAFT_LENGTH:
        raise ValueError(f"k_max must be at most {MAX_DRAFT_LENGTH} (each draft length is tried), got {k_max}")
    return max(range(1, k_max + 1),
               key=lambda k: speculative_speedup_with_verify_cost(alpha, k, c, verify_cost))


# ---------------------------------------------------------------------------------------------
# Batching (Yu et al. 2022, Orca: iteration-level scheduling)


def throughput_as_written(batch_size: int, mean_output_len: float, max_len: int, t_token: float) -> float:
    """The document's "continuous batching" throughput, in tokens/s.

    As written: Throughput_continuous = N * T_out / (max(L_i) * T_token), N the batch size, T_out the
    mean output length, L_i the i-th length, T_token the per-token (per-step) latency. This is in
    fact static batching's throughput: the batch runs max(L_i) steps of T_token each and yields
    N * T_out useful tokens. Continuous batching removes the max(L_i) (``continuous_batching_throughput``).
    """
    _nonneg_int(batch_size=batch_size)
    _nonneg(mean_output_len=mean_output_len)
    _positive_int(max_len=max_len)
    _positive(t_token=t_token)
    return batch_size * mean_output_len / (max_len * t_token)


def static_batching_throughput(output_lens: Sequence[int],
                               step_time: float | Callable[[int], float]) -> float:
    """Tokens/s of one static batch: sum(L_i) / (max(L_i) x step_time(N)).

    Every row runs until the longest is done (finished rows are padding but still computed), so each
    of the max(L_i) steps costs a batch-N step. ``step_time`` is seconds per step, or a function of
    the batch size giving it. With a constant it equals ``throughput_as_written``.
    """
    _check_lengths("output_lens", output_lens)
    n = len(output_lens)
    t = step_time(n) if callable(step_time) else step_time
    _positive(max_len=max(output_lens), step_time=t)
    return sum(output_lens) / (max(output_lens) * t)


def continuous_batching_throughput(mean_batch_size: float, step_time: float) -> float:
    """Steady-state tokens/s of continuous batching: mean running batch / step time.

    A finished sequence's slot is refilled at the next step, so every step yields one token per
    running sequence and no step is spent on padding.
    """
    _nonneg(mean_batch_size=mean_batch_size)
    _positive(step_time=step_time)
    return mean_batch_size / step_time


def static_batching_utilization(output_lens: Sequence[int]) -> float:
    """Fraction of static-batch slot-steps doing useful work: sum(L_i) / (N x max(L_i)) = mean/max."""
    _check_lengths("output_lens", output_lens)
    if max(output_lens) == 0:
        raise ValueError(f"output_lens must have a positive total, got {list(output_lens)}")
    return sum(output_lens) / (len(output_lens) * max(output_lens))


def continuous_batching_gain(output_lens: Sequence[int]) -> float:
    """Throughput gain of continuous over static batching at equal batch and step time: max/mean.

    What the document's "2-5x throughput" rests on: it grows with the spread of output lengths.
    """
    return 1.0 / static_batching_utilization(output_lens)


# ---------------------------------------------------------------------------------------------
# Attention memory and IO (Dao et al. 2022, FlashAttention)


def attention_scores_bytes(batch: int, heads: int, seq_len: int, dtype_bytes: float,
                           seq_k: int | None = None) -> float:
    """Bytes of one naive attention score matrix S = QK^T: B x H x S_q x S_k x sizeof (O(n^2)).

    The document's "Memory_standard = O(n^2)": naive attention materialises S in HBM, per layer,
    and P = softmax(S) beside it, the same size again; this counts S alone (what
    ``standard_attention_written_bytes`` counts twice).
    """
    seq_k = seq_len if seq_k is None else seq_k
    _nonneg_int(batch=batch, heads=heads, seq_len=seq_len, seq_k=seq_k)
    _positive(dtype_bytes=dtype_bytes)
    return batch * heads * seq_len * seq_k * dtype_bytes


def flash_attention_extra_bytes(batch: int, heads: int, seq_len: int, head_dim: int,
                                dtype_bytes: float) -> float:
    """Bytes FlashAttention writes besides its inputs: output O plus an fp32 logsumexp per row (O(n)).

    The document's "Memory_flash = O(n)": S and P live only in on-chip tiles; HBM holds
    O [B, H, S, D] and the softmax statistic L [B, H, S] (fp32, kept for the backward pass).
    """
    _nonneg_int(batch=batch, heads=heads, seq_len=seq_len, head_dim=head_dim)
    _positive(dtype_bytes=dtype_bytes)
    return batch * heads * seq_len * (head_dim * dtype_bytes + 4)


def standard_attention_written_bytes(batch: int, heads: int, seq_len: int, head_dim: int,
                                     dtype_bytes: float) -> float:
    """Bytes naive attention writes to HBM besides its inputs: S = QK^T, P = softmax(S) and the
    output O = PV, B x H x (2 x S^2 + S x D) x sizeof (Dao et al. 2022, Algorithm 0)."""
    _nonneg_int(head_dim=head_dim)
    return (2 * attention_scores_bytes(batch, heads, seq_len, dtype_bytes)
            + batch * heads * seq_len * head_dim * dtype_bytes)


def attention_memory_saving(seq_len: int, head_dim: int, dtype_bytes: float = 2) -> float:
    """How many times fewer bytes FlashAttention writes to HBM than naive attention, besides the
    inputs Q, K, V both read: naive writes S, P and O (``standard_attention_written_bytes``),
    flash writes O and an fp32 logsumexp per row (``flash_attention_extra_bytes``), so the ratio
    is (2 x S x sizeof + D x sizeof) / (D x sizeof + 4), ~ 2S/D. Both sides count the output O,
    which each attention writes; without it (S and P against the logsumexp alone) the ratio
    would be S x sizeof / 2, the extra bytes only.
    """
    _positive_int(seq_len=seq_len)
    return (standard_attention_written_bytes(1, 1, seq_len, head_dim, dtype_bytes)
            / flash_attention_extra_bytes(1, 1, seq_len, head_dim, dtype_bytes))


def attention_hbm_accesses_standard(seq_len: int, head_dim: int) -> float:
    """HBM element accesses of standard attention, Theta(N d + N^2) (Dao et al. 2022, Theorem 2)."""
    _nonneg_int(seq_len=seq_len, head_dim=head_dim)
    return seq_len * head_dim + seq_len**2


def attention_hbm_accesses_flash(seq_len: int, head_dim: int, sram_elements: int) -> float:
    """HBM element accesses of FlashAttention, Theta(N^2 d^2 / M), M the SRAM size in elements."""
    _nonneg_int(seq_len=seq_len, head_dim=head_dim)
    _positive_int(sram_elements=sram_elements)
    return seq_len**2 * head_dim**2 / sram_elements


# ---------------------------------------------------------------------------------------------
# FLOPs and the decode roofline (Kaplan et al. 2020; Williams et al. 2009)


def matmul_flops(m: int, n: int, k: int) -> float:
    """FLOPs of an [m, k] x [k, n] matmul: 2mnk (one multiply and one add per term)."""
    _nonneg_int(m=m, n=n, k=k)
    return 2 * m * n * k


def attention_flops(batch: int, heads: int, seq_q: int, seq_k: int, head_dim: int,
                    causal: bool = False) -> float:
    """FLOPs of attention: QK^T and PV, 2 x (2 B H S_q S_k D) = 4 B H S_q S_k D, over the
    (query, key) pairs a causal mask keeps if ``causal``.

    Causal is aligned bottom right, as the backends do: query i sees keys 0..S_k - S_q + i, so
    S_q S_k - S_q (S_q - 1) / 2 pairs remain. With S_q = S_k = S that is S (S + 1) / 2, half the
    scores and the diagonal (FlashAttention's benchmarks count exactly half, S^2 / 2: 1/S less);
    a decode step (S_q = 1) sees every key and counts in full.
    """
    _nonneg_int(batch=batch, heads=heads, seq_q=seq_q, seq_k=seq_k, head_dim=head_dim)
    if not causal:
        return 4 * batch * heads * seq_q * seq_k * head_dim
    if seq_q > seq_k:  # refused by every backend: the first queries would see no key at all
        raise ValueError(f"causal attention with seq_q ({seq_q}) greater than seq_k ({seq_k}) leaves rows with no key")
    # Halving S_q x S_k used to count a decode step (1 query, all keys visible) at half its FLOPs.
    pairs = seq_q * seq_k - seq_q * (seq_q - 1) // 2
    return 4 * batch * heads * pairs * head_dim


def forward_flops_per_token(num_params: float) -> float:
    """Forward FLOPs per token, ~2N (N parameters; Kaplan et al. 2020), attention excluded."""
    _nonneg(num_params=num_params)
    return 2 * num_params


def decode_bytes_per_token(num_params: float, weight_bytes_per_param: float,
                           kv_bytes_read: float = 0) -> float:
    """Bytes read from memory per decode step: N x bytes/param + the KV cache read (bytes).

    Each step streams every weight once (shared by the whole batch) plus each sequence's cache.
    """
    _nonneg(num_params=num_params, kv_bytes_read=kv_bytes_read)
    _positive(weight_bytes_per_param=weight_bytes_per_param)
    return num_params * weight_bytes_per_param + kv_bytes_read


def decode_tokens_per_s_bound(bandwidth_bytes_per_s: float, bytes_per_token: float,
                              batch_size: int = 1) -> float:
    """Memory-bound ceiling on decode speed: bandwidth / bytes read per step x batch (tokens/s).

    ``bytes_per_token`` is what one decode step reads (``decode_bytes_per_token``, with the KV of
    all B sequences); a step yields one token per sequence. Llama-2-7B fp16 at 3.35 TB/s:
    3.35e12 / 13.5e9 = 248 tokens/s at batch 1.
    """
    _positive(bandwidth_bytes_per_s=bandwidth_bytes_per_s, bytes_per_token=bytes_per_token)
    _nonneg_int(batch_size=batch_size)
    return bandwidth_bytes_per_s / bytes_per_token * batch_size


def arithmetic_intensity(flops: float, bytes_moved: float) -> float:
    """FLOPs per byte moved (FLOP/byte); below the ridge point a kernel is memory-bound."""
    _nonneg(flops=flops)
    _positive(bytes_moved=bytes_moved)
    return flops / bytes_moved


def roofline_flops_bound(peak_flops: float, bandwidth_bytes_per_s: float, intensity: float) -> float:
    """Attainable FLOP/s = min(peak, bandwidth x intensity) (Williams et al. 2009)."""
    _positive(peak_flops=peak_flops, bandwidth_bytes_per_s=bandwidth_bytes_per_s)
    _nonneg(intensity=intensity)
    return min(peak_flops, bandwidth_bytes_per_s * intensity)


def ridge_point(peak_flops: float, bandwidth_bytes_per_s: float) -> float:
    """Intensity (FLOP/byte) where the roofline turns from memory- to compute-bound: peak / bandwidth."""
    _positive(peak_flops=peak_flops, bandwidth_bytes_per_s=bandwidth_bytes_per_s)
    return peak_flops / bandwidth_bytes_per_s


# ---------------------------------------------------------------------------------------------
# PagedAttention (Kwon et al. 2023, vLLM)


def contiguous_reserved_bytes(max_len: int, bytes_per_token: float, batch_size: int = 1) -> float:
    """Bytes a contiguous cache reserves: max_len x bytes/token x B, however short the sequences."""
    _nonneg_int(max_len=max_len, batch_size=batch_size)
    _positive(bytes_per_token=bytes_per_token)
    return max_len * bytes_per_token * batch_size


def num_blocks(seq_len: int, block_size: int) -> int:
    """KV blocks a sequence of seq_len tokens occupies: ceil(s / block_size)."""
    _nonneg_int(seq_len=seq_len)
    _positive_int(block_size=block_size)
    return -(-seq_len // block_size)


def window_blocks(seq_len: int, block_size: int, window: int | None) -> int:
    """KV blocks a sequence of seq_len tokens holds when attention sees only the last ``window``
    tokens (Mistral's sliding window) and blocks that fall wholly out of it are freed, as vLLM's
    sliding-window manager frees them: ceil(window / block_size) + 1, since the window's first token
    need not start a block, and never more than ``num_blocks(seq_len)``. ``window=None``: no window."""
    full = num_blocks(seq_len, block_size)
    if window is None:
        return full
    _positive_int(window=window)
    return min(full, num_blocks(window, block_size) + 1)


def paged_reserved_tokens(seq_len: int, block_size: int) -> int:
    """Token slots a paged cache holds for one sequence: ceil(s / block_size) x block_size."""
    return num_blocks(seq_len, block_size) * block_size


def internal_fragmentation(seq_len: int, block_size: int) -> int:
    """Unused slots in a sequence's last block (tokens): reserved - s, always < block_size."""
    return paged_reserved_tokens(seq_len, block_size) - seq_len


def kv_waste_fraction_contiguous(seq_lens: Sequence[int], max_len: int) -> float:
    """Fraction of a contiguous cache's reserved slots left empty: 1 - sum(s_i) / (N x max_len).

    Kwon et al. 2023 measured 60-80% of KV memory wasted this way in earlier systems, which is the
    document's "60-80% KV cache" reduction for PagedAttention.
    """
    _check_lengths("seq_lens", seq_lens)
    _positive_int(max_len=max_len)
    if max(seq_lens) > max_len:
        raise ValueError(f"sequence lengths must lie in [0, max_len={max_len}], got {max(seq_lens)}")
    return 1 - sum(seq_lens) / (len(seq_lens) * max_len)


def kv_waste_fraction_paged(seq_lens: Sequence[int], block_size: int) -> float:
    """Fraction of a paged cache's reserved slots left empty: only the last block of each sequence.

    Sequences of 0 tokens reserve no block, so if all are empty nothing is wasted (0.0).
    """
    _check_lengths("seq_lens", seq_lens)
    _positive_int(block_size=block_size)
    reserved = sum(paged_reserved_tokens(s, block_size) for s in seq_lens)
    return 0.0 if reserved == 0 else 1 - sum(seq_lens) / reserved


# ---------------------------------------------------------------------------------------------
# The document's tables, as written


DOC_QUANT_TABLE: list[dict] = [
    {"method": "FP16 (baseline)", "bits": 16, "speedup": "1.0x", "quality_impact": "None",
     "memory_reduction": "1.0x", "speedup_x": 1.0, "memory_reduction_x": 1.0},
    {"method": "INT8", "bits": 8, "speedup": "~1.5x", "quality_impact": "Minimal",
     "memory_reduction": "2.0x", "speedup_x": 1.5, "memory_reduction_x": 2.0},
    {"method": "INT4 (GPTQ)", "bits": 4, "speedup": "~2.5x", "quality_impact": "Moderate",
     "memory_reduction": "4.0x", "speedup_x": 2.5, "memory_reduction_x": 4.0},
    {"method": "INT4 (AWQ)", "bits": 4, "speedup": "~2.5x", "quality_impact": "Low-Moderate",
     "memory_reduction": "4.0x", "speedup_x": 2.5, "memory_reduction_x": 4.0},
    {"method": "GGUF (llama.cpp)", "bits": "2-8", "speedup": "Variable", "quality_impact": "Variable",
     "memory_reduction": "Variable", "speedup_x": None, "memory_reduction_x": None},
]

DOC_OPTIMIZATION_SUMMARY: list[dict] = [
    {"technique": "INT8 Quantization", "latency_reduction": "1.5x", "memory_reduction": "2x",
     "implementation_effort": "Low"},
    {"technique": "INT4 Quantization", "latency_reduction": "2.5x", "memory_reduction": "4x",
     "implementation_effort": "Medium"},
    {"technique": "PagedAttention", "latency_reduction": "0% (throughput +)",
     "memory_reduction": "60-80% KV cache", "implementation_effort": "Low (use vLLM)"},
    {"technique": "Continuous Batching", "latency_reduction": "2-5x throughput",
     "memory_reduction": "Minimal", "implementation_effort": "Low (use vLLM)"},
    {"technique": "Speculative Decoding", "latency_reduction": "2-3x", "memory_reduction": "Minimal",
     "implementation_effort": "High"},
    {"technique": "Flash Attention", "latency_reduction": "2-4x", "memory_reduction": "5-20x",
     "implementation_effort": "Low (use PyTorch 2.0)"},
]
