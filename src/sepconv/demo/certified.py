"""Certified accuracy against the l2 radius, as the Runkel and Fantastic Four sections report it.

A network with certified Lipschitz bound ``L`` (``sepconv.spectral.lipschitz_bound``) keeps
its prediction on ``x`` for every perturbation of l2 norm below ``margin(x) / (sqrt(2) L)``
(the Lipschitz-margin certificate of Tsuzuku, Sato & Sugiyama, NeurIPS 2018, Prop. 1), and, when
it ends in a Linear layer, below the pairwise radius ``min_j (z_y - z_j) / (L_h ||w_y - w_j||)``
(Leino et al., ICML 2021); ``sepconv.spectral.certified_radii`` keeps the larger, in the units of
the network's input (normalized pixels). A wrong prediction has radius ``-inf``. These helpers
turn the per-sample radii into the report's medians, tables and step curves. The demo's
radii are pixel-l2 radii of images in [0, 1] (``certified_radii(..., input_scale=std)``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..report import Section

__all__ = ["PIXEL_EPS", "cert_table", "draw_certified", "median_radius"]

#: The pixel-l2 radii (pixels scaled to the unit interval) at which the demo reports certified accuracy.
PIXEL_EPS = (0.1, 0.25, 0.5)


def _positive(r: Tensor) -> Tensor:
    """The finite positive radii (certified samples with a finite radius)."""
    return r[torch.isfinite(r) & (r > 0)]


def median_radius(radii: Tensor) -> float:
    """Median certified radius over the test samples (a wrong prediction counts as radius 0)."""
    return float(torch.median(radii.clamp(min=0.0)))


def cert_table(sec: Section, radii: dict[str, Tensor], lips: dict[str, list[float]], label: str) -> None:
    """The certified-accuracy table: per model (``label`` names the column), the geometric mean of
    its seeds' certified bounds, the median certified radius and the certified accuracy at each of
    :data:`PIXEL_EPS` over the pooled test images."""
    rows = []
    for k, r in radii.items():
        rows.append({label: k, "lipschitz_bound": math.exp(sum(math.log(v) for v in lips[k]) / len(lips[k])),
                     "clean_acc": float((r > -math.inf).double().mean()), "median_radius": median_radius(r),
                     **{f"cert@{e:g}": float((r > e).double().mean()) for e in PIXEL_EPS}})
    sec.table("certificates", [label, "lipschitz_bound", "clean_acc", "median_radius",
                               *(f"cert@{e:g}" for e in PIXEL_EPS)], rows,
              caption="Certified accuracy at pixel-l2 radius eps (pixels scaled to the unit interval) over every "
                      "seed's test fold, the median certified radius (a wrong prediction counts as zero) and the "
                      "geometric mean of the seeds' certified Lipschitz bounds (the larger of the Lipschitz-margin "
                      "and the final Linear's pairwise certificate):")


def draw_certified(ax, radii: dict[str, Tensor], title: str = "", chance: float | None = 0.1) -> None:
    """Certified accuracy against the pixel radius, one step curve per model (from every sample's
    radius); a model whose clean accuracy is at most twice ``chance`` is labelled "near chance"."""
    finite = torch.cat([_positive(r) for r in radii.values()])
    lo = float(finite.min()) / 2 if finite.numel() else 1e-6
    for k, r in radii.items():
        n = r.numel()
        clean = float((r > -math.inf).double().mean())
        xs = torch.sort(_positive(r)).values
        acc = (torch.arange(xs.numel(), 0, -1, dtype=torch.float64) - 1) / n  # fraction above each radius
        near = " near chance" if chance is not None and clean <= 2 * chance else ""
        ax.step([lo, *xs.tolist()], [float((r > 0).double().mean()), *acc.tolist()], where="post",
                label=f"{k} (clean {clean:.3f}{near})")
    for e in PIXEL_EPS:
        ax.axvline(e, color="0.7", lw=0.6, ls=":")
    ax.set_xscale("log")
    ax.set_xlabel("pixel-l2 radius eps (pixels scaled to the unit interval)")
    ax.set_ylabel("certified accuracy")
    if title:
        ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
