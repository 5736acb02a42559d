"""Timing, environment and memory measurement shared by the layer and model benchmarks."""

from __future__ import annotations

import csv
import ctypes
import platform
import re
import statistics
import sys
from dataclasses import dataclass
from typing import Callable, Optional

import torch


# ------------------------------------------------------------------ environment -------------
def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()} ({torch.get_num_threads()} threads)"


def device_slug(device: torch.device) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"cpu-{cpu_name()}-{torch.get_num_threads()}t"
    return re.sub(r"[^a-z0-9.]+", "-", name.lower()).strip("-")


def environment(device: torch.device) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    try:
        import peft

        peft_version = peft.__version__
    except ImportError:
        peft_version = None
    import unilora_kernels as uk

    info = uk.build_info()
    return {
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "triton": triton_version,
        "peft": peft_version,
        "threads": torch.get_num_threads(),
        "unilora_kernels": info["version"],
        "backends": info["backends"],
        "python": platform.python_version(),
    }


def keep_freed_memory() -> str:
    """CPU runs: stop glibc's malloc from handing freed memory back to the OS between calls.

    With glibc's defaults, freeing a call's large buffers can trim the heap, and the next call
    that needs them faults every page back in; timed in alternation, that lands on whichever
    candidate comes next, at random. Pinned thresholds (no trimming; the heap, not mmap, for
    buffers under 32 MiB) keep freed memory as jemalloc and tcmalloc do; the heap then stays at
    its high-water mark (measurements: docs/PERF.md). Returns what was set (recorded in
    env.json); nothing outside Linux/glibc.
    """
    if not sys.platform.startswith("linux"):
        return "system default"
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return "system default (no glibc mallopt)"
    m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
    if mallopt(m_trim_threshold, 2**31 - 1) != 1 or mallopt(m_mmap_threshold, 32 << 20) != 1:
        return "system default (mallopt refused)"
    return "glibc, M_TRIM_THRESHOLD=2 GiB, M_MMAP_THRESHOLD=32 MiB"


def write_csv(path, rows, columns):
    """``rows`` (dicts) as a CSV of ``columns``; a missing key is an empty cell."""
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k) for k in columns})


# ------------------------------------------------------------------ timing -------------------
@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    runs: int
    rounds: Optional[list] = None  # per-round seconds per call (time_interleaved), aligned across candidates


def paired_ratio(a: Timing, b: Timing) -> float:
    """a's time over b's: the median of per-round ratios when both were timed in the same rounds
    (machine-speed drifts cancel round by round), else the ratio of medians."""
    if a.rounds and b.rounds and len(a.rounds) == len(b.rounds):
        return statistics.median(x / y for x, y in zip(a.rounds, b.rounds))
    return a.median_ms / b.median_ms


def paired_difference_ms(a: Timing, b: Timing) -> float:
    """a's time minus b's (ms per call): the median of per-round differences when both were timed in
    the same rounds (as ``paired_ratio``), else the difference of medians."""
    if a.rounds and b.rounds and len(a.rounds) == len(b.rounds):
        return statistics.median(x - y for x, y in zip(a.rounds, b.rounds)) * 1e3
    return a.median_ms - b.median_ms


def time_fn(fn: Callable[[], object], device: torch.device, quick: bool) -> Timing:
    """Median and 20/80 percentiles: do_bench on GPU, torch.utils.benchmark on CPU (after warm-up)."""
    if device.type == "cuda":
        import triton.testing

        rep = 40 if quick else 200
        med, p20, p80 = triton.testing.do_bench(fn, warmup=10 if quick else 50, rep=rep, quantiles=[0.5, 0.2, 0.8])
        return Timing(med, p20, p80, -1)
    from torch.utils import benchmark

    fn()  # warm-up: lazy initialisation, allocator, caches
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    m = timer.blocked_autorange(min_run_time=0.25 if quick else 1.0)
    times = sorted(m.times)
    q = statistics.quantiles(times, n=5) if len(times) >= 2 else [times[0]] * 4
    return Timing(m.median * 1e3, q[0] * 1e3, q[3] * 1e3, len(m.raw_times) * m.number_per_run)


