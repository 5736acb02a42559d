"""Triton backend: fused Uni-LoRA kernels that read A and B from theta_d inside the matmul tiles.

Forward picks one of two schedules from M (``schedule_for``):

* ``fused`` (M <= FUSED_MAX_M, decode): one launch of ``fused_fwd_kernel`` per layer;
* ``split`` (larger M): ``shrink_kernel`` (h = drop(x) A^T, split-K) then ``expand_kernel``
  (out += h B^T), as vLLM's punica kernels do for plain LoRA.

Backward computes ``gB = g B`` with the same shrink kernel, then ``bwd_x_kernel`` (grad_x and
dA, x read once) and ``bwd_db_kernel`` (dB = g^T h); both scatter-add their fp32 partials
straight into the single d-length theta_d gradient. In deterministic mode
(``torch.use_deterministic_algorithms(True)`` or ``UNILORA_DETERMINISTIC=1``) no float atomic
is used: splits store partials into a layer-sized buffer and ``csr_reduce_kernel`` sums them in
a fixed order through a cached CSR of P^T, so repeated runs are bit-identical.

Nothing of length D is allocated, and the only d-length tensor is the returned gradient.
Activations may be fp16, bf16 or fp32 (theta_d and every accumulation are fp32); float64 is
refused with a TypeError (use ``backend="reference"`` for gradcheck). On CPU tensors the
kernels run only under the Triton interpreter (``TRITON_INTERPRET=1`` before import).

Environment knobs: ``UNILORA_TRITON_SCHEDULE`` = auto | fused | split (force a forward
schedule), ``UNILORA_TRITON_AUTOTUNE`` = 1 | 0 (autotune on CUDA; default 1),
``UNILORA_DETERMINISTIC`` = 1.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import weakref
from collections import OrderedDict
from typing import NamedTuple, Optional

import torch

from .. import philox
from . import LayerProjection
from .policy import deterministic

try:
    import triton
except ImportError as _exc:  # the registry reports the reason through unavailable_reason()
    triton = None
    _IMPORT_ERROR = f"triton is not installed ({_exc}); pip install triton"
else:
    _IMPORT_ERROR = None
    from ..triton_kernels import index_math, lora_bwd, lora_fwd

MAX_R = 64
FUSED_MAX_M = 16  # decode batches: one fused launch; above this, h per column block costs more than a launch
FUSED_BLOCK_M = 16
GATHER_BLOCK = 1024
_SUPPORTED = (torch.float16, torch.bfloat16, torch.float32)
_TRUE = ("1", "true", "yes", "on")


def _interpreting() -> bool:
    """Whether the kernels were built by the Triton interpreter (decided when they were imported)."""
    if triton is None:
        return False
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(lora_fwd.shrink_kernel, InterpretedFunction)


INTERPRET = _interpreting()


# --------------------------------------------------------------------------------------------
# availability (backend contract)
# --------------------------------------------------------------------------------------------
def unavailable_reason(name: str) -> Optional[str]:
    if _IMPORT_ERROR:
        return _IMPORT_ERROR
    if INTERPRET or torch.cuda.is_available():
        return None
    return "no CUDA GPU is visible (CPU tensors need TRITON_INTERPRET=1 set before unilora_kernels is imported)"


def device_unavailable_reason(name: str, device_type: str) -> Optional[str]:
    if device_type == "cpu":
        if INTERPRET:
            return None
        return ("CPU tensors run only under the Triton interpreter: set TRITON_INTERPRET=1 before importing "
                "unilora_kernels (slow; for tests), or use backend='cpu' or 'reference'")
    if device_type == "cuda":
        if INTERPRET:
            return None
        if not torch.cuda.is_available():
            return "no CUDA GPU is visible"
        major, minor = torch.cuda.get_device_capability()
        if major < 8:
            return f"the Triton kernels need compute capability 8.0 or newer (bf16 tensor cores); this GPU is {major}.{minor}"
        return None
    return f"the Triton backend does not run on {device_type} tensors"


# --------------------------------------------------------------------------------------------
# knobs and heuristics
# --------------------------------------------------------------------------------------------
def schedule_for(M: int) -> str:
    """``fused`` or ``split`` for a forward with M rows (``UNILORA_TRITON_SCHEDULE`` forces one)."""
    forced = os.environ.get("UNILORA_TRITON_SCHEDULE", "auto").strip().lower() or "auto"
    if forced not in ("auto", "fused", "split"):
        raise ValueError(f"UNILORA_TRITON_SCHEDULE={forced!r}: expected auto, fused or split")
    if forced != "auto":
        return forced
    return "fused" if M <= FUSED_MAX_M else "split"


_autotune_override: Optional[bool] = None


def _autotune_on(device: torch.device, det: bool) -> bool:
    """Benchmark the config space (CUDA, non-deterministic runs); else the first pruned config."""
    if det:
        return False  # a config chosen by timing could differ between runs, and so would the sums
    if _autotune_override is not None:
        return _autotune_override
    if INTERPRET or device.type != "cuda":
        return False
    return os.environ.get("UNILORA_TRITON_AUTOTUNE", "1").strip().lower() in _TRUE


@contextlib.contextmanager
def autotune(enabled: bool):
    """Force autotuning on or off (tests: the interpreter times each config by one run)."""
    global _autotune_override
    old, _autotune_override = _autotune_override, enabled
    try:
        yield
    finally:
        _autotune_override = old


# Under the interpreter every program is a Python loop over numpy ops, so the GPU tile sizes
# make model-sized layers crawl. "large" (the interpreter default) runs one big tile per kernel
# (Launcher.interpret_config, NC = 1); "gpu" runs the GPU default configs, as the kernel tests do.
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


def _large_tiles() -> bool:
    return INTERPRET and _interpret_tiles == "large" and _recorder is None


_sm_cache: dict = {}


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda" or INTERPRET:
        return 8  # interpreter: few programs keep it fast, yet still split the reductions
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _sm_cache:
        _sm_cache[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _sm_cache[idx]


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _splits(n_other: int, n_reduce: int, n_sm: int) -> int:
    """Split a reduction of ``n_reduce`` tiles so about two waves of programs run."""
    return max(1, min(_cdiv(2 * n_sm, max(1, n_other)), n_reduce))


DET_MAX_SPLITS = 8  # deterministic mode: partial buffers are splits x layer size


def _det_splits(m_tiles: int) -> int:
    return max(1, min(m_tiles, DET_MAX_SPLITS))


def _m_bucket(M: int) -> int:
    return min(1 << max(4, (M - 1).bit_length()), 1 << 14)


def _rp(r: int) -> int:
    return max(16, 1 << (r - 1).bit_length())


def _lowp(x_dtype: torch.dtype, other_dtype: torch.dtype) -> bool:
    """Tensor-core fp16/bf16 dots when activations and outputs share that dtype; else exact fp32.

    The interpreter cannot run bf16 dots, so there bf16 operands are upcast on load.
    """
    if x_dtype != other_dtype or x_dtype == torch.float32:
        return False
    return not (INTERPRET and x_dtype == torch.bfloat16)


# --------------------------------------------------------------------------------------------
# launching (fixed config, autotuned, or recorded for compile_check)
# --------------------------------------------------------------------------------------------
def _do_bench(kernel_call, quantiles):
    if INTERPRET:  # one timed run: only exercises the tuner's reset/restore logic
        t0 = time.perf_counter()
        kernel_call()
        t = (time.perf_counter() - t0) * 1e3
        return [t, t, t]
    return triton.testing.do_bench(kernel_call, warmup=5, rep=20, quantiles=quantiles)


class Launch(NamedTuple):
    """A launch seen by ``record_launches``: its kernel, arguments, constexprs, configs and grid."""

    launcher: "Launcher"
    args: dict
    meta: dict
    configs: list  # every tuning candidate when autotuning, else the one config used
    grid: tuple  # grid of the first config


_recorder: Optional[list] = None  # compile_check and tests collect launches here instead of running them


@contextlib.contextmanager
def record_launches():
    """Collect a ``Launch`` for every kernel launch instead of running it (outputs stay unset)."""
    global _recorder
    old, _recorder = _recorder, []
    try:
        yield _recorder
    finally:
        _recorder = old


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
        if self.interpret_config is not None and _large_tiles():
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
                    reset_to_zero=list(reset) or None, restore_value=list(restore) or None, do_bench=_do_bench,
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
            args = {k: _interpreter_alias(v) for k, v in args.items()}
        # Switching devices costs a few microseconds per launch: only when the tensors are elsewhere.
        switch = device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device()
        ctx = torch.cuda.device(device) if switch else contextlib.nullcontext()
        with ctx:
            if tune and len(configs) > 1:
                self._autotuner(args)[grid](**args, **meta)
                return
            kw = self.pick(meta).all_kwargs()
            self.fn[grid({**meta, **kw})](**args, **meta, **kw)


def _interpreter_alias(t):
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


def _nc(rp: int, lowp: bool) -> int:
    """Rank chunks of the fp32 (FMA) dots that reduce over the rank: RC = RP / NC = 16."""
    return 1 if lowp or _large_tiles() else rp // 16


def _one(block: int, **kw):
    return [(dict(), triton.Config(dict(BLOCK=block), num_warps=4, **kw))]


if triton is not None:
    _KEY_FWD = ["M_BUCKET", "K", "R", "HASHED", "DROPOUT", "LOWP"]
    FUSED = Launcher(lora_fwd.fused_fwd_kernel, lora_fwd.FUSED_CONFIGS, key=_KEY_FWD + ["N"], restore_value=["out_ptr"],
                     interpret_blocks=dict(BLOCK_N=1024, BLOCK_K=1024))
    SHRINK = Launcher(lora_fwd.shrink_kernel, lora_fwd.SHRINK_CONFIGS, key=_KEY_FWD, reset_to_zero=["y_ptr"],
                      interpret_blocks=dict(BLOCK_M=128, BLOCK_K=1024))
    EXPAND = Launcher(lora_fwd.expand_kernel, lora_fwd.EXPAND_CONFIGS, key=["M_BUCKET", "N", "R", "HASHED", "LOWP"],
                      restore_value=["out_ptr"], interpret_blocks=dict(BLOCK_M=128, BLOCK_N=1024))
    BWD_X = Launcher(lora_bwd.bwd_x_kernel, lora_bwd.BWD_X_CONFIGS,
                     key=["M_BUCKET", "K", "R", "HASHED", "DROPOUT", "LOWP", "NEED_X", "NEED_THETA", "ACCUM"],
                     # gt may already hold other layers' or kernels' sums: restore it, never zero it
                     restore_value=["gx_ptr", "gt_ptr"], interpret_blocks=dict(BLOCK_M=128, BLOCK_K=1024))
    BWD_DB = Launcher(lora_bwd.bwd_db_kernel, lora_bwd.BWD_DB_CONFIGS, key=["M_BUCKET", "N", "R", "HASHED", "LOWP"],
                      restore_value=["gt_ptr"], interpret_blocks=dict(BLOCK_M=128, BLOCK_N=1024))
    CSR_REDUCE = Launcher(lora_bwd.csr_reduce_kernel, _one(lora_bwd.CSR_BLOCK))
    GATHER = Launcher(index_math.gather_kernel, _one(GATHER_BLOCK))
    LAUNCHERS = (FUSED, SHRINK, EXPAND, BWD_X, BWD_DB, CSR_REDUCE, GATHER)


# --------------------------------------------------------------------------------------------
# argument checks and shared arguments
# --------------------------------------------------------------------------------------------
def _check_dtype(t: torch.Tensor, what: str) -> None:
    if t.dtype == torch.float64:
        raise TypeError(f"the triton backend computes in fp32 and does not take float64 {what}; "
                        "use backend='reference' for float64 (e.g. gradcheck)")
    if t.dtype not in _SUPPORTED:
        raise TypeError(f"the triton backend takes float16/bfloat16/float32 {what}, got {t.dtype}")


def _check(x2d: torch.Tensor, theta: torch.Tensor, proj: LayerProjection) -> None:
    if _IMPORT_ERROR:
        raise RuntimeError(_IMPORT_ERROR)
    _check_dtype(x2d, "activations")
    if theta.dtype != torch.float32 or theta.dim() != 1:
        if theta.dtype == torch.float64:
            _check_dtype(theta, "theta_d")
        raise TypeError(f"theta_d must be a 1-D float32 tensor, got {theta.dtype} {tuple(theta.shape)}")
    if theta.stride(0) != 1:
        raise ValueError("theta_d must be contiguous")
    if x2d.dim() != 2 or x2d.shape[1] != proj.in_features:
        raise ValueError(f"x must be (M, {proj.in_features}), got {tuple(x2d.shape)}")
    if not 1 <= proj.r <= MAX_R:
        raise ValueError(f"the triton backend supports r from 1 to {MAX_R}, got r = {proj.r}; "
                         "use backend='reference' or 'cuda' for larger ranks")
    d = theta.shape[0]
    if proj.is_hashed:
        D, offset, _key = proj.hashed
        if proj.scales.numel() != 2 or offset < 0 or offset + proj.r * (proj.in_features + proj.out_features) > D:
            raise ValueError(f"inconsistent hashed projection {proj.hashed} with {proj.scales.numel()} scales")
        if D >= 2**31 or d >= 2**31:
            raise ValueError("D and d must be below 2**31")
        tensors = (x2d, theta, proj.scales)
    else:
        for name, idx, shape in (("idx_a", proj.idx_a, (proj.r, proj.in_features)),
                                 ("idx_b", proj.idx_b, (proj.out_features, proj.r))):
            if idx.dtype != torch.int32 or tuple(idx.shape) != shape or not idx.is_contiguous():
                raise ValueError(f"{name} must be a contiguous int32 {shape} tensor, got {idx.dtype} "
                                 f"{tuple(idx.shape)}")
        if proj.scales.numel() != d:
            raise ValueError(f"scales has {proj.scales.numel()} entries but theta_d has d = {d}")
        tensors = (x2d, theta, proj.scales, proj.idx_a, proj.idx_b)
    if proj.scales.dtype != torch.float32 or not proj.scales.is_contiguous():
        raise TypeError("scales must be a contiguous float32 tensor")
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    dev = x2d.device
    if _recorder is None and (dev.type == "cpu" and not INTERPRET or dev.type not in ("cpu", "cuda")):
        raise ValueError(device_unavailable_reason("triton", dev.type) or f"unsupported device {dev}")


def _check_inplace(t: torch.Tensor, shape: tuple, what: str) -> None:
    _check_dtype(t, what)
    if tuple(t.shape) != shape:
        raise ValueError(f"{what} must have shape {shape}, got {tuple(t.shape)}")
    if t.shape[1] > 1 and t.stride(1) != 1:
        raise ValueError(f"{what} is updated in place and must have a unit-stride last dimension")


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    """The tensor itself when its rows are unit-stride (any row stride is fine), else a copy."""
    return t if t.shape[1] <= 1 or t.stride(1) == 1 else t.contiguous()


def _row_stride(t: torch.Tensor) -> int:
    return t.stride(0) if t.shape[0] > 1 else t.shape[1]


def _proj_args(theta: torch.Tensor, proj: LayerProjection) -> dict:
    """theta / scale pointers and the hashed projection's scalars (None when uniform)."""
    args = dict(theta_ptr=theta, scale_ptr=proj.scales, d=theta.shape[0])
    if proj.is_hashed:
        args.update(index_math.hashed_args(proj.hashed, theta.shape[0]))
    else:
        args.update(hD=None, hhalf=None, hmask=None, hk0=None, hk1=None, hk2=None, hk3=None)
    return args


