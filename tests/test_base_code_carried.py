"""The base's own code an output carries (config.json's kept auto_map, tokenizer_config.json's), checked the same way by
validate, plan and apply, and named exactly as it is copied (trial113 F3, F5 and the Hub reference of config.json)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from tiny_configs import tiny_config
from transformers import AutoModelForCausalLM

from midus_surgery.cli import main

LAYOUT = "layout:\n  interleave:\n    after: [1]\n    kind: transformer\n"


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("bases") / "llama"
    AutoModelForCausalLM.from_config(tiny_config("llama")).save_pretrained(path)
    return path


def base_with(llama: Path, tmp_path: Path, files: dict[str, str], tokenizer_map=None, config_map=None) -> Path:
    base = tmp_path / "base"
    shutil.copytree(llama, base)
    for name, text in files.items():
        (base / name).write_text(text)
    if tokenizer_map is not None:
        (base / "tokenizer_config.json").write_text(json.dumps({"auto_map": tokenizer_map}))
    if config_map is not None:
        config = json.loads((base / "config.json").read_text())
        (base / "config.json").write_text(json.dumps({**config, "auto_map": config_map}))
    return base


def recipe_for(tmp_path: Path, base: Path, extra: str = "") -> Path:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"base:\n  path: {base}\n{extra}{LAYOUT}output:\n  dir: {tmp_path / 'out'}\n  dtype: float32\n")
    return recipe


def run(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_a_helper_linked_outside_the_base_is_neither_named_nor_copied(llama, tmp_path, capsys):
    """trial113 F5a: ext.py, a link to a file outside the base, was named in the note and the card as copied, then left
    behind with two contradictory warnings. One rule decides both: not named, not copied, one warning."""
    outside = tmp_path / "outside.py"
    outside.write_text("OUTSIDE = 1\n")
    base = base_with(llama, tmp_path, {"tok.py": "from .ext import OUTSIDE\nfrom .helper import X\n", "helper.py": "X = 1\n"},
                     tokenizer_map={"AutoTokenizer": [None, "tok.Tok"]})
    (base / "ext.py").symlink_to(outside)
    recipe = recipe_for(tmp_path, base)
    code, said, _ = run(capsys, "validate", str(recipe))  # not named as carried: warned of, as apply warns
    assert code == 0 and "(helper.py, tok.py, named by" in said, said
    assert [line for line in said.splitlines() if "ext.py" in line] == [
        "  warning: the base's tokenizer names its own code in ext.py, which is a link leading out of the base directory: not "
        "copied, so the output's tokenizer will not load until a module of that name is beside it"], said
    code, said, err = run(capsys, "apply", str(recipe), "--quiet")
    assert code == 0, err
    out = tmp_path / "out"
    assert {p.name for p in out.glob("*.py")} == {"helper.py", "tok.py"}
    assert "ext.py" not in (out / "README.md").read_text() and "(`helper.py`, `tok.py`, named by" in (out / "README.md").read_text()
    warned = [line for line in err.splitlines() if "ext.py" in line]
    assert len(warned) == 1 and "names its own code in ext.py, which is a link leading out of the base directory" in warned[0], err


def test_config_code_with_a_missing_relative_import_is_refused_by_validate_plan_and_apply_alike(llama, tmp_path, capsys):
    """trial113 F5b: config.json's kept auto_map names ctok.Tok, whose module imports .missing: plan's note dropped all
    config code (exit 0) while apply refused (exit 2). Now all three refuse in one message, before any OK or table."""
    base = base_with(llama, tmp_path, {"ctok.py": "from .helper import X\nfrom .missing import Y\n", "helper.py": "X = 1\n"},
                     config_map={"AutoTokenizer": [None, "ctok.Tok"]})
    recipe = recipe_for(tmp_path, base)
    why = f"{base / 'config.json'}: auto_map names 'ctok.Tok', whose module imports 'missing.py', which is not a file in the base directory"
    code, said, err = run(capsys, "validate", str(recipe))
    assert code == 2 and "OK" not in said and "INVALID" in err and why in err, (said, err)
    code, said, err = run(capsys, "plan", str(recipe))
    assert code == 2 and said == "" and why in err, (said, err)
    code, said, err = run(capsys, "apply", str(recipe), "--quiet")
    assert code == 2 and why in err and not (tmp_path / "out").exists(), err


def test_a_relative_import_name_too_long_for_a_file_is_said_short_and_validate_does_not_fail_after_ok(llama, tmp_path, capsys):
    """trial113 F5c: a tokenizer module's `from .AAAA...(300) import X` made Path.is_file raise ENAMETOOLONG: validate
    printed OK, then exited 2 printing the whole name. It is a file the base does not hold: apply warns of it, cut short,
    as of any missing tokenizer file; in config.json's code it is refused up front, also cut short."""
    long = "A" * 300
    base = base_with(llama, tmp_path, {"tok.py": f"try:\n    from .{long} import X\nexcept ImportError:\n    pass\n"},
                     tokenizer_map={"AutoTokenizer": [None, "tok.Tok"]})
    recipe = recipe_for(tmp_path, base)
    code, said, err = run(capsys, "validate", str(recipe))
    assert code == 0 and said.startswith("OK") and "(tok.py, named by" in said and long not in said + err, (said, err)
    code, said, err = run(capsys, "apply", str(recipe), "--quiet")
    assert code == 0 and long not in err and "names its own code in AAAA" in err, err
    shutil.rmtree(tmp_path / "out")
    (base / "tokenizer_config.json").unlink()
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoTokenizer": [None, "tok.Tok"]}}))
    for command in ("validate", "plan", "apply"):
        code, said, err = run(capsys, command, str(recipe))
        assert code == 2 and "OK" not in said and long not in said + err, (command, said, err)
        assert "whose module imports 'AAAA" in err and "(cut; 303 characters)" in err, err


