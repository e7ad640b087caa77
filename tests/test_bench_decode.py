"""tools/bench_decode.py (the driver) and tools/bench_decode_report.py (its report) on tiny random models: a quick
run times every model at every batch, each generate makes exactly batch x N new tokens (also where greedy decoding
would pick the end-of-text token first), the ratios to DUS are the medians of the rounds' own ratios, the target is
judged on them, --profile finds the inserted blocks and the memory layer's operators, --from-json rewrites one
section and keeps the others, and bad input is one line and exit 2. No assertion depends on how fast this machine is."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny_configs import tiny_config
from tool_modules import import_tool, load_tool
from transformers import AutoModelForCausalLM

import midus_surgery  # noqa: F401 - registers the MIDUS classes
from midus_surgery.compiler.planner import plan_recipe
from midus_surgery.emit.emitter import emit

bd = load_tool("bench_decode")
bdr = import_tool("bench_decode_report")  # the report: the same module object the driver imported
bs = import_tool("bench_step")

KINDS = {"DUS": "transformer", "LLaMA-Pro": "identity", "MIDUS": "memory"}
MEMORY = "memory:\n  n_subkeys: 8\n  topk: 4\n  latent_dim: 8\n"
BATCHES, NEW, ROUNDS = (1, 3), 5, 2


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """A tiny Llama base and its DUS, LLaMA-Pro and MIDUS outputs (a block after every 2nd layer: 4 -> 6)."""
    root = tmp_path_factory.mktemp("decode")
    torch.manual_seed(0)
    base = root / "base"
    AutoModelForCausalLM.from_config(tiny_config("llama")).save_pretrained(base)
    out = {"base": base}
    for name, kind in KINDS.items():
        recipe = root / f"{kind}.yaml"
        recipe.write_text(f"base:\n  path: {base}\nlayout:\n  interleave:\n    after_every: 2\n    kind: {kind}\n"
                          f"{MEMORY if kind == 'memory' else ''}output:\n  dir: out/{kind}\n  dtype: float32\n")
        out[name] = emit(plan_recipe(recipe), progress=False).out_dir
    return out


def model_args(models) -> list[str]:
    return [a for name, path in models.items() for a in ("--model", f"{name}={path}")]


@pytest.fixture(scope="module")
def run(models, tmp_path_factory):
    """One quick run of the driver with --profile, as its --json output (and what it would have written)."""
    mp = pytest.MonkeyPatch()
    scratch = tmp_path_factory.mktemp("docs")
    mp.setattr(bdr, "DOCS", scratch / "benchmarks.md")
    mp.setattr(bd, "json_path", lambda payload: scratch / "results" / "bench_decode.json")
    import io
    from contextlib import redirect_stdout

    buf = io.StringIO()
    with redirect_stdout(buf):
        rc = bd.main(["--quick", "--json", "--profile", "--batches", ",".join(map(str, BATCHES)), "--new-tokens", str(NEW),
                      *model_args(models)])
    mp.undo()
    assert rc == 0
    return json.loads(buf.getvalue()), scratch


def test_every_row_generated_exactly_batch_times_n_new_tokens(run):
    payload, scratch = run
    rows = payload["rows"]
    assert [(r["batch"], r["model"]) for r in rows] == [(b, m) for b in BATCHES for m in ("base", *KINDS)]
    for r in rows:
        assert r["new_tokens_per_round"] == [r["batch"] * NEW] * ROUNDS and r["new_tokens"] == r["batch"] * NEW
        assert r["prompt_tokens"] == 16 and r["dtype"] == "fp32" and len(r["tokens_per_s_per_round"]) == ROUNDS
    assert (payload["prompt_tokens"], payload["new_tokens"], payload["rounds"]) == (16, NEW, ROUNDS)
    # --quick and --model runs write nothing
    assert not (scratch / "benchmarks.md").exists() and not (scratch / "results").exists()


def test_rows_and_ratios_come_from_the_rounds(run):
    payload, _ = run
    rows = payload["rows"]
    for r in rows:
        assert r["decode_tokens_per_s"] == bd.median(r["tokens_per_s_per_round"])
        # ms per decode step and tokens/s are the same rounds' decode times: batch x (N - 1) / decode s
        ms = [r["batch"] * 1e3 / tps for tps in r["tokens_per_s_per_round"]]
        assert r["decode_ms_per_step"] == pytest.approx(bd.median(ms))
        dus = next(d for d in rows if d["model"] == "DUS" and d["batch"] == r["batch"])
        # two speeds, each paired by round: whole-decode tokens/s, and the inverse of the median decode step
        ratios = sorted(a / b for a, b in zip(r["tokens_per_s_per_round"], dus["tokens_per_s_per_round"]))
        assert r["tps_vs_dus"] == pytest.approx(bd.median(ratios)) and r["paired_rounds"] == ROUNDS
        steps = sorted(b / a for a, b in zip(r["step_median_s_per_round"], dus["step_median_s_per_round"]))
        assert r["step_vs_dus"] == pytest.approx(bd.median(steps)) and len(steps) == ROUNDS
        assert r["step_median_ms"] == pytest.approx(bd.median(r["step_median_s_per_round"]) * 1e3)
        for key in ("tps", "step"):
            assert r[f"{key}_vs_dus_q1"] <= r[f"{key}_vs_dus"] <= r[f"{key}_vs_dus_q3"]
        assert r["prefill_vs_dus"] == pytest.approx(bd.median([a / b for a, b in zip(r["prefill_s_per_round"], dus["prefill_s_per_round"])]))
    assert all(r["tps_vs_dus"] == r["step_vs_dus"] == 1.0 for r in rows if r["model"] == "DUS")
    ts = {t["batch"]: t for t in payload["targets"]}
    assert sorted(ts) == list(BATCHES)
    for b, t in ts.items():  # judged on the median-step ratio, the tokens/s one beside it
        midus = next(r for r in rows if r["model"] == "MIDUS" and r["batch"] == b)
        assert t["midus_over_dus"] == midus["step_vs_dus"] and t["met"] == (midus["step_vs_dus"] >= 1.0)
        assert t["midus_over_dus_tps"] == midus["tps_vs_dus"]
        assert t["llama_pro_over_dus"] == next(r for r in rows if r["model"] == "LLaMA-Pro" and r["batch"] == b)["step_vs_dus"]
    lines = bdr.target_lines(payload["targets"])
    assert len(lines) == 2 and all(("tokens/s >= 1.0: met" in x) != ("tokens/s >= 1.0: NOT met" in x) for x in lines)


def test_the_memory_layer_backend_is_resolved_and_named(run):
    payload, _ = run
    midus = {r["hml_backend"] for r in payload["rows"] if r["model"] == "MIDUS"}
    assert midus == {payload["hml_backend"]} and payload["hml_backend"] in ("cpu", "torch")  # "torch" without a compiler
    assert {r["hml_backend"] for r in payload["rows"] if r["model"] != "MIDUS"} == {"torch"}  # no memory layer
    assert payload["hml_backend_words"] in ("compiled CPU kernels", "pure-torch path")


def test_the_profile_times_the_inserted_blocks_and_the_memory_layers_operators(run):
    payload, _ = run
    assert [(p["dtype"], p["batch"]) for p in payload["profile"]] == [("fp32", b) for b in BATCHES]
    for p in payload["profile"]:
        for key in ("dus_block_us", "dus_ffn_us", "dus_o_proj_us", "midus_block_us", "midus_readout_us", "hml_alone_us"):
            assert p[key] > 0, key
        assert p["dus_ffn_us"] < p["dus_block_us"] and p["midus_readout_us"] < p["midus_block_us"]
        # every inserted block (2 in the tiny outputs) once per decode step
        assert p["midus_profiled_calls"] == p["dus_profiled_calls"] == 2 * (NEW - 1)
        names = {o["name"] for o in p["midus_ops"]}
        assert names & {"midus_hml::read", "aten::topk"}  # the read in one op (compiled kernels), or its pure-torch selection
        assert not names & {"_Lookup", "_PoolProject", "_Pool"}  # no autograd Function at decode (gradients off)
        assert "aten::mm" in {o["name"] for o in p["dus_ops"]} or "aten::addmm" in {o["name"] for o in p["dus_ops"]}
        assert p["hml_queries_shape"] == [p["batch"], 1, 4, 16]  # [batch, 1 token, heads, head width]


def test_generate_makes_n_tokens_where_greedy_would_stop_first(models):
    model = bs.load_model(models["DUS"], False).eval()
    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(0))
    first = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=1)[0, -1]
    model.generation_config.eos_token_id = int(first)  # the token greedy decoding picks first ends the text
    res = bd.generate(model, ids, 4, lambda: None)
    assert res["new_tokens"] == 2 * 4 and res["decode_s"] >= 0 and res["prefill_s"] > 0


@pytest.fixture
def docs(tmp_path, monkeypatch):
    page = tmp_path / "benchmarks.md"
    page.write_text("# Benchmarks\n\n## Decode\n\nold table\n\n## Other\n\nkept\n")
    monkeypatch.setattr(bdr, "DOCS", page)
    return page


def test_from_json_rewrites_the_decode_section_and_keeps_the_others(run, docs, tmp_path):
    payload = dict(run[0], command="python tools/bench_decode.py")
    payload.pop("custom_models")  # as a run of the bundled layout
    source = tmp_path / "run.json"
    source.write_text(json.dumps(payload))
    assert bd.main(["--from-json", str(source)]) == 0
    text = docs.read_text()
    assert "old table" not in text and text.endswith("## Other\n\nkept\n") and text.count("## Decode\n") == 1
    section = text.split("## Decode\n", 1)[1].split("\n## ", 1)[0]
    assert bdr.table(payload["rows"]) in section
    for line in bdr.target_lines(payload["targets"]):
        assert line in section
    assert "CUDA rows: `python tools/bench_decode.py --device cuda" in section and "`python tools/bench_decode.py`" in section
    assert f"memory layer runs on the {payload['hml_backend_words']}" in section
    top = payload["profile"][0]["midus_ops"][0]["name"]
    assert "MIDUS's memory layer" in section and f"| `{top}` |" in section  # the profile's tables
    # a GPU run's JSON goes into its own section, the CPU one stays
    gpu = dict(payload, device="cuda", machine="Fake GPU", random_init=True)
    source.write_text(json.dumps(gpu))
    assert bdr.main(["--from-json", str(source)]) == 0
    text = docs.read_text()
    assert section in text and "## Decode on GPU\n" in text
    assert "CUDA rows:" not in text.split("## Decode on GPU\n", 1)[1]


def test_compile_decodes_on_a_static_cache_compiled_before_the_timed_rounds(models, tmp_path, monkeypatch):
    """--compile: generate's static cache and compiled decode step (inductor on this CPU), the memory layer traced
    whole (fullgraph: a graph break would fail the run), every graph compiled in the warm-up, and its own section
    and JSON beside the eager run's."""
    import io
    from contextlib import redirect_stdout

    import torch._dynamo

    torch._dynamo.reset()
    made = []
    real = bd.generate
    monkeypatch.setattr(bd, "generate", lambda *a, **k: made.append(a[4] if len(a) > 4 else k.get("compiled")) or real(*a, **k))
    buf = io.StringIO()
    with redirect_stdout(buf):
        rc = bd.main(["--quick", "--json", "--compile", "--profile", "--batches", "2", "--new-tokens", "4",
                      "--model", f"DUS={models['DUS']}", "--model", f"MIDUS={models['MIDUS']}"])
    assert rc == 0
    payload = json.loads(buf.getvalue())
    assert payload["compiled"] is True and {r["model"]: r["hml_backend"] for r in payload["rows"]}["MIDUS"] != "torch"
    assert all(r["new_tokens_per_round"] == [2 * 4] * 2 for r in payload["rows"])
    assert [c["batch"] for c in payload["compiles"]] == [2] and payload["compiles"][0]["graphs_so_far"] >= 1
    assert made and all(c is not None and c.fullgraph and c.mode == "default" for c in made)  # every generate compiled
    assert bdr.section_title(payload) == "## Decode, compiled (static cache, torch.compile)"
    assert bdr.json_path(payload).name == "bench_decode_cpu_compiled.json"
    text = bdr.section_text(payload)
    assert 'cache_implementation="static"' in text and "the first compiles;" in text and "CUDA graphs" not in text
    gpu = bdr.section_text(dict(payload, device="cuda", machine="Fake GPU"))
    assert 'mode="reduce-overhead"' in gpu and "the second records the CUDA graphs" in gpu
    # what inductor did about CUDA graphs, per model: on a CPU it makes none, so nothing skipped or cut
    graphs = payload["compiles"][0]["cudagraphs"]
    assert set(graphs) == {"DUS", "MIDUS"}
    assert all(g["cudagraph_skips"] == 0 and g["cudagraph_partitions"] == 0 for g in graphs.values())
    assert "CUDA graphs, as inductor reported them" in gpu and "CUDA graphs, as inductor" not in text
    # --compile --profile: one more compiled generate per model, what ran and for how long, no new graph
    (prof,) = payload["profile"]
    assert prof["compiled"] is True and set(prof["models"]) == {"DUS", "MIDUS"}
    for k in prof["models"].values():
        assert k["launched"] > 0 and 0 < k["device_ms"] and k["decode_ms"] < k["wall_ms"]
        assert sum(c for c, _ in k["all"].values()) == k["launched"] and k["top"][0]["us"] >= k["top"][-1]["us"]
    midus, dus = (set(prof["models"][m]["all"]) for m in ("MIDUS", "DUS"))
    assert any("midus_hml" in name for name in midus - dus)  # the memory read, an operator DUS never runs
    assert "What MIDUS runs more of than DUS, " in text and "| MIDUS | " in text


