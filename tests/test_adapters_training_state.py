"""Adapters that change through training: what serving reads after an optimizer step, and what
the Trainer saves and resumes (issue 22, items 2 and 9)."""

from __future__ import annotations

import copy

import pytest
import torch

import unilora_kernels as uk
from conftest import tiny_llama
from contract import availability_marks
from unilora_kernels.backends import extension

D_SMALL = 97
NAMES = ["a1", "default", "a0", "a1"]


def _model(thetas=None, theta_d=None):
    torch.manual_seed(0)
    model = uk.inject(copy.deepcopy(tiny_llama()), uk.UniLoRAConfig(r=2, theta_d_length=D_SMALL,
                                                                    target_modules="all-linear", backend="cpu"))
    if theta_d is not None:
        with torch.no_grad():
            model.unilora_theta_d.copy_(theta_d)
    if thetas is None:
        g = torch.Generator().manual_seed(1)
        thetas = [(torch.rand(D_SMALL, generator=g) * 2 - 1) * 0.5 for _ in range(2)]
    for i, t in enumerate(thetas):
        uk.add_adapter(model, f"a{i}", t)
    return model


def _decode(model, ids):
    """One decode step: one token per sequence, so the cpu backend serves it from decode_columns."""
    with torch.no_grad(), uk.adapter_batch(model, NAMES):
        return model(ids).logits


@pytest.mark.parametrize("flavour", [pytest.param({"fused": True}, id="fused"),
                                     pytest.param({"foreach": True}, id="foreach")])
@pytest.mark.parametrize("backend", [pytest.param("cpu", marks=availability_marks("cpu", "cpu"))])
def test_decode_after_an_optimizer_step_reads_the_new_adapters(flavour, backend):
    model = _model()
    step_ids = torch.randint(0, 61, (len(NAMES), 1))
    model.eval()
    extension._columns_cache.clear()
    before = _decode(model, step_ids)
    assert extension._columns_cache, "the decode forward must go through decode_columns (the cache under test)"

    model.train()
    opt = torch.optim.AdamW(uk.adapter_parameters(model), lr=5e-2, weight_decay=0.0,
                            **flavour)
    train_ids = torch.randint(0, 61, (len(NAMES), 6))
    with uk.adapter_batch(model, NAMES):
        model(train_ids).logits.float().pow(2).mean().backward()
    assert all(uk.adapter_theta(model, n).grad.abs().sum() > 0 for n in ("a0", "a1"))
    opt.step()

    model.eval()
    after = _decode(model, step_ids)
    fresh = _model([uk.adapter_theta(model, n).detach().clone() for n in ("a0", "a1")],
                   theta_d=model.unilora_theta_d.detach().clone()).eval()
    expected = _decode(fresh, step_ids)
    assert not torch.equal(after, before), "the step moved the adapters, so decode must change"
    assert torch.equal(after, expected), (after - expected).abs().max()


# ------------------------------------------------------------------ Trainer, many adapters -----
TRAINER_NAMES = ["a0", "default", "a1"]


def _trainer_model(with_adapters: bool):
    torch.manual_seed(0)
    model = uk.inject(tiny_llama().train(), uk.UniLoRAConfig(r=2, theta_d_length=256, target_modules="all-linear"))
    if with_adapters:
        g = torch.Generator().manual_seed(5)
        for name in ("a0", "a1"):
            uk.add_adapter(model, name, (torch.rand(256, generator=g) * 2 - 1) * 0.1)
    return model


def _mixed_trainer(transformers, model, out, **kw):
    from unilora_kernels.hf_trainer import UniLoRATrainer

    class MixedTrainer(UniLoRATrainer):
        def compute_loss(self, model, inputs, *args, **kwargs):  # each batch: one sequence per adapter
            with uk.adapter_batch(model, TRAINER_NAMES):
                return super().compute_loss(model, inputs, *args, **kwargs)

    g = torch.Generator().manual_seed(3)
    data = [{"input_ids": row, "labels": row} for row in torch.randint(0, 61, (12, 6), generator=g)]
    settings = dict(output_dir=str(out), per_device_train_batch_size=len(TRAINER_NAMES), learning_rate=1e-2,
                    max_steps=4, save_steps=2, save_strategy="steps", logging_steps=100, report_to=[], use_cpu=True,
                    dataloader_num_workers=0, seed=7, disable_tqdm=True, weight_decay=0.0)
    settings.update(kw)
    return MixedTrainer(model=model, args=transformers.TrainingArguments(**settings), train_dataset=data)


