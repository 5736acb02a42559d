#!/usr/bin/env python
"""Multi-adapter serving benchmark: many Uni-LoRA adapters in one batch, one kernel call per layer.

    python -P benchmarks/multi_adapter_bench.py                 # the full grid on this machine (GPU if present)
    python -P benchmarks/multi_adapter_bench.py --quick --cpu   # a small grid, well under a minute on 2 cores
    python -P benchmarks/multi_adapter_bench.py --backend reference --out DIR

A LLaMA-shaped model built from a config (no download) gets Uni-LoRA on all its linear layers and
N distinct adapters (``unilora_kernels.add_adapter``, random theta_d). Sequence i of a batch of B
uses adapter ``a{i mod N}``. Two workloads, each for every (N, B) of the grid:

* ``decode``: one new token per sequence on a KV cache of ``L`` prompt tokens. Every candidate
  builds its own cache once (a prefill with its own adapters); every timed call runs the same
  step and then crops the cache back to L tokens (``DynamicCache.crop``), so each rep is the
  same step on the same cache.
* ``prefill``: B sequences of T tokens, no cache (``use_cache=False``), logits of the last
  position only (``logits_to_keep=1``), as a server computes them.

Candidates, on the same inputs, timed side by side:

* ``mixed``: ``with unilora_kernels.adapter_batch(model, names): model(...)`` (the context is
  entered and left inside every timed call);
* ``loop``: what a user does without it: for each adapter in the batch, copy its theta into
  ``model.unilora_theta_d`` and run its sub-batch (its own KV-cache slice); timed in total,
  the default theta_d restored at the end of each call;
* ``peft_lora_mixed``: PEFT LoRA holding the same N adapters, exported exactly
  (``unilora_kernels.export_lora``), run with PEFT's mixed batch ``model(..., adapter_names=names)``;
* ``shared``: the whole batch with the model's own adapter, no adapter_batch: the floor.

``--train-registry 8,1024``: a training step (forward, backward, AdamW over every trainable
parameter) of one 8-sequence batch on adapters a0..a7, with 8 and with 1,024 adapters registered
(the same batch and adapters; gradients compared first; medians of interleaved rounds): the
step's cost must follow the batch, not the registry (rows of workload ``train``).

Every candidate's logits are compared before anything is timed (mixed against loop, PEFT
against mixed, shared against an adapter_batch of "default" everywhere); a wrong candidate is
recorded and not timed, and the run exits 1. Writes multi_adapter.csv, multi_adapter.md and
multi_adapter_env.json to benchmarks/results/<device>/ (a partial run: its partial/ subdirectory).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import datetime
import gc
import importlib.util
import json
import math
import os
import sys
import tempfile
import time
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import torch  # noqa: E402

import unilora_kernels as uk  # noqa: E402

from common import (device_slug, environment, keep_freed_memory, paired_ratio, time_fn,  # noqa: E402
                    time_interleaved)

CANDIDATES = ("mixed", "loop", "peft_lora_mixed", "shared")
WORKLOADS = ("decode", "prefill")
TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}  # as layer_bench.py
# Random adapters: theta_d ~ N(0, (THETA_SCALE * sqrt(D / d))^2), so that B A is about half the
# size of the base weights whatever the model (each A and B entry is theta_j / sqrt(n_j), n_j ~ D / d):
# two adapters then give clearly different logits, and the checks can tell them apart.
THETA_SCALE = 0.1
MEMORY_ADAPTERS = 1024
MEMORY_D = 23_040
COLUMNS = [
    "device", "dtype", "backend", "workload", "N", "B", "T", "adapters_in_batch", "candidate", "correct", "check",
    "median_ms", "p20_ms", "p80_ms", "runs", "tokens_per_s", "ratio_to_shared", "mixed_speedup_vs_loop",
    "mixed_speedup_vs_peft", "note",
]
PARTIAL_OPTIONS = ("quick", "tiny", "mid", "ns", "bs", "workloads", "candidates")


# ------------------------------------------------------------------ plan -------------------
def model_sizes(device: torch.device, quick: bool, tiny: bool, mid: bool = False) -> dict:
    """Model, prompt length L (decode), prefill length T, r and d. On CPU ``mid`` (hidden 1024) is
    the case where the base GEMMs dwarf both the adapters' cost and PEFT's per-adapter loop."""
    if tiny:
        return dict(hidden=32, inter=48, layers=2, heads=4, kv=2, vocab=97, L=8, T=8, r=4, d=512)
    if device.type == "cuda":
        return dict(hidden=1024, inter=2816, layers=8, heads=16, kv=8, vocab=8192, L=128, T=128, r=4, d=MEMORY_D)
    if quick:
        return dict(hidden=128, inter=344, layers=2, heads=4, kv=2, vocab=1024, L=16, T=16, r=4, d=4_096)
    if mid:
        return dict(hidden=1024, inter=2816, layers=4, heads=16, kv=8, vocab=8192, L=32, T=16, r=4, d=MEMORY_D)
    return dict(hidden=256, inter=688, layers=4, heads=8, kv=4, vocab=2048, L=32, T=32, r=4, d=MEMORY_D)


def grid(quick: bool, tiny: bool) -> list:
    """[(N, B)]: N adapters registered, B sequences; sequence i uses adapter i mod N."""
    if tiny:
        return [(1, 4), (4, 4)]
    if quick:
        return [(1, 16), (8, 16)]
    return [(1, 64), (8, 64), (64, 64), (512, 64), (512, 512)]


def _ints(text):
    return [int(v) for v in text.split(",") if v]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small model and grid (under a minute on 2 CPU cores)")
    p.add_argument("--tiny", action="store_true", help="tiny sizes (for tests)")
    p.add_argument("--mid", action="store_true", help="CPU: a hidden-1024 model instead of the hidden-256 default")
    p.add_argument("--cpu", action="store_true", help="benchmark on CPU even when a GPU is present")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--out", default=None, help="results directory (default benchmarks/results/<device>/, "
                                               "and its partial/ subdirectory for a partial run)")
    p.add_argument("--backend", choices=["auto", "reference", "cpu", "triton", "cuda"], default="auto",
                   help="the Uni-LoRA backend of the model (default auto)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="model dtype (default: bfloat16 on GPU, float32 on CPU)")
    p.add_argument("--ns", default=None, help="override the grid: adapter counts N, e.g. 1,8,64 (with --bs)")
    p.add_argument("--bs", default=None, help="override the grid: batch sizes B, e.g. 64 (every N with every B)")
    p.add_argument("--workloads", default=None, help="decode,prefill (the default: both)")
    p.add_argument("--candidates", nargs="+", default=None, choices=CANDIDATES, metavar="NAME",
                   help=f"time only these ({', '.join(CANDIDATES)}); all are still built and checked")
    p.add_argument("--min-time", type=float, default=None,
                   help="CPU: seconds of timing per candidate and config (default 1, 0.25 with --quick)")
    p.add_argument("--max-call-s", type=float, default=None,
                   help="do not time a candidate whose checked call took longer than this (default: 20 s on "
                        "CPU, 5 s with --quick; 10 s on GPU); it is listed as skipped with its call time")
    p.add_argument("--peft-build-budget", type=float, default=None,
                   help="seconds: stop adding adapters to the PEFT model when the projected total build time "
                        "passes this (default 300, 60 with --quick); the PEFT candidate is then skipped, with the reason")
    p.add_argument("--train-registry", default=None,
                   help="also time a training step of one batch with these many adapters registered, e.g. 8,1024")
    p.add_argument("--train-batch", type=int, default=8, help="sequences of the --train-registry batch (default 8)")
    p.add_argument("--system-malloc", action="store_true", help="CPU: keep glibc's default malloc settings")
    return p.parse_args(argv)


def partial_options(args) -> list:
    extra = ["--backend " + args.backend] if args.backend != "auto" else []
    return ["--" + n.replace("_", "-") for n in PARTIAL_OPTIONS if getattr(args, n)] + extra


def output_dir(args, device) -> str:
    """As run.py: a partial run goes to partial/ and never replaces a full run's multi_adapter files."""
    full_dir = os.path.join(HERE, "results", device_slug(device))
    if not partial_options(args):
        return args.out or full_dir
    out = args.out or os.path.join(full_dir, "partial")
    env_file = os.path.join(out, "multi_adapter_env.json")
    if os.path.exists(env_file):
        with open(env_file, encoding="utf-8") as fh:
            if not json.load(fh).get("partial", True):
                raise ValueError(f"{out} holds the results of a full multi-adapter run; a partial run "
                                 f"({' '.join(partial_options(args))}) does not replace them: pick another --out")
    return out


