"""Activation checkpointing with Uni-LoRA dropout gives exactly the gradients of the plain run.

Each layer draws its dropout seed with torch's RNG in forward (philox.new_seed); checkpointing
saves the RNG state and restores it for the recomputation, so the recomputed forward drops the
same inputs. Non-reentrant checkpointing gives the plain gradients bit for bit.

Reentrant checkpointing does too within one checkpointed segment; across several it runs one
``autograd.backward`` per segment, each adding its layers' share into ``theta_d.grad``, where the
plain graph sums every layer's share in one buffer: the same numbers added in another order,
so the gradients agree to float rounding (1e-7 relative measured, with or without dropout),
not bit for bit. A different dropout mask would differ at order 1.
"""

from __future__ import annotations

import copy

import pytest
import torch

import unilora_kernels as uk
from unilora_kernels import philox

pytest.importorskip("transformers")
from conftest import tiny_llama  # noqa: E402

CONFIG = dict(r=4, theta_d_length=512, target_modules="all-linear", unilora_dropout=0.3)


def theta_grad(model, ids, seed: int) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    model(input_ids=ids, labels=ids).loss.backward()
    return model.unilora_theta_d.grad.clone()


@pytest.fixture
def adapted_llama(request):
    torch.manual_seed(0)
    layers = getattr(request, "param", 2)
    model = uk.inject(tiny_llama(layers=layers), uk.UniLoRAConfig(**CONFIG)).train()
    with torch.no_grad():  # a non-trivial theta_d, so that the update matters in every layer
        model.unilora_theta_d.normal_(0, 0.5)
    return model


@pytest.mark.parametrize(("adapted_llama", "use_reentrant", "exact"), [
    (2, False, True),
    (1, True, True),   # one segment: the same summation order as the plain run
    (2, True, False),  # two segments: theta_d.grad summed per segment (module docstring)
], indirect=["adapted_llama"])
def test_checkpointed_gradients_equal_plain(adapted_llama, use_reentrant, exact, monkeypatch):
    plain, checkpointed = adapted_llama, copy.deepcopy(adapted_llama)
    checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    ids = torch.randint(0, 61, (3, 10), generator=torch.Generator().manual_seed(1))

    seeds_drawn = []
    real_new_seed = philox.new_seed
    monkeypatch.setattr(philox, "new_seed", lambda *a: seeds_drawn.append(1) or real_new_seed(*a))
    expected = theta_grad(plain, ids, seed=5)
    plain_draws = len(seeds_drawn)
    seeds_drawn.clear()
    got = theta_grad(checkpointed, ids, seed=5)

    assert plain_draws == len(uk.iter_layers(plain)) > 0
    assert len(seeds_drawn) == 2 * plain_draws, "the decoder layers were not recomputed in backward"
    if exact:
        assert torch.equal(got, expected)
    else:
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6 * expected.abs().max().item())
    # Dropout is live: another RNG state gives other gradients.
    assert not torch.equal(theta_grad(plain, ids, seed=6), expected)
