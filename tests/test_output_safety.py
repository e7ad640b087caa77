"""Output safety: nothing the tool writes deletes or replaces a file it did not write itself.

Each case ran with exit 0 and deleted the user's files before the rule in output_dir.py:
`apply --overwrite` into the base, a parent of it, the current directory, a symlink to the base
or the recipe itself; `train` exporting over the project directory, over `init_from` or over the
config's own folder. Every refusal happens before any work, and leaves every input byte-identical.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from tiny_configs import tiny_config
from train_fixtures.tiny import make_model_dir, write_config, write_corpus
from transformers import AutoModelForCausalLM

from midus_surgery.cli import main
from midus_surgery.io.output_dir import (
    MARKER,
    OutputError,
    atomic_directory,
    check_output_dir,
    clean_leftovers,
    not_written_in_run_dir,
    read_marker,
    record_written_files,
    remove_own_directory,
    use_workspace,
    write_marker,
)

REPO = Path(__file__).resolve().parents[1]


def tree_digest(root: Path) -> dict[str, str]:
    """Every file under ``root`` (symlinks not followed) -> sha256 of its bytes."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.is_symlink():
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture()
def project(tmp_path, monkeypatch):
    """A user's project: a base model, a recipe next to it, run from the project folder."""
    root = tmp_path / "project"
    base = root / "base"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_config("llama")).save_pretrained(base)
    (root / "notes.txt").write_text("the user's own file\n")
    monkeypatch.chdir(root)
    return root


def recipe(root: Path, out: str, name: str = "recipe.yaml") -> Path:
    path = root / name
    path.write_text(f"base:\n  path: base\nlayout:\n  interleave:\n    after_every: 2\n    kind: transformer\noutput:\n  dir: {out}\n  dtype: float32\n")
    return path


def apply(*args: str) -> int:
    return main(["apply", *args, "--quiet"])


@pytest.fixture()
def no_planning(monkeypatch):
    """apply must refuse its output before it plans (the plan traces the model: seconds on a real one)."""
    import midus_surgery.compiler.planner as planner

    def planned_first(*args, **kwargs):
        raise AssertionError("apply planned before it checked its output")

    monkeypatch.setattr(planner, "plan_for_apply", planned_first)


@pytest.mark.parametrize("out", ["notes.txt/sub", "/proc/midus-no-such/out"])
def test_an_output_that_cannot_be_made_is_one_line_and_exit_2(project, capsys, out, no_planning):
    """An output folder that cannot be made (under a user's file; where mkdir says "no such file",
    as in /proc) is one line naming the path asked for, not an OSError traceback."""
    r = recipe(project, "out")
    before = tree_digest(project.parent)
    assert apply(str(r), "--out", out) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot write {project / out if not out.startswith('/') else out}: "), err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    if out.startswith("/proc"):  # the reason validate gives, not the probe's "No such file or directory" (trial64)
        assert "/proc is on a proc file system, the kernel's view of the system, not a disk" in err, err
    assert tree_digest(project.parent) == before


@pytest.mark.parametrize("out", ["base", ".", "..", "base/sub", "recipe.yaml", "notes.txt"])
def test_apply_refuses_inputs_and_their_folders_even_with_overwrite(project, out, capsys, no_planning):
    """The base, a folder inside it, the current directory, its parent, the recipe itself, a user's file."""
    r = recipe(project, "out")
    before = tree_digest(project.parent)
    assert apply(str(r), "--out", out, "--overwrite") == 2
    err = capsys.readouterr().err
    assert "error: output" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert tree_digest(project.parent) == before
    assert not [p for p in project.parent.rglob(".*partial*")]


def test_apply_refuses_a_symlink_to_the_base(project, capsys):
    (project / "link").symlink_to(project / "base")
    r = recipe(project, "out")
    before = tree_digest(project)
    assert apply(str(r), "--out", "link", "--overwrite") == 2
    assert "symlink" in capsys.readouterr().err
    assert tree_digest(project) == before and (project / "link").is_symlink()


def test_apply_refuses_a_path_that_resolves_through_a_symlink_to_the_base(project, capsys):
    (project / "alias").symlink_to(project)  # alias/base is the base, through a linked parent
    r = recipe(project, "out")
    before = tree_digest(project)
    assert apply(str(r), "--out", "alias/base", "--overwrite") == 2
    assert "is the base model" in capsys.readouterr().err
    assert tree_digest(project) == before


def test_apply_replaces_only_its_own_output(project, capsys):
    r = recipe(project, "out")
    assert apply(str(r)) == 0
    out = project / "out"
    assert read_marker(out)["kind"] == "apply"
    # its own output: needs --overwrite, then is replaced whole
    assert apply(str(r)) == 2 and "pass --overwrite" in capsys.readouterr().err
    assert sorted(read_marker(out)["files"]) == sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.name != ".midus-surgery")
    assert apply(str(r), "--overwrite") == 0  # as apply wrote it: replaced
    # a file apply wrote, edited since (the model card made the user's own): the replacement is refused
    card = (out / "README.md").read_text()
    (out / "README.md").write_text(card + "\nMy evaluation notes.\n")
    capsys.readouterr()
    assert apply(str(r), "--overwrite") == 2
    assert "also holds what midus-surgery did not write there: README.md (changed since midus-surgery wrote it)" in capsys.readouterr().err
    assert (out / "README.md").read_text().endswith("My evaluation notes.\n")
    (out / "README.md").write_text(card)  # as it was: replaced again
    assert apply(str(r), "--overwrite") == 0
    # what the user put inside it since, at any depth, is never deleted: the replacement is refused
    (out / "NOTES.md").write_text("my notes")
    (out / "runs" / "r1").mkdir(parents=True)
    (out / "runs" / "r1" / "checkpoint.txt").write_text("a day of training")
    (out / "link").symlink_to(project)
    before = tree_digest(project)
    capsys.readouterr()
    assert apply(str(r), "--overwrite") == 2
    err = capsys.readouterr().err
    assert "also holds what midus-surgery did not write there: NOTES.md, link, runs/r1/checkpoint.txt; replacing it would delete them" in err
    assert tree_digest(project) == before
    for extra in ("NOTES.md", "link", "runs"):
        (out / extra).unlink() if extra != "runs" else shutil.rmtree(out / extra)
    assert apply(str(r), "--overwrite") == 0
    # a directory the tool did not write: never, not even with --overwrite
    user = project / "mine"
    user.mkdir()
    (user / "important.txt").write_text("keep me")
    capsys.readouterr()
    assert apply(str(r), "--out", "mine", "--overwrite") == 2
    assert "not written by midus-surgery" in capsys.readouterr().err
    assert (user / "important.txt").read_text() == "keep me"
    # an empty directory holds nothing to lose
    (project / "empty").mkdir()
    assert apply(str(r), "--out", "empty") == 0 and (project / "empty" / "config.json").is_file()


@pytest.mark.parametrize(("kind", "command"), [("train run", "train (its run directory)"), ("train export", "train (its export)"),
                                               ("fetch_corpus", "tools/fetch_corpus.py"), ("fetch_smollm2", "tools/fetch_smollm2.py"),
                                               ("workspace", "a tool (its scratch folder)"), ("analysis", "analyze")])
def test_apply_overwrite_never_replaces_another_commands_output(project, kind, command, capsys):
    """A training run, a fetched corpus or model: written by midus-surgery, but not by `apply`."""
    other = project / "other"
    other.mkdir()
    write_marker(other, kind)
    (other / "metrics.jsonl").write_text("a week of training\n")
    assert apply(str(recipe(project, "out")), "--out", "other", "--overwrite") == 2
    assert f"was written by midus-surgery {command}, not by apply;" in capsys.readouterr().err  # the command's name (trial52: "analysis")
    assert (other / "metrics.jsonl").read_text() == "a week of training\n"


def test_no_output_goes_inside_the_folders_train_writes_in_its_run_directory(tmp_path):
    """analyze --out RUN/checkpoints/x was written, and the run then refused to resume until it was moved (trial70 F8).
    A folder of one's own beside them (RUN/analysis) is fine: train keeps what it did not write there."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    write_marker(run, "train run")
    for inside in ("checkpoints/x", "tensorboard/x", "final/x"):
        with pytest.raises(OutputError) as info:
            check_output_dir(run / inside, kind="analysis", reuse=True, flag=None)
        part = inside.split("/")[0]
        assert f"lies inside {run / part}, which train writes (and prunes, or rewrites) in its run directory {run}" in str(info.value)
        assert str(info.value).endswith(f"choose a directory outside {run / part}, e.g. {run / 'analysis'} beside it")  # trial77 F9
    with pytest.raises(OutputError) as info:  # the folder itself: "RUN/trace lies inside RUN/trace" (trial72 N8)
        check_output_dir(run / "trace", kind="analysis", reuse=True, flag=None)
    assert f"output {run / 'trace'} is trace/, one of the folders train writes (and prunes, or rewrites) in its run directory {run}" in str(info.value)
    assert check_output_dir(run / "analysis", kind="analysis", reuse=True, flag=None) == run / "analysis"
    assert not (run / "checkpoints" / "x").exists()


def test_a_forged_marker_from_another_tool_is_not_ours(project):
    user = project / "mine"
    user.mkdir()
    (user / MARKER).write_text(json.dumps({"tool": "something-else"}))
    with pytest.raises(OutputError, match="not written by midus-surgery"):
        check_output_dir(user, kind="apply", overwrite=True)


def test_leftovers_of_killed_runs_are_removed_but_live_ones_and_foreign_ones_kept(tmp_path):
    out = tmp_path / "model"
    dead = tmp_path / ".another-model.partial-dead0000"  # any output's leftover in the same parent
    dead.mkdir()
    (dead / "model.safetensors").write_bytes(b"x" * 100)
    # a process that has exited: its pid is free
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout
    write_marker(dead, "apply")
    marker = json.loads((dead / MARKER).read_text())
    (dead / MARKER).write_text(json.dumps({**marker, "pid": int(gone)}))
    live = tmp_path / ".model.partial-0000beef"
    live.mkdir()
    write_marker(live, "apply")  # this process: still running
    foreign = tmp_path / ".model.partial-0000cafe"
    foreign.mkdir()  # no marker: not ours
    lines = []
    with atomic_directory(out, kind="apply", report=lines.append) as tmp:
        (tmp / "x").write_text("1")
    assert not dead.exists() and live.is_dir() and foreign.is_dir()
    assert len(lines) == 1 and "a partial output that a run of midus-surgery killed before it finished left behind" in lines[0]
    assert (out / "x").read_text() == "1" and read_marker(out)["kind"] == "apply"
    assert clean_leftovers(out) == []


def test_an_empty_partial_folder_a_kill_left_before_its_marker_is_removed_once_old(tmp_path):
    """SIGKILL between mkdir and the marker's write left an empty, unmarked folder nothing removed;
    a fresh one may be a live run's about to get its marker, and one holding anything is not ours."""
    import os
    import time

    out = tmp_path / "model"
    old = time.time() - 3600
    empty_old, empty_new, full_old = (tmp_path / f".model.partial-{tag}" for tag in ("0000e000", "0000f000", "0000a000"))
    for folder in (empty_old, empty_new, full_old):
        folder.mkdir()
    (full_old / "notes.txt").write_text("mine")
    for folder in (empty_old, full_old):
        os.utime(folder, (old, old))
    assert clean_leftovers(out) == [empty_old]
    assert empty_new.is_dir() and (full_old / "notes.txt").read_text() == "mine"


