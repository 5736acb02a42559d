"""PEFT compatibility (peft 0.21.2 ``peft.tuners.unilora``): indices, outputs, grads, files."""

import copy
import json
import warnings

import pytest
import torch

from conftest import tiny_gpt2, tiny_llama
import unilora_kernels as uk

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, UniLoraConfig, get_peft_model, set_peft_model_state_dict  # noqa: E402
from peft.tuners.unilora.layer import UniLoraLayer  # noqa: E402

RTOL = 1e-5  # the acceptance bar for fp32 parity with PEFT

MODELS = {
    "llama": (lambda: tiny_llama(), ["q_proj", "v_proj", "down_proj"]),
    "llama_regex": (lambda: tiny_llama(), r".*\.(k_proj|o_proj|up_proj)"),
    "llama_all_linear": (lambda: tiny_llama(), "all-linear"),
    "gpt2": (lambda: tiny_gpt2(), ["c_attn", "c_proj"]),
    "gpt2_fc": (lambda: tiny_gpt2(), ["c_fc"]),
}


def _ids(vocab=61, batch=2, length=9, seed=0):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def _close(a, b, rtol=RTOL, what=""):
    err = (a - b).abs().max().item()
    scale = b.abs().max().item()
    assert err <= rtol * max(scale, 1e-30), f"{what}: max err {err:.3e} vs scale {scale:.3e}"


def _pair(name, **cfg):
    """(PEFT model, our model) from one base model and one config, same theta_d values."""
    make, targets = MODELS[name]
    torch.manual_seed(0)
    base = make()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pcfg = UniLoraConfig(r=4, theta_d_length=97, proj_seed=7, target_modules=targets, **cfg)
        pm = get_peft_model(copy.deepcopy(base), pcfg)
        ours = uk.inject(copy.deepcopy(base), uk.UniLoRAConfig.from_peft_config(pcfg))
    with torch.no_grad():
        pm.base_model.unilora_theta_d["default"].uniform_(-0.5, 0.5)  # a visible update
        ours.unilora_theta_d.copy_(pm.base_model.unilora_theta_d["default"])
    return pm, ours, base


def _peft_layers(pm):
    return [(n.removeprefix("base_model.model."), m) for n, m in pm.named_modules() if isinstance(m, UniLoraLayer)]


@pytest.mark.parametrize("name", list(MODELS))
def test_inject_equals_peft(name):
    pm, ours, _ = _pair(name)
    theirs, mine = _peft_layers(pm), uk.iter_layers(ours)
    assert [n for n, _ in theirs] == [n for n, _ in mine]
    for (_, a), (_, b) in zip(theirs, mine):
        assert b.unilora_indices_A.dtype == torch.int32
        assert torch.equal(a.unilora_indices_A["default"], b.unilora_indices_A.long())
        assert torch.equal(a.unilora_indices_B["default"], b.unilora_indices_B.long())
        assert torch.equal(a.unilora_scales_A["default"], ours.unilora_scales[b.unilora_indices_A.long()])
        assert torch.equal(a.unilora_scales_B["default"], ours.unilora_scales[b.unilora_indices_B.long()])
    # exactly one trainable parameter, fp32, length d
    trainable = [(n, p) for n, p in ours.named_parameters() if p.requires_grad]
    assert [n for n, _ in trainable] == ["unilora_theta_d"]
    assert trainable[0][1].dtype == torch.float32 and trainable[0][1].shape == (97,)
    ids = _ids()
    y_p, y_o = pm(ids).logits, ours(ids).logits
    _close(y_o, y_p, what="logits")
    y_p.pow(2).mean().backward()
    y_o.pow(2).mean().backward()
    _close(ours.unilora_theta_d.grad, pm.base_model.unilora_theta_d["default"].grad, what="theta grad")


def test_inject_returns_the_same_object_and_generate_works():
    base = tiny_llama()
    model = uk.inject(base, uk.UniLoRAConfig(r=2, theta_d_length=50, target_modules=["q_proj"]))
    assert model is base
    out = model.generate(_ids(batch=1, length=4), max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 7)


