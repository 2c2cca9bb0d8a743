"""Loading Hugging Face checkpoints (config.json + safetensors) into our runtime.

Weights come only from safetensors files, never from pickles. A hub id is resolved through
huggingface_hub where the network allows; the embedded models under ``data/models`` always work.
"""
from __future__ import annotations

import dataclasses
import json
import warnings
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
    text = str(path_or_id)
    if isinstance(path_or_id, Path) or p.is_absolute() or text.startswith((".", "~")) or text.count("/") > 1:
        # written as a path (a hub id is "name" or "org/name"): no hub to ask
        raise FileNotFoundError(f"no such folder: {p}")
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(text, allow_patterns=[
            "*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"]))
    except Exception as e:  # offline, unknown id, gated repo...
        why = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise FileNotFoundError(f"{text!r} is neither a local folder nor a hub id that could be "
                                f"fetched here ({type(e).__name__}: {why})") from e


def read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint in ``folder``: the files its model.safetensors.index.json names,
    else model.safetensors, else its one safetensors file. A tensor in two files is refused."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        meta = _read_json(index)
        weight_map = meta.get("weight_map") if isinstance(meta, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index} has no weight_map naming the safetensors files")
        bad = [(k, v) for k, v in weight_map.items() if not isinstance(v, str) or Path(v).name != v]
        if bad:
            raise ValueError(f"{index}: weight_map must map tensor names to file names in {folder}, got {bad[:3]}")
        files = sorted(set(weight_map.values()))
        lost = [f for f in files if not (folder / f).is_file()]
        if lost:
            raise FileNotFoundError(f"{index} names {lost[:3]}, missing from {folder}")
    else:
        # as transformers does: without an index, model.safetensors alone is the checkpoint, and any
        # other file beside it (a backup, a draft) is not read: merging them overwrote tensors silently
        files = sorted(p.name for p in folder.glob("*.safetensors"))
        if "model.safetensors" in files:
            if len(files) > 1:
                warnings.warn(f"{folder}: reading model.safetensors only (there is no model.safetensors.index.json); "
                              f"not reading {[f for f in files if f != 'model.safetensors'][:3]}", stacklevel=3)
            files = ["model.safetensors"]
        elif len(files) > 1:
            raise ValueError(f"{folder} holds several safetensors files {files[:3]} but no model.safetensors and no "
                             f"model.safetensors.index.json saying which hold the model")
    if not files:
        bins = list(folder.glob("*.bin")) + list(folder.glob("*.pt"))
        hint = " (only pickle files found; convert them to safetensors)" if bins else ""
        raise FileNotFoundError(f"no safetensors weights in {folder}{hint}")
    state, source = {}, {}
    for f in files:
        for k, v in _read_safetensors_file(folder / f).items():
            if k in state:
                raise ValueError(f"tensor {k!r} is in both {source[k]} and {f} in {folder}")
            state[k], source[k] = v, f
    if index.exists():
        lost = [(k, f) for k, f in weight_map.items() if source.get(k) != f]
        if lost:
            raise ValueError(f"{index} places tensors in files that lack them: {lost[:3]}")
    return state


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


def _read_safetensors_file(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:     # empty, truncated, not safetensors at all
        raise ValueError(f"{path} is not a readable safetensors file: {e}") from None


COMPUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def load_model(path_or_id="target", device=None, dtype=None, backend="sdpa") -> LlamaModel:
    """Load a Llama, Mistral or Qwen2 checkpoint into ``LlamaModel`` (eval mode).

    device: default CUDA when present, else CPU. dtype: default the checkpoint's own.
    """
    given = dtype
    if isinstance(dtype, str):                  # "float16", "bfloat16", "float32" as transformers takes them
        dtype = None if dtype == "auto" else getattr(torch, dtype, None)
        if dtype is None and given != "auto":
            dtype = given                       # refused just below, by its name
    if dtype is not None and (not isinstance(dtype, torch.dtype) or dtype not in COMPUTE_DTYPES):
        # float8 is a floating dtype too, but no matmul or norm of this runtime computes in it
        raise ValueError(f"dtype must be one of {', '.join(str(d).removeprefix('torch.') for d in COMPUTE_DTYPES)} "
                         f"(a torch.dtype, its name, or 'auto'); got {given!r}")
    device = as_device(device)
    folder = resolve(path_or_id)
    config = ModelConfig.from_json(folder)
    state = read_safetensors(folder)
    state = {k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}
    # every weight is float: an integer tensor (a quantized format, a wrong export) was cast silently
    ints = [f"{k} ({v.dtype})" for k, v in state.items() if not v.is_floating_point()]
    if ints:
        raise ValueError(f"checkpoint at {folder} holds non-float tensors where float weights belong: "
                         f"{', '.join(ints[:3])}{', ...' if len(ints) > 3 else ''}")
    kinds = {v.dtype for v in state.values()}
    if dtype is None and len(kinds) > 1:        # the model would load, then fail in its first matmul
        raise ValueError(f"checkpoint at {folder} mixes {sorted(map(str, kinds))}: pass dtype= to load it "
                         f"in one of them")
    head, emb = state.get("lm_head.weight"), state.get("model.embed_tokens.weight")
    if config.tie_word_embeddings and head is not None and emb is not None and (
            head.shape != emb.shape or not torch.equal(head, emb.to(head.dtype))):
        # transformers keeps a trained head that differs from the embeddings (and warns) rather than
        # tie it away: dropping it changed every logit
        warnings.warn(f"{folder}: config.json ties the embeddings but the checkpoint has its own lm_head.weight; "
                      f"keeping the two apart, as transformers does", stacklevel=2)
        config = dataclasses.replace(config, tie_word_embeddings=False)
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
    shapes = model.state_dict()
    wrong = [f"{k} is {tuple(v.shape)}, the config wants {tuple(shapes[k].shape)}"
             for k, v in state.items() if v.shape != shapes[k].shape]
    if wrong:                                   # load_state_dict's RuntimeError named neither
        raise ValueError(f"checkpoint at {folder} does not fit its config.json: {'; '.join(wrong[:3])}"
                         f"{'; ...' if len(wrong) > 3 else ''}")
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.inv_freq = rope_inv_freq(config)  # the buffer was built on the meta device
    model = model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
    model.inv_freq = model.inv_freq.float()
    return model.eval()


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")


def check_tokenizer(path_or_id="target") -> Path:
    """The checkpoint's folder, or a ValueError when it holds no tokenizer: transformers otherwise
    failed with 'Couldn't instantiate the backend tokenizer... install sentencepiece'."""
    folder = resolve(path_or_id)
    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise ValueError(f"{folder} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); copy the "
                         f"tokenizer files of the model it was trained from into it")
    return folder


def load_tokenizer(path_or_id="target"):
    """The checkpoint's tokenizer through transformers (offline for local folders)."""
    from transformers import AutoTokenizer
    folder = check_tokenizer(path_or_id)
    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except (ValueError, OSError) as e:          # a corrupt tokenizer file: name the folder
        raise ValueError(f"could not load the tokenizer in {folder}: {e}") from e


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
