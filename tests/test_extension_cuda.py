"""The ``cuda`` backend on a GPU (``gpu`` marker; skipped where there is none).

The backend contract (tests/test_backend_contract.py) runs ``cuda`` on odd shapes, gradcheck
included; here, at real sizes: the fused decode kernel (M <= 16) and the gather + cuBLAS path
against the float64 oracle, the atomic and the deterministic scatter, the header's bit-exact index
and dropout math, opcheck of the C++ ops, linear_autograd (every needs-grad combination, device
seeds), a CUDA seed refused by a CPU op, and CUDA-graph capture of the cooperative decode launch
and of forward + backward with dropout drawing a fresh seed on the device per replay.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from contract import check_linear_autograd, check_primitives
from oracle import assert_close, make_projection, oracle, random_theta
from unilora_kernels import backends, philox
from unilora_kernels import projection as P
from unilora_kernels.build_info import extension_info

pytestmark = pytest.mark.gpu

INFO = extension_info()
if not (INFO.get("built") and INFO.get("cuda")):
    pytestmark = [pytest.mark.gpu, pytest.mark.skip(reason=f"extension not built with CUDA kernels: {INFO}")]
else:
    from unilora_kernels.backends import extension as ext

    C = torch.ops.unilora_C

DEV = "cuda"
D_THETA = 23_040
# (M, in, out, r): decode rows (1, 5, 16 -> fused kernel), 17 and 2048 -> cuBLAS; real layer widths
SHAPES = [(1, 4096, 4096, 4), (5, 4096, 11008, 16), (16, 11008, 4096, 64), (17, 4096, 4096, 4), (2048, 1024, 1024, 4),
          (3, 37, 53, 3), (300, 61, 19, 65)]
DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def _inputs(shape, dtype, kind, extra_layers=1):
    M, in_f, out_f, r = shape
    proj = make_projection(in_f, out_f, r, D_THETA, kind, seed=1, device=DEV, extra_layers=extra_layers)
    theta = random_theta(D_THETA, 3, DEV)
    x = torch.randn(M, in_f, device=DEV).to(dtype)
    return proj, theta, x


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "M%d-in%d-out%d-r%d" % s)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["uniform", "hashed"])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_cuda_backend_matches_oracle_at_real_sizes(shape, dtype, kind, p):
    """The contract's primitives check (tests/contract.py) at real layer widths and d."""
    check_primitives(ext, DEV, shape, dtype, kind, p, d=D_THETA)


@pytest.mark.parametrize("M", [1, 2, 7, 16])
def test_decode_kernel_equals_cublas_path_and_is_reproducible(M):
    """The fused kernel (fp32) against the same update computed by the fp64 path of the backend."""
    proj, theta, x = _inputs((M, 4096, 4096, 16), torch.float32, "uniform")
    base = torch.randn(M, 4096, device=DEV)
    out1, out2 = base.clone(), base.clone()
    h1 = ext.forward_(out1, x, theta, proj, 0.0, None)
    h2 = ext.forward_(out2, x, theta, proj, 0.0, None)
    assert torch.equal(out1, out2) and torch.equal(h1, h2)  # fixed reduction order
    out64 = base.double()
    ext.forward_(out64, x.double(), theta.double(), proj, 0.0, None)
    assert_close(out1, out64, torch.float32, "decode vs fp64")


def test_deterministic_scatter_is_bitwise_the_cpu_scatter():
    proj, _, _ = _inputs((1, 1000, 700, 8), torch.float32, "uniform")
    dA = torch.randn(8, 1000, device=DEV)
    dB = torch.randn(700, 8, device=DEV)
    args = (proj.scales, proj.idx_a, proj.idx_b, D_THETA, [], torch.float32)
    gpu = C.scatter_grad(dA, dB, *args, True)
    cpu = C.scatter_grad(dA.cpu(), dB.cpu(), proj.scales.cpu(), proj.idx_a.cpu(), proj.idx_b.cpu(), D_THETA, [],
                         torch.float32, True)
    assert torch.equal(gpu.cpu(), cpu)
    assert torch.equal(C.scatter_grad(dA, dB, *args, True), gpu)
    assert_close(C.scatter_grad(dA, dB, *args, False), gpu.double(), torch.float32, "atomic vs sorted")


