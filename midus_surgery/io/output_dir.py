"""Where the tool may write, in one place: the output-safety rule and directories that appear whole.

Everything that writes a directory (``apply``, ``train``'s run directory and export, the
fetch and benchmark tools) asks :func:`check_output_dir` before doing any work, and writes
through :func:`atomic_directory`. The rule:

- an output may not be, contain or lie inside an input (the base model, ``init_from``, the
  data, the token cache), judged on resolved paths, so a symlink to an input is that input;
- it may not be or contain a folder that holds inputs or other outputs (the current
  directory, the recipe's or config's own folder, a run directory);
- it may not be a symlink or an existing file;
- an existing directory is replaced only when it is empty, or when it carries this tool's
  marker file (:data:`MARKER`) and the caller was told to replace it (``--overwrite``), and
  then only when it holds nothing but the files the tool put there: a directory written whole
  records their names in its marker when it is put in place, and anything else found in it (a
  user's notes, a training run started inside it) refuses the replacement;
- it may not lie inside a directory the tool writes whole (an apply output, an export), which a
  later ``--overwrite`` would replace with everything in it.
  Nothing else is ever deleted, with or without the flag.

A directory the tool writes carries the marker from its first moment, so that a half-written
``.NAME.partial-*`` sibling left by a killed run can be recognised and removed by the next
run into the same parent.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import stat
import tempfile
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from midus_surgery.errors import MidusError, control_character_in_name, model_folder_name_problem, printable
from midus_surgery.io.json_text import loads_checked
from midus_surgery.io.small_files import read_small_text, regular_file_problem, write_text_atomically

MARKER = ".midus-surgery"  # JSON: {"tool", "kind", "owner", "pid", "host", "time"}, "base_path" (apply, export), and "files" once written whole
WORKSPACE = "workspace"  # the marker kind of a tool's scratch folder: everything inside it is the tool's
RUN_KIND = "train run"  # the marker kind of a training run directory, which train writes into over time
EXPORT_KIND = "train export"  # the marker kind of a run's export: what a later run may replace, and what verify reads as trained
# the kinds of folder that hold a model (safetensors, a tokenizer): their paths must be UTF-8 for the Rust readers
MODEL_KINDS = frozenset({"apply", RUN_KIND, EXPORT_KIND})
# What train writes at the top of a run directory (train/runner.py; tests/test_output_safety.py checks a real run)
RUN_ENTRIES = frozenset({"checkpoints", "final", "metrics.jsonl", "tensorboard", "trace", "loss.png"})
# The hidden siblings atomic_directory and replace_directory make: exactly these names, nothing like them
_LEFTOVER_NAME = re.compile(r"^\..+\.(partial|old)-[0-9a-f]{8}$")
# a marker rewritten whole (write_text_atomically, rewrite_held_marker) is first written beside it under this name: a
# kill between the write and the rename leaves it, the tool's own, not a file of the user's that keeps a run from resuming
_MARKER_TMP_NAME = re.compile(r"^\.midus-surgery\.tmp-\d+$")
# the empty folder made and removed at once to see that a place takes writes (probe_write): one a kill left, or another
# process's seen between the two, is the tool's own, not a file of the user's that keeps a run from resuming
_PROBE_PREFIX = ".midus-surgery-probe-"
_PROBE_NAME = re.compile(r"^\.midus-surgery-probe-[a-z0-9_]{8}$")


class OutputError(MidusError):
    """An output path that would put the user's files at risk; nothing was written."""

    exit_code = 2


def read_marker(directory: Path) -> dict | None:
    """The marker of a directory this tool wrote, or None (no marker, or not ours). A marker that is a symlink is not
    ours: through a link to another run directory's marker, train took that run's lock and wrote its own pid into it
    (trial95 F9); the tool writes its markers as files, and never writes or locks one through a link."""
    try:
        data = loads_checked(read_small_text(Path(directory) / MARKER, follow_links=False))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("tool") == "midus-surgery" else None


def write_marker(directory: Path, kind: str, owner: str | None = None) -> None:
    """Mark ``directory`` as written by this tool: by which command (``kind``), for which ``owner``
    (train's export: its run directory), and by which process (for leftovers of killed runs)."""
    write_text_atomically(Path(directory) / MARKER, _marker_text(kind, owner))


def _marker_text(kind: str, owner: str | None) -> str:
    data = {"tool": "midus-surgery", "kind": kind, "owner": owner, "pid": os.getpid(), "host": socket.gethostname(), "time": time.time()}
    return json.dumps(data) + "\n"


def rewrite_held_marker(directory: Path, kind: str, held: int) -> int:
    """``write_marker`` for the marker this process holds (``hold_marker``'s descriptor ``held``), kept held: the new
    file is locked before it is renamed over the old one, and the old one let go after. Returns the descriptor now
    held. The marker was truncated, then written, in place (the lock is on the file itself): a full disk or a kill
    between the two left it empty, and the run's next start refused it as a file midus-surgery did not write (trial95 F3)."""
    path = Path(directory) / MARKER
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    fd = None
    try:
        tmp.write_text(_marker_text(kind, None))
        fd = os.open(tmp, os.O_RDONLY | os.O_NOFOLLOW)
        _lock_now(fd)  # a name only this process uses: taken (or "none", where the file system takes no locks, as before)
        os.replace(tmp, path)
    except BaseException:
        if fd is not None:
            os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(held)  # after the rename: the marker's name is held throughout
    return fd


def add_to_marker(directory: Path, **facts) -> None:
    """Record facts of this machine (the base's path, for ``verify``) in ``directory``'s marker: the
    one file of an output that is local bookkeeping, left out when publishing (docs/ecosystem.md),
    so that every other file is free of this machine's paths."""
    marker = read_marker(directory) or {}
    marker.update(facts)
    write_text_atomically(Path(directory) / MARKER, json.dumps(marker) + "\n")


def recorded_base(directory: Path) -> str | None:
    """The base model path an output was made from, as apply recorded it (an export carries its
    init_from's); older outputs recorded it in midus_plan.json instead."""
    found = (read_marker(directory) or {}).get("base_path")
    if found is None:
        try:
            found = loads_checked(read_small_text(Path(directory) / "midus_plan.json"), special_floats=True).get("base_path")
        except (OSError, ValueError, AttributeError):
            return None
    return found if isinstance(found, str) and found else None


def run_export_hint(path: Path) -> str:
    """For a model directory that is missing: a training run directory given in place of its export."""
    final = Path(path) / "final"
    return f"; it looks like a training run directory: its export is {printable(str(final))}" if (final / "config.json").is_file() else ""


def hold_marker(directory: Path) -> int | None:
    """Hold ``directory``'s marker under an exclusive lock (flock) until ``release_marker``, or until
    this process ends however it ends (the OS drops the lock, SIGKILL included). Returns the open
    file descriptor, or None when another process holds it: a directory in use."""
    fd, state = _open_locked(Path(directory) / MARKER, os.O_RDONLY | os.O_NOFOLLOW)  # a link is no marker of ours (read_marker)
    if state != "taken":
        os.close(fd)
        return None
    return fd


