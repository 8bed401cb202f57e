"""Exact singular values of circulant convolutions: the largest one without a full SVD, and all.

A circular convolution on an ``N_h x N_w`` grid is diagonalised by the 2-D DFT: it acts on
frequency ``w`` as the ``C_out x C_in`` matrix ``K^(w)`` (Sedghi, Gupta, Long 2019, Thm. 6;
docs/spectral.md Sec. 1), so its singular values are those of the frequency blocks. This module
finds their maximum (:func:`block_max`, certified by Cholesky tests), makes it differentiable
(:func:`block_value`) and lists them all (:func:`all_block_singular_values`). The pieces it
stands on each have a module of their own:

* :mod:`~sepconv.spectral.circulant` -- a convolution as a circulant problem: the majorant
  geometry, the exact stride-1 kernel (dilation, stride, groups), the memory estimate;
* :mod:`~sepconv.spectral.dft` -- frequency grids, the blocks ``K^(w)``, frequency chunks;
* :mod:`~sepconv.spectral.gram` -- the Gram blocks ``K^(w)^H K^(w)``, from the spatial Gram
  kernel by a real DFT or from the symbol;
* :mod:`~sepconv.spectral.lanczos` -- lower estimates of top eigenvalues (Lanczos, ARPACK);
* :mod:`~sepconv.spectral.lapack` -- LAPACK threads, Cholesky definiteness tests, packed storage.

Their public names are re-exported here, where the rest of the package has always found them.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from . import validate
from .circulant import Majorant, circulant_kernel, majorant, problem_bytes
from .dft import (
    CHUNK_BYTES,
    all_frequencies,
    chunks,
    phases,
    symbol,
    unique_frequencies,
    vector_block_power,
    vector_block_power_at,
)
from .gram import GramPlan, HalfGram, gram_blocks, gram_plan, gram_symbol_from_spatial, spatial_gram
from .lanczos import lanczos, lanczos_top, rayleigh_quotient, rough_top, top_vector
from .lapack import (
    blas_one_thread,
    indefinite,
    indefinite_packed,
    lapack_threads,
    on_scipy,
    rfp_packing,
    rfp_unpack,
)

__all__ = [
    # this module
    "BlockMax", "CERTIFY_BYTES", "EIG_BLOCK", "EIG_WORK", "N_CANDIDATES", "N_REFINED", "ROUGH_STEPS", "SMALL_BLOCK",
    "all_block_singular_values", "block_max", "block_value",
    # re-exported from the modules it stands on
    "CHUNK_BYTES", "GramPlan", "HalfGram", "Majorant", "all_frequencies", "blas_one_thread", "chunks",
    "circulant_kernel", "gram_blocks", "gram_plan", "gram_symbol_from_spatial", "indefinite", "indefinite_packed",
    "lanczos", "lanczos_top", "lapack_threads", "majorant", "on_scipy", "phases", "problem_bytes",
    "rayleigh_quotient", "rfp_packing", "rfp_unpack", "rough_top", "spatial_gram", "symbol", "top_vector",
    "unique_frequencies", "vector_block_power", "vector_block_power_at",
]

# NB: the old private names, still read by tests and benchmarks/bench_engine.py
_packing, _unpack, _blas_one_thread = rfp_packing, rfp_unpack, blas_one_thread

#: Blocks up to this size get a full eigvalsh; larger ones the certify-by-Cholesky path.
SMALL_BLOCK = 12
#: ... and so do all blocks when ``F g m^3`` is at most this: a batched ``eigvalsh`` of them all
#: then costs less than the certification's fixed overhead (~5 ms here; 16x16 blocks at 8x8: 0.5 ms).
EIG_WORK = 4_000_000
#: Candidate blocks estimated (Lanczos) before the certification pass, for 64 x 64 blocks (fewer if larger).
N_CANDIDATES = 8
#: Least memory (bytes) of one chunk of the certification pass: about the L2 cache, so that the DFT's
#: output is still there when its Cholesky reads it (chunks grow to the size of the DFT's basis,
#: which each chunk reads once).
CERTIFY_BYTES = 2**20
#: Candidates solved exactly (``eigvalsh``, blocks up to :data:`EIG_BLOCK`), the top ones by rough estimate.
N_REFINED = 4
#: Lanczos steps of the rough estimates that pick which failing block to estimate to convergence.
ROUGH_STEPS = 20
#: Up to this block size the picked blocks get an exact ``eigvalsh`` (cheaper than Lanczos there).
EIG_BLOCK = 128


@dataclass(frozen=True)
class BlockMax:
    """Largest Gram eigenvalue (``sigma_max^2``) over the frequency blocks of one circulant problem.

    ``value`` is a lower bound of the largest eigenvalue of the maximising block, up to rounding:
    an eigenvalue (LAPACK ``eigvalsh``, backward stable) or the float64 Rayleigh quotient of a
    Lanczos Ritz vector (:func:`lanczos_top`); every block is certified ``<= upper`` (a Cholesky
    factorisation of ``mu I - G(w)`` succeeded for some ``mu <= upper``, or its eigenvalues were
    computed). ``freq`` ``(u, v)`` and ``group`` locate the maximising block."""

    value: float
    upper: float
    freq: tuple[int, int]
    group: int


def _peak_candidates(half: HalfGram, grid: Sequence[int], fh: Tensor, fw: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """Scores and candidates for :func:`block_max`: the Frobenius norms of all unique blocks
    (flat index = unique frequency * g + group), and ``n`` candidates -- the largest local maxima
    of that norm over the periodic frequency grid (one per peak of the symbol rather than
    neighbours on the same peak), then the largest norms overall (on a flat, random-like
    symbol the top block is rarely a peak)."""
    g, dev = half.shape[0], half.basis.device
    ah, aw = all_frequencies(grid, dev)
    full = half.scores(grid, ah, aw).T.reshape(g, grid[0], grid[1])
    score = full[:, fh, fw].T.flatten()
    peak = torch.ones_like(full, dtype=torch.bool)
    for dh in (-1, 0, 1):
        for dw in (-1, 0, 1):
            if dh or dw:
                peak &= full >= torch.roll(full, (dh, dw), (1, 2))
    vals = torch.where(peak, full, torch.full_like(full, -1.0))
    # representative of each (u, v): its position in the unique list, or that of (-u, -v)
    pos = torch.full(grid, -1, dtype=torch.long, device=dev)
    pos[(-fh) % grid[0], (-fw) % grid[1]] = torch.arange(fh.numel(), device=dev)
    pos[fh, fw] = torch.arange(fh.numel(), device=dev)
    top = vals.flatten().topk(min(4 * n, vals.numel())).indices  # (group, u, v) flat; twins appear twice
    grp, uv = top // (grid[0] * grid[1]), top % (grid[0] * grid[1])
    peaks = torch.unique_consecutive(pos.flatten()[uv] * g + grp)[: n - n // 2]
    # and the largest scores overall: on a flat (random-like) symbol the top block is rarely a peak
    rest = score.topk(min(score.numel(), n)).indices
    rest = rest[~torch.isin(rest, peaks)][: n // 2]
    return score, torch.cat([peaks, rest])


def block_max(kernel: Tensor, grid: Sequence[int], tol: float = 1e-6) -> BlockMax:
    """``max_w sigma_max(K^(w))^2`` over the unique frequencies of ``grid`` and all groups.

    ``kernel`` is a stride-1 grouped kernel (:func:`circulant_kernel`). Exact: vector blocks
    (depthwise) by the closed form :func:`vector_block_power`; blocks up to
    :data:`SMALL_BLOCK` get their eigenvalues; larger ones are never fully decomposed --
    peak candidates (the blocks of largest Frobenius norm, and the local maxima of that norm
    over the grid) get rough Lanczos estimates (:func:`rough_top`), the top ones an exact
    ``eigvalsh`` (blocks up to :data:`EIG_BLOCK`) or a converged ARPACK estimate
    (:func:`top_vector`), a *lower* bound ``best``; every block is then *certified* below
    ``best (1 + tol)^2`` by one Cholesky factorisation of ``mu I - G(w)`` (positive definite iff
    ``lambda_max(G(w)) < mu``), in packed storage (:func:`indefinite_packed`), in chunks about
    the size of the DFT's basis, the blocks of largest Frobenius norm first. A block that fails
    gets its own estimate (raising ``best``) and is re-tested in float64; only if that fails
    too is it solved exactly (``eigvalsh``). So ``value <= max <= upper`` whatever the accuracy of
    the estimates, which only decide how often blocks are re-tested. The Gram blocks come from
    the spatial Gram kernel by a real DFT (:class:`HalfGram`) or from :func:`gram_blocks`.
    Cost ``~ F m^3 / 3`` instead of the ``~ 20 F m^3`` of a full per-frequency SVD (Sedghi et
    al. 2019). Certified up to the rounding of the Cholesky factorisation in ``kernel.dtype``
    (relative ``O(m u)``; float64 recommended for guarantees). For float64 kernels the blocks are
    first screened by a float32 Cholesky of ``mu (1 - 16 m eps_32) I - G(w)``: its success
    certifies ``lambda_max < mu`` under the same rounding model (the margin covers the float32
    factorisation, ``8 m eps_32``, and the rounding to float32); only the blocks that fail it
    take the float64 test.
    """
    with torch.no_grad(), blas_one_thread():  # GEMMs on torch's threads; LAPACK calls on one
        if min(kernel.shape[1], kernel.shape[2]) == 1:  # vector blocks (depthwise): |K^(w)|^2 by FFT
            power = vector_block_power(kernel, grid)  # (g, Mh, Mw//2 + 1)
            i = int(power.argmax())
            g_i, u, v = i // power[0].numel(), (i // power.shape[2]) % power.shape[1], i % power.shape[2]
            best = float(power.flatten()[i])
            return BlockMax(best, best * (1 + 16 * torch.finfo(kernel.dtype).eps), (u, v), g_i)
        fh, fw = unique_frequencies(grid, kernel.device)
        F_, g = fh.numel(), kernel.shape[0]
        plan = gram_plan(kernel, F_)
        m = plan.m
        if m <= SMALL_BLOCK or F_ * g * m ** 3 <= EIG_WORK:  # small: every block's eigenvalues, in float64
            k64 = kernel.to(torch.float64)
            half = HalfGram.of_kernel(k64, plan.side) if plan.spatial else None
            per_freq = 2 * 8 * g * 3 * max(m * m, 0 if plan.spatial else kernel.shape[1] * kernel.shape[2])
            best, arg = -1.0, 0
            for sl in chunks(F_, per_freq):
                G = gram_blocks(k64, grid, fh[sl], fw[sl], plan, half)
                with lapack_threads():
                    lam = torch.linalg.eigvalsh(G)[..., -1]  # (f, g)
                i = int(lam.argmax())
                if float(lam.flatten()[i]) > best:
                    best, arg = float(lam.flatten()[i]), sl.start * g + i
            f, grp = (int(fh[arg // g]), int(fw[arg // g])), arg % g
            return BlockMax(best, best * (1 + 16 * m * torch.finfo(torch.float64).eps), f, grp)
        half = HalfGram.of_kernel(kernel, plan.side) if plan.spatial else None
        return _certified_block_max(kernel, grid, tol, fh, fw, plan, half)


class _Certification:
    """The Cholesky-certified path of :func:`block_max` on one problem (blocks larger than
    :data:`SMALL_BLOCK`, and more work than :data:`EIG_WORK`): the Gram blocks on demand, the
    converged estimates so far, and the best lower bound ``best`` with its flat index ``arg``
    (``frequency * g + group``). :func:`_certified_block_max` runs its steps in order."""

    def __init__(self, kernel: Tensor, grid: Sequence[int], tol: float, fh: Tensor, fw: Tensor, plan: GramPlan,
                 half: HalfGram | None) -> None:
        self.kernel, self.grid, self.tol, self.fh, self.fw, self.plan, self.half = kernel, grid, tol, fh, fw, plan, half
        self.F, self.g, self.m = fh.numel(), kernel.shape[0], plan.m
        self.rtol = min(tol / 10, 1e-4)  # estimates' target (the certificate below is what guarantees)
        self.coef = half.coefficients(grid, fh, fw) if half is not None else None
        self.known: dict[int, float] = {}  # converged estimates (flat index -> lower bound)
        self.exact: set[int] = set()  # ... of which exact eigenvalues (the block is certified by them)
        self.best, self.arg = -1.0, 0

    def gram_at(self, fi: Tensor, sign: float = 1.0, shift: float = 0.0) -> Tensor:
        """``shift I + sign G(w)`` at unique-frequency indices ``fi``: ``(len(fi), g, m, m)``."""
        if self.half is not None:
            return rfp_unpack(self.half.packed_at(self.coef[fi], sign, shift), self.m)
        G = gram_blocks(self.kernel, self.grid, self.fh[fi], self.fw[fi], self.plan)
        if sign != 1.0:
            G.neg_()
        if shift:
            G.diagonal(dim1=-2, dim2=-1).add_(shift)
        return G

    def gram_flat(self, idx: Tensor) -> Tensor:
        """Gram blocks ``(len(idx), m, m)`` at flat indices ``frequency * g + group``."""
        return self.gram_at(idx // self.g)[torch.arange(idx.numel(), device=idx.device), idx % self.g]

    def candidates(self) -> tuple[Tensor, Tensor]:
        """The Frobenius norms of all blocks (flat indices) and the candidates: the largest norms and
        the local maxima of that norm over the grid (distinct peaks); ``arg`` starts at the first."""
        F_, g, m, kernel = self.F, self.g, self.m, self.kernel
        n_cand = max(1, min(F_ * g // 4, N_CANDIDATES * (4 if m <= EIG_BLOCK else 1)))
        if self.half is not None:
            score, cand = _peak_candidates(self.half, self.grid, self.fh, self.fw, n_cand)
        else:
            per_freq = 2 * kernel.element_size() * g * 3 * max(m * m, kernel.shape[1] * kernel.shape[2])
            score = torch.cat([torch.view_as_real(self.gram_at(torch.arange(sl.start, sl.stop, device=self.fh.device)))
                               .square().sum((-3, -2, -1)).flatten() for sl in chunks(F_, per_freq)])
            cand = score.topk(n_cand).indices
        self.arg = int(cand[0])
        return score, cand

    def raise_best(self, idx: Tensor, lam: Tensor) -> None:
        i = int(lam.argmax())
        if float(lam[i]) > self.best:
            self.best, self.arg = float(lam[i]), int(idx[i])

    def refine(self, i: int, G: Tensor, start: Tensor | None) -> None:
        """The top eigenvalue of the block ``G`` ``(1, m, m)`` (flat index ``i``), raising ``best``:
        exact (``eigvalsh``, certifying the block) up to :data:`EIG_BLOCK`, where it costs less
        than Lanczos; else the float64 Rayleigh quotient of a converged :func:`top_vector` (a lower bound)."""
        known = self.known
        if i not in known:
            if self.m <= EIG_BLOCK:
                with lapack_threads():
                    known[i] = float(torch.linalg.eigvalsh(G)[0, -1])
                self.exact.add(i)
            else:  # the quotient on G itself: a lower bound whatever the vector
                known[i] = float(rayleigh_quotient(G, top_vector(G, self.rtol, start)))
        self.raise_best(torch.tensor([i]), torch.tensor([known[i]], dtype=torch.float64))

    def refine_candidates(self, cand: Tensor) -> None:
        """The first ``best``: the top candidates by rough estimate (:func:`rough_top`), refined."""
        G = self.gram_flat(cand)
        theta, y = rough_top(G, ROUGH_STEPS) if G.shape[0] > 1 else (torch.zeros(1, dtype=torch.float64), None)
        for r in theta.argsort(descending=True)[:N_REFINED if self.m <= EIG_BLOCK else 1].tolist():
            self.refine(int(cand[r]), G[r: r + 1], None if y is None else y[r: r + 1])

    @staticmethod
    def most_promising(G: Tensor) -> tuple[int, Tensor | None]:
        """Position of the block worth a converged estimate -- the top one by :func:`rough_top`
        (:data:`ROUGH_STEPS` steps, also a lower estimate) -- and its vector, to start from."""
        if G.shape[0] == 1:
            return 0, None
        theta, y = rough_top(G, ROUGH_STEPS)
        i = int(theta.argmax())
        return i, y[i: i + 1]

    def fails(self, G: Tensor) -> Tensor:
        """Which blocks ``G`` fail the certificate at ``best (1 + tol)^2``."""
        A = -G
        A.diagonal(dim1=-2, dim2=-1).add_(self.best * (1 + self.tol) ** 2)
        return indefinite(A)

    def test64(self, idx: Tensor, G: Tensor, pick: int) -> None:
        """Re-test the block ``G[pick]`` in float64; if even that fails, solve it exactly."""
        G64 = G[pick: pick + 1].to(torch.complex128 if G.is_complex() else torch.float64)
        if bool(self.fails(G64)):  # the estimate was not good enough to certify its own block
            with lapack_threads():
                self.raise_best(idx[pick: pick + 1], torch.linalg.eigvalsh(G64)[..., -1])

    def settle(self, idx: Tensor, G: Tensor) -> None:
        """Blocks ``G`` (flat indices ``idx``) that failed the certificate at the current ``mu``: in
        rounds, estimate the most promising one (raising ``best``) and re-test the others at the
        raised ``mu``. The estimated block is re-tested in float64 if it still fails (the
        certificate's rounding is then far below ``tol``), and solved exactly (``eigvalsh``) if
        even that fails."""
        pending = torch.arange(idx.numel(), device=idx.device)
        for pick in [p for p in pending.tolist() if int(idx[p]) in self.known]:  # estimated already: a
            self.test64(idx, G, pick)  # failure is the test's rounding (a block at the top), so float64 at once
            pending = pending[pending != pick]
        while pending.numel():
            i, start = self.most_promising(G[pending])
            pick = int(pending[i])
            self.refine(int(idx[pick]), G[pick: pick + 1], start)
            if int(idx[pick]) in self.exact:
                pending = pending[pending != pick]
            if pending.numel():
                pending = pending[self.fails(G[pending])]
            if bool((pending == pick).any()):
                self.test64(idx, G, pick)
                pending = pending[pending != pick]

    def certify(self, score: Tensor) -> float:
        """Certify every block below ``mu = best (1 + tol)^2`` by Cholesky of ``mu I - G``, in chunks, the
        largest Frobenius norms first, settling the blocks that fail; returns the final ``mu``."""
        F_, g, m, kernel, half, fh = self.F, self.g, self.m, self.kernel, self.half, self.fh
        cdt = torch.complex128 if kernel.dtype == torch.float64 else torch.complex64
        order = score.view(F_, g).amax(1).argsort(descending=True)
        mu = self.best * (1 + self.tol) ** 2
        work: list[Tensor] = []
        screen = 16 * m * torch.finfo(torch.float32).eps if kernel.dtype == torch.float64 else 0.0
        # chunks of about the size of the DFT's basis (read once per chunk), at least CERTIFY_BYTES
        budget = min(CHUNK_BYTES, max(CERTIFY_BYTES, half.basis.nbytes if half is not None else 0))
        block_bytes = g * (m * (m + 1) // 2 if half is not None else m * m) * torch.empty((), dtype=cdt).element_size()
        test = functools.partial(indefinite_packed, m=m) if half is not None else indefinite
        diag = rfp_packing(m)[2].to(fh.device) if half is not None else None
        for sl in chunks(F_, block_bytes, budget):
            fi = order[sl]
            if half is not None:  # packed blocks, half the memory traffic of full ones
                A = half.packed_at(self.coef[fi], -1.0, mu, work).view(len(fi) * g, -1)
            else:
                A = self.gram_at(fi, -1.0, mu).view(-1, m, m)
            if screen:  # float64: a float32 Cholesky at mu (1 - screen) certifies as well, at half the cost
                A32 = A.to(torch.complex64)
                if diag is not None:
                    A32[:, diag] -= screen * mu
                else:
                    A32.diagonal(dim1=-2, dim2=-1).sub_(screen * mu)
                failed = torch.nonzero(test(A32)).flatten()
                if failed.numel():  # near mu: the float64 test
                    failed = failed[test(A[failed])]
            else:
                failed = torch.nonzero(test(A)).flatten()  # A now holds factors
            if failed.numel():
                idx = fi[failed // g] * g + failed % g
                self.settle(idx, self.gram_flat(idx))
                mu = max(mu, self.best * (1 + self.tol) ** 2)
        return mu


def _certified_block_max(kernel: Tensor, grid: Sequence[int], tol: float, fh: Tensor, fw: Tensor, plan: GramPlan,
                         half: HalfGram | None) -> BlockMax:
    """The Cholesky-certified path of :func:`block_max` (blocks larger than :data:`SMALL_BLOCK`, and
    more work than :data:`EIG_WORK`): candidates, their estimates, then the certification pass."""
    run = _Certification(kernel, grid, tol, fh, fw, plan, half)
    score, cand = run.candidates()
    run.refine_candidates(cand)
    mu = run.certify(score)
    best, j, g = run.best, run.arg, run.g
    rounding = 8 * plan.m * torch.finfo(kernel.dtype).eps
    return BlockMax(best, max(mu, best) * (1 + rounding), (int(fh[j // g]), int(fw[j // g])), j % g)


def block_value(kernel: Tensor, grid: Sequence[int], freq: tuple[int, int], group: int,
                lam: float | None = None) -> Tensor:
    """``sigma_max(K^(w))`` of one block, differentiable with respect to ``kernel``.

    Computed as ``||K^(w) v||`` with ``v`` the top right singular vector held constant -- found
    by shifted inverse iteration on the Gram block, from its top eigenvalue ``lam`` when known
    -- which has the gradient of ``sigma_max`` (and the gradient of a maximum over blocks is
    that of its maximising block). Without a gradient to record, ``sqrt(lam)`` itself."""
    if lam is not None and not (kernel.requires_grad and torch.is_grad_enabled()):
        return torch.tensor(math.sqrt(max(lam, 0.0)), dtype=kernel.dtype, device=kernel.device)
    fh = torch.tensor([freq[0]], device=kernel.device)
    fw = torch.tensor([freq[1]], device=kernel.device)
    blk = symbol(kernel[group: group + 1], grid, fh, fw)[0, 0]
    if min(blk.shape) == 1:
        return blk.abs().pow(2).sum().sqrt()
    if max(blk.shape) <= SMALL_BLOCK:
        return torch.linalg.matrix_norm(blk, ord=2)
    with torch.no_grad(), lapack_threads():
        G = blk.mH @ blk
        if lam is None:
            lam = float(torch.linalg.eigvalsh(G)[-1])
        A = -G  # (lam (1 + 1e-3)) I - G is positive definite, nearly singular along the top vector
        A.diagonal().add_(lam * (1 + 1e-3) + torch.finfo(kernel.dtype).tiny)
        L = torch.linalg.cholesky_ex(A).L
        gen = torch.Generator(device="cpu").manual_seed(0)
        v = torch.randn(G.shape[-1], 1, generator=gen, dtype=kernel.dtype).to(G)
        for _ in range(6):
            v = torch.cholesky_solve(v, L)
            v = v / torch.linalg.vector_norm(v)
    return torch.linalg.vector_norm(blk @ v)


def all_block_singular_values(kernel: Tensor, grid: Sequence[int]) -> Tensor:
    """Every singular value of the circulant operator: the union over all frequencies (and
    groups) of the singular values of ``K^(w)``, sorted descending (Sedghi et al. 2019,
    Thm. 6). Exact; a full SVD per frequency, in chunks. Refused
    (:class:`~sepconv.errors.ResourceError`) when the result and its sort would exceed the
    default memory budget (2 GiB, :func:`sepconv.spectral.validate.budget`)."""
    g, co, ci = kernel.shape[:3]
    n = grid[0] * grid[1]
    validate.check_memory(3 * n * g * min(co, ci) * 8 + 4 * n * 8,
                          f"all_block_singular_values: {n * g * min(co, ci)} singular values of {g} group(s) of "
                          f"{co}x{ci} blocks on a {grid[0]}x{grid[1]} grid")
    fh, fw = all_frequencies(grid, kernel.device)
    out = []
    for sl in chunks(fh.numel(), g * co * ci * kernel.element_size() * 4):
        with lapack_threads():
            out.append(torch.linalg.svdvals(symbol(kernel, grid, fh[sl], fw[sl])).flatten())
    return torch.cat(out).sort(descending=True).values
