"""The one trainable vector theta_d, its projection, and the module that owns them.

theta_d (fp32, shape (d,)) and the shared scale table are registered once, on an *owner*
module (the model passed to ``inject``, or a standalone ``UniLoRALinear``), as the parameter
``unilora_theta_d`` and the non-persistent buffer ``unilora_scales``. They are a parameter and
a buffer rather than a child module so that containers such as ``nn.Sequential`` keep their
forward, and so that ``model.to()`` moves them exactly once (one scale table per device, not
one per layer). Layers reach them through a ``UniLoRABank``, a plain object.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import nn

from . import adapter_table, batch_state, projection as P
from .config import UniLoRAConfig

THETA_NAME = "unilora_theta_d"
SCALES_NAME = "unilora_scales"


def init_theta(d: int, bound: float, init_weights: bool, device=None) -> torch.Tensor:
    """PEFT's initialisation: uniform(-bound, bound), or randn when init_weights is False."""
    theta = torch.empty(d, dtype=torch.float32)
    if init_weights:
        nn.init.uniform_(theta, -bound, bound)
    else:
        theta.normal_()
    return theta.to(device) if device is not None else theta


class UniLoRABank:
    """Projection metadata plus access to the owner's theta_d and scale table."""

    def __init__(self, owner: nn.Module, config: UniLoRAConfig, D: int, index: Optional[np.ndarray] = None):
        d = config.theta_d_length
        P.check_sizes(D, d)
        self.owner = owner
        self.config = config
        self.D, self.d = D, d
        self.projection = config.projection
        self._table: Optional[torch.Tensor] = None
        self.adapters = None  # the AdapterTable: added adapters sharing this projection (adapter_table.py)
        self._snapshot: Optional[torch.Tensor] = None  # a copy of theta_d (theta_snapshot)
        self.open_batches = 0  # adapter_batch contexts open on this bank, all threads (batch_state.py)
        self.ids_cache: dict = {}  # names -> ids tensor (adapter_table.sequence_ids)
        self.stack_cache: dict = {}  # a batch's adapters -> their stacked table, grad off (adapter_table.batch_table)
        self.compile_pads: list = []  # zero rows a compiled batch's table is padded with (adapter_table.compile_rows)
        # Indices the seed does not regenerate (a checkpoint's or a PEFT model's own) must be
        # saved with the adapter (peft_io.save_adapter).
        self.indices_from_seed = True
        if self.projection == "uniform":
            if index is None:
                index = P.generate_index(D, d, config.proj_seed)
            else:
                self.indices_from_seed = bool(np.array_equal(index, P.generate_index(D, d, config.proj_seed)))
            self._table = torch.from_numpy(index)
            scales = P.uniform_scales(index, d)
            self.key = None
        else:
            self.key = P.splitmix64(config.proj_seed)
            scales = P.hashed_scales(D, d)
        self._exact_scales = scales  # fp32 on CPU (d floats): the table restored after a cast of the owner

    def attach(self, theta: torch.Tensor | nn.Parameter, device=None) -> None:
        """Register theta_d and the scale table on the owner (once)."""
        param = theta if isinstance(theta, nn.Parameter) else nn.Parameter(theta)
        self.owner.register_parameter(THETA_NAME, param)
        scales = self._exact_scales if device is None else self._exact_scales.to(device)
        self.owner.register_buffer(SCALES_NAME, scales, persistent=False)
        # refuses a merged model, maps the adapters' parameters by name (adapter_table.py)
        self.owner.register_load_state_dict_pre_hook(adapter_table.load_state_dict_hook)

    def theta_snapshot(self) -> torch.Tensor:
        """A copy of theta_d as it is now, shared by the layers merged while it does not change
        (``UniLoRALinear.merge`` keeps it so that ``unmerge`` subtracts exactly what was added)."""
        theta = self.theta_d.detach()
        hit = self._snapshot  # compared by value: writes through .data bump no version counter
        if hit is not None and hit.dtype == theta.dtype and hit.device == theta.device and torch.equal(hit, theta):
            return hit
        with torch.inference_mode(False), torch.no_grad():
            self._snapshot = theta.clone()
        return self._snapshot

    @property
    def batch(self) -> Optional[torch.Tensor]:
        """The per-sequence adapter ids of this thread's innermost ``adapter_batch`` (None outside)."""
        state = batch_state.current(self)
        return None if state is None else state.ids

    @property
    def theta_d(self) -> nn.Parameter:
        return getattr(self.owner, THETA_NAME)

    @property
    def scales(self) -> torch.Tensor:
        """The fp32 scale table on the owner's device. ``model.half()`` or ``.to(dtype)`` casts it
        like any float buffer; it is then put back exactly, once, from the bank's own copy."""
        table = getattr(self.owner, SCALES_NAME)
        if table.dtype != torch.float32:
            table = self._exact_scales.to(table.device)
            setattr(self.owner, SCALES_NAME, table)
        return table

    def hash_params(self, offset: int) -> list:
        return [] if self.projection == "uniform" else [self.D, offset, self.key]

    def layer_indices(self, offset: int, r: int, in_f: int, out_f: int):
        """Views of this layer's slice of the int32 index table: A (r, in) then B (out, r)."""
        if self._table is None:
            raise RuntimeError("the index table was already handed out; create layers before release_table()")
        n_a, n_b = r * in_f, out_f * r
        if offset + n_a + n_b > self.D:
            raise ValueError(f"layer slice [{offset}, {offset + n_a + n_b}) exceeds D = {self.D}")
        idx_a = self._table[offset : offset + n_a].view(r, in_f)
        idx_b = self._table[offset + n_a : offset + n_a + n_b].view(out_f, r)
        return idx_a, idx_b

    def release_table(self) -> None:
        """Drop the bank's handle on the table; the layers' views keep what they use."""
        self._table = None

    def __repr__(self) -> str:
        return f"UniLoRABank(D={self.D:,}, d={self.d:,}, projection={self.projection}, proj_seed={self.config.proj_seed})"
