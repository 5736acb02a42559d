"""The large-M schedule: fold ``W' = W + B A`` and run one GEMM (backward: ``g W'``, ``gB`` and ``dB`` in
one pass over g, ``dA`` in one pass over x), its threshold (``policy.fold_min_m`` from
``backends/cost_model.py``, ``UNILORA_FOLD_MIN_M``) and its bound (``UNILORA_FOLD_MAX_MIB``).

Triton kernels run under the interpreter here, against the float64 oracle, on odd shapes (no size a
multiple of a block), nn.Linear and Conv1D layouts, uniform and hashed projections, fp32 and fp16.
The cpu backend's fold takes its threshold from the same rule through the ops' ``fold_min_m``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import unilora_kernels as uk
from oracle import assert_close, lora_AB64, make_projection, oracle, random_theta
from unilora_kernels import backends
from unilora_kernels.backends import PlanSpec, cost_model, policy, row_bucket

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _backend(name: str, device: str = DEVICE):
    try:
        return backends.get_backend(name, device)
    except backends.BackendNotAvailableError as exc:
        pytest.skip(f"backend {name} unavailable on {device}: {exc}")


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    for k in ("UNILORA_FOLD_MIN_M", "UNILORA_FOLD_MAX_MIB", "UNILORA_TRITON_SCHEDULE", "UNILORA_DETERMINISTIC"):
        monkeypatch.delenv(k, raising=False)
    from unilora_kernels.backends import triton_launch

    with triton_launch.interpreter_tiles("gpu"):  # the GPU default configs: several tiles per odd shape
        yield


# ------------------------------------------------------------------ the cost model ---------------
@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("K,N", [(4096, 4096), (4096, 11008), (11008, 4096), (2048, 8192)])
def test_the_model_folds_large_m_only(K, N, training):
    for name, peak in cost_model.PEAKS.items():
        t = cost_model.fold_threshold(K, N, 4, 2, training, peak)
        # the fold's passes are N K-sized, the split's M (2N + K)-sized: a threshold of order min(K, N)
        assert min(K, N) // 8 < t < 2 * max(K, N), (name, t)
        for M in (t - 1, t, 8192):
            fold = cost_model.predict_s("fold", M, K, N, 4, 2, training, peak)
            split = cost_model.predict_s("split", M, K, N, 4, 2, training, peak)
            assert (fold + cost_model.FOLD_MIN_SAVING_S <= split) == (M >= t), (name, M)
        gemm = 2 * 8192 * N * K / peak.flops * (2 if training else 1)
        fold = cost_model.predict_s("fold", 8192, K, N, 4, 2, training, peak)
        split = cost_model.predict_s("split", 8192, K, N, 4, 2, training, peak)
        assert gemm < fold < 1.3 * gemm < split + 0.3 * gemm, (name, fold / gemm, split / gemm)


def test_tiny_layers_keep_the_split_schedule():
    """A 64 x 64 layer saves next to nothing by folding (its host calls would cost more): no fold below 2^15 rows."""
    for peak in cost_model.PEAKS.values():
        assert cost_model.fold_threshold(64, 64, 4, 2, True, peak) > 1 << 15


def test_the_model_names_the_device():
    assert cost_model.peak_named("NVIDIA H200")[0] == "H200"
    assert cost_model.peak_named("NVIDIA H100 80GB HBM3")[0] == "H100"
    assert cost_model.peak_named(None)[0] == cost_model.DEFAULT_PEAK
    with pytest.raises(ValueError, match="split or fold"):
        cost_model.kernels("fused", 1, 2, 3, 1, 2, False)


def test_fold_min_m_rules(monkeypatch):
    dev = torch.device("cpu")
    args = (dev, torch.bfloat16, 4096, 4096, 4)
    auto = policy.fold_min_m("triton", *args, False, True, False)
    assert policy.DECODE_MAX_M < auto < policy.FOLD_NEVER
    assert policy.fold_min_m("triton", *args, True, True, False) == policy.FOLD_NEVER  # dropout
    assert policy.fold_min_m("triton", *args, False, True, True) == policy.FOLD_NEVER  # deterministic
    assert policy.fold_min_m("cuda", *args, False, True, True) == auto  # cuda's scatter is deterministic
    assert policy.fold_min_m("reference", *args, False, True, False) == policy.FOLD_NEVER
    assert policy.fold_min_m("cpu", *args, False, True, False) == policy.FOLD_NEVER  # CPU folds fp32/fp64 only
    assert policy.fold_min_m("cpu", dev, torch.float32, 37, 53, 4, False, True, False) == 53  # max(in, out)
    monkeypatch.setenv("UNILORA_FOLD_MIN_M", "100")
    assert policy.fold_min_m("triton", *args, False, True, False) == 100
    monkeypatch.setenv("UNILORA_FOLD_MIN_M", "3")  # never below the decode sizes on a GPU backend
    assert policy.fold_min_m("triton", *args, False, True, False) == policy.DECODE_MAX_M + 1
    monkeypatch.setenv("UNILORA_FOLD_MIN_M", "off")
    assert policy.fold_min_m("cuda", *args, False, True, False) == policy.FOLD_NEVER
    monkeypatch.setenv("UNILORA_FOLD_MIN_M", "lots")
    with pytest.raises(ValueError, match="UNILORA_FOLD_MIN_M"):
        policy.fold_min_m("cuda", *args, False, True, False)
    monkeypatch.setenv("UNILORA_FOLD_MIN_M", "auto")
    monkeypatch.setenv("UNILORA_FOLD_MAX_MIB", "16")  # a 4096 x 4096 bf16 weight is 32 MiB
    assert policy.fold_min_m("cuda", *args, False, True, False) == policy.FOLD_NEVER
    monkeypatch.setenv("UNILORA_FOLD_MAX_MIB", "-1")
    with pytest.raises(ValueError, match="UNILORA_FOLD_MAX_MIB"):
        policy.fold_max_bytes()


# ------------------------------------------------------------------ Triton kernels ---------------
def _triton_plan(proj, theta, dtype, rows):
    tb = _backend("triton")
    spec = PlanSpec(proj, torch.device(DEVICE), dtype, theta.dtype, 0.0, row_bucket(rows), False)
    return tb.make_plan(spec)


@pytest.mark.parametrize("kind", ["uniform", "hashed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("weight_t", [False, True], ids=["linear", "conv1d"])
@pytest.mark.parametrize("K,N,r", [(37, 29, 5), (70, 131, 17)])
def test_fold_kernel_matches_the_oracle(K, N, r, weight_t, dtype, kind):
    proj = make_projection(K, N, r, 61, kind, seed=3, device=DEVICE)
    theta = random_theta(61, seed=4, device=DEVICE)
    plan = _triton_plan(proj, theta, dtype, 64)
    w = torch.randn(N, K, dtype=torch.float64)
    wt = (w.t() if weight_t else w).contiguous().to(DEVICE, dtype)
    A, B = lora_AB64(theta.double().cpu(), proj)
    expect = w.to(dtype).double() + B.cpu() @ A.cpu()
    got = plan.fold_weight(wt, weight_t, theta)
    assert got.dtype == dtype and got.shape == wt.shape and got.stride() == wt.stride()
    assert_close(got.t() if weight_t else got, expect, dtype, "W + B A")


def _spy_launches(monkeypatch):
    tb = _backend("triton")
    names = []
    real = tb.run

    def run(slot, grid, args):
        names.append(slot.launcher.name)
        real(slot, grid, args)

    monkeypatch.setattr(tb, "run", run)
    return names


def _layer_case(backend, K, N, r, kind, dtype, M, p=0.0, conv1d=False, bias=True):
    torch.manual_seed(K * N + r)
    if conv1d:  # transformers' Conv1D: W stored (in, out)
        from transformers.pytorch_utils import Conv1D

        base = Conv1D(N, K)
        nn.init.normal_(base.weight, std=K**-0.5)
        nn.init.normal_(base.bias)
    else:
        base = nn.Linear(K, N, bias=bias)
    layer = uk.UniLoRALinear(base, r=r, theta_d_length=83, unilora_dropout=p, projection=kind, backend=backend)
    with torch.no_grad():
        layer.theta_d.copy_(random_theta(83, seed=7))
    layer.to(DEVICE)
    layer.base_layer.to(dtype).requires_grad_(False)  # theta_d stays fp32, as after inject
    x = torch.randn(M, K, dtype=dtype, device=DEVICE, requires_grad=True)
    g = torch.randn(M, N, dtype=dtype, device=DEVICE)
    return layer, x, g


def _check_layer(layer, x, g, dtype, what):
    x3 = x.view(1, *x.shape) if x.shape[0] % 2 else x.view(2, x.shape[0] // 2, x.shape[1])  # 3-D input
    out = layer(x3)
    out.backward(g.view(*out.shape))
    base = layer.base_layer
    ref = oracle(x, layer.theta_d, layer.projection(x.device), weight=base.weight, bias=base.bias,
                 weight_t=layer._weight_t, grad_out=g)
    assert_close(out.reshape(ref["out"].shape), ref["out"], dtype, f"{what}: out")
    assert_close(x.grad, ref["grad_x"], dtype, f"{what}: grad_x")
    assert_close(layer.theta_d.grad, ref["grad_theta"], dtype, f"{what}: grad_theta")


@pytest.mark.parametrize("kind", ["uniform", "hashed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "conv1d"])
def test_triton_layer_folds_above_the_threshold(monkeypatch, kind, dtype, conv1d):
    """UNILORA_FOLD_MIN_M = 40: a call of 41 rows folds (fold_kernel twice, bwd_g_kernel, dA by bwd_x)
    and matches the oracle in out, grad_x and grad_theta; a call of 23 rows keeps the split schedule."""
    monkeypatch.setenv("UNILORA_FOLD_MIN_M", "40")
    names = _spy_launches(monkeypatch)
    for M, fold in ((41, True), (23, False)):
        layer, x, g = _layer_case("triton", 70, 45, 5, kind, dtype, M, conv1d=conv1d)
        names.clear()
        _check_layer(layer, x, g, dtype, f"M={M}")
        if fold:
            assert names == ["fold_kernel", "fold_kernel", "shrink_kernel", "bwd_g_kernel", "bwd_x_kernel"], names
        else:
            assert "fold_kernel" not in names and "bwd_g_kernel" not in names, names


@pytest.mark.parametrize("need", ["theta", "x"])
def test_triton_fold_with_one_gradient(monkeypatch, need):
    """Only theta trains (a first layer: x needs no gradient), or only x (theta frozen): the fold
    schedule runs the part asked for and matches the oracle."""
    monkeypatch.setenv("UNILORA_FOLD_MIN_M", "17")
    layer, x, g = _layer_case("triton", 45, 33, 3, "uniform", torch.float32, 50, bias=False)
    ref = oracle(x, layer.theta_d, layer.projection(x.device), weight=layer.base_layer.weight, grad_out=g)
    if need == "theta":
        x = x.detach()
    else:
        layer.theta_d.requires_grad_(False)
    layer(x).backward(g)
    if need == "theta":
        assert_close(layer.theta_d.grad, ref["grad_theta"], torch.float32, "grad_theta")
    else:
        assert layer.theta_d.grad is None
        assert_close(x.grad, ref["grad_x"], torch.float32, "grad_x")


def test_triton_dropout_and_deterministic_keep_the_split_schedule(monkeypatch):
    """The dropout mask applies to the adapter's input only, and the one-pass backward adds gB with
    atomics: with either the plan never folds, whatever the knob says, and the result is the oracle's."""
    monkeypatch.setenv("UNILORA_FOLD_MIN_M", "17")
    names = _spy_launches(monkeypatch)
    layer, x, g = _layer_case("triton", 37, 29, 5, "uniform", torch.float32, 41, p=0.2)
    layer(x).backward(g)
    assert "fold_kernel" not in names and all(p.fold == policy.FOLD_NEVER for p in layer._plans.values())
    layer.eval()  # eval: no dropout, so the plan folds
    names.clear()
    with torch.no_grad():
        out = layer(x)
    assert names == ["fold_kernel"]
    ref = oracle(x, layer.theta_d, layer.projection(x.device), weight=layer.base_layer.weight,
                 bias=layer.base_layer.bias)
    assert_close(out, ref["out"], torch.float32, "eval out")
    monkeypatch.setenv("UNILORA_DETERMINISTIC", "1")
    layer, x, g = _layer_case("triton", 37, 29, 5, "uniform", torch.float32, 41)
    names.clear()
    _check_layer(layer, x, g, torch.float32, "deterministic")
    assert "fold_kernel" not in names


