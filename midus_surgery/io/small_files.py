"""Reading the files the tool keeps beside its outputs (markers, checkpoint state, plans, logs) back from
folders other people and tools may also write to.

Only a regular file is read, and a bookkeeping file only up to a bound: a named pipe in a marker's place
made apply, verify, train and analyze wait forever for a writer, and a marker linked to /dev/zero grew
apply to 5 GB before a MemoryError (trial66). What is not a regular file, or is larger than any file the
tool writes there, raises ``NotBookkeeping`` (an ``OSError``), which every reader already treats as
"unreadable": not ours, not a checkpoint, not an apply output. A marker is rewritten whole or not at all
(``write_text_atomically``).
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

SMALL_BYTES = 16 << 20  # markers, plans and state files are a few KB; a marker listing a large output's files, a few MB


class NotBookkeeping(OSError):
    """A path where the tool keeps a file of its own holds something else (a pipe, a device, a folder, a huge file)."""


def regular_file_problem(path: Path) -> str | None:
    """Why ``path`` (which exists) is not a regular file the tool may open, or None. Links are followed."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        return exc.strerror or str(exc)
    if stat.S_ISREG(mode):
        return None
    return f"{path} is {file_kind(mode)}, not a regular file"


def file_kind(mode: int) -> str:
    """What a path of ``mode`` (os.stat's st_mode) that is not a regular file is, in words."""
    return "a named pipe" if stat.S_ISFIFO(mode) else "a folder" if stat.S_ISDIR(mode) else "a socket" if stat.S_ISSOCK(mode) else "a device"


def read_small_bytes(path: str | os.PathLike, limit: int = SMALL_BYTES, *, follow_links: bool = True) -> bytes:
    """The bytes of the regular file ``path``, at most ``limit`` of them; FileNotFoundError when it is not there.
    ``follow_links=False``: a symlink at ``path`` is an OSError (ELOOP), not the file it points to."""
    # O_NONBLOCK: opening a pipe nothing writes to returns at once instead of waiting (then refused by fstat)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | (0 if follow_links else os.O_NOFOLLOW))
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise NotBookkeeping(regular_file_problem(Path(path)) or f"{path} is not a regular file")
        if info.st_size > limit:
            raise NotBookkeeping(f"{path} is {info.st_size:,} bytes, more than the {limit:,} a file of its kind holds (not one the tool or transformers wrote)")
        os.set_blocking(fd, True)
        with os.fdopen(fd, "rb", closefd=False) as handle:
            data = handle.read(limit + 1)
    finally:
        os.close(fd)
    if len(data) > limit:  # grew while read
        raise NotBookkeeping(f"{path} is more than {limit:,} bytes")
    return data


def read_small_text(path: str | os.PathLike, limit: int = SMALL_BYTES, *, follow_links: bool = True) -> str:
    """``read_small_bytes`` decoded as UTF-8 (UnicodeDecodeError, a ValueError, when it is not)."""
    return read_small_bytes(path, limit, follow_links=follow_links).decode("utf-8")


@contextlib.contextmanager
def replaced_atomically(path: Path):
    """Yields a path beside ``path`` to write; renamed over ``path`` when the block ends, removed when it fails. So
    ``path`` holds the new file whole or its earlier content, never a part, and is a new file: one hard-linked
    elsewhere (a run directory copied with cp -al) leaves the other link's content as it was."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomically(path: Path, text: str) -> None:
    """``path`` holds ``text`` whole or its earlier content, never a part (``replaced_atomically``). A marker rewritten
    in place (truncated, then written) and killed between the two read as no marker, and its full-size partial output
    was never cleaned up (trial66)."""
    with replaced_atomically(path) as tmp:
        tmp.write_text(text)
