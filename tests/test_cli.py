"""The command line as a user meets it: exit codes, messages, no tracebacks for bad input."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from midus_surgery.cli import main

ROOT = Path(__file__).resolve().parent.parent
BUNDLED = sorted((ROOT / "recipes").glob("*.yaml"))  # up-scaling recipes; training configs live in recipes/train/


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "midus_surgery.cli", *args], capture_output=True, text=True, cwd=cwd)


def test_bundled_recipes_validate():
    assert {p.name for p in BUNDLED} >= {"smollm2-135m-midus.yaml", "smollm2-135m-dus.yaml", "smollm2-135m-llama-pro.yaml", "llama-3.2-1b-midus.yaml", "solar-10.7b-dus.yaml"}
    result = run("validate", *map(str, BUNDLED))
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("OK ") == len(BUNDLED)
    assert "16 -> 24 layers (8 memory)" in result.stdout
    assert "32 -> 48 layers (16 copy)" in result.stdout


def test_ablation_recipes_validate_and_differ_from_the_midus_recipe_in_one_knob():
    """The recipes docs/reproduction.md's ablation ran: each is the bundled MIDUS recipe with one memory knob changed."""
    import yaml

    ablations = sorted((ROOT / "recipes" / "ablation").glob("*.yaml"))
    assert len(ablations) >= 5
    result = run("validate", *map(str, ablations))
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("30 -> 36 layers (6 memory)") == len(ablations)
    reference = yaml.safe_load((ROOT / "recipes" / "smollm2-135m-midus.yaml").read_text())
    for path in ablations:
        recipe = yaml.safe_load(path.read_text())
        assert recipe["layout"] == reference["layout"], path.name
        changed = {k for k in recipe["memory"].keys() | reference["memory"].keys()
                   if recipe["memory"].get(k, "default") != reference["memory"].get(k, "default")}
        assert len(changed) == 1, (path.name, changed)


def test_invalid_recipe_lists_every_problem_and_exits_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "base:\n  path: x\n  config: " + str(ROOT / "recipes/configs/llama-3.2-1b.json") + "\n"
        "layout:\n  interleave:\n    after: [3, 40]\n    kind: memory\nmemory:\n  top_k: 3\noutput:\n  dir: out\n"
    )
    good = ROOT / "recipes" / "smollm2-135m-dus.yaml"
    result = run("validate", str(good), str(bad))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "OK " in result.stdout and "INVALID" in result.stderr
    assert f"{bad}:9:3: memory.top_k: unknown key 'top_k'" in result.stderr
    # schema problems come first; range problems need a schema-valid recipe
    bad.write_text(bad.read_text().replace("  top_k: 3\n", "  topk: 3\n"))
    result = run("validate", str(bad))
    assert result.returncode == 2
    assert f"{bad}:6:16: layout.interleave.after.1: layer 40 is out of range" in result.stderr


def test_validate_counts_plain_copies_in_the_recipes_own_word(tmp_path, capsys):
    """`kind: transformer` (the older name of `copy`) was counted as "6 copy": the count says the recipe's word."""
    older = ROOT / "recipes" / "smollm2-135m-dus.yaml"
    assert "kind: transformer" in older.read_text()
    newer = tmp_path / "copy.yaml"
    newer.write_text(older.read_text().replace("kind: transformer", "kind: copy").replace("../work", str(ROOT / "work"))
                     .replace("configs/", str(ROOT / "recipes" / "configs") + "/"))
    assert main(["validate", str(older), str(newer)]) == 0
    out = capsys.readouterr().out
    assert f"{older}: 30 -> 36 layers (6 transformer)" in out and f"{newer}: 30 -> 36 layers (6 copy)" in out, out


def test_plan_says_where_a_shared_bank_is_counted(tmp_path, capsys):
    """With share_bank the memory layers' rows leave the bank out, so the rows fell short of the total by it, unsaid:
    a line under the layer map says where it is counted."""
    from midus_surgery.compiler.planner import plan_recipe
    from midus_surgery.units import human_count

    recipe = tmp_path / "shared.yaml"
    recipe.write_text(f"base:\n  path: {tmp_path / 'absent'}\n  config: {ROOT / 'recipes' / 'configs' / 'smollm2-135m.json'}\n"
                      "layout:\n  interleave:\n    after_every: 15\n    kind: memory\n"
                      "memory:\n  n_subkeys: 16\n  topk: 4\n  latent_dim: 8\n  share_bank: true\noutput:\n  dir: out\n")
    plan = plan_recipe(recipe).plan
    assert plan.shared_bank_params == 16 * 16 * 8  # n^2 slots of d_l
    base_rows = sum(n for layer, n in zip(plan.layers, plan.layer_params) if layer.kind == "base")
    outside_layers = plan.params["base"] - base_rows  # embeddings and the final norm
    assert plan.params["total"] - sum(plan.layer_params) - outside_layers == plan.shared_bank_params  # the gap is the bank
    assert main(["plan", str(recipe)]) == 0
    out = capsys.readouterr().out
    assert (f"shared latent bank (midus_shared_bank.weight): {human_count(16 * 16 * 8)} parameters, counted once in the totals "
            "and in no layer's row (the 2 memory layers read it)") in out
    recipe.write_text(recipe.read_text().replace("  share_bank: true\n", ""))
    assert main(["plan", str(recipe)]) == 0
    assert "shared latent bank" not in capsys.readouterr().out


def test_plan_json_keys():
    result = run("plan", str(ROOT / "recipes" / "llama-3.2-1b-midus.yaml"), "--json")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["valid"] is True and plan["num_hidden_layers"] == 24
    assert "tensors" not in plan  # --tensors adds them
    assert [layer["kind"] for layer in plan["layers"][:3]] == ["base", "base", "memory"]
    assert set(plan["layers"][0]) >= {"index", "source", "kind"}
    assert set(plan["params"]) == {"base", "added", "total", "dus_added"}
    assert set(plan["flops_per_token"]) == {"base", "dus", "plan"}
    assert plan["flops_seq_len"] == 2048  # the context the FLOPs are counted at (the recipe's default)
    # the paper's setting: fewer added parameters and FLOPs than 8 plain copies
    assert plan["params"]["added"] < plan["params"]["dus_added"]
    assert plan["flops_per_token"]["plan"] < plan["flops_per_token"]["dus"]
    assert plan["anatomy"]["attn_out_proj"] == "self_attn.o_proj"


def test_plan_json_of_a_dus_recipe_promises_no_identity_and_tensors_lists_each_output_tensor():
    """README: function_preserving null where no identity is promised (plain copies); --tensors: name, shape, source, rule."""
    result = run("plan", str(ROOT / "recipes" / "smollm2-135m-dus.yaml"), "--json", "--tensors")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["valid"] is True and plan["function_preserving"] is None
    assert set(plan["tensors"][0]) == {"name", "shape", "source", "rule"}
    assert {t["name"] for t in plan["tensors"]} >= {"model.embed_tokens.weight", f"model.layers.{plan['num_hidden_layers'] - 1}.mlp.up_proj.weight"}


