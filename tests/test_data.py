"""Data: inputs, tokenisation cache, block order, held-out split, and the errors bad data gives."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from train_fixtures.tiny import make_tokenizer, write_corpus

from midus_surgery.io.file_digest import sha256_of
from midus_surgery.train import data as D


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def prep(entries, tmp_path, tok, **kw):
    return D.prepare_corpus([str(e) for e in entries], tmp_path, tok, dir_glob=kw.pop("dir_glob", ["**/*.txt", "**/*.jsonl"]),
                            text_field=kw.pop("text_field", "text"), cache_dir=tmp_path / "cache", progress=False, **kw)


def test_inputs_files_dirs_globs(tmp_path):
    files = write_corpus(tmp_path / "c", files=3, sentences_per_file=2)
    (tmp_path / "c" / "sub").mkdir()
    (tmp_path / "c" / "sub" / "more.txt").write_text("the cat sat .")
    (tmp_path / "c" / "skip.bin").write_bytes(b"\0")
    got = D.resolve_inputs(["c"], tmp_path, ["**/*.txt"])
    assert got == sorted(got) and len(got) == 4 and all(p.suffix == ".txt" for p in got)
    assert D.resolve_inputs(["c/doc*.txt", str(files[0])], tmp_path, ["**/*.txt"]) == [f.resolve() for f in files]
    with pytest.raises(D.DataError, match="does not exist"):
        D.resolve_inputs(["nope.txt"], tmp_path, ["*.txt"])
    with pytest.raises(D.DataError, match="/dev/null is not a regular file or a folder"):  # trial33: "does not exist"
        D.resolve_inputs(["/dev/null"], tmp_path, ["*.txt"])
    with pytest.raises(D.DataError, match="matches no files"):
        D.resolve_inputs(["c/*.md"], tmp_path, ["*.txt"])
    with pytest.raises(D.DataError) as only_folders:  # a pattern is not searched inside the folders it matches
        D.resolve_inputs(["c/su*"], tmp_path, ["*.txt"])
    assert str(only_folders.value) == (f"data: the pattern 'c/su*' matches 1 folder ({tmp_path / 'c' / 'sub'}) and no files; name a folder "
                                       "to read its files matching ['*.txt'], or end the pattern in file names (e.g. c/su*/*.txt)")


def test_tokenise_packs_with_eos_and_caches(tmp_path, tok, monkeypatch):
    (tmp_path / "a.txt").write_text("the cat sat .")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "the dog ran", "id": 1}) + "\n\n" + json.dumps({"text": "a fish"}) + "\n")
    s = prep([tmp_path / "a.txt", tmp_path / "b.jsonl"], tmp_path, tok)
    eos = tok.eos_token_id
    expected = tok("the cat sat .")["input_ids"] + [eos] + tok("the dog ran")["input_ids"] + [eos] + tok("a fish")["input_ids"] + [eos]
    assert s.tokens.tolist() == expected
    assert isinstance(s.tokens, np.memmap) and s.tokens.dtype == np.uint16
    assert s.doc_starts.tolist() == [0, 5, 9]
    assert [d.tolist() for d in s.documents()][1] == tok("the dog ran")["input_ids"] + [eos]

    # Second run: straight from the cache, no tokenising.
    monkeypatch.setattr(D, "_tokenize_to", lambda *a, **k: pytest.fail("re-tokenised a cached corpus"))
    again = prep([tmp_path / "a.txt", tmp_path / "b.jsonl"], tmp_path, tok)
    assert again.path == s.path and again.tokens.tolist() == expected
    # Changed content: a new cache entry.
    monkeypatch.undo()
    (tmp_path / "a.txt").write_text("the cat ran .")
    assert prep([tmp_path / "a.txt", tmp_path / "b.jsonl"], tmp_path, tok).path != s.path


def test_nul_characters_are_counted_per_file_and_noted(tmp_path, tok):
    """A file with NUL characters (UTF-16 text read as UTF-8, or a binary file) is tokenised as it is,
    and the note names it and counts them, in a plain file and in a JSONL record (trial48)."""
    (tmp_path / "clean.txt").write_text("the cat sat .")
    assert D.nul_note(prep([tmp_path / "clean.txt"], tmp_path, tok)) is None
    (tmp_path / "wide.txt").write_bytes("the cat".encode("utf-16-le"))
    (tmp_path / "rec.jsonl").write_text(json.dumps({"text": "a\u0000b\u0000"}) + "\n")
    stream = prep([tmp_path / "clean.txt", tmp_path / "wide.txt", tmp_path / "rec.jsonl"], tmp_path, tok)
    assert stream.meta["nul_chars"] == {str(tmp_path / "wide.txt"): 7, str(tmp_path / "rec.jsonl"): 2}
    note = D.nul_note(stream)
    assert note.startswith(f"NUL characters in {tmp_path / 'wide.txt'} (7), {tmp_path / 'rec.jsonl'} (2): text rarely holds them"), note


def test_a_folder_reads_ndjson_records_by_default(tmp_path, tok):
    """.ndjson is read as JSON records like .jsonl; the default folder patterns (DIR_GLOB) take it,
    and the docs said .json-lines, a suffix that is read as plain text."""
    from midus_surgery.train.config import DIR_GLOB

    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a.ndjson").write_text(json.dumps({"text": "the dog ran"}) + "\n")
    s = prep([tmp_path / "c"], tmp_path, tok, dir_glob=DIR_GLOB)
    assert s.tokens.tolist() == tok("the dog ran")["input_ids"] + [tok.eos_token_id]
    assert "**/*.ndjson" in DIR_GLOB and not any("json-lines" in pattern for pattern in DIR_GLOB)


def test_bad_data_errors(tmp_path, tok):
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(D.DataError, match="corpus is empty"):
        prep([tmp_path / "empty.txt"], tmp_path, tok)
    (tmp_path / "r.jsonl").write_text(json.dumps({"text": "the cat"}) + "\n" + json.dumps({"body": "x"}) + "\n")
    with pytest.raises(D.DataError, match=r"r\.jsonl:2: the record has no 'text' field \(it has: \['body'\]\)"):
        prep([tmp_path / "r.jsonl"], tmp_path, tok)
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(D.DataError, match=r"bad\.jsonl:1: not a JSON record \(Expecting property name enclosed in double quotes at column 2\)$"):
        prep([tmp_path / "bad.jsonl"], tmp_path, tok)
    # trial48: a lone UTF-16 surrogate (half an emoji, as JS exports write it) parsed as JSON and crashed the tokenizer
    (tmp_path / "half.jsonl").write_text(json.dumps({"text": "the cat"}) + "\n" + '{"text": "the \\ud83d cat"}\n')
    with pytest.raises(D.DataError, match=r"half\.jsonl:2: field 'text' holds a lone UTF-16 surrogate \('\\ud83d' at character 4\)"):
        prep([tmp_path / "half.jsonl"], tmp_path, tok)
    # trial48: bytes that are not UTF-8 are named by their line and their offset in the file, not in a decoder's buffer
    lines = [json.dumps({"text": f"the cat {i}"}).encode() + b"\n" for i in range(3000)]
    lines[2500] = b'{"text": "caf\xe9"}\n'
    (tmp_path / "latin.jsonl").write_bytes(b"".join(lines))
    at = sum(map(len, lines[:2500])) + lines[2500].index(b"\xe9")
    with pytest.raises(D.DataError, match=rf"latin\.jsonl:2501: not UTF-8 text \(invalid continuation byte at byte {at} of the file\)"):
        prep([tmp_path / "latin.jsonl"], tmp_path, tok)
    for value, kind in ((5, "a number"), (None, "null"), (["the"], "a list")):  # JSON's words, not Python's ('a NoneType')
        (tmp_path / "kinds.jsonl").write_text(json.dumps({"text": value}) + "\n")
        with pytest.raises(D.DataError, match=rf"kinds\.jsonl:1: field 'text' is {kind}, not text"):
            prep([tmp_path / "kinds.jsonl"], tmp_path, tok)
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + json.dumps({"text": "the cat"}).encode() + b"\n")  # a Windows editor's mark
    assert prep([tmp_path / "bom.jsonl"], tmp_path, tok).tokens.tolist() == tok("the cat")["input_ids"] + [tok.eos_token_id]
    (tmp_path / "short.txt").write_text("the cat sat .")
    s = prep([tmp_path / "short.txt"], tmp_path, tok)
    with pytest.raises(D.DataError, match="shorter than one block of 64"):
        D.split(s, None, 64, 0.1)
    (tmp_path / "long.txt").write_text("the cat sat . " * 40)
    long_enough = prep([tmp_path / "long.txt"], tmp_path, tok)  # the key and the way out, as for the training text
    with pytest.raises(D.DataError, match=r"^data\.held_out: the held-out text has \d+ tokens, shorter than one block of 64 "
                                          r"\(lower data\.block_size or add held-out text\)$"):
        D.split(long_enough, s, 64, 0.1)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(D.DataError, match="not UTF-8"):
        prep([tmp_path / "latin1.txt"], tmp_path, tok)


def test_cached_shard_from_another_tokenizer_is_refused(tmp_path, tok):
    write_corpus(tmp_path / "c", files=1, sentences_per_file=3)
    s = prep([tmp_path / "c"], tmp_path, tok)
    other = make_tokenizer()
    other.add_tokens(["zebra"])
    with pytest.raises(D.DataError, match="made with a different tokenizer"):
        prep([s.path], tmp_path, other)
    assert len(prep([s.path], tmp_path, tok)) == len(s)  # a token cache given directly, same tokenizer: fine


def test_held_out_split_is_spread_and_disjoint(tmp_path, tok):
    held = D.held_out_blocks(100, 0.1)
    assert held.tolist() == list(range(9, 100, 10))
    assert D.held_out_blocks(5, 0.01).tolist() == [4]  # at least one block when asked for
    assert D.held_out_blocks(5, 0.0).size == 0
    write_corpus(tmp_path / "c", files=2, sentences_per_file=40)
    s = prep([tmp_path / "c"], tmp_path, tok)
    train, out = D.split(s, None, 16, 0.1)
    assert len(train) + len(out) == s.num_blocks(16)
    assert not set(train.indices.tolist()) & set(out.indices.tolist())


def test_block_order_is_a_function_of_the_seed(tmp_path, tok):
    write_corpus(tmp_path / "c", files=2, sentences_per_file=40)
    train, _ = D.split(prep([tmp_path / "c"], tmp_path, tok), None, 16, 0.0)
    n = len(train)
    a, b, c = D.BlockSampler(train, 1), D.BlockSampler(train, 1), D.BlockSampler(train, 2)
    seq_a = [a.block_index(k) for k in range(3 * n)]
    assert seq_a == [b.block_index(k) for k in range(3 * n)]
    assert seq_a != [c.block_index(k) for k in range(3 * n)]
    for e in range(3):  # every epoch visits every block once, in a new order
        assert sorted(seq_a[e * n:(e + 1) * n]) == list(range(n))
    assert seq_a[:n] != seq_a[n:2 * n]
    # Random access (what a resumed run does) gives the same blocks as reading in order.
    fresh = D.BlockSampler(train, 1)
    assert [fresh.block_index(k) for k in (2 * n + 3, 5, n + 1)] == [seq_a[2 * n + 3], seq_a[5], seq_a[n + 1]]


@settings(max_examples=40, deadline=None)
@given(world=st.integers(1, 4), accum=st.integers(1, 3), size=st.integers(1, 3), start=st.integers(0, 50))
def test_one_step_reads_each_sample_once_across_ranks(world, accum, size, start):
    class Numbers:  # block i of the stream is "sample i", so micro_batch reports the sample numbers it used
        indices = np.arange(1000)

        def __len__(self):
            return 1000

        def batch(self, items):
            return np.array(items)

    class Identity(D.BlockSampler):
        def block_index(self, k):
            return k

    sampler = Identity(Numbers(), 0)
    seen = []
    for rank in range(world):
        for micro in range(accum):
            seen.extend(sampler.micro_batch(start, rank, world, micro, size)[1])
    # One optimiser step consumes the next world*accum*size samples, each exactly once, and the
    # next step (start + world*accum*size) continues right after: no replay, no gap.
    assert sorted(seen) == list(range(start, start + world * accum * size))


def test_a_killed_tokenisations_partial_is_removed_once_its_process_is_gone(tmp_path, tok):
    """SIGKILL while tokenising left a hidden .KEY.partial-* in the cache forever (2 bytes a token)."""
    import socket
    import subprocess
    import sys

    from midus_surgery.io.output_dir import MARKER

    files = write_corpus(tmp_path / "c", files=2, sentences_per_file=3)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    cache = tmp_path / "cache"
    leftovers = {}
    for name, pid in (("gone", int(dead)), ("alive", __import__("os").getpid())):
        partial = cache / f".{name}.partial-0123abcd"
        partial.mkdir(parents=True)
        (partial / "tokens.bin").write_bytes(b"\0" * 64)
        (partial / MARKER).write_text(json.dumps({"tool": "midus-surgery", "kind": "tokenise", "owner": None, "pid": pid,
                                                  "host": socket.gethostname(), "time": 0}))
        leftovers[name] = partial
    stream = prep(files, tmp_path, tok)
    assert not leftovers["gone"].exists() and leftovers["alive"].exists()  # a live run's partial is its own
    assert not (stream.path / MARKER).exists()  # the finished entry is a cache entry, not an output of the tool's


def test_a_tokenizer_whose_ids_run_past_its_size_is_cached_whole(tmp_path):
    """trial41: a tokenizer giving "cat" the id 999 among 33 tokens was refused with "does not fit the model's
    vocabulary of 33" (its own size, not the model's). Its ids are bounded by the largest one, not by the count,
    and stored in a type wide enough for it (the count alone picked uint16 for ids a uint16 wraps)."""
    from transformers import PreTrainedTokenizerFast

    base = make_tokenizer()
    base.save_pretrained(tmp_path / "tok")
    data = json.loads((tmp_path / "tok" / "tokenizer.json").read_text())
    data["model"]["vocab"]["cat"] = 70_000  # past uint16
    (tmp_path / "tok" / "tokenizer.json").write_text(json.dumps(data))
    wide = PreTrainedTokenizerFast.from_pretrained(tmp_path / "tok")
    assert len(wide) < 2**16 and D.id_end(wide) == 70_001
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a.txt").write_text("the cat sat on the mat\n")
    s = prep([tmp_path / "c"], tmp_path, wide)
    assert s.tokens.dtype == np.uint32 and 70_000 in set(int(t) for t in s.tokens)


def test_a_token_cache_changed_after_tokenising_is_one_line_not_a_crash(tmp_path, tok):
    """trial33: an id past the vocabulary in tokens.bin (its record untouched) was an IndexError in the model,
    or, never sampled, a run that ended well; an object array in docs.npy a ValueError traceback."""
    import numpy as np

    write_corpus(tmp_path / "c", files=1, sentences_per_file=5)
    s = prep([tmp_path / "c"], tmp_path, tok)
    cache = tmp_path / "edited"
    shutil.copytree(s.path, cache)
    tokens = np.fromfile(cache / "tokens.bin", dtype=s.tokens.dtype)
    tokens[3] = len(tok) + 5
    tokens.tofile(cache / "tokens.bin")
    with pytest.raises(D.DataError, match=r"tokens.bin is not what was tokenised \(its SHA-256 is not the one midus_tokens.json records\)"):
        prep([cache], tmp_path, tok)
    np.zeros_like(tokens).tofile(cache / "tokens.bin")  # the same size, every id valid: trained on without a word (trial70)
    with pytest.raises(D.DataError, match=r"tokens.bin is not what was tokenised"):
        prep([cache], tmp_path, tok)
    # the checks behind the digests, for an entry rewritten with digests that agree (a consistent forgery, trial72)
    tokens.tofile(cache / "tokens.bin")
    with pytest.raises(D.DataError, match=rf"tokens.bin holds token id {len(tok) + 5}, past the tokenizer's ids \(0 to {len(tok) - 1}; .* delete the directory"):
        prep([reseal(cache)], tmp_path, tok)
    shutil.copy2(s.path / "tokens.bin", cache / "tokens.bin")
    assert len(prep([reseal(cache)], tmp_path, tok)) == len(s)
    np.save(cache / "docs.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(D.DataError) as pickled:
        prep([reseal(cache)], tmp_path, tok)
    # in the tool's words: numpy's advice to load the file unsafely is not passed on (trial70)
    assert "docs.npy is not a readable array of document starts (it holds Python objects, which are never unpickled)" in str(pickled.value)
    assert "allow_pickle" not in str(pickled.value)
    np.save(cache / "docs.npy", np.arange(len(s) + 5))  # more document starts than tokens: refused before it is read whole
    with pytest.raises(D.DataError, match=f"docs.npy holds {len(s) + 5:,} document starts for {len(s):,} tokens"):
        prep([reseal(cache)], tmp_path, tok)
    np.save(cache / "docs.npy", np.array([0.5, 2.0]))
    with pytest.raises(D.DataError, match="docs.npy does not hold ascending document starts"):
        prep([reseal(cache)], tmp_path, tok)
    for name in ("docs.npy", "tokens.bin"):  # a named pipe: np.load waited forever for a writer (trial70)
        (cache / name).unlink()
        os.mkfifo(cache / name)
        with pytest.raises(D.DataError, match=f"{name} is a named pipe, not a regular file; not a token cache midus-surgery wrote"):
            prep([cache], tmp_path, tok)
        (cache / name).unlink()
        shutil.copy2(s.path / name, cache / name)


def reseal(cache):
    """Record the digests of a cache entry's files as they now are, as a consistent rewrite would."""
    meta = json.loads((cache / D.META_FILE).read_text())
    meta["sha256"] = {name: sha256_of(cache / name) for name in D.CACHE_DATA_FILES}
    meta.pop("written", None)
    (cache / D.META_FILE).write_text(json.dumps(meta))
    return cache


