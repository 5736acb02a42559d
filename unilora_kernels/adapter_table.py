"""Many adapters of one model: each added adapter its own ``(d,)`` parameter on the bank's owner.

Every adapter trained with the model's configuration shares its projection (index table, scales,
layer slices), so an adapter is nothing but a d-length vector. The model's own theta_d stays the
parameter ``unilora_theta_d`` (the adapter ``"default"``); an added adapter is the parameter
``unilora_adapter_<slot>`` on the same owner (names are any strings, so they map to slots in the
persistent buffer ``unilora_adapter_names``). A parameter per adapter is what gives training the
semantics of training each adapter alone: a mixed batch stacks only its own adapters into the
``(U, d)`` table the kernels read, so an adapter absent from the batch gets no gradient (grad None:
no torch optimizer moves it), the backward's cost follows U and not the registry, and
``add_adapter`` always makes a new parameter (no optimizer state inherited from a removed one).
A batch's ids: -1 base, 0 default, k the k-th distinct added adapter of the batch (row k - 1).
"""

from __future__ import annotations

import json
from typing import Optional, Sequence

import torch
from torch import nn

from .backends import policy

PARAM_PREFIX = "unilora_adapter_"  # + slot: an added adapter's parameter on the owner
NAMES_NAME = "unilora_adapter_names"  # buffer: the names -> slots map as UTF-8 JSON, so a state dict says who is who
DEFAULT = "default"
BASE = "__base__"  # PEFT's name for "no adapter" in a mixed batch


def param_name(slot: int) -> str:
    return f"{PARAM_PREFIX}{slot}"


class AdapterTable:
    """The named adapter parameters of one bank (``slots``: name -> slot, in adding order)."""

    def __init__(self, bank, dtype: torch.dtype = torch.float32):
        if dtype not in policy.ADAPTER_TABLE_DTYPES:
            raise TypeError(f"adapters are stored in one of {policy.ADAPTER_TABLE_DTYPES}, not {dtype}")
        self.bank = bank
        self._dtype = dtype
        self.slots: dict[str, int] = {}  # name -> slot of its parameter
        self.keys: dict[str, str] = {}  # name -> its parameter's name on the owner
        self.generation = 0  # bumped by every add/remove: the parameters names map to may have changed

    @property
    def dtype(self) -> torch.dtype:
        """The adapters' dtype as stored: ``model.to(torch.bfloat16)`` casts the parameters, so read one."""
        for name in self.slots:
            return self.param(name).dtype
        return self._dtype

    @property
    def capacity(self) -> int:
        """How many adapters are stored (a parameter each: nothing is preallocated)."""
        return len(self.slots)

    def param(self, name: str) -> nn.Parameter:
        key = self.keys.get(name)
        if key is None:
            self._slot(name)  # the error naming the adapters
        return self.bank.owner._parameters[key]  # read there: model.to() or load_state_dict(assign=True) may replace it

    def params(self) -> list:
        return [self.param(n) for n in self.slots]

    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.params())

    # -- names -----------------------------------------------------------------------------
    def names(self) -> list:
        return [DEFAULT] + list(self.slots)

    def check_new_name(self, name) -> None:
        check_new_name(name, self.slots)

    def add(self, name: str, theta: torch.Tensor) -> None:
        """Store ``theta`` (checked by the caller: length d, finite) as adapter ``name``: a new parameter,
        so no optimizer holds state for it (add it to one: ``adapter_parameters`` / ``add_param_group``)."""
        self.check_new_name(name)
        used = set(self.slots.values())
        slot = next(i for i in range(len(used) + 1) if i not in used)
        ref = self.bank.theta_d
        with torch.inference_mode(False), torch.no_grad():  # made under inference_mode it could never train
            value = theta.detach().to(device=ref.device, dtype=self.dtype).clone()
        self.bank.owner.register_parameter(param_name(slot), nn.Parameter(value, requires_grad=ref.requires_grad))
        self.slots[name] = slot
        self.keys[name] = param_name(slot)
        self.generation += 1
        publish_slots(self)

    def remove(self, name: str) -> None:
        if name == DEFAULT:
            raise ValueError(f"{DEFAULT!r} is the model's own theta_d and cannot be removed")
        slot = self._slot(name)
        del self.slots[name], self.keys[name]
        delattr(self.bank.owner, param_name(slot))  # an optimizer still holding it keeps a detached tensor
        self.generation += 1
        publish_slots(self)

    def _slot(self, name: str) -> int:
        if name not in self.slots:
            raise ValueError(f"unknown adapter {name!r}; adapters: {self.names()} (and {BASE!r} for none)")
        return self.slots[name]

    def theta_of(self, name: str) -> nn.Parameter:
        """Adapter ``name``'s parameter (the model's theta_d for "default")."""
        return self.bank.theta_d if name == DEFAULT else self.param(name)


