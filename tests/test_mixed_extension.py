"""Mixed batches on the compiled backends (``unilora_C::mixed_forward_`` / ``mixed_backward``).

* the ``cpu`` backend against ``mixed_oracle`` (float64, row by row) on odd shapes, a decode
  shape and a prefill shape: uniform and hashed projections, dropout on and off, every activation
  dtype, fp32/bf16 tables, an empty table, adapter ids mixing -1 (base), 0 (theta) and k (table);
* the CPU backward is deterministic (bit-identical reruns);
* clear errors from the C++ checks;
* torch.library.opcheck of both ops;
* CUDA (``gpu`` marker): the same checks on CUDA tensors, and the deterministic-mode refusal;
* CMakeLists.txt lists the new sources.
"""

from __future__ import annotations

import os
import re

import pytest
import torch

from oracle import TOL, assert_close, make_projection, mixed_oracle, random_theta, tolerance_dtype
from unilora_kernels.build_info import extension_info

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INFO = extension_info()
needs_ext = pytest.mark.skipif(not INFO.get("built"), reason=f"extension not built: {INFO.get('reason')}")
if INFO.get("built"):
    from unilora_kernels.backends import extension as ext

    C = torch.ops.unilora_C

ACT_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
ODD = dict(S=5, T=3, in_f=37, out_f=29, r=3, d=53)


def _case(S, T, in_f, out_f, r, d, *, kind, x_dtype, table_dtype, capacity, ids, device="cpu", seed=0):
    """(proj, theta, table, seq_adapter, x, out, g) of one mixed batch."""
    gen = torch.Generator().manual_seed(seed)
    proj = make_projection(in_f, out_f, r, d, kind, seed=1, device=device, extra_layers=1)
    theta = random_theta(d, 3)
    if x_dtype == torch.float64:
        theta = theta.double()
    table = (torch.rand(capacity, d, generator=gen, dtype=torch.float64) - 0.5).to(table_dtype)
    seq = torch.tensor(ids, dtype=torch.int32)
    M = S * T
    x = torch.randn(M, in_f, generator=gen).to(x_dtype)
    out = torch.randn(M, out_f, generator=gen).to(x_dtype)
    g = torch.randn(M, out_f, generator=gen).to(x_dtype)
    return [t.to(device) if isinstance(t, torch.Tensor) else t for t in (proj, theta, table, seq, x, out, g)]


def _tol_dtype(x_dtype, table_dtype, kind):
    """The TOL entry: the activations' (fp64 with a low-precision table is held to fp32's)."""
    dt = tolerance_dtype(x_dtype, kind)
    if dt == torch.float64 and table_dtype != torch.float64:
        return torch.float32
    return dt


