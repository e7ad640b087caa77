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


@pytest.mark.parametrize("kw", [dict(), dict(hive=False), dict(query_source="hidden", gate=True)])
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
            return lambda *a: called.append(name) or real(*a)

        monkeypatch.setattr(kernels, "triton_kernel", recorded)
        layer.zero_grad()
        xi = x.clone().requires_grad_()
        out = layer(xi)
        out.pow(2).sum().backward()
        assert called == (["topk2", "bag_dw"] if triton else [])  # the path under test really ran
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
    with pytest.raises(RuntimeError, match="MIDUS_HML_KERNELS=triton but triton cannot be imported"):
        kernels.triton_kernel("topk2")


def test_the_start_line_names_the_backend_the_layers_run_on(monkeypatch):
    def words(mode):
        layer = HeadwiseMemory(2, 8, 16, HMLConfig(n_subkeys=6, topk=4, latent_dim=5, kernels=mode))
        return hml.backend_words(hml.prepare_kernels(torch.nn.Sequential(layer), "cpu"))

    assert words("torch") == "pure-torch path"
    assert words("auto") == ("compiled CPU kernels" if kernels.cpu_ops() is not None else "pure-torch path")
    assert words("triton") == "Triton kernels"  # under the interpreter (tests/conftest.py)
    assert hml.prepare_kernels(torch.nn.Linear(2, 2), "cpu") == "torch"  # no memory layer
