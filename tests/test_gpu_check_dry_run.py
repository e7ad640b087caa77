"""tools/gpu_check_hml.py --dry-run: the prepared GPU check runs end to end on the CPU, so a GPU
session (15 minutes of device time) is not spent finding a broken script."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_dry_run_passes_every_check_and_times_every_variant(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p))
    rows = tmp_path / "fused.json"
    proc = subprocess.run([sys.executable, "tools/gpu_check_hml.py", "--dry-run", "--json-out", str(rows)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1500)  # a hang bound: 8.5 min at load 5
    out = proc.stdout
    assert proc.returncode == 0, out[-2000:] + proc.stderr[-2000:]
    checks = [line for line in out.splitlines() if line.startswith(("[ok]", "[FAIL]"))]
    assert len(checks) >= 10 and all(line.startswith("[ok]") for line in checks)
    variants = [line for line in out.splitlines() if line.startswith("[variants]")]
    assert len(variants) == 2  # fp32 and bf16 at the dry run's one batch
    for name in ("default", "tie-checked topk (sync)", "bank_grad sparse_mm", "bank_grad embedding_bag", "bank_grad index_add"):
        assert all(f"{name} " in line for line in variants), name
    assert "[profile] one pure-torch fwd+bwd" in out and "[profile] one fwd+bwd on the Triton kernels" in out
    assert out.count("[profile] host syncs and copies:") == 4  # sections 7, 8 (float32 and bfloat16) and 10
    # section 8, the Triton kernels through Triton's interpreter
    for name in ("triton top-k == pure-torch selection (random", "triton top-k == pure-torch selection (small-int ties",
                 "triton bag dw == per-sample-weights backward (float32", "triton bag dw == per-sample-weights backward (bfloat16",
                 "a layer on the triton kernels == the default layer"):
        assert any(line.startswith("[ok]") and name in line for line in checks), name
    triton_lines = [line for line in out.splitlines() if line.startswith("[triton]")]
    assert [line.split(" (")[0] for line in triton_lines] == [
        "[triton] selection alone 1x16", "[triton] bag dw alone 1x16 float32", "[triton] bag dw alone 1x16 bfloat16",
        "[triton] keys gradient alone 1x16 float32 [18, 16, 16] @ [18, 16, 32]",
        "[triton] projection gradient alone 1x16 float32 [9, 64, 16] @ [9, 16, 64]",
        "[triton] projection gradient alone 1x16 bfloat16 [9, 64, 16] @ [9, 16, 64]",
        "[triton] layer fwd+bwd 1x16 float32", "[triton] layer fwd+bwd 1x16 bfloat16"]
    assert any(line.startswith("[ok]") and "FSDP2 over 2 CPU processes (gloo) == one process" in line for line in checks)  # section 9
    assert all("triton/torch" in line for line in triton_lines[:3]) and "triton square " in triton_lines[-2] and "torch path " in triton_lines[-2]
    assert all("one GEMM " in line and "2 pieces " in line for line in triton_lines[3:6])
    assert all("triton, weight grads as one GEMM " in line for line in triton_lines[-2:])
    for what in ("keys gradient in 2 pieces == one GEMM (1x16 float32", "projection gradient in 2 pieces == one GEMM (1x16 bfloat16"):
        assert any(line.startswith("[ok]") and what in line for line in checks), what
    assert "[profile] one fwd+bwd on the Triton kernels, 1x16 bfloat16" in out
    # section 10, the fused kernels: correctness first, then every path beside the FFN with the bytes floors
    for name in ("fused read selects the pure-torch slots", "fused read pools the pure-torch z",
                 "fused backward == autograd through the pure-torch read (deterministic)",
                 "fused backward == autograd through the pure-torch read (atomic table)",
                 "a layer on the fused kernels == the pure-torch layer {}", "a layer on the fused kernels == the pure-torch layer {'hive': False}",
                 "a layer on the fused kernels == the pure-torch layer {'bank_grad': 'segment'}",
                 "a layer on the triton kernels == the pure-torch layer {'bank_grad': 'segment'}",
                 "segment_order is the stable argsort by row", "segment_order is the stable argsort by row with a hot row",
                 "segment bank gradient == autograd's",
                 "segment bank gradient: the same bits for 1, ", "bf16 layer on the fused kernels"):  # the block counts used
        assert any(line.startswith("[ok]") and name in line for line in checks), name
    fused = [line for line in out.splitlines() if line.startswith("[fused] SmolLM2-135M recipe 1x16")]
    assert len(fused) == 2  # float32 and bfloat16
    for line in fused:
        for path in ("FFN ", "torch ", "triton ", "triton segment ", "triton-fused ", "triton-fused segment ",
                     "triton-fused atomic ", "floor: unique bytes "):
            assert path in line, (path, line)
    bank = [line for line in out.splitlines() if line.startswith("[fused] bank gradient alone, SmolLM2-135M recipe")]
    assert len(bank) == 1 and all(what in bank[0] for what in ("embedding_bag backward ", "segment ", "asked for 1024 counting blocks, at ",
                                                           "index_add atomics "))
    payload = json.loads(rows.read_text())  # what tools/gpu_session.py report reads
    assert [(r["batch"], r["dtype"]) for r in payload["rows"]] == [("1x16", "bfloat16"), ("1x16", "float32")]  # targets' dtype first
    assert all(r.get("triton-fused segment ms", 0) > 0 for r in payload["rows"])
    assert [r["size"] for r in payload["bank_grad_rows"]] == ["SmolLM2-135M recipe"]
    assert "[profile] one fwd+bwd on the fused kernels" in out
    # section 11, the read at decode: every path against the pure-torch read, then the times and what one call runs
    for path in ("triton", "triton-fused"):
        assert any(line.startswith("[ok]") and f"decode read on {path} == the pure-torch read (1 row(s) x 1 token, float32" in line
                   for line in checks), path
    (decode,) = [line for line in out.splitlines() if line.startswith("[decode] tiny (dry run) float32, 1 row(s)")]
    for what in ("FFN eager ", "torch eager ", "triton eager ", "triton-fused eager "):
        assert what in decode, (what, decode)
    assert any(line.startswith("[ok]") and "decode-shaped read kernel == the 16-token-block kernel (1 row(s), float32; 1.0000 of the slots"
               in line for line in checks)
    (alone,) = [line for line in out.splitlines() if line.startswith("[decode] fused read kernel alone, 1 row(s), float32: ")]
    assert "decode-shaped eager " in alone and "; 16-token blocks eager " in alone
    ops = [line for line in out.splitlines() if line.startswith("[decode] aten ops of one ")]
    assert [line.split(" call:")[0] for line in ops] == [f"[decode] aten ops of one {w}" for w in ("FFN", "triton", "triton-fused")]
    assert "aten::linear x3" in ops[0] and "aten::_embedding_bag x1" in ops[1]  # LlamaMLP's three projections; the bag
    assert out.rstrip().endswith("OK")


def test_gpu_check_skip_takes_only_the_timing_sections():
    proc = subprocess.run([sys.executable, "tools/gpu_check_hml.py", "--dry-run", "--skip", "5"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "only sections 6, 7, 8, 9, 10 and 11 can be left out" in proc.stderr
    assert "Traceback" not in proc.stderr
