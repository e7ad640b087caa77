"""transformers' own terminal output, on or off for a block: its progress bars, its notes to itself.

Our commands print their own progress and one-line errors; what transformers prints on the way
(a "`torch_dtype` is deprecated" note from its GGUF reader, its loading bars, the GGUF reader's
de-quantizing bar, which is a bare tqdm) is not the user's to act on, and ``--quiet`` means quiet.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re


@contextlib.contextmanager
def hf_progress_bars(enabled: bool):
    """transformers' own bars ("Loading weights") on or off for a block, as they were after it."""
    from transformers.utils import logging as hf_logging

    from midus_surgery.io.progress import on_terminal

    enabled = enabled and on_terminal()  # a bar redrawn in a log file is a line of \r frames
    was = hf_logging.is_progress_bar_enabled()
    (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
    try:
        yield
    finally:
        (hf_logging.enable_progress_bar if was else hf_logging.disable_progress_bar)()


@contextlib.contextmanager
def transformers_quiet(progress: bool = True):
    """transformers' warnings off for a block (its errors still raise); with ``progress`` off, every
    bar it draws too, its bare tqdm ones included (they write to ``sys.stderr``)."""
    from transformers.utils import logging as hf_logging

    from midus_surgery.io.progress import on_terminal

    progress = progress and on_terminal()  # the GGUF reader's bare bar, redrawn in a log file: \r frames
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with hf_progress_bars(progress), contextlib.ExitStack() as stack:
            if not progress:
                stack.enter_context(contextlib.redirect_stderr(stack.enter_context(open(os.devnull, "w"))))
            yield
    finally:
        hf_logging.set_verbosity(level)


_REPORT_ROW = re.compile(r"^(\S+)\s*\|\s*(MISSING|CONVERSION|MISMATCH)\b")
_STYLE = re.compile(r"\x1b\[[0-9;]*m")
_SAID = {"MISSING": "missing", "CONVERSION": "conversion failed", "MISMATCH": "shape mismatch"}


@contextlib.contextmanager
def kept_load_report():
    """transformers' load report (its LOAD REPORT table of MISSING / CONVERSION / MISMATCH tensors, logged
    as a warning) kept, not printed: (key, status) rows; the logger's other records pass as they did. A
    failed load's exception says only "look at the report above", which a quiet load never printed."""
    logger = logging.getLogger("transformers.modeling_utils")
    rows: list[tuple[str, str]] = []
    shown = logger.getEffectiveLevel()

    class Keep(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            message = record.getMessage()
            if "LOAD REPORT" not in message:
                return record.levelno >= shown
            for line in _STYLE.sub("", message).splitlines():
                if match := _REPORT_ROW.match(line):
                    rows.append((match.group(1), match.group(2)))
            return False

    keep, level = Keep(), logger.level
    logger.addFilter(keep)
    if shown > logging.WARNING:  # the report is a warning: kept under a quiet verbosity too (a level set on this
        logger.setLevel(logging.WARNING)  # logger otherwise turns on transformers' tensor-parallel plan warning)
    try:
        yield rows
    finally:
        logger.removeFilter(keep)
        logger.setLevel(level)


def load_report_words(rows: list[tuple[str, str]], most: int = 4) -> str:
    """The kept report's tensors in words: 'a.weight (missing, conversion failed), ...'."""
    keys: dict[str, list[str]] = {}
    for key, status in rows:
        keys.setdefault(key, []).append(_SAID[status])
    named = ", ".join(f"{key} ({', '.join(dict.fromkeys(how))})" for key, how in list(keys.items())[:most])
    return named + (", ..." if len(keys) > most else "")
