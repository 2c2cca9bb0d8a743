"""Pictures and tables of paged KV memory: request lengths, reserved vs used slots, block tables."""
from __future__ import annotations

import numpy as np

from .. import formulas, plots
from . import simulate


def plot_lengths(ax, requests, max_len: int):
    """Histogram of the requests' prompt and final lengths, with the max-length reservation."""
    bins = np.linspace(0, max_len, 65)
    ax.hist([r.prompt_len for r in requests], bins=bins, alpha=0.6, label="prompt")
    ax.hist([r.total for r in requests], bins=bins, alpha=0.6, label="prompt + output")
    ax.axvline(max_len, color="black", linestyle="--", label=f"max_len = {max_len}: what a contiguous cache reserves")
    ax.set(xlabel="tokens", ylabel="requests", title=f"{len(requests)} requests")
    ax.legend()
    return ax


def plot_memory(ax, report: dict):
    """Stacked bars: KV slots holding tokens and slots reserved but empty, per allocation scheme."""
    names = list(report["reserved_tokens"])
    used = np.full(len(names), report["used_tokens"]) / 1e6
    wasted = np.array([report["reserved_tokens"][n] for n in names]) / 1e6 - used
    ax.bar(names, used, label="holding a token")
    bars = ax.bar(names, wasted, bottom=used, label="reserved, empty")
    ax.bar_label(bars, labels=[f"{report['waste'][n]:.1%} wasted" for n in names], padding=2, fontsize="small")
    ax.set(ylabel="KV slots (million tokens)", title=f"block size {report['block_size']}")
    ax.legend()
    return ax


def draw_memory(ax, requests, max_len: int, block_size: int, when: str = "during"):
    """``plot_memory`` of a fresh ``simulate.memory_report`` (for a slider)."""
    return plot_memory(ax, simulate.memory_report(requests, max_len, int(round(block_size)), when))


def plot_waste_vs_block_size(ax, requests, max_len: int, block_sizes, when: str = "during") -> list[dict]:
    """Paged waste counted by the BlockManager against ``formulas.kv_waste_fraction_paged``, with
    the contiguous max-length waste as a line; returns the reports."""
    reports = [simulate.memory_report(requests, max_len, bs, when) for bs in block_sizes]
    lens = simulate.current_lengths(requests, when)
    plots.measured_vs_formula(ax, block_sizes, [r["waste"]["paged"] for r in reports],
                              lambda bs: formulas.kv_waste_fraction_paged(lens, int(bs)),
                              formula_name="1 - sum(s) / sum(ceil(s/b)·b)", label="paged (BlockManager)",
                              xlabel="block size (tokens)", ylabel="fraction of reserved KV wasted", logx=True)
    ax.axhline(reports[0]["waste"]["contiguous, max length"], color="black", linestyle="--",
               label="contiguous, max length")
    ax.axhline(1 - simulate.VLLM_PAPER["orca_max_used"], color="grey", linestyle=":",
               label="Orca (Max) waste, vLLM paper: the max-length row's peer")
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(block_sizes), labels=[str(b) for b in block_sizes])
    ax.legend(fontsize="small")
    return reports


def report_markdown(reports: list[dict]) -> str:
    """A Markdown table of reserved slots and waste per scheme, one row per report (block size)."""
    lines = ["| block size | contiguous, max length | contiguous, oracle | paged | paged (formula) "
             "| paged saving vs max length |", "|---:|---:|---:|---:|---:|---:|"]
    for r in reports:
        w = r["waste"]
        lines.append(f"| {r['block_size']} | {w['contiguous, max length']:.1%} | {w['contiguous, oracle']:.1%} | "
                     f"{w['paged']:.2%} | {r['waste_formula']['paged']:.2%} | {r['paged_saving_vs_max_length']:.1%} |")
    return "\n".join(lines)


def draw_block_tables(ax, cache, prompt_len: int | None = None):
    """One row per sequence, one cell per logical block: the physical block id, coloured by how many
    sequences share it (reference count); a dashed line where the prompt ends."""
    tables = cache.block_tables()
    refs = cache.ref_counts()
    width = max(len(t) for t in tables)
    grid = np.full((len(tables), width), np.nan)
    for i, t in enumerate(tables):
        for j, b in enumerate(t):
            grid[i, j] = refs.get(b, 0)
            ax.text(j, i, str(b), ha="center", va="center", color="white" if grid[i, j] > 1 else "black")
    im = ax.imshow(grid, cmap="Blues", vmin=0, vmax=max(refs.values()) + 1, aspect="auto")
    ax.figure.colorbar(im, ax=ax, label="reference count")
    if prompt_len is not None:
        ax.axvline(prompt_len / cache.block_size - 0.5, color="red", linestyle="--", label="end of prompt")
        ax.legend(loc="lower left", bbox_to_anchor=(0, 1.0), fontsize="small", frameon=False)
    ax.set(xlabel=f"logical block (of {cache.block_size} tokens)", ylabel="sample", xticks=range(width),
           yticks=range(len(tables)))
    ax.set_title("block tables: physical block ids", loc="right")
    return ax


def plot_latency(ax, timings: dict, unit: str = "ms", title: str = ""):
    """Bars of median seconds per call (in ``unit``), whiskers from p10 to p90."""
    scale = {"ms": 1e3, "µs": 1e6, "s": 1.0}[unit]
    names = list(timings)
    med = [timings[n].median * scale for n in names]
    plots.bar_compare(ax, names, med, ylabel=f"{unit} (median)")
    ax.errorbar(names, med, yerr=[[m - timings[n].p10 * scale for n, m in zip(names, med)],
                                  [timings[n].p90 * scale - m for n, m in zip(names, med)]],
                fmt="none", color="black", capsize=4)
    ax.set_title(title)
    ax.tick_params(axis="x", labelsize="small")
    return ax
