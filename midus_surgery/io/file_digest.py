"""Whether a file the tool wrote is still as written: its SHA-256, and a cheap stamp that says when it need not be read.

A token cache's tokens and a checkpoint's weights are read back by later runs; a file changed at the same size (zeroed,
or a few bytes overwritten) passes every check of sizes and headers, and was trained on without a word (trial70,
trial74). The writer records each file's SHA-256 and its ``written_stamp``; a reader that finds the stamp unchanged
trusts the file without reading it all (a 20 GB file took 50 s to hash, trial72), and hashes it otherwise.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch


def sha256_of(path: Path) -> str:
    """The SHA-256 of a file's contents, read in 1 MiB pieces."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def written_stamp(path: Path) -> list[int]:
    """(inode, size, modification time in ns): unchanged, the file is the one written and not edited since (a rename keeps
    it); a copy or an edit changes it."""
    st = os.stat(path)
    return [st.st_ino, st.st_size, st.st_mtime_ns]


def changed_since_written(path: Path, digest: str, stamp=None) -> bool:
    """Whether ``path`` is not what was written with ``digest`` (and ``stamp``, when recorded: then unchanged means as written)."""
    if stamp is not None and stamp == written_stamp(path):
        return False
    return sha256_of(path) != digest


def tensor_sha256s(tensors: dict[str, torch.Tensor]) -> dict[str, bytes]:
    """The SHA-256 of each tensor's bytes as held (moved to the CPU first), by name. Each is hashed on a thread of its
    own (hashlib lets go of the GIL): a whole model's bytes are read, and a digest kept in their place lets a caller
    let go of the tensors and still say later whether others are the same bit for bit."""

    def one(t: torch.Tensor) -> bytes:
        t = t.detach().to("cpu").contiguous().reshape(-1)
        return hashlib.sha256(t.view(torch.uint8).numpy() if t.numel() else b"").digest()

    names = list(tensors)
    with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool:
        return dict(zip(names, pool.map(one, (tensors[name] for name in names))))
