"""The backend contract, as functions: one backend's ops and primitives against the float64 oracle.

tests/test_backend_contract.py runs them on every backend over odd shapes; the backend files call
them for what only that backend has (Triton's forced schedules, real layer sizes on a GPU).
"""

from __future__ import annotations

import itertools

import pytest
import torch

from oracle import assert_close, make_projection, oracle, random_theta, tolerance_dtype
from unilora_kernels import backends, ops
from unilora_kernels.backends import policy

D_SMALL = 97  # theta_d length of the contract cases: small, so that indices collide
SEED = 987654321
# What a layer call can be: the fused linear op (nn.Linear with and without bias, GPT-2's
# Conv1D layout) or the update added to any base output.
VARIANTS = ("linear_bias", "linear_nobias", "conv1d", "add_update")


def kind_p_params(p_on: float) -> list:
    """(kind, p) params for the op checks (opcheck, gradcheck): uniform without and hashed with
    dropout in the quick run, the other two combinations marked slow."""
    return [pytest.param(kind, p, id=f"{kind}-p{p}", marks=[] if (kind == "hashed") == (p > 0) else [pytest.mark.slow])
            for kind in ("uniform", "hashed") for p in (0.0, p_on)]


def availability_marks(backend: str, device: str) -> list:
    """``gpu`` for the cuda backend, a skip naming the reason for a backend that cannot run here."""
    if backend == "cuda":
        return [pytest.mark.gpu]
    try:
        backends.get_backend(backend, device)
    except backends.BackendNotAvailableError as exc:
        return [pytest.mark.skip(reason=str(exc))]
    return []


def seed_tensor(p: float):
    return torch.tensor([SEED], dtype=torch.int64) if p > 0 else None


def theta_for(dtype: torch.dtype, d: int, seed: int, device) -> torch.Tensor:
    """theta_d is fp32; a float64 run (gradcheck-style) takes a float64 theta_d too."""
    theta = random_theta(d, seed=seed, device=device)
    return theta.double() if dtype == torch.float64 else theta


def check_op(backend: str, device, shape, dtype, kind: str, p: float, dims: int, variant: str,
             d: int = D_SMALL) -> None:
    """ops.linear / ops.add_update (and add_update_) with autograd: out and the gradients of x,
    theta_d, bias and base_out against the oracle."""
    M, in_f, out_f, r = shape
    proj = make_projection(in_f, out_f, r, d, kind, seed=M, device=device, extra_layers=1)
    x = torch.randn((M, in_f) if dims == 2 else (2, M, in_f)).to(device, dtype).requires_grad_(True)
    theta = theta_for(dtype, d, r, device).requires_grad_(True)
    seed = seed_tensor(p)
    common = dict(r=r, hash_params=proj.hash_params, dropout_p=p, seed=seed, backend=backend)
    bias = base = None
    weight_t = variant == "conv1d"
    if variant == "add_update":
        base = torch.randn(*x.shape[:-1], out_f).to(device, dtype).requires_grad_(True)
        out = ops.add_update(base, x, theta, proj.scales, proj.idx_a, proj.idx_b, **common)
    else:
        w = (torch.randn(in_f, out_f) if weight_t else torch.randn(out_f, in_f)).div(in_f**0.5).to(device, dtype)
        if variant == "linear_bias":
            bias = torch.randn(out_f).to(device, dtype).requires_grad_(True)
        out = ops.linear(x, w, bias, theta, proj.scales, proj.idx_a, proj.idx_b, weight_t=weight_t, **common)
    assert out.dtype == dtype and out.shape == (*x.shape[:-1], out_f)
    g = torch.randn(out.shape).to(device, dtype)
    out.backward(g)
    if base is not None:
        ref = oracle(x, theta, proj, base_out=base, p=p, seed=SEED, grad_out=g)
    else:
        ref = oracle(x, theta, proj, weight=w, bias=bias, weight_t=weight_t, p=p, seed=SEED, grad_out=g)
    tol = tolerance_dtype(dtype, kind)
    assert_close(out, ref["out"], tol, "out")
    assert_close(x.grad, ref["grad_x"], tol, "grad_x")
    assert theta.grad.dtype == theta.dtype
    assert_close(theta.grad, ref["grad_theta"], tol, "grad_theta")
    if bias is not None:
        assert_close(bias.grad, ref["grad_bias"], tol, "grad_bias")
    if base is not None:
        assert_close(base.grad, ref["grad_base"], tol, "grad_base")
        inplace = base.detach().clone()  # the inference op: the same update, in place
        ret = ops.add_update_(inplace, x.detach(), theta.detach(), proj.scales, proj.idx_a, proj.idx_b, **common)
        assert ret is inplace
        assert_close(inplace, ref["out"], tol, "out of add_update_")