def test_a_cache_entry_without_digests_is_tokenised_again_not_trusted(tmp_path, tok):
    """trial72 N2: an entry written before the digests were recorded was read as before: its tokens.bin zeroed (the same
    size, every id valid) was trained on without a word. In the cache it is now tokenised again, once, and replaced (only
    its own files removed); named directly it is refused, saying to name the text."""
    write_corpus(tmp_path / "c", files=1, sentences_per_file=5)
    s = prep([tmp_path / "c"], tmp_path, tok)
    honest = np.array(s.tokens).copy()
    meta = json.loads((s.path / D.META_FILE).read_text())
    (s.path / D.META_FILE).write_text(json.dumps({k: v for k, v in meta.items() if k not in ("sha256", "written")}))
    np.zeros_like(honest).tofile(s.path / "tokens.bin")
    named = tmp_path / "named"
    shutil.copytree(s.path, named)
    with pytest.raises(D.DataError, match=r"named: midus_tokens.json records no SHA-256 of tokens.bin and docs.npy .* name the text files"):
        prep([named], tmp_path, tok)
    files, stream, entry = D.find_corpus([str(tmp_path / "c")], tmp_path, tok, dir_glob=["**/*.txt"], text_field="text",
                                         cache_dir=tmp_path / "cache")
    assert stream is None and entry == s.path  # a dry run says it will tokenise
    again = prep([tmp_path / "c"], tmp_path, tok)
    assert again.path == s.path and np.array_equal(np.array(again.tokens), honest)
    assert D._records_digests(json.loads((s.path / D.META_FILE).read_text()))
    assert not [p.name for p in (tmp_path / "cache").iterdir() if p.name != s.path.name]  # nothing left aside


