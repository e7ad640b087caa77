"""tools/arch_sweep.py: the outcome it reports per architecture and recipe kind is the real one."""

from __future__ import annotations

from tool_modules import load_tool

sweep_tool = load_tool("arch_sweep")


def test_sweep_reports_passes_and_refusals(tmp_path):
    lines = []
    results = sweep_tool.sweep(["llama", "jamba", "no_such_type"], tmp_path, lines.append)
    assert results["llama"] == {"dus": "ok", "llama-pro": "ok", "midus": "ok"}
    # Jamba picks MoE vs dense FFN by layer index: every interleaved layout moves some
    assert all(v.startswith("validate refused: ") and "unlike its source" in v for v in results["jamba"].values()), results["jamba"]
    assert results["no_such_type"]["build"].startswith(("ValueError", "KeyError"))
    assert len(lines) == 3 and lines[0].startswith("llama")
    assert not any(p.name.startswith("llama-") and p.is_dir() for p in tmp_path.iterdir())  # outputs removed once verified
