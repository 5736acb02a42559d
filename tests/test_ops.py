"""The custom ops against the float64 oracle, on every backend that runs on CPU tensors here.

Odd shapes (nothing a multiple of a block size), 2-D and 3-D inputs, fp32/fp16/bf16 (and fp64
through gradcheck), dropout on and off with the shared mask, uniform and hashed projections,
several layers sharing one theta_d; gradcheck and opcheck on every op; input validation.
"""

import pytest
import torch

from oracle import TOL, assert_close, make_projection, oracle, random_theta
from unilora_kernels import backends, ops, philox

CPU_BACKENDS = []
for _name in ("reference", "cpu"):
    try:
        backends.get_backend(_name, "cpu")
        CPU_BACKENDS.append(pytest.param(_name))
    except backends.BackendNotAvailableError as exc:
        CPU_BACKENDS.append(pytest.param(_name, marks=pytest.mark.skip(reason=str(exc))))

SHAPES = [(1, 37, 53, 1), (3, 37, 53, 3), (17, 64, 29, 4), (64, 45, 91, 16), (300, 29, 31, 64)]  # M, in, out, r
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
D_SMALL = 97


def _x(shape_m, in_f, dims, dtype):
    shape = (shape_m, in_f) if dims == 2 else (2, shape_m, in_f)
    return torch.randn(shape, dtype=torch.float32).to(dtype)


def _seed(p):
    return torch.tensor([987654321], dtype=torch.int64) if p > 0 else None


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "M%d-in%d-out%d-r%d" % s)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["uniform", "hashed"])
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("variant", ["linear_bias", "linear_nobias", "conv1d"])
def test_linear_op_matches_oracle(backend, shape, dtype, kind, p, dims, variant):
    M, in_f, out_f, r = shape
    proj = make_projection(in_f, out_f, r, D_SMALL, kind, seed=M)
    weight_t = variant == "conv1d"
    w = (torch.randn(in_f, out_f) if weight_t else torch.randn(out_f, in_f)).div(in_f**0.5).to(dtype)
    bias = None if variant == "linear_nobias" else torch.randn(out_f).to(dtype).requires_grad_(True)
    x = _x(M, in_f, dims, dtype).requires_grad_(True)
    theta = random_theta(D_SMALL, seed=r).requires_grad_(True)
    seed = _seed(p)
    out = ops.linear(x, w, bias, theta, proj.scales, proj.idx_a, proj.idx_b, weight_t=weight_t, r=r,
                     hashed=proj.hashed, dropout_p=p, seed=seed, backend=backend)
    assert out.dtype == dtype and out.shape == (*x.shape[:-1], out_f)
    g = torch.randn(out.shape).to(dtype)
    out.backward(g)
    ref = oracle(x, theta, proj, weight=w, bias=bias, weight_t=weight_t, p=p,
                 seed=seed.item() if seed is not None else None, grad_out=g)
    assert_close(out, ref["out"], dtype, "out")
    assert_close(x.grad, ref["grad_x"], dtype, "grad_x")
    assert theta.grad.dtype == torch.float32
    assert_close(theta.grad, ref["grad_theta"], dtype, "grad_theta")
    if bias is not None:
        assert_close(bias.grad, ref["grad_bias"], dtype, "grad_bias")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "M%d-in%d-out%d-r%d" % s)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["uniform", "hashed"])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_add_update_op_matches_oracle(backend, shape, dtype, kind, p):
    M, in_f, out_f, r = shape
    proj = make_projection(in_f, out_f, r, D_SMALL, kind, seed=M + 1, extra_layers=1)
    x = _x(M, in_f, 3, dtype).requires_grad_(True)
    base_out = torch.randn(*x.shape[:-1], out_f).to(dtype).requires_grad_(True)
    theta = random_theta(D_SMALL, seed=5).requires_grad_(True)
    seed = _seed(p)
    out = ops.add_update(base_out, x, theta, proj.scales, proj.idx_a, proj.idx_b, r=r, hashed=proj.hashed,
                         dropout_p=p, seed=seed, backend=backend)
    g = torch.randn(out.shape).to(dtype)
    out.backward(g)
    ref = oracle(x, theta, proj, base_out=base_out, p=p, seed=seed.item() if seed is not None else None,
                 grad_out=g)
    assert_close(out, ref["out"], dtype, "out")
    assert_close(x.grad, ref["grad_x"], dtype, "grad_x")
    assert_close(theta.grad, ref["grad_theta"], dtype, "grad_theta")
    assert_close(base_out.grad, ref["grad_base"], dtype, "grad_base")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kind", ["uniform", "hashed"])
