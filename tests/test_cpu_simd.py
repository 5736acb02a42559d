"""The CPU backend's hand-vectorised paths (csrc/cpu_simd.cpp) against the float64 oracle.

Each case runs with UNILORA_CPU_SIMD=0 (the BLAS path), =avx2 (the AVX2 kernels) and unset
(the AVX-512 backward where the CPU has AVX-512F); every path must match the oracle.
Paths covered, on shapes that are multiples of no vector width or block:

* decode_linear: the fused base GEMV + update of fp32 nn.Linear layers at M <= 4;
* the fold W + B A (both weight layouts, r <= 16 and the GEMM fallback above);
* the one-pass backward (h, u = g B, dA, dB, grad_x fresh or accumulated, strided rows);
* an out-of-range index still raises on the fused path.
"""

from __future__ import annotations

import pytest
import torch

from oracle import assert_close, make_projection, oracle, random_theta
from unilora_kernels.build_info import extension_info

INFO = extension_info()
pytestmark = pytest.mark.skipif(not INFO.get("built"), reason=f"extension not built: {INFO.get('reason')}")
if INFO.get("built"):
    from unilora_kernels.backends import extension as ext

D = 97


def _simd_modes():
    modes = [pytest.param("0", id="blas")]
    meta = ext.build_metadata() if INFO.get("built") else {}
    no_simd = pytest.mark.skipif(not meta.get("cpu_simd", False), reason=(
        "the SIMD kernels do not run here (no AVX2+FMA, not x86-64, or UNILORA_CPU_SIMD=0)"))
    modes.append(pytest.param("avx2", id="avx2", marks=no_simd))
    modes.append(pytest.param("1", id="widest", marks=[no_simd, pytest.mark.skipif(
        meta.get("cpu_simd_isa") != "avx512", reason="no AVX-512F on this CPU: the widest kernels are the AVX2 ones")]))
    return modes


@pytest.fixture(params=_simd_modes())
def simd(request, monkeypatch):
    monkeypatch.setenv("UNILORA_CPU_SIMD", request.param)
    return request.param


def _layer(in_f, out_f, r, dtype, weight_t, with_bias, kind="uniform"):
    proj = make_projection(in_f, out_f, r, D, kind, seed=3, extra_layers=1)
    theta = random_theta(D, 5).to(torch.float64 if dtype == torch.float64 else torch.float32)
    w = (torch.randn(in_f, out_f) if weight_t else torch.randn(out_f, in_f)).to(dtype) / in_f**0.5
    b = torch.randn(out_f).to(dtype) if with_bias else None
    return proj, theta, w, b


def _check_linear(x, proj, theta, w, b, weight_t, dtype, what):
    g = torch.randn(x.shape[0], w.shape[1] if weight_t else w.shape[0]).to(dtype)
    ref = oracle(x, theta, proj, weight=w, bias=b, weight_t=weight_t, grad_out=g)
    out, _ = ext.linear(x, w, b, weight_t, theta, proj, 0.0, None)
    assert_close(out, ref["out"], dtype, f"{what}: out")
    gx, gt = ext.linear_backward(g, x, w, weight_t, theta, proj, 0.0, None, torch.empty(0, proj.r), True, True)
    assert_close(gx, ref["grad_x"], dtype, f"{what}: grad_x")
    assert_close(gt, ref["grad_theta"], dtype, f"{what}: grad_theta")
    gx_only, _ = ext.linear_backward(g, x, w, weight_t, theta, proj, 0.0, None, torch.empty(0, proj.r), True, False)
    assert_close(gx_only, ref["grad_x"], dtype, f"{what}: grad_x alone")
    _, gt_only = ext.linear_backward(g, x, w, weight_t, theta, proj, 0.0, None, torch.empty(0, proj.r), False, True)
    assert_close(gt_only, ref["grad_theta"], dtype, f"{what}: grad_theta alone")


# M = 1..4: decode_linear (fp32 nn.Linear); 5 and 21: the per-block path; 67 >= max(in, out): the fold.
@pytest.mark.parametrize("M", [1, 2, 3, 4, 5, 21, 67])
@pytest.mark.parametrize("in_f,out_f,r", [(37, 53, 4), (45, 13, 3), (19, 61, 1), (33, 29, 17)],
                         ids=lambda v: str(v))
