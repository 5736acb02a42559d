"""PEFT interoperability: adapter directories in PEFT's format, and converting PEFT models.

A uniform-projection adapter is written exactly as ``PeftModel.save_pretrained`` writes a
Uni-LoRA adapter (``adapter_config.json`` + ``adapter_model.safetensors`` holding
``base_model.unilora_theta_d``), so PEFT loads it, and this package loads PEFT's. A hashed
adapter has no PEFT equivalent: its config goes to ``unilora_config.json`` instead, so PEFT
refuses it loudly rather than loading it with the wrong indices.

Every loader validates the whole checkpoint against the model before it changes anything.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from typing import Optional

import numpy as np
import torch
from torch import nn

from . import projection as P
from .adapter_table import DEFAULT, theta_of
from .bank import UniLoRABank
from .config import CONFIG_FILE, HASHED_CONFIG_FILE, UniLoRAConfig, read_adapter_config
from .layer import Conv1D
from .model import as_config, build_layers, find_bank, find_targets, inject_planned, iter_layers

WEIGHTS_FILE = "adapter_model.safetensors"
THETA_KEY = "base_model.unilora_theta_d"
PREFIX = "base_model.model."


# --------------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------------
def _safetensors():
    try:
        import safetensors.torch as st
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("adapter files need safetensors: pip install 'unilora_kernels[peft]'") from exc
    return st


def read_adapter_tensors(path) -> dict:
    """All tensors of ``adapter_model.safetensors`` in ``path`` (clear errors when missing/damaged)."""
    file = os.path.join(os.fspath(path), WEIGHTS_FILE)
    if not os.path.isfile(file):
        raise ValueError(f"{file!r} is missing: the adapter directory has no weights")
    try:
        return _safetensors().load_file(file)
    except Exception as exc:  # safetensors raises its own error types for truncated/garbage files
        raise ValueError(f"{file!r} is damaged or not a safetensors file ({type(exc).__name__}: {exc})") from None


def write_adapter_dir(path, config: dict, state: dict, config_name: str = CONFIG_FILE) -> None:
    """Write config + weights, replacing an older adapter as a pair: both are written to temp names,
    the old pair is moved aside, the new one moved in; any failure moves the old pair back, so the
    directory never holds new weights beside an old config."""
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    st = _safetensors()
    tmp_w = tempfile.NamedTemporaryFile(dir=path, suffix=".tmp", delete=False)
    tmp_w.close()
    tmp_c = tmp_w.name + ".json"
    try:
        st.save_file(state, tmp_w.name, metadata={"format": "pt"})
        with open(tmp_c, "w", encoding="utf-8") as fh:
            json.dump(config, fh, indent=2, sort_keys=True)
            fh.write("\n")
        _replace_pair(path, [(tmp_w.name, WEIGHTS_FILE), (tmp_c, config_name)], tmp_w.name)
    finally:
        for leftover in (tmp_w.name, tmp_c):
            if os.path.exists(leftover):
                os.remove(leftover)
    for other in {CONFIG_FILE, HASHED_CONFIG_FILE} - {config_name}:
        stale = os.path.join(path, other)
        if os.path.exists(stale):  # an older adapter of the other kind would shadow this one
            os.remove(stale)


def _replace_pair(path: str, moves: list, stem: str) -> None:
    """Move each (temp, name) of ``moves`` to ``path/name`` as one step: old files go to backups
    first; on any error every step done is undone in reverse, so the old files are back."""
    done = []  # (src, dst) renames done so far
    try:
        for i, (_, name) in enumerate(moves):
            target = os.path.join(path, name)
            if os.path.exists(target):
                backup = f"{stem}.old{i}"
                os.replace(target, backup)
                done.append((target, backup))
        for tmp, name in moves:
            target = os.path.join(path, name)
            os.replace(tmp, target)
            done.append((tmp, target))
    except BaseException:
        for src, dst in reversed(done):
            os.replace(dst, src)
        raise
    for src, dst in done:
        if dst.startswith(stem + ".old"):
            os.remove(dst)


# --------------------------------------------------------------------------------------------
# save
# --------------------------------------------------------------------------------------------
def save_adapter(model: nn.Module, path, name: str = DEFAULT) -> None:
    """Write an adapter in PEFT's directory format (PEFT's ``from_pretrained`` loads it): the
    model's own (``"default"``) or any ``add_adapter``'d one by ``name``."""
    bank = find_bank(model)
    cfg = bank.config
    theta = theta_of(bank, name)
    state = {THETA_KEY: theta.detach().float().cpu().contiguous().clone()}
    state.update({PREFIX + k: v.detach().cpu().contiguous() for k, v in bias_state(model, bank).items()})
    if cfg.projection == "hashed":
        config = {"peft_type": "UNILORA", **dataclasses.asdict(cfg)}
        config["base_model_name_or_path"] = _name_or_path(model)
        write_adapter_dir(path, config, state, HASHED_CONFIG_FILE)
        return
    # Indices that the seed does not regenerate (converted from a PEFT model that saved its
    # own) must travel with the adapter, or PEFT would rebuild different ones.
    save_indices = cfg.save_indices or not bank.indices_from_seed
    if save_indices:
        scales = bank.scales.detach().cpu()
        for name, layer in iter_layers(model):
            for part in ("A", "B"):
                idx = getattr(layer, f"unilora_indices_{part}").detach().cpu().long()
                state[f"{PREFIX}{name}.unilora_indices_{part}"] = idx
                state[f"{PREFIX}{name}.unilora_scales_{part}"] = scales[idx]
    config = dataclasses.replace(cfg, save_indices=save_indices).to_peft_dict()
    config["base_model_name_or_path"] = _name_or_path(model)
    write_adapter_dir(path, config, state)


# --------------------------------------------------------------------------------------------
# load
# --------------------------------------------------------------------------------------------
def checked_theta(tensors: dict, d: int, where: str) -> torch.Tensor:
    theta = tensors.get(THETA_KEY)
    if theta is None:
        raise ValueError(f"{where}: no {THETA_KEY!r} tensor (keys: {sorted(tensors)[:6]})")
    if theta.dim() != 1 or not theta.is_floating_point():
        raise ValueError(f"{where}: {THETA_KEY} must be a 1-D float tensor, got {theta.dtype} {tuple(theta.shape)}")
    if theta.numel() != d:
        raise ValueError(f"{where}: theta_d has length {theta.numel():,} but the config says theta_d_length = {d:,}")
    if not bool(torch.isfinite(theta).all()):
        raise ValueError(f"{where}: theta_d contains NaN or inf values; the checkpoint is damaged")
    return theta


def split_keys(tensors: dict, where: str):
    index_keys, bias_keys = {}, {}
    for key, value in tensors.items():
        if key == THETA_KEY:
            continue
        if not key.startswith(PREFIX):
            raise ValueError(f"{where}: unexpected key {key!r}")
        if ".unilora_indices_" in key or ".unilora_scales_" in key:
            index_keys[key] = value
        elif key.endswith("bias"):
            bias_keys[key] = value
        else:
            raise ValueError(f"{where}: unexpected key {key!r} (not theta_d, an index or a bias)")
    return index_keys, bias_keys


def _index_from_checkpoint(tensors: dict, names: list, features: list, r: int, d: int, D: int, where: str):
    """The int32 index table stored by ``save_indices``, checked against the model's layers."""
    table = np.empty(D, dtype=np.int32)
    offset, seen = 0, set()
    for name, (in_f, out_f) in zip(names, features):
        for part, shape in (("A", (r, in_f)), ("B", (out_f, r))):
            key = f"{PREFIX}{name}.unilora_indices_{part}"
            idx = tensors.get(key)
            if idx is None:
                raise ValueError(f"{where}: index entry {key!r} is missing")
            if tuple(idx.shape) != shape or idx.is_floating_point():
                raise ValueError(f"{where}: {key} has {idx.dtype} {tuple(idx.shape)}, expected integer {shape}")
            if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= d):
                raise ValueError(f"{where}: {key} has indices outside [0, {d})")
            table[offset : offset + idx.numel()] = idx.reshape(-1).numpy()
            offset += idx.numel()
            seen.add(key)
    scales = P.uniform_scales(table, d)
    for key, value in tensors.items():
        if ".unilora_scales_" in key:
            idx = tensors.get(key.replace(".unilora_scales_", ".unilora_indices_"))
            if idx is None or tuple(value.shape) != tuple(idx.shape):
                raise ValueError(f"{where}: {key} does not match an index entry")
            expected = scales[idx.long()].to(value.dtype)
            if not torch.equal(value, expected):
                raise ValueError(f"{where}: {key} disagrees with the scales implied by the stored indices")
            seen.add(key)
    extra = sorted(set(tensors) - seen)
    if extra:
        raise ValueError(f"{where}: index entries for layers the model does not adapt: {extra[:4]}")
    return table


