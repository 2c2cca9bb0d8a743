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
from ..checks import check_float_model
from .weights import QuantizedWeight, check_bool, check_scale_dtype

METHODS = ("rtn", "gptq", "awq", "bnb_int8", "bnb_nf4")
KERNEL_MAX_TOKENS = 64      # the fused kernel serves decode batches; larger ones are compute-bound
KERNELS = ("auto", "triton", "torch")


class QuantLinear(nn.Module):
    """``y = x W^T + b`` with W stored quantized (buffers ``qweight``, ``scales``, ``zeros``, ``bias``).

    ``qweight`` is uint8 [out, in/2] at 4 bits (two codes per byte), uint8 [out, ceil(in*bits/8)]
    at 2, 3 and 5-7 bits (a bit stream: 3-bit codes 8 to 3 bytes), int8 [out, in] at 8 (see
    ``packing``). ``scales`` and ``zeros`` are [out, n_groups] in ``scale_dtype`` (fp16 by default;
    RTN zero points are integers and exact in fp16; scales fp16 cannot hold, under about 6e-8 or
    over 65504, raise a ValueError: pass ``scale_dtype=torch.float32`` for such weights). The
    forward pass dequantizes the whole weight and calls ``F.linear``: the plain PyTorch path,
    right on a CPU and for large batches. On CUDA, up to ``KERNEL_MAX_TOKENS`` tokens go through
    the fused Triton kernel (``triton_dequant``), which reads the packed codes directly and never
    materialises the float weight. ``kernel``: "auto" (that rule), "triton" (always the kernel:
    tests under TRITON_INTERPRET=1) or "torch".

    Module casts (``.half()``, ``.to(torch.bfloat16)``, ``.double()``) change the compute dtype and
    the bias, never ``scales`` and ``zeros``: the codes were chosen against them as stored, and a
    cast would re-round them unchecked (fp32-stored scales of tiny weights flush to 0 in fp16).
    Device moves move them as usual.
    """

    def __init__(self, qw: QuantizedWeight, bias: torch.Tensor | None = None,
                 dtype: torch.dtype = torch.float32, scale_dtype: torch.dtype = torch.float16):
        super().__init__()
        out_features, in_features = qw.shape
        if qw.bits == 4 and in_features % 2:
            raise ValueError(f"4-bit packing needs an even in_features, got {in_features}")
        if bias is not None and (not isinstance(bias, torch.Tensor) or bias.shape != (out_features,)):
            # else forward's broadcast fails inside torch, far from the mistake
            got = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
            raise ValueError(f"bias must be a tensor of shape ({out_features},), got {got}")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.sym = qw.bits, qw.group_size, qw.sym
        self.dtype = dtype                                  # the compute dtype of the forward pass
        self.kernel = "auto"
        # the kernel's variants (triton_dequant.dequant_matmul), candidates no GPU has timed yet: the
        # 4-bit split-nibble tile, codes to floats by bit arithmetic, and the GEMV kernel for 1-4 rows
        self.split_nibbles = False
        self.fast_convert = False
        self.gemv = False
        scales, zeros = qw.stored_scales(scale_dtype)     # ValueError if they do not fit scale_dtype
        self.register_buffer("qweight", pack_codes(qw.codes, qw.bits, qw.sym))
        self.register_buffer("scales", scales)
        self.register_buffer("zeros", zeros)
        self.register_buffer("bias", None if bias is None else bias.detach().to(dtype).clone())

    def _apply(self, fn, recurse=True):
        """nn.Module's cast/move of every tensor, then ``scales`` and ``zeros`` put back in their
        storage dtype on the device the cast chose (see the class docstring)."""
        kept = {k: self._buffers[k] for k in ("scales", "zeros")}
        super()._apply(fn, recurse)
        for k, t in kept.items():
            if self._buffers[k].dtype != t.dtype:
                self._buffers[k] = t.to(device=self._buffers[k].device)
        compute = fn(torch.empty(0, dtype=self.dtype, device=kept["scales"].device))
        if compute.dtype.is_floating_point:       # the dtype the cast gave float tensors
            self.dtype = compute.dtype
        return self

    @classmethod
    def from_linear(cls, linear: nn.Linear, qw: QuantizedWeight, **kwargs) -> "QuantLinear":
        return cls(qw, linear.bias, dtype=linear.weight.dtype, **kwargs)

    def quantized_weight(self) -> QuantizedWeight:
        """The stored weight back in the shared format (codes unpacked)."""
        return QuantizedWeight(codes=unpack_codes(self.qweight, self.bits, self.sym, self.in_features),
                               scales=self.scales, zeros=self.zeros, bits=self.bits,
                               group_size=self.group_size, sym=self.sym)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The float weight [out, in]: scales * (codes - zeros), computed in fp32 then cast.

        Same numbers as ``QuantizedWeight.dequantize``, broadcast per group instead of repeated.
        """
        return triton_dequant.dequantize_stored(self.qweight, self.scales, self.zeros, self.bits, self.sym,
                                                dtype or self.dtype, K=self.in_features)

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
        if not x.dtype.is_floating_point:   # the weight would be dequantized to integers: zeros
            raise TypeError(f"QuantLinear takes floating-point activations, got {x.dtype}")
        if self.uses_kernel(x):
            rows = x.numel() // self.in_features
            gemv = self.gemv and 0 < rows <= triton_dequant.GEMV_MAX_ROWS
            return triton_dequant.dequant_matmul(x, self.qweight, self.scales, self.zeros, self.bits,
                                                 self.group_size, self.sym, self.bias,
                                                 kernel="gemv" if gemv else None,
                                                 split_nibbles=self.split_nibbles, fast_convert=self.fast_convert)
        return F.linear(x, self.dequantize(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    # The state dict carries the format beside the buffers: a 4-bit symmetric and a 4-bit asymmetric
    # layer store tensors of the same shapes and dtypes whose codes mean different numbers, so
    # loading one into the other would give a silently wrong layer.
    def _format(self) -> dict:
        return {"bits": self.bits, "group_size": self.group_size, "sym": self.sym,
                "in_features": self.in_features, "out_features": self.out_features,
                "scale_dtype": str(self.scales.dtype).removeprefix("torch.")}

    def get_extra_state(self) -> dict:
        return self._format()

    def set_extra_state(self, state) -> None:       # checked in _load_from_state_dict, before any copy
        pass

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        given = state_dict.get(prefix + "_extra_state")
        if given is None:
            # without the format the codes cannot be read: refuse even when strict=False
            if any(k.startswith(prefix) for k in state_dict):
                error_msgs.append(f"{prefix.rstrip('.') or 'QuantLinear'}: the state has no quantization format "
                                  f"({prefix}_extra_state); it was not saved from a QuantLinear")
                return
        elif given != self._format():
            diff = {k: (v, given.get(k) if isinstance(given, dict) else None)
                    for k, v in self._format().items() if not isinstance(given, dict) or given.get(k) != v}
            error_msgs.append(f"{prefix.rstrip('.') or 'QuantLinear'}: the state was saved in another quantization "
                              f"format: " + ", ".join(f"{k} {b!r} here, {a!r} in the state"
                                                      for k, (b, a) in diff.items()))
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        g = "per channel" if self.group_size == self.in_features else f"group_size={self.group_size}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"{g}, sym={self.sym}")


def _skipped(name: str, skip) -> bool:
    """Whether ``skip`` names this module or a module it lies in: each entry is one part of a
    name ("lm_head", "mlp") or several in a row ("layers.0.mlp", "mlp.down_proj",
    "layers.0.mlp.down_proj"), matched against whole parts of the module's dotted name."""
    return any(_runs_in(s.split("."), name.split(".")) for s in skip)


