"""QLoRA-style bases: Uni-LoRA on bitsandbytes 4-bit (NF4) and torchao int8 weight-only linears.

``inject`` finds the quantized layers by target_modules and wraps them through the generic path
(base forward, then the update); forward and theta_d's gradient equal those of the same model
with plain nn.Linear layers holding the dequantized weights.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from torch import nn

import unilora_kernels as uk

IN, HID, OUT = 64, 48, 40
CONFIG = dict(r=4, theta_d_length=256, target_modules=["q_proj", "v_proj"])
# The quantized base computes x @ W^T with the dequantized W, the reference with the same W:
# only the summation order of the base GEMM differs.
RTOL, ATOL = 1e-5, 1e-5


class TwoLayers(nn.Module):
    def __init__(self, make_linear):
        super().__init__()
        self.q_proj = make_linear(IN, HID)
        self.v_proj = make_linear(HID, OUT)

    def forward(self, x):
        return self.v_proj(torch.relu(self.q_proj(x)))


def dense_twin(model: TwoLayers, dequantize) -> TwoLayers:
    """The same model with nn.Linear layers holding the dequantized weights (the reference)."""
    ref = TwoLayers(lambda i, o: nn.Linear(i, o))
    for name in ("q_proj", "v_proj"):
        src, dst = getattr(model, name), getattr(ref, name)
        with torch.no_grad():
            dst.weight.copy_(dequantize(src))
            dst.bias.copy_(src.bias)
    return ref.to(next(model.parameters()).device)


def check_against_reference(model: TwoLayers, dequantize, device: str) -> None:
    ref = dense_twin(model, dequantize)
    uk.inject(model, uk.UniLoRAConfig(**CONFIG))
    uk.inject(ref, uk.UniLoRAConfig(**CONFIG))
    assert isinstance(model.q_proj, uk.UniLoRALinear) and isinstance(model.v_proj, uk.UniLoRALinear)
    with torch.no_grad():  # a non-trivial theta_d (PEFT's init makes the update tiny)
        theta = torch.randn(CONFIG["theta_d_length"], generator=torch.Generator().manual_seed(5)).to(device)
        model.unilora_theta_d.copy_(theta)
        ref.unilora_theta_d.copy_(theta)
    x = torch.randn(5, IN, device=device)
    out, expected = model(x), ref(x)
    torch.testing.assert_close(out, expected, rtol=RTOL, atol=ATOL)
    out.square().sum().backward()
    expected.square().sum().backward()
    assert model.unilora_theta_d.grad is not None
    torch.testing.assert_close(model.unilora_theta_d.grad, ref.unilora_theta_d.grad, rtol=RTOL, atol=1e-4)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["unilora_theta_d"]


# --------------------------------------------------------------------------------------------
# bitsandbytes Linear4bit (NF4)
# --------------------------------------------------------------------------------------------
def nf4_linear(in_f: int, out_f: int, device: str):
    import bitsandbytes as bnb

    dense = nn.Linear(in_f, out_f)
    layer = bnb.nn.Linear4bit(in_f, out_f, bias=True, compute_dtype=torch.float32, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(dense.weight.data.clone(), requires_grad=False, quant_type="nf4")
    layer.bias = nn.Parameter(dense.bias.data.clone(), requires_grad=False)
    return layer.to(device)  # quantizes on the move to the device


def nf4_dequantized(layer) -> torch.Tensor:
    import bitsandbytes as bnb

    return bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_bitsandbytes_nf4_base(device):
    if importlib.util.find_spec("bitsandbytes") is None:
        pytest.skip("bitsandbytes is not installed (pip install 'unilora_kernels[quant]')")
    torch.manual_seed(0)
    try:
        model = TwoLayers(lambda i, o: nf4_linear(i, o, device))
        model(torch.randn(2, IN, device=device))
    except (RuntimeError, NotImplementedError) as exc:  # a bitsandbytes build without this device's backend
        pytest.skip(f"bitsandbytes 4-bit does not run on {device} here: {type(exc).__name__}: {exc}")
    assert model.q_proj.weight.dtype == torch.uint8  # really quantized
    check_against_reference(model, nf4_dequantized, device)


def test_bitsandbytes_nf4_llama_from_pretrained(tmp_path):
    """The documented recipe: from_pretrained with BitsAndBytesConfig (NF4), then inject by name."""
    if importlib.util.find_spec("bitsandbytes") is None:
        pytest.skip("bitsandbytes is not installed (pip install 'unilora_kernels[quant]')")
    pytest.importorskip("transformers")
    import bitsandbytes as bnb
    from conftest import tiny_llama
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tiny_llama(hidden=64, inter=128).save_pretrained(tmp_path)
    nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    try:
        model = LlamaForCausalLM.from_pretrained(tmp_path, quantization_config=nf4, device_map="cpu",
                                                 dtype=torch.float32)
    except (RuntimeError, NotImplementedError, ImportError, ValueError) as exc:
        pytest.skip(f"transformers cannot load a bitsandbytes 4-bit model on CPU here: {type(exc).__name__}: {exc}")
    ref = LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    ref_modules = dict(ref.named_modules())
    quantized = [(n, m) for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert any(n.endswith("q_proj") for n, _ in quantized)
    with torch.no_grad():
        for name, layer in quantized:
            ref_modules[name].weight.copy_(nf4_dequantized(layer))
    for m in (model, ref):
        uk.inject(m, uk.UniLoRAConfig(**CONFIG)).train()
        with torch.no_grad():
            m.unilora_theta_d.copy_(torch.randn(CONFIG["theta_d_length"], generator=torch.Generator().manual_seed(5)))
    assert isinstance(model.model.layers[0].self_attn.q_proj.base_layer, bnb.nn.Linear4bit)
    ids = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(1))
    losses = [m(input_ids=ids, labels=ids).loss for m in (model, ref)]
    for loss in losses:
        loss.backward()
    torch.testing.assert_close(losses[0], losses[1], rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(model.unilora_theta_d.grad, ref.unilora_theta_d.grad, rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------------------------
# torchao int8 weight-only
# --------------------------------------------------------------------------------------------
def test_torchao_int8_weight_only_base():
    if importlib.util.find_spec("torchao") is None:
        pytest.skip("torchao is not installed (pip install 'unilora_kernels[quant]')")
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    torch.manual_seed(0)
    model = TwoLayers(lambda i, o: nn.Linear(i, o))
    quantize_(model, Int8WeightOnlyConfig())
    assert type(model.q_proj.weight) not in (torch.Tensor, nn.Parameter)  # really quantized
    check_against_reference(model, lambda layer: layer.weight.dequantize(), "cpu")
