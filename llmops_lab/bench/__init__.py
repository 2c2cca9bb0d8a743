"""The benchmark suite: ``python -m llmops_lab.bench [--device cuda] [--out DIR]``.

Each suite is a function ``(ctx: BenchContext) -> list[dict]`` registered in ``SUITES``; a row
holds a measured value, its unit, and where it has one, the peer measured in the same run and the
ratio against it, so every claim is a same-run comparison. Later topics add their own modules.
Nothing here imports notebook-only packages: the GPU image has torch, transformers and triton only.
"""
from __future__ import annotations

import json
import platform
import re
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass
class BenchContext:
    device: torch.device
    quick: bool = False            # small sizes: a smoke test of the suite (CI)
    compile: bool = False          # also time decode with torch.compile (always in the full GPU suite)
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
    # in the order they run: the cheap ceilings first, the longest suites last
    return {"core": core.run, "paged": paged.run, "flash": flash.run, "quant": quant.run, "batching": batching.run,
            "spec": speculative.run}


def run(device: str | None = None, out: str | Path | None = None, only: list[str] | None = None,
        quick: bool = False, echo: bool = False, compile: bool = False) -> list[dict]:
    """Run the suites in order. A suite that raises becomes one ``error`` row (with the exception)
    and the rest still run; with ``echo`` each suite's table is printed as soon as it finishes, and
    ``out/bench.json`` is rewritten after every suite, so a run cut short keeps what it measured."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda asked for, but torch sees no CUDA device")
    if only is not None:
        # a string would be read letter by letter; an empty list meant "every suite"
        if isinstance(only, str) or not list(only):
            raise ValueError(f"only must be a non-empty list of suite names (or None for all), got {only!r}")
        only = list(only)
    unknown = set(only or ()) - set(suites())
    if unknown:
        raise ValueError(f"unknown suites {sorted(unknown)}; choose from {sorted(suites())}")
    if out is not None:          # before the first suite runs, not after it (its numbers would be lost)
        out = Path(out)
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ValueError(f"cannot write bench results to {out}: {e}") from None
        keep_previous(out / "bench.json", echo)
    from ..loader import embedded_fingerprint
    ctx = BenchContext(dev, quick, compile)
    rows, t0 = [], time.time()
    meta = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__, "quick": quick, "compile": compile, "models": embedded_fingerprint(),
            "suite_seconds": {}}
    for name, fn in suites().items():
        if only and name not in only:
            continue
        t = time.time()
        try:
            new = fn(ctx)
        except Exception as e:  # noqa: BLE001 - one broken suite must not lose the others' numbers
            new = [row(name, "error", float("nan"), "", error=f"{type(e).__name__}: {e}",
                       traceback=traceback.format_exc(limit=8))]
            if echo:
                traceback.print_exc()
        finally:
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        rows.extend(new)
        meta["suite_seconds"][name] = round(time.time() - t, 1)
        meta["seconds"] = round(time.time() - t0, 1)
        if echo:
            print(f"--- {name}: {meta['suite_seconds'][name]} s", flush=True)
            print(format_table(new), flush=True)
        if out is not None:
            (out / "bench.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2, default=str) + "\n")
    return rows


def keep_previous(path: Path, echo: bool = False) -> Path | None:
    """A run's results must not overwrite an earlier run's: an existing ``path`` is renamed to
    ``bench-<its modification time>.json`` beside it (a number added if that is taken); returns
    the new name, or None when there was nothing to keep."""
    if not path.exists():
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(path.stat().st_mtime))
    kept, n = path.with_name(f"{path.stem}-{stamp}{path.suffix}"), 1
    while kept.exists():
        n += 1
        kept = path.with_name(f"{path.stem}-{stamp}-{n}{path.suffix}")
    path.rename(kept)
    if echo:
        print(f"an earlier {path.name} is kept as {kept.name}", flush=True)
    return kept


def _run_order(path: Path) -> tuple:
    """Recorded runs are named CARD-DATE-runN, N counting the runs of that date on any card."""
    m = re.search(r"(\d{4}-\d{2}-\d{2})-run(\d+)$", path.stem)
    return (m.group(1), int(m.group(2))) if m else ("", 0)


def recorded(suite: str | None = None, run: str | None = None) -> tuple[dict, list[dict]]:
    """(meta, rows) of a GPU bench run kept under ``data/bench/`` (default: the latest that ran
    ``suite``), only ``suite``'s rows when given: the notebooks show these beside what they measure
    on the CPU."""
    from ..loader import DATA_DIR
    runs = sorted((DATA_DIR / "bench").glob("*.json"), key=_run_order)
    if run is not None:
        runs = [p for p in runs if p.stem == run]
    for path in reversed(runs):
        saved = json.loads(path.read_text())
        rows = [r for r in saved["rows"] if suite is None or r["suite"] == suite]
        if rows:
            return dict(saved["meta"], run=path.stem), rows
    raise FileNotFoundError(f"no recorded bench run {run or ''} with suite {suite!r} under {DATA_DIR / 'bench'}")


SHOWN = ("roofline_fraction", "weight_gb_s", "max_err", "prefix_agreement", "first_token_agreement", "alpha", "c")


def format_table(rows: list[dict]) -> str:
    lines = [f"{'suite':<8} {'name':<44} {'value':>12} {'unit':<8} {'peer':<28} {'ratio':>7}  target"]
    for r in rows:
        ratio = f"{r['ratio']:.2f}x" if r.get("ratio") is not None else ""
        lines.append(f"{r['suite']:<8} {r['name']:<44} {r['value']:>12.4g} {r['unit']:<8} "
                     f"{str(r.get('peer') or ''):<28} {ratio:>7}  {r.get('target', '')}"
                     + "".join(f"  {k}={r[k]:.3g}" for k in SHOWN if isinstance(r.get(k), (int, float)))
                     + (f"  config={r['config']}" if r.get("config") else "")
                     + (f"  {r['error']}" if r.get("error") else ""))
    return "\n".join(lines)
