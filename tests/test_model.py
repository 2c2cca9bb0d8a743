"""Our runtime against transformers: logits, greedy tokens, padding, families, bad input."""
import dataclasses

import pytest
import torch
from transformers import AutoModelForCausalLM

import llmops_lab
from llmops_lab.config import ModelConfig
from llmops_lab.kv import KVCache
from llmops_lab.model import LlamaModel

TINY = ModelConfig(vocab_size=320, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                   bos_token_id=0, eos_token_id=1)
FAMILIES = {
    "llama": TINY,
    "llama-mha-tied": dataclasses.replace(TINY, num_key_value_heads=4, tie_word_embeddings=True),
    "llama3-rope": dataclasses.replace(TINY, rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64}),
    "mistral-window": dataclasses.replace(TINY, model_type="mistral", sliding_window=16),
    "qwen2-bias": dataclasses.replace(TINY, model_type="qwen2", attention_bias=True, tie_word_embeddings=True),
}


def random_checkpoint(config, folder):
    torch.manual_seed(0)
    m = LlamaModel(config)
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.08)
    llmops_lab.save_model(m, folder, extra_config={"use_sliding_window": config.sliding_window is not None})
    return folder


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def pair(request, tmp_path_factory):
    folder = random_checkpoint(FAMILIES[request.param], tmp_path_factory.mktemp(request.param))
    ours = llmops_lab.load_model(folder, device="cpu")
    theirs = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return ours, theirs


def padded_batch(vocab, lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    S = max(lengths)
    ids = torch.randint(3, vocab, (len(lengths), S), generator=g)
    mask = torch.zeros(len(lengths), S, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, S - n:] = 1
        ids[i, : S - n] = 2
    return ids, mask


@torch.no_grad()
def test_logits_match_transformers(pair):
    ours, theirs = pair
    ids = torch.randint(0, ours.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    assert (ours(ids) - theirs(ids).logits).abs().max() < 1e-4


@torch.no_grad()
def test_padded_logits_match_transformers(pair):
    ours, theirs = pair
    ids, mask = padded_batch(ours.config.vocab_size, [30, 17, 9])
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    a, b = ours(ids, attention_mask=mask), theirs(ids, attention_mask=mask, position_ids=pos).logits
    assert (a - b)[mask.bool()].abs().max() < 1e-4


def test_greedy_tokens_match_transformers(pair):
    ours, theirs = pair
    ids, mask = padded_batch(ours.config.vocab_size, [12, 5])
    a = ours.generate(ids, attention_mask=mask, max_new_tokens=40, stop_token_ids=())
    b = theirs.generate(ids, attention_mask=mask, max_new_tokens=40, do_sample=False, eos_token_id=None,
                        pad_token_id=2)
    assert torch.equal(a, b)


@torch.no_grad()
def test_cache_decode_equals_full_forward(pair):
    ours, _ = pair
    ids = torch.randint(3, 320, (2, 24), generator=torch.Generator().manual_seed(3))
    full = ours(ids)
    cache = KVCache.for_model(ours, 2, 64)
    steps = [ours(ids[:, :10], cache=cache)] + [ours(ids[:, i:i + 1], cache=cache) for i in range(10, 24)]
    assert cache.length == 24
    assert (torch.cat(steps, 1) - full).abs().max() < 1e-4


@torch.no_grad()
def test_naive_and_sdpa_backends_agree(pair):
    ours, _ = pair
    ids, mask = padded_batch(320, [20, 7])
    a, b = ours(ids, attention_mask=mask, backend="naive"), ours(ids, attention_mask=mask, backend="sdpa")
    assert (a - b)[mask.bool()].abs().max() < 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mask_rows", [None, 1, 3])
def test_decode_with_grouped_heads_folds_queries_and_matches_naive(dtype, mask_rows):
    """sdpa_attention folds a one-token GQA query into n_rep queries per KV head on a CPU
    (fold_gqa_queries): the same result as the naive math, with or without a padding mask."""
    from llmops_lab.attention.backends import fold_gqa_queries, naive_attention, sdpa_attention
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, h, s, 32, generator=g).to(dtype) for h, s in ((8, 1), (2, 40), (2, 40)))
    mask = None if mask_rows is None else torch.rand(mask_rows, 1, 1, 40, generator=g) > 0.3
    if mask is not None:
        mask[..., 0] = True
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    ref = naive_attention(q, k, v, mask)
    assert (fold_gqa_queries(q, k, v, mask).float() - ref.float()).abs().max() < tol
    assert (sdpa_attention(q, k, v, mask).float() - ref.float()).abs().max() < tol
    # a mask that differs between heads cannot be folded: the general path takes it
    per_head = torch.rand(3, 8, 1, 40, generator=g) > 0.3
    per_head[..., 0] = True
    assert (sdpa_attention(q, k, v, per_head).float() - naive_attention(q, k, v, per_head).float()).abs().max() < tol