def test_from_peft_keeps_theta_and_outputs():
    pm, _, _ = _pair("gpt2")
    ids = _ids()
    expected = pm(ids).logits.detach()
    theta = pm.base_model.unilora_theta_d["default"]
    hf = uk.from_peft(pm)
    assert hf.unilora_theta_d is theta  # the same Parameter: optimizer state stays valid
    assert all(isinstance(m, uk.UniLoRALinear) for _, m in uk.iter_layers(hf))
    assert not any(isinstance(m, UniLoraLayer) for m in hf.modules())
    y = hf(ids).logits
    _close(y, expected, what="from_peft logits")
    y.pow(2).mean().backward()
    assert theta.grad is not None and theta.grad.abs().sum() > 0


def test_save_then_peft_loads(tmp_path):
    pm, ours, base = _pair("llama")
    uk.save_adapter(ours, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "UNILORA" and cfg["theta_d_length"] == 97 and "projection" not in cfg
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    ids = _ids()
    _close(loaded(ids).logits, ours(ids).logits, what="PEFT-loaded logits")


def test_peft_save_then_load(tmp_path):
    pm, _, base = _pair("gpt2")
    pm.save_pretrained(tmp_path)
    model = uk.load_adapter(copy.deepcopy(base), tmp_path)
    ids = _ids()
    _close(model(ids).logits, pm(ids).logits, what="loaded logits")
    assert torch.equal(model.unilora_theta_d.detach(), pm.base_model.unilora_theta_d["default"].detach())


def test_load_into_an_injected_model_changes_only_theta(tmp_path):
    pm, ours, base = _pair("llama")
    pm.save_pretrained(tmp_path)
    fresh = uk.inject(copy.deepcopy(base), uk.UniLoRAConfig.from_peft_config(pm.peft_config["default"]))
    theta_obj = fresh.unilora_theta_d
    uk.load_adapter(fresh, tmp_path)
    assert fresh.unilora_theta_d is theta_obj
    ids = _ids()
    _close(fresh(ids).logits, ours(ids).logits, what="logits")


@pytest.mark.parametrize("bias", ["all", "unilora_only"])
def test_bias_training_round_trips(tmp_path, bias):
    pm, ours, base = _pair("gpt2", bias=bias)
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    peft_trainable = {n.removeprefix("base_model.model.") for n, p in pm.named_parameters() if p.requires_grad}
    peft_trainable = {n.replace(".unilora_theta_d.default", "") for n in peft_trainable}
    assert trainable - {"unilora_theta_d"} == {n for n in peft_trainable if n.endswith("bias")}
    with torch.no_grad():
        for n, p in ours.named_parameters():
            if n.endswith("bias") and p.requires_grad:
                p.add_(0.25)
    uk.save_adapter(ours, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    mine = uk.load_adapter(copy.deepcopy(base), tmp_path)
    ids = _ids()
    _close(loaded(ids).logits, ours(ids).logits, what="PEFT with biases")
    _close(mine(ids).logits, ours(ids).logits, what="ours with biases")


def test_save_indices_round_trips_both_ways(tmp_path):
    pm, ours, base = _pair("llama", save_indices=True)
    pm.save_pretrained(tmp_path / "peft")
    mine = uk.load_adapter(copy.deepcopy(base), tmp_path / "peft")
    ids = _ids()
    _close(mine(ids).logits, pm(ids).logits, what="ours from PEFT with indices")
    uk.save_adapter(mine, tmp_path / "ours")
    from safetensors.torch import load_file

    keys = load_file(tmp_path / "ours" / "adapter_model.safetensors").keys()
    assert any(k.endswith("unilora_indices_A") for k in keys)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    _close(back(ids).logits, pm(ids).logits, what="PEFT from ours with indices")


def test_merge_then_forward_equals_unmerged():
    _, ours, _ = _pair("gpt2")
    ids = _ids()
    with torch.no_grad():
        expected = ours(ids).logits
        uk.merge(ours)
        merged = ours(ids).logits
        uk.unmerge(ours)
        again = ours(ids).logits
    _close(merged, expected, rtol=1e-5, what="merged")
    _close(again, expected, rtol=1e-5, what="unmerged")


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_export_lora_loads_into_peft_lora(tmp_path, name):
    pm, ours, base = _pair(name)
    state = uk.export_lora(ours, tmp_path)
    names = [n for n, _ in uk.iter_layers(ours)]
    assert set(state) == {f"base_model.model.{n}.lora_{ab}.weight" for n in names for ab in "AB"}
    fan_in_fan_out = name == "gpt2"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lora = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=4, target_modules=names,
                                                              fan_in_fan_out=fan_in_fan_out, lora_dropout=0.0))
        result = set_peft_model_state_dict(lora, state)
        from_dir = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert not result.unexpected_keys
    ids = _ids()
    expected = ours(ids).logits
    _close(lora(ids).logits, expected, what="LoRA from state dict")
    _close(from_dir(ids).logits, expected, what="LoRA from directory")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_precision_model_matches_peft(dtype):
    torch.manual_seed(0)
    base = tiny_llama(dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pcfg = UniLoraConfig(r=4, theta_d_length=97, target_modules=["q_proj", "v_proj", "up_proj"])
        pm = get_peft_model(copy.deepcopy(base), pcfg)
    ours = uk.inject(copy.deepcopy(base), uk.UniLoRAConfig.from_peft_config(pcfg))
    assert ours.unilora_theta_d.dtype == torch.float32
    with torch.no_grad():
        pm.base_model.unilora_theta_d["default"].uniform_(-0.5, 0.5)
        ours.unilora_theta_d.copy_(pm.base_model.unilora_theta_d["default"])
    ids = _ids()
    y_p, y_o = pm(ids).logits, ours(ids).logits
    assert y_o.dtype == dtype
    _close(y_o.float(), y_p.float(), rtol=2e-2, what=f"{dtype} logits")
    y_o.float().pow(2).mean().backward()
    assert ours.unilora_theta_d.grad.dtype == torch.float32 and torch.isfinite(ours.unilora_theta_d.grad).all()


def test_hashed_adapter_round_trip_and_peft_refuses(tmp_path):
    base = tiny_llama()
    cfg = uk.UniLoRAConfig(r=3, theta_d_length=64, target_modules=["q_proj", "v_proj"], projection="hashed")
    model = uk.inject(copy.deepcopy(base), cfg)
    with torch.no_grad():
        model.unilora_theta_d.uniform_(-0.5, 0.5)
    uk.save_adapter(model, tmp_path)
    assert not (tmp_path / "adapter_config.json").exists()
    loaded = uk.load_adapter(copy.deepcopy(base), tmp_path)
    assert uk.iter_layers(loaded)[0][1].bank.projection == "hashed"
    ids = _ids()
    assert torch.equal(loaded(ids).logits, model(ids).logits)
    with pytest.raises(Exception):
        PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    with pytest.raises(ValueError, match="uniform"):
        cfg.to_peft_config()


def test_config_conversion_round_trip():
    pcfg = UniLoraConfig(r=8, theta_d_length=1234, proj_seed=3, target_modules=["q_proj"], unilora_dropout=0.1,
                         init_theta_d_bound=0.05, bias="all", save_indices=True)
    cfg = uk.UniLoRAConfig.from_peft_config(pcfg)
    assert (cfg.r, cfg.theta_d_length, cfg.proj_seed, cfg.unilora_dropout, cfg.bias, cfg.save_indices) == (
        8, 1234, 3, 0.1, "all", True)
    back = cfg.to_peft_config()
    for field in ("r", "theta_d_length", "proj_seed", "unilora_dropout", "init_theta_d_bound", "bias", "save_indices"):
        assert getattr(back, field) == getattr(pcfg, field)
    assert set(back.target_modules) == {"q_proj"}
    defaults = uk.UniLoRAConfig()
    peft_defaults = UniLoraConfig()
    for field in ("r", "theta_d_length", "proj_seed", "unilora_dropout", "init_theta_d_bound", "fan_in_fan_out",
                  "bias", "save_indices", "init_weights"):
        assert getattr(defaults, field) == getattr(peft_defaults, field), field
    assert (defaults.projection, defaults.backend) == ("uniform", "auto")
    assert json.loads(json.dumps(cfg.to_peft_dict()))["peft_type"] == "UNILORA"


def test_dropout_trains_through_a_whole_model():
    base = tiny_llama()
    model = uk.inject(base, uk.UniLoRAConfig(r=4, theta_d_length=128, target_modules="all-linear",
                                             unilora_dropout=0.2))
    model.train()
    opt = torch.optim.SGD([model.unilora_theta_d], lr=0.5)
    ids = _ids(batch=4, length=12)
    losses = []
    for _ in range(8):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
