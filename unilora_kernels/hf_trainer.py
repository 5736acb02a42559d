"""Hugging Face ``Trainer`` with Uni-LoRA: checkpoints and ``save_model`` hold the adapter, not the base.

The one line a user changes::

    trainer = UniLoRATrainer(model=model, args=args, train_dataset=data)  # instead of Trainer(...)

or, for any Trainer subclass (trl's ``SFTTrainer``, ``Seq2SeqTrainer``), after building it::

    adapter_checkpoints(trainer)

Every ``checkpoint-N/`` then holds ``adapter_config.json`` + ``adapter_model.safetensors``
(PEFT's format, what ``save_adapter`` writes) beside Trainer's optimizer, scheduler and RNG
files, and ``resume_from_checkpoint`` / ``load_best_model_at_end`` load the adapter back.
Adapters registered with ``add_adapter`` are saved too, in PEFT's multi-adapter layout
(``<dir>/<name>/adapter_model.safetensors`` + its config; ``unilora_adapters.json`` names them
in the order of their parameters), and restored by name; resuming adds the ones the model lacks.

Why override Trainer's ``_save`` / ``_load_from_checkpoint`` / ``_load_best_model`` rather than
add a callback: Trainer writes the full weights in ``_save`` before any callback runs, and
resuming accepts an adapter-only checkpoint only for a ``peft.PeftModel``; a callback could
neither avoid the full copy nor resume. Each override defers to Trainer's own method when the
model carries no Uni-LoRA adapter (or the checkpoint holds full weights).
"""

from __future__ import annotations

import json
import os

import torch
from torch import nn

from .adapters import theta_from_dir, add_adapter
from .model import find_bank
from .peft_io import WEIGHTS_FILE, load_adapter, save_adapter

# Trainer's file names for full weights (transformers.utils constants, spelled out so that
# importing this module needs no transformers).
FULL_WEIGHT_FILES = (
    "model.safetensors",
    "pytorch_model.bin",
    "model.safetensors.index.json",
    "pytorch_model.bin.index.json",
)
TRAINING_ARGS_FILE = "training_args.bin"
# The added adapters' names in the order of their parameters: which subdirectories are adapters
# (save_model's directory also holds checkpoint-N/, runs/), and the order in which optimizer.pt
# holds their optimizer state (Trainer builds the optimizer from model.parameters()).
ADAPTERS_FILE = "unilora_adapters.json"


def unwrapped(model: nn.Module) -> nn.Module:
    """The user's model inside DDP / DataParallel / torch.compile wrappers."""
    wrappers = (nn.parallel.DistributedDataParallel, nn.DataParallel)
    while True:
        if isinstance(model, wrappers):
            model = model.module
        elif isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
            model = model._orig_mod
        else:
            return model


def has_adapter(model: nn.Module) -> bool:
    return find_bank(unwrapped(model), required=False) is not None


def is_adapter_checkpoint(path) -> bool:
    """True when ``path`` holds a Uni-LoRA adapter and no full model weights."""
    path = os.fspath(path)
    if not os.path.isfile(os.path.join(path, WEIGHTS_FILE)):
        return False
    return not any(os.path.exists(os.path.join(path, name)) for name in FULL_WEIGHT_FILES)


def _check_dir_name(name: str, where: str) -> None:
    # Each added adapter is a subdirectory named after it: a name must stay inside the directory
    # and not be taken for one of Trainer's checkpoints.
    if (not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\\" in name or "\0" in name
            or name.startswith("checkpoint-")):
        raise ValueError(f"{where}: adapter name {name!r} cannot be a checkpoint subdirectory (PEFT's layout "
                         "<dir>/<name>/): use a name without '/', '\\', '.'/'..' or a 'checkpoint-' prefix")


def _added(model: nn.Module) -> list:
    """The model's added adapters in the order of their parameters."""
    table = find_bank(model).adapters
    return [] if table is None else list(table.slots)


