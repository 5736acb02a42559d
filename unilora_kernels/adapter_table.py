"""Many adapters of one model: their theta vectors in one ``(capacity, d)`` table.

Every adapter trained with the model's configuration shares its projection (index table, scales,
layer slices), so an adapter is nothing but a d-length vector. The model's own theta_d stays the
parameter ``unilora_theta_d`` (the adapter ``"default"``); the others are rows of the parameter
``unilora_adapter_table`` on the same owner module, which an optimizer takes like any parameter.
The table grows by doubling, so its shape (and a compiled graph's) changes only at a growth.
A mixed batch names one adapter per sequence; kernels read ids: -1 base, 0 default, k table row k-1.
"""

from __future__ import annotations

import json
from typing import Optional, Sequence

import torch
from torch import nn

from .backends import policy

TABLE_NAME = "unilora_adapter_table"
NAMES_NAME = "unilora_adapter_names"  # buffer: the names -> rows map as UTF-8 JSON, so a state dict says who owns a row
DEFAULT = "default"
BASE = "__base__"  # PEFT's name for "no adapter" in a mixed batch
INITIAL_CAPACITY = 4


class AdapterTable:
    """The named rows of the owner's ``unilora_adapter_table`` (one per bank)."""

    def __init__(self, bank, dtype: torch.dtype = torch.float32):
        if dtype not in policy.ADAPTER_TABLE_DTYPES:
            raise TypeError(f"the adapter table is stored in one of {policy.ADAPTER_TABLE_DTYPES}, not {dtype}")
        self.bank = bank
        self._dtype = dtype
        self.rows: dict[str, int] = {}  # name -> row of the table
        self.generation = 0  # bumped by every add/remove: the rows names map to may have changed

    @property
    def dtype(self) -> torch.dtype:
        """The table's dtype as stored: ``model.to(torch.bfloat16)`` casts the parameter, so read it there."""
        table = self.table
        return self._dtype if table is None else table.dtype

    # -- storage ---------------------------------------------------------------------------
    @property
    def table(self) -> Optional[nn.Parameter]:
        return getattr(self.bank.owner, TABLE_NAME, None)

    @property
    def capacity(self) -> int:
        table = self.table
        return 0 if table is None else table.shape[0]

    def table_for(self, theta: torch.Tensor) -> torch.Tensor:
        """The table the kernels read beside ``theta`` (an empty one before the first adapter)."""
        table = self.table
        if table is None:
            return theta.new_empty((0, theta.shape[0]), dtype=self.dtype)
        return table

    def _free_row(self) -> int:
        used = set(self.rows.values())
        free = [i for i in range(self.capacity) if i not in used]
        if free:
            return free[0]
        self._grow(max(INITIAL_CAPACITY, 2 * self.capacity))
        return len(used)

    def _grow(self, capacity: int) -> None:
        """Reallocate the table at ``capacity`` rows (a new parameter: build optimizers afterwards)."""
        theta = self.bank.theta_d
        old = self.table
        with torch.inference_mode(False), torch.no_grad():  # a table made under inference_mode could never train
            new = torch.zeros((capacity, self.bank.d), dtype=self.dtype, device=theta.device)
            if old is not None:
                new[: old.shape[0]].copy_(old.detach())
        self.bank.owner.register_parameter(TABLE_NAME, nn.Parameter(new, requires_grad=theta.requires_grad))

    # -- names -----------------------------------------------------------------------------
    def names(self) -> list:
        return [DEFAULT] + list(self.rows)

    def check_new_name(self, name) -> None:
        check_new_name(name, self.rows)

    def add(self, name: str, theta: torch.Tensor) -> None:
        """Store ``theta`` (checked by the caller: length d, finite) as adapter ``name``."""
        self.check_new_name(name)
        row = self._free_row()
        with torch.inference_mode(False), torch.no_grad():
            self.table[row].copy_(theta.to(self.table.device, self.dtype))
        self.rows[name] = row
        self.generation += 1
        publish_rows(self)

    def remove(self, name: str) -> None:
        if name == DEFAULT:
            raise ValueError(f"{DEFAULT!r} is the model's own theta_d and cannot be removed")
        row = self._row(name)
        del self.rows[name]
        self.generation += 1
        with torch.inference_mode(False), torch.no_grad():
            self.table[row].zero_()
        publish_rows(self)

    def _row(self, name: str) -> int:
        if name not in self.rows:
            raise ValueError(f"unknown adapter {name!r}; adapters: {self.names()} (and {BASE!r} for none)")
        return self.rows[name]

    def theta_of(self, name: str) -> torch.Tensor:
        """Adapter ``name``'s d-length vector (a view: the model's theta_d or a table row)."""
        return self.bank.theta_d if name == DEFAULT else self.table[self._row(name)]


