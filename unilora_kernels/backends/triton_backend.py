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

Nothing of length D is allocated, and the only d-length tensors are the returned gradients.
Activations may be fp16, bf16 or fp32 (theta_d and every accumulation are fp32); float64 is
refused with a TypeError (use ``backend="reference"`` for gradcheck). On CPU tensors the
kernels run only under the Triton interpreter (``TRITON_INTERPRET=1`` before import).
Launching, autotuning and recording launches live in ``triton_launch``.

Environment knobs: ``UNILORA_TRITON_SCHEDULE`` = auto | fused | split (force a forward
schedule), ``UNILORA_TRITON_MIXED_SCHEDULE`` = auto | rows | segments (force a mixed-batch
schedule), ``UNILORA_TRITON_AUTOTUNE`` (autotune on CUDA; default on), ``UNILORA_DETERMINISTIC``.
"""

from __future__ import annotations

import os
from typing import NamedTuple, Optional

import torch

from .. import philox
from . import LayerProjection, triton_csr
from .policy import ACTIVATION_DTYPES, DECODE_MAX_M, DECODE_MAX_R, deterministic
from .triton_launch import IMPORT_ERROR, INTERPRET, Launcher, autotune_on, large_tiles, recording, single_config

if IMPORT_ERROR is None:
    from ..triton_kernels import index_math, lora_bwd, lora_fwd, mixed

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
    LAUNCHERS = (FUSED, SHRINK, EXPAND, BWD_X, BWD_DB, CSR_REDUCE, GATHER, MIXED_SHRINK, MIXED_EXPAND, MIXED_DW,
                 MIXED_CSR_REDUCE)


# --------------------------------------------------------------------------------------------
# argument checks and shared arguments
# --------------------------------------------------------------------------------------------
def _check_dtype(t: torch.Tensor, what: str) -> None:
    if t.dtype == torch.float64:
        raise TypeError(f"the triton backend computes in fp32 and does not take float64 {what}; "
                        "use backend='reference' for float64 (e.g. gradcheck)")
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"the triton backend takes float16/bfloat16/float32 {what}, got {t.dtype}")


def _check(x2d: torch.Tensor, theta: torch.Tensor, proj: LayerProjection, theta_dtypes=(torch.float32,)) -> None:
    if IMPORT_ERROR:
        raise RuntimeError(IMPORT_ERROR)
    _check_dtype(x2d, "activations")
    if theta.dtype not in theta_dtypes or theta.dim() != 1:
        if theta.dtype == torch.float64:
            _check_dtype(theta, "theta_d")
        names = "/".join(str(t).replace("torch.", "") for t in theta_dtypes)
        raise TypeError(f"theta_d must be a 1-D {names} tensor, got {theta.dtype} {tuple(theta.shape)}")
    if theta.stride(0) != 1:
        raise ValueError("theta_d must be contiguous")
    if x2d.dim() != 2 or x2d.shape[1] != proj.in_features:
        raise ValueError(f"x must be (M, {proj.in_features}), got {tuple(x2d.shape)}")
    if not 1 <= proj.r <= DECODE_MAX_R:
        raise ValueError(f"the triton backend supports r from 1 to {DECODE_MAX_R}, got r = {proj.r}; "
                         "use backend='reference' or 'cuda' for larger ranks")
    d = theta.shape[0]
    if proj.is_hashed:
        D, offset, _key = proj.hash_params
        if proj.scales.numel() != 2 or offset < 0 or offset + proj.r * (proj.in_features + proj.out_features) > D:
            raise ValueError(f"inconsistent hashed projection {proj.hash_params} with {proj.scales.numel()} scales")
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
    if not recording() and (dev.type == "cpu" and not INTERPRET or dev.type not in ("cpu", "cuda")):
        raise ValueError(device_unavailable_reason("triton", dev.type) or f"unsupported device {dev}")


def _check_grad_output(g2d: torch.Tensor, M: int, N: int) -> None:
    _check_dtype(g2d, "grad_output")
    if tuple(g2d.shape) != (M, N):
        raise ValueError(f"grad_output must be ({M}, {N}), got {tuple(g2d.shape)}")


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


def _idx(t: torch.Tensor, proj: LayerProjection):
    return None if proj.is_hashed else t


def _proj_args(theta: torch.Tensor, proj: LayerProjection) -> dict:
    """theta / scale pointers and the hashed projection's ``perm_*`` scalars (None when uniform)."""
    args = dict(theta_ptr=theta, scale_ptr=proj.scales, d=theta.shape[0])
    if proj.is_hashed:
        args.update(index_math.hashed_args(proj.hash_params, theta.shape[0]))
    else:
        args.update(dict.fromkeys(index_math.PERM_SCALARS))
    return args


