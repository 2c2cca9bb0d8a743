"""Tests for llmops_lab.plots and llmops_lab.widgets: measured-vs-formula figures and controls."""
import matplotlib

matplotlib.use("Agg")

import ipywidgets  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from llmops_lab import plots, widgets  # noqa: E402


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def legend_texts(ax):
    return [t.get_text() for t in ax.get_legend().get_texts()]


def test_new_figure_shapes():
    fig, ax = plots.new_figure()
    assert isinstance(ax, matplotlib.axes.Axes)
    fig, axes = plots.new_figure(ncols=3, nrows=2, width=2.0, height=1.5)
    assert len(axes) == 6 and tuple(fig.get_size_inches()) == (6.0, 3.0)


def test_measured_vs_formula_names_the_curve():
    _, ax = plots.new_figure()
    x = [4, 1, 2, 3]  # unsorted on purpose
    out = plots.measured_vs_formula(ax, x, [8.2, 2.1, 3.9, 6.1], lambda n: 2 * n,
                                    formula_name="2 n", xlabel="n", ylabel="bytes",
                                    spread=[0.2, 0.1, 0.1, 0.3], logx=True)
    assert out is ax
    assert set(legend_texts(ax)) == {"measured", "2 n"}
    line = next(l for l in ax.get_lines() if l.get_label() == "2 n")
    np.testing.assert_allclose(line.get_ydata(), [2, 4, 6, 8])
    assert "2 n" in [t.get_text() for t in ax.texts]  # the end-of-line label
    assert ax.get_xscale() == "log" and ax.get_xlabel() == "n"


def test_measured_vs_formula_several_formulas_and_values():
    _, ax = plots.new_figure()
    x = [2, 1]
    plots.measured_vs_formula(ax, x, [3.0, 1.0], formulas={
        "as written": lambda n: n, "corrected": [4.0, 2.0]})
    assert {"measured", "as written", "corrected"} == set(legend_texts(ax))
    corrected = next(l for l in ax.get_lines() if l.get_label() == "corrected")
    np.testing.assert_allclose(corrected.get_ydata(), [2.0, 4.0])  # reordered with x


def test_measured_vs_formula_errors():
    _, ax = plots.new_figure()
    with pytest.raises(ValueError, match="formula_name"):
        plots.measured_vs_formula(ax, [1, 2], [1, 2], lambda n: n)
    with pytest.raises(ValueError, match="values"):
        plots.measured_vs_formula(ax, [1, 2], [1, 2], [1, 2, 3], formula_name="f")


def test_measured_vs_formula_refuses_mismatched_lengths():
    """Extra measured points (or spreads) used to be dropped without a word, too few an IndexError."""
    _, ax = plots.new_figure()
    for measured, spread in (([30, 10, 20, 99, 5], None), ([30, 10], None), ([30, 10, 20], [1, 2, 3, 4])):
        with pytest.raises(ValueError, match="values for 3 x values"):
            plots.measured_vs_formula(ax, [3, 1, 2], measured, lambda x: 10 * x, formula_name="f", spread=spread)
    with pytest.raises(ValueError, match="non-empty"):
        plots.measured_vs_formula(ax, [], [], lambda x: x, formula_name="f")


def _error_bars(ax):
    """(x, bottom, top) of each drawn error bar of the first errorbar container."""
    (bars,) = ax.containers[0].lines[2]
    return np.array(sorted((seg[0][0], seg[0][1], seg[1][1]) for seg in bars.get_segments() if len(seg)))


def test_measured_vs_formula_draws_p10_to_p90_around_the_median():
    """Error bars were ± (p90 - p10) / 2 around the median, which hid a lopsided spread (a few slow
    calls pull p90 up, not p10 down) and could reach below p10. With p10 and p90 they run from p10
    to p90 exactly, reordered with x like the points."""
    from llmops_lab.measure import Timing
    _, ax = plots.new_figure()
    slow_tail = Timing([1.0, 1.0, 1.0, 1.0, 1.1, 1.1, 1.1, 2.0, 3.0, 5.0])  # median 1.1, p10 1.0, p90 3.2
    steady = Timing([0.9, 1.0, 1.1])
    ts = {2: slow_tail, 1: steady}
    plots.measured_vs_formula(ax, list(ts), [t.median for t in ts.values()],
                              p10=[t.p10 for t in ts.values()], p90=[t.p90 for t in ts.values()])
    np.testing.assert_allclose(_error_bars(ax), [(1, steady.p10, steady.p90), (2, slow_tail.p10, slow_tail.p90)])
    assert slow_tail.p90 - slow_tail.median > 10 * (slow_tail.median - slow_tail.p10)   # lopsided, as drawn
    # spread alone (a width) still draws the symmetric bars it always did
    _, ax = plots.new_figure()
    plots.measured_vs_formula(ax, [1, 2], [1.0, 2.0], spread=[0.2, 0.4])
    np.testing.assert_allclose(_error_bars(ax), [(1, 0.9, 1.1), (2, 1.8, 2.2)])