# ------------------------------------------------------------------ model ------------------
def build_base(s: dict, dtype, device):
    from transformers import LlamaConfig, LlamaForCausalLM
    import transformers

    transformers.logging.set_verbosity_error()
    cfg = LlamaConfig(vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["inter"],
                      num_hidden_layers=s["layers"], num_attention_heads=s["heads"], num_key_value_heads=s["kv"],
                      max_position_embeddings=max(64, s["L"] + 8, s["T"]))
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to(device=device, dtype=dtype).eval()


def lora_params(model) -> int:
    """D: the LoRA parameters of the model's Uni-LoRA layers."""
    return sum(layer.r * (layer.in_features + layer.out_features) for _, layer in uk.iter_layers(model))


def theta_std(model) -> float:
    return THETA_SCALE * math.sqrt(lora_params(model) / model.unilora_theta_d.numel())


def random_theta(model, seed: int) -> torch.Tensor:
    theta_d = model.unilora_theta_d
    g = torch.Generator().manual_seed(1000 + seed)
    return (torch.randn(theta_d.numel(), generator=g) * theta_std(model)).to(theta_d.device)


def adapter_name(i: int) -> str:
    return f"a{i}"


def ensure_adapters(model, n: int) -> None:
    have = len(uk.adapter_names(model)) - 1
    for i in range(have, n):
        uk.add_adapter(model, adapter_name(i), random_theta(model, i))