def _perm_bases(proj: LayerProjection) -> tuple:
    """Global positions in [0, D) of A[0, 0] and B[0, 0] (hashed), or None (uniform)."""
    if not proj.is_hashed:
        return None, None
    off = proj.hash_params[1]
    return off, off + proj.r * proj.in_features


def _drop_args(p: float, seed) -> dict:
    if p <= 0.0:
        return dict(seed=None, threshold=None, drop_scale=None)
    if seed is None:
        raise ValueError("dropout p > 0 needs a seed")
    # p == 1 keeps (almost) nothing with the int32-clamped threshold and scales by 0: exact zeros.
    return dict(seed=int(seed), threshold=min(philox.keep_threshold(p), 2**31 - 1), drop_scale=philox.keep_scale(p))


class _CallSetup(NamedTuple):
    """What every launch of one forward_ or backward call shares."""

    RP: int  # rank padded to a power of two >= 16 (the tl.dot minimum)
    det: bool  # deterministic mode: no split-K, no float atomics
    tune: bool  # autotune (else each kernel's first applicable config)
    drop: dict  # seed / threshold / drop_scale, all None without dropout
    base_a: Optional[int]  # _perm_bases
    base_b: Optional[int]
    proj_args: dict  # _proj_args


def _setup_call(theta: torch.Tensor, proj: LayerProjection, p: float, seed, device: torch.device) -> _CallSetup:
    det = deterministic()
    return _CallSetup(_rp(proj.r), det, autotune_on(device, det), _drop_args(p, seed), *_perm_bases(proj),
                 _proj_args(theta, proj))


