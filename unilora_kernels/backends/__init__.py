"""Backend registry: which implementations of the Uni-LoRA primitives exist, and which one runs.

Every backend module implements the same three primitives on flattened 2-D tensors:

* ``forward_(out, x, theta, proj, p, seed) -> h``: ``out += drop(x) A^T B^T`` in place, and
  returns ``h = drop(x) A^T`` (M x r, fp32 or fp64) for backward;
* ``backward(g, x, theta, proj, p, seed, h, grad_x, need_x, need_theta) -> (grad_x, grad_theta)``:
  adds ``((g B) A) * mask`` into ``grad_x`` (allocating it when None) and scatter-adds dA and
  dB through the projection into one d-length ``grad_theta``;
* ``lora_matrices(theta, proj) -> (A, B)``: the dense fp32 LoRA matrices (merge and export).

Mixed batches (many adapters in one call; ``adapters.py``): ``seq_adapter`` (int32, (S,), on the
device of x) names one adapter per sequence, and row m of x belongs to sequence ``m // (M // S)``:
-1 runs no adapter (PEFT's ``"__base__"``), 0 reads ``theta`` (the model's own theta_d), k > 0
reads row k - 1 of ``table`` (``(capacity, d)``, the dtype of ``theta``: fp32, fp64 or bf16/fp16,
read into the compute dtype). One call per layer, no loop over adapters on the host:

* ``mixed_forward_(out, x, theta, table, seq_adapter, proj, p, seed) -> None``: ``out[m] +=
  drop(x)[m] A_a^T B_a^T``;
* ``mixed_backward(g, x, theta, table, seq_adapter, proj, p, seed, need_x, need_theta)
  -> (grad_x, grad_theta, grad_table)``: the update's own gradients (grad_x in x's dtype, zero on
  base rows; grad_theta and grad_table in theirs), None for what was not asked.

Seeds. ``seed`` is None (no dropout) or a one-element int64 tensor, on the device of x or on
the CPU; a backend reads its value where the kernels run (a kernel loads it through a pointer),
never on the host of a GPU call, so forward and backward stay sync-free and a CUDA-graph replay
reads the seed that the captured ``torch.randint`` drew for that replay. A Python int is accepted
too (tests) and converted.

Plans (the hot path). ``UniLoRALinear`` builds one ``PlanSpec`` per (device, dtype, grad mode,
training, row bucket) on first use and keeps what the backend makes of it; a backend that
implements ``make_plan(spec)`` returns an object with ``forward_(out, x, theta, seed) -> h`` and
``backward(g, x, theta, seed, h, grad_x, need_x, need_theta) -> (grad_x, grad_theta)``: the
primitives above with the projection, dropout, configs and every static check fixed when the
plan was built. Per call the plan only checks what it cannot know in advance; the caller
guarantees x is (M, in) with unit-stride rows, ``row_bucket(M) == spec.rows``, out/g of x's dtype
(g of any strides: ``sum()``'s expanded grad_out is read as it is, not copied), h as the plan's
``forward_`` returned it.

``auto`` resolves per device type, once, so results never change behind the user's back: CUDA
tensors -> triton (and, for decode-sized calls, the compiled cuda kernels when both exist: see
``resolve``), else cuda, else reference; CPU tensors -> cpu (the compiled extension), else
reference.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import NamedTuple

import torch



# Every name a user may ask for; "auto" picks one per device (``resolve``).
BACKENDS = ("auto", "reference", "triton", "cpu", "cuda")


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
    hash_params: tuple  # () for "uniform"; (D, offset_of_A, key) for "hashed"

    @property
    def is_hashed(self) -> bool:
        return bool(self.hash_params)


class PlanSpec(NamedTuple):
    """The static part of a layer call, what a backend plan (``make_plan``) is built for."""

    proj: LayerProjection  # indices and scales already on ``device``
    device: torch.device
    x_dtype: torch.dtype  # activations; out, grad_out and grad_x share it
    theta_dtype: torch.dtype
    dropout_p: float
    rows: int  # ``row_bucket(M)`` of the calls the plan serves (M <= rows, except in the last bucket)
    deterministic: bool  # policy.deterministic() when the plan was built


ROW_BUCKET_MIN = 16
ROW_BUCKET_MAX = 1 << 14


def row_bucket(M: int) -> int:
    """The plan bucket of a call with M rows: the next power of two, clamped to [16, 2^14]
    (calls above 2^14 rows share the last bucket)."""
    return min(max(ROW_BUCKET_MIN, 1 << max(0, M - 1).bit_length()), ROW_BUCKET_MAX)


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


def module_of(name: str):
    """The module implementing backend ``name`` (no availability check; fake kernels use it)."""
    return importlib.import_module(_REGISTRY[name].module)


def availability() -> dict:
    """{backend: None if usable somewhere on this machine, else the reason it is not}."""
    return {name: _probe(name)[1] for name in _REGISTRY}


_ready: dict = {}  # (name, device_type) -> module, once it was found usable (checked once per process)


def get_backend(name: str, device_type: str):
    """The module of backend ``name`` for tensors on ``device_type``, or a clear error."""
    module = _ready.get((name, device_type))
    if module is not None:  # every op call lands here: keep it to one dict lookup
        return module
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
    _ready[(name, device_type)] = module
    return module


_AUTO_ORDER = {"cuda": ("triton", "cuda", "reference"), "cpu": ("cpu", "reference")}
_auto_cache: dict = {}


def resolve(requested: str, device_type: str, shape=None) -> str:
    """The concrete backend name that ``requested`` means for tensors on ``device_type``.

    ``auto`` is fixed per device type (CPU: ``cpu``, else ``reference``), except on CUDA when both
    compiled ``cuda`` kernels and Triton are available: then a layer call of ``shape`` =
    ``(M, in, out, r)`` goes to ``cuda`` when ``extension.prefer_cuda_kernels`` says so (decode
    batches: one fused C++-launched kernel) and to ``triton`` otherwise. The rule depends on the
    shape alone, so the same call always runs the same kernels.
    """
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
    chosen = _auto_cache[device_type]
    if chosen == "triton" and shape is not None:
        prefer = _cuda_preference()
        if prefer is not None and prefer(*shape):
            return "cuda"
    return chosen


def _cuda_preference():
    """``extension.prefer_cuda_kernels`` when the compiled cuda kernels can run, else None."""
    if "cuda-prefer" not in _auto_cache:
        try:
            _auto_cache["cuda-prefer"] = get_backend("cuda", "cuda").prefer_cuda_kernels
        except BackendNotAvailableError:
            _auto_cache["cuda-prefer"] = None
    return _auto_cache["cuda-prefer"]
