"""Which adapter each sequence of a forward runs: the state of the call, not of the model.

``adapter_batch`` pushes a ``BatchState`` onto a stack held in a ``ContextVar``, so each thread
(and each asyncio task) sees only the batches it entered itself: two threads serving one model
cannot see each other's names, and contexts exited in any order remove exactly their own entry.
``ACTIVE`` maps each bank to the innermost batch of the current context; ``UniLoRALinear.forward``
reads it with two C-level lookups (no package call on the plain path).

A new thread starts with no batch (Python threads do not inherit the context); so does an autograd
device thread (a CUDA backward), which matters only for forwards recomputed there (gradient
checkpointing on CUDA): enter ``adapter_batch`` inside the checkpointed function in that case.
"""

from __future__ import annotations

import contextvars
import threading
from typing import Optional

import torch

from .adapter_table import batch_adapters, compile_rows, sequence_ids

_STACK: contextvars.ContextVar = contextvars.ContextVar("unilora_adapter_batches", default=())
# bank -> its innermost BatchState in this context; always replaced, never mutated (the default is shared)
ACTIVE: contextvars.ContextVar = contextvars.ContextVar("unilora_active_batch", default={})

_LOCK = threading.Lock()
_OPEN = "open_batches"  # bank attribute: batches open on it in any thread (remove_adapter refuses then)


class BatchState:
    """One ``adapter_batch``: its names, their ids, the distinct added adapters they name (id k is
    ``adapters[k - 1]``) and their parameters, and the ids of batches that are a multiple of it."""

    __slots__ = ("bank", "names", "ids", "adapters", "params", "compile_rows", "stack", "_by_rows")

    def __init__(self, bank, names: tuple, ids: torch.Tensor):
        self.bank = bank
        self.names = names
        self.ids = ids
        self.adapters = batch_adapters(names)
        table = bank.adapters
        # resolved here, in eager code: a compiled forward then reads tensors, not the names -> slots map
        self.params = tuple([table.param(n) for n in self.adapters]) if self.adapters else ()
        self.compile_rows = compile_rows(bank, self.params)
        self.stack = None  # its entry of bank.stack_cache, once looked up (adapter_table.batch_table)
        self._by_rows = {len(names): ids}

    def ids_for(self, rows: int) -> Optional[torch.Tensor]:
        """The ids of a batch of ``rows`` sequences: the names' own, or, when ``rows`` is k times as
        many (``generate(num_beams=k)`` / ``num_return_sequences=k`` expand with repeat_interleave),
        each name repeated k times; None when ``rows`` is no multiple."""
        ids = self._by_rows.get(rows)
        if ids is not None:
            return ids
        S = len(self.names)
        if rows <= 0 or rows % S:
            return None
        k = rows // S
        if torch.compiler.is_compiling():  # a traced value must not be cached for eager calls
            return self.ids.repeat_interleave(k)
        # Built from the names (cached per list), so the decode column cache sees one tensor per batch.
        ids = sequence_ids(self.bank, [n for n in self.names for _ in range(k)], self.ids.device)
        self._by_rows[rows] = ids
        return ids


def _publish(stack: tuple) -> None:
    _STACK.set(stack)
    ACTIVE.set({s.bank: s for s in stack})  # later (inner) entries win


def enter(bank, names, ids: torch.Tensor) -> BatchState:
    state = BatchState(bank, tuple(names), ids)
    with _LOCK:
        setattr(bank, _OPEN, getattr(bank, _OPEN, 0) + 1)
    _publish(_STACK.get() + (state,))
    return state


def leave(state: BatchState) -> None:
    """Remove ``state`` (and only it) from this context's stack, whatever the order of exits."""
    stack = _STACK.get()
    if any(s is state for s in stack):
        _publish(tuple(s for s in stack if s is not state))
    with _LOCK:
        setattr(state.bank, _OPEN, getattr(state.bank, _OPEN, 1) - 1)


def current(bank) -> Optional[BatchState]:
    """The innermost batch of this context on ``bank`` (None outside ``adapter_batch``)."""
    return ACTIVE.get().get(bank)


def open_anywhere(bank) -> bool:
    """Whether any thread or context is inside an ``adapter_batch`` on ``bank``."""
    return getattr(bank, _OPEN, 0) > 0
