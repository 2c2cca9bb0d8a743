"""int8 KV cache: keys and values stored as 8-bit integers with one scale per token and head.

Symmetric absmax quantization (Jacob et al. 2018) along the head dimension: each cached vector
x [D] is stored as q = round(x / Delta) in -127..127 with Delta = max|x| / 127
(``formulas.quant_step_symmetric(max|x|, 8)``), so |x - q Delta| <= Delta / 2
(``formulas.quant_error_bound_symmetric``) for q Delta computed in fp32. The cache hands attention
q Delta in the keys' own dtype, which rounds it once more: in bf16 or fp16 the error can exceed
Delta / 2 by up to half a unit in the last place of |x| (measured up to 1.9 x Delta / 2 in bf16,
whose 8-bit mantissa is as coarse as the int8 codes). One scale per token and head, as in KIVI (Liu et al.
2024) for values and in vLLM's per-token int8 KV; keys have outlier channels that per-channel
scales would handle better (KIVI), which this simple per-token scheme gives up for simplicity.
Attention runs on the dequantized tensors: the cache saves memory, not arithmetic.
"""
from __future__ import annotations

import torch

from .. import formulas
from .cache import check_dims, check_new_kv, check_no_gap, check_start
from .sliding_window import model_dims

QMAX = 127  # int8 codes -127..127; -128 is left unused so the grid is symmetric
SCALE_DTYPE = torch.float16   # Int8KVCache's default scale: one per cached vector (token x KV head)
SCALE_BYTES = torch.finfo(SCALE_DTYPE).bits // 8