def test_header_bit_exact_on_gpu():
    g = torch.Generator().manual_seed(0)
    for D in (1, 17, 4096, 23_040 * 11 + 5, 2**31 - 1):
        pos = torch.randint(0, D, (20_000,), generator=g, dtype=torch.int64)
        for d in (1, 7, 23_040):
            key = P.splitmix64(D)
            assert torch.equal(C._hashed_index(pos.to(DEV), D, d, key).cpu(), P.hashed_index(pos, D, d, key))
    offsets = torch.randint(0, 2**62, (20_000,), generator=g, dtype=torch.int64)
    for seed in (0, 987654321, 2**62 - 1):
        assert torch.equal(C._philox_randint(offsets.to(DEV), seed).cpu(), philox.philox_randint(seed, offsets))


@pytest.mark.parametrize("kind", ["uniform", "hashed"])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_opcheck_every_cpp_op_on_cuda(kind, p):
    M, in_f, out_f, r, d = 6, 11, 7, 3, 13
    proj = make_projection(in_f, out_f, r, d, kind, device=DEV)
    theta = random_theta(d, 0, DEV)
    x, out, g = torch.randn(M, in_f, device=DEV), torch.randn(M, out_f, device=DEV), torch.randn(M, out_f, device=DEV)
    seed = torch.tensor([777], device=DEV) if p else None
    common = (theta, proj.scales, proj.idx_a, proj.idx_b, r, list(proj.hash_params), p, seed)
    for xs in (x, x.double()):  # fused decode kernel, and the fp64 cuBLAS path
        torch.library.opcheck(C.forward_.default, (out.to(xs.dtype).clone(), xs) + common)
    h = C.forward_(out.clone(), x, *common)
    for grad_x, need_x, need_t, det in ((None, True, True, False), (torch.randn(M, in_f, device=DEV), True, False,
                                                                     False), (None, False, True, True)):
        torch.library.opcheck(C.backward.default, (g, x) + common + (h, grad_x, need_x, need_t, det))
    args = (proj.scales, proj.idx_a, proj.idx_b, r, in_f, out_f, list(proj.hash_params))
    torch.library.opcheck(C.lora_matrices.default, (theta.clone().requires_grad_(True),) + args)
    dA = torch.randn(r, in_f, device=DEV, requires_grad=True)
    dB = torch.randn(out_f, r, device=DEV, requires_grad=True)
    for det in (False, True):
        torch.library.opcheck(C.scatter_grad.default,
                              (dA, dB, proj.scales, proj.idx_a, proj.idx_b, d, list(proj.hash_params), torch.float32, det))


def test_decode_forward_captures_in_a_cuda_graph():
    """The cooperative decode launch must be capturable (serving runs decode in CUDA graphs)."""
    proj, theta, x = _inputs((4, 4096, 4096, 16), torch.bfloat16, "uniform")
    base = torch.randn(4, 4096, device=DEV).to(torch.bfloat16)
    out = base.clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        ext.forward_(out, x, theta, proj, 0.0, None)  # warm-up (occupancy query, allocator)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    out.copy_(base)
    with torch.cuda.graph(graph):
        ext.forward_(out, x, theta, proj, 0.0, None)
    out.copy_(base)
    graph.replay()
    expected = base.clone()
    ext.forward_(expected, x, theta, proj, 0.0, None)
    torch.cuda.synchronize()
    assert torch.equal(out, expected)


def test_backend_resolution_and_prefer_rule():
    assert backends.get_backend("cuda", "cuda") is ext
    assert ext.prefer_cuda_kernels(1, 4096, 4096, 16) and not ext.prefer_cuda_kernels(2048, 4096, 4096, 16)
    # auto on CUDA: decode-sized calls go to the cuda kernels, everything else to Triton
    if backends.availability()["triton"] is None:
        assert backends.resolve("auto", "cuda", (1, 4096, 4096, 16)) == "cuda"
        assert backends.resolve("auto", "cuda", (2048, 4096, 4096, 16)) == "triton"
        assert backends.resolve("auto", "cuda") == "triton"


