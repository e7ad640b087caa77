#!/usr/bin/env python3
"""Fetch real English text corpora from Debian documentation packages.

    python tools/fetch_corpus.py NAME... [--out DIR]
    python tools/fetch_corpus.py --list

For each NAME: ``apt-get download NAME`` into a temporary directory (running ``apt-get update``
once if apt has no package lists), ``dpkg -x`` it, and collect that package's documents into
``OUT/NAME/`` as plain UTF-8 ``.txt`` files, one per source document (gzipped documents are
decompressed; the King James Bible, stored in bible-kjv's own compressed format, is decoded and
written one file per book). ``OUT/NAME/_source.json`` records the package, its version and the
counts. Default OUT: ``work/corpora`` under the repository root.

Idempotent (a finished corpus is left alone; ``--force`` refetches) and atomic per corpus (built
in a temporary sibling directory, then renamed). If a known package is missing from the current
Debian release (e.g. ``python3.11-doc`` after Python moves on), the nearest package that exists
(``apt-cache search``) is used instead, and that is reported. Progress goes to stderr; the table of
character counts to stdout.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from midus_surgery.io.output_dir import OutputError, check_output_dir, replace_directory, write_marker

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "work" / "corpora"
MANIFEST = "_source.json"


class CorpusError(Exception):
    """A failure with a one-line explanation for the user."""


def log(msg: str) -> None:
    print(f"[fetch_corpus] {msg}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Spec:
    """Where a package keeps its documents: directories (glob patterns, relative to the unpacked
    root) searched recursively for files whose names end with one of ``suffixes`` (each also
    accepted with ``.gz``)."""

    description: str
    roots: tuple[str, ...] = ()
    suffixes: tuple[str, ...] = ()
    extractor: str = "files"  # or "bible"


CORPORA: dict[str, Spec] = {
    "python3.11-doc": Spec(
        "Python 3.11 documentation, reST sources (html/_sources/**/*.rst.txt), ~11M chars",
        roots=("usr/share/doc/python3*/html/_sources",),
        suffixes=(".txt",),
    ),
    "bible-kjv-text": Spec(
        "King James Bible, plain prose, one file per book (decoded from bible-kjv's compressed bible.data), ~4.3M chars",
        extractor="bible",
    ),
    "git-doc": Spec(
        "git manuals, AsciiDoc .txt (incl. howto/ and technical/), ~2.9M chars",
        roots=("usr/share/doc/git-doc",),
        suffixes=(".txt",),
    ),
    "linux-doc-6.1": Spec(
        "Linux kernel documentation, reST sources (Documentation/**/*.rst), ~24M chars",
        roots=("usr/share/doc/linux-doc-*/Documentation",),
        suffixes=(".rst",),
    ),
    "perl-doc": Spec(
        "Perl documentation, POD (.pod), ~8.8M chars",
        roots=("usr/share/perl", "usr/share/doc/perl"),
        suffixes=(".pod",),
    ),
}

# Debian's packaging files, never part of a corpus
SKIP_NAMES = {"copyright", "changelog", "changelog.Debian", "NEWS.Debian", "README.Debian"}


# --------------------------------------------------------------------------- text helpers


def decode_text(data: bytes) -> str:
    """Bytes to text: UTF-8 (BOM dropped), else Latin-1; newlines normalised to \\n."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = data.decode("latin-1")
    return text.replace("\r\n", "\n").replace("\r", "\n")


def read_document(path: Path) -> bytes:
    data = path.read_bytes()
    if path.name.endswith(".gz"):
        data = gzip.decompress(data)
    return data


def output_name(rel: str) -> str:
    """Flat .txt name for a document's path relative to its root: ``a/b/c.rst.gz`` -> ``a__b__c.rst.txt``."""
    if rel.endswith(".gz"):
        rel = rel[: -len(".gz")]
    if not rel.endswith(".txt"):
        rel += ".txt"
    return rel.replace("/", "__").replace(os.sep, "__")


def collect_files(unpacked: Path, roots: tuple[str, ...], suffixes: tuple[str, ...]) -> list[tuple[str, str]]:
    """The documents of an unpacked package: (output name, text), sorted by name.

    Walks each directory matching a ``roots`` glob (symlinks are not followed) for regular files
    ending in one of ``suffixes`` or that plus ``.gz``; gzipped ones are decompressed. Empty
    documents and Debian packaging files are skipped.
    """
    found: dict[str, str] = {}
    wanted = tuple(suffixes) + tuple(s + ".gz" for s in suffixes)
    for pattern in roots:
        for root in sorted(unpacked.glob(pattern)):
            if not root.is_dir() or root.is_symlink():
                continue
            for dirpath, dirnames, filenames in os.walk(root):
                dirnames.sort()
                for fn in sorted(filenames):
                    path = Path(dirpath) / fn
                    stem = fn[:-3] if fn.endswith(".gz") else fn
                    if not fn.endswith(wanted) or stem in SKIP_NAMES or path.is_symlink() or not path.is_file():
                        continue
                    try:
                        text = decode_text(read_document(path))
                    except (OSError, EOFError, gzip.BadGzipFile) as e:
                        log(f"skipping unreadable {path.relative_to(unpacked)}: {e}")
                        continue
                    if text.strip():
                        name = output_name(path.relative_to(root).as_posix())
                        found.setdefault(name, text)
    return sorted(found.items())