def quantize_per_token(x: torch.Tensor, scale_dtype=SCALE_DTYPE) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] -> (int8 codes [..., D], scales [..., 1] in scale_dtype), absmax over D."""
    xf = x.float()
    # The smallest positive (subnormal) scale, so an all-zero vector still gets a usable one: the
    # smallest normal (fp16's 6.1e-5) quantized vectors under 0.008 on a coarser grid, up to 34x
    # the error bound at 1e-4 and all zeros at 1e-6.
    info = torch.finfo(scale_dtype)
    need = (xf.abs().amax(-1, keepdim=True) / QMAX).clamp(min=info.tiny * info.eps)
    scale = need.to(scale_dtype)
    # A scale that rounded down would put the largest code past 127 (clamped: more than half a
    # step of error); the next representable value up keeps every code within the grid.
    low = scale.float() < need
    if bool(low.any()):
        scale = torch.where(low, torch.nextafter(scale, torch.full_like(scale, float("inf"))), scale)
    if not bool(torch.isfinite(scale).all()):   # an inf or NaN input, or a scale past fp16's 65504
        big = xf.abs().amax().item()
        if not big < float("inf"):
            raise ValueError("keys/values hold inf or NaN: there is nothing to quantize")
        raise ValueError(f"cannot quantize keys/values up to {big:.3g} with {scale_dtype} scales (they hold "
                         f"up to {torch.finfo(scale_dtype).max * QMAX:.3g}); pass scale_dtype=torch.float32")
    # Rounding against the stored (rounded) scale keeps the error within half of that scale.
    q = (xf / scale.float()).round().clamp(-QMAX, QMAX).to(torch.int8)
    return q, scale


def dequantize_per_token(q: torch.Tensor, scale: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    return (q.float() * scale.float()).to(dtype)


def quantized_vector_bytes(head_dim: int, element_bytes: float = 1, scale_bytes: float = SCALE_BYTES) -> float:
    """Bytes of one cached key or value vector (one token, one KV head): D x element_bytes + scale_bytes.

    The one definition of the layout ``Int8KVCache`` allocates (``quantized_kv_cache_bytes``) and
    the KV calculator sizes a cache by (``calculator.KV_CACHE_DTYPES``): int8 with fp16 scales is
    1 + 2 / D bytes per element; at D = 128, 130 bytes per vector against 256 in fp16 (1.97x smaller).
    An unscaled dtype (fp16, or fp8 with a per-tensor scale) has scale_bytes = 0.
    """
    formulas._positive_int(head_dim=head_dim)
    formulas._positive(element_bytes=element_bytes)
    formulas._nonneg(scale_bytes=scale_bytes)
    return head_dim * element_bytes + scale_bytes


def quantized_kv_cache_bytes(num_layers: int, num_kv_heads: int, head_dim: int, seq_len: int,
                             bits: int = 8, scale_bytes: float = SCALE_BYTES, batch_size: int = 1) -> float:
    """Bytes of a KV cache quantized per token and head: 2 x L x B x Hkv x s x (D x b/8 + scale_bytes).

    The ``formulas.kv_cache_bytes`` layout with each D-vector stored in b bits plus one scale
    (``quantized_vector_bytes``).
    """
    formulas._check_bits(bits)      # 0 counted the scales alone; -8 failed as "dtype_bytes must be > 0"
    per_vector = quantized_vector_bytes(head_dim, bits / 8, scale_bytes)
    return formulas.kv_cache_bytes(num_layers, num_kv_heads, 1, seq_len, per_vector, batch_size)


class Int8KVCache:
    """A contiguous cache like ``KVCache`` (same layout, any chunk size) holding int8 codes + scales.

    ``update`` returns the dequantized keys/values 0..start+S in ``dtype``; ``nbytes`` counts the
    int8 codes and the scales actually allocated (``quantized_kv_cache_bytes``).
    """

    def __init__(self, num_layers: int, batch_size: int, num_kv_heads: int, head_dim: int,
                 max_seq_len: int, dtype=torch.float32, device="cpu", scale_dtype=SCALE_DTYPE,
                 context_len: int | None = None):
        check_dims(num_layers=num_layers, batch_size=batch_size, num_kv_heads=num_kv_heads,
                   head_dim=head_dim, max_seq_len=max_seq_len)
        if context_len is not None and max_seq_len > context_len:
            raise ValueError(f"max_seq_len of {max_seq_len} exceeds the model's context of {context_len}")
        if not scale_dtype.is_floating_point:
            raise ValueError(f"scale_dtype must be a floating-point dtype, got {scale_dtype}")
        shape = (batch_size, num_kv_heads, max_seq_len, head_dim)
        codes = lambda: [torch.zeros(shape, dtype=torch.int8, device=device) for _ in range(num_layers)]
        scales = lambda: [torch.zeros(shape[:3] + (1,), dtype=scale_dtype, device=device)
                          for _ in range(num_layers)]
        self.k, self.v, self.k_scale, self.v_scale = codes(), codes(), scales(), scales()
        self.dtype, self.scale_dtype = dtype, scale_dtype
        self.batch_size, self.max_seq_len = batch_size, max_seq_len
        self.length = 0
        self.written = [0] * num_layers   # each layer's slots 0..written-1 hold data (check_no_gap)

    @classmethod
    def for_model(cls, model, batch_size: int, max_seq_len: int | None = None, dtype=None, device=None,
                  scale_dtype=SCALE_DTYPE):
        dims = model_dims(model, dtype, device, evicts=False)
        return cls(batch_size=batch_size,        # None, not 0, means the model's context
                   max_seq_len=dims["context_len"] if max_seq_len is None else max_seq_len,
                   scale_dtype=scale_dtype, **dims)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, start):
        """Quantize k, v [B, Hkv, S, D] into positions start..start+S; return 0..start+S dequantized."""
        if torch.is_tensor(start):
            raise ValueError("Int8KVCache does not support the static-shape decode step (per-row start)")
        check_start(start)
        end = start + k.shape[2]
        if end > self.max_seq_len:
            raise ValueError(f"KV cache overflow: writing up to position {end} in a cache of {self.max_seq_len}")
        check_new_kv(layer, self.k, k, v, self.batch_size)
        check_no_gap(start, max(self.written[layer], self.length))
        self.written[layer] = max(self.written[layer], end)
        for codes, scales, x in ((self.k, self.k_scale, k), (self.v, self.v_scale, v)):
            codes[layer][:, :, start:end], scales[layer][:, :, start:end] = quantize_per_token(x, self.scale_dtype)
        return (dequantize_per_token(self.k[layer][:, :, :end], self.k_scale[layer][:, :, :end], k.dtype),
                dequantize_per_token(self.v[layer][:, :, :end], self.v_scale[layer][:, :, :end], v.dtype))

    def reset(self) -> None:
        self.length = 0
        self.written = [0] * len(self.k)

    @property
    def nbytes(self) -> int:
        """Bytes allocated: int8 codes plus one scale per token and head, for keys and values."""
        return sum(t.numel() * t.element_size() for t in self.k + self.v + self.k_scale + self.v_scale)
