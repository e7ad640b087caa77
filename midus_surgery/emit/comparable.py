"""Loaded models made comparable bit for bit (the identity checks of verify and of the replica)."""

from __future__ import annotations

import ctypes
import gc
import sys

import torch

RELEASE_EVERY = 256 * 2**20  # bytes cloned between two hand-backs of the copies' freed memory


def release_memory() -> None:
    """Collect what nothing holds any more and hand the freed pages back to the system. Without the second step a
    freed model stays in glibc's per-thread heaps (transformers loads on a thread pool), and the next model, allocated
    from other heaps, comes on top of it: verify, which lets the output go before the base loads, still held both."""
    gc.collect()
    if not sys.platform.startswith("linux"):  # glibc's call; elsewhere (ctypes.CDLL(None) raises TypeError on Windows)
        return
    try:
        ctypes.CDLL(None).malloc_trim(0)  # a no-op for what the heaps still use
    except (OSError, AttributeError, TypeError):  # another C library (musl): it keeps what it keeps
        pass


def own_memory(model):
    """``model`` with every parameter and buffer in memory of its own. Loaded weights can sit in the
    safetensors file's mapping at the offsets the file gives them, and a matrix product blocks an
    unaligned operand otherwise, so the same weights give results that differ in the last bit from
    one file to another (DBRX's experts, 1 in 3 random replicas): the identity checks compare bits.

    Where the load had already copied the weights, each original is freed as its clone is made, into a heap the
    clones do not draw from: without a hand-back every so often the copy held the weights twice."""
    cloned = total = 0
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            tensor.data = tensor.data.clone()
            cloned += tensor.numel() * tensor.element_size()
            if cloned >= RELEASE_EVERY:
                release_memory()
                total, cloned = total + cloned, 0
    if total + cloned >= RELEASE_EVERY // 4:  # a tiny model (validate's replicas) is not worth a collection
        release_memory()
    return model
