"""The base model's files as untrusted input (issue 23): nothing lost, nothing run, nothing crashes.

A base directory is data someone else made. Each case here ends in one clear message and exit 2
with no output directory, or, for custom code the recipe allows, in an output that loads:
- a config.json whose layer count, hidden size or vocabulary disagrees with the weights;
- an index.json naming files outside the base directory;
- corrupt shards and indexes;
- a known model type with its own modeling code (auto_map): refused unless the recipe sets
  ``base.trust_remote_code``, then planned and written through that code, which travels with the
  output; ``verify`` never stops at transformers' "run the custom code?" prompt.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_configs import tiny_config
from transformers import AutoModelForCausalLM

from midus_surgery.cli import main
from midus_surgery.model.midus_names import AUTO_MAP as MIDUS_AUTO_MAP

REPO = Path(__file__).resolve().parents[1]
SLICES = "layout:\n  slices:\n    - layers: [0, 3]\n    - layers: [1, 4]\n"
IDENTITY = "layout:\n  interleave:\n    after_every: 2\n    kind: identity\n"
MEMORY_LAYOUT = "layout:\n  interleave:\n    after_every: 2\n    kind: memory\nmemory:\n  n_subkeys: 8\n  topk: 4\n  latent_dim: 8\n"


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    """A tiny 4-layer Llama; tests copy it before spoiling it."""
    path = tmp_path_factory.mktemp("untrusted") / "llama"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_config("llama", tie_word_embeddings=False)).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("untrusted") / "sharded"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_config("llama", tie_word_embeddings=False)).save_pretrained(path, max_shard_size="50KB")
    assert (path / "model.safetensors.index.json").is_file()
    return path


def copy_base(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


def write_recipe(tmp: Path, base: Path, *, layout: str = SLICES, extra: str = "") -> Path:
    path = tmp / f"{base.name}.yaml"
    path.write_text(f"base:\n  path: {base}\n{extra}{layout}output:\n  dir: out/{base.name}\n  dtype: float32\n")
    return path


def refused(recipe: Path, capsys, *flags: str, command: str = "apply") -> str:
    """Run the command; it must exit 2 with one message, no traceback, and write nothing. Returns stderr."""
    args = [command, str(recipe), *flags] + (["--quiet"] if command == "apply" else [])
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    out = recipe.parent / "out"
    assert not out.exists() or not any(out.iterdir())  # the output's parent may be made before weights are read
    return err


def edit_config(base: Path, **changes) -> None:
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, **changes}))


# ----------------------------------------------------------------------------------------------
# config.json against the weights


@pytest.mark.parametrize("flags", [(), ("--full-plan",)], ids=["default", "full-plan"])
def test_a_config_with_fewer_layers_than_the_weights_is_refused(llama, tmp_path, capsys, flags):
    base = copy_base(llama, tmp_path / "base")
    edit_config(base, num_hidden_layers=2)
    recipe = write_recipe(tmp_path, base, layout="layout:\n  slices:\n    - layers: [0, 2]\n    - layers: [1, 2]\n")
    err = refused(recipe, capsys, *flags)
    assert "num_hidden_layers=2" in err and "4 layers" in err and "config.json" in err
    assert main(["validate", str(recipe)]) == 2  # validate reads the headers too when the weights are there
    assert "num_hidden_layers=2" in capsys.readouterr().err


@pytest.mark.parametrize("stated", [[], {"model_type": "llama", "num_hidden_layers": 30}], ids=["a list", "another model"])
@pytest.mark.parametrize("command", ["validate", "plan", "apply"])
def test_a_base_config_that_does_not_describe_the_weights_is_not_ignored(llama, tmp_path, capsys, stated, command):
    """base.config is for planning without the weights; with the weights there it used to be ignored, whatever it said."""
    base = copy_base(llama, tmp_path / "base")
    (tmp_path / "stated.json").write_text(json.dumps(stated))
    err = refused(write_recipe(tmp_path, base, extra="  config: stated.json\n"), capsys, command=command)
    assert "stated.json" in err and "base.config:" in err


@pytest.mark.parametrize("model_type, hint", [("lama", "(did you mean 'llama'"), ("foo_unknown_lm", "")])
@pytest.mark.parametrize("command", ["validate", "apply"])
def test_a_model_type_transformers_does_not_know_is_one_short_line(llama, tmp_path, capsys, model_type, hint, command):
    """transformers' own message lists every type it knows: one line of 12,000 characters (trial38)."""
    base = copy_base(llama, tmp_path / "base")
    edit_config(base, model_type=model_type)
    err = refused(write_recipe(tmp_path, base), capsys, command=command)
    assert f"does not know model_type {model_type!r}" in err and hint in err and "a newer transformers may know it" in err
    assert len(err) < 600 and "gpt-sw3" not in err


@pytest.mark.parametrize("command", ["validate", "apply"])
def test_a_model_type_that_is_not_a_name_is_one_line(llama, tmp_path, capsys, command):
    """model_type ["llama"]: a TypeError traceback from apply's header planner, a raw TypeError from validate (trial40)."""
    base = copy_base(llama, tmp_path / "base")
    edit_config(base, model_type=["llama"])
    err = refused(write_recipe(tmp_path, base), capsys, command=command)
    assert "model_type is list ['llama'], not a name" in err


def test_a_vision_language_config_says_its_language_model_is_inside(tmp_path, capsys):
    """A LLaVA config has no num_hidden_layers of its own: three "the config has no ..." lines said nothing of
    text_config (trial38)."""
    from transformers import AutoConfig

    base = tmp_path / "llava"
    base.mkdir()
    AutoConfig.for_model("llava", text_config=tiny_config("llama").to_dict()).save_pretrained(base)
    err = refused(write_recipe(tmp_path, base), capsys, command="validate")
    assert "a llava config" in err and "text_config, a llama of 4 layers" in err and "the language model alone" in err
    assert err.count("\n") <= 2  # the heading and one problem


def test_a_matching_base_config_beside_the_weights_is_fine(llama, tmp_path, capsys):
    base = copy_base(llama, tmp_path / "base")
    (tmp_path / "stated.json").write_text((base / "config.json").read_text())
    assert main(["validate", str(write_recipe(tmp_path, base, extra="  config: stated.json\n"))]) == 0


def test_a_config_with_more_layers_than_the_weights_is_refused(llama, tmp_path, capsys):
    base = copy_base(llama, tmp_path / "base")
    edit_config(base, num_hidden_layers=6)
    err = refused(write_recipe(tmp_path, base, layout="layout:\n  slices:\n    - layers: [0, 6]\n    - layers: [1, 2]\n"), capsys)
    assert "num_hidden_layers=6" in err and "4 layers" in err


