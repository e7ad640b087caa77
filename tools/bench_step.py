#!/usr/bin/env python
"""Time one training step (forward + backward + AdamW step) of SmolLM2-135M and its up-scaled outputs.

Models: the base (``work/smollm2-135m``) and the DUS, LLaMA-Pro and MIDUS outputs of the bundled
recipes ``recipes/smollm2-135m-{dus,llama-pro,midus}.yaml`` (6 blocks inserted after every 5th
layer: 30 -> 36 layers), applied first if missing; ``--layout every2`` takes the paper's proportion
instead (``recipes/ablation/every2/``: 15 blocks after every 2nd layer, 30 -> 45); ``--layout llama1b-every2`` the
paper's block size as well (``recipes/ablation/llama-1b-width/``: an 8-layer base of Llama-3.2-1B's shape with random
weights, written once to ``work/bench/llama-3.2-1b-8l``, and 4 blocks after every 2nd layer). Freeze policies, as `midus-surgery train`
defines them: ``none`` (everything trains) and ``base`` (only the inserted layers listed in the
output's midus_plan.json train; skipped for the base model, where nothing would train).
Precisions: ``fp32`` (everything fp32) and ``bf16`` (bf16 autocast over fp32 master weights and
optimiser state: what `midus-surgery train` does with ``precision: bf16``).

Each (model, freeze, precision) runs in a fresh child process: load, one warm-up step on a tiny
1 x 16 batch (AdamW state is allocated there, every code path runs once), then the timed steps;
children are interleaved model by model within every repeat (the order rotates per repeat).
On the CPU, paired rounds follow (``--rounds``): one child per freeze policy holds every model,
and each round takes one step of each, back to back; the ratio to DUS within a round cancels
the shared VM's slow drift, and the target is judged on the median of those ratios.
Input: random token ids, labels = inputs.
Memory: the child's resident set (``/proc/self/status``): VmRSS after loading, then the
kernel's high-water mark VmHWM, reset (``/proc/self/clear_refs`` = 5) right before the first
step, read after the last; the delta is what training adds on top of the loaded model
(activations, gradients, AdamW state, allocator caches).

On a GPU (``--device cuda``) the same loop runs on the card: every timed phase ends with
``torch.cuda.synchronize()``, the warm-up steps use the full batch (cuBLAS and the caching
allocator settle there), memory is ``torch.cuda.max_memory_allocated()`` minus what the loaded
model holds, and one child runs every configuration of a repeat in turn (GPU memory statistics
reset per configuration; a process start per configuration would cost more than the steps).
``--random-init`` builds each model from its config.json with random weights instead of loading
them (step time does not depend on the values), so the benchmark also runs where only the
configs were copied.

    python tools/bench_step.py [--quick] [--json] [--no-docs]
    python tools/bench_step.py --device cuda --batches 4x256,16x1024
    python tools/bench_step.py --layout every2 --no-bf16
    python tools/bench_step.py --device cuda --layout every2 --only-bf16 --freezes base --models DUS,MIDUS --compile

``--compile`` runs every model through ``torch.compile`` as the trainer's ``compile: true`` does
(the warm-up steps compile, and their time is reported); ``--models``, ``--freezes`` and
``--only-bf16`` narrow a run to what a short GPU session has time for. On a GPU each child
prints a line per finished configuration, so a run cut by a timeout still leaves its results.

This is the driver: it runs the steps and, on a full run, keeps the raw numbers in
docs/results/bench_step{_gpu}{_every2|_llama1b}{_compile}.json. The report (tools/bench_step_report.py:
table, targets, plot, section) then writes the `## Training step` section of docs/benchmarks.md and
docs/results/bench_step.png (on a GPU: `## Training step on GPU` and docs/results/bench_step_gpu.png);
``--from-json`` (here or in the report) redraws a section from a saved run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench_common import bf16_words, command_line, cpu_name, finish, load_avg, median, recipe_output, save_json, versions
from bench_step_report import FORCED_KERNELS, LAYOUTS, ROWS, json_path, redraw, setting, table, target_lines, targets, write_docs

# not a method: DUS with the inserted blocks' FFNs replaced by a zero-cost stub, i.e. the
# fastest any FFN replacement (MIDUS's memory included) could make the up-scaled step
DROPS_FFN = {"FFN-free floor"}


def models_for(layout: str) -> dict[str, Path]:
    """Row name -> model directory for one layout."""
    recipes = LAYOUTS[layout]["recipes"]
    out = {"base": LAYOUTS[layout]["base"], **{m: recipe_output(r) for m, r in recipes.items()}}
    out["FFN-free floor"] = out["DUS"]
    for row in FORCED_KERNELS:  # the same model, its memory layers told other kernels
        out[row] = out["MIDUS"]
    return out


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


def load_model(path: Path, random_init: bool):
    import torch

    if not random_init:
        from midus_surgery.train.evaluate import load_causal_lm

        return load_causal_lm(path, dtype=torch.float32, progress=False)  # the child's stderr is the run's log
    from transformers import AutoConfig, AutoModelForCausalLM

    import midus_surgery  # noqa: F401 - registers the MIDUS Auto classes

    return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=torch.float32)


def prepare(spec: dict) -> dict:
    """Load one configuration and set it up to train: model, optimiser, batch, freeze policy."""
    import torch

    torch.manual_seed(0)
    device = torch.device(spec.get("device", "cpu"))
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    path = Path(spec["path"])
    t0 = time.perf_counter()
    model = load_model(path, spec.get("random_init", False)).to(device)
    sync()
    load_s = time.perf_counter() - t0
    model.config.use_cache = False
    model.train()
    names = dict(model.named_parameters())  # unique parameters (tied embeddings once)
    if spec.get("drop_inserted_ffn") or spec["freeze"] == "base":
        from midus_surgery.model.midus_names import SHARED_BANK
        from midus_surgery.train.params import inserted_layers

        plan = json.loads((path / "midus_plan.json").read_text())
        layers_path, inserted = inserted_layers(plan, list(names))
    if spec.get("drop_inserted_ffn"):  # the floor for any FFN replacement: the inserted blocks' FFNs cost nothing
        # a copy-only DUS apply traces no block anatomy; the MIDUS output of the same base names the FFN
        anatomy = plan["anatomy"] or json.loads((Path(spec["anatomy_from"]) / "midus_plan.json").read_text())["anatomy"]
        parent, _, leaf = anatomy["ffn"][-1].rpartition(".")
        layers = model.get_submodule(layers_path)
        for i in inserted:
            setattr(layers[i].get_submodule(parent) if parent else layers[i], leaf, ZeroFFN())
        names = dict(model.named_parameters())  # without the dropped FFNs' weights
    if spec["freeze"] == "base":
        prefixes = tuple(f"{layers_path}.{i}." for i in inserted)
        for n, p in names.items():
            p.requires_grad_(n.startswith(prefixes) or SHARED_BANK in n)
    trainable = [p for p in names.values() if p.requires_grad]
    vocab = model.get_input_embeddings().weight.shape[0]
    hml_backend = set_hml_kernels(model, spec.get("hml_kernels"), device)  # before compiling, as the trainer does
    if spec.get("compile"):
        # as `midus-surgery train` with `compile: true` (accelerate's dynamo_backend="inductor"): the
        # whole model; the first warm-up step compiles
        model = torch.compile(model)
    gen = torch.Generator().manual_seed(0)
    return {
        "model": model, "cuda": cuda, "sync": sync, "load_s": load_s, "device": device,
        "opt": torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.0, **adamw_kwargs(spec.get("adamw", "torch"), device)),
        "x": torch.randint(0, vocab, (spec["batch"], spec["seq"]), generator=gen).to(device),
        "autocast": torch.autocast(device.type, dtype=torch.bfloat16, enabled=spec["precision"] == "bf16"),
        "trainable": sum(p.numel() for p in trainable), "total": sum(p.numel() for p in names.values()),
        "compiled": bool(spec.get("compile")), "hml_backend": hml_backend,
    }


def adamw_kwargs(implementation: str, device) -> dict:
    """AdamW options for --adamw: `torch` is torch's own default, the others as `optim.implementation` of the trainer."""
    if implementation == "torch":
        return {}
    from midus_surgery.train.params import adamw_options

    return adamw_options(implementation, device)


