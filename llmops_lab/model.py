"""A Llama-family decoder in plain PyTorch: RMSNorm, RoPE, grouped-query attention, SwiGLU.

Touvron et al. 2023 (Llama), Su et al. 2021 (RoPE), Ainslie et al. 2023 (GQA), Shazeer 2020
(SwiGLU). Module and parameter names follow Hugging Face's LlamaForCausalLM, so a checkpoint's
state dict loads as it is. The attention backend and the KV cache are passed in, not hidden:
``model(ids, cache=KVCache.for_model(model, B), backend="naive")``.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import get_backend
from .config import ModelConfig
from .kv.cache import check_cache_fits


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # Normalise in fp32 as the reference does, then cast back before scaling.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """Inverse frequencies theta^(-2i/D), with linear or Llama-3 scaling when the config asks."""
    D = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
    s = config.rope_scaling
    if s is None:
        return inv_freq.float()
    kind = s.get("rope_type", s.get("type"))
    if kind == "linear":
        return (inv_freq / s["factor"]).float()
    # llama3: leave high frequencies alone, divide low ones by factor, blend in between.
    factor, lo, hi = s["factor"], s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
    old_ctx = s.get("original_max_position_embeddings", 8192)
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_ctx / wavelen - lo) / (hi - lo)
    scaled = torch.where(wavelen > old_ctx / lo, inv_freq / factor, inv_freq)
    mid = (wavelen <= old_ctx / lo) & (wavelen >= old_ctx / hi)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    return torch.where(mid, blended, scaled).float()


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x, cos, sin):
    """x [B, H, S, D]; cos, sin [B, S, D] (Hugging Face's half-split layout, not interleaved)."""
    return x * cos.unsqueeze(1) + rotate_half(x) * sin.unsqueeze(1)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        c = config
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.q_proj = nn.Linear(c.hidden_size, self.n_heads * self.head_dim, bias=c.attention_bias)
        self.k_proj = nn.Linear(c.hidden_size, self.n_kv * self.head_dim, bias=c.attention_bias)
        self.v_proj = nn.Linear(c.hidden_size, self.n_kv * self.head_dim, bias=c.attention_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, c.hidden_size, bias=False)

    def forward(self, x, cos, sin, cache, start, mask, is_causal, backend):
        q, k, v = self.project(x)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return self.attend(q, k, v, cache, start, mask, is_causal, backend)

    def project(self, x):
        """x [B, S, hidden] -> q [B, H, S, D], k, v [B, Hkv, S, D] (views of the projections)."""
        B, S, _ = x.shape
        q = self.q_proj(x).view(B, S, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, S, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, S, self.n_kv, self.head_dim).transpose(1, 2)
        return q, k, v

    def attend(self, q, k, v, cache, start, mask, is_causal, backend):
        """Store k, v in the cache, attend, project back: [B, S, hidden]."""
        B, _, S, _ = q.shape
        if cache is not None:  # a cache that selects what to keep by attention (H2O) also sees q
            k, v = (cache.update(self.layer_idx, k, v, start, q=q) if getattr(cache, "needs_query", False)
                    else cache.update(self.layer_idx, k, v, start))
        out = backend(q, k, v, mask, is_causal)                                       # [B, H, S, D]
        return self.o_proj(out.transpose(1, 2).reshape(B, S, -1))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(config, layer_idx)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, *attn_args):
        x = x + self.self_attn(self.input_layernorm(x), *attn_args)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    """The stack between embeddings and LM head (``model.`` in Hugging Face's names)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


def build_mask(start: int, S: int, attention_mask, sliding_window, device):
    """Boolean [B or 1, 1, S, start+S] mask (True = attend), or None for plain causal attention
    (no padding, no window in reach: the backends' ``is_causal``, aligned bottom-right).

    Query i sits at cache slot start+i and sees keys at slots <= start+i that are not padding
    (and, with a sliding window, no older than the window). The window is measured in token
    positions, counted along the mask's valid slots: a cache with holes (the rejected drafts that
    speculative decoding's rollback leaves in a batch) is wider in slots than in tokens, and a
    window measured in slots showed a row fewer tokens than the model attends to.
    """
    Sk = start + S
    windowed = sliding_window is not None and Sk > sliding_window
    if attention_mask is None and not windowed:
        # plain causal attention: every backend aligns is_causal bottom-right when there are fewer
        # queries than keys (a chunk or drafts after a cache), so no mask is needed, and the flash
        # kernel, which takes none, runs chunked prefill and speculative verification too
        return None
    if attention_mask is not None and attention_mask.shape[-1] != Sk:
        raise ValueError(f"attention_mask covers {attention_mask.shape[-1]} positions, expected {Sk}")
    qpos = torch.arange(start, Sk, device=device)[:, None]
    kpos = torch.arange(Sk, device=device)[None, :]
    allowed = (kpos <= qpos)[None, None]                              # [1, 1, S, Sk]
    if windowed:
        if attention_mask is None:
            allowed = allowed & (kpos > qpos - sliding_window)[None, None]
        else:                                   # positions of the tokens each row's slots hold
            pos = attention_mask.long().cumsum(-1) - 1                # [B, Sk]
            allowed = allowed & (pos[:, None, :] > pos[:, start:, None] - sliding_window)[:, None]
    if attention_mask is not None:
        allowed = allowed & attention_mask.bool()[:, None, None, :]
        # A padding query would see nothing at all; let it see itself so softmax stays finite.
        allowed = allowed | (kpos == qpos)[None, None]
    return allowed


class LlamaModel(nn.Module):
    """The whole causal LM: ``model(input_ids) -> logits`` of shape [B, S, vocab]."""

    def __init__(self, config: ModelConfig, backend="sdpa"):
        super().__init__()
        self.config = config
        self.model = Decoder(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.backend = get_backend(backend)
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)

    def _apply(self, fn, *args, **kwargs):
        """Module casts (``.to(bf16)``, ``.half()``) leave RoPE's frequencies in fp32, as transformers
        builds them: cast with the weights, bf16 rounds them by up to 0.4%, and the rotation angle
        at distance d is off by d times that (14 radians at 8000 tokens with theta 5e5)."""
        super()._apply(fn, *args, **kwargs)
        if self.inv_freq.dtype != torch.float32:
            self.inv_freq = rope_inv_freq(self.config).to(self.inv_freq.device)
        return self

    @property
    def device(self):
        return self.lm_head.weight.device

    @property
    def dtype(self):
        return self.lm_head.weight.dtype

    def rope(self, positions: torch.Tensor, dtype):
        freqs = positions[..., None].float() * self.inv_freq            # [B, S, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def check_ids(self, input_ids: torch.Tensor) -> None:
        if not torch.is_tensor(input_ids) or input_ids.dtype not in (torch.long, torch.int32):
            # the embedding lookup takes these two and raises deep inside on any other
            raise TypeError(f"input_ids must be a torch.long or torch.int32 tensor of token ids, got "
                            f"{input_ids.dtype if torch.is_tensor(input_ids) else type(input_ids).__name__}"
                            f"{' (call .long())' if torch.is_tensor(input_ids) else ''}")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        if input_ids.shape[1] == 0:
            raise ValueError("empty input: input_ids has no tokens")
        if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= self.config.vocab_size):
            raise ValueError(f"token ids must lie in [0, {self.config.vocab_size}); got "
                             f"[{int(input_ids.min())}, {int(input_ids.max())}]")

    def forward(self, input_ids, positions=None, cache=None, attention_mask=None, backend=None,
                last_only: bool = False, logits_indices=None):
        """Logits for input_ids [B, S].

        cache: a KVCache to read past keys/values from and append to (its ``length`` advances by S).
        attention_mask: [B, cache.length + S] of 1/0 (0 = padding), as in transformers.
        positions: [B, S] RoPE positions; by default counted from the mask (left padding) or
        from the cache length.
        last_only: compute logits for the last position only (decoding needs nothing else).
        logits_indices: positions of the sequence dimension to compute logits for (a packed batch
        of many sequences samples at the end of each).

        A cache whose ``packed`` is true holds several sequences flattened into one row
        (``input_ids`` [1, T], ``positions`` given per token): the attention backend it comes with
        reads its own per-sequence metadata, so no mask is built here.
        """
        self.check_ids(input_ids)
        B, S = input_ids.shape
        start = cache.length if cache is not None else 0
        if positions is None:
            if attention_mask is not None:
                positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -S:]
            else:
                positions = torch.arange(start, start + S, device=input_ids.device).expand(B, S)
        packed = getattr(cache, "packed", False)
        if attention_mask is not None and getattr(cache, "evicts", False):
            raise ValueError(f"{type(cache).__name__} keeps only some positions, so an attention_mask over "
                             f"all of them cannot apply: give it rows of equal length, without padding")
        if cache is not None and not packed:        # the engine's packed batch is built for this model
            check_cache_fits(cache, self)
        if packed and positions is None:
            raise ValueError("a packed batch needs explicit positions")
        # Positions, not cache slots, are what the context limits (masked slots hold no token).
        last = int(positions.max()) + 1 if packed else (
            start + S if attention_mask is None else int(positions[:, -1].max()) + 1)
        if last > self.config.max_position_embeddings:
            raise ValueError(f"sequence of {last} tokens exceeds the model's context of "
                             f"{self.config.max_position_embeddings}")
        x = self.model.embed_tokens(input_ids)
        cos, sin = self.rope(positions, x.dtype)
        mask = None if packed else build_mask(start, S, attention_mask, self.config.sliding_window, x.device)
        if S > 1 and hasattr(cache, "prefill_mask"):  # a cache that keeps a window masks its prompt alike
            window = cache.prefill_mask(S, x.device)
            if window is not None:
                mask = window if mask is None else mask & window
        is_causal = mask is None and S > 1 and not packed
        attn = get_backend(backend) if backend is not None else self.backend
        for layer in self.model.layers:
            x = layer(x, cos, sin, cache, start, mask, is_causal, attn)
        if cache is not None:
            cache.length = start + S
        if logits_indices is not None:
            x = x[:, logits_indices]
        elif last_only:
            x = x[:, -1:]
        return self.lm_head(self.model.norm(x))

    def forward_packed(self, input_ids, positions, cache, backend, logits_indices=None, fused: bool = False):
        """``forward`` of a packed batch (input_ids, positions [1, T]) without its checks, each of
        which reads a device value on the host: what a CUDA graph captures, and what the engine
        runs once its scheduler has vouched for the ids and positions. Logits [1, T, vocab], or
        [1, len(logits_indices), vocab] at those positions (a device tensor: capturable).
        ``fused``: the layers' elementwise ops as one Triton kernel each (``fused_ops``)."""
        if fused:
            from . import fused_ops
        x = self.model.embed_tokens(input_ids)
        cos, sin = self.rope(positions, x.dtype)
        for layer in self.model.layers:
            if fused:
                x = fused_ops.decoder_layer(layer, x, cos, sin, cache, 0, None, False, backend)
            else:
                x = layer(x, cos, sin, cache, 0, None, False, backend)
        if logits_indices is not None:
            x = x[:, logits_indices]
        norm = self.model.norm
        return self.lm_head(fused_ops.rms_norm(x, norm.weight, norm.eps) if fused else norm(x))

    def decode_step_static(self, input_ids, pos, cache, attention_mask=None, positions=None, run_layer=None):
        """One decode step with static shapes, so it can be captured in a CUDA graph or compiled.

        input_ids [B, 1] are written at cache slots ``pos`` [B]; the step attends over the cache's
        whole buffer with a mask (slots <= pos that are not padding) instead of slicing it.
        ``positions`` [B] are the RoPE positions (default ``pos``; less where a row is left-padded).
        The caller tracks positions: ``cache.length`` is left alone. ``run_layer(layer, x, cos, sin,
        k, v, pos, mask, backend)``, given, runs each layer on its own cache tensors k, v (a compiled
        layer: ``fast_decode``).
        """
        x = self.model.embed_tokens(input_ids)
        cos, sin = self.rope((pos if positions is None else positions)[:, None], x.dtype)
        kpos = torch.arange(cache.max_seq_len, device=x.device)
        mask = kpos[None, :] <= pos[:, None]                                  # [B, S_max]
        # The window in slots: this buffer holds each row's tokens after its left padding, with no
        # holes, so a distance in slots is one in token positions, which build_mask counts
        if self.config.sliding_window is not None:
            mask = mask & (kpos[None, :] > pos[:, None] - self.config.sliding_window)
        if attention_mask is not None:
            mask = mask & attention_mask.bool()
        mask = mask[:, None, None, :]
        for i, layer in enumerate(self.model.layers):
            if run_layer is None:
                x = layer(x, cos, sin, cache, pos, mask, False, self.backend)
            else:
                x = run_layer(layer, x, cos, sin, cache.k[i], cache.v[i], pos, mask, self.backend)
        return self.lm_head(self.model.norm(x))

    def generate(self, input_ids, **kwargs):
        """Autoregressive generation; see ``llmops_lab.generation.generate`` for the arguments."""
        from .generation import generate
        return generate(self, input_ids, **kwargs)