def _bases(proj: LayerProjection) -> tuple:
    """Global positions of A[0, 0] and B[0, 0] in D (hashed), or None (uniform)."""
    if not proj.is_hashed:
        return None, None
    off = proj.hashed[1]
    return off, off + proj.r * proj.in_features


def _drop_args(p: float, seed) -> dict:
    if p <= 0.0:
        return dict(seed=None, threshold=None, drop_scale=None)
    if seed is None:
        raise ValueError("dropout p > 0 needs a seed")
    # p == 1 keeps (almost) nothing with the int32-clamped threshold and scales by 0: exact zeros.
    return dict(seed=int(seed), threshold=min(philox.keep_threshold(p), 2**31 - 1), drop_scale=philox.keep_scale(p))


# --------------------------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------------------------
def forward_(out2d, x2d, theta, proj: LayerProjection, p: float, seed):
    """out2d += drop(x) A^T B^T in place; returns h = drop(x) A^T (M, r) fp32."""
    _check(x2d, theta, proj)
    M, K = x2d.shape
    N, R = proj.out_features, proj.r
    _check_inplace(out2d, (M, N), "out")
    x2d = _unit_last(x2d)
    dev = x2d.device
    if M == 0:
        return torch.empty((0, R), dtype=torch.float32, device=dev)
    RP = _rp(R)
    det = deterministic()
    tune = _autotune_on(dev, det)
    drop = _drop_args(p, seed)
    hb_a, hb_b = _bases(proj)
    pa = _proj_args(theta, proj)
    lowp = _lowp(x2d.dtype, out2d.dtype)
    common = dict(RP=RP, HASHED=proj.is_hashed, LOWP=lowp)

    if schedule_for(M) == "fused":
        h = torch.empty((M, R), dtype=torch.float32, device=dev)
        args = dict(x_ptr=x2d, out_ptr=out2d, h_ptr=h, idx_a_ptr=_idx(proj.idx_a, proj), idx_b_ptr=_idx(proj.idx_b, proj),
                    M=M, K=K, N=N, R=R, stride_xm=_row_stride(x2d), stride_om=_row_stride(out2d),
                    hbase=hb_a, hbase_b=hb_b, M_BUCKET=_m_bucket(M), **pa, **drop)
        FUSED.launch(lambda c: (_cdiv(M, FUSED_BLOCK_M), _cdiv(N, c["BLOCK_N"])), args,
                     dict(common, NC=_nc(RP, lowp), DROPOUT=p > 0, BLOCK_M=FUSED_BLOCK_M), dev, tune)
        return h

    n_sm = _num_sms(dev)

    def shrink_grid(c):
        m_tiles = _cdiv(M, c["BLOCK_M"])
        return (m_tiles, 1 if det else _splits(m_tiles, _cdiv(K, c["BLOCK_K"]), n_sm))

    meta = dict(common, DROPOUT=p > 0)
    first = SHRINK.pick(meta).all_kwargs()
    zero = tune or shrink_grid(first)[1] > 1  # atomics need a zeroed h
    h = (torch.zeros if zero else torch.empty)((M, R), dtype=torch.float32, device=dev)
    SHRINK.launch(shrink_grid, dict(x_ptr=x2d, y_ptr=h, idx_ptr=_idx(proj.idx_a, proj), M=M, K=K, R=R,
                                    stride_xm=_row_stride(x2d), w_stride_r=K, w_stride_c=1, hbase=hb_a,
                                    M_BUCKET=_m_bucket(M), **pa, **drop), meta, dev, tune)
    EXPAND.launch(lambda c: (_cdiv(M, c["BLOCK_M"]), _cdiv(N, c["BLOCK_N"])),
                  dict(h_ptr=h, out_ptr=out2d, idx_ptr=_idx(proj.idx_b, proj), M=M, N=N, R=R,
                       stride_om=_row_stride(out2d), w_stride_r=1, w_stride_c=R, hbase=hb_b,
                       M_BUCKET=_m_bucket(M), **pa), dict(common, NC=_nc(RP, lowp)), dev, tune)
    return h