class PeftModels:
    """A PEFT LoRA model holding the exported adapters a0..a{n-1}, grown as the grid's N grows.

    a0 takes PEFT's own path: ``export_lora`` writes an adapter directory, PEFT builds the model
    from its config (``get_peft_model``) and loads its weights (``set_peft_model_state_dict``).
    PEFT's ``add_adapter`` walks every module of the model and is quadratic in N (about 2 s per
    adapter at N ~ 100 on a 28-layer model), so every further adapter is registered the way
    ``update_layer`` registers it, in O(layers): each LoRA layer's per-adapter entries (lora_A,
    lora_B, lora_dropout, r, scaling, ...) copied from a0's, the exported A and B written in, and
    the config under its name. a0 and a1 are checked alone against this package's model, and every
    mixed batch against ``adapter_batch``, before anything is timed.
    """

    def __init__(self, base, model, budget_s: float, tol: float):
        self.base, self.model, self.budget_s, self.tol = base, model, budget_s, tol
        self.checks = []
        self.pm = None
        self.layers = []  # [(module name, LoRA layer)] of the PEFT model
        self.count = 0
        self.build_s = 0.0
        self.config = None
        self.failed = None  # why PEFT cannot run (not installed, export mismatch, over budget)

    @contextlib.contextmanager
    def theta_of(self, name: str):
        """The package's model running adapter ``name`` alone: its theta in theta_d, restored afterwards."""
        theta_d = self.model.unilora_theta_d
        saved = theta_d.detach().clone()
        with torch.no_grad():
            theta_d.copy_(uk.adapter_theta(self.model, name))
            try:
                yield
            finally:
                theta_d.copy_(saved)

    def export_error(self, name: str) -> float:
        """PEFT with adapter ``name`` active, alone, against this package's model running it."""
        ids = torch.arange(16, device=self.model.unilora_theta_d.device).remainder(self.model.config.vocab_size)[None]
        with torch.no_grad():
            with self.theta_of(name):
                ours = self.model(input_ids=ids, use_cache=False).logits
            self.pm.set_adapter(name)
            theirs = self.pm(input_ids=ids, use_cache=False).logits
        return rel_err(theirs, ours)

    def _first(self, name: str) -> None:
        from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
        from peft.tuners.lora import LoraLayer

        with tempfile.TemporaryDirectory() as tmp:
            with self.theta_of(name):
                state = uk.export_lora(self.model, tmp)
            self.config = LoraConfig.from_pretrained(tmp)
        self.config.inference_mode = True
        self.pm = get_peft_model(copy.deepcopy(self.base), self.config, adapter_name=name).eval()
        res = set_peft_model_state_dict(self.pm, state, adapter_name=name)
        unexpected = list(getattr(res, "unexpected_keys", []) or [])
        missing = [k for k in (getattr(res, "missing_keys", []) or []) if f".{name}." in k]
        if unexpected or missing:
            raise RuntimeError(f"export of {name} did not load into PEFT: unexpected {unexpected[:2]}, "
                               f"missing {missing[:2]}")
        self.layers = [(n, m) for n, m in self.pm.named_modules() if isinstance(m, LoraLayer)]

    def _add(self, name: str, src: str = "a0") -> None:
        """Register adapter ``name`` in every LoRA layer as ``update_layer`` does for a0's config."""
        with self.theta_of(name):
            state = uk.export_lora(self.model)
        done = set()
        for prefix, layer in self.layers:
            for key, entries in list(layer._modules.items()):
                if isinstance(entries, (torch.nn.ModuleDict, torch.nn.ParameterDict)) and src in entries:
                    entries[name] = copy.deepcopy(entries[src])
            for key, entries in list(vars(layer).items()):
                if not key.startswith("_") and isinstance(entries, dict) and src in entries:
                    entries[name] = copy.copy(entries[src])
            with torch.no_grad():
                for part in ("lora_A", "lora_B"):
                    weight = getattr(layer, part)[name].weight
                    weight.copy_(state[f"{prefix}.{part}.weight"].to(weight.device, weight.dtype))
                    done.add(f"{prefix}.{part}.weight")
        if done != set(state):
            raise RuntimeError(f"export of {name}: keys without a PEFT LoRA layer: {sorted(set(state) - done)[:2]}")
        self.pm.peft_config[name] = copy.deepcopy(self.config)

    def ensure(self, n: int) -> bool:
        if self.failed is not None:
            return False
        if importlib.util.find_spec("peft") is None:
            self.failed = "peft is not installed"
            return False
        per = self.build_s / self.count if self.count else None
        if per is not None and self.build_s + per * (n - self.count) > self.budget_s:
            self.failed = (f"building {n} PEFT LoRA adapters would take ~{self.build_s + per * (n - self.count):.0f} s "
                           f"({per:.2f} s per adapter so far), over --peft-build-budget {self.budget_s:.0f} s")
            return False
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for i in range(self.count, n):
                name = adapter_name(i)
                try:
                    self._first(name) if i == 0 else self._add(name)
                    if i <= 1:  # PEFT's own path (a0) and the registration above (a1), each alone
                        err = self.export_error(name)
                        check = f"PEFT LoRA with exported {name} alone vs this package: rel err {err:.1e}"
                        print(check)
                        self.checks.append(check)
                        if not err <= self.tol:
                            raise RuntimeError(f"the exported LoRA is not exact: {check} > {self.tol:.0e}")
                except Exception as exc:  # noqa: BLE001 - the reason is reported; PEFT is not timed
                    self.failed = f"{type(exc).__name__}: {exc}"
                    return False
                self.count = i + 1
                self.build_s += time.perf_counter() - t0
                t0 = time.perf_counter()
                if self.build_s > self.budget_s and self.count < n:
                    self.failed = (f"building PEFT LoRA adapters passed --peft-build-budget {self.budget_s:.0f} s at "
                                   f"{self.count} of {n} adapters")
                    return False
        self.pm.eval()
        return True


# ------------------------------------------------------------------ candidates -------------
def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def rewind(cache, length: int) -> None:
    """Crop a DynamicCache back to ``length`` tokens (``crop(-n)`` removes the last n)."""
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)
    if cache.get_seq_length() != length:
        raise RuntimeError(f"the KV cache holds {cache.get_seq_length()} tokens after crop, expected {length}")


def logits(out) -> torch.Tensor:
    return out.logits[:, -1, :]


def cache_kwarg() -> str:
    """The forward argument that takes the KV cache: ``cache`` (transformers >= 5.x), else ``past_key_values``."""
    import inspect

    from transformers import LlamaForCausalLM

    return "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"


