"""The Triton backend against the float64 oracle.

Without a GPU the kernels run under the Triton interpreter on CPU tensors (conftest sets
TRITON_INTERPRET=1), with the GPU default tile configs (``interpreter_tiles("gpu")``), so masks,
K loops, split reductions and the fp32 rank chunks are the ones a GPU runs. With a GPU the same
tests run on CUDA tensors; the ``gpu``-marked tests at the end add real layer sizes.

Tolerances are ``oracle.TOL`` (normwise): fp32 1e-5, fp16 4e-3, bf16 2e-2. Under the
interpreter bf16 operands are upcast to fp32 on load (it cannot run bf16 dots); bf16 tensor-core
code is covered by compile_check.
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from torch import nn

from conftest import tiny_llama
from oracle import TOL, assert_close, lora_AB64, make_projection, oracle, random_theta
import unilora_kernels as uk
from unilora_kernels import backends, ops, philox
from unilora_kernels import projection as P
from unilora_kernels.backends import reference, triton_launch
from unilora_kernels.backends.policy import DECODE_MAX_M

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
try:
    tb = backends.get_backend("triton", DEVICE)
    _REASON = None
except backends.BackendNotAvailableError as exc:  # e.g. triton not installed
    tb, _REASON = None, str(exc)
pytestmark = pytest.mark.skipif(tb is None, reason=f"triton backend unavailable on {DEVICE}: {_REASON}")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (M, in, out, r): nothing a multiple of a tile; in = 150 gives 3-10 K tiles (split-K), out = 131
# spans 2-3 column tiles, M = 300 spans several row tiles (split-M reductions).
SHAPES = [(1, 37, 53, 1), (3, 150, 53, 3), (17, 67, 29, 4), (64, 45, 131, 16), (300, 29, 131, 64)]
D_SMALL = 97


@pytest.fixture(autouse=True)
def _gpu_tiles():
    ctx = triton_launch.interpreter_tiles("gpu") if tb is not None else contextlib.nullcontext()
    with ctx:
        yield


@pytest.fixture
def knobs(monkeypatch):
    """Set the forward schedule and deterministic mode for one test."""

    def set_(schedule="auto", det=False):
        monkeypatch.setenv("UNILORA_TRITON_SCHEDULE", schedule)
        monkeypatch.setenv("UNILORA_DETERMINISTIC", "1" if det else "0")

    return set_


def _seed(p):
    return torch.tensor([987654321], dtype=torch.int64) if p > 0 else None


def _value(seed):
    return None if seed is None else seed.item()


def _cases():
    """A covering set: every shape x dtype x projection, the other factors rotating."""
    out = []
    for i, shape in enumerate(SHAPES):
        for j, dtype in enumerate(DTYPES):
            for kind in ("uniform", "hashed"):
                n = 6 * i + 2 * j + (kind == "hashed")
                out.append(pytest.param(
                    shape, dtype, kind, (0.0, 0.3)[n % 2], (2, 3)[(n // 2) % 2], ("auto", "fused", "split")[n % 3],
                    bool((n // 3) % 2), ("linear_bias", "conv1d", "add_update", "linear_nobias")[n % 4],
                    id=f"M{shape[0]}-in{shape[1]}-out{shape[2]}-r{shape[3]}-{str(dtype)[6:]}-{kind}-n{n}"))
    return out


@pytest.mark.parametrize("shape,dtype,kind,p,dims,schedule,det,variant", _cases())
def test_ops_match_oracle(knobs, shape, dtype, kind, p, dims, schedule, det, variant):
    knobs(schedule, det)
    M, in_f, out_f, r = shape
    proj = make_projection(in_f, out_f, r, D_SMALL, kind, seed=M, device=DEVICE, extra_layers=1)
    x = torch.randn((M, in_f) if dims == 2 else (2, M, in_f)).to(DEVICE, dtype).requires_grad_(True)
    theta = random_theta(D_SMALL, seed=r, device=DEVICE).requires_grad_(True)
    seed = _seed(p)
    common = dict(r=r, hashed=proj.hashed, dropout_p=p, seed=seed, backend="triton")
    bias = None
    if variant == "add_update":
        base = torch.randn(*x.shape[:-1], out_f).to(DEVICE, dtype).requires_grad_(True)
        out = ops.add_update(base, x, theta, proj.scales, proj.idx_a, proj.idx_b, **common)
    else:
        weight_t = variant == "conv1d"
        w = (torch.randn(in_f, out_f) if weight_t else torch.randn(out_f, in_f)).div(in_f**0.5).to(DEVICE, dtype)
        if variant != "linear_nobias":
            bias = torch.randn(out_f).to(DEVICE, dtype).requires_grad_(True)
        out = ops.linear(x, w, bias, theta, proj.scales, proj.idx_a, proj.idx_b, weight_t=weight_t, **common)
    g = torch.randn(out.shape).to(DEVICE, dtype)
    out.backward(g)
    if variant == "add_update":
        ref = oracle(x, theta, proj, base_out=base, p=p, seed=_value(seed), grad_out=g)
        assert_close(base.grad, ref["grad_base"], dtype, "grad_base")
    else:
        ref = oracle(x, theta, proj, weight=w, bias=bias, weight_t=weight_t, p=p, seed=_value(seed),
                     grad_out=g)
    assert out.dtype == dtype
    assert_close(out, ref["out"], dtype, "out")
    assert_close(x.grad, ref["grad_x"], dtype, "grad_x")
    assert theta.grad.dtype == torch.float32
    assert_close(theta.grad, ref["grad_theta"], dtype, "grad_theta")
    if bias is not None:
        assert_close(bias.grad, ref["grad_bias"], dtype, "grad_bias")


@pytest.mark.parametrize("kind", ["uniform", "hashed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_backend_direct_every_gradient_combination(knobs, kind, dtype):
    """forward_/backward called directly: in-place into out and into a given grad_x, or fresh."""
    knobs("split")
    M, in_f, out_f, r, p = 45, 70, 33, 5, 0.2
    proj = make_projection(in_f, out_f, r, D_SMALL, kind, seed=3, device=DEVICE)
    x = torch.randn(M, in_f).to(DEVICE, dtype)
    theta = random_theta(D_SMALL, device=DEVICE)
    base = torch.randn(M, out_f).to(DEVICE, dtype)
    out = base.clone()
    h = tb.forward_(out, x, theta, proj, p, 77)
    g = torch.randn(M, out_f).to(DEVICE, dtype)
    ref = oracle(x, theta, proj, base_out=base, p=p, seed=77, grad_out=g)
    assert h.dtype == torch.float32 and h.shape == (M, r)
    assert_close(out, ref["out"], dtype, "out in place")
    gx0 = torch.randn(M, in_f).to(DEVICE, dtype)
    gx, gt = tb.backward(g, x, theta, proj, p, 77, h, gx0.clone(), True, True)
    assert_close(gx, ref["grad_x"] + gx0.double().to(ref["grad_x"].device), dtype, "grad_x accumulated")
    assert_close(gt, ref["grad_theta"], dtype, "grad_theta")
    gx, gt = tb.backward(g, x, theta, proj, p, 77, h, None, True, False)
    assert gt is None and gx.dtype == dtype
    assert_close(gx, ref["grad_x"], dtype, "grad_x alone")
    gx, gt = tb.backward(g, x, theta, proj, p, 77, h, None, False, True)
    assert gx is None
    assert_close(gt, ref["grad_theta"], dtype, "grad_theta alone")


def test_mixed_dtypes_use_exact_fp32(knobs):
    """fp16 activations into an fp32 base output (and bf16 out of fp32 x): fp32 dots, then one rounding."""
    knobs("split")
    M, in_f, out_f, r = 20, 41, 23, 4
    proj = make_projection(in_f, out_f, r, D_SMALL, "uniform", device=DEVICE)
    theta = random_theta(D_SMALL, device=DEVICE).requires_grad_(True)
    for x_dt, out_dt in ((torch.float16, torch.float32), (torch.float32, torch.bfloat16)):
        theta.grad = None
        x = torch.randn(M, in_f).to(DEVICE, x_dt).requires_grad_(True)
        base = torch.randn(M, out_f).to(DEVICE, out_dt).requires_grad_(True)
        out = ops.add_update(base, x, theta, proj.scales, proj.idx_a, proj.idx_b, backend="triton")
        g = torch.randn(M, out_f).to(DEVICE, out_dt)
        out.backward(g)
        ref = oracle(x, theta, proj, base_out=base, grad_out=g)
        tol = torch.bfloat16 if torch.bfloat16 in (x_dt, out_dt) else torch.float16
        assert out.dtype == out_dt and x.grad.dtype == x_dt
        assert_close(out, ref["out"], tol, "out")
        assert_close(x.grad, ref["grad_x"], tol, "grad_x")
        assert_close(theta.grad, ref["grad_theta"], tol, "grad_theta")


def test_strided_inputs_are_read_in_place(knobs):
    knobs("split")
    M, in_f, out_f, r = 19, 33, 27, 4
    proj = make_projection(in_f, out_f, r, D_SMALL, "hashed", device=DEVICE)
    theta = random_theta(D_SMALL, device=DEVICE)
    wide = torch.randn(M, 2 * in_f, device=DEVICE)
    rows = wide[:, 5:5 + in_f]  # row stride 2 * in, unit column stride: no copy needed
    cols = wide[:, ::2]  # column stride 2: copied once
    for x in (rows, cols):
        base = torch.randn(M, out_f, device=DEVICE)
        out = base.clone()
        h = tb.forward_(out, x, theta, proj, 0.0, None)
        g = torch.randn(M, out_f, device=DEVICE)
        gx, gt = tb.backward(g, x, theta, proj, 0.0, None, h, None, True, True)
        ref = oracle(x, theta, proj, base_out=base, grad_out=g)
        assert_close(out, ref["out"], torch.float32, "out")
        assert_close(gx, ref["grad_x"], torch.float32, "grad_x")
        assert_close(gt, ref["grad_theta"], torch.float32, "grad_theta")
    with triton_launch.record_launches() as rec:
        tb.forward_(torch.empty(M, out_f, device=DEVICE), rows, theta, proj, 0.0, None)
    assert rec[0].args["x_ptr"] is rows and rec[0].args["stride_xm"] == 2 * in_f
    # 3-D input through the op: a transposed (non-contiguous) batch
    x3 = torch.randn(M, 2, in_f, device=DEVICE).transpose(0, 1).requires_grad_(True)
    w = torch.randn(out_f, in_f, device=DEVICE) / 6
    theta = theta.clone().requires_grad_(True)
    out = ops.linear(x3, w, None, theta, proj.scales, r=r, hashed=proj.hashed, backend="triton")
    g = torch.randn_like(out)
    out.backward(g)
    ref = oracle(x3, theta, proj, weight=w, grad_out=g)
    assert_close(out, ref["out"], torch.float32, "out 3-D")
    assert_close(x3.grad, ref["grad_x"], torch.float32, "grad_x 3-D")
    assert_close(theta.grad, ref["grad_theta"], torch.float32, "grad_theta 3-D")


@pytest.mark.parametrize("kind", ["uniform", "hashed"])
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_layers_sharing_one_theta(knobs, kind, p):
    """Three chained layers read consecutive slices of D from one theta_d; grads accumulate."""
    knobs("auto", det=p > 0)
    dims = [(23, 31), (31, 17), (17, 29)]
    r, d = 3, 61
    offsets, off = [], 0
    for in_f, out_f in dims:
        offsets.append(off)
        off += r * (in_f + out_f)
    D = off
    index = torch.from_numpy(P.generate_index(D, d, 9))
    scales = P.uniform_scales(index.numpy(), d).to(DEVICE)
    projs = []
    for (in_f, out_f), o in zip(dims, offsets):
        if kind == "uniform":
            ia = index[o:o + r * in_f].view(r, in_f).to(DEVICE)
            ib = index[o + r * in_f:o + r * (in_f + out_f)].view(out_f, r).to(DEVICE)
            projs.append(backends.LayerProjection(ia, ib, scales, r, in_f, out_f, ()))
        else:
            e = torch.empty(0, dtype=torch.int32, device=DEVICE)
            projs.append(backends.LayerProjection(e, e, P.hashed_scales(D, d).to(DEVICE), r, in_f, out_f,
                                                  (D, o, P.splitmix64(9))))
    weights = [(torch.randn(o_, i_) / i_**0.5).to(DEVICE) for i_, o_ in dims]
    theta = random_theta(d, 3, device=DEVICE).requires_grad_(True)
    x = torch.randn(21, 23, device=DEVICE, requires_grad=True)  # 21 rows: the split schedule
    seeds = [torch.tensor([11 + i], dtype=torch.int64) for i in range(3)] if p > 0 else [None] * 3
    h = x
    for proj, w, s in zip(projs, weights, seeds):
        h = ops.linear(h, w, None, theta, proj.scales, proj.idx_a, proj.idx_b, r=r, hashed=proj.hashed,
                       dropout_p=p, seed=s, backend="triton")
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


# ------------------------------------------------------------------ determinism -------------
@pytest.mark.parametrize("kind", ["uniform", "hashed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_deterministic_mode_is_bit_identical_and_atomic_free(knobs, kind, dtype):
    knobs("split", det=True)
    M, in_f, out_f, r, p = 300, 90, 70, 6, 0.1
    proj = make_projection(in_f, out_f, r, 29, kind, seed=4, device=DEVICE)  # small d: many collisions
    x = torch.randn(M, in_f).to(DEVICE, dtype)
    theta = random_theta(29, device=DEVICE)
    g = torch.randn(M, out_f).to(DEVICE, dtype)
    runs = []
    for _ in range(2):
        out = torch.zeros(M, out_f, device=DEVICE, dtype=dtype)
        h = tb.forward_(out, x, theta, proj, p, 5)
        gx, gt = tb.backward(g, x, theta, proj, p, 5, h, None, True, True)
        runs.append((out, h, gx, gt))
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    ref = oracle(x, theta, proj, base_out=torch.zeros(M, out_f), p=p, seed=5, grad_out=g)
    assert_close(runs[0][3], ref["grad_theta"], dtype, "grad_theta")
    assert_close(runs[0][2], ref["grad_x"], dtype, "grad_x")
    # what ran: no split-K shrink (its atomics), DET variants storing partials, the CSR reduction
    with triton_launch.record_launches() as rec:
        h = tb.forward_(torch.zeros(M, out_f, device=DEVICE, dtype=dtype), x, theta, proj, p, 5)
        tb.backward(g, x, theta, proj, p, 5, h, None, True, True)
    names = [ln.launcher.name for ln in rec]
    assert names == ["shrink_kernel", "expand_kernel", "shrink_kernel", "bwd_x_kernel", "bwd_db_kernel",
                     "csr_reduce_kernel"]
    assert all(ln.grid[1] == 1 for ln in rec if ln.launcher.name == "shrink_kernel")
    splits = {ln.grid[1] for ln in rec if ln.launcher.name in ("bwd_x_kernel", "bwd_db_kernel")}
    assert all(ln.meta["DET"] for ln in rec if "DET" in ln.meta) and len(splits) == 1 and splits.pop() > 1
    assert rec[-1].args["splits"] > 1  # partial sums from several row splits, reduced in order


def test_csr_is_cached_per_projection_and_layer_sized(knobs):
    knobs("split", det=True)
    tb.clear_caches()
    proj = make_projection(40, 30, 4, 50, "uniform", device=DEVICE)
    theta = random_theta(50, device=DEVICE)
    csr = tb.csr_of(theta, proj)
    assert tb.csr_of(theta, proj) is csr
    n = 4 * (40 + 30)
    assert csr.cols.numel() == n and csr.rows.numel() == csr.U <= 50 and csr.rowptr[-1].item() == n
    flat = torch.cat([proj.idx_a.reshape(-1), proj.idx_b.reshape(-1)])
    assert torch.equal(flat[csr.cols.long()], torch.repeat_interleave(csr.rows, torch.diff(csr.rowptr).long()))
    proj.idx_a.add_(0)  # an in-place write to the table invalidates the cached CSR
    assert tb.csr_of(theta, proj) is not csr


# ------------------------------------------------------------------ projection math -----------
@pytest.mark.parametrize("D,d", [(1, 1), (3, 2), (4, 4), (17, 5), (64, 7), (65, 64), (1000, 33), (4**7, 100),
                                 (4**7 + 1, 999), (2 * 4**8 - 3, 12345), (100_003, 100_003)])
def test_hashed_index_helper_is_bit_exact(D, d):
    """The @triton.jit Feistel helper equals projection.hashed_index for every position of D."""
    key = P.splitmix64(D * 7 + d)
    for k in (key, key | (1 << 62) | 0xFFFFFFFF):  # round keys with the top bit set, as int32 bit patterns
        e = torch.empty(0, dtype=torch.int32, device=DEVICE)
        proj = backends.LayerProjection(e, e, P.hashed_scales(D, d).to(DEVICE), 1, D, 0, (D, 0, k))
        got = tb.layer_index(torch.zeros(d, device=DEVICE), proj).cpu()
        want = P.hashed_index(torch.arange(D), D, d, k)
        assert got.dtype == torch.int32 and torch.equal(got.long(), want)


@pytest.mark.parametrize("kind", ["uniform", "hashed"])
def test_lora_matrices_equal_the_reference_bit_for_bit(kind):
    proj = make_projection(37, 29, 5, 41, kind, extra_layers=2, device=DEVICE)
    theta = random_theta(41, device=DEVICE)
    A, B = tb.lora_matrices(theta, proj)
    A_ref, B_ref = reference.lora_matrices(theta, proj)
    assert A.dtype == B.dtype == torch.float32 and A.shape == (5, 37) and B.shape == (29, 5)
    assert torch.equal(A, A_ref) and torch.equal(B, B_ref)


# ------------------------------------------------------------------ schedules ---------------
def test_schedule_heuristic_and_decode_is_one_launch(knobs):
    knobs("auto")
    assert tb.schedule_for(1) == tb.schedule_for(DECODE_MAX_M) == "fused"
    assert tb.schedule_for(DECODE_MAX_M + 1) == "split"
    proj = make_projection(64, 48, 8, D_SMALL, "hashed", device=DEVICE)
    theta = random_theta(D_SMALL, device=DEVICE)
    for M, expected in ((1, ["fused_fwd_kernel"]), (DECODE_MAX_M + 1, ["shrink_kernel", "expand_kernel"])):
        with triton_launch.record_launches() as rec:
            tb.forward_(torch.empty(M, 48, device=DEVICE), torch.empty(M, 64, device=DEVICE), theta, proj, 0.0, None)
        assert [ln.launcher.name for ln in rec] == expected
    knobs("sideways")
    with pytest.raises(ValueError, match="UNILORA_TRITON_SCHEDULE"):
        tb.schedule_for(4)


def test_autotuned_launches_restore_their_outputs(knobs):
    """Autotuning times every config on the real buffers: each must leave them as one run would."""
    M, in_f, out_f, r = 40, 70, 50, 16
    proj = make_projection(in_f, out_f, r, D_SMALL, "uniform", device=DEVICE)
    theta = random_theta(D_SMALL, device=DEVICE)
    x = torch.randn(M, in_f, device=DEVICE).half()
    base = torch.randn(M, out_f, device=DEVICE).half()
    g = torch.randn(M, out_f, device=DEVICE).half()
    ref = oracle(x, theta, proj, base_out=base, p=0.1, seed=3, grad_out=g)
    gx0 = torch.randn(M, in_f, device=DEVICE).half()
    with triton_launch.autotune(True):
        for schedule in ("fused", "split"):
            knobs(schedule)
            out = base.clone()
            h = tb.forward_(out, x, theta, proj, 0.1, 3)
            gx, gt = tb.backward(g, x, theta, proj, 0.1, 3, h, gx0.clone(), True, True)
            assert_close(out, ref["out"], torch.float16, f"out ({schedule})")
            assert_close(gx, ref["grad_x"] + gx0.double().to(ref["grad_x"].device), torch.float16, "grad_x")
            assert_close(gt, ref["grad_theta"], torch.float16, "grad_theta")


def test_dropout_one_drops_everything():
    proj = make_projection(30, 20, 3, D_SMALL, "uniform", device=DEVICE)
    theta = random_theta(D_SMALL, device=DEVICE)
    x, base, g = torch.randn(9, 30, device=DEVICE), torch.randn(9, 20, device=DEVICE), torch.randn(9, 20, device=DEVICE)
    out = base.clone()
    h = tb.forward_(out, x, theta, proj, 1.0, 1)
    gx, gt = tb.backward(g, x, theta, proj, 1.0, 1, h, None, True, True)
    assert torch.equal(out, base) and not h.any() and not gx.any() and not gt.any()


# ------------------------------------------------------------------ errors ------------------
def test_bad_inputs_raise_clear_errors(monkeypatch):
    proj = make_projection(9, 5, 2, 11, "uniform", device=DEVICE)
    theta = random_theta(11, device=DEVICE)
    x, out = torch.randn(3, 9, device=DEVICE), torch.zeros(3, 5, device=DEVICE)
    with pytest.raises(TypeError, match="backend='reference'"):
        tb.forward_(out.double(), x.double(), theta, proj, 0.0, None)
    with pytest.raises(TypeError, match="backend='reference'"):
        tb.forward_(out, x, theta.double(), proj, 0.0, None)
    with pytest.raises(TypeError, match="backend='reference'"):  # gradcheck through the op
        ops.linear(x.double().requires_grad_(True), torch.randn(5, 9, dtype=torch.float64, device=DEVICE), None,
                   theta.double(), proj.scales, proj.idx_a, proj.idx_b, backend="triton")
    big = make_projection(9, 5, 65, 11, "uniform", device=DEVICE)
    with pytest.raises(ValueError, match="r from 1 to 64"):
        tb.forward_(out, x, theta, big, 0.0, None)
    with pytest.raises(ValueError, match="unit-stride"):
        tb.forward_(torch.zeros(5, 3, device=DEVICE).t(), x, theta, proj, 0.0, None)
    with pytest.raises(ValueError, match="needs a seed"):
        tb.forward_(out, x, theta, proj, 0.5, None)
    with pytest.raises(ValueError, match="contiguous int32"):
        tb.forward_(out, x, theta, proj._replace(idx_a=proj.idx_a.long()), 0.0, None)
    monkeypatch.setattr(tb, "INTERPRET", False)
    assert "TRITON_INTERPRET=1" in tb.device_unavailable_reason("triton", "cpu")
    if DEVICE == "cpu":
        with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
            tb.forward_(out, x, theta, proj, 0.0, None)


# ------------------------------------------------------------------ models ------------------
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.mark.parametrize("projection", ["uniform", "hashed"])
def test_tiny_llama_triton_equals_reference(projection):
    torch.manual_seed(0)
    base = tiny_llama().to(DEVICE)
    models = {}
    for backend in ("triton", "reference"):
        cfg = uk.UniLoRAConfig(r=4, theta_d_length=301, target_modules=TARGETS, unilora_dropout=0.1,
                               projection=projection, backend=backend)
        models[backend] = uk.inject(copy.deepcopy(base), cfg).train()
    with torch.no_grad():  # a visible update: theta ~ U(-1, 1)
        theta0 = torch.rand(301, device=DEVICE) * 2 - 1
        for m in models.values():
            m.unilora_theta_d.copy_(theta0)
    results = {}
    for backend, model in models.items():
        torch.manual_seed(7)  # the same dropout seeds in both runs
        ids = torch.randint(0, 61, (2, 11), device=DEVICE)  # M = 22 rows: split schedule
        out = model(ids, labels=ids)
        out.loss.backward()
        with torch.no_grad():  # decode-sized step: M = 1, the fused kernel
            step = model.eval()(ids[:1, :1]).logits
        results[backend] = (out.logits.detach(), model.unilora_theta_d.grad.clone(), step)
    (lt, gt, st), (lr, gr, sr) = results["triton"], results["reference"]
    assert gr.abs().max() > 0
    for a, b, what in ((lt, lr, "logits"), (gt, gr, "theta grad"), (st, sr, "decode logits")):
        err = (a - b).abs().max().item()
        assert err <= 1e-4 * max(1.0, b.abs().max().item()), f"{what}: {err:.2e}"


def test_torch_compile_fullgraph_has_no_graph_breaks():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(24, 40), nn.ReLU(), nn.Linear(40, 24), nn.ReLU(), nn.Linear(24, 8))
    cfg = uk.UniLoRAConfig(r=4, theta_d_length=97, target_modules=["0", "2", "4"], unilora_dropout=0.1,
                           backend="triton")
    eager = uk.inject(net, cfg).to(DEVICE).train()
    with torch.no_grad():
        eager.unilora_theta_d.uniform_(-1, 1)
    model = copy.deepcopy(eager)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(5, 24, device=DEVICE)
    results = []
    for m in (eager, compiled):
        torch.manual_seed(3)
        y = m(x)
        y.square().sum().backward()
        theta = m.unilora_theta_d if m is eager else model.unilora_theta_d
        results.append((y.detach(), theta.grad.clone()))
    assert torch.allclose(results[0][0], results[1][0], rtol=1e-5, atol=1e-6)
    assert torch.allclose(results[0][1], results[1][1], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ real sizes (GPU) ---------
@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 4096])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind,p,r", [("uniform", 0.0, 16), ("hashed", 0.1, 64)])
def test_gpu_real_sizes_match_oracle(knobs, M, dtype, kind, p, r):
    knobs("auto")
    in_f = out_f = 4096
    proj = make_projection(in_f, out_f, r, 23_040, kind, seed=1, device="cuda", extra_layers=3)
    theta = random_theta(23_040, device="cuda").requires_grad_(True)
    x = torch.randn(M, in_f, device="cuda").to(dtype).requires_grad_(True)
    w = (torch.randn(out_f, in_f, device="cuda") / 64).to(dtype)
    seed = _seed(p)
    out = ops.linear(x, w, None, theta, proj.scales, proj.idx_a, proj.idx_b, r=r, hashed=proj.hashed,
                     dropout_p=p, seed=seed, backend="triton")
    g = torch.randn_like(out)
    out.backward(g)
    ref = oracle(x, theta, proj, weight=w, p=p, seed=_value(seed), grad_out=g)
    assert_close(out, ref["out"], dtype, "out")
    assert_close(x.grad, ref["grad_x"], dtype, "grad_x")
    assert_close(theta.grad, ref["grad_theta"], dtype, "grad_theta")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_gpu_deterministic_mode_is_bit_identical(knobs, dtype):
    knobs("auto", det=True)
    M, in_f, out_f, r = 4096, 4096, 1024, 32
    proj = make_projection(in_f, out_f, r, 4096, "uniform", device="cuda")
    theta = random_theta(4096, device="cuda")
    x = torch.randn(M, in_f, device="cuda").to(dtype)
    g = torch.randn(M, out_f, device="cuda").to(dtype)
    runs = []
    for _ in range(2):
        out = torch.zeros(M, out_f, device="cuda", dtype=dtype)
        h = tb.forward_(out, x, theta, proj, 0.1, 9)
        runs.append((out, *tb.backward(g, x, theta, proj, 0.1, 9, h, None, True, True)))
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    ref = oracle(x, theta, proj, base_out=torch.zeros(M, out_f, device="cuda"), p=0.1, seed=9, grad_out=g)
    assert_close(runs[0][2], ref["grad_theta"], dtype, "grad_theta")


@pytest.mark.gpu
def test_gpu_torch_compile_inductor_fullgraph():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(512, 1024), nn.GELU(), nn.Linear(1024, 512)).cuda().bfloat16()
    model = uk.inject(net, uk.UniLoRAConfig(r=16, theta_d_length=4096, target_modules=["0", "2"], backend="triton"))
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(64, 512, device="cuda", dtype=torch.bfloat16)
    y = compiled(x)
    y.float().square().mean().backward()
    ref = model(x)
    assert_close(y, ref, torch.bfloat16, "compiled out")
    assert model.unilora_theta_d.grad is not None and model.unilora_theta_d.grad.abs().sum() > 0