def set_hml_kernels(model, kernels, device) -> str:
    """The rows of FORCED_KERNELS (``kernels``, e.g. "torch" for `MIDUS (pure torch)`): this configuration's
    memory layers told to run on ``kernels``; with None they keep what the environment made them when loaded. Each configuration loads its own model,
    so the paired rounds that interleave them in one child put nothing back. Returns the backend the
    layers run on ``device``, answered now (on CPU that builds the kernels), so a compiled model traces
    the memory layer whole; "torch" for a model without memory layers."""
    from midus_surgery.model import hml

    if kernels is not None:
        hml.use_kernels(model, kernels)
    return hml.prepare_kernels(model, device)


def train_step(state: dict, xi) -> dict:
    """One timed optimiser step on the batch ``xi``: wall seconds of the whole step and of each phase."""
    import torch

    sync, model, opt = state["sync"], state["model"], state["opt"]
    sync()
    ta = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    with state["autocast"]:
        loss = model(input_ids=xi, labels=xi).loss
    sync()
    tb = time.perf_counter()
    loss.backward()
    sync()
    tc = time.perf_counter()
    opt.step()
    sync()
    td = time.perf_counter()
    if not torch.isfinite(loss):
        raise RuntimeError(f"loss is {loss.item()}")
    return {"step_s": td - ta, "fwd_s": tb - ta, "bwd_s": tc - tb, "opt_s": td - tc, "loss": loss.item()}


