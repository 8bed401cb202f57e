"""Gradient-norm-preserving activations: MaxMin and GroupSort (Anil, Lucas, Grosse 2019).

A ReLU network whose layers are all 1-Lipschitz loses gradient norm at every ReLU (it zeroes
the coordinates below 0) and cannot represent even ``|x|`` with norm-constrained weights; sorting
activations keep every coordinate, only permuting them, so the Jacobian is a permutation matrix
almost everywhere: **exactly 1-Lipschitz** in l2 (and every lp), **gradient-norm preserving**
(Anil, Lucas, Grosse, *Sorting out Lipschitz function approximation*, ICML 2019, arXiv 1811.05381,
Sec. 4). Both classes declare ``lipschitz_constant = 1.0`` (they are parameter-free), which
:func:`sepconv.spectral.lipschitz_bound` reads (:func:`sepconv.spectral.lipschitz_rules.declared_lipschitz`).
Channels are dimension 1 of any input of 2 or more dimensions (``(N, C)`` or ``(N, C, H, W)``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..errors import ConfigError

__all__ = ["ACTIVATIONS", "GroupSort", "MaxMin", "activation", "channel_multiple", "group_sort", "max_min"]

#: Activations of the Lipschitz models, by name: all 1-Lipschitz; the first two gradient-norm preserving.
ACTIVATIONS = ("maxmin", "groupsort", "relu")


def _channels(x: Tensor, divisor: int, layer: str) -> int:
    """The channel count of ``x`` (dimension 1), checked to be a multiple of ``divisor``."""
    if x.dim() < 2:
        raise ConfigError(f"{layer}: expected an input (N, C, ...), got shape {tuple(x.shape)}")
    c = int(x.shape[1])
    if c % divisor:
        raise ConfigError(f"{layer}: {c} input channels are not divisible by {divisor}")
    return c


def max_min(x: Tensor) -> Tensor:
    """MaxMin (Anil et al. 2019, arXiv 1811.05381, Sec. 4): pairs channel ``i`` with channel
    ``i + C/2`` and outputs ``(max(a, b), min(a, b))`` -- the first half the maxima, the second the
    minima. Per pair a sort of two numbers, so **exactly 1-Lipschitz** (l2) and gradient-norm
    preserving; ``C`` must be even (:class:`~sepconv.errors.ConfigError` otherwise)."""
    c = _channels(x, 2, "MaxMin")
    a, b = x[:, : c // 2], x[:, c // 2:]
    return torch.cat([torch.maximum(a, b), torch.minimum(a, b)], dim=1)


def group_sort(x: Tensor, group_size: int) -> Tensor:
    """GroupSort (Anil et al. 2019, arXiv 1811.05381, Sec. 4): sorts each group of ``group_size``
    consecutive channels in ascending order. A permutation of the coordinates that depends on the
    input only through the order, so ``||sort(a) - sort(b)|| <= ||a - b||`` (rearrangement
    inequality): **exactly 1-Lipschitz** (l2), gradient-norm preserving. ``group_size = 2`` is
    MaxMin up to a fixed permutation of channels; ``group_size = C`` is the full sort."""
    c = _channels(x, group_size, f"GroupSort(group_size={group_size})")
    shape = x.shape
    return x.reshape(shape[0], c // group_size, group_size, *shape[2:]).sort(dim=2).values.reshape(shape)


class MaxMin(nn.Module):
    """MaxMin activation (:func:`max_min`; Anil, Lucas, Grosse 2019, arXiv 1811.05381): channel
    halves ``a, b`` -> ``(max(a, b), min(a, b))``. **Exactly 1-Lipschitz** and gradient-norm
    preserving; needs an even number of channels."""

    #: exact Lipschitz constant (l2), read by :func:`sepconv.spectral.lipschitz_bound`
    lipschitz_constant = 1.0

    def forward(self, x: Tensor) -> Tensor:
        return max_min(x)


class GroupSort(nn.Module):
    """GroupSort activation (:func:`group_sort`; Anil, Lucas, Grosse 2019, arXiv 1811.05381):
    sorts groups of ``group_size`` consecutive channels. **Exactly 1-Lipschitz** and gradient-norm
    preserving; the channel count must be a multiple of ``group_size`` (>= 2)."""

    #: exact Lipschitz constant (l2), read by :func:`sepconv.spectral.lipschitz_bound`
    lipschitz_constant = 1.0

    def __init__(self, group_size: int = 2):
        super().__init__()
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2:
            raise ConfigError(f"GroupSort: group_size must be an integer >= 2, got {group_size!r:.40}")
        self.group_size = group_size

    def forward(self, x: Tensor) -> Tensor:
        return group_sort(x, self.group_size)

    def extra_repr(self) -> str:
        return f"group_size={self.group_size}"


def activation(name: str, group_size: int = 4) -> nn.Module:
    """The activation ``name`` of :data:`ACTIVATIONS`: :class:`MaxMin`, :class:`GroupSort` of
    ``group_size`` or ``nn.ReLU`` (1-Lipschitz, but it discards the negative part and with it
    gradient norm)."""
    if not isinstance(name, str) or name not in ACTIVATIONS:
        raise ConfigError(f"activation: act must be one of {', '.join(map(repr, ACTIVATIONS))}, got {name!r:.40}")
    return {"maxmin": MaxMin, "groupsort": lambda: GroupSort(group_size), "relu": nn.ReLU}[name]()


def channel_multiple(name: str, group_size: int = 4) -> int:
    """The number the channel count must be a multiple of for activation ``name``."""
    return {"maxmin": 2, "groupsort": group_size}.get(name, 1)
