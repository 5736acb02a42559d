"""UniLoRALinear: standalone use, every forward path, merge, dropout, low-precision bases."""

import warnings

import pytest
import torch
from torch import nn

from oracle import assert_close, oracle
from unilora_kernels import UniLoRALinear, backends, philox
from unilora_kernels.backends import BackendNotAvailableError

Conv1D = pytest.importorskip("transformers.pytorch_utils").Conv1D


class Wrapped(nn.Module):
    """A generic base layer: maps (..., in) -> (..., out) and is not an nn.Linear."""

    def __init__(self, in_features, out_features):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.inner = nn.Linear(in_features, out_features)

    def forward(self, x):
        return self.inner(x)


def _layer(base, **kw):
    kw.setdefault("r", 3)
    kw.setdefault("theta_d_length", 53)
    layer = UniLoRALinear(base, **kw)
    with torch.no_grad():
        layer.theta_d.uniform_(-1, 1)  # large enough that the update is visible
    return layer


def _oracle_for(layer, x, g, p=0.0, seed=None):
    base = layer.base_layer
    if isinstance(base, Wrapped):
        base = base.inner
    weight_t = isinstance(base, Conv1D)
    return oracle(x, layer.theta_d, layer.projection(), weight=base.weight, bias=base.bias, weight_t=weight_t,
                  p=p, seed=seed, grad_out=g)


@pytest.mark.parametrize("kind", ["uniform", "hashed"])
@pytest.mark.parametrize("base_kind", ["linear", "conv1d", "generic"])
@pytest.mark.parametrize("shape", [(5, 29), (2, 7, 29)])
def test_standalone_layer_matches_oracle(kind, base_kind, shape):
    in_f, out_f = 29, 23
    base = {"linear": lambda: nn.Linear(in_f, out_f), "conv1d": lambda: Conv1D(out_f, in_f),
            "generic": lambda: Wrapped(in_f, out_f)}[base_kind]()
    layer = _layer(base, projection=kind)
    for p in layer.base_layer.parameters():
        p.requires_grad_(False)
    bias = base.inner.bias if base_kind == "generic" else base.bias
    bias.requires_grad_(True)
    x = torch.randn(*shape, requires_grad=True)
    out = layer(x)
    g = torch.randn_like(out)
    out.backward(g)
    ref = _oracle_for(layer, x, g)
    assert_close(out, ref["out"], torch.float32, "out")
    assert_close(x.grad, ref["grad_x"], torch.float32, "grad_x")
    assert_close(layer.theta_d.grad, ref["grad_theta"], torch.float32, "grad_theta")
    assert_close(bias.grad, ref["grad_bias"], torch.float32, "grad_bias")


def test_standalone_owns_one_theta_and_scale_table():
    layer = UniLoRALinear(nn.Linear(16, 8), r=2, theta_d_length=40)
    params = dict(layer.named_parameters())
    assert "unilora_theta_d" in params and params["unilora_theta_d"].shape == (40,)
    assert params["unilora_theta_d"].dtype == torch.float32
    assert layer.unilora_indices_A.dtype == torch.int32 and layer.unilora_indices_A.shape == (2, 16)
    assert layer.unilora_indices_B.shape == (8, 2)
    assert layer.unilora_scales.shape == (40,)
    # PEFT's init: uniform(-0.02, 0.02)
    assert layer.theta_d.abs().max() <= 0.02


def test_fused_generic_and_inplace_paths_agree():
    torch.manual_seed(0)
    lin = nn.Linear(31, 17)
    fused = _layer(lin)
    generic = _layer(Wrapped(31, 17))
    generic.base_layer.inner.load_state_dict(lin.state_dict())
    with torch.no_grad():
        generic.theta_d.copy_(fused.theta_d)
    x = torch.randn(4, 6, 31)
    with torch.no_grad():
        a = fused(x)
        b = generic(x)  # in-place add into the base output
    c = generic(x.requires_grad_(True))  # functional add_update op
    assert torch.allclose(a, b, rtol=1e-6, atol=1e-6) and torch.allclose(a, c, rtol=1e-6, atol=1e-6)