@pytest.mark.parametrize("change, key", [(dict(hidden_size=32, head_dim=16), "hidden_size=32"), (dict(vocab_size=100), "vocab_size=100")])
def test_a_config_whose_sizes_differ_from_the_weights_is_refused_at_plan_time(llama, tmp_path, capsys, change, key):
    base = copy_base(llama, tmp_path / "base")
    edit_config(base, **change)
    recipe = write_recipe(tmp_path, base)
    err = refused(recipe, capsys)
    assert key in err and "model.embed_tokens.weight" in err
    refused(recipe, capsys, command="plan")


def test_a_pickle_base_is_checked_against_its_config_when_read(llama, tmp_path, capsys):
    base = tmp_path / "pickled"
    base.mkdir()
    shutil.copy(llama / "config.json", base / "config.json")
    torch.save(load_file(str(llama / "model.safetensors")), base / "pytorch_model.bin")
    edit_config(base, num_hidden_layers=3)
    recipe = write_recipe(tmp_path, base, layout="layout:\n  slices:\n    - layers: [0, 3]\n    - layers: [1, 3]\n")
    err = refused(recipe, capsys, "--allow-pickle")
    assert "num_hidden_layers=3" in err and "4 layers" in err


def test_a_pickle_base_in_the_legacy_format_is_read(llama, tmp_path, capsys):
    """trial99 M1: torch.save's format before 1.6 (not a zip) was refused with torch's "mmap can only be used with
    files saved with ..." (apply mapped every .bin), where eval reads it."""
    base = tmp_path / "legacy"
    base.mkdir()
    shutil.copy(llama / "config.json", base / "config.json")
    weights = load_file(str(llama / "model.safetensors"))
    torch.save(weights, base / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    recipe = write_recipe(tmp_path, base)  # SLICES: output layers 0..5 are base layers 0, 1, 2, 1, 2, 3
    assert main(["apply", str(recipe), "--quiet", "--allow-pickle"]) == 0, capsys.readouterr().err
    written = load_file(str(tmp_path / "out" / "legacy" / "model.safetensors"))
    sources = [0, 1, 2, 1, 2, 3]

    def base_name(name: str) -> str:
        parts = name.split(".")
        if name.startswith("model.layers."):
            parts[2] = str(sources[int(parts[2])])
        return ".".join(parts)

    assert {base_name(name) for name in written} == weights.keys() and len(written) == len(weights) + 2 * (len(weights) - 3) // 4
    assert all(torch.equal(tensor, weights[base_name(name)]) for name, tensor in written.items())


class WritesFile:
    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.write_text, (self.path, "ran"))


def test_a_pickle_base_is_noted_by_validate_and_a_planted_one_refused_in_one_line(llama, tmp_path, capsys):
    base = tmp_path / "pickled"
    base.mkdir()
    shutil.copy(llama / "config.json", base / "config.json")
    marker = tmp_path / "ran"
    torch.save({**load_file(str(llama / "model.safetensors")), "planted": WritesFile(marker)}, base / "pytorch_model.bin")
    recipe = write_recipe(tmp_path, base, layout=IDENTITY)
    assert main(["validate", str(recipe)]) == 0  # valid: it reads no weights, but says what apply will ask for
    assert "holds only pickle .bin weights: apply reads them only with --allow-pickle" in capsys.readouterr().out
    assert "--allow-pickle" in refused(recipe, capsys)
    err = refused(recipe, capsys, "--allow-pickle")
    assert err.startswith("error: cannot read ") and "refused by torch.load(weights_only=True)" in err
    assert "will likely succeed" not in err and len(err.strip().splitlines()) == 1  # torch's advice to load it unsafely is not ours
    assert not marker.exists()


def write_gguf(path: Path, cut: int = 0, *, block_count: int = 2, blocks: int = 0) -> Path:
    """A small GGUF file (one tensor, and a norm for each of ``blocks`` blocks), with its last ``cut`` bytes cut off."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(block_count)
    writer.add_tensor("token_embd.weight", np.ones((64, 16), dtype=np.float32))
    for i in range(blocks):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(16, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    if cut:
        path.write_bytes(path.read_bytes()[:-cut])
    return path


@pytest.mark.parametrize("damage", ["cut", "header only", "not gguf"])
def test_a_broken_gguf_base_is_one_located_line(tmp_path, capsys, damage):
    """transformers' own errors for these speak of a JSON config file, or of array shapes."""
    path = tmp_path / "model.gguf"
    if damage == "cut":
        write_gguf(path, cut=2000)
    elif damage == "header only":
        path.write_bytes(write_gguf(path).read_bytes()[:108])
    else:
        path.write_bytes(b"not a model" * 100)
    recipe = write_recipe(tmp_path, path, layout=IDENTITY)
    for command in ("validate", "apply"):
        err = refused(recipe, capsys, command=command)
        assert f"base.path: {path}: not a whole GGUF file ({path.stat().st_size} bytes; cut short, or not GGUF: " in err
        assert "JSON" not in err


@pytest.mark.parametrize("stated", [2, 4], ids=["fewer-than-its-blocks", "more-than-its-blocks"])
def test_a_gguf_whose_block_count_contradicts_its_tensors_is_refused(tmp_path, capsys, stated):
    """trial41: a GGUF saying 28 blocks over 30 blocks of tensors applied with exit 0 and verified: the last two
    base layers silently gone (transformers builds block_count layers and drops the other tensors)."""
    path = write_gguf(tmp_path / "model.gguf", block_count=stated, blocks=3)
    recipe = write_recipe(tmp_path, path, layout=IDENTITY)
    for command in ("validate", "apply"):
        err = refused(recipe, capsys, command=command)
        assert f"its metadata says llama.block_count = {stated}, but its tensors are 3 blocks, blk.0 to blk.2" in err, err


def test_transformers_quiet_silences_its_warnings_and_every_bar(capsys, monkeypatch):
    import logging

    from tqdm.auto import tqdm
    from transformers.utils import logging as hf_logging

    from midus_surgery.io.hf_output import transformers_quiet

    logger = hf_logging.get_logger("transformers.configuration_utils")  # where "`torch_dtype` is deprecated" comes from
    before = hf_logging.get_verbosity()
    hf_logging.set_verbosity_warning()
    try:
        list(tqdm(range(3), desc="a bare tqdm bar"))
        assert "a bare tqdm bar" in capsys.readouterr().err and logger.isEnabledFor(logging.WARNING)
        with transformers_quiet(progress=False):
            list(tqdm(range(3), desc="a bare tqdm bar"))
            assert not logger.isEnabledFor(logging.WARNING) and not hf_logging.is_progress_bar_enabled()
        assert capsys.readouterr().err == ""
        with transformers_quiet(progress=True):  # into a log (capsys is not a terminal): its redrawn bars go too
            list(tqdm(range(3), desc="a bare tqdm bar"))
        assert capsys.readouterr().err == ""
        monkeypatch.setattr("midus_surgery.io.progress.on_terminal", lambda: True)
        with transformers_quiet(progress=True):  # on a terminal its bars stay, its notes go
            list(tqdm(range(3), desc="a bare tqdm bar"))
            assert not logger.isEnabledFor(logging.WARNING)
        assert "a bare tqdm bar" in capsys.readouterr().err
        assert logger.isEnabledFor(logging.WARNING)  # as it was
    finally:
        hf_logging.set_verbosity(before)


