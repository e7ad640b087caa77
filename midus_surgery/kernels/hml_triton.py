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
from typing import Optional

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
def _two_stage(a, b, live, n, k, PR, PS, C,
               BR: tl.constexpr, NP: tl.constexpr, KP: tl.constexpr, CP: tl.constexpr, COMPACT: tl.constexpr):
    """Exact top-k of a[r, i] + b[r, j] over (i, j) for a block of rows: a, b [BR, NP] float32 half
    scores, ``live`` [BR, NP] their real entries. Returns (scores, slots i*n + j), [BR, KP] each, sorted
    by score descending, equal scores by the lower slot; ranks past k are padding."""
    c = tl.arange(0, NP)
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
    return _key_value(best), n * n - 1 - _key_tie(best)


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
    score, slot = _two_stage(a, b, live, n, k, PR, PS, C, BR, NP, KP, CP, COMPACT)
    rank = tl.arange(0, KP)
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


# ----------------------------------------------------------------------------------------
# The fused memory read: scores + selection + softmax + pooled gather in one kernel, and its
# backward in another (HMLConfig.kernels "triton-fused"; docs/hml.md, "Fused Triton kernels")
# ----------------------------------------------------------------------------------------

@triton.jit
def _column(x, rank, i):
    """Column ``i`` of a [BT, KP] block as a [BT] vector (registers cannot be indexed by a variable)."""
    return tl.sum(tl.where(rank[None, :] == i, x, tl.zeros_like(x)), axis=1)


@triton.jit
def _query_and_keys(Q, KEYS, t, tm, h, n, sq_t, sq_h, sk_h, sk_half,
                    DH2: tl.constexpr, DH2P: tl.constexpr, NP: tl.constexpr):
    """Both read kernels' inputs for tokens t (live where tm) of head h: the query halves qa, qb [BT, DH2P] and
    the head's sub-key halves ka, kb [NP, DH2P], float32, zero past d_h/2 and n."""
    e = tl.arange(0, DH2P)  # a half query's features
    c = tl.arange(0, NP)  # sub-key index
    qrow = Q + t.to(tl.int64)[:, None] * sq_t + h * sq_h + e[None, :]
    qmask = tm[:, None] & (e < DH2)[None, :]
    qa = tl.load(qrow, mask=qmask, other=0.0)
    qb = tl.load(qrow + DH2, mask=qmask, other=0.0)
    krow = KEYS + h * sk_h + c[:, None] * DH2 + e[None, :]
    kmask = (c < n)[:, None] & (e < DH2)[None, :]
    ka = tl.load(krow, mask=kmask, other=0.0)
    kb = tl.load(krow + sk_half, mask=kmask, other=0.0)
    return qa, qb, ka, kb


