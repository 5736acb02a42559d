"""Triton backend: fused Uni-LoRA kernels that read A and B from theta_d inside the matmul tiles.

Forward picks one of two schedules from M (``schedule_for``):

* ``fused`` (M <= policy.DECODE_MAX_M, decode): one launch of ``fused_fwd_kernel`` per layer;
* ``split`` (larger M): ``shrink_kernel`` (h = drop(x) A^T, split-K) then ``expand_kernel``
  (out += h B^T), as vLLM's punica kernels do for plain LoRA.

Backward computes ``gB = g B`` with the same shrink kernel, then ``bwd_x_kernel`` (grad_x and
dA, x read once) and ``bwd_db_kernel`` (dB = g^T h); both scatter-add their fp32 partials
straight into the single d-length theta_d gradient. In deterministic mode
(``torch.use_deterministic_algorithms(True)`` or ``UNILORA_DETERMINISTIC=1``) no float atomic
is used: splits store partials into a layer-sized buffer and ``csr_reduce_kernel`` sums them in
a fixed order through a cached CSR of P^T (``triton_csr``), so repeated runs are bit-identical.

Mixed batches (one adapter per sequence: ``mixed_forward_`` / ``mixed_backward``, kernels in
``triton_kernels/mixed.py``) run a fixed launch sequence whose grids depend on the shapes only:
a per-row schedule for short sequences (decode) and a segmented one, tiles of rows of one
sequence on ``tl.dot``, for sequences of 16 rows or more (``mixed_schedule_for``).

The hot path is a plan (``make_plan(spec)``, backends/__init__.py "Plans"): ``TritonPlan`` fixes
the checks, schedule, constexprs and every kernel's config when it is built, so a call computes
grids from M and launches, one package call per launch (``triton_launch.run``). The dropout seed
is a one-element int64 tensor that the kernels load (``seed_ptr``): nothing is read on the host.
The module functions ``forward_`` / ``backward`` check their arguments and run a cached plan.

Nothing of length D is allocated, and the only d-length tensors are the returned gradients.
Activations may be fp16, bf16 or fp32 (theta_d and every accumulation are fp32); float64 is
refused with a TypeError (use ``backend="reference"`` for gradcheck). On CPU tensors the
kernels run only under the Triton interpreter (``TRITON_INTERPRET=1`` before import).
Launching, autotuning and recording launches live in ``triton_launch``.

Environment knobs: ``UNILORA_TRITON_SCHEDULE`` = auto | fused | split (force a forward
schedule), ``UNILORA_TRITON_MIXED_SCHEDULE`` = auto | rows | segments (force a mixed-batch
schedule), ``UNILORA_TRITON_AUTOTUNE=1`` (opt in to timing the configs on CUDA; default off: the
config data or the first config that applies), ``UNILORA_TRITON_CONFIGS`` (a config data file),
``UNILORA_TRITON_TUNE_OUT`` (write tuned winners there), ``UNILORA_DETERMINISTIC``. A plan reads
them when it is built.
"""

from __future__ import annotations

import os
from typing import NamedTuple, Optional

import torch

from .. import philox
from . import LayerProjection, PlanSpec, row_bucket, triton_csr
from .policy import ACTIVATION_DTYPES, DECODE_MAX_M, DECODE_MAX_R, deterministic
from .triton_launch import (IMPORT_ERROR, INTERPRET, Launcher, Slot, autotune_on, bucket_key, configs_for_device,
                            large_tiles, recording, run, single_config, tune_slots)

if IMPORT_ERROR is None:
    from ..triton_kernels import index_math, lora_bwd, lora_fold, lora_fwd, mixed

# fp32 accumulation throughout: float64 activations go to backend="reference".
SUPPORTED_DTYPES = tuple(t for t in ACTIVATION_DTYPES if t != torch.float64)
if DECODE_MAX_R > 64:  # the kernels hold at most four rank chunks of 16 (lora_fwd, lora_bwd)
    raise ImportError(f"the Triton kernels support ranks up to 64; policy.DECODE_MAX_R = {DECODE_MAX_R}")
FUSED_BLOCK_M = 16
GATHER_BLOCK = 1024


# --------------------------------------------------------------------------------------------
# availability (backend contract)
# --------------------------------------------------------------------------------------------
def unavailable_reason(name: str) -> Optional[str]:
    if IMPORT_ERROR:
        return IMPORT_ERROR
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
# schedule and grid heuristics
# --------------------------------------------------------------------------------------------
def schedule_for(M: int) -> str:
    """``fused`` or ``split`` for a forward with M rows (``UNILORA_TRITON_SCHEDULE`` forces one).

    Decode batches take one fused launch; above them, recomputing h per column block costs more
    than a second launch.
    """
    forced = os.environ.get("UNILORA_TRITON_SCHEDULE", "auto").strip().lower() or "auto"
    if forced not in ("auto", "fused", "split"):
        raise ValueError(f"UNILORA_TRITON_SCHEDULE={forced!r}: expected auto, fused or split")
    if forced != "auto":
        return forced
    return "fused" if M <= DECODE_MAX_M else "split"


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
    """Split a reduction of ``n_reduce`` tiles so about two waves of programs run.

    (TritonPlan writes this rule inline, with n_other >= 1: its hot path makes no call for it.)"""
    return max(1, min(_cdiv(2 * n_sm, max(1, n_other)), n_reduce))


DET_MAX_SPLITS = 8  # deterministic mode: partial buffers are splits x layer size


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


def _nc(rp: int, lowp: bool) -> int:
    """Rank chunks of the fp32 (FMA) dots that reduce over the rank: RC = RP / NC = 16."""
    return 1 if lowp or large_tiles() else rp // 16


# --------------------------------------------------------------------------------------------
# the kernels and their autotune spaces
# --------------------------------------------------------------------------------------------
if IMPORT_ERROR is None:
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
    FOLD = Launcher(lora_fold.fold_kernel, lora_fold.FOLD_CONFIGS, key=["N", "K", "R", "HASHED"],
                    interpret_blocks=dict(BLOCK_N=128, BLOCK_K=1024))
    BWD_G = Launcher(lora_fold.bwd_g_kernel, lora_fold.BWD_G_CONFIGS, key=["M_BUCKET", "N", "R", "HASHED", "LOWP"],
                     reset_to_zero=["gb_ptr"], restore_value=["gt_ptr"], interpret_blocks=dict(BLOCK_M=128, BLOCK_N=1024))
    CSR_REDUCE = Launcher(lora_bwd.csr_reduce_kernel, single_config(BLOCK=lora_bwd.CSR_BLOCK))
    GATHER = Launcher(index_math.gather_kernel, single_config(BLOCK=GATHER_BLOCK))
    _KEY_MIXED = ["M_BUCKET", "R", "HASHED", "DROPOUT", "LOWP", "ROWS"]
    MIXED_SHRINK = Launcher(mixed.mixed_shrink_kernel, mixed.MIXED_SHRINK_CONFIGS, key=_KEY_MIXED + ["K"],
                            reset_to_zero=["y_ptr"])
    MIXED_EXPAND = Launcher(mixed.mixed_expand_kernel, mixed.MIXED_EXPAND_CONFIGS, key=_KEY_MIXED + ["N", "ACCUM"],
                            restore_value=["out_ptr"])
    MIXED_DW = Launcher(mixed.mixed_dw_kernel, mixed.MIXED_DW_CONFIGS, key=_KEY_MIXED + ["C"],
                        restore_value=["gt_ptr", "gtab_ptr"])
    MIXED_CSR_REDUCE = Launcher(mixed.mixed_csr_reduce_kernel, single_config(BLOCK=lora_bwd.CSR_BLOCK))
    LAUNCHERS = (FUSED, SHRINK, EXPAND, BWD_X, BWD_DB, FOLD, BWD_G, CSR_REDUCE, GATHER, MIXED_SHRINK, MIXED_EXPAND, MIXED_DW,
                 MIXED_CSR_REDUCE)


