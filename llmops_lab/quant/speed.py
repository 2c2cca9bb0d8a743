"""Speed of weight-only quantization: quantized linears and whole models against float.

A decoder layer's linear shapes (``layer_shapes``, ``preset_shapes``, ``QUICK_SHAPES``), the same
seeded weights as float or quantized modules (``make_linears``), their time at decode batch sizes
(``linear_speed``, read by ``crossover_batch``) and a model's per-token prefill and decode time
(``decode_prefill_speed``). Nothing here prints; every function returns rows.

Weight-only quantization pays off where decoding is memory-bound. At small batches each
token reads every weight once, so 4 bits instead of 16 can cut the time of the linear layers by up
to 4x on a GPU, with a kernel that reads the codes directly (``triton_dequant``). On a CPU our
PyTorch path dequantizes the whole weight first and is slower than float; both are measured.
"""
from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from .. import measure
from ..presets import get_preset

FLOAT = "float"
METHODS = (FLOAT, "int8", "int4")       # our weight-only formats; bnb_* where bitsandbytes is importable
INT4_SPLIT = "int4_split"               # int4 through the kernel's split-nibble variant: a GPU candidate
INT4_FAST = "int4_gemv_fast"            # int4: split nibbles, bit-arithmetic conversion, GEMV for 1-4 rows
INT8_FAST = "int8_gemv_fast"            # int8: bit-arithmetic conversion, GEMV for 1-4 rows
# GPU candidates: each a QuantLinear of that bit width with these kernel options set. The
# conversion is a suspect at batch 1: the CUDA guide's throughput table puts type conversions at 16
# results per clock per SM on compute capability 8.x/9.0, against 128 for an fp32 multiply-add, so
# one per weight can take longer than reading a 4-bit weight does (fast_convert builds the float
# from bits instead).
CANDIDATES = {INT4_SPLIT: (4, dict(split_nibbles=True)),
              INT4_FAST: (4, dict(split_nibbles=True, fast_convert=True, gemv=True)),
              INT8_FAST: (8, dict(fast_convert=True, gemv=True))}


def layer_shapes(config) -> list[tuple[str, int, int]]:
    """(name, out, in) of the seven linears of one decoder layer of ``config`` (a ModelConfig)."""
    h, d = config.hidden_size, config.head_dim
    q, kv, inter = config.num_attention_heads * d, config.num_key_value_heads * d, config.intermediate_size
    return [("q_proj", q, h), ("k_proj", kv, h), ("v_proj", kv, h), ("o_proj", h, q),
            ("gate_proj", inter, h), ("up_proj", inter, h), ("down_proj", h, inter)]


def preset_shapes(name: str = "llama-2-7b") -> list[tuple[str, int, int]]:
    """Linear shapes of a published model (Llama-2-7B: 4096x4096 x4, 11008x4096 x2, 4096x11008)."""
    return layer_shapes(get_preset(name))


QUICK_SHAPES = [("q_proj", 256, 256), ("o_proj", 256, 256), ("up_proj", 704, 256), ("down_proj", 256, 704)]


def make_linears(method: str, shapes, device, dtype, group_size: int = 128, seed: int = 0) -> list[nn.Module]:
    """One module per shape: float ``nn.Linear`` or its quantized twin (same seeded weights)."""
    from .quant_linear import QuantLinear
    from .rtn import quantize_rtn
    g = torch.Generator().manual_seed(seed)
    mods = []
    for _, out_f, in_f in shapes:
        lin = nn.Linear(in_f, out_f, bias=False).eval()       # inference: a bitsandbytes twin takes its mode
        with torch.no_grad():
            lin.weight.copy_(torch.randn(out_f, in_f, generator=g) * in_f ** -0.5)
        if method == FLOAT:
            mods.append(lin.to(device=device, dtype=dtype))
        elif method in ("int4", "int8") or method in CANDIDATES:
            bits, options = CANDIDATES.get(method, (8 if method == "int8" else 4, {}))
            gs = group_size if bits == 4 and in_f % group_size == 0 else None     # int8: per channel
            qw = quantize_rtn(lin.weight, bits=bits, group_size=gs, sym=bits == 8, scale_dtype=torch.float16)
            mod = QuantLinear(qw, dtype=dtype).to(device)                 # fp16 scales, as chosen
            for k, v in options.items():
                setattr(mod, k, v)
            mods.append(mod)
        elif method in ("bnb_int8", "bnb_nf4"):
            from .bnb import bnb_linear
            mods.append(bnb_linear(lin.to(dtype), method, device))
        else:
            raise ValueError(f"unknown method {method!r}; one of {METHODS + tuple(CANDIDATES) + ('bnb_int8', 'bnb_nf4')}")
    return mods


def time_in_graph(fn, device, repeats: int, calls: int, graph: bool = True):
    """(median seconds per call of ``fn``, whether a CUDA graph timed it). On CUDA (with ``graph``),
    ``calls`` calls are captured in one CUDA graph so Python launch overhead is not what gets
    measured; elsewhere, or where capture fails (with a warning), ``fn`` is timed eagerly."""
    if device.type == "cuda" and graph:
        fn()                                             # compile/warm outside the graph
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                for _ in range(calls):
                    fn()
            return measure.time_fn(graph.replay, warmup=2, repeats=repeats, device=device).median / calls, True
        except Exception as e:                           # a module that cannot be captured: eager, and say so
            warnings.warn(f"CUDA graph capture failed ({type(e).__name__}: {e}); timing eagerly")
            torch.cuda.synchronize()
    return measure.time_fn(fn, warmup=1, repeats=repeats, device=device).median, False