# ------------------------------------------------------------------ the cpu backend --------------
@pytest.mark.parametrize("knob, folds", [(None, True), ("off", False), ("1000", False), ("20", True)])
def test_cpu_fold_threshold_comes_from_the_policy(monkeypatch, knob, folds):
    """The cpu extension folds where policy.fold_min_m says (M >= max(in, out) by default), through the
    ops' fold_min_m argument; either way the oracle's result."""
    _backend("cpu", "cpu")
    if knob is not None:
        monkeypatch.setenv("UNILORA_FOLD_MIN_M", knob)
    layer, x, g = _layer_case("cpu", 37, 29, 5, "uniform", torch.float32, 45) if DEVICE == "cpu" else (None,) * 3
    if layer is None:
        pytest.skip("the cpu backend's layer test runs on a CPU-only machine")
    _check_layer(layer, x, g, torch.float32, f"knob={knob}")
    (plan,) = {id(p): p for p in layer._plans.values()}.values()
    assert (x.shape[0] >= plan.fold) == folds, plan.fold


def test_fold_workspace_is_reported(monkeypatch):
    """uk.fold_workspace_bytes: the largest W + B A a built plan folds (Triton: one weight, fp16 here)."""
    _backend("triton")
    monkeypatch.setenv("UNILORA_FOLD_MIN_M", "17")
    model = nn.Sequential(nn.Linear(37, 29), nn.Linear(29, 45))
    uk.inject(model, target_modules=["0", "1"], r=3, theta_d_length=50, backend="triton")
    assert uk.fold_workspace_bytes(model) == 0  # no plan yet
    model.to(DEVICE, torch.float16)
    with torch.no_grad():
        model(torch.randn(20, 37, device=DEVICE, dtype=torch.float16))
    assert uk.fold_workspace_bytes(model) == 29 * 45 * 2
    monkeypatch.setenv("UNILORA_FOLD_MIN_M", "off")
    uk.clear_plans(model)
    with torch.no_grad():
        model(torch.randn(20, 37, device=DEVICE, dtype=torch.float16))
    assert uk.fold_workspace_bytes(model) == 0


