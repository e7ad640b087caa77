"""Write one safetensors shard by streaming: copied tensors move file-to-file inside the kernel.

``safetensors.torch.save_file`` needs every tensor of a shard materialised in memory first, and
a duplicated layer costs a read, a copy and a serialisation per tensor.  Depth up-scaling output
is mostly verbatim copies of base tensors, so this writer lays out the shard header first and
then fills the data section: a tensor whose bytes already sit in a base ``.safetensors`` file
(same dtype) is copied with ``os.copy_file_range`` (no user-space buffer, no deserialisation);
any other tensor (converted dtype, new memory weights) is written from memory.  The file format
is the published safetensors layout (8-byte little-endian header length, JSON header padded with
spaces, then the raw little-endian data); files are read back with the safetensors library
itself (tests, ``verify``, transformers).

Alignment: without reflinks the kernel copies through the page cache, and where a copy's
destination sits relative to its source matters. Measured on ext4 (kernel 6.18) for the same
538 MB: 0.16 s with destination = source modulo 64 KiB, 0.23-0.25 s for a shift that is a few
pages, 0.24-0.37 s for a shift inside a page. So the tensors are laid out in an order (names, not
positions, identify tensors in safetensors) that follows the source's own order where it can
(adjacent source bytes then move in one call), puts each large copied tensor at its source's
offset within a page, using the small tensors (norms, biases) and the materialised ones to step
between residues, and pads the header with spaces (8-byte aligned, as safetensors writes it) so
that most copied bytes sit at their source's offset modulo 64 KiB.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional, Union

from midus_surgery.errors import naming_the_file
from midus_surgery.io.dtypes import ITEMSIZE, tag_of
from midus_surgery.io.json_text import loads_checked

if TYPE_CHECKING:
    import torch

_COPY_CHUNK = 1 << 30  # copy_file_range moves at most ~2 GiB per call
PAGE = 4096  # constants, not the host's page size: the same recipe writes the same bytes everywhere
WIDE = 64 << 10  # the header padding aligns the bulk of the copies modulo this
_ALIGN_MIN_BYTES = 64 << 10  # copied tensors at least this large are placed page-aligned to their source
_MERGE_MAX = 64 << 20  # adjacent copies merge into calls of about this size (the progress bar still moves)


@dataclass(frozen=True)
class FileSlice:
    """Where a tensor's raw bytes already are: ``length`` bytes at ``offset`` in ``path``."""

    path: Path
    offset: int
    length: int


