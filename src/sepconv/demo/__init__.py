"""``sepconv demo``: each of the four papers' headline claims, reproduced at small scale.

The demo trains a handful of small networks on the bundled digits data (or any dataset
sepconv reads), then measures what each paper claims, and writes ``report.md``,
``report.json`` (every number of the report) and PNG plots. Every training run lives in
``OUT/runs/<name>`` and is reused when the demo is run again with the same settings
(an interrupted demo resumes where it stopped). Seeds are fixed: two runs on the same
machine give the same accuracies and norms; timings vary with the machine's load.

Every claim is decided by one rule (:mod:`sepconv.evidence`): comparisons paired over seeds, each
seed testing its own fold of a stratified partition of the data, with a 95 % interval. Budgets
(:data:`BUDGETS`): ``default`` (three seeds, about ten minutes on 2 idle CPU cores), ``quick``
(native 8x8 digits and a single epoch, for tests and CI: its numbers say only that the pipeline
works, and no verdict is a test), ``full`` (five seeds, longer training).

One module per paper (:mod:`.runkel`, :mod:`.decomposition`, :mod:`.bsconv`,
:mod:`.fantastic_four`), each with one section function; :mod:`.context` holds the budget,
the run context and cached training, :mod:`.certified` and :mod:`.timing` the measurements
two sections share. A new paper is a new module and one line in :data:`PAPERS`.
"""

from __future__ import annotations

import platform
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import __version__
from ..report import Report, update_readme
from ..train import resolve_device
from .bsconv import kernel_correlations, section_bsconv
from .certified import PIXEL_EPS, cert_table, draw_certified, median_radius
from .context import BUDGETS, Budget, Context, Paper, Run, SectionFn, eval_batches, train_cached
from .decomposition import section_he
from .fantastic_four import section_fantastic_four
from .runkel import SN_METHODS, section_runkel
from .timing import train_step_costs

__all__ = ["BUDGETS", "PAPERS", "PIXEL_EPS", "SECTIONS", "SN_METHODS", "Budget", "Context", "Paper", "Run",
           "SectionFn", "cert_table", "draw_certified", "eval_batches", "kernel_correlations",
           "median_radius", "run_demo", "section_bsconv", "section_fantastic_four", "section_he",
           "section_runkel", "train_cached", "train_step_costs"]

#: The papers the demo reproduces, in report order: a new paper is one module and one line here.
PAPERS: tuple[Paper, ...] = (
    Paper("Runkel", section_runkel),
    Paper("He", section_he),
    Paper("BSConv", section_bsconv),
    Paper("Fantastic Four", section_fantastic_four),
)

#: The section functions in report order (read from :data:`PAPERS`).
SECTIONS: list[SectionFn] = [p.run for p in PAPERS]


def run_demo(out: str | Path = "demo", quick: bool = False, data: str = "digits", data_dir: str | None = None,
             device: str = "cpu", progress: bool = True, readme: str | Path | None = None,
             budget: str | Budget | None = None, seeds: int | None = None) -> Path:
    """Run every section and write the report; returns the path of ``report.md``. ``budget``: a name of
    :data:`BUDGETS` (default ``"default"``; ``quick=True`` means ``"quick"``) or a :class:`Budget`;
    ``seeds`` overrides its number of seeds. With ``readme``, that file's results block is rewritten
    from the new report (:func:`sepconv.report.update_readme`)."""
    out = Path(out)
    if not isinstance(budget, Budget):
        budget = Budget.named(budget or ("quick" if quick else "default"))
    budget = budget.with_seeds(seeds)
    quick = budget.quick
    resolve_device(device)  # bad input fails here, before any work
    ctx = Context(out, budget, data, data_dir, device)
    for s in ctx.seeds:
        for split in ("train", "test"):
            ctx.dataset(split, s)
    t0 = time.perf_counter()
    report = Report("sepconv demo: four papers' claims at small scale",
                    meta={"quick": quick, "data": data, "device": device, "budget": budget.__dict__,
                          "sepconv": __version__, "torch": torch.__version__,
                          "python": platform.python_version(), "threads": torch.get_num_threads()})
    bar = None
    if progress:
        bar = tqdm(total=len(PAPERS), desc="demo", unit="section", dynamic_ncols=True, disable=None)
        ctx.progress, ctx.bars = bar.set_postfix_str, True
    if quick:
        report.run.text("**Quick mode**: tiny budgets (native 8x8 images, one epoch on part of the train split); "
                        "the numbers show the pipeline works, not what the papers claim, and no verdict is a "
                        "test. Run `sepconv demo` without --quick for the real measurements.")
    seconds, names = {}, {}
    for paper in PAPERS:
        t = time.perf_counter()
        paper.run(ctx, report)
        key = report.sections[-1].key
        seconds[key], names[key] = round(time.perf_counter() - t, 1), paper.name
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.close()
    folds = (f"seed s tests on fold s of a stratified {budget.folds}-fold partition (every image tested once)"
             if budget.folds else "the dataset's own test split")
    report.run.fill("Data: {data}, images {size}x{size}, {epochs} epochs per network, {seeds} seeds ({folds}); "
                    "budget {budget}; torch {torch}, {threads} threads; wall time {wall} s.", data=data,
                    size=budget.image_size, epochs=budget.epochs, seeds=budget.seeds, folds=folds,
                    budget=budget.name, torch=torch.__version__, threads=torch.get_num_threads(),
                    wall=round(time.perf_counter() - t0, 1))
    report.run.data["summary"] = [report.run.blocks[-1]]
    report.run.fill("Seconds per section: " + ", ".join(f"{names[k]} {{{k}}}" for k in seconds) + ".", **seconds)
    path = report.write(out)
    if readme is not None:
        update_readme(readme, out)
    return path
