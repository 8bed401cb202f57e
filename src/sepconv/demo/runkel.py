"""Section 1: spectral normalization of depthwise separable convolutions (Runkel et al. 2021).

MobileNetV2 is trained alike with each spectral normalization of :mod:`sepconv.normalize`
(none, ``dsc``: exact per-part norms, ``operator``: power iteration on the conv operator,
``reshape``: torch's matrix reshape, wrong for convolutions; docs/spectral.md Sec. 8 and 11),
then every depthwise and pointwise conv's exact norm, the train step's cost and the
network's certified accuracy are measured.
"""

from __future__ import annotations

import torch
from torch import nn

from ..report import Report, Section
from ..spectral import ConvSpec, certified_radii, norm_bracket
from ..spectral.network import layer_inputs
from .certified import draw_certified, median_radius, radius_grid
from .context import Context, Run, eval_batches
from .timing import train_step_costs

__all__ = ["CITATION", "CLAIM", "KEY", "SN_METHODS", "TITLE", "section_runkel"]

#: The report section this module writes, and the paper and claim it tests.
KEY, TITLE = "runkel", "1. Spectral normalization of separable convolutions (Runkel et al.)"
CITATION = ("Runkel, Etmann, Moeller, Schoenlieb, Depthwise Separable Convolutions Allow for Fast and "
            "Memory-Efficient Spectral Normalization (arXiv 2102.06496)")
CLAIM = ("Depthwise separable convolutions allow fast, memory-efficient and exact spectral normalization: "
         "the depthwise part has a closed-form FFT norm and the pointwise part is a matrix, so every layer "
         "meets its norm target at little cost, while torch's reshape-based spectral_norm is wrong for "
         "convolutions and power iteration on the operator keeps a feature-map-sized state per layer.")

#: The spectral normalizations compared (``None``: no normalization, labelled "none").
SN_METHODS = (None, "dsc", "operator", "reshape")


def _sn_label(m: str | None) -> str:
    return "none" if m is None else m


def _dw_pw_norms(model: nn.Module, shape: tuple[int, int, int]) -> list[dict]:
    """Exact operator norms (certified brackets, lower end) of every depthwise and pointwise conv."""
    rows = []
    for name, (mod, in_shape) in layer_inputs(model, shape, types=(nn.Conv2d,)).items():
        is_dw = mod.groups == mod.in_channels and mod.groups > 1 and mod.weight.shape[1] == 1
        is_pw = mod.kernel_size == (1, 1) and mod.groups == 1
        if not (is_dw or is_pw):
            continue
        lo, hi = norm_bracket(mod.weight.detach().double(), ConvSpec.of(mod, in_shape[-2:]), tol=1e-4)
        rows.append({"layer": name, "kind": "depthwise" if is_dw else "pointwise", "exact": float(lo),
                     "upper": float(hi)})
    return rows


def _measure(ctx: Context, runs: dict[str, Run]) -> tuple[list[dict], dict, dict, dict]:
    """Per trained run: the cost of a train step, the exact norm of every depthwise and pointwise
    conv, the certified Lipschitz bound and every test sample's certified radius. Returns the
    table rows and, by run, the per-layer norms, the bounds and the radii."""
    b = ctx.budget
    shape = ctx.input_shape(next(iter(runs.values())).model)
    ctx.progress("timing SN train steps")
    batch_x, batch_y = eval_batches(ctx, limit=64, batch_size=64)[0]
    models = {k: r.model.to(memory_format=torch.channels_last) for k, r in runs.items()}
    costs = train_step_costs(models, (batch_x.contiguous(memory_format=torch.channels_last), batch_y),
                             b.timing_repeats)
    base = costs["none"]
    rows, norms, lips = [], {}, {}
    batches = eval_batches(ctx)
    radii = {}
    for k, run in runs.items():
        ctx.progress(f"exact norms after SN {k}")
        model = run.model.eval()
        norms[k] = _dw_pw_norms(model, shape)
        # the tighter of the global and the final Linear's pairwise certificates; L: the composition bound
        radii[k], L = certified_radii(model, batches, method="fft")
        lips[k] = L
        over = sum(r["exact"] > 1 + 1e-3 for r in norms[k])
        rows.append({"sn": k, "test_acc": run.test_acc, "step_ms": 1e3 * costs[k]["step_s"],
                     "step_vs_none": costs[k]["step_s"] / base["step_s"],
                     "saved_MiB": costs[k]["saved_bytes"] / 2**20, "state_KiB": costs[k]["buffer_bytes"] / 2**10,
                     "max_layer_norm": max(r["exact"] for r in norms[k]), "layers_above_1": over,
                     "lipschitz_bound": L})
    return rows, norms, lips, radii