@pytest.mark.parametrize("weight_t", [False, True], ids=["linear", "conv1d"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_linear_fp32_matches_oracle(simd, M, in_f, out_f, r, weight_t, with_bias):
    proj, theta, w, b = _layer(in_f, out_f, r, torch.float32, weight_t, with_bias)
    x = torch.randn(M, in_f)
    _check_linear(x, proj, theta, w, b, weight_t, torch.float32, f"M={M}")


def _check_fused_linear(x, g, theta, proj, w, b):
    """ext.linear and ext.linear_backward against the oracle, held to fp32 precision."""
    ref = oracle(x, theta, proj, weight=w, bias=b, grad_out=g)
    out, _ = ext.linear(x, w, b, False, theta, proj, 0.0, None)
    assert_close(out, ref["out"], torch.float32, "out")
    gx, gt = ext.linear_backward(g, x, w, False, theta, proj, 0.0, None, torch.empty(0, proj.r), True, True)
    assert_close(gx, ref["grad_x"], torch.float32, "grad_x")
    assert_close(gt, ref["grad_theta"], torch.float32, "grad_theta")


@pytest.mark.parametrize("M", [1, 4, 70])
def test_linear_fp64_fold_and_hashed(simd, M):
    proj, theta, w, b = _layer(31, 47, 5, torch.float64, False, True, kind="hashed")
    x = torch.randn(M, 31, dtype=torch.float64)
    g = torch.randn(M, 47, dtype=torch.float64)
    # hashed scales are fp32 by design: fp64 runs agree to fp32 precision (see test_extension)
    _check_fused_linear(x, g, theta, proj, w, b)


@pytest.mark.parametrize("M", [1, 3, 9, 130])
def test_strided_rows_and_hashed_projection(simd, M):
    """x and g as column slices of wider tensors (row stride != width), hashed projection."""
    proj, theta, w, b = _layer(43, 35, 4, torch.float32, False, True, kind="hashed")
    x = torch.randn(M, 50)[:, 3:46]
    g = torch.randn(M, 40)[:, 2:37]
    assert x.stride(0) == 50 and g.stride(0) == 40
    _check_fused_linear(x, g, theta, proj, w, b)


@pytest.mark.parametrize("M", [2, 7, 66])
def test_backward_with_saved_h_and_accumulated_grad_x(simd, M):
    """The add_update path: h from the forward, grad_x added into a given tensor."""
    proj, theta, _, _ = _layer(39, 27, 6, torch.float32, False, False)
    x = torch.randn(M, 39)
    base = torch.randn(M, 27)
    g = torch.randn(M, 27)
    ref = oracle(x, theta, proj, base_out=base, grad_out=g)
    out = base.clone()
    h = ext.forward_(out, x, theta, proj, 0.0, None)
    assert_close(out, ref["out"], torch.float32, "out")
    acc = torch.randn(M, 39)
    expected = acc.double() + ref["grad_x"]
    gx, gt = ext.backward(g, x, theta, proj, 0.0, None, h, acc, True, True)
    assert gx is acc
    assert_close(acc, expected, torch.float32, "grad_x in place")
    assert_close(gt, ref["grad_theta"], torch.float32, "grad_theta")


def test_simd_and_blas_paths_agree_at_a_real_size(monkeypatch):
    """1024 x 1024, r = 4 (the benchmark's layer) at M = 1 and 2048: both paths, same results."""
    if not ext.build_metadata().get("cpu_simd", False):
        pytest.skip("this CPU has no AVX2+FMA: only the BLAS path runs here")
    proj, theta, w, b = _layer(1024, 1024, 4, torch.float32, False, True)
    results = {}
    for mode in ("1", "avx2", "0"):
        monkeypatch.setenv("UNILORA_CPU_SIMD", mode)
        torch.manual_seed(0)
        for M in (1, 2048):
            x, g = torch.randn(M, 1024), torch.randn(M, 1024)
            out, _ = ext.linear(x, w, b, False, theta, proj, 0.0, None)
            gx, gt = ext.linear_backward(g, x, w, False, theta, proj, 0.0, None, torch.empty(0, 4), True, True)
            results[mode, M] = (out, gx, gt)
    for M in (1, 2048):
        for mode in ("1", "avx2"):
            for a, c, name in zip(results[mode, M], results["0", M], ("out", "grad_x", "grad_theta")):
                err = (a.double() - c.double()).abs().max().item() / max(1.0, c.abs().max().item())
                assert err < 1e-5, f"M={M} {name}: UNILORA_CPU_SIMD={mode} and the blas path differ by {err:.2e}"


def test_out_of_range_index_raises_on_the_decode_path(simd):
    proj, theta, w, b = _layer(37, 53, 4, torch.float32, False, True)
    bad_a = proj.idx_a.clone()
    bad_a[1, 5] = D + 3
    bad = proj._replace(idx_a=bad_a)
    with pytest.raises(RuntimeError, match=r"outside \[0, d = 97\)"):
        ext.linear(torch.randn(1, 37), w, b, False, theta, bad, 0.0, None)
    bad_b = proj.idx_b.clone()
    bad_b[7, 0] = -1
    with pytest.raises(RuntimeError, match=r"outside \[0, d = 97\)"):
        ext.linear(torch.randn(2, 37), w, b, False, theta, proj._replace(idx_b=bad_b), 0.0, None)


def test_build_metadata_reports_the_simd_kernels():
    meta = ext.build_metadata()
    assert isinstance(meta.get("cpu_simd"), bool)
    assert meta["cpu_simd_isa"] in (("avx512", "avx2") if meta["cpu_simd"] else ("none",))
    import platform

    if platform.machine() not in ("x86_64", "AMD64"):
        assert meta["cpu_simd"] is False