def test_the_same_bytes_read_as_text_and_as_jsonl_are_different_cache_entries(tmp_path, tok):
    """b.json (read as one document, braces and all) renamed to b.jsonl (one document per record) kept its tokens: the
    cache key covered the files' bytes, not how they are read (trial70)."""
    records = "".join(json.dumps({"text": t}) + "\n" for t in ("the cat sat .", "a fish"))
    (tmp_path / "b.json").write_text(records)
    as_text = prep([tmp_path / "b.json"], tmp_path, tok)
    (tmp_path / "b.json").rename(tmp_path / "b.jsonl")
    as_records = prep([tmp_path / "b.jsonl"], tmp_path, tok)
    assert as_records.path != as_text.path
    assert as_records.doc_starts.tolist() == [0, len(tok("the cat sat .")["input_ids"]) + 1]


def test_a_jsonl_record_nested_past_the_json_reader_is_one_line(tmp_path, tok):
    (tmp_path / "deep.jsonl").write_text('{"x": ' + "[" * 200_000 + "]" * 200_000 + ', "text": "a"}\n')
    with pytest.raises(D.DataError, match=r"deep.jsonl:1: a JSON record nested deeper than the JSON reader goes"):
        prep([tmp_path / "deep.jsonl"], tmp_path, tok)


