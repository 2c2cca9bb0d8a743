"""Predicates the argument checks share: a count is an integer and a rate a real number, Python's or
numpy's, but never a bool (``max_tokens=True`` is a mistake, not 1); a model is float or quantized."""
from __future__ import annotations

import numbers


def is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def integer_ids(ids) -> list[int]:
    """Token ids as Python ints; a float (or a bool) is a ValueError, never truncated: int(5.7)
    would be another prompt."""
    bad = next((t for t in ids if not is_int(t)), None)
    if bad is not None:
        raise ValueError(f"token ids must be integers, got {bad!r} ({type(bad).__name__})")
    return [int(t) for t in ids]


def quantized_layers(model) -> list[str]:
    """Names of ``model``'s modules that hold quantized weights: our ``QuantLinear`` (its ``qweight``)
    and bitsandbytes' modules."""
    return [name for name, m in model.named_modules()
            if hasattr(m, "qweight") or type(m).__module__.startswith("bitsandbytes")]


def check_float_model(model, what: str) -> None:
    """ValueError when ``model`` has quantized layers: ``what`` reads float weights only."""
    names = quantized_layers(model)
    if names:
        raise ValueError(f"{what} takes a float model; {len(names)} layers of this one are quantized "
                         f"({', '.join(names[:3])}{', ...' if len(names) > 3 else ''}): pass the model "
                         f"before quantize()")
