"""Device helpers shared by the Uni-LoRA Triton kernels: the projection, dropout, tiles.

* ``hashed_index`` is the keyed Feistel bijection of ``projection.py`` (same constants, same
  rounds, same cycle-walking), computed in uint32 so it wraps exactly as the reference's
  ``& 0xFFFFFFFF`` does: the two agree bit for bit.
* ``lora_index`` / ``lora_scale`` / ``lora_values`` read elements of a layer's A or B straight
  from theta_d: ``theta_d[j] * s_j`` with ``j`` the int32 index (uniform projection) or the
  hash of the global position (hashed projection). Nothing of size A, B or D is ever built.
* ``dropout_keep`` is ``philox.dropout_keep``: ``fold31(tl.randint(seed, m * in + k)) >= threshold``,
  with the int64 seed loaded from ``seed_ptr`` on the device (no host read, so a CUDA-graph
  replay draws the seed its capture's ``torch.randint`` wrote).
* ``split_tiles`` / ``add_into``: the row split of the backward reductions and the in-place
  ``out += delta`` that ends both forward schedules.

The round keys arrive as int32 bit patterns (see ``round_keys_i32``) so that a key with the top
bit set does not turn the argument into an int64 and recompile the kernel.
"""

from __future__ import annotations

import inspect

import triton
import triton.language as tl

from .. import projection as _P

_MUL1 = tl.constexpr(_P.FEISTEL_MUL1)
_MUL2 = tl.constexpr(_P.FEISTEL_MUL2)
_ROUNDS = tl.constexpr(_P.FEISTEL_ROUNDS)
if _P.FEISTEL_ROUNDS != 4:  # the helper below unrolls exactly four rounds
    raise ImportError("triton_kernels.index_math unrolls 4 Feistel rounds; projection.py changed them")


# The hashed projection's kernel scalars (``perm_*``: the Feistel permutation of [0, D)); a
# kernel packs them into one tuple ``perm`` for the helpers below. None for a uniform projection.
PERM_SCALARS = ("perm_D", "perm_half", "perm_mask", "perm_k0", "perm_k1", "perm_k2", "perm_k3")

# Scalars a kernel must never specialise on: a value of 1 would turn them into constexprs (the
# helpers call ``.to`` on them). ``perm_base*`` is the global
# position in [0, D) of an operand's element 0 (A or B).
NOSPEC = ("d", "perm_base", "perm_base_a", "perm_base_b") + PERM_SCALARS + ("threshold", "M_BUCKET")


def kernel(fn):
    """``triton.jit`` with ``do_not_specialize`` set to the NOSPEC parameters ``fn`` has."""
    params = inspect.signature(fn).parameters
    return triton.jit(fn, do_not_specialize=[n for n in NOSPEC if n in params])


def round_keys_i32(key: int) -> list[int]:
    """The four 32-bit Feistel round keys as signed int32 values (bitcast back in the kernel)."""
    return [k - (1 << 32) if k >= (1 << 31) else k for k in _P.feistel_round_keys(key)]


def hashed_args(hash_params: tuple, d: int) -> dict:
    """The PERM_SCALARS of a hashed projection ``(D, offset, key)``: D, half width, mask, round keys."""
    D, _offset, key = hash_params
    half = _P.feistel_half_bits(D)
    return dict(zip(PERM_SCALARS, (D, half, (1 << half) - 1, *round_keys_i32(key))))


# --------------------------------------------------------------------------------------------
# hashed projection
# --------------------------------------------------------------------------------------------
@triton.jit
def _round(x, k, half_mask):
    x = x ^ k
    x = x * _MUL1
    x = x ^ (x >> 16)
    x = x * _MUL2
    x = x ^ (x >> 13)
    return x & half_mask


@triton.jit
def _permute(v, half_bits, half_mask, k0, k1, k2, k3):
    left = v >> half_bits
    right = v & half_mask
    left, right = right, left ^ _round(right, k0, half_mask)
    left, right = right, left ^ _round(right, k1, half_mask)
    left, right = right, left ^ _round(right, k2, half_mask)
    left, right = right, left ^ _round(right, k3, half_mask)
    return (left << half_bits) | right


