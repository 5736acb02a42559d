"""Layer plans: everything static about a ``UniLoRALinear`` call, resolved once and reused.

A layer call on the hot path does three things per call: look its plan up (one dict lookup on
``(device, dtype, grad mode, training, autocast dtype, deterministic, M)``; plans are built once
per row bucket of M and shared by its row counts), draw the
dropout seed on the device (no host read: a CUDA-graph replay draws a fresh one), and make one
call each way:

* ``cpu`` / ``cuda`` with a plain ``nn.Linear`` / ``Conv1D`` base: ``unilora_C::linear_autograd``
  (training; forward and backward are one C++ call each, eager and compiled alike) or
  ``unilora_C::linear`` (no grad);
* ``triton`` / ``reference``, or any other base layer: the backend's update plan
  (``backends.make_plan``) inside one ``autograd.Function`` (``PlanLinear``, ``PlanUpdate``).

What a plan fixes is read when it is built: the backend (``layer.backend``, ``UNILORA_BACKEND``),
deterministic mode's environment knob, the backends' own knobs (Triton schedules, autotuning) and
the static checks. Moving or casting the layer (``.to``, ``.half``, ...) or setting
``layer.backend`` / ``layer.unilora_dropout`` drops its plans; after changing an environment knob
call ``uk.clear_plans(model)`` (or ``layer.clear_plans()``).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from . import backends, ops
from .backends import PlanSpec, policy


class ModulePlan:
    """A backend plan over a backend module's primitives, for backends without ``make_plan``."""

    __slots__ = ("impl", "proj", "p")

    def __init__(self, impl, spec: PlanSpec):
        self.impl, self.proj, self.p = impl, spec.proj, spec.dropout_p

    def forward_(self, out, x, theta, seed):
        return self.impl.forward_(out, x, theta, self.proj, self.p, seed)

    def backward(self, g, x, theta, seed, h, grad_x, need_x, need_theta):
        return self.impl.backward(g, x, theta, self.proj, self.p, seed, h, grad_x, need_x, need_theta)


def make_update_plan(backend: str, spec: PlanSpec):
    """The backend's plan of the update ``out += drop(x) A^T B^T`` and its backward for ``spec``."""
    impl = backends.get_backend(backend, spec.device.type)
    maker = getattr(impl, "make_plan", None)
    return maker(spec) if maker is not None else ModulePlan(impl, spec)


class LayerPlan:
    """One layer's resolved call for one key (see the module docstring)."""

    __slots__ = ("backend", "spec", "update", "c_train", "c_infer", "c_args", "p", "det", "cast", "theta_in",
                 "theta_up", "weight_t", "fold")

    def __init__(self, backend: str, spec: PlanSpec, compiled_linear: bool, cast: Optional[torch.dtype],
                 theta_in: Optional[torch.dtype] = None, weight_t: bool = False, grad: bool = False):
        self.backend = backend
        self.weight_t = weight_t  # the layer's base stores W as (in, out) (transformers' Conv1D)
        # theta_d's own dtype when the plan was built; theta_up: the kernels read it upcast (policy.theta_for_kernels)
        self.theta_in = spec.theta_dtype if theta_in is None else theta_in
        self.theta_up = self.theta_in is not spec.theta_dtype
        self.spec = spec
        self.p = spec.dropout_p
        self.det = spec.deterministic
        self.cast = cast  # autocast's dtype for the fused path, or None
        self.update = make_update_plan(backend, spec)
        proj = spec.proj
        # unilora_C::linear(_autograd)'s adapter arguments after theta, fixed per plan
        self.c_args = (proj.scales, proj.idx_a, proj.idx_b, proj.r, list(proj.hash_params), float(self.p))
        if compiled_linear:
            self.c_train = torch.ops.unilora_C.linear_autograd.default
            self.c_infer = torch.ops.unilora_C.linear.default
        else:
            self.c_train = self.c_infer = None
        # calls of at least this many rows fold W + B A (the extension's fold_min_m; PlanLinear on Triton)
        self.fold = policy.FOLD_NEVER
        if compiled_linear or getattr(self.update, "can_fold", False):
            self.fold = policy.fold_min_m(backend, spec.device, spec.x_dtype, proj.in_features, proj.out_features,
                                          proj.r, self.p > 0, grad, self.det)