# --------------------------------------------------------------------------------------------
# argument checks and shared arguments
# --------------------------------------------------------------------------------------------
def _check_dtype(dtype: torch.dtype, what: str) -> None:
    if dtype == torch.float64:
        raise TypeError(f"the triton backend computes in fp32 and does not take float64 {what}; "
                        "use backend='reference' for float64 (e.g. gradcheck)")
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"the triton backend takes float16/bfloat16/float32 {what}, got {dtype}")


def _check_theta_dtype(dtype: torch.dtype, theta_dtypes: tuple, shape: tuple) -> None:
    if dtype not in theta_dtypes or len(shape) != 1:
        if dtype == torch.float64:
            _check_dtype(dtype, "theta_d")
        names = "/".join(str(t).replace("torch.", "") for t in theta_dtypes)
        raise TypeError(f"theta_d must be a 1-D {names} tensor, got {dtype} {shape}")


def _check_proj(proj: LayerProjection, device: torch.device) -> None:
    """The static checks of a layer's projection (what a plan checks once): rank range, index
    tables, hashed parameters, scales, one device, and a device the kernels run on."""
    if not 1 <= proj.r <= DECODE_MAX_R:
        raise ValueError(f"the triton backend supports r from 1 to {DECODE_MAX_R}, got r = {proj.r}; "
                         "use backend='reference' or 'cuda' for larger ranks")
    if proj.is_hashed:
        D, offset, _key = proj.hash_params
        if proj.scales.numel() != 2 or offset < 0 or offset + proj.r * (proj.in_features + proj.out_features) > D:
            raise ValueError(f"inconsistent hashed projection {proj.hash_params} with {proj.scales.numel()} scales")
        if D >= 2**31:
            raise ValueError("D and d must be below 2**31")
        tensors = (proj.scales,)
    else:
        for name, idx, shape in (("idx_a", proj.idx_a, (proj.r, proj.in_features)),
                                 ("idx_b", proj.idx_b, (proj.out_features, proj.r))):
            if idx.dtype != torch.int32 or tuple(idx.shape) != shape or not idx.is_contiguous():
                raise ValueError(f"{name} must be a contiguous int32 {shape} tensor, got {idx.dtype} "
                                 f"{tuple(idx.shape)}")
        tensors = (proj.scales, proj.idx_a, proj.idx_b)
    if proj.scales.dtype != torch.float32 or not proj.scales.is_contiguous():
        raise TypeError("scales must be a contiguous float32 tensor")
    devices = {device} | {t.device for t in tensors}
    if len(devices) > 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    if not recording() and (device.type == "cpu" and not INTERPRET or device.type not in ("cpu", "cuda")):
        raise ValueError(device_unavailable_reason("triton", device.type) or f"unsupported device {device}")


def _check(x2d: torch.Tensor, theta: torch.Tensor, proj: LayerProjection, theta_dtypes=(torch.float32,)) -> None:
    """Every check of a module-level call (a plan makes the static ones once, ``_check_proj``)."""
    if IMPORT_ERROR:
        raise RuntimeError(IMPORT_ERROR)
    _check_dtype(x2d.dtype, "activations")
    _check_theta_dtype(theta.dtype, theta_dtypes, tuple(theta.shape))
    if theta.stride(0) != 1:
        raise ValueError("theta_d must be contiguous")
    if x2d.dim() != 2 or x2d.shape[1] != proj.in_features:
        raise ValueError(f"x must be (M, {proj.in_features}), got {tuple(x2d.shape)}")
    if theta.device != x2d.device:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, {x2d.device, theta.device}))}")
    d = theta.shape[0]
    if proj.is_hashed and d >= 2**31:
        raise ValueError("D and d must be below 2**31")
    if not proj.is_hashed and proj.scales.numel() != d:
        raise ValueError(f"scales has {proj.scales.numel()} entries but theta_d has d = {d}")
    _check_proj(proj, x2d.device)


def _check_grad_output(g2d: torch.Tensor, M: int, N: int) -> None:
    _check_dtype(g2d.dtype, "grad_output")
    if tuple(g2d.shape) != (M, N):
        raise ValueError(f"grad_output must be ({M}, {N}), got {tuple(g2d.shape)}")


def _check_inplace(t: torch.Tensor, shape: tuple, what: str) -> None:
    _check_dtype(t.dtype, what)
    if tuple(t.shape) != shape:
        raise ValueError(f"{what} must have shape {shape}, got {tuple(t.shape)}")
    if t.shape[1] > 1 and t.stride(1) != 1:
        raise ValueError(f"{what} is updated in place and must have a unit-stride last dimension")


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    """The tensor itself when its rows are unit-stride (any row stride is fine), else a copy."""
    return t if t.shape[1] <= 1 or t.stride(1) == 1 else t.contiguous()


def _row_stride(t: torch.Tensor) -> int:
    return t.stride(0) if t.shape[0] > 1 else t.shape[1]


def _idx(t: torch.Tensor, proj: LayerProjection):
    return None if proj.is_hashed else t


def _proj_args(proj: LayerProjection) -> dict:
    """The scale pointer and the hashed projection's ``perm_*`` scalars (None when uniform);
    a launch adds ``theta_ptr`` and ``d``."""
    args = dict(scale_ptr=proj.scales)
    if proj.is_hashed:
        args.update(index_math.hashed_args(proj.hash_params, 0))
    else:
        args.update(dict.fromkeys(index_math.PERM_SCALARS))
    return args


def _perm_bases(proj: LayerProjection) -> tuple:
    """Global positions in [0, D) of A[0, 0] and B[0, 0] (hashed), or None (uniform)."""
    if not proj.is_hashed:
        return None, None
    off = proj.hash_params[1]
    return off, off + proj.r * proj.in_features


def _drop_consts(p: float) -> dict:
    """The dropout threshold and scale of the kernels (None without dropout)."""
    if p <= 0.0:
        return dict(threshold=None, drop_scale=None)
    # p == 1 keeps (almost) nothing with the int32-clamped threshold and scales by 0: exact zeros.
    return dict(threshold=min(philox.keep_threshold(p), 2**31 - 1), drop_scale=philox.keep_scale(p))


