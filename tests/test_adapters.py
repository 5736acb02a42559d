"""Many adapters in one model: the registry, mixed batches through whole models (forward,
``generate``, training, ``torch.compile``), saving one adapter, memory, and the errors."""

from __future__ import annotations

import copy

import pytest
import torch

import unilora_kernels as uk
from conftest import tiny_llama
from contract import availability_marks
from unilora_kernels.model import find_bank

D_SMALL = 97


BACKEND_PARAMS = [pytest.param(b, marks=availability_marks(b, "cpu")) for b in ("reference", "cpu", "triton")]


def _model(projection="uniform", backend="auto", d=D_SMALL, **cfg):
    torch.manual_seed(0)
    base = tiny_llama()
    model = uk.inject(copy.deepcopy(base), uk.UniLoRAConfig(r=2, theta_d_length=d, target_modules="all-linear",
                                                            projection=projection, backend=backend, **cfg))
    return base, model


def _segments_under_the_interpreter(monkeypatch, backend):
    """Triton's segmented mixed schedule for a whole-model test: under the interpreter the per-row
    schedule (sequences under 16 tokens) runs a program, and its adapter tile's indices, per row,
    several times slower; both schedules, forward and backward, are held to the float64 oracle in
    tests/test_mixed_triton.py and tests/test_mixed_backends.py."""
    if backend == "triton":
        monkeypatch.setenv("UNILORA_TRITON_MIXED_SCHEDULE", "segments")


def _thetas(n, d=D_SMALL, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.rand(d, generator=g) * 2 - 1) * 0.5 for _ in range(n)]


def _alone(model, theta, ids, **kw):
    """``model`` run on ``ids`` with ``theta`` as its theta_d (the way to run one adapter today)."""
    saved = model.unilora_theta_d.detach().clone()
    with torch.no_grad():
        model.unilora_theta_d.copy_(theta)
        try:
            return model(ids, **kw).logits
        finally:
            model.unilora_theta_d.copy_(saved)


def _close(a, b, rel):
    err = (a - b).abs().max().item()
    assert err <= rel * max(1.0, b.abs().max().item()), err


# ------------------------------------------------------------------------------ forward -----
@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("projection", ["uniform", "hashed"])
def test_each_row_equals_its_sequence_alone(monkeypatch, backend, projection):
    _segments_under_the_interpreter(monkeypatch, backend)
    base, model = _model(projection, backend)
    thetas = _thetas(3)
    for i, t in enumerate(thetas):
        uk.add_adapter(model, f"a{i}", t)
    names = ["a2", "__base__", "default", "a0", "a2", "a1"]
    ids = torch.randint(0, 61, (len(names), 7))
    with torch.no_grad(), uk.adapter_batch(model, names):
        mixed = model(ids).logits
        base_logits = base(ids).logits
    own = {"default": model.unilora_theta_d.detach(), **{f"a{i}": t for i, t in enumerate(thetas)}}
    for row, name in enumerate(names):
        if name == "__base__":
            assert torch.equal(mixed[row], base_logits[row]), "a __base__ row must be the base model exactly"
        else:
            _close(mixed[row], _alone(model, own[name], ids[row : row + 1])[0], 1e-5)


def test_adapter_batch_restores_and_nests():
    _, model = _model()
    uk.add_adapter(model, "a", _thetas(1)[0])
    ids = torch.randint(0, 61, (2, 5))
    with torch.no_grad():
        plain = model(ids).logits
        with uk.adapter_batch(model, ["a", "a"]):
            with uk.adapter_batch(model, ["default", "default"]):
                inner = model(ids).logits
            outer = model(ids).logits
        after = model(ids).logits
    _close(inner, plain, 1e-6)
    assert torch.equal(after, plain)
    assert not torch.allclose(outer, plain)


