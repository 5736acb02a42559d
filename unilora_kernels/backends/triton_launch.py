"""Launching the Triton kernels: one fixed config, the autotuned one, or a recorded ``Launch``.

A ``Launcher`` holds one kernel and its autotune space. An untuned launch runs the first config
that applies (deterministic mode, the interpreter, ``UNILORA_TRITON_AUTOTUNE=0``); a tuned one
goes through ``triton.autotune``, which times every candidate on the real buffers and so resets
or restores each buffer it writes. Inside ``record_launches()`` nothing runs: every launch is
recorded instead (``compile_check`` and the tests read them).

Under the interpreter (``TRITON_INTERPRET=1`` before import) every program is a Python loop over
numpy ops, so by default each kernel runs one large tile (``interpreter_tiles``), and tensors
are handed over as aliases (``interpreter_alias``).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from typing import NamedTuple, Optional

import torch

from .policy import env_flag

try:
    import triton
except ImportError as _exc:  # the registry reports the reason through the backend's unavailable_reason()
    triton = None
    IMPORT_ERROR: Optional[str] = f"triton is not installed ({_exc}); pip install triton"
else:
    IMPORT_ERROR = None
    from ..triton_kernels import index_math


def _interpreting() -> bool:
    """Whether the kernels were built by the Triton interpreter (decided when they were imported)."""
    if triton is None:
        return False
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(index_math.gather_kernel, InterpretedFunction)


INTERPRET = _interpreting()


# --------------------------------------------------------------------------------------------
# autotuning on or off
# --------------------------------------------------------------------------------------------
_autotune_override: Optional[bool] = None


def autotune_on(device: torch.device, det: bool) -> bool:
    """Benchmark the config space (CUDA, non-deterministic runs); else the first pruned config."""
    if det:
        return False  # a config chosen by timing could differ between runs, and so would the sums
    if _autotune_override is not None:
        return _autotune_override
    if INTERPRET or device.type != "cuda":
        return False
    return env_flag("UNILORA_TRITON_AUTOTUNE", True)


@contextlib.contextmanager
def autotune(enabled: bool):
    """Force autotuning on or off (tests: the interpreter times each config by one run)."""
    global _autotune_override
    old, _autotune_override = _autotune_override, enabled
    try:
        yield
    finally:
        _autotune_override = old


def do_bench(kernel_call, quantiles):
    """The autotuner's timer; under the interpreter one run, which only exercises reset/restore."""
    if INTERPRET:
        t0 = time.perf_counter()
        kernel_call()
        t = (time.perf_counter() - t0) * 1e3
        return [t, t, t]
    return triton.testing.do_bench(kernel_call, warmup=5, rep=20, quantiles=quantiles)


# --------------------------------------------------------------------------------------------
# interpreter tiles
# --------------------------------------------------------------------------------------------
# "large" (the interpreter default) runs one big tile per kernel (Launcher.interpret_config, and
# the backend's fp32 rank chunks NC = 1); "gpu" runs the GPU default configs, as the kernel tests do.
_interpret_tiles = os.environ.get("UNILORA_TRITON_INTERPRET_TILES", "large").strip().lower()
if _interpret_tiles not in ("large", "gpu"):
    raise ValueError(f"UNILORA_TRITON_INTERPRET_TILES={_interpret_tiles!r}: expected large or gpu")


@contextlib.contextmanager
def interpreter_tiles(mode: str):
    """Tile sizes the interpreter runs with: ``large`` (fast) or ``gpu`` (the GPU defaults)."""
    global _interpret_tiles
    if mode not in ("large", "gpu"):
        raise ValueError(f"interpreter tiles must be 'large' or 'gpu', got {mode!r}")
    old, _interpret_tiles = _interpret_tiles, mode
    try:
        yield
    finally:
        _interpret_tiles = old


def large_tiles() -> bool:
    """Whether launches run the interpreter's one-big-tile configs (never while recording)."""
    return INTERPRET and _interpret_tiles == "large" and _recorder is None


def interpreter_alias(t):
    """A CPU tensor over the same memory but with a storage of its own.

    The interpreter calls ``untyped_storage()`` on every tensor argument; PyTorch then keeps
    that storage's Python object alive, and autograd will no longer accumulate a gradient in
    place into such a tensor (one extra d-length add per backward). Handing the interpreter an
    alias keeps the caller's tensors untouched, so memory behaves as it does on the GPU.
    """
    if not isinstance(t, torch.Tensor) or t.device.type != "cpu" or t.numel() == 0:
        return t
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16: alias the bits
        return torch.from_numpy(t.view(torch.int16).numpy()).view(torch.bfloat16)
    return torch.from_numpy(t.numpy())


