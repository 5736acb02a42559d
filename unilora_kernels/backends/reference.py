"""Pure-PyTorch backend: runs on any device, and already keeps the package's memory rules.

It gathers the layer's A (r x in) and B (out x r) from theta_d (layer-sized, never D-sized),
computes in fp32 (fp64 when theta_d or x is fp64), adds ``h B^T`` into the output in place
and, in backward, writes dA and dB through one ``index_add_`` into a single d-length
gradient. Dropout masks come from the shared counter-based generator (``philox.py``), so
this backend drops exactly the elements every other backend drops.
"""

from __future__ import annotations

import torch

from .. import philox, projection
from . import LayerProjection, policy

ROW_CHUNK = 4096  # rows per step when a low-precision output needs an fp32 product first


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return policy.compute_dtype(*(t.dtype for t in tensors))


def flat_indices(proj: LayerProjection, d: int, device) -> torch.Tensor:
    """The theta_d index of every element of A then B, flattened (int32 or int64, layer-sized)."""
    if not proj.is_hashed:
        return torch.cat([proj.idx_a.reshape(-1), proj.idx_b.reshape(-1)])
    D, offset, key = proj.hash_params
    n = proj.r * (proj.in_features + proj.out_features)
    positions = torch.arange(offset, offset + n, device=device, dtype=torch.int64)
    return projection.hashed_index(positions, D, d, key)


def flat_scales(proj: LayerProjection, idx: torch.Tensor, d: int) -> torch.Tensor:
    if not proj.is_hashed:
        return proj.scales[idx]
    return projection.hashed_scale_of(idx, proj.hash_params[0], d, proj.scales)


def _gather(theta: torch.Tensor, proj: LayerProjection, dtype):
    """(A, B, flat indices, flat scales): theta_d gathered through P, layer-sized."""
    d = theta.shape[0]
    idx = flat_indices(proj, d, theta.device)
    sc = flat_scales(proj, idx, d).to(dtype)
    vals = theta[idx].to(dtype) * sc
    n_a = proj.r * proj.in_features
    A = vals[:n_a].view(proj.r, proj.in_features)
    B = vals[n_a:].view(proj.out_features, proj.r)
    return A, B, idx, sc


def lora_matrices(theta: torch.Tensor, proj: LayerProjection, dtype=None):
    """Dense A (r x in) and B (out x r) = theta_d gathered through P and scaled."""
    A, B, _, _ = _gather(theta, proj, dtype or compute_dtype(theta))
    return A, B


def _keep(seed, x: torch.Tensor, p: float) -> torch.Tensor:
    """The dropout keep-mask of x's rows, computed on x's device from the seed (an int or a
    one-element tensor, read there: no host read)."""
    if isinstance(seed, torch.Tensor):
        seed = seed.reshape(-1)[:1].to(x.device)
    return philox.dropout_keep(seed, x.shape[0], x.shape[1], p, device=x.device)


def _dropped(x: torch.Tensor, p: float, seed, dtype) -> torch.Tensor:
    xd = x.to(dtype)
    if p > 0:
        keep = _keep(seed, x, p)
        xd = xd * keep * philox.keep_scale(p)
    return xd


