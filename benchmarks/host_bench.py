#!/usr/bin/env python
"""Host-cost benchmark: the Python work of one Uni-LoRA layer training step, on this CPU.

    python -P benchmarks/host_bench.py                # every figure (results/<device>/partial/)
    python -P benchmarks/host_bench.py --quick        # shorter timing rounds
    python benchmarks/run.py                          # the main job runs it too (--no-host skips it)

On a GPU a small layer step is bound by its host work, so this benchmark measures that work
where it can be measured without a GPU, side by side with the frozen base layer and PEFT's
plain LoRA at the same r (medians of interleaved rounds: ``common.time_interleaved``):

* ``calls_p0``, ``calls_p0.1``: Python calls into the installed ``unilora_kernels`` package
  during one warm training step of a 64x64 layer (uniform projection, dropout 0 and 0.1), for the
  ``cpu`` and ``triton`` backends (PEFT LoRA: calls into ``peft``). Triton kernel bodies and
  ``interpreter_alias`` (interpreter-only work) are not counted (``count_package_calls``).
* ``triton_recorded_64x64_M64``: the triton backend's host time with every launch recorded
  instead of run (``triton_launch.record_launches``), over the frozen base step, against PEFT
  LoRA's overhead over the same base; run in a subprocess with ``TRITON_INTERPRET=1`` set
  before ``unilora_kernels`` is imported.
* ``cpu_64x64_M1``: the cpu backend's overhead over the base step against PEFT LoRA's;
  ``cpu_1024x1024_M1``: each step's time over the base step's.

A training step (``train_step``): x requires grad (as an activation inside a model), forward,
``sum()`` loss, ``backward()``; the gradients of x and of the adapter's trainable parameters
(theta_d, or PEFT's lora_A/lora_B) are set to None before each step; the base layer is frozen.
Every Uni-LoRA layer's step is checked against the same layer with the float64 ``reference``
backend before it is counted or timed. Writes host.csv (and host_env.json when run alone).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import importlib
import importlib.util
import inspect
import json
import os
import pkgutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import torch  # noqa: E402
from torch import nn  # noqa: E402

import unilora_kernels as uk  # noqa: E402
from unilora_kernels import backends  # noqa: E402

from candidates import peft_installed, unilora_name  # noqa: E402
from common import (device_name, device_slug, environment, keep_freed_memory, paired_difference_ms,  # noqa: E402
                    paired_ratio, time_interleaved, write_csv)
from layer_bench import TOL, _rel_err, build_candidates, trainables  # noqa: E402

R = 4
CALLS_CONFIG = dict(in_f=64, out_f=64, M=64, d=256)  # the call-count figures' layer and batch
DROPOUTS = (0.0, 0.1)
OVERHEAD_RATIO = "overhead / peft-lora overhead"
BASE_RATIO = "time / base"
# (figure, in, out, M, d, backend, what the ratio column holds, launches recorded instead of run)
TRITON_FIGURE = ("triton_recorded_64x64_M64", 64, 64, 64, 256, "triton", OVERHEAD_RATIO, True)
CPU_FIGURES = [
    ("cpu_64x64_M1", 64, 64, 1, 256, "cpu", OVERHEAD_RATIO, False),
    ("cpu_1024x1024_M1", 1024, 1024, 1, 4096, "cpu", BASE_RATIO, False),
]
HOST_COLUMNS = ["device", "figure", "candidate", "shape", "M", "d", "correct", "check", "median_us", "p20_us",
                "p80_us", "overhead_us", "ratio", "ratio_of", "calls"]
REFERENCE_POINT = "not the same function (timed as a reference point)"


# ------------------------------------------------------------------ counting calls -----------
def package_dir(module=uk) -> str:
    return os.path.dirname(os.path.realpath(module.__file__))


def _code_key(code) -> tuple:
    return os.path.realpath(code.co_filename), code.co_name


def uncounted_code() -> frozenset:
    """(file, name) of the package code that is not host work of a GPU step: the ``@triton.jit``
    functions under ``unilora_kernels/triton_kernels/`` (device code, run as Python by the
    interpreter) and ``triton_launch.interpreter_alias`` (called under the interpreter only)."""
    from unilora_kernels.backends import triton_launch

    keys = {_code_key(triton_launch.interpreter_alias.__code__)}
    if triton_launch.IMPORT_ERROR is not None:
        return frozenset(keys)
    from triton.runtime.jit import KernelInterface  # JITFunction, InterpretedFunction, Autotuner

    import unilora_kernels.triton_kernels as tk

    for info in pkgutil.iter_modules(tk.__path__):
        module = importlib.import_module(f"{tk.__name__}.{info.name}")
        for obj in vars(module).values():
            fn = obj
            while isinstance(fn, KernelInterface):
                fn = fn.fn
            if fn is not obj and inspect.isfunction(fn):
                keys.add(_code_key(fn.__code__))
    return frozenset(keys)


def count_package_calls(fn, where: str | None = None, exclude=None, tally=None) -> int:
    """Python calls (``sys.setprofile`` 'call' events) into code under the directory ``where``
    (default: the installed unilora_kernels package) while ``fn()`` runs, not counting the code
    ``exclude`` names as (file, function name) pairs (default: ``uncounted_code()``). ``tally``
    (a ``collections.Counter``) gets one count per call under ``"path/in/where.py:function"``.

    Only this thread's calls count: CPU tensors run their backward in the calling thread (CUDA
    ones on an autograd device thread, which this would miss).
    """
    root = os.path.realpath(where or package_dir()) + os.sep
    skip = uncounted_code() if exclude is None else frozenset(exclude)
    site = {}  # code object -> "file:function" when its calls count, else ""
    n = 0

    def profile(frame, event, arg):
        nonlocal n
        if event != "call":
            return
        code = frame.f_code
        label = site.get(code)
        if label is None:
            path, name = key = _code_key(code)
            label = site[code] = f"{path[len(root):]}:{name}" if path.startswith(root) and key not in skip else ""
        if label:
            n += 1
            if tally is not None:
                tally[label] += 1

    old = sys.getprofile()
    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(old)
    return n


def warm_calls(fn, where: str | None = None) -> int:
    """Calls of one warm ``fn()``: after a first call (lazy set-up, plans, the interpreter's rewrites)."""
    fn()
    return count_package_calls(fn, where)


# ------------------------------------------------------------------ the step -----------------
def train_step(layer: nn.Module, x: torch.Tensor, params: list) -> torch.Tensor:
    """One training step of a layer: x (a leaf that requires grad), forward, sum, backward."""
    x.grad = None
    for q in params:
        q.grad = None
    y = layer(x)
    y.sum().backward()
    return y


def step_fn(layer: nn.Module, x: torch.Tensor, recorded: bool = False):
    """A no-argument training step of ``layer`` on x; ``recorded``: Triton launches are recorded,
    not run (every candidate of a figure gets the same context, so its cost cancels)."""
    xg = x.detach().requires_grad_(True)
    params = trainables(layer)
    if not recorded:
        return lambda: train_step(layer, xg, params)
    from unilora_kernels.backends import triton_launch

    def step():
        with triton_launch.record_launches():  # a fresh list each step: the records do not pile up
            train_step(layer, xg, params)

    return step


def unilora_layer(base: nn.Module, d: int, backend: str, p: float, theta: torch.Tensor) -> uk.UniLoRALinear:
    layer = uk.UniLoRALinear(copy.deepcopy(base), r=R, theta_d_length=d, proj_seed=0, unilora_dropout=p,
                             backend=backend)
    with torch.no_grad():
        layer.theta_d.copy_(theta)
    return layer


def build(in_f: int, out_f: int, d: int, backend: str, p: float = 0.0) -> dict:
    """name -> layer: the frozen base, PEFT LoRA (r = R, dropout p) when peft is installed, and
    ``unilora[backend]`` on the same base, theta_d uniform in [-1, 1] (a visible update)."""
    cands = build_candidates(in_f, out_f, R, d, torch.float32, torch.device("cpu"), selected={"base", "peft-lora"})
    layers = {c.name: c.module for c in cands if c.timed}
    if p and "peft-lora" in layers:
        layers["peft-lora"].lora_dropout["default"] = nn.Dropout(p)  # what LoraConfig(lora_dropout=p) builds
    theta = torch.rand(d, generator=torch.Generator().manual_seed(d)) * 2 - 1
    layers[unilora_name(backend)] = unilora_layer(layers["base"], d, backend, p, theta)
    return layers


def check_step(layer: uk.UniLoRALinear, x: torch.Tensor) -> tuple[bool, str]:
    """The layer's training step against the same layer with the float64 reference backend
    (output, grad of x, grad of theta_d; the same dropout seed)."""
    ref = unilora_layer(layer.base_layer, layer.theta_d.numel(), "reference", layer.unilora_dropout,
                        layer.theta_d.detach()).double()
    results = []
    for module, xx in ((layer, x.float()), (ref, x.double())):
        xx = xx.detach().requires_grad_(True)
        torch.manual_seed(1234)  # dropout seeds come from torch's generator
        y = train_step(module, xx, [module.theta_d])
        results.append((y, xx.grad, module.theta_d.grad))
    errs = {name: _rel_err(a, b) for name, a, b in zip(("out", "grad_x", "grad_theta"), *results)}
    worst = max(errs, key=errs.get)
    return errs[worst] <= TOL[torch.float32], f"{worst} rel err vs float64 reference {errs[worst]:.2e}"


def step_calls(backend: str, p: float = 0.0, M: int = CALLS_CONFIG["M"]) -> int:
    """Package calls of one warm training step of ``UniLoRALinear(nn.Linear(64, 64), r=4, d=256)``
    on ``backend`` (triton: CPU tensors need ``TRITON_INTERPRET=1`` before the package is imported)."""
    c = CALLS_CONFIG
    base = nn.Linear(c["in_f"], c["out_f"]).requires_grad_(False)
    layer = unilora_layer(base, c["d"], backend, p, torch.rand(c["d"]) * 2 - 1)
    return warm_calls(step_fn(layer, torch.randn(M, c["in_f"])))


# ------------------------------------------------------------------ figures ------------------
def _row(figure, name, in_f, out_f, M, d, **kw) -> dict:
    return dict(figure=figure, candidate=name, shape=f"{in_f}x{out_f}", M=M, d=d, **kw)


def calls_rows(backend: str, with_peft: bool) -> list:
    """The call-count figures of one backend (and of PEFT LoRA, counted in peft's package)."""
    c = CALLS_CONFIG
    rows = []
    for p in DROPOUTS:
        figure = f"calls_p{p:g}"
        layers = build(c["in_f"], c["out_f"], c["d"], backend, p)
        x = torch.randn(c["M"], c["in_f"], generator=torch.Generator().manual_seed(c["M"]))
        ours = unilora_name(backend)
        ok, detail = check_step(layers[ours], x)
        rows.append(_row(figure, ours, c["in_f"], c["out_f"], c["M"], c["d"], correct=ok, check=detail,
                         calls=warm_calls(step_fn(layers[ours], x)) if ok else None))
        if with_peft and "peft-lora" in layers:
            import peft

            rows.append(_row(figure, "peft-lora", c["in_f"], c["out_f"], c["M"], c["d"], correct=True,
                             check="calls into the peft package", calls=warm_calls(step_fn(layers["peft-lora"], x),
                                                                                    package_dir(peft))))
    return rows


def timed_rows(figure, in_f, out_f, M, d, backend, ratio_of, recorded, quick, min_time) -> list:
    """One timed figure: base, PEFT LoRA and unilora[backend] in interleaved rounds."""
    layers = build(in_f, out_f, d, backend)
    x = torch.randn(M, in_f, generator=torch.Generator().manual_seed(M))
    ours = unilora_name(backend)
    rows = {}
    for name, layer in layers.items():
        ok, detail = check_step(layer, x) if name == ours else (True, REFERENCE_POINT)
        rows[name] = _row(figure, name, in_f, out_f, M, d, correct=ok, check=detail)
    fns = {name: step_fn(layer, x, recorded) for name, layer in layers.items() if rows[name]["correct"]}
    if ours in fns:
        rows[ours]["calls"] = warm_calls(fns[ours])
    times = time_interleaved(fns, quick, min_time)
    base = times["base"]
    for name, t in times.items():
        row = rows[name]
        row.update(median_us=t.median_ms * 1e3, p20_us=t.p20_ms * 1e3, p80_us=t.p80_ms * 1e3)
        if name != "base":
            row["overhead_us"] = paired_difference_ms(t, base) * 1e3
            if ratio_of == BASE_RATIO:
                row.update(ratio=paired_ratio(t, base), ratio_of=ratio_of)
    peft = rows.get("peft-lora", {}).get("overhead_us")
    if ratio_of == OVERHEAD_RATIO and peft and rows[ours].get("overhead_us") is not None:
        rows[ours].update(ratio=rows[ours]["overhead_us"] / peft, ratio_of=ratio_of)
    return list(rows.values())


def triton_worker(quick: bool, min_time) -> list:
    """The Triton figures, in a process that imported the package with TRITON_INTERPRET=1."""
    from unilora_kernels.backends import triton_launch

    if not triton_launch.INTERPRET:
        raise RuntimeError("the Triton host figures need TRITON_INTERPRET=1 set before unilora_kernels is imported")
    return calls_rows("triton", with_peft=False) + timed_rows(*TRITON_FIGURE, quick, min_time)


def run_triton_figures(quick: bool, min_time, system_malloc: bool) -> list:
    """``triton_worker`` in a subprocess, so this process's Triton kernels stay compiled ones."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows.json")
        cmd = [sys.executable, "-P", os.path.abspath(__file__), "--triton-worker", out,
               "--threads", str(torch.get_num_threads())]
        cmd += (["--quick"] if quick else []) + (["--min-time", str(min_time)] if min_time else [])
        cmd += ["--system-malloc"] if system_malloc else []
        res = subprocess.run(cmd, env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True,
                             timeout=3600)
        if res.returncode != 0:
            raise RuntimeError(f"the Triton host figures (a subprocess with TRITON_INTERPRET=1) failed:\n"
                               f"{res.stdout[-2000:]}{res.stderr[-4000:]}")
        with open(out, encoding="utf-8") as fh:
            return json.load(fh)


def _available(backend: str) -> str | None:
    """Why ``backend`` cannot run on CPU tensors here (None when it can)."""
    if backend == "triton":
        return None if importlib.util.find_spec("triton") else "triton is not installed"
    try:
        backends.get_backend(backend, "cpu")
    except backends.BackendNotAvailableError as e:
        return str(e)
    return None


FIGURE_ORDER = ["calls_p0", "calls_p0.1", TRITON_FIGURE[0], *(f[0] for f in CPU_FIGURES)]
CANDIDATE_ORDER = ["base", "unilora[cpu]", "unilora[triton]", "peft-lora"]


def run_host_bench(quick: bool, min_time=None, system_malloc: bool = False, log=print) -> tuple[list, list]:
    """Every host figure that can run here: (rows, skipped). Threads: torch's current setting."""
    rows, skipped = [], []
    with_peft = peft_installed()
    if not with_peft:
        skipped.append("host: peft is not installed: no PEFT LoRA reference points (pip install peft)")
    why = _available("cpu")
    if why:
        skipped.append(f"host: cpu backend figures: {why}")
    else:
        log("host: call counts and timings of the cpu backend")
        rows += calls_rows("cpu", with_peft)
        for figure in CPU_FIGURES:
            rows += timed_rows(*figure, quick, min_time)
    why = _available("triton")
    if why:
        skipped.append(f"host: triton backend figures: {why}")
    else:
        from unilora_kernels.backends import triton_launch

        if triton_launch.INTERPRET:  # this process interprets already (the test suite): nothing to keep apart
            log("host: call counts and recorded-launch timings of the triton backend (interpreted here)")
            rows += triton_worker(quick, min_time)
        else:
            log("host: call counts and recorded-launch timings of the triton backend (a TRITON_INTERPRET=1 subprocess)")
            rows += run_triton_figures(quick, min_time, system_malloc)
    rows.sort(key=lambda r: (FIGURE_ORDER.index(r["figure"]), CANDIDATE_ORDER.index(r["candidate"])))
    device = device_name(torch.device("cpu"))
    for r in rows:
        r["device"] = device
    return rows, skipped


# ------------------------------------------------------------------ output -------------------
def _f(v, fmt="{:.1f}"):
    return "-" if v is None else fmt.format(v)


def _cells(r) -> list:
    if not r["correct"]:
        return [r["figure"], r["candidate"], r["shape"], str(r["M"]), f"WRONG: {r['check']}", "", "", "", ""]
    spread = "-" if r.get("p20_us") is None else f"{r['p20_us']:.1f}..{r['p80_us']:.1f}"
    ratio = "-" if r.get("ratio") is None else f"{r['ratio']:.2f}x ({r['ratio_of']})"
    return [r["figure"], r["candidate"], r["shape"], str(r["M"]), _f(r.get("median_us")), spread,
            _f(r.get("overhead_us"), "{:+.1f}"), ratio, _f(r.get("calls"), "{}")]


HEAD = ["figure", "candidate", "shape", "M", "median us", "p20..p80 us", "overhead us", "ratio", "calls"]
WHAT = (f"one layer training step on the CPU (x requires grad; forward, sum, backward), r={R}; "
        "medians of interleaved rounds; overhead over the frozen base step")
TITLE = f"host: {WHAT}"


def print_host_table(rows, out=None) -> None:
    if not rows:
        return
    out = out or sys.stdout  # looked up per call (pytest's capsys swaps it)
    table = [HEAD] + [_cells(r) for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(HEAD))]
    print(f"\n{TITLE}", file=out)
    for line in table:
        print("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip(), file=out)


def summary_lines(rows) -> list:
    """The host figures as a markdown section (run.py's summary.md)."""
    if not rows:
        return []
    lines = ["## Host cost of a layer training step", "", f"{WHAT[0].upper()}{WHAT[1:]}.", "",
             "| " + " | ".join(HEAD) + " |", "|" + "---|" * len(HEAD)]
    lines += ["| " + " | ".join(_cells(r)) + " |" for r in rows]
    return lines + [""]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="shorter timing rounds")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default: all this process may use; on a machine busy with other work, "
                        "1 keeps the stalls of waiting for a descheduled OpenMP thread out of the figures)")
    p.add_argument("--min-time", type=float, default=None,
                   help="seconds of timing per candidate and figure (default 1, 0.25 with --quick)")
    p.add_argument("--out", default=None, help="results directory (default benchmarks/results/<device>/partial/: "
                                               "a host-only run never replaces a full run's files)")
    p.add_argument("--system-malloc", action="store_true", help="keep glibc's default malloc settings (see run.py)")
    p.add_argument("--triton-worker", metavar="JSON", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    run_argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(run_argv)
    everything = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(args.threads or everything)
    malloc = "system default" if args.system_malloc else keep_freed_memory()
    if args.triton_worker:
        with open(args.triton_worker, "w", encoding="utf-8") as fh:
            json.dump(triton_worker(args.quick, args.min_time), fh)
        return 0
    started = datetime.datetime.now(datetime.timezone.utc)
    cpu = torch.device("cpu")
    out_dir = args.out or os.path.join(HERE, "results", device_slug(cpu), "partial")
    os.makedirs(out_dir, exist_ok=True)
    env = {**environment(cpu), "malloc": malloc}
    print(f"device: {env['device']} | torch {env['torch']} | triton {env['triton']} | peft {env['peft']} | "
          f"threads {env['threads']} | malloc: {malloc} | results go to {out_dir}")
    rows, skipped = run_host_bench(args.quick, args.min_time, args.system_malloc)
    write_csv(os.path.join(out_dir, "host.csv"), rows, HOST_COLUMNS)
    with open(os.path.join(out_dir, "host_env.json"), "w", encoding="utf-8") as fh:
        json.dump({**env, "date": started.isoformat(), "argv": run_argv, "skipped": skipped}, fh, indent=1)
    print_host_table(rows)
    for s in skipped:
        print(f"skipped: {s}")
    wrong = [r for r in rows if not r["correct"]]
    for r in wrong:
        print(f"WRONG RESULT: {r['candidate']} {r['figure']}: {r['check']}")
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