@dataclass(frozen=True)
class ShardItem:
    """One output tensor: its name, safetensors dtype tag ("BF16"), shape, and either a FileSlice
    or a producer of the tensor (a torch tensor; torch is imported only by producers)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    bytes_from: Optional[FileSlice] = None
    make: Optional[Callable[[], torch.Tensor]] = None

    @property
    def nbytes(self) -> int:
        n = ITEMSIZE[self.dtype]
        for d in self.shape:
            n *= d
        return n


def read_header(path: Union[str, Path]) -> tuple[dict, int]:
    """(header dict, byte offset of the data section) of a safetensors file."""
    with open(path, "rb") as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
        header = loads_checked(fh.read(length))
    return header, 8 + length


def file_slice(path: Path, name: str, header: dict, data_start: int) -> tuple[FileSlice, str, tuple[int, ...]]:
    """The FileSlice, dtype tag and shape of tensor ``name`` in a file whose header was read."""
    info = header[name]
    begin, end = info["data_offsets"]
    return FileSlice(path, data_start + begin, end - begin), info["dtype"], tuple(info["shape"])


def write_shard(path: Path, items: list[ShardItem], metadata: Optional[dict] = None, on_bytes=None) -> int:
    """Write ``items`` to ``path`` (in the order ``copy_friendly_layout`` picks); returns the bytes
    of tensor data written."""
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    items, data_start = copy_friendly_layout(items)
    for item in items:
        if item.dtype not in ITEMSIZE:
            raise ValueError(f"{item.name}: dtype {item.dtype} cannot be stored in safetensors")
        if item.bytes_from is not None and item.bytes_from.length != item.nbytes:
            raise ValueError(f"{item.name}: source holds {item.bytes_from.length} bytes, {item.nbytes} expected")
        header[item.name] = {"dtype": item.dtype, "shape": list(item.shape),
                             "data_offsets": [offset, offset + item.nbytes]}
        offset += item.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * ((data_start - 8 - len(blob)) % WIDE)  # the data section starts where the layout wants it
    sources: dict[Path, int] = {}
    try:
        with naming_the_file(path), open(path, "wb", buffering=0) as out:  # unbuffered: copy_file_range writes at the fd's position
            _write_all(out, struct.pack("<Q", len(blob)) + blob)
            for copy, item in _merged_copies(items):
                if copy is not None:
                    fd = sources.get(copy.path)
                    if fd is None:
                        fd = sources[copy.path] = os.open(copy.path, os.O_RDONLY)
                    _copy_range(fd, out.fileno(), copy.offset, copy.length)
                    written = copy.length
                else:
                    import torch  # only for produced tensors: a copy-only shard never imports it

                    tensor = item.make()
                    if tag_of(tensor.dtype) != item.dtype or tuple(tensor.shape) != item.shape:
                        raise ValueError(f"{item.name}: produced {tag_of(tensor.dtype) or tensor.dtype} {tuple(tensor.shape)}, "
                                         f"expected {item.dtype} {item.shape}")
                    # safetensors data is little-endian, like every platform torch supports here
                    data = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
                    _write_all(out, memoryview(data))
                    written = item.nbytes
                if on_bytes is not None:
                    on_bytes(written)
    finally:
        for fd in sources.values():
            os.close(fd)
    return offset


def _merged_copies(items: list[ShardItem]):
    """The items in file order as (FileSlice, None) for one copy covering adjacent copied tensors
    whose source bytes are adjacent too (up to about _MERGE_MAX), or (None, item) for a tensor to
    produce."""
    run: Optional[FileSlice] = None
    for item in items:
        src = item.bytes_from
        if src is not None and run is not None and run.path == src.path and run.offset + run.length == src.offset \
                and run.length < _MERGE_MAX:
            run = FileSlice(run.path, run.offset, run.length + src.length)
            continue
        if run is not None:
            yield run, None
        run = src
        if src is None:
            yield None, item
    if run is not None:
        yield run, None


def copy_friendly_layout(items: list[ShardItem]) -> tuple[list[ShardItem], int]:
    """``items`` reordered, and where the data section starts modulo WIDE, so that copies are few
    and aligned to their sources (see the module docstring for why).

    The order assumes a data start at the source residue (offset mod PAGE) of the largest copied
    tensor, when that is 8-byte aligned. Then, greedy and deterministic, the next item is the first of:
    1. the item whose source bytes continue the previous item's (its copy merges with the previous
       one, and stays aligned);
    2. a large copied tensor whose source residue matches the position, the first in source order;
    3. a filler (a small or a materialised tensor), preferring one that moves the position onto a
       residue some large tensor waits for;
    4. the first waiting large tensor in source order, unaligned.
    The data start is then the one (congruent to the assumed start modulo PAGE) that puts the most
    copied bytes at their source offset modulo WIDE. Only the order changes, never the bytes.
    """
    def residue(i: int) -> int:
        return items[i].bytes_from.offset % PAGE

    def source_order(i: int) -> tuple:  # copies by where they sit in their source, produced tensors last
        src = items[i].bytes_from
        return (0, str(src.path), src.offset, i) if src is not None else (1, "", 0, i)

    # Visiting candidates in source order starts each run of adjacent copies at its beginning.
    large = sorted((i for i, item in enumerate(items) if item.bytes_from is not None and item.nbytes >= _ALIGN_MIN_BYTES),
                   key=source_order)
    is_large = set(large)
    fillers = sorted((i for i in range(len(items)) if i not in is_large), key=source_order)
    by_residue: dict[int, list[int]] = {}
    by_source: dict[tuple[Path, int], list[int]] = {}  # where a copy starts -> the items copied from there
    for i in large:
        by_residue.setdefault(residue(i), []).append(i)
    for i, item in enumerate(items):
        if item.bytes_from is not None:
            by_source.setdefault((item.bytes_from.path, item.bytes_from.offset), []).append(i)
    placed = [False] * len(items)

    def first_unplaced(candidates) -> Optional[int]:
        return next((i for i in candidates if not placed[i]), None)

    biggest = max(large, key=lambda i: items[i].nbytes, default=None)
    start = residue(biggest) if biggest is not None and residue(biggest) % 8 == 0 else 0
    order: list[int] = []
    pos = start
    while len(order) < len(items):
        nxt = None
        if order and items[order[-1]].bytes_from is not None:
            src = items[order[-1]].bytes_from
            nxt = first_unplaced(by_source.get((src.path, src.offset + src.length), ()))
        if nxt is None:
            nxt = first_unplaced(by_residue.get(pos % PAGE, ()))
        if nxt is None:
            free = [i for i in fillers if not placed[i]]
            waited = {residue(i) for i in large if not placed[i]}
            nxt = next((i for i in free if (pos + items[i].nbytes) % PAGE in waited), free[0] if free else None)
        if nxt is None:
            nxt = first_unplaced(large)
        placed[nxt] = True
        order.append(nxt)
        pos += items[nxt].nbytes
    ordered = [items[i] for i in order]
    return ordered, _best_data_start(ordered, start)


def _best_data_start(ordered: list[ShardItem], start: int) -> int:
    """The data start modulo WIDE (congruent to ``start`` modulo PAGE) that puts the most copied
    bytes at their source offset modulo WIDE."""
    weight: dict[int, int] = {}
    pos = 0
    for item in ordered:
        if item.bytes_from is not None:
            shift = (item.bytes_from.offset - pos) % WIDE
            if shift % PAGE == start:
                weight[shift] = weight.get(shift, 0) + item.nbytes
        pos += item.nbytes
    return max(sorted(weight), key=weight.__getitem__, default=start)


def _write_all(out, data) -> None:
    view = memoryview(data).cast("B")
    while view:
        view = view[out.write(view):]


def _copy_range(src_fd: int, dst_fd: int, offset: int, length: int) -> None:
    """Append ``length`` bytes at ``offset`` of src to dst: in-kernel where the OS allows it."""
    done = 0
    copy = getattr(os, "copy_file_range", None)
    while done < length:
        # The kernel copies in 64 KiB rounds from where a call starts: a call that starts on a
        # WIDE boundary of the source keeps them on whole 64 KiB blocks (the module docstring),
        # so an unaligned start first copies up to the next boundary.
        n = min(-(offset + done) % WIDE or _COPY_CHUNK, length - done)
        moved = 0
        if copy is not None:
            try:
                moved = copy(src_fd, dst_fd, n, offset + done)
            except OSError:  # e.g. EXDEV on old kernels, or a filesystem without support
                copy = None
        if not moved:  # fallback (or a short copy): plain read/write
            chunk = os.pread(src_fd, min(n, 64 << 20), offset + done)
            if not chunk:
                raise OSError(f"unexpected end of file while copying {length} bytes at {offset}")
            moved = os.write(dst_fd, chunk)
        done += moved