def _runs_in(run: list[str], parts: list[str]) -> bool:
    """Whether ``run`` appears as consecutive items of ``parts``."""
    n = len(run)
    return any(parts[i:i + n] == run for i in range(len(parts) - n + 1))


def linear_targets(model: nn.Module, skip) -> list[tuple[str, nn.Linear]]:
    """(name, module) of every ``nn.Linear`` of ``model`` whose name has no ``skip`` part."""
    if isinstance(skip, str) or not all(isinstance(s, str) for s in skip):
        # a bare string would be read letter by letter as substrings of every name
        raise TypeError(f"skip must be a tuple or list of module names or name parts, got {skip!r}")
    # a skip entry that names no module skipped nothing, unseen (a typo, or "layers.1.mlp" when
    # only whole names matched): every layer was quantized. "lm_head", the default, may be absent.
    names = [name for name, _ in model.named_modules() if name]
    unknown = [s for s in skip if s != "lm_head" and not any(_skipped(n, [s]) for n in names)]
    if unknown:
        example = f" (e.g. {names[-1]!r})" if names else " (it has no submodules)"
        raise ValueError(f"skip entries {unknown} name no module of {type(model).__name__}{example}; "
                         f"give name parts like 'lm_head' or 'layers.0.mlp'")
    # bitsandbytes' modules subclass nn.Linear: their int8/NF4 codes are not float weights to quantize
    targets = [(name, mod) for name, mod in model.named_modules()
               if isinstance(mod, nn.Linear) and not _skipped(name, skip)
               and not type(mod).__module__.startswith("bitsandbytes")]
    if not targets:
        done = [n for n, m in model.named_modules()
                if isinstance(m, QuantLinear) or type(m).__module__.startswith("bitsandbytes")]
        if done:
            raise ValueError(f"{type(model).__name__} is already quantized ({len(done)} quantized linears, "
                             f"{done[0]} first); no float nn.Linear is left to quantize (skip={skip})")
        raise ValueError(f"no nn.Linear to quantize in {type(model).__name__} (skip={skip})")
    return targets


