"""The recipe language: acceptance, and every rejection path with its file:line:col."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from midus_surgery.errors import RecipeError
from midus_surgery.recipe.schema import Recipe, load_recipe, parse_size

ROOT = Path(__file__).resolve().parent.parent

GOOD = """\
base:
  path: base-model
layout:
  interleave:
    after_every: 2
    kind: memory
memory:
  n_subkeys: 64
  topk: 8
output:
  dir: out
"""


def write(tmp_path: Path, text: str, name: str = "r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def problems(tmp_path: Path, text: str) -> list:
    with pytest.raises(RecipeError) as info:
        load_recipe(write(tmp_path, text))
    return info.value.problems


def test_good_recipe_loads_with_defaults(tmp_path):
    loaded = load_recipe(write(tmp_path, GOOD))
    r = loaded.recipe
    assert r.layout.interleave.after_every == 2 and r.layout.interleave.kind == "memory"
    assert r.memory.n_subkeys == 64 and r.memory.topk == 8
    assert r.memory.latent_dim == 256 and r.memory.hive is True and r.memory.query_norm == "rms"
    assert r.output.shard_bytes == 2_000_000_000 and r.output.dtype == "auto"
    assert loaded.resolve(r.base.path) == tmp_path / "base-model"


def test_paths_expand_environment_variables_and_an_unset_one_is_an_error(tmp_path, monkeypatch):
    """`$SCRATCH/models` in a recipe: an output written to a folder literally named `$SCRATCH` under
    the recipe's folder was no user's intent (trial49)."""
    monkeypatch.setenv("MIDUS_TEST_ROOT", str(tmp_path / "scratch"))
    monkeypatch.delenv("MIDUS_TEST_UNSET", raising=False)
    loaded = load_recipe(write(tmp_path, GOOD.replace("path: base-model", "path: ${MIDUS_TEST_ROOT}/base")
                                           .replace("dir: out", "dir: $MIDUS_TEST_ROOT/out-$$1")))
    assert loaded.resolve(loaded.recipe.base.path) == tmp_path / "scratch" / "base"
    assert loaded.resolve(loaded.recipe.output.dir) == tmp_path / "scratch" / "out-$1"
    (p,) = problems(tmp_path, GOOD.replace("dir: out", "dir: $MIDUS_TEST_UNSET/out"))
    assert (p.field, p.message) == ("output.dir", "'$MIDUS_TEST_UNSET/out' names $MIDUS_TEST_UNSET, which is not set in the "
                                                  "environment (write $$ for a $ itself, ${MIDUS_TEST_UNSET:-DEFAULT} for a default)")
    assert p.where.endswith("r.yaml:11:3")
    (p,) = problems(tmp_path, GOOD.replace("dir: out", "dir: '${out'"))
    assert p.message == "'${out' opens ${ without closing it (write $$ for a $ itself)"
    # set to nothing: the empty text, which is the recipe's own folder (an empty data path read every file under it)
    monkeypatch.setenv("MIDUS_TEST_EMPTY", "")
    for old, new, field in (("path: base-model", "path: $MIDUS_TEST_EMPTY", "base.path"), ("dir: out", "dir: ${MIDUS_TEST_EMPTY}", "output.dir")):
        (p,) = problems(tmp_path, GOOD.replace(old, new))
        assert (p.field, p.message) == (field, f"should be a path, got an empty text ({new.split(': ')[1]!r} expands to nothing)")
    # set to nothing inside a longer path: $OUT/model with OUT="" was /model, written at the filesystem's top (trial144 F1)
    for old, new, field in (("dir: out", "dir: ${MIDUS_TEST_EMPTY}/tmp/out", "output.dir"),
                            ("path: base-model", "path: base-$MIDUS_TEST_EMPTY", "base.path")):
        (p,) = problems(tmp_path, GOOD.replace(old, new))
        name, text = "$MIDUS_TEST_EMPTY", new.split(": ")[1]
        assert (p.field, p.message) == (field, f"{text!r} names {name}, which is set to nothing: the path would be "
                                               f"{text.replace('${MIDUS_TEST_EMPTY}', '').replace(name, '')!r} (set it, leave it out of the path, or write "
                                               "${MIDUS_TEST_EMPTY:-} where nothing is meant)")
    # nothing but blanks, written or brought by a variable: a folder named one space was made (trial144 F5)
    monkeypatch.setenv("MIDUS_TEST_BLANK", " ")
    for new in ('dir: "  "', "dir: $MIDUS_TEST_BLANK"):
        (p,) = problems(tmp_path, GOOD.replace("dir: out", new))
        assert p.field == "output.dir" and p.message.startswith("should be a path, got only blanks"), p.message


def test_a_shells_defaults_say_what_to_use_for_an_unset_or_empty_variable(tmp_path, monkeypatch):
    """`out${SUFFIX}` with SUFFIX="" was refused with no way to say that nothing is fine there (trial145 F8): `${NAME:-WORD}`
    and `${NAME-WORD}` mean what they mean in a shell, WORD's own $NAME expanded by the same rules."""
    monkeypatch.setenv("MIDUS_TEST_ROOT", str(tmp_path / "scratch"))
    monkeypatch.setenv("MIDUS_TEST_EMPTY", "")
    monkeypatch.delenv("MIDUS_TEST_UNSET", raising=False)

    def output_dir(written: str) -> Path:
        loaded = load_recipe(write(tmp_path, GOOD.replace("dir: out", f"dir: '{written}'")))
        return loaded.resolve(loaded.recipe.output.dir)

    assert output_dir("out${MIDUS_TEST_EMPTY:-}") == tmp_path / "out"  # set to nothing, and nothing is what was meant
    assert output_dir("out${MIDUS_TEST_UNSET:-}") == tmp_path / "out"
    assert output_dir("${MIDUS_TEST_UNSET:-$MIDUS_TEST_ROOT}/out") == tmp_path / "scratch" / "out"  # the default's $NAME
    assert output_dir("${MIDUS_TEST_EMPTY:-runs}/out") == tmp_path / "runs" / "out"
    assert output_dir("${MIDUS_TEST_ROOT:-runs}/out") == tmp_path / "scratch" / "out"  # set: its value, not the default
    assert output_dir("${MIDUS_TEST_UNSET-v1}") == tmp_path / "v1"  # unset: the default
    assert output_dir("${MIDUS_TEST_UNSET:-a-b:-c}") == tmp_path / "a-b:-c"  # everything after the first :- is the default
    # set to nothing with NAME-WORD (the default only for unset): refused as $NAME is, the way out said
    (p,) = problems(tmp_path, GOOD.replace("dir: out", "dir: 'x/${MIDUS_TEST_EMPTY-v1}'"))
    assert p.message == ("'x/${MIDUS_TEST_EMPTY-v1}' names $MIDUS_TEST_EMPTY, which is set to nothing: the path would be 'x/' "
                         "(set it, leave it out of the path, or write ${MIDUS_TEST_EMPTY:-} where nothing is meant)"), p.message
    # a default that is itself unset, a default of nothing for the whole path, a ${...} inside a default
    (p,) = problems(tmp_path, GOOD.replace("dir: out", "dir: '${MIDUS_TEST_UNSET:-$MIDUS_TEST_UNSET}/o'"))
    assert "names $MIDUS_TEST_UNSET, which is not set in the environment" in p.message, p.message
    (p,) = problems(tmp_path, GOOD.replace("dir: out", "dir: '${MIDUS_TEST_UNSET:-}'"))
    assert p.message.startswith("should be a path, got an empty text"), p.message
    (p,) = problems(tmp_path, GOOD.replace("dir: out", "dir: '${MIDUS_TEST_UNSET:-${MIDUS_TEST_ROOT}}'"))
    assert p.message.endswith("holds a ${...} (write $NAME there)"), p.message


