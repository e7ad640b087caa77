"""Triton kernels of the HML: the exact two-stage top-k (the GPU counterpart of ``topk2`` in
hml_cpu.cpp) and the weight gradient of the bag (the gather-dot half of ``bag_backward``).

On CUDA the pure-torch path selects with two ``torch.topk`` calls on int64 keys plus the gathers
and sums between them; a profile of the layer put those at about a quarter of its time (docs/hml.md).
This kernel does the whole selection for a block of rows in registers: both halves' top-k, the
candidate sums and the final top-k, each as one ``tl.topk`` over int64 keys that carry the tie rule
(score descending, then lower index), so it returns exactly what the pure-torch path returns.

``bag_dw`` replaces ``aten::_embedding_bag_per_sample_weights_backward``, the layer's second largest
CUDA cost in that profile (19%): one program per block of bags loads its dz rows once and dots
them with the k bank rows it gathers, accumulating in float32 from a table of any dtype.

The layer's CUDA default (``MIDUS_HML_KERNELS=torch`` turns them off): on an H200 they cut its
forward + backward to 0.40-0.44x the pure-torch time at 16 x 1024 tokens (docs/hml.md).
``TRITON_INTERPRET=1`` with ``MIDUS_HML_KERNELS=triton`` runs them on CPU tensors through Triton's
interpreter: that is how the tests check them without a GPU.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl


def _on_device(device: torch.device):
    """The CUDA device guard a launch needs: Triton launches on the current device, and a layer may
    sit on another one (a model split over GPUs with device_map). Compiled, inductor's wrapper code
    sets the device around every kernel, user kernels included."""
    if device.type != "cuda" or torch.compiler.is_compiling() or device.index in (None, torch.cuda.current_device()):
        return contextlib.nullcontext()
    return torch.cuda.device(device)


@triton.jit
def _ordered_key(x, tie):
    """int64 key of float32 ``x``: larger x first, equal x by larger ``tie`` (int64 in [0, 2**32))."""
    x = tl.where(x == 0.0, 0.0, x)  # -0.0 and +0.0 are one value
    bits = x.to(tl.int32, bitcast=True)
    bits = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # monotone float -> int map
    return (bits.to(tl.int64) << 32) + tie


@triton.jit
def _key_value(key):
    bits = (key >> 32).to(tl.int32)
    bits = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # the map is its own inverse
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _key_tie(key):
    return key - ((key >> 32) << 32)


@triton.jit
def _topk2_kernel(A, B, S, I, J, PR, PS, rows, T, sa_p, sa_t, sb_p, sb_t, n, k, C,
                  NP: tl.constexpr, KP: tl.constexpr, BR: tl.constexpr, CP: tl.constexpr, COMPACT: tl.constexpr):
    # rows = P*T score rows of n sub-keys; a row is (p, t) and lives at p*s_p + t*s_t in A / B.
    r = tl.program_id(0) * BR + tl.arange(0, BR)  # [BR]
    c = tl.arange(0, NP)  # [NP] sub-key index, n padded to a power of two
    live = (r[:, None] < rows) & (c[None, :] < n)  # [BR, NP]
    p, t = (r // T).to(tl.int64), (r % T).to(tl.int64)
    a = tl.load(A + (p * sa_p + t * sa_t)[:, None] + c[None, :], mask=live, other=0.0).to(tl.float32)
    b = tl.load(B + (p * sb_p + t * sb_t)[:, None] + c[None, :], mask=live, other=0.0).to(tl.float32)
    lowest = tl.full((BR, NP), -(2**63), tl.int64)  # below every float's key, -inf's included
    tie = (n - 1 - c).to(tl.int64)[None, :]  # a lower sub-key index wins a tie
    ta = tl.topk(tl.where(live, _ordered_key(a, tie), lowest), KP)  # [BR, KP], sorted descending
    tb = tl.topk(tl.where(live, _ordered_key(b, tie), lowest), KP)
    va, ia = _key_value(ta), n - 1 - _key_tie(ta)
    vb, ib = _key_value(tb), n - 1 - _key_tie(tb)

    # Stage 2: ranks (x, y) with (x+1)(y+1) <= k are the only pairs that can reach the top k
    # (both lists are sorted); the rest, and padding past k, never win.
    rank = tl.arange(0, KP)
    if COMPACT:  # the C live pairs only (PR / PS: their ranks, C = 119 for k = 32), gathered in registers
        cc = tl.arange(0, CP)
        pr = tl.broadcast_to(tl.load(PR + cc, mask=cc < C, other=0)[None, :], (BR, CP))
        ps = tl.broadcast_to(tl.load(PS + cc, mask=cc < C, other=0)[None, :], (BR, CP))
        sums = tl.gather(va, pr, 1) + tl.gather(vb, ps, 1)  # [BR, CP], the same float32 adds as torch's
        slot = tl.gather(ia, pr, 1) * n + tl.gather(ib, ps, 1)
        key = tl.where((cc < C)[None, :], _ordered_key(sums, n * n - 1 - slot), tl.full((BR, CP), -(2**63), tl.int64))
        best = tl.topk(key, KP)  # [BR, KP]
    else:  # every (x, y) of the KP x KP square, the dead ones masked: no gathers
        ok = ((rank[:, None] + 1) * (rank[None, :] + 1) <= k)[None, :, :]  # [1, KP, KP]
        sums = va[:, :, None] + vb[:, None, :]  # [BR, KP, KP], the same float32 adds as torch's
        slot = ia[:, :, None] * n + ib[:, None, :]
        key = tl.where(ok, _ordered_key(sums, n * n - 1 - slot), tl.full((BR, KP, KP), -(2**63), tl.int64))
        best = tl.topk(tl.reshape(key, (BR, KP * KP)), KP)  # [BR, KP]
    score = _key_value(best)
    slot = n * n - 1 - _key_tie(best)
    out = r[:, None] * k + rank[None, :]
    keep = (r[:, None] < rows) & (rank[None, :] < k)
    tl.store(S + out, score, mask=keep)
    tl.store(I + out, slot // n, mask=keep)
    tl.store(J + out, slot % n, mask=keep)


def topk2(a: torch.Tensor, b: torch.Tensor, k: int, pairs: tuple[torch.Tensor, torch.Tensor], compact: bool = True,
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact top-k of ``a[p, t, i] + b[p, t, j]`` over (i, j), as ``torch.ops.midus_hml.topk2`` on CPU.

    a, b: [P, T, n] float32 (each row contiguous in its last dim, any other strides). Returns
    (scores [P, T, k] float32, i [P, T, k] int64, j [P, T, k] int64), sorted by score descending,
    equal scores by the lower slot i*n + j. pairs: the live rank pairs (r, s) of a k x k square, two
    int64 tensors on a's device (``hml.candidate_pairs``: the caller owns that rule). ``compact`` (the default) ranks only the live candidate
    pairs, gathered with ``tl.gather``: 128 keys a row instead of 1024 for k = 32. ``compact=False``
    ranks the masked k x k square. Both give the same result; the compact ranking took 0.17x the
    square's time on an H200 at 16 x 1024 tokens (tools/gpu_check_hml.py, docs/hml.md).
    """
    if a.shape != b.shape or a.dim() != 3 or a.dtype != torch.float32 or b.dtype != torch.float32:
        raise ValueError(f"topk2 takes two float32 [P, T, n] score tables of one shape, got {tuple(a.shape)} {a.dtype} and {tuple(b.shape)} {b.dtype}")
    P, T, n = a.shape
    if not 1 <= k <= n:
        raise ValueError(f"topk2: k={k} must be in [1, n={n}]")
    if a.stride(2) != 1:
        a = a.contiguous()
    if b.stride(2) != 1:
        b = b.contiguous()
    scores = torch.empty(P, T, k, device=a.device, dtype=torch.float32)
    i_sub = torch.empty(P, T, k, device=a.device, dtype=torch.int64)
    j_sub = torch.empty_like(i_sub)
    rows = P * T
    if rows == 0:
        return scores, i_sub, j_sub
    KP = triton.next_power_of_2(k)
    NP = max(triton.next_power_of_2(n), KP)
    pr, ps = pairs
    CP = max(triton.next_power_of_2(pr.numel()), KP)
    width = CP if compact else KP * KP
    BR = max(1, min(16, 4096 // width))  # rows per program: a [BR, width] key block in registers
    with _on_device(a.device):
        _topk2_kernel[(triton.cdiv(rows, BR),)](
            a, b, scores, i_sub, j_sub, pr, ps, rows, T, a.stride(0), a.stride(1), b.stride(0), b.stride(1), n, k, pr.numel(),
            NP=NP, KP=KP, BR=BR, CP=CP, COMPACT=compact,
        )
    return scores, i_sub, j_sub


@triton.jit
def _bag_dw_kernel(DZ, TABLE, IDX, DW, bags, k, d, s_dz, s_tab,
                   KP: tl.constexpr, DP: tl.constexpr, DC: tl.constexpr, BB: tl.constexpr):
    # dw[b, i] = table[idx[b, i]] . dz[b] for a block of BB bags, d in chunks of DC columns
    bag = tl.program_id(0) * BB + tl.arange(0, BB)  # [BB]
    i = tl.arange(0, KP)  # [KP]
    live = (bag[:, None] < bags) & (i[None, :] < k)  # [BB, KP]
    slot = tl.load(IDX + bag[:, None].to(tl.int64) * k + i[None, :], mask=live, other=0)  # [BB, KP]
    row = slot.to(tl.int64) * s_tab  # [BB, KP]
    acc = tl.zeros((BB, KP), tl.float32)
    for c0 in tl.static_range(0, DP, DC):  # DP: d padded to a multiple of DC
        c = c0 + tl.arange(0, DC)  # [DC]
        cm = c < d
        g = tl.load(DZ + bag[:, None].to(tl.int64) * s_dz + c[None, :], mask=(bag[:, None] < bags) & cm[None, :], other=0.0)
        rows = tl.load(TABLE + row[:, :, None] + c[None, None, :], mask=live[:, :, None] & cm[None, None, :], other=0.0)
        acc += tl.sum(rows.to(tl.float32) * g.to(tl.float32)[:, None, :], axis=2)  # [BB, KP]
    tl.store(DW + bag[:, None].to(tl.int64) * k + i[None, :], acc, mask=live)


def bag_dw(dz: torch.Tensor, table: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Per-sample-weight gradient of a weighted-sum bag: ``dw[b, i] = table[idx[b, i]] . dz[b]``.

    dz: [B, d] (float32 / bf16 / fp16), table: [rows, d] (any of those dtypes), idx: [B, k] int64.
    Returns dw [B, k] float32 (products and sums in float32). It is what
    ``aten::_embedding_bag_per_sample_weights_backward`` returns for bags of k entries, up to the
    order of the float32 sum.
    """
    if dz.dim() != 2 or table.dim() != 2 or idx.dim() != 2 or dz.shape[0] != idx.shape[0] or dz.shape[1] != table.shape[1]:
        raise ValueError(f"bag_dw takes dz [B, d], table [rows, d], idx [B, k], got {tuple(dz.shape)}, "
                         f"{tuple(table.shape)}, {tuple(idx.shape)}")
    if dz.dtype == torch.float64 or table.dtype == torch.float64:
        raise ValueError("bag_dw accumulates in float32; float64 bags keep the pure-torch path")
    dz = dz if dz.stride(1) == 1 else dz.contiguous()
    table = table if table.stride(1) == 1 else table.contiguous()
    idx = idx.contiguous()
    B, k = idx.shape
    d = dz.shape[1]
    dw = torch.empty(B, k, device=dz.device, dtype=torch.float32)
    if B == 0 or k == 0:
        return dw
    KP = triton.next_power_of_2(k)
    DC = min(64, triton.next_power_of_2(d))
    DP = triton.cdiv(d, DC) * DC
    BB = max(1, min(16, 4096 // (KP * DC)))  # a [BB, KP, DC] block of gathered rows in registers
    with _on_device(dz.device):
        _bag_dw_kernel[(triton.cdiv(B, BB),)](dz, table, idx, dw, B, k, d, dz.stride(0), table.stride(0),
                                              KP=KP, DP=DP, DC=DC, BB=BB)
    return dw
