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


INT_BOUND = 2**63  # a count, an offset, a step or a size of the tool's files fits a signed 64-bit integer


def _refuse_constant(name: str):
    """json parse_constant: ``Infinity``, ``-Infinity`` and ``NaN``, which Python's reader takes though JSON has no such
    numbers. A safetensors header with ``[0, Infinity]`` offsets passed the reader and ``int(inf)`` was an OverflowError
    traceback at a resume (trial95 F5)."""
    raise ValueError(f"{name} is not a JSON number")


def _int_in_bound(text: str) -> int:
    """json parse_int: an integer a 64-bit field holds. ``samples_seen`` of 10**400 in a checkpoint's state passed the
    reader and its division into a float was an OverflowError traceback (trial95 F5). The digits are counted before
    converting: Python's int() of thousands of digits is slow, and past 4,300 a ValueError of its own."""
    if len(text) > 21 or abs(value := int(text)) >= INT_BOUND:
        raise ValueError(f"the integer {text[:40]}{'...' if len(text) > 40 else ''} is out of range (more than a 64-bit integer holds)")
    return value


def loads_checked(text: str | bytes, *, special_floats: bool = False, big_ints: bool = False, **loads_options):
    """``json.loads`` of a file the user (or whoever made a folder) controls, every failure a ``ValueError``, which its
    callers already catch: brackets nested too deep for Python's reader (a RecursionError, not a ValueError, about
    100,000 deep) and a number out of range are said as such, not raised as a traceback (trial92 F8).

    Refused unless asked for: ``Infinity``/``NaN`` (``special_floats``: a file ``json.dumps`` wrote with its defaults,
    or an older transformers' config: Mamba2's ``time_step_limit`` is ``[0.0, Infinity]``), and integers beyond 64 bits
    (``big_ints``: tokenizer_config.json's ``model_max_length`` is often ``int(1e30)``). :func:`loads_as_transformers`
    reads the files transformers reads."""
    options = {"parse_float": _float_in_range}
    if not special_floats:
        options["parse_constant"] = _refuse_constant
    if not big_ints:
        options["parse_int"] = _int_in_bound
    try:
        return json.loads(text, **options, **loads_options)
    except RecursionError:
        raise ValueError("JSON nested too deeply to read") from None


def loads_as_tokenizer_config(text: str | bytes):
    """A tokenizer_config.json as transformers' tokenizer loader reads it (plain ``json.load``: a number past a float's
    range is infinity, an integer of any length below Python's digit limit is read); deep nesting: a ``ValueError``, as
    for transformers, which fails on it too. Whatever reads the file to say what code it names must read what
    transformers reads: a stricter reader saw no code where transformers ran some."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def loads_as_transformers(text: str | bytes, **loads_options):
    """A model's config.json, tokenizer_config.json or weights index, taking what transformers' own reader takes
    (``Infinity``, ``NaN``, integers of any size) but deep nesting and numbers past a float's range: a ``ValueError``."""
    return loads_checked(text, special_floats=True, big_ints=True, **loads_options)
