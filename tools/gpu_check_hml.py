#!/usr/bin/env python
"""One prepared CUDA check of the Head-wise Memory Layer: correctness + a timing run.

    python tools/gpu_check_hml.py            # exits 0 with a message when there is no CUDA
    python tools/gpu_check_hml.py --dry-run  # the same script on the CPU, to check the script itself before a GPU session

Runs on the GPU: (1) two-stage top-k == brute force incl. ties, (2) values and gradients vs the
dense reference of tests/test_hml.py (float64), (3) CPU vs CUDA agreement (float32), (4) bf16 and
autocast, and (printed) how much a sequence's output owes to the rest of its batch, beside the FFN's, (5) torch.compile (inductor) and no graph break, (6) fwd+bwd timing HML vs LlamaMLP at both bench sizes,
(7) the pure-torch path's variants side by side (sync-free vs tie-checked top-k, bank-gradient
methods, torch.compile) and a profile of one step, (8) the Triton kernels (top-k and the bag's weight
gradient, the CUDA default): the same selection, the same layer outputs and gradients (to float32
rounding), one graph compiled, their time against the pure-torch path's (MIDUS_HML_KERNELS=torch),
and a profile of one step on them.
(9) `train` under `accelerate launch` with an FSDP2 config on every GPU (two or more; one GPU has
nothing to shard) ends with the weights of a one-process run on the same batches.
(10) the fused Triton kernels (kernels "triton-fused", opt-in): the read selects exactly what the
pure-torch path selects on dyadic scores, its backward equals autograd through the pure-torch read,
a layer on them matches the default layer (fp32, and bf16 against its fp32 twin), one graph compiled;
then the layer's fwd+bwd on every path beside the FFN it replaces, at every bench_hml size, fp32 and
bf16, with the bytes-moved floors at this device's measured copy bandwidth; a profile of one step.
(11) the memory read at decode (gradients off, one new token for each of 1 and 16 rows): every path's output
against the pure-torch path's, then each path's time per call beside the FFN's, eager and replayed from a CUDA
graph (what a compiled decode runs), and the kernels one call launches; the fused read's decode-shaped kernel
against its 16-token blocks, alone.
With --json-out FILE the timing rows are also written as JSON (tools/gpu_session.sh does).
Sections 1-5 run on the CUDA default path.
``--skip 6,7`` leaves out timing sections (6, 7, 8, 10, 11) or the FSDP run (9) when device time is short; 1-5 always run.
Prints one line per check and a final OK / FAILED; exit status 1 on failure.
"""

from __future__ import annotations

import functools
import os
import sys
import time

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, os.path.join(ROOT, "tools"))


