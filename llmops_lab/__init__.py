"""llmops-lab: LLM inference optimisation, implemented from scratch and measured.

Public entry points (kept stable): ``load_model``, ``load_tokenizer``, ``embedded_model_path``,
``LlamaModel`` (``model(input_ids) -> logits``, ``model.generate(...)``), ``KVCache`` and
``python -m llmops_lab.bench``.
"""
import os

os.environ.setdefault("KINETO_LOG_LEVEL", "6")  # keep the CPU profiler's start/stop lines out of outputs

from .config import ModelConfig  # noqa: E402
from .kv import KVCache  # noqa: E402
from .loader import embedded_model_path, load_model, load_tokenizer, save_model  # noqa: E402
from .model import LlamaModel  # noqa: E402

__version__ = "0.1.0"
__all__ = ["ModelConfig", "KVCache", "LlamaModel", "embedded_model_path", "load_model",
           "load_tokenizer", "save_model", "generate_text"]


def generate_text(model, tokenizer, prompt: str | list[str], **kwargs) -> str | list[str]:
    """Tokenize, generate (``model.generate`` arguments) and decode the new text of each prompt."""
    single = isinstance(prompt, str)
    prompts = [prompt] if single else list(prompt)
    if not prompts or any(not isinstance(p, str) or not p for p in prompts):
        raise ValueError(f"prompt must be a non-empty string or a non-empty list of them, got {prompt!r}")
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"        # generate takes left padding; the caller's setting comes back
    try:
        enc = tokenizer(prompts, return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = side
    ids = enc["input_ids"].to(model.device)
    mask = enc["attention_mask"].to(model.device) if len(prompts) > 1 else None
    kwargs.setdefault("pad_token_id", tokenizer.pad_token_id)
    out = model.generate(ids, attention_mask=mask, **kwargs)
    texts = tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)
    return texts[0] if single else texts
