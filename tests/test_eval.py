"""`midus-surgery eval`: token-weighted held-out perplexity equals a hand computation."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from train_fixtures.tiny import make_model_dir, make_tokenizer, write_corpus
from transformers import AutoModelForCausalLM

from midus_surgery.cli import main
from midus_surgery.train.evaluate import run_eval


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    files = write_corpus(root / "corpus", files=3, sentences_per_file=7, seed=5)
    return {"model": make_model_dir(root / "model", with_plan=False, seed=3), "files": files, "cache": root / "cache", "root": root}


def hand_nll(model, sequences: list[list[int]]) -> tuple[float, int]:
    """Sum of -log p(token | tokens before it in its sequence), one sequence at a time."""
    total, count = 0.0, 0
    with torch.no_grad():
        for seq in sequences:
            ids = torch.tensor([seq])
            logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
            for t in range(1, len(seq)):
                total -= float(logp[t - 1, seq[t]])
                count += 1
    return total, count


def test_block_perplexity_equals_hand_computation(setup):
    tok = make_tokenizer()
    stream = []
    for f in setup["files"]:
        stream += tok(f.read_text())["input_ids"] + [tok.eos_token_id]
    blocks = [stream[i:i + 16] for i in range(0, len(stream) - 15, 16)]
    model = AutoModelForCausalLM.from_pretrained(setup["model"]).eval()
    nll, count = hand_nll(model, blocks)

    got = run_eval(setup["model"], [str(f) for f in setup["files"]], block_size=16, batch_size=3, cache_dir=setup["cache"], progress=False)
    assert got["tokens"] == count == len(blocks) * 15 and got["sequences"] == len(blocks)
    assert got["loss"] == pytest.approx(nll / count, rel=1e-6)
    assert got["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-6)
    # tokens: predicted (15 of each block of 16); tokens_read: what the forward passes read (all 16), their rate beside it
    assert got["tokens_read"] == len(blocks) * 16 and "tokens_per_s" not in got
    assert got["tokens_read_per_s"] == pytest.approx(got["tokens_read"] / got["seconds"], rel=1e-3)


@pytest.mark.parametrize("block_size", [32, 56])  # the corpus's documents are 57 tokens: at 56, one past a whole window
def test_per_document_perplexity_equals_hand_computation(setup, block_size):
    tok = make_tokenizer()
    windows = []
    for f in setup["files"]:
        doc = tok(f.read_text())["input_ids"] + [tok.eos_token_id]
        cuts = [*range(0, len(doc), block_size), len(doc)]
        if len(doc) % block_size == 1 and len(doc) > block_size:  # a last token alone: the last window starts one earlier
            cuts[-2] -= 1
        windows += [doc[a:b] for a, b in zip(cuts, cuts[1:])]
    model = AutoModelForCausalLM.from_pretrained(setup["model"]).eval()
    nll, count = hand_nll(model, windows)
    assert block_size == 32 or any(len(w) == 2 for w in windows)  # the case is met
    got = run_eval(setup["model"], [str(f) for f in setup["files"]], block_size=block_size, batch_size=4, per_document=True,
                   cache_dir=setup["cache"], progress=False)
    assert got["mode"] == "documents" and got["tokens"] == count
    assert got["tokens_read"] == count + len(windows)  # each window's first token is read, not predicted; padding neither
    assert got["tokens_read"] == got["corpus_tokens"] and got["tokens_after_the_last_block"] == 0  # every document to its end
    assert got["loss"] == pytest.approx(nll / count, rel=1e-6)


@pytest.mark.parametrize("block_size", [2, 3, 16])
def test_a_document_one_token_longer_than_whole_windows_is_read_to_its_end(block_size):
    """--per-document left a document's last token alone when it was one past whole windows: read by no window, said
    nowhere (trial155 F1). Its last window starts a token earlier: every token read, as many predicted as before. With
    windows of 2 there is no earlier start: the token is counted as not read."""
    from types import SimpleNamespace

    from midus_surgery.train.evaluate import document_windows

    docs = [np.arange(3 * block_size + 1), np.arange(block_size), np.arange(1), np.arange(block_size + 1)]
    windows = document_windows(SimpleNamespace(documents=lambda: iter(docs)), block_size)
    read = np.concatenate(windows)
    predicted = sum(len(w) - 1 for w in windows)
    lone = 2 if block_size == 2 else 0  # the lone last tokens of the first and last documents
    assert all(2 <= len(w) <= block_size for w in windows)
    assert len(read) == sum(len(d) for d in docs) - 1 - lone  # the one-token document predicts nothing, and is not read
    assert predicted == sum(len(d) - 1 - (len(d) - 1) // block_size for d in docs if len(d) > 1)  # one per window less
    assert [int(w[0]) for w in windows[:4]] == ([0, 2, 4, 0] if block_size == 2 else [0, block_size, 2 * block_size, 3 * block_size - 1])


def test_eval_json_writes_a_non_finite_perplexity_as_null(setup, capsys, tmp_path):
    """A model with a NaN weight scores NaN: --json says null (strict JSON), the text line says nan."""
    import shutil

    from safetensors.torch import load_file, save_file

    model = tmp_path / "nan-model"
    shutil.copytree(setup["model"], model)
    weights = load_file(model / "model.safetensors")
    weights["model.norm.weight"][0] = float("nan")
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    args = ["eval", str(model), "--data", str(setup["files"][0]), "--block-size", "16", "--cache-dir", str(setup["cache"]), "--quiet"]
    # exit 1 (ran, and found a problem), after the result: a script that checks the exit status took NaN for a score
    assert main(args + ["--json"]) == 1
    captured = capsys.readouterr()
    result = json.loads(captured.out, parse_constant=lambda name: pytest.fail(f"{name} in eval --json: not JSON"))
    assert result["loss"] is None and result["perplexity"] is None and result["tokens"] > 0
    assert "the loss is not a number" in captured.err  # the note on stderr, the JSON clean (trial50: no note with --json)
    assert captured.err.strip().splitlines()[-1] == f"error: eval: no perplexity for {model}: the loss is not a number (the note above says why)"
    assert main(args) == 1
    captured = capsys.readouterr()
    assert "perplexity nan (loss nan nats/token)" in captured.out
    assert "the loss is not a number: its weights hold NaN or inf, or its activations overflow in float32" in captured.err
    # among several models: the models after the broken one are scored too, every result is written, then the error
    assert main(["eval", str(model), str(setup["model"]), *args[2:], "--json"]) == 1
    captured = capsys.readouterr()
    results = json.loads(captured.out)
    assert [r["perplexity"] is None for r in results] == [True, False]
    assert captured.err.strip().splitlines()[-1].startswith(f"error: eval: no perplexity for {model}:")


def test_a_loss_whose_perplexity_overflows_is_no_score_either(setup, capsys, tmp_path):
    """A finite loss past ~709 nats makes e^loss inf: --json wrote "perplexity": null and eval exited 0, the pair a NaN
    loss no longer gets (trial136 F5). The result is printed, then an error line naming the loss, exit 1."""
    import shutil

    from safetensors.torch import load_file, save_file

    model = tmp_path / "huge-logits"
    shutil.copytree(setup["model"], model)
    weights = load_file(model / "model.safetensors")
    weights["model.norm.weight"] *= 1e5  # (the head is tied) finite logits far apart: a loss of thousands of nats per token
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    args = ["eval", str(model), "--data", str(setup["files"][0]), "--block-size", "16", "--cache-dir", str(setup["cache"]), "--quiet"]
    assert main(args + ["--json"]) == 1
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert result["loss"] > 709 and result["perplexity"] is None
    assert captured.err.strip().splitlines()[-1] == (
        f"error: eval: no perplexity for {model} (loss {result['loss']:,.1f} nats/token): e^loss overflows past a loss of 709; a loss "
        "this far above the log of the vocabulary size is a broken model (weights or activations far out of range)")
    assert main(["eval", str(setup["model"]), *args[2:]]) == 0  # the sound model it came from: a score, exit 0


def test_several_models_get_a_line_each_and_a_json_list_in_their_order(setup, capsys, tmp_path):
    """training.md: one line per model; --json one object for one model, a list for several (trial42: untested)."""
    other = make_model_dir(tmp_path / "other", with_plan=False, seed=4)
    args = ["eval", str(setup["model"]), str(other), "--data", str(setup["root"] / "corpus"), "--block-size", "16",
            "--cache-dir", str(setup["cache"]), "--quiet"]
    assert main(args) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith(str(setup["model"])) and lines[1].startswith(str(other)), lines
    assert main([*args, "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert isinstance(results, list) and [r["model"] for r in results] == [str(setup["model"]), str(other)]
    assert results[0]["perplexity"] != results[1]["perplexity"]  # two models, scored each
    assert main([*args[:2], *args[3:], "--json"]) == 0
    assert isinstance(json.loads(capsys.readouterr().out), dict)  # one model: an object


def test_several_models_all_load_before_the_first_is_scored_and_other_tokenizers_are_noted(setup, capsys, tmp_path):
    """trial54: a model with unreadable weights last in the list was found after the others were scored, and
    with --json their results were lost; models whose tokenizers turn the data into other token ids were compared
    per token without a word (trial56: a vocabulary comparison missed a tokenizer that lowercases)."""
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(setup["model"], broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    args = ["--data", str(setup["root"] / "corpus"), "--block-size", "16", "--cache-dir", str(setup["cache"]), "--quiet", "--json"]
    assert main(["eval", str(setup["model"]), str(broken), *args]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith(f"error: {broken}: cannot load the weights")

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    other = make_model_dir(tmp_path / "other-tokenizer", with_plan=False, seed=4)
    words = make_tokenizer().get_vocab()
    words.pop("cat")  # 'cat' is unknown to this one: the data becomes other token ids
    word_level = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(sorted(words, key=words.get))}, unk_token="<unk>"))
    word_level.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=word_level, eos_token="<eos>", unk_token="<unk>", pad_token="<pad>").save_pretrained(other)
    same_ids = make_model_dir(tmp_path / "more-words", with_plan=False, seed=4)
    tokenizer = make_tokenizer()
    tokenizer.add_tokens(["zebra"])  # a word the data does not hold: the same ids, comparable
    tokenizer.save_pretrained(same_ids)
    assert main(["eval", str(setup["model"]), str(same_ids), *args]) == 0
    assert "different token ids" not in capsys.readouterr().err
    assert main(["eval", str(setup["model"]), str(other), *args]) == 0
    err = capsys.readouterr().err
    assert f"note: the models' tokenizers turn the data into different token ids ({setup['model']}: " in err and "not comparable" in err
    # models that share token ids are named together, as the ones comparable with each other (each was listed alone)
    assert main(["eval", str(setup["model"]), str(other), str(same_ids), *args]) == 0
    err = capsys.readouterr().err
    assert f"different token ids ({setup['model']}, {same_ids}: " in err and f"; {other}: " in err, err
    assert "so only those named together are comparable" in err


def test_a_converting_load_that_fails_names_the_tensors_it_could_not_build(tmp_path, capsys):
    """Mixtral's experts are stored one tensor each and stacked on load; with one missing, transformers'
    error said only "look at the CONVERSION entries of the above report", a report no load here prints."""
    from safetensors.torch import load_file, save_file
    from tiny_configs import tiny_config

    from midus_surgery.errors import MidusError
    from midus_surgery.train.evaluate import load_causal_lm

    AutoModelForCausalLM.from_config(tiny_config("mixtral")).save_pretrained(tmp_path / "moe")
    weights = load_file(tmp_path / "moe" / "model.safetensors")
    del weights[next(k for k in weights if k.startswith("model.layers.1.") and "experts" in k)]
    save_file(weights, tmp_path / "moe" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(MidusError) as caught:
        load_causal_lm(tmp_path / "moe", progress=False)
    assert str(caught.value) == (f"{tmp_path / 'moe'}: cannot load the weights: transformers could not build "
                                 "model.layers.1.mlp.experts.gate_up_proj (missing, conversion failed) from its files")
    assert "LOAD REPORT" not in capsys.readouterr().err


def test_data_with_nul_characters_is_noted_beside_the_json(setup, capsys, tmp_path):
    """UTF-16 text read as UTF-8 (every other byte 0): evaluated as it is, with a note on stderr, so
    --json's stdout stays one JSON value."""
    (tmp_path / "wide.txt").write_bytes(" the cat sat on the mat .".encode("utf-16-le"))
    data = [str(setup["root"] / "corpus"), str(tmp_path / "wide.txt")]
    assert main(["eval", str(setup["model"]), "--data", *data, "--block-size", "16", "--cache-dir", str(setup["cache"]), "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["tokens"] > 0
    assert captured.err.startswith(f"note: NUL characters in {tmp_path / 'wide.txt'} (25): text rarely holds them"), captured.err


def test_eval_cli_json_and_errors(setup, capsys, tmp_path):
    from transformers.utils import logging as hf_logging

    hf_logging.enable_progress_bar()  # as in a fresh process (the trainer turns transformers' bars off)
    args = ["eval", str(setup["model"]), "--data", str(setup["root"] / "corpus"), "--block-size", "16", "--cache-dir", str(setup["cache"]), "--json"]
    assert main(args) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert result["mode"] == "blocks" and result["perplexity"] > 1 and result["tokens"] > 0
    # --json / --quiet: no bar at all, transformers' "Loading weights" included; its setting is restored
    assert captured.err == "" and hf_logging.is_progress_bar_enabled()
    assert main([*args[:-1], "--per-document", "--quiet"]) == 0  # windows, and said so: not "N documents"
    assert " document windows of <= 16 tokens; " in capsys.readouterr().out

    # a flag of the other mode would be dropped without a word (a --limit that limits nothing)
    assert main(["eval", str(setup["model"]), "--data", str(setup["files"][0]), "--limit", "5", "--seed", "0"]) == 2
    assert "error: eval: --limit, --seed apply to --tasks only, not --data" in capsys.readouterr().err
    assert main(["eval", str(setup["model"]), "--tasks", "x", "--cache-dir", str(tmp_path / "c"), "--per-document"]) == 2
    assert "error: eval: --per-document, --cache-dir apply to --data only, not --tasks" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()
    assert main(["eval", str(tmp_path), "--data", str(setup["files"][0])]) == 2  # a model that does not load: exit 2
    assert "is not a model directory (no config.json)" in capsys.readouterr().err
    # a missing second model is found before the first is evaluated
    assert main(["eval", str(setup["model"]), str(tmp_path / "nope"), "--data", str(setup["files"][0]),
                 "--cache-dir", str(setup["cache"]), "--json"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and f"{tmp_path / 'nope'} is not a directory" in captured.err
    assert main(["eval", str(tmp_path), "--data", str(setup["files"][0])]) == 2
    assert "is not a model directory (no config.json)" in capsys.readouterr().err
    (tmp_path / "final").mkdir()  # a run directory given for its export
    (tmp_path / "final" / "config.json").write_text("{}")
    assert main(["eval", str(tmp_path), "--data", str(setup["files"][0])]) == 2
    assert f"no config.json); it looks like a training run directory: its export is {tmp_path / 'final'}" in capsys.readouterr().err
    (tmp_path / "step-00000004").mkdir()
    (tmp_path / "step-00000004" / "trainer_state.json").write_text("{}")  # a run's checkpoint
    assert main(["eval", str(tmp_path / "step-00000004"), "--data", str(setup["files"][0])]) == 2
    assert "is a training checkpoint (resume state), not a model directory: use the run's export" in capsys.readouterr().err
    import shutil

    no_tokenizer = tmp_path / "no-tokenizer"  # transformers' own error asks to install sentencepiece
    shutil.copytree(setup["model"], no_tokenizer, ignore=shutil.ignore_patterns("tokenizer*", "special_tokens_map.json"))
    assert main(["eval", str(no_tokenizer), "--data", str(setup["files"][0]), "--cache-dir", str(setup["cache"])]) == 2
    assert f"error: {no_tokenizer} holds no tokenizer files (tokenizer.json, tokenizer_config.json" in capsys.readouterr().err
    assert main(["eval", str(setup["model"]), "--data", str(tmp_path / "missing.txt"), "--cache-dir", str(setup["cache"])]) == 3
    assert "does not exist" in capsys.readouterr().err
    assert main(["eval", str(setup["model"]), "--data", str(setup["files"][0]), "--block-size", "100000", "--cache-dir", str(setup["cache"])]) == 2
    assert "100000 tokens per block exceed the model's 128 positions" in capsys.readouterr().err
    assert main(["eval", str(setup["model"]), "--data", str(setup["files"][0]), "--block-size", "128", "--cache-dir", str(setup["cache"])]) == 3
    assert "shorter than one block" in (err := capsys.readouterr().err) and "(lower --block-size or add text)" in err


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("mode", ["--data", "--tasks"])
@pytest.mark.parametrize("models_first", [True, False])
def test_a_model_directory_after_data_or_tasks_is_said_not_read_as_data(setup, capsys, mode, models_first):
    """--data and --tasks take every path after them: "eval base --data heldout out/dus" scored base on the held-out text and
    on out/dus's model card, exit 0; without a model before --data, argparse said none was given (trial98 F1, F2)."""
    model, data = str(setup["model"]), str(setup["files"][0])
    args = ["eval", *([model] if models_first else []), mode, data if mode == "--data" else "x", model]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: eval: {model} follows {mode}, which takes every path after it, but it is a model directory (config.json "
                   f"beside weights): name the models first (eval MODEL_DIR... {mode} ...)"), err
    assert main(["eval", "--data", data]) == 2
    assert capsys.readouterr().err.strip() == "error: eval: no MODEL_DIR given (eval MODEL_DIR... --data ...)"
    assert main(["analyze", model, "--data", data, model, "--out", str(setup["root"] / "never")]) == 2
    assert capsys.readouterr().err.strip() == (f"error: analyze: {model} follows --data, which takes every path after it, but it is a "
                                               "model directory (config.json beside weights): name the model first (analyze MODEL_DIR --data ...)")
    assert not (setup["root"] / "never").exists()
    assert main(["analyze", "--data", data, model, "--out", str(setup["root"] / "never")]) == 2  # trial102 R02
    assert f"error: analyze: {model} follows --data" in capsys.readouterr().err
    assert main(["analyze", "--data", data, "--out", str(setup["root"] / "never")]) == 2
    assert capsys.readouterr().err.strip() == "error: analyze: no MODEL_DIR given (analyze MODEL_DIR --data ...)"
    assert not (setup["root"] / "never").exists()


@pytest.mark.parametrize("device", DEVICES)
def test_eval_on_a_named_device_equals_the_hand_computation(setup, device):
    """--device puts the model and batches there (on a GPU machine this also runs on CUDA)."""
    tok = make_tokenizer()
    stream = []
    for f in setup["files"]:
        stream += tok(f.read_text())["input_ids"] + [tok.eos_token_id]
    blocks = [stream[i:i + 16] for i in range(0, len(stream) - 15, 16)]
    nll, count = hand_nll(AutoModelForCausalLM.from_pretrained(setup["model"]).eval(), blocks)
    got = run_eval(setup["model"], [str(f) for f in setup["files"]], block_size=16, batch_size=3, cache_dir=setup["cache"],
                   progress=False, device=device)
    assert got["device"].startswith(device) and got["tokens"] == count
    assert got["loss"] == pytest.approx(nll / count, rel=1e-5)


def test_eval_auto_device_and_device_errors(setup, capsys):
    args = ["eval", str(setup["model"]), "--data", str(setup["files"][0]), "--block-size", "16", "--cache-dir", str(setup["cache"])]
    assert main(args + ["--json"]) == 0
    assert json.loads(capsys.readouterr().out)["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    assert main(args + ["--device", "tpu7"]) == 2
    assert "--device 'tpu7' is not a device name" in capsys.readouterr().err
    assert main(args + ["--device", "cuda:64"]) == 2
    err = capsys.readouterr().err
    assert ("has no CUDA device" in err) if not torch.cuda.is_available() else ("there are only" in err)


def test_a_midus_models_differing_code_is_noted_once_however_often_it_loads(tmp_path, capsys):
    """A model is built twice in one command (eval checks it on the meta device before loading it; eval --tasks once
    loaded it twice): trial36 saw each "differs from this package's copy" note twice."""
    from midus_surgery.compiler.planner import plan_recipe
    from midus_surgery.emit.emitter import emit
    from midus_surgery.train.evaluate import load_causal_lm

    base = make_model_dir(tmp_path / "base", with_plan=False)
    recipe = tmp_path / "midus.yaml"
    recipe.write_text(f"base:\n  path: {base}\nlayout:\n  interleave:\n    after_every: 2\n    kind: memory\n"
                      "memory:\n  n_subkeys: 8\n  topk: 4\n  latent_dim: 8\noutput:\n  dir: out\n  dtype: float32\n")
    out = emit(plan_recipe(recipe), progress=False).out_dir
    (out / "hml.py").write_text((out / "hml.py").read_text() + "\n# edited by hand\n")
    capsys.readouterr()
    for _ in range(2):
        load_causal_lm(out, progress=False)
    assert capsys.readouterr().err.count("hml.py differs from this package's copy") == 1


def test_a_model_whose_config_makes_every_logit_nan_is_one_line(setup, tmp_path, capsys):
    """trial43: rms_norm_eps -1 scored nan with a note blaming the weights (train: a NaN loss at step 1); an int
    -1 was "no usable tokenizer". The config value is named before anything loads."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(setup["model"], model)
    config = json.loads((model / "config.json").read_text())
    for value in (-1.0, -1):
        (model / "config.json").write_text(json.dumps({**config, "rms_norm_eps": value}))
        assert main(["eval", str(model), "--data", str(setup["files"][0]), "--cache-dir", str(tmp_path / "cache")]) == 2
        err = capsys.readouterr().err
        assert f"config.json: rms_norm_eps is {value}; it must be a number, 0 or above" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "cache").exists()


@pytest.fixture
def three_models(setup, tmp_path):
    """Three tiny models (the module's and two more), for the several-model runs."""
    return [setup["model"], make_model_dir(tmp_path / "second", with_plan=False, seed=4),
            make_model_dir(tmp_path / "third", with_plan=False, seed=5)]


def count_weight_reads(monkeypatch) -> dict:
    """Each model directory -> how often its weights were read: load_causal_lm's calls, and transformers' own
    from_pretrained under it (whatever path reads weights goes through the latter)."""
    from collections import Counter

    from transformers import PreTrainedModel

    from midus_surgery.train import evaluate

    counts = {"load_causal_lm": Counter(), "from_pretrained": Counter()}
    loader, hf_load = evaluate.load_causal_lm, PreTrainedModel.from_pretrained.__func__

    def counted_load(path, **kwargs):
        counts["load_causal_lm"][str(path)] += 1
        return loader(path, **kwargs)

    def counted_from_pretrained(cls, path, *args, **kwargs):
        counts["from_pretrained"][str(path)] += 1
        return hf_load(cls, path, *args, **kwargs)

    monkeypatch.setattr(evaluate, "load_causal_lm", counted_load)
    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(counted_from_pretrained))
    return counts


def test_several_models_each_read_their_weights_once(setup, three_models, capsys, monkeypatch):
    """The check before the first evaluation read every model's weights (a load dropped at once), then each was loaded
    again to be evaluated: twice the minutes of loading per model at 7B. The check reads headers; each loads once."""
    counts = count_weight_reads(monkeypatch)
    args = ["eval", *map(str, three_models), "--data", str(setup["root"] / "corpus"), "--block-size", "16",
            "--cache-dir", str(setup["cache"]), "--quiet", "--json"]
    assert main(args) == 0
    assert [r["model"] for r in json.loads(capsys.readouterr().out)] == list(map(str, three_models))
    assert counts["load_causal_lm"] == {str(m): 1 for m in three_models}
    assert counts["from_pretrained"] == {str(m): 1 for m in three_models}


def broken_weights(source, target, how: str):
    """A copy of ``source`` whose weights lack a tensor, hold one more, hold one in another shape, or store one as
    int32 integers."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(source, target)
    weights = load_file(target / "model.safetensors")
    name = "model.layers.1.mlp.up_proj.weight"
    if how == "lacking":
        del weights[name]
    elif how == "extra":  # in a model this tool did not write (no midus_plan.json), where the load only renames
        name = "model.layers.1.mlp.extra_proj.weight"
        weights[name] = torch.zeros(3, 3)
    elif how == "integers":  # transformers would cast them into the float parameter without a word
        weights[name] = (weights[name] * 1000).to(torch.int32)
    else:
        weights[name] = torch.zeros(3, 3)
    save_file(weights, target / "model.safetensors", metadata={"format": "pt"})
    return target, name


@pytest.mark.parametrize("how", ["lacking", "misshapen", "extra", "integers"])
def test_a_last_model_whose_weights_do_not_fit_is_refused_before_any_is_evaluated(setup, three_models, tmp_path, capsys, monkeypatch, how):
    """From the safetensors headers and the model built on the meta device: no model's weights read, none evaluated."""
    from midus_surgery.train import evaluate

    last, name = broken_weights(three_models[2], tmp_path / "broken", how)
    evaluated = []
    monkeypatch.setattr(evaluate, "run_eval", lambda model, *a, **k: evaluated.append(model) or pytest.fail("evaluated"))
    counts = count_weight_reads(monkeypatch)
    for flags in ([], ["--json"]):
        assert main(["eval", str(three_models[0]), str(three_models[1]), str(last), "--data", str(setup["files"][0]),
                     "--block-size", "16", "--cache-dir", str(setup["cache"]), "--quiet", *flags]) == 2
        captured = capsys.readouterr()
        assert captured.out == "" and "perplexity" not in captured.err
        said = {"lacking": f"the weights do not match the model's architecture: missing 1 tensor(s): {name}",
                "misshapen": f"the weights do not match the model's architecture: 1 tensor(s) of the wrong shape: {name} "
                             "(weights [3, 3], model [64, 32])",
                "extra": f"the weights do not match the model's architecture: 1 unexpected tensor(s): {name}",  # as the load words them
                "integers": f"1 floating-point tensor(s) stored as integers or booleans, which the load would cast without a "
                            f"word: {name} (I32)"}
        assert captured.err == f"error: {last}: {said[how]}\n"
    assert evaluated == [] and not counts["load_causal_lm"] and not counts["from_pretrained"]


def test_the_strict_load_refuses_floats_stored_as_integers(three_models, tmp_path):
    """load_causal_lm (what analyze loads with, without eval's header check first) refuses them too: transformers
    loaded an up_proj stored as int32 as its integer values, with no word."""
    from midus_surgery.train.evaluate import ModelLoadError, load_causal_lm

    broken, name = broken_weights(three_models[1], tmp_path / "ints", "integers")
    with pytest.raises(ModelLoadError, match=re.escape(f"{broken}: 1 floating-point tensor(s) stored as integers") + ".*" + re.escape(f"{name} (I32)")):
        load_causal_lm(broken, progress=False)
    assert load_causal_lm(three_models[1], progress=False) is not None  # its source loads


@pytest.mark.parametrize("named", [True, False])
def test_a_model_that_fails_at_its_real_load_keeps_the_results_before_it(setup, three_models, capsys, monkeypatch, named):
    """What headers cannot show (a tensor's bytes, a converting load) fails at the real load: the models scored before
    it are printed, as text lines or as --json's list, then one error line naming the model, exit 2. ``named``: the
    error's own words name the model, or it is named in front of them."""
    from midus_surgery.train import evaluate
    from midus_surgery.train.evaluate import ModelLoadError

    loader, third = evaluate.load_causal_lm, three_models[2]

    def fails_on_the_third(path, **kwargs):
        if str(path) == str(third):
            raise ModelLoadError(f"{path}: cannot load the weights (SafetensorError: bytes gone)" if named else "bytes gone")
        return loader(path, **kwargs)

    monkeypatch.setattr(evaluate, "load_causal_lm", fails_on_the_third)
    args = ["eval", *map(str, three_models), "--data", str(setup["root"] / "corpus"), "--block-size", "16",
            "--cache-dir", str(setup["cache"]), "--quiet"]
    error = f"error: {third}: " + ("cannot load the weights (SafetensorError: bytes gone)" if named else "bytes gone") + "\n"
    assert main(args) == 2
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert len(lines) == 2 and all(line.startswith(f"{m}: perplexity ") for line, m in zip(lines, three_models)), lines
    assert captured.err == error
    assert main([*args, "--json"]) == 2
    captured = capsys.readouterr()
    results = json.loads(captured.out)
    assert [r["model"] for r in results] == list(map(str, three_models[:2])) and all(r["perplexity"] > 1 for r in results)
    assert captured.err == error


@pytest.fixture(scope="module")
def task_suite(tmp_path_factory, lm_eval_builtin_tasks_parsed_once):
    """An offline lm-eval task suite (tools/make_task_suite.py's) built from a few prose documents, for eval --tasks."""
    from midus_surgery.downstream.task_suite import build_task_suite

    root = tmp_path_factory.mktemp("task-suite")
    (root / "text").mkdir()
    animals, places = ["cat", "dog", "bird", "fish"], ["mat", "tree", "pond", "log"]
    for d in range(4):
        (root / "text" / f"doc{d}.txt").write_text(" ".join(
            f"The {['big', 'small', 'quick'][i]} {animals[(d + i) % 4]} sat on the {places[d]} and then slept under the {places[(d + i + 1) % 4]}."
            for i in range(3)) + "\n")
    build_task_suite([str(root / "text")], root / "suite", items=4, seed=0)
    return root / "suite"


def tasks_args(models, suite) -> list[str]:
    return ["eval", *map(str, models), "--tasks", "midus_cloze", "--include-path", str(suite), "--limit", "2", "--batch-size", "2", "--quiet"]


def fail_in_forward(monkeypatch, model, error):
    """The tiny Llama's forward raises ``error()`` for ``model`` alone (lm-eval's scoring and eval --data run it)."""
    from transformers import LlamaForCausalLM

    forward = LlamaForCausalLM.forward

    def failing(self, *args, **kwargs):
        if Path(self.config._name_or_path) == Path(model):
            raise error()
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(LlamaForCausalLM, "forward", failing)


def test_an_unexpected_error_in_a_later_models_forward_keeps_the_results_before_it(setup, three_models, capsys, monkeypatch):
    """A RuntimeError inside the second model's forward (an error no check foresees) was a traceback under the first
    model's result; now, as for a MidusError, the results before it are printed, then one line naming the model, the
    exception and where it was raised, exit 1."""
    second = three_models[1]
    fail_in_forward(monkeypatch, second, lambda: RuntimeError("boom in forward\nits second line"))
    args = ["eval", *map(str, three_models), "--data", str(setup["root"] / "corpus"), "--block-size", "16",
            "--cache-dir", str(setup["cache"]), "--quiet"]
    error = re.compile(f"error: {re.escape(str(second))}: the evaluation failed with an unexpected error "
                       r"\(RuntimeError: boom in forward, raised at \S*test_eval\.py:\d+\)\n")
    assert main(args) == 1
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{three_models[0]}: perplexity "), lines
    assert error.fullmatch(captured.err) and "Traceback" not in captured.err, captured.err
    assert main([*args, "--json"]) == 1
    captured = capsys.readouterr()
    assert [r["model"] for r in json.loads(captured.out)] == [str(three_models[0])]
    assert error.fullmatch(captured.err), captured.err


def test_an_unexpected_error_in_a_lone_models_forward_is_one_line_and_only_ours_asks_for_a_report(setup, capsys, monkeypatch):
    """One model alone printed a traceback for the error that is one line among several (trial61: a model's own
    remote code raising); and the line asked for a report of an error the model's code raised. Now one line, exit 1,
    and "please report it" only for an error raised in this package."""
    from midus_surgery.train.evaluate import _names, unforeseen_failure

    model = setup["model"]
    fail_in_forward(monkeypatch, model, lambda: RuntimeError("boom in a custom forward"))
    assert main(["eval", str(model), "--data", str(setup["root"] / "corpus"), "--block-size", "16",
                 "--cache-dir", str(setup["cache"]), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert re.fullmatch(f"error: {re.escape(str(model))}: the evaluation failed with an unexpected error "
                        r"\(RuntimeError: boom in a custom forward, raised at \S*test_eval\.py:\d+\)\n", err), err
    try:
        _names(None)  # raises inside midus_surgery/train/evaluate.py
    except TypeError as exc:
        line = str(unforeseen_failure(model, exc))
    assert re.search(r"raised at \S*midus_surgery/train/evaluate\.py:\d+\); a bug in midus-surgery: please report it$", line), line


def test_an_unexpected_error_at_a_later_models_tasks_keeps_the_table_before_it(setup, three_models, task_suite, capsys, monkeypatch):
    """eval --tasks: an error no check foresees outside lm-eval's scoring (its wrapper of the second model) was a
    traceback; now the table (or JSON) of the model scored before it, then one line naming the model, exit 1."""
    from lm_eval.models.huggingface import HFLM

    second, wrap = three_models[1], HFLM.__init__

    def failing(self, pretrained, **kwargs):
        if Path(pretrained.config._name_or_path) == Path(second):
            raise ValueError("no such wrapper")
        wrap(self, pretrained=pretrained, **kwargs)

    monkeypatch.setattr(HFLM, "__init__", failing)
    error = re.compile(f"error: {re.escape(str(second))}: the evaluation failed with an unexpected error "
                       r"\(ValueError: no such wrapper, raised at \S*test_eval\.py:\d+\)\n")
    assert main(tasks_args(three_models, task_suite)) == 1
    captured = capsys.readouterr()
    assert captured.out.splitlines()[0].split()[:4] == ["task", "(items)", "metric", three_models[0].name]
    assert str(second.name) not in captured.out and error.fullmatch(captured.err), captured
    assert main([*tasks_args(three_models, task_suite), "--json"]) == 1
    captured = capsys.readouterr()
    assert [r["model"] for r in json.loads(captured.out)["models"]] == [str(three_models[0])]
    assert error.fullmatch(captured.err), captured.err


def test_a_full_disk_at_a_later_models_tasks_keeps_the_table_before_it(three_models, task_suite, capsys, monkeypatch):
    """An OSError outside lm-eval's scoring (here a full disk as lm-eval wraps the second model) dropped the first
    model's table (helper-61); now the table, then the CLI's own line for a full disk, exit 1."""
    import errno

    from lm_eval.models.huggingface import HFLM

    second, wrap = three_models[1], HFLM.__init__

    def failing(self, pretrained, **kwargs):
        if Path(pretrained.config._name_or_path) == Path(second):
            raise OSError(errno.ENOSPC, "No space left on device")
        wrap(self, pretrained=pretrained, **kwargs)

    monkeypatch.setattr(HFLM, "__init__", failing)
    assert main(tasks_args(three_models, task_suite)) == 1
    captured = capsys.readouterr()
    assert captured.out.splitlines()[0].split()[:4] == ["task", "(items)", "metric", three_models[0].name], captured.out
    assert captured.err.startswith("error: the disk is full") and "Traceback" not in captured.err, captured.err
    assert main([*tasks_args(three_models, task_suite), "--json"]) == 1
    captured = capsys.readouterr()
    assert [r["model"] for r in json.loads(captured.out)["models"]] == [str(three_models[0])]


def test_a_full_disk_at_a_later_models_data_keeps_the_results_before_it(setup, three_models, capsys, monkeypatch):
    """eval --data: a full disk while the second model is evaluated: the first model's line (or --json's list), then
    the CLI's one line for a full disk, exit 1 (docs/evaluate.md says both modes keep what completed)."""
    import errno

    fail_in_forward(monkeypatch, three_models[1], lambda: OSError(errno.ENOSPC, "No space left on device"))
    args = ["eval", *map(str, three_models), "--data", str(setup["root"] / "corpus"), "--block-size", "16",
            "--cache-dir", str(setup["cache"]), "--quiet"]
    assert main(args) == 1
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{three_models[0]}: perplexity "), captured
    assert captured.err.startswith("error: the disk is full") and "Traceback" not in captured.err, captured.err
    assert main([*args, "--json"]) == 1
    assert [r["model"] for r in json.loads(capsys.readouterr().out)] == [str(three_models[0])]


def test_ctrl_c_at_a_later_models_tasks_prints_the_table_before_it(three_models, task_suite, capsys, monkeypatch):
    """Ctrl-C while lm-eval scored the second model printed only "interrupted": the first model's table was lost. Now
    its table (or JSON), then "interrupted", exit 130, as eval --data and train do."""
    fail_in_forward(monkeypatch, three_models[1], KeyboardInterrupt)
    assert main(tasks_args(three_models, task_suite)) == 130
    captured = capsys.readouterr()
    table = captured.out.splitlines()
    assert table[0].split()[:4] == ["task", "(items)", "metric", three_models[0].name] and len(table[0].split()) == 4, table
    assert any(row.startswith("midus_cloze (2)") and "perplexity" in row for row in table) and captured.err == "interrupted\n"
    assert main([*tasks_args(three_models, task_suite), "--json"]) == 130
    captured = capsys.readouterr()
    assert [r["model"] for r in json.loads(captured.out)["models"]] == [str(three_models[0])] and captured.err == "interrupted\n"
    fail_in_forward(monkeypatch, three_models[0], KeyboardInterrupt)  # none scored yet: nothing printed
    assert main([*tasks_args(three_models, task_suite), "--json"]) == 130
    assert capsys.readouterr() == ("", "interrupted\n")


def test_ctrl_c_at_a_later_models_data_prints_the_results_before_it(setup, three_models, capsys, monkeypatch):
    """eval --data: the perplexity line of each model completed (or --json's list of them), then "interrupted", exit 130."""
    fail_in_forward(monkeypatch, three_models[1], KeyboardInterrupt)
    args = ["eval", *map(str, three_models), "--data", str(setup["root"] / "corpus"), "--block-size", "16",
            "--cache-dir", str(setup["cache"]), "--quiet"]
    assert main(args) == 130
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{three_models[0]}: perplexity ") and captured.err == "interrupted\n", captured
    assert main([*args, "--json"]) == 130
    captured = capsys.readouterr()
    assert [r["model"] for r in json.loads(captured.out)] == [str(three_models[0])] and captured.err == "interrupted\n"


def test_several_models_each_read_their_tokenizer_once(setup, three_models, task_suite, capsys, monkeypatch):
    """The check before the first evaluation loaded each model's tokenizer, dropped it, and the evaluation loaded it
    again; now the check's is the one evaluated with, eval --data and --tasks alike (a model named twice: twice)."""
    from collections import Counter

    from transformers.tokenization_utils_base import PreTrainedTokenizerBase

    reads, hf_load = Counter(), PreTrainedTokenizerBase.from_pretrained.__func__

    def counted(cls, path, *args, **kwargs):  # every tokenizer load, whichever class AutoTokenizer picks, goes through it
        reads[str(path)] += 1
        return hf_load(cls, path, *args, **kwargs)

    monkeypatch.setattr(PreTrainedTokenizerBase, "from_pretrained", classmethod(counted))
    models = list(three_models)  # a model named twice is refused (trial73 F9h)
    assert main(["eval", *map(str, models), "--data", str(setup["root"] / "corpus"), "--block-size", "16",
                 "--cache-dir", str(setup["cache"]), "--quiet", "--json"]) == 0
    assert [r["model"] for r in json.loads(capsys.readouterr().out)] == list(map(str, models))
    assert reads == {str(m): 1 for m in three_models}
    reads.clear()
    assert main([*tasks_args(three_models[:2], task_suite), "--json"]) == 0
    assert [r["model"] for r in json.loads(capsys.readouterr().out)["models"]] == list(map(str, three_models[:2]))
    assert reads == {str(m): 1 for m in three_models[:2]}


@pytest.mark.parametrize("model_type", ["gpt_neox", "gpt2", "llama", "mixtral", "opt", "qwen2_moe"])
def test_the_header_check_passes_every_saved_model_and_finds_a_lacking_tensor_where_names_are_plain(tmp_path, model_type):
    """The check eval makes before the first evaluation must never refuse what the load takes: each architecture as
    transformers saves it passes (GPT-NeoX stores its head as embed_out, renamed on load). A tensor taken out is found
    where the load only renames; where it converts (experts stored one tensor each), the load judges the names."""
    from safetensors.torch import load_file, save_file
    from tiny_configs import tiny_config

    from midus_surgery.compiler.plan import load_renames
    from midus_surgery.train.evaluate import ModelLoadError, check_weight_headers, model_on_meta

    AutoModelForCausalLM.from_config(tiny_config(model_type)).save_pretrained(tmp_path)
    model = model_on_meta(tmp_path)
    check_weight_headers(tmp_path, model)
    weights = load_file(tmp_path / "model.safetensors")
    name = next(k for k in sorted(weights) if ".layers.1." in k or ".h.1." in k)
    del weights[name]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    if load_renames(model) is None:
        assert model_type in ("mixtral", "qwen2_moe")
        check_weight_headers(tmp_path, model)  # left to the load
    else:
        with pytest.raises(ModelLoadError, match=f"missing 1 tensor\\(s\\): {re.escape(name)}$"):
            check_weight_headers(tmp_path, model)


def test_a_full_disk_while_the_token_cache_is_written_is_one_line(setup, tmp_path, capsys, monkeypatch):
    """numpy's tofile reported a full disk as "N requested and M written" with no errno, which the CLI could not
    tell from any other OSError: a traceback (trial61). The cache's tokens now go through the file's own write:
    ENOSPC, the CLI's one line, and no cache entry left behind."""
    import builtins

    from midus_surgery.train import data

    real_open = builtins.open

    def full_disk(path, mode="r", *args, **kwargs):  # tokens.bin on a disk with no room left: /dev/full
        if str(path).endswith("tokens.bin") and "w" in mode:
            return real_open("/dev/full", mode, *args, **kwargs)
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(data, "open", full_disk, raising=False)
    cache = tmp_path / "cache"
    assert main(["eval", str(setup["model"]), "--data", str(setup["root"] / "corpus"), "--block-size", "16",
                 "--cache-dir", str(cache), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: the disk is full") and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not any(p.name == "tokens.bin" for p in cache.rglob("*")), list(cache.rglob("*"))


def test_an_empty_text_field_is_refused_not_read_as_text(setup, capsys, tmp_path):
    """`--text-field ""` scored the `text` field without a word (eval's `or "text"`; analyze's too)."""
    for argv in (["eval", str(setup["model"]), "--data", str(setup["files"][0])],
                 ["analyze", str(setup["model"]), "--data", str(setup["files"][0]), "--out", str(tmp_path / "an")]):
        for field in ("", " "):
            with pytest.raises(SystemExit) as stop:
                main([*argv, "--text-field", field, "--quiet"])
            assert stop.value.code == 2
            assert "argument --text-field: an empty field name" in capsys.readouterr().err
    assert not (tmp_path / "an").exists()


def test_several_models_are_scored_over_the_same_windows(setup, capsys, tmp_path):
    """Each model was scored at its own default block size: the same weights with fewer positions in config.json gave
    another perplexity over other tokens, side by side without a word. Without --block-size every model is scored at
    the smallest default, said in a note; with it, as given, without the note."""
    import shutil

    short = tmp_path / "short"
    shutil.copytree(setup["model"], short)
    config = json.loads((short / "config.json").read_text())
    positions = config["max_position_embeddings"]
    assert positions > 32
    (short / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 32}))
    common = ["--data", str(setup["root"] / "corpus"), "--cache-dir", str(setup["cache"]), "--quiet", "--json"]
    assert main(["eval", str(setup["model"]), str(short), *common]) == 0
    captured = capsys.readouterr()
    first, second = json.loads(captured.out)
    assert first["block_size"] == second["block_size"] == 32
    assert first["tokens"] == second["tokens"] and first["loss"] == pytest.approx(second["loss"], rel=1e-6)
    assert (f"note: every model is scored in blocks of 32 tokens, the smallest of their default block sizes ({setup['model']}: "
            f"{min(512, positions)}, {short}: 32), so that their perplexities cover the same windows; --block-size sets another") in captured.err
    assert main(["eval", str(setup["model"]), str(short), *common, "--block-size", "16"]) == 0
    captured = capsys.readouterr()
    assert [r["block_size"] for r in json.loads(captured.out)] == [16, 16] and "note:" not in captured.err
    assert main(["eval", str(setup["model"]), *common]) == 0  # one model: its own default
    assert json.loads(capsys.readouterr().out)["block_size"] == min(512, positions)


def test_a_json_file_as_data_is_noted_as_read_as_text(setup, capsys, tmp_path, monkeypatch):
    """JSON records in a .json file (as HF datasets writes them) were scored as raw text, braces and keys included,
    without a word (perplexity 52.9 against 66.0 for the same records as .jsonl). Eval and analyze say so; a .jsonl
    file gets no note."""
    records = "".join(json.dumps({"text": f.read_text()}) + "\n" for f in setup["files"])
    as_json, as_jsonl = tmp_path / "held.json", tmp_path / "held.jsonl"
    as_json.write_text(records)
    as_jsonl.write_text(records)
    said = "is read as plain text, braces and keys included (JSON records, one a line, are read as records from a .jsonl or .ndjson file)"
    common = ["--block-size", "16", "--cache-dir", str(setup["cache"]), "--quiet"]
    assert main(["eval", str(setup["model"]), "--data", str(as_json), *common]) == 0
    assert f"note: {as_json} {said}" in capsys.readouterr().err
    assert main(["eval", str(setup["model"]), "--data", str(as_jsonl), *common]) == 0
    assert "read as plain text" not in capsys.readouterr().err
    # a quoted glob reaches the tool unexpanded: its .json matches get the note too (and the .jsonl none)
    assert main(["eval", str(setup["model"]), "--data", str(tmp_path / "held.*"), *common]) == 0
    err = capsys.readouterr().err
    assert err.count("read as plain text") == 1 and f"note: {as_json} {said}" in err, err
    # a recursive glob: every .json file the reader reads for it, in folders below too (a plain glob found one: trial137 F2)
    deeper = tmp_path / "sub" / "more.json"
    deeper.parent.mkdir()
    deeper.write_text(records)
    assert main(["eval", str(setup["model"]), "--data", str(tmp_path / "**" / "*.json"), *common]) == 0
    err = capsys.readouterr().err
    assert err.count("read as plain text") == 2 and f"note: {as_json} {said}" in err and f"note: {deeper} {said}" in err, err
    # a model that fails after one was scored: the note comes with the scores printed (it was said on success only: trial137 F1)
    import midus_surgery.train.evaluate as evaluate

    other, scored = tmp_path / "other", evaluate.run_eval
    shutil.copytree(setup["model"], other)

    def interrupted_at_the_second(model, *args, **kwargs):
        if Path(model) == other:
            raise KeyboardInterrupt
        return scored(model, *args, **kwargs)

    monkeypatch.setattr(evaluate, "run_eval", interrupted_at_the_second)
    assert main(["eval", str(setup["model"]), str(other), "--data", str(as_json), *common]) != 0
    err = capsys.readouterr().err
    assert f"note: {as_json} {said}" in err and "interrupted" in err.strip().splitlines()[-1], err
    monkeypatch.undo()
    # said once the data were read: a refusal (analyze of a model with no Memory or inserted block) stays one line
    assert main(["analyze", str(setup["model"]), "--data", str(as_json), "--out", str(tmp_path / "an"), *common]) != 0
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ") and said not in err, err


def test_an_own_config_class_that_does_not_load_is_not_blamed_on_the_tokenizer(setup, tmp_path):
    """With --trust-remote-code, an auto_map naming a config class its module lacks was said as "no usable tokenizer"
    (AutoTokenizer builds the config first): the config class is named."""
    import shutil

    from midus_surgery.train.evaluate import ModelLoadError, load_tokenizer

    model = tmp_path / "own-config"
    shutil.copytree(setup["model"], model)
    (model / "configuration_own.py").write_text("from transformers import LlamaConfig\n\n\nclass OtherConfig(LlamaConfig):\n    pass\n")
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoConfig": "configuration_own.OwnConfig"}}))
    with pytest.raises(ModelLoadError) as err:
        load_tokenizer(model, trust_remote_code=True)
    said = str(err.value)
    assert said.startswith(f"{model}: its own config class configuration_own.OwnConfig (config.json auto_map AutoConfig) could not be "
                           "loaded (AttributeError: ") and "tokenizer" not in said, said


def test_several_models_share_a_block_size_read_from_each_config_class(setup, capsys, tmp_path):
    """The shared block size read config.json's keys as written: RWKV states its positions as context_length, an alias
    only its config class knows, so it was taken for 512 and the run failed on "--block-size: ... exceed 64
    positions" that the user never gave. Read as run_eval reads them: both models scored in blocks of 64."""
    import shutil

    from transformers import RwkvConfig, RwkvForCausalLM

    vocab = json.loads((setup["model"] / "config.json").read_text())["vocab_size"]
    torch.manual_seed(0)
    rwkv = tmp_path / "rwkv"
    RwkvForCausalLM(RwkvConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, attention_hidden_size=32,
                               intermediate_size=64, context_length=64)).save_pretrained(rwkv)
    assert "max_position_embeddings" not in json.loads((rwkv / "config.json").read_text())
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(setup["model"] / name, rwkv / name)
    common = ["--data", str(setup["root"] / "corpus"), "--cache-dir", str(setup["cache"]), "--quiet", "--json", "--max-blocks", "2"]
    assert main(["eval", str(setup["model"]), str(rwkv), *common]) == 0, capsys.readouterr().err
    captured = capsys.readouterr()
    assert [r["block_size"] for r in json.loads(captured.out)] == [64, 64]
    assert f"{rwkv}: 64), so that their perplexities cover the same windows" in captured.err, captured.err


def test_the_tokens_after_the_last_whole_block_are_said_not_scored(setup, capsys):
    """In blocks, what follows the last whole block is not scored: 113 of 241 tokens went unsaid (trial146 F5). Said with
    the result, with the count (JSON: tokens_after_the_last_block); with --max-blocks, all after the last block read."""
    data = [str(setup["root"] / "corpus"), "--cache-dir", str(setup["cache"])]
    assert main(["eval", str(setup["model"]), "--data", *data, "--block-size", "16", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    blocks = result["corpus_tokens"] // 16
    tail = result["corpus_tokens"] - blocks * 16
    assert tail and result["sequences"] == blocks and result["tokens_after_the_last_block"] == tail, result
    assert main(["eval", str(setup["model"]), "--data", *data, "--block-size", "16", "--quiet"]) == 0
    assert f"in {blocks} blocks of <= 16 tokens (the last {tail} tokens fill no block: not scored); " in capsys.readouterr().out
    assert main(["eval", str(setup["model"]), "--data", *data, "--block-size", "16", "--max-blocks", "2", "--json"]) == 0
    # all the tokens after the last block read, where --max-blocks stops early (trial155 F1: 0 was given)
    assert json.loads(capsys.readouterr().out)["tokens_after_the_last_block"] == result["corpus_tokens"] - 32
    assert main(["eval", str(setup["model"]), "--data", *data, "--block-size", "16", "--max-blocks", "2", "--quiet"]) == 0
    assert (f"in 2 blocks of <= 16 tokens (stopped there by --max-blocks: the {result['corpus_tokens'] - 32} tokens after "
            "the last one read not scored); ") in capsys.readouterr().out
    # a --max-blocks that stops nothing is not said to (trial156 4); per document, the tokens after the last window read
    assert main(["eval", str(setup["model"]), "--data", *data, "--block-size", "16", "--max-blocks", str(blocks), "--quiet"]) == 0
    assert f"in {blocks} blocks of <= 16 tokens (the last {tail} tokens fill no block: not scored); " in capsys.readouterr().out
    assert main(["eval", str(setup["model"]), "--data", *data, "--block-size", "16", "--per-document", "--json"]) == 0
    whole = json.loads(capsys.readouterr().out)
    assert whole["tokens_after_the_last_block"] == 0 and not whole["stopped_at_max_blocks"], whole
    assert main(["eval", str(setup["model"]), "--data", *data, "--block-size", "16", "--per-document", "--max-blocks", "3", "--json"]) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["stopped_at_max_blocks"] and first["tokens_after_the_last_block"] == first["corpus_tokens"] - first["tokens_read"] > 0
    # windows of 2: a document's last token alone predicts nothing, and is said not read
    assert main(["eval", str(setup["model"]), "--data", *data, "--block-size", "2", "--per-document", "--json"]) == 0
    pairs = json.loads(capsys.readouterr().out)
    lone = pairs["corpus_tokens"] - pairs["tokens_read"]
    assert lone == pairs["tokens_after_the_last_block"] and not pairs["stopped_at_max_blocks"]
    assert main(["eval", str(setup["model"]), "--data", *data, "--block-size", "2", "--per-document", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert (f" ({lone} tokens alone at a document's end: not read); " if lone else "document windows of <= 2 tokens; ") in out, out
    (setup["root"] / "one").mkdir(exist_ok=True)
    one = setup["root"] / "one" / "one-past.txt"  # 16 tokens and the EOS: one block, one token after it
    one.write_text("the cat sat on the mat . the dog ran on the log . the bird\n")
    assert main(["eval", str(setup["model"]), "--data", str(one), "--cache-dir", str(setup["cache"]), "--block-size", "16", "--quiet"]) == 0
    assert " in 1 block of <= 16 tokens (the last 1 token fill no block: not scored); " in capsys.readouterr().out