# ----------------------------------------------------------------------------------------------
# paths named by the index


def write_index(base: Path, weight_map: dict) -> None:
    (base / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.mark.parametrize("target", ["../../../../etc/passwd", "/etc/passwd", "sub/../../outside.safetensors"])
def test_an_index_naming_a_file_outside_the_base_is_refused(sharded, tmp_path, capsys, target):
    base = copy_base(sharded, tmp_path / "base")
    shutil.copy(sorted(base.glob("*.safetensors"))[0], tmp_path / "outside.safetensors")  # a valid shard, but not the base's
    index = json.loads((base / "model.safetensors.index.json").read_text())
    name = next(iter(index["weight_map"]))
    write_index(base, {**index["weight_map"], name: target})
    for flags in [(), ("--full-plan",)]:
        err = refused(write_recipe(tmp_path, base), capsys, *flags)
        assert "outside" in err and target in err


def test_a_shard_symlinked_outside_the_base_is_refused(sharded, tmp_path, capsys):
    base = copy_base(sharded, tmp_path / "base")
    shard = sorted(base.glob("*.safetensors"))[0]
    moved = tmp_path / "elsewhere.safetensors"
    shard.rename(moved)
    shard.symlink_to(moved)
    recipe = write_recipe(tmp_path, base)
    err = refused(recipe, capsys)
    assert "outside" in err and shard.name in err
    # said as a link, where the recipe names the base, with what to do (trial77 F4: "the base's file X names 'X'", no place)
    assert main(["validate", str(recipe)]) == 2
    said = capsys.readouterr().err
    assert f"{recipe}:" in said and f" base.path: {shard} is a link to {moved}, outside the base directory" in said, said
    assert "copy the files in, or give the folder they are in" in said


def test_a_hub_cache_snapshot_whose_files_link_into_its_blobs_applies(sharded, tmp_path, capsys):
    """The one allowed way out of the base: a Hugging Face cache snapshot's files are links into
    the same repository's blobs folder; links elsewhere from that snapshot stay refused."""
    repo = tmp_path / "hub" / "models--org--tiny"
    base = repo / "snapshots" / "0123abc"
    base.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for i, f in enumerate(sorted(sharded.iterdir())):
        blob = repo / "blobs" / f"blob{i}"
        blob.write_bytes(f.read_bytes())
        (base / f.name).symlink_to(blob)
    recipe = write_recipe(tmp_path, base)
    assert main(["apply", str(recipe), "--quiet"]) == 0, capsys.readouterr().err
    shard = sorted(base.glob("*.safetensors"))[0]
    moved = tmp_path / "elsewhere.safetensors"
    moved.write_bytes(shard.read_bytes())
    shard.unlink()
    shard.symlink_to(moved)
    second = tmp_path / "second"
    second.mkdir()
    err = refused(write_recipe(second, base), capsys)
    assert "outside" in err and shard.name in err


def test_a_tokenizer_file_symlinked_outside_the_base_is_not_copied(llama, tmp_path, capsys):
    base = copy_base(llama, tmp_path / "base")
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the output")
    (base / "tokenizer.json").symlink_to(secret)
    recipe = write_recipe(tmp_path, base)
    assert main(["apply", str(recipe), "--quiet"]) == 0
    assert "tokenizer.json" in capsys.readouterr().err  # a warning names what was left out
    assert not (tmp_path / "out" / "base" / "tokenizer.json").exists()


# ----------------------------------------------------------------------------------------------
# corrupt shards and indexes


def spoil_header_length(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(struct.pack("<Q", 1 << 62) + data[8:])


def spoil_header_json(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[8] = ord("!")
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])


def too_short(path: Path) -> None:
    path.write_bytes(b"\x01\x02")


@pytest.mark.parametrize("spoil, says", [(spoil_header_length, "header length"), (spoil_header_json, "header"),
                                         (truncate, "truncated"), (too_short, "truncated")],
                         ids=["header-2^62", "header-not-json", "truncated", "8-bytes-missing"])
@pytest.mark.parametrize("flags", [(), ("--full-plan",)], ids=["default", "full-plan"])
def test_a_corrupt_shard_is_one_message_naming_it(llama, tmp_path, capsys, spoil, says, flags):
    base = copy_base(llama, tmp_path / "base")
    spoil(base / "model.safetensors")
    err = refused(write_recipe(tmp_path, base), capsys, *flags)
    assert "model.safetensors" in err and says in err
    assert len(err.strip().splitlines()) == 1, err


def test_a_tensor_whose_bytes_overlap_its_neighbours_is_refused(llama, tmp_path, capsys):
    base = copy_base(llama, tmp_path / "base")
    path = base / "model.safetensors"
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])
    name = next(k for k in header if k != "__metadata__")
    begin, end = header[name]["data_offsets"]
    header[name]["data_offsets"] = [begin, end + 4]  # one more float than its shape holds
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data[8 + length:])
    err = refused(write_recipe(tmp_path, base), capsys)
    assert name in err and "model.safetensors" in err


def rewrite_header(path: Path, edit) -> None:
    """Rewrite a safetensors file's header with ``edit(header, data) -> data`` (data: the bytes after the header)."""
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + length])
    data = edit(header, raw[8 + length:])
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)


def utf16_header(path: Path) -> None:
    """The same header in UTF-16: json.loads of bytes reads it, the safetensors library does not (trial92 N1)."""
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    text = raw[8:8 + length].decode().rstrip()
    blob = (text + " " * (-len(text) % 4)).encode("utf-16-le")  # 2 bytes a character: 8-byte aligned
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + length:])


def _tensors(header: dict) -> list[str]:
    return sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])


def alias(header, data):  # the second tensor named on the first one's bytes (same shape: two norms)
    a, b = [k for k in _tensors(header) if k.endswith("layernorm.weight")][:2]
    header[b]["data_offsets"] = header[a]["data_offsets"]
    return data


def hole(header, data):  # junk before the first tensor, every offset moved past it
    for k in _tensors(header):
        header[k]["data_offsets"] = [o + 64 for o in header[k]["data_offsets"]]
    return b"\0" * 64 + data


def metadata_number(header, data):
    header["__metadata__"] = {"format": "pt", "x": 5}
    return data


def metadata_list(header, data):
    header["__metadata__"] = ["pt"]
    return data


def unknown_dtype(header, data):
    header[_tensors(header)[0]]["dtype"] = "Q4_X"
    return data


def float8_over_float32_bytes(header, data):  # a dtype safetensors knows, but not the bytes it spans
    header[_tensors(header)[0]]["dtype"] = "F8_E4M3"
    return data


