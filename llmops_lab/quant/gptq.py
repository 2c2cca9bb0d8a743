"""GPTQ: one-shot weight quantization with second-order error compensation (Frantar et al. 2022).

For a linear layer with weight W [O, I] and calibration inputs X [N, I], GPTQ quantizes W one
input column at a time and, after each column, spreads that column's rounding error over the
columns not yet quantized so the layer output X W^T changes as little as possible. The Hessian of
the output error is H = 2 X^T X / N [I, I]. Following the paper's implementation:

- dampening: H += damp_percent * mean(diag H) * Id, so the Cholesky factorisation exists;
- dead columns (H_ii = 0, an input channel never active): H_ii = 1 and the weights set to 0;
- the inverse Hessian's upper Cholesky factor U (H^-1 = U^T U) gives every update row at once;
- lazy batch updates: errors propagate inside a block of ``block_size`` columns at once, and to
  the rest of the matrix once per block (one matmul instead of I rank-1 updates);
- groups: a group's scale/zero is computed (``group_params``: the zero-point grid of
  ``quantize_rtn``, or the symmetric grid below) from the
  current, error-updated weights when the first column of the group comes up, including the
  errors a lazy block still owes the columns past it (the paper's code reads those columns stale,
  which makes its result depend on ``block_size``; here block_size=1 and 128 agree);
- act-order (``desc_act``): columns are processed by descending diag(H). With groups the paper's
  code (AutoGPTQ) takes group params on the fly in permuted order, which makes groups
  non-contiguous in the original order (it needs a ``g_idx`` per column). The shared
  ``QuantizedWeight`` has contiguous groups, so act-order here uses AutoGPTQ's *static groups*:
  group params are computed from the original column groups before permuting, and the codes are
  un-permuted at the end.
- symmetric (``sym=True``): AutoGPTQ's grid, which transformers' GPTQConfig runs: all 2^b codes,
  ``scale = 2 absmax / (2^b - 1)``, codes -2^(b-1)..2^(b-1)-1 (AutoGPTQ stores them as 0..2^b-1
  with the zero point 2^(b-1): the same grid, held in the same b bits; ``sym_grid_scale``). Not the
  symmetric round-to-nearest grid of ``quantize_rtn`` (2^b - 1 codes, a ternary grid at 2 bits).

``gptq_quantize_model`` runs the sequential scheme: the calibration batch goes through the decoder
layer by layer; inside a layer the linears are quantized in execution order ([q, k, v], [o],
[gate, up], [down], "true sequential"), each set seeing the inputs produced by the already
quantized ones, and the quantized layer produces the next layer's inputs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ..checks import check_float_model, is_int
from ..model import build_mask
from .quant_linear import _skipped
from .rtn import _check_finite_scale, quantize_rtn, resolve_group_size
from .weights import QuantizedWeight, check_bool, round_scales_up

# Linears of a Llama decoder layer in execution order; each inner list shares one input.
LINEAR_SETS = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
               ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))
LINEAR_NAMES = tuple(n for s in LINEAR_SETS for n in s)


@dataclass(frozen=True)
class GPTQConfig:
    """GPTQ settings, named as in transformers' ``GPTQConfig``; ``group_size=-1`` is per channel.

    Where the defaults and meanings differ from the peers:

    - ``damp_percent`` defaults to 0.01, the paper's and AutoGPTQ's value; transformers'
      ``GPTQConfig`` defaults to 0.1. Pass ``damp_percent=0.1`` to match transformers.
    - ``desc_act=True`` behaves like AutoGPTQ's ``desc_act=True`` with ``static_groups=True``: group
      scales come from the original column groups before the act-order permutation, so the groups
      stay contiguous and no per-column ``g_idx`` is needed (see the module docstring).
    - ``sym=True`` uses AutoGPTQ's grid of all 2^b codes, scale 2 absmax / (2^b - 1), for every
      group (``sym_grid_scale``). AutoGPTQ, for a group with no negative weight, takes absmax / (2^b - 1)
      with the zero point mid-grid, so its weights past about absmax / 2 clamp; we do not.
    """
    bits: int = 4
    group_size: int = 128
    desc_act: bool = False
    damp_percent: float = 0.01
    sym: bool = True
    block_size: int = 128

    def __post_init__(self):
        if not is_int(self.bits) or not 2 <= self.bits <= 8:
            raise ValueError(f"bits must be an int in 2..8, got {self.bits!r}")
        if not is_int(self.group_size) or not (self.group_size == -1 or self.group_size > 0):
            raise ValueError(f"group_size must be a positive int or -1 (per channel), got {self.group_size!r}")
        damp = self.damp_percent
        if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not 0 < damp < 1:
            raise ValueError(f"damp_percent must be a number in (0, 1), got {damp!r}")
        if not is_int(self.block_size) or self.block_size <= 0:
            raise ValueError(f"block_size must be a positive int, got {self.block_size!r}")
        check_bool("desc_act", self.desc_act)
        check_bool("sym", self.sym)
        for name in ("bits", "group_size", "block_size"):     # numpy ints stored as Python's
            object.__setattr__(self, name, int(getattr(self, name)))


class HessianAccumulator:
    """H = 2 X^T X / N over every row seen so far, updated one batch at a time (float64)."""

    def __init__(self, in_features: int, device=None):
        self.H = torch.zeros(in_features, in_features, dtype=torch.float64, device=device)
        self.n = 0

    def add_batch(self, x: torch.Tensor) -> "HessianAccumulator":
        x = x.detach().reshape(-1, self.H.shape[0]).to(torch.float64)   # [N, I]
        n = x.shape[0]
        if n == 0:
            return self
        # Running mean: rescale the old sum instead of storing all of X.
        self.H *= self.n / (self.n + n)
        self.n += n
        x = x * (2.0 / self.n) ** 0.5
        self.H += x.T @ x
        return self


def hessian_from_inputs(x: torch.Tensor) -> torch.Tensor:
    """2 X^T X / N for inputs x [..., I] (float64)."""
    return HessianAccumulator(x.shape[-1], x.device).add_batch(x).H


def sym_grid_scale(absmax: torch.Tensor, bits: int) -> torch.Tensor:
    """Step of GPTQ's symmetric grid (AutoGPTQ's): 2 absmax / (2^b - 1), codes -2^(b-1)..2^(b-1)-1.

    The grid spans [-2^(b-1) scale, (2^(b-1) - 1) scale] = [-absmax - scale/2, absmax - scale/2],
    so every |w| <= absmax is within scale/2 = absmax / (2^b - 1) of a code (clamping +absmax costs
    exactly that): one code more than round-to-nearest's symmetric grid, step absmax / (2^(b-1) - 1),
    and a bound of absmax / (2^b - 1) instead of its absmax / (2^b - 2).
    """
    return 2 * absmax / (2 ** bits - 1)


def group_params(w: torch.Tensor, bits: int, sym: bool, scale_dtype: torch.dtype = torch.float32):
    """Scale and zero [O] of one group, the columns of w [O, g]: the symmetric grid of
    ``sym_grid_scale`` (zero 0; an all-zero group gets scale 1), or round-to-nearest's zero-point
    grid. The scale is rounded up to ``scale_dtype`` (``weights.round_scales_up``)."""
    if not sym:
        q = quantize_rtn(w, bits, -1, sym, scale_dtype=scale_dtype)
        return q.scales[:, 0].to(w.dtype), q.zeros[:, 0].to(w.dtype)
    scale = sym_grid_scale(w.float().abs().amax(dim=1), bits)
    _check_finite_scale(scale, w)
    scale = round_scales_up(scale, scale_dtype)
    return scale.to(w.dtype), torch.zeros_like(scale, dtype=w.dtype)


def code_range(bits: int, sym: bool) -> tuple[int, int]:
    """Codes GPTQ uses: all 2^b either way, centred on 0 when symmetric."""
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if sym else (0, 2 ** bits - 1)


def _to_grid(w, scale, zero, qmin: int, qmax: int):
    """Integer codes (as floats) of column w [O] on the grid scale * (code - zero)."""
    return torch.clamp(torch.round(w / scale) + zero, qmin, qmax)


def _inverse_hessian_factor(H: torch.Tensor, damp_percent: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp)^-1; dampening grows x10 if H is still not PD."""
    damp = damp_percent * torch.diag(H).mean()
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    for _ in range(5):
        L, info = torch.linalg.cholesky_ex(H + damp * eye)
        if info == 0:
            return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
        damp = damp * 10
    raise ValueError("the Hessian is not positive definite even after dampening x1e4; "
                     "check the calibration inputs for NaN or inf")