@triton.jit
def _select_and_store(sa, sb, live, tm, h, t, T, n, k, PR, PS, C, W, I, J,
                      BT: tl.constexpr, NP: tl.constexpr, KP: tl.constexpr, CP: tl.constexpr):
    """Both read kernels' selection from the half scores sa, sb [BT, NP]: the exact two-stage top-k, the
    softmax over the k chosen scores, and w and the sub-key indices stored. Returns (w, slot) [BT, KP];
    ranks past k have w = 0."""
    score, slot = _two_stage(sa, sb, live, n, k, PR, PS, C, BT, NP, KP, CP, True)  # [BT, KP]
    rank = tl.arange(0, KP)
    keep = tm[:, None] & (rank < k)[None, :]
    s = tl.where(rank[None, :] < k, score, float("-inf"))
    s = tl.where(tm[:, None], s, 0.0)  # rows past T: finite, never stored
    p = tl.exp(s - tl.max(s, axis=1)[:, None])
    w = p / tl.sum(p, axis=1)[:, None]  # [BT, KP] softmax over the k chosen slots
    out = (h * T + t.to(tl.int64))[:, None] * k + rank[None, :]
    tl.store(W + out, w, mask=keep)
    tl.store(I + out, slot // n, mask=keep)
    tl.store(J + out, slot % n, mask=keep)
    return w, slot


@triton.jit
def _memory_fwd_kernel(Q, KEYS, TABLE, PR, PS, W, I, J, Z,
                       T, n, k, C, d, head_rows, sq_t, sq_h, sk_h, sk_half, s_tab,
                       DH2: tl.constexpr, DH2P: tl.constexpr, NP: tl.constexpr, KP: tl.constexpr,
                       CP: tl.constexpr, DP: tl.constexpr, BT: tl.constexpr, SMALL: tl.constexpr):
    # one program: head h, tokens t .. t+BT. Nothing of size [T, n] or [T, k, d] leaves registers.
    # SMALL, the decode-shaped read: a few tokens a program (BT: as many as fit _SMALL_READ_ELEMENTS,
    # 1 to 16), so a decode step's tokens spread over more programs than one per head and each program's
    # latency is short; the scores are broadcast products summed in registers (tl.dot wants blocks of
    # 16 rows), and the k bank rows are gathered as one [BT, KP, d] load, every load in flight at once,
    # instead of k dependent ones.
    h = tl.program_id(1)
    t = tl.program_id(0) * BT + tl.arange(0, BT)  # [BT]
    tm = t < T
    qa, qb, ka, kb = _query_and_keys(Q, KEYS, t, tm, h, n, sq_t, sq_h, sk_h, sk_half, DH2, DH2P, NP)
    if SMALL:
        sa = tl.sum(qa[:, None, :] * ka[None, :, :], axis=2)  # [BT, NP], float32 products and sums
        sb = tl.sum(qb[:, None, :] * kb[None, :, :], axis=2)
    else:  # the scores in full float32 (no TF32), as the pure-torch path's bmm
        sa = tl.dot(qa, tl.trans(ka), input_precision="ieee")  # [BT, NP]
        sb = tl.dot(qb, tl.trans(kb), input_precision="ieee")
    live = tm[:, None] & (tl.arange(0, NP) < n)[None, :]
    w, slot = _select_and_store(sa, sb, live, tm, h, t, T, n, k, PR, PS, C, W, I, J, BT, NP, KP, CP)  # [BT, KP]

    # pooled gather: z[t] = sum_i w[t, i] * table[h * head_rows + slot[t, i]], float32 sums
    rank = tl.arange(0, KP)
    f = tl.arange(0, DP)
    fm = tm[:, None] & (f < d)[None, :]
    if SMALL:  # summed over the ranks as a tree
        row = (h * head_rows + slot).to(tl.int64) * s_tab  # [BT, KP]
        gm = (tm[:, None] & (rank < k)[None, :])[:, :, None] & (f < d)[None, None, :]
        u = tl.load(TABLE + row[:, :, None] + f[None, None, :], mask=gm, other=0.0).to(tl.float32)  # [BT, KP, DP]
        z = tl.sum(w[:, :, None] * u, axis=1)  # [BT, DP]
    else:  # summed in rank order
        z = tl.zeros((BT, DP), tl.float32)
        for i in range(0, k):
            w_i = _column(w, rank, i)  # [BT]
            row_i = (h * head_rows + _column(slot, rank, i)).to(tl.int64) * s_tab  # [BT]
            z += w_i[:, None] * tl.load(TABLE + row_i[:, None] + f[None, :], mask=fm, other=0.0).to(tl.float32)
    tl.store(Z + (h * T + t.to(tl.int64))[:, None] * d + f[None, :], z, mask=fm)


@triton.jit
def _memory_bwd_kernel(DZ, Q, KEYS, TABLE, W, I, J, DQ, DKEYS, DTABLE,
                       T, n, k, d, head_rows, sq_t, sq_h, sk_h, sk_half, s_tab, tokens_per_program,
                       DH2: tl.constexpr, DH2P: tl.constexpr, NP: tl.constexpr, KP: tl.constexpr,
                       DP: tl.constexpr, BT: tl.constexpr, ATOMIC_TABLE: tl.constexpr):
    # one program: head h, a run of tokens (several BT blocks). Per block, in registers: dw (gather-dot
    # with the chosen rows), the softmax backward, the half-score gradients as one-hot [BT, n] blocks,
    # dq by one dot with the keys; the keys' gradient is summed over the run in registers and written
    # once per program (a partial the caller sums: no atomics on the small key table).
    h = tl.program_id(1)
    run = tl.program_id(0)
    e = tl.arange(0, DH2P)
    c = tl.arange(0, NP)
    f = tl.arange(0, DP)
    rank = tl.arange(0, KP)
    krow = KEYS + h * sk_h + c[:, None] * DH2 + e[None, :]
    kmask = (c < n)[:, None] & (e < DH2)[None, :]
    ka = tl.load(krow, mask=kmask, other=0.0)  # [NP, DH2P]
    kb = tl.load(krow + sk_half, mask=kmask, other=0.0)
    dka = tl.zeros((NP, DH2P), tl.float32)
    dkb = tl.zeros((NP, DH2P), tl.float32)
    for t0 in range(run * tokens_per_program, tl.minimum(T, (run + 1) * tokens_per_program), BT):
        t = t0 + tl.arange(0, BT)
        tm = t < T
        keep = tm[:, None] & (rank < k)[None, :]
        at = (h * T + t.to(tl.int64))[:, None] * k + rank[None, :]
        w = tl.load(W + at, mask=keep, other=0.0)  # [BT, KP]
        i_sub = tl.load(I + at, mask=keep, other=0)
        j_sub = tl.load(J + at, mask=keep, other=0)
        fm = tm[:, None] & (f < d)[None, :]
        dz = tl.load(DZ + (h * T + t.to(tl.int64))[:, None] * d + f[None, :], mask=fm, other=0.0).to(tl.float32)  # [BT, DP]
        dw = tl.zeros((BT, KP), tl.float32)
        for i in range(0, k):
            row = (h * head_rows + _column(i_sub, rank, i) * n + _column(j_sub, rank, i)).to(tl.int64) * s_tab
            u = tl.load(TABLE + row[:, None] + f[None, :], mask=fm, other=0.0).to(tl.float32)  # [BT, DP]
            dw = tl.where(rank[None, :] == i, tl.sum(u * dz, axis=1)[:, None], dw)
            if ATOMIC_TABLE:  # the table's gradient row += w * dz (float32 atomics: not deterministic)
                tl.atomic_add(DTABLE + row[:, None] + f[None, :], _column(w, rank, i)[:, None] * dz, mask=fm)
        dsel = w * (dw - tl.sum(w * dw, axis=1)[:, None])  # softmax backward, [BT, KP]
        dsa = tl.zeros((BT, NP), tl.float32)  # d(half score) [BT, n]: the chosen sub-keys' dsel, summed
        dsb = tl.zeros((BT, NP), tl.float32)
        for i in range(0, k):
            g = _column(dsel, rank, i)[:, None]
            dsa += tl.where(c[None, :] == _column(i_sub, rank, i)[:, None], g, 0.0)
            dsb += tl.where(c[None, :] == _column(j_sub, rank, i)[:, None], g, 0.0)
        qrow = Q + t.to(tl.int64)[:, None] * sq_t + h * sq_h + e[None, :]
        qmask = tm[:, None] & (e < DH2)[None, :]
        qa = tl.load(qrow, mask=qmask, other=0.0)
        qb = tl.load(qrow + DH2, mask=qmask, other=0.0)
        drow = DQ + t.to(tl.int64)[:, None] * sq_t + h * sq_h + e[None, :]
        tl.store(drow, tl.dot(dsa, ka, input_precision="ieee"), mask=qmask)
        tl.store(drow + DH2, tl.dot(dsb, kb, input_precision="ieee"), mask=qmask)
        dka += tl.dot(tl.trans(dsa), qa, input_precision="ieee")  # [NP, DH2P]
        dkb += tl.dot(tl.trans(dsb), qb, input_precision="ieee")
    part = DKEYS + ((run * tl.num_programs(1) + h) * 2 * n) * DH2 + c[:, None] * DH2 + e[None, :]
    tl.store(part, dka, mask=kmask)
    tl.store(part + n * DH2, dkb, mask=kmask)


def _memory_blocks(q: torch.Tensor, keys: torch.Tensor, table: torch.Tensor, k: int) -> dict:
    """The block sizes both kernels use (constexprs), from the shapes."""
    T, H, dh = q.shape
    n = keys.shape[2]
    d = table.shape[1]
    KP = triton.next_power_of_2(k)
    # tl.dot wants every dimension >= 16 on a GPU: the padding is masked
    return dict(DH2=dh // 2, DH2P=max(16, triton.next_power_of_2(dh // 2)), NP=max(16, triton.next_power_of_2(n), KP),
                KP=KP, DP=triton.next_power_of_2(d), BT=16)


def _check_memory_args(q, keys, table, k, head_rows):
    if q.dim() != 3 or keys.dim() != 4 or table.dim() != 2 or keys.shape[0] != q.shape[1] or keys.shape[1] != 2 \
            or 2 * keys.shape[3] != q.shape[2]:
        raise ValueError(f"memory kernels take q [T, H, d_h], keys [H, 2, n, d_h/2], table [rows, d], got "
                         f"{tuple(q.shape)}, {tuple(keys.shape)}, {tuple(table.shape)}")
    if q.dtype != torch.float32 or keys.dtype != torch.float32 or table.dtype == torch.float64:
        raise ValueError("memory kernels score in float32: q and keys float32, the table float32/bf16/fp16")
    n = keys.shape[2]
    if not 1 <= k <= n:
        raise ValueError(f"memory kernels: k={k} must be in [1, n={n}]")
    if table.shape[0] < (keys.shape[0] - 1) * head_rows + n * n:
        raise ValueError(f"memory kernels: a table of {table.shape[0]} rows is too small for {keys.shape[0]} heads "
                         f"of {n * n} slots {head_rows} rows apart")


# Up to this many tokens (a decode step's batch, a short speculative draft) the read takes the
# decode-shaped kernel: a first choice from the kernels' shapes (one program per head of a 16-token block
# left 9 programs on an H200's 132 SMs at decode, docs/hml.md), to be settled by gpu_check_hml.py section 11.
SMALL_READ_MAX_TOKENS = 64
_SMALL_READ_ELEMENTS = 8192  # the largest [BT, n, d_h/2] / [BT, k, d] block a small-read program holds


def _small_read_rows(T: int, blocks: dict) -> int:
    """Tokens per program of the decode-shaped read: as many as fit its register blocks, at most 16."""
    per_token = max(blocks["NP"] * blocks["DH2P"], blocks["KP"] * blocks["DP"])
    fit = 1 << max(0, (_SMALL_READ_ELEMENTS // per_token).bit_length() - 1)  # a power of two, at least 1
    return min(16, triton.next_power_of_2(max(1, T)), fit)


def memory_forward(q: torch.Tensor, keys: torch.Tensor, table: torch.Tensor, k: int, head_rows: int,
                   pairs: tuple[torch.Tensor, torch.Tensor], small: Optional[bool] = None,
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The memory read of every head in one kernel: what ``_Lookup`` + ``_bag_forward`` compute.

    q: [T, H, d_h] float32 (normalised queries), keys: [H, 2, n, d_h/2] float32, table: [rows, d] (the
    shared HIVE bank with ``head_rows`` = 0, or the per-head value tables flattened with ``head_rows`` =
    n*n; float32/bf16/fp16). pairs: ``hml.candidate_pairs(k)``. Returns (w [H, T, k] float32, i, j
    [H, T, k] int64 sub-key indices, z [H, T, d] float32), with z[h, t] = sum_i w * table[h*head_rows +
    i*n + j]. The slots are the exact top-k of the scores under the layer's tie rule; the scores are
    float32 dot products summed in the kernel's order (not cuBLAS's), so a score that differs from the
    pure-torch path's in its last bit can reorder a near tie there.

    ``small``: the decode-shaped kernel (a few tokens a program, the k rows gathered at once, z summed
    over the ranks as a tree) or the 16-token blocks (z summed in rank order); None: the decode-shaped one
    for up to SMALL_READ_MAX_TOKENS tokens. Both select the same slots from the same exact scores.
    """
    _check_memory_args(q, keys, table, k, head_rows)
    T, H, dh = q.shape
    n, d = keys.shape[2], table.shape[1]
    q, keys = q.contiguous(), keys.contiguous()
    table = table if table.stride(1) == 1 else table.contiguous()
    w = torch.empty(H, T, k, device=q.device, dtype=torch.float32)
    i_sub = torch.empty(H, T, k, device=q.device, dtype=torch.int64)
    j_sub = torch.empty_like(i_sub)
    z = torch.empty(H, T, d, device=q.device, dtype=torch.float32)
    if T == 0:
        return w, i_sub, j_sub, z
    pr, ps = pairs
    blocks = _memory_blocks(q, keys, table, k)
    blocks["CP"] = max(triton.next_power_of_2(pr.numel()), blocks["KP"])
    blocks["SMALL"] = small if small is not None else T <= SMALL_READ_MAX_TOKENS
    if blocks["SMALL"]:
        blocks["BT"] = _small_read_rows(T, blocks)
    with _on_device(q.device):
        _memory_fwd_kernel[(triton.cdiv(T, blocks["BT"]), H)](
            q, keys, table, pr, ps, w, i_sub, j_sub, z, T, n, k, pr.numel(), d, head_rows,
            q.stride(0), q.stride(1), keys.stride(0), keys.stride(1), table.stride(0), **blocks)
    return w, i_sub, j_sub, z


def memory_backward(dz: torch.Tensor, q: torch.Tensor, keys: torch.Tensor, table: torch.Tensor, w: torch.Tensor,
                    i_sub: torch.Tensor, j_sub: torch.Tensor, head_rows: int, atomic_table: bool,
                    programs: int = 512) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Gradients of ``memory_forward``'s z: (dq [T, H, d_h], dkeys [H, 2, n, d_h/2], dtable or None), float32.

    dz: [H, T, d]. dq and dkeys come from one kernel: per block of tokens the gather-dot dw, the softmax
    backward and the half-score gradients stay in registers; each program sums its tokens' key gradient
    and writes it once, and the caller-side sum over programs is a small deterministic reduction.
    ``atomic_table``: the same kernel adds w * dz into a float32 table gradient with atomics (fast, not
    deterministic); otherwise None is returned and the caller computes it (the pure-torch path's sorted,
    deterministic embedding-bag backward). ``programs``: about how many programs to launch (the partial
    key gradients cost programs x 2n x d_h/2 floats).
    """
    T, H, dh = q.shape
    k = w.shape[-1]
    n, d = keys.shape[2], table.shape[1]
    _check_memory_args(q, keys, table, k, head_rows)
    dz = dz.contiguous()
    q, keys = q.contiguous(), keys.contiguous()
    table = table if table.stride(1) == 1 else table.contiguous()
    w, i_sub, j_sub = w.contiguous(), i_sub.contiguous(), j_sub.contiguous()
    dq = torch.zeros(T, H, dh, device=q.device, dtype=torch.float32)
    dtable = torch.zeros(table.shape, device=q.device, dtype=torch.float32) if atomic_table else None
    blocks = _memory_blocks(q, keys, table, k)
    bt = blocks["BT"]
    runs = max(1, min(triton.cdiv(T, bt), triton.cdiv(programs, H)))
    tokens_per_program = triton.cdiv(triton.cdiv(T, runs), bt) * bt
    runs = triton.cdiv(T, tokens_per_program) if T else 1
    partial = torch.zeros(runs, H, 2, n, dh // 2, device=q.device, dtype=torch.float32)
    if T:
        with _on_device(q.device):
            _memory_bwd_kernel[(runs, H)](
                dz, q, keys, table, w, i_sub, j_sub, dq, partial, dtable if atomic_table else dq,
                T, n, k, d, head_rows, q.stride(0), q.stride(1), keys.stride(0), keys.stride(1), table.stride(0),
                tokens_per_program, ATOMIC_TABLE=atomic_table, **blocks,
                num_warps=8)  # the keys and their gradient accumulators stay in registers for the whole run
    return dq, partial.sum(0), dtable


# ----------------------------------------------------------------------------------------
# The bank's gradient as a deterministic segment reduce, without a sort and without float atomics
# (HMLConfig.bank_grad "segment"; docs/hml.md, "The bank gradient as a segment reduce")
# ----------------------------------------------------------------------------------------
# dtable[r] = sum over the contributions m = b*k + i with idx[b, i] = r of w[b, i] * dz[b].
# 1. count:  a [rows, blocks] table of how many contributions of each block of m hit each row
#            (int32 atomics: integer sums do not depend on their order);
# 2. scan:   its exclusive cumsum in (row, block) order is where each (row, block) run starts;
# 3. place:  each block walks its contributions in order and writes m at the next free place of its
#            row's run, so every row's list holds its m ascending: a stable counting sort by row;
# 4. sum:    one program per chunk of a row's list sums w * dz in that order into a float32 partial;
# 5. rows:   each row adds its chunks' partials in order.
# Every sum has a fixed order, so the bits do not depend on the launch nor on the number of blocks: the
# same inputs give the same gradient on every run. (Triton compiles a kernel per alignment of its
# pointers and strides, and the split of step 4's 64-row sum can differ between those compiles: the
# bits are those of one device, Triton version and input layout.)

@triton.jit
def _segment_count_kernel(IDX, COUNT, M, per_block, blocks, V: tl.constexpr):
    blk = tl.program_id(0).to(tl.int64)  # int64: blk * per_block may pass 2**31 near the size limit
    lane = tl.arange(0, V)
    for m0 in range(blk * per_block, tl.minimum(M, (blk + 1) * per_block), V):
        m = m0 + lane  # per_block is a multiple of V: only the last vector of all runs past M
        live = m < M
        r = tl.load(IDX + m, mask=live, other=0)
        # relaxed: only the final counts matter, read after the kernel
        tl.atomic_add(COUNT + r.to(tl.int64) * blocks + blk, tl.full((V,), 1, tl.int32), mask=live, sem="relaxed")


@triton.jit
def _segment_place_kernel(IDX, NEXT, ORDER, M, per_block, blocks, V: tl.constexpr):
    # NEXT [rows, blocks] int32: where this block's next contribution to a row goes. Only this program
    # touches its column, so the read-then-write below races with no other program. Within the program,
    # the barriers order each vector's reads before its writes and its writes before the next reads: a
    # bar.sync orders the global accesses of one CTA. Launched with num_stages=1 so that no pipelining
    # prefetches a later vector's reads across them (Triton does not track global-memory dependences).
    blk = tl.program_id(0).to(tl.int64)
    lane = tl.arange(0, V)
    before = lane[None, :] < lane[:, None]  # [V, V]: lane c' comes before lane c
    after = lane[None, :] > lane[:, None]
    for m0 in range(blk * per_block, tl.minimum(M, (blk + 1) * per_block), V):
        m = m0 + lane
        live = m < M
        r = tl.load(IDX + m, mask=live, other=-1)  # -1 never equals a row
        same = r[:, None] == r[None, :]  # [V, V]
        rank = tl.sum((same & before).to(tl.int32), axis=1)  # earlier lanes of the vector on the same row
        last = tl.sum((same & after).to(tl.int32), axis=1) == 0
        at = NEXT + r.to(tl.int64) * blocks + blk
        pos = tl.load(at, mask=live, other=0) + rank
        tl.debug_barrier()  # every lane has read its row's place before any lane moves it on
        tl.store(ORDER + pos, m.to(tl.int32), mask=live)
        tl.store(at, pos + 1, mask=live & last)
        tl.debug_barrier()  # ... and the moves are seen by the next vector's reads


@triton.jit
def _segment_sum_kernel(ORDER, W, DZ, ROW_OF, FIRST, START, COUNT, PART, rows, k, d, s_dz, chunk,
                        V: tl.constexpr, DC: tl.constexpr):
    # one program: one chunk of one row's list, DC of its d columns (programs past the last chunk write nothing)
    item = tl.program_id(0)
    r = tl.load(ROW_OF + item)
    if r < rows:
        lo = tl.load(START + r) + (item - tl.load(FIRST + r)) * chunk
        hi = tl.minimum(tl.load(START + r) + tl.load(COUNT + r), lo + chunk)
        lane = tl.arange(0, V)
        f = tl.program_id(1) * DC + tl.arange(0, DC)
        acc = tl.zeros((DC,), tl.float32)
        for p0 in range(lo, hi, V):
            p = p0 + lane
            live = p < hi
            m = tl.load(ORDER + p, mask=live, other=0)  # int32
            wm = tl.load(W + m.to(tl.int64), mask=live, other=0.0).to(tl.float32)  # [V]
            bag = (m // k).to(tl.int64)  # divided in int32: m < 2**31
            g = tl.load(DZ + bag[:, None] * s_dz + f[None, :], mask=live[:, None] & (f < d)[None, :],
                        other=0.0).to(tl.float32)  # [V, DC]: the bags' gradient rows
            acc += tl.sum(wm[:, None] * g, axis=0)
        tl.store(PART + item.to(tl.int64) * d + f, acc, mask=f < d)


@triton.jit
def _segment_rows_kernel(PART, FIRST, ITEMS, OUT, d, DP: tl.constexpr):
    r = tl.program_id(0)
    f = tl.arange(0, DP)
    first = tl.load(FIRST + r)
    acc = tl.zeros((DP,), tl.float32)
    for c in range(0, tl.load(ITEMS + r)):
        acc += tl.load(PART + (first + c) * d + f, mask=f < d, other=0.0)
    tl.store(OUT + r.to(tl.int64) * d + f, acc, mask=f < d)


_SEGMENT_LANES = 64  # contributions a segment program handles per step (count, place and sum alike)


def segment_blocks(M: int, rows: int, blocks: int = 256) -> tuple[int, int]:
    """(counting blocks, contributions per block) that ``segment_order`` uses for M contributions to
    ``rows`` rows when asked for ``blocks``: at most one block per 256 contributions, and at most
    2**24 // rows (the [rows, blocks] int32 tables stay under 64 MB each: a table of many rows gets few
    blocks and long placement chains, which is why HIVE off's H x n^2 rows are reduced head by head)."""
    V = _SEGMENT_LANES
    blocks = max(1, min(blocks, triton.cdiv(M, 4 * V), (1 << 24) // max(1, rows)))
    per_block = triton.cdiv(triton.cdiv(M, blocks), V) * V
    return max(1, triton.cdiv(M, per_block)), per_block


def segment_order(idx: torch.Tensor, rows: int, blocks: int = 256) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Passes 1-3: the flat positions m of ``idx`` (int64, any shape, values in [0, rows)) grouped by row,
    each row's m ascending: what a stable argsort of ``idx.flatten()`` returns, by counting. Returns
    (order [M] int32, start [rows] int64 where each row's list begins, count [rows] int64 its length).
    ``blocks``: at most how many programs count and place (they share a [rows, blocks] int32 table).
    """
    M = idx.numel()
    if M >= 2**31:
        raise ValueError(f"segment_order: {M} positions do not fit its int32 order")
    idx = idx.contiguous().view(-1)
    V = _SEGMENT_LANES
    blocks, per_block = segment_blocks(M, rows, blocks)
    count = torch.zeros(rows, blocks, device=idx.device, dtype=torch.int32)
    order = torch.empty(M, device=idx.device, dtype=torch.int32)
    if M == 0:
        return order, torch.zeros(rows, device=idx.device, dtype=torch.int64), count.sum(1, dtype=torch.int64)
    with _on_device(idx.device):
        _segment_count_kernel[(blocks,)](idx, count, M, per_block, blocks, V=V)
        flat = count.view(-1)
        nxt = (torch.cumsum(flat, 0) - flat).to(torch.int32).view(rows, blocks)  # each (row, block) run's start
        start = nxt[:, 0].to(torch.int64)
        # two warps hold the 64 lanes once each (no copies of a lane in other warps); num_stages=1: see the kernel
        _segment_place_kernel[(blocks,)](idx, nxt, order, M, per_block, blocks, V=V, num_warps=2, num_stages=1)
    return order, start, count.sum(1, dtype=torch.int64)


def segment_bank_grad(dz: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, rows: int, blocks: int = 256,
                      chunk: int = 2048, groups: int = 1) -> torch.Tensor:
    """The table gradient of a weighted-sum bag, ``dtable[r] = sum of w[b, i] * dz[b] over idx[b, i] = r``,
    deterministically and without a sort or float atomics (the five passes above).

    dz: [B, d] (float32 / bf16 / fp16, any row stride), idx: [B, k] int64 rows of the table, w: [B, k].
    Returns dtable [rows, d] float32. Each row sums its contributions in the order of b (then i), in float32
    vectors of 64 within chunks of ``chunk`` (so a row most tokens read is summed by many programs), then the
    chunks in order: the same bits on every run of the same inputs, whatever ``blocks`` is (``segment_order``'s).

    ``groups``: the bags and the table's rows fall into that many equal parts, and bag part g reads only row
    part g (HIVE off: head h's bags read only head h's value table). Each part is then reduced on its own,
    with the row offset taken off its slot ids: a table of H x n^2 rows would otherwise share its count
    table's 2**24 entries among all rows and get few counting blocks (8 at the Llama size), where a head's
    n^2 rows get the full count (256). A row's contributions come from one part, in the same order: the same
    bits as one reduce over everything. Slot ids outside their part's rows are not checked (the GPU would
    have to sync): the caller guarantees them, as it guarantees ids in [0, rows).
    """
    if dz.dim() != 2 or idx.dim() != 2 or w.shape != idx.shape or dz.shape[0] != idx.shape[0]:
        raise ValueError(f"segment_bank_grad takes dz [B, d], idx [B, k], w [B, k], got {tuple(dz.shape)}, "
                         f"{tuple(idx.shape)}, {tuple(w.shape)}")
    if dz.dtype == torch.float64 or w.dtype == torch.float64:
        raise ValueError("segment_bank_grad sums in float32; float64 bags keep the pure-torch path")
    B, k = idx.shape
    d = dz.shape[1]
    if groups > 1:
        if B % groups or rows % groups:
            raise ValueError(f"segment_bank_grad: {B} bags and {rows} rows do not split into {groups} equal groups")
        b, r = B // groups, rows // groups
        out = torch.empty(rows, d, device=dz.device, dtype=torch.float32)
        for g in range(groups):  # one group's count table and partials at a time: the allocator reuses them
            part = slice(g * b, (g + 1) * b)
            out[g * r:(g + 1) * r] = segment_bank_grad(dz[part], idx[part] - g * r, w[part], r, blocks, chunk)
        return out
    out = torch.zeros(rows, d, device=dz.device, dtype=torch.float32)
    if B * k == 0 or d == 0:
        return out
    dz = dz if dz.stride(1) == 1 else dz.contiguous()
    w = w.contiguous()
    order, start, per_row = segment_order(idx, rows, blocks)
    items = (per_row + chunk - 1) // chunk  # [rows] chunks of each row's list
    ends = torch.cumsum(items, 0)
    first = ends - items
    programs = triton.cdiv(B * k, chunk) + rows  # no fewer than the chunks, without asking the device how many
    row_of = torch.searchsorted(ends, torch.arange(programs, device=dz.device), right=True)  # [programs]
    part = torch.empty(programs, d, device=dz.device, dtype=torch.float32)
    DC = min(128, triton.next_power_of_2(d))  # columns per program: a [64, DC] block of dz rows in registers
    with _on_device(dz.device):
        _segment_sum_kernel[(programs, triton.cdiv(d, DC))](order, w, dz, row_of, first, start, per_row, part, rows, k, d,
                                                            dz.stride(0), chunk, V=_SEGMENT_LANES, DC=DC)
        _segment_rows_kernel[(rows,)](part, first, items, out, d, DP=triton.next_power_of_2(d))
    return out
