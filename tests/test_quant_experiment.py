"""The quantization measurements of notebook 01: error histogram, perplexity and memory tables, the rebuilt table."""
import numpy as np
import pytest
import torch

import llmops_lab
from llmops_lab import formulas
from llmops_lab.config import ModelConfig
from llmops_lab.quant import experiment as E

TINY = ModelConfig(vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128)
SIZES = E.QuantRunSizes(False, eval_windows=2, eval_window=32, calibration_seqs=2, calibration_len=16,
                        calibration_counts=(2,), calibration_sources=("calibration", "random_tokens"),
                        study_bits=4, per_channel_gptq_awq=False, speed_batches=(1,),
                        model_speed_batches=(1,))


@pytest.fixture(scope="module")
def tok():
    return llmops_lab.load_tokenizer("target")


@pytest.fixture(scope="module")
def tiny(random_llama):
    return random_llama(TINY)


@pytest.mark.parametrize("bits,group_size", [(4, 32), (3, -1), (2, 8)])
def test_error_histogram_scheme_bound_always_holds(bits, group_size):
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
    for sym in (False, True):
        h = E.error_histogram(w, bits, group_size, sym)
        assert h["scheme_fraction_above"] == 0 and h["scheme_max_ratio"] <= 1 + 1e-5
        assert sum(h["scheme_counts"]) == sum(h["document_counts"]) == w.numel()
        assert len(h["edges"]) == len(h["scheme_counts"]) + 1
    # zero-point groups that straddle 0 (all of them here): the document's bound is the scheme's
    assert E.error_histogram(w, bits, group_size, False)["document_fraction_above"] == 0


def test_error_histogram_symmetric_breaks_the_documents_bound():
    w = torch.linspace(-1.0, 0.1, 64).repeat(4, 1)          # lopsided range: absmax 1, w_max - w_min 1.1
    h = E.error_histogram(w, 4, 32, sym=True)
    assert h["document_fraction_above"] > 0 and h["document_max_ratio"] > 1
    assert h["scheme_fraction_above"] == 0


def test_calibration_ids(tok):
    for source in E.CALIBRATION_SOURCES:
        ids = E.calibration_ids(tok, source, 3, 20, seed=1)
        assert ids.shape == (3, 20) and ids.dtype == torch.long
        assert 0 <= int(ids.min()) and int(ids.max()) < tok.vocab_size
        assert torch.equal(ids, E.calibration_ids(tok, source, 3, 20, seed=1))
    with pytest.raises(ValueError, match="calibration source"):
        E.calibration_ids(tok, "validation", 1, 8)      # the held-out text never calibrates


def test_run_sizes(monkeypatch):
    monkeypatch.setenv("LLMOPS_LAB_FULL", "1")
    assert E.run_sizes().full and E.run_sizes().calibration_counts == (8, 32, 128)
    monkeypatch.setenv("LLMOPS_LAB_FULL", "0")
    assert not E.run_sizes().full
    with pytest.raises(ValueError, match="unknown calibration"):
        E.QuantRunSizes(False, 1, 8, 1, 8, (1,), ("nope",), 4, False, (1,), (1,))


def test_perplexity_table(tiny, tok):
    specs = [E.QuantSpec("fp32", 32), E.QuantSpec("rtn", 8, -1), E.QuantSpec("rtn", 2, 32),
             E.QuantSpec("gptq", 4, 32)]
    rows = E.perplexity_table(tiny, tok, SIZES, specs, progress=False)
    by = {r["label"]: r for r in rows}
    assert by["fp32"]["delta_pct"] == 0 and by["fp32"]["perplexity"] > 1
    assert abs(by["RTN int8 per channel"]["delta_pct"]) < 1
    assert abs(by["RTN int2 g32"]["delta_pct"]) > abs(by["RTN int8 per channel"]["delta_pct"])
    assert by["GPTQ int4 g32"]["perplexity"] is not None and by["GPTQ int4 g32"]["n_calibration"] == 2
    for typo in ("no_such_method", "GPTQ", "rtn4"):     # showed as "not measured" rows, as if a library were missing
        with pytest.raises(ValueError, match="unknown method"):
            E.QuantSpec(typo, 4, 32)
    assert len(by["fp32"]["window_nll"]) == SIZES.eval_windows
    again = E.perplexity_table(tiny, tok, SIZES, specs[:2], progress=False, reuse=rows)
    assert again[1] is rows[1]                          # reused, not rerun
    assert all(torch.equal(a, b) for a, b in zip(tiny.state_dict().values(),
                                                 E.quantized_copy(tiny, E.QuantSpec("fp32", 32)).state_dict().values()))