def test_leftover_cleaning_keeps_a_users_folders_of_like_names_and_an_old_output_the_user_added_to(tmp_path):
    """Any hidden folder whose name held '.old-' or '.partial-' was a leftover: a user's
    `cp -r model .model.old-v1` backup (its marker copied along, its process long gone) was deleted
    with the notes put in it, and so was an empty `.vim.old-cfg`. Only the names the tool makes
    (8 hex digits) are candidates, and an old output holding more than it recorded is kept."""
    import os
    import time

    out = tmp_path / "model"
    out.mkdir()  # in place: an old output beside it is an earlier one (with nothing there, it would be put back)
    gone = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout)

    def dead_output(path: Path) -> Path:
        path.mkdir()
        (path / "model.safetensors").write_bytes(b"x")
        write_marker(path, "apply")
        record_written_files(path)
        marker = json.loads((path / MARKER).read_text())
        (path / MARKER).write_text(json.dumps({**marker, "pid": gone}))
        return path

    backup = dead_output(tmp_path / ".model.old-v1")  # the user's own copy
    (backup / "NOTES.txt").write_text("mine")
    added_to = dead_output(tmp_path / ".model.old-0123abcd")  # the tool's name, but a user's file inside
    (added_to / "NOTES.txt").write_text("mine too")
    ours = dead_output(tmp_path / ".model.old-4567cdef")
    vim = tmp_path / ".vim.old-cfg"
    vim.mkdir()
    old = time.time() - 3600
    os.utime(vim, (old, old))
    assert clean_leftovers(out) == [ours]
    assert (backup / "NOTES.txt").read_text() == "mine" and (added_to / "NOTES.txt").read_text() == "mine too" and vim.is_dir()


def test_an_output_that_appears_while_the_tool_writes_is_kept_and_so_is_the_finished_work(tmp_path):
    """The place is checked before the work (hours before, for a training run's export) and again
    just before the swap: a user's folder that appeared meanwhile was deleted with its files."""
    out = tmp_path / "model"
    with pytest.raises(OutputError) as refused, atomic_directory(out, kind="apply") as tmp:
        (tmp / "x").write_text("new")
        out.mkdir()
        (out / "IMPORTANT.txt").write_text("mine")
    assert (out / "IMPORTANT.txt").read_text() == "mine"
    [kept] = [p for p in tmp_path.iterdir() if p.name.startswith("model.new-")]
    assert (kept / "x").read_text() == "new" and read_marker(kept)["kind"] == "apply"
    assert str(refused.value) == (f"{out} appeared, holding files not written by midus-surgery (no {MARKER} marker) since this run "
                                  f"checked it, so it was not replaced; the finished output is in {kept}: move it where you want it")

    # an earlier output of the same command, not to be replaced (no --overwrite), or to be, but with a user's file added
    for replace, added, said in ((False, False, "appeared, written by midus-surgery apply"),
                                 (True, True, "now also holds what midus-surgery did not write there (notes.txt)")):
        target = tmp_path / f"model-{replace}"
        with atomic_directory(target, kind="apply") as tmp:
            (tmp / "x").write_text("first")
        with pytest.raises(OutputError, match=re.escape(said)), atomic_directory(target, kind="apply", replace=replace) as tmp:
            (tmp / "x").write_text("second")
            if added:
                (target / "notes.txt").write_text("mine")
        assert (target / "x").read_text() == "first"
    (tmp_path / "model-True" / "notes.txt").unlink()  # as it was written: --overwrite replaces it
    with atomic_directory(tmp_path / "model-True", kind="apply", replace=True) as tmp:
        (tmp / "x").write_text("third")
    assert (tmp_path / "model-True" / "x").read_text() == "third"


def test_a_failed_write_leaves_no_partial_directory_nor_the_folders_it_made(tmp_path):
    out = tmp_path / "new" / "deeper" / "model"
    with pytest.raises(RuntimeError), atomic_directory(out, kind="apply") as tmp:
        (tmp / "half").write_text("x")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_an_output_whose_marker_records_no_files_is_neither_replaced_nor_removed(project, capsys):
    """A marker without its file list (an output of a version that did not record files, or a marker a
    user copied into their folder) said nothing about what the folder holds, and --overwrite deleted
    it whole, the user's files with it."""
    r = recipe(project, "out")
    assert apply(str(r)) == 0
    out = project / "out"
    marker = read_marker(out)
    (out / MARKER).write_text(json.dumps({k: v for k, v in marker.items() if k not in ("files", "fingerprints")}))
    (out / "my-eval.txt").write_text("the user's results")
    before = tree_digest(project)
    capsys.readouterr()
    assert apply(str(r), "--overwrite") == 2
    err = capsys.readouterr().err
    assert "does not record which files midus-surgery wrote there" in err and "move it away yourself" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(OutputError, match="does not record which files midus-surgery wrote there"):
        remove_own_directory(out)
    assert tree_digest(project) == before


def test_tools_remove_only_what_lies_in_their_own_workspace(tmp_path):
    """Benchmarks and the sweep clear their scratch outputs with remove_own_directory: only inside a
    folder use_workspace marked (or a marked output); a user's folder is refused, untouched."""
    work = use_workspace(tmp_path / "bench")
    (work / "old-run" / "sub").mkdir(parents=True)
    (work / "old-run" / "sub" / "x").write_text("scratch")
    remove_own_directory(work / "old-run")
    assert not (work / "old-run").exists()
    remove_own_directory(work / "never-made")  # nothing there: nothing to do
    user = tmp_path / "mine"
    user.mkdir()
    (user / "keep.txt").write_text("keep me")
    with pytest.raises(OutputError, match="not written by midus-surgery"):
        remove_own_directory(user)
    (tmp_path / "link").symlink_to(work)
    with pytest.raises(OutputError, match="symlink"):
        remove_own_directory(tmp_path / "link")
    with pytest.raises(OutputError, match="not written by midus-surgery"):
        use_workspace(user)  # a user's folder never becomes a workspace
    assert (user / "keep.txt").read_text() == "keep me" and work.is_dir()
    assert use_workspace(tmp_path / "bench") == work  # a workspace of this tool is reused


# --------------------------------------------------------------------------- train

@pytest.fixture()
def train_project(tmp_path, monkeypatch):
    root = tmp_path / "project"
    write_corpus(root / "corpus", files=2, sentences_per_file=30)
    make_model_dir(root / "model", with_plan=False)
    (root / "notes.txt").write_text("the user's own file\n")
    monkeypatch.chdir(root)
    return root


def train_config(root: Path, run_dir: str = "runs/a", **extra) -> Path:
    extra = {"tokens": 256, "micro_batch_size": 2, "data.block_size": 16, "log.tensorboard": False, "log.plot": False,
             "eval.at_start": False, **extra}
    return write_config(root / "run.yaml", root / "model", root / run_dir, root / "corpus", root / "cache", **extra)


