"""Every relative link and image in README.md and docs/**/*.md points to a file that exists (docs moved
into docs/results/ once; a link left behind is a broken page), and every raw result under docs/results/
is listed in its index."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
# [text](target) and ![alt](target), the target up to a space (a title) or the closing parenthesis
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)


def relative_targets(page: Path) -> list[str]:
    text = FENCE.sub("", page.read_text())  # code blocks show commands, not links
    text = re.sub(r"`[^`\n]*`", "", text)  # nor does inline code
    out = []
    for target in LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("#"):
            continue  # a URL (http:, mailto:) or an anchor on the same page
        out.append(target.split("#", 1)[0])
    return out


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_and_image_resolves(page):
    broken = [t for t in relative_targets(page) if not (page.parent / t).resolve().is_file()]
    assert not broken, f"{page.relative_to(ROOT)}: no such file: {broken}"


def test_the_pages_do_link_somewhere():
    assert "docs/results/README.md" in {str((p.parent / t).resolve().relative_to(ROOT)) for p in PAGES for t in relative_targets(p)}
    assert len(relative_targets(ROOT / "README.md")) >= 5


def test_every_raw_result_is_indexed():
    results = ROOT / "docs" / "results"
    index = set(relative_targets(results / "README.md"))
    assert not sorted(p.name for p in results.iterdir() if p.name != "README.md" and p.name not in index)


def test_the_docs_top_level_holds_pages_and_the_schema_only():
    top = {p.name for p in (ROOT / "docs").iterdir() if p.is_file()}
    assert {p for p in top if not p.endswith(".md")} == {"recipe.schema.json"}

