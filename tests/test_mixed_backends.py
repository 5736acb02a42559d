"""Mixed batches on every backend against the row-by-row float64 oracle (``oracle.mixed_oracle``).

Each sequence reads its own adapter (-1 none, 0 theta_d, k table row k-1). Cases: odd shapes
(decode: one row per sequence; prefill: several rows per sequence), 2-D and 3-D inputs, the
activation dtypes each backend takes, fp32 and bf16 tables, uniform and hashed projections, dropout
on and off; every gradient (base output, x, theta_d, table). Tolerances: ``oracle.TOL`` per dtype.
"""

from __future__ import annotations

import pytest
import torch

from contract import availability_marks, seed_tensor
from oracle import assert_close, make_projection, mixed_oracle, random_theta, tolerance_dtype
from unilora_kernels import ops

HAS_CUDA = torch.cuda.is_available()
ALL = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
BACKENDS = {
    "reference": ("cpu", ALL),
    "cpu": ("cpu", ALL),
    "triton": ("cuda" if HAS_CUDA else "cpu", ALL[:3]),
    "cuda": ("cuda", ALL),
}
# (S sequences, T rows each, in, out, r): decode (T = 1), prefill runs, sizes off every block.
SHAPES = [(5, 1, 37, 29, 3), (4, 3, 37, 53, 4), (3, 7, 67, 31, 16), (2, 17, 29, 45, 1)]
# One adapter per sequence: base, default, table rows, repeats (consecutive and not).
IDS = {5: [2, -1, 0, 3, 2], 4: [1, 1, -1, 0], 3: [3, 0, 3], 2: [-1, 2]}
D = 53


def _marks(backend):
    """Availability, and ``gpu`` for every case on CUDA tensors (scripts/gpu_check.sh runs ``-m gpu``)."""
    marks = availability_marks(backend, BACKENDS[backend][0])
    return marks + [pytest.mark.gpu] if BACKENDS[backend][0] == "cuda" and backend != "cuda" else marks