@triton.jit
def hashed_index(pos, d, perm):
    """``pi_key(pos) mod d`` for int32 positions in [0, D) (any shape); int32 result.

    ``perm`` is the tuple of PERM_SCALARS (D, half width, half mask, four int32 round keys).
    """
    k0 = perm[3].to(tl.uint32, bitcast=True)
    k1 = perm[4].to(tl.uint32, bitcast=True)
    k2 = perm[5].to(tl.uint32, bitcast=True)
    k3 = perm[6].to(tl.uint32, bitcast=True)
    half = perm[1].to(tl.uint32)
    mask = perm[2].to(tl.uint32)
    Du = perm[0].to(tl.uint32)
    v = _permute(pos.to(tl.uint32), half, mask, k0, k1, k2, k3)
    outside = v >= Du
    # Cycle-walking: re-permute the lanes that left [0, D) until none does (the reference's
    # `while outside.any()`); a lane that is already inside never moves again.
    while tl.max(outside.to(tl.int32)) > 0:
        v = tl.where(outside, _permute(v, half, mask, k0, k1, k2, k3), v)
        outside = v >= Du
    return (v % d.to(tl.uint32)).to(tl.int32)


# --------------------------------------------------------------------------------------------
# reading A / B through the projection
# --------------------------------------------------------------------------------------------
@triton.jit
def lora_index(pos, mask, idx_ptr, perm_base, d, perm, HASHED: tl.constexpr):
    """theta_d index of the layer positions ``pos`` (offsets inside A, or inside B).

    Uniform: ``idx_ptr`` points at the layer's int32 table of that matrix. Hashed: the global
    position is ``perm_base + pos``; masked lanes hash position ``perm_base`` (always inside
    [0, D), so the cycle-walk ends) and are never used.
    """
    if HASHED:
        j = hashed_index(tl.where(mask, perm_base + pos, perm_base), d, perm)
    else:
        j = tl.load(idx_ptr + pos, mask=mask, other=0)
    return j


@triton.jit
def lora_scale(j, mask, scale_ptr, d, perm_D, HASHED: tl.constexpr):
    """s_j: the uniform table entry, or the hashed projection's two-value rule."""
    if HASHED:
        s_lo = tl.load(scale_ptr)
        s_hi = tl.load(scale_ptr + 1)
        s = tl.where(j < perm_D % d, s_hi, s_lo)
    else:
        s = tl.load(scale_ptr + j, mask=mask, other=0.0)
    return s


@triton.jit
def lora_values(pos, mask, theta_ptr, scale_ptr, idx_ptr, perm_base, d, perm, HASHED: tl.constexpr):
    """``theta_d[j] * s_j`` (fp32) at layer positions ``pos``; 0 where ``mask`` is false."""
    j = lora_index(pos, mask, idx_ptr, perm_base, d, perm, HASHED)
    s = lora_scale(j, mask, scale_ptr, d, perm[0], HASHED)
    t = tl.load(theta_ptr + j, mask=mask, other=0.0)
    return tl.where(mask, t * s, 0.0)


@triton.jit
def lora_tile(rows, cols, stride_r, stride_c, R, C, theta_ptr, scale_ptr, idx_ptr, perm_base, d, perm,
              HASHED: tl.constexpr, TRANS: tl.constexpr):
    """W[rows, cols] for a gathered W whose element (i, c) sits at layer position
    ``i * stride_r + c * stride_c`` (rows < R and cols < C are real); shape (rows, cols), or
    (cols, rows) when TRANS."""
    if TRANS:
        pos = rows[None, :] * stride_r + cols[:, None] * stride_c
        mask = (rows < R)[None, :] & (cols < C)[:, None]
    else:
        pos = rows[:, None] * stride_r + cols[None, :] * stride_c
        mask = (rows < R)[:, None] & (cols < C)[None, :]
    return lora_values(pos, mask, theta_ptr, scale_ptr, idx_ptr, perm_base, d, perm, HASHED)


