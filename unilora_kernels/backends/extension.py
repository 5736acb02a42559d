"""The compiled backends ``cpu`` and ``cuda``: the ``unilora_C`` ops of ``unilora_kernels._C``.

The C++ library (``csrc/``) registers the ops ``torch.ops.unilora_C.*`` with CPU and (when
built with nvcc) CUDA kernels; this module registers their fake (meta) kernels and autograd
with ``torch.library`` and implements the backend contract of ``backends/__init__.py`` on top.

What runs where:

* ``cpu``: A and B are gathered (scaled) from theta_d in one parallel pass into layer-sized
  buffers; every product is a BLAS call on L2-sized row blocks, one chunk of blocks per thread
  (fp16/bf16 blocks are converted to fp32 first: CPU BLAS has no half-precision GEMM with fp32
  accumulation on every machine); the backward scatter-adds dA and dB into one d-length
  gradient in one pass (serial adds: deterministic).
* ``cuda``, forward: M <= 16 rows and r <= 64 with fp16/bf16/fp32 activations -> one fused
  cooperative kernel (A and B gathered on the fly, warp reductions); otherwise one ``prepare``
  launch gathers A and B in the GEMM dtype (and applies dropout to x) and cuBLAS does the two
  products (h in fp32 straight from cuBLAS; ``addmm_`` into the output). Backward: one ``prepare``
  launch (gather, dropout of x, h in the GEMM dtype, the zeroed theta gradient), cuBLAS for
  grad_x, dA and dB (fp32 outputs), then the theta_d scatter-add kernel (fp32 atomics), or, when
  ``torch.are_deterministic_algorithms_enabled()`` or ``UNILORA_DETERMINISTIC=1``, a sort-based
  segmented scatter in a fixed order.
* mixed batches (``mixed_forward_`` / ``mixed_backward``, one adapter per sequence): on ``cpu``
  each run of rows with one adapter gathers its A and B once into thread-local buffers (SIMD
  loops or BLAS row blocks); decode (one row per sequence) reads the batch's adapters as the
  columns of a (d, S) copy kept per batch (``decode_columns``), so one theta read serves 16
  sequences; a single row otherwise reads them straight through the layer's element map,
  and each adapter's gradient is scattered by one thread (deterministic); on ``cuda`` one block
  per row gathers on the fly (r <= DECODE_MAX_R) and the backward adds theta/table gradients with
  atomics, so deterministic mode is refused there with an error.

Seeds (backends/__init__.py) reach the ops as tensors, never read in Python: a CPU op reads a CPU
seed in C++ (a CUDA seed there is an error); a CUDA op's kernels load it through a device pointer,
so forward and backward stay sync-free and graph-capturable with a seed drawn on the device (a CPU
seed is copied to the device first, without a host sync, and refused during graph capture).
"""

from __future__ import annotations

import weakref
from typing import Optional

import torch

from . import LayerProjection
from .policy import (ACTIVATION_DTYPES, DECODE_MAX_M, DECODE_MAX_R, THETA_DTYPES, compute_dtype, deterministic,
                     fold_min_m, optimizer_steps)

try:  # importing the library registers torch.ops.unilora_C
    from .. import _C
except ImportError as exc:  # not built: the backends report why instead of failing the package
    _C = None
    _IMPORT_ERROR: Optional[str] = str(exc)
else:
    _IMPORT_ERROR = None
    # A library built from older sources lacks ops this Python code calls: refuse it by name.
    _stale = [op for op in ("mixed_forward_", "mixed_backward", "decode_columns")
              if not hasattr(torch.ops.unilora_C, op)]
    if not _stale and str(torch.ops.unilora_C.forward_.default._schema.arguments[9].type) != "Optional[Tensor]":
        _stale = ["forward_ taking a tensor seed"]
    if not _stale and "cpu_small_m" not in _C.build_metadata():
        _stale = ["linear keeping h at decode sizes (build metadata cpu_small_m)"]
    if _stale:
        _C, _IMPORT_ERROR = None, f"built from older sources: no unilora_C::{_stale[0]}"


def build_metadata() -> dict:
    """What the extension was built with ({} when it is not built)."""
    return dict(_C.build_metadata()) if _C is not None else {}


