#!/usr/bin/env python
"""Benchmarks of unilora_kernels against the naive PyTorch projection (PEFT's Uni-LoRA layer).

    python benchmarks/run.py                          # the full run on this machine (GPU if present)
    python benchmarks/run.py --quick                  # a minute or two: one shape, three batch sizes
    python benchmarks/run.py --candidates base naive unilora[cpu]   # time only these
    python benchmarks/run.py --out DIR                # results go to DIR
    python benchmarks/run.py --no-model --no-host     # the layer benchmark alone

Writes layer.csv, model.csv, host.csv (the host cost of a layer step: host_bench.py), env.json,
summary.md and PNG plots (with matplotlib), and prints a table. A full run writes to
benchmarks/results/<device>/; a partial one (--quick, --candidates, --shapes, ...) to
benchmarks/results/<device>/partial/, so it never replaces a full run's files. Every candidate's
output (and gradients) are checked against the naive projection (host figures: against the float64
reference backend) before it is timed; the run exits non-zero if any Uni-LoRA candidate disagrees.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
os.environ.setdefault("KINETO_LOG_LEVEL", "6")  # the profiler (memory measurement) is chatty otherwise

import torch  # noqa: E402

from candidates import ALL_NAMES, is_selected, layer_candidate_names, model_candidate_names, select  # noqa: E402
from common import device_slug, environment, keep_freed_memory, progress, write_csv  # noqa: E402
from host_bench import HOST_COLUMNS, print_host_table, run_host_bench, summary_lines  # noqa: E402
from layer_bench import build_candidates, run_config  # noqa: E402
from model_bench import MODEL_COLUMNS, print_rows, run_model_bench, summary_lines as model_summary_lines  # noqa: E402

FULL_SHAPES = [(1024, 1024), (4096, 4096), (4096, 11008)]  # RoBERTa-large q/v; Llama-2-7B attn, MLP
FULL_DS = [23_040, 524_288]  # the paper's d
FULL_MS = [1, 16, 256, 2048, 8192]
LAYER_COLUMNS = [
    "device", "dtype", "mode", "in_features", "out_features", "r", "d", "M", "candidate", "backend", "kind",
    "correct", "check", "median_ms", "p20_ms", "p80_ms", "device_ms", "device_ms_source", "naive_ref", "ratio_to_naive", "ratio_to_base",
    "index_bytes_per_elem", "saved_bytes", "largest_alloc_bytes", "peak_mem_bytes",
    "model_device", "model_base_ms", "model_split_ms", "model_fold_ms", "fold_min_m",
]
# Options that make a run cover less than the full plan; such a run is "partial".
PARTIAL_OPTIONS = ("quick", "tiny", "candidates", "shapes", "ds", "ms", "modes", "no_model", "no_host")
PLOTS_HINT = "no plots: matplotlib is not installed (pip install matplotlib, or the bench extra: pip install '.[bench]')"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="short run: one shape, three batch sizes")
    p.add_argument("--out", default=None, help="results directory (default benchmarks/results/<device>/, "
                                               "and its partial/ subdirectory for a partial run)")
    p.add_argument("--candidates", nargs="+", default=None, metavar="NAME",
                   help=f"time only these candidates (of {', '.join(ALL_NAMES)})")
    p.add_argument("--cpu", action="store_true", help="benchmark on CPU even when a GPU is present")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="activation dtype (default: bfloat16 on GPU, float32 on CPU)")
    p.add_argument("--shapes", default=None, help="override, e.g. 1024x1024,4096x11008")
    p.add_argument("--ds", default=None, help="override theta_d lengths, e.g. 23040,524288")
    p.add_argument("--ms", default=None, help="override batch sizes M, e.g. 1,16,256")
    p.add_argument("--r", type=int, default=4)
    p.add_argument("--modes", default=None, help="inference,training (the default: both)")
    p.add_argument("--no-model", action="store_true", help="skip the model benchmark")
    p.add_argument("--no-host", action="store_true",
                   help="skip the host-cost benchmark (host_bench.py; --candidates skips it too: its candidates "
                        "are fixed)")
    p.add_argument("--no-memory", action="store_true", help="skip the per-layer memory measurements")
    p.add_argument("--tiny", action="store_true", help="tiny sizes (for tests)")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds: start no new layer config after this (the rest are listed as skipped)")
    p.add_argument("--min-time", type=float, default=None,
                   help="CPU: seconds of timing per candidate and config (default 1, 0.25 with --quick); "
                        "more gives steadier ratios on a noisy machine")
    p.add_argument("--system-malloc", action="store_true",
                   help="CPU: keep glibc's default malloc settings (by default the run stops malloc from "
                        "returning freed memory to the OS between calls; see docs/PERF.md)")
    p.add_argument("--cpu-gflop-budget", type=float, default=None,
                   help="skip CPU configs whose training step needs more GFLOP than this")
    return p.parse_args(argv)


def partial_options(args) -> list:
    """The options that narrow this run (empty for a full run)."""
    return ["--" + name.replace("_", "-") for name in PARTIAL_OPTIONS if getattr(args, name)]


def output_dir(args, device) -> str:
    """Where the results go. A partial run defaults to the partial/ subdirectory, and refuses an
    --out that holds a full run's results: it never replaces them."""
    full_dir = os.path.join(HERE, "results", device_slug(device))
    if not partial_options(args):
        return args.out or full_dir
    out = args.out or os.path.join(full_dir, "partial")
    env_file = os.path.join(out, "env.json")
    if os.path.exists(env_file):
        with open(env_file, encoding="utf-8") as fh:
            previous = json.load(fh)
        if "partial" in previous:
            previous_partial = previous["partial"]
        else:  # written before env.json recorded it: judge by the options it ran with
            try:
                previous_partial = bool(partial_options(parse_args(previous.get("argv", []))))
            except SystemExit:  # options this version does not know: treat it as a full run
                previous_partial = False
        if not previous_partial:
            raise ValueError(f"{out} holds the results of a full run; a partial run "
                             f"({' '.join(partial_options(args))}) does not replace them: pick another --out")
    return out