# --------------------------------------------------------------------------------------------
# recording
# --------------------------------------------------------------------------------------------
class Launch(NamedTuple):
    """A launch seen by ``record_launches``: its kernel, arguments, constexprs, configs and grid."""

    launcher: "Launcher"
    args: dict
    meta: dict
    configs: list  # every tuning candidate when autotuning, else the one config used
    grid: tuple  # grid of the first config


_recorder: Optional[list] = None


@contextlib.contextmanager
def record_launches():
    """Collect a ``Launch`` for every kernel launch instead of running it (outputs stay unset)."""
    global _recorder
    old, _recorder = _recorder, []
    try:
        yield _recorder
    finally:
        _recorder = old


def recording() -> bool:
    """Inside ``record_launches()``: no kernel runs, so outputs hold no results."""
    return _recorder is not None


# --------------------------------------------------------------------------------------------
# the launcher
# --------------------------------------------------------------------------------------------
def single_config(**blocks) -> list:
    """The autotune space of a kernel with one config (applies to every launch)."""
    return [(dict(), triton.Config(blocks, num_warps=4))]


class Launcher:
    """One kernel and its autotune space: ``[(when, triton.Config)]``.

    ``when`` maps a meta-parameter (``LOWP``, ``RP``) to the values a config applies to; the
    configs that apply to a launch, in order, are its tuning candidates, the first its default.
    """

    def __init__(self, fn, space, key=(), reset_to_zero=(), restore_value=(), interpret_blocks=None):
        self.fn = fn
        self.interpret_config = triton.Config(interpret_blocks, num_warps=4) if interpret_blocks else None
        self.space = list(space)
        self.configs = [c for _, c in self.space]
        self._when = {id(c): w for w, c in self.space}
        self.key = list(key)
        self.reset_to_zero = list(reset_to_zero)
        self.restore_value = list(restore_value)
        self._tuners: dict = {}
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        return self.fn.__name__ if hasattr(self.fn, "__name__") else self.fn.fn.__name__

    def _applies(self, c, meta: dict) -> bool:
        for k, allowed in self._when[id(c)].items():
            if allowed is None or k not in meta:
                continue
            if (meta[k] not in allowed) if isinstance(allowed, tuple) else (meta[k] != allowed):
                return False
        return True

    def prune(self, configs, named_args=None, **meta):
        keep = [c for c in configs if self._applies(c, meta)]
        if not keep:
            raise ValueError(f"{self.name}: no autotune config applies to {meta}")
        return keep

    def configs_for(self, meta: dict) -> list:
        return self.prune(self.configs, **meta)

    def pick(self, meta: dict):
        """The config an untuned launch uses."""
        if self.interpret_config is not None and large_tiles():
            return self.interpret_config
        return self.configs_for(meta)[0]

    def _autotuner(self, args: dict):
        """The autotuner for this launch's buffers: benchmarking runs every config on the real
        outputs, so each is reset (``reset_to_zero``) or saved and restored (``restore_value``)
        around every timed run; buffers a launch does not pass (None) are left out."""
        reset = tuple(n for n in self.reset_to_zero if args.get(n) is not None)
        restore = tuple(n for n in self.restore_value if args.get(n) is not None)
        with self._lock:
            tuner = self._tuners.get((reset, restore))
            if tuner is None:
                tuner = triton.autotune(
                    self.configs, key=self.key, prune_configs_by={"early_config_prune": self.prune},
                    reset_to_zero=list(reset) or None, restore_value=list(restore) or None, do_bench=do_bench,
                )(self.fn)
                self._tuners[(reset, restore)] = tuner
            return tuner

    def launch(self, grid, args: dict, meta: dict, device: torch.device, tune: bool):
        """Run with the first applicable config, or the autotuned one; ``grid(config_kwargs)``."""
        configs = self.configs_for(meta)
        if _recorder is not None:
            grid0 = tuple(grid({**meta, **configs[0].all_kwargs()}))
            _recorder.append(Launch(self, dict(args), dict(meta), configs if tune and len(configs) > 1 else configs[:1],
                                    grid0))
            return
        if INTERPRET:
            args = {k: interpreter_alias(v) for k, v in args.items()}
        # Switching the current device costs host time on every launch: only when the tensors are elsewhere.
        switch = device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device()
        ctx = torch.cuda.device(device) if switch else contextlib.nullcontext()
        with ctx:
            if tune and len(configs) > 1:
                self._autotuner(args)[grid](**args, **meta)
                return
            kw = self.pick(meta).all_kwargs()
            self.fn[grid({**meta, **kw})](**args, **meta, **kw)