_CPU_SMALL_M = build_metadata().get("cpu_small_m", 0)  # the C++ kSmallM (csrc/decode_limits.h)


def unavailable_reason(name: str) -> Optional[str]:
    if _C is None:
        return (
            f"the compiled extension unilora_kernels._C cannot be used ({_IMPORT_ERROR}): install with "
            "`pip install --no-build-isolation .` (scripts/install.sh)"
        )
    if name == "cuda":
        if not build_metadata().get("cuda"):
            return (
                "the extension was built without CUDA kernels (CppExtension: FORCE_CPU=1, or no nvcc/CUDA torch "
                "at build time); rebuild with CUDA_HOME set"
            )
        if not torch.cuda.is_available():
            return "no CUDA GPU is available"
    return None


def device_unavailable_reason(name: str, device_type: str) -> Optional[str]:
    expected = "cpu" if name == "cpu" else "cuda"
    if device_type != expected:
        return f"the {name!r} backend runs on {expected} tensors only"
    return None


def h_rows(device_type: str, M: int, fold_min_m: int = -1, p: float = 0.0, gemm_in_x_dtype: bool = True) -> int:
    """Rows of the h that ``unilora_C::linear`` returns: on CPU M at decode sizes (up to the build's
    ``cpu_small_m`` rows, where h is a by-product of the forward and saves the backward a pass), else
    0: the backward recomputes h from the x rows it reads for dA anyway. On CUDA M, except 0 where the
    call folds (csrc/cuda_ops.cu ``fold_call``: no dropout, above decode sizes, M >= fold_min_m >= 0,
    GEMMs in x's dtype), whose backward folds too."""
    if device_type != "cpu":
        fold = 0 <= fold_min_m <= M and M > DECODE_MAX_M and p == 0 and gemm_in_x_dtype
        return 0 if fold else M
    return M if M <= _CPU_SMALL_M else 0


def prefer_cuda_kernels(M: int, in_f: int, out_f: int, r: int) -> bool:
    """Whether the ``cuda`` kernels should run a layer of this shape rather than the Triton backend.

    Decode-sized calls (M <= DECODE_MAX_M, r <= DECODE_MAX_R) cost launches, not bandwidth: the
    fused decode kernel is one launch from C++, the Triton path launches from Python. Larger calls
    are bandwidth-bound, and Triton fuses the gather into its tiles where ``cuda`` materialises A
    and B before cuBLAS. The H100 measurements behind this are in docs/PERF.md.
    """
    return 0 < M <= DECODE_MAX_M and r <= DECODE_MAX_R


