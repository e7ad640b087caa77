"""Training data: text files -> packed, memory-mapped token streams -> a deterministic block order.

- ``resolve_inputs`` turns files, directories and globs into a sorted list of files.
- ``prepare_corpus`` tokenises them once with the model's own tokenizer (documents joined by the
  EOS token) into ``tokens.bin`` (uint16 or uint32, memory-mapped) + ``docs.npy`` (document
  start offsets) + ``midus_tokens.json``, in a cache directory named by a hash of the files'
  contents and the tokenizer. A second run with the same text and tokenizer opens it at once.
  The block size is not part of the key: blocks are views cut from the stream at load time, so
  changing ``block_size`` needs no re-tokenisation.
- ``BlockSampler`` maps a global sample number to a block: epoch e visits the training blocks in
  ``default_rng([seed, e]).permutation``. The number of samples consumed is the whole loader
  state, so a checkpoint that stores it resumes without replaying or skipping data, with any
  number of processes.
"""

from __future__ import annotations

import codecs
import contextlib
import errno
import fnmatch
import glob
import hashlib
import json
import math
import os
import shutil
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from midus_surgery.errors import MidusError, lone_surrogate, naming_the_file, one_line
from midus_surgery.io.file_digest import sha256_of, written_stamp
from midus_surgery.io.json_text import loads_checked
from midus_surgery.io.output_dir import (
    MARKER,
    OutputError,
    check_cache_location,
    clean_leftovers,
    hold_directory,
    kernel_file_system,
    release_marker,
    remove_empty,
    write_marker,
)
from midus_surgery.io.small_files import read_small_text, regular_file_problem

FORMAT_VERSION = 1
META_FILE = "midus_tokens.json"
CACHE_DATA_FILES = ("tokens.bin", "docs.npy")  # a cache entry's data, its SHA-256 recorded in META_FILE
JSONL_SUFFIXES = (".jsonl", ".ndjson")
# what a tokenizer's files are named (tokenizer.json, vocab.txt, spiece.model...): one of them must be there
class DataError(MidusError):
    """Bad training or evaluation data (empty corpus, missing field, too short, mismatched cache)."""

    exit_code = 3


# --------------------------------------------------------------------------- inputs

def _has_magic(text: str) -> bool:
    return any(c in text for c in "*?[")


def link_problem(path: Path) -> str | None:
    """Why ``path`` is a symbolic link that leads nowhere (a loop, or a target that does not exist),
    or None. Python before 3.13 raises on resolving a loop, 3.13 does not; either way the user
    should hear about the link, not "does not exist" or a path error (trial44)."""
    try:
        os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return f"{path} is a symbolic link that leads back to itself (a link loop)"
        if path.is_symlink():
            return f"{path} is a symbolic link to {os.readlink(path)}, which does not exist"
    return None


def check_data_links(entries: Iterable[Path], what: str = "data") -> None:
    """Refuse, as a data error, a data path (not a glob pattern) that is a broken link or a link loop."""
    for path in entries:
        problem = None if _has_magic(str(path)) else link_problem(Path(path))
        if problem:
            raise DataError(f"{what}: {problem}")


def resolve_inputs(entries: Iterable[str], base_dir: Path, dir_glob: Iterable[str], what: str = "data") -> list[Path]:
    """Files named by ``entries`` (files, directories searched with ``dir_glob``, glob patterns)."""
    files: list[Path] = []
    seen: set[Path] = set()
    patterns = list(dir_glob)
    for entry in entries:
        raw = Path(entry).expanduser()
        path = raw if raw.is_absolute() else base_dir / raw
        if _has_magic(str(entry)):
            first = next(i for i, part in enumerate(path.parts) if _has_magic(part))
            root, rest = Path(*path.parts[:first]), "/".join(path.parts[first:])
            if "**" in rest and root.is_dir():  # glob's ** followed a linked folder's loop forever (trial73 F6): walked as a folder is
                matches = _folder_files(root, [rest], what)
            else:
                matches = sorted(Path(p) for p in glob.glob(str(path), recursive=True))
            found = [p for p in matches if p.is_file()]
            if not found and matches:  # only folders: a pattern is not searched inside them, as a folder entry is
                raise DataError(f"{what}: the pattern {entry!r} matches {len(matches)} folder{'s' if len(matches) > 1 else ''} "
                                f"({matches[0]}{', ...' if len(matches) > 1 else ''}) and no files; name a folder to read its files "
                                f"matching {patterns}, or end the pattern in file names (e.g. {entry.rstrip('/')}/*.txt)")
            if not found:
                raise DataError(f"{what}: the pattern {entry!r} matches no files")
        elif path.is_dir():
            if (path / META_FILE).is_file():  # an already tokenised corpus
                found = [path]
            else:
                found = _folder_files(path, patterns, what)
                if not found:
                    raise DataError(f"{what}: the directory {path} holds no files matching {patterns}")
        elif path.is_file():
            found = [path]
        elif path.exists():  # a device, a pipe, a socket: nothing to read as a corpus (a pipe would block)
            raise DataError(f"{what}: {path} is not a regular file or a folder")
        else:
            raise DataError(f"{what}: {link_problem(path) or f'{path} does not exist'}")
        for p in found:
            p = p.resolve()
            kind = p.parts[1:2] in (("proc",), ("sys",)) and kernel_file_system(p)
            if kind:  # z.txt -> /proc/self/status was trained on, /proc/self/pagemap read for minutes (trial72)
                raise DataError(f"{what}: {entry} is {p}, on the kernel's {kind} file system: the machine's state, not text; "
                                "give the data files themselves")
            if p not in seen:
                seen.add(p)
                files.append(p)
    if not files:
        raise DataError(f"{what}: no input files")
    return files


