#!/usr/bin/env python
"""The report of tools/bench_decode.py: the table, the targets, the profile and the docs section of one run's JSON.

    python tools/bench_decode_report.py --from-json docs/results/bench_decode_cpu.json   # redraw a section

The driver (tools/bench_decode.py) runs the generations and writes the JSON; everything here reads only that JSON
(no torch), so a run made on another machine (a GPU session) is redrawn here. Sections go into docs/benchmarks.md
(`## Decode`, `## Decode on GPU`, with the layout's suffix as the training-step sections have, and `, compiled
(static cache, torch.compile)` for a --compile run), the JSON into docs/results/
(`bench_decode_{cpu|gpu}{_every2|_llama1b}{_compiled}.json`).
"""

from __future__ import annotations

import sys
from pathlib import Path

from bench_common import BENCHMARKS, REPO, RESULTS, raw_numbers_line, report_main, write_section
from bench_step_report import LAYOUTS, inside

DOCS = BENCHMARKS  # the page the sections go into
SECTION = {"cpu": "## Decode", "cuda": "## Decode on GPU"}
ROWS = ("base", "DUS", "LLaMA-Pro", "MIDUS")  # the bundled layouts' rows, in order
FUSED_ROW = "MIDUS (fused Triton)"  # the MIDUS model on the fused read (kernels: triton-fused), CUDA runs only
REFERENCE = "DUS"  # what the ratios and the target compare with
TARGET = 1.0  # MIDUS decode tokens/s at least DUS's


def setting(row: dict) -> tuple[str, int]:
    """What a ratio may compare across: (dtype, batch)."""
    return row["dtype"], row["batch"]


def targets(rows: list[dict]) -> list[dict]:
    """The issue's target per (dtype, batch): MIDUS decode speed over DUS's, judged on the median of the per-round
    ratios of the generates' median decode steps (rounds pair the two models seconds apart; a step median ignores a
    burst of the neighbours' load inside one generate), with the ratio of whole-decode tokens/s beside it."""
    out = []
    for key in dict.fromkeys(setting(r) for r in rows):
        sel = {r["model"]: r for r in rows if setting(r) == key}
        m, d = sel.get("MIDUS"), sel.get(REFERENCE)
        if not (m and d and "step_vs_dus" in m):
            continue
        t = {"dtype": key[0], "batch": key[1], "midus_over_dus": m["step_vs_dus"],
             "midus_over_dus_iqr": [m["step_vs_dus_q1"], m["step_vs_dus_q3"]], "rounds": m["paired_rounds"],
             "midus_over_dus_tps": m["tps_vs_dus"], "midus_over_dus_tps_iqr": [m["tps_vs_dus_q1"], m["tps_vs_dus_q3"]],
             "met": m["step_vs_dus"] >= TARGET}
        if "LLaMA-Pro" in sel and "step_vs_dus" in sel["LLaMA-Pro"]:
            t["llama_pro_over_dus"] = sel["LLaMA-Pro"]["step_vs_dus"]
        if FUSED_ROW in sel and "step_vs_dus" in sel[FUSED_ROW]:
            t["fused_over_dus"] = sel[FUSED_ROW]["step_vs_dus"]
            t["fused_met"] = t["fused_over_dus"] >= TARGET
        out.append(t)
    return out


def target_lines(ts: list[dict]) -> list[str]:
    out = []
    for t in ts:
        lo, hi = t["midus_over_dus_iqr"]
        tlo, thi = t["midus_over_dus_tps_iqr"]
        line = (f"- {t['dtype']}, batch {t['batch']}: MIDUS/DUS decode speed {t['midus_over_dus']:.3f}x (median of "
                f"{t['rounds']} paired rounds of the median step, IQR {lo:.3f}-{hi:.3f}; of whole-decode tokens/s "
                f"{t['midus_over_dus_tps']:.3f}x, IQR {tlo:.3f}-{thi:.3f}): MIDUS/DUS tokens/s >= {TARGET:.1f}: "
                f"{'met' if t['met'] else 'NOT met'}")
        if "llama_pro_over_dus" in t:
            line += f"; LLaMA-Pro (the same compute as DUS) {t['llama_pro_over_dus']:.3f}x"
        if "fused_over_dus" in t:
            line += (f"; on the fused read (`kernels: triton-fused`) {t['fused_over_dus']:.3f}x "
                     f"({'met' if t['fused_met'] else 'NOT met'})")
        out.append(line)
    return out


def human(n: int) -> str:
    return f"{n / 1e6:.1f}M"