def test_gguf_file_expands_as_a_path_and_its_problems_are_located_at_it(tmp_path, monkeypatch):
    """base.gguf_file was a plain text: `$GG` stayed as written, its 'not found' was said at base.path, and "" was taken
    as no GGUF at all (trial144 F6)."""
    monkeypatch.setenv("MIDUS_TEST_GGUF", "model.gguf")
    (tmp_path / "base-model").mkdir()
    text = GOOD.replace("path: base-model", "path: base-model\n  gguf_file: $MIDUS_TEST_GGUF")
    loaded = load_recipe(write(tmp_path, text))
    assert loaded.recipe.base.gguf_file == "model.gguf"
    from midus_surgery.compiler.base import load_base_config

    with pytest.raises(RecipeError) as info:
        load_base_config(loaded)
    (p,) = info.value.problems
    assert p.field == "base.gguf_file" and p.message.startswith("base model not found: ") and "model.gguf" in p.message, p
    (p,) = problems(tmp_path, GOOD.replace("path: base-model", 'path: base-model\n  gguf_file: ""'))
    assert p.field == "base.gguf_file", p


def test_a_folder_to_write_named_with_a_control_character_is_refused(tmp_path, monkeypatch):
    """A newline in output.dir (a YAML escape or block scalar slip) made a folder of that name, and apply's 'wrote'
    line split in two (trial66 L4). The training config's run_dir and export.dir are folders to write too."""
    (p,) = problems(tmp_path, GOOD.replace("dir: out", 'dir: "out\\nnext"'))
    assert (p.field, p.message) == ("output.dir", "'out\\nnext' holds the control character '\\n': a folder to write is not named with one")
    monkeypatch.setenv("MIDUS_TEST_TAB", "a\tb")
    (p,) = problems(tmp_path, GOOD.replace("dir: out", "dir: $MIDUS_TEST_TAB"))  # also where the environment brings it
    assert "holds the control character '\\t'" in p.message
    from midus_surgery.train.config import load_train_config

    for run_dir, export in (('"runs/a\\r"', "{}"), ("runs/a", '{dir: "final\\x7f"}')):
        config = write(tmp_path, f"init_from: model\nrun_dir: {run_dir}\ntokens: 1000\ndata: {{train: [a.txt]}}\nexport: {export}\n", "t.yaml")
        with pytest.raises(RecipeError) as info:
            load_train_config(config)
        assert "holds the control character" in str(info.value), str(info.value)


