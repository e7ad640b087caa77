"""Session-wide test setup."""

import os

# Triton kernels (midus_surgery/kernels/hml_triton.py) run on CPU tensors through Triton's
# interpreter in this suite. triton.jit reads the switch when a kernel is defined, and torch's
# compiler imports triton's own jit functions as soon as any test compiles, so it is set here,
# before any test module is imported. Only Triton kernels read it.
os.environ.setdefault("TRITON_INTERPRET", "1")