def main() -> int:
    import argparse

    ap = argparse.ArgumentParser(description="CUDA checks and timings of the Head-wise Memory Layer")
    ap.add_argument("--dry-run", action="store_true", help="run the same checks on the CPU (Triton through its interpreter)")
    ap.add_argument("--json-out", metavar="FILE", help="write section 10's timing rows to FILE as JSON")
    ap.add_argument("--skip", default="", help="comma-separated sections to leave out, of 6 (HML vs FFN times), "
                    "7 (the default path's variants and profile), 8 (the Triton kernels), 9 (FSDP), "
                    "10 (the fused Triton kernels), 11 (the read at decode)")
    args = ap.parse_args()
    try:
        skip = {int(v) for v in args.skip.split(",") if v.strip()}
    except ValueError:
        ap.error(f"--skip takes section numbers, got {args.skip!r}")
    if not skip <= {6, 7, 8, 9, 10, 11}:
        ap.error(f"--skip: only sections 6, 7, 8, 9, 10 and 11 can be left out, got {sorted(skip)}")
    dry_run = args.dry_run
    if not dry_run and not torch.cuda.is_available():
        print("gpu_check_hml: no CUDA device available; nothing to check (exit 0).")
        return 0
    if dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # section 8's Triton kernel then runs on CPU tensors
    from test_hml import brute_topk, dense_reference

    from midus_surgery.model.hml import HeadwiseMemory, HMLConfig, two_stage_topk

    dev = torch.device("cpu" if dry_run else "cuda")
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    card = torch.cuda.get_device_name() if dev.type == "cuda" else "CPU dry run"
    failures = []

    def check(name, cond):
        print(f"[{'ok' if cond else 'FAIL'}] {name}")
        if not cond:
            failures.append(name)

    # 1. lookup exactness with ties
    g = torch.Generator().manual_seed(0)
    for n, k in [(6, 3), (8, 8), (12, 7)]:
        s1 = torch.randint(-2, 3, (50, n), generator=g).float()
        s2 = torch.randint(-2, 3, (50, n), generator=g).float()
        sc, sl = two_stage_topk(s1.to(dev), s2.to(dev), k)
        bsc, bsl = brute_topk(s1, s2, k)
        check(f"two-stage top-k == brute force (n={n}, k={k}, ties)", torch.equal(sl.cpu(), bsl))

    # 2. values and grads vs dense reference, float64 on CUDA
    for kw in [dict(), dict(gate=True, output_proj="always", query_norm="layer"), dict(hive=False, gate=True),
               dict(bank_grad="embedding_bag"), dict(bank_grad="index_add")]:
        torch.manual_seed(0)
        cfg = HMLConfig(n_subkeys=6, topk=4, latent_dim=5, init="random", **kw)
        m = HeadwiseMemory(2, 8, 16, cfg).double().to(dev)
        x = torch.randn(3, 5, 2, 8, dtype=torch.float64, device=dev, requires_grad=True)
        out = m(x)
        gy = torch.randn_like(out)
        grads = torch.autograd.grad(out, [x] + list(m.parameters()), gy)
        params = {k: v.detach().clone().requires_grad_(True) for k, v in m.named_parameters()}
        x2 = x.detach().clone().requires_grad_(True)
        ref = dense_reference(m, x2, params)
        rgrads = torch.autograd.grad(ref, [x2] + list(params.values()), gy)
        ok = torch.allclose(out, ref, atol=1e-10) and all(
            torch.allclose(a, b, atol=1e-9, rtol=1e-7) for a, b in zip(grads, rgrads)
        )
        check(f"dense reference values+grads {kw}", ok)

    # 3. CPU vs CUDA, float32
    torch.manual_seed(0)
    cfg = HMLConfig(n_subkeys=64, topk=8, latent_dim=32, init="random", gate=True)
    m = HeadwiseMemory(4, 16, 64, cfg)
    x = torch.randn(2, 33, 4, 16)
    ref = m(x)
    mc = HeadwiseMemory(4, 16, 64, cfg).to(dev)
    mc.load_state_dict(m.state_dict())
    check("CPU == CUDA float32 (atol 1e-4)", torch.allclose(mc(x.to(dev)).cpu(), ref, atol=1e-4))

    # 4. bf16 + autocast
    mb = HeadwiseMemory(4, 16, 64, cfg).to(dev, torch.bfloat16)
    yb = mb(x.to(dev, torch.bfloat16))
    yb.float().sum().backward()
    check("bf16 forward/backward finite", torch.isfinite(yb.float()).all().item() and mb.keys.grad is not None)
    with torch.autocast(dev.type, dtype=torch.bfloat16):
        ya = mc(x.to(dev))
        wa, sa = mc.lookup(x.to(dev))
    w0, s0 = mc.lookup(x.to(dev))
    # the read ignores autocast (the same slots and weights); the gate, a Linear, runs in bf16 as every Linear does
    check("autocast cuda bf16: the same read as without it", torch.equal(sa, s0) and torch.equal(wa, w0))
    check("autocast cuda bf16: output within the gate's bf16 rounding", torch.allclose(ya, mc(x.to(dev)), rtol=3e-2, atol=3e-2))
    # backward() called inside autocast (as a training loop may do): the custom backwards must not be
    # recast to bf16 (CUDA's sparse addmm has no bf16 kernel) and must give the plain gradients.
    # Without the optional gate: it is a plain F.linear, whose backward autocast does recast.
    torch.manual_seed(0)
    mg = HeadwiseMemory(4, 16, 64, HMLConfig(n_subkeys=64, topk=8, latent_dim=32, init="random")).to(dev)
    xg = x.to(dev)
    plain = torch.autograd.grad(mg(xg).square().sum(), list(mg.parameters()))
    with torch.autocast(dev.type, dtype=torch.bfloat16):
        inside = torch.autograd.grad(mg(xg).square().sum(), list(mg.parameters()))
    check("backward inside autocast == plain gradients", all(torch.allclose(a, b, atol=1e-5) for a, b in zip(plain, inside)))

    batch_dependence(dev, card)

    # 5. torch.compile (inductor)
    torch._dynamo.reset()
    cm = torch.compile(mc)
    xc = x.to(dev).requires_grad_(True)
    mc.zero_grad()
    yc = cm(xc)
    yc.square().sum().backward()
    compiled_grads = [xc.grad] + [p.grad.clone() for p in mc.parameters()]
    xe = x.to(dev).requires_grad_(True)
    mc.zero_grad()
    ye = mc(xe)
    ye.square().sum().backward()
    eager_grads = [xe.grad] + [p.grad.clone() for p in mc.parameters()]
    check("torch.compile inductor matches eager (outputs and gradients)",
          torch.allclose(yc, ye, atol=1e-5) and all(torch.allclose(a, b, rtol=1e-4, atol=1e-5) for a, b in zip(compiled_grads, eager_grads)))
    # query_norm: batch trains its running statistics inside the forward: compiled, a backward that read a buffer the
    # same forward had updated in place took wrong query-path gradients (seen on CPU with aot_eager, 2026-12-07; the
    # update now assigns new tensors). Two training steps each, eager and inductor, fp32 and bf16: the second step
    # normalises with the statistics the first one moved, where the wrong gradients showed.
    # (off by their largest entry: inductor rounds otherwise, 8e-7 in fp32 on a CPU; the bug was 5e-2 to 3.7e-1 there)
    def off(a, b):
        return (a.float() - b.float()).abs().max().item() / max(a.float().abs().max().item(), 1e-30)

    for qn_dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 5e-2)):
        torch.manual_seed(0)
        qn_cfg = HMLConfig(n_subkeys=16, topk=4, latent_dim=16, init="random", query_norm="batch")
        eager_qn = HeadwiseMemory(4, 16, 64, qn_cfg).to(dev, qn_dtype).train()
        compiled_qn = HeadwiseMemory(4, 16, 64, qn_cfg).to(dev, qn_dtype).train()
        compiled_qn.load_state_dict(eager_qn.state_dict())
        torch._dynamo.reset()
        run_compiled = torch.compile(compiled_qn)
        same = True
        for step in range(2):
            xq = torch.randn(2, 33, 4, 16, generator=torch.Generator().manual_seed(step)).to(dev, qn_dtype)
            ge = torch.autograd.grad(eager_qn(xq).float().square().sum(), list(eager_qn.parameters()))
            gc = torch.autograd.grad(run_compiled(xq).float().square().sum(), list(compiled_qn.parameters()))
            same &= all(off(a, b) <= tol for a, b in zip(ge, gc))
        same &= all(off(a, b) <= tol for a, b in zip(eager_qn.buffers(), compiled_qn.buffers()))
        check(f"query_norm: batch, 2 training steps: inductor == eager to {tol:g} of the largest ({str(qn_dtype)[6:]}: gradients, "
              "running statistics)", same)
    # The layer must trace into one graph: every graph break is a return to Python in the middle of
    # the layer. Its backend is answered before compiling (prepare_kernels, as the trainer does).
    from midus_surgery.model.hml import backend_words, prepare_kernels

    backend = backend_words(prepare_kernels(mc, dev))
    torch._dynamo.reset()
    ex = torch._dynamo.explain(lambda t: mc(t).sum())(x.to(dev))
    check(f"the layer on the {backend} compiles into one graph ({ex.graph_count} graph(s), {ex.graph_break_count} break(s))",
          ex.graph_break_count == 0)

    # 6. timing
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    from bench_hml import SIZES, build, step_fn

    # the dry run only checks that the script works: a few tokens (a CPU without bf16 units takes minutes
    # for a bf16 FFN of the Llama size at 4 x 256)
    batch, seq = (1, 16) if dry_run else (4, 256)
    sizes = ["SmolLM2-135M recipe"] if dry_run else list(SIZES)  # one size runs the same code as all
    for size in sizes if 6 not in skip else []:
        for dtype in (torch.float32, torch.bfloat16):
            ffn, hml, _ = build(size, dtype)
            ffn, hml = ffn.to(dev), hml.to(dev)
            s = SIZES[size]
            xf = torch.randn(batch, seq, s["hidden"], dtype=dtype, device=dev, requires_grad=True)
            xh = torch.randn(batch, seq, s["heads"], s["head_dim"], dtype=dtype, device=dev, requires_grad=True)
            fs, hs = step_fn(ffn, xf), step_fn(hml, xh)
            res = {name: time_ms(fn, sync, dry_run) for name, fn in (("ffn", fs), ("hml", hs))}
            print(f"[time] {size} {str(dtype)[6:]}: hml {res['hml']:.2f} ms, ffn {res['ffn']:.2f} ms, "
                  f"ratio {res['hml'] / res['ffn']:.2f}  ({card})")

    if 7 not in skip:
        time_variants(dev, sync, card, dry_run)
    if 8 not in skip:
        check_triton(dev, sync, card, dry_run, check)
    if 9 not in skip:
        check_fsdp(dry_run, check)
    if 10 not in skip:
        check_fused(dev, sync, card, dry_run, check, args.json_out)
    if 11 not in skip:
        time_decode_read(dev, sync, card, dry_run, check)

    print("OK" if not failures else f"FAILED: {failures}")
    return 1 if failures else 0