def _all_thetas(model):
    return {n: uk.adapter_theta(model, n).detach().clone() for n in uk.adapter_names(model)}


def test_trainer_checkpoints_and_resumes_every_adapter(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("safetensors")
    transformers.logging.set_verbosity_error()
    model = _trainer_model(True)
    start = _all_thetas(model)
    trainer = _mixed_trainer(transformers, model, tmp_path / "full")
    trainer.train()
    uninterrupted = _all_thetas(model)
    assert all(not torch.equal(uninterrupted[n], start[n]) for n in start), "every adapter trains"

    ckpt = tmp_path / "full" / "checkpoint-2"
    for name in ("a0", "a1"):
        assert (ckpt / name / "adapter_model.safetensors").is_file() and (ckpt / name / "adapter_config.json").is_file()
    # The checkpoint holds each adapter as it was at step 2: a fresh model loads them by name.
    at_2 = _trainer_model(False)
    for name in ("a0", "a1"):
        uk.add_adapter(at_2, name, ckpt / name)
    uk.load_adapter(at_2, ckpt)

    # A new process: a fresh model without the added adapters resumes; they are added, trained on.
    fresh = _trainer_model(False)
    _mixed_trainer(transformers, fresh, tmp_path / "resumed")._load_from_checkpoint(str(ckpt))  # train()'s first step
    assert uk.adapter_names(fresh) == ["default", "a0", "a1"]
    for name, theta in _all_thetas(at_2).items():
        assert torch.equal(uk.adapter_theta(fresh, name).detach(), theta), name
    resumed = _mixed_trainer(transformers, _trainer_model(False), tmp_path / "resumed4")
    resumed.train(resume_from_checkpoint=str(ckpt))
    for name, theta in uninterrupted.items():
        assert torch.equal(uk.adapter_theta(resumed.model, name).detach(), theta), name

    trainer.save_model(str(tmp_path / "final"))
    final = _trainer_model(False)
    uk.load_adapter(final, tmp_path / "final")
    for name in ("a0", "a1"):
        uk.add_adapter(final, name, tmp_path / "final" / name)
    for name, theta in uninterrupted.items():
        assert torch.equal(uk.adapter_theta(final, name).detach(), theta), name


def test_resume_refuses_adapters_in_another_order(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("safetensors")
    transformers.logging.set_verbosity_error()
    trainer = _mixed_trainer(transformers, _trainer_model(True), tmp_path / "full", max_steps=2)
    trainer.train()
    other = _trainer_model(False)
    uk.add_adapter(other, "a1", torch.zeros(256))  # a1 first: optimizer.pt's first adapter moments are a0's
    before = {n: p.detach().clone() for n, p in other.named_parameters()}
    resumed = _mixed_trainer(transformers, other, tmp_path / "resumed", max_steps=2)
    with pytest.raises(ValueError, match="order"):
        resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))
    # refused before anything was loaded: the model is as it was (no adapter added, no theta changed)
    assert uk.adapter_names(other) == ["default", "a1"]
    after = dict(other.named_parameters())
    assert set(after) == set(before) and all(torch.equal(after[n].detach(), t) for n, t in before.items())


# ------------------------------------------- items 7, 8: each adapter its own parameter -----
def _trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def _step(model, opt, names, ids):
    opt.zero_grad()  # set_to_none: an adapter absent from the batch keeps grad None
    with uk.adapter_batch(model, names):
        torch.nn.functional.cross_entropy(model(ids).logits[:, :-1].reshape(-1, 61), ids[:, 1:].reshape(-1),
                                          reduction="sum").backward()
    opt.step()


def _ids(n, seed=0, T=6):
    return torch.randint(0, 61, (n, T), generator=torch.Generator().manual_seed(seed))


def test_an_adapter_absent_from_three_adamw_steps_is_bit_unchanged():
    model = _model([(torch.rand(D_SMALL, generator=torch.Generator().manual_seed(i)) - 0.5) for i in range(3)]).train()
    opt = torch.optim.AdamW(_trainable(model), lr=1e-2)  # weight decay on: that would move it too
    _step(model, opt, ["a2", "a0", "default"], _ids(3, 1))  # a2 gets moments here
    before = uk.adapter_theta(model, "a2").detach().clone()
    for seed in range(3):
        _step(model, opt, ["a0", "default", "a1", "a0"], _ids(4, 2 + seed))
    assert torch.equal(uk.adapter_theta(model, "a2").detach(), before)


