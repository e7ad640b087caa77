"""Write one safetensors shard by streaming: copied tensors move file-to-file inside the kernel.

``safetensors.torch.save_file`` needs every tensor of a shard materialised in memory first, and
a duplicated layer costs a read, a copy and a serialisation per tensor.  Depth up-scaling output
is mostly verbatim copies of base tensors, so this writer lays out the shard header first and
then fills the data section: a tensor whose bytes already sit in a base ``.safetensors`` file
(same dtype) is copied with ``os.copy_file_range`` (no user-space buffer, no deserialisation);
any other tensor (converted dtype, new memory weights) is written from memory.  The file format
is the published safetensors layout (8-byte little-endian header length, JSON header padded with
spaces to 8-byte alignment, then the raw little-endian data); files are read back with the
safetensors library itself (tests, ``verify``, transformers).
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional, Union

from .dtypes import ITEMSIZE, tag_of

if TYPE_CHECKING:
    import torch

_COPY_CHUNK = 1 << 30  # copy_file_range moves at most ~2 GiB per call


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
        header = json.loads(fh.read(length))
    return header, 8 + length


def file_slice(path: Path, name: str, header: dict, data_start: int) -> tuple[FileSlice, str, tuple[int, ...]]:
    """The FileSlice, dtype tag and shape of tensor ``name`` in a file whose header was read."""
    info = header[name]
    begin, end = info["data_offsets"]
    return FileSlice(path, data_start + begin, end - begin), info["dtype"], tuple(info["shape"])


def write_shard(path: Path, items: list[ShardItem], metadata: Optional[dict] = None, on_bytes=None) -> int:
    """Write ``items`` (in order) to ``path``; returns the bytes of tensor data written."""
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for item in items:
        if item.dtype not in ITEMSIZE:
            raise ValueError(f"{item.name}: dtype {item.dtype} cannot be stored in safetensors")
        header[item.name] = {"dtype": item.dtype, "shape": list(item.shape),
                             "data_offsets": [offset, offset + item.nbytes]}
        offset += item.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-(8 + len(blob)) % 8)  # the data section starts 8-byte aligned
    sources: dict[Path, int] = {}
    try:
        with open(path, "wb", buffering=0) as out:  # unbuffered: copy_file_range writes at the fd's position
            _write_all(out, struct.pack("<Q", len(blob)) + blob)
            for item in items:
                if item.bytes_from is not None:
                    src = item.bytes_from
                    if src.length != item.nbytes:
                        raise ValueError(f"{item.name}: source holds {src.length} bytes, {item.nbytes} expected")
                    fd = sources.get(src.path)
                    if fd is None:
                        fd = sources[src.path] = os.open(src.path, os.O_RDONLY)
                    _copy_range(fd, out.fileno(), src.offset, src.length)
                else:
                    import torch  # only for produced tensors: a copy-only shard never imports it

                    tensor = item.make()
                    if tag_of(tensor.dtype) != item.dtype or tuple(tensor.shape) != item.shape:
                        raise ValueError(f"{item.name}: produced {tag_of(tensor.dtype) or tensor.dtype} {tuple(tensor.shape)}, "
                                         f"expected {item.dtype} {item.shape}")
                    # safetensors data is little-endian, like every platform torch supports here
                    data = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
                    _write_all(out, memoryview(data))
                if on_bytes is not None:
                    on_bytes(item.nbytes)
    finally:
        for fd in sources.values():
            os.close(fd)
    return offset


def _write_all(out, data) -> None:
    view = memoryview(data).cast("B")
    while view:
        view = view[out.write(view):]


def _copy_range(src_fd: int, dst_fd: int, offset: int, length: int) -> None:
    """Append ``length`` bytes at ``offset`` of src to dst: in-kernel where the OS allows it."""
    done = 0
    copy = getattr(os, "copy_file_range", None)
    while done < length:
        n = min(_COPY_CHUNK, length - done)
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