def check_new_name(name, taken) -> None:
    if not isinstance(name, str) or not name:
        raise TypeError(f"an adapter name is a non-empty str, got {name!r}")
    if name in (DEFAULT, BASE) or name in taken:
        raise ValueError(f"adapter name {name!r} is taken ({DEFAULT!r} is the model's own theta_d, {BASE!r} means "
                         f"none; added: {list(taken)})")


def batch_adapters(names: Sequence[str]) -> tuple:
    """The distinct added adapters of a batch in first-appearance order: row k - 1 of its table is
    the adapter of id k (repeating every name k times, as beams do, keeps the order)."""
    return tuple(dict.fromkeys(n for n in names if n != BASE and n != DEFAULT))


_IDS_CACHE_SIZE = 64


def sequence_ids(bank, names: Sequence[str], device) -> torch.Tensor:
    """The kernels' int32 id per sequence: -1 base, 0 default, k > 0 the batch's k-th distinct added
    adapter (``batch_adapters``). The same names give the same tensor again (until an adapter is added
    or removed), so what a backend keeps for one batch's ids (extension.decode_columns) serves every
    batch of the same adapters."""
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
    slots = {} if bank.adapters is None else bank.adapters.slots
    for name in names:
        if name not in slots and name != BASE and name != DEFAULT:
            raise ValueError(f"unknown adapter {name!r}; adapters: {[DEFAULT, *slots]} (and {BASE!r} for none)")
    local = {name: k + 1 for k, name in enumerate(batch_adapters(names))}
    ids = [-1 if n == BASE else 0 if n == DEFAULT else local[n] for n in names]
    with torch.inference_mode(False):  # cached and reused outside inference_mode (and saved for backward)
        return torch.tensor(ids, dtype=torch.int32, device=device)


def theta_of(bank, name: str) -> torch.Tensor:
    """Adapter ``name``'s parameter: the model's theta_d or the added adapter's own."""
    if name == DEFAULT:
        return bank.theta_d
    if bank.adapters is None:
        raise ValueError(f"unknown adapter {name!r}; adapters: [{DEFAULT!r}] (none added)")
    return bank.adapters.theta_of(name)


def parameters_of(bank, names: Optional[Sequence[str]] = None) -> list:
    """The parameters of adapters ``names`` (default: "default" and every added one, in adding order)."""
    if names is None:
        names = [DEFAULT] + ([] if bank.adapters is None else list(bank.adapters.slots))
    elif isinstance(names, str) or not isinstance(names, (list, tuple)):
        raise TypeError(f"names must be a list of adapter names, got {names!r}")
    return [theta_of(bank, n) for n in names]


def memory_of(bank) -> dict:
    """Bytes of the added adapters and per adapter, beside a plain LoRA adapter (fp32 A and B) of the
    same layers; before the first ``add_adapter``, per adapter is theta_d's own size."""
    table = bank.adapters
    itemsize = (bank.theta_d.dtype if table is None else table.dtype).itemsize
    return {
        "adapters": 1 if table is None else len(table.names()),
        "capacity": 0 if table is None else table.capacity,
        "table_bytes": 0 if table is None else table.nbytes(),
        "bytes_per_adapter": bank.d * itemsize,
        "lora_bytes_per_adapter": bank.D * 4,
    }


# --------------------------------------------------------------------------------------------
# the (U, d) table of one batch
# --------------------------------------------------------------------------------------------
_STACK_CACHE_SIZE = 64


