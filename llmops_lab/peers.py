"""Peers measured beside our implementations: transformers models sharing our very weights."""
from __future__ import annotations

import torch

from .checks import check_float_model


def hf_twin(model):
    """transformers' ``*ForCausalLM`` for ``model``'s config, holding the very same weight tensors
    (no copy), so any difference in output or speed is the implementation's, not the weights'."""
    from transformers import AutoConfig, AutoModelForCausalLM
    check_float_model(model, "hf_twin")
    hf_config = AutoConfig.for_model(**model.config.to_hf_dict())
    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(hf_config, dtype=model.dtype)
    state = dict(model.state_dict())
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    hf.load_state_dict(state, strict=False, assign=True)
    if model.config.tie_word_embeddings:
        hf.tie_weights()
    # Buffers are not in the state dict (RoPE's inv_freq): build those modules again for real.
    for name, module in list(hf.named_modules()):
        if any(b.is_meta for b in module.buffers(recurse=False)):
            parent = hf.get_submodule(name.rsplit(".", 1)[0]) if "." in name else hf
            with torch.device(model.device):
                setattr(parent, name.rsplit(".", 1)[-1], type(module)(config=hf.config))
    leftover = [n for n, t in list(hf.named_parameters()) + list(hf.named_buffers()) if t.is_meta]
    if leftover:
        raise RuntimeError(f"transformers twin has tensors without data: {leftover[:5]}")
    return hf.to(model.device).eval()
