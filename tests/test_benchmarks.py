"""The benchmark harness: it runs, writes its outputs, and never times a wrong result."""

import csv
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

EXPECTED_LAYER_COLUMNS = {
    "device", "dtype", "mode", "in_features", "out_features", "r", "d", "M", "candidate", "backend", "correct",
    "median_ms", "p20_ms", "p80_ms", "device_ms", "device_ms_source", "ratio_to_naive", "ratio_to_base", "index_bytes_per_elem", "saved_bytes",
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
    from candidates import benchmark_backends

    expected = {"base", "naive"} | {f"unilora[{b}]" for b in benchmark_backends(torch.device("cpu"))}
    assert expected <= cands
    for r in rows:
        # correctness was checked first, and only correct results were timed
        assert r["correct"] == "True", r
        assert float(r["median_ms"]) > 0
        # CPU: no device clock apart from the host's, so no device_ms, and the row says why
        assert r["device_ms"] == "" and r["device_ms_source"].startswith("none on cpu"), r
        if r["candidate"].startswith("unilora") or r["candidate"] in ("naive", "peft-unilora"):
            assert "rel err" in r["check"]
    training = [r for r in rows if r["mode"] == "training"]
    assert all(int(r["saved_bytes"]) > 0 and int(r["largest_alloc_bytes"]) > 0 for r in training)
    model = list(csv.DictReader(open(tmp_path / "model.csv")))
    assert any(r["candidate"].startswith("unilora") and float(r["tokens_per_s"]) > 0 for r in model)
    assert {r["mode"] for r in model} == {"train-eager", "train-compiled", "decode-eager", "decode-cudagraph"}
    assert all(r["hidden"] == "32" and r["layers"] == "2" for r in model)
    env = json.loads((tmp_path / "env.json").read_text())
    assert env["malloc"].startswith("glibc" if _glibc() else "system default"), env["malloc"]
    assert f"malloc: {env['malloc']}" in (tmp_path / "summary.md").read_text()


def _glibc() -> bool:
    import platform

    return sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


@pytest.mark.skipif(not _glibc(), reason="keep_freed_memory sets glibc's malloc thresholds; this is not glibc")
def test_keep_freed_memory_keeps_freed_buffers_in_the_heap():
    # In a fresh interpreter: by default glibc maps a 20 MiB buffer with mmap and unmaps it when
    # it is freed (the next one faults all its pages in again); after keep_freed_memory it comes
    # from the heap, and freeing it does not shrink the heap.
    code = """
import ctypes, sys, torch
sys.path.insert(0, sys.argv[1])
from common import keep_freed_memory
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                              "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
if sys.argv[2] == "keep":
    print(keep_freed_memory())
buf = torch.ones(5 << 20)
mapped, heap = libc.mallinfo2().hblkhd, libc.mallinfo2().arena
del buf
print(mapped, heap, libc.mallinfo2().arena)
"""
    out = {}
    for mode in ("keep", "default"):
        res = subprocess.run([sys.executable, "-P", "-c", code, str(ROOT / "benchmarks"), mode], capture_output=True,
                             text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
        out[mode] = [int(v) for v in res.stdout.split()[-3:]]
        if mode == "keep":
            assert res.stdout.startswith("glibc, M_TRIM_THRESHOLD"), res.stdout
    mib = 1 << 20
    mapped, heap, heap_after_free = out["keep"]
    assert mapped < 20 * mib <= heap and heap_after_free == heap, out
    assert out["default"][0] >= 20 * mib, out  # without it: mmap, handed back to the OS on free


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


def _run_module():
    spec = importlib.util.spec_from_file_location("bench_run", ROOT / "benchmarks" / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TINY = ["--tiny", "--quick", "--cpu", "--system-malloc", "--no-memory", "--min-time", "0.01"]


def test_unknown_or_unavailable_candidate_is_refused_naming_the_valid_ones(capsys):
    run = _run_module()
    assert run.main(["--candidates", "naive", "unilora[fast]", *TINY]) == 2
    err = capsys.readouterr().err
    assert "unilora[fast]" in err and all(name in err for name in run.ALL_NAMES), err
    assert run.main(["--candidates", "unilora[cuda]", *TINY]) == 2  # never on CPU tensors
    err = capsys.readouterr().err
    assert "cannot run on this machine" in err and "unilora[reference]" in err, err


def test_candidates_filter_times_only_those_and_still_checks_them(tmp_path):
    run = _run_module()
    backend = run.layer_candidate_names(torch.device("cpu"))[-1]  # a Uni-LoRA backend, e.g. unilora[cpu]
    assert run.main(["--candidates", "base", backend, "--out", str(tmp_path), *TINY]) == 0
    layer = list(csv.DictReader(open(tmp_path / "layer.csv")))
    assert {r["candidate"] for r in layer} == {"base", backend}
    # the naive projection was not timed, but every Uni-LoRA result was checked against it
    assert all("rel err" in r["check"] and r["correct"] == "True" for r in layer if r["candidate"] == backend)
    assert all(r["ratio_to_base"] and not r["ratio_to_naive"] for r in layer)
    model = list(csv.DictReader(open(tmp_path / "model.csv")))
    # the model benchmark runs this package with backend auto for any unilora[...] name
    assert {r["candidate"] for r in model} == {"base", "unilora[auto]"}
    from candidates import peft_installed

    if peft_installed():
        ours = [r for r in model if r["candidate"] == "unilora[auto]"]
        assert all("vs peft-unilora" in r["check"] for r in ours), ours


def test_without_matplotlib_the_run_writes_csv_and_summary_and_says_how_to_plot(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    run = _run_module()
    assert run.main(["--candidates", "base", "naive", "--no-model", "--out", str(tmp_path), *TINY]) == 0
    out = capsys.readouterr().out
    assert "pip install matplotlib" in out and "bench" in out, out
    assert (tmp_path / "layer.csv").stat().st_size > 0
    summary = (tmp_path / "summary.md").read_text()
    assert "| naive |" in summary and "pip install matplotlib" in summary
    assert not list(tmp_path.glob("*.png"))


def test_a_partial_run_never_replaces_a_full_runs_results(tmp_path, monkeypatch, capsys):
    run = _run_module()
    monkeypatch.setattr(run, "HERE", str(tmp_path))  # results/<device>/ under tmp_path
    full = tmp_path / "results" / run.device_slug(torch.device("cpu"))
    full.mkdir(parents=True)
    (full / "env.json").write_text(json.dumps({"argv": ["--threads", "2"]}))  # a full run, as committed
    (full / "layer.csv").write_text("full results\n")
    # the default place of a partial run (e.g. `bash scripts/run.sh --quick`): a subdirectory
    assert run.main(["--candidates", "base", "--no-model", *TINY]) == 0
    assert (full / "layer.csv").read_text() == "full results\n"
    assert (full / "partial" / "layer.csv").stat().st_size > 0
    assert json.loads((full / "partial" / "env.json").read_text())["partial"] is True
    assert f"results go to {full / 'partial'}" in capsys.readouterr().out
    # a partial run told to write over a full run's results refuses, and writes nothing
    assert run.main(["--candidates", "base", "--no-model", "--out", str(full), *TINY]) == 2
    assert "holds the results of a full run" in capsys.readouterr().err
    assert (full / "layer.csv").read_text() == "full results\n"
    # a full run keeps the default directory; the next partial run replaces the last partial one
    cpu = torch.device("cpu")
    assert run.output_dir(run.parse_args(["--cpu", "--threads", "2"]), cpu) == str(full)
    assert run.output_dir(run.parse_args(["--quick"]), cpu) == str(full / "partial")


def test_device_time_is_empty_on_cpu_with_the_reason():
    from common import NO_DEVICE_TIME_ON_CPU, device_time_ms

    calls = []
    assert device_time_ms(lambda: calls.append(1), torch.device("cpu")) == (None, NO_DEVICE_TIME_ON_CPU)
    assert not calls  # nothing is run for a number it cannot give
