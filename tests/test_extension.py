"""The compiled extension (``unilora_kernels._C``, backends ``cpu`` and ``cuda``).

* the ``cpu`` backend module against the float64 oracle: odd shapes, every dtype, dropout with
  the oracle's mask, uniform and hashed projections, grad_x accumulated in place or fresh;
* the public API (ops, UniLoRALinear, inject) with backend="cpu" against the reference backend,
  and gradcheck in float64;
* torch.library.opcheck of every C++ op;
* the header's index and dropout math bit for bit against projection.py and philox.py;
* clear errors for bad inputs;
* build_info() and, when CI left it, the pip build log (sm_80 + sm_90, ptxas: no spills);
* CUDA tests (``gpu`` marker) with the same checks on CUDA tensors at real sizes.
"""

from __future__ import annotations

import copy
import os
import re

import pytest
import torch
from torch import nn

import unilora_kernels as uk
from oracle import TOL, assert_close, make_projection, oracle, random_theta
from unilora_kernels import backends, ops, philox
from unilora_kernels import projection as P
from unilora_kernels.build_info import extension_info

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INFO = extension_info()
needs_ext = pytest.mark.skipif(not INFO.get("built"), reason=f"extension not built: {INFO.get('reason')}")
if INFO.get("built"):
    from unilora_kernels.backends import extension as ext
    C = torch.ops.unilora_C

# M in {1, 3, 17, 64, 300}; in/out multiples of nothing; r in {1, 3, 4, 16, 64}
SHAPES = [(1, 37, 53, 1), (3, 37, 53, 3), (17, 45, 91, 4), (64, 29, 31, 16), (300, 61, 19, 64), (1, 130, 70, 64)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
D_SMALL = 97


def _tol_dtype(dtype, kind):
    # Scales are fp32 tensors by design; the oracle's hashed scale is an exact fp64 rsqrt, so fp64
    # runs of the hashed projection agree to fp32 precision only (true of every backend).
    return torch.float32 if dtype == torch.float64 and kind == "hashed" else dtype


def _seed(p):
    return 987654321 if p > 0 else None


def _inputs(shape, dtype, kind, device="cpu", extra_layers=1):
    M, in_f, out_f, r = shape
    proj = make_projection(in_f, out_f, r, D_SMALL, kind, seed=1, device=device, extra_layers=extra_layers)
    theta = random_theta(D_SMALL, 3, device)
    if dtype == torch.float64:
        theta = theta.double()
    x = torch.randn(M, in_f, device=device).to(dtype)
    return proj, theta, x


# ------------------------------------------------------------------ backend module vs oracle --
@needs_ext
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "M%d-in%d-out%d-r%d" % s)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["uniform", "hashed"])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_cpu_backend_matches_oracle(shape, dtype, kind, p):
    M, in_f, out_f, r = shape
    proj, theta, x = _inputs(shape, dtype, kind)
    seed = _seed(p)
    base = torch.randn(M, out_f).to(dtype)
    g = torch.randn(M, out_f).to(dtype)
    ref = oracle(x, theta, proj, base_out=base, p=p, seed=seed, grad_out=g)
    tol = _tol_dtype(dtype, kind)

    out = base.clone()
    h = ext.forward_(out, x, theta, proj, p, seed)
    assert h.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) and h.shape == (M, r)
    assert_close(out, ref["out"], tol, "out")

    gx, gt = ext.backward(g, x, theta, proj, p, seed, h, None, True, True)
    assert gx.dtype == dtype and gt.dtype == theta.dtype and gt.shape == theta.shape
    assert_close(gx, ref["grad_x"], tol, "grad_x")
    assert_close(gt, ref["grad_theta"], tol, "grad_theta")

    # grad_x accumulated in place into a given tensor (the fused linear op passes g W there)
    acc = torch.randn(M, in_f).to(dtype)
    expected = acc.double() + ref["grad_x"]
    gx2, gt2 = ext.backward(g, x, theta, proj, p, seed, h, acc, True, False)
    assert gx2 is acc and gt2 is None
    assert_close(acc, expected, tol, "grad_x in place")
    gx3, gt3 = ext.backward(g, x, theta, proj, p, seed, h, None, False, True)
    assert gx3 is None
    assert_close(gt3, ref["grad_theta"], tol, "grad_theta alone")


