"""QuantLinear: a weight-only quantized ``nn.Linear``, and ``quantize`` that swaps it into a model.

Weight-only quantization (GPTQ, Frantar et al. 2022; AWQ, Lin et al. 2023): the weight is stored as
packed integer codes plus per-group scales and zero points; activations stay in floating point.
Decoding is memory-bound, so reading 4 bits instead of 16/32 per weight is what makes it faster.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from . import triton_dequant
from .packing import pack_codes, unpack_codes
from .rtn import quantize_rtn
from .weights import QuantizedWeight

METHODS = ("rtn",)
KERNEL_MAX_TOKENS = 64      # the fused kernel serves decode batches; larger ones are compute-bound
KERNELS = ("auto", "triton", "torch")


class QuantLinear(nn.Module):
    """``y = x W^T + b`` with W stored quantized (buffers ``qweight``, ``scales``, ``zeros``, ``bias``).

    ``qweight`` is uint8 [out, in/2] at 4 bits (two codes per byte), int8 [out, in] otherwise (see
    ``packing``). ``scales`` and ``zeros`` are [out, n_groups] in ``scale_dtype`` (fp16 by default;
    RTN zero points are integers and exact in fp16). The forward pass dequantizes the whole weight
    and calls ``F.linear``: the plain PyTorch path, right on a CPU and for large batches. On CUDA,
    up to ``KERNEL_MAX_TOKENS`` tokens go through the fused Triton kernel (``triton_dequant``),
    which reads the packed codes directly and never materialises the float weight. ``kernel``:
    "auto" (that rule), "triton" (always the kernel: tests under TRITON_INTERPRET=1) or "torch".
    """

    def __init__(self, qw: QuantizedWeight, bias: torch.Tensor | None = None,
                 dtype: torch.dtype = torch.float32, scale_dtype: torch.dtype = torch.float16):
        super().__init__()
        out_features, in_features = qw.shape
        if qw.bits == 4 and in_features % 2:
            raise ValueError(f"4-bit packing needs an even in_features, got {in_features}")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.sym = qw.bits, qw.group_size, qw.sym
        self.dtype = dtype                                  # the compute dtype of the forward pass
        self.kernel = "auto"
        self.register_buffer("qweight", pack_codes(qw.codes, qw.bits, qw.sym))
        self.register_buffer("scales", qw.scales.to(scale_dtype).contiguous())
        self.register_buffer("zeros", qw.zeros.to(scale_dtype).contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().to(dtype).clone())

    @classmethod
    def from_linear(cls, linear: nn.Linear, qw: QuantizedWeight, **kwargs) -> "QuantLinear":
        return cls(qw, linear.bias, dtype=linear.weight.dtype, **kwargs)

    def quantized_weight(self) -> QuantizedWeight:
        """The stored weight back in the shared format (codes unpacked)."""
        return QuantizedWeight(codes=unpack_codes(self.qweight, self.bits, self.sym),
                               scales=self.scales, zeros=self.zeros, bits=self.bits,
                               group_size=self.group_size, sym=self.sym)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The float weight [out, in]: scales * (codes - zeros), computed in fp32 then cast.

        Same numbers as ``QuantizedWeight.dequantize``, broadcast per group instead of repeated.
        """
        return triton_dequant.dequantize_stored(self.qweight, self.scales, self.zeros, self.bits, self.sym,
                                                dtype or self.dtype)

    @property
    def weight(self) -> torch.Tensor:
        """Dequantized weight, so code reading ``.weight.device``/``.dtype`` keeps working (costly)."""
        return self.dequantize()

    @property
    def nbytes(self) -> int:
        """Measured storage of the buffers (codes, scales, zeros, bias) in bytes."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def uses_kernel(self, x: torch.Tensor) -> bool:
        """Whether ``forward(x)`` runs the fused kernel (see the class docstring)."""
        if self.kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {self.kernel!r}")
        if self.kernel == "torch":
            return False
        if self.kernel == "triton":
            if not triton_dequant.available(x.device):
                raise RuntimeError(f"the Triton kernel cannot run on {x.device} (needs CUDA or TRITON_INTERPRET=1)")
            return True
        return (x.is_cuda and x.numel() // self.in_features <= KERNEL_MAX_TOKENS
                and triton_dequant.available(x.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:      # x [..., in] -> [..., out]
        if self.uses_kernel(x):
            return triton_dequant.dequant_matmul(x, self.qweight, self.scales, self.zeros, self.bits,
                                                 self.group_size, self.sym, self.bias)
        return F.linear(x, self.dequantize(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        g = "per channel" if self.group_size == self.in_features else f"group_size={self.group_size}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"{g}, sym={self.sym}")


def _skipped(name: str, skip) -> bool:
    return any(part in skip for part in name.split("."))


@torch.no_grad()
def quantize(model: nn.Module, method: str = "rtn", bits: int = 4, group_size: int | None = 128,
             sym: bool = False, skip=("lm_head",), progress: bool = True,
             scale_dtype: torch.dtype = torch.float16) -> nn.Module:
    """Swap every ``nn.Linear`` of ``model`` (except names containing a ``skip`` part) for a
    ``QuantLinear``, in place, and return the model.

    Args:
        method: "rtn" (round to nearest). GPTQ and AWQ live in ``llmops_lab.quant.gptq`` / ``awq``.
        bits: 2..8. group_size: input columns per group; None or -1 = per output channel.
        sym: absmax (True) or zero point (False). skip: module-name parts left in float.
    Every layer is validated and quantized before any is swapped: on any error (bad bits, a group
    size that does not divide a layer, NaN/inf weights) the model is left untouched. Bad arguments
    fail on the first layer, before any work: ``quantize_rtn`` checks them first.
    """
    if method not in METHODS:
        raise ValueError(f"quantize supports method in {METHODS}, got {method!r} "
                         "(GPTQ and AWQ: see llmops_lab.quant.gptq and llmops_lab.quant.awq)")
    targets = [(name, mod) for name, mod in model.named_modules()
               if isinstance(mod, nn.Linear) and not _skipped(name, skip)]
    if not targets:
        raise ValueError(f"no nn.Linear to quantize in {type(model).__name__} (skip={skip})")
    new = {}                                                 # quantize all first, swap after
    for name, mod in tqdm(targets, desc=f"quantize {method} int{bits}", disable=not progress):
        if bits == 4 and mod.in_features % 2:
            raise ValueError(f"cannot quantize {name}: 4-bit packing needs an even in_features, "
                             f"got {mod.in_features}")
        try:
            qw = quantize_rtn(mod.weight, bits=bits, group_size=group_size, sym=sym)
        except ValueError as e:
            raise ValueError(f"cannot quantize {name}: {e}") from None
        new[name] = QuantLinear.from_linear(mod, qw, scale_dtype=scale_dtype).to(mod.weight.device)
    for name, q in new.items():                              # swap only once all succeeded
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, q)
    return model