def test_bare_layer_numbers_in_layout_layers_are_one_problem_with_the_form_an_entry_has(tmp_path):
    """`layers: [0, 1, 1, 2]` was one 'should be a mapping' line per entry, with no word of {source: N} (trial71 L1)."""
    text = GOOD.replace("  interleave:\n    after_every: 2\n    kind: memory\n", "  layers: [0, 1, 1, 2]\n")
    (p,) = problems(tmp_path, text)
    assert (p.field, p.message) == ("layout.layers", "its entries are mappings, not bare layer numbers (got 0, 1, 1, 2): write each as "
                                                     "{source: N}, or {source: N, kind: identity} for an inserted block, e.g. - {source: 0}")
    assert p.where.endswith("r.yaml:4:12")  # at the first bare number


def test_a_bare_tilde_is_yamls_null_and_the_error_says_so(tmp_path):
    (p,) = problems(tmp_path, GOOD.replace("dir: out", "dir: ~"))
    assert p.field == "output.dir"
    assert p.message == ("should be text, got nothing (null: YAML reads ~, null and an empty value so; quote a path that starts "
                         "with ~, e.g. '~/models')")


MERGEKIT = """\
slices:
  - sources:
      - model: /models/mistral-7b
        layer_range: [0, 24]
  - sources:
      - model: /models/mistral-7b
        layer_range: [8, 32]
merge_method: passthrough
dtype: bfloat16
"""


def test_a_mergekit_config_is_named_and_a_passthrough_of_one_model_translated(tmp_path):
    """trial52 pasted mergekit's SOLAR config: six lines of missing and unknown keys that named neither."""
    (p,) = problems(tmp_path, MERGEKIT)
    assert p.message == ("this is a mergekit config (merge_method:, slices: of sources:), not a recipe; the recipe that says the same: "
                         "base: {path: /models/mistral-7b}, layout: {slices: [{layers: [0, 24]}, {layers: [8, 32]}]}, "
                         "output: {dir: OUT, dtype: bfloat16} (each on its own line; mergekit's layer_range is a recipe's layers, the "
                         "same half-open range)")
    (p,) = problems(tmp_path, MERGEKIT.replace("passthrough", "slerp"))
    assert p.message.startswith("this is a mergekit config (merge_method:, slices: of sources:), not a recipe: a recipe up-scales one base")
    # mergekit's key inside a recipe's slice
    found = problems(tmp_path, GOOD.replace("  interleave:\n    after_every: 2\n    kind: memory\n", "  slices:\n    - layer_range: [0, 4]\n"))
    assert [p.message for p in found if p.field.endswith("layer_range")] == [
        "unknown key 'layer_range'; did you mean 'layers' (mergekit's layer_range: the same half-open [start, end))?"]
    # a whole mergekit slice inside a recipe's layout (trial82 F9)
    found = problems(tmp_path, GOOD.replace("  interleave:\n    after_every: 2\n    kind: memory\n",
                                            "  slices:\n    - sources:\n        - model: m\n          layer_range: [0, 4]\n"))
    assert [p.message for p in found if p.field.endswith("sources")] == [
        "unknown key 'sources'; did you mean 'layers' (a mergekit slice's sources: [{model, layer_range}]; here a slice is "
        "layers: [start, end) of the recipe's one base)?"]


def test_unknown_key_names_field_and_line(tmp_path):
    (p,) = problems(tmp_path, GOOD.replace("  topk: 8\n", "  topk: 8\n  top_k: 8\n"))
    assert p.field == "memory.top_k"
    assert p.message == "unknown key 'top_k'; did you mean 'topk'?"
    assert p.where.endswith("r.yaml:10:3")
    # a key no known one is close to: no guess, the keys that place has; inside a list item (slices) the item's keys are the candidates
    (p,) = problems(tmp_path, GOOD.replace("  topk: 8\n", "  topk: 8\n  colour: blue\n"))
    assert p.message.startswith("unknown key 'colour' (known: ") and "n_subkeys, topk, " in p.message
    (p,) = problems(tmp_path, GOOD.replace("  interleave:\n    after_every: 2\n    kind: memory\n", "  slices:\n    - layers: [0, 2]\n      memroy: [1]\n"))
    assert p.field == "layout.slices.0.memroy" and p.message == "unknown key 'memroy'; did you mean 'memory'?"