@needs_ext
@pytest.mark.parametrize("kind", ["uniform", "hashed"])
def test_lora_matrices_and_low_precision_output(kind):
    shape = (5, 33, 21, 3)
    proj, theta, x = _inputs(shape, torch.bfloat16, kind)
    A, B = ext.lora_matrices(theta, proj)
    from oracle import lora_AB64

    A64, B64 = lora_AB64(theta.double(), proj)
    assert A.dtype == B.dtype == torch.float32
    assert_close(A, A64, torch.float32, "A")
    assert_close(B, B64, torch.float32, "B")
    # an fp32 output with bf16 activations (mixed dtypes: h in fp32, one rounding)
    base = torch.randn(5, 21)
    out = base.clone()
    ext.forward_(out, x, theta, proj, 0.0, None)
    assert_close(out, oracle(x, theta, proj, base_out=base)["out"], torch.bfloat16, "fp32 out, bf16 x")


@needs_ext
def test_lora_matrices_is_differentiable_both_ways():
    proj, theta, _ = _inputs((1, 6, 5, 2), torch.float64, "uniform")
    theta = theta.requires_grad_(True)
    args = (proj.scales, proj.idx_a, proj.idx_b, proj.r, proj.in_features, proj.out_features, [])
    assert torch.autograd.gradcheck(lambda t: C.lora_matrices(t, *args), (theta,))
    proj_h, _, _ = _inputs((1, 6, 5, 2), torch.float64, "hashed")
    dA = torch.randn(2, 6, dtype=torch.float64, requires_grad=True)
    dB = torch.randn(5, 2, dtype=torch.float64, requires_grad=True)
    sargs = (proj_h.scales, proj_h.idx_a, proj_h.idx_b, D_SMALL, list(proj_h.hashed), torch.float64, False)
    assert torch.autograd.gradcheck(lambda a, b: C.scatter_grad(a, b, *sargs), (dA, dB))


# ------------------------------------------------------------------ public API ---------------
@needs_ext
@pytest.mark.parametrize("kind", ["uniform", "hashed"])
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_layer_and_inject_match_reference(kind, p):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(23, 31), nn.ReLU(), nn.Linear(31, 17), nn.ReLU(), nn.Linear(17, 9))
    twins = {}
    for backend in ("cpu", "reference"):
        m = uk.inject(copy.deepcopy(model), r=3, theta_d_length=101, target_modules=["0", "2", "4"],
                      projection=kind, unilora_dropout=p, backend=backend)
        with torch.no_grad():
            m.unilora_theta_d.uniform_(-1, 1, generator=torch.Generator().manual_seed(5))
        twins[backend] = m.train()
    x = torch.randn(4, 7, 23)
    results = {}
    for backend, m in twins.items():
        torch.manual_seed(11)  # same dropout seeds in both models
        xb = x.clone().requires_grad_(True)
        y = m(xb)
        y.square().sum().backward()
        results[backend] = (y.detach(), xb.grad, m.unilora_theta_d.grad)
    for a, b, what in zip(results["cpu"], results["reference"], ("out", "grad_x", "grad_theta")):
        assert_close(a, b.double(), torch.float32, what)
    layer = twins["cpu"][0]
    assert layer.resolved_backend() == "cpu"
    A, B = layer.lora_matrices()
    Ar, Br = twins["reference"][0].lora_matrices()
    assert torch.equal(A, Ar) and torch.equal(B, Br)  # the same gather, bit for bit


@needs_ext
def test_auto_resolves_to_cpu_and_strided_3d_input():
    assert backends.resolve("auto", "cpu") == "cpu"
    proj, theta, _ = _inputs((1, 40, 24, 4), torch.float32, "uniform")
    big = torch.randn(2, 5, 80)
    x = big[..., :40]  # row-strided 3-D input
    w, b = torch.randn(24, 40), torch.randn(24)
    out = ops.linear(x, w, b, theta, proj.scales, proj.idx_a, proj.idx_b, backend="cpu")
    ref = oracle(x, theta, proj, weight=w, bias=b)
    assert_close(out, ref["out"], torch.float32, "strided 3-D")


