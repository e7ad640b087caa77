"""Read base model tensors one at a time, whatever the base's format.

- HF safetensors directories (single file or sharded with an index): names from the files'
  headers, tensors lazily with ``safe_open``, so memory holds one tensor at a time; a tensor
  copied as-is is only located (file, offset) and never read here.
- GGUF files: through transformers' GGUF loader (dequantised); the whole model is in memory.
- safetensors checkpoints whose tensors transformers reshapes on load (per-expert MoE weights
  stacked into one parameter): through transformers' loader too, whole, in memory.
- pickle ``.bin`` checkpoints: only when explicitly allowed, and then with ``weights_only=True``.

The base directory is someone else's data: an index may name only files inside it (without one,
``model.safetensors`` alone is read when present, as transformers reads it), a tensor name may be in
one file only, every safetensors header is checked by the library's own rules (length, JSON,
metadata, each tensor's dtype and offsets against its shape, the tensors tiling the data section)
before a byte is copied, and ``check_matches_config`` refuses weights that the config.json does
not describe. Each problem is one BaseModelError naming the file.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from stat import S_ISREG
from typing import TYPE_CHECKING, Iterable

from midus_surgery.errors import BaseModelError, MidusError, load_error_line, one_line, printable, shown
from midus_surgery.io.dtypes import STORED_ITEMSIZE, TAGS
from midus_surgery.io.shard_writer import file_slice
from midus_surgery.io.small_files import regular_file_problem

MAX_HEADER_BYTES = 100 * 2**20  # the safetensors library's own limit on a header
MAX_INDEX_BYTES = 64 * 2**20  # an index is a few MB even for the largest checkpoints

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class BaseRef:
    """Where the base model is: a HF directory, or a GGUF file (``directory`` + ``gguf_file``)."""

    directory: Path
    gguf_file: str | None
    exists: bool

    @property
    def is_gguf(self) -> bool:
        return self.gguf_file is not None


def _checkpoint_transforms(model_type: str) -> list:
    """transformers' own checkpoint -> module transforms for this architecture (renames, converters)."""
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return get_checkpoint_conversion_mapping(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type, "")) or get_checkpoint_conversion_mapping(model_type) or []


def checkpoint_renames(model_type: str) -> list[tuple[str, str]]:
    """transformers' own (checkpoint pattern -> model name) renames for this architecture.

    transformers 5 renames some tensors between disk and module (GPT-NeoX writes ``lm_head`` as
    ``embed_out``); the plan speaks module names, so the base's names go through the same renames.
    """
    from transformers.core_model_loading import WeightRenaming

    return [
        (t._original_source_patterns[0], t._original_target_patterns[0])
        for t in _checkpoint_transforms(model_type)
        if type(t) is WeightRenaming and len(t._original_source_patterns) == 1
    ]


class TensorSource:
    """name -> tensor for the base model, tolerant of a missing base-model prefix in names."""

    how: str | None = None  # how the tensors are read, for the user, when not file by file

    def __init__(self, names: dict[str, object], prefixes: tuple[str, ...] = (), renames: list[tuple[str, str]] = ()):
        self._where = names  # checkpoint name -> handle for _read
        self._prefixes = prefixes
        self._renamed: dict[str, str] = {}  # module name -> checkpoint name, where they differ
        for key in names:
            new = key
            for pattern, target in renames:
                new = re.sub(pattern, target, new)
            if new != key:
                self._renamed[new] = key

    def resolve(self, name: str) -> str | None:
        """The checkpoint's own name for a module tensor name (renamed on disk, or without 'transformer.')."""
        if name in self._renamed:
            return self._renamed[name]
        if name in self._where:
            return name
        for prefix in self._prefixes:
            if name.startswith(prefix + ".") and name[len(prefix) + 1:] in self._where:
                return name[len(prefix) + 1:]
        return None

    def checkpoint_names(self) -> dict[str, list[str]]:
        """Every checkpoint tensor name -> the module names it may stand for (renamed; with each missing prefix)."""
        module_of = {key: name for name, key in self._renamed.items()}
        return {key: [module_of.get(key, key)] + [f"{prefix}.{module_of.get(key, key)}" for prefix in self._prefixes]
                for key in self._where}

    def get(self, name: str) -> torch.Tensor:
        key = self.resolve(name)
        if key is None:
            raise MidusError(f"the base checkpoint has no tensor {shown(name)}")
        return self._read(key)

    def _read(self, key: str) -> torch.Tensor:  # pragma: no cover - overridden
        raise NotImplementedError

    def locate(self, name: str):
        """(FileSlice, dtype, shape) when the tensor's raw bytes sit in a file as-is, else None."""
        return None

    def held_tag(self, name: str) -> str | None:
        """The safetensors dtype tag ``name`` is held in, when known without reading its data (None: not a tensor of
        the base's, or one of a pickle file, seen only when it is read)."""
        return None

    def release(self) -> None:
        """Drop cached file mappings (called after each output shard), so resident memory stays one shard."""

    def close(self) -> None:
        pass


    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every checkpoint tensor name -> its shape."""
        raise NotImplementedError  # pragma: no cover - overridden

    def layer_indices(self, layers_path: str) -> set[int]:
        """The layer indices the checkpoint holds under the layers container (module name ``layers_path``)."""
        module_of = {key: name for name, key in self._renamed.items()}
        heads = [layers_path + "."] + [layers_path[len(p) + 1:] + "." for p in self._prefixes if layers_path.startswith(p + ".")]
        found = set()
        for key in self._where:
            name = module_of.get(key, key)
            head = next((h for h in heads if name.startswith(h)), None)
            if head is not None:
                index = name[len(head):].split(".", 1)[0]
                if index.isdigit():
                    found.add(int(index))
        return found


def inside_base(directory: Path, name: str, what: str) -> Path:
    """``directory / name``, refused when it leads outside the base directory.

    ``name`` comes from the base's own files (an index's weight_map) or its listing: an absolute
    path, ``..`` or a symlink must not make `apply` read (and copy into its output) a file the base
    does not hold. One exception: a Hugging Face hub cache snapshot, whose files are symlinks into
    the same repository's ``blobs`` folder.
    """
    if "\0" in name:  # no file has such a name, and the path calls below raise on it
        raise BaseModelError(f"{what} names {shown(name)}, which holds a NUL character: no file is called that")
    if Path(name).name in ("", ".", ".."):  # the base folder itself, or its parent: no shard file is named
        raise BaseModelError(f"{what} names {shown(name)}, which is no file name")
    if Path(name).is_absolute():
        raise BaseModelError(f"{what} names {shown(name)}, a path outside the base directory {directory}")
    path = directory / name
    root = directory.resolve()
    target = path.resolve()
    allowed = [root]
    if root.parent.name == "snapshots":
        allowed.append(root.parent.parent / "blobs")
    if not any(target == top or top in target.parents for top in allowed):
        if path.is_symlink() and path.parent.resolve() == root:  # a folder of links to the files (trial77 F4: "names" read oddly)
            raise BaseModelError(f"{path} is a link to {target}, outside the base directory: apply reads only files inside it "
                                 "(a link could make it copy any file into the output); copy the files in, or give the folder they "
                                 "are in (a link to a whole folder is followed)")
        raise BaseModelError(f"{what} names {shown(name)}, which leads outside the base directory {directory} (to {target})")
    return path


def _read_index(index: Path, directory: Path) -> dict[str, str]:
    """The index's weight_map (tensor name -> shard file name), every file checked to be inside the base."""
    what = str(index)
    try:
        if index.stat().st_size > MAX_INDEX_BYTES:
            raise BaseModelError(f"{what} is larger than {MAX_INDEX_BYTES // 2**20} MiB; an index is a few MB")
        data = json.loads(index.read_bytes().decode("utf-8"))  # as transformers opens it: not UTF-16, which json.loads would take
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise BaseModelError(f"{what} is not valid JSON: {str(exc)[:200]}") from None
    except OSError as exc:
        raise BaseModelError(f"cannot read {what}: {exc.strerror or exc}") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise BaseModelError(f"{what} has no weight_map object of tensor name -> shard file name")
    if not weight_map:
        raise BaseModelError(f"{what} maps no tensors (its weight_map is empty)")
    for file in set(weight_map.values()):
        inside_base(directory, file, what)
    return weight_map


