"""The engine's memory of recent brackets: a multiple of a solved weight is certified without a search."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sepconv.spectral import ConvSpec, analyze, bracket, bracketing, lipschitz_bound


@pytest.fixture
def searches(monkeypatch):
    calls = []
    inner = bracketing._solve

    def counted(*args, **kw):
        calls.append(args[1])
        return inner(*args, **kw)
    monkeypatch.setattr(bracketing, "_solve", counted)
    return calls


def _case(seed=0, mode="zeros"):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(4, 3, 3, 3, generator=g, dtype=torch.float64)
    return w, ConvSpec((7, 6), 1, 1, mode, 1, 1)


@pytest.mark.parametrize("mode", ["zeros", "reflect", "replicate"])
def test_a_multiple_of_a_solved_weight_is_certified_without_a_search(searches, mode):
    w, spec = _case(mode=mode)
    first = bracket(w, spec, tol=1e-6, dense_flops=0)
    assert len(searches) == 1
    for c in (0.5, -3.0):
        br = bracket(c * w, spec, tol=1e-6, dense_flops=0)
        sigma = float(torch.linalg.svdvals(spec.dense_operator(c * w))[0])
        assert br.lower <= sigma <= br.upper
        assert br.lower == pytest.approx(abs(c) * first.lower, rel=1e-9)
        assert br.upper == pytest.approx(abs(c) * first.upper, rel=1e-9) and br.how == first.how
    assert len(searches) == 1


def test_a_changed_weight_is_searched_again_and_never_gets_a_stale_bracket(searches):
    w, spec = _case()
    bracket(w, spec, tol=1e-6, dense_flops=0)
    w2 = w.clone()
    w2[0, 0, 1, 1] += 1e-6  # not a multiple of w
    br = bracket(w2, spec, tol=1e-6, dense_flops=0)
    sigma = float(torch.linalg.svdvals(spec.dense_operator(w2))[0])
    assert len(searches) == 2 and br.lower <= sigma <= br.upper
    w.mul_(2).add_(_case(seed=1)[0])  # in place: the kept copy is not the tensor
    br = bracket(w, spec, tol=1e-6, dense_flops=0)
    sigma = float(torch.linalg.svdvals(spec.dense_operator(w))[0])
    assert len(searches) == 3 and br.lower <= sigma * (1 + 1e-12) and br.upper >= sigma * (1 - 1e-12)
    bracket(w, spec, tol=1e-5, dense_flops=0)  # another tolerance: another search
    bracket(w, ConvSpec((7, 7), 1, 1, "zeros", 1, 1), tol=1e-6, dense_flops=0)  # another geometry
    assert len(searches) == 5


def test_the_memory_keeps_at_most_its_budget(monkeypatch):
    monkeypatch.setattr(bracketing, "RECENT_BYTES", 3 * 4 * 3 * 3 * 3 * 8)  # three weights
    for seed in range(5):
        w, spec = _case(seed)
        bracket(w, spec, tol=1e-6, dense_flops=0)
    assert bracketing.RECENT.nbytes <= bracketing.RECENT_BYTES
    assert sum(len(v) for v in bracketing.RECENT.entries.values()) == 3


def test_the_network_bound_reuses_what_analyze_searched_on_a_default_initialised_network(searches):
    """conv + BatchNorm at its initial statistics: the merged chain is the conv times 1/sqrt(1 + eps)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 8, 3, padding=1, stride=2, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Flatten(), nn.Linear(8 * 6 * 6, 3)).eval()
    records = analyze(net, (3, 12, 12), methods=["exact", "upper"], tol=1e-4)
    n = len(searches)
    assert n >= 2
    L = lipschitz_bound(net, (3, 12, 12), tol=1e-4)
    assert len(searches) == n  # nothing searched again
    product = 1.0
    for r in records:
        product *= r.values["upper"]
    assert L == pytest.approx(product / (1 + 1e-5), rel=1e-6)  # the BatchNorm scale, rounded in float32


def test_a_float32_weight_widened_to_float64_is_kept_at_float32_size(searches):
    """analyze widens a float32 model's weights to float64: the kept copy is float32 (exactly the same
    values, half the bytes: every 3x3 conv of a ResNet-50 fits the memory), and still serves the weight."""
    w, spec = _case(seed=3)
    w = w.float().double()  # float32 values
    first = bracket(w, spec, tol=1e-6, dense_flops=0)
    assert bracketing.RECENT.nbytes == w.numel() * 4
    assert bracket(w, spec, tol=1e-6, dense_flops=0) is first and len(searches) == 1
    v, _ = _case(seed=4)  # not float32 values: kept as they are
    bracket(v, spec, tol=1e-6, dense_flops=0)
    assert bracketing.RECENT.nbytes == w.numel() * 4 + v.numel() * 8