def test_a_jsonl_record_with_an_integer_past_pythons_digit_limit_is_one_line(tmp_path, tok):
    """trial99 C2: an integer of 5,000 digits beside the text was Python's bare ValueError: a traceback in train,
    "unexpected error" in eval, where every other bad record is a data error at its file:line."""
    (tmp_path / "big.jsonl").write_text('{"text": "the cat sat ."}\n{"text": "the dog ran .", "id": ' + "9" * 5000 + "}\n")
    with pytest.raises(D.DataError, match=r"big.jsonl:2: the record holds an integer of more than 4,300 digits, .*write it as a string"):
        prep([tmp_path / "big.jsonl"], tmp_path, tok)


@pytest.mark.parametrize("edit", [lambda m: [m], lambda m: {**m, "dtype": "uint8"}, lambda m: {**m, "dtype": "float16"},
                                  lambda m: {k: v for k, v in m.items() if k != "dtype"}, lambda m: {**m, "num_tokens": "many"},
                                  lambda m: {**m, "max_token": None}],
                         ids=["list", "uint8", "float16", "no-dtype", "num_tokens-text", "max_token-null"])
def test_a_token_cache_whose_record_is_not_as_written_is_one_line(tmp_path, tok, edit):
    """trial44: another dtype in midus_tokens.json read tokens.bin as other numbers (trained on them, exit 0); a record
    that is a list, or lacks dtype, or counts in text, was a traceback."""
    write_corpus(tmp_path / "c", files=1, sentences_per_file=5)
    s = prep([tmp_path / "c"], tmp_path, tok)
    cache = tmp_path / "edited"
    shutil.copytree(s.path, cache)
    meta = json.loads((cache / D.META_FILE).read_text())
    (cache / D.META_FILE).write_text(json.dumps(edit(meta)))
    with pytest.raises(D.DataError, match="not a JSON object|does not record tokens as midus-surgery writes them"):
        prep([cache], tmp_path, tok)


