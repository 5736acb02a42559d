"""A byte/flop model of a layer call's GPU schedules, and the row threshold of the fold it implies.

Each schedule is a list of kernels, each ``(name, flops, bytes)``; a kernel's time is its roofline
``max(flops / peak_flops, bytes / bandwidth)`` plus ``LAUNCH_S``. Element sizes: ``elt`` bytes for
x, W, out, g and grad_x; h and gB are fp32 (M x r); the gathers of A and B (r (in + out) elements of
theta_d) are left out. The two schedules of an M-row call of a (K in, N out, rank r) layer:

* ``split`` (the update beside the base GEMM): forward GEMM + ``h = x A^T`` (reads x) + ``out += h
  B^T`` (reads and writes out); backward ``grad_x = g W`` + ``gB = g B`` (reads g) + ``grad_x +=
  gB A`` with ``dA`` (reads x, reads and writes grad_x) + ``dB = g^T h`` (reads g).
* ``fold`` (large M): forward folds ``W' = W + B A`` (reads W, writes W') and runs one GEMM;
  backward folds again, ``grad_x = g W'`` in one GEMM, ``h = x A^T`` (reads x), ``gB`` and ``dB``
  in one pass over g, ``dA`` in one pass over x.

Both run the same GEMM flops; the fold trades ``M (2N + K)``-sized passes for ``N K``-sized ones,
so it wins above a row count of the order of ``min(K, N)``. docs/PERF.md ("Large-M schedule")
writes the model out and prints it beside measured times (benchmarks/layer_bench.py: ``model_ms``).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

LAUNCH_S = 3e-6  # a kernel launch's device-side gap, the same for every kernel
# The fold's host side is a few calls more (two folds and their workspaces): it is chosen only where
# the model says it saves at least this much device time per call, so tiny, host-bound layers keep split.
FOLD_MIN_SAVING_S = 10e-6


class Peak(NamedTuple):
    bandwidth: float  # bytes / s
    flops: float  # dense fp16/bf16 tensor-core flop / s (fp32 inputs: a quarter, TF32-free FMA ignored)


# Datasheet figures (SXM parts); an unnamed GPU is modelled as an H100.
PEAKS = {"H100": Peak(3.35e12, 989e12), "H200": Peak(4.8e12, 989e12)}
DEFAULT_PEAK = "H100"


def peak_named(device_name: Optional[str]) -> tuple:
    """``(name, Peak)`` of the first ``PEAKS`` entry whose name ``device_name`` contains, else H100's."""
    for name, peak in PEAKS.items():
        if device_name and name in device_name.upper():
            return name, peak
    return DEFAULT_PEAK, PEAKS[DEFAULT_PEAK]


def kernels(schedule: str, M: int, K: int, N: int, r: int, elt: int, training: bool) -> list:
    """The ``(name, flops, bytes)`` of every kernel of one call (forward, and backward when training)."""
    if schedule not in ("split", "fold"):
        raise ValueError(f"schedule must be split or fold, got {schedule!r}")
    gemm = 2 * M * N * K
    gemm_bytes = elt * (M * K + N * K + M * N)
    h_bytes = 4 * M * r
    out = [("gemm", gemm, gemm_bytes)]
    if schedule == "split":
        out += [("shrink x", 2 * M * K * r, elt * M * K + h_bytes),
                ("expand", 2 * M * N * r, 2 * elt * M * N + h_bytes)]
        if training:
            out += [("grad gemm", gemm, gemm_bytes),
                    ("shrink g", 2 * M * N * r, elt * M * N + h_bytes),
                    ("grad_x, dA", 4 * M * K * r, 3 * elt * M * K + h_bytes),
                    ("dB", 2 * M * N * r, elt * M * N + h_bytes)]
        return out
    fold = ("fold", 2 * N * K * r, 2 * elt * N * K)
    out.insert(0, fold)
    if training:
        out += [fold, ("grad gemm", gemm, gemm_bytes),
                ("h", 2 * M * K * r, elt * M * K + h_bytes),
                ("gB, dB", 4 * M * N * r, elt * M * N + 2 * h_bytes),
                ("dA", 2 * M * K * r, elt * M * K + h_bytes)]
    return out


def predict_s(schedule: str, M: int, K: int, N: int, r: int, elt: int, training: bool, peak: Peak) -> float:
    """The model's time in seconds of one call (forward, plus backward when training)."""
    flops = peak.flops if elt <= 2 else peak.flops / 4
    return sum(max(f / flops, b / peak.bandwidth) + LAUNCH_S
               for _, f, b in kernels(schedule, M, K, N, r, elt, training))


M_SEARCH_MAX = 1 << 24  # rows above which the model is not asked (the fold wins long before)


def fold_threshold(K: int, N: int, r: int, elt: int, training: bool, peak: Peak) -> int:
    """The smallest M at which the model puts ``fold`` at least ``FOLD_MIN_SAVING_S`` below ``split``
    (M_SEARCH_MAX + 1 if none)."""
    def wins(m: int) -> bool:
        fold = predict_s("fold", m, K, N, r, elt, training, peak)
        return fold + FOLD_MIN_SAVING_S <= predict_s("split", m, K, N, r, elt, training, peak)

    if not wins(M_SEARCH_MAX):
        return M_SEARCH_MAX + 1
    lo, hi = 1, M_SEARCH_MAX  # the fold's saving grows with M: bisect on the first win
    while lo < hi:
        mid = (lo + hi) // 2
        if wins(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo
