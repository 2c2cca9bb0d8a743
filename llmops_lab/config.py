"""ModelConfig: the shape of a Llama-family decoder, read from a Hugging Face config.json.

Llama, Mistral and Qwen2 checkpoints share one architecture (RMSNorm, RoPE, grouped-query
attention, SwiGLU); they differ only in a few fields (Qwen2's q/k/v biases, Mistral's sliding
window, Llama 3's RoPE scaling), so one frozen dataclass covers them all.
"""
from __future__ import annotations

import json
import math
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .checks import is_int, is_real

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
# max_position_embeddings of a config.json without it, as transformers' LlamaConfig (2048),
# MistralConfig and Qwen2Config read it; their rms_norm_eps default is 1e-6 for all three
HF_DEFAULT_CONTEXT = {"llama": 2048, "mistral": 131072, "qwen2": 32768}


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int
    head_dim: int | None = None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    model_type: str = "llama"
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    name: str = field(default="", compare=False)

    def __post_init__(self):
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"model_type {self.model_type!r} is not a Llama-family decoder; "
                             f"supported: {SUPPORTED_MODEL_TYPES}")
        for f in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "num_key_value_heads", "max_position_embeddings"):
            v = getattr(self, f)
            if not is_int(v) or v < 1:
                raise ValueError(f"{f} must be an integer >= 1, got {v!r}")
        if self.head_dim is not None and (not is_int(self.head_dim) or self.head_dim < 1):
            raise ValueError(f"head_dim must be an integer >= 1 or None, got {self.head_dim!r}")
        # JSON "false" is a string, and truthy: it tied the head or added biases without a word
        for f in ("attention_bias", "tie_word_embeddings"):
            if not isinstance(getattr(self, f), bool):
                raise ValueError(f"{f} must be true or false, got {getattr(self, f)!r}")
        # an id outside the vocabulary loaded fine and failed later, in the serving engine
        if self.bos_token_id is not None and not _is_token(self.bos_token_id, self.vocab_size):
            raise ValueError(f"bos_token_id must be a token id in [0, {self.vocab_size}) or None, "
                             f"got {self.bos_token_id!r}")
        eos = self.eos_token_id
        if eos is not None and not all(_is_token(i, self.vocab_size)
                                       for i in (eos if isinstance(eos, (list, tuple)) else [eos])):
            raise ValueError(f"eos_token_id must be a token id in [0, {self.vocab_size}), a list of them, or None, "
                             f"got {eos!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                             f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError("hidden_size must be divisible by num_attention_heads when head_dim is not given")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        # each of these loads without complaint otherwise and gives wrong logits (NaN or silently
        # masked attention): a checkpoint's typo is an error here, not a model that runs.
        # A bool is refused too: true was read as 1.0
        if not is_real(self.rope_theta) or not math.isfinite(self.rope_theta) or self.rope_theta <= 0:
            raise ValueError(f"rope_theta must be a positive number, got {self.rope_theta!r}")
        if not is_real(self.rms_norm_eps) or not math.isfinite(self.rms_norm_eps) or self.rms_norm_eps < 0:
            raise ValueError(f"rms_norm_eps must be a number >= 0, got {self.rms_norm_eps!r}")
        if self.sliding_window is not None and (not is_int(self.sliding_window) or self.sliding_window < 1):
            raise ValueError(f"sliding_window must be a positive number of tokens or None, got {self.sliding_window!r}")
        if self.rope_scaling is not None:
            _check_rope_scaling(self.rope_scaling)

    @property
    def n_rep(self) -> int:
        """How many query heads share one KV head (1 = multi-head, >1 = grouped-query)."""
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        e = self.eos_token_id
        if e is None:
            return ()
        return tuple(e) if isinstance(e, (list, tuple)) else (e,)

    def num_parameters(self) -> int:
        """Parameter count from the shapes alone (what the presets use; no weights needed)."""
        d, f, L = self.hidden_size, self.intermediate_size, self.num_hidden_layers
        q = self.num_attention_heads * self.head_dim
        kv = self.num_key_value_heads * self.head_dim
        attn = d * q + 2 * d * kv + q * d + (q + 2 * kv if self.attention_bias else 0)
        mlp = 3 * d * f
        per_layer = attn + mlp + 2 * d
        emb = self.vocab_size * d
        head = 0 if self.tie_word_embeddings else self.vocab_size * d
        return L * per_layer + emb + head + d

    @classmethod
    def from_hf_dict(cls, cfg: dict, name: str = "") -> "ModelConfig":
        if not isinstance(cfg, dict):
            raise ValueError(f"a config must be a JSON object, got {type(cfg).__name__}")
        need = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                            "num_attention_heads") if k not in cfg]
        if need:
            raise ValueError(f"config lacks {need}")
        model_type = cfg.get("model_type", "llama")
        # a key that is absent reads as transformers' own config class reads it
        context = cfg.get("max_position_embeddings", HF_DEFAULT_CONTEXT.get(model_type, 2048))
        # transformers 5 moved rope_theta/rope_scaling into rope_parameters; read both spellings.
        rope = cfg.get("rope_parameters")
        rope = {} if rope is None else rope
        if not isinstance(rope, dict):
            raise ValueError(f"rope_parameters must be a JSON object, got {rope!r}")
        scaling = cfg.get("rope_scaling")
        if scaling is not None and not isinstance(scaling, dict):
            raise ValueError(f"rope_scaling must be a JSON object or null, got {scaling!r}")
        # transformers' order: the RoPE dict in use (rope_scaling if given, else rope_parameters), then
        # the top-level key, then 10000; the top-level one first put 1234 where transformers had 10000
        rope_theta = (scaling or rope).get("rope_theta", cfg.get("rope_theta", 10000.0))
        if not is_real(rope_theta):     # float() took true as 1.0 and failed on null
            raise ValueError(f"rope_theta must be a positive number, got {rope_theta!r}")
        if not scaling:
            scaling = rope if set(rope) - {"rope_theta"} else None
        if scaling is not None:
            scaling = dict(scaling)
            # without a type, a factor was silently dropped: RoPE ran unscaled
            kind = scaling.get("rope_type", scaling.get("type"))
            if kind is None:
                raise ValueError(f"rope_scaling {scaling} lacks 'rope_type' (or 'type'): say which scaling "
                                 f"(default, linear, llama3)")
            if kind not in ("default", "dynamic", "linear", "llama3"):
                raise ValueError(f"RoPE scaling {kind!r} is not supported (default, dynamic, linear, llama3 are)")
            if kind in ("default", "dynamic"):
                # dynamic NTK rescales only past max_position_embeddings, which the forward refuses:
                # inside the context it is plain RoPE (transformers' logits agree to 2e-6)
                scaling = None
            elif kind == "llama3":
                # transformers 5 fills a missing pretraining length with the config's own context (a
                # top-level key first); the 8192 of Llama 3.1 moved 47 of 200 greedy tokens
                old = cfg.get("original_max_position_embeddings")
                if old is not None:
                    scaling["original_max_position_embeddings"] = old
                scaling.setdefault("original_max_position_embeddings", context)
        act = cfg.get("hidden_act", cfg.get("hidden_activation", "silu"))
        if act == "swish":      # transformers' name for the same function (nn.SiLU)
            act = "silu"
        if act != "silu":       # the MLP is SwiGLU; another activation would be silently replaced
            raise ValueError(f"hidden_act {act!r} is not supported: this runtime's MLP is SwiGLU (silu)")
        # transformers' Mistral and Qwen2 configs default the window to 4096 tokens when the key is absent
        sliding = cfg.get("sliding_window", 4096 if model_type in ("mistral", "qwen2") else None)
        if model_type not in ("mistral", "qwen2") and is_int(sliding) and sliding >= 1:   # a bad value: refused below
            # transformers' Llama never reads the key (it attends over the whole prefix), so neither do we
            warnings.warn(f"config has sliding_window {sliding} but model_type {model_type!r} does not window "
                          f"its attention (transformers ignores the key there too): ignored", stacklevel=3)
            sliding = None
        if model_type == "qwen2":
            sliding = _qwen2_window(cfg, sliding)
        # Llama's attention_bias puts biases on q, k, v and o_proj; this runtime has Qwen2's (q, k, v only)
        if model_type != "qwen2" and cfg.get("attention_bias") is True:
            raise ValueError(f"attention_bias true for {model_type}: biases on q, k, v and o_proj are not "
                             f"supported (this runtime has Qwen2's q/k/v biases only)")
        if cfg.get("mlp_bias") is True:
            raise ValueError("mlp_bias true is not supported: this runtime's MLP has no biases")
        heads_kv = cfg.get("num_key_value_heads")      # missing or null: multi-head; 0 is refused below
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=cfg["num_attention_heads"],
            num_key_value_heads=cfg["num_attention_heads"] if heads_kv is None else heads_kv,
            max_position_embeddings=context,
            head_dim=cfg.get("head_dim"),
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            rope_scaling=scaling,
            # transformers' Qwen2 always has q/k/v biases and never reads the key
            attention_bias=True if model_type == "qwen2" else cfg.get("attention_bias", False),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            sliding_window=sliding,
            model_type=model_type,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=cfg.get("eos_token_id"),
            name=name,
        )

    @classmethod
    def from_json(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.exists():
            raise FileNotFoundError(f"no config.json at {path}")
        try:
            cfg = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
        gen = path.parent / "generation_config.json"
        if isinstance(cfg, dict) and gen.exists():
            # transformers' generate stops at generation_config's eos_token_id (Llama-3-Instruct adds its
            # end-of-turn token there only); vLLM reads it too
            try:
                eos = json.loads(gen.read_text()).get("eos_token_id")
            except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
                raise ValueError(f"{gen} is not a valid JSON object: {e}") from None
            if eos is not None:
                cfg = {**cfg, "eos_token_id": eos}
        try:
            return cls.from_hf_dict(cfg, name=path.parent.name)
        except (ValueError, TypeError) as e:    # a value of the wrong type, named with its file
            raise ValueError(f"{path}: {e}") from None

    def to_hf_dict(self) -> dict:
        """The config.json transformers expects for this shape (LlamaConfig field names)."""
        d = {k: v for k, v in asdict(self).items() if k != "name"}
        d["architectures"] = {"llama": ["LlamaForCausalLM"], "mistral": ["MistralForCausalLM"],
                              "qwen2": ["Qwen2ForCausalLM"]}[self.model_type]
        # sliding_window is written even when None: transformers' Mistral reads a missing one as 4096.
        # Qwen2 windows only with use_sliding_window, and only layers from max_window_layers on: ours are all
        if self.model_type == "qwen2":
            d["use_sliding_window"] = self.sliding_window is not None
            if self.sliding_window is not None:
                d["max_window_layers"] = 0
        d["hidden_act"] = "silu"
        d["mlp_bias"] = False
        return d


def _qwen2_window(cfg: dict, sliding):
    """Qwen2's window as transformers' Qwen2Config reads it: none unless use_sliding_window, and then
    only in the layers ``layer_types`` names, or else from ``max_window_layers`` (default 28) on. This
    runtime windows every layer or none, so a mix is refused."""
    use = cfg.get("use_sliding_window", False)
    if not isinstance(use, bool):
        raise ValueError(f"use_sliding_window must be true or false, got {use!r}")
    if not use or sliding is None:
        return None
    layers = cfg["num_hidden_layers"]
    types = cfg.get("layer_types")
    if types is None:
        first = cfg.get("max_window_layers", 28)
        if not is_int(first) or first < 0:
            raise ValueError(f"max_window_layers must be an integer >= 0, got {first!r}")
        windowed = {i >= first for i in range(layers)} if is_int(layers) else set()
    else:
        if not isinstance(types, list) or len(types) != layers or \
                not all(t in ("sliding_attention", "full_attention") for t in types):
            raise ValueError(f"layer_types must list 'sliding_attention' or 'full_attention' for each of the "
                             f"{layers} layers, got {types!r}")
        windowed = {t == "sliding_attention" for t in types}
    if windowed == {True, False}:
        raise ValueError("this Qwen2 config windows some layers and not others (max_window_layers or "
                         "layer_types); this runtime applies one sliding_window to every layer or none")
    return sliding if windowed == {True} else None


def _is_token(i, vocab_size: int) -> bool:
    return is_int(i) and 0 <= i < vocab_size


def _check_rope_scaling(s: dict) -> None:
    """A linear or Llama-3 RoPE scaling needs a positive factor; Llama 3's frequency bounds must be
    ordered, or its blend divides by zero."""
    if not isinstance(s, dict):
        raise ValueError(f"rope_scaling must be a dict (a JSON object) or None, got {s!r}")
    kind = s.get("rope_type", s.get("type"))
    if kind is None:
        raise ValueError(f"rope_scaling {s} lacks 'rope_type' (or 'type')")
    if kind not in ("linear", "llama3"):
        raise ValueError(f"RoPE scaling {kind!r} is not supported (linear, llama3 are)")
    factor = s.get("factor")
    if not is_real(factor) or not math.isfinite(factor) or factor <= 0:
        raise ValueError(f"rope_scaling needs a positive 'factor', got {factor!r}")
    if kind == "llama3":
        lo, hi = s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
        for k, v in (("low_freq_factor", lo), ("high_freq_factor", hi)):
            if not is_real(v) or not math.isfinite(v):
                raise ValueError(f"llama3 rope_scaling's {k} must be a number, got {v!r}")
        if not 0 < lo < hi:
            raise ValueError(f"llama3 rope_scaling needs 0 < low_freq_factor < high_freq_factor, got {lo}, {hi}")
        old_ctx = s.get("original_max_position_embeddings", 8192)
        if not is_int(old_ctx) or old_ctx < 1:
            raise ValueError(f"llama3 rope_scaling's original_max_position_embeddings must be an integer >= 1, "
                             f"got {old_ctx!r}")
