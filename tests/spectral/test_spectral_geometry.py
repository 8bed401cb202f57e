"""Ground truth: the dense operator matrix and its SVD in float64, on random geometries.

Every padding mode, strides 1-3, dilation, groups (incl. depthwise and depth multiplier),
rectangular kernels and non-square inputs; each hypothesis example is one geometry.
"""

from __future__ import annotations

import contextlib

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sepconv.errors import ConfigError
from sepconv.spectral import (
    ConvSpec,
    bracket,
    exact_norm,
    fantastic_four,
    fantastic_four_terms,
    fft_bound,
    fourier,
    gram_iteration,
    power_iteration,
    singular_values,
)

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
                derandomize=True)


@st.composite
def geometries(draw, circulant: bool | None = None):
    """A random small conv: ``(weight (float64), spec)``, valid for PyTorch."""
    kind = draw(st.sampled_from(["dense", "grouped", "depthwise", "multiplier"]))
    g = {"dense": 1, "grouped": draw(st.integers(2, 3)), "depthwise": draw(st.integers(1, 4)),
         "multiplier": draw(st.integers(1, 3))}[kind]
    ci = 1 if kind in ("depthwise", "multiplier") else draw(st.integers(1, 3))
    co = {"depthwise": 1, "multiplier": draw(st.integers(2, 3))}.get(kind, draw(st.integers(1, 3)))
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    sh, sw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    dh, dw = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    circ = draw(st.booleans()) if circulant is None else circulant
    if circ:  # circular padding aligned with the input, stride dividing it
        eh, ew = dh * (kh - 1), dw * (kw - 1)
        lo_h, lo_w = draw(st.integers(0, eh)), draw(st.integers(0, ew))
        pads = (lo_h, eh - lo_h, lo_w, ew - lo_w)
        H = sh * draw(st.integers(max(1, -(-max(eh, lo_h) // sh)), max(1, 8 // sh)))
        W = sw * draw(st.integers(max(1, -(-max(ew, lo_w) // sw)), max(1, 8 // sw)))
        spec = ConvSpec((H, W), (sh, sw), pads, "circular", (dh, dw), g)
    else:
        mode = draw(st.sampled_from(["zeros", "zeros", "circular", "reflect", "replicate"]))
        H, W = draw(st.integers(3, 8)), draw(st.integers(3, 8))
        if draw(st.integers(0, 4)) == 0 and (sh, sw) == (1, 1) and mode != "circular":
            pads = "same"
        else:
            pads = tuple(draw(st.integers(0, 3)) for _ in range(4))
        spec = ConvSpec((H, W), (sh, sw), pads, mode, (dh, dw), g)
    seed = draw(st.integers(0, 2**31 - 1))
    w = torch.randn(g * co, ci, kh, kw, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    try:
        spec.check(w)
    except ConfigError:
        from hypothesis import assume

        assume(False)
    return w, spec


@contextlib.contextmanager
def certified_path():
    """Every multi-row circulant block problem through the Cholesky-certified path of
    ``fourier.block_max`` (small ones otherwise take a plain eigvalsh)."""
    old = fourier.SMALL_BLOCK, fourier.EIG_WORK
    fourier.SMALL_BLOCK, fourier.EIG_WORK = 1, 0
    try:
        yield
    finally:
        fourier.SMALL_BLOCK, fourier.EIG_WORK = old


def dense_sigma(w, spec) -> torch.Tensor:
    return torch.linalg.svdvals(spec.dense_operator(w))


@settings(max_examples=250, **SETTINGS)
@given(geometries())
def test_exact_matches_dense_svd_and_every_bound_holds_for_any_geometry(case):
    w, spec = case
    sv = dense_sigma(w, spec)
    sigma = float(sv[0])
    # exact, forcing the iterative + certificate path for non-circulant geometries
    assert abs(float(exact_norm(w, spec, dense_flops=0)) - sigma) <= 1e-6 * sigma
    assert abs(float(exact_norm(w, spec)) - sigma) <= 1e-6 * sigma
    with certified_path():
        assert abs(float(exact_norm(w, spec)) - sigma) <= 1e-6 * sigma
    br = bracket(w, spec, tol=1e-6, dense_flops=0)
    assert br.lower <= sigma * (1 + 1e-12) and br.upper >= sigma * (1 - 1e-12)
    for bound in (fft_bound(w, spec), gram_iteration(w, spec), fantastic_four(w, spec), *fantastic_four_terms(w, spec)):
        assert float(bound) >= sigma * (1 - 1e-10)
    assert float(power_iteration(w, spec, iters=5)[0]) <= sigma * (1 + 1e-10)


@settings(max_examples=150, **SETTINGS)
@given(geometries(circulant=True))
def test_singular_values_equal_the_dense_spectrum_for_circulant_geometries(case):
    w, spec = case
    sv = dense_sigma(w, spec)
    ours = singular_values(w, spec)
    assert ours.shape == sv.shape
    torch.testing.assert_close(ours, sv, rtol=0, atol=1e-9 * float(sv[0]))
    assert abs(float(exact_norm(w, spec)) - float(sv[0])) <= 1e-9 * float(sv[0])
    br = bracket(w, spec, tol=1e-9)
    how = "pointwise" if tuple(w.shape[-2:]) == (1, 1) and not any(spec.pads((1, 1))) else "circulant"
    assert br.how == how and br.lower <= float(sv[0]) * (1 + 1e-12) and float(sv[0]) <= br.upper


@settings(max_examples=60, **SETTINGS)
@given(geometries())
def test_dense_operator_and_adjoint_are_what_conv2d_computes(case):
    w, spec = case
    c_in = w.shape[1] * spec.groups
    D = c_in * spec.in_size[0] * spec.in_size[1]
    eye = torch.eye(D, dtype=w.dtype).reshape(D, c_in, *spec.in_size)
    literal = spec.apply(eye, w).reshape(D, -1).T
    torch.testing.assert_close(spec.dense_operator(w), literal, rtol=0, atol=1e-12)
    x = torch.randn(2, c_in, *spec.in_size, dtype=w.dtype)
    y = torch.randn_like(spec.apply(x, w))
    lhs = (spec.apply(x, w) * y).sum()
    rhs = (x * spec.adjoint(y, w)).sum()
    assert abs(float(lhs - rhs)) <= 1e-10 * (1 + abs(float(lhs)))


@st.composite
def pointwise_geometries(draw):
    """A random 1x1 conv: any stride, padding (mode and amount), groups, size."""
    g = draw(st.integers(1, 3))
    ci, co = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    H, W = draw(st.integers(1, 7)), draw(st.integers(1, 7))
    mode = draw(st.sampled_from(["zeros", "zeros", "circular", "reflect", "replicate"]))
    pads = tuple(draw(st.integers(0, 2)) for _ in range(4))
    spec = ConvSpec((H, W), (draw(st.integers(1, 3)), draw(st.integers(1, 3))), pads, mode,
                    (draw(st.integers(1, 2)), 1), g)
    w = torch.randn(g * co, ci, 1, 1, generator=torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1))),
                    dtype=torch.float64)
    try:
        spec.check(w)
    except ConfigError:
        from hypothesis import assume

        assume(False)
    return w, spec


@settings(max_examples=200, **SETTINGS)
@given(pointwise_geometries())
def test_a_1x1_conv_with_zero_padding_is_its_matrix_norm_at_any_stride(case):
    """The ``pointwise`` route (``||T|| = ||W||_2``, one SVD per group) against the dense operator's
    SVD, and its gradient against the dense one's; other paddings take the other routes."""
    from sepconv.spectral.bracketing import is_pointwise

    w, spec = case
    sigma = float(dense_sigma(w, spec)[0])
    br = bracket(w, spec, tol=1e-6)
    assert br.lower <= sigma * (1 + 1e-12) and br.upper >= sigma * (1 - 1e-12)
    assert (br.how == "pointwise") == is_pointwise(spec, (1, 1))
    if br.how == "pointwise":
        assert br.upper - br.lower <= 1e-12 * max(sigma, 1e-300) and sigma > 0
        if spec.padding_mode != "zeros":
            assert not any(spec.pads((1, 1)))
        wg = w.clone().requires_grad_(True)
        exact_norm(wg, spec).backward()
        wd = w.clone().requires_grad_(True)
        torch.linalg.svdvals(spec.dense_operator(wd))[0].backward()
        gap = torch.linalg.svdvals(w.reshape(spec.groups, -1, w.shape[1])).sort(descending=True).values.flatten()
        if len(gap) < 2 or float(gap[0] - gap[1]) > 1e-6:  # a simple top singular value: one gradient
            torch.testing.assert_close(wg.grad, wd.grad, rtol=1e-7, atol=1e-9)
    assert abs(float(exact_norm(w, spec)) - sigma) <= 1e-6 * max(sigma, 1e-300) or sigma == 0


@settings(max_examples=80, **SETTINGS)
@given(geometries())
def test_grouped_convs_through_the_cost_based_dispatch_match_the_dense_svd(case):
    """With the always-dense threshold off, grouped convs with matrix blocks take whichever route the
    cost model picks (the whole operator's search where cheaper): still within 1e-6 of the dense truth."""
    from sepconv.spectral import bracketing

    w, spec = case
    old = bracketing.GROUPED_DENSE_ALWAYS
    bracketing.GROUPED_DENSE_ALWAYS = 0
    try:
        sigma = float(dense_sigma(w, spec)[0])
        assert abs(float(exact_norm(w, spec)) - sigma) <= 1e-6 * sigma
        br = bracket(w, spec, tol=1e-6)
        assert br.lower <= sigma * (1 + 1e-12) and br.upper >= sigma * (1 - 1e-12)
    finally:
        bracketing.GROUPED_DENSE_ALWAYS = old


def test_a_mid_size_grouped_conv_takes_the_whole_operator_search_and_is_certified():
    """The issue's case, 64->64 in 8 groups at 8x8: the per-group dense SVDs would cost ~3e9 flops,
    the whole operator's certified search ~4e8; the truth from the groups' own dense SVDs."""
    from sepconv.spectral.bracketing import _whole_is_cheaper

    w = torch.randn(64, 8, 3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    spec = ConvSpec((8, 8), 1, 1, "zeros", 1, 8)
    assert _whole_is_cheaper(w, spec, (3, 3), 2e11, 2**31)
    truth = float(torch.linalg.svdvals(spec.group_operators(w, torch.arange(8)))[:, 0].max())
    br = bracket(w, spec, tol=1e-4)
    assert br.how == "cholesky" and br.lower <= truth * (1 + 1e-12) <= br.upper * (1 + 2e-12)
    assert br.upper <= br.lower * (1 + 1e-4) * (1 + 1e-12)
    depthwise = torch.randn(64, 1, 3, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert bracket(depthwise, ConvSpec((8, 8), 1, 1, "zeros", 1, 64), tol=1e-4).how == "dense"  # vector blocks


@settings(max_examples=120, **SETTINGS)
@given(geometries(), st.sampled_from(["in", "out"]))
def test_banded_gram_on_either_side_is_the_dense_gram_and_its_certificate_decides_at_sigma(case, side):
    """Both Gram operators ``T^T T`` and ``T T^T`` as block-banded matrices equal the dense ones
    (per group, rows ordered ``(h, c, w)``), their bands are the closed-form ones, and the banded
    Cholesky certificate accepts ``mu`` just above ``sigma^2`` and refuses it just below -- the
    certificate of every non-circulant bracket, checked for every geometry kind in float64."""
    from sepconv.spectral import certify

    w, spec = case
    bg = certify.BandedGram(w, spec, side=side)
    g, (kh, kw) = spec.groups, w.shape[-2:]
    T = spec.dense_operator(w)
    Hout, Wout = spec.out_size((kh, kw))
    co, ci = w.shape[0] // g, w.shape[1]
    blocks = []
    for gi in range(g):  # rows ordered (c, h, w) in the dense operator: reorder to (h, c, w)
        Tg = T.reshape(g, co, Hout, Wout, g, ci, *spec.in_size)[gi, :, :, :, gi]
        if side == "in":
            Tg = Tg.permute(0, 1, 2, 4, 3, 5).reshape(co * Hout * Wout, spec.in_size[0] * ci * spec.in_size[1])
            blocks.append(Tg.T @ Tg)
        else:
            Tg = Tg.permute(1, 0, 2, 3, 4, 5).reshape(Hout * co * Wout, ci * spec.in_size[0] * spec.in_size[1])
            blocks.append(Tg @ Tg.T)
    torch.testing.assert_close(bg.dense(), torch.stack(blocks), rtol=0, atol=1e-12)
    assert bg.band == certify.band_of(certify._row_sources(w, spec), side)  # the closed form
    lam = torch.linalg.eigvalsh(torch.stack(blocks))[:, -1]
    top = float(lam.max())
    if top > 1e-6:
        assert bool(certify.cholesky_certificate(bg, top * (1 + 1e-6)).all())
        assert not bool(certify.cholesky_certificate(bg, top * (1 - 1e-6)).all())
        # per group: a group whose top eigenvalue sits below mu is certified on its own
        mu = top * (1 - 1e-6)
        got = certify.cholesky_certificate(bg, mu)
        first_bad = int((lam >= mu).nonzero()[0])
        assert got[:first_bad].tolist() == (lam[:first_bad] < mu * (1 - 1e-9)).tolist()