def _seed_arg(seed, device: torch.device) -> torch.Tensor:
    """The seed as the one-element int64 tensor on ``device`` that the kernels load (backends/
    __init__.py, "Seeds"); a Python int (tests) becomes one. Never read on the host."""
    if seed is None:
        raise ValueError("dropout p > 0 needs a seed")
    if not isinstance(seed, torch.Tensor):
        return torch.tensor([int(seed)], dtype=torch.int64, device=device)
    if seed.dtype != torch.int64 or seed.numel() != 1:
        raise ValueError(f"the dropout seed must be a one-element int64 tensor, got {seed.dtype} {tuple(seed.shape)}")
    return seed if seed.device == device else seed.to(device, non_blocking=True)


def _drop_args(p: float, seed, device: torch.device) -> dict:
    """seed_ptr / threshold / drop_scale of one call (all None without dropout)."""
    return dict(seed_ptr=_seed_arg(seed, device) if p > 0.0 else None, **_drop_consts(p))


# --------------------------------------------------------------------------------------------
# plans: forward_ / backward with everything static fixed (backends/__init__.py, "Plans")
# --------------------------------------------------------------------------------------------
if row_bucket(DECODE_MAX_M) != DECODE_MAX_M:  # a plan's schedule is fixed per row bucket
    raise ImportError(f"policy.DECODE_MAX_M = {DECODE_MAX_M} must be a row bucket (a power of two >= 16)")


def _plan_device(device: torch.device) -> torch.device:
    if device.type == "cuda" and device.index is None and not INTERPRET:
        return torch.device("cuda", torch.cuda.current_device())
    return device


GEOMETRY_CACHE_SIZE = 64  # distinct M per plan whose grids are kept


class _Geometry:
    """A plan's grids at one M: forward (``fwd``, and ``sh`` for the split schedule's shrink), the
    backward's gB shrink (``gb``), and per backward combination (``bwd``) the bwd_x grid, the
    deterministic split count and the bwd_db grid."""

    __slots__ = ("fwd", "sh", "gb", "bwd")


