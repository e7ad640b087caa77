#!/usr/bin/env python
"""The report of tools/bench_cpt.py: the results table, the loss plot and the run's section of
docs/results/reproduction-runs.md (docs/reproduction.md summarises those runs by hand).

    python tools/bench_cpt_report.py --from-json work/bench/cpt-quick/results.json   # redraw a run's plot and section
    python tools/bench_cpt_report.py --from-json docs/results/reproduction-tokens-49152.json

Same as `python tools/bench_cpt.py --replot RESULTS_JSON`.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

from bench_common import RESULTS, link, read_saved_run

DOCS = RESULTS / "reproduction-runs.md"  # one section per run, written by the tool
HEADER = ("# Reproduction runs\n\nOne section per run of `tools/bench_cpt.py` (generated: edits inside a section are overwritten). "
          "The findings are summarised in [../reproduction.md](../reproduction.md).\n")
BASE_LAYERS = 30


def row_layers(row: dict) -> int | None:
    """Decoder layers of a trained row's model (from its exported config; None when neither is at hand)."""
    config = Path(row.get("final", "")) / "config.json"
    if "layers" not in row and config.is_file():
        row["layers"] = json.loads(config.read_text()).get("num_hidden_layers")
    return row.get("layers")


def plot_panels(rows: dict) -> list[tuple[str, tuple[str, ...]]]:
    """(title, rows left out) per panel: every run, plus a zoom without DUS when DUS trained
    (its loss starts far above the others and hides their differences)."""
    panels = [("all runs", ())]
    if rows.get("DUS", {}).get("curve"):
        panels.append(("without DUS (zoom)", ("DUS",)))
    return panels


