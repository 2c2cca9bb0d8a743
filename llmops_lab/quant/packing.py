"""Storage of integer codes that really shrinks: widths below 8 bits packed, 8 bits one per int8.

- below 8 bits (2-7): each row is a little-endian bit stream, code ``k`` in bits ``k*b .. k*b+b-1``
  of the row (bit ``i`` of the stream is bit ``i % 8`` of byte ``i // 8``), so a row of ``K`` codes
  takes ``ceil(K*b/8)`` bytes: 3-bit codes 8 to 3 bytes, 2-bit codes 4 to a byte. Codes are stored
  unsigned: symmetric ones offset by ``2^(b-1)`` (4-bit -8..7 as 0..15; round-to-nearest uses -7..7,
  GPTQ all 16), asymmetric ones as they are.
- 4 bits is that stream too: column ``2j`` in the low nibble and ``2j+1`` in the high nibble of
  byte ``j``, the nibble order GPTQ/AWQ checkpoints use in spirit (they pack 8 nibbles per int32; we
  pack 2 per uint8). llama.cpp's Q4_0 is *not* this layout: a block of 32 puts column ``j`` and
  ``j+16`` in one byte (see ``gguf``, which writes Q4_0 with the ``gguf`` package). ``pack_int4``
  writes ours directly (the Triton kernel's fast path reads it that way) and needs an even number
  of columns.
- 8 bits: one signed int8 per code. Symmetric codes as they are (-128..127); asymmetric codes
  0..255 centred, ``code - 128``, so they fit int8.

A packed row does not say how many codes it holds below 8 bits (a row of 3 two-bit codes and one of
4 both take a byte), so unpacking takes ``K``; only 4 bits (whose rows are whole pairs) and 8 bits
(one byte a code) can go without it.
"""
from __future__ import annotations

import torch

from ..checks import is_int


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


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes in [0, 2^bits) [..., K] -> uint8 [..., ceil(K*bits/8)], the row as a
    little-endian bit stream (see the module docstring). Bits are spread out one per byte and
    summed back into bytes: plain and exact, at ``bits`` bytes of scratch per code."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    _check_codes(codes, 0, 2 ** bits - 1, f"{bits}-bit unsigned codes")
    if codes.dim() == 0:
        raise ValueError("pack_bits needs at least one dimension of codes")
    *lead, K = codes.shape
    u8 = dict(device=codes.device, dtype=torch.uint8)
    planes = (codes.to(torch.uint8)[..., None] >> torch.arange(bits, **u8)) & 1          # [..., K, b]
    nbytes = -(-K * bits // 8)
    stream = torch.nn.functional.pad(planes.reshape(*lead, K * bits), (0, nbytes * 8 - K * bits))
    return (stream.view(*lead, nbytes, 8) << torch.arange(8, **u8)).sum(-1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, K: int) -> torch.Tensor:
    """uint8 [..., ceil(K*bits/8)] -> uint8 codes [..., K], the inverse of ``pack_bits``. Eight
    codes fill exactly ``bits`` bytes, so each group of them is read as one 64-bit word and cut
    into codes by shifts (2-6x faster than spreading the bits out, on the embedded models' layers)."""
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed codes must be uint8, got {packed.dtype}")
    if packed.shape[-1] != -(-K * bits // 8):
        raise ValueError(f"{K} codes of {bits} bits take {-(-K * bits // 8)} bytes a row, got {packed.shape[-1]}")
    *lead, nbytes = packed.shape
    groups = -(-K // 8)
    by = torch.nn.functional.pad(packed, (0, groups * bits - nbytes)).reshape(*lead, groups, bits).long()
    word = (by << torch.arange(0, 8 * bits, 8, device=packed.device)).sum(-1, keepdim=True)   # [..., g, 1]
    codes = (word >> torch.arange(0, 8 * bits, bits, device=packed.device)) & (2 ** bits - 1)  # [..., g, 8]
    return codes.view(*lead, groups * 8)[..., :K].to(torch.uint8)


def packed_width(K: int, bits: int) -> int:
    """Stored columns of a row of K codes: bytes of the bit stream below 8 bits, K int8 at 8."""
    return K if bits == 8 else -(-K * bits // 8)


def storage_offset(bits: int, sym: bool) -> int:
    """What is subtracted from a code before it is stored (see the module docstring)."""
    if bits < 8:
        return -(2 ** (bits - 1)) if sym else 0
    return 0 if sym else 2 ** (bits - 1)


def _check_bits(bits) -> None:
    if not is_int(bits) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an int in 2..8, got {bits!r}")


def pack_codes(codes: torch.Tensor, bits: int, sym: bool) -> torch.Tensor:
    """Codes of a ``QuantizedWeight`` -> stored tensor: uint8 [out, packed_width(in, bits)] below 8
    bits, int8 [out, in] at 8."""
    _check_bits(bits)
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if sym else (0, 2 ** bits - 1)
    _check_codes(codes, lo, hi, f"{bits}-bit {'symmetric' if sym else 'asymmetric'} codes")
    shifted = codes.to(torch.int16) - storage_offset(bits, sym)
    if bits == 8:
        return shifted.to(torch.int8)
    return pack_int4(shifted) if bits == 4 else pack_bits(shifted, bits)


def unpack_codes(stored: torch.Tensor, bits: int, sym: bool, K: int | None = None) -> torch.Tensor:
    """Stored tensor -> codes as int16 [out, in], the inverse of ``pack_codes``. ``K`` (in, the
    codes a row) is required at 2, 3, 5, 6 and 7 bits, where a row's padding bits could hold one
    more code; at 4 bits (pairs, so K = 2 x bytes) and 8 bits it may be left out."""
    _check_bits(bits)
    if bits == 8:
        if stored.dtype != torch.int8:     # uint8 bytes would read as other codes, floats truncate
            raise ValueError(f"8-bit codes are stored as torch.int8, got {stored.dtype}")
        raw = stored
    elif bits == 4 and (K is None or K == 2 * stored.shape[-1]):
        raw = unpack_int4(stored)
    else:
        raw = unpack_bits(stored, bits, codes_per_row(stored.shape[-1], bits, K))
    return raw.to(torch.int16) + storage_offset(bits, sym)


def codes_per_row(width: int, bits: int, K: int | None = None) -> int:
    """How many codes a packed row of ``width`` bytes holds: ``K`` when given (checked). Without
    it: at 4 bits 2 a byte (odd rows are never packed at 4 bits), at 8 bits 1 a byte, and at other
    widths only when one row length fits; else ValueError (a row of 3 two-bit codes and one of 4
    both take a byte)."""
    if K is not None:
        if packed_width(K, bits) != width:
            raise ValueError(f"{K} codes of {bits} bits take {packed_width(K, bits)} bytes a row, got {width}")
        return K
    if bits in (4, 8):
        return width * 8 // bits
    fewest, most = 8 * (width - 1) // bits + 1, 8 * width // bits       # ceil(k*bits/8) == width
    if fewest != most:
        raise ValueError(f"a row of {width} bytes of {bits}-bit codes holds {fewest} to {most} codes: "
                         f"pass K, the number of codes a row")
    return most
