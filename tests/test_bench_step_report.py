"""tools/bench_step.py (the driver) and tools/bench_step_report.py (its report) on synthetic rows: ratios match
rows of the same precision *and* batch, and --from-json rewrites the GPU section without touching the CPU one."""

from __future__ import annotations

import json

import pytest
from tool_modules import import_tool, load_tool

bs = load_tool("bench_step")
bsr = import_tool("bench_step_report")  # the report: the same module object the driver imported


def _row(model, freeze, precision, batch, step, trainable):
    return {"model": model, "freeze": freeze, "precision": precision, "batch": batch, "seq": 256, "step_min_s": step,
            "step_median_s": step, "n_steps": 1, "fwd_s": step / 3, "bwd_s": step / 2, "opt_s": step / 6,
            "tokens_per_s": batch * 256 / step, "peak_delta_bytes": 2**20, "peak_bytes": 2**21, "trainable": trainable,
            "total": 10**8, "threads": 1, "device_name": "Fake GPU", "load_avg_1min": [0.0]}


def _rows():
    rows = []
    for batch, scale in ((4, 1.0), (16, 3.0)):
        rows += [_row("DUS", "none", "bf16", batch, 0.10 * scale, 150 * 10**6),
                 _row("MIDUS", "none", "bf16", batch, 0.08 * scale if batch == 4 else 0.36, 140 * 10**6)]
    return rows


def _payload(device, rows, plans, **extra):
    return {"device": device, "machine": "Fake", "random_init": device == "cuda", "threads": 1,
            "versions": {"python": "3", "torch": "2", "transformers": "5"}, "load_avg_start": "0", "load_avg_end": "0",
            "command": "python tools/bench_step.py", "rows": rows, "targets": bsr.targets(rows), "plans": plans, **extra}


def redraw(tmp_path, payload, docs) -> str:
    """Run --from-json on ``payload`` as a saved run and return the docs it wrote."""
    (tmp_path / "r.json").write_text(json.dumps(payload))
    assert bs.main(["--from-json", str(tmp_path / "r.json")]) == 0
    return docs.read_text()


@pytest.fixture
def docs(tmp_path, monkeypatch):
    """A scratch benchmarks.md with a CPU section and another one, and the PNGs beside it."""
    docs = tmp_path / "benchmarks.md"
    docs.write_text("# Benchmarks\n\n## Training step\n\nthe CPU table\n\n## Other\n\nkept\n")
    monkeypatch.setattr(bsr, "DOCS", docs)
    monkeypatch.setattr(bsr, "PNG", {"cpu": tmp_path / "cpu.png", "cuda": tmp_path / "gpu.png"})
    return docs


def test_targets_pair_rows_of_the_same_batch():
    ts = {t["batch"]: t for t in bsr.targets(_rows())}
    assert abs(ts[4]["midus_over_dus"] - 0.8) < 1e-12 and ts[4]["step_le_0.85"]
    assert abs(ts[16]["midus_over_dus"] - 1.2) < 1e-12 and not ts[16]["step_le_0.85"]


def test_from_json_writes_the_gpu_section_only(tmp_path, docs):
    rows = _rows()
    payload = _payload("cuda", rows, [{"precision": "bf16", "batch": b, "seq": 256, "repeats": 1, "warmup": 2, "steps": 10} for b in (4, 16)])
    text = redraw(tmp_path, payload, docs)
    assert "the CPU table" in text and "## Other\n\nkept" in text
    gpu = text[text.index("## Training step on GPU"):]
    assert "bf16 16x256, freeze=none: MIDUS/DUS step 1.20x" in gpu and "bf16 4x256, freeze=none: MIDUS/DUS step 0.80x" in gpu
    assert "peak GPU memory delta MiB" in gpu and "![training step](gpu.png)" in gpu
    assert (tmp_path / "gpu.png").stat().st_size > 0 and not (tmp_path / "cpu.png").exists()


@pytest.mark.parametrize("field,backend,words", [
    ("hml_cuda_backend", "triton", "the Triton kernels"), ("hml_cuda_backend", "torch", "the pure-torch path"),
    ("hml_cuda_path", "triton", "the Triton kernels"), ("hml_cuda_path", "torch", "the pure-torch path"),  # its old name
    (None, None, "the pure-torch path")])  # None: JSON from before the field