def test_measured_vs_formula_refuses_p10_p90_that_do_not_fit():
    _, ax = plots.new_figure()
    with pytest.raises(ValueError, match="p10 and p90 go together"):
        plots.measured_vs_formula(ax, [1, 2], [1.0, 2.0], p10=[0.9, 1.9])
    with pytest.raises(ValueError, match="spread or p10 and p90"):
        plots.measured_vs_formula(ax, [1, 2], [1.0, 2.0], spread=[0.1, 0.1], p10=[0.9, 1.9], p90=[1.1, 2.1])
    with pytest.raises(ValueError, match="2 p90 values for 3 x values"):
        plots.measured_vs_formula(ax, [1, 2, 3], [1.0, 2.0, 3.0], p10=[0.9, 1.9, 2.9], p90=[1.1, 2.1])
    # matplotlib's "'yerr' must not contain negative values" did not say which point or why
    with pytest.raises(ValueError, match=r"between p10 and p90; at x=2: p10 2.5, measured 2, p90 3"):
        plots.measured_vs_formula(ax, [1, 2], [1.0, 2.0], p10=[0.9, 2.5], p90=[1.1, 3.0])
    assert not ax.containers                                      # refused before anything was drawn


def test_formulas_get_the_x_values_as_given():
    """Integer x stays integer for the formula (the formulas refuse 512.0 tokens), numpy's too."""
    from llmops_lab import formulas
    _, ax = plots.new_figure()
    for x in ([512, 1024], np.array([512, 1024])):
        plots.measured_vs_formula(ax, x, [1.0, 2.0], lambda s: formulas.num_blocks(s, 16), formula_name="blocks")


def test_bar_compare_against_reference():
    _, ax = plots.new_figure()
    out = plots.bar_compare(ax, ["naive", "fused"], [100.0, 250.0], ylabel="GB/s",
                            reference=500.0, reference_label="measured ceiling")
    assert out is ax and len(ax.patches) == 2
    texts = [t.get_text() for t in ax.texts]
    assert "250 (50%)" in texts
    assert any("measured ceiling" in t for t in legend_texts(ax))


def test_bar_compare_refuses_what_it_would_draw_wrong():
    """Equal labels share one tick (two bars on top of each other, one hidden); a NaN reference
    labelled every bar "(nan%)", a negative one "-50%"."""
    _, ax = plots.new_figure()
    with pytest.raises(ValueError, match=r"labels must differ, got \['a'\]"):
        plots.bar_compare(ax, ["a", "a"], [1, 2], ylabel="y")
    for reference in (float("nan"), float("inf"), -2.0, 0):
        with pytest.raises(ValueError, match="reference must be a finite positive number"):
            plots.bar_compare(ax, ["a", "b"], [1, 2], ylabel="y", reference=reference)
    with pytest.raises(ValueError, match="finite"):
        plots.bar_compare(ax, ["a", "b"], [1, float("inf")], ylabel="y")
    with pytest.raises(ValueError, match="2 labels for 3 values"):
        plots.bar_compare(ax, ["a", "b"], [1, 2, 3], ylabel="y")
    with pytest.raises(TypeError, match="values must be a list of numbers"):
        plots.bar_compare(ax, ["a"], 5, ylabel="y")
    assert len(ax.patches) == len(ax.texts) == len(ax.lines) == 0   # refused before anything was drawn


@pytest.mark.parametrize("annotate", [True, False])
def test_bar_compare_says_not_measured(annotate):
    """A NaN (or None) value drew no bar and an empty label: the bar vanished without a word."""
    _, ax = plots.new_figure()
    plots.bar_compare(ax, ["a", "b", "c"], [100.0, float("nan"), None], ylabel="y", reference=200.0,
                      annotate=annotate)
    texts = [t.get_text() for t in ax.texts]
    assert texts.count("not measured") == 2 and ("50" in texts[0]) == annotate
    assert not any("nan" in t for t in texts)


def test_measured_vs_formula_counts_points_it_cannot_draw():
    """NaN measured, x or formula values (and, on a log axis, values <= 0) were silent gaps; a NaN at
    a curve's end hid its name."""
    _, ax = plots.new_figure()
    with pytest.warns(UserWarning, match="points are not drawn") as seen:
        plots.measured_vs_formula(ax, [1, 2, 3], [1.0, None, 3.0], [1.0, 2.0, float("nan")], formula_name="f")
    assert sorted(str(w.message) for w in seen) == [
        "measured_vs_formula: 'measured': 1 of 3 points are not drawn (NaN or infinite)",
        "measured_vs_formula: formula 'f': 1 of 3 points are not drawn (NaN or infinite)"]
    assert [t.xy for t in ax.texts if t.get_text() == "f"] == [(2.0, 2.0)]   # named at its last drawn point
    with pytest.warns(UserWarning, match="2 of 3 points .*not positive on a log axis"):
        plots.measured_vs_formula(ax, [1, 2, 3], [0.0, -1.0, 3.0], logy=True)


