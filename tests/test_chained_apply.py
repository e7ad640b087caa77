"""A chain of applies: the base of a recipe is itself an `apply` output (trial55).

Its inserted blocks are base layers to the new recipe, but they are not the pre-trained model's:
a LLaMA-Pro step's identity blocks hold zeroed projections that only training fills. The new plan
records them (``inserted_before``), so `train` with freeze: base trains them with the new blocks
instead of keeping them at zero for good; validate and plan say so, and the model card keeps the
chain's lineage (the first base's Hub id, the layers inserted earlier). A midus_plan.json that
does not describe its model (copied from another output, or edited) is refused by the readers that
act on it rather than trusted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from train_fixtures.tiny import make_model_dir, write_config, write_corpus

from midus_surgery.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny models, one thread

MEMORY = "memory:\n  n_subkeys: 8\n  topk: 4\n  latent_dim: 8\n"


def apply(root: Path, name: str, base: Path, layout: str, extra: str = "") -> Path:
    recipe = root / f"{name}.yaml"
    recipe.write_text(f"base:\n  path: {base}\n{extra}layout:\n{layout}\noutput:\n  dir: {name}\n  dtype: float32\n")
    assert main(["apply", str(recipe), "--quiet"]) == 0
    return root / name


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """base (4 layers) -> LLaMA-Pro (identity blocks after layers 1 and 3: 6 layers) -> MIDUS (a memory block after layer 0: 7)."""
    root = tmp_path_factory.mktemp("chain")
    base = make_model_dir(root / "base", with_plan=False)
    lpro = apply(root, "lpro", base, "  interleave:\n    after: [1, 3]\n    kind: identity", extra="  hub_id: org/tiny-llama\n")
    recipe = root / "midus.yaml"
    recipe.write_text(f"base:\n  path: {lpro}\nlayout:\n  interleave:\n    after: [0]\n    kind: memory\n{MEMORY}"
                      "output:\n  dir: midus\n  dtype: float32\n")
    write_corpus(root / "corpus", files=2, sentences_per_file=40)
    return {"root": root, "lpro": lpro, "recipe": recipe}


def test_validate_and_plan_say_which_base_layers_an_earlier_apply_inserted(chain, capsys):
    assert main(["validate", str(chain["recipe"])]) == 0
    said = capsys.readouterr().out
    assert ("note: the base is an output of `midus-surgery apply`: its layers 2 (identity), 5 (identity) were inserted by that apply or one before it. "
            "They are base layers to this recipe") in said
    assert main(["plan", str(chain["recipe"]), "--json"]) == 0
    layers = json.loads(capsys.readouterr().out)["layers"]
    assert [(layer["index"], layer["source"], layer["kind"], layer.get("inserted_before")) for layer in layers] == [
        (0, 0, "base", None), (1, 0, "memory", None), (2, 1, "base", None), (3, 2, "base", "identity"),
        (4, 3, "base", None), (5, 4, "base", None), (6, 5, "base", "identity")]


def test_train_with_freeze_base_trains_the_blocks_an_earlier_apply_inserted(chain, capsys):
    out = chain["root"] / "midus"
    assert main(["apply", str(chain["recipe"]), "--quiet"]) == 0
    plan = json.loads((out / "midus_plan.json").read_text())
    assert [layer["index"] for layer in plan["layers"] if layer.get("inserted_before")] == [3, 6]
    config = write_config(chain["root"] / "train.yaml", out, chain["root"] / "run", chain["root"] / "corpus", chain["root"] / "cache",
                          freeze="base")
    capsys.readouterr()
    assert main(["train", str(config), "--dry-run"]) == 0
    assert "trained layers (the inserted blocks' indices): 1, 3, 6 (3, 6 inserted by an earlier apply of its base)" in capsys.readouterr().out

    card = (out / "README.md").read_text()
    assert "base_model: org/tiny-llama" in card  # the chain's first base, for the Hub's lineage
    assert "# MIDUS (Memory-Infused Depth Up-Scaling) of `lpro`" in card  # the title names this recipe's own base
    assert ("Its base is itself a `midus-surgery apply` output: its layers 2 (identity), 5 (identity) were inserted by that apply or one before it. "
            "The chain starts from `org/tiny-llama`.") in card
    assert "| 3 | 2 | base (was identity) |" in card

    # a plan that does not describe its model: train and verify refuse to act on it
    edited = dict(plan, layers=[dict(layer, kind="memory" if layer["index"] == 2 else "base" if layer["index"] == 1 else layer["kind"])
                                for layer in plan["layers"]])
    (out / "midus_plan.json").write_text(json.dumps(edited))
    assert main(["train", str(config), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert ("`base` reads which layers were inserted from " in err and "which does not describe this model: it says output layer 1 is "
            "base from base layer 0, and config.json's layer map says memory from base layer 0") in err
    assert main(["verify", str(out)]) == 1
    assert "FAIL plan: midus_plan.json does not describe this model: it says output layer 1 is base" in capsys.readouterr().out


@pytest.mark.parametrize("text", ["copy[/]", "[link=https://e.vil/x]copy[/link][blink]"])
def test_plan_shows_a_base_plans_text_as_text_not_markup(chain, tmp_path, capsys, text):
    """trial111: plan's Layer map printed a chained base's midus_plan.json `inserted_before` as rich markup: `copy[/]`
    crashed plan (MarkupError), and `[link=...]` put a hyperlink into the terminal. It is shown as the file holds it."""
    import shutil

    base = tmp_path / "lpro"
    shutil.copytree(chain["lpro"], base)
    data = json.loads((base / "midus_plan.json").read_text())
    for layer in data["layers"]:
        if layer["kind"] != "base":
            layer["inserted_before"] = text
    (base / "midus_plan.json").write_text(json.dumps(data))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"base:\n  path: {base}\nlayout:\n  interleave:\n    after: [0]\n    kind: transformer\noutput:\n  dir: out\n")
    capsys.readouterr()
    assert main(["plan", str(recipe), "--tensors"]) == 0
    said = capsys.readouterr().out
    assert f"(was {text})" in said, said
