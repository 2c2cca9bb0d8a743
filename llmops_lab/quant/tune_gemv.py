"""Time the GEMV kernel's tile candidates against the tiled kernel on this GPU, for a preset's
linear shapes at decode.

    python -m llmops_lab.quant.tune_gemv [--preset llama-2-7b] [--rows 1]

At one to four rows the dequantizing GEMV reads each weight byte once and does almost no arithmetic,
so its speed is how many bytes it keeps in flight: tiles wide enough along K for long reads, and
enough programs (output tiles) to occupy every SM. The table prints, per format and shape, each
candidate's time and achieved bandwidth (weight bytes / time), fastest first; the chosen tiles then
go into ``triton_dequant._gemv_config``. At 4 bits every kernel runs interleaving the two nibbles
of each byte back into column order (the default), with ``split_nibbles`` ("split"), and split with
``fast_convert`` ("split fast": codes to floats by bit arithmetic, no int-to-float instruction); at
8 bits plain and "fast".
"""
from __future__ import annotations

import argparse
import sys

import torch

# (BLOCK_N, BLOCK_K, num_warps, num_stages). The H100 run of 2026-11-26 (data/bench/logs) timed 12;
# these are its six with 4 warps, so that three variants of each fit the GPU script's 100 s for this
# tool. In that log a 4-warp tile was the fastest GEMV candidate at five of the six shapes (at int8
# 4096x11008, (16, 512, 8, 3) led at 33.16 us, 1% ahead of (8, 512, 4, 3)), and the 64-wide tiles
# ranked 10th-12th of 12 at every shape. Not all six rank high everywhere: (32, 256, 4, 3) was 9th
# at five shapes and 2nd at int8 11008x4096, and (16, 128, 4, 3) led at the three int4 shapes and
# was last at int8 4096x11008.
CANDIDATES = [(16, 128, 4, 3), (16, 256, 4, 3), (16, 512, 4, 3), (32, 256, 4, 3), (8, 512, 4, 3), (8, 1024, 4, 3)]

# (label suffix, split_nibbles, fast_convert) of each variant, per bit width
VARIANTS = {4: [("", False, False), (" split", True, False), (" split fast", True, True)],
            8: [("", False, False), (" fast", False, True)]}


def time_call(fn, device="cuda") -> float:
    """Seconds per call, 20 calls captured in one CUDA graph (a kernel of a few microseconds is
    shorter than its launch from Python, so timing launches from Python would time Python)."""
    from .speed import time_in_graph
    return time_in_graph(fn, torch.device(device), repeats=10, calls=20)[0]


@torch.inference_mode()
def tune(preset: str = "llama-2-7b", rows: int = 1, candidates=CANDIDATES, device="cuda",
         shapes: list[tuple[int, int]] | None = None, report=None) -> list[dict]:
    """One row per (format, shape, kernel variant): us and gb_s, or the error that stopped it.
    ``shapes``: (out, in) pairs instead of the preset's (a test runs small ones in the interpreter).
    ``report(rows)``, given, gets each shape's rows as soon as they are timed: a run stopped by a
    time limit has still printed the shapes it finished."""
    from .speed import make_linears, preset_shapes
    from .triton_dequant import dequant_matmul
    shapes = sorted(set(shapes) if shapes else {(o, i) for _, o, i in preset_shapes(preset)})
    out = []
    for method in ("int4", "int8"):
        mods = make_linears(method, [("", o, i) for o, i in shapes], device, torch.bfloat16)
        floats = make_linears("float", [("", o, i) for o, i in shapes], device, torch.bfloat16)
        for (o, i), m, f in zip(shapes, mods, floats):
            x = torch.randn(rows, i, device=device, dtype=torch.bfloat16)
            t = time_call(lambda: f(x), device)
            out.append(dict(method=method, N=o, K=i, config="bf16 F.linear", us=t * 1e6, gb_s=2 * o * i / t / 1e9))
            nbytes = m.qweight.numel() + 2 * (m.scales.numel() + m.zeros.numel())
            ref = dequant_matmul(x, m.qweight, m.scales, m.zeros, m.bits, m.group_size, m.sym, kernel="tiled")
            base = time_call(lambda: dequant_matmul(x, m.qweight, m.scales, m.zeros, m.bits, m.group_size, m.sym), device)
            out.append(dict(method=method, N=o, K=i, config="tiled (default)", us=base * 1e6, gb_s=nbytes / base / 1e9))
            # the tiled kernel's other variants (its default ran above), then every GEMV tile in each
            variants = [(f"tiled{sfx}", "tiled", None, split, fast) for sfx, split, fast in VARIANTS[m.bits][1:]]
            for c in candidates:
                variants += [(f"{c}{sfx}", "gemv", c, split, fast) for sfx, split, fast in VARIANTS[m.bits]]
            for label, kernel, c, split, fast in variants:
                try:
                    def call(kernel=kernel, c=c, split=split, fast=fast):
                        return dequant_matmul(x, m.qweight, m.scales, m.zeros, m.bits, m.group_size, m.sym,
                                              kernel=kernel, gemv_config=c, split_nibbles=split, fast_convert=fast)
                    err = float((call().float() - ref.float()).abs().max())
                    t = time_call(call, device)
                    out.append(dict(method=method, N=o, K=i, config=label, us=t * 1e6, gb_s=nbytes / t / 1e9,
                                    max_err=err))
                except Exception as e:   # a tile too big for the registers or shared memory
                    out.append(dict(method=method, N=o, K=i, config=label, error=f"{type(e).__name__}: {str(e)[:80]}"))
            if report is not None:
                report([r for r in out if (r["method"], r["N"], r["K"]) == (method, o, i)])
    return out


def print_shape(group: list[dict], rows: int) -> None:
    """One shape's rows, fastest first, then the variants that failed."""
    r0 = group[0]
    ok = sorted((r for r in group if "us" in r), key=lambda r: r["us"])
    print(f"--- {r0['method']} N={r0['N']} K={r0['K']}, {rows} row(s)")
    for r in ok:
        print(f"  {str(r['config']):>22}  {r['us']:8.2f} us  {r['gb_s']:7.0f} GB/s  err {r.get('max_err', 0):.3g}")
    for r in group:
        if "error" in r:
            print(f"  {str(r['config']):>22}  {r['error']}")
    sys.stdout.flush()


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m llmops_lab.quant.tune_gemv", description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="llama-2-7b")
    ap.add_argument("--rows", type=int, default=1)
    a = ap.parse_args(argv)
    tune(a.preset, a.rows, report=lambda group: print_shape(group, a.rows))


if __name__ == "__main__":
    main()
