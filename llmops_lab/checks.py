"""Type predicates the argument checks share: a count is an integer and a rate a real number,
Python's or numpy's, but never a bool (``max_tokens=True`` is a mistake, not 1)."""
from __future__ import annotations

import numbers


def is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)
