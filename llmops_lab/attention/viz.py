"""Pictures of flash attention's loop: which tiles run, and the running max and sum per tile."""
from __future__ import annotations

import numpy as np

from ..checks import is_int


def plot_tiles(ax_grid, ax_stats, trace: list[dict], n_q_blocks: int, n_k_blocks: int):
    """Left: the order in which (query block, key block) tiles are computed (blank = skipped by the
    causal mask). Right: the first query's running max and running sum after each tile of its block."""
    for name, n in (("n_q_blocks", n_q_blocks), ("n_k_blocks", n_k_blocks)):
        if not is_int(n) or n < 1:
            raise ValueError(f"{name} must be a positive integer, got {n!r}")
    if not trace:
        raise ValueError("trace is empty: pass the list that tiled_attention(..., trace=trace) filled")
    order = np.full((n_q_blocks, n_k_blocks), np.nan)
    for i, t in enumerate(trace):
        qb, kb = t["q_block"], t["k_block"]
        # A tile off the grid was an IndexError, a negative one wrapped round to the far edge.
        if not (0 <= qb < n_q_blocks and 0 <= kb < n_k_blocks):
            raise ValueError(f"trace step {i} is tile ({qb}, {kb}), outside the {n_q_blocks} x {n_k_blocks} "
                             f"grid of n_q_blocks x n_k_blocks: pass the grid the trace was made with")
        if not np.isnan(order[qb, kb]):  # two calls' traces in one list: the later would hide the first
            raise ValueError(f"trace holds tile ({qb}, {kb}) twice: one tiled_attention call's trace per picture")
        order[qb, kb] = i
    # tiled_attention visits every query block, and its last one reaches the last key block: a
    # grid larger than that would draw blank tiles that look causally skipped, and no statistics.
    if np.isnan(order[-1]).all() or np.isnan(order[:, -1]).all():
        raise ValueError(f"the trace has no tile in the last row or column of the {n_q_blocks} x {n_k_blocks} "
                         f"grid: pass the grid the trace was made with")
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
