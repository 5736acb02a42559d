"""Bad input gets a clear ValueError/TypeError, and leaves the model exactly as it was."""

import copy
import json
import warnings

import pytest
import torch
from torch import nn

from conftest import tiny_gpt2, tiny_llama
import unilora_kernels as uk
from unilora_kernels.peft_io import THETA_KEY


def snapshot(model):
    """Everything a failed call must not change: module types, tensors, requires_grad."""
    return (
        [(n, type(m).__name__) for n, m in model.named_modules()],
        {k: v.detach().clone() for k, v in model.state_dict().items()},
        {n: p.requires_grad for n, p in model.named_parameters()},
    )


def assert_untouched(model, snap):
    types, state, grads = snapshot(model)
    assert types == snap[0], "module structure changed"
    assert state.keys() == snap[1].keys(), "state keys changed"
    for k in state:
        assert torch.equal(state[k], snap[1][k]), f"{k} changed"
    assert grads == snap[2], "requires_grad changed"


def saved_adapter(tmp_path, **cfg):
    model = uk.inject(tiny_llama(), uk.UniLoRAConfig(r=2, theta_d_length=40, target_modules=["q_proj"], **cfg))
    uk.save_adapter(model, tmp_path)
    return tmp_path


# ------------------------------------------------------------------ inject --------------------
@pytest.mark.parametrize(
    "cfg,exc,message",
    [
        (dict(target_modules=["nope"]), ValueError, "no module of the model matched"),
        (dict(target_modules=r".*embed_tokens"), TypeError, "Embedding"),
        (dict(target_modules=["input_layernorm"]), TypeError, "LlamaRMSNorm"),
        (dict(target_modules=["q_proj"], backend="cuda"), ValueError, "backend 'cuda'"),
    ],
)
def test_inject_errors_leave_the_model_untouched(cfg, exc, message):
    model = tiny_llama()
    snap = snapshot(model)
    with pytest.raises(exc, match=message):
        uk.inject(model, uk.UniLoRAConfig(r=2, theta_d_length=10, **cfg))
    assert_untouched(model, snap)
    assert not hasattr(model, "unilora_theta_d")


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(r=0), "r must be a positive int"),
        (dict(r=-2), "r must be a positive int"),
        (dict(theta_d_length=0), "theta_d_length must be a positive int"),
        (dict(theta_d_length=-5), "theta_d_length must be a positive int"),
        (dict(unilora_dropout=1.5), "unilora_dropout must be in"),
        (dict(bias="some"), "bias must be one of"),
        (dict(projection="random"), "projection must be one of"),
        (dict(backend="tpu"), "backend must be one of"),
        (dict(target_modules="(unclosed"), "not a valid regex"),
        (dict(target_modules=[]), "target_modules must be"),
        (dict(init_theta_d_bound=0), "init_theta_d_bound"),
    ],
)
def test_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        uk.UniLoRAConfig(**kwargs)


def test_inject_twice_and_bad_model():
    model = uk.inject(tiny_llama(), uk.UniLoRAConfig(r=2, theta_d_length=10, target_modules=["q_proj"]))
    snap = snapshot(model)
    with pytest.raises(ValueError, match="already has a Uni-LoRA adapter"):
        uk.inject(model, uk.UniLoRAConfig(r=2, theta_d_length=10, target_modules=["v_proj"]))
    assert_untouched(model, snap)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        uk.inject("not a model", uk.UniLoRAConfig(target_modules=["q_proj"]))


def test_too_many_lora_parameters_for_int32():
    with torch.device("meta"):  # no memory is allocated for these weights
        model = nn.Sequential(nn.Linear(2**20, 2**20), nn.Linear(2**20, 2**20))
    snap_types = [(n, type(m)) for n, m in model.named_modules()]
    with pytest.raises(ValueError, match="does not fit int32"):
        uk.inject(model, uk.UniLoRAConfig(r=1024, theta_d_length=4096, target_modules=["0", "1"]))
    assert [(n, type(m)) for n, m in model.named_modules()] == snap_types


def test_default_targets_need_a_known_model_type():
    with pytest.raises(ValueError, match="no default target list"):
        uk.inject(nn.Sequential(nn.Linear(3, 3)), uk.UniLoRAConfig())
    with pytest.warns(UserWarning, match="fan_in_fan_out"):  # PEFT's warning, and its correction
        model = uk.inject(tiny_gpt2(), uk.UniLoRAConfig(r=2, theta_d_length=20))  # gpt2 -> c_attn
    assert uk.iter_layers(model)[0][1].bank.config.fan_in_fan_out
    assert [n.rsplit(".", 1)[-1] for n, _ in uk.iter_layers(model)] == ["c_attn", "c_attn"]


# ------------------------------------------------------------------ load_adapter --------------
def _load_fails(path, exc, message, model=None):
    model = model or tiny_llama()
    snap = snapshot(model)
    with pytest.raises(exc, match=message):
        uk.load_adapter(model, path)
    assert_untouched(model, snap)


