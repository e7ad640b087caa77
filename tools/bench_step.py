#!/usr/bin/env python
"""Time one training step (forward + backward + AdamW step) of SmolLM2-135M and its up-scaled outputs.

Models: the base (``work/smollm2-135m``) and the DUS, LLaMA-Pro and MIDUS outputs of the bundled
recipes ``recipes/smollm2-135m-{dus,llama-pro,midus}.yaml`` (6 blocks inserted after every 5th
layer: 30 -> 36 layers), applied first if missing. Freeze policies, as `midus-surgery train`
defines them: ``none`` (everything trains) and ``base`` (only the inserted layers listed in the
output's midus_plan.json train; skipped for the base model, where nothing would train).
Precisions: ``fp32`` (everything fp32) and ``bf16`` (bf16 autocast over fp32 master weights and
optimiser state: what `midus-surgery train` does with ``precision: bf16``).

Each (model, freeze, precision) runs in a fresh child process: load, one warm-up step on a tiny
1 x 16 batch (AdamW state is allocated there, every code path runs once), then the timed steps; children are interleaved model by model within
every repeat (the order rotates per repeat). Input: random token ids, labels = inputs.
Memory: the child's resident set (``/proc/self/status``): VmRSS after loading, then the
kernel's high-water mark VmHWM, reset (``/proc/self/clear_refs`` = 5) right before the first
step, read after the last; the delta is what training adds on top of the loaded model
(activations, gradients, AdamW state, allocator caches).

    python tools/bench_step.py [--quick] [--json] [--no-docs]

The full run writes the `## Training step` section of docs/benchmarks.md and docs/bench_step.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from bench_common import cpu_name, median, write_section

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs" / "benchmarks.md"
PNG = REPO / "docs" / "bench_step.png"
SECTION = "## Training step"
MODELS = {
    "base": REPO / "work" / "smollm2-135m",
    "DUS": REPO / "work" / "out" / "smollm2-135m-dus",
    "LLaMA-Pro": REPO / "work" / "out" / "smollm2-135m-llama-pro",
    "MIDUS": REPO / "work" / "out" / "smollm2-135m-midus",
    # not a method: DUS with the inserted blocks' FFNs replaced by a zero-cost stub, i.e. the
    # fastest any FFN replacement (MIDUS's memory included) could make the up-scaled step
    "FFN-free floor": REPO / "work" / "out" / "smollm2-135m-dus",
}
DROPS_FFN = {"FFN-free floor"}
RECIPES = {
    "DUS": REPO / "recipes" / "smollm2-135m-dus.yaml",
    "LLaMA-Pro": REPO / "recipes" / "smollm2-135m-llama-pro.yaml",
    "MIDUS": REPO / "recipes" / "smollm2-135m-midus.yaml",
}


# ----------------------------------------------------------------------------- the child

def _status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(rest.split()[0]) * 1024
    return out


class ZeroFFN:
    """Stands in for an FFN at zero cost (built lazily: torch is imported in the child only)."""

    def __new__(cls):
        import torch

        class _Zero(torch.nn.Module):
            def forward(self, x):
                return torch.zeros_like(x)

        return _Zero()


def worker(spec: dict) -> dict:
    import torch

    from midus_surgery.evaluate import load_causal_lm

    torch.manual_seed(0)
    threads = torch.get_num_threads()
    path = Path(spec["path"])
    t0 = time.perf_counter()
    model = load_causal_lm(path, dtype=torch.float32)
    load_s = time.perf_counter() - t0
    model.config.use_cache = False
    model.train()
    if spec.get("drop_inserted_ffn"):  # the floor for any FFN replacement: the inserted blocks' FFNs cost nothing
        plan = json.loads((path / "midus_plan.json").read_text())
        layers = model.get_submodule(plan["anatomy"]["layers_path"])
        ffn_name = plan["anatomy"]["ffn"][-1]
        for layer in plan["layers"]:
            if layer["kind"] != "base":
                block = layers[int(layer["index"])]
                parent, _, leaf = ffn_name.rpartition(".")
                setattr(block.get_submodule(parent) if parent else block, leaf, ZeroFFN())
    names = dict(model.named_parameters())  # unique parameters (tied embeddings once)
    if spec["freeze"] == "base":
        plan = json.loads((path / "midus_plan.json").read_text())
        layers_path = plan["anatomy"]["layers_path"]
        inserted = [int(layer["index"]) for layer in plan["layers"] if layer["kind"] != "base"]
        prefixes = tuple(f"{layers_path}.{i}." for i in inserted)
        for n, p in names.items():
            p.requires_grad_(n.startswith(prefixes) or "midus_shared_bank" in n)
    trainable = [p for p in names.values() if p.requires_grad]
    n_train = sum(p.numel() for p in trainable)
    n_total = sum(p.numel() for p in names.values())
    opt = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.0)
    vocab = model.get_input_embeddings().weight.shape[0]
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, vocab, (spec["batch"], spec["seq"]), generator=gen)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=spec["precision"] == "bf16")

    rss_loaded = _status()["VmRSS"]
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # reset VmHWM to the current RSS
    steps = []
    for i in range(spec["warmup"] + spec["steps"]):
        xi = x[:1, :16] if i < spec["warmup"] else x  # warm-up: a tiny batch (allocates AdamW state, runs every code path)
        ta = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with autocast:
            loss = model(input_ids=xi, labels=xi).loss
        tb = time.perf_counter()
        loss.backward()
        tc = time.perf_counter()
        opt.step()
        td = time.perf_counter()
        if i >= spec["warmup"]:
            steps.append({"step_s": td - ta, "fwd_s": tb - ta, "bwd_s": tc - tb, "opt_s": td - tc})
        if not torch.isfinite(loss):
            raise RuntimeError(f"loss is {loss.item()}")
    st = _status()
    return {"steps": steps, "rss_loaded": rss_loaded, "peak_rss": st["VmHWM"], "peak_delta": st["VmHWM"] - rss_loaded,
            "trainable": n_train, "total": n_total, "load_s": load_s, "threads": threads, "loss": float(loss)}


def run_child(spec: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"child failed for {spec}:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- the driver

def ensure_outputs(log) -> None:
    if not (MODELS["base"] / "config.json").is_file():
        raise SystemExit(f"missing {MODELS['base']}: run `python tools/fetch_smollm2.py` first")
    for name, recipe in RECIPES.items():
        if not (MODELS[name] / "midus_plan.json").is_file():
            log(f"applying {recipe.name} (output missing) ...")
            subprocess.run(["midus-surgery", "apply", str(recipe), "--quiet"], check=True)


def configs_for(precision: str) -> list[tuple[str, str]]:
    out = [("base", "none")]
    for m in ("DUS", "LLaMA-Pro", "MIDUS"):
        out += [(m, "none"), (m, "base")]
    if precision == "fp32":
        out += [("FFN-free floor", "none"), ("FFN-free floor", "base")]
    return out


def bench(precisions: dict[str, dict], log) -> list[dict]:
    rows = []
    for precision, plan in precisions.items():
        batch, seq = plan["batch"], plan["seq"]
        cfgs = configs_for(precision)
        results: dict[tuple[str, str], list[dict]] = {c: [] for c in cfgs}
        for r in range(plan["repeats"]):
            k = r % len(cfgs)
            order = cfgs[k:] + cfgs[:k]  # rotate: no config always runs first / after the same one
            for model, freeze in order:
                spec = {"path": str(MODELS[model]), "freeze": freeze, "precision": precision, "batch": batch, "seq": seq,
                        "warmup": plan["warmup"], "steps": plan["steps"], "drop_inserted_ffn": model in DROPS_FFN}
                t0 = time.perf_counter()
                res = run_child(spec)
                res["load1"] = os.getloadavg()[0]
                results[(model, freeze)].append(res)
                log(f"  [{precision} rep {r + 1}/{plan['repeats']}] {model:9s} freeze={freeze:4s} "
                    f"step {min(s['step_s'] for s in res['steps']):7.3f} s (fwd {res['steps'][0]['fwd_s']:.2f}, bwd {res['steps'][0]['bwd_s']:.2f}, "
                    f"opt {res['steps'][0]['opt_s']:.2f})  peak +{res['peak_delta'] / 2**20:.0f} MiB  "
                    f"[{time.perf_counter() - t0:.0f} s]  load {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        for (model, freeze), rs in results.items():
            steps = [s for res in rs for s in res["steps"]]
            best = min(steps, key=lambda s: s["step_s"])
            times = [s["step_s"] for s in steps]
            rows.append({
                "model": model, "freeze": freeze, "precision": precision, "batch": batch, "seq": seq,
                "step_min_s": min(times), "step_median_s": median(times), "n_steps": len(times),
                "fwd_s": best["fwd_s"], "bwd_s": best["bwd_s"], "opt_s": best["opt_s"],
                "tokens_per_s": batch * seq / min(times),
                "peak_delta_bytes": max(res["peak_delta"] for res in rs),
                "peak_rss_bytes": max(res["peak_rss"] for res in rs),
                "trainable": rs[0]["trainable"], "total": rs[0]["total"], "threads": rs[0]["threads"],
                "load_avg_1min": [round(res["load1"], 2) for res in rs],
            })
    # ratios against DUS with the same freeze policy and precision
    for row in rows:
        ref = next((r for r in rows if r["model"] == "DUS" and r["freeze"] == row["freeze"] and r["precision"] == row["precision"]), None)
        if ref is not None:
            row["step_vs_dus"] = row["step_min_s"] / ref["step_min_s"]
            row["step_median_vs_dus"] = row["step_median_s"] / ref["step_median_s"]
            row["trainable_vs_dus"] = row["trainable"] / ref["trainable"]
            row["peak_delta_vs_dus"] = row["peak_delta_bytes"] / ref["peak_delta_bytes"]
    return rows


def targets(rows: list[dict]) -> list[dict]:
    out = []
    for precision in sorted({r["precision"] for r in rows}):
        for freeze in ("none", "base"):
            m = next((r for r in rows if r["model"] == "MIDUS" and r["freeze"] == freeze and r["precision"] == precision), None)
            d = next((r for r in rows if r["model"] == "DUS" and r["freeze"] == freeze and r["precision"] == precision), None)
            if m and d:
                out.append({"precision": precision, "freeze": freeze, "midus_over_dus": m["step_min_s"] / d["step_min_s"],
                            "midus_over_dus_median": m["step_median_s"] / d["step_median_s"],
                            "step_le_0.85": m["step_min_s"] / d["step_min_s"] <= 0.85,
                            "fewer_trainable": m["trainable"] < d["trainable"],
                            "midus_trainable": m["trainable"], "dus_trainable": d["trainable"]})
                floor = next((r for r in rows if r["model"] == "FFN-free floor" and r["freeze"] == freeze and r["precision"] == precision), None)
                if floor:
                    out[-1]["floor_over_dus"] = floor["step_min_s"] / d["step_min_s"]
    return out


def human(n: int) -> str:
    return f"{n / 1e6:.1f}M"


def table(rows: list[dict]) -> str:
    lines = ["| precision | batch | model | freeze | trainable / total params | step min s | step median s | fwd / bwd / AdamW s | tokens/s | peak RSS delta MiB | step vs DUS | trainable vs DUS |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        vs = f"**{r['step_vs_dus']:.2f}x**" if "step_vs_dus" in r else "-"
        tv = f"{r['trainable_vs_dus']:.2f}x" if "trainable_vs_dus" in r else "-"
        lines.append(f"| {r['precision']} | {r['batch']}x{r['seq']} | {r['model']} | {r['freeze']} | {human(r['trainable'])} / {human(r['total'])} | {r['step_min_s']:.3f} | "
                     f"{r['step_median_s']:.3f} (n={r['n_steps']}) | {r['fwd_s']:.2f} / {r['bwd_s']:.2f} / {r['opt_s']:.2f} | {r['tokens_per_s']:.0f} | "
                     f"{r['peak_delta_bytes'] / 2**20:.0f} | {vs} | {tv} |")
    return "\n".join(lines)


def target_lines(ts: list[dict]) -> list[str]:
    return [f"- {t['precision']}, freeze={t['freeze']}: MIDUS/DUS step {t['midus_over_dus']:.2f}x (median {t['midus_over_dus_median']:.2f}x; target <= 0.85: "
            f"{'met' if t['step_le_0.85'] else 'NOT met'}); trainable {human(t['midus_trainable'])} vs {human(t['dus_trainable'])} "
            f"({'fewer: met' if t['fewer_trainable'] else 'NOT fewer'})"
            + (f"; floor (inserted FFNs at zero cost) {t['floor_over_dus']:.2f}x" if "floor_over_dus" in t else "") for t in ts]


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [(p, f) for p in ("fp32", "bf16") for f in ("none", "base") if any(r["precision"] == p and r["freeze"] == f for r in rows)]
    models = ["base", "DUS", "LLaMA-Pro", "MIDUS", "FFN-free floor"]
    colors = {"base": "#999999", "DUS": "#1f77b4", "LLaMA-Pro": "#ff7f0e", "MIDUS": "#2ca02c", "FFN-free floor": "#cccccc"}
    fig, axes = plt.subplots(1, len(groups), figsize=(3.6 * len(groups), 3.8), squeeze=False)
    for ax, (p, f) in zip(axes[0], groups):
        sel = {r["model"]: r for r in rows if r["precision"] == p and r["freeze"] == f}
        ms = [m for m in models if m in sel]
        vals = [sel[m]["step_min_s"] for m in ms]
        bars = ax.bar(ms, vals, color=[colors[m] for m in ms])
        for b, m in zip(bars, ms):
            label = f"{sel[m]['step_min_s']:.2f}s"
            if "step_vs_dus" in sel[m]:
                label += f"\n{sel[m]['step_vs_dus']:.2f}x"
            ax.annotate(label, (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom", fontsize=8)
        ax.set_title(f"{p} {sel[ms[0]]['batch']}x{sel[ms[0]]['seq']}, freeze={f}", fontsize=10)
        ax.set_ylabel("seconds per step (min)")
        ax.set_ylim(0, max(vals) * 1.3)
        ax.tick_params(axis="x", labelsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def section_text(payload: dict) -> str:
    v = payload["versions"]
    prec = payload["precisions"]
    notes = []
    for p, plan in prec.items():
        notes.append(f"{p}: batch {plan['batch']} x {plan['seq']}, {plan['repeats']} repeat(s) x ({plan['warmup']} warm-up + {plan['steps']} timed step(s)) per configuration")
    lines = [
        SECTION, "",
        "One training step (forward + backward + AdamW step, lr 1e-4) of SmolLM2-135M and its DUS, LLaMA-Pro and MIDUS outputs "
        "(`recipes/smollm2-135m-{dus,llama-pro,midus}.yaml`: 6 blocks inserted after every 5th layer, 30 -> 36 layers), "
        "random token ids (labels = inputs); batch sizes per precision below.",
        "",
        f"- Machine: {payload['machine']}, torch threads {payload['threads']}; load average (1/5/15 min) at start {payload['load_avg_start']}, "
        f"at end {payload['load_avg_end']} (2 cores shared with other agents' test runs: noisy; minimum and median are both shown).",
        f"- Versions: Python {v['python']}, torch {v['torch']}, transformers {v['transformers']}.",
        f"- Command: `{payload['command']}`",
        "- Base weights: SmolLM2-135M-Instruct dequantised from its Q4_1 GGUF (real weights, not the original bf16 checkpoint); "
        "step time does not depend on the values.",
        "- Freeze `none`: every parameter trains. `base`: only the inserted layers (kind != base in the output's `midus_plan.json`) "
        "train, as `midus-surgery train` defines it; not run for the base model (nothing would train). Parameters are counted once "
        "(tied embeddings).",
        "- `fp32`: weights, activations and AdamW in fp32. `bf16`: `torch.autocast('cpu', bfloat16)` over fp32 master weights and "
        "optimiser state, as `midus-surgery train` runs `precision: bf16`. This CPU has no native bf16, so bf16 is far slower.",
        "- Each configuration runs in a fresh process: load, one warm-up step on a 1 x 16 batch (allocates AdamW state, runs every "
        "code path), then the timed steps at the full batch; configurations interleave within each "
        "repeat, their order rotating per repeat. " + "; ".join(notes) + ".",
        "- Memory: the process's resident set, from `/proc/self/status`: the kernel high-water mark VmHWM, reset right before "
        "the first step (`/proc/self/clear_refs`), minus the RSS of the loaded model. The delta covers activations, gradients, "
        "AdamW state and allocator caches.",
        "- `step vs DUS`: minimum step time over DUS's with the same freeze policy and precision.",
        "",
        table(payload["rows"]), "",
        "![training step](bench_step.png)", "",
        "Target (MIDUS step at most 0.85x the DUS step, with fewer trainable parameters):", "",
        *target_lines(payload["targets"]), "",
        "`FFN-free floor` is not a method: it is the DUS model with the inserted blocks' FFNs replaced by a zero-cost stub, "
        "timed in the same loop. In expectation no FFN replacement, MIDUS's memory layer included, makes the up-scaled step "
        "faster than that row: 6 of 36 blocks change, and only their FFNs, so the whole possible gain is a few tenths of a "
        "second per step. That is about the size of this shared machine's run-to-run noise (two samples per row; DUS and "
        "LLaMA-Pro, the same compute, differ by up to ~10%), so single ratios near the floor, MIDUS's among them, carry "
        "that uncertainty. What moves the ratio for real is the share of the step spent in replaced FFNs (more Memory "
        "blocks, or larger FFNs per block: at the Llama-3.2-1B block size the HML costs about a quarter of the FFN it "
        "replaces, see the HML section).", "",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fp32 only, batch 2 x 128, 2 repeats (never writes the docs)")
    ap.add_argument("--json", action="store_true", help="print one JSON object with the rows and ratios")
    ap.add_argument("--no-docs", action="store_true", help="do not write docs/benchmarks.md and docs/bench_step.png")
    ap.add_argument("--repeats", type=int, default=None, help="fp32 repeats (default 3; 2 with --quick)")
    ap.add_argument("--steps", type=int, default=None, help="timed fp32 steps per child after 1 warm-up step (default 2; 1 with --quick)")
    ap.add_argument("--bf16-repeats", type=int, default=1, help="bf16 repeats (default 1: a bf16 step takes tens of seconds here)")
    ap.add_argument("--bf16-batch", default="4x256", help="bf16 batch as BxT (default 4x256; smaller when the machine is too slow, and say so)")
    ap.add_argument("--no-bf16", action="store_true", help="fp32 only")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    log = (lambda *a: print(*a, file=sys.stderr, flush=True)) if args.json else (lambda *a: print(*a, flush=True))
    ensure_outputs(log)
    if args.quick:
        batch, seq = 2, 128
        precisions = {"fp32": {"repeats": args.repeats or 2, "warmup": 1, "steps": args.steps or 1, "batch": 2, "seq": 128}}
    else:
        batch, seq = 4, 256
        precisions = {"fp32": {"repeats": args.repeats or 3, "warmup": 1, "steps": args.steps or 2, "batch": 4, "seq": 256}}
        if not args.no_bf16:
            b, t = (int(v) for v in args.bf16_batch.lower().split("x"))
            precisions["bf16"] = {"repeats": args.bf16_repeats, "warmup": 1, "steps": 1, "batch": b, "seq": t}
    from importlib.metadata import version

    load_start = " ".join(f"{x:.2f}" for x in os.getloadavg())
    t0 = time.perf_counter()
    rows = bench(precisions, log)
    payload = {
        "machine": f"{cpu_name()}, {os.cpu_count()} CPU cores",
        "threads": rows[0]["threads"],
        "versions": {"python": platform.python_version(), "torch": version("torch"), "transformers": version("transformers")},
        "load_avg_start": load_start, "load_avg_end": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "command": "python " + " ".join(["tools/bench_step.py", *(argv if argv is not None else sys.argv[1:])]),
        "batch": batch, "seq": seq, "precisions": precisions, "rows": rows, "targets": targets(rows),
        "wall_s": time.perf_counter() - t0,
    }
    if not (args.no_docs or args.quick):
        plot(rows, PNG, "SmolLM2-135M family, training step (" + ", ".join(f"{p} {v['batch']}x{v['seq']}" for p, v in precisions.items()) + ")")
        write_section(DOCS, SECTION, section_text(payload))
    if args.json:
        print(json.dumps(payload, indent=2))
    else:
        print()
        print(table(rows))
        print()
        print("\n".join(target_lines(payload["targets"])))
        print(f"\nload average start {load_start}, end {payload['load_avg_end']}; {payload['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
