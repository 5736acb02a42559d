"""The backend contract: every backend against the float64 oracle (tests/oracle.py).

Backends: ``reference``, ``cpu`` (the compiled extension), ``triton`` (on CPU tensors through the
interpreter with the GPU tile configs, so masks, K loops and split reductions are the ones a GPU
runs; on CUDA tensors where there is a GPU) and ``cuda`` (``gpu`` marker). Each case checks the
output and every gradient (x, theta_d, bias, base output) on odd shapes, 2-D and 3-D inputs, every
activation dtype the backend takes, uniform and hashed projections, dropout on and off. Tolerances
are ``oracle.TOL`` per dtype (``oracle.tolerance_dtype``).

The quick run (``pytest -m "not slow"``) takes a covering set: every pair of levels of any two
factors (shape, dtype, projection, dropout, input rank, op variant) occurs in some case
(``contract.pairwise_rows``). The full run (plain ``pytest``, CI) adds the rest of the product,
marked ``slow``. Triton under the interpreter runs covering sets only: the one over its tile
shapes in the quick run, the one over the other shapes marked slow. Backend-specific
behaviour (launches, schedules, SIMD paths, deterministic mode, memory rules) stays in each
backend's own file.
"""

from __future__ import annotations

import importlib
import itertools

import pytest
import torch

import contract
from contract import D_SMALL, VARIANTS, check_op, check_primitives, kind_p_params, seed_tensor
from oracle import assert_close, lora_AB64, make_projection, oracle, random_theta
from unilora_kernels import backends, ops, philox
from unilora_kernels import projection as P
from unilora_kernels.backends import reference

HAS_CUDA = torch.cuda.is_available()
ALL_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# backend -> (device of its tensors here, activation dtypes it takes: Triton refuses float64)
BACKENDS = {
    "reference": ("cpu", ALL_DTYPES),
    "cpu": ("cpu", ALL_DTYPES),
    "triton": ("cuda" if HAS_CUDA else "cpu", ALL_DTYPES[:3]),
    "cuda": ("cuda", ALL_DTYPES),
}
# (M, in, out, r), nothing tied to a block size unless said: decode rows (M = 1, 3) and r = 1 ... 64;
# M = 17, just above the decode limit; in = 64 an aligned K, in = 150 several K tiles (split-K);
# out = 91/131 two and three column tiles; M = 64/300 with M >= max(in, out): the CPU fold path;
# M = 300: several row tiles (split-M reductions); r = 64 the largest rank of the fused kernels.
SHAPES = [(1, 37, 53, 1), (3, 37, 53, 3), (3, 150, 53, 3), (17, 64, 29, 4), (17, 67, 29, 4), (17, 45, 91, 4),
          (64, 45, 91, 16), (64, 45, 131, 16), (64, 29, 31, 16), (300, 29, 31, 64), (300, 29, 131, 64),
          (300, 61, 19, 64), (1, 130, 70, 64)]
# The shapes of each backend's quick covering set: those its code paths depend on. The reference
# has no tiles or size-dependent paths; Triton's interpreter takes seconds a case, so its tiles
# only (partial K/N tiles, split-K, 2-3 column tiles, rank 64); the compiled kernels all of them.
QUICK_SHAPES = {
    "reference": [(1, 37, 53, 1), (17, 64, 29, 4), (64, 45, 131, 16)],
    "cpu": SHAPES,
    "triton": SHAPES if HAS_CUDA else [(1, 37, 53, 1), (3, 150, 53, 3), (17, 67, 29, 4), (64, 45, 131, 16),
                                       (1, 130, 70, 64)],
    "cuda": SHAPES,
}
KINDS = ("uniform", "hashed")
PS = (0.0, 0.3)


def _availability_marks(backend: str):
    return contract.availability_marks(backend, BACKENDS[backend][0])


def _full_matrix(backend: str) -> bool:
    """Triton on CPU tensors runs in the interpreter (seconds a case, a minute at M = 300): covering
    sets only, the one over the shapes outside QUICK_SHAPES marked slow."""
    return backend != "triton" or HAS_CUDA


