"""Measuring weight quantization: error against the bound, perplexity, bytes and speed.

Each function runs one measurement of notebook ``01_quantization`` and returns plain data (dicts and
lists of rows); nothing here prints. Speed (weight-only quantized matmuls against float ones, decode
against prefill), quality (perplexity on held-out text of RTN, GPTQ and AWQ; Frantar et al. 2022,
Lin et al. 2023) and memory (the bytes a quantized model really stores) are set against the source
document's table and its error bound (``formulas.quant_error_bound_*``).

Speed: weight-only quantization pays off where decoding is memory-bound. At small batches each
token reads every weight once, so 4 bits instead of 16 can cut the time of the linear layers by up
to 4x on a GPU, with a kernel that reads the codes directly (``triton_dequant``). On a CPU our
PyTorch path dequantizes the whole weight first and is slower than float; both are measured.
"""
from __future__ import annotations

import copy
import math
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import formulas, measure
from ..corpus import read_slice
from ..evaluate import encode, perplexity
from ..presets import get_preset
from .awq import AWQConfig, awq_quantize_model
from .gptq import GPTQConfig, gptq_quantize_model
from .quant_linear import quantize
from .rtn import quantize_rtn

FLOAT = "float"
METHODS = (FLOAT, "int8", "int4")       # our weight-only formats; bnb_* where bitsandbytes is importable


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
        lin = nn.Linear(in_f, out_f, bias=False)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(out_f, in_f, generator=g) * in_f ** -0.5)
        if method == FLOAT:
            mods.append(lin.to(device=device, dtype=dtype))
        elif method in ("int4", "int8"):
            bits = 4 if method == "int4" else 8
            gs = group_size if bits == 4 and in_f % group_size == 0 else None     # int8: per channel
            qw = quantize_rtn(lin.weight, bits=bits, group_size=gs, sym=bits == 8)
            mods.append(QuantLinear(qw, dtype=dtype).to(device))
        elif method in ("bnb_int8", "bnb_nf4"):
            from .bnb import bnb_linear
            mods.append(bnb_linear(lin.to(dtype), method, device))
        else:
            raise ValueError(f"unknown method {method!r}; one of {METHODS + ('bnb_int8', 'bnb_nf4')}")
    return mods


def _timed_layer(mods, xs, device, repeats: int, calls: int, graph: bool = True):
    """Median seconds of running every module once (inputs pre-made); on CUDA (with ``graph``),
    ``calls`` layer passes are captured in one CUDA graph so Python launch overhead is not what
    gets measured."""
    def layer():
        for m, x in zip(mods, xs):
            m(x)
    if device.type == "cuda" and graph:
        layer()                                          # compile/warm outside the graph
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                for _ in range(calls):
                    layer()
            return measure.time_fn(graph.replay, warmup=2, repeats=repeats, device=device).median / calls
        except Exception:                                # a module that cannot be captured: eager
            pass
    return measure.time_fn(layer, warmup=1, repeats=repeats, device=device).median


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
        ms = {m: 1e3 * _timed_layer(mods[m], xs, device, repeats, calls, graph=not m.startswith("bnb"))
              for m in methods}
        for m in methods:
            nbytes = sum(measure.module_bytes(x) for x in mods[m])
            rows.append({"batch": b, "method": m, "ms": ms[m], "ratio": ms[FLOAT] / ms[m],
                         "weight_bytes": nbytes, "gb_s": nbytes / (ms[m] * 1e-3) / 1e9})
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


# ---------------------------------------------------------------------------------------------
# Quality and memory: error against the bound, perplexity, calibration, bytes (notebook 01)

@dataclass(frozen=True)
class QuantRunSizes:
    """How big the quality runs are: CI's quick run on 2 CPU cores, or a full run."""
    full: bool
    eval_windows: int                   # held-out windows of eval_window tokens for perplexity
    eval_window: int
    calibration_seqs: int               # GPTQ/AWQ calibration sequences in the perplexity table
    calibration_len: int
    calibration_counts: tuple           # the calibration study's numbers of sequences
    calibration_sources: tuple          # the study's texts (CALIBRATION_SOURCES keys)
    study_bits: int
    per_channel_gptq_awq: bool          # GPTQ/AWQ per channel too (four more runs)
    speed_batches: tuple                # linear_speed's batch sizes
    model_speed_batches: tuple          # decode_prefill_speed's batch sizes (whole model)

    def __post_init__(self):
        if min(self.eval_windows, self.eval_window, self.calibration_seqs, self.calibration_len) < 1:
            raise ValueError("every size must be >= 1")
        unknown = set(self.calibration_sources) - set(CALIBRATION_SOURCES)
        if unknown:
            raise ValueError(f"unknown calibration sources {sorted(unknown)}; known: {CALIBRATION_SOURCES}")