def batch_dependence(dev, card) -> None:
    """What a sequence's output owes to the rest of its batch on this device: the largest difference between a 90-token
    sequence read alone and as one row of a batch of 2 and of 4, for the memory layer on the default path and for the
    FFN it replaces (a stock layer's own batch dependence, the yardstick), fp32 and bf16. Printed, not checked: cuBLAS
    promises no batch invariance (on a CPU the layer and the FFN give the same bits, tests/test_hml_kernels.py)."""
    from bench_hml import SIZES, build

    size = "SmolLM2-135M recipe"
    s = SIZES[size]
    for dtype in (torch.float32, torch.bfloat16):
        ffn, hml, _ = build(size, dtype)
        ffn, hml = ffn.to(dev).eval(), hml.to(dev).eval()
        g = torch.Generator().manual_seed(0)
        rows = torch.randn(4, 90, s["heads"], s["head_dim"], generator=g).to(dev, dtype)
        hidden = torch.randn(4, 90, s["hidden"], generator=g).to(dev, dtype)
        words = []
        for name, layer, x in (("memory layer", hml, rows), ("FFN", ffn, hidden)):
            with torch.no_grad():
                alone = layer(x[:1])[0].float()
                diffs = [float((layer(x[:b])[0].float() - alone).abs().max()) for b in (2, 4)]
            words.append(f"{name} {diffs[0]:.3g} / {diffs[1]:.3g}")
        print(f"[info] a sequence alone vs in a batch of 2 / 4, max |difference| {str(dtype)[6:]}: {', '.join(words)}  ({card})")


def check_fsdp(dry_run: bool, check) -> None:
    """9. `accelerate launch` with an FSDP2 config over every GPU (the dry run: 2 CPU processes over
    gloo) trains a tiny MIDUS model to the weights one process reaches on the same batches."""
    import subprocess
    import tempfile
    from pathlib import Path

    from ecosystem_check import make_models
    from safetensors.torch import load_file
    from train_fixtures.tiny import write_config, write_corpus

    procs = 2 if dry_run else torch.cuda.device_count()
    if procs < 2:
        print(f"[skip] FSDP: {procs} GPU, nothing to shard (needs two or more)")
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = make_models(root)["shared"]
        write_corpus(root / "corpus", files=2, sentences_per_file=60)
        extra = {"eval.at_start": False, "memory.lr": 1e-2, "precision": "fp32"}
        configs = {name: write_config(root / f"{name}.yaml", model, root / name, root / "corpus", root / "cache", tokens=16 * 8 * 4,
                                      micro_batch_size=mbs, **extra) for name, mbs in (("fsdp", 16 // procs), ("single", 16))}
        (root / "fsdp_config.yaml").write_text(
            f"distributed_type: FSDP\nnum_machines: 1\nnum_processes: {procs}\nuse_cpu: {str(dry_run).lower()}\n"
            "fsdp_config:\n  fsdp_version: 2\n  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP\n"
            "  fsdp_state_dict_type: SHARDED_STATE_DICT\n  fsdp_cpu_ram_efficient_loading: false\n")
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
        launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(root / "fsdp_config.yaml"),
                  "--main_process_port", "29551", "-m", "midus_surgery.cli", "train", str(configs["fsdp"]), "--quiet"]
        sharded = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=600)
        single = subprocess.run([sys.executable, "-m", "midus_surgery.cli", "train", str(configs["single"]), "--quiet"],
                                env=env, capture_output=True, text=True, timeout=600)
        ran = sharded.returncode == 0 and single.returncode == 0 and "FSDP (" in sharded.stdout
        if not ran:
            print((sharded.stdout + sharded.stderr)[-2000:], (single.stdout + single.stderr)[-1000:])
        same = ran and _same_weights(load_file, root / "fsdp" / "final", root / "single" / "final")
        check(f"FSDP2 over {procs} {'CPU processes (gloo)' if dry_run else 'GPUs'} == one process (weights, shared bank)", bool(same))


def _same_weights(load_file, a_dir, b_dir) -> bool:
    a = {k: v for f in sorted(a_dir.glob("*.safetensors")) for k, v in load_file(f).items()}
    b = {k: v for f in sorted(b_dir.glob("*.safetensors")) for k, v in load_file(f).items()}
    return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-5) for k in a)


def time_ms(fn, sync, dry_run: bool) -> float:
    """Mean ms of one call after warm-up, the device synchronised at both ends."""
    warm, reps = (0, 1) if dry_run else (3, 20)  # the dry run only checks that the script works (one call: the interpreter is slow)
    for _ in range(warm):
        fn()
    sync()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    sync()
    return (time.perf_counter() - t) / reps * 1e3


def time_variants(dev, sync, card, dry_run: bool) -> None:
    """7. Where the layer's CUDA time goes: the bundled recipe's HML (query_source heads, n=128,
    k=32, d_l=64) fwd+bwd at 4x256 and 16x1024 tokens, on the pure-torch path (section 8 times the
    Triton kernels against it): its default against one change each: the tie-checked top-k (a
    device-to-host sync per stage), the other bank-gradient methods, torch.compile.  Then the
    profiler's top ops and the host syncs of one default step."""
    from bench_hml import SIZES, step_fn

    from midus_surgery.model import hml as hml_mod
    from midus_surgery.model.hml import HeadwiseMemory, HMLConfig

    s = SIZES["SmolLM2-135M recipe"]
    H, dh = s["heads"], s["head_dim"]

    def recipe_layer(bank_grad: str = "auto") -> HeadwiseMemory:  # on the pure-torch path
        torch.manual_seed(0)
        cfg = HMLConfig(n_subkeys=s["n"], topk=s["k"], latent_dim=s["d_l"], init="random", bank_grad=bank_grad,
                        kernels="torch")
        return HeadwiseMemory(H, dh, s["hidden"], cfg).to(dev)

    variants = {
        "default": dict(),
        "tie-checked topk (sync)": dict(sync_topk=True),
        "bank_grad sparse_mm": dict(bank_grad="sparse_mm"),
        "bank_grad embedding_bag": dict(bank_grad="embedding_bag"),
        "bank_grad index_add": dict(bank_grad="index_add"),
        "torch.compile": dict(compile=True),
    }
    sync_free = hml_mod._sync_free_topk
    batches = [(1, 16)] if dry_run else [(4, 256), (16, 1024)]
    for b, t in batches:
        for dtype in (torch.float32, torch.bfloat16):
            res = {}
            for name, v in variants.items():
                if v.get("compile") and dtype != torch.float32:
                    continue  # one compiled row is enough to see whether fusion pays
                m = recipe_layer(v.get("bank_grad", "auto")).to(dtype)
                mod = torch.compile(m) if v.get("compile") else m
                x = torch.randn(b, t, H, dh, dtype=dtype, device=dev, requires_grad=True)
                fn = step_fn(mod, x)
                hml_mod._sync_free_topk = (lambda values: False) if v.get("sync_topk") else sync_free
                try:
                    res[name] = time_ms(fn, sync, dry_run)
                finally:
                    hml_mod._sync_free_topk = sync_free
                    torch._dynamo.reset()
            base = res["default"]
            print(f"[variants] {b}x{t} {str(dtype)[6:]} ({card}): " +
                  ", ".join(f"{k} {v:.2f} ms ({v / base:.2f}x)" for k, v in res.items()))
    # one default step under the profiler, at the larger batch
    b, t = batches[-1]
    x = torch.randn(b, t, H, dh, device=dev, requires_grad=True)
    profile_step(step_fn(recipe_layer(), x), dev, sync, f"one pure-torch fwd+bwd, {b}x{t} float32")