def test_a_hub_reference_in_config_jsons_tokenizer_entry_is_refused_by_validate_as_by_apply(llama, tmp_path, capsys):
    """validate and plan accepted config.json's {"AutoTokenizer": [null, "owner/repo--tok.Tok"]}, which apply refused:
    all three refuse it with apply's message."""
    base = base_with(llama, tmp_path, {}, config_map={"AutoTokenizer": [None, "owner/repo--tok.Tok"]})
    recipe = recipe_for(tmp_path, base)
    why = (f"{base / 'config.json'}: auto_map entry 'owner/repo--tok.Tok' is not a 'module.Class' of the base's own files "
           "(code from another repository is not fetched)")
    for command in ("validate", "plan", "apply"):
        code, said, err = run(capsys, command, str(recipe))
        assert code == 2 and "OK" not in said and why in err, (command, said, err)
    assert not (tmp_path / "out").exists()


TOK = '''from .helper import VOCAB
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast


class Tok(PreTrainedTokenizerFast):
    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        tokenizer = Tokenizer(models.WordLevel(VOCAB, unk_token="t0"))
        tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
        return cls(tokenizer_object=tokenizer, unk_token="t0")
'''


def test_a_gguf_bases_tokenizer_code_is_named_carried_and_loads_from_the_output(tmp_path, capsys):
    """trial113 F3: a GGUF folder's tokenizer with its own code (trusted by the recipe) was carried into the output by
    save_pretrained, but named in neither the note nor the card, and its auto_map was written as a bare string that
    AutoTokenizer could not read. The code is named and copied by the folder base's rule, and the output's tokenizer loads."""
    from test_gguf_metadata import write_llama_gguf

    base = tmp_path / "gb"
    base.mkdir()
    write_llama_gguf(base / "model.gguf")
    (base / "tokenizer_config.json").write_text(json.dumps({"auto_map": {"AutoTokenizer": [None, "tok.Tok"]}}))
    (base / "helper.py").write_text("VOCAB = {f't{i}': i for i in range(32)}\n")
    (base / "tok.py").write_text(TOK)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"base:\n  path: {base / 'model.gguf'}\n  trust_remote_code: true\n{LAYOUT}output:\n  dir: {tmp_path / 'out'}\n"
                      "  dtype: float32\n")
    code, said, _ = run(capsys, "plan", str(recipe))
    assert code == 0 and "code of its own that the output carries (helper.py, tok.py, named by" in said, said
    code, said, err = run(capsys, "apply", str(recipe), "--quiet")
    assert code == 0, err
    out = tmp_path / "out"
    assert {p.name for p in out.glob("*.py")} == {"helper.py", "tok.py"}
    assert "(`helper.py`, `tok.py`, named by" in (out / "README.md").read_text()
    assert json.loads((out / "tokenizer_config.json").read_text())["auto_map"]["AutoTokenizer"] == ["tok.Tok", None]
    load = textwrap.dedent(f"""
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained({str(out)!r}, trust_remote_code=True)
        print(type(tokenizer).__name__, tokenizer("t3 t5")["input_ids"])
    """)
    done = subprocess.run([sys.executable, "-c", load], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "Tok [3, 5]" in done.stdout, done.stderr[-2000:]
    # untrusted, the tokenizer does not load, so no code is named or carried
    recipe.write_text(recipe.read_text().replace("trust_remote_code: true", "trust_remote_code: false"))
    code, said, _ = run(capsys, "plan", str(recipe))
    assert code == 0 and "code of its own" not in said, said



MEMORY = "layout:\n  interleave:\n    after: [1]\n    kind: memory\nmemory: {n_subkeys: 8, topk: 4, latent_dim: 8}\n"


@pytest.mark.parametrize("module", ["hml", "HML"])
def test_a_gguf_bases_tokenizer_code_named_like_midus_files_is_refused_before_anything_is_written(tmp_path, capsys, module):
    """trial114 F1: a GGUF base's trusted tokenizer module did `from .hml import VOCAB`, and the base's hml.py replaced
    MIDUS's in the output and ran on the output's model load. Refused by validate, plan and apply as for a folder base,
    before anything is written; F5: compared case-folded (HML.py is hml.py on macOS and Windows); F6: apply refuses
    without first noting that it will copy the file."""
    from test_gguf_metadata import write_llama_gguf

    base = tmp_path / "gb"
    base.mkdir()
    write_llama_gguf(base / "model.gguf")
    (base / "tokenizer_config.json").write_text(json.dumps({"auto_map": {"AutoTokenizer": [None, "tok.Tok"]}}))
    (base / f"{module}.py").write_text("VOCAB = {f't{i}': i for i in range(32)}\n")
    (base / "tok.py").write_text(TOK.replace("from .helper import", f"from .{module} import"))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"base:\n  path: {base / 'model.gguf'}\n  trust_remote_code: true\n{MEMORY}output:\n  dir: {tmp_path / 'out'}\n"
                      "  dtype: float32\n")
    why = f"the base has code of its own named like MIDUS's modeling files ({module}.py), which a MIDUS output ships under those names"
    for command in (["validate"], ["plan"], ["apply", "--quiet"]):
        code, said, err = run(capsys, command[0], str(recipe), *command[1:])
        assert code == 2 and "OK" not in said and why in err, (command, said, err)
        assert "code of its own that the output carries" not in said + err, (command, said, err)
    assert not (tmp_path / "out").exists()


def test_a_folder_bases_code_named_like_midus_files_in_another_case_is_refused(llama, tmp_path, capsys):
    """trial114 F5: the name clash was compared case-sensitively; Midus_Names.py is midus_names.py where the output is
    used on macOS or Windows."""
    base = base_with(llama, tmp_path, {"tok.py": "from .Midus_Names import X\n", "Midus_Names.py": "X = 1\n"},
                     tokenizer_map={"AutoTokenizer": [None, "tok.Tok"]})
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"base:\n  path: {base}\n{MEMORY}output:\n  dir: {tmp_path / 'out'}\n")
    code, said, err = run(capsys, "validate", str(recipe))
    assert code == 2 and "named like MIDUS's modeling files (Midus_Names.py)" in err, (said, err)


