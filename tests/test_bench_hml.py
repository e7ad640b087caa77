"""tools/bench_hml.py on a tiny block: a row times both modules and agrees with the layer's own
parameter count, and the docs section says what bf16 meant on the CPU the rows came from."""

from __future__ import annotations

import torch
from tool_modules import load_tool

bh = load_tool("bench_hml")

TINY = dict(hidden=32, heads=2, head_dim=16, ffn=64, n=8, k=4, d_l=8)


def test_row_times_both_modules_and_the_pure_torch_path(monkeypatch):
    monkeypatch.setitem(bh.SIZES, "tiny", TINY)
    monkeypatch.setattr(bh, "BATCH", 1)
    monkeypatch.setattr(bh, "SEQ", 8)
    row = bh.run_row("tiny", torch.float32, 2, None, log=lambda *a: None, compare_torch=True)
    assert row["hml_ms"] > 0 and row["ffn_ms"] > 0 and row["hml_torch_ms"] > 0
    assert row["ratio"] > 0 and row["ratio_torch"] > 0
    assert row["ffn_params"] == 3 * TINY["hidden"] * TINY["ffn"]
    assert "ffn_tokens_timed" not in row and row["ffn_peak_mib"] is not None


def test_scaled_bf16_ffn_rows_are_flagged_in_the_table_and_the_notes(monkeypatch):
    monkeypatch.setitem(bh.SIZES, "tiny", TINY)
    monkeypatch.setattr(bh, "BATCH", 1)
    monkeypatch.setattr(bh, "SEQ", 8)
    scaled = bh.run_row("tiny", torch.bfloat16, 1, 4, log=lambda *a: None)
    assert scaled["ffn_tokens_timed"] == 4 and scaled["ffn_peak_mib"] is None
    assert "timed on 4 tok, scaled" in bh.table([scaled])
    assert "without native bf16" in bh.bf16_notes([scaled])
    full = dict(scaled)
    del full["ffn_tokens_timed"]
    notes = bh.bf16_notes([full])
    assert "bf16 units" in notes and "scaled" not in notes


def test_docs_section_names_the_command_and_keeps_other_sections(tmp_path, monkeypatch):
    monkeypatch.setitem(bh.SIZES, "tiny", TINY)
    monkeypatch.setattr(bh, "BATCH", 1)
    monkeypatch.setattr(bh, "SEQ", 8)
    row = bh.run_row("tiny", torch.float32, 1, None, log=lambda *a: None)
    docs = tmp_path / "benchmarks.md"
    docs.write_text("# Benchmarks\n\n## HML\n\nold\n\n## Other\n\nkept\n")
    bh.write_docs(str(docs), [row], "python tools/bench_hml.py --sizes tiny")
    text = docs.read_text()
    assert "old" not in text and "## Other\n\nkept" in text
    assert "`python tools/bench_hml.py --sizes tiny`" in text and "| tiny | float32 |" in text
    assert ("no native bf16" in text) != ("native bf16 (AVX512-BF16/AMX)" in text)
    assert "- Versions: Python " in text and "transformers " in text


def test_targets_judge_each_targeted_size_and_skip_the_others():
    rows = [dict(size="SmolLM2-135M", dtype="float32", ratio=0.34), dict(size="SmolLM2-135M", dtype="bfloat16", ratio=0.66),
            dict(size="Llama-3.2-1B", dtype="bfloat16", ratio=0.25), dict(size="SmolLM2-135M recipe", dtype="float32", ratio=9.0)]
    text = bh.targets(rows)
    assert "SmolLM2-135M float32: HML/FFN 0.34x (target <= 0.5: met)" in text
    assert "SmolLM2-135M bfloat16: HML/FFN 0.66x (target <= 0.5: NOT met)" in text
    assert "Llama-3.2-1B bfloat16: HML/FFN 0.25x (target <= 0.25: met)" in text
    assert "recipe" not in text
    assert bh.targets(rows[3:]) == ""
