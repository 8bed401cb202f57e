"""Section 1: spectral normalization of depthwise separable convolutions (Runkel et al. 2021).

MobileNetV2 is trained alike, on every seed, with each spectral normalization of
:mod:`sepconv.normalize` (none, ``dsc``: exact per-part norms, ``operator``: power iteration on
the conv operator, ``reshape``: torch's matrix reshape, wrong for convolutions; docs/spectral.md
Sec. 8 and 11); then every depthwise and pointwise conv's exact norm, the train step's cost (the
methods side by side in one process) and the network's accuracy and certificates are measured.

The verdict has four parts: every depthwise and pointwise conv of every ``dsc`` network is at or
below the target (certified brackets); a ``dsc`` train step is faster than power iteration's
(paired over interleaved repeats); ``dsc`` keeps less persistent state; and its accuracy is no
worse than the unnormalized network's by more than :data:`ACC_MARGIN` (paired over seeds).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..evidence import combine, compare, pooled_accuracy
from ..report import Report, Section
from ..spectral import ConvSpec, certified_radii, norm_bracket
from ..spectral.network import layer_inputs
from .certified import cert_table, draw_certified
from .context import Context, Run, eval_batches
from .timing import train_step_costs

__all__ = ["ACC_MARGIN", "CITATION", "CLAIM", "KEY", "SN_METHODS", "TITLE", "section_runkel"]

#: The report section this module writes, and the paper and claim it tests.
KEY, TITLE = "runkel", "1. Spectral normalization of separable convolutions (Runkel et al.)"
CITATION = ("Runkel, Etmann, Moeller, Schoenlieb, Depthwise Separable Convolutions Allow for Fast and "
            "Memory-Efficient Spectral Normalization (arXiv 2102.06496)")
CLAIM = ("Depthwise separable convolutions allow fast, memory-efficient and exact spectral normalization: "
         "the depthwise part has a closed-form FFT norm and the pointwise part is a matrix, so every layer "
         "meets its norm target at little cost and without the feature-map-sized state that power iteration "
         "on the conv operator keeps, while the network keeps its accuracy.")

#: The spectral normalizations compared (``None``: no normalization, labelled "none").
SN_METHODS = (None, "dsc", "operator", "reshape")

#: "Accuracy kept": dsc's test accuracy is not below the unnormalized network's by more than this.
ACC_MARGIN = 0.02


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


def _per_seed(ctx: Context, runs: dict[str, list[Run]]) -> dict[str, list[dict]]:
    """Per method and seed: test accuracy and size, every dw/pw conv's exact norm, the network's
    certified bound and every test image's certified pixel-l2 radius."""
    shape = ctx.input_shape(runs["none"][0].model)
    out: dict[str, list[dict]] = {k: [] for k in runs}
    for s in ctx.seeds:
        batches = eval_batches(ctx, s)
        std = ctx.dataset("test", s).std
        for k in runs:
            ctx.progress(f"exact norms after SN {k} (seed {s})")
            model = runs[k][s].model.eval()
            norms = _dw_pw_norms(model, shape)
            radii, lip = certified_radii(model, batches, method="fft", input_scale=std)
            out[k].append({"acc": runs[k][s].test_acc, "n": sum(len(y) for _, y in batches), "norms": norms,
                           "above": sum(r["exact"] > 1 + 1e-3 for r in norms),
                           "max_norm": max(r["exact"] for r in norms), "lipschitz": lip, "radii": radii})
    return out


def _methods_table(sec: Section, seeds: dict[str, list[dict]], costs: dict[str, dict]) -> None:
    base = costs["none"]["step_s"]
    rows = []
    for k, per in seeds.items():
        acc, se = pooled_accuracy([p["acc"] for p in per], [p["n"] for p in per])
        rows.append({"sn": k, "test_acc": acc, "se": se, "step_ms": 1e3 * costs[k]["step_s"],
                     "step_vs_none": costs[k]["step_s"] / base, "saved_MiB": costs[k]["saved_bytes"] / 2**20,
                     "state_KiB": costs[k]["buffer_bytes"] / 2**10, "max_layer_norm": max(p["max_norm"] for p in per),
                     "layers_above_1": sum(p["above"] for p in per),
                     "lipschitz_bound": math.exp(sum(math.log(p["lipschitz"]) for p in per) / len(per))})
    sec.table("methods", ["sn", "test_acc", "se", "step_ms", "step_vs_none", "saved_MiB", "state_KiB",
                          "max_layer_norm", "layers_above_1", "lipschitz_bound"], rows,
              caption="MobileNetV2 trained alike with each spectral normalization (the MobileNets' learning rate; "
                      "target one per layer, clip mode; BatchNorm left free: clipping it to one as well stops the "
                      "network from learning at this budget). test_acc: all seeds' test folds pooled (every image "
                      "once), se its standard error. Step time: the median of interleaved repeats of one train step of "
                      "the first seed's networks, side by side in one process; saved_MiB is what autograd keeps for "
                      "backward; state_KiB the persistent buffers. Norms: exact per-layer operator norms (certified "
                      "brackets) of the trained depthwise and pointwise convs, the largest over seeds; layers_above_1 "
                      "summed over seeds; lipschitz_bound the geometric mean over seeds.")


