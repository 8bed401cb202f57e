"""Memory: exact norms of real layers inside a 2 GiB cap, and every dense path estimated first.

The exact norm of a grouped conv (depthwise included) with zero padding is the largest of its
groups' norms; it must never build the block-diagonal operator of the whole layer (32 channels at
32x32: 8.6 GB; MobileNetV2's depthwise layers at 64x64 never finished). The cap is real: a child
process under ``RLIMIT_AS`` = its mapped size after importing torch + 2 GiB, so the old
whole-operator path fails there (an allocation error, or the 2 GiB default budget refusing it).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from sepconv.errors import ConfigError, ResourceError
from sepconv.spectral import (
    ConvSpec,
    bracket,
    bracketing,
    certify,
    exact_norm,
    fantastic_four,
    fft_bound,
    iterative,
    norm_bracket,
    spectral_norm,
    validate,
)

CHILD = r"""
import json, resource, sys, time
import torch
from torch import nn

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

torch.set_num_threads(1)
from sepconv.models import create_model
from sepconv.spectral import ConvSpec, norm_bracket, spectral_norm
from sepconv.spectral.network import layer_inputs

size = int(sys.argv[1])
cap = status("VmSize:") + 2 * 2**30  # torch maps a lot at import: 2 GiB more than that
resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
base = status("VmRSS:")
torch.manual_seed(0)
model = create_model("mobilenet_v2")
rows, t0 = [], time.perf_counter()
for name, (mod, shape) in layer_inputs(model, (3, size, size), (nn.Conv2d,)).items():
    if mod.kernel_size == (1, 1):
        continue
    w = mod.weight.detach().double()
    spec = ConvSpec.of(mod, shape[-2:])
    exact = float(spectral_norm(w, spec, "exact"))
    lo, up = norm_bracket(w, spec)
    rows.append([name, spec.describe(mod.kernel_size), exact, float(lo), float(up)])
