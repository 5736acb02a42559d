"""The Uni-LoRA operators, as ``torch.library`` custom ops with fake (meta) kernels and autograd.

Ops (namespace ``unilora``):

* ``add_update(base_out, x, <update>) -> (out, h)``: ``out = base_out + drop(x) A^T B^T``
  for any base layer; differentiable in base_out, x and theta_d.
* ``linear(x, weight, bias, weight_t, <update>) -> (out, h)``: the frozen base linear
  (``nn.Linear``, or GPT-2 ``Conv1D`` when ``weight_t``) and the update in one op, so the update
  is added into the fresh base output in place and, in backward, ``(g B) A`` is added into
  ``g W`` in place: no output-sized or input-sized temporary beyond the results.
* ``add_update_(out, x, <update>)``: in-place update for inference (no autograd).
* ``backward(grad_out, x, weight, weight_t, <update>, h, need_grad_x, need_grad_theta)
  -> (grad_x, grad_theta)``: the backward of the two differentiable ops.

``<update>`` is the same nine arguments in every op, ``UpdateArgs``: theta_d and the projection
(``scales``, ``idx_a``/``idx_b`` for "uniform", ``hash_params = [D, offset, key]`` for "hashed"),
r, dropout_p, seed, and the concrete backend (see ``backends.resolve``). ``A``/``B`` never
exist outside a backend. ``h = drop(x) A^T`` (M x r, fp32) is returned so backward need not
recompute it.
"""

from __future__ import annotations

import contextlib
import math
from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from . import backends
from .backends import LayerProjection, policy


class UpdateArgs(NamedTuple):
    """The adapter's arguments of every op, in schema order (``UPDATE_SCHEMA``)."""

    theta_d: Tensor
    scales: Tensor
    idx_a: Tensor
    idx_b: Tensor
    r: int
    hash_params: list  # [] uniform; [D, offset, key] hashed
    dropout_p: float
    seed: Optional[Tensor]
    backend: str

    def projection(self, in_features: int, out_features: int) -> LayerProjection:
        return LayerProjection(self.idx_a, self.idx_b, self.scales, self.r, in_features, out_features,
                               tuple(self.hash_params))


UPDATE_SCHEMA = ("Tensor theta_d, Tensor scales, Tensor idx_a, Tensor idx_b, int r, int[] hash_params, float dropout_p, "
                 "Tensor? seed, str backend")
N_UPDATE = len(UpdateArgs._fields)


# --------------------------------------------------------------------------------------------
# shared helpers
# --------------------------------------------------------------------------------------------
def rows(x: Tensor) -> int:
    """Rows of ``x`` flattened to 2-D (every dimension but the last)."""
    return math.prod(x.shape[:-1])


def h_dtype(x: Tensor, theta: Tensor) -> torch.dtype:
    return policy.compute_dtype(x.dtype, theta.dtype)


def base_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], weight_t: bool) -> Tensor:
    """Exactly what ``nn.Linear`` (or transformers' ``Conv1D`` when weight_t) computes."""
    if not weight_t:
        return F.linear(x, weight, bias)
    x2d = x.reshape(-1, x.shape[-1])
    out = torch.addmm(bias, x2d, weight) if bias is not None else x2d @ weight
    return out.view(*x.shape[:-1], weight.shape[1])


