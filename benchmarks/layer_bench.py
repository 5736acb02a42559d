"""Layer benchmark: UniLoRALinear (every available backend) beside the naive projection (PEFT's
layer and this repo's copy of it), PEFT LoRA at the same r, and the frozen base layer.

Every candidate is checked against the naive projection at the size it is timed, before it is
timed; a candidate whose output or gradients disagree is recorded as wrong and not timed.
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import nn

import unilora_kernels as uk
from unilora_kernels import projection as P
from unilora_kernels.backends import cost_model, policy

from candidates import Candidate, benchmark_backends, is_selected, unilora_name
from common import (device_time_ms, largest_allocation_bytes, paired_ratio, peak_memory_bytes,
                    saved_for_backward_bytes, time_fn, time_interleaved)
from naive import NaiveUniLoRALinear

TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}


def build_candidates(in_f, out_f, r, d, dtype, device, seed=0, with_peft=True,
                     selected: Optional[set] = None) -> list:
    """The layer candidates ``selected`` names (None: all), and the naive projection, which is
    every other candidate's correctness reference, timed only when selected."""
    g = torch.Generator().manual_seed(seed)
    base = nn.Linear(in_f, out_f)
    with torch.no_grad():
        base.weight.copy_(torch.randn(out_f, in_f, generator=g) / in_f**0.5)
        base.bias.copy_(torch.randn(out_f, generator=g) * 0.1)
    base = base.to(device=device, dtype=dtype).requires_grad_(False)
    D = r * (in_f + out_f)
    index = P.generate_index(D, d, seed)
    scales = P.uniform_scales(index, d).to(device)
    table = torch.from_numpy(index)
    idx_a = table[: r * in_f].view(r, in_f).to(device)
    idx_b = table[r * in_f :].view(out_f, r).to(device)
    # A large theta makes the update visible next to the base output, so the check means something.
    theta = (torch.rand(d, generator=g) * 2 - 1).to(device)

    out = [Candidate("base", copy.deepcopy(base), "base")] if is_selected("base", selected) else []
    naive = NaiveUniLoRALinear(copy.deepcopy(base), nn.Parameter(theta.clone()), idx_a, idx_b, scales)
    out.append(Candidate("naive", naive, "unilora", index_bytes_per_elem=12.0, timed=is_selected("naive", selected)))
    with_peft = with_peft and (is_selected("peft-unilora", selected) or is_selected("peft-lora", selected))
    if with_peft:
        try:
            from peft import LoraConfig, UniLoraConfig, get_peft_model
        except ImportError:
            with_peft = False
    if with_peft:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if is_selected("peft-unilora", selected):
                pm = get_peft_model(nn.Sequential(copy.deepcopy(base)),
                                    UniLoraConfig(r=r, theta_d_length=d, proj_seed=seed, target_modules=["0"]))
                layer = pm.base_model.model[0]
                with torch.no_grad():
                    pm.base_model.unilora_theta_d["default"].copy_(theta)
                per_elem = sum(b.numel() * b.element_size() for n, b in layer.named_buffers()
                               if "indices" in n or "scales" in n) / D
                out.append(Candidate("peft-unilora", layer, "unilora", index_bytes_per_elem=per_elem,
                                     extra={"owner": pm}))
            if is_selected("peft-lora", selected):
                lm = get_peft_model(nn.Sequential(copy.deepcopy(base)),
                                    LoraConfig(r=r, lora_alpha=r, target_modules=["0"], lora_dropout=0.0))
                out.append(Candidate("peft-lora", lm.base_model.model[0], "lora", extra={"owner": lm}))
    for name in benchmark_backends(device):
        if not is_selected(unilora_name(name), selected):
            continue
        layer = uk.UniLoRALinear(copy.deepcopy(base), r=r, theta_d_length=d, proj_seed=seed, backend=name)
        with torch.no_grad():
            layer.theta_d.copy_(theta)
        per_elem = (layer.unilora_indices_A.numel() + layer.unilora_indices_B.numel()) * 4 / D
        out.append(Candidate(unilora_name(name), layer, "unilora", backend=name, index_bytes_per_elem=per_elem))
    return out


def trainables(module: nn.Module) -> list:
    return [p for p in module.parameters() if p.requires_grad]


def make_fns(c: Candidate, x: torch.Tensor, g: torch.Tensor):
    """(inference fn, training fn) for a candidate; training returns the gradients."""
    layer = c.module
    params = trainables(layer)
    xg = x.detach().requires_grad_(True)

    def infer():
        with torch.no_grad():
            return layer(x)

    def train():
        y = layer(xg)
        return torch.autograd.grad(y, [xg] + params, g)

    return infer, train


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return (a - b).abs().max().item() / max(b.abs().max().item(), 1e-12)


