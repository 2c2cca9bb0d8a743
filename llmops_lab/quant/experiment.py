"""Measuring weight quantization: error against the bound, perplexity, bytes and speed.

Each function runs one measurement of notebook ``01_quantization`` and returns plain data (dicts and
lists of rows); nothing here prints. Speed (weight-only quantized matmuls against float ones, decode
against prefill), quality (perplexity on held-out text of RTN, GPTQ and AWQ; Frantar et al. 2022,
Lin et al. 2023) and memory (the bytes a quantized model really stores) are set against the source
document's table and its error bound (``formulas.quant_error_bound_*``).

This module only gathers them under one name; each part lives with its concept:

* ``speed``: layer shapes, ``make_linears``, ``linear_speed``, ``decode_prefill_speed``,
  ``crossover_batch``, ``METHODS``, ``FLOAT``, ``QUICK_SHAPES``.
* ``error_histogram``: round-to-nearest error against the document's and the scheme's bound.
* ``quant_spec``: ``QuantSpec``, ``NotMeasured``, ``quantized_copy`` and the spec lists.
* ``quality``: run sizes, calibration and evaluation ids, ``perplexity_table``, the calibration
  study, ``method_gains``, ``verdict`` and their plots.
* ``report``: ``memory_table``, ``rebuilt_table`` (the document's table from measurement),
  ``findings``.
* ``llama_cpp_peer``: ``gguf_comparison``, our runtime against llama.cpp on our weights in GGUF.
"""
from __future__ import annotations

from .error_histogram import error_histogram, plot_error_histogram
from .llama_cpp_peer import gguf_comparison
from .quality import (CALIBRATION_SOURCES, QuantRunSizes, calibration_ids, calibration_spread, calibration_study,
                      evaluation_ids, method_gains, perplexity_table, plot_perplexity_vs_bits, run_sizes, verdict,
                      window_nll)
from .quant_spec import DEFAULT_SPECS, FULL_SPECS, LIBRARY_SPECS, NotMeasured, QuantSpec, quantized_copy
from .report import MEMORY_SPECS, findings, memory_table, rebuilt_table
from .speed import (FLOAT, METHODS, QUICK_SHAPES, crossover_batch, decode_prefill_speed, layer_shapes,
                    linear_speed, make_linears, preset_shapes)

__all__ = [
    # speed
    "FLOAT", "METHODS", "QUICK_SHAPES", "layer_shapes", "preset_shapes", "make_linears", "linear_speed",
    "decode_prefill_speed", "crossover_batch",
    # error against the bound
    "error_histogram", "plot_error_histogram",
    # quantized copies
    "QuantSpec", "NotMeasured", "quantized_copy", "DEFAULT_SPECS", "FULL_SPECS", "LIBRARY_SPECS",
    # quality
    "QuantRunSizes", "run_sizes", "CALIBRATION_SOURCES", "calibration_ids", "evaluation_ids", "perplexity_table",
    "window_nll", "plot_perplexity_vs_bits", "calibration_study", "calibration_spread", "method_gains", "verdict",
    # the rebuilt table
    "MEMORY_SPECS", "memory_table", "rebuilt_table", "findings",
    # llama.cpp
    "gguf_comparison",
]
