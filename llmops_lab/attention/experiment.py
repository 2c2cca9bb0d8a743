"""Measuring attention implementations: peak memory and latency against sequence length.

Each implementation is called the same way, ``fn(q, k, v, is_causal)``; memory is measured by
``measure.peak_memory`` (allocator statistics on a GPU, the profiler's allocation events on a CPU),
less the output, and set against two formulas that count the same way, the output left out:
``naive_extra_bytes`` (O(S^2): the fp32 scores and probabilities the naive backend holds) and
``flash_extra_bytes`` (O(S): the fp32 log-sum-exp a flash kernel writes besides its output).
"""
from __future__ import annotations

import torch

from .. import formulas, measure
from .backends import naive_attention
from .tiled import tiled_attention

SDPA_BACKENDS = ("math", "efficient", "flash", "cudnn")


def _sdpa(backend: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    kind = {"math": SDPBackend.MATH, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}[backend]

    def run(q, k, v, is_causal):
        with sdpa_kernel([kind]):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=is_causal,
                                                                    enable_gqa=q.shape[1] != k.shape[1])
    return run


def implementations(device, include_triton: bool = True, dtype=None) -> dict:
    """name -> fn(q, k, v, is_causal) for everything that runs on this device in ``dtype`` (default:
    bf16 on CUDA, fp32 elsewhere; SDPA's flash and cuDNN kernels take 16-bit inputs only on CUDA, so
    a backend admitted in one dtype may refuse another: ask in the dtype you will time)."""
    impls = {"naive": lambda q, k, v, c: naive_attention(q, k, v, is_causal=c),
             "tiled (PyTorch)": lambda q, k, v, c: tiled_attention(q, k, v, is_causal=c, block_m=128, block_n=128)}
    for name in SDPA_BACKENDS:
        if works(_sdpa(name), device, dtype):
            impls[f"SDPA {name}"] = _sdpa(name)
    if include_triton:
        from . import triton_flash
        if triton_flash.available():
            impls["ours (Triton)"] = lambda q, k, v, c: triton_flash.flash_attention(q, k, v, is_causal=c)
    try:
        import flash_attn  # noqa: F401  (optional: used where installed)
        impls["flash-attn"] = lambda q, k, v, c: flash_attn.flash_attn_func(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=c).transpose(1, 2)
    except Exception:
        pass
    return impls


def works(fn, device, dtype=None) -> bool:
    dtype = dtype or (torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32)
    q = torch.randn(1, 2, 8, 64, device=device, dtype=dtype)
    try:
        fn(q, q, q, True)
        return True
    except Exception:  # a backend that cannot run here says so by raising
        return False


def inputs(B, H, Hkv, S, D, dtype, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    mk = lambda h: torch.randn(B, h, S, D, device=device, dtype=dtype, generator=g)
    return mk(H), mk(Hkv), mk(Hkv)


def naive_extra_bytes(B: int, H: int, S: int) -> float:
    """What ``naive_attention`` holds at its peak besides its output, in the O(S^2) term: the scores S
    and the probabilities P = softmax(S), both live at once and both fp32 whatever the input dtype
    (it computes in fp32): 2 x B x H x S x S x 4. Not counted: a causal mask (S x S booleans, once
    for all heads) and, for 16-bit inputs, fp32 copies of q, k, v and of the output."""
    return 2 * formulas.attention_scores_bytes(B, H, S, 4)


def flash_extra_bytes(B: int, H: int, S: int, D: int, dtype_bytes: float) -> float:
    """What a flash kernel writes besides its output: one fp32 log-sum-exp per query row, B x H x S x 4
    (``formulas.flash_attention_extra_bytes`` less the output O it also counts, as the measurement
    subtracts O). Our Triton kernel allocates exactly this; the tiled PyTorch loop and SDPA's
    kernels also hold per-tile working buffers, which this does not count."""
    return formulas.flash_attention_extra_bytes(B, H, S, D, dtype_bytes) - B * H * S * D * dtype_bytes


def memory_row(name, fn, B, H, Hkv, S, D, dtype, device, causal=True) -> dict:
    """Peak memory of one call beyond its inputs, with the output's bytes subtracted (``extra_bytes``),
    and the two formulas counted the same way (output excluded): ``naive_formula_bytes`` (fp32 S and
    P, ``naive_extra_bytes``) and ``flash_formula_bytes`` (the fp32 statistics, ``flash_extra_bytes``)."""
    q, k, v = inputs(B, H, Hkv, S, D, dtype, device)
    pm = measure.peak_memory(fn, q, k, v, causal, device=device)
    out_bytes = q.numel() * q.element_size()
    return {"impl": name, "seq_len": S, "peak_bytes": pm.peak_bytes, "extra_bytes": max(pm.peak_bytes - out_bytes, 0),
            "method": pm.method, "naive_formula_bytes": naive_extra_bytes(B, H, S),
            "flash_formula_bytes": flash_extra_bytes(B, H, S, D, q.element_size())}


def latency_row(name, fn, B, H, Hkv, S, D, dtype, device, causal=True, repeats=5) -> dict:
    q, k, v = inputs(B, H, Hkv, S, D, dtype, device)
    t = measure.time_fn(fn, q, k, v, causal, warmup=2, repeats=repeats, device=device)
    flops = formulas.attention_flops(B, H, S, S, D, causal)
    return {"impl": name, "seq_len": S, "seconds": t.median, "spread": t.spread,
            "tflops": flops / t.median / 1e12, "causal": causal}


def sweep(seq_lens, impls: dict, B=1, H=8, Hkv=8, D=64, dtype=torch.float32, device="cpu",
          causal=True, memory=True, latency=True, max_naive_len: int | None = None, repeats: int = 5) -> list[dict]:
    rows = []
    for S in seq_lens:
        for name, fn in impls.items():
            if max_naive_len and name in ("naive", "SDPA math") and S > max_naive_len:
                continue
            r = {"impl": name, "seq_len": S}
            if memory:
                r.update(memory_row(name, fn, B, H, Hkv, S, D, dtype, device, causal))
            if latency:
                r.update(latency_row(name, fn, B, H, Hkv, S, D, dtype, device, causal, repeats))
            rows.append(r)
    return rows
