"""A tokenizer.json that makes the Rust tokenizers library panic (trial49 F1).

pyo3 raises a panic inside Rust as ``pyo3_runtime.PanicException``, a BaseException, not an
Exception: every ``except Exception`` guard around a tokenizer load let it through. validate and
plan died with a traceback (exit 1), apply copied the tokenizer into the output with exit 0 and
no word (a GGUF base's apply died), verify and eval died. Now such a tokenizer is one that does not
load, as one that raises an ordinary error: validate and plan note it, apply warns (a GGUF base's
tokenizer is left out with its "no tokenizer written" warning), verify reports a SKIP ``tokenizer``
row, eval refuses in one line with exit 2. Rust's own panic report (written to file descriptor 2
before the exception) is held back, so the line said is the only one.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from tiny_configs import tiny_config
from transformers import AutoModelForCausalLM

from midus_surgery.cli import main

# a byte-level BPE whose one merge, "Ġ t", gives "Ġt", which is not in its vocabulary: tokenizers
# panics building its merge table ("range end index 3 out of range for slice of length 2")
PANICKING = {
    "version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
    "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
    "post_processor": None,
    "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
    "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None, "end_of_word_suffix": None,
              "fuse_unk": False, "byte_fallback": False, "ignore_merges": False, "vocab": {"Ġ": 0, "t": 1, "a": 2}, "merges": ["Ġ t"]},
}
KINDS = {
    "panics": (json.dumps(PANICKING), "PanicException: range end index 3 out of range for slice of length 2"),
    "not-json": ("{not json", "Exception: "),  # an ordinary error: the behaviour the panic now shares
}
COPY = "layout:\n  interleave:\n    after: [1]\n    kind: copy\n"


def write_tokenizer(directory: Path, text: str) -> None:
    (directory / "tokenizer.json").write_text(text)
    (directory / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "a"}))


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """A tiny 4-layer Llama without tokenizer files; tests copy it and add one."""
    path = tmp_path_factory.mktemp("tokpanic") / "model"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_config("llama", vocab_size=64, tie_word_embeddings=False)).save_pretrained(path)
    return path


def base_with(model: Path, tmp_path: Path, kind: str) -> Path:
    base = shutil.copytree(model, tmp_path / "base")
    write_tokenizer(base, KINDS[kind][0])
    return base


def recipe_for(tmp_path: Path, base: Path) -> Path:
    path = tmp_path / "copy.yaml"
    path.write_text(f"base:\n  path: {base}\n{COPY}output:\n  dir: {tmp_path / 'out'}\n")
    return path


def said(capfd) -> tuple[str, str]:
    """stdout and stderr at the file descriptors: Rust writes its panic report past sys.stderr."""
    captured = capfd.readouterr()
    assert "Traceback" not in captured.err and "panicked at" not in captured.err, captured.err
    assert "RUST_BACKTRACE" not in captured.err, captured.err
    return captured.out, captured.err


@pytest.fixture(scope="module")
def panicking_output(model, tmp_path_factory) -> Path:
    """An apply output of a base whose tokenizer.json panics (apply copies it, with a warning)."""
    tmp = tmp_path_factory.mktemp("tokpanic-out")
    assert main(["apply", str(recipe_for(tmp, base_with(model, tmp, "panics"))), "--quiet"]) == 0
    assert (tmp / "out" / "tokenizer.json").read_text() == KINDS["panics"][0]
    return tmp / "out"


@pytest.mark.parametrize("kind", KINDS)
def test_validate_and_plan_note_a_base_tokenizer_that_does_not_load(model, tmp_path, capfd, kind):
    recipe = recipe_for(tmp_path, base_with(model, tmp_path, kind))
    why = KINDS[kind][1]
    note = f"note: the base's tokenizer.json does not load ({why}"
    assert main(["validate", str(recipe)]) == 0
    out, err = said(capfd)
    assert out.startswith(f"OK {recipe}: 4 -> 5 layers") and note in out, out
    assert [line for line in out.splitlines() if "tokenizer" in line] == [next(line for line in out.splitlines() if note in line)]
    assert main(["plan", str(recipe)]) == 0
    out, err = said(capfd)
    assert note in out, out
    assert main(["plan", str(recipe), "--json"]) == 0
    out, err = said(capfd)
    result = json.loads(out)
    assert result["valid"] is True
    assert [n for n in result["notes"] if "tokenizer" in n][0].startswith(f"the base's tokenizer.json does not load ({why}")


@pytest.mark.parametrize("kind", KINDS)
def test_apply_copies_a_tokenizer_that_does_not_load_with_a_warning(model, tmp_path, capfd, kind):
    """The output keeps the base's files (a newer tokenizers may read it), but the copy is said."""
    recipe = recipe_for(tmp_path, base_with(model, tmp_path, kind))
    assert main(["apply", str(recipe), "--quiet"]) == 0
    out, err = said(capfd)
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and warnings[0].startswith(f"warning: the base's tokenizer.json does not load ({KINDS[kind][1]}"), err
    assert "copied as it is, so the output's tokenizer does not load either" in warnings[0]
    assert (tmp_path / "out" / "tokenizer.json").read_text() == KINDS[kind][0]
    assert "wrote " in out