def gptq_quantize_weight(w: torch.Tensor, H: torch.Tensor, config: GPTQConfig = GPTQConfig(),
                         scale_dtype: torch.dtype = torch.float32) -> QuantizedWeight:
    """Quantize w [O, I] given the Hessian H [I, I] of its inputs; w and H are not modified.

    Args:
        w: the nn.Linear weight [out, in]. H: ``hessian_from_inputs`` of that linear's inputs.
        config: bits, group_size (-1 per channel), desc_act, damp_percent, sym, block_size.
        scale_dtype: the scales are rounded up to it before the codes are chosen (the dtype
            ``QuantLinear`` will store them in).
    Returns the QuantizedWeight in the original column order (codes, per-group scales and zeros).
    """
    O, I = w.shape
    g = resolve_group_size(I, config.group_size)
    if H.shape != (I, I):
        raise ValueError(f"Hessian must be [{I}, {I}], got {tuple(H.shape)}")
    if not torch.isfinite(w).all():
        raise ValueError("the weight contains NaN or inf; refusing to quantize")
    if not torch.isfinite(H).all():
        raise ValueError("the Hessian of the calibration inputs (activations) contains NaN or inf; "
                         "refusing to quantize")
    bits, sym = config.bits, config.sym
    qmin, qmax = code_range(bits, sym)
    W = w.detach().to(torch.float64).clone()
    H = H.detach().to(torch.float64).clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0

    n_groups = I // g
    scales = torch.empty(O, n_groups, dtype=torch.float64, device=W.device)
    zeros = torch.empty_like(scales)
    perm = None
    if config.desc_act:
        # Static groups: params from the original contiguous groups, before any error update.
        for k in range(n_groups):
            scales[:, k], zeros[:, k] = group_params(W[:, k * g:(k + 1) * g], bits, sym, scale_dtype)
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
    # Factorise in float64; the column loop runs in float32 as the reference does.
    Hinv = _inverse_hessian_factor(H, config.damp_percent).float()       # [I, I] upper
    W, scales, zeros = W.float(), scales.float(), zeros.float()
    codes = torch.zeros_like(W)

    for i1 in range(0, I, config.block_size):
        i2 = min(i1 + config.block_size, I)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]                # [O, B], [B, B]
        Err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            col = i1 + i
            if perm is not None:
                k = int(perm[col]) // g
            else:
                k = col // g
                if col % g == 0:  # group start: params from the current, error-updated weights
                    current = W1[:, i:i + g]
                    beyond = g - current.shape[1]       # group columns past this block, still
                    if beyond > 0:                      # owed this block's errors so far
                        ahead = W[:, i2:i2 + beyond] - Err1[:, :i] @ Hinv[i1:i1 + i, i2:i2 + beyond]
                        current = torch.cat([current, ahead], dim=1)
                    scales[:, k], zeros[:, k] = group_params(current, bits, sym, scale_dtype)
            q = _to_grid(W1[:, i], scales[:, k], zeros[:, k], qmin, qmax)
            codes[:, col] = q
            err = (W1[:, i] - scales[:, k] * (q - zeros[:, k])) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]                               # lazy batch update

    if perm is not None:
        codes = codes[:, torch.argsort(perm)]
    code_dtype = torch.int16 if (not sym and bits == 8) else torch.int8
    return QuantizedWeight(codes=codes.to(code_dtype), scales=scales.to(scale_dtype), zeros=zeros.to(scale_dtype),
                           bits=bits, group_size=g, sym=sym)


