"""Serving many adapters safely (issue 22): the mixed batch is the state of the call (threads,
contexts left out of order), ``inference_mode``, beams and ``num_return_sequences``, loading into
a merged model, the names of the table's rows in the state dict, bf16 tables, atomic saves."""

from __future__ import annotations

import copy
import os
import sys
import threading

import pytest
import torch
from torch import nn

import unilora_kernels as uk
from conftest import tiny_llama
from contract import availability_marks
from unilora_kernels.model import find_bank

D = 97
pytestmark = availability_marks("cpu", "cpu")  # the cpu backend throughout (its decode column cache included)


def _model(backend="cpu", d=D):
    torch.manual_seed(0)
    base = tiny_llama()
    model = uk.inject(copy.deepcopy(base), uk.UniLoRAConfig(r=2, theta_d_length=d, target_modules="all-linear",
                                                            backend=backend))
    return base, model


def _thetas(n, d=D, seed=1, scale=0.5):
    g = torch.Generator().manual_seed(seed)
    return [(torch.rand(d, generator=g) * 2 - 1) * scale for _ in range(n)]


def _with_default(model, theta):
    """A copy of ``model`` whose own theta_d is ``theta``: one adapter run the plain way."""
    alone = copy.deepcopy(model)
    with torch.no_grad():
        alone.unilora_theta_d.copy_(theta)
    return alone


# ------------------------------------------------------------------ item 1: call state ------
def _tiny_mlp():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    return uk.inject(net, uk.UniLoRAConfig(r=2, theta_d_length=32, target_modules=["0", "2"], backend="cpu"))


def test_two_threads_each_in_their_own_batch_equal_running_alone():
    model = _tiny_mlp()
    for i, t in enumerate(_thetas(3, d=32, seed=4)):
        uk.add_adapter(model, f"a{i}", t)
    x = torch.randn(3, 8)
    plans = {0: [["a0", "a1", "__base__"], ["a2", "default", "a0"]],
             1: [["a1", "a2", "a2"], ["__base__", "a0", "default"]]}
    with torch.no_grad():
        plain = model(x)
        want = {}
        for names in plans[0] + plans[1]:
            with uk.adapter_batch(model, names):
                want[tuple(names)] = model(x)
    wrong = {0: 0, 1: 0, 2: 0}

    def serve(t):
        for i in range(300):
            names = plans[t][i % 2]
            with torch.no_grad(), uk.adapter_batch(model, names):
                got = model(x)
            if not torch.equal(got, want[tuple(names)]):
                wrong[t] += 1

    def plain_forwards():  # a thread outside any batch runs the default adapter throughout
        for _ in range(300):
            with torch.no_grad():
                if not torch.equal(model(x), plain):
                    wrong[2] += 1

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible, inside forwards too
    try:
        threads = [threading.Thread(target=serve, args=(t,)) for t in (0, 1)]
        threads.append(threading.Thread(target=plain_forwards))
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    finally:
        sys.setswitchinterval(interval)
    assert wrong == {0: 0, 1: 0, 2: 0}
    assert find_bank(model).open_batches == 0


def test_contexts_exited_out_of_order_do_not_leak():
    model = _tiny_mlp()
    for name, t in zip("ab", _thetas(2, d=32, seed=6)):
        uk.add_adapter(model, name, t)
    x = torch.randn(2, 8)
    with torch.no_grad():
        plain = model(x)
        with uk.adapter_batch(model, ["b", "b"]):
            only_b = model(x)
        A = uk.adapter_batch(model, ["a", "a"])
        B = uk.adapter_batch(model, ["b", "b"])
        A.__enter__()
        B.__enter__()
        A.__exit__(None, None, None)
        assert torch.equal(model(x), only_b)  # B is still open: it runs
        B.__exit__(None, None, None)
        assert torch.equal(model(x), plain)
    assert find_bank(model).batch is None
    uk.remove_adapter(model, "a")  # nothing is open any more


def test_remove_adapter_is_refused_while_another_thread_holds_a_batch():
    model = _tiny_mlp()
    uk.add_adapter(model, "a", _thetas(1, d=32)[0])
    entered, release = threading.Event(), threading.Event()

    def hold():
        with uk.adapter_batch(model, ["a"]):
            entered.set()
            release.wait(10)

    th = threading.Thread(target=hold)
    th.start()
    try:
        entered.wait(10)
        assert find_bank(model).batch is None  # this thread has no batch
        with pytest.raises(ValueError, match="any thread"):
            uk.remove_adapter(model, "a")
    finally:
        release.set()
        th.join()
    uk.remove_adapter(model, "a")


