"""tools/gpu_session.py, the prepared GPU session: what travels to the GPU machine (every file of the model
directories but their weights, at the same paths), how it is put in place there (nothing existing
overwritten), that every step runs under its limit and a failed or cut step does not stop the next, and the
docs section written from the fused kernels' timings (targets judged on the returned rows). The GPU steps
themselves cannot run here: tests/test_gpu_check_dry_run.py runs the check script on the CPU."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from tool_modules import load_tool

gs = load_tool("gpu_session")


def _model(root, name, extra=()):
    d = root / "work" / "out" / name
    d.mkdir(parents=True)
    (d / "config.json").write_text("{}")
    (d / "model.safetensors").write_bytes(b"\0" * 1000)
    for f in extra:
        (d / f).write_text(f)
    return d


def test_the_carry_holds_everything_but_the_weights_at_the_same_paths(tmp_path):
    a = _model(tmp_path, "dus", ["tokenizer.json"])
    b = _model(tmp_path, "midus", ["midus_plan.json", "hml.py"])
    dest = tmp_path / "work" / "gpu-carry"
    total = gs.carry([a, b], dest, root=tmp_path)
    copied = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file() and p.name != gs.MARKER)
    assert copied == ["work/out/dus/config.json", "work/out/dus/tokenizer.json", "work/out/midus/config.json",
                      "work/out/midus/hml.py", "work/out/midus/midus_plan.json"]
    assert total == sum((dest / c).stat().st_size for c in copied)
    gs.carry([a], dest, root=tmp_path)  # a second prepare replaces its own copy
    assert not (dest / "work/out/midus").exists()


def test_the_carry_refuses_a_missing_model_and_a_folder_it_did_not_write(tmp_path):
    with pytest.raises(SystemExit, match="missing .*nowhere.*fetch_smollm2"):
        gs.carry([tmp_path / "nowhere"], tmp_path / "carry", root=tmp_path)
    a = _model(tmp_path, "dus")
    foreign = tmp_path / "carry"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match="not written by"):
        gs.carry([a], foreign, root=tmp_path)
    assert (foreign / "notes.txt").read_text() == "mine"
    # the marker alone is not enough: files the user put in a carry prepare wrote, or a file of it changed, are kept
    # (the whole folder went with the next prepare: trial139 F2)
    dest = tmp_path / "work" / "gpu-carry"
    gs.carry([a], dest, root=tmp_path)
    (dest / "timings.json").write_text("from the GPU")
    (dest / "notes").mkdir()
    with pytest.raises(SystemExit, match=r"also holds what `gpu_session.py prepare` did not write there \(notes/, timings.json\)"):
        gs.carry([a], dest, root=tmp_path)
    assert (dest / "timings.json").read_text() == "from the GPU" and (dest / "work/out/dus/config.json").is_file()
    (dest / "timings.json").unlink()
    (dest / "notes").rmdir()
    (dest / "work/out/dus/config.json").write_text("edited by hand, longer than before")
    with pytest.raises(SystemExit, match=r"\(work/out/dus/config.json\)"):
        gs.carry([a], dest, root=tmp_path)
    # edited in place at the same size: told apart by its modification time, kept (trial144 F7)
    shutil.rmtree(dest)
    gs.carry([a], dest, root=tmp_path)
    edited = dest / "work/out/dus/config.json"
    before = edited.stat()
    edited.write_text("x" * before.st_size)
    os.utime(edited, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000))
    with pytest.raises(SystemExit, match=r"\(work/out/dus/config.json\)"):
        gs.carry([a], dest, root=tmp_path)
    assert edited.read_text() == "x" * before.st_size
    for marker in ("written by tools/gpu_session.py prepare; replaced by the next prepare\n",  # an earlier version's: no list
                   '{"files": {"work/out/dus/config.json": 10}}',  # an earlier version's: sizes alone
                   "{not json"):  # one that does not read
        (dest / gs.MARKER).write_text(marker)
        with pytest.raises(SystemExit, match=r"marker records no files this version can check \(an earlier gpu_session.py's "
                                             r"marker, or one that does not read\)"):
            gs.carry([a], dest, root=tmp_path)
        assert edited.read_text() == "x" * before.st_size


def test_unpacking_on_the_gpu_machine_places_files_and_overwrites_nothing(tmp_path):
    a = _model(tmp_path / "here", "dus", ["tokenizer.json"])
    carry = tmp_path / "here" / "work" / "gpu-carry"
    gs.carry([a], carry, root=tmp_path / "here")
    there = tmp_path / "there"
    (there / "work" / "out" / "dus").mkdir(parents=True)
    (there / "work" / "out" / "dus" / "config.json").write_text('{"theirs": 1}')
    placed = gs.unpack(carry, root=there)
    assert [p.relative_to(there).as_posix() for p in placed] == ["work/out/dus/tokenizer.json"]
    assert json.loads((there / "work/out/dus/config.json").read_text()) == {"theirs": 1}


def test_every_step_runs_under_its_limit_and_a_failed_one_does_not_stop_the_next(tmp_path, monkeypatch):
    monkeypatch.setattr(gs, "STEPS", {
        "fails": (30, ["-c", "import sys; print('partial'); sys.exit(3)"], None),
        "hangs": (1, ["-c", "import time; time.sleep(30)"], None),
        "prints": (30, ["-c", "print('{\"rows\": []}')"], "out.json"),
    })
    results = gs.run_steps(["fails", "hangs", "prints"], tmp_path, log=lambda m: None)
    assert results["fails"]["rc"] == 3 and results["hangs"]["rc"] == "timeout" and results["prints"]["rc"] == 0
    assert (tmp_path / "fails.log").read_text().strip() == "partial"
    assert json.loads((tmp_path / "out.json").read_text()) == {"rows": []}
    assert json.loads((tmp_path / "session.json").read_text()) == results


def _row(size, batch, dtype, ffn, **paths):
    return {"size": size, "batch": batch, "tokens": 0, "dtype": dtype, "ffn_ms": ffn, "unique_floor_ms": 0.05,
            "gathered_floor_ms": 0.5, "bank_mb": 2.0, "copy_gbps": 3000.0, **{f"{p} ms": v for p, v in paths.items()}}


def test_the_report_judges_the_targets_on_the_best_path_of_each_targeted_row(tmp_path):
    rows = [_row("SmolLM2-135M recipe", "16x1024", "bfloat16", 1.4, torch=11.4, triton=5.2, **{"triton-fused": 1.2}),
            _row("Llama-3.2-1B", "16x1024", "bfloat16", 8.0, torch=30.0, triton=12.0, **{"triton-fused": 6.0}),
            _row("SmolLM2-135M recipe", "4x256", "float32", 1.0, torch=3.0)]
    src = tmp_path / "session"
    src.mkdir()
    bank = [{"size": "SmolLM2-135M recipe", "bags": 147456, "k": 32, "d": 64, "embedding_bag ms": 1.30, "segment ms": 0.39,
             "segment 1024 blocks ms": 0.26, "blocks": 256, "wide blocks": 1024, "atomic ms": 0.80}]
    (src / "hml_fused.json").write_text(json.dumps({"device": "NVIDIA H200", "torch": "2.11", "rows": rows, "bank_grad_rows": bank}))
    (src / "check.log").write_text("[ok] everything\nOK\n")
    docs, results = tmp_path / "benchmarks.md", tmp_path / "results"
    docs.write_text("# Benchmarks\n\n## Other\n\nkept\n")
    done = gs.report(src, docs=docs, results=results)
    text = docs.read_text()
    assert "## Other\n\nkept" in text and "## HML on GPU, fused kernels" in text and len(done) == 2
    assert "- SmolLM2-135M recipe bfloat16 16x1024: best path triton-fused at 0.86x the FFN (target <= 1.0: met)" in text
    assert "- Llama-3.2-1B bfloat16 16x1024: best path triton-fused at 0.75x the FFN (target <= 0.5: NOT met)" in text
    assert "| SmolLM2-135M recipe | 4x256 | float32 | 1.00 | 3.00 (3.00x) | - | - | - | - | - | 0.050 / 0.500 |" in text
    assert "| SmolLM2-135M recipe | 147456 x 32, 64 | 1.300 | 0.390 (0.30x) [256] | 0.260 (0.20x) [1024] | 0.800 |" in text
    assert (results / "gpu_check_hml_session.log").read_text().endswith("OK\n")


def _kernels(**named):
    rows = [{"name": n, "count": c, "us": us} for n, (c, us) in named.items()]
    return {"what": "CUDA kernels", "launched": sum(c for c, _ in named.values()), "device_ms": sum(u for _, u in named.values()) / 1e3,
            "wall_ms": 120.0, "decode_ms": 100.0, "top": rows, "all": {n: list(v) for n, v in named.items()}}


def test_the_report_prints_the_compiled_decode_profile_and_keeps_the_compiled_section(tmp_path, capsys):
    """decode-profile is one round at one batch: its CUDA graphs and kernels are printed for a reading by hand
    and its JSON kept, and the compiled decode section (a 3-round measurement) is left as it was."""
    src, results, docs = tmp_path / "session", tmp_path / "results", tmp_path / "benchmarks.md"
    src.mkdir()
    graphs = {"DUS": {"cudagraph_skips": 0, "cudagraph_partitions": 0, "cudagraph_notes": []},
              "MIDUS": {"cudagraph_skips": 0, "cudagraph_partitions": 7, "cudagraph_notes": ["op0: reason=cpu ops, ir=Fallback"]}}
    payload = {"device": "cuda", "compiled": True, "compiles": [{"dtype": "bf16", "batch": 1, "graphs_so_far": 4, "cudagraphs": graphs}],
               "profile": [{"dtype": "bf16", "batch": 1, "compiled": True, "models": {
                   "DUS": _kernels(gemm=(200, 900.0), norm=(100, 100.0)),
                   "MIDUS": _kernels(gemm=(180, 800.0), norm=(100, 100.0), _topk2_kernel=(31, 400.0))}}]}
    (src / "bench_decode_profile.json").write_text(json.dumps(payload))
    docs.write_text("# Benchmarks\n\n## Decode on GPU, compiled (static cache, torch.compile)\n\nthree rounds, kept\n")
    done = gs.report(src, docs=docs, results=results)
    out = capsys.readouterr().out
    assert docs.read_text().endswith("three rounds, kept\n") and len(done) == 1
    assert json.loads((results / "bench_decode_gpu_compiled_profile.json").read_text())["profile"] == payload["profile"]
    assert "MIDUS 0 skipped, 7 partitions" in out and "reason=cpu ops" in out
    assert "| bf16 | 1 | MIDUS | 311 | 1.30 | 120.0 | 100.0 | 0.01 |" in out
    # what MIDUS runs more of than DUS: only the selection kernel (its GEMMs took less)
    assert "| `_topk2_kernel` | 31 | 400 | 0 | 0 | +400 |" in out and "| `gemm` |" not in out


def test_run_without_cuda_says_where_it_belongs():
    proc = subprocess.run([sys.executable, "tools/gpu_session.py", "run"], cwd=gs.REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "no CUDA device here" in proc.stderr and "Traceback" not in proc.stderr
    bad = subprocess.run([sys.executable, "tools/gpu_session.py", "run", "--steps", "check,warp"], cwd=gs.REPO,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "unknown ['warp']" in bad.stderr


def test_the_packages_the_gpu_machine_lacks_travel_in_the_carry_and_stay_there(tmp_path, monkeypatch):
    """2026-12-04: the H200 had torch, triton and transformers only, and bench_step's child died on
    `import pydantic`. The wheels are unpacked into the carry's pylib/, put on PYTHONPATH, not into the tree."""
    import zipfile

    def fake_download(folder):
        with zipfile.ZipFile(folder / "tinypkg-1.0-py3-none-any.whl", "w") as wheel:
            wheel.writestr("tinypkg/__init__.py", "VALUE = 7\n")

    carry = tmp_path / "carry"
    assert gs.bundle_packages(carry / gs.PYLIB, download=fake_download) > 0
    assert (carry / gs.PYLIB / "tinypkg" / "__init__.py").is_file()
    assert gs.unpack(carry, root=tmp_path / "there") == []  # the packages are imported from the carry
    path = gs.pythonpath(carry).split(os.pathsep)
    assert path[:2] == [str(gs.REPO), str(carry / gs.PYLIB)]
    found = subprocess.run([sys.executable, "-c", "import tinypkg; print(tinypkg.VALUE)"], env={**os.environ, "PYTHONPATH": gs.pythonpath(carry)},
                           capture_output=True, text=True)
    assert found.stdout.strip() == "7", found.stderr


def test_the_default_steps_fit_one_device_call_and_every_other_step_a_call_of_its_own():
    """The device tool runs one command for 600 s at most: `run` alone must finish inside that, with time
    to spare for unpacking, and each step it leaves out must fit a later call by itself."""
    assert set(gs.DEFAULT_STEPS) <= set(gs.STEPS) and "check" == gs.DEFAULT_STEPS[0]  # correctness first
    assert sum(gs.STEPS[s][0] for s in gs.DEFAULT_STEPS) <= 590
    assert all(gs.STEPS[s][0] <= 590 for s in gs.STEPS if s not in gs.DEFAULT_STEPS)
    profiled = gs.STEPS["decode-profile"][1]
    assert {"--compile", "--profile"} <= set(profiled) and gs.STEPS["decode-profile"][2] == "bench_decode_profile.json"
    compiled = gs.STEPS["decode-compiled"][1]
    assert "--compile" in compiled and "--device" in compiled and compiled[compiled.index("--device") + 1] == "cuda"
