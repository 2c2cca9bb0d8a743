"""The ``llmops-lab`` command: ``info`` (machine and embedded models) and ``bench`` (the suite)."""
from __future__ import annotations

import argparse
import json
import sys


def info() -> str:
    from . import device
    from .loader import DATA_DIR
    lines = [device.describe(), ""]
    card = DATA_DIR / "models" / "card.json"
    if card.exists():
        c = json.loads(card.read_text())
        for w, r in c["training"].items():
            ppl = c["measured"]["val_perplexity_1024"][w]
            lines.append(f"embedded {w}: {r['parameters'] / 1e6:.2f}M parameters, {r['tokens_seen'] / 1e6:.1f}M "
                         f"tokens seen, validation perplexity {ppl:.1f}")
        lines.append(f"draft/target greedy acceptance rate: {c['measured']['greedy_acceptance']:.3f}")
        lines.append(f"model card: {DATA_DIR / 'models' / 'README.md'}")
    else:
        lines.append("embedded models: not trained yet (python -m llmops_lab.train all)")
    return "\n".join(lines)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(prog="llmops-lab", description="LLM inference optimisation, measured.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("info", help="device, capabilities and the embedded models' card")
    sub.add_parser("bench", help="the benchmark suite (same as python -m llmops_lab.bench)", add_help=False)
    a, rest = ap.parse_known_args(argv)
    if a.cmd == "info":
        if rest:                    # only bench passes its arguments on; anything else is a typo
            ap.error(f"unrecognized arguments: {' '.join(rest)}")
        print(info())
    elif a.cmd == "bench":
        from .bench.__main__ import main as bench_main
        bench_main(rest)


if __name__ == "__main__":
    main()
