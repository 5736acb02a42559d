"""The Triton backend's plans (``triton_backend.make_plan``): the hot path of a layer call.

A plan fixes the projection, dropout, schedule and every kernel's config when it is built; per
call it only computes grids from M and launches. Checked here, under the interpreter on CPU:
plans equal the module functions bit for bit, seeds as tensors equal seeds as ints and are never
read on the host, the config data (JSON) is read and written, and the package's Python calls per
planned forward + backward stay few (launches recorded).
"""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

from oracle import assert_close, make_projection, random_theta
from unilora_kernels import backends, philox
from unilora_kernels.backends import PlanSpec, row_bucket, triton_launch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
try:
    tb = backends.get_backend("triton", DEVICE)
    _REASON = None
except backends.BackendNotAvailableError as exc:
    tb, _REASON = None, str(exc)
pytestmark = pytest.mark.skipif(tb is None, reason=f"triton backend unavailable on {DEVICE}: {_REASON}")


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    for k in ("UNILORA_TRITON_SCHEDULE", "UNILORA_TRITON_CONFIGS", "UNILORA_TRITON_TUNE_OUT",
              "UNILORA_TRITON_AUTOTUNE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("UNILORA_DETERMINISTIC", "0")
    with triton_launch.interpreter_tiles("gpu"):  # the GPU default configs, as a GPU runs them
        yield
    triton_launch.clear_tuned()
    tb.clear_caches()


def _layer(M, K, N, r, d, kind, dtype, seed=0):
    proj = make_projection(K, N, r, d, kind, seed=seed + 1, device=DEVICE)
    theta = random_theta(d, seed=seed + 2, device=DEVICE)
    gen = torch.Generator().manual_seed(M * 31 + K)
    x, out, g, gx0 = (torch.randn(M, n, generator=gen).to(DEVICE, dtype) for n in (K, N, N, K))
    return proj, theta, x, out, g, gx0


def _spec(proj, x, theta, p, det):
    return PlanSpec(proj, x.device, x.dtype, theta.dtype, p, row_bucket(x.shape[0]), det)


def _same(a, b, what):
    assert (a is None) == (b is None), what
    if a is not None:
        assert a.dtype == b.dtype and torch.equal(a, b), what


# ------------------------------------------------------------------ plan == module functions ---
# Odd sizes; M = 5 is bucket 16 (fused), M = 40 bucket 64 (split). The interpreter evaluates the
# hashed permutation per tile element: fewer hashed cases.
CASES = [(M, kind, dtype, p, det)
         for M in (5, 40) for dtype in (torch.float32, torch.float16) for p in (0.0, 0.3) for det in (False, True)
         for kind in ("uniform",)]
CASES += [(5, "hashed", torch.float16, 0.3, False), (40, "hashed", torch.float32, 0.3, True),
          (40, "hashed", torch.float16, 0.0, False)]


@pytest.mark.parametrize("M,kind,dtype,p,det", CASES)
def test_plan_equals_module_functions_bit_for_bit(monkeypatch, M, kind, dtype, p, det):
    monkeypatch.setenv("UNILORA_DETERMINISTIC", "1" if det else "0")
    proj, theta, x, out, g, gx0 = _layer(M, 37, 29, 5, 61, kind, dtype)
    plan = tb.make_plan(_spec(proj, x, theta, p, det))
    assert plan.fused == (M <= 16)
    seed = 1234567 + M if p > 0 else None
    seed_t = torch.tensor([seed], dtype=torch.int64, device=DEVICE) if p > 0 else None
    out_m, out_p = out.clone(), out.clone()
    h_m = tb.forward_(out_m, x, theta, proj, p, seed)
    h_p = plan.forward_(out_p, x, theta, seed_t)
    _same(out_p, out_m, "out")
    _same(h_p, h_m, "h")
    for need_x, need_theta, accum in ((True, True, False), (True, True, True), (True, False, True),
                                      (False, True, False), (False, False, False)):
        gm = tb.backward(g, x, theta, proj, p, seed, h_m, gx0.clone() if accum else None, need_x, need_theta)
        gp = plan.backward(g, x, theta, seed_t, h_p, gx0.clone() if accum else None, need_x, need_theta)
        for a, b, what in zip(gp, gm, ("grad_x", "grad_theta")):
            _same(a, b, f"{what} need_x={need_x} need_theta={need_theta} accum={accum}")


def test_plan_schedule_is_fixed_per_row_bucket(monkeypatch):
    proj, theta, x, out, g, _ = _layer(16, 24, 20, 4, 40, "uniform", torch.float32)
    for rows, names in ((16, ["fused_fwd_kernel"]), (32, ["shrink_kernel", "expand_kernel"])):
        plan = tb.make_plan(PlanSpec(proj, x.device, x.dtype, theta.dtype, 0.0, rows, False))
        with triton_launch.record_launches() as rec:
            plan.forward_(out, x, theta, None)
        assert [ln.launcher.name for ln in rec] == names
    monkeypatch.setenv("UNILORA_TRITON_SCHEDULE", "split")  # read when the plan is built
    plan = tb.make_plan(PlanSpec(proj, x.device, x.dtype, theta.dtype, 0.0, 16, False))
    assert not plan.fused
    with pytest.raises(ValueError, match="r from 1 to 64"):
        tb.make_plan(PlanSpec(make_projection(9, 5, 65, 11, "uniform", device=DEVICE), x.device, x.dtype,
                              theta.dtype, 0.0, 16, False))
    with pytest.raises(TypeError, match="backend='reference'"):
        tb.make_plan(PlanSpec(proj, x.device, torch.float64, theta.dtype, 0.0, 16, False))


# ------------------------------------------------------------------ seeds ----------------------
@pytest.mark.parametrize("seed", [3, 2**40 + 12345, -77])
def test_seed_tensor_masks_are_philox_masks(seed):
    """A one-element int64 seed tensor, loaded by the kernels, drops exactly the elements of
    ``philox.dropout_keep`` for that value (forward h and backward grad_x, both schedules); a
    Python int gives the same bits, a CPU seed tensor too."""
    p = 0.4
    for M in (5, 40):
        proj, theta, x, out, g, _ = _layer(M, 33, 18, 3, 47, "uniform", torch.float32)
        plan = tb.make_plan(_spec(proj, x, theta, p, False))
        A, B = (t.double().cpu() for t in tb.lora_matrices(theta, proj))
        keep = philox.dropout_keep(seed, M, 33, p).double() * philox.keep_scale(p)
        seed_t = torch.tensor([seed], dtype=torch.int64, device=DEVICE)
        h = plan.forward_(out.clone(), x, theta, seed_t)
        assert_close(h, (x.double().cpu() * keep) @ A.T, torch.float32, f"h M={M}")
        gx, _ = plan.backward(g, x, theta, seed_t, h, None, True, False)
        assert_close(gx, (g.double().cpu() @ B @ A) * keep, torch.float32, f"grad_x M={M}")
        assert torch.equal(plan.forward_(out.clone(), x, theta, seed), h)
        assert torch.equal(plan.forward_(out.clone(), x, theta, torch.tensor([seed], dtype=torch.int64)), h)
    with pytest.raises(ValueError, match="needs a seed"):
        plan.forward_(out, x, theta, None)
    with pytest.raises(ValueError, match="int64"):
        plan.forward_(out, x, theta, torch.tensor([3], dtype=torch.int32))


_HOST_READS = ("item", "tolist", "cpu", "nonzero", "min", "max", "__int__", "__bool__", "__index__", "__float__")


def test_forward_and_backward_never_read_a_tensor_on_the_host(monkeypatch):
    """Planned and module-level calls, mixed batches included, with seeds as tensors: no host read
    of any tensor (what would sync a GPU and freeze the seed into a CUDA-graph capture)."""
    proj, theta, x, out, g, gx0 = _layer(40, 37, 29, 5, 61, "uniform", torch.float16)
    seed = torch.tensor([99], dtype=torch.int64, device=DEVICE)
    plans = [tb.make_plan(_spec(proj, x, theta, 0.2, False)),
             tb.make_plan(PlanSpec(proj, x.device, x.dtype, theta.dtype, 0.2, 16, False))]
    table = torch.stack([random_theta(61, seed=5)]).to(DEVICE)
    seq = torch.tensor([0, 1, -1, 0], dtype=torch.int32, device=DEVICE)

    def boom(*a, **k):
        raise AssertionError("a tensor was read on the host")

    with triton_launch.record_launches() as rec:
        for name in _HOST_READS:
            monkeypatch.setattr(torch.Tensor, name, boom)
        for plan, xx in ((plans[0], x), (plans[1], x[:5])):
            oo, gg = out[: xx.shape[0]].clone(), g[: xx.shape[0]]
            h = plan.forward_(oo, xx, theta, seed)
            plan.backward(gg, xx, theta, seed, h, None, True, True)
        h = tb.forward_(out.clone(), x, theta, proj, 0.2, seed)
        tb.backward(g, x, theta, proj, 0.2, seed, h, gx0.clone(), True, True)
        tb.mixed_forward_(out.clone(), x, theta, table, seq, proj, 0.2, seed)
        tb.mixed_backward(g, x, theta, table, seq, proj, 0.2, seed, True, True)
        monkeypatch.undo()
    seeded = [ln for ln in rec if "seed_ptr" in ln.args and ln.meta.get("DROPOUT")]
    assert seeded and all(ln.args["seed_ptr"] is seed for ln in seeded)  # the caller's tensor itself


# ------------------------------------------------------------------ config data ----------------
def _write(path, kernels):
    path.write_text(json.dumps({"format": triton_launch.CONFIG_FORMAT, "kernels": kernels}))
    return str(path)


def test_config_data_is_read_when_it_applies(monkeypatch, tmp_path):
    proj, theta, x, out, g, _ = _layer(40, 64, 48, 8, 61, "uniform", torch.float16)
    spec = _spec(proj, x, theta, 0.0, False)
    default = tb.make_plan(spec)
    cands = default.sh.candidates
    assert len(cands) > 1 and default.sh.config is cands[0]
    bucket = default.sh.bucket
    assert bucket == triton_launch.bucket_key(64, 64, 0, 16, torch.float16) == "m64_k64_n0_rp16_float16"
    pick = triton_launch.config_key(cands[-1])
    monkeypatch.setenv("UNILORA_TRITON_CONFIGS", _write(tmp_path / "c.json", {
        "shrink_kernel": {bucket: pick},
        "expand_kernel": {default.ex.bucket: {"BLOCK_M": 8, "BLOCK_N": 8, "num_warps": 1, "num_stages": 1}}}))
    plan = tb.make_plan(spec)
    assert plan.sh.config is cands[-1]  # the entry, one of the configs that apply
    assert plan.ex.config is default.ex.config  # not a config of the space: the default
    with triton_launch.record_launches() as rec:
        plan.forward_(out.clone(), x, theta, None)
    assert rec[0].configs == [cands[-1]] and rec[0].grid[0] == -(-40 // cands[-1].kwargs["BLOCK_M"])
    o1, o2 = out.clone(), out.clone()  # a config changes the tiling, not the result beyond rounding
    default.forward_(o1, x, theta, None)
    plan.forward_(o2, x, theta, None)
    torch.testing.assert_close(o1, o2, rtol=2e-3, atol=2e-3)
    monkeypatch.setenv("UNILORA_TRITON_CONFIGS", str(tmp_path / "bad.json"))
    (tmp_path / "bad.json").write_text(json.dumps({"kernels": {}}))
    with pytest.raises(ValueError, match="not a triton config file"):
        tb.make_plan(spec)


def test_packaged_default_config_file_is_installed():
    path = os.path.join(triton_launch.CONFIG_DIR, "default.json")
    assert os.path.exists(path), path
    with open(path) as fh:
        assert json.load(fh)["format"] == triton_launch.CONFIG_FORMAT


def test_autotune_times_the_candidates_and_saves_the_winners(monkeypatch, tmp_path):
    """The interpreter's do_bench runs each candidate once: enough to exercise the restore of the
    buffers and the file round trip (no timings are meaningful here)."""
    proj, theta, x, out, g, gx0 = _layer(40, 40, 24, 4, 53, "uniform", torch.float16)
    spec = _spec(proj, x, theta, 0.2, False)
    ref = tb.make_plan(spec)
    o_ref, seed = out.clone(), 5
    h_ref = ref.forward_(o_ref, x, theta, seed)
    gx_ref, gt_ref = ref.backward(g, x, theta, seed, h_ref, gx0.clone(), True, True)
    out_path = tmp_path / "tuned.json"
    monkeypatch.setenv("UNILORA_TRITON_TUNE_OUT", str(out_path))
    with triton_launch.autotune(True):
        plan = tb.make_plan(spec)
        o = out.clone()
        h = plan.forward_(o, x, theta, seed)
        gx, gt = plan.backward(g, x, theta, seed, h, gx0.clone(), True, True)
    # every candidate ran on these buffers; out and grad_x hold one run's update
    torch.testing.assert_close(o, o_ref, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(gx, gx_ref, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(gt, gt_ref, rtol=1e-3, atol=1e-3)
    data = json.loads(out_path.read_text())
    assert data["format"] == triton_launch.CONFIG_FORMAT
    winners = {(k, b): e for k, v in data["kernels"].items() for b, e in v.items()}
    assert {"shrink_kernel", "expand_kernel", "bwd_x_kernel", "bwd_db_kernel"} <= {k for k, _ in winners}
    assert winners[("shrink_kernel", plan.sh.bucket)] == triton_launch.config_key(plan.sh.config)
    path2 = tmp_path / "saved.json"
    assert triton_launch.save_tuned(str(path2)) == len(winners)
    monkeypatch.setenv("UNILORA_TRITON_CONFIGS", str(path2))
    again = tb.make_plan(spec)  # untuned, reading the saved winners
    for a, b in ((again.sh, plan.sh), (again.ex, plan.ex), (again.db, plan.db), (again.gb, plan.gb)):
        assert a.config is b.config


# ------------------------------------------------------------------ host cost ------------------
def _package_calls(fn) -> int:
    """Python calls into the installed unilora_kernels (kernel bodies and interpreter_alias excluded)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(tb.__file__)))
    kernels = os.path.join(root, "triton_kernels")
    calls = []

    def prof(frame, event, arg):
        if event == "call":
            f = frame.f_code.co_filename
            if f.startswith(root) and not f.startswith(kernels) and frame.f_code.co_name != "interpreter_alias":
                calls.append(f"{os.path.basename(f)}:{frame.f_code.co_name}")

    sys.setprofile(prof)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return calls


@pytest.mark.parametrize("det,limit", [(False, 12), (True, 14)])
def test_python_calls_per_planned_layer_step(det, limit):
    """forward_ + backward of a split-schedule layer with dropout, launches recorded (the lead's
    host benchmark measures the same way): one call per launch plus the plan's own methods."""
    proj, theta, x, out, g, _ = _layer(40, 64, 48, 8, 61, "uniform", torch.float16)
    plan = tb.make_plan(_spec(proj, x, theta, 0.1, det))
    seed = torch.tensor([7], dtype=torch.int64, device=DEVICE)

    def step():
        h = plan.forward_(out, x, theta, seed)
        plan.backward(g, x, theta, seed, h, None, True, True)

    with triton_launch.record_launches() as rec:
        step()  # warm
        n_launch = len(rec)
        calls = _package_calls(step)
    print(f"\nPython calls in unilora_kernels per planned forward+backward (det={det}, {n_launch} launches): "
          f"{len(calls)}: {calls}")
    assert len(calls) <= limit, calls