def check(c: Candidate, ref: dict, x, g, mode: str, dtype) -> tuple[bool, str]:
    """Compare a candidate with the naive projection's results (output; in training also grads)."""
    infer, train = make_fns(c, x, g)
    tol = TOL[dtype]
    if mode == "inference":
        err = _rel_err(infer(), ref["out"])
        return err <= tol, f"out rel err {err:.2e}"
    grads = train()
    errs = {"grad_x": _rel_err(grads[0], ref["grad_x"]), "grad_theta": _rel_err(grads[1], ref["grad_theta"])}
    worst = max(errs, key=errs.get)
    return errs[worst] <= tol, f"{worst} rel err {errs[worst]:.2e}"


def reference_results(naive: Candidate, x, g) -> dict:
    infer, train = make_fns(naive, x, g)
    grads = train()
    return {"out": infer(), "grad_x": grads[0], "grad_theta": grads[1]}


def model_columns(in_f: int, out_f: int, r: int, M: int, dtype, mode: str, device) -> dict:
    """The byte/flop model's figures for this row (backends/cost_model.py): the device it models
    (the bench's GPU, an H100 on a CPU run), the base GEMMs, the split and fold schedules, and the
    row threshold at which the cuda/triton backends fold (policy.fold_min_m, no dropout)."""
    name, peak = cost_model.peak_named(torch.cuda.get_device_name(device) if device.type == "cuda" else None)
    elt = dtype.itemsize
    training = mode == "training"
    flops = peak.flops if elt <= 2 else peak.flops / 4
    gemms = [k for k in cost_model.kernels("split", M, in_f, out_f, r, elt, training) if k[0].endswith("gemm")]
    base_s = sum(max(f / flops, b / peak.bandwidth) + cost_model.LAUNCH_S for _, f, b in gemms)
    pred = {s: cost_model.predict_s(s, M, in_f, out_f, r, elt, training, peak) * 1e3 for s in ("split", "fold")}
    fold_at = policy.fold_min_m("cuda", torch.device("cpu"), dtype, in_f, out_f, r, False, training, False)
    return dict(model_device=name, model_base_ms=base_s * 1e3, model_split_ms=pred["split"],
                model_fold_ms=pred["fold"], fold_min_m=None if fold_at >= policy.FOLD_NEVER else fold_at)


def run_config(cands: list, in_f, out_f, r, d, M, modes, dtype, device, quick, measure_memory, bar,
               min_time=None) -> list:
    gen = torch.Generator().manual_seed(M)
    x = torch.randn(M, in_f, generator=gen).to(device=device, dtype=dtype)
    g = torch.randn(M, out_f, generator=gen).to(device=device, dtype=dtype)
    naive = next(c for c in cands if c.name == "naive")
    ref = reference_results(naive, x, g)
    timed = [c for c in cands if c.timed]
    rows = []
    for mode in modes:
        timings = {}
        checked = []
        for c in timed:
            row = dict(mode=mode, in_features=in_f, out_features=out_f, r=r, d=d, M=M, candidate=c.name,
                       backend=c.backend, kind=c.kind, index_bytes_per_elem=c.index_bytes_per_elem,
                       **model_columns(in_f, out_f, r, M, dtype, mode, device))
            if c.kind == "unilora":
                ok, detail = check(c, ref, x, g, mode, dtype)
            else:
                ok, detail = True, "not the same function (timed as a reference point)"
            row.update(correct=ok, check=detail)
            checked.append((c, row))
        fns = {c.name: make_fns(c, x, g)[0 if mode == "inference" else 1] for c, row in checked if row["correct"]}
        # CPU: all candidates in alternation (time_interleaved); GPU: one after the other (do_bench)
        cpu_times = time_interleaved(fns, quick, min_time) if fns and device.type != "cuda" else {}
        for c, row in checked:
            if row["correct"]:
                fn = fns[c.name]
                t = cpu_times[c.name] if cpu_times else time_fn(fn, device, quick)
                row.update(median_ms=t.median_ms, p20_ms=t.p20_ms, p80_ms=t.p80_ms)
                row["device_ms"], row["device_ms_source"] = device_time_ms(fn, device, 5 if quick else 20)
                timings[c.name] = t
                if measure_memory and mode == "training":
                    row["saved_bytes"] = saved_for_backward_bytes(lambda: c.module(x.detach().requires_grad_(True)))
                    row["largest_alloc_bytes"] = largest_allocation_bytes(fn, device)
                    row["peak_mem_bytes"] = peak_memory_bytes(fn, device)
            bar.update(1)
        naive_ref = "peft-unilora" if "peft-unilora" in timings else "naive"
        rows += [row for _, row in checked]
        for _, row in checked:
            if "median_ms" in row:
                t = timings[row["candidate"]]
                row["naive_ref"] = naive_ref
                row["ratio_to_naive"] = paired_ratio(t, timings[naive_ref]) if naive_ref in timings else None
                row["ratio_to_base"] = paired_ratio(t, timings["base"]) if "base" in timings else None
    return rows