def _idx(t: torch.Tensor, proj: LayerProjection):
    return None if proj.is_hashed else t


# --------------------------------------------------------------------------------------------
# backward
# --------------------------------------------------------------------------------------------
def backward(g2d, x2d, theta, proj: LayerProjection, p: float, seed, h, grad_x2d, need_x: bool, need_theta: bool):
    """(grad_x, grad_theta): grad_x gets ((g B) A) * mask (in place when given); one d-length grad_theta."""
    _check(x2d, theta, proj)
    M, K = x2d.shape
    N, R = proj.out_features, proj.r
    _check_dtype(g2d, "grad_output")
    if tuple(g2d.shape) != (M, N):
        raise ValueError(f"grad_output must be ({M}, {N}), got {tuple(g2d.shape)}")
    dev = x2d.device
    d = theta.shape[0]
    grad_theta = torch.zeros(d, dtype=torch.float32, device=dev) if need_theta else None
    accum = grad_x2d is not None
    if need_x:
        if accum:
            _check_inplace(grad_x2d, (M, K), "grad_x")
        else:
            grad_x2d = torch.empty((M, K), dtype=x2d.dtype, device=dev)
    if M == 0 or not (need_x or need_theta):
        if need_x and not accum:
            grad_x2d.zero_()
        return (grad_x2d if need_x else None), grad_theta
    if need_theta:
        if h is None or h.dtype != torch.float32 or tuple(h.shape) != (M, R):
            raise ValueError(f"backward needs the fp32 h = drop(x) A^T of shape ({M}, {R}) from forward_, got "
                             f"{None if h is None else (h.dtype, tuple(h.shape))}")
        h = h.contiguous()
    x2d = _unit_last(x2d)
    g2d = _unit_last(g2d)
    RP = _rp(R)
    det = deterministic()
    tune = _autotune_on(dev, det)
    drop = _drop_args(p, seed)
    hb_a, hb_b = _bases(proj)
    pa = _proj_args(theta, proj)
    n_sm = _num_sms(dev)
    n_a, n_layer = R * K, R * (K + N)

    # gB = g B (M, R) fp32: the shrink kernel with W = B^T (positions n * R + r).
    lowp_g = _lowp(g2d.dtype, x2d.dtype)
    meta_g = dict(RP=RP, HASHED=proj.is_hashed, LOWP=lowp_g, DROPOUT=False)

    def gb_grid(c):
        m_tiles = _cdiv(M, c["BLOCK_M"])
        return (m_tiles, 1 if det else _splits(m_tiles, _cdiv(N, c["BLOCK_K"]), n_sm))

    zero = tune or gb_grid(SHRINK.pick(meta_g).all_kwargs())[1] > 1
    gb = (torch.zeros if zero else torch.empty)((M, R), dtype=torch.float32, device=dev)
    SHRINK.launch(gb_grid, dict(x_ptr=g2d, y_ptr=gb, idx_ptr=_idx(proj.idx_b, proj), M=M, K=N, R=R,
                                stride_xm=_row_stride(g2d), w_stride_r=1, w_stride_c=R, hbase=hb_b,
                                M_BUCKET=_m_bucket(M), **pa, seed=None, threshold=None, drop_scale=None),
                  meta_g, dev, tune)

    part = None
    splits_det = None
    if det and need_theta:
        # One split count for both kernels: they fill the two halves of the same partial buffer.
        m_tiles_x = _cdiv(M, BWD_X.pick(dict(RP=RP, LOWP=_lowp(x2d.dtype, g2d.dtype))).kwargs["BLOCK_M"])
        m_tiles_b = _cdiv(M, BWD_DB.pick(dict(RP=RP, LOWP=lowp_g)).kwargs["BLOCK_M"])
        splits_det = _det_splits(min(m_tiles_x, m_tiles_b))
        part = torch.empty((splits_det, n_layer), dtype=torch.float32, device=dev)

    lowp = _lowp(x2d.dtype, g2d.dtype)

    def x_grid(c):
        k_tiles, m_tiles = _cdiv(K, c["BLOCK_K"]), _cdiv(M, c["BLOCK_M"])
        if not need_theta:
            return (k_tiles, m_tiles)  # no reduction over M: one row tile per program
        return (k_tiles, splits_det if det else _splits(k_tiles, m_tiles, n_sm))

    BWD_X.launch(x_grid, dict(gb_ptr=gb, x_ptr=x2d, gx_ptr=grad_x2d if need_x else None, gt_ptr=grad_theta,
                              part_ptr=part, idx_ptr=_idx(proj.idx_a, proj), M=M, K=K, R=R,
                              stride_xm=_row_stride(x2d),
                              stride_gxm=_row_stride(grad_x2d) if need_x else 0, n_layer=n_layer, hbase=hb_a,
                              M_BUCKET=_m_bucket(M), **pa, **drop),
                 dict(RP=RP, NC=_nc(RP, lowp), HASHED=proj.is_hashed, DROPOUT=p > 0, LOWP=lowp, NEED_X=need_x,
                      NEED_THETA=need_theta, ACCUM=accum and need_x, DET=det), dev, tune)
    if not need_theta:
        return grad_x2d, None

    def b_grid(c):
        n_tiles, m_tiles = _cdiv(N, c["BLOCK_N"]), _cdiv(M, c["BLOCK_M"])
        return (n_tiles, splits_det if det else _splits(n_tiles, m_tiles, n_sm))

    pb = {k: v for k, v in pa.items() if k != "theta_ptr"}
    BWD_DB.launch(b_grid, dict(g_ptr=g2d, h_ptr=h, gt_ptr=grad_theta, part_ptr=part, idx_ptr=_idx(proj.idx_b, proj),
                               M=M, N=N, R=R, stride_gm=_row_stride(g2d), n_a=n_a, n_layer=n_layer, hbase=hb_b,
                               M_BUCKET=_m_bucket(M), **pb),
                  dict(RP=RP, HASHED=proj.is_hashed, LOWP=lowp_g, DET=det), dev, tune)
    if det:
        csr = csr_of(theta, proj)
        CSR_REDUCE.launch(lambda c: (_cdiv(csr.U, c["BLOCK"]),),
                          dict(part_ptr=part, gt_ptr=grad_theta, scale_ptr=proj.scales, rows_ptr=csr.rows,
                               rowptr_ptr=csr.rowptr, cols_ptr=csr.cols, U=csr.U, splits=splits_det, n_layer=n_layer,
                               max_len=csr.max_len, d=d, hD=pa["hD"]),
                          dict(HASHED=proj.is_hashed), dev, False)
    return (grad_x2d if need_x else None), grad_theta


