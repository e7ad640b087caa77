"""Correctness tests of the Head-wise Memory Layer (midus_surgery/model/hml.py). CPU, fast."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from midus_surgery.model import hml
from midus_surgery.model.hml import (
    HeadwiseMemory,
    HMLConfig,
    LatentBank,
    candidate_pairs,
    hml_parameter_count,
    prepare_kernels,
    two_stage_topk,
)


@pytest.fixture(autouse=True, params=["fused", "torch", "torch-sync-free"])
def hml_path(request, monkeypatch):
    """Every test here runs on three paths: the compiled CPU kernels, the pure-torch code, and the
    pure-torch code with the accelerators' sync-free top-k (every row ranked by exact keys).

    "fused" makes a failed kernel build an error (midus_surgery.kernels), so it cannot pass by
    silently falling back to the torch path.
    """
    monkeypatch.setenv("MIDUS_HML_KERNELS", request.param.removesuffix("-sync-free"))
    if request.param.endswith("-sync-free"):
        # what CUDA runs; float64 keeps the checked path there too
        monkeypatch.setattr(hml, "_sync_free_topk", lambda values: values.dtype != torch.float64)
    return request.param


# ------------------------------------------------------------------ brute-force references
def brute_topk(s1: torch.Tensor, s2: torch.Tensor, k: int):
    """Top-k of the full n*n table; ties by lower flat slot (python sort, exact)."""
    n = s1.shape[-1]
    full = (s1[..., :, None] + s2[..., None, :]).reshape(-1, n * n)
    scores, slots = [], []
    for row in full.tolist():
        order = sorted(range(n * n), key=lambda i: (-row[i], i))[:k]
        slots.append(order)
        scores.append([row[i] for i in order])
    shape = s1.shape[:-1] + (k,)
    return torch.tensor(scores, dtype=s1.dtype).view(shape), torch.tensor(slots).view(shape)


def dense_reference(m: HeadwiseMemory, x: torch.Tensor, params: dict) -> torch.Tensor:
    """Straightforward HML: full n*n score table, torch.topk, dense gathers, einsum."""
    cfg, H, dh = m.config, m.num_heads, m.head_dim
    n, k = cfg.n_subkeys, cfg.topk
    if cfg.query_source == "hidden":
        flat_in = x.reshape(-1, m.hidden_size)
        q = (flat_in @ params["query_proj.weight"].t()).view(-1, H, dh)
    else:
        q = x.reshape(-1, H, dh)
        flat_in = q.reshape(-1, H * dh)
    if cfg.query_norm == "batch":  # standardised with the running statistics, then rms
        norm = m.query_norm
        q = (q - norm.running_mean) / norm.running_var.clamp_min(cfg.norm_eps).sqrt()
    if cfg.query_norm in ("rms", "batch"):
        q = q * torch.rsqrt(q.pow(2).mean(-1, keepdim=True) + cfg.norm_eps) * params["query_norm.weight"]
    elif cfg.query_norm == "layer":
        q = q - q.mean(-1, keepdim=True)
        q = q * torch.rsqrt(q.pow(2).mean(-1, keepdim=True) + cfg.norm_eps)
        q = q * params["query_norm.weight"] + params["query_norm.bias"]
    keys = params["keys"]  # [H, 2, n, dh/2]
    s1 = torch.einsum("thd,hnd->thn", q[..., : dh // 2], keys[:, 0])
    s2 = torch.einsum("thd,hnd->thn", q[..., dh // 2 :], keys[:, 1])
    full = (s1[..., :, None] + s2[..., None, :]).reshape(q.shape[0], H, n * n)
    sc, slots = full.topk(k, dim=-1)
    w = torch.softmax(sc, -1)
    if cfg.hive:
        rows = params["bank.weight"][slots]  # [T, H, k, d_l]
        z = (w[..., None] * rows).sum(-2)
        mh = torch.einsum("thl,hld->thd", z, params["proj"])
    else:
        vals = params["values"]  # [H, N, dh]
        rows = vals[torch.arange(H)[None, :, None], slots]  # [T, H, k, dh]
        mh = (w[..., None] * rows).sum(-2)
    out = mh.reshape(-1, H * dh)
    if cfg.gate:
        out = out * F.silu(flat_in @ params["gate.weight"].t())
    if m.out_proj is not None:
        out = out @ params["out_proj.weight"].t()
    lead = x.shape[:-1] if cfg.query_source == "hidden" else x.shape[:-2]
    return out.view(*lead, m.hidden_size)


def tiny(H=2, dh=8, D=None, **kw) -> HeadwiseMemory:
    base = dict(n_subkeys=6, topk=4, latent_dim=5, init="random")
    base.update(kw)
    return HeadwiseMemory(H, dh, D if D is not None else H * dh, HMLConfig(**base))


# ------------------------------------------------------------------ lookup exactness
def test_candidate_pairs_count():
    r, s = candidate_pairs(32, torch.device("cpu"))
    assert len(r) == 119  # sum_{i=1..32} floor(32/i)
    assert all((a + 1) * (b + 1) <= 32 for a, b in zip(r.tolist(), s.tolist()))


@pytest.mark.parametrize("n,k", [(5, 1), (6, 3), (8, 8), (9, 4), (12, 7)])
def test_two_stage_equals_bruteforce_random(n, k):
    g = torch.Generator().manual_seed(n * 100 + k)
    s1, s2 = torch.randn(3, 7, n, generator=g), torch.randn(3, 7, n, generator=g)
    sc, sl = two_stage_topk(s1, s2, k)
    bsc, bsl = brute_topk(s1, s2, k)
    assert torch.equal(sl, bsl)
    assert torch.equal(sc, bsc)


@pytest.mark.parametrize("n,k", [(4, 4), (6, 5), (8, 3), (10, 10)])
def test_two_stage_ties_lowest_slot_wins(n, k):
    # small integers: many exact ties in halves and in sums, all exactly representable
    g = torch.Generator().manual_seed(7 + n + k)
    s1 = torch.randint(-2, 3, (40, n), generator=g).float()
    s2 = torch.randint(-2, 3, (40, n), generator=g).float()
    s1[0] = 0.0  # a row of all-equal scores
    s2[0] = 0.0
    sc, sl = two_stage_topk(s1, s2, k)
    bsc, bsl = brute_topk(s1, s2, k)
    assert torch.equal(sl, bsl)
    assert torch.equal(sc, bsc)
    assert sl[0].tolist() == list(range(k))  # all tied: slots 0..k-1


def test_module_lookup_matches_bruteforce_with_ties():
    m = tiny(H=2, dh=4, n_subkeys=7, topk=5, query_norm="none")
    with torch.no_grad():
        m.keys.copy_(torch.randint(-1, 2, m.keys.shape).float())
    q = torch.randint(-1, 2, (11, 2, 4)).float()
    w, slots = m.lookup(q)
    s1 = torch.einsum("thd,hnd->htn", q[..., :2], m.keys[:, 0])
    s2 = torch.einsum("thd,hnd->htn", q[..., 2:], m.keys[:, 1])
    bsc, bsl = brute_topk(s1, s2, 5)
    assert torch.equal(slots, bsl)
    assert torch.allclose(w, torch.softmax(bsc, -1))


# ------------------------------------------------------------------ gradients
CONFIGS = [
    dict(),
    dict(gate=True, output_proj="always", query_norm="layer"),
    dict(hive=False, gate=True, query_norm="none"),
    dict(query_source="hidden", gate=True, query_norm="rms"),
    dict(bank_grad="embedding_bag"),
    dict(bank_grad="index_add", hive=False),
    dict(query_norm="batch"),
]


@pytest.mark.parametrize("kw", CONFIGS)
def test_matches_dense_reference_values_and_grads(kw):
    assert_matches_dense_reference(kw)


def assert_matches_dense_reference(kw: dict) -> None:
    """A tiny float64 layer built with ``kw``: its output and every gradient equal the dense reference's."""
    torch.manual_seed(0)
    D = 12 if kw.get("query_source") == "hidden" else 16
    m = tiny(H=2, dh=8, D=D, n_subkeys=6, topk=4, latent_dim=5, **kw).double()
    if kw.get("query_norm") == "batch":  # statistics as after some training, held while compared
        with torch.no_grad():
            m.query_norm.running_mean.normal_()
            m.query_norm.running_var.uniform_(0.5, 2.0)
        m.eval()  # the layer computes the same in eval mode; there the statistics stay
    shape = (3, 5, D) if kw.get("query_source") == "hidden" else (3, 5, 2, 8)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    out = m(x)
    g_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, [x] + list(m.parameters()), g_out)
    params = {k: v.detach().clone().requires_grad_(True) for k, v in m.named_parameters()}
    x2 = x.detach().clone().requires_grad_(True)
    ref = dense_reference(m, x2, params)
    rgrads = torch.autograd.grad(ref, [x2] + list(params.values()), g_out)
    assert torch.allclose(out, ref, atol=1e-12, rtol=1e-10)
    names = ["input"] + list(params)
    for name, a, b in zip(names, grads, rgrads):
        assert torch.allclose(a, b, atol=1e-10, rtol=1e-8), name


