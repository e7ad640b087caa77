#!/usr/bin/env python
"""The HML benchmark (tools/bench_hml.py) at another commit and at this tree, side by side.

    python tools/bench_hml_ab.py REV [--rounds 3] [-- BENCH_HML_ARGS ...]
    python tools/bench_hml_ab.py dcbef3d -- --sizes "SmolLM2-135M,SmolLM2-135M recipe"

REV is checked out into a temporary git worktree (removed afterwards). Each round runs
``tools/bench_hml.py --json`` once per side, each in a fresh process, the sides alternating, so the
machine's drift over minutes falls on both; each side imports its own ``midus_surgery`` (PYTHONPATH)
and builds its own CPU kernels (their build name carries the source's hash). Printed per size and
dtype: the minimum HML and FFN times of each side over the rounds, every round's HML/FFN ratio, and
new/old of the minimum HML times. Writes nothing in the repository.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run_side(tree: Path, bench_args: list[str]) -> dict:
    """One fresh process of ``tree``'s tools/bench_hml.py --json, importing ``tree``'s package: its JSON."""
    env = dict(os.environ, PYTHONPATH=str(tree))
    out = subprocess.run([sys.executable, str(tree / "tools" / "bench_hml.py"), "--json", *bench_args], cwd=tree, env=env,
                         check=True, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True).stdout
    return json.loads(out)


def summary(runs: dict[str, list[dict]]) -> list[dict]:
    """Per (size, dtype): each side's minimum HML and FFN ms over its runs, its ratios in run order, and
    new/old of the minimum HML ms. ``runs``: {"old": [payload, ...], "new": [...]}, payloads as bench_hml --json prints."""
    rows: dict[tuple[str, str], dict] = {}
    for side in ("old", "new"):
        for payload in runs[side]:
            for r in payload["rows"]:
                row = rows.setdefault((r["size"], r["dtype"]), {"size": r["size"], "dtype": r["dtype"]})
                row.setdefault(f"{side}_hml_ms", []).append(r["hml_ms"])
                row.setdefault(f"{side}_ffn_ms", []).append(r["ffn_ms"])
                row.setdefault(f"{side}_ratios", []).append(r["ratio"])
    out = []
    for row in rows.values():
        for side in ("old", "new"):
            row[f"{side}_hml_ms"] = min(row.get(f"{side}_hml_ms", [float("nan")]))
            row[f"{side}_ffn_ms"] = min(row.get(f"{side}_ffn_ms", [float("nan")]))
        row["new_vs_old"] = round(row["new_hml_ms"] / row["old_hml_ms"], 3)
        out.append(row)
    return out


def table(rows: list[dict]) -> str:
    lines = ["| size | dtype | HML ms old -> new (min) | new/old | FFN ms old / new (min) | HML/FFN per round, old | new |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['size']} | {r['dtype']} | {r['old_hml_ms']} -> {r['new_hml_ms']} | {r['new_vs_old']}x | "
                     f"{r['old_ffn_ms']} / {r['new_ffn_ms']} | {r.get('old_ratios')} | {r.get('new_ratios')} |")
    return "\n".join(lines) + "\n"


def main(argv=None, run=run_side) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    bench_args = argv[argv.index("--") + 1:] if "--" in argv else []
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("rev", help="the commit to compare this tree with (any git revision)")
    ap.add_argument("--rounds", type=int, default=3, help="fresh processes per side, alternating (default 3)")
    args = ap.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    with tempfile.TemporaryDirectory(prefix="midus-ab-") as scratch:
        old_tree = Path(scratch) / "old"
        try:
            subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-q", str(old_tree), args.rev], check=True,
                           stderr=subprocess.PIPE, text=True)
        except subprocess.CalledProcessError as exc:
            print(f"bench_hml_ab: cannot check out {args.rev!r}: {exc.stderr.strip()}", file=sys.stderr)
            return 2
        try:
            runs: dict[str, list[dict]] = {"old": [], "new": []}
            for i in range(args.rounds):
                for side, tree in (("old", old_tree), ("new", REPO)):
                    print(f"round {i + 1}/{args.rounds}: {side}", file=sys.stderr, flush=True)
                    runs[side].append(run(tree, bench_args))
        finally:  # the worktree is ours: made above, in our own temporary folder
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(old_tree)], check=False,
                           stderr=subprocess.DEVNULL)
    print(f"old = {args.rev}, new = this tree; {args.rounds} fresh processes per side, alternating\n")
    print(table(summary(runs)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