def warm_up(state: dict, n: int) -> None:
    # CPU warm-up: a tiny batch (allocates AdamW state, runs every code path); GPU warm-up: the full batch,
    # so that cuBLAS heuristics and the caching allocator settle before the timed steps. A compiled model
    # warms up on the full batch everywhere: another shape would compile again in the timed steps.
    x = state["x"]
    for _ in range(n):
        train_step(state, x if state["cuda"] or state["compiled"] else x[:1, :16])


def worker(spec: dict) -> dict:
    import torch

    state = prepare(spec)
    cuda, device = state["cuda"], state["device"]
    if cuda:
        state["sync"]()
        mem_loaded = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        mem_loaded = _status()["VmRSS"]
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # reset VmHWM to the current RSS
    t0 = time.perf_counter()
    warm_up(state, spec["warmup"])
    warmup_s = time.perf_counter() - t0
    steps = [train_step(state, state["x"]) for _ in range(spec["steps"])]
    mem_peak = torch.cuda.max_memory_allocated() if cuda else _status()["VmHWM"]
    return {"steps": steps, "mem_loaded": mem_loaded, "mem_peak": mem_peak, "peak_delta": mem_peak - mem_loaded,
            "trainable": state["trainable"], "total": state["total"], "load_s": state["load_s"],
            "warmup_s": warmup_s, "threads": torch.get_num_threads(), "loss": steps[-1]["loss"],
            "device_name": torch.cuda.get_device_name(device) if cuda else None}


def worker_paired(specs: list[dict], rounds: int) -> dict:
    """Every configuration of ``specs`` loaded in one process, then ``rounds`` rounds of one full-batch step each.

    Within a round the configurations run back to back (their order rotating per round), so a
    round's ratio to DUS compares steps taken seconds apart, under the same background load: on
    a shared machine whose speed drifts over minutes, these paired ratios are far steadier than
    a ratio of two minima taken in different processes minutes apart.
    Returns {"label": [step seconds per round]} with labels "model/freeze".
    """
    states = {s["label"]: prepare(s) for s in specs}
    for state in states.values():
        warm_up(state, 1)
        train_step(state, state["x"])  # one full-batch step: first-touch allocations at this size
    times: dict[str, list[float]] = {k: [] for k in states}
    order = list(states)
    for r in range(rounds):
        k = r % len(order)
        for label in order[k:] + order[:k]:
            times[label].append(train_step(states[label], states[label]["x"])["step_s"])
    return times