@pytest.mark.parametrize("spoil, says", [(alias, "overlaps the tensor before it"), (hole, "leaving bytes 0-64 unclaimed"),
                                         (metadata_number, "__metadata__ is not a map of text to text"),
                                         (metadata_list, "__metadata__ is not a map of text to text"),
                                         (unknown_dtype, "has the dtype 'Q4_X', not one of the safetensors dtypes torch reads"),
                                         (float8_over_float32_bytes, "dtype F8_E4M3 need")])
def test_a_header_the_safetensors_library_rejects_is_refused_by_validate_and_apply(llama, tmp_path, capsys, spoil, says):
    """trial41: these bases applied with exit 0 (an aliased norm copied as the other one's values) while
    transformers, eval and safetensors itself refuse them; validate said OK to an unknown dtype."""
    base = copy_base(llama, tmp_path / "base")
    rewrite_header(base / "model.safetensors", spoil)
    for command, flags in (("validate", ()), ("apply", ()), ("apply", ("--full-plan",))):
        err = refused(write_recipe(tmp_path, base), capsys, *flags, command=command)
        said = [line for line in err.strip().splitlines() if not line.startswith(("warning:", "INVALID "))]  # validate: file, then problems
        assert len(said) == 1 and "model.safetensors" in said[0] and says in said[0], (command, err)


def test_a_header_not_in_utf8_is_refused_before_the_plan(llama, tmp_path, capsys):
    """A UTF-16 header passed the header check (json.loads of bytes reads it); apply planned, then safetensors refused it
    with exit 1 (trial92 N1). The safetensors rules read UTF-8 only."""
    from safetensors import SafetensorError, safe_open

    base = copy_base(llama, tmp_path / "base")
    utf16_header(base / "model.safetensors")
    with pytest.raises(SafetensorError, match="deserializing header"):  # the library itself refuses the file
        safe_open(str(base / "model.safetensors"), "pt")
    for command, flags in (("validate", ()), ("apply", ()), ("apply", ("--full-plan",))):
        err = refused(write_recipe(tmp_path, base), capsys, *flags, command=command)
        said = [line for line in err.strip().splitlines() if not line.startswith(("warning:", "INVALID "))]
        assert len(said) == 1 and "model.safetensors: its header is not valid JSON" in said[0], (command, err)


def test_a_base_tensor_the_architecture_lacks_is_said_to_be_left_out(llama, tmp_path, capsys):
    """trial41/45: a tensor the architecture does not have was dropped without a word by a MIDUS apply (DUS said it only
    as the reason it planned with transformers). Layers a layout drops on purpose are not said."""
    base = copy_base(llama, tmp_path / "base")
    weights = load_file(base / "model.safetensors")
    save_file({**weights, "model.layers.0.mlp.secret": torch.ones(3)}, base / "model.safetensors", metadata={"format": "pt"})
    memory = "memory:\n  n_subkeys: 8\n  topk: 4\n  latent_dim: 8\n"
    layouts = {"midus": ("layout:\n  slices:\n    - layers: [0, 4]\n    - layers: [1, 2]\n      kind: memory\n", memory),
               "dropping": ("allow_dropped_layers: true\nlayout:\n  slices:\n    - layers: [0, 2]\n    - layers: [3, 4]\n"
                            "    - layers: [3, 4]\n", "")}
    said = ("1 tensor(s) of the base that its architecture does not have are left out of the output, as "
            "transformers' load leaves them out: 'model.layers.0.mlp.secret'")
    for name, (layout, extra) in layouts.items():
        (tmp_path / name).mkdir()
        recipe = write_recipe(tmp_path / name, base, layout=layout, extra=extra)
        assert main(["validate", str(recipe)]) == 0  # said before apply too (trial56: validate printed a bare OK)
        assert f"  note: {said}" in capsys.readouterr().out.splitlines()
        assert main(["apply", str(recipe), "--quiet"]) == 0
        notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note: ")]
        dropped = ["note: base layer 2 left out of the output (allow_dropped_layers)"] if name == "dropping" else []  # validate's, said again
        assert notes == [*dropped, f"note: {said}"], (name, notes)  # not layer 2's tensors


def test_a_base_that_needs_a_missing_package_says_so_without_other_advice(llama, tmp_path, capsys, monkeypatch):
    """trial45: a MIDUS recipe over a base whose config asks for bitsandbytes was refused with the replica's
    ImportError and the advice to set accept_function_change, which cannot bring a package. The package is made
    missing for the check (the replica's build raises transformers' kind of ImportError), so this runs wherever the
    suite does; where bitsandbytes is really absent, the real config says the same."""
    import importlib.util

    from midus_surgery.emit import replica

    base = copy_base(llama, tmp_path / "base")
    edit_config(base, quantization_config={"quant_method": "bitsandbytes", "load_in_4bit": True})
    recipe = write_recipe(tmp_path, base, layout="layout:\n  slices:\n    - layers: [0, 4]\n    - layers: [1, 2]\n      kind: memory\n",
                          extra="memory:\n  n_subkeys: 8\n  topk: 4\n  latent_dim: 8\n")
    real = importlib.util.find_spec("bitsandbytes") is None
    with monkeypatch.context() as patched:
        patched.setattr(replica, "_RESULTS", {})

        def missing(*args, **kwargs):
            raise ImportError("Using `bitsandbytes` 4-bit quantization requires bitsandbytes: `pip install -U bitsandbytes`")
        patched.setattr(replica, "_emit_tiny", missing)
        err = refused(recipe, capsys, command="validate")
    said = [err] + ([refused(recipe, capsys, command="validate")] if real else [])  # the real config, unpatched
    for err in said:
        assert "transformers cannot build the base's model here: a package it needs is missing (ImportError: " in err, err
        assert "bitsandbytes" in err and "accept_function_change" not in err


def test_a_tensor_named_twice_in_a_header_is_named_in_the_refusal(llama, tmp_path, capsys):
    """trial45: a header listing one name twice (JSON keeps the last: here the second norm's entry over the
    first's bytes) was refused for the bytes it left unclaimed, naming another tensor."""
    base = copy_base(llama, tmp_path / "base")
    path = base / "model.safetensors"
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + length])
    first, second = [k for k in _tensors(header) if k.endswith("layernorm.weight")][:2]
    text = json.dumps(header).replace(json.dumps(second) + ":", json.dumps(first) + ":", 1).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + length:])
    for command in ("validate", "apply"):
        err = refused(write_recipe(tmp_path, base), capsys, command=command)
        assert f"its header names '{first}' twice (a corrupt safetensors file)" in err, err


