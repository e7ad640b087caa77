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


def _main(capsys, *args: str) -> tuple[int, str, str]:
    """compile_kernels.main in this process (its argument errors come before any compile)."""
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import compile_kernels
    finally:
        sys.path.remove(str(ROOT / "tools"))
    try:
        code = compile_kernels.main(list(args))
    except SystemExit as exc:  # argparse's error()
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def test_bad_arguments_are_one_line_and_exit_2(capsys):
    pytest.importorskip("triton")
    code, _, err = _main(capsys, "--sizes", "SmolLM2-135M recipe", "--kernels", "nothing_like_this")
    assert code == 2 and "no kernel name contains any of ['nothing_like_this']" in err
    code, _, err = _main(capsys, "--sizes", "GPT-5")
    assert code == 2 and "--sizes: unknown ['GPT-5']" in err
    code, _, err = _main(capsys, "--banks", "int8")
    assert code == 2 and "--banks: of float32, bfloat16, float16, got 'int8'" in err
    code, _, err = _main(capsys, "--tokens", "0")
    assert code == 2 and "--tokens: at least 1, got 0" in err


def test_a_bad_argument_from_the_command_line_is_one_line_and_exit_2():
    arch = _run("--arch", "12")  # the script as run: one usage line and the error, no traceback, nothing on stdout
    assert arch.returncode == 2 and "--arch: a CUDA compute capability x 10 of 75, 80" in arch.stderr and not arch.stdout
    *usage, error = arch.stderr.strip().splitlines()  # argparse's usage (wrapped) and one error line
    assert usage[0].startswith("usage: compile_kernels.py") and error.startswith("compile_kernels.py: error: --arch")
    assert "Traceback" not in arch.stderr
