"""Section 3: blueprint separable convolutions (Haase & Amthor, CVPR 2020).

The kernels of a trained regular ResNet-20 are analysed for intra-kernel against
cross-kernel rank-one structure (:func:`kernel_correlations`), then MobileNets are trained
alike with depthwise separable and BSConv blocks (docs/decomposition.md Sec. 3 for BSConv-U).
"""

from __future__ import annotations

import statistics

import torch
from torch import Tensor, nn

from ..models import count_params, profile
from ..report import Report
from .context import Context

__all__ = ["CITATION", "CLAIM", "KEY", "TITLE", "all_or_none", "kernel_correlations", "section_bsconv"]

#: The report section this module writes, and the paper and claim it tests.
KEY, TITLE = "bsconv", "3. Blueprint separable convolutions (Haase & Amthor)"
CITATION = ("Haase & Amthor, Rethinking Depthwise Separable Convolutions: How Intra-Kernel Correlations "
            "Lead to Improved MobileNets, CVPR 2020 (arXiv 2003.13549)")
CLAIM = ("Trained CNN filters show strong intra-kernel correlations: the depth slices of a filter are "
         "largely scaled copies of one 2-D blueprint. BSConv, which models exactly this (BSConv-U: "
         "pointwise then depthwise; BSConv-S: a low-rank orthonormal pointwise subspace), improves "
         "MobileNets over depthwise separable convolutions at the same size.")


def kernel_correlations(weight: Tensor) -> dict:
    """How much of a k x k conv's filters a rank-1 structure explains, both ways.

    *Intra-kernel* (Haase & Amthor 2020, the BSConv analysis): for each output filter
    ``W[o]`` (``C_in x k^2``), the share of its energy in the first principal direction
    of its depth slices, ``s_1^2 / sum_j s_j^2``; this is what BSConv-U keeps exactly.
    *Cross-kernel* (He et al. 2019, depth-wise decomposition): the same for each input
    channel's slice ``W[:, i]`` (``C_out x k^2``), what DW->PW keeps. Averages over
    filters/channels, uncentred (the energy a rank-1 conversion keeps); the centred PCA
    variance of the first component is reported alongside for the intra-kernel view.
    """
    w = weight.detach().double().flatten(2)  # (o, i, k^2)

    def share(mats: Tensor) -> float:
        s2 = torch.linalg.svdvals(mats).square()
        return float((s2[:, 0] / s2.sum(1).clamp_min(1e-300)).mean())

    centred = w - w.mean(1, keepdim=True)
    return {"intra": share(w), "cross": share(w.transpose(0, 1)), "intra_pca": share(centred)}


def all_or_none(*parts: bool) -> bool | None:
    """A verdict from its parts: held if all hold, did not hold if none does, else inconclusive."""
    return True if all(parts) else False if not any(parts) else None


def section_bsconv(ctx: Context, report: Report) -> None:
    """Blueprint separable convolutions (Haase & Amthor, CVPR 2020)."""
    b = ctx.budget
    sec = report.section(KEY, TITLE, claim=CLAIM, paper=CITATION)
    regular = ctx.regular()
    rows = []
    for name, mod in regular.model.named_modules():
        if isinstance(mod, nn.Conv2d) and mod.groups == 1 and mod.kernel_size != (1, 1):
            c = kernel_correlations(mod.weight)
            rows.append({"layer": name, "shape": "x".join(map(str, mod.weight.shape)), **c})
    mean = {k: statistics.fmean(r[k] for r in rows) for k in ("intra", "cross", "intra_pca")}
    sec.fill("Kernel analysis of the regular ResNet-20 trained on {data} ({acc} test accuracy), over its "
             "{n} spatial convolutions: the first depth component explains on average {intra} of a filter's "
             "energy (intra-kernel, what BSConv keeps), the first component of an input channel's slices "
             "{cross} (cross-kernel, what depthwise separable keeps); centred PCA of the depth slices: "
             "{pca} of the variance in the first component.",
             data=ctx.data, acc=regular.test_acc, n=len(rows), intra=mean["intra"], cross=mean["cross"],
             pca=mean["intra_pca"])
    sec.table("kernel_pca", ["layer", "shape", "intra", "cross", "intra_pca"], rows)

    w = b.mobilenet_width
    pairs = [("cifar_mobilenet_v1", "dsc", "MobileNetV1 (DSC)"),
             ("cifar_mobilenet_v1", "bsconv_u", "MobileNetV1 BSConv-U"),
             ("cifar_mobilenet_v2", "dsc", "MobileNetV2 (DSC)"),
             ("cifar_mobilenet_v2", "bsconv_s", "MobileNetV2 BSConv-S")]
    res = []
    for model, conv, label in pairs:
        run = ctx.train(f"{model}_{conv}", model=model, conv=conv, width=w,
                        bsconv_alpha=0.1 if conv == "bsconv_s" else 0.0)
        size = ctx.input_shape(run.model)
        res.append({"model": label, "conv": conv, "test_acc": run.test_acc,
                    "params": count_params(run.model), "mflops": profile(run.model, size).flops / 1e6})
    sec.table("mobilenets", ["model", "conv", "test_acc", "params", "mflops"], res,
              caption="MobileNets trained alike (same data, epochs, optimizer and seed):")
    v1 = res[1]["test_acc"] - res[0]["test_acc"]
    v2 = res[3]["test_acc"] - res[2]["test_acc"]
    intra_wins = mean["intra"] > mean["cross"]
    sec.verdict(all_or_none(intra_wins, v1 >= 0, v2 >= 0),
                "Intra-kernel share above cross-kernel share: {intra_wins}; accuracy change BSConv-U vs DSC "
                "(MobileNetV1) {v1}, BSConv-S vs DSC (MobileNetV2) {v2}.",
                intra_wins=intra_wins, v1=v1, v2=v2)
