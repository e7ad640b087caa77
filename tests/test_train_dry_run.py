"""`train --dry-run`: the checks a start makes and the lines it says, with nothing written (no run
directory, no token cache, no checkpoint moved) and no weights read; what it says is what the start
of the real run then says (steps, parameter groups, resume notes)."""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
from pathlib import Path

import pytest
from train_fixtures.tiny import make_midus_output, write_config, write_corpus

from midus_surgery.cli import main
from midus_surgery.io.output_dir import MARKER
from midus_surgery.train.config import load_train_config
from midus_surgery.train.runner import train

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny models, one thread, results as in subprocesses

STEP_TOKENS = 16 * 4  # block_size x micro_batch_size of write_config


@pytest.fixture(scope="module")
def midus(tmp_path_factory):
    """A MIDUS output of the tiny Llama (a memory block after every second layer) and a corpus."""
    pytest.importorskip("midus_surgery.model.hml")
    root = tmp_path_factory.mktemp("dry_run")
    out = make_midus_output(root)
    write_corpus(root / "corpus", files=2, sentences_per_file=40)
    return {"root": root, "model": out, "corpus": root / "corpus"}


def snapshot(root: Path) -> dict[str, tuple]:
    """Every path under ``root`` with its kind, size, modification time and (small files) bytes."""
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        small = p.read_bytes() if p.is_file() and st.st_size < 4096 else None
        out[str(p.relative_to(root))] = (p.is_dir(), st.st_size, st.st_mtime_ns, small)
    return out


