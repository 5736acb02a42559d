#!/usr/bin/env python
"""Model benchmark: a LLaMA at Llama-3.2-1B shapes (random weights from a config, no download),
Uni-LoRA on every linear layer of the decoder, four candidates: this package (backend auto), PEFT's
Uni-LoRA, PEFT LoRA at the same r, and the frozen base.

Jobs (``--jobs``):
  train           one training step (forward, loss, backward, AdamW on the trainable parameters), eager
  train-compiled  the same with every decoder layer torch.compile'd (regional: one compiled layer
                  serves all of them, so compiling costs one layer, not the model)
  decode          per-token latency of greedy decoding with a KV cache (DynamicCache), eager
  decode-graphs   the same step captured once in a CUDA graph over a StaticCache and replayed per
                  token (CUDA only: on CPU the row is written empty, with the reason)

The frozen base's "training step" is the backward pass a frozen model needs anyway: grad of the
input embeddings' output (``enable_input_require_grads``), no weight gradients, no optimizer.

Before anything is timed, each candidate's loss, θ_d gradient and first decode logits are checked
against its counterpart (this package against PEFT's Uni-LoRA, built from the same θ_d; PEFT LoRA,
whose B starts at zero, against the base), the compiled step against the eager one, and the
graph replay against the eager step; all of them must be finite. A candidate that fails is not
timed (its row says why) and the command exits 1.

    python benchmarks/model_bench.py --out /tmp/model                    # 1B shapes (GPU), or CPU's default
    python -P benchmarks/model_bench.py --cpu --tiny --out /tmp/model    # seconds on a CPU
    python benchmarks/model_bench.py --hidden 512 --layers 2 --jobs train,decode --out /tmp/model
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import statistics
import sys
import time
import warnings
from typing import Optional

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import torch  # noqa: E402

import unilora_kernels as uk  # noqa: E402

from candidates import Candidate, peft_installed  # noqa: E402
from common import device_time_ms, environment, peak_memory_bytes, saved_for_backward_bytes, write_csv  # noqa: E402

# Llama-3.2-1B's decoder (vocabulary cut to 32,000; embeddings untied), as the issue asks.
LLAMA_1B = dict(hidden=2048, inter=8192, layers=16, heads=32, kv=8, vocab=32_000, r=4, d=23_040,
                batch=4, seq=1024, decode_batches=(1, 32), new_tokens=128, prompt=32)
CPU_DEFAULT = dict(hidden=256, inter=688, layers=4, heads=8, kv=4, vocab=2048, r=4, d=23_040,
                   batch=4, seq=128, decode_batches=(1, 8), new_tokens=16, prompt=16)
CPU_QUICK = dict(CPU_DEFAULT, hidden=128, inter=344, layers=2, heads=4, kv=2, vocab=1024, d=4_096, batch=2, seq=64,
                 decode_batches=(1, 4), new_tokens=8, prompt=8)
TINY = dict(hidden=32, inter=48, layers=2, heads=4, kv=2, vocab=97, r=4, d=512, batch=2, seq=16,
            decode_batches=(1, 3), new_tokens=4, prompt=4)
JOBS = ("train", "train-compiled", "decode", "decode-graphs")
MODES = {"train": "train-eager", "train-compiled": "train-compiled", "decode": "decode-eager",
         "decode-graphs": "decode-cudagraph"}
CANDIDATES = ("base", "peft-lora", "peft-unilora", "unilora[auto]")
# Whole-model checks: 2·layers+ adapted matmuls deep, so looser than one layer's (layer_bench.TOL).
TOL = {torch.float32: 1e-4, torch.bfloat16: 6e-2, torch.float16: 2e-2}
MODEL_COLUMNS = [
    "device", "dtype", "mode", "candidate", "backend", "correct", "check", "hidden", "inter", "layers", "heads",
    "kv_heads", "vocab", "r", "d", "batch", "seq", "new_tokens", "tokens", "trainable", "median_ms", "p20_ms",
    "p80_ms", "ms_per_token", "tokens_per_s", "device_ms", "device_ms_source", "ratio_to_base",
    "ratio_to_peft_lora", "ratio_to_peft_unilora", "saved_bytes", "peak_mem_bytes", "compile_s", "note",
]


def model_sizes(device: torch.device, quick: bool, tiny: bool, overrides: Optional[dict] = None) -> dict:
    """The sizes a run uses: TINY (tests), the 1B shapes on CUDA, a small model on CPU; then
    ``overrides`` (the size flags)."""
    s = dict(TINY if tiny else LLAMA_1B if device.type == "cuda" else CPU_QUICK if quick else CPU_DEFAULT)
    s.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return s


def base_model(s: dict, dtype, device):
    from transformers import LlamaConfig, LlamaForCausalLM
    import transformers

    transformers.logging.set_verbosity_error()
    cfg = LlamaConfig(vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["inter"],
                      num_hidden_layers=s["layers"], num_attention_heads=s["heads"], num_key_value_heads=s["kv"],
                      max_position_embeddings=max(128, s["seq"], s["prompt"] + s["new_tokens"]))
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it runs: 1.2B parameters initialise in seconds on a GPU
        model = LlamaForCausalLM(cfg)
    return model.to(dtype).eval().requires_grad_(False)


def build(name: str, base, s: dict, theta: Optional[torch.Tensor]) -> Candidate:
    """One candidate on a copy of ``base``; ``theta`` (PEFT's θ_d) makes ours compute PEFT's function."""
    model = copy.deepcopy(base)
    if name == "base":
        model.enable_input_require_grads()  # backward through the frozen layers, as adapter training does
        return Candidate(name, model, "base")
    if name.startswith("peft"):
        from peft import LoraConfig, UniLoraConfig, get_peft_model

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if name == "peft-lora":
                model = get_peft_model(model, LoraConfig(r=s["r"], lora_alpha=s["r"], target_modules="all-linear",
                                                         lora_dropout=0.0))
                return Candidate(name, model, "lora", params=[p for p in model.parameters() if p.requires_grad])
            model = get_peft_model(model, UniLoraConfig(r=s["r"], theta_d_length=s["d"], target_modules="all-linear"))
            return Candidate(name, model, "unilora", params=[model.base_model.unilora_theta_d["default"]])
    uk.inject(model, uk.UniLoRAConfig(r=s["r"], theta_d_length=s["d"], target_modules="all-linear", backend="auto"))
    if theta is not None:
        with torch.no_grad():
            model.unilora_theta_d.copy_(theta)
    layer = next(iter(uk.iter_layers(model)))
    return Candidate(name, model, "unilora", backend=_auto_backend(layer), params=[model.unilora_theta_d])


def peft_unilora_available() -> bool:
    """PEFT with its Uni-LoRA (an older PEFT, as a GPU image may hold, has LoRA alone)."""
    try:
        from peft import UniLoraConfig  # noqa: F401
    except ImportError:
        return False
    return True


def _auto_backend(layer) -> str:
    """What ``auto`` resolves to on the layer's device (on CUDA, decode-sized calls may still run
    ``cuda`` when both are built: README, Backends)."""
    try:
        return f"auto->{layer.resolved_backend()}"
    except Exception as e:  # noqa: BLE001 - a label only; the run itself says what failed
        return f"auto (unresolved: {type(e).__name__})"


def _rel(a, b) -> float:
    a, b = a.float(), b.float()
    return (a - b).abs().max().item() / max(b.abs().max().item(), 1e-12)


# ------------------------------------------------------------------ jobs ---------------------
def train_step(c: Candidate, ids):
    model = c.module
    opt = torch.optim.AdamW(c.params, lr=1e-4) if c.params else None

    def step():
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        return loss

    return step


def loss_and_grad(c: Candidate, ids):
    loss = c.module(input_ids=ids, labels=ids, use_cache=False).loss
    grad = torch.autograd.grad(loss, c.params[0])[0] if c.params else None
    return loss.detach().float(), grad


def decoder_layers(model) -> list:
    return [m for m in model.modules() if type(m).__name__ == "LlamaDecoderLayer"]


def compile_layers(model, backend: str) -> None:
    for layer in decoder_layers(model):
        layer.compile(backend=backend)


def uncompile_layers(model) -> None:
    for layer in decoder_layers(model):
        layer._compiled_call_impl = None  # what nn.Module.compile set: back to eager calls


def decode_eager(model, prompt, new_tokens: int):
    """Greedy decoding with a DynamicCache: (first step's logits, [seconds of each new token]).
    Each token is waited for (synchronised), as a server must before it sends it."""
    from transformers import DynamicCache

    sync = torch.cuda.synchronize if prompt.is_cuda else (lambda: None)
    times, first = [], None
    with torch.no_grad():
        cache = DynamicCache()
        out = model(input_ids=prompt, past_key_values=cache, use_cache=True)
        tok = out.logits[:, -1:].argmax(-1)
        sync()
        for _ in range(new_tokens):
            t0 = time.perf_counter()
            out = model(input_ids=tok, past_key_values=cache, use_cache=True)
            tok = out.logits[:, -1:].argmax(-1)
            sync()
            times.append(time.perf_counter() - t0)
            if first is None:
                first = out.logits.float().clone()
    return first, times


class StaticDecoder:
    """One greedy decode step over a StaticCache with fixed input buffers, so that it can be
    captured in a CUDA graph: the token, the position and the attention mask live in tensors the
    step updates itself (the mask is passed as a 4-D boolean so transformers builds none, which
    would read values on the host)."""

    def __init__(self, model, batch: int, prompt_len: int, new_tokens: int, device):
        from transformers import StaticCache

        self.model, self.prompt_len = model, prompt_len
        self.max_len = prompt_len + new_tokens
        self.cache = StaticCache(config=model.config, max_cache_len=self.max_len)
        self.tok = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.pos = torch.zeros(1, dtype=torch.long, device=device)
        self.slots = torch.arange(self.max_len, device=device)
        self.batch = batch
        self.logits = None

    def prefill(self, prompt):
        with torch.no_grad():
            P = prompt.shape[1]
            mask = (self.slots[None, :] <= torch.arange(P, device=prompt.device)[:, None])
            out = self.model(input_ids=prompt, past_key_values=self.cache, use_cache=True,
                             cache_position=torch.arange(P, device=prompt.device),
                             attention_mask=mask[None, None].expand(self.batch, 1, P, self.max_len))
            self.tok.copy_(out.logits[:, -1:].argmax(-1))
            self.pos.fill_(P)

    def step(self):
        with torch.no_grad():
            mask = (self.slots <= self.pos)[None, None, None, :].expand(self.batch, 1, 1, self.max_len)
            out = self.model(input_ids=self.tok, past_key_values=self.cache, use_cache=True, cache_position=self.pos,
                             position_ids=self.pos[None].expand(self.batch, 1), attention_mask=mask)
            self.tok.copy_(out.logits[:, -1:].argmax(-1))
            self.pos.add_(1)
            return out.logits


def decode_graphs(model, prompt, new_tokens: int, reps: int):
    """(first replayed step's logits, [seconds of each replayed token], the eager static step's logits)."""
    dec = StaticDecoder(model, prompt.shape[0], prompt.shape[1], new_tokens, prompt.device)
    dec.prefill(prompt)
    eager_first = dec.step().float().clone()  # the same step, uncaptured: what the replay must give
    stream = torch.cuda.Stream()  # warm-up on a side stream before capture (plans, allocator, lazy inits)
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            dec.prefill(prompt)
            dec.step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    dec.prefill(prompt)
    with torch.cuda.graph(graph):
        logits = dec.step()
    dec.prefill(prompt)
    graph.replay()  # warm-up replay, and the check's logits
    torch.cuda.synchronize()
    first = logits.float().clone()
    times = []
    for _ in range(reps):
        dec.prefill(prompt)
        torch.cuda.synchronize()
        for _ in range(new_tokens):  # per token, waited for as decode_eager's
            t0 = time.perf_counter()
            graph.replay()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    return first, times, eager_first


def _stats(seconds: list) -> dict:
    ms = sorted(t * 1e3 for t in seconds)
    q = statistics.quantiles(ms, n=5) if len(ms) >= 2 else [ms[0]] * 4
    return dict(median_ms=statistics.median(ms), p20_ms=q[0], p80_ms=q[3])


def _time_calls(fn, device, reps: int) -> list:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    sync()
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - t0)
    return out


# ------------------------------------------------------------------ the run ------------------
def _quiet():
    # transformers 5.24 renames past_key_values to cache; the GPU box's 5.17 knows only the old name
    warnings.filterwarnings("ignore", message=".*past_key_values.*is deprecated", category=FutureWarning)


def run_model_bench(device, dtype, quick: bool, tiny: bool, bar=None, selected=None, jobs=None, sizes=None,
                    compile_backend: Optional[str] = None, candidates=None) -> list:
    """model.csv's rows. ``selected``: run.py's --candidates (layer names: any unilora[...] runs
    this package's auto candidate); ``candidates``: this benchmark's own names (CANDIDATES)."""
    _quiet()
    s = model_sizes(device, quick, tiny, sizes)
    jobs = list(jobs or JOBS)
    compile_backend = compile_backend or ("inductor" if device.type == "cuda" else "aot_eager")
    reps = 3 if quick or tiny else 10  # training steps timed (each after a warm-up step)
    decode_reps = 1 if quick or tiny else 3  # decodes of new_tokens tokens, each token timed (after a warm-up)
    names = [n for n in CANDIDATES if n in ("base", "unilora[auto]") or (n == "peft-lora" and peft_installed())
             or (n == "peft-unilora" and peft_unilora_available())]
    if candidates is not None:
        timed = set(candidates)
    elif selected is not None:
        timed = {n for n in names if n in selected or (n == "unilora[auto]" and any(
            x.startswith("unilora[") for x in selected))}
    else:
        timed = set(names)
    # The counterparts the checks need are built even when not timed.
    partner = {"unilora[auto]": "peft-unilora", "peft-unilora": "unilora[auto]", "peft-lora": "base"}
    needed = [n for n in names if n in timed or any(partner.get(t) == n for t in timed)]
    base = base_model(s, dtype, device)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, s["vocab"], (s["batch"], s["seq"]), generator=gen).to(device)
    prompts = {B: torch.randint(0, s["vocab"], (B, s["prompt"]), generator=gen).to(device) for B in s["decode_batches"]}
    shape = dict(hidden=s["hidden"], inter=s["inter"], layers=s["layers"], heads=s["heads"], kv_heads=s["kv"],
                 vocab=s["vocab"], r=s["r"], d=s["d"])
    refs, rows, theta = {}, [], None
    for name in needed:
        c = build(name, base, s, theta)
        if name == "peft-unilora":
            theta = c.params[0].detach().clone()
        model = c.module
        trainable = sum(p.numel() for p in c.params)
        # ---- checks, before any timing (and before any optimizer step changes the parameters)
        loss, grad = loss_and_grad(c, ids)
        mine = {"loss": loss, "grad": grad, "logits": {}}
        for B, prompt in prompts.items():
            mine["logits"][B] = decode_eager(model, prompt, 1)[0]
        refs[name] = mine
        problems = [f"{what} not finite" for what, t in
                    [("loss", loss), ("theta grad", grad), *[(f"logits b={B}", v) for B, v in mine["logits"].items()]]
                    if t is not None and not torch.isfinite(t).all()]
        problems += [f"logits b={B} shaped {tuple(v.shape)}" for B, v in mine["logits"].items()
                     if tuple(v.shape) != (B, 1, s["vocab"])]
        other = refs.get(partner.get(name, ""))
        detail = []
        if other is not None:
            detail.append(f"loss rel err {_rel(loss, other['loss']):.1e}")
            errs = [_rel(loss, other["loss"])]
            if grad is not None and other["grad"] is not None:
                errs.append(_rel(grad, other["grad"]))
                detail.append(f"theta grad rel err {errs[-1]:.1e}")
            for B in prompts:
                errs.append(_rel(mine["logits"][B], other["logits"][B]))
            detail.append(f"logits rel err {max(errs[-len(prompts):]):.1e} vs {partner[name]}")
            if max(errs) > TOL[dtype]:
                problems.append(f"disagrees with {partner[name]} (tol {TOL[dtype]:.0e})")
        if other is None and partner.get(name) in needed:
            detail.append(f"finite; compared with {partner[name]} on its rows")
        check = "; ".join(problems + detail) or "finite (no counterpart built)"
        ok = not problems
        if name not in timed:
            del c, model
            continue
        snapshot = [p.detach().clone() for p in c.params]

        def restore():
            with torch.no_grad():
                for p, v in zip(c.params, snapshot):
                    p.copy_(v)

        def add(mode, **kw):
            row = dict(mode=mode, candidate=name, backend=c.backend, trainable=trainable, **shape, **kw)
            row.setdefault("correct", ok)
            row.setdefault("check", check)
            rows.append(row)
            if bar is not None:
                bar.update(1)
            return row

        tokens = s["batch"] * s["seq"]
        for job in [j for j in JOBS if j in jobs]:
            mode = MODES[job]
            if job.startswith("train"):
                row = add(mode, batch=s["batch"], seq=s["seq"], tokens=tokens)
                if not ok:
                    continue
                model.train()
                step = train_step(c, ids)
                if job == "train-compiled":
                    from torch._dynamo.utils import counters

                    graphs0 = counters["stats"]["unique_graphs"]
                    t0 = time.perf_counter()
                    compile_layers(model, compile_backend)
                    try:
                        step()  # compiles (the eager step ran above: the allocator is warm)
                        restore()
                        closs, _ = loss_and_grad(c, ids)
                        err = _rel(closs, loss)
                    except Exception as e:  # noqa: BLE001 - recorded in the row, the run goes on
                        row.update(correct=False, check=f"compile failed: {type(e).__name__}: {str(e)[:200]}")
                        uncompile_layers(model)
                        restore()
                        model.eval()
                        continue
                    row["compile_s"] = time.perf_counter() - t0
                    # one graph (forward; its backward is compiled with it) should serve every layer
                    row["note"] = (f"decoder layers torch.compile'd, backend={compile_backend}, "
                                   f"{counters['stats']['unique_graphs'] - graphs0} graph(s) compiled")
                    row["check"] = f"compiled loss rel err {err:.1e} vs eager; {check}"
                    if not math.isfinite(err) or err > TOL[dtype]:
                        row["correct"] = False
                        uncompile_layers(model)
                        restore()
                        model.eval()
                        continue
                times = _time_calls(step, device, reps)
                row.update(**_stats(times))
                row["tokens_per_s"] = tokens / (row["median_ms"] / 1e3)
                row["device_ms"], row["device_ms_source"] = device_time_ms(step, device, 3)
                row["peak_mem_bytes"] = peak_memory_bytes(step, device)
                if job == "train":
                    row["saved_bytes"] = saved_for_backward_bytes(lambda: model(input_ids=ids, labels=ids, use_cache=False).loss)
                if job == "train-compiled":
                    uncompile_layers(model)
                restore()
                model.eval()
                continue
            for B, prompt in prompts.items():
                row = add(mode, batch=B, seq=s["prompt"], new_tokens=s["new_tokens"], tokens=B,
                          device_ms_source="not measured: decode rows time the whole token loop (host included)")
                if not ok:
                    continue
                if job == "decode":
                    decode_eager(model, prompt, min(8, s["new_tokens"]))  # warm-up
                    times = [t for _ in range(decode_reps) for t in decode_eager(model, prompt, s["new_tokens"])[1]]
                else:
                    if device.type != "cuda":
                        # No graphs here, but the step they would capture runs uncaptured: its
                        # StaticCache plumbing (4-D mask, positions) must give DynamicCache's logits.
                        dec = StaticDecoder(model, B, prompt.shape[1], s["new_tokens"], device)
                        dec.prefill(prompt)
                        err = _rel(dec.step(), mine["logits"][B])
                        row.update(correct=err <= TOL[dtype], note="CUDA only: not timed",
                                   check=f"not timed: CUDA graphs need a CUDA device; the uncaptured static step's "
                                         f"logits rel err {err:.1e} vs DynamicCache; {check}")
                        continue
                    try:
                        first, times, eager_first = decode_graphs(model, prompt, s["new_tokens"], decode_reps)
                    except Exception as e:  # noqa: BLE001 - recorded in the row, the run goes on
                        row.update(correct=False, check=f"capture failed: {type(e).__name__}: {str(e)[:200]}")
                        torch.cuda.synchronize()
                        continue
                    errs = (_rel(first, eager_first), _rel(first, mine["logits"][B]))
                    row["check"] = (f"replay rel err {errs[0]:.1e} vs the eager static step, {errs[1]:.1e} vs "
                                    f"DynamicCache; {check}")
                    row["note"] = "StaticCache step captured once (torch.cuda.graph), replayed per token"
                    if max(errs) > TOL[dtype] or not torch.isfinite(first).all():
                        row["correct"] = False
                        continue
                row.update(**_stats(times))
                row["ms_per_token"] = row["median_ms"]
                row["tokens_per_s"] = B / (row["median_ms"] / 1e3)
        del c, model, snapshot
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    for row in rows:
        if row.get("median_ms") is None:
            continue
        for ref, col in (("base", "ratio_to_base"), ("peft-lora", "ratio_to_peft_lora"),
                         ("peft-unilora", "ratio_to_peft_unilora")):
            other = next((r for r in rows if r["candidate"] == ref and r["mode"] == row["mode"]
                          and r["batch"] == row["batch"] and r.get("median_ms")), None)
            if other is not None:
                row[col] = row["median_ms"] / other["median_ms"]
    return rows


def summary_lines(rows) -> list:
    if not rows:
        return []
    r0 = rows[0]
    lines = [f"## Model: LLaMA hidden {r0['hidden']}, {r0['layers']} layers, r = {r0['r']}, d = {r0['d']:,}", "",
             "| mode | batch | candidate | median ms | ms/token | × base | × PEFT LoRA | × PEFT Uni-LoRA | check |",
             "|---|---|---|---|---|---|---|---|---|"]

    def f(v, spec):
        return "" if v is None else format(v, spec)

    for r in rows:
        lines.append(f"| {r['mode']} | {r['batch']} | {r['candidate']} | {f(r.get('median_ms'), '.3f')} | "
                     f"{f(r.get('ms_per_token'), '.3f')} | {f(r.get('ratio_to_base'), '.2f')} | "
                     f"{f(r.get('ratio_to_peft_lora'), '.2f')} | {f(r.get('ratio_to_peft_unilora'), '.2f')} | "
                     f"{'' if r['correct'] else 'WRONG: '}{r['check']} |")
    return lines + [""]


def print_rows(rows, out=None) -> None:
    out = out or sys.stdout  # looked up per call: pytest's capsys swaps it
    for r in rows:
        t = f"{r['median_ms']:.3f} ms" if r.get("median_ms") is not None else ("WRONG" if not r["correct"] else "-")
        ratio = f" ({r['ratio_to_base']:.2f}x base)" if r.get("ratio_to_base") else ""
        print(f"model {r['mode']:>16} b={r['batch']:<3} {r['candidate']:>14}: {t}{ratio}  [{r['check']}]", file=out)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="results directory (model.csv, model_env.json, model_summary.md)")
    p.add_argument("--cpu", action="store_true", help="run on CPU even when a GPU is present")
    p.add_argument("--tiny", action="store_true", help="tiny sizes, fp32 on CPU (tests)")
    p.add_argument("--quick", action="store_true", help="fewer repetitions (and a smaller CPU model)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="default: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--jobs", default=",".join(JOBS), help=f"comma-separated, of {', '.join(JOBS)}")
    p.add_argument("--candidates", nargs="+", default=None, choices=CANDIDATES, metavar="NAME",
                   help=f"time only these (of {', '.join(CANDIDATES)}); their check counterparts are still built")
    p.add_argument("--compile-backend", default=None, help="torch.compile backend (default inductor on GPU, "
                                                           "aot_eager on CPU: inductor's CPU build takes minutes)")
    for flag in ("hidden", "inter", "layers", "heads", "kv", "vocab", "r", "d", "batch", "seq", "new-tokens",
                 "prompt"):
        p.add_argument(f"--{flag}", type=int, default=None, help="override the size")
    p.add_argument("--decode-batches", default=None, help="e.g. 1,32")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    jobs = [j for j in args.jobs.split(",") if j]
    unknown = [j for j in jobs if j not in JOBS]
    if unknown:
        print(f"model_bench.py: error: unknown job(s) {', '.join(unknown)}; valid: {', '.join(JOBS)}", file=sys.stderr)
        return 2
    sizes = {k: getattr(args, k) for k in ("hidden", "inter", "layers", "heads", "kv", "vocab", "r", "d", "batch",
                                           "seq", "new_tokens", "prompt")}
    if args.decode_batches:
        sizes["decode_batches"] = tuple(int(v) for v in args.decode_batches.split(",") if v)
    os.makedirs(args.out, exist_ok=True)
    env = environment(device)
    import transformers

    env["transformers"] = transformers.__version__  # its cache and mask APIs moved between 5.x releases
    t0 = time.perf_counter()
    rows = run_model_bench(device, dtype, args.quick, args.tiny, jobs=jobs, sizes=sizes,
                           compile_backend=args.compile_backend, candidates=args.candidates)
    for r in rows:
        r.update(device=env["device"], dtype=str(dtype).replace("torch.", ""))
    write_csv(os.path.join(args.out, "model.csv"), rows, MODEL_COLUMNS)
    with open(os.path.join(args.out, "model_env.json"), "w", encoding="utf-8") as fh:
        json.dump({**env, "argv": sys.argv[1:] if argv is None else list(argv),
                   "sizes": model_sizes(device, args.quick, args.tiny, sizes)}, fh, indent=1, default=str)
    with open(os.path.join(args.out, "model_summary.md"), "w", encoding="utf-8") as fh:
        fh.write("\n".join(summary_lines(rows)))
    print_rows(rows)
    print(f"{len(rows)} model rows in {time.perf_counter() - t0:.0f}s; results in {args.out}")
    return 1 if any(not r["correct"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
