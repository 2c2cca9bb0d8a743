"""Round-to-nearest (RTN) uniform quantization, and a check of its error bound on every weight.

Uniform affine quantization (Jacob et al. 2018), the baseline GPTQ (Frantar et al. 2022) and AWQ
(Lin et al. 2023) are measured against. For each group of ``group_size`` input columns of a row:

- asymmetric (zero point, ``sym=False``): the range is widened to contain 0 (as GPTQ's quantizer
  does, so a zero weight stays exactly zero and the zero point is a valid code; AutoAWQ instead keeps
  the group's own range and clamps the zero point to [0, 2^b - 1]),
  ``w_min = min(min w, 0)``, ``w_max = max(max w, 0)``, ``scale = (w_max - w_min) / (2^b - 1)``,
  ``zero = clamp(round(-w_min / scale), 0, 2^b - 1)``,
  ``code = clamp(round(w / scale) + zero, 0, 2^b - 1)``;
- symmetric (absmax, ``sym=True``): ``scale = absmax / (2^(b-1) - 1)``, ``zero = 0``,
  ``code = clamp(round(w / scale), -(2^(b-1) - 1), 2^(b-1) - 1)``.

Per tensor (``per_tensor=True``) is one group for the whole tensor, stored in the shared format as
``group_size = in_features`` with the same scale (and zero) repeated on every row. A group whose
range is 0 (a constant row of zeros) gets ``scale = 1`` so nothing divides by zero; its codes are
the zero point and it dequantizes exactly.

``scale_dtype``: the scales are rounded up to what that dtype holds (``weights.round_scales_up``)
before the codes are chosen, so the codes fit the scales as ``QuantLinear`` stores them.
"""
from __future__ import annotations

import math

import torch

from .. import formulas
from ..checks import is_int
from .weights import QuantizedWeight, check_bool, round_scales_up, stored_step_factor

# Float rounding in scale * (code - zero): a few ulps of the group's magnitude, not a bound failure.
_ULPS = 8


def resolve_group_size(in_features: int, group_size: int | None) -> int:
    """``None`` or -1 -> per output channel (``in_features``); else a positive divisor of it."""
    if group_size is None or group_size == -1:
        return in_features
    if not is_int(group_size) or group_size <= 0:
        raise ValueError(f"group_size must be a positive int, None or -1 (per channel), got {group_size!r}")
    if in_features % group_size:
        raise ValueError(f"group_size {group_size} does not divide in_features {in_features}")
    return int(group_size)


def validate_weight(w: torch.Tensor, bits: int, group_size: int | None = None) -> int:
    """Raise ValueError on a weight RTN cannot quantize; return the resolved group size."""
    if not is_int(bits) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an int in 2..8, got {bits!r}")
    if not isinstance(w, torch.Tensor) or w.dim() != 2 or not w.is_floating_point():
        raise ValueError("weight must be a 2-D float tensor [out, in]")
    if w.numel() == 0:
        raise ValueError(f"weight is empty, shape {tuple(w.shape)}")
    if not all(map(math.isfinite, (float(v) for v in torch.aminmax(w.detach())))):   # min/max carry NaN, inf
        raise ValueError("weight contains NaN or inf; refusing to quantize it")
    return resolve_group_size(w.shape[1], group_size)


