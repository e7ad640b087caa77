#!/usr/bin/env python
"""Fuzz the recipe / base-config / training-config front end: nothing may crash or hang.

Generates mutated recipes (from recipes/**/*.yaml and random layouts), mutated base config.json
files and mutated training configs (from recipes/train/*.yaml, with ``key=value`` overrides),
mixed with the known attack shapes (alias bombs, recursive aliases, 500-level nesting, complex
keys, odd tags, 5000-digit integers, huge sizes, configs that are lists or null, zero heads,
bogus rope types, transformers 5's ``{"__float__": "Infinity"}``...), and runs each through
``midus-surgery validate`` / ``plan`` (in-process, the CLI's own ``main``) or the training
config loader, each case in a forked worker with a memory cap and a kill timeout.

Every case is classified:

  ok                  exit 0
  invalid_located     exit 2, every problem at file:line:col
  invalid_file        exit 2, every problem at least names the file (some without line:col)
  unlocated           exit 2 with a problem line that names no file        (a failure)
  other_exit          any other exit status                                 (a failure)
  traceback           an exception escaped the command                      (a failure)
  slow                finished, but after more than --slow seconds          (a failure)
  timeout             killed after --kill-after seconds                     (a failure)
  crash               the worker died (signal, memory cap) without a result (a failure)

    python tools/fuzz_recipes.py --cases 5000            # summary; exit 1 if any failure
    python tools/fuzz_recipes.py --cases 300 --seed 7 --json out.json
    python tools/fuzz_recipes.py --show 1234             # one case: its files and output
    python tools/fuzz_recipes.py --cases 5000 --list invalid_file   # each such case: number, shape, line

--list CLASS prints, after the summary, every case of that class with the first problem line that
has no line:col (for invalid_file and unlocated; the first problem line for the other non-ok
classes), the case's directory cut from it. --json keeps the case numbers of every class other
than ok and invalid_located under ``cases_by_class``, so any of them can be looked at with --show.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import os
import platform
import random
import re
import resource
import select
import shutil
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # forked workers never share a thread pool
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402

FAILURES = ("unlocated", "other_exit", "traceback", "slow", "timeout", "crash")
OUTCOMES = ("ok", "invalid_located", "invalid_file", *FAILURES)

# ----------------------------------------------------------------------------------------------
# Seeds


TINY_CONFIGS = {
    "llama": dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=128, max_position_embeddings=128, tie_word_embeddings=True),
    "qwen2": dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=128, max_position_embeddings=128, use_sliding_window=True,
                  sliding_window=16, max_window_layers=2),
    "gemma2": dict(model_type="gemma2", hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=16, vocab_size=128, max_position_embeddings=128, sliding_window=16),
    "gpt2": dict(model_type="gpt2", n_embd=64, n_layer=4, n_head=4, vocab_size=128, n_positions=128),
    "mistral": dict(model_type="mistral", hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=128, max_position_embeddings=128, sliding_window=16),
}


def seed_recipes() -> list[tuple[str, dict, dict | None]]:
    """(name, recipe dict, the base config dict it was written for, or None)."""
    out = []
    for path in sorted((ROOT / "recipes").rglob("*.yaml")):
        if "train" in path.relative_to(ROOT / "recipes").parts:
            continue
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError:
            continue
        config = None
        cfg_name = (data.get("base") or {}).get("config")
        if cfg_name and (path.parent / cfg_name).is_file():
            config = json.loads((path.parent / cfg_name).read_text())
        out.append((str(path.relative_to(ROOT)), data, config))
    return out


def seed_train_configs() -> list[dict]:
    return [yaml.safe_load(p.read_text()) for p in sorted((ROOT / "recipes" / "train").glob("*.yaml"))] or [
        {"init_from": "model", "run_dir": "run", "data": {"train": ["a.txt"]}, "tokens": "1M"}]


# ----------------------------------------------------------------------------------------------
# Interesting values and attack shapes

BIG = "1" + "0" * 400

VALUES = [
    0, -1, 1, 2, 3, 7, 64, 255, 1023, 1024, 1025, 2047, 2048, 2049, 8192, 65536, 2**31, 2**32 + 1, 2**63, 2**64, 10**30,
    0.0, -0.0, 0.5, 1.5, 1e-300, 1e300, float("inf"), float("-inf"), float("nan"),
    True, False, None, "", " ", "x", "auto", "memory", "identity", "transformer", "base", "none", "heads", "hidden",
    "2GB", "0B", "1MB", "999KB", "1.5TiB", "9" * 30 + "GB", BIG + "B", "1e30", "-5", "20M", "1.5B", BIG, "NaN", "inf",
    "a" * 300, "/" + "b" * 300 + "/c", "~nosuchuser_fz/x", "../" * 50 + "x", "x\ty", "ünïcødé", "\u202e", "a\u0000b",
    [], [0], [0, 1], [1, 0], [0, 0], [-1, 2], [0, 10**9], ["a", "b"], [[0, 1]], [None], list(range(40)),
    {}, {"a": 1}, {"layers": [0, 2]}, {"kind": "memory"}, {"after_every": 1},
]

CONFIG_VALUES = [
    0, -1, 1, 2, 3, 4, 63, 64, 1024, 1025, 10**6, 10**12, 2**63, "4", "64", 4.0, 64.5, 1e308, None, True, False, [], [4], {},
    {"__float__": "Infinity"}, {"__float__": "-Infinity"}, {"__float__": "NaN"}, {"__float__": "bogus"}, "bogus", "",
]

ATTACKS = {
    "recursive_alias": "extra: &a [*a]\n",
    "recursive_alias_map": "extra: &a {x: *a}\n",
    "nest_500": "extra: " + "[" * 500 + "]" * 500 + "\n",
    "nest_500_map": "extra:\n" + "".join("  " * (i + 1) + f"k{i}:\n" for i in range(500)),
    "complex_key": "? [a, b]\n: 1\n",
    "complex_key_map": "? {a: 1}\n: 1\n",
    "bool_maybe": "seed: !!bool maybe\n",
    "int_float": "seed: !!int 1.5\n",
    "float_word": "seed: !!float abc\n",
    "timestamp": "seed: !!timestamp yesterday\n",
    "binary": "seed: !!binary '%%%'\n",
    "python_tag": "seed: !!python/object:os.system ls\n",
    "unknown_tag": "seed: !fancy 3\n",
    "set_tag": "seed: !!set {a, b}\n",
    "omap_tag": "seed: !!omap [a: 1]\n",
    "int_5000": "seed: " + "7" * 5000 + "\n",
    "float_5000": "seed: 1" + "0" * 5000 + ".5\n",
    "undefined_alias": "seed: *nothing\n",
    "merge_bad": "seed:\n  <<: 3\n",
    "null_key": "~: 1\n",
    "int_key": "12: 1\n",
    "bool_key": "yes: 1\n",
    "tab_indent": "seed:\n\t- 1\n",
    "nul_char": "seed: 'a\x00b'\n",
    "bom_mid": "seed: \ufeff1\n",
    "multi_doc": "---\na: 1\n---\nb: 2\n",
    "huge_string": "seed: '" + "x" * 200_000 + "'\n",
    "many_items": "extra: [" + ", ".join(["1"] * 12_000) + "]\n",
}


def billion_laughs(width: int = 9, depth: int = 9) -> str:
    lines = ["lol0: &a0 [" + ", ".join(["lol"] * width) + "]"]
    for d in range(1, depth):
        lines.append(f"lol{d}: &a{d} [" + ", ".join([f"*a{d - 1}"] * width) + "]")
    return "\n".join(lines) + "\n"


def alias_chain_depth(n: int = 40) -> str:
    """Each anchor nests the previous one a few levels deeper: depth grows with the alias chain."""
    lines = ["c0: &c0 [[[[x]]]]"]
    for d in range(1, n):
        lines.append(f"c{d}: &c{d} [[[[*c{d - 1}]]]]")
    return "\n".join(lines) + "\n"


ATTACKS["billion_laughs"] = billion_laughs()
ATTACKS["billion_laughs_1kb"] = billion_laughs(10, 10)
ATTACKS["alias_chain_depth"] = alias_chain_depth()

RECIPE_ATTACKS = [  # (dotted path, value): known bad values of recipe keys
    ("memory.n_subkeys", 10**12), ("memory.n_subkeys", 2**40), ("memory.latent_dim", 10**9), ("memory.topk", 10**6),
    ("memory.n_subkeys", 8192), ("memory.latent_dim", 65536), ("output.shard_size", BIG + "B"), ("output.shard_size", "1" + "0" * 30 + "TB"),
    ("output.shard_size", 10**20), ("output.shard_size", "1e400B"), ("flops_seq_len", 10**15), ("seed", 2**70),
    ("base.path", "a" * 300), ("base.config", "x" * 5000), ("base.path", "dir/" + "y" * 256 + ".gguf"), ("output.dir", "z" * 400),
    ("base.path", "~nosuchuser_fz/model"), ("base.gguf_file", "q" * 300 + ".gguf"), ("memory.norm_eps", float("inf")),
    ("memory.norm_eps", float("nan")), ("layout.interleave.after_every", 10**6),
]

CONFIG_ATTACKS = [
    "[]", "null", '"text"', "3", "{}", "", "{", '{"model_type": "llama",}', "[" * 20_000 + "]" * 20_000,
    '{"model_type": "llama", "num_hidden_layers": ' + "9" * 5000 + "}",
]

TRAIN_OVERRIDES = [
    "tokens=" + BIG, "tokens=1e29", "tokens=" + "1" + "0" * 29, "micro_batch_size=100000000", "micro_batch_size=0", "tokens=1" + "0" * 400 + "M",
    "optim.lr=!!float abc", "optim.lr=.inf", "optim.lr=.nan", "data.train=*a", "data.train=&a [*a]", "bogus=1", "optim.betas=[2, 3]",
    "data.block_size=" + "9" * 5000, "seed=!!bool maybe", "eval.every=-1", "optim=3", "optim.lr.x=1", "=", "tokens", "data.train=[a, b]",
    "freeze=base", "optim.warmup=1.5", "log.every=0", "data.held_out_fraction=0.9", "grad_accum=10**8", "tokens=20M",
    "data.train={? [a]: 1}", "resume=' '", "checkpoint.keep_last=100000", "data.block_size=4194304",
]

# ----------------------------------------------------------------------------------------------
# Mutation


def _paths(node, prefix=()) -> list[tuple]:
    out = [prefix]
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, prefix + (i,))
    return out


def _get(node, path):
    for p in path:
        node = node[p]
    return node


def _set_dotted(data: dict, dotted: str, value) -> None:
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value


def mutate_tree(rng: random.Random, data, values: list, rounds: int):
    data = copy.deepcopy(data)
    for _ in range(rounds):
        paths = [p for p in _paths(data) if p]
        if not paths:
            return rng.choice(values) if rng.random() < 0.5 else data
        path = rng.choice(paths)
        parent, last = _get(data, path[:-1]), path[-1]
        op = rng.random()
        if op < 0.45:
            parent[last] = copy.deepcopy(rng.choice(values))
        elif op < 0.55 and isinstance(parent, dict):
            del parent[last]
        elif op < 0.62 and isinstance(parent, dict):
            parent[rng.choice(["extra", "Memory", "n_subkey", "layers", "kind", str(last) + "_", "anatomy"])] = rng.choice(values)
        elif op < 0.7:
            parent[last] = [parent[last]] if rng.random() < 0.5 else {"value": parent[last]}
        elif op < 0.78:
            other = rng.choice(paths)
            with contextlib.suppress(Exception):
                parent[last] = copy.deepcopy(_get(data, other))
        elif op < 0.86 and isinstance(parent[last], int) and not isinstance(parent[last], bool):
            parent[last] = parent[last] + rng.choice([-2, -1, 1, 2, 1000, -1000, 2**40])
        elif op < 0.93 and isinstance(parent[last], list):
            if parent[last] and rng.random() < 0.5:
                parent[last].pop(rng.randrange(len(parent[last])))
            else:
                parent[last].append(copy.deepcopy(rng.choice(values)))
        elif isinstance(parent, dict):
            parent[rng.choice(["memory", "layout", "output", "base", "seed", "flops_seq_len", "allow_adjacent_memory"])] = copy.deepcopy(rng.choice(values))
    return data


def random_layout(rng: random.Random, layers: int) -> dict:
    kind = rng.choice(["transformer", "identity", "memory"])
    form = rng.choice(["interleave", "interleave_list", "slices", "stack", "layers"])
    if form == "interleave":
        return {"interleave": {"after_every": rng.randint(1, max(1, layers)), "kind": kind}}
    if form == "interleave_list":
        return {"interleave": {"after": sorted(rng.sample(range(layers), rng.randint(1, max(1, layers // 2)))), "kind": kind}}
    if form == "slices":
        cut = rng.randint(1, layers)
        return {"slices": [{"layers": [0, cut]}, {"layers": [rng.randint(0, cut - 1), layers], "kind": kind}]}
    if form == "stack":
        start = rng.randint(0, layers - 1)
        return {"stack": {"layers": [start, rng.randint(start + 1, layers)], "kind": kind}}
    return {"layers": [{"source": i} for i in range(layers)] + [{"source": rng.randrange(layers), "kind": kind}]}


def mutate_text(rng: random.Random, text: str) -> str:
    lines = text.splitlines(keepends=True) or ["\n"]
    op = rng.random()
    i = rng.randrange(len(lines))
    if op < 0.15:
        del lines[i]
    elif op < 0.25:
        lines.insert(i, lines[rng.randrange(len(lines))])
    elif op < 0.35:
        lines[i] = " " + lines[i] if rng.random() < 0.5 else lines[i].lstrip()
    elif op < 0.5 and ":" in lines[i]:
        head, _, tail = lines[i].partition(":")
        tag = rng.choice(["!!bool ", "!!int ", "!!float ", "!!str ", "!!null ", "!foo ", "!!set ", "!!binary ", "&x ", "*x ", "!!timestamp ", "!!python/tuple "])
        lines[i] = f"{head}: {tag}{tail.strip()}\n"
    elif op < 0.6:
        cut = rng.randrange(len(text) + 1)
        return text[:cut]
    elif op < 0.7:
        pos = rng.randrange(len(text) + 1)
        return text[:pos] + rng.choice(["[", "]", "{", "}", ":", "-", "&", "*", "!", "?", "|", ">", "'", '"', "#", "\t", "%", "@", "`", "\x00", "\ufeff"]) + text[pos:]
    elif op < 0.8 and ":" in lines[i]:
        head, _, _ = lines[i].partition(":")
        lines[i] = f"{head}: {rng.choice(['7' * 5000, '1e400', '-.inf', '.nan', '0x' + 'f' * 40, '0o777', '1_000', '0b101', '1:30:00', '2024-01-01', '~', 'yes', 'off', repr(BIG)])}\n"
    elif op < 0.9:
        lines.append(rng.choice(list(ATTACKS.values())))
    else:
        anchor_line = rng.randrange(len(lines))
        if ":" in lines[anchor_line]:
            head, _, tail = lines[anchor_line].partition(":")
            if tail.strip():
                lines[anchor_line] = f"{head}: &anc {tail.strip()}\n"
                lines.append("extra_alias: *anc\n")
    return "".join(lines)


def dump(data) -> str:
    try:
        return yaml.safe_dump(data, sort_keys=False, allow_unicode=rng_unicode(data))
    except (ValueError, yaml.YAMLError):
        return "broken: [\n"


def rng_unicode(data) -> bool:
    return len(str(data)) % 2 == 0


def make_case(seed: int, index: int, recipes, train_seeds) -> dict:
    """The files of case ``index``: {'kind', 'mode', 'files': {name: text}, 'target', 'overrides', 'shape'}."""
    rng = random.Random(f"{seed}:{index}")
    roll = rng.random()
    files: dict[str, str] = {}
    case = {"index": index, "overrides": []}
    if roll < 0.12:
        # training configs and their command-line overrides
        data = mutate_tree(rng, rng.choice(train_seeds), VALUES, rng.randint(0, 3))
        text = dump(data)
        if rng.random() < 0.3:
            text = mutate_text(rng, text)
        files["train.yaml"] = text
        case.update(kind="train", mode="train", target="train.yaml",
                    overrides=rng.sample(TRAIN_OVERRIDES, rng.randint(0, 3)) if rng.random() < 0.6 else [])
        case["shape"] = "train"
        case["files"] = files
        return case

    # recipes, against a base config written next to them
    name, recipe, own_config = rng.choice(recipes)
    if own_config is not None and rng.random() < 0.4:
        config = copy.deepcopy(own_config)
    else:
        config = copy.deepcopy(TINY_CONFIGS[rng.choice(sorted(TINY_CONFIGS))])
        recipe = copy.deepcopy(recipe)
        recipe["layout"] = random_layout(rng, config.get("num_hidden_layers", config.get("n_layer", 4)))
        if rng.random() < 0.5:
            recipe["memory"] = {"n_subkeys": rng.choice([4, 8, 16]), "topk": rng.choice([1, 2, 4]), "latent_dim": rng.choice([8, 16])}
    recipe = copy.deepcopy(recipe)
    recipe["base"] = {**(recipe.get("base") or {}), "path": "no-such-model", "config": "config.json"}
    shape = "recipe"
    config_text = None
    if roll < 0.22:
        shape = "recipe_attack_value"
        dotted, value = rng.choice(RECIPE_ATTACKS)
        _set_dotted(recipe, dotted, value)
        text = dump(recipe)
    elif roll < 0.34:
        shape = "yaml_attack"
        attack = rng.choice(sorted(ATTACKS))
        shape += ":" + attack
        text = dump(recipe)
        text = ATTACKS[attack] + text if rng.random() < 0.5 and not attack.startswith(("multi", "bom")) else text + ATTACKS[attack]
    elif roll < 0.52:
        shape = "config"
        r = rng.random()
        if r < 0.15:
            config_text = rng.choice(CONFIG_ATTACKS)
            shape = "config_attack"
        elif r < 0.3:
            config["rope_scaling"] = rng.choice([{"rope_type": "bogus", "factor": 2.0}, {"type": "nonsense"}, {"rope_type": "linear", "factor": 2.0},
                                                 {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
                                                 {"rope_type": "dynamic"}, {"rope_type": 7}, "linear", [1], {"full_attention": {"rope_type": "bogus"}}])
            shape = "config_rope"
        elif r < 0.45:
            key = rng.choice(["time_step_limit", "rms_norm_eps", "initializer_range", "attention_dropout", "rope_theta"])
            config[key] = rng.choice([{"__float__": "Infinity"}, {"__float__": "-Infinity"}, [0.0, {"__float__": "Infinity"}]])
            shape = "config_special_float"
        else:
            keys = ["num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads", "vocab_size", "head_dim",
                    "intermediate_size", "max_position_embeddings", "sliding_window", "model_type", "layer_types", "tie_word_embeddings",
                    "num_experts_per_tok", "n_layer", "n_head", "n_embd", "torch_dtype", "dtype", "rope_theta", "auto_map"]
            for _ in range(rng.randint(1, 3)):
                key = rng.choice(keys)
                if rng.random() < 0.15:
                    config.pop(key, None)
                else:
                    config[key] = copy.deepcopy(rng.choice(CONFIG_VALUES))
        text = dump(recipe)
    else:
        recipe = mutate_tree(rng, recipe, VALUES, rng.randint(0, 3))
        text = dump(recipe)
        for _ in range(rng.choice([0, 0, 1, 1, 2])):
            text = mutate_text(rng, text)
    files["recipe.yaml"] = text
    if config_text is None:
        try:
            config_text = json.dumps(config)
        except (TypeError, ValueError):
            config_text = "{}"
    files["config.json"] = config_text
    mode = rng.choices(["validate", "plan-json", "plan"], weights=[7, 2, 1])[0]
    case.update(kind="recipe", mode=mode, target="recipe.yaml", shape=shape, files=files, seed_recipe=name)
    return case


# ----------------------------------------------------------------------------------------------
# Running one case (in a forked worker)

_LOC = re.compile(r":\d+:\d+(:|$)")


def classify(case: dict, code, output: str, target: str) -> str:
    if code == 0:
        return "ok"
    if code != 2:
        return "other_exit"
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    problems = [ln for ln in lines if not ln.startswith("INVALID ")]
    if not problems:
        return "unlocated"
    # A problem starts with its place (the file, or "command line" for a train override); the
    # lines after it that name neither continue its message (e.g. the anatomy help block).
    if not problems[0].startswith((target, "command line")):
        return "unlocated"
    located = True
    for line in problems:
        if line.startswith(target) and not _LOC.match(line[len(target):]):
            located = False
    return "invalid_located" if located else "invalid_file"


def first_unlocated(output: str, target: str) -> str:
    """The first problem line of ``output`` without line:col (else its first problem line), the target's folder cut."""
    lines = [ln.strip() for ln in output.splitlines() if ln.strip() and not ln.strip().startswith("INVALID ")]
    pick = next((ln for ln in lines if ln.startswith(target) and not _LOC.match(ln[len(target):])), lines[0] if lines else "")
    folder = str(Path(target).parent) + os.sep if target else ""
    return (pick.replace(folder, "") if folder != os.sep else pick)[:300]


