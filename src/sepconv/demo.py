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
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .report import Report, Section
from .train import Hooks, TrainConfig, TrainResult, train


# ----------------------------------------------------------------------------- budget


@dataclass(frozen=True)
class Budget:
    """How much work each section does."""

    image_size: int = 16
    epochs: int = 6  # every network trained from scratch
    finetune_epochs: int = 1  # after a conversion
    mobilenet_width: float = 0.5
    timing_repeats: int = 7
    quick: bool = False

    @classmethod
    def for_run(cls, quick: bool) -> "Budget":
        return cls(image_size=8, epochs=1, finetune_epochs=1, mobilenet_width=0.25, timing_repeats=2,
                   quick=True) if quick else cls()


@dataclass
class Context:
    out: Path
    budget: Budget
    data: str = "digits"
    data_dir: str | None = None
    device: str = "cpu"
    progress: Callable[[str], None] = lambda msg: None
    runs: dict[str, "Run"] = field(default_factory=dict)

    def config(self, name: str, **kw) -> TrainConfig:
        base = dict(data=self.data, data_dir=self.data_dir, image_size=self.budget.image_size,
                    epochs=self.budget.epochs, device=self.device, seed=0,
                    out=str(self.out / "runs" / name))
        base.update(kw)
        return TrainConfig(**base)

    def train(self, name: str, hooks: Hooks | None = None, **kw) -> "Run":
        """Train (or reuse / resume) the run ``name``; see :func:`train_cached`."""
        if name not in self.runs:
            self.progress(f"training {name}")
            self.runs[name] = train_cached(self.config(name, **kw), hooks)
        return self.runs[name]


@dataclass
class Run:
    cfg: TrainConfig
    model: nn.Module
    history: list[dict]

    @property
    def test_acc(self) -> float:
        return self.history[-1]["test_acc"]


def train_cached(cfg: TrainConfig, hooks: Hooks | None = None) -> Run:
    """Train ``cfg``; reuse a finished run with the same config, resume an interrupted one."""
    from .io import load_model

    out = Path(cfg.out)
    saved = out / "train_config.json"
    same = saved.is_file() and json.loads(saved.read_text()) == cfg.to_dict()
    if not same and out.exists():
        shutil.rmtree(out)
    if same and (out / "summary.json").is_file():
        history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        if len(history) == cfg.epochs:
            return Run(cfg, load_model(out / "model"), history)
    res = train(cfg, hooks=hooks, resume=same and (out / "last.pt").is_file(), progress=False)
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return Run(cfg, res.model, history)


# ----------------------------------------------------------------------------- measurements


def train_step_cost(model: nn.Module, batch: tuple[Tensor, Tensor], repeats: int) -> dict:
    """Median seconds of one SGD step on ``batch`` and the bytes autograd saves for backward
    (the activation memory of a training step), measured on a copy of ``model``."""
    import copy

    m = copy.deepcopy(model).train()
    opt = torch.optim.SGD(m.parameters(), lr=1e-3)
    x, y = batch

    def step():
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
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return {"step_s": statistics.median(times), "saved_bytes": saved}


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
    held = intra_wins and v1 >= 0 and v2 >= 0
    sec.verdict(held if held or not intra_wins or (v1 < 0 and v2 < 0) else None,
                "Intra-kernel share above cross-kernel share: {intra_wins}; accuracy change BSConv-U vs DSC "
                "(MobileNetV1) {v1}, BSConv-S vs DSC (MobileNetV2) {v2}.",
                intra_wins=intra_wins, v1=v1, v2=v2)


# ----------------------------------------------------------------------------- entry point

SECTIONS: list[Callable[[Context, Report], None]] = [section_bsconv]


def run_demo(out: str | Path = "demo", quick: bool = False, data: str = "digits", data_dir: str | None = None,
             device: str = "cpu", progress: bool = True) -> Path:
    """Run every section and write the report; returns the path of ``report.md``."""
    from . import __version__

    out = Path(out)
    budget = Budget.for_run(quick)
    t0 = time.perf_counter()
    report = Report("sepconv demo: four papers' claims at small scale",
                    meta={"quick": quick, "data": data, "device": device, "budget": budget.__dict__,
                          "sepconv": __version__, "torch": torch.__version__,
                          "python": platform.python_version(), "threads": torch.get_num_threads()})
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(SECTIONS), desc="demo", unit="section", dynamic_ncols=True)
    ctx = Context(out, budget, data, data_dir, device,
                  progress=(lambda m: bar.set_postfix_str(m)) if bar is not None else (lambda m: None))
    if quick:
        report.run.text("**Quick mode**: tiny budgets (native 8x8 images, one epoch); the numbers show the "
                        "pipeline works, not what the papers claim. Run `sepconv demo` without --quick for "
                        "the real measurements.")
    for section in SECTIONS:
        section(ctx, report)
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.close()
    report.run.fill("Data: {data}, images {size}x{size}, {epochs} epochs per network; torch {torch}, "
                    "{threads} threads; wall time {wall} s.", data=data, size=budget.image_size,
                    epochs=budget.epochs, torch=torch.__version__, threads=torch.get_num_threads(),
                    wall=round(time.perf_counter() - t0, 1))
    return report.write(out)
