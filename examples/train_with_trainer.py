"""Fine-tune a tiny LLaMA (built from a config, no download) with Uni-LoRA and ``transformers.Trainer``.

The task is the synthetic language of finetune_tiny.py (every next token is ``(5 * token + 3)
mod vocab``). The only change from a plain Trainer script is ``UniLoRATrainer`` in place of
``Trainer``: each ``checkpoint-N/`` then holds the adapter in PEFT's format (a few KB) instead
of the base weights, and ``resume_from_checkpoint`` continues the run exactly.

    python examples/train_with_trainer.py --steps 100 --output-dir /tmp/unilora-trainer
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import torch

import unilora_kernels as uk
from unilora_kernels.hf_trainer import UniLoRATrainer

VOCAB, SEQ = 64, 16


def build_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg)


def synthetic_dataset(size: int, seed: int = 1) -> list:
    gen = torch.Generator().manual_seed(seed)
    seq = [torch.randint(0, VOCAB, (size, 1), generator=gen)]
    for _ in range(SEQ - 1):
        seq.append((5 * seq[-1] + 3) % VOCAB)
    ids = torch.cat(seq, dim=1)
    return [{"input_ids": row, "labels": row} for row in ids]


def main(argv=None) -> dict:
    from transformers import TrainingArguments

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--save-steps", type=int, default=50)
    parser.add_argument("--lr", type=float, default=2e-2)
    parser.add_argument("--output-dir", default=None, help="default: a temporary directory")
    args = parser.parse_args(argv)
    out = args.output_dir or tempfile.mkdtemp(prefix="unilora-trainer-")

    torch.manual_seed(0)
    model = uk.inject(build_model(), uk.UniLoRAConfig(r=8, theta_d_length=8192, target_modules="all-linear"))
    training_args = TrainingArguments(
        output_dir=out, max_steps=args.steps, per_device_train_batch_size=8, learning_rate=args.lr,
        lr_scheduler_type="constant", save_steps=args.save_steps, logging_steps=max(1, args.steps // 10),
        report_to=[], use_cpu=True, dataloader_num_workers=0, disable_tqdm=True,
    )
    trainer = UniLoRATrainer(model=model, args=training_args, train_dataset=synthetic_dataset(16 * args.steps))
    trainer.train()
    adapter_dir = os.path.join(out, "adapter")
    trainer.save_model(adapter_dir)

    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    last_ckpt = Path(out) / f"checkpoint-{trainer.state.global_step}"
    ckpt_bytes = sum(f.stat().st_size for f in last_ckpt.rglob("*") if f.is_file())
    print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f}; {last_ckpt.name} is {ckpt_bytes / 1024:.0f} KiB; "
          f"adapter saved to {adapter_dir}")
    return {"first_loss": losses[0], "last_loss": losses[-1], "checkpoint_bytes": ckpt_bytes,
            "adapter_dir": adapter_dir}


if __name__ == "__main__":
    main()
