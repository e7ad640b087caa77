"""Remove a directory midus-surgery wrote (an earlier run of a demo script), and nothing else.

    python tools/remove_own_dir.py work/runs/demo-smollm2-midus

The scripts under tools/ start some runs afresh; a bare ``rm -rf`` there would delete whatever a
user keeps at that path. This removes the directory only when it carries the tool's marker (or
lies in a tool's workspace); a missing path is fine; anything else is one line and exit 2.
"""

from __future__ import annotations

import sys
from pathlib import Path

from midus_surgery.io.output_dir import OutputError, remove_own_directory


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python tools/remove_own_dir.py DIR", file=sys.stderr)
        return 2
    try:
        remove_own_directory(Path(argv[0]))
    except OutputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