def test_a_second_safetensors_file_beside_model_safetensors_is_not_read(llama, tmp_path, capsys):
    """trial41: without an index apply read every *.safetensors, the last name sorted winning, so a
    model_fp16.safetensors beside the model replaced its weights (exit 0). transformers reads
    model.safetensors alone; so does apply. Two other files holding one name are refused."""
    base = copy_base(llama, tmp_path / "base")
    weights = load_file(base / "model.safetensors")
    save_file({k: torch.full_like(v, 0.5) for k, v in weights.items()}, base / "model_fp16.safetensors")
    recipe = write_recipe(tmp_path, base)
    assert main(["apply", str(recipe), "--quiet"]) == 0, capsys.readouterr().err
    out = load_file(tmp_path / "out" / "base" / "model.safetensors")
    assert torch.equal(out["model.embed_tokens.weight"], weights["model.embed_tokens.weight"])
    assert torch.equal(out["model.layers.3.mlp.up_proj.weight"], weights["model.layers.1.mlp.up_proj.weight"])  # slice [1, 4) after [0, 3)

    (base / "model.safetensors").rename(base / "model-a.safetensors")  # no model.safetensors, no index: both are read
    (base / "model_fp16.safetensors").rename(base / "model-b.safetensors")
    second = tmp_path / "second"
    second.mkdir()
    err = refused(write_recipe(second, base), capsys)
    said = [line for line in err.strip().splitlines() if not line.startswith("warning:")]  # the base has no tokenizer: a warning
    assert len(said) == 1 and "is in both model-a.safetensors and model-b.safetensors" in said[0], err


def test_model_safetensors_beside_an_index_is_read_as_transformers_reads_it(sharded, tmp_path, capsys):
    """trial49: a folder with an index and its shards and a model.safetensors too: apply read the shards,
    transformers model.safetensors, and verify then blamed the output ('not the base it was made from').
    apply reads model.safetensors, as transformers does, and validate says the shards are not read."""
    base = copy_base(sharded, tmp_path / "both")
    shards = {}
    for shard in sorted(base.glob("model-*.safetensors")):
        shards.update(load_file(shard))
    save_file({k: torch.full_like(v, 0.5) for k, v in shards.items()}, base / "model.safetensors")
    recipe = write_recipe(tmp_path, base)
    assert main(["validate", str(recipe)]) == 0
    assert "holds model.safetensors and model.safetensors.index.json: transformers loads model.safetensors, and so does apply" in capsys.readouterr().out
    assert main(["apply", str(recipe), "--quiet"]) == 0, capsys.readouterr().err
    out = load_file(tmp_path / "out" / "both" / "model.safetensors")
    assert torch.equal(out["model.embed_tokens.weight"], torch.full_like(shards["model.embed_tokens.weight"], 0.5))


@pytest.mark.parametrize("index_text, says", [("{not json", "not valid JSON"), ('{"metadata": {}}', "weight_map"),
                                              ('{"weight_map": ["a"]}', "weight_map"), ('{"weight_map": {"x": 3}}', "weight_map"),
                                              ("[]", "weight_map")])
def test_a_broken_index_is_one_message_naming_it(sharded, tmp_path, capsys, index_text, says):
    base = copy_base(sharded, tmp_path / "base")
    (base / "model.safetensors.index.json").write_text(index_text)
    err = refused(write_recipe(tmp_path, base), capsys)
    assert "model.safetensors.index.json" in err and says in err


@pytest.mark.parametrize("kind", ["a named pipe", "a folder", "a link to nothing"])
def test_an_index_that_is_not_a_regular_file_is_refused_not_passed_over(sharded, tmp_path, capsys, kind):
    """An index that is a pipe or a folder was passed over: validate said OK and apply wrote an output from every shard
    it found, of a base transformers cannot load (it reads a sharded model through the index), exit 0 (trial138 F5)."""
    import os

    base = copy_base(sharded, tmp_path / "base")
    index = base / "model.safetensors.index.json"
    index.unlink()
    {"a named pipe": os.mkfifo, "a folder": os.mkdir, "a link to nothing": lambda p: p.symlink_to(tmp_path / "gone.json")}[kind](index)
    err = refused(write_recipe(tmp_path, base), capsys)
    assert str(index) in err and "transformers loads a sharded model through its index, so it would not load this base" in err, err
    assert kind not in ("a named pipe", "a folder") or f"is {kind}, not a regular file" in err, err
    assert not (tmp_path / "out").exists()


def test_an_index_naming_a_missing_shard_is_one_message_naming_it(sharded, tmp_path, capsys):
    base = copy_base(sharded, tmp_path / "base")
    index = json.loads((base / "model.safetensors.index.json").read_text())
    name = next(iter(index["weight_map"]))
    write_index(base, {**index["weight_map"], name: "model-00009-of-00009.safetensors"})
    err = refused(write_recipe(tmp_path, base), capsys)
    assert "model-00009-of-00009.safetensors" in err and "missing" in err


def test_index_entries_that_name_no_readable_shard_are_one_line_and_never_block(sharded, tmp_path, capsys):
    """trial45: an index naming a FIFO blocked validate, plan and apply forever; a NUL in a shard name was a
    traceback; an empty weight_map said "no .safetensors files" (there were several), exit 1; a 50 MB tensor
    name was printed whole."""
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    first = next(iter(index["weight_map"]))

    def case(name: str, weight_map: dict, extra=None) -> tuple[str, str]:
        base = copy_base(sharded, tmp_path / name / "base")
        if extra:
            extra(base)
        write_index(base, weight_map)
        recipe = write_recipe(tmp_path / name, base)
        assert main(["validate", str(recipe)]) == 2
        said = capsys.readouterr()
        assert "Traceback" not in said.err
        return said.out + said.err, refused(recipe, capsys)

    said, err = case("fifo", {**index["weight_map"], first: "pipe.safetensors"}, lambda base: os.mkfifo(base / "pipe.safetensors"))
    assert "pipe.safetensors is not a regular file (a pipe, a device or a folder)" in err and "not a regular file" in said
    said, err = case("folder", {**index["weight_map"], first: "sub"}, lambda base: (base / "sub").mkdir())
    assert "sub is not a regular file" in err
    said, err = case("nul", {**index["weight_map"], first: "model.safetensors\0x"})
    assert "which holds a NUL character" in err and len(err.strip().splitlines()) == 1
    for i, name in enumerate(("", ".", "./")):  # trial45: "cannot read .../base: Is a directory", naming no entry
        said, err = case(f"dot{i}", {**index["weight_map"], first: name})
        assert f"names {name!r}, which is no file name" in err and "model.safetensors.index.json" in err, err
    said, err = case("empty", {})
    assert "maps no tensors (its weight_map is empty)" in err and "maps no tensors" in said
    long_name = "a" * 1_000_000
    said, err = case("long", {**index["weight_map"], long_name: next(iter(index["weight_map"].values()))})
    assert "(cut; 1,000,000 characters)" in err and len(err) < 1000 and len(said) < 2000