def _post_injection_names(model: nn.Module, targets: list) -> dict:
    """{name a parameter will have after injection: its shape}; adapted layers gain ``base_layer.``."""
    target_names = {n for n, _ in targets}
    out = {}
    for pname, p in model.named_parameters():
        owner, _, leaf = pname.rpartition(".")
        out[f"{owner}.base_layer.{leaf}" if owner in target_names else pname] = tuple(p.shape)
    return out


def _check_bias_entries(bias_tensors: dict, shapes: dict, where: str) -> None:
    for key, value in bias_tensors.items():
        name = key.removeprefix(PREFIX)
        if name not in shapes:
            raise ValueError(f"{where}: bias {key!r} has no matching parameter in the model")
        if tuple(value.shape) != shapes[name]:
            raise ValueError(f"{where}: bias {key!r} has shape {tuple(value.shape)}, the model's is {shapes[name]}")


def check_same_adapter(model, bank: UniLoRABank, config: UniLoRAConfig, index_keys: dict, where: str) -> None:
    mine = bank.config
    for field in ("r", "theta_d_length", "proj_seed", "projection"):
        if getattr(mine, field) != getattr(config, field):
            raise ValueError(
                f"{where}: the model's adapter has {field}={getattr(mine, field)!r}, the checkpoint "
                f"{getattr(config, field)!r}; load it into a fresh model instead"
            )
    layers = iter_layers(model)
    mine = [n for n, _ in layers]
    # On an injected model a target is the UniLoRALinear or, for "all-linear" (which matches
    # nn.Linear), the base layer inside it: both name the same adapted layer.
    theirs = []
    for n, _ in find_targets(model, config):
        outer = n.removesuffix(".base_layer")
        n = outer if outer in mine else n
        if n not in theirs:
            theirs.append(n)
    if theirs != mine:
        raise ValueError(
            f"{where}: the checkpoint adapts {len(theirs)} layers ({theirs[:3]}...), the model's adapter "
            f"{len(mine)} ({mine[:3]}...); load it into a fresh model instead"
        )
    features = [(l.in_features, l.out_features) for _, l in layers]
    D = sum(config.r * (i + o) for i, o in features)
    if D != bank.D:
        raise ValueError(f"{where}: the checkpoint's layers give D = {D:,}, the model's adapter has D = {bank.D:,}")
    if index_keys:
        table = _index_from_checkpoint(index_keys, [n for n, _ in layers], features, config.r, config.theta_d_length, D, where)
        offset = 0
        for _, layer in layers:
            for part in ("A", "B"):
                mine_idx = getattr(layer, f"unilora_indices_{part}").cpu().reshape(-1).numpy()
                if not np.array_equal(mine_idx, table[offset : offset + mine_idx.size]):
                    raise ValueError(f"{where}: the checkpoint's stored indices differ from the model's projection")
                offset += mine_idx.size