def table(rows: list[dict]) -> str:
    lines = ["| dtype | batch | model | params | prefill ms | decode ms / step: mean / median | decode tokens/s | "
             "vs DUS, median step: median [IQR] | vs DUS, tokens/s: median [IQR] | prefill vs DUS | new tokens per generate |",
             "|---|---|---|---|---:|---:|---:|---|---|---|---:|"]
    for r in rows:
        vs = lambda k: (f"{r[k + '_vs_dus']:.3f}x [{r[k + '_vs_dus_q1']:.3f}-{r[k + '_vs_dus_q3']:.3f}]"  # noqa: E731
                        if k + "_vs_dus" in r else "-")
        pf = f"{r['prefill_vs_dus']:.3f}x" if "prefill_vs_dus" in r else "-"
        lines.append(f"| {r['dtype']} | {r['batch']} | {r['model']} | {human(r['params'])} | {r['prefill_ms']:.1f} | "
                     f"{r['decode_ms_per_step']:.2f} / {r['step_median_ms']:.2f} | {r['decode_tokens_per_s']:.1f} | "
                     f"**{vs('step')}** | {vs('tps')} | {pf} | {r['new_tokens']} |")
    return "\n".join(lines)


def profile_lines(payload: dict) -> list[str]:
    """The profile (``--profile``): the inserted blocks of DUS and MIDUS at decode, per call in the model, and the
    operators of DUS's inserted FFN and of MIDUS's memory layer at T = batch tokens per call."""
    prof = payload.get("profile")
    if not prof:
        return []
    if any(p.get("compiled") for p in prof):
        return compiled_profile_lines(prof)
    us = lambda v: "-" if v is None else f"{v:.0f}"  # noqa: E731
    lines = ["Profile (`--profile`), per call at a decode step (T = batch tokens), in microseconds. Block columns: wall "
             "time between forward hooks, median over every inserted block's calls in 3 more generates per model "
             "(DUS and MIDUS interleaved). `in the profiler`: the median call's operator times, summed, from one more "
             "generate under `torch.profiler` with a range around each call (the profiler adds its own overhead per "
             "operator). `alone`: the memory layer called back to back on the queries of one decode step, its tables "
             "hot in cache.", "",
             "| dtype | batch | DUS inserted block | its FFN | its attention out-projection | DUS FFN in the profiler | "
             "MIDUS memory block | its memory readout | memory layer in the profiler | memory layer alone |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for p in prof:
        lines.append(f"| {p['dtype']} | {p['batch']} | {us(p.get('dus_block_us'))} | {us(p.get('dus_ffn_us'))} | "
                     f"{us(p.get('dus_o_proj_us'))} | {us(p.get('dus_profiled_us'))} | {us(p.get('midus_block_us'))} | "
                     f"{us(p.get('midus_readout_us'))} | {us(p.get('midus_profiled_us'))} | {us(p.get('hml_alone_us'))} |")
    for p in prof:
        for prefix, what in (("midus", "MIDUS's memory layer"), ("dus", "DUS's inserted FFN")):
            ops = p.get(f"{prefix}_ops")
            if not ops:
                continue
            lines += ["", f"{what}, {p['dtype']}, T = {p['batch']}: self time of each operator in the median call "
                          f"({p[prefix + '_profiled_calls']} calls profiled, {p[prefix + '_profiled_us']:.0f} us per call "
                          "in all):", "",
                      "| operator | self us per call | calls per call |", "|---|---:|---:|"]
            for o in ops[:10]:
                lines.append(f"| `{o['name']}` | {o['self_us']:.1f} | {o['count']:g} |")
    return lines + [""]


def compiled_profile_lines(prof: list[dict], top: int = 10) -> list[str]:
    """``--compile --profile``: per model, what one more compiled generate ran on the device, beside its wall time;
    then the kernels on which MIDUS spends more than DUS (the difference, per generate)."""
    what = next(iter(prof[0]["models"].values()))["what"]
    lines = [f"Profile (`--compile --profile`): one more compiled generate per model and setting under `torch.profiler`, "
             f"{what}: how many ran, their time summed, and the generate's wall time (prefill included: one pass "
             "against N - 1 decode steps). Device time far under the wall time means the step waits on the host.", "",
             "| dtype | batch | model | launched | on the device ms | generate wall ms | of which decode ms | device / wall |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for p in prof:
        for name, k in p["models"].items():
            share = f"{k['device_ms'] / k['wall_ms']:.2f}" if k["wall_ms"] else "-"
            lines.append(f"| {p['dtype']} | {p['batch']} | {name} | {k['launched']} | {k['device_ms']:.2f} | "
                         f"{k['wall_ms']:.1f} | {k['decode_ms']:.1f} | {share} |")
    for p in prof:
        mine, theirs = p["models"].get("MIDUS"), p["models"].get(REFERENCE)
        if not mine or not theirs:
            continue
        diff = []
        for name in dict.fromkeys([*mine["all"], *theirs["all"]]):
            (mc, mu), (dc, du) = mine["all"].get(name, (0, 0.0)), theirs["all"].get(name, (0, 0.0))
            if mu - du > 0:
                diff.append((mu - du, name, mc, mu, dc, du))
        diff.sort(reverse=True)
        lines += ["", f"What MIDUS runs more of than DUS, {p['dtype']}, batch {p['batch']} (per generate; "
                      f"{mine['device_ms'] - theirs['device_ms']:+.2f} ms on the device in all):", "",
                  "| name | MIDUS count | MIDUS us | DUS count | DUS us | MIDUS - DUS us |", "|---|---:|---:|---:|---:|---:|"]
        for d, name, mc, mu, dc, du in diff[:top]:
            lines.append(f"| `{name[:80]}` | {mc} | {mu:.0f} | {dc} | {du:.0f} | {d:+.0f} |")
    return lines + [""]


def cudagraph_lines(payload: dict) -> list[str]:
    """What inductor did about CUDA graphs while each model compiled (a compiled GPU run): skipped graphs,
    partitions (a cut around operators a graph cannot hold) and its reasons."""
    settings = [c for c in payload.get("compiles", []) if c.get("cudagraphs")]
    if payload["device"] != "cuda" or not settings:
        return []
    lines = ["- CUDA graphs, as inductor reported them while each model compiled (graphs skipped, partitions: pieces cut "
             "around operators a graph cannot hold; a model that reused another's compiled code shows none of its own):"]
    for c in settings:
        parts = [f"{name} {g['cudagraph_skips']} skipped, {g['cudagraph_partitions']} partitions"
                 for name, g in c["cudagraphs"].items()]
        lines.append(f"  {c['dtype']} batch {c['batch']}: " + "; ".join(parts) + ".")
        for name, g in c["cudagraphs"].items():
            for note in g.get("cudagraph_notes", [])[:5]:
                lines.append(f"  {name}: `{note[:200]}`")
    return lines


def section_title(payload: dict) -> str:
    """`## Decode` (`on GPU`), the layout's suffix, and the thread count where --threads set one (its own section)."""
    n = payload.get("threads_set")
    return (SECTION[payload["device"]] + LAYOUTS[payload.get("layout", "every5")]["title"]
            + (f", {n} torch thread{'s' if n > 1 else ''}" if n else "")
            + (", compiled (static cache, torch.compile)" if payload.get("compiled") else ""))


def json_path(payload: dict) -> Path:
    """Where the driver keeps a full run's raw numbers."""
    n = payload.get("threads_set")
    stem = ("bench_decode_" + ("gpu" if payload["device"] == "cuda" else "cpu") + LAYOUTS[payload.get("layout", "every5")]["stem"]
            + (f"_threads{n}" if n else "") + ("_compiled" if payload.get("compiled") else ""))
    return RESULTS / f"{stem}.json"


def section_text(payload: dict, source: Path | None = None) -> str:
    """The docs section of one run; ``source``: the JSON it came from (linked when it lies beside the page)."""
    v = payload["versions"]
    layout = LAYOUTS[payload.get("layout", "every5")]
    gpu = payload["device"] == "cuda"
    if payload.get("custom_models"):
        what = "the models " + ", ".join(f"{k} (`{p}`)" for k, p in payload["custom_models"].items())
    else:
        recipes = ", ".join(f"`{Path(r).relative_to(REPO)}`" for r in layout["recipes"].values())
        what = f"{layout['family']} and its DUS, LLaMA-Pro and MIDUS outputs ({recipes}: {layout['what']})"
    batches = sorted({r["batch"] for r in payload["rows"]})
    dtypes = list(dict.fromkeys(r["dtype"] for r in payload["rows"]))
    if gpu:
        machine = f"- Machine: {payload['machine']}."
        sync = " Each timestamp follows `torch.cuda.synchronize()`."
    else:
        machine = (f"- Machine: {payload['machine']}, torch threads {payload['threads']}; load average (1/5/15 min) at start "
                   f"{payload['load_avg_start']}, at end {payload['load_avg_end']} (2 cores shared with other agents' work: "
                   "its speed drifts by 10-30% over minutes, hence the paired rounds).")
        sync = ""
    weights = ("random, built from each output's config.json (`--random-init`); decode time does not depend on the values "
               "(every generate makes exactly N tokens)" if payload["random_init"] else layout["weights"])
    compiled = payload.get("compiled")
    call = ("use_cache=True, cache_implementation=\"static\", compile_config=CompileConfig(fullgraph=True, dynamic=False, "
            f"mode=\"{'reduce-overhead' if gpu else 'default'}\"))` (a static KV cache and the decode step compiled whole by "
            "torch.compile, through generate's own switch" + ("; CUDA graphs" if gpu else "; on a CPU generate compiles only when "
            "the config says `_compile_all_devices`") + ")" if compiled else "use_cache=True)`")
    warmup = ("two generates of the timed length at the full batch and prompt: the first compiles"
              + (", the second records the CUDA graphs" if gpu else "") + "; a graph compiled during the timed rounds "
              "would be an error, not a silent eager step" if compiled else "one generate of 2 new tokens at the full batch "
              "and prompt")
    lines = [
        section_title(payload), "",
        f"Greedy generation with the KV cache, `model.generate(do_sample=False, max_new_tokens=N, min_new_tokens=N, "
        f"{call} (so no row stops early at an end-of-text token), of {what}: a prompt of "
        f"{payload['prompt_tokens']} random token ids (seeded, the same for every model), N = {payload['new_tokens']} new "
        f"tokens, batch {' and '.join(map(str, batches))}, {' and '.join(dtypes)} weights.",
        "",
        machine,
        f"- Versions: Python {v['python']}, torch {v['torch']}, transformers {v['transformers']}.",
        f"- Command: `{payload['command']}`",
        f"- Weights: {weights}.",
        f"- MIDUS's memory layer runs on the {payload['hml_backend_words']} (`hml.prepare_kernels` before timing).",
        "- Timing: a `LogitsProcessor` appended to `generate`'s own list takes a timestamp each time logits reach it, i.e. "
        "right after each forward pass: the first after the prefill, then one per decode step." + sync + " `prefill ms`: "
        "from the `generate` call to the first stamp (the prompt's forward, plus `generate`'s setup). `decode ms / step`, "
        "mean: first to last stamp over the N - 1 decode steps between them (picking the token, the forward of one token "
        "per row against the cache, the processors); median: the median of those N - 1 step times. `decode tokens/s` = "
        "batch x (N - 1) / the first to last stamp time. Medians over the rounds; "
        "every generate made batch x N new tokens (checked; `new tokens per generate`).",
        f"- Rounds: every model loaded in one process, each warmed up ({warmup}), then {payload['rounds']} rounds per "
        "dtype and batch; a round runs every model once, back to back, "
        "the order rotating per round. `vs DUS`: the median and the interquartile range of the per-round ratios "
        "to DUS's speed in the same round (above 1: faster than DUS), of two speeds: `median step`, the inverse "
        "of the generate's median decode step (blind to a burst of the neighbours' load shorter than half the steps; "
        "what the target is judged on), and `tokens/s` over the whole decode. LLaMA-Pro, the same compute as DUS, "
        "shows what noise the pairing leaves.",
    ]
    if any(r["model"] == FUSED_ROW for r in payload["rows"]):
        lines.append(f"- `{FUSED_ROW}`: the MIDUS model with its memory layers on the fused read (`kernels: triton-fused`: "
                     "the scores, selection, softmax and pooled gather in one Triton kernel, where the default path launches "
                     "about ten operators), timed because the decode on a GPU is bound by per-operator overhead.")
    lines += cudagraph_lines(payload)
    if not gpu:
        lines.append("- CUDA rows: `python tools/bench_decode.py --device cuda --random-init --dtypes fp32,bf16` measures them "
                     "on a GPU machine (only the outputs' config.json files need to travel; tools/gpu_session.py runs it), and "
                     "`python tools/bench_decode_report.py --from-json FILE` writes their `## Decode on GPU` section here.")
    lines += raw_numbers_line(source if source is not None and inside(source, DOCS.parent) else None, DOCS,
                              "bench_decode_report.py")
    lines += ["", table(payload["rows"]), "",
              f"Target (MIDUS decode tokens/s at least DUS's, at batch {' and '.join(map(str, batches))}):", "",
              *target_lines(targets(payload["rows"])), "", *profile_lines(payload)]
    return "\n".join(lines)


def write_docs(payload: dict, source: Path | None = None) -> None:
    """The section of ``payload`` in DOCS; ``source``: the run's JSON, linked from the section."""
    write_section(DOCS, section_title(payload), section_text(payload, source))


def redraw(source: Path) -> int:
    """tools/bench_decode.py --from-json: the section of a saved run."""
    import json

    payload = json.loads(Path(source).read_text())
    write_docs(payload, Path(source))
    print(f"rewrote the {section_title(payload)[3:]} section of {DOCS} from {source}")
    return 0


def main(argv=None) -> int:
    return report_main(argv, __doc__, "bench_decode.py", lambda payload, source: write_docs(payload, source))


if __name__ == "__main__":
    sys.exit(main())