def test_a_recursive_pattern_over_a_linked_loop_ends(tmp_path):
    """eval --data "DIR/**/*.txt" hung: Python's recursive glob follows a linked folder that leads back up forever (trial73
    F6). A pattern with ** is walked as a folder is, each real folder once."""
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "a.txt").write_text("x")
    (tmp_path / "d" / "sub" / "b.txt").write_text("y")
    os.symlink(tmp_path / "d", tmp_path / "d" / "sub" / "loop")
    got = D.resolve_inputs(["d/**/*.txt"], tmp_path, ["**/*.txt"])
    assert got == [tmp_path / "d" / "a.txt", tmp_path / "d" / "sub" / "b.txt"]
    assert D.resolve_inputs([str(tmp_path / "d" / "*.txt")], tmp_path, ["**/*.txt"]) == [tmp_path / "d" / "a.txt"]


def test_a_folder_of_data_skips_hidden_files_and_folders(tmp_path, tok):
    """trial44: a .secret.txt (and files under .git/) in a data folder were trained on; a shell glob skips them."""
    write_corpus(tmp_path / "c", files=1, sentences_per_file=3)
    (tmp_path / "c" / ".secret.txt").write_text("do not train on this\n")
    (tmp_path / "c" / ".git").mkdir()
    (tmp_path / "c" / ".git" / "notes.txt").write_text("nor this\n")
    files = D.resolve_inputs(["c"], tmp_path, ["**/*.txt"])
    assert len(files) == 1 and not any(".secret" in str(f) or ".git" in f.parts for f in files), files


def test_a_folder_of_data_follows_linked_folders_once_and_refuses_broken_links(tmp_path):
    """trial48: a linked subfolder of a data folder was skipped without a word, and so were a broken link
    and a link loop that the same link named directly refused."""
    (tmp_path / "c" / "sub").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    for path in (tmp_path / "c" / "a.txt", tmp_path / "c" / "sub" / "b.md", tmp_path / "elsewhere" / "e.txt"):
        path.write_text("the cat\n")
    (tmp_path / "c" / "more").symlink_to(tmp_path / "elsewhere")  # a linked folder: read
    (tmp_path / "c" / "sub" / "up").symlink_to(tmp_path / "c")  # a link back up: each real folder once, no loop
    (tmp_path / "c" / "notes.pdf").write_text("not matched")
    files = D.resolve_inputs(["c"], tmp_path, ["**/*.txt", "**/*.md"])
    assert [f.relative_to(tmp_path).as_posix() for f in files] == ["c/a.txt", "elsewhere/e.txt", "c/sub/b.md"]
    assert [f.name for f in D.resolve_inputs(["c"], tmp_path, ["*.txt"])] == ["a.txt"]  # patterns keep their depth
    # a link up past the folder read every file beside it (trial83 F10): refused
    (tmp_path / "c" / "sub" / "top").symlink_to(tmp_path)
    with pytest.raises(D.DataError, match=rf"^data: .*top links to {tmp_path}, a folder that holds the data folder .*c: following it "
                                          r"would read files outside the data folder; remove the link$"):
        D.resolve_inputs(["c"], tmp_path, ["**/*.txt", "**/*.md"])
    (tmp_path / "c" / "sub" / "top").unlink()
    (tmp_path / "c" / "gone.txt").symlink_to(tmp_path / "nowhere.txt")
    with pytest.raises(D.DataError, match=r"^data: .*gone\.txt is a symbolic link to .*nowhere\.txt, which does not exist \(in the folder .*c\)$"):
        D.resolve_inputs(["c"], tmp_path, ["**/*.txt"])
    assert len(D.resolve_inputs(["c"], tmp_path, ["**/*.md"])) == 1  # a broken link the patterns do not select is no data