@pytest.mark.parametrize("backend", ["naive", "sdpa", "cpu_decode", "flash"])
def test_chunks_after_a_cache_match_one_pass_on_every_backend(backend):
    """Several tokens after a filled cache (chunked prefill, speculative verification) are plain
    causal attention aligned bottom-right: no mask is built, so the flash kernel, which takes
    none, runs them too (it refused the mask built for them)."""
    from llmops_lab.attention import triton_flash
    if backend == "flash" and not triton_flash.available():
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    m = LlamaModel(TINY).eval()
    ids = torch.randint(2, TINY.vocab_size, (2, 21), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = m(ids, backend="naive")
        cache = KVCache.for_model(m, 2, 32)
        got = torch.cat([m(ids[:, a:b], cache=cache, backend=backend) for a, b in ((0, 7), (7, 18), (18, 21))], 1)
    assert (got - full).abs().max() < 1e-4


@pytest.mark.parametrize("cast", ["to_bf16", "half", "load_bf16"])
def test_rope_frequencies_stay_fp32_through_casts(cast):
    """Cast with the weights, bf16 rounded RoPE's frequencies by up to 0.4%; the rotation angle at
    distance d is off by d times that. transformers keeps them in fp32, and so do we."""
    from llmops_lab.model import rope_inv_freq
    if cast == "load_bf16":
        m = llmops_lab.load_model("target", device="cpu", dtype=torch.bfloat16)
    else:
        m = LlamaModel(TINY).eval()
        m = m.to(torch.bfloat16) if cast == "to_bf16" else m.half()
    assert m.inv_freq.dtype == torch.float32 and torch.equal(m.inv_freq, rope_inv_freq(m.config))
    assert m.lm_head.weight.dtype != torch.float32


def test_the_last_new_token_may_pass_the_context():
    """The last new token is sampled, never fed back: a prompt of the whole context gets one token
    (transformers gives one; it was refused) and a prompt one short gets two (it got one), on every
    generation path."""
    import warnings

    from llmops_lab.fast_decode import generate_static
    from llmops_lab.lean import generate_lean
    m = LlamaModel(TINY).eval()
    ctx = TINY.max_position_embeddings
    for S, new in ((ctx, 1), (ctx - 1, 2)):
        ids = torch.randint(2, TINY.vocab_size, (1, S), generator=torch.Generator().manual_seed(S))
        with warnings.catch_warnings():
            warnings.simplefilter("error")                # no truncation warning: they fit
            ref = m.generate(ids, max_new_tokens=new, stop_token_ids=())
        assert ref.shape[1] == S + new
        assert torch.equal(generate_static(m, ids, max_new_tokens=new, cuda_graph=False), ref)
        assert torch.equal(generate_lean(m, ids, max_new_tokens=new), ref)
    with pytest.warns(UserWarning, match="truncated at the model's context: 2 new tokens"):
        assert m.generate(ids, max_new_tokens=5, stop_token_ids=()).shape[1] == ctx + 1
    with pytest.raises(ValueError, match="exceeds the model's context"):
        m.generate(torch.zeros(1, ctx + 1, dtype=torch.long), max_new_tokens=1)
    with pytest.raises(ValueError, match="prompt \\+ new tokens - 1 <= context"):
        generate_static(m, ids, max_new_tokens=3, cuda_graph=False)
    from llmops_lab.fast_decode import StaticDecoder
    with pytest.raises(ValueError, match="built for another model"):     # it gave the other's tokens
        generate_static(m, ids[:, :4], 2, decoder=StaticDecoder(LlamaModel(TINY).eval(), 1, 5, False))


def test_sampling_is_seeded_and_respects_top_k():
    m = LlamaModel(TINY).eval()
    ids = torch.tensor([[0, 5, 6, 7]])
    run = lambda: m.generate(ids, max_new_tokens=20, temperature=0.9, top_k=1, stop_token_ids=(),
                             generator=torch.Generator().manual_seed(0))
    assert torch.equal(run(), m.generate(ids, max_new_tokens=20, stop_token_ids=()))  # top-1 = greedy
    a = m.generate(ids, max_new_tokens=20, temperature=1.0, top_p=0.9, stop_token_ids=(),
                   generator=torch.Generator().manual_seed(1))
    b = m.generate(ids, max_new_tokens=20, temperature=1.0, top_p=0.9, stop_token_ids=(),
                   generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


def test_stop_tokens_end_rows_and_pad():
    m = LlamaModel(TINY).eval()
    ids = torch.tensor([[0, 5, 6, 7], [0, 9, 9, 9]])
    free = m.generate(ids, max_new_tokens=8, stop_token_ids=())
    stop = int(free[0, 5])  # the second token row 0 produces
    out = m.generate(ids, max_new_tokens=8, stop_token_ids=(stop,), pad_token_id=2)
    row0 = out[0, 4:].tolist()
    assert row0[: row0.index(stop) + 1] == free[0, 4: 4 + row0.index(stop) + 1].tolist()
    assert all(t == 2 for t in row0[row0.index(stop) + 1:])


@pytest.mark.parametrize("bad, match", [
    (torch.zeros(1, 0, dtype=torch.long), "empty"),
    (torch.tensor([[0, 5, 320]]), "token ids"),
    (torch.tensor([[-1, 5]]), "token ids"),
    (torch.zeros(1, 257, dtype=torch.long), "context"),     # 256 fills the context: one new token
])
def test_bad_input_is_a_clear_error(bad, match):
    m = LlamaModel(TINY).eval()
    with pytest.raises(ValueError, match=match):
        m.generate(bad, max_new_tokens=4)


@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=-1.0), "temperature"), (dict(top_k=0, temperature=1.0), "top_k"),
    (dict(top_p=0.0, temperature=1.0), "top_p"), (dict(max_new_tokens=0), "max_new_tokens"),
    # NaN passes every comparison: it used to reach torch.multinomial as NaN probabilities
    (dict(temperature=float("nan")), "temperature"), (dict(temperature=float("inf")), "temperature"),
    (dict(top_p=float("nan"), temperature=1.0), "top_p"), (dict(top_k=2.5, temperature=1.0), "top_k"),
    (dict(max_new_tokens=2.5), "max_new_tokens"), (dict(pad_token_id=-7), "pad_token_id"),
])
def test_bad_sampling_arguments(kwargs, match):
    m = LlamaModel(TINY).eval()
    with pytest.raises(ValueError, match=match):
        m.generate(torch.tensor([[0, 4]]), **kwargs)


