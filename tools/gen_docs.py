#!/usr/bin/env python
"""Regenerate docs/recipes.md and docs/recipe.schema.json from the recipe schema.

Usage: python tools/gen_docs.py [--check]   (--check: exit 1 if the files are stale)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from midus_surgery.recipe.reference import EXAMPLE, render_reference
from midus_surgery.recipe.schema import recipe_json_schema_text

ROOT = Path(__file__).resolve().parent.parent


def expected() -> dict[Path, str]:
    example = (ROOT / EXAMPLE).read_text()
    return {
        ROOT / "docs" / "recipes.md": render_reference(example),
        ROOT / "docs" / "recipe.schema.json": recipe_json_schema_text(),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check that the files are current")
    args = parser.parse_args()
    stale = [path for path, text in expected().items() if not path.is_file() or path.read_text() != text]
    if args.check:
        for path in stale:
            print(f"stale: {path.relative_to(ROOT)} (run python tools/gen_docs.py)")
        return 1 if stale else 0
    for path, text in expected().items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
