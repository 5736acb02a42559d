"""The compiled extension (``unilora_kernels._C``, backends ``cpu`` and ``cuda``).

* the ``cpu`` backend against the float64 oracle: tests/test_backend_contract.py (every op and
  primitive); here ``linear_autograd``, the C++ autograd op only the compiled backends have;
* UniLoRALinear and inject with backend="cpu" against the reference backend;
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
from contract import check_linear_autograd, kind_p_params
from oracle import assert_close, make_projection, oracle, random_theta
from unilora_kernels import backends, philox
from unilora_kernels import projection as P
from unilora_kernels.build_info import extension_info

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INFO = extension_info()
needs_ext = pytest.mark.skipif(not INFO.get("built"), reason=f"extension not built: {INFO.get('reason')}")
if INFO.get("built"):
    from unilora_kernels.backends import extension as ext
    C = torch.ops.unilora_C

D_SMALL = 97


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


@needs_ext
def test_lora_matrices_is_differentiable_both_ways():
    proj, theta, _ = _inputs((1, 6, 5, 2), torch.float64, "uniform")
    theta = theta.requires_grad_(True)
    args = (proj.scales, proj.idx_a, proj.idx_b, proj.r, proj.in_features, proj.out_features, [])
    assert torch.autograd.gradcheck(lambda t: C.lora_matrices(t, *args), (theta,))
    proj_h, _, _ = _inputs((1, 6, 5, 2), torch.float64, "hashed")
    dA = torch.randn(2, 6, dtype=torch.float64, requires_grad=True)
    dB = torch.randn(5, 2, dtype=torch.float64, requires_grad=True)
    sargs = (proj_h.scales, proj_h.idx_a, proj_h.idx_b, D_SMALL, list(proj_h.hash_params), torch.float64, False)
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
def test_auto_resolves_to_cpu():
    assert backends.resolve("auto", "cpu") == "cpu"


# ------------------------------------------------------------------ opcheck ------------------
def _op_samples(kind, device="cpu", p=0.0):
    M, in_f, out_f, r, d = 6, 11, 7, 3, 13
    proj = make_projection(in_f, out_f, r, d, kind, device=device)
    theta = random_theta(d, 0, device)
    x = torch.randn(M, in_f, device=device)
    out = torch.randn(M, out_f, device=device)
    g = torch.randn(M, out_f, device=device)
    hash_params = list(proj.hash_params)
    seed = torch.tensor([777]) if p > 0 else None
    common = (theta, proj.scales, proj.idx_a, proj.idx_b, r, hash_params, p, seed)
    return proj, theta, x, out, g, common, (M, in_f, out_f, r, d)


@needs_ext
@pytest.mark.parametrize("kind,p", kind_p_params(0.3))
def test_opcheck_every_cpp_op(kind, p):
    proj, theta, x, out, g, common, (M, in_f, out_f, r, d) = _op_samples(kind, p=p)
    for xs in (x, x[:2]):  # the BLAS path and the small-M path
        torch.library.opcheck(C.forward_.default, (out[: xs.shape[0]].clone(), xs) + common)
    h = C.forward_(out.clone(), x, *common)
    for grad_x, need_x, need_t in ((None, True, True), (torch.randn(M, in_f), True, False), (None, False, True)):
        torch.library.opcheck(C.backward.default, (g, x) + common + (h, grad_x, need_x, need_t, False))
    args = (proj.scales, proj.idx_a, proj.idx_b, r, in_f, out_f, list(proj.hash_params))
    torch.library.opcheck(C.lora_matrices.default, (theta.clone().requires_grad_(True),) + args)
    dA = torch.randn(r, in_f, requires_grad=True)
    dB = torch.randn(out_f, r, requires_grad=True)
    torch.library.opcheck(
        C.scatter_grad.default, (dA, dB, proj.scales, proj.idx_a, proj.idx_b, d, list(proj.hash_params), torch.float32, False)
    )
    torch.library.opcheck(C._hashed_index.default, (torch.arange(50, dtype=torch.int64), 50, 7, 99))
    torch.library.opcheck(C._philox_randint.default, (torch.arange(50, dtype=torch.int64), 5))
    # the fused linear ops (M = 6 < max(in, out): update path; 14 rows with fold_min_m = max(in, out):
    # the fold path (without dropout); fold_min_m left out: -1, never)
    w = torch.randn(out_f, in_f)
    b = torch.randn(out_f)
    fold = max(in_f, out_f)
    for xs in (x, torch.randn(14, in_f)):
        for tail in ((), (fold,)):
            torch.library.opcheck(C.linear.default, (xs, w, b, False) + common + tail)
        gs = torch.randn(xs.shape[0], out_f)
        h0 = torch.empty(0, r)
        for need_x, need_t in ((True, True), (True, False), (False, True)):
            torch.library.opcheck(C.linear_backward.default,
                                  (gs, xs, w, False) + common + (h0, need_x, need_t, False, fold))
        for bias in (b, None):
            args = (xs.clone().requires_grad_(True), w, bias, False, theta.clone().requires_grad_(True)) + common[1:]
            for tail in ((), (fold,)):
                torch.library.opcheck(C.linear_autograd.default, args + (False,) + tail)


@needs_ext
@pytest.mark.parametrize("M", [1, 3, 70])  # decode, update path, fold path (70 >= max(in, out))
@pytest.mark.parametrize("weight_t", [False, True], ids=["linear", "conv1d"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_linear_autograd_matches_oracle(M, weight_t, with_bias, p):
    check_linear_autograd(ext, "cpu", (M, 37, 53, 4), torch.float32, weight_t, with_bias, p)


@needs_ext
@pytest.mark.parametrize("kind", ["uniform", "hashed"])
@pytest.mark.parametrize("M", [1, 2, 3, 4])
def test_decode_linear_keeps_h_for_the_backward(kind, M):
    """At decode sizes (M <= cpu_small_m, no dropout) unilora_C::linear returns h = x A^T, and its
    backward reads it (two passes over the indices) or, given no rows of h, recomputes it: both
    equal the float64 oracle, for every (need_x, need_theta), and the fake kernel's shapes."""
    small = ext.build_metadata()["cpu_small_m"]
    assert M <= small
    in_f, out_f, r = 29, 23, 3
    proj, theta, _ = _inputs((M, in_f, out_f, r), torch.float32, kind)
    w = torch.randn(out_f, in_f) / in_f**0.5
    b = torch.randn(out_f)
    # a strided x (every other column of a wider tensor) and an expanded g, as sum().backward() gives
    x = torch.randn(M, 2 * in_f)[:, ::2]
    g = torch.randn(()).expand(M, out_f)
    common = (theta, proj.scales, proj.idx_a, proj.idx_b, r, list(proj.hash_params), 0.0, None)
    out, h = C.linear(x, w, b, False, *common)
    assert tuple(h.shape) == (M, r) and h.dtype == torch.float32
    ref = oracle(x, theta, proj, weight=w, bias=b, grad_out=g)
    assert_close(out, ref["out"], torch.float32, "out")
    A, _B = ext.lora_matrices(theta, proj)
    assert_close(h, x.double() @ A.double().t(), torch.float32, "h")
    for h_in in (h, torch.empty(0, r)):
        for need_x, need_t in ((True, True), (True, False), (False, True)):
            gx, gt = C.linear_backward(g, x, w, False, *common, h_in, need_x, need_t, False)
            if need_x:
                assert_close(gx, ref["grad_x"], torch.float32, f"grad_x (h rows {h_in.shape[0]})")
            if need_t:
                assert_close(gt, ref["grad_theta"], torch.float32, f"grad_theta (h rows {h_in.shape[0]})")
    torch.library.opcheck(C.linear.default, (x.contiguous(), w, b, False) + common)
    # above decode sizes no h is kept (the backward recomputes it)
    assert C.linear(torch.randn(small + 1, in_f), w, b, False, *common)[1].shape[0] == 0


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


