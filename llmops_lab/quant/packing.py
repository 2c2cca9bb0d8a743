"""Storage of integer codes that really shrinks: int4 two per byte, everything else one per int8.

The layout GPTQ/AWQ checkpoints and llama.cpp's Q4_0 use in spirit (they pack 8 nibbles per int32;
we pack 2 per uint8, which is simpler to read and the same bytes).

- 4 bits: unsigned nibbles, column ``2j`` in the low nibble and ``2j+1`` in the high nibble of byte
  ``j`` (low nibble first). Symmetric 4-bit codes -7..7 are stored offset by +8 (1..15).
- other widths (2, 3, 5, 6, 7, 8): one signed int8 per code. Symmetric codes are stored as they are
  (-(2^(b-1)-1)..2^(b-1)-1); asymmetric codes 0..2^b-1 are stored centred, ``code - 2^(b-1)``, so
  8-bit codes 0..255 fit int8 (-128..127).
"""
from __future__ import annotations

import torch


def _check_codes(codes: torch.Tensor, lo: int, hi: int, what: str) -> None:
    if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
        raise ValueError(f"{what} must be an integer tensor, got {codes.dtype}")
    if codes.numel():
        cmin, cmax = (int(v) for v in torch.aminmax(codes))
        if cmin < lo or cmax > hi:
            raise ValueError(f"{what} must lie in [{lo}, {hi}], got [{cmin}, {cmax}]")


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Integer codes in [0, 15], [..., in] with ``in`` even -> uint8 [..., in/2], low nibble first."""
    _check_codes(codes, 0, 15, "int4 codes")
    if codes.dim() == 0 or codes.shape[-1] % 2:
        raise ValueError(f"pack_int4 needs an even number of columns, got shape {tuple(codes.shape)}")
    c = codes.to(torch.uint8)
    return c[..., 0::2] | (c[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [..., in/2] -> uint8 codes [..., in] in [0, 15], the inverse of ``pack_int4``."""
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed int4 must be uint8, got {packed.dtype}")
    return torch.stack((packed & 0x0F, packed >> 4), dim=-1).flatten(-2)


def storage_offset(bits: int, sym: bool) -> int:
    """What is subtracted from a code before it is stored (see the module docstring)."""
    if bits == 4:
        return -8 if sym else 0
    return 0 if sym else 2 ** (bits - 1)


def pack_codes(codes: torch.Tensor, bits: int, sym: bool) -> torch.Tensor:
    """Codes of a ``QuantizedWeight`` -> stored tensor: uint8 [out, in/2] at 4 bits, else int8 [out, in]."""
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be in 2..8, got {bits}")
    lo, hi = (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1) if sym else (0, 2 ** bits - 1)
    _check_codes(codes, lo, hi, f"{bits}-bit {'symmetric' if sym else 'asymmetric'} codes")
    shifted = codes.to(torch.int16) - storage_offset(bits, sym)
    return pack_int4(shifted) if bits == 4 else shifted.to(torch.int8)


def unpack_codes(stored: torch.Tensor, bits: int, sym: bool) -> torch.Tensor:
    """Stored tensor -> codes as int16 [out, in], the inverse of ``pack_codes``."""
    raw = unpack_int4(stored) if bits == 4 else stored
    return raw.to(torch.int16) + storage_offset(bits, sym)