def _check_against_oracle(proj, theta, table, seq, x, out, g, p, kind, table_dtype, what=""):
    seed = 24680 if p > 0 else None
    base = out.clone()
    ext.mixed_forward_(out, x, theta, table, seq, proj, p, seed)
    ref = mixed_oracle(x, theta, table, seq, proj, p=p, seed=seed, grad_out=g)
    td = _tol_dtype(x.dtype, table_dtype, kind)
    assert out.dtype == x.dtype
    # the update, with the rounding of the output dtype allowed for
    assert_close(out.double() - base.double(), ref["upd"], td, f"{what} update")
    gx, gt, gtab = ext.mixed_backward(g, x, theta, table, seq, proj, p, seed, True, True)
    assert gx.dtype == x.dtype and gt.dtype == theta.dtype and gtab.dtype == table.dtype
    assert gtab.shape == table.shape and gt.shape == theta.shape
    # low-precision gradient outputs are rounded once at the end: held to their own dtype too
    assert_close(gx, ref["grad_x"], td, f"{what} grad_x")
    assert_close(gt, ref["grad_theta"], td, f"{what} grad_theta")
    gtab_td = td if TOL[td] >= TOL.get(table_dtype, 0.0) else table_dtype
    assert_close(gtab, ref["grad_table"], gtab_td, f"{what} grad_table")
    base_rows = seq.cpu().long().repeat_interleave(x.shape[0] // seq.shape[0]) < 0
    assert torch.equal(out[base_rows.to(out.device)], base[base_rows.to(out.device)])  # base rows untouched
    assert (gx[base_rows.to(gx.device)] == 0).all()
    return gx, gt, gtab


@needs_ext
@pytest.mark.parametrize("kind", ["uniform", "hashed"])
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("x_dtype", ACT_DTYPES)
@pytest.mark.parametrize("table_dtype", [torch.float32, torch.bfloat16])
def test_cpu_odd_shapes_match_oracle(kind, p, x_dtype, table_dtype):
    case = _case(**ODD, kind=kind, x_dtype=x_dtype, table_dtype=table_dtype, capacity=4, ids=[2, -1, 0, 2, 4])
    _check_against_oracle(*case, p, kind, table_dtype, f"{kind} p={p} {x_dtype} table {table_dtype}")


@needs_ext
@pytest.mark.parametrize("kind", ["uniform", "hashed"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpu_low_precision_theta(kind, dtype):
    """theta_d of the table's dtype (a model cast to bf16/fp16): its gradient comes back in it."""
    proj, theta, table, seq, x, out, g = _case(**ODD, kind=kind, x_dtype=dtype, table_dtype=dtype, capacity=4,
                                               ids=[2, -1, 0, 2, 4])
    _check_against_oracle(proj, theta.to(dtype), table, seq, x, out, g, 0.3, kind, dtype, f"theta {dtype}")


@needs_ext
@pytest.mark.parametrize("ids", [[0, 0, -1, 0, 0], [1, 1, 1, 1, 1], [3, 3, 1, 1, 2]])
def test_cpu_id_patterns(ids):
    """Consecutive sequences sharing one adapter, table-only batches."""
    case = _case(**ODD, kind="uniform", x_dtype=torch.float32, table_dtype=torch.float32, capacity=3, ids=ids)
    _check_against_oracle(*case, 0.0, "uniform", torch.float32, str(ids))


@needs_ext
def test_cpu_all_base_batch():
    """Every sequence on the base model (the oracle has no graph to differentiate here)."""
    proj, theta, table, seq, x, out, g = _case(**ODD, kind="uniform", x_dtype=torch.float32,
                                               table_dtype=torch.float32, capacity=3, ids=[-1] * 5)
    before = out.clone()
    ext.mixed_forward_(out, x, theta, table, seq, proj, 0.0, None)
    assert torch.equal(out, before)
    gx, gt, gtab = ext.mixed_backward(g, x, theta, table, seq, proj, 0.0, None, True, True)
    assert not gx.any() and not gt.any() and not gtab.any()


@needs_ext
@pytest.mark.parametrize("kind", ["uniform", "hashed"])
def test_cpu_capacity_zero(kind):
    case = _case(**ODD, kind=kind, x_dtype=torch.float32, table_dtype=torch.float32, capacity=0,
                 ids=[0, -1, 0, 0, -1])
    gx, gt, gtab = _check_against_oracle(*case, 0.25, kind, torch.float32, "capacity 0")
    assert gtab.shape == (0, ODD["d"])


@needs_ext
@pytest.mark.parametrize("kind", ["uniform", "hashed"])
@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_cpu_decode_shape(kind, p, x_dtype):
    """One row per sequence, every sequence its own adapter (the per-row path), a real width."""
    S = 24
    ids = [(s % 22) + 1 for s in range(S)]
    ids[3], ids[7] = 0, -1
    for d in (1000, 20000):  # theta small enough for the AVX-512 gathers, and too large for them
        case = _case(S, 1, 256, 192, 8, d, kind=kind, x_dtype=x_dtype, table_dtype=torch.float32, capacity=22,
                     ids=ids)
        _check_against_oracle(*case, p, kind, torch.float32, f"decode d={d}")


@needs_ext
def test_cpu_decode_columns_follow_in_place_updates():
    """Decode keeps the batch's adapters as columns per seq_adapter tensor: an in-place change of
    theta or of the table (an optimizer step, add_adapter) must be seen by the next call."""
    proj, theta, table, seq, x, out, g = _case(37, 1, 45, 33, 4, 301, kind="uniform", x_dtype=torch.float32,
                                               table_dtype=torch.float32, capacity=3,
                                               ids=[(s % 4) - 1 for s in range(37)])
    for change in (None, lambda: table[1].add_(0.5), lambda: theta.mul_(-2.0), lambda: table.zero_()):
        if change is not None:
            change()
        got = torch.zeros_like(out)
        ext.mixed_forward_(got, x, theta, table, seq, proj, 0.0, None)
        assert_close(got, mixed_oracle(x, theta, table, seq, proj)["upd"], torch.float32, "decode after an update")


@needs_ext
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.float16, torch.float64])
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_cpu_prefill_shape(x_dtype, p):
    """Long runs of rows with one adapter (gathered once, SIMD/BLAS row blocks)."""
    table_dtype = torch.float64 if x_dtype == torch.float64 else torch.float32
    case = _case(3, 80, 96, 72, 4, 300, kind="uniform", x_dtype=x_dtype, table_dtype=table_dtype, capacity=2,
                 ids=[1, 0, 2])
    _check_against_oracle(*case, p, "uniform", table_dtype, "prefill")


@needs_ext
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T", [1, 40])
def test_cpu_strided_rows(x_dtype, T):
    """x and grad_out as column slices of wider tensors (row stride > in / out)."""
    proj, theta, table, seq, x, out, g = _case(4, T, 48, 40, 4, 200, kind="uniform", x_dtype=x_dtype,
                                               table_dtype=torch.float32, capacity=3, ids=[1, 0, -1, 3])
    xw = torch.randn(x.shape[0], 64).to(x_dtype)
    xw[:, 5:53] = x
    gw = torch.randn(g.shape[0], 50).to(x_dtype)
    gw[:, 3:43] = g
    _check_against_oracle(proj, theta, table, seq, xw[:, 5:53], out, gw[:, 3:43], 0.2, "uniform", torch.float32,
                          f"strided T={T}")


@needs_ext
def test_cpu_mixed_ops_take_tensor_seeds():
    """The C++ mixed ops take the dropout seed as a one-element int64 tensor: the oracle's mask of
    its value (a key above 2^32 too), the same bits as the int through the backend functions."""
    proj, theta, table, seq, x, out, g = _case(**ODD, kind="uniform", x_dtype=torch.float32,
                                               table_dtype=torch.float32, capacity=4, ids=[2, -1, 0, 2, 4])
    p, value = 0.3, 2**40 + 3
    common = (proj.scales, proj.idx_a, proj.idx_b, proj.r, [], p, torch.tensor([value]))
    got = out.clone()
    C.mixed_forward_(got, x, theta, table, seq, *common)
    ref = mixed_oracle(x, theta, table, seq, proj, p=p, seed=value, grad_out=g)
    assert_close(got.double() - out.double(), ref["upd"], torch.float32, "update")
    grads = C.mixed_backward(g, x, theta, table, seq, *common, True, True, False)
    for got_grad, what in zip(grads, ("grad_x", "grad_theta", "grad_table")):
        assert_close(got_grad, ref[what], torch.float32, what)
    via_int = out.clone()
    ext.mixed_forward_(via_int, x, theta, table, seq, proj, p, value)
    assert torch.equal(via_int, got)
    for a, b in zip(ext.mixed_backward(g, x, theta, table, seq, proj, p, value, True, True), grads):
        assert torch.equal(a, b)


@needs_ext
def test_cpu_decode_columns_read_nothing_on_the_python_side():
    """The decode columns' decision (id range, runs of one adapter) is made in C++: a
    TorchFunctionMode spy sees no host read of a tensor in the forward, cached or not."""
    from torch.overrides import TorchFunctionMode

    reads = {torch.Tensor.tolist, torch.Tensor.item, torch.Tensor.__int__, torch.Tensor.__bool__,
             torch.Tensor.__index__, torch.Tensor.__float__, torch.Tensor.numpy}
    seen = []

    class Spy(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func in reads:
                seen.append(func)
            return func(*args, **(kwargs or {}))

    proj, theta, table, seq, x, out, g = _case(37, 1, 45, 33, 4, 301, kind="uniform", x_dtype=torch.float32,
                                               table_dtype=torch.float32, capacity=3,
                                               ids=[(s % 4) - 1 for s in range(37)])
    ref = mixed_oracle(x, theta, table, seq, proj)["upd"]
    for _ in range(2):  # builds the columns, then reuses them
        got = torch.zeros_like(out)
        with Spy():
            ext.mixed_forward_(got, x, theta, table, seq, proj, 0.0, None)
        assert_close(got, ref, torch.float32, "decode")
    assert ext.decode_columns(theta, table, seq) is not None  # the column kernel ran
    assert not seen, f"host reads in the forward: {seen}"
    with pytest.raises(ValueError, match=r"seq_adapter ids must lie in \[-1, 3\], got \[0, 4\]"):
        ext.decode_columns(theta, table, torch.tensor([4] + [0] * 36, dtype=torch.int32))


@needs_ext
def test_cpu_need_flags_and_determinism():
    proj, theta, table, seq, x, out, g = _case(**ODD, kind="hashed", x_dtype=torch.float32,
                                               table_dtype=torch.float32, capacity=4, ids=[2, -1, 0, 2, 4])
    full = ext.mixed_backward(g, x, theta, table, seq, proj, 0.2, 5, True, True)
    again = ext.mixed_backward(g, x, theta, table, seq, proj, 0.2, 5, True, True)
    for a, b in zip(full, again):
        assert torch.equal(a, b)  # fixed-order adds: bit-identical reruns
    gx, gt, gtab = ext.mixed_backward(g, x, theta, table, seq, proj, 0.2, 5, True, False)
    assert gt is None and gtab is None and torch.equal(gx, full[0])
    gx, gt, gtab = ext.mixed_backward(g, x, theta, table, seq, proj, 0.2, 5, False, True)
    assert gx is None and torch.equal(gt, full[1]) and torch.equal(gtab, full[2])


@needs_ext
def test_cpu_empty_batch():
    proj, theta, table, seq, x, out, g = _case(**ODD, kind="uniform", x_dtype=torch.float32,
                                               table_dtype=torch.float32, capacity=4, ids=[2, -1, 0, 2, 4])
    out0 = out[:0].clone()
    ext.mixed_forward_(out0, x[:0], theta, table, seq, proj, 0.0, None)
    gx, gt, gtab = ext.mixed_backward(g[:0], x[:0], theta, table, seq, proj, 0.0, None, True, True)
    assert gx.shape == (0, ODD["in_f"]) and not gt.any() and not gtab.any()


@needs_ext
def test_cpu_bad_inputs_raise_clear_errors():
    proj, theta, table, seq, x, out, g = _case(**ODD, kind="uniform", x_dtype=torch.float32,
                                               table_dtype=torch.float32, capacity=4, ids=[2, -1, 0, 2, 4])
    common = (proj.scales, proj.idx_a, proj.idx_b, proj.r, [], 0.0, None)

    def fwd(out=out, x=x, theta=theta, table=table, seq=seq):
        C.mixed_forward_(out.clone(), x, theta, table, seq, *common)

    with pytest.raises(RuntimeError, match=r"seq_adapter\[4\] = 5 must be -1"):
        fwd(seq=torch.tensor([2, -1, 0, 2, 5], dtype=torch.int32))
    with pytest.raises(RuntimeError, match=r"seq_adapter\[0\] = -2"):
        fwd(seq=torch.tensor([-2, -1, 0, 2, 1], dtype=torch.int32))
    with pytest.raises(RuntimeError, match="seq_adapter must be a 1-D int32"):
        fwd(seq=seq.long())
    with pytest.raises(RuntimeError, match="not a multiple of the 4 sequences"):
        fwd(seq=seq[:4])
    with pytest.raises(RuntimeError, match=r"table must be \(capacity, d = 53\)"):
        fwd(table=table[:, :10])
    with pytest.raises(RuntimeError, match="table must be contiguous"):
        fwd(table=torch.zeros(53, 4).t())
    with pytest.raises(RuntimeError, match="table must be float16/bfloat16/float32/float64"):
        fwd(table=table.to(torch.int32))
    with pytest.raises(RuntimeError, match="out must have x's dtype"):
        fwd(out=out.double())
    with pytest.raises(RuntimeError, match="theta_d must be a 1-D float16/bfloat16/float32/float64"):
        fwd(theta=theta.to(torch.int32))
    with pytest.raises(RuntimeError, match=r"grad_out must be \(15, 29\)"):
        C.mixed_backward(g[:3], x, theta, table, seq, *common, True, True, False)
    with pytest.raises(RuntimeError, match=r"seq_adapter\[1\] = 9"):
        C.mixed_backward(g, x, theta, table, torch.tensor([0, 9, 0, 0, 0], dtype=torch.int32), *common, True, True,
                         False)
    with pytest.raises(ValueError, match="needs a seed"):
        ext.mixed_forward_(out.clone(), x, theta, table, seq, proj, 0.5, None)


@needs_ext
@pytest.mark.parametrize("kind", ["uniform", "hashed"])
def test_opcheck_mixed_ops(kind):
    proj, theta, table, seq, x, out, g = _case(**ODD, kind=kind, x_dtype=torch.float32, table_dtype=torch.float32,
                                               capacity=4, ids=[2, -1, 0, 2, 4])
    common = (proj.scales, proj.idx_a, proj.idx_b, proj.r, list(proj.hash_params), 0.2, torch.tensor([99]))
    torch.library.opcheck(C.mixed_forward_.default, (out.clone(), x, theta, table, seq) + common)
    for need_x, need_t in ((True, True), (True, False), (False, True)):
        torch.library.opcheck(C.mixed_backward.default, (g, x, theta, table, seq) + common + (need_x, need_t, False))


def test_cmake_lists_mixed_sources():
    with open(os.path.join(ROOT, "CMakeLists.txt"), encoding="utf-8") as fh:
        text = fh.read()
    sources = re.search(r"set\(UNILORA_SOURCES(.*?)\)", text, re.S).group(1)
    cuda = re.search(r"list\(APPEND UNILORA_SOURCES(.*?)\)", text, re.S).group(1)
    assert "csrc/cpu_mixed.cpp" in sources.split()
    assert "csrc/cuda_mixed.cu" in cuda.split()


# ------------------------------------------------------------------ CUDA ---------------------
needs_cuda_ext = pytest.mark.skipif(
    not (INFO.get("built") and torch.cuda.is_available() and ext.build_metadata().get("cuda")),
    reason="needs the extension built with CUDA kernels and a GPU",
)


@pytest.mark.gpu
@needs_cuda_ext
@pytest.mark.parametrize("kind", ["uniform", "hashed"])
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("x_dtype", ACT_DTYPES)
@pytest.mark.parametrize("table_dtype", [torch.float32, torch.bfloat16])
def test_cuda_odd_shapes_match_oracle(kind, p, x_dtype, table_dtype):
    case = _case(**ODD, kind=kind, x_dtype=x_dtype, table_dtype=table_dtype, capacity=4, ids=[2, -1, 0, 2, 4],
                 device="cuda")
    _check_against_oracle(*case, p, kind, table_dtype, f"cuda {kind} p={p} {x_dtype}")


@pytest.mark.gpu
@needs_cuda_ext
@pytest.mark.parametrize("kind", ["uniform", "hashed"])
def test_cuda_decode_and_prefill_match_cpu(kind):
    for S, T, f, r, cap in ((64, 1, 1024, 16, 64), (4, 128, 768, 8, 3)):
        ids = [(s % cap) + 1 if s % 5 else (0 if s % 10 else -1) for s in range(S)]
        case = _case(S, T, f, f, r, 4096, kind=kind, x_dtype=torch.float32, table_dtype=torch.float32,
                     capacity=cap, ids=ids, device="cuda")
        _check_against_oracle(*case, 0.1, kind, torch.float32, f"cuda S={S} T={T}")


@pytest.mark.gpu
@needs_cuda_ext
def test_cuda_deterministic_mode_is_refused(monkeypatch):
    proj, theta, table, seq, x, out, g = _case(**ODD, kind="uniform", x_dtype=torch.float32,
                                               table_dtype=torch.float32, capacity=4, ids=[2, -1, 0, 2, 4],
                                               device="cuda")
    monkeypatch.setenv("UNILORA_DETERMINISTIC", "1")
    with pytest.raises(RuntimeError, match="no deterministic mode"):
        ext.mixed_backward(g, x, theta, table, seq, proj, 0.0, None, True, True)
    gx, gt, gtab = ext.mixed_backward(g, x, theta, table, seq, proj, 0.0, None, True, False)  # no atomics: allowed
    assert gt is None and gx.shape == x.shape


# ------------------------------------------ issue 22 item 10: maps kept, one ISA rule -----
@needs_ext
@pytest.mark.parametrize("kind", ["uniform", "hashed"])
def test_cpu_layer_maps_are_built_once_and_rebuilt_after_an_index_write(kind):
    """The element / sorted / transposed maps of a projection are built on its first mixed call and
    reused by the next forward, backward and decode; an in-place write to the indices (a version
    bump) rebuilds them, and the result follows the new indices."""
    proj, theta, table, seq, x, out, g = _case(**ODD, kind=kind, x_dtype=torch.float32,
                                               table_dtype=torch.float32, capacity=4, ids=[2, -1, 0, 2, 4])
    builds = C._mixed_map_builds
    start = builds()
    first = out.clone()
    ext.mixed_forward_(first, x, theta, table, seq, proj, 0.0, None)
    assert builds() == start + 1
    again = out.clone()
    ext.mixed_forward_(again, x, theta, table, seq, proj, 0.0, None)
    ext.mixed_backward(g, x, theta, table, seq, proj, 0.0, None, True, True)
    S = seq.shape[0]
    columns = C.decode_columns(theta, table, seq, 16)
    C.mixed_decode_(out[:S].clone(), x[:S], columns, proj.scales, proj.idx_a, proj.idx_b, proj.r,
                    list(proj.hash_params))
    assert builds() == start + 1, "the second forward, the backward and decode reuse the maps"
    assert torch.equal(first, again)
    if kind == "uniform":
        proj.idx_a[0, 0] = (proj.idx_a[0, 0] + 1) % ODD["d"]  # an in-place write: the maps must follow
        _check_against_oracle(proj, theta, table, seq, x, out.clone(), g, 0.0, kind, torch.float32, "after a write")
        assert builds() == start + 2


def _decode_kernels(monkeypatch, value):
    proj, theta, table, seq, x, out, _ = _case(5, 1, 37, 29, 3, 53, kind="uniform", x_dtype=torch.float32,
                                               table_dtype=torch.float32, capacity=4, ids=[2, -1, 0, 2, 4])
    if value is None:
        monkeypatch.delenv("UNILORA_CPU_SIMD", raising=False)
    else:
        monkeypatch.setenv("UNILORA_CPU_SIMD", value)
    columns = C.decode_columns(theta, table, seq, 16)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        C.mixed_decode_(out, x, columns, proj.scales, proj.idx_a, proj.idx_b, proj.r, [])
    return {e.name for e in prof.events() if e.name.startswith("unilora_cpu::mixed_decode")}


@needs_ext
def test_cpu_mixed_decode_takes_the_backends_isa_choice(monkeypatch):
    """UNILORA_CPU_SIMD=avx2 (or 0) keeps the decode column kernel off AVX-512, as every cpu kernel."""
    if ext.build_metadata().get("cpu_simd_isa") != "avx512":
        pytest.skip("no AVX-512F on this CPU (or UNILORA_CPU_SIMD caps it): nothing to cap")
    assert _decode_kernels(monkeypatch, None) == {"unilora_cpu::mixed_decode_avx512"}
    assert _decode_kernels(monkeypatch, "avx2") == {"unilora_cpu::mixed_decode"}
    assert _decode_kernels(monkeypatch, "0") == {"unilora_cpu::mixed_decode"}
