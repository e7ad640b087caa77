"""Time the AdamW update of an up-scaled model's trainable parameters in each torch implementation.

`midus-surgery train` runs AdamW with ``optim.implementation`` (default ``auto``: fused on CPU and
CUDA). Torch's own default on CPU is the for-loop, one tensor at a time. This script measures what
that choice is worth: for the SmolLM2 DUS and MIDUS outputs (``--layout``, as tools/bench_step.py)
and freeze policies ``none`` and ``base``, one AdamW step over exactly the parameter shapes that
train, with random gradients, in each implementation, side by side.

- The shapes come from each output's config (a meta-device model: no weights are read); ``base``
  trains the inserted layers (and a shared memory bank), as the trainer defines it.
- Each repeat builds a fresh optimiser per implementation, takes one untimed step (allocates the
  moments) and then times ``--steps`` steps; implementations interleave within a repeat, their
  order rotating, so drift of this shared machine falls on all alike. Minimum and median reported.
- The three updates agree to float rounding (checked here on the first configuration).

    python tools/bench_adamw.py            # every2 layout, writes docs/benchmarks.md `## AdamW`
    python tools/bench_adamw.py --quick    # freeze=base only, 1 repeat (seconds; never writes the docs)

This is the driver; a full run keeps its raw numbers in docs/results/bench_adamw_<layout>.json and the report
(tools/bench_adamw_report.py, which also redraws a section ``--from-json``) writes the section.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_adamw_report import json_path, table, write_docs  # noqa: E402
from bench_common import command_line, cpu_name, finish, load_avg, median, save_json, versions  # noqa: E402
from bench_step import LAYOUTS, ensure_outputs, models_for  # noqa: E402

from midus_surgery.model.midus_names import SHARED_BANK  # noqa: E402
from midus_surgery.train.params import adamw_options, inserted_layers  # noqa: E402

IMPLEMENTATIONS = ("for-loop", "foreach", "fused")


def trainable_shapes(path: Path, freeze: str) -> list[tuple[int, ...]]:
    """Shapes of the parameters that train under `freeze` (tied weights once), from the config alone."""
    from transformers import AutoConfig, AutoModelForCausalLM

    import midus_surgery  # noqa: F401 - registers the MIDUS Auto classes

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    names = dict(model.named_parameters())
    if freeze == "base":
        plan = json.loads((path / "midus_plan.json").read_text())
        layers_path, inserted = inserted_layers(plan, list(names))
        prefixes = tuple(f"{layers_path}.{i}." for i in inserted)
        names = {n: p for n, p in names.items() if n.startswith(prefixes) or SHARED_BANK in n}
    return [tuple(p.shape) for p in names.values()]


def time_steps(params: list[torch.Tensor], implementation: str, steps: int) -> list[float]:
    """Seconds of each timed step."""
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.1, **adamw_options(implementation, params[0].device))
    opt.step()  # allocates exp_avg / exp_avg_sq: not what is timed
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - t0)
    del opt
    return times


def agree(shapes: list[tuple[int, ...]]) -> float:
    """Largest difference between the implementations' weights after three steps (small shapes)."""
    gen = torch.Generator().manual_seed(0)
    small = [tuple(min(d, 64) for d in s) for s in shapes[:20]]
    start = [torch.randn(s, generator=gen) for s in small]
    grads = [torch.randn(s, generator=gen) for s in small]
    out = {}
    for impl in IMPLEMENTATIONS:
        ps = [torch.nn.Parameter(t.clone()) for t in start]
        for p, g in zip(ps, grads):
            p.grad = g.clone()
        opt = torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.1, **adamw_options(impl, torch.device("cpu")))
        for _ in range(3):
            opt.step()
        out[impl] = ps
    return max((a - b).abs().max().item() for impl in IMPLEMENTATIONS[1:] for a, b in zip(out["for-loop"], out[impl]))


def bench(models: list[str], freezes: list[str], layout: str, repeats: int, steps: int, log) -> list[dict]:
    paths = models_for(layout)
    rows = []
    for model in models:
        for freeze in freezes:
            shapes = trainable_shapes(paths[model], freeze)
            gen = torch.Generator().manual_seed(0)
            params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            n = sum(p.numel() for p in params)
            times = {impl: [] for impl in IMPLEMENTATIONS}
            for r in range(repeats):
                order = IMPLEMENTATIONS[r % 3:] + IMPLEMENTATIONS[:r % 3]
                for impl in order:
                    times[impl] += time_steps(params, impl, steps)
                log(f"  [{model} freeze={freeze}, {n / 1e6:.1f}M params, repeat {r + 1}/{repeats}] "
                    + ", ".join(f"{impl} {min(times[impl]):.3f} s" for impl in IMPLEMENTATIONS) + f"; load {load_avg()}")
            ref = min(times["for-loop"])
            for impl in IMPLEMENTATIONS:
                rows.append({"model": model, "freeze": freeze, "params": n, "tensors": len(shapes), "implementation": impl,
                             "step_min_s": min(times[impl]), "step_median_s": median(times[impl]), "n_steps": len(times[impl]),
                             "vs_for_loop": min(times[impl]) / ref})
            del params
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="freeze=base only, 1 repeat of 2 steps (never writes the docs)")
    ap.add_argument("--json", action="store_true", help="print one JSON object with the rows and ratios")
    ap.add_argument("--no-docs", action="store_true", help="do not write docs/benchmarks.md and docs/results/bench_adamw_<layout>.json")
    ap.add_argument("--layout", choices=list(LAYOUTS), default="every2", help="which outputs (as tools/bench_step.py; default every2)")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved repeats (default 3)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per implementation and repeat (default 3)")
    args = ap.parse_args(argv)
    log = (lambda *a: print(*a, file=sys.stderr, flush=True)) if args.json else (lambda *a: print(*a, flush=True))
    ensure_outputs(log, True, args.layout)
    repeats, steps = (1, 2) if args.quick else (args.repeats, args.steps)
    freezes = ["base"] if args.quick else ["none", "base"]
    start = load_avg()
    rows = bench(["DUS", "MIDUS"], freezes, args.layout, repeats, steps, log)
    payload = {"layout": args.layout, "machine": f"{cpu_name()}, {os.cpu_count()} CPU cores", "threads": torch.get_num_threads(),
               "versions": versions(),
               "load_avg_start": start, "load_avg_end": load_avg(), "repeats": repeats, "steps": steps,
               "command": command_line("tools/bench_adamw.py", argv),
               "max_abs_diff": agree(trainable_shapes(models_for(args.layout)["MIDUS"], "base")), "rows": rows}
    finish(args, payload, lambda p: write_docs(p, save_json(json_path(p), p)),
           f"{table(rows)}\n\nthe implementations agree to {payload['max_abs_diff']:.1e}; load average start {start}, end {payload['load_avg_end']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