def cache_of(out):
    cache = getattr(out, "cache", None)
    return out.past_key_values if cache is None else cache


class Setup:
    """One (workload, N, B): inputs and, per candidate, a call that returns (B, vocab) logits."""

    def __init__(self, model, peft_model, workload: str, N: int, B: int, s: dict, device):
        self.model, self.pm, self.workload, self.N, self.B, self.s = model, peft_model, workload, N, B, s
        g = torch.Generator().manual_seed(7 + N + 1000 * B)
        self.names = [adapter_name(i % N) for i in range(B)]
        used = list(dict.fromkeys(self.names))
        self.groups = [(a, torch.tensor([i for i, n in enumerate(self.names) if n == a], device=device)) for a in used]
        self.thetas = {a: uk.adapter_theta(model, a) for a in used}
        if workload == "decode":
            self.prompt = torch.randint(0, s["vocab"], (B, s["L"]), generator=g).to(device)
            self.ids = torch.randint(0, s["vocab"], (B, 1), generator=g).to(device)
            self.length = s["L"]
        else:
            self.ids = torch.randint(0, s["vocab"], (B, s["T"]), generator=g).to(device)
        self.default_theta = model.unilora_theta_d.detach().clone()
        self.caches = {}
        self.cache_kw = cache_kwarg()

    # the model with one adapter's theta in theta_d (the loop)
    def _with_theta(self, name):
        self.model.unilora_theta_d.data.copy_(self.thetas[name])

    def _restore(self):
        self.model.unilora_theta_d.data.copy_(self.default_theta)

    def _run(self, model, ids, cache_key, **kw):
        if self.workload == "prefill":
            return logits(model(input_ids=ids, use_cache=False, logits_to_keep=1, **kw))
        cache = self.caches[cache_key]
        out = logits(model(input_ids=ids, use_cache=True, logits_to_keep=1, **{self.cache_kw: cache}, **kw))
        rewind(cache, self.length)
        return out

    def _prefill_cache(self, model, key, prompt, **kw):
        if self.workload == "decode":
            self.caches[key] = cache_of(model(input_ids=prompt, use_cache=True, logits_to_keep=1, **kw))

    def build(self, name: str):
        """The candidate's call (its KV caches built first, for decode)."""
        model = self.model
        if name == "mixed":
            with uk.adapter_batch(model, self.names):
                self._prefill_cache(model, "mixed", getattr(self, "prompt", None))

            def call():
                with uk.adapter_batch(model, self.names):
                    return self._run(model, self.ids, "mixed")
            return call
        if name == "shared":
            self._prefill_cache(model, "shared", getattr(self, "prompt", None))
            return lambda: self._run(model, self.ids, "shared")
        if name == "loop":
            subs = [(a, idx, self.ids[idx]) for a, idx in self.groups]
            try:
                for a, idx, _ in subs:
                    self._with_theta(a)
                    self._prefill_cache(model, ("loop", a), self.prompt[idx] if self.workload == "decode" else None)
            finally:
                self._restore()

            def call():
                try:
                    outs = []
                    for a, _, ids in subs:
                        self._with_theta(a)
                        outs.append(self._run(model, ids, ("loop", a)))
                    return outs
                finally:
                    self._restore()
            return call
        if name == "peft_lora_mixed":
            pm = self.pm
            self._prefill_cache(pm, "peft", getattr(self, "prompt", None), adapter_names=self.names)
            return lambda: self._run(pm, self.ids, "peft", adapter_names=self.names)
        raise ValueError(name)

    def gather(self, name: str, out) -> torch.Tensor:
        """A candidate's output as (B, vocab) logits in sequence order."""
        if name != "loop":
            return out
        full = torch.empty((self.B, out[0].shape[-1]), dtype=out[0].dtype, device=out[0].device)
        for (_, idx), o in zip(self.groups, out):
            full[idx] = o
        return full

    def all_default(self):
        """Reference of ``shared``: an adapter_batch naming "default" for every sequence."""
        model = self.model
        with uk.adapter_batch(model, ["default"] * self.B):
            self._prefill_cache(model, "ref_default", getattr(self, "prompt", None))
            out = self._run(model, self.ids, "ref_default")
        self.caches.pop("ref_default", None)
        return out


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_setup(setup: Setup, device, dtype, args, selected, max_call_s, peft_reason) -> list:
    """Check every candidate, then time the correct ones; one row per candidate."""
    tol = TOL[dtype]
    rows, calls, outs, call_s = {}, {}, {}, {}
    base = dict(workload=setup.workload, N=setup.N, B=setup.B,
                T=setup.s["L"] if setup.workload == "decode" else setup.s["T"],
                adapters_in_batch=len(setup.groups))
    for name in CANDIDATES:
        row = dict(base, candidate=name, correct=False, check="", note="")
        rows[name] = row
        if name == "peft_lora_mixed" and peft_reason:
            row.update(correct=None, check="not run", note=f"skipped: {peft_reason}")
            print(f"  {setup.workload} N={setup.N} B={setup.B}: peft_lora_mixed skipped: {peft_reason}")
            continue
        try:
            with torch.no_grad():
                calls[name] = setup.build(name)
                sync(device)
                t0 = time.perf_counter()
                out = calls[name]()
                sync(device)
                call_s[name] = time.perf_counter() - t0
                outs[name] = setup.gather(name, out)
                t0 = time.perf_counter()
                again = setup.gather(name, calls[name]())  # the same step again: the cache was rewound
                sync(device)
                call_s[name] = min(call_s[name], time.perf_counter() - t0)  # the first call includes warm-up
            if rel_err(again, outs[name]) > tol:
                raise RuntimeError(f"a second call differs from the first (rel err {rel_err(again, outs[name]):.1e}): "
                                   "the step is not repeatable")
        except Exception as exc:  # noqa: BLE001 - recorded in the row and the summary, never silent
            calls.pop(name, None)
            outs.pop(name, None)
            row.update(check=f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
            print(f"  {setup.workload} N={setup.N} B={setup.B}: {name} FAILED: {row['check']}")
    # correctness
    with torch.no_grad():
        ref_default = setup.all_default() if "shared" in outs else None
    checks = {}
    if "mixed" in outs and "loop" in outs:
        e = rel_err(outs["mixed"], outs["loop"])
        checks["mixed"] = checks["loop"] = (e <= tol, f"rel err {e:.1e} mixed vs loop")
    if "peft_lora_mixed" in outs:
        ref_name = "mixed" if "mixed" in outs else ("loop" if "loop" in outs else None)
        if ref_name is not None:
            e = rel_err(outs["peft_lora_mixed"], outs[ref_name])
            checks["peft_lora_mixed"] = (e <= tol, f"rel err {e:.1e} vs {ref_name}")
    if "shared" in outs:
        e = rel_err(outs["shared"], ref_default)
        checks["shared"] = (e <= tol, f"rel err {e:.1e} vs adapter_batch(all 'default')")
        if "mixed" in outs and setup.N > 1:  # the check can tell adapters apart
            sens = rel_err(outs["mixed"], outs["shared"])
            checks["mixed"] = (checks.get("mixed", (True, ""))[0],
                               checks.get("mixed", (True, ""))[1] + f"; mixed vs shared differ by {sens:.1e}")
            if sens <= 10 * tol:
                print(f"  warning: {setup.workload} N={setup.N}: the adapters change the logits by only {sens:.1e}; "
                      "the check hardly tells them apart")
    for name, row in rows.items():
        if name in outs and name not in checks:
            row.update(check="no other candidate to compare with")
        elif name in checks:
            ok, detail = checks[name]
            if name == "loop" and not ok:  # the plain one-adapter path is the reference; mixed is the suspect
                ok, detail = True, detail + " (reference point)"
            row.update(correct=ok, check=detail)
    # timing
    fns = {}
    for name in CANDIDATES:
        row = rows[name]
        if not row["correct"] or name not in calls:
            continue
        if selected is not None and name not in selected:
            row["note"] = "checked, not timed (--candidates)"
            continue
        if call_s[name] > max_call_s:
            row["note"] = (f"skipped: one call took {call_s[name]:.1f} s, over --max-call-s {max_call_s:.0f} s")
            print(f"  {setup.workload} N={setup.N} B={setup.B}: {name} not timed: {row['note']}")
            continue
        fns[name] = calls[name]

    def nograd(fn):
        def wrapped():
            with torch.no_grad():
                return fn()
        return wrapped

    if fns:
        if device.type == "cuda":
            timings = {n: time_fn(nograd(f), device, args.quick) for n, f in fns.items()}
        else:
            timings = time_interleaved({n: nograd(f) for n, f in fns.items()}, args.quick, args.min_time)
        tokens = setup.B * (1 if setup.workload == "decode" else setup.s["T"])
        for n, t in timings.items():
            rows[n].update(median_ms=t.median_ms, p20_ms=t.p20_ms, p80_ms=t.p80_ms, runs=t.runs,
                           tokens_per_s=tokens / (t.median_ms / 1e3))
        if "shared" in timings:
            for n, t in timings.items():
                rows[n]["ratio_to_shared"] = paired_ratio(t, timings["shared"])
        if "mixed" in timings:
            if "loop" in timings:
                rows["mixed"]["mixed_speedup_vs_loop"] = paired_ratio(timings["loop"], timings["mixed"])
            if "peft_lora_mixed" in timings:
                rows["mixed"]["mixed_speedup_vs_peft"] = paired_ratio(timings["peft_lora_mixed"], timings["mixed"])
    setup.caches.clear()
    return list(rows.values())


# ------------------------------------------------------------------ training -----------------
def train_registry_rows(base, s: dict, registries: list, B: int, device, args) -> list:
    """A training step of one B-sequence batch (adapters a0..a{U-1}, U = min(B, smallest registry))
    with each registry size registered; timed interleaved, each row's note its ratio to the smallest."""
    names = [adapter_name(i % min(B, min(registries))) for i in range(B)]
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, s["vocab"], (B, s["T"]), generator=g).to(device)
    cfg = uk.UniLoRAConfig(r=s["r"], theta_d_length=s["d"], target_modules="all-linear", backend=args.backend)
    models = {}
    for n in registries:
        model = uk.inject(copy.deepcopy(base), cfg).train()
        with torch.no_grad():
            model.unilora_theta_d.copy_(random_theta(model, -1))
        ensure_adapters(model, n)
        # every trainable parameter, as a Trainer builds it (this package's adapters or an older table alike)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
        models[n] = (model, opt)

    def loss_of(model):
        with uk.adapter_batch(model, names):
            return model(input_ids=ids, labels=ids).loss

    grads = {}
    for n, (model, _) in models.items():  # the same gradients whatever the registry
        model.zero_grad(set_to_none=True)
        loss_of(model).backward()
        grads[n] = torch.cat([_adapter_grad(model, a).reshape(-1) for a in dict.fromkeys(names)])
        model.zero_grad(set_to_none=True)
    small = min(registries)
    errs = {n: rel_err(g_, grads[small]) for n, g_ in grads.items()}

    def step(model, opt):
        def call():
            opt.zero_grad()
            loss_of(model).backward()
            opt.step()
        return call

    timings = time_interleaved({n: step(*models[n]) for n in registries}, args.quick, args.min_time)
    rows = []
    for n in registries:
        t = timings[n]
        ratio = paired_ratio(t, timings[small])
        rows.append(dict(workload="train", N=n, B=B, T=s["T"], adapters_in_batch=len(set(names)), candidate="mixed",
                         correct=errs[n] <= TOL[torch.float32], check=f"rel err {errs[n]:.1e} of the batch's "
                         f"adapter gradients vs {small} registered", median_ms=round(t.median_ms, 4),
                         p20_ms=round(t.p20_ms, 4), p80_ms=round(t.p80_ms, 4), runs=t.runs,
                         tokens_per_s=round(B * s["T"] / (t.median_ms / 1e3), 1),
                         note=f"{ratio:.3f}x the step with {small} registered (median of per-round ratios)"))
    return rows


