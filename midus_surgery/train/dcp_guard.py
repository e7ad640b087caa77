"""A sharded checkpoint's pickles, read here before torch reads them.

FSDP writes its sharded state with torch.distributed.checkpoint (DCP). torch reads DCP's
``.metadata`` with a plain ``pickle.load`` and every non-tensor item of the ``.distcp`` files (an
optimiser's step count, learning rate, betas) with ``torch.load(weights_only=False)``: either runs
whatever a crafted file names. So before a resume hands a checkpoint to accelerate, every
``.metadata`` under it is read with an unpickler that admits only the exact classes DCP writes
(a dotted name such as ``os.system`` resolved through an allowed module is no class of those), and
every non-tensor item it points to must load with ``torch.load(weights_only=True)``: then torch's
own unrestricted load of the same bytes calls nothing else.
"""

from __future__ import annotations

import io
import pickle
import reprlib
from pathlib import Path

import torch

from midus_surgery.errors import load_error_line, one_line

_DCP = "torch.distributed.checkpoint"
# Every global DCP's .metadata pickle refers to (torch 2.x): its metadata dataclasses and enum, the
# filesystem writer's storage record, torch.Size, dtypes (below), layouts and paths.
DCP_METADATA_NAMES = frozenset({
    (f"{_DCP}.metadata", name) for name in ("Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
                                            "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING")
} | {(f"{_DCP}.filesystem", "_StorageInfo"), ("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
     ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath"), ("collections", "OrderedDict")})


def _in_dcp_metadata(module: str, name: str) -> bool:
    if (module, name) in DCP_METADATA_NAMES:
        return True
    # a dtype by its own name; "." would let pickle walk from torch to anything torch imports
    return module == "torch" and name.isidentifier() and isinstance(getattr(torch, name, None), torch.dtype)


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if not _in_dcp_metadata(module, name):
            raise pickle.UnpicklingError(f"refers to {module}.{name}, which DCP metadata never holds (not loaded: it could run code)")
        return super().find_class(module, name)


def read_dcp_metadata(path: Path):
    """A ``.metadata`` file's contents, unpickled with only DCP's own classes admitted;
    ``ValueError`` (one line) for anything else."""
    try:
        with open(path, "rb") as f:
            return _MetadataUnpickler(f).load()
    except Exception as exc:  # noqa: BLE001 - the reason is the answer
        raise ValueError(one_line(exc, 200)) from None


def dcp_metadata_problem(path: Path) -> str | None:
    """None when ``path`` (a DCP ``.metadata`` file) holds only DCP metadata; else why not, one line."""
    try:
        read_dcp_metadata(path)
    except ValueError as exc:
        return str(exc)
    return None


def _bytes_items_problem(folder: Path, metadata) -> str | None:
    """The first non-tensor item of a DCP checkpoint that torch.load(weights_only=True) refuses, as one line."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    items = getattr(metadata, "state_dict_metadata", None)
    storage = getattr(metadata, "storage_data", None)
    if not isinstance(items, dict) or not isinstance(storage, dict):
        return "not DCP metadata (no state_dict_metadata and storage_data)"
    byte_items = {fqn for fqn, md in items.items() if isinstance(md, BytesStorageMetadata)}
    for index, info in storage.items():
        fqn = getattr(index, "fqn", None)
        if fqn not in byte_items:
            continue
        where = f"item {fqn!r}"
        descriptors = getattr(info, "transform_descriptors", None)
        if descriptors:
            # the unpickler admits _StorageInfo with any values: 7 here made the join below a TypeError traceback (trial95 F7)
            named = isinstance(descriptors, (list, tuple)) and all(isinstance(d, str) for d in descriptors)
            if not named:
                return f"{where} names {reprlib.repr(descriptors)} as its transforms, not a list of their names: a corrupt checkpoint"
            return f"{where} is stored transformed ({', '.join(descriptors)}), which cannot be checked before torch reads it"
        file = folder / str(info.relative_path)
        if file.parent != folder or not file.is_file():
            return f"{where} points to {info.relative_path!r}, not a file beside the metadata"
        offset, length, size = getattr(info, "offset", None), getattr(info, "length", None), file.stat().st_size
        # the unpickler admits _StorageInfo with any values: seek(-1) was an OSError with no file name, a traceback (trial92 F9)
        if not all(type(n) is int and n >= 0 for n in (offset, length)) or offset + length > size:
            return f"{file.name}: {where} claims bytes at offset {offset!r}, length {length!r}, outside the file ({size} bytes): a corrupt checkpoint"
        with open(file, "rb") as f:
            f.seek(offset)
            data = f.read(length)
        try:
            torch.load(io.BytesIO(data), weights_only=True)
        except Exception as exc:  # noqa: BLE001 - the reason is the answer
            return f"{file.name}: {where}: {load_error_line(exc, 200)} (torch would read it with weights_only=False: it could run code)"
    return None


def dcp_checkpoint_problem(path: Path) -> str | None:
    """None when every sharded (DCP) state under checkpoint ``path`` is safe for torch to read:
    each ``.metadata`` holds only DCP's classes, each non-tensor item loads with weights_only=True.
    Else one line naming the file."""
    for metadata_file in sorted(path.rglob(".metadata")):
        where = metadata_file.relative_to(path)
        try:
            metadata = read_dcp_metadata(metadata_file)
        except ValueError as exc:
            return f"{where}: {exc}"
        try:
            problem = _bytes_items_problem(metadata_file.parent, metadata)
        except Exception as exc:  # noqa: BLE001 - any other field of a value the unpickler admitted (an fqn that is a list): one line
            problem = f"not DCP metadata torch could read ({load_error_line(exc, 200)}): a corrupt checkpoint"
        if problem:
            return f"{where.parent}/{problem}" if where.parent != Path(".") else problem
    return None
