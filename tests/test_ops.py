"""The op layer's input validation: clear errors before any backend runs.

What every backend computes is checked against the float64 oracle in tests/test_backend_contract.py.
"""

import pytest
import torch

from oracle import make_projection, random_theta
from unilora_kernels import backends, ops


# ------------------------------------------------------------------ validation --------------
def _valid():
    proj = make_projection(9, 5, 2, 11, "uniform")
    return torch.randn(3, 9), torch.randn(5, 9), random_theta(11), proj


def test_validation_errors_are_clear():
    x, w, theta, proj = _valid()
    s, ia, ib = proj.scales, proj.idx_a, proj.idx_b
    with pytest.raises(TypeError, match="int32"):
        ops.linear(x, w, None, theta, s, ia.long(), ib)
    with pytest.raises(ValueError, match="idx_a has shape"):
        ops.linear(x, w, None, theta, s, ia[:, :4], ib)
    with pytest.raises(ValueError, match="features but the weight expects"):
        ops.linear(torch.randn(3, 8), w, None, theta, s, ia, ib)
    with pytest.raises(TypeError, match="theta_d must be a 1-D float tensor"):
        ops.linear(x, w, None, theta.view(1, -1), s, ia, ib)
    with pytest.raises(TypeError, match="theta_d must be a 1-D float tensor"):
        ops.linear(x, w, None, theta.long(), s, ia, ib)
    with pytest.raises(ValueError, match="scales has 10 entries"):
        ops.linear(x, w, None, theta, s[:10], ia, ib)
    with pytest.raises(TypeError, match="x must be a float"):
        ops.linear(x.long(), w.long(), None, theta, s, ia, ib)
    with pytest.raises(TypeError, match="base weight is"):
        ops.linear(x, w.double(), None, theta, s, ia, ib)
    with pytest.raises(ValueError, match="dropout_p must be in"):
        ops.linear(x, w, None, theta, s, ia, ib, dropout_p=1.5)
    with pytest.raises(ValueError, match="needs a one-element int64 seed"):
        ops.linear(x, w, None, theta, s, ia, ib, dropout_p=0.5)
    with pytest.raises(ValueError, match="hashed projection slice"):
        ops.linear(x, w, None, theta, torch.ones(2), r=2, hash_params=[10, 0, 1])
    with pytest.raises(ValueError, match="r must be given"):
        ops.linear(x, w, None, theta, torch.ones(2), hash_params=[1000, 0, 1])
    with pytest.raises(ValueError, match="one device"):
        ops.linear(x, w, None, theta.to("meta"), s, ia, ib)
    with pytest.raises(ValueError, match="leading dimensions"):
        ops.add_update(torch.randn(4, 5), x, theta, s, ia, ib)
    with pytest.raises(backends.BackendNotAvailableError, match="unknown backend"):
        ops.linear(x, w, None, theta, s, ia, ib, backend="tpu")


def test_backend_not_available_is_clear():
    x, w, theta, proj = _valid()
    with pytest.raises(backends.BackendNotAvailableError, match="backend 'cuda'"):
        ops.linear(x, w, None, theta, proj.scales, proj.idx_a, proj.idx_b, backend="cuda")
    assert issubclass(backends.BackendNotAvailableError, ValueError)
