"""Errors a user can cause. The CLI prints them as one clear message and exits non-zero."""

from __future__ import annotations

import errno
import os
import re
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, a scheduler cancelling the job) or SIGHUP (the terminal or ssh session closed),
    raised where the program is (the command line's handler): every path that cleans up after Ctrl-C (a partial
    output removed, logs closed) runs for it too. The exit status is 128 + the signal's number, as the shell's."""

    # The newest one the handler raised. Raised inside a Python callback of C++ code it may be lost there: torch.save
    # into a stream (DCP's sharded checkpoint) turns it into "unexpected pos" (trial87 F3); whoever sees that failure
    # finds the signal here and raises it instead.
    last: Terminated | None = None

    def __init__(self, signum: int = 15):  # SIGTERM
        super().__init__(signum)
        self.signum = int(signum)


def one_line(exc: BaseException, limit: int = 200, *, whole: bool = False) -> str:
    """``Type: first line of the message`` (cut at ``limit``): an exception as one line for the user.

    whole: every line of the message joined into one instead (load errors of transformers and
    torch name the tensor after their first line)."""
    text = str(exc).strip()
    if whole:
        return f"{type(exc).__name__}: {' '.join(text.split())[:limit]}"
    return f"{type(exc).__name__}: {text.splitlines()[0][:limit] if text else ''}"


def shown(name: str, limit: int = 120) -> str:
    """A name from the user's files, quoted and cut at ``limit`` characters: a tensor or file name
    in a crafted header or index can be megabytes long, and a message is one readable line."""
    return repr(name[:limit]) + (f" (cut; {len(name):,} characters)" if len(name) > limit else "")


def not_utf8_path(path) -> str | None:
    """Why a model folder cannot be read: its path holds bytes that are not UTF-8 (Linux allows them; Python keeps them as
    surrogate escapes), which the Rust readers, tokenizers and safetensors, refuse, so eval blamed the tokenizer and verify the
    weights (trial99 M4); None when it is UTF-8. The path as given: a relative one under a folder whose name is not UTF-8
    reads, since the libraries open it as given too (trial102 R06)."""
    try:
        os.fspath(path).encode("utf-8")
    except UnicodeEncodeError:
        return (f"{printable(str(path))}: its path is not UTF-8 text, which the tokenizers and safetensors libraries cannot open: "
                "rename the folder")
    return None


def model_folder_name_problem(path) -> str | None:
    """Why the tool may not write a model folder at ``path`` (resolved), in one line, or None: a path that is not UTF-8,
    which the tokenizers and safetensors libraries cannot read back (eval and verify then refuse it: trial99 M4, trial104),
    or one with a control character, which split every line naming it (a recipe folder's name reached apply's "wrote"
    line: trial104). Only for model folders: a token cache or an analysis is read by Python alone (trial103)."""
    text = os.fspath(path)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return (f"{printable(text)}: its path is not UTF-8 text, so the tokenizers and safetensors libraries could not read the "
                "model written there: choose a folder whose path is")
    if any(ord(c) < 32 or 127 <= ord(c) < 160 for c in text):  # C0, DEL and C1 (0x9b is a terminal's ESC [)
        return f"{printable(text)}: its path holds a control character, which a model folder is not named with: choose another folder"
    return None


def printable(text: str) -> str:
    """``text`` with its control characters written as escapes (``\\x1b``, ``\\n``): a name the user typed
    (a task, an output folder) echoed into a table or a "wrote" line must not move the cursor, colour
    the terminal or break the line (trial73 F9g). Plain text comes back unchanged."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def control_character_in_name(text: str) -> str | None:
    """Why a folder to write may not be named ``text``, when it holds a newline, tab or other control character, or None:
    such a name is a YAML slip (a block scalar, an escape in double quotes) far more often than a wish, and every line
    that names it (apply's 'wrote' line) split in two (trial66)."""
    bad = next((c for c in text if ord(c) < 32 or ord(c) == 127), None)
    return None if bad is None else f"{text!r} holds the control character {bad!r}: a folder to write is not named with one"