class _Duplicate(Exception):
    def __init__(self, name: str):
        self.name = name


def _once_each(pairs: list[tuple[str, object]]) -> dict:
    """json object_pairs_hook: a key twice in one object is refused (json.loads keeps the last silently, and the
    safetensors library refuses the file: two entries for one name, e.g. to swap two tensors' bytes)."""
    seen: dict = {}
    for key, value in pairs:
        if key in seen:
            raise _Duplicate(key)
        seen[key] = value
    return seen


def read_checked_header(path: Path) -> tuple[dict, int]:
    """(header, data start) of a safetensors file, every entry checked against the file.

    Checked, by the safetensors library's own rules: the header length (at most MAX_HEADER_BYTES and
    inside the file), the header JSON, ``__metadata__`` a map of text to text, each tensor's dtype (one
    torch reads), shape and data offsets (as many bytes as shape and dtype need), and the tensors' bytes
    tiling the data section exactly (no gap, no overlap: two names on the same bytes, or junk before the
    first tensor, would give a tensor a meaning no reader gives it), so that a corrupt or truncated shard
    is one message here and never a short copy, a huge allocation, a traceback or a wrong tensor later.
    """
    try:
        stat = path.stat()
        if not S_ISREG(stat.st_mode):  # a pipe would block the read forever, a device never ends
            raise BaseModelError(f"{path} is not a regular file (a pipe, a device or a folder), so not a safetensors file")
        size = stat.st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise BaseModelError(f"{path} is truncated: {size} bytes, not even the 8-byte header length of a safetensors file")
            (length,) = struct.unpack("<Q", head)
            if length > MAX_HEADER_BYTES or 8 + length > size:
                raise BaseModelError(f"{path}: its header length {length} is impossible for a file of {size} bytes (a corrupt or truncated safetensors file)")
            raw = fh.read(length)
    except FileNotFoundError:
        raise BaseModelError(f"{path} is missing") from None
    except OSError as exc:
        raise BaseModelError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        # decoded as UTF-8 here: json.loads of bytes also takes UTF-16 and -32, which the safetensors library refuses (trial92 N1)
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_once_each)
    except _Duplicate as exc:
        raise BaseModelError(f"{path}: its header names {shown(exc.name)} twice (a corrupt safetensors file)") from None
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise BaseModelError(f"{path}: its header is not valid JSON (not a safetensors file, or a corrupt one)") from None
    if not isinstance(header, dict):
        raise BaseModelError(f"{path}: its header is not a JSON object (not a safetensors file)")
    data_start, data_size = 8 + length, size - 8 - length
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise BaseModelError(f"{path}: its __metadata__ is not a map of text to text (a corrupt safetensors file)")
    for name, info in header.items():
        if name == "__metadata__":
            continue
        problem = _entry_problem(info, data_size)
        if problem:
            raise BaseModelError(f"{path}: tensor {shown(name)} {problem} (a corrupt or truncated safetensors file)")
    covered = 0  # the tensors in offset order must tile the data section: each starts where the one before ends
    for name, info in sorted(((n, i) for n, i in header.items() if n != "__metadata__"), key=lambda item: tuple(item[1]["data_offsets"])):
        begin, end = info["data_offsets"]
        if begin != covered:
            what = "overlaps the tensor before it" if begin < covered else f"starts at byte {begin}, leaving bytes {covered}-{begin} unclaimed"
            raise BaseModelError(f"{path}: tensor {shown(name)} {what} (a corrupt safetensors file)")
        covered = end
    if covered != data_size:
        raise BaseModelError(f"{path}: its tensors end at byte {covered} of a data section of {data_size} bytes (a corrupt safetensors file)")
    return header, data_start