def _cases(factors: dict, backend: str, slow_factors: dict):
    """pytest params for one backend: the pairwise covering rows of ``factors`` over its quick shapes;
    with the full matrix, every other combination of ``slow_factors`` too, marked slow (the other
    factors rotating)."""
    marks = _availability_marks(backend)
    quick = contract.pairwise_rows(dict(factors, shape=QUICK_SHAPES[backend]))
    rows = [(row, []) for row in quick]
    if not _full_matrix(backend):
        others = [s for s in factors["shape"] if s not in QUICK_SHAPES[backend]]
        rows += [(row, [pytest.mark.slow]) for row in contract.pairwise_rows(dict(factors, shape=others))]
    else:
        seen = {tuple(row[k] for k in slow_factors) for row in quick}
        for n, combo in enumerate(itertools.product(*slow_factors.values())):
            if combo not in seen:
                fixed = dict(zip(slow_factors, combo))
                row = {k: fixed[k] if k in fixed else factors[k][n % len(factors[k])] for k in factors}
                rows.append((row, [pytest.mark.slow]))
    out = []
    for row, extra in rows:
        ident = "-".join([backend, "M%d-in%d-out%d-r%d" % row["shape"], str(row["dtype"])[6:]] +
                         [f"{k}{row[k]}" if k in ("p", "dims") else str(row[k])
                          for k in row if k not in ("shape", "dtype")])
        out.append(pytest.param(backend, *row.values(), id=ident,
                                marks=marks + extra))
    return out


def _op_cases():
    """(backend, shape, dtype, kind, p, dims, variant)"""
    out = []
    for backend, (_, dtypes) in BACKENDS.items():
        factors = dict(shape=SHAPES, dtype=dtypes, kind=KINDS, p=PS, dims=(2, 3), variant=VARIANTS)
        # dims is flattened by ops before a backend sees it: rotating it is enough
        slow = {k: v for k, v in factors.items() if k != "dims"}
        out += _cases(factors, backend, slow)
    return out


def _primitive_cases():
    """(backend, shape, dtype, kind, p)"""
    out = []
    for backend, (_, dtypes) in BACKENDS.items():
        factors = dict(shape=SHAPES, dtype=dtypes, kind=KINDS, p=PS)
        out += _cases(factors, backend, factors)
    return out


def _backend_params(names=tuple(BACKENDS)):
    return [pytest.param(b, marks=_availability_marks(b), id=b) for b in names]


FLOAT64_BACKENDS = [b for b, (_, dtypes) in BACKENDS.items() if torch.float64 in dtypes]


@pytest.fixture(autouse=True)
def _gpu_tiles_in_the_interpreter(request):
    """Triton cases under the interpreter run the tile configs a GPU runs."""
    params = getattr(getattr(request.node, "callspec", None), "params", {})
    if params.get("backend") != "triton" or HAS_CUDA:
        yield
        return
    try:
        launch = importlib.import_module("unilora_kernels.backends.triton_launch")
    except ImportError:  # triton is not installed: the case skips anyway
        yield
        return
    with launch.interpreter_tiles("gpu"):
        yield


def _device(backend):
    return BACKENDS[backend][0]


# ------------------------------------------------------------------ ops and primitives -------
@pytest.mark.parametrize("backend,shape,dtype,kind,p,dims,variant", _op_cases())
def test_op_matches_oracle(backend, shape, dtype, kind, p, dims, variant):
    check_op(backend, _device(backend), shape, dtype, kind, p, dims, variant)


@pytest.mark.parametrize("backend,shape,dtype,kind,p", _primitive_cases())
def test_primitives_match_oracle(backend, shape, dtype, kind, p):
    check_primitives(backends.get_backend(backend, _device(backend)), _device(backend), shape, dtype, kind, p)