def test_sampling_helpers_check_their_arguments():
    """``sample`` and ``logits_to_probs`` are public: a negative temperature used to return the
    least likely token, top_p = -0.5 NaN probabilities, temperature 0 NaN."""
    from llmops_lab.generation import logits_to_probs, sample
    logits = torch.tensor([[1.0, 2.0]])
    for kw in (dict(temperature=-1.0), dict(temperature=1.0, top_p=-0.5), dict(temperature=1.0, top_p=1.5),
               dict(temperature=1.0, top_k=-1), dict(temperature=float("nan"))):
        with pytest.raises(ValueError):
            sample(logits, **kw)
        with pytest.raises(ValueError):
            logits_to_probs(logits, **kw)
    with pytest.raises(ValueError, match="greedy"):
        logits_to_probs(logits, 0.0)
    assert sample(logits, 0.0).tolist() == [1]


def test_a_tiny_temperature_is_the_argmax_not_nan():
    """logits / 1e-39 overflowed to inf and softmax gave NaN ("probability tensor contains inf/nan")."""
    from llmops_lab.generation import logits_to_probs, sample
    logits = torch.tensor([[1.0, 3.0, 2.0], [4.0, 4.0, -1.0]])
    for t in (1e-39, 1e-45, 1e-6):
        p = logits_to_probs(logits, t)
        assert torch.equal(p, torch.tensor([[0.0, 1.0, 0.0], [0.5, 0.5, 0.0]]))   # a tie stays a tie
        assert sample(logits[:1], t).tolist() == [1]
    assert torch.allclose(logits_to_probs(logits, 0.7), (logits / 0.7).softmax(-1))


