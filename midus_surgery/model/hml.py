"""Head-wise Memory Layer (HML) with HIVE values, the FFN replacement of MIDUS Memory blocks.

Self-contained on purpose: this file imports only ``torch`` and the Python standard library,
because it is copied beside emitted model weights and loaded with ``trust_remote_code``
without ``midus_surgery`` installed.  See ``docs/hml.md`` for the math, the knobs and the
measured speed.

Shapes (T = tokens after flattening the leading dims, H heads of width d_h, n sub-keys per
half, k = top-k, N = n*n slots per head, d_l = latent width):

    q      [T, H, d_h]        per-head queries (optionally normalised per head)
    keys   [H, 2, n, d_h/2]   two sub-key sets per head
    s      [H, 2, T, n]       half scores (float32, always)
    slots  [H, T, k]          exact top-k slots of the n*n table (two-stage lookup)
    w      [H, T, k]          softmax of the k slot scores
    z      [H, T, d_l]        z = sum_i w_i * bank[slot_i]          (pool first ...)
    m      [H, T, d_h]        m = z @ proj[h]                       (... project after)
    out    [T, H*d_h] -> (gate) -> (out_proj) -> [..., hidden]

Tie rule (documented, tested): slots are ranked by score (descending), equal scores by the
lower flat slot index ``i*n + j`` (i, j = sub-key indices of the two halves).  The two-stage
lookup returns exactly the first k slots of the full n*n table in that order whenever equal
sums come from equal sub-scores (always true in exact arithmetic); two *different* sums that
round to the same float32 are ranked by the same rule only up to that rounding.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "KERNELS",
    "BACKENDS",
    "HMLConfig",
    "LatentBank",
    "HeadwiseMemory",
    "hml_parameter_count",
    "two_stage_topk",
    "candidate_pairs",
    "kernels_from_environment",
    "resolve_backend",
    "backend_words",
    "use_kernels",
    "prepare_kernels",
]

_QUERY_NORMS = ("none", "rms", "layer", "batch")
_OUTPUT_PROJ = ("auto", "always", "never")
_QUERY_SOURCES = ("heads", "hidden")
_INITS = ("zero_proj", "zero_bank", "random")
_BANK_GRADS = ("auto", "sparse_mm", "embedding_bag", "index_add", "segment")
# What a layer may be told to run on (HMLConfig.kernels; MIDUS_HML_KERNELS is the default):
#   auto    the fastest available: Triton on CUDA, the compiled CPU kernels on CPU, else pure torch;
#   fused   as auto, but a failed build of the CPU kernels is an error instead of a one-time warning;
#   torch   the pure-torch code everywhere (what an emitted model runs without midus_surgery);
#   triton  Triton on CUDA, an error if triton is missing; under TRITON_INTERPRET=1 on CPU tensors
#           too (Triton's interpreter: how the tests check the kernels without a GPU).
#   triton-fused  as triton, with the whole read (scores, selection, softmax, pooled gather) in one
#           kernel and its backward in another; opt-in until timed on a GPU (docs/hml.md).
KERNELS = ("auto", "fused", "torch", "triton", "triton-fused")
# The query norm computes in float32: a smaller epsilon is 0 or subnormal there (flushed to 0 on some devices), and a
# zero query (a pad position's) normalises to 0/0 = NaN, which reaches the real tokens of a padded batch (trial99 W3)
MIN_NORM_EPS = torch.finfo(torch.float32).tiny


@dataclass(frozen=True)
class HMLConfig:
    """Knobs of one Head-wise Memory Layer.

    Fields beyond the issue's interface (all with defaults):
      norm_eps   epsilon of the per-head query norm.
      bank_grad  how the latent-bank (or value-table) gradient is accumulated on the backward:
                 "sparse_mm" (dU = A^T @ dz with A the sparse [bags, slots] weight matrix,
                 COO, one torch.sparse.mm), "embedding_bag" (PyTorch's embedding-bag
                 backward), "index_add" (rows w_i * dz index-added in chunks), "segment"
                 (the Triton kernels' deterministic segment reduce, kernels/hml_triton.py;
                 on a path without Triton kernels it means "auto") or "auto" (default: the
                 fastest measured on the table's device, see _bank_grad_method).  All give a
                 dense gradient (so any optimiser works); the timings are in docs/hml.md.
      kernels    what the layer runs on (docs/hml.md, "Compiled CPU kernels" and "Triton
                 kernels"): one of KERNELS, or None (default): MIDUS_HML_KERNELS when the layer
                 is built, "auto" when unset. Not a weight: it changes the speed, not the values
                 (to float rounding). None is left out of ``to_dict`` (an output's config.json),
                 so an emitted model runs on what its loader's environment says unless the
                 recipe named one; ``use_kernels`` switches a built model's layers.
    """

    n_subkeys: int = 256
    topk: int = 32
    latent_dim: int = 256
    hive: bool = True
    query_norm: str = "rms"
    gate: bool = False
    output_proj: str = "auto"
    query_source: str = "heads"
    init: str = "zero_proj"
    norm_eps: float = 1e-6
    bank_grad: str = "auto"
    kernels: Optional[str] = None

    def __post_init__(self) -> None:
        for name in ("n_subkeys", "topk", "latent_dim"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"HMLConfig.{name} must be a positive int, got {v!r}")
        if self.topk > self.n_subkeys:
            raise ValueError(f"HMLConfig.topk ({self.topk}) must be <= n_subkeys ({self.n_subkeys})")
        if self.n_subkeys > 46340:  # n*n must fit comfortably in int32-sized slot ids
            raise ValueError(f"HMLConfig.n_subkeys too large ({self.n_subkeys}); n*n must be < 2**31")
        if not isinstance(self.hive, bool) or not isinstance(self.gate, bool):
            raise ValueError("HMLConfig.hive and HMLConfig.gate must be bools")
        choices = {
            "query_norm": _QUERY_NORMS,
            "output_proj": _OUTPUT_PROJ,
            "query_source": _QUERY_SOURCES,
            "init": _INITS,
            "bank_grad": _BANK_GRADS,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"HMLConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if not (isinstance(self.norm_eps, (int, float)) and self.norm_eps >= MIN_NORM_EPS):
            raise ValueError(f"HMLConfig.norm_eps must be at least {MIN_NORM_EPS!r} (float32's smallest normal number, which the "
                             f"query norm computes in), got {self.norm_eps!r}")
        if self.kernels is not None and self.kernels not in KERNELS:
            raise ValueError(f"HMLConfig.kernels must be one of {KERNELS} or None, got {self.kernels!r}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if d["kernels"] is None:  # the environment's at build time: nothing to write down
            del d["kernels"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "HMLConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown HMLConfig keys: {unknown} (known: {sorted(known)})")
        return cls(**d)


# ----------------------------------------------------------------------------------------
# Initialisation helpers
# ----------------------------------------------------------------------------------------


def _generator(seed: int, name: str) -> torch.Generator:
    """A CPU generator whose state depends only on (seed, parameter name)."""
    digest = hashlib.sha256(f"midus-hml:{int(seed)}:{name}".encode()).digest()
    g = torch.Generator(device="cpu")
    g.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return g


@torch.no_grad()
def _fill(param: Tensor, rule: str, seed: int, name: str, scale: float = 0.0) -> None:
    """Fill ``param`` in place: values drawn on CPU in float32, then copied (any device/dtype)."""
    if param.device.type == "meta":
        return
    if rule == "zeros":
        param.zero_()
        return
    if rule == "ones":
        param.fill_(1.0)
        return
    g = _generator(seed, name)
    buf = torch.empty(param.shape, dtype=torch.float32)
    if rule == "normal":
        buf.normal_(0.0, scale, generator=g)
    elif rule == "uniform":
        buf.uniform_(-scale, scale, generator=g)
    else:  # pragma: no cover - internal
        raise ValueError(rule)
    param.copy_(buf)


# ----------------------------------------------------------------------------------------
# Kernel backends: compiled for the CPU; Triton on CUDA; pure torch everywhere
# ----------------------------------------------------------------------------------------

BACKENDS = ("triton", "triton-fused", "cpu", "torch")  # what runs for one tensor: the answer of resolve_backend
_BACKEND_WORDS = {"triton": "Triton kernels", "triton-fused": "fused Triton kernels", "cpu": "compiled CPU kernels",
                  "torch": "pure-torch path"}
_TRITON_MIN = (3, 6)  # the oldest triton the kernels were run with (tl.topk and tl.gather on int64 keys)


def kernels_from_environment() -> str:
    """``MIDUS_HML_KERNELS`` (one of KERNELS), "auto" when unset: the default of ``HMLConfig.kernels``."""
    value = os.environ.get("MIDUS_HML_KERNELS", "").strip().lower() or "auto"
    if value not in KERNELS:
        raise ValueError(f"MIDUS_HML_KERNELS must be one of {KERNELS}, got {value!r}")
    return value


def resolve_backend(kernels: Optional[str], device, dtype: torch.dtype = torch.float32, *, build: bool = True) -> str:
    """Which implementation runs for a tensor on ``device`` of ``dtype`` under ``kernels`` (one of
    KERNELS; None: the environment's): "triton", "cpu" (the compiled CPU kernels) or "torch".

    The one place that answers it. On CPU it asks for the compiled kernels, which builds them the
    first time (about 30 s, then cached): call it eagerly, before ``torch.compile`` (a layer keeps
    its answers, so the compiled layer reads constants; see ``prepare_kernels``). float64 never
    runs on Triton (the kernels rank float32). This file works alone (copied beside emitted
    weights): without midus_surgery installed the pure-torch path runs. ``build=False``: the answer a
    successful build would give, with nothing built (``train --dry-run``).
    """
    kernels = kernels_from_environment() if kernels is None else kernels
    if kernels not in KERNELS:
        raise ValueError(f"kernels must be one of {KERNELS}, got {kernels!r}")
    device_type = torch.device(device).type
    if kernels == "torch" or device_type not in ("cpu", "cuda"):
        return "torch"
    if dtype != torch.float64:
        interpreted = device_type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"
        if kernels == "triton-fused" and (device_type == "cuda" or interpreted):
            return "triton-fused"
        if device_type == "cuda" and (kernels == "triton" or _triton_usable()):
            return "triton"
        if kernels == "triton" and interpreted:
            return "triton"
    if device_type == "cpu" and (_cpu_kernels_present() if not build else _cpu_kernels_built(strict=kernels == "fused")):
        return "cpu"
    return "torch"


def backend_words(backend: str) -> str:
    """A backend (resolve_backend's answer) in words, as a training run's start line says it."""
    return _BACKEND_WORDS[backend]


def bank_grad_note(model: nn.Module, backend: str, device_type: str) -> str:
    """One line for a training run's start when a layer asks for a bank-gradient method its backend
    (``prepare_kernels``' answer) does not run: "segment" off the Triton kernels. "" otherwise."""
    asked = {m.config.bank_grad for m in _memory_layers(model)}
    if "segment" not in asked or set(backend.split("+")) & {"triton", "triton-fused"}:
        return ""
    instead = ("the compiled kernels' own" if backend == "cpu"
               else f"{_bank_grad_method('auto', device_type)} (what auto picks here)")
    return (f"memory bank gradient: bank_grad segment is a Triton kernel (CUDA); on the {backend_words(backend)} "
            f"the bank's gradient is {instead}, the same values to float rounding")


def use_kernels(model: nn.Module, kernels: Optional[str]) -> None:
    """Switch every memory layer in ``model`` (or the layer itself) to ``kernels`` (one of KERNELS;
    None: the environment's, as when built). Their resolved backends are forgotten; the CPU ones are
    answered again on the next eager call or by ``prepare_kernels`` (call that before a compiled
    call). A model compiled before the switch sees it: its guards fail and it recompiles."""
    for module in _memory_layers(model):
        module._set_kernels(kernels)


def prepare_kernels(model: nn.Module, device, dtype: torch.dtype = torch.float32, *, build: bool = True) -> str:
    """Resolve now which backend every memory layer in ``model`` runs on ``device`` and return it
    (one of BACKENDS; "torch" when the model has no memory layer; layers told different things
    answer as a "+"-joined list).

    On CPU this builds (or finds) the compiled kernels. Call it before ``torch.compile`` of a model
    that runs on the CPU: the compiled layer then reads its answer and traces whole, instead of
    calling out of its graph (a graph break per Memory block, and recompiles around them).
    ``build=False``: what a successful build would answer, nothing built and nothing kept (a dry run).
    """
    answers = []
    for module in _memory_layers(model):
        answer = (module.backend(device, dtype) if build
                  else resolve_backend(module.config.kernels, torch.device(device).type, dtype, build=False))
        if answer not in answers:
            answers.append(answer)
    return "+".join(answers) or "torch"


def _memory_layers(model: nn.Module) -> list:
    """The HeadwiseMemory layers in ``model``, by class name: a model loaded with trust_remote_code
    has them from its own copy of this file, another class object than this module's."""
    return [m for m in model.modules() if type(m).__name__ == "HeadwiseMemory" and hasattr(m, "_set_kernels")]


def _triton_usable() -> bool:
    """Whether the Triton kernels can run: midus_surgery (kernels/hml_triton.py) and a triton of a
    tested version are installed. Asked without importing either (this module loads fast and alone)."""
    from importlib import metadata

    try:
        if not _package_file("kernels", "hml_triton.py"):
            return False
        major, minor = (int(v) for v in metadata.version("triton").split(".")[:2])
    except (ImportError, ValueError, metadata.PackageNotFoundError):
        return False
    return (major, minor) >= _TRITON_MIN


def _package_file(*parts: str) -> bool:
    """Whether midus_surgery is installed with the file ``parts`` (asked without importing it: a
    top-level lookup imports nothing, and this module loads fast and alone)."""
    import importlib.util

    package = importlib.util.find_spec("midus_surgery")
    return package is not None and any(os.path.isfile(os.path.join(loc, *parts)) for loc in package.submodule_search_locations or ())


def _cpu_kernels_present() -> bool:
    """Whether midus_surgery's compiled CPU kernels could be built here: their source is installed."""
    return _package_file("kernels", "hml_cpu.cpp")


def _cpu_kernels_built(strict: bool) -> bool:
    """Whether midus_surgery's compiled CPU kernels (kernels/hml_cpu.cpp, ``torch.ops.midus_hml``)
    are there: built on the first ask, once per process. ``strict``: a failed build raises."""
    try:
        from midus_surgery import kernels
    except ImportError:
        return False
    return kernels.cpu_ops(strict=strict) is not None


def _triton_kernel(name: str):
    """``hml_triton.<name>`` ("topk2", "bag_dw", "memory_forward", "memory_backward") through midus_surgery.kernels."""
    try:
        from midus_surgery import kernels
    except ImportError:
        raise RuntimeError("MIDUS_HML_KERNELS=triton needs the midus_surgery package (its kernels/hml_triton.py)") from None
    return kernels.triton_kernel(name)


# ----------------------------------------------------------------------------------------
# Two-stage top-k with a deterministic tie rule
# ----------------------------------------------------------------------------------------

_PAIR_CACHE: dict = {}


def candidate_pairs(k: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Rank pairs (r, s) with (r+1)*(s+1) <= k, the only ones that can reach the final top k.

    Both per-half lists are sorted, so the pair at ranks (r, s) is beaten (or tied with a
    lower slot) by every pair (r', s') with r' <= r, s' <= s: (r+1)(s+1)-1 others.  About
    k*ln(k) pairs instead of k*k (119 for k = 32).  Pairs are ordered by r, then s.
    The cache is a pure memo (derived from k and the device only), not model state.
    """
    key = (k, str(device))
    hit = _PAIR_CACHE.get(key)
    if hit is None:
        rs = [(r, s) for r in range(k) for s in range(k) if (r + 1) * (s + 1) <= k]
        r = torch.tensor([p[0] for p in rs], dtype=torch.long, device=device)
        s = torch.tensor([p[1] for p in rs], dtype=torch.long, device=device)
        hit = _PAIR_CACHE[key] = (r, s)
    return hit


def _ordered_key(values: Tensor, tie_index: Tensor) -> Tensor:
    """int64 keys ordering by (value desc, tie_index asc) under a *descending* topk."""
    bits = (values.float() + 0.0).view(torch.int32).to(torch.int64)  # +0.0 folds -0.0 into +0.0
    bits = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # monotone float -> int map
    # minus, not "| (2**32 - 1 - tie_index)": inductor types that constant int32 in Triton and fails
    return (bits << 32) - tie_index


def _sync_free_topk(values: Tensor) -> bool:
    """Rank every row by exact int64 keys instead of checking for ties first.

    On an accelerator the tie check's ``bool(tied.any())`` is a device-to-host sync: the host
    stops queueing kernels until the device has caught up, twice per layer per forward.  One
    int64 top-k over all rows costs less than that stall there.  float64 stays on the checked
    path: its keys would be rounded to float32, and only exact float32 values order exactly.
    """
    return values.device.type != "cpu" and values.dtype != torch.float64


def _det_topk(values: Tensor, k: int, tie_index: Tensor) -> Tensor:
    """Positions of the top-k of ``values`` along the last dim, sorted by (value desc, tie_index asc).

    CPU fast path: one float topk of k+1 entries; rows where two adjacent returned values are
    equal (the only rows where torch.topk's arbitrary tie order could matter) are recomputed
    with exact int64 (value, index) keys.  On an accelerator every row takes the exact keys
    (``_sync_free_topk``).  ``tie_index`` broadcasts to ``values``.
    """
    if _sync_free_topk(values):
        return _ordered_key(values, tie_index.expand(values.shape)).topk(k, dim=-1, sorted=True).indices
    m = values.shape[-1]
    kk = min(k + 1, m)
    vals, pos = values.topk(kk, dim=-1, sorted=True)
    tied = (vals[..., 1:] == vals[..., :-1]).any(-1)
    pos = pos[..., :k].contiguous()
    if bool(tied.any()):
        flat_vals = values.reshape(-1, m)
        flat_tie = tie_index.expand(values.shape).reshape(-1, m)
        rows = tied.reshape(-1).nonzero().squeeze(1)
        fixed = _ordered_key(flat_vals[rows], flat_tie[rows]).topk(k, dim=-1, sorted=True).indices
        pos.view(-1, k)[rows] = fixed
    return pos


def two_stage_topk(s1: Tensor, s2: Tensor, k: int, kernels: Optional[str] = None) -> tuple[Tensor, Tensor]:
    """Exact top-k over the n*n sums ``s1[..., i] + s2[..., j]``, without the n*n table.

    s1, s2: [..., n] float scores of the two halves.  Returns (scores [..., k], slots [..., k])
    with ``slots = i*n + j``, sorted by score descending, ties by lower slot (see module doc).
    The returned scores are differentiable w.r.t. s1 and s2 (pure-torch path; the compiled CPU
    kernel is used when neither needs a gradient and ``kernels`` (one of KERNELS; None: the
    environment's) resolves to it, see resolve_backend).
    """
    if not (s1.requires_grad or s2.requires_grad) and s1.dtype in (torch.float32, torch.float64) \
            and s1.shape == s2.shape and s1.dtype == s2.dtype and s1.device.type == "cpu" \
            and resolve_backend(kernels, s1.device, s1.dtype) == "cpu":
        lead, n = s1.shape[:-1], s1.shape[-1]
        scores, i_sub, j_sub = torch.ops.midus_hml.topk2(
            s1.reshape(1, -1, n).contiguous(), s2.reshape(1, -1, n).contiguous(), k
        )
        return scores.view(*lead, k), (i_sub * n + j_sub).view(*lead, k)
    return _two_stage_topk(torch.stack((s1, s2), dim=0), k)


def _two_stage_topk(both: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """two_stage_topk on stacked halves ``both`` [2, ..., n] (may be a strided view)."""
    n = both.shape[-1]
    ar = torch.arange(n, device=both.device)
    pos = _det_topk(both.detach(), k, ar)  # [2, ..., k] sub-key indices, sorted
    v = both.gather(-1, pos)  # differentiable
    r, s = candidate_pairs(k, both.device)
    cand = v[0].index_select(-1, r) + v[1].index_select(-1, s)  # [..., C]
    cand_slot = pos[0].index_select(-1, r) * n + pos[1].index_select(-1, s)
    if cand.shape[-1] > k:
        best = _det_topk(cand.detach(), k, cand_slot)
    else:  # k == 1 (C == k): just order them
        best = _det_topk(cand.detach(), cand.shape[-1], cand_slot)
    return cand.gather(-1, best), cand_slot.gather(-1, best)


def _autocast_off(backward):
    """Run a custom backward with autocast off, as the forward ran (HeadwiseMemory.forward).

    backward() may be called inside the caller's autocast region; autocast would then recast the
    backward's matmuls (to bf16: less exact than the forward, and CUDA has no bf16 sparse mm).
    """

    @functools.wraps(backward)
    def wrapped(ctx, *grads):
        dev = next((g.device.type for g in grads if g is not None), "cpu")
        with torch.autocast(device_type=dev if dev in ("cpu", "cuda") else "cpu", enabled=False):
            return backward(ctx, *grads)

    return wrapped


def _lookup_forward(q: Tensor, keys: Tensor, k: int, backend: str):
    """Scores, exact two-stage top-k and softmax of queries q [T, H, d_h] against keys [H, 2, n, d_h/2] on
    ``backend``: (w, slots, i_sub, j_sub), each [H, T, k] (i_sub and j_sub None on "cpu", whose backward
    reads them from the slots). _Lookup's forward, and the whole lookup when no gradient is wanted (decode:
    no autograd node to build)."""
    T, H, dh = q.shape
    n = keys.shape[2]
    if backend == "cpu":  # scores and the same selection and tie rule, compiled, parallel over (h, t)
        scores, slots = torch.ops.midus_hml.score_topk2(q, keys, k)  # [H, T, k] each
        return torch.softmax(scores, dim=-1), slots, None, None
    qh = q.reshape(T, 2 * H, dh // 2).transpose(0, 1)  # [2H, T, dh/2]
    kf = keys.reshape(2 * H, n, dh // 2)
    s = torch.bmm(qh, kf.transpose(1, 2))  # [2H, T, n]
    if backend in ("triton", "triton-fused"):  # the same again, one Triton program per block of (h, t) rows
        halves = s.view(H, 2, T, n)
        scores, i_sub, j_sub = _triton_kernel("topk2")(halves[:, 0], halves[:, 1], k, candidate_pairs(k, halves.device))  # [H, T, k] each
    else:
        both = s.view(H, 2, T, n).transpose(0, 1)  # [2, H, T, n] view
        ar = torch.arange(n, device=q.device)
        pos = _det_topk(both, k, ar)  # [2, H, T, k]
        v = both.gather(-1, pos)
        r, c = candidate_pairs(k, q.device)
        cand = v[0].index_select(-1, r) + v[1].index_select(-1, c)  # [H, T, C]
        i_c = pos[0].index_select(-1, r)
        j_c = pos[1].index_select(-1, c)
        best = _det_topk(cand, min(k, cand.shape[-1]), i_c * n + j_c)
        i_sub, j_sub = i_c.gather(-1, best), j_c.gather(-1, best)
        scores = cand.gather(-1, best)
    w = torch.softmax(scores, dim=-1)
    return w, i_sub * n + j_sub, i_sub, j_sub


def _builds_graph(*tensors: Optional[Tensor]) -> bool:
    """Whether an autograd Function over ``tensors`` would record a node. When it would not (decode, evaluation,
    a frozen layer fed constants) the layer calls the Functions' forward math directly: the same values, without
    the per-call cost of a Function (135 of a 641 us call at a CPU decode step, docs/benchmarks.md)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _k_chunks(tokens: int, device: torch.device, dtype: torch.dtype = torch.float32) -> int:
    """How many pieces ``_weight_grad_bmm`` cuts the token dimension into: on CUDA in float32, the largest power of
    two up to 32 that divides ``tokens`` and leaves at least 512 tokens a piece, when that is 8 pieces or more;
    1 (one GEMM) otherwise.

    Measured on an H200 (docs/results/gpu_check_hml_session.log, 2026-12-04): at 16 x 1024 tokens 32 pieces took
    the float32 keys' gradient from 0.616 to 0.123 ms and the projection's from 0.622 to 0.082 ms; a bfloat16
    product is already fast as one GEMM (0.026 ms, 0.053 ms in 32 pieces), and at 4 x 256 tokens 2 pieces
    doubled the float32 product (0.022 to 0.043 ms)."""
    if device.type != "cuda" or dtype != torch.float32:
        return 1
    c = 1
    while c < 32 and tokens % (2 * c) == 0 and tokens // (2 * c) >= 512:
        c *= 2
    return c if c >= 8 else 1


def _weight_grad_bmm(a: Tensor, b: Tensor, chunks: Optional[int] = None) -> Tensor:
    """a [B, M, K] @ b [B, K, N] -> [B, M, N] for a small per-head weight's gradient, K the tokens.

    As one batched GEMM cuBLAS tiles only the small M x N output, B x 4 tiles for the keys' [128, 32], and each
    tile loops over every token: on an H200 at 16 x 1024 tokens the keys' and the projection's gradients took
    0.61 ms each in float32, a quarter of the layer's fwd + bwd (docs/results/gpu_check_hml_session.log). Cut K
    into ``chunks`` pieces (default ``_k_chunks``): c times the tiles, then a float32 (float64) sum over the
    pieces in a fixed order. Deterministic; the same values to float rounding. a and b may be strided views (both
    products here take a transposed one)."""
    B, M, K = a.shape
    c = _k_chunks(K, a.device, a.dtype) if chunks is None else chunks
    if c == 1:
        return torch.bmm(a, b)
    pieces = torch.matmul(a.reshape(B, M, c, K // c).transpose(1, 2), b.reshape(B, c, K // c, b.shape[2]))  # [B, c, M, N]
    acc = torch.float64 if pieces.dtype == torch.float64 else torch.float32
    return pieces.sum(1, dtype=acc).to(pieces.dtype)


class _Lookup(torch.autograd.Function):
    """Scores, exact two-stage top-k and softmax in one node: (q [T,H,d_h], keys) -> (w, slots).

    The backward scatters d(score) of the k chosen slots into the two half-score tables and
    runs the two scoring matmuls backwards; no gather/index_select chains, no [.., k*k] tensors.
    """

    @staticmethod
    def forward(ctx, q, keys, k, backend):
        w, slots, i_sub, j_sub = _lookup_forward(q, keys, k, backend)
        ctx.mark_non_differentiable(slots)
        ctx.set_materialize_grads(False)  # the slots' gradient would be an int64 [H, T, k] of zeros, filled per step
        ctx.fused = backend == "cpu"
        # the compiled backward reads both halves' sub-key ids from the slots: two [H, T, k] int64 fewer kept
        ctx.save_for_backward(q, keys, w, *((slots,) if ctx.fused else (i_sub, j_sub)))
        return w, slots

    @staticmethod
    @_autocast_off
    def backward(ctx, dw, _dslots):
        if dw is None:  # nothing downstream of the weights asked for a gradient
            return None, None, None, None
        q, keys, w, *ids = ctx.saved_tensors  # ids: (slots,) on the compiled path, else (i_sub, j_sub)
        T, H, dh = q.shape
        n = keys.shape[2]
        dsel = w * (dw - (w * dw).sum(-1, keepdim=True))  # softmax backward, [H, T, k]
        if ctx.fused:
            need_q, need_keys = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
            dq, dkeys = torch.ops.midus_hml.lookup_backward(
                dsel.contiguous(), q, keys.contiguous(), ids[0], need_q, need_keys
            )
            return (dq if need_q else None), (dkeys if need_keys else None), None, None
        i_sub, j_sub = ids
        ds = torch.zeros(H, 2, T, n, dtype=dsel.dtype, device=dsel.device)
        ds[:, 0].scatter_add_(-1, i_sub, dsel)
        ds[:, 1].scatter_add_(-1, j_sub, dsel)
        ds = ds.view(2 * H, T, n)
        dq = dkeys = None
        if ctx.needs_input_grad[0]:
            dq = torch.bmm(ds, keys.reshape(2 * H, n, dh // 2)).transpose(0, 1).reshape(T, H, dh)
        if ctx.needs_input_grad[1]:
            qh = q.reshape(T, 2 * H, dh // 2).transpose(0, 1)
            dkeys = _weight_grad_bmm(ds.transpose(1, 2), qh).view(keys.shape)  # [2H, n, T] @ [2H, T, dh/2]
        return dq, dkeys, None, None


# ----------------------------------------------------------------------------------------
# Pool-then-project (HIVE) with a sparse-friendly backward
# ----------------------------------------------------------------------------------------


def _cpu_bf16_units() -> bool:
    """Whether this CPU runs bf16 matmuls on bf16 units (AVX512-BF16 or AMX): there a bf16 GEMM at the layer's
    shapes is 2-2.5x faster than float32; without them 40-180x slower (docs/hml.md, Precision)."""
    cpu = getattr(torch, "cpu", None)
    checks = [getattr(cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    try:
        return any(check() for check in checks if check is not None)
    except Exception:  # noqa: BLE001 - a torch or platform that cannot tell: the float32 rule
        return False


_CPU_BF16_UNITS = _cpu_bf16_units()  # asked once, at import: a constant to torch.compile


def _matmul_dtype(dtype: torch.dtype, device_type: str) -> torch.dtype:
    """The dtype the layer's matmuls (HIVE's projection) run in for parameters or inputs of ``dtype``: float64 as it
    is; on an accelerator, its own dtype; on a CPU, float32, except bf16 on a CPU with bf16 units, which runs it as an
    accelerator does. Scores, top-k and softmax are float32 everywhere (docs/hml.md, Precision). Never by the call's
    token count: a sequence's bf16 logits moved by up to 0.25 with what else was in its batch when 128 tokens a call
    switched the projection to bf16 (trial105), where the stock model's are the same bits."""
    if dtype == torch.float64 or device_type != "cpu":
        return dtype
    return dtype if dtype == torch.bfloat16 and _CPU_BF16_UNITS else torch.float32


def _acc_dtype(table: Tensor) -> torch.dtype:
    return torch.float64 if table.dtype == torch.float64 else torch.float32


def _bag_forward(table: Tensor, idx: Tensor, w: Tensor, fused: bool = False):
    """z[b] = sum_i w[b, i] * table[idx[b, i]]; idx/w: [B, k].  Returns (z, offsets, offset2bag).

    fused: the compiled CPU kernel (z in float32/float64 whatever the table dtype; no offsets).
    """
    if fused:
        return torch.ops.midus_hml.bag_forward(table, idx.contiguous(), w.to(_acc_dtype(table)).contiguous()), None, None
    B, k = idx.shape
    offsets = torch.arange(0, B * k, k, device=idx.device)
    z, offset2bag, _, _ = torch.ops.aten._embedding_bag(
        table, idx.reshape(-1), offsets, False, 0, False, w.reshape(-1).to(table.dtype), False, -1
    )
    return z, offsets, offset2bag


# Where "auto" takes the segment reduce on the Triton kernels: rows this wide or wider, and this many (bag, slot)
# contributions or more. On an H200 (two sessions, 2026-12-04, docs/benchmarks.md "HML on GPU, fused kernels") at
# the Llama-3.2-1B size (rows of 256, 16 x 1024 tokens: 16.8M contributions) the layer took 31.6-31.9 ms with it
# against 36.6-37.1 ms in bf16 (36.5-36.9 against 39.8-40.3 in fp32); with rows of 64 it was no faster (SmolLM2
# recipe) or slower (SmolLM2's own size), and at 4 x 256 tokens slower at every size.
SEGMENT_MIN_WIDTH, SEGMENT_MIN_CONTRIBUTIONS = 128, 1 << 23


def _bank_grad_method(mode: str, device_type: str, triton: bool = False, contributions: int = 0, width: int = 0) -> str:
    """The bank-gradient method ``mode`` names; "auto" picks the fastest measured (docs/hml.md).

    CPU (pure-torch path): sparse_mm.  CUDA: embedding_bag, 0.83-0.96x the layer's time with
    sparse_mm, whose COO coalesce sorts and syncs with the host; on the Triton kernels, for a bank
    gradient of ``contributions`` (bag, slot) pairs into rows ``width`` wide, segment where both are
    large (SEGMENT_MIN_*).  All three are deterministic there; index_add (float atomics on CUDA) is
    not.  "segment" is a Triton kernel: on a path without them (``triton`` False) it falls back to
    "auto", which is deterministic too.
    """
    if mode == "segment" and not triton:
        mode = "auto"
    if mode != "auto":
        return mode
    if device_type == "cpu":
        return "sparse_mm"
    if triton and width >= SEGMENT_MIN_WIDTH and contributions >= SEGMENT_MIN_CONTRIBUTIONS:
        return "segment"
    return "embedding_bag"


def _bag_backward(dz: Tensor, table: Tensor, idx: Tensor, w: Tensor, offsets, offset2bag, need_w, need_table, mode,
                  backend: str = "torch", heads: int = 1):
    """Gradients of _bag_forward: (dw [B, k], dtable [rows, d]).
    ``heads`` > 1: the bags are head-major and head h's read only the h-th of ``heads`` equal parts of the
    table (HIVE off's stacked value tables), which lets the segment reduce work head by head.

    backend "cpu": one compiled pass computes dw (gather-dot) and dtable (scatter) together.
    "triton": dw by the Triton gather-dot (kernels/hml_triton.py). ``mode`` picks the bank-gradient
    method otherwise.
    """
    if backend == "cpu":
        acc = _acc_dtype(table)
        dw, dtable = torch.ops.midus_hml.bag_backward(
            dz.to(acc).contiguous(), table, idx.contiguous(), w.to(acc).contiguous(), bool(need_w), bool(need_table)
        )
        return (dw if need_w else None), (dtable if need_table else None)  # in the table dtype
    B, k = idx.shape
    dw = dtable = None
    mode = _bank_grad_method(mode, table.device.type, triton=backend == "triton", contributions=idx.numel(),
                             width=table.shape[1])
    flat_idx = idx.reshape(-1)
    # bf16/fp16 tables accumulate in fp32: more exact, and CUDA has no bf16 kernel for the
    # per-sample-weights backward nor for sparse mm
    gd = torch.float64 if table.dtype == torch.float64 else torch.float32
    if need_w and backend == "triton":
        dw = _triton_kernel("bag_dw")(dz, table, idx)  # float32; reads a bf16 table without a cast copy
    elif need_w:
        dw = torch.ops.aten._embedding_bag_per_sample_weights_backward(
            dz.to(gd), table.to(gd), flat_idx, offsets, offset2bag, 0, -1
        ).view(B, k)
    if need_table:
        if mode == "segment" and gd == torch.float32:
            dtable = _triton_kernel("segment_bank_grad")(dz, idx, w, table.shape[0], groups=heads).to(table.dtype)
        elif mode == "embedding_bag" or mode == "segment":  # float64 tables: the sorted, deterministic method
            dtable = torch.ops.aten._embedding_bag_backward(
                dz.to(gd), flat_idx, offsets, offset2bag,
                torch.full((B,), k, dtype=torch.long, device=idx.device),
                torch.empty(0, dtype=torch.long, device=idx.device),
                table.shape[0], False, 0, False, w.reshape(-1).to(gd), -1,
            ).to(table.dtype)
        elif mode == "sparse_mm":
            bag = torch.arange(B, device=idx.device).repeat_interleave(k)
            a_t = torch.sparse_coo_tensor(
                torch.stack((flat_idx, bag)), w.reshape(-1).to(gd), (table.shape[0], B), check_invariants=False
            )
            dtable = torch.sparse.mm(a_t, dz.to(gd)).to(table.dtype)
        else:
            dtable = torch.zeros(table.shape, dtype=torch.float32 if table.dtype != torch.float64 else table.dtype,
                                 device=table.device)
            # Chunk so the [rows*k, d] source never exceeds ~32 MiB.
            d = table.shape[1]
            step = max(1, (1 << 23) // max(1, k * d))
            for b0 in range(0, B, step):
                b1 = min(B, b0 + step)
                src = (w[b0:b1, :, None].to(dtable.dtype) * dz[b0:b1, None, :].to(dtable.dtype)).reshape(-1, d)
                dtable.index_add_(0, idx[b0:b1].reshape(-1), src)
            dtable = dtable.to(table.dtype)
    return dw, dtable


def _pool_project_forward(w: Tensor, slots: Tensor, bank: Tensor, proj: Tensor, backend: str):
    """HIVE's read: m [H, T, d_h] = (sum_i w[h,t,i] * bank[slot[h,t,i]]) @ proj[h], and what its backward
    keeps: (m, z [H, T, d_l], offsets, offset2bag, the projection's dtype). _PoolProject's forward, and the
    whole read when no gradient is wanted."""
    H, T, k = slots.shape
    z, offsets, offset2bag = _bag_forward(bank, slots.reshape(H * T, k), w.reshape(H * T, k), backend == "cpu")
    z = z.view(H, T, -1)
    cd = _matmul_dtype(proj.dtype, bank.device.type)  # float32 on most CPUs, the parameter dtype on an accelerator
    return torch.bmm(z.to(cd), proj.to(cd)), z, offsets, offset2bag, cd


def _pool_forward(w: Tensor, slots: Tensor, table: Tensor, backend: str):
    """HIVE off: m [H, T, d_h] = sum_i w[h,t,i] * table[slot[h,t,i]] (slots already offset per head), with
    offsets and offset2bag for the backward. _Pool's forward, and the whole read when no gradient is wanted."""
    H, T, k = slots.shape
    z, offsets, offset2bag = _bag_forward(table, slots.reshape(H * T, k), w.reshape(H * T, k), backend == "cpu")
    return z.view(H, T, -1), offsets, offset2bag


class _PoolProject(torch.autograd.Function):
    """HIVE: m[h, t] = (sum_i w[h,t,i] * bank[slot[h,t,i]]) @ proj[h]; never per-slot values."""

    @staticmethod
    def forward(ctx, w, slots, bank, proj, mode, backend):
        m, z, offsets, offset2bag, cd = _pool_project_forward(w, slots, bank, proj, backend)
        ctx.save_for_backward(w, slots, bank, proj, z, offsets, offset2bag)
        ctx.mode, ctx.backend, ctx.cd = mode, backend, cd
        return m

    @staticmethod
    @_autocast_off
    def backward(ctx, dm):
        w, slots, bank, proj, z, offsets, offset2bag = ctx.saved_tensors
        H, T, k = slots.shape
        cd = ctx.cd
        dm = dm.to(cd)
        dproj = _weight_grad_bmm(z.to(cd).transpose(1, 2), dm).to(proj.dtype) if ctx.needs_input_grad[3] else None  # [H, d_l, T] @ [H, T, d_h]
        dw = dbank = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[2]:
            dz = torch.bmm(dm, proj.to(cd).transpose(1, 2)).view(H * T, -1)
            dw, dbank = _bag_backward(
                dz, bank, slots.reshape(H * T, k), w.reshape(H * T, k), offsets, offset2bag,
                ctx.needs_input_grad[0], ctx.needs_input_grad[2], ctx.mode, ctx.backend,
            )
            if dw is not None:
                dw = dw.view(H, T, k).to(w.dtype)
        return dw, None, dbank, dproj, None, None


class _Project(torch.autograd.Function):
    """HIVE's projection after the fused read: m [H, T, d_h] = z [H, T, d_l] @ proj [H, d_l, d_h], the projection's
    gradient in pieces of the tokens (_weight_grad_bmm), as _PoolProject's."""

    @staticmethod
    def forward(ctx, z, proj):
        ctx.save_for_backward(z, proj)
        return torch.bmm(z, proj)

    @staticmethod
    @_autocast_off
    def backward(ctx, dm):
        z, proj = ctx.saved_tensors
        dm = dm.to(z.dtype)
        dz = torch.bmm(dm, proj.transpose(1, 2)) if ctx.needs_input_grad[0] else None
        dproj = _weight_grad_bmm(z.transpose(1, 2), dm) if ctx.needs_input_grad[1] else None
        return dz, dproj


class _Pool(torch.autograd.Function):
    """HIVE off: m[h, t] = sum_i w[h,t,i] * values[h, slot[h,t,i]] (values flattened to [H*N, d_h])."""

    @staticmethod
    def forward(ctx, w, slots, table, mode, backend):
        m, offsets, offset2bag = _pool_forward(w, slots, table, backend)
        ctx.save_for_backward(w, slots, table, offsets, offset2bag)
        ctx.mode, ctx.backend = mode, backend
        return m

    @staticmethod
    @_autocast_off
    def backward(ctx, dm):
        w, slots, table, offsets, offset2bag = ctx.saved_tensors
        H, T, k = slots.shape
        dw, dtable = _bag_backward(
            dm.reshape(H * T, -1), table, slots.reshape(H * T, k), w.reshape(H * T, k), offsets, offset2bag,
            ctx.needs_input_grad[0], ctx.needs_input_grad[2], ctx.mode, ctx.backend, heads=H,
        )
        if dw is not None:
            dw = dw.view(H, T, k).to(w.dtype)
        return dw, None, dtable, None, None


def _rows_in_table(slots: Tensor, head_rows: int) -> Tensor:
    """Per-head slots [H, T, k] as rows of a table that stacks the heads' tables of ``head_rows`` rows."""
    return slots + (torch.arange(slots.shape[0], device=slots.device) * head_rows).view(-1, 1, 1)


def _read_forward(q: Tensor, keys: Tensor, table: Tensor, proj: Optional[Tensor], k: int, head_rows: int, backend: str):
    """The whole read with no gradient to record: (m [H, T, d_h], w [H, T, k], slots [H, T, k]) of normalised
    queries q [T, H, d_h]. HIVE: ``proj`` [H, d_l, d_h] and the shared bank as ``table``; HIVE off: ``proj`` None and
    the heads' value tables stacked in ``table``, ``head_rows`` rows each. On the compiled CPU kernels one call
    (``midus_hml::read``: the same operators in the same order, so the same values) replaces about 20 operators
    and the Python between them, which cost more than the work at a decode step's few tokens."""
    if backend == "cpu":  # the projection in the dtype _pool_project_forward's bmm takes
        proj = None if proj is None else proj.to(_matmul_dtype(proj.dtype, proj.device.type))
        return torch.ops.midus_hml.read(q, keys, table, proj, k, head_rows)
    w, slots, _, _ = _lookup_forward(q, keys, k, backend)
    if proj is not None:
        return _pool_project_forward(w, slots, table, proj, backend)[0], w, slots
    return _pool_forward(w, _rows_in_table(slots, head_rows), table, backend)[0], w, slots


def _fused_read_forward(q: Tensor, keys: Tensor, table: Tensor, k: int, head_rows: int):
    """The fused Triton read (see _FusedRead): (z, w, slots, i_sub, j_sub). _FusedRead's forward, and the
    whole read when no gradient is wanted."""
    w, i_sub, j_sub, z = _triton_kernel("memory_forward")(q, keys, table, k, head_rows, candidate_pairs(k, q.device))
    return z, w, i_sub * keys.shape[2] + j_sub, i_sub, j_sub


class _FusedRead(torch.autograd.Function):
    """The whole memory read on the fused Triton kernels (backend "triton-fused"):
    (q [T, H, d_h] float32, keys, table [rows, d]) -> (z [H, T, d] float32, w [H, T, k], slots [H, T, k]).

    z[h, t] = sum_i w[h,t,i] * table[h*head_rows + slot[h,t,i]]: the HIVE bank's pooled latent
    (head_rows 0) or the head's pooled value (HIVE off, head_rows n*n). w and slots are returned for the
    observer and carry no gradient. The backward's kernel gives dq and dkeys; the table's gradient comes
    from the same kernel's float32 atomics when ``bank_grad`` is "index_add" (not deterministic; never
    under torch.use_deterministic_algorithms), from the segment-reduce kernels when it is "segment",
    else from the pure-torch path's methods.
    """

    @staticmethod
    def forward(ctx, q, keys, table, k, head_rows, bank_grad):
        z, w, slots, i_sub, j_sub = _fused_read_forward(q, keys, table, k, head_rows)
        ctx.mark_non_differentiable(w, slots)
        ctx.save_for_backward(q, keys, table, w, i_sub, j_sub)
        ctx.head_rows, ctx.bank_grad = head_rows, bank_grad
        return z, w, slots

    @staticmethod
    @_autocast_off
    def backward(ctx, dz, _dw, _dslots):
        q, keys, table, w, i_sub, j_sub = ctx.saved_tensors
        need_q, need_keys, need_table = ctx.needs_input_grad[:3]
        mode = _bank_grad_method(ctx.bank_grad, table.device.type, triton=True, contributions=w.numel(), width=table.shape[1])
        atomic = need_table and mode == "index_add" and not torch.are_deterministic_algorithms_enabled()
        dq = dkeys = dtable = None
        if need_q or need_keys or atomic:
            dq, dkeys, dtable = _triton_kernel("memory_backward")(dz, q, keys, table, w, i_sub, j_sub, ctx.head_rows, atomic)
        if need_table and not atomic:
            H, T, k = w.shape
            n = keys.shape[2]
            idx = (i_sub * n + j_sub + ctx.head_rows * torch.arange(H, device=w.device).view(H, 1, 1)).view(H * T, k)
            offsets = torch.arange(0, H * T * k, k, device=w.device)
            offset2bag = torch.arange(H * T, device=w.device).repeat_interleave(k)
            _, dtable = _bag_backward(dz.reshape(H * T, -1), table, idx, w.view(H * T, k), offsets, offset2bag,
                                      False, True, "embedding_bag" if mode == "index_add" else mode, backend="triton",
                                      heads=H if ctx.head_rows else 1)
        return (dq if need_q else None), (dkeys if need_keys else None), \
            (dtable.to(table.dtype) if need_table else None), None, None, None


# ----------------------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------------------


class LatentBank(nn.Module):
    """The HIVE latent bank U, shape [n*n, d_l] (parameter ``weight``).

    To share one bank across several Memory blocks, the *model* owns a single LatentBank as a
    submodule (so it appears once in ``state_dict``, e.g. as ``model.hml_bank.weight``) and
    passes it to each ``HeadwiseMemory(..., bank=that_bank)``; those layers keep only an
    unregistered reference and never re-initialise it.
    """

    def __init__(self, n_subkeys: int, latent_dim: int, device=None, dtype=None) -> None:
        super().__init__()
        self.n_subkeys = int(n_subkeys)
        self.latent_dim = int(latent_dim)
        self.weight = nn.Parameter(torch.empty(self.n_subkeys**2, self.latent_dim, device=device, dtype=dtype))

    @property
    def num_slots(self) -> int:
        return self.n_subkeys**2

    def forward(self) -> Tensor:
        """The table [n*n, d_l]. Read through this call, not ``.weight``: what wraps the module loads its
        weight on a call (accelerate's offload hooks: read as an attribute, an offloaded bank was still on
        the meta device, and the model's logits were garbage without an error: trial51)."""
        return self.weight

    def reset_parameters(self, seed: int = 0, zero: bool = False, name: str = "bank.weight") -> None:
        """normal(0, d_l^-0.5) from a generator keyed by (seed, name); zeros when ``zero``."""
        _fill(self.weight, "zeros" if zero else "normal", seed, name, self.latent_dim**-0.5)

    def extra_repr(self) -> str:
        return f"slots={self.num_slots}, latent_dim={self.latent_dim}"


def _project(linear: nn.Module, x: Tensor, autocast_dtype: Optional[torch.dtype]) -> Tensor:
    """``linear``'s projection of ``x`` as any Linear of the model computes it: through the module's own call, so
    that what wraps it takes part (PEFT's LoRA layers, forward hooks, accelerate's offload, which loads the weight
    at the call), in its weight's dtype, or in ``autocast_dtype`` when the caller runs under autocast (which the
    layer turns off for its read). One rule for a plain, a hooked and a wrapped module: computing a plain one in
    float32 from a cast of its bf16 weight, as the layer once did on CPU, gave another bf16 output than the same
    module hooked or offloaded (trial62), and reading the weight bypassed LoRA (trial36)."""
    if autocast_dtype is not None:
        with torch.autocast(x.device.type, dtype=autocast_dtype):
            return linear(x)
    return linear(x.to(linear.weight.dtype))


def _in_backward() -> bool:
    """Whether autograd is running a backward pass now: a forward called then is gradient
    checkpointing's recomputation (reentrant or not)."""
    task = getattr(torch._C, "_current_graph_task_id", None)
    return task is not None and task() != -1


class _QueryRMSNorm(torch.autograd.Function):
    """_HeadNorm's "rms": q [T, H, d_h] (any float dtype) -> F.rms_norm(q in float32) * weight in float32
    (float64 for float64 q), the unfused path's ops, so its values to the bit. The backward is one
    compiled pass (kernels/hml_cpu.cpp, rms_norm_backward) where autograd through the composite runs
    ~12 elementwise ops over [T, H, d_h] and a cast, and it keeps q itself (bf16 in a bf16 model), not its
    float32 copy."""

    @staticmethod
    def forward(ctx, q, weight, eps):
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        ctx.save_for_backward(q, weight)
        ctx.eps = eps
        return (F.rms_norm(q.to(acc), (q.shape[-1],), eps=eps) * weight.to(acc)).contiguous()

    @staticmethod
    @_autocast_off
    def backward(ctx, dy):
        q, weight = ctx.saved_tensors
        need_q, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dq, dweight = torch.ops.midus_hml.rms_norm_backward(
            dy.contiguous(), q.contiguous(), weight.to(dy.dtype).contiguous(), ctx.eps, need_q, need_weight
        )
        return (dq if need_q else None), (dweight.to(weight.dtype) if need_weight else None), None


class _HeadNorm(nn.Module):
    """Per-head query norm over d_h with a per-head affine weight [H, d_h] (float32 math).

    rms    q / rms(q) * weight.
    layer  (q - mean(q)) / std(q) * weight + bias, over each token's d_h features.
    batch  each feature standardised across tokens with running statistics ``running_mean`` /
           ``running_var`` [H, d_h], then rms. The attention heads' outputs share a direction
           across tokens (cosine 0.5-0.8 to their mean on SmolLM2, docs/analysis.md), so without
           it the same few slots win for every token; the PKM paper's query BatchNorm removes it.
           Only running statistics normalise, in training too, and a batch updates them after its
           own use: a batch's own statistics would let each token's query depend on the other
           tokens of the batch, later ones included. They update in training forwards and only
           where the norm's weight trains (so frozen retrieval holds them), from the first batch on (momentum max(0.1, 1/(updates+1)): the
           first batch sets them; ``updates`` counts training forward passes, one per micro-batch, up
           to 10, from where the momentum stays 0.1: a count any float dtype holds exactly, bf16's included);
           under several processes (torch.distributed initialised, DDP or FSDP) a tracking forward
           gathers every process's (mean, var) and applies them in rank order, one update each, so the
           buffers stay the same everywhere and count every micro-batch; every process runs each
           training forward in step there, so the collective matches. Untouched they are 0 and 1, and the norm is exactly rms. Under gradient checkpointing the
           forward runs again inside the backward pass: that second run normalises with the
           statistics the first one used and updates nothing, so the gradients are the ones of the
           forward that made the loss (the first run had already moved the statistics on).
    """

    MOMENTUM = 0.1
    COUNTED_UPDATES = 10  # 1 / MOMENTUM: from here on the momentum no longer depends on the count

    def __init__(self, kind: str, num_heads: int, head_dim: int, eps: float, device=None, dtype=None) -> None:
        super().__init__()
        self.kind = kind
        self.eps = float(eps)
        self.weight = nn.Parameter(torch.empty(num_heads, head_dim, device=device, dtype=dtype))
        if kind == "layer":
            self.bias = nn.Parameter(torch.empty(num_heads, head_dim, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)
        if kind == "batch":  # float buffers: they are written with the output's dtype like every tensor
            self.register_buffer("running_mean", torch.zeros(num_heads, head_dim, device=device, dtype=dtype))
            self.register_buffer("running_var", torch.ones(num_heads, head_dim, device=device, dtype=dtype))
            self.register_buffer("updates", torch.zeros((), device=device, dtype=dtype))
        self._used: tuple[Tensor, Tensor] | None = None  # the statistics the last tracking forward normalised with

    def reset_statistics(self) -> None:
        if self.kind == "batch":
            self.running_mean.zero_()
            self.running_var.fill_(1.0)
            self.updates.zero_()

    @torch.no_grad()
    def _track(self, q: Tensor) -> None:  # q [T, H, d_h]
        # one token (or none) has no spread to learn from: its statistics count for nothing (weight 0), but they are
        # still gathered: under several processes the others wait in the gather, so whether a process joins it may
        # not depend on its data
        counts = q.shape[0] > 1
        mean = q.mean(0) if counts else q.new_zeros(q.shape[1:])  # [H, d_h]
        var = q.var(0, unbiased=False) if counts else q.new_ones(q.shape[1:])
        stats = [(mean, var, q.new_tensor(1.0 if counts else 0.0))]
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # several processes (DDP, FSDP) run each training forward in step, each on its own micro-batch: every
            # process applies every process's statistics, in rank order, so the buffers stay the same everywhere and
            # count every micro-batch (DDP's buffer broadcast had kept rank 0's alone: trial122 F3)
            stats = _every_process(*stats[0])
        for mean, var, weight in stats:  # weight: 1 for a batch that counts, 0 for one that does not (no branch on data)
            momentum = (1.0 / (self.updates + 1.0)).clamp_min(self.MOMENTUM) * weight.to(self.updates.dtype)
            # new tensors, not lerp_ in place: this forward normalised with the buffers, and torch.compile's backward
            # (AOTAutograd) may read a buffer it saved after the forward's in-place update landed; compile: true then
            # trained the query path on gradients up to 37% off, silently. DDP re-reads reassigned buffers.
            # a batch that does not count leaves them as they were, to the bit (lerp by 0 turned -0.0 into 0.0 and inf into NaN)
            counted = weight > 0
            self.running_mean = torch.where(counted, torch.lerp(self.running_mean, mean.to(self.running_mean.dtype), momentum), self.running_mean)
            self.running_var = torch.where(counted, torch.lerp(self.running_var, var.to(self.running_var.dtype), momentum), self.running_var)
            self.updates.add_(weight.to(self.updates.dtype)).clamp_max_(self.COUNTED_UPDATES)  # bf16 counts exactly only to 256

    def forward(self, q: Tensor, fused_backward: bool = False) -> Tensor:  # q [T, H, d_h], any float dtype
        """q normalised in float32 (float64 for float64 q). fused_backward (the compiled CPU kernels loaded): an rms
        norm that records a graph runs through _QueryRMSNorm, the same values with a one-pass backward."""
        if fused_backward and self.kind == "rms" and _builds_graph(q, self.weight):
            return _QueryRMSNorm.apply(q, self.weight, self.eps)
        q = q.to(torch.float64 if q.dtype == torch.float64 else torch.float32)
        if self.kind == "batch":
            seen = q.detach()
            # gradient checkpointing's second forward runs inside the backward pass (a graph task is running),
            # after a first one that tracked; reentrant checkpointing's first forward runs without grad and
            # tracks nothing, so there the second one is the batch's only training forward
            # (_used first: out of training it is None, and the graph-task query, which Dynamo cannot trace, is not asked:
            # an evaluation compiles to one graph, trial51)
            recomputing = self._used is not None and _in_backward()
            mean, var = self._used if recomputing else (self.running_mean, self.running_var)
            # the statistics of earlier batches: untouched (0, 1) they change nothing, to the bit
            q = (q - mean.to(q.dtype)) * torch.rsqrt(var.to(q.dtype).clamp_min(self.eps))
            if not recomputing:
                tracking = self.training and self.weight.requires_grad and torch.is_grad_enabled()  # the same on every process
                self._used = (self.running_mean.clone(), self.running_var.clone()) if tracking else None
                if tracking:
                    self._track(seen)  # after use: this batch's statistics normalise the next batches only
        if self.kind in ("rms", "batch"):
            q = F.rms_norm(q, (q.shape[-1],), eps=self.eps)  # q * rsqrt(mean(q^2) + eps), one fused op each way
            return q * self.weight.to(q.dtype)
        mu = q.mean(-1, keepdim=True)
        q = q - mu
        q = q * torch.rsqrt(q.pow(2).mean(-1, keepdim=True) + self.eps)
        return q * self.weight.to(q.dtype) + self.bias.to(q.dtype)


@torch.compiler.disable  # a collective: run eagerly under torch.compile
def _every_process(mean: Tensor, var: Tensor, weight: Tensor) -> list[tuple[Tensor, Tensor, Tensor]]:
    """(mean, var, weight) of every process of the default group, in rank order: one all_gather, in the statistics'
    own float dtype (float32 / float64, which gloo and NCCL both gather); through the CPU for gloo, which gathers no
    CUDA tensor. mean, var [H, d_h]; weight [] (1 or 0: whether that process's batch counts)."""
    dist = torch.distributed
    both = torch.stack((mean, var, weight.to(mean.dtype).expand_as(mean)))  # [3, H, d_h]
    on = both.device
    if on.type != "cpu" and dist.get_backend() == "gloo":
        both = both.cpu()
    parts = [torch.empty_like(both) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, both.contiguous())
    return [(part[0].to(on), part[1].to(on), part[2, 0, 0].to(on)) for part in parts]


def _caller_autocast(x: Tensor) -> tuple[str, Optional[torch.dtype]]:
    """(autocast device type of ``x``, the caller's autocast dtype there, or None when autocast is off)."""
    dev = x.device.type if x.device.type in ("cpu", "cuda") else "cpu"
    return dev, (torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None)


class HeadwiseMemory(nn.Module):
    """Head-wise Memory Layer: per-head product-key lookup, shared HIVE latent bank, per-head P_h.

    forward: [..., H, d_h] (query_source="heads") or [..., hidden] ("hidden") -> [..., hidden].
    Parameters (names are stable): ``keys`` [H, 2, n, d_h/2]; ``bank.weight`` [n*n, d_l] (HIVE,
    own bank) or none (shared bank passed in); ``proj`` [H, d_l, d_h] (HIVE); ``values``
    [H, n*n, d_h] (HIVE off); ``query_norm.weight`` (+ ``.bias`` for layer) [H, d_h]; buffers
    ``query_norm.running_mean`` / ``.running_var`` [H, d_h] and ``.updates`` [] for batch;
    ``query_proj.weight`` [H*d_h, hidden]; ``gate.weight`` [H*d_h, in]; ``out_proj.weight``
    [hidden, H*d_h].

    Precision: scores, top-k and softmax always run in float32 (float64 when the input is
    float64).  On CUDA the matmuls run in the parameter dtype; on a CPU in float32, because
    bfloat16 GEMMs without hardware support are 40-180x slower there, except bf16 on a CPU with
    bf16 units (AVX512-BF16 or AMX), which runs them in bf16 as CUDA does (_matmul_dtype).  The output has the input's dtype.  Autocast is disabled inside the layer for the same reasons.
    """

    def __init__(
        self,
        num_heads: int,
        head_dim: int,
        hidden_size: int,
        config: Optional[HMLConfig] = None,
        bank: Optional[LatentBank] = None,
    ) -> None:
        super().__init__()
        config = HMLConfig() if config is None else config
        if not isinstance(config, HMLConfig):
            raise ValueError(f"config must be an HMLConfig, got {type(config).__name__}")
        for name, v in (("num_heads", num_heads), ("head_dim", head_dim), ("hidden_size", hidden_size)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if head_dim % 2:
            raise ValueError(f"head_dim must be even (the query is split in two halves), got {head_dim}")
        inner = num_heads * head_dim
        if config.output_proj == "never" and inner != hidden_size:
            raise ValueError(
                f"output_proj='never' needs num_heads*head_dim == hidden_size ({inner} != {hidden_size})"
            )
        if bank is not None:
            if not config.hive:
                raise ValueError("a shared LatentBank was passed but config.hive is False")
            if not isinstance(bank, LatentBank):
                raise ValueError(f"bank must be a LatentBank, got {type(bank).__name__}")
            if bank.n_subkeys != config.n_subkeys or bank.latent_dim != config.latent_dim:
                raise ValueError(
                    f"shared bank is [{bank.n_subkeys}^2, {bank.latent_dim}] but config wants "
                    f"[{config.n_subkeys}^2, {config.latent_dim}]"
                )
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.hidden_size = hidden_size
        self.config = config
        self._set_kernels(config.kernels)
        # (w, slots, m) -> m, called on every forward when set: `midus-surgery analyze` records the
        # slots each head selects and zeroes one head's read to measure what it is worth
        self.observer: Optional[Callable[[Tensor, Tensor, Tensor], Tensor]] = None
        n, dl = config.n_subkeys, config.latent_dim
        in_features = hidden_size if config.query_source == "hidden" else inner

        if config.query_source == "hidden":
            self.query_proj = nn.Linear(hidden_size, inner, bias=False)
        else:
            self.query_proj = None
        self.query_norm = (
            _HeadNorm(config.query_norm, num_heads, head_dim, config.norm_eps) if config.query_norm != "none" else None
        )
        self.keys = nn.Parameter(torch.empty(num_heads, 2, n, head_dim // 2))
        self._shared_bank: tuple = ()
        if config.hive:
            if bank is None:
                self.bank = LatentBank(n, dl)
            else:
                self.bank = None
                self._shared_bank = (bank,)  # plain tuple: not a submodule, not in state_dict
            self.proj = nn.Parameter(torch.empty(num_heads, dl, head_dim))
            self.register_parameter("values", None)
        else:
            self.bank = None
            self.register_parameter("proj", None)
            self.values = nn.Parameter(torch.empty(num_heads, n * n, head_dim))
        self.gate = nn.Linear(in_features, inner, bias=False) if config.gate else None
        use_out = config.output_proj == "always" or (config.output_proj == "auto" and inner != hidden_size)
        self.out_proj = nn.Linear(inner, hidden_size, bias=False) if use_out else None
        if self.keys.device.type != "meta":
            self.reset_parameters()

    # -- bank access -------------------------------------------------------------------
    @property
    def latent_bank(self) -> Optional[LatentBank]:
        """The bank in use (own or shared); None when HIVE is off."""
        if self._shared_bank:
            return self._shared_bank[0]
        return self.bank

    @property
    def shares_bank(self) -> bool:
        return bool(self._shared_bank)

    # -- kernel backend ------------------------------------------------------------------
    def _set_kernels(self, kernels: Optional[str]) -> None:
        """Carry ``kernels`` (None: MIDUS_HML_KERNELS now) in self.config and forget the answers."""
        kernels = kernels_from_environment() if kernels is None else kernels
        self.config = dataclasses.replace(self.config, kernels=kernels)  # validates it
        # resolve_backend's answers by (device type, float64?). CUDA's are cheap (no build) and
        # answered now, so a compiled layer on CUDA reads constants without any call before it;
        # the CPU's build the kernels and are answered by the first eager call or prepare_kernels.
        self._backends: dict[tuple[str, bool], str] = {}
        for f64 in (False, True):
            self.backend("cuda", torch.float64 if f64 else torch.float32)

    def __setstate__(self, state: dict) -> None:
        # A copy (pickle, deepcopy) asks resolve_backend again: the answers held for the process
        # that gave them (the CPU kernels it built and loaded), not for the one unpickling.
        super().__setstate__(state)
        self._backends = {}
        for f64 in (False, True):
            self.backend("cuda", torch.float64 if f64 else torch.float32)

    @property
    def kernels(self) -> str:
        """What this layer was told to run on (one of KERNELS), see HMLConfig.kernels."""
        return self.config.kernels

    def backend(self, device, dtype: torch.dtype = torch.float32) -> str:
        """Which backend (one of BACKENDS) this layer runs for inputs on ``device`` of ``dtype``,
        resolved once (resolve_backend) and kept. On CPU the first ask builds the kernels."""
        key = (torch.device(device).type, dtype == torch.float64)
        hit = self._backends.get(key)
        if hit is None:
            hit = self._backends[key] = resolve_backend(self.config.kernels, key[0], dtype)
        return hit

    def _backend(self, x: Tensor) -> str:
        """self.backend for x, as the forward asks it: a dictionary read that torch.compile traces as a
        constant once answered; otherwise (a CPU layer compiled before any eager call or
        prepare_kernels) the question leaves the graph (a graph break, not a wrong answer)."""
        if x.device.type not in ("cpu", "cuda"):
            return "torch"
        hit = self._backends.get((x.device.type, x.dtype == torch.float64))
        return hit if hit is not None else self._ask_backend(x.device.type, x.dtype)

    @torch.compiler.disable
    def _ask_backend(self, device_type: str, dtype: torch.dtype) -> str:
        return self.backend(device_type, dtype)

    # -- init ----------------------------------------------------------------------------
    def init_rules(self) -> dict[str, str]:
        cfg, dh = self.config, self.head_dim
        dl = cfg.latent_dim
        rules: dict[str, str] = {"keys": f"uniform(±1/sqrt(d_h/2)) = uniform(±{1 / math.sqrt(dh / 2):.4g})"}
        if cfg.hive:
            if self.bank is not None:
                rules["bank.weight"] = (
                    "zeros" if cfg.init == "zero_bank" else f"normal(0, d_l^-0.5) = normal(0, {dl**-0.5:.4g})"
                )
            rules["proj"] = "zeros" if cfg.init == "zero_proj" else f"normal(0, d_l^-0.5) = normal(0, {dl**-0.5:.4g})"
        else:
            rules["values"] = (
                "zeros" if cfg.init in ("zero_proj", "zero_bank") else f"normal(0, d_h^-0.5) = normal(0, {dh**-0.5:.4g})"
            )
        if self.query_norm is not None:
            rules["query_norm.weight"] = "ones"
            if self.query_norm.bias is not None:
                rules["query_norm.bias"] = "zeros"
            if self.query_norm.kind == "batch":
                rules |= {"query_norm.running_mean": "zeros", "query_norm.running_var": "ones", "query_norm.updates": "zeros"}
        if self.query_proj is not None:
            rules["query_proj.weight"] = f"normal(0, hidden^-0.5) = normal(0, {self.hidden_size**-0.5:.4g})"
        if self.gate is not None:
            fi = self.gate.in_features
            rules["gate.weight"] = f"normal(0, in^-0.5) = normal(0, {fi**-0.5:.4g})"
        if self.out_proj is not None:
            fi = self.out_proj.in_features
            rules["out_proj.weight"] = f"normal(0, (H*d_h)^-0.5) = normal(0, {fi**-0.5:.4g})"
        return rules

    @torch.no_grad()
    def reset_parameters(self, seed: int = 0) -> None:
        """Initialise every owned parameter from its own generator keyed by (seed, name).

        A shared bank is not touched: its owner calls ``LatentBank.reset_parameters``.
        """
        cfg, dh, dl = self.config, self.head_dim, self.config.latent_dim
        _fill(self.keys, "uniform", seed, "keys", 1.0 / math.sqrt(dh / 2))
        if cfg.hive:
            if self.bank is not None:
                self.bank.reset_parameters(seed, zero=cfg.init == "zero_bank", name="bank.weight")
            _fill(self.proj, "zeros" if cfg.init == "zero_proj" else "normal", seed, "proj", dl**-0.5)
        else:
            _fill(self.values, "zeros" if cfg.init != "random" else "normal", seed, "values", dh**-0.5)
        if self.query_norm is not None:
            _fill(self.query_norm.weight, "ones", seed, "query_norm.weight")
            if self.query_norm.bias is not None:
                _fill(self.query_norm.bias, "zeros", seed, "query_norm.bias")
            self.query_norm.reset_statistics()
        if self.query_proj is not None:
            _fill(self.query_proj.weight, "normal", seed, "query_proj.weight", self.hidden_size**-0.5)
        if self.gate is not None:
            _fill(self.gate.weight, "normal", seed, "gate.weight", self.gate.in_features**-0.5)
        if self.out_proj is not None:
            _fill(self.out_proj.weight, "normal", seed, "out_proj.weight", self.out_proj.in_features**-0.5)

    # -- cost ----------------------------------------------------------------------------
    def flops_per_token(self) -> int:
        """2 * multiply-adds of one token's forward (additions of candidate sums count as 1 MAC)."""
        cfg, H, dh, D = self.config, self.num_heads, self.head_dim, self.hidden_size
        n, k, dl = cfg.n_subkeys, cfg.topk, cfg.latent_dim
        inner = H * dh
        C = len(candidate_pairs(k, torch.device("cpu"))[0])
        macs = 0
        if self.query_proj is not None:
            macs += D * inner
        macs += H * n * dh  # two halves: 2 * n * d_h/2
        macs += H * C  # candidate sums
        macs += H * k  # softmax (exp + normalise), ~1 op per weight
        if cfg.hive:
            macs += H * k * dl + H * dl * dh  # pool in latent space, then project
        else:
            macs += H * k * dh
        if self.gate is not None:
            macs += self.gate.in_features * inner + inner
        if self.out_proj is not None:
            macs += inner * D
        return int(2 * macs)

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"heads={self.num_heads}, head_dim={self.head_dim}, hidden={self.hidden_size}, n={c.n_subkeys}, "
            f"k={c.topk}, d_l={c.latent_dim}, hive={c.hive}, shared_bank={self.shares_bank}, kernels={c.kernels}"
        )

    # -- forward -------------------------------------------------------------------------
    def lookup(self, queries: Tensor) -> tuple[Tensor, Tensor]:
        """(weights [H, T, k], slots [H, T, k]) for queries of the forward's input shape."""
        dev, autocast_dtype = _caller_autocast(queries)
        with torch.autocast(device_type=dev, enabled=False):
            q, _, _ = self._queries(queries, autocast_dtype)
            return self._lookup(q, self._backend(q))

    def _queries(self, x: Tensor, autocast_dtype: Optional[torch.dtype] = None):
        H, dh = self.num_heads, self.head_dim
        if self.config.query_source == "hidden":
            if x.shape[-1] != self.hidden_size:
                raise ValueError(f"expected [..., {self.hidden_size}] input, got {tuple(x.shape)}")
            lead = x.shape[:-1]
            flat_in = x.reshape(-1, self.hidden_size)
            q = _project(self.query_proj, flat_in, autocast_dtype).view(-1, H, dh)
        else:
            if x.dim() < 2 or x.shape[-2:] != (H, dh):
                raise ValueError(f"expected [..., {H}, {dh}] queries, got {tuple(x.shape)}")
            lead = x.shape[:-2]
            q = x.reshape(-1, H, dh)
            flat_in = q.reshape(-1, H * dh)
        return q, flat_in, lead

    def _mm_dtype(self, x: Tensor) -> torch.dtype:
        return _matmul_dtype(x.dtype, x.device.type)

    def _normed(self, q: Tensor, backend: str) -> Tensor:
        """The queries as the lookup scores them: float32 (float64 for float64 input), normalised.
        On the compiled CPU kernels an rms norm's backward is one compiled pass (_QueryRMSNorm)."""
        if self.query_norm is not None:  # called, not read: an offloading hook loads its weight at the call
            return self.query_norm(q, fused_backward=backend == "cpu").contiguous()  # it casts
        return q.to(torch.float64 if q.dtype == torch.float64 else torch.float32).contiguous()

    def _lookup(self, q: Tensor, backend: str) -> tuple[Tensor, Tensor]:
        q = self._normed(q, backend)
        keys = self.keys.to(q.dtype)
        if _builds_graph(q, keys):
            return _Lookup.apply(q, keys, self.config.topk, backend)  # w, slots: [H, T, k]
        return _lookup_forward(q, keys, self.config.topk, backend)[:2]

    def _read(self, q: Tensor, backend: str) -> tuple[Tensor, Tensor, Tensor]:
        """(m [H, T, d_h], w [H, T, k], slots [H, T, k]): each head's memory read of queries q [T, H, d_h],
        on ``backend`` (one decision per call, for the lookup and the pooling alike)."""
        cfg, H, dh = self.config, self.num_heads, self.head_dim
        N = cfg.n_subkeys**2
        table = self.latent_bank() if cfg.hive else self.values.view(H * N, dh)  # the bank by its call (LatentBank.forward)
        q = self._normed(q, backend)
        if backend == "triton-fused":  # one kernel reads, another differentiates the read
            keys, head_rows = self.keys.float(), 0 if cfg.hive else N
            if _builds_graph(q, keys, table):
                z, w, slots = _FusedRead.apply(q, keys, table, cfg.topk, head_rows, cfg.bank_grad)
            else:
                z, w, slots = _fused_read_forward(q, keys, table, cfg.topk, head_rows)[:3]
            if not cfg.hive:
                return z, w, slots
            cd = _matmul_dtype(self.proj.dtype, z.device.type)  # as _PoolProject's bmm
            z, proj = z.to(cd), self.proj.to(cd)
            if _builds_graph(z, proj):
                return _Project.apply(z, proj), w, slots
            return torch.bmm(z, proj), w, slots  # [H, T, d_l] @ [H, d_l, d_h]
        keys = self.keys.to(q.dtype)
        proj = self.proj if cfg.hive else None
        if not _builds_graph(q, keys, table, proj):
            return _read_forward(q, keys, table, proj, cfg.topk, 0 if cfg.hive else N, backend)
        w, slots = _Lookup.apply(q, keys, cfg.topk, backend)
        if cfg.hive:
            m = _PoolProject.apply(w, slots, table, proj, cfg.bank_grad, backend)
        else:
            m = _Pool.apply(w, _rows_in_table(slots, N), table, cfg.bank_grad, backend)
        return m, w, slots

    def forward(self, queries: Tensor) -> Tensor:
        dev, autocast_dtype = _caller_autocast(queries)
        if autocast_dtype is None:  # entering the context costs a decode step's call
            return self._forward(queries, None)
        with torch.autocast(device_type=dev, enabled=False):  # the read; the Linear projections take autocast_dtype
            return self._forward(queries, autocast_dtype)

    def _forward(self, x: Tensor, autocast_dtype: Optional[torch.dtype]) -> Tensor:
        H, dh = self.num_heads, self.head_dim
        out_dtype = x.dtype
        q, flat_in, lead = self._queries(x, autocast_dtype)
        T = q.shape[0]
        if T == 0:  # an empty batch, as an FFN takes it: zeros of the output's shape, still in the input's graph
            return (flat_in[:, :1] * 0).expand(0, self.hidden_size).to(out_dtype).view(*lead, self.hidden_size)
        m, w, slots = self._read(q, self._backend(q))  # m [H, T, d_h]; w, slots [H, T, k]
        if self.observer is not None:
            m = self.observer(w, slots, m)  # w, slots: [H, T, k]; m: [H, T, d_h]
        cd = self._mm_dtype(x)
        out = m.to(cd).transpose(0, 1).reshape(T, H * dh)
        if self.gate is not None:
            out = out * F.silu(_project(self.gate, flat_in, autocast_dtype).to(cd))
        if self.out_proj is not None:
            out = _project(self.out_proj, out, autocast_dtype)
        return out.to(out_dtype).view(*lead, self.hidden_size)


def hml_parameter_count(
    num_heads: int, head_dim: int, hidden_size: int, config: Optional[HMLConfig] = None, include_bank: bool = True
) -> int:
    """Parameters of one HeadwiseMemory (``include_bank=False``: without the latent bank, e.g. shared)."""
    config = HMLConfig() if config is None else config
    H, dh, D = num_heads, head_dim, hidden_size
    n, dl = config.n_subkeys, config.latent_dim
    inner = H * dh
    count = H * n * dh  # keys: H * 2 * n * dh/2
    if config.hive:
        count += H * dl * dh
        if include_bank:
            count += n * n * dl
    else:
        count += H * n * n * dh
    if config.query_norm in ("rms", "batch"):
        count += inner
    elif config.query_norm == "layer":
        count += 2 * inner
    in_features = D if config.query_source == "hidden" else inner
    if config.query_source == "hidden":
        count += D * inner
    if config.gate:
        count += in_features * inner
    if config.output_proj == "always" or (config.output_proj == "auto" and inner != D):
        count += inner * D
    return int(count)
