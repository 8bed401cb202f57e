"""Section 3: blueprint separable convolutions (Haase & Amthor, CVPR 2020).

The kernels of a trained regular ResNet-20 are analysed for intra-kernel against
cross-kernel rank-one structure (:func:`kernel_correlations`), then MobileNets are trained
alike with depthwise separable and BSConv blocks (docs/decomposition.md Sec. 3 for BSConv-U).
"""

from __future__ import annotations

import statistics

import torch
from torch import Tensor, nn

from ..evidence import combine, compare, pooled_accuracy
from ..models import count_params, profile
from ..report import Report
from .context import Context

__all__ = ["CITATION", "CLAIM", "KEY", "PAIRS", "TITLE", "kernel_correlations", "section_bsconv"]

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


#: The MobileNet pairs compared: ``(model, conv, label)``, the DSC baseline of each model first.
PAIRS = (("cifar_mobilenet_v1", "dsc", "MobileNetV1 (DSC)"),
         ("cifar_mobilenet_v1", "bsconv_u", "MobileNetV1 BSConv-U"),
         ("cifar_mobilenet_v2", "dsc", "MobileNetV2 (DSC)"),
         ("cifar_mobilenet_v2", "bsconv_s", "MobileNetV2 BSConv-S"))


def _kernel_rows(model: nn.Module) -> list[dict]:
    """:func:`kernel_correlations` of every spatial regular conv of ``model``."""
    return [{"layer": name, "shape": "x".join(map(str, mod.weight.shape)), **kernel_correlations(mod.weight)}
            for name, mod in model.named_modules()
            if isinstance(mod, nn.Conv2d) and mod.groups == 1 and mod.kernel_size != (1, 1)]


def section_bsconv(ctx: Context, report: Report) -> None:
    """Blueprint separable convolutions (Haase & Amthor, CVPR 2020)."""
    b = ctx.budget
    sec = report.section(KEY, TITLE, claim=CLAIM, paper=CITATION)
    kernels = [_kernel_rows(ctx.regular(s).model) for s in ctx.seeds]
    share = {k: [statistics.fmean(r[k] for r in rows) for rows in kernels] for k in ("intra", "cross", "intra_pca")}
    sec.fill("Kernel analysis of the regular ResNet-20 trained on {data}, over its {n} spatial convolutions, mean "
             "over seeds: the first depth component explains on average {intra} of a filter's energy "
             "(intra-kernel, what BSConv keeps), the first component of an input channel's slices {cross} "
             "(cross-kernel, what depthwise separable keeps); centred PCA of the depth slices: {pca} of the "
             "variance in the first component. The table is the first seed's network.",
             data=ctx.data, n=len(kernels[0]), intra=statistics.fmean(share["intra"]),
             cross=statistics.fmean(share["cross"]), pca=statistics.fmean(share["intra_pca"]))
    sec.table("kernel_pca", ["layer", "shape", "intra", "cross", "intra_pca"], kernels[0])

    acc: dict[str, list[float]] = {}
    res = []
    for model, conv, label in PAIRS:
        runs = [ctx.train(f"{model}_{conv}", s, model=model, conv=conv, width=b.mobilenet_width, lr=b.mobilenet_lr,
                          **({"bsconv_alpha": 0.1} if conv == "bsconv_s" else {})) for s in ctx.seeds]
        acc[label] = [r.test_acc for r in runs]
        pooled, se = pooled_accuracy(acc[label], [len(ctx.dataset("test", s)) for s in ctx.seeds])
        size = ctx.input_shape(runs[0].model)
        res.append({"model": label, "conv": conv, "test_acc": pooled, "se": se,
                    "params": count_params(runs[0].model), "mflops": profile(runs[0].model, size).flops / 1e6})
    sec.table("mobilenets", ["model", "conv", "test_acc", "se", "params", "mflops"], res,
              caption="MobileNets trained alike (same data, epochs, optimizer, learning rate and seeds); test "
                      "accuracy over every seed's test fold pooled, se its standard error:")
    parts = [compare(share["intra"], share["cross"], "greater",
                     what="first-component energy share, intra-kernel minus cross-kernel (paired seeds)"),
             compare(acc[PAIRS[1][2]], acc[PAIRS[0][2]], "greater",
                     what="test accuracy, MobileNetV1 BSConv-U minus DSC (paired seeds)"),
             compare(acc[PAIRS[3][2]], acc[PAIRS[2][2]], "greater",
                     what="test accuracy, MobileNetV2 BSConv-S minus DSC (paired seeds)")]
    sec.evidence("comparisons", parts)
    sec.verdict(combine(c.held for c in parts),
                "Intra-kernel share minus cross-kernel share {d0} ({lo0} to {hi0}): {v0}; accuracy BSConv-U minus "
                "DSC (MobileNetV1) {d1} ({lo1} to {hi1}): {v1}; BSConv-S minus DSC (MobileNetV2) {d2} ({lo2} to "
                "{hi2}): {v2}.",
                **{f"{k}{i}": getattr(c, a) for i, c in enumerate(parts)
                   for k, a in (("d", "mean"), ("lo", "lo"), ("hi", "hi"))},
                **{f"v{i}": sec.word(c.held) for i, c in enumerate(parts)})
