"""Björck orthonormalization: the Gram form sepconv runs (Newton-Schulz on the small side, row-sum
norms) against the direct iteration on the whole matrix with exact (SVD) norms, the form of Anil et
al. 2019 that it replaced. Forward + backward of one orthonormalized weight, one torch thread."""

from __future__ import annotations

import statistics
import time

import torch

from sepconv.lipschitz import bjorck_orthonormalize

from ._util import md_table

TITLE = "Björck orthonormalization: Gram form against the direct iteration"
SHAPES = [(64, 2048), (32, 64), (16, 16), (64, 64)]
ITERS = 20


def direct(mat: torch.Tensor, iters: int = ITERS) -> torch.Tensor:
    """The direct iteration ``A <- 1.5 A - 0.5 (A A^T) A`` on the whole matrix, exact norms (the reference)."""
    a = mat / torch.linalg.matrix_norm(mat, ord=2)
    wide = a.shape[-2] <= a.shape[-1]
    for _ in range(iters):
        a = 1.5 * a - 0.5 * ((a @ a.mT) @ a if wide else a @ (a.mT @ a))
    return a / torch.linalg.matrix_norm(a, ord=2).clamp_min(1.0)


def _time(fn, w: torch.Tensor, repeats: int) -> list[float]:
    out = []
    for i in range(repeats + 3):
        w.grad = None
        t = time.perf_counter()
        fn(w).pow(2).sum().backward()
        if i >= 3:
            out.append(time.perf_counter() - t)
    return out


def run(quick: bool = False) -> str:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    repeats = 3 if quick else 30
    rows = []
    try:
        for shape in SHAPES:
            g = torch.Generator().manual_seed(0)
            q = torch.linalg.qr(torch.randn(max(shape), min(shape), generator=g))[0]
            w = ((q if shape[0] >= shape[1] else q.T) + 0.05 * torch.randn(*shape, generator=g)).requires_grad_()
            ours, ref = [], []
            for _ in range(repeats):  # interleaved
                ours += _time(lambda m: bjorck_orthonormalize(m, ITERS), w, 1)
                ref += _time(direct, w, 1)
            dev = float((bjorck_orthonormalize(w.detach()) - direct(w.detach())).abs().max())
            rows.append([f"{shape[0]}x{shape[1]}", f"{1e3 * statistics.median(ours):.2f}",
                         f"{1e3 * statistics.median(ref):.2f}",
                         f"{statistics.median(a / b for a, b in zip(ours, ref)):.2f}", f"{dev:.1e}"])
    finally:
        torch.set_num_threads(before)
    return (f"{ITERS} iterations; a weight near orthonormal (QR factor + 0.05 noise), as a trained Björck layer's "
            f"is; forward + backward, median of {repeats} interleaved repeats, 1 torch thread. 64x2048 is "
            "lip_sep_cnn's hidden layer on digits.\n\n"
            + md_table(["weight", "Gram form (ms)", "direct (ms)", "ratio", "max |difference|"], rows))


if __name__ == "__main__":
    print(run())