@pytest.mark.parametrize("kw", [dict(gate=True, output_proj="always"), dict(hive=False, gate=True), dict(bank_grad="index_add")])
def test_gradcheck_float64(kw):
    torch.manual_seed(1)
    m = tiny(H=2, dh=4, D=8, n_subkeys=4, topk=3, latent_dim=3, **kw).double()
    names = [n for n, _ in m.named_parameters()]
    x = torch.randn(2, 3, 2, 4, dtype=torch.float64, requires_grad=True)
    ps = [p.detach().clone().requires_grad_(True) for p in m.parameters()]

    def f(x, *ps):
        return torch.func.functional_call(m, dict(zip(names, ps)), (x,))

    assert torch.autograd.gradcheck(f, (x, *ps), eps=1e-6, atol=1e-6, rtol=1e-4)


# ------------------------------------------------------------------ identity at start
@pytest.mark.parametrize(
    "kw,factor",
    [(dict(), "proj"), (dict(init="zero_bank"), "bank.weight"), (dict(hive=False), "values"),
     (dict(gate=True, output_proj="always"), "proj"), (dict(query_norm="batch"), "proj")],
)
def test_identity_at_start_then_learns(kw, factor):
    torch.manual_seed(0)
    m = HeadwiseMemory(3, 8, 24, HMLConfig(n_subkeys=8, topk=4, latent_dim=6, **kw))
    x = torch.randn(2, 5, 3, 8)
    out = m(x)
    assert torch.count_nonzero(out) == 0
    target = torch.randn_like(out)
    (m(x) * target).sum().backward()
    grads = {n: p.grad for n, p in m.named_parameters()}
    assert grads[factor] is not None and torch.count_nonzero(grads[factor]) > 0
    torch.optim.SGD(m.parameters(), lr=0.1).step()
    assert torch.count_nonzero(m(x)) > 0


