"""Launching the Triton kernels: one fixed config, the autotuned one, or a recorded ``Launch``.

A ``Launcher`` holds one kernel and its autotune space. The mixed-batch calls launch through
it (``Launcher.launch``): untuned, the first config that applies (the default: autotuning is
opt-in, ``UNILORA_TRITON_AUTOTUNE=1``); tuned, through ``triton.autotune``, which times every
candidate on the real buffers and so resets or restores each buffer it writes. Inside
``record_launches()`` nothing runs: every launch is recorded instead (``compile_check`` and the
tests read them).

Under the interpreter (``TRITON_INTERPRET=1`` before import) every program is a Python loop over
numpy ops, so by default each kernel runs one large tile (``interpreter_tiles``), and tensors
are handed over as aliases (``interpreter_alias``).

Plans (``triton_backend.make_plan``) fix each kernel's config once as a ``Slot`` and launch it
with ``run(slot, grid, args)``: no pruning, no grid callback, no device query per launch. A
slot's config comes from the winners tuned in this process, else from the config data
(``configs_for_device``: ``triton_kernels/configs/<device>.json`` over ``default.json``, or the
file ``UNILORA_TRITON_CONFIGS`` names), when the entry is one of the configs that apply; else
the first config that applies. A tuning plan times its slots' candidates on its first call
(``tune_slots``); ``save_tuned(path)`` (or ``UNILORA_TRITON_TUNE_OUT=path``) writes the winners
in the config data's format.
"""

from __future__ import annotations

import contextlib
import json
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
    """Benchmark the config space (opt-in: ``UNILORA_TRITON_AUTOTUNE=1``, CUDA, non-deterministic
    runs); else the config data's entry or the first config that applies."""
    if det:
        return False  # a config chosen by timing could differ between runs, and so would the sums
    if _autotune_override is not None:
        return _autotune_override
    if INTERPRET or device.type != "cuda":
        return False
    return env_flag("UNILORA_TRITON_AUTOTUNE", False)


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
        switch = device.type == "cuda" and device_switch(device) is not None
        ctx = torch.cuda.device(device) if switch else contextlib.nullcontext()
        with ctx:
            if tune and len(configs) > 1:
                self._autotuner(args)[grid](**args, **meta)
                return
            kw = self.pick(meta).all_kwargs()
            self.fn[grid({**meta, **kw})](**args, **meta, **kw)


def device_switch(device: torch.device) -> Optional[int]:
    """The CUDA device index a launch on ``device`` must switch to, or None when it never needs
    to (not CUDA, or a single visible GPU: then it is always the current device)."""
    if device.type != "cuda" or INTERPRET or torch.cuda.device_count() <= 1:
        return None
    idx = device.index
    return None if idx is None or idx == torch.cuda.current_device() else idx


# --------------------------------------------------------------------------------------------
# plans: a kernel with its config fixed (Slot), launched by run()
# --------------------------------------------------------------------------------------------
class Slot:
    """One kernel of a plan: its constexprs and one config, fixed when the plan was built.

    ``kw`` is everything a launch passes besides the per-call arguments (constexprs, block
    sizes, num_warps/num_stages); ``blocks`` are the config's block sizes, which the grid reads;
    ``configs`` is what a recorded launch reports (every candidate when tuning, else the config).
    """

    __slots__ = ("launcher", "fn", "meta", "bucket", "candidates", "config", "blocks", "kw", "configs")

    def __init__(self, launcher: "Launcher", meta: dict, bucket: str, tune: bool, table: dict):
        self.launcher = launcher
        self.fn = launcher.fn
        self.meta = meta
        self.bucket = bucket
        self.candidates = launcher.configs_for(meta)
        self.set(choose_config(launcher, meta, bucket, self.candidates, table, tune))
        self.configs = self.candidates if tune and len(self.candidates) > 1 else [self.config]

    def set(self, config) -> None:
        self.config = config
        self.blocks = dict(config.kwargs)
        self.kw = {**self.meta, **config.all_kwargs()}


def run(slot: Slot, grid: tuple, args: dict) -> None:
    """Launch ``slot`` on ``grid`` with the per-call ``args``, or record it (``record_launches``)."""
    rec = _recorder
    if rec is not None:
        rec.append(Launch(slot.launcher, args, slot.meta, slot.configs, grid))
        return
    if INTERPRET:
        args = {k: interpreter_alias(v) for k, v in args.items()}
    slot.fn[grid](**args, **slot.kw)


def config_key(config) -> dict:
    """A config as config data stores it: block sizes, num_warps, num_stages."""
    return {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}