def test_a_file_edited_while_it_is_tokenised_leaves_no_cache_entry(tmp_path, tok, monkeypatch):
    """trial44: the entry was keyed by the text before the edit and held tokens of the text after: a later run of the
    original text read the edited one, exit 0. Now nothing is cached and the run says which file changed."""
    files = write_corpus(tmp_path / "c", files=2, sentences_per_file=5)
    real = D._tokenize_to

    def edited_midway(*args, **kwargs):
        with open(files[1], "a") as fh:
            fh.write("the dog ran .\n")
        return real(*args, **kwargs)

    monkeypatch.setattr(D, "_tokenize_to", edited_midway)
    with pytest.raises(D.DataError, match=rf"data: {files[1]} changed while it was tokenised; nothing was cached"):
        prep([tmp_path / "c"], tmp_path, tok)
    assert not (tmp_path / "cache").exists()  # no entry, no partial, nor the folder this run made for them (trial99 L1)


def test_a_long_document_is_tokenised_in_pieces_cut_at_line_ends_as_one_document(tmp_path, tok, monkeypatch):
    """One 50 MB file (one document) took 9.2 GB to tokenise whole (trial70): past DOC_PIECE_CHARS characters a document
    is tokenised piece by piece, each piece cut after a line end, and is still one document ending in one EOS."""
    lines = [f"the cat sat {i} ." for i in range(40)]
    text = "\n".join(lines) + "\n"
    (tmp_path / "long.txt").write_text(text)
    (tmp_path / "short.txt").write_text("a fish")
    monkeypatch.setattr(D, "DOC_PIECE_CHARS", 100)
    pieces = list(D._pieces(text, 100))
    assert "".join(pieces) == text and all(len(p) <= 100 and p.endswith("\n") for p in pieces) and len(pieces) > 5
    stream = prep([tmp_path / "long.txt", tmp_path / "short.txt"], tmp_path, tok)
    eos = tok.eos_token_id
    expected = [i for p in pieces for i in tok(p, add_special_tokens=False)["input_ids"]] + [eos]
    assert stream.tokens.tolist() == expected + tok("a fish")["input_ids"] + [eos]
    assert stream.doc_starts.tolist() == [0, len(expected)]
    # a text without line ends or spaces is cut at the limit
    assert [len(p) for p in D._pieces("x" * 250, 100)] == [100, 100, 50]


def test_a_data_folder_linking_into_proc_is_refused_not_walked(tmp_path, tok):
    """A link to /proc in a data folder was followed through every process's root and cwd: 51k folders of the
    machine's files (trial70 F6)."""
    write_corpus(tmp_path / "c", files=1, sentences_per_file=2)
    (tmp_path / "c" / "p").symlink_to("/proc")
    with pytest.raises(D.DataError) as info:
        prep([tmp_path / "c"], tmp_path, tok)
    assert f"{tmp_path / 'c' / 'p'} links to /proc, on the kernel's proc file system, not data" in str(info.value), str(info.value)


@pytest.mark.parametrize("encoding", ["utf-16", "utf-32"])
@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_a_utf16_or_utf32_file_with_its_byte_order_mark_is_named_as_such(tmp_path, tok, encoding, suffix):
    text = json.dumps({"text": "the cat sat ."}) + "\n" if suffix == ".jsonl" else "the cat sat ."
    (tmp_path / f"wide{suffix}").write_bytes(text.encode(encoding))  # with its BOM, as Windows editors save it
    name = encoding.upper()  # UTF-32's mark starts with UTF-16's: not called UTF-16 (trial72)
    with pytest.raises(D.DataError, match=rf"not UTF-8 text \(invalid start byte at byte 0.*\); it starts with a {name} byte-order mark: "
                                          rf"convert it, e.g. iconv -f {name} -t UTF-8"):
        prep([tmp_path / f"wide{suffix}"], tmp_path, tok)


def test_a_data_file_linked_into_proc_is_refused_not_read(tmp_path, tok):
    """z.txt -> /proc/self/status was trained on without a word; /proc/self/pagemap was read for minutes (trial72)."""
    (tmp_path / "z.txt").symlink_to("/proc/self/status")
    with pytest.raises(D.DataError, match=r"is /proc/.*/status, on the kernel's proc file system: the machine's state, not text"):
        prep([tmp_path / "z.txt"], tmp_path, tok)
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "y.txt").symlink_to("/proc/self/status")  # found in a data folder, too
    with pytest.raises(D.DataError, match="on the kernel's proc file system"):
        prep([tmp_path / "c"], tmp_path, tok)