def _ints(text):
    return [int(v) for v in text.split(",") if v]


def plan(args, device):
    if args.tiny:
        shapes, ds, ms = [(64, 48)], [97], [1, 5]
    elif args.quick:
        shapes, ds, ms = [(1024, 1024)], [23_040], [1, 256, 2048]
    else:
        shapes, ds, ms = FULL_SHAPES, FULL_DS, FULL_MS
    if args.shapes:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    if args.ds:
        ds = _ints(args.ds)
    if args.ms:
        ms = _ints(args.ms)
    budget = args.cpu_gflop_budget or (12.0 if args.quick else 40.0)
    configs, skipped = [], []
    for in_f, out_f in shapes:
        for d in ds:
            for M in ms:
                gflop = 4 * M * in_f * out_f / 1e9  # frozen base: forward GEMM + grad_x GEMM
                if device.type == "cpu" and gflop > budget:
                    skipped.append(f"{in_f}x{out_f} d={d} M={M}: {gflop:.0f} GFLOP per training step of the base "
                                   f"layer alone, over this CPU run's budget of {budget:.0f} (--cpu-gflop-budget)")
                    continue
                configs.append((in_f, out_f, d, M))
    return configs, skipped


def fmt_ms(v):
    return "-" if v is None else (f"{v:.3f}" if v < 10 else f"{v:.1f}")


def fmt_ratio(v):
    return "-" if v is None else f"{v:.2f}x"


