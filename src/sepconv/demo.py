"""``sepconv demo``: each of the four papers' headline claims, reproduced at small scale.

The demo trains a handful of small networks on the bundled digits data (or any dataset
sepconv reads), then measures what each paper claims, and writes ``report.md``,
``report.json`` (every number of the report) and PNG plots. Every training run lives in
``OUT/runs/<name>`` and is reused when the demo is run again with the same settings
(an interrupted demo resumes where it stopped). Seeds are fixed: two runs on the same
machine give the same accuracies and norms; timings vary with the machine's load.

Budgets: the default run takes a few minutes on 2 CPU cores; ``--quick`` uses native
8x8 digits and a single epoch (for tests and CI) -- its numbers say only that the
pipeline works, and the report says so.
"""

from __future__ import annotations

import json
import math
import platform
import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .report import Report
from .train import Hooks, TrainConfig, train

# ----------------------------------------------------------------------------- budget


@dataclass(frozen=True)
class Budget:
    """How much work each section does."""

    image_size: int = 16
    epochs: int = 6  # every network trained from scratch
    finetune_epochs: int = 1  # after a conversion
    mobilenet_width: float = 0.5
    timing_repeats: int = 7
    train_images: int | None = None  # images of the train split each network sees (None: all)
    calib_images: int | None = None  # calibration images of the data-driven conversions (None: the train split)
    curve_ranks: tuple[int, ...] = (2, 4)  # ranks above one on the error-vs-rank curves
    quick: bool = False

    @classmethod
    def for_run(cls, quick: bool) -> Budget:
        return cls(image_size=8, epochs=1, finetune_epochs=1, mobilenet_width=0.25, timing_repeats=2,
                   train_images=480, calib_images=256, curve_ranks=(), quick=True) if quick else cls()


@dataclass
class Context:
    out: Path
    budget: Budget
    data: str = "digits"
    data_dir: str | None = None
    device: str = "cpu"
    progress: Callable[[str], None] = lambda msg: None
    runs: dict[str, Run] = field(default_factory=dict)
    bars: bool = False  # a progress bar for each training stage

    def config(self, name: str, **kw) -> TrainConfig:
        base = dict(data=self.data, data_dir=self.data_dir, image_size=self.budget.image_size,
                    train_images=self.budget.train_images, epochs=self.budget.epochs, device=self.device, seed=0,
                    out=str(self.out / "runs" / name))
        base.update(kw)
        return TrainConfig(**base)

    def train(self, name: str, hooks: Hooks | None = None, **kw) -> Run:
        """Train (or reuse / resume) the run ``name``; see :func:`train_cached`."""
        if name not in self.runs:
            self.progress(f"training {name}")
            self.runs[name] = train_cached(self.config(name, **kw), hooks, progress=self.bars)
        return self.runs[name]


@dataclass
class Run:
    cfg: TrainConfig
    model: nn.Module
    history: list[dict]

    @property
    def test_acc(self) -> float:
        return self.history[-1]["test_acc"]


def _digest(directory: Path) -> str:
    """SHA-256 of a saved model directory's files (config and weights)."""
    import hashlib

    h = hashlib.sha256()
    for f in sorted(p for p in directory.iterdir() if p.is_file()):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def train_cached(cfg: TrainConfig, hooks: Hooks | None = None, progress: bool = False) -> Run:
    """Train ``cfg``; reuse a finished run with the same config, resume an interrupted one.
    ``progress``: the training's per-epoch bars (under the demo's own bar), no summary lines."""
    from .io import load_model

    out = Path(cfg.out)
    saved, stamp = out / "train_config.json", out / "init.sha256"
    init = _digest(Path(cfg.init)) if cfg.init else ""  # a fine-tune is stale when its start changed
    same = (saved.is_file() and json.loads(saved.read_text()) == cfg.to_dict()
            and (stamp.read_text() if stamp.is_file() else "") == init)
    if not same and out.exists():
        shutil.rmtree(out)
    if init:
        out.mkdir(parents=True, exist_ok=True)
        stamp.write_text(init)
    if same and (out / "summary.json").is_file():
        history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        if len(history) == cfg.epochs:
            return Run(cfg, load_model(out / "model"), history)
    res = train(cfg, hooks=hooks, resume=same and (out / "last.pt").is_file(), progress=progress, log=False)
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return Run(cfg, res.model, history)