def load_adapter(model: nn.Module, path, **overrides) -> nn.Module:
    """Load a Uni-LoRA adapter directory (PEFT's ``save_pretrained`` or ``save_adapter``) into ``model``.

    A model without an adapter gets one injected from the saved config; a model that already
    has one must match it (r, d, seed, projection, layers), and then only its values change.
    ``overrides`` (e.g. ``backend="triton"``) adjust the config before injection. Everything is
    checked before the model is touched: on error the model is exactly as it was.
    """
    where = os.fspath(path)
    config = UniLoRAConfig.from_peft_config(read_adapter_config(path), **overrides)
    tensors = read_adapter_tensors(path)
    theta = checked_theta(tensors, config.theta_d_length, where)
    index_keys, bias_keys = split_keys(tensors, where)
    if index_keys and config.projection != "uniform":
        raise ValueError(f"{where}: stored indices only exist for the uniform projection")
    bank = find_bank(model, required=False)
    if bank is None:
        config = as_config(config, {})

        def index_for(targets, features, D):
            _check_bias_entries(bias_keys, _post_injection_names(model, targets), where)
            if not index_keys:
                return None
            return _index_from_checkpoint(index_keys, [n for n, _ in targets], features, config.r,
                                          config.theta_d_length, D, where)

        bank = inject_planned(model, config, index_for)
    else:
        merged = [n for n, layer in iter_layers(model) if layer.merged]
        if merged:
            raise ValueError(f"{where}: load_adapter into a merged model (layer {merged[0]!r} holds the current adapter "
                             "in its base weight, which unmerge() would then subtract wrongly): unmerge() first")
        check_same_adapter(model, bank, config, index_keys, where)
        _check_bias_entries(bias_keys, {n: tuple(p.shape) for n, p in model.named_parameters()}, where)
    with torch.no_grad():
        bank.theta_d.copy_(theta.to(bank.theta_d.device, bank.theta_d.dtype))
        params = dict(model.named_parameters())
        for key, value in bias_keys.items():
            target = params[key.removeprefix(PREFIX)]
            target.copy_(value.to(target.device, target.dtype))
    return model