def _entry_problem(info, data_size: int) -> str | None:
    if not isinstance(info, dict) or not isinstance(info.get("dtype"), str):
        return "has no dtype"
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        return f"has an invalid shape {str(shape)[:80]}"
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            and 0 <= offsets[0] <= offsets[1]):
        return f"has invalid data_offsets {str(offsets)[:80]}"
    begin, end = offsets
    if end > data_size:
        return f"ends at byte {end} of a data section of {data_size} bytes: truncated"
    if info["dtype"] not in STORED_ITEMSIZE:
        return f"has the dtype {info['dtype'][:20]!r}, not one of the safetensors dtypes torch reads ({', '.join(STORED_ITEMSIZE)})"
    need = STORED_ITEMSIZE[info["dtype"]]
    for d in shape:
        need *= d
    if end - begin != need:
        return f"spans {end - begin} bytes, its shape {shape} and dtype {info['dtype']} need {need}"
    return None


def check_matches_config(source: TensorSource, tensors, layers_path: str | None, num_layers: int, config: dict, where: str) -> None:
    """Refuse weights that the config does not describe, before anything is planned on it.

    tensors: (module tensor name, shape the config implies) for the tensors the plan reads.
    The layers the checkpoint holds under ``layers_path`` must be exactly 0..num_layers-1 (a config
    stating fewer layers would silently drop the rest); each planned tensor the checkpoint has must
    have the shape the config implies (the hidden size and vocabulary show in the embedding).
    """
    if layers_path:
        found = source.layer_indices(layers_path)
        # multi-token-prediction layers stored after the decoder's (GLM-4.5/4.6: model.layers.46.* of 46 layers): the
        # causal LM leaves them out on load, and so does the output (they were refused as layers the config does not state)
        predict = config.get("num_nextn_predict_layers")
        extra = predict if isinstance(predict, int) and not isinstance(predict, bool) and 0 < predict <= 8 else 0
        if found and found != set(range(num_layers)) and not (extra and found == set(range(num_layers + extra))):
            held = f"{len(found)} layers ({layers_path}.{min(found)} to {layers_path}.{max(found)})" if found == set(range(min(found), max(found) + 1)) \
                else f"layers {', '.join(map(str, sorted(found)[:12]))} under {layers_path}"
            raise BaseModelError(f"{where} states num_hidden_layers={num_layers}, but the weights hold {held}: "
                                 "the config does not describe these weights")
    stored = source.shapes()
    sizes = ", ".join(f"{k}={config[k]}" for k in ("hidden_size", "n_embd", "d_model", "vocab_size") if k in config)
    for name, shape in tensors:
        key = source.resolve(name)
        if key is not None and tuple(stored[key]) != tuple(shape):
            raise BaseModelError(f"{where} does not describe these weights: {key} has shape {tuple(stored[key])}, "
                                 f"the config ({sizes}) implies {tuple(shape)}")


