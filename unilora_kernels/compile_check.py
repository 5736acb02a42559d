"""Compile every Triton kernel ahead of time, without a GPU, and report registers and spills.

    python -m unilora_kernels.compile_check --arch 80 --arch 90

The launches come from the backend itself: ``triton_backend.forward_`` / ``backward`` (which
run the backend's plans) / ``lora_matrices`` run on CPU tensors of real layer sizes (4096 x 4096) inside
``triton_launch.record_launches()``, which records each kernel launch (arguments, constexprs,
and the autotune configs that survive pruning) instead of running it. Each recorded launch is
specialised exactly as Triton's launcher would (``native_specialize_impl``: int == 1 folded,
16-divisibility), compiled with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch,
32))`` for every config and arch, and its PTX is passed to ``ptxas -v`` for registers and
spills; shared memory is Triton's own figure (it is dynamic, ptxas does not see it).

Scenarios cover every dtype (fp16, bf16, fp32) and the constexpr variants: ``heavy`` (r = 64,
hashed projection, dropout, grad_x accumulated: the register-hungriest code), ``light``
(r = 16, uniform, no dropout, fresh grad_x) and ``det`` (deterministic mode: fixed configs,
partial buffers, the CSR reduction); each also records the mixed-batch kernels (many adapters
per batch: decode and prefill shapes, forward and backward) and, but ``det``, the large-M fold
schedule's (``fold_kernel``, ``bwd_g_kernel``). Exit status 1 on any compile or
ptxas failure, or on any spill in a default config (the one the interpreter and deterministic
mode use, and the autotuner's fallback).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from typing import NamedTuple

DTYPES = ("float16", "bfloat16", "float32")
SIZE = 4096  # in = out: real layer sizes, so the 16-divisibility specialisations are the real ones
M_DECODE, M_PREFILL = 1, 1024
M_MIXED_DECODE = 8  # a decode batch of eight sequences, one adapter each


class Job(NamedTuple):
    kernel: str  # Launcher name
    scenario: str
    dtype: str
    config: str
    default: bool
    arch: int
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict


class Result(NamedTuple):
    job: Job
    ok: bool
    regs: int
    spill_stores: int
    spill_loads: int
    smem: int
    seconds: float
    error: str


# --------------------------------------------------------------------------------------------
# recording launches
# --------------------------------------------------------------------------------------------
def _scenarios():
    return [
        # name, r, projection, dropout p, deterministic
        ("heavy", 64, "hashed", 0.1, False),
        ("light", 16, "uniform", 0.0, False),
        ("det", 32, "uniform", 0.1, True),
    ]


def _projection(r: int, kind: str, d: int):
    import torch

    from . import projection as P
    from .backends import LayerProjection

    D = 2 * r * (SIZE + SIZE)  # this layer is the second of two
    offset = D // 2
    if kind == "uniform":
        idx = torch.from_numpy(P.generate_index(D, d, 0))[offset:]
        idx_a = idx[: r * SIZE].view(r, SIZE).clone()
        idx_b = idx[r * SIZE :].view(SIZE, r).clone()
        return LayerProjection(idx_a, idx_b, P.uniform_scales(idx.numpy(), d), r, SIZE, SIZE, ())
    empty = torch.empty(0, dtype=torch.int32)
    return LayerProjection(empty, empty, P.hashed_scales(D, d), r, SIZE, SIZE, (D, offset, P.splitmix64(0)))


def record() -> list:
    """[(launcher, scenario, dtype, args, meta, configs)] for every launch the backend makes."""
    import torch

    from .backends import triton_backend as tb
    from .backends import triton_launch

    d = 65536
    theta = torch.zeros(d)
    launches = []
    env_keys = ("UNILORA_TRITON_SCHEDULE", "UNILORA_DETERMINISTIC", "UNILORA_TRITON_MIXED_SCHEDULE")
    saved = {k: os.environ.get(k) for k in env_keys}
    try:
        with triton_launch.autotune(True):
            for name, r, kind, p, det in _scenarios():
                proj = _projection(r, kind, d)
                os.environ["UNILORA_DETERMINISTIC"] = "1" if det else "0"
                os.environ["UNILORA_TRITON_MIXED_SCHEDULE"] = "auto"
                for dtype_name in DTYPES:
                    dtype = getattr(torch, dtype_name)
                    # the seed as layers pass it: a one-element int64 tensor the kernels load (seed_ptr)
                    seed = torch.tensor([0x1234_5678_9ABC], dtype=torch.int64) if p > 0 else None
                    with triton_launch.record_launches() as rec:
                        for M, schedule in ((M_DECODE, "fused"), (M_PREFILL, "split")):
                            os.environ["UNILORA_TRITON_SCHEDULE"] = schedule
                            x = torch.empty((M, SIZE), dtype=dtype)
                            out = torch.empty((M, SIZE), dtype=dtype)
                            h = tb.forward_(out, x, theta, proj, p, seed)
                        g = torch.empty((M_PREFILL, SIZE), dtype=dtype)
                        grad_x = None if name == "light" else torch.empty((M_PREFILL, SIZE), dtype=dtype)
                        tb.backward(g, x, theta, proj, p, seed, h, grad_x, True, True)
                        if dtype_name == "float32":
                            tb.lora_matrices(theta, proj)
                        _record_mixed(tb, name, theta, proj, p, seed, dtype)
                        if not det:
                            _record_fold(tb, theta, proj, dtype)
                    launches += [(ln.launcher, name, dtype_name, ln.args, ln.meta, ln.configs) for ln in rec]
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return launches


def _record_fold(tb, theta, proj, dtype) -> None:
    """The large-M schedule's launches (no dropout; never in deterministic mode): the fold of
    W + B A (nn.Linear and Conv1D layouts) and the fold backward (h, the one pass over g, dA)."""
    import torch

    from .backends import PlanSpec, row_bucket

    plan = tb.make_plan(PlanSpec(proj, torch.device("cpu"), dtype, theta.dtype, 0.0, row_bucket(M_PREFILL), False))
    weight = torch.empty((SIZE, SIZE), dtype=dtype)
    for weight_t in (False, True):
        plan.fold_weight(weight, weight_t, theta)
    x, g = (torch.empty((M_PREFILL, SIZE), dtype=dtype) for _ in range(2))
    plan.fold_backward(g, x, theta, True)


def _record_mixed(tb, scenario: str, theta, proj, p: float, seed, dtype) -> None:
    """The mixed-batch launches: decode (one row per sequence: the per-row schedule) and prefill
    (long sequences: the segmented schedule), forward and backward; the det scenario reads a bf16 table."""
    import torch

    table = torch.zeros((3, theta.shape[0]), dtype=torch.bfloat16 if scenario == "det" else torch.float32)
    for M, S in ((M_MIXED_DECODE, M_MIXED_DECODE), (M_PREFILL, 4)):
        seq = torch.arange(S, dtype=torch.int32) % 5 - 1  # -1 (base), 0 (theta) and table rows
        x = torch.empty((M, SIZE), dtype=dtype)
        tb.mixed_forward_(torch.empty((M, SIZE), dtype=dtype), x, theta, table, seq, proj, p, seed)
        tb.mixed_backward(torch.empty((M, SIZE), dtype=dtype), x, theta, table, seq, proj, p, seed, True, True)


def _specialise(fn, args: dict, meta: dict, cfg):
    """(signature, constexprs, attrs) exactly as Triton's launcher derives them."""
    from triton.backends.compiler import BaseBackend
    from triton.runtime.jit import native_specialize_impl

    values = {**args, **meta, **cfg.kwargs}
    signature, constexprs, attrs = {}, {}, {}
    for i, kp in enumerate(fn.params):
        if kp.name not in values:
            raise KeyError(f"{fn.__name__}: no value recorded for argument {kp.name!r}")
        v = values[kp.name]
        if kp.is_constexpr:
            signature[kp.name] = "constexpr"
            constexprs[kp.name] = v
            continue
        ty, attr = native_specialize_impl(BaseBackend, v, kp.is_const, not kp.do_not_specialize,
                                          not kp.do_not_specialize_on_alignment)
        signature[kp.name] = ty
        if ty == "constexpr":
            constexprs[kp.name] = attr
        elif attr == "D":
            attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, constexprs, attrs


