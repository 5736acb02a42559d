"""theta_d through model casts, low-precision checkpoints and autocast.

The policy (README, Training): theta_d follows the model's casts like any parameter, as PEFT's
adapter weights do; every op reads a float16/bfloat16 theta_d in float32 and its gradient arrives
in theta_d's own dtype. The shared scale table always stays exact float32.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import unilora_kernels as uk
from unilora_kernels import UniLoRALinear, ops

from conftest import tiny_llama

BF16_TOL = 3e-2  # relative, against an fp32 run of the same (rounded) weights


def _injected(dtype=torch.float32, backend="auto"):
    torch.manual_seed(0)
    model = tiny_llama().to(dtype)
    return uk.inject(model, uk.UniLoRAConfig(r=4, theta_d_length=300, target_modules="all-linear", backend=backend))


def _loss(model, ids):
    return model(input_ids=ids, labels=ids).loss


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.mark.parametrize("cast", ["to", "bfloat16", "half"])
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_cast_after_inject_trains(cast, backend):
    """model.to(bf16) / .bfloat16() / .half() after inject: forward, backward and an optimizer step work."""
    model = _injected(backend=backend)
    scales = model.unilora_scales.clone()
    opt = torch.optim.AdamW([model.unilora_theta_d], lr=1e-3)  # created before the cast, as users do
    dtype = torch.float16 if cast == "half" else torch.bfloat16
    model = model.to(dtype) if cast == "to" else getattr(model, cast)()
    ref = copy.deepcopy(model).float()  # the same rounded values, computed in fp32
    ids = torch.randint(0, 61, (2, 9))
    loss = _loss(model, ids)
    loss.backward()
    theta = model.unilora_theta_d
    assert theta.dtype == dtype and theta.grad.dtype == dtype
    assert model.unilora_scales.dtype == torch.float32 and torch.equal(model.unilora_scales, scales)
    ref_loss = _loss(ref, ids)
    ref_loss.backward()
    assert _rel(loss, ref_loss) < BF16_TOL
    assert _rel(theta.grad, ref.unilora_theta_d.grad) < 5 * BF16_TOL
    before = theta.detach().clone()
    opt.step()
    assert not torch.equal(theta.detach(), before)
    assert all(v.dtype == dtype for v in opt.state[theta].values() if v.dim() > 0)


def test_inject_into_bf16_model_keeps_theta_fp32():
    model = _injected(torch.bfloat16)
    assert model.unilora_theta_d.dtype == torch.float32
    ids = torch.randint(0, 61, (2, 7))
    _loss(model, ids).backward()
    assert model.unilora_theta_d.grad.dtype == torch.float32
    assert torch.isfinite(model.unilora_theta_d.grad).all()


def test_bf16_checkpoint_loads_into_fp32_theta():
    model = _injected()
    theta = torch.randn(300).bfloat16()
    missing, unexpected = model.load_state_dict({"unilora_theta_d": theta}, strict=False)
    assert not unexpected and "unilora_theta_d" not in missing
    assert model.unilora_theta_d.dtype == torch.float32 and torch.equal(model.unilora_theta_d, theta.float())


def test_merge_and_export_after_cast():
    model = _injected().bfloat16()
    state = uk.export_lora(model)
    assert all(v.dtype == torch.float32 for k, v in state.items() if "lora_" in k)
    uk.merge(model)
    uk.unmerge(model)


@pytest.mark.parametrize("base_dtype", [torch.float32, torch.bfloat16])
def test_cpu_autocast_training_takes_the_fused_path(monkeypatch, base_dtype):
    """Under torch.autocast("cpu", bf16) every adapted nn.Linear runs the fused op (no base(x) +
    add_update), and the loss and theta's gradient are within bf16 tolerance of fp32 training."""
    model = _injected(base_dtype)
    ref = copy.deepcopy(model).float()
    calls, unfused = [], []
    real_forward, real_base, real_general = (UniLoRALinear.forward, UniLoRALinear._base_out,
                                             UniLoRALinear._forward_general)
    monkeypatch.setattr(UniLoRALinear, "forward", lambda *a, **k: calls.append(1) or real_forward(*a, **k))
    monkeypatch.setattr(UniLoRALinear, "_base_out", lambda *a, **k: unfused.append(1) or real_base(*a, **k))
    monkeypatch.setattr(UniLoRALinear, "_forward_general", lambda *a, **k: unfused.append(1) or real_general(*a, **k))
    ids = torch.randint(0, 61, (2, 9))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = _loss(model, ids)
    loss.backward()
    n_layers = len(uk.iter_layers(model))
    assert len(calls) == n_layers and not unfused  # every layer call took the plan's fused path
    ref_loss = _loss(ref, ids)
    ref_loss.backward()
    assert _rel(loss, ref_loss) < BF16_TOL
    assert _rel(model.unilora_theta_d.grad, ref.unilora_theta_d.grad) < 5 * BF16_TOL


def test_autocast_layer_output_dtype_and_value():
    layer = uk.UniLoRALinear(nn.Linear(24, 16), r=2, theta_d_length=40)
    x = torch.randn(4, 24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    with torch.no_grad():
        expected = layer.base_layer(x) + (x @ layer.lora_matrices()[0].t()) @ layer.lora_matrices()[1].t()
    assert _rel(out, expected) < BF16_TOL
