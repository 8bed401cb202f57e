"""Every layer of ResNet-50 certified: ``sepconv spectrum resnet50 --method exact --certificate-flops 2e14``
with ``SEPCONV_MEMORY_LIMIT=8G``.

Under the default certificate budget (2e11 flops) ResNet-50's 3x3 convs and its 7x7 stem get the
circulant majorant (section "Whole networks"): their certificates cost 1e12 to 1.9e13 flops each
(``H (1/3 + B + B^2 + 1) (c W)^3``: ``c W = 3584`` at every stage) and up to 2.8 GiB. This section
raises both budgets (``sepconv.spectral.certificate_budget``, ``max_memory``) and certifies every conv
to 1e-4, one run, 2 torch threads, default initialisation (the network bound then reuses every
bracket). It answers: what does certifying a whole ResNet-50 cost on this machine, and where does
the time go?
"""

from __future__ import annotations

import time
from collections import defaultdict

import torch
from torch import nn

from sepconv.models import create_model
from sepconv.spectral import ConvSpec, analyze, bracketing, certificate_budget, certify, layer_inputs, lipschitz_bound

from ._util import md_table

TITLE = "Every layer certified: ResNet-50 at 224x224 with a raised certificate budget"
BUDGET = 2e14
MEMORY = 8 * 2**30
TOL = 1e-4


def run(quick: bool = False) -> str:
    name, shape, classes = ("resnet20", (3, 16, 16), 10) if quick else ("resnet50", (3, 224, 224), 1000)
    torch.manual_seed(0)
    model = create_model(name, num_classes=classes).eval()
    convs = {n: (m, s) for n, (m, s) in layer_inputs(model, shape).items() if isinstance(m, nn.Conv2d)}
    bracketing.RECENT.clear()
    with certificate_budget(BUDGET):
        t = time.perf_counter()
        records = analyze(model, shape, methods=["exact", "upper"], tol=TOL, max_memory=MEMORY)
        t_layers = time.perf_counter() - t
        t = time.perf_counter()
        L = lipschitz_bound(model, shape, method="upper", tol=TOL, max_memory=MEMORY)
        t_net = time.perf_counter() - t
    bracketing.RECENT.clear()
    groups: dict[tuple, list] = defaultdict(list)
    for r in records:
        if r.kind != "Conv2d":
            continue
        need = f"none ({r.certified_by})"
        if r.certified_by == "cholesky":  # the certificate's cost, for the layers that ran one
            mod, s = convs[r.name]
            flops, nbytes = certify.certificate_cost(mod.weight.detach().double(), ConvSpec.of(mod, s[-2:]))
            big = flops > bracketing.CERTIFICATE_FLOPS or nbytes > bracketing.CERTIFICATE_BYTES
            need = f"{flops:.1e} / {nbytes / 2**30:.1f}" if big else "default budget"
        key = (r.geometry, need)
        groups[key].append(r)
    rows = []
    for (geometry, need), recs in groups.items():
        widths = [r.values["upper"] / r.values["exact"] - 1 for r in recs]
        secs = [r.seconds["exact"] for r in recs]
        rows.append([geometry, len(recs), need, f"{sum(w <= TOL * (1 + 1e-9) for w in widths)}/{len(recs)}",
                     f"{max(widths):.1e}", f"{sum(secs) / len(secs):.1f}", f"{sum(secs):.0f}"])
    rows.sort(key=lambda row: -float(row[-1]))
    n_conv = sum(len(v) for v in groups.values())
    n_ok = sum(int(row[3].split("/")[0]) for row in rows)
    table = md_table(["conv (input size)", "layers", "certificate flops / GiB (where above the default)",
                      "certified to 1e-4", "widest bracket", "s per layer", "s in all"], rows)
    return (f"{__doc__.strip()}\n\n{name} {shape[1]}x{shape[2]}: **{n_ok} of {n_conv} convs certified to 1e-4** "
            f"(budget {BUDGET:.0e} flops, {MEMORY / 2**30:.0f} GiB) in {t_layers:.0f} s for the layers "
            f"({t_layers / 60:.1f} min), then the network's certified Lipschitz bound {L:.6g} in {t_net:.1f} s "
            f"(the conv + BatchNorm chains are multiples of the convs: `bracketing.RECENT`). Goal of issue 18: "
            f"2 min with every layer certified. Layers of one geometry "
            f"and input size are grouped; groups by time spent.\n\n{table}\n")