def odd_file(path: Path, kind: str) -> str:
    """``path`` made a named pipe, a link to /dev/zero, a folder or a sparse file over the module bound; what is said of it."""
    import os

    from midus_surgery.io.tokenizer_files import MAX_MODULE_BYTES

    if kind == "fifo":
        os.mkfifo(path)
        return "is a named pipe, not a regular file"
    if kind == "devzero":
        path.symlink_to("/dev/zero")
        return "is a device, not a regular file"
    if kind == "dir":
        path.mkdir()
        return "is a folder, not a regular file"
    with open(path, "wb") as handle:
        handle.truncate(MAX_MODULE_BYTES + 1)
    return f"is {MAX_MODULE_BYTES + 1:,} bytes, more than the {MAX_MODULE_BYTES:,} a Python module is read or copied up to"


@pytest.mark.parametrize("kind", ["fifo", "devzero", "big"])
def test_config_code_importing_what_is_no_module_file_is_refused_by_validate_plan_and_apply(llama, tmp_path, capsys, kind):
    """trial114 F2: config.json's kept auto_map names ctok.Tok, whose module imports .helper: a named pipe there hung
    validate, plan and apply, a link to /dev/zero or a 1 GiB file ended in a MemoryError traceback. The tokenizer path's
    rule (a regular file of a module's size) now holds here too: refused in one line that says what is there."""
    base = base_with(llama, tmp_path, {"ctok.py": "from .helper import X\n"}, config_map={"AutoTokenizer": [None, "ctok.Tok"]})
    what = odd_file(base / "helper.py", kind)
    recipe = recipe_for(tmp_path, base)
    why = f"{base / 'config.json'}: auto_map names 'ctok.Tok', whose module imports 'helper.py', which {what}"
    for command in (["validate"], ["plan"], ["apply", "--quiet"]):
        code, said, err = run(capsys, command[0], str(recipe), *command[1:])
        assert code == 2 and "OK" not in said and why in err and "Traceback" not in err, (command, said, err)
    assert not (tmp_path / "out").exists()


def test_config_code_whose_module_is_over_the_bound_is_refused(llama, tmp_path, capsys):
    """The module an auto_map entry names is held to the same rule as its imports."""
    base = base_with(llama, tmp_path, {}, config_map={"AutoTokenizer": [None, "ctok.Tok"]})
    what = odd_file(base / "ctok.py", "big")
    code, said, err = run(capsys, "validate", str(recipe_for(tmp_path, base)))
    assert code == 2 and f"auto_map names 'ctok.Tok', but 'ctok.py' {what}" in err, (said, err)


@pytest.mark.parametrize("kind", ["devzero", "dir", "big"])
def test_a_tokenizer_helper_that_is_no_module_file_is_said_for_what_it_is_and_not_copied(llama, tmp_path, capsys, kind):
    """trial114 F4: a tokenizer helper that was a link to /dev/zero or a folder was warned of as one the base "does not
    hold"; a 1 GiB helper.py was named as carried and copied whole, without a word. One rule: neither named nor copied,
    and the warning says what is there."""
    base = base_with(llama, tmp_path, {"tok.py": "from .helper import X\n"}, tokenizer_map={"AutoTokenizer": [None, "tok.Tok"]})
    what = odd_file(base / "helper.py", kind)
    recipe = recipe_for(tmp_path, base)
    warned = f"the base's tokenizer names its own code in helper.py, which {what}: not copied"
    for command in ("validate", "plan"):  # said before apply, as apply says it (validate and plan were silent)
        code, said, _ = run(capsys, command, str(recipe))
        assert code == 0 and "(tok.py, named by" in said and warned in " ".join(said.split()), (command, said)
    code, said, err = run(capsys, "apply", str(recipe), "--quiet")
    assert code == 0, err
    assert f"warning: {warned}" in err, err
    out = tmp_path / "out"
    assert {p.name for p in out.glob("*.py")} == {"tok.py"} and "helper.py" not in (out / "README.md").read_text()


def test_trusted_building_code_importing_a_named_pipe_is_refused_before_transformers_reads_it(llama, tmp_path, capsys):
    """config.json's AutoConfig module, run when the recipe trusts it, imported .helper, a named pipe: transformers read
    it while building the config and validate hung. The module file rule holds for its imports before that."""
    base = base_with(llama, tmp_path, {"cfg.py": "from .helper import X\nfrom transformers import LlamaConfig\n\n\n"
                                                 "class MyConfig(LlamaConfig):\n    pass\n"},
                     config_map={"AutoConfig": "cfg.MyConfig"})
    what = odd_file(base / "helper.py", "fifo")
    recipe = recipe_for(tmp_path, base, extra="  trust_remote_code: true\n")
    code, said, err = run(capsys, "validate", str(recipe))
    assert code == 2 and f"auto_map names 'cfg.MyConfig', whose module imports 'helper.py', which {what}" in err, (said, err)


CFG = "from transformers import LlamaConfig\n\n\nclass MyConfig(LlamaConfig):\n    pass\n"


@pytest.mark.parametrize("line,made", [("from .sub/../helper import X", "helper.py"), ("from .{outside} import X", None)])
def test_trusted_building_code_whose_relative_import_holds_a_slash_is_refused_before_transformers_reads_it(
        llama, tmp_path, capsys, line, made):
    """A relative import name with a '/' (read by transformers' regex even in a docstring) was dropped unchecked, and
    transformers then opened base/sub/../helper.py (a named pipe there hung validate) or, through an absolute name, a file
    outside the base. Every name transformers would open is refused unless it is a module name inside the base."""
    outside = tmp_path / "outside.py"
    outside.write_text("X = 1\n")
    line = line.format(outside=outside.with_suffix(""))  # "from ./tmp/.../outside": an absolute name
    base = base_with(llama, tmp_path, {"cfg.py": f'"""notes:\n{line}\n"""\n' + CFG}, config_map={"AutoConfig": "cfg.MyConfig"})
    (base / "sub").mkdir()
    if made:
        (base / made).write_text("X = 1\n")
    recipe = recipe_for(tmp_path, base, extra="  trust_remote_code: true\n")
    for command in (["validate"], ["plan"]):
        code, said, err = run(capsys, command[0], str(recipe), *command[1:])
        assert code == 2 and "whose module imports" in err and "which is not a module name inside the base" in err, (said, err)