def test_strided_input(backend, kind):
    M, in_f, out_f, r = 19, 33, 27, 4
    proj = make_projection(in_f, out_f, r, D_SMALL, kind)
    w = torch.randn(out_f, in_f) / 6
    big = torch.randn(in_f, 2 * M)
    x = big[:, ::2].t().requires_grad_(False)  # non-contiguous rows and columns
    assert not x.is_contiguous()
    theta = random_theta(D_SMALL).requires_grad_(True)
    out = ops.linear(x, w, None, theta, proj.scales, proj.idx_a, proj.idx_b, r=r, hashed=proj.hashed,
                     backend=backend)
    g = torch.randn_like(out)
    out.backward(g)
    ref = oracle(x, theta, proj, weight=w, grad_out=g)
    assert_close(out, ref["out"], torch.float32, "out")
    assert_close(theta.grad, ref["grad_theta"], torch.float32, "grad_theta")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kind", ["uniform", "hashed"])
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_layers_sharing_one_theta(backend, kind, p):
    """Three chained layers read consecutive slices of D from one theta_d; grads accumulate."""
    dims = [(23, 31), (31, 17), (17, 29)]
    r, d = 3, 61
    D_offsets, projs, off = [], [], 0
    for in_f, out_f in dims:
        D_offsets.append(off)
        off += r * (in_f + out_f)
    D = off
    from unilora_kernels import projection as P

    index = torch.from_numpy(P.generate_index(D, d, 9))
    scales = P.uniform_scales(index.numpy(), d)
    for (in_f, out_f), o in zip(dims, D_offsets):
        if kind == "uniform":
            ia = index[o : o + r * in_f].view(r, in_f)
            ib = index[o + r * in_f : o + r * (in_f + out_f)].view(out_f, r)
            projs.append(backends.LayerProjection(ia, ib, scales, r, in_f, out_f, ()))
        else:
            e = torch.empty(0, dtype=torch.int32)
            projs.append(backends.LayerProjection(e, e, P.hashed_scales(D, d), r, in_f, out_f,
                                                  (D, o, P.splitmix64(9))))
    weights = [torch.randn(o_, i_) / i_**0.5 for i_, o_ in dims]
    theta = random_theta(d, 3).requires_grad_(True)
    x = torch.randn(5, 23, requires_grad=True)
    seeds = [torch.tensor([11 + i], dtype=torch.int64) for i in range(3)] if p > 0 else [None] * 3
    h = x
    for proj, w, s in zip(projs, weights, seeds):
        h = ops.linear(h, w, None, theta, proj.scales, proj.idx_a, proj.idx_b, r=r, hashed=proj.hashed,
                       dropout_p=p, seed=s, backend=backend)
    g = torch.randn_like(h)
    h.backward(g)
    # oracle: the same chain in float64 with autograd
    t64 = theta.detach().double().requires_grad_(True)
    x64 = x.detach().double().requires_grad_(True)
    from oracle import lora_AB64

    h64 = x64
    for proj, w, s in zip(projs, weights, seeds):
        A, B = lora_AB64(t64, proj)
        xd = h64
        if p > 0:
            keep = philox.dropout_keep(s.item(), h64.shape[0], h64.shape[1], p)
            xd = h64 * keep * philox.keep_scale(p)
        h64 = h64 @ w.double().t() + (xd @ A.t()) @ B.t()
    h64.backward(g.double())
    assert_close(h, h64, torch.float32, "out")
    assert_close(x.grad, x64.grad, torch.float32, "grad_x")
    assert_close(theta.grad, t64.grad, torch.float32, "grad_theta")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_inplace_op_equals_functional(backend):
    M, in_f, out_f, r = 7, 21, 13, 2
    proj = make_projection(in_f, out_f, r, 31, "uniform")
    x = torch.randn(M, in_f)
    theta = random_theta(31)
    base = torch.randn(M, out_f)
    expected = ops.add_update(base, x, theta, proj.scales, proj.idx_a, proj.idx_b, backend=backend)
    out = base.clone()
    ret = ops.add_update_(out, x, theta, proj.scales, proj.idx_a, proj.idx_b, backend=backend)
    assert ret is out
    assert torch.allclose(out, expected, rtol=1e-6, atol=1e-6)
    # a non-contiguous output is updated through a contiguous copy
    wide = torch.randn(M, 2 * out_f)
    view = wide[:, ::2]
    expected2 = ops.add_update(view.clone(), x, theta, proj.scales, proj.idx_a, proj.idx_b, backend=backend)
    ops.add_update_(view, x, theta, proj.scales, proj.idx_a, proj.idx_b, backend=backend)
    assert torch.allclose(wide[:, ::2], expected2, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_empty_batch(backend):
    proj = make_projection(9, 5, 2, 11, "uniform")
    x = torch.randn(0, 9, requires_grad=True)
    theta = random_theta(11).requires_grad_(True)
    w = torch.randn(5, 9)
    out = ops.linear(x, w, None, theta, proj.scales, proj.idx_a, proj.idx_b, backend=backend)
    out.sum().backward()
    assert out.shape == (0, 5) and torch.equal(theta.grad, torch.zeros(11)) and x.grad.shape == (0, 9)


# ------------------------------------------------------------------ gradcheck / opcheck -----
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kind", ["uniform", "hashed"])
@pytest.mark.parametrize("p", [0.0, 0.4])
def test_gradcheck_float64(backend, kind, p):
    M, in_f, out_f, r, d = 4, 5, 3, 2, 7
    proj = make_projection(in_f, out_f, r, d, kind)
    seed = _seed(p)
    x = torch.randn(M, in_f, dtype=torch.float64, requires_grad=True)
    theta = torch.randn(d, dtype=torch.float64, requires_grad=True)
    base = torch.randn(M, out_f, dtype=torch.float64, requires_grad=True)
    w = torch.randn(out_f, in_f, dtype=torch.float64)
    bias = torch.randn(out_f, dtype=torch.float64, requires_grad=True)

    def f_add(base, x, theta):
        return ops.add_update(base, x, theta, proj.scales, proj.idx_a, proj.idx_b, r=r, hashed=proj.hashed,
                              dropout_p=p, seed=seed, backend=backend)

    def f_lin(x, bias, theta):
        return ops.linear(x, w, bias, theta, proj.scales, proj.idx_a, proj.idx_b, r=r, hashed=proj.hashed,
                          dropout_p=p, seed=seed, backend=backend)

    assert torch.autograd.gradcheck(f_add, (base, x, theta))
    assert torch.autograd.gradcheck(f_lin, (x, bias, theta))


def _opcheck_args(kind, dtype=torch.float32, p=0.0):
    M, in_f, out_f, r, d = 6, 11, 7, 3, 13
    proj = make_projection(in_f, out_f, r, d, kind)
    x = torch.randn(2, M, in_f, dtype=dtype, requires_grad=True)
    theta = random_theta(d).requires_grad_(True)
    seed = _seed(p)
    return proj, x, theta, seed, (M, in_f, out_f, r, d)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kind", ["uniform", "hashed"])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_opcheck_every_op(backend, kind, p):
    proj, x, theta, seed, (M, in_f, out_f, r, d) = _opcheck_args(kind, p=p)
    hashed = list(proj.hashed)
    base = torch.randn(2, M, out_f, requires_grad=True)
    w = torch.randn(out_f, in_f)
    bias = torch.randn(out_f, requires_grad=True)
    common = (theta, proj.scales, proj.idx_a, proj.idx_b, r, hashed, p, seed, backend)
    torch.library.opcheck(torch.ops.unilora.add_update.default, (base, x) + common)
    torch.library.opcheck(torch.ops.unilora.linear.default, (x, w, bias, False) + common)
    torch.library.opcheck(torch.ops.unilora.linear.default, (x, w.t().contiguous(), bias, True) + common)
    torch.library.opcheck(torch.ops.unilora.add_update_.default, (base.detach().clone(), x.detach()) + common)
    _, h = torch.ops.unilora.add_update(base, x, *common)
    g = torch.randn(2, M, out_f)
    for need_x, need_t in ((True, True), (True, False), (False, True)):
        torch.library.opcheck(
            torch.ops.unilora.backward.default,
            (g, x.detach(), w, False, theta.detach(), proj.scales, proj.idx_a, proj.idx_b, r, hashed, p, seed,
             backend, h.detach(), need_x, need_t),
        )


# ------------------------------------------------------------------ validation --------------
def _valid():
    proj = make_projection(9, 5, 2, 11, "uniform")
    return torch.randn(3, 9), torch.randn(5, 9), random_theta(11), proj


def test_validation_errors_are_clear():
    x, w, theta, proj = _valid()
    s, ia, ib = proj.scales, proj.idx_a, proj.idx_b
    with pytest.raises(TypeError, match="int32"):
        ops.linear(x, w, None, theta, s, ia.long(), ib)
    with pytest.raises(ValueError, match="idx_a has shape"):
        ops.linear(x, w, None, theta, s, ia[:, :4], ib)
    with pytest.raises(ValueError, match="features but the weight expects"):
        ops.linear(torch.randn(3, 8), w, None, theta, s, ia, ib)
    with pytest.raises(TypeError, match="theta_d must be a 1-D float32"):
        ops.linear(x, w, None, theta.view(1, -1), s, ia, ib)
    with pytest.raises(TypeError, match="theta_d must be a 1-D float32"):
        ops.linear(x, w, None, theta.half(), s, ia, ib)
    with pytest.raises(ValueError, match="scales has 10 entries"):
        ops.linear(x, w, None, theta, s[:10], ia, ib)
    with pytest.raises(TypeError, match="x must be a float"):
        ops.linear(x.long(), w.long(), None, theta, s, ia, ib)
    with pytest.raises(TypeError, match="base weight is"):
        ops.linear(x, w.double(), None, theta, s, ia, ib)
    with pytest.raises(ValueError, match="dropout_p must be in"):
        ops.linear(x, w, None, theta, s, ia, ib, dropout_p=1.5)
    with pytest.raises(ValueError, match="needs a one-element int64 seed"):
        ops.linear(x, w, None, theta, s, ia, ib, dropout_p=0.5)
    with pytest.raises(ValueError, match="hashed projection slice"):
        ops.linear(x, w, None, theta, torch.ones(2), r=2, hashed=[10, 0, 1])
    with pytest.raises(ValueError, match="r must be given"):
        ops.linear(x, w, None, theta, torch.ones(2), hashed=[1000, 0, 1])
    with pytest.raises(ValueError, match="one device"):
        ops.linear(x, w, None, theta.to("meta"), s, ia, ib)
    with pytest.raises(ValueError, match="leading dimensions"):
        ops.add_update(torch.randn(4, 5), x, theta, s, ia, ib)
    with pytest.raises(backends.BackendNotAvailableError, match="unknown backend"):
        ops.linear(x, w, None, theta, s, ia, ib, backend="tpu")


def test_backend_not_available_is_clear():
    x, w, theta, proj = _valid()
    with pytest.raises(backends.BackendNotAvailableError, match="backend 'cuda'"):
        ops.linear(x, w, None, theta, proj.scales, proj.idx_a, proj.idx_b, backend="cuda")
    assert issubclass(backends.BackendNotAvailableError, ValueError)


def test_tolerance_table_covers_every_dtype():
    assert set(TOL) == {torch.float64, torch.float32, torch.float16, torch.bfloat16}