def test_wrong_type_names_field_and_line(tmp_path):
    (p,) = problems(tmp_path, GOOD.replace("after_every: 2", "after_every: two"))
    assert p.field == "layout.interleave.after_every"
    assert p.where.endswith("r.yaml:5:5")
    assert p.message == "should be a whole number, got the text 'two'"


@pytest.mark.parametrize(("text", "field", "message"), [
    ("after_every: 2", "after_every: '2'", "should be a whole number, got the text '2'"),  # no silent conversion from text
    ("after_every: 2", "after_every: true", "should be a whole number, got true"),          # nor from a boolean (true was 1)
    ("kind: memory", "kind: memory\n    extra: [1]", "unknown key 'extra' (known: after_every, after, kind)"),
    ("kind: memory", "kind: memroy", "should be one of 'copy', 'transformer', 'identity' or 'memory', got the text 'memroy'"),
    ("after_every: 2", "after_every: 0", "should be at least 1, got 0"),
    ("topk: 8", "topk: 8\n  norm_eps: true", "should be a number, got true"),  # a float field: true was 1.0 (trial138 F4)
])
def test_strict_types_in_yaml_words(tmp_path, text, field, message):
    (p,) = problems(tmp_path, GOOD.replace(text, field))
    assert p.message == message and "Input should" not in p.message


def test_a_section_that_is_not_a_mapping_is_said_so(tmp_path):
    (p,) = problems(tmp_path, GOOD.replace("output:\n  dir: out\n", "output: [out]\n"))
    assert (p.field, p.message) == ("output", "should be a mapping (key: value pairs), got a list")


def test_impossible_value(tmp_path):
    (p,) = problems(tmp_path, GOOD.replace("topk: 8", "topk: 100"))
    assert p.field == "memory.topk"  # at topk's line, not memory's (trial52)
    assert "topk (100) must be <= n_subkeys (64)" in p.message
    assert p.where.endswith("r.yaml:9:3")
    # said beside the other fields' problems, not after they are fixed (trial52), and for topk's default too
    found = problems(tmp_path, GOOD.replace("n_subkeys: 64", "n_subkeys: 4").replace("topk: 8", "topk: 5\n  latent_dim: 0"))
    assert [(p.field, p.message) for p in found] == [("memory.topk", "topk (5) must be <= n_subkeys (4)"),
                                                    ("memory.latent_dim", "should be at least 1, got 0")]
    (p,) = problems(tmp_path, GOOD.replace("n_subkeys: 64", "n_subkeys: 4").replace("  topk: 8\n", ""))
    assert (p.field, p.message) == ("memory.topk", "topk (32) must be <= n_subkeys (4)")


def test_a_norm_eps_that_float32_holds_as_zero_or_subnormal_is_refused(tmp_path):
    """trial99 W3: norm_eps 1e-46 (or 5e-324) passed as "above 0", but the query norm computes in float32, where it is 0:
    a pad position's zero query normalised to 0/0 = NaN and broke left-padded batched generation."""
    import torch

    from midus_surgery.model.hml import MIN_NORM_EPS, HMLConfig, _HeadNorm
    from midus_surgery.recipe.schema import MIN_NORM_EPS as RECIPE_MIN_NORM_EPS

    assert RECIPE_MIN_NORM_EPS == MIN_NORM_EPS == torch.finfo(torch.float32).tiny
    for value in ("1.0e-46", "5e-324", "1.0e-40"):
        [problem] = problems(tmp_path, GOOD.replace("topk: 8", f"topk: 8\n  norm_eps: {value}"))
        assert problem.field == "memory.norm_eps" and problem.message.startswith(f"should be at least {MIN_NORM_EPS!r}, got "), problem.message
        with pytest.raises(ValueError, match="norm_eps must be at least .*float32's smallest normal"):
            HMLConfig(norm_eps=float(value))
    load_recipe(write(tmp_path, GOOD.replace("topk: 8", f"topk: 8\n  norm_eps: {MIN_NORM_EPS!r}")))
    for kind in ("rms", "layer", "batch"):  # at the bound, a zero query (a pad position's) stays finite
        norm = _HeadNorm(kind, 2, 4, MIN_NORM_EPS)
        torch.nn.init.ones_(norm.weight)
        if norm.bias is not None:
            torch.nn.init.zeros_(norm.bias)
        assert torch.isfinite(norm(torch.zeros(3, 2, 4))).all(), kind


def test_every_problem_is_listed_at_once(tmp_path):
    text = GOOD.replace("after_every: 2", "after_every: 0").replace("topk: 8", "topk: 8\n  bogus: 1").replace("  dir: out\n", "  dir: out\n  shard_size: lots\n")
    found = [p.field for p in problems(tmp_path, text)]
    # in the file's order, as a reader goes down it
    assert found == ["layout.interleave.after_every", "memory.bogus", "output.shard_size"]