# ---- whole model, layer by layer -------------------------------------------------------------

def check_calibration(model, calibration_ids) -> torch.Tensor:
    """Raise ValueError on a calibration set that cannot calibrate ``model``; return it on device."""
    if not isinstance(calibration_ids, torch.Tensor) or calibration_ids.dim() != 2:
        raise ValueError("calibration_ids must be a 2-D tensor [n_seq, seq_len]")
    if calibration_ids.is_floating_point() or calibration_ids.is_complex() or calibration_ids.dtype == torch.bool:
        raise ValueError(f"calibration_ids must be integer token ids, got dtype {calibration_ids.dtype}")
    n, S = calibration_ids.shape
    if n == 0:
        raise ValueError("the calibration set is empty (0 sequences)")
    if S < 2:
        raise ValueError(f"calibration sequences must have at least 2 tokens, got {S}")
    model.check_ids(calibration_ids)
    if S > model.config.max_position_embeddings:
        raise ValueError(f"calibration sequences of {S} tokens exceed the model's context "
                         f"of {model.config.max_position_embeddings}")
    return calibration_ids.to(model.device)


def check_skip(skip) -> tuple:
    """``skip`` as ``quantize`` takes it: a tuple or list of names or name parts, never a bare string."""
    if isinstance(skip, str) or not all(isinstance(s, str) for s in skip):
        raise TypeError(f"skip must be a tuple or list of module names or name parts, got {skip!r}")
    return tuple(skip)


