"""FSDP for real on CPU (issue 26): `train` launched with an accelerate FSDP config.

accelerate alone would run an FSDP config as DDP on CPU without a word. The runner shards with
torch's FSDP2 over gloo itself for an FSDP2 config, and says in one line that an FSDP1 config runs
as DDP. Two processes under FSDP2 must end with the weights one process ends with on the same
batches (own and shared latent bank), and a run resumed from a sharded checkpoint likewise. A
sharded checkpoint's DCP metadata (a pickle torch reads with plain pickle.load) is checked first.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from train_fixtures.tiny import make_model_dir, state_of, write_config, write_corpus

from midus_surgery.errors import TrainingError
from midus_surgery.train.checkpoint import complete_checkpoints
from midus_surgery.train.config import load_train_config
from midus_surgery.train.dcp_guard import dcp_metadata_problem
from midus_surgery.train.runner import train

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def accelerate_for_fsdp2() -> bool:
    """Whether this accelerate is one train runs FSDP2 on (train/sharding.py: older ones are refused in one line)."""
    import accelerate

    from midus_surgery.train.sharding import FSDP2_ACCELERATE

    return tuple(int(p) for p in accelerate.__version__.split(".")[:2] if p.isdigit()) >= FSDP2_ACCELERATE


# an FSDP2 launch on an older accelerate is refused at the start (that refusal has its own test below)
needs_fsdp2_accelerate = pytest.mark.skipif(not accelerate_for_fsdp2(), reason="this accelerate is older than the one FSDP2 runs on")

FSDP_CONFIG = """compute_environment: LOCAL_MACHINE
distributed_type: FSDP
num_machines: 1
num_processes: 2
use_cpu: true
fsdp_config:
  fsdp_version: {version}
  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
  fsdp_state_dict_type: SHARDED_STATE_DICT
  fsdp_reshard_after_forward: true
  fsdp_sync_module_states: true
  fsdp_cpu_ram_efficient_loading: false