# --------------------------------------------------------------------------------------------
# fake kernels and autograd of the C++ ops
# --------------------------------------------------------------------------------------------
if _C is not None:

    @torch.library.register_fake("unilora_C::forward_")
    def _forward_fake(out, x, theta, scales, idx_a, idx_b, r, hash_params, p, seed):
        return x.new_empty((x.shape[0], r), dtype=compute_dtype(x.dtype, theta.dtype))

    @torch.library.register_fake("unilora_C::backward")
    def _backward_fake(g, x, theta, scales, idx_a, idx_b, r, hash_params, p, seed, h, grad_x, need_x, need_theta,
                       deterministic):
        gx = x.new_empty(x.shape) if need_x and grad_x is None else x.new_empty(0)
        gt = theta.new_empty(theta.shape) if need_theta else theta.new_empty(0)
        return gx, gt

    @torch.library.register_fake("unilora_C::lora_matrices")
    def _lora_matrices_fake(theta, scales, idx_a, idx_b, r, in_features, out_features, hash_params):
        return theta.new_empty((r, in_features)), theta.new_empty((out_features, r))

    @torch.library.register_fake("unilora_C::scatter_grad")
    def _scatter_grad_fake(grad_a, grad_b, scales, idx_a, idx_b, d, hash_params, dtype, deterministic):
        return grad_a.new_empty((d,), dtype=dtype)

    @torch.library.register_fake("unilora_C::linear")
    def _linear_fake(x, weight, bias, weight_t, theta, scales, idx_a, idx_b, r, hash_params, p, seed, fold_min_m=-1):
        out_f = weight.shape[1] if weight_t else weight.shape[0]
        in_x = x.dtype == torch.float64 or theta.dtype != torch.float64
        rows = h_rows(x.device.type, x.shape[0], fold_min_m, p, in_x)
        return x.new_empty((x.shape[0], out_f)), x.new_empty((rows, r), dtype=compute_dtype(x.dtype, theta.dtype))

    @torch.library.register_fake("unilora_C::linear_autograd")
    def _linear_autograd_fake(x, weight, bias, weight_t, theta, scales, idx_a, idx_b, r, hash_params, p, seed, det,
                              fold_min_m=-1):
        return x.new_empty((x.shape[0], weight.shape[1] if weight_t else weight.shape[0]))

    @torch.library.register_fake("unilora_C::linear_backward")
    def _linear_backward_fake(g, x, weight, weight_t, theta, scales, idx_a, idx_b, r, hash_params, p, seed, h, need_x,
                              need_theta, deterministic, fold_min_m=-1):
        gx = x.new_empty(x.shape) if need_x else x.new_empty(0)
        gt = theta.new_empty(theta.shape) if need_theta else theta.new_empty(0)
        return gx, gt

    @torch.library.register_fake("unilora_C::_fold_linear")
    def _fold_linear_fake(x, weight, bias, weight_t, theta, scales, idx_a, idx_b, r, hash_params):
        out_f = weight.shape[1] if weight_t else weight.shape[0]
        return x.new_empty((x.shape[0], out_f)), x.new_empty((0, r), dtype=compute_dtype(x.dtype, theta.dtype))

    @torch.library.register_fake("unilora_C::_fold_linear_backward")
    def _fold_linear_backward_fake(g, x, weight, weight_t, theta, scales, idx_a, idx_b, r, hash_params, need_x,
                                   need_theta, deterministic):
        return (x.new_empty(x.shape) if need_x else x.new_empty(0),
                theta.new_empty(theta.shape) if need_theta else theta.new_empty(0))

    @torch.library.register_fake("unilora_C::mixed_forward_")
    def _mixed_forward_fake(out, x, theta, table, seq_adapter, scales, idx_a, idx_b, r, hash_params, p, seed):
        return None

    @torch.library.register_fake("unilora_C::mixed_backward")
    def _mixed_backward_fake(g, x, theta, table, seq_adapter, scales, idx_a, idx_b, r, hash_params, p, seed, need_x,
                             need_theta, deterministic):
        gx = x.new_empty(x.shape) if need_x else x.new_empty(0)
        gt = theta.new_empty(theta.shape) if need_theta else theta.new_empty(0)
        gtab = table.new_empty(table.shape) if need_theta else table.new_empty(0)
        return gx, gt, gtab

    @torch.library.register_fake("unilora_C::_hashed_index")
    def _hashed_index_fake(positions, D, d, key):
        return positions.new_empty(positions.shape)

    @torch.library.register_fake("unilora_C::_philox_randint")
    def _philox_fake(offsets, seed):
        return offsets.new_empty(offsets.shape)

    # Gather (lora_matrices) and scatter (scatter_grad) are adjoint: each one's backward is the other.
    def _setup_gather(ctx, inputs, output):
        theta, scales, idx_a, idx_b, r, in_f, out_f, hash_params = inputs
        ctx.save_for_backward(scales, idx_a, idx_b)
        ctx.args = (theta.shape[0], r, in_f, out_f, list(hash_params), theta.dtype, theta.device)

    def _gather_backward(ctx, grad_a, grad_b):
        scales, idx_a, idx_b = ctx.saved_tensors
        d, r, in_f, out_f, hash_params, dtype, device = ctx.args
        # autograd passes None for an output that was not used: the scatter takes zeros there
        grad_a = torch.zeros((r, in_f), dtype=dtype, device=device) if grad_a is None else grad_a.to(dtype)
        grad_b = torch.zeros((out_f, r), dtype=dtype, device=device) if grad_b is None else grad_b.to(dtype)
        grad_theta = torch.ops.unilora_C.scatter_grad(
            grad_a, grad_b, scales, idx_a, idx_b, d, hash_params, dtype, deterministic()
        )
        return grad_theta, None, None, None, None, None, None, None

    torch.library.register_autograd("unilora_C::lora_matrices", _gather_backward, setup_context=_setup_gather)

    def _setup_scatter(ctx, inputs, output):
        grad_a, grad_b, scales, idx_a, idx_b, d, hash_params, dtype, _det = inputs
        ctx.save_for_backward(scales, idx_a, idx_b)
        ctx.args = (grad_a.shape[0], grad_a.shape[1], grad_b.shape[0], list(hash_params), grad_a.dtype)

    def _scatter_backward(ctx, grad_theta):
        scales, idx_a, idx_b = ctx.saved_tensors
        r, in_f, out_f, hash_params, dtype = ctx.args
        ga, gb = torch.ops.unilora_C.lora_matrices(
            grad_theta.to(dtype).contiguous(), scales, idx_a, idx_b, r, in_f, out_f, hash_params
        )
        return ga, gb, None, None, None, None, None, None, None

    torch.library.register_autograd("unilora_C::scatter_grad", _scatter_backward, setup_context=_setup_scatter)


