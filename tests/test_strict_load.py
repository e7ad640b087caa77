"""Strict loads (issue 23): `eval` and `train` refuse a model directory whose weights miss a tensor
the architecture has, hold one it does not, or hold one of another shape, with one line naming
the tensor and exit 2, for stock (LLaMA-Pro) and MIDUS outputs alike: never a partly random
model, never a traceback. Tied weights (the LM head on the embeddings) are not missing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from train_fixtures.tiny import make_model_dir, write_config, write_corpus

from midus_surgery.train.evaluate import ModelLoadError, load_causal_lm

REPO = Path(__file__).resolve().parents[1]


def subprocess_env() -> dict:
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=path, TOKENIZERS_PARALLELISM="false")
    env.pop("WORLD_SIZE", None)
    return env


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from midus_surgery.compiler.planner import plan_recipe
    from midus_surgery.emit.emitter import emit

    root = tmp_path_factory.mktemp("strict")
    files = write_corpus(root / "corpus", files=2, sentences_per_file=30)
    base = make_model_dir(root / "base", with_plan=False)
    outputs = {}
    for kind in ("identity", "memory"):  # LLaMA-Pro (stock Llama classes) and MIDUS
        memory = "memory:\n  n_subkeys: 8\n  topk: 4\n  latent_dim: 8\n" if kind == "memory" else ""
        recipe = root / f"{kind}.yaml"
        recipe.write_text(f"base:\n  path: {base}\nlayout:\n  interleave:\n    after_every: 2\n    kind: {kind}\n{memory}"
                          f"output:\n  dir: {kind}-out\n  dtype: float32\n")
        outputs[kind] = emit(plan_recipe(recipe), progress=False).out_dir
    return {"root": root, "files": files, "base": base, **outputs}


def rewrite_weights(model_dir: Path, change) -> None:
    """Apply ``change(tensors)`` to the weights of a single-file model directory, a real safetensors rewrite."""
    f = model_dir / "model.safetensors"
    assert not (model_dir / "model.safetensors.index.json").exists()
    tensors = load_file(f)
    change(tensors)
    save_file(tensors, f, metadata={"format": "pt"})


def broken_copy(world, kind: str, tmp_path: Path, change) -> Path:
    import shutil

    out = tmp_path / f"{kind}-broken"
    shutil.copytree(world[kind], out)
    rewrite_weights(out, change)
    return out


def victim(kind: str) -> str:
    # layer 2 is an inserted block in both outputs; in the MIDUS one it holds the memory layer
    return "model.layers.2.mlp.hml.keys" if kind == "memory" else "model.layers.2.mlp.down_proj.weight"


def run_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "midus_surgery.cli", *map(str, args)], env=subprocess_env(),
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("kind", ["identity", "memory"])
def test_a_missing_tensor_is_one_line_and_exit_2_from_eval_and_train(world, tmp_path, kind):
    name = victim(kind)
    out = broken_copy(world, kind, tmp_path, lambda t: t.pop(name))
    cache = tmp_path / "cache"
    cfg = write_config(tmp_path / "run.yaml", out, tmp_path / "run", world["root"] / "corpus", cache, tokens=16 * 4 * 2)
    for args in (["eval", out, "--data", world["files"][0], "--block-size", "16", "--cache-dir", cache, "--quiet"],
                 ["train", cfg, "--quiet"]):
        proc = run_cli(*args)
        err = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr and "LOAD REPORT" not in proc.stderr, proc.stderr[-2000:]
        assert len(err) == 1 and err[0].startswith(f"error: {out}: ") and name in err[0], proc.stderr
    assert not (tmp_path / "run" / "final").exists()  # nothing trained, nothing exported


def test_an_unexpected_or_misshapen_tensor_is_named(world, tmp_path):
    extra = broken_copy(world, "identity", tmp_path / "extra", lambda t: t.update({"model.layers.9.mlp.up_proj.weight": torch.zeros(2, 2)}))
    with pytest.raises(ModelLoadError, match=r"1 unexpected tensor\(s\): model\.layers\.9\.mlp\.up_proj\.weight"):
        load_causal_lm(extra, progress=False)
    wrong = broken_copy(world, "identity", tmp_path / "wrong", lambda t: t.update({"model.layers.0.mlp.up_proj.weight": torch.zeros(3, 3)}))
    with pytest.raises(ModelLoadError, match=r"wrong shape: model\.layers\.0\.mlp\.up_proj\.weight \(weights \[3, 3\], model \[64, 32\]\)"):
        load_causal_lm(wrong, progress=False)
    cut = broken_copy(world, "memory", tmp_path / "cut", lambda t: None)
    (cut / "model.safetensors").write_bytes((cut / "model.safetensors").read_bytes()[:1000])
    with pytest.raises(ModelLoadError) as err:
        load_causal_lm(cut, progress=False)
    assert ModelLoadError.exit_code == 2 and len(str(err.value).splitlines()) == 1 and "cannot load the weights" in str(err.value)


def test_tied_weights_are_not_missing(world):
    """The tiny Llama ties its LM head to the embeddings: the file holds no lm_head.weight, and loads."""
    assert json.loads((world["base"] / "config.json").read_text())["tie_word_embeddings"]
    assert "lm_head.weight" not in load_file(world["base"] / "model.safetensors")
    for model_dir in (world["base"], world["identity"], world["memory"]):
        model = load_causal_lm(model_dir, progress=False)
        assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


class _Planted:
    """A pickle that, unpickled without weights_only, writes ``marker``."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_weights_are_read_as_data_only_and_the_refusal_gives_no_unsafe_advice(world, tmp_path):
    """eval, analyze and train (one loader) read a model whose weights are pickles alone only when allowed (--allow-pickle,
    train's allow_pickle: the rule apply holds a base to), and then with torch.load(weights_only=True): a planted object is refused in one line naming what it refers to, without torch's advice that
    re-running with weights_only=False "will likely succeed"; nothing runs."""
    import shutil

    model = tmp_path / "pickled"
    shutil.copytree(world["base"], model)
    tensors = load_file(model / "model.safetensors")
    (model / "model.safetensors").unlink()
    marker = tmp_path / "ran"
    torch.save({**tensors, "planted": _Planted(str(marker))}, model / "pytorch_model.bin")
    proc = run_cli("eval", model, "--data", world["files"][0], "--quiet")  # one rule with apply: pickles are read only when allowed
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == (f"error: {model} holds only pickle .bin weights; pickle can run code when loaded: pass --allow-pickle "
                                   "to read them (with weights_only=True)")
    proc = run_cli("analyze", model, "--data", world["files"][0], "--out", tmp_path / "analysis", "--quiet")
    assert proc.returncode == 2 and "holds only pickle .bin weights" in proc.stderr and "--allow-pickle" in proc.stderr, proc.stderr
    assert not (tmp_path / "analysis").exists()
    # a stray .safetensors beside the pickle is not what transformers reads: it passed for safe, and torch.load ran (trial73 F5)
    save_file({"x": torch.zeros(1)}, model / "adapter.safetensors")
    proc = run_cli("eval", model, "--data", world["files"][0], "--quiet")
    assert proc.returncode == 2 and "holds only pickle .bin weights" in proc.stderr, proc.stderr
    (model / "adapter.safetensors").unlink()
    proc = run_cli("eval", model, "--data", world["files"][0], "--quiet", "--allow-pickle")
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip()
    assert err.startswith(f"error: {model}: cannot load the weights (not plain tensors and numbers, refused by torch.load(weights_only=True)")
    assert "weights_only` set to `False`" not in err and "will likely succeed" not in err and len(err.splitlines()) == 1
    assert not marker.exists()
