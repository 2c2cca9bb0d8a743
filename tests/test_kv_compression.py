"""Compressing KV caches: exact while the sequence fits, bounded memory after, H2O against a naive twin."""
import dataclasses
import math

import pytest
import torch

from llmops_lab import formulas
from llmops_lab.config import ModelConfig
from llmops_lab.kv import (DocumentSlidingWindowCache, HeavyHitterKVCache, Int8KVCache, KVCache, SinkKVCache,
                           SlidingWindowKVCache, document_sliding_window_update, quantized_kv_cache_bytes)
from llmops_lab.kv.quantized import dequantize_per_token, quantize_per_token
from llmops_lab.model import LlamaModel

TINY = ModelConfig(vocab_size=320, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
L, HKV, D = 2, 2, 16

FACTORIES = {  # each holds 32 tokens
    "sliding": lambda m, B: SlidingWindowKVCache.for_model(m, B, 32),
    "sinks": lambda m, B: SinkKVCache.for_model(m, B, 28, num_sinks=4),
    "h2o": lambda m, B: HeavyHitterKVCache.for_model(m, B, heavy_size=12, recent_size=20),
}


@pytest.fixture(scope="module")
def model(random_llama):
    return random_llama(TINY)


def ids_for(B, T, seed=1):
    return torch.randint(3, TINY.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def decode(model, ids, cache, prefix):
    steps = [model(ids[:, :prefix], cache=cache)]
    steps += [model(ids[:, t:t + 1], cache=cache) for t in range(prefix, ids.shape[1])]
    return torch.cat(steps, 1)


@pytest.mark.parametrize("name", sorted(FACTORIES))
@pytest.mark.parametrize("B, prefix, T", [(1, 5, 32), (3, 13, 32), (2, 32, 32), (2, 1, 23)])
def test_exact_while_the_sequence_fits(model, name, B, prefix, T):
    ids = ids_for(B, T)
    cache = FACTORIES[name](model, B)
    out = decode(model, ids, cache, prefix)
    assert cache.length == T
    assert (out - model(ids)).abs().max() < 1e-4


@pytest.mark.parametrize("name", sorted(FACTORIES))
@pytest.mark.parametrize("prefix", [7, 32, 45])  # before, exactly at and past the budget
def test_memory_bounded_after_the_budget(model, name, prefix):
    B, T = 2, 70
    cache = FACTORIES[name](model, B)
    before = cache.nbytes
    decode(model, ids_for(B, T), cache, prefix)
    assert cache.length == T and cache.nbytes == before
    held = cache.update(0, *[torch.zeros(B, HKV, 1, D)] * 2, T, q=torch.zeros(B, 4, 1, D))[0] \
        if name == "h2o" else cache.update(0, *[torch.zeros(B, HKV, 1, D)] * 2, T)[0]
    assert held.shape[2] == 32
    kv = formulas.kv_cache_bytes(L, HKV, D, 32, 4, B)
    assert cache.nbytes == (kv + L * B * HKV * 32 * 4 if name == "h2o" else kv)  # H2O adds fp32 scores


@pytest.mark.parametrize("cls, kwargs", [(SlidingWindowKVCache, dict(window_size=32)),
                                         (SinkKVCache, dict(window_size=24, num_sinks=3))])
@pytest.mark.parametrize("prefix", [1, 10, 27, 50])
def test_ring_holds_exactly_the_kept_positions(model, cls, kwargs, prefix):
    B, T = 2, 61
    ids = ids_for(B, T, seed=4)
    full, ring = KVCache.for_model(model, B, T), cls.for_model(model, B, **kwargs)
    decode(model, ids, full, prefix)
    decode(model, ids, ring, prefix)
    keep = ring.kept_positions(T)
    assert len(keep) == ring.capacity
    # Layer 0's keys depend only on the token and its position; deeper ones differ once tokens are dropped.
    assert torch.equal(ring.k[0][:, :, ring.slot(keep)], full.k[0][:, :, keep])
    assert torch.equal(ring.v[0][:, :, ring.slot(keep)], full.v[0][:, :, keep])


def windowed_twin(model, window):
    """The same weights in a Mistral-style model whose own mask windows every query, the prompt's too."""
    windowed = LlamaModel(dataclasses.replace(TINY, model_type="mistral", sliding_window=window)).eval()
    windowed.load_state_dict(model.state_dict())
    return windowed


@torch.no_grad()
@pytest.mark.parametrize("prefix", [1, 9, 16, 17, 30, 45])      # prompts up to W long, and longer
def test_sliding_window_equals_mistral_sliding_window_attention(model, prefix):
    # A prompt of at most W tokens is inside every query's window; a longer one is windowed by the
    # cache's prefill_mask, as Mistral windows its prompt. Each decoded token then attends to exactly
    # the last W positions, so every logit equals Mistral's.
    ids = ids_for(2, 60)
    out = decode(model, ids, SlidingWindowKVCache.for_model(model, 2, 16), prefix=prefix)
    assert (out - windowed_twin(model, 16)(ids)).abs().max() < 1e-4


@torch.no_grad()
@pytest.mark.parametrize("num_sinks, window", [(4, 12), (1, 5), (0, 9)])
@pytest.mark.parametrize("prefix", [3, 16, 17, 40])  # below, at and past num_sinks + window
def test_a_prompt_prefilled_at_once_sees_what_it_would_streamed(model, num_sinks, window, prefix):
    """StreamingLLM streams its text token by token through the cache; a prompt prefilled in one
    pass (prefill_mask: sinks and the last W positions) gives the same logits at every position."""
    ids = ids_for(2, 48)
    at_once = decode(model, ids, SinkKVCache.for_model(model, 2, window, num_sinks=num_sinks), prefix=prefix)
    streamed = decode(model, ids, SinkKVCache.for_model(model, 2, window, num_sinks=num_sinks), prefix=1)
    assert (at_once - streamed).abs().max() < 1e-4


def test_prefill_mask_is_the_reach_of_a_decode_step():
    cache = SinkKVCache(1, 1, 1, 4, window_size=3, num_sinks=2)
    assert cache.prefill_mask(5) is None                   # 5 = num_sinks + window: all in reach
    m = cache.prefill_mask(7)[0, 0]
    assert m[6].tolist() == [True, True, False, False, True, True, True]   # sinks 0-1, window 4-6
    assert m[5].tolist() == [True, True, False, True, True, True, False]
    assert not m.triu(1).any()                             # causal


@torch.no_grad()
@pytest.mark.parametrize("prefix", [1, 16, 30])
def test_h2o_without_heavy_hitters_is_a_sliding_window(model, prefix):
    """Equal while the prompt fits the window. Past it they part: H2O attends to the whole prompt,
    as the paper's implementation prefills before it evicts, and the window masks the prompt."""
    ids = ids_for(2, 60)
    a = decode(model, ids, HeavyHitterKVCache.for_model(model, 2, heavy_size=0, recent_size=16), prefix=prefix)
    b = decode(model, ids, SlidingWindowKVCache.for_model(model, 2, 16), prefix=prefix)
    assert ((a - b).abs().max() < 1e-5) == (prefix <= 16)


def h2o_reference(q, k, heavy, recent, prefix):
    """Naive H2O over full-length tensors: which positions each (row, KV head) holds at the end."""
    B, H, T, Dh = q.shape
    Hkv = k.shape[1]
    kk = k.repeat_interleave(H // Hkv, 1)
    alive = torch.zeros(B, Hkv, T, dtype=torch.bool)
    score = torch.zeros(B, Hkv, T)

    def add_weights(qi, visible):  # qi [B, H, D]; visible [B, Hkv, T]
        s = torch.einsum("bhd,bhtd->bht", qi, kk) / math.sqrt(Dh)
        s = s.masked_fill(~visible.repeat_interleave(H // Hkv, 1), float("-inf"))
        score.add_(s.softmax(-1).view(B, Hkv, H // Hkv, T).sum(2))

    for i in range(prefix):
        add_weights(q[:, :, i], (torch.arange(T) <= i).expand(B, Hkv, T))
    alive[..., :prefix] = True
    for b in range(B):
        for h in range(Hkv):
            if prefix > heavy + recent:
                old = prefix - recent
                top = score[b, h, :old].topk(heavy).indices
                alive[b, h, :old] = False
                alive[b, h, top] = True
    for t in range(prefix, T):
        for b in range(B):
            for h in range(Hkv):
                pos = alive[b, h].nonzero()[:, 0]
                if len(pos) == heavy + recent:
                    cand = pos[: len(pos) - (recent - 1)]
                    alive[b, h, cand[score[b, h, cand].argmin()]] = False
        alive[..., t] = True
        add_weights(q[:, :, t], alive)
    return alive


@pytest.mark.parametrize("heavy, recent, prefix", [(5, 3, 4), (5, 3, 20), (4, 1, 9), (0, 6, 12), (6, 6, 12)])
def test_h2o_keeps_what_the_naive_reference_keeps(heavy, recent, prefix):
    B, H, T = 2, 4, 40
    g = torch.Generator().manual_seed(heavy * 100 + prefix)
    q, k = torch.randn(B, H, T, D, generator=g) * 2, torch.randn(B, HKV, T, D, generator=g)
    cache = HeavyHitterKVCache(1, B, HKV, D, heavy, recent)
    cache.update(0, k[:, :, :prefix], k[:, :, :prefix], 0, q=q[:, :, :prefix])
    for t in range(prefix, T):
        cache.update(0, k[:, :, t:t + 1], k[:, :, t:t + 1], t, q=q[:, :, t:t + 1])
    alive = h2o_reference(q, k, heavy, recent, prefix)
    for b in range(B):
        for h in range(HKV):
            assert torch.equal(cache.k[0][b, h], k[b, h, alive[b, h]])


def test_int8_round_trip_within_half_a_step():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 50, 64, generator=g) * torch.logspace(-3, 2, 50)[:, None]
    x[0, 0, 0] = 0.0
    q, scale = quantize_per_token(x, torch.float32)
    err = (dequantize_per_token(q, scale) - x).abs()
    assert q.dtype == torch.int8 and int(q.abs().max()) <= 127
    assert (err <= scale / 2 * (1 + 1e-6)).all()
    bound = formulas.quant_error_bound_symmetric(float(x[1, 1, 7].abs().max()), 8)
    assert float(err[1, 1, 7].max()) <= bound * (1 + 1e-6)
    q16, s16 = quantize_per_token(x)  # fp16 scales: still within half of the stored step
    assert ((dequantize_per_token(q16, s16) - x).abs() <= s16.float() / 2 * (1 + 1e-3) + 1e-7).all()


@torch.no_grad()
def test_int8_cache_decodes_close_to_the_full_cache_in_less_memory(model):
    ids = ids_for(2, 40)
    cache = Int8KVCache.for_model(model, 2, 64)
    out = decode(model, ids, cache, prefix=10)
    assert (out - model(ids)).abs().max() < 2e-2
    assert cache.nbytes == quantized_kv_cache_bytes(L, HKV, D, 64, 8, 2, batch_size=2)
    assert cache.nbytes < KVCache.for_model(model, 2, 64).nbytes / 3


def test_document_update_only_slices_what_it_is_handed():
    history = torch.randn(1, 2, 10, 4)
    k, _ = document_sliding_window_update(history, history, 4)
    assert torch.equal(k, history[..., -4:, :]) and k.untyped_storage().nbytes() == history.nbytes
    one, _ = document_sliding_window_update(history[..., -1:, :], history[..., -1:, :], 4)
    assert one.shape[-2] == 1  # a decode step sees only itself: nothing was stored


@torch.no_grad()
def test_document_class_in_the_runtime_forgets_the_prompt(model):
    ids = ids_for(1, 20)
    out = decode(model, ids, DocumentSlidingWindowCache(8), prefix=6)
    assert (out[:, :6] - model(ids)[:, :6]).abs().max() < 1e-4
    assert (out[:, 6:] - model(ids)[:, 6:]).abs().max() > 1e-2


@pytest.mark.parametrize("make, match", [
    (lambda m: SlidingWindowKVCache.for_model(m, 1, 257), "exceeds the model's context"),
    (lambda m: SlidingWindowKVCache.for_model(m, 1, 0), "window_size must be >= 1"),
    (lambda m: SinkKVCache.for_model(m, 1, 250, num_sinks=8), "exceeds the model's context"),
    (lambda m: SinkKVCache.for_model(m, 1, 8, num_sinks=-1), "num_sinks"),
    (lambda m: HeavyHitterKVCache.for_model(m, 1, 8, 0), "recent_size must be >= 1"),
    (lambda m: HeavyHitterKVCache.for_model(m, 1, 200, 100), "exceeds the model's context"),
    (lambda m: Int8KVCache.for_model(m, 1, 300), "exceeds the model's context"),
    (lambda m: SlidingWindowKVCache.for_model(
        LlamaModel(dataclasses.replace(TINY, model_type="mistral", sliding_window=16)), 1, 8), "own sliding window"),
])
def test_bad_configuration_is_a_clear_error(model, make, match):
    with pytest.raises(ValueError, match=match):
        make(model)


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_a_padding_mask_is_refused_by_an_evicting_cache(model, name):
    # the decode step after it failed deep in the attention ("size of tensor a (10) must match ...")
    cache, mask = FACTORIES[name](model, 2), torch.ones(2, 8, dtype=torch.long)
    mask[1, :3] = 0
    with pytest.raises(ValueError, match="keeps only some positions"):
        model(ids_for(2, 8), cache=cache, attention_mask=mask)
    assert cache.length == 0


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_chunked_prefill_and_wrong_batch_are_refused(model, name):
    cache = FACTORIES[name](model, 2)
    model(ids_for(2, 8), cache=cache)
    with pytest.raises(ValueError, match="chunked prefill"):
        model(ids_for(2, 4), cache=cache)
    with pytest.raises(ValueError, match="batch"):
        model(ids_for(3, 1), cache=cache)
    with pytest.raises(ValueError, match="static-shape"):
        cache.update(0, torch.zeros(2, HKV, 1, D), torch.zeros(2, HKV, 1, D), torch.tensor([3, 4]),
                     **({"q": torch.zeros(2, 4, 1, D)} if name == "h2o" else {}))


def test_h2o_needs_the_queries():
    cache = HeavyHitterKVCache(1, 1, HKV, D, 4, 4)
    with pytest.raises(ValueError, match="queries"):
        cache.update(0, torch.zeros(1, HKV, 3, D), torch.zeros(1, HKV, 3, D), 0)


@pytest.mark.parametrize("name", sorted(FACTORIES) + ["full", "int8"])
def test_negative_start_is_refused(model, name):
    """A negative position used to slice from the end of the buffer: the full cache wrote into
    slot 6 and returned 7 positions, the int8 and sink caches returned no keys at all."""
    makers = dict(FACTORIES, full=lambda m, B: KVCache.for_model(m, B, 16), int8=lambda m, B: Int8KVCache.for_model(m, B, 16))
    cache = makers[name](model, 1)
    extra = {"q": torch.zeros(1, 4, 1, D)} if name == "h2o" else {}
    with pytest.raises(ValueError, match="start must be"):
        cache.update(0, torch.zeros(1, HKV, 1, D), torch.zeros(1, HKV, 1, D), -2, **extra)


def test_int8_cache_refuses_values_its_scales_cannot_hold():
    """fp16 scales hold |x| up to 127 x 65504; past that (or at inf) the codes used to come back
    as NaN. fp32 scales hold them; a non-float scale dtype is refused up front."""
    big = torch.full((1, HKV, 1, D), 1e7)
    with pytest.raises(ValueError, match="float32"):
        Int8KVCache(1, 1, HKV, D, 4).update(0, big, big, 0)
    k, _ = Int8KVCache(1, 1, HKV, D, 4, scale_dtype=torch.float32).update(0, big, big, 0)
    assert torch.allclose(k, big)
    inf = big.clone()
    inf[0, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="inf or NaN"):
        Int8KVCache(1, 1, HKV, D, 4, scale_dtype=torch.float32).update(0, inf, inf, 0)
    with pytest.raises(ValueError, match="floating-point"):
        Int8KVCache(1, 1, HKV, D, 4, scale_dtype=torch.int8)


# --- kv.experiment: bad arguments are refused, not turned into a wrong number -------------------

def _flat_ids(n, seed=2):
    return torch.randint(3, TINY.vocab_size, (n,), generator=torch.Generator().manual_seed(seed))


def test_compression_quality_rows_name_what_each_cache_holds(model):
    from llmops_lab.kv import experiment
    rows = experiment.compression_quality(model, _flat_ids(64), budgets=(8,), window_len=32, num_windows=1,
                                          num_prompts=1, prefix=8, methods=("full", "sliding window"))
    held = {(r["method"], r["budget"]): r["tokens_held"] for r in rows}
    assert held == {("full", None): 32, ("sliding window", 8): 8}
    assert all(math.isfinite(r["perplexity"]) for r in rows)


@pytest.mark.parametrize("kwargs, match", [
    (dict(budgets=(0,)), "budget must be >= 1, got 0"),  # used to run a full cache labelled budget 0
    (dict(budgets=(-4,)), "budget must be >= 1, got -4"),
    (dict(num_windows=0), "num_windows must be >= 1, got 0"),  # used to give perplexity NaN
    (dict(num_prompts=0), "num_prompts must be >= 1, got 0"),
    (dict(prefix=0), "prefix must be >= 1, got 0"),
    (dict(prefix=32), r"prefix must be < window_len \(32\), got 32"),
    (dict(window_len=300), "window_len 300 exceeds the model's context"),
    (dict(num_windows=4), "at least 160 token ids"),
    (dict(methods=("full", "foo")), r"unknown methods \['foo'\]"),
])
def test_compression_quality_refuses_bad_arguments(model, kwargs, match):
    from llmops_lab.kv import experiment
    args = dict(budgets=(8,), window_len=32, num_windows=1, num_prompts=1, prefix=8,
                methods=("full", "sliding window"))
    with pytest.raises(ValueError, match=match):
        experiment.compression_quality(model, _flat_ids(64), **{**args, **kwargs})


@pytest.mark.parametrize("kwargs, match", [
    (dict(prefix=40), r"prefix must be < window_len \(32\), got 40"),  # used to return NaN
    (dict(prefix=32), r"prefix must be < window_len \(32\), got 32"),
    (dict(prefix=0), "prefix must be >= 1, got 0"),  # used to be a shape mismatch
    (dict(num_windows=0), "num_windows must be >= 1, got 0"),
    (dict(num_windows=3), "at least 96 token ids, got shape \\(64,\\)"),  # used to be a view error
    (dict(window_len=300), "window_len 300 exceeds the model's context"),
])
def test_parallel_perplexity_refuses_bad_arguments(model, kwargs, match):
    from llmops_lab.kv import experiment
    with pytest.raises(ValueError, match=match):
        experiment.parallel_perplexity(model, _flat_ids(64), **{**dict(window_len=32, num_windows=2, prefix=8), **kwargs})


def test_parallel_perplexity_matches_the_full_cache(model):
    from llmops_lab.kv import experiment
    ids = _flat_ids(64)
    rows = experiment.compression_quality(model, ids, budgets=(), window_len=32, num_windows=1, num_prompts=1,
                                          prefix=8, methods=("full",))
    parallel = experiment.parallel_perplexity(model, ids, window_len=32, num_windows=1, prefix=8)
    assert rows[0]["perplexity"] == pytest.approx(parallel, rel=1e-4)


@pytest.mark.parametrize("method, budget, match, error", [
    ("foo", 8, "unknown method 'foo'; methods:", ValueError),  # used to return 4096
    ("sliding window", None, "'sliding window' needs a budget", ValueError),
    ("H2O", 0, "budget must be >= 1, got 0", ValueError),
    ("attention sinks", 8.5, "budget must be an integer", ValueError),
])
def test_expected_kv_bytes_refuses_bad_arguments(method, budget, match, error):
    from llmops_lab.kv import experiment
    with pytest.raises(error, match=match):
        experiment.expected_kv_bytes(TINY, method, 32, budget)


def test_sizes_and_windows_that_meant_nothing_are_refused(model):
    """for_model read max_seq_len=0 as "not given" (the whole context); a 0-bit quantized cache
    was sized at its scales alone; the document's window of 0 kept everything (its slice [-0:])."""
    from llmops_lab.kv import experiment
    from llmops_lab.kv.quantized import quantized_kv_cache_bytes
    for cls in (KVCache, Int8KVCache):
        with pytest.raises(ValueError, match="max_seq_len"):
            cls.for_model(model, 1, max_seq_len=0)
    with pytest.raises(ValueError, match="bits"):
        quantized_kv_cache_bytes(2, 2, 16, 32, bits=0)
    for w in (0, -3, 2.5):
        with pytest.raises(ValueError, match="window_size"):
            DocumentSlidingWindowCache(w)
    with pytest.raises(ValueError, match="evict nothing"):   # a ring larger than the text
        experiment.compression_quality(model, _flat_ids(64), budgets=(64,), window_len=32, num_windows=1,
                                       num_prompts=1, prefix=8)


def test_expected_kv_bytes_of_known_methods():
    from llmops_lab.kv import experiment
    full = formulas.kv_cache_bytes(L, HKV, D, 32, 4)
    assert experiment.expected_kv_bytes(TINY, "full", 32) == full
    assert experiment.expected_kv_bytes(TINY, "sliding window", 32, 8) == full // 4
    # a budget past the sequence: the ring's slots are allocated all the same (it counted 32 tokens)
    assert experiment.expected_kv_bytes(TINY, "sliding window", 32, 64) == 2 * full
    assert experiment.expected_kv_bytes(TINY, "document as written", 32) == 0


@pytest.mark.parametrize("kwargs, match", [
    (dict(new_tokens=(8, 60)), "prompt_len 8 \\+ new_tokens 60 exceeds the model's context of 32"),
    (dict(new_tokens=(8, 25)), "prompt_len 8 \\+ new_tokens 25 exceeds"),
    (dict(new_tokens=(0,)), "new_tokens must be >= 1, got 0"),
    (dict(prompt_len=0), "prompt_len must be >= 1, got 0"),
    (dict(batch_size=0), "batch_size must be >= 1, got 0"),
])
def test_generation_peak_vs_formula_refuses_lengths_past_the_context(random_llama, kwargs, match):
    """It used to report x = prompt + new_tokens and its formula for lengths generate had cut short."""
    from llmops_lab.kv import experiment
    short = random_llama(dataclasses.replace(TINY, max_position_embeddings=32))
    with pytest.raises(ValueError, match=match):
        experiment.generation_peak_vs_formula(short, **{**dict(new_tokens=(8,), prompt_len=8, batch_size=1), **kwargs})


def test_caches_refuse_keys_that_would_broadcast_or_misplace():
    """One KV head into a 2-head cache (or a head dim of 1) was broadcast into every slot; layer -1
    wrote the last layer; per-row positions with several tokens wrote only the first (found by an
    adversarial probe)."""
    caches = [KVCache(2, 1, 2, 4, 8), Int8KVCache(2, 1, 2, 4, 8), SinkKVCache(2, 1, 2, 4, 2, 4),
              HeavyHitterKVCache(2, 1, 2, 4, 2, 2)]
    for c in caches:
        kw = {"q": torch.randn(1, 2, 1, 4)} if isinstance(c, HeavyHitterKVCache) else {}
        for k, layer, match in ((torch.randn(1, 1, 1, 4), 0, "KV heads"), (torch.randn(1, 2, 1, 1), 0, "KV heads"),
                                (torch.randn(1, 2, 1, 4), -1, "layer"), (torch.randn(2, 2, 1, 4), 0, "batch")):
            with pytest.raises(ValueError, match=match):
                c.update(layer, k, k, 0, **kw)
    c = KVCache(1, 2, 2, 4, 8)
    with pytest.raises(ValueError, match="one token per row"):
        c.update(0, torch.randn(2, 2, 3, 4), torch.randn(2, 2, 3, 4), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="one token per row"):
        c.update(0, torch.randn(2, 2, 1, 4), torch.randn(2, 2, 1, 4), torch.tensor([0]))


@pytest.mark.parametrize("magnitude", [1.0, 1e-3, 1e-4, 1e-6])
def test_int8_kv_error_bound_holds_for_small_values(magnitude):
    """Half a stored step at any magnitude: fp16 scales floored at the smallest *normal* value put
    vectors under 0.008 on a coarser grid (34x the bound at 1e-4, all zeros at 1e-6), and a scale
    rounded down pushed codes past 127."""
    x = torch.randn(64, 64, generator=torch.Generator().manual_seed(0)) * magnitude
    q, s = quantize_per_token(x)
    err = (dequantize_per_token(q, s) - x).abs()
    assert bool((err <= s.float() / 2 * (1 + 1e-3)).all())
    assert float((err.amax(-1) / x.abs().amax(-1)).max()) < 0.02


def test_caches_refuse_a_gap_in_positions():
    """A write past the positions a layer holds left unwritten slots that the next step attended to
    (zeros, without a word); rewriting held positions stays allowed (speculative decoding's roll-back)."""
    kv = lambda S: torch.randn(1, 2, S, 4)
    for c in (KVCache(2, 1, 2, 4, 16), Int8KVCache(2, 1, 2, 4, 16), SinkKVCache(2, 1, 2, 4, 4, 2),
              SlidingWindowKVCache(2, 1, 2, 4, 4), HeavyHitterKVCache(2, 1, 2, 4, 2, 2)):
        kw = lambda S: {"q": torch.randn(1, 2, S, 4)} if isinstance(c, HeavyHitterKVCache) else {}
        with pytest.raises(ValueError, match="gap|starts at 0"):
            c.update(0, kv(1), kv(1), 3, **kw(1))
        c.update(0, kv(5), kv(5), 0, **kw(5))
        c.update(1, kv(5), kv(5), 0, **kw(5))           # each layer keeps its own count
        c.update(0, kv(1), kv(1), 5, **kw(1))
        with pytest.raises(ValueError, match="gap|starts at 6"):
            c.update(0, kv(1), kv(1), 7, **kw(1))
        c.reset()
        with pytest.raises(ValueError, match="gap|starts at 0"):
            c.update(0, kv(1), kv(1), 6, **kw(1))
        c.update(0, kv(3), kv(3), 0, **kw(3))            # a new sequence after reset()
    full = KVCache(1, 1, 2, 4, 16)
    full.update(0, kv(6), kv(6), 0)
    full.update(0, kv(2), kv(2), 3)                      # rewrite held positions: allowed


@pytest.mark.parametrize("make, match", [
    (lambda: KVCache(2, 1.5, 2, 4, 8), "batch_size must be an integer"),
    (lambda: KVCache(2, 1, 2, 4, 8.0), "max_seq_len must be an integer"),
    (lambda: Int8KVCache(True, 1, 2, 4, 8), "num_layers must be an integer"),
    (lambda: SinkKVCache(2, 1, 2, 4, 4.5, 2), "window_size must be"),
    (lambda: SinkKVCache(2, 1, 2, 4, 4, 1.5), "num_sinks must be an integer"),
    (lambda: SlidingWindowKVCache(2, 1, 2, 4.0, 4), "head_dim must be an integer"),
    (lambda: HeavyHitterKVCache(2, 1, 2, 4, 2.5, 2), "heavy_size must be an integer"),
    (lambda: HeavyHitterKVCache(2, 1, 2, 4, 2, 2.0), "recent_size must be"),
])
def test_cache_sizes_must_be_integers(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_h2o_checks_the_queries_shape():
    """Queries of another length or batch were broadcast into the scores: the wrong tokens evicted."""
    c = HeavyHitterKVCache(1, 2, 2, 4, 2, 2)
    k = torch.randn(2, 2, 3, 4)
    for q in (torch.randn(2, 4, 1, 4), torch.randn(1, 4, 3, 4), torch.randn(2, 3, 3, 4), torch.randn(2, 4, 3)):
        with pytest.raises(ValueError, match="q must be"):
            c.update(0, k, k, 0, q=q)
    c.update(0, k, k, 0, q=torch.randn(2, 4, 3, 4))
