"""Presets carry the published shapes; random_model builds them without downloading anything."""
import dataclasses

import pytest
import torch

from llmops_lab.config import ModelConfig
from llmops_lab.presets import PRESETS, get_preset, random_model

TINY = ModelConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, name="tiny")


@pytest.mark.parametrize("name,published,rel", [
    ("llama-2-7b", 6.74e9, 0.01), ("llama-2-13b", 13.02e9, 0.01), ("llama-2-70b", 68.98e9, 0.01),
    ("llama-3-8b", 8.03e9, 0.01), ("llama-3-70b", 70.55e9, 0.01), ("mistral-7b", 7.24e9, 0.01),
    ("qwen2.5-0.5b", 0.494e9, 0.02), ("qwen2.5-7b", 7.62e9, 0.01)])
def test_parameter_counts_match_published(name, published, rel):
    assert get_preset(name).num_parameters() == pytest.approx(published, rel=rel)


def test_published_shapes():
    l27, l270, l38 = get_preset("llama-2-7b"), get_preset("llama-2-70b"), get_preset("llama-3-8b")
    assert (l27.vocab_size, l27.hidden_size, l27.intermediate_size, l27.num_hidden_layers,
            l27.num_attention_heads, l27.num_key_value_heads, l27.max_position_embeddings,
            l27.head_dim) == (32000, 4096, 11008, 32, 32, 32, 4096, 128)
    assert (l270.hidden_size, l270.intermediate_size, l270.num_hidden_layers,
            l270.num_attention_heads, l270.num_key_value_heads) == (8192, 28672, 80, 64, 8)
    assert (l38.vocab_size, l38.num_key_value_heads, l38.rope_theta, l38.max_position_embeddings) == (
        128256, 8, 500000.0, 8192)
    m = get_preset("mistral-7b")
    assert (m.sliding_window, m.max_position_embeddings, m.model_type, m.num_key_value_heads) == (
        4096, 32768, "mistral", 8)
    q = get_preset("qwen2.5-0.5b")
    assert (q.vocab_size, q.hidden_size, q.num_attention_heads, q.num_key_value_heads, q.head_dim) == (
        151936, 896, 14, 2, 64)
    assert q.tie_word_embeddings and q.attention_bias and q.rope_theta == 1e6 and q.model_type == "qwen2"
    q7 = get_preset("qwen2.5-7b")
    assert (q7.vocab_size, q7.hidden_size, q7.intermediate_size, q7.num_hidden_layers,
            q7.num_key_value_heads, q7.tie_word_embeddings) == (152064, 3584, 18944, 28, 4, False)


def test_doc_70b_as_written_differs_only_in_kv_heads():
    doc, real = get_preset("doc-70B-as-written"), get_preset("llama-2-70b")
    assert doc.num_key_value_heads == 64 and doc.name == "doc-70B-as-written"
    assert dataclasses.replace(doc, num_key_value_heads=8) == real


def test_get_preset_is_case_insensitive_and_lists_names():
    assert get_preset("Llama-2-7B") is PRESETS["llama-2-7b"]
    assert get_preset(" QWEN2.5-0.5B ") is PRESETS["qwen2.5-0.5b"]
    with pytest.raises(ValueError, match="llama-2-7b.*qwen2.5-7b"):
        get_preset("gpt-2")
    assert len(PRESETS) == 9
    with pytest.raises(TypeError, match="preset name is a string"):       # was an AttributeError on .strip
        get_preset(None)


def test_random_model_checks_dtype_and_std():
    from llmops_lab.presets import init_random_weights_
    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    with pytest.raises(ValueError, match="torch.bfloat16, not 'bfloat16'"):
        random_model(cfg, device="cpu", dtype="bfloat16")
    m = random_model(cfg, device="cpu", dtype=torch.float32)
    for std in (float("nan"), -0.1, "0.02"):
        with pytest.raises(ValueError, match="std"):
            init_random_weights_(m, std=std)


def test_presets_round_trip_through_hf_dict():
    for cfg in PRESETS.values():
        assert ModelConfig.from_hf_dict(cfg.to_hf_dict()) == cfg


@pytest.mark.parametrize("name", ["llama-2-7b", "llama-3-70b", "qwen2.5-0.5b", "mistral-7b"])
def test_meta_model_has_the_formula_parameter_count(name):
    model = random_model(name, device="meta")
    assert model.device.type == "meta"
    assert sum(p.numel() for p in model.parameters()) == get_preset(name).num_parameters()


def test_random_model_reduced_layers_keeps_shapes():
    model = random_model("llama-2-7b", device="meta", num_layers=1)
    assert len(model.model.layers) == 1
    assert model.model.layers[0].mlp.gate_proj.weight.shape == (11008, 4096)
    assert model.config.num_hidden_layers == 1 and model.dtype == torch.bfloat16


def test_random_model_forward_and_init():
    model = random_model(TINY, device="cpu", dtype=torch.float32, seed=1)
    assert not model.training and model.dtype == torch.float32
    assert model.inv_freq.dtype == torch.float32
    w = model.model.layers[0].self_attn.q_proj.weight
    assert 0.015 < w.std().item() < 0.025
    assert torch.equal(model.model.norm.weight, torch.ones(32))
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3, 4, 5]]))
    assert logits.shape == (1, 5, 97) and torch.isfinite(logits).all()
    again = random_model(TINY, device="cpu", dtype=torch.float32, seed=1)
    assert torch.equal(again.lm_head.weight, model.lm_head.weight)
    assert not torch.equal(random_model(TINY, device="cpu", seed=2).lm_head.weight,
                           model.lm_head.weight.bfloat16())
    assert torch.get_default_dtype() == torch.float32


def test_random_model_bf16_qwen_shape_with_bias_and_tied_head():
    # a vocabulary cut to 128 takes token ids inside it (Qwen's are 151643)
    cfg = dataclasses.replace(get_preset("qwen2.5-0.5b"), vocab_size=128, hidden_size=64, intermediate_size=96,
                              num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2)
    model = random_model(cfg, device="cpu", num_layers=1)
    assert model.dtype == torch.bfloat16
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.count_nonzero(model.model.layers[0].self_attn.q_proj.bias) == 0
    with torch.no_grad():
        assert model(torch.tensor([[3, 4]])).shape == (1, 2, 128)


def test_random_model_rejects_unknown():
    with pytest.raises(ValueError, match="known presets"):
        random_model("llama-9-1b", device="meta")
    with pytest.raises(TypeError):
        random_model(42, device="meta")
