"""QuantizedWeight: integer codes plus the scales and zero points that map them back to floats.

The shared format every method produces (round-to-nearest, GPTQ, AWQ), so storage, the
``QuantLinear`` module and the error checks are written once. For a weight W [out, in] quantized
in groups of ``group_size`` input columns (``group_size = in`` is per output channel):

    W[o, i] ~= scales[o, g] * (codes[o, i] - zeros[o, g]),   g = i // group_size

Asymmetric (zero point) codes lie in [0, 2^b - 1]; symmetric ones in [-2^(b-1), 2^(b-1) - 1] with
zeros = 0: round-to-nearest's symmetric grid uses -(2^(b-1) - 1)..2^(b-1) - 1 (the document's absmax
scheme), GPTQ's all 2^b codes (AutoGPTQ's grid); both are stored in b bits.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

from ..checks import is_int


def check_bool(name: str, value) -> None:
    """Raise ValueError unless ``value`` is True or False (a string like "no" is truthy)."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")


def check_scale_dtype(dtype) -> None:
    """Scales and zero points are stored as floats: an integer dtype would truncate the scales."""
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"scale_dtype must be a floating-point torch.dtype such as torch.float16, got {dtype!r}")


def _hint(dtype: torch.dtype) -> str:
    return "; pass scale_dtype=torch.float32" if dtype.itemsize < 4 else ""


def round_scales_up(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Scales rounded *up* to the nearest value ``dtype`` holds, returned in ``dtype``; a zero scale
    (an all-zero group, whose codes are all 0 whatever the step) becomes 1.

    Codes are then chosen against the scale as it will be stored. Rounding up, not to nearest: a
    smaller step would shrink the grid below the range it must span, and the end weights would clamp
    by more than half a step. A normal scale grows by less than one ulp, a factor below
    ``1 + finfo(dtype).eps`` (``stored_step_factor``; fp16: 2^-10), so the half-step bound loosens by
    that factor at most. Raises ValueError when a scale overflows ``dtype``, or when it lies in
    ``dtype``'s subnormal range (fp16: below 6.1e-5) and grows by more than that factor there: the
    subnormal spacing is fixed (fp16: 2^-24 = 6e-8), so a scale of 1e-7 would become 1.2e-7.
    """
    check_scale_dtype(dtype)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    c = scale.to(dtype)
    c = torch.where(c.to(scale.dtype) < scale, torch.nextafter(c, torch.full_like(c, math.inf)), c)
    if not torch.isfinite(c).all():
        raise ValueError(f"scales up to {float(scale.abs().max()):.3g} overflow {dtype} "
                         f"(largest {torch.finfo(dtype).max:.3g}){_hint(dtype)}")
    grown = c.double() > scale.double() * stored_step_factor(dtype)
    if grown.any():
        by = float((c.double() / scale.double())[grown].max()) - 1
        raise ValueError(f"scales as small as {float(scale[grown].min()):.3g} underflow {dtype}'s normal range "
                         f"(from {torch.finfo(dtype).tiny:.3g}): stored there, their step grows by up to "
                         f"{by:.1%}, past the half-step error bound{_hint(dtype)}")
    return c


def stored_step_factor(dtype: torch.dtype) -> float:
    """How much larger than exact a scale stored in ``dtype`` by ``round_scales_up`` can be:
    1 + eps (eps = finfo(dtype).eps, one ulp of 1: fp16 2^-10, bf16 2^-7, fp32 2^-23)."""
    return 1.0 + torch.finfo(dtype).eps


@dataclass
class QuantizedWeight:
    codes: torch.Tensor        # [out, in] integer codes (int8 storage before packing)
    scales: torch.Tensor       # [out, n_groups] float
    zeros: torch.Tensor        # [out, n_groups] float (0 for symmetric)
    bits: int
    group_size: int            # input columns per group (== in_features: per channel)
    sym: bool

    def __post_init__(self):
        if not is_int(self.bits) or not 2 <= self.bits <= 8:
            raise ValueError(f"bits must be an int in 2..8, got {self.bits!r}")
        if not is_int(self.group_size) or self.group_size <= 0:
            raise ValueError(f"group_size must be a positive int, got {self.group_size!r}")
        self.bits, self.group_size = int(self.bits), int(self.group_size)     # numpy ints too
        out, cols = self.codes.shape
        if cols % self.group_size:
            raise ValueError(f"group_size {self.group_size} does not divide {cols} input columns")
        if self.scales.shape != (out, cols // self.group_size) or self.zeros.shape != self.scales.shape:
            raise ValueError(f"scales/zeros must be [{out}, {cols // self.group_size}], got "
                             f"{tuple(self.scales.shape)} and {tuple(self.zeros.shape)}")

    def stored_scales(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(scales, zeros) cast to ``dtype`` for storage (``QuantLinear``'s ``scale_dtype``).

        Raises ValueError when the cast breaks them: a value that overflows to inf (or is NaN),
        or a nonzero one that underflows to 0. fp16 keeps magnitudes from about 6e-8 to 65504.
        Warns (UserWarning) when scales ``dtype`` cannot hold exactly are rounded here, after the
        codes were chosen against the unrounded ones: the stored layer can then miss the half-step
        error bound (fp16 scales of 8-bit weights: by 7% at std 0.01, measured). Quantize with
        ``scale_dtype`` (``quantize_rtn``, ``quantize``) to choose the codes against stored scales.
        """
        check_scale_dtype(dtype)
        hint = _hint(dtype)
        cast = []
        for what, t in (("scales", self.scales), ("zero points", self.zeros)):
            c = t.to(dtype)
            if not torch.isfinite(c).all():
                raise ValueError(f"{what} up to {float(t.abs().max()):.3g} overflow {dtype} "
                                 f"(largest {torch.finfo(dtype).max:.3g}){hint}")
            lost = (c == 0) & (t != 0)
            if lost.any():
                raise ValueError(f"{what} as small as {float(t[lost].abs().min()):.3g} underflow "
                                 f"to 0 in {dtype}{hint}")
            if not torch.equal(c.to(t.dtype), t):
                warnings.warn(f"{what} rounded to {dtype} after the codes were chosen: the stored weight can "
                              f"miss the half-step error bound; quantize with scale_dtype={dtype} to choose "
                              f"the codes against the stored {what}", stacklevel=3)
            cast.append(c.contiguous())
        return cast[0], cast[1]

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        """The float weight these codes stand for, [out, in]."""
        s = self.scales.to(dtype).repeat_interleave(self.group_size, dim=1)
        z = self.zeros.to(dtype).repeat_interleave(self.group_size, dim=1)
        return s * (self.codes.to(dtype) - z)
