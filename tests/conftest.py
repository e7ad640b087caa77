"""Session-wide test setup."""

import os

import pytest

# Triton kernels (midus_surgery/kernels/hml_triton.py) run on CPU tensors through Triton's
# interpreter in this suite. triton.jit reads the switch when a kernel is defined, and torch's
# compiler imports triton's own jit functions as soon as any test compiles, so it is set here,
# before any test module is imported. Only Triton kernels read it.
os.environ.setdefault("TRITON_INTERPRET", "1")

# Under pytest-xdist (README: `-n auto`) every worker is a process of its own: one torch thread each
# (and in their subprocesses) keeps the workers from oversubscribing the cores, where OpenMP's
# parallel regions wait on threads another worker holds off its core.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture()
def one_thread():
    """Tiny models run fastest on one thread, and results then match the subprocesses' exactly
    (training tests opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    import torch  # here, not at the top: TRITON_INTERPRET must be set before torch can reach triton

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