# ------------------------------------------------------------------ query_norm: batch
def test_batch_query_norm_starts_as_rms_and_learns_the_query_statistics():
    x = torch.randn(2, 7, 2, 8) * torch.linspace(0.5, 3.0, 8) + 2.0  # a shared offset and unequal scales
    batch, rms = tiny(query_norm="batch"), tiny(query_norm="rms")
    assert torch.equal(batch(x), rms(x))  # untouched statistics (0, 1): exactly rms, so exactly its slots
    norm = batch.query_norm
    assert int(norm.updates) == 1  # that was a training forward: the statistics come from it, for later batches
    q = x.reshape(-1, 2, 8)
    torch.testing.assert_close(norm.running_mean, q.mean(0))
    torch.testing.assert_close(norm.running_var, q.var(0, unbiased=False))
    mean_before = norm.running_mean.clone()
    batch(x + 1.0)  # later batches move them by the momentum
    torch.testing.assert_close(norm.running_mean, mean_before + 0.5)  # max(0.1, 1/2)
    frozen = {k: v.clone() for k, v in batch.state_dict().items()}
    batch.eval()
    batch(x)
    batch.train()
    with torch.no_grad():
        batch(x)
    norm.weight.requires_grad_(False)  # a frozen norm (frozen retrieval) keeps its statistics too
    batch(x)
    norm.weight.requires_grad_(True)
    assert all(torch.equal(v, batch.state_dict()[k]) for k, v in frozen.items())  # eval, no_grad, held: unmoved
    # the standardised queries read more slots than raw ones: the offset no longer picks them
    wide = tiny(H=2, dh=8, n_subkeys=16, topk=4, query_norm="batch")
    wide(x)
    used_batch = wide.lookup(x)[1].unique().numel()
    wide.query_norm.reset_statistics()
    assert wide.lookup(x)[1].unique().numel() < used_batch


def test_batch_query_norm_counts_its_updates_exactly_in_bf16():
    """bf16 counts whole numbers exactly only to 256: the counter stopped there (300 steps read 256).
    It now counts to 10, where the momentum max(0.1, 1/(updates+1)) reaches its floor."""
    m = tiny(query_norm="batch").to(torch.bfloat16)
    x = torch.randn(2, 7, 2, 8, dtype=torch.bfloat16)
    counts = []
    for _ in range(300):
        m(x)
        counts.append(float(m.query_norm.updates))
    assert counts[:10] == [float(i) for i in range(1, 11)] and set(counts[10:]) == {10.0}
    before = m.query_norm.running_mean.float().clone()
    m(x + 1)  # the 301st batch still moves the statistics by the floor momentum 0.1
    torch.testing.assert_close(m.query_norm.running_mean.float(), before + 0.1, atol=0.02, rtol=0)


def test_a_one_token_batch_leaves_the_running_statistics_bit_for_bit():
    """A micro-batch of one token has no spread: its statistics count for nothing (weight 0, gathered all the same so
    that every process joins the collective). Weighted by 0 through lerp they still turned a -0.0 statistic into
    0.0 and an inf into NaN (trial135 N1); they now leave every bit as it was, the update counter too."""
    from midus_surgery.model.hml import _HeadNorm

    norm = _HeadNorm("batch", 2, 4, 1e-6)
    torch.nn.init.ones_(norm.weight)
    norm.train()
    norm(torch.randn(5, 2, 4))
    norm.running_mean[0, 0] = -0.0
    norm.running_mean[0, 1] = float("inf")
    before = {k: v.clone() for k, v in norm.state_dict().items()}
    norm(torch.randn(1, 2, 4))  # one token
    for k, v in norm.state_dict().items():
        assert torch.equal(v.view(torch.int32) if v.dtype == torch.float32 else v, before[k].view(torch.int32)), k  # bitwise
    norm(torch.randn(3, 2, 4))  # a batch that counts still moves them
    assert float(norm.updates) == float(before["updates"]) + 1 and not torch.equal(norm.running_var, before["running_var"])


@pytest.mark.parametrize("reentrant", [False, True])
def test_batch_query_norm_gives_the_same_gradients_under_gradient_checkpointing(reentrant):
    """The recomputed forward ran with the statistics its first run had just updated: other queries,
    other slots, gradients 15-130% off (the loss itself the same). It now uses the first run's."""
    from torch.utils.checkpoint import checkpoint

    plain, ckpt = tiny(query_norm="batch"), tiny(query_norm="batch")
    ckpt.load_state_dict(plain.state_dict())
    for step in range(3):  # the statistics move every step
        x = (torch.randn(2, 7, 2, 8, generator=torch.Generator().manual_seed(step)) * 2 + step).requires_grad_()  # reentrant needs one
        plain(x).square().sum().backward()
        checkpoint(ckpt, x, use_reentrant=reentrant).square().sum().backward()
        for (name, a), (_, b) in zip(plain.named_parameters(), ckpt.named_parameters()):
            assert torch.equal(a.grad, b.grad), (step, name)
        assert all(torch.equal(v, ckpt.state_dict()[k]) for k, v in plain.state_dict().items())  # updated once per step
        plain.zero_grad(), ckpt.zero_grad()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lora_on_the_memory_layers_own_projections_takes_part(dtype):
    """The layer read query_proj's, gate's and out_proj's weights directly: PEFT wrapped those
    modules (`all-linear` picks them), and an adapter changed the output by exactly 0, its
    parameters never got a gradient. They are called as modules now, also in a bf16 model on the
    CPU (trial36: there the adapters still did nothing)."""
    from peft import LoraConfig, inject_adapter_in_model

    m = tiny(D=16, query_source="hidden", gate=True, output_proj="always").to(dtype)
    x = torch.randn(2, 5, 16, dtype=dtype)
    before = m(x).detach()
    targets = ["query_proj", "gate", "out_proj"]
    inject_adapter_in_model(LoraConfig(r=2, target_modules=targets, init_lora_weights=False), m)
    out = m(x)
    assert not torch.equal(out, before)
    out.square().sum().backward()
    lora = {n: p for n, p in m.named_parameters() if "lora_" in n}
    assert {n.split(".")[0] for n in lora} == set(targets)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora.values())


