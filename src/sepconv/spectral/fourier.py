"""Frequency-domain building blocks: the per-frequency matrices of circulant convolutions.

A circular convolution on an ``N_h x N_w`` grid is diagonalised by the 2-D DFT: it acts
on frequency ``w`` as the ``C_out x C_in`` matrix ``K^(w) = sum_a K[:, :, a] e^{-2 pi i <w, a>/N}``
(Sedghi, Gupta, Long 2019, Thm. 6). Three reductions bring every circulant geometry to that
stride-1 form, all exact:

* **dilation** -- the kernel's taps sit at positions ``d a``;
* **stride** (``s | N``) -- the polyphase (space-to-depth) split ``x_phi[m] = x[s m + phi]``
  is a permutation of the input, after which the strided convolution is a stride-1
  convolution on the ``N/s`` grid with ``C_in s_h s_w`` input channels. Its blocks are a
  unitary recombination of the alias blocks ``(1/s)[K^(xi + qN/s)]_q`` (Senderovich et al.,
  NeurIPS 2022; reference/spectral.md Sec. 1);
* **groups** -- the operator is block-diagonal, one problem per group.

The Gram blocks ``K^(w)^H K^(w)`` are computed either in frequency (one batched matmul per
frequency) or, usually much cheaper, from the *spatial* Gram kernel
``G[delta] = sum_a K_a^T K_{a+delta}`` (``(2k-1)^2`` small matrices) followed by a DFT; a
cost model picks the cheaper route. Everything works on frequency chunks, so memory stays
bounded for large layers.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from . import validate
from .spec import ConvSpec, norm_of_padding

#: Memory budget (bytes) of one chunk of per-frequency blocks.
CHUNK_BYTES = 64 * 2**20


@contextlib.contextmanager
def lapack_threads(n: int = 1):
    """Run the enclosed batched small-matrix LAPACK calls (``eigvalsh``, ``cholesky``, ``svdvals``)
    on ``n`` threads. torch loops over the batch on the CPU and each call threads on its own,
    which costs far more than it saves for small blocks -- on these 2-core machines 48 SVDs of
    256x256 took 0.8 s on one thread and 20 s on two. Restores the thread count afterwards."""
    old = torch.get_num_threads()
    if old <= n:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@functools.cache
def _scipy_blas():
    """A controller of the BLAS threads of scipy/numpy (the CPU paths below)."""
    import scipy.linalg  # noqa: F401  (loads its BLAS, so that the controller sees it)
    import threadpoolctl

    return threadpoolctl.ThreadpoolController().select(user_api="blas")


def _blas_one_thread():
    """scipy/numpy's BLAS on one thread for the enclosed block. Entered once around a whole
    computation (nested entries are cheap no-ops): switching OpenBLAS back to more threads between
    calls wakes its pool, which then spins against torch's threads on a 2-core machine."""
    return _scipy_blas().limit(limits=1)


def _on_scipy(t: Tensor) -> bool:
    return t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64, torch.complex64, torch.complex128)


def _lapack_info(blocks, factor) -> Tensor:
    """``info > 0`` (the factorisation broke down) of ``factor(block)`` for each numpy block, in place,
    on one BLAS thread: ``(B,)`` bool."""
    with _blas_one_thread():
        info = [factor(b)[1] for b in blocks]
    return torch.tensor(info, dtype=torch.int32).reshape(len(blocks)) > 0


def indefinite(A: Tensor) -> Tensor:
    """Which of the Hermitian blocks ``A`` ``(B, m, m)`` are *not* positive definite: those whose
    Cholesky factorisation breaks down (LAPACK ``potrf``; one triangle is read). **Overwrites**
    ``A`` with the factors (on the CPU). Returns a ``(B,)`` bool tensor.

    On the CPU each block goes to scipy's ``potrf`` in place, on one BLAS thread: on these
    machines its OpenBLAS is faster than torch's batched ``cholesky_ex`` (MKL), which also
    zeroes the other triangle of every factor (BENCHMARKS.md, engine internals). Elsewhere,
    ``torch.linalg.cholesky_ex``."""
    if not (_on_scipy(A) and A.dim() == 3 and A.is_contiguous()):
        with lapack_threads():
            return torch.linalg.cholesky_ex(A.mT).info > 0
    from scipy.linalg import lapack

    blocks = A.resolve_conj().numpy() if A.is_conj() else A.numpy()
    potrf = lapack.get_lapack_funcs("potrf", dtype=blocks.dtype)
    # b.T is Fortran-ordered: factored in place, no copy
    return _lapack_info(blocks, lambda b: potrf(b.T, lower=1, clean=0, overwrite_a=1)).to(A.device)


