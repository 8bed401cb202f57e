"""Certified accuracy against the l2 radius, as the Runkel and Fantastic Four sections report it.

A network with certified Lipschitz bound ``L`` (``sepconv.spectral.lipschitz_bound``) keeps
its prediction on ``x`` for every perturbation of l2 norm below ``margin(x) / (sqrt(2) L)``
(the Lipschitz-margin certificate of Tsuzuku, Sato & Sugiyama, NeurIPS 2018, Prop. 1), and, when
it ends in a Linear layer, below the pairwise radius ``min_j (z_y - z_j) / (L_h ||w_y - w_j||)``
(Leino et al., ICML 2021); ``sepconv.spectral.certified_radii`` keeps the larger, in the units of
the network's input (normalized pixels). A wrong prediction has radius ``-inf``. These helpers
turn the per-sample radii into the report's grid, medians and step curves.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["draw_certified", "median_radius", "radius_grid"]


def _positive(r: Tensor) -> Tensor:
    """The finite positive radii (certified samples with a finite radius)."""
    return r[torch.isfinite(r) & (r > 0)]


def radius_grid(radii: list[Tensor], max_points: int = 6) -> list[float]:
    """The radii at which the report tabulates certified accuracy: ``0`` and the values ``1`` and
    ``3`` times a power of ten spanning the certified radii of the models' correct predictions
    (10% to 90% quantiles, pooled over the models), at most ``max_points`` of them. The networks'
    certified Lipschitz bounds range over many orders of magnitude (free BatchNorm multiplies
    them), so a fixed grid would show only zeros or only ones."""
    pooled = torch.cat([_positive(r) for r in radii])
    if pooled.numel() == 0:
        return [0.0]
    lo, hi = (float(v) for v in torch.quantile(pooled, torch.tensor([0.1, 0.9], dtype=pooled.dtype)))
    grid = [m * 10.0 ** k for k in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
            for m in (1, 3) if lo / 3 <= m * 10.0 ** k <= hi * 3]
    if len(grid) >= max_points:  # keep both ends, evenly spaced between
        grid = [grid[round(i * (len(grid) - 1) / (max_points - 2))] for i in range(max_points - 1)]
    return [0.0] + [float(f"{e:.0e}") for e in grid]


def median_radius(radii: Tensor) -> float:
    """Median certified radius over the test samples (a wrong prediction counts as radius 0)."""
    return float(torch.median(radii.clamp(min=0.0)))


def draw_certified(ax, radii: dict[str, Tensor], lips: dict[str, float]) -> None:
    """Certified accuracy against the radius, one step curve per model (from every sample's radius)."""
    finite = torch.cat([_positive(r) for r in radii.values()])
    lo = float(finite.min()) / 2 if finite.numel() else 1e-6
    for k, r in radii.items():
        n = r.numel()
        xs = torch.sort(_positive(r)).values
        acc = (torch.arange(xs.numel(), 0, -1, dtype=torch.float64) - 1) / n  # fraction above each radius
        ax.step([lo, *xs.tolist()], [float((r > 0).double().mean()), *acc.tolist()], where="post",
                label=f"{k} (L <= {lips[k]:.3g})")
    ax.set_xscale("log")
    ax.set_xlabel("l2 radius eps (normalized pixels)")
    ax.set_ylabel("certified accuracy")
    ax.legend()
