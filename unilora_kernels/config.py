"""``UniLoRAConfig``: PEFT's ``UniLoraConfig`` fields and defaults, plus the projection and backend."""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from .backends import BACKENDS

PEFT_TYPE = "UNILORA"
CONFIG_FILE = "adapter_config.json"  # PEFT's name, for the uniform projection
HASHED_CONFIG_FILE = "unilora_config.json"  # hashed adapters: a name PEFT does not read
PROJECTIONS = ("uniform", "hashed")
BIAS_OPTIONS = ("none", "all", "unilora_only")

# PEFT fields this package reproduces; anything else PEFT may set must be at its default.
_PEFT_FIELDS = (
    "r",
    "theta_d_length",
    "proj_seed",
    "target_modules",
    "unilora_dropout",
    "init_theta_d_bound",
    "init_weights",
    "fan_in_fan_out",
    "bias",
    "save_indices",
)
# PEFT options we do not implement: loading a config that uses them must fail loudly.
_PEFT_UNSUPPORTED_DEFAULTS = {
    "layers_to_transform": None,
    "layers_pattern": None,
    "modules_to_save": None,
    "exclude_modules": None,
    "target_parameters": None,
}


def requested_backend(backend: str) -> str:
    """``backend``, with the ``UNILORA_BACKEND`` environment variable taking over "auto"."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        return backend
    env = os.environ.get("UNILORA_BACKEND", "auto").strip().lower() or "auto"
    if env not in BACKENDS:
        raise ValueError(f"UNILORA_BACKEND={env!r} is not one of {BACKENDS}")
    return env


@dataclass
class UniLoRAConfig:
    """Configuration of a Uni-LoRA adapter.

    Field names and defaults are PEFT's ``UniLoraConfig`` (peft 0.21.2), so a PEFT config
    converts losslessly (``from_peft_config`` / ``to_peft_config``). Two fields are this
    package's own: ``projection`` ("uniform" is PEFT's index layout; "hashed" stores no
    indices) and ``backend`` ("auto", "reference", "triton", "cpu", "cuda"; the
    ``UNILORA_BACKEND`` environment variable overrides "auto").
    """

    r: int = 4
    theta_d_length: int = 256
    proj_seed: int = 42
    target_modules: Optional[Union[list[str], str]] = None
    unilora_dropout: float = 0.0
    init_theta_d_bound: float = 0.02
    init_weights: bool = True
    fan_in_fan_out: bool = False
    bias: str = "none"
    save_indices: bool = False
    projection: str = "uniform"
    backend: str = "auto"
    peft_type: str = field(default=PEFT_TYPE, init=False)

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        self.validate()

    def validate(self) -> None:
        def _is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        if not _is_int(self.r) or self.r <= 0:
            raise ValueError(f"UniLoRAConfig.r must be a positive int, got {self.r!r}")
        if not _is_int(self.theta_d_length) or self.theta_d_length <= 0:
            raise ValueError(f"UniLoRAConfig.theta_d_length must be a positive int, got {self.theta_d_length!r}")
        if not _is_int(self.proj_seed) or self.proj_seed < 0:
            raise ValueError(f"UniLoRAConfig.proj_seed must be a non-negative int, got {self.proj_seed!r}")
        if not isinstance(self.unilora_dropout, (int, float)) or not 0.0 <= self.unilora_dropout <= 1.0:
            raise ValueError(f"UniLoRAConfig.unilora_dropout must be in [0, 1], got {self.unilora_dropout!r}")
        if not isinstance(self.init_theta_d_bound, (int, float)) or self.init_theta_d_bound <= 0:
            raise ValueError(
                f"UniLoRAConfig.init_theta_d_bound must be a positive float, got {self.init_theta_d_bound!r}"
            )
        if self.bias not in BIAS_OPTIONS:
            raise ValueError(f"UniLoRAConfig.bias must be one of {BIAS_OPTIONS}, got {self.bias!r}")
        if self.projection not in PROJECTIONS:
            raise ValueError(f"UniLoRAConfig.projection must be one of {PROJECTIONS}, got {self.projection!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"UniLoRAConfig.backend must be one of {BACKENDS}, got {self.backend!r}")
        tm = self.target_modules
        if tm is not None:
            if isinstance(tm, str):
                try:
                    re.compile(tm)
                except re.error as exc:
                    raise ValueError(f"UniLoRAConfig.target_modules {tm!r} is not a valid regex: {exc}") from None
            elif not (isinstance(tm, list) and tm and all(isinstance(t, str) and t for t in tm)):
                raise ValueError(
                    "UniLoRAConfig.target_modules must be None, a regex string or a non-empty list of "
                    f"module names, got {tm!r}"
                )

    # -- backend -------------------------------------------------------------------------
    def requested_backend(self) -> str:
        return requested_backend(self.backend)

    # -- PEFT interop --------------------------------------------------------------------
    def to_peft_dict(self) -> dict:
        """The adapter_config.json that PEFT writes for this adapter (no peft import needed)."""
        target = self.target_modules
        out = {
            "peft_type": PEFT_TYPE,
            "task_type": None,
            "base_model_name_or_path": None,
            "revision": None,
            "inference_mode": True,
            "layers_to_transform": None,
            "layers_pattern": None,
            "modules_to_save": None,
        }
        for name in _PEFT_FIELDS:
            out[name] = getattr(self, name)
        out["target_modules"] = sorted(target) if isinstance(target, list) else target
        return out

    def to_peft_config(self):
        """A ``peft.UniLoraConfig`` equal to this config (requires peft)."""
        if self.projection != "uniform":
            raise ValueError(
                "PEFT only knows the 'uniform' projection; a 'hashed' adapter cannot be expressed as a "
                "peft.UniLoraConfig (use export_lora() to serve it with any LoRA runtime)"
            )
        try:
            from peft import UniLoraConfig
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError("to_peft_config() needs peft: pip install 'unilora_kernels[peft]'") from exc
        kwargs = {name: getattr(self, name) for name in _PEFT_FIELDS}
        return UniLoraConfig(**kwargs)

    @classmethod
    def from_peft_config(cls, peft_config, **overrides) -> "UniLoRAConfig":
        """Build from a ``peft.UniLoraConfig``, a dict read from adapter_config.json, or a path to one."""
        if isinstance(peft_config, (str, os.PathLike)):
            peft_config = read_adapter_config(peft_config)
        if dataclasses.is_dataclass(peft_config) and not isinstance(peft_config, type):
            data = {f.name: getattr(peft_config, f.name) for f in dataclasses.fields(peft_config)}
        elif isinstance(peft_config, dict):
            data = dict(peft_config)
        else:
            raise TypeError(
                f"from_peft_config expects a peft.UniLoraConfig, a dict or a path, got {type(peft_config).__name__}"
            )
        peft_type = data.get("peft_type")
        peft_type = getattr(peft_type, "value", peft_type)
        if peft_type is not None and str(peft_type).upper() != PEFT_TYPE:
            raise ValueError(f"adapter is of PEFT type {peft_type!r}, not {PEFT_TYPE!r} (Uni-LoRA)")
        for key, default in _PEFT_UNSUPPORTED_DEFAULTS.items():
            value = data.get(key, default)
            if value not in (None, [], ""):
                raise ValueError(f"PEFT option {key}={value!r} is not supported by unilora_kernels")
        kwargs = {k: data[k] for k in _PEFT_FIELDS + ("projection", "backend") if k in data}
        kwargs.update(overrides)
        return cls(**kwargs)


def read_adapter_config(path) -> dict:
    """The adapter's config dict, from a directory (or the JSON file itself)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        for name in (CONFIG_FILE, HASHED_CONFIG_FILE):
            if os.path.isfile(os.path.join(path, name)):
                cfg_path = os.path.join(path, name)
                break
        else:
            raise ValueError(f"{path!r} holds no {CONFIG_FILE} (nor {HASHED_CONFIG_FILE}): not an adapter directory")
    elif os.path.isfile(path):
        cfg_path = path
    else:
        raise ValueError(f"adapter path {path!r} does not exist")
    try:
        with open(cfg_path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{cfg_path!r} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{cfg_path!r} must hold a JSON object, got {type(data).__name__}")
    return data