def test_a_tokenizer_file_that_is_a_pipe_or_a_device_is_left_out_with_a_warning(llama, tmp_path, capsys):
    """trial45: a FIFO or a link to /dev/zero as tokenizer.json was left out without a word (exit 0, an output
    whose tokenizer does not load)."""
    for name, make in (("fifo", lambda p: os.mkfifo(p)), ("device", lambda p: p.symlink_to("/dev/zero"))):
        base = copy_base(llama, tmp_path / name / "base")
        (base / "tokenizer_config.json").write_text("{}")
        make(base / "tokenizer.json")
        recipe = write_recipe(tmp_path / name, base)
        assert main(["apply", str(recipe), "--quiet"]) == 0
        err = capsys.readouterr().err
        assert "warning: tokenizer.json not copied: the base's tokenizer.json is not a regular file" in err, err
        assert not (tmp_path / name / "out" / "base" / "tokenizer.json").exists()
        assert (tmp_path / name / "out" / "base" / "tokenizer_config.json").is_file()


def test_a_generation_config_that_is_a_pipe_or_a_broken_link_is_replaced_with_a_warning(llama, tmp_path, capsys):
    """trial66: a named pipe as generation_config.json was replaced by one derived from config.json without a word:
    the base's sampling settings were lost unseen."""
    for name, make in (("fifo", lambda p: os.mkfifo(p)), ("broken", lambda p: p.symlink_to(p.parent / "gone.json"))):
        base = copy_base(llama, tmp_path / name / "base")
        (base / "generation_config.json").unlink(missing_ok=True)
        make(base / "generation_config.json")
        assert main(["apply", str(write_recipe(tmp_path / name, base)), "--quiet"]) == 0
        err = capsys.readouterr().err
        why = "is a named pipe, not a regular file" if name == "fifo" else "is a broken link"
        assert f"generation_config.json {why}: the output's generation_config.json is derived from config.json" in err, err
        written = json.loads((tmp_path / name / "out" / "base" / "generation_config.json").read_text())
        assert written["eos_token_id"] == json.loads((base / "config.json").read_text())["eos_token_id"]


def test_a_config_json_transformers_cannot_decode_is_refused_as_transformers_refuses_it(llama, tmp_path, capsys):
    """trial45: a UTF-16 config.json validated and applied (json.loads detects UTF-16 from bytes), and verify
    then could not load the base: transformers reads it as UTF-8."""
    base = copy_base(llama, tmp_path / "base")
    (base / "config.json").write_text((base / "config.json").read_text(), encoding="utf-16")
    recipe = write_recipe(tmp_path, base)
    assert main(["validate", str(recipe)]) == 2
    assert "config.json is not UTF-8 text, which transformers reads a config.json as" in capsys.readouterr().err
    assert "is not UTF-8 text" in refused(recipe, capsys)


def test_a_config_json_that_is_a_pipe_is_one_line_not_a_hang(llama, tmp_path, capsys):
    base = copy_base(llama, tmp_path / "base")
    (base / "config.json").unlink()
    os.mkfifo(base / "config.json")
    err = refused(write_recipe(tmp_path, base), capsys)
    assert "config.json is not a regular file (a pipe, a device or a folder)" in err


# ----------------------------------------------------------------------------------------------
# custom-code bases

CONFIGURATION_X = '''
from transformers import LlamaConfig


class XConfig(LlamaConfig):
    """Llama with a learned output gain (its own code, as Hub models with an auto_map ship)."""

    def __init__(self, logit_gain=1.0, **kwargs):
        self.logit_gain = logit_gain
        super().__init__(**kwargs)
'''

MODELING_X = '''
import torch
from torch import nn
from transformers import LlamaForCausalLM

from .configuration_x import XConfig


class XForCausalLM(LlamaForCausalLM):
    config_class = XConfig

    def __init__(self, config):
        super().__init__(config)
        self.out_gain = nn.Parameter(torch.full((config.hidden_size,), float(config.logit_gain)))

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * self.out_gain.mean()
        return out
'''

AUTO_MAP = {"AutoConfig": "configuration_x.XConfig", "AutoModelForCausalLM": "modeling_x.XForCausalLM"}


@pytest.fixture(scope="module")
def custom(llama, tmp_path_factory) -> Path:
    """A known model type (llama) whose config.json maps to its own classes, with a tensor Llama lacks."""
    path = copy_base(llama, tmp_path_factory.mktemp("custom") / "custom")
    edit_config(path, auto_map=AUTO_MAP, logit_gain=3.0, architectures=["XForCausalLM"])
    tensors = load_file(str(path / "model.safetensors"))
    save_file({**tensors, "out_gain": torch.full((64,), 3.0)}, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "configuration_x.py").write_text(CONFIGURATION_X)
    (path / "modeling_x.py").write_text(MODELING_X)
    return path


def subprocess_env(tmp_path: Path) -> dict:
    # transformers copies custom code into its modules cache: keep it inside the test's folder
    return {**os.environ, "PYTHONPATH": str(REPO), "HF_MODULES_CACHE": str(tmp_path / "modules")}


def run_cli(tmp_path: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "midus_surgery.cli", *args], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, env=subprocess_env(tmp_path), timeout=timeout, cwd=tmp_path)


@pytest.mark.parametrize("layout", ["identity", "memory"])
def test_a_base_whose_auto_map_names_only_its_tokenizer_applies_and_verifies_without_running_it(layout, llama, tmp_path, capsys):
    """auto_map entries that build nothing here (a tokenizer's own class) do not change the causal
    LM: an identity recipe was refused ('tok.py is not a file in the base directory', from the
    replica's folder), and verify of its output refused with an empty list of classes. A memory
    recipe's output kept the base's auto_map in place of MIDUS's own, so it loaded only where the
    package is installed (trial66)."""
    base = copy_base(llama, tmp_path / "tokcode")
    marker = tmp_path / "ran"
    (base / "tok.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n")
    edit_config(base, auto_map={"AutoTokenizer": [None, "tok.Tok"]})
    recipe = write_recipe(tmp_path, base, layout=IDENTITY if layout == "identity" else MEMORY_LAYOUT)
    assert main(["validate", str(recipe)]) == 0, capsys.readouterr().err
    assert main(["apply", str(recipe), "--quiet"]) == 0, capsys.readouterr().err
    out = tmp_path / "out" / "tokcode"
    assert (out / "tok.py").is_file()  # the config's auto_map names it: it travels, unread
    if layout == "memory":
        assert json.loads((out / "config.json").read_text())["auto_map"] == {"AutoTokenizer": [None, "tok.Tok"], **MIDUS_AUTO_MAP}
    capsys.readouterr()
    assert main(["verify", str(out)]) == 0, capsys.readouterr()
    if layout == "memory":  # loaded with trust_remote_code=True without the package, it runs: said, as the base's own (trial75 F1)
        assert "it also ships its base's own code, byte for byte (tok.py)" in capsys.readouterr().out
        (out / "tok.py").write_text((out / "tok.py").read_text() + "\n# changed\n")
        assert main(["verify", str(out)]) == 1
        assert "FAIL code: the folder ships code besides MIDUS's modeling files that is not its base's (tok.py)" in capsys.readouterr().out
    assert not marker.exists()


