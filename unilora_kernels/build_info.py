"""``build_info()``: what this installation can run, for bug reports and benchmark headers."""

from __future__ import annotations

import os
import platform

import torch

from . import backends
from ._version import __version__


def _triton_version():
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def extension_info() -> dict:
    """What the compiled extension (``unilora_kernels._C``) was built with, if it was built."""
    try:
        from . import _C  # noqa: F401  (registers the torch ops on import)
    except ImportError as exc:
        return {"built": False, "reason": str(exc)}
    info = {"built": True, "path": getattr(_C, "__file__", None)}
    info.update(_C.build_metadata() if hasattr(_C, "build_metadata") else {})
    return info


def build_info() -> dict:
    """Version, available backends (or why not), compiled-extension details, library versions."""
    avail = backends.availability()
    return {
        "version": __version__,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _triton_version(),
        "python": platform.python_version(),
        "cuda_available": torch.cuda.is_available(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu",
        "backends": {name: ("available" if reason is None else f"unavailable: {reason}") for name, reason in avail.items()},
        "auto": {dev: backends.resolve("auto", dev) for dev in (("cpu", "cuda") if torch.cuda.is_available() else ("cpu",))},
        "extension": extension_info(),
        "env": {k: os.environ[k] for k in ("UNILORA_BACKEND", "UNILORA_DETERMINISTIC", "TRITON_INTERPRET") if k in os.environ},
    }
