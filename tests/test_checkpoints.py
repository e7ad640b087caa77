"""Checkpoint safety (issue 23): no checkpoint file can run code on resume; a corrupt newest
checkpoint is said in one line and `resume: auto` falls back to the newest one that verifies;
older checkpoints (a pickled scheduler, accelerate's RNG pickle, no recorded sizes) still resume.

One short run (4 steps, a checkpoint every 2) is trained once; each test resumes from a copy.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
from pathlib import Path

import pytest
import torch
from train_fixtures.tiny import make_model_dir, state_of, write_config, write_corpus

from midus_surgery.cli import main as cli_main
from midus_surgery.errors import RecipeError, TrainingError
from midus_surgery.io.file_digest import sha256_of
from midus_surgery.train.checkpoint import complete_checkpoints, verify_checkpoint
from midus_surgery.train.config import load_train_config
from midus_surgery.train.runner import train

STEPS = 4
EXTRA = {"tokens": 16 * 4 * STEPS, "resume": "auto", "eval.at_start": False, "checkpoint.every": 2, "checkpoint.keep_last": 2}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny models, one thread, results as in subprocesses


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    """A finished run: checkpoints at steps 2 and 4, and its final weights."""
    root = tmp_path_factory.mktemp("ckpt")
    write_corpus(root / "corpus", files=2, sentences_per_file=40)
    model = make_model_dir(root / "model", with_plan=False)
    cfg = write_config(root / "run.yaml", model, root / "run", root / "corpus", root / "cache", **EXTRA)
    train(load_train_config(cfg))
    return {"root": root, "model": model, "run": root / "run", "final": state_of(root / "run" / "final")}


def copy_run(done, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the finished run without its export (so a resume trains and exports again), and its config."""
    run = tmp_path / "run"
    shutil.copytree(done["run"], run, ignore=shutil.ignore_patterns("final"))
    root = done["root"]
    cfg = write_config(tmp_path / "run.yaml", done["model"], run, root / "corpus", root / "cache", **EXTRA)
    return run, cfg


def ckpt(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step-{step:08d}"


def record_size(checkpoint: Path, name: str) -> None:
    """What an attacker who edits a file also does: record its new size in the state file."""
    state_file = checkpoint / "trainer_state.json"
    state = json.loads(state_file.read_text())
    if "files" in state:
        state["files"][name] = (checkpoint / name).stat().st_size
        if "sha256" in state:  # and its digest: a consistent forgery, which only the load itself can catch
            state["sha256"][name] = sha256_of(checkpoint / name)
            state.get("written", {}).pop(name, None)
        state_file.write_text(json.dumps(state))


def make_legacy(checkpoint: Path) -> None:
    """Rewrite a checkpoint as the trainer wrote them before: a pickled scheduler (scheduler.pt),
    accelerate's RNG pickle, no file sizes or header digests recorded. A checkpoint already in that form stays."""
    from safetensors import safe_open

    if (checkpoint / "scheduler.json").exists():
        torch.save(json.loads((checkpoint / "scheduler.json").read_text()), checkpoint / "scheduler.pt")
        (checkpoint / "scheduler.json").unlink()
    rng = checkpoint / "rng_state_0.safetensors"
    if rng.exists():
        import numpy as np

        with safe_open(rng, framework="pt") as st:
            t, meta = {k: st.get_tensor(k) for k in st.keys()}, st.metadata()
        py_version, py_gauss = json.loads(meta["python"])
        np_name, np_pos, np_has_gauss, np_gauss = json.loads(meta["numpy"])
        torch.save({"step": 0, "random_state": (py_version, tuple(t["python"].tolist()), py_gauss),
                    "numpy_random_seed": (np_name, t["numpy"].numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss),
                    "torch_manual_seed": t["torch"]}, checkpoint / "random_states_0.pkl")
        rng.unlink()
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    state.pop("files", None)
    state.pop("headers", None)  # recorded since 2026-12-06
    for key in ("format", "written_by"):  # recorded since 2026-12-07 (none: format 1)
        state.pop(key, None)
    (checkpoint / "trainer_state.json").write_text(json.dumps(state))


def assert_same_weights(done, run: Path) -> None:
    got = state_of(run / "final")
    assert got.keys() == done["final"].keys()
    for name in got:
        assert torch.equal(got[name], done["final"][name]), f"{name} differs after the resume"


class Evil:
    """A pickle that, when unpickled with weights_only=False, creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


# --------------------------------------------------------------------------- layout

def test_a_checkpoint_holds_no_pickle_but_the_optimiser_and_records_its_files(done):
    for step in (2, 4):
        path = ckpt(done["run"], step)
        names = {p.name for p in path.iterdir()}
        assert names == {"model.safetensors", "optimizer.bin", "scheduler.json", "rng_state_0.safetensors", "trainer_state.json"}
        state = json.loads((path / "trainer_state.json").read_text())
        assert state["files"] == {n: (path / n).stat().st_size for n in names - {"trainer_state.json"}}
        assert verify_checkpoint(path) is None
        assert json.loads((path / "scheduler.json").read_text())["last_epoch"] == step


# --------------------------------------------------------------------------- malicious files

# Every state file a resume reads, in the current layout and in the older one.
PLANTS = [("optimizer.bin", False), ("scheduler.json", False), ("rng_state_0.safetensors", False), ("model.safetensors", False),
          ("random_states_0.pkl", False),  # accelerate still looks for its RNG pickle
          ("scheduler.pt", True), ("random_states_0.pkl", True), ("optimizer.bin", True)]


@pytest.mark.parametrize("name,legacy", PLANTS, ids=[f"{n}{'-legacy' if legacy else ''}" for n, legacy in PLANTS])
def test_a_malicious_pickle_in_a_checkpoint_never_runs(done, tmp_path, name, legacy, recwarn):
    run, cfg = copy_run(done, tmp_path)
    shutil.rmtree(ckpt(run, 2))  # no fallback: the planted checkpoint is the one a resume must read
    newest = ckpt(run, 4)
    if legacy:
        make_legacy(newest)
    marker = tmp_path / "pwned"
    torch.save({"state": Evil(marker)}, newest / name, pickle_protocol=4)  # not torch's default: torch notes it (trial70)
    record_size(newest, name)
    try:
        result, error = train(load_train_config(cfg)), None
    except Exception as exc:  # noqa: BLE001 - checked below, after the marker
        result, error = None, exc
    assert not marker.exists(), f"unpickling {name} ran code"
    # torch's two-line note on the pickle's protocol came before the one-line error (trial70)
    assert not [w for w in recwarn if "Detected pickle protocol" in str(w.message)]
    if error is not None:
        assert isinstance(error, (TrainingError, RecipeError)), repr(error)
        assert len(str(error).splitlines()) == 1 and name in str(error), str(error)
    else:  # a file resume does not need (accelerate's RNG pickle beside ours) is never unpickled unsafely
        assert result.steps == STEPS


def test_a_resume_keeps_the_checkpoint_steps_tensorboard_points(done, tmp_path):
    """The resumed run's writer purged from the checkpoint's step: the loss logged at that step went from every
    curve, though metrics.jsonl kept it (trial65). It purges from the step after: each step once."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root = done["root"]
    run = tmp_path / "run"
    cfg = write_config(tmp_path / "run.yaml", done["model"], run, root / "corpus", root / "cache",
                       **{**EXTRA, "log.tensorboard": True, "log.every": 1})
    train(load_train_config(cfg), echo=lambda line: None)
    shutil.rmtree(ckpt(run, 4))  # killed after step 4's log line, before its checkpoint: resumed from step 2
    shutil.rmtree(run / "final")
    train(load_train_config(cfg), echo=lambda line: None)
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4]


def test_a_torn_last_line_in_the_metrics_log_does_not_stop_a_resume(done, tmp_path):
    """A run killed (or out of disk) while appending to metrics.jsonl leaves a cut-off line: the
    resume read every line as JSON and stopped with a JSONDecodeError traceback, run after run."""
    run, cfg = copy_run(done, tmp_path)
    shutil.rmtree(ckpt(run, 4))  # resume from step 2
    metrics = run / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '[1, 2]\n{"step": 3, "loss": 2.3')
    assert train(load_train_config(cfg)).steps == STEPS
    records = [json.loads(line) for line in metrics.read_text().splitlines()]  # every line whole again
    assert all(isinstance(r, dict) for r in records) and max(r["step"] for r in records) == STEPS


def test_a_malicious_scheduler_is_one_line_from_the_cli(done, tmp_path, capsys):
    run, cfg = copy_run(done, tmp_path)
    marker = tmp_path / "pwned"
    for step in (2, 4):
        make_legacy(ckpt(run, step))
        torch.save(Evil(marker), ckpt(run, step) / "scheduler.pt")
    assert cli_main(["train", str(cfg), "--quiet"]) == TrainingError.exit_code
    err = capsys.readouterr().err.strip()
    assert not marker.exists()
    assert len(err.splitlines()) == 1 and err.startswith("error: cannot resume from ") and "scheduler.pt: " in err, err


def test_a_scheduler_state_of_the_wrong_types_is_one_line(done, tmp_path, capsys):
    """The resume computes the lr from last_epoch and base_lrs: crafted values were a TypeError traceback."""
    run, cfg = copy_run(done, tmp_path)
    for step in (2, 4):
        path = ckpt(run, step) / "scheduler.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "last_epoch": "four"}))
        record_size(ckpt(run, step), "scheduler.json")
    assert cli_main(["train", str(cfg), "--quiet"]) == TrainingError.exit_code
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "scheduler.json: " in err and "last_epoch 'four'" in err, err


# --------------------------------------------------------------------------- corrupt newest checkpoint