def marker_in_use(directory: Path) -> bool:
    """Whether a running process holds ``directory``'s marker (hold_marker), without keeping it: what is in such a
    directory is that process's to change while it is looked at. A marker that is a link says no: it is not ours."""
    return _locked_by_another(Path(directory) / MARKER, os.O_RDONLY | os.O_NOFOLLOW)


def _open_locked(path: Path, flags: int) -> tuple[int, str]:
    """``path`` opened and its flock tried (``_lock_now``'s answer). A holder renames a new, already locked marker over
    the old one (``rewrite_held_marker``), then lets the old one go: a lock taken on a file no longer at ``path`` was
    taken on the old one, and is tried again on the file there now. OSError when ``path`` does not open."""
    for _ in range(10):
        fd = os.open(path, flags)
        state = _lock_now(fd)
        try:
            same = state != "taken" or os.path.samestat(os.fstat(fd), os.stat(path, follow_symlinks=not flags & os.O_NOFOLLOW))
        except OSError:  # gone meanwhile: the next try says so
            same = False
        if same:
            return fd, state
        os.close(fd)
    return os.open(path, flags), "busy"  # renamed under each try: a live holder rewriting it


def _locked_by_another(path: Path, flags: int) -> bool:
    """Whether another open file holds ``path``'s flock; a lock taken to look is dropped with the descriptor. A path
    that does not open, or a file system without locks, says no."""
    try:
        fd, state = _open_locked(path, flags)
    except OSError:
        return False
    try:
        return state == "busy"
    finally:
        os.close(fd)


def _lock_now(fd: int) -> str:
    """Try to take an exclusive flock on ``fd`` without waiting: "taken", "busy" (another open file holds it), or
    "none" (the file system takes no locks)."""
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return "busy"
    except OSError:
        return "none"
    return "taken"


def release_marker(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)  # closing the descriptor drops its flock


def _entries(directory: Path) -> set[str]:
    """Every file and link under ``directory`` (links not followed), as relative POSIX paths, but the marker;
    and every empty folder below it, as ``path/`` (a user's placeholder is theirs too)."""
    found = set()
    for root, dirs, files in os.walk(directory):
        here = Path(root)
        links = [d for d in dirs if (here / d).is_symlink()]
        found.update((here / name).relative_to(directory).as_posix() for name in [*files, *links])
        if not dirs and not files and here != Path(directory):
            found.add(here.relative_to(directory).as_posix() + "/")
    return {name for name in found if name != MARKER and not _MARKER_TMP_NAME.match(name)}


# Files up to this size are recorded with a digest of their contents (configs, the model card, the
# tokenizer), larger ones (weights) with their size and modification time: hashing gigabytes would cost
# what the write did, and any rewrite (an in-place edit of a tensor, another file copied over it) moves
# the time even where the size stays.
DIGEST_MAX_BYTES = 64 * 2**20


def _fingerprint(path: Path) -> list:
    """[size, sha256] of a regular file up to DIGEST_MAX_BYTES, [size, None, mtime in ns] of a larger one;
    None for a link or anything else."""
    if path.is_symlink() or not path.is_file():
        return None
    info = path.stat()
    if info.st_size > DIGEST_MAX_BYTES:
        return [info.st_size, None, info.st_mtime_ns]
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(2**20), b""):
            digest.update(chunk)
    return [info.st_size, digest.hexdigest()]


def _changed(recorded, now) -> bool:
    """Whether a file's fingerprint ``now`` differs from the ``recorded`` one. A large file recorded by a
    version that kept only its size ([size, None]) is compared by size, as that version did."""
    if isinstance(recorded, list) and len(recorded) == 2 and recorded[1] is None and isinstance(now, list):
        return recorded[0] != now[0]
    return recorded != now


def record_written_files(directory: Path) -> None:
    """Add the names of everything in ``directory`` to its marker, with each file's fingerprint:
    what the tool may later replace, as it wrote it."""
    marker = read_marker(directory) or {}
    names = sorted(_entries(directory))
    marker["files"] = names
    marker["fingerprints"] = {name: _fingerprint(directory / name) for name in names}
    write_text_atomically(Path(directory) / MARKER, json.dumps(marker) + "\n")


def unchanged_since_written(directory: Path, names: list[str]) -> bool:
    """Whether each of ``names`` in ``directory`` is as the tool recorded it when it wrote the folder (its marker's
    fingerprints); False where the marker records none of them."""
    marker = read_marker(directory) or {}
    recorded = marker.get("fingerprints") if isinstance(marker.get("fingerprints"), dict) else {}
    return bool(names) and all(name in recorded and not _changed(recorded[name], _fingerprint(Path(directory) / name)) for name in names)


def _not_written_by_tool(directory: Path, marker: dict) -> list[str]:
    """What ``directory`` holds that the tool did not put there: beyond its recorded files, a recorded
    file changed since (a model card edited by hand: the user's words now), or (a directory written
    before files were recorded) another output of the tool inside it."""
    if isinstance(marker.get("files"), list):
        found = sorted(_entries(directory) - set(marker["files"]))
        fingerprints = marker.get("fingerprints")
        if isinstance(fingerprints, dict):
            for name, recorded in sorted(fingerprints.items()):
                now = _fingerprint(directory / name) if (directory / name).exists() else recorded
                if _changed(recorded, now):
                    by_time = isinstance(now, list) and len(now) == 3 and isinstance(recorded, list) and recorded[:2] == now[:2]
                    found.append(f"{name} (modified since midus-surgery wrote it: its time moved, too large to compare "
                                 "its contents)" if by_time else f"{name} (changed since midus-surgery wrote it)")
        return found
    return sorted(p.parent.relative_to(directory).as_posix() + "/" for p in directory.rglob(MARKER) if p.parent != directory)


UNRECORDED = "does not record which files midus-surgery wrote there (an output of an older version, or a marker copied into a folder)"


def _unrecorded(marker: dict) -> bool:
    """A whole output's marker without its file list: what its folder holds cannot be told from a user's
    files. (A run directory and a workspace record none by design: train writes into them over time.)"""
    return not isinstance(marker.get("files"), list) and marker.get("kind") not in (RUN_KIND, WORKSPACE)


def _first_five(names: list[str]) -> str:
    """The first five of ``names``, and how many more, for a one-line message."""
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def _whole_output_above(path: Path, *, including: bool = False) -> tuple[Path, dict] | None:
    """The nearest directory above ``path`` (``including``: or ``path`` itself) that the tool wrote
    whole (its marker lists its files)."""
    for parent in [path] * including + list(path.parents):
        marker = read_marker(parent)
        if marker is not None and isinstance(marker.get("files"), list):
            return parent, marker
    return None


def _run_dir_above(path: Path) -> Path | None:
    """The nearest training run directory above ``path`` (not ``path`` itself)."""
    for parent in path.parents:
        marker = read_marker(parent)
        if marker is not None and marker.get("kind") == RUN_KIND:
            return parent
    return None