# --------------------------------------------------------------------------------------------
# PEFT models
# --------------------------------------------------------------------------------------------
def from_peft(peft_model: nn.Module) -> nn.Module:
    """Convert a PEFT Uni-LoRA model in place; returns the underlying transformers model.

    The PEFT layers are replaced by UniLoRALinear around the same base layers, with PEFT's own
    indices and the same theta_d Parameter object (so its values, and any optimizer state
    keyed on it, carry over). Outputs equal PEFT's.
    """
    try:
        from peft import PeftModel
        from peft.tuners.unilora import UniLoraModel
        from peft.tuners.unilora.layer import UniLoraLayer
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("from_peft needs peft: pip install 'unilora_kernels[peft]'") from exc
    tuner = peft_model.base_model if isinstance(peft_model, PeftModel) else peft_model
    if not isinstance(tuner, UniLoraModel):
        raise TypeError(f"from_peft expects a PEFT Uni-LoRA model, got {type(tuner).__name__}")
    active = tuner.active_adapter
    if isinstance(active, (list, tuple)):
        if len(active) != 1:
            raise ValueError(f"from_peft converts one active adapter, the model has {list(active)}")
        active = active[0]
    config = UniLoRAConfig.from_peft_config(tuner.peft_config[active])
    theta = tuner.unilora_theta_d[active]
    hf_model = tuner.model
    layers = [(n, m) for n, m in hf_model.named_modules() if isinstance(m, UniLoraLayer)]
    if not layers:
        raise ValueError("the PEFT model has no Uni-LoRA layers")
    d = config.theta_d_length
    targets, features, pieces = [], [], []
    for name, layer in layers:
        if active not in layer.unilora_indices_A:
            raise ValueError(f"PEFT layer {name!r} has no indices for adapter {active!r}")
        base = layer.get_base_layer()
        targets.append((name, base))
        features.append((layer.in_features, layer.out_features))
        for idx in (layer.unilora_indices_A[active], layer.unilora_indices_B[active]):
            pieces.append(idx.detach().cpu().reshape(-1))
    flat = torch.cat(pieces)
    D = flat.numel()
    P.check_sizes(D, d)
    if int(flat.min()) < 0 or int(flat.max()) >= d:
        raise ValueError("the PEFT model's indices fall outside [0, theta_d_length)")
    index = flat.to(torch.int32).numpy()
    del flat, pieces
    merged = {name for name, layer in layers if active in getattr(layer, "merged_adapters", [])}
    build_layers(hf_model, config, targets, features, D, index=index, theta=theta)
    for name, layer in iter_layers(hf_model):
        layer.merged = name in merged  # PEFT already added B A into these base weights
    return hf_model


# --------------------------------------------------------------------------------------------
# plain-LoRA export
# --------------------------------------------------------------------------------------------
def bias_state(model: nn.Module, bank: UniLoRABank) -> dict:
    """PEFT's learnable-bias entries of the adapter state dict (names relative to the model)."""
    if bank.config.bias == "none":
        return {}
    state = model.state_dict()
    if bank.config.bias == "all":
        return {k: v for k, v in state.items() if k == "bias" or k.endswith(".bias")}
    keys = {f"{n}.base_layer.bias" for n, _ in iter_layers(model)}
    return {k: v for k, v in state.items() if k in keys}


def lora_config_dict(model: nn.Module, bank: UniLoRABank, names: list) -> dict:
    fan_in_fan_out = Conv1D is not None and any(isinstance(l.base_layer, Conv1D) for _, l in iter_layers(model))
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": _name_or_path(model),
        "revision": None,
        "inference_mode": True,
        "r": bank.config.r,
        "lora_alpha": bank.config.r,  # scaling alpha / r = 1: Uni-LoRA has no alpha
        "lora_dropout": 0.0,
        "target_modules": names,
        "fan_in_fan_out": fan_in_fan_out,
        "bias": bank.config.bias,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
    }


def _name_or_path(model: nn.Module):
    cfg = getattr(model, "config", None)
    return getattr(cfg, "_name_or_path", None) or getattr(model, "name_or_path", None) or None


def export_lora(model: nn.Module, path: Optional[str] = None) -> dict:
    """The equivalent plain-LoRA adapter: PEFT LoRA key names, ``lora_alpha = r``, fp32.

    ``base_model.model.<layer>.lora_A.weight`` is A (r x in) and ``...lora_B.weight`` is B
    (out x r), so any LoRA runtime serves the adapter. With ``path``, also writes a PEFT LoRA
    adapter directory (adapter_config.json + adapter_model.safetensors) there.
    """
    bank = find_bank(model)
    state, names = {}, []
    for name, layer in iter_layers(model):
        A, B = layer.lora_matrices()
        state[f"base_model.model.{name}.lora_A.weight"] = A.float().cpu().contiguous()
        state[f"base_model.model.{name}.lora_B.weight"] = B.float().cpu().contiguous()
        names.append(name)
    for key, value in bias_state(model, bank).items():
        state[f"base_model.model.{key}"] = value.detach().cpu().contiguous()
    if path is not None:
        write_adapter_dir(path, lora_config_dict(model, bank, names), state)
    return state
