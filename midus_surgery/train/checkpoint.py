"""Checkpoints: writing one, choosing the newest whole one, loading one, and the files' own rules.

A checkpoint (``run_dir/checkpoints/step-NNNNNNNN/``) holds the model (safetensors: the trained tensors and buffers
only when some parameters are frozen, every tensor under FSDP or when nothing is), the optimiser
(accelerate's ``optimizer.bin``, read only with weights_only=True), the scheduler (JSON), each
process's RNG state (safetensors) and ``trainer_state.json``, written last, which marks it complete
and records every other file's size (docs/reliability.md). With the data position
(``samples_seen``) that is everything a resumed run needs to continue exactly where the writing run
was: a run killed at any moment ends, resumed, with the weights of an uninterrupted one.

``save_checkpoint``, ``newest_whole_checkpoint`` and ``load_checkpoint`` take what they touch (the
accelerator, the optimiser, the scheduler, paths), not the runner. Every process calls them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import shutil
import signal
import threading
import time
import uuid
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from midus_surgery import __version__
from midus_surgery.errors import (
    FILE_TOO_LARGE,
    Terminated,
    TrainingError,
    disk_advice,
    file_size_limit,
    file_too_large,
    load_error_line,
    one_line,
    printable,
    torch_write_failed,
)
from midus_surgery.io.file_digest import changed_since_written, sha256_of, tensor_sha256s, written_stamp
from midus_surgery.io.json_text import loads_checked
from midus_surgery.io.output_dir import CHECKPOINT_STATE, PARTIAL_CHECKPOINT_NAME, checkpoint_extras, give_default_mode, partial_checkpoint_extras
from midus_surgery.io.small_files import read_small_text
from midus_surgery.train.dcp_guard import dcp_checkpoint_problem

CHECKPOINT_RE = re.compile(r"^step-(\d{8})$")
STATE_FILE = CHECKPOINT_STATE


def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every checkpoint directory whose state file was written (oldest first).
    Complete is not whole: ``verify_checkpoint`` says whether its files are as written."""
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = CHECKPOINT_RE.match(p.name)
        if m and (p / STATE_FILE).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


# A checkpoint holds no pickle but accelerate's optimizer file (read with weights_only=True only)
# and, sharded under FSDP, DCP's pickles (checked by train/dcp_guard.py before torch reads them):
# the scheduler's state is JSON, each process's RNG state a safetensors file.
SCHEDULER_FILE = "scheduler.json"
LEGACY_SCHEDULER_FILE = "scheduler.pt"  # checkpoints written before the JSON file; read with weights_only=True
STATE_KEYS = ("step", "samples_seen", "data")
# The layout a checkpoint's files follow, recorded in its state file as ``format`` (none recorded: 1). A version reads
# the formats up to its own and refuses a later one by name, where it would otherwise misread it (an older version took
# a format-2 checkpoint's missing frozen tensors for damage and advised moving it out).
#   1: every tensor in model.safetensors.
#   2: a run with frozen parameters keeps only the trained ones, beside the digest of the frozen (init_from's frozen_sha256).
CHECKPOINT_FORMAT = 2


class NewerCheckpoint(ValueError):
    """A checkpoint written in a later format than this version reads: never skipped or moved aside as broken."""


def rng_file(rank: int) -> str:
    return f"rng_state_{rank}.safetensors"


def legacy_rng_file(rank: int) -> str:
    return f"random_states_{rank}.pkl"  # accelerate's own (pickle); older checkpoints only


def _safetensors_problem(path: Path) -> str | None:
    """Whether a safetensors file's header parses and its tensors end where the file ends (a cut file does not)."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            if size < 8 or n > size - 8:
                return f"{path.name}: cut short or not safetensors ({size} bytes; its header alone claims {n + 8})"
            header = loads_checked(fh.read(n))
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
        return f"{path.name}: not a safetensors file ({load_error_line(exc, 120)})"
    if 8 + n + end != size:
        return f"{path.name}: {size} bytes, its header describes {8 + n + end}"
    return None


def header_digest(path: Path) -> str | None:
    """The sha256 of a safetensors file's header (its tensors' names, dtypes, shapes and offsets), or None when the
    file does not read: recorded when a checkpoint is written, so a header changed at the same size (a dtype
    rewritten, trial61: a float tensor made I32 loaded as its integer values) is caught before a resume."""
    try:
        with open(path, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            return hashlib.sha256(fh.read(min(n, 100 * 2**20))).hexdigest()
    except OSError:
        return None


def read_checkpoint_state(path: Path) -> dict:
    """The checkpoint's state file, with the keys a resume needs; ``ValueError`` (one line) when not."""
    try:
        state = loads_checked(read_small_text(path / STATE_FILE), special_floats=True)  # json.dumps wrote it
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"{STATE_FILE}: unreadable ({load_error_line(exc, 120)})") from None
    if isinstance(state, dict):
        fmt = state.get("format", 1)
        if not isinstance(fmt, int) or isinstance(fmt, bool) or fmt < 1:
            raise ValueError(f"{STATE_FILE}: its format is not a version number (got {printable(repr(fmt))[:40]})")
        if fmt > CHECKPOINT_FORMAT:
            by = state.get("written_by")
            raise NewerCheckpoint(f"{STATE_FILE}: it is in checkpoint format {fmt}"
                                  + (f", written by {printable(by)[:60]}" if isinstance(by, str) else "")
                                  + f"; this midus-surgery ({__version__}) reads formats up to {CHECKPOINT_FORMAT}: resume it with the "
                                  "version that wrote it, or a later one (it is left as it is)")
    if not isinstance(state, dict) or any(k not in state for k in STATE_KEYS):
        raise ValueError(f"{STATE_FILE}: lacks {', '.join(k for k in STATE_KEYS if not isinstance(state, dict) or k not in state)}")
    if not all(isinstance(state[k], int) and state[k] >= 0 for k in ("step", "samples_seen")):
        raise ValueError(f"{STATE_FILE}: step and samples_seen are not counts")
    if not isinstance(state["data"], dict):
        raise ValueError(f"{STATE_FILE}: data is not a mapping (got {type(state['data']).__name__})")
    if "world_size" in state and not (isinstance(state["world_size"], int) and state["world_size"] >= 1):
        raise ValueError(f"{STATE_FILE}: world_size is not a process count")
    m = CHECKPOINT_RE.match(path.name)
    if m and state["step"] != int(m.group(1)):
        raise ValueError(f"{STATE_FILE}: says step {state['step']}, the directory step {int(m.group(1))}")
    # written together from the same numbers: one that disagrees was changed since (trial63: samples_seen edited by
    # hand replayed data, or claimed 64 billion tokens trained in the export's history)
    config = state.get("config")
    data = config.get("data") if isinstance(config, dict) else None
    block = data.get("block_size") if isinstance(data, dict) else None  # a hand-edited config of other types: not compared
    tokens = state.get("tokens_seen")
    if isinstance(block, int) and isinstance(tokens, int) and tokens != state["samples_seen"] * block:
        raise ValueError(f"{STATE_FILE}: says samples_seen {state['samples_seen']:,} of {block} tokens ({state['samples_seen'] * block:,} "
                         f"tokens) but tokens_seen {tokens:,}: changed since it was written")
    return state


