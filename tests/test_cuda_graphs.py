"""CUDA-graph capture of whole training and decode steps (``gpu``: skipped without a GPU).

The hot path reads no tensor value on the host (tests/test_sync_free.py), and the dropout seed is
drawn on the device, so a captured step replays correctly: the same outputs and gradients as
eager, and a fresh dropout mask on every replay that equals eager's for the same generator state.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import unilora_kernels as uk

from conftest import tiny_llama

pytestmark = pytest.mark.gpu
DEVICE = "cuda"


def _model(p=0.0, backend="auto"):
    torch.manual_seed(0)
    model = tiny_llama().to(DEVICE)
    uk.inject(model, uk.UniLoRAConfig(r=4, theta_d_length=512, target_modules="all-linear", unilora_dropout=p,
                                      backend=backend))
    return model


def _warm_up(fn, n=3):
    """Run fn on a side stream before capture (allocator pools, plans, autotuning, lazy inits)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(n):
            fn()
    torch.cuda.current_stream().wait_stream(stream)


@pytest.mark.parametrize("backend", ["auto", "triton", "cuda"])
def test_captured_training_step_equals_eager(backend):
    model = _model(backend=backend)
    ref = copy.deepcopy(model)
    model.train()
    ref.train()
    ids = torch.randint(0, 61, (2, 9), device=DEVICE)
    static_ids = ids.clone()

    def step():
        model.unilora_theta_d.grad = None
        loss = model(input_ids=static_ids, labels=static_ids).loss
        loss.backward()
        return loss

    _warm_up(step)
    graph = torch.cuda.CUDAGraph()
    model.unilora_theta_d.grad = None
    with torch.cuda.graph(graph):
        static_loss = model(input_ids=static_ids, labels=static_ids).loss
        static_loss.backward()
    graph.replay()
    torch.cuda.synchronize()
    loss = ref(input_ids=ids, labels=ids).loss
    loss.backward()
    torch.testing.assert_close(static_loss, loss, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model.unilora_theta_d.grad, ref.unilora_theta_d.grad, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_dropout_under_capture_draws_a_fresh_mask_per_replay_equal_to_eager(backend):
    torch.manual_seed(0)
    layer = uk.UniLoRALinear(nn.Linear(64, 48), r=4, theta_d_length=256, unilora_dropout=0.5,
                             backend=backend).to(DEVICE)
    layer.train()
    x = torch.randn(8, 64, device=DEVICE)
    _warm_up(lambda: layer(x))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = layer(x)
    torch.cuda.manual_seed(123)
    graph.replay()
    first = static_out.clone()
    graph.replay()
    assert not torch.equal(first, static_out), "two replays drew the same dropout mask"
    torch.cuda.manual_seed(123)
    eager = layer(x)
    torch.testing.assert_close(first, eager, rtol=0, atol=0)


def test_captured_decode_step_equals_eager_inside_adapter_batch():
    model = _model().eval()
    uk.add_adapter(model, "b", torch.randn(512, device=DEVICE) * 0.02)
    ids = torch.randint(0, 61, (3, 1), device=DEVICE)
    with torch.no_grad(), uk.adapter_batch(model, ["default", "b", "__base__"]):
        eager = model(input_ids=ids).logits
        _warm_up(lambda: model(input_ids=ids))
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_logits = model(input_ids=ids).logits
        graph.replay()
        torch.testing.assert_close(static_logits, eager, rtol=1e-4, atol=1e-5)


def test_reduce_overhead_compiled_training_step_equals_eager():
    model = _model()
    ref = copy.deepcopy(model)
    model.train()
    ref.train()
    ids = torch.randint(0, 61, (2, 9), device=DEVICE)

    def loss_of(m):
        return m(input_ids=ids, labels=ids).loss

    compiled = torch.compile(loss_of, mode="reduce-overhead")
    for _ in range(3):  # cudagraph trees record after warm-up runs
        model.unilora_theta_d.grad = None
        loss = compiled(model)
        loss.backward()
    ref_loss = loss_of(ref)
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model.unilora_theta_d.grad, ref.unilora_theta_d.grad, rtol=1e-3, atol=1e-5)
