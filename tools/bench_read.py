#!/usr/bin/env python
"""Time one memory-layer call at decode sizes (gradients off) along the three ways it can run on the CPU.

At a decode step the layer reads the memory for 1 token per sequence, so the work is a few
microseconds and the fixed cost per call decides its time (docs/benchmarks.md, `## Decode`: the
profile there). Paths, each the whole layer call (query norm, read, output), with the same values:

    Functions   the read through its autograd Functions (_Lookup, _PoolProject), as the layer ran
                before it skipped them when no gradient is recorded;
    operators   the same read through its separate operators (_lookup_forward, _pool_project_forward),
                no Function;
    one op      the compiled kernels' midus_hml::read: those operators in one C++ call (what runs).

Per size, dtype and token count, the paths are called in turn, many times; every 4th call of each
comes after a 64 MB pass through memory (``cold``: between two calls of one layer at a decode step
the rest of the model streams its weights through the caches), the rest back to back (``hot``).
Medians, and ratios against ``Functions``.

    python tools/bench_read.py            # writes docs/benchmarks.md `## Memory layer at decode` (+ docs/results/bench_read.json)
    python tools/bench_read.py --quick    # fewer calls (seconds; never writes the docs)
    python tools/bench_read.py --from-json docs/results/bench_read.json   # redraw the section
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import BENCHMARKS, RESULTS, command_line, cpu_name, finish, load_avg, median, raw_numbers_line, save_json, versions, write_section  # noqa: E402
from bench_hml import SIZES  # noqa: E402

from midus_surgery import kernels  # noqa: E402
from midus_surgery.model import hml  # noqa: E402
from midus_surgery.model.hml import HeadwiseMemory, HMLConfig, prepare_kernels  # noqa: E402

DOCS = BENCHMARKS
SECTION = "## Memory layer at decode"
JSON = RESULTS / "bench_read.json"
PATHS = ("Functions", "operators", "one op")
TOKENS = (1, 16)
FLUSH_BYTES = 64 << 20


def _separate_operators(q, keys, table, proj, k, head_rows, backend):
    """_read_forward's pure-torch branch, on the same (compiled) kernels: the read as separate operators."""
    w, slots, _, _ = hml._lookup_forward(q, keys, k, backend)
    if proj is not None:
        return hml._pool_project_forward(w, slots, table, proj, backend)[0], w, slots
    return hml._pool_forward(w, hml._rows_in_table(slots, head_rows), table, backend)[0], w, slots


@contextlib.contextmanager
def path(name: str):
    """Run the layer along ``name`` (one of PATHS) inside the block."""
    saved = hml._builds_graph, hml._read_forward
    if name == "Functions":
        hml._builds_graph = lambda *tensors: True  # the Functions run (and record nothing under no_grad)
    elif name == "operators":
        hml._read_forward = _separate_operators
    try:
        yield
    finally:
        hml._builds_graph, hml._read_forward = saved


def layer_for(size: str, dtype: torch.dtype) -> HeadwiseMemory:
    s = SIZES[size]
    torch.manual_seed(0)
    cfg = HMLConfig(n_subkeys=s["n"], topk=s["k"], latent_dim=s["d_l"], init="random", kernels="fused")
    layer = HeadwiseMemory(s["heads"], s["head_dim"], s["hidden"], cfg).to(dtype).eval()
    prepare_kernels(layer, "cpu", dtype)
    return layer


