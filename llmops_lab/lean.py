"""A lean forward pass: the same decoder with its per-step overheads cut, for small models on a CPU.

A decode step of the embedded models moves a few MB of weights, and on a CPU how they are read
decides the step time. ``LeanModel`` computes ``LlamaModel.forward`` with:

- q/k/v and gate/up fused into one weight each, concatenated once from the loaded weights, kept
  in both layouts [out, in] and [in, out] so each matmul reads the one MKL streams fastest
  (``_linear``; a snapshot: build a new ``LeanModel`` after changing the model's weights);
- RoPE cos/sin tabulated once per position and the causal mask as one additive table, sliced (or
  gathered, with padding) per call;
- attention as two batched matmuls with the query heads of each KV head stacked (``_attend``):
  SDPA on a CPU falls back to its slow math path whenever a mask is given, and a verify pass
  (k+1 queries at an offset) needs one;
- keys/values written in place into a preallocated ``KVCache``.

Its slow twin is ``LlamaModel.forward``: tests compare logits and greedy tokens against it. RMSNorm
and RoPE are op for op the same; matmuls may round differently in the last bit. Speculative
decoding runs its draft and target through it, and so does the target-alone baseline it is
measured against (``generate_lean``), so their ratio measures speculation, not the faster step.
The tables are [slots, slots]: meant for small models and short caches, not 128K contexts.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .fast_decode import check_fixed_length
from .generation import sample
from .kv import KVCache


def _linear(x, w, wt):
    """x [..., in] @ w.T with w [out, in] and wt = w.T contiguous [in, out].

    Same product, the weight layout MKL streams fastest, measured in place (a target step between
    draft steps, weights from DRAM) at the embedded models' shapes: a single row reads w when the
    input is the wider side (the down projection) and wt otherwise; several rows read wt. The
    plain ``F.linear`` (w for every shape) is 1.2-3x slower on the wide matmuls, and its k+1-row
    verify pass then costs about as much as k+1 single-token steps.
    """
    if x.numel() == x.shape[-1] and w.shape[1] > w.shape[0]:
        return F.linear(x, w)
    return x @ wt


def _attend(q, k, v, bias, scale):
    """Grouped-query attention as two batched matmuls, the query heads of a KV head stacked as rows.

    q [B, S, H, D]; k, v [B, Hkv, Sk, D] (cache views); bias [B * Hkv or 1, S * rep, Sk] additive
    (0 or -inf), rows ordered (query, head in group). Returns [B, S, H * D], o_proj's input.
    SDPA on a CPU takes its slow math path as soon as a mask is given (a verify pass at an offset
    needs one) and repeats K/V per query head; this does neither.
    """
    B, S, H, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    rep = H // Hkv
    qg = q.reshape(B, S, Hkv, rep, D).transpose(1, 2).reshape(B * Hkv, S * rep, D)
    scores = torch.baddbmm(bias, qg, k.reshape(B * Hkv, Sk, D).transpose(1, 2), alpha=scale)
    out = torch.bmm(scores.softmax(-1), v.reshape(B * Hkv, Sk, D))                 # [B*Hkv, S*rep, D]
    return out.view(B, Hkv, S, rep, D).transpose(1, 2).reshape(B, S, H * D)


def _rms(x, weight, eps):
    """RMSNorm exactly as ``model.RMSNorm`` computes it (fp32 statistics)."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def _both(w):
    return w, w.t().contiguous()


