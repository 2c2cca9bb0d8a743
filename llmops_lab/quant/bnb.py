"""bitsandbytes: LLM.int8() and NF4 through the real library, swapped into our model.

- LLM.int8() (Dettmers et al. 2022, "8-bit Matrix Multiplication for Transformers at Scale"):
  row-wise absmax int8 weights; at run time the input columns holding an outlier (|x| > threshold,
  6.0 in the paper) are multiplied in 16 bits and the rest in int8 (``bnb.nn.Linear8bitLt`` with
  ``has_fp16_weights=False``: the int8 weight is all that is stored).
- NF4 (Dettmers et al. 2023, QLoRA): 4-bit codes indexing the 16 quantiles of a normal
  distribution, one absmax per block of 64 weights, the absmax values themselves quantized to 8 bits
  ("double quantization"; ``bnb.nn.Linear4bit`` with ``quant_type="nf4"``).

bitsandbytes runs on a CPU since 0.46 (its multi-backend work); it is imported only inside these
functions, so the package and the bench work without it. Bytes are measured from what each module
stores (its state dict: codes, scales, quantization state, bias), never from the formula.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

BNB_METHODS = ("bnb_int8", "bnb_nf4")


def import_bnb():
    """The bitsandbytes module, or an ImportError saying how to get it."""
    try:
        import bitsandbytes
    except ImportError as e:
        raise ImportError("bitsandbytes is not installed: pip install 'bitsandbytes>=0.46' "
                          "(0.46 and later run on a CPU as well as on CUDA)") from e
    # LLM.int8() multiplies in fp16 by design, and bitsandbytes logs so on every call with fp32
    # input (hundreds of lines in notebook 01): each such message once per process is enough
    log = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _Once) for f in log.filters):
        log.addFilter(_Once())
    return bitsandbytes


class _Once(logging.Filter):
    """A logging filter that lets each distinct message through once."""

    def __init__(self):
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if msg in self.seen:
            return False
        self.seen.add(msg)
        return True


def available() -> bool:
    try:
        import_bnb()
    except Exception:      # missing, or a broken native library
        return False
    return True


@torch.no_grad()
def bnb_linear(linear: nn.Linear, method: str, device=None, threshold: float = 6.0,
               compute_dtype: torch.dtype | None = None) -> nn.Module:
    """A bitsandbytes twin of ``linear`` on ``device`` (default: the linear's); the weight is
    quantized when the module moves to the device, as bitsandbytes does it."""
    bnb = import_bnb()
    device = torch.device(device) if device is not None else linear.weight.device
    w = linear.weight.detach().to("cpu", copy=True)
    has_bias = linear.bias is not None
    if method == "bnb_int8":
        mod = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=has_bias,
                                  has_fp16_weights=False, threshold=threshold)
        mod.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False)
    elif method == "bnb_nf4":
        mod = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=has_bias,
                                compute_dtype=compute_dtype or linear.weight.dtype, quant_type="nf4")
        mod.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4")
    else:
        raise ValueError(f"bitsandbytes methods are {BNB_METHODS}, got {method!r}")
    if has_bias:
        mod.bias = nn.Parameter(linear.bias.detach().to("cpu", copy=True), requires_grad=False)
    # a new module is in training mode: Linear8bitLt in training mode on a CPU multiplies by the
    # dequantized weight in float and never splits outliers; the twin takes the linear's mode
    return mod.to(device).train(linear.training)


def module_nbytes(module: nn.Module) -> int:
    """Measured bytes a (bitsandbytes or plain) module stores: every tensor of its state dict."""
    return sum(t.numel() * t.element_size() for t in module.state_dict().values() if isinstance(t, torch.Tensor))


@torch.no_grad()
def bnb_quantize(model: nn.Module, method: str = "bnb_int8", skip=("lm_head",), threshold: float = 6.0,
                 compute_dtype: torch.dtype | None = None, progress: bool = False) -> nn.Module:
    """Swap every ``nn.Linear`` of ``model`` (except names containing a ``skip`` part) for its
    bitsandbytes twin, in place, on the device its weight is on; returns the model.

    All modules are built before any is swapped, so on an error (bitsandbytes missing, NaN/inf
    weights) the model is left untouched.
    """
    from ..checks import check_float_model, is_real
    from .quant_linear import linear_targets, swap_modules
    if method not in BNB_METHODS:
        raise ValueError(f"bitsandbytes methods are {BNB_METHODS}, got {method!r}")
    # Linear8bitLt is an nn.Linear: a second pass read its int8 codes as float weights
    check_float_model(model, f"quantize(method={method!r})")
    # each method has its own knob: the other one was accepted and did nothing
    if method == "bnb_nf4" and threshold != 6.0:
        raise ValueError("threshold is LLM.int8()'s outlier threshold (bnb_int8); bnb_nf4 has none")
    if method == "bnb_int8" and compute_dtype is not None:
        raise ValueError("compute_dtype sets bnb_nf4's matmul dtype; bnb_int8 computes in fp16 with int8 outliers split off")
    if not is_real(threshold) or not 0 <= threshold < float("inf"):
        raise ValueError(f"threshold must be a finite number >= 0, got {threshold!r}")
    import_bnb()
    targets = linear_targets(model, skip)
    for name, mod in targets:
        if not torch.isfinite(mod.weight).all():
            raise ValueError(f"cannot quantize {name}: weight contains NaN or inf")
    from tqdm.auto import tqdm
    new = {name: bnb_linear(mod, method, threshold=threshold, compute_dtype=compute_dtype)
           for name, mod in tqdm(targets, desc=f"quantize {method}", disable=not progress)}
    swap_modules(model, new)
    return model