def check_new_name(name, taken) -> None:
    if not isinstance(name, str) or not name:
        raise TypeError(f"an adapter name is a non-empty str, got {name!r}")
    if name in (DEFAULT, BASE) or name in taken:
        raise ValueError(f"adapter name {name!r} is taken ({DEFAULT!r} is the model's own theta_d, {BASE!r} means "
                         f"none; added: {list(taken)})")


_IDS_CACHE_SIZE = 64


def sequence_ids(bank, names: Sequence[str], device) -> torch.Tensor:
    """The kernels' int32 id per sequence: -1 base, 0 default, k > 0 table row k - 1. The same names
    give the same tensor again (until an adapter is added or removed), so what a backend keeps for
    one batch's ids (extension.decode_columns) serves every batch of the same adapters."""
    if isinstance(names, str) or not isinstance(names, (list, tuple)) or not names:
        raise ValueError(f"names must be a non-empty list of adapter names (one per sequence), got {names!r}")
    generation = -1 if bank.adapters is None else bank.adapters.generation
    key = (tuple(names), str(device), generation)
    cached = bank.ids_cache.get(key)
    if cached is not None:
        return cached
    ids = _ids(bank, names, device)
    if len(bank.ids_cache) >= _IDS_CACHE_SIZE:
        bank.ids_cache.clear()
    bank.ids_cache[key] = ids
    return ids


def _ids(bank, names, device) -> torch.Tensor:
    rows = {} if bank.adapters is None else bank.adapters.rows
    ids = []
    for name in names:
        if name == BASE:
            ids.append(-1)
        elif name == DEFAULT:
            ids.append(0)
        elif name in rows:
            ids.append(rows[name] + 1)
        else:
            raise ValueError(f"unknown adapter {name!r}; adapters: {[DEFAULT, *rows]} (and {BASE!r} for none)")
    with torch.inference_mode(False):  # cached and reused outside inference_mode (and saved for backward)
        return torch.tensor(ids, dtype=torch.int32, device=device)


def theta_of(bank, name: str) -> torch.Tensor:
    """Adapter ``name``'s d-length vector: the model's theta_d or a view of its table row."""
    if name == DEFAULT:
        return bank.theta_d
    if bank.adapters is None:
        raise ValueError(f"unknown adapter {name!r}; adapters: [{DEFAULT!r}] (none added)")
    return bank.adapters.theta_of(name)


def memory_of(bank) -> dict:
    """Bytes of the adapter table and per adapter, beside a plain LoRA adapter (fp32 A and B) of the
    same layers; before the first ``add_adapter``, per adapter is theta_d's own size."""
    table = bank.adapters
    itemsize = (bank.theta_d.dtype if table is None else table.dtype).itemsize
    capacity = 0 if table is None else table.capacity
    return {
        "adapters": 1 if table is None else len(table.names()),
        "capacity": capacity,
        "table_bytes": capacity * bank.d * itemsize,
        "bytes_per_adapter": bank.d * itemsize,
        "lora_bytes_per_adapter": bank.D * 4,
    }


