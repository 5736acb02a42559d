"""Mixed-batch kernels: every sequence of the batch reads its own adapter (``seq_adapter``).

All adapters share the layer's projection, so a tile's theta_d indices and scales are the same
for every adapter; only the vector they are read from differs: ``theta`` for id 0, row
``id - 1`` of ``table`` for id > 0, nothing for id -1 (and, for memory safety, for ids past the
table). Row m belongs to sequence ``m // L`` (L = M / S rows per sequence).

Every program owns a tile of rows inside one sequence (``seq_tile``), so it reads one adapter
id and gathers one W tile, as punica's SGMV / vLLM's shrink-expand kernels do:

* ``ROWS`` (decode, short sequences): BLOCK_M = 1, one row per tile, the products are
  broadcast-and-sum on FMA units (a tile of 16 rows would be mostly padding);
* segments (prefill): BLOCK_M rows of one sequence, products on ``tl.dot`` (``mma``).

Kernels, each addressing its gathered W (R x C) by layer position
``i * w_stride_r + c * w_stride_c`` as ``lora_fwd`` does:

* ``mixed_shrink_kernel``: y (M, R) fp32 = drop(x) W_a^T (h with W = A, g B with W = B^T);
* ``mixed_expand_kernel``: out += y W_a (forward, W = B^T; base rows untouched) or
  grad_x = (y W_a) * mask * scale, stored for every row (zero on base rows);
* ``mixed_dw_kernel``: dW_a = u^T v over a split of each sequence's rows (dA: u = g B,
  v = drop(x); dB: u = h, v = g), scatter-added with fp32 atomics into the adapter's gradient
  (theta's buffer for id 0, the table's row id - 1 otherwise); in deterministic mode the first
  sequence of each adapter sums all of that adapter's rows in sequence order into a partial
  buffer, which ``mixed_csr_reduce_kernel`` sums through the layer's CSR of P^T (no atomics).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .index_math import dropout_keep, kernel, lora_index, lora_scale, mma
from .lora_fwd import cfg


def rows_cfg(num_warps: int, rps=(16, 32, 64), det=None, num_stages=2, **blocks):
    """A config of the per-row schedule (BLOCK_M = 1, no dot, so no LOWP distinction)."""
    when = dict(ROWS=True, RP=tuple(rps))
    if det is not None:
        when["DET"] = det
    return when, triton.Config(dict(BLOCK_M=1, **blocks), num_warps=num_warps, num_stages=num_stages)


def seg_cfg(num_warps: int, num_stages: int, lowp: bool, rps=(16, 32, 64), det=None, **blocks):
    when, c = cfg(num_warps, num_stages, lowp, rps, **blocks)
    when["ROWS"] = False
    if det is not None:
        when["DET"] = det
    return when, c


# The first config that applies is the default (interpreter, deterministic mode). A ROWS tile
# holds an (R, C) fp32 product and two gather addresses per element, so its width shrinks as the
# rank grows, keeping registers for more programs in flight on these latency-bound gathers.
MIXED_SHRINK_CONFIGS = [
    rows_cfg(4, rps=(16, 32), BLOCK_K=64),
    rows_cfg(8, rps=(64,), BLOCK_K=32),
    rows_cfg(8, rps=(16, 32), BLOCK_K=128),
    seg_cfg(4, 3, True, rps=(16, 32), BLOCK_M=32, BLOCK_K=64),
    seg_cfg(4, 3, True, rps=(64,), BLOCK_M=32, BLOCK_K=32),
    seg_cfg(4, 3, True, rps=(16, 32), BLOCK_M=64, BLOCK_K=64),
    seg_cfg(4, 3, True, rps=(16, 32), BLOCK_M=16, BLOCK_K=64),
    seg_cfg(4, 3, False, rps=(16, 32), BLOCK_M=16, BLOCK_K=32),
    seg_cfg(4, 3, False, rps=(64,), BLOCK_M=16, BLOCK_K=16),
    seg_cfg(4, 3, False, rps=(16, 32), BLOCK_M=32, BLOCK_K=32),
]
MIXED_EXPAND_CONFIGS = [
    rows_cfg(4, rps=(16, 32), BLOCK_N=64),
    rows_cfg(4, rps=(64,), BLOCK_N=32),
    rows_cfg(8, rps=(16, 32), BLOCK_N=128),
    seg_cfg(4, 2, True, BLOCK_M=32, BLOCK_N=64),
    seg_cfg(4, 2, True, BLOCK_M=64, BLOCK_N=64),
    seg_cfg(4, 2, True, rps=(16, 32), BLOCK_M=16, BLOCK_N=128),
    seg_cfg(4, 2, False, BLOCK_M=16, BLOCK_N=64),
    seg_cfg(4, 2, False, BLOCK_M=32, BLOCK_N=64),
]
# Deterministic mode runs a nested loop over the adapter's sequences: smaller, unpipelined tiles first.
MIXED_DW_CONFIGS = [
    rows_cfg(4, det=True, num_stages=1, BLOCK_C=64),
    seg_cfg(8, 1, True, det=True, BLOCK_M=32, BLOCK_C=32),
    seg_cfg(4, 1, False, det=True, BLOCK_M=16, BLOCK_C=32),
    rows_cfg(4, rps=(16, 32), BLOCK_C=128),
    rows_cfg(4, rps=(64,), BLOCK_C=64),
    rows_cfg(8, rps=(16, 32), BLOCK_C=256),
    seg_cfg(4, 2, True, rps=(16, 32), BLOCK_M=32, BLOCK_C=64),
    seg_cfg(4, 2, True, rps=(64,), BLOCK_M=32, BLOCK_C=32),
    seg_cfg(8, 2, True, BLOCK_M=64, BLOCK_C=64),
    seg_cfg(4, 2, False, rps=(16, 32), BLOCK_M=16, BLOCK_C=64),
    seg_cfg(8, 2, False, rps=(64,), BLOCK_M=16, BLOCK_C=32),
    seg_cfg(4, 2, False, rps=(16, 32), BLOCK_M=32, BLOCK_C=32),
]


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
@triton.jit
def seq_tile(tile, L, BLOCK_M: tl.constexpr):
    """(sequence, row indices, row mask) of row tile ``tile``: tiles never cross a sequence."""
    per_seq = tl.cdiv(L, BLOCK_M)
    s = tile // per_seq
    local = (tile % per_seq) * BLOCK_M + tl.arange(0, BLOCK_M)
    return s, s * L + local, local < L


@triton.jit
def adapter_of(seq_ptr, s, n_adapters):
    """The adapter id of sequence s, and whether it runs one (0 <= id <= n_adapters)."""
    a = tl.load(seq_ptr + s)
    return a, (a >= 0) & (a <= n_adapters)


@triton.jit
def adapter_tile(rows, cols, stride_r, stride_c, R, C, a, live, theta_ptr, table_ptr, stride_tab, scale_ptr,
                 idx_ptr, perm_base, d, perm, HASHED: tl.constexpr, TRANS: tl.constexpr):
    """W_a[rows, cols] (fp32) of adapter ``a`` (theta for 0, table row a - 1); zero when not ``live``.
    Shape (rows, cols), or (cols, rows) when TRANS, as ``index_math.lora_tile``."""
    if TRANS:
        pos = rows[None, :] * stride_r + cols[:, None] * stride_c
        mask = (rows < R)[None, :] & (cols < C)[:, None]
    else:
        pos = rows[:, None] * stride_r + cols[None, :] * stride_c
        mask = (rows < R)[:, None] & (cols < C)[None, :]
    mask = mask & live
    j = lora_index(pos, mask, idx_ptr, perm_base, d, perm, HASHED)
    s = lora_scale(j, mask, scale_ptr, d, perm[0], HASHED)
    # Two predicated loads: theta and the table may differ in dtype; one of them is all off.
    t = tl.load(theta_ptr + j, mask=mask & (a == 0), other=0.0).to(tl.float32)
    row = table_ptr + (a - 1).to(tl.int64) * stride_tab
    t += tl.load(row + j, mask=mask & (a > 0), other=0.0).to(tl.float32)
    return tl.where(mask, t * s, 0.0)


@triton.jit
def mm(a, b, acc, DOT: tl.constexpr, LOWP: tl.constexpr, DT: tl.constexpr):
    """acc += a @ b: ``mma`` on tiles of 16+ rows, else an fp32 broadcast-and-sum (one-row tiles)."""
    if DOT:
        return mma(a, b, acc, LOWP, DT)
    else:
        return acc + tl.sum(a.to(tl.float32)[:, :, None] * b.to(tl.float32)[None, :, :], axis=1)


# --------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------
@kernel
def mixed_shrink_kernel(
    x_ptr, y_ptr, seq_ptr, theta_ptr, table_ptr, scale_ptr, idx_ptr,
    K, R, L, n_adapters, stride_xm, stride_tab, w_stride_r, w_stride_c,
    d, perm_D, perm_base, perm_half, perm_mask, perm_k0, perm_k1, perm_k2, perm_k3,
    seed_ptr, threshold, drop_scale, M_BUCKET,
    RP: tl.constexpr, HASHED: tl.constexpr, DROPOUT: tl.constexpr, LOWP: tl.constexpr, ROWS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """y (M, R) fp32 [+]= drop(x) W_a^T; grid (row tiles, split-K). Base rows get zeros."""
    pid_k = tl.program_id(1)
    split = tl.num_programs(1)
    DT: tl.constexpr = x_ptr.dtype.element_ty
    perm = (perm_D, perm_half, perm_mask, perm_k0, perm_k1, perm_k2, perm_k3)
    s, rm, m_mask = seq_tile(tl.program_id(0), L, BLOCK_M)
    a, live = adapter_of(seq_ptr, s, n_adapters)
    rr = tl.arange(0, RP)
    x_rows = x_ptr + rm.to(tl.int64)[:, None] * stride_xm
    k_per = tl.cdiv(tl.cdiv(K, BLOCK_K), split) * BLOCK_K
    k_lo = pid_k * k_per
    k_hi = tl.minimum(k_lo + k_per, K)

    acc = tl.zeros((BLOCK_M, RP), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        xv = tl.load(x_rows + rk[None, :], mask=(m_mask & live)[:, None] & (rk < K)[None, :], other=0.0)
        if DROPOUT:
            keep = dropout_keep(seed_ptr, rm, rk, K, threshold)
            xv = tl.where(keep, xv.to(tl.float32) * drop_scale, 0.0)
        wt = adapter_tile(rr, rk, w_stride_r, w_stride_c, R, K, a, live, theta_ptr, table_ptr, stride_tab,
                          scale_ptr, idx_ptr, perm_base, d, perm, HASHED, True)
        acc = mm(xv, wt, acc, not ROWS, LOWP, DT)

    y_ptrs = y_ptr + rm.to(tl.int64)[:, None] * R + rr[None, :]
    y_mask = m_mask[:, None] & (rr < R)[None, :]
    if split == 1:
        tl.store(y_ptrs, acc, mask=y_mask)
    else:  # y was zeroed by the caller
        tl.atomic_add(y_ptrs, acc, mask=y_mask, sem="relaxed")


@kernel
def mixed_expand_kernel(
    y_ptr, out_ptr, seq_ptr, theta_ptr, table_ptr, scale_ptr, idx_ptr,
    N, R, L, n_adapters, stride_om, stride_tab, w_stride_r, w_stride_c,
    d, perm_D, perm_base, perm_half, perm_mask, perm_k0, perm_k1, perm_k2, perm_k3,
    seed_ptr, threshold, drop_scale, M_BUCKET,
    RP: tl.constexpr, NC: tl.constexpr, HASHED: tl.constexpr, DROPOUT: tl.constexpr, LOWP: tl.constexpr,
    ROWS: tl.constexpr, ACCUM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """grid (row tiles, N tiles): ACCUM: out += y W_a on adapter rows; else out = (y W_a) * mask,
    every row written (grad_x). y (M, R) fp32; the rank is reduced in NC chunks (see lora_fwd)."""
    pid_n = tl.program_id(1)
    DT: tl.constexpr = out_ptr.dtype.element_ty
    RC: tl.constexpr = RP // NC
    perm = (perm_D, perm_half, perm_mask, perm_k0, perm_k1, perm_k2, perm_k3)
    s, rm, m_mask = seq_tile(tl.program_id(0), L, BLOCK_M)
    a, live = adapter_of(seq_ptr, s, n_adapters)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    delta = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for c in range(0, NC):  # a runtime loop: unrolled, the chunks' gathers would all be live at once
        rc = c * RC + tl.arange(0, RC)
        yv = tl.load(y_ptr + rm.to(tl.int64)[:, None] * R + rc[None, :],
                     mask=(m_mask & live)[:, None] & (rc < R)[None, :], other=0.0)
        wv = adapter_tile(rc, rn, w_stride_r, w_stride_c, R, N, a, live, theta_ptr, table_ptr, stride_tab,
                          scale_ptr, idx_ptr, perm_base, d, perm, HASHED, False)
        delta = mm(yv, wv, delta, not ROWS, LOWP, DT)
    if DROPOUT:
        keep = dropout_keep(seed_ptr, rm, rn, N, threshold)
        delta = tl.where(keep, delta * drop_scale, 0.0)
    o_ptrs = out_ptr + rm.to(tl.int64)[:, None] * stride_om + rn[None, :]
    if ACCUM:
        o_mask = (m_mask & live)[:, None] & (rn < N)[None, :]
        o = tl.load(o_ptrs, mask=o_mask, other=0.0)
        tl.store(o_ptrs, (o.to(tl.float32) + delta).to(DT), mask=o_mask)
    else:
        tl.store(o_ptrs, delta.to(DT), mask=m_mask[:, None] & (rn < N)[None, :])


@triton.jit
def seq_leader(seq_ptr, s, a, live, SCAN: tl.constexpr):
    """Whether live sequence s is the first one that reads adapter a (it then sums them all)."""
    dup = 0
    for s0 in range(0, s, SCAN):
        ids = tl.load(seq_ptr + s0 + tl.arange(0, SCAN), mask=s0 + tl.arange(0, SCAN) < s, other=-2)
        dup += tl.sum((ids == a).to(tl.int32))
    return live & (dup == 0)


@triton.jit
def dw_rows(acc, u_ptr, v_ptr, s, t_lo, t_hi, L, C, R, rc, rr, stride_vm, seed_ptr, threshold, drop_scale,
            DROPOUT: tl.constexpr, LOWP: tl.constexpr, ROWS: tl.constexpr, BLOCK_M: tl.constexpr):
    """acc (RP, BLOCK_C) += u^T v' over row tiles [t_lo, t_hi) of sequence s."""
    DT: tl.constexpr = v_ptr.dtype.element_ty
    for t in range(t_lo, t_hi):
        local = t * BLOCK_M + tl.arange(0, BLOCK_M)
        rm = s * L + local
        m_mask = local < L
        vv = tl.load(v_ptr + rm.to(tl.int64)[:, None] * stride_vm + rc[None, :],
                     mask=m_mask[:, None] & (rc < C)[None, :], other=0.0)
        if DROPOUT:
            keep = dropout_keep(seed_ptr, rm, rc, C, threshold)
            vv = tl.where(keep, vv.to(tl.float32) * drop_scale, 0.0)
        uv = tl.load(u_ptr + rm.to(tl.int64)[:, None] * R + rr[None, :], mask=m_mask[:, None] & (rr < R)[None, :],
                     other=0.0)
        acc = mm(tl.trans(uv), vv, acc, not ROWS, LOWP, DT)
    return acc


