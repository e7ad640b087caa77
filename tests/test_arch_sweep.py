"""tools/arch_sweep.py: the outcome it reports per architecture and recipe kind is the real one, its tiny
configs are tiny and keep the default's mix of layer kinds, a child that crashes or hangs is one row and
the sweep goes on, and the page it writes counts what the results say."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from tool_modules import load_tool

sweep_tool = load_tool("arch_sweep")


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_sweep_reports_passes_and_refusals(tmp_path):
    lines = []
    results = sweep_tool.sweep(["llama", "jamba", "no_such_type"], tmp_path, lines.append, isolate=False)
    assert list(results) == ["llama", "jamba", "no_such_type"]
    assert results["llama"] == {"dus": "ok", "llama-pro": "ok", "midus": "ok"}
    # Jamba picks MoE vs dense FFN by layer index: every interleaved layout moves some
    assert all(v.startswith("refused: ") for v in results["jamba"].values()), results["jamba"]
    assert "unlike its source" in results["jamba"]["dus"]
    assert all(".yaml:" not in v and len(v) < 300 for v in results["jamba"].values())  # no file:line prefix, one short line
    assert all(v.startswith("build: config: ValueError: Unrecognized model identifier: no_such_type") for v in results["no_such_type"].values())
    assert len(lines) == 3 and lines[0].startswith("llama")
    assert not any(p.name.startswith("llama") for p in tmp_path.iterdir())  # outputs, and a base that passed, removed


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_a_hybrid_refused_for_its_other_layers_is_tried_after_the_layers_that_can(tmp_path):
    """The every-N layout puts memory blocks after a Nemotron-H MoE layer, which cannot make one, and the refusal names the
    attention layers that can: the sweep then inserts after those, and reports that apart from a plain ok."""
    assert sweep_tool.layers_that_can("x; base layers that can: 0-1, 3-6") == [0, 1]
    assert sweep_tool.layers_that_can("x; base layers that can: 2, 6 / layout: y") == [2, 6]
    assert sweep_tool.layers_that_can("no layers named") == []
    results = sweep_tool.sweep(["nemotron_h"], tmp_path, lambda line: None, isolate=False)["nemotron_h"]
    assert results["dus"] == "ok" and results["llama-pro"] == "ok"
    assert results["midus"].startswith("ok on other layers: after base layers 2, 6 (after every ") and "it has no token mixer" in results["midus"]
    assert sweep_tool.outcome_class(results["midus"]) == "ok on other layers"
    assert sweep_tool.counts({"nemotron_h": results})["midus"]["ok on other layers"] == 1


@pytest.mark.usefixtures("one_thread")
def test_a_midus_output_of_a_base_that_derives_its_layer_types_saves_again(tmp_path):
    """RecurrentGemma (and Bamba) compute layer_types from a read-only property: the MIDUS config kept a copy, wrote
    it on save, and the reload passed it back, AttributeError: every save_pretrained of the loaded output, and so
    verify's round trip, PEFT merges and Trainer checkpoints, failed (trial140 F1) while the sweep's table said ok."""
    results = sweep_tool.sweep(["recurrent_gemma"], tmp_path, lambda line: None, isolate=False)["recurrent_gemma"]
    assert results["midus"].startswith("ok on other layers: after base layers 2, 5 "), results["midus"]


def _hybrid(kinds: set[str]) -> bool:
    """Softmax attention layers and others (linear attention, short convolutions, state-space layers)."""
    softmax = kinds & {"full_attention", "sliding_attention", "attention"}
    return bool(softmax) and bool(kinds - softmax)


@pytest.mark.parametrize("model_type", ["llama", "qwen3_next", "lfm2", "deepseek_v3", "gpt_oss", "gemma4_text"])
def test_tiny_config_is_tiny_and_keeps_the_layer_mix(model_type):
    from transformers import AutoConfig

    config = sweep_tool.tiny_config(model_type)
    default = AutoConfig.for_model(model_type, **sweep_tool.OVERRIDES.get(model_type, {}))
    assert config.hidden_size <= 64 and config.num_attention_heads <= 4 and config.vocab_size <= 512
    assert 8 <= config.num_hidden_layers <= 16
    assert sweep_tool._param_count(config) < 2_000_000
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        assert len(layer_types) == config.num_hidden_layers
        assert set(layer_types) == set(default.layer_types)  # every kind of layer the default has, no other
    if model_type in ("qwen3_next", "lfm2"):
        assert _hybrid(set(layer_types)), layer_types
    if model_type in ("gpt_oss", "gemma4_text"):
        assert {"sliding_attention", "full_attention"} <= set(layer_types)
    if model_type == "deepseek_v3":
        assert config.n_routed_experts <= 4 and config.num_experts_per_tok <= config.n_routed_experts
        assert 0 < config.first_k_dense_replace < config.num_hidden_layers  # dense layers first, then MoE, as in the default
        assert config.qk_nope_head_dim + config.qk_rope_head_dim == config.qk_head_dim and config.kv_lora_rank <= 16


def test_token_ids_fit_the_tiny_vocabulary():
    config = sweep_tool.tiny_config("gpt2")  # bos = eos = 50256 by default
    assert config.bos_token_id == config.eos_token_id < config.vocab_size <= 512


FAKE_CHILD = """
import json, os, signal, sys, time
tag = {tag!r}
print(tag + json.dumps({{"info": {{"level": 0, "params": 1000, "layers": 8}}}}), flush=True)
print(tag + json.dumps({{"dus": "ok"}}), flush=True)
mode = sys.argv[1]
if mode == "hang":
    time.sleep(60)