def test_eval_says_when_a_models_own_tokenizer_code_is_not_run(llama, tmp_path, capsys):
    """A tokenizer_config.json whose auto_map names the tokenizer's own code: eval measured the perplexity of the
    stock tokenizer's split with no word (trial39). The code is not run; eval says so, once."""
    from train_fixtures.tiny import make_tokenizer, write_corpus

    base = copy_base(llama, tmp_path / "tokcode")
    make_tokenizer().save_pretrained(base)
    config = json.loads((base / "tokenizer_config.json").read_text())
    (base / "tokenizer_config.json").write_text(json.dumps({**config, "auto_map": {"AutoTokenizer": ["evtok.T", None]}}))
    marker = tmp_path / "ran"
    (base / "evtok.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n")
    write_corpus(tmp_path / "corpus", files=1, sentences_per_file=20)
    args = ["eval", str(base), "--data", str(tmp_path / "corpus"), "--block-size", "16", "--cache-dir", str(tmp_path / "cache"), "--quiet"]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert err.count("its tokenizer names code of its own (evtok.T), not run: the stock ") == 1 and "(to run it: read that code, then pass --trust-remote-code)" in err
    assert not marker.exists()
    # its tokenizer_class names the own class too (as Hub tokenizers with code do): transformers refused to build any
    # tokenizer, and eval stopped with exit 2 (trial66); the stock fast tokenizer reads its tokenizer.json instead
    (base / "tokenizer_config.json").write_text(json.dumps({**config, "auto_map": {"AutoTokenizer": [None, "evtok.Fast"]},
                                                           "tokenizer_class": "Fast"}))
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "its tokenizer names code of its own (evtok.Fast), not run: the stock " in err, err
    assert not marker.exists()
    config.pop("auto_map", None)
    (base / "tokenizer_config.json").write_text(json.dumps(config))
    assert main(args) == 0 and "code of its own" not in capsys.readouterr().err


def test_a_tokenizer_file_that_is_a_pipe_is_one_line_not_a_wait_forever(llama, tmp_path, capsys):
    """transformers opens tokenizer_config.json as it finds it: a named pipe there made eval wait for a writer (trial66)."""
    import os

    from train_fixtures.tiny import make_tokenizer, write_corpus

    base = copy_base(llama, tmp_path / "tokpipe")
    make_tokenizer().save_pretrained(base)
    (base / "tokenizer_config.json").unlink()
    os.mkfifo(base / "tokenizer_config.json")
    write_corpus(tmp_path / "corpus", files=1, sentences_per_file=20)
    args = ["eval", str(base), "--data", str(tmp_path / "corpus"), "--block-size", "16", "--cache-dir", str(tmp_path / "cache"), "--quiet"]
    assert main(args) == 2
    assert capsys.readouterr().err.strip() == (f"error: {base}: tokenizer_config.json is not a regular file (a named pipe, a device or a "
                                               "folder), so no tokenizer reads it: replace it with the tokenizer's own file")


def test_a_gguf_bases_tokenizer_is_read_with_the_recipes_trust_never_none(tmp_path, monkeypatch):
    """transformers asks on the terminal whether to run a folder's tokenizer code when
    trust_remote_code is None; a 'y' ran it though the recipe never allowed code."""
    from transformers import AutoTokenizer

    from midus_surgery.emit import emitter

    seen = []

    def record(*args, **kwargs):
        seen.append(kwargs.get("trust_remote_code", "not given"))
        raise ValueError("stop here")

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", record)

    class Ref:
        is_gguf, directory, gguf_file = True, tmp_path, "model.gguf"

    for trust in (False, True):
        emitter._copy_tokenizer(Ref(), tmp_path, trust)
    assert seen == [False, True]


def test_custom_code_is_refused_unless_the_recipe_trusts_it(custom, tmp_path, capsys):
    recipe = write_recipe(tmp_path, custom)
    for command in ("apply", "validate"):
        err = refused(recipe, capsys, command=command)
        assert "its own modeling code" in err and "modeling_x.XForCausalLM" in err and "trust_remote_code: true" in err


def test_memory_blocks_over_custom_code_are_refused(custom, tmp_path, capsys):
    recipe = write_recipe(tmp_path, custom, extra="  trust_remote_code: true\n",
                          layout="layout:\n  interleave:\n    after_every: 2\n    kind: memory\nmemory:\n  n_subkeys: 8\n  topk: 4\n  latent_dim: 8\n")
    run = run_cli(tmp_path, "apply", str(recipe), "--quiet")
    assert run.returncode == 2, run.stderr
    assert "own modeling code" in run.stderr and "memory" in run.stderr and "Traceback" not in run.stderr
    assert not (tmp_path / "out").exists()


def test_trusted_custom_code_plans_writes_and_travels_with_the_output(custom, tmp_path):
    recipe = write_recipe(tmp_path, custom, extra="  trust_remote_code: true\n", layout=IDENTITY)
    run = run_cli(tmp_path, "apply", str(recipe), "--quiet")
    assert run.returncode == 0, run.stderr
    out = tmp_path / "out" / "custom"
    assert (out / "configuration_x.py").is_file() and (out / "modeling_x.py").is_file()
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"] == AUTO_MAP and config["num_hidden_layers"] == 6 and config["logit_gain"] == 3.0
    assert str(custom) not in (out / "config.json").read_text()  # no path of this machine in the output

    # a fresh process, without midus_surgery: the output loads through its own code, every tensor
    # from the file, and (identity blocks) computes the base's function, custom gain included
    code = textwrap.dedent(f"""
        import sys, torch
        from transformers import AutoModelForCausalLM
        assert "midus_surgery" not in sys.modules
        out, info = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True, output_loading_info=True)
        base = AutoModelForCausalLM.from_pretrained({str(custom)!r}, trust_remote_code=True)
        ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            same = torch.equal(out(ids).logits, base(ids).logits)
        print(type(out).__name__, sorted(info["missing_keys"]), sorted(info["unexpected_keys"]), float(out.out_gain.mean()), same)
    """)
    env = {**subprocess_env(tmp_path), "PYTHONPATH": ""}
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300, stdin=subprocess.DEVNULL)
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.split() == ["XForCausalLM", "[]", "[]", "3.0", "True"]

    checked = run_cli(tmp_path, "verify", str(out), "--trust-remote-code")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "against the base: 0 (" in checked.stdout