def _config_str(cfg) -> str:
    kw = " ".join(f"{k.replace('BLOCK_', '')}={v}" for k, v in cfg.kwargs.items())
    return f"{kw} w{cfg.num_warps} s{cfg.num_stages}"


def jobs(archs) -> list:
    seen, out = set(), []
    for lau, scenario, dtype, args, meta, cfgs in record():
        fn = lau.fn
        for i, cfg in enumerate(cfgs):
            sig, cx, attrs = _specialise(fn, args, meta, cfg)
            key = (lau.name, repr(sorted(sig.items())), repr(sorted(cx.items(), key=str)), repr(sorted(attrs)),
                   cfg.num_warps, cfg.num_stages)
            if key in seen:
                continue
            seen.add(key)
            for arch in archs:
                out.append(Job(lau.name, scenario, dtype, _config_str(cfg), i == 0, arch, sig, cx, attrs,
                               dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)))
    return out


# --------------------------------------------------------------------------------------------
# compiling (worker processes)
# --------------------------------------------------------------------------------------------
def _ptxas(arch: int) -> str:
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return get_ptxas(arch).path
    except Exception:  # older/newer Triton layouts: fall back to the CUDA toolkit's
        cuda = os.environ.get("CUDA_HOME", "/usr/local/cuda")
        path = shutil.which("ptxas") or os.path.join(cuda, "bin", "ptxas")
        return path