def run_sizes(full: bool | None = None) -> QuantRunSizes:
    """Quick (CI: the notebook in about a minute on 2 idle CPU cores) or full sizes.

    ``full=None`` reads ``LLMOPS_LAB_FULL`` ("1" full, "0" quick); unset, a run is full on CUDA.
    """
    if full is None:
        env = os.environ.get("LLMOPS_LAB_FULL")
        full = torch.cuda.is_available() if env is None else env == "1"
    if full:
        return QuantRunSizes(True, 32, 512, 128, 256, (8, 32, 128), tuple(CALIBRATION_SOURCES), 3, True,
                             (1, 2, 4, 8, 16, 32, 64, 128, 256), (1, 8, 32))
    return QuantRunSizes(False, 8, 256, 4, 128, (4, 16), tuple(CALIBRATION_SOURCES), 3, False,
                         (1, 4, 16, 64), (1,))


def error_histogram(weight: torch.Tensor, bits: int, group_size: int | None = 128, sym: bool = False,
                    bins: int = 40) -> dict:
    """Round-to-nearest errors of ``weight`` [O, I] in units of each weight's own group bound.

    ratio_document = |w - q(w)| / ((w_max - w_min) / (2^(b+1) - 2)) with the group's min and max
    (the document's bound, ``formulas.quant_error_bound_asymmetric``); ratio_scheme = the same error
    over the bound the scheme itself guarantees (``check_error_bound``'s derived bound: the range
    widened to contain 0 for a zero point, absmax / (2^b - 2) for symmetric). A ratio above 1 breaks
    that bound. Returns both histograms on shared edges, the fractions above 1 and the max ratios.
    """
    qw = quantize_rtn(weight, bits=bits, group_size=group_size, sym=sym)
    g = qw.group_size
    x = weight.detach().double().reshape(weight.shape[0], -1, g)                      # [O, G, g]
    err = (x - qw.dequantize(torch.float64).reshape(x.shape)).abs()
    lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    per_unit = formulas.quant_error_bound_asymmetric(0.0, 1.0, bits)
    document = per_unit * (hi - lo)
    scheme = (formulas.quant_error_bound_symmetric(1.0, bits) * torch.maximum(lo.abs(), hi.abs()) if sym
              else per_unit * (hi.clamp(min=0) - lo.clamp(max=0)))
    tiny = torch.finfo(torch.float64).tiny
    r_doc, r_scheme = (err / document.clamp(min=tiny)).flatten(), (err / scheme.clamp(min=tiny)).flatten()
    top = max(1.25, float(r_doc.max()) * 1.02)
    edges = torch.linspace(0, top, bins + 1, dtype=torch.float64)
    # float32 storage of the weight costs a few ulps: above 1 by less than 1e-5 is not a violation
    return {"bits": bits, "group_size": g, "sym": sym, "edges": edges.tolist(),
            "document_counts": torch.histogram(r_doc, edges).hist.tolist(),
            "scheme_counts": torch.histogram(r_scheme, edges).hist.tolist(),
            "document_fraction_above": float((r_doc > 1 + 1e-5).double().mean()),
            "scheme_fraction_above": float((r_scheme > 1 + 1e-5).double().mean()),
            "document_max_ratio": float(r_doc.max()), "scheme_max_ratio": float(r_scheme.max()),
            "max_error": float(err.max())}


def plot_error_histogram(ax, hist: dict):
    """Both histograms of ``error_histogram`` with the bound at 1."""
    edges = hist["edges"]
    for key, label in (("scheme_counts", "error / the scheme's own bound"),
                       ("document_counts", "error / the document's bound")):
        ax.stairs(hist[key], edges, label=label, fill=key == "scheme_counts", alpha=0.6 if key == "scheme_counts" else 1)
    ax.axvline(1.0, color="black", linestyle="--", linewidth=1, label="bound")
    g = hist["group_size"]
    ax.set(xlabel="|w - quantize(w, b)| / bound (per group)", ylabel="weights", yscale="log",
           title=f"{hist['bits']} bits, group {g}, {'symmetric' if hist['sym'] else 'zero point'}: "
                 f"{hist['document_fraction_above']:.1%} above the document's bound")
    ax.legend(fontsize="small")
    return ax


