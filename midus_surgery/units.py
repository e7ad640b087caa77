"""Numbers for people: one way to print a count (parameters, FLOPs) or a size in bytes everywhere the tool prints one."""

from __future__ import annotations


def human_count(n: float) -> str:
    """``1234567`` -> ``1.23M``: two decimals and a T/B/M/K suffix, plain below a thousand."""
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def human_bytes(n: float) -> str:
    """``3 * 2**29`` -> ``1.50 GiB``: two decimals and a binary unit, plain bytes below a KiB."""
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"
