"""What every section of the demo shares: the budget, the run context and cached training.

Every training run lives in ``OUT/runs/<name>`` and is reused when the demo runs again with
the same settings (:func:`train_cached`; an interrupted run resumes where it stopped). Seeds
are fixed (``seed=0`` in every :class:`~sepconv.train.TrainConfig`), so two runs on the same
machine train the same networks.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..data import load_dataset
from ..errors import ModelError
from ..io import load_model
from ..models import default_input_shape
from ..report import Report
from ..train import Hooks, TrainConfig, train

__all__ = ["Budget", "Context", "Paper", "Run", "eval_batches", "train_cached"]


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
    """Where a section writes, its budget and data, and the runs trained so far (shared by name
    across sections: the regular ResNet-20 is trained once for three of them)."""

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

    def regular(self) -> Run:
        """The regular ResNet-20 that three sections share (He, BSConv, Fantastic Four): trained once."""
        return self.train("resnet20_regular", model="resnet20")

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


def eval_batches(ctx: Context, limit: int | None = None, batch_size: int = 500):
    """The test split as a list of ``(x, y)`` batches (at most ``limit`` images)."""
    ds = load_dataset(ctx.data, ctx.data_dir, split="test", image_size=ctx.budget.image_size)
    n = len(ds) if limit is None else min(limit, len(ds))
    return [ds.get_batch(torch.arange(i, min(n, i + batch_size))) for i in range(0, n, batch_size)]
