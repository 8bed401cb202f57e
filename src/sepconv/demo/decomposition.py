"""Section 2: depth-wise decomposition of trained convolutions (He et al. 2019).

A trained regular ResNet-20 is converted at rank one into depthwise separable (``dsc``) and
BSConv-U form, by per-channel SVD and by its data-driven GSVD form, and into channel
decomposition at the FLOPs of the rank-one DSC conversion (docs/decomposition.md Sec. 1-3);
each conversion is fine-tuned and compared with the same separable network trained from
scratch for as many epochs in all. The output error of the converted layers is then traced
against the model's FLOPs over ranks.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..data import load_dataset
from ..decompose import convert
from ..io import save_model
from ..models import count_params, profile
from ..report import Report, Section
from ..train import evaluate
from .context import Context, eval_batches
from .timing import forward_ms

__all__ = ["CITATION", "CLAIM", "KEY", "TITLE", "VARIANTS", "section_he"]

#: The report section this module writes, and the paper and claim it tests.
KEY, TITLE = "he", "2. Depth-wise decomposition of trained convolutions (He et al.)"
CITATION = ("He, Qian, Wang et al., Depth-wise Decomposition for Accelerating Separable Convolutions in "
            "Efficient Convolutional Neural Networks (arXiv 1910.09455)")
CLAIM = ("A trained regular CNN converted into a depthwise separable one by per-channel SVD (and its "
         "data-driven GSVD form), then fine-tuned, beats the same separable network trained from scratch "
         "and beats channel decomposition at equal FLOPs.")

#: The rank-one conversions compared, as ``(to, method)`` of :func:`sepconv.decompose.convert`.
VARIANTS = [("dsc", "svd"), ("dsc", "gsvd"), ("bsconv_u", "svd"), ("bsconv_u", "gsvd")]


def _network_row(network: str, model: nn.Module, shape: tuple[int, int, int], x_time: Tensor, repeats: int, *,
                 before_ft: float | None, test_acc: float, out_error: float | None) -> dict:
    """A row of the networks table: the given columns, and the model's parameters, MFLOPs (at
    ``shape``) and median forward time on ``x_time``."""
    return {"network": network, "before_ft": before_ft, "test_acc": test_acc, "params": count_params(model),
            "mflops": profile(model, shape).flops / 1e6, "out_error": out_error,
            "fwd_ms": forward_ms(model, x_time, repeats)}


def _calibration(ctx: Context):
    """The calibration images of the data-driven conversions (the train split, or its first
    ``calib_images`` images)."""
    b = ctx.budget
    calib = load_dataset(ctx.data, ctx.data_dir, split="train", image_size=b.image_size)
    if b.calib_images is not None and b.calib_images < len(calib):
        calib = calib.get_batch(torch.arange(b.calib_images))[0]
    return calib


def _convert_all(ctx: Context, regular: nn.Module, calib, inner) -> tuple[dict, float]:
    """Every rank-one conversion of :data:`VARIANTS`, and channel decomposition at the FLOPs of the
    rank-one DSC (SVD) one. Returns ``{(to, method): (model, report)}`` and that speedup."""
    dsc_flops = None
    converted = {}
    for to, method in VARIANTS:
        ctx.progress(f"converting to {to} ({method})")
        new, rep = convert(regular, to=to, rank=1, method=method, data=calib, layers=inner)
        converted[(to, method)] = (new, rep)
        if (to, method) == ("dsc", "svd"):
            dsc_flops = rep.totals["flops_after"]
    speedup = converted[("dsc", "svd")][1].totals["flops_before"] / dsc_flops
    new, rep = convert(regular, to="channel", speedup=speedup, method="gsvd", data=calib, layers=inner)
    converted[("channel", "gsvd")] = (new, rep)
    return converted, speedup


def _finetuned_rows(ctx: Context, converted: dict, shape: tuple[int, int, int], x_time: Tensor) -> list[dict]:
    """Save each conversion, measure it, fine-tune it, and its row of the networks table."""
    b = ctx.budget
    rows = []
    for (to, method), (new, rep) in converted.items():
        name = f"resnet20_{to}_{method}"
        save_model(new, ctx.out / "converted" / name)
        _, before = evaluate(new, load_dataset(ctx.data, ctx.data_dir, split="test", image_size=b.image_size))
        tuned = ctx.train(f"{name}_ft", init=str(ctx.out / "converted" / name), epochs=b.finetune_epochs,
                          lr=0.01)
        rows.append(_network_row(f"{to} ({method}) + fine-tune", tuned.model, shape, x_time, b.timing_repeats,
                                 before_ft=before, test_acc=tuned.test_acc,
                                 out_error=rep.totals.get("mean_output_error")))
    return rows


def _error_curves(ctx: Context, regular: nn.Module, converted: dict, speedup: float, calib, inner) -> list[dict]:
    """Output error against the model's FLOPs ratio: each variant at rank one (from ``converted``)
    and at the budget's ``curve_ranks``, channel decomposition at the matching FLOPs."""
    b = ctx.budget
    curves = []

    def point(label: str, rank: int | None, rep) -> None:
        curves.append({"method": label, "rank": rank,
                       "flops_ratio": rep.totals["flops_after"] / rep.totals["flops_before"],
                       "out_error": rep.totals["mean_output_error"]})

    for to, method in VARIANTS:  # rank one is in the table above; higher ranks here
        point(f"{to}/{method}", 1, converted[(to, method)][1])
        for r in b.curve_ranks:
            point(f"{to}/{method}", r, convert(regular, to=to, rank=r, method=method, data=calib,
                                               layers=inner)[1])
    point("channel/gsvd", None, converted[("channel", "gsvd")][1])
    for sp in [speedup / r for r in b.curve_ranks]:  # channel decomposition at the FLOPs of those ranks
        point("channel/gsvd", None, convert(regular, to="channel", speedup=sp, method="gsvd", data=calib,
                                            layers=inner)[1])
    return curves