def profile_step(fn, dev, sync, what: str) -> None:
    """The profiler's top ops of one call of ``fn`` (after a warm-up call), and its host syncs."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    sync()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=acts) as prof:
        fn()
        sync()
    key = "self_device_time_total" if dev.type == "cuda" else "self_cpu_time_total"
    print(f"[profile] {what}, top ops by {key}:")
    ops = prof.key_averages()
    print(ops.table(sort_by=key, row_limit=15, max_name_column_width=60))
    syncs = [e for e in ops if e.key in ("cudaStreamSynchronize", "cudaDeviceSynchronize",
                                         "cudaMemcpyAsync", "aten::item", "aten::_local_scalar_dense")]
    print("[profile] host syncs and copies: " + (", ".join(f"{e.key} x{e.count}" for e in syncs) or "none"))


def check_triton(dev, sync, card, dry_run: bool, check) -> None:
    """8. The Triton kernels (kernels/hml_triton.py, the CUDA default): the top-k exact against the
    pure-torch selection, the bag's weight gradient against PyTorch's, a layer on them equal to the
    pure-torch layer, one graph under torch.compile, times side by side and a profile of one step."""
    try:
        from midus_surgery.kernels import hml_triton
    except ImportError as exc:
        check(f"triton importable for the Triton kernels ({exc})", False)
        return
    from bench_hml import SIZES, step_fn

    from midus_surgery.model import hml as hml_mod
    from midus_surgery.model.hml import HeadwiseMemory, HMLConfig, _two_stage_topk, candidate_pairs

    s = SIZES["SmolLM2-135M recipe"]
    H, dh = s["heads"], s["head_dim"]
    n, k = (16, 4) if dry_run else (s["n"], s["k"])  # the interpreter is slow: a small layer for the dry run
    g = torch.Generator().manual_seed(0)
    for name, table in (("random", torch.randn(2, H, 512 if not dry_run else 8, n, generator=g)),
                        ("small-int ties", torch.randint(-2, 3, (2, H, 64 if not dry_run else 8, n), generator=g).float())):
        a, b = table.to(dev).unbind(0)
        rsc, rsl = _two_stage_topk(torch.stack((a, b)), k)
        for compact in (False, True):
            sc, i, j = hml_triton.topk2(a, b, k, candidate_pairs(k, a.device), compact=compact)
            check(f"triton top-k == pure-torch selection ({name}, n={n}, k={k}{', compact' if compact else ''})",
                  torch.equal(i * n + j, rsl) and torch.equal(sc, rsc))

    def layer(kernels: str) -> HeadwiseMemory:
        torch.manual_seed(0)
        cfg = HMLConfig(n_subkeys=n, topk=k, latent_dim=s["d_l"], init="random", kernels=kernels)
        return HeadwiseMemory(H, dh, s["hidden"], cfg).to(dev)

    # the bag's weight gradient: the Triton gather-dot against PyTorch's per-sample-weights backward
    for dtype in (torch.float32, torch.bfloat16):
        B, kk, d = (64, 4, 8) if dry_run else (4096 * H, k, s["d_l"])
        table = torch.randn(n * n, d, generator=g).to(dev, dtype)
        dz = torch.randn(B, d, generator=g).to(dev, dtype)
        idx = torch.randint(0, n * n, (B, kk), generator=g).to(dev)
        dw = hml_triton.bag_dw(dz, table, idx)
        ref = psw_backward(table, idx)(dz.float(), table.float())
        check(f"triton bag dw == per-sample-weights backward ({str(dtype)[6:]}, B={B}, k={kk}, d={d}; max diff "
              f"{(dw - ref).abs().max().item():.1e})", torch.allclose(dw, ref, rtol=1e-5, atol=1e-5))

    from midus_surgery import kernels

    real_kernel = kernels.triton_kernel

    def on_triton(flag: bool, square: bool = False) -> str:
        """The kernels a layer is told to use: the Triton ones (the CUDA default; on CPU tensors under
        the dry run's interpreter) or the pure-torch path (not the CPU's compiled kernels);
        ``square``: the top-k ranks the masked k x k square instead of the compact candidate list."""
        kernels.triton_kernel = (lambda name: functools.partial(hml_triton.topk2, compact=False) if name == "topk2"
                                 else real_kernel(name)) if square else real_kernel
        return "triton" if flag else "torch"

    m = layer("torch")
    x = torch.randn(2, 64 if not dry_run else 4, H, dh, device=dev)
    results = {}
    for flag in (False, True):
        hml_mod.use_kernels(m, on_triton(flag))
        check(f"the layer runs on {hml_mod.backend_words(m.backend(dev))}", m.backend(dev) == ("triton" if flag else "torch"))
        xi = x.clone().requires_grad_(True)
        m.zero_grad()
        out = m(xi)
        out.square().sum().backward()
        results[flag] = [out.detach(), xi.grad] + [p.grad.clone() for p in m.parameters()]
    check("a layer on the triton kernels == the default layer (outputs identical, gradients to float32 rounding)",
          torch.equal(results[True][0], results[False][0])
          and all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(results[True][1:], results[False][1:])))
    if dev.type == "cuda":
        hml_mod.use_kernels(m, on_triton(True))
        torch._dynamo.reset()
        try:
            ex = torch._dynamo.explain(lambda t: m(t).sum())(x)
            check(f"the layer on the triton kernels compiles into one graph ({ex.graph_count} graph(s), "
                  f"{ex.graph_break_count} break(s))", ex.graph_break_count == 0)
        except Exception as exc:
            check(f"the layer on the triton kernels traces ({type(exc).__name__}: {str(exc).strip()[:300]})", False)
        torch._dynamo.reset()

    # times: the selection alone, then the layer's fwd+bwd, the pure-torch path against triton (and both compiled)
    batches = [(1, 16)] if dry_run else [(4, 256), (16, 1024)]
    for b, t in batches:
        a = torch.randn(H, b * t, n, device=dev)
        bb = torch.randn(H, b * t, n, device=dev)
        sel = {"torch.topk path": lambda: _two_stage_topk(torch.stack((a, bb)), k),
               "triton": lambda: hml_triton.topk2(a, bb, k, candidate_pairs(k, a.device)),
               "triton square": lambda: hml_triton.topk2(a, bb, k, candidate_pairs(k, a.device), compact=False)}
        res = {name: time_ms(fn, sync, dry_run) for name, fn in sel.items()}
        print(f"[triton] selection alone {b}x{t} ({card}): " + ", ".join(f"{kk} {v:.3f} ms" for kk, v in res.items())
              + f"; triton/torch {res['triton'] / res['torch.topk path']:.2f}x, square/torch "
              f"{res['triton square'] / res['torch.topk path']:.2f}x")
        for dtype in (torch.float32, torch.bfloat16):
            table = torch.randn(n * n, s["d_l"], device=dev, dtype=dtype)
            dz = torch.randn(H * b * t, s["d_l"], device=dev, dtype=dtype)
            idx = torch.randint(0, n * n, (H * b * t, k), device=dev)
            # the pure-torch path casts a bf16 bank and dz to float32 first: that copy is part of its cost
            psw = psw_backward(table, idx)
            res = {"per-sample-weights backward": time_ms(lambda: psw(dz.float(), table.float()), sync, dry_run),
                   "triton": time_ms(lambda: hml_triton.bag_dw(dz, table, idx), sync, dry_run)}
            print(f"[triton] bag dw alone {b}x{t} {str(dtype)[6:]} ({card}): "
                  + ", ".join(f"{kk} {v:.3f} ms" for kk, v in res.items())
                  + f"; triton/torch {res['triton'] / res['per-sample-weights backward']:.2f}x")
        # the small weights' gradients (keys, projection): one batched GEMM against the token dimension in pieces
        # the float32 rule's cut, or 2 where it keeps one GEMM (to keep showing why); the CPU answers 1: the dry run cuts
        pieces = 2 if dry_run else max(2, hml_mod._k_chunks(b * t, dev))
        for what, (rows, cols), dtype in (("keys", (n, dh // 2), torch.float32), ("projection", (s["d_l"], dh), torch.float32),
                                          ("projection", (s["d_l"], dh), torch.bfloat16)):
            batch = 2 * H if what == "keys" else H
            lhs = torch.randn(batch, b * t, rows, device=dev, dtype=dtype).transpose(1, 2)  # [B, M, K], as the layer's views
            rhs = torch.randn(b * t, batch, cols, device=dev, dtype=dtype).transpose(0, 1)  # [B, K, N]
            one, cut = torch.bmm(lhs, rhs), hml_mod._weight_grad_bmm(lhs, rhs, pieces)
            tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
            check(f"{what} gradient in {pieces} pieces == one GEMM ({b}x{t} {str(dtype)[6:]}; max rel diff "
                  f"{((cut.float() - one.float()).abs().max() / one.float().abs().max()).item():.1e})",
                  torch.allclose(cut.float(), one.float(), rtol=tol, atol=tol * one.float().abs().max().item()))
            res = {"one GEMM": time_ms(lambda: torch.bmm(lhs, rhs), sync, dry_run),
                   f"{pieces} pieces": time_ms(lambda: hml_mod._weight_grad_bmm(lhs, rhs, pieces), sync, dry_run)}
            print(f"[triton] {what} gradient alone {b}x{t} {str(dtype)[6:]} [{batch}, {rows}, {b * t}] @ [{batch}, {b * t}, "
                  f"{cols}] ({card}): " + ", ".join(f"{kk} {v:.3f} ms" for kk, v in res.items())
                  + f"; pieces/one {res[f'{pieces} pieces'] / res['one GEMM']:.2f}x")
        real_chunks = hml_mod._k_chunks
        for dtype in (torch.float32, torch.bfloat16):
            res = {}
            for name, flag, square, compiled in (("torch path", False, False, False), ("triton", True, False, False),
                                                 ("triton, weight grads as one GEMM", True, False, False),
                                                 ("triton square", True, True, False), ("torch path compiled", False, False, True),
                                                 ("triton compiled", True, False, True)):
                if compiled and (dry_run or dtype != torch.float32):
                    continue
                mm = layer(on_triton(flag, square)).to(dtype)
                xx = torch.randn(b, t, H, dh, dtype=dtype, device=dev, requires_grad=True)
                if "one GEMM" in name:  # what ran before the split: the A/B of the two layers
                    hml_mod._k_chunks = lambda tokens, device, dtype=None: 1
                try:
                    res[name] = time_ms(step_fn(torch.compile(mm) if compiled else mm, xx), sync, dry_run)
                except Exception as exc:  # one failed variant must not cost the rest of the session's timings
                    check(f"layer fwd+bwd {name} {b}x{t} {str(dtype)[6:]} runs ({type(exc).__name__}: "
                          f"{str(exc).strip().splitlines()[-1][:300] if str(exc).strip() else ''})", False)
                finally:
                    hml_mod._k_chunks = real_chunks
                    torch._dynamo.reset()
            print(f"[triton] layer fwd+bwd {b}x{t} {str(dtype)[6:]} ({card}): "
                  + ", ".join(f"{kk} {v:.2f} ms ({v / res['torch path']:.2f}x)" for kk, v in res.items()))
    # where the time goes now: one step on the Triton kernels under the profiler, at the larger batch
    b, t = batches[-1]
    xx = torch.randn(b, t, H, dh, device=dev, requires_grad=True)
    profile_step(step_fn(layer(on_triton(True)), xx), dev, sync, f"one fwd+bwd on the Triton kernels, {b}x{t} float32")
    xx = torch.randn(b, t, H, dh, device=dev, dtype=torch.bfloat16, requires_grad=True)
    profile_step(step_fn(layer(on_triton(True)).to(torch.bfloat16), xx), dev, sync,
                 f"one fwd+bwd on the Triton kernels, {b}x{t} bfloat16")
    kernels.triton_kernel = real_kernel


def check_fused(dev, sync, card, dry_run: bool, check, json_out=None) -> None:
    """10. The fused Triton kernels ("triton-fused"): correctness first, then every path's time beside
    the FFN with the bytes-moved floors (bench_hml.traffic at the measured copy bandwidth)."""
    import json

    try:
        from midus_surgery.kernels import hml_triton
    except ImportError as exc:
        check(f"triton importable for the fused kernels ({exc})", False)
        return
    from bench_hml import SIZES, build, copy_gb_per_s, step_fn, traffic

    from midus_surgery.model import hml as hml_mod
    from midus_surgery.model.hml import HeadwiseMemory, HMLConfig, candidate_pairs

    g = torch.Generator().manual_seed(0)
    s = SIZES["SmolLM2-135M recipe"]
    H, dh = s["heads"], s["head_dim"]
    n, k, dl, T = (16, 4, 8, 24) if dry_run else (s["n"], s["k"], s["d_l"], 2048)
    # dyadic scores: exact in float32 in any summation order, so the selection must match to the slot
    q = (torch.randint(-3, 4, (T, H, dh), generator=g).float() / 4).to(dev)
    keys = (torch.randint(-3, 4, (H, 2, n, dh // 2), generator=g).float() / 4).to(dev)
    table = torch.randn(n * n, dl, generator=g).to(dev)
    ref = [t.clone().requires_grad_() for t in (q, keys, table)]
    rw, rslots = hml_mod._Lookup.apply(ref[0], ref[1], k, "torch")
    rz = (rw[..., None] * ref[2][rslots]).sum(-2)
    w, i, j, z = hml_triton.memory_forward(q, keys, table, k, 0, candidate_pairs(k, dev))
    check(f"fused read selects the pure-torch slots (dyadic scores with ties, T={T}, n={n}, k={k})", torch.equal(i * n + j, rslots))
    check(f"fused read pools the pure-torch z (max diff {(z - rz).abs().max().item():.1e})", torch.allclose(z, rz, rtol=1e-5, atol=1e-5))
    dz = torch.randn(H, T, dl, generator=g).to(dev)
    rgrads = torch.autograd.grad(rz, ref, dz)
    for atomic in (False, True):
        dq, dkeys, dtable = hml_triton.memory_backward(dz, q, keys, table, w, i, j, 0, atomic)
        ok = torch.allclose(dq, rgrads[0], rtol=1e-4, atol=1e-4) and torch.allclose(dkeys, rgrads[1], rtol=1e-4, atol=1e-3)
        if atomic:
            ok = ok and torch.allclose(dtable, rgrads[2], rtol=1e-4, atol=1e-4)
        check(f"fused backward == autograd through the pure-torch read ({'atomic table' if atomic else 'deterministic'})", bool(ok))
    # the sort-free segment reduce of the bank's gradient: the same gradient, the same bits on every launch
    idx_flat, w_flat, dz_flat = (i * n + j).view(H * T, k), w.view(H * T, k), dz.view(H * T, dl)
    order, _, _ = hml_triton.segment_order(idx_flat, n * n)
    check("segment_order is the stable argsort by row", torch.equal(order.long(), torch.argsort(idx_flat.view(-1), stable=True)))
    hot = idx_flat.clone()
    hot[::2, 0] = 0  # half the bags on one row: long runs within a vector and across blocks
    used = sorted({hml_triton.segment_blocks(hot.numel(), n * n, b_)[0] for b_ in (1, 7, 256, 1024)})
    check(f"segment_order is the stable argsort by row with a hot row, for {', '.join(map(str, used))} counting blocks",
          all(torch.equal(hml_triton.segment_order(hot, n * n, b_)[0].long(), torch.argsort(hot.view(-1), stable=True))
              for b_ in (1, 7, 256, 1024)))
    seg = hml_triton.segment_bank_grad(dz_flat, idx_flat, w_flat, n * n)
    check(f"segment bank gradient == autograd's (max diff {(seg - rgrads[2]).abs().max().item():.1e})",
          torch.allclose(seg, rgrads[2], rtol=1e-4, atol=1e-4))
    used = sorted({hml_triton.segment_blocks(idx_flat.numel(), n * n, b_)[0] for b_ in (1, 7, 256)})
    check(f"segment bank gradient: the same bits for {', '.join(map(str, used))} counting blocks",
          all(torch.equal(hml_triton.segment_bank_grad(dz_flat, idx_flat, w_flat, n * n, blocks=b_), seg) for b_ in (1, 7, 256)))

    def layer(kernels: str, dtype=torch.float32, size="SmolLM2-135M recipe", **kw) -> HeadwiseMemory:
        z_ = SIZES[size]
        torch.manual_seed(0)
        cfg = HMLConfig(n_subkeys=z_["n"] if not dry_run else 16, topk=z_["k"] if not dry_run else 4,
                        latent_dim=z_["d_l"] if not dry_run else 8, init="random", kernels=kernels, **kw)
        return HeadwiseMemory(z_["heads"], z_["head_dim"], z_["hidden"], cfg).to(dev, dtype)

    x = torch.randn(2, 64 if not dry_run else 4, H, dh, device=dev)
    for kw in (dict(), dict(hive=False), dict(bank_grad="index_add"), dict(bank_grad="segment"), dict(bank_grad="segment", hive=False)):
        results = {}
        for kernels in ("torch", "triton-fused") + (("triton",) if kw.get("bank_grad") == "segment" else ()):
            m = layer(kernels, **kw)
            xi = x.clone().requires_grad_(True)
            out = m(xi)
            out.square().sum().backward()
            results[kernels] = [out.detach(), xi.grad] + [p.grad.clone() for p in m.parameters()]
        for path in [p_ for p_ in results if p_ != "torch"]:
            a, b = results[path], results["torch"]
            on = "the fused kernels" if path == "triton-fused" else "the triton kernels"
            check(f"a layer on {on} == the pure-torch layer {kw} (outputs max diff {(a[0] - b[0]).abs().max().item():.1e})",
                  all(torch.allclose(u, v, rtol=1e-4, atol=1e-5) for u, v in zip(a, b)))
    m32, m16, t16 = layer("triton-fused"), layer("triton-fused", torch.bfloat16), layer("torch", torch.bfloat16)
    y16 = m16(x.to(torch.bfloat16).requires_grad_(True))
    y16.float().square().sum().backward()
    r16 = t16(x.to(torch.bfloat16))  # the same bf16 layer on the pure-torch path: the same float32 scores
    check(f"bf16 layer on the fused kernels: finite, == the bf16 pure-torch layer to bf16 rounding (max diff "
          f"{(y16.float() - r16.float()).abs().max().item():.1e})",
          bool(torch.isfinite(y16.float()).all()) and m16.keys.grad is not None
          and torch.allclose(y16.float(), r16.float(), rtol=2e-2, atol=2e-2))
    if dev.type == "cuda":
        torch._dynamo.reset()
        try:
            ex = torch._dynamo.explain(lambda t: m32(t).sum())(x)
            check(f"the layer on the fused kernels compiles into one graph ({ex.graph_count} graph(s), {ex.graph_break_count} break(s))",
                  ex.graph_break_count == 0)
        except Exception as exc:
            check(f"the layer on the fused kernels traces ({type(exc).__name__}: {str(exc).strip()[:300]})", False)
        torch._dynamo.reset()

    # times: every path of the layer beside the FFN it replaces, with the bytes floors
    gbps = copy_gb_per_s(dev, 16 if dry_run else 1024)
    print(f"[fused] measured copy bandwidth {gbps:.0f} GB/s ({card})")
    rows, bank_rows = [], []

    def save():  # after every row: a step cut by its time limit keeps the rows it finished
        if json_out:
            with open(json_out, "w") as fh:
                json.dump({"device": card, "torch": torch.__version__, "rows": rows, "bank_grad_rows": bank_rows}, fh, indent=1)

    # the bank's gradient alone, at the targets' size: PyTorch's sorted embedding-bag backward (the deterministic
    # default), the segment reduce, and float atomics (index_add_), from the same slots and dz
    for size in (["SmolLM2-135M recipe"] if dry_run else ["SmolLM2-135M recipe", "Llama-3.2-1B"]):
        z_ = SIZES[size]
        hh, nn_, kk, dd = (z_["heads"], 16, 4, 8) if dry_run else (z_["heads"], z_["n"], z_["k"], z_["d_l"])
        bags_ = hh * (16 if dry_run else 16 * 1024)
        gidx = torch.randint(0, nn_ * nn_, (bags_, kk), device=dev)
        gw = torch.rand(bags_, kk, device=dev)
        gdz = torch.randn(bags_, dd, device=dev)
        off = torch.arange(0, bags_ * kk, kk, device=dev)
        o2b = torch.arange(bags_, device=dev).repeat_interleave(kk)
        sizes_ = torch.full((bags_,), kk, dtype=torch.long, device=dev)
        none_ = torch.empty(0, dtype=torch.long, device=dev)
        brow = {"size": size, "bags": bags_, "k": kk, "d": dd,
                "embedding_bag ms": time_ms(lambda: torch.ops.aten._embedding_bag_backward(
                    gdz, gidx.view(-1), off, o2b, sizes_, none_, nn_ * nn_, False, 0, False, gw.view(-1), -1), sync, dry_run),
                "segment ms": time_ms(lambda: hml_triton.segment_bank_grad(gdz, gidx, gw, nn_ * nn_), sync, dry_run),
                # more counting blocks: shorter serial placement chains, a larger [rows, blocks] table to scan
                "segment 1024 blocks ms": time_ms(lambda: hml_triton.segment_bank_grad(gdz, gidx, gw, nn_ * nn_, blocks=1024),
                                                  sync, dry_run),
                "blocks": hml_triton.segment_blocks(bags_ * kk, nn_ * nn_)[0],
                "wide blocks": hml_triton.segment_blocks(bags_ * kk, nn_ * nn_, 1024)[0],
                "atomic ms": time_ms(lambda: torch.zeros(nn_ * nn_, dd, device=dev).index_add_(
                    0, gidx.view(-1), (gw[:, :, None] * gdz[:, None, :]).view(-1, dd)), sync, dry_run)}
        bank_rows.append(brow)
        save()
        print(f"[fused] bank gradient alone, {size}, {bags_} bags of {kk} ({card}): embedding_bag backward "
              f"{brow['embedding_bag ms']:.3f} ms, segment {brow['segment ms']:.3f} ms at {brow['blocks']} counting blocks "
              f"({brow['segment ms'] / brow['embedding_bag ms']:.2f}x; asked for 1024 counting blocks, at {brow['wide blocks']}: "
              f"{brow['segment 1024 blocks ms']:.3f} ms), index_add atomics {brow['atomic ms']:.3f} ms")
        gidx = gw = gdz = None  # free the GPU memory before the next size (a del reads to linters as a name the lambdas lose)

    batches = [(1, 16)] if dry_run else [(4, 256), (16, 1024)]
    # the bank-gradient method pinned per column (auto takes segment for wide rows at many tokens, which would
    # make two columns one there): the sorted embedding-bag backward, the segment reduce, the atomics
    paths = {"torch": dict(), "triton": dict(bank_grad="embedding_bag"), "triton segment": dict(bank_grad="segment"),
             "triton-fused": dict(bank_grad="embedding_bag"), "triton-fused segment": dict(bank_grad="segment"),
             "triton-fused atomic": dict(bank_grad="index_add")}
    grid = [(size, b_, t_, dtype) for size in (["SmolLM2-135M recipe"] if dry_run else list(SIZES))
            for b_, t_ in batches for dtype in (torch.float32, torch.bfloat16)]
    # the targets' rows (16 x 1024 bf16; then fp32) first, the recipe's size before Llama's, so a session cut
    # short by its time limit has timed them
    order_ = ["SmolLM2-135M recipe", "Llama-3.2-1B"]
    grid.sort(key=lambda g_: ((g_[1], g_[2]) != batches[-1], g_[3] != torch.bfloat16,
                              order_.index(g_[0]) if g_[0] in order_ else len(order_)))
    for size, b_, t_, dtype in grid:
        z_ = SIZES[size]
        ffn, _, _ = build(size, dtype)
        ffn = ffn.to(dev)
        xf = torch.randn(b_, t_, z_["hidden"], dtype=dtype, device=dev, requires_grad=True)
        row = {"size": size, "tokens": b_ * t_, "batch": f"{b_}x{t_}", "dtype": str(dtype)[6:],
               "ffn_ms": time_ms(step_fn(ffn, xf), sync, dry_run)}
        del ffn
        for name, kw in paths.items():
            mm = layer(name.split()[0], dtype, size, **kw)
            xx = torch.randn(b_, t_, z_["heads"], z_["head_dim"], dtype=dtype, device=dev, requires_grad=True)
            try:
                row[f"{name} ms"] = time_ms(step_fn(mm, xx), sync, dry_run)
            except Exception as exc:  # one failed path must not cost the session's other rows
                check(f"layer fwd+bwd {name} {size} {b_}x{t_} {row['dtype']} runs ({type(exc).__name__}: "
                      f"{str(exc).strip().splitlines()[-1][:300] if str(exc).strip() else ''})", False)
            del mm
        bytes_ = traffic(size, b_ * t_, dtype)
        row |= {"unique_floor_ms": bytes_["unique"] / gbps / 1e6, "gathered_floor_ms": bytes_["gathered"] / gbps / 1e6,
                "bank_mb": bytes_["bank"] / 1e6, "copy_gbps": gbps}
        rows.append(row)
        times = ", ".join(f"{p_} {row[p_ + ' ms']:.2f} ms ({row[p_ + ' ms'] / row['ffn_ms']:.2f}x FFN)"
                          for p_ in paths if p_ + " ms" in row)
        print(f"[fused] {size} {row['batch']} {row['dtype']} ({card}): FFN {row['ffn_ms']:.2f} ms; {times}; "
              f"floor: unique bytes {row['unique_floor_ms']:.3f} ms, gathered rows at memory bandwidth "
              f"{row['gathered_floor_ms']:.3f} ms (bank {row['bank_mb']:.0f} MB)")
        save()
    b_, t_ = batches[-1]
    xx = torch.randn(b_, t_, H, dh, device=dev, dtype=torch.bfloat16, requires_grad=True)
    profile_step(step_fn(layer("triton-fused", torch.bfloat16), xx), dev, sync, f"one fwd+bwd on the fused kernels, {b_}x{t_} bfloat16")


def graph_us(fn, calls: int = 20, replays: int = 20) -> float:
    """Microseconds of one call of ``fn`` replayed from a CUDA graph that captured ``calls`` calls back to back (what
    a compiled decode step runs: no host work per operator, only the kernels and the gaps between them)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture stream, as torch.cuda.graphs asks
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(replays):
        graph.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / (replays * calls) * 1e6


