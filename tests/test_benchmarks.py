"""The benchmark harness: it runs, writes its outputs, and never times a wrong result."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

EXPECTED_LAYER_COLUMNS = {
    "device", "dtype", "mode", "in_features", "out_features", "r", "d", "M", "candidate", "backend", "correct",
    "median_ms", "p20_ms", "p80_ms", "ratio_to_naive", "ratio_to_base", "index_bytes_per_elem", "saved_bytes",
    "largest_alloc_bytes", "peak_mem_bytes",
}


def test_quick_run_on_tiny_sizes(tmp_path):
    res = subprocess.run([sys.executable, "-P", str(ROOT / "benchmarks" / "run.py"), "--quick", "--tiny", "--cpu",
                          "--out", str(tmp_path)], capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "device:" in res.stdout and "threads" in res.stdout
    for name in ("layer.csv", "model.csv", "summary.md", "env.json", "memory.png", "speedup_64x48_d97.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    rows = list(csv.DictReader(open(tmp_path / "layer.csv")))
    assert EXPECTED_LAYER_COLUMNS <= set(rows[0])
    cands = {r["candidate"] for r in rows}
    from layer_bench import benchmark_backends

    expected = {"base", "naive"} | {f"unilora[{b}]" for b in benchmark_backends(torch.device("cpu"))}
    assert expected <= cands
    for r in rows:
        # correctness was checked first, and only correct results were timed
        assert r["correct"] == "True", r
        assert float(r["median_ms"]) > 0
        if r["candidate"].startswith("unilora") or r["candidate"] in ("naive", "peft-unilora"):
            assert "rel err" in r["check"]
    training = [r for r in rows if r["mode"] == "training"]
    assert all(int(r["saved_bytes"]) > 0 and int(r["largest_alloc_bytes"]) > 0 for r in training)
    model = list(csv.DictReader(open(tmp_path / "model.csv")))
    assert any(r["candidate"].startswith("unilora") and float(r["tokens_per_s"]) > 0 for r in model)


def test_a_wrong_candidate_is_caught_and_not_timed():
    from common import progress
    from layer_bench import build_candidates, run_config

    cands = build_candidates(32, 24, 2, 37, torch.float32, torch.device("cpu"), with_peft=False)
    broken = next(c for c in cands if c.name == "unilora[reference]")
    with torch.no_grad():
        broken.module.theta_d.mul_(1.01)  # a 1% error in the update must not pass
    bar = progress(100, "test")
    rows = run_config(cands, 32, 24, 2, 37, 3, ["inference", "training"], torch.float32, torch.device("cpu"),
                      True, False, bar)
    bar.close()
    bad = [r for r in rows if r["candidate"] == "unilora[reference]"]
    assert len(bad) == 2 and not any(r["correct"] for r in bad)
    assert not any("median_ms" in r for r in bad)
    good = [r for r in rows if r["candidate"] == "naive"]
    assert all(r["correct"] and r["median_ms"] > 0 for r in good)