def autocast_disabled(device_type: str):
    """Backends compute in the dtypes they are given: autocast must not re-cast their math."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _forward_into(out: Tensor, x: Tensor, u: UpdateArgs) -> Tensor:
    """out += drop(x) A^T B^T in place (out contiguous); returns h (M x r)."""
    out_f = out.shape[-1]
    x2d = x.reshape(-1, x.shape[-1])
    if x2d.shape[0] == 0:
        return x.new_empty((0, u.r), dtype=h_dtype(x, u.theta_d))
    impl = backends.get_backend(u.backend, x.device.type)
    with autocast_disabled(x.device.type):
        return impl.forward_(out.view(-1, out_f), x2d, u.theta_d, u.projection(x.shape[-1], out_f), u.dropout_p,
                             u.seed)


def _out_features(weight: Tensor, weight_t: bool) -> int:
    return weight.shape[1] if weight_t else weight.shape[0]


# --------------------------------------------------------------------------------------------
# forward ops
# --------------------------------------------------------------------------------------------
def _add_update_body(base_out: Tensor, x: Tensor, *update) -> tuple[Tensor, Tensor]:
    out = base_out.clone(memory_format=torch.contiguous_format)
    return out, _forward_into(out, x, UpdateArgs(*update))


_add_update_op = torch.library.custom_op(
    "unilora::add_update", _add_update_body, mutates_args=(),
    schema=f"(Tensor base_out, Tensor x, {UPDATE_SCHEMA}) -> (Tensor, Tensor)")


@_add_update_op.register_fake
def _(base_out, x, *update):
    u = UpdateArgs(*update)
    return base_out.new_empty(base_out.shape), x.new_empty((rows(x), u.r), dtype=h_dtype(x, u.theta_d))


def linear_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], weight_t: bool, *update) -> tuple[Tensor, Tensor]:
    """The body of ``unilora::linear``: (out, h). Called directly (no custom-op dispatch) by
    ``UniLoRALinear`` when nothing needs a gradient."""
    u = UpdateArgs(*update)
    impl = backends.get_backend(u.backend, x.device.type)
    x2d = x.reshape(-1, x.shape[-1])
    if hasattr(impl, "linear") and x2d.shape[0] > 0:
        # The compiled backends run base and update in one C++ call (see backends/extension.py).
        out_f = _out_features(weight, weight_t)
        with autocast_disabled(x.device.type):
            out2d, h = impl.linear(x2d, weight, bias, weight_t, u.theta_d, u.projection(x.shape[-1], out_f),
                                   u.dropout_p, u.seed)
        return out2d.view(*x.shape[:-1], out_f), h
    out = base_linear(x, weight, bias, weight_t).contiguous()
    return out, _forward_into(out, x, u)


_linear_op = torch.library.custom_op(
    "unilora::linear", linear_forward, mutates_args=(),
    schema=f"(Tensor x, Tensor weight, Tensor? bias, bool weight_t, {UPDATE_SCHEMA}) -> (Tensor, Tensor)")


def _h_rows(backend: str, device_type: str, M: int) -> int:
    """Rows of the h that ``unilora::linear`` returns: a backend may keep none and recompute it."""
    if M == 0:
        return 0
    impl = backends.module_of(backend)
    return impl.h_rows(device_type, M) if hasattr(impl, "h_rows") else M


@_linear_op.register_fake
def _(x, weight, bias, weight_t, *update):
    u = UpdateArgs(*update)
    out = x.new_empty((*x.shape[:-1], _out_features(weight, weight_t)))
    return out, x.new_empty((_h_rows(u.backend, x.device.type, rows(x)), u.r), dtype=h_dtype(x, u.theta_d))


def _write_in_place(out: Tensor, write) -> None:
    """``write(t)`` updates a contiguous t in place; a strided ``out`` goes through a contiguous copy."""
    if out.is_contiguous():
        write(out)
        return
    tmp = out.contiguous()
    write(tmp)
    out.copy_(tmp)


def _add_update_inplace_body(out: Tensor, x: Tensor, *update) -> None:
    u = UpdateArgs(*update)
    _write_in_place(out, lambda t: _forward_into(t, x, u))


_add_update_inplace_op = torch.library.custom_op(
    "unilora::add_update_", _add_update_inplace_body, mutates_args=("out",),
    schema=f"(Tensor(a!) out, Tensor x, {UPDATE_SCHEMA}) -> ()")


@_add_update_inplace_op.register_fake
def _(out, x, *update):
    return None


# --------------------------------------------------------------------------------------------
# backward op
# --------------------------------------------------------------------------------------------
def backward_body(grad_out: Tensor, x: Tensor, weight: Optional[Tensor], weight_t: bool, *rest) -> tuple[Tensor, Tensor]:
    """The body of ``unilora::backward``: (grad_x, grad_theta); an output that was not asked for
    is an empty tensor. ``rest`` is ``<update>, h, need_grad_x, need_grad_theta``.

    With ``weight`` (the fused linear op), grad_x starts as the frozen base's ``g W`` and the
    adapter's ``(g B) A`` is added into it in place.
    """
    u = UpdateArgs(*rest[:N_UPDATE])
    h, need_grad_x, need_grad_theta = rest[N_UPDATE:]
    in_f, out_f = x.shape[-1], grad_out.shape[-1]
    g2d = grad_out.reshape(-1, out_f)
    x2d = x.reshape(-1, in_f)
    grad_x2d = None
    grad_theta = None
    impl = backends.get_backend(u.backend, x.device.type)
    fused = weight is not None and hasattr(impl, "linear_backward") and x2d.shape[0] > 0
    if need_grad_x and weight is not None and not fused:
        grad_x2d = g2d @ (weight.t() if weight_t else weight)
    if fused and (need_grad_x or need_grad_theta):
        with autocast_disabled(x.device.type):
            grad_x2d, grad_theta = impl.linear_backward(
                g2d, x2d, weight, weight_t, u.theta_d, u.projection(in_f, out_f), u.dropout_p, u.seed, h,
                need_grad_x, need_grad_theta)
    elif x2d.shape[0] == 0:
        if need_grad_x and grad_x2d is None:
            grad_x2d = x2d.new_zeros(x2d.shape)
        if need_grad_theta:
            grad_theta = torch.zeros_like(u.theta_d)
    elif need_grad_x or need_grad_theta:
        with autocast_disabled(x.device.type):
            grad_x2d, grad_theta = impl.backward(
                g2d, x2d, u.theta_d, u.projection(in_f, out_f), u.dropout_p, u.seed, h, grad_x2d,
                need_grad_x, need_grad_theta)
    grad_x = grad_x2d.view(x.shape) if need_grad_x else x.new_empty(0)
    if not need_grad_theta:
        grad_theta = u.theta_d.new_empty(0)
    return grad_x, grad_theta


# The custom op wraps the same function, which stays callable without the op's dispatch.
_backward_op = torch.library.custom_op(
    "unilora::backward", backward_body, mutates_args=(),
    schema=(f"(Tensor grad_out, Tensor x, Tensor? weight, bool weight_t, {UPDATE_SCHEMA}, Tensor h, "
            "bool need_grad_x, bool need_grad_theta) -> (Tensor, Tensor)"))


@_backward_op.register_fake
def _(grad_out, x, weight, weight_t, *rest):
    theta_d = rest[0]
    need_grad_x, need_grad_theta = rest[-2:]
    grad_x = x.new_empty(x.shape) if need_grad_x else x.new_empty(0)
    grad_theta = theta_d.new_empty(theta_d.shape) if need_grad_theta else theta_d.new_empty(0)
    return grad_x, grad_theta


# --------------------------------------------------------------------------------------------
# autograd
# --------------------------------------------------------------------------------------------
def _save_update(ctx, x: Tensor, weight: Optional[Tensor], u: UpdateArgs, h: Tensor) -> None:
    ctx.save_for_backward(x, weight, u.theta_d, u.scales, u.idx_a, u.idx_b, u.seed, h)
    ctx.args = (u.r, list(u.hash_params), u.dropout_p, u.backend)


def _saved_update(ctx) -> tuple[Tensor, Optional[Tensor], UpdateArgs, Tensor]:
    x, weight, theta_d, scales, idx_a, idx_b, seed, h = ctx.saved_tensors
    r, hash_params, dropout_p, backend = ctx.args
    return x, weight, UpdateArgs(theta_d, scales, idx_a, idx_b, r, hash_params, dropout_p, seed, backend), h


def _setup_add_update(ctx, inputs, output):
    base_out, x, *update = inputs
    ctx.mark_non_differentiable(output[1])
    _save_update(ctx, x, None, UpdateArgs(*update), output[1])


def _backward_add_update(ctx, grad_out, _grad_h):
    x, _, u, h = _saved_update(ctx)
    need_x, need_theta = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
    grad_x = grad_theta = None
    if need_x or need_theta:
        grad_x, grad_theta = torch.ops.unilora.backward(grad_out, x, None, False, *u, h, need_x, need_theta)
    grad_base = grad_out if ctx.needs_input_grad[0] else None
    return (grad_base, grad_x if need_x else None, grad_theta if need_theta else None) + (None,) * (N_UPDATE - 1)


_add_update_op.register_autograd(_backward_add_update, setup_context=_setup_add_update)


def _setup_linear(ctx, inputs, output):
    x, weight, bias, weight_t, *update = inputs
    ctx.mark_non_differentiable(output[1])
    _save_update(ctx, x, weight, UpdateArgs(*update), output[1])
    ctx.weight_t = weight_t


def _backward_linear(ctx, grad_out, _grad_h):
    x, weight, u, h = _saved_update(ctx)
    weight_t = ctx.weight_t
    need_x, need_w, need_b, need_theta = (ctx.needs_input_grad[i] for i in (0, 1, 2, 4))
    grad_x = grad_theta = grad_w = grad_b = None
    if need_x or need_theta:
        grad_x, grad_theta = torch.ops.unilora.backward(grad_out, x, weight, weight_t, *u, h, need_x, need_theta)
    if need_w or need_b:
        g2d = grad_out.reshape(-1, grad_out.shape[-1])
        if need_w:
            x2d = x.reshape(-1, x.shape[-1])
            grad_w = x2d.t() @ g2d if weight_t else g2d.t() @ x2d
        if need_b:
            grad_b = g2d.sum(0)
    return (grad_x if need_x else None, grad_w, grad_b, None,
            grad_theta if need_theta else None) + (None,) * (N_UPDATE - 1)


_linear_op.register_autograd(_backward_linear, setup_context=_setup_linear)


# --------------------------------------------------------------------------------------------
# validated public entry points
# --------------------------------------------------------------------------------------------
def check_inputs(x: Tensor, out_features: int, u: UpdateArgs) -> None:
    """Raise TypeError/ValueError naming the first problem with the op's arguments."""
    if not isinstance(x, Tensor) or x.dtype not in policy.ACTIVATION_DTYPES:
        raise TypeError(f"x must be a float16/bfloat16/float32/float64 tensor, got {getattr(x, 'dtype', type(x))}")
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (..., in_features)")
    theta_d, scales, idx_a, idx_b, r, hash_params = u.theta_d, u.scales, u.idx_a, u.idx_b, u.r, u.hash_params
    if not isinstance(theta_d, Tensor) or theta_d.dim() != 1 or theta_d.dtype not in policy.THETA_DTYPES:
        raise TypeError(
            "theta_d must be a 1-D float tensor (float32; float64 for gradcheck; float16/bfloat16 are read in "
            "float32), got "
            f"{getattr(theta_d, 'dtype', type(theta_d))} of shape {tuple(getattr(theta_d, 'shape', ()))}"
        )
    if not isinstance(r, int) or r <= 0:
        raise ValueError(f"r must be a positive int, got {r!r}")
    in_f = x.shape[-1]
    d = theta_d.shape[0]
    if scales.dtype != torch.float32 or scales.dim() != 1:
        raise TypeError(f"scales must be a 1-D float32 tensor, got {scales.dtype} {tuple(scales.shape)}")
    if hash_params:
        if len(hash_params) != 3:
            raise ValueError(f"hash_params must be [D, offset, key], got {list(hash_params)}")
        D, offset, _key = hash_params
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
    devices = {t.device for t in (x, theta_d, scales) + (() if hash_params else (idx_a, idx_b))}
    if len(devices) > 1:
        raise ValueError(f"x, theta_d, scales and indices must be on one device, got {sorted(map(str, devices))}")
    if not 0.0 <= u.dropout_p <= 1.0:
        raise ValueError(f"dropout_p must be in [0, 1], got {u.dropout_p}")
    seed = u.seed
    if u.dropout_p > 0 and (seed is None or seed.dtype != torch.int64 or seed.numel() != 1):
        raise ValueError("dropout_p > 0 needs a one-element int64 seed tensor (unilora_kernels.philox.new_seed())")