# ----------------------------------------------------------------------------- generate -----
def test_generate_mixed_batch_equals_each_sequence_alone():
    """Greedy generate of 4 adapters + base with left padding, token for token."""
    base, model = _model()
    for i, t in enumerate(_thetas(4, seed=5)):
        uk.add_adapter(model, f"a{i}", t * 4)  # large adapters: every sequence's tokens differ
    names = ["a0", "a1", "__base__", "a2", "a3"]
    lengths = [6, 3, 5, 4, 6]
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(1, 61, (n,), generator=g) for n in lengths]
    width = max(lengths)
    ids = torch.zeros(len(names), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = p
        mask[i, width - len(p):] = 1
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with uk.adapter_batch(model, names):
        together = model.generate(input_ids=ids, attention_mask=mask, **kw)[:, width:]
    for i, (name, p) in enumerate(zip(names, prompts)):
        with uk.adapter_batch(model, [name]):
            alone = model.generate(input_ids=p[None], attention_mask=torch.ones_like(p)[None], **kw)[0, len(p):]
        assert torch.equal(together[i], alone), (name, together[i], alone)
    with torch.no_grad():
        alone_base = base.generate(input_ids=prompts[2][None], **kw)[0, len(prompts[2]):]
    assert torch.equal(together[2], alone_base)


# ----------------------------------------------------------------------------- training -----
@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_training_many_adapters_equals_training_each_alone(monkeypatch, backend):
    """3 AdamW steps on one mixed batch give each adapter the theta that training it alone on its
    rows gives (fp32, 1e-6)."""
    _segments_under_the_interpreter(monkeypatch, backend)
    _, model = _model(backend=backend)
    model.train()
    starts = _thetas(3, seed=7)
    for i, t in enumerate(starts[1:]):
        uk.add_adapter(model, f"a{i}", t)
    with torch.no_grad():
        model.unilora_theta_d.copy_(starts[0])
    names = ["a1", "default", "a0", "a1", "__base__"]
    ids = torch.randint(0, 61, (len(names), 8))

    def loss_of(logits, rows):
        return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 61), ids[rows, 1:].reshape(-1),
                                                 reduction="sum")

    params = uk.adapter_parameters(model)
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    for _ in range(3):
        opt.zero_grad()
        with uk.adapter_batch(model, names):
            loss_of(model(ids).logits, slice(None)).backward()
        opt.step()
    trained = {n: uk.adapter_theta(model, n).detach().clone() for n in ("default", "a0", "a1")}
    for name, start in zip(("default", "a0", "a1"), starts):
        rows = [i for i, n in enumerate(names) if n == name]
        _, alone = _model(backend=backend)
        alone.train()
        with torch.no_grad():
            alone.unilora_theta_d.copy_(start)
        opt = torch.optim.AdamW([alone.unilora_theta_d], lr=1e-2, weight_decay=0.0)
        for _ in range(3):
            opt.zero_grad()
            loss_of(alone(ids[rows]).logits, rows).backward()
            opt.step()
        _close(trained[name], alone.unilora_theta_d.detach(), 1e-6)