# ------------------------------------------------------------------ tensor seeds -------------
@needs_ext
@pytest.mark.parametrize("kind", ["uniform", "hashed"])
@pytest.mark.parametrize("value", [987654321, 2**62 - 1])  # the key's high word matters too
def test_cpp_ops_take_tensor_seeds(kind, value):
    """The ops' seed is a one-element int64 tensor: forward_/backward, linear/linear_backward and
    linear_autograd draw the mask of the seed's value (the float64 oracle's philox.dropout_keep),
    the same bits as a Python int through the backend functions."""
    M, in_f, out_f, r, p = 9, 21, 13, 3, 0.35
    proj, theta, x = _inputs((M, in_f, out_f, r), torch.float32, kind)
    base, g = torch.randn(M, out_f), torch.randn(M, out_f)
    seed = torch.tensor([value])
    common = (theta, proj.scales, proj.idx_a, proj.idx_b, r, list(proj.hash_params), p, seed)
    ref = oracle(x, theta, proj, base_out=base, p=p, seed=value, grad_out=g)
    out = base.clone()
    h = C.forward_(out, x, *common)
    gx, gt = C.backward(g, x, *common, h, None, True, True, False)
    for got, what in ((out, "out"), (gx, "grad_x"), (gt, "grad_theta")):
        assert_close(got, ref[what], torch.float32, what)
    out_int = base.clone()
    assert torch.equal(ext.forward_(out_int, x, theta, proj, p, value), h) and torch.equal(out_int, out)
    assert torch.equal(ext.backward(g, x, theta, proj, p, value, h, None, True, True)[1], gt)
    w, b = torch.randn(out_f, in_f) / in_f**0.5, torch.randn(out_f)
    ref = oracle(x, theta, proj, weight=w, bias=b, p=p, seed=value, grad_out=g)
    out, h = C.linear(x, w, b, False, *common)
    gx, gt = C.linear_backward(g, x, w, False, *common, h, True, True, False)
    for got, what in ((out, "out"), (gx, "grad_x"), (gt, "grad_theta")):
        assert_close(got, ref[what], torch.float32, "linear " + what)
    xa, ta = x.clone().requires_grad_(True), theta.clone().requires_grad_(True)
    out = C.linear_autograd(xa, w, b, False, ta, *common[1:], False)
    gx, gt = torch.autograd.grad(out, [xa, ta], g)
    for got, what in ((out, "out"), (gx, "grad_x"), (gt, "grad_theta")):
        assert_close(got, ref[what], torch.float32, "linear_autograd " + what)


