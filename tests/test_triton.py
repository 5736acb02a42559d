"""What only the Triton backend has: schedules, launches, deterministic mode, the CSR cache, the
@triton.jit index helper, autotuning, torch.compile, and real layer sizes on a GPU.

Every op and primitive against the float64 oracle: tests/test_backend_contract.py (shared checks
in tests/contract.py). Without a GPU the kernels run under the Triton interpreter on CPU tensors
(conftest sets TRITON_INTERPRET=1), with the GPU default tile configs (``interpreter_tiles("gpu")``),
so masks, K loops, split reductions and the fp32 rank chunks are the ones a GPU runs. Under the
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
from contract import check_op, check_primitives
from oracle import assert_close, make_projection, oracle, random_theta
import unilora_kernels as uk
from unilora_kernels import backends, ops
from unilora_kernels import projection as P
from unilora_kernels.backends import triton_launch
from unilora_kernels.backends.policy import DECODE_MAX_M

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
try:
    tb = backends.get_backend("triton", DEVICE)
    _REASON = None
except backends.BackendNotAvailableError as exc:  # e.g. triton not installed
    tb, _REASON = None, str(exc)
pytestmark = pytest.mark.skipif(tb is None, reason=f"triton backend unavailable on {DEVICE}: {_REASON}")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
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


# The forced schedules off their home ground (the contract runs "auto"): fused past the decode
# limit (several row blocks), split at decode sizes; each with and without deterministic mode.
@pytest.mark.parametrize("schedule,det,shape,dtype,kind,p,dims,variant", [
    ("fused", False, (40, 67, 131, 16), torch.float16, "hashed", 0.3, 3, "linear_bias"),
    ("fused", True, (40, 150, 53, 64), torch.float32, "uniform", 0.0, 2, "conv1d"),
    ("split", False, (3, 150, 53, 3), torch.bfloat16, "uniform", 0.3, 3, "add_update"),
    ("split", True, (1, 37, 53, 1), torch.float16, "hashed", 0.3, 2, "linear_nobias"),
], ids=lambda v: str(v)[6:] if isinstance(v, torch.dtype) else None)
def test_forced_schedules_match_oracle(knobs, schedule, det, shape, dtype, kind, p, dims, variant):
    knobs(schedule, det)
    check_op("triton", DEVICE, shape, dtype, kind, p, dims, variant)


@pytest.mark.parametrize("kind", ["uniform", "hashed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_split_schedule_primitives_match_oracle(knobs, kind, dtype):
    """forward_/backward called directly under the split schedule, rank 5 (padded to 8)."""
    knobs("split")
    check_primitives(tb, DEVICE, (45, 70, 33, 5), dtype, kind, 0.2)


def test_row_strided_input_is_read_in_place(knobs):
    """A unit-column-stride input goes to the kernel as it is, with its row stride (no copy)."""
    knobs("split")
    M, in_f, out_f, r = 19, 33, 27, 4
    proj = make_projection(in_f, out_f, r, D_SMALL, "hashed", device=DEVICE)
    theta = random_theta(D_SMALL, device=DEVICE)
    rows = torch.randn(M, 2 * in_f, device=DEVICE)[:, 5:5 + in_f]
    with triton_launch.record_launches() as rec:
        tb.forward_(torch.empty(M, out_f, device=DEVICE), rows, theta, proj, 0.0, None)
    assert rec[0].args["x_ptr"] is rows and rec[0].args["stride_xm"] == 2 * in_f


@pytest.mark.parametrize("layout", ["expanded_scalar", "expanded_row", "transposed"])
@pytest.mark.parametrize("det", [False, True])
def test_strided_grad_out_is_read_in_place(knobs, layout, det):
    """grad_out of any strides (``sum()``'s is a stride-0 expansion, a transpose has column stride M)
    goes to the kernels as it is: the gradients match the float64 oracle and g is never copied."""
    knobs("split", det)
    M, in_f, out_f, r, p = 37, 45, 29, 4, 0.2
    proj = make_projection(in_f, out_f, r, D_SMALL, "hashed", device=DEVICE)
    theta = random_theta(D_SMALL, device=DEVICE)
    x = torch.randn(M, in_f, device=DEVICE)
    g = {"expanded_scalar": torch.full((), 0.7, device=DEVICE).expand(M, out_f),
         "expanded_row": torch.randn(1, out_f, device=DEVICE).expand(M, out_f),
         "transposed": torch.randn(out_f, M, device=DEVICE).t()}[layout]
    assert not g.is_contiguous()
    seed = 11
    ref = oracle(x, theta, proj, base_out=torch.zeros(M, out_f), p=p, seed=seed, grad_out=g.contiguous())
    h = tb.forward_(torch.zeros(M, out_f, device=DEVICE), x, theta, proj, p, seed)
    gx, gt = tb.backward(g, x, theta, proj, p, seed, h, None, True, True)
    assert_close(gx, ref["grad_x"], torch.float32, f"grad_x ({layout})")
    assert_close(gt, ref["grad_theta"], torch.float32, f"grad_theta ({layout})")
    with triton_launch.record_launches() as rec:
        tb.backward(g, x, theta, proj, p, seed, h, None, True, True)
    g_reads = [(l.args.get("x_ptr", l.args.get("g_ptr")), l.args.get("stride_xk", l.args.get("stride_gn")))
               for l in rec if l.args.get("x_ptr") is g or l.args.get("g_ptr") is g]
    assert len(g_reads) == 2 and all(stride == g.stride(1) for _, stride in g_reads), g_reads  # gB and dB


def test_layer_backward_of_sum_reads_the_expanded_grad(knobs):
    """A layer's ``y.sum().backward()``: the plan hands the expanded grad_out to the kernels (no copy)."""
    knobs("split")
    layer = uk.UniLoRALinear(nn.Linear(33, 21), r=4, theta_d_length=D_SMALL, backend="triton").to(DEVICE)
    x = torch.randn(40, 33, device=DEVICE, requires_grad=True)
    with triton_launch.record_launches() as rec:
        layer(x).sum().backward()
    g_reads = [l.args for l in rec if "stride_gn" in l.args or l.args.get("stride_xk", 1) != 1]
    assert len(g_reads) == 2 and all(a.get("stride_gn", a.get("stride_xk")) == 0 for a in g_reads), g_reads
    x.grad = layer.theta_d.grad = None
    layer(x).sum().backward()
    ref = copy.deepcopy(layer).double()
    ref.backend = "reference"
    x64 = x.detach().double().requires_grad_(True)
    ref(x64).sum().backward()
    assert_close(x.grad, x64.grad, torch.float32, "grad_x")
    assert_close(layer.theta_d.grad, ref.theta_d.grad, torch.float32, "grad_theta")


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
# Every bit width of the permutation's domain up to 15 (odd and even halves, heavy cycle-walking
# at 65 and 4**7 + 1); the 17-bit domains take minutes in the interpreter: slow.
@pytest.mark.parametrize("D,d", [(1, 1), (3, 2), (4, 4), (17, 5), (64, 7), (65, 64), (1000, 33), (4**7, 100),
                                 (4**7 + 1, 999), pytest.param(2 * 4**8 - 3, 12345, marks=pytest.mark.slow),
                                 pytest.param(100_003, 100_003, marks=pytest.mark.slow)])
def test_hashed_index_helper_is_bit_exact(D, d):
    """The @triton.jit Feistel helper equals projection.hashed_index for every position of D."""
    key = P.splitmix64(D * 7 + d)
    for k in (key, key | (1 << 62) | 0xFFFFFFFF):  # round keys with the top bit set, as int32 bit patterns
        e = torch.empty(0, dtype=torch.int32, device=DEVICE)
        proj = backends.LayerProjection(e, e, P.hashed_scales(D, d).to(DEVICE), 1, D, 0, (D, 0, k))
        got = tb.layer_index(torch.zeros(d, device=DEVICE), proj).cpu()
        want = P.hashed_index(torch.arange(D), D, d, k)
        assert got.dtype == torch.int32 and torch.equal(got.long(), want)


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


# hashed: the interpreter evaluates the permutation per tile element (minutes); the contract
# covers the hashed kernels op by op, several layers of one D included
@pytest.mark.parametrize("projection", ["uniform", pytest.param("hashed", marks=pytest.mark.slow)])
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
    check_op("triton", "cuda", (M, 4096, 4096, r), dtype, kind, p, 2, "linear_nobias", d=23_040)


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
