"""Gram blocks of a circulant convolution: ``K^(w)^H K^(w)`` (or ``K^(w) K^(w)^H``) per frequency.

The top eigenvalue of a Gram block is ``sigma_max(K^(w))^2``. Two routes produce the blocks,
both exact, and a flop count picks the cheaper (:func:`gram_plan`):

* **frequency** -- the symbol ``K^(w)`` (:func:`~sepconv.spectral.dft.symbol`), then one
  batched matmul per frequency;
* **spatial** -- usually much cheaper: the spatial Gram kernel
  ``G[delta] = sum_a K_a^T K_{a+delta}`` (``(2k-1)^2`` small matrices, :func:`spatial_gram`),
  whose DFT is the Gram block; for a real kernel :class:`HalfGram` takes that DFT as one *real*
  GEMM over half of the offsets, straight into LAPACK's packed storage
  (:func:`~sepconv.spectral.lapack.rfp_packing`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .dft import phases, symbol
from .lapack import rfp_packing, rfp_unpack

__all__ = ["GramPlan", "HalfGram", "gram_blocks", "gram_plan", "gram_symbol_from_spatial", "spatial_gram"]


def _offset_products(kernel: Tensor, side: str) -> Iterator[tuple[int, int, Tensor]]:
    """``(dh, dw, G[dh, dw])`` for the centre and one half of the offsets of the spatial Gram
    kernel (``dh > 0``, or ``dh == 0`` and ``dw >= 0``; row-major), ``G`` ``(g, m, m)``: one GEMM
    per kernel row pair, the taps of a row concatenated along the contracted axis (views, no
    copies). ``side="in"``: ``sum_a K_a^T K_{a + delta}``; ``"out"``: ``sum_a K_{a + delta} K_a^T``."""
    g, co, ci, qh, qw = kernel.shape
    m = ci if side == "in" else co
    # rows (tap, contracted channel), columns m; "out" uses K_a^T, so both sides read A^T B
    kp = (kernel.permute(0, 3, 4, 1, 2) if side == "in" else kernel.permute(0, 3, 4, 2, 1)).contiguous()
    for dh in range(qh):
        for dw in range(-(qw - 1), qw):
            if dh == 0 and dw < 0:
                continue
            lo_w, hi_w = max(0, -dw), min(qw, qw - dw)
            blk = None
            for a in range(qh - dh):
                A = kp[:, a, lo_w:hi_w].reshape(g, -1, m)
                B = kp[:, a + dh, lo_w + dw: hi_w + dw].reshape(g, -1, m)
                if side == "out":
                    A, B = B, A
                if g == 1:  # 2-D GEMMs thread within the product (batched ones only over the batch)
                    blk = (A[0].T @ B[0])[None] if blk is None else blk[0].addmm_(A[0].T, B[0])[None]
                else:
                    blk = A.mT @ B if blk is None else blk.baddbmm_(A.mT, B)
            yield dh, dw, blk


def spatial_gram(kernel: Tensor, side: str) -> Tensor:
    """The spatial Gram kernel of a stride-1 grouped kernel ``(g, co, ci, qh, qw)``.

    ``side="in"``: ``G[delta] = sum_a K_a^T K_{a + delta}`` (``ci x ci``), the kernel of
    ``T^T T``; ``side="out"``: ``sum_a K_{a + delta} K_a^T`` (``co x co``), that of ``T T^T``.
    Returns ``(g, 2 qh - 1, 2 qw - 1, m, m)`` with offset ``delta`` at index ``delta + q - 1``.
    Its DFT is exactly the Gram block ``K^(w)^H K^(w)`` (resp. ``K^(w) K^(w)^H``). Exact.
    GEMMs over one half of the offsets (``G[-delta] = G[delta]^T``).
    """
    g, co, ci, qh, qw = kernel.shape
    m = ci if side == "in" else co
    out = kernel.new_zeros(g, 2 * qh - 1, 2 * qw - 1, m, m)
    for dh, dw, blk in _offset_products(kernel, side):
        out[:, dh + qh - 1, dw + qw - 1] = blk
        out[:, qh - 1 - dh, qw - 1 - dw] = blk.mT
    return out


@dataclass(frozen=True)
class HalfGram:
    """A real spatial Gram kernel with odd extents ``(g, Dh, Dw, m, m)``, arranged for a real DFT.

    With ``G[-delta] = G[delta]^T``, ``G(w) = G[0] + sum_{delta > 0} cos(theta) (G[delta] + G[delta]^T)
    + i sin(theta) (G[delta]^T - G[delta])`` (``delta > 0``: the offsets after the centre, row-major).
    ``basis`` ``(1 + 2H, g L 2)`` holds ``G[0]``, the ``H`` symmetric and the ``H`` antisymmetric
    parts, each reduced to one triangle in rectangular full packed storage (``L = m (m + 1) / 2``
    entries, :func:`rfp_packing`) and laid out as the *interleaved* real and imaginary parts of
    complex entries (the first ``1 + H`` rows in the real slots, the last ``H`` in the imaginary
    ones). So one real GEMM by ``[1, cos, sin]`` writes packed complex blocks in place, ready
    for LAPACK's packed Cholesky (``?pftrf``), half the size of full blocks, and
    ``||G(w)||_F^2 = c(w)^T (basis W basis^T) c(w)`` comes without them (``W`` counts the
    off-diagonal entries twice)."""

    basis: Tensor
    shape: tuple[int, int, int, int, int]

    @staticmethod
    def _empty(like: Tensor, h: int, g: int, m: int) -> Tensor:
        return like.new_zeros(1 + 2 * h, g, m * (m + 1) // 2, 2)

    @staticmethod
    def of(gk: Tensor) -> HalfGram:
        """From a spatial Gram kernel (:func:`spatial_gram`)."""
        g, dh, dw, m, _ = gk.shape
        flat = gk.reshape(g, dh * dw, m * m)
        src = rfp_packing(m)[0].to(gk.device)
        h = dh * dw // 2  # the centre; G[-delta] = G[delta]^T sits at the mirrored flat index
        basis = HalfGram._empty(gk, h, g, m)
        basis[0, ..., 0] = flat[:, h, src]
        for j in range(h):  # offset h + 1 + j and its mirror h - 1 - j
            basis[1 + j, ..., 0] = (flat[:, h + 1 + j] + flat[:, h - 1 - j])[:, src]
            basis[1 + h + j, ..., 1] = (flat[:, h - 1 - j] - flat[:, h + 1 + j])[:, src]
        return HalfGram(basis.view(1 + 2 * h, -1), tuple(gk.shape))  # type: ignore[arg-type]

    @staticmethod
    def of_kernel(kernel: Tensor, side: str) -> HalfGram:
        """From a stride-1 grouped kernel ``(g, co, ci, qh, qw)`` directly (as :func:`spatial_gram`,
        without the mirrored half)."""
        g, co, ci, qh, qw = kernel.shape
        m = ci if side == "in" else co
        src, mirror, _ = (t.to(kernel.device) for t in rfp_packing(m))
        h = ((2 * qh - 1) * (2 * qw - 1)) // 2
        basis = HalfGram._empty(kernel, h, g, m)
        for j, (_, _, blk) in enumerate(_offset_products(kernel, side)):
            flat = blk.reshape(g, m * m)
            a = flat.index_select(1, src)  # (index_select: 3x faster than indexing here)
            if j == 0:
                basis[0, ..., 0] = a
            else:  # the entries of blk + blk^T and blk^T - blk
                b = flat.index_select(1, mirror)
                torch.add(a, b, out=basis[j, ..., 0])
                torch.sub(b, a, out=basis[h + j, ..., 1])
        return HalfGram(basis.view(1 + 2 * h, -1), (g, 2 * qh - 1, 2 * qw - 1, m, m))

    def coefficients(self, grid: Sequence[int], fh: Tensor, fw: Tensor) -> Tensor:
        """``[1, cos(theta), sin(theta)]`` per frequency: ``(F, 1 + 2H)``."""
        _, dh, dw, _, _ = self.shape
        dev = self.basis.device
        c, s = phases(fh, fw, grid, torch.arange(dh // 2 + 1, device=dev),
                       torch.arange(dw, device=dev) - (dw - 1) // 2, self.basis.dtype)
        return torch.cat([c[dw // 2:], s[dw // 2 + 1:]]).T  # row dw // 2 is the centre: cos 0 = 1

    def packed_at(self, coef: Tensor, sign: float = 1.0, shift: float = 0.0,
                  work: list[Tensor] | None = None) -> Tensor:
        """Packed blocks ``shift I + sign G(w)`` ``(F, g, L)`` complex (:func:`rfp_packing`) from
        :meth:`coefficients` ``(F, 1 + 2H)``, by one real GEMM. ``work`` (a list, initially empty)
        keeps the buffer for the next call of the same or a smaller size: the result is then a
        view of it, valid until that call."""
        g, _, _, m, _ = self.shape
        F = coef.shape[0]
        if sign != 1.0:
            coef = coef * sign
        if work is None:
            out = torch.mm(coef, self.basis)
        else:
            if not work or work[0].shape[0] < F:
                work[:] = [self.basis.new_empty(F, self.basis.shape[1])]
            out = torch.mm(coef, self.basis, out=work[0][:F])
        out = torch.view_as_complex(out.view(F, g, -1, 2))
        if shift:
            out[..., rfp_packing(m)[2].to(out.device)] += shift
        return out

    def blocks(self, grid: Sequence[int], fh: Tensor, fw: Tensor, sign: float = 1.0, shift: float = 0.0) -> Tensor:
        """Full blocks ``shift I + sign G(w)`` at the given frequencies: ``(F, g, m, m)`` complex."""
        return rfp_unpack(self.packed_at(self.coefficients(grid, fh, fw), sign, shift), self.shape[3])

    def scores(self, grid: Sequence[int], fh: Tensor, fw: Tensor) -> Tensor:
        """``||G(w)||_F^2`` at the given frequencies, per group: ``(F, g)``, from the Gram matrix of
        the basis rows (no blocks formed). Exact."""
        g, m = self.shape[0], self.shape[3]
        rows = self.basis.view(self.basis.shape[0], g, -1, 2).transpose(0, 1)  # (g, R, L, 2)
        diag = rows[:, :, rfp_packing(m)[2].to(rows.device)].flatten(2)
        rows = rows.flatten(2)
        gram = 2 * (rows @ rows.mT) - diag @ diag.mT  # (g, R, R): off-diagonal entries stand for two
        coef = self.coefficients(grid, fh, fw)  # (F, R)
        return ((coef @ gram) * coef).sum(-1).T


def gram_symbol_from_spatial(gk: Tensor | HalfGram, grid: Sequence[int], fh: Tensor, fw: Tensor, sign: float = 1.0,
                             shift: float = 0.0) -> Tensor:
    """DFT of a spatial Gram kernel ``(g, Dh, Dw, m, m)`` at the given frequencies, times ``sign``,
    plus ``shift`` on the diagonal: ``(F, g, m, m)`` Hermitian blocks ``shift I + sign G(w)``
    (up to rounding; the consumers read one triangle). Exact.

    A real kernel with odd ``Dh, Dw`` (every :func:`spatial_gram`; or its :class:`HalfGram`)
    takes two *real* GEMMs over half of the offsets -- a quarter of the flops of one complex
    GEMM over all offsets (the fallback otherwise).
    """
    if isinstance(gk, HalfGram):
        return gk.blocks(grid, fh, fw, sign, shift)
    g, dh, dw, m, _ = gk.shape
    if not gk.is_complex() and dh % 2 == 1 and dw % 2 == 1:
        return HalfGram.of(gk).blocks(grid, fh, fw, sign, shift)
    c, s = phases(fh, fw, grid, torch.arange(dh, device=gk.device) - (dh - 1) // 2,
                   torch.arange(dw, device=gk.device) - (dw - 1) // 2, gk.dtype.to_real())
    cplx = torch.complex(sign * c, -sign * s).T  # (F, D)
    out = (cplx @ gk.reshape(g, dh * dw, m * m).to(cplx.dtype)).transpose(0, 1).reshape(fh.numel(), g, m, m)
    if shift:
        out.diagonal(dim1=-2, dim2=-1).add_(shift)
    return out


@dataclass(frozen=True)
class GramPlan:
    """How to produce the Gram blocks of one circulant problem: the side (``in``: ``K^H K``,
    ``out``: ``K K^H``), the block size ``m``, and the route (spatial Gram kernel + DFT, or the
    frequency symbol + batched matmul) chosen by a flop count."""

    side: str
    m: int
    spatial: bool


def gram_plan(kernel: Tensor, n_freq: int) -> GramPlan:
    """The :class:`GramPlan` of a stride-1 grouped kernel ``(g, co, ci, qh, qw)`` over ``n_freq``
    frequencies: the smaller side (``m = min(ci, co)``), and the spatial route when its flop count
    does not exceed the frequency route's. Leading terms per group, with ``t = qh qw`` taps,
    ``D = (2 qh - 1)(2 qw - 1)`` offsets, ``c`` the larger side and ``F = n_freq``: spatial
    ``t^2 m^2 c`` (:func:`spatial_gram`) ``+ 2 D m^2 F`` (its real DFT); frequency ``2 co ci t F``
    (:func:`~sepconv.spectral.dft.symbol`) ``+ 4 F m^2 c`` (the complex products)."""
    g, co, ci, qh, qw = kernel.shape
    side, m, big = ("in", ci, co) if ci <= co else ("out", co, ci)
    t, d2 = qh * qw, (2 * qh - 1) * (2 * qw - 1)
    spatial_cost = t * t * m * m * big + 2 * d2 * m * m * n_freq
    freq_cost = 2 * co * ci * t * n_freq + 4 * n_freq * m * m * big
    return GramPlan(side, m, spatial_cost <= freq_cost)


def gram_blocks(kernel: Tensor, grid: Sequence[int], fh: Tensor, fw: Tensor, plan: GramPlan,
                spatial: Tensor | HalfGram | None = None) -> Tensor:
    """Gram blocks ``(F, g, m, m)`` at the given frequencies, by the route of ``plan``
    (``spatial`` is the precomputed spatial Gram kernel, or its :class:`HalfGram`, when the plan uses it)."""
    if plan.spatial:
        if spatial is None:
            spatial = HalfGram.of_kernel(kernel, plan.side)
        return gram_symbol_from_spatial(spatial, grid, fh, fw)
    k = symbol(kernel, grid, fh, fw)  # (F, g, co, ci)
    return k.mH @ k if plan.side == "in" else k @ k.mH