def test_plan_json_of_an_invalid_recipe_is_json_too(tmp_path, capsys):
    """A program reading `plan --json` gets the problems as data on stdout; a person, the lines on stderr; exit 2."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("base:\n  path: x\nlayout:\n  interleave: {after_every: 2}\nmemory:\n  top_k: 3\noutput:\n  dir: out\n")
    assert main(["plan", str(bad), "--json"]) == 2
    text = capsys.readouterr()
    assert json.loads(text.out) == {"valid": False, "problems": [{"where": f"{bad}:6:3", "field": "memory.top_k",
                                                                  "message": "unknown key 'top_k'; did you mean 'topk'?"}]}
    assert f"{bad}:6:3: memory.top_k: unknown key 'top_k'" in text.err


def test_plan_table_shows_layers_counts_and_anatomy():
    result = run("plan", str(ROOT / "recipes" / "smollm2-135m-midus.yaml"))
    assert result.returncode == 0, result.stderr
    assert "Layer map" in result.stdout and "memory" in result.stdout
    assert "DUS equivalent" in result.stdout and "FLOPs/token" in result.stdout
    assert "o_proj" in result.stdout  # the anatomy line


@pytest.mark.parametrize("recipe,zeroed", [
    ("smollm2-135m-llama-pro.yaml", "mlp.down_proj.weight (zeroed copy), self_attn.o_proj.weight (zeroed copy)"),
    ("smollm2-135m-midus.yaml", "mlp.hml.proj (new)"),
    ("smollm2-135m-dus.yaml", None),
])
def test_plan_names_what_inserted_blocks_start_with_at_zero(recipe, zeroed):
    result = run("plan", str(ROOT / "recipes" / recipe))
    assert result.returncode == 0, result.stderr
    line = next((x for x in result.stdout.splitlines() if x.startswith("zero at the start in inserted blocks: ")), None)
    assert line == (None if zeroed is None else f"zero at the start in inserted blocks: {zeroed}")


def test_apply_with_missing_base_is_one_clear_error(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("base:\n  path: nowhere\nlayout:\n  stack:\n    layers: [0, 2]\noutput:\n  dir: out\n")
    code = main(["apply", str(recipe)])
    err = capsys.readouterr().err
    assert code == 2
    assert "base model not found" in err and "r.yaml:2:3" in err
    assert not (tmp_path / "out").exists()

    # base.config given: validate plans without the weights, apply needs them (trial42: exit 1, no way out said)
    config = tmp_path / "config.json"
    config.write_text((ROOT / "recipes" / "configs" / "smollm2-135m.json").read_text())
    recipe.write_text(f"base:\n  path: work/smollm2-135m\n  config: {config}\nlayout:\n  stack:\n    layers: [0, 2]\noutput:\n  dir: out\n")
    assert main(["validate", str(recipe)]) == 0
    capsys.readouterr()
    assert main(["apply", str(recipe), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"base model not found: {tmp_path / 'work' / 'smollm2-135m' / 'config.json'}: apply reads the weights there" in err, err
    assert "python tools/fetch_smollm2.py writes it" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_a_base_folder_of_gguf_files_says_which_key_names_one(tmp_path, capsys):
    (tmp_path / "nowhere").mkdir()
    (tmp_path / "nowhere" / "model-q8.gguf").write_bytes(b"GGUF")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("base:\n  path: nowhere\nlayout:\n  stack:\n    layers: [0, 2]\noutput:\n  dir: out\n")
    assert main(["validate", str(recipe)]) == 2
    captured = capsys.readouterr()
    out = captured.out + captured.err
    assert (f"r.yaml:2:3: base.path: {tmp_path / 'nowhere'} has no config.json but holds GGUF weights (model-q8.gguf): "
            f"give the file, base.path: {tmp_path / 'nowhere' / 'model-q8.gguf'}, or set base.gguf_file: model-q8.gguf") in out


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> Path:
    from train_fixtures.tiny import make_model_dir

    return make_model_dir(tmp_path_factory.mktemp("tiny") / "base", with_plan=False)


def validate_lines(tmp_path: Path, capsys, base: Path, body: str, name: str = "r.yaml") -> tuple[int, str]:
    recipe = tmp_path / name
    recipe.write_text(f"base:\n  path: {base}\n{body}")
    code = main(["validate", str(recipe)])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


MEM = "memory: {n_subkeys: 4, topk: 2, latent_dim: 8}\n"


def test_validate_notes_that_apply_will_need_overwrite_for_an_earlier_output(tiny_base, tmp_path, capsys):
    """validate said OK for a recipe whose output.dir held an earlier output, and apply then refused without --overwrite
    (trial82 F6): OK, with a note saying so."""
    body = "layout: {interleave: {after: [1], kind: copy}}\noutput: {dir: out}\n"
    code, text = validate_lines(tmp_path, capsys, tiny_base, body)
    assert code == 0 and "--overwrite" not in text, text
    assert main(["apply", str(tmp_path / "r.yaml"), "--quiet"]) == 0
    capsys.readouterr()
    code, text = validate_lines(tmp_path, capsys, tiny_base, body)
    assert code == 0 and text.startswith("OK ") and (f"  note: output.dir {tmp_path / 'out'} holds an earlier output of midus-surgery "
                                                     "apply: apply replaces it only with --overwrite") in text, text

def test_plan_says_every_note_validate_says(tiny_base, tmp_path, capsys):
    """The README says plan shows validate's notes; it left out three (trial98 F3): apply's need of --allow-pickle for a
    pickle-only base, a memory: section no block uses, and an earlier output at output.dir."""
    import torch
    from safetensors.torch import load_file

    base = tmp_path / "pickled"
    shutil.copytree(tiny_base, base)
    torch.save(load_file(base / "model.safetensors"), base / "pytorch_model.bin")
    (base / "model.safetensors").unlink()
    body = "layout: {interleave: {after: [1], kind: copy}}\n" + MEM + "output: {dir: out}\n"
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / ".midus-surgery").write_text(json.dumps({"tool": "midus-surgery", "kind": "apply", "files": []}))
    code, text = validate_lines(tmp_path, capsys, base, body)
    said = [line.removeprefix("  note: ") for line in text.splitlines() if line.startswith("  note: ")]
    assert code == 0 and len(said) == 3, text
    assert said[0].endswith("holds only pickle .bin weights: apply reads them only with --allow-pickle (and then with weights_only=True)")
    assert said[1] == "the recipe sets memory:, but no block is a memory block; it is not used"
    assert said[2].startswith(f"output.dir {tmp_path / 'out'} holds an earlier output of midus-surgery apply")
    assert main(["plan", str(tmp_path / "r.yaml")]) == 0
    assert [line.removeprefix("note: ") for line in capsys.readouterr().out.splitlines() if line.startswith("note: ")] == said
    assert main(["plan", str(tmp_path / "r.yaml"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["notes"] == said


def test_plan_notes_an_output_dir_apply_would_refuse_which_validate_refuses(tiny_base, tmp_path, capsys):
    """plan writes nothing and apply --out may write elsewhere: an output.dir holding the user's files is a note there
    (plan printed the plan before it checked output.dir, trial102 R12), and validate's INVALID, as apply's refusal."""
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    code, text = validate_lines(tmp_path, capsys, tiny_base, "layout: {interleave: {after: [1], kind: copy}}\noutput: {dir: mine}\n")
    assert code == 2 and "output.dir: " in text, text
    assert main(["plan", str(tmp_path / "r.yaml")]) == 0
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note: ")]
    assert len(notes) == 1 and notes[0].endswith("; apply refuses it unless given --out elsewhere") and str(tmp_path / "mine") in notes[0], notes
    assert main(["plan", str(tmp_path / "r.yaml"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["notes"] == [notes[0].removeprefix("note: ")]
    assert (tmp_path / "mine" / "notes.txt").read_text() == "mine"


def test_plan_and_apply_show_the_recipes_name_as_text(tiny_base, tmp_path, capsys):
    """plan read brackets in the recipe's file name as rich markup ('x[/b].yaml': a MarkupError traceback), and plan and apply
    printed a newline in it as a line of its own (trial103)."""
    body = f"base:\n  path: {tiny_base}\nlayout: {{interleave: {{after: [1], kind: copy}}}}\noutput: {{dir: out}}\n"
    for name, shown in (("x[/b].yaml", "x[/b].yaml"), ("y[red]z.yaml", "y[red]z.yaml"), ("n\nv.yaml", "n\\nv.yaml"),
                        ("a:fire:b.yaml", "a:fire:b.yaml")):  # rich's emoji codes too (shown as a fire emoji: trial104)
        (tmp_path / name).parent.mkdir(exist_ok=True)  # "x[/b].yaml" is b].yaml in the folder x[
        (tmp_path / name).write_text(body)
        assert main(["plan", str(tmp_path / name)]) == 0
        out = capsys.readouterr().out
        assert out.startswith(f"{tmp_path}/{shown}: llama, 4 -> 5 layers"), out
    assert main(["validate", str(tmp_path / "a:fire:b.yaml")]) == 0
    assert f"OK {tmp_path}/a:fire:b.yaml: " in capsys.readouterr().out
    assert main(["apply", str(tmp_path / "n\nv.yaml"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert f"{tmp_path}/n\\nv.yaml: 4 -> 5 layers" in out and not any(line.startswith("v.yaml") for line in out.splitlines()), out


def test_apply_out_is_relative_to_the_current_directory_and_output_dir_to_the_recipe(tiny_base, tmp_path, capsys, monkeypatch):
    """As recipes.md and apply --help say (trial98 F6: train's key=value overrides are relative to the config's folder)."""
    (tmp_path / "recipes").mkdir()
    (tmp_path / "cwd").mkdir()
    recipe = tmp_path / "recipes" / "r.yaml"
    recipe.write_text(f"base:\n  path: {tiny_base}\nlayout: {{interleave: {{after: [1], kind: copy}}}}\noutput: {{dir: out}}\n")
    monkeypatch.chdir(tmp_path / "cwd")
    assert main(["apply", "../recipes/r.yaml", "--quiet", "--out", "here"]) == 0
    assert (tmp_path / "cwd" / "here" / "config.json").is_file() and not (tmp_path / "recipes" / "here").exists()
    assert main(["apply", "../recipes/r.yaml", "--quiet"]) == 0
    assert (tmp_path / "recipes" / "out" / "config.json").is_file() and not (tmp_path / "cwd" / "out").exists()


def test_a_nul_escape_in_a_recipe_path_is_a_located_line(tiny_base, tmp_path, capsys):
    """YAML's quoted "\\0" in output.dir was a 27-line ValueError traceback from validate and apply (trial39)."""
    code, text = validate_lines(tmp_path, capsys, tiny_base, 'layout: {interleave: {after_every: 2, kind: copy}}\noutput: {dir: "out\\0x"}\n')
    assert code == 2 and "r.yaml:4:15: output.dir: a NUL character (\\0) in a string" in text and "Traceback" not in text
    assert main(["apply", str(tmp_path / "r.yaml"), "--quiet"]) == 2 and "a NUL character" in capsys.readouterr().err


def test_validate_says_where_a_block_replaces_its_original(tiny_base, tmp_path, capsys):
    """A memory block in place of base layer 0: the base layer is missing, not 'index-dependent code'."""
    body = "layout: {layers: [{source: 0, kind: memory}, {source: 1}, {source: 2}, {source: 3}]}\n" + MEM + "output: {dir: out}\n"
    code, text = validate_lines(tmp_path, capsys, tiny_base, body)
    assert code == 2 and "base layer 0 is not in the output: its only use is the inserted memory block at output layer 0" in text, text
    assert "depends on its index" not in text
    code, text = validate_lines(tmp_path, capsys, tiny_base, body + "accept_function_change: true\n")
    assert code == 0, text
    # every dropped layer named, as ranges (trial77 F2: "base layers 5, 6, ... 11" of 26 read as the whole list)
    pruned = "layout: {layers: [{source: 0}, {source: 0, kind: memory}]}\nallow_dropped_layers: true\n" + MEM + "output: {dir: out}\n"
    code, text = validate_lines(tmp_path, capsys, tiny_base, pruned)
    assert code == 2 and "base layer 1 (and base layers 2-3) is not in the output: the layout leaves it out" in text, text