def batch_table(bank, state, theta: torch.Tensor) -> torch.Tensor:
    """The ``(U, d)`` table a mixed batch (``batch_state.BatchState``) reads beside ``theta``: row
    k - 1 is ``state.adapters[k - 1]``'s parameter (``state.params``). With grad on it is a
    ``torch.stack`` of them, so autograd hands each row's gradient to its own parameter and none to
    the adapters absent from the batch. With grad off (serving) the stack is kept per set of adapters
    (``bank.stack_cache``; the batch keeps its entry, so later layer calls skip the lookup) and
    rebuilt in place (its version bumped, so decode columns built from it are dropped too) once a
    parameter's version changes or any optimizer steps; ``model.to()`` drops it (``drop_stacks``);
    writes through ``.data`` are not seen."""
    table, adapters, params = bank.adapters, state.adapters, state.params
    if torch.compiler.is_compiling():
        return _compiled_table(bank, state, theta)
    if not adapters:
        return theta.new_zeros((0, bank.d), dtype=torch.float32 if table is None else table.dtype)
    if torch.is_grad_enabled():
        return torch.stack(params)
    try:
        key = (policy.optimizer_steps(), [p._version for p in params])  # fused steps bump no version
    except RuntimeError:  # an inference tensor: no version counter to key a cache on
        return torch.stack(params)
    entry = state.stack
    if entry is None:
        where = (adapters, table.generation)
        entry = bank.stack_cache.get(where)
        if entry is None:
            if len(bank.stack_cache) >= _STACK_CACHE_SIZE:
                bank.stack_cache.clear()  # batches holding an entry keep it (still checked per call)
            entry = bank.stack_cache[where] = [None, None]  # [key, stack]
        state.stack = entry
    if entry[0] == key:
        return entry[1]
    if params[0].is_cuda and torch.cuda.is_current_stream_capturing():
        return torch.stack(params)  # a CUDA graph replays this stack, so it reads the parameters as they are then
    with torch.inference_mode(False), torch.no_grad():  # the copy outlives this call: no inference tensor
        fresh = torch.stack(params)
        old = entry[1]
        if old is not None and old.shape == fresh.shape and old.dtype == fresh.dtype and old.device == fresh.device:
            old.copy_(fresh)  # in place: its version moves, so whatever was keyed on it is stale
            fresh = old
    entry[0], entry[1] = key, fresh
    return fresh


def drop_stacks(bank) -> None:
    """Forget every kept stack (``model.to()`` changes the parameters' data without a version bump)."""
    for entry in bank.stack_cache.values():
        entry[0] = entry[1] = None
    bank.stack_cache.clear()


def compile_rows(bank, params: tuple) -> tuple:
    """What a compiled forward with grad off stacks: ``params`` (no copy, so nothing goes stale) padded
    with distinct zero parameters like them to a power of two >= 4. Dynamo then guards on the row count
    and each row's metadata, not on the batch's names, so batches of other adapters (up to the same
    bucket) run the same graph."""
    if bank.adapters is None:
        return ()
    n = max(4, 1 << max(len(params) - 1, 0).bit_length())
    ref = params[0] if params else bank.theta_d
    pads = bank.compile_pads
    dtype = bank.adapters.dtype
    if (len(pads) < n or pads[0].dtype != dtype or pads[0].device != ref.device
            or pads[0].requires_grad != ref.requires_grad):
        with torch.inference_mode(False), torch.no_grad():
            pads[:] = [nn.Parameter(torch.zeros(bank.d, dtype=dtype, device=ref.device), ref.requires_grad)
                       for _ in range(n)]
    return params + tuple(pads[len(params):n])


def _compiled_table(bank, state, theta):
    if torch.is_grad_enabled():  # in the graph, so that each row's gradient reaches its parameter
        if not state.params:
            dtype = torch.float32 if bank.adapters is None else bank.adapters.dtype
            return theta.new_zeros((0, bank.d), dtype=dtype)
        return torch.stack(state.params)
    if not state.compile_rows:
        return theta.new_zeros((0, bank.d), dtype=torch.float32)
    return torch.stack(state.compile_rows)