def _adapter_grad(model, name):
    theta = uk.adapter_theta(model, name)
    if theta.grad is not None or theta.is_leaf:
        return theta.grad
    # before each adapter was its own parameter: a row of one table (to time older builds the same way)
    from unilora_kernels.model import find_bank

    return model.unilora_adapter_table.grad[find_bank(model).adapters.rows[name]]


def train_lines(rows) -> list:
    rs = [r for r in rows if r["workload"] == "train"]
    if not rs:
        return []
    lines = [f"### train (forward + backward + AdamW, {rs[0]['B']} sequences of {rs[0]['T']} tokens on "
             f"{rs[0]['adapters_in_batch']} adapters): median ms by adapters registered", "",
             "| registered | median ms | p20 | p80 | vs the smallest registry | check |", "|---|---|---|---|---|---|"]
    for r in rs:
        lines.append(f"| {r['N']} | {fmt_ms(r['median_ms'])} | {fmt_ms(r['p20_ms'])} | {fmt_ms(r['p80_ms'])} | "
                     f"{r['note'].split(' ')[0]} | {'ok' if r['correct'] else 'WRONG'}, {r['check']} |")
    return lines + [""]


# ------------------------------------------------------------------ memory -----------------
def memory_line(model, s: dict, dtype, device, tiny: bool) -> dict:
    """``adapter_memory`` of a real table after registering 1,024 adapters of d = 23,040 (the bench
    model when its d is 23,040; the CPU-size model otherwise; the tiny model's own d with --tiny)."""
    where = "the benchmark model"
    if s["d"] != MEMORY_D and not tiny:
        ms = model_sizes(torch.device("cpu"), quick=False, tiny=False)
        model = uk.inject(build_base(ms, dtype, device),
                          uk.UniLoRAConfig(r=ms["r"], theta_d_length=MEMORY_D, target_modules="all-linear"))
        where = f"a model of hidden {ms['hidden']}, {ms['layers']} layers (the full CPU run's)"
    have = len(uk.adapter_names(model)) - 1
    d = model.unilora_theta_d.numel()
    theta = torch.zeros(d, device=model.unilora_theta_d.device)
    for i in range(have, MEMORY_ADAPTERS):
        uk.add_adapter(model, f"m{i}", theta)
    mem = uk.adapter_memory(model)
    return dict(mem, d=d, D=lora_params(model), model=where)