def test_calibration_study_reuses_rows(tiny, tok):
    rows = E.calibration_study(tiny, tok, SIZES, methods=("awq",), group_size=32, progress=False)
    sources = {(r["method"], r["calibration"]) for r in rows}
    assert {("awq", "calibration"), ("awq", "random_tokens"), ("rtn", "calibration")} <= sources
    assert all(r["perplexity"] is not None for r in rows)


def test_memory_table_is_measured(tiny):
    specs = (E.QuantSpec("fp32", 32), E.QuantSpec("bf16", 16), E.QuantSpec("rtn", 8, -1),
             E.QuantSpec("rtn", 4, 32), E.QuantSpec("rtn", 3, 32))
    by = {r["label"]: r for r in E.memory_table(tiny, specs)}
    assert by["bf16"]["reduction"] == 1 and by["fp32"]["reduction"] == 0.5
    int4 = by["RTN int4 g32"]
    assert int4["bits_per_weight"] == pytest.approx(int4["formula_bits_per_weight"]) == 4 + 32 / 32
    assert int4["document_reduction"] == 4 and int4["reduction"] < 4
    int3 = by["RTN int3 g32"]                            # 3-bit codes packed, 8 to 3 bytes
    assert int3["bits_per_weight"] == pytest.approx(int3["formula_bits_per_weight"]) == 3 + 32 / 32
    assert by["RTN int8 per channel"]["model_bytes"] < by["bf16"]["model_bytes"]


def test_crossover_and_rebuilt_table():
    lin = [{"batch": b, "method": m, "ratio": r} for b, m, r in
           [(1, "int4", 2.0), (8, "int4", 1.2), (64, "int4", 0.8), (1, "int8", 0.5), (8, "int8", 0.7)]]
    assert E.crossover_batch(lin, "int4") == {"ratio_at_smallest": 2.0, "pays_at_smallest": True, "crossover_batch": 64}
    assert E.crossover_batch(lin, "int8")["crossover_batch"] == 1
    ppl = [{"method": m, "bits": b, "group_size": g, "calibration": "calibration", "perplexity": 10.0, "delta_pct": d}
           for m, b, g, d in [("bf16", 16, 128, 0.0), ("rtn", 8, -1, 0.1), ("gptq", 4, 128, 2.0), ("awq", 4, 128, 1.0)]]
    mem = [{"method": m, "bits": b, "group_size": g, "reduction": r}
           for m, b, g, r in [("bf16", 16, 128, 1.0), ("rtn", 8, -1, 1.97), ("rtn", 4, 128, 3.76)]]
    dec = [{"label": "fp32", "batch": 1, "decode_ratio": 1.0}, {"label": "int8", "batch": 1, "decode_ratio": 0.9},
           {"label": "int4", "batch": 1, "decode_ratio": 0.6}]
    rows = {r["method"]: r for r in E.rebuilt_table(ppl, mem, dec, lin)}
    assert len(rows) == len(formulas.DOC_QUANT_TABLE)
    assert rows["INT4 (AWQ)"]["speedup"] == 0.6 and rows["INT4 (AWQ)"]["ppl_delta_pct"] == 1.0
    assert rows["INT4 (GPTQ)"]["memory_reduction"] == 3.76 and rows["INT4 (GPTQ)"]["crossover_batch"] == 64
    assert rows["INT8"]["pays_at_batch_1"] is False and rows["INT8"]["doc_speedup"] == "~1.5x"
    assert rows["GGUF (llama.cpp)"]["not_measured"] and rows["FP16 (baseline)"]["speedup"] is None
    ppl.append({"method": "gguf_q4_0", "label": "GGUF Q4_0 (llama.cpp)", "bits": 4, "group_size": 32,
                "calibration": "calibration", "perplexity": 11.0, "delta_pct": 10.0})
    mem += [{"method": "bf16", "bits": 16, "group_size": 128, "reduction": 1.0, "model_bytes": 1000},
            {"method": "gguf_q4_0", "bits": 4, "group_size": 32, "model_bytes": 400}]
    gguf = E.rebuilt_table(ppl, mem[1:], dec, lin)[-1]
    assert gguf["method"] == "GGUF Q4_0 (llama.cpp)" and gguf["memory_reduction"] == 2.5 and gguf["speedup"] is None
    assert "GGUF Q4_0" in E.findings(E.rebuilt_table(ppl, mem[1:], dec, lin), mem)


