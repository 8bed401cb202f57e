"""Methods, gradients, special structure and bad input of sepconv.spectral."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from sepconv.errors import ConfigError, UnsupportedLayerError
from sepconv.spectral import (
    ConvSpec,
    bracket,
    circulant_norm,
    depthwise_channel_norms,
    depthwise_norm,
    depthwise_norms,
    exact_norm,
    fantastic_four,
    fft_bound,
    fourier,
    gram_iteration,
    norm_bracket,
    power_iteration,
    reshape_norm,
    singular_values,
    spectral_norm,
)


def rand(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def dense_sigma(w, spec):
    return float(torch.linalg.svdvals(spec.dense_operator(w))[0])


# ----------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("fn", [
    lambda w, s: fft_bound(w, s),
    lambda w, s: gram_iteration(w, s, iters=4),
    lambda w, s: fantastic_four(w, s),
], ids=["fft", "gram", "fantastic4"])
@pytest.mark.parametrize("spec", [
    ConvSpec((6, 6), 1, 1, "zeros"),
    ConvSpec((6, 4), (2, 1), (1, 1, 0, 2), "zeros", (1, 2), 2),
    ConvSpec((6, 6), 2, 1, "circular"),
], ids=["zeros", "strided-dilated-grouped", "circular"])
def test_certified_bounds_pass_gradcheck(fn, spec):
    w = rand(4, 2 if spec.groups == 1 else 1, 3, 3, seed=1).requires_grad_()
    if spec.groups == 2:
        w = rand(4, 1, 3, 3, seed=1).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: fn(x, spec), (w,), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("spec, shape", [
    (ConvSpec((6, 6), 1, 1, "circular"), (3, 2, 3, 3)),
    (ConvSpec((8, 6), (2, 3), (1, 1, 1, 1), "circular"), (3, 2, 3, 3)),
    (ConvSpec((8, 8), 2, (1, 2, 1, 2), "circular", groups=4), (4, 1, 4, 4)),  # depthwise, stride alias
    (ConvSpec((6, 6), 1, 0, "zeros", groups=2), (6, 1, 1, 1)),  # pointwise: circulant for any mode
])
def test_circulant_exact_passes_gradcheck(spec, shape):
    w = rand(*shape, seed=2).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: circulant_norm(x, spec), (w,), eps=1e-6, atol=1e-5)


def test_exact_gradient_for_zero_padding_is_that_of_the_dense_top_singular_value():
    spec = ConvSpec((6, 5), 1, 1, "zeros")
    w = rand(3, 2, 3, 3, seed=3).requires_grad_()
    (g_ours,) = torch.autograd.grad(exact_norm(w, spec, dense_flops=0), w)
    (g_dense,) = torch.autograd.grad(torch.linalg.svdvals(spec.dense_operator(w))[0], w)
    torch.testing.assert_close(g_ours, g_dense, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- structure


def test_depthwise_closed_form_is_max_abs_fft_with_stride_aliases():
    C, n, s = 5, 12, 2
    w = rand(C, 1, 3, 3, seed=4)
    spec = ConvSpec((n, n), s, 1, "circular", groups=C)
    power = torch.fft.fft2(w[:, 0], s=(n, n)).abs() ** 2  # (C, n, n)
    alias = power.reshape(C, s, n // s, s, n // s).mean((1, 3))  # (1/s^2) sum over the s^2 aliases
    expected = float(alias.max().sqrt())
    assert abs(float(depthwise_norm(w, spec)) - expected) <= 1e-12 * expected
    assert abs(dense_sigma(w, spec) - expected) <= 1e-9 * expected


def test_batched_depthwise_norms_match_per_layer_values_and_pass_gradcheck():
    specs = [ConvSpec((8, 8), 1, 1, "circular", groups=3), ConvSpec((8, 8), 2, 1, "circular", groups=2),
             ConvSpec((8, 8), 1, 1, "circular", groups=4), ConvSpec((7, 6), 1, 1, "zeros", groups=2),
             ConvSpec((8, 8), 1, 2, "circular", dilation=2, groups=2)]
    ws = [rand(3, 1, 3, 3, seed=20), rand(2, 1, 3, 3, seed=21), rand(8, 1, 3, 3, seed=22),  # multiplier 2
          rand(2, 1, 3, 3, seed=23), rand(2, 1, 3, 3, seed=24)]
    got = depthwise_norms(ws, specs)
    for i in (0, 1, 2, 4):
        assert math.isclose(float(got[i]), dense_sigma(ws[i], specs[i]), rel_tol=1e-9)
    assert math.isclose(float(got[3]), float(fft_bound(ws[3], specs[3])), rel_tol=1e-6)
    assert float(got[3]) >= dense_sigma(ws[3], specs[3])
    params = tuple(w.clone().requires_grad_() for w in ws)
    # with a graph, each channel is evaluated at its peak frequency only: the same values
    for a, b in zip(depthwise_channel_norms(list(params), specs), depthwise_channel_norms(ws, specs)):
        assert a.requires_grad and torch.allclose(a, b, rtol=1e-12, atol=0)
    assert torch.autograd.gradcheck(lambda *p: depthwise_norms(list(p), specs), params, eps=1e-6, atol=1e-5)


def test_grouped_norm_is_the_max_over_groups_not_a_product():
    spec = ConvSpec((6, 6), 1, 1, "circular", groups=2)
    w = rand(4, 3, 3, 3, seed=5)
    w[2:] *= 0.5  # a weaker second group
    per_group = [float(circulant_norm(w[2 * i:2 * i + 2], ConvSpec((6, 6), 1, 1, "circular"))) for i in range(2)]
    assert math.isclose(float(circulant_norm(w, spec)), max(per_group), rel_tol=1e-12)


def test_pointwise_norm_is_the_matrix_norm_for_every_padding_mode_and_stride():
    w = rand(6, 4, 1, 1, seed=6)
    P = float(torch.linalg.matrix_norm(w[:, :, 0, 0], ord=2))
    for mode in ("zeros", "reflect", "replicate", "circular"):
        spec = ConvSpec((6, 6), 2, 0, mode)
        assert math.isclose(float(exact_norm(w, spec)), P, rel_tol=1e-12)
        assert math.isclose(float(reshape_norm(w)), P, rel_tol=1e-12)


def test_block_max_certifies_large_blocks_without_full_eigendecomposition(monkeypatch):
    # m > SMALL_BLOCK takes the Cholesky path; tiny chunks exercise the memory-bounded loop
    kernel = fourier.circulant_kernel(rand(24, 20, 3, 3, seed=7), (1, 1), (1, 1), 1)
    grid = (7, 6)
    fh, fw = fourier.unique_frequencies(grid)
    plan = fourier.gram_plan(kernel, fh.numel())
    lam = torch.linalg.eigvalsh(fourier.gram_blocks(kernel, grid, fh, fw, plan))[..., -1].max()
    monkeypatch.setattr(fourier, "CHUNK_BYTES", 20 * 20 * 16 * 3)
    monkeypatch.setattr(fourier, "CERTIFY_BYTES", 20 * 20 * 16 * 3)
    monkeypatch.setattr(fourier, "EIG_WORK", 0)
    top = fourier.block_max(kernel, grid, tol=1e-9)
    assert top.value <= float(lam) * (1 + 1e-12) and top.upper >= float(lam)
    assert abs(top.value - float(lam)) <= 1e-10 * float(lam)


def test_spatial_and_frequency_gram_routes_agree():
    kernel = fourier.circulant_kernel(rand(5, 3, 3, 2, seed=8), (2, 1), (1, 2), 1)
    grid = (4, 9)
    fh, fw = fourier.all_frequencies(grid)
    for side in ("in", "out"):
        m = kernel.shape[2] if side == "in" else kernel.shape[1]
        a = fourier.gram_blocks(kernel, grid, fh, fw, fourier.GramPlan(side, m, True))
        b = fourier.gram_blocks(kernel, grid, fh, fw, fourier.GramPlan(side, m, False))
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_bracket_for_zero_padding_is_certified_by_cholesky_and_tight():
    spec = ConvSpec((7, 6), 1, 1, "zeros")
    w = rand(12, 10, 3, 3, seed=9)
    sigma = dense_sigma(w, spec)
    br = bracket(w, spec, tol=1e-6, dense_flops=0)
    assert br.how == "cholesky"
    assert br.lower <= sigma <= br.upper <= br.lower * (1 + 1e-6) * (1 + 1e-12)
    # the circular embedding alone is loose at this size
    assert float(fft_bound(w, spec)) > sigma * 1.001
    lo, up = norm_bracket(w, spec)
    assert float(lo) <= sigma <= float(up)


def test_fft_at_the_input_size_is_not_a_bound_but_the_embedding_is():
    # reference/spectral.md Sec. 2: the zero-padded norm can exceed FFT(N = n)
    found = False
    for seed in range(40):
        w = rand(1, 1, 3, 3, seed=seed)
        zero = ConvSpec((5, 5), 1, 1, "zeros")
        sigma = dense_sigma(w, zero)
        at_n = float(circulant_norm(w, ConvSpec((5, 5), 1, 1, "circular")))
        assert float(fft_bound(w, zero)) >= sigma * (1 - 1e-12)
        found |= sigma > at_n * (1 + 1e-6)
    assert found


def test_power_iteration_is_a_lower_estimate_that_resumes_from_its_vector():
    spec = ConvSpec((8, 8), 1, 1, "zeros")
    w = rand(6, 6, 3, 3, seed=10)
    sigma = dense_sigma(w, spec)
    s1, x = power_iteration(w, spec, iters=3, generator=torch.Generator().manual_seed(0))
    s2, x = power_iteration(w, spec, iters=500, x=x)
    assert float(s1) <= float(s2) <= sigma * (1 + 1e-12)
    assert float(s2) >= sigma * (1 - 1e-3)


def test_reshape_norm_is_what_torch_spectral_norm_divides_by():
    conv = nn.Conv2d(4, 6, 3, padding=1, bias=False).double()
    with torch.no_grad():
        conv.weight.copy_(rand(6, 4, 3, 3, seed=11))
    w = conv.weight.detach().clone()
    sn = nn.utils.parametrizations.spectral_norm(conv, n_power_iterations=200)
    sn.train()
    sn(torch.zeros(1, 4, 5, 5, dtype=torch.float64))
    ratio = float(w.flatten()[0] / sn.weight.detach().flatten()[0])
    assert math.isclose(ratio, float(reshape_norm(w)), rel_tol=1e-8)


def test_reshape_norm_is_neither_a_bound_nor_exact_for_depthwise():
    spec = ConvSpec((16, 16), 1, 1, "circular", groups=16)
    deltas = torch.zeros(16, 1, 3, 3, dtype=torch.float64)
    deltas[:, 0, 1, 1] = 1  # identity: true norm 1, reshape sqrt(C) = 4
    assert math.isclose(float(circulant_norm(deltas, spec)), 1.0) and math.isclose(float(reshape_norm(deltas)), 4.0)
    single = torch.zeros(1, 1, 3, 3, dtype=torch.float64) + 1 / 3
    spec1 = ConvSpec((16, 16), 1, 1, "circular")
    assert math.isclose(float(reshape_norm(single)), 1.0) and math.isclose(float(circulant_norm(single, spec1)), 3.0)


def test_spec_of_matches_the_module_for_every_padding_form():
    torch.manual_seed(0)
    convs = [
        nn.Conv2d(4, 6, (2, 4), padding="same", dilation=(1, 2)),
        nn.Conv2d(4, 6, 3, stride=2, padding=1, padding_mode="reflect"),
        nn.Conv2d(4, 8, 3, padding=(2, 1), padding_mode="replicate", groups=4),
        nn.Conv2d(4, 4, 3, padding=1, padding_mode="circular", groups=4),
        nn.Conv2d(4, 6, 5, stride=(1, 2), padding="valid", dilation=2),
    ]
    x = torch.randn(2, 4, 11, 10)
    for conv in convs:
        spec = ConvSpec.of(conv, (11, 10))
        expected = conv(x) - (conv.bias[None, :, None, None] if conv.bias is not None else 0)
        torch.testing.assert_close(spec.apply(x, conv.weight), expected, rtol=1e-5, atol=1e-5)


def test_spectral_norm_dispatches_every_method():
    spec = ConvSpec((6, 6), 1, 1, "zeros")
    w = rand(3, 3, 3, 3, seed=12)
    sigma = dense_sigma(w, spec)
    vals = {m: float(spectral_norm(w, spec, m)) for m in ("exact", "fft", "gram", "fantastic4", "power", "reshape")}
    assert math.isclose(vals["exact"], sigma, rel_tol=1e-6)
    assert vals["fft"] >= sigma and vals["gram"] >= vals["fft"] * (1 - 1e-9) and vals["fantastic4"] >= sigma
    assert vals["power"] <= sigma * (1 + 1e-12)
    assert spectral_norm(w, spec).dim() == 0


def test_norm_bracket_in_float32_still_brackets_the_float64_value():
    spec = ConvSpec((6, 5), 1, 1, "zeros")
    w = rand(4, 3, 3, 3, seed=14)
    sigma = dense_sigma(w, spec)
    lo, up = norm_bracket(w.float(), spec, tol=1e-6)
    assert lo.dtype == up.dtype == torch.float32
    assert float(lo) <= sigma <= float(up)


def test_float32_weights_give_float32_results_close_to_float64():
    spec = ConvSpec((8, 8), 1, 1, "circular")
    w = rand(16, 16, 3, 3, seed=13)
    for m in ("exact", "fft", "gram", "fantastic4"):
        v32 = spectral_norm(w.float(), spec, m)
        assert v32.dtype == torch.float32
        assert math.isclose(float(v32), float(spectral_norm(w, spec, m)), rel_tol=1e-5)


# ----------------------------------------------------------------------------- bad input


def test_bad_input_gets_a_clear_error():
    spec = ConvSpec((6, 6), 1, 1)
    w = rand(2, 2, 3, 3)
    for bad in (float("nan"), float("inf")):
        w2 = w.clone()
        w2[0, 0, 0, 0] = bad
        with pytest.raises(ConfigError, match="NaN or Inf"):
            spectral_norm(w2, spec)
    with pytest.raises(ConfigError, match="larger than the padded input"):
        spectral_norm(rand(2, 2, 9, 9), spec)
    with pytest.raises(ConfigError, match="circular 'same'"):
        spectral_norm(rand(2, 2, 2, 2), ConvSpec((6, 6), 1, "same", "circular"))
    with pytest.raises(ConfigError, match="not divisible by groups"):
        spectral_norm(rand(3, 1, 3, 3), ConvSpec((6, 6), 1, 1, groups=2))
    with pytest.raises(ConfigError, match="unknown method"):
        spectral_norm(w, spec, method="svd")
    with pytest.raises(ConfigError, match="reflect padding"):
        spectral_norm(w, ConvSpec((3, 3), 1, 3, "reflect"))
    with pytest.raises(ConfigError, match="4-D"):
        spectral_norm(rand(2, 2, 3), spec)
    with pytest.raises(ConfigError, match="stride 1"):
        ConvSpec((6, 6), 2, "same")
    with pytest.raises(ConfigError, match="padding_mode"):
        ConvSpec((6, 6), padding_mode="mirror")
    with pytest.raises(ConfigError, match="not a circulant"):
        circulant_norm(w, spec)
    with pytest.raises(ConfigError, match="too large for a dense SVD"):
        singular_values(rand(2, 2, 3, 3), ConvSpec((64, 64), 1, 1), dense_limit=1e3)
    for module in (nn.ConvTranspose2d(2, 2, 3), nn.Conv3d(2, 2, 3), nn.Conv1d(2, 2, 3), nn.Linear(2, 2)):
        with pytest.raises(UnsupportedLayerError, match=type(module).__name__):
            ConvSpec.of(module, (6, 6))


@pytest.mark.parametrize("stride,mult,mode", [(1, 1, "zeros"), (2, 2, "zeros"), (1, 1, "reflect"), (2, 1, "replicate")])
def test_grouped_bracket_solves_each_small_group_and_prunes_by_certified_bounds(stride, mult, mode):
    # 64 channels at 12x12: the whole operator is too large for one dense SVD, each group is not;
    # channel scales spread over two decades so that the certified per-group bound prunes most groups
    torch.manual_seed(stride * 10 + mult)
    C, n = 64, 12
    w = (torch.randn(C * mult, 1, 3, 3, dtype=torch.float64)
         * torch.logspace(-2, 0, C * mult, dtype=torch.float64)[:, None, None, None])
    spec = ConvSpec((n, n), stride, 1, mode, groups=C)
    one = ConvSpec((n, n), stride, 1, mode)
    truth = max(float(torch.linalg.svdvals(one.dense_operator(w[c * mult:(c + 1) * mult]))[0]) for c in range(C))
    br = bracket(w, spec, tol=1e-6)
    assert br.how == "dense"
    assert br.lower <= truth <= br.upper and br.upper - br.lower <= 1e-12 * truth


# ----------------------------------------------------------------------------- block maxima: Lanczos + Cholesky


def _hermitian(n, m, seed, top=None, dtype=torch.complex128):
    """``n`` random PSD Hermitian ``m x m`` blocks; ``top`` forces the two largest eigenvalues."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, m, m, generator=gen, dtype=torch.float64)
    if dtype.is_complex:
        x = torch.complex(x, torch.randn(n, m, m, generator=gen, dtype=torch.float64))
    q = torch.linalg.qr(x).Q.to(dtype)
    lam = torch.rand(n, m, generator=gen, dtype=torch.float64)
    if top is not None:
        lam[:, :2] = torch.tensor(top, dtype=torch.float64)
    G = (q * lam[:, None, :].to(dtype)) @ q.mH
    return (G + G.mH) / 2  # exactly Hermitian (eigvalsh reads one triangle, a quotient the whole block)