@needs_ext
def test_seed_arguments_are_checked():
    proj, theta, x = _inputs((3, 9, 5, 2), torch.float32, "uniform")
    out = torch.zeros(3, 5)
    args = (x, theta, proj.scales, proj.idx_a, proj.idx_b, 2, [], 0.5)
    with pytest.raises(RuntimeError, match=r"dropout p = 0.5 > 0 needs a seed"):
        C.forward_(out, *args, None)
    for bad in (torch.tensor([1, 2]), torch.tensor([1], dtype=torch.int32), torch.tensor(1.0)):
        with pytest.raises(RuntimeError, match="the dropout seed must be a one-element int64 tensor"):
            C.forward_(out, *args, bad)
    C.forward_(out, *args[:-1], 0.0, torch.tensor([1, 2]))  # no dropout: the seed is not looked at
    # A CPU call reads its seed on the host: a seed on another device is refused, by the backend
    # before the call and by the C++ op itself (called on its CPU kernel: a seed on another device
    # would route the dispatcher elsewhere, to the fake kernel for this meta seed).
    off_cpu = torch.tensor([1], device="meta")
    with pytest.raises(ValueError, match="dropout seed of a CPU call must be a CPU tensor"):
        ext.forward_(out, x, theta, proj, 0.5, off_cpu)
    with pytest.raises(RuntimeError, match="a CPU op reads its dropout seed on the host, so it must be a CPU tensor"):
        C.forward_.default.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CPU), out, *args, off_cpu)


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
            h = C.forward_(out, torch.ones(M, in_f), theta, *proj, 1, [], p, torch.tensor([4242]))
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
    common = (proj.scales, proj.idx_a, proj.idx_b, 2, [], 0.0, None)
    with pytest.raises(RuntimeError, match="out must be contiguous"):
        C.forward_(torch.zeros(5, 3).t(), x, theta, *common)
    with pytest.raises(RuntimeError, match="idx_a must be int32"):
        C.forward_(out, x, theta, proj.scales, proj.idx_a.long(), proj.idx_b, 2, [], 0.0, None)
    bad = proj.idx_a.clone()
    bad[1, 3] = D_SMALL  # one index past the end of theta_d
    with pytest.raises(RuntimeError, match=r"outside \[0, d = 97\)"):
        C.forward_(out, x, theta, proj.scales, bad, proj.idx_b, 2, [], 0.0, None)
    with pytest.raises(RuntimeError, match=r"outside \[0, d = 97\)"):
        C.forward_(torch.zeros(300, 5), torch.randn(300, 9), theta, proj.scales, bad, proj.idx_b, 2, [], 0.0, None)
    with pytest.raises(RuntimeError, match="does not fit D"):
        C.forward_(out, x, theta, P.hashed_scales(10, 97), proj.idx_a, proj.idx_b, 2, [10, 0, 1], 0.0, None)
    with pytest.raises(RuntimeError, match="dropout probability"):
        C.forward_(out, x, theta, proj.scales, proj.idx_a, proj.idx_b, 2, [], 1.5, None)
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
    for needle in ("decode_kernel", "gather_kernel", "prepare_kernel", "scatter_atomic_kernel",
                   "scatter_sorted_kernel"):
        assert any(needle in k for k in kernels), f"{needle} missing from the build log"
    spills = [(n, a, s, l) for n, a, _, s, l in entries if int(s) or int(l)]
    assert not spills, f"ptxas reports spills: {spills[:5]}"