def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def float_to_int_header(path: Path) -> None:
    """One float tensor's dtype rewritten to I32 in the header, the file's size unchanged (trial61: it passed the size
    check and accelerate's load cast its bytes' integers into the weights)."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = raw[8:8 + n]
    at = header.index(b'"dtype":"F32"')
    path.write_bytes(raw[:8 + at] + b'"dtype":"I32"' + raw[8 + at + len(b'"dtype":"F32"'):])


CORRUPTIONS = {
    "weights-truncated": ("model.safetensors", truncate),
    "weights-header-dtype": ("model.safetensors", float_to_int_header),
    "weights-deleted": ("model.safetensors", Path.unlink),
    "optimizer-truncated": ("optimizer.bin", truncate),
    "scheduler-truncated": ("scheduler.json", truncate),
    "rng-truncated": ("rng_state_0.safetensors", truncate),
    "state-truncated": ("trainer_state.json", truncate),
    "state-without-step": ("trainer_state.json", lambda p: p.write_text(json.dumps({k: v for k, v in json.loads(p.read_text()).items() if k != "step"}))),
    # crafted state files were tracebacks (AttributeError on data.get) instead of a skipped checkpoint
    "state-data-a-list": ("trainer_state.json", lambda p: p.write_text(json.dumps({**json.loads(p.read_text()), "data": ["x"]}))),
    "state-world-size-text": ("trainer_state.json", lambda p: p.write_text(json.dumps({**json.loads(p.read_text()), "world_size": "two"}))),
    # values that contradict each other, edited by hand (trial63: a samples_seen edit replayed data or claimed 64 billion
    # tokens; a scheduler position edited at the same size resumed at another learning rate, without a word)
    "state-samples-seen-edited": ("trainer_state.json", lambda p: p.write_text(json.dumps(
        {**json.loads(p.read_text()), "samples_seen": json.loads(p.read_text())["samples_seen"] // 2}))),
    "scheduler-position-edited": ("scheduler.json", lambda p: p.write_text(p.read_text().replace('"last_epoch": 4', '"last_epoch": 3'))),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous_one(done, tmp_path, case):
    name, corrupt = CORRUPTIONS[case]
    run, cfg = copy_run(done, tmp_path)
    corrupt(ckpt(run, 4) / name)
    assert verify_checkpoint(ckpt(run, 4)).startswith(name)
    lines = []
    result = train(load_train_config(cfg), echo=lines.append)
    skipped = [line for line in lines if line.startswith("checkpoint step-00000004 skipped: ")]
    assert len(skipped) == 1 and f": {name}: " in skipped[0], lines
    assert any(f"resuming from {ckpt(run, 2)} (step 2)" in line for line in lines)
    assert result.steps == STEPS
    assert_same_weights(done, run)  # the fallback replays steps 3 and 4 exactly
    assert (run / "checkpoints" / "step-00000004.broken").is_dir()  # kept for a look, out of the way
    assert verify_checkpoint(ckpt(run, 4)) is None  # written again by the resumed run
    if case == "weights-truncated":  # and a later resume goes on beside it (it was refused as a folder not train's)
        assert train(load_train_config(cfg)).steps == STEPS


def test_no_checkpoint_that_verifies_is_a_located_error(done, tmp_path):
    run, cfg = copy_run(done, tmp_path)
    for step in (2, 4):
        truncate(ckpt(run, step) / "optimizer.bin")
    with pytest.raises(RecipeError) as err:
        train(load_train_config(cfg))
    text = str(err.value)
    assert len(text.splitlines()) == 1 and " resume: no checkpoint in " in text and "step-00000004: optimizer.bin: " in text
    assert [s for s, _ in complete_checkpoints(run / "checkpoints")] == [2, 4]  # nothing moved, nothing lost


def test_explicit_resume_of_a_bad_checkpoint_is_a_located_error(done, tmp_path, capsys):
    run, cfg = copy_run(done, tmp_path)
    (ckpt(run, 4) / "rng_state_0.safetensors").unlink()
    assert cli_main(["train", str(cfg), f"resume={ckpt(run, 4)}", "--quiet"]) == RecipeError.exit_code
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "resume: " in err and "is not a complete checkpoint (rng_state_0.safetensors: missing)" in err, err


def test_a_same_size_corruption_is_one_line_naming_the_file(done, tmp_path):
    """Verification checks sizes and headers, not every byte: what passes it and still does not
    load ends the run with one line naming the file."""
    run, cfg = copy_run(done, tmp_path)
    shutil.rmtree(ckpt(run, 2))
    opt = ckpt(run, 4) / "optimizer.bin"
    opt.write_bytes(b"\0" * opt.stat().st_size)
    # the digest recorded since trial74 F6 finds it; one it did not record (forged, or a checkpoint written before) is loaded
    assert verify_checkpoint(ckpt(run, 4)) == ("optimizer.bin: its contents changed since it was written (its SHA-256 is not the one "
                                               "trainer_state.json records)")
    record_size(ckpt(run, 4), "optimizer.bin")
    assert verify_checkpoint(ckpt(run, 4)) is None
    with pytest.raises(TrainingError) as err:
        train(load_train_config(cfg))
    said = str(err.value)
    assert len(said.splitlines()) == 1 and f"cannot resume from {ckpt(run, 4)}: optimizer.bin: " in said
    # torch's advice to load the zeroed file unsafely is not passed on, and the way on is said (trial74 F5)
    assert "weights_only" not in said and "not a file torch.save wrote" in said, said
    assert said.endswith("move it out of " + str(run / "checkpoints") + ", and resume: auto continues from the newest whole checkpoint before it"), said


def test_same_size_changes_to_a_checkpoints_weights_never_replace_a_good_export(done, tmp_path):
    """Verification checks sizes and headers: a checkpoint whose tensor bytes changed at the same size loads. A
    finished run resumed from it evaluated NaN at the end and replaced its good export, exit 0 (trial37). A
    non-finite held-out loss at the end now stops the run before the export and before a checkpoint of it."""
    import struct

    run = tmp_path / "run"
    shutil.copytree(done["run"], run)
    root = done["root"]
    cfg = write_config(tmp_path / "run.yaml", done["model"], run, root / "corpus", root / "cache", **EXTRA)
    weights = ckpt(run, 4) / "model.safetensors"
    data = bytearray(weights.read_bytes())
    start = 8 + struct.unpack("<Q", data[:8])[0]  # past the header: tensor bytes only
    data[start:start + 4096] = b"\x7f\x7f\x7f\x7f" * 1024  # float32 3.4e38 where weights were
    weights.write_bytes(bytes(data))
    assert verify_checkpoint(ckpt(run, 4)).startswith("model.safetensors: its contents changed since it was written")  # trial74 F6
    record_size(ckpt(run, 4), "model.safetensors")  # a consistent forgery: the end's check still keeps the export
    assert verify_checkpoint(ckpt(run, 4)) is None
    final_before = {p.name: p.read_bytes() for p in (run / "final").iterdir() if p.is_file()}
    with pytest.raises(TrainingError) as err:
        train(load_train_config(cfg))
    said = str(err.value)
    assert len(said.splitlines()) == 1 and re.search(r"^held-out loss (nan|inf) at the end \(step 4\): ", said), said
    assert "not exported, and the export directory is left as it was" in said
    assert {p.name: p.read_bytes() for p in (run / "final").iterdir() if p.is_file()} == final_before


def test_a_resume_that_fails_to_load_into_a_new_run_directory_leaves_none(done, tmp_path):
    """A checkpoint of another data order, continued into a fresh run_dir: refused while loading it,
    after the run directory (marker, checkpoints/) was made; that directory and its new parents go."""
    root = done["root"]
    cfg = write_config(tmp_path / "run.yaml", done["model"], tmp_path / "runs" / "b", root / "corpus", root / "cache",
                       **{**EXTRA, "seed": 1, "resume": str(ckpt(done["run"], 4))})
    with pytest.raises(TrainingError) as err:
        train(load_train_config(cfg))
    assert "the data changed since it was written (seed: 0 -> 1)" in str(err.value)
    assert not (tmp_path / "runs").exists()
    assert [s for s, _ in complete_checkpoints(done["run"] / "checkpoints")] == [2, 4]  # the resumed run untouched


def test_going_back_to_an_earlier_checkpoint_sets_the_later_ones_aside(done, tmp_path):
    """resume: <an earlier checkpoint of this run_dir> (back to step 2, with another optim.lr) branches from the run
    that wrote step 4. That later checkpoint was kept over the new run's own by keep_last (each removed as soon as
    written), and resume: auto then continued the abandoned run (trial37). It is moved aside, said in one line; the
    new run's checkpoints are the ones kept and resumed."""
    run, _ = copy_run(done, tmp_path)
    root = done["root"]
    old_four = state_of(ckpt(run, 4))
    cfg = write_config(tmp_path / "branch.yaml", done["model"], run, root / "corpus", root / "cache",
                       **{**EXTRA, "resume": str(ckpt(run, 2)), "optim.lr": 1e-4, "checkpoint.every": 1, "checkpoint.keep_last": 1})
    said = []
    train(load_train_config(cfg), echo=said.append)
    aside = run / "checkpoints" / "step-00000004.superseded"
    assert any(line.startswith("checkpoint step-00000004 is later than the one resumed (step-00000002): another history; "
                               "moved to step-00000004.superseded") for line in said), said
    assert aside.is_dir() and all(torch.equal(v, state_of(aside)[k]) for k, v in old_four.items())  # kept as it was
    assert [s for s, _ in complete_checkpoints(run / "checkpoints")] == [4]  # the branch's own, keep_last 1
    branch = state_of(run / "final")
    assert all(torch.equal(v, state_of(ckpt(run, 4))[k]) for k, v in branch.items() if k in state_of(ckpt(run, 4)))
    assert not torch.equal(branch["model.layers.0.mlp.up_proj.weight"], done["final"]["model.layers.0.mlp.up_proj.weight"])
    # resume: auto now finds the branch: a finished run, exported again, the branch's weights
    again = write_config(tmp_path / "auto.yaml", done["model"], run, root / "corpus", root / "cache",
                         **{**EXTRA, "optim.lr": 1e-4, "checkpoint.every": 1, "checkpoint.keep_last": 1})
    train(load_train_config(again))
    assert all(torch.equal(v, state_of(run / "final")[k]) for k, v in branch.items())


