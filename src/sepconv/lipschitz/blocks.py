"""BatchNorm, pooling and residual connections that keep a network 1-Lipschitz.

* :class:`BoundedBatchNorm2d` -- eval-mode BatchNorm with every channel's slope clipped to 1;
* :class:`L2Pool2d` -- the l2 norm of each non-overlapping window (or of the whole map);
* :class:`ConvexResidual` -- ``alpha x + (1 - alpha) block(x)``.

:func:`sepconv.spectral.lipschitz_bound` certifies each: it folds the BatchNorm into the adjacent
convolutions from its (clipped) weight, reads the declared constant of the parameter-free
``L2Pool2d``, and traces through ``ConvexResidual`` (a product by a constant, then a sum).
"""

from __future__ import annotations

import math
from numbers import Real

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..errors import ConfigError
from .parametrizations import BatchNormLipschitz

__all__ = ["BoundedBatchNorm2d", "ConvexResidual", "L2Pool2d", "l2_pool2d"]


def _number(layer: str, what: str, value, low: float, high: float = math.inf, open_low: bool = False) -> float:
    """``value`` as a float if it is a finite real in the interval, else a ConfigError naming ``layer``."""
    ok = isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(float(value))
    if not ok or not (low < float(value) if open_low else low <= float(value)) or float(value) > high:
        interval = f"{'(' if open_low else '['}{low:g}, {high:g}]" if high < math.inf else f"> {low:g}"
        raise ConfigError(f"{layer}: {what} must be a number in {interval}, got {value!r:.40}")
    return float(value)


class BoundedBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` whose eval-mode map is ``target``-Lipschitz (``target <= 1`` keeps a network
    1-Lipschitz): the weight is parametrized by :class:`~sepconv.normalize.BatchNormLipschitz` in
    ``clip`` mode, ``gamma_c <- gamma_c / max(1, |gamma_c| / (target sqrt(running_var_c + eps)))``,
    so every channel's slope ``|gamma_c| / sqrt(running_var_c + eps)`` is at most ``target``:
    **exact** (the eval-mode map is diagonal; Gouk et al. 2021, arXiv 1804.04368, Sec. 3). In
    training mode the batch's own variance is used (as any BatchNorm) and no constant holds; the
    certificate is for the eval-mode network. Always affine, with running statistics.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1, target: float = 1.0,
                 device=None, dtype=None):
        target = _number("BoundedBatchNorm2d", "target", target, 0.0, open_low=True)
        super().__init__(num_features, eps, momentum, affine=True, track_running_stats=True, device=device,
                         dtype=dtype)
        parametrize.register_parametrization(self, "weight", BatchNormLipschitz(self, target, "clip"), unsafe=True)


def l2_pool2d(x: Tensor, kernel_size: int | tuple[int, int] | None = None, eps: float = 1e-12) -> Tensor:
    """``sqrt(sum_{window} x^2 + eps) - sqrt(eps)`` per channel over non-overlapping ``kernel_size``
    windows (stride = kernel; a remainder at the bottom/right is dropped, as ``avg_pool2d`` does), or
    over the whole map (``kernel_size=None``, output ``1 x 1``).

    **Exactly 1-Lipschitz** (l2): on one window ``f(v) = sqrt(||v||^2 + eps)`` has gradient
    ``v / sqrt(||v||^2 + eps)`` of norm ``< 1`` with supremum 1, and disjoint windows add in
    quadrature (L2 pooling, e.g. Sermanet et al. 2012; used in 1-Lipschitz networks, Anil et al. 2019).
    ``eps > 0`` keeps the gradient finite at an all-zero window."""
    if x.dim() != 4:
        raise ConfigError(f"L2Pool2d: expected an input (N, C, H, W), got shape {tuple(x.shape)}")
    sq = x * x
    if kernel_size is None:
        s = sq.sum(dim=(2, 3), keepdim=True)
    else:
        kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
        if x.shape[2] < kh or x.shape[3] < kw:
            raise ConfigError(f"L2Pool2d: input {tuple(x.shape[2:])} is smaller than the window {(kh, kw)}")
        s = F.avg_pool2d(sq, (kh, kw), stride=(kh, kw)) * (kh * kw)
    return torch.sqrt(s + eps) - math.sqrt(eps)


class L2Pool2d(nn.Module):
    """L2 pooling over non-overlapping windows (:func:`l2_pool2d`): ``kernel_size`` (int or pair; the
    stride equals it) or ``None`` for global pooling to ``1 x 1``. **Exactly 1-Lipschitz**; the
    output is non-negative. Declares ``lipschitz_constant = 1.0`` (it is parameter-free)."""

    #: exact Lipschitz constant (l2), read by :func:`sepconv.spectral.lipschitz_bound`
    lipschitz_constant = 1.0

    def __init__(self, kernel_size: int | tuple[int, int] | None = None, eps: float = 1e-12):
        super().__init__()
        ks = (kernel_size, kernel_size) if isinstance(kernel_size, int) and not isinstance(kernel_size, bool) \
            else kernel_size
        if ks is not None and not (isinstance(ks, tuple) and len(ks) == 2
                                   and all(isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in ks)):
            raise ConfigError(f"L2Pool2d: kernel_size must be a positive int, a pair or None, got {kernel_size!r:.40}")
        self.kernel_size = ks
        self.eps = _number("L2Pool2d", "eps", eps, 0.0, open_low=True)

    def forward(self, x: Tensor) -> Tensor:
        return l2_pool2d(x, self.kernel_size, self.eps)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}" if self.kernel_size is not None else "global"


class ConvexResidual(nn.Module):
    """``alpha x + (1 - alpha) block(x)``, ``0 <= alpha <= 1``: if ``block`` is ``L``-Lipschitz the sum
    is ``(alpha + (1 - alpha) L)``-Lipschitz (triangle inequality), so **1-Lipschitz when the block
    is** -- a certified bound, as a plain residual ``x + block(x)`` (constant ``1 + L``) is not. The
    block must keep the shape of its input. No declared constant (it has parameters):
    :func:`sepconv.spectral.lipschitz_bound` traces through it and bounds ``block`` itself.
    """

    def __init__(self, block: nn.Module, alpha: float = 0.5):
        super().__init__()
        if not isinstance(block, nn.Module):
            raise ConfigError(f"ConvexResidual: block must be an nn.Module, got {type(block).__name__}")
        self.block = block
        self.alpha = _number("ConvexResidual", "alpha", alpha, 0.0, 1.0)

    def forward(self, x: Tensor) -> Tensor:
        return self.alpha * x + (1.0 - self.alpha) * self.block(x)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha:g}"
