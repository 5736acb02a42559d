"""The projection P: which entry of theta_d each element of theta_D reads, and with what scale.

Two kinds, both one-hot-scaled isometries (P^T P = I):

* ``uniform`` reproduces PEFT's ``UniLoraModel.generate_index`` bit for bit and stores the
  indices as int32 (4 bytes per element of D) plus one fp32 scale table of length d.
* ``hashed`` stores nothing per element: ``idx(i) = pi_key(i) mod d`` where ``pi_key`` is a
  keyed Feistel bijection of [0, D). Because pi is a bijection, every column count is known in
  closed form, so the two possible scales are scalars.

The integer functions here are the Python reference for the Triton helper
(``triton_kernels/index_math.py``) and the C++/CUDA header (``csrc/index_math.h``); the three
must agree bit for bit. They use int64 tensors only (uint32 products are split into 16-bit
halves) so they run on any device and dtype-promotion rules cannot change them.
"""

from __future__ import annotations

import math

import numpy as np
import torch

INT32_LIMIT = 2**31
MASK32 = 0xFFFFFFFF

# Feistel round-function constants, shared with the Triton and C++ implementations.
FEISTEL_ROUNDS = 4
FEISTEL_MUL1 = 0x9E3779B1
FEISTEL_MUL2 = 0x85EBCA6B
FEISTEL_KEY_SALT = 0x9E3779B9


def check_sizes(D: int, d: int) -> None:
    """Validate the sizes of the projection (raises ValueError naming the problem)."""
    if not isinstance(d, int) or isinstance(d, bool) or d <= 0:
        raise ValueError(f"theta_d_length (d) must be a positive int, got {d!r}")
    if not isinstance(D, int) or isinstance(D, bool) or D <= 0:
        raise ValueError(f"the number of adapted LoRA parameters D must be positive, got {D!r}")
    if D >= INT32_LIMIT:
        raise ValueError(
            f"D = {D:,} LoRA parameters does not fit int32 indices (limit {INT32_LIMIT - 1:,}); "
            "use a smaller r or fewer target modules"
        )
    if d >= INT32_LIMIT:
        raise ValueError(f"theta_d_length = {d:,} does not fit int32 indices")


# --------------------------------------------------------------------------------------------
# uniform projection (PEFT-exact)
# --------------------------------------------------------------------------------------------
def generate_index(D: int, d: int, seed: int) -> np.ndarray:
    """PEFT's ``generate_index(D, d, seed)``, written straight into one int32 array of length D.

    Same RNG calls in the same order as PEFT (``choice`` for the remainder, then ``shuffle``);
    ``Generator.shuffle`` draws the same swaps whatever the element type, so the int32 result
    equals PEFT's int64 one element for element, without an int64 copy of length D.
    """
    check_sizes(D, d)
    base, rem = divmod(D, d)
    rng = np.random.default_rng(seed)
    out = np.empty(D, dtype=np.int32)
    if base:
        out[: d * base].reshape(d, base)[:] = np.arange(d, dtype=np.int32)[:, None]
    if rem:
        out[d * base :] = rng.choice(d, size=rem, replace=False)
    rng.shuffle(out)
    return out


def scales_from_counts(counts: torch.Tensor) -> torch.Tensor:
    """``s_j = rsqrt(n_j)`` (0 where n_j == 0), computed exactly as PEFT does (fp32, on CPU)."""
    counts = counts.to("cpu")
    scales = torch.zeros(counts.numel(), dtype=torch.float32)
    used = counts > 0
    scales[used] = counts[used].float().rsqrt()
    return scales


def uniform_scales(index: np.ndarray, d: int) -> torch.Tensor:
    return scales_from_counts(torch.from_numpy(np.bincount(index, minlength=d)))


# --------------------------------------------------------------------------------------------
# hashed projection (index-free)
# --------------------------------------------------------------------------------------------
def splitmix64(seed: int) -> int:
    """Key of the hashed projection derived from ``proj_seed`` (host side only)."""
    z = (seed + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    z ^= z >> 31
    return z & 0x7FFFFFFFFFFFFFFF  # a non-negative int64, so it travels as a schema `int`


def feistel_half_bits(D: int) -> int:
    """Half-width of the Feistel domain: the smallest h >= 1 with 4**h >= D."""
    bits = max(1, math.ceil(math.log2(D))) if D > 1 else 1
    return max(1, (bits + 1) // 2)


def feistel_round_keys(key: int) -> list[int]:
    """Four 32-bit round keys from one 63-bit key (same derivation in every backend)."""
    lo, hi = key & MASK32, (key >> 32) & MASK32
    return [((lo if r % 2 == 0 else hi) ^ ((FEISTEL_KEY_SALT * (r + 1)) & MASK32)) & MASK32 for r in range(FEISTEL_ROUNDS)]


def _mul32(a: torch.Tensor, c: int) -> torch.Tensor:
    """(a * c) mod 2^32 for int64 tensors holding uint32 values, without int64 overflow."""
    a_hi, a_lo = a >> 16, a & 0xFFFF
    return ((((a_hi * c) & 0xFFFF) << 16) + a_lo * c) & MASK32


def _feistel_round(x: torch.Tensor, k: int, half_mask: int) -> torch.Tensor:
    x = x ^ k
    x = _mul32(x, FEISTEL_MUL1)
    x = x ^ (x >> 16)
    x = _mul32(x, FEISTEL_MUL2)
    x = x ^ (x >> 13)
    return x & half_mask


def feistel_permute(v: torch.Tensor, half: int, keys: list[int]) -> torch.Tensor:
    """One pass of the keyed bijection of [0, 4**half)."""
    half_mask = (1 << half) - 1
    left, right = v >> half, v & half_mask
    for k in keys:
        left, right = right, left ^ _feistel_round(right, k, half_mask)
    return (left << half) | right


def hashed_index(positions: torch.Tensor, D: int, d: int, key: int) -> torch.Tensor:
    """``pi_key(i) mod d`` for int64 positions in [0, D); cycle-walking keeps pi inside [0, D)."""
    half, keys = feistel_half_bits(D), feistel_round_keys(key)
    v = feistel_permute(positions.to(torch.int64), half, keys)
    outside = v >= D
    while bool(outside.any()):
        v = torch.where(outside, feistel_permute(v, half, keys), v)
        outside = v >= D
    return v % d


def hashed_counts(D: int, d: int) -> tuple[int, int]:
    """(n for j >= D % d, n for j < D % d): every column count of the hashed projection."""
    return D // d, D // d + 1


def hashed_scales(D: int, d: int) -> torch.Tensor:
    """The hashed projection's two scales ``[s(n_base), s(n_base + 1)]`` as an fp32 tensor."""
    return scales_from_counts(torch.tensor(hashed_counts(D, d), dtype=torch.int64))


def hashed_scale_of(idx: torch.Tensor, D: int, d: int, scales2: torch.Tensor) -> torch.Tensor:
    """Per-element scale of the hashed projection from its two-entry table."""
    return torch.where(idx < D % d, scales2[1], scales2[0])
