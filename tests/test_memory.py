"""Memory rules, measured: nothing of length D is allocated in forward+backward, and at most
one d-length tensor per layer call (its theta_d gradient contribution).

The profiler attributes every allocation to the op that made it (``aten::empty*``, also when
called from C++ kernels), so an event's self-allocated bytes are one allocation. The model has
D = 2,097,152 >= 2,000,000 LoRA parameters over 16 layers, so a layer-sized int64 temporary
(D/16 elements, 8 bytes each) stays below D bytes: the threshold of D bytes catches a D-length
tensor of any dtype without flagging layer-sized work.
"""

import pytest
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

import unilora_kernels as uk
from unilora_kernels import backends
from unilora_kernels import projection as P

LAYERS, WIDTH, R, D_THETA = 16, 1024, 64, 65_533  # odd d: its byte size collides with nothing else
D = LAYERS * R * 2 * WIDTH


def _cases():
    """(backend, projection, dropout). Hashed on the reference and Triton backends computes the
    permutation per element in tensor ops or the interpreter, under the profiler: minutes, so
    those two are slow (the cpu backend runs hashed in the quick run)."""
    out = []
    for name in ("reference", "cpu", "triton"):
        try:
            backends.get_backend(name, "cpu")
            marks = []
        except backends.BackendNotAvailableError as exc:
            marks = [pytest.mark.skip(reason=str(exc))]
        for projection, dropout in (("uniform", 0.0), ("hashed", 0.1)):
            slow = [pytest.mark.slow] if projection == "hashed" and name != "cpu" else []
            out.append(pytest.param(name, projection, dropout, marks=marks + slow, id=f"{projection}-{dropout}-{name}"))
    return out


def allocations(fn) -> list:
    """Bytes of every allocation made while ``fn`` runs (CPU tensors)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return [e.self_cpu_memory_usage for e in prof.events() if e.self_cpu_memory_usage > 0]


def _model(backend, projection="uniform", dropout=0.0):
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(WIDTH, WIDTH) for _ in range(LAYERS)])
    cfg = uk.UniLoRAConfig(r=R, theta_d_length=D_THETA, target_modules=r"\d+", backend=backend,
                           projection=projection, unilora_dropout=dropout)
    return uk.inject(model, cfg)


@pytest.mark.parametrize("backend,projection,dropout", _cases())
def test_no_D_sized_allocation_in_forward_backward(backend, projection, dropout):
    model = _model(backend, projection, dropout).train()
    assert sum(l.r * (l.in_features + l.out_features) for _, l in uk.iter_layers(model)) == D >= 2_000_000
    x = torch.randn(4, WIDTH, requires_grad=True)

    def step():
        model(x).square().mean().backward()

    step()  # warm up lazy caches (e.g. autotuning) outside the measurement
    model.zero_grad(set_to_none=True)
    sizes = allocations(step)
    assert sizes, "the profiler recorded no allocation at all: the measurement is broken"
    biggest = max(sizes)
    assert biggest < D, f"an allocation of {biggest:,} bytes reaches D = {D:,} elements"
    d_sized = sum(1 for s in sizes if s == 4 * D_THETA)
    assert 1 <= d_sized <= LAYERS, f"{d_sized} d-length fp32 allocations for {LAYERS} layer calls"
    assert model.unilora_theta_d.grad is not None and model.unilora_theta_d.grad.abs().sum() > 0


def test_the_measurement_catches_a_D_sized_tensor():
    """Positive control: a naive layer that materialises theta_D is flagged by the same check."""
    index = torch.from_numpy(P.generate_index(D, D_THETA, 0)).long()
    theta = torch.randn(D_THETA, requires_grad=True)

    def naive():
        theta_D = theta[index]  # what the package must never do
        theta_D.sum().backward()

    assert max(allocations(naive)) >= D


def test_index_storage_is_int32_and_one_scale_table():
    model = _model("reference")
    layers = uk.iter_layers(model)
    assert all(l.unilora_indices_A.dtype == torch.int32 and l.unilora_indices_B.dtype == torch.int32
               for _, l in layers)
    index_bytes = sum(l.unilora_indices_A.numel() * 4 + l.unilora_indices_B.numel() * 4 for _, l in layers)
    assert index_bytes == 4 * D  # 4 bytes per element of D, not PEFT's 8 (int64) + 4 (scale)
    scale_tables = {id(l.bank.scales) for _, l in layers}
    assert len(scale_tables) == 1 and model.unilora_scales.shape == (D_THETA,)
    assert "unilora_scales" not in model.state_dict()  # regenerated from the seed, never saved
    hashed = _model("reference", "hashed")
    assert all(l.unilora_indices_A.numel() == 0 for _, l in uk.iter_layers(hashed))
    assert hashed.unilora_scales.numel() == 2