@pytest.mark.parametrize("M", [1, 16, 300])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_linear_autograd_on_cuda(M, dtype):
    """unilora_C::linear_autograd (UniLoRALinear's eager training path) on CUDA tensors."""
    check_linear_autograd(ext, DEV, (M, 1024, 512, 4), dtype, weight_t=False, with_bias=True, p=0.0)


@pytest.mark.parametrize("M", [4, 300])  # the fused decode forward, and prepare + cuBLAS
@pytest.mark.parametrize("weight_t", [False, True], ids=["linear", "conv1d"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_linear_autograd_on_cuda_with_device_seed_matches_oracle(M, weight_t, dtype):
    """linear_autograd on CUDA with dropout and a seed drawn on the device: out and every
    gradient (x, theta, a trainable weight and bias) against the float64 oracle, for every subset
    of inputs that needs a gradient."""
    in_f, out_f, r, p = 192, 160, 8, 0.3
    proj = make_projection(in_f, out_f, r, 997, "uniform", seed=1, device=DEV, extra_layers=1)
    seed = torch.randint(0, 2**62, (1,), device=DEV)
    value = int(seed.item())  # the test reads it, for the oracle; the op never does
    theta0 = random_theta(997, 3, DEV)
    w0 = ((torch.randn(in_f, out_f) if weight_t else torch.randn(out_f, in_f)) / in_f**0.5).to(DEV, dtype)
    b0 = torch.randn(out_f).to(DEV, dtype)
    x0 = torch.randn(M, in_f).to(DEV, dtype)
    g = torch.randn(M, out_f).to(DEV, dtype)
    ref = oracle(x0, theta0, proj, weight=w0, bias=b0, weight_t=weight_t, p=p, seed=value, grad_out=g)
    x64, g64 = x0.double().cpu(), g.double().cpu()
    ref["grad_weight"] = x64.t() @ g64 if weight_t else g64.t() @ x64
    for need in itertools.product([False, True], repeat=4):
        x, w, b, theta = (t.clone().requires_grad_(n) for t, n in zip((x0, w0, b0, theta0), need))
        out = ext.linear_autograd(x, w, b, weight_t, theta, proj, p, seed)
        assert_close(out, ref["out"], dtype, f"out {need}")
        wanted = [(t, name) for t, name, n in zip((x, w, b, theta), ("grad_x", "grad_weight", "grad_bias",
                                                                        "grad_theta"), need) if n]
        if not wanted:
            assert not out.requires_grad
            continue
        grads = torch.autograd.grad(out, [t for t, _ in wanted], g)
        for got, (_, name) in zip(grads, wanted):
            assert_close(got, ref[name], dtype, f"{name} {need}")


def test_cuda_seed_on_a_cpu_op_is_refused():
    proj, theta, x = _inputs((3, 37, 53, 3), torch.float32, "uniform")
    proj_cpu = proj._replace(idx_a=proj.idx_a.cpu(), idx_b=proj.idx_b.cpu(), scales=proj.scales.cpu())
    xc, tc, out = x.cpu(), theta.cpu(), torch.zeros(3, 53)
    seed = torch.tensor([5], device=DEV)
    with pytest.raises(ValueError, match="dropout seed of a CPU call must be a CPU tensor"):
        ext.forward_(out, xc, tc, proj_cpu, 0.5, seed)
    with pytest.raises(RuntimeError, match="a CPU op reads its dropout seed on the host, so it must be a CPU tensor"):
        C.forward_(out, xc, tc, proj_cpu.scales, proj_cpu.idx_a, proj_cpu.idx_b, 3, [], 0.5, seed)


@pytest.mark.parametrize("M", [4, 96])  # decode forward (one launch) and prepare + cuBLAS
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_forward_backward_capture_in_a_cuda_graph_with_fresh_dropout(M, dtype):
    """Forward and backward of the cuda backend inside torch.cuda.graph capture, with dropout whose
    seed is drawn on the device in the graph: each replay draws a fresh mask (the kernels load the
    seed; nothing was read on the host at capture), and each replay matches the float64 oracle
    for the seed it drew."""
    in_f, out_f, r, p = 256, 192, 8, 0.25
    proj, theta, x = _inputs((M, in_f, out_f, r), dtype, "uniform")
    base = torch.randn(M, out_f, device=DEV).to(dtype)
    g = torch.randn(M, out_f, device=DEV).to(dtype)
    seed = torch.zeros(1, dtype=torch.int64, device=DEV)
    out = base.clone()

    def step():
        seed.copy_(torch.randint(0, 2**62, (1,), device=DEV))
        out.copy_(base)
        h = ext.forward_(out, x, theta, proj, p, seed)
        return ext.backward(g, x, theta, proj, p, seed, h, None, True, True)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()  # warm-up outside the capture (occupancy query, allocator)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        gx, gt = step()
    seen = set()
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        value = int(seed.item())
        seen.add(value)
        ref = oracle(x, theta, proj, base_out=base, p=p, seed=value, grad_out=g)
        assert_close(out, ref["out"], dtype, "out")
        assert_close(gx, ref["grad_x"], dtype, "grad_x")
        assert_close(gt, ref["grad_theta"], dtype, "grad_theta")
    assert len(seen) == 3, "every replay must draw a fresh seed"


@pytest.mark.parametrize("weight_t", [False, True], ids=["linear", "conv1d"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["uniform", "hashed"])
def test_fold_schedule_matches_oracle(weight_t, dtype, kind):
    """fold_min_m: a call of at least that many rows runs one GEMM on W + B A (cuda_fold.cu), returns
    an h of no rows, and its backward folds again (grad_x = g W', h, gB, dA, dB, one scatter); a
    smaller call keeps the split schedule. Both equal the float64 oracle; opcheck passes with it."""
    for M, fold in ((301, True), (200, False)):
        proj, theta, x = _inputs((M, 1031, 517, 5), dtype, kind)
        w = (torch.randn(517, 1031, device=DEV) / 1031**0.5).to(dtype)
        wt = w.t().contiguous() if weight_t else w
        b = torch.randn(517, device=DEV).to(dtype)
        g = torch.randn(M, 517, device=DEV).to(dtype)
        common = (theta, proj.scales, proj.idx_a, proj.idx_b, proj.r, list(proj.hash_params), 0.0, None)
        out, h = C.linear(x, wt, b, weight_t, *common, 300)
        assert h.shape[0] == (0 if fold else M)
        gx, gt = C.linear_backward(g, x, wt, weight_t, *common, h, True, True, False, 300)
        ref = oracle(x, theta, proj, weight=wt, bias=b, weight_t=weight_t, grad_out=g)
        assert_close(out, ref["out"], dtype, f"M={M}: out")
        assert_close(gx, ref["grad_x"], dtype, f"M={M}: grad_x")
        assert_close(gt, ref["grad_theta"], dtype, f"M={M}: grad_theta")


def test_fold_schedule_opcheck():
    """opcheck of the linear ops with a fold threshold the call reaches (an h of no rows) on CUDA, and
    of the shared schedule's test ops."""
    proj, theta, x = _inputs((301, 129, 67, 3), torch.bfloat16, "uniform")
    w = torch.randn(67, 129, device=DEV).to(torch.bfloat16)
    b = torch.randn(67, device=DEV).to(torch.bfloat16)
    g = torch.randn(301, 67, device=DEV).to(torch.bfloat16)
    common = (theta, proj.scales, proj.idx_a, proj.idx_b, proj.r, list(proj.hash_params), 0.0, None)
    torch.library.opcheck(C.linear.default, (x, w, b, False) + common + (300,))
    h0 = torch.empty(0, proj.r, device=DEV)
    torch.library.opcheck(C.linear_backward.default, (g, x, w, False) + common + (h0, True, True, False, 300))
    torch.library.opcheck(C._fold_linear.default, (x, w, b, False) + common[:6])
    torch.library.opcheck(C._fold_linear_backward.default, (g, x, w, False) + common[:6] + (True, True, False))