@triton.jit
def scatter_grad(gt_ptr, vals, pos, mask, scale_ptr, idx_ptr, perm_base, d, perm, HASHED: tl.constexpr):
    """``grad_theta[j] += s_j * vals`` (fp32 atomics) for the layer positions ``pos``."""
    j = lora_index(pos, mask, idx_ptr, perm_base, d, perm, HASHED)
    s = lora_scale(j, mask, scale_ptr, d, perm[0], HASHED)
    tl.atomic_add(gt_ptr + j, vals * s, mask=mask, sem="relaxed")


# --------------------------------------------------------------------------------------------
# dropout and the tensor-core dot
# --------------------------------------------------------------------------------------------
@triton.jit
def dropout_keep(seed_ptr, rows, cols, n_cols, threshold):
    """Keep-mask of elements (rows[:, None], cols[None, :]) of a flattened (M, n_cols) input;
    ``seed_ptr`` points at the one-element int64 seed."""
    seed = tl.load(seed_ptr)
    offs = rows.to(tl.int64)[:, None] * n_cols + cols[None, :]
    r = tl.randint(seed, offs).to(tl.int32, bitcast=True)
    r = tl.where(r < 0, ~r, r)
    return r >= threshold


@triton.jit
def mma(a, b, acc, LOWP: tl.constexpr, DT: tl.constexpr):
    """acc += a @ b: in DT (fp16/bf16) on tensor cores when LOWP, else exact fp32 ("ieee")."""
    if LOWP:
        return tl.dot(a.to(DT), b.to(DT), acc)
    else:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")


# --------------------------------------------------------------------------------------------
# row splits and the in-place output update
# --------------------------------------------------------------------------------------------
@triton.jit
def split_tiles(n_tiles, split, n_splits):
    """Tiles [lo, hi) of program ``split`` when ``n_splits`` programs share ``n_tiles`` in contiguous runs."""
    per = tl.cdiv(n_tiles, n_splits)
    lo = split * per
    return lo, tl.minimum(lo + per, n_tiles)


@triton.jit
def add_into(out_ptr, delta, rm, rn, M, N, stride_om):
    """out[rm, rn] += delta (fp32), rounded once to out's dtype; rows past M, columns past N untouched."""
    o_ptrs = out_ptr + rm.to(tl.int64)[:, None] * stride_om + rn[None, :]
    o_mask = (rm < M)[:, None] & (rn < N)[None, :]
    o = tl.load(o_ptrs, mask=o_mask, other=0.0)
    tl.store(o_ptrs, (o.to(tl.float32) + delta).to(out_ptr.dtype.element_ty), mask=o_mask)


# --------------------------------------------------------------------------------------------
# dense gather (merge / export, hashed CSR construction, tests)
# --------------------------------------------------------------------------------------------
@kernel
def gather_kernel(
    theta_ptr, scale_ptr, idx_a_ptr, idx_b_ptr, vals_ptr, index_ptr,
    n_a, n_layer, d, perm_D, perm_base, perm_half, perm_mask, perm_k0, perm_k1, perm_k2, perm_k3,
    HASHED: tl.constexpr, WRITE_VALS: tl.constexpr, WRITE_INDEX: tl.constexpr, BLOCK: tl.constexpr,
):
    """For the layer's flat positions (A row-major, then B row-major): theta_d index and/or value."""
    pos = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = pos < n_layer
    if HASHED:
        perm = (perm_D, perm_half, perm_mask, perm_k0, perm_k1, perm_k2, perm_k3)
        j = hashed_index(tl.where(mask, perm_base + pos, perm_base), d, perm)
    else:
        in_a = pos < n_a
        ja = tl.load(idx_a_ptr + pos, mask=mask & in_a, other=0)
        jb = tl.load(idx_b_ptr + (pos - n_a), mask=mask & (pos >= n_a), other=0)
        j = tl.where(in_a, ja, jb)
    if WRITE_INDEX:
        tl.store(index_ptr + pos, j, mask=mask)
    if WRITE_VALS:
        s = lora_scale(j, mask, scale_ptr, d, perm_D, HASHED)
        t = tl.load(theta_ptr + j, mask=mask, other=0.0)
        tl.store(vals_ptr + pos, t * s, mask=mask)
