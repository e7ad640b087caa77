"""The Triton kernels of the memory layer (midus_surgery/kernels/hml_triton.py), through Triton's
interpreter on CPU tensors: the top-k selects exactly what the pure-torch path selects (ties, -0.0,
n and k that are not powers of two, strided halves), the bag's weight gradient equals PyTorch's
per-sample-weights backward to float32 rounding, and a layer running both (kernels "triton",
as MIDUS_HML_KERNELS=triton makes the default) gives the pure-torch layer's outputs and gradients. On a GPU,
tools/gpu_check_hml.py checks and times them, compiled too.
"""

from __future__ import annotations

import os

import pytest
import torch
import triton

from midus_surgery import kernels
from midus_surgery.kernels import hml_triton
from midus_surgery.model import hml
from midus_surgery.model.hml import HeadwiseMemory, HMLConfig, _two_stage_topk, candidate_pairs

# tests/conftest.py sets it before anything imports triton: the kernels then run on CPU tensors
assert os.environ.get("TRITON_INTERPRET") == "1", "run through pytest (tests/conftest.py sets TRITON_INTERPRET=1)"


@pytest.mark.parametrize("P,T,n,k,values", [
    (2, 5, 16, 4, "normal"),
    (3, 7, 12, 3, "normal"),       # n and k not powers of two
    (2, 6, 16, 8, "small-ints"),   # many equal sums: the tie rule decides
    (2, 4, 6, 6, "small-ints"),    # k = n, padded past n
    (1, 3, 8, 1, "normal"),
    (2, 3, 8, 4, "zeros"),         # every sum equal, +0.0 and -0.0 mixed
    (2, 4, 6, 6, "wide"),          # magnitudes up to 1e30, padding past n below them all
])
@pytest.mark.parametrize("compact", [False, True], ids=["square", "compact"])
def test_triton_topk2_selects_what_the_pure_torch_path_selects(P, T, n, k, values, compact):
    gen = torch.Generator().manual_seed(P * 100 + n + k)
    if values == "normal":
        s = torch.randn(P, 2, T, n, generator=gen)
    elif values == "small-ints":
        s = torch.randint(-2, 2, (P, 2, T, n), generator=gen).float()
    elif values == "wide":
        s = torch.randn(P, 2, T, n, generator=gen) * 10.0 ** torch.randint(-30, 31, (P, 2, T, n), generator=gen)
    else:
        s = torch.zeros(P, 2, T, n)
        s[torch.rand(P, 2, T, n, generator=gen) < 0.5] = -0.0
    a, b = s[:, 0], s[:, 1]  # strided views, as the layer passes them
    scores, i, j = hml_triton.topk2(a, b, k, candidate_pairs(k, a.device), compact=compact)
    ref_scores, ref_slots = _two_stage_topk(torch.stack((a, b)), k)
    assert torch.equal(i * n + j, ref_slots)
    assert torch.equal(scores, ref_scores)
    assert ((i >= 0) & (i < n) & (j >= 0) & (j < n)).all()


def test_triton_topk2_rejects_what_it_cannot_rank():
    a = torch.randn(1, 2, 4)
    with pytest.raises(ValueError, match="k=5 must be in"):
        hml_triton.topk2(a, a, 5, candidate_pairs(5, a.device))
    with pytest.raises(ValueError, match="float32"):
        hml_triton.topk2(a.double(), a.double(), 2, candidate_pairs(2, a.device))


@pytest.mark.parametrize("B,k,d,rows,dtype", [
    (9, 4, 5, 20, torch.float32),      # d below one column chunk
    (6, 32, 64, 300, torch.float32),   # the bundled recipe's k and d_l
    (5, 3, 130, 9, torch.float32),     # d over two chunks, k not a power of two
    (7, 6, 16, 40, torch.bfloat16),    # a bf16 bank and dz, accumulated in float32
    (0, 4, 8, 10, torch.float32),      # no bags
    (3, 1, 1, 7, torch.float32),       # k = 1 and d = 1: one-wide blocks
])
def test_triton_bag_dw_equals_the_per_sample_weights_backward(B, k, d, rows, dtype):
    gen = torch.Generator().manual_seed(B + k + d)
    table = torch.randn(rows, d, generator=gen).to(dtype)
    dz_full = torch.randn(B, 2 * d, generator=gen).to(dtype)
    dz = dz_full[:, ::2]  # strided rows, as a view would pass them
    idx = torch.randint(0, rows, (B, k), generator=gen)
    dw = hml_triton.bag_dw(dz, table, idx)
    offsets = torch.arange(0, B * k, k)
    _, offset2bag, _, _ = torch.ops.aten._embedding_bag(
        table.float(), idx.reshape(-1), offsets, False, 0, False, torch.ones(B * k), False, -1)
    ref = torch.ops.aten._embedding_bag_per_sample_weights_backward(
        dz.float(), table.float(), idx.reshape(-1), offsets, offset2bag, 0, -1).view(B, k)
    assert dw.dtype == torch.float32 and dw.shape == (B, k)
    torch.testing.assert_close(dw, ref, rtol=1e-5, atol=1e-5)