# --------------------------------------------------------------------------- older checkpoints, and later ones

def test_a_checkpoint_records_its_format_and_the_version_that_wrote_it(done):
    from midus_surgery import __version__
    from midus_surgery.train.checkpoint import CHECKPOINT_FORMAT

    state = json.loads((ckpt(done["run"], 4) / "trainer_state.json").read_text())
    assert state["format"] == CHECKPOINT_FORMAT == 2 and state["written_by"] == f"midus-surgery {__version__}"


def set_format(checkpoint: Path, value) -> None:
    state_file = checkpoint / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state["format"] = value
    state["written_by"] = "midus-surgery 9.0"
    state_file.write_text(json.dumps(state))


@pytest.mark.parametrize("how", ["auto", "explicit", "dry-run"])
def test_a_checkpoint_in_a_later_format_is_refused_by_name_and_left_where_it_is(done, tmp_path, capsys, how):
    """A later version's checkpoint is not damage: it is neither skipped for an older one (whose resume would branch that
    run and prune its checkpoints) nor moved aside (trial97 F8: an older version advised moving a newer one out)."""
    run, cfg = copy_run(done, tmp_path)
    set_format(ckpt(run, 4), 3)
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    args = ["train", str(cfg), "--quiet"] + {"auto": [], "explicit": [f"resume={ckpt(run, 4)}"], "dry-run": ["--dry-run"]}[how]
    assert cli_main(args) == RecipeError.exit_code
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "resume: cannot resume from " in err and f"{ckpt(run, 4)}: " in err, err
    assert "checkpoint format 3, written by midus-surgery 9.0; this midus-surgery" in err and "reads formats up to 2" in err, err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before  # nothing moved, nothing pruned
    assert not (run / "final").exists()


@pytest.mark.parametrize("value", ["2", True, 0, 2.0, None])
def test_a_format_that_is_not_a_version_number_is_a_damaged_state_file(done, tmp_path, value):
    run, _ = copy_run(done, tmp_path)
    set_format(ckpt(run, 4), value)
    assert verify_checkpoint(ckpt(run, 4)).startswith("trainer_state.json: its format is not a version number (got ")



def test_an_older_checkpoint_still_resumes_exactly(done, tmp_path):
    run, cfg = copy_run(done, tmp_path)
    shutil.rmtree(ckpt(run, 4))
    make_legacy(ckpt(run, 2))
    assert verify_checkpoint(ckpt(run, 2)) is None
    lines = []
    assert train(load_train_config(cfg), echo=lines.append).steps == STEPS
    assert any(f"resuming from {ckpt(run, 2)} (step 2)" in line for line in lines)
    assert_same_weights(done, run)
    assert (ckpt(run, 4) / "scheduler.json").is_file()  # what it writes next is the new layout


def test_partial_checkpoint_cleanup_removes_only_what_save_checkpoint_names(tmp_path):
    from midus_surgery.train.checkpoint import remove_partial_checkpoints

    root = tmp_path / "checkpoints"
    (root / ".tmp-step-00000003-a1b2c3").mkdir(parents=True)  # a killed run's partial checkpoint
    (root / ".tmp-step-00000003-a1b2c3" / "model.safetensors").write_bytes(b"x")
    (root / ".tmp-step-00000003-a1b2c3" / ".tmpQY75Kl").write_bytes(b"x")  # safetensors' own temp file, killed mid-write (trial78 F1)
    (root / ".tmp-notes").mkdir()  # someone else's hidden folder
    (root / ".tmp-step-notes").mkdir()  # a name like the tool's, not the tool's (8 digits, 6 hex)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "keep.txt").write_text("mine")
    (root / ".tmp-step-00000004-link").symlink_to(outside, target_is_directory=True)
    fsdp = root / ".tmp-step-00000005-d4e5f6"  # killed in the middle of an FSDP save_state: the tool's files alone
    (fsdp / "pytorch_model_fsdp_0").mkdir(parents=True)
    (fsdp / "pytorch_model_fsdp_0" / "__0_0.distcp").write_bytes(b"x")
    (fsdp / "optimizer_0").mkdir()
    (fsdp / "rng_state_0.safetensors").write_bytes(b"x")
    noted = root / ".tmp-step-00000006-0a0b0c"  # the tool's name, and a user's file inside (trial63): kept, and said
    noted.mkdir()
    (noted / "model.safetensors").write_bytes(b"x")
    (noted / "keep.txt").write_text("precious")
    said = []
    remove_partial_checkpoints(root, report=said.append)
    assert sorted(p.name for p in root.iterdir()) == [".tmp-notes", ".tmp-step-00000004-link", ".tmp-step-00000006-0a0b0c", ".tmp-step-notes"]
    assert (outside / "keep.txt").read_text() == "mine" and (noted / "keep.txt").read_text() == "precious"
    assert said == [f"kept {noted}, a partial checkpoint of a killed run: it also holds keep.txt, which midus-surgery did not write"]


def test_an_interrupt_just_after_the_partial_checkpoint_is_made_removes_it(tmp_path):
    """A Ctrl-C landing between the partial's mkdir and the write (here: in the first wait for the
    other processes) leaves no ``.tmp-step-*`` behind, as one during the write does."""
    from types import SimpleNamespace

    from midus_surgery.train.checkpoint import save_checkpoint

    def interrupted():
        raise KeyboardInterrupt

    acc = SimpleNamespace(is_main_process=True, process_index=0, num_processes=1, wait_for_everyone=interrupted)
    root = tmp_path / "checkpoints"
    root.mkdir()
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(root, acc, None, step=3, samples_seen=12, keep_last=2, facts={})
    assert list(root.iterdir()) == []


def fake_accelerator(save_state=None):
    """The little of accelerate's Accelerator that save_checkpoint uses, for one process: save_state writes a model file."""
    from types import SimpleNamespace

    def write_model(path, safe_serialization=True):
        from safetensors.torch import save_file

        save_file({"w": torch.zeros(2)}, Path(path, "model.safetensors"))

    return SimpleNamespace(is_main_process=True, process_index=0, num_processes=1, wait_for_everyone=lambda: None,
                           save_state=save_state or write_model)


def test_a_kill_while_pruning_leaves_no_checkpoint_folder_without_its_state_file(tmp_path, monkeypatch):
    """Pruning deleted step-N in place: killed in the middle (tmpfs lists trainer_state.json first, so it went first),
    it left a checkpoint-sized step-N that no run pruned nor reported (trial78 F2). The checkpoint is renamed to a
    partial's name first: what a kill leaves is removed by the next run."""
    from types import SimpleNamespace

    from midus_surgery.train import checkpoint as ck

    root = tmp_path / "checkpoints"
    root.mkdir()
    scheduler = SimpleNamespace(state_dict=lambda: {"last_epoch": 1})
    ck.save_checkpoint(root, fake_accelerator(), scheduler, step=1, samples_seen=4, keep_last=1, facts={"data": {}})
    scheduler = SimpleNamespace(state_dict=lambda: {"last_epoch": 2})
    real_rmtree = shutil.rmtree

    def killed_in_the_middle(path, *args, **kwargs):
        if (Path(path) / "trainer_state.json").is_file():  # the pruned checkpoint: its state file goes, then the kill
            (Path(path) / "trainer_state.json").unlink()
            raise KeyboardInterrupt
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(ck.shutil, "rmtree", killed_in_the_middle)
    with pytest.raises(KeyboardInterrupt):
        ck.save_checkpoint(root, fake_accelerator(), scheduler, step=2, samples_seen=8, keep_last=1, facts={"data": {}})
    monkeypatch.setattr(ck.shutil, "rmtree", real_rmtree)
    assert ck.stateless_step_folders(root) == []
    (left,) = [p for p in root.iterdir() if p.name != "step-00000002"]
    assert ck.PARTIAL_CHECKPOINT_NAME.match(left.name), left.name
    ck.remove_partial_checkpoints(root)  # what the next run does first
    assert [p.name for p in root.iterdir()] == ["step-00000002"]
    # one such folder an earlier version left: said at a resume, never taken for a checkpoint nor deleted
    (root / "step-00000001").mkdir()
    (root / "step-00000001" / "model.safetensors").write_bytes(b"weights")
    said = []
    assert ck.newest_whole_checkpoint(root, fake_accelerator(), said.append) == root / "step-00000002"
    assert said == ["step-00000001 holds no trainer_state.json, so it is no checkpoint: checkpoint.keep_last does not prune it; it is "
                    "kept (remove it yourself if nothing in it is wanted)"]


