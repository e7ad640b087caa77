"""strict_json: what metrics.jsonl, midus_train.json, eval --json and analysis.json are written with."""

from __future__ import annotations

import json
import math

import pytest

from midus_surgery.io.json_text import loads_checked, strict_json
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
    assert loads_checked('{"x": 1.5e300, "n": -2, "s": "1e400", "lr": Infinity}') == {"x": 1.5e300, "n": -2, "s": "1e400", "lr": math.inf}
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