def test_weight_only_speedup_formulas():
    peak, bw = 1e12, 1e11
    assert formulas.weight_only_speedup(1, 4, peak, bw) == pytest.approx(4.0)        # memory-bound: 16/4
    assert formulas.weight_only_speedup(10_000, 4, peak, bw) == pytest.approx(1.0)   # compute-bound
    cross = formulas.weight_only_crossover_batch(peak, bw)              # the float linear's ridge
    assert formulas.weight_only_speedup(cross, 4, peak, bw) == pytest.approx(1.0)
    assert formulas.weight_only_speedup(cross / 2, 4, peak, bw) == pytest.approx(2.0)
    assert formulas.weight_only_speedup(cross / 4, 4, peak, bw) == pytest.approx(4.0)   # quantized ridge
    assert formulas.quant_speedup_as_written(8) == 1.5 and formulas.quant_speedup_as_written(4) == 2.5
    with pytest.raises(ValueError):
        formulas.quant_speedup_as_written(3)


def test_gguf_rows_or_reason(tiny, tok):
    """GGUF through llama.cpp where it is installed; otherwise a row that says why not."""
    specs = [E.QuantSpec("fp32", 32), E.QuantSpec("gguf_q8_0", 8, 32)]
    gguf = E.perplexity_table(tiny, tok, SIZES, specs, progress=False)[1]
    from llmops_lab.quant.llama_cpp_peer import llama_cpp_available
    if not llama_cpp_available():
        assert gguf["perplexity"] is None and "llama" in gguf["not_measured"]
        return
    assert abs(gguf["delta_pct"]) < 2                   # Q8_0 of every matrix: close to fp32
    mem = E.memory_table(tiny, (E.QuantSpec("bf16", 16), E.QuantSpec("gguf_q4_0", 4, 32)), tokenizer=tok)
    assert 0 < mem[1]["model_bytes"] < mem[0]["model_bytes"]


def test_method_gains_compare_like_with_like():
    rows = [{"method": m, "bits": 3, "group_size": 128, "calibration": "calibration", "perplexity": 1.0,
             "label": f"{m} int3", "delta_pct": d, "delta_se_pct": 0.1}
            for m, d in [("rtn", 1.0), ("rtn_sym", 5.0), ("gptq", 1.2), ("awq", 0.9)]]
    gains = {g["method"]: g for g in E.method_gains(rows)}
    assert gains["gptq"]["rtn_delta_pct"] == 5.0 and gains["gptq"]["beyond_noise"]      # vs symmetric RTN
    assert gains["awq"]["rtn_delta_pct"] == 1.0 and not gains["awq"]["beyond_noise"]    # vs zero-point RTN
    one_window = [dict(r, delta_se_pct=float("nan")) for r in rows]       # was beyond_noise False always
    assert all(g["beyond_noise"] is None for g in E.method_gains(one_window))


def test_verdict_needs_an_error_bar():
    """A single evaluation window has a NaN standard error: every change, +500% included, read as
    "within noise"; sigmas=-1 called a +0.01% change "worse"."""
    row = {"label": "x", "perplexity": 10.0, "delta_pct": 500.0, "delta_se_pct": 0.5}
    assert E.verdict(row) == "worse" and E.verdict(dict(row, delta_pct=-5.0)) == "better"
    assert E.verdict(dict(row, delta_pct=0.5)) == "within noise"
    assert E.verdict(dict(row, delta_se_pct=float("nan"))) == "no error bar (one window)"
    assert E.verdict({"perplexity": None}) == "not measured"
    for sigmas in (-1, 0, float("nan")):
        with pytest.raises(ValueError, match="sigmas"):
            E.verdict(row, sigmas)
    with pytest.raises(ValueError, match="change"):
        E.verdict(dict(row, delta_pct=float("nan")))


