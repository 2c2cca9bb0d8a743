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
- groups: a group's scale/zero is computed by round-to-nearest (``quantize_rtn``) from the
  current, error-updated weights when the first column of the group comes up, including the
  errors a lazy block still owes the columns past it (the paper's code reads those columns stale,
  which makes its result depend on ``block_size``; here block_size=1 and 128 agree);
- act-order (``desc_act``): columns are processed by descending diag(H). With groups the paper's
  code (AutoGPTQ) takes group params on the fly in permuted order, which makes groups
  non-contiguous in the original order (it needs a ``g_idx`` per column). The shared
  ``QuantizedWeight`` has contiguous groups, so act-order here uses AutoGPTQ's *static groups*:
  group params are computed from the original column groups before permuting, and the codes are
  un-permuted at the end.

``gptq_quantize_model`` runs the sequential scheme: the calibration batch goes through the decoder
layer by layer; inside a layer the linears are quantized in execution order ([q, k, v], [o],
[gate, up], [down], "true sequential"), each set seeing the inputs produced by the already
quantized ones, and the quantized layer produces the next layer's inputs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ..checks import check_float_model
from ..model import build_mask
from .rtn import quantize_rtn, resolve_group_size
from .weights import QuantizedWeight, check_bool, is_int

# Linears of a Llama decoder layer in execution order; each inner list shares one input.
LINEAR_SETS = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
               ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))
LINEAR_NAMES = tuple(n for s in LINEAR_SETS for n in s)


@dataclass(frozen=True)
class GPTQConfig:
    """GPTQ settings, named as in transformers' ``GPTQConfig``; ``group_size=-1`` is per channel."""
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


def _group_params(w: torch.Tensor, bits: int, sym: bool):
    """Scale and zero [O] of round-to-nearest over the columns of w [O, g]."""
    q = quantize_rtn(w, bits, -1, sym)
    return q.scales[:, 0].to(w.dtype), q.zeros[:, 0].to(w.dtype)


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


def gptq_quantize_weight(w: torch.Tensor, H: torch.Tensor, config: GPTQConfig = GPTQConfig()) -> QuantizedWeight:
    """Quantize w [O, I] given the Hessian H [I, I] of its inputs; w and H are not modified.

    Args:
        w: the nn.Linear weight [out, in]. H: ``hessian_from_inputs`` of that linear's inputs.
        config: bits, group_size (-1 per channel), desc_act, damp_percent, sym, block_size.
    Returns the QuantizedWeight in the original column order (codes, per-group scales and zeros).
    """
    O, I = w.shape
    g = resolve_group_size(I, config.group_size)
    if H.shape != (I, I):
        raise ValueError(f"Hessian must be [{I}, {I}], got {tuple(H.shape)}")
    if not torch.isfinite(w).all() or not torch.isfinite(H).all():
        raise ValueError("weight or Hessian contains NaN or inf; refusing to quantize")
    bits, sym = config.bits, config.sym
    qmin, qmax = (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1) if sym else (0, 2 ** bits - 1)
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
            scales[:, k], zeros[:, k] = _group_params(W[:, k * g:(k + 1) * g], bits, sym)
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
                    scales[:, k], zeros[:, k] = _group_params(current, bits, sym)
            q = _to_grid(W1[:, i], scales[:, k], zeros[:, k], qmin, qmax)
            codes[:, col] = q
            err = (W1[:, i] - scales[:, k] * (q - zeros[:, k])) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]                               # lazy batch update

    if perm is not None:
        codes = codes[:, torch.argsort(perm)]
    code_dtype = torch.int16 if (not sym and bits == 8) else torch.int8
    return QuantizedWeight(codes=codes.to(code_dtype), scales=scales, zeros=zeros,
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


def check_linears(model, group_size: int) -> None:
    """Every decoder linear must be finite and split into whole groups (before anything changes)."""
    for i, layer in enumerate(model.model.layers):
        for name in LINEAR_NAMES:
            lin = layer.get_submodule(name)
            resolve_group_size(lin.in_features, group_size)
            if not torch.isfinite(lin.weight).all():
                raise ValueError(f"model.layers.{i}.{name} has NaN or inf weights; refusing to quantize")


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
                        progress: bool = True, apply: bool = True, check=None) -> dict[str, QuantizedWeight]:
    """GPTQ on every decoder linear of ``model``, sequentially, layer by layer.

    Args:
        calibration_ids: [n_seq, seq_len] token ids (n_seq >= 1, seq_len >= 2).
        apply: write the dequantized weights W_hat into the nn.Linear weights in place (so
            perplexity can be measured with the plain runtime). With apply=False the original
            weights are put back at the end (they are written during the run, since later
            linears must see the quantized ones' outputs). Embeddings and lm_head stay as they are.
        check: called as check(name, QuantizedWeight) on each result as it is made; an error it
            raises restores the model like any other (``quantize`` checks the scales fit there).
    Returns {"model.layers.{i}.{name}": QuantizedWeight}. On a bad input nothing is changed.
    """
    # a quantized layer's .weight is a dequantized copy: the run would rewrite a temporary and
    # quantize the already quantized codes again
    check_float_model(model, "GPTQ")
    ids = check_calibration(model, calibration_ids)
    check_linears(model, config.group_size)
    runner = LayerRunner(model, ids)
    result: dict[str, QuantizedWeight] = {}
    originals: dict[str, torch.Tensor] = {}
    try:
        for i in _progress(range(len(model.model.layers)), progress, "GPTQ layers"):
            layer = model.model.layers[i]
            for names in LINEAR_SETS:
                acc = {n: HessianAccumulator(layer.get_submodule(n).in_features, ids.device) for n in names}
                runner.capture(layer, names, lambda n, x: acc[n].add_batch(x))
                for n in names:
                    lin: nn.Linear = layer.get_submodule(n)
                    q = gptq_quantize_weight(lin.weight, acc[n].H, config)
                    key = f"model.layers.{i}.{n}"
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