# a marker's kind in the words of the command that writes it ("analysis" is what analyze's markers say)
_COMMAND_OF_KIND = {"analysis": "analyze", "train export": "train (its export)", "train run": "train (its run directory)",
                    "fetch_corpus": "tools/fetch_corpus.py", "fetch_smollm2": "tools/fetch_smollm2.py",
                    WORKSPACE: "a tool (its scratch folder)"}


def _command(kind: str) -> str:
    return _COMMAND_OF_KIND.get(kind, kind)


def _written_by(marker: dict) -> str:
    return f"midus-surgery {_command(marker.get('kind', '?'))}" + (f" for {marker['owner']}" if marker.get("owner") else "")


def _relation(out: Path, other: Path) -> str | None:
    """How ``out`` (resolved) sits against ``other`` (resolved): 'is', 'contains', 'is inside' or None."""
    if out == other:
        return "is"
    if out in other.parents:
        return "contains"
    if other in out.parents:
        return "is inside"
    return None


def input_root(path: str | os.PathLike) -> Path:
    """The part of an input path that names real files: a glob's fixed prefix (``data/*.txt`` -> ``data``)."""
    parts = Path(path).parts
    for i, part in enumerate(parts):
        if any(c in part for c in "*?["):
            return Path(*parts[:i]) if i else Path(".")
    return Path(path)


def data_folder(path: str | os.PathLike) -> Path:
    """The user's data folder behind a data path: a glob's fixed prefix, a directory, or a file's folder
    (``--data corpus/*.txt`` reaches the tool as the files the shell expanded). What a token cache may not
    be or lie inside: writing next to the user's files is writing into their data (trial40)."""
    root = input_root(path)
    return root.parent if root.is_file() else root


SIBLING_EXTRA = len(".") + len(".partial-") + 8  # what atomic_directory adds to a name: .NAME.partial-0123abcd


def _name_too_long(out: Path) -> str | None:
    """An output name that fits the file system, but whose hidden partial sibling does not: apply failed after planning,
    train after its whole budget, with "File name too long" (trial66)."""
    try:
        limit = os.pathconf(next(p for p in (out.parent, *out.parent.parents) if p.exists()), "PC_NAME_MAX")
    except (OSError, ValueError, StopIteration):
        limit = 255
    room = limit - SIBLING_EXTRA
    size = len(os.fsencode(out.name))
    if size <= room or size > limit:  # past the limit itself: the probe's "File name too long" says it
        return None
    return (f"output {out}: its name is {size} bytes; midus-surgery writes an output as .NAME.partial-XXXXXXXX beside it first "
            f"and renames it at the end, so a name may have at most {room} bytes on this file system ({limit}); choose a shorter one")


def check_output_dir(out: str | os.PathLike, *, kind: str, inputs: Iterable[tuple[str, str | os.PathLike]] = (),
                     folders: Iterable[tuple[str, str | os.PathLike]] = (), overwrite: bool = False,
                     reuse: bool = False, writes_into: bool = False, owner: str | None = None,
                     flag: str | None = "--overwrite", probe: bool = True) -> Path:
    """Check ``out`` against the rule above before any work; return it resolved.

    inputs: (what, path) pairs ``out`` must not be, contain or lie inside.
    folders: (what, path) pairs ``out`` must not be or contain (the current directory is always one).
    An existing directory is this command's own when its marker names the same ``kind`` and
    ``owner``: ``overwrite`` replaces it, ``reuse`` (train's export of the same
    run, a tool's workspace) writes into or replaces it without asking. A directory another command
    wrote (an apply output, a training run, a fetched model) is never replaced. writes_into: the
    caller adds to the directory instead of replacing it (a run directory, a workspace), so what
    else it holds is kept. flag: the option that says ``overwrite`` (None: the command has none).
    probe: make and remove a folder where the output goes (a read-only disk, a file in the way);
    off for a check that may not write anything (``validate``).
    Raises OutputError, whose message says what was found and what to do.
    """
    given = Path(out)
    if given.is_symlink():
        raise OutputError(f"output {given} is a symlink (to {os.readlink(given)}); give a real directory path: "
                          "the tool never writes through a link")
    resolved = given.resolve()
    if padded := padded_new_folder(resolved):
        raise OutputError(f"output {resolved} would make a folder named {padded!r}, with blanks at its start or end (a stray "
                          "space, or a variable of blanks?): name it without them")
    if kind in MODEL_KINDS and (bad_name := model_folder_name_problem(resolved)):  # the resolved path: a relative output.dir or
        raise OutputError(f"output {bad_name}")  # run_dir under a recipe folder so named was written (trial104)
    for what, path in inputs:
        other = Path(path).resolve()
        relation = _relation(resolved, other)
        if relation:
            raise OutputError(f"output {resolved} {relation} {what} at {other}: an output may not be, contain or lie inside an input; choose another directory")
    for what, path in [("the current directory", Path.cwd()), *folders]:
        other = Path(path).resolve()
        relation = _relation(resolved, other)
        if relation in ("is", "contains"):
            raise OutputError(f"output {resolved} {relation} {what} at {other}: replacing it would delete what it holds; choose a new directory")
    above = _whole_output_above(resolved)
    if above is not None:
        raise OutputError(f"output {resolved} lies inside {above[0]}, written whole by {_written_by(above[1])}, which a later run "
                          "replaces with everything in it; choose a directory outside it")
    run = _run_dir_above(resolved) if kind != "train export" else None
    part = resolved.relative_to(run).parts[0] if run is not None else None
    if part in RUN_ENTRIES:  # analyze --out RUN/checkpoints/x: the run then refused to resume until it was moved (trial70)
        where = (f"is {part}/, one of the folders train writes" if resolved == run / part  # not "RUN/trace lies inside RUN/trace" (trial72 N8)
                 else f"lies inside {run / part}, which train writes")
        # "outside it" with an example inside the run directory read as a contradiction (trial77 F9)
        raise OutputError(f"output {resolved} {where} (and prunes, or rewrites) in its run directory {run}; choose a directory "
                          f"outside {run / part}, e.g. {run / 'analysis'} beside it")
    if not writes_into and (too_long := _name_too_long(resolved)):
        raise OutputError(too_long)
    _check_can_write(resolved, into=writes_into, probe=probe)
    if probe and not writes_into and (rival := _another_run_writing(resolved)):  # said now, not after a plan's minutes
        raise OutputError(_being_written(resolved, rival))
    if not resolved.exists():
        return resolved
    if not resolved.is_dir():
        raise OutputError(f"output {resolved} is an existing file; the tool writes a directory and never replaces a file it did not write")
    if not writes_into and _is_mount_point(resolved):
        raise OutputError(f"output {resolved} is a mount point (a bind mount, a container volume): the tool writes an output "
                          "beside it and renames it into place at the end, which a mount point cannot take; give a new "
                          f"folder inside it, e.g. {resolved / 'output'}")
    if not any(resolved.iterdir()):
        return resolved  # an empty directory: nothing to lose
    if writes_into and all(_own_probe(entry) for entry in resolved.iterdir()):
        return resolved  # empty but for a probe a kill left there (or another process's, made and removed at once)
    marker = read_marker(resolved)
    if marker is None:
        never = f", with or without {flag}" if flag else ""
        raise OutputError(f"output {resolved} exists and was not written by midus-surgery (no {MARKER} marker in it); "
                          f"it is never replaced{never}: choose another directory, or move it away yourself")
    written_by = _written_by(marker)
    if marker.get("kind") != kind or marker.get("owner") != owner:
        this = _command(kind) + (f" for {owner}" if owner else "")
        raise OutputError(f"output {resolved} was written by {written_by}, not by {this}; one command never replaces "
                          "another's output: choose another directory")
    if writes_into:
        return resolved
    if overwrite or reuse:
        if _unrecorded(marker):
            raise OutputError(f"output {resolved} (marked as written by {written_by}) {UNRECORDED}: it is not replaced; "
                              "move it away yourself, or choose another directory")
        foreign = _not_written_by_tool(resolved, marker)
        if foreign:
            shown = _first_five(foreign)
            raise OutputError(f"output {resolved} (written by {written_by}) also holds what midus-surgery did not write there: "
                              f"{shown}; replacing it would delete them: move them out first, or choose another directory")
        return resolved
    todo = f"pass {flag} to replace it" if flag else "choose another directory"
    raise OutputError(f"output {resolved} already exists (an earlier output of {written_by}); {todo}")