_PTXAS_RE = re.compile(r"Used (\d+) registers")
_SPILL_RE = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def compile_one(job: Job) -> Result:
    t0 = time.perf_counter()
    try:
        import triton
        from triton.backends.compiler import GPUTarget

        from .backends import triton_backend as tb

        fn = {lau.name: lau.fn for lau in tb.LAUNCHERS}[job.kernel]
        src = triton.compiler.ASTSource(fn, job.signature, job.constexprs, job.attrs)
        kernel = triton.compile(src, target=GPUTarget("cuda", job.arch, 32), options=job.options)
        ptx = kernel.asm["ptx"]
        smem = int(kernel.metadata.shared)
        target = re.search(r"^\.target\s+(\S+)", ptx, re.M).group(1).rstrip(",")
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "k.ptx")
            with open(path, "w") as fh:
                fh.write(ptx)
            proc = subprocess.run([_ptxas(job.arch), "-v", f"--gpu-name={target}", path, "-o",
                                   os.path.join(tmp, "k.cubin")], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"ptxas failed: {proc.stderr.strip()[-500:]}")
        regs = _PTXAS_RE.search(proc.stderr)
        spills = _SPILL_RE.search(proc.stderr)
        if regs is None or spills is None:
            raise RuntimeError(f"unexpected ptxas -v output: {proc.stderr.strip()[-500:]}")
        return Result(job, True, int(regs.group(1)), int(spills.group(1)), int(spills.group(2)), smem,
                      time.perf_counter() - t0, "")
    except Exception as exc:  # reported in the table; the exit status says it failed
        return Result(job, False, 0, 0, 0, 0, time.perf_counter() - t0, f"{type(exc).__name__}: {exc}"[:2000])


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, action="append", help="SM architecture, e.g. 80 or 90 (repeatable)")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="parallel compiler processes")
    ap.add_argument("--kernel", action="append", help="only these kernels (Launcher names)")
    args = ap.parse_args(argv)
    archs = args.arch or [80, 90]
    from .backends import triton_launch

    if triton_launch.INTERPRET:
        print("compile_check: unset TRITON_INTERPRET (the interpreter builds no GPU code)", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    todo = jobs(archs)
    if args.kernel:
        todo = [j for j in todo if j.kernel in args.kernel]
    if args.jobs > 1:
        with cf.ProcessPoolExecutor(args.jobs) as pool:
            results = list(pool.map(compile_one, todo))
    else:
        results = [compile_one(j) for j in todo]

    header = f"{'kernel':<18} {'scenario':<8} {'dtype':<9} {'config':<24} {'arch':>4} {'regs':>4} " \
             f"{'spill st/ld':>11} {'smem':>6}  status"
    print(header)
    print("-" * len(header))
    failed = spilled_default = 0
    for r in sorted(results, key=lambda r: (r.job.kernel, r.job.scenario, r.job.dtype, not r.job.default,
                                            r.job.config, r.job.arch)):
        j = r.job
        cfg = j.config + (" *" if j.default else "")
        if not r.ok:
            failed += 1
            status = "FAILED: " + r.error.splitlines()[0][:200]
        elif r.spill_stores or r.spill_loads:
            spilled_default += j.default
            status = "SPILLS (default config)" if j.default else "spills (tuning candidate)"
        else:
            status = "ok"
        print(f"{j.kernel:<18} {j.scenario:<8} {j.dtype:<9} {cfg:<24} {j.arch:>4} {r.regs:>4} "
              f"{r.spill_stores:>5}/{r.spill_loads:<5} {r.smem:>6}  {status}")
    import triton

    print(f"\n{len(results)} compilations ({len({(r.job.kernel, r.job.config, r.job.dtype, r.job.scenario) for r in results})}"
          f" kernel variants x {len(archs)} archs), triton {triton.__version__}, {time.perf_counter() - t0:.0f} s; "
          f"* = default config")
    for r in results:
        if not r.ok:
            print(f"\nFAILED {r.job.kernel} {r.job.scenario} {r.job.dtype} {r.job.config} sm_{r.job.arch}:\n{r.error}")
    if failed or spilled_default:
        print(f"compile_check: {failed} failed, {spilled_default} default configs spill", file=sys.stderr)
        return 1
    print("compile_check: all kernels compiled; no default config spills")
    return 0


if __name__ == "__main__":
    sys.exit(main())