def test_the_gpu_section_names_the_memory_layer_backend(tmp_path, docs, field, backend, words):
    extra = {} if field is None else {field: backend}
    payload = _payload("cuda", _rows(), [{"precision": "bf16", "batch": b, "seq": 256, "repeats": 1, "warmup": 2, "steps": 10}
                                         for b in (4, 16)], **extra)
    assert f"- MIDUS's memory layer runs on {words}" in redraw(tmp_path, payload, docs)


def test_the_driver_records_the_backend_the_environment_selects(monkeypatch):
    monkeypatch.setenv("MIDUS_HML_KERNELS", "torch")
    assert bs.hml_cuda_backend() == "torch"
    monkeypatch.setenv("MIDUS_HML_KERNELS", "triton")
    assert bs.hml_cuda_backend() == "triton"


def test_on_cuda_midus_runs_again_on_the_pure_torch_path_side_by_side():
    cuda = bs.configs_for("bf16", "cuda", ("base",))
    assert [m for m, _ in cuda] == ["DUS", "LLaMA-Pro", "MIDUS", "MIDUS (pure torch)", "MIDUS (fused Triton)", "FFN-free floor"]
    cpu_rows = [m for m, _ in bs.configs_for("fp32", "cpu")]
    assert "MIDUS (pure torch)" not in cpu_rows and "MIDUS (fused Triton)" not in cpu_rows  # no Triton path on CPU
    plan = {"precision": "bf16", "batch": 4, "seq": 256, "warmup": 1, "steps": 1}
    midus = bs.spec_for("MIDUS", "base", plan, "cuda", True, "every2")
    for row, kernels in (("MIDUS (pure torch)", "torch"), ("MIDUS (fused Triton)", "triton-fused")):
        spec = bs.spec_for(row, "base", plan, "cuda", True, "every2")
        assert spec["hml_kernels"] == kernels and spec["path"] == midus["path"]
    assert midus["hml_kernels"] is None


def test_the_pure_torch_row_forces_the_layer_backend_for_its_model_only(monkeypatch):
    import torch

    from midus_surgery.model.hml import HeadwiseMemory, HMLConfig

    def model():  # two memory layers, built as a loaded MIDUS model's are: under the child's environment
        cfg = HMLConfig(n_subkeys=4, topk=2, latent_dim=4)
        return torch.nn.Sequential(HeadwiseMemory(2, 8, 16, cfg), HeadwiseMemory(2, 8, 16, cfg))

    monkeypatch.setenv("MIDUS_HML_KERNELS", "triton")
    pure, default = model(), model()
    assert bs.set_hml_kernels(pure, "torch", "cuda") == "torch"
    assert bs.set_hml_kernels(default, None, "cuda") == "triton"  # the next configuration: the environment's
    assert [m.backend("cuda") for m in pure] == ["torch", "torch"]  # and the first one's layers stay put
    assert bs.set_hml_kernels(torch.nn.Linear(2, 2), None, "cpu") == "torch"  # DUS: no memory layer
    fused = model()
    assert bs.set_hml_kernels(fused, "triton-fused", "cuda") == "triton-fused"


def test_the_report_says_what_the_triton_kernels_buy(tmp_path, docs):
    rows = [_row("DUS", "base", "bf16", 16, 0.15, 53 * 10**6), _row("MIDUS", "base", "bf16", 16, 0.20, 26 * 10**6),
            _row("MIDUS (pure torch)", "base", "bf16", 16, 0.30, 26 * 10**6), _row("FFN-free floor", "base", "bf16", 16, 0.13, 13 * 10**6)]
    [t] = bsr.targets(rows)
    assert abs(t["midus_over_pure_torch"] - 2 / 3) < 1e-12 and abs(t["pure_torch_over_dus"] - 2.0) < 1e-12
    payload = _payload("cuda", rows, [{"precision": "bf16", "batch": 16, "seq": 256, "repeats": 1, "warmup": 2, "steps": 10}],
                       hml_cuda_backend="triton")
    text = redraw(tmp_path, payload, docs)
    assert "| MIDUS (pure torch) | base |" in text and "the same model with the layer forced onto the pure-torch path" in text
    assert "the memory layer on its pure-torch path 2.00x DUS (the Triton kernels take the MIDUS step to 0.67x of that)" in text