def test_generate_takes_integer_ids_and_one_stop_token():
    m = LlamaModel(TINY).eval()
    with pytest.raises(TypeError, match="integer tensor"):
        m.generate(torch.tensor([[0.0, 4.0]]), max_new_tokens=2)
    for dtype in (torch.uint8, torch.int8, torch.int16):        # the embedding takes long and int32 only
        with pytest.raises(TypeError, match="call .long"):
            m(torch.tensor([[0, 4]], dtype=dtype))
        with pytest.raises(TypeError, match="call .long"):
            m.generate(torch.tensor([[0, 4]], dtype=dtype), max_new_tokens=2)
    assert torch.equal(m(torch.tensor([[0, 4]], dtype=torch.int32)), m(torch.tensor([[0, 4]])))
    free = m.generate(torch.tensor([[0, 4]]), max_new_tokens=6, stop_token_ids=())
    stop = int(free[0, 3])
    assert m.generate(torch.tensor([[0, 4]]), max_new_tokens=6, stop_token_ids=stop).tolist() == \
        m.generate(torch.tensor([[0, 4]]), max_new_tokens=6, stop_token_ids=(stop,)).tolist()


def test_generation_stops_at_context_with_a_warning():
    m = LlamaModel(TINY).eval()
    with pytest.warns(UserWarning, match="context"):
        out = m.generate(torch.zeros(1, 250, dtype=torch.long), max_new_tokens=20, stop_token_ids=())
    assert out.shape[1] == 257           # the model saw 256 positions; the last token is never fed back


@pytest.mark.parametrize("field, value, match", [
    ("rope_theta", 0, "rope_theta"), ("rope_theta", float("nan"), "rope_theta"),
    ("rms_norm_eps", -1.0, "rms_norm_eps"), ("sliding_window", 0, "sliding_window"),
    ("sliding_window", -4, "sliding_window"), ("rope_scaling", {"rope_type": "linear", "factor": 0}, "factor"),
    ("rope_scaling", {"type": "linear"}, "factor"),
    ("rope_scaling", {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 1.0}, "low_freq"),
    ("hidden_act", "gelu", "hidden_act"),
])
def test_config_values_that_would_give_wrong_logits(field, value, match):
    """Each of these used to load and give finite, wrong logits (or NaN): RoPE of theta 0 or factor
    0, a window of 0 that masks every key, a GELU model run as SwiGLU."""
    d = TINY.to_hf_dict()
    d[field] = value
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_hf_dict(d)


def test_config_errors():
    with pytest.raises(ValueError, match="multiple"):
        dataclasses.replace(TINY, num_key_value_heads=3)
    with pytest.raises(ValueError, match="Llama-family"):
        ModelConfig.from_hf_dict({"model_type": "gpt2", "vocab_size": 1, "hidden_size": 4,
                                  "intermediate_size": 4, "num_hidden_layers": 1, "num_attention_heads": 1})