@pytest.mark.parametrize("line,kind", [("from .sub/../helper import VOCAB", None), ("from .helper import VOCAB", "fifo")])
def test_a_gguf_bases_trusted_tokenizer_importing_what_fails_the_rule_is_refused_before_transformers_reads_it(
        tmp_path, capsys, line, kind):
    """A GGUF base's tokenizer is loaded by transformers, which reads the module's relative imports: a name with a '/'
    (a named pipe behind it hung apply) or a file the rule refuses is refused by validate, plan and apply alike."""
    from test_gguf_metadata import write_llama_gguf

    base = tmp_path / "gb"
    (base / "sub").mkdir(parents=True)
    write_llama_gguf(base / "model.gguf")
    (base / "tokenizer_config.json").write_text(json.dumps({"auto_map": {"AutoTokenizer": [None, "tok.Tok"]}}))
    (base / "tok.py").write_text(f'"""notes:\n{line}\n"""\n' + TOK)
    if kind:
        odd_file(base / "helper.py", kind)
    else:
        (base / "helper.py").write_text("VOCAB = {f't{i}': i for i in range(32)}\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"base:\n  path: {base / 'model.gguf'}\n  trust_remote_code: true\n{LAYOUT}output:\n  dir: {tmp_path / 'out'}\n"
                      "  dtype: float32\n")
    for command in (["validate"], ["plan"], ["apply", "--quiet"]):
        code, said, err = run(capsys, command[0], str(recipe), *command[1:])
        assert code == 2 and "tokenizer code names '" + line.split()[1][1:] + ".py', which is" in err, (command, said, err)
        assert "OK" not in said, (command, said, err)
    assert not (tmp_path / "out").exists()


def test_trusted_building_code_importing_a_file_that_is_not_utf8_names_it(llama, tmp_path, capsys):
    """transformers reads a module's imports as UTF-8: a latin-1 helper.py was refused as "base.path: 'utf-8' codec can't
    decode...", naming no file."""
    base = base_with(llama, tmp_path, {"cfg.py": "from .helper import X\n" + CFG}, config_map={"AutoConfig": "cfg.MyConfig"})
    (base / "helper.py").write_bytes(b"# caf\xe9\nX = 1\n")
    code, said, err = run(capsys, "validate", str(recipe_for(tmp_path, base, extra="  trust_remote_code: true\n")))
    assert code == 2 and "'helper.py', which is not UTF-8 text" in err, (said, err)


def cli(*argv: str) -> subprocess.CompletedProcess:
    """The command as a user runs it: its warnings as they reach a terminal, not as pytest captures them."""
    return subprocess.run([sys.executable, "-m", "midus_surgery.cli", *argv], capture_output=True, text=True, timeout=600)


def trusted_gguf_beside(base: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A trusted GGUF base (tmp_path/gb) holding the folder ``base``'s tokenizer_config.json, tok.py and helper.py, and
    a recipe (tmp_path/g.yaml) that writes its output to tmp_path/gout."""
    from test_gguf_metadata import write_llama_gguf

    gguf = tmp_path / "gb"
    gguf.mkdir()
    write_llama_gguf(gguf / "model.gguf")
    for name in ("tokenizer_config.json", "tok.py", "helper.py"):
        shutil.copy(base / name, gguf / name)
    recipe = tmp_path / "g.yaml"
    recipe.write_text(f"base:\n  path: {gguf / 'model.gguf'}\n  trust_remote_code: true\n{LAYOUT}output:\n  dir: {tmp_path / 'gout'}\n"
                      "  dtype: float32\n")
    return gguf, recipe


LATIN1_TOK = "# -*- coding: latin-1 -*-\n# (c) Caf\xe9 Labs\n" + TOK


def test_a_tokenizer_module_that_is_not_utf8_is_warned_of_on_a_folder_and_refused_on_a_trusted_gguf(llama, tmp_path, capsys):
    """trial121 F1: the UTF-8 rule held for config.json's code only. A Latin-1 tok.py named by tokenizer_config.json passed
    validate, plan and apply without a word and was copied into an output whose tokenizer failed with a bare codec error;
    on a trusted GGUF base validate said OK and apply wrote no tokenizer. The one module file rule now holds it: a folder
    base is warned of it (not copied), a trusted GGUF refused before transformers reads it, config.json's refusal as before."""

    base = base_with(llama, tmp_path, {"helper.py": "VOCAB = {f't{i}': i for i in range(32)}\n"},
                     tokenizer_map={"AutoTokenizer": [None, "tok.Tok"]})
    (base / "tok.py").write_text(LATIN1_TOK, encoding="latin-1")
    recipe = recipe_for(tmp_path, base)
    warned = ("the base's tokenizer names its own code in tok.py, which is not UTF-8 text (byte 0xe9 at offset 35), as "
              "transformers reads a module: not copied, so the output's tokenizer will not load")
    for command in (["validate"], ["plan"], ["apply", "--quiet"]):
        done = cli(command[0], str(recipe), *command[1:])
        assert done.returncode == 0 and warned in done.stdout + done.stderr, (command, done.stdout, done.stderr)
    assert not list((tmp_path / "out").glob("*.py"))  # its imports unread, as transformers would not get that far

    gguf, recipe = trusted_gguf_beside(base, tmp_path)
    why = f"{gguf / 'tokenizer_config.json'}: its tokenizer code names 'tok.py', which is not UTF-8 text (byte 0xe9 at offset 35)"
    for command in (["validate"], ["plan"], ["apply", "--quiet"]):
        code, said, err = run(capsys, command[0], str(recipe), *command[1:])
        assert code == 2 and why in err and "OK" not in said and "Traceback" not in err, (command, said, err)
    assert not (tmp_path / "gout").exists()

    # config.json's code keeps its refusal, in the same words
    (base / "tokenizer_config.json").unlink()
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoTokenizer": [None, "tok.Tok"]}}))
    code, said, err = run(capsys, "validate", str(recipe_for(tmp_path, base)))
    assert code == 2 and ("config.json: auto_map names 'tok.Tok', but 'tok.py' is not UTF-8 text (byte 0xe9 at offset 35), "
                          "as transformers reads a module") in err, (said, err)


def test_a_trusted_gguf_is_refused_only_for_what_its_tokenizer_load_opens_and_warned_of_the_rest(tmp_path):
    """trial121 F2: a trusted GGUF base was refused for any file of any tokenizer_config.json auto_map entry the rule
    rejects (an AutoProcessor module, a 4 MiB + 1 helper transformers reads without trouble), where a folder base with the
    same files is warned of. AutoTokenizer opens only its own entry's module (the fast one of a [slow, fast] pair) and
    its relative imports, and only what would harm that read is refused; the rest is warned of in the folder's words."""
    from test_gguf_metadata import write_llama_gguf

    from midus_surgery.io.tokenizer_files import MAX_MODULE_BYTES

    base = tmp_path / "gb"
    base.mkdir()
    write_llama_gguf(base / "model.gguf")
    (base / "tokenizer_config.json").write_text(json.dumps({"auto_map": {"AutoTokenizer": ["slowtok.Tok", "tok.Tok"],
                                                                         "AutoProcessor": "proc.Proc"}}))
    (base / "tok.py").write_text(TOK)
    (base / "helper.py").write_text("VOCAB = {f't{i}': i for i in range(32)}\n")
    import os

    os.mkfifo(base / "slowtok.py")  # the slow half of the pair: AutoTokenizer takes the fast one
    os.mkfifo(base / "proc.py")  # AutoProcessor's: AutoTokenizer never opens it
    (base / "procbig.py").write_text("#" * (MAX_MODULE_BYTES + 1))  # imported by proc.py only: not opened by AutoTokenizer
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"base:\n  path: {base / 'model.gguf'}\n  trust_remote_code: true\n{LAYOUT}output:\n  dir: {tmp_path / 'out'}\n"
                      "  dtype: float32\n")
    (base / "tokenizer_config.json").write_text(json.dumps({"auto_map": {"AutoTokenizer": ["slowtok.Tok", "tok.Tok"],
                                                                         "AutoProcessor": "proc.Proc",
                                                                         "AutoImageProcessor": "procbig.P"}}))
    warned = [f"the base's tokenizer names its own code in procbig.py, which is {MAX_MODULE_BYTES + 1:,} bytes, more than the "
              f"{MAX_MODULE_BYTES:,} a Python module is read or copied up to: not copied, so code that needs it (auto_map "
              "AutoImageProcessor) will not load until a module of that name is beside it",
              "the base's tokenizer names its own code in proc.py, which is a named pipe, not a regular file: not copied, so "
              "code that needs it (auto_map AutoProcessor) will not load",
              "the base's tokenizer names its own code in slowtok.py, which is a named pipe, not a regular file: not copied, "
              "so code that needs it (auto_map AutoTokenizer's slow entry) will not load"]
    for command in (["validate"], ["plan"], ["apply", "--quiet"]):
        done = cli(command[0], str(recipe), *command[1:])
        said = " ".join((done.stdout + done.stderr).split())
        assert done.returncode == 0 and all(w in said for w in warned), (command, done.stdout, done.stderr)
        assert "the output's tokenizer will not load" not in said, (command, done.stdout, done.stderr)  # it does load
    assert {p.name for p in (tmp_path / "out").glob("*.py")} == {"helper.py", "tok.py"}  # the tokenizer loaded, its code carried


