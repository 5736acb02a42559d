"""The multi-adapter serving benchmark: it runs, checks every candidate before timing it, and
writes its CSV, summary and the adapter-memory line."""

import csv
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "multi_adapter_bench.py"

pytest.importorskip("transformers")


def _bench():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("multi_adapter_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _backend() -> str:
    """The default backend once the CPU backend runs mixed batches; the reference one until then."""
    from unilora_kernels import backends

    try:
        impl = backends.get_backend(backends.resolve("auto", "cpu"), "cpu")
    except backends.BackendNotAvailableError:
        return "reference"
    return "auto" if hasattr(impl, "mixed_forward_") else "reference"


def _peft_installed() -> bool:
    return importlib.util.find_spec("peft") is not None


def test_quick_tiny_run_checks_every_candidate_and_writes_its_results(tmp_path):
    res = subprocess.run([sys.executable, "-P", str(SCRIPT), "--quick", "--tiny", "--cpu", "--threads", "1", "--min-time", "0.02",
                          "--backend", _backend(), "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    bench = _bench()
    rows = list(csv.DictReader(open(tmp_path / "multi_adapter.csv")))
    assert list(rows[0]) == bench.COLUMNS
    expected = set(bench.CANDIDATES) if _peft_installed() else set(bench.CANDIDATES) - {"peft_lora_mixed"}
    grid = {(w, n, b) for w in bench.WORKLOADS for n, b in bench.grid(quick=True, tiny=True)}
    assert {(r["workload"], int(r["N"]), int(r["B"])) for r in rows} == grid
    for key in grid:
        timed = {r["candidate"] for r in rows if (r["workload"], int(r["N"]), int(r["B"])) == key and r["median_ms"]}
        assert timed == expected, (key, timed)
    for r in rows:
        if r["candidate"] not in expected:
            continue
        # every candidate was checked before it was timed, and was right
        assert r["correct"] == "True" and "rel err" in r["check"], r
        assert float(r["median_ms"]) > 0 and math.isfinite(float(r["ratio_to_shared"])), r
        if r["candidate"] == "mixed":
            speedups = ["mixed_speedup_vs_loop"] + (["mixed_speedup_vs_peft"] if _peft_installed() else [])
            assert all(math.isfinite(float(r[k])) and float(r[k]) > 0 for k in speedups), r
            if int(r["N"]) > 1:  # the check tells adapters apart: mixed differs from the one-adapter batch
                assert "differ by" in r["check"], r
        if r["candidate"] == "shared":
            assert float(r["ratio_to_shared"]) == 1.0
    summary = (tmp_path / "multi_adapter.md").read_text()
    assert "### decode" in summary and "### prefill" in summary and "## Adapter memory" in summary
    if _peft_installed():  # the export was checked alone too: PEFT's own loading path (a0), and the fast one (a1)
        assert "exported a0 alone" in summary and "exported a1 alone" in summary, summary
    env = json.loads((tmp_path / "multi_adapter_env.json").read_text())
    mem, d = env["memory"], env["sizes"]["d"]
    # measured on the real table: 1,024 registered adapters (plus the model's own theta_d)
    assert mem["adapters"] == bench.MEMORY_ADAPTERS + 1 and mem["capacity"] >= bench.MEMORY_ADAPTERS
    assert mem["bytes_per_adapter"] == d * 4 and mem["table_bytes"] == mem["capacity"] * d * 4
    assert mem["lora_bytes_per_adapter"] == mem["D"] * 4 > mem["bytes_per_adapter"]
    assert env["partial"] is True


def test_a_wrong_mixed_result_is_caught_and_not_timed():
    bench = _bench()
    backend = _backend()
    s = bench.model_sizes(torch.device("cpu"), quick=True, tiny=True)
    base = bench.build_base(s, torch.float32, torch.device("cpu"))
    import unilora_kernels as uk

    model = uk.inject(base, uk.UniLoRAConfig(r=s["r"], theta_d_length=s["d"], target_modules="all-linear",
                                             backend=backend)).eval()
    bench.ensure_adapters(model, 2)
    args = bench.parse_args(["--quick", "--tiny", "--cpu", "--min-time", "0.01"])
    setup = bench.Setup(model, None, "prefill", 2, 4, s, torch.device("cpu"))
    setup.thetas["a1"] = setup.thetas["a1"] * 1.01  # the loop (the reference) now runs another adapter a1
    rows = {r["candidate"]: r for r in bench.run_setup(setup, torch.device("cpu"), torch.float32, args, None, 60.0,
                                                       "not built in this test")}
    assert rows["mixed"]["correct"] is False and "median_ms" not in rows["mixed"]
    assert rows["shared"]["correct"] is True and rows["shared"]["median_ms"] > 0
    assert rows["peft_lora_mixed"]["correct"] is None and "not built in this test" in rows["peft_lora_mixed"]["note"]


def test_an_unavailable_backend_is_refused_with_the_reason(tmp_path, capsys):
    bench = _bench()
    assert bench.main(["--quick", "--tiny", "--cpu", "--backend", "cuda", "--out", str(tmp_path)]) == 2
    assert "cuda" in capsys.readouterr().err  # the compiled CUDA kernels never take CPU tensors
    assert not list(tmp_path.iterdir())


def test_train_registry_job_times_one_batch_with_each_registry_size(tmp_path):
    """Issue 22 item 8: the training step of one batch with 4 and with 16 adapters registered, tiny."""
    res = subprocess.run([sys.executable, "-P", str(SCRIPT), "--quick", "--tiny", "--cpu", "--threads", "1",
                          "--min-time", "0.02", "--backend", _backend(), "--workloads", "decode", "--ns", "1",
                          "--bs", "4", "--candidates", "mixed", "--train-registry", "4,16", "--train-batch", "4",
                          "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rows = [r for r in csv.DictReader(open(tmp_path / "multi_adapter.csv")) if r["workload"] == "train"]
    assert [int(r["N"]) for r in rows] == [4, 16]
    for r in rows:
        assert r["correct"] == "True" and float(r["median_ms"]) > 0 and int(r["B"]) == 4, r
        assert r["note"].endswith("the step with 4 registered (median of per-round ratios)"), r["note"]
    assert "### train" in (tmp_path / "multi_adapter.md").read_text()
