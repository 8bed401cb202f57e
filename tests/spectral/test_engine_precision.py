"""LOBPCG with a float32 phase (:func:`sepconv.spectral.iterative.iterate`): faster, and still what the
float64 iteration promises -- Rayleigh quotients of the float64 operator meeting the residual rule."""

from __future__ import annotations

import pytest
import torch

from sepconv.spectral import ConvSpec, bracket, iterative


def _case(seed=0, c=6, n=9, stride=1):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(c, c, 3, 3, generator=g, dtype=torch.float64)
    return w, ConvSpec((n, n), stride, 1, "zeros", 1, 1)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("rtol", [1e-3, 1e-5, 1e-7])
def test_iterate_meets_the_float64_residual_rule_with_float64_rayleigh_quotients(seed, rtol):
    w, spec = _case(seed, stride=1 + seed % 2)
    op = iterative.GramOperator(w, spec)
    ritz = iterative.iterate(op, iterative.random_block(op, 4, seed), rtol=rtol, max_iter=500)
    assert ritz.theta.dtype == ritz.X.dtype == torch.float64
    A = spec.dense_operator(w)
    G = A.T @ A
    X = ritz.X[0]
    torch.testing.assert_close(X.T @ X, torch.eye(X.shape[1], dtype=torch.float64), rtol=0, atol=1e-10)
    # values: Rayleigh quotients of the float64 operator -- below the truth, with the residuals reported
    torch.testing.assert_close(ritz.theta[0], torch.diagonal(X.T @ G @ X), rtol=1e-12, atol=0)
    res = (G @ X - X * ritz.theta[0]).norm(dim=0)
    torch.testing.assert_close(ritz.residual[0], res, rtol=1e-6, atol=1e-12 * float(ritz.theta[0, 0]))
    truth = float(torch.linalg.eigvalsh(G)[-1])
    assert float(ritz.theta[0, 0]) <= truth * (1 + 1e-12)
    assert float(res[0]) <= rtol * float(ritz.theta[0, 0])  # the residual rule, checked in float64
    assert truth - float(ritz.theta[0, 0]) <= truth * max(rtol, 1e-9)  # converged to the top eigenvalue


def test_a_float32_phase_runs_only_where_float32_reaches_the_residual(monkeypatch):
    dtypes = []
    inner = iterative.lobpcg

    def spy(op, X0, *args, **kw):
        dtypes.append(op.weight.dtype)
        return inner(op, X0, *args, **kw)
    monkeypatch.setattr(iterative, "lobpcg", spy)
    w, spec = _case()
    op = iterative.GramOperator(w, spec)
    iterative.iterate(op, iterative.random_block(op, 3), rtol=iterative.FLOAT32_RTOL)
    assert dtypes == [torch.float32, torch.float64]
    dtypes.clear()
    iterative.iterate(op, iterative.random_block(op, 3), rtol=iterative.FLOAT32_RTOL / 2)
    assert dtypes == [torch.float64]


def test_brackets_through_the_float32_phase_stay_certified_and_tight():
    for seed in range(6):
        w, spec = _case(seed, c=5, n=8, stride=1 + seed % 2)
        sigma = float(torch.linalg.svdvals(spec.dense_operator(w))[0])
        br = bracket(w, spec, tol=1e-4, dense_flops=0)
        assert br.how == "cholesky"
        assert br.lower <= sigma * (1 + 1e-12) <= br.upper * (1 + 2e-12) <= br.lower * (1 + 1e-4) * (1 + 3e-12)
