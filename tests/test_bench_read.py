"""tools/bench_read.py on a tiny layer: each path runs what it names, all give the same values, and the
section it writes holds the rows and their ratios."""

from __future__ import annotations

import json

import pytest
import torch
from tool_modules import load_tool

from midus_surgery import kernels
from midus_surgery.model import hml

br = load_tool("bench_read")


@pytest.fixture
def tiny(monkeypatch):
    if kernels.cpu_ops() is None:
        pytest.fail("the compiled CPU kernels must build here (tests/test_hml_kernels.py says why not)")
    monkeypatch.setitem(br.SIZES, "tiny", dict(hidden=16, heads=2, head_dim=8, ffn=32, n=8, k=4, d_l=4))
    return "tiny"


def test_each_path_runs_what_it_names(tiny, monkeypatch):
    layer = br.layer_for(tiny, torch.float32)
    seen = []
    monkeypatch.setattr(hml._Lookup, "apply", lambda *a: seen.append("Functions") or hml._lookup_forward(*a)[:2])
    saved = hml._builds_graph, hml._read_forward
    x = torch.randn(3, 1, 2, 8)
    with torch.no_grad():
        for p in br.PATHS:
            with br.path(p):
                with torch.profiler.profile() as prof:
                    layer(x)
            ops = {e.name for e in prof.events()}
            seen.append((p, "midus_hml::read" in ops, "midus_hml::score_topk2" in ops))
    # one op: the selection runs inside it, not as an operator of its own
    assert seen == ["Functions", ("Functions", False, True), ("operators", False, True), ("one op", True, False)]
    assert (hml._builds_graph, hml._read_forward) == saved  # path() puts everything back


def test_rows_and_section(tiny, tmp_path, monkeypatch):
    rows = br.bench([tiny], [torch.float32, torch.bfloat16], calls=8, log=lambda *a: None)
    assert [(r["dtype"], r["tokens"], r["path"]) for r in rows] == [
        (d, t, p) for d in ("float32", "bfloat16") for t in br.TOKENS for p in br.PATHS]
    assert all(r["same_values"] and r["hot_us"] > 0 and r["cold_us"] > 0 for r in rows)
    assert all(r["hot_vs_functions"] == r["cold_vs_functions"] == 1.0 for r in rows if r["path"] == "Functions")
    docs = tmp_path / "benchmarks.md"
    docs.write_text("# Benchmarks\n\n## Other\n\nkept\n")
    monkeypatch.setattr(br, "DOCS", docs)
    payload = {"machine": "Fake", "threads": 1, "versions": {"python": "3", "torch": "2", "transformers": "5"},
               "load_avg_start": "0", "load_avg_end": "0", "calls": 8, "command": "python tools/bench_read.py", "rows": rows}
    source = tmp_path / "run.json"
    source.write_text(json.dumps(payload))
    assert br.main(["--from-json", str(source)]) == 0
    text = docs.read_text()
    assert "## Other\n\nkept" in text and br.table(rows) in text and "[run.json](run.json)" in text
    one = [r for r in rows if r["path"] == "one op"]
    assert f"{min(r['hot_vs_functions'] for r in one):.2f}-{max(r['hot_vs_functions'] for r in one):.2f}x" in text