def launched(fn, dev) -> list[str]:
    """The kernels one call of ``fn`` launches on CUDA (the top-level aten operators it runs on the CPU dry run)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    if dev.type == "cuda":
        fn()  # warm: the first call may compile or allocate
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=acts) as prof:
        fn()
        if dev.type == "cuda":
            torch.cuda.synchronize()
    if dev.type == "cuda":
        return [e.name for e in prof.events() if e.device_type == DeviceType.CUDA]
    return [e.name for e in prof.events() if e.name.startswith("aten::") and e.cpu_parent is None]


def time_decode_read(dev, sync, card, dry_run: bool, check) -> None:
    """11. The memory read at decode, the step `tools/bench_decode.py` times whole: gradients off, one new token for
    each of 1 and 16 rows, the recipe's size. On an H200 (2026-12-04) a compiled decode step spent 60-73 us more in
    each Memory block than in a block with an FFN; this says which path and which kernels that is. Every path's
    output against the pure-torch path's first, then each path's microseconds per call beside the FFN's, eager and
    replayed from a CUDA graph (the compiled decode), and the kernels one call launches."""
    from bench_hml import SIZES
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    from midus_surgery.model.hml import HeadwiseMemory, HMLConfig

    z_ = SIZES["SmolLM2-135M recipe"]
    # the dry run checks the script: a tiny layer in float32 (Triton's interpreter takes seconds a call at full size)
    size, H, dh, hidden, inner, n, k, dl = (
        ("tiny (dry run)", 2, 16, 32, 64, 16, 4, 8) if dry_run
        else ("SmolLM2-135M recipe", z_["heads"], z_["head_dim"], z_["hidden"], z_["ffn"], z_["n"], z_["k"], z_["d_l"]))
    paths = ("torch", "triton", "triton-fused")
    for dtype in (torch.float32,) if dry_run else (torch.bfloat16, torch.float32):
        torch.manual_seed(0)
        ffn = LlamaMLP(LlamaConfig(hidden_size=hidden, intermediate_size=inner)).to(dev, dtype).eval()
        layers = {}
        for p_ in paths:
            torch.manual_seed(0)  # the same weights on every path
            cfg = HMLConfig(n_subkeys=n, topk=k, latent_dim=dl, init="random", kernels=p_)
            layers[p_] = HeadwiseMemory(H, dh, hidden, cfg).to(dev, dtype).eval()
        name = str(dtype)[6:]
        tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
        for rows in (1,) if dry_run else (1, 16):
            g = torch.Generator().manual_seed(rows)
            x = torch.randn(rows, 1, H, dh, generator=g).to(dev, dtype)  # [batch, 1 new token, H, d_h]
            xf = torch.randn(rows, 1, hidden, generator=g).to(dev, dtype)
            with torch.no_grad():
                ref = layers["torch"](x).float()
                for p_ in paths[1:]:
                    y = layers[p_](x).float()
                    check(f"decode read on {p_} == the pure-torch read ({rows} row(s) x 1 token, {name}; max diff "
                          f"{(y - ref).abs().max().item():.1e})", torch.allclose(y, ref, rtol=tol, atol=tol))
            res = {}
            for what, mod, inp in [("FFN", ffn, xf)] + [(p_, layers[p_], x) for p_ in paths]:
                def call(mod=mod, inp=inp):
                    with torch.no_grad():
                        return mod(inp)
                eager = time_ms(call, sync, dry_run) * 1e3
                try:
                    replayed = graph_us(call) if dev.type == "cuda" else None
                except Exception as exc:  # a path that cannot be captured is a finding, not a lost session
                    replayed = f"not capturable ({type(exc).__name__}: {str(exc).strip().splitlines()[-1][:120] if str(exc).strip() else ''})"
                kernels = launched(call, dev)
                res[what] = (eager, replayed, kernels)
            unit = "kernels" if dev.type == "cuda" else "aten ops"

            def words(v):
                eager, replayed, kernels = v
                graph = f"{replayed:.1f} us" if isinstance(replayed, float) else (replayed or "-")
                return f"eager {eager:.1f} us, graph {graph}, {len(kernels)} {unit}"

            print(f"[decode] {size} {name}, {rows} row(s) x 1 token ({card}): "
                  + "; ".join(f"{w_} {words(v)}" for w_, v in res.items()))
            fused_read_kernels(layers["triton-fused"], x, dev, sync, dry_run, check, f"{rows} row(s), {name}")
            if rows == 1 and dtype == (torch.float32 if dry_run else torch.bfloat16):
                for w_ in ("FFN", "triton", "triton-fused"):
                    counts = {}
                    for kn in res[w_][2]:
                        counts[kn[:60]] = counts.get(kn[:60], 0) + 1
                    print(f"[decode] {unit} of one {w_} call: " + ", ".join(f"{kn} x{c}" for kn, c in counts.items()))


def fused_read_kernels(layer, x, dev, sync, dry_run: bool, check, what: str) -> None:
    """The fused read's two forward kernels on one decode step's queries: the decode-shaped one (a few tokens a
    program, the k rows gathered at once; the default up to hml_triton.SMALL_READ_MAX_TOKENS tokens) against the
    16-token blocks of one head a program it replaced there. The same read (slots may differ only at a near tie:
    the kernels sum the scores in another order), then each one's time, eager and replayed from a CUDA graph."""
    from midus_surgery.kernels import hml_triton
    from midus_surgery.model.hml import candidate_pairs

    cfg = layer.config
    with torch.no_grad():
        q = x.reshape(-1, layer.num_heads, layer.head_dim)
        q = layer._normed(q, layer._backend(q))  # [T, H, d_h] float32, as the layer reads
        keys = layer.keys.float()
        table = layer.latent_bank.weight if cfg.hive else layer.values.view(-1, layer.head_dim)
        head_rows = 0 if cfg.hive else cfg.n_subkeys**2
    pairs = candidate_pairs(cfg.topk, dev)
    out = {small: hml_triton.memory_forward(q, keys, table, cfg.topk, head_rows, pairs, small=small) for small in (True, False)}
    same = (out[True][1] == out[False][1]) & (out[True][2] == out[False][2])
    check(f"decode-shaped read kernel == the 16-token-block kernel ({what}; {same.float().mean().item():.4f} of the slots the same, "
          f"z max diff {(out[True][3] - out[False][3]).abs().max().item():.1e})",
          same.float().mean().item() > 0.99 and torch.allclose(out[True][3], out[False][3], rtol=1e-4, atol=1e-4))
    words = []
    for small, name in ((True, "decode-shaped"), (False, "16-token blocks")):
        def call(small=small):
            return hml_triton.memory_forward(q, keys, table, cfg.topk, head_rows, pairs, small=small)
        eager = time_ms(call, sync, dry_run) * 1e3
        try:
            graph = f"{graph_us(call):.1f} us" if dev.type == "cuda" else "-"
        except Exception as exc:  # a kernel that cannot be captured is a finding, not a lost session
            graph = f"not capturable ({type(exc).__name__})"
        words.append(f"{name} eager {eager:.1f} us, graph {graph}")
    print(f"[decode] fused read kernel alone, {what}: " + "; ".join(words))


def psw_backward(table, idx):
    """PyTorch's per-sample-weights backward of k-entry bags, as the layer's default CUDA path calls
    it (offsets and offset2bag from the forward, made here once): a function of (dz, table)."""
    from midus_surgery.model.hml import _bag_forward

    B, k = idx.shape
    _, offsets, offset2bag = _bag_forward(table, idx, torch.ones(B, k, device=idx.device))
    return lambda dz, tab: torch.ops.aten._embedding_bag_per_sample_weights_backward(
        dz, tab, idx.reshape(-1), offsets, offset2bag, 0, -1).view(B, k)


if __name__ == "__main__":
    raise SystemExit(main())
