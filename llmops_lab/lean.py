"""A lean forward pass: the same decoder with its per-step overheads cut, for small models on a CPU.

A decode step of the embedded models moves a few MB of weights, and on a CPU how they are read
decides the step time. ``LeanModel`` computes ``LlamaModel.forward`` with:

- q/k/v and gate/up fused into one weight each, concatenated once from the loaded weights, each
  weight kept in the layouts the CPU multiplies fastest: [out, in] and [in, out] for MKL's
  single-row products, and oneDNN's prepacked layout for several rows, which makes a verify pass
  of k+1 tokens cost about one decode step (``Linear``; a snapshot: build a new ``LeanModel``
  after changing the model's weights; ``pack=False`` keeps MKL for every shape);
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


def _onednn_available() -> bool:
    """oneDNN's prepacked linear (the op inductor uses on x86 CPUs) is in this torch build."""
    return (torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


class Linear:
    """A bias-free weight w [out, in] in the layouts a CPU multiplies fastest: ``Linear(w)(x)`` is
    x [..., in] @ w.T, the same product as ``F.linear(x, w)`` up to the last bit.

    Measured at the embedded models' shapes on this project's 2-core CPU (fp32, weights streamed
    from memory, as in a decode step between draft steps) while this was written; the timings below
    were printed then and are not kept as files (``python -m llmops_lab.bench --only spec`` measures
    the verify cost v again, as its rows' ``verify_cost``):

    - one row (a decode step) goes through MKL: it reads w when the input is the wider side (the
      down projection) and wt = w.T contiguous [in, out] otherwise; the plain ``F.linear`` is
      1.2-3x slower on the wide matmuls;
    - several rows (a verify pass of k+1 tokens, a prefill) go through oneDNN with the weight
      reordered once into its blocked layout (``packed``), when ``pack`` and the build has it.
      MKL's small-M GEMM repacks the weight at every call, and its k+1-row verify pass cost
      1.4-1.9 single-token steps; prepacked, 1.1-1.3 (``--only spec``). All the embedded target's
      matmuls of one step (2026-11-26, 2 threads): 5 rows 1.3-1.6 ms and 9 rows 1.6-1.9 ms
      prepacked, against MKL's 2.9-3.2 and 3.3 ms, and 2.1-2.2 ms for one row through MKL.

    A snapshot of w: build a new one after changing the model's weights.
    """

    __slots__ = ("w", "wt", "packed")

    def __init__(self, w: torch.Tensor, pack: bool = False):
        self.w, self.wt = w, w.t().contiguous()
        self.packed = None
        if pack and w.device.type == "cpu" and w.dtype == torch.float32 and _onednn_available():
            # reordered for 8-row inputs: of 1, 5 and 8 measured, the fastest from 2 to 9 rows
            self.packed = torch.ops.mkldnn._reorder_linear_weight(w, 8)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        single = x.numel() == x.shape[-1]
        if not single and self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")
        if single and self.w.shape[1] > self.w.shape[0]:
            return F.linear(x, self.w)
        return x @ self.wt


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


class LeanModel:
    """``LeanModel(model)(ids, cache, attention_mask=None, last_only=False) -> logits``, the same
    call as ``model(ids, cache=cache, ...)`` for a ``KVCache`` (no sliding window, no H2O)."""

    def __init__(self, model, pack: bool = True):
        c = model.config
        if c.sliding_window is not None:
            raise ValueError("LeanModel does not implement sliding-window attention; use the model itself")
        self.model, self.config = model, c
        self.H, self.Hkv, self.D = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.eps, self.inter, self.scale = c.rms_norm_eps, c.intermediate_size, c.head_dim ** -0.5
        with torch.no_grad():
            lin = lambda w: Linear(w, pack)
            self.layers = []
            for layer in model.model.layers:
                a, m = layer.self_attn, layer.mlp
                qkv_b = (torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias])
                         if a.q_proj.bias is not None else None)
                wqkv = torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight])
                wgu = torch.cat([m.gate_proj.weight, m.up_proj.weight])
                self.layers.append((layer.input_layernorm.weight, lin(wqkv), qkv_b, lin(a.o_proj.weight),
                                    layer.post_attention_layernorm.weight, lin(wgu), lin(m.down_proj.weight)))
            self.head = lin(model.lm_head.weight)
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

    def _check(self, input_ids, cache, attention_mask) -> None:
        """What ``LlamaModel.forward`` checks, but the value checks only on a CPU (speculative
        decoding calls this per token; on a GPU a host read of the ids would stall the step, and its
        callers already vouch for them)."""
        if input_ids.dim() != 2 or input_ids.shape[1] == 0 or input_ids.dtype.is_floating_point:
            raise ValueError(f"input_ids must be non-empty integer ids [batch, seq], got {input_ids.dtype} "
                             f"{tuple(input_ids.shape)}")
        B, S = input_ids.shape
        if B != cache.batch_size:
            raise ValueError(f"batch of {B} rows does not match the cache's {cache.batch_size}")
        end = cache.length + S
        if attention_mask is not None and tuple(attention_mask.shape) != (B, end):
            raise ValueError(f"attention_mask must be [B, cache.length + S] = {[B, end]}, got {list(attention_mask.shape)}")
        if input_ids.device.type == "cpu":
            V = self.config.vocab_size
            if int(input_ids.min()) < 0 or int(input_ids.max()) >= V:
                raise ValueError(f"token ids must lie in [0, {V})")
            if attention_mask is not None and int(attention_mask.long().sum(-1).max()) > self.config.max_position_embeddings:
                raise ValueError(f"a row of more than the model's context of {self.config.max_position_embeddings} tokens")

    def __call__(self, input_ids, cache: KVCache, attention_mask=None, last_only: bool = False):
        """Logits [B, S, V] (or [B, 1, V]) for input_ids [B, S] appended at ``cache.length``.

        attention_mask: [B, cache.length + S] of 1/0 as in ``LlamaModel.forward`` (padding and
        rolled-back slots are 0); positions then count only a row's real tokens.
        """
        self._check(input_ids, cache, attention_mask)
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
        for i, (n1, wqkv, bqkv, wo, n2, wgu, wd) in enumerate(self.layers):
            qkv = wqkv(_rms(x, n1, self.eps))
            qkv = (qkv if bqkv is None else qkv + bqkv).view(B, S, H + 2 * Hkv, D)
            qk = qkv[:, :, :H + Hkv]
            qk = qk * cos + qk.roll(D // 2, -1) * sin                          # RoPE on q and k at once
            kc, vc = cache.k[i], cache.v[i]                                    # [B, Hkv, S_max, D]
            kc[:, :, st:end] = qk[:, :, H:].transpose(1, 2)
            vc[:, :, st:end] = qkv[:, :, H + Hkv:].transpose(1, 2)
            o = _attend(qk[:, :, :H], kc[:, :, :end], vc[:, :, :end], bias, self.scale)       # [B, S, H * D]
            x = x + wo(o)
            gate, up = wgu(_rms(x, n2, self.eps)).split(self.inter, -1)
            x = x + wd(F.silu(gate) * up)
        cache.length = end
        if last_only:
            x = x[:, -1:]
        return self.head(_rms(x, self.norm, self.eps))


@torch.inference_mode()
def generate_lean(model, input_ids, max_new_tokens: int = 32, temperature: float = 0.0, top_k=None, top_p=None,
                  attention_mask=None, generator=None, lean: LeanModel | None = None) -> torch.Tensor:
    """Like ``generation.generate`` without stop tokens (every row runs ``max_new_tokens``), through
    a ``LeanModel``; pass ``lean`` to reuse its fused weights across calls."""
    B, S = check_fixed_length(model, input_ids, max_new_tokens, temperature, top_k, top_p, attention_mask)
    lean = lean or LeanModel(model)
    if lean.model is not model:     # it runs its own model's fused weights: another's tokens came back
        raise ValueError("lean was built from another model; build one with LeanModel(model)")
    cache = lean.new_cache(B, S + max_new_tokens - 1)      # the last new token is never fed back
    mask = None
    if attention_mask is not None and not bool(attention_mask.all()):
        mask = torch.ones(B, S + max_new_tokens - 1, dtype=torch.long, device=input_ids.device)
        mask[:, :S] = attention_mask
    logits = lean(input_ids, cache, None if mask is None else mask[:, :S], last_only=True)[:, -1]
    out = torch.empty(B, S + max_new_tokens, dtype=torch.long, device=input_ids.device)
    out[:, :S] = input_ids
    for n in range(S, S + max_new_tokens):
        out[:, n] = sample(logits, temperature, top_k, top_p, generator)
        if n < S + max_new_tokens - 1:
            logits = lean(out[:, n:n + 1], cache, None if mask is None else mask[:, :n + 1])[:, -1]
    return out
