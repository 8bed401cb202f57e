"""The curvature bound (Singla & Feizi) against the true input-Hessian eigenvalues it bounds.

Small smooth CNNs on the digits (1x8x8 inputs: 64 dimensions, so every Hessian is formed densely
and its eigenvalues are exact): default-initialized and trained (3 epochs; ELU also with the
curvature penalty and with BatchNorm), with one conv stage (the depth of Singla & Feizi's networks)
and with four. For each network, the largest |eigenvalue| of the input Hessian of every logit
over sampled inputs -- test images, Gaussian inputs at four scales, then gradient ascent on the
eigenvalue from the worst of them -- is a lower bound on the true curvature; each certified bound
is divided by it (>= 1 always; 1 would be tight). Ours: ``curvature_bound(method="upper")`` (exact
per-layer norms to 1e-4); the papers': the same propagation on Fantastic Four per-layer bounds
(``method="fantastic4"``, Singla & Feizi 2020 Thm. 2 with the ICLR 2021 bounds).
"""

from __future__ import annotations

import math
import statistics
import time

import torch
from torch import nn

from sepconv.data import load_dataset
from sepconv.models import create_model
from sepconv.spectral import curvature_bound
from sepconv.train import TrainConfig, train

from ._util import md_table

TITLE = "Curvature bound: certified bounds against sampled input-Hessian eigenvalues (smooth CNNs, digits)"
SHAPE = (1, 8, 8)
ACTS = ("softplus", "tanh", "elu", "silu")


def _networks(quick: bool, tmp: str):
    """(label, eval-mode float64 model) pairs."""
    epochs = 1 if quick else 3
    base = dict(model="simple_cnn", width=0.5, data="digits", image_size=8, batch_size=32, lr=0.05, epochs=epochs)
    for act in ACTS[:2] if quick else ACTS:
        for depth, channels in (("1 stage", [32]), ("4 stages", [16, 32, 64, 128])):
            kw = {"act": act, "norm": False, "channels": channels}
            torch.manual_seed(0)
            yield f"{act}, {depth}, default init", create_model("simple_cnn", num_classes=10, in_chans=1, width=0.5,
                                                                **kw)
            res = train(TrainConfig(**base, model_kwargs=kw, out=f"{tmp}/{act}-{len(channels)}"), progress=False)
            yield f"{act}, {depth}, trained", res.model
    if not quick:
        res = train(TrainConfig(**base, model_kwargs={"act": "elu", "norm": False}, curvature_beta=0.01,
                                out=f"{tmp}/elu-crt"), progress=False)
        yield "elu, 4 stages, trained with --curvature-beta 0.01", res.model
        res = train(TrainConfig(**base, model_kwargs={"act": "elu"}, out=f"{tmp}/elu-bn"), progress=False)
        yield "elu + BatchNorm, 4 stages, trained", res.model


def _hessians(model: nn.Module, x: torch.Tensor, logit: int, graph: bool = False) -> torch.Tensor:
    """The input Hessians ``(N, D, D)`` of one logit at each input of ``x`` ``(N, C, H, W)``: D
    backward passes of the gradient (the inputs of a batch are independent)."""
    x = x.detach().requires_grad_(True) if not graph else x
    (g,) = torch.autograd.grad(model(x)[:, logit].sum(), x, create_graph=True)
    g = g.reshape(len(x), -1)
    rows = [torch.autograd.grad(g[:, j].sum(), x, retain_graph=True, create_graph=graph)[0].reshape(len(x), -1)
            for j in range(g.shape[1])]
    return torch.stack(rows, 1)


def sampled_curvature(model: nn.Module, images: torch.Tensor, ascent_steps: int) -> float:
    """The largest |Hessian eigenvalue| found: test images and Gaussian inputs (every logit), then
    ascent from the worst 4 (each on the logit worst there): steps on ``v^T H(x) v`` with ``v`` the
    current top eigenvector."""
    g = torch.Generator().manual_seed(0)
    noise = torch.cat([s * torch.randn(16, *SHAPE, generator=g, dtype=torch.float64) for s in (0.5, 1.0, 2.0, 4.0)])
    x = torch.cat([images, noise])
    K = model(x[:1]).shape[1]
    vals = torch.stack([torch.linalg.eigvalsh(_hessians(model, x, k).detach()).abs().amax(-1) for k in range(K)], 1)
    best = float(vals.max())
    for i in vals.amax(1).topk(4).indices.tolist():
        z = x[i:i + 1].clone().requires_grad_(True)
        logit = int(vals[i].argmax())
        opt = torch.optim.Adam([z], lr=0.05)
        for _ in range(ascent_steps):
            ev, vec = torch.linalg.eigh(_hessians(model, z, logit).detach()[0])
            top = int(ev.abs().argmax())
            best = max(best, float(ev[top].abs()))
            v = vec[:, top].reshape(1, *SHAPE)
            (gz,) = torch.autograd.grad(model(z)[0, logit], z, create_graph=True)
            (hv,) = torch.autograd.grad((gz * v).sum(), z, create_graph=True)
            q = (hv * v).sum() * torch.sign(ev[top])  # |v^T H v|, to be raised
            opt.zero_grad()
            (-q).backward()
            opt.step()
    return best


def _timed(fn, repeats: int):
    out, times = None, []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return out, statistics.median(times)


def run(quick: bool = False) -> str:
    import tempfile

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    test = load_dataset("digits", split="test", image_size=8)
    images = test.get_batch(torch.arange(16 if quick else 128))[0].double()
    rows, ratios = [], {"ours": [], "f4": []}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for label, model in _networks(quick, tmp):
                model = model.double().eval()
                true = sampled_curvature(model, images, 3 if quick else 25)
                ours, t_ours = _timed(lambda m=model: curvature_bound(m, SHAPE, method="upper", tol=1e-4), 3)
                f4, t_f4 = _timed(lambda m=model: curvature_bound(m, SHAPE, method="fantastic4"), 3)
                ratios["ours"].append(ours / true)
                ratios["f4"].append(f4 / true)
                rows.append([label, f"{true:.4g}", f"{ours:.4g}", f"{ours / true:.1f}", f"{f4:.4g}",
                             f"{f4 / true:.1f}", f"{f4 / ours:.1f}", f"{1e3 * t_ours:.0f}", f"{1e3 * t_f4:.0f}"])
    finally:
        torch.set_num_threads(before)

    def geo(v):
        return math.exp(statistics.mean(math.log(r) for r in v))

    table = md_table(["network", "sampled max abs eig", "ours (upper)", "ours / sampled", "papers' (F4)",
                      "F4 / sampled", "F4 / ours", "ours ms", "F4 ms"], rows)
    return (f"{table}\n\nBound / sampled eigenvalue over {len(rows)} networks: ours geomean "
            f"{geo(ratios['ours']):.1f}, max {max(ratios['ours']):.1f}; the papers' (Fantastic Four norms) geomean "
            f"{geo(ratios['f4']):.1f}, max {max(ratios['f4']):.1f}. Every ratio is >= 1: no sampled input exceeded "
            f"a bound ({'yes' if min(ratios['ours']) >= 1 and min(ratios['f4']) >= 1 else 'NO: a defect'}). "
            "The sampled maximum is a lower bound on the true curvature, so the ratios overstate the looseness.\n")