def lone_surrogate(text: str) -> str | None:
    """Why ``text`` is not text, when it holds half of a UTF-16 surrogate pair (a ``\\ud83d`` escape of JSON or YAML
    without its other half: no file, tokenizer or terminal takes it), said in words, or None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"holds a lone UTF-16 surrogate ({text[exc.start]!a} at character {exc.start}): half of a character"
    return None


def load_error_line(exc: BaseException, limit: int = 300) -> str:
    """An exception as one line; for torch's weights_only refusal, its reason, not its advice to load unsafely."""
    raw = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    if raw.startswith("Weights only load failed"):
        # torch's message: its advice to re-run unsafely, then (a paragraph of its own) the reason;
        # older versions put the reason after "WeightsUnpickler error:"
        reason = raw.split("WeightsUnpickler error:", 1)[1] if "WeightsUnpickler error:" in raw else raw.split("\n\n")[1:]
        reason = " ".join(" ".join(reason if isinstance(reason, list) else [reason]).split())
        reason = reason.split(" Please use")[0].split(" Check the documentation")[0].strip()
        return f"not plain tensors and numbers, refused by torch.load(weights_only=True) ({reason[:limit]})"
    if "weights_only" in raw and ("legacy .tar format" in raw or "weights_only set to False" in raw):
        # torch takes a damaged file (zeroed, say) for an old tar archive and advises loading it unsafely: not passed on
        # (trial74 F5: the advice, cut mid-word, was the whole message)
        return "not a file torch.save wrote (torch.load reads it as neither its zip format nor plain tensors: damaged or replaced)"
    return one_line(exc, limit, whole=True)


def is_library_panic(exc: BaseException) -> bool:
    """Whether ``exc`` is a panic inside a Rust extension (tokenizers, safetensors): pyo3 raises it as
    ``pyo3_runtime.PanicException``, which derives from BaseException, not Exception, so an
    ``except Exception`` guard misses it and the user gets a traceback (trial49: a tokenizer.json
    whose BPE merge gives a token not in its vocabulary). Told by its class name: pyo3_runtime is no
    module to import it from. A guard around such a library catches BaseException, takes a panic as
    the library failing on the file, and re-raises anything else (Ctrl-C, SystemExit)."""
    return type(exc).__name__ == "PanicException"


# what Rust's default panic hook writes: (an empty line,) "thread '<unnamed>' (123) panicked at src/x.rs:1:2:", the
# message, then its advice to set RUST_BACKTRACE, or (with RUST_BACKTRACE set) the backtrace and a last note
_RUST_PANIC_LINES = re.compile(
    rb"(?:^\n)?^thread '[^\n]*panicked at [^\n]*\n(?:(?!note: |stack backtrace:)[^\n]*\n)*?"
    rb"(?:note: run with `RUST_BACKTRACE=1`[^\n]*\n|stack backtrace:\n(?:[ \t][^\n]*\n)*(?:note: [^\n]*RUST_BACKTRACE=full[^\n]*\n)?)",
    re.M)


@contextmanager
def quiet_library_panic():
    """Around a call into a Rust extension whose panic the caller reports in one line of its own: Rust's
    panic hook writes the panic to the process's stderr (file descriptor 2, past sys.stderr) before pyo3
    raises it, a block of lines naming the library's source files above that line. Held back here;
    everything else written meanwhile is passed on after the call (without file descriptor 2 or a
    temporary file, nothing is held). Its backtrace too, with RUST_BACKTRACE set: a setting for Rust's
    developers, and the library's internals say nothing of the user's file."""
    held = saved = None
    try:
        sys.stderr.flush()
        held = tempfile.TemporaryFile()
        saved = os.dup(2)
        os.dup2(held.fileno(), 2)
    except (OSError, ValueError, AttributeError):
        if saved is not None:
            os.close(saved)
        if held is not None:
            held.close()
        held = saved = None
    if held is None:
        yield
        return
    try:
        yield
    finally:
        try:
            sys.stderr.flush()
        except (OSError, ValueError, AttributeError):
            pass
        os.dup2(saved, 2)
        os.close(saved)
        with held:
            held.seek(0)
            rest = memoryview(_RUST_PANIC_LINES.sub(b"", held.read()))
        try:
            while rest:
                rest = rest[os.write(2, rest):]
        except OSError:  # stderr gone (its reader closed): nothing to pass on to
            pass


