"""Checkpoint files: what a checkpoint holds, whether it is whole, and the state no pickle carries.

A checkpoint (``run_dir/checkpoints/step-NNNNNNNN/``) holds the model (safetensors), the optimiser
(accelerate's ``optimizer.bin``, read only with weights_only=True), the scheduler (JSON), each
process's RNG state (safetensors) and ``trainer_state.json``, written last, which marks it complete
and records every other file's size (docs/reliability.md).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from pathlib import Path

import numpy as np
import torch

from midus_surgery.train.evaluate import flat_error

CHECKPOINT_RE = re.compile(r"^step-(\d{8})$")
STATE_FILE = "trainer_state.json"


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


# A checkpoint holds no pickle but accelerate's optimizer file (read with weights_only=True only):
# the scheduler's state is JSON, each process's RNG state a safetensors file.
SCHEDULER_FILE = "scheduler.json"
LEGACY_SCHEDULER_FILE = "scheduler.pt"  # checkpoints written before the JSON file; read with weights_only=True
STATE_KEYS = ("step", "samples_seen", "data")


def rng_file(rank: int) -> str:
    return f"rng_state_{rank}.safetensors"


def legacy_rng_file(rank: int) -> str:
    return f"random_states_{rank}.pkl"  # accelerate's own (pickle); older checkpoints only


def load_error_line(exc: BaseException, limit: int = 300) -> str:
    """An exception as one line; for torch's weights_only refusal, its reason, not its advice to load unsafely."""
    text = " ".join(re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).split())
    if "WeightsUnpickler error:" in text:
        reason = text.split("WeightsUnpickler error:", 1)[1].split(" Please use")[0].split(" Check the documentation")[0].strip()
        return f"not plain tensors and numbers, refused by torch.load(weights_only=True) ({reason[:limit]})"
    return flat_error(exc, limit)


def _safetensors_problem(path: Path) -> str | None:
    """Whether a safetensors file's header parses and its tensors end where the file ends (a cut file does not)."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            if size < 8 or n > size - 8:
                return f"{path.name}: cut short or not safetensors ({size} bytes; its header alone claims {n + 8})"
            header = json.loads(fh.read(n))
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
        return f"{path.name}: not a safetensors file ({load_error_line(exc, 120)})"
    if 8 + n + end != size:
        return f"{path.name}: {size} bytes, its header describes {8 + n + end}"
    return None


def read_checkpoint_state(path: Path) -> dict:
    """The checkpoint's state file, with the keys a resume needs; ``ValueError`` (one line) when not."""
    try:
        state = json.loads((path / STATE_FILE).read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"{STATE_FILE}: unreadable ({load_error_line(exc, 120)})") from None
    if not isinstance(state, dict) or any(k not in state for k in STATE_KEYS):
        raise ValueError(f"{STATE_FILE}: lacks {', '.join(k for k in STATE_KEYS if not isinstance(state, dict) or k not in state)}")
    if not all(isinstance(state[k], int) and state[k] >= 0 for k in ("step", "samples_seen")):
        raise ValueError(f"{STATE_FILE}: step and samples_seen are not counts")
    m = CHECKPOINT_RE.match(path.name)
    if m and state["step"] != int(m.group(1)):
        raise ValueError(f"{STATE_FILE}: says step {state['step']}, the directory step {int(m.group(1))}")
    return state


def verify_checkpoint(path: Path) -> str | None:
    """None when the checkpoint is whole as far as can be told without loading it; else one line:
    which file, what is wrong. Whole: the state file parses with its keys, every file it records
    is there with the recorded size, every safetensors header parses and fits its file. Older
    checkpoints record no sizes: their state file, scheduler file and headers are checked."""
    try:
        state = read_checkpoint_state(path)
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
    return None


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
    py_version, py_gauss = json.loads(meta["python"])
    np_name, np_pos, np_has_gauss, np_gauss = json.loads(meta["numpy"])
    random.setstate((py_version, tuple(int(x) for x in t["python"].tolist()), py_gauss))
    np.random.set_state((np_name, t["numpy"].numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
    torch.set_rng_state(t["torch"])
    cuda = sorted((k for k in t if k.startswith("cuda_")), key=lambda k: int(k[5:]))
    if cuda and torch.cuda.is_available():
        for i, key in enumerate(cuda[:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(t[key], i)


def load_legacy_rng_state(path: Path) -> None:
    """accelerate's pickle of an older checkpoint, read as accelerate reads it (weights_only=True with
    numpy's types allowed), but its errors raise: accelerate only logs them."""
    from accelerate.utils import load as safe_torch_load

    states = safe_torch_load(path)
    random.setstate(states["random_state"])
    np.random.set_state(states["numpy_random_seed"])
    torch.set_rng_state(states["torch_manual_seed"])
    if "torch_cuda_manual_seed" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["torch_cuda_manual_seed"])


def scheduler_state(path: Path, current: dict) -> dict:
    """The scheduler state a checkpoint holds, checked against the keys of ``current`` (ours)."""
    if (path / SCHEDULER_FILE).is_file():
        state = json.loads((path / SCHEDULER_FILE).read_text())
    else:
        state = torch.load(path / LEGACY_SCHEDULER_FILE, weights_only=True)
    # only the keys this scheduler has (plus an older torch's "verbose"), one lambda per parameter group
    if (not isinstance(state, dict) or set(state) - set(current) - {"verbose"} or {"base_lrs", "last_epoch"} - set(state)
            or len(state.get("lr_lambdas") or ()) != len(current["lr_lambdas"])):
        raise ValueError(f"not this run's scheduler state (keys {sorted(state) if isinstance(state, dict) else type(state).__name__})")
    return state


def weights_checksum(model) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