def test_paired_rounds_judge_the_target_on_the_median_of_per_round_ratios():
    # a machine whose speed drifts: round 2 runs everything 2x slower, so minima from different rounds mislead
    rows = [_row("DUS", "base", "fp32", 4, 1.0, 21 * 10**6), _row("MIDUS", "base", "fp32", 4, 1.0, 10 * 10**6),
            _row("FFN-free floor", "base", "fp32", 4, 1.0, 5 * 10**6)]
    paired = {"DUS": [1.0, 2.0, 1.0], "MIDUS": [0.8, 1.6, 0.9], "FFN-free floor": [0.7, 1.5, 0.8]}
    for row in rows:
        row["paired_steps_s"] = paired[row["model"]]
        row.update(bs.paired_ratio_stats(row["paired_steps_s"], paired["DUS"]))
    midus = rows[1]
    assert abs(midus["paired_vs_dus"] - 0.8) < 1e-12 and midus["paired_rounds"] == 3
    assert abs(midus["paired_vs_dus_q1"] - 0.8) < 1e-12 and abs(midus["paired_vs_dus_q3"] - 0.85) < 1e-12
    (t,) = bsr.targets(rows)
    assert t["judged_on"] == "paired" and t["step_le_0.85"] and abs(t["floor_over_dus_paired"] - 0.75) < 1e-12
    line = bsr.target_lines([t])[0]
    assert "0.800x (median of 3 paired rounds, IQR 0.800-0.850; target <= 0.85: met" in line
    assert "**0.800x** [0.800-0.850]" in bsr.table(rows)
    # the same rows without rounds fall back to the ratio of minima (1.0 here: not met)
    for row in rows:
        for key in ("paired_steps_s", "paired_vs_dus", "paired_vs_dus_q1", "paired_vs_dus_q3", "paired_rounds"):
            row.pop(key)
    (t,) = bsr.targets(rows)
    assert t["judged_on"] == "minimum" and not t["step_le_0.85"]


def test_every2_layout_reads_its_recipes_and_writes_its_own_section(tmp_path, docs):
    models = bs.models_for("every2")
    assert models["MIDUS"].name == "smollm2-135m-midus-every2" and models["FFN-free floor"] == models["DUS"]
    assert bs.models_for("every5")["DUS"].name == "smollm2-135m-dus"
    spec = bs.spec_for("MIDUS", "base", {"precision": "fp32", "batch": 4, "seq": 256, "warmup": 1, "steps": 1}, "cpu", False, "every2")
    assert spec["path"] == str(models["MIDUS"]) and spec["anatomy_from"] == str(models["MIDUS"])
    rows = [_row("DUS", "base", "fp32", 4, 1.0, 53 * 10**6), _row("MIDUS", "base", "fp32", 4, 0.8, 26 * 10**6)]
    for row in rows:
        row["device_name"] = None
    payload = _payload("cpu", rows, [{"precision": "fp32", "batch": 4, "seq": 256, "repeats": 1, "warmup": 1, "steps": 2}], layout="every2")
    text = redraw(tmp_path, payload, docs)
    assert "## Training step\n\nthe CPU table" in text and "## Other\n\nkept" in text
    section = text[text.index("## Training step, 15 inserted blocks (the paper's proportion)"):]
    assert "recipes/ablation/every2/smollm2-135m-midus-every2.yaml" in section and "15 of 45 blocks change" in section
    assert "fp32 4x256, freeze=base: MIDUS/DUS step 0.80x" in section and "![training step](cpu_every2.png)" in section
    assert (tmp_path / "cpu_every2.png").stat().st_size > 0 and not (tmp_path / "cpu.png").exists()