def test_loader_refuses_pickles_and_mismatched_checkpoints(tmp_path):
    random_checkpoint(TINY, tmp_path)
    (tmp_path / "model.safetensors").rename(tmp_path / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        llmops_lab.load_model(tmp_path, device="cpu")
    with pytest.raises(FileNotFoundError):
        llmops_lab.load_model(tmp_path / "nowhere", device="cpu")


def test_loader_says_what_is_wrong_with_a_checkpoint(tmp_path):
    """Each used to fail with a bare JSONDecodeError, KeyError, UnicodeDecodeError, or (mixed
    dtypes) load fine and fail in the first matmul."""
    import json
    from safetensors.torch import load_file, save_file
    random_checkpoint(TINY, tmp_path)
    cfg = tmp_path / "config.json"
    good = cfg.read_text()
    for text, match in (("{not json", "not valid JSON"), ("[1, 2]", "JSON object"), ("{}", "lacks"),
                        (good.replace('"vocab_size": 320', '"vocab_size": "320"'), "vocab_size")):
        cfg.write_text(text)
        with pytest.raises(ValueError, match=match):
            llmops_lab.load_model(tmp_path, device="cpu")
    cfg.write_text(good)
    for f in ("config.json", "model.safetensors"):
        with pytest.raises(ValueError, match="checkpoint's folder"):
            llmops_lab.load_model(tmp_path / f, device="cpu")
    w = load_file(str(tmp_path / "model.safetensors"))
    w["lm_head.weight"] = w["lm_head.weight"].half()
    save_file(w, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="mixes"):
        llmops_lab.load_model(tmp_path, device="cpu")
    m = llmops_lab.load_model(tmp_path, device="cpu", dtype="float32")      # a dtype resolves it
    assert m.dtype == torch.float32 and m(torch.tensor([[0, 5]])).isfinite().all()
    for bad in (torch.float8_e4m3fn, "float8_e5m2", torch.int8, "int4x"):  # float8 loaded, then every forward failed
        with pytest.raises(ValueError, match="dtype must be one of float32, bfloat16"):
            llmops_lab.load_model(tmp_path, device="cpu", dtype=bad)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))
    with pytest.raises(ValueError, match="weight_map"):
        llmops_lab.load_model(tmp_path, device="cpu")


@pytest.mark.parametrize("family", ["llama", "mistral-window"])    # a window of 16, outgrown here
@pytest.mark.parametrize("lengths", [[9], [14, 6, 11]])
def test_static_decode_equals_dynamic_generate(lengths, family):
    from llmops_lab.fast_decode import StaticDecoder, generate_static
    torch.manual_seed(0)
    m = LlamaModel(FAMILIES[family]).eval()
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.08)
    ids, mask = padded_batch(TINY.vocab_size, lengths)
    mask = mask if len(lengths) > 1 else None
    want = m.generate(ids, attention_mask=mask, max_new_tokens=30, stop_token_ids=())
    assert torch.equal(generate_static(m, ids, 30, attention_mask=mask), want)
    dec = StaticDecoder(m, len(lengths), max(lengths) + 30)  # a reused decoder gives the same again
    for _ in range(2):
        assert torch.equal(generate_static(m, ids, 30, attention_mask=mask, decoder=dec), want)


def test_compiled_static_decode_equals_eager():
    """The torch.compile'd layer (one graph shared by every layer) gives the eager step's tokens."""
    from llmops_lab.fast_decode import StaticDecoder, generate_static
    torch.manual_seed(0)
    m = LlamaModel(TINY).eval()
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.08)
    ids, mask = padded_batch(TINY.vocab_size, [14, 6, 11])
    want = generate_static(m, ids, 12, attention_mask=mask)
    dec = StaticDecoder(m, 3, 14 + 12, compile=True)
    assert torch.equal(generate_static(m, ids, 12, attention_mask=mask, decoder=dec), want)


def test_compiled_bf16_decode_differs_from_eager_only_by_rounding():
    """In bf16 the compiled layer keeps fused intermediates in fp32 where eager rounds them to bf16,
    so near-tied logits can pick other tokens (what the GPU bench's agreement column shows). With
    inductor told to round exactly where eager does, the tokens are eager's again."""
    import torch._inductor.config as inductor_config
    from llmops_lab.fast_decode import StaticDecoder, generate_static
    torch.manual_seed(0)
    m = LlamaModel(TINY).eval().to(torch.bfloat16)
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.08)
    ids, _ = padded_batch(TINY.vocab_size, [10])
    want = generate_static(m, ids, 16)
    torch._dynamo.reset()                       # compile afresh under the patched config
    with inductor_config.patch(emulate_precision_casts=True):
        got = generate_static(m, ids, 16, decoder=StaticDecoder(m, 1, 10 + 16, compile=True))
    assert torch.equal(got, want)


