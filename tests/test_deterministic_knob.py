"""UNILORA_DETERMINISTIC: one reading (backends/policy.py), honoured by every backend in every spelling."""

from __future__ import annotations

import pytest
import torch

from unilora_kernels import ops
from unilora_kernels.backends import BackendNotAvailableError, LayerProjection, get_backend, policy
from unilora_kernels.projection import generate_index, uniform_scales

SPELLINGS_ON = ["1", "true", "TRUE", "yes", "On", " on "]
SPELLINGS_OFF = ["0", "false", "no", "OFF", ""]


@pytest.mark.parametrize("value", SPELLINGS_ON)
def test_policy_reads_every_true_spelling(monkeypatch, value):
    monkeypatch.setenv("UNILORA_DETERMINISTIC", value)
    assert policy.deterministic()


@pytest.mark.parametrize("value", SPELLINGS_OFF)
def test_policy_reads_every_false_spelling(monkeypatch, value):
    monkeypatch.setenv("UNILORA_DETERMINISTIC", value)
    assert not policy.deterministic()


def test_unknown_spelling_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("UNILORA_DETERMINISTIC", "sometimes")
    with pytest.raises(ValueError, match="UNILORA_DETERMINISTIC='sometimes'"):
        policy.deterministic()


def _layer_args(in_f=13, out_f=11, r=3, d=29):
    index = generate_index(r * (in_f + out_f), d, 7)
    idx = torch.from_numpy(index)
    idx_a, idx_b = idx[: r * in_f].view(r, in_f), idx[r * in_f:].view(out_f, r)
    theta = torch.randn(d, requires_grad=True)
    return theta, uniform_scales(index, d), idx_a, idx_b, in_f, out_f


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("value", SPELLINGS_ON + ["0"])
def test_compiled_backend_passes_the_knob_to_cpp(monkeypatch, backend, value):
    """The compiled ops receive the knob's value in each call (the cuda backend's scatter reads it)."""
    try:
        impl = get_backend(backend, "cpu")
    except BackendNotAvailableError as exc:
        pytest.skip(str(exc))
    if backend == "reference":  # no atomics at all: the knob cannot change its sums
        assert not hasattr(impl, "deterministic")
        return
    seen = []
    real = torch.ops.unilora_C.backward

    def spy(*args):
        seen.append(args[-1])
        return real(*args)

    monkeypatch.setattr(torch.ops.unilora_C, "backward", spy)
    monkeypatch.setenv("UNILORA_DETERMINISTIC", value)
    theta, scales, idx_a, idx_b, in_f, out_f = _layer_args()
    x = torch.randn(5, in_f, requires_grad=True)
    out = ops.add_update(torch.zeros(5, out_f), x, theta, scales, idx_a, idx_b, backend=backend)
    out.sum().backward()
    assert seen == [value.strip() != "0"]


@pytest.mark.parametrize("value", SPELLINGS_ON + ["0"])
def test_triton_backend_takes_the_deterministic_schedule(monkeypatch, value):
    """Triton (interpreter on CPU): with the knob on, backward reduces through the CSR of P^T
    (csr_reduce_kernel) instead of float atomics."""
    try:
        tb = get_backend("triton", "cuda" if torch.cuda.is_available() else "cpu")
    except BackendNotAvailableError as exc:
        pytest.skip(str(exc))
    from unilora_kernels.backends import triton_launch

    monkeypatch.setenv("UNILORA_DETERMINISTIC", value)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    theta, scales, idx_a, idx_b, in_f, out_f = _layer_args()
    proj = LayerProjection(idx_a.to(device), idx_b.to(device), scales.to(device), 3, in_f, out_f, ())
    x, g = torch.randn(40, in_f, device=device), torch.randn(40, out_f, device=device)
    theta = theta.detach().to(device)
    with triton_launch.record_launches() as rec:
        h = tb.forward_(torch.zeros(40, out_f, device=device), x, theta, proj, 0.0, None)
        tb.backward(g, x, theta, proj, 0.0, None, h, None, True, True)
    names = [launch.launcher.name for launch in rec]
    assert ("csr_reduce_kernel" in names) == (value.strip() != "0"), names