def test_gradients_reach_only_the_batch_adapters_and_equal_each_adapter_alone():
    thetas = [(torch.rand(D_SMALL, generator=torch.Generator().manual_seed(i)) - 0.5) for i in range(4)]
    model = _model(thetas).train()  # a0 .. a3
    names = ["a2", "default", "a0", "a2", "__base__"]
    ids = _ids(len(names), 4)
    with uk.adapter_batch(model, names):
        model(input_ids=ids, labels=ids).logits.float().pow(2).sum().backward()
    with_grad = {id(p) for p in model.parameters() if p.grad is not None}
    assert with_grad == {id(uk.adapter_theta(model, n)) for n in ("default", "a0", "a2")}
    for name in ("a0", "a2"):
        rows = [i for i, n in enumerate(names) if n == name]
        alone = _model([], theta_d=thetas[int(name[1])]).train()
        alone(input_ids=ids[rows]).logits.float().pow(2).sum().backward()
        got, want = uk.adapter_theta(model, name).grad, alone.unilora_theta_d.grad
        assert (got - want).abs().max() <= 1e-5 * max(1.0, want.abs().max().item()), name


def test_a_new_adapter_in_a_freed_slot_starts_with_no_optimizer_state():
    model = _model().train()
    opt = torch.optim.AdamW(_trainable(model), lr=1e-2)
    for seed in range(2):
        _step(model, opt, ["a1", "a0"], _ids(2, seed))
    uk.remove_adapter(model, "a1")
    fresh_theta = (torch.rand(D_SMALL, generator=torch.Generator().manual_seed(9)) - 0.5)
    uk.add_adapter(model, "b", fresh_theta)  # the slot a1 had
    b = uk.adapter_theta(model, "b")
    assert b not in opt.state
    opt.add_param_group({"params": [b]})
    _step(model, opt, ["b", "a0"], _ids(2, 7))
    # a fresh optimizer's first step on the same adapter and batch
    ref = _model([uk.adapter_theta(model, "a0").detach().clone()]).train()  # a0: no gradient reaches b from it
    uk.add_adapter(ref, "b", fresh_theta)
    ref_opt = torch.optim.AdamW([uk.adapter_theta(ref, "b")], lr=1e-2)
    _step(ref, ref_opt, ["b", "a0"], _ids(2, 7))
    assert torch.equal(b.detach(), uk.adapter_theta(ref, "b").detach())
    assert opt.state[b]["step"] == 1


def test_an_adapter_added_later_trains_once_added_to_the_optimizer():
    model = _model().train()
    opt = torch.optim.AdamW(_trainable(model), lr=1e-2)
    uk.add_adapter(model, "late", torch.zeros(D_SMALL) + 0.1)
    start = uk.adapter_theta(model, "late").detach().clone()
    _step(model, opt, ["late", "a0"], _ids(2, 3))
    assert torch.equal(uk.adapter_theta(model, "late").detach(), start), "not in the optimizer: not trained"
    opt.add_param_group({"params": uk.adapter_parameters(model, ["late"])})
    _step(model, opt, ["late", "a0"], _ids(2, 3))
    assert not torch.equal(uk.adapter_theta(model, "late").detach(), start)


def test_state_dict_round_trip_across_adding_orders_and_freed_slots():
    g = torch.Generator().manual_seed(11)
    thetas = {n: (torch.rand(D_SMALL, generator=g) - 0.5) for n in ("p", "q", "r", "s")}
    first = _model([])
    for n in ("p", "q", "r"):
        uk.add_adapter(first, n, thetas[n])
    uk.remove_adapter(first, "q")
    uk.add_adapter(first, "s", thetas["s"])  # s takes q's slot
    second = _model([])
    for n in ("s", "r", "p"):
        uk.add_adapter(second, n, torch.zeros(D_SMALL))
    second.load_state_dict(first.state_dict())
    for n in ("p", "r", "s"):
        assert torch.equal(uk.adapter_theta(second, n).detach(), thetas[n]), n
    ids = _ids(3, 5)
    with torch.no_grad(), uk.adapter_batch(first, ["s", "p", "r"]):
        want = first(ids).logits
    with torch.no_grad(), uk.adapter_batch(second, ["s", "p", "r"]):
        assert torch.equal(second(ids).logits, want)
