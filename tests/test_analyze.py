"""`midus-surgery analyze` (issue 27): head importance and slot usage of a MIDUS model on held-out text.

An untrained function-preserving output adds nothing through its memory (the readout starts at
zero), so zeroing any memory head changes the loss by exactly 0 and the memory's norm is 0; after
training, heads matter and the memory writes into the residual stream. A LLaMA-Pro output is
analysed by its inserted blocks' attention heads, again exactly 0 untrained."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from train_fixtures.tiny import make_model_dir, write_config, write_corpus

from midus_surgery.cli import main
from midus_surgery.train.config import load_train_config
from midus_surgery.train.runner import train

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from midus_surgery.compiler.planner import plan_recipe
    from midus_surgery.emit.emitter import emit

    root = tmp_path_factory.mktemp("analyze")
    write_corpus(root / "corpus", files=2, sentences_per_file=60)
    base = make_model_dir(root / "base", with_plan=False)
    out = {"root": root, "base": base}
    for kind in ("identity", "memory"):
        # query_norm batch: its running statistics travel from apply through training to the export
        memory = "memory:\n  n_subkeys: 8\n  topk: 4\n  latent_dim: 8\n  share_bank: true\n  query_norm: batch\n" if kind == "memory" else ""
        recipe = root / f"{kind}.yaml"
        recipe.write_text(f"base:\n  path: {base}\nlayout:\n  interleave:\n    after_every: 2\n    kind: {kind}\n{memory}"
                          f"output:\n  dir: {kind}-out\n  dtype: float32\n")
        out[kind] = emit(plan_recipe(recipe), progress=False).out_dir
        cfg = write_config(root / f"{kind}-run.yaml", out[kind], root / f"{kind}-run", root / "corpus", root / "cache",
                           tokens=16 * 8 * 6, micro_batch_size=8, **{"eval.at_start": False, "optim.lr": 1e-2, "memory.lr": 3e-2})
        train(load_train_config(cfg))
        out[f"{kind}-trained"] = root / f"{kind}-run" / "final"
    # the same run with the retrieval frozen: only the memory's values train
    cfg = write_config(root / "frozen-run.yaml", out["memory"], root / "frozen-run", root / "corpus", root / "cache",
                       tokens=16 * 8 * 6, micro_batch_size=8, **{"eval.at_start": False, "optim.lr": 1e-2, "memory.lr": 3e-2,
                                                                 "memory.retrieval": "frozen"})
    out["frozen-said"] = []
    train(load_train_config(cfg), echo=out["frozen-said"].append)
    out["frozen-trained"] = root / "frozen-run" / "final"
    out["frozen-cfg"] = cfg
    # and with the base frozen too (tools/bench_cpt.py's protocol): only the inserted blocks' values train
    cfg = write_config(root / "frozen-base-run.yaml", out["memory"], root / "frozen-base-run", root / "corpus", root / "cache",
                       tokens=16 * 8 * 6, micro_batch_size=8, **{"eval.at_start": False, "optim.lr": 1e-2, "memory.lr": 3e-2,
                                                                 "memory.retrieval": "frozen", "freeze": "base"})
    out["frozen-base-said"] = []
    train(load_train_config(cfg), echo=out["frozen-base-said"].append)
    out["frozen-base-trained"] = root / "frozen-base-run" / "final"
    return out


def analyze(world, model: str, out: str, capsys) -> dict:
    assert main(["analyze", str(world[model]), "--data", str(world["root"] / "corpus"), "--out", str(world["root"] / out),
                 "--block-size", "16", "--max-blocks", "6", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {world['root'] / out}" in printed
    for png in ("head_importance.png",):
        assert (world["root"] / out / png).read_bytes()[:4] == b"\x89PNG"
    return json.loads((world["root"] / out / "analysis.json").read_text())


def test_an_untrained_memory_is_worth_exactly_nothing(world, capsys):
    result = analyze(world, "memory", "untrained", capsys)
    assert result["what"] == "memory heads" and list(result["head_importance"]) == ["2", "5"]
    assert all(len(row) == 4 and all(d == 0.0 for d in row) for row in result["head_importance"].values())
    for usage in result["slot_usage"].values():
        assert usage["slots"] == 64 and usage["memory_to_residual_norm"] == 0.0
        assert all(0 < f <= 1 for f in usage["used_fraction"]) and all(0 < e <= 1 for e in usage["entropy_vs_uniform"])
    assert (world["root"] / "untrained" / "slot_usage.png").is_file()


def test_slots_only_makes_one_pass_and_no_heatmap(world, capsys):
    assert main(["analyze", str(world["memory-trained"]), "--data", str(world["root"] / "corpus"), "--out", str(world["root"] / "slots"),
                 "--block-size", "16", "--max-blocks", "6", "--slots-only", "--quiet"]) == 0
    assert "(analysis.json, slot_usage.png)" in capsys.readouterr().out
    result = json.loads((world["root"] / "slots" / "analysis.json").read_text())
    assert result["head_importance"] == {} and list(result["slot_usage"]) == ["2", "5"]
    assert not (world["root"] / "slots" / "head_importance.png").exists()


def test_slot_usage_counts_the_top_one_percent_as_ceil_of_n_squared_over_100_and_entropy_over_all_slots():
    """docs/evaluate.md's conventions (trial155 F3): the top 1% of 256 slots is 3 slots, and the entropy is over log(256),
    so 4 slots read evenly are 0.25 of a uniform choice, not 1."""
    from midus_surgery.downstream.analyze import SlotCounter

    counter = SlotCounter(heads=2, slots=256)
    slots = torch.tensor([[[0, 1], [2, 3]], [[5, 5], [5, 7]]])  # [heads, tokens, k]: head 0 reads 4 slots once each
    counter.observe(None, slots, torch.zeros(1))
    usage = counter.summary()
    assert usage["used_fraction"] == [4 / 256, 2 / 256]
    assert usage["entropy_vs_uniform"][0] == pytest.approx(math.log(4) / math.log(256))
    assert usage["top1pct_share"] == [3 / 4, 1.0]  # ceil(2.56) = 3 slots of head 0's 4 read ones; head 1 reads only 2


def test_a_trained_memory_matters_and_writes_into_the_residual_stream(world, capsys):
    result = analyze(world, "memory-trained", "trained", capsys)
    deltas = [d for row in result["head_importance"].values() for d in row]
    assert any(d != 0.0 for d in deltas)
    for usage in result["slot_usage"].values():
        assert usage["memory_to_residual_norm"] > 0
        # each head selects topk=4 slots per token: the top 1% (one slot of 64) holds at least 1/64 of them
        assert all(1 / 64 <= s <= 1 for s in usage["top1pct_share"])


def test_llama_pro_outputs_are_analysed_by_their_inserted_attention_heads(world, capsys):
    untrained = analyze(world, "identity", "lp-untrained", capsys)
    assert untrained["what"] == "attention heads of the inserted blocks" and untrained["slot_usage"] == {}
    # evaluate.md: slot_usage.png for a model with Memory blocks only
    assert sorted(p.name for p in (world["root"] / "lp-untrained").iterdir()) == [".midus-surgery", "analysis.json", "head_importance.png"]
    assert all(d == 0.0 for row in untrained["head_importance"].values() for d in row)  # zeroed o_proj: nothing to lose
    trained = analyze(world, "identity-trained", "lp-trained", capsys)
    assert list(trained["head_importance"]) == list(untrained["head_importance"])
    assert any(d != 0.0 for row in trained["head_importance"].values() for d in row)


def test_dus_outputs_planned_from_the_headers_are_analysed_too(world, capsys):
    """A copy-only apply plans from the safetensors headers and records no anatomy: the output's own
    layers are traced (it was refused as having 'no inserted block')."""
    from midus_surgery.compiler.planner import plan_for_apply
    from midus_surgery.emit.emitter import emit
    from midus_surgery.recipe.schema import load_recipe

    recipe = world["root"] / "dus.yaml"
    recipe.write_text(f"base:\n  path: {world['base']}\nlayout:\n  interleave:\n    after_every: 2\n    kind: copy\noutput:\n  dir: dus-out\n")
    planned, why_full = plan_for_apply(load_recipe(recipe))
    assert why_full is None  # the header planner's plan, without anatomy
    world["dus"] = emit(planned, progress=False).out_dir
    result = analyze(world, "dus", "dus-analysis", capsys)
    assert result["what"] == "attention heads of the inserted blocks" and list(result["head_importance"]) == ["2", "5"]
    assert any(d != 0.0 for row in result["head_importance"].values() for d in row)  # a copy is not zeroed: its heads matter


def test_errors_are_one_line(world, capsys):
    corpus = str(world["root"] / "corpus")
    assert main(["analyze", str(world["base"]), "--data", corpus, "--out", str(world["root"] / "base-an")]) == 2
    assert "no Memory block and no inserted block" in capsys.readouterr().err
    assert main(["analyze", str(world["memory"]), "--data", corpus, "--out", str(world["root"] / "corpus" / "an")]) != 0
    assert "inside" in capsys.readouterr().err
    assert not (world["root"] / "corpus" / "an").exists()
    # a model folder that is not there: said at once, not taken for a Hub repository (about a minute of retries offline)
    for model, said in ((world["root"] / "missing", "is not a directory"), (world["root"] / "corpus", "is not a model directory (no config.json)")):
        assert main(["analyze", str(model), "--data", corpus, "--out", str(world["root"] / "an-missing")]) == 2
        assert said in capsys.readouterr().err
    assert main(["analyze", str(world["memory"]), "--data", corpus, "--out", str(world["root"] / "an-missing"),
                 "--fixed-retrieval", str(world["root"] / "missing")]) == 2
    assert "missing is not a directory" in capsys.readouterr().err
    assert not (world["root"] / "an-missing").exists()


def test_an_earlier_analysis_is_replaced_only_with_overwrite(world, tmp_path, capsys):
    """analyze --out replaced an earlier analysis without a word, another model's head importance too (trial82 F3)."""
    argv = ["--data", str(world["root"] / "corpus"), "--out", str(tmp_path / "an"), "--quiet", "--block-size", "16", "--max-blocks", "2",
            "--slots-only"]
    assert main(["analyze", str(world["memory-trained"]), *argv]) == 0
    first = (tmp_path / "an" / "analysis.json").read_text()
    assert main(["analyze", str(world["memory"]), *argv]) == 2
    err = capsys.readouterr().err
    assert "already exists (an earlier output of midus-surgery analyze" in err and "pass --overwrite to replace it" in err, err
    assert (tmp_path / "an" / "analysis.json").read_text() == first
    assert main(["analyze", str(world["memory"]), *argv, "--overwrite"]) == 0
    assert json.loads((tmp_path / "an" / "analysis.json").read_text())["model"] == str(world["memory"])