def update_args(x: Tensor, out_features: int, theta_d: Tensor, scales: Tensor, idx_a: Optional[Tensor] = None,
                idx_b: Optional[Tensor] = None, *, r: Optional[int] = None, hash_params: Sequence[int] = (),
                dropout_p: float = 0.0, seed: Optional[Tensor] = None, backend: str = "auto") -> UpdateArgs:
    """Checked ``UpdateArgs`` with a concrete backend, from the public functions' arguments.

    ``idx_a`` (int32, r x in) and ``idx_b`` (int32, out x r) are the uniform projection's indices;
    the hashed projection passes none and gives ``hash_params = [D, offset, key]`` and ``r`` instead.
    ``dropout_p > 0`` needs a one-element int64 ``seed`` (``philox.new_seed()``). ``backend`` is
    a name of ``backends.BACKENDS``; "auto" resolves per device and shape.
    """
    hash_params = list(hash_params or [])
    empty = torch.empty(0, dtype=torch.int32, device=x.device)
    idx_a = empty if idx_a is None else idx_a
    idx_b = empty if idx_b is None else idx_b
    if r is None:
        if hash_params:
            raise ValueError("r must be given for the hashed projection")
        r = idx_a.shape[0]
    if isinstance(theta_d, Tensor):
        theta_d = policy.theta_for_kernels(theta_d)
    u = UpdateArgs(theta_d, scales, idx_a, idx_b, r, hash_params, dropout_p, seed, backend)
    check_inputs(x, out_features, u)
    return u._replace(backend=backends.resolve(backend, x.device.type, (rows(x), x.shape[-1], out_features, r)))