def test_a_cache_entry_untouched_since_written_is_not_hashed_again_on_open(tmp_path, tok, monkeypatch):
    """Every open hashed tokens.bin whole (a 20 GB one: 50 s, trial72): an entry whose files keep the inode, size and
    modification time they were written with is not read again; one changed since is, and refused."""
    import numpy as np

    write_corpus(tmp_path / "c", files=1, sentences_per_file=5)
    s = prep([tmp_path / "c"], tmp_path, tok)
    hashed = []
    digest = D.sha256_of
    monkeypatch.setattr(D, "sha256_of", lambda path: hashed.append(os.path.basename(path)) or digest(path))
    assert len(prep([tmp_path / "c"], tmp_path, tok)) == len(s) and "tokens.bin" not in hashed
    tokens = np.fromfile(s.path / "tokens.bin", dtype=s.tokens.dtype)
    np.zeros_like(tokens).tofile(s.path / "tokens.bin")  # in place, the same size
    os.utime(s.path / "tokens.bin", ns=(1, 1))  # whatever the clock's grain, its time is another now
    with pytest.raises(D.DataError, match="tokens.bin is not what was tokenised"):
        prep([tmp_path / "c"], tmp_path, tok)
    assert "tokens.bin" in hashed


def test_a_data_refusal_leaves_no_cache_folder_it_made(tmp_path, tok):
    """Every data refusal of train and eval left an empty cache folder that was not there before (trial99 L1); one that was
    there before stays."""
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(D.DataError, match="not UTF-8"):
        D.prepare_corpus([str(tmp_path / "latin1.txt")], tmp_path, tok, dir_glob=["**/*.txt"], text_field="text",
                         cache_dir=tmp_path / "new" / "cache", progress=False)
    assert not (tmp_path / "new").exists()
    (tmp_path / "cache").mkdir()
    with pytest.raises(D.DataError, match="not UTF-8"):
        prep([tmp_path / "latin1.txt"], tmp_path, tok)
    assert (tmp_path / "cache").is_dir() and not any((tmp_path / "cache").iterdir())


def test_split_special_tokens_is_part_of_the_token_cache_key():
    """split_special_tokens lives on the Python side, not in the tokenizer's serialised rules: two models sharing one
    tokenizer.json, one with it set, read the same cache entry, the first one's tokens, and `eval A B` scored B on A's
    ids (trial146 F2)."""
    plain, split = make_tokenizer(), make_tokenizer()
    split.split_special_tokens = True
    text = "the<eos>cat sat"
    assert plain(text, add_special_tokens=False)["input_ids"] != split(text, add_special_tokens=False)["input_ids"]
    assert D.tokenizer_fingerprint(plain) != D.tokenizer_fingerprint(split)
    assert D.tokenizer_fingerprint(plain) == D.tokenizer_fingerprint(make_tokenizer())


def test_a_utf8_byte_order_mark_is_not_read_as_text(tmp_path):
    """A .txt or .md file saved with a UTF-8 byte-order mark (Windows editors) had it tokenised as text, 3 tokens a file
    with SmolLM2's tokenizer (trial146 F6); JSONL already skipped it."""
    import codecs

    text = "the cat sat on the mat .\n"
    (tmp_path / "plain").mkdir()
    (tmp_path / "marked").mkdir()
    (tmp_path / "plain" / "a.txt").write_text(text)
    (tmp_path / "marked" / "a.txt").write_bytes(codecs.BOM_UTF8 + text.encode())
    assert list(D.iter_documents(tmp_path / "marked" / "a.txt", "text")) == [text]
    plain, marked = prep([tmp_path / "plain"], tmp_path, make_tokenizer()), prep([tmp_path / "marked"], tmp_path, make_tokenizer())
    assert len(plain.tokens) > 0 and np.array_equal(np.asarray(plain.tokens), np.asarray(marked.tokens))


def test_a_python_tokenizers_settings_are_part_of_the_token_cache_key(tmp_path):
    """A slow tokenizer's rules are its code and its settings: with the vocabulary alone in the key, a lowercasing copy and
    a plain one read one cache entry, and eval scored the second on the first's ids (trial147 F1). The same tokenizer in
    two folders keeps one key (its files' paths are no rule)."""
    from transformers import AutoTokenizer

    vocab = ["[PAD]", "[UNK]", "[SEP]", "[CLS]", "[MASK]", "the", "cat", "The", "Cat", "sat", "."]
    loaded = {}
    for name, lower in (("lower", True), ("plain", False), ("lower-again", True)):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "prophetnet.tokenizer").write_text("\n".join(vocab) + "\n")
        (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "ProphetNetTokenizer", "do_lower_case": lower,
                                                                  "eos_token": "[SEP]"}))
        loaded[name] = AutoTokenizer.from_pretrained(folder)
    assert getattr(loaded["lower"], "backend_tokenizer", None) is None  # a Python tokenizer
    ids = {name: t("The Cat sat .", add_special_tokens=False)["input_ids"] for name, t in loaded.items()}
    assert ids["lower"] != ids["plain"]
    assert D.tokenizer_fingerprint(loaded["lower"]) != D.tokenizer_fingerprint(loaded["plain"])
    assert D.tokenizer_fingerprint(loaded["lower"]) == D.tokenizer_fingerprint(loaded["lower-again"])