def verify_checkpoint(path: Path) -> str | None:
    """None when the checkpoint is whole as far as can be told without loading it; else one line:
    which file, what is wrong. Whole: the state file parses with its keys, every file it records
    is there with the recorded size, every safetensors header parses and fits its file, and is the one
    written (its digest, where recorded). Older checkpoints record no sizes: their state file, scheduler
    file and headers are checked."""
    try:
        state = read_checkpoint_state(path)
    except NewerCheckpoint:
        raise  # not broken: this version cannot tell
    except ValueError as exc:
        return str(exc)
    files = state.get("files")
    if files is None:  # written before sizes were recorded
        for what, patterns in (("model weights", ("model*.safetensors", "pytorch_model*")), ("optimiser state", ("optimizer*",)),
                               ("scheduler state", (LEGACY_SCHEDULER_FILE,))):
            if not any(next(path.glob(pattern), None) for pattern in patterns):
                return f"{what} missing (no {' or '.join(patterns)})"
        names = [p.relative_to(path).as_posix() for p in path.rglob("*.safetensors")]
    elif not isinstance(files, dict) or not all(isinstance(v, int) for v in files.values()):
        return f"{STATE_FILE}: its file list is not name -> size"
    else:
        for name, size in sorted(files.items()):
            f = path / name
            if not f.is_file():
                return f"{name}: missing"
            if f.stat().st_size != size:
                return f"{name}: {f.stat().st_size} bytes, {size} recorded"
        names = [n for n in files if n.endswith(".safetensors")]
    for name in sorted(names):
        problem = _safetensors_problem(path / name)
        if problem:
            return problem
    if isinstance(files, dict) and SCHEDULER_FILE in files:  # the scheduler steps with the optimiser: its position is the step
        try:
            position = loads_checked(read_small_text(path / SCHEDULER_FILE), special_floats=True).get("last_epoch")
        except (OSError, UnicodeDecodeError, ValueError, AttributeError):
            position = None  # unreadable: the load says so, naming the file
        if isinstance(position, int) and position != state["step"]:
            return f"{SCHEDULER_FILE}: its schedule is at step {position}, the checkpoint at step {state['step']}: changed since it was written"
    digests = state.get("headers")
    if isinstance(digests, dict):
        for name, digest in sorted(digests.items()):
            if header_digest(path / name) != digest:
                return f"{name}: its header changed since it was written (the tensors' names, dtypes or shapes)"
    contents, stamps = state.get("sha256"), state.get("written")
    if isinstance(contents, dict):  # recorded since trial74; unchanged stamps (inode, size, mtime) spare reading them all
        for name, digest in sorted(contents.items()):
            stamp = stamps.get(name) if isinstance(stamps, dict) else None
            if (path / name).is_file() and changed_since_written(path / name, digest, stamp):
                return f"{name}: its contents changed since it was written (its SHA-256 is not the one {STATE_FILE} records)"
    return None


def _verifies(path: Path) -> bool:
    try:
        return verify_checkpoint(path) is None
    except NewerCheckpoint:
        return False


def first_unreadable_file(path: Path, names) -> str | None:
    """After a failed load: the first of ``names`` that does not read on its own, as ``name: error``
    (safetensors read whole; pickles with weights_only=True only), or None."""
    from accelerate.utils import load as safe_torch_load  # torch.load(weights_only=True) plus numpy's types
    from safetensors import safe_open

    for name in names:
        f = path / name
        try:
            if name.endswith(".safetensors"):
                with safe_open(f, framework="pt") as st:
                    for key in st.keys():
                        st.get_tensor(key)
            elif name.endswith((".bin", ".pt", ".pkl")):
                with quiet_pickle_notes():
                    safe_torch_load(f, map_location="cpu")
        except Exception as exc:  # noqa: BLE001 - whatever the reader says, said in one line
            return f"{name}: {load_error_line(exc)}"
    return None


