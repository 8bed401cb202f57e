"""Section 2: depth-wise decomposition of trained convolutions (He et al. 2019).

On every seed, a trained regular ResNet-20 is converted at rank one into depthwise separable
(``dsc``) and BSConv-U form, by per-channel SVD and by its data-driven GSVD form (reported
separately), and into channel decomposition at the FLOPs of the rank-one DSC conversion
(docs/decomposition.md Sec. 1-3); each conversion is fine-tuned alike (learning rate restarted at
a tenth, cosine decay). The from-scratch arm is the converted architecture itself, reinitialized
(so the stem is treated the same in both arms), trained for as many epochs as the regular network
and a fine-tune together. Accuracies are compared paired over seeds; the output error of the
converted layers is traced against the model's FLOPs over ranks, and each arm's latency measured
in the deployment runtime.
"""

from __future__ import annotations

import copy
import importlib.util
import statistics

import torch
from torch import nn

from ..decompose import convert
from ..deploy import measure_latency
from ..evidence import combine, compare, pooled_accuracy
from ..io import save_model
from ..models import count_params, profile
from ..report import Report, Section
from ..train import evaluate
from .context import Context

__all__ = ["CITATION", "CLAIM", "KEY", "PLATEAU_GAIN", "TITLE", "VARIANTS", "section_he"]

#: The report section this module writes, and the paper and claim it tests.
KEY, TITLE = "he", "2. Depth-wise decomposition of trained convolutions (He et al.)"
CITATION = ("He, Qian, Wang et al., Depth-wise Decomposition for Accelerating Separable Convolutions in "
            "Efficient Convolutional Neural Networks (arXiv 1910.09455)")
CLAIM = ("A trained regular CNN converted into a depthwise separable one by per-channel SVD (and its "
         "data-driven GSVD form), then fine-tuned, beats the same separable network trained from scratch "
         "and beats channel decomposition at equal FLOPs.")

#: An arm is at a plateau when its last epoch gained less than this in test accuracy (mean over seeds).
PLATEAU_GAIN = 0.01

#: The rank-one conversions compared, as ``(to, method)`` of :func:`sepconv.decompose.convert`.
VARIANTS = [("dsc", "svd"), ("dsc", "gsvd"), ("bsconv_u", "svd"), ("bsconv_u", "gsvd")]


def _calibration(ctx: Context, seed: int):
    """The calibration images of the data-driven conversions: seed ``seed``'s train split, or its
    first ``calib_images`` images."""
    b = ctx.budget
    calib = ctx.dataset("train", seed)
    if b.calib_images is not None and b.calib_images < len(calib):
        calib = calib.get_batch(torch.arange(b.calib_images))[0]
    return calib


def _convert_all(regular: nn.Module, calib, inner) -> tuple[dict, float]:
    """Every rank-one conversion of :data:`VARIANTS`, and channel decomposition at the FLOPs of the
    rank-one DSC (SVD) one. Returns ``{(to, method): (model, report)}`` and that speedup."""
    converted = {}
    for to, method in VARIANTS:
        converted[(to, method)] = convert(regular, to=to, rank=1, method=method, data=calib, layers=inner)
    totals = converted[("dsc", "svd")][1].totals
    speedup = totals["flops_before"] / totals["flops_after"]
    converted[("channel", "gsvd")] = convert(regular, to="channel", speedup=speedup, method="gsvd", data=calib,
                                             layers=inner)
    return converted, speedup


def _reinitialized(model: nn.Module, seed: int) -> nn.Module:
    """A copy of ``model`` with every parameter and running statistic drawn afresh (each module's
    ``reset_parameters``, PyTorch's default initialization, seeded): the same architecture, to be
    trained from scratch."""
    torch.manual_seed(seed)
    new = copy.deepcopy(model)
    for m in new.modules():
        if m is not new and hasattr(m, "reset_parameters"):
            m.reset_parameters()
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
    return new