# --------------------------------------------------------------------------- bible-kjv


def lzw_decompress(data: bytes, maxbits: int = 16, block_mode: bool = True) -> bytes:
    """Decode a Unix ``compress`` (.Z) LZW stream without its 3-byte header.

    Codes are packed LSB first, 9 bits wide growing to ``maxbits``; as in ncompress, codes come in
    groups of eight, so when the width changes (or on a CLEAR code) the reader skips to the end of
    the current group, counted from the point of the last change.
    """
    CLEAR = 256
    n_bits = 9
    maxmaxcode = 1 << maxbits
    maxcode = (1 << n_bits) - 1
    table: list[bytes] = [bytes([i]) for i in range(256)]
    if block_mode:
        table.append(b"")  # code 256 is CLEAR
    total_bits = len(data) * 8
    pos = base = 0
    out = bytearray()
    prev: bytes | None = None
    buf = data + b"\0\0\0"

    def align(pos: int, base: int, n_bits: int) -> int:
        group = n_bits * 8
        return base + -(-(pos - base) // group) * group

    while True:
        if len(table) > maxcode and n_bits < maxbits:
            pos = base = align(pos, base, n_bits)
            n_bits += 1
            maxcode = maxmaxcode if n_bits == maxbits else (1 << n_bits) - 1
        if pos + n_bits > total_bits:
            break
        i = pos >> 3
        code = (int.from_bytes(buf[i : i + 3], "little") >> (pos & 7)) & ((1 << n_bits) - 1)
        pos += n_bits
        if code == CLEAR and block_mode:
            pos = base = align(pos, base, n_bits)
            del table[257:]
            n_bits, maxcode, prev = 9, (1 << 9) - 1, None
            continue
        if code < len(table):
            entry = table[code]
        elif code == len(table) and prev is not None:
            entry = prev + prev[:1]
        else:
            raise ValueError(f"corrupt LZW stream: code {code} with {len(table)} table entries")
        out += entry
        if prev is not None and len(table) < maxmaxcode:
            table.append(prev + entry[:1])
        prev = entry
    return bytes(out)


def decode_bible_data(data: bytes) -> bytes:
    """Decode bible-kjv's ``bible.data`` ("EC02Compressed Data File").

    Layout (big-endian): magic+title padded to 0x54; u32 block size (65536); u32 block count n;
    n+1 u32 file offsets of the blocks. Each block is an independent ``compress`` LZW stream whose
    3-byte .Z header (1f 9d flags) appears once, just before the first block.
    """
    if not data.startswith(b"EC02"):
        raise CorpusError(f"bible.data has magic {data[:4]!r}, expected b'EC02' (format changed?)")
    block_size, n = struct.unpack(">II", data[0x54:0x5C])
    offsets = struct.unpack(f">{n + 1}I", data[0x5C : 0x5C + 4 * (n + 1)])
    flags = data[offsets[0] - 1] if data[offsets[0] - 3 : offsets[0] - 1] == b"\x1f\x9d" else 0x90
    out = bytearray()
    for i in range(n):
        block = lzw_decompress(data[offsets[i] : offsets[i + 1]], maxbits=flags & 0x1F, block_mode=bool(flags & 0x80))
        if len(block) > block_size or (i < n - 1 and len(block) != block_size):
            raise CorpusError(f"bible.data block {i} decoded to {len(block)} bytes, expected {block_size}")
        out += block
    return bytes(out)


VERSE = re.compile(r"^([1-3]?[A-Za-z]+)(\d+):(\d+) (.*)$")


def split_bible(text: str) -> list[tuple[str, str]]:
    """``Ge1:1 In the beginning ...`` lines -> one prose file per book, verse references removed,
    one verse per line, a blank line between chapters. Names ``NN-Book.txt`` in canonical order."""
    books: dict[str, list[str]] = {}
    last_chapter: dict[str, str] = {}
    for line in text.splitlines():
        m = VERSE.match(line)
        if not m:
            continue  # the title line
        book, chapter, _verse, body = m.groups()
        lines = books.setdefault(book, [])
        if book in last_chapter and last_chapter[book] != chapter:
            lines.append("")
        last_chapter[book] = chapter
        lines.append(body.strip())
    return [(f"{i:02d}-{book}.txt", "\n".join(lines) + "\n") for i, (book, lines) in enumerate(books.items(), 1)]


def collect_bible(unpacked: Path) -> list[tuple[str, str]]:
    hits = sorted(unpacked.glob("**/bible.data"))
    if not hits:
        raise CorpusError("no bible.data in the bible-kjv-text package (layout changed?)")
    text = decode_text(decode_bible_data(hits[0].read_bytes()))
    books = split_bible(text)
    if len(books) != 66:
        raise CorpusError(f"decoded bible.data into {len(books)} books, expected 66")
    return books


# --------------------------------------------------------------------------- apt


def _apt_opts() -> list[str]:
    # as root, apt drops to the _apt user to download, which cannot write into a private temp dir
    return ["-o", "APT::Sandbox::User=root"] if hasattr(os, "geteuid") and os.geteuid() == 0 else []


def _run(cmd: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    except FileNotFoundError as e:
        raise CorpusError(f"{cmd[0]} not found: this tool needs a Debian-like system with apt and dpkg") from e


def _last_error(proc: subprocess.CompletedProcess) -> str:
    lines = [l.strip() for l in (proc.stderr + "\n" + proc.stdout).splitlines() if l.strip()]
    errs = [l for l in lines if l.startswith(("E:", "Err:"))] or lines
    return " | ".join(errs[-2:]) or f"exit {proc.returncode}"


def package_exists(name: str) -> bool:
    proc = _run(["apt-cache", "show", name])
    return proc.returncode == 0 and "Package:" in proc.stdout


def nearest_package(name: str, candidates: list[str]) -> str | None:
    """The candidate closest to ``name``: same name with its version numbers varied
    (``python3.11-doc`` -> ``python3.13-doc``, ``linux-doc-6.1`` -> ``linux-doc-6.12``), the
    highest version winning; None if none has that shape."""
    parts = re.split(r"\d+(?:\.\d+)*", name)
    if len(parts) < 2:
        return None
    shape = re.compile(r"\d+(?:\.\d+)*".join(re.escape(p) for p in parts) + r"\Z")
    matches = [c for c in candidates if c != name and shape.match(c)]

    def version_key(pkg: str) -> list[int]:
        return [int(x) for x in re.findall(r"\d+", pkg)]

    return max(matches, key=version_key) if matches else None


def search_nearest(name: str) -> str | None:
    stem = re.split(r"\d", name, maxsplit=1)[0].rstrip("-.") or name
    proc = _run(["apt-cache", "search", "--names-only", f"^{re.escape(stem)}"])
    candidates = [line.split(" - ", 1)[0].strip() for line in proc.stdout.splitlines() if line.strip()]
    return nearest_package(name, candidates)


class Apt:
    def __init__(self) -> None:
        self.updated = False

    def update(self) -> None:
        if self.updated:
            return
        log("apt-get update")
        proc = _run(["apt-get", *_apt_opts(), "update"])
        self.updated = True
        if proc.returncode != 0:
            raise CorpusError(f"apt-get update failed (network or mirror problem? needs root): {_last_error(proc)}")

    def download(self, name: str, dest: Path) -> tuple[str, Path]:
        """Download ``name`` (or the nearest existing package) into ``dest``: (package, .deb)."""
        proc = _run(["apt-get", *_apt_opts(), "download", name], cwd=dest)
        if proc.returncode != 0 and not self.updated:
            log(f"apt-get download {name} failed ({_last_error(proc)}); updating the package lists once")
            self.update()
            proc = _run(["apt-get", *_apt_opts(), "download", name], cwd=dest)
        if proc.returncode != 0:
            if not package_exists(name):
                alt = search_nearest(name)
                if alt is None:
                    raise CorpusError(f"package {name} does not exist in this Debian release and no similarly named one does")
                log(f"package {name} does not exist in this Debian release; using the nearest, {alt}")
                return self.download(alt, dest)
            raise CorpusError(f"apt-get download {name} failed (network or mirror problem?): {_last_error(proc)}")
        debs = sorted(dest.glob("*.deb"))
        if not debs:
            raise CorpusError(f"apt-get download {name} succeeded but left no .deb in {dest}")
        return name, debs[-1]


def deb_version(deb: Path) -> str:
    proc = _run(["dpkg-deb", "-f", str(deb), "Version"])
    return proc.stdout.strip()


# --------------------------------------------------------------------------- main logic


def corpus_stats(directory: Path) -> tuple[int, int]:
    """(documents, characters) of a finished corpus, from its manifest or by reading it."""
    try:
        m = json.loads((directory / MANIFEST).read_text())
        return int(m["documents"]), int(m["chars"])
    except (OSError, ValueError, KeyError):
        files = sorted(directory.glob("*.txt"))
        return len(files), sum(len(f.read_text(encoding="utf-8")) for f in files)


def is_complete(directory: Path) -> bool:
    """A corpus directory is finished when its manifest is there (written last, before the rename)."""
    return (directory / MANIFEST).is_file()


def fetch(name: str, out: Path, apt: Apt, force: bool = False) -> dict:
    spec = CORPORA.get(name)
    if spec is None:
        raise CorpusError(f"unknown corpus {name!r}; known: {', '.join(CORPORA)} (see --list)")
    target = out / name
    if target.exists() and not force and is_complete(target):
        docs, chars = corpus_stats(target)
        log(f"{name}: already present in {target}")
        return {"name": name, "documents": docs, "chars": chars, "cached": True}
    try:  # first: a folder this tool did not write is never replaced, and says so (--force would not help)
        check_output_dir(target, kind="fetch_corpus", overwrite=True, flag="--force")
    except OutputError as exc:
        raise CorpusError(str(exc)) from None
    if target.exists() and not force and any(target.iterdir()):
        raise CorpusError(f"{target} exists but is incomplete (no {MANIFEST}); pass --force to fetch it again")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a folder under a file, /proc, a read-only disk
        raise CorpusError(f"cannot write {out}: {exc.strerror or exc}") from None
    with tempfile.TemporaryDirectory(prefix=f"fetch_corpus-{name}-") as work:
        work = Path(work)
        dl = work / "deb"
        dl.mkdir()
        log(f"{name}: apt-get download")
        package, deb = apt.download(name, dl)
        version = deb_version(deb)
        unpacked = work / "root"
        proc = _run(["dpkg", "-x", str(deb), str(unpacked)])
        if proc.returncode != 0:
            raise CorpusError(f"dpkg -x {deb.name} failed: {_last_error(proc)}")
        log(f"{name}: unpacked {package} {version}, collecting documents")
        docs = collect_bible(unpacked) if spec.extractor == "bible" else collect_files(unpacked, spec.roots, spec.suffixes)
        if not docs:
            raise CorpusError(f"{package} {version} holds no documents under {', '.join(spec.roots)} ending in {', '.join(spec.suffixes)} (layout changed?)")

        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=out))
        try:
            for doc_name, text in docs:
                (tmp / doc_name).write_text(text, encoding="utf-8")
            chars = sum(len(t) for _, t in docs)
            manifest = {
                "name": name, "package": package, "version": version, "description": spec.description,
                "documents": len(docs), "chars": chars,
            }
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
            tmp.chmod(0o755)
            write_marker(tmp, "fetch_corpus")
            replace_directory(tmp, target, kind="fetch_corpus")  # checked before any work (only --force, only ours), and again now
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    log(f"{name}: wrote {len(docs)} documents, {chars:,} chars to {target}")
    return {"name": name, "package": package, "version": version, "documents": len(docs), "chars": chars, "cached": False}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("names", nargs="*", metavar="NAME", help="corpora to fetch (see --list)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT.relative_to(REPO_ROOT)})")
    ap.add_argument("--list", action="store_true", help="show the known corpora and exit")
    ap.add_argument("--force", action="store_true", help="refetch even if a corpus is already present")
    args = ap.parse_args(argv)

    if args.list:
        width = max(map(len, CORPORA))
        for name, spec in CORPORA.items():
            print(f"{name:{width}}  {spec.description}")
        return 0
    if not args.names:
        ap.error("give at least one NAME (or --list)")
    unknown = [n for n in args.names if n not in CORPORA]
    if unknown:
        print(f"fetch_corpus: error: unknown corpus {', '.join(unknown)}; known: {', '.join(CORPORA)}", file=sys.stderr)
        return 2

    apt, results, failed = Apt(), [], []
    for name in dict.fromkeys(args.names):
        try:
            results.append(fetch(name, args.out.absolute(), apt, force=args.force))
        except CorpusError as e:
            print(f"fetch_corpus: error: {name}: {e}", file=sys.stderr)
            failed.append(name)
    if results:
        width = max(len(r["name"]) for r in results)
        for r in results:
            note = " (already present)" if r["cached"] else ""
            if r.get("package") not in (None, r["name"]):
                note += f" (from {r['package']})"
            print(f"{r['name']:{width}}  {r['documents']:6d} docs  {r['chars']:12,d} chars{note}")
        if len(results) > 1:
            print(f"{'total':{width}}  {sum(r['documents'] for r in results):6d} docs  {sum(r['chars'] for r in results):12,d} chars")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