def test_a_shard_size_out_of_range_says_the_range_and_what_was_given(tmp_path):
    for size, said in (("10KB", "should be at least 1MB, got '10KB'"), ("2000TB", "should be at most 1PB (larger than any model: one shard), got '2000TB'"),
                       ("1PiB", "should be at most 1PB (larger than any model: one shard), got '1PiB'")):
        [problem] = problems(tmp_path, GOOD.replace("  dir: out\n", f"  dir: out\n  shard_size: {size}\n"))
        assert (problem.field, problem.message) == ("output.shard_size", said)


def test_a_training_config_given_as_a_recipe_is_named_as_such(tmp_path, capsys):
    """One line saying what the file is and which command runs it, not a dozen unknown and missing keys."""
    from midus_surgery.cli import main

    path = ROOT / "recipes" / "train" / "smollm2-midus.yaml"
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert [(p.where, p.message.split(":")[0]) for p in info.value.problems] == [
        (f"{path}:6:1", "this is a training config (it has init_from")]
    assert "midus-surgery train" in str(info.value)
    for command in (["validate", str(path)], ["apply", str(path), "--quiet"]):
        assert main(command) == 2
        err = capsys.readouterr()
        assert "this is a training config" in err.out + err.err and "unknown key" not in err.out + err.err


def test_missing_required_keys(tmp_path):
    found = problems(tmp_path, "base:\n  path: x\nlayout:\n  stack:\n    layers: [0, 2]\n")
    assert [(p.field, p.message) for p in found] == [("output", "missing required key 'output'")]


def test_layout_needs_exactly_one_form(tmp_path):
    text = GOOD.replace("layout:\n", "layout:\n  stack:\n    layers: [0, 2]\n")
    (p,) = problems(tmp_path, text)
    assert p.field == "layout" and "exactly one of" in p.message and "interleave, stack" in p.message


def test_interleave_needs_one_rule(tmp_path):
    (p,) = problems(tmp_path, GOOD.replace("after_every: 2", "after_every: 2\n    after: [1]"))
    assert "exactly one of `after_every` or `after`" in p.message


def test_slice_range_must_be_ordered(tmp_path):
    text = "base: {path: b}\nlayout:\n  slices:\n    - layers: [4, 2]\noutput: {dir: o}\n"
    (p,) = problems(tmp_path, text)
    assert p.field == "layout.slices.0" and "end > start" in p.message and p.where.endswith(":4:7")


def test_slice_memory_must_lie_in_slice(tmp_path):
    text = "base: {path: b}\nlayout:\n  slices:\n    - layers: [0, 4]\n    - layers: [2, 4]\n      memory: [1]\noutput: {dir: o}\n"
    (p,) = problems(tmp_path, text)
    assert p.field == "layout.slices.1" and "outside this slice" in p.message


def test_duplicate_key_is_an_error(tmp_path):
    (p,) = problems(tmp_path, GOOD + "output:\n  dir: other\n")
    assert p.message == "duplicate key" and p.where.endswith("r.yaml:12:1")


def test_yaml_syntax_error_is_located(tmp_path):
    (p,) = problems(tmp_path, "base:\n  path: [unclosed\nlayout: {}\n")
    assert "YAML syntax error" in p.message and ":3:" in p.where
    # the mistakes people make most, in a reader's words beside PyYAML's (trial52)
    (p,) = problems(tmp_path, GOOD + "---\n" + GOOD)
    assert p.where.endswith("r.yaml:12:1") and p.message == (
        "YAML syntax error: a second YAML document starts here ('---'): the file holds one; put each in a file of its own "
        "(YAML: but found another document)")
    (p,) = problems(tmp_path, GOOD.replace("dir: out", "dir: out: final"))
    assert p.message.startswith("YAML syntax error: a 'key: value' where a value was expected: an indent off, or a value with ': '")


def test_top_level_must_be_mapping(tmp_path):
    (p,) = problems(tmp_path, "- 1\n- 2\n")
    assert "mapping" in p.message


def test_empty_and_missing_files(tmp_path):
    (p,) = problems(tmp_path, "")
    assert "empty" in p.message
    with pytest.raises(RecipeError) as info:
        load_recipe(tmp_path / "nope.yaml")
    assert "file not found" in str(info.value)
    import os

    os.mkfifo(tmp_path / "pipe.yaml")  # trial33: opening it waited for a writer forever
    with pytest.raises(RecipeError) as info:
        load_recipe(tmp_path / "pipe.yaml")
    assert "is a named pipe that nothing writes to, not a YAML file" in str(info.value)
    # a recipe piped in is read (trial34: refused as a pipe by the first fix)
    piped = subprocess.run([sys.executable, "-c", "from midus_surgery.recipe.yaml_source import load_yaml; "
                            "print(load_yaml('/dev/stdin').data)"], input="a: 1\n", capture_output=True, text=True, timeout=60)
    assert piped.returncode == 0 and piped.stdout.strip() == "{'a': 1}", piped.stderr