def test_a_plan_that_does_not_name_the_models_layers_is_one_line(world, tmp_path, capsys):
    """An edited midus_plan.json (no layers_path, or one naming no module list) was an AttributeError traceback (trial83 F4)."""
    import shutil

    plan_of = json.loads((world["identity"] / "midus_plan.json").read_text())
    anatomy = {k: v for k, v in plan_of.get("anatomy", {}).items() if k != "layers_path"}
    for case, plan in (("none", {k: v for k, v in plan_of.items() if k not in ("layers_path", "anatomy")} | {"anatomy": anatomy}),
                       ("class", {**plan_of, "layers_path": "model.layers.__class__"})):
        model = tmp_path / case
        shutil.copytree(world["identity"], model)
        (model / "midus_plan.json").write_text(json.dumps(plan))
        assert main(["analyze", str(model), "--data", str(world["root"] / "corpus"), "--out", str(tmp_path / f"an-{case}"), "--quiet",
                     "--block-size", "16", "--max-blocks", "2"]) == 2
        err = capsys.readouterr().err
        said = "not a readable plan (it names no layers_path" if case == "none" else "does not describe this model's layers"
        assert f"{model / 'midus_plan.json'}: {said}" in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / f"an-{case}").exists()


def test_a_config_far_larger_than_its_weights_is_refused_from_the_headers(world, tmp_path, capsys):
    """analyze, verify and train built the model config.json describes before comparing it with the weights: a config of
    400B parameters over a tiny model's took the machine's memory (trial83 F3). Refused from the headers now, as eval does."""
    import shutil

    giant = tmp_path / "giant"
    shutil.copytree(world["base"], giant)
    config = json.loads((giant / "config.json").read_text())
    (giant / "config.json").write_text(json.dumps({**config, "hidden_size": 16384, "intermediate_size": 53248, "num_hidden_layers": 126,
                                                   "num_attention_heads": 128, "num_key_value_heads": 8, "vocab_size": 128256}))
    said = f"{giant}: the weights do not match the model's architecture: "
    assert main(["analyze", str(giant), "--data", str(world["root"] / "corpus"), "--out", str(tmp_path / "an"), "--quiet"]) == 2
    assert said in capsys.readouterr().err and not (tmp_path / "an").exists()
    assert main(["verify", str(giant)]) == 1
    assert f"FAIL load: {said}" in capsys.readouterr().out
    cfg = write_config(tmp_path / "run.yaml", giant, tmp_path / "run", world["root"] / "corpus", tmp_path / "cache", tokens=16 * 8)
    assert main(["train", str(cfg), "--quiet"]) == 2
    assert said in capsys.readouterr().err and not (tmp_path / "run").exists()

