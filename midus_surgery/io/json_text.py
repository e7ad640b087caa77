"""JSON as other tools read it: Python's ``json`` writes ``NaN`` and ``Infinity``, which jq, JavaScript and
strict parsers refuse, so a non-finite number is written as ``null``. And JSON as the tool reads a file it did not
write (a marker, a checkpoint's state, a model's config): every way such a file is wrong is a ``ValueError``."""

from __future__ import annotations

import json
import math


def finite_or_null(value):
    """``value`` with every non-finite float inside it (dicts, lists, tuples) replaced by ``None``."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(v) for v in value]
    return value


def strict_json(value, **dumps_options) -> str:
    """``json.dumps`` that never writes ``NaN`` or ``Infinity`` (``null`` in their place)."""
    return json.dumps(finite_or_null(value), allow_nan=False, **dumps_options)


def _float_in_range(text: str) -> float:
    """json parse_float: a number past a float's range (``1e400``) is refused where it is read; Python's reader makes it
    ``inf``, which no writer of these files writes as a number, and ``int(inf)`` later is an OverflowError traceback."""
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"the number {text[:40]} is out of range")
    return value


def loads_checked(text: str | bytes, **loads_options):
    """``json.loads`` of a file the user (or whoever made a folder) controls, every failure a ``ValueError``, which its
    callers already catch: brackets nested too deep for Python's reader (a RecursionError, not a ValueError, about
    100,000 deep) and a number out of range are said as such, not raised as a traceback (trial92 F8)."""
    try:
        return json.loads(text, parse_float=_float_in_range, **loads_options)
    except RecursionError:
        raise ValueError("JSON nested too deeply to read") from None