def test_hooked_base_takes_the_generic_path_and_hooks_run():
    lin = nn.Linear(12, 9)
    calls = []
    lin.register_forward_hook(lambda m, i, o: calls.append(o.shape))
    layer = _layer(lin)
    x = torch.randn(3, 12)
    out = layer(x)
    assert calls == [torch.Size([3, 9])]
    ref = _oracle_for(layer, x, torch.ones_like(out))
    assert_close(out, ref["out"], torch.float32, "out")


def test_inference_does_not_modify_the_input():
    class Identity(nn.Module):  # returns its input: must not be updated in place
        in_features = out_features = 10

        def forward(self, x):
            return x

    layer = _layer(Identity())
    x = torch.randn(3, 10)
    before = x.clone()
    with torch.no_grad():
        out = layer(x)
    assert torch.equal(x, before) and not torch.equal(out, before)


@pytest.mark.parametrize("base_kind", ["linear", "conv1d"])
def test_merge_unmerge(base_kind):
    base = nn.Linear(20, 14) if base_kind == "linear" else Conv1D(14, 20)
    layer = _layer(base)
    w0 = base.weight.detach().clone()
    x = torch.randn(5, 20)
    with torch.no_grad():
        expected = layer(x)
        dw = layer.delta_weight()
        assert dw.shape == base.weight.shape
        layer.merge()
        assert layer.merged
        merged = layer(x)
        layer.unmerge()
        assert not layer.merged
        again = layer(x)
    assert torch.allclose(merged, expected, rtol=1e-5, atol=1e-5)
    assert torch.allclose(again, expected, rtol=1e-5, atol=1e-5)
    assert torch.allclose(base.weight, w0, atol=1e-6)
    with pytest.warns(UserWarning, match="not merged"):
        layer.unmerge()


def test_merge_needs_a_dense_weight():
    layer = _layer(Wrapped(8, 4))
    with pytest.raises(TypeError, match="cannot merge"):
        layer.merge()


def test_dropout_uses_the_shared_mask_and_only_in_training():
    layer = _layer(nn.Linear(26, 19), unilora_dropout=0.3)
    x = torch.randn(2, 11, 26, requires_grad=True)
    torch.manual_seed(77)
    out = layer(x)
    torch.manual_seed(77)
    seed = philox.new_seed().item()  # the layer drew its seed from the same generator state
    g = torch.randn_like(out)
    out.backward(g)
    ref = _oracle_for(layer, x, g, p=0.3, seed=seed)
    assert_close(out, ref["out"], torch.float32, "out")
    assert_close(x.grad, ref["grad_x"], torch.float32, "grad_x")
    assert_close(layer.theta_d.grad, ref["grad_theta"], torch.float32, "grad_theta")
    # a fresh mask each call in training, none in eval
    with torch.no_grad():
        a, b = layer(x), layer(x)
        layer.eval()
        c, d = layer(x), layer(x)
    assert not torch.allclose(a, b) and torch.equal(c, d)
    assert_close(c, _oracle_for(layer, x, torch.ones_like(c))["out"], torch.float32, "eval out")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("kind", ["uniform", "hashed"])
def test_low_precision_base_with_fp32_theta(dtype, kind):
    base = nn.Linear(33, 21).to(dtype)
    layer = _layer(base, projection=kind)
    assert layer.theta_d.dtype == torch.float32
    x = torch.randn(3, 5, 33).to(dtype).requires_grad_(True)
    out = layer(x)
    assert out.dtype == dtype
    g = torch.randn_like(out)
    out.backward(g)
    ref = _oracle_for(layer, x, g)
    assert_close(out, ref["out"], dtype, "out")
    assert_close(x.grad, ref["grad_x"], dtype, "grad_x")
    assert layer.theta_d.grad.dtype == torch.float32
    assert_close(layer.theta_d.grad, ref["grad_theta"], dtype, "grad_theta")