def swap_modules(model: nn.Module, new: dict[str, nn.Module]) -> None:
    """Put each new module in place of the one at its name (called once all were built), in the
    old one's mode: a module is built in training mode, and bitsandbytes' Linear8bitLt in training
    mode skips LLM.int8()'s outlier split on a CPU (an eval model held it so, threshold ignored)."""
    for name, q in new.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        q.train(getattr(parent, child).training)
        setattr(parent, child, q)


class _Default:                    # marks an argument the caller left out (None means per channel)
    def __repr__(self):
        return "default"


DEFAULT = _Default()


def _check_packable(targets, bits: int) -> None:
    for name, mod in targets:
        if bits == 4 and mod.in_features % 2:
            raise ValueError(f"cannot quantize {name}: 4-bit packing needs an even in_features, "
                             f"got {mod.in_features}")


def _calibrated_config(method: str, config, bits, group_size, sym, kwargs):
    """GPTQConfig / AWQConfig from ``config``, or from bits/group_size/sym and field-name kwargs."""
    from .awq import AWQConfig
    from .gptq import GPTQConfig
    cls = GPTQConfig if method == "gptq" else AWQConfig
    given = {k: v for k, v in dict(bits=bits, group_size=group_size, sym=sym).items() if v is not DEFAULT}
    if config is not None:
        if not isinstance(config, cls):
            raise ValueError(f"method={method!r} takes a {cls.__name__}, got {type(config).__name__}")
        if given or kwargs:
            raise ValueError(f"pass either config or {sorted({**given, **kwargs})}, not both")
        return config
    if "group_size" in given and given["group_size"] is None:
        given["group_size"] = -1
    if method == "awq":                                   # AutoAWQ's names for the same things
        given = {{"bits": "w_bit", "group_size": "q_group_size"}.get(k, k): v for k, v in given.items()}
        if "sym" in given:
            given["zero_point"] = not given.pop("sym")
    try:
        return cls(**given, **kwargs)
    except TypeError as e:
        raise ValueError(f"bad {cls.__name__} field: {e}") from None


def _quantize_calibrated(model, method, config, calibration, skip, progress, scale_dtype) -> nn.Module:
    """GPTQ or AWQ on a Llama-family model, then QuantLinear swapped in for the decoder linears."""
    from .awq import awq_quantize_model
    from .calibration import as_calibration_ids
    from .gptq import gptq_quantize_model
    if not hasattr(getattr(model, "model", None), "layers"):
        raise ValueError(f"method={method!r} needs a Llama-family model (model.model.layers), "
                         f"got {type(model).__name__}")
    bits = config.bits if method == "gptq" else config.w_bit
    _check_packable(linear_targets(model, skip), bits)
    ids = as_calibration_ids(calibration)
    run = gptq_quantize_model if method == "gptq" else awq_quantize_model
    def check(name, qw):          # called inside the run, so a refusal also undoes AWQ's folding
        try:
            qw.stored_scales(scale_dtype)
        except ValueError as e:
            raise ValueError(f"cannot quantize {name}: {e}") from None

    # apply=False: GPTQ puts the float weights back; AWQ leaves its scales folded into the model
    # (the same function) and returns the codes of the folded, clipped weights. Skipped linears stay
    # float during the run too, and the codes are chosen against scales as scale_dtype stores them.
    result = run(model, ids, config, progress=progress, apply=False, check=check, skip=skip,
                 scale_dtype=scale_dtype)
    new = {name: QuantLinear.from_linear(model.get_submodule(name), qw, scale_dtype=scale_dtype)
           .to(model.get_submodule(name).weight.device)
           for name, qw in result.items()}
    swap_modules(model, new)
    return model