def _clip(text: str, head: int = 6000, tail: int = 2000) -> str:
    return text if len(text) <= head + tail else text[:head] + "\n[...]\n" + text[-tail:]


def _problems_json(text: str) -> bool:
    """Whether ``text`` is plan --json's answer to an invalid recipe: {"valid": false, "problems": [...]}."""
    try:
        data = json.loads(text)
    except ValueError:
        return False
    problems = data.get("problems") if isinstance(data, dict) else None
    return data.get("valid") is False and isinstance(problems, list) and bool(problems) \
        and all(isinstance(p, dict) and {"where", "field", "message"} <= set(p) for p in problems)


def run_case_inline(case: dict, directory: Path) -> dict:
    """Run one case in this process: {'code', 'output', 'error', 'seconds'}."""
    for name, text in case["files"].items():
        (directory / name).write_bytes(text.encode("utf-8", "surrogatepass"))
    target = str(directory / case["target"])
    buf = io.StringIO()
    # plan --json prints its data (the plan, or the problems as JSON) on stdout: checked apart from the lines on stderr
    data = io.StringIO() if case["mode"] == "plan-json" else buf
    start = time.perf_counter()
    code, error = None, None
    try:
        with contextlib.redirect_stdout(data), contextlib.redirect_stderr(buf):
            if case["mode"] == "train":
                from midus_surgery.errors import RecipeError
                from midus_surgery.train.config import load_train_config

                try:
                    loaded = load_train_config(target, case["overrides"])
                    loaded.config.token_budget  # noqa: B018 - what the trainer reads first
                    code = 0
                except RecipeError as exc:
                    print(str(exc))
                    code = exc.exit_code
            else:
                from midus_surgery.cli import main

                argv = {"validate": ["validate", target], "plan-json": ["plan", target, "--json"], "plan": ["plan", target]}[case["mode"]]
                code = main(argv)
    except BaseException:  # noqa: BLE001 - a traceback is what we are hunting
        error = traceback.format_exc()
    if data is not buf and error is None and code == 2 and not _problems_json(data.getvalue()):
        error = f"plan --json exited 2 without its problems as JSON on stdout: {data.getvalue()[:300]!r}"
    seconds = time.perf_counter() - start
    return {"code": code, "output": _clip(buf.getvalue()), "error": error, "seconds": seconds, "target": target}