def test_validate_and_plan_give_the_uncarried_tokenizer_code_as_the_warning_apply_gives(llama, tmp_path):
    """trial121 F3: validate and plan said apply's "warning:" about tokenizer code it will not copy as a "note:", so a
    reader scanning validate for warnings saw none. All three give it as a warning; plan --json lists it under warnings."""
    base = base_with(llama, tmp_path, {"tok.py": '"""Example:\n    from ./tools import helper\n"""\n'},
                     tokenizer_map={"AutoTokenizer": [None, "tok.Tok"]})
    recipe = recipe_for(tmp_path, base)
    text = ("the base's tokenizer names its own code in /tools.py, which is not a module name inside the base: not copied, "
            "so the output's tokenizer will not load until a module of that name is beside it")
    for command in (["validate"], ["plan"], ["apply", "--quiet"]):
        done = cli(command[0], str(recipe), *command[1:])
        lines = [line.strip() for line in (done.stdout + done.stderr).splitlines() if "/tools.py" in line]
        assert done.returncode == 0 and lines == [f"warning: {text}"], (command, done.stdout, done.stderr)
    done = cli("plan", str(recipe), "--json")
    data = json.loads(done.stdout)
    assert data["warnings"] == [text] and not [n for n in data["notes"] if "/tools.py" in n], data["notes"]


def test_a_trusted_ggufs_tokenizer_module_over_the_bound_is_refused_as_it_cannot_be_checked(llama, tmp_path, capsys):
    """A module transformers opens for a trusted GGUF's tokenizer (tok.py's helper.py) one byte over the bound was waved
    through unread, so its own imports were never checked: a named pipe behind it hung apply, a link leading out ran an
    outside file, a 1 GiB one was read whole. It is refused by validate, plan and apply; a folder base is warned of it."""
    import os

    from test_gguf_metadata import write_llama_gguf

    from midus_surgery.io.tokenizer_files import MAX_MODULE_BYTES

    base = tmp_path / "gb"
    base.mkdir()
    write_llama_gguf(base / "model.gguf")
    (base / "tokenizer_config.json").write_text(json.dumps({"auto_map": {"AutoTokenizer": [None, "tok.Tok"]}}))
    (base / "tok.py").write_text(TOK)
    first = "from .fifo import X\n"
    (base / "helper.py").write_text(first + "#" * (MAX_MODULE_BYTES - len(first)) + "\n")  # one byte over
    os.mkfifo(base / "fifo.py")  # transformers would open it: apply hung
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"base:\n  path: {base / 'model.gguf'}\n  trust_remote_code: true\n{LAYOUT}output:\n  dir: {tmp_path / 'out'}\n"
                      "  dtype: float32\n")
    why = (f"{base / 'tokenizer_config.json'}: its tokenizer code names 'helper.py', which is {MAX_MODULE_BYTES + 1:,} bytes, "
           f"more than the {MAX_MODULE_BYTES:,} a Python module is read up to, so it cannot be checked (its own imports are "
           "not read): transformers would run it while loading the GGUF's tokenizer during apply")
    for command in (["validate"], ["plan"], ["apply", "--quiet"]):
        code, said, err = run(capsys, command[0], str(recipe), *command[1:])
        assert code == 2 and why in err and "OK" not in said and sum("helper.py" in line for line in err.splitlines()) == 1, (command, said, err)
    assert not (tmp_path / "out").exists()

    # a folder base: its code runs only when the output is loaded, so it is warned of and not carried, as before
    fold = base_with(llama, tmp_path, {"tok.py": TOK}, tokenizer_map={"AutoTokenizer": [None, "tok.Tok"]})
    shutil.copy(base / "helper.py", fold / "helper.py")
    done = cli("validate", str(recipe_for(tmp_path, fold)))
    assert done.returncode == 0 and (f"helper.py, which is {MAX_MODULE_BYTES + 1:,} bytes, more than the {MAX_MODULE_BYTES:,} "
                                     "a Python module is read or copied up to: not copied") in done.stdout + done.stderr, done