# ------------------------------------------------------------------ output -----------------
def fmt_ms(v):
    return "-" if v is None else (f"{v:.3f}" if v < 10 else f"{v:.1f}")


def fmt_x(v):
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.2f}x"


def cell(r) -> str:
    if r["correct"] is False:
        return "WRONG: not timed" if not r["check"].startswith("error") else "FAILED"
    if r.get("median_ms") is None:
        return "skipped" if r["note"].startswith("skipped") else "-"
    return f"{fmt_ms(r['median_ms'])} ({fmt_x(r.get('ratio_to_shared'))})"


def table_lines(rows) -> list:
    lines = []
    for wl in dict.fromkeys(r["workload"] for r in rows if r["workload"] != "train"):
        rs = [r for r in rows if r["workload"] == wl]
        t = rs[0]["T"]
        what = f"1 new token on a {t}-token KV cache" if wl == "decode" else f"{t} tokens per sequence"
        lines += [f"### {wl} ({what}): median ms (x shared)", "",
                  "| N | B | adapters in batch | " + " | ".join(CANDIDATES) + " | mixed vs loop | mixed vs peft |",
                  "|---|---|---|" + "---|" * (len(CANDIDATES) + 2)]
        for N, B in dict.fromkeys((r["N"], r["B"]) for r in rs):
            sub = {r["candidate"]: r for r in rs if r["N"] == N and r["B"] == B}
            m = sub.get("mixed", {})
            lines.append(f"| {N} | {B} | {m.get('adapters_in_batch', '')} | "
                         + " | ".join(cell(sub[c]) if c in sub else "" for c in CANDIDATES)
                         + f" | {fmt_x(m.get('mixed_speedup_vs_loop'))} | {fmt_x(m.get('mixed_speedup_vs_peft'))} |")
        lines.append("")
    return lines


def write_csv(path, rows):
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k) for k in COLUMNS})


