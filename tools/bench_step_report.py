#!/usr/bin/env python
"""The report of tools/bench_step.py: the table, the targets, the plot and the docs section of one run's JSON.

    python tools/bench_step_report.py --from-json docs/results/bench_step_every2.json   # redraw a section and its PNG

The driver (tools/bench_step.py) runs the steps and writes the JSON; everything here reads only that JSON (no torch),
so a run made on another machine (a GPU session) is redrawn here. Sections go into docs/benchmarks.md, PNGs and the
JSON into docs/results/ (named after the section: `bench_step{_gpu}{_every2|_llama1b}{_compile}`).
"""

from __future__ import annotations

import sys
from pathlib import Path

from bench_common import BENCHMARKS, REPO, RESULTS, link, median, raw_numbers_line, report_main, write_section

DOCS = BENCHMARKS  # the page the sections go into
PNG = {"cpu": RESULTS / "bench_step.png", "cuda": RESULTS / "bench_step_gpu.png"}  # the plots and the JSON beside them
SECTION = {"cpu": "## Training step", "cuda": "## Training step on GPU"}
BASE_MODEL = REPO / "work" / "smollm2-135m"
# Which blocks are inserted where: the bundled recipes (6 after every 5th layer), or the paper's
# proportion (Llama-3.2-1B: a Memory block after every 2nd layer; here 15 of 45 blocks). The share
# of the step spent in replaced FFNs, hence the whole possible gain, grows with the count.
METHODS = (("DUS", "dus"), ("LLaMA-Pro", "llama-pro"), ("MIDUS", "midus"))  # row name, recipe file key
LLAMA1B_BASE = REPO / "work" / "bench" / "llama-3.2-1b-8l"
LLAMA1B_CONFIG = REPO / "recipes" / "configs" / "llama-3.2-1b-8l.json"  # Llama-3.2-1B's, with 8 layers
SMOLLM2_WEIGHTS = "SmolLM2-135M-Instruct dequantised from its Q4_1 GGUF (real weights, not the original bf16 checkpoint)"
LAYOUTS = {
    "every5": {"what": "6 blocks inserted after every 5th layer, 30 -> 36 layers", "changed": "6 of 36", "title": "", "stem": "",
               "base": BASE_MODEL, "family": "SmolLM2-135M", "weights": SMOLLM2_WEIGHTS,
               "recipes": {m: REPO / "recipes" / f"smollm2-135m-{k}.yaml" for m, k in METHODS}},
    "every2": {"what": "15 blocks inserted after every 2nd layer, the paper's proportion, 30 -> 45 layers", "changed": "15 of 45",
               "title": ", 15 inserted blocks (the paper's proportion)", "stem": "_every2",
               "base": BASE_MODEL, "family": "SmolLM2-135M", "weights": SMOLLM2_WEIGHTS,
               "recipes": {m: REPO / "recipes" / "ablation" / "every2" / f"smollm2-135m-{k}-every2.yaml" for m, k in METHODS}},
    # The paper's block size too: its FFNs (8192 wide) are a larger share of a block than SmolLM2's. Eight base
    # layers instead of sixteen, so that three models and their AdamW state fit one process of a 24 GiB machine.
    "llama1b-every2": {"what": "4 blocks inserted after every 2nd layer of an 8-layer base of Llama-3.2-1B's shape (hidden 2048, "
                                "FFN 8192, 32 heads of 64, 8 KV heads, vocab 128256), the paper's block size and proportion, 8 -> 12 layers",
                       "changed": "4 of 12", "title": ", Llama-3.2-1B block size (the paper's block size and proportion)",
                       "stem": "_llama1b", "base": LLAMA1B_BASE, "family": "an 8-layer Llama-3.2-1B-shaped base",
                       "plot": "Llama-3.2-1B-shaped base (8 layers) + 4 inserted blocks",
                       "random_base_from": LLAMA1B_CONFIG,  # the script writes the base once, from this config
                       "weights": "random, of Llama-3.2-1B's shape with 8 layers, written once by this script to "
                                  f"`{LLAMA1B_BASE.relative_to(REPO)}`",
                       "recipes": {m: REPO / "recipes" / "ablation" / "llama-1b-width" / f"llama-1b-8l-{k}-every2.yaml"
                                   for m, k in METHODS}},
}
# CUDA only: MIDUS again with its memory layers told to run on other kernels (HMLConfig.kernels), so
# what the Triton kernels buy is measured side by side in the same run: the pure-torch path, and the
# fused read (opt-in until timed)
FORCED_KERNELS = {"MIDUS (pure torch)": "torch", "MIDUS (fused Triton)": "triton-fused"}
ROWS = ("base", "DUS", "LLaMA-Pro", "MIDUS", "MIDUS (pure torch)", "MIDUS (fused Triton)", "FFN-free floor")  # the table's rows, in order


