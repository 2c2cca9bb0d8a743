"""Measuring the KV cache: allocated bytes against the formula, and what compression costs in quality.

Memory is measured (the profiler's allocation events on a CPU, the caching allocator on a GPU;
``measure.peak_memory``) and set against ``formulas.kv_cache_bytes``. Compression is judged on
held-out text decoded token by token through each cache: perplexity of the true next tokens, and
agreement of the greedy choice with the full cache's along the full cache's own greedy output
(Xiao et al. 2023 and Zhang et al. 2023 report the same two kinds of number). Nothing here prints.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .. import formulas, measure
from ..corpus import read_slice
from ..evaluate import encode
from ..presets import PRESETS
from .cache import KVCache
from .h2o import HeavyHitterKVCache, attention_weights
from .quantized import Int8KVCache, quantized_kv_cache_bytes
from .sliding_window import (DocumentSlidingWindowCache, SinkKVCache, SlidingWindowKVCache,
                             document_sliding_window_update)

# ---------------------------------------------------------------------------------------------
# Bytes: formula against allocation


def allocated_vs_formula(sweep: str, values, num_layers: int = 8, batch_size: int = 1, num_kv_heads: int = 2,
                         head_dim: int = 32, seq_len: int = 1024, dtype=torch.float32, device="cpu") -> dict:
    """Build a ``KVCache`` at each value of one dimension and measure what it allocates.

    sweep: "seq_len", "batch_size" or "num_kv_heads"; the other dimensions stay at their arguments.
    Returns {"x", "allocated" (peak allocation while building it), "nbytes" (its tensors' bytes),
    "formula" (``formulas.kv_cache_bytes``)}, one entry per value.
    """
    if sweep not in ("seq_len", "batch_size", "num_kv_heads"):
        raise ValueError(f"sweep must be seq_len, batch_size or num_kv_heads, not {sweep!r}")
    out = {"x": list(values), "allocated": [], "nbytes": [], "formula": []}
    dtype_bytes = torch.empty((), dtype=dtype).element_size()
    for x in values:
        dims = {"seq_len": seq_len, "batch_size": batch_size, "num_kv_heads": num_kv_heads, sweep: x}
        peak = measure.peak_memory(KVCache, num_layers, dims["batch_size"], dims["num_kv_heads"], head_dim,
                                   dims["seq_len"], dtype, device, device=device)
        out["allocated"].append(peak.peak_bytes)
        out["nbytes"].append(peak.result.nbytes)
        out["formula"].append(formulas.kv_cache_bytes(num_layers, dims["num_kv_heads"], head_dim, dims["seq_len"],
                                                      dtype_bytes, dims["batch_size"]))
        del peak
    return out


def generation_peak_vs_formula(model, new_tokens=(8, 24, 56, 120), prompt_len: int = 8,
                               batch_size: int = 2) -> dict:
    """Peak memory of ``model.generate`` for each length against the KV formula at that length.

    The prompt is fixed, so everything but the cache (a step's activations) is the same at every
    length: measured - formula should be one constant. Returns {"x" (total tokens), "peak",
    "formula", "activations" (peak - formula)}.
    """
    formulas._positive_int(prompt_len=prompt_len, batch_size=batch_size)
    ctx = model.config.max_position_embeddings
    for n in new_tokens:
        formulas._positive_int(new_tokens=n)
        if prompt_len + n > ctx:  # generate would stop at the context: the x and formula would be wrong
            raise ValueError(f"prompt_len {prompt_len} + new_tokens {n} exceeds the model's context of {ctx}")
    dev = model.device
    ids = torch.randint(3, model.config.vocab_size, (batch_size, prompt_len), device=dev,
                        generator=torch.Generator(device=dev).manual_seed(0))
    dtype_bytes = next(model.parameters()).element_size()
    model.generate(ids, max_new_tokens=2, stop_token_ids=())  # warm-up: lazy workspaces, allocator pools
    out = {"x": [], "peak": [], "formula": [], "activations": []}
    for n in new_tokens:
        peak = measure.peak_memory(model.generate, ids, max_new_tokens=n, stop_token_ids=(), device=dev)
        kv = formulas.kv_cache_bytes_for(model.config, prompt_len + n, batch_size, dtype_bytes)
        out["x"].append(prompt_len + n)
        out["peak"].append(peak.peak_bytes)
        out["formula"].append(kv)
        out["activations"].append(peak.peak_bytes - kv)
    return out


def presets_table(seq_len: int = 4096, dtype_bytes: int = 2) -> list[dict]:
    """Per preset: shape, KV bytes per token, and one sequence's cache as written (n_heads) and corrected."""
    rows = []
    for key, c in PRESETS.items():
        written = formulas.kv_cache_bytes_as_written(c.num_hidden_layers, c.num_attention_heads, c.head_dim,
                                                     seq_len, dtype_bytes)
        corrected = formulas.kv_cache_bytes_for(c, seq_len, 1, dtype_bytes)
        rows.append({"preset": key, "layers": c.num_hidden_layers, "heads": c.num_attention_heads,
                     "kv_heads": c.num_key_value_heads, "head_dim": c.head_dim,
                     "kv_bytes_per_token": formulas.kv_cache_bytes_per_token(c, dtype_bytes),
                     "as_written_gb": formulas.to_gb(written), "kv_gb": formulas.to_gb(corrected),
                     "overstated_x": written / corrected})
    return rows


def meta_cache_bytes(preset: str, seq_len: int = 4096, dtype=torch.bfloat16) -> int:
    """``KVCache.nbytes`` of one sequence of a preset, built on the meta device (shapes, no memory)."""
    return KVCache.for_model(_MetaShape(PRESETS[preset]), 1, seq_len, dtype, "meta").nbytes


class _MetaShape:
    """Just enough of a model for ``KVCache.for_model``: a config and one meta parameter."""

    def __init__(self, config):
        self.config = config

    def parameters(self):
        yield torch.empty(0, device="meta")


def markdown_table(rows: list[dict], columns: dict[str, str], formats: dict[str, str] | None = None) -> str:
    """A Markdown table of ``rows`` with {key: header} columns; ``formats`` are format specs by key."""
    formats = formats or {}
    cell = lambda r, k: "" if r.get(k) is None else format(r[k], formats.get(k, ""))
    lines = ["| " + " | ".join(columns.values()) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r, k) for k in columns) + " |" for r in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The document's sliding window, as written


def document_window_facts(window_size: int = 4, seq_len: int = 10, head_dim: int = 8) -> dict:
    """What the document's ``update`` does when handed a step's new key, or the whole history."""
    history = torch.randn(1, 1, seq_len, head_dim)
    new_only, _ = document_sliding_window_update(history[:, :, -1:], history[:, :, -1:], window_size)
    window, _ = document_sliding_window_update(history, history, window_size)
    return {"tokens_returned_for_new_token": new_only.shape[-2],
            "tokens_returned_for_history": window.shape[-2],
            "bytes_of_window": window.numel() * window.element_size(),
            "bytes_kept_alive_by_window": measure.tensor_bytes(window),
            "bytes_of_history": measure.tensor_bytes(history)}


# ---------------------------------------------------------------------------------------------
# Where attention goes


class _AttentionProbe(KVCache):
    """A full cache that also records each layer's attention weights (per KV head, summed over its group)."""

    needs_query = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.weights = {}

    def update(self, layer, k, v, start, q=None):
        k, v = super().update(layer, k, v, start)
        self.weights[layer] = attention_weights(q, k, causal=True) * (k.shape[1] / q.shape[1])
        return k, v


@torch.inference_mode()
def attention_shares(model, ids: torch.Tensor, num_sinks: int = 4, window: int = 16,
                     from_position: int = 128) -> list[dict]:
    """Per layer, the mean share of attention the queries at ``from_position``.. give to the first
    ``num_sinks`` tokens (StreamingLLM's sinks) and to their own last ``window`` tokens, next to the
    share a uniform spread would give the first tokens. ids: [B, S] token ids."""
    B, S = ids.shape
    if not num_sinks < from_position < S:
        raise ValueError(f"need num_sinks < from_position < sequence length, got {num_sinks}, {from_position}, {S}")
    probe = _AttentionProbe.for_model(model, B, S)
    model(ids.to(model.device), cache=probe)
    q = torch.arange(from_position, S, device=model.device)
    recent = (torch.arange(S, device=model.device)[None] > q[:, None] - window) & \
             (torch.arange(S, device=model.device)[None] <= q[:, None])                  # [Sq, S]
    rows = []
    for layer, w in sorted(probe.weights.items()):
        w = w[:, :, from_position:]                                                     # [B, Hkv, Sq, S]
        rows.append({"layer": layer, "first_tokens": w[..., :num_sinks].sum(-1).mean().item(),
                     "recent_window": (w * recent).sum(-1).mean().item(),
                     "uniform_first_tokens": (num_sinks / (q.float() + 1)).mean().item()})
    return rows


# ---------------------------------------------------------------------------------------------
# Compression quality

METHODS = ("full", "int8", "sliding window", "attention sinks", "H2O", "document as written")
_HOLD_ALL = ("full", "int8", "document as written")  # methods that take no budget


def _check_windows(model, ids, window_len: int, num_windows: int, prefix: int, need: int) -> None:
    """Arguments that cut ``ids`` into windows of ``window_len`` tokens, scored from ``prefix`` on."""
    formulas._positive_int(window_len=window_len, num_windows=num_windows, prefix=prefix)
    if prefix >= window_len:
        raise ValueError(f"prefix must be < window_len ({window_len}), got {prefix}")
    if window_len > model.config.max_position_embeddings:
        raise ValueError(f"window_len {window_len} exceeds the model's context "
                         f"{model.config.max_position_embeddings}")
    if ids.dim() != 1 or len(ids) < need:
        raise ValueError(f"need a 1-D tensor of at least {need} token ids, got shape {tuple(ids.shape)}")


def held_out_ids(tokenizer, name: str = "validation") -> torch.Tensor:
    """A corpus slice as one 1-D tensor of token ids (the tokenizer's length warning is for model
    inputs, not for a text we cut into windows ourselves, so it is lifted while encoding)."""
    limit = tokenizer.model_max_length
    tokenizer.model_max_length = int(1e30)
    try:
        return encode(tokenizer, read_slice(name))
    finally:
        tokenizer.model_max_length = limit


def make_cache(model, method: str, batch_size: int, seq_len: int, budget: int | None = None,
               num_sinks: int = 4):
    """A cache of one method for ``batch_size`` rows of ``seq_len`` tokens, holding ``budget`` tokens.

    H2O splits its budget evenly between heavy hitters and recent tokens (the paper's 50/50).
    """
    if method == "full":
        return KVCache.for_model(model, batch_size, seq_len)
    if method == "int8":
        return Int8KVCache.for_model(model, batch_size, seq_len)
    if budget is None:
        raise ValueError(f"{method!r} needs a budget (tokens kept)")
    if method == "sliding window":
        return SlidingWindowKVCache.for_model(model, batch_size, budget)
    if method == "attention sinks":
        return SinkKVCache.for_model(model, batch_size, budget - num_sinks, num_sinks)
    if method == "H2O":
        return HeavyHitterKVCache.for_model(model, batch_size, budget // 2, budget - budget // 2)
    if method == "document as written":
        return DocumentSlidingWindowCache(budget)
    raise ValueError(f"unknown method {method!r}; methods: {METHODS}")


def expected_kv_bytes(config, method: str, seq_len: int, budget: int | None = None, dtype_bytes: float = 4) -> float:
    """The bytes per sequence a method's cache should hold, from the formulas (what ``nbytes`` is checked against).

    Evicting caches allocate ``budget`` token slots whatever the sequence's length (a fixed ring;
    H2O adds one fp32 score per slot, head and layer); full and int8 hold ``seq_len`` tokens; the
    document's class holds nothing.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; methods: {METHODS}")
    if method not in _HOLD_ALL:
        if budget is None:
            raise ValueError(f"{method!r} needs a budget (tokens kept)")
        formulas._positive_int(budget=budget)
    L, H, D = config.num_hidden_layers, config.num_key_value_heads, config.head_dim
    if method == "full":
        return formulas.kv_cache_bytes(L, H, D, seq_len, dtype_bytes)
    if method == "int8":
        return quantized_kv_cache_bytes(L, H, D, seq_len, bits=8)   # Int8KVCache's fp16 scales
    if method == "document as written":
        return 0
    # the slots allocated, not min(seq_len, budget) tokens held: below the budget the ring is part empty
    kv = formulas.kv_cache_bytes(L, H, D, budget, dtype_bytes)
    return kv + (L * H * budget * 4 if method == "H2O" else 0)


@torch.inference_mode()
def parallel_perplexity(model, ids: torch.Tensor, window_len: int = 512, num_windows: int = 2,
                        prefix: int = 32) -> float:
    """The slow twin of the full cache's decoded perplexity: one causal forward pass per window,
    scoring the same tokens (prefix..window_len-1 of the first ``num_windows`` windows of ids)."""
    _check_windows(model, ids, window_len, num_windows, prefix, num_windows * window_len)
    text = ids[: num_windows * window_len].view(num_windows, window_len).to(model.device)
    logp = F.log_softmax(model(text[:, :-1]).float(), -1)[:, prefix - 1:]
    return math.exp(-logp.gather(2, text[:, prefix:, None]).mean().item())


@torch.inference_mode()
def teacher_forced_decode(model, ids: torch.Tensor, cache, prefix: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefill ids[:, :prefix] into ``cache``, then feed the true tokens one at a time.

    Returns (nll, pred), each [B, T - prefix]: the negative log-likelihood of token t and the argmax
    prediction for it, for t = prefix..T-1, every one made through the cache.
    """
    B, T = ids.shape
    if not 1 <= prefix < T:
        raise ValueError(f"prefix must lie in [1, {T}), got {prefix}")
    nll, pred = [], []
    logits = model(ids[:, :prefix], cache=cache, last_only=True)[:, -1]
    for t in range(prefix, T):
        logp = F.log_softmax(logits.float(), -1)
        nll.append(-logp.gather(1, ids[:, t:t + 1])[:, 0])
        pred.append(logp.argmax(-1))
        if t + 1 < T:
            logits = model(ids[:, t:t + 1], cache=cache)[:, -1]
    return torch.stack(nll, 1), torch.stack(pred, 1)


def compression_quality(model, ids: torch.Tensor, budgets=(64, 128, 256), window_len: int = 512,
                        num_windows: int = 2, num_prompts: int = 2, prefix: int = 32,
                        methods=METHODS, num_sinks: int = 4) -> list[dict]:
    """Perplexity and greedy agreement of each method and budget, decoding through the cache.

    The first ``num_windows`` windows of ``window_len`` tokens of ``ids`` (1-D held-out text) are
    scored; the next ``num_prompts`` windows give prompts (their first ``prefix`` tokens) that the
    full cache continues greedily to ``window_len`` tokens. Every method then decodes all rows in
    one batch, prefilling ``prefix`` tokens and feeding the rest one by one.

    Returns one row per (method, budget): perplexity over the decoded text tokens, agreement (the
    fraction of decoded positions where its argmax equals the full cache's greedy token),
    first_divergence (mean tokens generated before the first disagreement, i.e. how long its own
    greedy output would match), and kv_bytes_per_seq (the cache's ``nbytes`` / batch size).
    """
    formulas._positive_int(num_prompts=num_prompts)
    _check_windows(model, ids, window_len, num_windows, prefix, (num_windows + num_prompts) * window_len)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; methods: {METHODS}")
    if any(m not in _HOLD_ALL for m in methods):
        for b in budgets:
            formulas._positive_int(budget=b)
            if b > window_len:   # a ring larger than the text: evicts nothing, allocates more than full
                raise ValueError(f"budget {b} exceeds window_len {window_len}: the cache would evict nothing")
    need = (num_windows + num_prompts) * window_len
    rows = ids[:need].view(-1, window_len).to(model.device)
    text = rows[:num_windows]
    greedy = model.generate(rows[num_windows:, :prefix], max_new_tokens=window_len - prefix, stop_token_ids=())
    batch = torch.cat([text, greedy])
    runs = [(m, None) for m in methods if m in _HOLD_ALL]
    runs += [(m, b) for m in methods if m not in _HOLD_ALL for b in budgets]
    results = []
    for method, budget in runs:
        size = window_len if budget is None else budget  # no budget: the whole window (a 0 is refused above)
        cache = make_cache(model, method, len(batch), window_len, size, num_sinks)
        nll, pred = teacher_forced_decode(model, batch, cache, prefix)
        agree = pred[num_windows:] == greedy[:, prefix:]
        first = [int(a.logical_not().nonzero()[0]) if not a.all() else a.numel() for a in agree]
        held = 0 if method == "document as written" else min(size, window_len)
        results.append({"method": method, "budget": budget, "tokens_held": held,
                        "perplexity": math.exp(nll[:num_windows].mean().item()),
                        "agreement": agree.float().mean().item(), "first_divergence": sum(first) / len(first),
                        "kv_bytes_per_seq": cache.nbytes / len(batch)})
    return results


def plot_quality(ax_ppl, ax_agree, rows: list[dict]) -> None:
    """Perplexity and greedy agreement against KV bytes per sequence, one line per method.

    Caches that hold nothing (the document's class) have no place on a log axis; they are left out.
    """
    for method in dict.fromkeys(r["method"] for r in rows):
        pts = sorted((r for r in rows if r["method"] == method and r["kv_bytes_per_seq"] > 0),
                     key=lambda r: r["kv_bytes_per_seq"])
        if not pts:
            continue
        style = "o-" if len(pts) > 1 else "s"
        x = [r["kv_bytes_per_seq"] / 1e6 for r in pts]
        ax_ppl.plot(x, [r["perplexity"] for r in pts], style, label=method)
        ax_agree.plot(x, [r["agreement"] for r in pts], style, label=method)
    for ax, ylabel in ((ax_ppl, "perplexity (held-out text)"), (ax_agree, "greedy agreement with full cache")):
        ax.set(xscale="log", xlabel="KV cache per sequence (MB)", ylabel=ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