def _grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    out, cols = w.shape
    return w.reshape(out, cols // group_size, group_size)   # [O, G, g]


def _check_finite_scale(scale: torch.Tensor, w: torch.Tensor) -> None:
    """The range max - min overflows float32 for weights near +-3.4e38 (or float64 beyond it)."""
    if not torch.isfinite(scale).all():
        lo, hi = (float(v) for v in torch.aminmax(w.detach()))
        raise ValueError(f"w spans [{lo:.3g}, {hi:.3g}], a range whose float32 scales overflow "
                         f"to inf; cannot quantize it")


def quantize_rtn(w: torch.Tensor, bits: int = 4, group_size: int | None = None, sym: bool = False,
                 per_tensor: bool = False, scale_dtype: torch.dtype = torch.float32) -> QuantizedWeight:
    """Round-to-nearest quantization of ``w`` [out, in] into the shared ``QuantizedWeight`` format.

    Args:
        bits: 2..8. group_size: input columns per group; None or -1 = per output channel.
        sym: absmax (True) or zero point (False). per_tensor: one scale for the whole tensor
            (``group_size`` must then be None/-1).
        scale_dtype: the dtype the scales will be stored in (``QuantLinear``'s, fp16 there by
            default): each scale is rounded up to it before the codes are chosen, and scales and
            zeros are returned in it. ValueError if a scale overflows it or is subnormal in it and
            grows past the bound (``weights.round_scales_up``).
    Returns a QuantizedWeight with int8 codes (asymmetric 8-bit codes 0..255 in int16) and
    scales/zeros in ``scale_dtype``. ``w`` is never modified.
    """
    g = validate_weight(w, bits, group_size)
    check_bool("sym", sym)
    check_bool("per_tensor", per_tensor)
    if per_tensor and g != w.shape[1]:
        raise ValueError(f"per_tensor=True uses one group for the whole tensor; group_size must be "
                         f"None or -1, got {group_size}")
    x = _grouped(w.detach().float(), g)                              # [O, G, g]
    reduce = (lambda t, f: f(t).reshape(1, 1, 1)) if per_tensor else (lambda t, f: f(t, dim=-1, keepdim=True))
    if sym:
        qmax = 2 ** (bits - 1) - 1
        absmax = reduce(x.abs(), torch.amax)
        scale = absmax / qmax
        _check_finite_scale(scale, w)
        scale = round_scales_up(scale, scale_dtype).float()
        zero = torch.zeros_like(scale)
        codes = torch.clamp(torch.round(x / scale), -qmax, qmax)
    else:
        qmax = 2 ** bits - 1
        lo = torch.clamp(reduce(x, torch.amin), max=0.0)
        hi = torch.clamp(reduce(x, torch.amax), min=0.0)
        scale = (hi - lo) / qmax
        _check_finite_scale(scale, w)
        scale = round_scales_up(scale, scale_dtype).float()
        zero = torch.clamp(torch.round(-lo / scale), 0, qmax)
        codes = torch.clamp(torch.round(x / scale) + zero, 0, qmax)
    out, n_groups = w.shape[0], w.shape[1] // g
    code_dtype = torch.int16 if (not sym and bits == 8) else torch.int8
    return QuantizedWeight(codes=codes.reshape(w.shape).to(code_dtype),
                           scales=scale.expand(out, n_groups, 1).reshape(out, n_groups).to(scale_dtype).contiguous(),
                           zeros=zero.expand(out, n_groups, 1).reshape(out, n_groups).to(scale_dtype).contiguous(),
                           bits=bits, group_size=g, sym=sym)


def check_error_bound(w: torch.Tensor, qw: QuantizedWeight, per_tensor: bool = False) -> dict:
    """Max |w - dequantize(qw)| per group against the error bounds, checked on every weight.

    ``per_tensor`` must say whether ``qw`` came from ``quantize_rtn(..., per_tensor=True)``: the
    shared format cannot tell one tensor-wide group from per-channel groups with equal scales.

    Returns a dict:
        ``max_error``: largest |w - dequant| over the tensor (float64).
        ``document_bound_holds`` / ``document_max_ratio``: the document's bound as written,
            asymmetric ``(w_max - w_min) / (2^(b+1) - 2)`` with the group's own min and max
            (``formulas.quant_error_bound_asymmetric``), symmetric ``scale/2 = absmax / (2^b - 2)``
            (``formulas.quant_error_bound_symmetric``); ratio = max over groups of error / bound.
        ``derived_bound_holds`` / ``derived_max_ratio``: the bound that always holds for this
            quantizer: asymmetric with the range widened to contain 0 (``min(w_min, 0)``,
            ``max(w_max, 0)``), which is the range the scale is computed from; symmetric the same as
            the document's; both times ``weights.stored_step_factor`` of the scales' dtype (1 + 2^-10
            for fp16 scales, which ``quantize_rtn(scale_dtype=...)`` rounds up before choosing codes).
            Both bounds allow a few float32 ulps of the group's magnitude: measured on the embedded
            target the ratio reaches 1 + 7e-6 at 8 bits from float32 arithmetic alone. The document's
            bound is as written, exact arithmetic: fp16-stored scales can exceed it by that factor.
        ``violations``: number of weights above the document's bound (beyond the ulp allowance).
        ``bits``, ``group_size``, ``sym``, ``per_tensor``.
    Why the widened range: the zero point must be an integer code, so min-max rounding is run on
    [min(w_min,0), max(w_max,0)]; rounding the zero point shifts the grid by at most half a step
    and clamping then costs at most half a step, so error <= step/2 of the widened range. For a
    group whose weights all share one sign (rare, but a constant row or a tiny group) the widened
    range is larger than w_max - w_min and the document's bound fails.
    """
    if w.shape != qw.shape:
        raise ValueError(f"weight shape {tuple(w.shape)} != quantized shape {qw.shape}")
    validate_weight(w, qw.bits, qw.group_size)
    x = _grouped(w.detach().double(), qw.group_size)                    # [O, G, g]
    err = (x - _grouped(qw.dequantize(torch.float64), qw.group_size)).abs()
    if per_tensor:
        lo, hi = x.amin().reshape(1, 1, 1), x.amax().reshape(1, 1, 1)
    else:
        lo, hi = x.amin(dim=-1, keepdim=True), x.amax(dim=-1, keepdim=True)
    absmax = torch.maximum(lo.abs(), hi.abs())
    if qw.sym:
        per_unit = formulas.quant_error_bound_symmetric(1.0, qw.bits)    # bound is linear in absmax
        document = derived = per_unit * absmax
    else:
        per_unit = formulas.quant_error_bound_asymmetric(0.0, 1.0, qw.bits)  # linear in the range
        document = per_unit * (hi - lo)
        derived = per_unit * (hi.clamp(min=0) - lo.clamp(max=0))
    derived = derived * stored_step_factor(qw.scales.dtype)             # the scale rounded up to storage
    slack = _ULPS * torch.finfo(torch.float32).eps * absmax
    doc_ok = err <= document + slack
    der_ok = err <= derived + slack

    def ratio(bound):
        r = err.amax(dim=-1, keepdim=True) / bound.clamp(min=torch.finfo(torch.float64).tiny)
        return float(r.max())

    return {"max_error": float(err.max()),
            "document_bound_holds": bool(doc_ok.all()), "document_max_ratio": ratio(document),
            "derived_bound_holds": bool(der_ok.all()), "derived_max_ratio": ratio(derived),
            "violations": int((~doc_ok).sum()),
            "bits": qw.bits, "group_size": qw.group_size, "sym": qw.sym, "per_tensor": per_tensor}