def test_validate_says_a_bank_too_large_to_build_is_too_large(tiny_base, tmp_path, capsys, monkeypatch):
    """A bank at the schema's bound (2^40 values) cannot be allocated: not 'set accept_function_change'.
    The allocator's refusal is raised here as torch words it: on a host that overcommits memory the
    real 4 TiB allocation would succeed and its first write would wake the OOM killer."""
    from midus_surgery.emit import replica

    def refuse(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 4398046511104 bytes. Error code 12 (Cannot allocate memory)")

    monkeypatch.setattr(replica, "_run_replica", refuse)
    body = "layout: {interleave: {after: [1], kind: memory}}\nmemory: {n_subkeys: 64, topk: 32, latent_dim: 16}\noutput: {dir: out}\n"
    code, text = validate_lines(tmp_path, capsys, tiny_base, body)
    assert code == 2 and "r.yaml:4:1: memory: building the recipe on a tiny replica of the base ran out of memory" in text, text
    assert "65,536 values" in text and "accept_function_change" not in text
    # a bank past the machine's memory is said before anything is built (the replica's own banks are tiny: trial82 F5)
    monkeypatch.undo()
    body = "layout: {interleave: {after: [1], kind: memory}}\nmemory: {n_subkeys: 8192, topk: 32, latent_dim: 16384}\noutput: {dir: out}\n"
    code, text = validate_lines(tmp_path, capsys, tiny_base, body)
    assert code == 2 and "r.yaml:4:1: memory: n_subkeys 8192^2 x latent_dim 16384 make a latent bank of 1,099,511,627,776 values" in text
    assert "GiB of memory: apply could not build it" in text and "accept_function_change" not in text, text


def test_the_replica_check_builds_small_banks_whatever_the_recipes(tiny_base, tmp_path, capsys, monkeypatch):
    """Whether a block starts as the identity does not hang on the bank's size: plan built a recipe's full-size banks
    (n_subkeys 1024, latent_dim 512: 2 GiB each) in its replica, a minute and 9 GB (trial82 F5)."""
    from midus_surgery.model import hml

    built = []
    real = hml.HeadwiseMemory.__init__

    def counting(self, *args, **kwargs):
        real(self, *args, **kwargs)
        if getattr(self, "bank", None) is not None and self.bank.weight.device.type != "meta":  # the plan's counts: on meta
            built.append(self.bank.weight.numel())

    monkeypatch.setattr(hml.HeadwiseMemory, "__init__", counting)
    body = "layout: {interleave: {after: [1], kind: memory}}\nmemory: {n_subkeys: 512, topk: 8, latent_dim: 256}\noutput: {dir: out}\n"
    code, text = validate_lines(tmp_path, capsys, tiny_base, body)
    assert code == 0, text
    assert built and max(built) <= 8 * 8 * 16, built


def test_a_full_temp_disk_is_said_as_such_not_blamed_on_the_recipe(tiny_base, tmp_path, capsys, monkeypatch):
    """The replica check writes tiny models under TMPDIR: a full one read 'INVALID ... set
    accept_function_change: true', advice that turns off the guard for a recipe that is fine."""
    import errno

    from midus_surgery.emit import replica

    def full(*args, **kwargs):  # as safetensors words it
        raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")

    body = "layout: {interleave: {after: [1], kind: identity}}\noutput: {dir: out}\n"
    for cause in ("writing", "making the folder"):
        monkeypatch.setattr(replica, "_RESULTS", {})
        if cause == "writing":
            monkeypatch.setattr(replica, "_run_replica", full)
        else:
            monkeypatch.setattr(replica.tempfile, "TemporaryDirectory", lambda **kw: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device")))
        code, text = validate_lines(tmp_path, capsys, tiny_base, body)
        assert code == 1 and "INVALID" not in text and "accept_function_change" not in text, text
        assert text.startswith("error: cannot check the recipe on a tiny replica of the base: writing its temporary files in "), text
        assert "No space left on device" in text and text.strip().endswith("point TMPDIR at a disk with room, and run again"), text
        assert len(text.strip().splitlines()) == 1, text


@pytest.mark.parametrize("out_dir, message", [
    ("''", "output.dir: should be a path, got an empty text"),
    (".", "contains the recipe"),
    ("BASE/sub", "is inside the base model"),
    ("AFILE/sub", "afile is a file, not a folder"),
])
def test_validate_refuses_an_output_apply_would_refuse(tiny_base, tmp_path, capsys, out_dir, message):
    (tmp_path / "afile").write_text("a user's file")
    body = ("layout: {interleave: {after: [1], kind: copy}}\noutput:\n  dir: "
            + out_dir.replace("BASE", str(tiny_base)).replace("AFILE", str(tmp_path / "afile")) + "\n")
    code, text = validate_lines(tmp_path, capsys, tiny_base, body)
    assert code == 2 and "r.yaml:5:" in text and "output.dir: " in text and message in text, text
    assert not (tiny_base / "sub").exists()  # validate writes nothing, not even apply's probe folder


def test_validate_refuses_a_midus_output_or_a_weights_file_as_the_base(tiny_base, tmp_path, capsys):
    midus = tmp_path / "midus-out"
    midus.mkdir()
    (midus / "config.json").write_text('{"model_type": "midus", "num_hidden_layers": 4, "auto_map": {}}')
    body = "layout: {interleave: {after: [1], kind: copy}}\noutput: {dir: out}\n"
    code, text = validate_lines(tmp_path, capsys, midus, body)
    assert code == 2 and "is a MIDUS output (model_type 'midus'); up-scaling one again is not supported" in text, text
    code, text = validate_lines(tmp_path, capsys, tiny_base / "model.safetensors", body)
    assert code == 2 and "model.safetensors is a file: give the model's directory" in text, text


def test_validate_notes_a_memory_section_no_block_uses(tiny_base, tmp_path, capsys):
    code, text = validate_lines(tmp_path, capsys, tiny_base, "layout: {interleave: {after: [1], kind: copy}}\n" + MEM + "output: {dir: out}\n")
    assert code == 0 and "note: the recipe sets memory:, but no block is a memory block; it is not used" in text, text
    code, text = validate_lines(tmp_path, capsys, tiny_base, "layout: {interleave: {after: [1], kind: memory}}\n" + MEM + "output: {dir: out}\n")
    assert code == 0 and "note:" not in text, text


@pytest.mark.parametrize("by_index", [True, False])
def test_validate_notes_a_dus_layout_on_a_base_whose_layers_read_their_index(tmp_path, capsys, by_index):
    """GPT-2 with scale_attn_by_inverse_layer_idx scales each layer's attention by 1 / (its index + 1): a DUS layout
    moves the base's own layers, which then compute otherwise (a trial found it applied without a word; identity and
    memory recipes on it are refused). The plain GPT-2 and a Llama base (the test above) get no note."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    base = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=4, n_embd=32, n_head=2, vocab_size=128, bos_token_id=0, eos_token_id=0,
                               scale_attn_by_inverse_layer_idx=by_index)).save_pretrained(base)
    code, text = validate_lines(tmp_path, capsys, base, "layout: {interleave: {after_every: 2, kind: transformer}}\noutput: {dir: out}\n")
    why = ("from the same input: its code depends on its index or on the depth (num_hidden_layers), so copies compute as their "
           "new position, not as their source layer, and the base's own layers after an insertion do not compute as they did in the base")
    note = f"note: on a tiny random replica of the base, the copy of base layer 1 at output position 2 computes differently from its source {why}"
    assert code == 0 and (note in text) == by_index and ("note:" in text) == by_index, text
    assert main(["plan", str(tmp_path / "r.yaml"), "--json"]) == 0
    assert (note[len("note: "):] in json.loads(capsys.readouterr().out)["notes"]) == by_index
    # copies after the last layer move no base layer: the copies themselves compute as their new index (trial90 F3)
    code, text = validate_lines(tmp_path, capsys, base, "layout: {stack: {layers: [2, 4]}}\noutput: {dir: out}\n")
    note = f"note: on a tiny random replica of the base, the copy of base layer 2 at output position 4 computes differently from its source {why}"
    assert code == 0 and (note in text) == by_index and ("note:" in text) == by_index, text


def test_validate_and_plan_note_what_the_author_may_not_have_meant(tiny_base, tmp_path, capsys):
    """Valid, but worth a line before a long apply: layers pruned on purpose, memory that starts
    random, and memory blocks at the defaults' size (Llama-3.2-1B's) on a tiny base."""
    body = "layout: {slices: [{layers: [0, 2]}, {layers: [1, 2]}, {layers: [3, 4]}]}\nallow_dropped_layers: true\noutput: {dir: out}\n"
    code, text = validate_lines(tmp_path, capsys, tiny_base, body)
    assert code == 0 and "note: base layer 2 left out of the output (allow_dropped_layers)" in text, text
    random = MEM.replace("}", ", init: random}")
    code, text = validate_lines(tmp_path, capsys, tiny_base, "layout: {interleave: {after: [1], kind: memory}}\n" + random + "output: {dir: out}\n")
    assert code == 0 and "note: memory.init: random: the memory blocks start from random values" in text, text
    assert main(["plan", str(tmp_path / "r.yaml")]) == 0
    assert "starts as the base's function: no: memory.init: random" in capsys.readouterr().out
    code, text = validate_lines(tmp_path, capsys, tiny_base, "layout: {interleave: {after: [1], kind: memory}}\noutput: {dir: out}\n")
    assert code == 0 and "note: a memory block has " in text and "the base block it extends" in text and "n_subkeys^2 = 65,536 rows" in text, text
    assert main(["plan", str(tmp_path / "r.yaml"), "--json"]) == 0  # a program reading the plan gets the notes too
    assert [n[:21] for n in json.loads(capsys.readouterr().out)["notes"]] == ["a memory block has 16"]
    assert main(["plan", str(tmp_path / "r.yaml")]) == 0
    assert "note: a memory block has " in capsys.readouterr().out
    code, text = validate_lines(tmp_path, capsys, tiny_base, "layout: {interleave: {after: [1], kind: copy}}\noutput: {dir: out}\n")
    assert code == 0 and "note:" not in text, text
    from tiny_configs import tiny_config

    qwen2 = tmp_path / "qwen2.json"  # validate reads a config alone (base.config)
    qwen2.write_text(tiny_config("qwen2", use_sliding_window=True, sliding_window=8, max_window_layers=2).to_json_string())
    code, text = validate_lines(tmp_path, capsys, tmp_path / "no-weights", f"  config: {qwen2}\n"
                                "layout: {slices: [{layers: [0, 3]}, {layers: [1, 4]}]}\noutput: {dir: out2}\n")
    assert code == 0 and "note: the output's sliding-window layers (2, 4, 5) are not 'every layer from N on', so max_window_layers (2, kept)" in text, text
    gemma3 = tmp_path / "gemma3.json"  # the same for Gemma-3's sliding_window_pattern, said once though stated twice
    from tiny_configs import TINY
    from transformers import Gemma3TextConfig

    gemma3.write_text(Gemma3TextConfig(**{**TINY["gemma2"], "num_hidden_layers": 6, "sliding_window_pattern": 3}).to_json_string())
    code, text = validate_lines(tmp_path, capsys, tmp_path / "no-weights", f"  config: {gemma3}\n"
                                "layout: {interleave: {after: [2], kind: copy}}\noutput: {dir: out3}\n")
    assert code == 0 and text.count("note:") == 1 and ("note: the output's sliding_window_pattern (3, kept) cannot say the new layout's "
                                                        "layer_types (it makes layer i special where (i + 1) % 3 == 0)") in text, text
    validate_lines(tmp_path, capsys, tiny_base, "layout: {interleave: {after: [1], kind: copy}}\noutput: {dir: out}\n")
    assert main(["plan", str(tmp_path / "r.yaml")]) == 0
    assert "starts as the base's function: no: plain copies change it (as in DUS and SOLAR)" in capsys.readouterr().out


def test_apply_says_the_notes_validate_and_plan_say(tmp_path, capsys):
    """apply printed none of validate's notes, so an author who went straight to apply was not told that the output keeps
    a max_window_layers that cannot say its sliding layers, or that its memory starts random (trial72 N7). What apply's
    writing says itself (base tensors left out) is not said twice."""
    from tiny_configs import tiny_config
    from transformers import AutoModelForCausalLM

    base = tmp_path / "qwen2"
    AutoModelForCausalLM.from_config(tiny_config("qwen2", use_sliding_window=True, sliding_window=8, max_window_layers=2)).save_pretrained(base)
    recipe = tmp_path / "r.yaml"
    random = MEM.replace("}", ", init: random}")
    recipe.write_text(f"base:\n  path: {base}\nlayout: {{slices: [{{layers: [0, 3]}}, {{layers: [1, 2], kind: memory}}, {{layers: [3, 4]}}]}}\n"
                      f"{random}output: {{dir: {tmp_path / 'out'}}}\n")
    assert main(["apply", str(recipe), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "note: the output's sliding-window layers" in err and "so max_window_layers (2, kept) cannot say them" in err, err
    assert "note: memory.init: random: the memory blocks start from random values" in err, err
    assert err.count("note:") == 2, err
    assert (tmp_path / "out" / "config.json").is_file()


def test_validate_notes_base_layers_out_of_their_order_and_a_base_without_weights(tiny_base, tmp_path, capsys):
    """Two slices in the wrong order validated without a word, and so did a folder holding only
    config.json, which apply then refused (trial52). Both are notes: each is a valid recipe."""
    body = "layout: {slices: [{layers: [2, 4]}, {layers: [0, 4]}]}\noutput: {dir: out}\n"
    code, text = validate_lines(tmp_path, capsys, tiny_base, body)
    assert code == 0 and ("note: the output runs base layer 0 (output layer 2) after base layer 3 (output layer 1): the base's own "
                          "layers are out of their order") in text, text
    code, text = validate_lines(tmp_path, capsys, tiny_base, "layout: {slices: [{layers: [0, 4]}, {layers: [2, 4]}]}\noutput: {dir: out}\n")
    assert code == 0 and "note:" not in text, text  # SOLAR's overlap: the base's layers in order, copies after
    config_only = tmp_path / "config-only"
    config_only.mkdir()
    shutil.copy(tiny_base / "config.json", config_only)
    code, text = validate_lines(tmp_path, capsys, config_only, "layout: {slices: [{layers: [0, 4]}, {layers: [2, 4]}]}\noutput: {dir: out}\n")
    assert code == 0 and f"note: {config_only} holds no weights (.safetensors files): validate and plan read its config.json alone" in text
    assert main(["apply", str(tmp_path / "r.yaml")]) == 2  # a problem of the base's: exit 2, as the others
    out, err = capsys.readouterr()
    assert f"error: no weights found in {config_only} (expected .safetensors files)" in err
    assert " layers, " not in out, out  # said from a listing, before the plan (trial93 F8: 16 s for a 70B config)
    # a Trainer's training_args.bin is no weights file: its floats were taken for tensors, a traceback (trial97 F9)
    import torch

    torch.save({"lr": 1.0}, config_only / "training_args.bin")
    assert main(["apply", str(tmp_path / "r.yaml"), "--allow-pickle"]) == 2
    assert f"error: no weights found in {config_only} (expected .safetensors files)" in capsys.readouterr().err
    (config_only / "training_args.bin").rename(config_only / "pytorch_model.bin")
    assert main(["apply", str(tmp_path / "r.yaml"), "--allow-pickle", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"{config_only / 'pytorch_model.bin'} is not a weights file: it holds dict data, not named tensors" in err, err
    assert len(err.strip().splitlines()) == 1, err


def test_plans_tensor_map_piped_keeps_whole_names_and_rules(tiny_base, tmp_path, capsys):
    """Piped to grep or a file, rich cut the tensor map to 80 columns: names ended in '…' and the
    rule column (zeroed) was gone (trial52)."""
    validate_lines(tmp_path, capsys, tiny_base, "layout: {interleave: {after: [1], kind: identity}}\noutput: {dir: out}\n")
    assert main(["plan", str(tmp_path / "r.yaml"), "--tensors"]) == 0
    text = capsys.readouterr().out
    assert "…" not in text
    row = next(line for line in text.splitlines() if "model.layers.2.self_attn.o_proj.weight" in line)
    assert "model.layers.1.self_attn.o_proj.weight (zeroed)" in row, row


def test_validate_notes_a_tokenizer_larger_than_the_bases_vocabulary(tmp_path, capsys):
    """A config whose vocab_size is under its tokenizer's: apply went through without a word and eval / analyze
    refused the data later (trial36). validate (and plan, apply) say it first; the matching tiny base says nothing."""
    from train_fixtures.tiny import make_model_dir

    small = make_model_dir(tmp_path / "small", with_plan=False, vocab_size=8)
    code, text = validate_lines(tmp_path, capsys, small, "layout: {interleave: {after: [1], kind: copy}}\noutput: {dir: out}\n")
    assert code == 0 and re.search(r"note: the base's tokenizer.json has \d+ tokens with ids up to \d+ but its config's vocab_size is 8: ", text), text

    # few tokens, one id past the table (trial41: "cat" -> 999 over 64 rows): the largest id decides, not the count
    wide = make_model_dir(tmp_path / "wide", with_plan=False, vocab_size=64)
    tokenizer = json.loads((wide / "tokenizer.json").read_text())
    tokenizer["model"]["vocab"]["cat"] = 999
    (wide / "tokenizer.json").write_text(json.dumps(tokenizer))
    code, text = validate_lines(tmp_path, capsys, wide, "layout: {interleave: {after: [1], kind: copy}}\noutput: {dir: out}\n")
    assert code == 0 and re.search(r"note: the base's tokenizer.json has \d+ tokens with ids up to 999 but its config's vocab_size is 64: ", text), text


def test_a_base_path_written_relative_to_the_working_directory_says_so(tiny_base, tmp_path, capsys, monkeypatch):
    """mergekit reads paths from the working directory; a recipe from its own: the miss says what to write."""
    import shutil

    shutil.copytree(tiny_base, tmp_path / "bases" / "tiny")
    (tmp_path / "recipes").mkdir()
    recipe = tmp_path / "recipes" / "r.yaml"
    recipe.write_text("base:\n  path: bases/tiny\nlayout: {interleave: {after: [1], kind: copy}}\noutput: {dir: out}\n")
    monkeypatch.chdir(tmp_path)
    assert main(["validate", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert f"base model not found: {tmp_path / 'recipes' / 'bases' / 'tiny' / 'config.json'}" in err
    assert "bases/tiny exists relative to the current directory, but paths in this file are relative to the file's own directory: " \
           "write ../bases/tiny or an absolute path" in err
    # a training config reads init_from the same way, and says the same
    (tmp_path / "recipes" / "t.yaml").write_text("init_from: bases/tiny\nrun_dir: run\ntokens: 1000\ndata: {train: [corpus]}\n")
    assert main(["train", str(tmp_path / "recipes" / "t.yaml")]) == 2
    err = capsys.readouterr().err
    assert "t.yaml:1:1: init_from: " in err and "write ../bases/tiny or an absolute path" in err, err
    monkeypatch.chdir(tmp_path / "recipes")  # nothing there: the plain message
    assert main(["validate", str(recipe)]) == 2 and "current directory" not in capsys.readouterr().err


def test_a_symlink_loop_is_one_line(tiny_base, tmp_path, capsys):
    """pathlib's resolve() raises RuntimeError on a loop: it was a traceback in eval, analyze and train."""
    (tmp_path / "loopA").symlink_to(tmp_path / "loopB")
    (tmp_path / "loopB").symlink_to(tmp_path / "loopA")
    assert main(["eval", str(tiny_base), "--data", str(tmp_path / "loopA"), "--quiet"]) == 3  # a data error since trial63
    err = capsys.readouterr().err
    assert "loopA is a symbolic link that leads back to itself (a link loop)" in err and len(err.splitlines()) == 1, err
    (tmp_path / "runs").symlink_to(tmp_path / "runs")  # a loop on the way to a folder to make: a usage error (trial159 F1)
    with pytest.raises(SystemExit) as usage:
        main(["eval", str(tiny_base), "--data", str(tiny_base / "config.json"), "--cache-dir", str(tmp_path / "runs" / "c"), "--quiet"])
    err = capsys.readouterr().err
    assert usage.value.code == 2 and f"{str(tmp_path / 'runs' / 'c')!r} reaches a link that leads back to itself" in err, err
    assert "Traceback" not in err
    analyze_out = tmp_path / "runs" / "an"  # --out's loop: pathlib's own error, one line
    assert main(["analyze", str(tiny_base), "--data", str(tiny_base / "config.json"), "--out", str(analyze_out), "--quiet"]) != 0
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err


@pytest.mark.parametrize("command", ["eval", "analyze"])
def test_data_that_is_a_link_loop_is_the_data_error_train_gives(tiny_base, tmp_path, capsys, command):
    """train says a --data link loop as a data error (exit 3, naming the link); eval and analyze said pathlib's words,
    exit 2 (trial63). The same line from all three, before any model is read."""
    (tmp_path / "loop.txt").symlink_to(tmp_path / "loop.txt")
    extra = ["--out", str(tmp_path / "analysis")] if command == "analyze" else []
    assert main([command, str(tiny_base), "--data", str(tmp_path / "loop.txt"), "--quiet", *extra]) == 3
    err = capsys.readouterr().err
    assert f"--data: {tmp_path / 'loop.txt'} is a symbolic link that leads back to itself (a link loop)" in err, err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "analysis").exists()


