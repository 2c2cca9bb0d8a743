"""Round-to-nearest error against its bound: the document's (``formulas.quant_error_bound_*``)
and the one the scheme itself guarantees, as histograms of per-weight ratios, and their plot."""
from __future__ import annotations

import torch

from .. import formulas
from ..checks import is_int
from .rtn import quantize_rtn

def error_histogram(weight: torch.Tensor, bits: int, group_size: int | None = 128, sym: bool = False,
                    bins: int = 40) -> dict:
    """Round-to-nearest errors of ``weight`` [O, I] in units of each weight's own group bound.

    ratio_document = |w - q(w)| / ((w_max - w_min) / (2^(b+1) - 2)) with the group's min and max
    (the document's bound, ``formulas.quant_error_bound_asymmetric``); ratio_scheme = the same error
    over the bound the scheme itself guarantees (``check_error_bound``'s derived bound: the range
    widened to contain 0 for a zero point, absmax / (2^b - 2) for symmetric). A ratio above 1 breaks
    that bound. Returns both histograms on shared edges, the fractions above 1 and the max ratios.
    """
    if not is_int(bins) or bins < 1:
        raise ValueError(f"bins must be an integer >= 1, got {bins!r}")
    qw = quantize_rtn(weight, bits=bits, group_size=group_size, sym=sym)
    g = qw.group_size
    x = weight.detach().double().reshape(weight.shape[0], -1, g)                      # [O, G, g]
    err = (x - qw.dequantize(torch.float64).reshape(x.shape)).abs()
    lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    per_unit = formulas.quant_error_bound_asymmetric(0.0, 1.0, bits)
    document = per_unit * (hi - lo)
    scheme = (formulas.quant_error_bound_symmetric(1.0, bits) * torch.maximum(lo.abs(), hi.abs()) if sym
              else per_unit * (hi.clamp(min=0) - lo.clamp(max=0)))
    tiny = torch.finfo(torch.float64).tiny
    r_doc, r_scheme = (err / document.clamp(min=tiny)).flatten(), (err / scheme.clamp(min=tiny)).flatten()
    top = max(1.25, float(r_doc.max()) * 1.02)
    edges = torch.linspace(0, top, bins + 1, dtype=torch.float64)
    # float32 storage of the weight costs a few ulps: above 1 by less than 1e-5 is not a violation
    return {"bits": bits, "group_size": g, "sym": sym, "edges": edges.tolist(),
            "document_counts": torch.histogram(r_doc, edges).hist.tolist(),
            "scheme_counts": torch.histogram(r_scheme, edges).hist.tolist(),
            "document_fraction_above": float((r_doc > 1 + 1e-5).double().mean()),
            "scheme_fraction_above": float((r_scheme > 1 + 1e-5).double().mean()),
            "document_max_ratio": float(r_doc.max()), "scheme_max_ratio": float(r_scheme.max()),
            "max_error": float(err.max())}


def plot_error_histogram(ax, hist: dict):
    """Both histograms of ``error_histogram`` with the bound at 1."""
    edges = hist["edges"]
    for key, label in (("scheme_counts", "error / the scheme's own bound"),
                       ("document_counts", "error / the document's bound")):
        ax.stairs(hist[key], edges, label=label, fill=key == "scheme_counts", alpha=0.6 if key == "scheme_counts" else 1)
    ax.axvline(1.0, color="black", linestyle="--", linewidth=1, label="bound")
    g = hist["group_size"]
    ax.set(xlabel="|w - quantize(w, b)| / bound (per group)", ylabel="weights", yscale="log",
           title=f"{hist['bits']} bits, group {g}, {'symmetric' if hist['sym'] else 'zero point'}: "
                 f"{hist['document_fraction_above']:.1%} above the document's bound")
    ax.legend(fontsize="small")
    return ax