def test_adapter_of_another_peft_type(tmp_path):
    path = saved_adapter(tmp_path)
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg["peft_type"] = "LORA"
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    _load_fails(path, ValueError, "PEFT type 'LORA'")


def test_peft_lora_adapter_directory(tmp_path):
    model = uk.inject(tiny_llama(), uk.UniLoRAConfig(r=2, theta_d_length=40, target_modules=["q_proj"]))
    uk.export_lora(model, tmp_path)  # a real LoRA adapter directory
    _load_fails(tmp_path, ValueError, "not 'UNILORA'")


def test_theta_of_the_wrong_length(tmp_path):
    from safetensors.torch import save_file

    path = saved_adapter(tmp_path)
    save_file({THETA_KEY: torch.zeros(41)}, str(path / "adapter_model.safetensors"))
    _load_fails(path, ValueError, "theta_d has length 41 but the config says theta_d_length = 40")


def test_theta_with_nan(tmp_path):
    from safetensors.torch import save_file

    path = saved_adapter(tmp_path)
    bad = torch.zeros(40)
    bad[3] = float("nan")
    save_file({THETA_KEY: bad}, str(path / "adapter_model.safetensors"))
    _load_fails(path, ValueError, "NaN or inf")


def test_missing_safetensors(tmp_path):
    path = saved_adapter(tmp_path)
    (path / "adapter_model.safetensors").unlink()
    _load_fails(path, ValueError, "is missing")


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_damaged_safetensors(tmp_path, damage):
    path = saved_adapter(tmp_path)
    f = path / "adapter_model.safetensors"
    data = f.read_bytes()
    f.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"\x00\xff" * 64, "empty": b""}[damage])
    _load_fails(path, ValueError, "damaged or not a safetensors file")


def test_missing_theta_key(tmp_path):
    from safetensors.torch import save_file

    path = saved_adapter(tmp_path)
    save_file({"something.else": torch.zeros(40)}, str(path / "adapter_model.safetensors"))
    _load_fails(path, ValueError, "no 'base_model.unilora_theta_d'")


def test_bad_config_files(tmp_path):
    _load_fails(tmp_path / "does-not-exist", ValueError, "does not exist")
    empty = tmp_path / "empty"
    empty.mkdir()
    _load_fails(empty, ValueError, "not an adapter directory")
    path = saved_adapter(tmp_path / "broken")
    (path / "adapter_config.json").write_text("{not json")
    _load_fails(path, ValueError, "not valid JSON")


def test_unsupported_peft_options(tmp_path):
    path = saved_adapter(tmp_path)
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg["layers_to_transform"] = [0]
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    _load_fails(path, ValueError, "layers_to_transform")


def test_adapter_for_another_model(tmp_path):
    path = saved_adapter(tmp_path)
    _load_fails(path, ValueError, "no module of the model matched", model=tiny_gpt2())


def test_mismatched_adapter_into_an_injected_model(tmp_path):
    path = saved_adapter(tmp_path)
    model = uk.inject(tiny_llama(), uk.UniLoRAConfig(r=2, theta_d_length=50, target_modules=["q_proj"]))
    _load_fails(path, ValueError, "theta_d_length=50", model=model)
    model = uk.inject(tiny_llama(), uk.UniLoRAConfig(r=2, theta_d_length=40, target_modules=["q_proj", "v_proj"]))
    _load_fails(path, ValueError, "the checkpoint adapts 2 layers", model=model)


def test_stored_indices_out_of_range(tmp_path):
    from safetensors.torch import load_file, save_file

    path = saved_adapter(tmp_path, save_indices=True)
    f = str(path / "adapter_model.safetensors")
    tensors = load_file(f)
    key = next(k for k in tensors if k.endswith("unilora_indices_A"))
    tensors[key][0, 0] = 40
    save_file(tensors, f)
    _load_fails(path, ValueError, "outside")


def test_save_adapter_needs_an_adapter(tmp_path):
    with pytest.raises(ValueError, match="no Uni-LoRA adapter"):
        uk.save_adapter(tiny_llama(), tmp_path)
    with pytest.raises(ValueError, match="no Uni-LoRA adapter"):
        uk.export_lora(tiny_llama())


def test_save_replaces_an_adapter_of_the_other_kind(tmp_path):
    base = tiny_llama()
    uniform = uk.inject(copy.deepcopy(base), uk.UniLoRAConfig(r=2, theta_d_length=40, target_modules=["q_proj"]))
    uk.save_adapter(uniform, tmp_path)
    hashed = uk.inject(copy.deepcopy(base), uk.UniLoRAConfig(r=2, theta_d_length=40, target_modules=["q_proj"],
                                                             projection="hashed"))
    uk.save_adapter(hashed, tmp_path)
    assert not (tmp_path / "adapter_config.json").exists()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = uk.load_adapter(copy.deepcopy(base), tmp_path)
    assert uk.iter_layers(loaded)[0][1].bank.projection == "hashed"
    assert not list(tmp_path.glob("*.tmp*")), "temporary files left behind"