@pytest.mark.parametrize("argv", [["validate"], ["frobnicate"]])
def test_usage_errors(argv):
    result = run(*argv)
    assert result.returncode == 2 and "usage:" in result.stderr


def _modules_after(code: str) -> dict:
    probe = code + "\nimport json, sys\nprint(json.dumps({'modeling_utils': 'transformers.modeling_utils' in sys.modules}))\n"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])


def test_cli_start_up_does_not_import_modeling_code():
    # `--help` and copy-only commands must not pay for transformers.modeling_utils (seconds).
    assert _modules_after("import midus_surgery.cli") == {"modeling_utils": False}


@pytest.mark.parametrize("order", ["package first", "transformers first"])
def test_midus_classes_registered_with_auto_classes_whatever_the_import_order(order):
    imports = ["import midus_surgery", "from transformers import AutoConfig, AutoModelForCausalLM"]
    if order == "transformers first":
        imports.reverse()
    code = "\n".join(imports) + (
        "\nfrom midus_surgery.model.configuration_midus import MidusConfig"
        "\nfrom midus_surgery.model.modeling_midus import MidusForCausalLM"
        "\nassert type(AutoConfig.for_model('midus', base_model_type='llama')) is MidusConfig"
        "\nfrom transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING"
        "\nassert MODEL_FOR_CAUSAL_LM_MAPPING[MidusConfig] is MidusForCausalLM"
    )
    assert _modules_after(code) == {"modeling_utils": True}


