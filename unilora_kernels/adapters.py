"""Many adapters in one model: register them, batch them per sequence, train them together.

    unilora_kernels.add_adapter(model, "fr", "adapters/fr")       # a directory, or a theta_d tensor
    with unilora_kernels.adapter_batch(model, ["fr", "default", "__base__", "fr"]):
        out = model.generate(**batch)                              # sequence i runs names[i]

Adapters share the model's projection, so one is a d-length vector, its own parameter
(``adapter_table.py``). Adding or removing one never re-injects or copies the base model; everything
is checked first. To train them, give an optimizer their parameters::

    opt = torch.optim.AdamW(unilora_kernels.adapter_parameters(model), lr=1e-3, weight_decay=0.0)
    unilora_kernels.add_adapter(model, "de", theta)                           # added later:
    opt.add_param_group({"params": unilora_kernels.adapter_parameters(model, ["de"])})

An adapter added after the optimizer was built is not in it (nothing can tell: the optimizer holds
its own list) and stays untrained until ``add_param_group``.
"""

from __future__ import annotations

import contextlib
import os
from typing import Optional, Sequence, Union

import torch
from torch import nn

from . import batch_state
from .adapter_table import DEFAULT, check_new_name, memory_of, parameters_of, sequence_ids, table_of, theta_of
from .config import UniLoRAConfig, read_adapter_config
from .model import find_bank, iter_layers
from .peft_io import check_same_adapter, checked_theta, read_adapter_tensors, split_keys


def add_adapter(model: nn.Module, name: str, source: Union[str, os.PathLike, torch.Tensor], *,
                dtype: Optional[torch.dtype] = None) -> None:
    """Register adapter ``name`` from ``source``: an adapter directory (saved by this package or by
    PEFT) or a theta_d tensor of length d. Its r, d, proj_seed, projection, target layers and D must be
    the model's. ``dtype`` (torch.float32, or torch.bfloat16 to halve the memory) is fixed by the first
    adapter added. The adapter is a new parameter (``model.unilora_adapter_<slot>``): an optimizer built
    before has no state for it and does not train it until given it (``adapter_parameters``)."""
    bank = find_bank(model)
    table = table_of(bank)
    check_new_name(name, {} if table is None else table.slots)
    if bank.config.bias != "none":
        raise ValueError(f"the model's adapter trains biases (bias={bank.config.bias!r}); adapters in one batch "
                         "share the base layers, so mixed batches need bias='none'")
    if isinstance(source, torch.Tensor):
        theta = _checked_tensor(source, bank.d)
    else:
        theta = theta_from_dir(model, bank, source)
    table_of(bank, create=True, dtype=dtype).add(name, theta)


def _checked_tensor(theta: torch.Tensor, d: int) -> torch.Tensor:
    if not theta.is_floating_point() or theta.dim() != 1:
        raise TypeError(f"an adapter tensor is a 1-D float theta_d, got {theta.dtype} of shape {tuple(theta.shape)}")
    if theta.numel() != d:
        raise ValueError(f"the adapter has d = {theta.numel():,}, the model's theta_d_length is {d:,}")
    if not bool(torch.isfinite(theta).all()):
        raise ValueError("the adapter's theta_d contains NaN or inf values")
    return theta.detach()


def theta_from_dir(model: nn.Module, bank, path) -> torch.Tensor:
    """Adapter directory ``path``'s theta_d, checked against the model (its configuration and indices, no
    trained biases, d); reads only."""
    where = os.fspath(path)
    config = UniLoRAConfig.from_peft_config(read_adapter_config(path))
    tensors = read_adapter_tensors(path)
    index_keys, bias_keys = split_keys(tensors, where)
    if bias_keys:
        raise ValueError(f"{where}: the adapter trains biases ({sorted(bias_keys)[:2]}...); adapters in one batch "
                         "share the base layers' biases")
    check_same_adapter(model, bank, config, index_keys, where)
    return checked_theta(tensors, config.theta_d_length, where)


def remove_adapter(model: nn.Module, name: str) -> None:
    """Forget adapter ``name``: its parameter leaves the model (an optimizer holding it keeps a tensor
    no forward reads: rebuild the optimizer, or drop it from its group)."""
    bank = find_bank(model)
    if batch_state.open_anywhere(bank):
        raise ValueError("remove_adapter while an adapter_batch is open on the model (in any thread): leave it first")
    table = table_of(bank)
    if table is None:
        if name == DEFAULT:
            raise ValueError(f"{DEFAULT!r} is the model's own theta_d and cannot be removed")
        raise ValueError(f"unknown adapter {name!r}; adapters: [{DEFAULT!r}]")
    table.remove(name)


def adapter_names(model: nn.Module) -> list:
    """``["default", <added adapters in order>]``."""
    table = table_of(find_bank(model))
    return [DEFAULT] if table is None else table.names()


def adapter_memory(model: nn.Module) -> dict:
    """Bytes of the added adapters (``table_bytes``; ``capacity``: how many) and per adapter, in their
    dtype, beside plain LoRA's (fp32 A and B) for the same layers."""
    return memory_of(find_bank(model))


def adapter_theta(model: nn.Module, name: str = DEFAULT) -> torch.Tensor:
    """Adapter ``name``'s theta_d: its parameter (the model's ``unilora_theta_d`` for "default")."""
    return theta_of(find_bank(model), name)


def adapter_parameters(model: nn.Module, names: Optional[Sequence[str]] = None) -> list:
    """The parameters of adapters ``names`` (default: "default" and every added one, in adding order),
    for an optimizer or ``optimizer.add_param_group({"params": ...})``."""
    return parameters_of(find_bank(model), names)


@contextlib.contextmanager
def adapter_batch(model: nn.Module, names: Sequence[str]):
    """Run sequence i of every forward inside (``generate()`` included) with adapter ``names[i]``
    (``"__base__"``: the base model alone). A batch of k times as many sequences (``generate`` with
    ``num_beams=k`` or ``num_return_sequences=k``) runs ``names[i]`` on rows i*k .. i*k+k-1.

    The batch is the state of this call, not of the model: it holds in the thread (or asyncio task)
    that entered it, so threads serving one model each in their own ``adapter_batch`` get what each
    would get alone, and contexts left in any order remove only their own batch (the innermost one
    open in a thread is the one that runs). A thread started inside sees no batch: enter it there.

    In training mode each row's gradient goes to its own adapter's parameter (``adapter_theta``) and
    only the batch's adapters get one: the others keep grad None, so an optimizer leaves them as they
    are, and the step's cost follows the batch, not how many adapters are registered. Change adapters
    through those parameters (optimizer steps, ``copy_`` under ``torch.no_grad()``) or ``add_adapter``/``remove_adapter``:
    the cpu backend keeps decode copies that follow their version counters and are dropped after
    every ``torch.optim.Optimizer`` step (fused ones included); writes through ``.data`` bypass them."""
    bank = find_bank(model)
    ids = sequence_ids(bank, names, bank.theta_d.device)
    if any(layer.merged for _, layer in iter_layers(model)):
        raise ValueError("adapter_batch needs unmerged layers (a merged layer holds the default adapter): unmerge() first")
    state = batch_state.enter(bank, names, ids)
    try:
        yield ids
    finally:
        batch_state.leave(state)
