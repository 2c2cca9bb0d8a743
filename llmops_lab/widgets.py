"""Widgets: sliders and dropdowns that redraw a measurement plot in a notebook.

A notebook cell stays one call::

    widgets.interactive_plot(draw, bits=widgets.int_slider("bits", 2, 8, value=4))

where ``draw(ax, bits)`` draws on a fresh Axes. ipywidgets is imported only when a helper is
called, so the package imports (and its tests run) without it.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .checks import is_int, is_real

_STYLE = {"description_width": "initial"}  # long descriptions are not cut off


def _ipywidgets():
    try:
        import ipywidgets
    except ImportError as err:
        raise ImportError("the notebook helpers need ipywidgets: pip install ipywidgets") from err
    return ipywidgets


def _check_range(check, kind: str, min, max, step, value) -> None:
    """The slider's numbers are ``kind``s (``check``), min < max, step > 0 and value in [min, max]:
    ipywidgets would move a value outside to the nearest end and accept a NaN or a step of 0."""
    for name, x in (("min", min), ("max", max), ("step", step), ("value", value)):
        if x is not None and not (check(x) and (is_int(x) or math.isfinite(x))):
            raise ValueError(f"{name} must be a finite {kind}, got {x!r}")
    if not min < max:
        raise ValueError(f"need min < max, got {min=} {max=}")
    if step is not None and step <= 0:
        raise ValueError(f"step must be positive, got {step}")
    if value is not None and not min <= value <= max:
        raise ValueError(f"value {value} lies outside [{min}, {max}]")


def int_slider(description: str, min: int, max: int, step: int = 1, value: int | None = None):
    """An IntSlider that updates on release, since each value may rerun a measurement."""
    _check_range(is_int, "integer", min, max, step, value)
    return _ipywidgets().IntSlider(value=min if value is None else value, min=min, max=max,
                                   step=step, description=description,
                                   continuous_update=False, style=_STYLE)


def float_slider(description: str, min: float, max: float, step: float | None = None,
                 value: float | None = None):
    """A FloatSlider; step defaults to a hundredth of the range."""
    _check_range(is_real, "number", min, max, step, value)
    return _ipywidgets().FloatSlider(value=min if value is None else value, min=min, max=max,
                                     step=(max - min) / 100 if step is None else step,
                                     description=description, continuous_update=False,
                                     style=_STYLE)


def _exponent(x: float, base: float) -> float:
    """log_base(x), exact where x is a power of base: math.log(1000, 10) is 2.9999999999999996, and
    a FloatLogSlider with that max clamps its value to 999.999999999999, so its own end (and a
    default set to it) was never handed to the callback."""
    e = math.log10(x) if base == 10 else math.log2(x) if base == 2 else math.log(x, base)
    n = round(e)
    return float(n) if abs(e - n) < 1e-9 and base ** n == x else e


def log_slider(description: str, min: float, max: float, value: float | None = None,
               base: float = 10, step: float = 0.1):
    """A FloatLogSlider over [min, max].

    min and max are values, not exponents (FloatLogSlider's own min/max are exponents);
    step is in exponents: ``log_slider("tokens", 1, 4096, base=2, step=1)`` gives powers of two.
    """
    if not (0 < min < max < math.inf):      # a NaN fails every comparison: refused too
        raise ValueError(f"need 0 < min < max (finite), got {min=} {max=}")
    if not (base > 0 and base != 1 and math.isfinite(base)):
        raise ValueError(f"base must be a positive number other than 1, got {base}")
    if value is not None and not min <= value <= max:
        raise ValueError(f"value {value} lies outside [{min}, {max}]")
    if not (is_real(step) and 0 < step < math.inf):  # ipywidgets took 0 and negative steps
        raise ValueError(f"step must be a positive number (of exponents), got {step!r}")
    return _ipywidgets().FloatLogSlider(value=min if value is None else value, base=base,
                                        min=_exponent(min, base), max=_exponent(max, base),
                                        step=step, description=description,
                                        continuous_update=False, style=_STYLE)


def dropdown(description: str, options: Sequence | Mapping, value: Any = None):
    """A Dropdown; options are a list of values or a {label: value} dict."""
    options = dict(options) if isinstance(options, Mapping) else list(options)
    if not options:
        raise ValueError(f"dropdown {description!r} needs at least one option")
    if value is None:
        value = next(iter(options.values())) if isinstance(options, dict) else options[0]
    return _ipywidgets().Dropdown(options=options, value=value, description=description,
                                  style=_STYLE)


def interactive_plot(fn: Callable, **controls):
    """Redraw ``fn(ax, **values)`` on a fresh figure whenever a control changes.

    Args:
        fn: draws on the Axes it is given; its keyword arguments are the control names.
        controls: widgets by argument name; plain values are passed through unchanged.

    Returns:
        A VBox (controls above the plot) for the notebook to display. A label after the controls
        says when a redraw is running and how long the last one took: some measure for tens of
        seconds, and a plot that stays as it was would look frozen.
    """
    import time
    ipw = _ipywidgets()
    kwargs = {name: c if isinstance(c, ipw.ValueWidget) else ipw.fixed(c)
              for name, c in controls.items()}
    status = ipw.Label()

    def draw(**values):
        import matplotlib.pyplot as plt
        from IPython.display import display

        from llmops_lab.plots import new_figure
        status.value = "measuring and redrawing..."
        t0 = time.perf_counter()
        fig, ax = new_figure()
        try:
            fn(ax, **values)
            display(fig)
            status.value = f"drawn in {time.perf_counter() - t0:.1f} s"
        except Exception:
            status.value = "failed: see below"
            raise
        finally:
            plt.close(fig)  # one live figure per redraw, not one more per slider move

    output = ipw.interactive_output(draw, kwargs)
    visible = [c for c in kwargs.values() if isinstance(c, ipw.DOMWidget)]
    return ipw.VBox([ipw.HBox(visible + [status]), output])
