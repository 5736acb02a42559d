"""Projection math: PEFT-exact uniform indices, the hashed Feistel projection, Philox dropout."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from unilora_kernels import philox
from unilora_kernels import projection as P

peft_model = pytest.importorskip("peft.tuners.unilora.model")


# ---------------------------------------------------------------- uniform (PEFT) --------------
@pytest.mark.parametrize(
    "D,d,seed",
    [
        (1000, 37, 0),  # D % d != 0
        (1200, 100, 42),  # D % d == 0
        (50, 200, 3),  # d > D: some theta_d entries unused
        (12345, 1000, 7),
        (2**20 + 3, 4096, 11),
        (1, 1, 0),
    ],
)
def test_generate_index_equals_peft_bit_for_bit(D, d, seed):
    ours = P.generate_index(D, d, seed)
    theirs = peft_model.UniLoraModel.generate_index(D, d, seed).numpy()
    assert ours.dtype == np.int32
    np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("D,d,seed", [(1000, 37, 0), (50, 200, 3), (99_999, 1234, 5)])
def test_uniform_scales_equal_peft(D, d, seed):
    index = P.generate_index(D, d, seed)
    ours = P.uniform_scales(index, d)
    # PEFT's _assign_unilora_indices_and_scales, verbatim
    idx = torch.as_tensor(index, dtype=torch.long)
    counts = torch.bincount(idx, minlength=d)
    expected = torch.zeros(d, dtype=torch.float32)
    used = counts > 0
    expected[used] = counts[used].float().rsqrt()
    assert ours.dtype == torch.float32 and torch.equal(ours, expected)


def test_uniform_projection_is_an_isometry():
    D, d = 3000, 128
    index = torch.from_numpy(P.generate_index(D, d, 1)).long()
    s = P.uniform_scales(index.numpy(), d).double()
    Pm = torch.zeros(D, d, dtype=torch.float64)
    Pm[torch.arange(D), index] = s[index]
    assert torch.allclose(Pm.t() @ Pm, torch.eye(d, dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize(
    "D,d,message",
    [(0, 10, "must be positive"), (10, 0, "positive int"), (2**31, 10, "does not fit int32"), (10, -3, "positive int")],
)
def test_check_sizes_errors(D, d, message):
    with pytest.raises(ValueError, match=message):
        P.check_sizes(D, d)


# ---------------------------------------------------------------- hashed ---------------------
@pytest.mark.parametrize("D", [1, 2, 3, 17, 1000, 4099, 65537])
def test_hashed_index_is_a_permutation_when_d_ge_D(D):
    key = P.splitmix64(D)
    idx = P.hashed_index(torch.arange(D), D, D, key)
    assert torch.equal(torch.sort(idx).values, torch.arange(D))


@pytest.mark.parametrize("D,d", [(1000, 37), (1200, 100), (50, 200), pytest.param(70_001, 999, marks=pytest.mark.slow)])
def test_hashed_counts_match_closed_form(D, d):
    idx = P.hashed_index(torch.arange(D), D, d, P.splitmix64(3))
    counts = torch.bincount(idx, minlength=d)
    base, plus = P.hashed_counts(D, d)
    expected = torch.where(torch.arange(d) < D % d, plus, base)
    assert torch.equal(counts, expected)
    scales = P.hashed_scales(D, d)
    per_index = P.hashed_scale_of(torch.arange(d), D, d, scales)
    ref = P.scales_from_counts(counts)
    assert torch.equal(per_index, ref)


def test_hashed_index_depends_on_the_key_and_mixes():
    D, d = 10_000, 97
    a = P.hashed_index(torch.arange(D), D, d, P.splitmix64(1))
    b = P.hashed_index(torch.arange(D), D, d, P.splitmix64(2))
    assert (a != b).float().mean() > 0.9
    # consecutive positions must not map to consecutive indices (a weak but real mixing check)
    assert (a[1:] - a[:-1]).abs().float().mean() > d / 5


def test_hashed_index_golden_values():
    """Saved hashed adapters depend on this exact function: it must never change."""
    got = P.hashed_index(torch.arange(12), 1_000_003, 4096, P.splitmix64(42)).tolist()
    assert got == [546, 164, 3328, 2509, 3052, 1048, 1587, 3517, 3548, 1520, 2388, 726], got


# ---------------------------------------------------------------- Philox ---------------------
def _t(v):
    return torch.tensor([v], dtype=torch.int64)


@pytest.mark.parametrize(
    "ctr,key,expected",
    [  # Random123 known-answer vectors for philox4x32-10
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        (
            (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
            (0xA4093822, 0x299F31D0),
            (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
        ),
    ],
)
def test_philox_known_answers(ctr, key, expected):
    out = philox.philox4x32(*map(_t, ctr), *key)
    assert tuple(int(v) for v in out) == expected


def test_philox_equals_triton_randint_in_the_interpreter(tmp_path):
    pytest.importorskip("triton")
    kernel = tmp_path / "philox_probe.py"
    kernel.write_text(textwrap.dedent('''
        import triton, triton.language as tl
        @triton.jit
        def probe(out_ptr, seed, n, stride, BLOCK: tl.constexpr):
            offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
            r = tl.randint(seed, offs.to(tl.int64) * stride)
            tl.store(out_ptr + offs, r, mask=offs < n)
    '''))
    script = textwrap.dedent(f'''
        import sys, torch
        sys.path.insert(0, {str(tmp_path)!r})
        import philox_probe
        from unilora_kernels.philox import philox_randint
        n = 300
        for seed in (0, 7, 2**40 + 77, 2**62 - 5):
            for stride in (1, 1000003, 2**33 + 1):  # offsets past 2**32 use the high counter word
                out = torch.empty(n, dtype=torch.int32)
                philox_probe.probe[(3,)](out, seed, n, stride, BLOCK=128)
                ref = philox_randint(seed, torch.arange(n, dtype=torch.int64) * stride)
                assert torch.equal(out.to(torch.int64) & 0xFFFFFFFF, ref), (seed, stride)
        print("OK")
    ''')
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and "OK" in res.stdout, res.stdout + res.stderr


@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_dropout_keep_rate(p):
    keep = philox.dropout_keep(123, 400, 250, p)
    rate = keep.float().mean().item()
    assert abs(rate - (1 - p)) < 0.01
    if p == 0.0:
        assert keep.all()
    if p == 1.0:
        assert not keep.any() and philox.keep_scale(p) == 0.0


def test_dropout_mask_depends_on_seed_and_position():
    a = philox.dropout_keep(1, 64, 64, 0.5)
    b = philox.dropout_keep(2, 64, 64, 0.5)
    assert (a != b).float().mean() > 0.3
    # rows are not copies of each other
    assert (a[0] != a[1]).any()


def test_keep_threshold_rejects_bad_p():
    with pytest.raises(ValueError, match="dropout probability"):
        philox.keep_threshold(1.5)