# --------------------------------------------------------------------------------------------
# dense A / B, layer indices, the CSR of P^T
# --------------------------------------------------------------------------------------------
def _gather(theta: torch.Tensor, proj: LayerProjection, values: bool, index: bool):
    d = theta.shape[0]
    n_a, n_layer = proj.r * proj.in_features, proj.r * (proj.in_features + proj.out_features)
    dev = theta.device
    vals = torch.empty(n_layer, dtype=torch.float32, device=dev) if values else None
    idx = torch.empty(n_layer, dtype=torch.int32, device=dev) if index else None
    if n_layer:
        hb_a, _ = _bases(proj)
        GATHER.launch(lambda c: (_cdiv(n_layer, c["BLOCK"]),),
                      dict(idx_a_ptr=_idx(proj.idx_a, proj), idx_b_ptr=_idx(proj.idx_b, proj), vals_ptr=vals,
                           index_ptr=idx, n_a=n_a, n_layer=n_layer, hbase=hb_a, **_proj_args(theta, proj)),
                      dict(HASHED=proj.is_hashed, WRITE_VALS=values, WRITE_INDEX=index), dev, False)
    return vals, idx


def lora_matrices(theta: torch.Tensor, proj: LayerProjection):
    """Dense fp32 A (r x in) and B (out x r), gathered by one kernel."""
    if theta.dtype != torch.float32:
        _check_dtype(theta, "theta_d")
        raise TypeError(f"theta_d must be float32, got {theta.dtype}")
    _check(theta.new_empty((0, proj.in_features)), theta, proj)
    vals, _ = _gather(theta, proj, values=True, index=False)
    n_a = proj.r * proj.in_features
    return vals[:n_a].view(proj.r, proj.in_features), vals[n_a:].view(proj.out_features, proj.r)