@pytest.mark.parametrize("backend", _backend_params())
@pytest.mark.parametrize("kind", KINDS)
def test_strided_inputs_match_oracle(backend, kind):
    """Column-strided, row-strided and transposed 3-D activations through the op."""
    device = _device(backend)
    M, in_f, out_f, r = 19, 33, 27, 4
    proj = make_projection(in_f, out_f, r, D_SMALL, kind, device=device)
    w = torch.randn(out_f, in_f, device=device) / 6
    wide = torch.randn(M, 2 * in_f, device=device)
    inputs = {"column stride 2": wide[:, ::2], "row stride 2 * in": wide[:, 5:5 + in_f],
              "transposed 3-D": torch.randn(M, 2, in_f, device=device).transpose(0, 1)}
    for what, x in inputs.items():
        assert not x.is_contiguous()
        x = x.requires_grad_(True)
        theta = random_theta(D_SMALL, device=device).requires_grad_(True)
        out = ops.linear(x, w, None, theta, proj.scales, proj.idx_a, proj.idx_b, r=r, hash_params=proj.hash_params,
                         backend=backend)
        g = torch.randn_like(out)
        out.backward(g)
        ref = oracle(x, theta, proj, weight=w, grad_out=g)
        assert_close(out, ref["out"], torch.float32, f"out ({what})")
        assert_close(x.grad, ref["grad_x"], torch.float32, f"grad_x ({what})")
        assert_close(theta.grad, ref["grad_theta"], torch.float32, f"grad_theta ({what})")


@pytest.mark.parametrize("backend", _backend_params())
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_layers_sharing_one_theta(backend, kind, p, monkeypatch):
    """Three chained layers read consecutive slices of D from one theta_d; gradients accumulate
    (in deterministic mode when dropping: every backend reads the same knob)."""
    monkeypatch.setenv("UNILORA_DETERMINISTIC", "1" if p > 0 else "0")
    device = _device(backend)
    dims = [(23, 31), (31, 17), (17, 29)]
    r, d = 3, 61
    offsets = [0]
    for in_f, out_f in dims:
        offsets.append(offsets[-1] + r * (in_f + out_f))
    D = offsets.pop()
    index = torch.from_numpy(P.generate_index(D, d, 9))
    scales = P.uniform_scales(index.numpy(), d).to(device)
    projs = []
    for (in_f, out_f), o in zip(dims, offsets):
        if kind == "uniform":
            ia = index[o:o + r * in_f].view(r, in_f).to(device)
            ib = index[o + r * in_f:o + r * (in_f + out_f)].view(out_f, r).to(device)
            projs.append(backends.LayerProjection(ia, ib, scales, r, in_f, out_f, ()))
        else:
            e = torch.empty(0, dtype=torch.int32, device=device)
            projs.append(backends.LayerProjection(e, e, P.hashed_scales(D, d).to(device), r, in_f, out_f,
                                                  (D, o, P.splitmix64(9))))
    weights = [(torch.randn(o_, i_) / i_**0.5).to(device) for i_, o_ in dims]
    theta = random_theta(d, 3, device=device).requires_grad_(True)
    x = torch.randn(21, 23, device=device, requires_grad=True)  # 21 rows: past the decode limit
    seeds = [torch.tensor([11 + i], dtype=torch.int64) for i in range(3)] if p > 0 else [None] * 3
    h = x
    for proj, w, s in zip(projs, weights, seeds):
        h = ops.linear(h, w, None, theta, proj.scales, proj.idx_a, proj.idx_b, r=r, hash_params=proj.hash_params,
                       dropout_p=p, seed=s, backend=backend)
    g = torch.randn_like(h)
    h.backward(g)
    t64 = theta.detach().double().cpu().requires_grad_(True)
    x64 = x.detach().double().cpu().requires_grad_(True)
    h64 = x64
    for proj, w, s in zip(projs, weights, seeds):
        A, B = lora_AB64(t64, proj)
        xd = h64
        if p > 0:
            xd = h64 * philox.dropout_keep(s.item(), h64.shape[0], h64.shape[1], p) * philox.keep_scale(p)
        h64 = h64 @ w.double().cpu().t() + (xd @ A.t()) @ B.t()
    h64.backward(g.double().cpu())
    assert_close(h, h64, torch.float32, "out")
    assert_close(x.grad, x64.grad, torch.float32, "grad_x")
    assert_close(theta.grad, t64.grad, torch.float32, "grad_theta")