def choose_config(launcher: "Launcher", meta: dict, bucket: str, candidates: list, table: dict, tune: bool):
    """The config a plan's slot launches: the interpreter's large tile, else (tuning plans only)
    this process's tuned winner, else the config data's entry for (kernel, bucket), when it is
    one of ``candidates``; else the first candidate (the default). Untuned plans never read the
    tuned winners, so a deterministic run does not change when another plan was tuned."""
    if launcher.interpret_config is not None and large_tiles():
        return launcher.interpret_config
    tuned = _tuned.get((launcher.name, bucket)) if tune else None
    for entry in (tuned, table.get(launcher.name, {}).get(bucket)):
        if isinstance(entry, dict):
            for c in candidates:
                if config_key(c) == entry:
                    return c
    return candidates[0]


# installed as unilora_kernels/triton_kernels/configs (setup.py package_data)
CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "triton_kernels", "configs")
CONFIG_FORMAT = "unilora_kernels triton configs v1"
_tables: dict = {}  # (path, mtime) -> kernels mapping


def _read_table(path: str) -> dict:
    """``{"format": ..., "kernels": {kernel name: {bucket: config}}}`` from ``path`` ({} if absent)."""
    try:
        mtime = os.stat(path).st_mtime_ns
    except OSError:
        return {}
    key = (path, mtime)
    if key not in _tables:
        with open(path) as fh:
            data = json.load(fh)
        if not isinstance(data, dict) or data.get("format") != CONFIG_FORMAT or not isinstance(
                data.get("kernels"), dict):
            raise ValueError(f"{path}: not a triton config file (expected format {CONFIG_FORMAT!r})")
        _tables[key] = data["kernels"]
    return _tables[key]


def device_file_name(device: torch.device) -> str:
    """The config data file of a device: its name with spaces as underscores (vLLM's convention)."""
    if device.type != "cuda" or INTERPRET:
        return "default.json"
    return torch.cuda.get_device_name(device).replace(" ", "_") + ".json"


def configs_for_device(device: torch.device) -> dict:
    """{kernel name: {bucket: config}}: the file ``UNILORA_TRITON_CONFIGS`` names, else the
    packaged ``<device>.json`` entries over ``default.json``'s (read when a plan is built)."""
    path = os.environ.get("UNILORA_TRITON_CONFIGS", "").strip()
    if path:
        return _read_table(path)
    table = {k: dict(v) for k, v in _read_table(os.path.join(CONFIG_DIR, "default.json")).items()}
    for k, v in _read_table(os.path.join(CONFIG_DIR, device_file_name(device))).items():
        table.setdefault(k, {}).update(v)
    return table


def bucket_key(rows: int, K: int, N: int, RP: int, dtype: torch.dtype) -> str:
    """The config data's key of a launch: row bucket, the kernel's K and N (0 when it has none),
    padded rank and activation dtype."""
    return f"m{rows}_k{K}_n{N}_rp{RP}_{str(dtype).replace('torch.', '')}"


# --------------------------------------------------------------------------------------------
# tuning a plan's slots, and saving the winners as config data
# --------------------------------------------------------------------------------------------
_tuned: dict = {}  # (kernel name, bucket) -> config_key of the winner


def tune_slots(slots, call, restore) -> None:
    """Time every candidate of every slot (one slot at a time, the others at their current
    config) by ``do_bench`` of ``call()`` after ``restore()``, keep the fastest in each slot and
    remember it (``save_tuned``). ``restore`` puts back every buffer ``call`` updates in place."""
    for slot in slots:
        if len(slot.candidates) < 2 or _tuned.get((slot.launcher.name, slot.bucket)) == config_key(slot.config):
            continue  # nothing to choose, or another plan tuned this (kernel, bucket) already
        best = None
        for c in slot.candidates:
            slot.set(c)

            def once():
                restore()
                call()

            t = do_bench(once, quantiles=[0.5, 0.2, 0.8])[0]
            if best is None or t < best[0]:
                best = (t, c)
        slot.set(best[1])
        with _LOCK:
            _tuned[(slot.launcher.name, slot.bucket)] = config_key(best[1])
    restore()
    path = os.environ.get("UNILORA_TRITON_TUNE_OUT", "").strip()
    if path:
        save_tuned(path)


_LOCK = threading.Lock()


def clear_tuned() -> None:
    """Forget the winners tuned in this process (tests)."""
    with _LOCK:
        _tuned.clear()


def save_tuned(path: str) -> int:
    """Write the winners tuned in this process as config data at ``path`` (merged over the entries
    already there); returns how many entries the file holds. Point ``UNILORA_TRITON_CONFIGS`` at
    it, or copy it to ``triton_kernels/configs/<device>.json``, to use them without tuning."""
    kernels = {k: dict(v) for k, v in _read_table(path).items()} if os.path.exists(path) else {}
    with _LOCK:
        for (name, bucket), entry in sorted(_tuned.items()):
            kernels.setdefault(name, {})[bucket] = entry
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as fh:
        json.dump({"format": CONFIG_FORMAT, "kernels": kernels}, fh, indent=1, sort_keys=True)
        fh.write("\n")
    os.replace(tmp, path)
    return sum(len(v) for v in kernels.values())