def print_table(rows, out=sys.stdout):
    groups = {}
    for r in rows:
        groups.setdefault((r["in_features"], r["out_features"], r["d"], r["mode"]), []).append(r)
    for (in_f, out_f, d, mode), rs in groups.items():
        cands = list(dict.fromkeys(r["candidate"] for r in rs))
        model = rs[0].get("model_device", "")
        print(f"\n{in_f}x{out_f}  r={rs[0]['r']}  d={d:,}  {mode}: median ms (x base, x naive); "
              f"the byte/flop model's ms on an {model}: base GEMMs / split / fold", file=out)
        print(f"{'M':>6} " + " ".join(f"{c:>26}" for c in cands) + f" {'model ' + model:>26}", file=out)
        for M in sorted({r["M"] for r in rs}):
            cells = []
            for c in cands:
                r = next((r for r in rs if r["M"] == M and r["candidate"] == c), None)
                if r is None:
                    cells.append(f"{'':>26}")
                elif not r["correct"]:
                    cells.append(f"{'WRONG: not timed':>26}")
                else:
                    rb, rn = r.get("ratio_to_base"), r.get("ratio_to_naive")
                    cells.append(f"{fmt_ms(r['median_ms']):>9} ({rb:5.2f}x, {rn:5.2f}x)"
                                 if rb is not None and rn is not None else f"{fmt_ms(r['median_ms']):>26}")
            m = next((r for r in rs if r["M"] == M and r.get("model_split_ms") is not None), None)
            if m is not None:
                cells.append(f"{fmt_ms(m['model_base_ms']):>8} /{fmt_ms(m['model_split_ms']):>7} /"
                             f"{fmt_ms(m['model_fold_ms']):>7}")
            print(f"{M:>6} " + " ".join(cells), file=out)


def plot(rows, model_rows, out_dir, title) -> list:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    groups = {}
    for r in rows:
        groups.setdefault((r["in_features"], r["out_features"], r["d"]), []).append(r)
    for (in_f, out_f, d), rs in groups.items():
        if not any(r.get("ratio_to_naive") for r in rs):
            continue  # the naive projection was not timed (--candidates): nothing to plot
        modes = list(dict.fromkeys(r["mode"] for r in rs))
        fig, axes = plt.subplots(1, len(modes), figsize=(6 * len(modes), 4.2), squeeze=False)
        for ax, mode in zip(axes[0], modes):
            sub = [r for r in rs if r["mode"] == mode and r.get("ratio_to_naive")]
            for cand in dict.fromkeys(r["candidate"] for r in sub):
                pts = sorted((r["M"], 1.0 / r["ratio_to_naive"]) for r in sub if r["candidate"] == cand)
                style = "--" if cand == "base" else "-"
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", label=cand)
            ax.axhline(1.0, color="grey", lw=0.8)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log", base=2)
            ax.set_xlabel("M (tokens)")
            ax.set_ylabel(f"speed-up over {sub[0]['naive_ref'] if sub else 'naive'}")
            ax.set_title(f"{mode}: {in_f}x{out_f}, r={rs[0]['r']}, d={d:,}")
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=8)
        fig.suptitle(title, fontsize=9)
        fig.tight_layout()
        name = f"speedup_{in_f}x{out_f}_d{d}.png"
        fig.savefig(os.path.join(out_dir, name), dpi=110)
        plt.close(fig)
        files.append(name)
    # memory: index bytes per element of D, and bytes saved for backward at the largest M measured
    mem = [r for r in rows if r["mode"] == "training" and r.get("saved_bytes") is not None]
    if mem:
        first = (mem[0]["in_features"], mem[0]["out_features"], mem[0]["d"])
        mem = [r for r in mem if (r["in_features"], r["out_features"], r["d"]) == first]
        M = max(r["M"] for r in mem)
        mem = [r for r in mem if r["M"] == M]
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
        names = [r["candidate"] for r in mem]
        axes[0].bar(names, [r["saved_bytes"] / 2**20 for r in mem], color="tab:blue")
        axes[0].set_ylabel("MiB saved for backward")
        axes[0].set_title(f"{first[0]}x{first[1]}, d={first[2]:,}, M={M}")
        idx = [r for r in mem if r.get("index_bytes_per_elem") is not None]
        axes[1].bar([r["candidate"] for r in idx], [r["index_bytes_per_elem"] for r in idx], color="tab:orange")
        axes[1].set_ylabel("index + scale bytes per element of D")
        for ax in axes:
            ax.tick_params(axis="x", rotation=30, labelsize=8)
        fig.suptitle(title, fontsize=9)
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "memory.png"), dpi=110)
        plt.close(fig)
        files.append("memory.png")
    return files