def test_autocast_uses_the_base_layers_autocast_behaviour():
    layer = _layer(nn.Linear(24, 16))
    x = torch.randn(4, 24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    ref = _oracle_for(layer, x, torch.ones(4, 16))
    assert_close(out, ref["out"], torch.bfloat16, "autocast out")


def test_extra_repr_and_errors():
    layer = UniLoRALinear(nn.Linear(12, 6), r=2, theta_d_length=30)
    text = repr(layer)
    auto = backends.resolve("auto", "cpu")  # "cpu" when the extension is built, else "reference"
    for part in ("r=2", "d=30", "projection=uniform", f"backend=auto->{auto}", "in_features=12"):
        assert part in text
    with pytest.raises(ValueError, match="expects 12"):
        layer(torch.randn(2, 13))
    with pytest.raises(TypeError, match="unsupported base layer"):
        UniLoRALinear(nn.Conv2d(3, 3, 3))
    with pytest.raises(ValueError, match="r must be a positive"):
        UniLoRALinear(nn.Linear(4, 4), r=0)
    with pytest.raises(ValueError, match="theta_d_length must be a positive"):
        UniLoRALinear(nn.Linear(4, 4), theta_d_length=0)
    with pytest.raises(ValueError, match="projection must be one of"):
        UniLoRALinear(nn.Linear(4, 4), projection="random")


def test_backend_env_variable(monkeypatch):
    layer = UniLoRALinear(nn.Linear(12, 6), r=2, theta_d_length=30)
    monkeypatch.setenv("UNILORA_BACKEND", "reference")
    assert layer.resolved_backend() == "reference"
    monkeypatch.setenv("UNILORA_BACKEND", "cuda")
    with pytest.raises(BackendNotAvailableError):
        layer(torch.randn(2, 12))
    monkeypatch.setenv("UNILORA_BACKEND", "gpu-please")
    with pytest.raises(ValueError, match="UNILORA_BACKEND"):
        layer(torch.randn(2, 12))


def test_merged_training_warns():
    layer = _layer(nn.Linear(6, 6))
    layer.merge()
    with pytest.warns(UserWarning, match="no gradient until unmerge"):
        layer(torch.randn(2, 6))
    layer.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer(torch.randn(2, 6))


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_eager_plan_and_custom_op_agree(backend, p):
    """Eager training runs the layer's plan (plan.py), torch.compile the custom op unilora::linear
    (or, on cpu, the same C++ autograd op): the same kernels, so the same outputs and gradients bit
    for bit, dropout masks included (the layer draws its seed from the same generator state)."""
    try:
        backends.get_backend(backend, "cpu")
    except BackendNotAvailableError as exc:
        pytest.skip(str(exc))
    layer = _layer(nn.Linear(23, 17), backend=backend, unilora_dropout=p)
    base = layer.base_layer
    x = torch.randn(2, 5, 23)
    g = torch.randn(2, 5, 17)
    params = [layer.theta_d, base.weight, base.bias]
    torch.manual_seed(7)
    xg = x.clone().requires_grad_(True)
    out = layer(xg)
    eager = (out.detach(),) + torch.autograd.grad(out, [xg] + params, g)
    torch.manual_seed(7)
    seed = philox.new_seed() if p > 0 else None
    args = (layer.theta_d, layer.bank.scales, layer.unilora_indices_A, layer.unilora_indices_B, layer.r,
            list(layer._hash_params), p, seed, backend)
    xg = x.clone().requires_grad_(True)
    out, _ = torch.ops.unilora.linear(xg, base.weight, base.bias, False, *args)
    op = (out.detach(),) + torch.autograd.grad(out, [xg] + params, g)
    for a, b, name in zip(eager, op, ("out", "grad_x", "grad_theta", "grad_weight", "grad_bias")):
        assert torch.equal(a, b), f"{name}: the eager plan and the custom op differ"