def setting(row: dict) -> tuple[str, int, int]:
    """What a ratio may compare across: (precision, batch, seq)."""
    return row["precision"], row["batch"], row["seq"]


def adamw_words(payload: dict) -> str:
    """How the AdamW step of a run was computed (runs written before --adamw used torch's default)."""
    impl = payload.get("adamw", "torch")
    if impl == "torch":
        return "torch's default AdamW implementation: the for-loop on CPU, foreach on CUDA"
    return f"AdamW `{impl}` (`optim.implementation`{', the trainer default: fused on CPU and CUDA' if impl == 'auto' else ''})"


def targets(rows: list[dict]) -> list[dict]:
    """The issue's target per (precision, batch, freeze): judged on the paired median ratio when rounds ran, else on minima."""
    out = []
    for key in dict.fromkeys(setting(r) for r in rows):
        for freeze in ("none", "base"):
            sel = {r["model"]: r for r in rows if r["freeze"] == freeze and setting(r) == key}
            m, d, floor = sel.get("MIDUS"), sel.get("DUS"), sel.get("FFN-free floor")
            if not (m and d):
                continue
            t = {**dict(zip(("precision", "batch", "seq"), key)), "freeze": freeze, "midus_over_dus": m["step_min_s"] / d["step_min_s"],
                 "midus_over_dus_median": m["step_median_s"] / d["step_median_s"],
                 "fewer_trainable": m["trainable"] < d["trainable"],
                 "midus_trainable": m["trainable"], "dus_trainable": d["trainable"]}
            if floor:
                t["floor_over_dus"] = floor["step_min_s"] / d["step_min_s"]
            pure = sel.get("MIDUS (pure torch)")
            if pure:  # what the Triton kernels buy, and where MIDUS would stand without them
                t["midus_over_pure_torch"] = m["step_min_s"] / pure["step_min_s"]
                t["pure_torch_over_dus"] = pure["step_min_s"] / d["step_min_s"]
            fused = sel.get("MIDUS (fused Triton)")
            if fused:  # where MIDUS stands on the fused read
                t["fused_over_dus"] = fused["step_min_s"] / d["step_min_s"]
                t["fused_over_midus"] = fused["step_min_s"] / m["step_min_s"]
            if "paired_vs_dus" in m:
                t["judged_on"] = "paired"
                t["midus_over_dus_paired"] = m["paired_vs_dus"]
                t["midus_over_dus_paired_iqr"] = [m["paired_vs_dus_q1"], m["paired_vs_dus_q3"]]
                t["rounds"] = m["paired_rounds"]
                for name, row in (("floor", floor), ("llama_pro", sel.get("LLaMA-Pro"))):
                    if row and "paired_vs_dus" in row:
                        t[f"{name}_over_dus_paired"] = row["paired_vs_dus"]
                t["step_le_0.85"] = m["paired_vs_dus"] <= 0.85
            else:
                t["judged_on"] = "minimum"
                t["step_le_0.85"] = t["midus_over_dus"] <= 0.85
            out.append(t)
    return out


def human(n: int) -> str:
    return f"{n / 1e6:.1f}M"


