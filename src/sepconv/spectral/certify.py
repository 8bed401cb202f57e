"""Certified upper bounds for non-circulant geometries: a banded Cholesky certificate.

For any padding, stride and dilation the Gram operator ``A = T^T T`` couples two input rows
only if some output reads both, i.e. rows at most ``B`` apart (``B = d(k-1)`` for zero
padding; wrap-around or reflection can widen it). Ordered by image row, ``A`` is block-banded
with blocks of size ``C_in/g * W`` (per group). Then

    sigma_max(T) <= sqrt(mu)   iff   mu I - A is positive semi-definite,

and a successful Cholesky factorisation of ``mu I - A`` proves it positive definite (Sylvester's
criterion; Higham, *Accuracy and Stability of Numerical Algorithms*, Thm. 10.3, for the
rounding: the computed factor is exact for ``mu I - A + E`` with ``||E|| <= c D u ||mu I - A||``,
``u ~ 1.1e-16``, which :func:`cholesky_certificate` covers with a margin). Block Cholesky of a
block-banded matrix costs ``~ (1/3 + B + B^2) (cW)^3`` per block row instead of ``(c H W)^3 / 3``.

The blocks come from separable tap matrices: with ``P_a = P^h_{a_h} (x) P^w_{a_w}`` the 0/1
matrices of one kernel tap (padding, stride and dilation included),
``A = sum_{a,b} (K_a^T K_b) (x) (P^h_{a_h}^T P^h_{b_h}) (x) (P^w_{a_w}^T P^w_{b_w})`` exactly.
The other Gram operator ``T T^T = sum_{a,b} (K_a K_b^T) (x) (P_a P_b^T)`` has the same largest
eigenvalue; ordered by output row it is block-banded too, and for a strided conv it is the
cheaper one (:class:`BandedGram` picks by cost).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import lapack
from .spec import ConvSpec, tap_matrices_1d, tap_sources_1d

__all__ = ["BandedGram", "band_of", "certificate_cost", "cholesky_certificate"]


def _row_sources(weight: Tensor, spec: ConvSpec) -> Tensor:
    kh = weight.shape[-2]
    t, b = spec.pads(weight.shape[-2:])[:2]
    return tap_sources_1d(spec.in_size[0], kh, spec.stride[0], spec.dilation[0], t, b, spec.padding_mode)


def _band(Sh: Tensor) -> int:
    nz = torch.nonzero(Sh.abs().sum((0, 1)) > 0)
    return int((nz[:, 0] - nz[:, 1]).abs().max()) if nz.numel() else 0


def band_of(sources: Tensor, side: str = "in") -> int:
    """The block bandwidth of the Gram operator from the row sources (:func:`~.spec.tap_sources_1d`,
    ``(k, n_out)``): for ``A = T^T T`` (``side="in"``) the largest distance between two input rows
    read by one output row, for ``T T^T`` (``"out"``) between two output rows reading one input row
    (padding zeros excluded). Exact, ``O(k n)`` -- equal to :func:`_band` of the row products."""
    valid = sources >= 0
    if not bool(valid.any()):
        return 0
    if side == "out":  # per input row, the first and last output row reading it
        n = int(sources.max()) + 1
        y = torch.arange(sources.shape[1]).expand_as(sources)[valid]
        x = sources[valid]
        big = torch.full((n,), -1).scatter_reduce(0, x, y, "amax")
        small = torch.full((n,), 2**62).scatter_reduce(0, x, y, "amin")
        seen = big >= 0
        return int((big - small)[seen].max())
    big, small = sources.masked_fill(~valid, -1).amax(0), sources.masked_fill(~valid, 2**62).amin(0)
    seen = valid.any(0)
    return int((big - small)[seen].max())


def _side_costs(weight: Tensor, spec: ConvSpec) -> dict[str, tuple[float, float]]:
    """``{side: (flops, bytes)}`` of the certificate on ``T^T T`` (``"in"``: blocks of ``C_in/g``
    channels by the input's width, a block row per input row) and on ``T T^T`` (``"out"``: the
    output's). The bytes count the ``Q`` blocks (and their reordering copy), the row/column tap
    products and the kept factor rows."""
    sources = _row_sources(weight, spec)
    g, (kh, kw) = spec.groups, weight.shape[-2:]
    sizes = {"in": (weight.shape[1], *spec.in_size), "out": (weight.shape[0] // g, *spec.out_size((kh, kw)))}
    costs = {}
    for side, (c, H, W) in sizes.items():
        B, m = band_of(sources, side), float(c * W)
        taps = 8.0 * (kh * kh * H * H + kw * kw * W * W)
        flops = g * H * (1 / 3 + B + B * B + 1) * m ** 3
        costs[side] = (flops, 8.0 * g * (2 * kh * kh + (B + 1) ** 2 + 2) * m ** 2 + taps)
    return costs


def certificate_cost(weight: Tensor, spec: ConvSpec) -> tuple[float, float]:
    """``(flops, bytes)`` of :class:`BandedGram` + :func:`cholesky_certificate` on the cheaper side
    (:func:`_side_costs`), without building anything larger than the kernel (the bands from the
    tap sources, ``O(k H)``)."""
    return min(_side_costs(weight, spec).values())


class BandedGram:
    """A Gram operator of ``(weight, spec)`` as a block-banded matrix: ``A = T^T T`` (``side="in"``;
    input rows are block rows, blocks ``(g, cW, cW)``, ``c = C_in/g``) or ``T T^T`` (``"out"``;
    output rows, ``c = C_out/g``, ``W`` the output's width), bandwidth :attr:`band` block rows.
    Both have the largest eigenvalue ``||T||^2``; by default the side whose certificate costs
    fewer flops (a stride-2 3x3 conv: ``T T^T``, half the block rows and band 1 instead of 2)."""

    def __init__(self, weight: Tensor, spec: ConvSpec, side: str | None = None):
        kh, kw = spec.check(weight)
        t, b, l, r = spec.pads((kh, kw))
        H, W = spec.in_size
        mode = spec.padding_mode
        w = weight.detach().to(torch.float64)
        if side is None:
            costs = _side_costs(w, spec)
            side = min(costs, key=costs.get)
        g = spec.groups
        co, ci = w.shape[0] // g, w.shape[1]
        Ph = tap_matrices_1d(H, kh, spec.stride[0], spec.dilation[0], t, b, mode).to(w.device)  # (kh, H_out, H)
        Pw = tap_matrices_1d(W, kw, spec.stride[1], spec.dilation[1], l, r, mode).to(w.device)
        K = w.reshape(g, co, ci, kh, kw)
        if side == "in":  # T^T T = sum_{a,b} (K_a^T K_b) (x) (P_a^T P_b)
            self.Sh = torch.einsum("ayx,byz->abxz", Ph, Ph)  # (kh, kh, H, H)
            Sw = torch.einsum("ayx,byz->abxz", Pw, Pw)  # (kw, kw, W, W)
            M = torch.einsum("goiab,gojcd->gabicdj", K, K)  # (g, kh, kw, ci, kh, kw, ci): K_a^T K_b
            c = ci
        else:  # T T^T = sum_{a,b} (K_a K_b^T) (x) (P_a P_b^T)
            self.Sh = torch.einsum("ayx,bzx->abyz", Ph, Ph)  # (kh, kh, H_out, H_out)
            Sw = torch.einsum("ayx,bzx->abyz", Pw, Pw)
            M = torch.einsum("goiab,gpicd->gabocdp", K, K)  # (g, kh, kw, co, kh, kw, co): K_a K_b^T
            c = co
        self.side, self.g, self.c, self.H, self.W = side, g, c, self.Sh.shape[-1], Sw.shape[-1]
        # Q[g, a_h, b_h] = sum_{a_w, b_w} M[.., a_w, .., b_w, ..] (x) Sw[a_w, b_w]  ->  (g, kh, kh, c*W, c*W)
        Q = torch.einsum("gpuiqvj,uvxz->gpqixjz", M, Sw)
        self.Q = Q.reshape(g, kh, kh, c * self.W, c * self.W)
        self.band = _band(self.Sh)

    @property
    def block(self) -> int:
        return self.c * self.W

    def blk(self, i: int, j: int, alpha: float = 1.0, out: Tensor | None = None) -> Tensor:
        """The block ``alpha A[row i, row j]``, ``(g, cW, cW)``, in ``out`` (default a new tensor):
        the sum of the few tap pairs ``(p, q)`` whose row product links rows ``i`` and ``j``."""
        s = self.Sh[:, :, i, j]
        terms = [(p, q, alpha * float(s[p, q])) for p, q in s.nonzero().tolist()]
        if out is None:
            out = self.Q.new_empty(self.g, self.block, self.block)
        if not terms:
            return out.zero_()
        torch.mul(self.Q[:, terms[0][0], terms[0][1]], terms[0][2], out=out)
        for p, q, a in terms[1:]:
            out.add_(self.Q[:, p, q], alpha=a)
        return out

    def dense(self) -> Tensor:
        """The Gram matrix assembled (rows ordered ``(h, c, w)``), ``(g, c H W, c H W)``: for tests."""
        rows = [torch.cat([self.blk(i, j) for j in range(self.H)], -1) for i in range(self.H)]
        return torch.cat(rows, -2)


def _factor(S: Tensor) -> tuple[Tensor, Tensor]:
    """Cholesky of the symmetric blocks ``S`` ``(g, m, m)``: ``(L, ok)``, ``L``'s lower triangles the
    factors, the identity where one broke down (``ok[g]`` false). On the CPU LAPACK ``potrf``
    reads each block's upper triangle (in C order: the one :func:`_downdate` keeps) and factors
    it in place, the other triangle left as it was, on one BLAS
    thread (faster than ``torch.linalg.cholesky_ex``: BENCHMARKS.md, engine internals); elsewhere
    ``cholesky_ex``."""
    if not (lapack.on_scipy(S) and S.is_contiguous()):
        L, info = torch.linalg.cholesky_ex(S)
    else:
        from scipy.linalg import lapack as scipy_lapack  # noqa: PLC0415  NB: scipy only on the CPU paths

        with lapack.blas_one_thread():  # b.T: Fortran order, factored in place (its lower = S's upper triangle)
            info = torch.tensor([scipy_lapack.dpotrf(b.T, lower=1, clean=0, overwrite_a=1)[1] for b in S.numpy()])
        L = S.mT
    ok = info == 0
    if not bool(ok.all()):
        L = torch.where(ok.to(S.device)[:, None, None], L, torch.eye(S.shape[-1], dtype=S.dtype, device=S.device))
    return L, ok.cpu()


def _downdate(S: Tensor, P: Tensor) -> None:
    """``S -= P P^T`` in place for blocks ``(g, m, m)`` and panels ``(g, m, n)``. On the CPU only
    the upper triangle (in C order) is kept: the one :func:`_factor`'s ``potrf`` reads -- on one
    thread by a BLAS ``syrk`` (half the flops of the product), on more by three threaded products
    on halves (three quarters); elsewhere the whole product."""
    if not (lapack.on_scipy(S) and S.is_contiguous() and P.is_contiguous()):
        S.sub_(P @ P.mT)
    elif torch.get_num_threads() == 1:
        from scipy.linalg import blas  # noqa: PLC0415

        with lapack.blas_one_thread():
            for s, p in zip(S.numpy(), P.numpy()):  # s.T, Fortran order: its lower triangle is s's upper
                blas.dsyrk(-1.0, p.T, beta=1.0, c=s.T, trans=1, lower=1, overwrite_c=1)
    else:
        h = S.shape[-1] // 2
        top, bottom = P[:, :h], P[:, h:]
        S[:, :h, :h].sub_(top @ top.mT)
        S[:, :h, h:].sub_(top @ bottom.mT)
        S[:, h:, h:].sub_(bottom @ bottom.mT)


def cholesky_certificate(bg: BandedGram, mu: float, bar=None) -> Tensor:
    """Per group, whether ``mu I - A`` is certified positive definite, i.e. ``sigma_max <= sqrt(mu)``
    up to the rounding margin (returns ``(g,)`` bools). A block Cholesky factorisation of the
    block-banded matrix, row by row (left-looking), keeping for each of the next ``band`` rows
    ``k`` the panel ``[L_{k,k-B} .. L_{k,k-1}]`` ``(g, m, B m)``, ``m = cW``. Per block row: one
    ``syrk`` of the panel (``B m^3`` flops), one ``potrf`` (``m^3/3``), ``B(B-1)/2`` products
    (``2 m^3`` each) and one triangular solve of ``B`` blocks (``B m^3``). ``bar`` (a tqdm bar,
    optional) advances once per block row."""
    H, B, m = bg.H, bg.band, bg.block
    # rounding: the factorisation is exact for mu I - A + E, ||E|| <= c D u ||mu I - A||; shrink mu
    mu_eff = mu * (1 - 4 * (B + 1) * m * torch.finfo(torch.float64).eps)
    ok = torch.ones(bg.g, dtype=torch.bool)
    panels: dict[int, Tensor] = {}
    spare: list[Tensor] = []  # panels of finished rows, reused (a slot is written before it is read)
    for i in range(H):
        if bar is not None:
            bar.update()
        S = bg.blk(i, i, -1.0)
        S.diagonal(dim1=-2, dim2=-1).add_(mu_eff)
        if i > 0 and B > 0:
            _downdate(S, panels[i][..., (B - i) * m:].contiguous() if i < B else panels[i])
        Lii, ok_i = _factor(S)
        ok &= ok_i
        if not bool(ok.any()):
            break
        below = range(i + 1, min(H, i + B + 1))
        if not below:
            continue
        X = S.new_empty(bg.g, len(below) * m, m)  # the blocks of mu I - A below row i
        for n, k in enumerate(below):
            bg.blk(k, i, -1.0, out=X[:, n * m:(n + 1) * m])
        for n, k in enumerate(below):
            j0 = max(0, k - B)
            if j0 < i:  # - sum_{j0 <= j < i} L_kj L_ij^T
                X[:, n * m:(n + 1) * m].sub_(panels[k][..., (j0 - k + B) * m:(i - k + B) * m]
                                             @ panels[i][..., (j0 - i + B) * m:].mT)
        # L_ki = X_k L_ii^{-T}  <=>  L_ii L_ki^T = X_k^T (left-sided: faster than right-sided, engine internals)
        Lki = torch.linalg.solve_triangular(Lii, X.mT, upper=False).mT
        for n, k in enumerate(below):
            if k not in panels:
                panels[k] = spare.pop() if spare else Lki.new_empty(bg.g, m, B * m)
            panels[k][..., (i - k + B) * m:(i - k + B + 1) * m] = Lki[:, n * m:(n + 1) * m]
        if i in panels:
            spare.append(panels.pop(i))
    return ok.to(bg.Q.device)
