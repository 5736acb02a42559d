"""Putting Uni-LoRA into a model: target matching (PEFT's rules), ``inject``, merge and unmerge."""

from __future__ import annotations

import dataclasses
import re
import warnings
from typing import Optional

from torch import nn

from . import backends
from .backends import policy
from .bank import UniLoRABank, init_theta
from .config import UniLoRAConfig
from .layer import Conv1D, UniLoRALinear, base_features
from .projection import check_sizes

# PEFT's default targets (TRANSFORMERS_MODELS_TO_UNILORA_TARGET_MODULES_MAPPING, peft 0.21.2),
# for the common architectures, used when target_modules is None.
DEFAULT_TARGET_MODULES = {
    "bart": ["q_proj", "v_proj"],
    "bert": ["query", "value"],
    "bloom": ["query_key_value"],
    "deberta-v2": ["query_proj", "value_proj"],
    "falcon": ["query_key_value"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "gpt_bigcode": ["c_attn"],
    "gpt_neo": ["q_proj", "v_proj"],
    "gpt_neox": ["query_key_value"],
    "gptj": ["q_proj", "v_proj"],
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"],
    "opt": ["q_proj", "v_proj"],
    "phi": ["q_proj", "v_proj", "fc1", "fc2"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "roberta": ["query", "value"],
    "t5": ["q", "v"],
    "xlm-roberta": ["query", "value"],
}
ALL_LINEAR = "all-linear"


# --------------------------------------------------------------------------------------------
# finding the layers
# --------------------------------------------------------------------------------------------
def _linear_types() -> tuple:
    return (nn.Linear,) if Conv1D is None else (nn.Linear, Conv1D)


def _target_spec(model: nn.Module, config: UniLoRAConfig):
    if config.target_modules is not None:
        return config.target_modules
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in DEFAULT_TARGET_MODULES:
        return DEFAULT_TARGET_MODULES[model_type]
    raise ValueError(
        f"target_modules is None and model type {model_type!r} has no default target list; "
        "pass target_modules (a list of module names, a regex, or 'all-linear')"
    )


def _matches(spec, name: str) -> bool:
    """PEFT's rule: a regex must match the whole name; a list entry equals it or ends it after a dot."""
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return name in spec or any(name.endswith("." + t) for t in spec)


def _all_linear_names(model: nn.Module) -> set:
    names = {n for n, m in model.named_modules() if n and isinstance(m, _linear_types())}
    get_out = getattr(model, "get_output_embeddings", None)
    out_emb = get_out() if callable(get_out) else None
    if out_emb is not None:  # never adapt the LM head, as PEFT does
        names -= {n for n, m in model.named_modules() if m is out_emb}
    return names


def find_targets(model: nn.Module, config: UniLoRAConfig) -> list:
    """[(name, module)] of the modules ``config`` targets, in ``model.named_modules()`` order."""
    spec = _target_spec(model, config)
    if isinstance(spec, str) and spec.lower() == ALL_LINEAR:
        chosen = _all_linear_names(model)
        return [(n, m) for n, m in model.named_modules() if n in chosen]
    return [(n, m) for n, m in model.named_modules() if n and _matches(spec, n)]


def iter_layers(model: nn.Module) -> list:
    """[(name, UniLoRALinear)] in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, UniLoRALinear)]


def find_bank(model: nn.Module, required: bool = True) -> Optional[UniLoRABank]:
    banks = {id(m.bank): m.bank for _, m in iter_layers(model)}
    if len(banks) > 1:
        raise ValueError("model holds UniLoRALinear layers of several different adapters; expected one")
    if not banks:
        if required:
            raise ValueError("model has no Uni-LoRA adapter: call unilora_kernels.inject(model, config) first")
        return None
    return next(iter(banks.values()))


# --------------------------------------------------------------------------------------------
# inject
# --------------------------------------------------------------------------------------------
def as_config(config, overrides: dict) -> UniLoRAConfig:
    if config is None:
        return UniLoRAConfig(**overrides)
    if isinstance(config, UniLoRAConfig):
        return dataclasses.replace(config, **overrides) if overrides else dataclasses.replace(config)
    if isinstance(config, dict):
        return UniLoRAConfig(**{**config, **overrides})
    return UniLoRAConfig.from_peft_config(config, **overrides)


def plan(model: nn.Module, config: UniLoRAConfig) -> tuple[list, list, int]:
    """Validate an injection without touching the model: (targets, [(in, out)], D)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    config.validate()
    if find_bank(model, required=False) is not None:
        raise ValueError("model already has a Uni-LoRA adapter; load or train that one, or start from a fresh model")
    targets = find_targets(model, config)
    if not targets:
        sample = [n for n, m in model.named_modules() if n and isinstance(m, _linear_types())][:8]
        raise ValueError(
            f"no module of the model matched target_modules={config.target_modules!r}; "
            f"linear layers it has include: {sample}"
        )
    features = []
    for name, module in targets:
        if not isinstance(module, _linear_types()):
            raise TypeError(
                f"target module {name!r} is a {type(module).__name__}; Uni-LoRA adapts torch.nn.Linear and "
                "transformers Conv1D layers only (narrow target_modules)"
            )
        features.append(base_features(module))
    D = sum(config.r * (i + o) for i, o in features)
    check_sizes(D, config.theta_d_length)
    return targets, features, D


def fan_in_fan_out_checked(config: UniLoRAConfig, targets: list) -> UniLoRAConfig:
    """PEFT's per-type correction of fan_in_fan_out, with its warnings."""
    has_conv1d = Conv1D is not None and any(isinstance(m, Conv1D) for _, m in targets)
    has_linear = any(isinstance(m, nn.Linear) for _, m in targets)
    if has_conv1d and not config.fan_in_fan_out:
        warnings.warn("fan_in_fan_out is False but the targets are Conv1D; setting fan_in_fan_out to True", stacklevel=4)
        config = dataclasses.replace(config, fan_in_fan_out=True)
    elif has_linear and not has_conv1d and config.fan_in_fan_out:
        warnings.warn(
            "fan_in_fan_out is True but the targets are torch.nn.Linear; setting fan_in_fan_out to False", stacklevel=4
        )
        config = dataclasses.replace(config, fan_in_fan_out=False)
    return config


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def set_trainable(model: nn.Module, bank: UniLoRABank) -> None:
    """Freeze everything but theta_d (and the biases that ``config.bias`` names)."""
    for p in model.parameters():
        p.requires_grad_(False)
    bank.theta_d.requires_grad_(True)
    if bank.config.bias == "all":
        for n, p in model.named_parameters():
            if n == "bias" or n.endswith(".bias"):
                p.requires_grad_(True)
    elif bank.config.bias == "unilora_only":
        for _, layer in iter_layers(model):
            bias = getattr(layer.base_layer, "bias", None)
            if isinstance(bias, nn.Parameter):
                bias.requires_grad_(True)


def build_layers(model, config, targets, features, D, *, index=None, theta=None) -> UniLoRABank:
    """Create the bank on ``model`` and swap each target for a UniLoRALinear (mutates)."""
    device = next(iter(targets[0][1].parameters())).device
    bank = UniLoRABank(model, config, D, index=index)
    if theta is None:
        theta = init_theta(config.theta_d_length, config.init_theta_d_bound, config.init_weights, device)
    bank.attach(theta, device)
    offset = 0
    for (name, module), (in_f, out_f) in zip(targets, features):
        _set_submodule(model, name, UniLoRALinear(module, bank=bank, offset=offset))
        offset += config.r * (in_f + out_f)
    bank.release_table()
    set_trainable(model, bank)
    return bank


def inject_planned(model: nn.Module, config: UniLoRAConfig, index_for=None) -> UniLoRABank:
    """The steps of ``inject`` (also ``load_adapter``'s): plan and check everything, then build.

    ``index_for(targets, features, D)`` may supply the index table (a checkpoint's stored
    indices) and may raise; it runs before anything is changed, so on error the model is untouched.
    """
    targets, features, D = plan(model, config)
    index = index_for(targets, features, D) if index_for is not None else None
    device = next(iter(targets[0][1].parameters())).device
    backends.resolve(config.requested_backend(), device.type)  # fail before touching the model
    config = fan_in_fan_out_checked(config, targets)
    return build_layers(model, config, targets, features, D, index=index)


def inject(model: nn.Module, config: Optional[UniLoRAConfig] = None, **overrides) -> nn.Module:
    """Replace the target layers of ``model`` by UniLoRALinear, in place; returns ``model``.

    Layers are taken in ``model.named_modules()`` order and each takes the next ``r*in``
    entries of D for A and ``out*r`` for B, as PEFT does, so a config equal to a PEFT
    ``UniLoraConfig`` gives PEFT's indices and scales. Exactly one trainable parameter is
    registered, ``model.unilora_theta_d`` (fp32, shape (d,)); everything else is frozen
    (except biases when ``config.bias`` says so). On any error the model is left untouched.
    """
    inject_planned(model, as_config(config, overrides))
    return model


# --------------------------------------------------------------------------------------------
# merge / unmerge / export
# --------------------------------------------------------------------------------------------
def merge(model: nn.Module) -> nn.Module:
    """Add every layer's ``B A`` into its base weight (serving without the adapter's cost)."""
    find_bank(model)
    for _, layer in iter_layers(model):
        if not layer.merged:
            layer.merge()
    return model


def unmerge(model: nn.Module) -> nn.Module:
    find_bank(model)
    for _, layer in iter_layers(model):
        if layer.merged:
            layer.unmerge()
    return model


def clear_plans(model: nn.Module) -> nn.Module:
    """Drop every layer's cached call plans (plan.py): the next call re-resolves backends and
    re-reads the environment knobs (UNILORA_BACKEND, UNILORA_DETERMINISTIC, the Triton knobs)."""
    for _, layer in iter_layers(model):
        layer.clear_plans()
    return model


def fold_workspace_bytes(model: nn.Module) -> int:
    """The GPU workspace the large-M schedule needs: the bytes of the largest ``W + B A`` among the
    plans built so far (calls of ``layer.fold`` rows or more fold into a fresh weight-sized tensor,
    one layer at a time), 0 if no plan folds. ``UNILORA_FOLD_MAX_MIB`` bounds it; cpu plans fold into
    a per-thread buffer of at most 64 MiB and are not counted."""
    most = 0  # bytes
    for _, layer in iter_layers(model):
        for plan in layer._bucket_plans.values():
            if plan.fold < policy.FOLD_NEVER and plan.backend in ("cuda", "triton"):
                elt = plan.spec.x_dtype.itemsize
                most = max(most, layer.in_features * layer.out_features * elt)
    return most