def _cases():
    out = []
    for backend, (_, dtypes) in BACKENDS.items():
        for n, shape in enumerate(SHAPES):
            for k, dtype in enumerate(dtypes):
                kind = ("uniform", "hashed")[(n + k) % 2]
                p = (0.0, 0.3)[(n + k // 2) % 2]
                table_dtype = torch.bfloat16 if (n + k) % 3 == 2 and dtype != torch.float64 else torch.float32
                dims = 3 if (n + k) % 2 else 2
                slow = [] if backend != "triton" or HAS_CUDA or n < 2 else [pytest.mark.slow]
                out.append(pytest.param(backend, shape, dtype, kind, p, table_dtype, dims,
                                        id=f"{backend}-S{shape[0]}T{shape[1]}-{str(dtype)[6:]}-{kind}-p{p}-"
                                           f"table_{str(table_dtype)[6:]}-{dims}d",
                                        marks=_marks(backend) + slow))
    return out


def _inputs(shape, dtype, kind, table_dtype, device, dims):
    S, T, in_f, out_f, r = shape
    if dims == 2 and T > 1:
        T = 1  # a 2-D input has one row per sequence
    proj = make_projection(in_f, out_f, r, D, kind, seed=3, device=device, extra_layers=1)
    theta = random_theta(D, 1, device).to(table_dtype if dtype != torch.float64 else torch.float64)
    table = torch.stack([random_theta(D, s, device) for s in (2, 3, 4)]).to(theta.dtype)
    seq = torch.tensor(IDS[S], dtype=torch.int32, device=device)
    lead = (S, T) if dims == 3 else (S,)
    x = torch.randn(*lead, in_f, device=device).to(dtype)
    base = torch.randn(*lead, out_f, device=device).to(dtype)
    return proj, theta, table, seq, x, base


@pytest.mark.parametrize("backend,shape,dtype,kind,p,table_dtype,dims", _cases())
def test_mixed_batch_matches_each_row_alone(backend, shape, dtype, kind, p, table_dtype, dims):
    device = BACKENDS[backend][0]
    proj, theta, table, seq, x, base = _inputs(shape, dtype, kind, table_dtype, device, dims)
    seed = seed_tensor(p)
    xr = x.detach().requires_grad_(True)
    tr = theta.detach().requires_grad_(True)
    tab = table.detach().requires_grad_(True)
    br = base.detach().requires_grad_(True)
    out = ops.mixed_add_update(br, xr, tr, tab, seq, proj.scales, proj.idx_a, proj.idx_b, r=proj.r,
                               hash_params=proj.hash_params, dropout_p=p, seed=seed, backend=backend)
    g = torch.randn_like(out)
    out.backward(g)
    x2d, g2d = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
    want = mixed_oracle(x2d, theta, table, seq, proj, p=p, seed=None if seed is None else int(seed),
                        grad_out=g2d)
    tol = tolerance_dtype(dtype, kind)
    if table_dtype == torch.bfloat16 and tol in (torch.float32, torch.float64):
        tol = torch.float16  # bf16 adapters are stored rounded; the oracle reads the same rounded values
    assert_close(out.reshape(-1, out.shape[-1]), base.reshape(-1, base.shape[-1]).double() + want["upd"].to(device), tol, "out")
    assert_close(xr.grad.reshape(x2d.shape), want["grad_x"], tol, "grad_x")
    assert_close(tr.grad, want["grad_theta"], tol, "grad_theta")
    assert_close(tab.grad, want["grad_table"], tol, "grad_table")
    assert torch.equal(br.grad, g)
    assert tr.grad.dtype == theta.dtype and tab.grad.dtype == table.dtype and xr.grad.dtype == dtype
    base_rows = (seq == -1).repeat_interleave(x2d.shape[0] // seq.shape[0])
    assert torch.equal(out.reshape(-1, out.shape[-1])[base_rows], base.reshape(-1, base.shape[-1])[base_rows])


@pytest.mark.parametrize("backend", [pytest.param(b, marks=_marks(b)) for b in ("reference", "cpu")])
def test_mixed_gradcheck_float64(backend):
    proj = make_projection(5, 3, 2, 7, "uniform")
    seq = torch.tensor([1, -1, 0, 2], dtype=torch.int32)
    x = torch.randn(4, 2, 5, dtype=torch.float64, requires_grad=True)
    base = torch.randn(4, 2, 3, dtype=torch.float64, requires_grad=True)
    theta = torch.randn(7, dtype=torch.float64, requires_grad=True)
    table = torch.randn(2, 7, dtype=torch.float64, requires_grad=True)

    def f(base, x, theta, table):
        return ops.mixed_add_update(base, x, theta, table, seq, proj.scales, proj.idx_a, proj.idx_b, backend=backend)

    assert torch.autograd.gradcheck(f, (base, x, theta, table))


@pytest.mark.parametrize("backend", [pytest.param(b, marks=_marks(b)) for b in BACKENDS])
@pytest.mark.parametrize("kind,p", [("uniform", 0.0), ("hashed", 0.3)])
def test_opcheck_mixed_ops(backend, kind, p):
    """torch.library.opcheck of the three mixed-batch ops (schema, fake kernel, autograd)."""
    device = BACKENDS[backend][0]
    proj = make_projection(11, 7, 3, 13, kind, device=device)
    seq = torch.tensor([1, -1, 0], dtype=torch.int32, device=device)
    x = torch.randn(3, 2, 11, device=device, requires_grad=True)
    base = torch.randn(3, 2, 7, device=device, requires_grad=True)
    theta = random_theta(13, device=device).requires_grad_(True)
    table = torch.randn(2, 13, device=device, requires_grad=True)
    common = (theta, proj.scales, proj.idx_a, proj.idx_b, 3, list(proj.hash_params), p, seed_tensor(p), backend)
    torch.library.opcheck(torch.ops.unilora.mixed_add_update.default, (base, x, table, seq) + common)
    torch.library.opcheck(torch.ops.unilora.mixed_add_update_.default,
                          (base.detach().clone(), x.detach(), table.detach(), seq) + common)
    g = torch.randn(3, 2, 7, device=device)
    for need_x, need_t in ((True, True), (True, False), (False, True)):
        torch.library.opcheck(torch.ops.unilora.mixed_backward.default,
                              (g, x.detach(), table.detach(), seq, theta.detach()) + common[1:] + (need_x, need_t))


def test_mixed_op_bad_input_is_refused_clearly():
    proj = make_projection(5, 3, 2, 7, "uniform")
    x, base, theta = torch.randn(3, 5), torch.randn(3, 3), torch.randn(7)
    seq = torch.tensor([0, 1, -1], dtype=torch.int32)
    args = (proj.scales, proj.idx_a, proj.idx_b)
    with pytest.raises(ValueError, match="capacity, d = 7"):
        ops.mixed_add_update(base, x, theta, torch.zeros(2, 6), seq, *args)
    with pytest.raises(TypeError, match="int32"):
        ops.mixed_add_update(base, x, theta, torch.zeros(2, 7), seq.long(), *args)
    with pytest.raises(ValueError, match=r"values must be in \[-1, 1\]"):
        ops.mixed_add_update(base, x, theta, torch.zeros(1, 7), torch.tensor([0, 2, -1], dtype=torch.int32), *args)
    with pytest.raises(ValueError, match="names 2 sequences"):
        ops.mixed_add_update(base, x, theta, torch.zeros(2, 7), seq[:2], *args)
    with pytest.raises(TypeError, match="must match"):
        ops.mixed_add_update(base, x, theta.double(), torch.zeros(2, 7), seq, *args)