def headline(rows) -> list:
    """Per Uni-LoRA backend: ratio to the naive projection and to the base, per mode and M."""
    lines = []
    for r in rows:
        if r["kind"] == "unilora" and r["candidate"].startswith("unilora") and r.get("ratio_to_naive"):
            lines.append(
                f"| {r['candidate']} | {r['mode']} | {r['in_features']}x{r['out_features']} | {r['d']:,} | {r['M']} | "
                f"{fmt_ms(r['median_ms'])} | {1 / r['ratio_to_naive']:.2f}x | {fmt_ratio(r['ratio_to_base'])} |"
            )
    return lines


def write_summary(out_dir, env, rows, model_rows, skipped, files, started, argv, host_rows=()):
    lines = [
        f"# Benchmark results: {env['device']}",
        "",
        f"Date: {started:%Y-%m-%d %H:%M} UTC. Device type: **{env['device_type'].upper()}** "
        f"({'all figures below are CPU timings' if env['device_type'] == 'cpu' else 'all figures below are GPU timings'}).",
        f"torch {env['torch']}, triton {env['triton']}, peft {env['peft']}, unilora_kernels {env['unilora_kernels']}, "
        f"{env['threads']} CPU threads, malloc: {env['malloc']}. "
        f"Command: `python benchmarks/run.py {' '.join(argv)}`.",
        "",
        "Times are medians (torch.utils.benchmark on CPU, triton.testing.do_bench on GPU) after warm-up;",
        "every candidate was checked against the naive projection (PEFT's layer when installed) at the timed size first.",
        "layer.csv's `device_ms`: GPU time per call from the profiler (kernels, memcpy and memset summed: no launch",
        "gaps, no host time); empty on CPU, which has no device clock apart from the host's (`device_ms_source` says so).",
        "`model_*_ms`: the byte/flop model of backends/cost_model.py for `model_device` (the GPU benchmarked, an H100",
        "on a CPU run): the base GEMMs, the split and the fold schedule; `fold_min_m`: the rows from which cuda/triton fold.",
        "",
        "## Layer",
        "",
        "| candidate | mode | shape | d | M | median ms | speed-up vs naive | time / frozen base |",
        "|---|---|---|---|---|---|---|---|",
        *headline(rows),
        "",
    ]
    base_rows = [r for r in rows if r["candidate"] in ("naive", "peft-unilora", "peft-lora") and r.get("ratio_to_base")]
    if base_rows:
        lines += ["Reference points (time / frozen base):", "",
                  "| candidate | mode | shape | d | M | median ms | time / frozen base |", "|---|---|---|---|---|---|---|"]
        for r in base_rows:
            lines.append(f"| {r['candidate']} | {r['mode']} | {r['in_features']}x{r['out_features']} | {r['d']:,} | "
                         f"{r['M']} | {fmt_ms(r['median_ms'])} | {r['ratio_to_base']:.2f}x |")
        lines.append("")
    lines += model_summary_lines(model_rows)
    lines += summary_lines(host_rows)
    if skipped:
        lines += ["## Skipped", "", *[f"- {s}" for s in skipped], ""]
    lines += ["## Plots", "", *([f"![{f}]({f})" for f in files] if files else [PLOTS_HINT.capitalize() + "."]), ""]
    with open(os.path.join(out_dir, "summary.md"), "w", encoding="utf-8") as fh:
        fh.write("\n".join(lines))