def _folder_files(folder: Path, patterns: list[str], what: str) -> list[Path]:
    """The files under ``folder`` whose path below it matches one of ``patterns`` (glob patterns, ``**``
    for any number of folders), sorted. Linked folders are followed, each real folder once (a link
    back up is not a loop), but none that holds ``folder`` (its files are not the data); hidden files and folders (.git, an editor's .swp) are not the corpus, as
    a shell glob skips them. A matching name that is a broken link or a link loop is refused, as the
    same link named directly is: a folder read without it would silently train on less (trial48:
    both were skipped without a word, and so were linked folders)."""
    found, seen_dirs = [], set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in seen_dirs:
            dirnames[:] = []
            continue
        seen_dirs.add((st.st_dev, st.st_ino))
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for d in dirnames:  # a linked folder into /proc walked every process's root and cwd: the whole machine (trial70)
            linked = Path(dirpath) / d
            kind = linked.is_symlink() and kernel_file_system(linked)
            if linked.is_symlink() and folder.resolve() != linked.resolve() and folder.resolve().is_relative_to(linked.resolve()):
                # a link up past the folder (up -> ../..) read every file beside it: the user's nearby files (trial83 F10)
                raise DataError(f"{what}: {linked} links to {linked.resolve()}, a folder that holds the data folder {folder}: "
                                "following it would read files outside the data folder; remove the link")
            if kind:
                through = "the machine's processes" if kind == "proc" else "the kernel's state"
                raise DataError(f"{what}: {linked} links to {linked.resolve()}, on the kernel's {kind} file system, not data: a data "
                                f"folder's linked folders are followed, and this one leads through {through} (in the "
                                f"folder {folder}); remove the link")
        below = Path(dirpath).relative_to(folder).parts
        for name in filenames:
            if name.startswith(".") or not any(_glob_match([*below, name], pattern.split("/")) for pattern in patterns):
                continue
            path = Path(dirpath) / name
            if not path.is_file():
                raise DataError(f"{what}: {link_problem(path) or f'{path} is not a regular file'} (in the folder {folder})")
            found.append(path)
    return sorted(found)


def _glob_match(parts: list[str], pattern: list[str]) -> bool:
    """Whether path ``parts`` match glob ``pattern`` segments, ``**`` matching any number of folders."""
    if not pattern:
        return not parts
    if pattern[0] == "**":
        return any(_glob_match(parts[i:], pattern[1:]) for i in range(len(parts) + 1))
    return bool(parts) and fnmatch.fnmatchcase(parts[0], pattern[0]) and _glob_match(parts[1:], pattern[1:])