def name_groups(model) -> list[list[str]]:
    """The model's state-dict names, grouped by tensor (tied embeddings: one group of two names)."""
    groups: dict[int, list[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        groups.setdefault(id(tensor), []).append(name)
    return list(groups.values())


class SafetensorsSource(TensorSource):
    def __init__(self, directory: Path, prefixes: tuple[str, ...], renames: list[tuple[str, str]]):
        index = directory / "model.safetensors.index.json"
        if (directory / "model.safetensors").is_file():
            # what transformers reads, index or not (trial49: with both, apply read the shards and transformers
            # model.safetensors); a model.fp16.safetensors or a leftover conversion beside it is not the model, and read
            # too it would replace the weights it shares names with
            files, weight_map = ["model.safetensors"], None
        elif index.is_file():
            weight_map = _read_index(index, directory)
            files = sorted(set(weight_map.values()))
        elif index.exists() or index.is_symlink():  # a pipe, a folder, a dangling link: the shards were read without it,
            # and the output of a base transformers cannot load was written, exit 0 (trial138 F5)
            why = f"{index} is a link to nothing" if not index.exists() else regular_file_problem(index) or f"{index} cannot be read"
            raise BaseModelError(f"{why}; transformers loads a sharded model through its index, so it would not load this base")
        else:
            files = sorted(p.name for p in directory.glob("*.safetensors"))
            weight_map = None
        if not files:
            raise MidusError(f"no .safetensors files in {directory}")  # not the base's fault: the header planner goes the full way
        for file in files:  # listed files too: a symlink may lead anywhere
            inside_base(directory, file, str(index) if weight_map is not None else f"the base's file {file}")
        self._directory = directory
        self._handles = {}
        self._headers: dict[str, tuple[dict, int]] = {}
        names = {}
        for file in files:
            header, _ = self._header(file)
            for key in header:
                if key != "__metadata__":
                    if key in names:  # which copy a loader takes is up to the loader: the base is ambiguous
                        raise BaseModelError(f"{directory}: tensor {shown(key)} is in both {names[key]} and {file}; a checkpoint holds each "
                                             "tensor once (remove the file that is not the model's)")
                    names[key] = file
        if weight_map is not None:
            missing = [k for k, f in weight_map.items() if names.get(k) != f]
            if missing:
                raise BaseModelError(f"{index}: {len(missing)} tensors listed in the index are not in their shard, e.g. {shown(missing[0])}")
        super().__init__(names, prefixes, renames)

    def _header(self, file: str) -> tuple[dict, int]:
        if file not in self._headers:
            self._headers[file] = read_checked_header(self._directory / file)
        return self._headers[file]

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {key: tuple(shape) for key, (_, shape) in self.stored().items()}

    def stored(self) -> dict[str, tuple[str, list[int]]]:
        """Every checkpoint tensor name -> (safetensors dtype tag, shape), from the headers already read."""
        out = {}
        for key, file in self._where.items():
            info = self._header(file)[0][key]
            out[key] = (info["dtype"], info["shape"])
        return out

    def held_tag(self, name: str) -> str | None:
        key = self.resolve(name)
        return None if key is None else self._header(self._where[key])[0][key]["dtype"]

    def _handle(self, file: str):
        if file not in self._handles:
            from safetensors import safe_open

            try:
                self._handles[file] = safe_open(str(self._directory / file), framework="pt")
            except Exception as exc:  # safetensors raises its own error types for corrupt files
                raise MidusError(f"cannot read {self._directory / file}: {exc}") from None
        return self._handles[file]

    def _read(self, key: str) -> torch.Tensor:
        return self._handle(self._where[key]).get_tensor(key)

    def locate(self, name: str):
        key = self.resolve(name)
        if key is None:
            return None
        file = self._where[key]
        header, data_start = self._header(file)
        return file_slice(self._directory / file, key, header, data_start)

    def release(self) -> None:
        # Pages of a memory-mapped base shard stay resident while its handle is open; reopening
        # lazily keeps the resident set at about one output shard whatever the base's size.
        self._handles.clear()


def wrong_shapes(stored: dict[str, tuple[int, ...]], model) -> str | None:
    """The tensors ``stored`` (module name -> shape, from the headers) holds in another shape than ``model`` (built on the
    meta device from config.json) has them, as a load says it; None when none. Found before the model is allocated: a
    config of 400B parameters over a tiny model's weights took the machine's memory first (trial83 F3)."""
    shapes = sorted(f"{name} (weights {list(stored[name])}, model {list(tensor.shape)})" for name, tensor in model.state_dict().items()
                    if name in stored and tuple(stored[name]) != tuple(tensor.shape))
    if not shapes:
        return None
    more = f" and {len(shapes) - 3} more" if len(shapes) > 3 else ""
    return f"{len(shapes)} tensor(s) of the wrong shape: {', '.join(shapes[:3])}{more}"


def stored_by_module_name(directory: Path, renames) -> dict[str, tuple[str, tuple[int, ...]]]:
    """A safetensors checkpoint's tensors from its headers alone: module name (the checkpoint name renamed as
    transformers' load renames it, ``renames``: (pattern, module name) pairs, or None) -> (dtype tag, shape).
    Raises MidusError when the headers do not read or break the safetensors rules."""
    source = SafetensorsSource(Path(directory), (), renames or ())
    try:
        held, module_names = source.stored(), source.checkpoint_names()
    finally:
        source.close()
    return {module_names[key][0]: (tag, tuple(shape)) for key, (tag, shape) in held.items()}


class DictSource(TensorSource):
    def __init__(self, tensors: dict[str, torch.Tensor], prefixes: tuple[str, ...], renames: list[tuple[str, str]] = (), how: str | None = None):
        super().__init__(dict(tensors), prefixes, renames)
        self.how = how

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {key: tuple(t.shape) for key, t in self._where.items()}

    def held_tag(self, name: str) -> str | None:
        key = self.resolve(name)
        return None if key is None else TAGS.get(str(self._where[key].dtype).removeprefix("torch."))

    def _read(self, key: str) -> torch.Tensor:
        # A copy: the same base tensor may be written twice (duplicated layers), and
        # safetensors refuses tensors that share storage.
        return self._where[key].clone()


@dataclass(frozen=True)
class GgufInfo:
    """What the checks read of a GGUF file (not its tokenizer's arrays, not its weights)."""

    arch: object  # general.architecture, None without one
    block_count: object  # <arch>.block_count, None without one
    keys: frozenset[str]  # every metadata key
    tensors: tuple[tuple[str, tuple[int, ...]], ...]  # each tensor's name and shape, in torch's order (the reverse of GGML's)


def read_gguf_info(path: Path) -> GgufInfo:
    """The file's GgufInfo; raises what the gguf reader raises for a file it cannot read. Kept for the
    file as it is (its size and time): the reader parses every metadata array, seconds for a large vocabulary,
    and validate's checks read one file several times."""
    stat = path.stat()
    return _gguf_info(str(path), stat.st_size, stat.st_mtime_ns)


# The GGUF (v2, v3) value types, as gguf.constants.GGUFValueType numbers them: the bytes of one item of each
# fixed-size type; a string is a u64 length and its bytes, an array a u32 item type, a u64 count and its items.
_GGUF_ITEM_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_GGUF_TYPE_NAMES = {0: "uint8", 1: "int8", 2: "uint16", 3: "int16", 4: "uint32", 5: "int32", 6: "float32", 7: "bool",
                    8: "string", 9: "array", 10: "uint64", 11: "int64", 12: "float64"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9
_GGUF_MAX_NESTING = 4  # arrays of arrays, deep: llama.cpp reads none nested; gguf's reader recurses in Python per level
# The metadata entries and array items (strings, arrays, numbers) one file may declare in all: gguf's reader builds
# Python and numpy objects for each, about 200 bytes of memory per byte of a file of empty strings (trial92 F7: 8 MB
# took 1.8 GB), about 700 bytes per item of a number array (trial95 F8). A real tokenizer's tokens, merges, scores and
# token types are about a million at most (256k tokens, each with a score and a type; 500k merges); 2^21 leaves room,
# and a file just under it costs gguf's reader about 1.5 GB at most.
_GGUF_MAX_ITEMS = 2**21


class GgufLayoutError(ValueError):
    """A count or a length in a GGUF file's header, metadata or tensor list that the file's size cannot hold."""


class GgufTooManyItems(GgufLayoutError):
    """More metadata items in a GGUF file than any model's, which gguf's reader would take many times the file's size
    of memory to read: a whole file, maybe, but not one to read."""


def check_gguf_layout(path: str) -> None:
    """Raise GgufLayoutError unless every count and length in the file's header, metadata and tensor list fits in
    the bytes the file has left, before gguf's GGUFReader (or transformers, through it) reads it. The reader believes
    them: it walks an array said to hold 2^40 items one item at a time in Python, its memory growing ~120 MB/s in a
    100-byte file, and reads a string said to be 2^62 bytes long as the bytes that are there (trial83 F2). An
    array of fixed-size items is stepped over at once; strings and arrays of strings or arrays are walked, each
    item taking at least 8 bytes, so the walk is bounded by the file's size."""
    import mmap

    with open(path, "rb") as file:
        size = os.fstat(file.fileno()).st_size
        if size < 24:
            raise GgufLayoutError(f"{size} bytes is less than a GGUF header's 24")
        with mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
            _GgufLayout(data, size).check()


class _GgufLayout:
    """The walk check_gguf_layout makes, at ``pos``, in the file's byte order (gguf's reader takes a version whose
    low 16 bits are 0 for a file written big-endian)."""

    def __init__(self, data, size: int) -> None:
        self.data, self.size, self.pos, self.order = data, size, 0, "<"
        self.items = 0  # metadata entries and the strings and arrays in arrays, so far: what the reader builds one by one

    def count_items(self, count: int, claim: str) -> None:
        """Add ``count`` items the reader builds one by one, which ``claim`` says are there; GgufTooManyItems past
        _GGUF_MAX_ITEMS, before they are walked."""
        self.items += count
        if self.items > _GGUF_MAX_ITEMS:
            raise GgufTooManyItems(f"{claim}, past {_GGUF_MAX_ITEMS:,} metadata entries and array items in all (a real "
                                   "tokenizer's tokens, scores, types and merges are about a million at most), which gguf's reader would build one by "
                                   "one, in about 200 times the file's size of memory")

    def take(self, n: int, claim: str) -> int:
        """The offset of the next ``n`` bytes, which ``claim`` says are there; GgufLayoutError if the file has fewer."""
        if n > self.size - self.pos:
            raise GgufLayoutError(f"{claim} at byte {self.pos:,}, but {self.size - self.pos:,} bytes are left")
        self.pos += n
        return self.pos - n

    def number(self, fmt: str, claim: str) -> int:
        return struct.unpack_from(self.order + fmt, self.data, self.take(struct.calcsize(fmt), claim))[0]

    def string(self, what: str) -> bytes:
        length = self.number("Q", f"the length of {what}")
        start = self.take(length, f"{what} is {length:,} bytes long")
        return bytes(self.data[start:start + min(length, 200)])  # a name, for the messages: its head is enough

    def value(self, kind: int, what: str, depth: int = 0) -> None:
        if kind in _GGUF_ITEM_BYTES:
            self.take(_GGUF_ITEM_BYTES[kind], f"{what}, a {_GGUF_TYPE_NAMES[kind]}, is cut short")
        elif kind == _GGUF_STRING:
            self.string(what)
        elif kind == _GGUF_ARRAY:
            if depth >= _GGUF_MAX_NESTING:
                raise GgufLayoutError(f"{what} nests arrays more than {_GGUF_MAX_NESTING} deep (llama.cpp reads no array of arrays)")
            item = self.number("I", f"the item type of {what}")
            count = self.number("Q", f"the item count of {what}")
            if item in _GGUF_ITEM_BYTES:  # fixed-size items: stepped over at once here, but not by the reader
                self.take(count * _GGUF_ITEM_BYTES[item], f"{what} holds {count:,} {_GGUF_TYPE_NAMES[item]} items")
                # counted too: gguf's reader builds one numpy array per item of any type, ~700 bytes and 11 us each, so a
                # 2 MB file of one uint8 array took 22.7 s and 1.4 GiB (trial95 F8). A real tokenizer's token_type and
                # scores arrays, one item per token, stay far below the cap with its tokens and merges.
                self.count_items(count, f"{what} holds {count:,} {_GGUF_TYPE_NAMES[item]} items")
                return
            if item not in (_GGUF_STRING, _GGUF_ARRAY):
                raise GgufLayoutError(f"{what} holds items of value type {item}, which GGUF does not define")
            least = 8 if item == _GGUF_STRING else 12  # a string's length; an array's item type and count
            if count * least > self.size - self.pos:  # before walking them: the walk would be as long as the count
                raise GgufLayoutError(f"{what} holds {count:,} {_GGUF_TYPE_NAMES[item]} items (at least {least} bytes each) "
                                      f"at byte {self.pos:,}, but {self.size - self.pos:,} bytes are left")
            self.count_items(count, f"{what} holds {count:,} {_GGUF_TYPE_NAMES[item]} items")
            each = what if what.startswith("an item of ") else f"an item of {what}"  # one level said, however deep
            for _ in range(count):
                self.value(item, each, depth + 1)
        else:
            raise GgufLayoutError(f"{what} has value type {kind}, which GGUF does not define")

    def check(self) -> None:
        if bytes(self.data[:4]) != b"GGUF":
            raise GgufLayoutError("it does not begin with 'GGUF'")
        self.pos = 4
        version = self.number("I", "its version")
        if version & 0xFFFF == 0:  # as gguf's reader reads it: a file written on a big-endian machine
            self.order, version = ">", int.from_bytes(version.to_bytes(4, "little"), "big")
        if version not in (2, 3):
            raise GgufLayoutError(f"it says GGUF version {version}; versions 2 and 3 are read")
        n_tensors = self.number("Q", "its tensor count")
        n_kv = self.number("Q", "its metadata count")
        # each entry at least: a key's length, a value type and a one-byte value; each tensor's entry a name's
        # length, a dimension count, a type and an offset
        if n_kv * 13 + n_tensors * 24 > self.size - self.pos:
            raise GgufLayoutError(f"its header counts {n_kv:,} metadata entries and {n_tensors:,} tensors (at least 13 and "
                                  f"24 bytes each), but {self.size - self.pos:,} bytes follow it")
        self.count_items(n_kv, f"its header counts {n_kv:,} metadata entries")
        for i in range(n_kv):
            key = self.string(f"the key of metadata entry {i}").decode("utf-8", "replace")
            what = f"metadata key {shown(key)}"
            self.value(self.number("I", f"the value type of {what}"), what)
        for i in range(n_tensors):
            name = self.string(f"the name of tensor {i}").decode("utf-8", "replace")
            what = f"tensor {shown(name)}"
            n_dims = self.number("I", f"the dimension count of {what}")
            self.take(n_dims * 8 + 12, f"{what} has {n_dims:,} dimensions")  # each a u64; then its type and offset


@functools.lru_cache(maxsize=4)
def _gguf_info(path: str, size: int, mtime_ns: int) -> GgufInfo:
    from gguf import GGUFReader

    check_gguf_layout(path)  # counts and lengths the reader would believe
    reader = GGUFReader(path)  # memory-maps the file: every tensor must lie within it

    def field(key: str):
        try:
            return reader.fields[key].contents()
        except (KeyError, AttributeError, IndexError, TypeError, ValueError):
            return None

    arch = field("general.architecture")
    return GgufInfo(arch, field(f"{arch}.block_count") if isinstance(arch, str) else None, frozenset(reader.fields),
                    tuple((t.name, tuple(int(d) for d in reversed(t.shape.tolist()))) for t in reader.tensors))


def gguf_problem(path: Path) -> str | None:
    """None when the GGUF file reads whole; else why not, one line. (transformers' own errors for
    a cut or corrupt GGUF speak of JSON config files and array shapes.)"""
    try:
        import gguf  # noqa: F401 - only whether it is there
    except ImportError:
        return None  # transformers says it needs the gguf package
    try:
        info = read_gguf_info(path)
    except Exception as exc:  # noqa: BLE001 - the reader raises many types for a file it cannot read
        twice = _gguf_twice(exc)
        if twice:  # a whole file, read to its tensor list: which of the two a loader takes is up to the loader
            return f"{path}: {twice} (a corrupt GGUF file: a GGUF file holds each once)"
        if isinstance(exc, GgufTooManyItems):  # the file may be whole: "cut short, or not GGUF" would mislead
            return f"{path}: {exc}: refused before it is read"
        why = str(exc) if isinstance(exc, GgufLayoutError) else one_line(exc, 160)  # ours is said for the user already
        return f"{path}: not a whole GGUF file ({path.stat().st_size} bytes; cut short, or not GGUF: {why})"
    return _gguf_block_problem(path, info) or _gguf_size_problem(path, info)


def _gguf_size_problem(path: Path, info: GgufInfo) -> str | None:
    """A GGUF file without tensors, or without ``<arch>.block_count`` or ``<arch>.embedding_length`` (llama.cpp
    refuses a file without either, for every architecture): transformers' config class fills each size the file
    lacks with its own default, and a 96-byte file holding only general.architecture = llama validated as a
    32-layer 6.6B model, which apply then built, taking the host's memory (trial83 F2). No default stands in
    for a size the file lacks. (Without general.architecture, transformers refuses it in its own words.)"""
    if not isinstance(info.arch, str):
        return None
    missing = [key for key in (f"{info.arch}.block_count", f"{info.arch}.embedding_length") if key not in info.keys]
    said = [f"its metadata lacks {' and '.join(missing)} (the model's size{'s' if len(missing) > 1 else ''}: transformers "
            "would take its config class's default, another model)"] if missing else []
    if not info.tensors:
        said.insert(0, "it holds no tensors (no weights: metadata alone)")
    return f"{path}: {'; '.join(said)}: not a GGUF model to build from" if said else None


def _gguf_twice(exc: Exception) -> str | None:
    """What the gguf reader found twice (a tensor name, a metadata key), said for the user; None for other errors."""
    text = str(exc.args[0]) if exc.args else ""
    if isinstance(exc, ValueError) and (m := re.fullmatch(r"Found duplicated tensor with name (.*)", text, re.S)):
        return f"it holds two tensors named {shown(m.group(1))}"
    if isinstance(exc, KeyError) and (m := re.fullmatch(r"Duplicate (.*) already in list at offset \d+", text, re.S)):
        return f"its metadata holds the key {shown(m.group(1))} twice"
    return None


def _gguf_block_problem(path: Path, info: GgufInfo) -> str | None:
    """A GGUF file whose ``<arch>.block_count`` disagrees with its ``blk.N`` tensors (llama.cpp refuses it too):
    transformers builds block_count layers and drops the tensors of any others without a word."""
    arch, stated = info.arch, info.block_count
    blocks = {int(m.group(1)) for name, _ in info.tensors if (m := re.match(r"blk\.(\d+)\.", name))}
    if isinstance(stated, bool) or not isinstance(stated, int) or not blocks or blocks == set(range(stated)):
        return None  # no layer count to compare: the config's own checks speak
    held = sorted(blocks)
    held_text = f"{len(held)} blocks, {_blocks(held)}" if held == list(range(held[0], held[-1] + 1)) else f"{len(held)} blocks ({_blocks(held)})"
    missing = sorted(set(range(stated)) - blocks)
    lacking = f", with no tensor of {_blocks(missing)}" if missing else ""
    return (f"{path}: its metadata says {arch}.block_count = {stated}, but its tensors are {held_text}{lacking}: "
            "a file that contradicts itself (a model built from it would lose or invent layers)")


def _blocks(indices: list[int], limit: int = 8) -> str:
    """``blk.0 to blk.3``, ``blk.0, blk.1, blk.3``: runs of three or more as a range."""
    runs: list[list[int]] = []
    for i in indices:
        if runs and i == runs[-1][-1] + 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    parts = [f"blk.{r[0]} to blk.{r[-1]}" if len(r) > 2 else ", ".join(f"blk.{i}" for i in r) for r in runs]
    return ", ".join(parts[:limit]) + (f" and {len(parts) - limit} more" if len(parts) > limit else "")


def gguf_config_keys(path: Path) -> dict[str, str]:
    """Config key -> the GGUF metadata key transformers takes it from (``rope_theta`` -> ``llama.rope.freq_base``),
    for the keys the file has: a problem with a derived config names what to fix in the file."""
    try:
        from transformers.modeling_gguf_pytorch_utils import GGUF_TO_TRANSFORMERS_MAPPING

        info = read_gguf_info(path)
        renames = GGUF_TO_TRANSFORMERS_MAPPING["config"].get(info.arch, {})
    except Exception:  # noqa: BLE001 - only a hint: without it the message names the config key alone
        return {}
    return {target: f"{info.arch}.{key}" for key, target in renames.items() if isinstance(target, str) and f"{info.arch}.{key}" in info.keys}


class _ModuleNames:
    """What transformers' GGUF name mapping reads of a model (its config, its state_dict's names, its children),
    from the tensor names alone: no model is built. The mapping, run again for each child module, rebuilds
    gguf-py's name table each time (seconds for a model's hundreds of modules); a layer's own modules (below a
    numbered child) are not offered, as no GGUF name can be mapped without the block number."""

    def __init__(self, names: Iterable[str], config=None):
        self.config = config
        self._names = list(names)

    def state_dict(self) -> dict:
        return dict.fromkeys(self._names)

    def named_children(self):
        children: dict[str, list[str]] = {}
        for name in self._names:
            head, dot, rest = name.partition(".")
            if dot and not head.isdigit():
                children.setdefault(head, []).append(rest)
        return [(head, _ModuleNames(rest)) for head, rest in children.items()]


def _gguf_mapping(arch, names: Iterable[str], config):
    """(GGUF tensor name -> the module tensor name transformers' GGUF loader loads it into, the loader's tensor
    processor for the architecture), by transformers' own mapping, for the model's tensor ``names``;
    None where it has none."""
    from types import SimpleNamespace

    try:
        from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map

        processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=config.to_dict())
        model = _ModuleNames(names, SimpleNamespace(model_type=config.model_type, num_hidden_layers=config.num_hidden_layers))
        return get_gguf_hf_weights_map(model, processor), processor
    except Exception:  # noqa: BLE001 - an architecture gguf-py or transformers cannot map: the load itself speaks
        return None


# transformers' tensor processors that give each GGUF tensor its module's shape as stored (others transpose,
# add a dimension or stack experts: for those only the number of values is compared)
_SHAPE_KEEPING = ("TensorProcessor", "LlamaTensorProcessor", "BloomTensorProcessor", "T5TensorProcessor",
                  "NemotronTensorProcessor", "Gemma2TensorProcessor")
_SIZE_KEYS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size")


def gguf_shape_problem(path: Path, config, shapes: dict[str, tuple[int, ...]]) -> str | None:
    """A GGUF tensor whose shape (its tensor info) is not the one the config transformers derives from the same
    file's metadata implies for its module tensor (``shapes``: module tensor name -> shape, from the config); one
    line naming it, else None. transformers' load fails on one with its own words ("look at the above report")."""
    try:
        import gguf  # noqa: F401 - only whether it is there
    except ImportError:
        return None  # transformers says it needs the gguf package
    info = read_gguf_info(path)
    mapped = _gguf_mapping(info.arch, shapes, config)
    if mapped is None:
        return None
    mapping, processor = mapped
    targets: dict[str, int] = {}
    for target in mapping.values():
        targets[target] = targets.get(target, 0) + 1
    exact = type(processor).__name__ in _SHAPE_KEEPING
    data = config.to_dict()
    for name, got in info.tensors:
        target = mapping.get(name)
        if target not in shapes or targets[target] > 1:  # unmapped, or one of several stacked into one module tensor
            continue
        want = tuple(shapes[target])
        if got == want or (not exact and math.prod(got) == math.prod(want)):
            continue
        sizes = ", ".join(f"{k}={data[k]}" for k in _SIZE_KEYS if data.get(k) is not None)
        return (f"{path}: its tensor {shown(name)} has shape {got}, but the config its metadata gives ({sizes}) implies "
                f"{want} for {target}, which transformers loads it into: a file that contradicts itself")
    return None


def gguf_left_out(path: Path, model) -> dict:
    """The GGUF file's tensors that transformers' GGUF loader leaves out (no module tensor of the architecture
    takes them), name -> tensor (dequantised): the loader drops them without a word."""
    import torch
    from gguf import GGUFReader, dequantize

    info = read_gguf_info(path)
    mapped = _gguf_mapping(info.arch, model.state_dict(), model.config)
    if mapped is None:
        return {}
    mapping, processor = mapped
    own = [p for key, p in vars(type(processor)).items() if key.startswith("GGUF_") and isinstance(p, re.Pattern)]  # names it takes itself
    left = {name for name, _ in info.tensors if name not in mapping and not any(p.search(name) for p in own)}
    if not left:
        return {}
    return {t.name: torch.from_numpy(dequantize(t.data, t.tensor_type).copy()) for t in GGUFReader(path).tensors if t.name in left}


def _loaded_by_transformers(ref: BaseRef, prefixes: tuple[str, ...], what: str, *, progress: bool = True, **kwargs) -> DictSource:
    """The whole base loaded by transformers (dequantised, converted), as name -> tensor in memory."""
    from transformers import AutoModelForCausalLM

    from midus_surgery.io.hf_output import kept_load_report, load_report_words, transformers_quiet

    try:
        with transformers_quiet(progress), kept_load_report() as report:
            model, info = AutoModelForCausalLM.from_pretrained(ref.directory, output_loading_info=True, **kwargs)
    except Exception as exc:  # transformers' loaders raise many types for files they cannot read
        where = ref.directory / (ref.gguf_file or "")
        if report and "above report" in str(exc):  # transformers could not convert or fill these, and says only "see the report"
            raise BaseModelError(f"the base checkpoint {where} does not give transformers every tensor of the model: it could not "
                                 f"build {load_report_words(report)} from the files: a tensor it is made from is missing or of "
                                 "another shape") from None
        raise MidusError(f"cannot load the base {where} with transformers ({what}): {exc}") from None
    missing = sorted(info.get("missing_keys", []))
    if missing:  # transformers initialised them at random: never copy those into an output
        where = "in the GGUF file" if ref.is_gguf else "in its files, also as transformers' loader reads them"
        raise BaseModelError(f"the base checkpoint {ref.directory / (ref.gguf_file or '')} lacks {len(missing)} tensor(s) of the model, "
                             f"e.g. {', '.join(missing[:3])}: not {where}")
    tensors = model.state_dict()
    if ref.is_gguf:  # under their GGUF names, so that apply says they are left out (a safetensors base's extras are there too)
        tensors.update(gguf_left_out(ref.directory / ref.gguf_file, model))
    return DictSource(tensors, prefixes, how=f"whole, through transformers' loader ({what})")


def available_memory() -> int:
    """Bytes the system can hand out without swapping (MemAvailable on Linux)."""
    import psutil

    return psutil.virtual_memory().available


def _check_fits_in_memory(num_bytes: int, where: Path) -> None:
    """Refuse up front, with the numbers, a whole-model load that would not fit (rather than be killed midway)."""
    free = available_memory()
    if num_bytes > free:
        raise MidusError(f"{where}: transformers must load this base whole to stack its experts ({num_bytes / 2**30:.1f} GiB), "
                         f"and {free / 2**30:.1f} GiB of memory is available; run apply on a machine with more memory")


PICKLE_RISK = "pickle can run code when loaded"


def pickle_weight_files(directory: Path) -> list[Path]:
    """The pickle weights files transformers reads (``pytorch_model.bin`` and its shards), sorted: not any ``.bin``
    (a Trainer's training_args.bin beside a config was taken for weights and its floats for tensors: trial97 F9)."""
    return sorted(Path(directory).glob("pytorch_model*.bin"))


def holds_only_pickle_weights(directory: Path) -> bool:
    """Whether transformers would read a model folder's weights from pickle .bin files: it reads model.safetensors (or
    the shards its index names) when it is there, and else the .bin. Another .safetensors file beside a pickle is not
    what it reads: such a folder passed for safe, and torch.load ran without --allow-pickle (trial73 F5)."""
    read_safe = (directory / "model.safetensors").is_file() or (directory / "model.safetensors.index.json").is_file()
    return not read_safe and bool(pickle_weight_files(directory))


def open_base_tensors(ref: BaseRef, *, allow_pickle: bool, prefixes: tuple[str, ...], model_type: str,
                      renames: list[tuple[str, str]] | None = None, needed: Iterable[str] = (), progress: bool = True,
                      trust_remote_code: bool = False) -> TensorSource:
    """renames: the checkpoint -> module renames when known (None: ask transformers, ``checkpoint_renames``).

    trust_remote_code: the recipe's ``base.trust_remote_code``, passed to every transformers load
    (never None, with which transformers asks on the terminal whether to run the folder's code).

    needed: the module tensor names the caller will read. When a safetensors checkpoint lacks some
    of them (transformers converts this architecture's tensors on load),
    the base is loaded through transformers instead, whole, in memory (as a GGUF base is).
    """
    check_base_weights_there(ref)
    if ref.is_gguf:
        import torch

        return _loaded_by_transformers(ref, prefixes, "GGUF, dequantised", progress=progress, gguf_file=ref.gguf_file, dtype=torch.float32,
                                      trust_remote_code=trust_remote_code)
    if renames is None:
        renames = checkpoint_renames(model_type)
    if any(ref.directory.glob("*.safetensors")):
        source = SafetensorsSource(ref.directory, prefixes, renames)
        absent = [name for name in needed if source.resolve(name) is None]
        if absent:
            # transformers may convert this checkpoint on load (experts stored one per tensor, other names):
            # it is the authority, and the load is strict (_loaded_by_transformers)
            _check_fits_in_memory(sum(p.stat().st_size for p in ref.directory.glob("*.safetensors")), ref.directory)
            how = f"its safetensors files hold no {absent[0]} under that name; transformers converts some checkpoints on load"
            return _loaded_by_transformers(ref, prefixes, how, progress=progress, dtype="auto", trust_remote_code=trust_remote_code)
        return source
    bins = pickle_weight_files(ref.directory)
    if bins:
        import torch

        if not allow_pickle:
            raise BaseModelError(f"{ref.directory} holds only pickle .bin weights; {PICKLE_RISK}: pass --allow-pickle to read them (with weights_only=True)")
        tensors: dict[str, torch.Tensor] = {}
        for file in bins:
            try:
                # mmap reads only the zip format torch.save writes since 1.6; the legacy format (still on the Hub) was
                # refused with torch's "mmap can only be used with files saved with..." where eval read it (trial99 M1)
                loaded = torch.load(file, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(file))
            except Exception as exc:  # noqa: BLE001 - corrupt or unsafe pickles raise many types
                raise BaseModelError(f"cannot read {file}: {load_error_line(exc)}") from None
            if not isinstance(loaded, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in loaded.items()):
                raise BaseModelError(f"{file} is not a weights file: it holds {type(loaded).__name__} data, not named tensors")
            tensors.update(loaded)
        return DictSource(tensors, prefixes, renames)
    raise BaseModelError(f"no weights found in {printable(str(ref.directory))} (expected .safetensors files)")  # check_base_weights_there said it


def check_base_weights_there(ref: BaseRef) -> None:
    """The base's files apply reads exist: the GGUF file, or config.json and weights files beside it. From a listing,
    before the plan (a 70B config without weights took 16 s of imports and planning to be told)."""
    if not ref.exists:
        missing = ref.directory / (ref.gguf_file or "config.json")
        fetch = " (the bundled SmolLM2 recipes' base: python tools/fetch_smollm2.py writes it)" if "smollm2-135m" in str(missing) else ""
        raise BaseModelError(f"base model not found: {printable(str(missing))}: apply reads the weights there (base.config alone plans, it does not "
                             f"apply){fetch}")
    if not ref.is_gguf and not any(ref.directory.glob("*.safetensors")) and not pickle_weight_files(ref.directory):
        raise BaseModelError(f"no weights found in {printable(str(ref.directory))} (expected .safetensors files)")
