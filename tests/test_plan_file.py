"""midus_plan.json: each fact once, one reader, and the layouts written before still load, verify
and drive `freeze: base`.

Today's layout (``Plan.to_json`` without tensors): the layer map is ``layers``, the anatomy
``anatomy``, where the decoder layers are ``layers_path``, and ``midus`` holds only the memory
settings (``hml``, ``share_bank``). Plans written before repeated the layer map and the anatomy
inside ``midus`` (it was the config's ``midus`` dict, which keeps its own format), and the oldest
had no ``layers_path``.
"""

from __future__ import annotations

import json
import os

import pytest
from train_fixtures.tiny import make_midus_output, write_config, write_corpus

from midus_surgery.compiler.plan import PLAN_FILE, read_plan_file, read_plan_json
from midus_surgery.errors import MidusError
from midus_surgery.train.config import load_train_config
from midus_surgery.train.params import choose_params, inserted_layers


@pytest.fixture(scope="module")
def midus_output(tmp_path_factory):
    """A MIDUS output of the tiny Llama (4 layers; a memory block after every second layer)."""
    pytest.importorskip("midus_surgery.model.hml")
    root = tmp_path_factory.mktemp("plan_file")
    out = make_midus_output(root)
    write_corpus(root / "corpus", files=1, sentences_per_file=20)
    return {"root": root, "out": out, "plan": json.loads((out / PLAN_FILE).read_text()),
            "config": json.loads((out / "config.json").read_text())}


def old_layouts(plan: dict, config_midus: dict) -> dict[str, dict]:
    """The same plan as earlier versions wrote it: ``midus`` was the config's whole ``midus`` dict
    (layer map, memory layers, anatomy, base model type again); before that, no ``layers_path``;
    before the rename, plain copies were kind ``transformer``."""
    repeated = {**plan, "midus": config_midus}
    no_path = {k: v for k, v in repeated.items() if k != "layers_path"}
    return {"midus repeated the layer map and anatomy": repeated, "no layers_path": no_path}


def test_the_plan_holds_each_fact_once(midus_output):
    plan, config = midus_output["plan"], midus_output["config"]
    assert plan["layers_path"] == plan["anatomy"]["layers_path"] == "model.layers"
    assert [layer["kind"] for layer in plan["layers"]] == ["base", "base", "memory", "base", "base", "memory"]
    assert set(plan["midus"]) == {"hml", "share_bank"}  # the layer map, anatomy and memory layers are said once, above
    assert "tensors" not in plan
    # the model's own config keeps its format: modeling_midus reads all of it there
    assert {"layer_map", "memory_layers", "anatomy", "hml", "share_bank", "base_model_type"} <= set(config["midus"])
    assert plan["midus"] == {k: config["midus"][k] for k in ("hml", "share_bank")}
    assert read_plan_json(plan) == plan  # today's layout reads as itself


def test_the_plan_and_the_card_say_the_context_the_flops_are_counted_at(midus_output):
    """The FLOPs per token are the forward pass's at flops_seq_len tokens of context: midus_plan.json holds it beside
    them and the model card says it; a plan written before it was recorded reads with it unknown (null)."""
    plan = midus_output["plan"]
    assert plan["flops_seq_len"] == 2048 and set(plan["flops_per_token"]) == {"base", "dus", "plan"}
    card = (midus_output["out"] / "README.md").read_text()
    f = plan["flops_per_token"]
    assert f"| forward FLOPs per token at a context of 2,048 tokens (estimate) | {f['base']:,} | {f['dus']:,} | {f['plan']:,} |" in card
    older = {k: v for k, v in plan.items() if k != "flops_seq_len"}
    assert read_plan_json(older) == {**plan, "flops_seq_len": None}


def test_the_card_says_where_a_shared_bank_is_counted(midus_output, tmp_path):
    """With share_bank the card's layer rows leave out the bank the memory layers share: a sentence says where it is."""
    out = make_midus_output(tmp_path, memory="  share_bank: true\n")
    card = (out / "README.md").read_text()
    assert ("The latent bank the 2 memory layers share (`midus_shared_bank.weight`, 512 parameters) is counted once in the "
            "totals above and in no layer's row.") in card  # 8 x 8 slots of 8
    assert "latent bank the" not in (midus_output["out"] / "README.md").read_text()


