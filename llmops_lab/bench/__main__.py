import argparse

from . import format_table, run, suites


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m llmops_lab.bench",
                                 description="Measure llmops-lab against its peers in the same run.")
    ap.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when present")
    ap.add_argument("--out", help="folder for bench.json (an earlier bench.json there is kept, renamed bench-<time>.json)")
    ap.add_argument("--only", nargs="+", choices=sorted(suites()), help="run only these suites")
    ap.add_argument("--quick", action="store_true", help="small sizes: checks that the suite runs")
    ap.add_argument("--compile", action="store_true",
                    help="also time decode through torch.compile on a CPU or with --quick (the full GPU suite always does)")
    a = ap.parse_args(argv)
    try:
        rows = run(a.device, a.out, a.only, a.quick, echo=True, compile=a.compile)
    except (ValueError, RuntimeError) as e:      # bad arguments, or no CUDA for --device cuda
        ap.error(str(e))
    print("=== all suites", flush=True)
    print(format_table(rows))


if __name__ == "__main__":
    main()
