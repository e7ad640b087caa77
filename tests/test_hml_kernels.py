"""The compiled CPU kernels of the HML (midus_surgery/kernels) against the pure-torch path.

tests/test_hml.py runs every HML correctness test on both paths; these tests compare the two
directly at sizes where the kernels' pruning and thresholds matter, and check the promises
the kernels make: thread-count independence, no uninitialised memory on NaN input, and a
clean fallback when they cannot be built.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from midus_surgery import kernels
from midus_surgery.model import hml
from midus_surgery.model.hml import HeadwiseMemory, HMLConfig, LatentBank, _HeadNorm, two_stage_topk


def run_on(kernels: str, fn, layer):
    """fn() with ``layer`` switched to ``kernels`` ("fused": the compiled CPU kernels, "torch")."""
    hml.use_kernels(layer, kernels)
    assert layer.backend("cpu") == {"fused": "cpu", "torch": "torch"}[kernels]  # the backend under test runs
    return fn()


def step(m: HeadwiseMemory, x: torch.Tensor):
    """Output, slots and every gradient of one forward+backward."""
    x = x.detach().clone().requires_grad_(True)
    out = m(x)
    w, slots = m.lookup(x.detach())
    names = [n for n, p in m.named_parameters() if p.requires_grad]
    params = [p for p in m.parameters() if p.requires_grad]
    grads = torch.autograd.grad(out, [x] + params, torch.ones_like(out) / out.numel() ** 0.5)
    return out.detach(), slots, w.detach(), dict(zip(["input"] + names, grads))


@pytest.fixture
def fused_ops(monkeypatch):
    monkeypatch.setenv("MIDUS_HML_KERNELS", "fused")
    ops = kernels.cpu_ops(strict=True)  # raises when the build fails: a real failure here
    assert ops is not None
    return ops


@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(hive=False),
        dict(gate=True, output_proj="always", query_norm="layer"),
        dict(n_subkeys=64, topk=64),  # k == n: every sub-key survives stage 1
        dict(n_subkeys=40, topk=1),
    ],
)
def test_fused_matches_torch_path(monkeypatch, fused_ops, kw):
    cfg = dict(n_subkeys=64, topk=16, latent_dim=32, init="random")
    cfg.update(kw)
    torch.manual_seed(0)
    m = HeadwiseMemory(4, 16, 64, HMLConfig(**cfg))
    x = torch.randn(3, 50, 4, 16)
    f_out, f_slots, f_w, f_grads = run_on("fused", lambda: step(m, x), m)
    t_out, t_slots, t_w, t_grads = run_on("torch", lambda: step(m, x), m)
    assert torch.equal(f_slots, t_slots)
    torch.testing.assert_close(f_w, t_w, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(f_out, t_out, rtol=1e-5, atol=1e-6)
    assert f_grads.keys() == t_grads.keys()
    for name in f_grads:
        torch.testing.assert_close(f_grads[name], t_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_fused_frozen_parts_get_no_gradient(monkeypatch, fused_ops):
    torch.manual_seed(1)
    bank = LatentBank(16, 8)
    bank.reset_parameters(seed=3)
    m = HeadwiseMemory(2, 8, 16, HMLConfig(n_subkeys=16, topk=4, latent_dim=8, init="random"), bank=bank)
    bank.weight.requires_grad_(False)
    m.keys.requires_grad_(False)
    x = torch.randn(7, 2, 8, requires_grad=True)
    assert m.backend("cpu") == "cpu"  # built under MIDUS_HML_KERNELS=fused (the fixture)
    m(x).square().sum().backward()
    assert bank.weight.grad is None and m.keys.grad is None
    assert m.proj.grad is not None and m.proj.grad.abs().sum() > 0
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_fused_bfloat16_bank_close_to_torch(monkeypatch, fused_ops):
    torch.manual_seed(2)
    m = HeadwiseMemory(2, 16, 32, HMLConfig(n_subkeys=32, topk=8, latent_dim=16, init="random")).to(torch.bfloat16)
    x = torch.randn(5, 9, 2, 16, dtype=torch.bfloat16)
    f = run_on("fused", lambda: step(m, x), m)
    t = run_on("torch", lambda: step(m, x), m)
    assert torch.equal(f[1], t[1])  # scores are float32 on both paths: same slots
    torch.testing.assert_close(f[0].float(), t[0].float(), rtol=2e-2, atol=2e-2)
    for name in f[3]:
        torch.testing.assert_close(f[3][name].float(), t[3][name].float(), rtol=3e-2, atol=3e-2, msg=name)


@pytest.mark.parametrize("units", [True, False])
def test_a_bf16_layer_projects_in_bf16_only_on_a_cpu_with_bf16_units_at_any_token_count(monkeypatch, fused_ops, units):
    # on a CPU with bf16 units (AVX512-BF16 / AMX) a bf16 layer's matmuls run in bf16, as on CUDA; on a CPU without
    # them (a bf16 GEMM there is 40-180x slower), float32. Never by the call's token count (it was bf16 from 128
    # tokens on: a sequence's logits moved with its batch, trial105). Scores and selection stay float32 either way.
    monkeypatch.setattr(hml, "_CPU_BF16_UNITS", units)
    torch.manual_seed(2)
    m = HeadwiseMemory(2, 16, 32, HMLConfig(n_subkeys=32, topk=8, latent_dim=16, init="random")).to(torch.bfloat16)
    seen, bmm = [], torch.bmm
    monkeypatch.setattr(torch, "bmm", lambda a, b: seen.append((a.dtype, b.dtype)) or bmm(a, b))
    expected = torch.bfloat16 if units else torch.float32
    for tokens in (1, 127, 140):
        x = torch.randn(tokens, 2, 16, dtype=torch.bfloat16)
        seen.clear()
        out = m(x.clone().requires_grad_())  # the autograd path: its projection is a Python bmm
        assert seen == [(expected, expected)], tokens
        with torch.no_grad():  # the no-grad read, one C++ call, takes the projection in the same dtype: the same values
            assert torch.equal(m(x), out.detach()), tokens
    assert hml._matmul_dtype(torch.bfloat16, "cpu") == expected
    assert hml._matmul_dtype(torch.float32, "cpu") == torch.float32 and hml._matmul_dtype(torch.float16, "cpu") == torch.float32
    assert hml._matmul_dtype(torch.float64, "cpu") == torch.float64 and hml._matmul_dtype(torch.bfloat16, "cuda") == torch.bfloat16


@pytest.mark.parametrize("kernels_", ["fused", "torch"])
@pytest.mark.parametrize("dtype, units", [(torch.float32, False), (torch.bfloat16, True), (torch.bfloat16, False)])
def test_a_sequence_reads_the_same_bits_alone_and_in_a_batch(monkeypatch, fused_ops, kernels_, dtype, units):
    """A sequence's output must not depend on what else is in its call: read alone (90 tokens) and as one row of a batch
    (180, 360 tokens, across the 128 at which the kernels once changed how they computed), the same bits, as a stock
    model's FFN gives (a call of one token, as a decode step, may differ in the last bits, as the FFN's GEMMs do). In bf16 a MIDUS model's logits moved by up to 0.25 and its greedy tokens changed
    with the batch (trial105)."""
    monkeypatch.setattr(hml, "_CPU_BF16_UNITS", units)
    torch.manual_seed(4)
    m = HeadwiseMemory(4, 16, 64, HMLConfig(n_subkeys=32, topk=8, latent_dim=16, init="random", gate=True, output_proj="always",
                                            query_source="hidden")).to(dtype)
    hml.use_kernels(m, kernels_)
    seq, others = torch.randn(1, 90, 64, dtype=dtype), torch.randn(3, 90, 64, dtype=dtype)
    with torch.no_grad():
        alone = m(seq)
        for batch in (torch.cat([seq, others[:1]]), torch.cat([others[:1], seq, others[1:]])):
            row = next(i for i in range(len(batch)) if torch.equal(batch[i], seq[0]))
            assert torch.equal(m(batch)[row], alone[0]), len(batch)


def test_fused_results_do_not_depend_on_thread_count(monkeypatch, fused_ops):
    torch.manual_seed(3)
    m = HeadwiseMemory(3, 16, 48, HMLConfig(n_subkeys=32, topk=8, latent_dim=16, init="random"))
    x = torch.randn(4, 64, 3, 16)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run_on("fused", lambda: step(m, x), m)
        torch.set_num_threads(2)
        two = run_on("fused", lambda: step(m, x), m)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])
    for name in one[3]:
        assert torch.equal(one[3][name], two[3][name]), name


def test_topk2_kernel_equals_torch_on_wide_rows(monkeypatch, fused_ops):
    # rows as wide as the real sizes (n = 256, k = 32), with a few exact ties mixed in
    g = torch.Generator().manual_seed(4)
    s1 = torch.randn(6, 40, 256, generator=g)
    s2 = torch.randn(6, 40, 256, generator=g)
    s1[:, ::7, 10:20] = 1.5
    s2[:, ::5, 3:9] = 0.75
    f = two_stage_topk(s1, s2, 32, kernels="fused")
    t = two_stage_topk(s1, s2, 32, kernels="torch")
    assert torch.equal(f[1], t[1])
    assert torch.equal(f[0], t[0])


@pytest.mark.parametrize(
    "rows",
    ["few distinct values", "constant", "infinities", "huge and tiny", "n not a power of two", "n not a multiple of 32"],
)
def test_topk2_kernel_thresholds_hold_on_hard_rows(monkeypatch, fused_ops, rows):
    # The kernel picks its keep-threshold by bisection, from the smallest of 32 group maxima (rows of whole
    # 32-entry blocks, k <= 32) or the row's min (other rows) up to its max: rows where many entries tie at
    # the threshold, or where (max - min) overflows, must still come out exact.
    g = torch.Generator().manual_seed(7)
    n = {"n not a power of two": 96, "n not a multiple of 32": 80}.get(rows, 256)
    s1 = torch.randn(3, 20, n, generator=g)
    s2 = torch.randn(3, 20, n, generator=g)
    if rows == "few distinct values":
        s1 = torch.randint(0, 3, s1.shape, generator=g).float()
        s2 = torch.randint(0, 2, s2.shape, generator=g).float()
    elif rows == "constant":
        s1[:, :10] = 0.25
        s2[:, 5:15] = -1.0
    elif rows == "infinities":
        s1[:, ::3, ::17] = float("inf")
        s1[:, 1::3, ::5] = -float("inf")
        s2[:, ::2, 1] = -float("inf")
    elif rows == "huge and tiny":
        s1 = s1 * 3e38
        s2 = s2 * 1e-40  # subnormal
    f = two_stage_topk(s1, s2, 32, kernels="fused")
    t = two_stage_topk(s1, s2, 32, kernels="torch")
    assert torch.equal(f[1], t[1])
    assert torch.equal(f[0], t[0])


def _bmm_then_topk2(ops, q, keys, k):
    """The selection score_topk2 replaces: the half scores by bmm, then topk2: (scores, slots i * n + j)."""
    T, H, dh = q.shape
    n = keys.shape[2]
    s = torch.bmm(q.reshape(T, 2 * H, dh // 2).transpose(0, 1), keys.reshape(2 * H, n, dh // 2).transpose(1, 2))
    s = s.view(H, 2, T, n)
    scores, i, j = ops.topk2(s[:, 0], s[:, 1], k)
    return scores, i * n + j


@pytest.mark.parametrize(
    "T, H, dh, n, k",
    [
        (1024, 9, 64, 256, 32),  # the SmolLM2 size
        (130, 3, 12, 70, 70),  # n not a whole block, d_h/2 odd, a short last tile of tokens, k = n
        (257, 2, 128, 64, 1),
        (128, 1, 2, 5, 3),  # one feature per half
        (1, 3, 16, 64, 8),  # a decode step's one token: a single, short tile
        (5, 2, 32, 33, 4),
    ],
)
def test_score_topk2_selects_what_bmm_then_topk2_selects(fused_ops, T, H, dh, n, k):
    # The kernel scores float32 queries in its own loop. Quarter-integers keep every dot product exact
    # whatever order it sums in, and make many sums tie, so the selection and the tie rule are compared
    # exactly; random values then check the scores against a float64 reference.
    g = torch.Generator().manual_seed(T + n)
    q = torch.randint(-8, 9, (T, H, dh), generator=g).float() / 4
    keys = torch.randint(-8, 9, (H, 2, n, dh // 2), generator=g).float() / 4
    got = fused_ops.score_topk2(q, keys, k)
    ref = _bmm_then_topk2(fused_ops, q, keys, k)
    for a, b in zip(got, ref):
        assert torch.equal(a, b)
    q, keys = torch.randn(T, H, dh, generator=g), torch.randn(H, 2, n, dh // 2, generator=g)
    scores, slots = fused_ops.score_topk2(q, keys, k)
    i, j = slots // n, slots % n
    half = dh // 2
    exact = torch.einsum("thc,hnc->htn", q[..., :half].double(), keys[:, 0].double())  # [H, T, n]
    exact2 = torch.einsum("thc,hnc->htn", q[..., half:].double(), keys[:, 1].double())
    chosen = exact.gather(-1, i) + exact2.gather(-1, j)  # the exact sums of the slots chosen
    torch.testing.assert_close(scores.double(), chosen, rtol=1e-5, atol=1e-5)
    best = (exact.unsqueeze(-1) + exact2.unsqueeze(-2)).flatten(-2).topk(k, dim=-1).values  # [H, T, k]
    torch.testing.assert_close(scores.double(), best, rtol=1e-5, atol=1e-5)  # the k best, in order


def test_score_topk2_scores_a_token_the_same_bits_whatever_else_is_in_the_call(fused_ops):
    # below 128 tokens it once scored by one bmm, above in its own loop: the same token's scores differed in the last
    # bits with the call's size, and the slots at near-ties (trial105)
    g = torch.Generator().manual_seed(5)
    q, keys = torch.randn(300, 4, 32, generator=g), torch.randn(4, 2, 64, 16, generator=g)
    scores, slots = fused_ops.score_topk2(q, keys, 8)  # [H, T, k]
    for start, count in ((0, 1), (7, 5), (20, 127), (150, 128), (1, 299)):
        part_scores, part_slots = fused_ops.score_topk2(q[start:start + count].contiguous(), keys, 8)
        assert torch.equal(part_scores, scores[:, start:start + count]) and torch.equal(part_slots, slots[:, start:start + count])
    double = [t.to(torch.float64) for t in (q[:127], keys)]  # float64 takes the reference path: bmm, then topk2
    for a, b in zip(fused_ops.score_topk2(*double, 8), _bmm_then_topk2(fused_ops, *double, 8)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("half", [8, 32, 64])  # 32 and 64 (head_dim 64 and 128) take the fixed-width row loop
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [40, 64])  # the sub-key ids come from the slots by division, or by shifts
def test_lookup_backward_gives_the_same_bits_for_both_gradients_as_for_each_alone(fused_ops, half, dtype, n):
    # both gradients come from one pass per (head, half); one alone from its own loop: same sums, same order
    g = torch.Generator().manual_seed(6)
    q, keys = torch.randn(300, 3, 2 * half, generator=g), torch.randn(3, 2, n, half, generator=g)
    q, keys = q.to(dtype), keys.to(dtype)
    _, slots = fused_ops.score_topk2(q, keys, 6)
    i, j = slots // n, slots % n
    dsel = torch.randn(3, 300, 6, generator=g).to(dtype)
    dq, dkeys = fused_ops.lookup_backward(dsel, q, keys, slots, True, True)
    assert torch.equal(dq, fused_ops.lookup_backward(dsel, q, keys, slots, True, False)[0])
    assert torch.equal(dkeys, fused_ops.lookup_backward(dsel, q, keys, slots, False, True)[1])
    # and they are the scoring's gradients: autograd through the dense float64 half scores of the chosen sub-keys
    qd, kd = q.double().requires_grad_(), keys.double().requires_grad_()
    s1 = torch.einsum("thc,hnc->htn", qd[..., :half], kd[:, 0]).gather(-1, i)
    s2 = torch.einsum("thc,hnc->htn", qd[..., half:], kd[:, 1]).gather(-1, j)
    ((s1 + s2) * dsel.double()).sum().backward()
    torch.testing.assert_close(dq.double(), qd.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dkeys.double(), kd.grad, rtol=1e-5, atol=1e-5)


def test_topk2_kernel_nan_rows_are_filled_not_garbage(fused_ops):
    a = torch.randn(1, 3, 16)
    b = torch.randn(1, 3, 16)
    a[0, 1] = float("nan")
    scores, i, j = fused_ops.topk2(a, b, 4)
    assert torch.isnan(scores[0, 1]).all()
    assert ((i >= 0) & (i < 16) & (j >= 0) & (j < 16)).all()
    assert not torch.isnan(scores[0, 0]).any() and not torch.isnan(scores[0, 2]).any()


def test_failed_build_warns_once_and_falls_back(monkeypatch):
    monkeypatch.setattr(kernels, "_state", {})

    def broken_build():
        raise OSError("no C++ compiler (test)")

    monkeypatch.setattr(kernels, "_build", broken_build)
    monkeypatch.setenv("MIDUS_HML_KERNELS", "auto")
    cfg = HMLConfig(n_subkeys=8, topk=4, latent_dim=4, init="random")
    m, other = HeadwiseMemory(2, 8, 16, cfg), HeadwiseMemory(2, 8, 16, cfg)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = m(torch.randn(5, 2, 8))
        other(torch.randn(5, 2, 8))  # another layer asks again: the build is not retried
    assert out.shape == (5, 16) and m.backend("cpu") == other.backend("cpu") == "torch"
    messages = [str(w.message) for w in caught if "HML CPU kernels unavailable" in str(w.message)]
    assert len(messages) == 1 and "no C++ compiler (test)" in messages[0]
    hml.use_kernels(m, "fused")
    with pytest.raises(kernels.KernelsUnavailable, match="cannot be built on this machine"):
        m(torch.randn(5, 2, 8))


def test_fused_kernels_that_cannot_build_are_one_line_in_eval_and_train(monkeypatch, tmp_path, capsys):
    """MIDUS_HML_KERNELS=fused on a machine without a working compiler: eval said "a bug in midus-surgery: please report
    it", and train printed a 40-line traceback (trial91 F4). A setting that cannot work here: one line, exit 2."""
    from train_fixtures.tiny import make_midus_output, write_config, write_corpus

    from midus_surgery.cli import main

    out = make_midus_output(tmp_path)
    corpus = write_corpus(tmp_path / "corpus", files=2, sentences_per_file=30)[0].parent
    monkeypatch.setattr(kernels, "_state", {})

    def broken_build():
        raise OSError("no C++ compiler (test)")

    monkeypatch.setattr(kernels, "_build", broken_build)
    monkeypatch.setenv("MIDUS_HML_KERNELS", "fused")
    capsys.readouterr()
    said = "error: the HML CPU kernels were asked for (kernels 'fused', by MIDUS_HML_KERNELS or the memory config) but cannot be built"
    assert main(["eval", str(out), "--data", str(corpus), "--block-size", "16", "--max-blocks", "2", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert said in err and "no C++ compiler (test)" in err and "please report" not in err and "Traceback" not in err, err
    cfg = write_config(tmp_path / "run.yaml", out, tmp_path / "run", corpus, tmp_path / "cache", tokens=16 * 4 * 2)
    assert main(["train", str(cfg), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert said in err and len([line for line in err.splitlines() if line.strip()]) == 1, err
    assert not (tmp_path / "run").exists()


def _ext_dir_with_this_build(tmp_path) -> tuple[dict, Path]:
    """An environment whose TORCH_EXTENSIONS_DIR holds a copy of this source's built kernels, and its build dir."""
    from torch.utils import cpp_extension

    name = kernels._build_name()
    built = Path(cpp_extension._get_build_directory(name, verbose=False)) / f"{name}.so"  # this process's
    build_dir = tmp_path / "ext" / name
    build_dir.mkdir(parents=True)
    shutil.copy(built, build_dir / built.name)
    return dict(os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path / "ext")), build_dir


# under a redirect of sys.stderr, as validate's replica check runs: the build's lines still reach the terminal (trial40)
LOAD_KERNELS = ("import contextlib, io; from midus_surgery import kernels\n"
                "with contextlib.redirect_stderr(io.StringIO()):\n    ops = kernels.cpu_ops(strict=True)\n"
                "print(ops.topk2 is not None)")


def test_a_lock_left_by_a_killed_kernel_build_does_not_hang_the_next_run(fused_ops, tmp_path):
    """torch's build lock is a file it deletes when its build ends: a build killed with SIGKILL or SIGHUP left it,
    and every later run that used a memory layer waited for it forever, printing nothing (trial39)."""
    env, build_dir = _ext_dir_with_this_build(tmp_path)
    (build_dir / "lock").touch()  # what torch's FileBaton leaves when its holder is killed
    proc = subprocess.run([sys.executable, "-c", LOAD_KERNELS], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "True", proc.stderr
    assert "left by a kernel build that was killed" in proc.stderr and not (build_dir / "lock").exists()
    assert "compiling" not in proc.stderr  # the cached build was loaded as it is


def test_a_run_waits_for_another_building_the_kernels_and_says_so(fused_ops, tmp_path):
    import fcntl

    env, build_dir = _ext_dir_with_this_build(tmp_path)
    with open(build_dir / "midus_build.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # another process's build, in progress
        proc = subprocess.Popen([sys.executable, "-c", LOAD_KERNELS], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        said = proc.stderr.readline()
        assert "waiting for another process building the HML CPU kernels" in said and proc.poll() is None
    out, err = proc.communicate(timeout=120)  # the holder has ended: the OS released its lock
    assert proc.returncode == 0 and out.strip() == "True", err


def test_a_kernel_library_cut_short_by_a_kill_is_built_again(tmp_path, monkeypatch):
    from torch.utils import cpp_extension

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    name = kernels._build_name()
    library = tmp_path / name / f"{name}.so"
    library.parent.mkdir()
    library.write_bytes(b"\x7fELF cut short")  # a link killed half-way
    calls = []

    def load(**kw):
        calls.append(kw["name"])
        raise RuntimeError("the build (test)")

    monkeypatch.setattr(cpp_extension, "load", load)
    with pytest.raises(RuntimeError, match="the build"):
        kernels._build()
    assert calls == [name] and not library.exists()


@pytest.mark.parametrize("xdg", ["", "relative/cache"])
def test_an_empty_or_relative_xdg_cache_home_builds_in_the_home_cache_not_the_working_folder(tmp_path, monkeypatch, xdg):
    """XDG_CACHE_HOME= (set, empty) made torch build the kernels in ./torch_extensions of the folder the user ran in
    (trial83 F8); the XDG rule is to ignore an empty or relative value: ~/.cache."""
    from torch.utils import cpp_extension

    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", xdg)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")

    def load(**kw):
        raise RuntimeError("the build (test)")

    monkeypatch.setattr(cpp_extension, "load", load)
    with pytest.raises(RuntimeError, match="the build"):
        kernels._build()
    assert not any((tmp_path / "work").iterdir())
    assert (tmp_path / "home" / ".cache" / "torch_extensions").is_dir()
    assert os.environ["XDG_CACHE_HOME"] == xdg  # the process's environment as it was

def test_unknown_kernel_mode_is_an_error(monkeypatch):
    monkeypatch.setenv("MIDUS_HML_KERNELS", "fast")
    with pytest.raises(ValueError, match="MIDUS_HML_KERNELS"):
        HeadwiseMemory(2, 8, 16, HMLConfig(n_subkeys=8, topk=4, latent_dim=4))  # the default is read at build
    with pytest.raises(ValueError, match="MIDUS_HML_KERNELS"):
        hml.kernels_from_environment()
    with pytest.raises(ValueError, match="HMLConfig.kernels"):
        HMLConfig(kernels="fast")
    layer = HeadwiseMemory(2, 8, 16, HMLConfig(n_subkeys=8, topk=4, latent_dim=4, kernels="torch"))  # named: env unread
    with pytest.raises(ValueError, match="HMLConfig.kernels"):
        hml.use_kernels(layer, "fast")


# ------------------------------------------------------------------ the backend switch
def test_the_layer_carries_its_backend_from_build_to_use_kernels(monkeypatch):
    """MIDUS_HML_KERNELS is read once, when a layer is built; later changes of the environment do
    not move a built layer; use_kernels switches every layer of a model, and only that model's."""
    cfg = HMLConfig(n_subkeys=8, topk=4, latent_dim=4, init="random")
    monkeypatch.setenv("MIDUS_HML_KERNELS", "torch")
    a = torch.nn.Sequential(HeadwiseMemory(2, 8, 16, cfg), HeadwiseMemory(2, 8, 16, cfg))
    assert [layer.kernels for layer in a] == ["torch", "torch"] and cfg.kernels is None
    monkeypatch.setenv("MIDUS_HML_KERNELS", "fused")
    b = HeadwiseMemory(2, 8, 16, cfg)
    assert a[0].backend("cpu") == "torch" and b.backend("cpu") == "cpu" and b.kernels == "fused"
    assert hml.prepare_kernels(a, "cpu") == "torch"
    hml.use_kernels(a, "fused")
    assert [layer.backend("cpu") for layer in a] == ["cpu", "cpu"] and hml.prepare_kernels(a, "cpu") == "cpu"
    hml.use_kernels(b, "torch")
    assert b.backend("cpu") == "torch" and a[0].backend("cpu") == "cpu"
    hml.use_kernels(a[1], "torch")
    assert hml.prepare_kernels(a, "cpu") == "cpu+torch"  # layers told different things say so
    monkeypatch.setenv("MIDUS_HML_KERNELS", "auto")
    hml.use_kernels(a, None)  # back to the environment's
    assert [layer.kernels for layer in a] == ["auto", "auto"]
    x = torch.randn(3, 2, 8)
    torch.testing.assert_close(a[0](x), run_on("torch", lambda: a[0](x), a[0]), rtol=1e-5, atol=1e-6)


def test_the_kernels_setting_is_not_written_unless_named():
    """An output's config.json holds HMLConfig.to_dict(): the environment's default is not written
    into it, an explicit choice is, and a config written before the field existed still loads."""
    d = HMLConfig(n_subkeys=8, topk=4, latent_dim=4).to_dict()
    assert "kernels" not in d and HMLConfig.from_dict(d).kernels is None  # old and new outputs alike
    named = HMLConfig(n_subkeys=8, topk=4, latent_dim=4, kernels="torch")
    assert named.to_dict()["kernels"] == "torch" and HMLConfig.from_dict(named.to_dict()) == named


def test_a_midus_model_built_from_an_old_config_runs_on_the_environments_backend(monkeypatch):
    from transformers import LlamaConfig

    from midus_surgery.model.configuration_midus import MidusConfig
    from midus_surgery.model.modeling_midus import MidusForCausalLM

    base = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                       num_key_value_heads=2, vocab_size=50).to_dict()
    for key in ("model_type", "architectures", "transformers_version"):
        base.pop(key, None)
    anatomy = {"layers_path": "model.layers", "attn_out_proj": "self_attn.o_proj", "ffn": ["mlp"],
               "ffn_norms": ["post_attention_layernorm"]}
    hml_old = {k: v for k, v in HMLConfig(n_subkeys=4, topk=2, latent_dim=4).to_dict().items()}  # no "kernels"
    config = MidusConfig(base_model_type="llama", midus={"memory_layers": [1], "hml": hml_old, "anatomy": anatomy}, **base)
    monkeypatch.setenv("MIDUS_HML_KERNELS", "torch")
    model = MidusForCausalLM(config)
    assert hml.prepare_kernels(model, "cpu") == "torch"
    assert "kernels" not in config.to_dict()["midus"]["hml"]  # the build wrote nothing back
    hml.use_kernels(model, "fused")
    assert hml.prepare_kernels(model, "cpu") == "cpu"
    model(torch.randint(0, 50, (1, 5)))


def test_prepared_layer_compiles_whole_without_an_eager_call(monkeypatch, fused_ops):
    """prepare_kernels answers "which backend?" before torch.compile (as the trainer calls it): the
    compiled layer reads the answer as a constant, one graph and no break, with no eager call first."""
    torch.manual_seed(0)
    m = HeadwiseMemory(2, 8, 16, HMLConfig(n_subkeys=8, topk=4, latent_dim=4, init="random", kernels="fused"))
    assert hml.prepare_kernels(m, "cpu") == "cpu"
    torch._dynamo.reset()
    explained = torch._dynamo.explain(lambda t: m(t))(torch.randn(6, 2, 8))
    torch._dynamo.reset()
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons


def test_a_bf16_bank_gradient_is_each_float_row_rounded_once(fused_ops):
    # the kernel stores the bank gradient in the bank's dtype: what the float gradient rounds to, to the bit
    g = torch.Generator().manual_seed(5)
    table = torch.randn(50, 24, generator=g)
    idx = torch.randint(0, 50, (40, 6), generator=g)
    w = torch.rand(40, 6, generator=g)
    dz = torch.randn(40, 24, generator=g)
    dw16, dt16 = torch.ops.midus_hml.bag_backward(dz, table.bfloat16(), idx, w, True, True)
    dw32, dt32 = torch.ops.midus_hml.bag_backward(dz, table.bfloat16().float(), idx, w, True, True)
    assert dt16.dtype == torch.bfloat16 and dw16.dtype == torch.float32
    assert torch.equal(dt16, dt32.bfloat16()) and torch.equal(dw16, dw32)


def test_the_bf16_bank_gradient_rounds_as_torch_does_at_ties_and_special_values(fused_ops):
    # one entry of weight 1 per slot: each slot's float gradient is exactly its dz row, then rounded to bf16
    one = 1 + 2**-8  # exactly halfway between two bf16 values (1 and 1 + 2**-7): ties go to the even one
    specials = torch.tensor([one, 1 + 3 * 2**-8, -one, 2**-130, -0.0, float("inf"), float("-inf"), float("nan"),
                             3.3895e38, -1e-45, 0.1, 65504.0, 1.0 - 2**-9, 2**-8 * 3, 1e-3, 7.0])
    dz = torch.stack([specials, specials.flip(0) * 3, specials * -0.5])  # [3 bags, 16]
    idx = torch.tensor([[2], [0], [1]])
    _, dtable = torch.ops.midus_hml.bag_backward(dz, torch.zeros(3, 16, dtype=torch.bfloat16), idx, torch.ones(3, 1), False, True)
    expected = (0.0 + dz[[1, 2, 0]]).bfloat16()  # summed from 0.0, as the kernel sums (-0.0 becomes +0.0)
    nan = expected.isnan()
    assert torch.equal(dtable.isnan(), nan)  # NaN stays NaN (its payload differs between torch's own casts)
    assert torch.equal(dtable.view(torch.int16)[~nan], expected.view(torch.int16)[~nan])  # the rest to the bit


def test_a_compiled_read_without_gradients_is_one_graph_on_the_single_read_op(monkeypatch, fused_ops):
    torch.manual_seed(0)
    for hive in (True, False):
        m = HeadwiseMemory(2, 8, 16, HMLConfig(n_subkeys=8, topk=4, latent_dim=4, init="random", kernels="fused", hive=hive))
        assert hml.prepare_kernels(m, "cpu") == "cpu"
        x = torch.randn(3, 2, 8)
        with torch.no_grad():
            ref = m(x)
            torch._dynamo.reset()
            explained = torch._dynamo.explain(lambda t: m(t))(x)
            compiled = torch.compile(m, backend="aot_eager")(x)
        torch._dynamo.reset()
        assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons
        assert torch.equal(compiled, ref)  # the op's fake shapes and dtypes are what it returns


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_the_query_rms_norm_with_its_compiled_backward_is_the_composite(fused_ops, dtype):
    # The compiled CPU path normalises the queries through _QueryRMSNorm: the same forward ops (so the same
    # values, hence the same slots), and one compiled pass for the backward instead of autograd through them.
    g = torch.Generator().manual_seed(8)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    norm = _HeadNorm("rms", 3, 64, 1e-6, dtype=dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(3, 64, generator=g) + 0.5)
    q = (torch.randn(300, 3, 64, generator=g) * 3).to(dtype)  # 300 tokens: three blocks of the dweight sum
    dy = torch.randn(300, 3, 64, generator=g).to(acc)
    grads = {}
    for fused in (True, False):
        qq = q.clone().requires_grad_()
        norm.weight.grad = None
        y = norm(qq if fused else qq.to(acc), fused_backward=fused)
        y.backward(dy)
        grads[fused] = (y.detach(), qq.grad, norm.weight.grad)
    (y1, dq1, dw1), (y0, dq0, dw0) = grads[True], grads[False]
    assert y1.dtype == acc and torch.equal(y1, y0)
    assert dq1.dtype == dtype and dw1.dtype == dtype
    tol = {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-5),
           torch.bfloat16: dict(rtol=1e-2, atol=1e-2)}[dtype]  # bf16: each rounded once from float32 sums
    torch.testing.assert_close(dq1, dq0, **tol)
    torch.testing.assert_close(dw1, dw0, **tol)
    # the weight's gradient sums the token blocks in a fixed order: the same bits on one thread as on two
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = fused_ops.rms_norm_backward(dy, q, norm.weight.detach().to(acc), 1e-6, True, True)
        torch.set_num_threads(2)
        two = fused_ops.rms_norm_backward(dy, q, norm.weight.detach().to(acc), 1e-6, True, True)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])