def _plots(sec: Section, seeds: dict[str, list[dict]], radii: dict[str, torch.Tensor], title: str) -> None:
    """Per-layer norms by method (depthwise and pointwise marked apart, seeds' range as bars), and
    certified accuracy against the pixel radius (all folds pooled)."""
    layers = [r["layer"] for r in seeds["none"][0]["norms"]]
    kinds = [r["kind"] for r in seeds["none"][0]["norms"]]

    def draw_norms(ax):
        n = len(seeds)
        for j, (k, per) in enumerate(seeds.items()):
            vals = torch.tensor([[r["exact"] for r in p["norms"]] for p in per])
            mid = vals.median(dim=0).values
            lo, hi = vals.min(dim=0).values, vals.max(dim=0).values
            for kind, marker in (("depthwise", "o"), ("pointwise", "s")):
                idx = [i for i, kd in enumerate(kinds) if kd == kind]
                xs = [i + (j - (n - 1) / 2) * 0.15 for i in idx]
                ax.errorbar(xs, mid[idx], yerr=[mid[idx] - lo[idx], hi[idx] - mid[idx]], fmt=marker, ms=3,
                            ls="none", color=f"C{j}", label=f"{k} ({kind})")
        ax.axhline(1.0, color="k", lw=0.8, ls="--")
        ax.set_yscale("log")
        ax.set_xticks(range(len(layers)), layers, rotation=90, fontsize=5)
        ax.set_ylabel("exact operator norm")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=6, ncol=2)

    sec.plot("norms", draw_norms, "Exact norm of every depthwise (circles) and pointwise (squares) conv after "
                                  "training, by method: median over seeds, bars from the smallest to the largest "
                                  "(dashed: the target):")
    sec.plot("certified", lambda ax: draw_certified(ax, radii, title=title),
             "Certified accuracy against the pixel-l2 radius (pixels scaled to the unit interval; every seed's test "
             "fold pooled; Lipschitz-margin and last-layer pairwise certificates with each network's certified "
             "bound):")


def section_runkel(ctx: Context, report: Report) -> None:
    """Spectral normalization of depthwise separable convs (Runkel et al. 2021)."""
    b = ctx.budget
    sec = report.section(KEY, TITLE, claim=CLAIM, paper=CITATION)
    # the unnormalized network is the BSConv section's MobileNetV2 (DSC): the same run, trained once
    runs = {_sn_label(m): [ctx.train("cifar_mobilenet_v2_dsc" + (f"_sn_{m}" if m else ""), s,
                                     model="cifar_mobilenet_v2", conv="dsc", width=b.mobilenet_width,
                                     lr=b.mobilenet_lr, sn=m) for s in ctx.seeds] for m in SN_METHODS}
    ctx.progress("timing SN train steps")
    x, y = eval_batches(ctx, 0, limit=64, batch_size=64)[0]
    costs = train_step_costs({k: r[0].model.to(memory_format=torch.channels_last) for k, r in runs.items()},
                             (x.contiguous(memory_format=torch.channels_last), y), b.timing_repeats)
    seeds = _per_seed(ctx, runs)
    _methods_table(sec, seeds, costs)
    radii = {k: torch.cat([p["radii"] for p in per]) for k, per in seeds.items()}
    cert_table(sec, radii, {k: [p["lipschitz"] for p in per] for k, per in seeds.items()}, label="sn")
    _plots(sec, seeds, radii, f"MobileNetV2 (width {b.mobilenet_width:g}) on {ctx.data}, {b.name} budget, "
                       f"{b.seeds} seed{'s' if b.seeds != 1 else ''}")

    log = lambda ts: [math.log(t) for t in ts]  # noqa: E731
    step = compare(log(costs["dsc"]["times"]), log(costs["operator"]["times"]), "less",
                   what="log step time, dsc minus operator power iteration (interleaved repeats)")
    step_reshape = compare(log(costs["dsc"]["times"]), log(costs["reshape"]["times"]), "less",
                           what="log step time, dsc minus torch's reshape spectral_norm (interleaved repeats; "
                                "for reference)")
    acc = compare([p["acc"] for p in seeds["dsc"]], [p["acc"] for p in seeds["none"]], "no_worse", ACC_MARGIN,
                  what="test accuracy, dsc minus no SN (paired seeds)")
    acc_reshape = compare([p["acc"] for p in seeds["reshape"]], [p["acc"] for p in seeds["none"]], "no_worse",
                          ACC_MARGIN, what="test accuracy, reshape minus no SN (paired seeds; for reference)")
    sec.evidence("comparisons", [step, step_reshape, acc, acc_reshape])
    certified = all(p["above"] == 0 for p in seeds["dsc"])
    less_state = costs["dsc"]["buffer_bytes"] < costs["operator"]["buffer_bytes"]
    reshape_above = sum(p["above"] for p in seeds["reshape"])
    sec.verdict(combine([certified, step.held, less_state, acc.held]),
                "Every depthwise and pointwise conv of every dsc network at or below the target: {certified} "
                "(largest {max_dsc}); dsc train step against power iteration's: ratio {ratio} ({lo} to {hi}), "
                "{step}; persistent state {state} KiB against {state_op} KiB: {less}; accuracy dsc minus no SN "
                "{gap} ({glo} to {ghi}, margin {margin}): {accv}. For reference, torch's reshape norm leaves "
                "{reshape_above} layer norms above the target over the seeds (largest {max_reshape}).",
                certified=certified, max_dsc=max(p["max_norm"] for p in seeds["dsc"]),
                ratio=math.exp(step.mean), lo=math.exp(step.lo), hi=math.exp(step.hi), step=sec.word(step.held),
                state=costs["dsc"]["buffer_bytes"] / 2**10, state_op=costs["operator"]["buffer_bytes"] / 2**10,
                less=less_state, gap=acc.mean, glo=acc.lo, ghi=acc.hi, margin=ACC_MARGIN, accv=sec.word(acc.held),
                reshape_above=reshape_above, max_reshape=max(p["max_norm"] for p in seeds["reshape"]))
