"""CMakeLists.txt builds the op library with find_package(Torch); torch.ops.load_library loads it.

Configured and built (CPU kernels, Release) into build/cmake-test of the checkout, kept between
runs so that a rerun recompiles only what changed (the first build takes minutes: marked slow),
then loaded in a fresh interpreter that never imports unilora_kernels._C (one process cannot
register the unilora_C namespace twice) and checked against plain torch.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from unilora_kernels.backends import policy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SMOKE = textwrap.dedent(
    """
    import sys, torch
    torch.ops.load_library(sys.argv[1])
    C = torch.ops.unilora_C
    g = torch.Generator().manual_seed(0)
    M, in_f, out_f, r, d = 37, 29, 23, 3, 41
    theta = torch.randn(d, generator=g)
    scales = torch.rand(d, generator=g)
    idx_a = torch.randint(0, d, (r, in_f), generator=g, dtype=torch.int32)
    idx_b = torch.randint(0, d, (out_f, r), generator=g, dtype=torch.int32)
    A = theta[idx_a.long()] * scales[idx_a.long()]
    B = theta[idx_b.long()] * scales[idx_b.long()]
    x, base, grad = torch.randn(M, in_f, generator=g), torch.randn(M, out_f, generator=g), torch.randn(M, out_f, generator=g)
    for rows in (M, 1):  # the BLAS path and the small-M path
        out = base[:rows].clone()
        h = C.forward_(out, x[:rows], theta, scales, idx_a, idx_b, r, [], 0.0, None)
        torch.testing.assert_close(h, x[:rows] @ A.t())
        torch.testing.assert_close(out, base[:rows] + x[:rows] @ A.t() @ B.t())
    gx, gt = C.backward(grad, x, theta, scales, idx_a, idx_b, r, [], 0.0, None, x @ A.t(), None, True, True, False)
    torch.testing.assert_close(gx, grad @ B @ A)
    dA, dB = (grad @ B).t() @ x, grad.t() @ (x @ A.t())
    ref = torch.zeros(d).index_add_(0, idx_a.reshape(-1).long(), (dA * scales[idx_a.long()]).reshape(-1))
    ref.index_add_(0, idx_b.reshape(-1).long(), (dB * scales[idx_b.long()]).reshape(-1))
    torch.testing.assert_close(gt, ref)
    A2, B2 = C.lora_matrices(theta, scales, idx_a, idx_b, r, in_f, out_f, [])
    assert torch.equal(A2, A) and torch.equal(B2, B)
    print("cmake-smoke-ok")
    """
)


BUILD_DIR = Path(ROOT) / "build" / "cmake-test"


@pytest.mark.slow
def test_cmake_build_and_load():
    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.skip("cmake is not installed")
    build_dir = BUILD_DIR
    generator = "Ninja" if shutil.which("ninja") else "Unix Makefiles"
    cache = build_dir / "CMakeCache.txt"
    if cache.exists() and f"CMAKE_GENERATOR:INTERNAL={generator}" not in cache.read_text():
        shutil.rmtree(build_dir)  # made by another generator: cmake refuses to switch in place
    args = [cmake, "-S", ROOT, "-B", str(build_dir), "-G", generator, "-DCMAKE_BUILD_TYPE=Release",
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}", f"-DPython_EXECUTABLE={sys.executable}"]
    if torch.version.cuda is not None:
        # find_package(Torch) of a CUDA build of torch looks for the CUDA toolkit even for CPU code.
        cuda_home = os.environ.get("CUDA_HOME") or ("/usr/local/cuda" if os.path.isdir("/usr/local/cuda") else None)
        if cuda_home is None:
            pytest.skip("this torch is a CUDA build and find_package(Torch) needs the CUDA toolkit: set CUDA_HOME")
        args.append(f"-DCUDA_TOOLKIT_ROOT_DIR={cuda_home}")
    cfg = subprocess.run(args, capture_output=True, text=True)
    assert cfg.returncode == 0, cfg.stdout[-3000:] + cfg.stderr[-3000:]
    # The decode limits come from backends/policy.py, as in setup.py.
    flags = (build_dir / "build.ninja") if generator == "Ninja" else (build_dir / "CMakeFiles" / "unilora_C.dir" / "flags.make")
    for name, value in (("M", policy.DECODE_MAX_M), ("R", policy.DECODE_MAX_R)):
        assert f"-DUNILORA_DECODE_MAX_{name}={value}" in flags.read_text(), f"UNILORA_DECODE_MAX_{name} is not {value}"
    jobs = str(max(1, min(2, os.cpu_count() or 1)))
    build = subprocess.run([cmake, "--build", str(build_dir), "-j", jobs], capture_output=True, text=True)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    lib = build_dir / "libunilora_C.so"
    assert lib.exists(), sorted(os.listdir(build_dir))
    run = subprocess.run([sys.executable, "-c", SMOKE, str(lib)], capture_output=True, text=True, cwd=str(build_dir))
    assert run.returncode == 0 and "cmake-smoke-ok" in run.stdout, run.stdout[-3000:] + run.stderr[-3000:]
