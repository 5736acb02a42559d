"""Docs that run, the installed layout, the package metadata and the example."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import unilora_kernels as uk

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _run(code_or_args, cwd, timeout=600, env=None):
    args = [sys.executable, "-P"] + (["-c", code_or_args] if isinstance(code_or_args, str) else code_or_args)
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, **(env or {})))


def python_blocks(markdown: str) -> list:
    return re.findall(r"```python\n(.*?)```", markdown, flags=re.S)


def test_readme_python_blocks_run(tmp_path):
    blocks = python_blocks(README)
    assert len(blocks) >= 2, "the README lost its runnable examples"
    res = _run("\n".join(blocks), cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    assert (tmp_path / "my-adapter" / "adapter_config.json").exists()
    assert "torch.Size([4096])" in res.stdout


def test_readme_commands_exist_and_ci_runs_the_tests():
    commands = re.findall(r"^bash (scripts/\S+)", README, flags=re.M)
    assert "scripts/test.sh" in commands
    for c in commands:
        assert (ROOT / c).exists(), f"README runs {c}, which does not exist"
    assert "scripts/test.sh" in (ROOT / ".ci" / "run").read_text()


def test_installed_layout(tmp_path):
    code = (
        "import importlib.util, unilora_kernels.triton_kernels as t\n"
        "assert t.__name__ == 'unilora_kernels.triton_kernels'\n"
        "assert importlib.util.find_spec('triton_kernels') is None, 'installed as a top-level module'\n"
        "print('ok')\n"
    )
    res = _run(code, cwd=tmp_path)  # a neutral directory: nothing of the source tree on sys.path
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr


def test_metadata_never_pins_torch_2_14():
    try:
        import tomllib
    except ImportError:  # Python 3.10
        pytest.skip("tomllib needs Python 3.11")
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    deps = meta["project"]["dependencies"]
    torch_req = [d for d in deps if d.startswith("torch")]
    assert torch_req == ["torch>=2.11"], torch_req
    assert not any("2.14" in d for d in deps + meta["build-system"]["requires"])
    extras = meta["project"]["optional-dependencies"]
    assert {"peft", "dev"} <= set(extras)
    assert any(d.startswith("peft") for d in extras["peft"]) and any(d.startswith("pytest") for d in extras["dev"])


def test_build_info():
    info = uk.build_info()
    for key in ("version", "torch", "triton", "backends", "extension", "auto", "cuda_available"):
        assert key in info
    assert info["backends"]["reference"] == "available"
    assert set(info["backends"]) == {"reference", "triton", "cpu", "cuda"}
    for name, state in info["backends"].items():
        assert state == "available" or state.startswith("unavailable: "), (name, state)
    assert info["version"] == uk.__version__


def test_architecture_doc_names_real_files():
    doc = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    named = set(re.findall(r"\b([\w/]+\.(?:py|h|cu|cpp|md|txt))\b", doc))
    dirs = ["unilora_kernels", "triton_kernels", "csrc", "docs", "benchmarks", "tests", "examples", "scripts"]
    missing = [n for n in named if not (ROOT / n).exists() and not any(any((ROOT / d).glob(f"**/{n}")) for d in dirs)]
    assert not missing, f"docs/ARCHITECTURE.md names files that do not exist: {missing}"


def test_example_finetune_loss_falls(tmp_path):
    res = _run([str(ROOT / "examples" / "finetune_tiny.py"), "--steps", "60"], cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    m = re.search(r"loss ([\d.]+) -> ([\d.]+)", res.stdout)
    assert m and float(m.group(2)) < float(m.group(1)) - 0.2, res.stdout
    assert "logits equal = True" in res.stdout