def rough_top(G: Tensor, steps: int) -> tuple[Tensor, Tensor]:
    """*Rough lower estimates* of the top eigenvalues of Hermitian blocks ``G`` ``(B, m, m)`` and
    their Ritz vectors ``(B, m)`` (eigenvectors of ``G^T``, the convention of :func:`lanczos`):
    ``steps`` Lanczos steps. On the CPU the same recurrence in numpy, about 2x faster than
    :func:`lanczos` there (its per-step torch overhead; BENCHMARKS.md, engine internals)."""
    if not _on_scipy(G):
        return lanczos(_single(G), 0.0, steps)
    import numpy as np

    Gt = _single(G).resolve_conj().numpy().transpose(0, 2, 1)
    B, m, _ = Gt.shape
    k = max(1, min(steps, m))
    Q = np.zeros((B, k + 1, m), dtype=Gt.dtype)
    q = np.random.default_rng(0).standard_normal((B, m)).astype(Gt.dtype)
    Q[:, 0] = q / np.linalg.norm(q, axis=1, keepdims=True)
    alpha, beta = np.zeros((B, k)), np.zeros((B, k))
    with _blas_one_thread():
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
    if not (_on_scipy(G) and G.shape[-1] > 2):
        return lanczos(_single(G), rtol, start=start)[1]
    from scipy.sparse.linalg import ArpackNoConvergence, eigsh

    Gt = G[0].to(torch.complex128 if G.is_complex() else torch.float64).resolve_conj().numpy().T
    v0 = None if start is None else start[0].to(torch.complex128 if G.is_complex() else torch.float64).numpy()
    with _blas_one_thread():
        try:
            _, v = eigsh(Gt, k=1, which="LA", tol=rtol, v0=v0)
        except ArpackNoConvergence:
            return lanczos(_single(G), rtol, start=start)[1]
    y = torch.from_numpy(v[:, 0]).to(G.dtype)[None]
    return y / torch.linalg.vector_norm(y, dim=-1, keepdim=True)


