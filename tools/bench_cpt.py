#!/usr/bin/env python
"""Continued pre-training benchmark: DUS vs LLaMA-Pro vs MIDUS from the same SmolLM2-135M base.

Same insertion points (6 blocks, one after every 5th of 30 layers: recipes/smollm2-135m-{dus,llama-pro,midus}.yaml),
same data in the same order (same seed, same token cache), same token budget, same freeze policy
(default `base`, the paper's protocol), each trained with the bundled runner (`midus-surgery train`) on a
real English corpus (default: the Python 3.11 documentation, with every 10th file held out), then evaluated on
(a) held-out text of the training domain and (b) text of another domain (default: the King James Bible) to
see forgetting. Rows: base (no training), DUS, LLaMA-Pro, MIDUS.

    python tools/bench_cpt.py --quick            # smallest meaningful run: 4 steps of 4 x 128 per variant, 4 eval blocks
    python tools/bench_cpt.py                    # default budget (sized for <= 60 min on 2 CPU cores)
    python tools/bench_cpt.py --tokens 2M        # scale it (same script on a GPU: precision auto -> bf16)
    python tools/bench_cpt.py --only LLaMA-Pro MIDUS \
        --recipe LLaMA-Pro=recipes/ablation/every2/smollm2-135m-llama-pro-every2.yaml \
        --recipe MIDUS=recipes/ablation/every2/smollm2-135m-midus-every2.yaml --label ...   # other recipes per row

Writes work/bench/cpt-<label>/ (configs, run dirs, results.json, loss.png); then the report
(tools/bench_cpt_report.py) copies results.json and the loss plot to docs/results/reproduction-<label>.{json,png}
and replaces the `<label>` section of docs/results/reproduction-runs.md (--no-doc: don't touch docs/).
docs/reproduction.md, the summary of these runs, is written by hand.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

from bench_common import command_line, cpu_name, load_avg, recipe_output, versions
from bench_cpt_report import BASE_LAYERS, fmt_table, plot, plot_panels, publish, redraw  # noqa: F401 - plot_panels: the tests' door

from midus_surgery.io.output_dir import OutputError, remove_own_directory, use_workspace
from midus_surgery.model.midus_names import SHARED_BANK

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = [  # (row name, recipe kind, recipe, surgery output)
    ("DUS", "transformer", "recipes/smollm2-135m-dus.yaml", "work/out/smollm2-135m-dus"),
    ("LLaMA-Pro", "identity", "recipes/smollm2-135m-llama-pro.yaml", "work/out/smollm2-135m-llama-pro"),
    ("MIDUS", "memory", "recipes/smollm2-135m-midus.yaml", "work/out/smollm2-135m-midus"),
]
BASE = "work/smollm2-135m"
# Default budget: measured on the 2-core CPU this was sized on (fp32, 4 x 256 tokens per step).
DEFAULT_TOKENS = 49152
QUICK_TOKENS = 2048


def parse_tokens(s: str) -> int:
    m = re.fullmatch(r"\s*([0-9.]+)\s*([kKmMgG]?)\s*", s)
    if not m:
        raise argparse.ArgumentTypeError(f"not a token count: {s!r}")
    return int(float(m.group(1)) * {"": 1, "k": 10**3, "m": 10**6, "g": 10**9}[m.group(2).lower()])


def cli() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=parse_tokens, help=f"training tokens per run (default {DEFAULT_TOKENS}; --quick: {QUICK_TOKENS})")
    p.add_argument("--freeze", choices=["base", "none"], default="base", help="freeze policy of every run (default base)")
    p.add_argument("--quick", action="store_true", help="smallest meaningful run")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--train-corpus", default="python3.11-doc", help="work/corpora/NAME to train on (every --held-out-every-th file held out)")
    p.add_argument("--other-corpus", default="bible-kjv-text", help="work/corpora/NAME of the other domain (forgetting)")
    p.add_argument("--held-out-every", type=int, default=10)
    p.add_argument("--eval-blocks", type=int, help="blocks evaluated per domain (default 24; --quick: 4)")
    p.add_argument("--block-size", type=int, help="tokens per block (default 256; --quick: 128)")
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--precision", default="auto", help="auto: bf16 on a GPU, fp32 on a CPU")
    p.add_argument("--lr", type=float, default=2e-4, help="optim.lr of every run")
    p.add_argument("--memory-lr", type=float, default=1e-3, help="memory.lr (MIDUS only)")
    p.add_argument("--memory-schedule", choices=["constant", "same"], default="constant",
                   help="memory.schedule (MIDUS only): constant after warmup, or `same`: the base's cosine decay scaled to --memory-lr")
    p.add_argument("--memory-retrieval", choices=["learned", "frozen"], default="learned",
                   help="memory.retrieval (MIDUS only): frozen trains only the values (the fixed-retrieval analysis)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", nargs="+", choices=["base"] + [v[0] for v in VARIANTS], help="run only these rows")
    p.add_argument("--recipe", action="append", default=[], metavar="ROW=PATH",
                   help="another recipe for a row (DUS, LLaMA-Pro or MIDUS), e.g. an ablation; applied if its output is missing; repeatable")
    p.add_argument("--midus-recipe", metavar="PATH", help="shorthand for --recipe MIDUS=PATH")
    p.add_argument("--label", help="name of this benchmark (default: quick / tokens-N)")
    p.add_argument("--out", help="work directory (default work/bench/cpt-<label>)")
    p.add_argument("--no-doc", action="store_true", help="don't write docs/results/reproduction-runs.md, the PNG and the JSON")
    p.add_argument("--replot", metavar="RESULTS_JSON", help="only redraw the plot and rewrite the doc section from a results.json")
    p.add_argument("--reapply", action="store_true", help="re-run the surgeries even if their outputs exist")
    a = p.parse_args()
    a.recipes = parse_recipe_overrides(p, a.recipe + ([f"MIDUS={a.midus_recipe}"] if a.midus_recipe else []))
    a.tokens = a.tokens or (QUICK_TOKENS if a.quick else DEFAULT_TOKENS)
    a.eval_blocks = a.eval_blocks or (4 if a.quick else 24)
    a.block_size = a.block_size or (128 if a.quick else 256)
    a.label = a.label or ("quick" if a.quick and a.tokens == QUICK_TOKENS else f"tokens-{a.tokens}") + ("" if a.freeze == "base" else f"-freeze-{a.freeze}")
    a.out = Path(a.out) if a.out else ROOT / "work/bench" / f"cpt-{a.label}"
    return a


def sh(cmd: list[str], log: Path) -> tuple[float, str]:
    """Run a command from the repository root, tee its output to `log`; return (wall seconds, output)."""
    shown = cmd if len(cmd) < 24 else cmd[:6] + [f"... ({len(cmd) - 20} more)"] + cmd[-14:]
    print("$ " + shlex.join(shown), flush=True)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        out = []
        for line in proc.stdout:
            f.write(line)
            out.append(line)
            if not line.startswith("\r") and ("|" in line and ("step" in line or "held-out" in line) or line.startswith(("data:", "trainable", "done", "precision"))):
                print("    " + line.rstrip()[-200:], flush=True)
        rc = proc.wait()
    wall = time.perf_counter() - t0
    if rc != 0:
        sys.exit(f"command failed (exit {rc}), log: {log}\n" + "".join(out[-30:]))
    return wall, "".join(out)


def split_files(corpus: Path, every: int) -> tuple[list[str], list[str]]:
    files = sorted(p for p in corpus.rglob("*.txt") if not p.name.startswith("_"))
    if not files:
        sys.exit(f"no text in {corpus}: python tools/fetch_corpus.py {corpus.name}")
    held = [str(p) for i, p in enumerate(files) if i % every == every // 2]
    train = [str(p) for i, p in enumerate(files) if i % every != every // 2]
    return train, held


def evaluate(model: str, data: list[str], a, log: Path) -> dict:
    """`midus-surgery eval`'s own function, in this process: no interpreter start and imports per evaluation."""
    from midus_surgery.train.evaluate import run_eval

    print(f"$ midus-surgery eval {model} --data {' '.join(Path(d).name for d in data[:3])}{' ...' if len(data) > 3 else ''} "
          f"--block-size {a.block_size} --max-blocks {a.eval_blocks} (in-process)", flush=True)
    t0 = time.perf_counter()
    res = run_eval(ROOT / model, data, block_size=a.block_size, max_blocks=a.eval_blocks, batch_size=a.micro_batch_size,
                   cache_dir=ROOT / "work/cache/tokens", progress=False)
    res["wall_s"] = time.perf_counter() - t0
    log.write_text(json.dumps(res, indent=1) + "\n")
    print(f"    perplexity {res['perplexity']:.4f} over {res['tokens']:,} tokens ({res['wall_s']:.1f} s)", flush=True)
    return res


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if l.strip()]