def test_load_model_refuses_a_device_it_cannot_use():
    """A device that does not exist here is named in a ValueError before the checkpoint is read
    (it was torch's AssertionError 'not compiled with CUDA', or a RuntimeError listing device types)."""
    for device in ("tpu", "gpu:0", 7.5) + (() if torch.cuda.is_available() else ("cuda", "cuda:0")):
        with pytest.raises(ValueError, match="device"):
            llmops_lab.load_model("target", device=device)
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA device"):
            llmops_lab.load_model("target", device=f"cuda:{torch.cuda.device_count()}")
    assert llmops_lab.load_model("target", device=torch.device("cpu")).device.type == "cpu"


def test_generate_checks_the_attention_mask_shape(random_llama):
    """A [1, S] mask for two prompts was broadcast over both; other shapes failed deep inside; a
    1-D mask with 1-D ids failed with an IndexError (found by an adversarial probe)."""
    from llmops_lab.generation import generate
    tiny = random_llama(TINY)
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    for mask in (torch.ones(1, 4, dtype=torch.long), torch.ones(3, 4, dtype=torch.long), torch.ones(2, 1, 4)):
        with pytest.raises(ValueError, match="attention_mask"):
            generate(tiny, ids, max_new_tokens=2, attention_mask=mask)
    one = generate(tiny, ids[0], max_new_tokens=2, attention_mask=torch.ones(4, dtype=torch.long))
    assert one.tolist() == generate(tiny, ids[:1], max_new_tokens=2).tolist()


def test_a_cache_that_does_not_fit_the_model_is_a_clear_error():
    """Every cache class the forward writes into is checked against the model before the first
    layer: more layers than the model's took its keys without a word, and wrong heads, head dim or
    dtype failed inside an index_put or SDPA after the write."""
    from llmops_lab.kv import HeavyHitterKVCache, Int8KVCache, SinkKVCache, SlidingWindowKVCache
    from llmops_lab.paged import PagedKVCache
    torch.manual_seed(0)
    model = LlamaModel(TINY).eval()
    L, H, D = TINY.num_hidden_layers, TINY.num_key_value_heads, TINY.head_dim
    ids = torch.randint(3, TINY.vocab_size, (1, 5))
    makers = {
        "KVCache": lambda l, h, d, dt: KVCache(l, 1, h, d, 32, dtype=dt),
        "Int8KVCache": lambda l, h, d, dt: Int8KVCache(l, 1, h, d, 32, dtype=dt),
        "SinkKVCache": lambda l, h, d, dt: SinkKVCache(l, 1, h, d, window_size=16, num_sinks=2, dtype=dt),
        "SlidingWindowKVCache": lambda l, h, d, dt: SlidingWindowKVCache(l, 1, h, d, window_size=16, dtype=dt),
        "HeavyHitterKVCache": lambda l, h, d, dt: HeavyHitterKVCache(l, 1, h, d, heavy_size=4, recent_size=4, dtype=dt),
        "PagedKVCache": lambda l, h, d, dt: PagedKVCache(l, h, d, num_blocks=4, block_size=8, dtype=dt),
    }
    for name, make in makers.items():
        def run(cache):
            if isinstance(cache, PagedKVCache):
                cache.add_prompts(ids)
            with torch.no_grad():
                return model(ids, cache=cache)
        assert run(make(L, H, D, torch.float32)).shape == (1, 5, TINY.vocab_size), name
        for wrong, what in (((L + 1, H, D, torch.float32), "layers"), ((L, H * 2, D, torch.float32), "KV heads"),
                            ((L, H, D * 2, torch.float32), "head dim"), ((L, H, D, torch.bfloat16), "dtype")):
            with pytest.raises(ValueError, match=f"{name} does not fit the model: {what}"):
                run(make(*wrong))