def test_a_bare_string_autotokenizer_entry_is_refused_on_a_trusted_gguf_and_warned_of_on_a_folder(llama, tmp_path, capsys):
    """transformers 5 indexes a bare-string AutoTokenizer entry as a [slow, fast] pair: "t.Tok"[1] is ".", so it reads and
    runs the file .py; the GGUF check took a string to open nothing, and a .py linked out of the base ran outside code
    during apply. A trusted GGUF with such an entry is refused; a folder base is warned of it, and .py is named."""
    from test_gguf_metadata import write_llama_gguf

    from midus_surgery.io.tokenizer_files import auto_tokenizer_files, tokenizer_code_files

    outside = tmp_path / "outside.py"
    marker = tmp_path / "RAN"
    outside.write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    base = tmp_path / "gb"
    base.mkdir()
    write_llama_gguf(base / "model.gguf")
    (base / "tokenizer_config.json").write_text(json.dumps({"auto_map": {"AutoTokenizer": "t.Tok"}}))
    (base / ".py").symlink_to(outside)
    assert auto_tokenizer_files(base) == [".py"]
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"base:\n  path: {base / 'model.gguf'}\n  trust_remote_code: true\n{LAYOUT}output:\n  dir: {tmp_path / 'out'}\n"
                      "  dtype: float32\n")
    why = (f"{base / 'tokenizer_config.json'}: auto_map's AutoTokenizer entry is one string ('t.Tok'), not a [slow, fast] "
           "pair: transformers would read the module named by its second character while loading the GGUF's tokenizer")
    for command in (["validate"], ["plan"], ["apply", "--quiet"]):
        code, said, err = run(capsys, command[0], str(recipe), *command[1:])
        assert code == 2 and why in err and "OK" not in said, (command, said, err)
    assert not marker.exists() and not (tmp_path / "out").exists()

    # a folder base: warned of, in the same words by validate, plan and apply; .py is named (and left, as a link out)
    fold = base_with(llama, tmp_path, {"t.py": "X = 1\n"}, tokenizer_map={"AutoTokenizer": "t.Tok"})
    (fold / ".py").write_text("Y = 2\n")
    assert tokenizer_code_files(fold / "tokenizer_config.json") == [".py", "t.py"]
    assert auto_tokenizer_files(fold) == [".py"]
    (fold / "tokenizer_config.json").write_text(json.dumps({"auto_map": {"AutoTokenizer": "tok.Tok"}}))
    assert auto_tokenizer_files(fold) == []  # "o": transformers fails before it opens a file
    (fold / "tokenizer_config.json").write_text(json.dumps({"auto_map": {"AutoTokenizer": "t.Tok"}}))
    text = ("warning: the base's tokenizer_config.json gives auto_map AutoTokenizer as one string ('t.Tok'), not a [slow, "
            "fast] pair: the output's tokenizer will not load as meant (transformers reads the module named by its second "
            "character)")
    for command in (["validate"], ["plan"], ["apply", "--quiet"]):
        done = cli(command[0], str(recipe_for(tmp_path, fold)), *command[1:])
        lines = [line.strip() for line in (done.stdout + done.stderr).splitlines() if "one string" in line]
        assert done.returncode == 0 and lines == [text], (command, done.stdout, done.stderr)
    assert (tmp_path / "out" / ".py").is_file() and (tmp_path / "out" / "t.py").is_file()  # named, so carried