# --------------------------------------------------------------------------------------------
# the backend contract
# --------------------------------------------------------------------------------------------
def _check(x: torch.Tensor, theta: torch.Tensor, proj: LayerProjection, other: torch.Tensor, other_name: str,
           theta_dtypes=THETA_DTYPES):
    """TypeError/ValueError for what Python can see cheaply; the C++ ops check the rest."""
    if x.dtype not in ACTIVATION_DTYPES or other.dtype not in ACTIVATION_DTYPES:
        raise TypeError(f"x and {other_name} must be float16/bfloat16/float32/float64, got {x.dtype} and {other.dtype}")
    if theta.dtype not in theta_dtypes:
        if theta_dtypes == THETA_DTYPES:
            raise TypeError(f"theta_d must be float32 (float64 for gradcheck), got {theta.dtype}")
        raise TypeError(f"theta_d must be float16/bfloat16/float32/float64, got {theta.dtype}")
    if x.dim() != 2 or x.shape[1] != proj.in_features:
        raise ValueError(f"x must be (M, {proj.in_features}), got {tuple(x.shape)}")
    if other.dim() != 2 or other.shape[0] != x.shape[0] or other.shape[1] != proj.out_features:
        raise ValueError(f"{other_name} must be ({x.shape[0]}, {proj.out_features}), got {tuple(other.shape)}")
    if not (x.device == theta.device == other.device == proj.scales.device):
        raise ValueError(
            f"x, {other_name}, theta_d and scales must be on one device, got {x.device}, {other.device}, "
            f"{theta.device}, {proj.scales.device}"
        )


def _seed(p: float, seed, x: torch.Tensor) -> Optional[torch.Tensor]:
    """The ops' seed argument: None without dropout, else the one-element int64 tensor as given
    (never read here: CPU ops read it in C++, CUDA kernels load it on the device); a Python int
    (tests, the backend contract) becomes a CPU tensor."""
    if p == 0:
        return None
    if seed is None:
        raise ValueError("dropout_p > 0 needs a seed")
    if isinstance(seed, int):
        return torch.tensor([seed], dtype=torch.int64)
    if x.device.type == "cpu" and seed.device.type != "cpu":
        raise ValueError(f"the dropout seed of a CPU call must be a CPU tensor (it is read on the host), got one on "
                         f"{seed.device}")
    return seed


def forward_(out: torch.Tensor, x: torch.Tensor, theta: torch.Tensor, proj: LayerProjection, p: float, seed):
    """``out += drop(x) A^T B^T`` in place (out contiguous, any float dtype: a low-precision out gets
    the fp32 product rounded once); returns ``h = drop(x) A^T`` (M x r, fp32; fp64 if x or theta is)."""
    _check(x, theta, proj, out, "out")
    return torch.ops.unilora_C.forward_(
        out, x, theta, proj.scales, proj.idx_a, proj.idx_b, proj.r, list(proj.hash_params), float(p), _seed(p, seed, x)
    )


