"""Pictures of batching runs: Gantt timelines, batch occupancy and KV blocks over time, sweeps
against the formulas. Each function draws on the axes it is given and returns what it drew from."""
from __future__ import annotations

from .workload import RunResult

COLORS = {"queue": "#d9d9d9", "prefill": "#f4a261", "decode": "#2a9d8f", "idle": "#e76f51"}


def gantt(ax, result: RunResult, max_requests: int = 24, title: str | None = None) -> list[dict]:
    """One bar per request: waiting (arrival to admission), prefill (to its first token), decoding
    (to its last token) and, in static batching, idle (done, but held until the batch ends)."""
    rows = sorted(result.requests, key=lambda r: (r["arrival"], r["request_id"]))[:max_requests]
    for y, r in enumerate(rows):
        start = r.get("start") if r.get("start") is not None else r["arrival"]
        first = r.get("first_token") if r.get("first_token") is not None else start
        last = r.get("last_token") if r.get("last_token") is not None else r["finish"]
        parts = [("queue", r["arrival"], start), ("prefill", start, first), ("decode", first, last),
                 ("idle", last, r["finish"])]
        for kind, a, b in parts:
            if b > a:
                ax.barh(y, b - a, left=a, color=COLORS[kind], edgecolor="none", height=0.8)
        ax.text(r["finish"], y, f" {r['n_out']}", va="center", fontsize=7)
    ax.set_yticks(range(len(rows)), [r["request_id"] for r in rows], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("seconds since the run started")
    ax.set_title(title or f"{result.name}: {result.throughput:.0f} output tok/s")
    from matplotlib.patches import Patch
    # outside the axes: the lower right corner is where the last requests' bars end
    ax.legend(handles=[Patch(color=c, label=k) for k, c in COLORS.items()], loc="upper left",
              bbox_to_anchor=(1.01, 1.0), fontsize=7, borderaxespad=0)
    return rows


def occupancy(ax, result: RunResult, num_kv_blocks: int | None = None) -> None:
    """Running batch size per step (useful rows for static batching) and KV blocks in use."""
    t = [s["t_end"] for s in result.steps]
    busy = [s.get("num_active", s["num_seqs"]) for s in result.steps]
    ax.step(t, [s["num_seqs"] for s in result.steps], where="post", color="#999999", label="rows computed")
    ax.step(t, busy, where="post", color=COLORS["decode"], label="rows doing useful work")
    ax.set_xlabel("seconds")
    ax.set_ylabel("sequences in the step")
    ax.set_title(result.name)
    if result.steps and "blocks_in_use" in result.steps[0]:
        ax2 = ax.twinx()
        ax2.step(t, [s["blocks_in_use"] for s in result.steps], where="post", color=COLORS["prefill"],
                 label="KV blocks in use")
        if num_kv_blocks:
            ax2.axhline(num_kv_blocks, color=COLORS["prefill"], ls=":", lw=1)
        ax2.set_ylabel("KV blocks in use")
        ax2.legend(loc="upper right", fontsize=7)
    ax.legend(loc="upper left", fontsize=7)


def sweep_plot(ax_thr, ax_lat, rows: list[dict], param: str, predicted: dict | None = None) -> None:
    """Throughput and mean end-to-end latency against ``param`` for static and continuous; formula
    predictions (``predicted[kind] = [values]``) dashed."""
    for kind, c in (("static", COLORS["idle"]), ("continuous", COLORS["decode"])):
        rs = [r for r in rows if r["kind"] == kind]
        x = [r[param] for r in rs]
        ax_thr.plot(x, [r["throughput_tok_s"] for r in rs], "o-", color=c, label=f"{kind}, measured")
        if predicted and kind in predicted:
            ax_thr.plot(x, predicted[kind], "--", color=c, label=f"{kind}, formula")
        ax_lat.plot(x, [r["mean_e2e_s"] for r in rs], "o-", color=c, label=f"{kind} mean e2e")
        ax_lat.plot(x, [r["mean_ttft_s"] for r in rs], "s:", color=c, label=f"{kind} mean TTFT")
    for ax, y in ((ax_thr, "output tokens / s"), (ax_lat, "seconds")):
        ax.set_xlabel(param.replace("_", " "))
        ax.set_ylabel(y)
        ax.legend(fontsize=7)
    if param == "arrival_rate":
        ax_thr.set_xscale("log")
        ax_lat.set_xscale("log")


def draw_interactive(ax, model, tokens, arrival_rate: float, spread: float, max_num_seqs: int,
                     num_kv_blocks: int, n: int = 16, mean_output: int = 16) -> dict:
    """One small workload through both schedulers; the continuous run's timeline, both in the title."""
    from .experiment import compare
    from .workload import make_workload
    wl = make_workload(tokens, n, prompt_len=(8, 40), mean_output=mean_output, spread=spread,
                       max_output=8 * mean_output, arrival_rate=arrival_rate, seed=1)
    res = compare(model, wl, max_num_seqs=max_num_seqs, num_kv_blocks=num_kv_blocks, block_size=16)
    s, c = res["static"], res["continuous"]
    gantt(ax, c, max_requests=n, title=(
        f"continuous {c.throughput:.0f} tok/s, mean e2e {c.mean('e2e'):.2f} s, "
        f"{c.engine.scheduler.num_preemptions} preemptions | static {s.throughput:.0f} tok/s, "
        f"mean e2e {s.mean('e2e'):.2f} s"))
    ax.title.set_fontsize(8)
    return {k: r.summary() for k, r in res.items()}
