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
"""

from __future__ import annotations

import torch
from torch import Tensor

from .spec import ConvSpec, tap_matrices_1d, tap_sources_1d

__all__ = ["BandedGram", "band_of", "certificate_cost", "cholesky_certificate"]


def _row_sources(weight: Tensor, spec: ConvSpec) -> Tensor:
    kh = weight.shape[-2]
    t, b = spec.pads(weight.shape[-2:])[:2]
    return tap_sources_1d(spec.in_size[0], kh, spec.stride[0], spec.dilation[0], t, b, spec.padding_mode)


def _band(Sh: Tensor) -> int:
    nz = torch.nonzero(Sh.abs().sum((0, 1)) > 0)
    return int((nz[:, 0] - nz[:, 1]).abs().max()) if nz.numel() else 0


def band_of(sources: Tensor) -> int:
    """The block bandwidth of ``A = T^T T`` from the row sources (:func:`~.spec.tap_sources_1d`):
    the largest distance between two input rows read by one output row (padding zeros excluded).
    Exact, ``O(k^2 n)`` -- equal to :func:`_band` of the ``(k, k, H, H)`` row products."""
    valid = sources >= 0
    if not bool(valid.any()):
        return 0
    big, small = sources.masked_fill(~valid, -1).amax(0), sources.masked_fill(~valid, 2**62).amin(0)
    seen = valid.any(0)
    return int((big - small)[seen].max())


def certificate_cost(weight: Tensor, spec: ConvSpec) -> tuple[float, float]:
    """``(flops, bytes)`` of :class:`BandedGram` + :func:`cholesky_certificate`, without building
    anything larger than the kernel (the band from the tap sources, ``O(k^2 H)``). The bytes count
    the ``Q`` blocks (and their reordering copy), the row/column tap products and the kept factor rows."""
    B = band_of(_row_sources(weight, spec))
    g, (H, W), (kh, kw) = spec.groups, spec.in_size, weight.shape[-2:]
    m = float(weight.shape[1] * W)
    taps = 8.0 * (kh * kh * H * H + kw * kw * W * W)
    return g * H * (1 / 3 + B + B * B + 1) * m ** 3, 8.0 * g * (2 * kh * kh + (B + 1) ** 2 + 2) * m ** 2 + taps


class BandedGram:
    """The Gram operator ``A = T^T T`` of ``(weight, spec)`` as a block-banded matrix: image rows
    are block rows, blocks ``(g, cW, cW)`` (``c = C_in/g``), bandwidth :attr:`band` block rows."""

    def __init__(self, weight: Tensor, spec: ConvSpec):
        kh, kw = spec.check(weight)
        t, b, l, r = spec.pads((kh, kw))
        H, W = spec.in_size
        mode = spec.padding_mode
        w = weight.detach().to(torch.float64)
        g = spec.groups
        co, ci = w.shape[0] // g, w.shape[1]
        self.g, self.c, self.H, self.W = g, ci, H, W
        Ph = tap_matrices_1d(H, kh, spec.stride[0], spec.dilation[0], t, b, mode).to(w.device)
        Pw = tap_matrices_1d(W, kw, spec.stride[1], spec.dilation[1], l, r, mode).to(w.device)
        self.Sh = torch.einsum("ayx,byz->abxz", Ph, Ph)  # (kh, kh, H, H): P_a^T P_b
        Sw = torch.einsum("ayx,byz->abxz", Pw, Pw)  # (kw, kw, W, W)
        K = w.reshape(g, co, ci, kh, kw)
        M = torch.einsum("goiab,gojcd->gabicdj", K, K)  # (g, kh, kw, ci, kh, kw, ci): K_a^T K_b
        # Q[g, a_h, b_h] = sum_{a_w, b_w} M[.., a_w, .., b_w, ..] (x) Sw[a_w, b_w]  ->  (g, kh, kh, ci*W, ci*W)
        Q = torch.einsum("gpuiqvj,uvxz->gpqixjz", M, Sw)
        self.Q = Q.reshape(g, kh, kh, ci * W, ci * W)
        self.band = _band(self.Sh)

    @property
    def block(self) -> int:
        return self.c * self.W

    def blk(self, i: int, j: int) -> Tensor:
        """The block ``A[row i, row j]``, ``(g, cW, cW)``."""
        return torch.einsum("pq,gpqxy->gxy", self.Sh[:, :, i, j], self.Q)

    def dense(self) -> Tensor:
        """``A`` assembled (rows ordered ``(h, c, w)``), ``(g, c H W, c H W)``: for tests."""
        rows = [torch.cat([self.blk(i, j) for j in range(self.H)], -1) for i in range(self.H)]
        return torch.cat(rows, -2)


def cholesky_certificate(bg: BandedGram, mu: float) -> Tensor:
    """Per group, whether ``mu I - A`` is certified positive definite, i.e. ``sigma_max <= sqrt(mu)``
    up to the rounding margin (returns ``(g,)`` bools). A block Cholesky factorisation of the
    block-banded matrix, row by row, keeping only the last ``band`` block rows of the factor."""
    H, B, m = bg.H, bg.band, bg.block
    eye = torch.eye(m, dtype=torch.float64, device=bg.Q.device)
    # rounding: the factorisation is exact for mu I - A + E, ||E|| <= c D u ||mu I - A||; shrink mu
    mu_eff = mu * (1 - 4 * (B + 1) * m * torch.finfo(torch.float64).eps)
    ok = torch.ones(bg.g, dtype=torch.bool, device=bg.Q.device)
    L: dict[tuple[int, int], Tensor] = {}
    for i in range(H):
        S = mu_eff * eye - bg.blk(i, i)
        for j in range(max(0, i - B), i):
            S = S - L[(i, j)] @ L[(i, j)].mT
        Lii, info = torch.linalg.cholesky_ex(S)
        ok &= info == 0
        if not bool(ok.any()):
            return ok
        Lii = torch.where((info == 0)[:, None, None], Lii, eye)  # failed groups: keep going harmlessly
        L[(i, i)] = Lii
        for k in range(i + 1, min(H, i + B + 1)):
            X = -bg.blk(k, i)
            for j in range(max(0, k - B), i):
                X = X - L[(k, j)] @ L[(i, j)].mT
            # L_ki = X L_ii^{-T}  <=>  L_ii L_ki^T = X^T
            L[(k, i)] = torch.linalg.solve_triangular(Lii, X.mT, upper=False).mT
        for key in [key for key in L if key[1] <= i - B]:
            del L[key]
    return ok