@torch.no_grad()
def quantize(model: nn.Module, method: str = "rtn", bits=DEFAULT, group_size=DEFAULT, sym=DEFAULT,
             skip=("lm_head",), progress: bool = True, scale_dtype: torch.dtype = torch.float16,
             config=None, calibration=None, **kwargs) -> nn.Module:
    """Quantize the linears of ``model`` in place with ``method`` and return the model.

    Args:
        method: "rtn" (round to nearest), "gptq", "awq" (weights fitted on ``calibration``; both
            swap in ``QuantLinear``), "bnb_int8" (LLM.int8()) or "bnb_nf4" (bitsandbytes' modules).
        bits, group_size, sym: rtn defaults 4, 128, False (group_size None or -1 = per output
            channel). For gptq/awq they fill the config (defaults: GPTQConfig's, AWQConfig's);
            bitsandbytes takes none of them.
        skip: modules left in float, by a part of their name ("lm_head", "mlp") or a dotted tail of
            it ("layers.0.mlp.down_proj"); gptq/awq quantize the decoder layers only, and keep the
            skipped ones float while calibrating (the later layers see what the final model computes).
        config: a GPTQConfig / AWQConfig; or pass its fields as keyword arguments
            (``damp_percent=0.1``, ``desc_act=True``, ``w_bit=3``, ...). bnb: ``threshold``,
            ``compute_dtype``.
        calibration: token ids [n_seq, seq_len] or a list of 1-D tensors (cut to the shortest);
            default: the embedded calibration slice (8 seeded random windows of 128 tokens across
            it, ``calibration.embedded_calibration``; for the embedded models).
        scale_dtype: storage of the scales and zero points (rtn, gptq, awq); the codes are chosen
            against the scales rounded up to it. fp16 cannot hold scales of very large weights, nor
            (within the half-step bound) the subnormal scales of very small ones, under 6.1e-5: that
            raises a ValueError; use torch.float32.
    Every check runs before anything changes: on any error (bad bits, a group size that does not
    divide a layer, NaN/inf weights, scales that do not fit scale_dtype, an empty or too short
    calibration set) the model is left untouched, and every new module is built before the first
    is swapped in.
    """
    from .bnb import BNB_METHODS, bnb_quantize
    if method not in METHODS:
        raise ValueError(f"quantize supports method in {METHODS}, got {method!r}")
    if sym is not DEFAULT:
        check_bool("sym", sym)
    if method in ("rtn", "gptq", "awq"):
        check_scale_dtype(scale_dtype)
    if method != "rtn":       # rtn may quantize what an earlier pass skipped; the others need float layers
        check_float_model(model, f"quantize(method={method!r})")
    if method in ("gptq", "awq"):
        cfg = _calibrated_config(method, config, bits, group_size, sym, kwargs)
        return _quantize_calibrated(model, method, cfg, calibration, skip, progress, scale_dtype)
    if config is not None or calibration is not None:
        raise ValueError(f"method={method!r} takes no config or calibration data")
    if method in BNB_METHODS:
        if any(v is not DEFAULT for v in (bits, group_size, sym)):
            raise ValueError(f"{method} has fixed formats; bits/group_size/sym do not apply")
        return bnb_quantize(model, method, skip=skip, progress=progress, **kwargs)
    if kwargs:
        raise ValueError(f"rtn takes no {sorted(kwargs)}")
    bits = 4 if bits is DEFAULT else bits
    group_size = 128 if group_size is DEFAULT else group_size
    sym = False if sym is DEFAULT else sym
    targets = linear_targets(model, skip)
    _check_packable(targets, bits)
    new = {}                                                 # quantize all first, swap after
    for name, mod in tqdm(targets, desc=f"quantize {method} int{bits}", disable=not progress):
        try:
            qw = quantize_rtn(mod.weight, bits=bits, group_size=group_size, sym=sym, scale_dtype=scale_dtype)
            new[name] = QuantLinear.from_linear(mod, qw, scale_dtype=scale_dtype).to(mod.weight.device)
        except ValueError as e:
            raise ValueError(f"cannot quantize {name}: {e}") from None
    swap_modules(model, new)
    return model