@pytest.mark.parametrize("argv,words", [
    (["--batches", "0"], "batch: must be at least 1"),
    (["--batches", "1,x"], "batch: not a whole number"),
    (["--new-tokens", "1"], "--new-tokens: must be at least 2"),
    (["--dtypes", "fp16"], "--dtypes"),
    (["--model", "DUS"], "--model wants NAME=DIR"),
    (["--model", "DUS=/nonexistent/dus"], "not a model directory"),
    (["--from-json", "/nonexistent/run.json"], "cannot read a run's JSON"),
])
def test_bad_input_is_one_line_and_exit_2(argv, words, capsys):
    assert bd.main(["--quick", "--no-docs", *argv]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1 and words in err and "Traceback" not in err


def test_a_missing_base_or_unloadable_model_is_one_line_and_exit_2(models, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(bd.LAYOUTS["every5"], "base", tmp_path / "no-smollm2")
    assert bd.main(["--quick", "--no-docs"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing base model" in err and "fetch_smollm2.py" in err
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((models["DUS"] / "config.json").read_text())  # no weights
    assert bd.main(["--quick", "--no-docs", "--model", f"DUS={broken}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds no weights (model.safetensors, its index, or pytorch_model.bin)" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="the machine has a GPU")
def test_cuda_without_a_gpu_is_one_line_and_exit_2(models, capsys):
    assert bd.main(["--quick", "--no-docs", "--device", "cuda", "--model", f"DUS={models['DUS']}"]) == 2
    assert capsys.readouterr().err.strip() == "bench_decode.py: error: --device cuda, but torch sees no CUDA device"


def test_a_row_can_tell_the_memory_layers_which_kernels_to_run(models):
    """The fused-read row of a GPU run is the MIDUS model told `kernels: triton-fused`; here, the same override
    told `torch` leaves the compiled CPU kernels the model would pick by itself."""
    _, own = bd.load(models["MIDUS"], "fp32", torch.device("cpu"), False)
    model, told = bd.load(models["MIDUS"], "fp32", torch.device("cpu"), False, "torch")
    assert own == "cpu" and told == "torch" and {m.kernels for m in hml_layers(model)} == {"torch"}


def hml_layers(model):
    from midus_surgery.model.hml import HeadwiseMemory

    return [m for m in model.modules() if isinstance(m, HeadwiseMemory)]


def test_a_gpu_run_times_midus_on_the_fused_read_beside_the_default(monkeypatch, tmp_path):
    """CUDA runs, eager and compiled, add the fused-read row (decode there is bound by per-operator overhead, in a
    CUDA graph too); CPU runs do not. Its ratio to DUS is reported beside the target, which stays judged on the default MIDUS row."""
    monkeypatch.setattr(bd, "ensure_outputs", lambda *a: None)
    monkeypatch.setitem(bd.LAYOUTS["every5"], "base", tmp_path)
    (tmp_path / "config.json").write_text("{}")
    for device, compile_, fused in (("cuda", False, True), ("cuda", True, True), ("cpu", False, False), ("cpu", True, False)):
        args = bd.build_parser().parse_args(["--device", device] + (["--compile"] if compile_ else []))
        models, _ = bd.resolve_models(args, lambda *a: None)
        assert (bdr.FUSED_ROW in models) == fused and list(models)[:4] == list(bdr.ROWS)
        if fused:
            assert models[bdr.FUSED_ROW] == models["MIDUS"]
    rows = [{"model": m, "dtype": "bf16", "batch": 1, "step_vs_dus": v, "step_vs_dus_q1": v, "step_vs_dus_q3": v,
             "tps_vs_dus": v, "tps_vs_dus_q1": v, "tps_vs_dus_q3": v, "paired_rounds": 3}
            for m, v in (("DUS", 1.0), ("MIDUS", 0.97), (bdr.FUSED_ROW, 1.04))]
    (t,) = bdr.targets(rows)
    assert not t["met"] and t["fused_over_dus"] == 1.04 and t["fused_met"]
    assert bdr.target_lines([t])[0].endswith("NOT met; on the fused read (`kernels: triton-fused`) 1.040x (met)")