def test_every2_recipes_are_the_bundled_set_at_the_papers_proportion():
    """recipes/ablation/every2/: each is a bundled recipe (or the query_source ablation) with 15 blocks, one after every 2nd layer."""
    import yaml

    every2 = sorted((ROOT / "recipes" / "ablation" / "every2").glob("*.yaml"))
    assert {p.name for p in every2} == {f"smollm2-135m-{k}-every2.yaml" for k in ("dus", "llama-pro", "midus", "midus-qs-hidden")}
    result = run("validate", *map(str, every2))
    assert result.returncode == 0, result.stderr
    for kind in ("transformer", "identity"):  # the DUS recipe's own word for its copies
        assert result.stdout.count(f"30 -> 45 layers (15 {kind})") == 1
    assert result.stdout.count("30 -> 45 layers (15 memory)") == 2
    for path in every2:
        stem = path.name.removesuffix("-every2.yaml")
        reference_path = ROOT / "recipes" / f"{stem}.yaml"
        if not reference_path.is_file():
            reference_path = ROOT / "recipes" / "ablation" / f"{stem}.yaml"
        recipe, reference = yaml.safe_load(path.read_text()), yaml.safe_load(reference_path.read_text())
        assert recipe["layout"]["interleave"] == {**reference["layout"]["interleave"], "after_every": 2}, path.name
        assert recipe.get("memory") == reference.get("memory"), path.name
        assert Path(recipe["output"]["dir"]).name == Path(reference["output"]["dir"]).name + "-every2"
        # the same base, wherever the recipe sits
        assert (path.parent / recipe["base"]["config"]).resolve() == (reference_path.parent / reference["base"]["config"]).resolve()


def test_every2_knob_recipes_change_only_their_knobs():
    """recipes/ablation/every2-knobs/: the k / d_l ablation docs/reproduction.md ran on the every2
    query_source=hidden recipe, each changing only the knobs its name says."""
    import yaml

    knobs = {"k16": {"topk"}, "k64": {"topk"}, "dl128": {"latent_dim"}, "dl256-shared": {"latent_dim", "share_bank"}}
    folder = ROOT / "recipes" / "ablation" / "every2-knobs"
    stem = "smollm2-135m-midus-qs-hidden-every2"
    assert {p.name for p in folder.glob("*.yaml")} == {f"{stem}-{k}.yaml" for k in knobs}
    result = run("validate", *sorted(map(str, folder.glob("*.yaml"))))
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("30 -> 45 layers (15 memory)") == len(knobs)
    reference = yaml.safe_load((ROOT / "recipes" / "ablation" / "every2" / f"{stem}.yaml").read_text())
    for knob, keys in knobs.items():
        recipe = yaml.safe_load((folder / f"{stem}-{knob}.yaml").read_text())
        assert recipe["layout"] == reference["layout"] and recipe["base"] == reference["base"], knob
        changed = {k for k in recipe["memory"].keys() | reference["memory"].keys()
                   if recipe["memory"].get(k, "default") != reference["memory"].get(k, "default")}
        assert changed == keys, (knob, changed)
        assert Path(recipe["output"]["dir"]).name == Path(reference["output"]["dir"]).name + f"-{knob}"


def test_llama1b_width_recipes_are_the_three_methods_at_the_papers_block_size_and_proportion():
    """recipes/ablation/llama-1b-width/ (tools/bench_step.py --layout llama1b-every2): DUS, LLaMA-Pro and MIDUS on an
    8-layer base of Llama-3.2-1B's config, a block after every 2nd layer, MIDUS with recipes/llama-3.2-1b-midus.yaml's memory."""
    import json

    import yaml

    folder = ROOT / "recipes" / "ablation" / "llama-1b-width"
    paths = sorted(folder.glob("*.yaml"))
    assert {p.name for p in paths} == {f"llama-1b-8l-{k}-every2.yaml" for k in ("dus", "llama-pro", "midus")}
    result = run("validate", *map(str, paths))
    assert result.returncode == 0, result.stderr
    for kind in ("transformer", "identity", "memory"):  # the DUS recipe's own word for its copies
        assert result.stdout.count(f"8 -> 12 layers (4 {kind})") == 1
    paper = yaml.safe_load((ROOT / "recipes" / "llama-3.2-1b-midus.yaml").read_text())
    midus = yaml.safe_load((folder / "llama-1b-8l-midus-every2.yaml").read_text())
    assert midus["memory"] == paper["memory"] and midus["layout"] == paper["layout"]
    config = json.loads((folder / midus["base"]["config"]).read_text())
    full = json.loads((ROOT / "recipes" / "configs" / "llama-3.2-1b.json").read_text())
    assert config == {**full, "num_hidden_layers": 8}


@pytest.mark.parametrize("command,option,value,message", [
    ("eval", "--block-size", "0", "at least 2, got 0"),  # was a ZeroDivisionError
    ("eval", "--block-size", "1", "at least 2, got 1"),  # a block of one token predicts nothing: a NaN perplexity
    ("eval", "--batch-size", "0", "at least 1, got 0"),  # was a traceback from range()
    ("eval", "--batch-size", "-1", "at least 1, got -1"),
    ("eval", "--max-blocks", "0", "at least 1, got 0"),  # was a NaN perplexity with exit 0
    ("eval", "--threads", "x", "not an integer: 'x'"),
    # torch could not map 100000 threads' stacks, and eval said the weights failed to load (trial70)
    ("eval", "--threads", "100000", f"at most {4 * (os.cpu_count() or 1)} (4 per CPU of this machine's {os.cpu_count() or 1}), got 100000"),
    ("analyze", "--threads", "100000", f"at most {4 * (os.cpu_count() or 1)}"),
    ("analyze", "--batch-size", "0", "at least 1, got 0"),
    ("analyze", "--max-memory-blocks", "0", "at least 1, got 0"),
])
def test_counts_below_their_minimum_are_a_usage_error(command, option, value, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, str(tmp_path), "--data", str(tmp_path), option, value])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and f"argument {option}: {message}" in err.strip().splitlines()[-1]
    assert "Traceback" not in err


@pytest.mark.parametrize("argv", [["apply", "r.yaml", "--out"], ["analyze", "m", "--data", "d", "--out"],
                                  ["eval", "m", "--data", "d", "--cache-dir"], ["analyze", "m", "--data", "d", "--out", "o", "--cache-dir"]])
