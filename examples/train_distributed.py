"""Data-parallel Uni-LoRA training with DDP or FSDP2, launched by torchrun (or accelerate launch).

    torchrun --standalone --nproc_per_node 2 examples/train_distributed.py --mode ddp
    torchrun --standalone --nproc_per_node 2 examples/train_distributed.py --mode fsdp2
    accelerate launch --multi_gpu --num_processes 2 examples/train_distributed.py --mode ddp
    python examples/train_distributed.py                # one process on the whole batch

Every rank builds the same tiny LLaMA (seeded, nothing downloaded), injects the same adapter and
trains on its own slice of each global batch. The only trainable parameter is theta_d, so DDP
all-reduces d floats of gradient per step; FSDP2 (``fully_shard`` on every decoder layer and on
the root) all-gathers the frozen base weights layer by layer as usual and reduce-scatters only
theta_d's gradient. Backend: NCCL on CUDA GPUs, gloo on CPU. ``--out`` saves the final theta_d
(rank 0), which equals a one-process run on the whole batch (tests/test_training_distributed.py).
"""

from __future__ import annotations

import argparse
import os

import torch

import unilora_kernels as uk

VOCAB, SEQ = 61, 12
CONFIG = dict(r=4, theta_d_length=512, target_modules="all-linear", proj_seed=3)


def build_model(device) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging

    logging.set_verbosity_error()
    torch.manual_seed(0)  # identical base weights and theta_d on every rank
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).to(device)
    return uk.inject(model, uk.UniLoRAConfig(**CONFIG)).train()


def global_batch(step: int, size: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(100 + step)
    return torch.randint(0, VOCAB, (size, SEQ), generator=gen)


def train(mode: str, steps: int, global_size: int, rank: int = 0, world: int = 1) -> torch.Tensor:
    """Train ``steps`` AdamW steps; returns the full theta_d (on CPU) on every rank."""
    device = torch.device(f"cuda:{torch.cuda.current_device()}") if torch.cuda.is_available() else torch.device("cpu")
    model = build_model(device)
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    elif mode == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)  # the root holds theta_d: its gradient is reduce-scattered once per step
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01)
    per_rank = global_size // world
    for step in range(steps):
        ids = global_batch(step, global_size)[rank * per_rank:(rank + 1) * per_rank].to(device)
        loss = model(input_ids=ids, labels=ids).loss  # mean over the rank's tokens; DDP/FSDP average ranks
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    (theta,) = params
    theta = theta.detach()
    if hasattr(theta, "full_tensor"):  # FSDP2 keeps a DTensor shard on each rank
        theta = theta.full_tensor()
    return theta.cpu()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=["ddp", "fsdp2", "single"], default="single")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--out", default=None, help="save the final theta_d here (torch.save, rank 0)")
    args = parser.parse_args(argv)
    distributed = args.mode != "single"
    rank, world = 0, 1
    if distributed:
        import torch.distributed as dist

        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
    theta = train(args.mode, args.steps, args.global_batch, rank, world)
    if rank == 0:
        print(f"{args.mode} x{world}: theta_d norm after {args.steps} steps = {theta.norm().item():.6f}")
        if args.out:
            torch.save(theta, args.out)
    if distributed:
        # every rank leaves together: a rank tearing gloo down while another still talks to the store
        # (rank 0 hosts it) aborted that rank at exit once in CI ("terminate called without an active exception")
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
