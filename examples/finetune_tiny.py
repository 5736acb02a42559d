"""Fine-tune a tiny LLaMA (built from a config, no download) with Uni-LoRA on CPU.

The task is a synthetic "language" the random base model does not know: every next token is
``(5 * token + 3) mod vocab``. Only theta_d trains (one vector for all linear layers); the loss
falls, the adapter is saved in PEFT's format, loaded into a fresh copy of the base model, and
the two models are checked to give the same logits.

    python examples/finetune_tiny.py --steps 200
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time

import torch

import unilora_kernels as uk


def build_model(vocab: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg)


def batch(vocab: int, size: int, length: int, gen: torch.Generator) -> torch.Tensor:
    start = torch.randint(0, vocab, (size, 1), generator=gen)
    seq = [start]
    for _ in range(length - 1):
        seq.append((5 * seq[-1] + 3) % vocab)
    return torch.cat(seq, dim=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=2e-2)
    parser.add_argument("--theta-d-length", type=int, default=16384)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--backend", default="auto")
    args = parser.parse_args()

    torch.manual_seed(0)
    vocab = 64
    base = build_model(vocab).eval()
    pristine = copy.deepcopy(base)
    config = uk.UniLoRAConfig(
        r=args.r, theta_d_length=args.theta_d_length, target_modules="all-linear", backend=args.backend
    )
    model = uk.inject(base, config)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    layers = uk.iter_layers(model)
    print(f"Uni-LoRA on {len(layers)} layers, backend {layers[0][1].resolved_backend()}: "
          f"trainable {trainable} = {model.unilora_theta_d.numel():,} values")

    opt = torch.optim.AdamW([model.unilora_theta_d], lr=args.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(1)
    model.train()
    first = last = None
    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        ids = batch(vocab, 16, 24, gen)
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        first = loss.item() if first is None else first
        last = loss.item()
        if step == 1 or step % 10 == 0 or step == args.steps:
            print(f"step {step:4d}  loss {last:.4f}")
    print(f"{args.steps} steps in {time.perf_counter() - t0:.1f}s; loss {first:.3f} -> {last:.3f}")

    model.eval()
    with tempfile.TemporaryDirectory() as tmp:
        uk.save_adapter(model, tmp)
        reloaded = uk.load_adapter(pristine, tmp)
        ids = batch(vocab, 4, 24, gen)
        with torch.no_grad():
            same = torch.allclose(model(ids).logits, reloaded(ids).logits, rtol=1e-5, atol=1e-6)
    print(f"saved to PEFT format and reloaded into a fresh model: logits equal = {same}")
    if not (last < first and same):
        raise SystemExit("FAILED: the loss did not fall or the reloaded adapter differs")


if __name__ == "__main__":
    main()