def test_a_folder_to_write_named_with_a_control_character_is_a_usage_error(argv, capsys):
    """--out took a newline or an escape sequence that output.dir refuses, made the folder and printed it raw (trial83 F6)."""
    from midus_surgery.cli import parse_arguments

    with pytest.raises(SystemExit) as exit_:
        parse_arguments([*argv, "x\x1b]0;TITLE\x07y"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "holds the control character '\\x1b': a folder to write is not named with one" in err
    assert "\x1b" not in err, err


@pytest.mark.parametrize("argv, option", [
    (["apply", "r.yaml", "--out", ""], "--out"),  # the current folder: refused only when it held an input
    (["analyze", "m", "--data", "d", "--out", ""], "--out"),
    (["eval", "m", "--data", ""], "--data"),
    (["eval", "m", "--data", "corpus", ""], "--data"),
    (["analyze", "m", "--out", "o", "--data", ""], "--data"),
    (["eval", "m", "--data", "d", "--cache-dir", ""], "--cache-dir"),
    (["analyze", "m", "--data", "d", "--out", "o", "--cache-dir", ""], "--cache-dir"),
    (["verify", "m", "--base", ""], "--base"),
    (["analyze", "m", "--data", "d", "--out", "o", "--fixed-retrieval", ""], "--fixed-retrieval"),  # the comparison skipped, exit 0
    (["eval", "m", "--tasks", "t", "--include-path", ""], "--include-path"),  # the current folder read as a task folder
    # the positionals: `verify ''` inside a model folder checked it and passed, exit 0 (trial144 F4)
    (["verify", ""], "MODEL_DIR"), (["eval", "", "--data", "d"], "MODEL_DIR"), (["analyze", "", "--data", "d", "--out", "o"], "MODEL_DIR"),
    (["validate", "r.yaml", ""], "RECIPE"), (["plan", ""], "RECIPE"), (["apply", ""], "RECIPE"), (["train", ""], "CONFIG"),
])
def test_an_empty_path_on_the_command_line_is_a_usage_error(argv, option, tmp_path, monkeypatch, capsys):
    """--data "" (an unset shell variable) read every file under the current folder as held-out text, exit 0; --cache-dir ""
    and --base "" fell back to the default cache and the recorded base without a word (trial138 F2). Now one usage line,
    exit 2, before any model is read."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "corpus").write_text("some text " * 50)
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err
    assert f"argument {option}: an empty path (an unset shell variable?); " in err.strip().splitlines()[-1], err
    assert "Traceback" not in err


@pytest.mark.parametrize("argv, option", [
    (["apply", "r.yaml", "--out", " "], "--out"), (["verify", "  "], "MODEL_DIR"), (["eval", "m", "--data", "\t"], "--data"),
])
def test_a_path_of_only_blanks_on_the_command_line_is_a_usage_error(argv, option, tmp_path, monkeypatch, capsys):
    """`apply --out ' '` made a folder named one space, exit 0 (trial144 F5): `--out "$A $B"` with both unset."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and f"argument {option}: a path of only blanks ({argv[-1]!r}) (an unset shell variable?); " in err, err
    assert list(tmp_path.iterdir()) == []


def test_train_overrides_may_follow_its_options(capsys):
    from midus_surgery.cli import cmd_train, parse_arguments

    args = parse_arguments(["train", "run.yaml", "a.b=1", "--quiet", "optim.lr=1e-4", "freeze=base"])
    assert args.func is cmd_train and args.quiet and args.config == "run.yaml"
    assert args.overrides == ["a.b=1", "optim.lr=1e-4", "freeze=base"]  # in the order given: a later one wins
    for argv in (["train", "run.yaml", "--quiet", "--bogus"], ["train", "run.yaml", "--quiet", "stray"], ["plan", "r.yaml", "--json", "a=b"]):
        with pytest.raises(SystemExit) as exit_:
            parse_arguments(argv)
        assert exit_.value.code == 2 and "unrecognized arguments" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # said with the command's usage, not the top-level one (trial77 F11)
        parse_arguments(["plan", "a.yaml", "b.yaml"])
    err = capsys.readouterr().err
    assert err.startswith("usage: midus-surgery plan [-h]") and "midus-surgery plan: error: unrecognized arguments: b.yaml" in err, err


def test_the_recipe_commands_help_says_what_they_read_and_their_exit_status(capsys):
    from midus_surgery.cli import parse_arguments

    for command in ("validate", "plan", "apply"):
        with pytest.raises(SystemExit):
            parse_arguments([command, "--help"])
        said = " ".join(capsys.readouterr().out.split())
        assert re.search(r"RECIPE (one )?recipe YAML file", said) and "exit status: 0 valid; 2: a problem in the recipe" in said, said


def test_eval_and_analyze_help_say_the_model_folder_is_required_and_comes_first(capsys):
    """Optional to argparse (so that --data swallowing it is said in words), MODEL_DIR read as optional in their usage
    lines ([MODEL_DIR], after every option)."""
    from midus_surgery.cli import parse_arguments

    for command, usage in (("eval", "usage: midus-surgery eval [-h] MODEL_DIR [MODEL_DIR ...] (--data PATH [PATH ...] | --tasks TASK [TASK ...])"),
                           ("analyze", "usage: midus-surgery analyze [-h] MODEL_DIR --data PATH [PATH ...] --out DIR [options]")):
        with pytest.raises(SystemExit):
            parse_arguments([command, "--help"])
        said = capsys.readouterr().out
        assert said.startswith(usage) and "[MODEL_DIR]" not in said, said
        assert "given before --data" in " ".join(said.split()), said


def test_train_without_a_config_is_a_usage_error(capsys):
    assert main(["train"]) == 2
    assert "train needs a config file" in capsys.readouterr().err


def test_train_help_says_how_to_launch_several_processes(capsys):
    """trial42: it said `accelerate launch [--num_processes N]`, which starts one process without --multi_gpu."""
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps the description
    assert "accelerate launch --multi_gpu --num_processes N -m midus_surgery.cli train run.yaml" in text
    assert "torchrun --nproc_per_node N -m midus_surgery.cli train run.yaml" in text
    assert "--dry-run" in text


def test_a_loss_difference_below_the_fourth_decimal_keeps_its_digits():
    """analyze's summary printed -1.12e-05 as "-0.0000", a sign on zero (trial79 F3)."""
    from midus_surgery.cli import _signed

    assert [_signed(x) for x in (-1.12e-5, 0.0, 0.01234, -0.5, 3e-7)] == ["-1.1e-05", "+0.0000", "+0.0123", "-0.5000", "+3.0e-07"]


def test_error_lines_show_control_characters_as_escapes_and_each_carries_the_rank(tmp_path, capsys, monkeypatch):
    """A path with ESC in an error line colored the terminal (trial80 N5); under a launch, a refusal of several problems
    carried the rank on its first line only, and the rest read as the first process's (N3)."""
    bad = tmp_path / "nope\x1b[31m.yaml"
    assert main(["validate", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "\x1b" not in err and "nope\\x1b[31m.yaml" in err, err
    recipe = tmp_path / "two.yaml"
    recipe.write_text("base: {path: x}\nlayout: {interleave: {after_every: 0}}\noutput: {dir: out}\nbogus: 1\n")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert main(["validate", str(recipe)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) >= 3 and all(line.startswith("[rank 1] ") for line in lines), lines


def test_the_tools_own_warnings_are_one_line(capsys):
    """The CPU kernels' fallback warning came as Python's 'hml.py:318: UserWarning: ...' and the source line under it;
    the tool's own warnings are one 'warning:' line, other libraries' as Python shows them."""
    from midus_surgery.cli import _show_warning

    _show_warning(UserWarning("midus-surgery: HML CPU kernels unavailable (x);\n  using the slower path"), UserWarning, "hml.py", 318)
    assert capsys.readouterr().err == "warning: HML CPU kernels unavailable (x); using the slower path\n"
    _show_warning(UserWarning("a library's own"), UserWarning, "lib.py", 7)
    assert "lib.py:7: UserWarning: a library's own" in capsys.readouterr().err


def test_a_model_folder_whose_name_is_not_utf8_is_said_so(tiny_base, tmp_path, capsys):
    """Linux allows any bytes in a name; the Rust readers take UTF-8 paths only, so eval blamed the tokenizer and verify the
    weights (trial99 M4). Each says the name, escaped, and what to do."""
    folder = Path(os.fsdecode(bytes(tmp_path) + b"/m\xff"))
    shutil.copytree(tiny_base, folder)
    (tmp_path / "c.txt").write_text("the cat sat .\n")
    said = "m\\udcff: its path is not UTF-8 text, which the tokenizers and safetensors libraries cannot open: rename the folder"
    for argv in (["verify", str(folder)], ["verify", str(tiny_base), "--base", str(folder)],
                 ["eval", str(folder), "--data", str(tmp_path / "c.txt")],
                 ["analyze", str(folder), "--data", str(tmp_path / "c.txt"), "--out", str(tmp_path / "an")]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("error: ") and err.endswith(said), (argv, err)
    assert not (tmp_path / "an").exists()
    # a relative path is read as given, whatever the current folder is called (trial102 R06)
    os.chdir(folder)
    try:
        (tmp_path / "long.txt").write_text("the cat sat on the mat .\n" * 20)
        assert main(["eval", ".", "--data", str(tmp_path / "long.txt"), "--block-size", "8", "--quiet"]) == 0, capsys.readouterr()
        # a token cache is read by Python alone: any name does (trial103)
        assert main(["eval", str(tiny_base), "--data", str(tmp_path / "long.txt"), "--block-size", "8", "--quiet",
                     "--cache-dir", os.fsdecode(bytes(tmp_path) + b"/.cache\xff")]) == 0, capsys.readouterr()
    finally:
        os.chdir(tmp_path)
    capsys.readouterr()
    # apply's base and its --out too: the tokenizer was said not to load, and a folder no reader could open was written
    os.environ["MIDUS_TEST_BASE"] = str(folder)  # a recipe's text is UTF-8; a $NAME it expands need not be
    (tmp_path / "r.yaml").write_text("base:\n  path: $MIDUS_TEST_BASE\nlayout: {interleave: {after: [1], kind: copy}}\noutput:\n  dir: out\n")
    try:
        assert main(["validate", str(tmp_path / "r.yaml")]) == 2
    finally:
        del os.environ["MIDUS_TEST_BASE"]
    err = capsys.readouterr().err
    assert "base.path: " in err and err.rstrip().endswith(said), err
    (tmp_path / "r.yaml").write_text(f"base:\n  path: {tiny_base}\nlayout: {{interleave: {{after: [1], kind: copy}}}}\noutput:\n  dir: out\n")
    with pytest.raises(SystemExit):
        main(["apply", str(tmp_path / "r.yaml"), "--out", os.fsdecode(bytes(tmp_path) + b"/o\xff")])
    # escaped once, as every error line writes it (it was 'o\\udcff': escaped, then quoted: trial104)
    assert (f"argument --out: {tmp_path}/o\\udcff: its path is not UTF-8 text, so the tokenizers and safetensors libraries could "
            "not read the model written there: choose a folder whose path is") in capsys.readouterr().err
    assert not any(p.name.startswith("o") for p in tmp_path.iterdir())


def test_a_model_folder_apply_would_write_where_no_model_reader_takes_it_is_refused(tiny_base, tmp_path, capsys, monkeypatch):
    """trial104: the UTF-8 check moved to apply --out alone, so output.dir: $BAD/o (BAD a folder whose name is not UTF-8)
    validated and apply wrote a model eval and verify then refused; so did a relative output.dir under a recipe folder so
    named, and under one whose name holds a newline and ESC (the "wrote" line split, with the raw escape). validate and
    apply refuse the resolved path in one line, and nothing is written."""
    bad = Path(os.fsdecode(bytes(tmp_path) + b"/bad\xff"))
    forged = tmp_path / "e\nOK forged\x1b[31m"
    for folder in (bad, forged):
        folder.mkdir()
    monkeypatch.setenv("MIDUS_TEST_BAD", str(bad))
    layout = "layout: {interleave: {after: [1], kind: copy}}\n"
    cases = [(tmp_path / "env.yaml", "$MIDUS_TEST_BAD/o", "bad\\udcff/o: its path is not UTF-8 text"),
             (bad / "rel.yaml", "out", "bad\\udcff/out: its path is not UTF-8 text"),
             (forged / "rel.yaml", "out", "e\\nOK forged\\x1b[31m/out: its path holds a control character")]
    for recipe, out, said in cases:
        recipe.write_text(f"base:\n  path: {tiny_base}\n{layout}output:\n  dir: {out}\n")
        for argv in (["validate", str(recipe)], ["apply", str(recipe), "--quiet"]):
            assert main(argv) == 2, argv
            captured = capsys.readouterr()
            err = (captured.out + captured.err).strip()
            assert said in err and "\x1b" not in err and "forged\n" not in err, (argv, err)
    assert [p.name for p in bad.iterdir()] == ["rel.yaml"] and [p.name for p in forged.iterdir()] == ["rel.yaml"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("o")]
    # a name the tool writes that is printable only escaped (a line separator) is written, and said escaped (finding 7)
    odd = tmp_path / "l\u2028s"
    odd.mkdir()
    (odd / "r.yaml").write_text(f"base:\n  path: {tiny_base}\n{layout}output:\n  dir: out\n")
    assert main(["apply", str(odd / "r.yaml"), "--quiet"]) == 0
    wrote = [line for line in capsys.readouterr().out.splitlines() if line.startswith("wrote ")]
    assert wrote and wrote[0].startswith(f"wrote {tmp_path}/l\\u2028s/out: "), wrote


def test_a_newline_in_a_model_or_file_name_is_shown_escaped_in_its_one_line_error(tiny_base, tmp_path, capsys, monkeypatch):
    """`verify $'mine\\nverify: all 9 checks passed'` printed "error: mine" and a second line the folder's name chose
    (trial99 M3). Every command's not-a-directory / not-found line shows such a path escaped, in one line."""
    monkeypatch.chdir(tmp_path)
    forged = "verify: all 9 checks passed"
    (tmp_path / f"mine\n{forged}").mkdir()
    (tmp_path / "c.txt").write_text("the cat sat .\n")
    (tmp_path / "t.yaml").write_text('init_from: "mine\\nverify: ok"\nrun_dir: run\ntokens: 64\ndata: {train: [c.txt], block_size: 16}\n')
    (tmp_path / "r.yaml").write_text('base:\n  path: "b\\nx"\nlayout:\n  interleave:\n    after_every: 2\n    kind: memory\n'
                                     "output:\n  dir: out\n")
    for argv, said in ((["verify", f"mine\n{forged}"], f"mine\\n{forged} is not a model directory (no config.json)"),
                       (["eval", f"mine\n{forged}", "--data", "c.txt"], f"mine\\n{forged} is not a model directory"),
                       (["eval", "gone\nx", "--data", "c.txt"], "gone\\nx is not a directory"),
                       (["analyze", f"mine\n{forged}", "--data", "c.txt", "--out", "an"], f"mine\\n{forged} is not a model directory"),
                       (["train", "t.yaml", "--dry-run"], f"t.yaml:1:1: init_from: {tmp_path}/mine\\nverify: ok is not a directory"),
                       (["validate", "r.yaml"], f"base.path: base model not found: {tmp_path}/b\\nx/config.json"),
                       (["apply", "r.yaml"], f"base model not found: {tmp_path}/b\\nx/config.json"),
                       (["validate", "n\nx.yaml"], "n\\nx.yaml: file not found"),
                       # escaped wherever a message names it (trial102 R11)
                       (["eval", str(tiny_base), "--data", f"gone\n{forged}"], f"gone\\n{forged}"),
                       (["verify", str(tiny_base), "--base", f"gone\n{forged}"], f"--base gone\\n{forged}")):
        assert main(argv) != 0, argv
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        assert said in err and not any(line.startswith(("verify: ", "x", "x.yaml")) for line in lines), (argv, err)
        assert len([line for line in lines if not line.startswith(("INVALID", "  "))]) <= 1 and len(lines) <= 2, (argv, err)


@pytest.mark.parametrize("command", ["eval", "train --dry-run", "train", "verify", "analyze"])
def test_a_model_folder_of_absurd_depth_is_refused_before_it_is_built(tiny_base, tmp_path, capsys, monkeypatch, command):
    """eval, train, verify and analyze built a model of whatever depth config.json stated before any check: 10^5
    layers took 347 s and 5 GB, where validate refuses the number at once (trial99 C3)."""
    from train_fixtures.tiny import write_config, write_corpus
    from transformers.models.llama.modeling_llama import LlamaModel

    built = []
    real = LlamaModel.__init__

    def build(self, config, *args, **kwargs):  # every build, meta or not, the check must come before; refused, not waited for
        built.append(config.num_hidden_layers)
        if config.num_hidden_layers > 2048:
            raise RuntimeError(f"built a model of {config.num_hidden_layers} layers")
        real(self, config, *args, **kwargs)

    monkeypatch.setattr(LlamaModel, "__init__", build)
    model = tmp_path / "model"
    shutil.copytree(tiny_base, model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 10**5}))
    corpus = tmp_path / "corpus"
    write_corpus(corpus, files=1)
    argv = {"eval": ["eval", str(model), "--data", str(corpus), "--quiet"],
            "train --dry-run": ["train", str(write_config(tmp_path / "t.yaml", model, tmp_path / "run", corpus, tmp_path / "cache")), "--dry-run"],
            "train": ["train", str(write_config(tmp_path / "t.yaml", model, tmp_path / "run", corpus, tmp_path / "cache")), "--quiet"],
            "verify": ["verify", str(model)],
            "analyze": ["analyze", str(model), "--data", str(corpus), "--out", str(tmp_path / "analysis"), "--quiet"]}[command]
    assert main(argv) != 0
    captured = capsys.readouterr()
    said = (captured.out + captured.err).strip().splitlines()
    assert any(f"{model}/config.json: num_hidden_layers is 100000; it must be between 1 and 2048" in line for line in said), said
    assert "Traceback" not in captured.err and not any(depth > 2048 for depth in built), built
    assert not (tmp_path / "run").exists() and not (tmp_path / "analysis").exists()


def test_a_dense_config_with_zero_experts_is_no_size_problem():
    """Granite 4.0's dense models ship num_local_experts: 0 and num_experts_per_tok: 0; eval scored them until the size
    checks reached every command (trial102 R05)."""
    from midus_surgery.compiler.base import config_size_problems

    dense = {"num_hidden_layers": 4, "hidden_size": 64, "vocab_size": 128, "num_local_experts": 0, "num_experts_per_tok": 0}
    assert config_size_problems(dense) == []
    assert config_size_problems({**dense, "num_local_experts": -1}) == ["num_local_experts is -1; it must be between 0 and 65536"]
    assert config_size_problems({**dense, "hidden_size": 0}) == ["hidden_size is 0; it must be between 1 and 1048576"]
    # experts beside none per token: every MoE block outputs zero (trial103)
    assert config_size_problems({**dense, "num_local_experts": 4}) == [
        "num_experts_per_tok is 0 with num_local_experts 4: each token would use no expert; set it to between 1 and 4"]


@pytest.mark.parametrize("model_type,key,count,per_token", [
    ("qwen2_moe", "num_experts", 0, 4), ("qwen3_moe", "num_experts", 0, 8), ("granitemoehybrid", "num_local_experts", 0, 2),
    ("qwen3_next", "num_experts", 0, 10), ("deepseek_v3", "n_routed_experts", 0, 8), ("jamba", "num_experts", 1, 2)])
def test_a_dense_count_of_experts_with_the_class_default_per_token_is_no_size_problem(model_type, key, count, per_token):
    """trial104: save_pretrained writes the class's default experts per token when only the expert count is set to 0, and
    these classes then build a plain MLP and run; every command refused them. trial111: the same for Qwen3-Next and an
    all-dense DeepSeek-V3 at 0 experts, and Jamba at 1 expert (a plain MLP beside the saved default 2 per token)."""
    from midus_surgery.compiler.base import config_size_problems

    dense = {"model_type": model_type, "num_hidden_layers": 4, "hidden_size": 64, "vocab_size": 128, key: count,
             "num_experts_per_tok": per_token}
    assert config_size_problems(dense) == []


SMALL = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
             head_dim=16, moe_intermediate_size=32, shared_expert_intermediate_size=32)


@pytest.mark.parametrize("model_type,key,per_token,n,refused", [
    ("mixtral", "num_local_experts", "num_experts_per_tok", 2, True), ("olmoe", "num_experts", "num_experts_per_tok", 2, True),
    ("ernie4_5_moe", "moe_num_experts", "moe_k", 2, True), ("qwen2_moe", "num_experts", "num_experts_per_tok", 4, False),
    ("qwen3_moe", "num_experts", "num_experts_per_tok", 8, False), ("qwen3_next", "num_experts", "num_experts_per_tok", 10, False),
    ("deepseek_v3", "n_routed_experts", "num_experts_per_tok", 8, False),
    ("granitemoehybrid", "num_local_experts", "num_experts_per_tok", 2, False)])
def test_experts_per_token_beside_no_experts_is_refused_where_the_model_routes_over_none(tmp_path, capsys, model_type, key,
                                                                                         per_token, n, refused):
    """Mixtral with num_local_experts 0 and num_experts_per_tok 2 was accepted (validate crashed dividing by its 0 experts,
    and a model of it fails its first forward pass: "selected index k out of range"). Refused up front where the class
    builds its MoE blocks over no experts; the classes that build a plain MLP at 0 experts and run (trial104, trial111)
    stay accepted."""
    from transformers import AutoConfig

    fields = AutoConfig.for_model(model_type).to_dict()
    base = tmp_path / model_type  # the config alone: validate reads no weights
    AutoConfig.for_model(model_type, **{k: v for k, v in SMALL.items() if k in fields}, **{key: 0, per_token: n}).save_pretrained(base)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"base:\n  path: {base}\nlayout: {{interleave: {{after: [1], kind: copy}}}}\noutput: {{dir: {tmp_path / 'out'}}}\n")
    capsys.readouterr()
    code = main(["validate", str(recipe)])
    said = capsys.readouterr()
    if refused:
        assert code == 2 and "OK" not in said.out, said
        assert (f"base.path: {per_token} is {n} with {key} 0: {model_type} then builds its MoE blocks over no experts ('model.layers."
                in said.err and f"has shape (0, 64)), and its forward pass fails; set {key} to the number of experts" in said.err), said.err
    else:
        assert code == 0 and said.out.startswith("OK"), said


@pytest.mark.parametrize("per_token,experts", [("moe_k", "moe_num_experts"), ("moe_topk", "moe_num_experts"),
                                               ("num_experts_per_token", "num_experts")])
def test_experts_per_token_is_read_under_every_name_configs_give_it(per_token, experts):
    """trial113: Ernie 4.5's moe_k 0 beside 8 experts passed validate and apply, and every routed MoE block output zero
    (Aria and Hunyuan name it moe_topk, Kimi-Linear num_experts_per_token)."""
    from midus_surgery.compiler.base import config_size_problems

    config = {"num_hidden_layers": 4, "hidden_size": 64, "vocab_size": 128, experts: 8, per_token: 0}
    assert config_size_problems(config) == [f"{per_token} is 0 with {experts} 8: each token would use no expert; set it to between 1 and 8"]
    assert config_size_problems({**config, per_token: 2}) == []


def test_experts_per_token_is_checked_against_every_expert_count():
    """trial104: only the first expert-count key was read, so DeepSeek-V3's n_routed_experts 4 with num_experts_per_tok 0 passed
    beside a decoy num_experts: 0 (DeepSeek-V3 reads no such key); and more experts per token than experts validated, and
    eval ended in "unexpected error (RuntimeError: selected index k out of range)"."""
    from midus_surgery.compiler.base import config_size_problems

    dsv3 = {"model_type": "deepseek_v3", "num_hidden_layers": 4, "hidden_size": 64, "vocab_size": 128, "n_routed_experts": 4,
            "num_experts_per_tok": 0}
    for config in (dsv3, {**dsv3, "num_experts": 0}):
        assert config_size_problems(config) == [
            "num_experts_per_tok is 0 with n_routed_experts 4: each token would use no expert; set it to between 1 and 4"]
    assert config_size_problems({**dsv3, "num_experts": 0, "num_experts_per_tok": 2}) == []
    mixtral = {"model_type": "mixtral", "num_hidden_layers": 4, "hidden_size": 64, "vocab_size": 128, "num_local_experts": 4,
               "num_experts_per_tok": 8}
    assert config_size_problems(mixtral) == [
        "num_experts_per_tok is 8, more than num_local_experts 4: a token cannot use more experts than there are; "
        "set it to between 1 and 4"]
    assert config_size_problems({**mixtral, "num_experts_per_tok": 4}) == []


@pytest.mark.parametrize("key,value,said", [
    ("moe_k", -1, "moe_k is -1; it must be between 0 and 65536"), ("moe_k", False, "moe_k must be a whole number, got False"),
    ("moe_k", 2.5, "moe_k must be a whole number, got 2.5"), ("moe_k", "0", "moe_k must be a whole number, got '0'"),
    ("moe_k", [0, 0], "moe_k must be a whole number, got [0, 0]"), ("moe_topk", False, "moe_topk must be a whole number, got False"),
    ("moe_topk", [2, -1], "moe_topk is -1; it must be between 0 and 65536"),
    ("num_experts_per_token", -3, "num_experts_per_token is -3; it must be between 0 and 65536"),
    ("moe_num_experts", -8, "moe_num_experts is -8; it must be between 0 and 65536"),
    ("moe_num_experts", 10**9, "moe_num_experts is 1000000000; it must be between 0 and 65536")])
def test_experts_per_token_and_expert_counts_get_the_size_check_under_every_name(key, value, said):
    """trial114 F3: moe_k, moe_topk, num_experts_per_token and moe_num_experts were judged as ints only, so moe_k -1 passed
    validate and apply wrote an output whose forward pass fails ("selected index k out of range"), while
    num_experts_per_tok -1 was refused. HunYuan's per-layer moe_topk list stays accepted, each entry checked."""
    from midus_surgery.compiler.base import config_size_problems

    ernie = {"num_hidden_layers": 4, "hidden_size": 64, "vocab_size": 128, "moe_num_experts": 8, "moe_k": 2}
    assert config_size_problems({**ernie, key: value}) == [said]
    assert config_size_problems({**ernie, "moe_topk": [1, 2, 2, 1]}) == []


@pytest.mark.parametrize("value,said", [
    ([9, 9], "an entry of moe_topk is 9, more than moe_num_experts 8"), ([2, 9], "an entry of moe_topk is 9, more than"),
    ([0, 0], "an entry of moe_topk is 0 with moe_num_experts 8: each token would use no expert")])
def test_a_per_layer_moe_topk_list_is_judged_against_the_expert_count_entry_by_entry(value, said):
    """HunYuan's per-layer moe_topk was size-checked only: [9]*L beside 8 experts validated and applied into an output whose
    forward fails, and [0]*L passed where a plain 0 is refused. Each entry is judged as the plain number is."""
    from midus_surgery.compiler.base import config_size_problems

    config = {"num_hidden_layers": 2, "hidden_size": 64, "vocab_size": 128, "moe_num_experts": 8, "moe_topk": value}
    problems = config_size_problems(config)
    assert len(problems) == 1 and said in problems[0], problems



def test_a_per_layer_num_experts_list_is_refused_in_one_line_saying_transformers_takes_none(tmp_path):
    """trial121 F4: HunYuan-V1-MoE's gate reads num_experts[layer_idx] for a list, so [8]*L looked as legitimate as
    moe_topk's list, but was refused as "must be a whole number". transformers 5 builds no such model (its config class
    takes an int only, its experts one count): still refused, by validate and apply alike, now saying why."""
    import torch
    from transformers import AutoModelForCausalLM, HunYuanMoEV1Config

    layers = 4
    sizes = dict(num_hidden_layers=layers, hidden_size=64, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                 head_dim=16, vocab_size=128, moe_topk=2)
    with pytest.raises(Exception, match="num_experts"):  # when transformers takes the list, accept it here too
        AutoModelForCausalLM.from_config(HunYuanMoEV1Config(**sizes, num_experts=[8] * layers))
    config = HunYuanMoEV1Config(**sizes, num_experts=8)
    torch.manual_seed(0)
    base = tmp_path / "hb"
    AutoModelForCausalLM.from_config(config).save_pretrained(base)
    data = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**data, "num_experts": [8] * layers, "moe_topk": [2] * layers}))
    (tmp_path / "r.yaml").write_text(f"base:\n  path: {base}\nlayout: {{interleave: {{after: [1], kind: copy}}}}\n"
                                     f"output: {{dir: {tmp_path / 'out'}, dtype: float32}}\n")
    said = (f"{base / 'config.json'}: num_experts must be one whole number for every layer, got [8, 8, 8, 8]: transformers' "
            "config classes take no per-layer list of it")
    for command in (["validate"], ["apply", "--quiet"]):
        done = run(command[0], str(tmp_path / "r.yaml"), *command[1:])
        assert done.returncode == 2 and said in done.stderr and "Traceback" not in done.stderr, (command, done.stderr)
    assert not (tmp_path / "out").exists()

