"""transformers.Trainer with Uni-LoRA: adapter-only checkpoints, exact resume, save_model, the example."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

import unilora_kernels as uk

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")
from unilora_kernels.hf_trainer import UniLoRATrainer, adapter_checkpoints  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VOCAB, SEQ = 2000, 8
CONFIG = dict(r=4, theta_d_length=4096, target_modules=["q_proj", "v_proj", "up_proj"], unilora_dropout=0.1)


def llama_10m():
    """LLaMA-shaped, about 10.8M base parameters, random weights (nothing downloaded)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    transformers.logging.set_verbosity_error()
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=512, intermediate_size=1376, num_hidden_layers=3,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=64)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg)


def dataset(n: int = 24):
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, VOCAB, (n, SEQ), generator=gen)
    return [{"input_ids": row, "labels": row} for row in ids]


def args(out, **kw):
    base = dict(output_dir=str(out), per_device_train_batch_size=2, learning_rate=1e-2, max_steps=6,
                save_steps=3, save_strategy="steps", logging_steps=100, report_to=[], use_cpu=True,
                dataloader_num_workers=0, seed=7, disable_tqdm=True)
    base.update(kw)
    return transformers.TrainingArguments(**base)


def dir_bytes(path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


@pytest.fixture(scope="module")
def base_state():
    model = llama_10m()
    n = sum(p.numel() for p in model.parameters())
    assert n >= 10_000_000, n
    return {k: v.clone() for k, v in model.state_dict().items()}


def fresh(base_state):
    model = llama_10m()
    model.load_state_dict(base_state)
    torch.manual_seed(11)  # theta_d's initialisation
    return uk.inject(model, uk.UniLoRAConfig(**CONFIG))


@pytest.mark.slow  # about 30 s on 2 loaded CPU cores: three 10M-parameter models, 9 Trainer steps
def test_checkpoints_hold_the_adapter_and_resume_is_exact(tmp_path, base_state):
    model = fresh(base_state)
    trainer = UniLoRATrainer(model=model, args=args(tmp_path / "full"), train_dataset=dataset())
    trainer.train()
    uninterrupted = model.unilora_theta_d.detach().clone()

    for step in (3, 6):
        ckpt = tmp_path / "full" / f"checkpoint-{step}"
        names = sorted(p.name for p in ckpt.iterdir())
        assert "adapter_config.json" in names and "adapter_model.safetensors" in names, names
        assert not {"model.safetensors", "pytorch_model.bin", "config.json"} & set(names), names
        assert {"optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"} <= set(names), names
        assert dir_bytes(ckpt) <= 1_000_000, dir_bytes(ckpt)
    # The last checkpoint is the adapter as trained (PEFT's file layout, loadable by load_adapter).
    reloaded = uk.load_adapter(fresh(base_state), tmp_path / "full" / "checkpoint-6")
    assert torch.equal(reloaded.unilora_theta_d.detach(), uninterrupted)

    # Interrupted at step 3: a new process would rebuild the model, inject, and resume.
    resumed_model = fresh(base_state)
    assert not torch.equal(resumed_model.unilora_theta_d.detach(), uninterrupted)
    resumed = UniLoRATrainer(model=resumed_model, args=args(tmp_path / "resumed"), train_dataset=dataset())
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-3"))
    assert resumed.state.global_step == 6
    assert torch.equal(resumed_model.unilora_theta_d.detach(), uninterrupted)


def test_save_model_writes_the_adapter_and_plain_trainer_does_not(tmp_path):
    torch.manual_seed(0)
    from conftest import tiny_llama

    model = uk.inject(tiny_llama().train(), uk.UniLoRAConfig(r=2, theta_d_length=256, target_modules="all-linear"))
    data = [{"input_ids": row, "labels": row} for row in torch.randint(0, 61, (4, 6))]
    trainer = adapter_checkpoints(transformers.Trainer(model=model, args=args(tmp_path / "a", max_steps=1),
                                                       train_dataset=data))
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    names = sorted(p.name for p in (tmp_path / "final").iterdir())
    assert names == ["adapter_config.json", "adapter_model.safetensors", "training_args.bin"], names
    loaded = uk.load_adapter(tiny_llama(), tmp_path / "final")
    assert torch.equal(loaded.unilora_theta_d, model.unilora_theta_d.detach())

    # What this module fixes: the stock Trainer writes the whole model into every checkpoint.
    plain = transformers.Trainer(model=model, args=args(tmp_path / "b", max_steps=1), train_dataset=data)
    plain.save_model(str(tmp_path / "plain"))
    assert (tmp_path / "plain" / "model.safetensors").exists()


def test_example_trains_with_trainer(tmp_path):
    spec = importlib.util.spec_from_file_location("train_with_trainer", ROOT / "examples" / "train_with_trainer.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    result = example.main(["--steps", "8", "--output-dir", str(tmp_path), "--save-steps", "4"])
    assert result["last_loss"] < result["first_loss"], result
    assert result["checkpoint_bytes"] <= 1_000_000
    assert os.path.isfile(os.path.join(result["adapter_dir"], "adapter_model.safetensors"))


def test_load_best_model_at_end_loads_the_best_adapter(tmp_path):
    from conftest import tiny_llama

    torch.manual_seed(0)
    config = uk.UniLoRAConfig(r=2, theta_d_length=256, target_modules=["q_proj", "v_proj", "down_proj"])
    model = uk.inject(tiny_llama().train(), config)
    data = [{"input_ids": row, "labels": row} for row in torch.randint(0, 61, (8, 6))]
    trainer = UniLoRATrainer(model=model, train_dataset=data, eval_dataset=data[:4], args=args(
        tmp_path, max_steps=3, save_steps=1, eval_strategy="steps", eval_steps=1, load_best_model_at_end=True,
        metric_for_best_model="loss", learning_rate=0.5))  # a large step: the evaluations differ
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best is not None and os.path.basename(best).startswith("checkpoint-")
    saved = uk.load_adapter(tiny_llama(), best).unilora_theta_d
    assert torch.equal(model.unilora_theta_d.detach(), saved)


def test_resume_with_all_linear_targets(tmp_path):
    from conftest import tiny_llama

    def run(out, resume=None):
        torch.manual_seed(0)
        model = uk.inject(tiny_llama().train(), uk.UniLoRAConfig(r=2, theta_d_length=256, target_modules="all-linear"))
        data = [{"input_ids": row, "labels": row} for row in torch.randint(0, 61, (8, 6))]
        UniLoRATrainer(model=model, train_dataset=data, args=args(out, max_steps=4, save_steps=2)).train(
            resume_from_checkpoint=resume)
        return model.unilora_theta_d.detach()

    uninterrupted = run(tmp_path / "a")
    assert torch.equal(run(tmp_path / "b", resume=str(tmp_path / "a" / "checkpoint-2")), uninterrupted)
