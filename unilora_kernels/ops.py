"""The Uni-LoRA operators, as ``torch.library`` custom ops with fake (meta) kernels and autograd.

Ops (namespace ``unilora``):

* ``add_update(base_out, x, theta_d, ...) -> (out, h)``: ``out = base_out + drop(x) A^T B^T``
  for any base layer; differentiable in base_out, x and theta_d.
* ``linear(x, weight, bias, weight_t, theta_d, ...) -> (out, h)``: the frozen base linear
  (``nn.Linear``, or GPT-2 ``Conv1D`` when ``weight_t``) and the update in one op, so the update
  is added into the fresh base output in place and, in backward, ``(g B) A`` is added into
  ``g W`` in place: no output-sized or input-sized temporary beyond the results.
* ``add_update_(out, x, theta_d, ...)``: in-place update for inference (no autograd).
* ``backward(...) -> (grad_x, grad_theta)``: the backward of the two differentiable ops.

``A``/``B`` never exist outside a backend: every backend reads theta_d through the projection
given by ``scales``, ``idx_a``/``idx_b`` (uniform) or ``hashed = [D, offset, key]`` (hashed).
``h = drop(x) A^T`` (M x r, fp32) is returned so backward need not recompute it. The
``backend`` argument names a concrete backend (see ``backends.resolve``).
"""

from __future__ import annotations

import contextlib
import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from . import backends
from .backends import LayerProjection

_FLOAT_X = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_FLOAT_THETA = (torch.float32, torch.float64)


# --------------------------------------------------------------------------------------------
# shared helpers
# --------------------------------------------------------------------------------------------
def h_dtype(x: Tensor, theta: Tensor) -> torch.dtype:
    return torch.float64 if torch.float64 in (x.dtype, theta.dtype) else torch.float32


def _rows(x: Tensor):
    return math.prod(x.shape[:-1])


def _seed_value(dropout_p: float, seed: Optional[Tensor]):
    if dropout_p <= 0.0:
        return None
    if seed is None:
        raise ValueError("dropout_p > 0 needs a seed tensor (unilora_kernels.philox.new_seed())")
    return int(seed.reshape(-1)[0].item())


def _projection(x, out_features, scales, idx_a, idx_b, r, hashed) -> LayerProjection:
    return LayerProjection(idx_a, idx_b, scales, r, x.shape[-1], out_features, tuple(hashed))


def _base_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], weight_t: bool) -> Tensor:
    """Exactly what ``nn.Linear`` (or transformers' ``Conv1D`` when weight_t) computes."""
    if not weight_t:
        return F.linear(x, weight, bias)
    x2d = x.reshape(-1, x.shape[-1])
    out = torch.addmm(bias, x2d, weight) if bias is not None else x2d @ weight
    return out.view(*x.shape[:-1], weight.shape[1])


