#!/usr/bin/env python
"""The report of tools/bench_adamw.py: the table and the `## AdamW implementations` section of docs/benchmarks.md.

    python tools/bench_adamw_report.py --from-json docs/results/bench_adamw_every2.json   # redraw the section
"""

from __future__ import annotations

import sys
from pathlib import Path

from bench_common import BENCHMARKS, RESULTS, raw_numbers_line, report_main, write_section
from bench_step_report import LAYOUTS

DOCS = BENCHMARKS
SECTION = "## AdamW implementations"


def json_path(payload: dict) -> Path:
    """Where the driver keeps a full run's raw numbers."""
    return RESULTS / f"bench_adamw_{payload['layout']}.json"


def table(rows: list[dict]) -> str:
    lines = ["| model | freeze | trainable params (tensors) | implementation | step min s | step median s | vs for-loop |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = f"**{r['vs_for_loop']:.2f}x**" if r["implementation"] == "fused" else f"{r['vs_for_loop']:.2f}x"
        lines.append(f"| {r['model']} | {r['freeze']} | {r['params'] / 1e6:.1f}M ({r['tensors']}) | {r['implementation']} | "
                     f"{r['step_min_s']:.3f} | {r['step_median_s']:.3f} (n={r['n_steps']}) | {ratio} |")
    return "\n".join(lines)


def write_docs(payload: dict, source: Path | None = None) -> None:
    """The section of ``payload`` in DOCS; ``source``: the run's JSON, linked from the section."""
    v = payload["versions"]
    body = "\n".join([
        SECTION, "",
        "One AdamW step (lr 1e-4, weight decay 0.1) over the parameters that train, in each torch implementation "
        "(`optim.implementation` of `midus-surgery train`; `auto`, the default, is fused on CPU and CUDA, while torch's own default "
        f"on CPU is the for-loop). Models: the SmolLM2-135M DUS and MIDUS outputs, {LAYOUTS[payload['layout']]['what']}.",
        "",
        f"- Machine: {payload['machine']}, torch threads {payload['threads']}; load average (1/5/15 min) at start "
        f"{payload['load_avg_start']}, at end {payload['load_avg_end']}.",
        f"- Versions: Python {v['python']}, torch {v['torch']}, transformers {v['transformers']}.",
        f"- Command: `{payload['command']}`",
        f"- Each repeat: per implementation a fresh optimiser, one untimed step (allocates the moments), then {payload['steps']} timed "
        f"steps; implementations interleave, order rotating; {payload['repeats']} repeat(s). Random gradients; the shapes are those "
        "`freeze: none` / `freeze: base` train.",
        *raw_numbers_line(source, DOCS, "bench_adamw_report.py"),
        f"- The implementations' weights after three steps differ by at most {payload['max_abs_diff']:.1e} (float rounding).",
        "",
        table(payload["rows"]), "",
    ])
    write_section(DOCS, SECTION, body)


def main(argv=None) -> int:
    return report_main(argv, __doc__, "bench_adamw.py", write_docs)


if __name__ == "__main__":
    sys.exit(main())