# ------------------------------------------------------------------ the C++ schedule CUDA runs ---
def _ext_ops():
    from unilora_kernels.build_info import extension_info

    info = extension_info()
    if not info.get("built"):
        pytest.skip(f"the extension is not built: {info}")
    return torch.ops.unilora_C


@pytest.mark.parametrize("kind", ["uniform", "hashed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("weight_t", [False, True], ids=["linear", "conv1d"])
@pytest.mark.parametrize("M,K,N,r", [(19, 37, 53, 5), (70, 61, 19, 17), (0, 13, 11, 2)])
def test_shared_cpp_fold_schedule_matches_the_oracle(M, K, N, r, weight_t, dtype, kind):
    """fold_schedule.cpp, the code CUDA's linear ops run above fold_min_m, on the CPU's kernels
    (unilora_C::_fold_linear(_backward)): out, grad_x and grad_theta for every needs-grad combination."""
    C = _ext_ops()
    proj = make_projection(K, N, r, 41, kind, seed=5)
    theta = random_theta(41, seed=6).to(torch.float64 if dtype == torch.float64 else torch.float32)  # as gradcheck runs
    gen = torch.Generator().manual_seed(M + K)
    w = (torch.randn(N, K, generator=gen, dtype=torch.float64) / K**0.5).to(dtype)
    wt = w.t().contiguous() if weight_t else w
    b = torch.randn(N, generator=gen).to(dtype)
    x = torch.randn(M, K, generator=gen).to(dtype)
    g = torch.randn(M, N, generator=gen).to(dtype)
    args = (theta, proj.scales, proj.idx_a, proj.idx_b, r, list(proj.hash_params))
    tol = torch.float32 if dtype == torch.float64 and kind == "hashed" else dtype
    ref = oracle(x, theta, proj, weight=wt, bias=b, weight_t=weight_t, grad_out=g)
    out, h = C._fold_linear(x, wt, b, weight_t, *args)
    assert h.shape == (0, r)
    assert_close(out, ref["out"], tol, "out")
    for need_x, need_t in ((True, True), (True, False), (False, True)):
        gx, gt = C._fold_linear_backward(g, x, wt, weight_t, *args, need_x, need_t, False)
        if need_x:
            assert_close(gx, ref["grad_x"], tol, "grad_x")
        else:
            assert gx.numel() == 0
        if need_t:
            assert_close(gt, ref["grad_theta"], tol, "grad_theta")
        else:
            assert gt.numel() == 0


def test_shared_cpp_fold_schedule_opcheck_and_errors():
    C = _ext_ops()
    proj = make_projection(23, 17, 3, 29, "uniform", seed=1)
    theta = random_theta(29, seed=2)
    args = (proj.scales, proj.idx_a, proj.idx_b, 3, list(proj.hash_params))
    x, w, b, g = torch.randn(21, 23), torch.randn(17, 23), torch.randn(17), torch.randn(21, 17)
    torch.library.opcheck(C._fold_linear.default, (x, w, b, False, theta) + args)
    for need_x, need_t in ((True, True), (True, False), (False, True)):
        torch.library.opcheck(C._fold_linear_backward.default, (g, x, w, False, theta) + args + (need_x, need_t, False))
    with pytest.raises(RuntimeError, match="features but the weight expects"):
        C._fold_linear(torch.randn(21, 22), w, b, False, theta, *args)
    with pytest.raises(RuntimeError, match="bias must be"):
        C._fold_linear(x, w, torch.randn(16), False, theta, *args)
