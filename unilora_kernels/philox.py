"""Counter-based dropout masks shared by every backend.

The mask of a layer call is a pure function of (seed, row, column): element (m, k) of the
flattened (M, in) input is kept iff ``philox(seed, m * in + k) >= threshold``. Nothing is
stored between forward and backward; each backend regenerates the same bits.

The generator is Philox4x32-10 exactly as ``triton.language.randint(seed, offset)`` computes it
(int64 offsets: counter = (offset_lo, offset_hi, 0, 0), key = (seed_lo, seed_hi)); the C++/CUDA
header ``csrc/index_math.h`` implements the same function (``philox_randint``). The 31-bit value
compared with the threshold is the int32 output folded to non-negative (``x < 0 ? ~x : x``), as
``tl.rand`` does before it scales to a float: comparing integers keeps the mask bit-identical
across backends.
"""

from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF
PHILOX_KEY_A = 0x9E3779B9
PHILOX_KEY_B = 0xBB67AE85
PHILOX_ROUND_A = 0xD2511F53
PHILOX_ROUND_B = 0xCD9E8D57
PHILOX_ROUNDS = 10
THRESHOLD_ONE = 2**31  # threshold for p == 1: nothing is kept


def _mulhilo32(a: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit halves of a * b for int64 tensors holding uint32 values."""
    a_hi, a_lo = a >> 16, a & 0xFFFF
    t = a_lo * b
    u = a_hi * b
    hi = (u + (t >> 16)) >> 16
    lo = (((u & 0xFFFF) << 16) + t) & MASK32
    return hi, lo


def philox4x32(c0, c1, c2, c3, k0: int, k1: int, rounds: int = PHILOX_ROUNDS):
    """Philox4x32 (Salmon et al., Random123) on int64 tensors holding uint32 counters."""
    for _ in range(rounds):
        hi_b, lo_b = _mulhilo32(c2, PHILOX_ROUND_B)
        hi_a, lo_a = _mulhilo32(c0, PHILOX_ROUND_A)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + PHILOX_KEY_A) & MASK32
        k1 = (k1 + PHILOX_KEY_B) & MASK32
    return c0, c1, c2, c3


def philox_randint(seed, offsets: torch.Tensor) -> torch.Tensor:
    """``tl.randint(seed, offsets)`` for int64 offsets, as uint32 values in an int64 tensor; ``seed``
    an int or a one-element int64 tensor on the offsets' device (read there, never on the host)."""
    offsets = offsets.to(torch.int64)
    c0 = offsets & MASK32
    c1 = (offsets >> 32) & MASK32
    zero = torch.zeros_like(c0)
    return philox4x32(c0, c1, zero, zero, seed & MASK32, (seed >> 32) & MASK32)[0]


def fold31(r: torch.Tensor) -> torch.Tensor:
    """The int32 bit pattern folded onto [0, 2^31): ``x < 0 ? ~x : x``."""
    return torch.where(r >= 2**31, MASK32 - r, r)


def keep_threshold(p: float) -> int:
    """Integer threshold on the folded 31-bit value: P(keep) = 1 - threshold / 2^31."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability must be in [0, 1], got {p}")
    return min(THRESHOLD_ONE, int(round(p * THRESHOLD_ONE)))


def keep_scale(p: float) -> float:
    """Scale of the kept elements (inverted dropout); 0 when everything is dropped."""
    return 0.0 if p >= 1.0 else 1.0 / (1.0 - p)


def dropout_keep(seed, rows: int, cols: int, p: float, device=None) -> torch.Tensor:
    """Boolean keep-mask of shape (rows, cols) for flattened input rows."""
    offsets = torch.arange(rows * cols, device=device, dtype=torch.int64)
    keep = fold31(philox_randint(seed, offsets)) >= keep_threshold(p)
    return keep.view(rows, cols)


def new_seed(device=None) -> torch.Tensor:
    """A fresh dropout seed, drawn on ``device`` from its default generator: no host read, and
    under CUDA-graph capture each replay draws a new one (traceable by torch.compile)."""
    return torch.randint(0, 2**62, (1,), dtype=torch.int64, device=device)