@pytest.mark.parametrize("field,value,what", [
    ("export.dir", "..", "contains"),            # the parent of the project: deleted everything
    ("export.dir", ".", "contains init_from"),     # the config's own folder
    ("export.dir", "model", "is init_from"),      # replaced the starting weights
    ("export.dir", "corpus", "is data"),
    ("export.dir", "notes.txt", "is the config file|existing file|data"),
    ("export.dir", "runs/a", "is the run directory"),
    ("run_dir", "model", "is init_from"),
    ("run_dir", "corpus/run", "is inside data"),
])
def test_train_refuses_outputs_over_its_inputs(train_project, field, value, what, capsys):
    cfg = train_config(train_project, **{field: value})
    before = tree_digest(train_project.parent)
    code = main(["train", str(cfg), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    assert "run.yaml:" in err and any(w in err for w in what.split("|")), err
    assert tree_digest(train_project.parent) == before


def test_train_follows_a_linked_run_dir_and_holds_its_target_to_the_rules(train_project, capsys):
    """A run_dir (or a parent of it) linked elsewhere, as to a scratch disk, is written through; a
    link whose target is an input is refused like the input itself."""
    scratch = train_project.parent / "scratch"
    scratch.mkdir()
    (train_project / "runs").symlink_to(scratch)
    assert main(["train", str(train_config(train_project)), "--quiet"]) == 0
    assert read_marker(scratch / "a")["kind"] == "train run" and (scratch / "a" / "final" / "model.safetensors").is_file()
    (train_project / "to-model").symlink_to(train_project / "model")
    before = tree_digest(train_project / "model")
    assert main(["train", str(train_config(train_project, "to-model")), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "run_dir" in err and "is init_from" in err and "Traceback" not in err, err
    assert tree_digest(train_project / "model") == before


def test_a_run_dir_or_cache_the_system_will_not_make_is_one_line(train_project, capsys):
    # a run_dir: found by the probe before any work, located in the config
    assert main(["train", str(train_config(train_project, "/proc/midus-no-such/run")), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "run.yaml:" in err and "run_dir: cannot write /proc/midus-no-such/run: " in err and len(err.strip().splitlines()) == 1, err
    # a token cache on /proc: refused before any work, the dry run too, saying why (trial99 M5: the dry run passed /proc/self
    # and the start said only "No such file or directory")
    for cache in ("/proc/midus-no-such/cache", "/proc/self"):
        config = str(train_config(train_project, **{"data.cache_dir": cache}))
        for argv in (["train", config, "--quiet"], ["train", config, "--dry-run"],
                     ["eval", "model", "--data", "corpus", "--cache-dir", cache, "--quiet"]):
            assert main(argv) == 2, argv
            err = capsys.readouterr().err
            assert f"the token cache {Path(cache).resolve()} cannot be made: /proc" in err, err
            assert "is on a proc file system, the kernel's view of the system, not a disk" in err and len(err.strip().splitlines()) == 1, err
            assert ("data.cache_dir: " in err) == (argv[0] == "train"), err
    assert not (train_project / "runs").exists()


def test_a_token_cache_folder_named_with_blanks_at_an_end_is_refused_wherever_it_is_named(train_project, capsys, monkeypatch):
    """Only --cache-dir refused a cache folder named "tok " to make: $MIDUS_CACHE and data.cache_dir made it, and
    data.cache_dir "tok\tx" a folder with a tab in its name (trial154 M1). A trailing no-break space is a blank too (L5)."""
    for cache in ("tok ", "tok\xa0"):
        config = str(train_config(train_project, **{"data.cache_dir": cache}))
        for argv in (["train", config, "--dry-run"], ["train", config, "--quiet"]):
            assert main(argv) == 2, argv
            err = capsys.readouterr().err
            assert "data.cache_dir: the token cache " in err and f"would make a folder named {cache!r}, with blanks" in err, err
        monkeypatch.setenv("MIDUS_CACHE", str(train_project / cache))  # said as the variable's, not the config's (trial156 2)
        for argv in (["eval", "model", "--data", "corpus", "--quiet"], ["train", str(train_config(train_project, **{"data.cache_dir": None})), "--dry-run"]):
            assert main(argv) == 2
            err = capsys.readouterr().err
            assert err.startswith(f"error: $MIDUS_CACHE ({str(train_project / cache)!r}): the token cache ") and "run.yaml" not in err, err
            assert f"would make a folder named {cache!r}, with blanks at its start or end" in err, err
        monkeypatch.delenv("MIDUS_CACHE")
    assert main(["train", str(train_config(train_project, **{"data.cache_dir": "tok\tx"})), "--dry-run"]) == 2
    assert "data.cache_dir: the token cache cannot be made: 'tok\\tx' holds the control character '\\t'" in capsys.readouterr().err
    assert sorted(p.name for p in train_project.iterdir() if p.name.startswith("tok")) == []
    # a link to nothing (a disk not mounted): followed, the cache was written on the disk that holds the mount point (trial158 F2)
    (train_project / "gone-disk").symlink_to(train_project / "mnt" / "disk")
    for argv in (["train", str(train_config(train_project, **{"data.cache_dir": "gone-disk/tokens"})), "--dry-run"],
                 ["eval", "model", "--data", "corpus", "--cache-dir", "gone-disk/tokens", "--quiet"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"{train_project / 'gone-disk'} is a link to {train_project / 'mnt' / 'disk'}, which does not exist (a disk not mounted? " \
            "make that folder first if it is meant)" in err, err
    assert not (train_project / "mnt").exists()
    (train_project / "loop").symlink_to(train_project / "loop")  # one line, not pathlib's traceback (trial159 F1)
    assert main(["train", str(train_config(train_project, **{"data.cache_dir": "loop/tokens"})), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert ("leads back to itself" in err or "points back at itself" in err) and len(err.strip().splitlines()) == 1, err
    with pytest.raises(SystemExit) as usage:
        main(["eval", "model", "--data", "corpus", "--cache-dir", "loop/tokens", "--quiet"])
    assert usage.value.code == 2 and "'loop/tokens' reaches a link that leads back to itself" in capsys.readouterr().err
    # a cache folder reached through one named badly that does not exist: the folder checked is the folder written, and
    # the run made the badly named one on its way there (trial157)
    assert main(["train", str(train_config(train_project, "runs/t", **{"data.cache_dir": "tok\tx/../tokens"})), "--quiet"]) == 0
    assert (train_project / "tokens").is_dir() and not (train_project / "tok\tx").exists()
    for name in ("tok ", "tok\tx"):  # a folder that exists is the user's to name, and taken (a cache an earlier version filled: trial156 1)
        (train_project / name).mkdir()
        assert main(["train", str(train_config(train_project, **{"data.cache_dir": name})), "--dry-run"]) == 0


@pytest.mark.parametrize("cache", ["model/tokens", "corpus", "corpus/cache"])
def test_the_token_cache_may_not_be_written_into_the_model_or_the_data(train_project, cache, capsys):
    cfg = train_config(train_project, **{"data.cache_dir": cache})
    before = tree_digest(train_project)
    assert main(["train", str(cfg), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "data.cache_dir" in err and "the token cache" in err and "Traceback" not in err
    assert tree_digest(train_project) == before
    assert main(["eval", "model", "--data", "corpus", "--cache-dir", cache, "--quiet"]) == 2
    assert "the token cache" in capsys.readouterr().err
    assert tree_digest(train_project) == before


def test_a_cache_behind_a_hidden_folder_may_lie_in_the_folder_of_data_files(train_project, monkeypatch, capsys):
    """`eval MODEL --data ~/held.txt` with the default cache (~/.cache/midus-surgery/tokens) was refused: the
    cache lay in the data file's folder (trial48). A hidden folder there writes nothing beside the user's
    files, and the corpus reader never reads one. A folder given whole as data still may not hold the cache."""
    monkeypatch.delenv("MIDUS_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(train_project / "corpus"))
    files = sorted(str(p.relative_to(train_project)) for p in (train_project / "corpus").iterdir())
    before = {f: (train_project / f).read_bytes() for f in files}
    assert main(["eval", "model", "--data", *files, "--quiet"]) == 0, capsys.readouterr().err
    assert (train_project / "corpus" / ".cache" / "midus-surgery" / "tokens").is_dir()
    assert {f: (train_project / f).read_bytes() for f in files} == before
    assert sorted(p.name for p in (train_project / "corpus").iterdir() if not p.name.startswith(".")) == sorted(Path(f).name for f in files)
    capsys.readouterr()
    assert main(["eval", "model", "--data", "corpus", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "is inside data (corpus)" in err and "(--cache-dir for eval and analyze, data.cache_dir for train, or MIDUS_CACHE)" in err, err


def test_the_token_cache_may_not_be_written_into_the_folder_of_data_given_as_files(train_project, capsys):
    """`--data corpus/*.txt` reaches the tool as the files the shell expanded: the cache was checked against
    each file, never their folder, and eval, analyze and train wrote into the user's data folder (trial40)."""
    files = sorted(str(p.relative_to(train_project)) for p in (train_project / "corpus").iterdir())
    cfg = train_config(train_project, **{"data.cache_dir": "corpus/c", "data.train": files})
    before = tree_digest(train_project)
    assert main(["eval", "model", "--data", *files, "--cache-dir", "corpus/c", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "the token cache" in err and "inside the data folder of corpus/" in err and "Traceback" not in err
    assert main(["train", str(cfg), "--quiet"]) == 2
    err = capsys.readouterr().err
    # a folder beside one named file is the user's data too: said, with the way out (a place outside that folder: a
    # hidden folder inside it would be refused as soon as the folder itself is given as data)
    folder = (train_project / "corpus").resolve()
    assert "data.cache_dir: the token cache" in err and "the folder a data file lies in counts as the user's data" in err, err
    assert f"or MIDUS_CACHE), outside {folder}" in err, err
    assert tree_digest(train_project) == before


@pytest.mark.parametrize("cache", ["applied", "applied/tokens"])
def test_the_token_cache_may_not_be_written_into_an_output_written_whole(train_project, cache, capsys):
    """An apply output or an export is replaced whole: a cache inside it would go with it, or keep
    it from being replaced."""
    applied = train_project / "applied"
    applied.mkdir()
    write_marker(applied, "apply")
    (applied / "config.json").write_text("{}")
    record_written_files(applied)
    config = train_config(train_project, **{"data.cache_dir": cache})
    before = tree_digest(train_project)
    for argv in (["train", str(config), "--quiet"], ["eval", "model", "--data", "corpus", "--cache-dir", cache, "--quiet"]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert f"the token cache {train_project / cache} {'is' if cache == 'applied' else 'lies inside'} {applied}, written whole by midus-surgery apply" in err, err
    assert tree_digest(train_project) == before and not (train_project / "runs").exists()


def test_train_refuses_a_run_dir_with_the_users_files(train_project, capsys):
    run = train_project / "runs" / "a"
    run.mkdir(parents=True)
    (run / "loss.png").write_text("the user's plot")
    assert main(["train", str(train_config(train_project)), "--quiet"]) == 2
    assert "not written by midus-surgery" in capsys.readouterr().err
    assert (run / "loss.png").read_text() == "the user's plot"


def test_train_never_overwrites_a_marker_file_it_did_not_write(train_project, capsys):
    """trial92 F10: a folder with a checkpoint's state file was adopted as a run directory from before markers, its own
    .midus-surgery (another tool's) overwritten with the run marker, and then the start was refused for the notes beside it."""
    run = train_project / "runs" / "a"
    (run / "checkpoints" / "step-00000002").mkdir(parents=True)
    (run / "checkpoints" / "step-00000002" / "trainer_state.json").write_text('{"step": 2, "samples_seen": 8, "data": {}}\n')
    (run / "checkpoints" / "NOTES.txt").write_text("my notes\n")
    (run / MARKER).write_text('{"tool": "my-own-tool", "v": 1}\n')
    config = train_config(train_project, resume="auto")
    before = tree_digest(train_project)
    for extra in ([], ["--dry-run"]):
        assert main(["train", str(config), "--quiet", *extra]) == 2
        err = capsys.readouterr().err
        assert "run.yaml:" in err and f"{run} holds a {MARKER} file that midus-surgery did not write (not its marker)" in err, err
        assert len(err.strip().splitlines()) == 1, err
        assert tree_digest(train_project) == before and (run / MARKER).read_text() == '{"tool": "my-own-tool", "v": 1}\n'


def test_train_replaces_its_own_export_but_not_an_apply_output(train_project, capsys):
    cfg = train_config(train_project, **{"export.dir": "trained"})
    assert main(["train", str(cfg), "--quiet"]) == 0
    assert read_marker(train_project / "trained")["kind"] == "train export"
    assert read_marker(train_project / "runs" / "a")["kind"] == "train run"
    first = (train_project / "trained" / "model.safetensors").read_bytes()
    assert main(["train", str(cfg), "resume=auto", "--quiet"]) == 0  # the run is complete: exports again
    assert (train_project / "trained" / "model.safetensors").read_bytes() == first
    # another run's export: written by train, but for another run directory
    capsys.readouterr()
    cfg3 = write_config(train_project / "run3.yaml", train_project / "model", train_project / "runs" / "c", train_project / "corpus",
                        train_project / "cache", **{"export.dir": "trained", "tokens": 256})
    assert main(["train", str(cfg3), "--quiet"]) == 2
    assert "not by train (its export) for" in capsys.readouterr().err
    assert (train_project / "trained" / "model.safetensors").read_bytes() == first
    # an output of `apply` is the user's model, not this run's export
    applied = train_project / "applied"
    applied.mkdir()
    write_marker(applied, "apply")
    (applied / "config.json").write_text("{}")
    capsys.readouterr()
    cfg2 = write_config(train_project / "run2.yaml", train_project / "model", train_project / "runs" / "b", train_project / "corpus",
                        train_project / "cache", **{"export.dir": "applied", "tokens": 256})
    assert main(["train", str(cfg2), "--quiet"]) == 2
    assert "choose another directory" in capsys.readouterr().err
    assert (applied / "config.json").read_text() == "{}"


def test_train_never_writes_through_a_link_in_its_run_directory(train_project, capsys):
    """On resume, metrics.jsonl was cut back and appended to through a symlink (a user's log lost
    its lines) and trace/rank0.jsonl appended to one: a run directory with such links is refused."""
    cfg = train_config(train_project, **{"log.data_trace": True})
    assert main(["train", str(cfg), "--quiet"]) == 0
    run = train_project / "runs" / "a"
    for name, target in (("metrics.jsonl", "user-log.jsonl"), ("trace/rank0.jsonl", "user-trace.txt")):
        user = train_project.parent / target
        user.write_text('{"step": 100, "note": "the user\'s"}\n')
        (run / name).unlink()
        (run / name).symlink_to(user)
    capsys.readouterr()
    more = train_config(train_project, **{"log.data_trace": True, "tokens": 1024, "resume": "auto"})
    assert main(["train", str(more), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"{run} holds symlinks where train writes (metrics.jsonl, trace/rank0.jsonl); train never writes through a link" in err, err
    for target in ("user-log.jsonl", "user-trace.txt"):
        assert (train_project.parent / target).read_text() == '{"step": 100, "note": "the user\'s"}\n'


def test_an_export_folder_that_appears_during_training_is_kept(train_project, capsys, monkeypatch):
    """export.dir is checked before training; a folder a user made there during the run was
    deleted by the export's swap. Now it is kept, and the finished export is put beside it."""
    from midus_surgery.train import runner

    export = train_project / "exports" / "shared"
    real = runner.export_model

    def user_first(*args, **kwargs):
        export.mkdir(parents=True)
        (export / "IMPORTANT.txt").write_text("a colleague's notes")
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "export_model", user_first)
    assert main(["train", str(train_config(train_project, **{"export.dir": "exports/shared"})), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert (export / "IMPORTANT.txt").read_text() == "a colleague's notes"
    [kept] = [p for p in export.parent.iterdir() if p.name.startswith("shared.new-")]
    assert (kept / "model.safetensors").is_file() and read_marker(kept)["kind"] == "train export"
    assert f"the finished output is in {kept}" in err and len(err.strip().splitlines()) == 1, err


def test_the_export_does_not_copy_a_link_that_leads_out_of_init_from(train_project, capsys):
    """Every non-weight file of init_from travels with the export: a notes.txt linked to a private
    file was copied in as a plain file, for the user to publish."""
    secret = train_project.parent / "id_rsa"
    secret.write_text("SECRET")
    (train_project / "model" / "notes.txt").symlink_to(secret)
    assert main(["train", str(train_config(train_project)), "--quiet"]) == 0
    assert not (train_project / "runs" / "a" / "final" / "notes.txt").exists()
    assert "warning: notes.txt not copied into the export" in capsys.readouterr().out  # the run's own lines


@pytest.mark.parametrize("field", ["run_dir", "export.dir"])
def test_train_writes_nothing_inside_an_apply_output(train_project, field, capsys):
    """`apply --overwrite` replaces its output whole: a run started inside it would go with it."""
    applied = train_project / "applied"
    applied.mkdir()
    write_marker(applied, "apply")
    (applied / "config.json").write_text("{}")
    record_written_files(applied)
    cfg = train_config(train_project, **{field: "applied/runs/x"})
    before = tree_digest(train_project)
    assert main(["train", str(cfg), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"{field}: output {applied}/runs/x lies inside {applied}, written whole by midus-surgery apply" in err, err
    assert tree_digest(train_project) == before and not (applied / "runs").exists()


@pytest.mark.parametrize("setting,code,message", [({"data.train": ["corpus/missing"]}, 3, "does not exist"),
                                                  ({"data.block_size": 100000}, 2, "tokens per block exceed the model")])
def test_a_run_that_fails_before_its_first_step_leaves_no_run_directory(train_project, setting, code, message, capsys):
    cfg = train_config(train_project, "runs/deep/a", **setting)
    before = tree_digest(train_project)
    result = main(["train", str(cfg), "--quiet"])
    err = capsys.readouterr().err
    assert result == code and message in err and "Traceback" not in err, err
    after = tree_digest(train_project)
    assert not (train_project / "runs").exists()  # nor the folders it made on the way
    assert {k: after.get(k) for k in before} == before


def test_a_run_whose_output_reader_goes_away_stops_quietly_and_leaves_no_run_directory(train_project):
    """`train cfg | head -2`: the start lines met a closed pipe, a BrokenPipeError traceback (exit 1)
    that left checkpoints/, tensorboard/ and metrics.jsonl behind. Now: exit 141, as a tool SIGPIPE
    ends, nothing on stderr, and no run directory (it had not started its first step)."""
    cfg = train_config(train_project, "runs/deep/a", **{"log.tensorboard": True, "log.progress": False})
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "midus_surgery.cli", "train", str(cfg)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, cwd=train_project)
    proc.stdout.close()  # the reader is gone before the first start line (seconds of imports away)
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 141, err
    assert "Traceback" not in err and "Broken pipe" not in err, err
    assert not (train_project / "runs").exists()


def test_a_copied_run_directory_continues_and_exports_into_itself(train_project, capsys):
    assert main(["train", str(train_config(train_project)), "--quiet"]) == 0
    shutil.copytree(train_project / "runs" / "a", train_project / "runs" / "b", symlinks=True)
    copied = train_project / "runs" / "b" / "final"
    assert read_marker(copied)["owner"] == str(train_project / "runs" / "a")
    assert main(["train", str(train_config(train_project, "runs/b")), "resume=auto", "--quiet"]) == 0, capsys.readouterr().err
    assert read_marker(copied)["owner"] == str(train_project / "runs" / "b")
    # the default export is reported at run_dir, saying it is the export
    (copied / "NOTES.md").write_text("mine")
    capsys.readouterr()
    assert main(["train", str(train_config(train_project, "runs/b")), "resume=auto", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "run.yaml:" in err and f"run_dir: the export (export.dir not set: {copied}): output {copied}" in err and "NOTES.md" in err, err
    assert (copied / "NOTES.md").read_text() == "mine"


def test_a_run_in_a_hard_linked_copy_of_a_run_directory_leaves_the_original_as_it_was(train_project, capsys):
    """cp -al runs/a runs/b (a branch of a run at no disk cost) shares every file's inode: a run resumed in b truncated
    and appended to a's metrics.jsonl and data trace and drew over a's loss.png (trial139 F1). Each is now a new file
    renamed into place; every file of run a keeps its bytes."""
    extra = {"log.data_trace": True, "log.plot": True}
    assert main(["train", str(train_config(train_project, **extra)), "--quiet"]) == 0
    original = train_project / "runs" / "a"
    branch = train_project / "runs" / "b"
    shutil.copytree(original, branch, symlinks=True, copy_function=os.link)
    assert os.stat(branch / "metrics.jsonl").st_nlink == 2 and os.stat(branch / "loss.png").st_nlink == 2
    before = tree_digest(original)
    capsys.readouterr()
    more = train_config(train_project, "runs/b", **extra, tokens=1024, resume="auto")
    assert main(["train", str(more), "--quiet"]) == 0, capsys.readouterr().err
    assert tree_digest(original) == before
    steps = [json.loads(line).get("step") for line in (branch / "metrics.jsonl").read_text().splitlines()]
    assert max(s for s in steps if s is not None) > max(json.loads(line).get("step") or 0
                                                         for line in (original / "metrics.jsonl").read_text().splitlines())
    assert not list(branch.glob("*.tmp-*")) and not list((branch / "trace").glob("*.tmp-*"))


def test_an_export_onto_the_run_directorys_own_marker_stops_before_any_step(train_project, capsys):
    """A new run's marker does not exist yet when the outputs are checked: export.dir there passed the check, the
    whole run trained, and the export failed at its end (trial63). Refused before any work, by the dry run too."""
    run = train_project / "runs" / "fresh"
    cfg = train_config(train_project, "runs/fresh")
    for dry in (["--dry-run"], []):
        assert main(["train", str(cfg), f"export.dir={run / '.midus-surgery'}", "--quiet", *dry]) == 2
        err = capsys.readouterr().err
        assert "export.dir" in err and "which train itself writes" in err, err
    assert not (run / "checkpoints").exists() and not (run / "metrics.jsonl").exists()


def test_a_users_file_in_a_folder_named_like_a_partial_checkpoint_is_kept(train_project, capsys):
    """train removes the partial checkpoints a killed run left (.tmp-step-NNNNNNNN-xxxxxx); one that holds a file a
    checkpoint never holds is not the tool's alone: the next run stops before any work, as for a file in
    checkpoints/ itself, and the demo's remover keeps it (trial63: it was deleted without a word)."""
    from tool_modules import load_tool

    cfg = train_config(train_project)
    assert main(["train", str(cfg), "--quiet"]) == 0, capsys.readouterr().err
    partial = train_project / "runs" / "a" / "checkpoints" / ".tmp-step-00000004-abcdef"
    partial.mkdir()
    (partial / "keep.txt").write_text("precious")
    capsys.readouterr()
    assert main(["train", str(cfg), "resume=auto", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "checkpoints/.tmp-step-00000004-abcdef/keep.txt" in err and "move them out first" in err, err
    assert load_tool("remove_own_dir").main([str(train_project / "runs" / "a")]) != 0
    assert ".tmp-step-00000004-abcdef/keep.txt" in capsys.readouterr().err
    assert (partial / "keep.txt").read_text() == "precious"
    (partial / "keep.txt").unlink()  # a partial of the tool's own files alone goes with the next start
    (partial / "model.safetensors").write_bytes(b"half")
    assert main(["train", str(cfg), "resume=auto", "--quiet"]) == 0, capsys.readouterr().err
    assert not partial.exists()


def test_files_a_user_put_deep_in_a_run_directory_are_never_deleted(train_project, capsys):
    """Checkpoints are pruned (keep_last) and rewritten, an export replaced, a demo's run removed:
    a note inside any of them is kept, and the run says why it stops or what it kept."""
    from tool_modules import load_tool

    from midus_surgery.train.config import load_train_config
    from midus_surgery.train.runner import train

    run = train_project / "runs" / "a"
    cfg = train_config(train_project, **{"checkpoint.every": 2, "checkpoint.keep_last": 1, "log.every": 1})
    lines = []

    def note_in_step_2(line: str) -> None:  # while the run goes on, a user leaves a note in a checkpoint
        lines.append(line)
        if line.startswith("step 3/") and (run / "checkpoints" / "step-00000002").is_dir():
            (run / "checkpoints" / "step-00000002" / "NOTES.md").write_text("mine")

    train(load_train_config(cfg), echo=note_in_step_2)
    assert (run / "checkpoints" / "step-00000002" / "NOTES.md").read_text() == "mine"  # kept past keep_last
    assert any(line.startswith(f"kept {run / 'checkpoints' / 'step-00000002'} past checkpoint.keep_last") for line in lines), lines
    # the next run over this directory stops before any work; so does removing it, or exporting into checkpoints/
    assert main(["train", str(cfg), "resume=auto", "--quiet"]) == 2
    assert "checkpoints/step-00000002/NOTES.md); train prunes and rewrites checkpoints" in capsys.readouterr().err
    remove = load_tool("remove_own_dir").main
    assert remove([str(run)]) != 0 and "checkpoints/step-00000002/NOTES.md" in capsys.readouterr().err
    (run / "checkpoints" / "step-00000002" / "NOTES.md").unlink()
    (run / "final" / "my_eval.json").write_text("{}")
    assert remove([str(run)]) != 0 and "final/my_eval.json" in capsys.readouterr().err
    assert (run / "final" / "my_eval.json").is_file()
    for export in ("runs/a/checkpoints", "runs/a/checkpoints/step-00000008", "runs/a/tensorboard"):
        assert main(["train", str(cfg), "resume=auto", f"export.dir={train_project / export}", "--quiet"]) == 2
        assert "which train itself writes" in capsys.readouterr().err
    assert [p.name for p in sorted((run / "checkpoints").iterdir())] == ["step-00000002", "step-00000008"]


def test_a_full_disk_is_one_line_and_leaves_no_half_written_checkpoint(train_project, monkeypatch, capsys):
    """As safetensors reports it (its own error type, errno only in the text), and as an OSError."""
    import errno

    from midus_surgery.train import checkpoint

    class SafetensorError(Exception):
        pass

    def full(path):
        raise SafetensorError(f"Error while serializing: IoError(Os {{ code: 28, kind: StorageFull, message: \"No space left on device\" }})")

    monkeypatch.setattr(checkpoint, "save_rng_state", full)
    cfg = train_config(train_project, **{"checkpoint.every": 2})
    assert main(["train", str(cfg), "--quiet"]) == 4
    err = capsys.readouterr().err
    assert err.startswith("error: cannot write the checkpoint ") and "No space left on device" in err and "MiB free on its disk" in err, err
    assert len(err.strip().splitlines()) == 1
    assert "Traceback" not in err and list((train_project / "runs" / "a" / "checkpoints").iterdir()) == []

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    from types import SimpleNamespace

    from midus_surgery.cli import _dispatch

    assert _dispatch(SimpleNamespace(func=no_space)) == 1  # any command's write
    err = capsys.readouterr().err
    assert err.startswith("error: the disk is full (OSError: [Errno 28] No space left on device)") and len(err.strip().splitlines()) == 1, err

    def copying(*args, **kwargs):  # shutil's copy names its source first: the base's file read as the one written (trial39)
        raise OSError(errno.ENOSPC, "No space left on device", "/models/base/tokenizer.json", None, "/out/.o.partial-1/tokenizer.json")

    assert _dispatch(SimpleNamespace(func=copying)) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: the disk is full writing /out/.o.partial-1/tokenizer.json (") and len(err.strip().splitlines()) == 1, err


def test_the_demo_scripts_remove_only_runs_midus_surgery_wrote(tmp_path, capsys):
    from tool_modules import load_tool

    remove = load_tool("remove_own_dir").main
    scripts = {name: (REPO / "tools" / name).read_text() for name in ("demo.sh", "demo_eval.sh", "analysis_followup.sh")}
    assert all("rm -rf" not in text and "tools/remove_own_dir.py" in text for text in scripts.values())
    run = tmp_path / "runs" / "demo"
    run.mkdir(parents=True)
    write_marker(run, "train run")
    (run / "final").mkdir()
    assert remove([str(run)]) == 0 and not run.exists()
    assert remove([str(run)]) == 0  # nothing there: nothing to do
    mine = tmp_path / "runs" / "mine"
    mine.mkdir()
    (mine / "keep.txt").write_text("keep me")
    assert remove([str(mine)]) == 2
    assert "was not written by midus-surgery" in capsys.readouterr().err and (mine / "keep.txt").is_file()
    # A run directory of the tool's that also holds the user's notes is kept whole (a fresh demo run would
    # otherwise delete them), as is a whole output (apply's) that gained a file.
    run.mkdir()
    write_marker(run, "train run")
    (run / "checkpoints").mkdir()
    (run / "NOTES.txt").write_text("mine")
    (run / "mine").mkdir()
    assert remove([str(run)]) == 2
    err = capsys.readouterr().err
    assert "also holds what midus-surgery did not write there: NOTES.txt, mine; not removing it" in err
    assert (run / "NOTES.txt").read_text() == "mine"
    whole = tmp_path / "out"
    whole.mkdir()
    (whole / "config.json").write_text("{}")
    write_marker(whole, "apply")
    record_written_files(whole)
    (whole / "extra.txt").write_text("mine")
    assert remove([str(whole)]) == 2 and "extra.txt" in capsys.readouterr().err and (whole / "extra.txt").is_file()
    (whole / "extra.txt").unlink()
    assert remove([str(whole)]) == 0 and not whole.exists()


@pytest.mark.parametrize("signame, code, said", [("SIGTERM", 143, "terminated"), ("SIGINT", 130, "interrupted"), ("SIGHUP", 129, "hung up")])
def test_a_signal_during_apply_leaves_no_partial_output(tmp_path, signame, code, said):
    """A scheduler's cancel (SIGTERM), Ctrl-C (SIGINT) and a closed terminal (SIGHUP, trial39) clean up alike:
    no `.NAME.partial-*` waits for the next run."""
    import signal
    import time

    base = tmp_path / "base"
    torch.manual_seed(0)
    config = tiny_config("llama", hidden_size=256, intermediate_size=1024, num_hidden_layers=8, vocab_size=32000)
    AutoModelForCausalLM.from_config(config).save_pretrained(base)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"base:\n  path: {base}\nlayout:\n  interleave:\n    after_every: 1\n    kind: transformer\noutput:\n  dir: out\n")
    # apply at a lower priority than this poller: under a busy CPU (the suite's other worker) the poller
    # still sees the partial output before apply finishes writing it
    def lower_priority_with_ctrl_c():
        os.nice(10)
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # a test runner's worker may ignore SIGINT, and a child inherits that
        signal.signal(signal.SIGHUP, signal.SIG_DFL)  # as one started under nohup ignores SIGHUP

    proc = subprocess.Popen([sys.executable, "-m", "midus_surgery.cli", "apply", str(recipe)], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=lower_priority_with_ctrl_c)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".out.partial-*")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    assert proc.poll() is None, "apply ended before its partial output was seen: make the base larger"
    proc.send_signal(getattr(signal, signame))
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert err.strip().endswith(said) and "Traceback" not in err
    assert not list(tmp_path.glob(".out*")) and not (tmp_path / "out").exists()


def test_blocks_longer_than_the_models_positions_are_one_located_line(tmp_path, capsys, monkeypatch):
    """GPT-2's learned position table ends at n_positions: past it the forward fails with an index
    error deep in torch (a traceback), after the run directory was made."""
    from train_fixtures.tiny import make_tokenizer

    monkeypatch.chdir(tmp_path)
    model = tmp_path / "gpt2"
    AutoModelForCausalLM.from_config(tiny_config("gpt2")).save_pretrained(model)  # n_positions 128
    make_tokenizer().save_pretrained(model)
    write_corpus(tmp_path / "corpus", files=2, sentences_per_file=60)
    cfg = write_config(tmp_path / "run.yaml", model, tmp_path / "runs" / "a", tmp_path / "corpus", tmp_path / "cache",
                       **{"tokens": 1024, "micro_batch_size": 2, "data.block_size": 256, "log.tensorboard": False, "log.plot": False})
    assert main(["train", str(cfg), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "data.block_size: 256 tokens per block exceed the model's 128 positions (config.json n_positions); use at most 128" in err
    assert "Traceback" not in err and not (tmp_path / "runs").exists()
    assert main(["eval", str(model), "--data", "corpus", "--block-size", "256", "--quiet"]) == 2
    assert "--block-size: 256 tokens per block exceed the model's 128 positions" in capsys.readouterr().err
    assert main(["eval", str(model), "--data", "corpus", "--quiet", "--json"]) == 0  # the default: 512, or fewer when the model has fewer
    assert json.loads(capsys.readouterr().out)["block_size"] == 128


def test_a_sigterm_while_the_error_is_reported_keeps_it_one_line(tmp_path):
    """torchrun sends SIGTERM to every process once one has failed: a survivor reporting its own
    error then raised Terminated inside the report (a traceback, exit 1) or in the interpreter's
    shutdown. Once the command has ended, the program only reports and exits: SIGTERM is ignored."""
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent("""
        import os, signal, sys
        from midus_surgery import cli
        from midus_surgery.errors import TrainingError

        def fails(args):
            raise TrainingError("another process of this run stopped")

        real_print = cli.err.print
        def print_after_a_sigterm(*a, **kw):
            os.kill(os.getpid(), signal.SIGTERM)  # lands in the middle of the report
            real_print(*a, **kw)

        cli.err.print = print_after_a_sigterm
        cli.parse_arguments = lambda argv=None: type("Args", (), {"func": staticmethod(fails)})()
        cli.run()
    """))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 4, proc.stderr
    assert proc.stderr.strip() == "error: another process of this run stopped", proc.stderr


def test_a_run_started_under_nohup_keeps_ignoring_sighup(tmp_path):
    """docs/reliability.md: SIGHUP cleans up as SIGTERM does, unless the program was started under nohup, which asked
    for it to be ignored."""
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent("""
        import signal
        from midus_surgery import cli

        def report(args):
            print("ignored" if signal.getsignal(signal.SIGHUP) is signal.SIG_IGN else "handled")
            return 0

        signal.signal(signal.SIGHUP, signal.SIG_IGN if __import__("sys").argv[1] == "nohup" else signal.SIG_DFL)
        cli.parse_arguments = lambda argv=None: type("Args", (), {"func": staticmethod(report)})()
        cli.run()
    """))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}
    for how, said in (("nohup", "ignored"), ("terminal", "handled")):
        proc = subprocess.run([sys.executable, str(script), how], capture_output=True, text=True, env=env, timeout=120)
        assert proc.returncode == 0 and proc.stdout.strip() == said, (how, proc.stdout, proc.stderr)


def test_a_partial_folder_the_run_could_not_make_is_not_removed(tmp_path, monkeypatch):
    """The partial is made inside the clean-up's try (a signal right after its mkdir removes it too); a mkdir that
    fails, because something is already at that name, leaves what is there alone."""
    from midus_surgery.io import output_dir

    class Fixed:
        hex = "0123456789abcdef"

    monkeypatch.setattr(output_dir.uuid, "uuid4", lambda: Fixed())
    taken = tmp_path / ".out.partial-01234567"
    taken.mkdir()
    (taken / "theirs.txt").write_text("another process's")
    with pytest.raises(OutputError, match="cannot write"):
        with atomic_directory(tmp_path / "out", kind="apply"):
            pass
    assert (taken / "theirs.txt").read_text() == "another process's"


@pytest.mark.parametrize("first, second, code, said", [("SIGINT", "SIGINT", 130, "interrupted"), ("SIGTERM", "SIGINT", 143, "terminated"),
                                                        ("SIGINT", "SIGTERM", 130, "interrupted")])
def test_a_second_signal_while_the_first_is_reported_keeps_it_one_line(tmp_path, first, second, code, said):
    """Ctrl-C pressed twice: the second landed while "interrupted" was being printed, and about 50 lines of
    chained KeyboardInterrupt tracebacks ended in exit 1 (trial40)."""
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(f"""
        import os, signal, sys
        from midus_surgery import cli

        def stopped(args):
            os.kill(os.getpid(), signal.{first})
            raise AssertionError("the first signal did not stop the command")

        real_print = cli.err.print
        def print_after_a_second_signal(*a, **kw):
            os.kill(os.getpid(), signal.{second})  # lands in the middle of the report
            real_print(*a, **kw)

        signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C, whatever the test runner set
        cli.err.print = print_after_a_second_signal
        cli.parse_arguments = lambda argv=None: type("Args", (), {{"func": staticmethod(stopped)}})()
        cli.run()
    """))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == code and proc.stderr.strip() == said, proc.stderr


def test_a_run_directory_with_the_users_hidden_files_is_not_removed(tmp_path, capsys):
    """trial33: a run folder versioned with git, or with Jupyter's checkpoints beside it, was removed whole:
    only the hidden siblings the tool itself makes (``.final.partial-XXXXXXXX``) are skipped."""
    from tool_modules import load_tool

    remove = load_tool("remove_own_dir").main
    run = tmp_path / "run"
    run.mkdir()
    write_marker(run, "train run")
    (run / "checkpoints").mkdir()
    (run / ".git").mkdir()
    (run / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (run / ".notes.md").write_text("3 hours of notes")
    assert remove([str(run)]) == 2
    err = capsys.readouterr().err
    assert ".git, .notes.md; not removing it" in err and (run / ".notes.md").is_file()
    for user in (".git", ".notes.md"):
        shutil.rmtree(run / user) if (run / user).is_dir() else (run / user).unlink()
    (run / ".notes.old-20261204").write_text("a dated backup")  # trial34: named like a leftover, but a user's file
    assert remove([str(run)]) == 2 and ".notes.old-20261204" in capsys.readouterr().err
    (run / ".notes.old-20261204").unlink()
    (run / ".final.old-0123abcd").mkdir()  # named like the export's leftover, holding a user's file: not the tool's
    (run / ".final.old-0123abcd" / "mine.txt").write_text("mine")
    assert remove([str(run)]) == 2 and ".final.old-0123abcd" in capsys.readouterr().err
    shutil.rmtree(run / ".final.old-0123abcd")
    (run / ".final.partial-0123abcd").mkdir()
    write_marker(run / ".final.partial-0123abcd", "train export")  # an export a killed run was writing: the tool's own
    assert remove([str(run)]) == 0 and not run.exists()


def test_overwrite_keeps_an_empty_folder_the_user_made_inside_an_output(project, capsys):
    r = recipe(project, "out")
    assert apply(str(r)) == 0
    (project / "out" / "notes" / "drafts").mkdir(parents=True)
    capsys.readouterr()
    assert apply(str(r), "--overwrite") == 2
    assert "did not write there: notes/drafts/" in capsys.readouterr().err and (project / "out" / "notes" / "drafts").is_dir()


def test_a_large_file_rewritten_in_place_at_the_same_size_is_not_the_tools_any_more(tmp_path, monkeypatch):
    """trial33: files over DIGEST_MAX_BYTES were recorded by size alone, so a tensor edited in place (same size)
    counted as the tool's and `--overwrite` deleted it. Their modification time is recorded too."""
    from midus_surgery.io import output_dir

    monkeypatch.setattr(output_dir, "DIGEST_MAX_BYTES", 16)
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"x" * 64)
    (out / "config.json").write_text("{}")
    write_marker(out, "apply")
    record_written_files(out)
    marker = read_marker(out)
    assert marker["fingerprints"]["model.safetensors"][:2] == [64, None]
    assert output_dir._not_written_by_tool(out, marker) == []
    with open(out / "model.safetensors", "r+b") as fh:  # a user's edit of one value, in place
        fh.seek(10)
        fh.write(b"y")
    os.utime(out / "model.safetensors", ns=(0, marker["fingerprints"]["model.safetensors"][2] + 1_000_000))
    assert output_dir._not_written_by_tool(out, marker) == [
        "model.safetensors (modified since midus-surgery wrote it: its time moved, too large to compare its contents)"]
    # an output recorded by a version that kept only the size is still judged by the size
    old = dict(marker, fingerprints=dict(marker["fingerprints"], **{"model.safetensors": [64, None]}))
    assert output_dir._not_written_by_tool(out, old) == []
    (out / "model.safetensors").write_bytes(b"x" * 65)
    assert output_dir._not_written_by_tool(out, old) == ["model.safetensors (changed since midus-surgery wrote it)"]


def test_a_mount_point_is_refused_before_the_work(project, monkeypatch, capsys):
    """trial33: an empty mount point (a container volume) passed every check, then the rename at the end
    failed and the finished output was deleted. It is refused first, with what to give instead."""
    (project / "volume").mkdir()
    real = os.path.ismount
    monkeypatch.setattr(os.path, "ismount", lambda p: Path(p) == (project / "volume").resolve() or real(p))
    assert apply(str(recipe(project, "out")), "--out", "volume") == 2
    err = capsys.readouterr().err
    assert "is a mount point" in err and "volume/output" in err and len(err.strip().splitlines()) == 1
    assert not any((project / "volume").iterdir())


def test_a_swap_the_system_refuses_keeps_the_finished_output(project, monkeypatch, capsys):
    """If the final rename itself fails (a folder busy or mounted since the check), the finished work is
    renamed to a visible NAME.new-* and the one-line error says where; nothing is deleted."""
    from midus_surgery.io import output_dir

    (project / "out").mkdir()
    real_rmdir = Path.rmdir

    def busy(self):
        if self == (project / "out").resolve():
            raise OSError(16, "Device or resource busy")
        return real_rmdir(self)

    monkeypatch.setattr(Path, "rmdir", busy)
    assert apply(str(recipe(project, "out"))) == 2
    err = capsys.readouterr().err
    kept = sorted(project.glob("out.new-*"))
    assert len(kept) == 1 and f"it is in {kept[0]}" in err and "Device or resource busy" in err
    assert read_marker(kept[0])["kind"] == "apply" and (kept[0] / "config.json").is_file()
    assert not output_dir._not_written_by_tool(kept[0], read_marker(kept[0]))


def _whole_output(path: Path, content: str) -> Path:
    """A finished output of `apply`, as the swap leaves one (marked, its files recorded)."""
    path.mkdir()
    (path / "config.json").write_text(content)
    write_marker(path, "apply")
    record_written_files(path)
    return path


def test_an_interrupt_between_the_swaps_renames_is_held_until_the_new_output_is_in_place(tmp_path, monkeypatch):
    """trial49: a Ctrl-C landing between moving the old output aside and renaming the new one into place left
    neither at `out` (the new one removed as a partial, the old one hidden, then removed by the next run as a
    partial). The renames hold Ctrl-C back; the interrupt comes after, with the new output in place."""
    import os
    import signal

    from midus_surgery.io import output_dir

    out = _whole_output(tmp_path / "model", "old")
    real_replace = os.replace

    def interrupted_midway(src, dst):
        real_replace(src, dst)
        if Path(src) == out:  # the old output just moved aside: the worst moment for a Ctrl-C
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(output_dir.os, "replace", interrupted_midway)
    # Python's own Ctrl-C handler, whatever an earlier test in this process left (the deferral hands the signal on to it)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt) as info:
            with atomic_directory(out, kind="apply", replace=True) as tmp:
                (tmp / "config.json").write_text("new")
    finally:
        signal.signal(signal.SIGINT, previous)
    monkeypatch.undo()
    assert (out / "config.json").read_text() == "new"
    assert "the new output is in place at" in info.value.midus_note
    (left,) = tmp_path.glob(".model.old-*")  # the replaced output, still marked: the next run removes it
    lines = []
    assert clean_leftovers(out, lines.append) == [left] and "an earlier output that a run of midus-surgery killed" in lines[0]


def test_an_output_a_kill_left_moved_aside_is_put_back_by_the_next_run(tmp_path):
    """A SIGKILL between the renames (no handler can hold it) leaves the old output hidden as .NAME.old-* and
    nothing at NAME: a whole earlier output, put back, not removed as a partial (trial49)."""
    aside = _whole_output(tmp_path / ".model.old-0123abcd", "old")
    lines = []
    assert clean_leftovers(tmp_path / "other", lines.append) == []
    assert (tmp_path / "model" / "config.json").read_text() == "old" and not aside.exists()
    assert lines == [f"put back {tmp_path / 'model'}: a run of midus-surgery killed while replacing it had moved it aside to .model.old-0123abcd"]
    again = _whole_output(tmp_path / ".model.old-4567cdef", "older")  # NAME is taken now: this one is an earlier output, removed
    assert clean_leftovers(tmp_path / "model") == [again] and (tmp_path / "model" / "config.json").read_text() == "old"


def test_an_interrupted_removal_of_the_replaced_output_leaves_it_marked_and_says_the_new_one_is_in_place(project, monkeypatch, capsys):
    """trial49: Ctrl-C while the replaced output was removed left an unmarked hidden folder no run ever removed
    (gigabytes, never named), and said only 'interrupted' of an output written whole."""
    from midus_surgery.io import output_dir

    assert apply(str(recipe(project, "out"))) == 0
    real_rmtree = shutil.rmtree

    def interrupted(path, *args, **kwargs):
        if ".old-" in str(path):
            raise KeyboardInterrupt
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(output_dir.shutil, "rmtree", interrupted)
    capsys.readouterr()
    assert main(["apply", str(recipe(project, "out")), "--overwrite", "--quiet"]) == 130
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert "\ninterrupted: the new output is in place at " in err and "is removed by the next run of midus-surgery" in err, err
    (left,) = project.glob(".out.old-*")
    assert read_marker(left) is not None and (project / "out" / "config.json").is_file()
    assert clean_leftovers(project / "out") == [left]


def test_a_bind_mount_of_a_folder_of_the_same_disk_is_found_in_the_mount_table():
    """trial34: os.path.ismount misses `docker -v $PWD/out:/out` (the same file system on both sides); the
    kernel's mount table lists it."""
    from midus_surgery.io.output_dir import mount_points

    table = ("22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n"
             "97 22 8:1 /work/hostout /work/my\\040volume rw,relatime shared:1 - ext4 /dev/sda1 rw\n")
    assert mount_points(table) == {"/", "/work/my volume"}


def test_overwrite_of_another_recipes_output_says_whose_it_replaces(project, capsys):
    """--overwrite replaces any apply's output: a mistyped --out replaced another recipe's model
    without a word (trial52). It still does (the flag says so), with a note naming that recipe."""
    first = recipe(project, "model-a", name="a.yaml")
    assert apply(str(first)) == 0
    assert apply(str(first), "--overwrite") == 0  # the same recipe again: nothing to say
    assert "note:" not in capsys.readouterr().err
    second = recipe(project, "model-b", name="b.yaml")
    assert apply(str(second), "--out", "model-a", "--overwrite") == 0
    assert (f"note: --overwrite replaces {project / 'model-a'}, the output of another recipe ({first}, base {project / 'base'})"
            in capsys.readouterr().err)
    assert read_marker(project / "model-a")["recipe"] == str(second)


@pytest.mark.parametrize("odd", ["fifo", "dev-zero", "folder"])
def test_a_marker_that_is_a_pipe_a_device_or_a_folder_is_not_ours_and_never_blocks(tmp_path, odd):
    """A named pipe in a marker's place made apply, verify, train and analyze wait forever for a writer; one linked to
    /dev/zero grew apply to 5 GB before a MemoryError (trial66). Only a regular file is read, and only so much."""
    folder = tmp_path / "shared"
    folder.mkdir()
    {"fifo": lambda p: os.mkfifo(p), "dev-zero": lambda p: p.symlink_to("/dev/zero"), "folder": lambda p: p.mkdir()}[odd](folder / MARKER)
    assert read_marker(folder) is None  # returns at once: a blocking read would hang the test
    leftover = tmp_path / ".model.partial-0000dead"
    leftover.mkdir()
    {"fifo": lambda p: os.mkfifo(p), "dev-zero": lambda p: p.symlink_to("/dev/zero"), "folder": lambda p: p.mkdir()}[odd](leftover / MARKER)
    with atomic_directory(folder / "model", kind="apply", report=lambda line: None) as tmp:
        (tmp / "x").write_text("1")
    assert (folder / "model" / "x").read_text() == "1" and leftover.is_dir()  # not ours: kept


def test_a_kill_while_a_marker_is_rewritten_leaves_the_old_marker_whole(tmp_path, monkeypatch):
    """add_to_marker and record_written_files truncated the marker, then wrote it: a SIGKILL between the two left an
    empty marker, and the full-size partial output it marked was never cleaned up (trial66)."""
    from midus_surgery.io import output_dir

    folder = tmp_path / ".model.partial-0000dead"
    folder.mkdir()
    write_marker(folder, "apply")
    before = (folder / MARKER).read_text()

    def killed(self, text, *args, **kwargs):  # the process dies inside the write: the file truncated, nothing written
        open(self, "w").close()
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "write_text", killed)
    with pytest.raises(KeyboardInterrupt):
        output_dir.add_to_marker(folder, base_path="/base")
    monkeypatch.undo()
    assert (folder / MARKER).read_text() == before and sorted(p.name for p in folder.iterdir()) == [MARKER]


def test_a_run_directory_whose_log_is_a_pipe_is_refused_before_it_blocks(train_project, capsys):
    """A resumed run cut back metrics.jsonl by reading it: a named pipe there waited forever (trial66)."""
    cfg = train_config(train_project)
    assert main(["train", str(cfg), "--quiet"]) == 0
    run = train_project / "runs" / "a"
    (run / "metrics.jsonl").unlink()
    os.mkfifo(run / "metrics.jsonl")
    capsys.readouterr()
    more = train_config(train_project, tokens=1024, resume="auto")
    assert main(["train", str(more), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"{run} holds metrics.jsonl as something other than a regular file (a named pipe, a device or a folder)" in err, err


def test_a_checkpoints_folder_that_became_a_file_is_said_as_such(train_project, capsys):
    """run_dir/checkpoints a file: said as "no checkpoint to continue, its export would replace that model" beside an
    export, or as the system's "File exists" without one (trial148 L1)."""
    cfg = train_config(train_project)
    assert main(["train", str(cfg), "--quiet"]) == 0
    run = train_project / "runs" / "a"
    shutil.rmtree(run / "checkpoints")
    (run / "checkpoints").write_text("not a folder")
    more = train_config(train_project, tokens=1024, resume="auto")
    for final in (True, False):
        if not final:
            shutil.rmtree(run / "final")
        capsys.readouterr()
        assert main(["train", str(more), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert f"{run / 'checkpoints'} is a file, where train keeps its checkpoints (a folder): move it away" in err, err
    assert (run / "checkpoints").read_text() == "not a folder"


def test_a_checkpoint_state_that_is_a_pipe_is_a_broken_checkpoint_not_a_hang(train_project, capsys):
    cfg = train_config(train_project, **{"checkpoint.every": 4})
    assert main(["train", str(cfg), "--quiet"]) == 0
    run = train_project / "runs" / "a"
    newest = sorted((run / "checkpoints").glob("step-*"))[-1]
    (newest / "trainer_state.json").unlink()
    os.mkfifo(newest / "trainer_state.json")
    capsys.readouterr()
    more = train_config(train_project, tokens=1024, resume="auto", **{"checkpoint.every": 4})
    code = main(["train", str(more), "--quiet"])
    captured = capsys.readouterr()
    assert code == 0 and "Traceback" not in captured.err, captured.err
    assert not newest.exists()  # moved aside as broken; the run went on from the checkpoint before it


def test_a_file_size_limit_during_apply_is_one_line_that_says_so(tmp_path):
    """EFBIG (`ulimit -f`, FAT32's 4 GiB files) gave a traceback from the shard writer, and elsewhere the advice to free
    space on a disk with room (trial66): one line naming the limit, exit 1, nothing half-written."""
    base = tmp_path / "base"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_config("llama", hidden_size=128, intermediate_size=256)).save_pretrained(base)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"base:\n  path: {base}\nlayout:\n  interleave:\n    after_every: 1\n    kind: transformer\noutput:\n  dir: out\n")
    limit = (base / "model.safetensors").stat().st_size // 2  # the output's shard passes it, its small files do not
    capped = textwrap.dedent(f"""
        import resource, sys
        resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))  # Python ignores SIGXFSZ: the write fails with EFBIG
        sys.argv = ["midus-surgery", "apply", {str(recipe)!r}, "--quiet"]
        from midus_surgery.cli import run
        run()
    """)
    done = subprocess.run([sys.executable, "-c", capped], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert done.stderr.startswith("error: a file grew past the largest this system lets one file be (File too large"), done.stderr
    assert "or a smaller output.shard_size" in done.stderr
    assert not list(tmp_path.glob(".out*")) and not (tmp_path / "out").exists()


def test_an_output_name_whose_partial_sibling_would_not_fit_is_refused_before_any_work(project, capsys):
    """A name of 238-255 bytes is legal, but `.NAME.partial-XXXXXXXX` is not: apply failed after planning and train at
    its export, after the whole budget (trial66). validate, apply and train's start say it."""
    fits, too_long = "m" * 237, "m" * 238
    assert main(["validate", str(recipe(project, fits, "fits.yaml"))]) == 0
    capsys.readouterr()
    r = recipe(project, too_long)
    assert main(["validate", str(r)]) == 2
    captured = capsys.readouterr()
    err = captured.out + captured.err
    assert "its name is 238 bytes; midus-surgery writes an output as .NAME.partial-XXXXXXXX beside it first" in err, err
    assert "at most 237 bytes on this file system (255)" in err
    assert apply(str(r)) == 2 and "its name is 238 bytes" in capsys.readouterr().err
    assert not list(project.glob("*mmmm*"))


def test_train_refuses_an_export_name_whose_partial_would_not_fit_at_the_start(train_project, capsys):
    cfg = train_config(train_project, **{"export.dir": "m" * 240})
    assert main(["train", str(cfg), "--quiet"]) == 2
    assert "its name is 240 bytes" in capsys.readouterr().err and not (train_project / "runs").exists()


def test_a_private_output_folder_stays_private(project, capsys):
    """A 0700 folder given as the output, and an earlier output made private, were swapped for 0755 ones (trial66)."""
    private = project / "private"
    private.mkdir(mode=0o700)
    r = recipe(project, "private")
    assert apply(str(r)) == 0 and (private / "config.json").is_file()
    assert stat.S_IMODE(private.stat().st_mode) == 0o700
    private.chmod(0o750)
    assert apply(str(r), "--overwrite") == 0
    assert stat.S_IMODE(private.stat().st_mode) == 0o750


def test_a_partial_whose_writer_holds_its_lock_is_kept_though_its_pid_reads_as_gone(tmp_path):
    """Containers sharing a host name and a volume but not a PID namespace: the writer's pid reads as gone from the
    other, which removed a live apply's partial output (trial66). The writer holds a lock on the folder itself."""
    live = tmp_path / ".model.partial-0000beef"
    live.mkdir()
    (live / "model.safetensors").write_bytes(b"x" * 100)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout
    write_marker(live, "apply")
    (live / MARKER).write_text(json.dumps({**json.loads((live / MARKER).read_text()), "pid": int(gone)}))
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import fcntl, os, sys, time
        fd = os.open({str(live)!r}, os.O_RDONLY | os.O_DIRECTORY)
        fcntl.flock(fd, fcntl.LOCK_EX)
        print("held", flush=True)
        time.sleep(120)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert clean_leftovers(tmp_path / "other") == [] and live.is_dir()
    finally:
        holder.kill()
        holder.wait()
    assert clean_leftovers(tmp_path / "other") == [live] and not live.exists()  # its writer is gone now: a leftover


def test_a_marker_larger_than_any_the_tool_writes_is_not_read(tmp_path):
    """reliability.md: bookkeeping files are read only up to 16 MiB; a larger one (sparse: no disk used) is not ours."""
    from midus_surgery.io.small_files import SMALL_BYTES, NotBookkeeping, read_small_bytes

    folder = tmp_path / "shared"
    folder.mkdir()
    with open(folder / MARKER, "wb") as handle:
        handle.truncate(SMALL_BYTES + 1)
    assert SMALL_BYTES == 16 << 20 and read_marker(folder) is None
    with pytest.raises(NotBookkeeping, match="more than the 16,777,216"):
        read_small_bytes(folder / MARKER)


def test_an_output_larger_than_its_disks_free_space_is_refused_before_writing(project, monkeypatch, capsys):
    """A 195 GiB apply wrote until a shared disk was full, then removed what it wrote (trial93 F4): the output's size is
    known before the first byte, and refused against the free space in one line. On the base's own file system, where
    that file system can share copied blocks (reflinks: btrfs, XFS), a note instead; on ext4 or tmpfs, which write every
    byte again, refused too (trial95 F2: a note, then a full disk)."""
    import collections

    from midus_surgery.emit import emitter

    usage = collections.namedtuple("usage", "total used free")
    real = shutil.disk_usage  # the memory recipe's check on a tiny replica of the base writes to a temp folder: room there
    monkeypatch.setattr(emitter.shutil, "disk_usage", lambda path: usage(1 << 40, (1 << 40) - 1000, 1000)
                        if Path(path).is_relative_to(project) else real(path))
    monkeypatch.setattr(emitter, "_on_one_disk", lambda a, b: False)
    before = tree_digest(project)
    assert apply(str(recipe(project, "out"))) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: the output's weights take ") and "has 1000 B free: free space there, or write the output elsewhere" in err, err
    assert len(err.strip().splitlines()) == 1 and tree_digest(project) == {**before, "recipe.yaml": tree_digest(project)["recipe.yaml"]}
    assert not (project / "out").exists()
    monkeypatch.setattr(emitter, "_on_one_disk", lambda a, b: True)
    for kind in ("ext4", "tmpfs", "overlay", None):  # None: no mount table to read
        monkeypatch.setattr(emitter, "file_system_type", lambda path: kind)
        assert apply(str(recipe(project, "out"))) == 1, kind
        assert "has 1000 B free: free space there" in capsys.readouterr().err and not (project / "out").exists()
    monkeypatch.setattr(emitter, "file_system_type", lambda path: "btrfs")
    assert apply(str(recipe(project, "out"))) == 0  # every tensor copied from the base: all of them may be shared
    assert "it fits only if btrfs shares the blocks copied from the base (reflinks)" in capsys.readouterr().err
    shutil.rmtree(project / "out")
    memory = recipe(project, "out").read_text().replace("kind: transformer", "kind: memory") + \
        "memory:\n  n_subkeys: 8\n  topk: 4\n  latent_dim: 8\n"
    (project / "recipe.yaml").write_text(memory)  # its memory tables are made, not copied: no file system shares them
    assert apply(str(project / "recipe.yaml")) == 1
    assert "has 1000 B free: free space there" in capsys.readouterr().err and not (project / "out").exists()


def test_a_marker_write_that_fails_keeps_the_earlier_marker_and_the_resume_works(train_project, monkeypatch, capsys):
    """trial95 F3: a resume's start rewrote the run's marker in place (truncated, then written): a full disk between the
    two left it empty, and every later resume was refused as holding a file midus-surgery did not write, though the
    error had said nothing half-written was kept."""
    assert main(["train", str(train_config(train_project)), "--quiet"]) == 0
    run = train_project / "runs" / "a"
    before = (run / MARKER).read_text()
    write_text = Path.write_text

    def full_disk(self, text, *args, **kwargs):  # the file opened (truncated), then the write fails
        if self.name.startswith(MARKER):
            open(self, "w").close()
            raise OSError(errno.ENOSPC, "No space left on device")
        return write_text(self, text, *args, **kwargs)

    config = train_config(train_project, resume="auto", tokens=384)
    with monkeypatch.context() as patch:
        patch.setattr(Path, "write_text", full_disk)
        assert main(["train", str(config), "--quiet"]) == 1
    assert "disk is full" in capsys.readouterr().err
    assert (run / MARKER).read_text() == before and not [p.name for p in run.iterdir() if p.name.startswith(f"{MARKER}.")]
    assert main(["train", str(config), "--quiet"]) == 0
    assert read_marker(run)["pid"] == os.getpid()


def test_a_marker_rewrite_a_kill_left_beside_an_output_is_the_tools(project, capsys):
    """A marker is rewritten whole: written beside it, then renamed over it. A kill between the two leaves the new one
    beside the old, the tool's own file: --overwrite still replaces the output, and a run directory holding one has
    nothing in it the tool did not write."""
    out = project / "out"
    assert apply(str(recipe(project, "out"))) == 0
    (out / f"{MARKER}.tmp-99999").write_text((out / MARKER).read_text())
    assert apply(str(recipe(project, "out")), "--overwrite") == 0, capsys.readouterr().err
    run = project / "run"
    run.mkdir()
    (run / f"{MARKER}.tmp-99999").write_text("{}\n")
    (run / "notes.txt").write_text("mine\n")
    assert not_written_in_run_dir(run) == ["notes.txt"]


def test_the_marker_a_run_holds_is_rewritten_whole_and_stays_held(tmp_path):
    """The start rewrites the marker it holds with its own pid: a new file, locked before it is renamed over the old
    one, so the directory is never without a held marker, nor with a half-written one."""
    from midus_surgery.io.output_dir import hold_marker, marker_in_use, release_marker, rewrite_held_marker, write_marker

    write_marker(tmp_path, "train run")
    held = hold_marker(tmp_path)
    assert held is not None and marker_in_use(tmp_path)
    held = rewrite_held_marker(tmp_path, "train run", held)
    assert marker_in_use(tmp_path) and hold_marker(tmp_path) is None  # the file now at the name is held
    assert read_marker(tmp_path)["kind"] == "train run" and sorted(p.name for p in tmp_path.iterdir()) == [MARKER]
    release_marker(held)
    assert not marker_in_use(tmp_path)


def test_a_run_directory_whose_marker_is_a_link_to_another_runs_is_refused(train_project, capsys):
    """trial95 F9: train ran in a run_dir whose .midus-surgery linked to another run's marker, held that run's lock and
    wrote its own pid into it. A marker that is a link is not the tool's: refused in one line, nothing written."""
    from midus_surgery.io.output_dir import hold_marker, marker_in_use, release_marker

    assert main(["train", str(train_config(train_project)), "--quiet"]) == 0
    other = train_project / "runs" / "a"
    before = (other / MARKER).read_text()
    linked = train_project / "runs" / "lnk"
    linked.mkdir()
    (linked / MARKER).symlink_to(other / MARKER)
    config = train_config(train_project, run_dir="runs/lnk")
    capsys.readouterr()
    for extra in ([], ["--dry-run"]):
        assert main(["train", str(config), "--quiet", *extra]) == 2
        err = capsys.readouterr().err
        assert f"{linked} holds a {MARKER} that is a symlink; train never writes through a link" in err, err
        assert len(err.strip().splitlines()) == 1, err
    assert (other / MARKER).read_text() == before and sorted(p.name for p in linked.iterdir()) == [MARKER]
    # read and looked at as no marker of the tool's: another run's lock is not this directory's
    held = hold_marker(other)
    try:
        assert read_marker(linked) is None and not marker_in_use(linked) and marker_in_use(other)
    finally:
        release_marker(held)


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_written_weights_get_the_mode_a_new_file_gets_under_the_umask(project, train_project, umask):
    """safetensors writes its files 0600 whatever the umask: a model apply or train wrote was unreadable to a teammate
    or a serving account. Weights files (apply's output, train's checkpoints and export) get 0666 less the umask, as
    every other file the tools write (docs/reliability.md)."""
    old = os.umask(umask)
    try:
        assert apply(str(recipe(project, "shared"))) == 0
        assert main(["train", str(train_config(train_project, **{"checkpoint.every": 4})), "--quiet"]) == 0
    finally:
        os.umask(old)
    weights = [project / "shared" / "model.safetensors", *sorted((train_project / "runs" / "a").rglob("*.safetensors"))]
    assert len(weights) >= 3 and train_project / "runs" / "a" / "final" / "model.safetensors" in weights, weights
    assert {str(w): oct(stat.S_IMODE(w.stat().st_mode)) for w in weights} == {str(w): oct(0o666 & ~umask) for w in weights}


def test_a_folder_empty_but_for_a_probe_a_kill_left_is_still_empty_to_write_into(tmp_path):
    """The probe train makes and removes in a new run_dir: one a kill left between the two made the next start refuse
    the folder as one midus-surgery did not write (trial147 F4). A folder so named that holds anything is the user's."""
    from midus_surgery.io.output_dir import RUN_KIND, OutputError, check_output_dir

    run = tmp_path / "run"
    (run / ".midus-surgery-probe-ab12cd_3").mkdir(parents=True)
    assert check_output_dir(run, kind=RUN_KIND, reuse=True, writes_into=True, flag=None) == run.resolve()
    (run / ".midus-surgery-probe-ab12cd_3" / "mine.txt").write_text("a user's file")
    with pytest.raises(OutputError, match="was not written by midus-surgery"):
        check_output_dir(run, kind=RUN_KIND, reuse=True, writes_into=True, flag=None)


def test_a_second_run_into_an_output_another_run_is_writing_stops_before_any_work(project, capsys):
    """Two `apply --overwrite` into one output at once both said "wrote", the second having replaced the first's output
    unsaid (trial143 F3). A run holds a lock on its partial folder while it writes; another run into the same output sees
    it, at its start and again once its own partial is held (two started in one instant), and stops."""
    from midus_surgery.io.output_dir import hold_directory, release_marker

    r = recipe(project, "out")
    assert apply(str(r)) == 0
    before = tree_digest(project)
    live = project / f".out.partial-{'0' * 4}beef"  # as another apply names its partial while it writes
    live.mkdir()
    write_marker(live, "apply")
    held = hold_directory(live)
    try:
        capsys.readouterr()
        for args in ((str(r), "--overwrite"), (str(r), "--out", "out", "--overwrite")):
            assert apply(*args) == 2
            err = capsys.readouterr().err
            assert f"another run of midus-surgery is writing {project / 'out'} now (into {live.name})" in err, err
        assert tree_digest(project) == {**before, f"{live.name}/{MARKER}": tree_digest(project)[f"{live.name}/{MARKER}"]}
        # the second look, once its own partial is held: refused inside the write, its partial removed, the rival kept
        with pytest.raises(OutputError, match="another run of midus-surgery is writing"):
            with atomic_directory(project / "out", kind="apply", replace=True):
                raise AssertionError("wrote while another run was writing the same output")
        assert sorted(p.name for p in project.iterdir() if ".partial-" in p.name) == [live.name]
        # another output in the same folder is not held up
        assert apply(str(r), "--out", "other") == 0
    finally:
        release_marker(held)
    assert apply(str(r), "--overwrite") == 0  # the other run has ended: its output may be replaced again


def test_a_folder_the_tool_would_make_named_with_blanks_at_an_end_is_refused(project, capsys, monkeypatch):
    """`o/$BLANK/x` made a folder named one space, `--out "  x"` one with two leading spaces (trial145 F7): refused before
    any work, in a recipe's output.dir and on the command line alike. A folder that exists is the user's, whatever its
    name: an output under `Backup /runs` was refused as a slip (trial151 M1)."""
    monkeypatch.setenv("MIDUS_TEST_BLANK", " ")
    for given, padded in (("  x", "  x"), ("x ", "x "), ("o/ /x", " ")):
        capsys.readouterr()
        with pytest.raises(SystemExit) as usage:  # on the command line: a usage error, as argparse says its own
            apply(str(recipe(project, "out")), "--out", given)
        assert usage.value.code == 2
        err = capsys.readouterr().err
        assert f"would make a folder named {padded!r}, with blanks at its start or end (a stray space, or a variable of blanks?)" in err, err
        assert not (project / given.split("/")[0]).exists()
    assert apply(str(recipe(project, "'o/$MIDUS_TEST_BLANK/x'"))) == 2
    assert "would make a folder named ' ', with blanks" in capsys.readouterr().err
    (project / "Backup " / "runs").mkdir(parents=True)  # the user's own folders
    assert apply(str(recipe(project, "'Backup /runs/out'"))) == 0 and (project / "Backup " / "runs" / "out" / "config.json").is_file()
    assert apply(str(recipe(project, "out")), "--out", "my out") == 0  # blanks inside a name are a name
    with pytest.raises(OutputError, match="would make a folder named ' a'"):
        check_output_dir(project / "runs" / " a", kind="train run", writes_into=True)
