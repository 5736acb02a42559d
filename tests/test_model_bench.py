"""The model benchmark's CPU variant: every job and candidate at tiny sizes, checked before timing."""

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
pytest.importorskip("transformers")


def test_tiny_cpu_run_writes_every_job_and_candidate(tmp_path):
    res = subprocess.run([sys.executable, "-P", str(ROOT / "benchmarks" / "model_bench.py"), "--cpu", "--tiny",
                          "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    from model_bench import CANDIDATES, MODEL_COLUMNS
    from candidates import peft_installed

    rows = list(csv.DictReader(open(tmp_path / "model.csv")))
    assert list(rows[0]) == MODEL_COLUMNS
    expected = set(CANDIDATES) if peft_installed() else {"base", "unilora[auto]"}
    assert {r["candidate"] for r in rows} == expected
    assert all(r["hidden"] == "32" and r["layers"] == "2" and r["correct"] == "True" for r in rows), rows
    by_mode = {}
    for r in rows:
        by_mode.setdefault(r["mode"], []).append(r)
    assert set(by_mode) == {"train-eager", "train-compiled", "decode-eager", "decode-cudagraph"}
    for r in by_mode["train-eager"] + by_mode["train-compiled"] + by_mode["decode-eager"]:
        assert float(r["median_ms"]) > 0 and float(r["tokens_per_s"]) > 0, r
    assert {r["batch"] for r in by_mode["decode-eager"]} == {"1", "3"}
    assert all(float(r["ms_per_token"]) > 0 for r in by_mode["decode-eager"])
    # no CUDA: the graph rows are there, untimed, saying why (the uncaptured static step still checked)
    for r in by_mode["decode-cudagraph"]:
        assert r["median_ms"] == "" and "CUDA graphs need a CUDA device" in r["check"] and "rel err" in r["check"]
    assert all("compiled loss rel err" in r["check"] for r in by_mode["train-compiled"])
    assert all(r["device_ms"] == "" and r["device_ms_source"].startswith("none on cpu") for r in by_mode["train-eager"])
    if peft_installed():
        ours = [r for r in rows if r["candidate"] == "unilora[auto]"]
        assert all("vs peft-unilora" in r["check"] for r in ours)
        assert all(r["ratio_to_base"] and r["ratio_to_peft_lora"] for r in ours if r["median_ms"])
    assert (tmp_path / "model_summary.md").read_text().startswith("## Model: LLaMA hidden 32, 2 layers")


def test_a_wrong_candidate_is_caught_and_not_timed(monkeypatch):
    import model_bench
    from candidates import peft_installed

    if not peft_installed():
        pytest.skip("the check of this package's model is against PEFT's")
    real = model_bench.build

    def broken(name, base, s, theta):
        c = real(name, base, s, theta)
        if name == "unilora[auto]":
            with torch.no_grad():
                c.params[0].mul_(1.5)  # a wrong update must not pass
        return c

    monkeypatch.setattr(model_bench, "build", broken)
    rows = model_bench.run_model_bench(torch.device("cpu"), torch.float32, True, True, jobs=["train", "decode"],
                                       candidates=["unilora[auto]"])
    assert rows and all(not r["correct"] and "disagrees with peft-unilora" in r["check"] for r in rows), rows
    assert not any(r.get("median_ms") for r in rows)
