"""Spectral engine internals: each CPU path of ``fourier.block_max`` against the torch call it
replaces, on the block sizes of the exact-norm benchmark (64x64 blocks at 32x32, 256x256 at 8x8);
the pieces of the banded Cholesky certificate (512x512 blocks: a 16->16 conv at 32x32) and LOBPCG's
float32 phase against what they replace."""

from __future__ import annotations

import torch

from benchmarks._util import interleaved, md_table
from sepconv.spectral import certify, fourier, iterative
from sepconv.spectral.spec import ConvSpec

TITLE = "Spectral engine internals: the CPU paths against the torch calls they replace"


def _blocks(b: int, m: int, seed: int = 0) -> torch.Tensor:
    """``b`` Hermitian positive definite complex64 blocks ``m x m`` (Wishart plus a shift)."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(b, m, 2 * m, dtype=torch.complex64, generator=g)
    A = X @ X.mH / (2 * m)
    A.diagonal(dim1=-2, dim2=-1).add_(1.0)
    return A


def run(quick: bool = False) -> str:
    torch.set_num_threads(1)
    cases = [(34, 16), (8, 32)] if quick else [(514, 64), (34, 256)]
    repeats = 3 if quick else 9
    rows = []
    with fourier._blas_one_thread():
        for b, m in cases:
            A = _blocks(b, m)
            src = fourier._packing(m)[0]
            P = A.reshape(b, -1)[:, src].contiguous()
            work_full, work_packed = A.clone(), P.clone()

            def scipy_potrf():
                work_full.copy_(A)
                fourier.indefinite(work_full)

            def scipy_pftrf():
                work_packed.copy_(P)
                fourier.indefinite_packed(work_packed, m)

            def copy_only():
                work_full.copy_(A)

            t = interleaved({"torch": lambda: torch.linalg.cholesky_ex(A.mT), "potrf": scipy_potrf,
                             "pftrf": scipy_pftrf, "copy": copy_only}, repeats=repeats)
            rows.append([f"Cholesky of {b} blocks {m}x{m}", "`torch.linalg.cholesky_ex` (batched)",
                         f"{t['torch'] * 1e3:.1f}", "`indefinite` (scipy `potrf`, incl. a copy)",
                         f"{t['potrf'] * 1e3:.1f}", f"{t['torch'] / t['potrf']:.2f}x"])
            rows.append(["", "", "", "`indefinite_packed` (scipy `pftrf`, incl. a copy)",
                         f"{t['pftrf'] * 1e3:.1f}", f"{t['torch'] / t['pftrf']:.2f}x"])
            G = A[: min(b, 32 if m <= 64 else 8)]
            t = interleaved({"torch": lambda: fourier.lanczos(G, 0.0, fourier.ROUGH_STEPS),
                             "numpy": lambda: fourier.rough_top(G, fourier.ROUGH_STEPS)}, repeats=repeats)
            rows.append([f"rough estimates, {G.shape[0]} blocks {m}x{m}, {fourier.ROUGH_STEPS} steps",
                         "`lanczos` (torch)", f"{t['torch'] * 1e3:.1f}", "`rough_top` (numpy)",
                         f"{t['numpy'] * 1e3:.1f}", f"{t['torch'] / t['numpy']:.2f}x"])
            G1 = A[:1]
            t = interleaved({"torch": lambda: fourier.lanczos(G1, 1e-7),
                             "arpack": lambda: fourier.top_vector(G1, 1e-7)}, repeats=repeats)
            rows.append([f"converged estimate, one block {m}x{m}, rtol 1e-7", "`lanczos` (torch)",
                         f"{t['torch'] * 1e3:.1f}", "`top_vector` (ARPACK)", f"{t['arpack'] * 1e3:.1f}",
                         f"{t['torch'] / t['arpack']:.2f}x"])
    rows += _certificate_rows(quick, repeats)
    return ("Why `block_max` calls scipy/numpy on the CPU: each row times the torch call a CPU path replaces "
            "and the path itself, interleaved, 1 torch thread, scipy's BLAS on one thread; medians (ms). "
            "The Cholesky rows include a copy of the blocks (the factorisation is in place). The last rows: "
            "the banded Cholesky certificate's block operations (`certify`) and LOBPCG's float32 phase "
            "(`iterative.iterate`), each against the call it replaces.\n\n"
            + md_table(["operation", "torch", "ms", "ours", "ms", "speed-up"], rows))


def _certificate_rows(quick: bool, repeats: int) -> list[list[str]]:
    m = 64 if quick else 512
    g = torch.Generator().manual_seed(1)
    X = torch.randn(1, m, 2 * m, dtype=torch.float64, generator=g)
    S = X @ X.mT / (2 * m) + torch.eye(m, dtype=torch.float64)
    work = S.clone()
    L = torch.linalg.cholesky(S)
    panel = torch.randn(1, 2 * m, m, dtype=torch.float64, generator=g)

    def ours_factor():
        work.copy_(S)
        certify._factor(work)

    t = interleaved({"torch": lambda: torch.linalg.cholesky_ex(S), "ours": ours_factor}, repeats=repeats)
    rows = [[f"Cholesky of one block {m}x{m} (a certificate row)", "`torch.linalg.cholesky_ex`",
             f"{t['torch'] * 1e3:.1f}", "`certify._factor` (scipy `potrf`, incl. a copy)", f"{t['ours'] * 1e3:.1f}",
             f"{t['torch'] / t['ours']:.2f}x"]]
    t = interleaved({"right": lambda: torch.linalg.solve_triangular(L.mT, panel, upper=True, left=False),
                     "left": lambda: torch.linalg.solve_triangular(L, panel.mT, upper=False).mT}, repeats=repeats)
    rows.append([f"panel solve X L^-T, X {2 * m}x{m}", "`solve_triangular(L^T, X, left=False)`",
                 f"{t['right'] * 1e3:.1f}", "`solve_triangular(L, X^T)^T` (left-sided)", f"{t['left'] * 1e3:.1f}",
                 f"{t['right'] / t['left']:.2f}x"])
    c, n, its = (8, 8, 3) if quick else (64, 32, 5)
    w = torch.randn(c, c, 3, 3, dtype=torch.float64, generator=g) / (3 * c) ** 0.5
    spec = ConvSpec((n, n), 1, 1)
    op64, op32 = iterative.GramOperator(w, spec), iterative.GramOperator(w, spec, torch.float32)
    X0 = iterative.random_block(op64, 6)
    t = interleaved({"f64": lambda: iterative.lobpcg(op64, X0, rtol=0.0, max_iter=its),
                     "f32": lambda: iterative.lobpcg(op32, X0.float(), rtol=0.0, max_iter=its)},
                    repeats=max(3, repeats // 3))
    rows.append([f"LOBPCG, {its} iterations of 6 vectors, {c}->{c} 3x3 @{n}x{n}", "`lobpcg` in float64",
                 f"{t['f64'] * 1e3:.1f}", "`lobpcg` in float32 (`iterate`'s first phase)", f"{t['f32'] * 1e3:.1f}",
                 f"{t['f64'] / t['f32']:.2f}x"])
    return rows