def _check_rows(out: Tensor, x: Tensor, name: str) -> None:
    if out.shape[:-1] != x.shape[:-1]:
        raise ValueError(f"{name} {tuple(out.shape)} and x {tuple(x.shape)} differ in leading dimensions")


def add_update(base_out: Tensor, x: Tensor, theta_d: Tensor, scales: Tensor, idx_a: Optional[Tensor] = None,
               idx_b: Optional[Tensor] = None, **options) -> Tensor:
    """``base_out + drop(x) A^T B^T`` with A, B read from theta_d through the projection
    (``options``: r, hash_params, dropout_p, seed, backend; see ``update_args``)."""
    _check_rows(base_out, x, "base_out")
    u = update_args(x, base_out.shape[-1], theta_d, scales, idx_a, idx_b, **options)
    return torch.ops.unilora.add_update(base_out, x, *u)[0]


def add_update_(out: Tensor, x: Tensor, theta_d: Tensor, scales: Tensor, idx_a: Optional[Tensor] = None,
                idx_b: Optional[Tensor] = None, **options) -> Tensor:
    """In-place ``out += drop(x) A^T B^T`` (inference; not differentiable). Returns ``out``."""
    _check_rows(out, x, "out")
    u = update_args(x, out.shape[-1], theta_d, scales, idx_a, idx_b, **options)
    torch.ops.unilora.add_update_(out, x, *u)
    return out


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], theta_d: Tensor, scales: Tensor,
           idx_a: Optional[Tensor] = None, idx_b: Optional[Tensor] = None, *, weight_t: bool = False,
           **options) -> Tensor:
    """``x W^T + b + drop(x) A^T B^T`` (``x W + b + ...`` when ``weight_t``, GPT-2 Conv1D layout)."""
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D, got shape {tuple(weight.shape)}")
    in_w, out_f = (weight.shape[0], weight.shape[1]) if weight_t else (weight.shape[1], weight.shape[0])
    if x.shape[-1] != in_w:
        raise ValueError(f"x has {x.shape[-1]} features but the weight expects {in_w}")
    if weight.dtype != x.dtype:
        raise TypeError(f"x is {x.dtype} but the base weight is {weight.dtype}")
    u = update_args(x, out_f, theta_d, scales, idx_a, idx_b, **options)
    return torch.ops.unilora.linear(x, weight, bias, weight_t, *u)[0]


