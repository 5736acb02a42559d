"""What only the Triton backend's mixed-batch kernels have (``triton_kernels/mixed.py``): the
per-row and segmented schedules, a fixed launch sequence and grid whatever the adapter ids are,
deterministic mode, argument checks, and what their ahead-of-time compilation records (the
compilation itself: tests/test_compile_check.py, with every other kernel).

Correctness is held to ``mixed_oracle`` (float64, row by row) with ``assert_close``'s tolerances;
the cross-backend contract lives in tests/test_mixed_backends.py. Without a GPU the kernels run
under the Triton interpreter on CPU tensors (conftest sets TRITON_INTERPRET=1); bf16 operands are
upcast there, and the bf16 tensor-core code is covered by compile_check.
"""

from __future__ import annotations

import pytest
import torch

from oracle import assert_close, make_projection, mixed_oracle, random_theta
from unilora_kernels import backends
from unilora_kernels.backends import triton_launch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
try:
    tb = backends.get_backend("triton", DEVICE)
    _REASON = None
except backends.BackendNotAvailableError as exc:  # e.g. triton not installed
    tb, _REASON = None, str(exc)
pytestmark = pytest.mark.skipif(tb is None, reason=f"triton backend unavailable on {DEVICE}: {_REASON}")

MIXED_KERNELS = ("mixed_shrink_kernel", "mixed_expand_kernel", "mixed_dw_kernel", "mixed_csr_reduce_kernel")


@pytest.fixture
def knobs(monkeypatch):
    """Force the mixed schedule and deterministic mode for one test."""

    def set_(schedule="auto", det=False):
        monkeypatch.setenv("UNILORA_TRITON_MIXED_SCHEDULE", schedule)
        monkeypatch.setenv("UNILORA_DETERMINISTIC", "1" if det else "0")

    return set_


def _case(M, S, in_f, out_f, r, d, kind, dtype, ids, cap, table_dtype=torch.float32, theta_dtype=torch.float32):
    proj = make_projection(in_f, out_f, r, d, kind, seed=3, device=DEVICE)
    theta = random_theta(d, 1).to(DEVICE, theta_dtype)
    table = torch.stack([random_theta(d, 10 + i) for i in range(cap)]) if cap else torch.zeros(0, d)
    table = table.to(DEVICE, table_dtype)
    assert len(ids) == S
    seq = torch.tensor(ids, dtype=torch.int32, device=DEVICE)
    gen = torch.Generator().manual_seed(M * 7 + S)
    x = torch.randn(M, in_f, generator=gen).to(DEVICE, dtype)
    g = torch.randn(M, out_f, generator=gen).to(DEVICE, dtype)
    base = torch.randn(M, out_f, generator=gen).to(DEVICE, dtype)
    return proj, theta, table, seq, x, g, base


