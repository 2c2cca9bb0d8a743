"""QuantizedWeight: integer codes plus the scales and zero points that map them back to floats.

The shared format every method produces (round-to-nearest, GPTQ, AWQ), so storage, the
``QuantLinear`` module and the error checks are written once. For a weight W [out, in] quantized
in groups of ``group_size`` input columns (``group_size = in`` is per output channel):

    W[o, i] ~= scales[o, g] * (codes[o, i] - zeros[o, g]),   g = i // group_size

Asymmetric (zero point) codes lie in [0, 2^b - 1]; symmetric ones in [-(2^(b-1) - 1), 2^(b-1) - 1]
with zeros = 0.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class QuantizedWeight:
    codes: torch.Tensor        # [out, in] integer codes (int8 storage before packing)
    scales: torch.Tensor       # [out, n_groups] float
    zeros: torch.Tensor        # [out, n_groups] float (0 for symmetric)
    bits: int
    group_size: int            # input columns per group (== in_features: per channel)
    sym: bool

    def __post_init__(self):
        if not 2 <= self.bits <= 8:
            raise ValueError(f"bits must be in 2..8, got {self.bits}")
        out, cols = self.codes.shape
        if cols % self.group_size:
            raise ValueError(f"group_size {self.group_size} does not divide {cols} input columns")
        if self.scales.shape != (out, cols // self.group_size) or self.zeros.shape != self.scales.shape:
            raise ValueError(f"scales/zeros must be [{out}, {cols // self.group_size}], got "
                             f"{tuple(self.scales.shape)} and {tuple(self.zeros.shape)}")

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        """The float weight these codes stand for, [out, in]."""
        s = self.scales.to(dtype).repeat_interleave(self.group_size, dim=1)
        z = self.zeros.to(dtype).repeat_interleave(self.group_size, dim=1)
        return s * (self.codes.to(dtype) - z)
