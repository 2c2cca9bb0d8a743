"""evaluate and roofline: bad arguments are a clear error, never a ZeroDivisionError or a silent wrong number."""
import math

import pytest
import torch

from llmops_lab import evaluate, roofline
from llmops_lab.config import ModelConfig

TINY = ModelConfig(vocab_size=320, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


@pytest.fixture(scope="module")
def model(random_llama):
    return random_llama(TINY)


def ids_for(n, seed=1):
    return torch.randint(3, TINY.vocab_size, (n,), generator=torch.Generator().manual_seed(seed))


class WordTokenizer:
    """Just enough of a tokenizer for ``held_out_prompts``: one token per word, ids from 3 up."""

    def __init__(self, bos_token_id=1):
        self.bos_token_id = bos_token_id

    def __call__(self, text, add_special_tokens=False, verbose=False):
        return {"input_ids": [3 + len(w) for w in text.split()]}


TEXT = " ".join("word" * (i % 5 + 1) for i in range(40))  # 40 tokens


def test_perplexity_of_good_arguments(model):
    ids = ids_for(97)
    ppl = evaluate.perplexity(model, ids, window=32, max_windows=2, batch_size=1)
    assert math.isfinite(ppl) and ppl > 1
    assert evaluate.perplexity(model, ids, window=32, max_windows=2, batch_size=2) == pytest.approx(ppl, rel=1e-5)
    assert math.isfinite(evaluate.perplexity(model, ids[:10], window=32))  # a short text is one window
    # int32 ids, which the model takes, were a cross_entropy error
    assert evaluate.perplexity(model, ids.int(), window=32, max_windows=2) == pytest.approx(ppl, rel=1e-6)


def test_scored_tokens_counts_whole_windows_only(model):
    """97 ids give 96 targets: 3 windows of 32; 100 ids, the same 3 (the last 3 targets are left
    out, and perplexity is the same); a short text, all its targets."""
    assert evaluate.scored_tokens(97, window=32) == 96
    assert evaluate.scored_tokens(100, window=32) == 96
    assert evaluate.scored_tokens(100, window=32, max_windows=2) == 64
    assert evaluate.scored_tokens(10, window=32) == 9
    ids = ids_for(100)
    assert evaluate.perplexity(model, ids, window=32) == pytest.approx(evaluate.perplexity(model, ids[:97], window=32))
    with pytest.raises(ValueError, match="no next token"):
        evaluate.scored_tokens(1)


@pytest.mark.parametrize("kwargs, match, error", [
    (dict(window=0), "window must be >= 1, got 0", ValueError),  # used to be ZeroDivisionError
    (dict(window=-5), "window must be >= 1, got -5", ValueError),  # used to be "stack expects a non-empty"
    (dict(window=65), "window 65 exceeds the model's context of 64", ValueError),
    (dict(max_windows=0), "max_windows must be >= 1, got 0", ValueError),
    (dict(batch_size=0), "batch_size must be >= 1, got 0", ValueError),  # used to be range() arg 3 error
    (dict(batch_size=-1), "batch_size must be >= 1, got -1", ValueError),  # used to be ZeroDivisionError
    (dict(window=8.0), "window must be an integer", ValueError),
    (dict(window=None), "window must be an integer, got None", TypeError),
    (dict(ids=torch.rand(97)), "integer token ids", ValueError),
])
def test_perplexity_refuses_bad_arguments(model, kwargs, match, error):
    with pytest.raises(error, match=match):
        evaluate.perplexity(model, kwargs.pop("ids", ids_for(97)), **kwargs)


def test_greedy_agreement_refuses_no_prompts(model):
    with pytest.raises(ValueError, match="at least one prompt"):  # used to be ZeroDivisionError
        evaluate.greedy_agreement(model, model, [])


def test_held_out_prompts_with_and_without_bos():
    with_bos = evaluate.held_out_prompts(WordTokenizer(1), TEXT, n=3, prompt_tokens=8)
    assert [len(p) for p in with_bos] == [8] * 3 and all(p[0] == 1 for p in with_bos)
    without = evaluate.held_out_prompts(WordTokenizer(None), TEXT, n=3, prompt_tokens=8)
    assert [len(p) for p in without] == [8] * 3  # used to be "Could not infer dtype of NoneType"
    assert all(torch.equal(a[1:], b[:7]) for a, b in zip(with_bos, without))  # the same places in the text


@pytest.mark.parametrize("bos, kwargs, match", [
    (1, dict(prompt_tokens=40), "text of 40 tokens is too short for prompts of 40 tokens"),
    (1, dict(prompt_tokens=100), "text of 40 tokens is too short"),  # used to be a random_ error
    (1, dict(prompt_tokens=0), "prompt_tokens must be >= 1, got 0"),  # used to give 1-token prompts
    (1, dict(prompt_tokens=1), "prompt_tokens must be >= 2"),
    (None, dict(prompt_tokens=0), "prompt_tokens must be >= 1, got 0"),
    (1, dict(n=0), "n must be >= 1, got 0"),
])
def test_held_out_prompts_refuses_bad_arguments(bos, kwargs, match):
    with pytest.raises(ValueError, match=match):
        evaluate.held_out_prompts(WordTokenizer(bos), TEXT, **kwargs)


@pytest.mark.parametrize("args, kwargs, match", [
    ((0, 64, 1e10), {}, "batch_size must be >= 1, got 0"),  # used to return 0.0
    ((1, -1, 1e10), {}, "context_len must be >= 0, got -1"),
    ((1, 64, 0.0), {}, "must be > 0, got 0.0"),
    ((1, 64, 1e10), dict(flops=0.0), "flops must be > 0, got 0.0"),
    ((1, 64, 1e10), dict(flops=-1e9), "flops must be > 0"),
])
def test_decode_bound_refuses_bad_arguments(model, args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        roofline.decode_bound(model, *args, **kwargs)


def test_config_decode_bound_refuses_batch_zero():
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        roofline.config_decode_bound(TINY, 0, 64, 1e10)


def test_config_decode_bound_reads_a_sliding_windows_kv_only():
    # Mistral-7B holds and reads at most 4096 tokens of KV per sequence; the bound counted the whole
    # context, 1.9x too low at batch 256 and context 8192
    from llmops_lab import formulas, presets
    c = presets.get_preset("mistral-7b")
    weights = c.num_parameters() * 2 - c.vocab_size * c.hidden_size * 2
    for ctx in (1024, 4096, 8192, 32768):
        kv = formulas.kv_cache_bytes_for(c, min(ctx, c.sliding_window), 256, 2)
        want = formulas.decode_tokens_per_s_bound(3.35e12, weights + kv, 256)
        assert roofline.config_decode_bound(c, 256, ctx, 3.35e12) == pytest.approx(want)
    assert roofline.config_decode_bound(c, 256, 8192, 3.35e12) == roofline.config_decode_bound(c, 256, 4096, 3.35e12)


@pytest.mark.parametrize("kwargs, match", [
    (dict(new_tokens=1), "new_tokens must be >= 2, got 1"),  # used to be ZeroDivisionError
    (dict(new_tokens=0), "new_tokens must be >= 2, got 0"),
    (dict(batch_size=0), "batch_size must be >= 1, got 0"),
    (dict(prompt_len=0), "prompt_len must be >= 1, got 0"),
    (dict(prompt_len=16, new_tokens=60), "prompt_len 16 \\+ new_tokens 60 exceeds the model's context of 64"),
])
def test_decode_throughput_refuses_bad_arguments(model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        roofline.decode_throughput(model, **{**dict(repeats=1), **kwargs})