@needs_ext
@pytest.mark.parametrize("kind", ["uniform", "hashed"])
@pytest.mark.parametrize("p", [0.0, 0.4])
def test_gradcheck_float64_through_public_op(kind, p):
    M, in_f, out_f, r, d = 5, 6, 4, 3, 7  # M > 4: the BLAS path; M = 1 below: the small-M path
    proj = make_projection(in_f, out_f, r, d, kind)
    seed = torch.tensor([12345], dtype=torch.int64) if p > 0 else None
    w = torch.randn(out_f, in_f, dtype=torch.float64)
    theta = torch.randn(d, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(out_f, dtype=torch.float64, requires_grad=True)
    for rows in (M, 1):
        x = torch.randn(rows, in_f, dtype=torch.float64, requires_grad=True)

        def f(x, bias, theta):
            return ops.linear(x, w, bias, theta, proj.scales, proj.idx_a, proj.idx_b, r=r, hashed=proj.hashed,
                              dropout_p=p, seed=seed, backend="cpu")

        assert torch.autograd.gradcheck(f, (x, bias, theta))


# ------------------------------------------------------------------ opcheck ------------------
def _op_samples(kind, device="cpu", p=0.0):
    M, in_f, out_f, r, d = 6, 11, 7, 3, 13
    proj = make_projection(in_f, out_f, r, d, kind, device=device)
    theta = random_theta(d, 0, device)
    x = torch.randn(M, in_f, device=device)
    out = torch.randn(M, out_f, device=device)
    g = torch.randn(M, out_f, device=device)
    hashed = list(proj.hashed)
    seed = 777 if p > 0 else 0
    common = (theta, proj.scales, proj.idx_a, proj.idx_b, r, hashed, p, seed)
    return proj, theta, x, out, g, common, (M, in_f, out_f, r, d)


@needs_ext
@pytest.mark.parametrize("kind", ["uniform", "hashed"])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_opcheck_every_cpp_op(kind, p):
    proj, theta, x, out, g, common, (M, in_f, out_f, r, d) = _op_samples(kind, p=p)
    for xs in (x, x[:2]):  # the BLAS path and the small-M path
        torch.library.opcheck(C.forward_.default, (out[: xs.shape[0]].clone(), xs) + common)
    h = C.forward_(out.clone(), x, *common)
    for grad_x, need_x, need_t in ((None, True, True), (torch.randn(M, in_f), True, False), (None, False, True)):
        torch.library.opcheck(C.backward.default, (g, x) + common + (h, grad_x, need_x, need_t, False))
    args = (proj.scales, proj.idx_a, proj.idx_b, r, in_f, out_f, list(proj.hashed))
    torch.library.opcheck(C.lora_matrices.default, (theta.clone().requires_grad_(True),) + args)
    dA = torch.randn(r, in_f, requires_grad=True)
    dB = torch.randn(out_f, r, requires_grad=True)
    torch.library.opcheck(
        C.scatter_grad.default, (dA, dB, proj.scales, proj.idx_a, proj.idx_b, d, list(proj.hashed), torch.float32, False)
    )
    torch.library.opcheck(C._hashed_index.default, (torch.arange(50, dtype=torch.int64), 50, 7, 99))
    torch.library.opcheck(C._philox_randint.default, (torch.arange(50, dtype=torch.int64), 5))
    # the fused linear ops (M = 6 < max(in, out): update path; 14 rows: the fold path)
    w = torch.randn(out_f, in_f)
    b = torch.randn(out_f)
    for xs in (x, torch.randn(14, in_f)):
        torch.library.opcheck(C.linear.default, (xs, w, b, False) + common)
        gs = torch.randn(xs.shape[0], out_f)
        h0 = torch.empty(0, r)
        for need_x, need_t in ((True, True), (True, False), (False, True)):
            torch.library.opcheck(C.linear_backward.default, (gs, xs, w, False) + common + (h0, need_x, need_t, False))
        for bias in (b, None):
            args = (xs.clone().requires_grad_(True), w, bias, False, theta.clone().requires_grad_(True)) + common[1:]
            torch.library.opcheck(C.linear_autograd.default, args + (False,))


@needs_ext
@pytest.mark.parametrize("M", [1, 3, 70])  # decode, update path, fold path (70 >= max(in, out))
@pytest.mark.parametrize("weight_t", [False, True], ids=["linear", "conv1d"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_linear_autograd_matches_oracle(M, weight_t, with_bias, p):
    """unilora_C::linear_autograd (autograd in C++, what UniLoRALinear trains with on cpu/cuda):
    output and the gradients of x, theta, a trainable weight and bias against the oracle; the
    same output below autograd (inference mode)."""
    in_f, out_f, r = 37, 53, 4
    proj = make_projection(in_f, out_f, r, D_SMALL, "uniform", seed=1, extra_layers=1)
    theta = random_theta(D_SMALL, 3).requires_grad_(True)
    w = ((torch.randn(in_f, out_f) if weight_t else torch.randn(out_f, in_f)) / in_f**0.5).requires_grad_(True)
    b = torch.randn(out_f).requires_grad_(True) if with_bias else None
    x = torch.randn(M, in_f).requires_grad_(True)
    g = torch.randn(M, out_f)
    seed = _seed(p)
    out = ext.linear_autograd(x, w, b, weight_t, theta, proj, p, seed)
    ref = oracle(x, theta, proj, weight=w, bias=b, weight_t=weight_t, p=p, seed=seed, grad_out=g)
    assert_close(out, ref["out"], torch.float32, "out")
    inputs = [x, w, theta] + ([b] if with_bias else [])
    grads = torch.autograd.grad(out, inputs, g)
    assert_close(grads[0], ref["grad_x"], torch.float32, "grad_x")
    gw = (x.double().t() @ g.double()) if weight_t else (g.double().t() @ x.double())
    assert_close(grads[1], gw, torch.float32, "grad_weight")
    assert_close(grads[2], ref["grad_theta"], torch.float32, "grad_theta")
    if with_bias:
        assert_close(grads[3], ref["grad_bias"], torch.float32, "grad_bias")
    # frozen base: only x and theta get gradients
    out2 = ext.linear_autograd(x, w.detach(), None if b is None else b.detach(), weight_t, theta, proj, p, seed)
    gx2, gt2 = torch.autograd.grad(out2, [x, theta], g)
    assert torch.equal(gx2, grads[0]) and torch.equal(gt2, grads[2])
    with torch.inference_mode():
        out3 = ext.linear_autograd(x.detach(), w.detach(), None if b is None else b.detach(), weight_t,
                                   theta.detach(), proj, p, seed)
    assert torch.equal(out3, out.detach())


@needs_ext
@pytest.mark.parametrize("p", [0.0, 0.4])
def test_linear_autograd_gradcheck(p):
    proj = make_projection(9, 6, 2, 11, "uniform", seed=2)
    x = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 9, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)
    theta = torch.randn(11, dtype=torch.float64, requires_grad=True)
    seed = _seed(p)
    assert torch.autograd.gradcheck(lambda x, w, b, t: ext.linear_autograd(x, w, b, False, t, proj, p, seed),
                                    (x, w, b, theta))


# ------------------------------------------------------------------ bit-exact header ---------
@needs_ext
@pytest.mark.parametrize("D", [1, 2, 3, 4, 5, 16, 17, 1000, 4096, 65537, 23_040 * 11 + 5, 2**31 - 1])
def test_hashed_index_bit_exact(D):
    g = torch.Generator().manual_seed(D % 1000)
    pos = torch.randint(0, D, (4000,), generator=g, dtype=torch.int64)
    pos = torch.cat([pos, torch.tensor([0, D - 1], dtype=torch.int64)])
    for d in (1, 7, 23_040, max(1, D - 1)):
        for key in (0, P.splitmix64(42), 2**63 - 1):
            expected = P.hashed_index(pos, D, d, key)
            assert torch.equal(C._hashed_index(pos, D, d, key), expected), (D, d, key)
    small = torch.arange(min(D, 5000), dtype=torch.int64)  # every position of a small D
    assert torch.equal(C._hashed_index(small, D, 3, 12345), P.hashed_index(small, D, 3, 12345))


@needs_ext
def test_philox_and_dropout_mask_bit_exact():
    g = torch.Generator().manual_seed(0)
    offsets = torch.cat([
        torch.arange(3000, dtype=torch.int64),
        torch.randint(0, 2**62, (3000,), generator=g, dtype=torch.int64),
        torch.tensor([2**32 - 1, 2**32, 2**32 + 1, 2**63 - 1], dtype=torch.int64),
    ])
    for seed in (0, 1, 987654321, 2**32 + 7, 2**62 - 1, philox.new_seed().item()):
        assert torch.equal(C._philox_randint(offsets, seed), philox.philox_randint(seed, offsets)), seed
    # the keep decision itself: forward_ on x = 1, A = e_k picks out the mask element by element
    M, in_f = 7, 19
    for p in (0.1, 0.5, 0.9):
        keep = philox.dropout_keep(4242, M, in_f, p)
        for c in (0, 5, 18):
            proj = _unit_projection(in_f, c)
            theta = torch.ones(2)
            out = torch.zeros(M, 1)
            h = C.forward_(out, torch.ones(M, in_f), theta, *proj, 1, [], p, 4242)
            assert torch.equal(h[:, 0] != 0, keep[:, c]), (p, c)


def _unit_projection(in_f, c):
    """d = 2, theta = [1, 1], scales = [1, 0]: A = e_c (every other column reads the zero scale), B = 1."""
    scales = torch.tensor([1.0, 0.0])
    idx_a = torch.ones(1, in_f, dtype=torch.int32)
    idx_a[0, c] = 0
    idx_b = torch.zeros(1, 1, dtype=torch.int32)
    return scales, idx_a, idx_b


# ------------------------------------------------------------------ errors -------------------
@needs_ext
def test_bad_inputs_raise_clear_errors():
    proj, theta, x = _inputs((3, 9, 5, 2), torch.float32, "uniform")
    out = torch.zeros(3, 5)
    with pytest.raises(TypeError, match="theta_d must be float32"):
        ext.forward_(out, x, theta.half(), proj, 0.0, None)
    with pytest.raises(ValueError, match=r"x must be \(M, 9\)"):
        ext.forward_(out, x[:, :8], theta, proj, 0.0, None)
    with pytest.raises(ValueError, match="needs a seed"):
        ext.forward_(out, x, theta, proj, 0.5, None)
    common = (proj.scales, proj.idx_a, proj.idx_b, 2, [], 0.0, 0)
    with pytest.raises(RuntimeError, match="out must be contiguous"):
        C.forward_(torch.zeros(5, 3).t(), x, theta, *common)
    with pytest.raises(RuntimeError, match="idx_a must be int32"):
        C.forward_(out, x, theta, proj.scales, proj.idx_a.long(), proj.idx_b, 2, [], 0.0, 0)
    bad = proj.idx_a.clone()
    bad[1, 3] = D_SMALL  # one index past the end of theta_d
    with pytest.raises(RuntimeError, match=r"outside \[0, d = 97\)"):
        C.forward_(out, x, theta, proj.scales, bad, proj.idx_b, 2, [], 0.0, 0)
    with pytest.raises(RuntimeError, match=r"outside \[0, d = 97\)"):
        C.forward_(torch.zeros(300, 5), torch.randn(300, 9), theta, proj.scales, bad, proj.idx_b, 2, [], 0.0, 0)
    with pytest.raises(RuntimeError, match="does not fit D"):
        C.forward_(out, x, theta, P.hashed_scales(10, 97), proj.idx_a, proj.idx_b, 2, [10, 0, 1], 0.0, 0)
    with pytest.raises(RuntimeError, match="dropout probability"):
        C.forward_(out, x, theta, proj.scales, proj.idx_a, proj.idx_b, 2, [], 1.5, 0)
    with pytest.raises(RuntimeError, match="theta_d must be contiguous"):
        C.forward_(out, x, torch.randn(2 * D_SMALL)[::2], *common)
    assert ext.unavailable_reason("cpu") is None


# ------------------------------------------------------------------ build ---------------------
def test_build_info_reports_the_extension():
    info = uk.build_info()["extension"]
    assert info["built"], f"unilora_kernels._C is not built: {info.get('reason')} (pip install --no-build-isolation .)"
    assert isinstance(info["cuda"], bool) and isinstance(info["openmp"], bool)
    assert info["torch_version"].split("+")[0] == torch.__version__.split("+")[0]
    if info["cuda"]:
        assert info["archs"], "a CUDA build must list its archs"
        assert all(re.fullmatch(r"\d+\.\d+(\+PTX)?", a) for a in info["archs"]), info["archs"]
    else:
        assert info["archs"] == []


BUILD_LOG = os.path.join(ROOT, "build", "logs", "pip-install.log")


def test_ci_build_log_sm80_sm90_no_spills():
    """CI (scripts/install.sh) keeps the pip build log with ptxas -v output: check it."""
    if not os.path.exists(BUILD_LOG):
        pytest.skip(f"no CI build log at {BUILD_LOG} (scripts/install.sh writes it)")
    text = open(BUILD_LOG, errors="replace").read()
    entries = re.findall(r"Compiling entry function '([^']+)' for 'sm_(\d+)'\s*\n.*?\n?\s*(\d+) bytes stack frame, "
                         r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    if not entries:
        if "CppExtension" in text or "nvcc" not in text:
            pytest.skip("the CI build was CPU-only (no nvcc): nothing to check")
        pytest.fail("the build log has no ptxas -v output (UNILORA_PTXAS_VERBOSE=1 adds -Xptxas=-v)")
    archs = {a for _, a, *_ in entries}
    assert {"80", "90"} <= archs, f"kernels compiled for sm_{sorted(archs)}, expected sm_80 and sm_90"
    kernels = {name for name, *_ in entries}
    for needle in ("decode_kernel", "gather_kernel", "scatter_atomic_kernel", "scatter_sorted_kernel"):
        assert any(needle in k for k in kernels), f"{needle} missing from the build log"
    spills = [(n, a, s, l) for n, a, _, s, l in entries if int(s) or int(l)]
    assert not spills, f"ptxas reports spills: {spills[:5]}"