def test_jsonl_data_names_its_text_field_and_the_cache_its_folder(world, tmp_path, capsys):
    """analyze read JSONL only from a 'text' field, and its error pointed at eval's option (trial48)."""
    texts = [p.read_text() for p in sorted((world["root"] / "corpus").iterdir()) if p.is_file()]
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "held.jsonl").write_text("".join(json.dumps({"body": t}) + "\n" for t in texts))
    argv = ["analyze", str(world["memory-trained"]), "--data", str(tmp_path / "data" / "held.jsonl"), "--block-size", "16", "--max-blocks", "2",
            "--slots-only", "--quiet", "--cache-dir", str(tmp_path / "cache")]
    assert main([*argv, "--out", str(tmp_path / "an-text")]) == 3  # a data error, as in eval and train
    assert "no 'text' field (it has: ['body']); name the field with data.text_field (train) or --text-field (eval, analyze)" in capsys.readouterr().err
    assert main([*argv, "--out", str(tmp_path / "an-body"), "--text-field", "body"]) == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "an-body" / "analysis.json").read_text())["held_out"]["blocks"] == 2
    assert any((tmp_path / "cache").iterdir())
    assert "NUL" not in capsys.readouterr().out
    # a record holding NUL characters: analysed as it is, and noted (trial48)
    (tmp_path / "data" / "held.jsonl").write_text("".join(json.dumps({"body": t + "\0\0"}) + "\n" for t in texts))
    assert main([*argv, "--out", str(tmp_path / "an-nul"), "--text-field", "body"]) == 0
    note = f"note: NUL characters in {tmp_path / 'data' / 'held.jsonl'} ({2 * len(texts)}): text rarely holds them"
    assert note in capsys.readouterr().out
    assert json.loads((tmp_path / "an-nul" / "analysis.json").read_text())["notes"][0].startswith(note)