def _add_product_(dst: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """dst += a @ b, in place; low-precision dst gets the fp32 product rounded once (as PEFT)."""
    if dst.dtype == a.dtype:
        dst.addmm_(a, b)
        return
    for start in range(0, dst.shape[0], ROW_CHUNK):
        stop = start + ROW_CHUNK
        dst[start:stop].add_(a[start:stop] @ b)


def forward_(out, x, theta, proj: LayerProjection, p: float, seed):
    cd = compute_dtype(x, theta)
    A, B = lora_matrices(theta, proj, cd)
    h = _dropped(x, p, seed, cd) @ A.t()
    _add_product_(out, h, B.t())
    return h


def backward(g, x, theta, proj: LayerProjection, p: float, seed, h, grad_x, need_x: bool, need_theta: bool):
    cd = compute_dtype(x, theta, g)
    A, B, idx, sc = _gather(theta, proj, cd)
    g = g.to(cd)
    gB = g @ B  # (M, r)
    if need_x:
        if p > 0:
            t = gB @ A
            t.mul_(_keep(seed, x, p)).mul_(philox.keep_scale(p))
            grad_x = t.to(x.dtype) if grad_x is None else grad_x.add_(t)
        elif grad_x is None:
            grad_x = (gB @ A).to(x.dtype)
        else:
            _add_product_(grad_x, gB, A)
    grad_theta = None
    if need_theta:
        dA = gB.t() @ _dropped(x, p, seed, cd)  # (r, in)
        dB = g.t() @ h.to(cd)  # (out, r)
        vals = torch.cat([dA.reshape(-1), dB.reshape(-1)]) * sc
        grad_theta = torch.zeros(theta.shape[0], dtype=theta.dtype, device=theta.device)
        grad_theta.index_add_(0, idx, vals.to(theta.dtype))
    return grad_x, grad_theta


# --------------------------------------------------------------------------------------------
# mixed batches: each sequence reads its own adapter (backends/__init__.py, "mixed batches")
# --------------------------------------------------------------------------------------------
def _mixed_rows(theta, table, seq_adapter, M: int, proj: LayerProjection, dtype):
    """Per-distinct-adapter A (N, r, in), B (N, out, r), each row's slot in them (M,), a (M,) mask
    of adapter rows, the distinct ids (N,), and the flat indices and scales of the layer."""
    d = theta.shape[0]
    ids = seq_adapter.long().repeat_interleave(M // seq_adapter.shape[0])
    uniq, slot = torch.unique(ids, return_inverse=True)
    idx = flat_indices(proj, d, theta.device)
    sc = flat_scales(proj, idx, d).to(dtype)
    rows_of = (uniq - 1).clamp(min=0)
    vals = table[rows_of][:, idx.long()] if table.shape[0] else theta.new_zeros(len(uniq), idx.numel())
    vals = torch.where((uniq == 0)[:, None], theta[idx][None], vals).to(dtype) * sc
    vals = vals * (uniq >= 0)[:, None]  # "__base__" (-1): no update
    n_a = proj.r * proj.in_features
    A = vals[:, :n_a].view(-1, proj.r, proj.in_features)
    B = vals[:, n_a:].view(-1, proj.out_features, proj.r)
    return A, B, slot, ids >= 0, uniq, idx, sc


def mixed_forward_(out, x, theta, table, seq_adapter, proj: LayerProjection, p: float, seed) -> None:
    """``out[m] += drop(x[m]) A_a^T B_a^T`` with ``a`` the adapter of row m's sequence."""
    cd = compute_dtype(x, theta)
    A, B, slot, _, _, _, _ = _mixed_rows(theta, table, seq_adapter, x.shape[0], proj, cd)
    xd = _dropped(x, p, seed, cd)
    h = torch.einsum("mk,mrk->mr", xd, A[slot])
    out.add_(torch.einsum("mr,mor->mo", h, B[slot]).to(out.dtype))


def mixed_backward(g, x, theta, table, seq_adapter, proj: LayerProjection, p: float, seed, need_x: bool,
                   need_theta: bool):
    """(grad_x, grad_theta, grad_table) of the update alone; None for what was not asked."""
    cd = compute_dtype(x, theta, g)
    A, B, slot, _, uniq, idx, sc = _mixed_rows(theta, table, seq_adapter, x.shape[0], proj, cd)
    g = g.to(cd)
    gB = torch.einsum("mo,mor->mr", g, B[slot])
    grad_x = grad_theta = grad_table = None
    if need_x:
        t = torch.einsum("mr,mrk->mk", gB, A[slot])
        if p > 0:
            t = t * _keep(seed, x, p) * philox.keep_scale(p)
        grad_x = t.to(x.dtype)
    if need_theta:
        xd = _dropped(x, p, seed, cd)
        h = torch.einsum("mk,mrk->mr", xd, A[slot])
        n = len(uniq)
        dA = torch.zeros(n, proj.r, proj.in_features, dtype=cd, device=x.device)
        dA.index_add_(0, slot, gB[:, :, None] * xd[:, None, :])
        dB = torch.zeros(n, proj.out_features, proj.r, dtype=cd, device=x.device)
        dB.index_add_(0, slot, g[:, :, None] * h[:, None, :])
        vals = torch.cat([dA.reshape(n, -1), dB.reshape(n, -1)], 1) * sc
        d = theta.shape[0]
        grad_theta = torch.zeros(d, dtype=cd, device=theta.device)
        grad_theta.index_add_(0, idx.long(), vals[uniq == 0].sum(0))
        grad_table = torch.zeros(table.shape, dtype=cd, device=table.device)
        in_table = uniq > 0
        flat = ((uniq[in_table] - 1)[:, None] * d + idx.long()[None]).reshape(-1)
        grad_table.view(-1).index_add_(0, flat, vals[in_table].reshape(-1))
        grad_theta, grad_table = grad_theta.to(theta.dtype), grad_table.to(table.dtype)
    return grad_x, grad_theta, grad_table