def test_verify_reports_an_output_whose_tokenizer_panics_as_a_skip_row(panicking_output, capfd):
    assert main(["verify", str(panicking_output)]) == 0
    out, err = said(capfd)
    rows = [line for line in out.splitlines() if "tokenizer" in line]
    assert rows[0] == ("SKIP tokenizer: the folder's tokenizer does not load (AutoTokenizer.from_pretrained fails on it: "
                       f"{KINDS['panics'][1]}); the checks ran on random token ids: fix or replace its tokenizer files before publishing")
    assert "2 skipped (tokenizer, identity)" in out and "FAIL" not in out


def test_eval_refuses_an_output_whose_tokenizer_panics_in_one_line(panicking_output, tmp_path, capfd):
    (tmp_path / "data").mkdir()
    data = tmp_path / "data" / "data.txt"
    data.write_text("a a a a a a a a\n")
    assert main(["eval", str(panicking_output), "--data", str(data), "--cache-dir", str(tmp_path / "cache")]) == 2
    out, err = said(capfd)
    assert out == ""
    assert err.strip().splitlines() == [f"error: {panicking_output}: no usable tokenizer ({KINDS['panics'][1]})"]


def test_a_gguf_bases_tokenizer_that_panics_is_left_out_with_the_warning_and_ctrl_c_still_stops(tmp_path, monkeypatch, capfd):
    """transformers' GGUF reader builds the tokenizer with the same Rust library; its panic is the
    GGUF's "could not be read" (apply died with a traceback). A KeyboardInterrupt is no load failure."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    from midus_surgery.emit import emitter

    write_tokenizer(tmp_path, KINDS["panics"][0])
    raised = iter([lambda: Tokenizer.from_file(str(tmp_path / "tokenizer.json")), lambda: (_ for _ in ()).throw(KeyboardInterrupt())])
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", lambda *args, **kwargs: next(raised)())

    class Ref:
        is_gguf, directory, gguf_file = True, tmp_path, "model.gguf"

    dest = tmp_path / "out"
    dest.mkdir()
    emitter._copy_tokenizer(Ref(), dest, False)
    out, err = said(capfd)
    assert err.splitlines() == [f"warning: no tokenizer written (the GGUF's could not be read: {KINDS['panics'][1]})"]
    assert not list(dest.iterdir())
    with pytest.raises(KeyboardInterrupt):
        emitter._copy_tokenizer(Ref(), dest, False)


def test_a_held_panic_report_lets_other_output_through():
    """Only Rust's panic block is held back; what else reaches file descriptor 2 meanwhile is passed on."""
    from tokenizers import Tokenizer

    from midus_surgery.errors import is_library_panic, quiet_library_panic

    read, write = os.pipe()
    saved = os.dup(2)
    os.dup2(write, 2)
    try:
        with pytest.raises(BaseException) as caught, quiet_library_panic():
            os.write(2, b"before\n")
            Tokenizer.from_str(json.dumps(PANICKING))
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(write)
    with os.fdopen(read, "rb") as pipe:
        assert pipe.read() == b"before\n"
    assert is_library_panic(caught.value) and not isinstance(caught.value, Exception)
    assert not is_library_panic(KeyboardInterrupt()) and not is_library_panic(ValueError("PanicException"))
