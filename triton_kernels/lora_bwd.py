"""Backward kernels. With ``gB = g B`` (M x r, fp32, from ``lora_fwd.shrink_kernel``):

* ``bwd_x_kernel``: program (k block, M split) gathers its A tile once, then walks its rows:
  ``grad_x += (gB A) * mask * scale`` and ``dA += gB^T drop(x)``, so x is read once, the
  dropout bits are drawn once for both, and grad_x is updated in place.
* ``bwd_db_kernel``: program (n block, M split) reduces ``dB = g^T h`` over its rows.

Both end by sending their fp32 partial dA / dB into theta_d's gradient:
``grad_theta[j] += s_j * partial`` with fp32 atomics, or, in deterministic mode, by storing it
in row ``split`` of a (splits, layer size) buffer that ``csr_reduce_kernel`` then sums in a
fixed order through the layer's CSR of P^T (one program lane per distinct theta_d index, no
atomics): two runs give bit-identical gradients.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .index_math import dropout_keep, kernel, lora_scale, lora_tile, mma, scatter_grad, split_tiles
from .lora_fwd import cfg

BWD_X_CONFIGS = [
    cfg(8, 2, True, rps=(16, 32), BLOCK_M=64, BLOCK_K=64),
    cfg(8, 2, True, rps=(64,), BLOCK_M=64, BLOCK_K=32),
    cfg(4, 2, True, rps=(16, 32), BLOCK_M=32, BLOCK_K=64),
    cfg(4, 2, True, BLOCK_M=64, BLOCK_K=32),
    cfg(4, 2, False, BLOCK_M=16, BLOCK_K=32),
    cfg(4, 2, False, rps=(16, 32), BLOCK_M=32, BLOCK_K=32),
]
BWD_DB_CONFIGS = [
    cfg(4, 2, True, BLOCK_M=64, BLOCK_N=64),
    cfg(8, 2, True, BLOCK_M=128, BLOCK_N=64),
    cfg(8, 2, True, BLOCK_M=64, BLOCK_N=128),
    cfg(4, 2, False, BLOCK_M=16, BLOCK_N=64),
    cfg(4, 2, False, BLOCK_M=32, BLOCK_N=64),
]
CSR_BLOCK = 128


@triton.jit
def _dA_out(gt_ptr, part_ptr, dA, rc, rk, K, R, pid_s, n_layer, scale_ptr, idx_ptr, perm_base, d, perm,
            HASHED: tl.constexpr, DET: tl.constexpr):
    pos = rc[:, None] * K + rk[None, :]
    mask = (rc < R)[:, None] & (rk < K)[None, :]
    if DET:
        tl.store(part_ptr + pid_s.to(tl.int64) * n_layer + pos, dA, mask=mask)
    else:
        scatter_grad(gt_ptr, dA, pos, mask, scale_ptr, idx_ptr, perm_base, d, perm, HASHED)


@triton.jit
def _gb_chunk(gb_ptr, rm, rc, M, R):
    return tl.load(gb_ptr + rm[:, None] * R + rc[None, :], mask=(rm < M)[:, None] & (rc < R)[None, :], other=0.0)


@kernel
def bwd_x_kernel(
    gb_ptr, x_ptr, gx_ptr, gt_ptr, part_ptr, theta_ptr, scale_ptr, idx_ptr,
    M, K, R, stride_xm, stride_gxm, n_layer,
    d, perm_D, perm_base, perm_half, perm_mask, perm_k0, perm_k1, perm_k2, perm_k3,
    seed_ptr, threshold, drop_scale, M_BUCKET,
    RP: tl.constexpr, NC: tl.constexpr, HASHED: tl.constexpr, DROPOUT: tl.constexpr, LOWP: tl.constexpr,
    NEED_X: tl.constexpr, NEED_THETA: tl.constexpr, ACCUM: tl.constexpr, DET: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """grid (K tiles, M splits). gb (M, R) fp32; A[i, k] sits at i * K + k.

    The rank is cut into NC chunks of RC (see lora_fwd): A chunks a0..a3 are gathered once and
    kept (in the dot dtype) for the whole row walk; dA0..dA3 accumulate the matching chunks.
    """
    pid_k = tl.program_id(0)
    pid_s = tl.program_id(1)
    splits = tl.num_programs(1)
    DT: tl.constexpr = x_ptr.dtype.element_ty
    AT: tl.constexpr = DT if LOWP else tl.float32
    RC: tl.constexpr = RP // NC
    perm = (perm_D, perm_half, perm_mask, perm_k0, perm_k1, perm_k2, perm_k3)
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    k_mask = rk < K
    rc = tl.arange(0, RC)
    a0 = tl.zeros((RC, BLOCK_K), dtype=AT)
    a1 = a0
    a2 = a0
    a3 = a0
    if NEED_X:
        a0 = lora_tile(rc, rk, K, 1, R, K, theta_ptr, scale_ptr, idx_ptr, perm_base, d, perm, HASHED, False).to(AT)
        if NC > 1:
            a1 = lora_tile(RC + rc, rk, K, 1, R, K, theta_ptr, scale_ptr, idx_ptr, perm_base, d, perm,
                           HASHED, False).to(AT)
        if NC > 2:
            a2 = lora_tile(2 * RC + rc, rk, K, 1, R, K, theta_ptr, scale_ptr, idx_ptr, perm_base, d, perm,
                           HASHED, False).to(AT)
            a3 = lora_tile(3 * RC + rc, rk, K, 1, R, K, theta_ptr, scale_ptr, idx_ptr, perm_base, d, perm,
                           HASHED, False).to(AT)
    dA0 = tl.zeros((RC, BLOCK_K), dtype=tl.float32)
    dA1 = dA0
    dA2 = dA0
    dA3 = dA0

    t_lo, t_hi = split_tiles(tl.cdiv(M, BLOCK_M), pid_s, splits)
    for t in range(t_lo, t_hi):
        rm = t * BLOCK_M + tl.arange(0, BLOCK_M)
        mk_mask = (rm < M)[:, None] & k_mask[None, :]
        if DROPOUT:
            keep = dropout_keep(seed_ptr, rm, rk, K, threshold)
        if NEED_THETA:
            xv = tl.load(x_ptr + rm.to(tl.int64)[:, None] * stride_xm + rk[None, :], mask=mk_mask, other=0.0)
            if DROPOUT:
                xv = tl.where(keep, xv.to(tl.float32) * drop_scale, 0.0)
        gx = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        gb = _gb_chunk(gb_ptr, rm, rc, M, R)
        if NEED_X:
            gx = mma(gb, a0, gx, LOWP, DT)
        if NEED_THETA:
            dA0 = mma(tl.trans(gb), xv, dA0, LOWP, DT)
        if NC > 1:
            gb = _gb_chunk(gb_ptr, rm, RC + rc, M, R)
            if NEED_X:
                gx = mma(gb, a1, gx, LOWP, DT)
            if NEED_THETA:
                dA1 = mma(tl.trans(gb), xv, dA1, LOWP, DT)
        if NC > 2:
            gb = _gb_chunk(gb_ptr, rm, 2 * RC + rc, M, R)
            if NEED_X:
                gx = mma(gb, a2, gx, LOWP, DT)
            if NEED_THETA:
                dA2 = mma(tl.trans(gb), xv, dA2, LOWP, DT)
            gb = _gb_chunk(gb_ptr, rm, 3 * RC + rc, M, R)
            if NEED_X:
                gx = mma(gb, a3, gx, LOWP, DT)
            if NEED_THETA:
                dA3 = mma(tl.trans(gb), xv, dA3, LOWP, DT)
        if NEED_X:
            if DROPOUT:
                gx = tl.where(keep, gx * drop_scale, 0.0)
            gx_ptrs = gx_ptr + rm.to(tl.int64)[:, None] * stride_gxm + rk[None, :]
            if ACCUM:
                gx += tl.load(gx_ptrs, mask=mk_mask, other=0.0).to(tl.float32)
            tl.store(gx_ptrs, gx.to(gx_ptr.dtype.element_ty), mask=mk_mask)

    if NEED_THETA:
        _dA_out(gt_ptr, part_ptr, dA0, rc, rk, K, R, pid_s, n_layer, scale_ptr, idx_ptr, perm_base, d, perm,
                HASHED, DET)
        if NC > 1:
            _dA_out(gt_ptr, part_ptr, dA1, RC + rc, rk, K, R, pid_s, n_layer, scale_ptr, idx_ptr, perm_base, d, perm,
                    HASHED, DET)
        if NC > 2:
            _dA_out(gt_ptr, part_ptr, dA2, 2 * RC + rc, rk, K, R, pid_s, n_layer, scale_ptr, idx_ptr, perm_base, d,
                    perm, HASHED, DET)
            _dA_out(gt_ptr, part_ptr, dA3, 3 * RC + rc, rk, K, R, pid_s, n_layer, scale_ptr, idx_ptr, perm_base, d,
                    perm, HASHED, DET)


@kernel
def bwd_db_kernel(
    g_ptr, h_ptr, gt_ptr, part_ptr, scale_ptr, idx_ptr,
    M, N, R, stride_gm, stride_gn, n_a, n_layer,
    d, perm_D, perm_base, perm_half, perm_mask, perm_k0, perm_k1, perm_k2, perm_k3, M_BUCKET,
    RP: tl.constexpr, HASHED: tl.constexpr, LOWP: tl.constexpr, DET: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """grid (N tiles, M splits): dB (N, R) = g^T h over the split's rows. B[n, i] sits at n * R + i.
    g may have any strides (``stride_gn`` 1 is folded into the code by Triton)."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    splits = tl.num_programs(1)
    DT: tl.constexpr = g_ptr.dtype.element_ty
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = rn < N
    rr = tl.arange(0, RP)
    r_mask = rr < R
    acc = tl.zeros((BLOCK_N, RP), dtype=tl.float32)

    t_lo, t_hi = split_tiles(tl.cdiv(M, BLOCK_M), pid_s, splits)
    for t in range(t_lo, t_hi):
        rm = t * BLOCK_M + tl.arange(0, BLOCK_M)
        m_mask = rm < M
        gv = tl.load(g_ptr + rm.to(tl.int64)[:, None] * stride_gm + rn[None, :] * stride_gn,
                     mask=m_mask[:, None] & n_mask[None, :], other=0.0)
        hv = tl.load(h_ptr + rm[:, None] * R + rr[None, :], mask=m_mask[:, None] & r_mask[None, :], other=0.0)
        acc = mma(tl.trans(gv), hv, acc, LOWP, DT)

    b_pos = rn[:, None] * R + rr[None, :]
    b_mask = n_mask[:, None] & r_mask[None, :]
    if DET:
        tl.store(part_ptr + pid_s.to(tl.int64) * n_layer + n_a + b_pos, acc, mask=b_mask)
    else:
        perm = (perm_D, perm_half, perm_mask, perm_k0, perm_k1, perm_k2, perm_k3)
        scatter_grad(gt_ptr, acc, b_pos, b_mask, scale_ptr, idx_ptr, perm_base, d, perm, HASHED)


