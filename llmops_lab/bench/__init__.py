"""The benchmark suite: ``python -m llmops_lab.bench [--device cuda] [--out DIR]``.

Each suite is a function ``(ctx: BenchContext) -> list[dict]`` registered in ``SUITES``; a row
holds a measured value, its unit, and where it has one, the peer measured in the same run and the
ratio against it, so every claim is a same-run comparison. Later topics add their own modules.
Nothing here imports notebook-only packages: the GPU image has torch, transformers and triton only.
"""
from __future__ import annotations

import json
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass
class BenchContext:
    device: torch.device
    quick: bool = False            # small sizes: a smoke test of the suite (CI)
    results: dict = field(default_factory=dict)  # values later suites reuse (e.g. copy bandwidth)


def row(suite, name, value, unit, peer=None, peer_value=None, target=None, **extra) -> dict:
    r = {"suite": suite, "name": name, "value": value, "unit": unit}
    if peer is not None:
        r.update(peer=peer, peer_value=peer_value, ratio=value / peer_value if peer_value else None)
    if target is not None:
        r["target"] = target
    r.update(extra)
    return r


def suites():
    from . import batching, core, flash, paged, quant, speculative
    return {"core": core.run, "spec": speculative.run, "flash": flash.run, "paged": paged.run, "quant": quant.run,
            "batching": batching.run}


def run(device: str | None = None, out: str | Path | None = None, only: list[str] | None = None,
        quick: bool = False) -> list[dict]:
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda asked for, but torch sees no CUDA device")
    ctx = BenchContext(dev, quick)
    rows, t0 = [], time.time()
    for name, fn in suites().items():
        if only and name not in only:
            continue
        rows.extend(fn(ctx))
    meta = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__, "seconds": round(time.time() - t0, 1), "quick": quick}
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2, default=str) + "\n")
    return rows


def format_table(rows: list[dict]) -> str:
    lines = [f"{'suite':<8} {'name':<44} {'value':>12} {'unit':<8} {'peer':<28} {'ratio':>7}  target"]
    for r in rows:
        ratio = f"{r['ratio']:.2f}x" if r.get("ratio") is not None else ""
        lines.append(f"{r['suite']:<8} {r['name']:<44} {r['value']:>12.4g} {r['unit']:<8} "
                     f"{str(r.get('peer') or ''):<28} {ratio:>7}  {r.get('target', '')}")
    return "\n".join(lines)
