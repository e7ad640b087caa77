"""Tiny offline models, tokenizers and corpora for the training and evaluation tests.

A word-level tokenizer trained on the test text (no hub download), wrapped as a
PreTrainedTokenizerFast and saved beside a tiny random Llama. ``with_plan`` adds a hand-written
``midus_plan.json`` that marks layers 1 and 3 as inserted (LLaMA-Pro-style identity copies).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

WORDS = ("the cat dog bird fish sat ran flew swam on in under over mat log tree pond and then "
         "a big small red blue green quick slow happy sad").split()


def sentences(n: int, seed: int = 0) -> list[str]:
    """A repetitive little language: easy to learn, so the loss must go down."""
    rng = random.Random(seed)
    subjects, verbs, places = ["cat", "dog", "bird", "fish"], {"cat": "sat", "dog": "ran", "bird": "flew", "fish": "swam"}, ["mat", "log", "tree", "pond"]
    out = []
    for _ in range(n):
        s = rng.choice(subjects)
        adj = rng.choice(["big", "small", "red", "blue", "green", "quick", "slow", "happy", "sad"])
        out.append(f"the {adj} {s} {verbs[s]} on the {places[subjects.index(s)]} .")
    return out


def write_corpus(directory: Path, files: int = 3, sentences_per_file: int = 60, seed: int = 0) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(files):
        p = directory / f"doc{i}.txt"
        p.write_text(" ".join(sentences(sentences_per_file, seed + i)) + "\n")
        paths.append(p)
    return paths


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<eos>": 1, "<pad>": 2, ".": 3}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>", pad_token="<pad>")


PLAN_LAYERS = [(0, 0, "base"), (1, 0, "identity"), (2, 1, "base"), (3, 1, "identity")]


def make_model_dir(path: Path, *, with_plan: bool = True, seed: int = 0, vocab_size: int = 64, dtype=torch.float32) -> Path:
    """A tiny random Llama (4 layers, hidden 32) with a word-level tokenizer, saved to ``path``."""
    from tiny_configs import tiny_config
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config("llama", vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                         num_key_value_heads=2, bos_token_id=None, eos_token_id=1, pad_token_id=2)
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    model.save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    if with_plan:
        plan = {
            "model_type": "llama", "base_num_hidden_layers": 2, "num_hidden_layers": 4,
            "layers": [{"index": i, "source": s, "kind": k, "params": 0} for i, s, k in PLAN_LAYERS],
            "anatomy": {"layers_path": "model.layers"}, "midus": {}, "params": {},
        }
        (path / "midus_plan.json").write_text(json.dumps(plan, indent=2))
        (path / "midus_recipe.yaml").write_text("# hand-written test plan\n")
    return path


def make_midus_output(root: Path, memory: str = "") -> Path:
    """A MIDUS output of the tiny Llama (4 layers -> 6: a memory block after every second layer), applied into root/out;
    ``memory``: more lines of the recipe's memory section (e.g. "  query_norm: batch\n")."""
    from midus_surgery.compiler.planner import plan_recipe
    from midus_surgery.emit.emitter import emit

    base = make_model_dir(root / "base", with_plan=False)
    recipe = root / "midus.yaml"
    recipe.write_text(f"base:\n  path: {base}\nlayout:\n  interleave:\n    after_every: 2\n    kind: memory\n"
                      f"memory:\n  n_subkeys: 8\n  topk: 4\n  latent_dim: 8\n{memory}output:\n  dir: out\n  dtype: float32\n")
    return emit(plan_recipe(recipe), progress=False).out_dir


def write_config(path: Path, model: Path, run_dir: Path, corpus: Path | list, cache: Path, **extra) -> Path:
    """A small training config; ``extra`` entries are dotted keys -> values."""
    import yaml

    data = {
        "init_from": str(model), "run_dir": str(run_dir), "seed": 0, "tokens": 16 * 32 * 10,
        "micro_batch_size": 4, "grad_accum": 1, "precision": "fp32",
        "data": {"train": [str(c) for c in corpus] if isinstance(corpus, list) else [str(corpus)],
                 "block_size": 16, "cache_dir": str(cache), "held_out_fraction": 0.1},
        "optim": {"lr": 3e-3, "warmup": 2, "weight_decay": 0.0},
        "log": {"every": 5, "progress": False, "tensorboard": False, "plot": False},
    }
    for key, value in extra.items():
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def state_of(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        out.update(load_file(f))
    return out