def test_llama1b_layout_names_its_base_and_writes_its_own_section(tmp_path, docs):
    models = bs.models_for("llama1b-every2")
    assert models["base"] == bsr.LLAMA1B_BASE and models["MIDUS"].name == "llama-1b-8l-midus-every2"
    assert models["FFN-free floor"] == models["DUS"] and models["LLaMA-Pro"].name == "llama-1b-8l-llama-pro-every2"
    rows = [_row("DUS", "base", "bf16", 4, 1.0, 243 * 10**6), _row("MIDUS", "base", "bf16", 4, 0.7, 96 * 10**6)]
    for row in rows:
        row["device_name"] = None
    payload = _payload("cpu", rows, [{"precision": "bf16", "batch": 4, "seq": 256, "repeats": 1, "warmup": 1, "steps": 1}],
                       layout="llama1b-every2")
    text = redraw(tmp_path, payload, docs)
    assert "## Training step\n\nthe CPU table" in text and "## Other\n\nkept" in text
    section = text[text.index("## Training step, Llama-3.2-1B block size"):]
    assert "of an 8-layer Llama-3.2-1B-shaped base and its DUS" in section and "4 of 12 blocks change" in section
    assert "random, of Llama-3.2-1B's shape with 8 layers" in section and "SmolLM2-135M-Instruct" not in section
    assert "recipes/ablation/llama-1b-width/llama-1b-8l-midus-every2.yaml" in section
    assert "bf16 4x256, freeze=base: MIDUS/DUS step 0.70x" in section
    assert (tmp_path / "cpu_llama1b.png").stat().st_size > 0


def test_compiled_runs_write_their_own_section_and_say_what_compiling_cost(tmp_path, docs):
    rows = _rows()
    for row, warm in zip(rows, (95.0, 140.0, 97.0, 143.0)):
        row["warmup_s"] = warm
    plans = [{"precision": "bf16", "batch": b, "seq": 256, "repeats": 1, "warmup": 3, "steps": 10, "compile": True} for b in (4, 16)]
    (tmp_path / "eager.json").write_text(json.dumps(_payload("cuda", _rows(), plans)))
    (tmp_path / "compiled.json").write_text(json.dumps(_payload("cuda", rows, plans, compile=True)))
    assert bs.main(["--from-json", str(tmp_path / "eager.json")]) == 0
    assert bs.main(["--from-json", str(tmp_path / "compiled.json")]) == 0
    text = docs.read_text()
    assert text.count("## Training step on GPU\n") == 1  # the eager section is still there, once
    section = text[text.index("## Training step on GPU, torch.compile\n"):]
    assert "took 95-143 s per configuration" in section and "![training step](gpu_compile.png)" in section
    assert (tmp_path / "gpu_compile.png").stat().st_size > 0 and (tmp_path / "gpu.png").stat().st_size > 0


def test_row_and_policy_filters(capsys):
    assert bs.configs_for("bf16", "cuda", ("base",), ["DUS", "MIDUS", "FFN-free floor"]) == [
        ("DUS", "base"), ("MIDUS", "base"), ("FFN-free floor", "base")]
    assert ("base", "none") in bs.configs_for("fp32", "cpu") and len(bs.configs_for("fp32", "cpu")) == 9
    spec = bs.spec_for("MIDUS", "base", {"precision": "bf16", "batch": 4, "seq": 256, "warmup": 3, "steps": 1, "compile": True},
                       "cuda", True, "every2")
    assert spec["compile"] is True
    for argv, message in ((["--models", "DUS,Mixtral"], "unknown row Mixtral"), (["--freezes", "all"], "unknown policy all"),
                          (["--no-bf16", "--only-bf16"], "exclude each other")):
        with pytest.raises(SystemExit) as exc:
            bs.main(argv)
        assert exc.value.code == 2 and message in capsys.readouterr().err


def test_adamw_implementation_reaches_the_optimiser_and_the_docs(tmp_path, docs):
    import torch

    plan = {"precision": "fp32", "batch": 4, "seq": 256, "warmup": 1, "steps": 1, "adamw": "for-loop"}
    assert bs.spec_for("DUS", "none", plan, "cpu", True, "every5")["adamw"] == "for-loop"
    assert bs.adamw_kwargs("auto", torch.device("cpu")) == {"fused": True}  # what the trainer runs
    assert bs.adamw_kwargs("torch", torch.device("cpu")) == {}
    plans = [{"precision": "bf16", "batch": b, "seq": 256, "repeats": 1, "warmup": 2, "steps": 10} for b in (4, 16)]
    (tmp_path / "old.json").write_text(json.dumps(_payload("cuda", _rows(), plans)))  # written before --adamw
    assert bs.main(["--from-json", str(tmp_path / "old.json")]) == 0
    assert "torch's default AdamW implementation: the for-loop on CPU, foreach on CUDA" in docs.read_text()
    (tmp_path / "new.json").write_text(json.dumps(_payload("cuda", _rows(), plans, adamw="auto")))
    assert bs.main(["--from-json", str(tmp_path / "new.json")]) == 0
    assert "AdamW `auto` (`optim.implementation`, the trainer default: fused on CPU and CUDA)" in docs.read_text()


