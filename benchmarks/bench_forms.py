"""Fastest exact forms: each separable block as its deploy form, its summed branches or its dense conv,
whichever runs faster.

A converted network's linear separable blocks are exactly regular convs (their composed kernels), and a
block of rank above 1 is exactly the sum of its rank-1 branches; ``sepconv.deploy.choose_forms`` times
these forms of every block in the target runtime, batch and thread count and keeps another form than the
deploy form only where the paired interval says it is faster. This section
measures, per runtime, the regular network, the converted one in its separable deploy forms (as in
"Deployment speed") and the converted one in its chosen forms, interleaved, 1 thread; choosing is
done in the runtime, batch and threads of the row. Weights are the models' initial ones (latency
depends on shapes, not values).

The question it answers: with the faster exact form per block, is a converted network ever slower
than the regular one it came from (the eager goal of issue 16), and how much of the FLOP saving is
left in each runtime?
"""

from __future__ import annotations

import math
import time

import torch

from sepconv.deploy import RUNTIMES as ALL_RUNTIMES
from sepconv.deploy import choose_forms, deployable, latency_ratio, measure, torch_threads
from sepconv.deploy.choose import LEVEL, LOOKS
from sepconv.models import profile

from ._util import md_table
from .bench_deploy import ENERGY, _fn, _variants

TITLE = "Fastest exact forms: separable blocks as their deploy form, branches or dense conv, chosen by measurement"

RUNTIMES = ("torch", "torch-cl", "onnxruntime")
# (model, input, batches, variants): variants as in bench_deploy (the first one is the regular network)
GROUPS = [
    ("resnet20", (3, 32, 32), (1, 64), [
        ("regular", None), ("dsc rank 1", dict(to="dsc", rank=1)),
        (f"dsc energy {ENERGY}", dict(to="dsc", energy=ENERGY)),
        ("bsconv_u rank 1", dict(to="bsconv_u", rank=1)),
        (f"bsconv_u energy {ENERGY}", dict(to="bsconv_u", energy=ENERGY))]),
    ("resnet50", (3, 224, 224), (1, 16), [("regular", None), (f"dsc energy {ENERGY}", dict(to="dsc", energy=ENERGY))]),
]


def _ratio(a, b) -> tuple[float, float, float]:
    """Latency ratio a / b: the geometric mean over the paired rounds and its 95 % interval."""
    c = latency_ratio(a, b)
    return math.exp(c.mean), math.exp(c.lo), math.exp(c.hi)


def run(quick: bool) -> str:
    rows, goal = [], []
    choose_seconds = 0.0
    for name, shape, batches, variants in GROUPS[:1] if quick else GROUPS:
        if quick:
            shape, batches, variants = (3, 16, 16), (1,), variants[:3]
        nets = _variants(name, shape, variants, quick)
        base = next(iter(nets))
        regular = deployable(nets[base], shape)
        flops0 = profile(regular, shape).flops
        for batch in batches:
            x = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(0))
            repeats = 3 if quick else (30 if shape[1] < 100 else 10)
            for label, net in list(nets.items())[1:]:
                sep = {rt: deployable(net, shape, ALL_RUNTIMES[rt].for_onnx) for rt in RUNTIMES}
                sep_ratio = profile(sep["torch"], shape).flops / flops0
                chosen, lat = {}, {}
                for rt in RUNTIMES:
                    t = time.perf_counter()
                    chosen[rt] = choose_forms(net, shape, rt, batch=batch, threads=1, repeats=5 if quick else 20)
                    choose_seconds += time.perf_counter() - t
                # the eager layouts interleaved in one group (paired across layouts), ONNX Runtime alone
                for group in (("torch", "torch-cl"), ("onnxruntime",)):
                    with torch_threads(1):
                        fns = {(rt, k): _fn(rt, m, x) for rt in group
                               for k, m in (("regular", regular), ("separable", sep[rt]), ("chosen", chosen[rt].model))}
                        lat.update(measure(fns, repeats=repeats, warmup=2, max_seconds=5 if quick else 60))
                for rt in RUNTIMES:
                    r_sep, r_ch = (_ratio(lat[(rt, k)], lat[(rt, "regular")]) for k in ("separable", "chosen"))
                    rows.append([name, label, batch, rt, f"{sep_ratio:.3f}",
                                 str(lat[(rt, "regular")]), str(lat[(rt, "separable")]), str(lat[(rt, "chosen")]),
                                 f"{len(chosen[rt].dense)}/{len(chosen[rt].branches)}/{len(chosen[rt].choices)} "
                                 f"({chosen[rt].plan})",
                                 f"{profile(chosen[rt].model, shape).flops / flops0:.3f}",
                                 f"{r_sep[0]:.2f} ({r_sep[1]:.2f}-{r_sep[2]:.2f})",
                                 f"{r_ch[0]:.2f} ({r_ch[1]:.2f}-{r_ch[2]:.2f})"])
                # the eager goal as in "Deployment speed": the better layout of each, paired over the rounds;
                # slower = the 95 % interval of the ratio lies above 1
                best = min(("torch", "torch-cl"), key=lambda r: lat[(r, "chosen")].median)
                best0 = min(("torch", "torch-cl"), key=lambda r: lat[(r, "regular")].median)
                r = _ratio(lat[(best, "chosen")], lat[(best0, "regular")])
                goal.append((name, label, batch, r, r[1] > 1))
    eager_met = sum(not g[4] for g in goal)
    worst = max(goal, key=lambda g: g[3][0])
    head = ["model", "variant", "batch", "runtime", "FLOP ratio (separable)", "regular ms", "separable forms ms",
            "fastest forms ms", "blocks made dense / branches / of", "FLOP ratio (fastest)",
            "separable / regular (95 %)",
            "fastest / regular (95 %)"]
    text = [
        "Median latency (quartiles), 1 thread, of the regular network, the converted one in its separable deploy "
        "forms and the converted one with each linear separable block in the fastest of its exact forms "
        "(`sepconv.deploy.choose_forms`: the deploy form, in eager the summed branches of a block of rank above 1 "
        "(the ONNX deploy form), and the dense conv of every distinct block timed on the block's input shape in "
        "that runtime and batch; a form replaces the one kept so far only where the paired 95 % interval of "
        "their latency ratio lies below 1; then the whole model is checked, all blocks in their deploy forms, "
        "this per-block plan and all dense, and "
        "a plan replaces the one kept so far only where it is faster by the paired rule, each look at a "
        f"{100 * LEVEL:.1f} % interval, a comparison left open timed again with twice the rounds, up to {LOOKS} "
        "looks: the plan kept is named in the table). The three are interleaved, the two eager layouts together "
        "and ONNX Runtime alone; ratios are geometric means over the paired rounds with their 95 % t-intervals. "
        f"Choosing took {choose_seconds:.0f} s in all (ONNX Runtime: one verified export per distinct form and "
        f"plan). Energy-chosen ranks keep {ENERGY} of each layer's spectral energy of the initial weights.",
        "",
        md_table(head, rows),
        "",
        f"**Eager goal with the fastest forms (never slower than regular, the better layout of each, 1 thread):** "
        f"met by {eager_met} of {len(goal)} converted rows; the slowest: {worst[0]} {worst[1]} at batch "
        f"{worst[2]}, {worst[3][0]:.2f}x ({worst[3][1]:.2f}-{worst[3][2]:.2f}).",
    ]
    return "\n".join(text)
