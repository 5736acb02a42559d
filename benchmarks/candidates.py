"""What a benchmark candidate is, which ones exist, and which ones a run times (``--candidates``).

The layer benchmark times every name below; the model benchmark times the base, the PEFT ones
and this package with backend auto (model_bench.CANDIDATES). A candidate that serves as the
correctness reference (the naive projection for layers, PEFT's Uni-LoRA for the model) is built
even when it is not timed, so a filtered run still checks every result it times.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Optional

import torch
from torch import nn

from unilora_kernels import backends

UNILORA_BACKENDS = ("reference", "cpu", "triton", "cuda")  # the order they are timed in
REFERENCE_POINTS = ("base", "naive", "peft-unilora", "peft-lora")
MODEL_REFERENCE_POINTS = ("peft-unilora", "peft-lora")


@dataclass
class Candidate:
    name: str  # e.g. "unilora[triton]", "peft-unilora", "naive", "peft-lora", "base"
    module: nn.Module  # the layer, or the whole model
    kind: str  # "unilora" (the same function as the naive projection), "lora", "base"
    backend: str = ""
    timed: bool = True  # False: built only as the correctness reference of the others
    params: list = field(default_factory=list)  # what the model benchmark's optimizer trains
    index_bytes_per_elem: Optional[float] = None
    extra: dict = field(default_factory=dict)


def unilora_name(backend: str) -> str:
    return f"unilora[{backend}]"


ALL_NAMES = REFERENCE_POINTS + tuple(unilora_name(b) for b in UNILORA_BACKENDS)


def peft_installed() -> bool:
    try:
        import peft  # noqa: F401
    except ImportError:
        return False
    return True


def benchmark_backends(device: torch.device) -> list:
    """Backends worth timing on this device (never the Triton interpreter)."""
    names = []
    for name in UNILORA_BACKENDS:
        if name == "triton" and device.type != "cuda":
            continue
        try:
            backends.get_backend(name, device.type)
        except backends.BackendNotAvailableError:
            continue
        names.append(name)
    return names


def layer_candidate_names(device: torch.device) -> list:
    peft = list(REFERENCE_POINTS[2:]) if peft_installed() else []
    return ["base", "naive", *peft, *(unilora_name(b) for b in benchmark_backends(device))]


def model_candidate_names(device: torch.device, selected: Optional[set] = None) -> list:
    """The model benchmark's candidates (model_bench.CANDIDATES) that run here and that
    ``selected`` (layer names) asks for: any unilora[...] name selects this package's auto one."""
    names = ["base", *(MODEL_REFERENCE_POINTS[::-1] if peft_installed() else ()), unilora_name("auto")]
    if selected is None:
        return names
    wants_ours = any(n.startswith("unilora[") for n in selected)
    return [n for n in names if n in selected or (n == unilora_name("auto") and wants_ours)]


def select(requested: Optional[Iterable[str]], device: torch.device) -> Optional[set]:
    """The names ``--candidates`` asks for (None: all); a ValueError for a name that is unknown
    or cannot run here, naming the valid ones."""
    if requested is None:
        return None
    requested = list(requested)
    unknown = [n for n in requested if n not in ALL_NAMES]
    if unknown:
        raise ValueError(f"unknown candidate(s) {', '.join(unknown)}; valid names: {', '.join(ALL_NAMES)}")
    here = layer_candidate_names(device)
    missing = [n for n in requested if n not in here]
    if missing:
        raise ValueError(f"candidate(s) {', '.join(missing)} cannot run on this machine "
                         f"({device.type}{'' if peft_installed() else ', peft not installed'}); "
                         f"available here: {', '.join(here)}")
    return set(requested)


def is_selected(name: str, selected: Optional[set]) -> bool:
    return selected is None or name in selected
