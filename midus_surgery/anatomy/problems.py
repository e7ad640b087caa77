"""Why a block anatomy could not be found: one error type, and messages that say what to state."""

from __future__ import annotations

from typing import Any


class AnatomyError(Exception):
    """The block anatomy could not be found from the graph; the message says how to state it."""


def _recipe_hint(known: dict[str, Any] | None = None) -> str:
    """One line: what was found so far, and that the recipe can state the rest."""
    found = ", ".join(f"{k}={'[' + ', '.join(map(str, v)) + ']' if isinstance(v, (list, tuple)) else v}"
                      for k, v in (known or {}).items())
    return (f"Found so far: {found}. " if found else "") + (
        "A recipe can state the block instead, in an `anatomy:` block (docs/recipes.md#anatomy).")


def _error(what: str, known: dict[str, Any] | None = None, cause: BaseException | str | None = None) -> AnatomyError:
    """An AnatomyError of two lines: what could not be found (and why), then what was and what to state."""
    msg = f"Could not find {what}"
    if cause is not None:
        c = cause if isinstance(cause, str) else f"{type(cause).__name__}: {cause}"
        c = c.strip().splitlines()[0] if c.strip() else c
        msg += f" ({c[:240]}{'...' if len(c) > 240 else ''})"
    return AnatomyError(msg + ".\n" + _recipe_hint(known))