def time_interleaved(fns: dict, quick: bool, min_time: Optional[float] = None) -> dict:
    """CPU timings of several candidates measured in alternation: {name: Timing}.

    Each round runs every candidate for the same number of calls (at least ~10 ms per candidate),
    so all of them sample the same machine state; on a shared VM the speed drifts within
    seconds, which timing one candidate after the other turns into fake ratios. Median
    and 20/80 percentiles are over rounds, per call; ``paired_ratio`` compares two candidates
    round by round.
    """
    import time

    names = list(fns)
    for fn in fns.values():
        fn()  # warm-up: lazy initialisation, allocator, caches
    calls = {}
    for name, fn in fns.items():  # calls per round: ~10 ms of this candidate, at least one call
        t0 = time.perf_counter()
        fn()
        calls[name] = max(1, int(0.01 / max(time.perf_counter() - t0, 1e-7)))
    budget = (min_time if min_time else (0.25 if quick else 1.0)) * len(names)
    samples = {name: [] for name in names}
    start = time.perf_counter()
    while len(samples[names[0]]) < 5 or (time.perf_counter() - start < budget and len(samples[names[0]]) < 2000):
        for name in names:
            fn, n = fns[name], calls[name]
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            samples[name].append((time.perf_counter() - t0) / n)
    out = {}
    for name, times in samples.items():
        q = statistics.quantiles(sorted(times), n=5)
        out[name] = Timing(statistics.median(times) * 1e3, q[0] * 1e3, q[3] * 1e3, len(times) * calls[name], times)
    return out


# Why a CPU row has no device_ms (written in the row's device_ms_source cell).
NO_DEVICE_TIME_ON_CPU = "none on cpu: no device clock apart from the host's (median_ms is the time)"


def device_time_ms(fn: Callable[[], object], device: torch.device, calls: int = 20) -> tuple:
    """(device ms per call, how it was measured): the sum of the GPU activities' durations
    (kernels, memcpy, memset; not the user-annotation ranges) that the profiler records over
    ``calls`` calls, divided by ``calls``. Launch gaps and host time are left out, so it is the
    number to hold against the byte/flop floor; overlapping streams would count twice (these
    benchmarks use one). The profiler and not graph replay: it times any callable, training
    steps and autotuned kernels included, without capturing it. On CPU: (None, the reason)."""
    if device.type != "cuda":
        return None, NO_DEVICE_TIME_ON_CPU
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    fn()  # warm-up outside the profile: compilation, autotuning, allocator
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    spans = [e.time_range.elapsed_us() for e in prof.events()
             if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)]
    if not spans:  # the profiler saw no GPU activity (e.g. CUPTI unavailable): no number
        return None, "none: the profiler recorded no GPU activity"
    return sum(spans) / calls / 1e3, f"profiler: GPU activity summed over {calls} calls"


# ------------------------------------------------------------------ memory -------------------
def saved_for_backward_bytes(fn: Callable[[], torch.Tensor]) -> int:
    """Bytes of distinct storages autograd saves while ``fn`` runs its forward."""
    seen = {}

    def pack(t):
        try:
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
        except (RuntimeError, NotImplementedError):  # e.g. tensor subclasses without storage
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values())


def largest_allocation_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """The largest single allocation while ``fn`` runs (the profiler attributes each to its op)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, profile_memory=True) as prof:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
    key = "self_device_memory_usage" if device.type == "cuda" else "self_cpu_memory_usage"
    return max([getattr(e, key, 0) or 0 for e in prof.events()] + [0])


def peak_memory_bytes(fn: Callable[[], object], device: torch.device) -> Optional[int]:
    """Peak allocated GPU memory above what was allocated before ``fn`` (None on CPU)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated(device) - base


def progress(total: int, desc: str):
    """A tqdm progress bar on stderr (a plain counter when tqdm is missing)."""
    try:
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit="run", dynamic_ncols=True, leave=True)
    except ImportError:  # pragma: no cover
        class _Plain:
            def __init__(self):
                self.n = 0

            def update(self, k=1):
                self.n += k
                print(f"\r{desc}: {self.n}/{total}", end="", flush=True, file=sys.stderr)

            def set_postfix_str(self, s):
                pass

            def close(self):
                print(file=sys.stderr)

        return _Plain()
