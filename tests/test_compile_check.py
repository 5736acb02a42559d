"""`python -m unilora_kernels.compile_check --arch 80 --arch 90`: every Triton kernel, dtype and
autotune config compiles ahead of time for sm_80 and sm_90 (no GPU needed), and no default
config spills registers. Runs in a subprocess without TRITON_INTERPRET (conftest sets it here).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("triton", reason="triton is not installed")

# one row of compile_check's table, whatever its status
ROW = r"^(\w+_kernel)\s+(\w+)\s+(\w+)\s+.*?\s(80|90)\s+\d+\s+(\d+)/(\d+)\s+\d+\s+(\S.*)$"


def _compile_check(tmp_path, *args):
    """(stdout, stdout + stderr) of a compile_check run that must succeed, and its table's rows."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")  # compile for real, not from a warm cache
    run = subprocess.run([sys.executable, "-P", "-m", "unilora_kernels.compile_check", *args],
                         capture_output=True, text=True, env=env, timeout=3000)
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-4000:]
    assert "no default config spills" in out, out[-2000:]
    rows = re.findall(ROW, run.stdout, flags=re.M)
    total = re.search(r"^(\d+) compilations", run.stdout, flags=re.M)
    assert total is not None and len(rows) == int(total.group(1)), (len(rows), out[-2000:])
    return rows


def test_compile_check_compiles_only_the_kernels_asked_for(tmp_path):
    rows = _compile_check(tmp_path, "--arch", "80", "--kernel", "gather_kernel")
    assert rows and {r[0] for r in rows} == {"gather_kernel"} and {r[3] for r in rows} == {"80"}
    assert all(r[6] == "ok" for r in rows), rows


@pytest.mark.slow  # compiles every kernel variant for two archs: minutes
def test_compile_check_sm80_sm90(tmp_path):
    from unilora_kernels.backends import triton_backend

    # every row, whatever its status: tuning candidates may not spill either
    rows = _compile_check(tmp_path, "--arch", "80", "--arch", "90")
    kernels = {r[0] for r in rows}
    launchers = {lau.name for lau in triton_backend.LAUNCHERS}  # the mixed-batch kernels among them
    assert kernels == launchers, f"not compiled: {sorted(launchers - kernels)}"
    assert {r[3] for r in rows} == {"80", "90"}
    assert {"float16", "bfloat16", "float32"} <= {r[2] for r in rows}
    spills = [r for r in rows if r[4] != "0" or r[5] != "0" or r[6] != "ok"]
    assert not spills, f"register spills or failed rows (explain them or change the config): {spills}"
