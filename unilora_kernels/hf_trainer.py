"""Hugging Face ``Trainer`` with Uni-LoRA: checkpoints and ``save_model`` hold the adapter, not the base.

The one line a user changes::

    trainer = UniLoRATrainer(model=model, args=args, train_dataset=data)  # instead of Trainer(...)

or, for any Trainer subclass (trl's ``SFTTrainer``, ``Seq2SeqTrainer``), after building it::

    adapter_checkpoints(trainer)

Every ``checkpoint-N/`` then holds ``adapter_config.json`` + ``adapter_model.safetensors``
(PEFT's format, what ``save_adapter`` writes) beside Trainer's optimizer, scheduler and RNG
files, and ``resume_from_checkpoint`` / ``load_best_model_at_end`` load the adapter back.

Why override Trainer's ``_save`` / ``_load_from_checkpoint`` / ``_load_best_model`` rather than
add a callback: Trainer writes the full weights in ``_save`` before any callback runs, and
resuming accepts an adapter-only checkpoint only for a ``peft.PeftModel``; a callback could
neither avoid the full copy nor resume. Each override defers to Trainer's own method when the
model carries no Uni-LoRA adapter (or the checkpoint holds full weights).
"""

from __future__ import annotations

import os

import torch
from torch import nn

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


class UniLoRACheckpointMixin:
    """Put before a ``transformers.Trainer`` class in the bases (``UniLoRATrainer`` does)."""

    def _save(self, output_dir=None, state_dict=None):
        if not has_adapter(self.model):
            return super()._save(output_dir, state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:  # only the main process writes, as Trainer does
            return None
        save_adapter(unwrapped(self.model), output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_FILE))
        return None

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        model = self.model if model is None else model
        if has_adapter(model) and is_adapter_checkpoint(resume_from_checkpoint):
            load_adapter(unwrapped(model), resume_from_checkpoint)
            return None
        return super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_best_model(self):
        best = self.state.best_model_checkpoint
        if has_adapter(self.model) and best is not None and is_adapter_checkpoint(best):
            load_adapter(unwrapped(self.model), best)
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