# --------------------------------------------------------------------------------------------
# mixed batches: one adapter per sequence (adapters.py; backends/__init__.py, "Mixed batches")
# --------------------------------------------------------------------------------------------
MIXED_SCHEMA = f"Tensor table, Tensor seq_adapter, {UPDATE_SCHEMA}"


def _mixed_into(out: Tensor, x: Tensor, table: Tensor, seq_adapter: Tensor, u: UpdateArgs) -> None:
    """out[m] += drop(x)[m] A_a^T B_a^T in place (out contiguous), a = row m's adapter."""
    out_f = out.shape[-1]
    x2d = x.reshape(-1, x.shape[-1])
    if x2d.shape[0] == 0:
        return
    impl = backends.get_backend(u.backend, x.device.type)
    with autocast_disabled(x.device.type):
        impl.mixed_forward_(out.view(-1, out_f), x2d, u.theta_d, table, seq_adapter,
                            u.projection(x.shape[-1], out_f), u.dropout_p, u.seed)


def mixed_add_update_body(base_out: Tensor, x: Tensor, table: Tensor, seq_adapter: Tensor, *update) -> Tensor:
    """The body of ``unilora::mixed_add_update``; called directly (no custom-op dispatch) in eager mode."""
    out = base_out.clone(memory_format=torch.contiguous_format)
    _mixed_into(out, x, table, seq_adapter, UpdateArgs(*update))
    return out