def check_primitives(impl, device, shape, dtype, kind: str, p: float, d: int = D_SMALL) -> None:
    """The backend module's forward_/backward: h, out in place, grad_x accumulated into a given
    tensor (with and without deterministic algorithms) or fresh, each gradient alone."""
    M, in_f, out_f, r = shape
    proj = make_projection(in_f, out_f, r, d, kind, seed=1, device=device, extra_layers=1)
    theta = theta_for(dtype, d, 3, device)
    x = torch.randn(M, in_f).to(device, dtype)
    seed = SEED if p > 0 else None
    base = torch.randn(M, out_f).to(device, dtype)
    g = torch.randn(M, out_f).to(device, dtype)
    ref = oracle(x, theta, proj, base_out=base, p=p, seed=seed, grad_out=g)
    tol = tolerance_dtype(dtype, kind)

    out = base.clone()
    h = impl.forward_(out, x, theta, proj, p, seed)
    assert h.dtype == policy.compute_dtype(x.dtype, theta.dtype) and h.shape == (M, r)
    assert_close(out, ref["out"], tol, "out in place")
    for det in (False, True):
        acc = torch.randn(M, in_f).to(device, dtype)
        expected = acc.double().cpu() + ref["grad_x"].cpu()
        torch.use_deterministic_algorithms(det)
        try:
            gx, gt = impl.backward(g, x, theta, proj, p, seed, h, acc, True, True)
        finally:
            torch.use_deterministic_algorithms(False)
        assert gx is acc
        assert_close(acc, expected, tol, f"grad_x accumulated (deterministic={det})")
        assert gt.dtype == theta.dtype and gt.shape == theta.shape
        assert_close(gt, ref["grad_theta"], tol, f"grad_theta (deterministic={det})")
    gx, gt = impl.backward(g, x, theta, proj, p, seed, h, None, True, False)
    assert gt is None and gx.dtype == dtype
    assert_close(gx, ref["grad_x"], tol, "grad_x alone")
    gx, gt = impl.backward(g, x, theta, proj, p, seed, h, None, False, True)
    assert gx is None
    assert_close(gt, ref["grad_theta"], tol, "grad_theta alone")


def backend_module(backend: str, device):
    return backends.get_backend(backend, torch.device(device).type)


def check_linear_autograd(impl, device, shape, dtype, weight_t: bool, with_bias: bool, p: float) -> None:
    """The compiled backends' linear_autograd (autograd in C++, UniLoRALinear's eager training path):
    out and the gradients of x, theta_d, a trainable weight and bias; with a frozen base only x
    and theta_d get gradients, the same ones; below autograd (inference mode) the same output."""
    M, in_f, out_f, r = shape
    proj = make_projection(in_f, out_f, r, D_SMALL, "uniform", seed=1, device=device, extra_layers=1)
    theta = random_theta(D_SMALL, 3, device).requires_grad_(True)
    w = ((torch.randn(in_f, out_f) if weight_t else torch.randn(out_f, in_f)) / in_f**0.5).to(device, dtype)
    w.requires_grad_(True)
    b = torch.randn(out_f).to(device, dtype).requires_grad_(True) if with_bias else None
    x = torch.randn(M, in_f).to(device, dtype).requires_grad_(True)
    g = torch.randn(M, out_f).to(device, dtype)
    seed = SEED if p > 0 else None
    out = impl.linear_autograd(x, w, b, weight_t, theta, proj, p, seed)
    ref = oracle(x, theta, proj, weight=w, bias=b, weight_t=weight_t, p=p, seed=seed, grad_out=g)
    assert_close(out, ref["out"], dtype, "out")
    grads = torch.autograd.grad(out, [x, w, theta] + ([b] if with_bias else []), g)
    assert_close(grads[0], ref["grad_x"], dtype, "grad_x")
    x64, g64 = x.detach().double().cpu(), g.double().cpu()
    assert_close(grads[1], x64.t() @ g64 if weight_t else g64.t() @ x64, dtype, "grad_weight")
    assert_close(grads[2], ref["grad_theta"], dtype, "grad_theta")
    if with_bias:
        assert_close(grads[3], ref["grad_bias"], dtype, "grad_bias")
    frozen_b = None if b is None else b.detach()
    out2 = impl.linear_autograd(x, w.detach(), frozen_b, weight_t, theta, proj, p, seed)
    gx2, gt2 = torch.autograd.grad(out2, [x, theta], g)
    assert torch.equal(gx2, grads[0]) and torch.equal(gt2, grads[2])
    with torch.inference_mode():
        out3 = impl.linear_autograd(x.detach(), w.detach(), frozen_b, weight_t, theta.detach(), proj, p, seed)
    assert torch.equal(out3, out.detach())


def pairwise_rows(factors: dict) -> list:
    """Rows (dicts) of a covering array: every pair of levels of any two factors occurs in some row.

    Greedy and deterministic: one row per level pair of the first two factors, the other factors
    chosen to cover the most pairs not yet covered; then extra rows until no pair is left.
    """
    names = list(factors)
    todo = {((a, u), (b, v)) for a, b in itertools.combinations(names, 2) for u in factors[a] for v in factors[b]}

    def pairs(row):
        return {((a, row[a]), (b, row[b])) for a, b in itertools.combinations(names, 2)}

    candidates = [dict(zip(names, combo)) for combo in itertools.product(*factors.values())]
    rows = []
    for first, second in itertools.product(factors[names[0]], factors[names[1]]):
        options = [c for c in candidates if c[names[0]] == first and c[names[1]] == second]
        best = max(options, key=lambda c: len(pairs(c) & todo))
        rows.append(best)
        todo -= pairs(best)
    while todo:
        best = max(candidates, key=lambda c: len(pairs(c) & todo))
        rows.append(best)
        todo -= pairs(best)
    return rows
