"""Forward and backward never read a tensor's value on the host: no GPU sync, and nothing that a
CUDA-graph capture would freeze (issue: the hot path). A ``TorchFunctionMode`` spies on every
sync-prone call (``.item()``, ``bool(t)``, ``int(t)``, ``.tolist()``, ``.cpu()``, ``.nonzero()``, ...)
made from the package's own code through the Triton path (the interpreter on CPU), uniform and
hashed, dropout on and off, and inside ``adapter_batch``.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

import unilora_kernels as uk
from unilora_kernels import backends

from conftest import tiny_llama

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
try:
    backends.get_backend("triton", DEVICE)
    _REASON = None
except backends.BackendNotAvailableError as exc:
    _REASON = str(exc)
pytestmark = pytest.mark.skipif(_REASON is not None, reason=f"triton backend unavailable on {DEVICE}: {_REASON}")

PACKAGE = os.path.dirname(uk.__file__) + os.sep
TORCH = os.path.dirname(torch.__file__) + os.sep
SYNC_PRONE = {"item", "tolist", "__bool__", "__int__", "__index__", "__float__", "cpu", "nonzero", "numpy",
              "unique", "equal", "unique_consecutive", "argwhere", "masked_select"}
# Hands CPU tensors to the Triton interpreter as numpy aliases: interpreter-only, never on a GPU.
ALLOWED = {"interpreter_alias"}


class SyncSpy(TorchFunctionMode):
    """Records sync-prone calls whose first caller outside torch is package code."""

    def __init__(self):
        super().__init__()
        self.hits: list = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in SYNC_PRONE:
            frame = sys._getframe(1)
            while frame is not None and frame.f_code.co_filename.startswith(TORCH):
                frame = frame.f_back
            if frame is not None and frame.f_code.co_filename.startswith(PACKAGE) and \
                    frame.f_code.co_name not in ALLOWED:
                where = f"{os.path.relpath(frame.f_code.co_filename, PACKAGE)}:{frame.f_lineno} {frame.f_code.co_name}"
                self.hits.append(f"{name} from {where}")
        return func(*args, **(kwargs or {}))


def test_the_spy_reports_host_reads_from_package_code_only():
    """The check can fail: a function whose code lies in the package and reads a value on the host
    is reported; the same read from test code is not."""
    from unilora_kernels import adapter_table

    scope: dict = {}
    exec(compile("def _read(t):\n    return t.item()\n", adapter_table.__file__, "exec"), scope)
    with SyncSpy() as spy:
        torch.ones(1).item()
        assert not spy.hits
        scope["_read"](torch.ones(1))
    assert len(spy.hits) == 1 and spy.hits[0].startswith("item from adapter_table.py"), spy.hits


def _step(module, x, g):
    out = module(x)
    out.backward(g)
    return out


@pytest.mark.parametrize("projection", ["uniform", "hashed"])
@pytest.mark.parametrize("p", [0.0, 0.2])
@pytest.mark.parametrize("M", [3, 40, 41])  # the fused (decode), split and (no dropout) fold schedules
def test_layer_forward_and_backward_read_nothing_on_the_host(monkeypatch, projection, p, M):
    monkeypatch.setenv("UNILORA_FOLD_MIN_M", "41")  # the large-M schedule from 41 rows (plans read it when built)
    torch.manual_seed(0)
    layer = uk.UniLoRALinear(nn.Linear(37, 29), r=4, theta_d_length=301, unilora_dropout=p,
                             projection=projection, backend="triton").to(DEVICE)
    layer.base_layer.requires_grad_(False)
    x = torch.randn(M, 37, device=DEVICE, requires_grad=True)
    g = torch.randn(M, 29, device=DEVICE)
    with SyncSpy() as spy:
        _step(layer, x, g)  # the first call builds the plan
        _step(layer, x, g)
        layer.eval()
        with torch.no_grad():
            layer(x)
    assert not spy.hits, spy.hits
    assert layer.theta_d.grad is not None and layer.theta_d.grad.abs().sum() > 0


@pytest.mark.parametrize("p", [0.0, 0.2])
def test_mixed_batch_forward_and_backward_read_nothing_on_the_host(p):
    torch.manual_seed(0)
    model = tiny_llama().to(DEVICE)
    uk.inject(model, uk.UniLoRAConfig(r=4, theta_d_length=512, target_modules=["q_proj", "v_proj"],
                                      unilora_dropout=p, backend="triton"))
    uk.add_adapter(model, "b", torch.randn(512) * 0.02)
    model.train()
    ids = torch.randint(0, 61, (3, 5), device=DEVICE)
    with uk.adapter_batch(model, ["default", "b", "__base__"]):  # ids are built and checked here
        with SyncSpy() as spy:
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            model.eval()
            with torch.no_grad():
                model(input_ids=ids)
    assert not spy.hits, spy.hits
    assert model.unilora_theta_d.grad is not None
