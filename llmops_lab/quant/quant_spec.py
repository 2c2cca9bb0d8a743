"""One quantized model as data (``QuantSpec``) and the copy of a base model it describes.

``quantized_copy`` makes it: fp32, bf16, round-to-nearest, GPTQ (Frantar et al. 2022), AWQ
(Lin et al. 2023), bitsandbytes, or a GGUF file run by llama.cpp. A method that cannot run here
raises ``NotMeasured`` with the reason. ``DEFAULT_SPECS``, ``FULL_SPECS`` and ``LIBRARY_SPECS`` are
the models the quality and memory tables measure.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checks import is_int
from .awq import AWQConfig, awq_quantize_model
from .gptq import GPTQConfig, gptq_quantize_model
from .quant_linear import quantize

@dataclass(frozen=True)
class QuantSpec:
    """One quantized model: method ("fp32", "bf16", "rtn", "rtn_sym", "gptq", "awq" or a method
    of ``quantize``) at bits and group_size (-1 per channel), calibrated on ``calibration``."""
    method: str
    bits: int = 16
    group_size: int = 128
    calibration: str = "calibration"
    n_calibration: int | None = None     # None: the run's calibration_seqs

    def __post_init__(self):
        from .gguf import GGUF_TYPES
        if not isinstance(self.method, str):
            raise TypeError(f"method must be a str, got {type(self.method).__name__}")
        for name in ("bits", "group_size"):
            if not is_int(getattr(self, name)):
                raise TypeError(f"{name} must be an integer, got {getattr(self, name)!r}")
            object.__setattr__(self, name, int(getattr(self, name)))     # numpy ints as Python's
        if not self.method.startswith("gguf_") and self.method not in SPEC_METHODS:
            # a typo ("GPTQ", "rtn4") showed as a "not measured" row, as if a library were missing
            raise ValueError(f"unknown method {self.method!r}; known: {SPEC_METHODS} or gguf_<type>")
        if self.method.startswith("gguf_") and self.method[5:].upper() not in GGUF_TYPES:
            raise ValueError(f"method {self.method!r}: GGUF types here are "
                             f"{tuple('gguf_' + t.lower() for t in GGUF_TYPES)}")
        # bitsandbytes and GGUF formats are fixed: other bits or groups would label rows with a
        # format that did not run (bnb_int8 "int4 g32" ran int8 per channel; gguf_q4_0 at bits=8
        # carried 8 bits into the memory table). Float copies are their dtype's width.
        if self.method in _FIXED_FORMATS and (self.bits, self.group_size) != _FIXED_FORMATS[self.method]:
            bits, group = _FIXED_FORMATS[self.method]
            raise ValueError(f"{self.method} runs bits={bits}, group_size={group}; got bits={self.bits}, "
                             f"group_size={self.group_size}")
        if self.method in _FLOAT_BITS and self.bits != _FLOAT_BITS[self.method]:
            raise ValueError(f"{self.method} is {_FLOAT_BITS[self.method]} bits a weight; got bits={self.bits}")

    @property
    def label(self) -> str:
        if self.method in ("fp32", "bf16"):
            return self.method
        if self.method.startswith("gguf_"):
            return f"GGUF {self.method[5:].upper()} (llama.cpp)"
        g = "per channel" if self.group_size == -1 else f"g{self.group_size}"
        return f"{self.method.upper().replace('_SYM', ' sym')} int{self.bits} {g}"


SPEC_METHODS = ("fp32", "bf16", "rtn", "rtn_sym", "gptq", "awq", "bnb_int8", "bnb_nf4")
# The one format each bitsandbytes and GGUF block method runs: (bits, group_size); NF4 quantizes
# blocks of 64, Q8_0 and Q4_0 blocks of 32 (one fp16 scale each).
_FIXED_FORMATS = {"bnb_int8": (8, -1), "bnb_nf4": (4, 64), "gguf_q8_0": (8, 32), "gguf_q4_0": (4, 32)}
# The width of the float copies (group_size means nothing there and is not checked).
_FLOAT_BITS = {"fp32": 32, "bf16": 16, "gguf_f32": 32, "gguf_f16": 16}


class NotMeasured(Exception):
    """A method whose library is not importable (or not written yet) here; the reason is the message."""


def quantized_copy(base, spec: QuantSpec, calibration: torch.Tensor | None = None, tokenizer=None):
    """A deep copy of ``base`` quantized as ``spec`` says (GPTQ/AWQ write their dequantized weights
    into the float linears; round-to-nearest swaps in ``QuantLinear``; "gguf_q8_0"/"gguf_q4_0"
    export to a GGUF file and return llama.cpp running it, which needs ``tokenizer``)."""
    if spec.method.startswith("gguf_"):
        return _gguf_peer(base, tokenizer, spec.method[len("gguf_"):].upper())
    model = copy.deepcopy(base)
    g = spec.group_size
    if spec.method == "fp32":
        return model.float()
    if spec.method == "bf16":
        return model.to(torch.bfloat16)
    if spec.method in ("rtn", "rtn_sym"):
        return quantize(model, "rtn", bits=spec.bits, group_size=g, sym=spec.method == "rtn_sym", progress=False)
    if spec.method == "gptq":      # the document's GPTQConfig: desc_act=True, damp_percent=0.01, sym=True
        gptq_quantize_model(model, calibration, GPTQConfig(bits=spec.bits, group_size=g, desc_act=True,
                                                           damp_percent=0.01, sym=True), progress=False)
        return model
    if spec.method == "awq":       # the document's quant_config: zero_point=True, q_group_size, w_bit
        awq_quantize_model(model, calibration, AWQConfig(w_bit=spec.bits, q_group_size=g, zero_point=True),
                           progress=False)
        return model
    try:
        return quantize(model, spec.method, progress=False)          # bitsandbytes: fixed formats
    except ImportError as err:     # only a missing library is "not measured"; bad input propagates
        raise NotMeasured(f"{type(err).__name__}: {str(err).splitlines()[0][:120]}") from None


def _gguf_peer(base, tokenizer, qtype: str):
    """``base`` exported to GGUF at ``qtype`` (every matrix, embeddings and LM head included) and
    run by llama.cpp (``LlamaCppPeer``); ``peer.path`` is the file."""
    import tempfile

    from .llama_cpp_peer import LlamaCppPeer, llama_cpp_available
    if not llama_cpp_available():
        raise NotMeasured("llama-cpp-python is not importable here (pip install -e '.[test]')")
    try:
        from .gguf import export_gguf
        path = export_gguf(base, tokenizer, Path(tempfile.mkdtemp(prefix="llmops-gguf-")) / f"model-{qtype}.gguf", qtype)
    except ImportError as err:
        raise NotMeasured(f"ImportError: {err}") from None
    return LlamaCppPeer(path, n_threads=torch.get_num_threads())


DEFAULT_SPECS = (QuantSpec("fp32", 32), QuantSpec("bf16", 16), QuantSpec("rtn", 8, -1),
                 QuantSpec("rtn", 4, 128), QuantSpec("rtn_sym", 4, 128), QuantSpec("rtn", 4, -1),
                 QuantSpec("rtn", 3, 128), QuantSpec("rtn_sym", 3, 128),
                 QuantSpec("rtn", 2, 128), QuantSpec("rtn_sym", 2, 128),
                 QuantSpec("gptq", 4, 128), QuantSpec("awq", 4, 128), QuantSpec("gptq", 3, 128),
                 QuantSpec("awq", 3, 128), QuantSpec("gptq", 2, 128), QuantSpec("awq", 2, 128))
FULL_SPECS = (QuantSpec("gptq", 4, -1), QuantSpec("awq", 4, -1), QuantSpec("gptq", 3, -1), QuantSpec("awq", 3, -1))
LIBRARY_SPECS = (QuantSpec("bnb_int8", 8, -1), QuantSpec("bnb_nf4", 4, 64), QuantSpec("gguf_q8_0", 8, 32),
                 QuantSpec("gguf_q4_0", 4, 32))
