"""LAPACK on the CPU: thread control, definiteness by Cholesky, and packed Hermitian storage.

The spectral engine makes many *small* batched LAPACK calls (one block per frequency). Two
facts about them shape this module:

* **threads** -- torch loops over the batch and threads each small call on its own, and
  OpenBLAS (scipy's) spins its pool against torch's threads; both cost far more than they save
  on small blocks (:func:`lapack_threads`, :func:`blas_one_thread`);
* **Cholesky as a test** -- ``mu I - G`` is positive definite iff ``lambda_max(G) < mu``, and a
  Cholesky factorisation says which in ``~m^3/3`` flops (:func:`indefinite`); in *rectangular
  full packed* storage (Gustavson, Wasniewski, Dongarra, Langou, ACM TOMS 37(2), 2010) it reads
  half the memory of a full block (:func:`indefinite_packed`, :func:`rfp_packing`).

On the CPU these calls go to scipy (LAPACK ``potrf``/``pftrf`` in place on one BLAS thread);
elsewhere to ``torch.linalg``.
"""

from __future__ import annotations

import contextlib
import functools

import numpy as np
import threadpoolctl
import torch
from torch import Tensor

__all__ = [
    "blas_one_thread",
    "indefinite",
    "indefinite_packed",
    "lapack_threads",
    "on_scipy",
    "rfp_packing",
    "rfp_unpack",
]


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
    # NB: scipy waits for the first CPU path (its import costs ~0.25 s, a third of `import sepconv.spectral`);
    # importing scipy.linalg loads its BLAS, so that the controller sees it
    import scipy.linalg  # noqa: F401, PLC0415

    return threadpoolctl.ThreadpoolController().select(user_api="blas")


def blas_one_thread():
    """scipy/numpy's BLAS on one thread for the enclosed block. Entered once around a whole
    computation (nested entries are cheap no-ops): switching OpenBLAS back to more threads between
    calls wakes its pool, which then spins against torch's threads on a 2-core machine."""
    return _scipy_blas().limit(limits=1)


def on_scipy(t: Tensor) -> bool:
    """Whether ``t`` can go to scipy/numpy without a copy: on the CPU, in a LAPACK precision."""
    return t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64, torch.complex64, torch.complex128)


def _lapack_info(blocks, factor) -> Tensor:
    """``info > 0`` (the factorisation broke down) of ``factor(block)`` for each numpy block, in place,
    on one BLAS thread: ``(B,)`` bool."""
    with blas_one_thread():
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
    if not (on_scipy(A) and A.dim() == 3 and A.is_contiguous()):
        with lapack_threads():
            return torch.linalg.cholesky_ex(A.mT).info > 0
    from scipy.linalg import lapack  # noqa: PLC0415  NB: scipy only on the CPU paths (see _scipy_blas)

    blocks = A.resolve_conj().numpy() if A.is_conj() else A.numpy()
    potrf = lapack.get_lapack_funcs("potrf", dtype=blocks.dtype)
    # b.T is Fortran-ordered: factored in place, no copy
    return _lapack_info(blocks, lambda b: potrf(b.T, lower=1, clean=0, overwrite_a=1)).to(A.device)


def indefinite_packed(A: Tensor, m: int) -> Tensor:
    """:func:`indefinite` for packed Hermitian blocks ``(B, L)`` (:func:`rfp_packing`): LAPACK's
    Cholesky in rectangular full packed storage (``?pftrf``; Gustavson et al., ACM TOMS 2010),
    as fast as ``potrf`` on full blocks here (BENCHMARKS.md, engine internals), in place.
    **Overwrites** ``A`` (on the CPU)."""
    if not (on_scipy(A) and A.dim() == 2 and A.is_contiguous() and A.is_complex()):
        return indefinite(rfp_unpack(A, m).contiguous())
    from scipy.linalg import lapack  # noqa: PLC0415  NB: scipy only on the CPU paths (see _scipy_blas)

    blocks = A.resolve_conj().numpy() if A.is_conj() else A.numpy()
    pftrf = lapack.get_lapack_funcs("pftrf", dtype=blocks.dtype)
    return _lapack_info(blocks, lambda b: pftrf(m, b, transr="N", uplo="L", overwrite_a=1)).to(A.device)


@functools.lru_cache(maxsize=32)
def rfp_packing(m: int) -> tuple[Tensor, Tensor, Tensor]:
    """Where the ``m (m + 1) / 2`` entries of one triangle of an ``m x m`` Hermitian block go in
    *rectangular full packed* storage (LAPACK ``?trttf``, ``transr="N"``, ``uplo="L"`` of the block
    read column-major): ``(src, mirror, diag)`` -- the row-major offset of each packed entry,
    that of its mirror image across the diagonal, and the packed positions of the diagonal.
    (Gustavson, Wasniewski, Dongarra, Langou, ACM TOMS 37(2), 2010.)"""
    from scipy.linalg import lapack  # noqa: PLC0415  NB: scipy only on the CPU paths (see _scipy_blas)

    off = np.arange(m * m, dtype=np.float64).reshape(m, m, order="F")  # entry = its offset
    packed = lapack.ztrttf(np.asfortranarray(off + 1j * off), transr="N", uplo="L")[0]
    src = torch.from_numpy(packed.real.round().astype(np.int64))
    # part of the triangle is stored conjugate-transposed: of a Hermitian block, read the mirror image
    src = torch.where(torch.from_numpy(packed.imag < 0), (src % m) * m + src // m, src)
    mirror = (src % m) * m + src // m
    diag = torch.nonzero(src == mirror).flatten()
    return src, mirror, diag


def rfp_unpack(packed: Tensor, m: int) -> Tensor:
    """Full Hermitian blocks ``(..., m, m)`` from packed ones ``(..., m (m + 1) / 2)`` (:func:`rfp_packing`)."""
    where, conj = (t.to(packed.device) for t in _unpacking(m))
    lead, flat = packed.shape[:-1], packed.reshape(-1, packed.shape[-1])
    out = flat.index_select(1, where).resolve_conj()  # on a 2-D view, where torch gathers fast
    torch.view_as_real(out)[..., 1].mul_(conj)
    return out.view(*lead, m, m)


@functools.lru_cache(maxsize=32)
def _unpacking(m: int) -> tuple[Tensor, Tensor]:
    """For each row-major entry of an ``m x m`` block: its packed position (:func:`rfp_packing`) and
    ``-1`` where it is the conjugate (the mirror image) of that entry, else ``1``."""
    src, mirror, _ = rfp_packing(m)
    where = torch.empty(m * m, dtype=torch.long)
    conj = torch.empty(m * m)
    pos = torch.arange(src.numel())
    where[mirror], conj[mirror] = pos, -1.0
    where[src], conj[src] = pos, 1.0
    return where, conj