def _json_kind(value) -> str:
    """A JSON value's kind in JSON's words (a Python type name reads 'a NoneType')."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return {int: "a number", float: "a number", list: "a list", dict: "an object"}.get(type(value), type(value).__name__)


def iter_documents(path: Path, text_field: str) -> Iterator[str]:
    """The documents of one file: the whole file, or one per JSONL record."""
    try:
        if path.suffix.lower() in JSONL_SUFFIXES:
            yield from _jsonl_texts(path, text_field)
        else:
            raw = path.read_bytes()
            mark = len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0  # no text: read as such, 3 tokens a file (trial146 F6)
            try:
                text = str(memoryview(raw)[mark:], "utf-8")  # a view: the bytes past the mark are not copied first
            except UnicodeDecodeError as exc:  # the byte named as the file counts it, the mark included (trial147 F3)
                hint = _bom_hint(raw) if exc.start + mark < 4 else ""
                raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start + mark}){hint}") from None
            del raw  # this frame waits at the yield while the document is tokenised: only the text is held then (trial149 F7)
            text = text.replace("\r\n", "\n").replace("\r", "\n")  # the newlines read_text's text mode gave: the same tokens as before
            yield text
    except UnicodeDecodeError as exc:
        hint = _bom_hint(exc.object) if exc.start < 4 else ""
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}){hint}") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None


def _bom_hint(data: bytes) -> str:
    """A clause naming the byte-order mark ``data`` starts with, when it is a UTF-16 or UTF-32 one (Windows editors save
    text so), with the conversion that reads it; "" otherwise."""
    for encoding, marks in (("UTF-32", (codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE)), ("UTF-16", (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE))):
        if data.startswith(marks):  # UTF-32's little-endian mark begins with UTF-16's: tried first
            return f"; it starts with a {encoding} byte-order mark: convert it, e.g. iconv -f {encoding} -t UTF-8"
    return ""


def _jsonl_texts(path: Path, text_field: str) -> Iterator[str]:
    """The text field of each record, read line by line as bytes, so that a problem is named by its
    line and its byte in the file (a text decoder's offsets count from its buffer: trial48)."""
    offset = 0  # of the line in the file
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            start, offset = offset, offset + len(raw)
            if lineno == 1 and raw.startswith(codecs.BOM_UTF8):  # a byte-order mark (Windows editors) is no JSON error
                raw, start = raw[len(codecs.BOM_UTF8):], start + len(codecs.BOM_UTF8)
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                hint = _bom_hint(raw) if lineno == 1 else ""
                raise DataError(f"{path}:{lineno}: not UTF-8 text ({exc.reason} at byte {start + exc.start} of the file){hint}") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not a JSON record ({exc.msg} at column {exc.colno})") from None
            except RecursionError:  # [[[[...]]]] 200,000 deep: Python's JSON reader gives up (was a traceback, trial70)
                raise DataError(f"{path}:{lineno}: a JSON record nested deeper than the JSON reader goes") from None
            except ValueError:  # Python's int() refuses an integer past its digit limit: a bare ValueError, a traceback (trial99 C2)
                raise DataError(f"{path}:{lineno}: the record holds an integer of more than {sys.get_int_max_str_digits():,} digits, "
                                "more than the JSON reader converts; write it as a string (in quotes) or remove it") from None
            if not isinstance(record, dict) or text_field not in record:
                keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise DataError(f"{path}:{lineno}: the record has no {text_field!r} field (it has: {keys}); name the field "
                                f"with data.text_field (train) or --text-field (eval, analyze)")
            text = record[text_field]
            if not isinstance(text, str):
                raise DataError(f"{path}:{lineno}: field {text_field!r} is {_json_kind(text)}, not text")
            if lone := lone_surrogate(text):  # JSON's \ud83d escape without its pair: no tokenizer encodes it (trial48)
                raise DataError(f"{path}:{lineno}: field {text_field!r} {lone}, which is not text any tokenizer encodes")
            yield text


# --------------------------------------------------------------------------- tokenizer identity

def tokenizer_fingerprint(tokenizer, *, vocabulary_only: bool = False) -> str:
    """A hash of the tokenizer's vocabulary and rules (its serialised form when it has one). ``vocabulary_only``: a
    Python tokenizer's fingerprint as versions before 2026-12-07 made it, to say why their cache entries do not match."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        for token, index in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]):
            h.update(f"{index}\t{token}\n".encode())
    if backend is None and not vocabulary_only:
        # a Python tokenizer's rules are its code and its settings (do_lower_case, strip_accents, sp_model_kwargs): with the
        # vocabulary alone, a lowercasing copy and a plain one shared one cache entry, the first one's ids (trial147 F1).
        # What a load or a save puts beside them is not: the same tokenizer in two model folders, read offline or not,
        # saved again by save_pretrained, keeps one key (trial149 F1, F4)
        settings = {k: _settings_value(v) for k, v in (getattr(tokenizer, "init_kwargs", None) or {}).items()
                    if k not in _NOT_TOKENIZING_RULES and not k.endswith("_file")}
        h.update(json.dumps({"class": f"{type(tokenizer).__module__}.{type(tokenizer).__qualname__}", **settings},
                            sort_keys=True).encode())
        # the added tokens' matching rules: get_vocab holds their text and ids only, and "catxx" with xx added as a whole
        # word or not is one id or two (trial151 H1). Read from the tokenizer, not its init_kwargs, which a save changes
        added = getattr(tokenizer, "added_tokens_decoder", None) or {}
        h.update(json.dumps([[int(index), str(getattr(token, "content", token))]
                             + [bool(getattr(token, flag, False)) for flag in ("single_word", "lstrip", "rstrip", "normalized", "special")]
                             for index, token in sorted(added.items())]).encode())
    h.update(f"eos={eos_id(tokenizer)}".encode())
    if getattr(tokenizer, "split_special_tokens", False):  # read by the Python side, not in the serialised rules: "<eos>" in
        # the text is one id or several; left out, two models' tokens were one cache entry, the first one's (trial146 F2).
        # Added only when set, so the caches of every other tokenizer keep their keys
        h.update(b"split_special_tokens")
    return h.hexdigest()[:16]


# init_kwargs of a Python tokenizer that do not change the ids of text encoded without special tokens: where and how it
# was read (local_files_only follows HF_HUB_OFFLINE), what save_pretrained adds (the added tokens, hashed from the
# tokenizer itself with their matching rules), and what only decoding, padding or chat formatting reads
_NOT_TOKENIZING_RULES = frozenset({
    "name_or_path", "model_max_length", "is_local", "local_files_only", "backend", "_commit_hash", "cache_dir", "revision",
    "token", "use_auth_token", "trust_remote_code", "use_fast", "_from_auto", "subfolder", "proxies", "force_download",
    "resume_download", "user_agent", "added_tokens_decoder", "model_specific_special_tokens", "tokenizer_class", "auto_map",
    "processor_class", "clean_up_tokenization_spaces", "padding_side", "truncation_side", "model_input_names",
    "chat_template", "add_bos_token", "add_eos_token", "add_special_tokens",
})


def _settings_value(value):
    """A tokenizer setting as JSON that reads the same in every process: a special token saved by save_pretrained (an
    AddedToken) is its text, as it was before the save; keys as text (mixed key types do not sort: trial149 F6); a set
    sorted; an object named by its class where its repr holds a memory address (a new key in every process)."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if type(value).__name__ == "AddedToken" and hasattr(value, "content"):
        return str(value.content)
    if isinstance(value, dict):
        return {str(k): _settings_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_settings_value(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted((_settings_value(v) for v in value), key=repr)
    text = repr(value)
    return type(value).__qualname__ if " at 0x" in text else text


def eos_id(tokenizer) -> int:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no EOS token to join documents with")
    return int(eos)


def entry_digests(entry: Path, like: Path | None = None) -> dict | None:
    """The SHA-256s of a token-cache entry's data files as they are (hashed, not taken from its record, which a hand
    could edit: trial153 M2), or None (no such entry, no readable record, or files that are not what it records).
    ``like``: another entry; where a file's size differs from that one's and the entry's files are untouched since
    written (their recorded stamps), the two differ, and nothing is hashed (the names map to sizes of -1). A damaged
    entry is hashed, and so "cannot tell", not "differs" (trial154 L2). Only a plain name under the cache folder is
    looked up."""
    if entry.name in ("", ".", "..") or "/" in entry.name or "\\" in entry.name:
        return None
    try:
        meta = loads_checked(read_small_text(entry / META_FILE))
        if not isinstance(meta, dict) or not _records_digests(meta):
            return None
        written = meta.get("written")
        untouched = isinstance(written, dict) and all(written.get(name) == written_stamp(entry / name) for name in CACHE_DATA_FILES)
        if like is not None and untouched and any((entry / name).stat().st_size != (like / name).stat().st_size for name in CACHE_DATA_FILES):
            return {name: -1 for name in CACHE_DATA_FILES}
        found = {name: sha256_of(entry / name) for name in CACHE_DATA_FILES}
    except (OSError, ValueError):
        return None
    return found if found == {name: meta["sha256"][name] for name in CACHE_DATA_FILES} else None


def _records_digests(meta: dict) -> bool:
    """Whether a cache record holds a SHA-256 for each of its data files, to check them against."""
    sums = meta.get("sha256")
    return isinstance(sums, dict) and all(isinstance(sums.get(name), str) for name in CACHE_DATA_FILES)


def shared_files(train: list[Path], held: list[Path]) -> list[tuple[Path, Path]]:
    """(held-out file, training file) pairs of the same bytes: a file listed in both, or a copy under
    another name. Only files of equal size are read (held-out sets are small; the corpus is not)."""
    by_size: dict[int, list[Path]] = {}
    for f in train:
        by_size.setdefault(f.stat().st_size, []).append(f)
    pairs = []
    digests: dict[Path, str] = {}

    def digest(f: Path) -> str:
        if f not in digests:
            digests[f] = sha256_of(f)
        return digests[f]

    for h in held:
        size = h.stat().st_size
        same = next((t for t in by_size.get(size, []) if size and digest(t) == digest(h)), None)
        if same is not None:
            pairs.append((h, same))
    return pairs


# The rules corpus_key names an entry by, counted: 2 since a file's JSONL reading joined its key (trial70), 3 since a text
# file's byte-order mark and a Python tokenizer's class and settings did (2026-12-07). A checkpoint records it beside what
# the entry read, so a resume refused for other tokens can say when an upgrade renamed the entry (trial149 F5).
KEY_RULES = 3


def reads_of(stream: TokenStream) -> dict:
    """What a cache entry's key was made of, but the files' bytes: the tokenizer, the JSONL field, the files and the key's
    rules. A checkpoint records it, so a resume whose entry differs can name the part that changed."""
    meta = stream.meta
    files = [str(f) for f in meta.get("files", [])]
    jsonl = any(Path(f).suffix.lower() in JSONL_SUFFIXES for f in files)
    return {"tokenizer": meta.get("tokenizer"), "text_field": meta.get("text_field") if jsonl else None, "files": files,
            "key_rules": KEY_RULES}


def corpus_key(files: list[Path], fingerprint: str, text_field: str) -> str:
    h = hashlib.sha256(f"midus-tokens-v{FORMAT_VERSION}\n{fingerprint}\n".encode())
    if any(f.suffix.lower() in JSONL_SUFFIXES for f in files):
        h.update(f"text_field={text_field}\n".encode())
    for f in files:
        # how the file is read is part of its entry: the same bytes as a.json (one document) and as a.jsonl (one per record)
        # are different documents, and a rename between the two reused the stale tokens (trial70)
        read_as = b" jsonl" if f.suffix.lower() in JSONL_SUFFIXES else b" bom" if starts_with_utf8_bom(f) else b""
        h.update(sha256_of(f).encode() + read_as + b"\n")  # " bom": read without it since 2026-12-07, tokens cached before kept it
    return h.hexdigest()[:24]


def files_with_a_byte_order_mark(files: list) -> list[str]:
    """Those of ``files`` (paths as text) read as text that start with a UTF-8 byte-order mark, which versions before
    2026-12-07 tokenised (said when a resume finds other tokens)."""
    marked = []
    for f in files:
        try:
            if isinstance(f, str) and not f.lower().endswith(JSONL_SUFFIXES) and starts_with_utf8_bom(Path(f)):
                marked.append(f)
        except OSError:
            continue
    return marked


def starts_with_utf8_bom(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(len(codecs.BOM_UTF8)) == codecs.BOM_UTF8


def default_cache_dir() -> Path:
    env = os.environ.get("MIDUS_CACHE")
    if env:
        return Path(env).expanduser() / "tokens"
    return Path.home() / ".cache" / "midus-surgery" / "tokens"


def token_cache_location(given: Path | None, **checks) -> Path:
    """``check_cache_location`` (its ``checks``) of the token cache folder given, or of the default one. A refusal of the
    folder $MIDUS_CACHE names says so: train said it at the config's `data:` key, eval and analyze named no source (trial156 2)."""
    try:
        return check_cache_location(given if given is not None else default_cache_dir(), **checks)
    except OutputError as exc:
        if given is None and os.environ.get("MIDUS_CACHE"):
            raise OutputError(f"$MIDUS_CACHE ({os.environ['MIDUS_CACHE']!r}): {exc}") from None
        raise


# --------------------------------------------------------------------------- token streams

@dataclass
class TokenStream:
    """One tokenised corpus: a flat memory-mapped token array plus document starts."""

    path: Path
    tokens: np.ndarray  # [n_tokens] uint16/uint32, memory-mapped
    doc_starts: np.ndarray  # [n_docs] int64: where each document begins in ``tokens``
    meta: dict

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def num_blocks(self, block_size: int) -> int:
        return len(self) // block_size

    def block(self, index: int, block_size: int) -> np.ndarray:
        return np.asarray(self.tokens[index * block_size:(index + 1) * block_size], dtype=np.int64)

    def documents(self) -> Iterator[np.ndarray]:
        ends = list(self.doc_starts[1:]) + [len(self)]
        for start, end in zip(self.doc_starts, ends):
            yield np.asarray(self.tokens[int(start):int(end)], dtype=np.int64)


def id_end(tokenizer) -> int:
    """One past the largest id the tokenizer gives (added tokens included): its ids need not be 0 .. len - 1."""
    ids = tokenizer.get_vocab().values()
    return max(len(tokenizer), max(ids) + 1 if ids else 0)


def open_stream(path: Path, fingerprint: str | None = None, vocab_size: int | None = None, *, tokenizer=None) -> TokenStream:
    """Open a tokenised corpus, checking it was made with this tokenizer; ``vocab_size``: the tokenizer's
    ``id_end``, past which no id it made can lie (the model's own vocabulary is checked where it is loaded). ``tokenizer``:
    the one ``fingerprint`` is of, to say when the corpus was fingerprinted the way earlier versions did."""
    meta_path = path / META_FILE
    for name in CACHE_DATA_FILES:  # a named pipe here made np.load wait forever for a writer (trial70)
        odd = (path / name).exists() and regular_file_problem(path / name)
        if odd:
            raise DataError(f"{path}: {odd}; not a token cache midus-surgery wrote: delete the directory to re-tokenise")
    try:
        meta = loads_checked(read_small_text(meta_path))
    except (OSError, ValueError) as exc:  # UnicodeDecodeError and loads_checked's refusals are ValueErrors
        raise DataError(f"{path}: not a readable token cache ({exc}); delete it to re-tokenise") from None
    if not isinstance(meta, dict):
        raise DataError(f"{path}: {META_FILE} is not a JSON object: not a token cache midus-surgery wrote; delete it to re-tokenise")
    if meta.get("format") != FORMAT_VERSION:
        raise DataError(f"{path}: token cache format {meta.get('format')} is not {FORMAT_VERSION}; delete it to re-tokenise")
    # the record says how to read tokens.bin: only what _tokenize_to writes (another dtype reads the bytes as other numbers)
    counts_ok = all(isinstance(meta.get(k), int) and not isinstance(meta.get(k), bool) for k in ("num_tokens", "max_token"))
    if meta.get("dtype") not in ("uint16", "uint32") or not counts_ok or meta["num_tokens"] < 0:
        raise DataError(f"{path}: {META_FILE} does not record tokens as midus-surgery writes them (dtype uint16 or uint32, "
                        "whole-number num_tokens and max_token); delete the directory to re-tokenise")
    if fingerprint is not None and meta.get("tokenizer") != fingerprint:
        if tokenizer is not None and getattr(tokenizer, "backend_tokenizer", None) is None and \
                meta.get("tokenizer") == tokenizer_fingerprint(tokenizer, vocabulary_only=True):
            # the same vocabulary: tokenised by a version that fingerprinted a Python tokenizer by it alone (trial152 F2)
            raise DataError(
                f"{path}: these tokens were made by a midus-surgery before 2026-12-07, which fingerprinted a Python tokenizer "
                "by its vocabulary alone: they may be this tokenizer's, but the settings that change its ids (do_lower_case, "
                "added tokens...) were not recorded, so they are not read; tokenise the text again (give the text files, not "
                "the token cache)")
        raise DataError(
            f"{path}: these tokens were made with a different tokenizer (fingerprint {meta.get('tokenizer')} "
            f"from {meta.get('tokenizer_source', '?')}, this model's is {fingerprint}); "
            "tokenise the text again with this model's tokenizer (give the text files, not the token cache)")
    if vocab_size is not None and meta.get("max_token", -1) >= vocab_size:
        raise DataError(f"{path}: token id {meta['max_token']} lies past the tokenizer's ids (0 to {vocab_size - 1}): not tokens of "
                        "this tokenizer; delete the directory to re-tokenise")
    dtype = np.dtype(meta["dtype"])
    n = int(meta["num_tokens"])
    size = (path / "tokens.bin").stat().st_size if (path / "tokens.bin").exists() else -1
    if size != n * dtype.itemsize:
        raise DataError(f"{path}: tokens.bin has {size} bytes, expected {n * dtype.itemsize}; delete the directory to re-tokenise")
    sums, written = meta.get("sha256"), meta.get("written")
    if not _records_digests(meta):
        # written before the digests were recorded (or with them removed): nothing says its files are as tokenised, and a
        # zeroed tokens.bin was trained on without a word (trial72 N2). A cache entry is tokenised again (_cached).
        raise DataError(f"{path}: {META_FILE} records no SHA-256 of {' and '.join(CACHE_DATA_FILES)} (an entry written before "
                        "midus-surgery recorded them), so nothing shows they are as tokenised; name the text files to "
                        "tokenise them again")
    for name in CACHE_DATA_FILES:
        if isinstance(written, dict) and (path / name).exists() and written.get(name) == written_stamp(path / name):
            continue  # untouched since it was written (same inode, size and modification time): no need to read it all
        if (path / name).exists() and sha256_of(path / name) != sums.get(name):
            # tokens.bin overwritten at the same size (all zeros) was trained on without a word (trial70)
            raise DataError(f"{path}: {name} is not what was tokenised (its SHA-256 is not the one {META_FILE} records): "
                            "changed since; delete the directory to re-tokenise")
    tokens = np.memmap(path / "tokens.bin", dtype=dtype, mode="r", shape=(n,)) if n else np.zeros(0, dtype=dtype)
    if vocab_size is not None and n:
        # the ids themselves, not only the record's max_token: a cache is user input, and one id past the table
        # is an IndexError deep in the model (or, unsampled, a run that ends well). One sequential pass.
        largest = int(tokens.max())
        if largest >= vocab_size:
            raise DataError(f"{path}: tokens.bin holds token id {largest}, past the tokenizer's ids (0 to {vocab_size - 1}; "
                            f"{META_FILE} says at most {meta.get('max_token')}: changed since it was "
                            "tokenised); delete the directory to re-tokenise")
    try:
        # a cache directory is user input: plain numbers only, mapped rather than read (a header claiming 400M starts
        # was read whole into 7 GB, trial70)
        doc_starts = np.load(path / "docs.npy", allow_pickle=False, mmap_mode="r")
    except (OSError, ValueError, EOFError) as exc:
        # numpy's own words advise loading the pickle unsafely: not passed on
        why = "it holds Python objects, which are never unpickled" if "pickle" in str(exc) or "object" in str(exc) else one_line(exc, 120)
        raise DataError(f"{path}: docs.npy is not a readable array of document starts ({why}); delete the "
                        "directory to re-tokenise") from None
    if doc_starts.ndim == 1 and len(doc_starts) > n + 1:
        raise DataError(f"{path}: docs.npy holds {len(doc_starts):,} document starts for {n:,} tokens; delete the directory to re-tokenise")
    if doc_starts.ndim != 1 or doc_starts.dtype.kind not in "iu" or (len(doc_starts) and (
            doc_starts.min() < 0 or doc_starts.max() > n or np.any(np.diff(doc_starts) < 0))):
        raise DataError(f"{path}: docs.npy does not hold ascending document starts within the {n} tokens "
                        f"({doc_starts.dtype}, shape {tuple(doc_starts.shape)}); delete the directory to re-tokenise")
    return TokenStream(path, tokens, doc_starts, meta)


# A document longer than this is tokenised in pieces cut at line ends: a fast tokenizer holds ~180 bytes per character
# while it encodes, so one 50 MB file (one document) took 9.2 GB (trial70). Tokens across a cut may differ from those
# of the document tokenised whole; documents up to this length are tokenised whole, as before.
DOC_PIECE_CHARS = 1_000_000


def _pieces(text: str, limit: int = DOC_PIECE_CHARS) -> Iterator[str]:
    """``text`` in consecutive pieces of at most ``limit`` characters, each cut after a line end where there is one in
    its second half, else after a space, else at the limit."""
    start = 0
    while len(text) - start > limit:
        end = start + limit
        cut = text.rfind("\n", start + limit // 2, end)
        if cut < 0:
            cut = text.rfind(" ", start + limit // 2, end)
        end = cut + 1 if cut >= 0 else end
        yield text[start:end]
        start = end
    yield text[start:]


def _tokenize_to(files: list[Path], tokenizer, text_field: str, dest: Path, progress: bool, desc: str) -> dict:
    from midus_surgery.io.progress import progress_bar

    eos = eos_id(tokenizer)
    dtype = np.uint16 if id_end(tokenizer) <= 2**16 else np.uint32  # by the largest id: a narrower type would wrap it
    total_bytes = sum(f.stat().st_size for f in files)
    n_tokens, n_docs, max_token = 0, 0, -1
    starts: list[int] = []
    batch: list[str] = []
    batch_chars = 0
    nul_chars: dict[str, int] = {}  # file -> NUL characters: valid UTF-8, but binary data or UTF-16 text read as UTF-8

    with naming_the_file(dest / "tokens.bin"), open(dest / "tokens.bin", "wb") as out, progress_bar(total_bytes, desc, enabled=progress, unit="B", unit_scale=True,
                                                                 unit_divisor=1024) as bar:
        def write(ids: list[int]) -> None:
            nonlocal n_tokens, max_token
            if not ids:
                return
            arr = np.asarray(ids, dtype=np.int64)
            max_token = max(max_token, int(arr.max()))
            # the file's own write, not numpy's tofile: a full disk then raises ENOSPC, which the CLI words in one line
            # (tofile reported it as "N requested and M written", no errno: a traceback, trial61)
            out.write(arr.astype(dtype).tobytes())
            n_tokens += arr.shape[0]

        def flush() -> None:
            nonlocal n_docs, batch, batch_chars
            if not batch:
                return
            encoded = tokenizer(batch, add_special_tokens=False)["input_ids"]
            for ids in encoded:
                if not ids:
                    continue
                starts.append(n_tokens)
                write(ids + [eos])
                n_docs += 1
            batch, batch_chars = [], 0

        shown = 0  # bytes of the current file the bar has already counted (a long document's pieces as they go)

        def long_document(text: str) -> None:
            """One document, tokenised piece by piece (DOC_PIECE_CHARS); the bar moves with the pieces (one big file
            showed no progress for minutes, trial70)."""
            nonlocal n_docs, shown
            flush()
            first = n_tokens
            for piece in _pieces(text):
                write(tokenizer(piece, add_special_tokens=False)["input_ids"])
                size = len(piece.encode("utf-8", "surrogatepass"))
                bar.update(size)
                shown += size
            if n_tokens > first:
                starts.append(first)
                write([eos])
                n_docs += 1

        for f in files:
            for text in iter_documents(f, text_field):
                if "\x00" in text:
                    nul_chars[str(f)] = nul_chars.get(str(f), 0) + text.count("\x00")
                if not text.strip():
                    continue
                if len(text) > DOC_PIECE_CHARS:
                    long_document(text)
                    continue
                batch.append(text)
                batch_chars += len(text)
                if batch_chars >= 4_000_000 or len(batch) >= 2048:
                    flush()
            flush()
            bar.update(max(0, f.stat().st_size - shown))
            shown = 0
    with naming_the_file(dest / "docs.npy"):
        np.save(dest / "docs.npy", np.asarray(starts, dtype=np.int64))
    return {"num_tokens": n_tokens, "num_docs": n_docs, "max_token": max_token, "dtype": np.dtype(dtype).name,
            "nul_chars": nul_chars}


def nul_note(*streams: TokenStream) -> str | None:
    """A note naming the files that held NUL characters, which text almost never does: a binary file,
    or UTF-16 text (every other byte 0) read as UTF-8 (trial48). Tokenised as they are."""
    found = {name: count for stream in streams for name, count in (stream.meta.get("nul_chars") or {}).items()}
    if not found:
        return None
    named = ", ".join(f"{name} ({count:,})" for name, count in list(found.items())[:3])
    more = f" and {len(found) - 3} more" if len(found) > 3 else ""
    return (f"NUL characters in {named}{more}: text rarely holds them; is it a binary file, or UTF-16 text? "
            "(tokenised as they are; convert UTF-16 with iconv -f UTF-16 -t UTF-8)")


def find_corpus(entries: list[str], base_dir: Path, tokenizer, *, dir_glob: Iterable[str], text_field: str,
                cache_dir: Path, what: str = "data") -> tuple[list[Path], TokenStream | None, Path | None]:
    """The corpus named by ``entries`` as it stands, writing nothing: (its files, its token stream when
    already tokenised (a tokenised corpus named directly, or the cache's entry for these files and this
    tokenizer) else None, the cache entry it is or would be tokenised into (None: named directly))."""
    files = resolve_inputs(entries, base_dir, dir_glob, what)
    return (files, *_cached(files, tokenizer_fingerprint(tokenizer), id_end(tokenizer), text_field, cache_dir, what, tokenizer))


def _cached(files: list[Path], fingerprint: str, vocab: int, text_field: str, cache_dir: Path,
            what: str, tokenizer=None) -> tuple[TokenStream | None, Path | None]:
    """find_corpus for resolved ``files``: (the stream when tokenised, else None; the cache entry, None when named directly)."""
    tokenised = [f for f in files if f.is_dir()]
    if tokenised:
        if len(files) > 1:
            raise DataError(f"{what}: a tokenised corpus ({tokenised[0]}) must be the only entry")
        return _check_nonempty(open_stream(tokenised[0], fingerprint, vocab, tokenizer=tokenizer), what, files), None
    final = Path(cache_dir) / corpus_key(files, fingerprint, text_field)
    if (final / META_FILE).is_file() and not _unchecked_entry(final):
        return _check_nonempty(open_stream(final, fingerprint, vocab), what, files), final
    return None, final


def _unchecked_entry(entry: Path) -> bool:
    """Whether a cache entry was written before the digests of its files were recorded: it is tokenised again, as
    if absent (once; the new entry replaces it), rather than trusted (trial72 N2)."""
    try:
        meta = loads_checked(read_small_text(entry / META_FILE))
    except (OSError, ValueError):
        return False  # open_stream says what is wrong with it
    return isinstance(meta, dict) and meta.get("format") == FORMAT_VERSION and not _records_digests(meta)


def _retire(entry: Path) -> None:
    """Remove an unchecked cache entry being replaced: moved aside first (a reader never sees it half removed), then
    only the files a cache entry holds are deleted; anything else put there is left in the hidden folder."""
    if entry.is_symlink():  # its files would be another folder's: not an entry this tool wrote
        raise DataError(f"{entry}: a link where the token cache keeps an entry; not written by midus-surgery: remove it to re-tokenise")
    aside = entry.parent / f".{entry.name}.replaced-{uuid.uuid4().hex[:8]}"
    os.replace(entry, aside)
    for name in (*CACHE_DATA_FILES, META_FILE):
        with contextlib.suppress(OSError):
            (aside / name).unlink()
    with contextlib.suppress(OSError):
        aside.rmdir()


def prepare_corpus(entries: list[str], base_dir: Path, tokenizer, *, dir_glob: Iterable[str], text_field: str,
                   cache_dir: Path, progress: bool = True, what: str = "data", tokenizer_source: str = "") -> TokenStream:
    """Tokenise (or find in the cache) the corpus named by ``entries``; return its token stream."""
    files = resolve_inputs(entries, base_dir, dir_glob, what)
    stamps = _stamps(files)  # before the key reads the files' contents
    fingerprint, vocab = tokenizer_fingerprint(tokenizer), id_end(tokenizer)
    stream, final = _cached(files, fingerprint, vocab, text_field, cache_dir, what, tokenizer)
    if stream is not None:
        return stream
    key = final.name

    # a data refusal leaves no empty cache folder behind that was not there before (trial99 L1)
    created = [p for p in (final.parent, *final.parent.parents) if not p.exists()]  # deepest first
    final.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(final)  # a killed tokenisation's hidden .KEY.partial-* (2 bytes a token), once its process is gone
    tmp = final.parent / f".{key}.partial-{uuid.uuid4().hex[:8]}"
    held = None
    tmp_is_ours = True  # until its mkdir fails: then what is at tmp, if anything, is not this run's to remove
    try:
        try:
            tmp.mkdir()  # inside the try: a Ctrl-C just after it removes the partial too
        except OSError:
            tmp_is_ours = False
            raise
        held = hold_directory(tmp)  # live while this process runs (a pid says nothing across containers sharing the cache)
        write_marker(tmp, "tokenise")  # whose partial this is, for the cleaning above
        old = getattr(tokenizer, "model_max_length", None)
        tokenizer.model_max_length = int(1e30)  # whole documents; no "sequence too long" warnings
        try:
            stats = _tokenize_to(files, tokenizer, text_field, tmp, progress, f"tokenise {what}")
        finally:
            if old is not None:
                tokenizer.model_max_length = old
        changed = [f for f, before in zip(files, stamps) if _stamps([f]) != [before]]
        if changed:  # the key is the text before the edit, the tokens partly after: an entry no later run could trust
            raise DataError(f"{what}: {changed[0]} changed while it was tokenised; nothing was cached: run again once the data "
                            "stays as it is")
        meta = {"format": FORMAT_VERSION, "tokenizer": fingerprint, "tokenizer_source": tokenizer_source,
                "vocab_size": vocab, "eos": eos_id(tokenizer), "text_field": text_field,
                "files": [str(f) for f in files], **stats,
                "sha256": {name: sha256_of(tmp / name) for name in CACHE_DATA_FILES},
                "written": {name: written_stamp(tmp / name) for name in CACHE_DATA_FILES}}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        (tmp / MARKER).unlink()  # a finished cache entry is no output of the tool's to replace: only the partial needed an owner
        if final.is_dir() and _unchecked_entry(final):
            _retire(final)
        try:
            os.replace(tmp, final)
        except OSError:  # another process finished first: use theirs
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        if tmp_is_ours:
            shutil.rmtree(tmp, ignore_errors=True)
        remove_empty(created)
        raise
    finally:
        release_marker(held)
    return _check_nonempty(open_stream(final, fingerprint, vocab), what, files)


def _stamps(files: list[Path]) -> list[tuple[int, int]]:
    """(size, modification time) of each file: what an edit during tokenising changes."""
    out = []
    for f in files:
        try:
            st = f.stat()
            out.append((st.st_size, st.st_mtime_ns))
        except OSError:
            out.append((-1, -1))
    return out


def _check_nonempty(stream: TokenStream, what: str, files: list[Path]) -> TokenStream:
    if len(stream) == 0 or stream.meta.get("num_docs", 0) == 0:
        names = ", ".join(str(f) for f in files[:3]) + (" ..." if len(files) > 3 else "")
        raise DataError(f"{what}: the corpus is empty (no text in {names})")
    return stream


# --------------------------------------------------------------------------- blocks and order

def held_out_blocks(n_blocks: int, fraction: float) -> np.ndarray:
    """Indices of held-out blocks, spread evenly: i is held out when floor((i+1)f) > floor(i f)."""
    if fraction <= 0 or n_blocks == 0:
        return np.zeros(0, dtype=np.int64)
    i = np.arange(n_blocks)
    chosen = np.nonzero(np.floor((i + 1) * fraction) > np.floor(i * fraction))[0]
    if chosen.size == 0:
        chosen = np.array([n_blocks - 1])
    return chosen.astype(np.int64)


@dataclass
class BlockSet:
    """Some blocks of a token stream (all of them, or a train/held-out split)."""

    stream: TokenStream
    block_size: int
    indices: np.ndarray  # block numbers in ``stream``

    def __len__(self) -> int:
        return int(self.indices.shape[0])

    def get(self, i: int) -> np.ndarray:
        return self.stream.block(int(self.indices[i]), self.block_size)

    def batch(self, items: Iterable[int]) -> np.ndarray:
        return np.stack([self.get(i) for i in items])


def split(train: TokenStream, held: TokenStream | None, block_size: int, fraction: float, what: str = "data",
          block_option: str = "data.block_size") -> tuple[BlockSet, BlockSet | None]:
    """Train and held-out block sets; errors when the corpus is shorter than one block.
    block_option: how the user sets the block size, for the message (eval's --block-size)."""
    n = train.num_blocks(block_size)
    if n == 0:
        raise DataError(f"{what}: the corpus has {len(train)} tokens, shorter than one block of {block_size} (lower {block_option} or add text)")
    if held is not None:
        m = held.num_blocks(block_size)
        if m == 0:
            raise DataError(f"data.held_out: the held-out text has {len(held)} tokens, shorter than one block of {block_size} "
                            f"(lower {block_option} or add held-out text)")
        return BlockSet(train, block_size, np.arange(n)), BlockSet(held, block_size, np.arange(m))
    out = held_out_blocks(n, fraction)
    keep = np.setdiff1d(np.arange(n), out)
    if keep.size == 0:
        raise DataError(f"{what}: all {n} blocks would be held out; add text or lower data.held_out_fraction")
    return BlockSet(train, block_size, keep), (BlockSet(train, block_size, out) if out.size else None)


class BlockSampler:
    """Global sample number -> training block, a pure function of (seed, number).

    Epoch e = k // n visits the n blocks in ``default_rng([seed, e]).permutation(n)``.
    """

    def __init__(self, blocks: BlockSet, seed: int):
        self.blocks, self.seed = blocks, seed
        self._epoch, self._perm = -1, None

    def block_index(self, k: int) -> int:
        n = len(self.blocks)
        epoch, pos = divmod(k, n)
        if epoch != self._epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(n)
            self._epoch = epoch
        return int(self._perm[pos])

    def micro_batch(self, start: int, rank: int, world: int, micro: int, size: int) -> tuple[np.ndarray, list[int]]:
        """The ``micro``-th micro-batch of ``rank`` in the optimiser step whose first sample is ``start``.

        Sample numbers: start + (micro * world + rank) * size + j, j < size. Returns the tokens
        [size, block_size] and the block numbers (positions in the stream) used.
        """
        first = start + (micro * world + rank) * size
        picks = [self.block_index(first + j) for j in range(size)]
        return self.blocks.batch(picks), [int(self.blocks.indices[p]) for p in picks]


def steps_for(tokens: int, tokens_per_step: int) -> int:
    return max(1, math.ceil(tokens / tokens_per_step))
