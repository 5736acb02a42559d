"""The ``cuda`` backend on a GPU (``gpu`` marker; skipped where there is none).

The backend contract (tests/test_backend_contract.py) runs ``cuda`` on odd shapes, gradcheck
included; here, at real sizes: the fused decode kernel (M <= 16) and the gather + cuBLAS path
against the float64 oracle, the atomic and the deterministic scatter, the header's bit-exact index
and dropout math, opcheck of the C++ ops, linear_autograd, and CUDA-graph capture of the
cooperative decode launch.
"""

from __future__ import annotations

import pytest
import torch

from contract import check_linear_autograd, check_primitives
from oracle import assert_close, make_projection, random_theta
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
    common = (theta, proj.scales, proj.idx_a, proj.idx_b, r, list(proj.hash_params), p, 777 if p else 0)
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