def layer_index(theta: torch.Tensor, proj: LayerProjection) -> torch.Tensor:
    """int32 theta_d index of every element of A then B (layer-sized), computed on the device."""
    if not proj.is_hashed:
        return torch.cat([proj.idx_a.reshape(-1), proj.idx_b.reshape(-1)])
    return _gather(theta, proj, values=False, index=True)[1]


class CSR(NamedTuple):
    """P^T restricted to one layer: row u lists the layer positions that read theta_d[rows[u]]."""

    rows: torch.Tensor  # int32 (U,), distinct theta_d indices, increasing
    rowptr: torch.Tensor  # int32 (U + 1,)
    cols: torch.Tensor  # int32 (layer size,), positions in increasing order within a row
    U: int
    max_len: int


CSR_CACHE_SIZE = 4096
_csr_cache: "OrderedDict[tuple, tuple]" = OrderedDict()
_csr_lock = threading.Lock()


def _version(t: torch.Tensor) -> int:
    try:
        return t._version
    except RuntimeError:  # inference tensors have no version counter
        return -1


def _build_csr(index: torch.Tensor) -> CSR:
    sorted_j, order = torch.sort(index, stable=True)
    rows, counts = torch.unique_consecutive(sorted_j, return_counts=True)
    rowptr = torch.zeros(rows.numel() + 1, dtype=torch.int32, device=index.device)
    torch.cumsum(counts, 0, out=rowptr[1:])
    return CSR(rows.to(torch.int32), rowptr, order.to(torch.int32), rows.numel(), int(counts.max().item()))