def quantized_names(model, skip=()) -> list[str]:
    """Names of the decoder linears to quantize, "model.layers.{i}.{name}", in execution order,
    leaving out those ``skip`` names (as ``quantize`` reads it: a name part or a dotted tail)."""
    return [f"model.layers.{i}.{n}" for i in range(len(model.model.layers)) for n in LINEAR_NAMES
            if not _skipped(f"model.layers.{i}.{n}", skip)]


def check_linears(model, group_size: int, skip=()) -> None:
    """Every decoder linear to quantize (not skipped) must be finite and split into whole groups
    (checked before anything changes); the error names the layer."""
    for key in quantized_names(model, skip):
        lin = model.get_submodule(key)
        try:
            resolve_group_size(lin.in_features, group_size)
        except ValueError as e:
            raise ValueError(f"cannot quantize {key}: {e}") from None
        if not torch.isfinite(lin.weight).all():
            raise ValueError(f"{key} has NaN or inf weights; refusing to quantize")


class LayerRunner:
    """Runs calibration hidden states x [n, S, D] through one decoder layer at a time."""

    def __init__(self, model, ids: torch.Tensor, batch_size: int = 8):
        self.model, self.batch_size = model, batch_size
        with torch.no_grad():
            self.x = model.model.embed_tokens(ids)                      # [n, S, D]
        positions = torch.arange(ids.shape[1], device=ids.device).expand(1, -1)
        self.cos, self.sin = model.rope(positions, self.x.dtype)       # [1, S, D/2*2]
        # the attention the model itself computes: causal, and within its sliding window if it has
        # one (a plain causal mask fitted Mistral's layers to activations the model never makes)
        self.mask = build_mask(0, ids.shape[1], None, model.config.sliding_window, ids.device)

    @torch.no_grad()
    def run(self, layer, x=None) -> torch.Tensor:
        x = self.x if x is None else x
        causal = self.mask is None and x.shape[1] > 1
        outs = [layer(x[b:b + self.batch_size], self.cos, self.sin, None, 0, self.mask, causal,
                      self.model.backend) for b in range(0, x.shape[0], self.batch_size)]
        return torch.cat(outs)

    @torch.no_grad()
    def capture(self, layer, names, fn) -> None:
        """Run the layer, calling fn(name, input [N, in]) for every named linear's input."""
        def hook(mod, inp, out, n):
            fn(n, inp[0].reshape(-1, inp[0].shape[-1]))              # returns None: output kept

        hooks = [layer.get_submodule(n).register_forward_hook(
            lambda mod, inp, out, n=n: hook(mod, inp, out, n)) for n in names]
        try:
            self.run(layer)
        finally:
            for h in hooks:
                h.remove()


