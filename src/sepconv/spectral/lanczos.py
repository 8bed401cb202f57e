"""Top eigenpairs of Hermitian blocks by Lanczos: *estimates from below*, never certificates.

:func:`block_max <sepconv.spectral.fourier.block_max>` certifies the largest eigenvalue over
many small Hermitian blocks by Cholesky tests at a level ``mu``; a good ``mu`` needs a good
*lower* estimate of the top eigenvalue of the few most promising blocks. That is this module:

* :func:`lanczos` -- batched Lanczos with full reorthogonalisation in torch (Golub & Van Loan,
  *Matrix Computations*, 4th ed., Sec. 10.1), any device;
* :func:`rayleigh_quotient` -- the float64 quotient of any vector: ``<= lambda_max`` whatever
  its accuracy, so an estimate is always a lower bound; :func:`lanczos_top` combines the two;
* the CPU fast paths -- :func:`rough_top` (the same recurrence in numpy, a few steps, to rank
  blocks) and :func:`top_vector` (ARPACK's implicitly restarted Lanczos through scipy, to
  converge on one block; Lehoucq, Sorensen, Yang 1998).

Every function works with ``G^T = conj(G)`` (row vectors times ``G``), which has the spectrum
of ``G``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from .lapack import blas_one_thread, lapack_threads, on_scipy

__all__ = ["lanczos", "lanczos_top", "rayleigh_quotient", "rough_top", "top_vector"]


def lanczos(G: Tensor, rtol: float = 1e-9, max_steps: int | None = None, start: Tensor | None = None,
            seed: int = 0) -> tuple[Tensor, Tensor]:
    """Top Ritz pairs of a batch of Hermitian (or real symmetric) blocks ``(B, m, m)``: Lanczos
    with full reorthogonalisation (classical Gram-Schmidt, twice), batched over the blocks with
    matrix products, in the precision of ``G`` (Golub & Van Loan, *Matrix Computations*, 4th ed.,
    Sec. 10.1), from the rows of ``start`` ``(B, m)`` (default random).

    Runs 16 steps, then rounds of 8, until every top Ritz value has converged to ``rtol`` by the
    residual estimate ``min(r, r^2 / gap)`` (``r = |beta_k s_k|``, ``gap`` the distance to the
    second Ritz value), or ``max_steps`` steps (default ``m``, where the Krylov space is the
    whole space). Returns the top Ritz values ``(B,)`` (float64; *lower estimates* of
    ``lambda_max`` up to the rounding of ``G``'s precision) and the unit Ritz vectors ``(B, m)``.
    """
    B, m, _ = G.shape
    k_max = max(1, min(m, max_steps or m))
    if start is None:
        gen = torch.Generator(device="cpu").manual_seed(seed)
        start = torch.randn(B, m, generator=gen, dtype=torch.float64).to(G.device, G.dtype)
    Q = G.new_zeros(B, k_max + 1, m)  # Lanczos vectors as rows
    Q[:, 0] = start / torch.linalg.vector_norm(start, dim=-1, keepdim=True)
    tiny = torch.finfo(torch.float64).tiny
    coef: list[Tensor] = []  # per step: alpha_j (the projection on q_j) and beta_j
    k = 0
    while True:
        for j in range(k, min(k_max, k + 8 if k else 16)):
            basis = Q[:, : j + 1]
            w = torch.bmm(Q[:, j: j + 1], G)  # rows: q @ G = (G^T q)^T, and G^T = conj(G) has the spectrum of G
            c = torch.bmm(w, basis.mH)  # full reorthogonalisation against every Lanczos vector, twice
            w = torch.baddbmm(w, c, basis, alpha=-1)  # ("twice is enough": orthogonal to rounding even
            w = torch.baddbmm(w, torch.bmm(w, basis.mH), basis, alpha=-1)  # when w is mostly cancelled)
            b = torch.linalg.vector_norm(w, dim=-1, keepdim=True)
            # (near) breakdown: w is rounding noise orthogonal to the basis, and beta ~ 0 decouples T
            Q[:, j + 1: j + 2] = w / b.clamp_min(tiny)
            coef.append(torch.cat([c[:, 0, j: j + 1].real.to(torch.float64), b[:, 0].to(torch.float64)], 1))
        k = len(coef)
        ab = torch.stack(coef, 2)  # (B, 2, k): alpha, beta
        T = torch.diag_embed(ab[:, 0]) + torch.diag_embed(ab[:, 1, :-1], 1) + torch.diag_embed(ab[:, 1, :-1], -1)
        with lapack_threads():
            theta, s = torch.linalg.eigh(T)
        if k == k_max:
            break
        res = (ab[:, 1, -1] * s[:, -1, -1]).abs()
        gap = (theta[:, -1] - theta[:, -2]).clamp_min(tiny)
        if bool((torch.minimum(res, res * res / gap) <= rtol * theta[:, -1].abs()).all()):
            break
    y = (s[:, :, -1:].mT.to(G.dtype) @ Q[:, :k])[:, 0]
    norm = torch.linalg.vector_norm(y, dim=-1, keepdim=True)
    # a Ritz vector made of broken-down (zero) directions only: the start vector is as good
    return theta[:, -1], torch.where(norm > tiny, y / norm.clamp_min(tiny), Q[:, 0])


def rayleigh_quotient(G: Tensor, y: Tensor) -> Tensor:
    """``y^H G^T y / y^H y`` for the rows of ``y`` ``(B, m)`` (the Ritz vectors of :func:`lanczos`,
    which works with ``G^T = conj(G)``), evaluated in float64: ``<= lambda_max(G)`` up to float64
    rounding, whatever ``y`` -- a certified *lower* bound of each block's top eigenvalue."""
    dt = torch.complex128 if G.is_complex() else torch.float64
    y = y.to(dt)[:, None]
    return ((y @ G.to(dt)) * y.conj()).sum((-2, -1)).real / (y.abs() ** 2).sum((-2, -1))


def lanczos_top(G: Tensor, rtol: float = 1e-9, max_steps: int | None = None, seed: int = 0) -> Tensor:
    """*Lower estimates* of ``lambda_max`` of a batch of Hermitian blocks ``(B, m, m)``: the float64
    Rayleigh quotients (:func:`rayleigh_quotient`) of the top Ritz vectors of :func:`lanczos`.
    Each is ``<= lambda_max`` of its block up to float64 rounding *whatever the convergence* --
    an estimate from below, never a certificate from above (that is the Cholesky test of
    :func:`~sepconv.spectral.fourier.block_max`)."""
    return rayleigh_quotient(G, lanczos(G, rtol, max_steps, seed=seed)[1])


def _single(G: Tensor) -> Tensor:
    """``G`` in single precision: where only a Lanczos *estimate* is taken from it (the float32 Ritz
    vectors of a float64 block are accurate to ~``eps_32 / gap``, their float64 quotients to its square)."""
    return G.to(torch.complex64 if G.is_complex() else torch.float32)


def rough_top(G: Tensor, steps: int) -> tuple[Tensor, Tensor]:
    """*Rough lower estimates* of the top eigenvalues of Hermitian blocks ``G`` ``(B, m, m)`` and
    their Ritz vectors ``(B, m)`` (eigenvectors of ``G^T``, the convention of :func:`lanczos`):
    ``steps`` Lanczos steps. On the CPU the same recurrence in numpy, about 2x faster than
    :func:`lanczos` there (its per-step torch overhead; BENCHMARKS.md, engine internals)."""
    if not on_scipy(G):
        return lanczos(_single(G), 0.0, steps)
    Gt = _single(G).resolve_conj().numpy().transpose(0, 2, 1)
    B, m, _ = Gt.shape
    k = max(1, min(steps, m))
    Q = np.zeros((B, k + 1, m), dtype=Gt.dtype)
    q = np.random.default_rng(0).standard_normal((B, m)).astype(Gt.dtype)
    Q[:, 0] = q / np.linalg.norm(q, axis=1, keepdims=True)
    alpha, beta = np.zeros((B, k)), np.zeros((B, k))
    with blas_one_thread():
        for j in range(k):
            w = (Gt @ Q[:, j, :, None])[..., 0]
            alpha[:, j] = (Q[:, j].conj() * w).sum(-1).real
            basis = Q[:, : j + 1]
            w -= ((basis.conj() @ w[..., None]).transpose(0, 2, 1) @ basis)[:, 0]  # full reorthogonalisation
            # (once: enough for estimates that only rank blocks; :func:`lanczos` does it twice)
            beta[:, j] = np.linalg.norm(w, axis=1)
            Q[:, j + 1] = w / np.maximum(beta[:, j:j + 1], np.finfo(np.float64).tiny)
        T = np.zeros((B, k, k))
        idx = np.arange(k)
        T[:, idx, idx] = alpha
        T[:, idx[1:], idx[:-1]] = T[:, idx[:-1], idx[1:]] = beta[:, :-1]
        theta, S = np.linalg.eigh(T)
        y = (S[:, None, :, -1].astype(Gt.dtype) @ Q[:, :k])[:, 0]
    y /= np.maximum(np.linalg.norm(y, axis=1, keepdims=True), np.finfo(np.float64).tiny)
    return torch.from_numpy(theta[:, -1].copy()), torch.from_numpy(y)


def top_vector(G: Tensor, rtol: float, start: Tensor | None = None) -> Tensor:
    """A unit vector ``(1, m)`` converged to the top eigenvector of ``G^T`` (so that the top
    eigenvalue is within ``rtol``) for one Hermitian block ``G`` ``(1, m, m)``. On the CPU: ARPACK's
    implicitly restarted Lanczos (scipy ``eigsh``; Lehoucq, Sorensen, Yang 1998) in double
    precision, faster than :func:`lanczos`, whose per-step overhead dominates for one block
    (BENCHMARKS.md, engine internals); elsewhere :func:`lanczos` in single precision."""
    if not (on_scipy(G) and G.shape[-1] > 2):
        return lanczos(_single(G), rtol, start=start)[1]
    # NB: scipy only on the CPU paths (its import costs ~0.25 s; see lapack._scipy_blas)
    from scipy.sparse.linalg import ArpackNoConvergence, eigsh  # noqa: PLC0415

    Gt = G[0].to(torch.complex128 if G.is_complex() else torch.float64).resolve_conj().numpy().T
    v0 = None if start is None else start[0].to(torch.complex128 if G.is_complex() else torch.float64).numpy()
    with blas_one_thread():
        try:
            _, v = eigsh(Gt, k=1, which="LA", tol=rtol, v0=v0)
        except ArpackNoConvergence:
            return lanczos(_single(G), rtol, start=start)[1]
    y = torch.from_numpy(v[:, 0]).to(G.dtype)[None]
    return y / torch.linalg.vector_norm(y, dim=-1, keepdim=True)