@pytest.mark.parametrize("dtype", [torch.complex128, torch.float64, torch.complex64])
@pytest.mark.parametrize("top", [None, (1.5, 1.5), (1.5, 1.5 - 1e-9)], ids=["random", "double", "near-double"])
def test_lanczos_estimate_is_a_tight_lower_bound_of_the_top_eigenvalue(dtype, top):
    G = _hermitian(6, 40, seed=11, top=top, dtype=dtype)
    lam = torch.linalg.eigvalsh(G.to(torch.complex128 if dtype.is_complex else torch.float64))[:, -1]
    est = fourier.lanczos_top(G, rtol=1e-10)
    assert (est <= lam * (1 + 1e-12)).all()  # the quotient is evaluated in float64 even for complex64 blocks
    assert ((lam - est) / lam).max() <= (1e-6 if dtype == torch.complex64 else 1e-8)
    # a few steps only: far from converged, still below
    rough = fourier.lanczos_top(G, rtol=0.0, max_steps=3)
    assert (rough <= lam * (1 + 1e-12)).all() and (rough < lam * (1 - 1e-6)).any()


def test_lanczos_handles_zero_and_low_rank_blocks():
    G = torch.zeros(3, 20, 20, dtype=torch.complex128)
    v = torch.randn(20, 1, dtype=torch.complex128, generator=torch.Generator().manual_seed(3))
    G[1] = v @ v.mH  # rank one: the Krylov space is invariant after one step
    G[2] = torch.eye(20) * 2.0
    est = fourier.lanczos_top(G)
    assert torch.isfinite(est).all()
    torch.testing.assert_close(est, torch.tensor([0.0, float((v.abs() ** 2).sum()), 2.0], dtype=torch.float64),
                               rtol=1e-12, atol=1e-12)