def _progress(iterable, enabled: bool, desc: str):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm
    return tqdm(iterable, desc=desc)


@torch.no_grad()
def gptq_quantize_model(model, calibration_ids: torch.Tensor, config: GPTQConfig = GPTQConfig(),
                        progress: bool = True, apply: bool = True, check=None, skip=(),
                        scale_dtype: torch.dtype = torch.float32) -> dict[str, QuantizedWeight]:
    """GPTQ on every decoder linear of ``model`` but the skipped ones, sequentially, layer by layer.

    Args:
        calibration_ids: [n_seq, seq_len] token ids (n_seq >= 1, seq_len >= 2).
        apply: write the dequantized weights W_hat into the nn.Linear weights in place (so
            perplexity can be measured with the plain runtime). With apply=False the original
            weights are put back at the end (they are written during the run, since later
            linears must see the quantized ones' outputs). Embeddings and lm_head stay as they are.
        check: called as check(name, QuantizedWeight) on each result as it is made; an error it
            raises restores the model like any other (``quantize`` checks the scales fit there).
        skip: linears left float, as ``quantize`` reads it (a name part such as "mlp" or a dotted
            tail such as "layers.0.mlp.down_proj"): not quantized, not checked, and float while
            the later linears are calibrated. scale_dtype: see ``gptq_quantize_weight``.
    Returns {"model.layers.{i}.{name}": QuantizedWeight}. On a bad input nothing is changed.
    """
    # a quantized layer's .weight is a dequantized copy: the run would rewrite a temporary and
    # quantize the already quantized codes again
    check_float_model(model, "GPTQ")
    skip = check_skip(skip)
    ids = check_calibration(model, calibration_ids)
    check_linears(model, config.group_size, skip)
    todo = set(quantized_names(model, skip))
    runner = LayerRunner(model, ids)
    result: dict[str, QuantizedWeight] = {}
    originals: dict[str, torch.Tensor] = {}
    try:
        for i in _progress(range(len(model.model.layers)), progress, "GPTQ layers"):
            layer = model.model.layers[i]
            for names in LINEAR_SETS:
                names = [n for n in names if f"model.layers.{i}.{n}" in todo]
                if not names:
                    continue
                acc = {n: HessianAccumulator(layer.get_submodule(n).in_features, ids.device) for n in names}
                runner.capture(layer, names, lambda n, x: acc[n].add_batch(x))
                for n in names:
                    lin: nn.Linear = layer.get_submodule(n)
                    key = f"model.layers.{i}.{n}"
                    try:
                        q = gptq_quantize_weight(lin.weight, acc[n].H, config, scale_dtype)
                    except ValueError as e:
                        raise ValueError(f"cannot quantize {key}: {e}") from None
                    if check is not None:
                        check(key, q)
                    originals[key] = lin.weight.detach().to("cpu", copy=True)
                    result[key] = q
                    lin.weight.copy_(q.dequantize(torch.float32).to(lin.weight.dtype))
            runner.x = runner.run(layer)                   # the quantized layer feeds the next
    except BaseException:
        _restore(model, originals)
        raise
    if not apply:
        _restore(model, originals)
    return result


def _restore(model, originals: dict[str, torch.Tensor]) -> None:
    for key, w in originals.items():
        model.get_submodule(key).weight.copy_(w.to(model.device))
