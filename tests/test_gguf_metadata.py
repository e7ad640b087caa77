"""A GGUF base's metadata checked as a config.json is, and its tensors as a safetensors header's (trial49 F3, F7).

The config transformers derives from a GGUF's metadata and the file's own tensor infos can disagree: heads
that do not share out over the key/value heads, a vocabulary the embedding does not have, a tensor of
another shape, a RoPE base no model computes with. validate, plan and apply refuse each in one located
line, exit 2, nothing written (validate said OK, then apply failed with exit 1 and transformers' words, or
the anatomy was blamed). A block missing from the middle is named; two tensors of one name are said so (not
"cut short"); a tensor the architecture lacks is noted as left out, as for a safetensors base.
"""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import pytest

from midus_surgery.cli import main

IDENTITY = "layout:\n  interleave:\n    after_every: 2\n    kind: identity\n"
HIDDEN, INTER, HEADS, KV, VOCAB, LAYERS = 16, 32, 4, 2, 32, 4
NAMES = {"attn_q": (HIDDEN, HIDDEN), "attn_k": (KV * 4, HIDDEN), "attn_v": (KV * 4, HIDDEN), "attn_output": (HIDDEN, HIDDEN),
         "ffn_gate": (INTER, HIDDEN), "ffn_up": (INTER, HIDDEN), "ffn_down": (HIDDEN, INTER), "attn_norm": (HIDDEN,), "ffn_norm": (HIDDEN,)}


