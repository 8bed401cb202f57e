"""Björck orthonormalization of weight matrices, as a parametrization (Björck & Bowie 1971).

The first-order Björck iteration ``A <- A (3 I - A^T A) / 2`` (Björck & Bowie, *An iterative
algorithm for computing the best estimate of an orthogonal matrix*, SIAM J. Numer. Anal. 8(2),
1971; the Newton-Schulz iteration for the polar factor) drives every singular value ``s`` of ``A``
through ``s <- s (3 - s^2) / 2``, whose fixed point 1 attracts all of ``(0, sqrt 3)``: linearly
(a factor ~1.5 per step) while ``s`` is small, quadratically near 1. Its limit is the orthonormal
polar factor ``U V^T`` of ``A = U S V^T``, the closest (semi-)orthogonal matrix in Frobenius norm.
Anil, Lucas, Grosse (ICML 2019, arXiv 1811.05381, Sec. 5) train Lipschitz networks with it
(``BjorckLinear``): differentiable, and with GroupSort gradient-norm preserving.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..errors import ConfigError

__all__ = ["BJORCK_ITERATIONS", "BjorckOrthonormal", "bjorck_orthonormalize"]

#: Default number of Björck steps: from ``A / ||A||_2`` every singular value above ~1e-2 (condition
#: numbers up to ~100) reaches 1 to float32 precision (measured: tests/test_lipschitz_layers.py).
BJORCK_ITERATIONS = 20


def bjorck_orthonormalize(mat: Tensor, iters: int = BJORCK_ITERATIONS) -> Tensor:
    """The (semi-)orthonormal factor of ``mat`` (``(..., m, n)``, a batch of matrices) by ``iters``
    first-order Björck steps (Björck & Bowie 1971; Anil et al. 2019, arXiv 1811.05381, Eq. 9).

    1. ``A = mat / r(mat)``: all singular values in ``(0, 1]``, inside the iteration's basin
       ``(0, sqrt 3)``;
    2. ``iters`` steps ``A <- 1.5 A - 0.5 (A A^T) A``;
    3. ``A / max(1, r(A))``.

    ``r(A) = sqrt(||A A^T||_inf)`` (the largest absolute row sum of the Gram matrix) is an upper bound
    on ``||A||_2`` (``||A||_2^2 = ||A A^T||_2``, and the spectral radius is at most any induced norm),
    tight for the near-orthonormal matrices Björck sees and cheap (no SVD).

    Step 2 runs on the small side only: every iterate is ``A_k = Z_k A_0`` with ``Z_k`` a polynomial
    in the Gram matrix ``G = A_0 A_0^T`` (``min(m, n)`` square): the iteration is Newton-Schulz for
    ``G^(-1/2)``, run in its stable coupled form (Higham, *Functions of Matrices*, 2008, Eq. 6.35:
    ``T = (3 I - Z Y) / 2``, ``Y <- Y T``, ``Z <- T Z`` from ``Y = G``, ``Z = I``), then one product
    ``Z A_0``: ``2 iters`` small products instead of ``2 iters`` products with the long side.

    Step 3 makes the result's spectral norm **certainly** ``<= 1`` (up to the rounding of the
    stored entries) whatever ``iters``; how close to orthonormal it is depends on ``iters`` and on
    the condition number of ``mat`` (a singular value 0 stays 0). Differentiable.
    """
    wide = mat.shape[-2] <= mat.shape[-1]
    a0 = mat if wide else mat.mT
    batch, n = a0.shape[:-2], a0.shape[-2]
    a0 = a0.reshape(-1, n, a0.shape[-1])
    gram = a0 @ a0.mT
    norm2 = _row_sum_norm(gram).clamp_min(torch.finfo(mat.dtype).tiny)
    a0, y = a0 / norm2.sqrt(), gram / norm2
    z = torch.eye(n, dtype=mat.dtype, device=mat.device).expand_as(gram)
    half3 = 1.5 * z
    for _ in range(iters):  # T = 1.5 I - 0.5 Z Y; then Y T and T Z in one batched product
        t = torch.baddbmm(half3, z, y, alpha=-0.5)
        y, z = (torch.stack([y, t]) @ torch.stack([t, z])).unbind(0)
    a = z @ a0
    a = a / _row_sum_norm(a @ a.mT).clamp_min(1.0).sqrt()
    a = a.reshape(*batch, n, a.shape[-1])
    return a if wide else a.mT


def _row_sum_norm(gram: Tensor) -> Tensor:
    """``||G||_inf`` (largest absolute row sum) of each matrix of ``(B, n, n)``, shaped ``(B, 1, 1)``."""
    return gram.abs().sum(-1).amax(-1)[:, None, None]


class BjorckOrthonormal(nn.Module):
    """Parametrization (:mod:`torch.nn.utils.parametrize`) of a ``Linear`` or 1x1 (or any) conv
    weight: the weight reshaped to ``groups`` matrices ``(C_out/g, C_in/g * kh * kw)`` and
    orthonormalized by :func:`bjorck_orthonormalize` (``iters`` Björck steps, then an exact final
    normalization). Spectral norm **certified** ``<= 1`` for a ``Linear`` or an unpadded 1x1 conv
    (the layer is that matrix per pixel); near-orthonormal rows or columns, so the layer nearly
    preserves norms (gradient-norm preserving with GroupSort; Anil et al. 2019, arXiv 1811.05381).

    Stateless (no buffers): the result is a function of the weight. In eval mode without autograd
    the result is cached per weight version (when the input is the parameter itself). For a spatial
    kernel the reshape is *not* the layer's operator and no bound follows (use
    :func:`~sepconv.lipschitz.lipschitz_conv2d` there).
    """

    def __init__(self, iters: int = BJORCK_ITERATIONS, groups: int = 1):
        super().__init__()
        for name, v, low in (("iters", iters, 0), ("groups", groups, 1)):
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ConfigError(f"BjorckOrthonormal: {name} must be an integer >= {low}, got {v!r:.40}")
        self.iters, self.groups = iters, groups
        self._eval_cache: tuple | None = None

    def forward(self, weight: Tensor) -> Tensor:
        if weight.shape[0] % self.groups:
            raise ConfigError(f"BjorckOrthonormal: {weight.shape[0]} output channels are not divisible by "
                              f"groups={self.groups}")
        if weight.is_meta:  # shapes only (create_model's probe)
            return weight
        # cached only for a parameter (a fresh tensor's id can be reused by the next one)
        cached = (isinstance(weight, nn.Parameter) and not self.training
                  and not (weight.requires_grad and torch.is_grad_enabled()))
        key = (id(weight), weight._version, weight.dtype, weight.device)
        if cached and self._eval_cache is not None and self._eval_cache[0] == key:
            return self._eval_cache[1]
        mat = weight.reshape(self.groups, weight.shape[0] // self.groups, -1)
        out = bjorck_orthonormalize(mat, self.iters).reshape(weight.shape)
        if cached:
            self._eval_cache = (key, out.detach())
        return out

    def extra_repr(self) -> str:
        return f"iters={self.iters}, groups={self.groups}"