def test_a_python_tokenizers_key_is_the_same_however_it_was_read_or_saved(tmp_path, monkeypatch):
    """What a load or a save puts in a Python tokenizer's init_kwargs is not its rules: local_files_only (set by
    HF_HUB_OFFLINE: a run started offline and resumed online was refused as 'the tokenizer changed'), and the AddedToken
    objects and added_tokens_decoder a save_pretrained round trip brings (the same data tokenised again) (trial149 F1,
    F4). A setting no JSON holds neither crashes the key nor changes it from one process to the next (F6)."""
    from transformers import AutoTokenizer

    folder = tmp_path / "tok"
    folder.mkdir()
    (folder / "prophetnet.tokenizer").write_text("\n".join(["[PAD]", "[UNK]", "[SEP]", "[CLS]", "[MASK]", "the", "cat", "."]) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "ProphetNetTokenizer", "eos_token": "[SEP]"}))
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)  # as HF_HUB_OFFLINE=1 reads it
    key = D.tokenizer_fingerprint(tokenizer)
    online = AutoTokenizer.from_pretrained(folder)
    online.init_kwargs["local_files_only"] = False  # as a load without HF_HUB_OFFLINE records it (set here: the env may say offline)
    assert tokenizer.init_kwargs.get("local_files_only") is True
    assert D.tokenizer_fingerprint(online) == key
    tokenizer.save_pretrained(tmp_path / "saved")
    saved = AutoTokenizer.from_pretrained(tmp_path / "saved")
    assert type(saved.init_kwargs["eos_token"]).__name__ == "AddedToken"  # what made the key differ
    assert D.tokenizer_fingerprint(saved) == key
    # odd settings a tokenizer's own code may keep: mixed key types, an object printed with its address, a set
    tokenizer.init_kwargs["custom"] = {1: "a", "b": {2, 1}, "o": object()}
    odd = D.tokenizer_fingerprint(tokenizer)
    tokenizer.init_kwargs["custom"] = {1: "a", "b": {1, 2}, "o": object()}
    assert D.tokenizer_fingerprint(tokenizer) == odd != key


def test_no_bos_is_added_to_the_text_read_for_training_and_eval(tmp_path):
    """docs/commands.md: eval --data (and train) add no BOS token, even for a tokenizer that adds one to what it encodes
    (Llama, Gemma): documents are joined with EOS alone (trial149 F8)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<eos>": 1, "<bos>": 2, "the": 3, "cat": 4, "sat": 5}
    rules = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    rules.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    rules.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=rules, eos_token="<eos>", bos_token="<bos>", unk_token="<unk>")
    assert tokenizer("the cat")["input_ids"] == [2, 3, 4]  # this tokenizer adds a BOS to what it encodes
    (tmp_path / "a.txt").write_text("the cat sat\n")
    (tmp_path / "b.txt").write_text("sat the cat\n")
    stream = prep([tmp_path / "a.txt", tmp_path / "b.txt"], tmp_path, tokenizer)
    assert list(np.asarray(stream.tokens)) == [3, 4, 5, 1, 5, 3, 4, 1]


def test_a_python_tokenizers_added_tokens_matching_rules_are_in_its_key(tmp_path):
    """get_vocab holds an added token's text and id, not how it matches: "catxx" with xx added as a whole word is one id
    more than with xx added plainly, and the two tokenizers read one cache entry (trial151 H1)."""
    from transformers import AddedToken, AutoTokenizer

    folder = tmp_path / "tok"
    folder.mkdir()
    (folder / "prophetnet.tokenizer").write_text("\n".join(["[PAD]", "[UNK]", "[SEP]", "[CLS]", "[MASK]", "the", "cat", "."]) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "ProphetNetTokenizer", "eos_token": "[SEP]"}))
    loaded = {}
    for whole in (True, False):
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        tokenizer.add_tokens([AddedToken("xx", single_word=whole)])
        tokenizer.save_pretrained(tmp_path / str(whole))
        loaded[whole] = AutoTokenizer.from_pretrained(tmp_path / str(whole), local_files_only=True)
    ids = {whole: t("the catxx cat .", add_special_tokens=False)["input_ids"] for whole, t in loaded.items()}
    assert ids[True] != ids[False]
    assert D.tokenizer_fingerprint(loaded[True]) != D.tokenizer_fingerprint(loaded[False])


def test_a_token_cache_of_a_python_tokenizer_made_before_its_settings_were_fingerprinted_says_so(tmp_path):
    """A cache entry given as data, made by a version that fingerprinted a Python tokenizer by its vocabulary alone, was
    refused as "made with a different tokenizer" naming this very model's folder (trial152 F2): said as what it is. It is
    still refused: that fingerprint cannot tell a lowercasing tokenizer from a plain one (trial147 F1)."""
    from transformers import AutoTokenizer

    folder = tmp_path / "tok"
    folder.mkdir()
    (folder / "prophetnet.tokenizer").write_text("\n".join(["[PAD]", "[UNK]", "[SEP]", "[CLS]", "[MASK]", "the", "cat", "."]) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "ProphetNetTokenizer", "eos_token": "[SEP]"}))
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "a.txt").write_text("the cat .\n" * 20)
    stream = prep([tmp_path / "text"], tmp_path, tokenizer)
    meta = json.loads((stream.path / D.META_FILE).read_text())
    (stream.path / D.META_FILE).write_text(json.dumps({**meta, "tokenizer": D.tokenizer_fingerprint(tokenizer, vocabulary_only=True)}))
    with pytest.raises(D.DataError, match="made by a midus-surgery before 2026-12-07, which fingerprinted a Python tokenizer by "
                                          "its vocabulary alone"):
        prep([stream.path], tmp_path, tokenizer)
    (stream.path / D.META_FILE).write_text(json.dumps({**meta, "tokenizer": "0123456789abcdef"}))
    with pytest.raises(D.DataError, match="these tokens were made with a different tokenizer"):
        prep([stream.path], tmp_path, tokenizer)
