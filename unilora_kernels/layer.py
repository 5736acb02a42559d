"""``UniLoRALinear``: a base layer plus the Uni-LoRA update read from the shared theta_d."""

from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import nn
from torch.nn.modules import module as _torch_module

from . import adapter_table, backends, batch_state, ops, philox
from .backends import PlanSpec, policy, row_bucket
from .bank import THETA_NAME, UniLoRABank, init_theta
from .plan import LayerPlan, PlanLinear, PlanUpdate
from .config import UniLoRAConfig, requested_backend

try:  # GPT-2 style layers store the weight as (in, out)
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is optional
    Conv1D = None


def base_features(base: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a supported base layer, or a TypeError."""
    if isinstance(base, nn.Linear):
        return base.in_features, base.out_features
    if Conv1D is not None and isinstance(base, Conv1D):
        return base.weight.shape[0], base.weight.shape[1]
    in_f, out_f = getattr(base, "in_features", None), getattr(base, "out_features", None)
    if isinstance(in_f, int) and isinstance(out_f, int):
        return in_f, out_f  # any layer mapping (..., in) -> (..., out), e.g. a quantised linear
    raise TypeError(
        f"unsupported base layer {type(base).__name__}: UniLoRALinear wraps torch.nn.Linear, "
        "transformers Conv1D, or a module with int attributes in_features/out_features"
    )


def _fusable(base: nn.Module) -> bool:
    """Whether the base is exactly nn.Linear or Conv1D, so its GEMM can run inside the fused op."""
    return type(base) is nn.Linear or (Conv1D is not None and type(base) is Conv1D)


# A quantised weight (e.g. torchao's tensor subclasses in an nn.Linear) runs through base(x).
_PLAIN_TENSORS = (torch.Tensor, nn.Parameter)


def _conv1d_layout(base: nn.Module) -> bool:
    """Whether the base stores its weight as (in, out), as transformers' Conv1D does."""
    return Conv1D is not None and isinstance(base, Conv1D)


_ABSENT = object()


def _hookless_weight_and_bias(base: nn.Module) -> Optional[tuple]:
    """``(base.weight, base.bias)`` when no forward hook would see ``base(x)`` (the fused op skips that
    call), else None. Read from the parameter dict where they are registered there (one lookup
    each, not ``Module.__getattr__``), else as attributes (parametrizations): this runs per call."""
    if (base._forward_hooks or base._forward_pre_hooks or _torch_module._global_forward_hooks
            or _torch_module._global_forward_pre_hooks):
        return None
    params = base._parameters
    weight = params.get("weight", _ABSENT)
    bias = params.get("bias", _ABSENT)
    return (base.weight if weight is _ABSENT else weight), (getattr(base, "bias", None) if bias is _ABSENT else bias)


# torch.is_autocast_enabled(device.type) builds the type string per call; this C check is one call
# and false unless some autocast is on (a stand-in where torch lacks it)
_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", lambda: True)
PLAN_ALIASES = 256  # row counts a layer keeps a direct plan entry for (plans are per row bucket)


class UniLoRALinear(nn.Module):
    """A frozen base layer ``(..., in) -> (..., out)`` plus ``drop(x) A^T B^T``, A and B read from theta_d.

    Standalone (``bank=None``) it owns a theta_d of its own, of length ``theta_d_length``::

        layer = UniLoRALinear(nn.Linear(1024, 1024), r=4, theta_d_length=4096)

    ``inject`` builds the layers of a model with one shared bank and consecutive slices of D.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        r: int = 4,
        theta_d_length: int = 256,
        proj_seed: int = 42,
        unilora_dropout: float = 0.0,
        init_theta_d_bound: float = 0.02,
        init_weights: bool = True,
        projection: str = "uniform",
        backend: str = "auto",
        *,
        bank: Optional[UniLoRABank] = None,
        offset: int = 0,
    ):
        super().__init__()
        in_f, out_f = base_features(base_layer)
        if bank is None:
            config = UniLoRAConfig(
                r=r,
                theta_d_length=theta_d_length,
                proj_seed=proj_seed,
                unilora_dropout=unilora_dropout,
                init_theta_d_bound=init_theta_d_bound,
                init_weights=init_weights,
                projection=projection,
                backend=backend,
            )
            device = _param_device(base_layer)
            bank = UniLoRABank(self, config, D=r * (in_f + out_f))
            bank.attach(init_theta(config.theta_d_length, init_theta_d_bound, init_weights, device), device)
            offset = 0
        else:
            config = bank.config
        self.base_layer = base_layer
        self.bank = bank  # plain attribute: the bank is not a module, its owner holds theta_d
        self.in_features, self.out_features = in_f, out_f
        self.r = config.r
        self.offset = offset
        self._plans: dict = {}  # per-call key (exact M) -> LayerPlan (plan.py); dropped by clear_plans()
        self._bucket_plans: dict = {}  # the same key with M's row bucket -> the plan it built
        self.unilora_dropout = float(config.unilora_dropout)
        self.backend = config.backend
        self.merged = False
        self.adapter_enabled = True
        self._fusable_base = _fusable(base_layer)
        self._weight_t = _conv1d_layout(base_layer)  # weight stored (in, out)
        self._hash_params = bank.hash_params(offset)
        device = _param_device(base_layer)
        if bank.projection == "uniform":
            idx_a, idx_b = bank.layer_indices(offset, self.r, in_f, out_f)
            idx_a, idx_b = idx_a.to(device), idx_b.to(device)
        else:
            idx_a = idx_b = torch.empty(0, dtype=torch.int32, device=device)
        persistent = bool(config.save_indices) and bank.projection == "uniform"
        self.register_buffer("unilora_indices_A", idx_a, persistent=persistent)
        self.register_buffer("unilora_indices_B", idx_b, persistent=persistent)
        if bank.owner is self:
            bank.release_table()

    # -- plans ---------------------------------------------------------------------------
    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, name: str) -> None:
        self._backend = name
        self.clear_plans()

    @property
    def unilora_dropout(self) -> float:
        return self._dropout

    @unilora_dropout.setter
    def unilora_dropout(self, p: float) -> None:
        self._dropout = float(p)
        self.clear_plans()

    def clear_plans(self) -> None:
        """Forget the cached plans: the next call re-resolves the backend and re-reads the knobs
        (UNILORA_BACKEND, UNILORA_DETERMINISTIC, the Triton schedule and autotune knobs)."""
        self.__dict__["_plans"] = {}
        self.__dict__["_bucket_plans"] = {}

    def __getstate__(self):
        """Plans hold kernels and backend modules: ``copy.deepcopy`` / pickling a layer that has run
        copies it without them (the copy builds its own on first use)."""
        state = self.__dict__.copy()
        state["_plans"], state["_bucket_plans"] = {}, {}
        return state

    def _apply(self, fn, *args, **kwargs):
        self.clear_plans()  # .to() / .half() / .cuda(): indices and scales move, dtypes change
        adapter_table.drop_stacks(self.bank)  # and the adapters: their stacked copies are stale
        return super()._apply(fn, *args, **kwargs)

    def _build_plan(self, key: tuple, x: torch.Tensor) -> Optional[LayerPlan]:
        """The plan of calls with this key, or None when such a call takes the general path.
        Calls key their plan by M; the plan is built once per row bucket and shared."""
        device, x_dtype, _grad, training, cast, det, M = key
        bucket = row_bucket(M)
        bkey = key[:-1] + (bucket,)
        plan = self._bucket_plans.get(bkey)
        if plan is None:
            plan = self._new_plan(bkey)
            if plan is None:
                return None
            self._bucket_plans[bkey] = plan
        if len(self._plans) >= PLAN_ALIASES:
            self._plans.clear()
        self._plans[key] = plan
        return plan

    def _new_plan(self, key: tuple) -> Optional[LayerPlan]:
        device, x_dtype, grad, training, cast, det, bucket = key
        theta_in = self.theta_d
        theta = policy.theta_for_kernels(theta_in)
        if theta.device != device or self.unilora_indices_A.device != device:
            return None
        base = self.base_layer
        weight = getattr(base, "weight", None)
        if cast is not None and not (self._fusable_base and torch.float64 not in (x_dtype, getattr(weight, "dtype", None))):
            return None  # autocast around a base that is not fused: the general path casts as autocast does
        p = self.unilora_dropout if training else 0.0
        backend = backends.resolve(self.requested_backend(), device.type,
                                   (bucket, self.in_features, self.out_features, self.r))
        proj = self.projection(device)
        dtype = x_dtype if cast is None else cast
        # The static checks of every call, once: what the public ops check, on a probe of the call's shape.
        probe = torch.empty((1, self.in_features), dtype=dtype, device=device)
        seed = torch.zeros(1, dtype=torch.int64) if p > 0 else None
        ops.check_inputs(probe, self.out_features, ops.UpdateArgs(
            theta, proj.scales, proj.idx_a, proj.idx_b, self.r, list(proj.hash_params), p, seed, backend))
        spec = PlanSpec(proj, device, dtype, theta.dtype, p, bucket, policy.deterministic())
        impl = backends.get_backend(backend, device.type)
        return LayerPlan(backend, spec, compiled_linear=hasattr(impl, "linear_autograd"), cast=cast,
                         theta_in=theta_in.dtype, weight_t=self._weight_t, grad=grad)

    # -- helpers ---------------------------------------------------------------------------
    @property
    def theta_d(self) -> nn.Parameter:
        return self.bank.theta_d

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight, for code that inspects ``module.weight``."""
        return self.base_layer.weight

    def requested_backend(self) -> str:
        """``self.backend`` (settable per layer), with UNILORA_BACKEND taking over "auto"."""
        return requested_backend(self.backend)

    def resolved_backend(self, device_type: Optional[str] = None) -> str:
        """The concrete backend that runs for tensors on ``device_type`` (default: the layer's)."""
        if device_type is None:
            device_type = self.unilora_indices_A.device.type
        return backends.resolve(self.requested_backend(), device_type)

    def projection(self, device=None) -> backends.LayerProjection:
        scales = self.bank.scales if device is None else self.bank.scales.to(device)
        return backends.LayerProjection(
            self.unilora_indices_A, self.unilora_indices_B, scales, self.r,
            self.in_features, self.out_features, tuple(self._hash_params),
        )

    def lora_matrices(self, theta: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Dense fp32 A (r x in) and B (out x r) of this layer (for merge, export, inspection), read
        from ``theta`` (default: the model's theta_d)."""
        theta = policy.theta_for_kernels((self.theta_d if theta is None else theta).detach())
        proj = self.projection(theta.device)
        impl = backends.get_backend(self.resolved_backend(theta.device.type), theta.device.type)
        return impl.lora_matrices(theta, proj)

    def delta_weight(self, theta: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``B A`` in the base weight's layout ((in, out) for Conv1D), fp32."""
        A, B = self.lora_matrices(theta)
        dw = B @ A
        return dw.t() if self._weight_t else dw

    def merge(self) -> None:
        """Add ``B A`` into the base weight; forward then runs the base layer alone."""
        self._fold_delta(merge=True)

    def unmerge(self) -> None:
        """Subtract ``B A`` from the base weight again (exact up to the weight dtype's rounding)."""
        self._fold_delta(merge=False)

    def _fold_delta(self, merge: bool) -> None:
        what = "merge" if merge else "unmerge"
        if self.merged == merge:
            state = "already merged" if merge else "not merged"
            warnings.warn(f"UniLoRALinear.{what}(): {state}, nothing to do", stacklevel=3)
            return
        weight = self._dense_weight(what)
        # unmerge subtracts the delta of the theta that merge added, even if theta was written since
        theta = self.bank.theta_snapshot() if merge else self.__dict__.get("_merged_theta")
        delta = self.delta_weight(theta).to(device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            weight.add_(delta if merge else -delta)
        self.merged = merge
        self._merged_theta = theta if merge else None

    def _dense_weight(self, what: str) -> torch.Tensor:
        weight = getattr(self.base_layer, "weight", None)
        expected = (self.in_features, self.out_features) if self._weight_t else (self.out_features, self.in_features)
        if not isinstance(weight, torch.Tensor) or not weight.is_floating_point() or tuple(weight.shape) != expected:
            raise TypeError(f"cannot {what} into {type(self.base_layer).__name__}: it has no dense float weight {expected}")
        return weight

    # -- forward ---------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        bank = self.bank
        batch = batch_state.ACTIVE.get().get(bank)  # this context's adapter_batch (batch_state.py)
        if batch is not None and self.adapter_enabled:
            return self._mixed_forward(x, batch, args, kwargs)
        if self.merged or not self.adapter_enabled:
            if self.merged and torch.is_grad_enabled() and self.theta_d.requires_grad and self.training:
                warnings.warn("UniLoRALinear is merged: theta_d gets no gradient until unmerge()", stacklevel=2)
            return self.base_layer(x, *args, **kwargs)
        in_f = self.in_features
        if x.shape[-1] != in_f:
            raise ValueError(f"input has {x.shape[-1]} features, {type(self).__name__} expects {in_f}")
        if torch.compiler.is_compiling():
            return self._forward_general(x, args, kwargs)
        # The hot path (plan.py): one dict lookup, the seed, one call each way.
        M = x.numel() // in_f
        device = x.device
        grad = torch.is_grad_enabled()
        cast = (torch.get_autocast_dtype(device.type)
                if _any_autocast() and torch.is_autocast_enabled(device.type) else None)
        key = (device, x.dtype, grad, self.training, cast, torch.are_deterministic_algorithms_enabled(), M)
        plan = self._plans.get(key)
        if plan is None and (M == 0 or (plan := self._build_plan(key, x)) is None):
            return self._forward_general(x, args, kwargs)
        theta = bank.owner._parameters[THETA_NAME]
        if theta.dtype is not plan.theta_in or theta.device != device:  # theta replaced since the plan
            return self._forward_general(x, args, kwargs)
        if plan.theta_up:
            theta = policy.theta_for_kernels(theta)
        seed = philox.new_seed(device) if plan.p else None
        base = self._modules["base_layer"]  # not Module.__getattr__: this runs per call
        if self._fusable_base and not args and not kwargs and (wb := _hookless_weight_and_bias(base)) is not None:
            weight, bias = wb
            if type(weight) in _PLAIN_TENSORS and weight.device == device:
                if plan.cast is not None:
                    x, weight = x.to(plan.cast), weight.to(plan.cast)
                    bias = None if bias is None else bias.to(plan.cast)
                if x.dtype == weight.dtype:
                    flat = x.dim() == 2  # no reshape, so no view nodes in the autograd graph
                    x2d = x if flat else x.reshape(-1, in_f)
                    if plan.c_train is not None:  # cpu / cuda: one C++ call each way
                        if grad:
                            out = plan.c_train(x2d, weight, bias, self._weight_t, theta, *plan.c_args, seed, plan.det,
                                               plan.fold)
                        else:
                            out = plan.c_infer(x2d, weight, bias, self._weight_t, theta, *plan.c_args, seed, plan.fold)[0]
                        return out if flat else out.view(*x.shape[:-1], self.out_features)
                    if grad:
                        return PlanLinear.apply(x, weight, bias, theta, seed, plan)
                    if x2d.stride(-1) != 1:
                        x2d = x2d.contiguous()
                    if x2d.shape[0] >= plan.fold:  # large M: one GEMM on W + B A
                        out = ops.base_linear(x2d, plan.update.fold_weight(weight, self._weight_t, theta), bias,
                                              self._weight_t)
                    else:
                        out = ops.base_linear(x2d, weight, bias, self._weight_t)
                        plan.update.forward_(out, x2d, theta, seed)
                    return out.view(*x.shape[:-1], self.out_features)
        if plan.cast is not None:
            return self._forward_general(x, args, kwargs)
        base_out = self._base_out(x, args, kwargs)
        if base_out.dtype != x.dtype:
            return self._update_general(base_out, x, theta)
        if grad and (base_out.requires_grad or theta.requires_grad or x.requires_grad):
            return PlanUpdate.apply(base_out, x, theta, seed, plan)
        x2d = x.reshape(-1, in_f)
        if x2d.stride(-1) != 1:
            x2d = x2d.contiguous()
        if not (_owns_storage(base_out, x) and base_out.is_contiguous()):
            base_out = base_out.clone(memory_format=torch.contiguous_format)
        plan.update.forward_(base_out.view(-1, self.out_features), x2d, theta, seed)
        return base_out

    def _forward_general(self, x: torch.Tensor, args, kwargs) -> torch.Tensor:
        """Every call the plans do not serve: torch.compile (custom ops), empty inputs, theta on
        another device, autocast around a base that is not fused. The same kernels, built per call."""
        base = self.base_layer
        theta = policy.theta_for_kernels(self.theta_d)
        if theta.device != x.device:
            theta = theta.to(x.device)
        scales = self.bank.scales
        if scales.device != x.device:
            scales = scales.to(x.device)
        u = self._update_args(x, theta, scales)
        wb = _hookless_weight_and_bias(base) if self._fusable_base and not args and not kwargs else None
        if wb is not None and type(wb[0]) in _PLAIN_TENSORS and x.device == wb[0].device:
            weight, bias = wb
            if torch.is_autocast_enabled(x.device.type) and torch.float64 not in (x.dtype, weight.dtype):
                # What autocast does to nn.Linear / Conv1D (linear, addmm): every operand in its dtype.
                dtype = torch.get_autocast_dtype(x.device.type)
                x, weight = x.to(dtype), weight.to(dtype)
                bias = None if bias is None else bias.to(dtype)
            if x.dtype == weight.dtype:
                return self._fused_linear(x, weight, bias, theta, u)
        return self._update_general(self._base_out(x, args, kwargs), x, theta, u)

    def _update_general(self, base_out: torch.Tensor, x: torch.Tensor, theta: torch.Tensor, u=None) -> torch.Tensor:
        """``base_out`` plus the update through the custom ops (``unilora::add_update(_)``)."""
        if u is None:
            theta = theta.to(x.device)
            u = self._update_args(x, theta, self.bank.scales.to(x.device))
        if torch.is_grad_enabled() and (base_out.requires_grad or theta.requires_grad or x.requires_grad):
            out, _ = torch.ops.unilora.add_update(base_out, x, *u)
            return out
        if _owns_storage(base_out, x):
            torch.ops.unilora.add_update_(base_out, x, *u)
            return base_out
        out, _ = torch.ops.unilora.add_update(base_out, x, *u)
        return out

    def _check_features(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input has {x.shape[-1]} features, {type(self).__name__} expects {self.in_features}")

    def _base_out(self, x: torch.Tensor, args, kwargs) -> torch.Tensor:
        """The base layer's output, checked to map (..., in) to (..., out)."""
        base_out = self.base_layer(x, *args, **kwargs)
        if base_out.shape[:-1] != x.shape[:-1] or base_out.shape[-1] != self.out_features:
            raise ValueError(f"base layer returned shape {tuple(base_out.shape)} for input {tuple(x.shape)}")
        return base_out

    def _update_args(self, x: torch.Tensor, theta: torch.Tensor, scales: torch.Tensor) -> ops.UpdateArgs:
        """The op arguments of this call: dropout and its seed in training, the backend for x's shape."""
        p = self.unilora_dropout if self.training else 0.0
        seed = philox.new_seed(x.device) if p > 0 else None
        backend = backends.resolve(self.requested_backend(), x.device.type,
                                   (ops.rows(x), self.in_features, self.out_features, self.r))
        return ops.UpdateArgs(theta, scales, self.unilora_indices_A, self.unilora_indices_B, self.r, self._hash_params,
                              p, seed, backend)

    def _fused_linear(self, x, weight, bias, theta, u: ops.UpdateArgs) -> torch.Tensor:
        """Base GEMM and update in one op. Eager mode calls the op's bodies without the custom op's
        Python dispatch, which costs as much as a decode step (docs/PERF.md); torch.compile traces
        the custom op."""
        impl = backends.get_backend(u.backend, x.device.type)
        if hasattr(impl, "linear_autograd") and x.numel() > 0:
            # cpu / cuda: the C++ autograd op, eager and compiled alike (torch.compile traces its fake kernel)
            out2d = impl.linear_autograd(x.reshape(-1, x.shape[-1]), weight, bias, self._weight_t, theta,
                                         u.projection(x.shape[-1], self.out_features), u.dropout_p, u.seed)
            return out2d.view(*x.shape[:-1], self.out_features)
        if torch.compiler.is_compiling() or _needs_grad(x, theta, weight, bias):
            return torch.ops.unilora.linear(x, weight, bias, self._weight_t, *u)[0]
        return ops.linear_forward(x, weight, bias, self._weight_t, *u)[0]

    def _mixed_forward(self, x: torch.Tensor, batch: batch_state.BatchState, args, kwargs) -> torch.Tensor:
        """Inside ``adapter_batch``: the base layer, then each sequence's own adapter (one op)."""
        if self.merged:
            raise ValueError("adapter_batch needs unmerged layers (a merged layer holds the default adapter): unmerge() first")
        seq_adapter = batch.ids_for(x.shape[0]) if x.dim() >= 2 else None
        if seq_adapter is None:
            raise ValueError(f"adapter_batch names {len(batch.names)} sequences but {type(self).__name__} got an "
                             f"input of shape {tuple(x.shape)} (dimension 0 is the batch: as many sequences, or k "
                             "times as many for num_beams / num_return_sequences = k)")
        self._check_features(x)
        theta = self.theta_d
        table = adapter_table.batch_table(self.bank, batch, theta)  # only the batch's adapters
        theta = theta.to(device=x.device, dtype=table.dtype)
        table = table.to(x.device)
        scales = self.bank.scales.to(x.device)
        seq_adapter = seq_adapter.to(x.device)
        base_out = self._base_out(x, args, kwargs)
        x = x.to(base_out.dtype)  # autocast: the update reads x as the base layer did
        u = self._update_args(x, theta, scales)
        if torch.compiler.is_compiling():
            return torch.ops.unilora.mixed_add_update(base_out, x, table, seq_adapter, *u)
        if torch.is_grad_enabled() and any(t.requires_grad for t in (base_out, x, theta, table)):
            return ops.MixedFunction.apply(base_out, x, table, seq_adapter, *u)
        if _owns_storage(base_out, x):
            ops.mixed_add_update_inplace_body(base_out, x, table, seq_adapter, *u)
            return base_out
        return ops.mixed_add_update_body(base_out, x, table, seq_adapter, *u)

    def extra_repr(self) -> str:
        try:
            resolved = self.resolved_backend()
        except backends.BackendNotAvailableError as exc:
            resolved = f"unavailable: {exc}"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
            f"d={self.bank.d}, projection={self.bank.projection}, backend={self.requested_backend()}"
            f"->{resolved}, dropout={self.unilora_dropout}, merged={self.merged}"
        )


def _param_device(module: nn.Module):
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")


def _needs_grad(x: torch.Tensor, theta: torch.Tensor, weight: torch.Tensor, bias) -> bool:
    if not torch.is_grad_enabled():
        return False
    return x.requires_grad or theta.requires_grad or weight.requires_grad or (
        isinstance(bias, torch.Tensor) and bias.requires_grad)


def _owns_storage(out: torch.Tensor, x: torch.Tensor) -> bool:
    """True when ``out`` is a fresh tensor we may update in place (not x, not a view of a leaf)."""
    return (
        out._base is None
        and not out.requires_grad
        and out.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()
    )
