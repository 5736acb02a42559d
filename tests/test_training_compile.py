"""torch.compile (default mode, inductor) of a whole training step matches eager on the tiny LLaMA.

The step is forward, loss, backward and the optimizer step in one compiled function; Dynamo
breaks it where it always does (``loss.backward()``, ``zero_grad``), so three graphs run compiled:
forward + loss (with the cpu backend's custom ops inside), its AOTAutograd backward, and AdamW. Tolerance: inductor fuses and
reorders the base model's float32 arithmetic (RMSNorm, softmax, the loss), so losses and theta_d
agree to rtol 1e-5 / atol 1e-6 after three AdamW steps, not bit for bit. No dropout: inductor
draws random numbers with its own generator unless fallback_random is set.
"""

from __future__ import annotations

import copy

import pytest
import torch

import unilora_kernels as uk
from unilora_kernels.backends import BackendNotAvailableError, get_backend

pytest.importorskip("transformers")
from conftest import tiny_llama  # noqa: E402

STEPS = 3
RTOL, ATOL = 1e-5, 1e-6


def make_step(model, opt):
    def step(ids):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


@pytest.mark.slow  # inductor compiles the forward, backward and AdamW graphs: about a minute on 2 CPU cores
def test_compiled_training_step_matches_eager():
    try:
        get_backend("cpu", "cpu")
    except BackendNotAvailableError as exc:
        pytest.skip(str(exc))
    torch.manual_seed(0)
    eager = uk.inject(tiny_llama(), uk.UniLoRAConfig(r=4, theta_d_length=512, target_modules="all-linear",
                                                     backend="cpu")).train()
    with torch.no_grad():
        eager.unilora_theta_d.normal_(0, 0.1)
    compiled_model = copy.deepcopy(eager)
    runs = {}
    for name, model in (("eager", eager), ("compiled", compiled_model)):
        opt = torch.optim.AdamW([model.unilora_theta_d], lr=1e-2)
        step = make_step(model, opt)
        if name == "compiled":
            torch._dynamo.reset()
            step = torch.compile(step)
        gen = torch.Generator().manual_seed(2)
        losses = [step(torch.randint(0, 61, (4, 12), generator=gen)) for _ in range(STEPS)]
        runs[name] = (torch.stack(losses), model.unilora_theta_d.detach().clone())
    (eager_losses, eager_theta), (compiled_losses, compiled_theta) = runs["eager"], runs["compiled"]
    assert not torch.equal(eager_losses[0], eager_losses[-1])  # it trained
    torch.testing.assert_close(compiled_losses, eager_losses, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(compiled_theta, eager_theta, rtol=RTOL, atol=ATOL)
