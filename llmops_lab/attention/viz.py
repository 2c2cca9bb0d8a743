"""Pictures of flash attention's loop: which tiles run, and the running max and sum per tile."""
from __future__ import annotations

import numpy as np


def plot_tiles(ax_grid, ax_stats, trace: list[dict], n_q_blocks: int, n_k_blocks: int):
    """Left: the order in which (query block, key block) tiles are computed (blank = skipped by the
    causal mask). Right: the first query's running max and running sum after each tile of its block."""
    order = np.full((n_q_blocks, n_k_blocks), np.nan)
    for i, t in enumerate(trace):
        order[t["q_block"], t["k_block"]] = i
    im = ax_grid.imshow(order, cmap="viridis")
    ax_grid.set_xticks(range(n_k_blocks))
    ax_grid.set_yticks(range(n_q_blocks))
    ax_grid.set_xlabel("key block")
    ax_grid.set_ylabel("query block")
    ax_grid.set_title("tiles computed (colour = step)")
    ax_grid.figure.colorbar(im, ax=ax_grid, shrink=0.8)
    first = [t for t in trace if t["q_block"] == n_q_blocks - 1]
    ks = [t["k_block"] for t in first]
    ax_stats.plot(ks, [t["max"] for t in first], "o-", label="running max m")
    ax_stats.plot(ks, [t["sum"] for t in first], "s-", label="running sum l (in units of exp(m))")
    ax_stats.set_xlabel("key block streamed")
    ax_stats.set_title(f"first query of query block {n_q_blocks - 1}")
    ax_stats.legend()
    ax_stats.grid(True, alpha=0.3)
    return ax_grid, ax_stats
