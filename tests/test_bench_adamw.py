"""tools/bench_adamw.py on a tiny model: the shapes it times are the ones the trainer's freeze policies
train, every implementation is timed, and the section it writes holds their ratios."""

from __future__ import annotations

from tool_modules import import_tool, load_tool
from train_fixtures.tiny import PLAN_LAYERS, make_model_dir

ba = load_tool("bench_adamw")
bar = import_tool("bench_adamw_report")


def test_trainable_shapes_follow_the_freeze_policy(tmp_path):
    model = make_model_dir(tmp_path / "m")
    every = ba.trainable_shapes(model, "none")
    inserted = ba.trainable_shapes(model, "base")
    n_inserted = sum(kind != "base" for _, _, kind in PLAN_LAYERS)
    per_layer = 9  # 7 linear weights and 2 norms per Llama decoder layer
    assert len(inserted) == n_inserted * per_layer and len(every) == 4 * per_layer + 2  # + embeddings (tied) and final norm
    assert sorted(inserted) == sorted(every[1:1 + per_layer] * n_inserted)  # the same shapes as a base layer


def test_every_implementation_runs_agrees_and_is_reported(tmp_path, monkeypatch):
    model = make_model_dir(tmp_path / "m")
    assert ba.agree(ba.trainable_shapes(model, "none")) < 1e-5
    monkeypatch.setattr(ba, "models_for", lambda layout: {"DUS": model, "MIDUS": model})
    rows = ba.bench(["DUS", "MIDUS"], ["none", "base"], "every2", repeats=2, steps=2, log=lambda *a: None)
    assert [(r["model"], r["freeze"], r["implementation"]) for r in rows] == [
        (m, f, i) for m in ("DUS", "MIDUS") for f in ("none", "base") for i in ("for-loop", "foreach", "fused")]
    assert all(r["n_steps"] == 4 and r["step_min_s"] > 0 for r in rows)
    assert all(r["vs_for_loop"] == 1.0 for r in rows if r["implementation"] == "for-loop")
    docs = tmp_path / "benchmarks.md"
    docs.write_text("# Benchmarks\n\n## Other\n\nkept\n")
    monkeypatch.setattr(bar, "DOCS", docs)
    bar.write_docs({"layout": "every2", "machine": "Fake", "threads": 1, "versions": {"python": "3", "torch": "2", "transformers": "5"},
                   "load_avg_start": "0", "load_avg_end": "0", "repeats": 2, "steps": 2, "command": "python tools/bench_adamw.py",
                   "max_abs_diff": 1e-8, "rows": rows}, tmp_path / "run.json")
    text = docs.read_text()
    assert "- Raw numbers: [run.json](run.json)" in text
    assert "## Other\n\nkept" in text and "## AdamW implementations" in text
    fused = next(r for r in rows if r["implementation"] == "fused")
    assert f"| fused | {fused['step_min_s']:.3f} |" in text and f"**{fused['vs_for_loop']:.2f}x**" in text