def test_verify_runs_a_models_own_code_only_when_the_user_says_so(custom, tmp_path):
    """The directory's midus_plan.json says trust_remote_code (a copy of a trusted output, or a
    crafted one): that is the directory's word, not the user's."""
    recipe = write_recipe(tmp_path, custom, extra="  trust_remote_code: true\n", layout=IDENTITY)
    assert run_cli(tmp_path, "apply", str(recipe), "--quiet").returncode == 0
    out = tmp_path / "out" / "custom"
    marker = tmp_path / "ran"
    modeling = out / "modeling_x.py"
    modeling.write_text(f"import pathlib; pathlib.Path({str(marker)!r}).write_text('ran')\n" + modeling.read_text())

    refused = run_cli(tmp_path, "verify", str(out))
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "its own modeling code (midus_plan.json: trust_remote_code)" in refused.stderr and "--trust-remote-code" in refused.stderr
    assert "Traceback" not in refused.stderr and not marker.exists()
    # the plan's word removed: the config's auto_map still says the model is its own code
    (out / "midus_plan.json").unlink()
    refused = run_cli(tmp_path, "verify", str(out))
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "config.json maps its model to its own code (auto_map: AutoConfig -> configuration_x.XConfig" in refused.stderr
    assert not marker.exists()

    allowed = run_cli(tmp_path, "verify", str(out), "--trust-remote-code")
    assert allowed.returncode == 0, allowed.stdout + allowed.stderr
    assert marker.exists()  # the same code runs once the user allows it


def test_verify_never_asks_whether_to_run_custom_code(custom, tmp_path):
    # a model type transformers does not know, with its own code: transformers would ask on a terminal
    model = copy_base(custom, tmp_path / "model")
    edit_config(model, model_type="x_custom")
    (model / "configuration_x.py").write_text(CONFIGURATION_X.replace("    def __init__", '    model_type = "x_custom"\n\n    def __init__'))
    run = run_cli(tmp_path, "verify", str(model), timeout=120)
    assert run.returncode == 2, run.stdout + run.stderr
    assert "Do you wish to run the custom code" not in run.stdout + run.stderr
    assert "Traceback" not in run.stderr
    assert "maps its model to its own code" in run.stderr and "pass --trust-remote-code" in run.stderr


def test_eval_analyze_and_train_run_a_models_own_code_only_when_allowed(custom, tmp_path, capsys):
    """transformers builds the stock class of a known model_type when trust_remote_code is off, so
    eval scored, and train trained, another model than the one the directory describes (and train
    then exported it beside the custom code and auto_map)."""
    from train_fixtures.tiny import make_tokenizer, write_config, write_corpus

    model = copy_base(custom, tmp_path / "model")
    make_tokenizer().save_pretrained(model)
    marker = tmp_path / "ran"
    modeling = model / "modeling_x.py"
    modeling.write_text(f"import pathlib; pathlib.Path({str(marker)!r}).write_text('ran')\n" + modeling.read_text())
    corpus = write_corpus(tmp_path / "corpus", files=2, sentences_per_file=40)[0].parent
    cache = tmp_path / "cache"
    config = write_config(tmp_path / "train.yaml", model, tmp_path / "runs" / "a", corpus, cache, tokens=16 * 4 * 2)

    for argv, allow in ((["eval", str(model), "--data", str(corpus), "--cache-dir", str(cache)], "pass --trust-remote-code"),
                        (["analyze", str(model), "--data", str(corpus), "--out", str(tmp_path / "analysis")], "eval --trust-remote-code runs it; analyze never runs a model's own code"),
                        (["train", str(config)], "set trust_remote_code: true in the train config")):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "is its own modeling code (config.json auto_map: AutoConfig -> configuration_x.XConfig" in err and allow in err, err
        assert "Traceback" not in err and len(err.strip().splitlines()) <= 2, err
    assert not marker.exists() and not (tmp_path / "runs").exists() and not (tmp_path / "analysis").exists() and not cache.exists()

    scored = run_cli(tmp_path, "eval", str(model), "--data", str(corpus), "--cache-dir", str(cache), "--trust-remote-code", "--json")
    assert scored.returncode == 0, scored.stderr
    assert json.loads(scored.stdout)["perplexity"] > 1 and marker.exists()  # the model's own class was scored
    marker.unlink()
    trained = run_cli(tmp_path, "train", str(config), "trust_remote_code=true", "--quiet")
    assert trained.returncode == 0, trained.stdout + trained.stderr
    export = tmp_path / "runs" / "a" / "final"
    assert marker.exists()  # the model's own class was trained
    assert "out_gain" in load_file(str(export / "model.safetensors")) and json.loads((export / "config.json").read_text())["auto_map"] == AUTO_MAP


def test_eval_refusal_of_an_unknown_type_names_no_stock_class(custom, tmp_path, capsys):
    # transformers has no class of this type to build in the code's place: the refusal says so
    # instead of naming a stock class that does not exist
    model = copy_base(custom, tmp_path / "model")
    edit_config(model, model_type="x_custom")
    assert main(["eval", str(model), "--data", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "model_type 'x_custom' is not one of transformers' own" in err and "pass --trust-remote-code" in err, err
    assert "stock" not in err and len(err.strip().splitlines()) == 1, err


def test_verify_compares_against_a_base_that_is_its_own_code_only_when_allowed(llama, custom, tmp_path, capsys):
    """verify --base CUSTOM would load the stock class in the base's place and pass the identity
    check against a model nobody loads."""
    recipe = write_recipe(tmp_path, llama, layout=IDENTITY)
    assert main(["apply", str(recipe), "--quiet"]) == 0
    out = tmp_path / "out" / "llama"
    capsys.readouterr()
    assert main(["verify", str(out), "--base", str(custom)]) == 2
    err = capsys.readouterr().err
    assert f"{custom}/config.json maps its model to its own code" in err and "--trust-remote-code" in err, err


def test_a_config_naming_a_hub_kernel_is_loaded_only_when_code_is_allowed(llama, tmp_path, capsys):
    """config.json's attn_implementation "kernels-community/flash-attn" made transformers fetch a kernel from the Hub (compiled
    code the kernels library runs) without --trust-remote-code; offline it failed after a stray line (trial73 F9e)."""
    model = copy_base(llama, tmp_path / "model")
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "attn_implementation": "kernels-community/flash-attn"}))
    (tmp_path / "a.txt").write_text("the cat sat on the mat . " * 20)
    assert main(["eval", str(model), "--data", str(tmp_path / "a.txt"), "--cache-dir", str(tmp_path / "cache")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "asks for attn_implementation 'kernels-community/flash-attn', a kernel from the Hugging Face Hub" in err, err
    assert "pass --trust-remote-code" in err and not (tmp_path / "cache").exists()
    recipe = write_recipe(tmp_path, model, layout="layout:\n  interleave:\n    after: [1]\n    kind: identity\n")  # apply's base too
    err = refused(recipe, capsys)
    listed = copy_base(llama, tmp_path / "listed")  # a config.json that is a JSON list was blamed on the tokenizer (trial73 F9d)
    (listed / "config.json").write_text("[1, 2]")
    assert main(["eval", str(listed), "--data", str(tmp_path / "a.txt"), "--cache-dir", str(tmp_path / "cache")]) == 2
    assert f"{listed}/config.json holds a JSON list, not an object: not a model's config" in capsys.readouterr().err
    assert "attn_implementation 'kernels-community/flash-attn' names a kernel on the Hugging Face Hub" in err and "base.trust_remote_code: true" in err, err