def _arms(ctx: Context, seed: int, inner) -> tuple[dict[str, dict], dict, float]:
    """Seed ``seed``'s arms: the regular network, each conversion fine-tuned, and the rank-one DSC
    architecture trained from scratch for as many epochs as the regular network and a fine-tune
    together. Returns ``{arm: {run, before_ft, out_error}}``, the conversions and the speedup."""
    b = ctx.budget
    regular = ctx.regular(seed)
    ctx.progress(f"converting (seed {seed})")
    converted, speedup = _convert_all(regular.model, _calibration(ctx, seed), inner)
    arms = {"regular (trained)": {"run": regular, "before_ft": None, "out_error": 0.0}}
    test = ctx.dataset("test", seed)
    for (to, method), (new, rep) in converted.items():
        name = f"resnet20_{to}_{method}"
        path = ctx.out / "converted" / f"{name}_s{seed}"
        save_model(new, path)
        tuned = ctx.train(f"{name}_ft", seed, init=str(path), epochs=b.finetune_epochs, lr=0.01)
        arms[f"{to} ({method}) + fine-tune"] = {"run": tuned, "before_ft": evaluate(new, test)[1],
                                                "out_error": rep.totals.get("mean_output_error")}
    path = ctx.out / "converted" / f"resnet20_dsc_scratch_init_s{seed}"
    save_model(_reinitialized(converted[("dsc", "svd")][0], seed), path)
    scratch = ctx.train("resnet20_dsc_scratch", seed, init=str(path), epochs=b.epochs + b.finetune_epochs)
    arms["dsc from scratch"] = {"run": scratch, "before_ft": None, "out_error": None}
    return arms, converted, speedup


def _error_curves(regular: nn.Module, converted: dict, speedup: float, calib, inner, ranks) -> list[dict]:
    """Output error against the model's FLOPs ratio: each variant at rank one (from ``converted``)
    and at ``ranks``, channel decomposition at the matching FLOPs."""
    curves = []

    def point(label: str, rank: int | None, rep) -> None:
        curves.append({"method": label, "rank": rank,
                       "flops_ratio": rep.totals["flops_after"] / rep.totals["flops_before"],
                       "out_error": rep.totals["mean_output_error"]})

    for to, method in VARIANTS:
        point(f"{to}/{method}", 1, converted[(to, method)][1])
        for r in ranks:
            point(f"{to}/{method}", r, convert(regular, to=to, rank=r, method=method, data=calib, layers=inner)[1])
    point("channel/gsvd", None, converted[("channel", "gsvd")][1])
    for sp in [speedup / r for r in ranks]:  # channel decomposition at the FLOPs of those ranks
        point("channel/gsvd", None, convert(regular, to="channel", speedup=sp, method="gsvd", data=calib,
                                            layers=inner)[1])
    return curves


def _plot_curves(sec: Section, curves: list[dict], title: str) -> None:
    def draw(ax):
        for m in dict.fromkeys(c["method"] for c in curves):
            pts = sorted((c["flops_ratio"], c["out_error"], c["rank"]) for c in curves if c["method"] == m)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m)
            for x, y, r in pts:
                if r is not None:
                    ax.annotate(f"r{r}", (x, y), fontsize=6, xytext=(2, 2), textcoords="offset points")
        ax.set_xlabel("FLOPs after / before (whole model)")
        ax.set_ylabel("mean relative output error")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)

    ranks = sorted({c["rank"] for c in curves if c["rank"] is not None})
    sec.plot("error_vs_flops", draw, "Output error of the converted layers against the model's FLOPs, per "
                                     "method, first seed (points labelled by rank: {ranks}; channel decomposition "
                                     "at the matching FLOPs, unlabelled):".replace("{ranks}", ", ".join(
                                         f"r{r}" for r in ranks)))


def _networks_table(ctx: Context, sec: Section, arms: list[dict], shape) -> None:
    b = ctx.budget
    runtime = "onnxruntime" if importlib.util.find_spec("onnxruntime") else "torch-cl"
    rows = []
    for arm in arms[0]:
        per = [a[arm] for a in arms]
        acc, se = pooled_accuracy([p["run"].test_acc for p in per], [p["n"] for p in per])
        before = [p["before_ft"] for p in per]
        err = [p["out_error"] for p in per]
        model = per[0]["run"].model
        # the plateau check: the last epoch's test accuracy minus the one before, mean over seeds
        last = [p["run"].history[-1]["test_acc"] - p["run"].history[-2]["test_acc"] for p in per
                if len(p["run"].history) >= 2]
        rows.append({"network": arm, "test_acc": acc, "se": se, "last_gain": statistics.fmean(last) if last else None,
                     "before_ft": None if before[0] is None else statistics.fmean(before),
                     "params": count_params(model), "mflops": profile(model, shape).flops / 1e6,
                     "out_error": None if err[0] is None else statistics.fmean(err),
                     "latency_ms": measure_latency(model, shape, runtime, batch=1, threads=1,
                                                   repeats=5 * b.timing_repeats).median})
    sec.table("networks", ["network", "test_acc", "se", "last_gain", "before_ft", "params", "mflops", "out_error",
                           "latency_ms"],
              rows, caption="ResNet-20 on the data, per arm: test accuracy over every seed's test fold pooled (se: its "
                            "standard error), the last epoch's gain in test accuracy (mean over seeds: near zero on a "
                            "plateau), accuracy right after conversion (before_ft, mean over seeds), parameters, "
                            "MFLOPs, the mean relative output error of the converted layers on calibration images and "
                            "the first seed's latency in the deployment runtime (below). Conversions are rank one, keep"
                            " the stem regular (its few input channels leave little to factor) and are fine-tuned with "
                            "the learning rate restarted at a tenth of the original and a cosine decay; the "
                            "from-scratch arm is the rank-one DSC architecture itself, reinitialized, trained as long "
                            "as the regular network and a fine-tune together; channel decomposition is at the FLOPs of "
                            "the rank-one DSC.")
    sec.fill("latency_ms: median of one image's forward pass of the deployable form (eval, BatchNorm folded) in "
             "{runtime} on {threads} thread (sepconv.deploy.measure_latency).", runtime=runtime, threads=1)
    rising = [r["network"] for r in rows if r["last_gain"] is not None and r["last_gain"] >= PLATEAU_GAIN]
    sec.fill("Plateau check: arms whose last epoch still gained {tol} or more in test accuracy (mean over seeds), "
             "so that longer training could change the comparison: {rising}.", tol=PLATEAU_GAIN,
             rising=", ".join(rising) if rising else "none")