def dry(capsys, config: Path, *overrides: str) -> tuple[int, str, str]:
    code = main(["train", str(config), *overrides, "--dry-run"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def group_table(text: str) -> list[str]:
    """The parameter-group table of a start's lines: from its header to the trainable line."""
    lines = text.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("group "))
    last = next(i for i, line in enumerate(lines) if line.startswith("trainable: "))
    return lines[first:last + 1]


def test_a_dry_run_writes_nothing_reads_no_weights_and_says_what_the_start_then_says(midus, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(midus["model"], model)
    cache, run = tmp_path / "cache", tmp_path / "run"
    config = write_config(tmp_path / "run.yaml", model, run, midus["corpus"], cache, tokens=STEP_TOKENS * 5, freeze="base")
    weights = model / "model.safetensors"
    kept = weights.read_bytes()
    (length,) = struct.unpack("<Q", kept[:8])
    weights.write_bytes(kept[:8 + length] + b"\xff" * (len(kept) - 8 - length))  # every value NaN: the header alone is read
    before, corpus_before = snapshot(tmp_path), snapshot(midus["corpus"])

    code, out, err = dry(capsys, config)
    assert code == 0, err
    assert snapshot(tmp_path) == before and snapshot(midus["corpus"]) == corpus_before
    assert not run.exists() and not cache.exists()
    lines = out.splitlines()
    assert lines[0] == f"dry run: train: {model.resolve()} -> {(run / 'final').resolve()}; starting fresh", out
    assert "data: data.train: 2 files, " in out and "not tokenised yet: the run tokenises it first, into " + str(cache.resolve()) in out
    assert f"budget {STEP_TOKENS * 5:,} tokens = 5 steps of {STEP_TOKENS}" in out
    table = group_table(out)
    memory_row = next(line for line in table if line.startswith("memory tables (memory.*)"))
    assert int(memory_row.split()[3]) > 0, table  # the Memory blocks' tables train under freeze: base
    (state_line,) = [line for line in lines if line.startswith("model state: ")]
    assert " per process (fp32 weights " in state_line, out
    assert lines[-1].startswith("dry run: nothing was written, no weights were read"), out
    assert "data.train is read as text when the run tokenises it, first thing" in lines[-1], out  # what it could not check
    planned = next(line for line in lines if line.startswith("memory layer: "))
    assert planned in ("memory layer: compiled CPU kernels, built at the start, or found in the cache (a dry run builds none) "
                       "(MIDUS_HML_KERNELS=torch runs the pure-torch path instead)", "memory layer: pure-torch path"), out

    code, out, _ = dry(capsys, config, f"data.held_out=[{json.dumps(str(midus['corpus']))}]")
    assert code == 0 and "data.train and data.held_out are read as text when the run tokenises them, first thing" in out.splitlines()[-1], out
    # a budget under one step: rounded up to a step, said (trial87 F10: it trained 8x the budget without a word)
    code, out, _ = dry(capsys, config, "tokens=10")
    assert code == 0 and f"note: the budget of 10 tokens is less than one step of {STEP_TOKENS:,} " in out, out

    assert main(["train", str(config), "--quiet"]) == 2  # the start reads the values, and refuses them
    assert "hold non-finite values" in capsys.readouterr().err and not run.exists()
    weights.write_bytes(kept)
    started = []
    train(load_train_config(config), echo=started.append)
    said = "\n".join(started)
    assert group_table(said) == table  # the groups the dry run said are the ones the run trains
    built = next(line for line in started if line.startswith("memory layer: "))
    assert built == planned.replace(", built at the start, or found in the cache (a dry run builds none)", ""), (built, planned)  # the kernels build here
    assert f"budget {STEP_TOKENS * 5:,} tokens = 5 steps of {STEP_TOKENS}" in said
    assert state_line in started  # a run's log says the state it was expected to hold, as its dry run did (trial93 F6)


def test_a_dry_run_says_when_the_model_state_is_more_than_the_machines_memory(midus, tmp_path, capsys, monkeypatch):
    """A 70B dry run said 1.03 TiB of model state on a 23.5 GiB machine without a word, and the start would have been
    killed midway through its load (trial93 F3); the state line also says the load maps the weights files beside it
    (a bf16 model's maxrss was 1.54x the state it said: F2, page cache; tools/load_memory.py measures both)."""
    import collections

    import psutil

    config = write_config(tmp_path / "run.yaml", midus["model"], tmp_path / "run", midus["corpus"], tmp_path / "cache", tokens=STEP_TOKENS)
    code, out, err = dry(capsys, config)
    assert code == 0 and "the load maps the weights files beside them (page cache the system can reclaim, counted in peak RSS)" in out and "more than this machine's memory" not in out
    memory = collections.namedtuple("memory", "total available")
    monkeypatch.setattr(psutil, "virtual_memory", lambda: memory(1 << 10, 1 << 10))
    code, out, err = dry(capsys, config)
    assert code == 0, err
    assert "note: that is more than this machine's memory (1.00 KiB): the start would run out of memory loading the model" in out, out


def test_a_dry_run_of_a_resume_says_the_checkpoint_and_the_changes_and_moves_nothing(midus, tmp_path, capsys, monkeypatch):
    cache, run = tmp_path / "cache", tmp_path / "run"
    config = write_config(tmp_path / "run.yaml", midus["model"], run, midus["corpus"], cache, tokens=STEP_TOKENS * 4,
                          resume="auto", **{"checkpoint.every": 2, "checkpoint.keep_last": 3, "eval.at_start": False})
    train(load_train_config(config), echo=lambda line: None)
    newest = run / "checkpoints" / "step-00000004"
    state = json.loads((newest / "trainer_state.json").read_text())
    (newest / "scheduler.json").write_text((newest / "scheduler.json").read_text() + " ")  # a size its state file does not record
    (run / MARKER).unlink()  # a run directory from before markers: a start marks it as this tool's, a dry run does not
    before = snapshot(tmp_path)

    code, out, err = dry(capsys, config, f"tokens={STEP_TOKENS * 8}", "optim.lr=1e-3", "optim.schedule=linear", "memory.grad_clip=0.5")
    assert code == 0, err
    assert snapshot(tmp_path) == before  # the broken checkpoint is not moved aside, the run directory not marked
    assert "checkpoint step-00000004 would be skipped: " in out and "the run moves it to step-00000004.broken" in out
    assert f"resuming from {(run / 'checkpoints' / 'step-00000002').resolve()} (step 2)" in out
    # trial46: the schedule's and the clipping's changes were applied without a word
    assert "resuming with optim.lr 0.003 -> 0.001, optim.schedule cosine -> linear, memory.grad_clip 1.0 -> 0.5 (changed since the checkpoint)" in out
    assert "the run now has 8 optimiser steps, not 4" in out
    # every schedule and clipping setting docs/training.md names is said when a resume changes it
    code, again, err = dry(capsys, config, "optim.warmup=5", "optim.min_lr_ratio=0.5", "memory.schedule=same", "optim.grad_clip=0.25")
    assert code == 0, err
    changed = next(line for line in again.splitlines() if line.startswith("resuming with "))
    for said in (r"optim\.warmup \S+ -> 5(\.0)?,", r"optim\.min_lr_ratio \S+ -> 0\.5,", r"memory\.schedule constant -> same,",
                 r"optim\.grad_clip \S+ -> 0\.25 \(changed since the checkpoint\)"):
        assert re.search(said, changed), (said, changed)
    assert "train blocks" in out and " epochs" in out and "not tokenised yet" not in out  # the cache is there: the blocks are known
    assert out.strip().splitlines()[-1].endswith("the same command without --dry-run trains"), out
    assert state["step"] == 4

    code, out, err = dry(capsys, config, "resume=null")  # what a start refuses, a dry run refuses the same way
    assert code == 2 and "already holds checkpoints" in err and len(err.strip().splitlines()) == 1, err
    assert snapshot(tmp_path) == before
    # a config without the key: the line names the file, not its line 1 (which says nothing of resume; trial74 F8);
    # in a second process of a launch the line carries its rank, so its repeat of the first process's line reads as one
    unset = tmp_path / "unset.yaml"
    unset.write_text("".join(line for line in config.read_text().splitlines(keepends=True) if not line.startswith("resume:")))
    before = snapshot(tmp_path)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    code, out, err = dry(capsys, unset)
    assert code == 2 and err.startswith(f"[rank 1] {unset}: resume: resume is not set, and ") and len(err.strip().splitlines()) == 1, err
    assert snapshot(tmp_path) == before


def test_a_budget_not_a_whole_number_of_steps_says_the_tokens_and_epochs_the_run_trains(midus, tmp_path, capsys):
    """65 tokens in steps of 64: the run trains two whole steps, 128 tokens, and the start line's epochs are
    those 128 tokens' (they were the budget's, 65, about half)."""
    cache = tmp_path / "cache"
    real = write_config(tmp_path / "real.yaml", midus["model"], tmp_path / "real", midus["corpus"], cache,
                        tokens=STEP_TOKENS + 1, **{"eval.at_start": False})
    said = []
    result = train(load_train_config(real), echo=said.append)
    assert (result.steps, result.tokens) == (2, 2 * STEP_TOKENS)
    (data_line,) = [line for line in said if line.startswith("data: ")]
    train_tokens = int(re.search(r"\(([\d,]+) train tokens\)", data_line).group(1).replace(",", ""))
    assert (f"budget {STEP_TOKENS + 1} tokens = 2 steps of {STEP_TOKENS} (4 x 1 accum x 1 proc x 16), training "
            f"{2 * STEP_TOKENS} tokens (the budget rounded up to a whole step), {2 * STEP_TOKENS / train_tokens:.2f} epochs") in data_line

    # the dry run of the same budget (the tokens cached: the epochs are known) says the same
    config = write_config(tmp_path / "dry.yaml", midus["model"], tmp_path / "dry", midus["corpus"], cache, tokens=STEP_TOKENS + 1)
    code, out, err = dry(capsys, config)
    assert code == 0, err
    (dry_line,) = [line for line in out.splitlines() if line.startswith("data: ")]
    assert dry_line == data_line

    # a whole number of steps: no rounding to say, the epochs are the budget's
    code, out, err = dry(capsys, config, f"tokens={STEP_TOKENS * 2}")
    assert code == 0, err
    (dry_line,) = [line for line in out.splitlines() if line.startswith("data: ")]
    assert dry_line.endswith(f"budget {2 * STEP_TOKENS} tokens = 2 steps of {STEP_TOKENS} (4 x 1 accum x 1 proc x 16), "
                             f"{2 * STEP_TOKENS / train_tokens:.2f} epochs"), dry_line


def test_what_a_start_refuses_at_once_a_dry_run_refuses_too(midus, tmp_path, capsys):
    """trial43: these passed the dry run ("the same command without --dry-run trains") and the start then refused
    them at once. Each is refused by both in one line (the same one but for the missing weights, which transformers
    words at the start), and nothing is written."""
    cache, run = tmp_path / "cache", tmp_path / "run"

    def both(config: Path, *overrides: str, says: str, start_says: str | None = None, code: int = 2) -> None:
        before, had_run = snapshot(tmp_path), run.exists()
        for flags, said in ((["--dry-run"], says), (["--quiet"], start_says or says)):
            assert main(["train", str(config), *overrides, *flags]) == code, flags
            err = capsys.readouterr().err
            assert said in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, (flags, err)
            if flags == ["--dry-run"]:
                assert snapshot(tmp_path) == before
        assert run.exists() == had_run  # the start, refusing, leaves no run directory (it may have filled the token cache)

    def model_with(name: str, edit) -> Path:
        model = tmp_path / name
        shutil.copytree(midus["model"], model)
        edit(model)
        return model

    # weights: none at all; stored in another shape than config.json makes them
    empty = model_with("no-weights", lambda m: (m / "model.safetensors").unlink())
    both(write_config(tmp_path / "a.yaml", empty, run, midus["corpus"], cache), says="holds no weights")

    # weights that are pickles alone: read only when the config allows it, as apply reads such a base only with --allow-pickle
    import torch
    from safetensors.torch import load_file

    pickled = model_with("pickled", lambda m: (torch.save(load_file(m / "model.safetensors"), m / "pytorch_model.bin"),
                                               (m / "model.safetensors").unlink()))
    pickled_config = write_config(tmp_path / "p.yaml", pickled, run, midus["corpus"], cache)
    both(pickled_config, says=f"init_from: {pickled} holds only pickle .bin weights; pickle can run code when loaded: "
                              "set allow_pickle: true in the train config to read them (with weights_only=True)")
    assert main(["train", str(pickled_config), "allow_pickle=true", "--dry-run"]) == 0, capsys.readouterr().err
    capsys.readouterr()

    def wider(m: Path) -> None:
        config = json.loads((m / "config.json").read_text())
        (m / "config.json").write_text(json.dumps({**config, "intermediate_size": config["intermediate_size"] * 2}))
    both(write_config(tmp_path / "b.yaml", model_with("wider", wider), run, midus["corpus"], cache), says="mlp")

    # weights that lack a tensor the model has, or hold one it lacks (trial50: the dry run said the run would train)
    from safetensors.torch import load_file, save_file

    def edit_weights(change):
        def edit(m: Path) -> None:
            tensors = load_file(m / "model.safetensors")
            change(tensors)
            save_file(tensors, m / "model.safetensors", metadata={"format": "pt"})
        return edit
    name = "model.layers.0.mlp.up_proj.weight"
    lacking = model_with("lacking", edit_weights(lambda t: t.pop(name)))
    both(write_config(tmp_path / "a2.yaml", lacking, run, midus["corpus"], cache),
         says=f"the weights do not match the model's architecture: missing 1 tensor(s): {name}")  # the start says it as the dry run
    extra = model_with("extra", edit_weights(lambda t: t.__setitem__("model.layers.0.mlp.spare.weight", t[name].clone())))
    both(write_config(tmp_path / "a3.yaml", extra, run, midus["corpus"], cache),
         says="the weights do not match the model's architecture: 1 unexpected tensor(s): model.layers.0.mlp.spare.weight")
    # a float tensor stored as integers: transformers' load casts it without a word, and the run trains on garbage
    ints = model_with("ints", edit_weights(lambda t: t.__setitem__(name, (t[name] * 1000).int())))
    both(write_config(tmp_path / "a5.yaml", ints, run, midus["corpus"], cache),
         says=f"1 floating-point tensor(s) stored as integers or booleans, which the load would cast without a word: {name} (I32)")

    # a run directory or an export the system will not make (trial50: the dry run said the run would train)
    plain = write_config(tmp_path / "a4.yaml", midus["model"], run, midus["corpus"], cache)
    both(plain, "run_dir=/proc/midus-no-such/run", says="run_dir: cannot write /proc/midus-no-such/run: ")
    both(plain, "export.dir=/proc/midus-no-such/final", says="export.dir: cannot write /proc/midus-no-such/final: ")
    both(plain, "export.dir=''", says="export.dir: should be a path, got an empty text")  # was "should have at least 1 item(s)" (trial63)

    # a config value with which every logit is NaN: one line naming it (was a NaN loss at step 1, exit 4)
    def negative_eps(m: Path) -> None:
        config = json.loads((m / "config.json").read_text())
        (m / "config.json").write_text(json.dumps({**config, "rms_norm_eps": -1.0}))
    both(write_config(tmp_path / "c.yaml", model_with("eps", negative_eps), run, midus["corpus"], cache),
         says="rms_norm_eps is -1.0; it must be a number, 0 or above")

    # a MIDUS config whose depth disagrees with its own layer map: said so (trial63: transformers' "IndexError: index 5 is
    # out of range" from eval, train and analyze alike)
    def shallower(m: Path) -> None:
        config = json.loads((m / "config.json").read_text())
        (m / "config.json").write_text(json.dumps({**config, "num_hidden_layers": config["num_hidden_layers"] - 1}))
    cut = model_with("shallower", shallower)
    depth = json.loads((cut / "config.json").read_text())["num_hidden_layers"]
    says = f"num_hidden_layers is {depth}, but its layer map (midus.layer_map) lists {depth + 1} layers"
    both(write_config(tmp_path / "c2.yaml", cut, run, midus["corpus"], cache), says=says)
    for command in (["eval", str(cut), "--data", str(midus["corpus"])], ["analyze", str(cut), "--data", str(midus["corpus"]),
                                                                          "--out", str(tmp_path / "analysis")]):
        assert main([*command, "--quiet"]) == 2
        err = capsys.readouterr().err
        assert says in err and len(err.strip().splitlines()) == 1, err

    # a token cache that is a file: located (the start said "File exists", naming no key)
    (tmp_path / "notes.txt").write_text("mine")
    both(write_config(tmp_path / "d.yaml", midus["model"], run, midus["corpus"], tmp_path / "notes.txt"),
         says="data.cache_dir: the token cache")
    assert (tmp_path / "notes.txt").read_text() == "mine"

    # a resume on other data: the checkpoint's blocks would be replayed or skipped (exit 4 at the start's restore)
    config = write_config(tmp_path / "e.yaml", midus["model"], run, midus["corpus"], cache, tokens=STEP_TOKENS * 2,
                          resume="auto", **{"checkpoint.every": 1, "eval.at_start": False})
    train(load_train_config(config), echo=lambda line: None)
    capsys.readouterr()
    both(config, "data.block_size=8", f"tokens={STEP_TOKENS * 4}", says="the data changed since it was written (data.block_size: 16 -> 8)", code=4)
    both(config, f"resume={tmp_path / 'no-such-step'}", says="no-such-step does not exist")

    # data that is a link loop or a broken link: a data error naming the link (trial44: the loop was a path error, exit 2)
    (tmp_path / "loop-a.txt").symlink_to(tmp_path / "loop-b.txt")
    (tmp_path / "loop-b.txt").symlink_to(tmp_path / "loop-a.txt")
    (tmp_path / "gone.txt").symlink_to(tmp_path / "no-such-file.txt")
    for link, says in (("loop-a.txt", "loop-a.txt is a symbolic link that leads back to itself (a link loop)"),
                       ("gone.txt", "gone.txt is a symbolic link to " + str(tmp_path / "no-such-file.txt") + ", which does not exist")):
        data = f"data.train=[{json.dumps(str(tmp_path / link))}]"
        both(config, data, "resume=null", f"run_dir={tmp_path / 'run-links'}", says=says, code=3)
        both(config, f"data.held_out=[{json.dumps(str(tmp_path / link))}]", "resume=null", f"run_dir={tmp_path / 'run-links'}",
             says=says, code=3)


def test_a_freeze_policy_the_model_cannot_take_is_refused_before_the_data_is_tokenised(midus, tmp_path, capsys):
    """freeze: base on a folder without midus_plan.json: the dry run refused it first thing, the start tokenised the corpus
    into data.cache_dir, then refused it (trial99 L1). Both refuse it in the same line now, before reading any data."""
    model = tmp_path / "no-plan"
    shutil.copytree(midus["model"], model)
    (model / "midus_plan.json").unlink()
    config = write_config(tmp_path / "t.yaml", model, tmp_path / "run", midus["corpus"], tmp_path / "cache", freeze="base")
    said = []
    for flag in ("--dry-run", "--quiet"):
        assert main(["train", str(config), flag]) == 2
        err = capsys.readouterr().err
        assert "midus_plan.json (written by `midus-surgery apply`) to know which layers were inserted" in err, err
        said.append(err)
    assert said[0] == said[1]
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run").exists()


def test_a_run_dir_or_export_dir_whose_path_no_model_reader_takes_is_refused_before_anything_is_written(midus, tmp_path, capsys,
                                                                                                      monkeypatch):
    """trial104: the UTF-8 check moved to apply --out alone, so run_dir: $BAD/run (BAD a folder whose name is not UTF-8)
    trained and exported a model eval and verify then refused; a relative run_dir under a config folder whose name holds
    a newline wrote a run whose "exported" line split. Both are refused, dry or not, in one line, with nothing written."""
    bad = Path(os.fsdecode(bytes(tmp_path) + b"/bad\xff"))
    bad.mkdir()
    monkeypatch.setenv("MIDUS_TEST_BAD", str(bad))
    cache = tmp_path / "cache"
    odd = tmp_path / "e\nOK forged"
    odd.mkdir()
    cases = [(write_config(tmp_path / "a.yaml", midus["model"], "$MIDUS_TEST_BAD/run", midus["corpus"], cache), "run_dir: ", "not UTF-8"),
             (write_config(tmp_path / "b.yaml", midus["model"], tmp_path / "run", midus["corpus"], cache,
                           **{"export.dir": "$MIDUS_TEST_BAD/final"}), "export.dir: ", "not UTF-8"),
             (write_config(odd / "c.yaml", midus["model"], "run", midus["corpus"], cache), "run_dir: ", "control character")]
    for config, where, said in cases:
        for flags in (["--dry-run"], ["--quiet"]):
            assert main(["train", str(config), *flags]) == 2, (config, flags)
            err = capsys.readouterr().err
            assert where in err and said in err and len(err.strip().splitlines()) == 1, (config, flags, err)
    assert list(bad.iterdir()) == [] and sorted(p.name for p in odd.iterdir()) == ["c.yaml"] and not (tmp_path / "run").exists()