@pytest.mark.parametrize("inside", ["memory", "corpus"])
def test_the_token_cache_may_not_lie_inside_the_model_or_the_data(world, tmp_path, capsys, monkeypatch, inside):
    """MIDUS_CACHE inside the model or the data: eval refused it, analyze wrote its token cache into them (trial39)."""
    target = world[inside] if inside == "memory" else world["root"] / "corpus"
    before = sorted(p for p in target.rglob("*"))
    monkeypatch.setenv("MIDUS_CACHE", str(target / "cache"))
    assert main(["analyze", str(world["memory"]), "--data", str(world["root"] / "corpus"), "--out", str(tmp_path / "an"),
                 "--block-size", "16", "--max-blocks", "2", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "the token cache" in err and "the tool would write into it" in err and "Traceback" not in err
    assert sorted(p for p in target.rglob("*")) == before and not (tmp_path / "an").exists()


def test_a_token_cache_inside_the_output_is_refused_before_the_analysis_runs(world, tmp_path, capsys):
    """--out X --cache-dir X/tokens ran the whole analysis, then exited 2 saying X had appeared since it was checked (this
    run had written the cache there), leaving X.new-* behind (trial73 F7)."""
    out = tmp_path / "an"
    assert main(["analyze", str(world["memory"]), "--data", str(world["root"] / "corpus"), "--out", str(out), "--cache-dir",
                 str(out / "tokens"), "--block-size", "16", "--max-blocks", "2", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert f"output {out} contains the token cache (--cache-dir) at {out / 'tokens'}" in err and len(err.splitlines()) == 1, err
    assert not out.exists() and not list(tmp_path.glob("an.new-*"))


def test_the_clock_of_an_evaluation_starts_after_the_memory_layers_kernels_are_ready(world, monkeypatch):
    """eval's tokens/s included the one-time build of the CPU kernels: 1 tokens/s (24.5 s), then 39 once built (trial40)."""
    import numpy as np

    from midus_surgery.model import hml
    from midus_surgery.train import evaluate

    model = evaluate.load_causal_lm(world["memory"], progress=False)
    events = []
    real_resolve, real_clock = hml.resolve_backend, evaluate.time.perf_counter
    monkeypatch.setattr(hml, "resolve_backend", lambda *a, **kw: events.append("kernels") or real_resolve(*a, **kw))
    monkeypatch.setattr(evaluate.time, "perf_counter", lambda: events.append("clock") or real_clock())
    result = evaluate.evaluate_batches(model, [(np.ones((2, 8), dtype=np.int64), None)], device="cpu")
    assert result.tokens > 0 and "kernels" in events and events.index("kernels") < events.index("clock"), events


def test_frozen_retrieval_trains_the_values_only(world):
    from train_fixtures.tiny import state_of

    start, learned, frozen = (state_of(world[k]) for k in ("memory", "memory-trained", "frozen-trained"))
    memory_layers = (".layers.2.", ".layers.5.")
    retrieval = [n for n in start if n.startswith("model") and any(m in n for m in memory_layers)
                 and not any(f".hml.{v}" in n for v in ("bank", "proj", "values", "gate", "out_proj"))]
    assert any(".hml.keys" in n for n in retrieval) and any("self_attn.q_proj" in n for n in retrieval)
    for name in retrieval:
        assert start[name].equal(frozen[name]), f"{name} trained with the retrieval frozen"
        assert not start[name].equal(learned[name]) or "norm" in name, f"{name} did not train with the retrieval learned"
    statistics = [n for n in retrieval if ".query_norm.running_" in n or ".query_norm.updates" in n]
    assert len(statistics) == 3 * len(memory_layers)  # written at apply (0, 1, 0), frozen with the retrieval
    assert all(float(learned[n]) == 6 for n in statistics if n.endswith(".updates"))  # one update per training step
    values = [n for n in start if ".hml.proj" in n or "midus_shared_bank" in n]
    assert values and all(not start[n].equal(frozen[n]) for n in values)
    assert "\nmemory retrieval frozen: " in "\n".join(world["frozen-said"])


def slots_read(model_dir: Path, ids: torch.Tensor) -> dict[int, torch.Tensor]:
    """Per Memory block, the sorted slots [H, T, k] every token of ``ids`` reads, through the layer's observer."""
    from transformers import AutoModelForCausalLM

    from midus_surgery.downstream.analyze import _memory_layers

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    read: dict[int, torch.Tensor] = {}
    for index, layer in _memory_layers(model).items():
        layer.observer = lambda w, slots, m, index=index: read.__setitem__(index, slots.sort(-1).values) or m
    with torch.no_grad():
        model(ids)
    return read


def test_frozen_retrieval_holds_the_slots_only_in_blocks_nothing_trains_below(world):
    """Frozen query parameters are not fixed slots: a block's query is made from the residual stream entering it. With
    the base frozen, the first Memory block (2) reads the very slots it read at the start; the second (5) reads a stream
    block 2's trained values write into, and its slots move. The start line says which is which."""
    ids = torch.randint(0, 60, (1, 64), generator=torch.Generator().manual_seed(0))
    start, held = slots_read(world["memory"], ids), slots_read(world["frozen-base-trained"], ids)
    assert sorted(start) == [2, 5]
    assert start[2].equal(held[2])
    assert not start[5].equal(held[5])
    said = "\n".join(world["frozen-base-said"])
    assert ("the slots each token reads stay as at the start in Memory block 2 only; Memory block 5 reads a residual "
            "stream that parameters training before it change (the embedding or layers below), so the slots its tokens read "
            "move with it") in said
    # freeze: none trains the embedding and every base layer: no block keeps its slots
    assert ("no Memory block keeps the slots it read at the start: Memory blocks 2, 5 read a residual stream that "
            "parameters training before them change (the embedding or layers below), so the slots their tokens read move "
            "with it (freeze: base would keep the first Memory block's)") in "\n".join(world["frozen-said"])
    trained = slots_read(world["frozen-trained"], ids)
    assert not start[2].equal(trained[2]) and not start[5].equal(trained[5])


def test_analyze_compares_the_fixed_retrieval_with_the_learned(world, capsys):
    assert main(["analyze", str(world["memory-trained"]), "--data", str(world["root"] / "corpus"), "--out", str(world["root"] / "fixed"),
                 "--block-size", "16", "--max-blocks", "6", "--fixed-retrieval", str(world["frozen-trained"]), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "fixed retrieval: held-out loss" in printed and "note:" not in printed  # the same budget: nothing to note
    fixed = json.loads((world["root"] / "fixed" / "analysis.json").read_text())["fixed_retrieval"]
    assert fixed["learned_loss"] != fixed["frozen_loss"] and fixed["difference"] == fixed["frozen_loss"] - fixed["learned_loss"]


def test_the_fixed_retrieval_note_compares_budgets_in_tokens(world, tmp_path):
    """The budget is in tokens: two runs of the same tokens in other step counts (another batch size) were said to be
    "not the same budget" (trial98 F4)."""
    import shutil

    from midus_surgery.downstream.analyze import check_fixed_retrieval

    def with_budget(source, name, steps, tokens):
        folder = tmp_path / name
        shutil.copytree(source, folder)
        summary = json.loads((folder / "midus_train.json").read_text())
        (folder / "midus_train.json").write_text(json.dumps({**summary, "steps": steps, "tokens": tokens}))
        return folder

    frozen = with_budget(world["frozen-trained"], "frozen", 8, 1024)
    assert check_fixed_retrieval(with_budget(world["memory-trained"], "same", 8, 1024), frozen) == []
    (note,) = check_fixed_retrieval(learned := with_budget(world["memory-trained"], "steps", 16, 1024), frozen)
    assert note == (f"note: --fixed-retrieval {frozen} and {learned} trained the same 1024 tokens, in 8 and 16 steps: another batch "
                    "size, so the two are not compared step for step")
    (note,) = check_fixed_retrieval(learned := with_budget(world["memory-trained"], "tokens", 8, 2048), frozen)
    assert note == (f"note: --fixed-retrieval {frozen} trained 1024 tokens in 8 steps; {learned}: 2048 tokens in 8 steps: the two "
                    "are not the same budget")
    (note,) = check_fixed_retrieval(world["memory"], frozen)
    assert note.endswith(f"{world['memory']} is untrained: the two are not the same budget")


def test_the_fixed_retrieval_model_must_be_this_model_trained_frozen(world, tmp_path, capsys):
    """--fixed-retrieval is labelled "memory.retrieval: frozen": a model that is not this one (another plan), or not
    trained so (learned, or untrained), is refused in one line before any work, with nothing written (trial36)."""
    import shutil

    other = tmp_path / "other-plan"
    shutil.copytree(world["frozen-trained"], other)
    plan = json.loads((other / "midus_plan.json").read_text())
    plan["layers"] = plan["layers"][::-1]
    (other / "midus_plan.json").write_text(json.dumps(plan))
    learned = tmp_path / "learned-copy"
    shutil.copytree(world["memory-trained"], learned)
    for twin, said in ((learned, "trained with memory.retrieval: learned"),
                       (world["memory"], "no midus_train.json: not a training run's export"),
                       (world["identity-trained"], "not a MIDUS model"),
                       (other, "not the same model as")):
        out = tmp_path / f"an-{twin.name}-{len(said)}"
        assert main(["analyze", str(world["memory-trained"]), "--data", str(world["root"] / "corpus"), "--out", str(out),
                     "--block-size", "16", "--max-blocks", "2", "--quiet", "--fixed-retrieval", str(twin)]) == 2
        err = capsys.readouterr().err
        assert said in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
        assert not out.exists()


def test_a_tokenizer_past_the_models_vocabulary_is_one_line_in_analyze_as_in_eval(world, tmp_path, capsys):
    """A base whose config shrank the vocabulary under its tokenizer: eval said so in one line; analyze raised the
    embedding's IndexError traceback (trial36). Both say it, exit 3, and write nothing."""
    small = make_model_dir(tmp_path / "small-vocab", vocab_size=8)
    corpus = str(world["root"] / "corpus")
    for argv in (["eval", str(small), "--data", corpus, "--block-size", "16", "--max-blocks", "2", "--quiet"],
                 ["analyze", str(small), "--data", corpus, "--out", str(tmp_path / "an"), "--block-size", "16", "--quiet"]):
        assert main(argv) == 3
        err = capsys.readouterr().err
        assert "outside the model's vocabulary of 8" in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert not (tmp_path / "an").exists()


def test_frozen_retrieval_needs_memory_blocks(world, tmp_path):
    from midus_surgery.errors import RecipeError

    cfg = write_config(tmp_path / "lp.yaml", world["identity"], tmp_path / "run", world["root"] / "corpus", world["root"] / "cache",
                       tokens=16 * 8, **{"memory.retrieval": "frozen"})
    with pytest.raises(RecipeError, match="memory.retrieval: `frozen` but the model has no Memory block"):
        train(load_train_config(cfg))


def test_the_query_diagnosis_reruns_the_lookup_per_memory_block(world, capsys):
    from tool_modules import load_tool

    tool = load_tool("diagnose_queries")
    assert tool.main([str(world["memory-trained"]), "--data", str(world["root"] / "corpus"), "--block-size", "16", "--max-blocks", "6"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("layer ")]
    assert [r.split(":")[0] for r in rows] == ["layer  2", "layer  5"]
    assert all(all(name in r for name in ("as is", "centred", "standardised", "cosine keys")) for r in rows)
    loss = re.compile(r"held-out loss: ([0-9.]+) as is, ([0-9.]+) with each memory's read replaced by its average over these tokens, "
                      r"([0-9.]+) with the memory off")
    as_is, constant, off = map(float, loss.search(out).groups())
    assert off != as_is and constant != as_is  # trained: the memory's reads matter, and differ from token to token
    # untrained, every read is exactly zero: all three are the base's loss on the same blocks
    from midus_surgery.train.evaluate import run_eval

    assert tool.main([str(world["memory"]), "--data", str(world["root"] / "corpus"), "--block-size", "16", "--max-blocks", "6"]) == 0
    base = run_eval(world["base"], [str(world["root"] / "corpus")], block_size=16, max_blocks=6, progress=False)["loss"]
    untrained = capsys.readouterr().out
    assert all(v == pytest.approx(base, abs=5e-5) for v in map(float, loss.search(untrained).groups()))
    assert "the memory adds nothing measurable yet" in untrained
    # the numbers themselves, on queries with a shared offset: standardising spreads the reads
    from midus_surgery.model.hml import HeadwiseMemory, HMLConfig

    memory = HeadwiseMemory(2, 8, 16, HMLConfig(n_subkeys=16, topk=4, latent_dim=4))
    torch.manual_seed(0)
    queries = torch.randn(200, 2, 8) * 0.1 + torch.randn(1, 2, 8)  # [T, H, d_h], cosine to the mean near 1
    found = tool.diagnose(memory, queries)
    assert found["cosine_to_mean_query"] > 0.9
    assert found["standardised"]["used_fraction"] > 2 * found["as is"]["used_fraction"]
    assert found["standardised"]["top1pct_share"] < found["as is"]["top1pct_share"]
    assert tool.main([str(world["identity"]), "--data", str(world["root"] / "corpus")]) == 2
    assert "no Memory block" in capsys.readouterr().err
    assert tool.main([str(world["root"] / "no-such-model"), "--data", str(world["root"] / "corpus")]) == 2  # never a hub id
    assert "not a model directory (no config.json)" in capsys.readouterr().err


def test_the_query_diagnosis_checks_the_model_and_data_as_analyze_does(world, tmp_path, monkeypatch, capsys):
    """tools/diagnose_queries.py ran its default 256-token blocks past a model's positions and a tokenizer's ids past its
    vocabulary into torch's IndexError traceback, and scored blocks of 1 token as a NaN loss with a verdict, exit 0
    (trial138 F3). Now: the default block fits the model, a --block-size past its positions and a tokenizer past its
    vocabulary are one line each, a block is at least 2 tokens, and a loss that is not a number is an error, exit 1."""
    import shutil

    from tokenizers import Tokenizer, models, pre_tokenizers
    from tool_modules import load_tool
    from train_fixtures.tiny import WORDS
    from transformers import PreTrainedTokenizerFast

    tool = load_tool("diagnose_queries")
    corpus = str(world["root"] / "corpus")

    def error_line(argv: list[str], code: int) -> str:
        assert tool.main(argv) == code
        captured = capsys.readouterr()
        assert "Traceback" not in captured.err and len(captured.err.strip().splitlines()) == 1, captured.err
        return captured.err

    short = tmp_path / "short"  # a model of 32 positions: the default block (256) must fit it, as eval's does
    shutil.copytree(world["memory"], short)
    config = json.loads((short / "config.json").read_text())
    (short / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 32}))
    assert tool.main([str(short), "--data", corpus, "--max-blocks", "2"]) == 0
    assert capsys.readouterr().out.startswith(f"{short}: 64 tokens;")  # 2 blocks of 32
    said = error_line([str(short), "--data", corpus, "--block-size", "64"], 2)
    assert "--block-size: 64 tokens per block exceed the model's 32 positions (config.json max_position_embeddings)" in said

    wide = tmp_path / "wide-tokenizer"  # its ids past the model's 64: the embedding's IndexError was the message
    shutil.copytree(world["memory"], wide)
    vocab = {"<unk>": 0, "<eos>": 1, "<pad>": 2, ".": 3, **{w: 100 + i for i, w in enumerate(dict.fromkeys(WORDS))}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>", pad_token="<pad>").save_pretrained(wide)
    said = error_line([str(wide), "--data", corpus, "--block-size", "16", "--max-blocks", "2"], 3)
    assert f"the tokenizer of {wide} produces id" in said and "outside the model's vocabulary of 64" in said

    with pytest.raises(SystemExit) as exit_:
        tool.main([str(world["memory"]), "--data", corpus, "--block-size", "1"])
    assert exit_.value.code == 2 and "--block-size: must be at least 2" in capsys.readouterr().err

    def not_a_number(model, memory, batches):
        return {"loss": float("nan"), "loss_constant_reads": float("nan"), "loss_memory_off": 4.0, "constant_share_of_gain": None}

    monkeypatch.setattr(tool, "constant_reads", not_a_number)
    assert tool.main([str(world["memory"]), "--data", corpus, "--block-size", "16", "--max-blocks", "2"]) == 1
    captured = capsys.readouterr()
    assert "held-out loss:" not in captured.out and "nothing measurable" not in captured.out
    assert "the held-out loss is not a number (nan as is, nan with the reads averaged, 4.0 with the memory off)" in captured.err


def test_the_query_diagnosis_refuses_an_empty_data_path(tmp_path, capsys):
    """--data "" was the current folder: every file under it read as held-out text, exit 0 (trial138 F2), as eval's was."""
    from tool_modules import load_tool

    tool = load_tool("diagnose_queries")
    with pytest.raises(SystemExit) as exit_:
        tool.main([str(tmp_path), "--data", ""])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "argument --data: an empty path (an unset shell variable?)" in err, err


def test_an_all_zero_head_importance_heatmap_says_so_without_an_offset_label(tmp_path, monkeypatch):
    """An untrained memory's heads are all exactly 0: the colour bar spanned 1e-12 and drew a "1e-12" offset over the
    title (trial65). Now a span of 1 and a title that says every one is 0."""
    import matplotlib.pyplot as plt

    from midus_surgery.downstream.analyze import _plot_importance

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    _plot_importance({"head_importance": {2: [0.0] * 4, 5: [0.0] * 4}, "what": "heads"}, tmp_path / "zero.png")
    fig = figures[0]
    fig.canvas.draw()
    image_ax, bar_ax = fig.axes
    assert image_ax.get_title().endswith("zeroed one at a time: every one 0")
    assert bar_ax.get_ylim() == (-1.0, 1.0) and bar_ax.yaxis.get_offset_text().get_text() == ""
    assert (tmp_path / "zero.png").stat().st_size > 0


def test_an_output_folder_named_with_control_characters_is_refused_as_output_dir_is(world, tmp_path, capsys):
    """`--out` holding ESC / LF was echoed raw in analyze's "wrote" line (trial73 F9g), then written and shown escaped; a
    recipe's output.dir refuses such a name, and --out now does too (trial83 F6): a usage error, nothing made."""
    out = tmp_path / "an_\x1b[31mred\nline2"
    with pytest.raises(SystemExit) as exit_:
        main(["analyze", str(world["memory"]), "--data", str(world["root"] / "corpus"), "--out", str(out),
              "--block-size", "16", "--max-blocks", "2", "--slots-only", "--quiet"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "holds the control character '\\x1b'" in err and "\x1b" not in err, err
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("broken", ["truncated", "n_subkeys"])
def test_a_model_that_cannot_load_is_refused_before_its_data_is_tokenised(world, tmp_path, capsys, broken):
    """analyze tokenised the corpus into --cache-dir, then refused a model whose weights were truncated or whose config.json
    cannot build it; eval refused the same folder before reading any text (trial99 L1)."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(world["memory"], model)
    if broken == "truncated":
        weights = model / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:weights.stat().st_size * 6 // 10])
    else:
        config = json.loads((model / "config.json").read_text())
        config["midus"]["hml"]["n_subkeys"] = 1  # fewer subkeys than topk picks
        (model / "config.json").write_text(json.dumps(config))
    assert main(["analyze", str(model), "--data", str(world["root"] / "corpus"), "--cache-dir", str(tmp_path / "cache"),
                 "--out", str(tmp_path / "an"), "--block-size", "16", "--max-blocks", "2", "--slots-only", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert str(model) in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert not (tmp_path / "cache").exists() and not (tmp_path / "an").exists()


@pytest.mark.parametrize("tensor", ["model.layers.0.self_attn.v_proj.weight", "model.norm.weight"])
def test_weights_holding_nan_are_refused_before_any_work(world, tmp_path, capsys, tensor):
    """analyze of a model whose weights hold NaN printed slot statistics of NaN scores (1.6% of slots used) or a held-out
    loss of nan, wrote them, exit 0 (trial99 W2). Refused now, naming the tensor, with train's exit code for such an
    init_from, and nothing written: no analysis, no token cache."""
    import shutil

    from safetensors.torch import load_file, save_file

    model = tmp_path / "model"
    shutil.copytree(world["memory"], model)
    tensors = load_file(model / "model.safetensors")
    tensors[tensor][:] = float("nan")
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    assert main(["analyze", str(model), "--data", str(world["root"] / "corpus"), "--cache-dir", str(tmp_path / "cache"),
                 "--out", str(tmp_path / "an"), "--block-size", "16", "--max-blocks", "2", "--slots-only", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"{model}'s weights hold non-finite values (NaN or inf) in 1 tensor(s), e.g. {tensor}:" in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "an").exists() and not (tmp_path / "cache").exists()


def test_a_weight_past_the_analysis_dtypes_range_is_said_as_that(world, tmp_path, capsys):
    """A float32 model with a weight of 70000 analysed in float16 (which ends at 65504) was refused as a model whose weights
    hold NaN or inf, to be replaced by an earlier export (trial102 R03): the cast made it inf, and that is what is said."""
    import shutil

    from safetensors.torch import load_file, save_file

    model = tmp_path / "model"
    shutil.copytree(world["memory"], model)
    tensors = load_file(model / "model.safetensors")
    tensors["model.layers.0.self_attn.v_proj.weight"][0, 0] = 70000.0
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    assert main(["analyze", str(model), "--data", str(world["root"] / "corpus"), "--out", str(tmp_path / "an"), "--block-size", "16",
                 "--max-blocks", "2", "--slots-only", "--quiet", "--dtype", "float16"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("model.layers.0.self_attn.v_proj.weight, which are finite as stored but not as loaded in float16: a value "
                        "past float16's range (65504) becomes inf; run with --dtype float32"), err
    assert not (tmp_path / "an").exists()


@pytest.mark.parametrize("value,dtype,said", [
    (3.4e38, "bfloat16", "which are finite as stored but not as loaded in bfloat16: a value past bfloat16's range (3.38953e+38) "
                         "becomes inf; run with --dtype float32"),
    (float("nan"), "float16", "v_proj.weight: nothing computed from them says what the model learned")])
def test_a_non_finite_weight_is_put_down_to_the_cast_only_where_the_stored_one_is_finite(world, tmp_path, capsys, value, dtype, said):
    """trial104: bfloat16 does not have float32's whole range (3.4e38 becomes inf), and analyze blamed the model for the cast;
    a NaN the file holds was put down to a float16 cast, which never makes one. The stored weights say which it was."""
    import shutil

    from safetensors.torch import load_file, save_file

    model = tmp_path / "model"
    shutil.copytree(world["memory"], model)
    tensors = load_file(model / "model.safetensors")
    tensors["model.layers.0.self_attn.v_proj.weight"][0, 0] = value
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    assert main(["analyze", str(model), "--data", str(world["root"] / "corpus"), "--out", str(tmp_path / "an"), "--block-size", "16",
                 "--max-blocks", "2", "--slots-only", "--quiet", "--dtype", dtype]) == 2
    err = capsys.readouterr().err.strip()
    assert said in err and len(err.splitlines()) == 1 and (dtype in said or dtype not in err), err
    assert not (tmp_path / "an").exists()


def test_the_fixed_retrieval_pair_must_start_from_the_same_weights_and_model_dir_be_the_learned_side(world, tmp_path, capsys):
    """A frozen run of another apply output (the same recipe at another seed: the plans read alike, the sub-keys and bank
    do not), a frozen run as MODEL_DIR (the arguments swapped) and the same folder twice were each reported as a learned vs
    frozen comparison. Each is refused in one line before any work; a run's midus_train.json records the digest of the
    weights it started from."""
    import shutil

    from safetensors.torch import load_file, save_file

    from midus_surgery.train.checkpoint import weights_sha256

    frozen = world["frozen-trained"]
    summary = json.loads((frozen / "midus_train.json").read_text())
    assert summary["init_weights_sha256"] == weights_sha256(world["memory"])
    # another apply output: the same files but one memory tensor drawn otherwise, and a frozen run of it
    other_start = tmp_path / "other-seed"
    shutil.copytree(world["memory"], other_start)
    tensors = load_file(other_start / "model.safetensors")
    name = next(k for k in tensors if k.endswith("hml.keys"))
    tensors[name] = tensors[name] + 1
    save_file(tensors, other_start / "model.safetensors", metadata={"format": "pt"})
    other_frozen = tmp_path / "other-frozen"
    shutil.copytree(frozen, other_frozen)
    (other_frozen / "midus_train.json").write_text(json.dumps({**summary, "init_from": str(other_start),
                                                               "init_weights_sha256": weights_sha256(other_start)}))
    cases = ((world["memory-trained"], other_frozen, "whose weight files differ from those"),
             (world["memory"], other_frozen, "whose weight files differ from those"),
             (other_start, frozen, "whose weight files differ from those"),
             (frozen, world["frozen-base-trained"], "was trained with memory.retrieval: frozen: it is not the learned retrieval"),
             (world["memory-trained"], world["memory-trained"], "the model analysed itself"),
             (frozen, frozen, "the model analysed itself"))
    for i, (model, twin, said) in enumerate(cases):
        out = tmp_path / f"an-{i}"
        assert main(["analyze", str(model), "--data", str(world["root"] / "corpus"), "--out", str(out),
                     "--block-size", "16", "--max-blocks", "2", "--quiet", "--fixed-retrieval", str(twin)]) == 2
        err = capsys.readouterr().err
        assert said in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, (i, err)
        assert not out.exists()
    # a MODEL_DIR whose midus_train.json does not read was taken for untrained (and its trained weights hashed): said
    unread = tmp_path / "unread-learned"
    shutil.copytree(world["memory-trained"], unread)
    (unread / "midus_train.json").write_text("{not json")
    assert main(["analyze", str(unread), "--data", str(world["root"] / "corpus"), "--out", str(tmp_path / "an-unread"),
                 "--block-size", "16", "--max-blocks", "2", "--quiet", "--fixed-retrieval", str(frozen)]) == 2
    err = capsys.readouterr().err
    assert "unreadable midus_train.json" in err and "cannot tell what it was trained from" in err and len(err.strip().splitlines()) == 1, err
    # a dangling link or a folder in its place says as little (it too was taken for untrained: trial137 F4)
    (unread / "midus_train.json").unlink()
    for i, (make, said) in enumerate(((lambda p: p.symlink_to(tmp_path / "nowhere.json"), "a link to nothing"),
                                      (lambda p: p.mkdir(), "not a regular file"))):
        make(unread / "midus_train.json")
        assert main(["analyze", str(unread), "--data", str(world["root"] / "corpus"), "--out", str(tmp_path / f"an-unread{i}"),
                     "--block-size", "16", "--max-blocks", "2", "--quiet", "--fixed-retrieval", str(frozen)]) == 2
        err = capsys.readouterr().err
        assert f"unreadable midus_train.json ({said})" in err and len(err.strip().splitlines()) == 1, err
        (unread / "midus_train.json").unlink() if i == 0 else (unread / "midus_train.json").rmdir()
    # a run of an earlier midus-surgery records no digest: compared as before, with a note that it could not be checked
    old = tmp_path / "old-frozen"
    shutil.copytree(frozen, old)
    (old / "midus_train.json").write_text(json.dumps({k: v for k, v in summary.items() if k != "init_weights_sha256"}))
    from midus_surgery.downstream.analyze import check_fixed_retrieval

    (note,) = check_fixed_retrieval(world["memory-trained"], old)
    assert "records no digest of the weights its run started from" in note