@kernel
def csr_reduce_kernel(
    part_ptr, gt_ptr, scale_ptr, rows_ptr, rowptr_ptr, cols_ptr,
    U, splits, n_layer, max_len, d, perm_D,
    HASHED: tl.constexpr, BLOCK: tl.constexpr,
):
    """grad_theta[rows[u]] = s * sum over the CSR row u of sum over splits of part[split, col].

    Rows are the distinct theta_d indices of the layer, so each is written by one lane; the
    columns of a row are in increasing layer position, and every sum runs in a fixed order.
    """
    u = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    u_mask = u < U
    start = tl.load(rowptr_ptr + u, mask=u_mask, other=0)
    end = tl.load(rowptr_ptr + u + 1, mask=u_mask, other=0)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for t in range(0, max_len):
        valid = u_mask & (start + t < end)
        off = tl.load(cols_ptr + start + t, mask=valid, other=0).to(tl.int64)
        v = tl.zeros((BLOCK,), dtype=tl.float32)
        for _ in range(0, splits):
            v += tl.load(part_ptr + off, mask=valid, other=0.0)
            off += n_layer
        acc += v
    j = tl.load(rows_ptr + u, mask=u_mask, other=0)
    s = lora_scale(j, u_mask, scale_ptr, d, perm_D, HASHED)
    tl.store(gt_ptr + j, acc * s, mask=u_mask)
