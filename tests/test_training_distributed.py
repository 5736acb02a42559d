"""DDP and FSDP2 over two gloo processes (torchrun, CPU) train theta_d as one process on the whole batch.

Runs examples/train_distributed.py, the documented recipe, as documented (torchrun --standalone
--nproc_per_node 2, and accelerate launch --multi_gpu --num_processes 2), and compares with its
one-process path run here.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
import torch.distributed as dist  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "train_distributed.py"
STEPS, GLOBAL_BATCH = 3, 8
# Two ranks sum their halves of the batch in another order than one process: float rounding only.
REL_TOL = 1e-6

pytestmark = [
    pytest.mark.slow,  # each run starts two Python processes that import torch and transformers: ~25 s
    pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed with gloo"),
]


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("train_distributed", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def single_process_theta(example):
    initial = example.build_model("cpu").unilora_theta_d.detach().clone()
    theta = example.train("single", STEPS, GLOBAL_BATCH)
    assert not torch.equal(theta, initial), "theta_d did not train"
    return theta


TORCHRUN = [sys.executable, "-P", "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
# accelerate's --multi_gpu launcher wraps torchrun; without GPUs the example falls back to gloo.
ACCELERATE = [sys.executable, "-P", "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]


@pytest.mark.parametrize(("launcher", "mode"), [
    ("torchrun", "ddp"),
    ("torchrun", "fsdp2"),
    ("accelerate", "ddp"),
])
def test_two_gloo_processes_match_one(launcher, mode, tmp_path, single_process_theta):
    if launcher == "accelerate":
        pytest.importorskip("accelerate")
    out = tmp_path / "theta.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}  # gloo on CPU, even on a GPU host
    cmd = (TORCHRUN if launcher == "torchrun" else ACCELERATE) + [
        str(EXAMPLE), "--mode", mode, "--steps", str(STEPS), "--global-batch", str(GLOBAL_BATCH), "--out", str(out)]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    theta = torch.load(out)
    reference = single_process_theta
    assert theta.shape == reference.shape
    rel = ((theta - reference).norm() / reference.norm()).item()
    assert rel <= REL_TOL, f"{mode}: theta_d differs from the one-process run by {rel:.2e} (relative)"