def new_folder_names(path: Path) -> list[str]:
    """The names of the folders the tool would make on the way to ``path`` (those that do not exist yet), outermost first."""
    new = []
    for part in (path, *path.parents):
        if os.path.lexists(part):
            break
        new.append(part.name)
    return new[::-1]


def padded_new_folder(path: Path) -> str | None:
    """The first folder the tool would make on the way to ``path`` whose name has blanks at its start or end, or None:
    `o/$BLANK/x` and `--out "  x"` made such folders, hard to name again in a shell (trial145 F7). A folder that exists
    is the user's, whatever its name (`Backup /runs`: trial151 M1). Blanks are every white space Python knows, a pasted
    no-break space (U+00A0) as much as a typed one."""
    return next((name for name in new_folder_names(path) if name != name.strip()), None)


def _is_mount_point(path: Path) -> bool:
    """Whether something is mounted at ``path``: another file system (os.path.ismount), or a bind mount of a
    folder of the same one (docker -v of a local folder), which only the kernel's mount table shows."""
    if os.path.ismount(path):
        return True
    try:
        return str(path) in mount_points(Path("/proc/self/mountinfo").read_text())
    except OSError:  # not Linux: ismount is all there is
        return False


def mounts(mountinfo: str) -> list[tuple[str, str]]:
    """(mount point, file system type) of each line of a /proc/PID/mountinfo table: its fifth field (a space in a
    path written "\\040") and the first after its " - " separator."""
    unescape = lambda field: re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)  # noqa: E731
    found = []
    for line in mountinfo.splitlines():
        fields, _, after = line.partition(" - ")
        fields, after = fields.split(), after.split()
        if len(fields) > 4:
            found.append((unescape(fields[4]), after[0] if after else ""))
    return found


def mount_points(mountinfo: str) -> set[str]:
    """The mount points of a /proc/PID/mountinfo table."""
    return {point for point, _ in mounts(mountinfo)}


_KERNEL_FILE_SYSTEMS = {"proc", "sysfs", "cgroup", "cgroup2", "devpts", "securityfs", "debugfs", "tracefs", "pstore", "bpf",
                        "configfs", "fusectl", "mqueue", "binfmt_misc", "efivarfs", "autofs"}