@kernel
def mixed_dw_kernel(
    u_ptr, v_ptr, gt_ptr, gtab_ptr, part_ptr, seq_ptr, scale_ptr, idx_ptr,
    C, R, L, S, n_adapters, splits, stride_vm, stride_gtab, w_stride_r, w_stride_c, n_layer, part_off,
    d, perm_D, perm_base, perm_half, perm_mask, perm_k0, perm_k1, perm_k2, perm_k3,
    seed_ptr, threshold, drop_scale, M_BUCKET,
    RP: tl.constexpr, HASHED: tl.constexpr, DROPOUT: tl.constexpr, LOWP: tl.constexpr, ROWS: tl.constexpr,
    DET: tl.constexpr, BY_ID: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """grid (S * splits, C tiles): dW_a[i, c] = sum over rows of u[m, i] v'[m, c], with u (M, R)
    fp32 and v' = v (M, C), dropped when DROPOUT.

    Atomic (not DET): program (s, split) sums its split of sequence s's rows and adds s_j dW into
    adapter a's gradient with fp32 atomics. DET (splits = 1): the first sequence of each adapter
    sums the rows of every sequence of that adapter, in sequence order, and stores the plain dW in
    row ``slot`` of ``part`` (slot = a when BY_ID, else s), at ``part_off`` + layer position, for
    ``mixed_csr_reduce_kernel``; no atomics, so the sums are bit-identical run to run.
    """
    pid_q = tl.program_id(0)  # sequences x splits can be many: axis 0 has the large limit
    pid_c = tl.program_id(1)
    s = pid_q // splits
    split = pid_q % splits
    a, live = adapter_of(seq_ptr, s, n_adapters)
    rc = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    rr = tl.arange(0, RP)
    per_seq = tl.cdiv(L, BLOCK_M)
    pos = rr[:, None] * w_stride_r + rc[None, :] * w_stride_c
    mask = (rr < R)[:, None] & (rc < C)[None, :]
    acc = tl.zeros((RP, BLOCK_C), dtype=tl.float32)
    if DET:
        leader = seq_leader(seq_ptr, s, a, live, 128)
        for s2 in range(s, S):
            n_t = tl.where(leader & (tl.load(seq_ptr + s2) == a), per_seq, 0)
            acc = dw_rows(acc, u_ptr, v_ptr, s2, 0, n_t, L, C, R, rc, rr, stride_vm, seed_ptr, threshold, drop_scale,
                          DROPOUT, LOWP, ROWS, BLOCK_M)
        slot = a if BY_ID else s
        tl.store(part_ptr + slot.to(tl.int64) * n_layer + part_off + pos, acc, mask=mask & leader)
    else:
        per = tl.cdiv(per_seq, splits)
        t_lo = split * per
        t_hi = tl.minimum(t_lo + per, per_seq)
        t_hi = tl.where(live, t_hi, t_lo)  # base sequence: nothing to reduce
        acc = dw_rows(acc, u_ptr, v_ptr, s, t_lo, t_hi, L, C, R, rc, rr, stride_vm, seed_ptr, threshold, drop_scale,
                      DROPOUT, LOWP, ROWS, BLOCK_M)
        perm = (perm_D, perm_half, perm_mask, perm_k0, perm_k1, perm_k2, perm_k3)
        mask = mask & live & (t_hi > t_lo)
        j = lora_index(pos, mask, idx_ptr, perm_base, d, perm, HASHED)
        vals = acc * lora_scale(j, mask, scale_ptr, d, perm_D, HASHED)
        tl.atomic_add(gt_ptr + j, vals, mask=mask & (a == 0), sem="relaxed")
        tl.atomic_add(gtab_ptr + (a - 1).to(tl.int64) * stride_gtab + j, vals, mask=mask & (a > 0), sem="relaxed")


@kernel
def mixed_csr_reduce_kernel(
    part_ptr, gt_ptr, gtab_ptr, seq_ptr, scale_ptr, rows_ptr, rowptr_ptr, cols_ptr,
    U, n_adapters, n_layer, stride_gtab, max_len, d, perm_D,
    HASHED: tl.constexpr, BY_ID: tl.constexpr, BLOCK: tl.constexpr,
):
    """grid (S, U blocks): for the first sequence s of each adapter a, grad[a][rows[u]] = s_j * the
    sum over CSR row u of part[slot] (``lora_bwd.csr_reduce_kernel``'s fixed order, per adapter)."""
    s = tl.program_id(0)
    a, live = adapter_of(seq_ptr, s, n_adapters)
    leader = seq_leader(seq_ptr, s, a, live, 128)
    slot = a if BY_ID else s
    part = part_ptr + slot.to(tl.int64) * n_layer
    u = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    u_mask = (u < U) & leader
    start = tl.load(rowptr_ptr + u, mask=u_mask, other=0)
    end = tl.load(rowptr_ptr + u + 1, mask=u_mask, other=0)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for t in range(0, tl.where(leader, max_len, 0)):
        valid = u_mask & (start + t < end)
        off = tl.load(cols_ptr + start + t, mask=valid, other=0)
        acc += tl.load(part + off, mask=valid, other=0.0)
    j = tl.load(rows_ptr + u, mask=u_mask, other=0)
    vals = acc * lora_scale(j, u_mask, scale_ptr, d, perm_D, HASHED)
    tl.store(gt_ptr + j, vals, mask=u_mask & (a == 0))
    tl.store(gtab_ptr + (a - 1).to(tl.int64) * stride_gtab + j, vals, mask=u_mask & (a > 0))
