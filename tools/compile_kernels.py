#!/usr/bin/env python
"""Compile every Triton kernel of the memory layer for a GPU, on a machine without one.

    python tools/compile_kernels.py                 # sm_90 (H100 / H200), the bench sizes
    python tools/compile_kernels.py --arch 80 --sizes "SmolLM2-135M recipe"

A GPU session is minutes long; a kernel that does not compile for the card would cost it. Each host
wrapper of midus_surgery/kernels/hml_triton.py (topk2, bag_dw, memory_forward, memory_backward,
segment_bank_grad) is called on CPU tensors of the bench_hml sizes with its kernels replaced by
recorders: what each launch would pass (pointer dtypes, integers, constexprs, num_warps, num_stages)
becomes a Triton signature that ``triton.compile`` turns into PTX and a cubin for the target, with
Triton's own ptxas. ``ptxas -v`` then says each kernel's registers per thread and spilled bytes:
a kernel that spills is slow before it runs. Pointers are taken 16-byte aligned and tensors
contiguous (as the wrappers make them), so another alignment would compile another specialization.
Nothing runs on a GPU, so this says nothing of correctness or speed (tools/gpu_check_hml.py does, on
the card).

Prints one line per kernel and configuration, and exits 1 if any failed to compile.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))

_ARCHS = (75, 80, 86, 87, 89, 90, 100, 103, 120)  # what Triton's NVIDIA backend and its ptxas compile for
_POINTER_TYPES = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.int64: "*i64",
                  torch.int32: "*i32"}


class _Recorder:
    """Stands in for a @triton.jit kernel: ``kernel[grid](*args, **kwargs)`` records the launch."""

    def __init__(self, kernel, launches: list):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append((self.kernel, args, kwargs))
        return launch


def signature_of(kernel, args: tuple, kwargs: dict) -> tuple[dict, dict, dict, dict]:
    """(signature, constexprs, attrs, options) of one recorded launch, as triton.compile takes them:
    pointers typed by their tensor's dtype and marked 16-byte aligned (torch's allocations are), integers
    i32 or i64 by their value, the constexprs by name; num_warps / num_stages as launch options."""
    names = [p.name for p in kernel.params]
    constexpr_names = {p.name for p in kernel.params if p.is_constexpr}
    values = dict(zip(names, args))
    values.update({k: v for k, v in kwargs.items() if k in names})
    options = {k: v for k, v in kwargs.items() if k in ("num_warps", "num_stages")}
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(names):
        value = values[name]
        if name in constexpr_names:
            signature[name], constexprs[name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[name] = _POINTER_TYPES[value.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{kernel.__name__}: argument {name}={value!r} is neither a tensor nor an int")
        else:
            signature[name] = "i32" if -2**31 <= value < 2**31 else "i64"
            if value % 16 == 0 and value:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, constexprs, attrs, options


def record_launches(size: dict, table_dtype: torch.dtype, tokens: int) -> list:
    """Every kernel launch the layer's Triton paths make at ``size`` (bench_hml.SIZES) for ``tokens``
    tokens with the bank in ``table_dtype``: the host wrappers run on CPU tensors, the kernels are recorded."""
    from midus_surgery.kernels import hml_triton
    from midus_surgery.model.hml import candidate_pairs

    launches: list = []
    kernels = {name: getattr(hml_triton, name) for name in dir(hml_triton)
               if name.startswith("_") and name.endswith("_kernel")}
    try:
        for name, kernel in kernels.items():
            setattr(hml_triton, name, _Recorder(kernel, launches))
        H, dh, n, k, dl = size["heads"], size["head_dim"], size["n"], size["k"], size["d_l"]
        T = tokens
        pairs = candidate_pairs(k, torch.device("cpu"))
        scores = torch.zeros(H, 2, T, n)
        hml_triton.topk2(scores[:, 0], scores[:, 1], k, pairs)
        hml_triton.topk2(scores[:, 0], scores[:, 1], k, pairs, compact=False)
        idx = torch.zeros(H * T, k, dtype=torch.int64)
        table = torch.zeros(n * n, dl, dtype=table_dtype)
        hml_triton.bag_dw(torch.zeros(H * T, dl, dtype=table_dtype), table, idx)
        q, keys = torch.zeros(T, H, dh), torch.zeros(H, 2, n, dh // 2)
        w, i_sub, j_sub, _ = hml_triton.memory_forward(q, keys, table, k, 0, pairs)
        dz = torch.zeros(H, T, dl)
        for atomic in (False, True):
            hml_triton.memory_backward(dz, q, keys, table, w, i_sub, j_sub, 0, atomic)
        hml_triton.segment_bank_grad(dz.view(H * T, dl), idx, w.view(H * T, k), n * n)
    finally:
        for name, kernel in kernels.items():
            setattr(hml_triton, name, kernel)
    return launches


def ptxas_usage(ptx: str, arch: int) -> str:
    """``registers R, spills S B, shared X B`` from ``ptxas -v`` on the kernel's PTX (Triton's own ptxas)."""
    from triton.backends.nvidia.compiler import get_ptxas

    try:
        ptxas = get_ptxas(arch).path  # triton 3.8
    except TypeError:
        ptxas = get_ptxas().path  # older triton: one ptxas for every arch
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as fh:
            fh.write(ptx)
        gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
        out = subprocess.run([ptxas, "-v", "--gpu-name", gpu, src, "-o", os.devnull], capture_output=True, text=True)
    regs = re.search(r"Used (\d+) registers", out.stderr)
    spill = re.search(r"(\d+) bytes spill stores", out.stderr)
    return (f"registers {regs.group(1) if regs else '?'}, spill stores {spill.group(1) if spill else '?'} B"
            if out.returncode == 0 else f"ptxas -v failed: {out.stderr.strip()[:200]}")


def main(argv=None) -> int:
    from bench_hml import SIZES

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90, help="CUDA compute capability x 10 (default 90: H100/H200)")
    ap.add_argument("--sizes", default="SmolLM2-135M recipe,Llama-3.2-1B",
                    help=f"comma-separated bench_hml sizes (default the targets'), of: {', '.join(SIZES)}")
    ap.add_argument("--tokens", type=int, default=16 * 1024, help="tokens per launch (default 16 x 1024)")
    ap.add_argument("--kernels", default="", help="comma-separated parts of kernel names to compile (default all), "
                    "e.g. memory,segment")
    ap.add_argument("--banks", default="float32,bfloat16", help="comma-separated bank dtypes (default float32,bfloat16)")
    args = ap.parse_args(argv)
    if args.arch not in _ARCHS:
        ap.error(f"--arch: a CUDA compute capability x 10 of {', '.join(map(str, _ARCHS))}, got {args.arch}")
    if args.tokens < 1:
        ap.error(f"--tokens: at least 1, got {args.tokens}")
    wanted = [w.strip() for w in args.kernels.split(",") if w.strip()]
    banks = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    asked = [b.strip() for b in args.banks.split(",") if b.strip()]
    if not asked or not set(asked) <= set(banks):
        ap.error(f"--banks: of {', '.join(banks)}, got {args.banks!r}")
    bank_dtypes = [banks[b] for b in asked]
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    unknown = [s for s in sizes if s not in SIZES]
    if unknown or not sizes:
        ap.error(f"--sizes: unknown {unknown or 'none given'}; known: {', '.join(SIZES)}")
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as exc:
        print(f"compile_kernels: triton is needed ({exc}); it is in the dev extra", file=sys.stderr)
        return 2
    target = GPUTarget("cuda", args.arch, 32)
    print(f"# compile_kernels: triton {triton.__version__}, torch {torch.__version__}, target sm_{args.arch}, sizes "
          f"{', '.join(sizes)}, {args.tokens} tokens, banks {args.banks}; {time.strftime('%Y-%m-%d')}. Pointers taken "
          "16-byte aligned, tensors contiguous. The last figure of a line is the compile time (near 0 from Triton's cache).")
    failures, seen = 0, set()
    for size in sizes:
        for table_dtype in bank_dtypes:
            for kernel, largs, kwargs in record_launches(SIZES[size], table_dtype, args.tokens):
                if wanted and not any(w in kernel.__name__ for w in wanted):
                    continue
                signature, constexprs, attrs, options = signature_of(kernel, largs, kwargs)
                key = (kernel.__name__, tuple(sorted(signature.items())), tuple(sorted(constexprs.items())),
                       tuple(sorted(options.items())), tuple(sorted(attrs)))
                if key in seen:  # the same compile as an earlier size or dtype
                    continue
                seen.add(key)
                shown = ", ".join(f"{k}={v}" for k, v in constexprs.items())
                t0 = time.time()
                try:
                    compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs),
                                              target=target, options=options)
                except Exception as exc:  # a compile error is what this tool is for: report it, go on
                    failures += 1
                    msg = str(exc).strip().splitlines()
                    print(f"[FAIL] {kernel.__name__} ({size}, {str(table_dtype)[6:]} bank; {shown}): {type(exc).__name__}: "
                          f"{' '.join(msg[-3:])[:400] if msg else ''}")
                    continue
                usage = ptxas_usage(compiled.asm["ptx"], args.arch)
                print(f"[ok] {kernel.__name__} ({size}, {str(table_dtype)[6:]} bank; {shown}; "
                      f"num_warps={compiled.metadata.num_warps}, num_stages={compiled.metadata.num_stages}): sm_{args.arch}, {usage}, "
                      f"shared {compiled.metadata.shared} B, {time.time() - t0:.1f} s")
    if not seen:
        print(f"compile_kernels: no kernel name contains any of {wanted}", file=sys.stderr)
        return 2
    print("OK" if not failures else f"FAILED: {failures} kernel configuration(s) did not compile")
    return 1 if failures else 0


if __name__ == "__main__":
    # Before the kernels are defined: the interpreter replaces triton.jit's functions, leaving no source to compile.
    os.environ.pop("TRITON_INTERPRET", None)
    raise SystemExit(main())