def test_share_bank_needs_hive(tmp_path):
    (p,) = problems(tmp_path, GOOD.replace("topk: 8", "topk: 8\n  hive: false\n  share_bank: true"))
    assert "share_bank needs hive" in p.message


@pytest.mark.parametrize("text,expected", [("2GB", 2 * 10**9), ("500MB", 5 * 10**8), ("1GiB", 2**30), ("1.5 gb", 15 * 10**8), (12345678, 12345678),
                                           ("1PB", 10**15), ("1pib", 2**50)])  # trial50: the bound the docs state, "1PB", was "not a size"
def test_parse_size(text, expected):
    assert parse_size(text) == expected


def test_memory_settings_mirror_hml_config():
    """The recipe's memory section and the HML layer's own config must not drift apart."""
    import dataclasses

    from midus_surgery.model.hml import HMLConfig
    from midus_surgery.recipe.schema import MemorySettings

    hml_fields = {f.name: f.default for f in dataclasses.fields(HMLConfig)}
    recipe_fields = {k: v.default for k, v in MemorySettings.model_fields.items() if k != "share_bank"}
    assert recipe_fields == {k: hml_fields[k] for k in recipe_fields}
    assert set(hml_fields) == set(recipe_fields), "every HML knob must be a recipe knob"


def test_schema_command_prints_json_schema():
    result = subprocess.run([sys.executable, "-m", "midus_surgery.cli", "schema"], capture_output=True, text=True, check=True)
    schema = json.loads(result.stdout)
    assert schema["title"] == "midus-surgery recipe"
    assert schema["additionalProperties"] is False
    assert set(schema["required"]) == {"base", "layout", "output"}
    assert schema == json.loads(json.dumps(Recipe.model_json_schema() | {"$schema": schema["$schema"], "title": schema["title"]}))
    # what `schema --help` and the README say editors read: the committed file is this schema (tools/gen_docs.py writes it)
    assert json.loads((Path(__file__).resolve().parents[1] / "docs" / "recipe.schema.json").read_text()) == schema


def test_every_optional_setting_of_the_schema_states_its_default():
    """An editor shows the schema's default: the docs' table showed `[]` for slices[].memory while
    the schema had none (trial50: pydantic leaves a default_factory's value out). Sections (objects
    of settings, with defaults of their own) are the exception."""
    schema = Recipe.model_json_schema()
    models = {"<recipe>": schema, **schema["$defs"]}
    without = [f"{model}.{name}" for model, spec in models.items() for name, prop in spec.get("properties", {}).items()
               if name not in spec.get("required", []) and "default" not in prop and "$ref" not in prop]
    assert without == []


def test_docs_are_generated_from_the_schema():
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "gen_docs.py"), "--check"], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_bundled_recipes_carry_the_schema_modeline():
    for path in sorted((ROOT / "recipes").glob("*.yaml")):  # training configs live in recipes/train/
        assert path.read_text().startswith("# yaml-language-server: $schema=../docs/recipe.schema.json"), path


def test_memory_kernels_reaches_the_layer_only_when_the_recipe_names_it():
    """Where the memory layer runs is the environment's choice (MIDUS_HML_KERNELS) unless the recipe
    says so: then it is written into the output's config with the layer's other settings."""
    from midus_surgery.model.hml import HMLConfig
    from midus_surgery.recipe.schema import MemorySettings

    unset = MemorySettings().hml_dict()
    assert "kernels" not in unset and HMLConfig.from_dict(unset).kernels is None
    named = MemorySettings(kernels="torch").hml_dict()
    assert named["kernels"] == "torch" and HMLConfig.from_dict(named).kernels == "torch"


def test_a_recipe_may_name_every_kernel_choice_the_layer_knows_and_no_other():
    import typing

    from midus_surgery.model.hml import KERNELS
    from midus_surgery.recipe.schema import MemorySettings

    allowed = typing.get_args(typing.get_args(MemorySettings.model_fields["kernels"].annotation)[0])
    assert set(allowed) == set(KERNELS)


def test_the_readme_recipe_is_the_bundled_one_less_its_defaults(tmp_path):
    """The README's tour shows recipes/smollm2-135m-midus.yaml without the keys it sets to their defaults:
    loaded, the two are the same recipe (output.dtype auto is the base config's float32)."""
    import json
    import re

    repo = Path(__file__).resolve().parents[1]
    shown = re.search(r"A recipe \(`recipes/smollm2-135m-midus.yaml`[^\n]*\n\n```yaml\n(.*?)```", (repo / "README.md").read_text(), re.S)
    assert shown, "the README's tour no longer shows the recipe"
    copy = tmp_path / "readme-tour.yaml"  # the paths are compared as written
    copy.write_text(shown.group(1))
    readme = load_recipe(copy).recipe.model_dump()
    bundled = load_recipe(repo / "recipes" / "smollm2-135m-midus.yaml").recipe.model_dump()
    assert readme["output"].pop("dtype") == "auto" and bundled["output"].pop("dtype") == "float32"
    assert json.loads((repo / "recipes" / "configs" / "smollm2-135m.json").read_text())["dtype"] == "float32"
    assert readme == bundled