@pytest.mark.parametrize("case", ["folder-reference", "out-of-range-number"])
def test_a_trusted_gguf_runs_no_tokenizer_code_from_outside_the_base(tmp_path, capsys, case):
    """Two ways transformers ran code from outside a trusted GGUF's folder during apply, with every check silent:
    folder-reference: a "path--module.Class" reference, which transformers reads from that folder when it exists (the
    check took every "--" for another Hub repository's and looked no further); out-of-range-number: a 1e400 anywhere in
    tokenizer_config.json, which transformers' plain json reads as infinity, made the stricter reader skip the whole file,
    so tok.py, a link out of the base, was never checked. Both are refused before transformers reads anything."""
    from test_gguf_metadata import write_llama_gguf

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    marker = tmp_path / "RAN"
    for folder in (elsewhere,):
        (folder / "tok.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\nclass Tok: pass\n")
    base = tmp_path / "gb"
    base.mkdir()
    write_llama_gguf(base / "model.gguf")
    if case == "folder-reference":
        config = {"auto_map": {"AutoTokenizer": [None, f"{elsewhere}--tok.Tok"]}}
        why = (f"{base / 'tokenizer_config.json'}: auto_map's AutoTokenizer entry names code outside the base "
               f"('{str(elsewhere)[:40]}")  # the reference, shortened to 160 characters
    else:
        (base / "tok.py").symlink_to(elsewhere / "tok.py")
        config = {"model_max_length": 1e400, "auto_map": {"AutoTokenizer": [None, "tok.Tok"]}}
        why = f"{base / 'tokenizer_config.json'}: its tokenizer code names 'tok.py', which is a link leading out of the base"
    (base / "tokenizer_config.json").write_text(json.dumps(config).replace("Infinity", "1e400"))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"base:\n  path: {base / 'model.gguf'}\n  trust_remote_code: true\n{LAYOUT}output:\n  dir: {tmp_path / 'out'}\n"
                      "  dtype: float32\n")
    for command in (["validate"], ["plan"], ["apply", "--quiet"]):
        code, said, err = run(capsys, command[0], str(recipe), *command[1:])
        assert code == 2 and why in err and "OK" not in said, (command, said, err)
        assert "transformers would" in err and len(err.strip().splitlines()) <= 2, err  # one line (validate: under INVALID)
        assert case != "folder-reference" or "(remove the entry to load the GGUF's own tokenizer, or set base.trust_remote_code: false)" in err
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_a_trusted_ggufs_tokenizer_that_fails_to_load_is_warned_of_by_apply_as_by_validate(tmp_path):
    """tok.py imports gone.py, which the base lacks: validate and plan warned of gone.py, apply only said "no tokenizer
    written" (it returned before the code warnings). apply now gives validate's warning too."""
    from test_gguf_metadata import write_llama_gguf

    base = tmp_path / "gb"
    base.mkdir()
    write_llama_gguf(base / "model.gguf")
    (base / "tokenizer_config.json").write_text(json.dumps({"auto_map": {"AutoTokenizer": [None, "tok.Tok"]}}))
    (base / "tok.py").write_text("from .gone import X\n" + TOK)
    (base / "helper.py").write_text("VOCAB = {f't{i}': i for i in range(32)}\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"base:\n  path: {base / 'model.gguf'}\n  trust_remote_code: true\n{LAYOUT}output:\n  dir: {tmp_path / 'out'}\n"
                      "  dtype: float32\n")
    text = ("warning: the base's tokenizer names its own code in gone.py, which is not a file in the base directory: not "
            "copied, so the output's tokenizer will not load until a module of that name is beside it")
    for command in (["validate"], ["plan"], ["apply", "--quiet"]):
        done = cli(command[0], str(recipe), *command[1:])
        lines = [line.strip() for line in (done.stdout + done.stderr).splitlines() if "gone.py" in line and "names its own" in line]
        assert done.returncode == 0 and lines == [text], (command, done.stdout, done.stderr)


