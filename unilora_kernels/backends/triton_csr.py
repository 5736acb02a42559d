"""The CSR of P^T restricted to one layer, which the deterministic backward sums through.

``csr_reduce_kernel`` gives each distinct theta_d index of a layer one lane that adds that
index's layer positions in increasing order, so the gradient does not depend on scheduling.
The CSR is layer-sized (never D-sized), built once per projection by a stable sort and cached.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from typing import Callable, NamedTuple

import torch

from . import LayerProjection
from .triton_launch import recording


class CSR(NamedTuple):
    """P^T restricted to one layer: row u lists the layer positions that read theta_d[rows[u]]."""

    rows: torch.Tensor  # int32 (U,), distinct theta_d indices, increasing
    rowptr: torch.Tensor  # int32 (U + 1,)
    cols: torch.Tensor  # int32 (layer size,), positions in increasing order within a row
    U: int
    max_len: int


CACHE_SIZE = 4096
_cache: "OrderedDict[tuple, tuple]" = OrderedDict()
_lock = threading.Lock()


def version(t: torch.Tensor) -> int:
    try:
        return t._version
    except RuntimeError:  # inference tensors have no version counter
        return -1


def build_csr(index: torch.Tensor) -> CSR:
    """The CSR of the layer's int32 theta_d index (one entry per element of A, then of B)."""
    sorted_j, order = torch.sort(index, stable=True)
    rows, counts = torch.unique_consecutive(sorted_j, return_counts=True)
    rowptr = torch.zeros(rows.numel() + 1, dtype=torch.int32, device=index.device)
    torch.cumsum(counts, 0, out=rowptr[1:])
    return CSR(rows.to(torch.int32), rowptr, order.to(torch.int32), rows.numel(), int(counts.max().item()))


def csr_of(theta: torch.Tensor, proj: LayerProjection,
           layer_index: Callable[[torch.Tensor, LayerProjection], torch.Tensor]) -> CSR:
    """The layer's CSR, from the cache or built from ``layer_index(theta, proj)``.

    Uniform entries are keyed by the index tensors' storage and version and hold weak
    references to them, so a freed or modified table is never served from the cache.
    """
    d = theta.shape[0]
    shape = (proj.r, proj.in_features, proj.out_features, d, str(theta.device))
    if proj.is_hashed:
        key = ("hashed", tuple(proj.hash_params)) + shape
        refs = ()
    else:
        key = ("uniform", proj.idx_a.data_ptr(), proj.idx_b.data_ptr(), version(proj.idx_a),
               version(proj.idx_b)) + shape
        refs = (weakref.ref(proj.idx_a), weakref.ref(proj.idx_b))
    with _lock:
        hit = _cache.get(key)
        if hit is not None and all(r() is not None for r in hit[0]):
            _cache.move_to_end(key)
            return hit[1]
    csr = build_csr(layer_index(theta, proj))
    if not recording():  # a recorded gather filled no index: never cache what it built
        with _lock:
            _cache[key] = (refs, csr)
            for k in [k for k, (rs, _) in _cache.items() if any(r() is None for r in rs)]:
                del _cache[k]
            while len(_cache) > CACHE_SIZE:
                _cache.popitem(last=False)
    return csr


def clear_cache() -> None:
    with _lock:
        _cache.clear()
