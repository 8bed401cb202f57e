"""Orthogonal depthwise convolutions: each input channel analysed by a **paraunitary filter bank**.

A depthwise conv with depth multiplier ``m`` maps channel ``c`` to ``m`` channels by the filters
``h_c1 .. h_cm``; with circular padding its operator is block-diagonal in the 2-D DFT, one
``m x 1`` column ``h_c^(w)`` per channel and frequency, so its singular values are
``||h_c^(w)||_2``. It is an **isometry** (every singular value 1: norm-preserving, hence gradient-norm
preserving; Anil et al. 2019, arXiv 1811.05381) iff ``sum_j |h_cj^(w)|^2 = 1`` at every ``w`` --
a tight-frame (paraunitary) filter bank. No single filter is one except a shift, which is why
normalizing a ``m = 1`` depthwise conv by its norm (Runkel et al. 2021) only *caps* it.

Construction (the paraunitary factorization of Vaidyanathan, *Multirate Systems and Filter Banks*,
1993, Sec. 14.4; the 2-D separable form used for orthogonal convolutions by BCOP, Li et al. 2019,
arXiv 1911.00937, Sec. 4): with unit vectors ``u`` in ``R^m`` and ``P = u u^T``, the degree-one
factor ``V(z) = (I - P) + P z`` is paraunitary (``V(w)^H V(w) = I`` on the unit circle), and so is
any product of them. For a ``kh x kw`` kernel,

``h_c(z1, z2) = V_{c,kw-1}(z2) .. V_{c,1}(z2) V'_{c,kh-1}(z1) .. V'_{c,1}(z1) q_c``

with a unit vector ``q_c``: ``||h_c^(w)|| = ||q_c|| = 1`` at every frequency, by construction. With
zero padding the operator is a submatrix of the circulant one (norm <= 1, an isometry away from the
border); a stride keeps every ``s``-th output (norm <= 1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError

__all__ = ["ParaunitaryDepthwise", "paraunitary_filters"]


def _unit(v: Tensor) -> Tensor:
    """``v / ||v||`` along the last axis (a zero vector stays finite)."""
    return v / torch.linalg.vector_norm(v, dim=-1, keepdim=True).clamp_min(torch.finfo(v.dtype).tiny)


def _factor(h: Tensor, u: Tensor, axis: int) -> Tensor:
    """``((I - u u^T) + u u^T z) h`` for filters ``h`` ``(C, m, kh, kw)`` and unit vectors ``u`` ``(C, m)``:
    the kernel grows by one along ``axis`` (2: rows, 3: columns)."""
    proj = u[:, :, None, None] * torch.einsum("cm,cmij->cij", u, h)[:, None]
    pad_end, pad_start = ((0, 0, 0, 1), (0, 0, 1, 0)) if axis == 2 else ((0, 1), (1, 0))
    return F.pad(h - proj, pad_end) + F.pad(proj, pad_start)


def paraunitary_filters(q: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """The filters ``(C, m, kh, kw)`` of ``C`` paraunitary ``1 -> m`` filter banks (module docstring):
    ``q`` ``(C, m)`` the constant vector, ``rows`` ``(C, kh - 1, m)`` and ``cols`` ``(C, kw - 1, m)`` the
    projection directions of the factors in ``z1`` and ``z2`` (all normalized here). For every ``c`` and
    frequency ``w``: ``sum_j |h_cj^(w)|^2 = 1``. Differentiable."""
    h = _unit(q)[:, :, None, None]
    for axis, vectors in ((2, rows), (3, cols)):
        for u in _unit(vectors).unbind(1):
            h = _factor(h, u, axis)
    return h


class ParaunitaryDepthwise(nn.Module):
    """Parametrization (:mod:`torch.nn.utils.parametrize`) of a depthwise conv weight
    ``(C m, 1, kh, kw)`` (``groups = C``, depth multiplier ``m``) as ``C`` paraunitary filter banks
    (:func:`paraunitary_filters`): with circular padding the layer is an **isometry** from ``C`` to
    ``C m`` channels; with zero padding, a stride or dilation its norm is **<= 1**.

    The raw weight stores the parameters: per channel its ``m x (kh kw)`` block gives ``q`` (column
    0) and the ``kh + kw - 2`` projection directions (the next columns); the remaining
    ``(kh - 1)(kw - 1)`` columns are unused (zero gradient). Needs ``m >= 2`` (for ``m = 1`` every
    unit-norm factor is a shift). The filters are computed in float64 (a few hundred numbers per
    channel) and rounded once to the weight's dtype, so a float32 layer's norm is 1 to ~1e-7, not to
    the ~1e-6 that products of float32 factors leave. Stateless."""

    def __init__(self, multiplier: int, kernel_size: tuple[int, int]):
        super().__init__()
        if isinstance(multiplier, bool) or not isinstance(multiplier, int) or multiplier < 2:
            raise ConfigError(f"ParaunitaryDepthwise: the depth multiplier must be an integer >= 2 (m = 1 "
                              f"leaves only shifts), got {multiplier!r:.40}")
        self.multiplier, self.kernel_size = multiplier, tuple(kernel_size)

    def forward(self, weight: Tensor) -> Tensor:
        if weight.is_meta:  # shapes only (create_model's probe)
            return weight
        kh, kw = self.kernel_size
        m = self.multiplier
        raw = weight.reshape(-1, m, kh * kw).to(torch.promote_types(weight.dtype, torch.float64))
        q, rows, cols = raw[:, :, 0], raw[:, :, 1:kh], raw[:, :, kh:kh + kw - 1]
        return paraunitary_filters(q, rows.mT, cols.mT).reshape(weight.shape).to(weight.dtype)

    def extra_repr(self) -> str:
        return f"multiplier={self.multiplier}, kernel_size={self.kernel_size}"