def _shrink(x: torch.Tensor, proj: LayerProjection, idx, w_strides: tuple, base, lowp: bool, drop: dict,
            c: _CallSetup) -> torch.Tensor:
    """y = drop(x) W^T (M x r, fp32) by ``shrink_kernel``, W (r x K) gathered at layer positions
    ``i * w_strides[0] + k * w_strides[1]``: h = drop(x) A^T in forward, g B (W = B^T) in backward."""
    M, K = x.shape
    dev = x.device
    n_sm = _num_sms(dev)

    def grid(cfg):
        m_tiles = _cdiv(M, cfg["BLOCK_M"])
        return (m_tiles, 1 if c.det else _splits(m_tiles, _cdiv(K, cfg["BLOCK_K"]), n_sm))

    meta = dict(RP=c.RP, HASHED=proj.is_hashed, LOWP=lowp, DROPOUT=drop["seed"] is not None)
    zero = c.tune or grid(SHRINK.pick(meta).all_kwargs())[1] > 1  # split-K adds into y with atomics
    y = (torch.zeros if zero else torch.empty)((M, proj.r), dtype=torch.float32, device=dev)
    SHRINK.launch(grid, dict(x_ptr=x, y_ptr=y, idx_ptr=idx, M=M, K=K, R=proj.r, stride_xm=_row_stride(x),
                             w_stride_r=w_strides[0], w_stride_c=w_strides[1], perm_base=base, M_BUCKET=_m_bucket(M),
                             **c.proj_args, **drop), meta, dev, c.tune)
    return y


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
    c = _setup_call(theta, proj, p, seed, dev)
    lowp = _lowp(x2d.dtype, out2d.dtype)
    common = dict(RP=c.RP, HASHED=proj.is_hashed, LOWP=lowp)

    if schedule_for(M) == "fused":
        h = torch.empty((M, R), dtype=torch.float32, device=dev)
        args = dict(x_ptr=x2d, out_ptr=out2d, h_ptr=h, idx_a_ptr=_idx(proj.idx_a, proj), idx_b_ptr=_idx(proj.idx_b, proj),
                    M=M, K=K, N=N, R=R, stride_xm=_row_stride(x2d), stride_om=_row_stride(out2d),
                    perm_base_a=c.base_a, perm_base_b=c.base_b, M_BUCKET=_m_bucket(M), **c.proj_args, **c.drop)
        FUSED.launch(lambda cfg: (_cdiv(M, FUSED_BLOCK_M), _cdiv(N, cfg["BLOCK_N"])), args,
                     dict(common, NC=_nc(c.RP, lowp), DROPOUT=p > 0, BLOCK_M=FUSED_BLOCK_M), dev, c.tune)
        return h

    h = _shrink(x2d, proj, _idx(proj.idx_a, proj), (K, 1), c.base_a, lowp, c.drop, c)
    EXPAND.launch(lambda cfg: (_cdiv(M, cfg["BLOCK_M"]), _cdiv(N, cfg["BLOCK_N"])),
                  dict(h_ptr=h, out_ptr=out2d, idx_ptr=_idx(proj.idx_b, proj), M=M, N=N, R=R,
                       stride_om=_row_stride(out2d), w_stride_r=1, w_stride_c=R, perm_base=c.base_b,
                       M_BUCKET=_m_bucket(M), **c.proj_args), dict(common, NC=_nc(c.RP, lowp)), dev, c.tune)
    return h