def parse_recipe_overrides(p: argparse.ArgumentParser, specs: list[str]) -> dict[str, str]:
    """`ROW=PATH` strings -> {row: recipe path}; a bad row, a missing file or a recipe of another kind is a usage error."""
    import yaml
    kinds = {name: kind for name, kind, _, _ in VARIANTS}
    out = {}
    for spec in specs:
        row, sep, path = spec.partition("=")
        if not sep or row not in kinds:
            p.error(f"--recipe {spec!r}: expected ROW=PATH with ROW one of {', '.join(kinds)}")
        if not Path(path).is_file():
            p.error(f"--recipe {spec!r}: no such file: {path}")
        # a LLaMA-Pro row trained on a memory recipe would be mislabelled in every table
        kind = ((yaml.safe_load(Path(path).read_text()) or {}).get("layout") or {}).get("interleave", {}).get("kind")
        if kind is not None and kind != kinds[row]:
            p.error(f"--recipe {spec!r}: the recipe inserts kind {kind!r}, the {row} row is kind {kinds[row]!r}")
        out[row] = path
    return out


def train(name: str, model_dir: str, a, train_files: list[str], held_files: list[str], log: Path) -> dict:
    run_dir = a.out / "runs" / name
    remove_own_directory(run_dir)  # a.out is this tool's workspace (main); nothing else is ever removed
    cfg = {
        "init_from": str(ROOT / model_dir), "run_dir": str(run_dir), "seed": a.seed,
        "data": {"train": train_files, "held_out": held_files, "block_size": a.block_size, "cache_dir": str(ROOT / "work/cache/tokens")},
        "tokens": a.tokens, "micro_batch_size": a.micro_batch_size, "grad_accum": a.grad_accum, "precision": a.precision,
        "freeze": a.freeze,
        "optim": {"lr": a.lr, "schedule": "cosine", "warmup": 0.02, "min_lr_ratio": 0.1, "weight_decay": 0.1, "grad_clip": 1.0},
        "memory": {"lr": a.memory_lr, "schedule": a.memory_schedule, "weight_decay": 0.0, "grad_clip": 1.0,
                   "retrieval": a.memory_retrieval},
        # held-out loss of the training domain: the same blocks `midus-surgery eval` reads (first eval_blocks of the held-out files);
        # at the start only for DUS (the identity-initialised LLaMA-Pro and MIDUS start exactly at the base's numbers).
        "eval": {"every": 0, "max_blocks": a.eval_blocks, "batch_size": a.micro_batch_size, "at_start": name == "DUS"},
        "log": {"every": 1, "progress": False, "tensorboard": False, "plot": False},
        "checkpoint": {"every": 0, "keep_last": 1},
    }
    import yaml
    cfg_path = a.out / f"train-{name}.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    wall, out = sh(["midus-surgery", "train", str(cfg_path)], log)
    m = re.search(r"trainable: ([0-9.]+[KMG]?) of ([0-9.]+[KMG]?) parameters", out)
    metrics = read_metrics(run_dir)
    steps = [r for r in metrics if "loss" in r]
    evals = [r for r in metrics if "eval_loss" in r]
    train_s = steps[-1]["elapsed"] if steps else float("nan")
    info = json.loads((run_dir / "final" / "midus_train.json").read_text()) if (run_dir / "final" / "midus_train.json").exists() else {}
    return {"run_dir": str(run_dir), "final": str(run_dir / "final"), "wall_s": wall, "train_s": train_s,
            "tokens": steps[-1]["tokens"] if steps else 0, "steps": len(steps),
            "tokens_per_s": (steps[-1]["tokens"] / train_s) if steps else float("nan"),
            "trainable": m.group(1) if m else "?", "total_params": m.group(2) if m else "?",
            # the headers know the freeze policy, not a frozen retrieval: then the runner's own count
            "trainable_exact": trainable_exact(ROOT / model_dir, a.freeze) if a.memory_retrieval == "learned" or name != "MIDUS" else None,
            "final_eval": evals[-1] if evals else None, "start_eval": evals[0] if len(evals) > 1 else None,
            "curve": [(r["tokens"], r["loss"]) for r in steps], "train_info_keys": sorted(info)}