def give_default_mode(path: Path) -> None:
    """Give a file the mode a newly created one gets here (0666 less the umask): safetensors writes its files 0600
    whatever the umask, so a trained model was unreadable to a teammate or a serving account (trial74 F4)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def file_system_type(place: Path) -> str | None:
    """The type of the file system ``place`` lies on (``ext4``, ``btrfs``, ``proc``...), from the innermost mount
    holding it; None where the mount table cannot be read (not Linux)."""
    try:
        table = Path("/proc/self/mountinfo").read_text()
    except OSError:
        return None
    path = str(place.resolve())
    holding = [(point, kind) for point, kind in mounts(table) if path == point or path.startswith(point.rstrip("/") + "/")]
    return max(holding, key=lambda m: len(m[0]))[1] if holding else None


def kernel_file_system(place: Path) -> str | None:
    """The type of the file system ``place`` lies on when it is one of the kernel's (/proc, /sys), where no
    folder can be made; None otherwise, or where the mount table cannot be read (not Linux)."""
    kind = file_system_type(place)
    return kind if kind in _KERNEL_FILE_SYSTEMS else None


def _check_can_write(out: Path, *, into: bool, probe: bool = True) -> None:
    """Before any work: the system lets the tool make ``out`` (its hidden sibling, the folders on the
    way to it) and, for an output written ``into``, write inside it. One probe folder is made and
    removed where the writes will go: a file in the way, a read-only disk or a place like /proc
    is found now, not after hours of training. ``probe=False`` (validate, a dry run) writes nothing: a file in
    the way, and what the system says of write access (a read-only disk, a folder not the user's)."""
    where = out.parent
    while not where.exists() and where != where.parent:
        where = where.parent
    places = [where] + ([out] if into and out.is_dir() else [])
    for place in places:
        if not place.is_dir():
            raise OutputError(f"cannot write {out}: {place} is a file, not a folder")
        kind = kernel_file_system(place)
        if kind:  # root may "write" there by access(2), and no folder can be made (trial50: a dry run passed /proc/x;
            # trial64: apply's probe said only "No such file or directory")
            raise OutputError(f"cannot write {out}: {place} is on a {kind} file system, the kernel's view of the system, not a disk")
        if not probe:
            if not os.access(place, os.W_OK | os.X_OK):
                raise OutputError(f"cannot write {out}: {place} is not writable (a read-only disk, or a folder this user may not write)")
            continue
        try:
            probe_write(place)
        except OSError as exc:
            raise OutputError(f"cannot write {out}: {exc.strerror or exc}") from None


def probe_write(place: Path) -> None:
    """Make and remove one empty folder in ``place``: OSError when it takes no writes (read-only, immutable, no room)."""
    os.rmdir(tempfile.mkdtemp(prefix=_PROBE_PREFIX, dir=place))


CACHE_CHOICES = "choose another cache directory (--cache-dir for eval and analyze, data.cache_dir for train, or MIDUS_CACHE)"


def check_cache_location(cache: str | os.PathLike, *, inputs: Iterable[tuple[str, str | os.PathLike]],
                         data_folders: Iterable[tuple[str, str | os.PathLike]] = ()) -> Path:
    """A cache folder (the token cache) only gains new hash-named entries, never replaces one, so it
    may hold inputs (a cached corpus given as data); it may not be or lie inside one, where the tool
    would write into the user's model or data. ``data_folders``: the folders data files lie in (a folder
    given whole as data is one of ``inputs``); the cache may lie inside one behind a hidden folder, as
    the default ``~/.cache/...`` lies in the home folder of ``--data ~/held.txt`` (trial48): that writes
    nothing beside the user's files, and the corpus reader never reads a hidden folder. Returns it
    resolved; raises OutputError."""
    given = Path(cache).absolute()
    dangling = next((p for p in (given, *given.parents) if p.is_symlink() and not p.exists()), None)
    if dangling is not None:  # followed, the cache was made on whatever disk holds the link's target's folder (trial158 F2)
        try:
            target = dangling.resolve()  # the end of its chain of links
        except RuntimeError:
            raise OutputError(f"the token cache {given} cannot be made: {dangling} is a link that leads back to itself; "
                              f"{CACHE_CHOICES}") from None
        raise OutputError(f"the token cache {given} cannot be made: {dangling} is a link to {target}, which does not exist (a disk "
                          f"not mounted? make that folder first if it is meant); {CACHE_CHOICES}")
    resolved = given.resolve()
    # wherever the cache folder is named (--cache-dir, $MIDUS_CACHE, data.cache_dir), the folders it makes are named as an
    # output's are; one that exists is the user's, whatever its name (a cache filled by an earlier version: trial156 1)
    why = next(filter(None, map(control_character_in_name, new_folder_names(resolved))), None)
    if why:
        raise OutputError(f"the token cache cannot be made: {why}")
    padded = padded_new_folder(resolved)
    if padded:
        raise OutputError(f"the token cache {resolved} would make a folder named {padded!r}, with blanks at its start or end (a stray "
                          "space, or a variable of blanks?): name it without them")
    blocker = next((p for p in (resolved, *resolved.parents) if p.exists()), None)  # the cache or the nearest folder to make it in
    if blocker is not None and not blocker.is_dir():
        raise OutputError(f"the token cache {resolved} cannot be made: {blocker} is a file, not a folder; {CACHE_CHOICES}")
    kind = kernel_file_system(blocker) if blocker is not None else None
    if kind:  # a dry run passed /proc/self, and the start said only "No such file or directory" (trial99 M5)
        raise OutputError(f"the token cache {resolved} cannot be made: {blocker} is on a {kind} file system, the kernel's view of "
                          f"the system, not a disk; {CACHE_CHOICES}")
    hidden_behind = lambda folder: any(part.startswith(".") for part in resolved.relative_to(folder).parts)  # noqa: E731
    for (what, path), is_data_folder in [*((i, False) for i in inputs), *((f, True) for f in data_folders)]:
        other = Path(path).resolve()
        relation = _relation(resolved, other)
        if relation == "is inside" and is_data_folder and hidden_behind(other):
            continue
        if relation in ("is", "is inside") and is_data_folder:  # a sibling folder of one named file: say why it counts
            raise OutputError(f"the token cache {resolved} {relation} {what} at {other}: the folder a data file lies in counts as "
                              f"the user's data, and the tool writes nothing beside it; {CACHE_CHOICES}, outside {other}")
        if relation in ("is", "is inside"):
            raise OutputError(f"the token cache {resolved} {relation} {what} at {other}: the tool would write into it; {CACHE_CHOICES}")
    above = _whole_output_above(resolved, including=True)
    if above is not None:  # a later apply --overwrite or export would delete it, or refuse to replace what holds it
        raise OutputError(f"the token cache {resolved} {'is' if above[0] == resolved else 'lies inside'} {above[0]}, written whole by {_written_by(above[1])}; "
                          "choose a cache directory outside it")
    return resolved


def _owner_is_gone(marker: dict | None) -> bool:
    """Whether the process that wrote a leftover directory is certainly no longer running."""
    if marker is None:
        return False
    if marker.get("host") != socket.gethostname():
        return False  # another machine on a shared file system: it may still be writing
    try:
        os.kill(int(marker.get("pid", -1)), 0)
    except ProcessLookupError:
        return True
    except (OSError, ValueError, OverflowError):
        return False
    return False


def hold_directory(directory: Path) -> int | None:
    """An exclusive lock (flock) on ``directory`` itself while this run writes it, released by ``release_marker`` or by
    the OS when the process ends, however it ends. The owner's pid in the marker cannot say a partial is live across
    PID namespaces (containers sharing a host name and a volume): a second run removed a live one (trial66). None where
    the file system takes no locks."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return None
    if _lock_now(fd) != "taken":
        os.close(fd)
        return None
    return fd


def unfinished_output(directory: Path) -> str | None:
    """Why ``directory`` is an output of this tool that was never finished, or None. An apply or an export is written
    into a hidden ``.NAME.partial-XXXXXXXX`` and records its files in its marker as it is put in place: a partial folder,
    found by hand (`ls -a`, a `mv` to "recover" a long apply), held complete weights and loaded (trial143 F1). A
    finished output of a version that recorded no files (before 2026-12-03) is not refused: only a folder still named as
    a partial is (a marker's pid says nothing once the process is gone: another may have it now)."""
    directory = Path(directory)
    marker = read_marker(directory)
    if marker is None or marker.get("kind") not in ("apply", EXPORT_KIND) or isinstance(marker.get("files"), list):
        return None
    partial_name = bool(_LEFTOVER_NAME.match(directory.name)) and ".partial-" in directory.name
    # the lock goes with the folder: one renamed by hand while it is written holds it. Under an output's own name, only
    # while the process its marker names lives: any process may flock a folder (a user's `flock OUT cmd` serialising
    # jobs), and an older version's finished output was failed as being written (trial149 F3)
    writing = _held_by_a_live_run(directory) and (partial_name or not _owner_is_gone(marker))
    if not writing and not partial_name:
        return None  # under an output's own name: an older version's finished output (its pid may be any live process's now)
    state = "a running process is still writing it" if writing else "the process that wrote it did not finish it"
    return (f"{printable(str(directory))} is an unfinished output of midus-surgery {marker['kind']} ({state}): what it holds "
            "may be a part of the model; run the command again for a whole one")


def _held_by_a_live_run(entry: Path) -> bool:
    """Whether a running process holds ``entry``'s lock (``hold_directory``); a file system without locks says no."""
    return _locked_by_another(entry, os.O_RDONLY | os.O_DIRECTORY)


def clean_leftovers(out: Path, report=None) -> list[Path]:
    """Remove the ``.NAME.partial-*`` / ``.NAME.old-*`` folders that killed runs of this tool left
    beside ``out``, whatever their NAME.

    Only folders named exactly as the tool names them (``.NAME.partial-`` or ``.NAME.old-`` and 8 hex
    digits) are candidates: an empty one over a minute old, or one carrying this tool's marker,
    written by a process that is gone, and (an ``.old-`` folder: a whole output, which records its
    files) holding nothing beyond what the tool wrote. A user's ``.model.old-v1`` backup, or an old
    output a user added notes to, is kept. Each removal is reported through ``report`` (one line).
    """
    removed = []
    if not out.parent.is_dir():
        return removed
    for entry in out.parent.iterdir():
        if not _LEFTOVER_NAME.match(entry.name) or entry.is_symlink() or not entry.is_dir():
            continue
        marker = read_marker(entry)
        if _restore_replaced(entry, marker, report):
            continue
        if _empty_and_old(entry):
            try:
                entry.rmdir()  # fails, and keeps it, if anything was put there meanwhile
            except OSError:
                continue
        elif ((_owner_is_gone(marker) and not _held_by_a_live_run(entry)) or _whole(entry, marker)) and not _not_written_by_tool(entry, marker):
            shutil.rmtree(entry, ignore_errors=True)
        else:
            continue
        removed.append(entry)
        if report is not None:
            what = "an earlier output that a run" if ".old-" in entry.name else "a partial output that a run"
            report(f"removed {entry}: {what} of midus-surgery killed before it finished left behind")
    return removed


def _whole(entry: Path, marker: dict | None) -> bool:
    """An ``.old-`` folder holding a finished output (its files recorded): no live run is still writing it,
    whoever wrote it (a process still alive: the one that replaced it and was stopped while removing it)."""
    return ".old-" in entry.name and isinstance(marker, dict) and isinstance(marker.get("files"), list)


def _restore_replaced(entry: Path, marker: dict | None, report) -> bool:
    """Put back an output that a run killed in the swap (SIGKILL between its two renames) left hidden
    as ``.NAME.old-*``, where NAME is now absent: a whole earlier output, not a partial (trial49: the
    next run removed it as one). True when it was put back."""
    if ".old-" not in entry.name or marker is None:
        return False
    home = entry.parent / entry.name[1:entry.name.rindex(".old-")]
    if home.exists() or home.is_symlink() or _not_written_by_tool(entry, marker):
        return False
    try:
        os.replace(entry, home)
    except OSError:
        return False
    if report is not None:
        report(f"put back {home}: a run of midus-surgery killed while replacing it had moved it aside to {entry.name}")
    return True


EMPTY_LEFTOVER_AGE_S = 60.0


def _empty_and_old(entry: Path) -> bool:
    """A SIGKILL between making a partial folder and writing its marker leaves it empty: nothing to
    lose. Only one older than a minute, which no live run is about to write its marker into."""
    try:
        return not any(entry.iterdir()) and time.time() - entry.stat().st_mtime > EMPTY_LEFTOVER_AGE_S
    except OSError:
        return False


@contextmanager
def atomic_directory(out: Path, *, kind: str, owner: str | None = None, replace: bool = False, replaces_owner: str | None = None,
                     report=None) -> Iterator[Path]:
    """Yield a hidden sibling of ``out`` to write into; on success it becomes ``out``.

    Call :func:`check_output_dir` first: an existing ``out`` is swapped out and removed only after
    the new one is in place, and only when ``replace`` (``--overwrite``, or an export of the same
    run) and it is still what that check allowed (:func:`replace_directory`): an output of ``kind``
    for ``replaces_owner`` (when given; else for ``owner``, whom the new one is marked for). On any failure (KeyboardInterrupt included) the partial directory is
    removed and ``out`` is untouched; a SIGKILL leaves only a marked ``.NAME.partial-*`` sibling,
    which the next run into the same parent removes.
    """
    created = [p for p in (out.parent, *out.parent.parents) if not p.exists()]  # deepest first
    tmp = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    held = None
    tmp_is_ours = True  # until its mkdir fails: then what is at tmp, if anything, is not this run's to remove
    try:
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            clean_leftovers(out, report)
            # made inside the clean-up's try: a Ctrl-C landing just after the mkdir (a test that signals as soon
            # as the partial appears hit it under load) left the partial behind
            tmp.mkdir()
        except OSError as exc:  # a place the system will not write (/proc, a read-only disk): said for the path asked
            tmp_is_ours = False
            raise OutputError(f"cannot write {out}: {exc.strerror or exc}") from None
        held = hold_directory(tmp)  # live while this process runs, whatever its pid reads as elsewhere
        rival = _another_run_writing(out, tmp)  # looked for after ours is held: of two started at once, one sees the other
        if rival is not None:
            raise OutputError(_being_written(out, rival))
        write_marker(tmp, kind, owner)
        yield tmp
        replace_directory(tmp, out, kind=kind, owner=owner if replaces_owner is None else replaces_owner, replace=replace)
    except BaseException:
        if tmp_is_ours:
            shutil.rmtree(tmp, ignore_errors=True)
        remove_empty(created)  # a failed run leaves no trace, not even the empty folders it made
        raise
    finally:
        release_marker(held)


def _another_run_writing(out: Path, ours: Path | None = None) -> Path | None:
    """The partial folder of another live run writing ``out`` (not ``ours``), or None. Two `apply --overwrite` into one
    output at once both said "wrote", the second having replaced the first's output unsaid (trial143 F3); two started in
    the same instant may each see the other and both stop, which loses nothing."""
    if not out.parent.is_dir():
        return None
    prefix = f".{out.name}.partial-"
    for entry in out.parent.iterdir():
        if (entry != ours and entry.name.startswith(prefix) and _LEFTOVER_NAME.match(entry.name) and not entry.is_symlink()
                and entry.is_dir() and _held_by_a_live_run(entry)):
            return entry
    return None


def _being_written(out: Path, rival: Path) -> str:
    return (f"another run of midus-surgery is writing {out} now (into {rival.name}): nothing was written; run this again "
            "once it has finished, or choose another output")


def remove_empty(folders: list[Path]) -> None:
    """Remove the folders a run made on its way to an output or a cache entry (deepest first), while they are empty."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            break


def replace_directory(new: Path, out: Path, *, kind: str | None = None, owner: str | None = None, replace: bool = True) -> None:
    """Rename the finished directory ``new`` to ``out``; an existing ``out`` is moved aside first
    and removed only once ``new`` is in place.

    ``out`` was checked by :func:`check_output_dir` before the work began, maybe hours ago (a
    training run's export): it is checked again now, just before the swap, against what may be
    replaced (``replace``: an existing output of the same ``kind`` and ``owner``, holding only
    what the tool wrote; an empty folder always). Anything else that appeared meanwhile is kept,
    and so is the finished work: ``new`` is renamed to a visible ``NAME.new-*`` sibling, and
    OutputError says where."""
    record_written_files(new)
    why_not = _why_not_replaceable(out, kind=kind, owner=owner, replace=replace)
    if why_not:
        kept = out.parent / f"{out.name}.new-{uuid.uuid4().hex[:8]}"
        os.replace(new, kept)
        raise OutputError(f"{out} {why_not} since this run checked it, so it was not replaced; the finished output is in {kept}: "
                          "move it where you want it")
    _keep_access_of(out, new)
    old = None
    try:
        with _signals_deferred():
            if out.exists() and any(out.iterdir()):
                old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
                os.replace(out, old)
                os.replace(new, out)
            else:
                if out.exists():
                    out.rmdir()  # an empty folder: nothing to lose (fails, and keeps it, if anything appeared in it meanwhile)
                os.replace(new, out)
    except KeyboardInterrupt as exc:  # held back during the renames, delivered as they end: the swap is done
        if old is not None:
            exc.midus_note = (f"the new output is in place at {out}; the one it replaced, {old}, is removed by the next run of "
                              f"midus-surgery into {out.parent}")
        raise
    except OSError as exc:  # the system refused the swap itself (a mount point that appeared, a busy folder): keep the work
        if old is not None and old.exists() and not out.exists():
            os.replace(old, out)  # the output it was to replace goes back where it was
        kept = out.parent / f"{out.name}.new-{uuid.uuid4().hex[:8]}"
        os.replace(new, kept)
        raise OutputError(f"could not put the finished output in place at {out} ({exc.strerror or exc}); it is in {kept}: "
                          "move it where you want it") from None
    if old is not None:
        try:
            _remove_marked_last(old)
        except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM while the replaced output is removed: the new one is whole (trial49)
            exc.midus_note = (f"the new output is in place at {out}; the rest of the one it replaced, {old}, is removed by the "
                              f"next run of midus-surgery into {out.parent}")
            raise


def _keep_access_of(out: Path, new: Path) -> None:
    """The folder that replaces ``out`` gets its permissions and group: a private (0700) folder given as the output, or an
    earlier output made private, was swapped for a world-readable one (trial66)."""
    try:
        info = out.stat()
    except OSError:  # no folder there yet: the user's umask made ``new`` as it makes any folder
        return
    try:
        os.chmod(new, stat.S_IMODE(info.st_mode))
        if new.stat().st_gid != info.st_gid:
            os.chown(new, -1, info.st_gid)
    except OSError:  # a group this user is not in: the mode is what guards it
        pass


@contextmanager
def _signals_deferred():
    """Ctrl-C, SIGTERM and SIGHUP held back until the block ends (then delivered): an interrupt between
    the swap's two renames left neither output in place, the new one removed as a partial and the old
    one hidden (trial49). A SIGKILL there leaves the old output hidden: the next run puts it back
    (clean_leftovers)."""
    if threading.current_thread() is not threading.main_thread():
        yield  # Python runs signal handlers in the main thread only, and only there may they be changed
        return
    # Python-level handlers that note the signal, not a blocked signal mask: the kernel hands a signal to
    # any thread that does not block it (torch's OpenMP workers), and Python acts on it at once
    caught: list[int] = []
    before = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    before = {signum: handler for signum, handler in before.items() if handler is not None}  # None: set outside Python, left be
    for signum in before:
        signal.signal(signum, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        for signum, handler in before.items():
            signal.signal(signum, handler)
        if caught:
            os.kill(os.getpid(), caught[0])  # now, to the handler that was in place


def _remove_marked_last(folder: Path) -> None:
    """Remove a folder this tool wrote, its marker last: a removal cut short leaves it marked, so the
    next run removes the rest (a folder without the marker would be kept for ever, unnamed: trial49)."""
    for entry in folder.iterdir():
        if entry.name == MARKER:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                entry.unlink()
    shutil.rmtree(folder, ignore_errors=True)


def _why_not_replaceable(out: Path, *, kind: str | None, owner: str | None, replace: bool) -> str | None:
    """Why the swap may not replace what is at ``out`` now, or None (nothing there, an empty folder,
    or an output this command may replace that holds only what the tool wrote)."""
    if out.is_symlink():
        return "became a symlink"
    if not out.exists():
        return None
    if not out.is_dir():
        return "became a file"
    if not any(out.iterdir()):
        return None
    marker = read_marker(out)
    if marker is None:
        return f"appeared, holding files not written by midus-surgery (no {MARKER} marker)"
    if not replace:
        return f"appeared, written by {_written_by(marker)}"
    if kind is not None and (marker.get("kind") != kind or marker.get("owner") != owner):
        return f"now holds an output of {_written_by(marker)}"
    if _unrecorded(marker):
        return f"now holds an output of {_written_by(marker)} that {UNRECORDED}"
    foreign = _not_written_by_tool(out, marker)
    if foreign:
        shown = _first_five(foreign)
        return f"now also holds what midus-surgery did not write there ({shown})"
    return None


def use_workspace(root: Path) -> Path:
    """Make (or reuse) ``root`` as a tool's scratch folder, whose contents :func:`remove_own_directory` may remove.

    A new or empty folder is marked; one marked by this tool is reused; anything else is refused."""
    root = check_output_dir(root, kind=WORKSPACE, writes_into=True, flag=None)
    root.mkdir(parents=True, exist_ok=True)
    if read_marker(root) is None:
        write_marker(root, WORKSPACE)
    return root


def remove_own_directory(path: Path) -> None:
    """Remove ``path`` if this tool wrote it: it carries the marker, or lies inside a marked workspace.

    A missing path is fine; anything else raises OutputError and nothing is removed."""
    path = Path(path)
    if path.is_symlink():
        raise OutputError(f"{path} is a symlink; the tool removes only directories it wrote")
    if not path.exists():
        return
    resolved = path.resolve()
    marker = read_marker(resolved)
    in_workspace = any((read_marker(p) or {}).get("kind") == WORKSPACE for p in resolved.parents)
    if (marker is None and not in_workspace) or not resolved.is_dir():
        raise OutputError(f"{resolved} was not written by midus-surgery (no {MARKER} marker in it or in a workspace above it); not removing it")
    if marker is not None and _unrecorded(marker) and not in_workspace:
        raise OutputError(f"{resolved} (marked as written by {_written_by(marker)}) {UNRECORDED}; not removing it: remove it yourself")
    foreign = _not_removable(resolved, marker) if marker is not None else []
    if foreign:
        shown = _first_five(foreign)
        raise OutputError(f"{resolved} (written by {_written_by(marker)}) also holds what midus-surgery did not write there: "
                          f"{shown}; not removing it: move them out first")
    try:
        shutil.rmtree(resolved)
    except OSError as exc:  # a mount point empties but is not removed; a file busy elsewhere
        raise OutputError(f"could not remove {resolved} whole ({exc.strerror or exc}); what is left in it was written by "
                          "midus-surgery") from None


def _not_removable(directory: Path, marker: dict) -> list[str]:
    """What removing ``directory`` would delete that the tool did not write: beyond a whole output's recorded
    files, or in a run directory (which train writes into over time) beyond what train puts there."""
    if isinstance(marker.get("files"), list):
        return _not_written_by_tool(directory, marker)
    if marker.get("kind") == RUN_KIND:
        return not_written_in_run_dir(directory)
    return []


CHECKPOINT_STATE = "trainer_state.json"  # a checkpoint's state file, which records its files (train/checkpoint.py)
_CHECKPOINT_NAME = re.compile(r"^step-\d{8}$")
# a checkpoint train moved aside (train/checkpoint.move_aside): one that did not verify, or a later one a resume from an
# earlier step left behind; still the tool's, so a later run in the same run_dir goes on beside it
SET_ASIDE_CHECKPOINT_NAME = re.compile(r"^step-\d{8}\.(?:broken|superseded)(?:-[0-9a-f]{6})?$")
PARTIAL_CHECKPOINT_NAME = re.compile(r"^\.tmp-step-\d{8}-[0-9a-f]{6}$")  # what train/checkpoint.save_checkpoint names its temp folder
# What train writes inside the folders of a run directory, by folder: checkpoints are checked against their own records
_RUN_FOLDER_FILES = {"tensorboard": re.compile(r"^events\.out\.tfevents\..*"), "trace": re.compile(r"^rank\d+\.jsonl$")}


def checkpoint_extras(checkpoint: Path) -> list[str]:
    """What a checkpoint folder holds beyond the files its state file records (a user's notes), as
    relative paths; [] for a checkpoint that records none (written before files were recorded)."""
    try:
        recorded = loads_checked(read_small_text(checkpoint / CHECKPOINT_STATE), special_floats=True).get("files")
    except (OSError, ValueError, AttributeError):
        return []
    if not isinstance(recorded, dict):
        return []
    return sorted(_entries(checkpoint) - set(recorded) - {CHECKPOINT_STATE})


# What a partial checkpoint (a killed run's PARTIAL_CHECKPOINT_NAME folder) may hold, by relative path: accelerate's
# save_state files (weights, optimiser, RNG, a scaler, FSDP's folders of shards) and train's own (its RNG, scheduler and
# state files). Nothing else in it is the tool's: a partial holding more is kept, whatever its name.
_PARTIAL_CHECKPOINT_FILES = re.compile(
    r"^(?:model(?:_\d+)?\.safetensors|(?:pytorch_model|optimizer|scheduler|sampler|dl_state_dict)(?:_\d+)?\.bin"
    r"|pytorch_model_fsdp_\d+\.bin|scaler\.pt|random_states_\d+\.pkl"
    r"|rng_state_\d+\.safetensors|scheduler\.json|trainer_state\.json|custom_checkpoint_\d+\.pkl"
    r"|(?:pytorch_model_fsdp|optimizer)_\d+/(?:__\d+_\d+\.distcp|\.metadata)?"  # an empty one: killed as it began
    # safetensors writes each file as .tmpXXXXXX beside it, then renames it: a kill mid-write leaves that (trial78 F1:
    # taken for the user's, it blocked every resume)
    r"|\.tmp[A-Za-z0-9]{6})$")


def partial_checkpoint_extras(partial: Path) -> list[str]:
    """What a partial checkpoint folder holds that a checkpoint never does (relative paths; a user's notes): such a
    folder is not removed, whatever its name."""
    return sorted(name for name in _entries(partial) if not _PARTIAL_CHECKPOINT_FILES.match(name))


def not_written_in_checkpoints(root: Path) -> list[str]:
    """What a run's checkpoints folder holds that train did not write (paths relative to it): entries
    that are no ``step-N`` folder, and files a checkpoint's state file does not record."""
    found = []
    for child in sorted(root.iterdir()):
        if _own_probe(child):
            continue
        if PARTIAL_CHECKPOINT_NAME.match(child.name) and child.is_dir() and not child.is_symlink():  # a killed run's partial
            found += [f"{child.name}/{x}" for x in partial_checkpoint_extras(child)]
            continue
        ours = _CHECKPOINT_NAME.match(child.name) or SET_ASIDE_CHECKPOINT_NAME.match(child.name)
        if not (ours and child.is_dir() and not child.is_symlink()):
            found.append(child.name)
        else:
            found += [f"{child.name}/{x}" for x in checkpoint_extras(child)]
    return found


def _own_probe(entry: Path) -> bool:
    """An empty folder named as probe_write names its probes (a real folder, not a link)."""
    return bool(_PROBE_NAME.match(entry.name)) and entry.is_dir() and not entry.is_symlink() and not any(entry.iterdir())


def _export_leftover(entry: Path) -> bool:
    """A hidden sibling train's export leaves in a run directory when killed: ``.final.partial-XXXXXXXX`` or
    ``.final.old-XXXXXXXX``, a real folder carrying the tool's marker (or empty: killed before writing it).
    A user's ``.notes.old-20261204`` is none."""
    if not (_LEFTOVER_NAME.match(entry.name) and entry.name.startswith(".final.")) or entry.is_symlink() or not entry.is_dir():
        return False
    return read_marker(entry) is not None or not any(entry.iterdir())


def not_written_in_run_dir(run_dir: Path) -> list[str]:
    """What a run directory holds that train did not write, at any depth (relative paths): entries beyond
    RUN_ENTRIES, an export's files beyond its record, checkpoint files beyond their state file's record,
    anything else in checkpoints/, tensorboard/ or trace/."""
    found = []
    for entry in sorted(run_dir.iterdir()):
        name = entry.name
        # the marker, or its rewrite a kill left; a partial or replaced export's hidden sibling
        if name == MARKER or (_MARKER_TMP_NAME.match(name) and entry.is_file() and not entry.is_symlink()) or _export_leftover(entry) \
                or _own_probe(entry):
            continue
        if name not in RUN_ENTRIES or entry.is_symlink():
            found.append(name)
        elif name == "final" and entry.is_dir():
            export = read_marker(entry)
            found += [f"final/{x}" for x in (_not_written_by_tool(entry, export) if export else sorted(_entries(entry)))]
        elif name == "checkpoints" and entry.is_dir():
            found += [f"checkpoints/{x}" for x in not_written_in_checkpoints(entry)]
        elif name in _RUN_FOLDER_FILES and entry.is_dir():
            found += [f"{name}/{x}" for x in sorted(_entries(entry)) if not _RUN_FOLDER_FILES[name].match(x) or (entry / x).is_symlink()]
    return found


def logs_that_are_not_files(run_dir: Path) -> list[str]:
    """The logs of an existing run directory train reads back and appends to (metrics.jsonl, trace/rank0.jsonl)
    that are not regular files: a named pipe there made a resumed run wait forever for a writer (trial66)."""
    logs = [run_dir / "metrics.jsonl"]
    if (run_dir / "trace").is_dir() and not (run_dir / "trace").is_symlink():
        logs += [run_dir / "trace" / x for x in sorted(_entries(run_dir / "trace")) if _RUN_FOLDER_FILES["trace"].match(x)]
    return [path.relative_to(run_dir).as_posix() for path in logs
            if (path.exists() or path.is_symlink()) and not path.is_symlink() and regular_file_problem(path)]


def links_train_writes_through(run_dir: Path) -> list[str]:
    """What train would write through a symlink in an existing run directory (relative paths): a
    top-level entry it writes (metrics.jsonl, loss.png, trace/, ...) that is a link, or a link among
    the files of its log folders (trace/rank0.jsonl). Writing there would change the link's target,
    a file the tool did not write."""
    found = []
    for name in sorted(RUN_ENTRIES):
        entry = run_dir / name
        if entry.is_symlink():
            found.append(name)
        elif name in _RUN_FOLDER_FILES and entry.is_dir():
            found += [f"{name}/{x}" for x in sorted(_entries(entry)) if (entry / x).is_symlink()]
    return found