def test_a_lone_utf16_surrogate_in_a_key_or_a_string_is_said_at_its_line_in_words(tmp_path):
    """A key or string holding half of a UTF-16 pair ("\\ud800x") was reported at 1:1 in pydantic's words ("unable to parse
    raw data as a unicode string"), in a recipe and a train config alike (trial99 M2)."""
    from midus_surgery.train.config import load_train_config

    lone = "holds a lone UTF-16 surrogate ('\\ud800' at character 0): half of a character; write the whole character"
    said = [str(p) for p in problems(tmp_path, GOOD + '"\\ud800x": 1\n')]
    assert said == [f"{tmp_path / 'r.yaml'}:12:1: '\\ud800x' {lone} (both halves of its \\u escape pair) or remove it"], said
    said = [str(p) for p in problems(tmp_path, GOOD.replace("dir: out", 'dir: "o\\udc80ut"'))]
    assert len(said) == 1 and said[0].startswith(f"{tmp_path / 'r.yaml'}:11:8: output.dir: 'o\\udc80ut' holds a lone UTF-16 "
                                                 "surrogate ('\\udc80' at character 1): half of a character;"), said
    config = write(tmp_path, 'init_from: model\nrun_dir: run\ntokens: 64\n"\\ud800x": 1\ndata: {train: [c.txt], block_size: 16}\n', "t.yaml")
    with pytest.raises(RecipeError) as info:
        load_train_config(config)
    assert [str(p) for p in info.value.problems] == [f"{config}:4:1: '\\ud800x' {lone} (both halves of its \\u escape pair) or remove it"]


def test_a_missing_key_written_misspelt_or_indented_too_far_is_one_located_problem(tmp_path):
    # `output_:` for output: the missing key is said at the misspelt one, not as a second line naming the file only
    (p,) = problems(tmp_path, GOOD.replace("output:", "output_:"))
    assert p.field == "output_" and p.where.endswith("r.yaml:10:1")
    assert p.message == "unknown key 'output_'; did you mean 'output'? (a required key the file lacks)"
    # layout: indented under base: said where it is
    (p,) = problems(tmp_path, GOOD.replace("layout:\n  interleave:\n    after_every: 2\n    kind: memory\n",
                                           "  layout:\n    interleave:\n      after_every: 2\n      kind: memory\n"))
    assert p.field == "base.layout" and p.where.endswith("r.yaml:3:3")
    assert p.message == "unknown key 'layout' here: it belongs one level up, where it is missing (indented too far?)"
    # the layout: line lost: its interleave: is read under base:, said there
    (p,) = problems(tmp_path, GOOD.replace("layout:\n", ""))
    assert p.field == "base.interleave" and p.where.endswith("r.yaml:3:3")
    assert p.message == ("unknown key 'interleave' here: it is a key of layout:, which the file lacks (the layout: line above it "
                         "missing, or this key indented wrongly?)")
    # nested: output's dir misspelt, one line at the misspelt key
    (p,) = problems(tmp_path, GOOD.replace("  dir: out\n", "  dirr: out\n"))
    assert p.field == "output.dirr" and p.where.endswith("r.yaml:11:3")
    assert p.message == "unknown key 'dirr'; did you mean 'dir'? (a required key the file lacks)"
    # a missing key with an unrelated unknown one stays two problems
    found = problems(tmp_path, GOOD.replace("output:\n  dir: out\n", "colour: blue\n"))
    assert [(q.field, q.message.split(" (")[0]) for q in found] == [("output", "missing required key 'output'"),
                                                                      ("colour", "unknown key 'colour'")]


def test_a_list_an_item_short_beside_a_misspelt_sibling_keeps_its_problem(tmp_path):
    # trial126 F1: `layers: [2]` is a list an item short, not a missing key: its problem stays, and the misspelt
    # sibling is a plain did-you-mean (the file holds layers:)
    stack = GOOD.replace("layout:\n  interleave:\n    after_every: 2\n    kind: memory\n",
                         "layout:\n  stack:\n    layers: [2]\n    layer: [2, 4]\n")
    found = [str(p).split("r.yaml:")[1] for p in problems(tmp_path, stack)]
    assert found == ["5:5: layout.stack.layers: needs 2 items, got 1",
                     "6:5: layout.stack.layer: unknown key 'layer'; did you mean 'layers'?"]
    slices = GOOD.replace("layout:\n  interleave:\n    after_every: 2\n    kind: memory\n",
                          "layout:\n  slices:\n    - layers: [0]\n      Layers: [0, 4]\n")
    found = problems(tmp_path, slices)
    assert [q.field for q in found] == ["layout.slices.0.layers", "layout.slices.0.Layers"]
    assert "needs 2 items, got 1" in found[0].message and "the file lacks" not in found[1].message


