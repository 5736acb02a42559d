"""Packaging: the compiled extension matches the sources' constants, and the source distribution
builds (it carries every file the build reads; a CPU wheel builds from it)."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from unilora_kernels.backends import policy
from unilora_kernels.build_info import extension_info

ROOT = Path(__file__).resolve().parent.parent


def test_compiled_decode_limits_are_the_policy_ones():
    """setup.py passes policy.DECODE_MAX_M / _R to the compiler; a mismatch is a stale build."""
    info = extension_info()
    if not info.get("built"):
        pytest.skip(f"extension not built: {info.get('reason')}")
    from unilora_kernels.backends import extension

    meta = extension.build_metadata()
    compiled = (meta.get("decode_max_m"), meta.get("decode_max_r"))
    assert compiled == (policy.DECODE_MAX_M, policy.DECODE_MAX_R), (
        f"the extension was compiled with decode limits {compiled}, backends/policy.py says "
        f"{(policy.DECODE_MAX_M, policy.DECODE_MAX_R)}: rebuild it (pip install --no-build-isolation .)")


def files_the_build_reads() -> set:
    """Paths (relative to the repository root) that setup.py, CMakeLists.txt and the package need."""
    paths = {"setup.py", "pyproject.toml", "CMakeLists.txt", "README.md", "MANIFEST.in"}
    paths |= {f"csrc/{p.name}" for p in (ROOT / "csrc").iterdir() if p.is_file()}
    for package in ("unilora_kernels", "triton_kernels"):
        paths |= {p.relative_to(ROOT).as_posix() for p in (ROOT / package).rglob("*.py") if "__pycache__" not in p.parts}
    return paths


def run(args, **kwargs):
    res = subprocess.run(args, capture_output=True, text=True, **kwargs)
    assert res.returncode == 0, f"{' '.join(map(str, args))} failed:\n{res.stdout[-4000:]}\n{res.stderr[-4000:]}"
    return res


@pytest.mark.slow
def test_sdist_holds_the_build_inputs_and_builds_a_cpu_wheel(tmp_path):
    pytest.importorskip("build", reason="needs the `build` package (scripts/install.sh installs it)")
    dist = tmp_path / "dist"
    run([sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", str(dist), str(ROOT)])
    (sdist,) = dist.glob("unilora_kernels-*.tar.gz")
    with tarfile.open(sdist) as tar:
        top = sdist.name[: -len(".tar.gz")]
        shipped = {name[len(top) + 1 :] for name in tar.getnames() if name.startswith(top + "/")}
    missing = sorted(files_the_build_reads() - shipped)
    assert not missing, f"the sdist lacks files the build reads: {missing}"

    # A CPU wheel from the sdist alone (not from the checkout): pip unpacks it in a temporary directory.
    env = dict(os.environ, FORCE_CPU="1", MAX_JOBS=os.environ.get("MAX_JOBS", "2"))
    wheels = tmp_path / "wheels"
    run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "--disable-pip-version-check",
         "-w", str(wheels), str(sdist)], env=env, cwd=str(tmp_path))
    (wheel,) = wheels.glob("unilora_kernels-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert any(n.startswith("unilora_kernels/_C") and n.endswith(".so") for n in names), names
    triton = {n for n in names if n.startswith("unilora_kernels/triton_kernels/") and n.endswith(".py")}
    expected = {f"unilora_kernels/triton_kernels/{p.name}" for p in (ROOT / "triton_kernels").glob("*.py")}
    assert expected and triton == expected, sorted(expected ^ triton)