def save_adapters(model: nn.Module, path) -> None:
    """The model's own adapter in ``path`` (as ``save_adapter``) and each added one in ``path/<name>/``."""
    names = _added(model)
    for name in names:  # every name checked before anything is written
        _check_dir_name(name, os.fspath(path))
    save_adapter(model, path)
    if not names:
        return
    for name in names:
        save_adapter(model, os.path.join(path, name), name=name)
    tmp = os.path.join(path, ADAPTERS_FILE + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"adapters": names}, f, indent=2)
    os.replace(tmp, os.path.join(path, ADAPTERS_FILE))


def _read_layout(path):
    file = os.path.join(os.fspath(path), ADAPTERS_FILE)
    if not os.path.isfile(file):
        return []
    try:
        with open(file, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{file!r} is damaged ({type(exc).__name__}: {exc})") from None
    names = data.get("adapters") if isinstance(data, dict) else None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names) or len(set(names)) != len(names):
        raise ValueError(f"{file!r} is not {{'adapters': [distinct names]}}: {str(data)[:80]}")
    for name in names:
        _check_dir_name(name, file)
    return names


def load_adapters(model: nn.Module, path, same_order: bool = False) -> None:
    """Load what ``save_adapters`` wrote: the model's own adapter, and each added one by name (added
    to the model when it lacks it, in the saved order). ``same_order`` (resuming, where optimizer.pt
    holds the adapters' state in parameter order): refuse when the order then differs from the saved one."""
    where = os.fspath(path)
    ordered = _read_layout(path)
    bank = find_bank(model)
    thetas = {name: theta_from_dir(model, bank, os.path.join(where, name)) for name in ordered}  # all checked first
    if same_order and ordered:  # refused before anything is loaded: the model stays as it was
        mine = _added(model)
        after = mine + [name for name in ordered if name not in mine]  # adapters it lacks are appended
        if after != ordered:
            raise ValueError(f"{where}: the checkpoint's adapters are {ordered} in this order, the model's would be "
                             f"{after}: optimizer.pt holds their state in parameter order, so it would go to other "
                             "adapters. Resume into a model without added adapters (they are added), or with these "
                             "in this order")
    load_adapter(model, path)
    for name in ordered:
        table = bank.adapters
        if table is not None and name in table.slots:
            with torch.no_grad():
                row = table.theta_of(name)
                row.copy_(thetas[name].to(row.device, row.dtype))
        else:
            add_adapter(model, name, thetas[name])


class UniLoRACheckpointMixin:
    """Put before a ``transformers.Trainer`` class in the bases (``UniLoRATrainer`` does)."""

    def _save(self, output_dir=None, state_dict=None):
        if not has_adapter(self.model):
            return super()._save(output_dir, state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:  # only the main process writes, as Trainer does
            return None
        save_adapters(unwrapped(self.model), output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_FILE))
        return None

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        model = self.model if model is None else model
        if has_adapter(model) and is_adapter_checkpoint(resume_from_checkpoint):
            load_adapters(unwrapped(model), resume_from_checkpoint, same_order=True)
            return None
        return super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_best_model(self):
        best = self.state.best_model_checkpoint
        if has_adapter(self.model) and best is not None and is_adapter_checkpoint(best):
            load_adapters(unwrapped(self.model), best)
            return None
        return super()._load_best_model()


def adapter_checkpoints(trainer):
    """Give an already-built Trainer (of any Trainer class) adapter-only checkpoints; returns it."""
    cls = type(trainer)
    if not issubclass(cls, UniLoRACheckpointMixin):
        trainer.__class__ = type(f"UniLoRA{cls.__name__}", (UniLoRACheckpointMixin, cls), {})
    return trainer


def _trainer_class():
    try:
        from transformers import Trainer
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("UniLoRATrainer needs transformers: pip install 'unilora_kernels[peft]'") from exc
    return Trainer


def __getattr__(name: str):
    # UniLoRATrainer is built on first use, so importing this module needs no transformers.
    if name == "UniLoRATrainer":
        cls = type("UniLoRATrainer", (UniLoRACheckpointMixin, _trainer_class()), {
            "__doc__": "``transformers.Trainer`` whose checkpoints hold the Uni-LoRA adapter (PEFT format).",
            "__module__": __name__,
        })
        globals()["UniLoRATrainer"] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