def _plot_curves(sec: Section, curves: list[dict]) -> None:
    def draw(ax):
        for m in dict.fromkeys(c["method"] for c in curves):
            pts = sorted((c["flops_ratio"], c["out_error"]) for c in curves if c["method"] == m)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m)
        ax.set_xlabel("FLOPs after / before (whole model)")
        ax.set_ylabel("mean relative output error")
        ax.legend()

    sec.plot("error_vs_flops", draw, "Output error of the converted layers against the model's FLOPs, per "
                                     "method (points: ranks one, two, four; channel decomposition at matching "
                                     "budgets):")


def _verdict(sec: Section, rows: list[dict], scratch_acc: float) -> None:
    """Held when the better converted DSC beats both DSC from scratch and channel decomposition."""
    by = {r["network"]: r for r in rows}
    best = max(by["dsc (gsvd) + fine-tune"]["test_acc"], by["dsc (svd) + fine-tune"]["test_acc"])
    beats_scratch = best >= scratch_acc
    beats_channel = best >= by["channel (gsvd) + fine-tune"]["test_acc"]
    gsvd_better = by["dsc (gsvd) + fine-tune"]["out_error"] <= by["dsc (svd) + fine-tune"]["out_error"]
    sec.verdict(beats_scratch and beats_channel, "Converted and fine-tuned DSC ({best}) against DSC from scratch "
                "({scratch}): {s}; against channel decomposition at equal FLOPs ({chan}): {c}; GSVD output error "
                "at or below SVD's: {g}.", best=best, scratch=scratch_acc, s=beats_scratch,
                chan=by["channel (gsvd) + fine-tune"]["test_acc"], c=beats_channel, g=gsvd_better)


def section_he(ctx: Context, report: Report) -> None:
    """Depth-wise decomposition (He et al. 2019)."""
    b = ctx.budget
    sec = report.section(KEY, TITLE, claim=CLAIM, paper=CITATION)
    regular = ctx.regular()
    shape = ctx.input_shape(regular.model)
    calib = _calibration(ctx)
    total_epochs = b.epochs + b.finetune_epochs
    scratch = ctx.train("resnet20_dsc_scratch", model="resnet20", conv="dsc", epochs=total_epochs)
    x_time = eval_batches(ctx, limit=64, batch_size=64)[0][0]
    rows = [_network_row("regular (trained)", regular.model, shape, x_time, b.timing_repeats,
                         before_ft=None, test_acc=regular.test_acc, out_error=0.0),
            _network_row("DSC from scratch", scratch.model, shape, x_time, b.timing_repeats,
                         before_ft=None, test_acc=scratch.test_acc, out_error=None)]
    # every spatial conv but the stem, whose few input channels leave nothing to factor (a 1-channel
    # stem is already rank one per filter); the DSC network from scratch keeps a DSC stem
    inner = lambda name, m: m.in_channels > shape[0]  # noqa: E731
    converted, speedup = _convert_all(ctx, regular.model, calib, inner)
    rows += _finetuned_rows(ctx, converted, shape, x_time)
    sec.table("networks", ["network", "before_ft", "test_acc", "params", "mflops", "out_error", "fwd_ms"], rows,
              caption="ResNet-20 on the data: the trained regular network, converted at rank one and fine-tuned, "
                      "against the same depthwise separable network trained from scratch for as many epochs in "
                      "all, and channel decomposition at the FLOPs of the rank-one DSC conversion (conversions "
                      "keep the stem regular: its few input channels leave little to factor). out_error is "
                      "the mean relative output error of the converted layers on calibration images.")
    ctx.progress("output error vs rank")
    curves = _error_curves(ctx, regular.model, converted, speedup, calib, inner)
    sec.table("error_vs_rank", ["method", "rank", "flops_ratio", "out_error"], curves)
    _plot_curves(sec, curves)
    _verdict(sec, rows, scratch.test_acc)