def write_llama_gguf(path: Path, *, kv: int = KV, vocab: int = VOCAB, rope=10000.0, bad_shape: str | None = None,
                     skip_block: int | None = None, extra: str | None = None, duplicate: bool = False) -> Path:
    """A tiny 4-block llama GGUF (numpy order shapes as transformers loads them), spoiled as asked."""
    import gguf
    import numpy as np

    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(LAYERS)
    writer.add_context_length(64)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(INTER)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(kv)
    if isinstance(rope, str):
        writer.add_string("llama.rope.freq_base", rope)
    else:
        writer.add_rope_freq_base(rope)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_vocab_size(vocab)
    writer.add_rope_dimension_count(HIDDEN // HEADS)

    def add(name: str, shape: tuple[int, ...]) -> None:
        if name == bad_shape:
            shape = (shape[0], shape[1] // 2)
        writer.add_tensor(name, rng.standard_normal(shape).astype(np.float32) * 0.1)

    add("token_embd.weight", (VOCAB, HIDDEN))
    add("output_norm.weight", (HIDDEN,))
    add("output.weight", (VOCAB, HIDDEN))
    for i in range(LAYERS):
        if i != skip_block:
            for short, shape in NAMES.items():
                add(f"blk.{i}.{short}.weight", shape)
    if extra:
        add(extra, (4, 4))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    if duplicate:  # the same length of name, so the file stays whole: only the tensor list names one twice
        data = path.read_bytes()
        assert data.count(b"blk.1.attn_k.weight") == 1
        path.write_bytes(data.replace(b"blk.1.attn_k.weight", b"blk.1.attn_q.weight"))
    return path


def write_recipe(tmp: Path, base: Path) -> Path:
    path = tmp / f"{base.stem}.yaml"
    path.write_text(f"base:\n  path: {base}\n{IDENTITY}output:\n  dir: out/{base.stem}\n  dtype: float32\n")
    return path


def refused(recipe: Path, capsys, command: str) -> str:
    """Run the command: exit 2, one located line, no traceback, nothing written. Returns the problem line."""
    code = main([command, str(recipe)] + (["--quiet"] if command == "apply" else ["--json"] if command == "plan" else []))
    captured = capsys.readouterr()
    assert code == 2, captured.err
    assert "Traceback" not in captured.err + captured.out
    out = recipe.parent / "out"
    assert not out.exists() or not any(out.iterdir())
    if command == "plan":
        data = json.loads(captured.out)
        assert data["valid"] is False and len(data["problems"]) == 1, data
        problem = data["problems"][0]
        assert problem["field"] == "base.path"
        return problem["message"]
    lines = [line.strip() for line in captured.err.splitlines() if line.strip() and not line.startswith("INVALID")]
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"{recipe}:2:3: base.path: "), lines[0]
    return lines[0]


CASES = {
    "kv3": ({"kv": 3}, "num_attention_heads (4) is not a multiple of num_key_value_heads (3): the query heads cannot share the key/value "
                       "heads out evenly (its metadata's llama.attention.head_count and llama.attention.head_count_kv)"),
    "vocab": ({"vocab": 40}, "its tensor 'token_embd.weight' has shape (32, 16), but the config its metadata gives (hidden_size=16, "),
    "shape": ({"bad_shape": "blk.1.attn_q.weight"}, "its tensor 'blk.1.attn_q.weight' has shape (16, 8), but the config its metadata gives"),
    "rope-negative": ({"rope": -1.0}, "rope_theta is -1.0; it must be a number above 0 (its metadata's llama.rope.freq_base)"),
    "rope-string": ({"rope": "10000"}, "rope_theta is '10000'; it must be a number above 0 (its metadata's llama.rope.freq_base)"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_gguf_metadata_that_contradicts_itself_is_one_located_line_everywhere(tmp_path, capsys, case):
    """trial49: validate and plan said valid (function_preserving true), apply exited 1 with "look at the above report"
    (no report shown) or "cannot reshape array"; a bad RoPE base was blamed on the anatomy (write an anatomy: block)."""
    spoil, expected = CASES[case]
    path = write_llama_gguf(tmp_path / f"{case}.gguf", **spoil)
    recipe = write_recipe(tmp_path, path)
    for command in ("validate", "plan", "apply"):
        line = refused(recipe, capsys, command)
        assert f"{path}: {expected}" in line, (command, line)
        assert "anatomy" not in line and "trust_remote_code" not in line and "report" not in line
    if case == "vocab":
        assert "vocab_size=40) implies (40, 16) for model.embed_tokens.weight" in line
    if case == "shape":
        assert "implies (16, 16) for model.layers.1.self_attn.q_proj.weight" in line


def test_a_gguf_missing_a_block_names_it(tmp_path, capsys):
    """trial49: "its tensors are 3 blocks, blk.0 to blk.3" for blocks 0, 1 and 3."""
    path = write_llama_gguf(tmp_path / "gap.gguf", skip_block=2)
    line = refused(write_recipe(tmp_path, path), capsys, "validate")
    assert ("its metadata says llama.block_count = 4, but its tensors are 3 blocks (blk.0, blk.1, blk.3), with no tensor of blk.2: "
            "a file that contradicts itself") in line


def test_a_gguf_naming_a_tensor_twice_says_so(tmp_path, capsys):
    """trial49: a whole file was called "not a whole GGUF file (... cut short, or not GGUF ...)"."""
    path = write_llama_gguf(tmp_path / "dup.gguf", duplicate=True)
    for command in ("validate", "apply"):
        line = refused(write_recipe(tmp_path, path), capsys, command)
        assert f"{path}: it holds two tensors named 'blk.1.attn_q.weight' (a corrupt GGUF file" in line
        assert "not a whole" not in line and "cut short" not in line


def test_a_gguf_tensor_the_architecture_lacks_is_noted_as_left_out(tmp_path, capsys):
    """trial49: dropped without a word, where a safetensors base's extra tensor gets the note. A GGUF without one
    applies as before, with no note."""
    sound = write_recipe(tmp_path, write_llama_gguf(tmp_path / "sound.gguf"))
    assert main(["validate", str(sound)]) == 0
    assert main(["apply", str(sound), "--quiet"]) == 0
    assert "left out" not in capsys.readouterr().err
    assert (tmp_path / "out" / "sound" / "config.json").is_file()

    recipe = write_recipe(tmp_path, write_llama_gguf(tmp_path / "extra.gguf", extra="blk.1.foo.weight"))
    assert main(["validate", str(recipe)]) == 0
    capsys.readouterr()
    assert main(["apply", str(recipe), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert ("note: 1 tensor(s) of the base that its architecture does not have are left out of the output, as transformers' load "
            "leaves them out: 'blk.1.foo.weight'") in err, err
    assert (tmp_path / "out" / "extra" / "config.json").is_file()


def test_a_gguf_given_as_a_folder_and_its_file_is_the_base_verify_compares_with(tmp_path, capsys):
    """base.path a folder and base.gguf_file its file: apply recorded the folder alone, and verify then said the base
    was not there any more and skipped the identity and weights checks, exit 0 (trial64). It records the file."""
    from midus_surgery.emit.verify import verify
    from midus_surgery.io.output_dir import read_marker

    (tmp_path / "models").mkdir()
    gguf = write_llama_gguf(tmp_path / "models" / "tiny.gguf")
    recipe = tmp_path / "folder.yaml"
    recipe.write_text(f"base:\n  path: {gguf.parent}\n  gguf_file: {gguf.name}\n{IDENTITY}output:\n  dir: out/folder\n  dtype: float32\n")
    assert main(["apply", str(recipe), "--quiet"]) == 0, capsys.readouterr().err
    out = tmp_path / "out" / "folder"
    assert read_marker(out)["base_path"] == str(gguf.resolve())
    checks = verify(out, report=lambda c: None)
    assert not [c.name for c in checks if not c.ok] and not [c.name for c in checks if "not there" in c.detail]
    assert any(c.name.startswith("identity") and c.ok and not c.skipped for c in checks), [(c.name, c.detail) for c in checks]


CTRL_C_IN_A_CALLBACK = """
import signal, sys, weakref
from midus_surgery.io import tensor_source

load = tensor_source._loaded_by_transformers

def pressed():
    signal.raise_signal(signal.SIGINT)
    return sys.getrecursionlimit()  # a Python call after the signal: its handler runs here, inside the callback

class Held:
    pass

def loaded_with_ctrl_c(*args, **kwargs):
    held = Held()
    ref = weakref.ref(held, lambda gone: pressed())
    del held  # the callback runs now, as torch's do when the garbage collector frees their objects
    return load(*args, **kwargs)

tensor_source._loaded_by_transformers = loaded_with_ctrl_c
sys.argv = ["midus-surgery", "apply", sys.argv[1]]
from midus_surgery.cli import run
run()
"""


def test_ctrl_c_landing_in_a_weakref_callback_during_a_gguf_load_interrupts_apply_on_a_terminal(tmp_path):
    """Ctrl-C on a terminal while transformers read a GGUF base was lost (trial82 F2): its handler ran inside a weakref
    callback the garbage collector called (torch's), where Python prints an exception and drops it; apply wrote its
    whole output and exited 0. Now it is delivered again: "interrupted", exit 130, nothing written."""
    import os
    import signal
    import subprocess
    import sys

    recipe = write_recipe(tmp_path, write_llama_gguf(tmp_path / "tiny.gguf"))
    driver = tmp_path / "driver.py"
    driver.write_text(CTRL_C_IN_A_CALLBACK)
    main_fd, term_fd = os.openpty()  # on a terminal, as the user who presses Ctrl-C runs it

    def as_from_a_shell():
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # a test runner's worker may ignore SIGINT, and a child inherits that

    proc = subprocess.Popen([sys.executable, str(driver), str(recipe)], cwd=tmp_path, stdin=term_fd, stdout=term_fd, stderr=term_fd,
                            preexec_fn=as_from_a_shell)
    os.close(term_fd)
    said = b""
    while True:
        try:
            chunk = os.read(main_fd, 4096)
        except OSError:  # EIO: the child's end of the terminal is closed
            break
        if not chunk:
            break
        said += chunk
    os.close(main_fd)
    text = said.decode(errors="replace")
    assert proc.wait(timeout=120) == 130, text
    assert text.strip().endswith("interrupted") and "Traceback" not in text and "Exception ignored" not in text, text
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def gguf_bytes(*entries: bytes, n_kv: int | None = None, n_tensors: int = 0) -> bytes:
    """A GGUF v3 file written by hand: its header, then ``entries`` (metadata entries as kv() makes them)."""
    return b"GGUF" + struct.pack("<IQQ", 3, n_tensors, len(entries) if n_kv is None else n_kv) + b"".join(entries)


def kv(key: str, value_type: int, value: bytes) -> bytes:
    """One metadata entry: the key (u64 length, bytes), the value type (gguf.GGUFValueType), the value's bytes."""
    return struct.pack("<Q", len(key)) + key.encode() + struct.pack("<I", value_type) + value


def gguf_string(text: str, length: int | None = None) -> bytes:
    """A GGUF string: its u64 length (``length`` when given, whatever the text's), then its bytes."""
    return struct.pack("<Q", len(text) if length is None else length) + text.encode()


ARCH = kv("general.architecture", 8, gguf_string("llama"))
U8, STRING, ARRAY = 0, 8, 9
HOSTILE = {  # trial83 F2: each kept validate busy for a minute and more, its memory growing, or was read as something else
    "array-count": (gguf_bytes(ARCH, kv("x.arr", ARRAY, struct.pack("<IQ", U8, 2**40))),
                    "metadata key 'x.arr' holds 1,099,511,627,776 uint8 items at byte 98, but 0 bytes are left"),
    "string-array-count": (gguf_bytes(ARCH, kv("x.arr", ARRAY, struct.pack("<IQ", STRING, 2**40) + gguf_string("a"))),
                           "metadata key 'x.arr' holds 1,099,511,627,776 string items (at least 8 bytes each)"),
    "string-length": (gguf_bytes(kv("general.architecture", STRING, gguf_string("llama", 2**62))),
                      "metadata key 'general.architecture' is 4,611,686,018,427,387,904 bytes long at byte 64, but 5 bytes are left"),
    "nested": (gguf_bytes(ARCH, kv("x.arr", ARRAY, struct.pack("<IQ", ARRAY, 1) * 2000 + struct.pack("<IQ", U8, 0))),
               "metadata key 'x.arr' nests arrays more than 4 deep (llama.cpp reads no array of arrays)"),
    "kv-count": (gguf_bytes(ARCH, n_kv=2**60), "its header counts 1,152,921,504,606,846,976 metadata entries and 0 tensors"),
    "tensor-count": (gguf_bytes(ARCH, n_tensors=2**60), "its header counts 1 metadata entries and 1,152,921,504,606,846,976 tensors"),
    "tensor-name": (gguf_bytes(ARCH, n_tensors=1) + gguf_string("token_embd.weight" + "\0" * 30, 2**50),
                    "the name of tensor 0 is 1,125,899,906,842,624 bytes long at byte 77, but 47 bytes are left"),
    "value-type": (gguf_bytes(ARCH, kv("x.odd", 13, b"\0" * 16)), "metadata key 'x.odd' has value type 13, which GGUF does not define"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_gguf_counts_the_file_cannot_hold_are_refused_before_the_reader_sees_them(tmp_path, capsys, case):
    """trial83 F2: gguf's reader walks every array item in Python, believing the count: an array said to hold 2^40
    items in a 100-byte file kept validate busy past 60 s, its memory growing ~120 MB/s; 2,000 nested arrays took
    40 s and then a MemoryError; a string said to be 2^62 bytes long was read as the 5 bytes there, and validated.
    Each is now one located line, at once, from validate, plan and apply."""
    import time

    data, expected = HOSTILE[case]
    path = tmp_path / "m.gguf"
    path.write_bytes(data)
    recipe = write_recipe(tmp_path, path)
    for command in ("validate", "plan", "apply"):
        start = time.monotonic()
        line = refused(recipe, capsys, command)
        assert time.monotonic() - start < 20, command  # was minutes, or the host's memory
        assert f"{path}: not a whole GGUF file ({len(data)} bytes; cut short, or not GGUF: " in line, line
        assert expected in line, line


def test_a_gguf_of_more_strings_than_any_tokenizer_is_refused_before_the_reader_sees_them(tmp_path, capsys):
    """trial92 F7: empty strings (8 bytes each) fit the file, and gguf's reader then built objects for each, about 200
    times the file's size in memory (8 MB: 33 s and 1.8 GB; a 1 GB file would need 200 GB). More than 2^21 metadata
    items in all is refused at once, from validate, plan and apply; a tokenizer's tokens and merges are under a million."""
    count = 2**21 + 1
    data = gguf_bytes(ARCH, kv("tokenizer.ggml.tokens", ARRAY, struct.pack("<IQ", STRING, count) + gguf_string("") * count))
    path = tmp_path / "m.gguf"
    path.write_bytes(data)
    recipe = write_recipe(tmp_path, path)
    for command in ("validate", "plan", "apply"):
        line = refused(recipe, capsys, command)  # the walk itself stops before the items (89 s for validate before)
        assert (f"{path}: metadata key 'tokenizer.ggml.tokens' holds 2,097,153 string items, past 2,097,152 metadata entries "
                "and array items in all (a real tokenizer's tokens, scores, types and merges are about a million at most)") in line, line
        assert line.endswith("refused before it is read"), line


def test_a_gguf_of_more_numbers_than_any_tokenizer_is_refused_before_the_reader_sees_them(tmp_path, capsys):
    """trial95 F8: an array of fixed-size items was stepped over uncounted, but gguf's reader builds one numpy array per
    item: a 2 MB file of one uint8 array took it 22.7 s and 1.4 GiB. Its items count toward the cap."""
    from midus_surgery.io.tensor_source import GgufTooManyItems, check_gguf_layout

    count = 2**21 + 1
    path = tmp_path / "m.gguf"
    path.write_bytes(gguf_bytes(ARCH, kv("x.bytes", ARRAY, struct.pack("<IQ", U8, count) + b"\0" * count)))
    with pytest.raises(GgufTooManyItems, match="metadata key 'x.bytes' holds 2,097,153 uint8 items, past 2,097,152"):
        check_gguf_layout(str(path))
    start = time.monotonic()
    line = refused(write_recipe(tmp_path, path), capsys, "validate")
    assert time.monotonic() - start < 10 and line.endswith("refused before it is read"), line


def test_a_tokenizer_of_the_largest_real_size_still_passes_the_item_cap(tmp_path):
    """What the cap must let through: 256k tokens, each with a float32 score and an int32 type, and 500k merges (a
    Gemma-sized vocabulary with a Llama-3-sized merge list), besides the architecture's entries."""
    from midus_surgery.io.tensor_source import check_gguf_layout

    tokens, merges = 256_000, 500_000
    path = tmp_path / "tok.gguf"
    path.write_bytes(gguf_bytes(
        ARCH,
        kv("tokenizer.ggml.tokens", ARRAY, struct.pack("<IQ", STRING, tokens) + gguf_string("t") * tokens),
        kv("tokenizer.ggml.scores", ARRAY, struct.pack("<IQ", 6, tokens) + b"\0" * 4 * tokens),
        kv("tokenizer.ggml.token_type", ARRAY, struct.pack("<IQ", 5, tokens) + b"\0" * 4 * tokens),
        kv("tokenizer.ggml.merges", ARRAY, struct.pack("<IQ", STRING, merges) + gguf_string("a b") * merges)))
    check_gguf_layout(str(path))  # no GgufTooManyItems


@pytest.mark.parametrize("missing", ["tensors", "sizes", "both"])
def test_a_gguf_without_tensors_or_sizes_is_refused_not_filled_with_defaults(tmp_path, capsys, missing):
    """trial83 F2: a 96-byte GGUF holding only general.architecture = llama validated as a 32-layer 6.6B model
    (LlamaConfig's defaults for every size), and apply built 9.85B parameters until the OOM killer ended it."""
    import gguf
    import numpy as np

    path = tmp_path / f"{missing}.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    if missing == "tensors":
        writer.add_block_count(LAYERS)
        writer.add_embedding_length(HIDDEN)
    if missing == "sizes":
        writer.add_tensor("token_embd.weight", np.ones((VOCAB, HIDDEN), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    recipe = write_recipe(tmp_path, path)
    for command in ("validate", "plan", "apply"):
        line = refused(recipe, capsys, command)
        assert ("it holds no tensors (no weights: metadata alone)" in line) == (missing != "sizes"), line
        lacks = "its metadata lacks llama.block_count and llama.embedding_length (the model's sizes: transformers would take its config"
        assert (lacks in line) == (missing != "tensors"), line
        assert line.endswith(": not a GGUF model to build from"), line


def test_verify_checks_a_gguf_base_before_transformers_reads_it(tmp_path, capsys):
    """verify --base handed a GGUF straight to transformers' loader (gguf's reader): the file's counts believed."""
    from midus_surgery.emit.verify import verify

    sound = write_recipe(tmp_path, write_llama_gguf(tmp_path / "sound.gguf"))
    assert main(["apply", str(sound), "--quiet"]) == 0, capsys.readouterr().err
    hostile = tmp_path / "hostile.gguf"
    hostile.write_bytes(HOSTILE["array-count"][0])
    checks = verify(tmp_path / "out" / "sound", hostile, report=lambda c: None)
    identity = [c for c in checks if c.name.startswith("identity")]
    assert identity and not identity[0].ok, [(c.name, c.detail) for c in checks]
    assert identity[0].detail.startswith(f"the base model {hostile} does not load: not a whole GGUF file (98 bytes; cut short, or not GGUF: "
                                         "metadata key 'x.arr' holds 1,099,511,627,776 uint8 items"), identity[0].detail
