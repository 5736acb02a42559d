"""Forward kernels: ``h = drop(x) A^T`` and ``out += h B^T`` with A and B gathered in the tiles.

Two schedules (the backend picks one from M):

* ``fused_fwd_kernel`` (decode, small M): one launch. Program (m, n) computes the whole
  ``h`` of its BLOCK_M rows (K loop, A gathered tile by tile) and adds ``h B^T`` into its
  BLOCK_N output columns. ``h`` is recomputed by every column block; for decode batches
  (M <= policy.DECODE_MAX_M) that costs less than a second launch. Programs of column block 0
  also store ``h`` for backward.
* ``shrink_kernel`` + ``expand_kernel`` (prefill / training): ``shrink`` computes
  ``y = drop(x) W^T`` (W gathered, r x K) with split-K over ``tl.num_programs(1)`` (fp32
  atomics when split, plain stores otherwise); ``expand`` adds ``h W`` (W gathered, r x N)
  into the output. The same ``shrink`` computes ``g B`` in backward (W = B^T).

A gathered operand W is addressed by layer position ``i * w_stride_r + col * w_stride_c``
(i < r): A (r x in) has strides (in, 1); B (out x r), read as B^T, has strides (1, r).
``r`` is padded to RP (a power of two >= 16, the ``tl.dot`` minimum) with masked lanes.

Exact fp32 (``input_precision="ieee"``) dots run on FMA units, and Triton's FMA lowering keeps
a thread's whole reduction extent of both operands in registers. So every fp32 dot reduces over
at most 32: the K/M tiles of fp32 configs are 16-32 wide, and a reduction over the rank is cut
into NC chunks of RC = RP / NC = 16 (NC = 1 for fp16/bf16 tensor-core dots).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .index_math import add_into, dropout_keep, kernel, lora_tile, mma


def cfg(num_warps: int, num_stages: int, lowp: bool, rps=(16, 32, 64), **blocks):
    """An autotune config and when it applies: dot kind (LOWP) and padded ranks."""
    return dict(LOWP=lowp, RP=tuple(rps)), triton.Config(blocks, num_warps=num_warps, num_stages=num_stages)


# Autotune spaces; the first config that applies is the default (interpreter, deterministic
# mode). compile_check compiles every one of them and checks the defaults do not spill.
FUSED_CONFIGS = [
    cfg(4, 2, True, BLOCK_N=64, BLOCK_K=64),
    cfg(4, 2, True, BLOCK_N=128, BLOCK_K=64),
    cfg(8, 2, True, BLOCK_N=256, BLOCK_K=64),
    cfg(4, 2, False, BLOCK_N=32, BLOCK_K=16),
    cfg(8, 2, False, BLOCK_N=64, BLOCK_K=32),
]
SHRINK_CONFIGS = [
    cfg(4, 3, True, rps=(16, 32), BLOCK_M=64, BLOCK_K=64),
    cfg(4, 3, True, rps=(64,), BLOCK_M=64, BLOCK_K=32),
    cfg(8, 3, True, BLOCK_M=128, BLOCK_K=64),
    cfg(4, 3, True, BLOCK_M=32, BLOCK_K=64),
    cfg(4, 3, False, BLOCK_M=32, BLOCK_K=32),
    cfg(4, 3, False, BLOCK_M=64, BLOCK_K=16),
]
EXPAND_CONFIGS = [
    cfg(4, 2, True, BLOCK_M=64, BLOCK_N=64),
    cfg(4, 2, True, rps=(16, 32), BLOCK_M=64, BLOCK_N=128),
    cfg(8, 2, True, rps=(64,), BLOCK_M=64, BLOCK_N=128),
    cfg(8, 2, True, BLOCK_M=128, BLOCK_N=128),
    cfg(4, 2, False, BLOCK_M=32, BLOCK_N=64),
    cfg(8, 2, False, BLOCK_M=64, BLOCK_N=64),
]


@triton.jit
def _store_h(h_ptr, h, rm, cols, M, R):
    tl.store(h_ptr + rm[:, None] * R + cols[None, :], h, mask=(rm < M)[:, None] & (cols < R)[None, :])


@kernel
def fused_fwd_kernel(
    x_ptr, out_ptr, h_ptr, theta_ptr, scale_ptr, idx_a_ptr, idx_b_ptr,
    M, K, N, R, stride_xm, stride_om,
    d, perm_D, perm_base_a, perm_base_b, perm_half, perm_mask, perm_k0, perm_k1, perm_k2, perm_k3,
    seed_ptr, threshold, drop_scale, M_BUCKET,
    RP: tl.constexpr, NC: tl.constexpr, HASHED: tl.constexpr, DROPOUT: tl.constexpr, LOWP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    DT: tl.constexpr = x_ptr.dtype.element_ty
    RC: tl.constexpr = RP // NC
    perm = (perm_D, perm_half, perm_mask, perm_k0, perm_k1, perm_k2, perm_k3)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = rm < M
    rc = tl.arange(0, RC)
    x_rows = x_ptr + rm.to(tl.int64)[:, None] * stride_xm

    # h in NC rank chunks (one accumulator each) so the second dot reduces over RC only.
    # A^T chunk (BLOCK_K, RC): A[i, k] sits at i * K + k.
    h0 = tl.zeros((BLOCK_M, RC), dtype=tl.float32)
    h1 = h0
    h2 = h0
    h3 = h0
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        xv = tl.load(x_rows + rk[None, :], mask=m_mask[:, None] & (rk < K)[None, :], other=0.0)
        if DROPOUT:
            keep = dropout_keep(seed_ptr, rm, rk, K, threshold)
            xv = tl.where(keep, xv.to(tl.float32) * drop_scale, 0.0)
        h0 = mma(xv, lora_tile(rc, rk, K, 1, R, K, theta_ptr, scale_ptr, idx_a_ptr, perm_base_a, d, perm,
                               HASHED, True), h0, LOWP, DT)
        if NC > 1:
            h1 = mma(xv, lora_tile(RC + rc, rk, K, 1, R, K, theta_ptr, scale_ptr, idx_a_ptr, perm_base_a, d, perm,
                                   HASHED, True), h1, LOWP, DT)
        if NC > 2:
            h2 = mma(xv, lora_tile(2 * RC + rc, rk, K, 1, R, K, theta_ptr, scale_ptr, idx_a_ptr, perm_base_a, d, perm,
                                   HASHED, True), h2, LOWP, DT)
            h3 = mma(xv, lora_tile(3 * RC + rc, rk, K, 1, R, K, theta_ptr, scale_ptr, idx_a_ptr, perm_base_a, d, perm,
                                   HASHED, True), h3, LOWP, DT)

    if pid_n == 0:
        _store_h(h_ptr, h0, rm, rc, M, R)
        if NC > 1:
            _store_h(h_ptr, h1, rm, RC + rc, M, R)
        if NC > 2:
            _store_h(h_ptr, h2, rm, 2 * RC + rc, M, R)
            _store_h(h_ptr, h3, rm, 3 * RC + rc, M, R)

    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # B^T chunk (RC, BLOCK_N): B[n, i] sits at n * R + i.
    delta = mma(h0, lora_tile(rc, rn, 1, R, R, N, theta_ptr, scale_ptr, idx_b_ptr, perm_base_b, d, perm,
                              HASHED, False), tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), LOWP, DT)
    if NC > 1:
        delta = mma(h1, lora_tile(RC + rc, rn, 1, R, R, N, theta_ptr, scale_ptr, idx_b_ptr, perm_base_b, d, perm,
                                  HASHED, False), delta, LOWP, DT)
    if NC > 2:
        delta = mma(h2, lora_tile(2 * RC + rc, rn, 1, R, R, N, theta_ptr, scale_ptr, idx_b_ptr, perm_base_b, d, perm,
                                  HASHED, False), delta, LOWP, DT)
        delta = mma(h3, lora_tile(3 * RC + rc, rn, 1, R, R, N, theta_ptr, scale_ptr, idx_b_ptr, perm_base_b, d, perm,
                                  HASHED, False), delta, LOWP, DT)
    add_into(out_ptr, delta, rm, rn, M, N, stride_om)


@kernel
def shrink_kernel(
    x_ptr, y_ptr, theta_ptr, scale_ptr, idx_ptr,
    M, K, R, stride_xm, stride_xk, w_stride_r, w_stride_c,
    d, perm_D, perm_base, perm_half, perm_mask, perm_k0, perm_k1, perm_k2, perm_k3,
    seed_ptr, threshold, drop_scale, M_BUCKET,
    RP: tl.constexpr, HASHED: tl.constexpr, DROPOUT: tl.constexpr, LOWP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """y (M, R) fp32 [+]= drop(x) W^T; grid (M tiles, split-K). ``stride_xk``: x's column stride
    (1 for activations, which Triton folds into the code; any for a grad_out such as sum()'s expanded one)."""
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    split = tl.num_programs(1)
    DT: tl.constexpr = x_ptr.dtype.element_ty
    perm = (perm_D, perm_half, perm_mask, perm_k0, perm_k1, perm_k2, perm_k3)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = rm < M
    rr = tl.arange(0, RP)
    x_rows = x_ptr + rm.to(tl.int64)[:, None] * stride_xm
    k_per = tl.cdiv(tl.cdiv(K, BLOCK_K), split) * BLOCK_K
    k_lo = pid_k * k_per
    k_hi = tl.minimum(k_lo + k_per, K)

    acc = tl.zeros((BLOCK_M, RP), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        xv = tl.load(x_rows + rk[None, :] * stride_xk, mask=m_mask[:, None] & (rk < K)[None, :], other=0.0)
        if DROPOUT:
            keep = dropout_keep(seed_ptr, rm, rk, K, threshold)
            xv = tl.where(keep, xv.to(tl.float32) * drop_scale, 0.0)
        wt = lora_tile(rr, rk, w_stride_r, w_stride_c, R, K, theta_ptr, scale_ptr, idx_ptr, perm_base, d, perm,
                       HASHED, True)
        acc = mma(xv, wt, acc, LOWP, DT)

    y_ptrs = y_ptr + rm[:, None] * R + rr[None, :]
    y_mask = m_mask[:, None] & (rr < R)[None, :]
    if split == 1:
        tl.store(y_ptrs, acc, mask=y_mask)
    else:  # y was zeroed by the caller
        tl.atomic_add(y_ptrs, acc, mask=y_mask, sem="relaxed")


@kernel
def expand_kernel(
    h_ptr, out_ptr, theta_ptr, scale_ptr, idx_ptr,
    M, N, R, stride_om, w_stride_r, w_stride_c,
    d, perm_D, perm_base, perm_half, perm_mask, perm_k0, perm_k1, perm_k2, perm_k3, M_BUCKET,
    RP: tl.constexpr, NC: tl.constexpr, HASHED: tl.constexpr, LOWP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """out (M, N) += h W, h (M, R) fp32, W (R, N) gathered; grid (M tiles, N tiles)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    DT: tl.constexpr = out_ptr.dtype.element_ty
    RC: tl.constexpr = RP // NC
    perm = (perm_D, perm_half, perm_mask, perm_k0, perm_k1, perm_k2, perm_k3)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = rm < M
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    delta = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for c in range(0, NC):  # a runtime loop: unrolled, the chunks' gathers would all be live at once
        rc = c * RC + tl.arange(0, RC)
        hv = tl.load(h_ptr + rm[:, None] * R + rc[None, :], mask=m_mask[:, None] & (rc < R)[None, :], other=0.0)
        wv = lora_tile(rc, rn, w_stride_r, w_stride_c, R, N, theta_ptr, scale_ptr, idx_ptr, perm_base, d, perm,
                       HASHED, False)
        delta = mma(hv, wv, delta, LOWP, DT)
    add_into(out_ptr, delta, rm, rn, M, N, stride_om)