def test_a_negative_moe_k_is_refused_by_validate_and_apply_naming_the_key(tmp_path, capsys):
    """trial114 F3: an Ernie 4.5 MoE base with moe_k -1 validated OK and a copy recipe applied with exit 0."""
    from transformers import AutoConfig, AutoModelForCausalLM

    base = tmp_path / "ernie"
    fields = AutoConfig.for_model("ernie4_5_moe").to_dict()
    config = AutoConfig.for_model("ernie4_5_moe", **{k: v for k, v in SMALL.items() if k in fields}, moe_num_experts=4, moe_k=2)
    AutoModelForCausalLM.from_config(config).save_pretrained(base)  # weights: apply reads them
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "moe_k": -1}))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"base:\n  path: {base}\nlayout: {{interleave: {{after: [1], kind: copy}}}}\noutput: {{dir: {tmp_path / 'out'}}}\n")
    for command in (["validate", str(recipe)], ["apply", str(recipe), "--quiet"]):
        capsys.readouterr()
        code = main(command)
        said = capsys.readouterr()
        assert code == 2 and "OK" not in said.out, said
        assert "moe_k is -1; it must be between 0 and 65536" in said.err, said.err
    assert not (tmp_path / "out").exists()


def test_a_refused_config_gets_its_one_line_without_transformers_deprecation_notice(tmp_path):
    """A base config with a rope_scaling transformers deprecates: its FutureWarning (a path into site-packages and a
    source line) came before the one located line the refusal is (found by tools/fuzz_recipes.py)."""
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 64, "n_layer": 4, "n_head": 4, "vocab_size": 128,
                                                      "n_positions": 128, "rope_scaling": {"rope_type": "dynamic"}}))
    (tmp_path / "r.yaml").write_text("base:\n  path: no-such-model\n  config: config.json\nlayout:\n  interleave: {after_every: 2, kind: transformer}\n"
                                     "output:\n  dir: out\n")
    # a process of its own: pytest captures warnings before they reach stderr
    done = subprocess.run([sys.executable, "-m", "midus_surgery.cli", "validate", str(tmp_path / "r.yaml")], capture_output=True, text=True)
    assert done.returncode == 2, done.stderr
    err = done.stderr + done.stdout
    assert "FutureWarning" not in err and "site-packages" not in err, err
    assert err.splitlines()[0].startswith("INVALID ") and "base.config: transformers cannot build a config from it" in err, err