def test_a_misspelt_missing_key_wins_over_a_stray_key_named_like_its_child(tmp_path):
    # trial126 F2: outptu: is the missing output:, so a dtype: under base: is not said to be output's with its line lost
    found = [str(p).split("r.yaml:")[1] for p in problems(tmp_path, GOOD.replace("output:", "outptu:").replace(
        "  path: base-model\n", "  path: base-model\n  dtype: bfloat16\n"))]
    assert found == ["3:3: base.dtype: unknown key 'dtype' (known: path, config, gguf_file, trust_remote_code, hub_id)",
                     "11:1: outptu: unknown key 'outptu'; did you mean 'output'? (a required key the file lacks)"]
    found = [str(p).split("r.yaml:")[1] for p in problems(tmp_path, GOOD.replace("layout:", "layuot:").replace(
        "  path: base-model\n", "  path: base-model\n  layers: 32\n"))]
    assert found == ["3:3: base.layers: unknown key 'layers' (known: path, config, gguf_file, trust_remote_code, hub_id)",
                     "4:1: layuot: unknown key 'layuot'; did you mean 'layout'? (a required key the file lacks)"]


def test_no_indentation_hint_where_nothing_is_indented(tmp_path):
    # trial126 F3: in {...} and JSON nothing is indented, so no "(indented too far?)" nor "line above it missing"
    flow = "{base: {path: m, layout: {interleave: {after_every: 2}}}, output: {dir: o}}\n"
    (p,) = problems(tmp_path, flow)
    assert (p.field, p.message) == ("base.layout", "unknown key 'layout' here: it belongs one level up, where it is missing")
    path = write(tmp_path, '{"base": {"path": "m", "interleave": {"after_every": 2}}, "output": {"dir": "o"}}\n', "r.json")
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    (p,) = info.value.problems
    assert (p.field, p.message) == ("base.interleave", "unknown key 'interleave' here: it is a key of layout:, which the file lacks")
    # a flow mapping merged into a block one: its keys are still not indented
    (p,) = problems(tmp_path, "base:\n  path: m\n  <<: {layout: {interleave: {after_every: 2}}}\noutput:\n  dir: o\n")
    assert p.message == "unknown key 'layout' here: it belongs one level up, where it is missing"
    # a key merged in from a block anchor, or a block mapping aliased, is written (and indented) at the
    # anchor, not here: no hint; but the anchor's own keys, where they are written in a block mapping of the recipe, keep it
    anchor = "x: &d\n  path: m\n  layout:\n    interleave: {after_every: 2}\n"
    for text in (anchor + "base:\n  <<: *d\noutput: {dir: o}\n", anchor + "base: {<<: *d}\noutput: {dir: o}\n",
                 anchor + "base: *d\noutput: {dir: o}\n"):
        found = [(p.field, p.message) for p in problems(tmp_path, text) if p.field == "base.layout"]
        assert found == [("base.layout", "unknown key 'layout' here: it belongs one level up, where it is missing")], text
    (p,) = [p for p in problems(tmp_path, "base: &b\n  path: m\n  layout:\n    interleave: {after_every: 2}\nother: *b\noutput: {dir: o}\n")
            if p.field == "base.layout"]
    assert (p.field, p.message) == ("base.layout", "unknown key 'layout' here: it belongs one level up, where it is missing "
                                                   "(indented too far?)")
    # a block mapping holding the key keeps the hint, worded for any key (not "a output:")
    (p,) = problems(tmp_path, GOOD.replace("output:\n  dir: out\n", "").replace("  path: base-model\n", "  path: base-model\n  dir: out\n"))
    assert p.message == ("unknown key 'dir' here: it is a key of output:, which the file lacks (the output: line above it missing, "
                         "or this key indented wrongly?)")


def test_a_bank_past_the_limit_is_said_with_exact_counts(tmp_path):
    """Rounded to 3 digits, a bank just past 2^40 values read "= 1.1e+12 values (more than 1.1e+12)" (trial150 L4)."""
    (p,) = problems(tmp_path, GOOD.replace("  topk: 8\n", "  topk: 8\n  latent_dim: 16400\n").replace("n_subkeys: 64", "n_subkeys: 8192"))
    assert p.field == "memory" and p.message.startswith("the HIVE bank would hold n_subkeys^2 * latent_dim = 1,100,585,369,600 values "
                                                        "per memory block (more than 1,099,511,627,776 = 2^40, 4.4 TB in fp32)"), p