def plot(results: dict, a, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = plot_panels(results["rows"])
    fig, axes = plt.subplots(1, len(panels), figsize=(12 if len(panels) > 1 else 8, 5.0), squeeze=False)
    axes = axes[0]
    colors = {"DUS": "tab:blue", "LLaMA-Pro": "tab:orange", "MIDUS": "tab:green"}
    b = results["rows"].get("base", {}).get("a")
    for ax, (title, skip) in zip(axes, panels):
        ax.set_title(title, fontsize=9)
        for name, r in results["rows"].items():
            if name == "base" or name in skip or not r.get("curve"):
                continue
            xs, ys = zip(*r["curve"])
            ax.plot(xs, ys, lw=0.8, alpha=0.35, color=colors.get(name))
            w = max(1, len(ys) // 8)  # running mean over w steps (per-step loss on a 1k-token batch is noisy)
            sm = [sum(ys[max(0, i - w + 1):i + 1]) / len(ys[max(0, i - w + 1):i + 1]) for i in range(len(ys))]
            ax.plot(xs, sm, lw=2, color=colors.get(name), label=f"{name} train" + (f" (running mean of {w})" if w > 1 else ""))
            pts = [(e["tokens"], e["eval_loss"]) for e in (r.get("start_eval"), r.get("final_eval")) if e]
            if b and name != "DUS":
                pts = [(0, b["loss"])] + pts  # identity-initialised: starts exactly at the base
            if pts:
                ax.plot(*zip(*pts), marker="*", ms=12, ls=":", color=colors.get(name), mec="k",
                        label=f"{name} held-out {pts[-1][1]:.4f}")
        if b:
            ax.axhline(b["loss"], color="gray", ls="--", lw=1, label=f"base held-out {b['loss']:.4f}")
        ax.set_xlabel("training tokens")
        ax.set_ylabel("loss (nats/token)")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    added = sorted({n - BASE_LAYERS for name, r in results["rows"].items() if name != "base" and (n := row_layers(r))})
    blocks = f" (+{'/'.join(map(str, added))} blocks)" if added else ""
    sep = "\n" if len(panels) == 1 else " "  # one panel is too narrow for the title on one line
    fig.suptitle(f"CPT on {a.train_corpus}, freeze={a.freeze}, {a.tokens:,} tokens, SmolLM2-135M{blocks};{sep}"
                 f"held-out: first {a.eval_blocks} blocks", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def fmt_table(results: dict) -> str:
    a_name, b_name = results["train_corpus"], results["other_corpus"]
    lines = [f"| model | ppl held-out {a_name} | ppl {b_name} | trainable params | tokens | train wall | tokens/s |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    notes = []
    for name, r in results["rows"].items():
        pa = f"{r['a']['perplexity']:.3f}" if r.get("a") else "not measured"
        pb = f"{r['b']['perplexity']:.3f}" if r.get("b") else "not measured"
        if name == "base":
            lines.append(f"| base (no training) | {pa} | {pb} | 0 | 0 | - | - |")
            continue
        tr = f"{r['trainable_exact'] / 1e6:.2f}M" if r.get("trainable_exact") else r["trainable"]
        start = f" (start {r['start_eval']['eval_ppl']:.3f})" if r.get("start_eval") else ""
        wall = f" ({r['wall_s'] / 60:.1f} min with load/eval/export)" if r["wall_s"] == r["wall_s"] else ""  # NaN: not measured
        mark = ""
        if r.get("reconstructed_from_log"):  # a run cut short: its row was rebuilt from the log, said below the table
            mark = f" [{len(notes) + 1}]"
            notes.append(f"[{len(notes) + 1}] {name}: {r['reconstructed_from_log']}.")
        lines.append(f"| {name}{mark} | {pa}{start} | {pb} | {tr} | {r['tokens']:,} | {r['train_s'] / 60:.1f} min{wall} | {r['tokens_per_s']:.1f} |")
    return "\n".join(lines + ([""] + notes if notes else []))


def write_doc(results: dict, a, png: Path | None) -> None:
    """Replace (or append) the `<label>` section of DOCS; ``png``: the loss plot beside it."""
    doc = DOCS
    text = doc.read_text() if doc.exists() else HEADER
    m = results["machine"]
    block = [f"<!-- bench_cpt:{a.label}:begin (generated by tools/bench_cpt.py; edits inside are overwritten) -->",
             f"### Results: `{a.label}`", "",
             f"Command: `{results['command']}`  ",
             f"Machine: {m['device']}; Python {m['python']}, torch {m['torch']}, transformers {m['transformers']}; "
             f"load average before / after: {results['load_before']} / {results['load_after']}; total wall {results['total_wall_s'] / 60:.1f} min; "
             f"{results['date']}.  ",
             "Base: `work/smollm2-135m` = SmolLM2-135M-Instruct Q4_1 GGUF dequantised to fp32 (not the original bf16 weights).  ",
             f"Training: `{results['train_corpus']}` ({results['n_train_files']} files; every {a.held_out_every}th file by name held out: "
             f"{results['n_held_files']} files), freeze={a.freeze}, {a.tokens:,} tokens = {results['rows'].get('MIDUS', results['rows'].get('DUS', {})).get('steps', '?')} steps "
             f"of {a.micro_batch_size} x {a.grad_accum} x {a.block_size}, seed {a.seed}, precision {a.precision}, lr {a.lr:g} cosine (warmup 2%), "
             f"memory lr {a.memory_lr:g} {'constant' if a.memory_schedule == 'constant' else 'cosine (the base schedule)'}. Evaluation: packed blocks of {a.block_size}, the first {a.eval_blocks} blocks of each domain "
             f"({a.eval_blocks * (a.block_size - 1):,} predicted tokens).",
             *([("Recipes: " + "; ".join(f"{row} `{recipe}`" for row, recipe in results["recipes"].items()) + ".")]
               if results.get("recipes") else []), "",
             fmt_table(results), "",
             f"Raw numbers: [reproduction-{a.label}.json](reproduction-{a.label}.json)." if (doc.parent / f"reproduction-{a.label}.json").is_file() else "",
             f"![loss curves]({link(png, doc)})" if png else "", "",
             f"<!-- bench_cpt:{a.label}:end -->"]
    block = "\n".join(block)
    pat = re.compile(rf"<!-- bench_cpt:{re.escape(a.label)}:begin.*?<!-- bench_cpt:{re.escape(a.label)}:end -->", re.S)
    text = pat.sub(lambda _: block, text) if pat.search(text) else text.rstrip() + "\n\n" + block + "\n"
    doc.write_text(text)


def run_args(results: dict) -> SimpleNamespace:
    """The arguments a saved run was made with, typed as the plot and the section read them."""
    raw = results["args"]
    a = SimpleNamespace(**{k: raw[k] for k in ("label", "freeze", "precision", "train_corpus", "other_corpus")})
    for k in ("tokens", "eval_blocks", "block_size", "micro_batch_size", "grad_accum", "seed", "held_out_every"):
        setattr(a, k, int(raw[k]))
    for k in ("lr", "memory_lr"):
        setattr(a, k, float(raw[k]))
    a.memory_schedule = raw.get("memory_schedule", "constant")  # results.json older than the flag
    return a


def publish(results: dict, a, png: Path) -> Path:
    """Copy a run's plot and results.json under docs/results/ and write its section; returns the PNG's copy."""
    doc_png = DOCS.parent / f"reproduction-{a.label}.png"
    doc_png.parent.mkdir(parents=True, exist_ok=True)
    if Path(png).resolve() != doc_png.resolve():
        shutil.copyfile(png, doc_png)
    (DOCS.parent / f"reproduction-{a.label}.json").write_text(json.dumps(results, indent=1))
    write_doc(results, a, doc_png)
    return doc_png


def redraw(source: Path, doc: bool = True) -> None:
    """Redraw a saved run's loss plot (beside ``source``) and, with ``doc``, publish it."""
    results = json.loads(Path(source).read_text())
    a = run_args(results)
    png = Path(source).with_name("loss.png") if Path(source).name == "results.json" else Path(source).with_suffix(".png")
    plot(results, a, png)
    if doc:
        publish(results, a, png)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--from-json", metavar="RESULTS_JSON", required=True, help="a results.json of tools/bench_cpt.py")
    ap.add_argument("--no-doc", action="store_true", help="only redraw the plot beside the JSON")
    args = ap.parse_args(argv)
    payload = read_saved_run(Path(args.from_json), "bench_cpt.py")
    if payload is None:
        return 2
    redraw(Path(args.from_json), doc=not args.no_doc)
    print(fmt_table(payload))
    return 0


if __name__ == "__main__":
    sys.exit(main())