_mixed_op = torch.library.custom_op(
    "unilora::mixed_add_update", mixed_add_update_body, mutates_args=(),
    schema=f"(Tensor base_out, Tensor x, {MIXED_SCHEMA}) -> Tensor")


@_mixed_op.register_fake
def _(base_out, x, table, seq_adapter, *update):
    return base_out.new_empty(base_out.shape)


def mixed_add_update_inplace_body(out: Tensor, x: Tensor, table: Tensor, seq_adapter: Tensor, *update) -> None:
    u = UpdateArgs(*update)
    _write_in_place(out, lambda t: _mixed_into(t, x, table, seq_adapter, u))


_mixed_inplace_op = torch.library.custom_op(
    "unilora::mixed_add_update_", mixed_add_update_inplace_body, mutates_args=("out",),
    schema=f"(Tensor(a!) out, Tensor x, {MIXED_SCHEMA}) -> ()")


@_mixed_inplace_op.register_fake
def _(out, x, table, seq_adapter, *update):
    return None


def mixed_backward_body(grad_out: Tensor, x: Tensor, table: Tensor, seq_adapter: Tensor, *rest):
    """The body of ``unilora::mixed_backward``: (grad_x, grad_theta, grad_table) of the update; an
    output that was not asked for is an empty tensor. ``rest`` is ``<update>, need_x, need_theta``
    (need_theta asks for both theta_d's and the table's gradient)."""
    u = UpdateArgs(*rest[:N_UPDATE])
    need_x, need_theta = rest[N_UPDATE:]
    in_f, out_f = x.shape[-1], grad_out.shape[-1]
    x2d, g2d = x.reshape(-1, in_f), grad_out.reshape(-1, out_f)
    grad_x = grad_theta = grad_table = None
    if x2d.shape[0] == 0:
        grad_x = torch.zeros_like(x2d) if need_x else None
        if need_theta:
            grad_theta, grad_table = torch.zeros_like(u.theta_d), torch.zeros_like(table)
    elif need_x or need_theta:
        impl = backends.get_backend(u.backend, x.device.type)
        with autocast_disabled(x.device.type):
            grad_x, grad_theta, grad_table = impl.mixed_backward(
                g2d, x2d, u.theta_d, table, seq_adapter, u.projection(in_f, out_f), u.dropout_p, u.seed,
                need_x, need_theta)
    grad_x = grad_x.view(x.shape) if need_x else x.new_empty(0)
    if not need_theta:
        grad_theta, grad_table = u.theta_d.new_empty(0), table.new_empty(0)
    return grad_x, grad_theta, grad_table


_mixed_backward_op = torch.library.custom_op(
    "unilora::mixed_backward", mixed_backward_body, mutates_args=(),
    schema=(f"(Tensor grad_out, Tensor x, {MIXED_SCHEMA}, bool need_grad_x, bool need_grad_theta) "
            "-> (Tensor, Tensor, Tensor)"))


@_mixed_backward_op.register_fake
def _(grad_out, x, table, seq_adapter, *rest):
    theta_d = rest[0]
    need_x, need_theta = rest[-2:]
    return (x.new_empty(x.shape) if need_x else x.new_empty(0),
            theta_d.new_empty(theta_d.shape) if need_theta else theta_d.new_empty(0),
            table.new_empty(table.shape) if need_theta else table.new_empty(0))


def _setup_mixed(ctx, inputs, output):
    base_out, x, table, seq_adapter, *update = inputs
    u = UpdateArgs(*update)
    ctx.save_for_backward(x, table, seq_adapter, u.theta_d, u.scales, u.idx_a, u.idx_b, u.seed)
    ctx.args = (u.r, list(u.hash_params), u.dropout_p, u.backend)
    ctx.backward_fn = torch.ops.unilora.mixed_backward  # traceable: one opaque op under torch.compile


