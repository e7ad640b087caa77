"""One rule for every progress bar the tool draws (apply, eval, analyze, tokenising).

On a terminal: a tqdm bar, redrawn in place. Anywhere else (stderr piped into a log file, a
scheduler's output file) a redrawn bar is a string of ``\\r`` frames glued onto the log's lines,
so the same bar is written as a plain line every ``LOG_EVERY_S`` seconds instead, with its
percentage, rate and ETA, and a last one when it ends. Work done within the first interval writes
no line at all: the command's own summary line says what it did.
"""

from __future__ import annotations

import sys
from typing import Any

LOG_EVERY_S = 30.0
LOG_FORMAT = "{desc}: {percentage:3.0f}% ({n_fmt}/{total_fmt}) [{elapsed} elapsed, {remaining} left, {rate_fmt}]"


def on_terminal() -> bool:
    return sys.stderr.isatty()


class _LogLines:
    """A file for tqdm that writes each frame it draws as a whole line (a log file has no ``\\r``)."""

    def __init__(self, stream):
        self.stream = stream
        self.last_count = None

    def write(self, text: str) -> None:
        line = text.replace("\r", "").rstrip()
        if not line:  # tqdm clears a bar with a frame of spaces: nothing to log
            return
        # tqdm draws the last frame again on close; the same count twice says nothing new
        count = line.split(" [", 1)[0]
        if count != self.last_count:
            self.stream.write(line + "\n")
            self.last_count = count

    def flush(self) -> None:
        self.stream.flush()


def progress_bar(total: float, desc: str, *, enabled: bool = True, leave: bool = False, **tqdm_kwargs: Any):
    """A tqdm bar under the rule above; ``enabled=False`` (``--quiet``) draws nothing at all.

    ``leave`` applies on a terminal; in a log the last line always stays."""
    # tqdm.std, not tqdm.auto: the auto variant imports asyncio (~25 ms), a sixth of a small
    # model's whole apply, and these are command-line jobs, not notebook widgets.
    from tqdm.std import tqdm

    if not enabled:
        return tqdm(total=total, disable=True)
    if on_terminal():
        return tqdm(total=total, desc=desc, leave=leave, dynamic_ncols=True, **tqdm_kwargs)
    # leave: the final count is drawn on close; delay: no "0%, ? left" line, nothing for short work
    # miniters=1: no dynamic miniters, so tqdm's monitor thread (every 10 s) never forces a frame between two
    # updates: such a frame repeats the count and a stale ETA, and comes sooner than LOG_EVERY_S
    return tqdm(total=total, desc=desc, leave=True, file=_LogLines(sys.stderr), mininterval=LOG_EVERY_S, miniters=1,
                delay=LOG_EVERY_S, bar_format=LOG_FORMAT, **tqdm_kwargs)
