"""The rules every backend reads, each defined once: dtypes, compute dtype, knobs, limits, seeds.

The C++ build takes ``DECODE_MAX_M`` and ``DECODE_MAX_R`` from this file too (``setup.py`` and
``CMakeLists.txt`` read them and pass them as ``-DUNILORA_DECODE_MAX_*``), and
``build_info()["extension"]`` reports the values the extension was compiled with.
"""

from __future__ import annotations

import os
import torch

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