def table_for(bank, theta: torch.Tensor) -> torch.Tensor:
    """The table a mixed batch reads beside ``theta``: the bank's, or an empty fp32 one."""
    if bank.adapters is None:
        return theta.new_empty((0, theta.shape[0]), dtype=torch.float32)
    return bank.adapters.table_for(theta)


def table_of(bank, create: bool = False, dtype: Optional[torch.dtype] = None) -> Optional[AdapterTable]:
    """The bank's adapter table (made on first use when ``create``)."""
    if bank.adapters is None and create:
        bank.adapters = AdapterTable(bank, dtype or torch.float32)
    elif dtype is not None and bank.adapters is not None and bank.adapters.dtype != dtype:
        raise ValueError(f"the model's adapter table is {bank.adapters.dtype}; it cannot hold {dtype} adapters")
    return bank.adapters


# --------------------------------------------------------------------------------------------
# the names of the rows in the state dict
# --------------------------------------------------------------------------------------------
def publish_rows(table: AdapterTable) -> None:
    """Store ``table.rows`` in the owner's persistent buffer ``unilora_adapter_names``."""
    data = json.dumps(table.rows, sort_keys=True).encode("utf-8")
    with torch.inference_mode(False):
        buf = torch.tensor(list(data), dtype=torch.uint8, device=table.bank.theta_d.device)
    table.bank.owner.register_buffer(NAMES_NAME, buf, persistent=True)


def _rows_of(buf, where: str) -> dict:
    try:
        rows = json.loads(bytes(buf.detach().cpu().to(torch.uint8).tolist()).decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RuntimeError, TypeError) as exc:
        raise ValueError(f"{where} is not a names -> rows map ({type(exc).__name__}: {exc})") from None
    if not isinstance(rows, dict) or not all(isinstance(k, str) and isinstance(v, int) and v >= 0
                                             for k, v in rows.items()):
        raise ValueError(f"{where} is not a names -> rows map: {str(rows)[:80]}")
    return rows


def _refuse_merged(owner: nn.Module) -> None:
    for name, module in owner.named_modules():
        bank = getattr(module, "bank", None)
        if getattr(module, "merged", False) is True and getattr(bank, "owner", None) is owner:
            raise ValueError(f"load_state_dict into a merged model (layer {name!r} holds B A in its base weight; "
                             "loading would leave unmerge() subtracting another adapter): unmerge() first")


def load_state_dict_hook(owner, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                         error_msgs) -> None:
    """The owner's load_state_dict pre-hook: refuse a merged model; map the incoming table's rows to
    this model's rows by adapter name (adding orders may differ), or refuse other names."""
    _refuse_merged(owner)
    names_key, table_key = prefix + NAMES_NAME, prefix + TABLE_NAME
    if names_key not in state_dict:
        return  # no adapters there (or an older checkpoint): strict loading reports the missing key
    theirs = _rows_of(state_dict[names_key], f"state_dict[{names_key!r}]")
    mine_buf = owner._buffers.get(NAMES_NAME)
    mine = {} if mine_buf is None else _rows_of(mine_buf, f"the model's {NAMES_NAME}")
    if set(theirs) != set(mine):
        raise ValueError(f"the state dict's adapter table holds {sorted(theirs)}, the model's {sorted(mine)}: "
                         "add_adapter/remove_adapter the same names first (their values are then loaded by name)")
    incoming, table = state_dict.get(table_key), owner._parameters.get(TABLE_NAME)
    if mine_buf is None or incoming is None or table is None:
        return  # nothing to map: torch reports missing or unexpected keys
    if incoming.dim() != 2 or incoming.shape[1] != table.shape[1] or any(r >= incoming.shape[0] for r in theirs.values()):
        raise ValueError(f"state_dict[{table_key!r}] has shape {tuple(incoming.shape)}, which does not hold the rows "
                         f"{theirs} of d = {table.shape[1]:,}")
    remapped = incoming.new_zeros(table.shape)
    for name, row in mine.items():
        remapped[row] = incoming[theirs[name]]
    state_dict[table_key] = remapped
    state_dict[names_key] = mine_buf