def _vm_bytes() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _child(case: dict, directory: Path, write_fd: int, mem_bytes: int) -> None:
    try:
        if mem_bytes:
            limit = _vm_bytes() + mem_bytes
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        result = run_case_inline(case, directory)
        payload = json.dumps(result).encode()
    except BaseException:  # noqa: BLE001
        payload = json.dumps({"code": None, "output": "", "error": traceback.format_exc(), "seconds": 0.0, "target": ""}).encode()
    with contextlib.suppress(Exception):
        with os.fdopen(write_fd, "wb") as pipe:
            pipe.write(payload)
    os._exit(0)


def warm_up() -> None:
    """Import what the workers need once, in the parent, so each fork starts warm."""
    import midus_surgery.cli  # noqa: F401
    import midus_surgery.compiler.planner  # noqa: F401
    import midus_surgery.train.config  # noqa: F401

    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        (d / "config.json").write_text(json.dumps(TINY_CONFIGS["llama"]))
        (d / "r.yaml").write_text("base: {path: none, config: config.json}\nlayout: {interleave: {after_every: 2, kind: memory}}\n"
                                  "memory: {n_subkeys: 8, topk: 2, latent_dim: 8}\noutput: {dir: out}\n")
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            midus_surgery.cli.main(["validate", str(d / "r.yaml")])
            midus_surgery.cli.main(["plan", str(d / "r.yaml")])