def worker_many(specs: list[dict]) -> list[dict]:
    """Several configurations in one process, one after another (GPU only: its memory statistics reset per run)."""
    import gc

    import torch

    out = []
    for spec in specs:
        out.append(worker(spec))
        # on stderr as each finishes: a run cut short by a timeout still leaves its finished configurations
        steps = [s["step_s"] for s in out[-1]["steps"]]
        print(f"    done {spec['label']} {spec['precision']} {spec['batch']}x{spec['seq']}: step min {min(steps):.4f} s, median "
              f"{median(steps):.4f} s, warm-up {out[-1]['warmup_s']:.1f} s, peak +{out[-1]['peak_delta'] / 2**20:.0f} MiB",
              file=sys.stderr, flush=True)
        torch._dynamo.reset()  # each configuration compiles from scratch (and none hits the recompile limit)
        gc.collect()
        torch.cuda.empty_cache()
    return out


def run_child(specs: list[dict], rounds: int = 0):
    """Run ``specs`` in a fresh process: one after another (``rounds`` = 0) or paired (worker_paired)."""
    job = {"specs": specs, "rounds": rounds}
    # the child's stderr goes straight through: its progress lines, and its traceback if it fails
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)], stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"child failed (exit {proc.returncode}, its error above) for {[s['label'] for s in specs]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- the driver