def test_a_full_disk_at_the_state_file_names_the_checkpoint_to_resume_from(tmp_path, monkeypatch):
    """The disk filling while trainer_state.json was written gave the plain "the disk is full ... run again", without the
    checkpoint to resume from that a failure of the weights' write names (trial78 F3)."""
    import errno
    from types import SimpleNamespace

    from midus_surgery.errors import TrainingError
    from midus_surgery.train import checkpoint as ck

    root = tmp_path / "checkpoints"
    root.mkdir()
    scheduler = SimpleNamespace(state_dict=lambda: {"last_epoch": 1})
    ck.save_checkpoint(root, fake_accelerator(), scheduler, step=1, samples_seen=4, keep_last=2, facts={})
    real_write_text = Path.write_text

    def full(self, *args, **kwargs):
        if self.name == "trainer_state.json":
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return real_write_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(TrainingError) as err:
        ck.save_checkpoint(root, fake_accelerator(), scheduler, step=2, samples_seen=8, keep_last=2, facts={})
    said = str(err.value)
    assert said.startswith(f"cannot write the checkpoint {root / 'step-00000002'} (OSError: [Errno 28] No space left on device"), said
    assert said.endswith(f"the last whole checkpoint is {root / 'step-00000001'}: free space there, then resume: auto"), said
    assert [p.name for p in root.iterdir()] == ["step-00000001"]


def test_torchs_writer_stopped_by_a_file_size_limit_is_said_as_that_limit(tmp_path):
    """torch's writer past a `ulimit -f` limit says "unexpected pos", no errno: the run said the disk's 20 GB free and
    nothing of the limit (trial78 F4; FAT32's 4 GiB is the real-world case)."""
    import resource
    from types import SimpleNamespace

    from midus_surgery.errors import TrainingError
    from midus_surgery.train import checkpoint as ck

    def save_state(path, safe_serialization=True):
        torch.save({"exp_avg": torch.zeros(100_000)}, Path(path, "optimizer.bin"))  # 400 KB past a 200 KB limit

    root = tmp_path / "checkpoints"
    root.mkdir()
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, hard))  # Python ignores SIGXFSZ: the write fails with EFBIG
    try:
        with pytest.raises(TrainingError) as err:
            ck.save_checkpoint(root, fake_accelerator(save_state), SimpleNamespace(state_dict=dict), step=1, samples_seen=4,
                               keep_last=2, facts={})
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    said = str(err.value)
    assert "unexpected pos" in said and "a file grew past the largest this system lets one file be" in said, said
    assert "this process may write files of at most 200,000 bytes" in said and "MiB free" not in said, said
    assert said.endswith("no checkpoint was written yet") and list(root.iterdir()) == []


def test_a_full_disk_under_a_file_size_limit_is_said_as_a_full_disk(tmp_path, monkeypatch):
    """With any `ulimit -f` set, torch's writer failing on a full disk was said as the file-size limit, and the advice to
    free space was left out (trial80 N1): a nearly full disk is the cause said."""
    from collections import namedtuple

    from midus_surgery import errors
    from midus_surgery.train import checkpoint as ck

    monkeypatch.setattr(errors, "file_size_limit", lambda: 10_000_000_000)  # as `ulimit -f 9765625` sets it
    monkeypatch.setattr(ck, "file_size_limit", errors.file_size_limit)
    root = tmp_path / "checkpoints"
    (root / "step-00000001").mkdir(parents=True)
    (root / "step-00000001" / "trainer_state.json").write_text("{}")
    failed = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(ck.shutil, "disk_usage", lambda path: usage(10 << 30, 10 << 30, 200 << 10))
    said = str(ck._cannot_write(failed, root / "step-00000002", root))
    assert "0.2 MiB free on its disk" in said and said.endswith("free space there, then resume: auto"), said
    assert "grew past the largest" not in said
    monkeypatch.setattr(ck.shutil, "disk_usage", lambda path: usage(10 << 30, 5 << 30, 5 << 30))  # room left: the limit
    said = str(ck._cannot_write(failed, root / "step-00000002", root))
    assert "at most 10,000,000,000 bytes" in said and "raise the file-size limit" in said, said


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_ctrl_c_once_the_files_are_written_waits_for_the_checkpoint_to_be_put_in_place(tmp_path, monkeypatch, signum):
    """A Ctrl-C (or SIGTERM, as the command line handles it) just after the state file was written left a complete
    checkpoint under its temporary name, and the run named an older one as its newest (trial63). It now waits the
    moment the rename takes, then acts: the checkpoint is in place and no partial is left."""
    from types import SimpleNamespace

    from midus_surgery.cli import Terminated, _on_sigterm
    from midus_surgery.train import checkpoint as ck

    before = {signal.SIGINT: signal.getsignal(signal.SIGINT), signal.SIGTERM: signal.getsignal(signal.SIGTERM)}
    signal.signal(signal.SIGINT, signal.default_int_handler)  # as the command line has them (an xdist worker ignores SIGINT)
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        def save_state(path, safe_serialization=True):
            Path(path, "model.safetensors").write_bytes(b"weights")

        def digest_then_signal(path):  # the signal arrives while the state file is being made
            os.kill(os.getpid(), signum)
            return "0" * 64

        monkeypatch.setattr(ck, "header_digest", digest_then_signal)
        acc = SimpleNamespace(is_main_process=True, process_index=0, num_processes=1, wait_for_everyone=lambda: None,
                              save_state=save_state)
        scheduler = SimpleNamespace(state_dict=lambda: {"last_epoch": 3})
        root = tmp_path / "checkpoints"
        root.mkdir()
        with pytest.raises(KeyboardInterrupt) as raised:
            ck.save_checkpoint(root, acc, scheduler, step=3, samples_seen=12, keep_last=2, facts={})
        assert isinstance(raised.value, Terminated) == (signum == signal.SIGTERM)
        assert [p.name for p in root.iterdir()] == ["step-00000003"]
        assert json.loads((root / "step-00000003" / "trainer_state.json").read_text())["step"] == 3
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler and signal.getsignal(signal.SIGTERM) is _on_sigterm
    finally:
        for signum, handler in before.items():
            signal.signal(signum, handler)


def test_a_sigterm_the_writer_swallows_is_said_as_the_signal_not_as_a_full_disk(tmp_path):
    """torch.save into a stream (DCP's sharded checkpoint under FSDP) calls Python to write; a SIGTERM whose handler
    raised there came out as torch's "unexpected pos" and was said as a full disk, exit 4 (trial87 F3). The signal is
    raised instead, as it is anywhere else, and the partial checkpoint is removed."""
    import io
    from types import SimpleNamespace

    from midus_surgery.cli import _on_sigterm
    from midus_surgery.errors import Terminated
    from midus_surgery.train import checkpoint as ck

    class SignalledStream(io.BytesIO):
        def write(self, data):
            if self.tell() > 0:  # a few bytes in: the job is cancelled
                os.kill(os.getpid(), signal.SIGTERM)
            return super().write(data)

    def save_state(path, safe_serialization=True):
        Path(path, "model.safetensors").write_bytes(b"weights")
        torch.save({"m": torch.zeros(256)}, SignalledStream())  # what DCP's writer does with each item

    before = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        acc = SimpleNamespace(is_main_process=True, process_index=0, num_processes=1, wait_for_everyone=lambda: None,
                              save_state=save_state)
        root = tmp_path / "checkpoints"
        root.mkdir()
        with pytest.raises(Terminated) as raised:
            ck.save_checkpoint(root, acc, SimpleNamespace(state_dict=dict), step=3, samples_seen=12, keep_last=2, facts={})
        assert raised.value.signum == signal.SIGTERM
        assert list(root.iterdir()) == []
        # a save that fails of itself later in the same process is not taken for the old signal
        def full_disk(path, safe_serialization=True):
            raise OSError(28, "No space left on device")

        with pytest.raises(TrainingError):
            ck.save_checkpoint(root, SimpleNamespace(**{**vars(acc), "save_state": full_disk}), SimpleNamespace(state_dict=dict),
                               step=4, samples_seen=16, keep_last=2, facts={})
    finally:
        signal.signal(signal.SIGTERM, before)


def test_a_resume_under_another_token_budget_says_how_the_schedule_moves(done, tmp_path):
    """The cosine schedule is a function of the total: a longer budget re-lays it, not continues it.
    The lr the checkpoint's run had comes from its own config (its peak and warmup), not this run's."""
    run, _ = copy_run(done, tmp_path)
    shutil.rmtree(ckpt(run, 4))  # resume from step 2
    root = done["root"]
    was = load_train_config(write_config(tmp_path / "was.yaml", done["model"], run, root / "corpus", root / "cache", **EXTRA)).config.optim
    assert was.warmup == 2 and was.schedule == "cosine"  # so at step 2 the checkpoint's run was at its peak
    cfg = write_config(tmp_path / "longer.yaml", done["model"], run, root / "corpus", root / "cache",
                       **{**EXTRA, "tokens": 16 * 4 * 2 * STEPS, "optim.schedule": "cosine", "optim.warmup": 0, "optim.lr": 2 * was.lr})
    said = []
    train(load_train_config(cfg), echo=said.append)
    (note,) = [line for line in said if line.startswith("resuming at step 2 with 128 tokens trained and 384 left of the budget")]
    assert f"(the budget is now 512 tokens, not 256): the run now has {2 * STEPS} optimiser steps, not {STEPS}" in note
    assert "the cosine learning-rate schedule" in note
    peak = load_train_config(cfg).config.optim.lr
    floor = load_train_config(cfg).config.optim.min_lr_ratio
    import math

    after = peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * 2 / (2 * STEPS))))
    assert f"the next step (3) runs at lr {after:.3g} where the checkpoint's run had {was.lr:.3g}" in note