@pytest.mark.parametrize("backend", _backend_params())
def test_inplace_op_returns_its_output_and_updates_strided_outputs(backend):
    device = _device(backend)
    M, in_f, out_f, r = 7, 21, 13, 2
    proj = make_projection(in_f, out_f, r, 31, "uniform", device=device)
    x = torch.randn(M, in_f, device=device)
    theta = random_theta(31, device=device)
    expected = oracle(x, theta, proj, base_out=torch.zeros(M, out_f))["out"]
    out = torch.zeros(M, out_f, device=device)
    assert ops.add_update_(out, x, theta, proj.scales, proj.idx_a, proj.idx_b, backend=backend) is out
    assert_close(out, expected, torch.float32, "contiguous out")
    wide = torch.zeros(M, 2 * out_f, device=device)
    ops.add_update_(wide[:, ::2], x, theta, proj.scales, proj.idx_a, proj.idx_b, backend=backend)
    assert_close(wide[:, ::2], expected, torch.float32, "strided out")
    assert not wide[:, 1::2].any()


@pytest.mark.parametrize("backend", _backend_params())
def test_empty_batch(backend):
    device = _device(backend)
    proj = make_projection(9, 5, 2, 11, "uniform", device=device)
    x = torch.randn(0, 9, device=device, requires_grad=True)
    theta = random_theta(11, device=device).requires_grad_(True)
    w = torch.randn(5, 9, device=device)
    out = ops.linear(x, w, None, theta, proj.scales, proj.idx_a, proj.idx_b, backend=backend)
    out.sum().backward()
    assert out.shape == (0, 5) and x.grad.shape == (0, 9)
    assert torch.equal(theta.grad, torch.zeros(11, device=device))


@pytest.mark.parametrize("backend", _backend_params())
def test_mixed_dtypes_compute_in_fp32(backend):
    """Activations and base output of different dtypes: fp32 products, one rounding at the end."""
    device = _device(backend)
    M, in_f, out_f, r = 20, 41, 23, 4
    proj = make_projection(in_f, out_f, r, D_SMALL, "uniform", device=device)
    theta = random_theta(D_SMALL, device=device).requires_grad_(True)
    for x_dt, out_dt in ((torch.float16, torch.float32), (torch.bfloat16, torch.float32),
                         (torch.float32, torch.bfloat16)):
        theta.grad = None
        x = torch.randn(M, in_f).to(device, x_dt).requires_grad_(True)
        base = torch.randn(M, out_f).to(device, out_dt).requires_grad_(True)
        out = ops.add_update(base, x, theta, proj.scales, proj.idx_a, proj.idx_b, backend=backend)
        g = torch.randn(M, out_f).to(device, out_dt)
        out.backward(g)
        ref = oracle(x, theta, proj, base_out=base, grad_out=g)
        tol = torch.bfloat16 if torch.bfloat16 in (x_dt, out_dt) else torch.float16
        assert out.dtype == out_dt and x.grad.dtype == x_dt
        assert_close(out, ref["out"], tol, f"out ({x_dt} x, {out_dt} out)")
        assert_close(x.grad, ref["grad_x"], tol, f"grad_x ({x_dt} x, {out_dt} out)")
        assert_close(theta.grad, ref["grad_theta"], tol, f"grad_theta ({x_dt} x, {out_dt} out)")


@pytest.mark.parametrize("backend", _backend_params())
@pytest.mark.parametrize("kind", KINDS)
def test_lora_matrices_equal_the_reference_gather(backend, kind):
    device = _device(backend)
    proj = make_projection(37, 29, 5, 41, kind, extra_layers=2, device=device)
    theta = random_theta(41, device=device)
    A, B = backends.get_backend(backend, device).lora_matrices(theta, proj)
    assert A.dtype == B.dtype == torch.float32 and A.shape == (5, 37) and B.shape == (29, 5)
    A64, B64 = lora_AB64(theta.double(), proj)
    assert_close(A, A64, torch.float32, "A")
    assert_close(B, B64, torch.float32, "B")
    A_ref, B_ref = reference.lora_matrices(theta, proj)
    assert torch.equal(A, A_ref) and torch.equal(B, B_ref)  # the same gather, bit for bit


@pytest.mark.parametrize("backend", _backend_params())
def test_dropout_one_drops_everything(backend):
    device = _device(backend)
    proj = make_projection(30, 20, 3, D_SMALL, "uniform", device=device)
    theta = random_theta(D_SMALL, device=device)
    x, base, g = (torch.randn(9, n, device=device) for n in (30, 20, 20))
    impl = backends.get_backend(backend, device)
    out = base.clone()
    h = impl.forward_(out, x, theta, proj, 1.0, 1)
    gx, gt = impl.backward(g, x, theta, proj, 1.0, 1, h, None, True, True)
    assert torch.equal(out, base) and not h.any() and not gx.any() and not gt.any()