def test_measured_vs_formula_names_badly_shaped_values():
    """measured=5 was "object of type 'int' has no len()", a 2-D list "too many values to unpack"."""
    _, ax = plots.new_figure()
    with pytest.raises(TypeError, match="measured must be a list of numbers"):
        plots.measured_vs_formula(ax, [1, 2, 3], 5)
    with pytest.raises(ValueError, match=r"measured must be a flat list .* shape \(2, 2\)"):
        plots.measured_vs_formula(ax, [1, 2], [[1, 2], [3, 4]])
    with pytest.raises(TypeError, match="x must be a list of numbers, got int"):
        plots.measured_vs_formula(ax, 5, [1])
    with pytest.raises(TypeError, match="formula 'f' must be a list of numbers"):
        plots.measured_vs_formula(ax, [1, 2], [1, 2], 3, formula_name="f")


def test_widget_helpers_return_widgets():
    assert isinstance(widgets.int_slider("bits", 2, 8, value=4), ipywidgets.IntSlider)
    assert isinstance(widgets.float_slider("p", 0.0, 1.0), ipywidgets.FloatSlider)
    log = widgets.log_slider("tokens", 1, 4096, value=64, base=2, step=1)
    assert isinstance(log, ipywidgets.FloatLogSlider) and (log.min, log.max) == (0, 12)
    assert log.value == 64
    menu = widgets.dropdown("dtype", {"fp16": 2, "int4": 0.5})
    assert isinstance(menu, ipywidgets.Dropdown) and menu.value == 2


@pytest.mark.parametrize("base, lo, hi", [(10, 2, 1000), (10, 1e-3, 1), (10, 1, 1e6), (2, 1, 4096), (3, 1, 81)])
def test_log_slider_reaches_its_ends_exactly(base, lo, hi):
    # math.log(1000, 10) is 2.9999999999999996: the slider's top was 999.999999999999, and a value
    # of 1000 (notebook 04's arrival rate) reached the callback as that
    top, bottom = widgets.log_slider("f", lo, hi, value=hi, base=base), widgets.log_slider("f", lo, hi, base=base)
    assert (top.value, bottom.value) == (hi, lo)
    top.value = hi
    assert top.value == hi


@pytest.mark.parametrize("make, match", [
    (lambda: widgets.dropdown("d", {}), "at least one"), (lambda: widgets.dropdown("d", []), "at least one"),
    (lambda: widgets.log_slider("f", 1, float("nan")), "min < max"), (lambda: widgets.log_slider("f", 0, 8), "min < max"),
    (lambda: widgets.log_slider("f", 1, 8, base=1), "base"), (lambda: widgets.log_slider("f", 1, 8, value=16), "outside"),
    # These were taken: a value outside moved to the nearest end (50 -> 10), a NaN range or a step of 0 kept.
    (lambda: widgets.int_slider("x", 0, 10, value=50), "outside"), (lambda: widgets.int_slider("x", 0, 10, step=0), "step"),
    (lambda: widgets.int_slider("x", 0, 10, step=-1), "step"), (lambda: widgets.int_slider("x", 0, 10.5), "max must be"),
    (lambda: widgets.int_slider("x", 5, 5), "min < max"), (lambda: widgets.int_slider("x", 0, 10, value=True), "value"),
    (lambda: widgets.float_slider("x", 0.0, 1.0, value=7.0), "outside"),
    (lambda: widgets.float_slider("x", 0.0, float("nan")), "max must be a finite"),
    (lambda: widgets.float_slider("x", 1.0, 0.0), "min < max"), (lambda: widgets.float_slider("x", 0.0, 1.0, 0.0), "step"),
    (lambda: widgets.log_slider("f", 1, 8, step=0), "step"), (lambda: widgets.log_slider("f", 1, 8, step=-1), "step"),
])
def test_widget_helpers_refuse_bad_ranges(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_interactive_plot_redraws_on_change():
    seen = []

    def draw(ax, bits, label):
        seen.append((bits, label))
        ax.plot([0, 1], [bits, bits])

    slider = widgets.int_slider("bits", 2, 8, value=4)
    box = widgets.interactive_plot(draw, bits=slider, label="fixed")
    assert isinstance(box, ipywidgets.VBox)
    controls, output = box.children
    assert controls.children[0] is slider and isinstance(output, ipywidgets.Output)
    status = controls.children[1]                     # how long the last redraw took
    assert isinstance(status, ipywidgets.Label) and status.value.startswith("drawn in")
    slider.value = 6
    assert seen == [(4, "fixed"), (6, "fixed")]
    assert plt.get_fignums() == []  # each redraw closes its figure