def run_cases(cases: int, seed: int = 0, jobs: int | None = None, slow: float = 10.0, kill_after: float = 60.0,
              mem_mb: int = 4096, progress: bool = False, start: int = 0) -> dict:
    """Run cases start..start+cases-1 in forked workers; the summary dict (see main)."""
    jobs = jobs or os.cpu_count() or 1
    recipes, train_seeds = seed_recipes(), seed_train_configs()
    warm_up()
    tmp_root = Path(tempfile.mkdtemp(prefix="midus-fuzz-"))
    results: list[dict] = []
    running: dict[int, tuple] = {}  # pid -> (case, read fd, started, directory, chunks)
    todo = list(range(start, start + cases))
    t0 = time.perf_counter()
    try:
        while todo or running:
            while todo and len(running) < jobs:
                index = todo.pop(0)
                case = make_case(seed, index, recipes, train_seeds)
                directory = tmp_root / f"case{index}"
                directory.mkdir()
                r, w = os.pipe()
                pid = os.fork()
                if pid == 0:
                    os.close(r)
                    _child(case, directory, w, mem_mb * 2**20)
                os.close(w)
                running[pid] = (case, r, time.perf_counter(), directory, [])
            fds = {entry[1]: pid for pid, entry in running.items()}
            ready, _, _ = select.select(list(fds), [], [], 0.2)
            for fd in ready:
                chunk = os.read(fd, 1 << 16)
                running[fds[fd]][4].append(chunk)
            now = time.perf_counter()
            for pid in list(running):
                case, r, started, directory, chunks = running[pid]
                done, status = os.waitpid(pid, os.WNOHANG)
                killed = False
                if not done and now - started > kill_after:
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                    killed, done = True, pid
                if not done:
                    continue
                with contextlib.suppress(BlockingIOError, OSError):
                    while True:
                        more = os.read(r, 1 << 16)
                        if not more:
                            break
                        chunks.append(more)
                os.close(r)
                wall = time.perf_counter() - started
                del running[pid]
                results.append(_record(case, b"".join(chunks), killed, wall, slow))
                shutil.rmtree(directory, ignore_errors=True)
                if progress and len(results) % 100 == 0:
                    print(f"  {len(results)}/{cases} cases, {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    finally:
        for pid in running:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
        shutil.rmtree(tmp_root, ignore_errors=True)
    wall = time.perf_counter() - t0
    counts = {name: 0 for name in OUTCOMES}
    for res in results:
        counts[res["outcome"]] += 1
    slowest = max(results, key=lambda res: res["seconds"], default=None)
    return {
        "cases": len(results), "seed": seed, "start": start, "jobs": jobs, "counts": counts,
        "tracebacks": counts["traceback"], "timeouts": counts["timeout"], "over_slow": counts["slow"] + counts["timeout"],
        "failures": sum(counts[name] for name in FAILURES),
        "slow_threshold_s": slow, "slowest_s": round(slowest["seconds"], 3) if slowest else None,
        "slowest_case": slowest["index"] if slowest else None, "wall_s": round(wall, 1),
        "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "by_shape": _by_shape(results),
        "cases_by_class": {name: sorted(res["index"] for res in results if res["outcome"] == name)
                           for name in OUTCOMES if name not in ("ok", "invalid_located") and counts[name]},
        "results": sorted(results, key=lambda res: res["index"]),
        "failed": [res for res in results if res["outcome"] in FAILURES],
    }


def _record(case: dict, payload: bytes, killed: bool, wall: float, slow: float) -> dict:
    base = {"index": case["index"], "kind": case["kind"], "mode": case["mode"], "shape": case["shape"], "seconds": round(wall, 3)}
    if killed:
        return {**base, "outcome": "timeout", "detail": f"killed after {wall:.1f} s"}
    try:
        result = json.loads(payload.decode())
    except (ValueError, UnicodeDecodeError):
        return {**base, "outcome": "crash", "detail": "the worker died without a result (signal or memory cap)"}
    base["seconds"] = round(result["seconds"], 3)
    if result["error"]:
        return {**base, "outcome": "traceback", "detail": result["error"][-3000:]}
    outcome = classify(case, result["code"], result["output"], result["target"])
    if outcome not in FAILURES and result["seconds"] > slow:
        outcome = "slow"
    out = {**base, "outcome": outcome}
    if outcome not in ("ok", "invalid_located"):
        out["line"] = first_unlocated(result["output"], result["target"])
    if outcome in FAILURES:
        out["detail"] = f"exit {result['code']}: {result['output'][:1500]}"
    return out


def _by_shape(results: list[dict]) -> dict:
    shapes: dict[str, dict[str, int]] = {}
    for res in results:
        key = res["shape"].split(":")[0]
        shapes.setdefault(key, {}).setdefault(res["outcome"], 0)
        shapes[key][res["outcome"]] += 1
    return shapes


def _compact_int_lists(text: str) -> str:
    """json.dumps(indent=2) with each list of whole numbers on one line (the case numbers stay short)."""
    return re.sub(r"\[\s*(-?\d+(?:,\s*-?\d+)*)\s*\]", lambda m: "[" + ", ".join(m.group(1).replace(",", " ").split()) + "]", text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--start", type=int, default=0, help="first case index (cases are a function of seed and index)")
    parser.add_argument("--jobs", type=int, default=None, help="parallel workers (default: the CPU count)")
    parser.add_argument("--slow", type=float, default=10.0, help="a case finishing after this many seconds is a failure")
    parser.add_argument("--kill-after", type=float, default=60.0, help="kill a case after this many seconds (a timeout)")
    parser.add_argument("--mem-mb", type=int, default=4096, help="address space a worker may add (RLIMIT_AS), MiB")
    parser.add_argument("--json", type=Path, help="write the summary and every failure here")
    parser.add_argument("--show", type=int, help="print case SHOW's files and run it in this process")
    parser.add_argument("--list", choices=OUTCOMES, metavar="CLASS",
                        help="print every case of this outcome class: number, shape, mode and its first unlocated problem line")
    args = parser.parse_args(argv)
    if args.show is not None:
        case = make_case(args.seed, args.show, seed_recipes(), seed_train_configs())
        print(json.dumps({k: v for k, v in case.items() if k != "files"}))
        for name, text in case["files"].items():
            print(f"--- {name} ({len(text)} chars)\n{text[:3000]}")
        with tempfile.TemporaryDirectory() as tmp:
            res = run_case_inline(case, Path(tmp))
        print(f"--- exit {res['code']} in {res['seconds']:.2f} s, outcome {classify(case, res['code'], res['output'], res['target']) if not res['error'] else 'traceback'}")
        print(res["error"] or res["output"])
        return 0
    summary = run_cases(args.cases, args.seed, args.jobs, args.slow, args.kill_after, args.mem_mb, progress=True, start=args.start)
    print(f"{summary['cases']} cases (seed {summary['seed']}) in {summary['wall_s']} s on {summary['machine']}, {summary['jobs']} workers")
    for name in OUTCOMES:
        print(f"  {name:16s} {summary['counts'][name]}")
    print(f"tracebacks: {summary['tracebacks']}, over {summary['slow_threshold_s']:g} s: {summary['over_slow']} "
          f"(timeouts {summary['timeouts']}), slowest case {summary['slowest_case']}: {summary['slowest_s']} s")
    for res in summary["failed"][:20]:
        print(f"FAILED case {res['index']} ({res['shape']}, {res['mode']}): {res['outcome']}\n    " + res.get("detail", "").strip().replace("\n", "\n    ")[-1200:])
    results = summary.pop("results")
    if args.list:
        listed = [res for res in results if res["outcome"] == args.list]
        print(f"{len(listed)} cases {args.list}:")
        for res in listed:
            print(f"  {res['index']:6d} {res['shape']:32s} {res['mode']:9s} {res.get('line', '')}")
    if args.json:
        args.json.write_text(_compact_int_lists(json.dumps(summary, indent=2)))
    return 1 if summary["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