# -------------------------------------------------------------- item 3: inference_mode ------
def test_inference_mode_generate_then_the_same_names_outside_and_in_training():
    _, model = _model()
    for i, t in enumerate(_thetas(2, seed=5, scale=2.0)):
        uk.add_adapter(model, f"a{i}", t)
    ids = torch.randint(1, 61, (2, 5))
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.inference_mode(), uk.adapter_batch(model, ["a0", "a1"]):
        served = model.generate(input_ids=ids, **kw)
    with torch.no_grad(), uk.adapter_batch(model, ["a0", "a1"]):
        again = model.generate(input_ids=ids, **kw)
    assert torch.equal(served, again)
    model.train()
    with uk.adapter_batch(model, ["a0", "a1"]):
        model(input_ids=ids, labels=ids).loss.backward()
    assert all(uk.adapter_theta(model, n).grad.abs().sum() > 0 for n in ("a0", "a1"))
    assert not any(uk.adapter_theta(model, n).is_inference() for n in ("a0", "a1"))


def test_adapter_added_under_inference_mode_trains_outside():
    _, model = _model()
    with torch.inference_mode():
        uk.add_adapter(model, "c", _thetas(1)[0])
        with uk.adapter_batch(model, ["c", "default"]):
            model(torch.randint(1, 61, (2, 4)))
    assert not uk.adapter_theta(model, "c").is_inference()
    model.train()
    ids = torch.randint(1, 61, (2, 4))
    with uk.adapter_batch(model, ["c", "default"]):
        model(input_ids=ids, labels=ids).loss.backward()
    assert uk.adapter_theta(model, "c").grad is not None


# ------------------------------------------------------- item 4: beams, return sequences ------
def _generate_check(model, names, thetas, kw):
    ids = torch.randint(1, 61, (len(names), 5), generator=torch.Generator().manual_seed(2))
    with uk.adapter_batch(model, names):
        together = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw)
    k = together.shape[0] // len(names)
    for i, name in enumerate(names):
        alone = _with_default(model, thetas[name]).generate(input_ids=ids[i : i + 1],
                                                            attention_mask=torch.ones_like(ids[i : i + 1]), **kw)
        mine = together[i * k : (i + 1) * k, : alone.shape[1]]
        assert torch.equal(mine, alone), (name, mine, alone)
        assert (together[i * k : (i + 1) * k, alone.shape[1]:] == kw["pad_token_id"]).all()


@pytest.mark.parametrize("extra", [dict(num_beams=2), dict(num_beams=2, num_return_sequences=2),
                                   dict(do_sample=True, top_k=1, num_return_sequences=2)],
                         ids=["beams2", "beams2_return2", "top1_sampling_return2"])
def test_beams_and_return_sequences_equal_each_sequence_alone(extra):
    _, model = _model()
    thetas = {"default": model.unilora_theta_d.detach().clone()}
    for i, t in enumerate(_thetas(2, seed=7, scale=2.0)):
        uk.add_adapter(model, f"a{i}", t)
        thetas[f"a{i}"] = t
    kw = {**dict(max_new_tokens=4, do_sample=False, pad_token_id=0), **extra}  # top_k=1: sampling is argmax
    _generate_check(model, ["a0", "a1", "default"], thetas, kw)


def test_a_batch_that_is_no_multiple_of_the_names_is_a_clear_error():
    model = _tiny_mlp()
    uk.add_adapter(model, "a", _thetas(1, d=32)[0])
    with torch.no_grad(), uk.adapter_batch(model, ["a", "default"]):
        with pytest.raises(ValueError, match="names 2 sequences.*num_beams"):
            model(torch.randn(3, 8))
        with pytest.raises(ValueError, match="names 2 sequences"):
            model(torch.randn(8))
        out = model(torch.randn(4, 8))  # k = 2: rows 0-1 run "a", rows 2-3 "default"
    assert out.shape == (4, 8)


# ------------------------------------------------------------- item 5: merged models ------
def _weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("base_layer.weight")}


def test_load_adapter_into_a_merged_model_is_refused_and_changes_nothing(tmp_path):
    base, model = _model()
    other = _with_default(model, _thetas(1, seed=8, scale=2.0)[0])
    uk.save_adapter(other, tmp_path / "other")
    ids = torch.randint(1, 61, (2, 5))
    uk.merge(model)
    before, theta = _weights(model), model.unilora_theta_d.detach().clone()
    with torch.no_grad():
        out = model(ids).logits
    with pytest.raises(ValueError, match=r"merged.*unmerge\(\) first"):
        uk.load_adapter(model, tmp_path / "other")
    after = _weights(model)
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert torch.equal(model.unilora_theta_d, theta)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, out)


