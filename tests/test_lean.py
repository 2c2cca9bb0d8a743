"""LeanModel (fused weights, tabulated RoPE, sliced masks) against its slow twin LlamaModel.forward."""
import pytest
import torch

from llmops_lab.config import ModelConfig
from llmops_lab.kv import KVCache
from llmops_lab.lean import LeanModel, Linear, _onednn_available, generate_lean
from llmops_lab.model import LlamaModel


def tiny(seed, **kw):
    cfg = dict(vocab_size=64, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=128, bos_token_id=0, eos_token_id=1)
    torch.manual_seed(seed)
    m = LlamaModel(ModelConfig(**{**cfg, **kw})).eval()
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return m


@pytest.mark.parametrize("kw", [{}, {"num_key_value_heads": 4}, {"attention_bias": True}])
@torch.inference_mode()
def test_logits_match_the_model_through_prefill_decode_and_verify(kw):
    m = tiny(0, **kw)
    lean = LeanModel(m)
    ids = torch.randint(2, 64, (2, 40), generator=torch.Generator().manual_seed(1))
    mine, ref = lean.new_cache(2, 40), KVCache.for_model(m, 2, 40)
    for a, b in ((0, 13), (13, 14), (14, 19), (19, 20), (20, 29)):   # prefill, decode, verify at an offset
        torch.testing.assert_close(lean(ids[:, a:b], mine), m(ids[:, a:b], cache=ref), atol=1e-4, rtol=1e-4)
    mine.truncate(16), ref.truncate(16)                                # rollback, then write over
    torch.testing.assert_close(lean(ids[:, 30:33], mine, last_only=True), m(ids[:, 30:33], cache=ref, last_only=True),
                               atol=1e-4, rtol=1e-4)


@torch.inference_mode()
def test_padded_batch_with_holes_matches_the_model():
    m = tiny(2)
    lean = LeanModel(m)
    ids = torch.randint(2, 64, (3, 12), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, :4] = 0
    mask[2, :7] = 0
    mask[0, 9] = 0   # a hole in the middle, as a rolled-back draft leaves
    mine, ref = lean.new_cache(3, 12), KVCache.for_model(m, 3, 12)
    for a, b in ((0, 8), (8, 9), (9, 12)):
        got, want = lean(ids[:, a:b], mine, mask[:, :b]), m(ids[:, a:b], cache=ref, attention_mask=mask[:, :b])
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("B,S,n", [(1, 1, 9), (1, 7, 24), (3, 5, 17)])
def test_generate_lean_is_greedy_identical(B, S, n):
    m = tiny(4)
    ids = torch.randint(2, 64, (B, S), generator=torch.Generator().manual_seed(B * S))
    assert torch.equal(generate_lean(m, ids, n), m.generate(ids, max_new_tokens=n, stop_token_ids=()))


def test_generate_lean_left_padded():
    m = tiny(5)
    ids = torch.randint(2, 64, (2, 9), generator=torch.Generator().manual_seed(6))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :5] = 0
    want = m.generate(ids, max_new_tokens=11, stop_token_ids=(), attention_mask=mask)
    assert torch.equal(generate_lean(m, ids, 11, attention_mask=mask), want)
    from llmops_lab.fast_decode import generate_static
    right = mask.flip(1)                       # right padding, a row of none, a 2: other tokens, no word
    none = mask.clone()
    none[1] = 0
    for bad, match in ((right, "left"), (none, "at least one"), (mask * 2, "0 .padding. and 1"), (mask[0], "shape")):
        for fn in (generate_lean, generate_static):
            with pytest.raises(ValueError, match=match):
                fn(m, ids, 3, attention_mask=bad)


def test_errors():
    m = tiny(6)
    lean = LeanModel(m)
    with pytest.raises(ValueError, match="overflow"):
        lean(torch.zeros(1, 5, dtype=torch.long), lean.new_cache(1, 4))
    with pytest.raises(ValueError, match="context"):
        generate_lean(m, torch.zeros(1, 100, dtype=torch.long), 40)
    with pytest.raises(ValueError, match="sliding"):
        LeanModel(tiny(7, sliding_window=8))
    with pytest.raises(ValueError, match="built from another model"):   # it gave the other's tokens
        generate_lean(m, torch.zeros(1, 4, dtype=torch.long), 2, lean=LeanModel(tiny(8)))


@pytest.mark.parametrize("rows", [1, 2, 5, 9])
@pytest.mark.parametrize("shape", [(96, 48), (48, 96)])          # wide output, wide input
def test_linear_layouts_compute_the_same_product(rows, shape):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(rows))
    x = torch.randn(1, rows, shape[1], generator=torch.Generator().manual_seed(7))
    want = x @ w.t()
    for pack in (False, True):
        torch.testing.assert_close(Linear(w, pack)(x), want, atol=1e-5, rtol=1e-5)
    x_strided = torch.randn(1, rows, 2 * shape[1])[..., ::2]     # a view, as split() and slicing give
    torch.testing.assert_close(Linear(w, True)(x_strided), x_strided @ w.t(), atol=1e-5, rtol=1e-5)


def test_linear_packs_only_fp32_cpu_weights_where_onednn_is_built():
    w = torch.randn(32, 16)
    assert (Linear(w, True).packed is not None) == _onednn_available()
    assert Linear(w, False).packed is None
    assert Linear(w.bfloat16(), True).packed is None              # bf16 keeps the plain paths
    lean = LeanModel(tiny(0), pack=False)
    assert all(lin.packed is None for layer in lean.layers for lin in layer if isinstance(lin, Linear))


def test_lean_model_checks_what_the_model_checks():
    """An id past the vocabulary, a cache of another batch, a mask of the wrong width and an empty
    input used to fail deep inside (IndexError, expand errors) or return empty logits."""
    m = tiny(0)
    lm = LeanModel(m)
    V = m.config.vocab_size
    for ids, cache, mask, match in ((torch.tensor([[V, 3]]), lm.new_cache(1, 4), None, "token ids"),
                                    (torch.tensor([[2, 3]]), lm.new_cache(2, 4), None, "batch"),
                                    (torch.tensor([[2, 3]]), lm.new_cache(1, 4), torch.ones(1, 3), "attention_mask"),
                                    (torch.zeros(1, 0, dtype=torch.long), lm.new_cache(1, 4), None, "non-empty")):
        with pytest.raises(ValueError, match=match):
            lm(ids, cache, mask)


def test_static_decoder_refuses_what_it_cannot_hold():
    """A step past the decoder's cache (an IndexError from inside before), a decoder too small for
    the generation it is handed, a cache length of 0 (which silently meant the whole context)."""
    from llmops_lab.fast_decode import StaticDecoder, generate_static
    m = tiny(0)
    ids = torch.tensor([[2, 3, 4, 5, 6, 7]])
    d = StaticDecoder(m, 1, 8)
    logits = d.prefill(ids)
    for _ in range(2):
        logits = d.step(logits.argmax(-1))
    with pytest.raises(ValueError, match="full"):
        d.step(logits.argmax(-1))
    with pytest.raises(ValueError, match="needs 1 of 13"):
        generate_static(m, ids, 8, decoder=StaticDecoder(m, 1, 10))
    with pytest.raises(ValueError, match="max_seq_len"):
        StaticDecoder(m, 1, 0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_static(m, ids, 2.5)
    assert torch.equal(generate_static(m, ids, 3, decoder=StaticDecoder(m, 1, 8)), m.generate(ids, max_new_tokens=3, stop_token_ids=()))