def table_of(bank, create: bool = False, dtype: Optional[torch.dtype] = None) -> Optional[AdapterTable]:
    """The bank's adapter registry (made on first use when ``create``)."""
    if bank.adapters is None and create:
        bank.adapters = AdapterTable(bank, dtype or torch.float32)
    elif dtype is not None and bank.adapters is not None and bank.adapters.slots and bank.adapters.dtype != dtype:
        raise ValueError(f"the model's adapters are {bank.adapters.dtype}; it cannot hold {dtype} adapters")
    if dtype is not None and bank.adapters is not None and not bank.adapters.slots:
        if dtype not in policy.ADAPTER_TABLE_DTYPES:
            raise TypeError(f"adapters are stored in one of {policy.ADAPTER_TABLE_DTYPES}, not {dtype}")
        bank.adapters._dtype = dtype  # no adapter left: the next one sets the dtype again
    return bank.adapters


# --------------------------------------------------------------------------------------------
# the names of the adapters in the state dict
# --------------------------------------------------------------------------------------------
def publish_slots(table: AdapterTable) -> None:
    """Store ``table.slots`` in the owner's persistent buffer ``unilora_adapter_names``."""
    data = json.dumps(table.slots, sort_keys=True).encode("utf-8")
    with torch.inference_mode(False):
        buf = torch.tensor(list(data), dtype=torch.uint8, device=table.bank.theta_d.device)
    table.bank.owner.register_buffer(NAMES_NAME, buf, persistent=True)


def _slots_of(buf, where: str) -> dict:
    try:
        slots = json.loads(bytes(buf.detach().cpu().to(torch.uint8).tolist()).decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RuntimeError, TypeError) as exc:
        raise ValueError(f"{where} is not a names -> slots map ({type(exc).__name__}: {exc})") from None
    if not isinstance(slots, dict) or not all(isinstance(k, str) and isinstance(v, int) and v >= 0
                                              for k, v in slots.items()):
        raise ValueError(f"{where} is not a names -> slots map: {str(slots)[:80]}")
    return slots


def _refuse_merged(owner: nn.Module) -> None:
    for name, module in owner.named_modules():
        bank = getattr(module, "bank", None)
        if getattr(module, "merged", False) is True and getattr(bank, "owner", None) is owner:
            raise ValueError(f"load_state_dict into a merged model (layer {name!r} holds B A in its base weight; "
                             "loading would leave unmerge() subtracting another adapter): unmerge() first")


def load_state_dict_hook(owner, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                         error_msgs) -> None:
    """The owner's load_state_dict pre-hook: refuse a merged model; move each incoming adapter to this
    model's parameter of the same name (adding orders, hence slots, may differ), or refuse other names."""
    _refuse_merged(owner)
    names_key = prefix + NAMES_NAME
    if names_key not in state_dict:
        return  # no adapters there (or an older checkpoint): strict loading reports the missing key
    theirs = _slots_of(state_dict[names_key], f"state_dict[{names_key!r}]")
    mine_buf = owner._buffers.get(NAMES_NAME)
    mine = {} if mine_buf is None else _slots_of(mine_buf, f"the model's {NAMES_NAME}")
    if set(theirs) != set(mine):
        raise ValueError(f"the state dict holds the adapters {sorted(theirs)}, the model {sorted(mine)}: "
                         "add_adapter/remove_adapter the same names first (their values are then loaded by name)")
    incoming = {}
    for name, slot in theirs.items():
        key = prefix + param_name(slot)
        if key in state_dict:
            incoming[name] = state_dict.pop(key)
    for name, value in incoming.items():
        own = owner._parameters.get(param_name(mine[name]))
        if own is not None and tuple(value.shape) != tuple(own.shape):
            raise ValueError(f"state_dict[{prefix + param_name(theirs[name])!r}] (adapter {name!r}) has shape "
                             f"{tuple(value.shape)}, the model's adapter {tuple(own.shape)}")
        state_dict[prefix + param_name(mine[name])] = value
    if mine_buf is not None:
        state_dict[names_key] = mine_buf