def test_a_relative_import_with_a_byte_order_mark_is_carried_and_warned_of_for_the_hub(llama, tmp_path, capsys):
    """helper.py (which tok.py imports relatively) starting with a UTF-8 byte-order mark was refused on a
    trusted GGUF and left out of a folder base's output, though transformers loads it from a folder: only the module an
    auto_map entry names is parsed there (check_imports' ast.parse fails on the mark), and importlib, which runs a
    relative import, strips it. It is carried now, with a warning: transformers' Hub branch parses every module it
    fetches, so the same output read from the Hub (an offline cache snapshot of it here) fails on the mark."""
    from transformers import AutoTokenizer

    warned = "the base's code helper.py starts with a UTF-8 byte-order mark: copied, and a load of the output from its folder runs it"
    base = base_with(llama, tmp_path, {"tok.py": TOK}, tokenizer_map={"AutoTokenizer": [None, "tok.Tok"]})
    (base / "helper.py").write_bytes(b"\xef\xbb\xbf" + b"VOCAB = {f't{i}': i for i in range(32)}\n")
    assert type(AutoTokenizer.from_pretrained(base, trust_remote_code=True)).__name__ == "Tok"  # transformers loads it
    for command in (["validate"], ["plan"], ["plan", "--json"], ["apply", "--quiet"]):
        code, said, err = run(capsys, command[0], str(recipe_for(tmp_path, base)), *command[1:])
        assert code == 0 and (said + err).count(warned) == 1 and "not copied" not in said + err, (command, said, err)
    assert (tmp_path / "out" / "helper.py").read_bytes().startswith(b"\xef\xbb\xbf") and (tmp_path / "out" / "tok.py").is_file()
    assert type(AutoTokenizer.from_pretrained(tmp_path / "out", trust_remote_code=True)).__name__ == "Tok"
    # the warning's claim: the output published, read from the Hub (a cache snapshot, offline), does not load
    hub = tmp_path / "hf" / "hub" / "models--someone--midus-out"
    shutil.copytree(tmp_path / "out", hub / "snapshots" / ("a" * 40))
    (hub / "refs").mkdir()
    (hub / "refs" / "main").write_text("a" * 40)
    load = ("import sys\nfrom transformers import AutoTokenizer\ntry:\n    AutoTokenizer.from_pretrained('someone/midus-out', "
            "trust_remote_code=True)\nexcept SyntaxError as exc:\n    print('SyntaxError', exc)\n")
    hub_load = subprocess.run([sys.executable, "-c", load], capture_output=True, text=True, timeout=300,
                              env=dict(os.environ, HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1"))
    assert "SyntaxError" in hub_load.stdout and "U+FEFF" in hub_load.stdout, (hub_load.stdout, hub_load.stderr[-2000:])

    gguf, recipe = trusted_gguf_beside(base, tmp_path)
    for command in (["validate"], ["plan"], ["apply", "--quiet"]):
        code, said, err = run(capsys, command[0], str(recipe), *command[1:])
        assert code == 0 and (said + err).count(warned) == 1, (command, said, err)
    assert {p.name for p in (tmp_path / "gout").glob("*.py")} == {"helper.py", "tok.py"}
    assert type(AutoTokenizer.from_pretrained(tmp_path / "gout", trust_remote_code=True)).__name__ == "Tok"

    (base / "tokenizer_config.json").unlink()  # config.json's code: the helper's mark is no bar there either
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoTokenizer": [None, "tok.Tok"]}}))
    code, said, err = run(capsys, "validate", str(recipe_for(tmp_path, base)))
    assert code == 0 and "(tok.py, helper.py, named by" in said and warned in said, (said, err)


def test_a_module_with_a_byte_order_mark_is_warned_of_on_a_folder_and_refused_where_transformers_runs_it(llama, tmp_path, capsys):
    """A tok.py starting with a UTF-8 byte-order mark passed every check, and transformers failed on it with "invalid
    non-printable character U+FEFF" naming no file (it reads modules as plain UTF-8, then ast.parse). The one rule holds
    it as not loadable: a folder's tokenizer code is warned of and not copied, a trusted GGUF's and config.json's refused."""

    base = base_with(llama, tmp_path, {"helper.py": "VOCAB = {f't{i}': i for i in range(32)}\n"},
                     tokenizer_map={"AutoTokenizer": [None, "tok.Tok"]})
    (base / "tok.py").write_bytes(b"\xef\xbb\xbf" + TOK.encode())
    bom = "tok.py, which starts with a UTF-8 byte-order mark (U+FEFF) that transformers does not strip when it reads a module"
    for command in (["validate"], ["plan"], ["apply", "--quiet"]):
        done = cli(command[0], str(recipe_for(tmp_path, base)), *command[1:])
        assert done.returncode == 0 and f"names its own code in {bom}: not copied" in done.stdout + done.stderr, (command, done)
    assert not (tmp_path / "out" / "tok.py").exists()

    gguf, recipe = trusted_gguf_beside(base, tmp_path)
    for command in (["validate"], ["plan"], ["apply", "--quiet"]):
        code, said, err = run(capsys, command[0], str(recipe), *command[1:])
        assert code == 2 and f"its tokenizer code names '{bom[:6]}', which starts with a UTF-8 byte-order mark" in err, (command, err)
    assert not (tmp_path / "gout").exists()

    (base / "tokenizer_config.json").unlink()
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoTokenizer": [None, "tok.Tok"]}}))
    code, said, err = run(capsys, "validate", str(recipe_for(tmp_path, base)))
    assert code == 2 and "config.json: auto_map names 'tok.Tok', but 'tok.py' starts with a UTF-8 byte-order mark" in err, err


def test_the_uncarried_code_warning_blames_autotokenizer_only_for_a_module_it_opens(tmp_path):
    """The labels of the uncarried-code warning read AutoTokenizer's entry by their own rule, not by the one
    transformers follows (entry_module): a bare "t.Tok" blamed t.py on it (it opens .py), a three-item list its third
    item (never opened), and a bare ".Tok" (whose second character "T" opens nothing) named and carried .py."""
    from midus_surgery.emit.emitter import tokenizer_code_left
    from midus_surgery.io.tokenizer_files import tokenizer_code_files

    def left(auto_map, files: dict[str, bytes]) -> list[str]:
        base = tmp_path / str(len(list(tmp_path.iterdir())))
        base.mkdir()
        (base / "tokenizer_config.json").write_text(json.dumps({"auto_map": auto_map}))
        for name, data in files.items():
            (base / name).write_bytes(data)
        return [line.split(": not copied, so ")[1] for line in tokenizer_code_left(base) if "names its own code" in line]

    assert left({"AutoTokenizer": "t.Tok"}, {"t.py": b"X = '\xe9'\n", ".py": b"Y = 1\n"}) == [
        "code that needs it will not load until a module of that name is beside it"]
    assert left({"AutoTokenizer": ["a.A", "b.B", "c.C"]}, {"a.py": b"", "b.py": b""}) == [
        "code that needs it will not load until a module of that name is beside it"]  # c.py: nothing opens it
    assert left({"AutoTokenizer": ["a.A", "b.B"]}, {"b.py": b""}) == [
        "code that needs it (auto_map AutoTokenizer's slow entry) will not load until a module of that name is beside it"]
    assert left({"AutoTokenizer": [None, "b.B"], "AutoProcessor": "b.P"}, {}) == [
        "the output's tokenizer will not load until a module of that name is beside it"]
    base = tmp_path / "dot"
    base.mkdir()
    (base / "tokenizer_config.json").write_text(json.dumps({"auto_map": {"AutoTokenizer": ".Tok"}}))
    (base / ".py").write_text("Y = 1\n")
    assert tokenizer_code_files(base / "tokenizer_config.json") == []  # "T": transformers opens no file
    (base / "tokenizer_config.json").write_text(json.dumps({"auto_map": {"AutoTokenizer": [None, ".Tok"]}}))
    assert tokenizer_code_files(base / "tokenizer_config.json") == [".py"]  # as a pair's slot it opens .py


@pytest.mark.slow
@pytest.mark.parametrize("case", ["bom", "latin-1", "deep"])
def test_validate_and_plan_warn_as_apply_does_of_a_gguf_tokenizer_config_transformers_cannot_read(tmp_path, case):
    """A GGUF base's tokenizer_config.json with a UTF-8 byte-order mark, a byte that is not UTF-8 or nesting
    too deep for json: validate and plan said OK without a word, and apply then wrote no tokenizer (transformers reads the
    file with plain json.load to load the GGUF's tokenizer, and fails). The dry run now warns of it too."""
    from test_gguf_metadata import write_llama_gguf

    base = tmp_path / "gb"
    base.mkdir()
    write_llama_gguf(base / "model.gguf")
    data = {"bom": b"\xef\xbb\xbf{}", "latin-1": b'{"a": "\xe9"}', "deep": b'{"x": ' + b"[" * 5000 + b"]" * 5000 + b"}"}[case]
    (base / "tokenizer_config.json").write_bytes(data)
    why = {"bom": "Unexpected UTF-8 BOM", "latin-1": "'utf-8' codec can't decode byte 0xe9", "deep": "maximum recursion depth"}[case]
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"base:\n  path: {base / 'model.gguf'}\n{LAYOUT}output:\n  dir: {tmp_path / 'out'}\n  dtype: float32\n")
    for command in (["validate"], ["plan"], ["plan", "--json"]):
        done = cli(command[0], str(recipe), *command[1:])
        assert done.returncode == 0, (command, done.stdout, done.stderr)
        said = json.loads(done.stdout)["warnings"] if "--json" in command else [
            line.strip().removeprefix("warning: ") for line in done.stdout.splitlines() if "warning:" in line]
        assert len(said) == 1 and said[0].startswith(
            f"apply will write no tokenizer (the GGUF's tokenizer_config.json cannot be read: {why}"), (command, said)
    done = cli("apply", str(recipe), "--quiet")
    assert done.returncode == 0 and f"no tokenizer written (the GGUF's could not be read: {why}" in done.stderr, done.stderr