def write_summary(path, env, s, rows, memory, skipped, started, argv, backend, notes):
    lines = [
        f"# Multi-adapter serving: {env['device']}",
        "",
        f"Date: {started:%Y-%m-%d %H:%M} UTC. Device type: **{env['device_type'].upper()}**. "
        f"torch {env['torch']}, peft {env['peft']}, unilora_kernels {env['unilora_kernels']}, {env['threads']} CPU "
        f"threads, malloc: {env['malloc']}. Command: `python -P benchmarks/multi_adapter_bench.py {' '.join(argv)}`.",
        "",
        f"Model: LLaMA-shaped from a config (hidden {s['hidden']}, intermediate {s['inter']}, {s['layers']} layers, "
        f"{s['heads']} heads / {s['kv']} KV heads, vocab {s['vocab']}), {env['dtype']}; Uni-LoRA on all linear layers, "
        f"r = {s['r']}, d = {s['d']:,}, backend {backend}. Adapters: random theta_d (std {s['theta_std']:.3f}, "
        f"= {THETA_SCALE} sqrt(D / d), D = {s['D']:,}); "
        "sequence i uses adapter a{i mod N}.",
        "",
        "Candidates: `mixed` = `adapter_batch` (the context entered in every call); `loop` = per adapter, copy its "
        "theta into `unilora_theta_d` and run its sub-batch on its own KV-cache slice (timed in total); "
        "`peft_lora_mixed` = PEFT LoRA with the same adapters (exported by `export_lora`; a0 loaded through PEFT's "
        "own adapter-directory path, the others registered per LoRA layer as `update_layer` does, since "
        "`add_adapter` is quadratic in N), `model(..., adapter_names=...)`; `shared` = the whole batch on one "
        "adapter (the floor).",
        "Decode: every timed call runs one token on the same L-token cache and crops the cache back "
        "(`DynamicCache.crop`). Prefill: `use_cache=False`, `logits_to_keep=1`. "
        + ("Times: torch.utils.benchmark-style medians of interleaved rounds (all candidates of a row sampled "
           "alternately); ratios are medians of per-round ratios." if env["device_type"] == "cpu" else
           "Times: triton.testing.do_bench medians; ratios are ratios of medians."),
        "Every candidate was checked before timing (mixed against loop, PEFT against mixed, shared against "
        "adapter_batch of 'default' everywhere); a wrong one is marked and not timed.",
        "",
        *table_lines(rows),
        *train_lines(rows),
    ]
    if memory:
        lines += ["## Adapter memory", "",
                  f"`adapter_memory` after registering {memory['adapters'] - 1:,} adapters of d = {memory['d']:,} on "
                  f"{memory['model']} (D = {memory['D']:,} LoRA parameters):", "",
                  "| table bytes | capacity | bytes per adapter | plain LoRA bytes per adapter (fp32) | LoRA / Uni-LoRA |",
                  "|---|---|---|---|---|",
                  f"| {memory['table_bytes']:,} | {memory['capacity']:,} | {memory['bytes_per_adapter']:,} | "
                  f"{memory['lora_bytes_per_adapter']:,} | {memory['lora_bytes_per_adapter'] / memory['bytes_per_adapter']:.1f}x |",
                  ""]
    checks = [f"- {r['workload']} N={r['N']} B={r['B']} {r['candidate']}: {'ok' if r['correct'] else 'WRONG'}, "
              f"{r['check']}" for r in rows if r["correct"] is not None]
    lines += ["## Checks", "", *checks, ""]
    if skipped or notes:
        lines += ["## Skipped and notes", "", *[f"- {x}" for x in skipped + notes], ""]
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("\n".join(lines))


# ------------------------------------------------------------------ main -------------------
def mixed_kernel_missing(backend: str, device) -> str:
    """Why the resolved backend cannot run a mixed batch ('' when it can)."""
    from unilora_kernels import backends

    try:
        name = backends.resolve(backend, device.type)
        impl = backends.get_backend(name, device.type)
    except backends.BackendNotAvailableError as exc:
        return str(exc)
    if not hasattr(impl, "mixed_forward_"):
        return (f"backend {name!r} has no mixed_forward_ (mixed batches) in this build; "
                "pick another with --backend (e.g. reference)")
    return ""