def test_a_resume_may_swap_its_separate_held_out_set_and_change_precision_with_a_note(tmp_path):
    """A separate held-out set (data.held_out) leaves every training block trained on, so another
    one cannot replay or skip data: it was refused as if it did. A precision change goes on too, but
    says the run is no longer the bit-for-bit continuation (it was silent)."""
    write_corpus(tmp_path / "corpus", files=2, sentences_per_file=40)
    write_corpus(tmp_path / "held-a", files=1, sentences_per_file=20, seed=10)
    write_corpus(tmp_path / "held-b", files=1, sentences_per_file=20, seed=20)
    model = make_model_dir(tmp_path / "model", with_plan=False)
    run = tmp_path / "run"

    def config(name: str, held: str, **extra) -> Path:
        return write_config(tmp_path / name, model, run, tmp_path / "corpus", tmp_path / "cache",
                            **{**EXTRA, "data.held_out": [str(tmp_path / held)], **extra})

    train(load_train_config(config("a.yaml", "held-a", tokens=16 * 4 * 2)))
    said = []
    train(load_train_config(config("b.yaml", "held-b", precision="bf16")), echo=said.append)
    notes = [line for line in said if line.startswith("note: ")]
    assert notes == ["note: data.held_out is not the text the checkpoint's run evaluated on: its held-out losses from here on are "
                     "not comparable with the earlier ones in metrics.jsonl (the training blocks are the same)",
                     "note: precision fp32 -> bf16 since the checkpoint: the run goes on, but is no longer the bit-for-bit "
                     "continuation of the one it resumes"], said
    # going from a separate held-out set to a fraction of the training text changes the training blocks: refused
    fraction = write_config(tmp_path / "c.yaml", model, run, tmp_path / "corpus", tmp_path / "cache", **{**EXTRA, "tokens": 16 * 4 * 6})
    with pytest.raises(TrainingError, match=r"the data changed since it was written \(data\.held_out removed, which changes the training blocks"):
        train(load_train_config(fraction))