class TritonPlan:
    """The launches of one layer call with the projection, dropout, schedule and every kernel's
    config fixed: per call only M, the pointers, the grids (integer arithmetic on M) and the
    allocations of h, gB and grad_theta remain. ``forward_`` and ``backward`` have the semantics
    of the module functions of the same names; the caller guarantees what the contract says
    (x (M, in) with unit-stride rows, ``row_bucket(M) == spec.rows``, out/g of ``other_dtype``,
    g of any strides, h as ``forward_`` returned it).
    """

    def __init__(self, spec: PlanSpec, other_dtype: torch.dtype, schedule: str, tune: bool):
        if IMPORT_ERROR:
            raise RuntimeError(IMPORT_ERROR)
        proj = spec.proj
        _check_dtype(spec.x_dtype, "activations")
        _check_dtype(other_dtype, "outputs")
        _check_theta_dtype(spec.theta_dtype, (torch.float32,), (0,))
        dev = _plan_device(spec.device)
        _check_proj(proj, dev)
        if schedule not in ("fused", "split"):
            raise ValueError(f"schedule must be fused or split, got {schedule!r}")
        K, N, R, rows = proj.in_features, proj.out_features, proj.r, spec.rows
        self.spec, self.proj, self.device = spec, proj, dev
        self.K, self.N, self.R = K, N, R
        self.det = det = spec.deterministic
        self.tune = tune and not det
        self.fused = schedule == "fused"
        self.can_fold = not self.fused  # the large-M schedule's kernels are set up (policy.fold_min_m decides)
        self.dropout = dropout = spec.dropout_p > 0
        self.n_sm = _num_sms(dev)
        self.n_layer = R * (K + N)
        self.switch = dev.type == "cuda" and not INTERPRET and torch.cuda.device_count() > 1
        RP = _rp(R)
        lowp = _lowp(spec.x_dtype, other_dtype)
        NC = _nc(RP, lowp)
        hashed = proj.is_hashed
        idx_a, idx_b = _idx(proj.idx_a, proj), _idx(proj.idx_b, proj)
        base_a, base_b = _perm_bases(proj)
        pa = _proj_args(proj)
        drop = _drop_consts(spec.dropout_p)
        nodrop = _drop_consts(0.0)
        table = configs_for_device(dev)

        def slot(launcher, meta, k, n):
            return Slot(launcher, meta, bucket_key(rows, k, n, RP, spec.x_dtype), self.tune, table)

        # Per kernel: its Slot and its static arguments (forward_ / backward add the per-call ones).
        if self.fused:
            self.fu = slot(FUSED, dict(RP=RP, HASHED=hashed, LOWP=lowp, NC=NC, DROPOUT=dropout,
                                       BLOCK_M=FUSED_BLOCK_M), K, N)
            self.fu_args = dict(idx_a_ptr=idx_a, idx_b_ptr=idx_b, K=K, N=N, R=R, perm_base_a=base_a,
                                perm_base_b=base_b, M_BUCKET=rows, **pa, **drop)
        else:
            self.sh = slot(SHRINK, dict(RP=RP, HASHED=hashed, LOWP=lowp, DROPOUT=dropout), K, 0)
            self.sh_args = dict(idx_ptr=idx_a, K=K, R=R, stride_xk=1, w_stride_r=K, w_stride_c=1, perm_base=base_a,
                                M_BUCKET=rows, **pa, **drop)
            self.ex = slot(EXPAND, dict(RP=RP, HASHED=hashed, LOWP=lowp, NC=NC), 0, N)
            self.ex_args = dict(idx_ptr=idx_b, N=N, R=R, w_stride_r=1, w_stride_c=R, perm_base=base_b,
                                M_BUCKET=rows, **pa)
            # the large-M schedule (fold_linear / fold_backward; policy.fold_min_m decides per call)
            self.fo = slot(FOLD, dict(RP=RP, NC=_nc(RP, False), HASHED=hashed, LOWP=False), K, N)
            self.fo_args = dict(idx_a_ptr=idx_a, idx_b_ptr=idx_b, N=N, K=K, R=R, perm_base_a=base_a,
                                perm_base_b=base_b, **pa)
            self.bg = slot(BWD_G, dict(RP=RP, HASHED=hashed, LOWP=lowp), 0, N)
            self.bg_args = dict(idx_ptr=idx_b, N=N, R=R, perm_base=base_b, M_BUCKET=rows, **pa)
        # gB = g B (M, R) fp32: the shrink kernel with W = B^T (positions n * R + r), no dropout.
        self.gb = slot(SHRINK, dict(RP=RP, HASHED=hashed, LOWP=lowp, DROPOUT=False), N, 0)
        self.gb_args = dict(idx_ptr=idx_b, K=N, R=R, w_stride_r=1, w_stride_c=R, perm_base=base_b,
                            M_BUCKET=rows, **pa, **nodrop)
        # bwd_x per (need_x, need_theta, accumulate into grad_x): its constexprs
        self.bx = {(nx, nt, acc): slot(BWD_X, dict(RP=RP, NC=NC, HASHED=hashed, DROPOUT=dropout, LOWP=lowp,
                                                   NEED_X=nx, NEED_THETA=nt, ACCUM=acc, DET=det), K, 0)
                   for nx, nt, acc in ((True, True, False), (True, True, True), (True, False, False),
                                       (True, False, True), (False, True, False))}
        self.bx_args = dict(idx_ptr=idx_a, K=K, R=R, n_layer=self.n_layer, perm_base=base_a, M_BUCKET=rows,
                            **pa, **drop)
        self.db = slot(BWD_DB, dict(RP=RP, HASHED=hashed, LOWP=lowp, DET=det), 0, N)
        self.db_args = dict(idx_ptr=idx_b, N=N, R=R, n_a=R * K, n_layer=self.n_layer, perm_base=base_b,
                            M_BUCKET=rows, **pa)
        self.csr = slot(CSR_REDUCE, dict(HASHED=hashed), 0, 0) if det else None
        self._csr = self._csr_tag = None
        if det and not hashed and not recording():
            # Build the CSR now (its build reads sizes on the host), not in a backward that may be
            # captured; uniform scales stand in for theta_d: same d and device.
            self._fresh_csr(proj.scales)
        self._untuned = {"fwd"} | set(self.bx) if self.tune else set()
        self._geo: dict = {}  # M -> _Geometry (grids are integer arithmetic on M and the configs)

    # ---------------------------------------------------------------- forward ---------------
    def forward_(self, out2d, x2d, theta, seed):
        """out2d += drop(x) A^T B^T in place; returns h = drop(x) A^T (M, r) fp32."""
        M = x2d.shape[0]
        dev = self.device
        if M == 0:
            return torch.empty((0, self.R), dtype=torch.float32, device=dev)
        if self.dropout:
            if type(seed) is not torch.Tensor or seed.device != dev or seed.dtype != torch.int64:
                seed = _seed_arg(seed, dev)
        else:
            seed = None
        if self.switch and torch.cuda.current_device() != dev.index:
            with torch.cuda.device(dev.index):
                return self.forward_(out2d, x2d, theta, seed)
        if self._untuned and "fwd" in self._untuned and not recording():
            self._tune("fwd", [self.fu] if self.fused else [self.sh, self.ex], lambda: self.forward_(
                out2d, x2d, theta, seed), out2d)
        N = self.N
        d = theta.shape[0]
        so = out2d.stride(0) if M > 1 else N
        geo = self._geo.get(M) or self._geometry(M)
        sx = x2d.stride(0) if M > 1 else self.K
        if self.fused:
            h = theta.new_empty(M, self.R)  # fp32 on dev (theta's, checked by every caller)
            run(self.fu, geo.fwd, {**self.fu_args, "x_ptr": x2d, "out_ptr": out2d, "h_ptr": h, "M": M, "stride_xm": sx,
                                   "stride_om": so, "theta_ptr": theta, "d": d, "seed_ptr": seed})
            return h
        # h = drop(x) A^T by shrink_kernel (zeroed under split-K, whose programs add with fp32 atomics)
        h = theta.new_zeros(M, self.R) if geo.sh[1] > 1 else theta.new_empty(M, self.R)
        run(self.sh, geo.sh, {**self.sh_args, "x_ptr": x2d, "y_ptr": h, "M": M, "stride_xm": sx, "theta_ptr": theta,
                              "d": d, "seed_ptr": seed})
        run(self.ex, geo.fwd, {**self.ex_args, "h_ptr": h, "out_ptr": out2d, "M": M, "stride_om": so,
                               "theta_ptr": theta, "d": d})
        return h

    # ---------------------------------------------------------------- geometry --------------
    def _geometry(self, M: int) -> "_Geometry":
        """The grids of a call with M rows, computed once per M (and again after tuning)."""
        if len(self._geo) >= GEOMETRY_CACHE_SIZE:
            self._geo.clear()
        N, det = self.N, self.det
        geo = _Geometry()
        if self.fused:
            geo.fwd = (_cdiv(M, FUSED_BLOCK_M), _cdiv(N, self.fu.blocks["BLOCK_N"]))
        else:
            geo.sh = self._shrink_grid(self.sh, M, self.K)
            geo.fwd = (_cdiv(M, self.ex.blocks["BLOCK_M"]), _cdiv(N, self.ex.blocks["BLOCK_N"]))
        geo.gb = self._shrink_grid(self.gb, M, N)
        geo.bwd = {}
        self._geo[M] = geo
        return geo

    def _shrink_grid(self, sl, M: int, K: int) -> tuple:
        m_tiles = _cdiv(M, sl.blocks["BLOCK_M"])
        # split-K (_splits); none when det
        splits = 1 if self.det else max(1, min(_cdiv(2 * self.n_sm, m_tiles), _cdiv(K, sl.blocks["BLOCK_K"])))
        return (m_tiles, splits)

    def _backward_grids(self, geo: "_Geometry", M: int, combo: tuple) -> tuple:
        """(bwd_x grid, deterministic split count or None, bwd_db grid) of ``combo`` at M rows."""
        bx, db, n_sm, det = self.bx[combo], self.db, self.n_sm, self.det
        need_theta = combo[1]
        k_tiles, m_tiles = _cdiv(self.K, bx.blocks["BLOCK_K"]), _cdiv(M, bx.blocks["BLOCK_M"])
        splits_det = None
        if det and need_theta:
            # One split count for both kernels: they fill the two halves of the same partial buffer.
            splits_det = max(1, min(m_tiles, _cdiv(M, db.blocks["BLOCK_M"]), DET_MAX_SPLITS))
        if not need_theta:
            grid = (k_tiles, m_tiles)  # no reduction over M: one row tile per program
        else:
            grid = (k_tiles, splits_det if det else max(1, min(_cdiv(2 * n_sm, k_tiles), m_tiles)))  # _splits
        n_tiles = _cdiv(self.N, db.blocks["BLOCK_N"])
        db_grid = (n_tiles, splits_det if det else max(1, min(_cdiv(2 * n_sm, n_tiles), _cdiv(M, db.blocks["BLOCK_M"]))))
        geo.bwd[combo] = out = (grid, splits_det, db_grid)
        return out

    # ---------------------------------------------------------------- backward --------------
    def backward(self, g2d, x2d, theta, seed, h, grad_x2d, need_x: bool, need_theta: bool):
        """(grad_x, grad_theta): grad_x gets ((g B) A) * mask (in place when given); one d-length grad_theta."""
        M = x2d.shape[0]
        K, N, R = self.K, self.N, self.R
        dev = self.device
        d = theta.shape[0]
        # Allocations through theta (fp32 on the plan's device: every caller checks) and x: Tensor.new_*
        # parses fewer arguments than torch.zeros(size, dtype=, device=), which counts on the hot path.
        grad_theta = theta.new_zeros(d) if need_theta else None
        accum = grad_x2d is not None
        if need_x and not accum:
            grad_x2d = x2d.new_empty(M, K)
        if M == 0 or not (need_x or need_theta):
            if need_x and not accum:
                grad_x2d.zero_()
            return (grad_x2d if need_x else None), grad_theta
        if self.dropout:
            if type(seed) is not torch.Tensor or seed.device != dev or seed.dtype != torch.int64:
                seed = _seed_arg(seed, dev)
        else:
            seed = None
        if self.switch and torch.cuda.current_device() != dev.index:
            with torch.cuda.device(dev.index):
                return self.backward(g2d, x2d, theta, seed, h, grad_x2d if accum else None, need_x, need_theta)
        combo = (need_x, need_theta, accum and need_x)
        bx = self.bx[combo]
        if self._untuned and combo in self._untuned and not recording():
            saved = grad_x2d.clone() if accum and need_x else None
            self._tune(combo, [self.gb, bx] + ([self.db] if need_theta else []), lambda: self.backward(
                g2d, x2d, theta, seed, h, grad_x2d if accum else None, need_x, need_theta), grad_x2d, saved)
        det = self.det
        geo = self._geo.get(M) or self._geometry(M)
        grid, splits_det, db_grid = geo.bwd.get(combo) or self._backward_grids(geo, M, combo)

        # gB = g B by shrink_kernel (zeroed under split-K, as in forward_)
        gb = theta.new_zeros(M, R) if geo.gb[1] > 1 else theta.new_empty(M, R)
        sg, sgn = (g2d.stride(0) if M > 1 else N), g2d.stride(1)  # g: any strides (sum()'s is expanded)
        run(self.gb, geo.gb, {**self.gb_args, "x_ptr": g2d, "y_ptr": gb, "M": M, "stride_xm": sg, "stride_xk": sgn,
                              "theta_ptr": theta, "d": d, "seed_ptr": None})
        part = None
        if splits_det is not None:
            part = torch.empty((splits_det, self.n_layer), dtype=torch.float32, device=dev)
        run(bx, grid, {**self.bx_args, "gb_ptr": gb, "x_ptr": x2d, "gx_ptr": grad_x2d if need_x else None,
                       "gt_ptr": grad_theta, "part_ptr": part, "M": M, "stride_xm": x2d.stride(0) if M > 1 else K,
                       "stride_gxm": (grad_x2d.stride(0) if M > 1 else K) if need_x else 0, "theta_ptr": theta, "d": d,
                       "seed_ptr": seed})
        if not need_theta:
            return grad_x2d, None

        run(self.db, db_grid, {**self.db_args, "g_ptr": g2d, "h_ptr": h, "gt_ptr": grad_theta, "part_ptr": part,
                               "M": M, "stride_gm": sg, "stride_gn": sgn, "d": d})
        if det:
            csr = self._csr
            if csr is None or self._csr_tag != self._tag(d):
                csr = self._fresh_csr(theta)
            run(self.csr, (-(-csr.U // self.csr.blocks["BLOCK"]),),
                dict(part_ptr=part, gt_ptr=grad_theta, scale_ptr=self.proj.scales, rows_ptr=csr.rows,
                     rowptr_ptr=csr.rowptr, cols_ptr=csr.cols, U=csr.U, splits=splits_det, n_layer=self.n_layer,
                     max_len=csr.max_len, d=d, perm_D=self.db_args["perm_D"]))
        return (grad_x2d if need_x else None), grad_theta

    # ---------------------------------------------------------------- large M: the fold -----
    def fold_weight(self, weight, weight_t: bool, theta):
        """``W + B A`` in a fresh tensor of W's dtype and strides (the caching allocator hands the
        same block to every layer's fold in turn: one layer's weight of workspace at a time).
        ``weight_t``: W is stored (in, out) (transformers' Conv1D)."""
        wf = torch.empty_like(weight)
        s_n, s_k = (weight.stride(1), weight.stride(0)) if weight_t else weight.stride()  # element (n, k)
        fo = self.fo
        run(fo, (_cdiv(self.N, fo.blocks["BLOCK_N"]), _cdiv(self.K, fo.blocks["BLOCK_K"])),
            {**self.fo_args, "w_ptr": weight, "out_ptr": wf, "stride_wn": s_n, "stride_wk": s_k,
             "theta_ptr": theta, "d": theta.shape[0]})
        return wf

    def fold_backward(self, g2d, x2d, theta, need_theta: bool):
        """theta_d's gradient of the fold schedule (no dropout): ``h = x A^T`` (shrink), ``gB`` and
        ``dB`` in one pass over g (bwd_g_kernel), ``dA`` in one pass over x (bwd_x_kernel, NEED_X off)."""
        M, R, d = x2d.shape[0], self.R, theta.shape[0]
        if not need_theta:
            return None
        grad_theta = theta.new_zeros(d)
        if M == 0:
            return grad_theta
        geo = self._geo.get(M) or self._geometry(M)
        h = theta.new_zeros(M, R) if geo.sh[1] > 1 else theta.new_empty(M, R)
        run(self.sh, geo.sh, {**self.sh_args, "x_ptr": x2d, "y_ptr": h, "M": M, "stride_xm": x2d.stride(0) if M > 1 else
                              self.K, "theta_ptr": theta, "d": d, "seed_ptr": None})
        combo = (False, True, False)
        grid, _, db_grid = geo.bwd.get(combo) or self._backward_grids(geo, M, combo)
        gb = theta.new_zeros(M, R)
        bg = self.bg
        n_tiles = _cdiv(self.N, bg.blocks["BLOCK_N"])
        bg_grid = (n_tiles, max(1, min(_cdiv(2 * self.n_sm, n_tiles), _cdiv(M, bg.blocks["BLOCK_M"]))))  # _splits
        run(bg, bg_grid, {**self.bg_args, "g_ptr": g2d, "h_ptr": h, "gb_ptr": gb, "gt_ptr": grad_theta,
                          "theta_ptr": theta, "M": M, "stride_gm": g2d.stride(0) if M > 1 else self.N,
                          "stride_gn": g2d.stride(1), "d": d})
        run(self.bx[combo], grid, {**self.bx_args, "gb_ptr": gb, "x_ptr": x2d, "gx_ptr": None, "gt_ptr": grad_theta,
                                   "part_ptr": None, "M": M, "stride_xm": x2d.stride(0) if M > 1 else self.K,
                                   "stride_gxm": 0, "theta_ptr": theta, "d": d, "seed_ptr": None})
        return grad_theta

    def _fresh_csr(self, theta) -> triton_csr.CSR:
        """The layer's CSR (``csr_of``), kept with what it was built for: d and the index tables'
        versions (a write to a table invalidates it)."""
        csr = csr_of(theta, self.proj)
        if not recording():
            self._csr, self._csr_tag = csr, self._tag(theta.shape[0])
        return csr

    def _tag(self, d: int) -> tuple:
        return d, triton_csr.version(self.proj.idx_a), triton_csr.version(self.proj.idx_b)

    # ---------------------------------------------------------------- tuning ----------------
    def _tune(self, what, slots, call, buf, saved=None) -> None:
        """Opt-in autotuning (``UNILORA_TRITON_AUTOTUNE=1``) on the first real call: time each
        candidate config of ``slots`` on this call's buffers (``buf`` restored around every
        run), keep the fastest (``triton_launch.tune_slots``)."""
        self._untuned.discard(what)
        if buf is not None and saved is None:
            saved = buf.clone()

        def restore():  # before every candidate's run and after the last: each config has its own grids
            self._geo.clear()
            if saved is not None:
                buf.copy_(saved)

        tune_slots(slots, call, restore)


def make_plan(spec: PlanSpec) -> TritonPlan:
    """The plan of ``spec`` (backends/__init__.py, "Plans"). The forward schedule is fixed by the
    row bucket (``schedule_for``: ``UNILORA_TRITON_SCHEDULE`` is read now), as are autotuning
    (``UNILORA_TRITON_AUTOTUNE``) and the config data (``UNILORA_TRITON_CONFIGS``)."""
    return TritonPlan(spec, spec.x_dtype, schedule_for(spec.rows),
                      autotune_on(_plan_device(spec.device), spec.deterministic))


# The module functions build (and keep) the plan of their call; keyed by the projection's tensors
# (the plan holds them, so their ids stay unique) and everything the plan fixes.
PLAN_CACHE_SIZE = 256
_plans: dict = {}


def _plan_of(x2d: torch.Tensor, theta: torch.Tensor, proj: LayerProjection, p: float, other_dtype) -> TritonPlan:
    dev, M = x2d.device, x2d.shape[0]
    det = deterministic()
    schedule, tune = schedule_for(M), autotune_on(dev, det)
    key = (id(proj.idx_a), id(proj.idx_b), id(proj.scales), proj.r, proj.in_features, proj.out_features,
           proj.hash_params, dev, x2d.dtype, other_dtype, float(p), row_bucket(M), det, schedule, tune,
           large_tiles(), os.environ.get("UNILORA_TRITON_CONFIGS"))
    plan = _plans.get(key)
    if plan is None:
        spec = PlanSpec(proj, dev, x2d.dtype, theta.dtype, float(p), row_bucket(M), det)
        plan = TritonPlan(spec, other_dtype, schedule, tune)
        if len(_plans) >= PLAN_CACHE_SIZE:
            _plans.clear()
        _plans[key] = plan
    return plan


def forward_(out2d, x2d, theta, proj: LayerProjection, p: float, seed):
    """out2d += drop(x) A^T B^T in place; returns h = drop(x) A^T (M, r) fp32."""
    _check(x2d, theta, proj)
    M = x2d.shape[0]
    _check_inplace(out2d, (M, proj.out_features), "out")
    x2d = _unit_last(x2d)
    if M == 0:
        return torch.empty((0, proj.r), dtype=torch.float32, device=x2d.device)
    return _plan_of(x2d, theta, proj, p, out2d.dtype).forward_(out2d, x2d, theta, seed)


def _check_h(h, M: int, R: int, need_theta: bool) -> None:
    if need_theta and M and (h is None or h.dtype != torch.float32 or tuple(h.shape) != (M, R)):
        raise ValueError(f"backward needs the fp32 h = drop(x) A^T of shape ({M}, {R}) from forward_, got "
                         f"{None if h is None else (h.dtype, tuple(h.shape))}")


def backward(g2d, x2d, theta, proj: LayerProjection, p: float, seed, h, grad_x2d, need_x: bool, need_theta: bool):
    """(grad_x, grad_theta): grad_x gets ((g B) A) * mask (in place when given); one d-length grad_theta."""
    _check(x2d, theta, proj)
    M, K = x2d.shape
    _check_grad_output(g2d, M, proj.out_features)
    if need_x and grad_x2d is not None:
        _check_inplace(grad_x2d, (M, K), "grad_x")
    _check_h(h, M, proj.r, need_theta)
    if need_theta:
        h = h.contiguous()  # the plan reads h as forward_ made it (M x r, contiguous)
    x2d = _unit_last(x2d)  # g: any strides
    return _plan_of(x2d, theta, proj, p, g2d.dtype).backward(g2d, x2d, theta, seed, h, grad_x2d, need_x, need_theta)

# --------------------------------------------------------------------------------------------
# dense A / B, layer indices, the CSR of P^T
# --------------------------------------------------------------------------------------------
def _gather(theta: torch.Tensor, proj: LayerProjection, values: bool, index: bool):
    n_a, n_layer = proj.r * proj.in_features, proj.r * (proj.in_features + proj.out_features)
    dev = theta.device
    vals = torch.empty(n_layer, dtype=torch.float32, device=dev) if values else None
    idx = torch.empty(n_layer, dtype=torch.int32, device=dev) if index else None
    if n_layer:
        GATHER.launch(lambda cfg: (_cdiv(n_layer, cfg["BLOCK"]),),
                      dict(idx_a_ptr=_idx(proj.idx_a, proj), idx_b_ptr=_idx(proj.idx_b, proj), vals_ptr=vals,
                           index_ptr=idx, n_a=n_a, n_layer=n_layer, perm_base=_perm_bases(proj)[0],
                           theta_ptr=theta, d=theta.shape[0], **_proj_args(proj)),
                      dict(HASHED=proj.is_hashed, WRITE_VALS=values, WRITE_INDEX=index), dev, False)
    return vals, idx


def lora_matrices(theta: torch.Tensor, proj: LayerProjection):
    """Dense fp32 A (r x in) and B (out x r), gathered by one kernel."""
    if theta.dtype != torch.float32:
        _check_dtype(theta.dtype, "theta_d")
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


def csr_of(theta: torch.Tensor, proj: LayerProjection) -> triton_csr.CSR:
    """The layer's CSR of P^T, built once per projection and cached (``triton_csr``)."""
    return triton_csr.csr_of(theta, proj, layer_index)


def clear_caches() -> None:
    triton_csr.clear_cache()
    _plans.clear()


# --------------------------------------------------------------------------------------------
# mixed batches: one adapter per sequence (backends/__init__.py, "Mixed batches"; triton_kernels/mixed.py)
# --------------------------------------------------------------------------------------------
# theta_d and the adapter table are read into fp32 by the kernels, so low-precision storage is fine.
MIXED_VECTOR_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MIXED_SEGMENT_MIN_ROWS = 16  # one tl.dot tile of rows (its minimum M) per sequence


def mixed_schedule_for(M: int, S: int) -> str:
    """``rows`` or ``segments`` for M rows in S sequences (``UNILORA_TRITON_MIXED_SCHEDULE`` forces one).

    The rule reads the shape only: sequences of at least one tl.dot tile of rows (16) run tiles of
    rows that share an adapter on tensor cores (prefill); shorter ones (decode: one row per
    sequence) run one row per program, where a 16-row tile would be mostly padding. The threshold
    is the dot's minimum tile, not a measured crossover (no GPU timings were taken for it).
    """
    forced = os.environ.get("UNILORA_TRITON_MIXED_SCHEDULE", "auto").strip().lower() or "auto"
    if forced not in ("auto", "rows", "segments"):
        raise ValueError(f"UNILORA_TRITON_MIXED_SCHEDULE={forced!r}: expected auto, rows or segments")
    if forced != "auto":
        return forced
    return "segments" if S and M // S >= MIXED_SEGMENT_MIN_ROWS else "rows"


def _check_mixed(x2d, theta, table, seq_adapter, proj: LayerProjection) -> None:
    _check(x2d, theta, proj, MIXED_VECTOR_DTYPES)
    d = theta.shape[0]
    if table.dim() != 2 or table.shape[1] != d:
        raise ValueError(f"the adapter table must be (capacity, d = {d}), got {tuple(table.shape)}")
    if table.dtype not in MIXED_VECTOR_DTYPES:
        if table.dtype == torch.float64:
            _check_dtype(table.dtype, "adapter tables")
        raise TypeError(f"the adapter table must be float32, bfloat16 or float16, got {table.dtype}")
    if table.numel() and table.stride(1) != 1:
        raise ValueError("the adapter table's rows must be unit-stride")
    if seq_adapter.dtype != torch.int32 or seq_adapter.dim() != 1 or seq_adapter.shape[0] == 0:
        raise ValueError(f"seq_adapter must be a non-empty 1-D int32 tensor, got {seq_adapter.dtype} "
                         f"{tuple(seq_adapter.shape)}")
    M, S = x2d.shape[0], seq_adapter.shape[0]
    if M % S:
        raise ValueError(f"{M} rows do not split into {S} sequences of equal length")
    devices = {t.device for t in (x2d, theta, table, seq_adapter)}
    if len(devices) > 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    # Ids are not read on the host (no sync): ``adapter_batch`` validates them where it builds them,
    # and an id outside [-1, capacity] reads nothing and leaves its rows as base rows (the kernels
    # mask it: memory stays safe).


class _CallSetup(NamedTuple):
    """What every launch of one mixed call shares."""

    RP: int  # rank padded to a power of two >= 16 (the tl.dot minimum)
    det: bool  # deterministic mode: no split-K, no float atomics
    tune: bool  # autotune (else each kernel's first applicable config)
    drop: dict  # seed_ptr / threshold / drop_scale, all None without dropout
    base_a: Optional[int]  # _perm_bases
    base_b: Optional[int]
    proj_args: dict  # theta_ptr, d and _proj_args


def _setup_call(theta: torch.Tensor, proj: LayerProjection, p: float, seed, device: torch.device) -> _CallSetup:
    det = deterministic()
    return _CallSetup(_rp(proj.r), det, autotune_on(device, det), _drop_args(p, seed, device), *_perm_bases(proj),
                      dict(theta_ptr=theta, d=theta.shape[0], **_proj_args(proj)))


class _Mixed(NamedTuple):
    """What every launch of one mixed call shares: the call setup, schedule and adapter arguments."""

    c: _CallSetup
    rows: bool  # the per-row schedule (else segments)
    S: int
    L: int  # rows per sequence
    args: dict  # seq_ptr, table_ptr, stride_tab, L, n_adapters, M_BUCKET


def _mixed_setup(x2d, theta, table, seq_adapter, proj, p, seed) -> _Mixed:
    M, S = x2d.shape[0], seq_adapter.shape[0]
    c = _setup_call(theta, proj, p, seed, x2d.device)
    cap = table.shape[0]
    # With no table rows, theta stands in for the pointer: no id > 0 is live, so it is never read.
    args = dict(seq_ptr=seq_adapter, table_ptr=table if cap else theta, stride_tab=table.stride(0) if cap else 0,
                L=M // S, n_adapters=cap, M_BUCKET=_m_bucket(M))
    return _Mixed(c, mixed_schedule_for(M, S) == "rows", S, M // S, args)


def _mixed_tiles(mx: _Mixed, block_m: int) -> int:
    return mx.S * _cdiv(mx.L, block_m)


def _mixed_shrink(x, mx: _Mixed, proj: LayerProjection, idx, w_strides: tuple, base, lowp: bool, drop: dict):
    """y (M, R) fp32 = drop(x) W_a^T row by row (W = A: h; W = B^T: g B); zeros on base rows."""
    M, K = x.shape
    c = mx.c
    n_sm = _num_sms(x.device)

    def grid(cfg):
        m_tiles = _mixed_tiles(mx, cfg["BLOCK_M"])
        return (m_tiles, 1 if c.det else _splits(m_tiles, _cdiv(K, cfg["BLOCK_K"]), n_sm))

    meta = dict(RP=c.RP, HASHED=proj.is_hashed, LOWP=lowp, DROPOUT=drop["seed_ptr"] is not None, ROWS=mx.rows)
    zero = c.tune or grid(MIXED_SHRINK.pick(meta).all_kwargs())[1] > 1  # split-K adds into y with atomics
    y = (torch.zeros if zero else torch.empty)((M, proj.r), dtype=torch.float32, device=x.device)
    MIXED_SHRINK.launch(grid, dict(x_ptr=x, y_ptr=y, idx_ptr=idx, K=K, R=proj.r, stride_xm=_row_stride(x),
                                   w_stride_r=w_strides[0], w_stride_c=w_strides[1], perm_base=base,
                                   **mx.args, **c.proj_args, **drop), meta, x.device, c.tune)
    return y


def _mixed_expand(y, out, mx: _Mixed, proj: LayerProjection, idx, w_strides: tuple, base, lowp: bool, drop: dict,
                  accum: bool) -> None:
    """out += y W_a on adapter rows (accum), or out = (y W_a) * mask on every row."""
    M, N = out.shape
    c = mx.c
    meta = dict(RP=c.RP, NC=1 if mx.rows else _nc(c.RP, lowp), HASHED=proj.is_hashed, LOWP=lowp,
                DROPOUT=drop["seed_ptr"] is not None, ROWS=mx.rows, ACCUM=accum)
    MIXED_EXPAND.launch(lambda cfg: (_mixed_tiles(mx, cfg["BLOCK_M"]), _cdiv(N, cfg["BLOCK_N"])),
                        dict(y_ptr=y, out_ptr=out, idx_ptr=idx, N=N, R=proj.r, stride_om=_row_stride(out),
                             w_stride_r=w_strides[0], w_stride_c=w_strides[1], perm_base=base,
                             **mx.args, **c.proj_args, **drop), meta, out.device, c.tune)


def _mixed_dw(u, v, gt, gtab, part, mx: _Mixed, proj: LayerProjection, idx, w_strides: tuple, base, part_off: int,
              lowp: bool, drop: dict) -> None:
    """grad[a] += s * (u^T v') per sequence (v' = drop(v) when drop is set) with fp32 atomics; in
    deterministic mode, each adapter's plain dW into its row of ``part`` (at ``part_off``)."""
    M, C = v.shape
    c = mx.c
    meta = dict(RP=c.RP, HASHED=proj.is_hashed, LOWP=lowp, DROPOUT=drop["seed_ptr"] is not None, ROWS=mx.rows,
                DET=c.det, BY_ID=_by_id(mx))
    # The row splits per sequence are a kernel argument, so they come from the default config and
    # every tuning candidate runs them (any split count is correct).
    cfg = MIXED_DW.pick(meta).all_kwargs()
    splits = 1 if c.det else _splits(mx.S * _cdiv(C, cfg["BLOCK_C"]), _cdiv(mx.L, cfg["BLOCK_M"]), _num_sms(v.device))
    args = {k: v2 for k, v2 in mx.args.items() if k not in ("table_ptr", "stride_tab")}
    pa = {k: v2 for k, v2 in c.proj_args.items() if k != "theta_ptr"}
    cap = gtab.shape[0]
    MIXED_DW.launch(lambda kw: (mx.S * splits, _cdiv(C, kw["BLOCK_C"])),
                    dict(u_ptr=u, v_ptr=v, gt_ptr=gt, gtab_ptr=gtab if cap else gt, part_ptr=part, idx_ptr=idx, C=C,
                         R=proj.r, S=mx.S, splits=splits, stride_vm=_row_stride(v),
                         stride_gtab=gtab.stride(0) if cap else 0, w_stride_r=w_strides[0], w_stride_c=w_strides[1],
                         n_layer=proj.r * (proj.in_features + proj.out_features), part_off=part_off, perm_base=base,
                         **args, **pa, **drop),
                    meta, v.device, c.tune)


def _by_id(mx: _Mixed) -> bool:
    """Deterministic partials: one row per adapter id when the table is small, else per sequence."""
    return mx.args["n_adapters"] + 1 <= mx.S


def _mixed_det_reduce(part, gt, gtab, theta, mx: _Mixed, proj: LayerProjection) -> None:
    """grad[a][j] = s_j * sum of adapter a's partials over the layer positions of j, in a fixed order."""
    csr = csr_of(theta, proj)
    cap = gtab.shape[0]
    MIXED_CSR_REDUCE.launch(
        lambda cfg: (mx.S, _cdiv(csr.U, cfg["BLOCK"])),
        dict(part_ptr=part, gt_ptr=gt, gtab_ptr=gtab if cap else gt, seq_ptr=mx.args["seq_ptr"],
             scale_ptr=proj.scales, rows_ptr=csr.rows, rowptr_ptr=csr.rowptr, cols_ptr=csr.cols, U=csr.U,
             n_adapters=cap, n_layer=proj.r * (proj.in_features + proj.out_features),
             stride_gtab=gtab.stride(0) if cap else 0, max_len=csr.max_len, d=theta.shape[0],
             perm_D=mx.c.proj_args["perm_D"]),
        dict(HASHED=proj.is_hashed, BY_ID=_by_id(mx)), theta.device, False)


def mixed_forward_(out2d, x2d, theta, table, seq_adapter, proj: LayerProjection, p: float, seed) -> None:
    """out[m] += drop(x)[m] A_a^T B_a^T with a the adapter of row m's sequence; base rows untouched.

    Two launches per call whatever the ids are (a shrink into fp32 h, an expand into out); their
    grids depend on the shapes only, so the call can be captured in a CUDA graph.
    """
    _check_mixed(x2d, theta, table, seq_adapter, proj)
    M, K = x2d.shape
    N = proj.out_features
    _check_inplace(out2d, (M, N), "out")
    if M == 0:
        return
    x2d = _unit_last(x2d)
    mx = _mixed_setup(x2d, theta, table, seq_adapter, proj, p, seed)
    c = mx.c
    lowp = _lowp(x2d.dtype, out2d.dtype)
    h = _mixed_shrink(x2d, mx, proj, _idx(proj.idx_a, proj), (K, 1), c.base_a, lowp, c.drop)
    _mixed_expand(h, out2d, mx, proj, _idx(proj.idx_b, proj), (1, proj.r), c.base_b, lowp,
                  _drop_args(0.0, None, x2d.device), accum=True)


def mixed_backward(g2d, x2d, theta, table, seq_adapter, proj: LayerProjection, p: float, seed, need_x: bool,
                   need_theta: bool):
    """(grad_x, grad_theta, grad_table) of the update alone; None for what was not asked.

    grad_x (x's dtype) = ((g B_a) A_a) * mask, zero on base rows; dA_a and dB_a of every sequence
    are scatter-added with fp32 atomics into fp32 buffers (theta's for id 0, the table's row id - 1
    otherwise), cast to theta's and the table's dtypes at the end. Deterministic mode uses no float
    atomic: per-adapter partials in sequence order, then a fixed-order sum through the CSR of P^T.
    """
    _check_mixed(x2d, theta, table, seq_adapter, proj)
    M, K = x2d.shape
    N, R = proj.out_features, proj.r
    _check_grad_output(g2d, M, N)
    dev = x2d.device
    d = theta.shape[0]
    grad_x = torch.empty((M, K), dtype=x2d.dtype, device=dev) if need_x else None
    gt = gtab = None
    if need_theta:
        gt = torch.zeros(d, dtype=torch.float32, device=dev)
        gtab = torch.zeros(tuple(table.shape), dtype=torch.float32, device=dev)
    if M and (need_x or need_theta):
        x2d = _unit_last(x2d)
        g2d = _unit_last(g2d)
        mx = _mixed_setup(x2d, theta, table, seq_adapter, proj, p, seed)
        c = mx.c
        lowp = _lowp(x2d.dtype, g2d.dtype)
        nodrop = _drop_args(0.0, None, dev)
        idx_a, idx_b = _idx(proj.idx_a, proj), _idx(proj.idx_b, proj)
        # gB = g B_a (M, R) fp32: the shrink with W = B^T (positions n * R + i).
        gb = _mixed_shrink(g2d, mx, proj, idx_b, (1, R), c.base_b, lowp, nodrop)
        if need_x:
            _mixed_expand(gb, grad_x, mx, proj, idx_a, (K, 1), c.base_a, lowp, c.drop, accum=False)
        if need_theta:
            h = _mixed_shrink(x2d, mx, proj, idx_a, (K, 1), c.base_a, lowp, c.drop)
            part = None
            if c.det:  # partial dA | dB per adapter (or per sequence), summed through the CSR afterwards
                rows = table.shape[0] + 1 if _by_id(mx) else mx.S
                part = torch.empty((rows, R * (K + N)), dtype=torch.float32, device=dev)
            _mixed_dw(gb, x2d, gt, gtab, part, mx, proj, idx_a, (K, 1), c.base_a, 0, lowp, c.drop)  # dA = gB^T drop(x)
            _mixed_dw(h, g2d, gt, gtab, part, mx, proj, idx_b, (1, R), c.base_b, R * K, lowp, nodrop)  # dB = g^T h
            if c.det:
                _mixed_det_reduce(part, gt, gtab, theta, mx, proj)
    grad_theta = grad_table = None
    if need_theta:
        grad_theta = gt if theta.dtype == torch.float32 else gt.to(theta.dtype)
        grad_table = gtab if table.dtype == torch.float32 else gtab.to(table.dtype)
    return grad_x, grad_theta, grad_table
