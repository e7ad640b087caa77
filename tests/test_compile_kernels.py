"""tools/compile_kernels.py: the Triton kernels that have never run on a GPU (the fused read and its
backward, the segment reduce of the bank gradient) compile for an H100/H200 (sm_90) on this machine,
through the launches their host wrappers really make, and ptxas reports their registers. A kernel that
does not compile for the card would otherwise cost a GPU session's minutes to find."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compiled, not interpreted
    return subprocess.run([sys.executable, "tools/compile_kernels.py", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.slow
def test_the_kernels_never_run_on_a_gpu_compile_for_sm_90():
    pytest.importorskip("triton")
    proc = _run("--sizes", "SmolLM2-135M recipe", "--kernels", "memory,segment", "--banks", "float32")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith(("[ok]", "[FAIL]"))]
    names = {line.split()[1] for line in lines}
    assert names == {"_memory_fwd_kernel", "_memory_bwd_kernel", "_segment_count_kernel", "_segment_place_kernel",
                     "_segment_sum_kernel", "_segment_rows_kernel"}
    assert all(line.startswith("[ok]") and ": sm_90, registers " in line for line in lines)
    assert sum("_memory_bwd_kernel" in line for line in lines) == 2  # with and without the atomic table
    place = next(line for line in lines if "_segment_place_kernel" in line)
    assert "num_warps=2, num_stages=1" in place  # the launch options travel with the recorded launch
    assert proc.stdout.rstrip().endswith("OK")


def test_a_kernel_filter_that_matches_nothing_is_one_line_and_exit_2():
    pytest.importorskip("triton")
    proc = _run("--sizes", "SmolLM2-135M recipe", "--kernels", "nothing_like_this")
    assert proc.returncode == 2 and "no kernel name contains any of ['nothing_like_this']" in proc.stderr
    assert "Traceback" not in proc.stderr
    bad = _run("--sizes", "GPT-5")
    assert bad.returncode == 2 and "--sizes: unknown ['GPT-5']" in bad.stderr
    bank = _run("--banks", "int8")
    assert bank.returncode == 2 and "--banks: of float32, bfloat16, float16, got 'int8'" in bank.stderr
    arch = _run("--arch", "12")
    assert arch.returncode == 2 and "--arch: a CUDA compute capability x 10 of 75, 80" in arch.stderr and not arch.stdout
    tokens = _run("--tokens", "0")
    assert tokens.returncode == 2 and "--tokens: at least 1, got 0" in tokens.stderr
    assert all("Traceback" not in p.stderr for p in (bad, bank, arch, tokens))