def _exact(device_type: str):
    """Backends compute in the dtypes they are given: autocast must not re-cast their math."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _forward_into(out, x, theta, scales, idx_a, idx_b, r, hashed, dropout_p, seed, backend) -> Tensor:
    """out += drop(x) A^T B^T in place (out contiguous); returns h (M x r)."""
    out_f = out.shape[-1]
    x2d = x.reshape(-1, x.shape[-1])
    if x2d.shape[0] == 0:
        return x.new_empty((0, r), dtype=h_dtype(x, theta))
    impl = backends.get_backend(backend, x.device.type)
    proj = _projection(x, out_f, scales, idx_a, idx_b, r, hashed)
    with _exact(x.device.type):
        return impl.forward_(out.view(-1, out_f), x2d, theta, proj, dropout_p, _seed_value(dropout_p, seed))


# --------------------------------------------------------------------------------------------
# forward ops
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("unilora::add_update", mutates_args=())
def _add_update_op(
    base_out: Tensor,
    x: Tensor,
    theta_d: Tensor,
    scales: Tensor,
    idx_a: Tensor,
    idx_b: Tensor,
    r: int,
    hashed: list[int],
    dropout_p: float,
    seed: Optional[Tensor],
    backend: str,
) -> tuple[Tensor, Tensor]:
    out = base_out.clone(memory_format=torch.contiguous_format)
    h = _forward_into(out, x, theta_d, scales, idx_a, idx_b, r, hashed, dropout_p, seed, backend)
    return out, h


@_add_update_op.register_fake
def _(base_out, x, theta_d, scales, idx_a, idx_b, r, hashed, dropout_p, seed, backend):
    out = base_out.new_empty(base_out.shape)
    return out, x.new_empty((_rows(x), r), dtype=h_dtype(x, theta_d))


def linear_forward(x, weight, bias, weight_t, theta_d, scales, idx_a, idx_b, r, hashed, dropout_p, seed, backend):
    """The body of ``unilora::linear``: (out, h). Called directly (no custom-op dispatch) by
    ``UniLoRALinear`` when nothing needs a gradient."""
    impl = backends.get_backend(backend, x.device.type)
    x2d = x.reshape(-1, x.shape[-1])
    if hasattr(impl, "linear") and x2d.shape[0] > 0:
        # The compiled backends run base and update in one C++ call (see backends/extension.py).
        out_f = weight.shape[1] if weight_t else weight.shape[0]
        proj = _projection(x, out_f, scales, idx_a, idx_b, r, hashed)
        with _exact(x.device.type):
            out2d, h = impl.linear(x2d, weight, bias, weight_t, theta_d, proj, dropout_p,
                                   _seed_value(dropout_p, seed))
        return out2d.view(*x.shape[:-1], out_f), h
    out = _base_linear(x, weight, bias, weight_t).contiguous()
    h = _forward_into(out, x, theta_d, scales, idx_a, idx_b, r, hashed, dropout_p, seed, backend)
    return out, h


@torch.library.custom_op("unilora::linear", mutates_args=())
def _linear_op(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    weight_t: bool,
    theta_d: Tensor,
    scales: Tensor,
    idx_a: Tensor,
    idx_b: Tensor,
    r: int,
    hashed: list[int],
    dropout_p: float,
    seed: Optional[Tensor],
    backend: str,
) -> tuple[Tensor, Tensor]:
    return linear_forward(x, weight, bias, weight_t, theta_d, scales, idx_a, idx_b, r, hashed, dropout_p, seed,
                          backend)


def _h_rows(backend: str, device_type: str, M: int) -> int:
    """Rows of the h that ``unilora::linear`` returns: a backend may keep none and recompute it."""
    if M == 0:
        return 0
    impl = backends.module_of(backend)
    return impl.h_rows(device_type, M) if hasattr(impl, "h_rows") else M


@_linear_op.register_fake
def _(x, weight, bias, weight_t, theta_d, scales, idx_a, idx_b, r, hashed, dropout_p, seed, backend):
    out_f = weight.shape[1] if weight_t else weight.shape[0]
    out = x.new_empty((*x.shape[:-1], out_f))
    return out, x.new_empty((_h_rows(backend, x.device.type, _rows(x)), r), dtype=h_dtype(x, theta_d))


@torch.library.custom_op("unilora::add_update_", mutates_args=("out",))
def _add_update_inplace_op(
    out: Tensor,
    x: Tensor,
    theta_d: Tensor,
    scales: Tensor,
    idx_a: Tensor,
    idx_b: Tensor,
    r: int,
    hashed: list[int],
    dropout_p: float,
    seed: Optional[Tensor],
    backend: str,
) -> None:
    if out.is_contiguous():
        _forward_into(out, x, theta_d, scales, idx_a, idx_b, r, hashed, dropout_p, seed, backend)
        return
    tmp = out.contiguous()
    _forward_into(tmp, x, theta_d, scales, idx_a, idx_b, r, hashed, dropout_p, seed, backend)
    out.copy_(tmp)


@_add_update_inplace_op.register_fake
def _(out, x, theta_d, scales, idx_a, idx_b, r, hashed, dropout_p, seed, backend):
    return None


# --------------------------------------------------------------------------------------------
# backward op
# --------------------------------------------------------------------------------------------
def backward_body(
    grad_out: Tensor,
    x: Tensor,
    weight: Optional[Tensor],
    weight_t: bool,
    theta_d: Tensor,
    scales: Tensor,
    idx_a: Tensor,
    idx_b: Tensor,
    r: int,
    hashed: list[int],
    dropout_p: float,
    seed: Optional[Tensor],
    h: Tensor,
    need_grad_x: bool,
    need_grad_theta: bool,
    backend: str,
) -> tuple[Tensor, Tensor]:
    """The body of ``unilora::backward``: (grad_x, grad_theta); an output that was not asked for
    is an empty tensor. Called directly by the eager autograd path (``LinearFunction``).

    With ``weight`` (the fused linear op), grad_x starts as the frozen base's ``g W`` and the
    adapter's ``(g B) A`` is added into it in place.
    """
    in_f, out_f = x.shape[-1], grad_out.shape[-1]
    g2d = grad_out.reshape(-1, out_f)
    x2d = x.reshape(-1, in_f)
    grad_x2d = None
    grad_theta = None
    impl = backends.get_backend(backend, x.device.type)
    fused = weight is not None and hasattr(impl, "linear_backward") and x2d.shape[0] > 0
    if need_grad_x and weight is not None and not fused:
        grad_x2d = g2d @ (weight.t() if weight_t else weight)
    if fused and (need_grad_x or need_grad_theta):
        proj = _projection(x, out_f, scales, idx_a, idx_b, r, hashed)
        with _exact(x.device.type):
            grad_x2d, grad_theta = impl.linear_backward(
                g2d, x2d, weight, weight_t, theta_d, proj, dropout_p, _seed_value(dropout_p, seed), h,
                need_grad_x, need_grad_theta)
    elif x2d.shape[0] == 0:
        if need_grad_x and grad_x2d is None:
            grad_x2d = x2d.new_zeros(x2d.shape)
        if need_grad_theta:
            grad_theta = torch.zeros_like(theta_d)
    elif need_grad_x or need_grad_theta:
        proj = _projection(x, out_f, scales, idx_a, idx_b, r, hashed)
        seed_v = _seed_value(dropout_p, seed)
        with _exact(x.device.type):
            grad_x2d, grad_theta = impl.backward(
                g2d, x2d, theta_d, proj, dropout_p, seed_v, h, grad_x2d, need_grad_x, need_grad_theta
            )
    grad_x = grad_x2d.view(x.shape) if need_grad_x else x.new_empty(0)
    if not need_grad_theta:
        grad_theta = theta_d.new_empty(0)
    return grad_x, grad_theta


# The custom op wraps the same function, which stays callable without the op's dispatch.
_backward_op = torch.library.custom_op("unilora::backward", mutates_args=())(backward_body)


@_backward_op.register_fake
def _(grad_out, x, weight, weight_t, theta_d, scales, idx_a, idx_b, r, hashed, dropout_p, seed, h,
      need_grad_x, need_grad_theta, backend):
    grad_x = x.new_empty(x.shape) if need_grad_x else x.new_empty(0)
    grad_theta = theta_d.new_empty(theta_d.shape) if need_grad_theta else theta_d.new_empty(0)
    return grad_x, grad_theta


# --------------------------------------------------------------------------------------------
# autograd
# --------------------------------------------------------------------------------------------
def _setup_add_update(ctx, inputs, output):
    base_out, x, theta_d, scales, idx_a, idx_b, r, hashed, dropout_p, seed, backend = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(x, theta_d, scales, idx_a, idx_b, seed, output[1])
    ctx.args = (r, list(hashed), dropout_p, backend)


def _backward_add_update(ctx, grad_out, _grad_h):
    x, theta_d, scales, idx_a, idx_b, seed, h = ctx.saved_tensors
    r, hashed, dropout_p, backend = ctx.args
    need_x, need_theta = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
    grad_x = grad_theta = None
    if need_x or need_theta:
        grad_x, grad_theta = torch.ops.unilora.backward(
            grad_out, x, None, False, theta_d, scales, idx_a, idx_b, r, hashed, dropout_p, seed, h,
            need_x, need_theta, backend,
        )
    grad_base = grad_out if ctx.needs_input_grad[0] else None
    return (grad_base, grad_x if need_x else None, grad_theta if need_theta else None) + (None,) * 8


_add_update_op.register_autograd(_backward_add_update, setup_context=_setup_add_update)


def _setup_linear(ctx, inputs, output):
    x, weight, bias, weight_t, theta_d, scales, idx_a, idx_b, r, hashed, dropout_p, seed, backend = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(x, weight, theta_d, scales, idx_a, idx_b, seed, output[1])
    ctx.args = (weight_t, r, list(hashed), dropout_p, backend)
    ctx.backward_fn = torch.ops.unilora.backward  # traceable: torch.compile sees one opaque op


def _backward_linear(ctx, grad_out, _grad_h):
    x, weight, theta_d, scales, idx_a, idx_b, seed, h = ctx.saved_tensors
    weight_t, r, hashed, dropout_p, backend = ctx.args
    need_x, need_w, need_b, need_theta = (ctx.needs_input_grad[i] for i in (0, 1, 2, 4))
    grad_x = grad_theta = grad_w = grad_b = None
    if need_x or need_theta:
        grad_x, grad_theta = ctx.backward_fn(
            grad_out, x, weight, weight_t, theta_d, scales, idx_a, idx_b, r, hashed, dropout_p, seed, h,
            need_x, need_theta, backend,
        )
    if need_w or need_b:
        g2d = grad_out.reshape(-1, grad_out.shape[-1])
        if need_w:
            x2d = x.reshape(-1, x.shape[-1])
            grad_w = x2d.t() @ g2d if weight_t else g2d.t() @ x2d
        if need_b:
            grad_b = g2d.sum(0)
    return (
        grad_x if need_x else None,
        grad_w,
        grad_b,
        None,
        grad_theta if need_theta else None,
    ) + (None,) * 8


_linear_op.register_autograd(_backward_linear, setup_context=_setup_linear)


class LinearFunction(torch.autograd.Function):
    """``unilora::linear`` with its autograd, for eager mode: the same forward and backward bodies
    without the custom ops' Python dispatch and autograd wrapper, which cost ~0.2 ms per layer
    and training step (measured on CPU; as much as the whole update at small M). Under
    torch.compile ``UniLoRALinear`` uses the custom op instead. Returns (out, h)."""

    @staticmethod
    def forward(ctx, x, weight, bias, weight_t, theta_d, scales, idx_a, idx_b, r, hashed, dropout_p, seed, backend):
        out, h = linear_forward(x, weight, bias, weight_t, theta_d, scales, idx_a, idx_b, r, hashed, dropout_p,
                                seed, backend)
        _setup_linear(ctx, (x, weight, bias, weight_t, theta_d, scales, idx_a, idx_b, r, hashed, dropout_p, seed,
                            backend), (out, h))
        ctx.backward_fn = backward_body
        return out, h

    @staticmethod
    def backward(ctx, grad_out, grad_h):
        return _backward_linear(ctx, grad_out, grad_h)


# --------------------------------------------------------------------------------------------
# validated public entry points
# --------------------------------------------------------------------------------------------
def check_inputs(
    x: Tensor,
    out_features: int,
    theta_d: Tensor,
    scales: Tensor,
    idx_a: Tensor,
    idx_b: Tensor,
    r: int,
    hashed: Sequence[int],
    dropout_p: float,
    seed: Optional[Tensor],
) -> None:
    """Raise TypeError/ValueError naming the first problem with the op's arguments."""
    if not isinstance(x, Tensor) or x.dtype not in _FLOAT_X:
        raise TypeError(f"x must be a float16/bfloat16/float32/float64 tensor, got {getattr(x, 'dtype', type(x))}")
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (..., in_features)")
    if not isinstance(theta_d, Tensor) or theta_d.dim() != 1 or theta_d.dtype not in _FLOAT_THETA:
        raise TypeError(
            "theta_d must be a 1-D float32 tensor (float64 for gradcheck), got "
            f"{getattr(theta_d, 'dtype', type(theta_d))} of shape {tuple(getattr(theta_d, 'shape', ()))}"
        )
    if not isinstance(r, int) or r <= 0:
        raise ValueError(f"r must be a positive int, got {r!r}")
    in_f = x.shape[-1]
    d = theta_d.shape[0]
    if scales.dtype != torch.float32 or scales.dim() != 1:
        raise TypeError(f"scales must be a 1-D float32 tensor, got {scales.dtype} {tuple(scales.shape)}")
    if hashed:
        if len(hashed) != 3:
            raise ValueError(f"hashed must be [D, offset, key], got {list(hashed)}")
        D, offset, _key = hashed
        if D <= 0 or offset < 0 or offset + r * (in_f + out_features) > D:
            raise ValueError(
                f"hashed projection slice [{offset}, {offset + r * (in_f + out_features)}) does not fit D = {D}"
            )
        if scales.numel() != 2:
            raise ValueError(f"the hashed projection takes 2 scales, got {scales.numel()}")
    else:
        for name, idx, shape in (("idx_a", idx_a, (r, in_f)), ("idx_b", idx_b, (out_features, r))):
            if idx.dtype != torch.int32:
                raise TypeError(f"{name} must be int32, got {idx.dtype}")
            if tuple(idx.shape) != shape:
                raise ValueError(
                    f"{name} has shape {tuple(idx.shape)}, expected {shape} for r={r}, in={in_f}, out={out_features}"
                )
        if scales.numel() != d:
            raise ValueError(f"scales has {scales.numel()} entries but theta_d has d = {d}")
    devices = {t.device for t in (x, theta_d, scales) + (() if hashed else (idx_a, idx_b))}
    if len(devices) > 1:
        raise ValueError(f"x, theta_d, scales and indices must be on one device, got {sorted(map(str, devices))}")
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"dropout_p must be in [0, 1], got {dropout_p}")
    if dropout_p > 0 and (seed is None or seed.dtype != torch.int64 or seed.numel() != 1):
        raise ValueError("dropout_p > 0 needs a one-element int64 seed tensor (unilora_kernels.philox.new_seed())")


