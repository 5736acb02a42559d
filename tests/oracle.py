"""The test oracle: every Uni-LoRA op recomputed densely in float64 with autograd.

It materialises A and B (fine at test sizes), applies the same counter-based dropout mask
(``philox.dropout_keep``) and differentiates with torch.autograd, so it shares no kernel code
with any backend. Tolerances are normwise: ``max|actual - expected| <= tol * max(1, max|expected|)``.
"""

from __future__ import annotations

import numpy as np
import torch

from unilora_kernels import philox
from unilora_kernels import projection as P
from unilora_kernels.backends import LayerProjection

# Normwise tolerance per dtype of the activations (theta_d and accumulation are fp32 in every
# backend; fp64 only appears in gradcheck-style runs). fp16/bf16 allow for the rounding of the
# activations, of the gathered A/B operands and of the output.
TOL = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.float16: 4e-3,
    torch.bfloat16: 2e-2,
}


def tolerance_dtype(dtype: torch.dtype, kind: str) -> torch.dtype:
    """The TOL entry a result of activations in ``dtype`` is held to. Scales are fp32 tensors by
    design and the oracle's hashed scale is an exact fp64 rsqrt, so float64 runs of the hashed
    projection agree to fp32 precision only (on every backend)."""
    return torch.float32 if dtype == torch.float64 and kind == "hashed" else dtype


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str = "") -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    assert torch.isfinite(a).all(), f"{what}: non-finite values"
    err = (a - e).abs().max().item() if a.numel() else 0.0
    scale = max(1.0, e.abs().max().item() if e.numel() else 0.0)
    tol = TOL[dtype]
    assert err <= tol * scale, f"{what}: max error {err:.3e} > {tol:.1e} * {scale:.3g} ({dtype})"


def make_projection(in_f: int, out_f: int, r: int, d: int, kind: str = "uniform", seed: int = 0,
                    device="cpu", extra_layers: int = 0) -> LayerProjection:
    """A standalone layer projection; ``extra_layers`` puts this layer after others in D."""
    offset = extra_layers * r * (in_f + out_f)
    D = offset + r * (in_f + out_f)
    if kind == "uniform":
        index = P.generate_index(D, d, seed)
        scales = P.uniform_scales(index, d).to(device)
        table = torch.from_numpy(index[offset:])
        idx_a = table[: r * in_f].view(r, in_f).to(device)
        idx_b = table[r * in_f :].view(out_f, r).to(device)
        return LayerProjection(idx_a, idx_b, scales, r, in_f, out_f, ())
    empty = torch.empty(0, dtype=torch.int32, device=device)
    return LayerProjection(empty, empty, P.hashed_scales(D, d).to(device), r, in_f, out_f,
                           (D, offset, P.splitmix64(seed)))


def lora_AB64(theta64: torch.Tensor, proj: LayerProjection):
    """Dense float64 A (r x in), B (out x r); differentiable in theta64."""
    r, in_f, out_f = proj.r, proj.in_features, proj.out_features
    d = theta64.shape[0]
    if proj.is_hashed:
        D, offset, key = proj.hash_params
        pos = torch.arange(offset, offset + r * (in_f + out_f), dtype=torch.int64)
        idx = P.hashed_index(pos, D, d, key).to(theta64.device)
        counts = torch.tensor(P.hashed_counts(D, d), dtype=torch.float64)
        n = torch.where(idx.cpu() < D % d, counts[1], counts[0]).to(theta64.device)
        scale = torch.where(n > 0, n.rsqrt(), torch.zeros_like(n))
    else:
        idx = torch.cat([proj.idx_a.reshape(-1), proj.idx_b.reshape(-1)]).long().to(theta64.device)
        scale = proj.scales.double().to(theta64.device)[idx]
    vals = theta64[idx] * scale
    return vals[: r * in_f].view(r, in_f), vals[r * in_f :].view(out_f, r)


def oracle(x, theta, proj: LayerProjection, *, base_out=None, weight=None, bias=None, weight_t=False,
           p: float = 0.0, seed=None, grad_out=None) -> dict:
    """out, and (given grad_out) grad_x, grad_theta, grad_bias, grad_base in float64."""
    x64 = x.detach().double().requires_grad_(True)
    t64 = theta.detach().double().requires_grad_(True)
    A, B = lora_AB64(t64, proj)
    xd = x64
    if p > 0:
        keep = philox.dropout_keep(seed, x64.numel() // x64.shape[-1], x64.shape[-1], p).view(x64.shape)
        xd = x64 * keep.to(x64.device) * philox.keep_scale(p)
    b64 = None
    if weight is not None:
        w64 = weight.detach().double()
        base = x64 @ w64 if weight_t else x64 @ w64.t()
        if bias is not None:
            b64 = bias.detach().double().requires_grad_(True)
            base = base + b64
    else:
        base = base_out.detach().double().requires_grad_(True)
    out = base + (xd @ A.t()) @ B.t()
    res = {"out": out.detach()}
    if grad_out is not None:
        out.backward(grad_out.detach().double())
        res["grad_x"] = x64.grad
        res["grad_theta"] = t64.grad
        if b64 is not None:
            res["grad_bias"] = b64.grad
        if weight is None:
            res["grad_base"] = base.grad
    return res


def random_theta(d: int, seed: int = 0, device="cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(d, generator=g) * 2 - 1).to(device)


def numpy_rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def mixed_oracle(x, theta, table, seq_adapter, proj: LayerProjection, *, p: float = 0.0, seed=None,
                 grad_out=None) -> dict:
    """A mixed batch row by row, in float64: row m of ``x`` (M, in) runs ``oracle``'s math with the
    adapter of its sequence (``seq_adapter[m // (M // B)]``: -1 none, 0 ``theta``, k > 0
    ``table[k - 1]``). Returns the update ``upd`` (M, out) and, given grad_out, grad_x,
    grad_theta and grad_table, from autograd."""
    M, in_f = x.shape
    x64 = x.detach().double().cpu().requires_grad_(True)
    t64 = theta.detach().double().cpu().requires_grad_(True)
    tab64 = table.detach().double().cpu().requires_grad_(True)
    ids = seq_adapter.cpu().long().repeat_interleave(M // seq_adapter.shape[0]).tolist()
    xd = x64
    if p > 0:
        keep = philox.dropout_keep(seed, M, in_f, p)
        xd = x64 * keep * philox.keep_scale(p)
    rows = []
    for m, a in enumerate(ids):
        if a < 0:
            rows.append(torch.zeros(proj.out_features, dtype=torch.float64))
            continue
        A, B = lora_AB64(t64 if a == 0 else tab64[a - 1], proj)
        rows.append((xd[m] @ A.t()) @ B.t())
    upd = torch.stack(rows)
    res = {"upd": upd.detach()}
    if grad_out is not None:
        if upd.requires_grad:  # not when every row is a base row
            upd.backward(grad_out.detach().double().cpu())
        res["grad_x"] = x64.grad if x64.grad is not None else torch.zeros_like(x64)
        res["grad_theta"] = t64.grad if t64.grad is not None else torch.zeros_like(t64)
        res["grad_table"] = tab64.grad if tab64.grad is not None else torch.zeros_like(tab64)
    return res