class PlanLinear(torch.autograd.Function):
    """Base linear plus the update, through a backend plan: ``(x, W, b, theta, seed) -> out``.

    Forward runs the base GEMM into a fresh output and the plan adds the update into it in place;
    backward starts grad_x from ``g W`` and the plan adds ``(g B) A`` into it and returns theta's
    gradient (one d-length tensor). ``plan.weight_t``: W is stored (in, out) (transformers' Conv1D)."""

    @staticmethod
    def forward(ctx, x, weight, bias, theta, seed, plan: LayerPlan):
        flat = x.dim() == 2  # 2-D x (the layer's usual call): no reshape or view
        x2d = x if flat else x.reshape(-1, x.shape[-1])
        weight_t = plan.weight_t
        if x2d.shape[0] >= plan.fold:  # large M: one GEMM on W + B A; the backward recomputes h
            weight_f = plan.update.fold_weight(weight, weight_t, theta)
            out = ops.base_linear(x2d, weight_f, bias, True) if weight_t else F.linear(x2d, weight_f, bias)
            h = None
        else:
            out = ops.base_linear(x2d, weight, bias, True) if weight_t else F.linear(x2d, weight, bias)  # = base_linear
            h = plan.update.forward_(out, x2d, theta, seed)
        ctx.save_for_backward(x2d, theta, seed, h, weight)
        ctx.plan = plan
        return out if flat else out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        x2d, theta, seed, h, weight = ctx.saved_tensors
        need_x, need_w, need_b, need_theta, _, _ = ctx.needs_input_grad
        flat = grad_out.dim() == 2
        g2d = grad_out if flat else grad_out.reshape(-1, grad_out.shape[-1])  # any strides: plans read them
        plan = ctx.plan
        weight_t = plan.weight_t
        grad_x = grad_w = grad_b = grad_theta = None
        if h is None:  # the fold schedule: grad_x = g (W + B A), theta's gradient in three passes
            if need_x:
                weight_f = plan.update.fold_weight(weight, weight_t, theta)
                grad_x = g2d @ (weight_f.t() if weight_t else weight_f)
            grad_theta = plan.update.fold_backward(g2d, x2d, theta, need_theta)
        else:
            if need_x:
                grad_x = g2d @ (weight.t() if weight_t else weight)
            if need_x or need_theta:
                grad_x, grad_theta = plan.update.backward(g2d, x2d, theta, seed, h, grad_x, need_x, need_theta)
        if need_w:
            grad_w = x2d.t() @ g2d if weight_t else g2d.t() @ x2d
        if need_b:
            grad_b = g2d.sum(0)
        if grad_x is not None and not flat:
            grad_x = grad_x.view(*grad_out.shape[:-1], x2d.shape[1])
        return grad_x, grad_w, grad_b, grad_theta, None, None


class PlanUpdate(torch.autograd.Function):
    """``base_out + drop(x) A^T B^T`` through a backend plan, for any base layer: ``(base_out, x, theta, seed) -> out``."""

    @staticmethod
    def forward(ctx, base_out, x, theta, seed, plan: LayerPlan):
        out_f = base_out.shape[-1]
        out = base_out.reshape(-1, out_f).clone(memory_format=torch.contiguous_format)
        x2d = x.reshape(-1, x.shape[-1])
        h = plan.update.forward_(out, x2d, theta, seed)
        ctx.save_for_backward(x2d, theta, seed, h)
        ctx.plan = plan
        return out.view(base_out.shape)

    @staticmethod
    def backward(ctx, grad_out):
        x2d, theta, seed, h = ctx.saved_tensors
        need_base, need_x, need_theta = ctx.needs_input_grad[:3]
        grad_x = grad_theta = None
        if need_x or need_theta:
            g2d = grad_out.reshape(-1, grad_out.shape[-1])
            grad_x, grad_theta = ctx.plan.update.backward(g2d, x2d, theta, seed, h, None, need_x, need_theta)
            if grad_x is not None:
                grad_x = grad_x.view(*grad_out.shape[:-1], x2d.shape[1])
        return (grad_out if need_base else None), grad_x, grad_theta, None, None