def csr_of(theta: torch.Tensor, proj: LayerProjection) -> CSR:
    """The layer's CSR of P^T, built once per projection and cached (layer-sized, never D-sized).

    Uniform entries are keyed by the index tensors' storage and version and hold weak
    references to them, so a freed or modified table is never served from the cache.
    """
    d = theta.shape[0]
    shape = (proj.r, proj.in_features, proj.out_features, d, str(theta.device))
    if proj.is_hashed:
        key = ("hashed", tuple(proj.hashed)) + shape
        refs = ()
    else:
        key = ("uniform", proj.idx_a.data_ptr(), proj.idx_b.data_ptr(), _version(proj.idx_a),
               _version(proj.idx_b)) + shape
        refs = (weakref.ref(proj.idx_a), weakref.ref(proj.idx_b))
    with _csr_lock:
        hit = _csr_cache.get(key)
        if hit is not None and all(r() is not None for r in hit[0]):
            _csr_cache.move_to_end(key)
            return hit[1]
    csr = _build_csr(layer_index(theta, proj))
    if _recorder is None:
        with _csr_lock:
            _csr_cache[key] = (refs, csr)
            for k in [k for k, (rs, _) in _csr_cache.items() if any(r() is None for r in rs)]:
                del _csr_cache[k]
            while len(_csr_cache) > CSR_CACHE_SIZE:
                _csr_cache.popitem(last=False)
    return csr


def clear_caches() -> None:
    with _csr_lock:
        _csr_cache.clear()