def test_a_resume_trains_with_the_optimiser_settings_its_config_states(done, tmp_path):
    """The checkpoint's optimiser and scheduler state hold the lr and weight decay they were written
    with; the run's config (what the start table prints and midus_train.json records) decides, said in
    a line. Settings that regroup the parameters (freeze, memory.retrieval) cannot change: one line, not torch's error."""
    run, _ = copy_run(done, tmp_path)
    shutil.rmtree(ckpt(run, 4))  # resume from step 2
    root = done["root"]
    same = load_train_config(write_config(tmp_path / "same.yaml", done["model"], run, root / "corpus", root / "cache", **EXTRA)).config
    peak, wd = same.optim.lr, same.optim.weight_decay
    cfg = write_config(tmp_path / "changed.yaml", done["model"], run, root / "corpus", root / "cache",
                       **{**EXTRA, "optim.lr": 2 * peak, "optim.weight_decay": 0.05, "log.every": 1})
    said = []
    train(load_train_config(cfg), echo=said.append)
    assert any(line.startswith(f"resuming with optim.lr {peak} -> {2 * peak}, optim.weight_decay {wd} -> 0.05 (changed since the "
                               "checkpoint): the new values apply from step 3") for line in said), said
    before = {r["step"]: r["lr"] for r in map(json.loads, (done["run"] / "metrics.jsonl").read_text().splitlines()) if "lr" in r}
    after = {r["step"]: r["lr"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "lr" in r}
    assert after[STEPS] == pytest.approx(2 * before[STEPS], rel=1e-6)
    assert not torch.equal(state_of(run / "final")["model.layers.0.mlp.up_proj.weight"], done["final"]["model.layers.0.mlp.up_proj.weight"])

    run, _ = copy_run(done, tmp_path / "again")
    cfg = write_config(tmp_path / "frozen.yaml", done["model"], run, root / "corpus", root / "cache", **{**EXTRA, "freeze": "base"})
    with pytest.raises(TrainingError, match=r"freeze: none -> base since it was written, so its optimiser state is for other parameters"):
        train(load_train_config(cfg))
    cfg = write_config(tmp_path / "fixed.yaml", done["model"], run, root / "corpus", root / "cache", **{**EXTRA, "memory.retrieval": "frozen"})
    with pytest.raises(TrainingError, match=r"memory\.retrieval: learned -> frozen since it was written, so its optimiser state"):
        train(load_train_config(cfg))


def test_a_resume_starts_from_the_model_its_checkpoint_was_written_from(done, tmp_path):
    """The export inherits init_from's files, its dtype (export.dtype: auto) and its training history: a resume from
    another model is refused in one line before any work (a trial resumed a float32 run from the same architecture
    saved in bf16 and exported bf16 weights under the other model's name). The same model at another path goes on."""
    from safetensors.torch import load_file, save_file

    run, _ = copy_run(done, tmp_path)
    root = done["root"]
    state = json.loads((ckpt(run, 4) / "trainer_state.json").read_text())
    assert state["init_from"]["path"] == str(done["model"].resolve()) and len(state["init_from"]["digest"]) == 64
    same = tmp_path / "same-model"
    shutil.copytree(done["model"], same)
    other = tmp_path / "bf16-model"
    shutil.copytree(done["model"], other)
    weights = load_file(other / "model.safetensors")
    save_file({k: v.to(torch.bfloat16) for k, v in weights.items()}, other / "model.safetensors", metadata={"format": "pt"})
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    cfg = write_config(tmp_path / "other.yaml", other, run, root / "corpus", root / "cache", **EXTRA)
    with pytest.raises(TrainingError, match=rf"cannot resume from .*step-00000004: init_from is {re.escape(str(other))}, but the "
                       rf"checkpoint's run started from {re.escape(str(done['model'].resolve()))} \(their config, plan, training history "
                       r"or weight files differ\): the export would carry another model's files, dtype and history"):
        train(load_train_config(cfg))
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before  # refused before any work: nothing written
    # the same files at another path: the run goes on, said in a note
    cfg = write_config(tmp_path / "same.yaml", same, run, root / "corpus", root / "cache", **EXTRA)
    said = []
    train(load_train_config(cfg), echo=said.append)
    assert f"note: init_from is {same}, the checkpoint's run started from {done['model'].resolve()}: the same config" in "\n".join(said)
    assert (run / "final" / "model.safetensors").is_file()


@pytest.mark.parametrize("budget", [16 * 4 * STEPS, 16 * 4 * 2 * STEPS])
def test_the_budget_holds_in_tokens_when_a_resume_changes_the_step_size(done, tmp_path, budget):
    """A resume with half the micro-batch (or, alike, other processes) trains the tokens left and
    stops at the budget: the step count of the new step size would have over-trained by half."""
    run, _ = copy_run(done, tmp_path)
    shutil.rmtree(ckpt(run, 4))  # resume from step 2: 2 steps x 64 tokens trained
    root = done["root"]
    cfg = write_config(tmp_path / "smaller.yaml", done["model"], run, root / "corpus", root / "cache",
                       **{**EXTRA, "tokens": budget, "micro_batch_size": 2, "log.every": 1})
    said = []
    result = train(load_train_config(cfg), echo=said.append)
    left = budget - 2 * 64
    assert result.tokens == budget and result.steps == 2 + left // 32, (result, said)
    (note,) = [line for line in said if line.startswith("resuming at step 2")]
    assert f"with 128 tokens trained and {left} left of the budget" in note
    assert "a step is now 32 tokens, not 64: micro_batch_size x grad_accum x processes changed" in note
    assert ("the budget is now" in note) == (budget != 16 * 4 * STEPS) and "ending at" not in note
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(r["tokens"] for r in metrics) == budget


def test_a_resume_whose_step_size_does_not_divide_the_tokens_left_says_where_it_ends(done, tmp_path):
    """128 tokens left in steps of 48: three steps, 16 tokens past the budget, said in the note."""
    run, _ = copy_run(done, tmp_path)
    shutil.rmtree(ckpt(run, 4))
    root = done["root"]
    cfg = write_config(tmp_path / "odd.yaml", done["model"], run, root / "corpus", root / "cache", **{**EXTRA, "micro_batch_size": 3})
    said = []
    result = train(load_train_config(cfg), echo=said.append)
    (note,) = [line for line in said if line.startswith("resuming at step 2")]
    assert result.tokens == 128 + 3 * 48 and "(ending at 272 tokens: the budget rounded up to a whole step)" in note, note


def test_a_finished_run_resumed_with_another_step_size_trains_no_more(done, tmp_path):
    """Its budget is spent: the resume evaluates and exports, and trains no step."""
    run, _ = copy_run(done, tmp_path)
    root = done["root"]
    cfg = write_config(tmp_path / "smaller.yaml", done["model"], run, root / "corpus", root / "cache", **{**EXTRA, "micro_batch_size": 2})
    said = []
    result = train(load_train_config(cfg), echo=said.append)
    assert (result.steps, result.tokens) == (STEPS, 16 * 4 * STEPS)
    assert not [line for line in said if line.startswith("resuming at step")], said  # the step count did not change: nothing to say
    assert_same_weights(done, run)
    (data_line,) = [line for line in said if line.startswith("data: ")]
    assert f"budget 256 tokens = {STEPS} steps, {STEPS} taken (256 tokens) and 0 to go of 32 (2 x 1 accum x 1 proc x 16)" in data_line

    # a budget below what the checkpoint trained: said, and nothing is trained
    shutil.rmtree(run / "final")
    cfg = write_config(tmp_path / "less.yaml", done["model"], run, root / "corpus", root / "cache", **{**EXTRA, "tokens": 128})
    said = []
    result = train(load_train_config(cfg), echo=said.append)
    assert result.steps == STEPS
    assert "the checkpoint has trained 256 tokens, past the budget of 128: no step is left to train" in "\n".join(said)
    (data_line,) = [line for line in said if line.startswith("data: ")]  # trial46: the epochs were the budget's, half of these
    train_tokens = int(re.search(r"\(([\d,]+) train tokens\)", data_line).group(1).replace(",", ""))
    assert data_line.endswith(f", {256 / train_tokens:.2f} epochs"), data_line


def test_other_training_tokens_are_not_said_to_be_other_text():
    """trial46: a resume after init_from's tokenizer was swapped (the same text) was refused as "not the same
    text": the cache entry the state records covers the text, the tokenizer and the JSONL field alike."""
    from midus_surgery.train.checkpoint import data_changes

    (said,) = data_changes({"train": "entry-a", "seed": 0}, {"train": "entry-b", "seed": 0})
    assert said == ("data.train gives other tokens (its text, init_from's tokenizer or data.text_field changed, or the checkpoint "
                    "was written by a midus-surgery that named token-cache entries by other rules)")
    assert data_changes({"train": "entry-a", "seed": 0}, {"train": "entry-a", "seed": 0}) == []


def test_other_training_tokens_name_the_part_that_changed():
    """A checkpoint records what its token-cache entry read (tokenizer, JSONL field, files, the naming rules): a resume
    whose entry differs says which of them changed, and an upgrade that renamed entries is not said as other text."""
    from midus_surgery.train.checkpoint import data_changes

    reads = {"tokenizer": "t1", "text_field": "text", "files": ["/d/a.jsonl", "/d/b.jsonl"], "key_rules": 2}

    def said(**now) -> str:
        (line,) = data_changes({"train": "entry-a", "train_reads": reads}, {"train": "entry-b", "train_reads": {**reads, **now}})
        return line.removeprefix("data.train gives other tokens (").removesuffix(")")

    assert said() == "the text of its files changed"
    assert said(tokenizer="t2") == "init_from's tokenizer changed"
    assert said(text_field="body") == "data.text_field text -> body"
    assert said(files=["/d/a.jsonl", "/d/c.jsonl"]) == "other files: -b.jsonl, +c.jsonl"
    assert said(files=["/d/b.jsonl", "/d/a.jsonl"]) == "other files: the same files in another order"
    # the corpus folder moved and a file added: the added file named, not every path (trial80 N4)
    assert said(files=["/e/a.jsonl", "/e/b.jsonl", "/e/c.jsonl"]) == "other files: +c.jsonl"
    assert said(files=["/e/a.jsonl", "/e/b.jsonl"]) == "the text of its files changed"  # moved only, its text edited
    assert said(key_rules=3).startswith("the checkpoint was written by a midus-surgery that named token-cache entries by other rules")
    # under other rules the tokenizer's part of the name may differ by the rules alone: not said as a changed tokenizer,
    # nor the text as changed when only the rules are (trial149 F2, F5)
    assert said(key_rules=3, tokenizer="t2").startswith("the checkpoint was written by a midus-surgery that named token-cache")
    assert said(key_rules=3, text_field="body").startswith("data.text_field text -> body; the checkpoint was written by")


def test_a_resume_refused_over_byte_order_marks_says_so(tmp_path):
    """Under other naming rules, text files with a UTF-8 byte-order mark are the one change of reading (earlier versions
    tokenised the mark): said as such, with what can be done, not as "the run cannot tell" (trial152 F3)."""
    import codecs

    from midus_surgery.train.checkpoint import data_changes

    (tmp_path / "a.txt").write_bytes(codecs.BOM_UTF8 + b"the cat\n")
    (tmp_path / "b.txt").write_text("the dog\n")
    files = [str(tmp_path / "a.txt"), str(tmp_path / "b.txt")]
    reads = {"tokenizer": "t1", "text_field": None, "files": files, "key_rules": 2}
    (line,) = data_changes({"train": "entry-a", "train_reads": reads}, {"train": "entry-b", "train_reads": {**reads, "key_rules": 3}})
    marks = ("1 of its text files (a.txt) starts with a UTF-8 byte-order mark, which this midus-surgery reads as no text and "
             "versions before 2026-12-07 tokenised (3 tokens a file with SmolLM2's tokenizer): if the text is as it was, the marks "
             "are why (finish the run with the version that started it, or remove the marks and start afresh)")
    assert line == ("data.train gives other tokens (the checkpoint was written by a midus-surgery that named token-cache entries "
                    f"by other rules: the text and the tokenizer may be the same, but the run cannot tell; {marks})"), line
    # the checkpoint's own entry still in the cache, its files hashed: the run can tell (trial153 L1)
    (line,) = data_changes({"train": "entry-a", "train_reads": reads},
                           {"train": "entry-b", "train_reads": {**reads, "key_rules": 3}, "train_differs_from_saved": "entry-a"})
    assert line == f"data.train gives other tokens (the checkpoint's own token-cache entry, still in the cache, holds other tokens than this run's; {marks})"
    # a checkpoint older than train_reads: its entry, looked up and hashed, still says so (trial154 L3)
    assert data_changes({"train": "entry-a"}, {"train": "entry-b", "train_reads": reads, "train_differs_from_saved": "entry-a"}) == [
        "data.train gives other tokens (the checkpoint's own token-cache entry, still in the cache, holds other tokens than this run's)"]
    # the same entry read from elsewhere (another node's path to the same bytes) is the same data
    assert data_changes({"train": "entry-a", "train_reads": reads}, {"train": "entry-a", "train_reads": {**reads, "files": ["/x"]}}) == []


def test_an_entry_named_otherwise_with_the_same_tokens_is_the_same_data():
    """A checkpoint records its entry's digests (tokens and document boundaries): an entry named otherwise (an upgrade's
    naming rules, a tokenizer setting that changes no id of this text, HF_HUB_OFFLINE set at one start and not the other)
    with the same digests reads the same blocks, and the resume goes on (trial149 F1, F2)."""
    from midus_surgery.train.checkpoint import data_changes

    sums = {"tokens.bin": "a" * 64, "docs.npy": "b" * 64}
    assert data_changes({"train": "entry-a", "train_sha256": sums}, {"train": "entry-b", "train_sha256": dict(sums)}) == []
    (line,) = data_changes({"train": "entry-a", "train_sha256": sums}, {"train": "entry-b", "train_sha256": {**sums, "docs.npy": "c" * 64}})
    assert line.startswith("data.train gives other tokens ("), line
    # a checkpoint that recorded none (written before this) is compared by name, or by its entry's own record where that
    # entry is still in the cache with the same digests (the runner looks it up: train_same_as; trial152 F1)
    assert len(data_changes({"train": "entry-a"}, {"train": "entry-b", "train_sha256": sums})) == 1
    assert data_changes({"train": "entry-a"}, {"train": "entry-b", "train_sha256": sums, "train_same_as": "entry-a"}) == []
    assert len(data_changes({"train": "entry-c"}, {"train": "entry-b", "train_sha256": sums, "train_same_as": "entry-a"})) == 1
    assert len(data_changes({"train": "entry-a", "train_sha256": {}}, {"train": "entry-b", "train_sha256": {}})) == 1


def test_a_resume_on_edited_text_says_the_text_changed(done, tmp_path):
    """The corpus edited after the checkpoint: the resume is refused, saying it is the text (not the tokenizer, the field
    or the files named)."""
    root = done["root"]
    corpus = tmp_path / "corpus"
    shutil.copytree(root / "corpus", corpus)
    cfg = write_config(tmp_path / "run.yaml", done["model"], tmp_path / "run", corpus, tmp_path / "cache",
                       **{**EXTRA, "tokens": 16 * 4 * 2})
    train(load_train_config(cfg))
    first = sorted(corpus.iterdir())[0]
    first.write_text(first.read_text() + "one more sentence .\n")
    shutil.rmtree(tmp_path / "run" / "final")
    cfg = write_config(tmp_path / "run.yaml", done["model"], tmp_path / "run", corpus, tmp_path / "cache", **EXTRA)
    with pytest.raises(TrainingError) as err:
        train(load_train_config(cfg))
    assert "the data changed since it was written (data.train gives other tokens (the text of its files changed))" in str(err.value)


@pytest.mark.parametrize("inside", ["ctrl-c", "peer gone", "disk full"])
def test_what_breaks_inside_a_sharded_save_is_said_as_what_it_is(tmp_path, inside):
    """FSDP's sharded save (torch.distributed.checkpoint) gathers every process's exception into one CheckpointException:
    a Ctrl-C there was a traceback with exit 1, and a lost peer was said as a full disk, "free space there" (trial87 F3,
    F4). The interrupt is raised as the interrupt, the lost peer as the collective's error the run words; a disk error
    is still the write's own line. No partial checkpoint is left either way."""
    import errno
    import traceback
    from types import SimpleNamespace

    from torch.distributed.checkpoint.api import CheckpointException

    from midus_surgery.errors import TrainingError
    from midus_surgery.train import checkpoint as ck

    cause = {"ctrl-c": KeyboardInterrupt(),
             "peer gone": RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:49296"),
             "disk full": OSError(errno.ENOSPC, "No space left on device")}[inside]

    def sharded_save(path, safe_serialization=True):
        raise CheckpointException("CheckpointException ranks:dict_keys([0])", {0: (cause, traceback.StackSummary())})

    root = tmp_path / "checkpoints"
    root.mkdir()
    scheduler = SimpleNamespace(state_dict=lambda: {"last_epoch": 1})
    expected = {"ctrl-c": KeyboardInterrupt, "peer gone": RuntimeError, "disk full": TrainingError}[inside]
    with pytest.raises(expected) as info:
        ck.save_checkpoint(root, fake_accelerator(sharded_save), scheduler, step=1, samples_seen=4, keep_last=1, facts={"data": {}})
    if inside == "peer gone":
        assert ck.lost_a_process(info.value)
    if inside == "disk full":
        assert str(info.value).startswith(f"cannot write the checkpoint {root / 'step-00000001'}")
    assert list(root.iterdir()) == []


# --------------------------------------------------------------------------- freeze: the trained tensors only

TRAINED = ("model.layers.1.", "model.layers.3.")  # the plan's inserted blocks (train_fixtures.tiny.PLAN_LAYERS)


@pytest.fixture(scope="module")
def frozen(tmp_path_factory):
    """A finished freeze: base run of a model with a plan (tied embeddings, frozen): checkpoints at 2 and 4, its export."""
    root = tmp_path_factory.mktemp("frozen")
    write_corpus(root / "corpus", files=2, sentences_per_file=40)
    model = make_model_dir(root / "model", with_plan=True)
    cfg = write_config(root / "run.yaml", model, root / "run", root / "corpus", root / "cache", freeze="base", **EXTRA)
    train(load_train_config(cfg))
    return {"root": root, "model": model, "run": root / "run", "final": state_of(root / "run" / "final")}


def copy_frozen_run(frozen, tmp_path: Path, model: Path | None = None, **extra) -> tuple[Path, Path]:
    run = tmp_path / "run"
    shutil.copytree(frozen["run"], run, ignore=shutil.ignore_patterns("final"))
    root = frozen["root"]
    cfg = write_config(tmp_path / "run.yaml", model or frozen["model"], run, root / "corpus", root / "cache", freeze="base",
                       **{**EXTRA, **extra})
    return run, cfg


def held_names(checkpoint: Path) -> set[str]:
    from safetensors import safe_open

    with safe_open(checkpoint / "model.safetensors", framework="pt") as st:
        return set(st.keys())


def rewrite_model_file(checkpoint: Path, tensors: dict, state_edit=None) -> None:
    """Replace a checkpoint's model.safetensors and record it as written (size, header, digest): only the load can tell."""
    from safetensors.torch import save_file

    from midus_surgery.train.checkpoint import header_digest

    name = "model.safetensors"
    save_file(tensors, checkpoint / name, metadata={"format": "pt"})
    state_file = checkpoint / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state["files"][name] = (checkpoint / name).stat().st_size
    state["headers"][name] = header_digest(checkpoint / name)
    state["sha256"][name] = sha256_of(checkpoint / name)
    state["written"].pop(name, None)
    if state_edit:
        state_edit(state)
    state_file.write_text(json.dumps(state))
    assert verify_checkpoint(checkpoint) is None


def test_a_frozen_runs_checkpoint_holds_the_trained_tensors_only(frozen, done):
    """Frozen weights never change in a run and are init_from's: a checkpoint held them all in fp32 (6.9 GB for the 27M
    trained parameters of a 1.7B base). Now its model file holds exactly the trainable names, the tied frozen
    embedding and lm_head neither, and its state records the digest of the frozen weights they were trained beside."""
    from midus_surgery.train.checkpoint import FROZEN_KEY

    trainable = {name for name in state_of(frozen["model"]) if name.startswith(TRAINED)}
    for step in (2, 4):
        assert held_names(ckpt(frozen["run"], step)) == trainable
        state = json.loads((ckpt(frozen["run"], step) / "trainer_state.json").read_text())
        assert len(state["init_from"][FROZEN_KEY]) == 64
    size = (ckpt(frozen["run"], 4) / "model.safetensors").stat().st_size
    whole = (ckpt(done["run"], 4) / "model.safetensors").stat().st_size  # freeze: none, the same architecture
    assert size < 0.5 * whole, (size, whole)
    assert FROZEN_KEY not in json.loads((ckpt(done["run"], 4) / "trainer_state.json").read_text())["init_from"]  # nothing frozen


def test_a_frozen_run_resumed_from_its_trained_tensors_ends_as_an_uninterrupted_one(frozen, tmp_path):
    run, cfg = copy_frozen_run(frozen, tmp_path)
    shutil.rmtree(ckpt(run, 4))
    assert "model.embed_tokens.weight" not in held_names(ckpt(run, 2))  # the frozen weights come from init_from
    lines = []
    assert train(load_train_config(cfg), echo=lines.append).steps == STEPS
    assert any(f"resuming from {ckpt(run, 2)} (step 2)" in line for line in lines)
    assert_same_weights(frozen, run)


def flip_one_value(model_dir: Path, name: str) -> None:
    """One bit of one value of tensor ``name``, in place: the same size, the same header."""
    from midus_surgery.io.tensor_source import read_checked_header

    path = model_dir / "model.safetensors"
    header, data_start = read_checked_header(path)
    at = data_start + header[name]["data_offsets"][0]
    with open(path, "r+b") as fh:
        fh.seek(at)
        byte = fh.read(1)[0]
        fh.seek(at)
        fh.write(bytes([byte ^ 1]))


def test_a_resume_on_other_frozen_values_of_init_from_is_one_line(frozen, tmp_path, capsys):
    """The frozen weights a resume trains beside are init_from's: one value changed there (its files' sizes and headers,
    all init_from's identity compared, the same) would have the run go on with other weights than the checkpoint's."""
    other = tmp_path / "other-model"
    shutil.copytree(frozen["model"], other)
    flip_one_value(other, "model.layers.0.mlp.up_proj.weight")  # layer 0: a base layer, frozen
    run, cfg = copy_frozen_run(frozen, tmp_path, model=other)
    before = {p.relative_to(run): p.stat().st_mtime_ns for p in (run / "checkpoints").rglob("*")}
    assert cli_main(["train", str(cfg), "--quiet"]) == TrainingError.exit_code
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith(f"error: cannot resume from {ckpt(run, 4)}: the frozen weights of init_from {other} differ from those "
                          "the checkpoint's run trained beside"), err
    assert err.endswith("resume with the model it was written with, or start afresh (resume unset) in a run_dir of its own"), err
    assert {p.relative_to(run): p.stat().st_mtime_ns for p in (run / "checkpoints").rglob("*")} == before  # nothing moved or written
    # the same values at another path go on
    same = tmp_path / "same-model"
    shutil.copytree(frozen["model"], same)
    shutil.rmtree(run)
    run, cfg = copy_frozen_run(frozen, tmp_path, model=same)
    assert cli_main(["train", str(cfg), "--quiet"]) == 0


@pytest.mark.parametrize("case", ["trainable key missing", "foreign key", "no frozen digest"])
def test_a_model_file_that_does_not_fit_the_frozen_run_is_one_line(frozen, tmp_path, capsys, case):
    """Loaded with strict=False (the frozen tensors are absent), nothing else would notice a trained tensor missing (it
    would train on from init_from's values) or one of another model; nor, without the digest, other frozen weights."""
    from safetensors.torch import load_file

    from midus_surgery.train.checkpoint import FROZEN_KEY

    run, cfg = copy_frozen_run(frozen, tmp_path, resume=str(ckpt(tmp_path / "run", 4)))
    tensors = load_file(ckpt(run, 4) / "model.safetensors")
    edit = None
    if case == "trainable key missing":
        del tensors["model.layers.3.mlp.up_proj.weight"]
    elif case == "foreign key":
        tensors["model.layers.9.mlp.up_proj.weight"] = torch.zeros(2)
    else:
        def edit(state):
            del state["init_from"][FROZEN_KEY]
    rewrite_model_file(ckpt(run, 4), tensors, edit)
    assert cli_main(["train", str(cfg), "--quiet"]) == TrainingError.exit_code
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"error: cannot resume from {ckpt(run, 4)}: model.safetensors "), err
    assert {"trainable key missing": "lacks 1 of this run's trainable parameters and buffers (e.g. model.layers.3.mlp.up_proj.weight)",
            "foreign key": "holds 1 tensor(s) that are not parameters or buffers of this run's model (e.g. model.layers.9.mlp.up_proj.weight)",
            "no frozen digest": "holds the trained tensors only, but trainer_state.json records no digest of the frozen weights"}[case] in err, err


