"""Plots: a measurement next to the formula that predicts it.

Every notebook's central picture is the same one: measured points (with their spread) against the
curve of a named formula from ``llmops_lab.formulas``, or measured bars against a physical limit.
These helpers draw on an Axes the caller owns and return it; they never call ``plt.show()``.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np

from .checks import is_real

Formula = Callable | Sequence[float]


def new_figure(ncols: int = 1, nrows: int = 1, width: float = 6.0, height: float = 4.0):
    """A figure of nrows x ncols panels, each width x height inches.

    Returns:
        (fig, axes): axes is one Axes for a single panel, else a flat array of Axes.
    """
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows),
                             layout="constrained", squeeze=False)
    axes = axes.ravel()
    return fig, axes[0] if axes.size == 1 else axes


def _evaluate(name: str, formula: Formula, x: Sequence) -> np.ndarray:
    """A formula's values at x: called point by point with the x values as given (a count stays an
    int: the formulas refuse 512.0 tokens), so scalar-only functions work too."""
    if callable(formula):
        return np.asarray([float(formula(xi.item() if isinstance(xi, np.generic) else xi)) for xi in x])
    return _points(f"formula {name!r}", formula, len(x))


def _points(name: str, values, n: int | None, per: str = "x") -> np.ndarray:
    """``values`` as n floats (any number if n is None), one per ``per`` (None and NaN: not
    measured), or a clear error."""
    try:
        values = np.asarray(values.tolist() if hasattr(values, "tolist") else values, dtype=float)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{name} must be a list of numbers, one per {per}: {err}") from None
    if values.ndim == 0:
        raise TypeError(f"{name} must be a list of numbers, one per {per}, got the single value {values.item()}")
    if values.ndim != 1:
        raise ValueError(f"{name} must be a flat list of numbers, one per {per}, got shape {values.shape}")
    if n is not None and len(values) != n:     # extra points would be dropped unseen
        raise ValueError(f"{len(values)} {name} values for {n} {per} values")
    return values


def _warn_hidden(what: str, x: np.ndarray, y: np.ndarray, logx: bool, logy: bool) -> np.ndarray:
    """Which points matplotlib would leave out without a word (NaN, infinite, not positive on a log
    axis); a warning that counts them. Returns the mask of drawn points."""
    shown = np.isfinite(x) & np.isfinite(y) & ~((x <= 0) & logx) & ~((y <= 0) & logy)
    if not shown.all():
        warnings.warn(f"{what}: {(~shown).sum()} of {len(shown)} points are not drawn (NaN or infinite"
                      f"{', or not positive on a log axis' if logx or logy else ''})", stacklevel=3)
    return shown


def measured_vs_formula(ax, x: Sequence[float], measured: Sequence[float],
                        formula: Formula | None = None, *, formula_name: str | None = None,
                        formulas: Mapping[str, Formula] | None = None, label: str = "measured",
                        xlabel: str | None = None, ylabel: str | None = None,
                        logx: bool = False, logy: bool = False,
                        spread: Sequence[float] | None = None,
                        p10: Sequence[float] | None = None, p90: Sequence[float] | None = None):
    """Measured points against one or more formula curves, each named on its line.

    Args:
        x, measured: the measurement, one value per x.
        formula, formula_name: one formula (a callable of one x, or its values at x) and its name.
        formulas: several formulas by name, instead of or besides ``formula``.
        p10, p90: per-point percentiles (``Timing.p10``, ``Timing.p90``), with ``measured`` the
            medians: error bars from p10 up to p90, so a lopsided spread (a few slow calls) shows.
        spread: per-point p90 - p10 width (``Timing.spread``), drawn as ± spread / 2 error bars, for
            when only the width is known; p10 and p90 say more.

    A point that cannot be drawn (None, NaN or infinite, or not positive on a log axis) is counted
    in a warning, for the measurement and for each formula: never a gap without a word.

    Returns:
        ax
    """
    curves = dict(formulas or {})
    if formula is not None:
        if not formula_name:
            raise ValueError("formula_name is required with formula: the curve must be named")
        curves = {formula_name: formula, **curves}
    x_points = x.tolist() if hasattr(x, "tolist") else x             # numpy or torch: Python numbers
    if isinstance(x_points, (str, bytes)) or not isinstance(x_points, Iterable):
        raise TypeError(f"x must be a list of numbers, got {type(x_points).__name__}")
    x_points = list(x_points)
    x_given = np.asarray(x_points, dtype=float)
    if x_given.ndim != 1 or len(x_given) == 0:
        raise ValueError(f"x must be a non-empty list of values, got shape {x_given.shape}")
    measured = _points("measured", measured, len(x_given))
    spread = None if spread is None else _points("spread", spread, len(x_given))
    order = np.argsort(x_given)  # lines and end-of-line labels assume increasing x
    x, measured = x_given[order], measured[order]
    yerr = None if spread is None else spread[order] / 2
    if (p10 is None) != (p90 is None):
        raise ValueError("p10 and p90 go together: an error bar needs both ends")
    if p10 is not None:
        if spread is not None:
            raise ValueError("give spread or p10 and p90, not both: they draw the same error bars")
        lo = _points("p10", p10, len(x_given))[order]
        hi = _points("p90", p90, len(x_given))[order]
        # matplotlib takes distances below and above each point. A median outside its own
        # p10-p90 range means the lists do not belong together (or are in other units).
        below, above = measured - lo, hi - measured
        outside = np.flatnonzero((below < 0) | (above < 0))       # NaN compares False: not drawn, not refused
        if len(outside):
            i = outside[0]
            raise ValueError(f"measured must lie between p10 and p90; at x={x[i]:g}: "
                             f"p10 {lo[i]:g}, measured {measured[i]:g}, p90 {hi[i]:g}")
        yerr = np.stack([below, above])
    _warn_hidden(f"measured_vs_formula: {label!r}", x, measured, logx, logy)

    ax.errorbar(x, measured, yerr=yerr, fmt="o", capsize=3, label=label, zorder=3)
    for name, f in curves.items():
        y = _evaluate(name, f, x_points)[order]
        (line,) = ax.plot(x, y, "-", label=name)
        shown = np.flatnonzero(_warn_hidden(f"measured_vs_formula: formula {name!r}", x, y, logx, logy))
        if len(shown):  # the name at the curve's last drawn point (a NaN there would hide it)
            ax.annotate(name, xy=(x[shown[-1]], y[shown[-1]]), xytext=(4, 0), textcoords="offset points",
                        va="center", color=line.get_color(), fontsize="small")
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    if xlabel:
        ax.set_xlabel(xlabel)
    if ylabel:
        ax.set_ylabel(ylabel)
    ax.legend()
    ax.grid(True, alpha=0.3)
    return ax


def bar_compare(ax, labels: Sequence[str], values: Sequence[float], *, ylabel: str,
                reference: float | None = None, reference_label: str = "limit",
                annotate: bool = True):
    """Bars of measured values, optionally against a reference line (e.g. the bandwidth ceiling).

    With ``annotate`` each bar carries its value, and its fraction of ``reference`` when given
    (a finite, positive number). A value of None or NaN is a bar labelled "not measured", always.

    Returns:
        ax
    """
    labels = [str(label) for label in labels]
    values = _points("values", values, None, per="label")
    if len(labels) != len(values):
        raise ValueError(f"{len(labels)} labels for {len(values)} values")
    # Equal labels share one tick: the bars were drawn on top of each other, one hidden.
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        raise ValueError(f"labels must differ, got {repeated} more than once")
    if np.isinf(values).any():
        raise ValueError(f"values must be finite (NaN or None: not measured), got {values.tolist()}")
    if reference is not None and not (is_real(reference) and 0 < reference < math.inf):
        raise ValueError(f"reference must be a finite positive number, got {reference!r}")
    bars = ax.bar(labels, values)
    if reference is not None:
        ax.axhline(reference, color="black", linestyle="--", linewidth=1,
                   label=f"{reference_label} ({reference:.3g})")
        ax.legend()
    if annotate:
        texts = ["" if np.isnan(v) else f"{v:.3g}" + (f" ({v / reference:.0%})" if reference else "")
                 for v in values]
        ax.bar_label(bars, labels=texts, padding=2, fontsize="small")
    for bar, v in zip(bars, values):
        if np.isnan(v):  # no bar and, from bar_label, no text: say so where it would stand
            ax.annotate("not measured", xy=(bar.get_x() + bar.get_width() / 2, 0), xytext=(0, 2),
                        textcoords="offset points", ha="center", va="bottom", fontsize="small")
    ax.set_ylabel(ylabel)
    ax.grid(True, axis="y", alpha=0.3)
    return ax