def _run_and_check(proj, theta, table, seq, x, g, base, p, dtype, need=(True, True)):
    seed = 77 if p > 0 else None
    out = base.clone()
    tb.mixed_forward_(out, x, theta, table, seq, proj, p, seed)
    gx, gt, gtab = tb.mixed_backward(g, x, theta, table, seq, proj, p, seed, *need)
    ref = mixed_oracle(x, theta, table, seq, proj, p=p, seed=seed, grad_out=g)
    assert_close(out.double() - base.double(), ref["upd"], dtype, "update")
    rows = seq.cpu().long().repeat_interleave(x.shape[0] // seq.shape[0])
    assert torch.equal(out[(rows < 0).to(out.device)], base[(rows < 0).to(out.device)]), "a base row was touched"
    if need[0]:
        assert gx.dtype == x.dtype
        assert_close(gx, ref["grad_x"], dtype, "grad_x")
        assert (gx[(rows < 0).to(gx.device)] == 0).all()
    else:
        assert gx is None
    if need[1]:
        assert gt.dtype == theta.dtype and gtab.dtype == table.dtype and gtab.shape == table.shape
        low = [t for t in (theta.dtype, table.dtype) if t != torch.float32]
        tol = low[0] if low and dtype == torch.float32 else dtype  # a low-precision vector holds its gradient
        assert_close(gt, ref["grad_theta"], tol, "grad_theta")
        assert_close(gtab, ref["grad_table"], tol, "grad_table")
    else:
        assert gt is None and gtab is None
    return out, gx, gt, gtab


# ------------------------------------------------------------------ against the oracle -------
# decode-like (rows), prefill-like (segments), and each schedule forced off its home ground
CASES = [
    # schedule, M, S, in, out, r, d, kind, dtype, p, ids, cap
    ("auto", 15, 5, 37, 29, 3, 53, "uniform", torch.float32, 0.0, [2, -1, 0, 3, 2], 3),
    ("auto", 15, 5, 37, 29, 3, 53, "hashed", torch.float16, 0.3, [0, 1, -1, 1, 0], 2),
    ("auto", 6, 6, 37, 29, 5, 53, "hashed", torch.bfloat16, 0.1, [-1, 1, 0, 2, 2, 0], 2),
    ("auto", 64, 2, 40, 33, 17, 61, "uniform", torch.float32, 0.2, [1, 0], 1),
    ("auto", 64, 4, 40, 33, 6, 61, "hashed", torch.float16, 0.0, [0, -1, 2, 0], 2),
    ("segments", 15, 5, 37, 29, 3, 53, "uniform", torch.float16, 0.2, [2, -1, 0, 3, 2], 3),
    ("rows", 32, 2, 40, 33, 33, 61, "uniform", torch.float32, 0.0, [1, 0], 1),
]


@pytest.mark.parametrize("schedule,M,S,in_f,out_f,r,d,kind,dtype,p,ids,cap", CASES,
                         ids=[f"{c[0]}-M{c[1]}S{c[2]}-{c[7]}-{str(c[8])[6:]}-p{c[9]}" for c in CASES])
def test_mixed_matches_oracle(knobs, schedule, M, S, in_f, out_f, r, d, kind, dtype, p, ids, cap):
    knobs(schedule)
    args = _case(M, S, in_f, out_f, r, d, kind, dtype, ids, cap)
    _run_and_check(*args, p, dtype)


@pytest.mark.parametrize("kind", ["uniform", "hashed"])
def test_low_precision_table_and_theta(knobs, kind):
    """bf16 / fp16 storage is read into fp32; gradients come back in each vector's own dtype."""
    knobs()
    args = _case(10, 5, 37, 29, 3, 53, kind, torch.float32, [1, 0, -1, 2, 1], 2, table_dtype=torch.bfloat16,
                 theta_dtype=torch.float16)
    _run_and_check(*args, 0.1, torch.float32)


def test_capacity_zero_and_partial_gradients(knobs):
    knobs()
    args = _case(8, 4, 37, 29, 3, 53, "uniform", torch.float32, [0, -1, 0, -1], 0)
    _run_and_check(*args, 0.0, torch.float32, need=(True, False))
    _run_and_check(*args, 0.0, torch.float32, need=(False, True))


def test_strided_table_and_rows_are_read_in_place(knobs):
    """A table whose rows are spaced apart and row-strided activations go to the kernels as they are."""
    knobs()
    proj, theta, table, seq, x, g, base = _case(8, 4, 37, 29, 3, 53, "hashed", torch.float32, [2, 0, -1, 1], 2)
    wide = torch.zeros(4, 53, device=DEVICE)
    wide[::2] = table
    x_wide = torch.zeros(8, 50, device=DEVICE)
    x_wide[:, 3:40] = x
    spaced, rows = wide[::2], x_wide[:, 3:40]
    _run_and_check(proj, theta, spaced, seq, rows, g, base, 0.1, torch.float32)
    with triton_launch.record_launches() as rec:
        tb.mixed_forward_(base.clone(), rows, theta, spaced, seq, proj, 0.0, None)
    assert rec[0].args["table_ptr"] is spaced and rec[0].args["stride_tab"] == 2 * 53
    assert rec[0].args["x_ptr"] is rows and rec[0].args["stride_xm"] == 50


# ------------------------------------------------------------------ launches --------------------
def _record(M, S, ids, cap=3, det_backward=True):
    proj = make_projection(37, 29, 3, 53, "hashed", device=DEVICE)
    theta = random_theta(53, device=DEVICE)
    table = torch.zeros(cap, 53, device=DEVICE)
    seq = torch.tensor(ids, dtype=torch.int32, device=DEVICE)
    x = torch.randn(M, 37, device=DEVICE)
    with triton_launch.record_launches() as rec:
        tb.mixed_forward_(torch.empty(M, 29, device=DEVICE), x, theta, table, seq, proj, 0.1, 5)
        tb.mixed_backward(torch.empty(M, 29, device=DEVICE), x, theta, table, seq, proj, 0.1, 5, True, True)
    return [(ln.launcher.name, ln.grid, ln.meta.get("ROWS"), ln.meta.get("DET")) for ln in rec]


@pytest.mark.parametrize("M,S,rows", [(8, 8, True), (12, 4, True), (64, 2, False), (96, 6, False)])
def test_fixed_launches_and_grids_whatever_the_ids(knobs, M, S, rows):
    """One call per layer: the same kernels and grids for any ids (no host loop over adapters),
    and the schedule read from the shape alone (sequences of >= 16 rows run segments)."""
    knobs()
    seen = {tuple(_record(M, S, ids)) for ids in ([-1] * S, [0] * S, [3] * S, [(i % 5) - 1 for i in range(S)])}
    assert len(seen) == 1
    launches = seen.pop()
    assert [n for n, *_ in launches] == ["mixed_shrink_kernel", "mixed_expand_kernel", "mixed_shrink_kernel",
                                         "mixed_expand_kernel", "mixed_shrink_kernel", "mixed_dw_kernel",
                                         "mixed_dw_kernel"]
    assert {r for _, _, r, _ in launches} == {rows}
    assert tb.mixed_schedule_for(M, S) == ("rows" if rows else "segments")


def test_schedule_knob(knobs):
    knobs("segments")
    assert tb.mixed_schedule_for(8, 8) == "segments"
    knobs("bogus")
    with pytest.raises(ValueError, match="UNILORA_TRITON_MIXED_SCHEDULE"):
        tb.mixed_schedule_for(8, 8)


# ------------------------------------------------------------------ determinism -----------------
@pytest.mark.parametrize("schedule,M,S,ids,cap", [
    ("auto", 12, 6, [1, 0, 1, -1, 0, 1], 1),  # per-row; partials per adapter id (capacity + 1 <= S)
    ("auto", 64, 2, [3, 3], 7),  # segments; partials per sequence (capacity + 1 > S)
    ("rows", 12, 3, [0, 2, 0], 4),
])
def test_deterministic_is_bit_identical_and_atomic_free(knobs, schedule, M, S, ids, cap):
    knobs(schedule, det=True)
    args = _case(M, S, 37, 29, 5, 23, "uniform", torch.float32, ids, cap)  # small d: many collisions
    runs = [_run_and_check(*args, 0.2, torch.float32) for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    launches = [ln for ln in _record(M, S, ids, cap) if ln[0].startswith("mixed")]  # not the CSR's own gather
    assert [n for n, *_ in launches][-3:] == ["mixed_dw_kernel", "mixed_dw_kernel", "mixed_csr_reduce_kernel"]
    assert all(det for n, _, _, det in launches if n == "mixed_dw_kernel")
    assert all(grid[1] == 1 for n, grid, _, _ in launches if n == "mixed_shrink_kernel")  # no split-K atomics


# ------------------------------------------------------------------ argument checks --------------
def test_argument_errors(knobs):
    knobs()
    proj, theta, table, seq, x, g, base = _case(8, 4, 37, 29, 3, 53, "uniform", torch.float32, [0, 1, -1, 2], 2)
    fwd = tb.mixed_forward_
    with pytest.raises(TypeError, match="float64"):
        fwd(base.double(), x.double(), theta, table, seq, proj, 0.0, None)
    with pytest.raises(TypeError, match="float64"):
        fwd(base, x, theta, table.double(), seq, proj, 0.0, None)
    with pytest.raises(ValueError, match="int32"):
        fwd(base, x, theta, table, seq.long(), proj, 0.0, None)
    with pytest.raises(ValueError, match="sequences of equal length"):
        fwd(base, x, theta, table, seq[:3], proj, 0.0, None)
    # Ids are not read on the host (adapter_batch validates them): one past the table's capacity
    # reads nothing and leaves its sequence's rows as base rows.
    out = base.clone()
    fwd(out, x, theta, table[:1], seq, proj, 0.0, None)
    assert torch.equal(out[4:], base[4:])  # sequences 2 (id -1) and 3 (id 2 > capacity 1)
    assert not torch.equal(out[:4], base[:4])
    with pytest.raises(ValueError, match="capacity"):
        fwd(base, x, theta, table[:, :50], seq, proj, 0.0, None)
    with pytest.raises(ValueError, match="seed"):
        fwd(base, x, theta, table, seq, proj, 0.5, None)
    with pytest.raises(ValueError, match="grad_output"):
        tb.mixed_backward(g[:, :5], x, theta, table, seq, proj, 0.0, None, True, True)


# ------------------------------------------------------------------ ahead-of-time compilation -----
def test_compile_check_records_the_mixed_kernels():
    """compile_check's scenarios reach every mixed kernel, both schedules, with and without det."""
    from unilora_kernels import compile_check

    rec = [(lau.name, meta) for lau, _s, _d, _a, meta, _c in compile_check.record() if lau.name.startswith("mixed")]
    assert {n for n, _ in rec} == set(MIXED_KERNELS)
    assert {m["ROWS"] for n, m in rec if n != "mixed_csr_reduce_kernel"} == {True, False}
    assert {m["DET"] for n, m in rec if n == "mixed_dw_kernel"} == {True, False}
