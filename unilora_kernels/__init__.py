"""Fused kernels for Uni-LoRA: one trainable vector theta_d for a whole model.

Public API: ``UniLoRAConfig``, ``inject``, ``UniLoRALinear``, ``from_peft``, ``load_adapter``,
``add_adapter``, ``adapter_batch`` and the rest of ``adapters.py`` (many adapters in one batch),
``save_adapter``, ``merge``, ``unmerge``, ``clear_plans``, ``fold_workspace_bytes``, ``export_lora``, ``ops`` and ``build_info``.
"""

from . import hf_trainer  # UniLoRATrainer, adapter_checkpoints: transformers is imported on first use
from . import ops
from ._version import __version__
from .adapters import (adapter_batch, adapter_memory, adapter_names, adapter_parameters, adapter_theta,
                       add_adapter, remove_adapter)
from .backends import BackendNotAvailableError
from .build_info import build_info
from .config import UniLoRAConfig
from .layer import UniLoRALinear
from .model import clear_plans, find_targets, fold_workspace_bytes, inject, iter_layers, merge, unmerge
from .peft_io import export_lora, from_peft, load_adapter, save_adapter

__all__ = [
    "BackendNotAvailableError",
    "UniLoRAConfig",
    "UniLoRALinear",
    "adapter_batch",
    "adapter_memory",
    "adapter_names",
    "adapter_parameters",
    "adapter_theta",
    "add_adapter",
    "remove_adapter",
    "__version__",
    "build_info",
    "clear_plans",
    "export_lora",
    "find_targets",
    "fold_workspace_bytes",
    "from_peft",
    "hf_trainer",
    "inject",
    "iter_layers",
    "load_adapter",
    "merge",
    "ops",
    "save_adapter",
    "unmerge",
]
