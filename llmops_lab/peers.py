"""Peers measured beside our implementations: transformers models sharing our very weights."""
from __future__ import annotations

import torch


def hf_twin(model):
    """transformers' ``*ForCausalLM`` for ``model``'s config, holding the very same weight tensors
    (no copy), so any difference in output or speed is the implementation's, not the weights'."""
    from transformers import AutoConfig, AutoModelForCausalLM
    hf_config = AutoConfig.for_model(**model.config.to_hf_dict())
    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(hf_config, dtype=model.dtype)
    state = dict(model.state_dict())
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    hf.load_state_dict(state, strict=False, assign=True)
    if model.config.tie_word_embeddings:
        hf.tie_weights()
    return hf.to(model.device).eval()
