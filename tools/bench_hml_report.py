#!/usr/bin/env python
"""The report of tools/bench_hml.py: the table, the targets and the `## HML` section of docs/benchmarks.md.

    python tools/bench_hml_report.py --from-json docs/results/bench_hml.json   # redraw the section from a saved run

It reads only the run's JSON ({"rows", "machine", "versions", "command", "batch", "seq"}), no torch.
"""

from __future__ import annotations

import sys
from pathlib import Path

from bench_common import BENCHMARKS, RESULTS, raw_numbers_line, report_main, write_section

DOCS = BENCHMARKS
JSON = RESULTS / "bench_hml.json"  # the driver's --write-docs keeps the run's raw numbers here


def table(rows: list[dict]) -> str:
    head = (
        "| size | dtype | n | k | d_l | HML params | FFN params | HML ms | FFN ms | HML/FFN | "
        "pure-torch HML ms (/FFN) | bytes floor ms (unique / gathered) | HML peak MiB | FFN peak MiB |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for r in rows:
        ffn_ms = f"{r['ffn_ms']}" + (f" (timed on {r['ffn_tokens_timed']} tok, scaled)" if "ffn_tokens_timed" in r else "")
        pure = f"{r['hml_torch_ms']} ({r['ratio_torch']:.2f}x)" if "hml_torch_ms" in r else "-"
        floor = f"{r['floor_unique_ms']} / {r['floor_gathered_ms']}" if "floor_unique_ms" in r else "-"
        fpeak = r["ffn_peak_mib"]
        if fpeak is None:
            fpeak = "n/a (see note)"
        lines.append(
            f"| {r['size']} | {r['dtype']} | {r['n']} | {r['k']} | {r['d_l']} | {r['hml_params'] / 1e6:.2f}M | "
            f"{r['ffn_params'] / 1e6:.2f}M | {r['hml_ms']} | {ffn_ms} | **{r['ratio']:.2f}x** | "
            f"{pure} | {floor} | {r['hml_peak_mib']} | {fpeak} |"
        )
    return head + "\n".join(lines) + "\n"


def versions_line(v: dict) -> str:
    return f"Python {v['python']}, torch {v['torch']}, transformers {v['transformers']} (the FFN is its `LlamaMLP`)"


def bf16_notes(rows: list[dict], machine: str = "") -> str:
    """The bf16 bullets of the docs section: what bf16 means on the CPU the rows were timed on (``machine``, the
    run's machine line, says "no native bf16" for a CPU without bf16 units), and how scaled FFN rows were timed."""
    if "no native bf16" in machine:
        notes = ("- bfloat16 rows: module and input cast to bf16. On this CPU without bf16 units HML runs its matmuls, "
                 "scores and top-k in float32 whatever the input (see docs/hml.md, Precision) and reads its bank in the "
                 "bank's dtype, so its bf16 times differ from its fp32 times by the bank's bytes only, while the FFN's "
                 "bf16 times hit slow bf16 GEMM kernels.\n")
    else:
        notes = ("- bfloat16 rows: module and input cast to bf16. HML scores, selects and takes its softmax in float32 "
                 "whatever the input, reads its bank in the bank's dtype, and on a CPU with bf16 units runs its "
                 "projection's matmuls in bf16 (see docs/hml.md, Precision); the FFN's bf16 GEMMs run on the same units.\n")
    if any(r["dtype"] == "bf16 autocast" for r in rows):
        notes += ("- bf16 autocast rows: float32 parameters stepped under `torch.autocast(bfloat16)`, as `midus-surgery "
                  "train` runs `precision: bf16`; the HML gets bf16 queries (its attention's query projection's output "
                  "under autocast) and runs with autocast off inside (docs/hml.md, Precision), the FFN gets a float32 "
                  "input and runs its GEMMs in bf16.\n")
    if any("ffn_tokens_timed" in r for r in rows):
        notes += ("- bfloat16 FFN rows marked scaled: timed on fewer tokens and scaled linearly in tokens (a bf16 GEMM at the "
                  "Llama size takes minutes on a CPU without native bf16; --quick times every bf16 FFN so); their peak "
                  "memory is not measured at the full size.\n")
    return notes


# HML/FFN targets per block size (the rows of the other sizes are for reference).
TARGETS = {"SmolLM2-135M": 0.5, "Llama-3.2-1B": 0.25}


def targets(rows: list[dict]) -> str:
    """One line per targeted row: its ratio against the target, met or NOT met."""
    lines = []
    for r in rows:
        if r["size"] in TARGETS:
            limit = TARGETS[r["size"]]
            verdict = "met" if r["ratio"] <= limit else "NOT met"
            lines.append(f"- {r['size']} {r['dtype']}: HML/FFN {r['ratio']:.2f}x (target <= {limit}: {verdict})")
    if not lines:
        return ""
    return "\nTargets (HML/FFN, forward + backward):\n\n" + "\n".join(lines) + "\n"


def write_docs(path, payload: dict, source: Path | None = None) -> None:
    """The `## HML` section of ``payload`` (one run: rows, machine, versions, command) in the page ``path``;
    ``source``: the run's JSON, linked from the section."""
    rows = payload["rows"]
    section = (
        "## HML\n\n"
        "Head-wise Memory Layer (`midus_surgery/model/hml.py`) vs the FFN it replaces (transformers' `LlamaMLP`), "
        f"forward+backward, batch {payload['batch']} x {payload['seq']} tokens, interleaved repeats, minimum time.\n\n"
        f"- Machine: {payload['machine']}\n"
        f"- Versions: {versions_line(payload['versions'])}\n"
        f"- Command: `{payload['command']}`\n"
        + "".join(line + "\n" for line in raw_numbers_line(source, path, "bench_hml_report.py")) +
        "- Peak memory: live tensor bytes during one fwd+bwd step from torch.profiler allocation events "
        "(`profile_memory=True`); parameters excluded, gradients included.\n"
        + bf16_notes(rows, payload.get("machine", "")) +
        "- HML ms: the compiled CPU kernels (`midus_surgery/kernels`, what runs on CPU by default); the "
        "pure-torch column is the same layer with `MIDUS_HML_KERNELS=torch` (what runs without a compiler), "
        "timed in the same interleaved loop.\n"
        "- This VM's two vCPUs and its neighbours make single runs vary by up to ~30%; the minimum over "
        "repeats is reported.\n"
        + (f"- Bytes floor: the bytes one fwd+bwd of the layer must move (`bench_hml.traffic`: unique = every input, "
           f"output, saved tensor, parameter and gradient once; gathered = the bank rows the lookups read and the "
           f"gradient rows they add), divided by the memory bandwidth measured by a copy in the same run "
           f"({payload['copy_gbps']} GB/s); docs/hml.md, \"The physical picture\".\n" if "copy_gbps" in payload else "")
        + "\n"
        + table(rows)
        + targets(rows)
    )
    write_section(path, "## HML", section)


def main(argv=None) -> int:
    return report_main(argv, __doc__, "bench_hml.py", lambda payload, source: write_docs(DOCS, payload, source))


if __name__ == "__main__":
    sys.exit(main())