def make_random_base(directory: Path, config_path: Path, log) -> None:
    """Write a layout's synthetic base once: the model of ``config_path`` with random bf16 weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config_dict = json.loads(config_path.read_text())
    config = AutoConfig.for_model(config_dict.pop("model_type"), **config_dict)
    log(f"writing {directory} (random weights from {config_path.name}; once) ...")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    tmp = directory.with_name(directory.name + ".partial")  # a cut run leaves no base that looks whole
    model.save_pretrained(tmp)
    tmp.rename(directory)


def ensure_outputs(log, random_init: bool, layout: str) -> None:
    base = LAYOUTS[layout]["base"]
    if "random_base_from" in LAYOUTS[layout] and not (base / "config.json").is_file():
        make_random_base(base, LAYOUTS[layout]["random_base_from"], log)
    if not (base / "config.json").is_file():
        raise SystemExit(f"missing {base}: run `python tools/fetch_smollm2.py` first")
    models = models_for(layout)
    for name, recipe in LAYOUTS[layout]["recipes"].items():
        if random_init and (models[name] / "midus_plan.json").is_file() and (models[name] / "config.json").is_file():
            continue  # the config and the plan are all a random-init run reads
        if not (models[name] / "midus_plan.json").is_file():
            log(f"applying {recipe.name} (output missing) ...")
            # its summary to stderr: a driver run with --json prints only the JSON on stdout
            subprocess.run(["midus-surgery", "apply", str(recipe), "--quiet"], check=True, stdout=sys.stderr)


def configs_for(precision: str, device: str, freezes=("none", "base"), models=None) -> list[tuple[str, str]]:
    out = [("base", "none")]
    # on CPU the memory layer has no Triton path to compare with (its compiled kernels are timed in bench_hml)
    methods = ("DUS", "LLaMA-Pro", "MIDUS") + (tuple(FORCED_KERNELS) if device == "cuda" else ())
    for m in methods + ("FFN-free floor",):
        out += [(m, "none"), (m, "base")]
    return [(m, f) for m, f in out if f in freezes and (models is None or m in models)]


def bench(plans: list[dict], device: str, random_init: bool, log, layout: str = "every5") -> list[dict]:
    rows = []
    for plan in plans:
        precision, batch, seq = plan["precision"], plan["batch"], plan["seq"]
        freezes = plan.get("freezes", ("none", "base"))
        cfgs = configs_for(precision, device, freezes, plan.get("models"))
        results: dict[tuple[str, str], list[dict]] = {c: [] for c in cfgs}
        for r in range(plan["repeats"]):
            k = r % len(cfgs)
            order = cfgs[k:] + cfgs[:k]  # rotate: no config always runs first / after the same one
            # CPU: a fresh process per configuration (the RSS high-water mark is per process); GPU: one per repeat
            groups = [order] if device == "cuda" else [[cfg] for cfg in order]
            for group in groups:
                specs = [spec_for(model, freeze, plan, device, random_init, layout) for model, freeze in group]
                t0 = time.perf_counter()
                for (model, freeze), res in zip(group, run_child(specs)):
                    res["load1"] = os.getloadavg()[0]
                    results[(model, freeze)].append(res)
                    log(f"  [{precision} {batch}x{seq} rep {r + 1}/{plan['repeats']}] {model:9s} freeze={freeze:4s} "
                        f"step {min(s['step_s'] for s in res['steps']):7.4f} s (fwd {res['steps'][0]['fwd_s']:.3f}, bwd {res['steps'][0]['bwd_s']:.3f}, "
                        f"opt {res['steps'][0]['opt_s']:.3f})  peak +{res['peak_delta'] / 2**20:.0f} MiB  "
                        f"[{time.perf_counter() - t0:.0f} s]  load {load_avg()}")
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
                "peak_bytes": max(res["mem_peak"] for res in rs),
                "trainable": rs[0]["trainable"], "total": rs[0]["total"], "threads": rs[0]["threads"],
                "device_name": rs[0]["device_name"], "warmup_s": max(res.get("warmup_s", 0.0) for res in rs),
                "load_avg_1min": [round(res["load1"], 2) for res in rs],
            })
        for freeze in freezes if plan.get("rounds") else ():
            group = [cfg for cfg in cfgs if cfg[1] == freeze]
            log(f"  [{precision} {batch}x{seq} paired, freeze={freeze}] {len(group)} models in one process, "
                f"{plan['rounds']} rounds of one step each ...")
            t0 = time.perf_counter()
            times = run_child([spec_for(model, freeze, plan, device, random_init, layout) for model, freeze in group], plan["rounds"])
            for row in rows:
                if setting(row) == (precision, batch, seq) and row["freeze"] == freeze:
                    row["paired_steps_s"] = times[config_label(row["model"], freeze)]
            log(f"    {time.perf_counter() - t0:.0f} s; median step " + ", ".join(
                f"{label.split('/')[0]} {median(ts):.3f} s" for label, ts in times.items()) + f"; load {load_avg()}")
    # ratios against DUS with the same freeze policy, precision and batch
    for row in rows:
        ref = next((r for r in rows if r["model"] == "DUS" and r["freeze"] == row["freeze"] and setting(r) == setting(row)), None)
        if ref is not None:
            row["step_vs_dus"] = row["step_min_s"] / ref["step_min_s"]
            row["step_median_vs_dus"] = row["step_median_s"] / ref["step_median_s"]
            row["trainable_vs_dus"] = row["trainable"] / ref["trainable"]
            row["peak_delta_vs_dus"] = row["peak_delta_bytes"] / ref["peak_delta_bytes"]
            if "paired_steps_s" in row and "paired_steps_s" in ref:
                row.update(paired_ratio_stats(row["paired_steps_s"], ref["paired_steps_s"]))
    return rows


def config_label(model: str, freeze: str) -> str:
    return f"{model}/{freeze}"


def spec_for(model: str, freeze: str, plan: dict, device: str, random_init: bool, layout: str) -> dict:
    models = models_for(layout)
    return {"label": config_label(model, freeze), "path": str(models[model]), "anatomy_from": str(models["MIDUS"]),
            "freeze": freeze, "precision": plan["precision"],
            "batch": plan["batch"], "seq": plan["seq"], "warmup": plan["warmup"], "steps": plan["steps"],
            "drop_inserted_ffn": model in DROPS_FFN, "hml_kernels": FORCED_KERNELS.get(model), "device": device, "random_init": random_init,
            "compile": plan.get("compile", False), "adamw": plan.get("adamw", "torch")}


def paired_ratio_stats(steps: list[float], ref_steps: list[float]) -> dict:
    """Median and quartiles of the per-round ratios step / reference step (rounds paired by index)."""
    ratios = sorted(a / b for a, b in zip(steps, ref_steps))
    q1, _, q3 = statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1 else ratios * 3
    return {"paired_vs_dus": median(ratios), "paired_vs_dus_q1": q1, "paired_vs_dus_q3": q3, "paired_rounds": len(ratios)}


def hml_cuda_backend() -> str:
    """Which backend MIDUS's memory layer runs on CUDA in the children (they inherit this environment)."""
    from midus_surgery.model.hml import resolve_backend

    return resolve_backend(None, "cuda")