# --------------------------------------------------------------------------------------------
# backward
# --------------------------------------------------------------------------------------------
def backward(g2d, x2d, theta, proj: LayerProjection, p: float, seed, h, grad_x2d, need_x: bool, need_theta: bool):
    """(grad_x, grad_theta): grad_x gets ((g B) A) * mask (in place when given); one d-length grad_theta."""
    _check(x2d, theta, proj)
    M, K = x2d.shape
    N, R = proj.out_features, proj.r
    _check_grad_output(g2d, M, N)
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
    c = _setup_call(theta, proj, p, seed, dev)
    RP, det = c.RP, c.det
    n_sm = _num_sms(dev)
    n_a, n_layer = R * K, R * (K + N)
    lowp = _lowp(x2d.dtype, g2d.dtype)

    # gB = g B (M, R) fp32: the shrink kernel with W = B^T (positions n * R + r), no dropout.
    gb = _shrink(g2d, proj, _idx(proj.idx_b, proj), (1, R), c.base_b, lowp, _drop_args(0.0, None), c)

    part = None
    splits_det = None
    if det and need_theta:
        # One split count for both kernels: they fill the two halves of the same partial buffer.
        m_tiles_x = _cdiv(M, BWD_X.pick(dict(RP=RP, LOWP=lowp)).kwargs["BLOCK_M"])
        m_tiles_b = _cdiv(M, BWD_DB.pick(dict(RP=RP, LOWP=lowp)).kwargs["BLOCK_M"])
        splits_det = _det_splits(min(m_tiles_x, m_tiles_b))
        part = torch.empty((splits_det, n_layer), dtype=torch.float32, device=dev)

    def x_grid(cfg):
        k_tiles, m_tiles = _cdiv(K, cfg["BLOCK_K"]), _cdiv(M, cfg["BLOCK_M"])
        if not need_theta:
            return (k_tiles, m_tiles)  # no reduction over M: one row tile per program
        return (k_tiles, splits_det if det else _splits(k_tiles, m_tiles, n_sm))

    BWD_X.launch(x_grid, dict(gb_ptr=gb, x_ptr=x2d, gx_ptr=grad_x2d if need_x else None, gt_ptr=grad_theta,
                              part_ptr=part, idx_ptr=_idx(proj.idx_a, proj), M=M, K=K, R=R,
                              stride_xm=_row_stride(x2d),
                              stride_gxm=_row_stride(grad_x2d) if need_x else 0, n_layer=n_layer, perm_base=c.base_a,
                              M_BUCKET=_m_bucket(M), **c.proj_args, **c.drop),
                 dict(RP=RP, NC=_nc(RP, lowp), HASHED=proj.is_hashed, DROPOUT=p > 0, LOWP=lowp, NEED_X=need_x,
                      NEED_THETA=need_theta, ACCUM=accum and need_x, DET=det), dev, c.tune)
    if not need_theta:
        return grad_x2d, None

    def b_grid(cfg):
        n_tiles, m_tiles = _cdiv(N, cfg["BLOCK_N"]), _cdiv(M, cfg["BLOCK_M"])
        return (n_tiles, splits_det if det else _splits(n_tiles, m_tiles, n_sm))

    pb = {k: v for k, v in c.proj_args.items() if k != "theta_ptr"}
    BWD_DB.launch(b_grid, dict(g_ptr=g2d, h_ptr=h, gt_ptr=grad_theta, part_ptr=part, idx_ptr=_idx(proj.idx_b, proj),
                               M=M, N=N, R=R, stride_gm=_row_stride(g2d), n_a=n_a, n_layer=n_layer,
                               perm_base=c.base_b, M_BUCKET=_m_bucket(M), **pb),
                  dict(RP=RP, HASHED=proj.is_hashed, LOWP=lowp, DET=det), dev, c.tune)
    if det:
        csr = csr_of(theta, proj)
        CSR_REDUCE.launch(lambda cfg: (_cdiv(csr.U, cfg["BLOCK"]),),
                          dict(part_ptr=part, gt_ptr=grad_theta, scale_ptr=proj.scales, rows_ptr=csr.rows,
                               rowptr_ptr=csr.rowptr, cols_ptr=csr.cols, U=csr.U, splits=splits_det, n_layer=n_layer,
                               max_len=csr.max_len, d=d, perm_D=c.proj_args["perm_D"]),
                          dict(HASHED=proj.is_hashed), dev, False)
    return (grad_x2d if need_x else None), grad_theta


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
                           **_proj_args(theta, proj)),
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


def csr_of(theta: torch.Tensor, proj: LayerProjection) -> triton_csr.CSR:
    """The layer's CSR of P^T, built once per projection and cached (``triton_csr``)."""
    return triton_csr.csr_of(theta, proj, layer_index)


def clear_caches() -> None:
    triton_csr.clear_cache()


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
            _check_dtype(table, "adapter tables")
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
    # Ids are checked where that costs no device sync (CPU); on a GPU an id outside [-1, capacity]
    # reads nothing and leaves its rows as base rows (the kernels mask it: memory stays safe).
    if seq_adapter.device.type == "cpu" and S:
        lo, hi = int(seq_adapter.min()), int(seq_adapter.max())
        if lo < -1 or hi > table.shape[0]:
            raise ValueError(f"seq_adapter ids must lie in [-1, {table.shape[0]}] (the table's capacity), "
                             f"got [{lo}, {hi}]")


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

    meta = dict(RP=c.RP, HASHED=proj.is_hashed, LOWP=lowp, DROPOUT=drop["seed"] is not None, ROWS=mx.rows)
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
                DROPOUT=drop["seed"] is not None, ROWS=mx.rows, ACCUM=accum)
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
    meta = dict(RP=c.RP, HASHED=proj.is_hashed, LOWP=lowp, DROPOUT=drop["seed"] is not None, ROWS=mx.rows,
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
    _mixed_expand(h, out2d, mx, proj, _idx(proj.idx_b, proj), (1, proj.r), c.base_b, lowp, _drop_args(0.0, None),
                  accum=True)


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
        nodrop = _drop_args(0.0, None)
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