def test_ctrl_c_while_the_arguments_are_read_is_one_line(monkeypatch, capsys):
    """A Ctrl-C in the first moments (the command's modules importing) was a KeyboardInterrupt traceback, not the one
    'interrupted' line and exit 130 of an interrupt during the work (trial143 F4)."""
    from midus_surgery import cli

    def interrupted(argv=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "parse_arguments", interrupted)
    with pytest.raises(SystemExit) as exit_:
        cli.run()
    assert exit_.value.code == 130 and capsys.readouterr().err.strip() == "interrupted"


def test_every_flag_of_every_command_is_documented():
    """docs/commands.md said that `--help` lists the same flags, and its synopses left out train --keys, eval --json and
    most of analyze's (trial150 L3): every long flag of every command is in commands.md, or in evaluate.md, where
    commands.md sends eval's and analyze's readers."""
    import argparse

    from midus_surgery.cli import build_parser

    root = Path(__file__).resolve().parents[1] / "docs"
    docs = (root / "commands.md").read_text() + (root / "evaluate.md").read_text()
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    missing = [f"{name} {flag}" for name, parser in commands.items() for action in parser._actions
               for flag in action.option_strings if flag.startswith("--") and flag != "--help" and flag not in docs]
    assert len(commands) >= 8 and missing == []


@pytest.mark.parametrize("argv", [["eval", "m", "--data", "d", "--cache-dir"], ["analyze", "m", "--data", "d", "--out", "o", "--cache-dir"],
                                  ["apply", "r.yaml", "--out"]])
def test_a_folder_to_make_named_with_blanks_at_an_end_is_a_usage_error(argv, tmp_path, monkeypatch, capsys):
    """--cache-dir "c " made a token cache folder named with a trailing blank, which no output check sees (trial153 M3);
    an existing folder so named is the user's, and taken."""
    from midus_surgery.cli import parse_arguments

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        parse_arguments([*argv, "c "])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "'c ' would make a folder named 'c ', with blanks at its start or end" in err, err
    (tmp_path / "c ").mkdir()
    assert parse_arguments([*argv, "c "]) is not None
    (tmp_path / "t\tx").mkdir()  # a control character: refused in --out, and in a cache folder only where it is to be made
    if argv[-1] == "--cache-dir":
        assert parse_arguments([*argv, "t\tx/c"]) is not None
        assert parse_arguments([*argv, "new\ty/../c"]) is not None  # made where it resolves, as train's (trial158 F3)
        with pytest.raises(SystemExit):
            parse_arguments([*argv, "c/t\tx"])
    else:
        with pytest.raises(SystemExit):
            parse_arguments([*argv, "t\tx/c"])
    assert "holds the control character '\\t'" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a pasted no-break space is a blank too (trial154 L5)
        parse_arguments([*argv, nbsp := "c\xa0"])
    assert f"would make a folder named {nbsp!r}, with blanks" in capsys.readouterr().err
    gone = tmp_path / "gone"
    gone.mkdir()
    monkeypatch.chdir(gone)
    gone.rmdir()  # a relative path from a deleted folder: one line, not pathlib's traceback (trial154 L6, trial156 3)
    gone_line = "the current folder no longer exists (deleted while the shell was in it): cd into one that does, and run the command again"
    with pytest.raises(SystemExit) as exit_:
        parse_arguments([*argv, "c"])
    assert exit_.value.code == 2 and f": {gone_line}" in capsys.readouterr().err
    # every command, relative paths or not: torch and transformers do not import without it (trial156 3, trial158 F1)
    for args in (["validate", "r.yaml"], ["eval", "rel-model", "--data", "d"], ["verify", str(tmp_path)]):
        with pytest.raises(SystemExit) as exit_:
            parse_arguments(args)
        assert exit_.value.code == 2 and capsys.readouterr().err == f"error: {gone_line}\n"
    assert parse_arguments(["schema"]) is not None and parse_arguments(["train", "--keys"]) is not None  # what needs none
    with pytest.raises(SystemExit) as exit_:
        parse_arguments(["--help"])
    assert exit_.value.code == 0 and "validate" in capsys.readouterr().out


def test_validate_reports_the_schemas_problems_first_and_the_bases_once_they_are_fixed(tiny_base, tmp_path, capsys):
    """docs/commands.md: every problem of a phase at once, the schema's first, the base's once the recipe passes the
    schema (trial150 L1: "every problem at once" promised more)."""
    body = "layout: {interleave: {after: [40], kind: memory}}\nmemory: {n_subkeys: 1, topk: 2, latent_dim: 8}\noutput: {dir: out}\n"
    code, text = validate_lines(tmp_path, capsys, tiny_base, body)
    assert code == 2 and "memory.n_subkeys: should be at least 2, got 1" in text and "out of range" not in text, text
    code, text = validate_lines(tmp_path, capsys, tiny_base, body.replace("n_subkeys: 1", "n_subkeys: 4"))
    assert code == 2 and "layout.interleave.after.0: layer 40 is out of range" in text and "n_subkeys" not in text, text
