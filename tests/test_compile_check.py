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


@pytest.mark.slow  # compiles every kernel variant for two archs: minutes
def test_compile_check_sm80_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")  # compile for real, not from a warm cache
    run = subprocess.run([sys.executable, "-P", "-m", "unilora_kernels.compile_check", "--arch", "80", "--arch", "90"],
                         capture_output=True, text=True, env=env, timeout=3000)
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-4000:]
    assert "no default config spills" in out, out[-2000:]
    # every row of the table, whatever its status: tuning candidates may not spill either
    rows = re.findall(r"^(\w+_kernel)\s+(\w+)\s+(\w+)\s+.*?\s(80|90)\s+\d+\s+(\d+)/(\d+)\s+\d+\s+(\S.*)$",
                      run.stdout, flags=re.M)
    total = re.search(r"^(\d+) compilations", run.stdout, flags=re.M)
    assert total is not None and len(rows) == int(total.group(1)), (len(rows), out[-2000:])
    kernels = {r[0] for r in rows}
    for name in ("fused_fwd_kernel", "shrink_kernel", "expand_kernel", "bwd_x_kernel", "bwd_db_kernel",
                 "fold_kernel", "bwd_g_kernel", "csr_reduce_kernel", "gather_kernel",
                 # the mixed-batch kernels (many adapters per batch): compiled here, not in a run of their own
                 "mixed_shrink_kernel", "mixed_expand_kernel", "mixed_dw_kernel", "mixed_csr_reduce_kernel"):
        assert name in kernels, f"{name} was not compiled: {sorted(kernels)}"
    assert {r[3] for r in rows} == {"80", "90"}
    assert {"float16", "bfloat16", "float32"} <= {r[2] for r in rows}
    spills = [r for r in rows if r[4] != "0" or r[5] != "0" or r[6] != "ok"]
    assert not spills, f"register spills (explain them or change the config): {spills}"
