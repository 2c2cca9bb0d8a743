"""Loading Hugging Face checkpoints (config.json + safetensors) into our runtime.

Weights come only from safetensors files, never from pickles. A hub id is resolved through
huggingface_hub where the network allows; the embedded models under ``data/models`` always work.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .checks import check_float_model
from .config import ModelConfig
from .device import as_device, default_device  # noqa: F401 - default_device: loader's public name
from .model import LlamaModel, rope_inv_freq

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
EMBEDDED = ("target", "draft")


def embedded_model_path(which: str = "target") -> Path:
    """Folder of the embedded model ``"target"`` or ``"draft"`` (a Hugging Face Llama checkpoint)."""
    if which not in EMBEDDED:
        raise ValueError(f"embedded models are {EMBEDDED}, not {which!r}")
    path = DATA_DIR / "models" / which
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"embedded model {which!r} is missing at {path}; "
                                f"train it with `python -m llmops_lab.train`")
    return path


def embedded_fingerprint() -> dict[str, str]:
    """The first 12 hex digits of each embedded model's weights' SHA-256: a recorded measurement
    names the exact models it ran (the draft was trained further on 2026-11-26, and the
    speculative-decoding figures moved with it)."""
    import hashlib
    return {w: hashlib.sha256((embedded_model_path(w) / "model.safetensors").read_bytes()).hexdigest()[:12]
            for w in ("target", "draft")}


def resolve(path_or_id: str | Path) -> Path:
    """A local folder as it is; ``"target"``/``"draft"`` as the embedded models; else a hub id."""
    if str(path_or_id) in EMBEDDED:
        return embedded_model_path(str(path_or_id))
    p = Path(path_or_id).expanduser()
    if p.is_file():
        raise ValueError(f"{p} is a file; give the checkpoint's folder (with config.json and the "
                         f"safetensors weights), e.g. {p.parent}")
    if p.exists():
        return p
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(str(path_or_id), allow_patterns=[
            "*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"]))
    except Exception as e:  # offline, unknown id, gated repo...
        raise FileNotFoundError(f"{path_or_id!r} is neither a local folder nor a hub id that could be "
                                f"fetched here ({type(e).__name__}: {e})") from e


def read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index} has no weight_map naming the safetensors files")
        files = sorted(set(weight_map.values()))
    else:
        files = sorted(p.name for p in folder.glob("*.safetensors"))
    if not files:
        bins = list(folder.glob("*.bin")) + list(folder.glob("*.pt"))
        hint = " (only pickle files found; convert them to safetensors)" if bins else ""
        raise FileNotFoundError(f"no safetensors weights in {folder}{hint}")
    state = {}
    for f in files:
        state.update(load_file(str(folder / f)))
    return state


def load_model(path_or_id="target", device=None, dtype=None, backend="sdpa") -> LlamaModel:
    """Load a Llama, Mistral or Qwen2 checkpoint into ``LlamaModel`` (eval mode).

    device: default CUDA when present, else CPU. dtype: default the checkpoint's own.
    """
    given = dtype
    if isinstance(dtype, str):                  # "float16", "bfloat16", "float32" as transformers takes them
        dtype = None if dtype == "auto" else getattr(torch, dtype, None)
        if dtype is None and given != "auto":
            dtype = given                       # refused just below, by its name
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating-point torch.dtype, 'auto' or its name, e.g. 'bfloat16'; "
                         f"got {given!r}")
    device = as_device(device)
    folder = resolve(path_or_id)
    config = ModelConfig.from_json(folder)
    state = read_safetensors(folder)
    state = {k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}
    kinds = {v.dtype for v in state.values() if v.is_floating_point()}
    if dtype is None and len(kinds) > 1:        # the model would load, then fail in its first matmul
        raise ValueError(f"checkpoint at {folder} mixes {sorted(map(str, kinds))}: pass dtype= to load it "
                         f"in one of them")
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    with torch.device("meta"):
        model = LlamaModel(config, backend=backend)
    expected = set(model.state_dict())
    missing, unexpected = expected - set(state), set(state) - expected
    if config.tie_word_embeddings:
        missing.discard("lm_head.weight")
    if missing or unexpected:
        raise ValueError(f"checkpoint at {folder} does not fit the config: missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.inv_freq = rope_inv_freq(config)  # the buffer was built on the meta device
    model = model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
    model.inv_freq = model.inv_freq.float()
    return model.eval()


def load_tokenizer(path_or_id="target"):
    """The checkpoint's tokenizer through transformers (offline for local folders)."""
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(resolve(path_or_id)))


def save_model(model: LlamaModel, folder: str | Path, extra_config: dict | None = None) -> Path:
    """Write ``model`` as a Hugging Face checkpoint: config.json + model.safetensors."""
    from safetensors.torch import save_file
    check_float_model(model, "save_model")      # config.json would describe float linears it lacks
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = model.config.to_hf_dict()
    cfg["dtype"] = str(model.dtype).removeprefix("torch.")
    cfg.update(extra_config or {})
    (folder / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder
