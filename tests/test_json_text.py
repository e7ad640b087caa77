"""strict_json: what metrics.jsonl, midus_train.json, eval --json and analysis.json are written with."""

from __future__ import annotations

import json
import math

import pytest

from midus_surgery.io.json_text import loads_as_transformers, loads_checked, strict_json
from midus_surgery.io.output_dir import MARKER, checkpoint_extras, read_marker
from midus_surgery.train.checkpoint import STATE_FILE, _safetensors_problem, read_checkpoint_state
from midus_surgery.train.evaluate import ModelLoadError, check_model_dir


def _refuse(name):
    raise ValueError(f"{name} is not JSON")


def test_non_finite_numbers_become_null_at_any_depth_and_the_rest_is_kept():
    value = {"loss": math.nan, "ppl": math.inf, "rows": [1.5, -math.inf, (2, math.nan)], "nested": {"x": {"y": math.nan}}, "n": 3, "s": "NaN"}
    text = strict_json(value, indent=1)
    assert json.loads(text, parse_constant=_refuse) == {"loss": None, "ppl": None, "rows": [1.5, None, [2, None]],
                                                        "nested": {"x": {"y": None}}, "n": 3, "s": "NaN"}
    with pytest.raises(ValueError):  # what the writers replaced: Python's default is not JSON
        json.loads(json.dumps(value), parse_constant=_refuse)


DEEP = "[" * 100_000 + "]" * 100_000  # past Python's JSON reader: a RecursionError, not a ValueError


def test_a_hostile_json_file_is_a_value_error_to_its_readers_never_a_traceback(tmp_path):
    """trial92 F8: brackets nested 100,000 deep (RecursionError) and 1e400 (read as inf, an OverflowError where it became an
    int) were tracebacks from the marker, a checkpoint's state and weights, and eval's config.json."""
    with pytest.raises(ValueError, match="nested too deeply"):
        loads_checked(DEEP)
    with pytest.raises(ValueError, match="1e400 is out of range"):
        loads_checked('{"data_offsets": [0, 1e400]}')
    assert loads_checked('{"x": 1.5e300, "n": -2, "s": "1e400", "lr": Infinity}', special_floats=True) == {"x": 1.5e300, "n": -2, "s": "1e400", "lr": math.inf}
    (tmp_path / MARKER).write_text(DEEP)
    assert read_marker(tmp_path) is None
    (tmp_path / STATE_FILE).write_text(DEEP)
    assert checkpoint_extras(tmp_path) == []
    with pytest.raises(ValueError, match=f"{STATE_FILE}: unreadable .*nested too deeply"):
        read_checkpoint_state(tmp_path)
    header = b'{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,1e400]}}'
    (tmp_path / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 4)
    assert "model.safetensors: not a safetensors file (ValueError: the number 1e400 is out of range)" in _safetensors_problem(tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(DEEP)
    with pytest.raises(ModelLoadError, match="cannot read config.json .*nested too deeply"):
        check_model_dir(tmp_path)


@pytest.mark.parametrize("literal", ["Infinity", "-Infinity", "NaN"])
def test_a_checkpoint_header_with_a_non_finite_literal_is_a_broken_checkpoint_not_a_traceback(tmp_path, literal):
    """trial95 F5: parse_float refused 1e400, but the Infinity/NaN literals went through parse_constant: a header's
    [0, Infinity] offsets were an OverflowError traceback at a resume (int(inf))."""
    with pytest.raises(ValueError, match=f"{literal} is not a JSON number"):
        loads_checked(f'[0, {literal}]')
    header = f'{{"w":{{"dtype":"F32","shape":[1],"data_offsets":[0,{literal}]}}}}'.encode()
    (tmp_path / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 4)
    said = _safetensors_problem(tmp_path / "model.safetensors")
    assert f"model.safetensors: not a safetensors file (ValueError: {literal} is not a JSON number)" in said


def test_a_checkpoint_state_with_a_huge_count_is_unreadable_not_a_traceback(tmp_path):
    """trial95 F5: samples_seen of 10**400 (under Python's 4,300-digit limit) passed the reader and was an OverflowError
    traceback where the resume divided it into a float."""
    with pytest.raises(ValueError, match="out of range .*64-bit"):
        loads_checked(str(10**400))
    with pytest.raises(ValueError, match="out of range .*64-bit"):
        loads_checked(str(-(2**63)))
    assert loads_checked(str(2**63 - 1)) == 2**63 - 1
    state = {"step": 8, "samples_seen": 10**400, "tokens_seen": 10**401, "data": {}}
    (tmp_path / STATE_FILE).write_text(json.dumps(state))
    with pytest.raises(ValueError, match=f"{STATE_FILE}: unreadable .*out of range"):
        read_checkpoint_state(tmp_path)


def test_files_transformers_writes_still_read(tmp_path):
    """What transformers reads, the tool reads: an older transformers wrote Mamba2's time_step_limit as [0.0, Infinity],
    and many tokenizer_config.json files say model_max_length int(1e30), past 64 bits. Deep nesting is still refused."""
    text = '{"time_step_limit": [0.0, Infinity], "x": NaN, "model_max_length": 1000000000000000019884624838656}'
    data = loads_as_transformers(text)
    assert data["time_step_limit"] == [0.0, math.inf] and math.isnan(data["x"]) and data["model_max_length"] == int(1e30)
    with pytest.raises(ValueError, match="nested too deeply"):
        loads_as_transformers(DEEP)
    # the newer transformers' own writing is plain JSON
    from transformers import LlamaConfig

    LlamaConfig(vocab_size=32, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16).save_pretrained(tmp_path)
    assert loads_checked((tmp_path / "config.json").read_text())["model_type"] == "llama"
    (tmp_path / "config.json").write_text('{"model_type": "llama", "time_step_limit": [0.0, Infinity], "max_position_embeddings": 64}')
    check_model_dir(tmp_path)  # no ValueError: read as transformers reads it


def test_other_json_of_a_model_folder_nested_too_deeply_is_a_value_error(tmp_path):
    """trial95 F6: a tokenizer_config.json's auto_map (apply copies the code it names) and a MIDUS output's config.json
    (its shipped class) were read with bare json.loads: a RecursionError where their readers catch ValueError."""
    from midus_surgery.io.tokenizer_files import tokenizer_code_files
    from midus_surgery.model import shipped_causal_lm_class

    (tmp_path / "tokenizer_config.json").write_text('{"auto_map": ' + "[" * 200_000 + "]" * 200_000 + "}")
    assert tokenizer_code_files(tmp_path / "tokenizer_config.json") == []
    (tmp_path / "config.json").write_text(DEEP)
    with pytest.raises(ValueError, match="nested too deeply"):
        shipped_causal_lm_class(tmp_path)


def test_every_reader_of_a_tokenizer_configs_code_reads_what_transformers_reads(tmp_path):
    """transformers reads tokenizer_config.json with plain json.load: a 1e400 beside the auto_map is infinity to it, and
    the code the file names loads. The readers that say what code a folder's tokenizer names (apply's checks, eval's
    refusal without --trust-remote-code) read the same, not a stricter parse that saw no code at all; nesting past
    what json can parse is a ValueError, as it fails transformers too."""
    from midus_surgery.io.json_text import loads_as_tokenizer_config
    from midus_surgery.io.tokenizer_files import auto_tokenizer_entry
    from midus_surgery.train.evaluate import _own_tokenizer_code

    text = '{"model_max_length": 1e400, "auto_map": {"AutoTokenizer": [null, "tok.Tok"]}}'
    assert loads_as_tokenizer_config(text)["model_max_length"] == math.inf
    with pytest.raises(ValueError):
        loads_as_transformers(text)  # the reader of config.json and the weights index stays strict
    (tmp_path / "tokenizer_config.json").write_text(text)
    assert auto_tokenizer_entry(tmp_path) == [None, "tok.Tok"]
    assert _own_tokenizer_code(tmp_path) == "tok.Tok"
    with pytest.raises(ValueError):
        loads_as_tokenizer_config("[" * 100_000 + "]" * 100_000)
