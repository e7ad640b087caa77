"""Build the offline task suite for `midus-surgery eval --tasks` from a folder of documents.

    python tools/make_task_suite.py work/corpora/git-doc --out work/tasks [--items 500] [--seed 0]
    midus-surgery eval MODEL... --tasks midus_next_sentence midus_cloze --include-path work/tasks

Two lm-evaluation-harness tasks over held-out prose (midus_surgery/downstream/task_suite.py):
midus_next_sentence (which of four sentences follows this one?) and midus_cloze (the last word
of a sentence). The suite directory appears whole or not at all, and only replaces a suite.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from midus_surgery.cli import _int_at_least
from midus_surgery.errors import MidusError
from midus_surgery.io.output_dir import OutputError


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("text", nargs="+", help="files, directories or globs of documents (.txt .md .rst .jsonl)")
    ap.add_argument("--out", type=Path, required=True, help="the suite directory to write")
    ap.add_argument("--items", type=_int_at_least(1), default=500, help="items per task (default 500)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    from midus_surgery.downstream.task_suite import build_task_suite

    try:
        counts = build_task_suite(args.text, args.out, items=args.items, seed=args.seed)
    except (MidusError, OutputError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # the suite directory appears whole or not at all: nothing to clean up
        print("interrupted", file=sys.stderr)
        return 130
    print(f"wrote {args.out}: " + ", ".join(f"{name} ({n} items)" for name, n in counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
