"""What every section of the demo shares: the budget, the run context and cached training.

Every training run lives in ``OUT/runs/<name>_s<seed>`` and is reused when the demo runs again
with the same settings (:func:`train_cached`; an interrupted run resumes where it stopped). Seed
``s`` of a budget fixes the run's random state and its test fold, so two runs on the same machine
train the same networks.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from ..data import ImageDataset, load_dataset
from ..errors import ConfigError, ModelError
from ..io import load_model
from ..models import default_input_shape
from ..report import Report
from ..train import Hooks, TrainConfig, train

__all__ = ["BUDGETS", "Budget", "Context", "Paper", "Run", "eval_batches", "train_cached"]


@dataclass(frozen=True)
class Budget:
    """How much work each section does, and over how many seeds.

    With ``seeds >= 2`` every comparison is paired over seeds, and seed ``s`` trains on the other
    folds of a stratified ``seeds``-fold partition of the data and tests on fold ``s``
    (:func:`sepconv.data.load_dataset` with ``folds``): over the seeds every image is a test image
    exactly once. One seed uses the dataset's own split (and decides nothing).
    """

    name: str = "default"
    image_size: int = 8  # digits' native size
    epochs: int = 6  # every network trained from scratch
    finetune_epochs: int = 6  # after a conversion: lr restarted at a tenth, cosine to zero (to a plateau)
    mobilenet_width: float = 0.5
    # MobileNets' learning rate: at 8x8 inputs the default 0.1 leaves MobileNetV2 near chance after six
    # epochs on some seeds (train accuracy 0.22-0.42 over three seeds; 0.71 at lr 0.02 on seed 0)
    mobilenet_lr: float = 0.02
    timing_repeats: int = 7
    train_images: int | None = None  # images of the train split each network sees (None: all)
    calib_images: int | None = None  # calibration images of the data-driven conversions (None: the train split)
    curve_ranks: tuple[int, ...] = (2, 4)  # ranks above one on the error-vs-rank curves
    seeds: int = 3
    quick: bool = False

    @property
    def folds(self) -> int:
        """The folds of the data (0: the dataset's own train/test split)."""
        return self.seeds if self.seeds >= 2 else 0

    @classmethod
    def named(cls, name: str, seeds: int | None = None) -> Budget:
        """The budget ``name`` of :data:`BUDGETS`, with ``seeds`` seeds if given."""
        if name not in BUDGETS:
            raise ConfigError(f"unknown budget {name!r}; known: {', '.join(BUDGETS)}")
        return BUDGETS[name].with_seeds(seeds)

    def with_seeds(self, seeds: int | None) -> Budget:
        """This budget over ``seeds`` seeds (``None``: as it is)."""
        if seeds is None:
            return self
        if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
            raise ConfigError(f"seeds must be a positive integer, got {seeds!r}")
        return replace(self, seeds=seeds)


#: The demo's budgets: ``quick`` shows the pipeline works (tests, CI; a couple of minutes, tests no claim),
#: ``default`` tests every claim over three seeds (about ten minutes on two cores), ``full`` is longer.
BUDGETS: dict[str, Budget] = {
    "quick": Budget(name="quick", image_size=8, epochs=1, finetune_epochs=1, mobilenet_width=0.25, timing_repeats=2,
                    train_images=480, calib_images=256, curve_ranks=(), seeds=2, quick=True),
    "default": Budget(),
    "full": Budget(name="full", image_size=16, epochs=15, finetune_epochs=5, mobilenet_width=1.0, timing_repeats=11,
                   seeds=5),
}


@dataclass
class Run:
    """A finished training run: its config, the trained model and the per-epoch metrics."""

    cfg: TrainConfig
    model: nn.Module
    history: list[dict]

    @property
    def test_acc(self) -> float:
        return self.history[-1]["test_acc"]


@dataclass
class Context:
    """Where a section writes, its budget and data, and the runs trained so far (shared by name and
    seed across sections: the regular ResNet-20 of a seed is trained once for three of them)."""

    out: Path
    budget: Budget
    data: str = "digits"
    data_dir: str | None = None
    device: str = "cpu"
    progress: Callable[[str], None] = lambda msg: None
    runs: dict[tuple[str, int], Run] = field(default_factory=dict)
    bars: bool = False  # a progress bar for each training stage
    datasets: dict[tuple[str, int], ImageDataset] = field(default_factory=dict, repr=False)  # by (split, seed)

    @property
    def seeds(self) -> range:
        return range(self.budget.seeds)

    def config(self, name: str, seed: int, **kw) -> TrainConfig:
        b = self.budget
        base = dict(data=self.data, data_dir=self.data_dir, image_size=b.image_size, train_images=b.train_images,
                    epochs=b.epochs, device=self.device, seed=seed, folds=b.folds, fold=seed if b.folds else 0,
                    out=str(self.out / "runs" / f"{name}_s{seed}"))
        base.update(kw)
        return TrainConfig(**base)

    def train(self, name: str, seed: int, hooks: Hooks | None = None, **kw) -> Run:
        """Train (or reuse / resume) the run ``name`` of ``seed``; see :func:`train_cached`."""
        if (name, seed) not in self.runs:
            self.progress(f"training {name} (seed {seed})")
            self.runs[name, seed] = train_cached(self.config(name, seed, **kw), hooks, progress=self.bars)
        return self.runs[name, seed]

    def regular(self, seed: int) -> Run:
        """The regular ResNet-20 of ``seed`` that three sections share (He, BSConv, Fantastic Four)."""
        return self.train("resnet20_regular", seed, model="resnet20")

    def dataset(self, split: str, seed: int) -> ImageDataset:
        """Split ``split`` of the data as seed ``seed`` sees it (its fold, when the budget has folds);
        loaded once per context, every section reads the same object."""
        if (split, seed) not in self.datasets:
            b = self.budget
            self.datasets[split, seed] = load_dataset(self.data, self.data_dir, split=split, image_size=b.image_size,
                                                      folds=b.folds or None, fold=seed if b.folds else 0)
        return self.datasets[split, seed]

    def input_shape(self, model: nn.Module) -> tuple[int, int, int]:
        """The ``(C, H, W)`` the demo feeds ``model``: the channels
        :func:`sepconv.models.default_input_shape` resolves, at the budget's image size (the size
        every network of the demo is trained at, not its family's default)."""
        shape = default_input_shape(model)
        if shape is None:
            raise ModelError(f"{type(model).__name__}: not built by sepconv.models.create_model, so its input "
                             "channels are unknown to the demo")
        return (shape[0], self.budget.image_size, self.budget.image_size)


#: A section of the demo: measures one paper's claim and adds its section to the report.
SectionFn = Callable[[Context, Report], None]


@dataclass(frozen=True)
class Paper:
    """One entry of the demo's registry (:data:`sepconv.demo.PAPERS`): the section function and
    the paper's short name in the run's timing line."""

    name: str
    run: SectionFn


def _digest(directory: Path) -> str:
    """SHA-256 of a saved model directory's files (config and weights)."""
    h = hashlib.sha256()
    for f in sorted(p for p in directory.iterdir() if p.is_file()):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def train_cached(cfg: TrainConfig, hooks: Hooks | None = None, progress: bool = False) -> Run:
    """Train ``cfg``; reuse a finished run with the same config, resume an interrupted one.
    ``progress``: the training's per-epoch bars (under the demo's own bar), no summary lines."""
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


def eval_batches(ctx: Context, seed: int, limit: int | None = None, batch_size: int = 500):
    """Seed ``seed``'s test split as a list of ``(x, y)`` batches (at most ``limit`` images)."""
    ds = ctx.dataset("test", seed)
    n = len(ds) if limit is None else min(limit, len(ds))
    return [ds.get_batch(torch.arange(i, min(n, i + batch_size))) for i in range(0, n, batch_size)]