elif mode == "kill":
    print("Fatal Python error: Segmentation fault", file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGSEGV)
elif mode == "exit":
    raise SystemExit("out of sorts")
else:
    print(tag + json.dumps({{"llama-pro": "ok"}}), flush=True)
    print(tag + json.dumps({{"midus": "refused: layout: no"}}), flush=True)
"""


def test_a_child_that_crashes_or_hangs_is_one_row_and_the_sweep_goes_on(tmp_path, monkeypatch):
    script = tmp_path / "fake_child.py"
    script.write_text(FAKE_CHILD.format(tag=sweep_tool.RESULT_TAG))
    real_run_child = sweep_tool.run_child

    def fake_run_child(model_type, work, **kwargs):
        kwargs["timeout"] = 3
        return real_run_child(model_type, work, argv=[sys.executable, str(script), model_type.split("_")[1]], **kwargs)

    monkeypatch.setattr(sweep_tool, "run_child", fake_run_child)
    lines = []
    results = sweep_tool.sweep(["fake_hang", "fake_kill", "fake_exit", "fake_fine"], tmp_path / "work", lines.append, jobs=2)
    assert list(results) == ["fake_hang", "fake_kill", "fake_exit", "fake_fine"] and len(lines) == 4
    assert results["fake_hang"]["dus"] == "ok"  # what a child reported before it died is kept
    assert results["fake_hang"]["midus"] == "timeout: over 3 s"
    assert results["fake_kill"]["llama-pro"].startswith("crash: killed by SIGSEGV") and "Segmentation fault" in results["fake_kill"]["midus"]
    assert results["fake_exit"]["midus"] == "crash: exit code 1; out of sorts"
    assert results["fake_fine"] == {"dus": "ok", "llama-pro": "ok", "midus": "refused: layout: no"}
    table = sweep_tool.counts(results)
    assert table["midus"]["timeout"] == 1 and table["midus"]["crash"] == 2 and table["midus"]["refused"] == 1
    assert table["dus"]["ok"] == 4


def test_outcome_classes_and_refusal_lines():
    assert [sweep_tool.outcome_class(o) for o in ("ok", "refused: x", "apply failed: x", "verify failed: batch: x", "CRASH: KeyError: 'a'",
                                                   "crash: killed by SIGKILL", "timeout: over 180 s", "build: ImportError: timm")] == \
        ["ok", "refused", "apply failed", "verify failed", "CRASH", "crash", "timeout", "build"]
    message = "/tmp/w/llama-dus.yaml:3:5: layout: the base has 2 layers\n/tmp/w/llama-dus.yaml:7:1: memory.topk: too big\nthird\nfourth"
    assert sweep_tool.refusal(message) == "layout: the base has 2 layers / memory.topk: too big (+2 more)"
    assert len(sweep_tool.refusal("x" * 1000)) == 240


def test_markdown_counts_rows_and_groups(tmp_path):
    results = {
        "zeta": {"dus": "ok", "llama-pro": "refused: layout: no anatomy", "midus": "refused: layout: no anatomy"},
        "alpha": {"dus": "ok", "llama-pro": "ok", "midus": "verify failed: batch: rows | mixed ['a'](b)"},
        "mid": dict.fromkeys(sweep_tool.KINDS, "build: ImportError: needs timm"),
    }
    meta = {"command": "python tools/arch_sweep.py --all", "transformers": "5.24.0", "torch": "2.13.0", "python": "3.11",
            "date": "2026-01-01", "machine": "test", "wall_s": 60}
    info = {"alpha": {"params": 394304, "layers": 8, "level": 0, "base_fails": {"tensors": "missing [...]"}},
            "zeta": {"params": 2_000_000, "layers": 12, "level": 1}}
    text = sweep_tool.markdown(results, meta, info)
    assert "transformers 5.24.0, torch 2.13.0" in text and "`python tools/arch_sweep.py --all`" in text
    assert "| kind | ok | refused | verify failed | build |" in text
    assert "| dus | 2 | 0 | 0 | 1 |" in text and "| llama-pro | 1 | 1 | 0 | 1 |" in text and "| midus | 0 | 1 | 1 | 1 |" in text
    rows = [line for line in text.splitlines() if line.startswith(("| alpha", "| mid ", "| zeta"))]
    assert [r.split(" |")[0] for r in rows] == ["| alpha", "| mid", "| zeta"]  # sorted
    assert "| mid |  | build: ImportError: needs timm | | |" in rows
    assert rows[0].startswith("| alpha | 0.39M, 8 layers | ok | ok |") and rows[2].startswith("| zeta | 2.00M, 12 layers, level 1 | ok |")
    assert "rows \\| mixed ['a']\\(b)" in rows[0]  # a | in a message does not split the cell, nor does it make a link
    assert "| refused: layout: no anatomy | zeta (llama-pro, midus) |" in text
    assert "| build: ImportError: needs timm | mid |" in text
    assert "## Not built\n\n- **mid**: see its row." in text
    assert "| tensors | alpha |" in text  # checks the base itself fails, grouped
    assert text == sweep_tool.markdown(dict(reversed(results.items())), meta, info)  # deterministic
    doc = tmp_path / "architectures.md"
    sweep_tool.write_doc(doc, text)
    assert doc.read_text() == text and [p.name for p in tmp_path.iterdir()] == ["architectures.md"]


def test_a_rerun_of_some_types_merges_into_the_whole_runs_results_and_says_so():
    meta = {"command": "python tools/arch_sweep.py --all", "date": "2026-01-01", "wall_s": 60}
    earlier = {"meta": meta, "results": {"a": dict.fromkeys(sweep_tool.KINDS, "ok"),
                                         "b": {"dus": "ok", "llama-pro": "refused: layout: x", "midus": "refused: layout: x"}},
               "info": {"a": {"params": 1}, "b": {"params": 2}}}
    rerun = {"meta": {"command": "python tools/arch_sweep.py b --merge-into r.json", "date": "2026-01-02"},
             "results": {"b": dict.fromkeys(sweep_tool.KINDS, "ok")}, "info": {"b": {"params": 3}}}
    merged = sweep_tool.merge_rerun(earlier, rerun, ["b"])
    assert merged["results"]["b"] == dict.fromkeys(sweep_tool.KINDS, "ok") and merged["results"]["a"] == earlier["results"]["a"]
    assert merged["counts"]["midus"]["ok"] == 2 and merged["info"]["b"] == {"params": 3}
    text = sweep_tool.markdown(merged["results"], merged["meta"], merged["info"])
    assert "- rerun afterwards with later code (`python tools/arch_sweep.py b --merge-into r.json`, 2026-01-02): b" in text
    assert "- command: `python tools/arch_sweep.py --all`" in text  # the whole run's


def test_an_out_folder_the_tool_did_not_make_is_one_line_and_kept(tmp_path):
    """`arch_sweep.py --out FOLDER` over a folder of the user's printed the output rule's refusal as a
    traceback. Now one line, exit 2, the folder untouched (bench_cpt.py and bench_apply.py share the entry)."""
    import subprocess

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    tool = Path(__file__).resolve().parents[1] / "tools" / "arch_sweep.py"
    done = subprocess.run([sys.executable, str(tool), "--out", str(mine), "llama"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(f"error: output {mine} exists and was not written by midus-surgery") and "Traceback" not in done.stderr
    assert [p.name for p in mine.iterdir()] == ["notes.txt"] and (mine / "notes.txt").read_text() == "keep"


def test_the_counts_the_readme_and_apply_md_give_are_the_saved_sweeps():
    """README.md and docs/apply.md quote the last whole sweep's counts; docs/results/arch_sweep.json is that sweep."""
    import json
    import re

    root = Path(__file__).resolve().parents[1]
    counts = json.loads((root / "docs" / "results" / "arch_sweep.json").read_text())["counts"]
    ok = {kind: counts[kind]["ok"] for kind in ("dus", "llama-pro", "midus")}
    refused = {kind: counts[kind]["refused"] for kind in ("dus", "llama-pro", "midus")}
    readme = " ".join((root / "README.md").read_text().split())
    apply_md = " ".join((root / "docs" / "apply.md").read_text().split())
    said = f"{ok['dus']} apply and verify as DUS, {ok['llama-pro']} as LLaMA-Pro and {ok['midus']} as MIDUS"
    assert said in readme and said in apply_md
    assert f"({refused['dus']}, {refused['llama-pro']} and {refused['midus']})" in apply_md
    other = {kind: counts[kind].get("ok on other layers", 0) for kind in ("llama-pro", "midus")}
    more = f"{other['llama-pro']} more as LLaMA-Pro and {other['midus']} more as MIDUS"
    assert more in readme and more in apply_md
    types = len(json.loads((root / "docs" / "results" / "arch_sweep.json").read_text())["results"])
    assert re.search(rf"of (its )?{types} causal-LM model types", readme) and re.search(rf"of (its )?{types} causal-LM model types", apply_md)