def _empty_index(device) -> Tensor:
    return torch.empty(0, dtype=torch.int32, device=device)


def _prepare(x, out_features, theta_d, scales, idx_a, idx_b, r, hashed, dropout_p, seed, backend):
    hashed = list(hashed or [])
    if idx_a is None:
        idx_a = _empty_index(x.device)
    if idx_b is None:
        idx_b = _empty_index(x.device)
    if r is None:
        if hashed:
            raise ValueError("r must be given for the hashed projection")
        r = idx_a.shape[0]
    check_inputs(x, out_features, theta_d, scales, idx_a, idx_b, r, hashed, dropout_p, seed)
    shape = (_rows(x), x.shape[-1], out_features, r)
    return idx_a, idx_b, r, hashed, backends.resolve(backend, x.device.type, shape)


def add_update(
    base_out: Tensor,
    x: Tensor,
    theta_d: Tensor,
    scales: Tensor,
    idx_a: Optional[Tensor] = None,
    idx_b: Optional[Tensor] = None,
    *,
    r: Optional[int] = None,
    hashed: Sequence[int] = (),
    dropout_p: float = 0.0,
    seed: Optional[Tensor] = None,
    backend: str = "auto",
) -> Tensor:
    """``base_out + drop(x) A^T B^T`` with A, B read from theta_d through the projection."""
    if base_out.shape[:-1] != x.shape[:-1]:
        raise ValueError(f"base_out {tuple(base_out.shape)} and x {tuple(x.shape)} differ in leading dimensions")
    idx_a, idx_b, r, hashed, backend = _prepare(
        x, base_out.shape[-1], theta_d, scales, idx_a, idx_b, r, hashed, dropout_p, seed, backend
    )
    return torch.ops.unilora.add_update(base_out, x, theta_d, scales, idx_a, idx_b, r, hashed, dropout_p, seed, backend)[0]