def bench(sizes, dtypes, calls: int, log) -> list[dict]:
    flush = torch.zeros(FLUSH_BYTES, dtype=torch.uint8)
    rows = []
    for size in sizes:
        for dtype in dtypes:
            layer = layer_for(size, dtype)
            s = SIZES[size]
            for T in TOKENS:
                x = torch.randn(T, 1, s["heads"], s["head_dim"], dtype=dtype)  # [batch, 1 new token, H, d_h]
                times = {p: ([], []) for p in PATHS}  # hot, cold
                outs = {}
                with torch.no_grad():
                    for p in PATHS:
                        with path(p):
                            outs[p] = layer(x)  # warm-up, and the values each path gives
                    for i in range(calls):
                        cold = i % 4 == 0
                        for p in PATHS:
                            with path(p):
                                if cold:
                                    flush.add_(1)
                                t0 = time.perf_counter()
                                layer(x)
                                times[p][cold].append(time.perf_counter() - t0)
                same = all(torch.equal(outs[p], outs["Functions"]) for p in PATHS)
                base = {kind: median(times["Functions"][kind == "cold"]) for kind in ("hot", "cold")}
                for p in PATHS:
                    row = {"size": size, "dtype": str(dtype).replace("torch.", ""), "tokens": T, "path": p,
                           "same_values": same}
                    for kind in ("hot", "cold"):
                        us = median(times[p][kind == "cold"])
                        row[f"{kind}_us"] = round(us * 1e6, 1)
                        row[f"{kind}_vs_functions"] = round(us / base[kind], 3)
                    rows.append(row)
                log(f"  {size} {row['dtype']} T={T}: " + ", ".join(
                    f"{r['path']} {r['hot_us']:.0f}/{r['cold_us']:.0f} us" for r in rows[-len(PATHS):]) + " (hot/cold)")
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| size | dtype | tokens | path | hot us | vs Functions | cold us | vs Functions | same values |",
             "|---|---|---:|---|---:|---:|---:|---:|---|"]
    for r in rows:
        bold = (lambda v: f"**{v:.2f}x**") if r["path"] == "one op" else (lambda v: f"{v:.2f}x")
        lines.append(f"| {r['size']} | {r['dtype']} | {r['tokens']} | {r['path']} | {r['hot_us']:.0f} | {bold(r['hot_vs_functions'])} | "
                     f"{r['cold_us']:.0f} | {bold(r['cold_vs_functions'])} | {'yes' if r['same_values'] else 'NO'} |")
    return "\n".join(lines)


def write_docs(payload: dict, source: Path | None = None) -> None:
    v = payload["versions"]
    one = [r for r in payload["rows"] if r["path"] == "one op"]
    span = lambda key: f"{min(r[key] for r in one):.2f}-{max(r[key] for r in one):.2f}x"  # noqa: E731
    body = "\n".join([
        SECTION, "",
        "One memory-layer call with gradients off (as in `generate`), at decode token counts, along the three ways it can run "
        "on the compiled CPU kernels: through its autograd Functions (how it ran before it skipped them when no gradient is "
        "recorded), through the same operators without a Function, and as one C++ call (`midus_hml::read`, what runs now). "
        "`tools/bench_read.py` says how each is timed.",
        "",
        f"- Machine: {payload['machine']}, torch threads {payload['threads']}; load average (1/5/15 min) at start "
        f"{payload['load_avg_start']}, at end {payload['load_avg_end']}.",
        f"- Versions: Python {v['python']}, torch {v['torch']}, transformers {v['transformers']}.",
        f"- Command: `{payload['command']}`; {payload['calls']} calls per path and setting, every 4th after a "
        f"{FLUSH_BYTES >> 20} MB pass through memory (cold), medians.",
        *raw_numbers_line(source, DOCS, "bench_read.py"),
        f"- One op against the Functions: {span('hot_vs_functions')} of the time per call back to back, "
        f"{span('cold_vs_functions')} after the memory pass.",
        "",
        table(payload["rows"]), "",
    ])
    write_section(DOCS, SECTION, body)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="the recipe size only, 40 calls per path (never writes the docs)")
    ap.add_argument("--json", action="store_true", help="print one JSON object with the rows")
    ap.add_argument("--no-docs", action="store_true", help="write neither docs/benchmarks.md nor docs/results/bench_read.json")
    ap.add_argument("--calls", type=int, default=400, help="calls per path and setting (default 400)")
    ap.add_argument("--from-json", metavar="RESULTS_JSON", help="only redraw the section from an earlier run's JSON")
    args = ap.parse_args(argv)
    if args.from_json:
        source = Path(args.from_json)
        write_docs(json.loads(source.read_text()), source)
        print(f"rewrote {SECTION} of {DOCS} from {source}")
        return 0
    if kernels.cpu_ops() is None:  # warns why
        print("bench_read.py: the compiled CPU kernels could not be built; nothing to compare", file=sys.stderr)
        return 1
    log = (lambda *a: print(*a, file=sys.stderr, flush=True)) if args.json else (lambda *a: print(*a, flush=True))
    sizes = ["SmolLM2-135M recipe"] + ([] if args.quick else ["SmolLM2-135M"])
    calls = 40 if args.quick else args.calls
    start = load_avg()
    rows = bench(sizes, [torch.float32, torch.bfloat16], calls, log)
    payload = {"machine": f"{cpu_name()}, {os.cpu_count()} CPU cores", "threads": torch.get_num_threads(), "versions": versions(),
               "load_avg_start": start, "load_avg_end": load_avg(), "calls": calls,
               "command": command_line("tools/bench_read.py", argv), "rows": rows}
    finish(args, payload, lambda p: write_docs(p, save_json(JSON, p)), table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