def test_crossover_refuses_ratios_that_are_not_speeds():
    for bad in (float("nan"), -1.0, 0.0):     # NaN read as "slower than float at the smallest batch"
        with pytest.raises(ValueError, match="ratios must be finite"):
            E.crossover_batch([{"batch": 1, "method": "int4", "ratio": bad}], "int4")


def test_error_histogram_refuses_bad_bins():
    w = torch.randn(8, 64)
    for bins in (0, -1, 2.5):
        with pytest.raises(ValueError, match="bins"):
            E.error_histogram(w, 4, 32, bins=bins)


def test_calibration_spread():
    study = [{"method": m, "calibration": c, "n_calibration": n, "perplexity": 1.0, "delta_pct": d}
             for m, c, n, d in [("rtn", "calibration", 4, 0.0), ("gptq", "calibration", 4, 0.1),
                                ("gptq", "calibration", 16, 1.0), ("gptq", "random_tokens", 4, 3.0),
                                ("gptq", "calibration_folio", 4, 2.0)]]
    by = {s["across"]: s for s in E.calibration_spread(study)}
    assert by["texts"]["low"]["delta_pct"] == 0.1 and by["texts"]["high"]["calibration"] == "random_tokens"
    assert by["counts"]["high"]["n_calibration"] == 16


def test_quant_spec_refuses_formats_it_would_mislabel(tiny):
    """QuantSpec("bnb_int8", 4, 32) was labelled "BNB_INT8 int4 g32" but ran int8 per channel,
    bnb_nf4 at g128 ran NF4's blocks of 64; QuantSpec(5) failed later with AttributeError; a NaN
    weight under bitsandbytes became a "not measured" row instead of an error."""
    for bad in (("bnb_int8", 4, 32), ("bnb_nf4", 4, 128), ("bnb_nf4", 8, 64), ("gguf_q4_k_m", 4, 256)):
        with pytest.raises(ValueError, match="bnb_|GGUF"):
            E.QuantSpec(*bad)
    with pytest.raises(TypeError, match="method"):
        E.QuantSpec(5)
    with pytest.raises(TypeError, match="bits"):
        E.QuantSpec("rtn", 4.0)
    assert {s.method for s in E.LIBRARY_SPECS} >= {"bnb_int8", "bnb_nf4"}    # the library rows still build
    from llmops_lab.quant import bnb
    if not bnb.available():
        return
    nan = E.quantized_copy(tiny, E.QuantSpec("fp32", 32))
    with torch.no_grad():
        nan.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        E.quantized_copy(nan, E.QuantSpec("bnb_int8", 8, -1))


def test_quant_spec_stores_numpy_ints_as_python_ints():
    spec = E.QuantSpec("rtn", np.int64(4), np.int32(32))
    assert spec == E.QuantSpec("rtn", 4, 32) and (type(spec.bits), type(spec.group_size)) == (int, int)


def test_quant_spec_pins_gguf_formats_and_float_widths():
    """QuantSpec("gguf_q4_0", 8, 128) and QuantSpec("fp32", 4) were accepted and carried the wrong
    bits into the memory and quality tables."""
    for bad in (("gguf_q4_0", 8, 128), ("gguf_q4_0", 4, 128), ("gguf_q8_0", 4, 32)):
        with pytest.raises(ValueError, match=r"gguf_q\d_0 runs bits=\d, group_size=32"):
            E.QuantSpec(*bad)
    for bad in (("fp32", 4), ("fp32",), ("bf16", 32), ("gguf_f16", 32)):          # ("fp32",): bits=16
        with pytest.raises(ValueError, match=r"is (32|16) bits a weight"):
            E.QuantSpec(*bad)
    for ok in (("fp32", 32), ("bf16", 16), ("gguf_q8_0", 8, 32), ("gguf_q4_0", 4, 32), ("gguf_f32", 32)):
        E.QuantSpec(*ok)