def main(argv=None) -> int:
    run_argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(run_argv)
    started = datetime.datetime.now(datetime.timezone.utc)
    use_cuda = torch.cuda.is_available() and not args.cpu
    device = torch.device("cuda" if use_cuda else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        out_dir = output_dir(args, device)
    except ValueError as e:
        print(f"multi_adapter_bench.py: error: {e}", file=sys.stderr)
        return 2
    missing = mixed_kernel_missing(args.backend, device)
    if missing:
        print(f"multi_adapter_bench.py: error: {missing}", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if use_cuda else torch.float32)
    env = environment(device)
    env["malloc"] = "system default" if use_cuda or args.system_malloc else keep_freed_memory()
    env["dtype"] = str(dtype).replace("torch.", "")
    os.makedirs(out_dir, exist_ok=True)
    s = model_sizes(device, args.quick, args.tiny, args.mid)
    pairs = grid(args.quick, args.tiny)
    if args.ns or args.bs:
        ns = _ints(args.ns) if args.ns else sorted({n for n, _ in pairs})
        bs = _ints(args.bs) if args.bs else sorted({b for _, b in pairs})
        pairs = [(n, b) for n in ns for b in bs]
    workloads = [w for w in (args.workloads or ",".join(WORKLOADS)).split(",") if w]
    bad = [w for w in workloads if w not in WORKLOADS]
    if bad:
        print(f"multi_adapter_bench.py: error: unknown workload(s) {bad}; valid: {', '.join(WORKLOADS)}", file=sys.stderr)
        return 2
    selected = set(args.candidates) if args.candidates else None
    max_call_s = args.max_call_s or (10.0 if use_cuda else (5.0 if args.quick or args.tiny else 20.0))
    peft_budget = args.peft_build_budget or (60.0 if args.quick or args.tiny else 300.0)
    partial = partial_options(args)
    print(f"device: {env['device']} | torch {env['torch']} | peft {env['peft']} | threads {env['threads']} | "
          f"dtype {env['dtype']} | malloc: {env['malloc']}")
    print(f"results go to {out_dir}" + (f" (a partial run: {' '.join(partial)})" if partial else ""))

    t_start = time.perf_counter()
    base = build_base(s, dtype, device)
    cfg = uk.UniLoRAConfig(r=s["r"], theta_d_length=s["d"], target_modules="all-linear", backend=args.backend)
    model = uk.inject(copy.deepcopy(base), cfg).eval()
    with torch.no_grad():
        model.unilora_theta_d.copy_(random_theta(model, -1))  # the default adapter: one more random one
    s = dict(s, D=lora_params(model), theta_std=theta_std(model))
    layer = uk.iter_layers(model)[0][1]
    backend = layer.resolved_backend()
    print(f"model: hidden {s['hidden']}, {s['layers']} layers, vocab {s['vocab']}, {len(uk.iter_layers(model))} "
          f"Uni-LoRA layers, r={s['r']}, d={s['d']:,}, backend {args.backend} -> {backend}")
    peft = PeftModels(base, model, peft_budget, TOL[dtype])
    rows, skipped, notes = [], [], []
    for N in sorted({n for n, _ in pairs}):
        ensure_adapters(model, N)
        t0 = time.perf_counter()
        peft_ok = peft.ensure(N)
        if peft_ok:
            print(f"PEFT LoRA model holds {peft.count} exported adapters ({time.perf_counter() - t0:.1f} s to add)")
        reason = "" if peft_ok else peft.failed
        for B in sorted({b for n, b in pairs if n == N}):
            for wl in workloads:
                t1 = time.perf_counter()
                setup = Setup(model, peft.pm if peft_ok else None, wl, N, B, s, device)
                rs = run_setup(setup, device, dtype, args, selected, max_call_s, reason)
                for r in rs:
                    r.update(device=env["device"], dtype=env["dtype"], backend=backend)
                    if r["note"].startswith("skipped"):
                        skipped.append(f"{wl} N={N} B={B} {r['candidate']}: {r['note'][len('skipped: '):]}")
                rows += rs
                m = next(r for r in rs if r["candidate"] == "mixed")
                print(f"{wl:>7} N={N:<4} B={B:<4} mixed {fmt_ms(m.get('median_ms'))} ms, "
                      f"x loop {fmt_x(m.get('mixed_speedup_vs_loop'))}, x peft {fmt_x(m.get('mixed_speedup_vs_peft'))}, "
                      f"/ shared {fmt_x(m.get('ratio_to_shared'))} ({time.perf_counter() - t1:.1f} s)", flush=True)
                write_csv(os.path.join(out_dir, "multi_adapter.csv"), rows)  # partial results survive a kill
                del setup
                gc.collect()
        if use_cuda:
            torch.cuda.empty_cache()
    if args.train_registry:
        t1 = time.perf_counter()
        rows += train_registry_rows(base, s, sorted(set(_ints(args.train_registry))), args.train_batch, device, args)
        for r in (r for r in rows if r["workload"] == "train"):
            print(f"  train N={r['N']:<5} B={r['B']} {fmt_ms(r['median_ms'])} ms per step, {r['note']}; {r['check']}")
        print(f"  ({time.perf_counter() - t1:.1f} s)", flush=True)
        write_csv(os.path.join(out_dir, "multi_adapter.csv"), rows)
    # the cost of entering and leaving adapter_batch, which every timed mixed call includes
    names = [adapter_name(i % max(n for n, _ in pairs)) for i in range(max(b for _, b in pairs))]
    t0 = time.perf_counter()
    for _ in range(20):
        with uk.adapter_batch(model, names):
            pass
    notes.append(f"entering and leaving adapter_batch for {len(names)} sequences: "
                 f"{(time.perf_counter() - t0) / 20 * 1e3:.3f} ms per call (included in every mixed time)")
    notes += peft.checks
    del peft
    gc.collect()
    memory = memory_line(model, s, dtype, device, args.tiny)
    memory_text = (f"adapter memory: {memory['adapters'] - 1:,} adapters of d = {memory['d']:,}: table "
                   f"{memory['table_bytes']:,} B, {memory['bytes_per_adapter']:,} B per adapter, plain LoRA "
                   f"{memory['lora_bytes_per_adapter']:,} B per adapter ({memory['model']})")
    write_csv(os.path.join(out_dir, "multi_adapter.csv"), rows)
    with open(os.path.join(out_dir, "multi_adapter_env.json"), "w", encoding="utf-8") as fh:
        json.dump({**env, "date": started.isoformat(), "argv": run_argv, "partial": bool(partial), "sizes": s,
                   "backend": backend, "skipped": skipped, "notes": notes, "memory": memory}, fh, indent=1)
    write_summary(os.path.join(out_dir, "multi_adapter.md"), env, s, rows, memory, skipped, started, run_argv,
                  f"{args.backend} -> {backend}", notes)
    print()
    print("\n".join(table_lines(rows) + train_lines(rows)))
    print("\n".join([*notes, memory_text]))
    wrong = [r for r in rows if r["correct"] is False]
    print(f"\n{len(rows)} rows in {time.perf_counter() - t_start:.0f}s; results in {out_dir}")
    if wrong:
        for r in wrong:
            print(f"WRONG RESULT: {r['workload']} N={r['N']} B={r['B']} {r['candidate']}: {r['check']}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
