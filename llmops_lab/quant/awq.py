"""AWQ: activation-aware weight quantization (Lin et al. 2023), configured with AutoAWQ's keys.

Weights that meet large activations matter most. AWQ protects them without mixed precision: it
scales input channel c of a linear up by s_c before quantizing (W diag(s)) and divides the
channel's activation by s_c (x diag(s)^-1), folded into the op that produces x, so the fp function
is unchanged and the salient channels get a relatively finer grid. Per set of linears sharing one
input (as in AutoAWQ):

- q, k, v after ``input_layernorm``     -> 1/s folded into the RMSNorm weight;
- o_proj after v_proj                   -> 1/s folded into v_proj's output rows;
- gate, up after ``post_attention_layernorm`` -> 1/s folded into the RMSNorm weight;
- down_proj after up_proj               -> 1/s folded into up_proj's output rows.

The scale search: s_x = mean |x| per input channel over the calibration tokens, and for alpha in
{0, 1/20, ..., 19/20}: s = s_x^alpha normalised by sqrt(max s * min s), quantize W diag(s) by
round-to-nearest (zero point when ``zero_point``), measure the MSE of the set's concatenated
outputs against the fp outputs, keep the best alpha (alpha = 0 is plain RTN). With grouped-query
attention o_proj has more input channels than v_proj has output rows; the o_proj scale is then
tied across the query heads that share a KV head (AutoAWQ skips o_proj in that case).

Then the weight clipping search: per output row and group, shrink the max |w| by a factor in
{1, 0.95, ..., 0.55}, quantize, keep the factor with the least output error of that group on the
calibration tokens. q_proj and k_proj are not clipped (AutoAWQ's ``avoid_clipping``: the error is
amplified by the attention softmax).

Differences from AutoAWQ, on purpose: the next layer's calibration inputs come out of the
quantized layer (the sequential scheme GPTQ uses; AutoAWQ feeds fp outputs), the search error
is measured on the set's linear outputs, not on the whole attention or MLP block, and the zero-point
grid is ``quantize_rtn``'s (the range widened to contain 0; AutoAWQ keeps the group's own range and
clamps the zero point to [0, 2^b - 1]).

Skipped linears (``skip``) are not quantized: the scale search of a set measures the error of its
quantized linears only, the scale is still folded into all of them (the fp function is unchanged),
and a set whose linears are all skipped is not scaled.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ..checks import check_float_model, is_int
from .gptq import (LINEAR_NAMES, LayerRunner, _progress, check_calibration, check_linears, check_skip,
                   quantized_names)
from .rtn import quantize_rtn
from .weights import QuantizedWeight, check_bool

N_GRID = 20                 # alphas searched for the scales, and shrink steps of the clip grid
MAX_SHRINK = 0.5            # clipping keeps at least half the range
CLIP_TOKENS = 512           # calibration tokens the clipping search looks at
AVOID_CLIPPING = ("self_attn.q_proj", "self_attn.k_proj")


@dataclass(frozen=True)
class AWQConfig:
    """AWQ settings with AutoAWQ's ``quant_config`` keys; ``q_group_size=-1`` is per channel.

    ``version`` ("GEMM" or "GEMV", any case: AutoAWQ's saved configs hold "gemm") names AutoAWQ's
    kernel layout; it is checked and kept, and has no effect on the math here.
    """
    w_bit: int = 4
    q_group_size: int = 128
    zero_point: bool = True
    version: str = "GEMM"

    def __post_init__(self):
        if not is_int(self.w_bit) or not 2 <= self.w_bit <= 8:
            raise ValueError(f"w_bit must be an int in 2..8, got {self.w_bit!r}")
        if not is_int(self.q_group_size) or not (self.q_group_size == -1 or self.q_group_size > 0):
            raise ValueError(f"q_group_size must be a positive int or -1 (per channel), got {self.q_group_size!r}")
        check_bool("zero_point", self.zero_point)
        if not isinstance(self.version, str) or self.version.upper() not in ("GEMM", "GEMV"):
            raise ValueError(f"version must be 'GEMM' or 'GEMV' (any case), got {self.version!r}")
        for name in ("w_bit", "q_group_size"):                 # numpy ints stored as Python's
            object.__setattr__(self, name, int(getattr(self, name)))


def pseudo_quantize(w: torch.Tensor, config: AWQConfig) -> torch.Tensor:
    """Round-to-nearest then back to float, [O, I] -> [O, I] (float32)."""
    return quantize_rtn(w.float(), config.w_bit, config.q_group_size, sym=not config.zero_point).dequantize()


@dataclass
class ScaleSearch:
    scales: torch.Tensor        # [I] the chosen s (multiply W's columns, divide x)
    alpha: float
    errors: list[float]         # output MSE for each alpha of the grid; errors[0] is alpha = 0 (RTN)


@torch.no_grad()
def search_scales(x: torch.Tensor, weights: list[torch.Tensor], config: AWQConfig,
                  tie=None) -> ScaleSearch:
    """Best s = s_x^alpha for linears sharing the input x [N, I] (weights [O_j, I]).

    tie: optional function mapping a per-channel vector [I] to one whose entries are equal where
    the channels must share a scale (GQA's o_proj), applied to s_x before the search.
    """
    x = x.float()
    W = torch.cat([w.float() for w in weights])                         # [sum O, I]
    ref = x @ W.T
    s_x = x.abs().mean(0)
    if tie is not None:
        s_x = tie(s_x)
    errors, best = [], None
    for k in range(N_GRID):
        alpha = k / N_GRID
        s = s_x.pow(alpha).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        Wq = pseudo_quantize(W * s, config) / s
        err = (x @ Wq.T - ref).pow(2).mean().item()
        errors.append(err)
        if best is None or err < best[0]:
            best = (err, alpha, s)
    return ScaleSearch(scales=best[2], alpha=best[1], errors=errors)


@torch.no_grad()
def fold_into_norm(norm: nn.Module, linears: list[nn.Linear], s: torch.Tensor) -> None:
    """norm.weight /= s, linear.weight[:, c] *= s: RMSNorm output and linears' inputs rescaled."""
    norm.weight.div_(s.to(norm.weight.dtype))
    for lin in linears:
        lin.weight.mul_(s.to(lin.weight.dtype))


@torch.no_grad()
def fold_into_linear(prev: nn.Linear, linears: list[nn.Linear], s_prev: torch.Tensor, s: torch.Tensor) -> None:
    """prev's output rows /= s_prev (its own view of s), the next linears' columns *= s."""
    prev.weight.div_(s_prev.to(prev.weight.dtype)[:, None])
    if prev.bias is not None:
        prev.bias.div_(s_prev.to(prev.bias.dtype))
    for lin in linears:
        lin.weight.mul_(s.to(lin.weight.dtype))


def gqa_tie(n_heads: int, n_kv: int, head_dim: int):
    """(tie, to_v): average o_proj's channel statistic over the heads sharing a KV head, and map
    a tied o_proj scale [H*D] to v_proj's rows [Hkv*D]."""
    rep = n_heads // n_kv

    def tie(v):
        m = v.view(n_kv, rep, head_dim).mean(1, keepdim=True)
        return m.expand(n_kv, rep, head_dim).reshape(-1)

    def to_v(s):
        return s.view(n_kv, rep, head_dim)[:, 0].reshape(-1)
    return tie, to_v


@torch.no_grad()
def scale_layer(layer, feats: dict[str, torch.Tensor], config: AWQConfig,
                quantized=LINEAR_NAMES) -> dict[str, ScaleSearch]:
    """Search and fold the four scale sets of one decoder layer, given its linears' fp inputs
    ``feats`` [N, in] (which are divided by their s in place, so they stay the layer's inputs).
    ``quantized``: the linears (names as in ``LINEAR_NAMES``) that will be quantized; only their
    error is searched, and a set with none of them is left unscaled (missing from the result)."""
    a, m = layer.self_attn, layer.mlp
    out = {}

    def search(key, names, tie=None):
        weights = [layer.get_submodule(n).weight for n in names if n in quantized]
        if weights:
            out[key] = search_scales(feats[names[0]], weights, config, tie=tie)
        return out.get(key)

    def divide(names, s):
        for n in names:
            feats[n] = feats[n] / s

    qkv = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    if r := search("qkv", qkv):
        fold_into_norm(layer.input_layernorm, [layer.get_submodule(n) for n in qkv], r.scales)
        divide(qkv, r.scales)

    tie, to_v = gqa_tie(a.n_heads, a.n_kv, a.head_dim)
    if r := search("o", ("self_attn.o_proj",), tie=tie):
        fold_into_linear(a.v_proj, [a.o_proj], to_v(r.scales), r.scales)
        divide(("self_attn.o_proj",), r.scales)

    gu = ("mlp.gate_proj", "mlp.up_proj")
    if r := search("gate_up", gu):
        fold_into_norm(layer.post_attention_layernorm, [layer.get_submodule(n) for n in gu], r.scales)
        divide(gu, r.scales)

    if r := search("down", ("mlp.down_proj",)):
        fold_into_linear(m.up_proj, [m.down_proj], r.scales, r.scales)
        divide(("mlp.down_proj",), r.scales)
    return out


@torch.no_grad()
def search_clip(x: torch.Tensor, w: torch.Tensor, config: AWQConfig) -> torch.Tensor:
    """Per (row, group) max |w| [O, G] after the shrink that least changes that group's output."""
    O, I = w.shape
    g = I if config.q_group_size == -1 else config.q_group_size
    G = I // g
    step = max(1, x.shape[0] // CLIP_TOKENS)
    xg = x[::step][:CLIP_TOKENS].float().view(-1, G, g)                # [N, G, g]
    wg = w.float().view(O, G, g)
    ref = torch.einsum("ngk,ogk->nog", xg, wg)                         # [N, O, G]
    org_max = wg.abs().amax(-1)                                       # [O, G]
    best_err = torch.full_like(org_max, float("inf"))
    best_max = org_max.clone()
    for k in range(int(MAX_SHRINK * N_GRID)):
        max_val = org_max * (1 - k / N_GRID)
        wc = torch.maximum(torch.minimum(wg, max_val[..., None]), -max_val[..., None])
        wq = pseudo_quantize(wc.reshape(O, I), config).view(O, G, g)
        err = (torch.einsum("ngk,ogk->nog", xg, wq) - ref).pow(2).mean(0)   # [O, G]
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_max = torch.where(better, max_val, best_max)
    return best_max


@torch.no_grad()
def apply_clip(lin: nn.Linear, max_val: torch.Tensor) -> None:
    O, I = lin.weight.shape
    G = max_val.shape[1]
    w = lin.weight.view(O, G, I // G)
    m = max_val[..., None].to(w.dtype)
    w.copy_(torch.maximum(torch.minimum(w, m), -m))


@torch.no_grad()
def awq_quantize_model(model, calibration_ids: torch.Tensor, config: AWQConfig = AWQConfig(),
                       progress: bool = True, apply: bool = True, clip: bool = True,
                       check=None, skip=(), scale_dtype: torch.dtype = torch.float32) -> dict[str, QuantizedWeight]:
    """AWQ on every decoder linear of ``model`` but the skipped ones, layer by layer.

    The scales are always folded into the model (RMSNorm weights, v_proj and up_proj rows): the
    returned codes belong to the scaled weights, so they only make sense with the folded model.
    apply=True also clips and writes the dequantized weights into the nn.Linear weights (perplexity
    can then be measured with the plain runtime); apply=False leaves the folded fp weights (the
    same function as before, up to float rounding) and returns the clipped, quantized ones.
    clip=False skips the clipping search (scales only), to measure what each half contributes.
    check: called as check(name, QuantizedWeight) on each layer's results; an error it raises
    restores the model like any other (``quantize`` checks the scales fit its scale_dtype there).
    skip: linears left float, as ``quantize`` reads it: not quantized, clipped or checked, and float
    while the later layers are calibrated (see the module docstring for the scale search).
    scale_dtype: the final scales are rounded up to it before the codes are chosen.
    Returns {"model.layers.{i}.{name}": QuantizedWeight}. On a bad input nothing is changed.
    """
    # a quantized layer's .weight is a dequantized copy: the run would rewrite a temporary and
    # quantize the already quantized codes again
    check_float_model(model, "AWQ")
    skip = check_skip(skip)
    ids = check_calibration(model, calibration_ids)
    check_linears(model, config.q_group_size, skip)
    todo = set(quantized_names(model, skip))
    runner = LayerRunner(model, ids)
    result: dict[str, QuantizedWeight] = {}
    backups: dict[int, dict] = {}
    try:
        for i in _progress(range(len(model.model.layers)), progress, "AWQ layers"):
            layer = model.model.layers[i]
            backups[i] = {k: v.detach().to("cpu", copy=True) for k, v in layer.state_dict().items()}
            mine = tuple(n for n in LINEAR_NAMES if f"model.layers.{i}.{n}" in todo)
            _awq_layer(layer, i, runner, config, apply, clip, result, mine, scale_dtype)
            if check is not None:
                for n in mine:
                    check(f"model.layers.{i}.{n}", result[f"model.layers.{i}.{n}"])
    except BaseException:   # a failure half way (out of memory, interrupt) leaves the model as it was
        for i, state in backups.items():
            model.model.layers[i].load_state_dict(state)
        raise
    return result


@torch.no_grad()
def _awq_layer(layer, i: int, runner: LayerRunner, config: AWQConfig, apply: bool, clip: bool,
               result: dict[str, QuantizedWeight], quantized=LINEAR_NAMES,
               scale_dtype: torch.dtype = torch.float32) -> None:
    """Scale, clip and quantize the ``quantized`` linears of one decoder layer, then move the
    calibration past it."""
    if not quantized:                                  # every linear skipped: the layer stays fp
        runner.x = runner.run(layer)
        return
    feats: dict[str, list] = {n: [] for n in LINEAR_NAMES}
    runner.capture(layer, LINEAR_NAMES, lambda n, x: feats[n].append(x.float()))
    feats = {n: torch.cat(v) for n, v in feats.items()}
    for n in quantized:
        if not torch.isfinite(feats[n]).all():
            raise ValueError(f"model.layers.{i}.{n}: its calibration activations (the inputs it sees) "
                             f"contain NaN or inf; the weights are finite; refusing to quantize")
    scale_layer(layer, feats, config, quantized)
    folded = {}
    for n in quantized:
        lin = layer.get_submodule(n)
        folded[n] = lin.weight.detach().clone()
        if clip and n not in AVOID_CLIPPING:
            apply_clip(lin, search_clip(feats[n], lin.weight, config))
        try:
            q = quantize_rtn(lin.weight.float(), config.w_bit, config.q_group_size, sym=not config.zero_point,
                             scale_dtype=scale_dtype)
        except ValueError as e:
            raise ValueError(f"cannot quantize model.layers.{i}.{n}: {e}") from None
        result[f"model.layers.{i}.{n}"] = q
        lin.weight.copy_(q.dequantize().to(lin.weight.dtype))
    runner.x = runner.run(layer)                       # the quantized layer feeds the next
    if not apply:
        for n, w in folded.items():
            layer.get_submodule(n).weight.copy_(w)