def add_update_(
    out: Tensor,
    x: Tensor,
    theta_d: Tensor,
    scales: Tensor,
    idx_a: Optional[Tensor] = None,
    idx_b: Optional[Tensor] = None,
    *,
    r: Optional[int] = None,
    hashed: Sequence[int] = (),
    dropout_p: float = 0.0,
    seed: Optional[Tensor] = None,
    backend: str = "auto",
) -> Tensor:
    """In-place ``out += drop(x) A^T B^T`` (inference; not differentiable). Returns ``out``."""
    if out.shape[:-1] != x.shape[:-1]:
        raise ValueError(f"out {tuple(out.shape)} and x {tuple(x.shape)} differ in leading dimensions")
    idx_a, idx_b, r, hashed, backend = _prepare(
        x, out.shape[-1], theta_d, scales, idx_a, idx_b, r, hashed, dropout_p, seed, backend
    )
    torch.ops.unilora.add_update_(out, x, theta_d, scales, idx_a, idx_b, r, hashed, dropout_p, seed, backend)
    return out


def linear(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    theta_d: Tensor,
    scales: Tensor,
    idx_a: Optional[Tensor] = None,
    idx_b: Optional[Tensor] = None,
    *,
    weight_t: bool = False,
    r: Optional[int] = None,
    hashed: Sequence[int] = (),
    dropout_p: float = 0.0,
    seed: Optional[Tensor] = None,
    backend: str = "auto",
) -> Tensor:
    """``x W^T + b + drop(x) A^T B^T`` (``x W + b + ...`` when ``weight_t``, GPT-2 Conv1D layout)."""
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D, got shape {tuple(weight.shape)}")
    in_w, out_f = (weight.shape[0], weight.shape[1]) if weight_t else (weight.shape[1], weight.shape[0])
    if x.shape[-1] != in_w:
        raise ValueError(f"x has {x.shape[-1]} features but the weight expects {in_w}")
    if weight.dtype != x.dtype:
        raise TypeError(f"x is {x.dtype} but the base weight is {weight.dtype}")
    idx_a, idx_b, r, hashed, backend = _prepare(
        x, out_f, theta_d, scales, idx_a, idx_b, r, hashed, dropout_p, seed, backend
    )
    return torch.ops.unilora.linear(
        x, weight, bias, weight_t, theta_d, scales, idx_a, idx_b, r, hashed, dropout_p, seed, backend
    )[0]