print(json.dumps({"rows": rows, "peak": status("VmHWM:"), "base": base, "seconds": time.perf_counter() - t0}))
"""


def run_capped(size: int) -> dict:
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    env.pop("SEPCONV_MEMORY_LIMIT", None)
    r = subprocess.run([sys.executable, "-c", CHILD, str(size)], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_exact_and_bracket_agree_on_every_mobilenet_v2_conv_inside_a_2gib_cap():
    doc = run_capped(64)
    rows = doc["rows"]
    assert len(rows) == 18  # the stem and the 17 depthwise convs
    assert sum(not geo.endswith(" g1") for _, geo, *_ in rows) == 17
    for name, geo, exact, lo, up in rows:
        assert 0 < lo <= up and up <= lo * (1 + 1e-4), (name, geo, lo, up)  # certified within tol
        assert lo * (1 - 1e-6) <= exact <= up * (1 + 1e-12), (name, geo, exact, lo, up)  # exact within it
    assert doc["peak"] - doc["base"] < 2 * 2**30


# ----------------------------------------------------------------------------- grouped exact norms


def per_group_truth(w: torch.Tensor, spec: ConvSpec) -> float:
    g = spec.groups
    one = ConvSpec(spec.in_size, spec.stride, spec.padding, spec.padding_mode, spec.dilation, 1)
    co = w.shape[0] // g
    return max(float(torch.linalg.svdvals(one.dense_operator(w[i * co:(i + 1) * co]))[0]) for i in range(g))


def test_exact_norm_of_a_depthwise_conv_is_its_largest_group_norm_without_the_whole_operator(monkeypatch):
    # the case: 16 channels at 16x16 took 51 s through the SVD of the 4096x4096 operator
    torch.manual_seed(1)
    w = torch.randn(16, 1, 3, 3, dtype=torch.float64)
    spec = ConvSpec((16, 16), 1, 1, "zeros", groups=16)
    truth = per_group_truth(w, spec)

    def refuse(*a, **k):
        raise AssertionError("the whole block-diagonal operator was built")
    monkeypatch.setattr(ConvSpec, "dense_operator", refuse)
    w.requires_grad_()
    value = exact_norm(w, spec)
    assert math.isclose(float(value.detach()), truth, rel_tol=1e-12)
    (grad,) = torch.autograd.grad(value, w)  # differentiable: only the maximising channel moves it
    assert int((grad.abs().sum((1, 2, 3)) > 0).sum()) == 1


@pytest.mark.parametrize("mult,stride,mode", [(1, 1, "zeros"), (2, 2, "zeros"), (1, 1, "reflect")])
def test_groups_too_large_for_dense_svds_are_iterated_only_where_they_can_hold_the_max(mult, stride, mode):
    torch.manual_seed(mult + stride)
    C, n = 12, 10
    scale = torch.logspace(-2, 0, C * mult, dtype=torch.float64)[:, None, None, None]
    w = torch.randn(C * mult, 1, 3, 3, dtype=torch.float64) * scale
    spec = ConvSpec((n, n), stride, 1, mode, groups=C)
    truth = per_group_truth(w, spec)
    sizes = []
    original = iterative.iterate

    def spy(op, X0, **kw):
        sizes.append(op.g)
        return original(op, X0, **kw)
    iterative.iterate = spy
    try:
        br = bracket(w, spec, tol=1e-6, dense_flops=0)  # no dense SVD: the iterative route per group
    finally:
        iterative.iterate = original
    assert br.how != "dense" and br.vector is not None and br.group is not None
    assert br.lower <= truth * (1 + 1e-12) and truth <= br.upper * (1 + 1e-12)
    assert br.upper <= br.lower * (1 + 1e-5)
    assert sizes and sizes[0] == 1 and sum(sizes) < C  # the top group alone first; most never iterated
    assert math.isclose(float(exact_norm(w, spec, dense_flops=0)), truth, rel_tol=1e-6)


# ----------------------------------------------------------------------------- budgets


def test_every_dense_path_estimates_its_memory_first_and_names_the_layer():
    w = torch.randn(32, 1, 3, 3, dtype=torch.float64)
    spec = ConvSpec((64, 64), 1, 1, groups=32)
    with pytest.raises(ResourceError, match=r"dense operator \(131072x131072\).*64x64 k3x3 s1 p1 zeros d1 g32.*GiB"):
        spec.dense_operator(w)
    with pytest.raises(ResourceError, match=r"32 group\(s\) \(4096x4096 each\)"):
        spec.group_operators(w)
    with pytest.raises(ResourceError, match="tap matrices"):
        ConvSpec((128, 128), 1, 1).spatial_taps((3, 3))
    small = ConvSpec((8, 8), 1, 1, groups=32)
    with pytest.raises(ResourceError, match="more than the memory budget of 1 KiB"):
        small.dense_operator(w, max_memory=1024)
    assert small.dense_operator(w, max_memory=math.inf).shape == (2048, 2048)


def test_a_budget_too_small_for_the_dense_svd_takes_the_next_certified_route():
    torch.manual_seed(3)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    spec = ConvSpec((8, 8), 1, 1)
    dense = bracket(w, spec, tol=1e-8)
    assert dense.how == "dense"
    one = spec.operator_bytes(w, whole=True)
    bracketing.RECENT.clear()  # else the bracket just searched is reused, with no memory at all
    other = bracket(w, spec, tol=1e-8, max_memory=one - 1)  # too small for the dense SVD
    assert other.how != "dense" and other.lower <= dense.upper and dense.lower <= other.upper


def test_huge_inputs_are_refused_before_allocating_and_size_independent_bounds_still_answer():
    w = torch.randn(16, 16, 3, 3, dtype=torch.float64)
    huge = ConvSpec((100_000, 100_000), 1, 1)
    for call in (lambda: fft_bound(w, huge), lambda: exact_norm(w, huge), lambda: norm_bracket(w, huge),
                 lambda: spectral_norm(w, huge, "gram"), lambda: spectral_norm(w, huge, "power")):
        with pytest.raises(ResourceError, match="100000x100000 k3x3"):
            call()
    # Fantastic Four does not depend on the input size (zero padding): it answers at any size
    assert float(fantastic_four(w, huge)) == float(fantastic_four(w, ConvSpec((16, 16), 1, 1)))
    # the upper end alone (no lower end wanted) falls back to it instead of refusing
    br = bracket(w, huge, lower=False)
    assert br.lower == 0 and br.how == "fantastic4" and br.upper == float(fantastic_four(w, huge))


def test_budget_reads_the_keyword_then_the_environment_then_the_2gib_default(monkeypatch):
    monkeypatch.delenv("SEPCONV_MEMORY_LIMIT", raising=False)
    assert validate.budget(None) <= 2 * 2**30 and validate.budget(123) == 123
    monkeypatch.setenv("SEPCONV_MEMORY_LIMIT", "8G")
    assert validate.budget(None) == 8 * 2**30
    monkeypatch.setenv("SEPCONV_MEMORY_LIMIT", "1K")
    with pytest.raises(ResourceError, match="set SEPCONV_MEMORY_LIMIT"):
        validate.check_memory(2048, "a test allocation")
    for bad in (0, -1, float("nan"), "2G", True):
        with pytest.raises(ConfigError, match="max_memory"):
            validate.budget(bad)


# ----------------------------------------------------------------------------- O(n) geometry, not O(n^2)


@pytest.mark.parametrize("mode", ["zeros", "circular", "reflect", "replicate"])
def test_band_and_padding_copies_in_closed_form_equal_the_dense_constructions(mode):
    import torch.nn.functional as F

    from sepconv.spectral.spec import _TORCH_PAD_MODE, pad_copies, tap_matrices_1d, tap_sources_1d

    for n in range(1, 9):
        for k, s, d in [(1, 1, 1), (3, 1, 1), (3, 2, 1), (2, 1, 2), (4, 3, 1)]:
            for lo in range(0, n + 1):
                for hi in range(0, n + 1):
                    if (mode == "reflect" and max(lo, hi) >= n) or n + lo + hi < d * (k - 1) + 1:
                        continue
                    P = tap_matrices_1d(n, k, s, d, lo, hi, mode)
                    assert certify.band_of(tap_sources_1d(n, k, s, d, lo, hi, mode)) == \
                        certify._band(torch.einsum("ayx,byz->abxz", P, P))
                    assert certify.band_of(tap_sources_1d(n, k, s, d, lo, hi, mode), "out") == \
                        certify._band(torch.einsum("ayx,bzx->abyz", P, P))
                    if mode != "zeros":
                        idx = torch.arange(n, dtype=torch.float64).reshape(1, 1, n)
                        padded = F.pad(idx, (lo, hi), mode=_TORCH_PAD_MODE[mode]).flatten().long()
                        assert pad_copies(n, lo, hi, mode) == int(torch.bincount(padded, minlength=n).max())


def test_the_certificate_takes_its_share_of_the_budget_whatever_the_budget():
    """The banded Cholesky certificate runs when its memory is at most CERTIFICATE_SHARE of the budget
    (so a larger $SEPCONV_MEMORY_LIMIT certifies larger layers), else the upper end is a majorant."""
    torch.manual_seed(5)
    w = torch.randn(6, 6, 3, 3, dtype=torch.float64)
    spec = ConvSpec((12, 12), 1, 1)
    _, need = certify.certificate_cost(w, spec)
    share = bracketing.CERTIFICATE_SHARE
    assert bracketing.CERTIFICATE_BYTES == share * validate.MAX_MEMORY  # 1.5 GB under the default 2 GiB
    results = {}
    for label, limit in (("fits", need / share * 1.01), ("too small", need / share * 0.99)):
        bracketing.RECENT.clear()
        results[label] = bracket(w, spec, tol=1e-8, max_memory=limit, dense_flops=0)
    assert results["fits"].how == "cholesky" and results["too small"].how != "cholesky"
    assert results["too small"].lower <= results["fits"].upper and results["fits"].lower <= results["too small"].upper