def circulant_kernel(weight: Tensor, stride: Sequence[int], dilation: Sequence[int], groups: int) -> Tensor:
    """The stride-1 kernel equivalent to ``weight`` under dilation and stride (exact).

    Returns ``(g, C_out/g, C_in/g * s_h * s_w, ceil(E_h/s_h), ceil(E_w/s_w))`` where
    ``E = d (k - 1) + 1``: the dilated kernel, split into its ``s_h s_w`` polyphase
    components (input channel index ``(c, phi_h, phi_w)``), grouped.
    """
    c_out, ci, kh, kw = weight.shape
    (dh, dw), (sh, sw) = dilation, stride
    if (dh, dw, sh, sw) == (1, 1, 1, 1):
        return weight.reshape(groups, c_out // groups, ci, kh, kw)  # a view: nothing to dilate or split
    eh, ew = dh * (kh - 1) + 1, dw * (kw - 1) + 1
    qh, qw = -(-eh // sh), -(-ew // sw)
    k = weight.new_zeros(c_out, ci, qh * sh, qw * sw)
    k[:, :, : eh : dh, : ew : dw] = weight
    k = k.reshape(c_out, ci, qh, sh, qw, sw).permute(0, 1, 3, 5, 2, 4).reshape(c_out, ci * sh * sw, qh, qw)
    return k.reshape(groups, c_out // groups, ci * sh * sw, qh, qw)


def unique_frequencies(grid: Sequence[int], device=None) -> tuple[Tensor, Tensor]:
    """One representative ``(u, v)`` of each conjugate pair ``{w, -w}`` of the ``N_h x N_w`` grid.

    For a real kernel ``K^(-w) = conj(K^(w))``: both blocks have the same singular values,
    so a norm needs only these ``~N_h N_w / 2`` frequencies.
    """
    nh, nw = grid
    u = torch.arange(nh, device=device)
    v = torch.arange(nw // 2 + 1, device=device)
    uu, vv = torch.meshgrid(u, v, indexing="ij")
    uu, vv = uu.flatten(), vv.flatten()
    self_conj_col = (vv == 0) | ((nw % 2 == 0) & (vv == nw // 2))
    keep = ~self_conj_col | (uu <= nh // 2)
    return uu[keep], vv[keep]


def all_frequencies(grid: Sequence[int], device=None) -> tuple[Tensor, Tensor]:
    uu, vv = torch.meshgrid(torch.arange(grid[0], device=device), torch.arange(grid[1], device=device), indexing="ij")
    return uu.flatten(), vv.flatten()


def _phases(fh: Tensor, fw: Tensor, grid: Sequence[int], pos_h: Tensor, pos_w: Tensor, dtype) -> tuple[Tensor, Tensor]:
    """cos and sin of ``2 pi (u a / N_h + v b / N_w)`` for frequencies ``(u, v)`` (F) and tap
    positions ``(a, b)`` (T, flattened row-major): two real ``(T, F)`` matrices."""
    ang = (pos_h.to(torch.float64)[:, None] * fh.to(torch.float64)[None, :]).remainder(grid[0]) / grid[0]
    ang = ang[:, None, :] + ((pos_w.to(torch.float64)[:, None] * fw.to(torch.float64)[None, :]).remainder(grid[1])
                             / grid[1])[None, :, :]
    ang = (2 * math.pi) * ang.reshape(-1, fh.numel())
    return torch.cos(ang).to(dtype), torch.sin(ang).to(dtype)


def _dft(flat: Tensor, c: Tensor, s: Tensor) -> Tensor:
    """``sum_t flat[:, t] e^{-i angle[t, f]}`` given ``c = cos angle``, ``s = sin angle``: ``(F, rows)``
    complex, by one complex matmul laid out so that no transposing copy follows."""
    cplx = torch.complex(c, -s).T  # (F, T)
    return cplx @ flat.T.to(cplx.dtype)


def symbol(kernel: Tensor, grid: Sequence[int], fh: Tensor, fw: Tensor) -> Tensor:
    """Per-frequency blocks ``K^(w) = sum_a K[..., a] e^{-2 pi i <w, a>/N}`` at the given
    frequencies: ``(F, *kernel.shape[:-2])`` complex. Exact (a direct DFT, so kernels wider
    than the grid wrap around correctly)."""
    qh, qw = kernel.shape[-2:]
    lead = kernel.shape[:-2]
    c, s = _phases(fh, fw, grid, torch.arange(qh, device=kernel.device), torch.arange(qw, device=kernel.device),
                   kernel.dtype)
    return _dft(kernel.reshape(-1, qh * qw), c, s).reshape(fh.numel(), *lead)


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


@functools.lru_cache(maxsize=32)
def _packing(m: int) -> tuple[Tensor, Tensor, Tensor]:
    """Where the ``m (m + 1) / 2`` entries of one triangle of an ``m x m`` Hermitian block go in
    *rectangular full packed* storage (LAPACK ``?trttf``, ``transr="N"``, ``uplo="L"`` of the block
    read column-major): ``(src, mirror, diag)`` -- the row-major offset of each packed entry,
    that of its mirror image across the diagonal, and the packed positions of the diagonal.
    (Gustavson, Wasniewski, Dongarra, Langou, ACM TOMS 37(2), 2010.)"""
    import numpy as np
    from scipy.linalg import lapack

    off = np.arange(m * m, dtype=np.float64).reshape(m, m, order="F")  # entry = its offset
    packed = lapack.ztrttf(np.asfortranarray(off + 1j * off), transr="N", uplo="L")[0]
    src = torch.from_numpy(packed.real.round().astype(np.int64))
    # part of the triangle is stored conjugate-transposed: of a Hermitian block, read the mirror image
    src = torch.where(torch.from_numpy(packed.imag < 0), (src % m) * m + src // m, src)
    mirror = (src % m) * m + src // m
    diag = torch.nonzero(src == mirror).flatten()
    return src, mirror, diag


def _unpack(packed: Tensor, m: int) -> Tensor:
    """Full Hermitian blocks ``(..., m, m)`` from packed ones ``(..., m (m + 1) / 2)`` (:func:`_packing`)."""
    where, conj = (t.to(packed.device) for t in _unpacking(m))
    lead, flat = packed.shape[:-1], packed.reshape(-1, packed.shape[-1])
    out = flat.index_select(1, where).resolve_conj()  # on a 2-D view, where torch gathers fast
    torch.view_as_real(out)[..., 1].mul_(conj)
    return out.view(*lead, m, m)


@functools.lru_cache(maxsize=32)
def _unpacking(m: int) -> tuple[Tensor, Tensor]:
    """For each row-major entry of an ``m x m`` block: its packed position (:func:`_packing`) and
    ``-1`` where it is the conjugate (the mirror image) of that entry, else ``1``."""
    src, mirror, _ = _packing(m)
    where = torch.empty(m * m, dtype=torch.long)
    conj = torch.empty(m * m)
    pos = torch.arange(src.numel())
    where[mirror], conj[mirror] = pos, -1.0
    where[src], conj[src] = pos, 1.0
    return where, conj


@dataclass(frozen=True)
class HalfGram:
    """A real spatial Gram kernel with odd extents ``(g, Dh, Dw, m, m)``, arranged for a real DFT.

    With ``G[-delta] = G[delta]^T``, ``G(w) = G[0] + sum_{delta > 0} cos(theta) (G[delta] + G[delta]^T)
    + i sin(theta) (G[delta]^T - G[delta])`` (``delta > 0``: the offsets after the centre, row-major).
    ``basis`` ``(1 + 2H, g L 2)`` holds ``G[0]``, the ``H`` symmetric and the ``H`` antisymmetric
    parts, each reduced to one triangle in rectangular full packed storage (``L = m (m + 1) / 2``
    entries, :func:`_packing`) and laid out as the *interleaved* real and imaginary parts of
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
        src = _packing(m)[0].to(gk.device)
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
        src, mirror, _ = (t.to(kernel.device) for t in _packing(m))
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
        c, s = _phases(fh, fw, grid, torch.arange(dh // 2 + 1, device=dev),
                       torch.arange(dw, device=dev) - (dw - 1) // 2, self.basis.dtype)
        return torch.cat([c[dw // 2:], s[dw // 2 + 1:]]).T  # row dw // 2 is the centre: cos 0 = 1

    def packed_at(self, coef: Tensor, sign: float = 1.0, shift: float = 0.0,
                  work: list[Tensor] | None = None) -> Tensor:
        """Packed blocks ``shift I + sign G(w)`` ``(F, g, L)`` complex (:func:`_packing`) from
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
            out[..., _packing(m)[2].to(out.device)] += shift
        return out

    def blocks(self, grid: Sequence[int], fh: Tensor, fw: Tensor, sign: float = 1.0, shift: float = 0.0) -> Tensor:
        """Full blocks ``shift I + sign G(w)`` at the given frequencies: ``(F, g, m, m)`` complex."""
        return _unpack(self.packed_at(self.coefficients(grid, fh, fw), sign, shift), self.shape[3])

    def scores(self, grid: Sequence[int], fh: Tensor, fw: Tensor) -> Tensor:
        """``||G(w)||_F^2`` at the given frequencies, per group: ``(F, g)``, from the Gram matrix of
        the basis rows (no blocks formed). Exact."""
        g, m = self.shape[0], self.shape[3]
        rows = self.basis.view(self.basis.shape[0], g, -1, 2).transpose(0, 1)  # (g, R, L, 2)
        diag = rows[:, :, _packing(m)[2].to(rows.device)].flatten(2)
        rows = rows.flatten(2)
        gram = 2 * (rows @ rows.mT) - diag @ diag.mT  # (g, R, R): off-diagonal entries stand for two
        coef = self.coefficients(grid, fh, fw)  # (F, R)
        return ((coef @ gram) * coef).sum(-1).T


def indefinite_packed(A: Tensor, m: int) -> Tensor:
    """:func:`indefinite` for packed Hermitian blocks ``(B, L)`` (:func:`_packing`): LAPACK's
    Cholesky in rectangular full packed storage (``?pftrf``; Gustavson et al., ACM TOMS 2010),
    as fast as ``potrf`` on full blocks here (BENCHMARKS.md, engine internals), in place.
    **Overwrites** ``A`` (on the CPU)."""
    if not (_on_scipy(A) and A.dim() == 2 and A.is_contiguous() and A.is_complex()):
        return indefinite(_unpack(A, m).contiguous())
    from scipy.linalg import lapack

    blocks = A.resolve_conj().numpy() if A.is_conj() else A.numpy()
    pftrf = lapack.get_lapack_funcs("pftrf", dtype=blocks.dtype)
    return _lapack_info(blocks, lambda b: pftrf(m, b, transr="N", uplo="L", overwrite_a=1)).to(A.device)


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
    c, s = _phases(fh, fw, grid, torch.arange(dh, device=gk.device) - (dh - 1) // 2,
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


def chunks(n: int, bytes_per_item: int, budget: int = CHUNK_BYTES) -> Iterator[slice]:
    """Slices of ``range(n)`` whose items take at most ``budget`` bytes (at least one item)."""
    step = max(1, budget // max(1, bytes_per_item))
    step = -(-n // -(-n // step)) if n else 1  # as many slices, of balanced sizes
    for i in range(0, n, step):
        yield slice(i, min(n, i + step))


# --------------------------------------------------------------------------- majorants


@dataclass(frozen=True)
class Majorant:
    """A circulant operator that dominates a convolution: ``sigma_i(T) <= factor * sigma_i(C)``
    for every ``i``, where ``C`` is the circular convolution with the same kernel on ``grid``
    with stride ``stride`` (``stride`` divides ``grid``). ``exact`` when ``T`` *is* ``C``
    (up to permutations)."""

    grid: tuple[int, int]
    stride: tuple[int, int]
    factor: float
    exact: bool


def majorant(spec: ConvSpec, kernel_size: Sequence[int]) -> Majorant:
    """The tightest circulant majorant this library knows for ``spec``; see :func:`_majorant`
    (cached: a geometry's majorant is a constant)."""
    return _majorant(spec, tuple(int(k) for k in kernel_size))


@functools.lru_cache(maxsize=1024)
def _majorant(spec: ConvSpec, kernel_size: tuple[int, int]) -> Majorant:
    """The tightest circulant majorant this library knows for ``spec`` (per dimension).

    * circulant geometry: the operator itself (``exact``);
    * zero padding: the zero-padded map is a submatrix (selected output rows, input columns)
      of the strided circular convolution on ``N`` points as soon as wrapped indices land in
      the zero region and taps stay distinct: ``N >= max(n + p_lo, j_max + 1, E, s H_out)``,
      rounded up to a multiple of ``s`` (``j_max`` the last input index read, ``E`` the
      dilated extent) -- a refinement of ``N >= n + d(k - 1)`` (reference/spectral.md Sec. 2);
    * circular padding not aligned with the input (cropped or repeated outputs, ``s`` not
      dividing ``n``): selected rows, with repetition, of the circular convolution on ``n``
      (strided when ``s | n``); ``factor`` = sqrt of the largest repetition;
    * reflect / replicate: the valid convolution of the padded input (a submatrix of the
      circulant on ``N >= n + p_lo + p_hi``) after the padding map, whose norm enters ``factor``.

    By interlacing (submatrices) and ``R^T R <= mult I``, every singular value is dominated.
    """
    pads = spec.pads(kernel_size)
    ext = spec.extent(kernel_size)
    out = spec.out_size(kernel_size)
    grid, stride, mult = [], [], 1
    exact = spec.is_circulant(kernel_size)
    for dim in range(2):
        n, s, e, ho = spec.in_size[dim], spec.stride[dim], ext[dim], out[dim]
        lo, hi = pads[2 * dim], pads[2 * dim + 1]
        if exact:
            grid.append(n)
            stride.append(s)
            continue
        if spec.padding_mode == "circular":
            # y[i] = z[(s i) mod n] for the stride-1 circular convolution z (shift absorbed): s i mod n
            # has period P = n / gcd(s, n) in i, so the most repeated value occurs ceil(ho / P) times
            mult *= -(-ho // (n // math.gcd(s, n)))
            grid.append(n)
            stride.append(s if n % s == 0 else 1)
            continue
        if spec.padding_mode == "zeros":
            jmax = s * (ho - 1) + e - 1 - lo
            N = max(n + lo, jmax + 1, e, s * ho)
        else:  # reflect / replicate: valid conv on the padded input
            N = max(n + lo + hi, s * ho)
        grid.append(-(-N // s) * s)
        stride.append(s)
    factor = math.sqrt(mult) * (norm_of_padding(spec, kernel_size) if spec.padding_mode in ("reflect", "replicate") else 1.0)
    return Majorant(tuple(grid), tuple(stride), factor, exact)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- memory


def problem_bytes(weight: Tensor, grid: Sequence[int], stride: Sequence[int], dilation: Sequence[int], groups: int,
                  kind: str = "max") -> int:
    """Estimated peak bytes of one circulant problem on ``grid`` for ``weight`` (the stride-1 kernel of
    :func:`circulant_kernel`, then): ``kind="max"`` -- :func:`block_max` (vector blocks: the power
    spectrum of every channel; matrix blocks: the unique frequencies, the per-block scores and the
    full-grid peak search, the spatial Gram basis, the chunks of blocks); ``"gram"`` -- the Gram
    iteration's frequencies and chunks; ``"all"`` -- every singular value (:func:`all_block_singular_values`).
    An estimate of the leading terms (the chunks are capped at :data:`CHUNK_BYTES`, at least one
    frequency's blocks), made before anything is allocated."""
    c_out, ci, kh, kw = weight.shape
    (sh, sw), (dh, dw) = stride, dilation
    qh, qw = -(-(dh * (kh - 1) + 1) // sh), -(-(dw * (kw - 1) + 1) // sw)
    el = max(weight.element_size(), 4)
    g, co, cin = groups, c_out // groups, ci * sh * sw
    kernel = c_out * cin * qh * qw * el * (2 if (sh, sw, dh, dw) != (1, 1, 1, 1) else 0)
    nh, nw = grid[0] // sh, grid[1] // sw
    half, full = nh * (nw // 2 + 1), nh * nw
    m = min(co, cin)
    per_freq = g * max(m * m, co * cin) * 2 * el  # one frequency's complex blocks
    chunk = 4 * max(min(CHUNK_BYTES, half * per_freq), per_freq)  # chunks of at most CHUNK_BYTES, at least one frequency
    if kind == "all":
        return kernel + 3 * full * g * m * 8 + 4 * full * 8 + chunk
    freqs = 6 * half * 8  # unique_frequencies: fh, fw and the meshgrid's flattened copies and masks
    basis = ((2 * qh - 1) * (2 * qw - 1) // 2 * 2 + 1) * g * (m * (m + 1) // 2) * 2 * el
    if kind == "gram":
        return kernel + freqs + basis + chunk
    if m == 1:  # vector blocks: |K^|^2 on the half grid for every (group, out, in) pair, real and imaginary parts
        return kernel + 3 * g * co * cin * half * el + g * half * el
    return kernel + freqs + basis + chunk + g * half * 8 + 5 * g * full * 8


# --------------------------------------------------------------------------- block maxima

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


@functools.lru_cache(maxsize=64)
def _real_dft_tables(qh: int, qw: int, nh: int, nw: int, dtype: torch.dtype,
                     device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """``[cos | sin]`` along w ``(qw, 2 (nw//2 + 1))`` and the two halves ``[cos; -sin]``,
    ``[sin; cos]`` of the rotation along h ``(2 qh, nh)`` of :func:`vector_block_power`
    (constants, cached per shape)."""

    def cs(q: int, n: int, m: int) -> tuple[Tensor, Tensor]:
        ang = (torch.arange(q, dtype=torch.float64)[:, None] * torch.arange(m, dtype=torch.float64)[None, :]) % n
        ang = ang * (2 * math.pi / n)
        return torch.cos(ang).to(device, dtype), torch.sin(ang).to(device, dtype)

    with torch.inference_mode(False), torch.no_grad():  # cached: must be usable in autograd later
        cw, sw = cs(qw, nw, nw // 2 + 1)  # (qw, Mw')
        ch, sh = cs(qh, nh, nh)  # (qh, Mh)
        return torch.cat([cw, sw], 1), torch.cat([ch, -sh], 0), torch.cat([sh, ch], 0)


def vector_block_power(kernel: Tensor, grid: Sequence[int]) -> Tensor:
    """``||K^(w)||_F^2`` on the half grid ``(g, N_h, N_w//2 + 1)`` by a separable real DFT of the
    kernel (two small matmuls; taps wider than the grid wrap around). For blocks that are
    vectors (depthwise convs; with a depth multiplier or a stride, not both) this is
    ``sigma_max(K^(w))^2``: the closed form ``max |K^_c(w)|^2`` summed over aliases
    (reference/spectral.md Sec. 1). Exact."""
    nh, nw = grid
    qh, qw = kernel.shape[-2:]
    csw, rot_re, rot_im = _real_dft_tables(qh, qw, nh, nw, kernel.dtype, kernel.device)
    lead = kernel.shape[:-2]
    n, mw = math.prod(lead), nw // 2 + 1
    # stage 1 (along w): [A | B] = K [cos | sin]; stage 2 (along h), one GEMM each for
    # re = A cos_h - B sin_h and im = A sin_h + B cos_h (minus the imaginary part), so that both
    # come out contiguous and |K^|^2 = re^2 + im^2 is formed in place (memory-bound: one pass)
    AB = (kernel.reshape(n * qh, qw) @ csw).reshape(n, qh, 2, mw)
    AB = AB.permute(0, 3, 2, 1).reshape(n * mw, 2 * qh)  # rows (item, v), columns (A | B, a)
    re, im = AB @ rot_re, AB @ rot_im  # (n Mw', Mh) each
    if kernel.requires_grad and torch.is_grad_enabled():
        power = torch.addcmul(re * re, im, im)
    else:  # no graph to keep: square in place
        power = re.mul_(re).addcmul_(im, im)
    power = power.view(*lead, mw, nh)  # (g, co, ci, Mw', Mh)
    power = power.sum((1, 2)) if power.shape[1] * power.shape[2] > 1 else power[:, 0, 0]
    return power.transpose(-1, -2)


def vector_block_power_at(kernel: Tensor, grid: Sequence[int], fh: Tensor, fw: Tensor) -> Tensor:
    """``||K_g^(w_g)||_F^2`` of each group ``g`` at its own frequency ``(fh[g], fw[g])``: ``(g,)``,
    differentiable. With ``w_g`` the argmax of :func:`vector_block_power` (found without a graph)
    this is the same maximum, and its gradient is the subgradient of the max -- at the cost of one
    frequency per channel instead of a backward pass through the whole spectrum. Exact."""
    qh, qw = kernel.shape[-2:]
    c, s = _phases(fh, fw, grid, torch.arange(qh, device=kernel.device), torch.arange(qw, device=kernel.device),
                   kernel.dtype)  # (taps, g): column g holds group g's own frequency
    g = kernel.shape[0]
    k = kernel.reshape(g, -1, qh * qw)
    re, im = k @ c.T[:, :, None], k @ s.T[:, :, None]
    return (re.square() + im.square()).reshape(g, -1).sum(1)


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


def lanczos(G: Tensor, rtol: float = 1e-9, max_steps: int | None = None, start: Tensor | None = None,
            seed: int = 0) -> tuple[Tensor, Tensor]:
    """Top Ritz pairs of a batch of Hermitian (or real symmetric) blocks ``(B, m, m)``: Lanczos
    with full reorthogonalisation (classical Gram-Schmidt, twice), batched over the blocks with matrix products, in the precision
    of ``G`` (Golub & Van Loan, *Matrix Computations*, 4th ed., Sec. 10.1), from the rows of
    ``start`` ``(B, m)`` (default random).

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
    :func:`block_max`)."""
    return rayleigh_quotient(G, lanczos(G, rtol, max_steps, seed=seed)[1])


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
    with torch.no_grad(), _blas_one_thread():  # GEMMs on torch's threads; LAPACK calls on one
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


def _single(G: Tensor) -> Tensor:
    """``G`` in single precision: where only a Lanczos *estimate* is taken from it (the float32 Ritz
    vectors of a float64 block are accurate to ~``eps_32 / gap``, their float64 quotients to its square)."""
    return G.to(torch.complex64 if G.is_complex() else torch.float32)


def _certified_block_max(kernel: Tensor, grid: Sequence[int], tol: float, fh: Tensor, fw: Tensor, plan: GramPlan,
                         half: HalfGram | None) -> BlockMax:
    """The Cholesky-certified path of :func:`block_max` (blocks larger than :data:`SMALL_BLOCK`, and
    more work than :data:`EIG_WORK`)."""
    F_, g, m = fh.numel(), kernel.shape[0], plan.m
    cdt = torch.complex128 if kernel.dtype == torch.float64 else torch.complex64
    rtol = min(tol / 10, 1e-4)  # estimates' target (the certificate below is what guarantees)

    coef = half.coefficients(grid, fh, fw) if half is not None else None

    def gram_at(fi: Tensor, sign: float = 1.0, shift: float = 0.0) -> Tensor:
        """``shift I + sign G(w)`` at unique-frequency indices ``fi``: ``(len(fi), g, m, m)``."""
        if half is not None:
            return _unpack(half.packed_at(coef[fi], sign, shift), m)
        G = gram_blocks(kernel, grid, fh[fi], fw[fi], plan)
        if sign != 1.0:
            G.neg_()
        if shift:
            G.diagonal(dim1=-2, dim2=-1).add_(shift)
        return G

    def gram_flat(idx: Tensor) -> Tensor:
        """Gram blocks ``(len(idx), m, m)`` at flat indices ``frequency * g + group``."""
        return gram_at(idx // g)[torch.arange(idx.numel(), device=idx.device), idx % g]

    # candidates: the largest Frobenius norms and the local maxima of that norm over the grid (distinct peaks)
    n_cand = max(1, min(F_ * g // 4, N_CANDIDATES * (4 if m <= EIG_BLOCK else 1)))
    if half is not None:
        score, cand = _peak_candidates(half, grid, fh, fw, n_cand)
    else:
        per_freq = 2 * kernel.element_size() * g * 3 * max(m * m, kernel.shape[1] * kernel.shape[2])
        score = torch.cat([torch.view_as_real(gram_at(torch.arange(sl.start, sl.stop, device=fh.device)))
                           .square().sum((-3, -2, -1)).flatten() for sl in chunks(F_, per_freq)])
        cand = score.topk(n_cand).indices
    known: dict[int, float] = {}  # converged estimates (flat index -> lower bound)
    exact: set[int] = set()  # ... of which exact eigenvalues (the block is certified by them)
    state = {"best": -1.0, "arg": int(cand[0])}

    def raise_best(idx: Tensor, lam: Tensor) -> None:
        i = int(lam.argmax())
        if float(lam[i]) > state["best"]:
            state["best"], state["arg"] = float(lam[i]), int(idx[i])

    def refine(i: int, G: Tensor, start: Tensor | None) -> None:
        """The top eigenvalue of the block ``G`` ``(1, m, m)`` (flat index ``i``), raising ``best``:
        exact (``eigvalsh``, certifying the block) up to :data:`EIG_BLOCK`, where it costs less
        than Lanczos; else the float64 Rayleigh quotient of a converged :func:`top_vector` (a lower bound)."""
        if i not in known:
            if m <= EIG_BLOCK:
                with lapack_threads():
                    known[i] = float(torch.linalg.eigvalsh(G)[0, -1])
                exact.add(i)
            else:  # the quotient on G itself: a lower bound whatever the vector
                known[i] = float(rayleigh_quotient(G, top_vector(G, rtol, start)))
        raise_best(torch.tensor([i]), torch.tensor([known[i]], dtype=torch.float64))

    def most_promising(G: Tensor) -> tuple[int, Tensor | None]:
        """Position of the block worth a converged estimate -- the top one by :func:`rough_top`
        (:data:`ROUGH_STEPS` steps, also a lower estimate) -- and its vector, to start from."""
        if G.shape[0] == 1:
            return 0, None
        theta, y = rough_top(G, ROUGH_STEPS)
        i = int(theta.argmax())
        return i, y[i: i + 1]

    def fails(G: Tensor) -> Tensor:
        """Which blocks ``G`` fail the certificate at ``best (1 + tol)^2``."""
        A = -G
        A.diagonal(dim1=-2, dim2=-1).add_(state["best"] * (1 + tol) ** 2)
        return indefinite(A)

    def settle(idx: Tensor, G: Tensor) -> None:
        """Blocks ``G`` (flat indices ``idx``) that failed the certificate at the current ``mu``: in
        rounds, estimate the most promising one (raising ``best``) and re-test the others at the
        raised ``mu``. The estimated block is re-tested in float64 if it still fails (the
        certificate's rounding is then far below ``tol``), and solved exactly (``eigvalsh``) if
        even that fails."""
        pending = torch.arange(idx.numel(), device=idx.device)

        def test64(pick: int) -> None:
            G64 = G[pick: pick + 1].to(torch.complex128 if G.is_complex() else torch.float64)
            if bool(fails(G64)):  # the estimate was not good enough to certify its own block
                with lapack_threads():
                    raise_best(idx[pick: pick + 1], torch.linalg.eigvalsh(G64)[..., -1])

        for pick in [p for p in pending.tolist() if int(idx[p]) in known]:  # estimated already: a
            test64(pick)  # failure is the test's rounding (a block at the top), so float64 at once
            pending = pending[pending != pick]
        while pending.numel():
            i, start = most_promising(G[pending])
            pick = int(pending[i])
            refine(int(idx[pick]), G[pick: pick + 1], start)
            if int(idx[pick]) in exact:
                pending = pending[pending != pick]
            if pending.numel():
                pending = pending[fails(G[pending])]
            if bool((pending == pick).any()):
                test64(pick)
                pending = pending[pending != pick]

    G = gram_flat(cand)
    theta, y = rough_top(G, ROUGH_STEPS) if G.shape[0] > 1 else (torch.zeros(1, dtype=torch.float64), None)
    for r in theta.argsort(descending=True)[:N_REFINED if m <= EIG_BLOCK else 1].tolist():
        refine(int(cand[r]), G[r: r + 1], None if y is None else y[r: r + 1])
    del G
    # certify every block below mu by Cholesky of mu I - G, in chunks, the largest Frobenius norms first
    order = score.view(F_, g).amax(1).argsort(descending=True)
    mu = state["best"] * (1 + tol) ** 2
    work: list[Tensor] = []
    screen = 16 * m * torch.finfo(torch.float32).eps if kernel.dtype == torch.float64 else 0.0
    # chunks of about the size of the DFT's basis (read once per chunk), at least CERTIFY_BYTES
    budget = min(CHUNK_BYTES, max(CERTIFY_BYTES, half.basis.nbytes if half is not None else 0))
    block_bytes = g * (m * (m + 1) // 2 if half is not None else m * m) * torch.empty((), dtype=cdt).element_size()
    test = functools.partial(indefinite_packed, m=m) if half is not None else indefinite
    diag = _packing(m)[2].to(fh.device) if half is not None else None
    for sl in chunks(F_, block_bytes, budget):
        fi = order[sl]
        if half is not None:  # packed blocks, half the memory traffic of full ones
            A = half.packed_at(coef[fi], -1.0, mu, work).view(len(fi) * g, -1)
        else:
            A = gram_at(fi, -1.0, mu).view(-1, m, m)
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
            settle(idx, gram_flat(idx))
            mu = max(mu, state["best"] * (1 + tol) ** 2)
    best, j = state["best"], state["arg"]
    rounding = 8 * m * torch.finfo(kernel.dtype).eps
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
