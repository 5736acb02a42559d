"""scripts/gpu_check.sh, proven on CPU before a GPU sees it: `GPU_CHECK_DRY_RUN=1` runs every step
(no build, the Triton interpreter, tiny sizes, the sanitizers logged as skipped) and writes the files
a GPU run writes; a failing or timed-out step fails the run while the later steps still run."""

import csv
import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FILES = {"env.txt", "steps.txt", "build.log", "tests.log", "sanitizer.log", "bench.log", "results.tgz"}
STEPS = ["env", "build", "gpu-tests", "memcheck", "racecheck", "layer-bench", "model-bench", "model-compiled",
         "multi-bench"]
pytest.importorskip("transformers")


def dry_run(out: Path, **env):
    environ = {**os.environ, "GPU_CHECK_DRY_RUN": "1", "OUT": str(out), "PYTHON": sys.executable,
               "TMPDIR": str(out.parent), **env}
    res = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh")], env=environ, capture_output=True,
                         text=True, timeout=400)
    lines = (out / "steps.txt").read_text().splitlines()
    status = {line.split(":")[0].removeprefix("step "): line.split(":", 1)[1].strip()
              for line in lines if line.startswith("step ")}
    return res, status, lines


def test_dry_run_runs_every_step_and_writes_the_files(tmp_path):
    out = tmp_path / "out"
    res, status, lines = dry_run(out)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    assert {p.name for p in out.iterdir()} == FILES and len(FILES) <= 8  # what the device tool brings back
    assert list(status) == STEPS, lines
    for name in ("build", "memcheck", "racecheck"):
        assert status[name].startswith("skipped: dry run"), (name, status[name])
    for name in set(STEPS) - {"build", "memcheck", "racecheck"}:
        assert status[name].startswith("ok ("), (name, status[name])
    assert lines[-1].startswith("result: ok"), lines
    assert "skipped: dry run" in (out / "sanitizer.log").read_text()
    with tarfile.open(out / "results.tgz") as tar:
        names = set(tar.getnames())
        assert {"results/layer/layer.csv", "results/model/model.csv", "results/model_compiled/model.csv",
                "results/multi_adapter/multi_adapter.csv"} <= names, names
        layer = list(csv.DictReader(io.TextIOWrapper(tar.extractfile("results/layer/layer.csv"))))
        model = list(csv.DictReader(io.TextIOWrapper(tar.extractfile("results/model/model.csv"))))
        compiled = list(csv.DictReader(io.TextIOWrapper(tar.extractfile("results/model_compiled/model.csv"))))
    assert layer and all("device_ms" in r for r in layer)
    assert {r["mode"] for r in model} == {"train-eager", "decode-eager", "decode-cudagraph"}
    assert {r["mode"] for r in compiled} == {"train-compiled"} and compiled[0]["median_ms"]


def test_a_failing_step_fails_the_run_and_the_next_steps_still_run(tmp_path):
    out = tmp_path / "out"
    # racecheck names a test that does not exist; layer-bench gets an option run.py refuses;
    # model-compiled a budget it cannot finish in
    res, status, lines = dry_run(out, GPU_CHECK_STEPS="racecheck,layer-bench,model-compiled",
                                 RACECHECK_TESTS="tests/test_extension_cuda.py::test_renamed", BENCH_ARGS="--no-such-option",
                                 B_model_compiled="6")
    assert res.returncode != 0
    assert status["racecheck"].startswith("FAILED: not every one of its tests collects"), status
    assert status["layer-bench"].startswith("FAILED: exit code 2"), status
    assert status["model-compiled"].startswith("FAILED: timed out after 6s"), status
    assert status["model-bench"] == "skipped: not in GPU_CHECK_STEPS"
    assert lines[-1].startswith("result: FAILED (racecheck layer-bench model-compiled;"), lines
    assert {p.name for p in out.iterdir()} == FILES  # the files are written all the same
