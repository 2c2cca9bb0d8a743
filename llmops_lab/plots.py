"""Plots: a measurement next to the formula that predicts it.

Every notebook's central picture is the same one: measured points (with their spread) against the
curve of a named formula from ``llmops_lab.formulas``, or measured bars against a physical limit.
These helpers draw on an Axes the caller owns and return it; they never call ``plt.show()``.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

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


def _evaluate(formula: Formula, x: Sequence) -> np.ndarray:
    """A formula's values at x: called point by point with the x values as given (a count stays an
    int: the formulas refuse 512.0 tokens), so scalar-only functions work too."""
    if callable(formula):
        values = [float(formula(xi.item() if isinstance(xi, np.generic) else xi)) for xi in x]
    else:
        values = list(formula)
    values = np.asarray(values, dtype=float)
    if values.shape != (len(x),):
        raise ValueError(f"formula gives {values.shape[0]} values for {len(x)} x points")
    return values


def measured_vs_formula(ax, x: Sequence[float], measured: Sequence[float],
                        formula: Formula | None = None, *, formula_name: str | None = None,
                        formulas: Mapping[str, Formula] | None = None, label: str = "measured",
                        xlabel: str | None = None, ylabel: str | None = None,
                        logx: bool = False, logy: bool = False,
                        spread: Sequence[float] | None = None):
    """Measured points against one or more formula curves, each named on its line.

    Args:
        x, measured: the measurement, one value per x.
        formula, formula_name: one formula (a callable of one x, or its values at x) and its name.
        formulas: several formulas by name, instead of or besides ``formula``.
        spread: per-point p90 - p10 width (``Timing.spread``), drawn as ± spread / 2 error bars.

    Returns:
        ax
    """
    curves = dict(formulas or {})
    if formula is not None:
        if not formula_name:
            raise ValueError("formula_name is required with formula: the curve must be named")
        curves = {formula_name: formula, **curves}
    x_points = x.tolist() if hasattr(x, "tolist") else list(x)      # numpy or torch: Python numbers
    x_given = np.asarray(x_points, dtype=float)
    if x_given.ndim != 1 or len(x_given) == 0:
        raise ValueError(f"x must be a non-empty list of values, got shape {x_given.shape}")
    for name, values in (("measured", measured), ("spread", spread)):
        if values is not None and len(values) != len(x_given):   # extra points would be dropped unseen
            raise ValueError(f"{len(values)} {name} values for {len(x_given)} x values")
    order = np.argsort(x_given)  # lines and end-of-line labels assume increasing x
    x, measured = x_given[order], np.asarray(measured, dtype=float)[order]
    yerr = None if spread is None else np.asarray(spread, dtype=float)[order] / 2

    ax.errorbar(x, measured, yerr=yerr, fmt="o", capsize=3, label=label, zorder=3)
    for name, f in curves.items():
        y = _evaluate(f, list(x_points))[order]
        (line,) = ax.plot(x, y, "-", label=name)
        ax.annotate(name, xy=(x[-1], y[-1]), xytext=(4, 0), textcoords="offset points",
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

    With ``annotate`` each bar carries its value, and its fraction of ``reference`` when given.

    Returns:
        ax
    """
    values = np.asarray(values, dtype=float)
    if len(labels) != len(values):
        raise ValueError(f"{len(labels)} labels for {len(values)} values")
    bars = ax.bar(list(labels), values)
    if reference is not None:
        ax.axhline(reference, color="black", linestyle="--", linewidth=1,
                   label=f"{reference_label} ({reference:.3g})")
        ax.legend()
    if annotate:
        texts = [f"{v:.3g}" + (f" ({v / reference:.0%})" if reference else "") for v in values]
        ax.bar_label(bars, labels=texts, padding=2, fontsize="small")
    ax.set_ylabel(ylabel)
    ax.grid(True, axis="y", alpha=0.3)
    return ax