# ------------------------------------------------------------------------------ compile -----
@pytest.mark.parametrize("backend", BACKEND_PARAMS[:2])
@pytest.mark.parametrize("compiler", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compiled_mixed_batch_has_no_graph_break_and_no_recompile(compiler, backend):
    _, model = _model(backend=backend)
    for i, t in enumerate(_thetas(3)):
        uk.add_adapter(model, f"a{i}", t)
    ids = torch.randint(0, 61, (4, 5))
    compiled = torch.compile(model, fullgraph=True, backend=compiler)
    torch._dynamo.reset()
    with torch.no_grad():
        for names in (["a0", "a1", "default", "__base__"], ["a2", "a2", "a0", "default"]):
            with uk.adapter_batch(model, names):
                got = compiled(ids).logits
                want = model(ids).logits
            _close(got, want, 1e-5)
        uk.remove_adapter(model, "a0")
        uk.add_adapter(model, "a3", _thetas(1, seed=9)[0])  # a free row: no growth, no new shape
        with torch._dynamo.config.patch(error_on_recompile=True):
            for names in (["a1", "__base__", "a1", "a3"], ["default"] * 4):
                with uk.adapter_batch(model, names):
                    _close(compiled(ids).logits, model(ids).logits, 1e-5)


def test_compiled_mixed_training_step_matches_eager():
    _, model = _model(backend="reference")
    model.train()
    for i, t in enumerate(_thetas(2)):
        uk.add_adapter(model, f"a{i}", t)
    ids = torch.randint(0, 61, (3, 6))
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    grads = []
    for m in (model, compiled):
        model.zero_grad(set_to_none=True)
        with uk.adapter_batch(model, ["a1", "default", "a0"]):
            m(input_ids=ids, labels=ids).loss.backward()
        grads.append([p.grad.clone() for p in uk.adapter_parameters(model)])
    for eager, comp in zip(*grads):
        _close(comp, eager, 1e-6)
    assert all(g.abs().sum() > 0 for g in grads[0])


# ----------------------------------------------------------------------- saving, memory -----
def test_save_adapter_by_name_round_trips(tmp_path):
    base, model = _model()
    theta = _thetas(1)[0]
    uk.add_adapter(model, "fr", theta)
    uk.save_adapter(model, tmp_path / "fr", name="fr")
    loaded = uk.load_adapter(copy.deepcopy(base), tmp_path / "fr")
    assert torch.equal(loaded.unilora_theta_d.detach(), theta)
    uk.add_adapter(model, "fr2", tmp_path / "fr")  # a directory is a source too
    assert torch.equal(uk.adapter_theta(model, "fr2"), theta)
    with pytest.raises(ValueError, match="unknown adapter 'nope'"):
        uk.save_adapter(model, tmp_path / "x", name="nope")


def test_peft_saved_adapter_is_a_source(tmp_path):
    peft = pytest.importorskip("peft")
    base = tiny_llama()
    pcfg = peft.UniLoraConfig(r=2, theta_d_length=D_SMALL, target_modules=["q_proj", "v_proj"])
    pm = peft.get_peft_model(copy.deepcopy(base), pcfg)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "unilora_theta_d" in n:
                p.copy_(torch.linspace(-1, 1, D_SMALL))
    pm.save_pretrained(tmp_path / "peft")
    ours = uk.inject(copy.deepcopy(base), uk.UniLoRAConfig.from_peft_config(pcfg))
    uk.add_adapter(ours, "p", tmp_path / "peft")
    ids = torch.randint(0, 61, (2, 6))
    with torch.no_grad(), uk.adapter_batch(ours, ["p", "__base__"]):
        got = ours(ids).logits
    with torch.no_grad():
        want = pm(ids).logits
    _close(got[0], want[0], 1e-5)


def test_thousand_adapters_fit_in_100_mb():
    """1,024 adapters of d = 23,040 registered at once: their parameters are the only storage they take."""
    _, model = _model(d=23_040)
    theta = torch.randn(23_040)
    for i in range(1024):
        uk.add_adapter(model, f"a{i}", theta)
    mem = uk.adapter_memory(model)
    added = uk.adapter_parameters(model)[1:]
    assert mem["table_bytes"] == sum(p.numel() * p.element_size() for p in added) <= 100e6
    assert mem["capacity"] == 1024 and mem["adapters"] == 1025 and mem["bytes_per_adapter"] == 23_040 * 4
    D = sum(layer.r * (layer.in_features + layer.out_features) for _, layer in uk.iter_layers(model))
    assert mem["lora_bytes_per_adapter"] == D * 4


def test_bf16_table_on_request():
    _, model = _model()
    uk.add_adapter(model, "a", _thetas(1)[0], dtype=torch.bfloat16)
    assert uk.adapter_theta(model, "a").dtype == torch.bfloat16
    assert uk.adapter_memory(model)["bytes_per_adapter"] == D_SMALL * 2
    with pytest.raises(ValueError, match="bfloat16"):
        uk.add_adapter(model, "b", _thetas(1)[0], dtype=torch.float32)


def test_each_adapter_is_a_parameter_and_a_removed_one_leaves():
    _, model = _model()
    thetas = _thetas(6)
    for i, t in enumerate(thetas[:5]):
        uk.add_adapter(model, f"a{i}", t)
    assert uk.adapter_memory(model)["capacity"] == 5
    old = uk.adapter_theta(model, "a1")
    uk.remove_adapter(model, "a1")
    assert all(p is not old for p in model.parameters())
    uk.add_adapter(model, "b", thetas[5])
    assert uk.adapter_names(model) == ["default", "a0", "a2", "a3", "a4", "b"]
    assert uk.adapter_theta(model, "b") is not old and uk.adapter_memory(model)["capacity"] == 5
    assert isinstance(uk.adapter_theta(model, "b"), torch.nn.Parameter)
    assert torch.equal(uk.adapter_theta(model, "b"), thetas[5])
    assert torch.equal(uk.adapter_theta(model, "a4"), thetas[4])


# ------------------------------------------------------------------------------- errors -----
def _other(tmp_path, base, name, **cfg):
    other = uk.inject(copy.deepcopy(base), uk.UniLoRAConfig(**{**dict(r=2, theta_d_length=D_SMALL,
                                                                     target_modules="all-linear"), **cfg}))
    uk.save_adapter(other, tmp_path / name)
    return tmp_path / name


@pytest.mark.parametrize("field,cfg", [
    ("r", dict(r=3)), ("theta_d_length", dict(theta_d_length=98)), ("proj_seed", dict(proj_seed=7)),
    ("projection", dict(projection="hashed")), ("layers", dict(target_modules=["q_proj"])),
])
def test_mismatched_adapter_is_refused_naming_the_field(tmp_path, field, cfg):
    base, model = _model()
    uk.add_adapter(model, "ok", _thetas(1)[0])
    before = (uk.adapter_names(model), dict(model.named_parameters()))
    with pytest.raises(ValueError, match=field):
        uk.add_adapter(model, "bad", _other(tmp_path, base, field, **cfg))
    assert uk.adapter_names(model) == before[0] and dict(model.named_parameters()) == before[1]


def test_bad_names_and_sources_are_clear_errors():
    _, model = _model()
    uk.add_adapter(model, "a", _thetas(1)[0])
    ids = torch.randint(0, 61, (2, 5))
    with pytest.raises(ValueError, match="unknown adapter 'zz'"):
        with uk.adapter_batch(model, ["a", "zz"]):
            pass
    with pytest.raises(ValueError, match="names 3 sequences"):
        with torch.no_grad(), uk.adapter_batch(model, ["a", "a", "default"]):
            model(ids)
    assert find_bank(model).batch is None  # the failed forward left the batch context cleanly
    with pytest.raises(ValueError, match="taken"):
        uk.add_adapter(model, "a", _thetas(1)[0])
    for reserved in ("default", "__base__"):
        with pytest.raises(ValueError, match="taken"):
            uk.add_adapter(model, reserved, _thetas(1)[0])
    with pytest.raises(ValueError, match="d = 5"):
        uk.add_adapter(model, "short", torch.zeros(5))
    with pytest.raises(ValueError, match="NaN"):
        uk.add_adapter(model, "nan", torch.full((D_SMALL,), float("nan")))
    with pytest.raises(ValueError, match="does not exist"):
        uk.add_adapter(model, "nodir", "/nonexistent/adapter")
    with pytest.raises(ValueError, match="cannot be removed"):
        uk.remove_adapter(model, "default")
    with pytest.raises(ValueError, match="unknown adapter"):
        uk.remove_adapter(model, "zz")
    with pytest.raises(ValueError, match="list of adapter names"):
        with uk.adapter_batch(model, "a"):
            pass
    assert uk.adapter_names(model) == ["default", "a"]
    uk.merge(model)
    with pytest.raises(ValueError, match="unmerge"):
        with uk.adapter_batch(model, ["a", "a"]):
            pass
