"""The compiled CPU kernels of the HML (midus_surgery/kernels) against the pure-torch path.

tests/test_hml.py runs every HML correctness test on both paths; these tests compare the two
directly at sizes where the kernels' pruning and thresholds matter, and check the promises
the kernels make: thread-count independence, no uninitialised memory on NaN input, and a
clean fallback when they cannot be built.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from midus_surgery import kernels
from midus_surgery.model.hml import HeadwiseMemory, HMLConfig, LatentBank, two_stage_topk


def run_path(monkeypatch, path: str, fn):
    monkeypatch.setenv("MIDUS_HML_KERNELS", path)
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
    ops = kernels.cpu_ops()  # raises when the build fails: a real failure here
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
    f_out, f_slots, f_w, f_grads = run_path(monkeypatch, "fused", lambda: step(m, x))
    t_out, t_slots, t_w, t_grads = run_path(monkeypatch, "torch", lambda: step(m, x))
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
    monkeypatch.setenv("MIDUS_HML_KERNELS", "fused")
    m(x).square().sum().backward()
    assert bank.weight.grad is None and m.keys.grad is None
    assert m.proj.grad is not None and m.proj.grad.abs().sum() > 0
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_fused_bfloat16_bank_close_to_torch(monkeypatch, fused_ops):
    torch.manual_seed(2)
    m = HeadwiseMemory(2, 16, 32, HMLConfig(n_subkeys=32, topk=8, latent_dim=16, init="random")).to(torch.bfloat16)
    x = torch.randn(5, 9, 2, 16, dtype=torch.bfloat16)
    f = run_path(monkeypatch, "fused", lambda: step(m, x))
    t = run_path(monkeypatch, "torch", lambda: step(m, x))
    assert torch.equal(f[1], t[1])  # scores are float32 on both paths: same slots
    torch.testing.assert_close(f[0].float(), t[0].float(), rtol=2e-2, atol=2e-2)
    for name in f[3]:
        torch.testing.assert_close(f[3][name].float(), t[3][name].float(), rtol=3e-2, atol=3e-2, msg=name)


def test_fused_results_do_not_depend_on_thread_count(monkeypatch, fused_ops):
    torch.manual_seed(3)
    m = HeadwiseMemory(3, 16, 48, HMLConfig(n_subkeys=32, topk=8, latent_dim=16, init="random"))
    x = torch.randn(4, 64, 3, 16)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run_path(monkeypatch, "fused", lambda: step(m, x))
        torch.set_num_threads(2)
        two = run_path(monkeypatch, "fused", lambda: step(m, x))
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
    f = run_path(monkeypatch, "fused", lambda: two_stage_topk(s1, s2, 32))
    t = run_path(monkeypatch, "torch", lambda: two_stage_topk(s1, s2, 32))
    assert torch.equal(f[1], t[1])
    assert torch.equal(f[0], t[0])


@pytest.mark.parametrize(
    "rows",
    ["few distinct values", "constant", "infinities", "huge and tiny", "n not a power of two"],
)
def test_topk2_kernel_thresholds_hold_on_hard_rows(monkeypatch, fused_ops, rows):
    # The kernel picks its keep-threshold by bisection between the row's min and max: rows where
    # many entries tie at the threshold, or where (max - min) overflows, must still come out exact.
    g = torch.Generator().manual_seed(7)
    n = 96 if rows == "n not a power of two" else 256
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
    f = run_path(monkeypatch, "fused", lambda: two_stage_topk(s1, s2, 32))
    t = run_path(monkeypatch, "torch", lambda: two_stage_topk(s1, s2, 32))
    assert torch.equal(f[1], t[1])
    assert torch.equal(f[0], t[0])


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
    m = HeadwiseMemory(2, 8, 16, HMLConfig(n_subkeys=8, topk=4, latent_dim=4, init="random"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = m(torch.randn(5, 2, 8))
        m(torch.randn(5, 2, 8))
    assert out.shape == (5, 16)
    messages = [str(w.message) for w in caught if "HML CPU kernels unavailable" in str(w.message)]
    assert len(messages) == 1 and "no C++ compiler (test)" in messages[0]
    monkeypatch.setenv("MIDUS_HML_KERNELS", "fused")
    with pytest.raises(RuntimeError, match="could not be built"):
        m(torch.randn(5, 2, 8))


def test_unknown_kernel_mode_is_an_error(monkeypatch):
    monkeypatch.setenv("MIDUS_HML_KERNELS", "fast")
    with pytest.raises(ValueError, match="MIDUS_HML_KERNELS"):
        kernels.mode()