def _dense_block_max(kernel, grid):
    fh, fw = fourier.unique_frequencies(grid)
    plan = fourier.gram_plan(kernel, fh.numel())
    return float(torch.linalg.eigvalsh(fourier.gram_blocks(kernel, grid, fh, fw, plan))[..., -1].max())


@pytest.mark.parametrize("case", ["random", "equal-maxima", "near-equal-maxima", "degenerate-top"])
@pytest.mark.parametrize("poor", [False, True], ids=["converged", "poor-estimates"])
def test_block_max_brackets_the_dense_value_whatever_the_estimates(monkeypatch, case, poor):
    # m > SMALL_BLOCK takes the certified path; EIG_BLOCK = 0 forces Lanczos on every picked block
    monkeypatch.setattr(fourier, "EIG_BLOCK", 0)
    monkeypatch.setattr(fourier, "EIG_WORK", 0)
    w = rand(20, 18, 3, 3, seed=12)
    if case != "random":  # only the centre tap: every frequency block is W^T W, the same maximum
        centre = w[:, :, 1, 1].clone()
        if case == "degenerate-top":  # two equal top singular values
            u, s, vh = torch.linalg.svd(centre, full_matrices=False)
            s[1] = s[0]
            centre = (u * s) @ vh
        w = torch.zeros_like(w)
        w[:, :, 1, 1] = centre
        if case == "near-equal-maxima":
            w += 1e-7 * rand(20, 18, 3, 3, seed=13)
    if poor:  # every estimate after two Lanczos steps: far too low, the certificate must catch it
        real = fourier.lanczos
        monkeypatch.setattr(fourier, "lanczos", lambda G, rtol=0.0, max_steps=None, start=None, seed=0:
                            real(G, rtol, 2, start, seed))
        monkeypatch.setattr(fourier, "rough_top", lambda G, steps: real(G, 0.0, 2))
        monkeypatch.setattr(fourier, "top_vector", lambda G, rtol, start=None: real(G, rtol, 2, start)[1])
    kernel = fourier.circulant_kernel(w, (1, 1), (1, 1), 1)
    grid = (6, 5)
    lam = _dense_block_max(kernel, grid)
    top = fourier.block_max(kernel, grid, tol=1e-8)
    assert top.value <= lam * (1 + 1e-12) and top.upper >= lam * (1 - 1e-12)
    assert top.upper <= top.value * (1 + 1e-8) ** 2 * (1 + 1e-12)


