"""Shape presets: the published dimensions of common Llama-family checkpoints, and random models.

The numbers are those of each checkpoint's config.json on the Hugging Face Hub (Touvron et al. 2023
for Llama 2; Meta's Llama 3 release, 2024; Jiang et al. 2023 for Mistral 7B; Qwen team 2024 for
Qwen2.5). A preset is a ``ModelConfig``; ``random_model`` builds a ``LlamaModel`` of that shape with
random weights, directly on the target device, so the formulas of ``llmops_lab.formulas`` can be
measured at real sizes without downloading anything.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from .checks import is_real
from .config import ModelConfig
from .model import LlamaModel

_LLAMA2 = dict(vocab_size=32000, rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=4096,
               model_type="llama", bos_token_id=1, eos_token_id=2)
_LLAMA3 = dict(vocab_size=128256, rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=8192,
               model_type="llama", bos_token_id=128000, eos_token_id=128001)
# Qwen2.5 base configs: q/k/v biases, theta 1e6, 32K native context (128K only with YaRN added), and
# sliding_window present but disabled (use_sliding_window false), so it is None here.
_QWEN25 = dict(rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=32768,
               attention_bias=True, model_type="qwen2", bos_token_id=151643, eos_token_id=151643)


def _preset(name: str, **fields) -> ModelConfig:
    return ModelConfig(name=name, **fields)


PRESETS: dict[str, ModelConfig] = {
    "llama-2-7b": _preset("Llama-2-7B", **_LLAMA2, hidden_size=4096, intermediate_size=11008,
                          num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32),
    "llama-2-13b": _preset("Llama-2-13B", **_LLAMA2, hidden_size=5120, intermediate_size=13824,
                           num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=40),
    "llama-2-70b": _preset("Llama-2-70B", **_LLAMA2, hidden_size=8192, intermediate_size=28672,
                           num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8),
    "llama-3-8b": _preset("Llama-3-8B", **_LLAMA3, hidden_size=4096, intermediate_size=14336,
                          num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8),
    "llama-3-70b": _preset("Llama-3-70B", **_LLAMA3, hidden_size=8192, intermediate_size=28672,
                           num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8),
    "mistral-7b": _preset("Mistral-7B-v0.1", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                          num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                          max_position_embeddings=32768, rms_norm_eps=1e-5, rope_theta=10000.0,
                          sliding_window=4096, model_type="mistral", bos_token_id=1, eos_token_id=2),
    "qwen2.5-0.5b": _preset("Qwen2.5-0.5B", **_QWEN25, vocab_size=151936, hidden_size=896,
                            intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                            num_key_value_heads=2, tie_word_embeddings=True),
    "qwen2.5-7b": _preset("Qwen2.5-7B", **_QWEN25, vocab_size=152064, hidden_size=3584,
                          intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                          num_key_value_heads=4),
}
# The source document's KV-cache example ("a 70B model with 80 layers, 64 heads, 128 head dimension")
# as written: Llama-2-70B's shape but with a K and V head per query head, i.e. no grouped-query
# attention. The real Llama-2-70B has 8 KV heads, so its cache is 8x smaller.
PRESETS["doc-70b-as-written"] = dataclasses.replace(PRESETS["llama-2-70b"], num_key_value_heads=64,
                                                    name="doc-70B-as-written")


def get_preset(name: str) -> ModelConfig:
    """The preset called ``name`` (case-insensitive, e.g. "Llama-2-7B" or "llama-2-7b")."""
    if not isinstance(name, str):
        raise TypeError(f"a preset name is a string, got {name!r}; known presets: {', '.join(PRESETS)}")
    key = name.strip().lower()
    if key not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
    return PRESETS[key]


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@torch.no_grad()
def init_random_weights_(model: torch.nn.Module, std: float = 0.02, seed: int = 0) -> torch.nn.Module:
    """Fill matrices with N(0, std^2) and biases with 0 in place, on the model's own device.

    Norm weights keep their ones, as in a freshly initialised Hugging Face model. Tied weights are
    one parameter and are filled once. A model on the meta device is left as it is.
    """
    if not is_real(std) or not 0 <= std < math.inf:
        raise ValueError(f"std must be a finite number >= 0, got {std!r}")
    p0 = next(model.parameters())
    if p0.device.type == "meta":
        return model
    gen = torch.Generator(device=p0.device).manual_seed(seed)
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            p.normal_(0.0, std, generator=gen)
        elif name.endswith("bias"):
            p.zero_()
    return model


def random_model(name_or_config: str | ModelConfig, device=None, dtype: torch.dtype = torch.bfloat16,
                 num_layers: int | None = None, seed: int = 0) -> LlamaModel:
    """A ``LlamaModel`` of a preset's shape with random weights, in eval mode.

    Args:
        name_or_config: a preset name (see ``PRESETS``) or a ``ModelConfig``.
        device: where to build it (default: CUDA when available, else CPU). The model is created
            on this device in ``dtype`` directly, so a 7B model never passes through CPU memory;
            ``"meta"`` gives shapes only (no memory, no initialisation).
        dtype: parameter dtype (the RoPE frequencies stay in fp32).
        num_layers: keep only this many decoder layers (quick CPU tests of a big preset's shapes).
        seed: seed of the on-device generator used for the N(0, 0.02^2) weights.
    """
    config = get_preset(name_or_config) if isinstance(name_or_config, str) else name_or_config
    if not isinstance(config, ModelConfig):
        raise TypeError(f"expected a preset name or a ModelConfig, got {type(name_or_config).__name__}")
    if num_layers is not None:
        config = dataclasses.replace(config, num_hidden_layers=num_layers)
    device = torch.device(device) if device is not None else _default_device()
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point torch.dtype (torch.bfloat16, not 'bfloat16'), got {dtype!r}")
    previous = torch.get_default_dtype()
    try:
        torch.set_default_dtype(dtype)
        with torch.device(device):
            model = LlamaModel(config)
    finally:
        torch.set_default_dtype(previous)
    init_random_weights_(model, std=0.02, seed=seed)
    return model.eval()
