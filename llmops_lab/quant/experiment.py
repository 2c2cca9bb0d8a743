"""Measuring weight quantization: error against the bound, perplexity, bytes and speed.

Each function runs one measurement of notebook ``01_quantization`` and returns plain data (dicts and
lists of rows); nothing here prints. Speed (weight-only quantized matmuls against float ones, decode
against prefill), quality (perplexity on held-out text of RTN, GPTQ and AWQ; Frantar et al. 2022,
Lin et al. 2023) and memory (the bytes a quantized model really stores) are set against the source
document's table and its error bound (``formulas.quant_error_bound_*``).
"""
from __future__ import annotations
