"""Quality of quantized models: held-out perplexity of RTN, GPTQ and AWQ against fp32.

How big a run is (``QuantRunSizes``, ``run_sizes``), the calibration and evaluation token ids, the
perplexity table with paired standard errors (``perplexity_table``, ``verdict``), GPTQ's and AWQ's
gain over round-to-nearest (``method_gains``), the calibration study (how many sequences, which
text) and their plots. Nothing here prints; every function returns rows.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..checks import is_real
from ..corpus import read_slice
from ..evaluate import encode, perplexity
from .quant_spec import DEFAULT_SPECS, FULL_SPECS, LIBRARY_SPECS, NotMeasured, QuantSpec, quantized_copy

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


# Calibration texts: the training distribution, then farther and farther from it. The Folio text is
# not unseen: it is Macbeth, a training play, in First Folio spelling and typography.
CALIBRATION_SOURCES = {
    "calibration": "Shakespeare, modern spelling (the training distribution)",
    "calibration_folio": "Macbeth, a training play, in First Folio spelling (same text, shifted spelling)",
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


def method_gains(rows: list[dict], group_size: int = 128) -> list[dict]:
    """At each bit width, how much of round-to-nearest's perplexity increase GPTQ and AWQ remove,
    each against RTN on its own grid: GPTQ (the document's ``sym=True``) against symmetric RTN, AWQ
    (``zero_point=True``) against zero-point RTN. GPTQ's symmetric grid (AutoGPTQ's) has 2^b codes,
    symmetric RTN's 2^b - 1: part of GPTQ's gain at 2-3 bits is that code. Rows: bits, method,
    delta_pct, rtn_delta_pct, beyond_noise (the two differ by more than 2 combined standard errors)."""
    by = {(r["method"], r["bits"], r["group_size"]): r for r in rows
          if r.get("perplexity") is not None and r["calibration"] == "calibration"}
    out = []
    for (method, bits, g), r in sorted(by.items(), key=lambda kv: (-kv[0][1], kv[0][0])):
        rtn = by.get(("rtn_sym" if method == "gptq" else "rtn", bits, g))
        if method not in ("gptq", "awq") or g != group_size or rtn is None:
            continue
        se = math.hypot(r["delta_se_pct"], rtn["delta_se_pct"])
        # one window has no standard error (NaN): "beyond noise" is then unknown, not False
        beyond = abs(r["delta_pct"] - rtn["delta_pct"]) > 2 * se if math.isfinite(se) else None
        out.append({"bits": bits, "method": method, "rtn": rtn["label"], "delta_pct": r["delta_pct"],
                    "rtn_delta_pct": rtn["delta_pct"], "beyond_noise": beyond})
    return out


def verdict(row: dict, sigmas: float = 2.0) -> str:
    """"within noise", "worse" or "better" than fp32: the perplexity change against ``sigmas``
    standard errors of its per-window changes; "no error bar" from a single window (its standard
    error is NaN, and a NaN compared as "within noise" whatever the change)."""
    if not is_real(sigmas) or not 0 < sigmas < math.inf:
        raise ValueError(f"sigmas must be a finite number > 0, got {sigmas!r}")
    if row.get("perplexity") is None:
        return "not measured"
    delta, se = row["delta_pct"], row["delta_se_pct"]
    if delta is None or not math.isfinite(delta):
        raise ValueError(f"row {row.get('label', '')!r} has a perplexity but a change of {delta!r}")
    if se is None or not math.isfinite(se):
        return "no error bar (one window)"
    if not abs(delta) > sigmas * se:
        return "within noise"
    return "worse" if row["delta_pct"] > 0 else "better"