def save_rng_state(path: Path) -> None:
    """This process's python, numpy, torch (and CUDA) RNG states as safetensors: tensors, and the
    few scalars as JSON in its metadata."""
    from safetensors.torch import save_file

    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    tensors = {"python": torch.tensor(py_state, dtype=torch.int64), "numpy": torch.from_numpy(np_keys.astype(np.int64)),
               "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"cuda_{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    meta = {"python": json.dumps([py_version, py_gauss]), "numpy": json.dumps([np_name, np_pos, np_has_gauss, np_gauss])}
    save_file(tensors, str(path), metadata=meta)


def load_rng_state(path: Path) -> None:
    """Restore what ``save_rng_state`` wrote; any problem raises (never a silently fresh RNG)."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as st:
        t = {k: st.get_tensor(k) for k in st.keys()}
        meta = st.metadata() or {}
    py_version, py_gauss = loads_checked(meta["python"])
    np_name, np_pos, np_has_gauss, np_gauss = loads_checked(meta["numpy"])
    random.setstate((py_version, tuple(int(x) for x in t["python"].tolist()), py_gauss))
    np.random.set_state((np_name, t["numpy"].numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
    torch.set_rng_state(t["torch"])
    cuda = sorted((k for k in t if k.startswith("cuda_")), key=lambda k: int(k[5:]))
    if cuda and torch.cuda.is_available():
        for i, key in enumerate(cuda[:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(t[key], i)


@contextlib.contextmanager
def quiet_pickle_notes():
    """torch's two-line UserWarning on a pickle's protocol ("Detected pickle protocol 4 ..."), printed before the one-line
    error a bad checkpoint file gets (trial70), or before nothing at all: not the user's business."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Detected pickle protocol")
        yield


def load_legacy_rng_state(path: Path) -> None:
    """accelerate's pickle of an older checkpoint, read as accelerate reads it (weights_only=True with
    numpy's types allowed), but its errors raise: accelerate only logs them."""
    from accelerate.utils import load as safe_torch_load

    with quiet_pickle_notes():
        states = safe_torch_load(path)
    random.setstate(states["random_state"])
    np.random.set_state(states["numpy_random_seed"])
    torch.set_rng_state(states["torch_manual_seed"])
    if "torch_cuda_manual_seed" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["torch_cuda_manual_seed"])


def scheduler_state(path: Path, current: dict) -> dict:
    """The scheduler state a checkpoint holds, checked against the keys of ``current`` (ours)."""
    if (path / SCHEDULER_FILE).is_file():
        state = loads_checked(read_small_text(path / SCHEDULER_FILE), special_floats=True)  # json.dumps wrote it
    else:
        with quiet_pickle_notes():
            state = torch.load(path / LEGACY_SCHEDULER_FILE, weights_only=True)
    # only the keys this scheduler has (plus an older torch's "verbose"), one lambda per parameter group
    if (not isinstance(state, dict) or set(state) - set(current) - {"verbose"} or {"base_lrs", "last_epoch"} - set(state)
            or len(state.get("lr_lambdas") or ()) != len(current["lr_lambdas"])):
        raise ValueError(f"not this run's scheduler state (keys {sorted(state) if isinstance(state, dict) else type(state).__name__})")
    # the resume computes this step's lr from them: a text or a list of another length is a one-line refusal, not a traceback
    if (not isinstance(state["last_epoch"], int) or isinstance(state["last_epoch"], bool) or state["last_epoch"] < 0
            or not isinstance(state["base_lrs"], list) or len(state["base_lrs"]) != len(current["base_lrs"])
            or not all(isinstance(lr, (int, float)) and not isinstance(lr, bool) for lr in state["base_lrs"])):
        raise ValueError(f"not this run's scheduler state (last_epoch {state['last_epoch']!r}, base_lrs {str(state['base_lrs'])[:80]})")
    return state


def weights_checksum(model) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        if hasattr(t, "full_tensor"):  # an FSDP2 shard (DTensor): the whole tensor, gathered by every process in this order
            t = t.full_tensor()  # (.numpy() of the shard raised at the end of a data_trace run: trial87 F5)
        h.update(name.encode())
        # reshape(-1) first: a 0-dim tensor (query_norm batch's `updates`) cannot be viewed as bytes (trial122 F2)
        h.update(t.detach().to("cpu").reshape(-1).contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP's and torch.compile's wrappers, around the model accelerate prepared


def plain_name(name: str) -> str:
    """A state-dict key without the wrappers' prefixes: the name a checkpoint's file holds whatever wrapped the model
    that wrote it or reads it (2 processes or 1, compiled or not: trial97 F1, F2 refused every such resume)."""
    while name.startswith(_WRAPPER_PREFIXES):
        name = name.split(".", 1)[1]
    return name


def frozen_names(model) -> set[str]:
    """Every name (``plain_name``) of every parameter that does not train, tied aliases included (an embedding and
    the lm_head it is tied to are one tensor under two state-dict keys: both go, or both stay)."""
    return {plain_name(name) for name, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}


def trained_tensors_only(models, weights, output_dir) -> None:
    """accelerate's save-state pre-hook: each model's state dict without its frozen parameters. They never change
    during a run and are init_from's (checked by content on resume, ``frozen_digest``), so writing them in fp32 at
    every checkpoint cost the whole model's size for the few tensors that train (a 1.7B base with freeze: base:
    6.9 GB per checkpoint for 27M trained parameters). Under FSDP accelerate passes no state dicts (it writes its
    sharded checkpoint itself): those checkpoints keep every tensor."""
    if len(weights) != len(models):  # FSDP: none; another engine's layout: left as accelerate writes it
        return
    for i, (model, state) in enumerate(zip(models, weights)):
        frozen = frozen_names(model)
        if frozen:
            # of the state dict's own type: accelerate drops a tied pair's second name only from an OrderedDict, and
            # safetensors refuses two names on one tensor (trial97 F3: a tied embedding that trained, beside frozen
            # memory retrieval, lost every checkpoint and the export)
            weights[i] = type(state)((name, t) for name, t in state.items() if plain_name(name) not in frozen)


def frozen_digest(model) -> str | None:
    """The SHA-256 over the frozen parameters' names, dtypes, shapes and bytes as loaded (sorted by name), or None
    when every parameter trains. A checkpoint that holds only the trained tensors records it: its resume takes the
    frozen ones from init_from, whose file sizes and headers (``model_identity``) say nothing of their values."""
    frozen = dict(sorted((plain_name(name), p) for name, p in model.named_parameters() if not p.requires_grad))  # compiled or not
    if not frozen:
        return None
    parts = tensor_sha256s(frozen)
    h = hashlib.sha256()
    for name, p in frozen.items():
        h.update(f"{name}\0{p.dtype}\0{tuple(p.shape)}\0".encode() + parts[name])
    return h.hexdigest()


# --------------------------------------------------------------------------- writing, choosing, loading


@contextlib.contextmanager
def interrupts_deferred():
    """Ctrl-C, SIGTERM and SIGHUP, as the command line handles them, wait until the block ends, then act: a block
    that puts a written checkpoint in place (a fraction of a second) ends whole. A Ctrl-C just after the state
    file was written had left a complete checkpoint under its temporary name, and the run named an older one as
    its newest (trial63). Signals left to their default action (SIG_DFL, SIG_IGN) and any call off the main thread,
    where Python cannot set handlers, are left as they are."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[tuple[int, object]] = []
    previous = {}
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        handler = signal.getsignal(signum)
        if callable(handler):
            previous[signum] = handler
            signal.signal(signum, lambda got, frame: held.append((got, frame)))
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if held:  # as it would have acted: KeyboardInterrupt, or the command line's Terminated
        signum, frame = held[0]
        previous[signum](signum, frame)


def remove_partial_checkpoints(root: Path, report: Callable[[str], None] = print) -> None:
    """Remove the ``.tmp-step-*`` directories of checkpoints a killed run was writing (main process only):
    exactly the names save_checkpoint gives them (a user's ``.tmp-step-notes`` is kept), real
    directories only (a link is never followed), holding only what a checkpoint holds (one that holds
    more, a user's file, is kept, and ``report`` says so)."""
    for stale in root.iterdir():
        if PARTIAL_CHECKPOINT_NAME.match(stale.name) and stale.is_dir() and not stale.is_symlink():
            extras = partial_checkpoint_extras(stale)
            if extras:
                report(f"kept {stale}, a partial checkpoint of a killed run: it also holds {', '.join(extras[:5])}, which "
                       "midus-surgery did not write")
                continue
            shutil.rmtree(stale, ignore_errors=True)


def save_checkpoint(root: Path, acc, scheduler, *, step: int, samples_seen: int, keep_last: int, facts: dict,
                    report: Callable[[str], None] = print) -> Path:
    """Write ``root/step-NNNNNNNN`` whole or not at all, then keep only the newest ``keep_last``.
    A checkpoint holding files it does not record (a user's notes) is never removed: an older one
    is kept (``report`` says so), and rewriting one is an error.

    Every process writes its part (accelerate's model and optimiser shards, its own RNG file) into
    one temp directory; the main process then adds the scheduler (JSON) and, last, the state file
    with each file's size, and renames the directory into place. ``facts``: what else the state
    file records (tokens_seen, total_steps, world_size, the data identity under ``data``, config).
    """
    from accelerate.utils import broadcast_object_list

    main, rank = acc.is_main_process, acc.process_index
    final = root / f"step-{step:08d}"
    # All processes write into the same temp directory: the main process names it and tells the others.
    holder = [str(root / f".tmp-step-{step:08d}-{uuid.uuid4().hex[:6]}") if main else None]
    if acc.num_processes > 1:
        broadcast_object_list(holder)
    tmp = Path(holder[0])
    tmp_is_ours = True  # until the main process's mkdir fails: then what is at tmp, if anything, is not this run's
    stop_before = Terminated.last
    try:
        if main:
            try:
                tmp.mkdir(parents=True)  # inside the try: a Ctrl-C just after it removes the partial too
            except OSError:
                tmp_is_ours = False
                raise
        acc.wait_for_everyone()
        acc.save_state(str(tmp), safe_serialization=True)  # model (safetensors), optimiser (pickle), RNG (pickle)
        # accelerate's RNG pickle is replaced by a safetensors file; every process writes its own
        (tmp / legacy_rng_file(rank)).unlink(missing_ok=True)
        save_rng_state(tmp / rng_file(rank))
    except BaseException as exc:  # a full disk, an interrupt: no half-written checkpoint is left behind
        if tmp_is_ours:
            shutil.rmtree(tmp, ignore_errors=True)
        inner = _inner_failure(exc)  # a sharded save's CheckpointException (a BaseException) holds what broke
        if not isinstance(inner, KeyboardInterrupt) and Terminated.last is not stop_before:
            inner = Terminated.last  # a SIGTERM the writer turned into its own error (trial87 F3: "unexpected pos"), not a full disk
        if isinstance(inner, KeyboardInterrupt):  # a Ctrl-C (or SIGTERM's Terminated) inside a sharded save: said as one
            raise inner from None
        if not isinstance(inner, Exception):
            raise
        if lost_a_process(inner):  # the run says another process stopped, not a full disk
            raise inner from None
        raise _cannot_write(inner, final, root) from None
    try:
        acc.wait_for_everyone()
    except BaseException:  # a Ctrl-C while the others finish their part left the whole temp folder behind (trial74 F3)
        if main and tmp_is_ours:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if main:
        try:  # the files are written: the rest takes a moment, and a Ctrl-C waits for it (the checkpoint is kept whole)
            with interrupts_deferred():
                for written in tmp.rglob("*.safetensors"):
                    give_default_mode(written)  # safetensors writes 0600
                (tmp / SCHEDULER_FILE).write_text(json.dumps(scheduler.state_dict()) + "\n")  # plain numbers, no pickle
                files = {p.relative_to(tmp).as_posix(): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
                headers = {name: header_digest(tmp / name) for name in files if name.endswith(".safetensors")}
                # each file's contents, so a resume finds one changed at the same size (trial74 F6: trained on without a word)
                contents = {name: sha256_of(tmp / name) for name in files}
                stamps = {name: written_stamp(tmp / name) for name in files}
                state = {"format": CHECKPOINT_FORMAT, "written_by": f"midus-surgery {__version__}", "step": step,
                         "samples_seen": samples_seen, **facts, "time": time.time(), "files": files, "headers": headers,
                         "sha256": contents, "written": stamps}
                (tmp / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")  # last: marks the checkpoint complete
                if final.exists() and not (final / STATE_FILE).is_file():
                    # not a checkpoint (its state file moved out, a user's folder so named): nothing says what in it is the
                    # tool's, and it was deleted whole, notes and all (trial74 F2). Kept, renamed, out of the way.
                    aside = move_aside(final, "broken", acc)
                    report(f"{final} holds no {STATE_FILE}, so it is no checkpoint train wrote whole; moved to {aside.name}, kept")
                elif final.exists():
                    extras = checkpoint_extras(final)
                    if extras:
                        raise TrainingError(f"{final} also holds what midus-surgery did not write there ({', '.join(extras[:5])}); "
                                            "rewriting it would delete them: move them out, then resume")
                    shutil.rmtree(final)
                os.replace(tmp, final)
        except BaseException as exc:  # a full disk, a refusal above, or the Ctrl-C that waited, after the rename: no partial left
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(exc, OSError):  # the scheduler's or the state file's write (trial78 F3: the plain "disk is full")
                raise _cannot_write(exc, final, root) from None
            raise
        for _, old in complete_checkpoints(root)[:-keep_last]:
            extras = checkpoint_extras(old)
            if extras:
                report(f"kept {old} past checkpoint.keep_last: it also holds {', '.join(extras[:5])}, which midus-surgery did not write")
                continue
            # renamed to a partial's name first: a kill in the middle of the removal leaves a folder the next run removes, not a
            # step-N without its state file (deleted first on some file systems) that no run prunes (trial78 F2)
            doomed = root / f".tmp-{old.name}-{uuid.uuid4().hex[:6]}"
            try:
                os.replace(old, doomed)
            except OSError as exc:  # the new checkpoint is whole: a pruning that cannot happen is said, not fatal
                report(f"kept {old} past checkpoint.keep_last: it could not be removed ({exc.strerror or exc})")
                continue
            shutil.rmtree(doomed, ignore_errors=True)
    acc.wait_for_everyone()
    return final


def _cannot_write(exc: OSError | Exception, final: Path, root: Path) -> TrainingError:
    """A checkpoint's write that failed (a full disk, a file-size limit, a read-only disk), in one line naming the
    checkpoint to resume from. torch's writer reports a full disk as "unexpected pos": the room left is said instead."""
    last = complete_checkpoints(root)
    free = shutil.disk_usage(root).free
    # torch's writer says no errno: under a `ulimit -f` limit its failure is taken for that limit, unless the disk is
    # nearly full, which is then the likelier cause (trial80 N1: a full disk said as the limit, "free space" left out)
    full = torch_write_failed(exc) and getattr(exc, "errno", None) is None and free < 64 << 20
    advice = "free space there" if full else disk_advice(exc)
    if file_too_large(exc) and not full:  # room on the disk: its free MiB said nothing about it (trial66)
        limit = file_size_limit()
        room = FILE_TOO_LARGE + (f"; this process may write files of at most {limit:,} bytes" if limit is not None else "")
    elif torch_write_failed(exc) and free > 1 << 30:
        room = (f"{free / 2**20:.1f} MiB free on its disk: torch's writer failed with room left, so a limit on one file's size "
                "(a file system such as FAT32, whose files stop at 4 GiB) or a failing disk")
    else:
        room = f"{free / 2**20:.1f} MiB free on its disk"
    return TrainingError(f"cannot write the checkpoint {final} ({one_line(exc, 160)}); {room}; " +
                         (f"the last whole checkpoint is {last[-1][1]}: {advice}, then resume: auto"
                          if last else "no checkpoint was written yet"))


class NoWholeCheckpoint(ValueError):
    """``resume: auto`` over checkpoints none of which verifies (the message says the newest's problem)."""


def newest_whole_checkpoint(root: Path, acc, say: Callable[[str], None], *, move: bool = True) -> Path | None:
    """``resume: auto``: the newest checkpoint under ``root`` that verifies (None: there are none).

    Newer ones that do not are said in one line each and moved aside (``step-N.broken``): kept
    for a look, out of the way of this run's own checkpoints and of pruning, which would otherwise
    keep them over good ones (``move=False``, a dry run: only said). NoWholeCheckpoint when there are
    checkpoints and none verifies; NewerCheckpoint (naming it) when one, newer than the whole one, is in a format this
    version does not read: nothing is moved then.
    """
    chosen, broken = None, []
    for _, path in reversed(complete_checkpoints(root)):
        try:
            problem = verify_checkpoint(path)
        except NewerCheckpoint as exc:  # resuming from an older one would branch that run, and ours would prune it
            raise NewerCheckpoint(f"{path}: {exc}") from None
        if problem is None:
            chosen = path
            break
        broken.append((path, problem))
    if broken and chosen is None:
        newest, problem = broken[0]
        raise NoWholeCheckpoint(f"no checkpoint in {root} verifies (newest, {newest.name}: {problem}); "
                                "move them away to start afresh, or choose another run_dir")
    acc.wait_for_everyone()  # every process has chosen before one is moved
    for path, problem in broken:
        if not move:
            say(f"checkpoint {path.name} would be skipped: {problem}; the run moves it to {path.name}.broken")
            continue
        aside = move_aside(path, "broken", acc)
        say(f"checkpoint {path.name} skipped: {problem}; moved to {aside.name}")
    newest = int(CHECKPOINT_RE.match(chosen.name).group(1)) if chosen is not None else -1
    for step, path in stateless_step_folders(root):
        if step > newest:  # resumed from an earlier one without a word, then deleted whole when that step came again (trial74 F2)
            say(f"{path.name} holds no {STATE_FILE}, so it is no checkpoint to resume from" + (f" (resuming from {chosen.name})" if chosen else "")
                + f"; it is kept, and moved to {path.name}.broken if the run reaches step {step}")
        else:  # what a kill in the middle of pruning left before pruning renamed first (trial78 F2), or a user's: never pruned
            say(f"{path.name} holds no {STATE_FILE}, so it is no checkpoint: checkpoint.keep_last does not prune it; it is kept "
                "(remove it yourself if nothing in it is wanted)")
    return chosen


def stateless_step_folders(root: Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of the folders named as checkpoints that hold no state file (oldest first)."""
    if not root.is_dir():
        return []
    return sorted((int(m.group(1)), p) for p in root.iterdir()
                  if (m := CHECKPOINT_RE.match(p.name)) and p.is_dir() and not (p / STATE_FILE).is_file())


def move_aside(path: Path, why: str, acc) -> Path:
    """Rename checkpoint ``path`` to ``step-N.<why>`` (a free name): kept for a look, but no longer a checkpoint to
    resume: auto, nor one that pruning counts (it would keep it over this run's own). Main process only; returns the
    new path. Call after every process has read what it needs (acc.wait_for_everyone)."""
    aside = path.with_name(f"{path.name}.{why}")
    if aside.exists():
        aside = path.with_name(f"{path.name}.{why}-{uuid.uuid4().hex[:6]}")
    if acc.is_main_process:
        os.replace(path, aside)
    return aside


def set_aside_later_checkpoints(root: Path, resumed: Path, step: int, acc, say: Callable[[str], None]) -> None:
    """A resume from a checkpoint older than others under ``root`` (going back to an earlier step, e.g. with another
    optim.lr) branches from the run that wrote them: those later checkpoints are another history. Left in place,
    pruning keeps them over this run's own (keep_last counts the highest steps: each new checkpoint was removed as
    soon as written) and resume: auto would take them (trial37). So they are moved aside (``step-N.superseded``),
    each said in one line."""
    later = [path for s, path in complete_checkpoints(root) if s > step and path.resolve() != resumed.resolve()]
    acc.wait_for_everyone()
    for path in later:
        aside = move_aside(path, "superseded", acc)
        say(f"checkpoint {path.name} is later than the one resumed ({resumed.name}): another history; moved to {aside.name}, "
            "kept but no longer resumed from nor counted by checkpoint.keep_last")


DATA_KEYS = ("train", "held_out", "block_size", "seed", "held_out_fraction")  # a resume must read the same blocks


def data_changes(saved: dict, now: dict) -> list[str]:
    """What changed in the data since a checkpoint that makes the resume read other training blocks,
    in the config's words. A separate held-out set (data.held_out) swapped for another is not
    among them: every training block is trained on either way (the runner notes it instead)."""
    changes = []
    for key in DATA_KEYS:
        was, new = saved.get(key), now.get(key)
        if was == new or (key == "held_out" and was is not None and new is not None):
            continue
        if key == "train" and (_same_tokens(saved.get("train_sha256"), now.get("train_sha256")) or now.get("train_same_as") == was):
            continue  # another entry name, the same tokens and documents: the same blocks
        if key == "train":
            why = _why_other_tokens(saved.get("train_reads"), now.get("train_reads"), differs=bool(now.get("train_differs_from_saved")))
            changes.append(f"data.train gives other tokens ({why})")
        elif key == "held_out":
            changes.append(f"data.held_out {'added' if was is None else 'removed'}, which changes the training blocks")
        else:
            changes.append(f"{'seed' if key == 'seed' else 'data.' + key}: {was} -> {new}")
    return changes


def _same_tokens(saved, now) -> bool:
    """Whether two token-cache entries' recorded SHA-256s (of their tokens and document boundaries) are the same."""
    return isinstance(saved, dict) and bool(saved) and saved == now


def _why_other_tokens(saved: dict | None, now: dict | None, *, differs: bool = False) -> str:
    """Why the token-cache entry of data.train differs from the checkpoint's, as far as the checkpoint recorded what the
    entry read (data.reads_of): the entry's name covers the text, the tokenizer, the JSONL field and the naming rules
    (trial46: a swapped tokenizer was said as other text). ``differs``: the checkpoint's own entry is still in the cache,
    and its files hold other tokens than this run's (so the run can tell)."""
    if not isinstance(saved, dict) or not isinstance(now, dict):
        if differs:  # a checkpoint older than the record of what its entry read: its entry, looked up, still says (trial154 L3)
            return "the checkpoint's own token-cache entry, still in the cache, holds other tokens than this run's"
        return ("its text, init_from's tokenizer or data.text_field changed, or the checkpoint was written by a midus-surgery "
                "that named token-cache entries by other rules")
    said = []
    other_rules = saved.get("key_rules") != now.get("key_rules")  # then the tokenizer's part of the name may differ by the rules alone
    if saved.get("tokenizer") != now.get("tokenizer") and not other_rules:
        said.append("init_from's tokenizer changed")
    if saved.get("text_field") != now.get("text_field"):
        said.append(f"data.text_field {saved.get('text_field')} -> {now.get('text_field')}")
    # by their place in the corpus, not their absolute path: a corpus folder moved (or read through a shared token cache
    # under another path) with one file added named every file as changed (trial80 N4)
    was, new = _within_corpus(saved.get("files") or []), _within_corpus(now.get("files") or [])
    if was != new:
        gone, added = [f for f in was if f not in new], [f for f in new if f not in was]
        said.append("other files: " + ", ".join([*(f"-{f}" for f in gone[:2]), *(f"+{f}" for f in added[:2])] or ["the same files in another order"])
                    + (" ..." if len(gone) > 2 or len(added) > 2 else ""))
    if other_rules:
        from midus_surgery.train.data import files_with_a_byte_order_mark

        what = ("the checkpoint's own token-cache entry, still in the cache, holds other tokens than this run's"
                if differs else
                "the checkpoint was written by a midus-surgery that named token-cache entries by other rules: the text and the "
                "tokenizer may be the same, but the run cannot tell")
        marked = files_with_a_byte_order_mark(now.get("files") or [])
        if marked:  # the one change of reading between the rules: named, with what can be done (trial152 F3, trial153 M1)
            what += (f"; {len(marked)} of its text files ({', '.join(os.path.basename(f) for f in marked[:2])}"
                     f"{' ...' if len(marked) > 2 else ''}) start{'s' if len(marked) == 1 else ''} with a UTF-8 byte-order mark, "
                     "which this midus-surgery reads as no text and versions before 2026-12-07 tokenised (3 tokens a file with "
                     "SmolLM2's tokenizer): if the text is as it was, the marks are why (finish the run with the version that "
                     "started it, or remove the marks and start afresh)")
        said.append(what)
    if said:
        return "; ".join(said)
    return "the text of its files changed"


def _within_corpus(files: list) -> list[str]:
    """Each file's path below the folder all of them are in (one file: its name)."""
    files = [str(f) for f in files if isinstance(f, str)]
    if not files:
        return []
    try:
        root = os.path.commonpath(files) if len(files) > 1 else os.path.dirname(files[0])
    except ValueError:  # absolute and relative paths mixed (a hand-edited state file): compared as they are
        return files
    return [os.path.relpath(f, root) for f in files]


def data_change_problem(state: dict, data_identity: dict) -> str | None:
    """Why a checkpoint (its state file) cannot continue on this data, or None."""
    changed = data_changes(state.get("data", {}), data_identity)
    if not changed:
        return None
    return (f"the data changed since it was written ({'; '.join(changed)}); resuming would replay or skip data: resume with "
            "the data it was written with, or start afresh (resume unset) in a run_dir of its own")


# What makes init_from this model for a resume: what the export copies or inherits from it (config, plan, the
# training history it chains onto) and its weight files' names, sizes and safetensors headers (dtypes and shapes:
# `export.dtype: auto` takes init_from's), never the weights' bytes, which would cost a read of the whole model.
IDENTITY_FILES = ("config.json", "midus_plan.json", "midus_train.json")
IDENTITY_WEIGHTS = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
HEADER_MAX = 100 * 2**20  # a safetensors header is JSON of names, dtypes and shapes: megabytes at the most


FROZEN_KEY = "frozen_sha256"  # in a checkpoint's init_from identity: frozen_digest of the model its run trained
START_KEY = "weights_sha256"  # in a checkpoint's init_from identity: weights_sha256 of init_from as the run started


def model_identity(model_dir: Path) -> dict:
    """{"path", "digest"} of a model directory, for a checkpoint to record what its run started from."""
    h = hashlib.sha256()
    for f in sorted(p for p in model_dir.iterdir() if p.is_file()):
        if f.name in IDENTITY_FILES:
            h.update(f"{f.name}\0".encode() + f.read_bytes() + b"\0")
        elif f.name.endswith(IDENTITY_WEIGHTS):
            h.update(f"{f.name}\0{f.stat().st_size}\0".encode())
            if f.suffix == ".safetensors":
                with open(f, "rb") as fh:
                    size = int.from_bytes(fh.read(8), "little")
                    h.update(fh.read(size) if 0 < size <= HEADER_MAX else b"")
    return {"path": str(model_dir), "digest": h.hexdigest()}


def weights_sha256(model_dir: Path) -> str:
    """The SHA-256 over a model directory's weight files (names and whole contents, sorted by name): what
    midus_train.json records of the weights a run started from, so that `analyze --fixed-retrieval` can tell two runs of
    the same apply output from runs of two outputs whose plans read alike (another apply `seed`: other sub-keys and bank).
    Reads the whole model once."""
    from midus_surgery.io.file_digest import sha256_of

    h = hashlib.sha256()
    for f in sorted(p for p in model_dir.iterdir() if p.is_file() and p.name.endswith(IDENTITY_WEIGHTS)):
        h.update(f"{f.name}\0{sha256_of(f)}\0".encode())
    return h.hexdigest()


def init_from_change(saved: dict | None, now: dict) -> tuple[str | None, str | None]:
    """(why a resume from ``init_from`` ``now`` is refused, a note to say) against the identity the checkpoint
    ``saved`` (None for checkpoints written before it was recorded: nothing to compare).

    The export inherits init_from's files, its dtype under `export.dtype: auto`, and its place in the training
    history, so another model would be exported as if the run had started from it. The same model at another
    path (moved, or copied to another disk) goes on with a note."""
    if not isinstance(saved, dict) or not isinstance(saved.get("path"), str) or not isinstance(saved.get("digest"), str):
        return None, None
    # recorded by checkpoints that hold the trained tensors only, compared once this run has loaded init_from (``now``
    # has it then): their resume takes the frozen weights from init_from, so those must be the values the run trained beside
    frozen, frozen_now = saved.get(FROZEN_KEY), now.get(FROZEN_KEY)
    if saved["digest"] == now["digest"] and frozen is not None and frozen_now is not None and frozen != frozen_now:
        return (f"the frozen weights of init_from {now['path']} differ from those the checkpoint's run trained beside (its files' "
                "sizes and headers are the same, their values are not); the checkpoint holds the trained tensors only and takes "
                "the frozen ones from init_from: resume with the model it was written with, or start afresh (resume unset) in a "
                "run_dir of its own"), None
    if saved["digest"] == now["digest"]:
        if saved["path"] == now["path"]:
            return None, None
        return None, (f"note: init_from is {now['path']}, the checkpoint's run started from {saved['path']}: the same config, plan, "
                      "training history and weight files (names, sizes and headers), so the run goes on")
    if saved["path"] == now["path"]:
        why = f"init_from {now['path']} changed since the checkpoint was written (its config, plan, training history or weight files differ)"
    else:
        why = (f"init_from is {now['path']}, but the checkpoint's run started from {saved['path']} (their config, plan, training "
               "history or weight files differ)")
    return (why + ": the export would carry another model's files, dtype and history as this run's; resume with the model it was "
            "written with, or start afresh (resume unset) in a run_dir of its own"), None


# What a collective says when a peer process has died: NCCL's errors are DistError (DistBackendError);
# gloo's are plain RuntimeErrors naming the lost connection.
_PEER_GONE = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "Socket closed")


def lost_a_process(exc: BaseException) -> bool:
    """Whether ``exc`` is a collective failing because another process of the run is gone."""
    if isinstance(exc, getattr(torch.distributed, "DistError", ())):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and "gloo" in text and any(s in text for s in _PEER_GONE)


def _inner_failure(exc: BaseException) -> BaseException:
    """What broke inside torch.distributed.checkpoint's save (FSDP's sharded checkpoint): it gathers every process's
    exception into one CheckpointException, so a Ctrl-C there read as a traceback, and a lost peer as a full disk
    (trial87 F3, F4). Its first process's own exception, or ``exc``."""
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict) and failures:
        first = failures[min(failures)]
        inner = first[0] if isinstance(first, tuple) and first else first
        if isinstance(inner, BaseException):
            return inner
    return exc


FSDP_MODEL = "pytorch_model_fsdp"  # how accelerate names an FSDP checkpoint's weights (a folder of shards, or one file)


def layout_problem(path: Path, fsdp_run: bool) -> str | None:
    """Why a checkpoint cannot load into this run's layout: accelerate reads an FSDP run's weights
    from ``pytorch_model_fsdp_0/`` (sharded) or ``pytorch_model_fsdp_0.bin`` and any other run's
    from ``model.safetensors``, so a checkpoint written one way does not load the other."""
    fsdp_written = any(p.name.startswith(FSDP_MODEL) for p in path.iterdir())
    if fsdp_written and not fsdp_run:
        return ("it was written under FSDP (its weights in pytorch_model_fsdp_0/) and this run does not shard: "
                "resume it launched with the FSDP config it was written with (accelerate launch --config_file ...) on two "
                "or more processes (one process never shards, whatever its config)")
    if not fsdp_written and fsdp_run:
        return ("it was written without FSDP (whole weights in model.safetensors) and this run shards with FSDP: "
                "resume it launched as it was written (one process, or DDP), or start afresh in a run_dir of its own")
    return None


def model_file_problem(path: Path, model, state: dict) -> str | None:
    """Why the checkpoint's ``model.safetensors`` does not fit ``model`` (the prepared one, whose state-dict keys it
    was written under), or None. It may lack frozen parameters (``trained_tensors_only``), so it is loaded with
    strict=False: this is what strict loading checked, and more. Every trainable parameter and buffer must be in it
    (under one of its tied names: safetensors keeps one of each shared pair), every key must be the model's, and a file without
    frozen parameters needs the digest of init_from's (``frozen_digest``) its run recorded, else nothing says that
    the frozen weights this run loaded are the ones it trained beside."""
    from midus_surgery.errors import MidusError
    from midus_surgery.io.tensor_source import read_checked_header

    name = "model.safetensors"
    try:
        header, _ = read_checked_header(path / name)
    except MidusError as exc:
        return one_line(exc, 300)
    held = {plain_name(key) for key in header if key != "__metadata__"}
    # the keys load_state_dict reads, parameters and persistent buffers, without DDP's or torch.compile's prefix
    tensors = {plain_name(key): t for key, t in model.state_dict(keep_vars=True).items()}
    foreign = sorted(held - set(tensors))
    if foreign:
        return (f"{name} holds {len(foreign)} tensor(s) that are not parameters or buffers of this run's model (e.g. "
                f"{', '.join(foreign[:3])})")
    aliases: dict[int, list[str]] = {}  # one tensor's names (tied weights): the file holds one of them
    for key, t in tensors.items():
        aliases.setdefault(id(t), []).append(key)
    frozen = frozen_names(model)
    absent = sorted(names[0] for names in aliases.values() if not frozen.intersection(names) and not held.intersection(names))
    if absent:
        return (f"{name} lacks {len(absent)} of this run's trainable parameters and buffers (e.g. {', '.join(absent[:3])}): it was "
                "not written by a run that trained them")
    without_frozen = any(frozen.intersection(names) and not held.intersection(names) for names in aliases.values())
    recorded = state["init_from"].get(FROZEN_KEY) if isinstance(state.get("init_from"), dict) else None
    if without_frozen and not isinstance(recorded, str):
        return (f"{name} holds the trained tensors only, but {STATE_FILE} records no digest of the frozen weights they were "
                "trained beside, so init_from's cannot be checked: resume with a checkpoint that holds them, or start afresh "
                "(resume unset) in a run_dir of its own")
    return None


def load_checkpoint(path: Path, acc, optimizer, scheduler, *, adamw_options: dict, data_identity: dict, fsdp: bool = False,
                    model=None) -> dict:
    """Load a checkpoint that verified into the prepared model, optimiser and scheduler and this
    process's RNGs; returns its state file (``step``, ``samples_seen``...).

    Whatever still fails to load (a file corrupted without changing its size, say) is one
    ``TrainingError`` line naming the file, never a traceback; nothing in it is unpickled but with
    weights_only=True. ``data_identity`` must match the one saved: other data would replay or skip
    blocks. ``adamw_options``: this run's AdamW implementation, which wins over the saved one.
    ``fsdp``: this run shards with FSDP, so the checkpoint must have been written under FSDP (and else not).
    ``model``: the prepared model; given (and not under FSDP), its ``model.safetensors`` may lack the frozen
    parameters (``model_file_problem`` checks what it holds), which keep the values init_from gave them.
    """
    def fail(why: str) -> TrainingError:
        return TrainingError(f"cannot resume from {path}: {why}")

    try:
        state = read_checkpoint_state(path)
    except ValueError as exc:
        raise fail(str(exc)) from None
    changed = data_change_problem(state, data_identity)
    if changed:
        raise fail(changed)
    # DCP's state holds pickles torch itself reads unrestricted: checked first, whatever the layout
    problem = dcp_checkpoint_problem(path) or layout_problem(path, fsdp)
    if problem:
        raise fail(problem)
    # a pickle-era checkpoint (pytorch_model.bin) was always written whole: loaded strictly, as it was
    partial = model is not None and not fsdp and (path / "model.safetensors").is_file()
    if partial:
        problem = model_file_problem(path, model, state)
        if problem:
            raise fail(problem)
    try:
        with quiet_pickle_notes():
            # accelerate reads its pickles with weights_only=True; DCP's were checked above. strict=False reaches
            # safetensors' load_model: the keys were checked just now, and frozen ones may be absent
            acc.load_state(str(path), **({"strict": False} if partial else {}))
    except Exception as exc:  # noqa: BLE001 - said as one line, naming the file that does not read
        files = list(state["files"]) if isinstance(state.get("files"), dict) else sorted(p.name for p in path.iterdir())
        earlier = [p for s, p in complete_checkpoints(path.parent) if s < state.get("step", 0) and _verifies(p)]
        way = (f"; it is damaged (its sizes and headers are as written, its contents are not): move it out of {path.parent}, and "
               "resume: auto continues from the newest whole checkpoint before it" + (f" ({earlier[-1].name})" if earlier else ""))
        raise fail((first_unreadable_file(path, files) or load_error_line(exc)) + way) from None
    # A loaded optimiser state brings the implementation it was saved with; the config decides.
    # The fused kernel also wants each parameter's step count as a float32 tensor beside it.
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper, or the optimiser itself
    for group in inner.param_groups:
        group.update({"fused": None, "foreach": None, **adamw_options})
        if group["fused"]:
            for p in group["params"]:
                if "step" in inner.state.get(p, {}):
                    inner.state[p]["step"] = inner.state[p]["step"].to(p.device, torch.float32)
    name = SCHEDULER_FILE if (path / SCHEDULER_FILE).is_file() else LEGACY_SCHEDULER_FILE
    try:
        scheduler.load_state_dict(scheduler_state(path, scheduler.state_dict()))
    except Exception as exc:  # noqa: BLE001 - as above
        raise fail(f"{name}: {load_error_line(exc)}") from None
    # This process's RNG state: ours (safetensors), or accelerate's pickle in older checkpoints,
    # which accelerate's load_state already tried but whose errors it only logs.
    rank = acc.process_index
    name = rng_file(rank) if (path / rng_file(rank)).is_file() else legacy_rng_file(rank)
    if not (path / name).is_file() and rank >= state.get("world_size", 1):
        return state  # a process the saving run did not have: its RNG stays as seeded
    try:
        (load_rng_state if name == rng_file(rank) else load_legacy_rng_state)(path / name)
    except Exception as exc:  # noqa: BLE001 - as above
        raise fail(f"{name}: {load_error_line(exc)}") from None
    return state