# ------------------------------------------------------------------ gradcheck / opcheck -----
@pytest.mark.parametrize("backend", _backend_params(FLOAT64_BACKENDS))
@pytest.mark.parametrize("kind,p", kind_p_params(0.4))
def test_gradcheck_float64(backend, kind, p):
    device = _device(backend)
    in_f, out_f, r, d = 5, 3, 2, 7
    proj = make_projection(in_f, out_f, r, d, kind, device=device)
    seed = seed_tensor(p)
    f64 = dict(dtype=torch.float64, device=device)
    theta = torch.randn(d, **f64, requires_grad=True)
    w = torch.randn(out_f, in_f, **f64)
    bias = torch.randn(out_f, **f64, requires_grad=True)
    common = dict(r=r, hash_params=proj.hash_params, dropout_p=p, seed=seed, backend=backend)

    def f_add(base, x, theta):
        return ops.add_update(base, x, theta, proj.scales, proj.idx_a, proj.idx_b, **common)

    def f_lin(x, bias, theta):
        return ops.linear(x, w, bias, theta, proj.scales, proj.idx_a, proj.idx_b, **common)

    for M in (1, 4, 5):  # the CPU kernels' small-M and BLAS paths
        x = torch.randn(M, in_f, **f64, requires_grad=True)
        base = torch.randn(M, out_f, **f64, requires_grad=True)
        assert torch.autograd.gradcheck(f_add, (base, x, theta))
        assert torch.autograd.gradcheck(f_lin, (x, bias, theta))


def _opcheck_params():
    """backend x kind_p_params; under the interpreter, Triton's hashed case is slow too (20 s)."""
    out = []
    for backend in BACKENDS:
        for kp in kind_p_params(0.3):
            kind, p = kp.values
            slow = [pytest.mark.slow] if kind == "hashed" and not _full_matrix(backend) else []
            out.append(pytest.param(backend, kind, p, id=f"{backend}-{kp.id}",
                                    marks=_availability_marks(backend) + list(kp.marks) + slow))
    return out


@pytest.mark.parametrize("backend,kind,p", _opcheck_params())
def test_opcheck_every_unilora_op(backend, kind, p):
    """torch.library.opcheck of every torch.ops.unilora op (schema, fake kernel, autograd)."""
    device = _device(backend)
    M, in_f, out_f, r, d = 6, 11, 7, 3, 13
    proj = make_projection(in_f, out_f, r, d, kind, device=device)
    x = torch.randn(2, M, in_f, device=device, requires_grad=True)
    theta = random_theta(d, device=device).requires_grad_(True)
    hash_params = list(proj.hash_params)
    base = torch.randn(2, M, out_f, device=device, requires_grad=True)
    w = torch.randn(out_f, in_f, device=device)
    bias = torch.randn(out_f, device=device, requires_grad=True)
    common = (theta, proj.scales, proj.idx_a, proj.idx_b, r, hash_params, p, seed_tensor(p), backend)
    torch.library.opcheck(torch.ops.unilora.add_update.default, (base, x) + common)
    torch.library.opcheck(torch.ops.unilora.linear.default, (x, w, bias, False) + common)
    torch.library.opcheck(torch.ops.unilora.linear.default, (x, w.t().contiguous(), bias, True) + common)
    torch.library.opcheck(torch.ops.unilora.add_update_.default, (base.detach().clone(), x.detach()) + common)
    _, h = torch.ops.unilora.add_update(base, x, *common)
    g = torch.randn(2, M, out_f, device=device)
    for need_x, need_t in ((True, True), (True, False), (False, True)):
        torch.library.opcheck(
            torch.ops.unilora.backward.default,
            (g, x.detach(), w, False, theta.detach()) + common[1:7] + (seed_tensor(p), backend, h.detach(), need_x, need_t),
        )


def test_every_backend_is_in_the_contract():
    assert set(BACKENDS) == set(backends.BACKENDS) - {"auto"}