def test_batch_query_norm_keeps_training_causal():
    m = tiny(query_norm="batch")
    x = torch.randn(2, 6, 2, 8) + 1.0
    m(torch.randn_like(x))  # statistics from an earlier batch
    twin = tiny(query_norm="batch")
    twin.load_state_dict(m.state_dict())
    later_changed = x.clone()
    later_changed[:, -1] += 5.0
    a, b = m(x), twin(later_changed)  # both in training, both update their statistics
    assert torch.equal(a[:, :-1], b[:, :-1])  # no token's output depends on a later token of the batch
    assert not torch.equal(m.query_norm.running_mean, twin.query_norm.running_mean)


# ------------------------------------------------------------------ init, params, config
def test_same_seed_same_weights_and_name_keyed():
    cfg = HMLConfig(n_subkeys=8, topk=4, latent_dim=6, init="random")
    a, b = HeadwiseMemory(3, 8, 24, cfg), HeadwiseMemory(3, 8, 24, cfg)
    a.reset_parameters(seed=5)
    b.reset_parameters(seed=5)
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert list(pa) == list(pb) == ["keys", "proj", "query_norm.weight", "bank.weight"]
    for name in pa:
        assert torch.equal(pa[name], pb[name]), name  # the same seed: the same values, tensor by tensor
    b.reset_parameters(seed=6)
    pb = dict(b.named_parameters())
    for name in pa:  # another seed: every drawn tensor differs; the constant one (ones) does not
        assert torch.equal(pa[name], pb[name]) == (name == "query_norm.weight"), name
    # keyed by name: another layout (a gate, an output projection always) draws the same values for
    # every tensor the two have in common, and its own tensors from their own names
    c = HeadwiseMemory(3, 8, 24, dataclass_replace(cfg, gate=True, output_proj="always"))
    c.reset_parameters(seed=5)
    pc = dict(c.named_parameters())
    assert set(pc) == set(pa) | {"gate.weight", "out_proj.weight"}
    for name in pa:
        assert torch.equal(pc[name], pa[name]), name
    assert not torch.equal(pc["gate.weight"], pc["out_proj.weight"])  # same shape and scale, own streams
    # every parameter has a rule, and its values follow it
    for layer in (a, c, HeadwiseMemory(3, 8, 24, dataclass_replace(cfg, init="zero_proj"))):
        rules, params = layer.init_rules(), dict(layer.named_parameters())
        assert set(rules) == set(params)
        for name, rule in rules.items():
            v = params[name].detach()
            if rule == "zeros":
                assert torch.count_nonzero(v) == 0, name
            elif rule == "ones":
                assert torch.equal(v, torch.ones_like(v)), name
            elif rule.startswith("uniform"):
                bound = float(rule.split("±")[-1].rstrip(")"))
                assert v.abs().max() <= bound * (1 + 1e-3) and v.abs().max() > 0.8 * bound, (name, rule)
            else:
                std = float(rule.split(", ")[-1].rstrip(")"))
                assert abs(v.mean()) < 0.3 * std and 0.7 * std < v.std() < 1.3 * std, (name, rule, v.std())


def dataclass_replace(cfg, **kw):
    return HMLConfig.from_dict({**cfg.to_dict(), **kw})


