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



def test_the_readme_demo_perplexities_are_the_kept_demo_output():
    """The README's demo numbers (held-out perplexity, base -> trained, on two corpora) are those of the demo's step 8/8
    output kept in docs/results/demo_step8.txt, rounded as the README writes them."""
    kept = (ROOT / "docs" / "results" / "demo_step8.txt").read_text()
    ppl = {(model.split("/")[1], corpus): float(value)
           for model, corpus, value in re.findall(r"^(work/\S+)\s+(\S+)\s+ppl ([0-9.]+)", kept, flags=re.M)}
    assert len(ppl) == 4, kept
    readme = " ".join((ROOT / "README.md").read_text().split())
    for corpus in ("python3.11-doc", "git-doc"):
        base, trained = ppl[("smollm2-135m", corpus)], ppl[("runs", corpus)]
        assert f"from {base:.2f} to {trained:.2f}" in readme or f"drops from {base:.2f} to {trained:.2f}" in readme, (corpus, base, trained)
