"""Model benchmark: a small LLaMA built from a config (no download), Uni-LoRA on all linear
layers, one training step (forward, loss, backward, AdamW on theta_d): this package (each
backend) against PEFT's Uni-LoRA and PEFT LoRA, with step time, tokens/s and memory.
The first step's loss and theta_d gradient are compared with PEFT's before anything is timed.
"""

from __future__ import annotations

import copy
import warnings

import torch

import unilora_kernels as uk

from candidates import Candidate, benchmark_backends, is_selected, unilora_name
from common import largest_allocation_bytes, peak_memory_bytes, saved_for_backward_bytes, time_fn
from layer_bench import TOL


def model_sizes(device: torch.device, quick: bool, tiny: bool) -> dict:
    if tiny:
        return dict(hidden=32, inter=48, layers=2, heads=4, kv=2, vocab=97, batch=2, seq=16, r=4, d=512)
    if device.type == "cuda":
        return dict(hidden=1024, inter=2816, layers=8, heads=16, kv=8, vocab=8192, batch=8, seq=512, r=4, d=23_040)
    if quick:
        return dict(hidden=128, inter=344, layers=2, heads=4, kv=2, vocab=1024, batch=2, seq=64, r=4, d=4_096)
    return dict(hidden=256, inter=688, layers=4, heads=8, kv=4, vocab=2048, batch=4, seq=128, r=4, d=23_040)


def _llama(s: dict, dtype, device):
    from transformers import LlamaConfig, LlamaForCausalLM
    import transformers

    transformers.logging.set_verbosity_error()
    cfg = LlamaConfig(vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["inter"],
                      num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                      num_key_value_heads=s["kv"], max_position_embeddings=max(64, s["seq"]))
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to(device=device, dtype=dtype).eval()


def build_model_candidates(base, s: dict, device, selected=None) -> list:
    """The model candidates ``selected`` names (None: all); PEFT's Uni-LoRA model comes first
    whenever peft is installed, as the correctness reference, timed only when selected."""
    try:
        from peft import LoraConfig, UniLoraConfig, get_peft_model
    except ImportError:
        get_peft_model = None
    cands = []
    theta = None
    if get_peft_model is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pcfg = UniLoraConfig(r=s["r"], theta_d_length=s["d"], target_modules="all-linear")
            pm = get_peft_model(copy.deepcopy(base), pcfg)
            theta = pm.base_model.unilora_theta_d["default"]
            cands.append(Candidate("peft-unilora", pm, "unilora", params=[theta],
                                   timed=is_selected("peft-unilora", selected)))
            if is_selected("peft-lora", selected):
                lm = get_peft_model(copy.deepcopy(base), LoraConfig(r=s["r"], lora_alpha=s["r"],
                                                                     target_modules="all-linear"))
                cands.append(Candidate("peft-lora", lm, "lora", params=[p for p in lm.parameters() if p.requires_grad]))
    for backend in benchmark_backends(device):
        if not is_selected(unilora_name(backend), selected):
            continue
        cfg = uk.UniLoRAConfig(r=s["r"], theta_d_length=s["d"], target_modules="all-linear", backend=backend)
        model = uk.inject(copy.deepcopy(base), cfg)
        if theta is not None:
            with torch.no_grad():
                model.unilora_theta_d.copy_(theta)
        cands.append(Candidate(unilora_name(backend), model, "unilora", backend=backend,
                               params=[model.unilora_theta_d]))
    return cands


def run_model_bench(device, dtype, quick: bool, tiny: bool, bar=None, selected=None) -> list:
    s = model_sizes(device, quick, tiny)
    base = _llama(s, dtype, device)
    ids = torch.randint(0, s["vocab"], (s["batch"], s["seq"]), generator=torch.Generator().manual_seed(1)).to(device)
    tokens = s["batch"] * s["seq"]
    cands = build_model_candidates(base, s, device, selected)

    def loss_of(model):
        return model(input_ids=ids, labels=ids).loss

    reference = None
    if cands and cands[0].name == "peft-unilora":
        loss = loss_of(cands[0].module)
        reference = (loss.item(), torch.autograd.grad(loss, cands[0].params)[0])
    rows = []
    for c in [c for c in cands if c.timed]:
        name, model, params = c.name, c.module, c.params
        row = dict(candidate=name, backend=c.backend, tokens=tokens, hidden=s["hidden"], layers=s["layers"],
                   r=s["r"], d=s["d"], trainable=sum(p.numel() for p in params))
        ok, detail = True, "reference point"
        if name.startswith("unilora") and reference is not None:
            loss = loss_of(model)
            grad = torch.autograd.grad(loss, params)[0]
            l_err = abs(loss.item() - reference[0]) / abs(reference[0])
            g_err = (grad - reference[1]).abs().max().item() / reference[1].abs().max().item()
            ok = max(l_err, g_err) <= TOL[dtype]
            detail = f"loss rel err {l_err:.1e}, theta grad rel err {g_err:.1e} vs peft-unilora"
        row.update(correct=ok, check=detail)
        if ok:
            opt = torch.optim.AdamW(params, lr=1e-4)
            model.train()

            def step():
                loss = loss_of(model)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            t = time_fn(step, device, quick)
            row.update(median_ms=t.median_ms, p20_ms=t.p20_ms, p80_ms=t.p80_ms,
                       tokens_per_s=tokens / (t.median_ms / 1e3))
            row["saved_bytes"] = saved_for_backward_bytes(lambda: loss_of(model))
            row["largest_alloc_bytes"] = largest_allocation_bytes(step, device)
            row["peak_mem_bytes"] = peak_memory_bytes(step, device)
            model.eval()
        rows.append(row)
        if bar is not None:
            bar.update(1)
    ref = next((r for r in rows if r["candidate"] == "peft-unilora" and "median_ms" in r), None)
    for row in rows:
        if ref is not None and "median_ms" in row:
            row["speedup_vs_peft_unilora"] = ref["median_ms"] / row["median_ms"]
    return rows