def test_precision_switches_choose_the_plans_on_cpu_and_gpu():
    def plans(argv, gpu=False):
        return [(p["precision"], p["batch"], p["seq"]) for p in bs.make_plans(bs.build_parser().parse_args(argv), gpu)]

    assert plans([]) == [("fp32", 4, 256), ("bf16", 4, 256)]
    assert plans(["--only-bf16", "--bf16-batch", "1x128"]) == [("bf16", 1, 128)]  # ran fp32 too before
    assert plans(["--no-bf16"]) == [("fp32", 4, 256)]
    assert plans(["--quick"]) == [("fp32", 1, 128)]
    assert plans(["--only-bf16", "--batches", "16x1024"], gpu=True) == [("bf16", 16, 1024)]
    assert all(p["adamw"] == "auto" and p["freezes"] == ["none", "base"] for p in bs.make_plans(bs.build_parser().parse_args([]), False))


def test_cpu_sections_say_whether_the_cpu_has_native_bf16(tmp_path, docs):
    rows = [dict(r, precision="fp32", device_name="cpu") for r in _rows() if r["batch"] == 4]
    plans = [{"precision": "fp32", "batch": 4, "seq": 256, "repeats": 1, "warmup": 1, "steps": 2, "rounds": 0}]
    for machine, says in (("AMD EPYC, 2 CPU cores", "This CPU has no native bf16"),  # runs before the machine line said
                          ("AMD EPYC, 2 CPU cores, native bf16 (AVX512-BF16/AMX)", None)):
        (tmp_path / "cpu.json").write_text(json.dumps(_payload("cpu", rows, plans, machine=machine)))
        assert bs.main(["--from-json", str(tmp_path / "cpu.json")]) == 0
        section = docs.read_text().split("## Training step\n", 1)[1].split("\n## ", 1)[0]
        assert "No bf16 rows (`--no-bf16`)" in section
        assert (says in section) if says else ("no native bf16" not in section)


def test_the_report_says_where_midus_stands_on_the_fused_read(tmp_path, docs):
    rows = [_row("DUS", "base", "bf16", 16, 0.15, 53 * 10**6), _row("MIDUS", "base", "bf16", 16, 0.20, 26 * 10**6),
            _row("MIDUS (fused Triton)", "base", "bf16", 16, 0.12, 26 * 10**6)]
    [t] = bsr.targets(rows)
    assert abs(t["fused_over_dus"] - 0.8) < 1e-12 and abs(t["fused_over_midus"] - 0.6) < 1e-12
    payload = _payload("cuda", rows, [{"precision": "bf16", "batch": 16, "seq": 256, "repeats": 1, "warmup": 2, "steps": 10}],
                       hml_cuda_backend="triton")
    text = redraw(tmp_path, payload, docs)
    assert "| MIDUS (fused Triton) | base |" in text and "`MIDUS (fused Triton)` is the same model on the fused read" in text
    assert "on the fused read 0.80x DUS (0.60x the default Triton kernels' step)" in text


@pytest.mark.parametrize("report", ["bench_adamw_report", "bench_apply_report", "bench_cpt_report", "bench_decode_report",
                                    "bench_hml_report", "bench_step_report"])
def test_a_saved_run_that_cannot_be_read_is_one_line(report, tmp_path, capsys):
    """`--from-json` of a file that is not there (the docs named two that were never saved) was a
    FileNotFoundError traceback; a file that is not JSON, a JSONDecodeError one."""
    module = import_tool(report)
    assert module.main(["--from-json", str(tmp_path / "missing.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot read {tmp_path / 'missing.json'}: No such file or directory (a saved run of tools/") and err.count("\n") == 1
    (tmp_path / "torn.json").write_text('{"rows": [')
    assert module.main(["--from-json", str(tmp_path / "torn.json")]) == 2
    assert "Expecting value" in capsys.readouterr().err