def table(rows: list[dict]) -> str:
    mem = "peak GPU memory delta MiB" if rows and rows[0]["device_name"] else "peak RSS delta MiB"
    lines = [f"| precision | batch | model | freeze | trainable / total params | step min s | step median s | fwd / bwd / AdamW s | tokens/s | {mem} | step vs DUS | paired vs DUS: median [IQR] | trainable vs DUS |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        vs = f"{r['step_vs_dus']:.2f}x" if "step_vs_dus" in r else "-"
        paired = (f"**{r['paired_vs_dus']:.3f}x** [{r['paired_vs_dus_q1']:.3f}-{r['paired_vs_dus_q3']:.3f}]"
                  if "paired_vs_dus" in r else "-")
        tv = f"{r['trainable_vs_dus']:.2f}x" if "trainable_vs_dus" in r else "-"
        digits = 4 if r["step_min_s"] < 0.1 else 3
        lines.append(f"| {r['precision']} | {r['batch']}x{r['seq']} | {r['model']} | {r['freeze']} | {human(r['trainable'])} / {human(r['total'])} | {r['step_min_s']:.{digits}f} | "
                     f"{r['step_median_s']:.{digits}f} (n={r['n_steps']}) | {r['fwd_s']:.{digits}f} / {r['bwd_s']:.{digits}f} / {r['opt_s']:.{digits}f} | {r['tokens_per_s']:.0f} | "
                     f"{r['peak_delta_bytes'] / 2**20:.0f} | {vs} | {paired} | {tv} |")
    return "\n".join(lines)


def target_lines(ts: list[dict]) -> list[str]:
    out = []
    for t in ts:
        verdict = "met" if t["step_le_0.85"] else "NOT met"
        if t["judged_on"] == "paired":
            lo, hi = t["midus_over_dus_paired_iqr"]
            ratio = (f"MIDUS/DUS step {t['midus_over_dus_paired']:.3f}x (median of {t['rounds']} paired rounds, IQR {lo:.3f}-{hi:.3f}; "
                     f"target <= 0.85: {verdict}; ratio of minima {t['midus_over_dus']:.2f}x)")
        else:
            ratio = f"MIDUS/DUS step {t['midus_over_dus']:.2f}x (median {t['midus_over_dus_median']:.2f}x; target <= 0.85: {verdict})"
        extra = ""
        if "floor_over_dus_paired" in t:
            extra += f"; floor (inserted FFNs at zero cost) {t['floor_over_dus_paired']:.3f}x paired"
        elif "floor_over_dus" in t:
            extra += f"; floor (inserted FFNs at zero cost) {t['floor_over_dus']:.2f}x"
        if "midus_over_pure_torch" in t:
            extra += (f"; the memory layer on its pure-torch path {t['pure_torch_over_dus']:.2f}x DUS "
                      f"(the Triton kernels take the MIDUS step to {t['midus_over_pure_torch']:.2f}x of that)")
        if "fused_over_dus" in t:
            extra += (f"; on the fused read {t['fused_over_dus']:.2f}x DUS ({t['fused_over_midus']:.2f}x the default "
                      f"Triton kernels' step)")
        if "llama_pro_over_dus_paired" in t:
            extra += f"; LLaMA-Pro (the same compute as DUS) {t['llama_pro_over_dus_paired']:.3f}x paired"
        out.append(f"- {t['precision']} {t['batch']}x{t['seq']}, freeze={t['freeze']}: {ratio}; trainable {human(t['midus_trainable'])} vs "
                   f"{human(t['dus_trainable'])} ({'fewer: met' if t['fewer_trainable'] else 'NOT fewer'}){extra}")
    return out


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [(key, f) for key in dict.fromkeys(setting(r) for r in rows) for f in ("none", "base")
              if any(setting(r) == key and r["freeze"] == f for r in rows)]
    models = list(ROWS)
    colors = {"base": "#999999", "DUS": "#1f77b4", "LLaMA-Pro": "#ff7f0e", "MIDUS": "#2ca02c", "MIDUS (pure torch)": "#98df8a",
              "MIDUS (fused Triton)": "#17becf", "FFN-free floor": "#cccccc"}
    fig, axes = plt.subplots(1, len(groups), figsize=(3.6 * len(groups), 3.8), squeeze=False)
    for ax, ((p, batch, seq), f) in zip(axes[0], groups):
        sel = {r["model"]: r for r in rows if setting(r) == (p, batch, seq) and r["freeze"] == f}
        ms = [m for m in models if m in sel]
        # where paired rounds ran they are the measurement (the separate processes' minima drift with the neighbours)
        paired = all("paired_vs_dus" in sel[m] for m in ms if m != "base")
        vals = [median(sel[m]["paired_steps_s"]) if paired and "paired_steps_s" in sel[m] else sel[m]["step_min_s"] for m in ms]
        bars = ax.bar(ms, vals, color=[colors[m] for m in ms])
        for b, m, v in zip(bars, ms, vals):
            label = f"{v * 1e3:.0f}ms" if v < 0.1 else f"{v:.2f}s"
            ratio = sel[m].get("paired_vs_dus" if paired else "step_vs_dus")
            if ratio is not None:
                label += f"\n{ratio:.2f}x"
            ax.annotate(label, (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom", fontsize=8)
        ax.set_title(f"{p} {batch}x{seq}, freeze={f}", fontsize=10)
        ax.set_ylabel("seconds per step (median, paired rounds)" if paired else "seconds per step (min)")
        ax.set_ylim(0, max(vals) * 1.3)
        ax.tick_params(axis="x", labelsize=8)
        ax.set_xticks(range(len(ms)), [m.replace(" ", "\n", 1) if len(m) > 9 else m for m in ms])  # no overlapping names
    if any("paired_vs_dus" in r for r in rows):
        title += "\nbars: median step of the paired rounds; ratios: median of the per-round ratios to DUS"
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def section_title(payload: dict) -> str:
    return (SECTION[payload["device"]] + LAYOUTS[payload.get("layout", "every5")]["title"]
            + (", torch.compile" if payload.get("compile") else ""))


def png_path(payload: dict) -> Path:
    png = PNG[payload["device"]]
    stem = png.stem + LAYOUTS[payload.get("layout", "every5")]["stem"] + ("_compile" if payload.get("compile") else "")
    return png.with_name(stem + png.suffix)


def section_text(payload: dict, source: Path | None = None) -> str:
    """The docs section of one run; ``source``: the JSON it came from (linked when it lies beside the page)."""
    v = payload["versions"]
    layout = LAYOUTS[payload.get("layout", "every5")]
    recipes = ", ".join(f"`{r.relative_to(REPO)}`" for r in layout["recipes"].values())
    gpu = payload["device"] == "cuda"
    notes = []
    for plan in payload["plans"]:
        notes.append(f"{plan['precision']}: batch {plan['batch']} x {plan['seq']}, {plan['repeats']} repeat(s) x ({plan['warmup']} warm-up + {plan['steps']} timed step(s)) per configuration"
                     + (f", then {plan['rounds']} paired rounds" if plan.get("rounds") else ""))
    if gpu:
        machine = [
            f"- Machine: {payload['machine']}; one child process per repeat runs every configuration in turn.",
            f"- Versions: Python {v['python']}, torch {v['torch']}, transformers {v['transformers']}.",
            f"- Command: `{payload['command']}`",
            f"- MIDUS's memory layer runs on {hml_backend_words(payload)}.",
            "- Weights: " + ("random, built from each output's config.json (`--random-init`: only the configs travelled "
                             "to the GPU machine); step time does not depend on the values." if payload["random_init"] else
                             "SmolLM2-135M-Instruct dequantised from its Q4_1 GGUF and its surgery outputs."),
        ]
        mem = ("- Memory: `torch.cuda.max_memory_allocated()`, reset after loading, minus the memory the loaded model holds: "
               "activations, gradients and AdamW state (the caching allocator's reserve is not counted).")
        prec = ("- `fp32`: weights, activations and AdamW in fp32 (TF32 matmuls off: torch's default). `bf16`: `torch.autocast('cuda', "
                "bfloat16)` over fp32 master weights and optimiser state, as `midus-surgery train` runs `precision: bf16`.")
        timing = ("- Timing: `torch.cuda.synchronize()` ends every phase; warm-up steps use the full batch; configurations "
                  "interleave within each repeat, their order rotating per repeat. ")
    else:
        machine = [
            f"- Machine: {payload['machine']}, torch threads {payload['threads']}; load average (1/5/15 min) at start {payload['load_avg_start']}, "
            f"at end {payload['load_avg_end']} (2 cores shared with other agents' test runs: noisy; minimum and median are both shown).",
            f"- Versions: Python {v['python']}, torch {v['torch']}, transformers {v['transformers']}.",
            f"- Command: `{payload['command']}`",
            f"- Base weights: {layout['weights']}; step time does not depend on the values.",
        ]
        mem = ("- Memory: the process's resident set, from `/proc/self/status`: the kernel high-water mark VmHWM, reset right before "
               "the first step (`/proc/self/clear_refs`), minus the RSS of the loaded model. The delta covers activations, gradients, "
               "AdamW state and allocator caches.")
        # runs before the machine line said so were made on CPUs without native bf16
        native = "native bf16" in payload["machine"] and "no native bf16" not in payload["machine"]
        bf16_speed = ("This CPU has native bf16." if native
                      else "This CPU has no native bf16, so bf16 is far slower.")
        prec = "- `fp32`: weights, activations and AdamW in fp32." + (
            " `bf16`: `torch.autocast('cpu', bfloat16)` over fp32 master weights and optimiser state, as `midus-surgery train` runs "
            f"`precision: bf16`. {bf16_speed}" if any(p["precision"] == "bf16" for p in payload["plans"])
            else " No bf16 rows (`--no-bf16`)." + ("" if native else " This CPU has no native bf16, and its bf16 steps take tens of seconds."))
        warm = ("the warm-up steps at the full batch (the first compiles; another shape would compile again)" if payload.get("compile")
                else "one warm-up step on a 1 x 16 batch (allocates AdamW state, runs every code path)")
        timing = ("- Each configuration runs in a fresh process (its memory, its fwd / bwd / AdamW split, `step min` and `step median`): "
                  f"load, {warm}, then the timed steps at the full "
                  "batch; configurations interleave within each repeat, their order rotating per repeat. Then the paired rounds "
                  "(`paired vs DUS`, what the target is judged on): every configuration of one freeze policy loaded in one process, "
                  "warmed up, then rounds of one full-batch step each, back to back, the order rotating per round; each round gives "
                  "one ratio to the DUS step of the same round, and the column shows the median and the interquartile range of those "
                  "ratios. This VM's speed drifts by 10-30% over minutes with its neighbours' load, and a round's steps are seconds "
                  "apart, so paired ratios cancel most of that drift; LLaMA-Pro, the same compute as DUS, shows what is left. ")
    png = link(png_path(payload), DOCS)
    lines = [
        section_title(payload), "",
        f"One training step (forward + backward + AdamW step, lr 1e-4; {adamw_words(payload)}) of {layout['family']} and its DUS, LLaMA-Pro and MIDUS outputs "
        f"({recipes}: {layout['what']}), "
        "random token ids (labels = inputs); batch sizes per precision below.",
        "",
        *machine,
        "- Freeze `none`: every parameter trains. `base`: only the inserted layers (kind != base in the output's `midus_plan.json`) "
        "train, as `midus-surgery train` defines it; not run for the base model (nothing would train). Parameters are counted once "
        "(tied embeddings).",
        prec,
        timing + "; ".join(notes) + ".",
        *compile_note(payload),
        mem,
        *raw_numbers_line(source if source is not None and inside(source, DOCS.parent) else None, DOCS, "bench_step_report.py"),
        "- `step vs DUS`: minimum step time over DUS's with the same freeze policy, precision and batch"
        + (" (from the separate processes: sensitive to the drift the paired rounds cancel)." if any(p.get("rounds") for p in payload["plans"]) else "."),
        "",
        table(payload["rows"]), "",
        f"![training step]({png})", "",
        "Target (MIDUS step at most 0.85x the DUS step, with fewer trainable parameters):", "",
        *target_lines(payload["targets"]), "",
        "`FFN-free floor` is not a method: it is the DUS model with the inserted blocks' FFNs replaced by a zero-cost stub, "
        "timed in the same loop. In expectation no FFN replacement, MIDUS's memory layer included, makes the up-scaled step "
        f"faster than that row: {layout['changed']} blocks change, and only their FFNs. "
        + ("" if gpu else "The whole possible gain is the inserted FFNs' share of the DUS step; the paired floor ratio "
           "measures it. ")
        + "What moves the ratio for real is the share of the step spent in replaced FFNs (more Memory "
        "blocks, or larger FFNs per block: at the Llama-3.2-1B block size the HML costs about 0.2x the FFN it replaces "
        "in fp32 on CPU, 0.4x in bf16 on a CPU with bf16 units, see the HML section).", "",
    ]
    return "\n".join(lines)


def hml_backend_words(payload: dict) -> str:
    # runs before the field existed timed the pure-torch path: the Triton kernels were opt-in then;
    # files written before it was renamed call it hml_cuda_path
    if payload.get("hml_cuda_backend", payload.get("hml_cuda_path")) == "triton":
        words = ("the Triton kernels (the slot selection and the bag's weight gradient, `midus_surgery/kernels/hml_triton.py`; "
                 "the CUDA default)")
    else:
        words = ("the pure-torch path (`torch.topk` and embedding-bag ops; `MIDUS_HML_KERNELS=torch`, or a run before the "
                 "Triton kernels were the CUDA default)")
    if any(r["model"] == "MIDUS (pure torch)" for r in payload["rows"]):
        words += "; `MIDUS (pure torch)` is the same model with the layer forced onto the pure-torch path, in the same run"
    if any(r["model"] == "MIDUS (fused Triton)" for r in payload["rows"]):
        words += ("; `MIDUS (fused Triton)` is the same model on the fused read (`kernels: triton-fused`: scores, selection, "
                  "softmax and pooling in one kernel), in the same run")
    return words


def compile_note(payload: dict) -> list[str]:
    if not payload.get("compile"):
        return []
    warm = [r["warmup_s"] for r in payload["rows"] if r.get("warmup_s")]
    span = f" took {min(warm):.0f}-{max(warm):.0f} s per configuration" if warm else ""
    return ["- Compiled: `torch.compile(model)` (inductor, default mode) once the freeze policy is set, as `midus-surgery train` "
            f"runs `compile: true`; the first warm-up step compiles the forward and backward, and the warm-up steps{span}. "
            "Every configuration compiles from scratch (`torch._dynamo.reset()` between them)."]


def inside(path: Path, folder: Path) -> bool:
    return Path(path).resolve().is_relative_to(Path(folder).resolve())


def write_docs(payload: dict, source: Path | None = None) -> None:
    """The section of ``payload`` in DOCS and its PNG; ``source``: the run's JSON, linked from the section."""
    device = payload["device"]
    title = "training step on " + (payload["machine"] if device == "cuda" else "CPU")
    payload = {**payload, "targets": targets(payload["rows"])}  # JSON from older runs lacks newer target fields
    layout = LAYOUTS[payload.get("layout", "every5")]
    plot(payload["rows"], png_path(payload), f"{layout.get('plot', layout['family'] + ' family' + layout['title'])}, {title}")
    write_section(DOCS, section_title(payload), section_text(payload, source))


def json_path(payload: dict) -> Path:
    """Where the driver keeps a full run's raw numbers: beside its PNG, under docs/results/."""
    return png_path(payload).with_suffix(".json")


def main(argv=None) -> int:
    return report_main(argv, __doc__, "bench_step.py", lambda payload, source: write_docs(payload, source))


def redraw(source: Path) -> int:
    """tools/bench_step.py --from-json: the section and the PNG of a saved run."""
    import json

    payload = json.loads(Path(source).read_text())
    write_docs(payload, source)
    print(f"rewrote {DOCS} and {png_path(payload)} from {source}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