def parse_batch(text: str) -> tuple[int, int]:
    try:
        b, t = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a batch BxT: {text!r}") from None
    if b < 1 or t < 2:
        raise argparse.ArgumentTypeError(f"batch {text!r}: need B >= 1 and T >= 2")
    return b, t


def make_plans(args, gpu: bool) -> list[dict]:
    """What to run, one plan per (precision, batch), from the command line."""
    precisions = ([] if args.only_bf16 else ["fp32"]) + ([] if args.no_bf16 or args.quick else ["bf16"])
    if args.quick:
        plans = [{"precision": "fp32", "repeats": args.repeats or 1, "warmup": 1, "steps": args.steps or 1, "batch": 1, "seq": 128,
                  "rounds": 2 if args.rounds is None else args.rounds, "freezes": ["base"]}]
    elif gpu:
        repeats, steps = args.repeats or 2, args.steps or 10
        plans = [{"precision": p, "repeats": (args.bf16_repeats or repeats) if p == "bf16" else repeats, "warmup": 2, "steps": steps,
                  "batch": b, "seq": t} for b, t in args.batches for p in precisions]
    else:
        plans = []
        if "fp32" in precisions:
            plans.append({"precision": "fp32", "repeats": args.repeats or 1, "warmup": 1, "steps": args.steps or 2, "batch": 4,
                          "seq": 256, "rounds": 10 if args.rounds is None else args.rounds})
        if "bf16" in precisions:
            b, t = args.bf16_batch
            plans.append({"precision": "bf16", "repeats": args.bf16_repeats or 1, "warmup": 1, "steps": 1, "batch": b, "seq": t,
                          "rounds": args.bf16_rounds})
    for plan in plans:
        plan.setdefault("freezes", args.freezes)
        plan["models"] = args.models
        plan["compile"] = args.compile
        plan["adamw"] = args.adamw
        if args.compile:
            plan["warmup"] += 1  # the first step compiles the forward and backward graphs; one more settles
    return plans


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fp32, freeze=base only, batch 1 x 128, 1 repeat and 2 paired rounds; about a minute (never writes the docs)")
    ap.add_argument("--json", action="store_true", help="print one JSON object with the rows and ratios")
    ap.add_argument("--no-docs", action="store_true", help="do not write docs/benchmarks.md, its PNG and the JSON under docs/results/")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where the steps run (default cpu)")
    ap.add_argument("--random-init", action="store_true", help="random weights from each model's config.json instead of loading them")
    ap.add_argument("--repeats", type=int, default=None, help="fp32 repeats in separate processes (default 1 on CPU, 2 on GPU)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per configuration (default 2 on CPU, 10 on GPU; 1 with --quick)")
    ap.add_argument("--bf16-repeats", type=int, default=None, help="bf16 repeats (default 1 on CPU, where a bf16 step takes tens of seconds; as --repeats on GPU)")
    ap.add_argument("--rounds", type=int, default=None, help="CPU: fp32 paired rounds, all models of a freeze policy in one process (default 10; 2 with --quick; 0 = none)")
    ap.add_argument("--bf16-rounds", type=int, default=3, help="CPU: bf16 paired rounds (default 3)")
    ap.add_argument("--bf16-batch", type=parse_batch, default=(4, 256), help="CPU bf16 batch as BxT (default 4x256; smaller when the machine is too slow, and say so)")
    ap.add_argument("--batches", type=lambda text: [parse_batch(x) for x in text.split(",")], default=[(4, 256), (16, 1024)], help="GPU: comma-separated batches BxT, each run in fp32 and bf16 (default 4x256,16x1024)")
    ap.add_argument("--no-bf16", action="store_true", help="fp32 only")
    ap.add_argument("--only-bf16", action="store_true", help="bf16 only (what `midus-surgery train` runs on a GPU)")
    ap.add_argument("--freezes", type=lambda text: text.split(","), default=["none", "base"],
                    help="comma-separated freeze policies to run (default none,base)")
    ap.add_argument("--models", type=lambda text: text.split(","), default=None,
                    help="comma-separated rows to run (base, DUS, LLaMA-Pro, MIDUS, 'MIDUS (pure torch)' and "
                         "'MIDUS (fused Triton)' (CUDA only), 'FFN-free floor'; default all)")
    ap.add_argument("--compile", action="store_true",
                    help="torch.compile every model, as `midus-surgery train` does with `compile: true`; the warm-up "
                         "steps compile (their time is reported), each configuration from scratch; its own docs section")
    ap.add_argument("--layout", choices=list(LAYOUTS), default="every5",
                    help="every5: the bundled recipes (6 inserted blocks, 30 -> 36); every2: the paper's proportion "
                         "(15 inserted blocks, 30 -> 45, recipes/ablation/every2/); llama1b-every2: the paper's block size "
                         "and proportion (an 8-layer base of Llama-3.2-1B's shape with random weights, written once; "
                         "8 -> 12, recipes/ablation/llama-1b-width/); each has its own docs section")
    ap.add_argument("--adamw", choices=["auto", "fused", "foreach", "for-loop", "torch"], default="auto",
                    help="AdamW implementation, as the trainer's optim.implementation (default auto: fused on CPU and CUDA, "
                         "what `midus-surgery train` runs); torch: torch's own default (the for-loop on CPU), as runs before this option")
    ap.add_argument("--from-json", metavar="RESULTS_JSON", help="only rewrite the docs section and PNG from the --json output of an earlier run (e.g. one on a GPU machine); the same as tools/bench_step_report.py --from-json")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    return ap