# Calibration texts: the training distribution, then farther and farther from it.
CALIBRATION_SOURCES = {
    "calibration": "Shakespeare, modern spelling (the training distribution)",
    "calibration_folio": "Macbeth in First Folio spelling (same author, shifted spelling)",
    "python_source": "this package's own Python source (code and English docstrings)",
    "random_tokens": "uniformly random token ids (no language at all)",
}


def calibration_ids(tokenizer, source: str, n_seq: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """[n_seq, seq_len] calibration token ids from ``source``, windows at seeded random places
    (GPTQ's own loader samples C4 the same way)."""
    g = torch.Generator().manual_seed(seed)
    if source == "random_tokens":
        return torch.randint(3, tokenizer.vocab_size, (n_seq, seq_len), generator=g)
    if source == "python_source":
        root = Path(__file__).resolve().parent.parent
        text = "\n\n".join(p.read_text() for p in sorted(root.rglob("*.py")))
    elif source in CALIBRATION_SOURCES:
        text = read_slice(source)
    else:
        raise ValueError(f"calibration source must be one of {list(CALIBRATION_SOURCES)}, not {source!r}")
    ids = encode(tokenizer, text)
    if len(ids) <= seq_len:
        raise ValueError(f"{source} has {len(ids)} tokens, too few for {seq_len}-token windows")
    starts = torch.randint(0, len(ids) - seq_len, (n_seq,), generator=g).tolist()
    return torch.stack([ids[s: s + seq_len] for s in starts])


def evaluation_ids(tokenizer, sizes: QuantRunSizes) -> torch.Tensor:
    """The first eval_windows x eval_window (+1) tokens of the held-out validation text."""
    return encode(tokenizer, read_slice("validation"))[: sizes.eval_windows * sizes.eval_window + 1]


@dataclass(frozen=True)
class QuantSpec:
    """One quantized model: method ("fp32", "bf16", "rtn", "rtn_sym", "gptq", "awq" or a method
    of ``quantize``) at bits and group_size (-1 per channel), calibrated on ``calibration``."""
    method: str
    bits: int = 16
    group_size: int = 128
    calibration: str = "calibration"
    n_calibration: int | None = None     # None: the run's calibration_seqs

    @property
    def label(self) -> str:
        if self.method in ("fp32", "bf16"):
            return self.method
        if self.method.startswith("gguf_"):
            return f"GGUF {self.method[5:].upper()} (llama.cpp)"
        g = "per channel" if self.group_size == -1 else f"g{self.group_size}"
        return f"{self.method.upper().replace('_SYM', ' sym')} int{self.bits} {g}"


class NotMeasured(Exception):
    """A method whose library is not importable (or not written yet) here; the reason is the message."""


def quantized_copy(base, spec: QuantSpec, calibration: torch.Tensor | None = None, tokenizer=None):
    """A deep copy of ``base`` quantized as ``spec`` says (GPTQ/AWQ write their dequantized weights
    into the float linears; round-to-nearest swaps in ``QuantLinear``; "gguf_q8_0"/"gguf_q4_0"
    export to a GGUF file and return llama.cpp running it, which needs ``tokenizer``)."""
    from . import quant_linear
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
    if spec.method not in quant_linear.METHODS:
        raise NotMeasured(f"quantize() has no method {spec.method!r} in this checkout")
    try:
        return quantize(model, spec.method, progress=False)          # bitsandbytes: fixed formats
    except (ImportError, RuntimeError, NotImplementedError, ValueError) as err:
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


def perplexity_table(base, tokenizer, sizes: QuantRunSizes, specs=None, progress: bool = True,
                     reuse: list[dict] | None = None) -> list[dict]:
    """Held-out perplexity of ``base`` quantized each way in ``specs`` (default: fp32, bf16, RTN,
    GPTQ, AWQ at 8/4/3 bits, group 128 and per channel, and bitsandbytes where it runs).

    Returns one row per spec: label, method, bits, group_size, calibration, n_calibration,
    perplexity (None when not measured), delta_pct against fp32 with ``delta_se_pct`` (the standard
    error of the per-window change, paired on the same windows: a delta within 2 of them is noise),
    seconds (quantizing), and ``not_measured`` (the reason, or None). Rows of ``reuse`` with the
    same spec are not rerun.
    """
    if specs is None:
        specs = DEFAULT_SPECS + (FULL_SPECS if sizes.per_channel_gptq_awq else ()) + LIBRARY_SPECS
    ids = evaluation_ids(tokenizer, sizes)
    done = {r["spec"]: r for r in reuse or ()}
    rows = []
    for spec in tqdm(specs, desc="perplexity", disable=not progress):
        if spec.n_calibration is None:
            spec = replace(spec, n_calibration=sizes.calibration_seqs)
        if spec in done:
            rows.append(done[spec])
            continue
        row = {"spec": spec, "label": spec.label, "method": spec.method, "bits": spec.bits,
               "group_size": spec.group_size, "calibration": spec.calibration,
               "n_calibration": spec.n_calibration, "perplexity": None, "not_measured": None, "seconds": 0.0}
        cal = (calibration_ids(tokenizer, spec.calibration, spec.n_calibration, sizes.calibration_len)
               if spec.method in ("gptq", "awq") else None)
        start = time.perf_counter()
        try:
            model = quantized_copy(base, spec, cal, tokenizer)
        except NotMeasured as err:
            row["not_measured"] = str(err)
        else:
            row["seconds"] = time.perf_counter() - start
            row["window_nll"] = window_nll(model, ids, sizes.eval_window)
            row["perplexity"] = math.exp(sum(row["window_nll"]) / len(row["window_nll"]))
            if hasattr(model, "close"):                     # llama.cpp frees its context
                model.close()
            del model
        rows.append(row)
    ref = next((r for r in rows if r["method"] == "fp32"), None)
    ref_nll = ref["window_nll"] if ref else window_nll(base, ids, sizes.eval_window)
    for r in rows:
        r["delta_pct"] = r["delta_se_pct"] = None
        if r["perplexity"] is not None:
            d = torch.tensor(r["window_nll"]) - torch.tensor(ref_nll)
            r["delta_pct"] = 100 * math.expm1(float(d.mean()))
            r["delta_se_pct"] = 100 * float(d.std() / len(d) ** 0.5) if len(d) > 1 else float("nan")
    return rows


def window_nll(model, ids: torch.Tensor, window: int) -> list[float]:
    """Mean next-token cross-entropy (nats) of each consecutive ``window`` of ``ids``, scored alone."""
    n = (len(ids) - 1) // window
    return [math.log(perplexity(model, ids[i * window: (i + 1) * window + 1], window=window)) for i in range(n)]


def plot_perplexity_vs_bits(ax, rows: list[dict], group_size: int = 128):
    """Perplexity against bits, one line per method at ``group_size``, fp32 and bf16 as lines."""
    for method in ("rtn", "rtn_sym", "gptq", "awq"):
        pts = sorted((r["bits"], r["perplexity"]) for r in rows if r["method"] == method
                     and r["perplexity"] is not None and (r["group_size"] == group_size or r["bits"] == 8))
        if pts:
            ax.plot(*zip(*pts), "o-", label={"rtn": "RTN zero point", "rtn_sym": "RTN symmetric"}.get(method, method.upper()))
    for r in rows:
        if r["method"] in ("fp32", "bf16") and r["perplexity"] is not None:
            ax.axhline(r["perplexity"], linestyle="--" if r["method"] == "fp32" else ":", color="gray",
                       linewidth=1, label=r["method"])
    ax.set(xlabel="bits per weight", ylabel="held-out perplexity", yscale="log",
           title=f"group {group_size} (int8 per channel)")
    ax.invert_xaxis()
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    return ax


def calibration_study(base, tokenizer, sizes: QuantRunSizes, methods=("gptq", "awq"), bits: int | None = None,
                      group_size: int = 128, progress: bool = True, reuse: list[dict] | None = None) -> list[dict]:
    """GPTQ/AWQ perplexity against the number of calibration sequences (training-distribution text)
    and against the calibration text (each source at the table's ``calibration_seqs``).

    Returns ``perplexity_table`` rows, plus RTN at the same bits (it needs no calibration).
    """
    bits = sizes.study_bits if bits is None else bits
    specs = [QuantSpec("rtn", bits, group_size)]
    for m in methods:
        specs += [QuantSpec(m, bits, group_size, "calibration", n) for n in sizes.calibration_counts]
        specs += [QuantSpec(m, bits, group_size, s, sizes.calibration_seqs)
                  for s in sizes.calibration_sources if s != "calibration"]
    return perplexity_table(base, tokenizer, sizes, [QuantSpec("fp32", 32)] + specs, progress, reuse)


def calibration_spread(study: list[dict]) -> list[dict]:
    """Per calibrated method: the lowest and highest perplexity change across the calibration texts
    (at one count) and across the counts (on the training text). Rows: method, across, low, high
    (each {"delta_pct", "calibration", "n_calibration"})."""
    out = []
    for method in sorted({r["method"] for r in study if r["method"] in ("gptq", "awq")}):
        mine = [r for r in study if r["method"] == method and r["perplexity"] is not None]
        n_text = max((r["n_calibration"] for r in mine if r["calibration"] != "calibration"), default=None)
        groups = {"texts": [r for r in mine if r["n_calibration"] == n_text],
                  "counts": [r for r in mine if r["calibration"] == "calibration"]}
        for across, rs in groups.items():
            if len(rs) > 1:
                lo, hi = min(rs, key=lambda r: r["delta_pct"]), max(rs, key=lambda r: r["delta_pct"])
                pick = lambda r: {k: r[k] for k in ("delta_pct", "calibration", "n_calibration")}
                out.append({"method": method, "across": across, "low": pick(lo), "high": pick(hi)})
    return out


def _linear_bytes(model) -> tuple[int, int]:
    """(bytes, weights) of the decoder's linear layers, measured from what each module stores (its
    state dict: codes + scales + zeros for a QuantLinear, bitsandbytes' quantization state)."""
    from .bnb import module_nbytes
    nbytes = weights = 0
    for name, mod in model.named_modules():
        if name.startswith("model.layers.") and hasattr(mod, "in_features") and hasattr(mod, "out_features"):
            nbytes += module_nbytes(mod)
            weights += mod.in_features * mod.out_features
    return nbytes, weights


def _formula_bits_per_weight(model, spec: QuantSpec) -> float:
    """b + 32 / group (an fp16 scale and an fp16 zero per group; per channel: group = in_features)."""
    if spec.method in ("fp32", "bf16") or spec.method.startswith("bnb"):
        return float(spec.bits)
    total = weights = 0.0
    for layer in model.model.layers:
        for lin in layer.modules():
            if hasattr(lin, "in_features") and not list(lin.children()):
                g = lin.in_features if spec.group_size == -1 else spec.group_size
                total += formulas.quantized_bits_per_weight(spec.bits, g, 16, 16) * lin.in_features * lin.out_features
                weights += lin.in_features * lin.out_features
    return total / weights


MEMORY_SPECS = (QuantSpec("fp32", 32), QuantSpec("bf16", 16), QuantSpec("rtn", 8, -1), QuantSpec("rtn", 4, 128),
                QuantSpec("rtn", 4, -1), QuantSpec("rtn", 3, 128), QuantSpec("rtn", 2, 128)) + LIBRARY_SPECS


def memory_table(base, specs=MEMORY_SPECS, tokenizer=None) -> list[dict]:
    """Measured bytes of each quantized model and of its decoder linears (with scales and zeros),
    against bf16 (the document's FP16 baseline) and the document's 16/bits reduction.

    Everything but the fp32 row is quantized from a bf16 copy, so embeddings, norms and the LM head
    stay 16-bit as in the document's FP16 baseline. GPTQ and AWQ store the same format as
    round-to-nearest at equal bits and group size, so they take the same bytes. Rows: label, bits,
    group_size, model_bytes, linear_bytes, bits_per_weight (measured), formula_bits_per_weight
    (b + 32/group: fp16 scale and zero), reduction (bf16 linear bytes / these), model_reduction,
    document_reduction, not_measured. GGUF rows (``tokenizer`` needed) give the file's bytes only.
    """
    rows, ref = [], None
    half = copy.deepcopy(base).to(torch.bfloat16)
    for spec in specs:
        row = {"label": spec.label, "method": spec.method, "bits": spec.bits, "group_size": spec.group_size,
               "not_measured": None}
        try:
            src = base if spec.method == "fp32" or spec.method.startswith("gguf_") else half
            model = quantized_copy(src, spec, tokenizer=tokenizer)
        except NotMeasured as err:
            rows.append({**row, "not_measured": str(err)})
            continue
        if spec.method.startswith("gguf_"):                 # a file: every matrix quantized, no linears apart
            model.close()
            rows.append({**row, "model_bytes": model.path.stat().st_size, "formula_bits_per_weight": None,
                         "linear_bytes": None, "bits_per_weight": None})
            continue
        lin, n = _linear_bytes(model)
        row.update(model_bytes=measure.module_bytes(model), linear_bytes=lin, bits_per_weight=8 * lin / n,
                   formula_bits_per_weight=_formula_bits_per_weight(model, spec))
        if spec.method == "bf16":
            ref = row
        rows.append(row)
    for r in rows:
        if r["not_measured"] is None and ref is not None:
            r["reduction"] = ref["linear_bytes"] / r["linear_bytes"] if r["linear_bytes"] else None
            r["model_reduction"] = ref["model_bytes"] / r["model_bytes"]
        r["document_reduction"] = (formulas.memory_reduction(16, r["bits"])
                                   if r["bits"] in (16, 8, 4) and not r["method"].startswith("gguf_") else None)
    return rows


def crossover_batch(rows: list[dict], method: str) -> dict:
    """From ``linear_speed`` rows: does ``method`` beat float at the smallest batch, and from which
    batch on is it no faster (ratio < 1)? {"ratio_at_smallest", "pays_at_smallest", "crossover_batch"
    (None: still faster at the largest batch measured; the smallest batch when it never pays)}."""
    pts = sorted((r["batch"], r["ratio"]) for r in rows if r["method"] == method)
    if not pts:
        raise ValueError(f"no rows for method {method!r}")
    cross = next((b for b, ratio in pts if ratio < 1), None)
    return {"ratio_at_smallest": pts[0][1], "pays_at_smallest": pts[0][1] >= 1, "crossover_batch": cross}


def rebuilt_table(ppl_rows: list[dict], memory_rows: list[dict], decode_rows: list[dict],
                  linear_rows: list[dict]) -> list[dict]:
    """The document's quantization table rebuilt from measurement, row by row beside its own.

    Speedup: ``decode_prefill_speed``'s decode ratio at batch 1 (labels "int8", "int4"; GPTQ and AWQ
    store the int4 format, so they decode at its speed); quality: the perplexity change of RTN int8,
    GPTQ int4 and AWQ int4 at group 128; memory: bf16 linear bytes / quantized; crossover: the
    batch from which ``linear_speed``'s quantized linears are no faster than float. The GGUF row
    becomes one row per GGUF format measured (quality and the file's bytes against the bf16 model's;
    llama.cpp's speed is ``gguf_comparison``'s measurement). The FP16 row's speed is not measured:
    the speed baseline is the model's own dtype (fp32 on a CPU).
    """
    ppl = {(r["method"], r["bits"], r["group_size"]): r for r in ppl_rows if r["calibration"] == "calibration"}
    mem = {(r["bits"], r["group_size"]): r for r in memory_rows if r["method"] in ("rtn", "bf16")}
    bf16_model = next((r.get("model_bytes") for r in memory_rows if r["method"] == "bf16"), None)
    dec = {r["label"]: r["decode_ratio"] for r in decode_rows if r["batch"] == min(x["batch"] for x in decode_rows)}
    spec = {"FP16 (baseline)": ("bf16", 16, 128, None), "INT8": ("rtn", 8, -1, "int8"),
            "INT4 (GPTQ)": ("gptq", 4, 128, "int4"), "INT4 (AWQ)": ("awq", 4, 128, "int4")}
    rows = []
    for doc in formulas.DOC_QUANT_TABLE:
        row = {"method": doc["method"], "bits": doc["bits"], "doc_speedup": doc["speedup"],
               "doc_quality": doc["quality_impact"], "doc_memory": doc["memory_reduction"]}
        if doc["method"] not in spec:                       # GGUF
            files = {r["method"]: r for r in memory_rows if r["method"].startswith("gguf_")}
            measured = [r for r in ppl_rows if r["method"].startswith("gguf_") and r["perplexity"] is not None]
            for r in measured:
                f = files.get(r["method"], {})
                rows.append({**row, "method": r["label"], "bits": r["bits"], "not_measured": None, "speedup": None,
                             "ppl_delta_pct": r["delta_pct"], "crossover_batch": None, "pays_at_batch_1": None,
                             "memory_reduction": (bf16_model / f["model_bytes"]
                                                  if bf16_model and f.get("model_bytes") else None)})
            if not measured:
                reasons = {r["not_measured"] for r in ppl_rows if r["method"].startswith("gguf_")}
                rows.append({**row, "not_measured": "; ".join(sorted(reasons)) or "no GGUF rows were run"})
            continue
        method, bits, g, fmt = spec[doc["method"]]
        p, m = ppl.get((method, bits, g)), mem.get((bits, g))
        speed = crossover_batch(linear_rows, fmt) if fmt and any(r["method"] == fmt for r in linear_rows) else None
        row.update(not_measured=None,
                   speedup=None if fmt is None else dec.get(fmt),
                   ppl_delta_pct=None if p is None or p["perplexity"] is None else p["delta_pct"],
                   memory_reduction=None if m is None else m["reduction"],
                   crossover_batch=None if speed is None else speed["crossover_batch"],
                   pays_at_batch_1=None if speed is None else speed["pays_at_smallest"])
        rows.append(row)
    return rows


def method_gains(rows: list[dict], group_size: int = 128) -> list[dict]:
    """At each bit width, how much of round-to-nearest's perplexity increase GPTQ and AWQ remove,
    each against RTN on its own grid: GPTQ (the document's ``sym=True``) against symmetric RTN, AWQ
    (``zero_point=True``) against zero-point RTN. Rows: bits, method, delta_pct, rtn_delta_pct,
    beyond_noise (the two differ by more than 2 combined standard errors)."""
    by = {(r["method"], r["bits"], r["group_size"]): r for r in rows
          if r.get("perplexity") is not None and r["calibration"] == "calibration"}
    out = []
    for (method, bits, g), r in sorted(by.items(), key=lambda kv: (-kv[0][1], kv[0][0])):
        rtn = by.get(("rtn_sym" if method == "gptq" else "rtn", bits, g))
        if method not in ("gptq", "awq") or g != group_size or rtn is None:
            continue
        se = math.hypot(r["delta_se_pct"], rtn["delta_se_pct"])
        out.append({"bits": bits, "method": method, "rtn": rtn["label"], "delta_pct": r["delta_pct"],
                    "rtn_delta_pct": rtn["delta_pct"], "beyond_noise": abs(r["delta_pct"] - rtn["delta_pct"]) > 2 * se})
    return out


def verdict(row: dict, sigmas: float = 2.0) -> str:
    """"within noise", "worse" or "better" than fp32: the perplexity change against ``sigmas``
    standard errors of its per-window changes."""
    if row.get("perplexity") is None:
        return "not measured"
    if not abs(row["delta_pct"]) > sigmas * row["delta_se_pct"]:
        return "within noise"
    return "worse" if row["delta_pct"] > 0 else "better"


def findings(rebuilt: list[dict], memory_rows: list[dict]) -> str:
    """Markdown bullets setting each measured column of ``rebuilt_table`` against the document's."""
    lines = []
    for r in rebuilt:
        if r.get("not_measured") or r["method"].startswith("FP16"):
            continue
        speed = ("has no decode speed measured here" if r["speedup"] is None else
                 f"decodes at {r['speedup']:.2f}x the fp32 speed at batch 1 (document: {r['doc_speedup']})")
        cross = ("not timed here" if r["pays_at_batch_1"] is None else
                 "slower than float already at batch 1" if r["pays_at_batch_1"] is False else
                 "still faster at the largest batch measured" if r["crossover_batch"] is None else
                 f"no faster than float from batch {r['crossover_batch']} on")
        quality = ("not measured" if r["ppl_delta_pct"] is None else
                   f"changes perplexity by {r['ppl_delta_pct']:+.2f}% (document: {r['doc_quality']})")
        part = "the file is" if r["method"].startswith("GGUF") else "its linear layers take"
        memory = ("" if r["memory_reduction"] is None else
                  f"; {part} {r['memory_reduction']:.2f}x less memory than bf16 (document: {r['doc_memory']})")
        lines.append(f"* **{r['method']}** {speed}; its linears are {cross}; it {quality}{memory}.")
    packed = [m for m in memory_rows if m.get("not_measured") is None and m["method"] == "rtn"
              and m.get("bits_per_weight") and m["bits_per_weight"] > m["formula_bits_per_weight"] + 1]
    for m in packed:
        lines.append(f"* **{m['label']}** stores {m['bits_per_weight']:.2f} bits per weight, not "
                     f"{m['formula_bits_per_weight']:.2f}: its codes are stored one per byte, so it saves no "
                     f"more memory than int8.")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# llama.cpp as the peer: our weights exported to GGUF

def _common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


@torch.inference_mode()
def gguf_comparison(model_name: str = "target", formats=("F32", "Q8_0", "Q4_0", "Q4_K_M"), out_dir=None,
                    n_prompts: int = 8, new_tokens: int = 32, window: int = 256, max_windows: int = 8,
                    speed_prompt_len: int = 32, speed_new_tokens: int = 64, repeats: int = 3,
                    n_threads: int | None = None) -> list[dict]:
    """Our fp32 runtime against llama.cpp running our weights exported to GGUF at each format.

    Every measurement goes through the same library function for both runtimes: perplexity on the
    held-out slice (``evaluate.perplexity``: same windows), greedy continuations of held-out
    prompts (token ids in, so tokenizers cannot differ), the teacher-forced argmax agreement along
    our continuation (``evaluate.greedy_agreement``) and decode speed (``decode_prefill_speed``).
    "Q4_K_M" is made by llama.cpp's quantizer from the F32 file (``gguf.quants`` cannot encode it).
    n_threads: threads of both runtimes (torch's are set for the call and restored; default torch's
        current count). On shared cores prefer 1: both runtimes' threads spin at barriers and
        crawl when another process holds a core.

    Returns one dict per runtime/format: runtime, format, threads, file_bytes (GGUF size; ours: the
    safetensors file), ppl, ppl_ratio (this / ours), greedy_prefix (mean fraction of the
    continuation identical to ours before the first difference), exact_prompts (continuations
    identical to ours), agreement (argmax agreement along our continuation), prefill_tok_s,
    decode_tok_s, decode_ratio (this / ours: > 1 is faster), tokenization_same.
    """
    import tempfile

    torch_threads = torch.get_num_threads()
    n_threads = n_threads or torch_threads
    torch.set_num_threads(n_threads)
    try:
        return _gguf_comparison(model_name, formats, Path(out_dir or tempfile.mkdtemp(prefix="llmops-gguf-")),
                                n_prompts, new_tokens, window, max_windows, n_threads,
                                dict(batch_sizes=(1,), prompt_len=speed_prompt_len, new_tokens=speed_new_tokens,
                                     repeats=repeats))
    finally:
        torch.set_num_threads(torch_threads)


def _gguf_comparison(model_name, formats, out_dir, n_prompts, new_tokens, window, max_windows, n_threads,
                     speed_kw) -> list[dict]:
    from .. import evaluate
    from ..loader import embedded_model_path, load_model, load_tokenizer
    from .gguf import GGUF_TYPES, export_gguf, requantize
    from .llama_cpp_peer import LlamaCppPeer, compare_tokenization

    model = load_model(model_name, device="cpu")
    tok = load_tokenizer(model_name)
    text = read_slice("validation")
    ids = evaluate.encode(tok, text)
    prompts = evaluate.held_out_prompts(tok, text, n=n_prompts)
    ours_seqs = [model.generate(p[None], max_new_tokens=new_tokens, stop_token_ids=())[0, p.numel():].tolist()
                 for p in prompts]

    def row(runtime, fmt, runner, nbytes, seqs):
        speed = decode_prefill_speed({fmt: lambda: runner}, **speed_kw)[0]
        return {"runtime": runtime, "format": fmt, "threads": n_threads, "file_bytes": nbytes,
                "ppl": evaluate.perplexity(runner, ids, window=window, max_windows=max_windows),
                "greedy_prefix": sum(_common_prefix(a, b) for a, b in zip(seqs, ours_seqs)) / (new_tokens * len(prompts)),
                "exact_prompts": sum(a == b for a, b in zip(seqs, ours_seqs)),
                "agreement": evaluate.greedy_agreement(model, runner, prompts, new_tokens)["alpha"],
                "prefill_tok_s": 1e3 / speed["prefill_ms_per_token"],
                "decode_tok_s": 1e3 / speed["decode_ms_per_token"]}

    weights = embedded_model_path(model_name) / "model.safetensors" if model_name in ("target", "draft") else None
    rows = [row("ours", "fp32", model, weights.stat().st_size if weights else None, ours_seqs)]
    rows[0]["tokenization_same"] = True
    f32 = None
    for fmt in formats:
        path = out_dir / f"{model_name}-{fmt}.gguf"
        if fmt in GGUF_TYPES:
            export_gguf(model, tok, path, fmt)
        else:
            f32 = f32 or export_gguf(model, tok, out_dir / f"{model_name}-F32.gguf", "F32")
            requantize(f32, path, fmt)
        peer = LlamaCppPeer(path, n_threads=n_threads)
        seqs = [peer.generate(p[None], max_new_tokens=new_tokens, stop_token_ids=())[0, p.numel():].tolist()
                for p in prompts]
        r = row("llama.cpp", fmt, peer, path.stat().st_size, seqs)
        r["tokenization_same"] = compare_tokenization(peer, tok, text[:20_000])["same"]
        rows.append(r)
        peer.close()
    for r in rows:
        r["ppl_ratio"] = r["ppl"] / rows[0]["ppl"]
        r["decode_ratio"] = r["decode_tok_s"] / rows[0]["decode_tok_s"]
    return rows
