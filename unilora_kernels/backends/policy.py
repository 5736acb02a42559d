"""The rules every backend reads, each defined once: dtypes, compute dtype, knobs, limits, seeds.

The C++ build takes ``DECODE_MAX_M`` and ``DECODE_MAX_R`` from this file too (``setup.py`` and
``CMakeLists.txt`` read them and pass them as ``-DUNILORA_DECODE_MAX_*``), and
``build_info()["extension"]`` reports the values the extension was compiled with.
"""

from __future__ import annotations

import os
import torch

from . import cost_model

# Activations (x, outputs, gradients) any backend accepts; theta_d is fp32 (fp64 for gradcheck).
ACTIVATION_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
THETA_DTYPES = (torch.float32, torch.float64)
# A mixed batch's adapter table (and theta_d beside it): what a user may store it in (fp32, or bf16
# to halve its memory), and what the mixed kernels read (converting to the compute dtype).
ADAPTER_TABLE_DTYPES = (torch.float32, torch.bfloat16)
TABLE_DTYPES = THETA_DTYPES + (torch.bfloat16, torch.float16)

# Decode-sized calls: at most this many rows (and this rank) run one fused kernel per layer
# (the cuda decode kernel; Triton's one-launch forward schedule).
DECODE_MAX_M = 16
DECODE_MAX_R = 64

# Spellings of a boolean environment knob.
TRUE_SPELLINGS = ("1", "true", "yes", "on")
FALSE_SPELLINGS = ("0", "false", "no", "off", "")


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """Accumulation dtype of the update and of h: fp64 when any operand is fp64, else fp32."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def theta_for_kernels(theta: torch.Tensor) -> torch.Tensor:
    """theta_d as the kernels read it: fp32/fp64 as it is; fp16/bf16 (a model cast with ``.half()``
    or ``.to(dtype)``) upcast to fp32 by a differentiable cast, so its gradient arrives in its own dtype."""
    if theta.dtype in THETA_DTYPES or not theta.is_floating_point():
        return theta  # a non-float theta is refused by the ops' checks, with its dtype named
    return theta.float()


def env_flag(name: str, default: bool) -> bool:
    """A boolean environment knob; an unrecognised value is a ValueError naming the variable."""
    raw = os.environ.get(name)
    if raw is None:
        return default
    value = raw.strip().lower()
    if value in TRUE_SPELLINGS:
        return True
    if value in FALSE_SPELLINGS:
        return False
    raise ValueError(f"{name}={raw!r}: expected one of {TRUE_SPELLINGS + FALSE_SPELLINGS[:-1]}")


_optimizer_steps = [0]
_step_hook = None  # the global torch.optim step hook that counts them (registered on first use)


def _count_step(*_args) -> None:
    _optimizer_steps[0] += 1


def optimizer_steps() -> int:
    """``torch.optim.Optimizer`` steps this process has run. Caches of values derived from parameters
    (decode columns, a batch's stacked adapters) key on it beside the parameters' version counters:
    fused steps (``fused=True``) write parameters in one kernel without bumping their versions. The
    hook is registered on the first call, so steps before it count from there."""
    global _step_hook
    if _step_hook is None:
        from torch.optim.optimizer import register_optimizer_step_post_hook  # torch.optim does not expose it

        _step_hook = register_optimizer_step_post_hook(_count_step)
    return _optimizer_steps[0]


def deterministic() -> bool:
    """No float atomics in backward (a fixed summation order): ``torch.use_deterministic_algorithms``
    or ``UNILORA_DETERMINISTIC``."""
    return torch.are_deterministic_algorithms_enabled() or env_flag("UNILORA_DETERMINISTIC", False)


# The large-M fold (forward ``x (W + B A)^T`` in one GEMM, backward ``g (W + B A)``): a row
# threshold per layer plan, passed to the kernels (the C++ ops' ``fold_min_m``; Triton's plan).
FOLD_NEVER = 1 << 62  # a threshold no call reaches (the ops' int64 argument)
FOLD_BACKENDS = ("cpu", "cuda", "triton")
FOLD_MAX_MIB_DEFAULT = 256  # the bound of W + B A's workspace (one layer's weight at a time)


def fold_max_bytes() -> int:
    """``UNILORA_FOLD_MAX_MIB``: a layer whose weight is larger never folds on a GPU (its W + B A
    would be a workspace that large)."""
    raw = os.environ.get("UNILORA_FOLD_MAX_MIB", "").strip()
    try:
        mib = FOLD_MAX_MIB_DEFAULT if raw == "" else float(raw)
    except ValueError:
        raise ValueError(f"UNILORA_FOLD_MAX_MIB={raw!r}: expected a number of MiB") from None
    if mib < 0:
        raise ValueError(f"UNILORA_FOLD_MAX_MIB={raw!r}: expected a number of MiB >= 0")
    return int(mib * (1 << 20))


def _fold_knob() -> "int | None":
    """``UNILORA_FOLD_MIN_M``: auto (unset: the cost model's threshold), off, or a row count."""
    raw = os.environ.get("UNILORA_FOLD_MIN_M", "").strip().lower()
    if raw in ("", "auto"):
        return None
    if raw == "off":
        return FOLD_NEVER
    if raw.isdigit():
        return int(raw)
    raise ValueError(f"UNILORA_FOLD_MIN_M={raw!r}: expected auto, off or a row count >= 0")


def fold_min_m(backend: str, device: torch.device, dtype: torch.dtype, in_features: int, out_features: int,
               r: int, dropout: bool, training: bool, det: bool) -> int:
    """The fewest rows at which a layer call folds ``W + B A`` (FOLD_NEVER: it never does).

    Never with dropout (its mask applies to the adapter's input only), nor at decode sizes, nor in
    deterministic mode on Triton (its one-pass backward adds ``g B`` with atomics), nor on a
    reference backend. cpu: fp32/fp64 and ``M >= max(in, out)`` (measured on CPU: docs/PERF.md).
    cuda / triton: ``cost_model.fold_threshold`` for the device (H200 if its name says so, else
    H100 figures), if ``W`` fits ``UNILORA_FOLD_MAX_MIB``. ``UNILORA_FOLD_MIN_M`` replaces the
    threshold (not the conditions). Read when a plan is built."""
    if backend not in FOLD_BACKENDS or dropout or (det and backend == "triton"):
        return FOLD_NEVER
    elt = dtype.itemsize
    if backend == "cpu":
        if dtype not in THETA_DTYPES:
            return FOLD_NEVER
        auto, floor = max(in_features, out_features), 0  # the extension keeps decode sizes (M <= 4) out
    else:
        if dtype == torch.float64 or in_features * out_features * elt > fold_max_bytes():
            return FOLD_NEVER
        name = None
        if device.type == "cuda" and torch.cuda.is_available():
            name = torch.cuda.get_device_name(device)
        auto = cost_model.fold_threshold(in_features, out_features, r, elt, training, cost_model.peak_named(name)[1])
        floor = DECODE_MAX_M + 1
    knob = _fold_knob()
    return max(floor, auto if knob is None else knob)
