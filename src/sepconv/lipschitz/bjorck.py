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

    1. ``A = mat / ||mat||_2`` (exact matrix norm): all singular values in ``(0, 1]``, inside the
       iteration's basin ``(0, sqrt 3)``;
    2. ``iters`` steps ``A <- 1.5 A - 0.5 (A A^T) A`` (the smaller Gram matrix is used);
    3. ``A / max(1, ||A||_2)`` (exact matrix norm again).

    Step 3 makes the result's spectral norm **certainly** ``<= 1`` (up to the rounding of the
    stored entries) whatever ``iters``; how close to orthonormal it is depends on ``iters`` and on
    the condition number of ``mat`` (a singular value 0 stays 0). Differentiable.
    """
    tiny = torch.finfo(mat.dtype).tiny
    a = mat / torch.linalg.matrix_norm(mat, ord=2).clamp_min(tiny)[..., None, None]
    wide = a.shape[-2] <= a.shape[-1]
    for _ in range(iters):
        a = 1.5 * a - 0.5 * ((a @ a.mT) @ a if wide else a @ (a.mT @ a))
    return a / torch.linalg.matrix_norm(a, ord=2).clamp_min(1.0)[..., None, None]


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