def test_load_state_dict_into_a_merged_model_is_refused():
    _, model = _model()
    state = copy.deepcopy(model.state_dict())
    uk.merge(model)
    before = _weights(model)
    with pytest.raises(ValueError, match=r"merged.*unmerge\(\) first"):
        model.load_state_dict(state)
    assert all(torch.equal(before[n], w) for n, w in _weights(model).items())


def test_unmerge_subtracts_what_merge_added_even_after_theta_changed():
    base, model = _model()
    original = _weights(model)
    uk.merge(model)
    uk.unmerge(model)
    rounding = max((original[n] - w).abs().max().item() for n, w in _weights(model).items())
    uk.merge(model)
    with torch.no_grad():
        model.unilora_theta_d.add_(1.0)  # an in-place write while merged
    uk.unmerge(model)
    err = max((original[n] - w).abs().max().item() for n, w in _weights(model).items())
    assert err <= rounding + 1e-7, (err, rounding)
    uk.merge(model)  # the next merge adds the new theta's delta
    ids = torch.randint(1, 61, (2, 5))
    with torch.no_grad():
        merged = model(ids).logits
        uk.unmerge(model)
        unmerged = model(ids).logits
    assert (merged - unmerged).abs().max() < 1e-4


# ------------------------------------------------------- item 6: row names in state_dict ------
def test_state_dict_maps_table_rows_by_name_across_adding_orders():
    _, first = _model()
    _, second = _model()
    ta, tb, tc = _thetas(3, seed=9)
    uk.add_adapter(first, "a0", ta)
    uk.add_adapter(first, "a1", tb)
    uk.add_adapter(second, "a1", tc)  # the other order (and other values, overwritten by the load)
    uk.add_adapter(second, "a0", tc)
    second.load_state_dict(first.state_dict())
    assert torch.equal(uk.adapter_theta(second, "a0"), ta)
    assert torch.equal(uk.adapter_theta(second, "a1"), tb)
    ids = torch.randint(1, 61, (2, 5))
    with torch.no_grad(), uk.adapter_batch(first, ["a0", "a1"]):
        want = first(ids).logits
    with torch.no_grad(), uk.adapter_batch(second, ["a0", "a1"]):
        assert torch.equal(second(ids).logits, want)


def test_state_dict_with_other_adapter_names_is_a_clear_error():
    _, first = _model()
    _, second = _model()
    uk.add_adapter(first, "a0", _thetas(1)[0])
    uk.add_adapter(second, "zz", _thetas(1)[0])
    table = uk.adapter_theta(second, "zz").detach().clone()
    with pytest.raises(ValueError, match=r"a0.*zz|zz.*a0"):
        second.load_state_dict(first.state_dict())
    assert torch.equal(uk.adapter_theta(second, "zz"), table)


# ------------------------------------------------------------ item 10: bf16, atomic save ------
def test_bf16_model_reports_and_accepts_bf16_adapters():
    _, model = _model()
    uk.add_adapter(model, "a", _thetas(1)[0])
    model.to(torch.bfloat16)
    assert uk.adapter_theta(model, "a").dtype == torch.bfloat16
    mem = uk.adapter_memory(model)
    assert mem["bytes_per_adapter"] == D * 2
    assert mem["table_bytes"] == D * 2
    uk.add_adapter(model, "b", _thetas(1, seed=3)[0], dtype=torch.bfloat16)
    assert torch.equal(uk.adapter_theta(model, "b"), _thetas(1, seed=3)[0].bfloat16())
    with pytest.raises(ValueError, match="bfloat16"):
        uk.add_adapter(model, "c", _thetas(1)[0], dtype=torch.float32)


@pytest.mark.parametrize("fail_at", [1, 2, 3, 4])
def test_a_failed_save_leaves_the_old_pair_intact(tmp_path, monkeypatch, fail_at):
    """Whichever rename fails (the old code's second one left new weights beside the old config)."""
    _, model = _model()
    path = tmp_path / "adapter"
    uk.save_adapter(model, path)
    old = {f: (path / f).read_bytes() for f in os.listdir(path)}
    with torch.no_grad():
        model.unilora_theta_d.add_(1.0)
    real, calls = os.replace, []

    def second_fails(src, dst):
        calls.append(dst)
        if len(calls) == fail_at:
            raise OSError("disk full (simulated)")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", second_fails)
    with pytest.raises(OSError, match="simulated"):
        uk.save_adapter(model, path)
    monkeypatch.setattr(os, "replace", real)
    assert {f: (path / f).read_bytes() for f in os.listdir(path)} == old
    uk.save_adapter(model, path)  # and a later save still works
    assert torch.equal(uk.load_adapter(copy.deepcopy(tiny_llama()), path).unilora_theta_d, model.unilora_theta_d)
