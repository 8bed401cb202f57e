"""Section 4: Fantastic Four bounds (Singla & Feizi, ICLR 2021).

Each of the four reshape bounds (docs/spectral.md Sec. 6), their minimum and the Gram
iteration bound (Sec. 4) are checked against the exact norm of every spatial conv of the
trained regular ResNet-20; then ResNet-20 is trained alike with and without the Fantastic
Four penalty, and the networks' certified Lipschitz bounds and certified accuracy compared.
"""

from __future__ import annotations

import math
import statistics
import time

from torch import nn

from ..report import Report, Section
from ..spectral import ConvSpec, certified_radii, fantastic_four_terms, norm_bracket, spectral_norm
from ..spectral.network import layer_inputs
from .certified import draw_certified, median_radius, radius_grid
from .context import Context, Run, eval_batches

__all__ = ["CITATION", "CLAIM", "FF_BETA", "KEY", "TITLE", "section_fantastic_four"]

#: The report section this module writes, and the paper and claim it tests.
KEY, TITLE = "fantastic4", "4. Fantastic Four bounds (Singla & Feizi)"
CITATION = ("Singla & Feizi, Fantastic Four: Differentiable Bounds on Singular Values of Convolution Layers, "
            "ICLR 2021 (arXiv 1911.10258)")
CLAIM = ("Four reshapes of a conv kernel give differentiable, certified upper bounds on the layer's spectral "
         "norm (times the square root of the kernel area), independent of the input size and cheap; their "
         "minimum is reasonably tight, and used as a training penalty it lowers the network's Lipschitz "
         "constant and improves certified robustness.")

#: Weight of the Fantastic Four penalty (the sum of the conv layers' bounds) in the training loss.
FF_BETA = 0.01


def _bound_rows(model: nn.Module, shape: tuple[int, int, int]) -> list[dict]:
    """Per spatial conv of ``model``: its exact norm, the four bounds, their minimum, the Gram
    iteration bound, both ratios to the exact norm and the time of the four bounds."""
    rows = []
    for name, (mod, in_shape) in layer_inputs(model, shape, types=(nn.Conv2d,)).items():
        if mod.kernel_size == (1, 1):
            continue
        w = mod.weight.detach().double()
        spec = ConvSpec.of(mod, in_shape[-2:])
        t = time.perf_counter()
        four = [float(v) for v in fantastic_four_terms(w, spec)]
        t_f4 = time.perf_counter() - t
        lo, hi = norm_bracket(w, spec, tol=1e-4)
        gram = float(spectral_norm(w, spec, "gram"))
        exact = float(lo)
        rows.append({"layer": name, "exact": exact, "R": four[0], "S": four[1], "T": four[2], "U": four[3],
                     "min4": min(four), "gram": gram, "min4_ratio": min(four) / exact, "gram_ratio": gram / exact,
                     "f4_ms": 1e3 * t_f4})
    return rows


def _plot_ratios(sec: Section, rows: list[dict]) -> None:
    def draw(ax):
        ax.plot([r["min4_ratio"] for r in rows], marker="o", label="Fantastic Four (min of four) / exact")
        ax.plot([r["gram_ratio"] for r in rows], marker="s", label="Gram iteration / exact")
        ax.axhline(1.0, color="k", lw=0.8, ls="--")
        ax.set_xlabel("conv layer (network order)")
        ax.set_ylabel("bound / exact")
        ax.legend()

    sec.plot("ratios", draw, "Bound over exact norm per layer:")


def _penalty_table(ctx: Context, sec: Section, plain: Run, pen: Run) -> list[dict]:
    """Certified Lipschitz bound, median certified radius and certified accuracy of the networks
    trained without and with the penalty: the table, the plot and its rows."""
    batches = eval_batches(ctx)
    comp, radii, lips = [], {}, {}
    for label, run in (("no penalty", plain), ("Fantastic Four penalty", pen)):
        model = run.model.eval()
        # the tighter of the global and the final Linear's pairwise certificates; L: the composition bound
        radii[label], lips[label] = certified_radii(model, batches, method="fft")
    eps_grid = radius_grid(list(radii.values()))
    sec.data["certified_eps"] = eps_grid
    for label, run in (("no penalty", plain), ("Fantastic Four penalty", pen)):
        comp.append({"training": label, "beta": 0.0 if run is plain else FF_BETA, "test_acc": run.test_acc,
                     "lipschitz_bound": lips[label], "median_radius": median_radius(radii[label]),
                     **{f"cert@{e:g}": float((radii[label] > e).double().mean()) for e in eps_grid[1:]}})
    sec.table("penalty", ["training", "beta", "test_acc", "lipschitz_bound", "median_radius"]
              + [f"cert@{e:g}" for e in eps_grid[1:]],
              comp, caption="ResNet-20 trained alike with and without the Fantastic Four penalty (the sum of the "
                            "conv layers' bounds times beta); certified accuracy at l2 radius eps and the median "
                            "certified radius, in normalized pixels (the larger of the Lipschitz-margin and the "
                            "final Linear's pairwise certificate; radii chosen to span the models'):")
    sec.plot("certified", lambda ax: draw_certified(ax, radii, lips),
             "Certified accuracy against the l2 radius in normalized pixels, with and without the penalty:")
    return comp


def section_fantastic_four(ctx: Context, report: Report) -> None:
    """Fantastic Four bounds (Singla & Feizi, ICLR 2021)."""
    sec = report.section(KEY, TITLE, claim=CLAIM, paper=CITATION)
    plain = ctx.regular()
    shape = ctx.input_shape(plain.model)
    rows = _bound_rows(plain.model, shape)
    sec.table("bounds", ["layer", "exact", "R", "S", "T", "U", "min4", "gram", "min4_ratio", "gram_ratio", "f4_ms"],
              rows, caption="Each of the four bounds, their minimum and the Gram iteration bound against the exact "
                            "norm, for every spatial conv of the regular ResNet-20 trained on the data:")
    _plot_ratios(sec, rows)
    valid = all(min(r["R"], r["S"], r["T"], r["U"]) >= r["exact"] * (1 - 1e-9) for r in rows)
    gm = math.exp(statistics.fmean(math.log(r["min4_ratio"]) for r in rows))
    pen = ctx.train("resnet20_ff", model="resnet20", ff_beta=FF_BETA)
    comp = _penalty_table(ctx, sec, plain, pen)
    lower = comp[1]["lipschitz_bound"] < comp[0]["lipschitz_bound"]
    sec.verdict(valid and lower, "Every one of the four bounds is at or above the exact norm on every layer: "
                "{valid}; geometric mean of min-of-four over exact {gm}; the penalty lowers the network Lipschitz "
                "bound: {lower} (accuracy change {dacc}; median certified radius {r0} without, {r1} with).",
                valid=valid, gm=gm, lower=lower, dacc=comp[1]["test_acc"] - comp[0]["test_acc"],
                r0=comp[0]["median_radius"], r1=comp[1]["median_radius"])