def test_gram_symbol_real_and_complex_routes_agree_with_shift_and_sign():
    kernel = fourier.circulant_kernel(rand(6, 5, 3, 2, seed=14), (1, 2), (2, 1), 1)
    grid = (7, 4)
    fh, fw = fourier.all_frequencies(grid)
    sp = fourier.spatial_gram(kernel, "in")
    a = fourier.gram_symbol_from_spatial(sp, grid, fh, fw, sign=-1.0, shift=3.0)  # real GEMMs (HalfGram)
    b = fourier.gram_symbol_from_spatial(sp.to(torch.complex128), grid, fh, fw, sign=-1.0, shift=3.0)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    for side in ("in", "out"):  # straight from the kernel, packed, reused work buffer, and scores
        sp = fourier.spatial_gram(kernel, side)
        b = fourier.gram_symbol_from_spatial(sp.to(torch.complex128), grid, fh, fw, sign=-1.0, shift=3.0)
        for half in (fourier.HalfGram.of(sp), fourier.HalfGram.of_kernel(kernel, side)):
            torch.testing.assert_close(half.blocks(grid, fh[:5], fw[:5], -1.0, 3.0), b[:5], rtol=0, atol=1e-12)
            work: list = []
            coef = half.coefficients(grid, fh, fw)
            half.packed_at(coef, -1.0, 3.0, work)
            packed = half.packed_at(coef[3:9], -1.0, 3.0, work)
            torch.testing.assert_close(fourier._unpack(packed, b.shape[-1]), b[3:9], rtol=0, atol=1e-12)
            fro = (fourier.gram_symbol_from_spatial(sp, grid, fh, fw).abs() ** 2).sum((-2, -1))
            torch.testing.assert_close(half.scores(grid, fh, fw), fro, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("m", [1, 2, 5, 8, 33])
def test_packed_storage_is_lapack_rfp_and_its_cholesky_tells_definiteness(m):
    scipy_lapack = pytest.importorskip("scipy.linalg.lapack")
    import numpy as np

    gen = torch.Generator().manual_seed(m)
    X = torch.randn(m, m, dtype=torch.complex128, generator=gen)
    A = X @ X.mH
    A = (A + A.mH) / 2  # exactly Hermitian: BLAS need not round both triangles alike
    src = fourier._packing(m)[0]
    ref = scipy_lapack.ztrttf(np.asfortranarray(A.numpy().T), transr="N", uplo="L")[0]
    assert np.abs(A.flatten()[src].numpy() - ref).max() == 0
    lam = torch.linalg.eigvalsh(A)[-1].item()
    for mu, definite in ((lam * (1 + 1e-6), True), (lam * (1 - 1e-6), False)):
        B = -A
        B.diagonal().add_(mu)
        packed = B.flatten()[src][None].clone()
        full = B[None].clone()
        assert bool(fourier.indefinite_packed(packed, m)[0]) is not definite
        assert bool(fourier.indefinite(full)[0]) is not definite
        assert bool(torch.linalg.cholesky_ex(B).info > 0) is not definite


def test_rough_and_converged_estimates_are_lower_bounds_and_converge():
    gen = torch.Generator().manual_seed(3)
    X = torch.randn(5, 150, 150, dtype=torch.complex128, generator=gen)
    G = X @ X.mH
    lam = torch.linalg.eigvalsh(G)[:, -1]
    theta, y = fourier.rough_top(G, 10)
    assert bool((theta <= lam * (1 + 1e-6)).all()) and bool((theta > 0.5 * lam).all())
    assert bool((fourier.rayleigh_quotient(G, y) <= lam * (1 + 1e-12)).all())
    for i in range(2):
        v = fourier.top_vector(G[i: i + 1], 1e-9, y[i: i + 1])
        q = float(fourier.rayleigh_quotient(G[i: i + 1], v))
        assert lam[i] * (1 - 1e-8) <= q <= lam[i] * (1 + 1e-12)