def _backward_mixed(ctx, grad_out):
    x, table, seq_adapter, theta_d, scales, idx_a, idx_b, seed = ctx.saved_tensors
    r, hash_params, dropout_p, backend = ctx.args
    u = UpdateArgs(theta_d, scales, idx_a, idx_b, r, hash_params, dropout_p, seed, backend)
    need_base, need_x, need_table, need_theta_d = (ctx.needs_input_grad[i] for i in (0, 1, 2, 4))
    grad_x = grad_theta = grad_table = None
    if need_x or need_table or need_theta_d:
        grad_x, grad_theta, grad_table = ctx.backward_fn(grad_out, x, table, seq_adapter, *u, need_x,
                                                         need_table or need_theta_d)
    return ((grad_out if need_base else None), grad_x if need_x else None, grad_table if need_table else None,
            None, grad_theta if need_theta_d else None) + (None,) * (N_UPDATE - 1)


_mixed_op.register_autograd(_backward_mixed, setup_context=_setup_mixed)


class MixedFunction(torch.autograd.Function):
    """``unilora::mixed_add_update`` with its autograd, for eager mode (no custom-op dispatch)."""

    @staticmethod
    def forward(ctx, base_out, x, table, seq_adapter, *update):
        out = mixed_add_update_body(base_out, x, table, seq_adapter, *update)
        _setup_mixed(ctx, (base_out, x, table, seq_adapter, *update), out)
        ctx.backward_fn = mixed_backward_body
        return out

    @staticmethod
    def backward(ctx, grad_out):
        return _backward_mixed(ctx, grad_out)


def check_mixed(x: Tensor, table: Tensor, seq_adapter: Tensor, theta_d: Tensor) -> None:
    """Raise TypeError/ValueError naming the first problem with a mixed batch's own arguments."""
    if not isinstance(table, Tensor) or table.dim() != 2 or table.shape[1] != theta_d.shape[0]:
        raise ValueError(f"table must be (capacity, d = {theta_d.shape[0]}), got {tuple(getattr(table, 'shape', ()))}")
    if table.dtype not in policy.TABLE_DTYPES:
        raise TypeError(f"table must be one of {policy.TABLE_DTYPES}, got {table.dtype}")
    if table.dtype != theta_d.dtype:
        raise TypeError(f"table is {table.dtype} but theta_d is {theta_d.dtype}: they must match")
    if table.device != x.device or seq_adapter.device != x.device:
        raise ValueError(f"x ({x.device}), table ({table.device}) and seq_adapter ({seq_adapter.device}) must be on one device")
    if seq_adapter.dtype != torch.int32 or seq_adapter.dim() != 1 or seq_adapter.numel() == 0:
        raise TypeError(f"seq_adapter must be a non-empty 1-D int32 tensor, got {seq_adapter.dtype} {tuple(seq_adapter.shape)}")
    S = seq_adapter.shape[0]
    if x.dim() < 2 or x.shape[0] != S:
        raise ValueError(f"seq_adapter names {S} sequences but x has shape {tuple(x.shape)} (dimension 0 is the batch)")
    lo, hi = int(seq_adapter.min()), int(seq_adapter.max())
    if lo < -1 or hi > table.shape[0]:
        raise ValueError(f"seq_adapter values must be in [-1, {table.shape[0]}] (-1 base, 0 theta_d, k table row k-1), "
                         f"got [{lo}, {hi}]")


def mixed_add_update(base_out: Tensor, x: Tensor, theta_d: Tensor, table: Tensor, seq_adapter: Tensor, scales: Tensor,
                     idx_a: Optional[Tensor] = None, idx_b: Optional[Tensor] = None, **options) -> Tensor:
    """``base_out + drop(x) A_a^T B_a^T`` where sequence s (dimension 0 of x) reads adapter
    ``seq_adapter[s]``: -1 none, 0 ``theta_d``, k > 0 ``table[k - 1]`` (``options`` as ``add_update``)."""
    _check_rows(base_out, x, "base_out")
    u = update_args(x, base_out.shape[-1], theta_d, scales, idx_a, idx_b, **options)
    if isinstance(table, Tensor) and table.dtype in (torch.bfloat16, torch.float16) and theta_d.is_floating_point():
        u = u._replace(theta_d=theta_d.to(table.dtype))  # a bf16 table reads the default adapter in bf16 too
    check_mixed(x, table, seq_adapter, u.theta_d)
    return torch.ops.unilora.mixed_add_update(base_out, x, table, seq_adapter, *u)