def test_a_whole_checkpoint_of_a_frozen_run_written_before_still_resumes_exactly(frozen, tmp_path):
    """Checkpoints written before held every tensor and no frozen digest: they resume (frozen weights and all from the
    checkpoint) to the weights of an uninterrupted run, and what the run writes next holds the trained tensors only."""
    from safetensors.torch import load_file

    from midus_surgery.train.checkpoint import FROZEN_KEY

    run, cfg = copy_frozen_run(frozen, tmp_path)
    shutil.rmtree(ckpt(run, 4))
    # as accelerate wrote them: every tensor, one name of the tied pair
    whole = {**state_of(frozen["model"]), **load_file(ckpt(run, 2) / "model.safetensors")}

    def as_before(state):
        del state["init_from"][FROZEN_KEY]

    rewrite_model_file(ckpt(run, 2), whole, as_before)
    make_legacy(ckpt(run, 2))
    state = json.loads((ckpt(run, 2) / "trainer_state.json").read_text())
    for key in ("sha256", "written"):
        state.pop(key)
    (ckpt(run, 2) / "trainer_state.json").write_text(json.dumps(state))
    assert verify_checkpoint(ckpt(run, 2)) is None and held_names(ckpt(run, 2)) == set(whole)
    assert train(load_train_config(cfg)).steps == STEPS
    assert_same_weights(frozen, run)
    assert "model.embed_tokens.weight" not in held_names(ckpt(run, 4))


