"""strict_json: what metrics.jsonl, midus_train.json, eval --json and analysis.json are written with."""

from __future__ import annotations

import json
import math

import pytest

from midus_surgery.io.json_text import strict_json


def _refuse(name):
    raise ValueError(f"{name} is not JSON")


def test_non_finite_numbers_become_null_at_any_depth_and_the_rest_is_kept():
    value = {"loss": math.nan, "ppl": math.inf, "rows": [1.5, -math.inf, (2, math.nan)], "nested": {"x": {"y": math.nan}}, "n": 3, "s": "NaN"}
    text = strict_json(value, indent=1)
    assert json.loads(text, parse_constant=_refuse) == {"loss": None, "ppl": None, "rows": [1.5, None, [2, None]],
                                                        "nested": {"x": {"y": None}}, "n": 3, "s": "NaN"}
    with pytest.raises(ValueError):  # what the writers replaced: Python's default is not JSON
        json.loads(json.dumps(value), parse_constant=_refuse)
