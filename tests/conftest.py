"""Shared fixtures. Tests import the *installed* package (scripts/test.sh runs pytest with -P)."""

from __future__ import annotations

import copy
import importlib.util
import os
from pathlib import Path

os.environ.setdefault("KINETO_LOG_LEVEL", "6")  # keep the profiler (memory tests) quiet

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    # No GPU: the Triton backend runs on CPU tensors through the interpreter, which must be on
    # before unilora_kernels.triton_kernels is imported (an explicit TRITON_INTERPRET=0 wins).
    os.environ.setdefault("TRITON_INTERPRET", "1")


def installed_package_problem():
    """Why the unilora_kernels on sys.path cannot run the suite (None when it can).

    The source tree has neither the compiled extension nor unilora_kernels/triton_kernels (both
    exist only in the installed layout): the cpu and triton backends would report unavailable
    and their tests would skip without a word. Checked on the files, before anything imports triton.
    """
    spec = importlib.util.find_spec("unilora_kernels")
    if spec is None or not spec.submodule_search_locations:
        return "unilora_kernels is not importable"
    package = Path(list(spec.submodule_search_locations)[0])
    missing = []
    if not any(package.glob("_C.*")):
        missing.append("the compiled extension (_C)")
    if not (package / "triton_kernels" / "__init__.py").exists():
        missing.append("triton_kernels/")
    if not missing:
        return None
    return (f"the unilora_kernels found at {package} lacks {' and '.join(missing)}: it is the source "
            "tree (plain `pytest` puts it first on sys.path) or a broken install. Run `bash scripts/test.sh`, "
            "or `pip install --no-build-isolation .` and then `python -P -m pytest`.")


def pytest_configure(config):
    problem = installed_package_problem()
    if problem:
        pytest.exit(problem, returncode=pytest.ExitCode.USAGE_ERROR)


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; none on this machine (run on a GPU host: pytest -m gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(1234)
    yield


def _quiet_transformers():
    try:
        import transformers

        transformers.logging.set_verbosity_error()
    except ImportError:
        pass


def tiny_llama(vocab: int = 61, hidden: int = 40, inter: int = 56, layers: int = 2, dtype=torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM

    _quiet_transformers()
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).to(dtype).eval()


def tiny_gpt2(vocab: int = 61, embd: int = 36, layers: int = 2, dtype=torch.float32):
    from transformers import GPT2Config, GPT2LMHeadModel

    _quiet_transformers()
    cfg = GPT2Config(vocab_size=vocab, n_embd=embd, n_layer=layers, n_head=4, n_positions=32,
                     bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).to(dtype).eval()


@pytest.fixture
def llama():
    torch.manual_seed(0)
    return tiny_llama()


@pytest.fixture
def gpt2():
    torch.manual_seed(0)
    return tiny_gpt2()


def twin(model):
    return copy.deepcopy(model), copy.deepcopy(model)

