"""Build script: the Python package, the Triton sources, and the compiled extension.

The extension ``unilora_kernels._C`` is built from ``csrc/`` with torch's cpp_extension:
a ``CUDAExtension`` when the installed torch has CUDA and nvcc is found (or ``FORCE_CUDA=1``),
otherwise a ``CppExtension`` (``FORCE_CPU=1`` forces that). ``TORCH_CUDA_ARCH_LIST`` picks the
GPU architectures (default 8.0;8.6;8.9;9.0). Install with ``pip install --no-build-isolation .``
after installing torch, so that the build sees the torch it will run with.
"""

import glob
import os
import re

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = "8.0;8.6;8.9;9.0"


def read_version() -> str:
    with open(os.path.join(ROOT, "unilora_kernels", "_version.py"), encoding="utf-8") as fh:
        return re.search(r'__version__ = "([^"]+)"', fh.read()).group(1)


def read_decode_limits() -> dict:
    """DECODE_MAX_M / DECODE_MAX_R of unilora_kernels/backends/policy.py, their one definition."""
    with open(os.path.join(ROOT, "unilora_kernels", "backends", "policy.py"), encoding="utf-8") as fh:
        text = fh.read()
    limits = {}
    for name in ("DECODE_MAX_M", "DECODE_MAX_R"):
        found = re.search(rf"^{name} = (\d+)$", text, re.MULTILINE)
        if found is None:
            raise RuntimeError(f"unilora_kernels/backends/policy.py has no line `{name} = <integer>`")
        limits[name] = found.group(1)
    return limits


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def extension_modules():
    """([extension], {"build_ext": BuildExtension}) when csrc/ has sources, else ([], {})."""
    cpp = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cu = sorted(glob.glob(os.path.join("csrc", "*.cu")))
    if not cpp:
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError as exc:
        raise RuntimeError(
            "building unilora_kernels needs torch in the build environment: install torch first, then "
            "`pip install --no-build-isolation .`"
        ) from exc
    force_cpu, force_cuda = _flag("FORCE_CPU"), _flag("FORCE_CUDA")
    if force_cpu and force_cuda:
        raise RuntimeError("FORCE_CPU=1 and FORCE_CUDA=1 contradict each other")
    use_cuda = bool(cu) and not force_cpu and (force_cuda or (torch.version.cuda is not None and CUDA_HOME is not None))
    if force_cuda and CUDA_HOME is None:
        raise RuntimeError("FORCE_CUDA=1 but no CUDA toolkit was found: set CUDA_HOME (e.g. /usr/local/cuda)")
    # No -std flag: torch's cpp_extension adds the standard its headers need (C++17 or C++20).
    # -g0 drops the debug info Python's CFLAGS ask for: it halves the C++ compile time (the SIMD
    # templates); UNILORA_DEBUG_SYMBOLS=1 keeps it.
    cxx = ["-O3"] + ([] if _flag("UNILORA_DEBUG_SYMBOLS") else ["-g0"])
    # define_macros reach both cxx and nvcc.
    define_macros = [("UNILORA_" + name, value) for name, value in read_decode_limits().items()]
    if use_cuda:
        archs = os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_ARCHS
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
        define_macros.append(("UNILORA_WITH_CUDA", "1"))
        define_macros.append(("UNILORA_CUDA_ARCHS", '"' + archs.replace(" ", "") + '"'))
        nvcc = ["-O3", "-lineinfo"]
        if _flag("UNILORA_PTXAS_VERBOSE"):
            nvcc.append("-Xptxas=-v")
        ext = CUDAExtension(
            "unilora_kernels._C",
            cpp + cu,
            include_dirs=[os.path.join(ROOT, "csrc")],
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx + ["-fopenmp"], "nvcc": nvcc},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = CppExtension(
            "unilora_kernels._C",
            cpp,
            include_dirs=[os.path.join(ROOT, "csrc")],
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx + ["-fopenmp"]},
            extra_link_args=["-fopenmp"],
        )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extension_modules()

setup(
    version=read_version(),
    packages=["unilora_kernels", "unilora_kernels.backends", "unilora_kernels.triton_kernels"],
    # Triton sources live at the top level but install inside the package: a PyPI project
    # already owns the top-level name `triton_kernels`.
    package_dir={"unilora_kernels.triton_kernels": "triton_kernels"},
    # per-device launch configs as data (backends/triton_launch.py, configs_for_device)
    package_data={"unilora_kernels.triton_kernels": ["configs/*.json"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