def test_older_layouts_read_as_todays(midus_output):
    plan, config = midus_output["plan"], midus_output["config"]
    for what, old in old_layouts(plan, config["midus"]).items():
        assert read_plan_json(old) == plan, what
        assert inserted_layers(old) == inserted_layers(plan) == ("model.layers", [2, 5]), what
    copies = {**plan, "layers": [{**layer, "kind": "transformer" if layer["kind"] == "memory" else layer["kind"]} for layer in plan["layers"]]}
    assert [layer["kind"] for layer in read_plan_json(copies)["layers"]][2] == "copy"
    assert read_plan_json(copies)["midus"] is None  # no memory blocks: no memory settings


def test_a_copy_only_plan_without_layers_path_finds_the_layers_by_name():
    plan = {"layers": [{"index": i, "source": s, "kind": k} for i, s, k in ((0, 0, "base"), (1, 0, "copy"), (2, 1, "base"))],
            "anatomy": None, "midus": None}
    names = [f"model.layers.{i}.mlp.weight" for i in range(3)] + ["model.embed_tokens.weight"]
    assert inserted_layers(plan, names) == ("model.layers", [1])
    with pytest.raises(MidusError, match="no layers_path"):
        inserted_layers(plan)


@pytest.mark.parametrize("layout", ["midus repeated the layer map and anatomy", "no layers_path"])
def test_an_output_with_an_older_plan_drives_freeze_base_and_verifies(layout, midus_output, tmp_path):
    import shutil

    from midus_surgery.emit.verify import verify
    from midus_surgery.train.evaluate import load_causal_lm

    out = tmp_path / "out"
    shutil.copytree(midus_output["out"], out)
    old = old_layouts(midus_output["plan"], midus_output["config"]["midus"])[layout]
    (out / PLAN_FILE).write_text(json.dumps(old, indent=2))
    plan = read_plan_file(out)
    assert plan == midus_output["plan"]

    model = load_causal_lm(out)
    loaded = load_train_config(write_config(tmp_path / "run.yaml", out, tmp_path / "run", midus_output["root"] / "corpus",
                                            tmp_path / "cache", freeze="base"))
    groups = choose_params(model, "base", plan, loaded)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert groups.trained_layers == [2, 5]
    assert trained and all(n.startswith(("model.layers.2.", "model.layers.5.")) or "midus_shared_bank" in n for n in trained)
    assert {n for n, _ in groups.memory} <= trained and groups.memory

    checks = verify(out, report=lambda _: None)
    assert checks and all(c.ok for c in checks), [c for c in checks if not c.ok]
    assert any(c.name == "identity" and "must be 0" in c.detail for c in checks)  # still read as function-preserving


def test_an_unreadable_plan_is_one_line(tmp_path):
    assert read_plan_file(tmp_path) is None  # not made by apply
    (tmp_path / PLAN_FILE).write_text("{not json")
    with pytest.raises(MidusError, match=r"midus_plan\.json: not a readable plan \(.+\)$"):
        read_plan_file(tmp_path)
    (tmp_path / PLAN_FILE).write_text("[1, 2]")
    with pytest.raises(MidusError, match="not a JSON object"):
        read_plan_file(tmp_path)
    (tmp_path / PLAN_FILE).unlink()
    os.mkfifo(tmp_path / PLAN_FILE)  # a pipe read as "no plan" (verify ran the generic checks only), or waited on (trial66)
    with pytest.raises(MidusError, match=r"midus_plan\.json: not a readable plan \(.+midus_plan\.json is a named pipe, not a regular file\)$"):
        read_plan_file(tmp_path)


def test_a_plan_nested_too_deeply_is_one_line(tmp_path):
    """trial95 F6: read with bare json.loads, a midus_plan.json nested 200,000 deep was a RecursionError traceback in
    verify and train (read_plan_file caught ValueError and others, not RecursionError)."""
    (tmp_path / PLAN_FILE).write_text('{"a": ' + "[" * 200_000 + "]" * 200_000 + "}")
    with pytest.raises(MidusError, match=r"midus_plan\.json: not a readable plan \(ValueError: JSON nested too deeply to read\)$"):
        read_plan_file(tmp_path)
