"""The document's quantization table rebuilt from measurement.

``memory_table`` measures the bytes each quantized model really stores (codes, scales, zeros)
against bf16 and the document's 16/bits; ``rebuilt_table`` sets speed (``speed``), quality
(``quality``) and memory beside the document's rows, and ``findings`` says it in Markdown bullets.
"""
from __future__ import annotations

import copy

import torch

from .. import formulas, measure
from .quant_spec import LIBRARY_SPECS, NotMeasured, QuantSpec, quantized_copy
from .speed import crossover_batch

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
        lines.append(f"* **{m['label']}** stores {m['bits_per_weight']:.2f} bits per weight, not the "
                     f"{m['formula_bits_per_weight']:.2f} of the formula: its storage does not shrink as the "
                     f"bits do.")
    return "\n".join(lines)
