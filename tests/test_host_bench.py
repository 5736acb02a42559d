"""benchmarks/host_bench.py: its call counter counts exactly what it says, and a quick run writes
every host figure (host.csv, the printed table, run.py's main job)."""

import collections
import contextlib
import csv
import importlib.util
import io
import json
import os
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import host_bench  # noqa: E402

import unilora_kernels as uk  # noqa: E402
from unilora_kernels.backends import triton_launch  # noqa: E402

COUNTED = '''
def leaf(i):
    return i + 1


class Box:
    def __init__(self, v):
        self.v = v

    def get(self):
        return leaf(self.v)


def run(n, outside):
    total = 0
    for i in range(n):
        total += Box(i).get()  # three calls: __init__, get, leaf
        total += outside(i)  # a function from elsewhere (not counted) calling back in
    return total


def fail():
    raise KeyError("boom")
'''


def _load(tmp_path):
    pkg = tmp_path / "counted"
    pkg.mkdir()
    (pkg / "mod.py").write_text(textwrap.dedent(COUNTED))
    spec = importlib.util.spec_from_file_location("counted_mod", pkg / "mod.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return pkg, mod


def test_the_call_counter_counts_a_known_functions_calls_exactly(tmp_path):
    pkg, mod = _load(tmp_path)

    def outside(i):  # in this file: not counted, but the leaf() it calls is
        return mod.leaf(i)

    before = sys.getprofile()
    count = host_bench.count_package_calls
    tally = collections.Counter()
    assert count(lambda: mod.run(5, outside), where=str(pkg), exclude=(), tally=tally) == 1 + 5 * 3 + 5
    assert tally == {"mod.py:run": 1, "mod.py:__init__": 5, "mod.py:get": 5, "mod.py:leaf": 10}
    # an excluded function is not counted (its callers still are)
    leaf = (os.path.realpath(pkg / "mod.py"), "leaf")
    assert count(lambda: mod.run(5, outside), where=str(pkg), exclude={leaf}) == 1 + 5 * 2
    # code elsewhere is not counted: this file's functions, torch's, a sibling directory's
    assert count(lambda: outside(1) + torch.ones(2).sum().item(), where=str(tmp_path / "count")) == 0
    assert count(lambda: outside(1), where=str(pkg)) == 1
    # the profiler is put back, also when fn raises
    with pytest.raises(KeyError):
        count(mod.fail, where=str(pkg))
    assert sys.getprofile() is before


def test_a_step_counts_its_backward_too():
    # CPU tensors run backward in the calling thread: the reference backend's Python backward counts
    layer = host_bench.unilora_layer(nn.Linear(16, 8).requires_grad_(False), 32, "reference", 0.0, torch.rand(32))
    x = torch.randn(3, 16, requires_grad=True)
    forward = host_bench.warm_calls(lambda: layer(x))
    step = host_bench.warm_calls(host_bench.step_fn(layer, x))
    assert 0 < forward < step


def test_triton_kernel_bodies_and_interpreter_alias_are_not_counted():
    if triton_launch.IMPORT_ERROR is not None:
        pytest.skip(triton_launch.IMPORT_ERROR)
    names = {name for _, name in host_bench.uncounted_code()}
    assert {"shrink_kernel", "expand_kernel", "bwd_x_kernel", "bwd_db_kernel", "lora_tile",
            "interpreter_alias"} <= names
    assert "forward_" not in names  # host code of the backend stays counted
    if not triton_launch.INTERPRET:
        pytest.skip("the triton backend runs on CPU tensors only under TRITON_INTERPRET=1")
    layer = host_bench.unilora_layer(nn.Linear(64, 64).requires_grad_(False), 256, "triton", 0.0, torch.rand(256))
    fn = host_bench.step_fn(layer, torch.randn(64, 64))
    counted = host_bench.warm_calls(fn)
    everything = host_bench.count_package_calls(fn, exclude=())
    assert 0 < counted < everything


def _available():
    avail = {b for b in ("cpu", "triton") if host_bench._available(b) is None}
    if "triton" in avail and not triton_launch.INTERPRET:
        avail.discard("triton")  # conftest sets TRITON_INTERPRET=1 on a machine without a GPU
    return avail


def _check_rows(rows, avail):
    assert rows and all(r["correct"] == "True" for r in rows), rows
    figures = {r["figure"] for r in rows}
    expected = set()
    if "cpu" in avail:
        expected |= {"calls_p0", "calls_p0.1", "cpu_64x64_M1", "cpu_1024x1024_M1"}
    if "triton" in avail:
        expected |= {"calls_p0", "calls_p0.1", "triton_recorded_64x64_M64"}
    assert figures == expected
    peft = host_bench.peft_installed()
    for figure in figures:
        fr = {r["candidate"]: r for r in rows if r["figure"] == figure}
        ours = [r for name, r in fr.items() if name.startswith("unilora[")]
        assert ours and all("rel err vs float64 reference" in r["check"] and int(r["calls"]) > 0 for r in ours)
        if figure.startswith("calls_"):
            assert all(not r["median_us"] for r in fr.values())
            assert ("peft-lora" in fr) == (peft and "cpu" in avail)
            continue
        assert set(fr) == {"base", ours[0]["candidate"]} | ({"peft-lora"} if peft else set())
        assert all(float(r["median_us"]) > 0 and float(r["p20_us"]) <= float(r["p80_us"]) for r in fr.values())
        assert not fr["base"]["overhead_us"] and all(r["overhead_us"] for n, r in fr.items() if n != "base")
        if peft:
            want = host_bench.BASE_RATIO if figure == "cpu_1024x1024_M1" else host_bench.OVERHEAD_RATIO
            assert ours[0]["ratio_of"] == want and float(ours[0]["ratio"]) != 0


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One quick standalone run: (its directory, its stdout, what run_host_bench returned)."""
    avail = _available()
    if not avail:
        pytest.skip("neither the cpu nor the triton backend runs here")
    out_dir = tmp_path_factory.mktemp("host")
    real, result = host_bench.run_host_bench, {}

    def keep(*args, **kwargs):
        result["rows"] = real(*args, **kwargs)
        return result["rows"]

    threads, stdout = torch.get_num_threads(), io.StringIO()
    host_bench.run_host_bench = keep  # module scope: no monkeypatch fixture
    try:
        with contextlib.redirect_stdout(stdout):
            rc = host_bench.main(["--quick", "--min-time", "0.01", "--threads", "1", "--system-malloc",
                                  "--out", str(out_dir)])
    finally:
        host_bench.run_host_bench = real
        torch.set_num_threads(threads)
    assert rc == 0, stdout.getvalue()[-3000:]
    return out_dir, stdout.getvalue(), result["rows"]


def test_a_quick_run_writes_every_figure(quick_run):
    out_dir, out, _ = quick_run
    with open(out_dir / "host.csv", newline="") as fh:
        reader = csv.DictReader(fh)
        assert reader.fieldnames == host_bench.HOST_COLUMNS
        rows = list(reader)
    _check_rows(rows, _available())
    assert host_bench.TITLE in out and "calls_p0.1" in out
    env = json.loads((out_dir / "host_env.json").read_text())
    assert env["threads"] == 1 and env["malloc"] == "system default"


@pytest.mark.slow  # a fresh interpreter imports torch, peft and the package again: ~30 s on 2 busy cores
@pytest.mark.skipif(host_bench._available("triton") is not None, reason="triton is not installed")
def test_the_triton_figures_run_in_a_subprocess_and_count_what_this_process_counts():
    rows = host_bench.run_triton_figures(quick=True, min_time=0.01, system_malloc=True)
    assert {r["figure"] for r in rows} == {"calls_p0", "calls_p0.1", "triton_recorded_64x64_M64"}
    assert all(r["correct"] and r["candidate"] in ("base", "unilora[triton]", "peft-lora") for r in rows)
    if triton_launch.INTERPRET:
        for p in host_bench.DROPOUTS:
            row = next(r for r in rows if r["figure"] == f"calls_p{p:g}")
            assert row["calls"] == host_bench.step_calls("triton", p)


def _run_module():
    spec = importlib.util.spec_from_file_location("bench_run", ROOT / "benchmarks" / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TINY = ["--tiny", "--quick", "--cpu", "--system-malloc", "--no-memory", "--min-time", "0.01", "--no-model",
        "--modes", "inference"]


def test_run_py_runs_the_host_figures_unless_told_not_to(tmp_path, capsys, monkeypatch, quick_run):
    run = _run_module()
    calls = []

    def host(*args):  # the rows of the quick run above: this checks the wiring, not the figures again
        calls.append(args)
        return quick_run[2]

    monkeypatch.setattr(run, "run_host_bench", host)
    assert run.main([*TINY, "--out", str(tmp_path / "with")]) == 0
    assert calls == [(True, 0.01, True)]  # quick, --min-time, the system malloc
    out = capsys.readouterr().out
    with open(tmp_path / "with" / "host.csv", newline="") as fh:
        _check_rows(list(csv.DictReader(fh)), _available())
    assert host_bench.TITLE in out
    assert "## Host cost of a layer training step" in (tmp_path / "with" / "summary.md").read_text()
    assert run.main([*TINY, "--no-host", "--out", str(tmp_path / "without")]) == 0
    assert run.main([*TINY, "--candidates", "base", "--out", str(tmp_path / "filtered")]) == 0
    assert len(calls) == 1 and "no host figures" in capsys.readouterr().out
    assert not (tmp_path / "without" / "host.csv").exists() and not (tmp_path / "filtered" / "host.csv").exists()
    assert "--no-host" in run.partial_options(run.parse_args(["--no-host"]))
