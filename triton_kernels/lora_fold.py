"""The large-M schedule's kernels (``policy.fold_min_m`` picks it; backends/cost_model.py says why).

* ``fold_kernel``: ``W' = W + B A`` into a workspace with W's strides (nn.Linear's (out, in) or
  Conv1D's (in, out)), A and B gathered in the tiles, products and sum in fp32, rounded once to
  W's dtype, the rounding a merged adapter has. Forward then runs one GEMM on W', backward
  ``grad_x = g W'``.
* ``bwd_g_kernel``: one pass over g for both ``gB = g B`` (M x r, fp32 atomics into a zeroed
  buffer: every column block adds its part) and ``dB = g^T h`` (scattered into theta_d's gradient
  as ``lora_bwd.bwd_db_kernel`` does). ``dA`` then comes from ``bwd_x_kernel`` with NEED_X off.

fp32 dots (FMA) reduce over at most 32 (see lora_fwd): the fold reduces over rank chunks of 16,
fp32 configs of ``bwd_g_kernel`` use 32-wide M and N tiles.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .index_math import kernel, lora_tile, mma, scatter_grad, split_tiles
from .lora_fwd import cfg

# The fold always runs exact fp32 products (LOWP False) whatever W's dtype.
FOLD_CONFIGS = [
    cfg(4, 2, False, BLOCK_N=64, BLOCK_K=64),
    cfg(8, 2, False, BLOCK_N=64, BLOCK_K=128),
    cfg(4, 2, False, BLOCK_N=32, BLOCK_K=128),
]
BWD_G_CONFIGS = [  # r = 64 keeps a (BN, 64) B tile and two (BM, 64) fp32 tiles live: eight warps
    cfg(4, 2, True, rps=(16, 32), BLOCK_M=64, BLOCK_N=64),
    cfg(8, 2, True, rps=(64,), BLOCK_M=64, BLOCK_N=64),
    cfg(8, 2, True, rps=(16, 32), BLOCK_M=64, BLOCK_N=128),
    cfg(8, 2, True, BLOCK_M=128, BLOCK_N=64),
    cfg(4, 2, False, BLOCK_M=32, BLOCK_N=32),
    cfg(4, 2, False, BLOCK_M=16, BLOCK_N=32),
]


@kernel
def fold_kernel(
    w_ptr, out_ptr, theta_ptr, scale_ptr, idx_a_ptr, idx_b_ptr,
    N, K, R, stride_wn, stride_wk,
    d, perm_D, perm_base_a, perm_base_b, perm_half, perm_mask, perm_k0, perm_k1, perm_k2, perm_k3,
    RP: tl.constexpr, NC: tl.constexpr, HASHED: tl.constexpr, LOWP: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """grid (N tiles, K tiles): out[n, k] = w[n, k] + sum_i B[n, i] A[i, k], both at
    ``n * stride_wn + k * stride_wk``. A[i, k] sits at i * K + k, B[n, i] at n * R + i."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    RC: tl.constexpr = RP // NC
    perm = (perm_D, perm_half, perm_mask, perm_k0, perm_k1, perm_k2, perm_k3)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for c in range(0, NC):  # runtime loop: one chunk's gathers live at a time
        rc = c * RC + tl.arange(0, RC)
        b = lora_tile(rc, rn, 1, R, R, N, theta_ptr, scale_ptr, idx_b_ptr, perm_base_b, d, perm, HASHED, True)
        a = lora_tile(rc, rk, K, 1, R, K, theta_ptr, scale_ptr, idx_a_ptr, perm_base_a, d, perm, HASHED, False)
        acc = mma(b, a, acc, False, tl.float32)
    offs = rn.to(tl.int64)[:, None] * stride_wn + rk.to(tl.int64)[None, :] * stride_wk
    mask = (rn < N)[:, None] & (rk < K)[None, :]
    w = tl.load(w_ptr + offs, mask=mask, other=0.0)
    tl.store(out_ptr + offs, (w.to(tl.float32) + acc).to(out_ptr.dtype.element_ty), mask=mask)


@kernel
def bwd_g_kernel(
    g_ptr, h_ptr, gb_ptr, gt_ptr, theta_ptr, scale_ptr, idx_ptr,
    M, N, R, stride_gm, stride_gn,
    d, perm_D, perm_base, perm_half, perm_mask, perm_k0, perm_k1, perm_k2, perm_k3, M_BUCKET,
    RP: tl.constexpr, HASHED: tl.constexpr, LOWP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """grid (N tiles, M splits): gb (M, R) fp32 += g[:, tile] B[tile] (atomics; gb zeroed by the
    caller) and dB[tile] = g[rows, tile]^T h[rows] scattered into gt. B[n, i] sits at n * R + i."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    splits = tl.num_programs(1)
    DT: tl.constexpr = g_ptr.dtype.element_ty
    perm = (perm_D, perm_half, perm_mask, perm_k0, perm_k1, perm_k2, perm_k3)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = rn < N
    rr = tl.arange(0, RP)
    r_mask = rr < R
    b = lora_tile(rr, rn, 1, R, R, N, theta_ptr, scale_ptr, idx_ptr, perm_base, d, perm, HASHED, True)  # (BN, RP)
    acc = tl.zeros((BLOCK_N, RP), dtype=tl.float32)

    t_lo, t_hi = split_tiles(tl.cdiv(M, BLOCK_M), pid_s, splits)
    for t in range(t_lo, t_hi):
        rm = t * BLOCK_M + tl.arange(0, BLOCK_M)
        m_mask = rm < M
        mr_mask = m_mask[:, None] & r_mask[None, :]
        gv = tl.load(g_ptr + rm.to(tl.int64)[:, None] * stride_gm + rn[None, :] * stride_gn,
                     mask=m_mask[:, None] & n_mask[None, :], other=0.0)
        hv = tl.load(h_ptr + rm[:, None] * R + rr[None, :], mask=mr_mask, other=0.0)
        acc = mma(tl.trans(gv), hv, acc, LOWP, DT)
        part = mma(gv, b, tl.zeros((BLOCK_M, RP), dtype=tl.float32), LOWP, DT)
        tl.atomic_add(gb_ptr + rm[:, None] * R + rr[None, :], part, mask=mr_mask, sem="relaxed")

    b_pos = rn[:, None] * R + rr[None, :]
    scatter_grad(gt_ptr, acc, b_pos, n_mask[:, None] & r_mask[None, :], scale_ptr, idx_ptr, perm_base, d, perm,
                 HASHED)
