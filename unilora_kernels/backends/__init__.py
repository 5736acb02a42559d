"""Backend registry: which implementations of the Uni-LoRA primitives exist, and which one runs.

Every backend module implements the same three primitives on flattened 2-D tensors:

* ``forward_(out, x, theta, proj, p, seed) -> h``: ``out += drop(x) A^T B^T`` in place, and
  returns ``h = drop(x) A^T`` (M x r, fp32 or fp64) for backward;
* ``backward(g, x, theta, proj, p, seed, h, grad_x, need_x, need_theta) -> (grad_x, grad_theta)``:
  adds ``((g B) A) * mask`` into ``grad_x`` (allocating it when None) and scatter-adds dA and
  dB through the projection into one d-length ``grad_theta``;
* ``lora_matrices(theta, proj) -> (A, B)``: the dense fp32 LoRA matrices (merge and export).

``auto`` resolves per device type, once, to a fixed backend, so results never change behind
the user's back: CUDA tensors -> triton, else cuda, else reference; CPU tensors -> cpu (the
compiled extension), else reference.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import NamedTuple

import torch

from ..config import BACKENDS


class BackendNotAvailableError(ValueError):
    """A backend was requested that cannot run here (not built, wrong device, missing package)."""


class LayerProjection(NamedTuple):
    """Everything a kernel needs to read one layer's A (r x in) and B (out x r) from theta_d."""

    idx_a: torch.Tensor  # int32 (r, in) for "uniform"; empty for "hashed"
    idx_b: torch.Tensor  # int32 (out, r) for "uniform"; empty for "hashed"
    scales: torch.Tensor  # fp32 (d,) for "uniform"; fp32 (2,) for "hashed"
    r: int
    in_features: int
    out_features: int
    hashed: tuple  # () for "uniform"; (D, offset_of_A, key) for "hashed"

    @property
    def is_hashed(self) -> bool:
        return bool(self.hashed)


@dataclass(frozen=True)
class _Entry:
    module: str  # module implementing the primitives
    devices: tuple  # device types it runs on


_REGISTRY = {
    "reference": _Entry("unilora_kernels.backends.reference", ("cpu", "cuda", "meta")),
    "triton": _Entry("unilora_kernels.backends.triton_backend", ("cuda", "cpu")),
    "cpu": _Entry("unilora_kernels.backends.extension", ("cpu",)),
    "cuda": _Entry("unilora_kernels.backends.extension", ("cuda",)),
}


def _probe(name: str):
    """(module, None) if the backend's module imports and says it is usable, else (None, reason)."""
    entry = _REGISTRY[name]
    try:
        module = importlib.import_module(entry.module)
    except ImportError as exc:
        return None, f"its module could not be imported ({exc})"
    reason = module.unavailable_reason(name) if hasattr(module, "unavailable_reason") else None
    return (None, reason) if reason else (module, None)


def availability() -> dict:
    """{backend: None if usable somewhere on this machine, else the reason it is not}."""
    return {name: _probe(name)[1] for name in _REGISTRY}


def get_backend(name: str, device_type: str):
    """The module of backend ``name`` for tensors on ``device_type``, or a clear error."""
    if name not in _REGISTRY:
        raise BackendNotAvailableError(f"unknown backend {name!r}; choose one of {BACKENDS}")
    module, reason = _probe(name)
    if module is None:
        raise BackendNotAvailableError(f"backend {name!r} is not available: {reason}")
    if device_type not in _REGISTRY[name].devices:
        raise BackendNotAvailableError(
            f"backend {name!r} does not run on {device_type} tensors (it runs on {', '.join(_REGISTRY[name].devices)})"
        )
    device_reason = module.device_unavailable_reason(name, device_type) if hasattr(
        module, "device_unavailable_reason"
    ) else None
    if device_reason:
        raise BackendNotAvailableError(f"backend {name!r} cannot run on {device_type} tensors: {device_reason}")
    return module


_AUTO_ORDER = {"cuda": ("triton", "cuda", "reference"), "cpu": ("cpu", "reference")}
_auto_cache: dict = {}


def resolve(requested: str, device_type: str) -> str:
    """The concrete backend name that ``requested`` means for tensors on ``device_type``."""
    if requested != "auto":
        get_backend(requested, device_type)  # raises if it cannot run here
        return requested
    if device_type not in _auto_cache:
        chosen = "reference"
        for name in _AUTO_ORDER.get(device_type, ("reference",)):
            try:
                get_backend(name, device_type)
            except BackendNotAvailableError:
                continue
            chosen = name
            break
        _auto_cache[device_type] = chosen
    return _auto_cache[device_type]