def test_launches_on_another_gpu_than_the_current_one_switch_devices_first(monkeypatch):
    # Triton launches on the current CUDA device; a layer of a model split over GPUs may sit elsewhere
    import contextlib

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    guard = hml_triton._on_device(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    for same in (torch.device("cuda", 0), torch.device("cpu")):
        assert isinstance(hml_triton._on_device(same), contextlib.nullcontext)


def test_the_device_guard_leaves_a_compiled_graph_whole():
    def step(x):
        with hml_triton._on_device(x.device):
            y = x * 2
        return y.sum()

    torch._dynamo.reset()
    explained = torch._dynamo.explain(step)(torch.randn(4, 8))
    torch._dynamo.reset()
    assert explained.graph_count == 1 and explained.graph_break_count == 0


def test_triton_bag_dw_rejects_what_it_cannot_take():
    with pytest.raises(ValueError, match="dz \\[B, d\\], table"):
        hml_triton.bag_dw(torch.randn(3, 4), torch.randn(5, 6), torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="float32"):
        hml_triton.bag_dw(torch.randn(3, 4).double(), torch.randn(5, 4).double(), torch.zeros(3, 2, dtype=torch.long))


@pytest.mark.parametrize("kw", [dict(), dict(hive=False), dict(query_source="hidden", gate=True),
                                dict(bank_grad="segment"), dict(bank_grad="segment", hive=False)])
def test_a_layer_on_the_triton_path_equals_the_pure_torch_layer(kw, monkeypatch):
    torch.manual_seed(0)
    layer = HeadwiseMemory(2, 8, 16, HMLConfig(n_subkeys=6, topk=4, latent_dim=5, init="random", **kw))
    x = torch.randn(2, 3, 16) if kw.get("query_source") == "hidden" else torch.randn(2, 3, 2, 8)

    def run(triton: bool):
        hml.use_kernels(layer, "triton" if triton else "torch")
        assert layer.backend(x.device) == ("triton" if triton else "torch")
        called = []

        def recorded(name):
            real = getattr(hml_triton, name)
            return lambda *a, **kw_: called.append(name if name != "segment_bank_grad" else (name, kw_["groups"])) or real(*a, **kw_)

        monkeypatch.setattr(kernels, "triton_kernel", recorded)
        layer.zero_grad()
        xi = x.clone().requires_grad_()
        out = layer(xi)
        out.pow(2).sum().backward()
        # the table's gradient from the segment reduce: HIVE off, head by head (2 heads)
        segment = [("segment_bank_grad", 1 if kw.get("hive", True) else 2)] if triton and kw.get("bank_grad") == "segment" else []
        assert called == (["topk2", "bag_dw"] + segment if triton else [])  # the path really ran
        return out.detach(), xi.grad, {name: p.grad.clone() for name, p in layer.named_parameters()}

    out_t, dx_t, grads_t = run(True)
    out_r, dx_r, grads_r = run(False)
    assert torch.equal(out_t, out_r)  # the same slots and float32 adds: identical
    # the weight gradient's dot products sum in another order: equal to float32 rounding
    torch.testing.assert_close(dx_t, dx_r, rtol=1e-5, atol=1e-6)
    for name in grads_r:
        torch.testing.assert_close(grads_t[name], grads_r[name], rtol=1e-5, atol=1e-6, msg=name)


def test_triton_mode_on_the_cpu_keeps_the_cpu_kernels(monkeypatch):
    cpu = "cpu" if kernels.cpu_ops() is not None else "torch"
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # a real run: no interpreter
    assert hml.resolve_backend("triton", "cpu") == cpu
    assert hml.resolve_backend("triton", "meta") == "torch"  # only CUDA, or CPU under the interpreter
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert hml.resolve_backend("triton", "cpu") == "triton"
    assert hml.resolve_backend("triton", "cpu", torch.float64) == cpu  # it ranks float32


def _backends(monkeypatch, mode, interpret="1"):
    """(the backend on CUDA, Triton on CPU tensors?) that a layer told ``mode`` (None:
    MIDUS_HML_KERNELS) resolves, under TRITON_INTERPRET=``interpret``."""
    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    return hml.resolve_backend(mode, "cuda"), hml.resolve_backend(mode, "cpu") == "triton"


def test_the_triton_kernels_are_the_cuda_default_and_cpu_tensors_need_the_explicit_mode(monkeypatch):
    # (on CUDA, on CPU tensors?): Triton on CUDA by default; the interpreter on CPU only when asked
    # for by name, so the rest of the suite (TRITON_INTERPRET=1 throughout) keeps its CPU backends
    monkeypatch.setenv("MIDUS_HML_KERNELS", "")
    assert _backends(monkeypatch, None) == ("triton", False)  # unset: auto
    assert _backends(monkeypatch, "auto") == ("triton", False)
    assert _backends(monkeypatch, "fused") == ("triton", False)
    assert _backends(monkeypatch, "torch") == ("torch", False)
    assert _backends(monkeypatch, "triton") == ("triton", True)
    assert _backends(monkeypatch, "triton", interpret="0") == ("triton", False)
    monkeypatch.setenv("MIDUS_HML_KERNELS", "torch")
    assert _backends(monkeypatch, None) == ("torch", False)
    assert hml.resolve_backend("auto", "cuda", torch.float64) == "torch"  # float64 keeps the pure-torch path


def test_without_a_usable_triton_cuda_keeps_the_pure_torch_path(monkeypatch):
    from importlib import metadata

    real_version = metadata.version
    monkeypatch.setattr(metadata, "version", lambda name: "3.5.0" if name == "triton" else real_version(name))
    assert _backends(monkeypatch, "auto") == ("torch", False)  # older than the kernels were run with
    assert _backends(monkeypatch, "triton") == ("triton", True)  # asked for by name: its error comes at the call

    def missing(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "version", missing)
    assert _backends(monkeypatch, "auto") == ("torch", False)
    layer = HeadwiseMemory(2, 8, 16, HMLConfig(n_subkeys=6, topk=4, latent_dim=5, kernels="auto"))
    assert layer.backend("cuda") == "torch"  # a layer built now keeps that answer


def test_triton_mode_without_triton_says_so(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "midus_surgery.kernels.hml_triton", None)  # import fails
    monkeypatch.delattr(kernels, "hml_triton")
    with pytest.raises(kernels.KernelsUnavailable, match=r"the Triton kernels were asked for .* but triton cannot be imported"):
        kernels.triton_kernel("topk2")


def test_the_start_line_names_the_backend_the_layers_run_on(monkeypatch):
    def words(mode):
        layer = HeadwiseMemory(2, 8, 16, HMLConfig(n_subkeys=6, topk=4, latent_dim=5, kernels=mode))
        return hml.backend_words(hml.prepare_kernels(torch.nn.Sequential(layer), "cpu"))

    assert words("torch") == "pure-torch path"
    assert words("auto") == ("compiled CPU kernels" if kernels.cpu_ops() is not None else "pure-torch path")
    assert words("triton") == "Triton kernels"  # under the interpreter (tests/conftest.py)
    assert words("triton-fused") == "fused Triton kernels"
    assert hml.prepare_kernels(torch.nn.Linear(2, 2), "cpu") == "torch"  # no memory layer


# ------------------------------------------------------------------ the fused read (kernels "triton-fused")

def _read_reference(q, keys, table, k, head_rows):
    """The read the fused kernel computes, by the pure-torch path's scores and selection (float32) and a
    dense gather: (w, slots, z)."""
    H = keys.shape[0]
    w, slots = hml._Lookup.apply(q, keys, k, "torch")  # [H, T, k]
    rows = table.float()[slots + head_rows * torch.arange(H).view(H, 1, 1)]  # [H, T, k, d]
    return w, slots, (w[..., None] * rows).sum(-2)


READ_CASES = [
    (37, 3, 8, 6, 4, 5, torch.float32, 0),      # n, k, d not powers of two; T not a multiple of the block
    (16, 2, 4, 16, 16, 3, torch.float32, 0),    # k = n
    (5, 1, 2, 3, 1, 1, torch.float32, 0),       # k = 1, d = 1, one-feature halves
    (9, 2, 64, 128, 32, 64, torch.float32, 0),  # the bundled recipe's n, k, d_l and SmolLM2's d_h
    (11, 2, 8, 5, 3, 7, torch.bfloat16, 0),     # a bf16 bank, gathered into float32 sums
    (13, 3, 6, 4, 2, 6, torch.float32, 16),     # HIVE off: per-head value tables n*n rows apart
    (0, 2, 8, 6, 4, 5, torch.float32, 0),       # no tokens
]
DECODE_CASES = [  # the decode-shaped kernel's own sizes (seconds each through the interpreter)
    (1, 3, 64, 128, 32, 64, torch.bfloat16, 0),  # a decode step of one row at the recipe's size
    (3, 2, 64, 256, 32, 256, torch.float32, 0),  # the Llama-3.2-1B size: one token a program
]


@pytest.mark.parametrize("T,H,dh,n,k,d,table_dtype,head_rows,small",
                         [case + (small,) for case in READ_CASES for small in (False, True)]
                         + [case + (True,) for case in DECODE_CASES])
def test_the_fused_read_selects_exactly_and_pools_what_the_pure_torch_path_does(T, H, dh, n, k, d, table_dtype, head_rows, small):
    gen = torch.Generator().manual_seed(T + n + k)
    # quarter-integers: every score is exact in float32 whatever order the dot sums in, and many tie,
    # so the kernel's own summation order cannot hide a difference in the selection or the tie rule
    q = torch.randint(-3, 4, (T, H, dh), generator=gen).float() / 4
    keys = torch.randint(-3, 4, (H, 2, n, dh // 2), generator=gen).float() / 4
    table = torch.randn((H - 1) * head_rows + n * n, d, generator=gen).to(table_dtype)
    w, i, j, z = hml_triton.memory_forward(q, keys, table, k, head_rows, candidate_pairs(k, q.device), small=small)
    ref_w, ref_slots, ref_z = _read_reference(q, keys, table, k, head_rows)
    assert torch.equal(i * n + j, ref_slots)
    assert ((i >= 0) & (i < n) & (j >= 0) & (j < n)).all()
    torch.testing.assert_close(w, ref_w, rtol=1e-6, atol=1e-7)
    assert z.dtype == torch.float32 and z.shape == (H, T, d)
    torch.testing.assert_close(z, ref_z, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("atomic", [False, True], ids=["deterministic", "atomic-table"])
@pytest.mark.parametrize("programs", [1, 4, 512])  # one run of tokens per head, a few, one block each
def test_the_fused_backward_equals_autograd_through_the_pure_torch_read(atomic, programs):
    gen = torch.Generator().manual_seed(programs)
    T, H, dh, n, k, d = 45, 3, 8, 6, 4, 5
    q = torch.randn(T, H, dh, generator=gen)
    keys = torch.randn(H, 2, n, dh // 2, generator=gen)
    table = torch.randn(n * n, d, generator=gen)
    w, i, j, _ = hml_triton.memory_forward(q, keys, table, k, 0, candidate_pairs(k, q.device))
    dz = torch.randn(H, T, d, generator=gen)
    dq, dkeys, dtable = hml_triton.memory_backward(dz, q, keys, table, w, i, j, 0, atomic, programs=programs)
    ref = [t.clone().requires_grad_() for t in (q, keys, table)]
    _, slots, z = _read_reference(*ref, k, 0)
    assert torch.equal(i * n + j, slots)
    ref_grads = torch.autograd.grad(z, ref, dz)
    torch.testing.assert_close(dq, ref_grads[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dkeys, ref_grads[1], rtol=1e-5, atol=1e-5)
    if atomic:
        torch.testing.assert_close(dtable, ref_grads[2], rtol=1e-5, atol=1e-5)
    else:
        assert dtable is None  # the caller's sorted, deterministic method computes it


def test_the_fused_kernels_reject_what_they_cannot_take():
    q, keys, table = torch.randn(4, 2, 8), torch.randn(2, 2, 6, 4), torch.randn(36, 5)
    pairs = candidate_pairs(4, q.device)
    with pytest.raises(ValueError, match="q \\[T, H, d_h\\], keys"):
        hml_triton.memory_forward(q, keys[:1], table, 4, 0, pairs)
    with pytest.raises(ValueError, match="float32"):
        hml_triton.memory_forward(q.double(), keys.double(), table, 4, 0, pairs)
    with pytest.raises(ValueError, match="k=7 must be in"):
        hml_triton.memory_forward(q, keys, table, 7, 0, candidate_pairs(7, q.device))
    with pytest.raises(ValueError, match="too small"):
        hml_triton.memory_forward(q, keys, table, 4, 36, pairs)  # two heads of 36 slots need 72 rows


FUSED_CONFIGS = [dict(), dict(hive=False), dict(query_source="hidden", gate=True), dict(query_norm="layer", output_proj="always"),
                 dict(bank_grad="index_add"), dict(bank_grad="index_add", hive=False),
                 dict(bank_grad="segment"), dict(bank_grad="segment", hive=False)]


@pytest.mark.parametrize("kw", FUSED_CONFIGS)
def test_a_layer_on_the_fused_kernels_matches_the_dense_float64_reference(kw, monkeypatch):
    from test_hml import dense_reference

    torch.manual_seed(0)
    layer = HeadwiseMemory(2, 8, 16, HMLConfig(n_subkeys=6, topk=4, latent_dim=5, init="random", kernels="triton-fused", **kw))
    assert layer.backend("cpu") == "triton-fused"
    x = torch.randn(2, 9, 16) if kw.get("query_source") == "hidden" else torch.randn(2, 9, 2, 8)
    called = []

    def recorded(name):
        real = getattr(hml_triton, name)
        return lambda *a, **kw_: called.append((name, a[-1] if name == "memory_backward" else kw_.get("groups"))) or real(*a, **kw_)

    monkeypatch.setattr(kernels, "triton_kernel", recorded)
    xi = x.clone().requires_grad_()
    out = layer(xi)
    g_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, [xi] + list(layer.parameters()), g_out)
    atomic = kw.get("bank_grad") == "index_add"  # the table's gradient from the kernel's atomics
    segment = [("segment_bank_grad", 1 if kw.get("hive", True) else 2)] if kw.get("bank_grad") == "segment" else []  # HIVE off: per head
    assert called == [("memory_forward", None), ("memory_backward", atomic)] + segment  # the fused path really ran

    double = {name: p.detach().double().requires_grad_() for name, p in layer.named_parameters()}
    x64 = x.double().requires_grad_()
    ref = dense_reference(layer, x64, double)
    ref_grads = torch.autograd.grad(ref, [x64] + list(double.values()), g_out.double())
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
    for name, a, b in zip(["input"] + list(double), grads, ref_grads):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("hive", [True, False])
def test_a_fused_read_without_gradients_runs_the_forward_kernel_alone(hive, monkeypatch):
    torch.manual_seed(0)
    layer = HeadwiseMemory(2, 8, 16, HMLConfig(n_subkeys=6, topk=4, latent_dim=5, init="random", kernels="triton-fused",
                                              hive=hive))
    x = torch.randn(2, 9, 2, 8)
    ref = layer(x)
    assert ref.grad_fn is not None
    monkeypatch.setattr(hml._FusedRead, "apply", lambda *a: pytest.fail("an autograd Function ran under no_grad"))
    with torch.no_grad():
        assert torch.equal(layer(x), ref.detach())


@pytest.mark.parametrize("bank_grad,spied,expected", [
    ("index_add", "memory_backward", [False]),  # the kernel is told: no atomics on the table
    ("segment", "segment_bank_grad", [(2 * 5, 4)]),  # deterministic by construction: kept, on H*T bags of k slots
])
def test_deterministic_algorithms_keep_the_fused_backward_deterministic(bank_grad, spied, expected, monkeypatch):
    layer = HeadwiseMemory(2, 8, 16, HMLConfig(n_subkeys=6, topk=4, latent_dim=5, init="random", kernels="triton-fused",
                                              bank_grad=bank_grad))
    seen = []
    real = getattr(hml_triton, spied)
    what = (lambda a: a[-1]) if spied == "memory_backward" else (lambda a: tuple(a[1].shape))
    monkeypatch.setattr(hml_triton, spied, lambda *a, **kw: seen.append(what(a)) or real(*a, **kw))
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        layer(torch.randn(5, 2, 8)).sum().backward()
    finally:
        torch.use_deterministic_algorithms(before)
    assert seen == expected
    assert layer.bank.weight.grad is not None and layer.bank.weight.grad.abs().sum() > 0


def test_segment_is_a_triton_method_and_means_auto_elsewhere():
    assert hml._bank_grad_method("segment", "cuda", triton=True) == "segment"
    assert hml._bank_grad_method("segment", "cpu", triton=True) == "segment"  # the interpreter
    assert hml._bank_grad_method("segment", "cuda") == hml._bank_grad_method("auto", "cuda") == "embedding_bag"
    assert hml._bank_grad_method("segment", "cpu") == hml._bank_grad_method("auto", "cpu") == "sparse_mm"


def test_auto_takes_the_segment_reduce_for_wide_rows_and_many_contributions_on_the_triton_kernels():
    """Where it measured faster on an H200 (rows of 256 at 16 x 1024 tokens), and nowhere else."""
    wide, many = hml.SEGMENT_MIN_WIDTH, hml.SEGMENT_MIN_CONTRIBUTIONS
    llama = dict(contributions=32 * 16384 * 32, width=256)  # Llama-3.2-1B: 32 heads x 16 x 1024 tokens x top-32
    assert hml._bank_grad_method("auto", "cuda", triton=True, **llama) == "segment"
    assert hml._bank_grad_method("auto", "cuda", triton=True, contributions=many, width=wide) == "segment"
    assert hml._bank_grad_method("auto", "cuda", triton=True, contributions=many - 1, width=wide) == "embedding_bag"
    assert hml._bank_grad_method("auto", "cuda", triton=True, contributions=many, width=wide // 2) == "embedding_bag"
    assert hml._bank_grad_method("auto", "cuda", **llama) == "embedding_bag"  # no Triton: no segment
    assert hml._bank_grad_method("auto", "cpu", triton=True, **llama) == "sparse_mm"  # a CPU tensor (the interpreter)
    assert hml._bank_grad_method("embedding_bag", "cuda", triton=True, **llama) == "embedding_bag"  # an explicit choice stands


@pytest.mark.parametrize("kernels_", ["triton", "triton-fused"])
def test_both_triton_paths_ask_for_the_bank_gradient_with_its_size(kernels_, monkeypatch):
    """The rule above needs the bank gradient's size: H x T x k contributions into rows of d_l."""
    layer = HeadwiseMemory(2, 8, 16, HMLConfig(n_subkeys=6, topk=4, latent_dim=5, init="random", kernels=kernels_))
    asked, real = [], hml._bank_grad_method
    monkeypatch.setattr(hml, "_bank_grad_method", lambda *a, **kw: asked.append(kw) or real(*a, **kw))
    layer(torch.randn(2, 3, 2, 8)).sum().backward()
    assert asked and all(kw["contributions"] == 2 * 6 * 4 and kw["width"] == 5 for kw in asked)


def test_a_pure_torch_layer_told_segment_gives_the_auto_gradient():
    torch.manual_seed(0)
    x = torch.randn(2, 9, 2, 8)
    grads = []
    for bank_grad in ("segment", "auto"):
        torch.manual_seed(1)
        layer = HeadwiseMemory(2, 8, 16, HMLConfig(n_subkeys=6, topk=4, latent_dim=5, init="random", kernels="torch",
                                                  bank_grad=bank_grad))
        layer(x).pow(2).sum().backward()
        grads.append(layer.bank.weight.grad)
    assert torch.equal(grads[0], grads[1])


def _contributions(B, k, rows, gen, hot=None):
    """idx [B, k] with k distinct rows per bag (as top-k slots are); ``hot``: share of bags whose first slot is row 0."""
    idx = torch.stack([torch.randperm(rows, generator=gen)[:k] for _ in range(B)]) if B else torch.zeros(0, k, dtype=torch.long)
    if hot is not None and B:
        pick = torch.rand(B, generator=gen) < hot
        idx[pick] = torch.where(idx[pick] == 0, idx[pick, :1], idx[pick])  # keep the rows distinct
        idx[pick, 0] = 0
    return idx


@pytest.mark.parametrize("B,k,d,rows,dtype,hot,chunk", [
    (40, 4, 5, 30, torch.float32, None, 2048),    # d below one vector, rows never read stay zero
    (60, 32, 64, 300, torch.float32, None, 2048),  # the bundled recipe's k and d_l
    (33, 3, 130, 9, torch.float32, None, 2048),    # d over one power of two, k not a power of two
    (50, 6, 16, 40, torch.bfloat16, None, 2048),   # a bf16 dz, summed in float32
    (300, 4, 8, 50, torch.float32, 0.9, 64),       # one row most bags read: its list spans many chunks
    (200, 1, 1, 1, torch.float32, None, 70),       # every contribution on one row, k = 1, d = 1
    (0, 4, 8, 10, torch.float32, None, 2048),      # no bags
])
def test_the_segment_bank_grad_equals_the_float64_sum(B, k, d, rows, dtype, hot, chunk):
    gen = torch.Generator().manual_seed(B + k + d)
    idx = _contributions(B, k, rows, gen, hot)
    w = torch.rand(B, k, generator=gen)
    dz = torch.randn(B, 2 * d, generator=gen).to(dtype)[:, ::2]  # strided rows, as a view would pass them
    out = hml_triton.segment_bank_grad(dz, idx, w, rows, chunk=chunk)
    ref = torch.zeros(rows, d, dtype=torch.float64).index_add_(
        0, idx.reshape(-1), (w[:, :, None].double() * dz[:, None, :].double()).reshape(-1, d))
    assert out.dtype == torch.float32 and out.shape == (rows, d)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    unread = torch.ones(rows, dtype=torch.bool)
    unread[idx.reshape(-1)] = False
    assert (out[unread] == 0).all()


def test_segment_order_is_a_stable_sort_by_row_for_any_block_count():
    gen = torch.Generator().manual_seed(0)
    idx = _contributions(250, 8, 37, gen, hot=0.5)  # 2000 positions, a hot row among them
    expected = torch.argsort(idx.reshape(-1), stable=True)
    for blocks in (1, 3, 7, 256):
        order, start, count = hml_triton.segment_order(idx, 37, blocks)
        assert torch.equal(order.long(), expected), blocks
        assert torch.equal(count, torch.bincount(idx.reshape(-1), minlength=37))
        assert torch.equal(start, torch.cumsum(count, 0) - count)


def test_the_segment_bank_grad_is_the_same_bits_whatever_the_launch():
    gen = torch.Generator().manual_seed(1)
    idx = _contributions(250, 8, 37, gen, hot=0.5)
    w = torch.rand(250, 8, generator=gen)
    dz = torch.randn(250, 6, generator=gen) * 10.0 ** torch.randint(-6, 7, (250, 6), generator=gen)  # order-sensitive sums
    first = hml_triton.segment_bank_grad(dz, idx, w, 37, blocks=1, chunk=128)
    for blocks in (3, 7, 256, 256):
        assert torch.equal(hml_triton.segment_bank_grad(dz, idx, w, 37, blocks=blocks, chunk=128), first), blocks


def test_a_per_head_segment_reduce_is_the_same_bits_on_each_heads_rows(monkeypatch):
    """HIVE off: head h's bags read only head h's rows, so the reduce runs head by head, each on a count table
    of its head's n^2 rows (at the Llama size 256 counting blocks a head instead of 8 for all: the blocks test
    below), with the same bits as one reduce over all heads."""
    H, T, k, N, d = 3, 40, 4, 50, 6
    gen = torch.Generator().manual_seed(2)
    slots = _contributions(H * T, k, N, gen, hot=0.5).view(H, T, k)
    idx = (slots + N * torch.arange(H).view(H, 1, 1)).view(H * T, k)  # each head's rows offset, as _rows_in_table does
    w = torch.rand(H * T, k, generator=gen)
    dz = torch.randn(H * T, d, generator=gen) * 10.0 ** torch.randint(-6, 7, (H * T, d), generator=gen)
    tables = []
    order = hml_triton.segment_order
    monkeypatch.setattr(hml_triton, "segment_order",
                        lambda idx_, rows, blocks=256: tables.append((idx_.numel(), rows)) or order(idx_, rows, blocks))
    whole = hml_triton.segment_bank_grad(dz, idx, w, H * N, blocks=256, chunk=64)
    per_head = hml_triton.segment_bank_grad(dz, idx, w, H * N, blocks=256, chunk=64, groups=H)
    assert torch.equal(per_head, whole)
    assert tables == [(H * T * k, H * N)] + [(T * k, N)] * H  # (contributions, rows) of each reduce
    ref = torch.zeros(H * N, d, dtype=torch.float64).index_add_(
        0, idx.reshape(-1), (w[:, :, None].double() * dz[:, None, :].double()).reshape(-1, d))
    torch.testing.assert_close(per_head.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    with pytest.raises(ValueError, match="do not split into 7 equal groups"):
        hml_triton.segment_bank_grad(dz, idx, w, H * N, groups=7)


def test_the_counting_blocks_are_capped_by_the_contributions_and_the_table_size():
    recipe, llama, hive_off = 9 * 16384 * 32, 32 * 16384 * 32, 9 * 16384 * 32  # contributions at 16 x 1024 tokens
    assert hml_triton.segment_blocks(recipe, 128 * 128)[0] == 256
    assert hml_triton.segment_blocks(recipe, 128 * 128, 1024)[0] == 1024
    assert hml_triton.segment_blocks(llama, 256 * 256, 1024)[0] == 256  # a [65536, 256] int32 table: 64 MB
    # HIVE off as one table: few blocks, long chains (docs/hml.md); so the layer reduces head by head instead
    assert hml_triton.segment_blocks(hive_off, 9 * 128 * 128)[0] == 113
    assert hml_triton.segment_blocks(llama, 32 * 256 * 256)[0] == 8
    assert hml_triton.segment_blocks(hive_off // 9, 128 * 128)[0] == 256  # a head's share of the contributions
    assert hml_triton.segment_blocks(llama // 32, 256 * 256)[0] == 256
    assert hml_triton.segment_blocks(1000, 50)[0] == 4  # one block per 256 contributions at most
    for M, rows, asked in ((recipe, 16384, 256), (1000, 50, 256), (1, 1, 7), (12345, 70, 3)):
        blocks, per_block = hml_triton.segment_blocks(M, rows, asked)
        assert per_block % 64 == 0 and (blocks - 1) * per_block < M <= blocks * per_block  # every block has work


def test_the_segment_bank_grad_rejects_what_it_cannot_take():
    idx = torch.zeros(3, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="dz \\[B, d\\], idx"):
        hml_triton.segment_bank_grad(torch.randn(3, 4), idx, torch.rand(3, 3), 5)
    with pytest.raises(ValueError, match="float32"):
        hml_triton.segment_bank_grad(torch.randn(3, 4).double(), idx, torch.rand(3, 2), 5)


def test_the_fused_kernels_are_opt_in_by_name(monkeypatch):
    monkeypatch.setenv("MIDUS_HML_KERNELS", "")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert hml.resolve_backend("triton-fused", "cuda") == "triton-fused"
    assert hml.resolve_backend("triton-fused", "cpu") == "triton-fused"  # the interpreter
    assert hml.resolve_backend("auto", "cuda") in ("triton", "torch")  # never the fused kernels unless named
    assert hml.resolve_backend("triton-fused", "cuda", torch.float64) == "torch"  # it scores float32
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert hml.resolve_backend("triton-fused", "cpu") in ("cpu", "torch")  # no GPU, no interpreter: the CPU's
    monkeypatch.setenv("MIDUS_HML_KERNELS", "triton-fused")
    assert hml.resolve_backend(None, "cuda") == "triton-fused"
    assert hml.backend_words("triton-fused") == "fused Triton kernels"


def test_the_projection_after_the_fused_read_cuts_its_gradient_like_the_default_path(monkeypatch):
    """HIVE's projection on the fused path has the same split-K weight gradient as _PoolProject: cut in 3 pieces
    of the 15 tokens, the layer's every gradient still equals the one-GEMM layer's."""
    torch.manual_seed(0)
    layer = HeadwiseMemory(2, 8, 16, HMLConfig(n_subkeys=6, topk=4, latent_dim=5, init="random", kernels="triton-fused"))
    x = torch.randn(3, 5, 2, 8, requires_grad=True)

    def grads():
        layer.zero_grad()
        layer(x).square().sum().backward()
        return [layer.proj.grad.clone(), layer.keys.grad.clone(), layer.latent_bank.weight.grad.clone()]

    whole = grads()
    cut = []
    monkeypatch.setattr(hml, "_k_chunks", lambda tokens, device, dtype=None: cut.append(tokens) or 3)
    pieces = grads()
    assert cut == [15]
    for a, b in zip(pieces, whole):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_a_read_of_a_few_tokens_takes_the_decode_shaped_kernel_and_a_long_one_the_16_token_blocks(monkeypatch):
    launched = []
    real = hml_triton._memory_fwd_kernel

    class Spy:  # records each launch's grid and SMALL, then launches the real kernel
        def __getitem__(self, grid):
            def launch(*args, **blocks):
                launched.append(("small" if blocks["SMALL"] else "16-token", grid, blocks["BT"]))
                return real[grid](*args, **blocks)
            return launch

    monkeypatch.setattr(hml_triton, "_memory_fwd_kernel", Spy())
    H, dh, n, k, d = 3, 8, 6, 4, 5
    keys, table = torch.randn(H, 2, n, dh // 2), torch.randn(n * n, d)
    limit = hml_triton.SMALL_READ_MAX_TOKENS
    for T in (1, limit, limit + 1):
        q = torch.randn(T, H, dh)
        w, i, j, z = hml_triton.memory_forward(q, keys, table, k, 0, candidate_pairs(k, q.device))
        assert torch.equal(i * n + j, _read_reference(q, keys, table, k, 0)[1])
    # tiny blocks fit 16 tokens a decode-shaped program; past the limit, 16-token blocks of one head
    assert launched == [("small", (1, H), 1), ("small", (limit // 16, H), 16),
                        ("16-token", (triton.cdiv(limit + 1, 16), H), 16)]


def test_the_decode_shaped_read_fits_two_tokens_a_program_at_the_recipe_size_and_one_at_the_llama_size():
    """docs/hml.md's block sizes: 2 tokens a program at the recipe size (9 heads: 72 programs at batch 16), 1 at the
    Llama-3.2-1B size (32 heads: 512)."""
    def rows(H, dh, n, k, d):
        q, keys, table = torch.empty(16, H, dh), torch.empty(H, 2, n, dh // 2), torch.empty(n * n, d)
        return hml_triton._small_read_rows(16, hml_triton._memory_blocks(q, keys, table, k))

    assert rows(9, 64, 128, 32, 64) == 2 and 9 * triton.cdiv(16, 2) == 72
    assert rows(32, 64, 256, 32, 256) == 1 and 32 * 16 == 512