def test_a_whole_checkpoint_resumed_beside_other_frozen_values_records_the_ones_it_trained_with(frozen, tmp_path, capsys):
    """A whole checkpoint brings its own frozen values: the run goes on with them, so its next checkpoints must record
    their digest, not that of init_from's other values, or the resume after took init_from's in their place without a
    word (trial97 F4: 19 tensors differed, up to 1.0)."""
    from safetensors.torch import load_file

    from midus_surgery.train.checkpoint import FROZEN_KEY

    other = tmp_path / "other-model"
    shutil.copytree(frozen["model"], other)
    flip_one_value(other, "model.layers.0.mlp.up_proj.weight")  # a frozen base layer: same sizes and headers
    run, cfg = copy_frozen_run(frozen, tmp_path, model=other)
    shutil.rmtree(ckpt(run, 4))
    whole = {**state_of(frozen["model"]), **load_file(ckpt(run, 2) / "model.safetensors")}  # every tensor, as written before

    def as_before(state):
        del state["init_from"][FROZEN_KEY]

    rewrite_model_file(ckpt(run, 2), whole, as_before)
    assert train(load_train_config(cfg)).steps == STEPS
    assert_same_weights(frozen, run)  # the checkpoint's frozen values, not init_from's
    recorded = json.loads((ckpt(run, 4) / "trainer_state.json").read_text())["init_from"][FROZEN_KEY]
    assert recorded == json.loads((ckpt(frozen["run"], 4) / "trainer_state.json").read_text())["init_from"][FROZEN_KEY]
    shutil.rmtree(run / "final")
    capsys.readouterr()
    assert cli_main(["train", str(write_config(tmp_path / "more.yaml", other, run, frozen["root"] / "corpus", frozen["root"] / "cache",
                                               freeze="base", **{**EXTRA, "tokens": 16 * 4 * (STEPS + 2)})), "--quiet"]) == TrainingError.exit_code
    assert "the frozen weights of init_from" in capsys.readouterr().err


def test_a_checkpoint_is_read_whatever_wraps_the_model_that_reads_it(frozen):
    """The names a checkpoint's file holds are the plain model's: DDP's `module.` and torch.compile's `_orig_mod.` are
    not in them, and a model so wrapped fits its checkpoint (trial97 F1, F2: every 2-process and compiled resume was
    refused as holding tensors of another model)."""
    from midus_surgery.compiler.plan import read_plan_file
    from midus_surgery.train.checkpoint import frozen_digest, model_file_problem, plain_name
    from midus_surgery.train.evaluate import load_causal_lm
    from midus_surgery.train.params import choose_params

    assert plain_name("module._orig_mod.model.layers.1.mlp.up_proj.weight") == "model.layers.1.mlp.up_proj.weight"
    model = load_causal_lm(frozen["model"])
    loaded = load_train_config(frozen["root"] / "run.yaml")
    choose_params(model, "base", read_plan_file(frozen["model"]), loaded)
    state = json.loads((ckpt(frozen["run"], 4) / "trainer_state.json").read_text())

    class Wrapper(torch.nn.Module):  # DDP's naming: the model under `module`
        def __init__(self, module):
            super().__init__()
            self.module = module

    for wrapped in (model, Wrapper(model), torch.compile(model), Wrapper(torch.compile(model))):
        assert model_file_problem(ckpt(frozen["run"], 4), wrapped, state) is None
        assert frozen_digest(wrapped) == frozen_digest(model)


def test_an_export_records_the_weights_its_run_started_from_even_after_init_from_was_rewritten(done, tmp_path):
    """midus_train.json's init_weights_sha256 (what analyze --fixed-retrieval compares) was taken at export: a run whose
    init_from was rewritten meanwhile (apply --overwrite at another seed, the same files' names, sizes and headers) and
    then resumed recorded the new weights as its start. The digest is taken as the run starts, carried in every
    checkpoint, and written from there."""
    from safetensors.torch import load_file, save_file

    from midus_surgery.train.checkpoint import START_KEY, weights_sha256

    run, _ = copy_run(done, tmp_path)
    shutil.rmtree(ckpt(run, 4))  # resume from step 2
    start = weights_sha256(done["model"])
    assert json.loads((ckpt(run, 2) / "trainer_state.json").read_text())["init_from"][START_KEY] == start
    rewritten = tmp_path / "model"  # the same model rewritten with other values: its identity (names, sizes, headers) holds
    shutil.copytree(done["model"], rewritten)
    tensors = load_file(rewritten / "model.safetensors")
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + 1
    save_file(tensors, rewritten / "model.safetensors", metadata={"format": "pt"})
    assert weights_sha256(rewritten) != start
    root = done["root"]
    said = []
    train(load_train_config(write_config(tmp_path / "resume.yaml", rewritten, run, root / "corpus", root / "cache", **EXTRA)),
          echo=said.append)
    assert any(f"resuming from {ckpt(run, 2)}" in line for line in said), said
    assert json.loads((run / "final" / "midus_train.json").read_text())["init_weights_sha256"] == start


def test_a_checkpoints_folder_that_cannot_be_written_is_refused_before_any_step(done, tmp_path, monkeypatch, capsys):
    """An existing run_dir/checkpoints made unwritable (an immutable attribute, as root; chmod does not stop root) was
    found at the first save, checkpoint.every steps in, and said as a full disk: "free space there" (trial143 F2). Now
    refused at the start, before any step, with advice for a permission error."""
    import tempfile as tempfile_module

    run, cfg = copy_run(done, tmp_path)
    before = {p.relative_to(run): p.stat().st_mtime_ns for p in run.rglob("*")}
    real_mkdtemp = tempfile_module.mkdtemp

    def refusing(*args, dir=None, **kwargs):  # what an immutable checkpoints/ answers, for root too
        if dir is not None and Path(dir) == run / "checkpoints":
            raise PermissionError(1, "Operation not permitted", str(Path(dir) / ".midus-surgery-probe-x"))
        return real_mkdtemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile_module, "mkdtemp", refusing)
    assert cli_main(["train", str(cfg), f"tokens={16 * 4 * (STEPS + 2)}", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert f"run_dir: cannot write in {run / 'checkpoints'}, where the checkpoints go (" in err, err
    assert err.endswith("): make that folder writable (its permissions or attributes), or write elsewhere") and "free space" not in err, err
    assert {p.relative_to(run): p.stat().st_mtime_ns for p in run.rglob("*")} == before  # not a step trained, nothing written


def test_a_probe_folder_a_kill_left_does_not_keep_a_run_from_resuming(done, tmp_path):
    """The empty folder train makes and removes in run_dir and checkpoints/ to see that they take writes: one a kill left
    between the two (or another process's, seen between them) is the tool's own, not a file of the user's (trial145 F5)."""
    run, cfg = copy_run(done, tmp_path)
    for folder in (run, run / "checkpoints"):
        (folder / ".midus-surgery-probe-ab12cd_3").mkdir()
    assert cli_main(["train", str(cfg), f"tokens={16 * 4 * (STEPS + 2)}", "--quiet"]) == 0
    assert complete_checkpoints(run / "checkpoints")[-1][0] == STEPS + 2
    (run / "checkpoints" / ".midus-surgery-probe-notempty").mkdir()
    (run / "checkpoints" / ".midus-surgery-probe-notempty" / "mine.txt").write_text("a user's file")
    with pytest.raises(RecipeError, match=r"also holds what midus-surgery did not write there \(checkpoints/\.midus-surgery-probe-notempty"):
        train(load_train_config(write_config(tmp_path / "run.yaml", done["model"], run, done["root"] / "corpus", done["root"] / "cache",
                                             **{**EXTRA, "tokens": 16 * 4 * (STEPS + 4)})))


def test_an_entrys_digests_are_its_files_hashed_not_its_record(tmp_path):
    """What the runner compares an older checkpoint's entry by: its files' SHA-256s as they are, when they are what its
    record says; a record edited to name other digests is no entry to compare (trial153 M2); an entry whose files are of
    other sizes than this run's differs without being read."""
    from midus_surgery.io.file_digest import sha256_of
    from midus_surgery.train import data as D

    entry, other = tmp_path / "cache" / "abc", tmp_path / "cache" / "def"
    for folder, size in ((entry, 8), (other, 9)):
        folder.mkdir(parents=True)
        (folder / "tokens.bin").write_bytes(b"t" * size)
        (folder / "docs.npy").write_bytes(b"d" * 4)
    from midus_surgery.io.file_digest import written_stamp

    sums = {name: sha256_of(entry / name) for name in D.CACHE_DATA_FILES}
    stamps = {name: written_stamp(entry / name) for name in D.CACHE_DATA_FILES}
    (entry / D.META_FILE).write_text(json.dumps({"format": D.FORMAT_VERSION, "sha256": sums, "written": stamps}))
    assert D.entry_digests(entry) == sums and D.entry_digests(entry, like=entry) == sums
    assert D.entry_digests(entry, like=other) == {"tokens.bin": -1, "docs.npy": -1}  # another size: differs, nothing read
    (entry / D.META_FILE).write_text(json.dumps({"format": D.FORMAT_VERSION, "sha256": sums}))  # no stamps: hashed
    assert D.entry_digests(entry, like=other) == sums
    (entry / D.META_FILE).write_text(json.dumps({"format": D.FORMAT_VERSION, "sha256": sums, "written": stamps}))
    with open(entry / "tokens.bin", "r+b") as f:  # damaged since written: no entry to compare, not one that differs (trial154 L2)
        f.truncate(4)
    assert D.entry_digests(entry, like=other) is None
    (entry / "tokens.bin").write_bytes(b"t" * 8)
    (entry / D.META_FILE).write_text(json.dumps({"format": D.FORMAT_VERSION, "sha256": {**sums, "tokens.bin": "a" * 64}}))
    assert D.entry_digests(entry) is None  # its record names other digests than its files have
    (entry / D.META_FILE).write_text(json.dumps({"format": D.FORMAT_VERSION}))  # an entry that records none
    assert D.entry_digests(entry) is None
    assert D.entry_digests(tmp_path / "cache" / "missing") is None and D.entry_digests(tmp_path / "cache" / "..") is None