def backward(g, x, theta, proj: LayerProjection, p: float, seed, h, grad_x, need_x: bool, need_theta: bool):
    """(grad_x, grad_theta): grad_x += ((g B) A) * mask in place when given (else a new tensor in x's
    dtype); grad_theta = P^T [dA | dB] in theta's dtype, the one d-length tensor of the call."""
    _check(x, theta, proj, g, "grad_out")
    new_gx, grad_theta = torch.ops.unilora_C.backward(
        g, x, theta, proj.scales, proj.idx_a, proj.idx_b, proj.r, list(proj.hash_params), float(p), _seed(p, seed, x),
        h, grad_x, bool(need_x), bool(need_theta), deterministic(),
    )
    if need_x and grad_x is None:
        grad_x = new_gx
    return grad_x, (grad_theta if need_theta else None)


def fold_rows(x: torch.Tensor, proj: LayerProjection, p: float) -> int:
    """The ``fold_min_m`` the module functions pass (the ops outside a layer plan: torch.compile,
    ``uk.ops``): CPU's ``policy.fold_min_m``; on CUDA -1, the split schedule (the fake kernels of
    the custom ops above these cannot see a threshold; the eager layer passes its plan's)."""
    if x.device.type != "cpu":
        return -1
    return fold_min_m("cpu", x.device, x.dtype, proj.in_features, proj.out_features, proj.r, p > 0, True,
                      deterministic())


def linear(x, weight, bias, weight_t: bool, theta, proj: LayerProjection, p: float, seed):
    """(out, h) of the frozen base linear plus the update on 2-D x, in one C++ op: nn.Linear
    (``x W^T + b``) or, when ``weight_t``, transformers' Conv1D (``x W + b``). h has
    ``h_rows(device, M)`` rows (above decode sizes the CPU backward recomputes it). Where
    ``fold_rows`` says so (CPU: M >= max(in, out) in fp32/fp64 without dropout), the kernels fold
    B A into W (one GEMM on W + B A) rather than adding (x A^T) B^T to the output: fewer bytes
    moved, the same function up to rounding."""
    return torch.ops.unilora_C.linear(
        x, weight, bias, bool(weight_t), theta, proj.scales, proj.idx_a, proj.idx_b, proj.r, list(proj.hash_params),
        float(p), _seed(p, seed, x), fold_rows(x, proj, p),
    )


def linear_autograd(x, weight, bias, weight_t: bool, theta, proj: LayerProjection, p: float, seed):
    """The output of ``linear`` with its autograd in C++ (``unilora_C::linear_autograd``): what
    ``UniLoRALinear`` runs for eager training on the ``cpu`` backend, one C++ call each way."""
    return torch.ops.unilora_C.linear_autograd(
        x, weight, bias, bool(weight_t), theta, proj.scales, proj.idx_a, proj.idx_b, proj.r, list(proj.hash_params),
        float(p), _seed(p, seed, x), deterministic(), fold_rows(x, proj, p),
    )


def linear_backward(g, x, weight, weight_t: bool, theta, proj: LayerProjection, p: float, seed, h, need_x: bool,
                    need_theta: bool):
    """(grad_x, grad_theta) of ``linear``: grad_x = g W + ((g B) A) * mask; None where not asked for."""
    gx, gt = torch.ops.unilora_C.linear_backward(
        g, x, weight, bool(weight_t), theta, proj.scales, proj.idx_a, proj.idx_b, proj.r, list(proj.hash_params),
        float(p), _seed(p, seed, x), h, bool(need_x), bool(need_theta), deterministic(), fold_rows(x, proj, p),
    )
    return (gx if need_x else None), (gt if need_theta else None)


def lora_matrices(theta: torch.Tensor, proj: LayerProjection, dtype=None):
    """Dense A (r x in) and B (out x r), theta's dtype unless ``dtype`` is given; differentiable in theta."""
    A, B = torch.ops.unilora_C.lora_matrices(
        theta, proj.scales, proj.idx_a, proj.idx_b, proj.r, proj.in_features, proj.out_features, list(proj.hash_params)
    )
    if dtype is not None and dtype != A.dtype:
        A, B = A.to(dtype), B.to(dtype)
    return A, B