def _tables(sec: Section, rows: list[dict], norms: dict, lips: dict, radii: dict) -> None:
    """The methods table, the per-layer norms and the certified-accuracy table."""
    eps_grid = radius_grid(list(radii.values()))
    cert = {k: [float((r > e).double().mean()) for e in eps_grid] for k, r in radii.items()}
    sec.table("methods", ["sn", "test_acc", "step_ms", "step_vs_none", "saved_MiB", "state_KiB", "max_layer_norm",
                          "layers_above_1", "lipschitz_bound"], rows,
              caption="MobileNetV2 trained alike with each spectral normalization (target one per layer, clip "
                      "mode; BatchNorm left free: clipping it to one as well stops the network from learning at this "
                      "budget; a scaled loss, cross_entropy(s logits) / s, helps the small digits CNN of "
                      "BENCHMARKS.md but cost this MobileNetV2 most of its accuracy at this budget). Step "
                      "time is the median of interleaved repeats at batch size of the table's timing batch; "
                      "saved_MiB is what autograd keeps for backward; state_KiB the persistent buffers; "
                      "norms are exact per-layer operator norms "
                      "(certified brackets) of the trained depthwise and pointwise convs.")
    sec.data["per_layer"] = norms
    sec.data["certified"] = {"eps": eps_grid, **cert}
    sec.table("certificates", ["sn", "lipschitz_bound", "median_radius", *(f"cert@{e:g}" for e in eps_grid)],
              [{"sn": k, "lipschitz_bound": lips[k], "median_radius": median_radius(radii[k]),
                **{f"cert@{e:g}": c for e, c in zip(eps_grid, cert[k])}} for k in cert],
              caption="Certified accuracy on the test split at l2 radius eps, in the network's input units "
                      "(normalized pixels; the larger of the Lipschitz-margin certificate with the network's "
                      "certified bound and the final Linear's pairwise one; radii chosen to span the models' "
                      "certified radii):")


def _plots(sec: Section, norms: dict, lips: dict, radii: dict) -> None:
    """The per-layer norms by method, and certified accuracy against the radius."""

    def draw_norms(ax):
        for k, rs in norms.items():
            ax.plot(range(len(rs)), [r["exact"] for r in rs], marker=".", label=k)
        ax.axhline(1.0, color="k", lw=0.8, ls="--")
        ax.set_yscale("log")
        ax.set_xlabel("depthwise / pointwise conv (network order)")
        ax.set_ylabel("exact operator norm")
        ax.legend()

    def draw_cert(ax):
        draw_certified(ax, radii, lips)

    sec.plot("norms", draw_norms, "Exact norm of every depthwise and pointwise conv after training, by method "
                                  "(dashed: the target):")
    sec.plot("certified", draw_cert, "Certified accuracy against the l2 radius in normalized pixels "
                                     "(Lipschitz-margin certificates with the network's certified bounds):")


def _verdict(sec: Section, rows: list[dict]) -> None:
    """Held when dsc keeps every layer at the target and reshape misses it."""
    r = {row["sn"]: row for row in rows}
    ok_dsc = r["dsc"]["layers_above_1"] == 0
    reshape_misses = r["reshape"]["layers_above_1"] > 0 or r["reshape"]["max_layer_norm"] < 0.9
    acc_gap = r["none"]["test_acc"] - r["dsc"]["test_acc"]
    held = ok_dsc and reshape_misses
    sec.verdict(held, "dsc keeps every depthwise and pointwise conv at or below the target: {ok_dsc} "
                      "(largest {max_dsc}); its train step costs {ratio} of the unnormalized one against "
                      "{ratio_op} for operator power iteration, with {state} KiB of state against {state_op} KiB; "
                      "accuracy gap to no SN {gap}; reshape misses the target (some layer above it or every "
                      "layer far below): {miss}.",
                ok_dsc=ok_dsc, max_dsc=r["dsc"]["max_layer_norm"], ratio=r["dsc"]["step_vs_none"],
                ratio_op=r["operator"]["step_vs_none"], state=r["dsc"]["state_KiB"],
                state_op=r["operator"]["state_KiB"], gap=acc_gap, miss=reshape_misses)


def section_runkel(ctx: Context, report: Report) -> None:
    """Spectral normalization of depthwise separable convs (Runkel et al. 2021)."""
    b = ctx.budget
    sec = report.section(KEY, TITLE, claim=CLAIM, paper=CITATION)
    runs = {}
    for m in SN_METHODS:
        runs[_sn_label(m)] = ctx.train(f"mobilenet_v2_sn_{_sn_label(m)}", model="cifar_mobilenet_v2",
                                       width=b.mobilenet_width, sn=m)
    rows, norms, lips, radii = _measure(ctx, runs)
    _tables(sec, rows, norms, lips, radii)
    _plots(sec, norms, lips, radii)
    _verdict(sec, rows)