@pytest.mark.parametrize(
    "kw",
    [dict(), dict(hive=False), dict(gate=True), dict(query_norm="layer", output_proj="always"),
     dict(query_source="hidden", gate=True), dict(query_norm="none"), dict(query_norm="batch")],
)
def test_meta_construction_and_parameter_count(kw):
    H, dh, D, n, k, dl = 4, 8, 48, 16, 4, 8
    cfg = HMLConfig(n_subkeys=n, topk=k, latent_dim=dl, **kw)
    with torch.device("meta"):
        m = HeadwiseMemory(H, dh, D, cfg)  # 4*8 != 48: out_proj needed for auto
    assert all(p.device.type == "meta" for p in m.parameters())
    # every tensor's shape, from the layer's definition (hml.py's docstring), by hand
    inner, hidden_q = H * dh, kw.get("query_source") == "hidden"
    want = {"keys": (H, 2, n, dh // 2)}
    if kw.get("hive", True):
        want |= {"bank.weight": (n * n, dl), "proj": (H, dl, dh)}
    else:
        want["values"] = (H, n * n, dh)
    norm = kw.get("query_norm", "rms")
    if norm != "none":
        want["query_norm.weight"] = (H, dh)
    if norm == "layer":
        want["query_norm.bias"] = (H, dh)
    if hidden_q:
        want["query_proj.weight"] = (inner, D)
    if kw.get("gate"):
        want["gate.weight"] = (inner, D if hidden_q else inner)
    want["out_proj.weight"] = (D, inner)
    assert {name: tuple(p.shape) for name, p in m.named_parameters()} == want
    # the totals and FLOPs per token, worked out by hand for H=4, d_h=8, hidden=48, n=16, k=4, d_l=8:
    #   params: keys 4*2*16*4 = 512; HIVE bank 256*8 = 2048 + proj 4*8*8 = 256 (or values 4*256*8 =
    #   8192); rms norm 32 (layer 64); query_proj 48*32 = 1536; gate 32*32 = 1024 (hidden: 48*32 =
    #   1536); out_proj 32*48 = 1536.
    #   MACs: scores 4*16*8 = 512; candidate sums 4*C = 32 (C = 8 pairs with (r+1)(s+1) <= 4);
    #   softmax 4*4 = 16; HIVE pool 4*4*8 + project 4*8*8 = 384 (values: 4*4*8 = 128); query_proj
    #   1536; gate 1024 + 32 (hidden: 1536 + 32); out_proj 1536. FLOPs = 2 * MACs.
    expected = {
        (): (4384, 2 * 2480),
        (("hive", False),): (10272, 2 * 2224),
        (("gate", True),): (5408, 2 * 3536),
        (("output_proj", "always"), ("query_norm", "layer")): (4416, 2 * 2480),
        (("gate", True), ("query_source", "hidden")): (7456, 2 * 5584),
        (("query_norm", "none"),): (4352, 2 * 2480),
        (("query_norm", "batch"),): (4384, 2 * 2480),  # its statistics are buffers, not parameters
    }[tuple(sorted(kw.items()))]
    assert len(candidate_pairs(k, torch.device("cpu"))[0]) == 8
    assert sum(math.prod(shape) for shape in want.values()) == expected[0]
    assert sum(p.numel() for p in m.parameters()) == hml_parameter_count(H, dh, D, cfg) == expected[0]
    assert m.flops_per_token() == expected[1]


def test_paper_size_parameter_count():
    cfg = HMLConfig(n_subkeys=256, topk=32, latent_dim=256, query_norm="none")
    # Llama-3.2-1B: keys 0.5M + bank 16.8M + proj 0.5M
    assert hml_parameter_count(32, 64, 2048, cfg) == 32 * 256 * 64 + 65536 * 256 + 32 * 256 * 64
    assert hml_parameter_count(32, 64, 2048, cfg, include_bank=False) == 2 * 32 * 256 * 64


def test_shared_bank_not_in_state_dict_and_accumulates():
    cfg = HMLConfig(n_subkeys=8, topk=4, latent_dim=6, init="random")
    owner = torch.nn.Module()
    owner.bank = LatentBank(8, 6)
    owner.bank.reset_parameters(seed=1)
    owner.m0 = HeadwiseMemory(2, 8, 16, cfg, bank=owner.bank)
    owner.m1 = HeadwiseMemory(2, 8, 16, cfg, bank=owner.bank)
    keys = set(owner.state_dict())
    assert "bank.weight" in keys and not any(k.startswith("m0.bank") or k.startswith("m1.bank") for k in keys)
    assert sum(p.numel() for p in owner.m0.parameters()) == hml_parameter_count(2, 8, 16, cfg, include_bank=False)
    assert owner.m0.latent_bank is owner.bank and owner.m0.shares_bank
    x = torch.randn(3, 2, 8)
    owner.m0(x).sum().backward()
    g0 = owner.bank.weight.grad.clone()
    owner.m1(x).sum().backward()
    assert not torch.equal(owner.bank.weight.grad, g0)
    before = owner.bank.weight.detach().clone()
    owner.m0.reset_parameters(seed=9)  # never touches the shared bank
    assert torch.equal(owner.bank.weight, before)


def test_config_roundtrip_and_validation():
    cfg = HMLConfig(n_subkeys=16, topk=8, gate=True)
    assert HMLConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown"):
        HMLConfig.from_dict({**cfg.to_dict(), "bogus": 1})
    bad = [dict(topk=300), dict(query_norm="group"), dict(output_proj="sometimes"), dict(init="ones"),
           dict(n_subkeys=0), dict(query_source="x"), dict(bank_grad="x")]
    for kw in bad:
        with pytest.raises(ValueError):
            HMLConfig(**kw)
    with pytest.raises(ValueError, match="even"):
        HeadwiseMemory(2, 7, 14, HMLConfig(n_subkeys=8, topk=4, latent_dim=4))
    with pytest.raises(ValueError, match="never"):
        HeadwiseMemory(2, 8, 20, HMLConfig(n_subkeys=8, topk=4, latent_dim=4, output_proj="never"))
    with pytest.raises(ValueError, match="shared bank"):
        HeadwiseMemory(2, 8, 16, HMLConfig(n_subkeys=8, topk=4, latent_dim=4), bank=LatentBank(8, 5))
    m = HeadwiseMemory(2, 8, 16, HMLConfig(n_subkeys=8, topk=4, latent_dim=4))
    with pytest.raises(ValueError):
        m(torch.randn(3, 3, 8))


# ------------------------------------------------------------------ dtypes, shapes, autocast, compile
@pytest.mark.parametrize("lead", [(), (5,), (2, 3, 4)])
def test_leading_shapes(lead):
    m = tiny(H=2, dh=8, D=16)
    x = torch.randn(*lead, 2, 8)
    out = m(x)
    assert out.shape == (*lead, 16)
    flat = m(x.reshape(-1, 2, 8)).reshape(*lead, 16)
    assert torch.allclose(out, flat)


def test_float32_and_bfloat16():
    torch.manual_seed(0)
    m = tiny(H=2, dh=8, D=24, n_subkeys=8, topk=4, latent_dim=6, gate=True)
    x = torch.randn(4, 7, 2, 8)
    out32 = m(x)
    assert out32.dtype == torch.float32
    mb = tiny(H=2, dh=8, D=24, n_subkeys=8, topk=4, latent_dim=6, gate=True).to(torch.bfloat16)
    outb = mb(x.bfloat16())
    assert outb.dtype == torch.bfloat16 and torch.isfinite(outb.float()).all()
    outb.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.bfloat16 for p in mb.parameters())
    # same lookup on most tokens: compare where the bf16 output is close
    close = torch.isclose(outb.float(), out32, atol=5e-2, rtol=5e-2).float().mean()
    assert close > 0.8


def test_autocast_cpu_bf16():
    """Under autocast the read (scores, top-k, softmax, pooling) runs as without it, in float32; the layer's own
    Linear projections (gate, output, query_proj) run in autocast's dtype, as every Linear of the model does."""
    torch.manual_seed(0)
    read_only = tiny(H=2, dh=8, D=16)  # no projection of its own: the whole output is the read
    x = torch.randn(3, 4, 2, 8)
    ref = read_only(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = read_only(x)
        w, slots = read_only.lookup(x)
    assert out.dtype == torch.float32 and torch.equal(out, ref)
    assert [torch.equal(a, b) for a, b in zip((w, slots), read_only.lookup(x))] == [True, True]
    m = tiny(H=2, dh=8, D=24, gate=True)  # a gate, and an output projection (2 x 8 != 24)
    seen = []
    for name in ("gate", "out_proj"):
        getattr(m, name).register_forward_hook(lambda mod, args, y, name=name: seen.append((name, y.dtype)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x)
    assert seen == [("gate", torch.bfloat16), ("out_proj", torch.bfloat16)] and out.dtype == torch.float32
    assert not torch.equal(out, m(x))  # the projections' bf16 rounding shows
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x.bfloat16())
        out.float().sum().backward()
    assert out.dtype == torch.bfloat16 and m.keys.grad is not None


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_hooked_projection_computes_what_a_plain_one_does(dtype, autocast):
    """A forward hook that does nothing on the layer's own projections changed a bf16 model's logits on CPU: a plain
    projection computed in float32 from its cast weight, a hooked one (as accelerate's offload hooks it) in bf16
    (trial62). Every projection is now called as a module, in its weight's dtype or autocast's: the same bits."""
    torch.manual_seed(0)
    m = tiny(H=2, dh=8, D=24, query_source="hidden", gate=True, output_proj="always").to(dtype)
    x = torch.randn(2, 30, 24, dtype=dtype)  # few tokens: where the layer once computed a plain projection in float32

    def run():
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return m(x)

    plain = run()
    hooks = [getattr(m, name).register_forward_hook(lambda mod, args, y: None) for name in ("query_proj", "gate", "out_proj")]
    hooked = run()
    for hook in hooks:
        hook.remove()
    assert torch.equal(hooked, plain)


def test_torch_compile_small():
    torch._dynamo.reset()
    m = tiny(H=2, dh=8, D=16, gate=True)
    x = torch.randn(2, 3, 2, 8, requires_grad=True)
    ref = m(x)
    cm = torch.compile(m, backend="aot_eager")
    out = cm(x)
    assert torch.allclose(out, ref, atol=1e-6)
    out.sum().backward()
    assert x.grad is not None and m.proj.grad is not None


@pytest.mark.parametrize("kw", [dict(), dict(hive=False), dict(bank_grad="embedding_bag"), dict(bank_grad="index_add")])
def test_backward_called_inside_autocast_gives_the_fp32_gradients(kw):
    """Training loops may call backward() inside their autocast region; the lookup and pooling
    backward still run in their own precision (as their forward does), so the gradients equal
    those of a plain backward. (The optional gate / output projection are plain F.linear, whose
    built-in backward autocast does recast: `midus-surgery train` calls backward outside autocast.)"""
    torch.manual_seed(0)
    m = HeadwiseMemory(2, 8, 16, HMLConfig(n_subkeys=6, topk=4, latent_dim=5, init="random", **kw))
    x = torch.randn(3, 5, 2, 8)
    grads = []
    for backward_in_autocast in (False, True):
        m.zero_grad()
        xi = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = m(xi).square().sum()
            if backward_in_autocast:
                loss.backward()
        if not backward_in_autocast:
            loss.backward()
        grads.append([xi.grad] + [p.grad.clone() for p in m.parameters()])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


@pytest.mark.parametrize("bank_grad", ["auto", "sparse_mm", "embedding_bag", "index_add"])
def test_bf16_layer_backward_accumulates_like_fp32(bank_grad):
    """A bf16 layer's bank and weight gradients come from fp32 accumulation: equal to the fp32
    backward of the same (bf16-valued) inputs, rounded once to bf16."""
    torch.manual_seed(0)
    m = HeadwiseMemory(2, 8, 16, HMLConfig(n_subkeys=6, topk=4, latent_dim=5, init="random", bank_grad=bank_grad))
    mb = HeadwiseMemory(2, 8, 16, HMLConfig(n_subkeys=6, topk=4, latent_dim=5, init="random", bank_grad=bank_grad)).to(torch.bfloat16)
    m.load_state_dict({k: v.float() for k, v in mb.state_dict().items()})
    x = torch.randn(3, 5, 2, 8).to(torch.bfloat16)
    yb = mb(x)
    y = m(x.float())
    gy = torch.randn_like(y).to(torch.bfloat16)
    yb.backward(gy)
    y.backward(gy.float())
    bank, bank32 = mb.latent_bank.weight.grad, m.latent_bank.weight.grad
    assert bank.dtype == torch.bfloat16
    assert torch.allclose(bank.float(), bank32, rtol=2e-2, atol=1e-2)


def test_bank_grad_auto_picks_the_measured_fastest_per_device():
    # docs/hml.md: sparse_mm on the CPU's pure-torch path; on CUDA embedding_bag (no coalesce, no host sync)
    assert hml._bank_grad_method("auto", "cpu") == "sparse_mm"
    assert hml._bank_grad_method("auto", "cuda") == "embedding_bag"
    assert hml._bank_grad_method("index_add", "cuda") == "index_add"  # an explicit choice stands
    assert HMLConfig().bank_grad == "auto"


@pytest.mark.parametrize("hive", [True, False])
def test_bank_grad_auto_on_cpu_is_sparse_mm_exactly(hive):
    grads = {}
    for mode in ("auto", "sparse_mm"):
        torch.manual_seed(0)
        m = HeadwiseMemory(2, 8, 16, HMLConfig(n_subkeys=6, topk=4, latent_dim=5, init="random", hive=hive, bank_grad=mode))
        x = torch.randn(3, 5, 2, 8, requires_grad=True)
        m(x).square().sum().backward()
        grads[mode] = [x.grad] + [p.grad for p in m.parameters()]
    for a, b in zip(grads["auto"], grads["sparse_mm"]):
        assert torch.equal(a, b)


def test_off_the_cpu_the_kernel_question_is_answered_from_the_device_alone(monkeypatch):
    """Under torch.compile the device is a constant but the CPU kernels' question (an import, maybe
    a build) is a call dynamo may not trace: reaching it off the CPU broke the graph in every Memory
    block. A layer answers CUDA when it is built (no build involved) and other devices from the
    device alone. The whole-layer check (one graph on CUDA) is in tools/gpu_check_hml.py."""
    m = HeadwiseMemory(2, 8, 16, HMLConfig(n_subkeys=8, topk=4, latent_dim=4))

    def untraceable(*args, **kwargs):
        raise AssertionError("reached the CPU-kernel check")

    monkeypatch.setattr(hml, "_cpu_kernels_built", untraceable)
    monkeypatch.setattr(hml, "resolve_backend", untraceable)  # nothing left to resolve off the CPU
    assert m._backend(torch.empty(2, device="meta")) == "torch"
    assert m._backend(torch.empty(2, device="meta", dtype=torch.float64)) == "torch"
    assert ("cuda", False) in m._backends and ("cuda", True) in m._backends
    with pytest.raises(AssertionError, match="CPU-kernel check"):
        m._backend(torch.empty(2))


def test_on_the_cpu_a_compiled_layer_keeps_its_kernels_in_one_graph(monkeypatch):
    """Once an eager call has answered "use the CPU kernels?", torch.compile reads the answer
    instead of calling out of the graph: the layer (custom ops and their fake kernels included)
    traces whole, and the compiled layer gives the eager values and gradients."""
    monkeypatch.setenv("MIDUS_HML_KERNELS", "fused")
    torch.manual_seed(0)
    m = HeadwiseMemory(2, 8, 16, HMLConfig(n_subkeys=8, topk=4, latent_dim=4, init="random"))
    x = torch.randn(6, 2, 8, requires_grad=True)
    eager = m(x)
    eager_grads = torch.autograd.grad(eager.square().sum(), [x, m.keys])
    torch._dynamo.reset()
    explained = torch._dynamo.explain(lambda t: m(t))(x)
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons
    torch._dynamo.reset()
    compiled = torch.compile(m)(x)
    torch.testing.assert_close(compiled, eager)
    for a, b in zip(torch.autograd.grad(compiled.square().sum(), [x, m.keys]), eager_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("kernels", ["torch", "fused"])
@pytest.mark.parametrize("kw", [dict(), dict(hive=False), dict(query_norm="batch", gate=True, output_proj="always")])
def test_a_read_without_gradients_runs_no_autograd_function_and_gives_the_same_values(monkeypatch, kernels, kw, dtype):
    """Decode and evaluation (gradients off, or nothing that requires one) call the Functions' forward math
    directly (on the compiled CPU kernels: midus_hml::read, one call): no node is built, the values are the
    training forward's to the bit."""
    torch.manual_seed(0)
    m = tiny(H=3, dh=8, D=20, n_subkeys=12, topk=5, kernels=kernels, **kw).eval().to(dtype)
    x = torch.randn(2, 7, 3, 8, dtype=dtype)
    ref = m(x)  # parameters require grad: through the autograd Functions
    ref_w, ref_slots = m.lookup(x)
    assert ref.grad_fn is not None and ref_w.grad_fn is not None

    def refuse(*args, **kwargs):
        raise AssertionError("an autograd Function ran without a gradient to record")

    for function in (hml._Lookup, hml._PoolProject, hml._Pool):
        monkeypatch.setattr(function, "apply", refuse)
    with torch.no_grad():
        out = m(x)
        w, slots = m.lookup(x)
    assert torch.equal(out, ref.detach()) and torch.equal(w, ref_w.detach()) and torch.equal(slots, ref_slots)
    if kernels == "fused":  # the compiled kernels read in one call
        with torch.profiler.profile() as prof, torch.no_grad():
            m(x)
        assert "midus_hml::read" in {e.name for e in prof.events()}
    m.requires_grad_(False)  # gradients on, but a frozen layer fed constants records nothing either
    out = m(x)
    assert out.grad_fn is None and torch.equal(out, ref.detach())
    with pytest.raises(AssertionError, match="autograd Function ran"):  # an input that wants a gradient does
        m(x.requires_grad_(True))


# ------------------------------------------------------------------ split-K weight gradients (the CUDA path)
def test_weight_gradient_pieces_follow_the_token_count_on_cuda_in_float32_only():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    tokens = (16 * 1024, 8 * 1024, 4096, 6144, 4 * 256, 3072, 16383, 3)
    # 8 to 32 pieces of at least 512 tokens, or one GEMM: 2 pieces of 4 x 256 tokens doubled the product's time
    assert [hml._k_chunks(t, cuda) for t in tokens] == [32, 16, 8, 8, 1, 1, 1, 1]
    assert hml._k_chunks(16 * 1024, cpu) == 1
    assert hml._k_chunks(16 * 1024, cuda, torch.bfloat16) == 1  # a bf16 GEMM was faster whole (H200)
    assert hml._k_chunks(16 * 1024, cuda, torch.float32) == 32


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_weight_gradient_in_pieces_equals_one_gemm_on_the_layers_strided_views(dtype):
    torch.manual_seed(0)
    T, H2, n, half = 12, 4, 6, 5
    ds = torch.randn(H2, T, n, dtype=dtype)  # as _Lookup's backward: [2H, T, n], then transposed
    qh = torch.randn(T, H2, half, dtype=dtype).transpose(0, 1)  # [2H, T, dh/2], a transposed view of q
    whole = torch.bmm(ds.transpose(1, 2).double(), qh.double())
    for chunks in (1, 2, 3, 4):
        got = hml._weight_grad_bmm(ds.transpose(1, 2), qh, chunks)
        assert got.dtype == dtype and got.shape == (H2, n, half)
        tol = dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else dict(atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got.double(), whole, **tol)


@pytest.mark.parametrize("kw", [dict(), dict(hive=False), dict(query_source="hidden")])
def test_the_layer_with_weight_gradients_in_pieces_matches_the_dense_reference(kw, monkeypatch, hml_path):
    """The keys' and the projection's gradients cut into 3 pieces of the 15 tokens (what CUDA does at 16 x 1024):
    every value and gradient still equals the dense float64 reference."""
    cut = []
    monkeypatch.setattr(hml, "_k_chunks", lambda tokens, device, dtype=None: cut.append(tokens) or (3 if tokens % 3 == 0 else 1))
    assert_matches_dense_reference(kw)
    # the gradients were cut (3 x 5 tokens); the CPU kernels' own lookup backward has no GEMM, and without HIVE
    # there is no projection
    assert set(cut) == (set() if hml_path == "fused" and kw.get("hive") is False else {15})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_layer_offloaded_by_accelerate_reads_every_weight_through_its_hooks(dtype):
    """accelerate's offload keeps each module's weights on the meta device and loads them when the
    module is called. The bank (read as an attribute) and, in bfloat16 on CPU, the query projection,
    gate and output projection (read as weights to compute in float32) were read without their call:
    the logits came out wrong, with no error (trial51)."""
    from accelerate.hooks import attach_align_device_hook, remove_hook_from_submodules

    torch.manual_seed(0)
    layer = HeadwiseMemory(2, 8, 24, HMLConfig(n_subkeys=8, topk=4, latent_dim=6, init="random", query_source="hidden",
                                               gate=True, output_proj="always")).to(dtype).eval()
    x = torch.randn(3, 5, 24, dtype=dtype)
    with torch.no_grad():
        expected = layer(x)
        weights = {name: tensor.clone() for name, tensor in layer.state_dict().items()}
        attach_align_device_hook(layer, execution_device=torch.device("cpu"), offload=True, weights_map=weights)
        assert layer.latent_bank.weight.device.type == "meta" and layer.gate.weight.device.type == "meta"
        got = layer(x)
        remove_hook_from_submodules(layer)
    assert torch.equal(got, expected)  # in bf16 too: every projection is called as a module (trial62)


def test_a_batch_query_norm_out_of_training_compiles_to_one_graph(hml_path):
    """Evaluation asked torch._C._current_graph_task_id() (is this checkpointing's recompute?) on every
    call, which Dynamo cannot trace: a MIDUS model with `query_norm: batch` broke its graph at every
    Memory block (trial51). Out of training nothing was tracked, so the question is not asked."""
    torch.manual_seed(0)
    layer = HeadwiseMemory(2, 8, 16, HMLConfig(n_subkeys=8, topk=4, latent_dim=6, init="random", query_norm="batch"))
    prepare_kernels(layer, "cpu")  # as before any torch.compile on CPU: the backend answered outside the graph
    layer.train()
    layer(torch.randn(6, 2, 8)).sum().backward()  # a training step: the statistics move, and the step's are kept
    layer.eval()
    x = torch.randn(5, 2, 8)
    with torch.no_grad():
        expected = layer(x)
        torch._dynamo.reset()
        explained = torch._dynamo.explain(layer)(x)
        assert not [r for r in explained.break_reasons if "graph_task" in str(r) or "_in_backward" in str(r)]
        if hml_path != "torch":  # the checked exact top-k of the "torch" path syncs (.item()): a break of its own
            assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons[:2]
        torch.testing.assert_close(torch.compile(layer, backend="aot_eager")(x), expected)
    torch._dynamo.reset()


@pytest.mark.parametrize("source", ["heads", "hidden"])
def test_an_empty_batch_gives_an_empty_output_as_the_ffn_does(source):
    """Zero tokens raised "cannot reshape tensor of 0 elements" on every path (trial61); the FFN it replaces
    takes them. Now an empty output of the FFN's shape, in the input's graph."""
    layer = HeadwiseMemory(4, 16, 64, HMLConfig(n_subkeys=16, topk=8, latent_dim=32, init="random", query_source=source, gate=True))
    x = torch.randn(*((2, 0, 4, 16) if source == "heads" else (2, 0, 64)), requires_grad=True)
    y = layer(x)
    assert y.shape == (2, 0, 64) and y.dtype == x.dtype
    y.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape
    with torch.no_grad():
        assert layer(x).shape == (2, 0, 64)
    assert layer(x[:, :0].new_zeros(*x.shape[:1], 3, *x.shape[2:])).shape == (2, 3, 64)  # and tokens again after it