def main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    bad = sorted(set(args.freezes) - {"none", "base"})
    if bad:
        ap.error(f"--freezes: unknown policy {', '.join(bad)} (none, base)")
    bad = sorted(set(args.models or ()) - set(ROWS))
    if bad:
        ap.error(f"--models: unknown row {', '.join(bad)} ({', '.join(ROWS)})")
    if args.no_bf16 and args.only_bf16:
        ap.error("--no-bf16 and --only-bf16 exclude each other")
    if args.worker:
        job = json.loads(args.worker)
        specs = job["specs"]
        if job["rounds"]:
            print(json.dumps(worker_paired(specs, job["rounds"])))
        else:
            print(json.dumps([worker(specs[0])] if len(specs) == 1 else worker_many(specs)))
        return 0
    if args.from_json:
        return redraw(Path(args.from_json))
    log = (lambda *a: print(*a, file=sys.stderr, flush=True)) if args.json else (lambda *a: print(*a, flush=True))
    ensure_outputs(log, args.random_init, args.layout)
    gpu = args.device == "cuda"
    if gpu:
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("bench_step: --device cuda, but torch sees no CUDA device")
        machine = f"{torch.cuda.get_device_name(0)} (torch CUDA {torch.version.cuda}), {os.cpu_count()} CPU cores"
    else:
        machine = f"{cpu_name()}, {os.cpu_count()} CPU cores, " + bf16_words()
    plans = make_plans(args, gpu)
    load_start = load_avg()
    t0 = time.perf_counter()
    rows = bench(plans, args.device, args.random_init, log, args.layout)
    payload = {
        "device": args.device, "layout": args.layout, "machine": machine, "random_init": args.random_init, "compile": args.compile,
        "adamw": args.adamw,
        "threads": rows[0]["threads"],
        "versions": versions(),
        "load_avg_start": load_start, "load_avg_end": load_avg(),
        "command": command_line("tools/bench_step.py", argv),
        "plans": plans, "rows": rows, "targets": targets(rows),
        "wall_s": time.perf_counter() - t0,
    }
    if gpu:
        payload["hml_cuda_backend"] = hml_cuda_backend()
    finish(args, payload, lambda p: write_docs(p, save_json(json_path(p), p)),
           f"{table(rows)}\n\n" + "\n".join(target_lines(payload["targets"]))
           + f"\n\nload average start {load_start}, end {payload['load_avg_end']}; {payload['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