# --------------------------------------------------------------------------------------------
# mixed batches (backends/__init__.py, "Mixed batches"): one C++ call per layer and direction
# --------------------------------------------------------------------------------------------
def mixed_forward_(out, x, theta, table, seq_adapter, proj: LayerProjection, p: float, seed) -> None:
    """``out[m] += drop(x)[m] A_a^T B_a^T`` in place, ``a`` the adapter of row m's sequence
    (``seq_adapter``: -1 none, 0 theta, k > 0 ``table[k - 1]``); out has x's dtype. theta and the
    table may be fp16/bf16 as well (read into the compute dtype). Decode on CPU (one row per
    sequence, no dropout, nothing in fp64) reads the batch's adapters as columns (``decode_columns``)."""
    _check(x, theta, proj, out, "out", ACTIVATION_DTYPES)
    if (x.device.type == "cpu" and p == 0 and x.shape[0] == seq_adapter.shape[0] > 0
            and torch.float64 not in (x.dtype, theta.dtype, table.dtype)):
        columns = decode_columns(theta, table, seq_adapter)
        if columns is not None:
            torch.ops.unilora_C.mixed_decode_(out, x, columns, proj.scales, proj.idx_a, proj.idx_b, proj.r,
                                              list(proj.hash_params))
            return
    torch.ops.unilora_C.mixed_forward_(
        out, x, theta, table, seq_adapter, proj.scales, proj.idx_a, proj.idx_b, proj.r, list(proj.hash_params),
        float(p), _seed(p, seed, x),
    )


_columns_cache: dict = {}


DECODE_COLUMN_LANES = 16  # sequences one AVX-512 step of the column kernel serves


def decode_columns(theta, table, seq_adapter) -> Optional[torch.Tensor]:
    """(d, S) fp32: column s is sequence s's adapter (zeros for -1); None when the batch has so few
    runs of one adapter (fewer than S / DECODE_COLUMN_LANES) that gathering once per run costs less.
    Decode reads every layer of every step from it, so it is kept for the one ``seq_adapter`` tensor
    of a batch (``adapter_batch`` hands out one per list of names) while theta and the table keep
    their storage and version (in-place updates bump the version) and no optimizer step ran since
    (``optimizer_steps``: fused steps bump no version); writes through ``.data`` and
    optimizers that are no ``torch.optim.Optimizer`` are not seen. Inference tensors have no version counter: with one among
    them (an adapter table made under ``torch.inference_mode``) the columns are built per call."""
    if theta.is_inference() or table.is_inference() or seq_adapter.is_inference():
        return _build_columns(theta, table, seq_adapter)
    key = (theta.data_ptr(), theta._version, table.data_ptr(), table._version, tuple(table.shape),
           seq_adapter.data_ptr(), seq_adapter._version, optimizer_steps())
    hit = _columns_cache.get("entry")
    if hit is not None and hit[0] == key and hit[1]() is seq_adapter and hit[3]() is table:
        return hit[2]
    with torch.inference_mode(False), torch.no_grad():  # the copy outlives this call: it must not be an inference tensor
        columns = _build_columns(theta, table, seq_adapter)
    # the table by identity too: a batch's stacked table (adapter_table.batch_table) may be freed and
    # another made at its address with the same version
    _columns_cache["entry"] = (key, weakref.ref(seq_adapter), columns, weakref.ref(table))
    return columns


def _build_columns(theta, table, seq_adapter) -> Optional[torch.Tensor]:
    # C++ reads the ids (checks them, counts the runs) and builds the columns: no host read here.
    columns = torch.ops.unilora_C.decode_columns(theta, table, seq_adapter, DECODE_COLUMN_LANES)
    return None if columns.numel() == 0 else columns


def mixed_backward(g, x, theta, table, seq_adapter, proj: LayerProjection, p: float, seed, need_x: bool,
                   need_theta: bool):
    """(grad_x, grad_theta, grad_table) of the update alone, each in its tensor's dtype; None for
    what was not asked. CPU: deterministic. CUDA: fp32 atomics; deterministic mode
    (``policy.deterministic()``) with ``need_theta`` is refused with an error."""
    _check(x, theta, proj, g, "grad_out", ACTIVATION_DTYPES)
    gx, gt, gtab = torch.ops.unilora_C.mixed_backward(
        g, x, theta, table, seq_adapter, proj.scales, proj.idx_a, proj.idx_b, proj.r, list(proj.hash_params),
        float(p), _seed(p, seed, x), bool(need_x), bool(need_theta), deterministic(),
    )
    return (gx if need_x else None), (gt if need_theta else None), (gtab if need_theta else None)