class MidusError(Exception):
    """Base of every error caused by user input (recipes, paths, weights, data)."""

    exit_code = 1


class UsageError(MidusError):
    """A command-line value that cannot work (a device this machine lacks, a path that is no model
    directory, a missing config): exit 2, as argparse's own usage errors, so that exit 1 keeps
    meaning "ran, and found a problem" (verify's failed checks)."""

    exit_code = 2


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a recipe, located in its YAML file when known."""

    where: str  # "recipe.yaml:12:5" or "recipe.yaml" when no position is known
    field: str  # dotted path of the field, e.g. "layout.interleave.after_every"; "" for the whole file
    message: str

    def __str__(self) -> str:
        field = f" {self.field}:" if self.field else ""
        return f"{printable(self.where)}:{field} {self.message}"  # a file named with a newline split the line (trial99 M3)


class RecipeError(MidusError):
    """A recipe is invalid; carries every problem found, each with file:line:col."""

    exit_code = 2

    def __init__(self, problems: list[Problem]):
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


# what a full, size-capped or read-only temp disk raises, as OSError or inside safetensors' and torch's own errors
DISK_PROBLEMS = ("No space left on device", "Disk quota exceeded", "File too large", "Read-only file system", "os error 28")


@contextmanager
def naming_the_file(path) -> Iterator[None]:
    """A full disk (or a file size limit) met while writing ``path`` names it: a file object's write raises its OSError
    without a file name, and "the disk is full" then said neither the file nor the disk (trial83 F9)."""
    try:
        yield
    except OSError as exc:
        if exc.filename is None and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            exc.filename = str(path)
        raise


def disk_problem(exc: BaseException) -> bool:
    """Whether ``exc`` is the disk refusing a write (full, capped, read-only), not the data's fault."""
    return any(text in str(exc) for text in DISK_PROBLEMS)


FILE_TOO_LARGE = ("a file grew past the largest this system lets one file be (File too large: a `ulimit -f` limit, or a "
                  "file system such as FAT32, whose files stop at 4 GiB)")


def file_too_large(exc: BaseException) -> bool:
    """EFBIG: one file past a size limit, with room left on the disk; "free space" is the wrong advice for it (trial66).
    torch's writer says no errno: its failure under a `ulimit -f` limit is taken for one (trial78 F4)."""
    if getattr(exc, "errno", None) == errno.EFBIG or "File too large" in str(exc):
        return True
    return torch_write_failed(exc) and file_size_limit() is not None


def torch_write_failed(exc: BaseException) -> bool:
    """torch.save's writer failing part-way (a full disk, a file-size limit): its message carries no errno, only
    "unexpected pos" or "file write failed"."""
    text = str(exc)
    return "unexpected pos" in text or "file write failed" in text


def file_size_limit() -> int | None:
    """This process's limit on one file's size (``ulimit -f``), in bytes; None when there is none."""
    import resource

    soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    return None if soft == resource.RLIM_INFINITY else soft


def temp_disk_advice(exc: BaseException) -> str:
    """What to do about a temporary folder (TMPDIR) that refused a write."""
    if file_too_large(exc):
        return "raise the file-size limit, or point TMPDIR at another file system"
    return "free space there, or point TMPDIR at a disk with room"


def disk_advice(exc: BaseException) -> str:
    """What to do about a disk that refused a write."""
    if file_too_large(exc):
        return "raise the file-size limit, or write to another file system"
    if "Read-only file system" in str(exc):
        return "write to a disk that is not read-only"
    if isinstance(exc, PermissionError):  # EACCES, EPERM (an immutable folder): said as a full disk before (trial143 F2)
        return "make that folder writable (its permissions or attributes), or write elsewhere"
    return "free space there"


class MachineError(MidusError):
    """This machine, not the user's input, stops the command (a full temporary disk): said as such,
    never as an invalid recipe."""

    exit_code = 1


class BaseModelError(MidusError):
    """The base model's files are unusable or disagree with each other (a corrupt shard, an index
    naming files outside the base, a config.json that does not describe the weights)."""

    exit_code = 2


class TrainingError(MidusError):
    """A training run cannot go on (a non-finite loss, a checkpoint that does not load)."""

    exit_code = 4
