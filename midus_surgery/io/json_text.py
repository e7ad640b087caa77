"""JSON as other tools read it: Python's ``json`` writes ``NaN`` and ``Infinity``, which jq, JavaScript and
strict parsers refuse, so a non-finite number is written as ``null``."""

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