"""


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from midus_surgery.compiler.planner import plan_recipe
    from midus_surgery.emit.emitter import emit

    root = tmp_path_factory.mktemp("fsdp")
    write_corpus(root / "corpus", files=2, sentences_per_file=60)
    base = make_model_dir(root / "base", with_plan=False)
    models = {}
    for bank in ("own", "shared", "batch"):
        recipe = root / f"{bank}.yaml"
        norm = "  query_norm: batch\n" if bank == "batch" else ""
        recipe.write_text(f"base:\n  path: {base}\nlayout:\n  interleave:\n    after_every: 2\n    kind: memory\n"
                          f"memory:\n  n_subkeys: 8\n  topk: 4\n  latent_dim: 8\n  share_bank: {str(bank == 'shared').lower()}\n{norm}"
                          f"output:\n  dir: {bank}-out\n  dtype: float32\n")
        models[bank] = emit(plan_recipe(recipe), progress=False).out_dir
    for version in (1, 2):
        (root / f"fsdp{version}.yaml").write_text(FSDP_CONFIG.format(version=version))
    return {"root": root, "plain": base, **models}


def run_config(world, tmp_path, bank: str, name: str, micro_batch_size: int, **extra) -> Path:
    root = world["root"]
    return write_config(tmp_path / f"{name}.yaml", world[bank], tmp_path / name, root / "corpus", root / "cache",
                        tokens=16 * 8 * 4, micro_batch_size=micro_batch_size, **{"eval.at_start": False, "memory.lr": 1e-2, **extra})


def launch(world, version: int, cfg: Path, port: int) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p))
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(world["root"] / f"fsdp{version}.yaml"),
           "--main_process_port", str(port), "-m", "midus_surgery.cli", "train", str(cfg), "--quiet"]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def assert_same_weights(a_dir: Path, b_dir: Path) -> None:
    """The same weights to float rounding. Two processes sum their gradients in another order than one, and
    Adam divides by sqrt(v): where a gradient is near zero that rounding moves a weight by a fraction of one
    update (lr 3e-3 here; one element of 512 moved 1.0e-5 on an AVX2 host). atol 1e-4 (3% of one update)
    still catches any real divergence (a lost gradient or step moves weights by about lr)."""
    a, b = state_of(a_dir), state_of(b_dir)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-4, msg=lambda m: f"{name}: {m}")


@needs_fsdp2_accelerate
@pytest.mark.parametrize("bank", ["own", "shared", "plain"])
def test_fsdp2_on_two_cpu_processes_ends_with_the_single_process_weights(world, tmp_path, bank):
    """own / shared: MIDUS outputs (their memory tables clip apart); plain: a model without memory,
    whose one clip group is every parameter (accelerate compared it with model.parameters() by ==
    and raised, unless the group is in the model's own order)."""
    # plain: traced (its end's checksum of sharded weights raised, trial87 F5), and 3 held-out blocks for 2 processes, which
    # FSDP evaluates 2 of without a word (F7)
    traced = {"log.data_trace": True, "data.held_out_fraction": 0.2, "eval.max_blocks": 3} if bank == "plain" else {}
    fsdp = run_config(world, tmp_path, bank, "fsdp", 4, **{"checkpoint.every": 2, **traced})
    proc = launch(world, 2, fsdp, {"own": 29541, "shared": 29542, "plain": 29545}[bank])
    assert proc.returncode == 0, proc.stderr[-3000:]
    if traced:  # every process checksums the whole weights: the same
        ends = [json.loads((tmp_path / "fsdp" / "trace" / f"rank{r}.jsonl").read_text().splitlines()[-1]) for r in (0, 1)]
        assert ends[0]["final_checksum"] == ends[1]["final_checksum"], ends
        assert "note: under FSDP the held-out pass reads 2 of its 3 blocks (a multiple of the 2 processes)" in proc.stdout, proc.stdout
    assert "FSDP (gloo) on cpu:0 x 2" in proc.stdout
    assert "this run shards with torch's FSDP2 over gloo" in proc.stdout
    ckpt = complete_checkpoints(tmp_path / "fsdp" / "checkpoints")[-1][1]
    assert list(ckpt.glob("pytorch_model_fsdp_0/*.distcp")), "the checkpoint is not sharded"
    train(load_train_config(run_config(world, tmp_path, bank, "single", 8, **traced)))  # the same blocks per step, one process
    assert_same_weights(tmp_path / "single" / "final", tmp_path / "fsdp" / "final")

    if bank == "shared":  # resumed from the step-2 sharded checkpoint, the run ends the same
        resumed = shutil.copytree(tmp_path / "fsdp", tmp_path / "resumed")
        shutil.rmtree(resumed / "final")
        shutil.rmtree(resumed / "checkpoints" / "step-00000004")
        cfg = run_config(world, tmp_path, bank, "resumed", 4, **{"checkpoint.every": 2, "resume": "auto"})
        proc = launch(world, 2, cfg, 29543)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "resuming from" in proc.stdout and "(step 2)" in proc.stdout
        assert_same_weights(tmp_path / "fsdp" / "final", resumed / "final")


@needs_fsdp2_accelerate
def test_fsdp2_counts_both_processes_batch_norm_statistics(world, tmp_path):
    """query_norm: batch under FSDP2: FSDP never broadcasts buffers, so each process's running statistics followed its
    own micro-batches and the processes ended with different ones. Every process now applies every process's statistics
    in rank order: the same buffers on both (their end checksums agree), each counting both processes' micro-batches."""
    root = world["root"]
    cfg = write_config(tmp_path / "fsdp.yaml", world["batch"], tmp_path / "fsdp", root / "corpus", root / "cache",
                       tokens=16 * 4 * 2 * 2, micro_batch_size=4, **{"eval.at_start": False, "log.data_trace": True})
    proc = launch(world, 2, cfg, 29546)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ends = [json.loads((tmp_path / "fsdp" / "trace" / f"rank{r}.jsonl").read_text().splitlines()[-1]) for r in (0, 1)]
    assert ends[0]["final_checksum"] == ends[1]["final_checksum"], ends
    updates = {name: float(t) for name, t in state_of(tmp_path / "fsdp" / "final").items() if name.endswith("query_norm.updates")}
    assert len(updates) == 2 and set(updates.values()) == {4.0}, updates  # 2 steps x 2 processes' micro-batches


def test_an_fsdp1_config_on_cpu_says_it_runs_as_ddp(world, tmp_path):
    """accelerate would fail building the plugin (sync_module_states wants an accelerator) or run DDP silently."""
    proc = launch(world, 1, run_config(world, tmp_path, "own", "fsdp1", 4), 29544)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "MULTI_CPU (gloo) on cpu:0 x 2" in proc.stdout
    assert "fsdp: accelerate cannot shard with FSDP1 on CPU, so this run is DDP" in proc.stdout


class Planted:
    def __reduce__(self):
        return (os.system, ("echo planted",))


def test_a_planted_pickle_in_sharded_metadata_is_refused_before_torch_reads_it(world, tmp_path):
    run = tmp_path / "planted"
    cfg = run_config(world, tmp_path, "own", "planted", 8, **{"checkpoint.every": 2})
    train(load_train_config(cfg))
    # a sharded checkpoint's layout, with the metadata replaced by a pickle that would run a command
    ckpt = complete_checkpoints(run / "checkpoints")[0][1]
    (ckpt / "pytorch_model_fsdp_0").mkdir()
    (ckpt / "pytorch_model_fsdp_0" / ".metadata").write_bytes(pickle.dumps(Planted()))
    assert "posix.system" in dcp_metadata_problem(ckpt / "pytorch_model_fsdp_0" / ".metadata")
    from midus_surgery.train.checkpoint import load_checkpoint

    with pytest.raises(TrainingError, match=r"pytorch_model_fsdp_0/\.metadata: .*could run code"):
        load_checkpoint(ckpt, acc=None, optimizer=None, scheduler=None, adamw_options={}, data_identity=read_data_identity(ckpt))


def read_data_identity(ckpt: Path) -> dict:
    from midus_surgery.train.checkpoint import read_checkpoint_state

    return read_checkpoint_state(ckpt).get("data", {})


@needs_fsdp2_accelerate
def test_a_checkpoint_resumes_only_in_the_layout_it_was_written_in(world, tmp_path):
    """accelerate reads an FSDP run's checkpoint from pytorch_model_fsdp_0/ and any other run's from
    model.safetensors: a resume across the two was a storm of DCP tracebacks (under FSDP) or a line
    naming a pytorch_model.bin nobody wrote (without). Now one line each way, before any load."""
    whole = run_config(world, tmp_path, "plain", "whole", 4, **{"checkpoint.every": 2, "resume": "auto"})
    train(load_train_config(whole))
    shutil.rmtree(tmp_path / "whole" / "final")
    proc = launch(world, 2, whole, 29546)
    assert proc.returncode != 0
    assert "it was written without FSDP (whole weights in model.safetensors) and this run shards with FSDP" in proc.stderr
    assert "CheckpointException" not in proc.stderr and "FileNotFoundError" not in proc.stderr, proc.stderr[-3000:]

    sharded = run_config(world, tmp_path, "plain", "sharded", 4, **{"checkpoint.every": 2, "resume": "auto"})
    proc = launch(world, 2, sharded, 29547)
    assert proc.returncode == 0, proc.stderr[-3000:]
    shutil.rmtree(tmp_path / "sharded" / "final")
    with pytest.raises(TrainingError, match=r"it was written under FSDP \(its weights in pytorch_model_fsdp_0/\) and this run does not shard"):
        train(load_train_config(sharded))


def test_an_fsdp2_run_on_an_accelerate_older_than_the_checked_one_is_refused(monkeypatch):
    """accelerate 1.6 to 1.14 ended a shared-bank FSDP2 run apart from the one-process run (trial76 F3b): an
    FSDP2 config on an older accelerate than the one checked stops in one line; an FSDP1 config or none is not refused."""
    import accelerate

    from midus_surgery.train import sharding

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    monkeypatch.setenv("FSDP_SYNC_MODULE_STATES", "false")
    monkeypatch.setattr(accelerate, "__version__", "1.15.0")
    assert sharding.before_accelerator(on_cpu=True) is None
    monkeypatch.setattr(accelerate, "__version__", "1.14.0")
    with pytest.raises(TrainingError, match=r"an FSDP2 run needs accelerate 1\.15 or later .* this is accelerate 1\.14\.0"):
        sharding.before_accelerator(on_cpu=False)
    monkeypatch.setenv("FSDP_VERSION", "1")
    assert sharding.before_accelerator(on_cpu=False) is None