# ----------------------------------------------------------------------------- measurements


def train_step_costs(models: dict[str, nn.Module], batch: tuple[Tensor, Tensor], repeats: int) -> dict[str, dict]:
    """Per model: the median seconds of one SGD step on ``batch`` (repeats interleaved across the
    models, so that the machine's drift affects all alike), the bytes autograd saves for the
    backward pass (the activation memory of a step), and the bytes of persistent buffers.
    Measured on copies; the models are not changed."""
    import copy

    steps, cost = {}, {}
    for name, model in models.items():
        m = copy.deepcopy(model).train()
        opt = torch.optim.SGD(m.parameters(), lr=1e-4)
        x, y = batch

        def step(m=m, opt=opt, x=x, y=y):
            loss = F.cross_entropy(m(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        step()
        saved = 0

        def pack(t: Tensor):
            nonlocal saved
            saved += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            step()
        steps[name] = step
        cost[name] = {"saved_bytes": saved,
                      "buffer_bytes": sum(b.numel() * b.element_size() for b in m.buffers())}
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(repeats):
        for k, step in steps.items():
            t = time.perf_counter()
            step()
            times[k].append(time.perf_counter() - t)
    for k in steps:
        cost[k]["step_s"] = statistics.median(times[k])
    return cost


def eval_batches(ctx: Context, limit: int | None = None, batch_size: int = 500):
    """The test split as a list of ``(x, y)`` batches (at most ``limit`` images)."""
    from .data import load_dataset

    ds = load_dataset(ctx.data, ctx.data_dir, split="test", image_size=ctx.budget.image_size)
    n = len(ds) if limit is None else min(limit, len(ds))
    return [ds.get_batch(torch.arange(i, min(n, i + batch_size))) for i in range(0, n, batch_size)]


def _positive(r: Tensor) -> Tensor:
    """The finite positive radii (certified samples with a finite radius)."""
    return r[torch.isfinite(r) & (r > 0)]


def radius_grid(radii: list[Tensor], max_points: int = 6) -> list[float]:
    """The radii at which the report tabulates certified accuracy: ``0`` and the values ``1`` and
    ``3`` times a power of ten spanning the certified radii of the models' correct predictions
    (10% to 90% quantiles, pooled over the models), at most ``max_points`` of them. The networks'
    certified Lipschitz bounds range over many orders of magnitude (free BatchNorm multiplies
    them), so a fixed grid would show only zeros or only ones."""
    pooled = torch.cat([_positive(r) for r in radii])
    if pooled.numel() == 0:
        return [0.0]
    lo, hi = (float(v) for v in torch.quantile(pooled, torch.tensor([0.1, 0.9], dtype=pooled.dtype)))
    grid = [m * 10.0 ** k for k in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
            for m in (1, 3) if lo / 3 <= m * 10.0 ** k <= hi * 3]
    if len(grid) >= max_points:  # keep both ends, evenly spaced between
        grid = [grid[round(i * (len(grid) - 1) / (max_points - 2))] for i in range(max_points - 1)]
    return [0.0] + [float(f"{e:.0e}") for e in grid]


def median_radius(radii: Tensor) -> float:
    """Median certified radius over the test samples (a wrong prediction counts as radius 0)."""
    return float(torch.median(radii.clamp(min=0.0)))


def draw_certified(ax, radii: dict[str, Tensor], lips: dict[str, float]) -> None:
    """Certified accuracy against the radius, one step curve per model (from every sample's radius)."""
    finite = torch.cat([_positive(r) for r in radii.values()])
    lo = float(finite.min()) / 2 if finite.numel() else 1e-6
    for k, r in radii.items():
        n = r.numel()
        xs = torch.sort(_positive(r)).values
        acc = (torch.arange(xs.numel(), 0, -1, dtype=torch.float64) - 1) / n  # fraction above each radius
        ax.step([lo, *xs.tolist()], [float((r > 0).double().mean()), *acc.tolist()], where="post",
                label=f"{k} (L <= {lips[k]:.3g})")
    ax.set_xscale("log")
    ax.set_xlabel("l2 radius eps")
    ax.set_ylabel("certified accuracy")
    ax.legend()


def input_shape(model: nn.Module, ctx: Context) -> tuple[int, int, int]:
    return (model.sepconv_config["kwargs"]["in_chans"], ctx.budget.image_size, ctx.budget.image_size)


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


# ----------------------------------------------------------------------------- section 3


def section_bsconv(ctx: Context, report: Report) -> None:
    """Blueprint separable convolutions (Haase & Amthor, CVPR 2020)."""
    b = ctx.budget
    sec = report.section(
        "bsconv", "3. Blueprint separable convolutions (Haase & Amthor)",
        claim=("Trained CNN filters show strong intra-kernel correlations: the depth slices of a filter are "
               "largely scaled copies of one 2-D blueprint. BSConv, which models exactly this (BSConv-U: "
               "pointwise then depthwise; BSConv-S: a low-rank orthonormal pointwise subspace), improves "
               "MobileNets over depthwise separable convolutions at the same size."),
        paper="Haase & Amthor, Rethinking Depthwise Separable Convolutions: How Intra-Kernel Correlations "
              "Lead to Improved MobileNets, CVPR 2020 (arXiv 2003.13549)")
    regular = ctx.train("resnet20_regular", model="resnet20")
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
    from .models import count_params, profile

    res = []
    for model, conv, label in pairs:
        run = ctx.train(f"{model}_{conv}", model=model, conv=conv, width=w,
                        bsconv_alpha=0.1 if conv == "bsconv_s" else 0.0)
        size = (run.model.sepconv_config["kwargs"]["in_chans"], b.image_size, b.image_size)
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


# ----------------------------------------------------------------------------- section 1


SN_METHODS = (None, "dsc", "operator", "reshape")


def _sn_label(m: str | None) -> str:
    return "none" if m is None else m


def _dw_pw_norms(model: nn.Module, shape: tuple[int, int, int]) -> list[dict]:
    """Exact operator norms (certified brackets, lower end) of every depthwise and pointwise conv."""
    from .spectral import ConvSpec, norm_bracket
    from .spectral.network import layer_inputs

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


def section_runkel(ctx: Context, report: Report) -> None:
    """Spectral normalization of depthwise separable convs (Runkel et al. 2021)."""
    from .spectral import certified_radii, lipschitz_bound

    b = ctx.budget
    sec = report.section(
        "runkel", "1. Spectral normalization of separable convolutions (Runkel et al.)",
        claim=("Depthwise separable convolutions allow fast, memory-efficient and exact spectral normalization: "
               "the depthwise part has a closed-form FFT norm and the pointwise part is a matrix, so every layer "
               "meets its norm target at little cost, while torch's reshape-based spectral_norm is wrong for "
               "convolutions and power iteration on the operator keeps a feature-map-sized state per layer."),
        paper="Runkel, Etmann, Moeller, Schoenlieb, Depthwise Separable Convolutions Allow for Fast and "
              "Memory-Efficient Spectral Normalization (arXiv 2102.06496)")
    runs = {}
    for m in SN_METHODS:
        runs[_sn_label(m)] = ctx.train(f"mobilenet_v2_sn_{_sn_label(m)}", model="cifar_mobilenet_v2",
                                       width=b.mobilenet_width, sn=m)
    any_run = next(iter(runs.values()))
    shape = input_shape(any_run.model, ctx)
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
        L = lipschitz_bound(model, shape, method="fft")
        lips[k] = L
        radii[k], _ = certified_radii(model, batches, lipschitz=L)
        over = sum(r["exact"] > 1 + 1e-3 for r in norms[k])
        rows.append({"sn": k, "test_acc": run.test_acc, "step_ms": 1e3 * costs[k]["step_s"],
                     "step_vs_none": costs[k]["step_s"] / base["step_s"],
                     "saved_MiB": costs[k]["saved_bytes"] / 2**20, "state_KiB": costs[k]["buffer_bytes"] / 2**10,
                     "max_layer_norm": max(r["exact"] for r in norms[k]), "layers_above_1": over,
                     "lipschitz_bound": L})
    eps_grid = radius_grid(list(radii.values()))
    cert = {k: [float((r > e).double().mean()) for e in eps_grid] for k, r in radii.items()}
    sec.table("methods", ["sn", "test_acc", "step_ms", "step_vs_none", "saved_MiB", "state_KiB", "max_layer_norm",
                          "layers_above_1", "lipschitz_bound"], rows,
              caption="MobileNetV2 trained alike with each spectral normalization (target one per layer, clip "
                      "mode; BatchNorm left free: clipping it to one as well stops the network from learning at this "
                      "budget; a scaled loss, cross_entropy(s logits) / s, helps the small digits CNN of "
                      "BENCHMARKS.md but cost this MobileNetV2 most of its accuracy at this budget). Step "
                      "time is the median of interleaved repeats at batch size of the table's timing batch; "
                      "saved_MiB is what autograd keeps for backward; state_KiB the persistent buffers; norms are exact per-layer operator norms "
                      "(certified brackets) of the trained depthwise and pointwise convs.")
    sec.data["per_layer"] = norms
    sec.data["certified"] = {"eps": eps_grid, **cert}
    sec.table("certificates", ["sn", "lipschitz_bound", "median_radius", *(f"cert@{e:g}" for e in eps_grid)],
              [{"sn": k, "lipschitz_bound": lips[k], "median_radius": median_radius(radii[k]),
                **{f"cert@{e:g}": c for e, c in zip(eps_grid, cert[k])}} for k in cert],
              caption="Certified accuracy on the test split at l2 radius eps (Lipschitz-margin certificate with the "
                      "network's certified bound; radii chosen to span the models' certified radii):")

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
    sec.plot("certified", draw_cert, "Certified accuracy against the l2 radius (Lipschitz-margin certificate "
                                     "with the network's certified Lipschitz bound):")
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


# ----------------------------------------------------------------------------- section 2


def _forward_ms(model: nn.Module, x: Tensor, repeats: int) -> float:
    model.eval()
    with torch.no_grad():
        model(x)
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def section_he(ctx: Context, report: Report) -> None:
    """Depth-wise decomposition (He et al. 2019)."""
    from .data import load_dataset
    from .decompose import convert
    from .io import save_model
    from .models import count_params, profile
    from .train import evaluate

    b = ctx.budget
    sec = report.section(
        "he", "2. Depth-wise decomposition of trained convolutions (He et al.)",
        claim=("A trained regular CNN converted into a depthwise separable one by per-channel SVD (and its "
               "data-driven GSVD form), then fine-tuned, beats the same separable network trained from scratch "
               "and beats channel decomposition at equal FLOPs."),
        paper="He, Qian, Wang et al., Depth-wise Decomposition for Accelerating Separable Convolutions in "
              "Efficient Convolutional Neural Networks (arXiv 1910.09455)")
    regular = ctx.train("resnet20_regular", model="resnet20")
    shape = input_shape(regular.model, ctx)
    calib = load_dataset(ctx.data, ctx.data_dir, split="train", image_size=b.image_size)
    if b.calib_images is not None and b.calib_images < len(calib):
        calib = calib.get_batch(torch.arange(b.calib_images))[0]
    total_epochs = b.epochs + b.finetune_epochs
    scratch = ctx.train("resnet20_dsc_scratch", model="resnet20", conv="dsc", epochs=total_epochs)
    x_time = eval_batches(ctx, limit=64, batch_size=64)[0][0]
    rows = [{"network": "regular (trained)", "before_ft": None, "test_acc": regular.test_acc,
             "params": count_params(regular.model), "mflops": profile(regular.model, shape).flops / 1e6,
             "out_error": 0.0, "fwd_ms": _forward_ms(regular.model, x_time, b.timing_repeats)},
            {"network": "DSC from scratch", "before_ft": None, "test_acc": scratch.test_acc,
             "params": count_params(scratch.model), "mflops": profile(scratch.model, shape).flops / 1e6,
             "out_error": None, "fwd_ms": _forward_ms(scratch.model, x_time, b.timing_repeats)}]
    # every spatial conv but the stem, whose few input channels leave nothing to factor (a 1-channel
    # stem is already rank one per filter); the DSC network from scratch keeps a DSC stem
    inner = lambda name, m: m.in_channels > shape[0]  # noqa: E731
    variants = [("dsc", "svd"), ("dsc", "gsvd"), ("bsconv_u", "svd"), ("bsconv_u", "gsvd")]
    dsc_flops = None
    converted = {}
    for to, method in variants:
        ctx.progress(f"converting to {to} ({method})")
        new, rep = convert(regular.model, to=to, rank=1, method=method, data=calib, layers=inner)
        converted[(to, method)] = (new, rep)
        if (to, method) == ("dsc", "svd"):
            dsc_flops = rep.totals["flops_after"]
    speedup = converted[("dsc", "svd")][1].totals["flops_before"] / dsc_flops
    new, rep = convert(regular.model, to="channel", speedup=speedup, method="gsvd", data=calib, layers=inner)
    converted[("channel", "gsvd")] = (new, rep)
    for (to, method), (new, rep) in converted.items():
        name = f"resnet20_{to}_{method}"
        save_model(new, ctx.out / "converted" / name)
        _, before = evaluate(new, load_dataset(ctx.data, ctx.data_dir, split="test", image_size=b.image_size))
        tuned = ctx.train(f"{name}_ft", init=str(ctx.out / "converted" / name), epochs=b.finetune_epochs,
                          lr=0.01)
        rows.append({"network": f"{to} ({method}) + fine-tune", "before_ft": before, "test_acc": tuned.test_acc,
                     "params": count_params(tuned.model), "mflops": profile(tuned.model, shape).flops / 1e6,
                     "out_error": rep.totals.get("mean_output_error"),
                     "fwd_ms": _forward_ms(tuned.model, x_time, b.timing_repeats)})
    sec.table("networks", ["network", "before_ft", "test_acc", "params", "mflops", "out_error", "fwd_ms"], rows,
              caption="ResNet-20 on the data: the trained regular network, converted at rank one and fine-tuned, "
                      "against the same depthwise separable network trained from scratch for as many epochs in "
                      "all, and channel decomposition at the FLOPs of the rank-one DSC conversion (conversions "
                      "keep the stem regular: its few input channels leave little to factor). out_error is "
                      "the mean relative output error of the converted layers on calibration images.")
    ctx.progress("output error vs rank")
    curves = []

    def point(label: str, rank: int | None, rep) -> None:
        curves.append({"method": label, "rank": rank,
                       "flops_ratio": rep.totals["flops_after"] / rep.totals["flops_before"],
                       "out_error": rep.totals["mean_output_error"]})

    for to, method in variants:  # rank one is in the table above; higher ranks here
        point(f"{to}/{method}", 1, converted[(to, method)][1])
        for r in b.curve_ranks:
            point(f"{to}/{method}", r, convert(regular.model, to=to, rank=r, method=method, data=calib,
                                               layers=inner)[1])
    point("channel/gsvd", None, converted[("channel", "gsvd")][1])
    for sp in [speedup / r for r in b.curve_ranks]:  # channel decomposition at the FLOPs of those ranks
        point("channel/gsvd", None, convert(regular.model, to="channel", speedup=sp, method="gsvd", data=calib,
                                            layers=inner)[1])
    sec.table("error_vs_rank", ["method", "rank", "flops_ratio", "out_error"], curves)

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
    by = {r["network"]: r for r in rows}
    best = max(by["dsc (gsvd) + fine-tune"]["test_acc"], by["dsc (svd) + fine-tune"]["test_acc"])
    beats_scratch = best >= scratch.test_acc
    beats_channel = best >= by["channel (gsvd) + fine-tune"]["test_acc"]
    gsvd_better = by["dsc (gsvd) + fine-tune"]["out_error"] <= by["dsc (svd) + fine-tune"]["out_error"]
    sec.verdict(beats_scratch and beats_channel, "Converted and fine-tuned DSC ({best}) against DSC from scratch "
                "({scratch}): {s}; against channel decomposition at equal FLOPs ({chan}): {c}; GSVD output error "
                "at or below SVD's: {g}.", best=best, scratch=scratch.test_acc, s=beats_scratch,
                chan=by["channel (gsvd) + fine-tune"]["test_acc"], c=beats_channel, g=gsvd_better)


# ----------------------------------------------------------------------------- section 4


def section_fantastic_four(ctx: Context, report: Report) -> None:
    """Fantastic Four bounds (Singla & Feizi, ICLR 2021)."""
    from .spectral import ConvSpec, certified_radii, fantastic_four_terms, lipschitz_bound, norm_bracket, spectral_norm
    from .spectral.network import layer_inputs

    b = ctx.budget
    sec = report.section(
        "fantastic4", "4. Fantastic Four bounds (Singla & Feizi)",
        claim=("Four reshapes of a conv kernel give differentiable, certified upper bounds on the layer's spectral "
               "norm (times the square root of the kernel area), independent of the input size and cheap; their "
               "minimum is reasonably tight, and used as a training penalty it lowers the network's Lipschitz "
               "constant and improves certified robustness."),
        paper="Singla & Feizi, Fantastic Four: Differentiable Bounds on Singular Values of Convolution Layers, "
              "ICLR 2021 (arXiv 1911.10258)")
    plain = ctx.train("resnet20_regular", model="resnet20")
    shape = input_shape(plain.model, ctx)
    rows = []
    for name, (mod, in_shape) in layer_inputs(plain.model, shape, types=(nn.Conv2d,)).items():
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
    sec.table("bounds", ["layer", "exact", "R", "S", "T", "U", "min4", "gram", "min4_ratio", "gram_ratio", "f4_ms"],
              rows, caption="Each of the four bounds, their minimum and the Gram iteration bound against the exact "
                            "norm, for every spatial conv of the regular ResNet-20 trained on the data:")

    def draw(ax):
        ax.plot([r["min4_ratio"] for r in rows], marker="o", label="Fantastic Four (min of four) / exact")
        ax.plot([r["gram_ratio"] for r in rows], marker="s", label="Gram iteration / exact")
        ax.axhline(1.0, color="k", lw=0.8, ls="--")
        ax.set_xlabel("conv layer (network order)")
        ax.set_ylabel("bound / exact")
        ax.legend()

    sec.plot("ratios", draw, "Bound over exact norm per layer:")
    valid = all(min(r["R"], r["S"], r["T"], r["U"]) >= r["exact"] * (1 - 1e-9) for r in rows)
    gm = math.exp(statistics.fmean(math.log(r["min4_ratio"]) for r in rows))
    beta = 0.01
    pen = ctx.train("resnet20_ff", model="resnet20", ff_beta=beta)
    batches = eval_batches(ctx)
    comp, radii, lips = [], {}, {}
    for label, run in (("no penalty", plain), ("Fantastic Four penalty", pen)):
        model = run.model.eval()
        lips[label] = lipschitz_bound(model, shape, method="fft")
        radii[label], _ = certified_radii(model, batches, lipschitz=lips[label])
    eps_grid = radius_grid(list(radii.values()))
    sec.data["certified_eps"] = eps_grid
    for label, run in (("no penalty", plain), ("Fantastic Four penalty", pen)):
        comp.append({"training": label, "beta": 0.0 if run is plain else beta, "test_acc": run.test_acc,
                     "lipschitz_bound": lips[label], "median_radius": median_radius(radii[label]),
                     **{f"cert@{e:g}": float((radii[label] > e).double().mean()) for e in eps_grid[1:]}})
    sec.table("penalty", ["training", "beta", "test_acc", "lipschitz_bound", "median_radius"]
              + [f"cert@{e:g}" for e in eps_grid[1:]],
              comp, caption="ResNet-20 trained alike with and without the Fantastic Four penalty (the sum of the "
                            "conv layers' bounds times beta); certified accuracy at l2 radius eps and the median "
                            "certified radius (Lipschitz-margin certificate; radii chosen to span the models'):")
    sec.plot("certified", lambda ax: draw_certified(ax, radii, lips),
             "Certified accuracy against the l2 radius, with and without the penalty:")
    lower = comp[1]["lipschitz_bound"] < comp[0]["lipschitz_bound"]
    sec.verdict(valid and lower, "Every one of the four bounds is at or above the exact norm on every layer: "
                "{valid}; geometric mean of min-of-four over exact {gm}; the penalty lowers the network Lipschitz "
                "bound: {lower} (accuracy change {dacc}; median certified radius {r0} without, {r1} with).",
                valid=valid, gm=gm, lower=lower, dacc=comp[1]["test_acc"] - comp[0]["test_acc"],
                r0=comp[0]["median_radius"], r1=comp[1]["median_radius"])

# ----------------------------------------------------------------------------- entry point

SECTIONS: list[Callable[[Context, Report], None]] = [section_runkel, section_he, section_bsconv,
                                                     section_fantastic_four]


def run_demo(out: str | Path = "demo", quick: bool = False, data: str = "digits", data_dir: str | None = None,
             device: str = "cpu", progress: bool = True, readme: str | Path | None = None) -> Path:
    """Run every section and write the report; returns the path of ``report.md``. With ``readme``,
    that file's results block is rewritten from the new report (:func:`sepconv.report.update_readme`)."""
    from . import __version__
    from .data import load_dataset
    from .train import resolve_device

    out = Path(out)
    budget = Budget.for_run(quick)
    resolve_device(device)  # bad input fails here, before any work
    for split in ("train", "test"):
        load_dataset(data, data_dir, split=split, image_size=budget.image_size)
    t0 = time.perf_counter()
    report = Report("sepconv demo: four papers' claims at small scale",
                    meta={"quick": quick, "data": data, "device": device, "budget": budget.__dict__,
                          "sepconv": __version__, "torch": torch.__version__,
                          "python": platform.python_version(), "threads": torch.get_num_threads()})
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(SECTIONS), desc="demo", unit="section", dynamic_ncols=True, disable=None)
    ctx = Context(out, budget, data, data_dir, device,
                  progress=(lambda m: bar.set_postfix_str(m)) if bar is not None else (lambda m: None),
                  bars=bar is not None)
    if quick:
        report.run.text("**Quick mode**: tiny budgets (native 8x8 images, one epoch on part of the train split); "
                        "the numbers show the "
                        "pipeline works, not what the papers claim. Run `sepconv demo` without --quick for "
                        "the real measurements.")
    seconds = {}
    for section in SECTIONS:
        t = time.perf_counter()
        section(ctx, report)
        seconds[report.sections[-1].key] = round(time.perf_counter() - t, 1)
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.close()
    report.run.fill("Data: {data}, images {size}x{size}, {epochs} epochs per network; torch {torch}, "
                    "{threads} threads; wall time {wall} s.", data=data, size=budget.image_size,
                    epochs=budget.epochs, torch=torch.__version__, threads=torch.get_num_threads(),
                    wall=round(time.perf_counter() - t0, 1))
    report.run.data["summary"] = [report.run.blocks[-1]]
    names = {"runkel": "Runkel", "he": "He", "bsconv": "BSConv", "fantastic4": "Fantastic Four"}
    report.run.fill("Seconds per section: " + ", ".join(f"{names.get(k, k)} {{{k}}}" for k in seconds) + ".",
                    **seconds)
    path = report.write(out)
    if readme is not None:
        from .report import update_readme

        update_readme(readme, out)
    return path
