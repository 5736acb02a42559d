"""Adapters that change through training: what serving reads after an optimizer step, and what
the Trainer saves and resumes (issue 22, items 2 and 9)."""

from __future__ import annotations

import copy

import pytest
import torch

import unilora_kernels as uk
from conftest import tiny_llama
from contract import availability_marks
from unilora_kernels.backends import extension

D_SMALL = 97
NAMES = ["a1", "default", "a0", "a1"]


def _model(thetas=None, theta_d=None):
    torch.manual_seed(0)
    model = uk.inject(copy.deepcopy(tiny_llama()), uk.UniLoRAConfig(r=2, theta_d_length=D_SMALL,
                                                                    target_modules="all-linear", backend="cpu"))
    if theta_d is not None:
        with torch.no_grad():
            model.unilora_theta_d.copy_(theta_d)
    if thetas is None:
        g = torch.Generator().manual_seed(1)
        thetas = [(torch.rand(D_SMALL, generator=g) * 2 - 1) * 0.5 for _ in range(2)]
    for i, t in enumerate(thetas):
        uk.add_adapter(model, f"a{i}", t)
    return model


def _decode(model, ids):
    """One decode step: one token per sequence, so the cpu backend serves it from decode_columns."""
    with torch.no_grad(), uk.adapter_batch(model, NAMES):
        return model(ids).logits


@pytest.mark.parametrize("flavour", [pytest.param({"fused": True}, id="fused"),
                                     pytest.param({"foreach": True}, id="foreach")])
@pytest.mark.parametrize("backend", [pytest.param("cpu", marks=availability_marks("cpu", "cpu"))])
def test_decode_after_an_optimizer_step_reads_the_new_adapters(flavour, backend):
    model = _model()
    step_ids = torch.randint(0, 61, (len(NAMES), 1))
    model.eval()
    extension._columns_cache.clear()
    before = _decode(model, step_ids)
    assert extension._columns_cache, "the decode forward must go through decode_columns (the cache under test)"

    model.train()
    opt = torch.optim.AdamW([model.unilora_theta_d, model.unilora_adapter_table], lr=5e-2, weight_decay=0.0,
                            **flavour)
    train_ids = torch.randint(0, 61, (len(NAMES), 6))
    with uk.adapter_batch(model, NAMES):
        model(train_ids).logits.float().pow(2).mean().backward()
    assert model.unilora_adapter_table.grad.abs().sum() > 0
    opt.step()

    model.eval()
    after = _decode(model, step_ids)
    fresh = _model([uk.adapter_theta(model, n).detach().clone() for n in ("a0", "a1")],
                   theta_d=model.unilora_theta_d.detach().clone()).eval()
    expected = _decode(fresh, step_ids)
    assert not torch.equal(after, before), "the step moved the adapters, so decode must change"
    assert torch.equal(after, expected), (after - expected).abs().max()