def _timed_layer(mods, xs, device, repeats: int, calls: int, graph: bool = True):
    """(median seconds of running every module once, whether a CUDA graph timed it); inputs pre-made."""
    def layer():
        for m, x in zip(mods, xs):
            m(x)
    return time_in_graph(layer, device, repeats, calls, graph)


@torch.inference_mode()
def linear_speed(batch_sizes=(1, 2, 4, 8, 16, 32, 64), methods=METHODS, shapes=None, device="cpu",
                 dtype: torch.dtype | None = None, group_size: int = 128, repeats: int = 5,
                 calls: int = 10) -> list[dict]:
    """Time of one decoder layer's linears (``shapes``: (name, out, in) list, default Llama-2-7B's)
    at decode, for each batch size and method, against float on the same run.

    Args:
        methods: "float", "int8" (weight-only, per channel), "int4" (group_size, asymmetric), and
            "bnb_int8" / "bnb_nf4" (bitsandbytes' modules, where importable).
        dtype: activation dtype; default bf16 on CUDA, fp32 on CPU.
    Returns one dict per (batch, method): batch, method, ms, ratio (float ms / this ms: > 1 is
    faster), weight_bytes (measured bytes of the modules) and gb_s (weight bytes read per second).
    """
    device = torch.device(device)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    shapes = preset_shapes() if shapes is None else shapes
    methods = tuple(methods)
    if FLOAT not in methods:
        methods = (FLOAT,) + methods
    mods = {m: make_linears(m, shapes, device, dtype, group_size) for m in methods}
    rows = []
    for b in batch_sizes:
        xs = [torch.randn(b, in_f, device=device, dtype=dtype) for _, _, in_f in shapes]
        # bitsandbytes' LLM.int8() picks outlier columns at run time: not capturable, timed eagerly
        timed = {m: _timed_layer(mods[m], xs, device, repeats, calls, graph=not m.startswith("bnb"))
                 for m in methods}
        ms = {m: 1e3 * t for m, (t, _) in timed.items()}
        for m in methods:
            nbytes = sum(measure.module_bytes(x) for x in mods[m])
            rows.append({"batch": b, "method": m, "ms": ms[m], "ratio": ms[FLOAT] / ms[m],
                         "weight_bytes": nbytes, "gb_s": nbytes / (ms[m] * 1e-3) / 1e9,
                         "cuda_graph": timed[m][1]})
    return rows


@torch.inference_mode()
def decode_prefill_speed(model_factory, batch_sizes=(1, 4, 16), prompt_len: int = 32, new_tokens: int = 8,
                         repeats: int = 3, seed: int = 0) -> list[dict]:
    """Per-token time of prefill and of decode for the models ``model_factory`` builds.

    Args:
        model_factory: {label: callable returning a model}, e.g. {"fp32": lambda: load_model("target"),
            "int4": lambda: quantize(load_model("target"), bits=4)}; the first label is the baseline.
    Returns one dict per (label, batch): label, batch, prefill_ms_per_token (prompt_len * batch
    tokens in one forward), decode_ms_per_token (per generated token of the whole batch, i.e. one
    step), and their ratios against the baseline (baseline ms / this ms: > 1 is faster).
    """
    rows, base = [], {}
    for i, (label, make) in enumerate(model_factory.items()):
        model = make()
        dev = model.device
        g = torch.Generator().manual_seed(seed)
        for b in batch_sizes:
            ids = torch.randint(3, model.config.vocab_size, (b, prompt_len), generator=g).to(dev)
            t_pre = measure.time_fn(lambda: model(ids, last_only=True), warmup=1, repeats=repeats, device=dev).median
            t_gen = measure.time_fn(lambda: model.generate(ids, max_new_tokens=new_tokens, stop_token_ids=()),
                                    warmup=1, repeats=repeats, device=dev).median
            pre = t_pre / (b * prompt_len) * 1e3
            dec = max(t_gen - t_pre, 1e-9) / new_tokens * 1e3     # generate = one prefill + new_tokens steps
            if i == 0:
                base[b] = (pre, dec)
            rows.append({"label": label, "batch": b, "prefill_ms_per_token": pre, "decode_ms_per_token": dec,
                         "prefill_ratio": base[b][0] / pre, "decode_ratio": base[b][1] / dec})
    return rows


def crossover_batch(rows: list[dict], method: str) -> dict:
    """From ``linear_speed`` rows: does ``method`` beat float at the smallest batch, and from which
    batch on is it no faster (ratio < 1)? {"ratio_at_smallest", "pays_at_smallest", "crossover_batch"
    (None: still faster at the largest batch measured; the smallest batch when it never pays)}."""
    pts = sorted((r["batch"], r["ratio"]) for r in rows if r["method"] == method)
    if not pts:
        raise ValueError(f"no rows for method {method!r}")
    bad = [(b, ratio) for b, ratio in pts if not isinstance(ratio, (int, float)) or not 0 < ratio < math.inf]
    if bad:             # a NaN ratio read as "slower than float at the smallest batch"
        raise ValueError(f"{method}: speed ratios must be finite and > 0, got (batch, ratio) {bad[:3]}")
    cross = next((b for b, ratio in pts if ratio < 1), None)
    return {"ratio_at_smallest": pts[0][1], "pays_at_smallest": pts[0][1] >= 1, "crossover_batch": cross}