class LeanModel:
    """``LeanModel(model)(ids, cache, attention_mask=None, last_only=False) -> logits``, the same
    call as ``model(ids, cache=cache, ...)`` for a ``KVCache`` (no sliding window, no H2O)."""

    def __init__(self, model):
        c = model.config
        if c.sliding_window is not None:
            raise ValueError("LeanModel does not implement sliding-window attention; use the model itself")
        self.model, self.config = model, c
        self.H, self.Hkv, self.D = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.eps, self.inter, self.scale = c.rms_norm_eps, c.intermediate_size, c.head_dim ** -0.5
        with torch.no_grad():
            self.layers = []
            for layer in model.model.layers:
                a, m = layer.self_attn, layer.mlp
                qkv_b = (torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias])
                         if a.q_proj.bias is not None else None)
                wqkv = torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight])
                wgu = torch.cat([m.gate_proj.weight, m.up_proj.weight])
                self.layers.append((layer.input_layernorm.weight, *_both(wqkv), qkv_b, *_both(a.o_proj.weight),
                                    layer.post_attention_layernorm.weight, *_both(wgu),
                                    *_both(m.down_proj.weight)))
            self.head = _both(model.lm_head.weight)
        self._tables = 0
        self._grow(min(64, c.max_position_embeddings))
        self.embed, self.norm = model.model.embed_tokens.weight, model.model.norm.weight

    def _grow(self, n: int) -> None:
        """Tables for ``n`` cache slots: cos/sin per position, computed as ``LlamaModel.rope`` does
        (sin's first half negated, so rotate_half(x) * sin == x.roll(D/2) * sin_signed), and the
        causal and diagonal masks."""
        if n <= self._tables:
            return
        m, half = self.model, self.D // 2
        pos = torch.arange(min(n, self.config.max_position_embeddings), device=m.device)
        self.cos, sin = (t[0] for t in m.rope(pos[None], m.dtype))             # [P, D]
        self.sin = torch.cat([-sin[:, :half], sin[:, half:]], -1)
        self.causal = torch.ones(n, n, dtype=torch.bool, device=m.device).tril()
        self.diag = torch.eye(n, dtype=torch.bool, device=m.device)
        self.bias = torch.zeros(n, n, dtype=m.dtype, device=m.device).masked_fill(~self.causal, float("-inf"))
        self._tables = n

    def new_cache(self, batch_size: int, max_seq_len: int) -> KVCache:
        self._grow(max_seq_len)
        return KVCache.for_model(self.model, batch_size, max_seq_len)

    def __call__(self, input_ids, cache: KVCache, attention_mask=None, last_only: bool = False):
        """Logits [B, S, V] (or [B, 1, V]) for input_ids [B, S] appended at ``cache.length``.

        attention_mask: [B, cache.length + S] of 1/0 as in ``LlamaModel.forward`` (padding and
        rolled-back slots are 0); positions then count only a row's real tokens.
        """
        B, S = input_ids.shape
        st = cache.length
        end = st + S
        if end > cache.max_seq_len:
            raise ValueError(f"KV cache overflow: writing up to position {end} in a cache of {cache.max_seq_len}")
        if end > self._tables:
            self._grow(cache.max_seq_len)
        H, Hkv, D = self.H, self.Hkv, self.D
        rep = H // Hkv
        if attention_mask is None:
            if end > self.config.max_position_embeddings:
                raise ValueError(f"sequence of {end} tokens exceeds the model's context of "
                                 f"{self.config.max_position_embeddings}")
            cos, sin = self.cos[st:end, None], self.sin[st:end, None]          # [S, 1, D]
            bias = self.bias[st:end, None, :end].expand(S, rep, end).reshape(S * rep, end)
        else:
            pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -S:]  # [B, S]
            cos, sin = self.cos[pos][:, :, None], self.sin[pos][:, :, None]    # [B, S, 1, D]
            # A padding query would see nothing; let it see itself so softmax stays finite.
            allowed = (self.causal[st:end, :end] & attention_mask[:, None, :].bool()) | self.diag[st:end, :end]
            bias = torch.zeros(B, S, end, dtype=self.bias.dtype, device=input_ids.device).masked_fill_(~allowed, float("-inf"))
            bias = bias[:, None, :, None].expand(B, Hkv, S, rep, end).reshape(B * Hkv, S * rep, end)
        x = F.embedding(input_ids, self.embed)
        for i, (n1, wqkv, wqkv_t, bqkv, wo, wo_t, n2, wgu, wgu_t, wd, wd_t) in enumerate(self.layers):
            qkv = _linear(_rms(x, n1, self.eps), wqkv, wqkv_t)
            qkv = (qkv if bqkv is None else qkv + bqkv).view(B, S, H + 2 * Hkv, D)
            qk = qkv[:, :, :H + Hkv]
            qk = qk * cos + qk.roll(D // 2, -1) * sin                          # RoPE on q and k at once
            kc, vc = cache.k[i], cache.v[i]                                    # [B, Hkv, S_max, D]
            kc[:, :, st:end] = qk[:, :, H:].transpose(1, 2)
            vc[:, :, st:end] = qkv[:, :, H + Hkv:].transpose(1, 2)
            o = _attend(qk[:, :, :H], kc[:, :, :end], vc[:, :, :end], bias, self.scale)       # [B, S, H * D]
            x = x + _linear(o, wo, wo_t)
            gate, up = _linear(_rms(x, n2, self.eps), wgu, wgu_t).split(self.inter, -1)
            x = x + _linear(F.silu(gate) * up, wd, wd_t)
        cache.length = end
        if last_only:
            x = x[:, -1:]
        return _linear(_rms(x, self.norm, self.eps), *self.head)


@torch.inference_mode()
def generate_lean(model, input_ids, max_new_tokens: int = 32, temperature: float = 0.0, top_k=None, top_p=None,
                  attention_mask=None, generator=None, lean: LeanModel | None = None) -> torch.Tensor:
    """Like ``generation.generate`` without stop tokens (every row runs ``max_new_tokens``), through
    a ``LeanModel``; pass ``lean`` to reuse its fused weights across calls."""
    B, S = check_fixed_length(model, input_ids, max_new_tokens, temperature, top_k, top_p)
    lean = lean or LeanModel(model)
    cache = lean.new_cache(B, S + max_new_tokens)
    mask = None
    if attention_mask is not None and not bool(attention_mask.all()):
        mask = torch.ones(B, S + max_new_tokens, dtype=torch.long, device=input_ids.device)
        mask[:, :S] = attention_mask
    logits = lean(input_ids, cache, None if mask is None else mask[:, :S], last_only=True)[:, -1]
    out = torch.empty(B, S + max_new_tokens, dtype=torch.long, device=input_ids.device)
    out[:, :S] = input_ids
    for n in range(S, S + max_new_tokens):
        out[:, n] = sample(logits, temperature, top_k, top_p, generator)
        if n < S + max_new_tokens - 1:
            logits = lean(out[:, n:n + 1], cache, None if mask is None else mask[:, :n + 1])[:, -1]
    return out