def matplotlib_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def main(argv=None) -> int:
    run_argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(run_argv)
    started = datetime.datetime.now(datetime.timezone.utc)
    use_cuda = torch.cuda.is_available() and not args.cpu
    device = torch.device("cuda" if use_cuda else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        selected = select(args.candidates, device)
        out_dir = output_dir(args, device)
    except ValueError as e:
        print(f"benchmarks/run.py: error: {e}", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if use_cuda else torch.float32)
    env = environment(device)
    env["malloc"] = "system default" if use_cuda or args.system_malloc else keep_freed_memory()
    os.makedirs(out_dir, exist_ok=True)
    print(f"device: {env['device']} | torch {env['torch']} | triton {env['triton']} | peft {env['peft']} | "
          f"threads {env['threads']} | dtype {str(dtype).replace('torch.', '')} | malloc: {env['malloc']}")
    layer_names = [n for n in layer_candidate_names(device) if is_selected(n, selected)]
    model_names = [] if args.no_model else model_candidate_names(device, selected)
    print(f"candidates timed: {', '.join(layer_names)}")
    if selected is not None:
        unmeasured = [what for what, there in (("x base", "base" in selected),
                                               ("x naive", selected & {"naive", "peft-unilora"})) if not there]
        if unmeasured:
            print(f"note: no {' or '.join(unmeasured)} ratios: the candidate they divide by is not timed")
        if not args.no_host:
            print("note: no host figures: their candidates are fixed "
                  "(run them alone: python -P benchmarks/host_bench.py)")
    partial = partial_options(args)
    print(f"results go to {out_dir}" + (f" (a partial run: {' '.join(partial)})" if partial else ""))
    plots = matplotlib_available()
    if not plots:
        print(f"note: {PLOTS_HINT}; the CSVs and summary.md are written all the same")
    modes = [m for m in (args.modes or "inference,training").split(",") if m]
    configs, skipped = plan(args, device)
    for s in skipped:
        print(f"skipped: {s}")
    n_cands = len(layer_names)
    total = len(configs) * len(modes) * n_cands + 6 * len(model_names)  # 6 model rows each: 2 train, 2x2 decode
    bar = progress(total, "benchmarks")
    rows = []
    t0 = time.perf_counter()
    for key in dict.fromkeys((c[0], c[1], c[2]) for c in configs):
        in_f, out_f, d = key
        cands = build_candidates(in_f, out_f, args.r, d, dtype, device, selected=selected)
        for (_, _, _, M) in [c for c in configs if c[:3] == key]:
            if args.time_budget is not None and time.perf_counter() - t0 > args.time_budget:
                skipped.append(f"{in_f}x{out_f} d={d} M={M}: over the --time-budget of {args.time_budget:.0f}s")
                bar.update(len(modes) * n_cands)
                continue
            bar.set_postfix_str(f"{in_f}x{out_f} d={d} M={M}")
            rows += run_config(cands, in_f, out_f, args.r, d, M, modes, dtype, device, args.quick,
                               not args.no_memory, bar, min_time=args.min_time)
            write_csv(os.path.join(out_dir, "layer.csv"), rows, LAYER_COLUMNS)  # partial results survive a kill
        del cands
        gc.collect()
        if use_cuda:
            torch.cuda.empty_cache()
    model_rows = run_model_bench(device, dtype, args.quick, args.tiny, bar, selected) if model_names else []
    bar.close()
    host_rows = []
    if not args.no_host and selected is None:
        host_rows, host_skipped = run_host_bench(args.quick, args.min_time, use_cuda or args.system_malloc)
        skipped += host_skipped
        for s in host_skipped:
            print(f"skipped: {s}")
        write_csv(os.path.join(out_dir, "host.csv"), host_rows, HOST_COLUMNS)
    for r in rows + model_rows:
        r.update(device=env["device"], dtype=str(dtype).replace("torch.", ""))
    write_csv(os.path.join(out_dir, "layer.csv"), rows, LAYER_COLUMNS)
    write_csv(os.path.join(out_dir, "model.csv"), model_rows, MODEL_COLUMNS)
    with open(os.path.join(out_dir, "env.json"), "w", encoding="utf-8") as fh:
        json.dump({**env, "date": started.isoformat(), "argv": run_argv, "partial": bool(partial),
                   "skipped": skipped}, fh, indent=1)
    title = f"{env['device']} | torch {env['torch']} | {started:%Y-%m-%d}"
    files = plot(rows, model_rows, out_dir, title) if plots else []
    write_summary(out_dir, env, rows, model_rows, skipped, files, started, run_argv, host_rows)
    print_table(rows)
    print_host_table(host_rows)
    print_rows(model_rows)
    wrong = [r for r in rows + model_rows + host_rows if not r["correct"]]
    print(f"\n{len(rows)} layer rows, {len(model_rows)} model rows, {len(host_rows)} host rows in "
          f"{time.perf_counter() - t0:.0f}s; "
          f"results in {out_dir}")
    if not plots:
        print(PLOTS_HINT)
    if wrong:
        for r in wrong:
            print(f"WRONG RESULT: {r['candidate']} {r.get('mode', r.get('figure', 'model'))} M={r.get('M', '')}: "
                  f"{r['check']}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
