"""Pure factorizations of a conv weight into separable parts (no ``nn.Module`` state).

Notation (``docs/decomposition.md``): ``W`` is ``(n, c, kh, kw)`` (``n = C_out``,
``c = C_in``), ``K = kh * kw``, ``D = c * K``. ``W[:, i]`` is the ``n x K`` slice of input
channel ``i``, ``W[o]`` the ``c x K`` slice of output filter ``o``. Patches ``x`` are the
``D``-vectors a conv multiplies ``W.reshape(n, D)`` with (im2col, channel-major, as
``F.unfold``); ``xh`` are the patches of the same positions in the network whose earlier
layers are already converted (``xh = x`` for a layer-wise fit).

Data-free fits minimise the weight error ``||W - W'||_F`` (Eckart-Young). Data-driven fits
minimise the *response* error ``E||W x - W' xh||^2 = tr(W Sxx W^T) - 2 tr(W Sxh W'^T) +
tr(W' Shh W'^T)`` for the second moments in :class:`Moments` -- the asymmetric objective of
Zhang et al. (arXiv 1505.06798, Sect. 3.3) and He et al. (arXiv 1910.09455, multi-layer
case). Every data-driven solver starts from the data-free factors (among others) and keeps
the best iterate, so on the calibration patches its error is never above the data-free fit's.

All solvers work in float64 internally and return tensors of the weight's dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError

__all__ = [
    "Moments",
    "blueprint_factors",
    "blueprint_spectrum",
    "channel_factors",
    "channel_spectrum",
    "depthwise_factors",
    "depthwise_spectrum",
    "energy_rank",
    "extract_patches",
    "patch_moments",
    "refit_pointwise",
    "response_error",
    "retained_energy",
    "sample_patches",
    "subspace_factors",
]

#: Ridge added to patch second moments, relative to their mean diagonal (numerical safety only).
RIDGE = 1e-7


# ----------------------------------------------------------------- statistics


@dataclass
class Moments:
    """Second moments of paired patches: ``xx = E[x x^T]``, ``xh = E[x xh^T]``, ``hh = E[xh xh^T]``
    (``D x D``, float64), about the means ``mean_x``, ``mean_h`` when ``centered``."""

    xx: Tensor
    xh: Tensor
    hh: Tensor
    mean_x: Tensor
    mean_h: Tensor
    count: int
    centered: bool


def extract_patches(x: Tensor, kernel_size, stride, padding_amounts, dilation, padding_mode: str) -> Tensor:
    """im2col patches ``(N, D, L)`` of ``x`` exactly as ``nn.Conv2d`` sees them.

    ``padding_amounts`` are ``F.pad``'s ``(left, right, top, bottom)`` (an ``nn.Conv2d``'s
    ``_reversed_padding_repeated_twice``), applied in ``padding_mode`` first, so
    ``W.reshape(n, D) @ patches`` equals the conv's output for every padding mode. Exact.
    """
    if any(padding_amounts):
        mode = "constant" if padding_mode == "zeros" else padding_mode
        x = F.pad(x, list(padding_amounts), mode=mode)
    return F.unfold(x, kernel_size, dilation=dilation, stride=stride)


def sample_patches(x: Tensor, kernel_size, stride, padding_amounts, dilation, padding_mode: str,
                   index: Tensor) -> Tensor:
    """Rows ``(m, D)`` of :func:`extract_patches` at the flat positions ``index`` into
    ``(N, H', W')`` (batch-major), gathered without building every patch. Exact."""
    if any(padding_amounts):
        mode = "constant" if padding_mode == "zeros" else padding_mode
        x = F.pad(x, list(padding_amounts), mode=mode)
    kh, kw = kernel_size
    ho = (x.shape[2] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (x.shape[3] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    b, pos = index // (ho * wo), index % (ho * wo)
    oy, ox = pos // wo, pos % wo
    dev = x.device
    rows = (oy * stride[0])[:, None, None] + (torch.arange(kh, device=dev) * dilation[0])[None, :, None]
    cols = (ox * stride[1])[:, None, None] + (torch.arange(kw, device=dev) * dilation[1])[None, None, :]
    pt = x[b[:, None, None], :, rows, cols]  # (m, kh, kw, c)
    return pt.permute(0, 3, 1, 2).reshape(index.shape[0], -1)


def patch_moments(px: Tensor, ph: Tensor | None = None, centered: bool = False) -> Moments:
    """:class:`Moments` of sampled patch rows ``px`` (``m x D``) and their partners ``ph``
    (default ``ph = px``). An estimate of the population moments from ``m`` samples."""
    px = px.to(torch.float64)
    ph = px if ph is None else ph.to(torch.float64)
    m = px.shape[0]
    mx, mh = px.mean(0), ph.mean(0)
    if centered:
        px, ph = px - mx, ph - mh
    xx = px.T @ px / m
    hh = xx if ph is px else ph.T @ ph / m
    xh = xx if ph is px else px.T @ ph / m
    return Moments(xx=xx, xh=xh, hh=hh, mean_x=mx, mean_h=mh, count=m, centered=centered)


def response_error(weight: Tensor, approx: Tensor, mom: Moments) -> Tensor:
    """``E||W x - W' xh||^2`` (summed over output channels) from the moments. Exact on the
    sampled patches. ``weight`` and ``approx`` are ``(n, ...)`` with ``D`` entries per row."""
    w = weight.reshape(weight.shape[0], -1).to(torch.float64)
    a = approx.reshape(approx.shape[0], -1).to(torch.float64)
    return ((w @ mom.xx) * w).sum() - 2 * ((w @ mom.xh) * a).sum() + ((a @ mom.hh) * a).sum()


def _ridge(s: Tensor) -> Tensor:
    d = s.shape[-1]
    lam = RIDGE * s.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-30)
    return s + lam[..., None, None] * torch.eye(d, dtype=s.dtype, device=s.device)


def _ridge_solve(h: Tensor, rhs: Tensor) -> Tensor:
    """Batched ``(h + ridge) x = rhs`` for symmetric positive semi-definite ``h``. Each system is
    first scaled by its largest entry (the solution is unchanged), so a filter whose alternating
    updates grew huge cannot overflow the factorisation; a system that is zero or not finite (a
    degenerate filter) gives a NaN solution instead of stopping the batch, which the callers'
    keep-the-best-step rule rejects."""
    scale = h.abs().amax((-2, -1))
    ok = torch.isfinite(scale) & (scale > 0) & torch.isfinite(rhs).flatten(1).all(1)
    scale = torch.where(ok, scale, torch.ones_like(scale))[:, None, None]
    eye = torch.eye(h.shape[-1], dtype=h.dtype, device=h.device)
    hs = torch.where(ok[:, None, None], _ridge(torch.nan_to_num(h) / scale), eye)
    rs = torch.where(ok[:, None, None], rhs / scale, torch.zeros_like(rhs))
    # the systems are ridge-regularised second moments (symmetric positive definite): Cholesky,
    # which flags a system it cannot factor (info > 0) instead of raising or printing LAPACK errors
    chol, info = torch.linalg.cholesky_ex(hs)
    ok &= info == 0
    x = torch.cholesky_solve(rs, torch.where(ok[:, None, None], chol, eye))
    return torch.where(ok[:, None, None] & torch.isfinite(x), x, torch.full_like(x, math.nan))


def _f64(weight: Tensor) -> Tensor:
    return weight.detach().to(torch.float64)


def _top_right_vectors(m: Tensor, rank: int) -> Tensor:
    """The top-``rank`` right singular vectors ``(..., K, r)`` of a batch of matrices ``m``
    ``(..., rows, K)``, from the eigendecomposition of the small Gram matrix ``m^T m``
    (``K x K``). ``m V_r V_r^T`` is then the rank-``r`` truncated SVD of ``m`` (Eckart-Young),
    and ``m V_r = U_r S_r``. Torch's batched ``svd`` of tall matrices is erratically slow on
    CPU (seconds for 256 slices of 256 x 9), this is not."""
    _, vecs = torch.linalg.eigh(m.transpose(-2, -1) @ m)
    return vecs.flip(-1)[..., :rank]


def _check_rank(rank: int, full: int, what: str) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1 or rank > full:
        raise ConfigError(f"{what}: rank must be an integer in [1, {full}], got {rank!r}")


# ----------------------------------------------------------------- depth-wise decomposition (DW -> PW)


def depthwise_spectrum(weight: Tensor) -> Tensor:
    """Singular values ``(c, min(n, K))`` of every input-channel slice ``W[:, i]`` (``n x K``):
    the spectrum He et al. (arXiv 1910.09455, Sect. 3, depth-wise decomposition) truncate."""
    n, c = weight.shape[:2]
    return torch.linalg.svdvals(_f64(weight).permute(1, 0, 2, 3).reshape(c, n, -1))


def depthwise_factors(weight: Tensor, rank: int, mom: Moments | None = None, iters: int = 6) -> tuple[Tensor, Tensor]:
    """Depth-wise decomposition (He et al., arXiv 1910.09455): ``W ~ DW -> PW``.

    Returns ``dw`` ``(c * r, 1, kh, kw)`` (channel ``i * r + j`` reads input ``i``, PyTorch's
    depth-multiplier layout) and ``pw`` ``(n, c * r, 1, 1)``, so that
    ``compose_depthwise_separable(dw, pw, c)`` is the approximation.

    Data-free (``mom=None``): per input channel, the rank-``r`` truncated SVD of ``W[:, i]``
    (Eckart-Young; docs/decomposition.md Sec. 1): ``pw[:, i*r+j] = s_ij u_ij``, ``dw[i*r+j] = v_ij``.
    Optimal for the weight error, which is ``sum_i sum_{j>r} s_ij^2`` exactly; ``r = min(n, K)``
    is exact.

    Data-driven (``mom`` given): minimises the response error. Candidates (1) the data-free
    factors and (2) the per-channel GSVD (docs/decomposition.md Sec. 1, Takane & Hwang 2007): with
    ``C_i = Shh[i,i] = L L^T`` and target ``A_i = W[:, i] Sxh[i,i] C_i^{-1}``, the SVD of
    ``A_i L`` gives ``p = s u``, ``d = L^{-T} v``. Each gets the inter-channel least-squares
    refit of the pointwise part (:func:`refit_pointwise`, docs/decomposition.md Sec. 1); the better one is
    then improved by alternating least squares over the joint objective (D-step: all
    ``c r K`` depthwise taps in one normal-equation solve; P-step: the refit), keeping the
    best iterate. An optimum of the sampled objective is not guaranteed (ALS), but the
    result is never worse than the data-free factors on the same patches.
    """
    n, c, kh, kw = weight.shape
    k = kh * kw
    _check_rank(rank, min(n, k), "depthwise decomposition")
    w = _f64(weight)
    m = w.permute(1, 0, 2, 3).reshape(c, n, k)  # W[:, i] as (n, K)
    v = _top_right_vectors(m, rank)  # (c, K, r)
    d_free = v.transpose(1, 2)  # (c, r, K)
    p_free = (m @ v).permute(1, 0, 2).reshape(n, c * rank)  # columns s_ij u_ij
    if mom is None:
        return _dsc_out(d_free, p_free, weight)
    hh = _ridge(mom.hh)
    hh4 = hh.reshape(c, k, c, k)
    blocks = torch.stack([hh4[i, :, i, :] for i in range(c)])  # (c, K, K)
    xh_blocks = torch.stack([mom.xh.reshape(c, k, c, k)[i, :, i, :] for i in range(c)])
    chol = torch.linalg.cholesky(blocks)
    target = torch.linalg.solve(blocks, (m @ xh_blocks).transpose(1, 2)).transpose(1, 2)  # A_i (c, n, K)
    v2 = _top_right_vectors(target @ chol, rank)  # (c, K, r)
    d_g = torch.linalg.solve_triangular(chol.transpose(1, 2), v2, upper=True)
    d_g = d_g.transpose(1, 2)  # (c, r, K): d = L^{-T} v
    g = w.reshape(n, -1) @ mom.xh  # W Sxh  (n, D)

    wf = w.reshape(n, -1)
    const = ((wf @ mom.xx) * wf).sum()

    def objective(dd, pp):  # response_error(w, W', mom) with W' = P Dblk^T, the constant hoisted
        a = pp @ _block_diag(dd).T
        return const - 2 * (g * a).sum() + ((a @ mom.hh) * a).sum()

    best = (objective(d_free, p_free), d_free, p_free)  # the data-free factors themselves
    for dd in (d_free, d_g):
        pp = _refit_p(g, dd, hh)
        f = objective(dd, pp)
        if f < best[0]:
            best = (f, dd, pp)
    if c * rank * k <= 6000:  # joint D-step affordable
        f, dd, pp = best
        for _ in range(iters):
            dd = _refit_d(g, pp, hh4, c, rank, k)
            pp = _refit_p(g, dd, hh)
            f = objective(dd, pp)
            if f < best[0]:
                improved = best[0] - f
                best = (f, dd, pp)
                if improved < 1e-4 * abs(float(f)):
                    break
            else:
                break
    return _dsc_out(best[1], best[2], weight)


def _dsc_out(d: Tensor, p: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    c, r, k = d.shape
    kh, kw = weight.shape[-2:]
    dw = d.reshape(c * r, 1, kh, kw).to(weight.dtype)
    pw = p.reshape(p.shape[0], c * r, 1, 1).to(weight.dtype)
    return dw, pw


def _block_diag(d: Tensor) -> Tensor:
    """``(c K, c r)`` block-diagonal matrix whose block ``i`` is ``d[i].T`` (``K x r``)."""
    return torch.block_diag(*[d[i].T for i in range(d.shape[0])])


def _refit_p(g: Tensor, d: Tensor, hh: Tensor) -> Tensor:
    dblk = _block_diag(d)
    gram = _ridge(dblk.T @ hh @ dblk)
    return torch.linalg.solve(gram, (g @ dblk).T).T


def refit_pointwise(weight: Tensor, dw: Tensor, mom: Moments) -> Tensor:
    """Inter-channel compensation (He et al. arXiv 1910.09455, multi-channel case;
    docs/decomposition.md Sec. 1): with the depthwise filters ``dw`` ``(c r, 1, kh, kw)`` fixed, the pointwise
    matrix minimising ``E||W x - P z||^2`` for the depthwise responses ``z = Dblk^T xh`` is the
    least-squares solution ``P = W Sxh Dblk (Dblk^T Shh Dblk)^{-1}``. Exact (one linear solve,
    a tiny ridge for safety). Returns ``(n, c r, 1, 1)``."""
    n, c = weight.shape[:2]
    d = _f64(dw).reshape(c, dw.shape[0] // c, -1)
    p = _refit_p(_f64(weight).reshape(n, -1) @ mom.xh, d, _ridge(mom.hh))
    return p.reshape(n, -1, 1, 1).to(weight.dtype)


def _refit_d(g: Tensor, p: Tensor, hh4: Tensor, c: int, r: int, k: int) -> Tensor:
    """D-step: ``min_D tr(P Dblk^T Shh Dblk P^T) - 2 tr(g Dblk P^T)`` over the block-diagonal
    taps: normal equations ``H[(ij,k),(i'j',k')] = (P^T P)[ij,i'j'] Shh[(i,k),(i',k')]``."""
    gp = p.T @ p  # (cr, cr)
    idx = torch.arange(c * r, device=p.device) // r
    s4 = hh4[idx][:, :, idx]  # (cr, K, cr, K)
    h = (gp[:, None, :, None] * s4).reshape(c * r * k, c * r * k)
    pg = (p.T @ g).reshape(c * r, c, k)  # (P^T W Sxh)[ij, (i', k)]
    b = pg[torch.arange(c * r), idx]  # (cr, K): entries of channel i = ij // r
    sol = torch.linalg.solve(_ridge(h), b.reshape(-1))
    return sol.reshape(c, r, k)


# ----------------------------------------------------------------- blueprint (PW -> DW, BSConv-U/S)


def blueprint_spectrum(weight: Tensor) -> Tensor:
    """Singular values ``(n, min(c, K))`` of every output-filter slice ``W[o]`` (``c x K``):
    the intra-kernel correlation spectrum of Haase & Amthor (arXiv 2003.13549, Sect. 3)."""
    n, c = weight.shape[:2]
    return torch.linalg.svdvals(_f64(weight).reshape(n, c, -1))


def blueprint_factors(weight: Tensor, rank: int, mom: Moments | None = None, iters: int = 10) -> tuple[Tensor, Tensor]:
    """BSConv-U conversion (Haase & Amthor arXiv 2003.13549; Network Decoupling, Guo et al.
    arXiv 1808.05517; docs/decomposition.md Sec. 3): ``W ~ PW -> DW``.

    Returns ``pw`` ``(n * r, c, 1, 1)`` and ``dw`` ``(n, r, kh, kw)`` (the grouped depthwise
    reading ``r`` channels per output; ``r = 1`` is BSConv-U), so that
    ``compose_blueprint(pw, dw)`` is the approximation.

    Data-free: per output filter the rank-``r`` SVD of ``W[o]``: ``pw[o*r+j] = s_oj u_oj``,
    ``dw[o, j] = v_oj``; weight error ``sum_o sum_{j>r} s_oj^2`` exactly; ``r = min(c, K)`` exact.

    Data-driven: the response error separates exactly over output filters
    (docs/decomposition.md Sec. 3, the data-driven form): minimise ``W'[o] Shh W'[o]^T - 2 (W Sxh)[o] W'[o]^T``
    over rank-``r`` ``W'[o] = A B^T`` by alternating least squares (``A``: a ``c r``
    solve, ``B``: a ``K r`` solve, batched over ``o``), started from the data-free factors
    and keeping the best iterate (never worse than data-free on the same patches).
    """
    n, c, kh, kw = weight.shape
    k = kh * kw
    _check_rank(rank, min(c, k), "blueprint decomposition")
    w = _f64(weight).reshape(n, c, k)
    b = _top_right_vectors(w, rank)  # (n, K, r): the blueprints v_oj
    a = w @ b  # (n, c, r): s_oj u_oj
    if mom is not None:
        a, b = _blueprint_als(w, a, b, mom, iters)
    pw = a.permute(0, 2, 1).reshape(n * rank, c, 1, 1).to(weight.dtype)
    dw = b.permute(0, 2, 1).reshape(n, rank, kh, kw).to(weight.dtype)
    return pw, dw


def _blueprint_als(w: Tensor, a: Tensor, b: Tensor, mom: Moments, iters: int) -> tuple[Tensor, Tensor]:
    n, c, k = w.shape
    r = a.shape[-1]
    hh4 = _ridge(mom.hh).reshape(c, k, c, k)
    g = (w.reshape(n, -1) @ mom.xh).reshape(n, c, k)

    def per_filter(aa, bb):  # objective per output filter (up to a constant)
        ap = torch.einsum("oij,okj->oik", aa, bb).reshape(n, -1)
        return ((ap @ mom.hh) * ap).sum(1) - 2 * (g.reshape(n, -1) * ap).sum(1)

    best_f = per_filter(a, b)
    best_a, best_b = a.clone(), b.clone()
    for _ in range(iters):
        ha = torch.einsum("okj,ikpl,olm->oijpm", b, hh4, b).reshape(n, c * r, c * r)
        ra = torch.einsum("oik,okj->oij", g, b).reshape(n, c * r, 1)
        a = _ridge_solve(ha, ra).reshape(n, c, r)
        hb = torch.einsum("oij,ikpl,opm->okjlm", a, hh4, a).reshape(n, k * r, k * r)
        rb = torch.einsum("oik,oij->okj", g, a).reshape(n, k * r, 1)
        b = _ridge_solve(hb, rb).reshape(n, k, r)
        f = per_filter(a, b)
        better = f < best_f
        best_a[better], best_b[better] = a[better], b[better]
        best_f = torch.where(better, f, best_f)  # NaN steps (degenerate filters) never win
    return best_a, best_b


def subspace_factors(pw: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """BSConv-S from BSConv-U (Haase & Amthor arXiv 2003.13549, BSConv-S; docs/decomposition.md Sec. 3):
    the truncated SVD ``pw ~ (U_m S_m) V_m^T`` of the ``(N, c)`` pointwise matrix.

    Returns ``pw1 = V_m^T`` ``(m, c, 1, 1)`` -- orthonormal rows, so the BSConv-S penalty
    ``||W W^T - I||_F`` starts at 0 -- and ``pw2 = U_m S_m`` ``(N, m, 1, 1)``. Optimal
    (Eckart-Young); exact for ``m = min(N, c)``.
    """
    mat = _f64(pw).reshape(pw.shape[0], -1)
    _check_rank(rank, min(mat.shape), "subspace decomposition")
    u, s, vh = torch.linalg.svd(mat, full_matrices=False)
    pw1 = vh[:rank].reshape(rank, -1, 1, 1).to(pw.dtype)
    pw2 = (u[:, :rank] * s[:rank]).reshape(mat.shape[0], rank, 1, 1).to(pw.dtype)
    return pw1, pw2


# ----------------------------------------------------------------- channel decomposition (Zhang et al.)


def channel_spectrum(weight: Tensor) -> Tensor:
    """Singular values of the reshaped ``n x D`` weight (Zhang et al. arXiv 1505.06798,
    data-free form; the PCA spectrum of the responses for white inputs)."""
    return torch.linalg.svdvals(_f64(weight).reshape(weight.shape[0], -1))


def channel_factors(weight: Tensor, rank: int, mom: Moments | None = None) -> tuple[Tensor, Tensor]:
    """Channel decomposition (Zhang, Zou, He, Sun, arXiv 1505.06798, Sect. 3.1-3.3, linear
    version): ``k x k`` conv into ``d'`` channels, then a ``1 x 1`` conv.

    Returns ``first`` ``(d', c, kh, kw)`` and ``second`` ``(n, d', 1, 1)``.
    Data-free: the rank-``d'`` SVD of ``W.reshape(n, D)`` (``first = S V^T``, ``second = U``);
    optimal for the weight error; ``d' = min(n, D)`` exact.
    Data-driven (asymmetric, Sect. 3.3): reduced-rank regression of the original responses
    ``W x`` on the approximated inputs ``xh``: ``W* = W Sxh Shh^{-1}``, ``U_d`` the top
    eigenvectors of ``W* Shh W*^T`` (the covariance of the fitted responses, Zhang's PCA of
    ``y``), and ``W' = U_d U_d^T W*``. The global optimum of the sampled objective (RRR).
    """
    n, c, kh, kw = weight.shape
    full = min(n, c * kh * kw)
    _check_rank(rank, full, "channel decomposition")
    w = _f64(weight).reshape(n, -1)
    if mom is None:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        first, second = s[:rank, None] * vh[:rank], u[:, :rank]
    else:
        hh = _ridge(mom.hh)
        wstar = torch.linalg.solve(hh, (w @ mom.xh).T).T
        cov_y = wstar @ hh @ wstar.T
        evals, evecs = torch.linalg.eigh(cov_y)
        ud = evecs[:, torch.argsort(evals, descending=True)[:rank]]
        first, second = ud.T @ wstar, ud
    return (first.reshape(rank, c, kh, kw).to(weight.dtype),
            second.reshape(n, rank, 1, 1).to(weight.dtype))


# ----------------------------------------------------------------- rank choice


def energy_rank(spectra: Tensor, energy: float) -> int:
    """Smallest ``r`` whose mean retained energy ``mean_rows sum_{j<=r} s_j^2 / sum_j s_j^2``
    reaches ``energy`` (Network Decoupling's rule, Guo et al. arXiv 1808.05517, Sect. 3.3;
    rows = channels or filters; a single row for channel decomposition)."""
    sq = spectra.reshape(-1, spectra.shape[-1]) ** 2
    tot = sq.sum(-1, keepdim=True).clamp_min(1e-300)
    frac = (sq.cumsum(-1) / tot).mean(0)
    ok = torch.nonzero(frac >= energy - 1e-12)
    return int(ok[0]) + 1 if len(ok) else spectra.shape[-1]


def retained_energy(spectra: Tensor, rank: int) -> float:
    """Mean retained energy fraction at ``rank`` (see :func:`energy_rank`)."""
    sq = spectra.reshape(-1, spectra.shape[-1]) ** 2
    return float((sq[:, :rank].sum(-1) / sq.sum(-1).clamp_min(1e-300)).mean())

