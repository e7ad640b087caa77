#!/usr/bin/env python
"""Benchmark: HML (midus_surgery/model/hml.py) vs the FFN it replaces (transformers' LlamaMLP).

Forward+backward time and peak memory, side by side, interleaved repeats, at two block sizes
(SmolLM2-135M, Llama-3.2-1B), batch 4 x 256 tokens, float32 and bfloat16.

    python tools/bench_hml.py            # table; --write-docs puts it in docs/benchmarks.md (raw numbers: docs/results/bench_hml.json)
    python tools/bench_hml.py --json     # one JSON object {"rows": [...]}
    python tools/bench_hml.py --quick    # fewer repeats (whole run under about a minute)
    python tools/bench_hml.py --kernels torch   # time the pure-torch path in the main column
    python tools/bench_hml.py --ops      # the layer's matmuls and selection alone, float32 beside bf16 (docs/hml.md, Precision)

Time: the minimum over interleaved repeats (the machine is shared; the minimum is the least
disturbed run).  Peak memory: sum of live tensor bytes allocated during one fwd+bwd step,
from torch.profiler's allocation events (profile_memory=True), i.e. activations, saved
tensors, temporaries and gradients, not the parameters themselves.

bfloat16 FFN at the Llama size on a CPU without native bf16 (no AVX512-BF16 or AMX): a bf16
GEMM of that size takes minutes there, so that FFN is timed on fewer tokens and scaled linearly
in tokens (GEMM time is linear in M); those rows say so ("ffn_tokens_timed").  On a CPU with
native bf16 every row is timed at the full batch.

This is the driver (it times the rows); tools/bench_hml_report.py makes the table, judges the targets and
writes the `## HML` section, also from a saved run (``--from-json``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import bf16_words, command_line, cpu_name, cpu_native_bf16, save_json, versions  # noqa: E402
from bench_hml_report import DOCS, JSON, table, write_docs  # noqa: E402

from midus_surgery.model.hml import HeadwiseMemory, HMLConfig, hml_parameter_count, use_kernels  # noqa: E402

SIZES = {
    "SmolLM2-135M": dict(hidden=576, heads=9, head_dim=64, ffn=1536, n=256, k=32, d_l=64),
    "Llama-3.2-1B": dict(hidden=2048, heads=32, head_dim=64, ffn=8192, n=256, k=32, d_l=256),
    # the bundled recipe recipes/smollm2-135m-midus.yaml uses a smaller table than the fixed row above
    "SmolLM2-135M recipe": dict(hidden=576, heads=9, head_dim=64, ffn=1536, n=128, k=32, d_l=64),
}
BATCH, SEQ = 4, 256


def traffic(size: str, tokens: int, dtype: torch.dtype) -> dict:
    """The bytes one forward + backward of the memory layer must move at least, at ``size`` (SIZES)
    for ``tokens`` tokens with parameters and activations in ``dtype`` (docs/hml.md, "The physical picture").

    unique:   every byte read or written once: the input, output and their gradients, the saved read
              (w and int32 slot ids [T, H, k], the pooled latent z [T, H, d_l] in float32), the keys,
              bank and projection and their float32 gradients.
    gathered: the bank rows the lookups touch: each token reads H x k rows of d_l values forward and
              backward (the weight gradient's dot products) and adds one float32 row per slot into the
              bank's gradient. They come from on-chip cache when the bank fits there, else from memory.
    bank:     the bank's bytes (whether it fits in a cache decides which floor binds).
    Returned in bytes: {"unique", "gathered", "bank"}.
    """
    s = SIZES[size]
    b = torch.empty((), dtype=dtype).element_size()
    T, H, dh, n, k, dl = tokens, s["heads"], s["head_dim"], s["n"], s["k"], s["d_l"]
    act = T * H * dh * b  # one [T, H*d_h] activation
    bank = n * n * dl * b
    params = H * n * dh * 4 + bank + H * dl * dh * b  # keys (float32), bank, projection
    grads = H * n * dh * 4 + n * n * dl * 4 + H * dl * dh * 4
    saved = T * H * k * (4 + 4) + T * H * dl * 4  # w + int32 slots, z
    unique = 4 * act + 2 * saved + 2 * params + grads  # x, out, dout, dx; saved written and read; params read twice
    gathered = T * H * k * dl * (b + b + 4)  # forward rows, the backward's rows, the gradient's float32 rows
    return {"unique": unique, "gathered": gathered, "bank": bank}


def copy_gb_per_s(device, mib: int = 256) -> float:
    """Memory bandwidth measured on ``device`` now (GB/s): the best of a few copies of a ``mib`` MiB
    tensor, counting the bytes read and written. The floors are divided by it, in the same run."""
    src = torch.empty(mib * 2**20 // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    best = float("inf")
    for _ in range(5):
        sync()
        t = time.perf_counter()
        dst.copy_(src)
        sync()
        best = min(best, time.perf_counter() - t)
    return 2 * src.numel() * 4 / best / 1e9


def build(size: str, dtype: torch.dtype):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    s = SIZES[size]
    ffn = LlamaMLP(LlamaConfig(hidden_size=s["hidden"], intermediate_size=s["ffn"])).to(dtype)
    cfg = HMLConfig(n_subkeys=s["n"], topk=s["k"], latent_dim=s["d_l"], init="random")
    hml = HeadwiseMemory(s["heads"], s["head_dim"], s["hidden"], cfg).to(dtype)
    return ffn, hml, cfg


def step_fn(mod, x, autocast: bool = False):
    """One forward + backward of ``mod`` on ``x`` (``autocast``: the forward under bf16 autocast, as
    `midus-surgery train` runs ``precision: bf16`` over float32 parameters). The gradients are dropped at the end of the step, not at the
    start of the next: every tensor a step allocates is then freed within it, so peak_bytes measures each step
    from the same baseline (dropped at the start, the last step's gradients were freed inside the profiled
    step: counted there when a profiler saw them allocated, not when none did, and the peak read 11.0 or 17.6
    MiB for the same layer depending on which call was profiled)."""
    gy = None

    def step():
        nonlocal gy
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
            y = mod(x)
        if gy is None:
            gy = torch.ones_like(y)
        y.backward(gy)
        for p in mod.parameters():
            p.grad = None
        x.grad = None

    return step


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e3


def peak_bytes(fn) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    evs = [(e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for _, b in sorted(evs, key=lambda t: t[0]):
        live += b
        peak = max(peak, live)
    return peak


def on_kernels(kernels: str, layer, fn):
    """fn run with ``layer`` on ``kernels`` ("fused": compiled CPU kernels, "torch": pure torch)."""

    def run():
        use_kernels(layer, kernels)
        fn()

    return run


AUTOCAST = "bf16 autocast"  # a row's dtype: float32 parameters under bf16 autocast


def run_row(size: str, dtype: torch.dtype, repeats: int, sub_tokens: int | None, log, kernels: str = "fused",
            compare_torch: bool = False, copy_gbps: float | None = None, autocast: bool = False) -> dict:
    """One size and precision. ``autocast``: float32 parameters (``dtype`` must be float32) stepped under bf16
    autocast, the HML fed bf16 queries (the attention's query projection's output under autocast) and the FFN a
    float32 input (the residual stream's normed copy), as in a `midus-surgery train` step with ``precision: bf16``."""
    s = SIZES[size]
    torch.manual_seed(0)
    ffn, hml, cfg = build(size, dtype)
    xf = torch.randn(BATCH, SEQ, s["hidden"], dtype=dtype, requires_grad=True)
    query_dtype = torch.bfloat16 if autocast else dtype
    xh = torch.randn(BATCH, SEQ, s["heads"], s["head_dim"], dtype=query_dtype, requires_grad=True)
    ffn_tokens = BATCH * SEQ
    if sub_tokens:
        xf = torch.randn(1, sub_tokens, s["hidden"], dtype=dtype, requires_grad=True)
        ffn_tokens = sub_tokens
    f_step, h_step = step_fn(ffn, xf, autocast), on_kernels(kernels, hml, step_fn(hml, xh, autocast))
    t_step = on_kernels("torch", hml, step_fn(hml, xh, autocast)) if compare_torch else None
    f_step(), h_step()  # warm-up (and the one-time kernel build)
    if t_step:
        t_step()
    ft, ht, tt = [], [], []
    for _ in range(repeats):  # interleaved
        ft.append(timed(f_step))
        ht.append(timed(h_step))
        if t_step:
            tt.append(timed(t_step))
    scale = (BATCH * SEQ) / ffn_tokens
    ffn_ms = min(ft) * scale
    hml_ms = min(ht)
    hml_peak = peak_bytes(h_step)
    ffn_peak = peak_bytes(f_step) if not sub_tokens else None
    row = dict(
        size=size,
        dtype=AUTOCAST if autocast else str(dtype).replace("torch.", ""),
        hml_ms=round(hml_ms, 1),
        ffn_ms=round(ffn_ms, 1),
        ratio=round(hml_ms / ffn_ms, 3),
        hml_params=sum(p.numel() for p in hml.parameters()),
        ffn_params=sum(p.numel() for p in ffn.parameters()),
        n=cfg.n_subkeys,
        k=cfg.topk,
        d_l=cfg.latent_dim,
        hml_peak_mib=round(hml_peak / 2**20, 1),
        ffn_peak_mib=None if ffn_peak is None else round(ffn_peak / 2**20, 1),
        hml_ms_median=round(sorted(ht)[len(ht) // 2], 1),
        ffn_ms_median=round(sorted(ft)[len(ft) // 2] * scale, 1),
        repeats=repeats,
        path=kernels,  # the row field keeps its name: saved runs (docs/results/bench_hml.json) and their readers use it
    )
    if tt:
        row["hml_torch_ms"] = round(min(tt), 1)
        row["ratio_torch"] = round(min(tt) / ffn_ms, 3)
    assert row["hml_params"] == hml_parameter_count(s["heads"], s["head_dim"], s["hidden"], cfg)
    if sub_tokens:
        row["ffn_tokens_timed"] = sub_tokens
    if copy_gbps:  # the bytes the layer must move, at the bandwidth measured in this run
        moved = traffic(size, BATCH * SEQ, dtype)
        row["floor_unique_ms"] = round(moved["unique"] / copy_gbps / 1e6, 2)
        row["floor_gathered_ms"] = round(moved["gathered"] / copy_gbps / 1e6, 2)
    torch_note = f", pure-torch hml {row['hml_torch_ms']} ms ({row['ratio_torch']}x)" if tt else ""
    log(f"  {size} {row['dtype']}: hml {row['hml_ms']} ms, ffn {row['ffn_ms']} ms, ratio {row['ratio']}{torch_note}")
    return row


def op_rows(size: str, tokens: int, repeats: int) -> list[dict]:
    """The layer's matmuls and its selection timed alone at ``size`` for ``tokens`` tokens (minimum of
    ``repeats`` interleaved rounds, ms): the scoring bmm and the three projection bmm's in float32 and in
    bfloat16 (alone, and with the casts to and from float32 a bf16 rule inside the float32 layer would add),
    and the selection as the compiled CPU kernels run it (``score_topk2``) beside the bmm + ``topk2`` it
    replaces. What the bf16 units could take from the layer (docs/hml.md, Precision)."""
    from midus_surgery.kernels import cpu_ops

    s = SIZES[size]
    H, dh, n, k, dl, T = s["heads"], s["head_dim"], s["n"], s["k"], s["d_l"], tokens
    g = torch.Generator().manual_seed(0)
    q, keys = torch.randn(T, H, dh, generator=g), torch.randn(H, 2, n, dh // 2, generator=g)
    mats = {  # name: ([B, M, K], [B, K, N])
        "scoring bmm": ((2 * H, T, dh // 2), (2 * H, dh // 2, n)),
        "projection z @ P": ((H, T, dl), (H, dl, dh)),
        "projection dz = dm @ P^T": ((H, T, dh), (H, dh, dl)),
        "projection dP = z^T @ dm": ((H, dl, T), (H, T, dh)),
    }
    fns = {}
    for name, (sa, sb) in mats.items():
        a, b = torch.randn(sa, generator=g), torch.randn(sb, generator=g)
        a16, b16 = a.bfloat16(), b.bfloat16()
        fns[name] = {"float32": lambda a=a, b=b: torch.bmm(a, b), "bfloat16": lambda a=a16, b=b16: torch.bmm(a, b),
                     "bfloat16 + casts": lambda a=a, b=b16: torch.bmm(a.bfloat16(), b).float()}
    ops = cpu_ops()
    if ops is not None:
        def bmm_topk2():
            sc = torch.bmm(q.reshape(T, 2 * H, dh // 2).transpose(0, 1), keys.reshape(2 * H, n, dh // 2).transpose(1, 2))
            sc = sc.view(H, 2, T, n)
            return ops.topk2(sc[:, 0], sc[:, 1], k)

        fns["selection"] = {"score_topk2": lambda: ops.score_topk2(q, keys, k), "bmm + topk2": bmm_topk2}
    best = {(name, how): float("inf") for name, ways in fns.items() for how in ways}
    for fn in (f for ways in fns.values() for f in ways.values()):
        fn()  # warm-up
    for _ in range(repeats):  # interleaved: every op once per round
        for name, ways in fns.items():
            for how, fn in ways.items():
                best[name, how] = min(best[name, how], timed(fn))
    return [{"size": size, "tokens": T, "op": name, "how": how, "ms": round(ms, 3)} for (name, how), ms in best.items()]


def ops_table(rows: list[dict]) -> str:
    lines = ["| size | tokens | op | how | ms |", "|---|---|---|---|---|"]
    lines += [f"| {r['size']} | {r['tokens']} | {r['op']} | {r['how']} | {r['ms']} |" for r in rows]
    return "\n".join(lines) + "\n"


def machine() -> str:
    bf16 = bf16_words()
    return f"{cpu_name()}, {os.cpu_count()} CPU cores, {bf16}, torch threads {torch.get_num_threads()}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    ap.add_argument("--quick", action="store_true", help="fewer repeats (under about a minute)")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--sizes", default=",".join(SIZES))
    ap.add_argument("--dtypes", default="float32,bfloat16",
                    help="comma-separated: float32, bfloat16 (module and input cast), autocast (float32 parameters under "
                         "bf16 autocast, as `midus-surgery train` runs precision: bf16)")
    ap.add_argument("--kernels", "--path", dest="kernels", choices=("fused", "torch"), default="fused",
                    help="the HML's kernels timed in the main column (fused: compiled CPU kernels; float32 rows also time "
                         "the pure-torch path beside it)")
    ap.add_argument("--ops", action="store_true", help="time the layer's matmuls and selection alone, float32 beside bf16, "
                                                        "at the given sizes (BATCH x SEQ tokens); writes nothing")
    ap.add_argument("--write-docs", action="store_true", help="write the table into docs/benchmarks.md (## HML) and the rows into docs/results/bench_hml.json")
    args = ap.parse_args(argv)
    repeats = args.repeats or (1 if args.quick else 5)
    log = (lambda m: print(m, file=sys.stderr)) if args.json else print
    if args.ops:
        rows = [r for size in args.sizes.split(",") for r in op_rows(size, BATCH * SEQ, max(repeats, 3) * 4)]
        print(json.dumps({"rows": rows, "machine": machine(), "versions": versions()}) if args.json else
              f"{machine()}\n\n{ops_table(rows)}")
        return 0
    unknown = [dt for dt in args.dtypes.split(",") if dt not in ("float32", "bfloat16", "autocast")]
    if unknown:
        ap.error(f"--dtypes: {', '.join(unknown)}: use float32, bfloat16 or autocast")
    rows = []
    native_bf16 = cpu_native_bf16()  # a bf16 GEMM at the Llama size takes minutes without it
    gbps = copy_gb_per_s("cpu")
    log(f"memory bandwidth (copy): {gbps:.1f} GB/s")
    for size in args.sizes.split(","):
        for dt in args.dtypes.split(","):
            autocast = dt == "autocast"
            dtype = torch.float32 if autocast else getattr(torch, dt)
            sub = None
            if dtype == torch.bfloat16 and ((size == "Llama-3.2-1B" and not native_bf16) or args.quick):
                sub = 16 if args.quick else 64
            rows.append(run_row(size, dtype, repeats if not sub else max(1, repeats // 2), sub, log,
                                kernels=args.kernels, compare_torch=dtype == torch.float32 and not autocast and args.kernels == "fused",
                                copy_gbps=gbps, autocast=autocast))
    payload = {"rows": rows, "machine": machine(), "copy_gbps": round(gbps, 1), "versions": versions(), "batch": BATCH, "seq": SEQ,
               "command": command_line("tools/bench_hml.py", argv).strip()}
    if args.json:
        keys = ("size", "dtype", "hml_ms", "ffn_ms", "ratio", "hml_params", "ffn_params")
        extra = ("n", "k", "d_l", "path", "hml_torch_ms", "ratio_torch", "hml_peak_mib", "ffn_peak_mib",
                 "ffn_tokens_timed", "floor_unique_ms", "floor_gathered_ms")
        print(json.dumps({**payload, "rows": [{k: r[k] for k in keys + extra if k in r} for r in rows]}))
    else:
        print(table(rows))
    if args.write_docs:
        write_docs(DOCS, payload, save_json(JSON, payload))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