def section_he(ctx: Context, report: Report) -> None:
    """Depth-wise decomposition (He et al. 2019)."""
    b = ctx.budget
    sec = report.section(KEY, TITLE, claim=CLAIM, paper=CITATION)
    shape = ctx.input_shape(ctx.regular(0).model)
    # every spatial conv but the stem, whose few input channels leave nothing to factor (a 1-channel
    # stem is already rank one per filter); the from-scratch arm has the same regular stem
    inner = lambda name, m: m.in_channels > shape[0]  # noqa: E731
    arms, first = [], None
    for s in ctx.seeds:
        a, converted, speedup = _arms(ctx, s, inner)
        n = len(ctx.dataset("test", s))
        arms.append({k: {**v, "n": n} for k, v in a.items()})
        if first is None:
            first = (converted, speedup)
    _networks_table(ctx, sec, arms, shape)
    ctx.progress("output error vs rank")
    curves = _error_curves(ctx.regular(0).model, *first, _calibration(ctx, 0), inner, b.curve_ranks)
    sec.table("error_vs_rank", ["method", "rank", "flops_ratio", "out_error"], curves)
    _plot_curves(sec, curves, f"ResNet-20 on {ctx.data}: conversions of the first seed's regular network")

    def acc(arm: str) -> list[float]:
        return [a[arm]["run"].test_acc for a in arms]

    parts = [compare(acc(f"dsc ({m}) + fine-tune"), acc(other), "greater",
                     what=f"test accuracy, dsc ({m}) + fine-tune minus {other}")
             for other in ("dsc from scratch", "channel (gsvd) + fine-tune") for m in ("svd", "gsvd")]
    err = compare([a["dsc (gsvd) + fine-tune"]["out_error"] for a in arms],
                  [a["dsc (svd) + fine-tune"]["out_error"] for a in arms], "less",
                  what="output error of the converted layers, gsvd minus svd (for reference)")
    sec.evidence("comparisons", [*parts, err])
    sec.verdict(combine(c.held for c in parts),
                "Converted and fine-tuned DSC against the same architecture from scratch: svd {s_svd} "
                "({s_svd_lo} to {s_svd_hi}), {v0}; gsvd {s_gsvd} ({s_gsvd_lo} to {s_gsvd_hi}), {v1}; against "
                "channel decomposition at equal FLOPs: svd {c_svd} ({c_svd_lo} to {c_svd_hi}), {v2}; gsvd "
                "{c_gsvd} ({c_gsvd_lo} to {c_gsvd_hi}), {v3} (accuracy differences, paired over seeds).",
                s_svd=parts[0].mean, s_svd_lo=parts[0].lo, s_svd_hi=parts[0].hi, v0=sec.word(parts[0].held),
                s_gsvd=parts[1].mean, s_gsvd_lo=parts[1].lo, s_gsvd_hi=parts[1].hi, v1=sec.word(parts[1].held),
                c_svd=parts[2].mean, c_svd_lo=parts[2].lo, c_svd_hi=parts[2].hi, v2=sec.word(parts[2].held),
                c_gsvd=parts[3].mean, c_gsvd_lo=parts[3].lo, c_gsvd_hi=parts[3].hi, v3=sec.word(parts[3].held))