def trainable_exact(model_dir: Path, freeze: str) -> int | None:
    """Trainable parameter count under the freeze policy, from the safetensors headers (no weights loaded)."""
    try:
        from safetensors import safe_open
        plan = json.loads((model_dir / "midus_plan.json").read_text())
    except Exception:
        return None
    total = 0
    kinds = None
    for key in ("layers", "layer_map", "output_layers"):
        if isinstance(plan.get(key), list):
            kinds = plan[key]
            break
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for name in st.keys():
                n = 1
                for d in st.get_slice(name).get_shape():
                    n *= d
                if freeze == "none":
                    total += n
                    continue
                mm = re.search(r"layers\.(\d+)\.", name)
                if kinds is not None and mm:
                    k = kinds[int(mm.group(1))]
                    kind = k.get("kind") if isinstance(k, dict) else None
                    if kind not in (None, "base"):
                        total += n
                elif SHARED_BANK in name:
                    total += n
    return total if kinds is not None else None


def machine() -> dict:
    import torch

    v = versions()
    dev = f"{torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores) {cpu_name()}"
    return {"device": dev, "python": v["python"], "torch": v["torch"], "transformers": v["transformers"], "platform": platform.platform()}


def main() -> None:
    a = cli()
    if a.replot:
        results = json.loads(Path(a.replot).read_text())
        redraw(Path(a.replot), doc=not a.no_doc)
        print(fmt_table(results))
        return
    t_start = time.perf_counter()
    use_workspace(a.out)  # a new folder, or one this tool made: runs inside it are replaced on a rerun
    load_before = load_avg()
    variants = [(name, kind, a.recipes[name], str(recipe_output(a.recipes[name]))) if name in a.recipes else (name, kind, recipe, out)
                for name, kind, recipe, out in VARIANTS]
    rows_wanted = a.only or ["base"] + [v[0] for v in variants]
    if not (ROOT / BASE / "config.json").exists():
        sys.exit(f"no base model in {BASE}: python tools/fetch_smollm2.py")
    for name, _, recipe, out in variants:
        if name in rows_wanted and (a.reapply or not (ROOT / out / "config.json").exists()):
            sh(["midus-surgery", "apply", recipe, "--overwrite"], a.out / f"apply-{name}.log")
    train_files, held_files = split_files(ROOT / "work/corpora" / a.train_corpus, a.held_out_every)
    other_dir = ROOT / "work/corpora" / a.other_corpus
    if not any(other_dir.rglob("*.txt")):  # checked before any training, as the train corpus is
        sys.exit(f"no text in {other_dir} (--other-corpus): python tools/fetch_corpus.py {a.other_corpus}")
    other = [str(other_dir)]
    results = {"label": a.label, "command": command_line("tools/bench_cpt.py", None), "load_before": load_before,
               "date": time.strftime("%Y-%m-%d %H:%M %Z"), "machine": machine(), "train_corpus": a.train_corpus, "other_corpus": a.other_corpus,
               "n_train_files": len(train_files), "n_held_files": len(held_files), "args": {k: str(v) for k, v in vars(a).items()},
               "recipes": {name: str(recipe) for name, _, recipe, _ in variants if name in rows_wanted}, "rows": {}}
    if "base" in rows_wanted:
        results["rows"]["base"] = {"a": evaluate(BASE, held_files, a, a.out / "eval-base-a.log"),
                                   "b": evaluate(BASE, other, a, a.out / "eval-base-b.log")}
    for name, _, _, out in variants:
        if name not in rows_wanted:
            continue
        r = train(name, out, a, train_files, held_files, a.out / f"train-{name}.log")
        fe = r["final_eval"]
        # (a) from the runner's final held-out pass: the same blocks as `midus-surgery eval --data <held-out files>`
        r["a"] = {"loss": fe["eval_loss"], "perplexity": fe["eval_ppl"], "tokens": fe["eval_tokens"]} if fe else None
        r["b"] = evaluate(r["final"], other, a, a.out / f"eval-{name}-b.log")
        results["rows"][name] = r
        (a.out / "results.json").write_text(json.dumps(results, indent=1))
        remove_own_directory(Path(r["run_dir"]) / "checkpoints")  # the final model stays in final/
    results["load_after"] = load_avg()
    results["total_wall_s"] = time.perf_counter() - t_start
    png = a.out / "loss.png"
    plot(results, a, png)
    (a.out / "results.json").write_text(json.dumps(results, indent=1))
    doc_png = None
    if not a.no_doc:
        doc_png = publish(results, a, png)
    if a.json:
        print(json.dumps({k: v for k, v in results.items()}, indent=1))
    else:
        print()
        print(fmt_table(results))
        print(f"\nresults: {a.out / 'results.json'}; plot: {doc_png or png}")


if __name__ == "__main__":
    try:
        main()
    except OutputError as exc:  # a --out folder the tool did not make: one line, as the CLI says it
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
