"""tools/bench_cpt.py's command line: --recipe ROW=PATH swaps one row's recipe, and a wrong row, a
missing file or a recipe of another kind is one usage error (exit 2), not a mislabelled table."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from tool_modules import load_tool

ROOT = Path(__file__).resolve().parents[1]
EVERY2 = ROOT / "recipes" / "ablation" / "every2"
bc = load_tool("bench_cpt")


def _cli(monkeypatch, *args):
    monkeypatch.setattr(sys, "argv", ["bench_cpt.py", *args])
    return bc.cli()


def test_recipe_overrides_map_rows_to_recipes_and_their_outputs(monkeypatch):
    lp = EVERY2 / "smollm2-135m-llama-pro-every2.yaml"
    midus = EVERY2 / "smollm2-135m-midus-qs-hidden-every2.yaml"
    a = _cli(monkeypatch, "--recipe", f"LLaMA-Pro={lp}", "--midus-recipe", str(midus), "--no-doc")
    assert a.recipes == {"LLaMA-Pro": str(lp), "MIDUS": str(midus)}
    assert bc.recipe_output(str(lp)) == ROOT / "work" / "out" / "smollm2-135m-llama-pro-every2"
    assert _cli(monkeypatch, "--no-doc").recipes == {}


@pytest.mark.parametrize("spec, message", [
    ("MIDUS", "expected ROW=PATH"),
    ("Memory=recipes/smollm2-135m-midus.yaml", "expected ROW=PATH with ROW one of DUS, LLaMA-Pro, MIDUS"),
    ("MIDUS=recipes/no-such-recipe.yaml", "no such file: recipes/no-such-recipe.yaml"),
    ("LLaMA-Pro=recipes/smollm2-135m-midus.yaml", "inserts kind 'memory', the LLaMA-Pro row is kind 'identity'"),
])
def test_bad_recipe_override_is_a_usage_error(monkeypatch, capsys, spec, message):
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as exc:
        _cli(monkeypatch, "--recipe", spec)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_the_zoom_panel_appears_only_when_dus_trained():
    curve = [[1024, 3.0], [2048, 2.9]]
    assert bc.plot_panels({"base": {}, "LLaMA-Pro": {"curve": curve}, "MIDUS": {"curve": curve}}) == [("all runs", ())]
    with_dus = bc.plot_panels({"DUS": {"curve": curve}, "MIDUS": {"curve": curve}})
    assert with_dus == [("all runs", ()), ("without DUS (zoom)", ("DUS",))]
