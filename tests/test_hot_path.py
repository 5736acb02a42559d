"""The hot path's host work, counted deterministically: package Python calls per layer training step
(forward + backward) through a warm plan, counted by ``benchmarks/host_bench.py``'s counter.

On a GPU the layer step is host-bound, so these counts are its cost model: cpu <= 8 (one C++ call
each way), triton <= 30 (a plan, an autograd.Function and one Python call per kernel launch).
The triton step records its launches instead of running them (``record_launches``), as the
host benchmark does.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import unilora_kernels as uk
from unilora_kernels import backends

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from host_bench import count_package_calls  # noqa: E402

LIMITS = {"cpu": 8, "triton": 30}


def _available(backend: str) -> bool:
    try:
        backends.get_backend(backend, "cpu")
    except backends.BackendNotAvailableError:
        return False
    return True


@pytest.mark.parametrize("projection", ["uniform", "hashed"])
@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("backend, M, fold", [("cpu", 1, None), ("cpu", 64, None), ("triton", 64, None),
                                              ("triton", 8, None), ("triton", 64, "17")])
def test_package_calls_per_layer_training_step(monkeypatch, backend, M, fold, p, projection):
    """(fold: UNILORA_FOLD_MIN_M, the large-M schedule where dropout allows it)"""
    if not _available(backend):
        pytest.skip(f"backend {backend} unavailable here")
    if fold is not None:
        monkeypatch.setenv("UNILORA_FOLD_MIN_M", fold)
    from unilora_kernels.backends import triton_launch

    torch.manual_seed(0)
    layer = uk.UniLoRALinear(nn.Linear(64, 64), r=4, theta_d_length=512, unilora_dropout=p,
                             projection=projection, backend=backend)
    layer.base_layer.requires_grad_(False)
    x = torch.randn(M, 64, requires_grad=True)

    def step():
        layer(x).sum().backward()

    record = triton_launch.record_launches() if backend == "triton" else contextlib.nullcontext()
    with record:
        step()  # builds the plan
        calls = count_package_calls(step)
    assert 0 < calls <= LIMITS[backend], f"{calls} package calls per {backend} training step (limit {LIMITS[backend]})"
    assert layer.theta_d.grad is not None


def test_a_changed_knob_takes_effect_after_clear_plans(monkeypatch):
    """Plans read the environment when they are built: UNILORA_BACKEND changes nothing until
    uk.clear_plans; then the next call resolves again."""
    if not _available("cpu"):
        pytest.skip("the cpu backend is unavailable here")
    layer = uk.UniLoRALinear(nn.Linear(8, 8), r=2, theta_d_length=32)
    layer(torch.randn(3, 8))
    (plan,) = layer._plans.values()
    assert plan.backend == "cpu"
    monkeypatch.setenv("UNILORA_BACKEND", "reference")
    layer(torch.randn(3, 8))
    assert [p.backend for p in layer._plans.values()] == ["cpu"]
    uk.clear_plans(layer)
    layer(torch.randn(3, 8))
    assert [p.backend for p in layer._plans.values()] == ["reference"]
    layer.backend = "cpu"  # setting the attribute drops the plans too
    assert not layer._plans


@pytest.mark.parametrize("backend", ["cpu", "triton", "reference"])
def test_a_layer_that_ran_deep_copies_and_pickles(backend):
    """Plans hold kernels and backend modules, which cannot be copied: ``copy.deepcopy`` (EMA or
    reference models) and ``torch.save`` of a layer that ran take it without its plans, and the copy
    gives the same outputs and gradients with its own theta_d."""
    import copy
    import io

    if not _available(backend):
        pytest.skip(f"backend {backend} unavailable here")
    layer = uk.UniLoRALinear(nn.Linear(12, 10), r=3, theta_d_length=40, backend=backend)
    x = torch.randn(5, 12)
    y = layer(x)
    assert layer._plans
    buf = io.BytesIO()
    torch.save(layer, buf)
    buf.seek(0)
    for clone in (copy.deepcopy(layer), torch.load(buf, weights_only=False)):
        assert not clone._plans and clone.theta_d is not layer.theta_d
        assert torch.equal(clone(x), y)
        clone(x).sum().backward()
        layer.theta_d.grad = None
        layer(x).sum().backward()
        assert torch.equal(clone.theta_d.grad, layer.theta_d.grad)
