"""The training loop: :func:`train` sets a run up, runs its epochs and writes what it made.

:func:`train` claims ``out`` and the process group, :func:`_train_locked` builds the run
(data, hooks, model, optimizer, a checkpoint to resume) into a :class:`_Run`, whose methods are
the pieces of the loop: :meth:`_Run.run_epoch` runs the steps of one epoch, :meth:`_Run.end_epoch`
evaluates and saves it, :meth:`_Run.finish` writes the last epoch's model.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..data import augment_batch, load_dataset
from ..errors import ConfigError
from ..files import atomic_write_text
from ..io import save_model
from .checkpoint import _check_checkpoint, _load_checkpoint, _read_checkpoint, _save_checkpoint
from .config import TrainConfig
from .device import _to_device, evaluate, resolve_device
from .distributed import (
    _all_reduce_sum,
    _close_process_group,
    _Dist,
    _init_distributed,
    _on_rank0,
    _ranks_in_sync,
    _wrap_ddp,
)
from .hooks import Hooks, default_hooks
from .model import _check_fits_data, _check_step_memory, _nonfinite_param, build_model
from .optim import classification_loss, lr_factor, make_optimizer
from .outcome import TrainingDiverged, TrainingInterrupted, TrainResult
from .output import _claim_output, _jsonl, _metrics_upto, _start_output
from .rng import _epoch_order, _seed_everything, _set_rng_state, _step_generator

__all__ = ["train"]


def train(cfg: TrainConfig, hooks: Hooks | None = None, resume: bool = False, progress: bool = True,
          stop_after_epochs: int | None = None, log: bool | None = None, force: bool = False,
          trust_code: bool = False) -> TrainResult:
    """Train ``cfg.model`` on ``cfg.data``; see :mod:`sepconv.train` for what is written.

    ``resume``: continue the run in ``cfg.out`` from its ``last.pt``. The checkpoint is checked
    before any training: its entries (``config``, ``model``, ``optimizer``, ``scheduler``, ``rng``,
    ``epoch``, ``step``, ``best_acc``) must be there and well-formed, the epoch within
    ``0..cfg.epochs`` and the step within the epoch, the states must fit the model and optimizer
    this run builds, and ``cfg`` must match the checkpoint's config in everything but
    :data:`RESUME_MAY_CHANGE` (``epochs`` may grow); ``metrics.jsonl`` is rewritten to the
    checkpoint's epochs. ``force``: start afresh in an ``out`` that holds another run (its files
    are removed once every check has passed, just before training starts); without it such an
    ``out`` is refused. ``trust_code``: let ``init``'s ``config.json`` name a factory (see
    :func:`build_model`).

    ``progress``: per-epoch progress bars; ``log`` (default: as ``progress``): one summary line per
    epoch on stdout (rank 0 only under torchrun).

    ``stop_after_epochs`` ends this invocation after that many epochs (a checkpoint is
    written as usual), to be continued later with ``resume=True``.

    Raises :class:`~sepconv.errors.OutputError` (``out`` not writable, locked by another run,
    holding a previous run, a full disk), :class:`~sepconv.errors.CheckpointError`,
    :class:`~sepconv.errors.ResourceError` (a training step above the memory budget),
    :class:`TrainingDiverged`, :class:`~sepconv.errors.ConfigError` -- all before any training
    except a full disk and a divergence, which keep the last good checkpoint.
    """
    cfg.validate()
    device = resolve_device(cfg.device)
    d = _init_distributed(device)
    try:
        if d.world > 1 and device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        if cfg.batch_size % d.world:
            raise ConfigError(f"batch_size {cfg.batch_size} is not divisible by the {d.world} processes")
        out = Path(cfg.out)
        with contextlib.ExitStack() as held:  # the run's lock on `out`, held to the end
            _on_rank0(d, lambda: _claim_output(out, resume, force, held))
            return _train_locked(cfg, hooks, resume, force, progress, stop_after_epochs, log, trust_code,
                                 device, d, out, out / "last.pt")
    finally:
        if d.owned:  # a process group left to the interpreter's exit can abort it (gloo's threads)
            _close_process_group()


@dataclass(frozen=True)
class _Batches:
    """How a run cuts its training images into steps: every rank takes every ``world``-th sample
    of the epoch's order, ``local_batch`` of them a step."""

    local_batch: int
    n_train: int
    per_rank: int
    steps_per_epoch: int

    @classmethod
    def of(cls, cfg: TrainConfig, d: _Dist, n_images: int) -> _Batches:
        local_batch = cfg.batch_size // d.world
        n_train = n_images if cfg.train_images is None else min(n_images, cfg.train_images)
        per_rank = n_train // d.world
        steps_per_epoch = per_rank // local_batch
        if steps_per_epoch < 1:
            raise ConfigError(f"batch_size {cfg.batch_size} is larger than the {n_train} training images")
        return cls(local_batch, n_train, per_rank, steps_per_epoch)


def _train_locked(cfg: TrainConfig, hooks: Hooks | None, resume: bool, force: bool, progress: bool,
                  stop_after_epochs: int | None, log: bool | None, trust_code: bool, device: torch.device, d: _Dist,
                  out: Path, ckpt_path: Path) -> TrainResult:
    """:func:`train` once this process holds ``out`` (rank 0) or rank 0 holds it (the other ranks)."""
    train_set = load_dataset(cfg.data, cfg.data_dir, split="train", image_size=cfg.image_size, folds=cfg.folds,
                             fold=cfg.fold)
    test_set = load_dataset(cfg.data, cfg.data_dir, split="test", image_size=cfg.image_size, folds=cfg.folds,
                            fold=cfg.fold)
    input_shape = (train_set.in_chans, *train_set.image_size)
    if hooks is None:
        hooks = default_hooks(cfg, input_shape, test_set, device)
    batches = _Batches.of(cfg, d, len(train_set))

    state = resumed = None
    if resume:
        state = _read_checkpoint(ckpt_path)
        resumed = _check_checkpoint(state, ckpt_path, cfg, batches.steps_per_epoch, hooks.loss_terms)

    job = _Run.build(cfg, hooks, device, d, out, ckpt_path, train_set, test_set, batches, trust_code)
    if resumed is not None:
        job.restore(state, resumed)
        del state  # NB: the checkpoint's tensors, no longer needed, are freed before training
    job.net = _wrap_ddp(job.model, device, d, bool(cfg.extra.get("sync_bn")))
    _on_rank0(d, lambda: _start_output(out, cfg, resume, force, job.records))

    if d.main and (progress if log is None else log) and cfg.certify:
        print(_certify_line(test_set), flush=True)
    epochs_run = 0
    with _catch_sigint(job):
        for epoch in range(job.start_epoch, cfg.epochs):
            rec = job.end_epoch(epoch, job.run_epoch(epoch, progress))
            job.history.append(rec)
            if d.main and (progress if log is None else log):
                print(_summary_line(rec, cfg.epochs), flush=True)
            epochs_run += 1
            if stop_after_epochs is not None and epochs_run >= stop_after_epochs:
                break
    return job.finish()


class _Run:
    """A run once built: what every epoch reads (config, data, model, optimizer) and what the
    epochs change (``best_acc``, ``records``: the metrics of every epoch so far, ``last_saved``:
    the (epoch, step) of the ``last.pt`` this run may fall back on, ``history``: the metrics of
    this invocation's epochs, ``interrupted``: set by Ctrl-C)."""

    def __init__(self, cfg: TrainConfig, hooks: Hooks, device: torch.device, d: _Dist, out: Path, ckpt_path: Path,
                 train_set, test_set, batches: _Batches, model: nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler) -> None:
        self.cfg, self.hooks, self.device, self.d, self.out, self.ckpt_path = cfg, hooks, device, d, out, ckpt_path
        self.train_set, self.test_set, self.batches = train_set, test_set, batches
        self.model, self.net, self.optimizer, self.scheduler = model, model, optimizer, scheduler
        self.start_epoch, self.start_step, self.best_acc = 0, 0, -1.0
        self.running: dict | None = None
        self.records: list[dict] = []
        self.last_saved: tuple[int, int] | None = None
        self.history: list[dict] = []
        self.interrupted = False

    @classmethod
    def build(cls, cfg: TrainConfig, hooks: Hooks, device: torch.device, d: _Dist, out: Path, ckpt_path: Path,
              train_set, test_set, batches: _Batches, trust_code: bool) -> _Run:
        """Seed, build and check the model (against the data and the memory budget), move it to
        ``device``, and give it an optimizer and a per-step schedule."""
        input_shape = (train_set.in_chans, *train_set.image_size)
        _seed_everything(cfg.seed)
        model = build_model(cfg, train_set.num_classes, train_set.in_chans, hooks, trust_code=trust_code,
                            image_size=tuple(train_set.image_size))
        _check_fits_data(model, cfg, train_set.num_classes, input_shape)
        eval_batch = min(cfg.eval_batch_size, max(1, -(-len(test_set) // d.world)))
        _check_step_memory(model, cfg, input_shape, batches.local_batch, eval_batch)
        model = model.to(device)
        if cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        optimizer = make_optimizer(cfg, model)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_factor(cfg, step, batches.steps_per_epoch))
        return cls(cfg, hooks, device, d, out, ckpt_path, train_set, test_set, batches, model, optimizer, scheduler)

    def restore(self, state: dict, resumed: dict) -> None:
        """Continue from a checked checkpoint: its states, its place in the run, its RNG states."""
        _load_checkpoint(state, self.ckpt_path, self.model, self.optimizer, self.scheduler,
                         resumed["epoch"] * self.batches.steps_per_epoch + resumed["step"])
        self.start_epoch, self.start_step = resumed["epoch"], resumed["step"]
        self.best_acc, self.running = resumed["best_acc"], resumed["running"]
        self.records = resumed["records"]
        if self.records is None:  # a checkpoint without its metrics: the file's, cut to the checkpoint's epoch
            self.records = _metrics_upto(self.out / "metrics.jsonl", self.start_epoch)
        self.last_saved = (self.start_epoch, self.start_step)
        _set_rng_state(resumed["rng"])

    def checkpoint(self, epoch: int, step: int, run: dict | None, path: Path) -> None:
        _save_checkpoint(path, self.model, self.optimizer, self.scheduler, self.cfg, epoch=epoch, step=step,
                         best_acc=self.best_acc, running=run, records=self.records)

    def diverged(self, what: str, epoch: int, step: int | None = None) -> TrainingDiverged:
        """The error that ends a run whose loss, metrics or weights are not finite."""
        cfg, last_saved = self.cfg, self.last_saved
        where = (f"epoch {epoch + 1}/{cfg.epochs}"
                 + (f", step {step + 1}/{self.batches.steps_per_epoch}" if step is not None else ""))
        kept = (f"the last good checkpoint {self.ckpt_path} (epoch {last_saved[0]}"
                + (f" step {last_saved[1]}" if last_saved[1] else "") + ") is kept"
                if last_saved is not None else "no checkpoint was written")
        return TrainingDiverged(f"training diverged at {where}: {what}; nothing of this epoch was saved and {kept} "
                                f"(a smaller --lr than {cfg.lr:g} may help)")

    def run_epoch(self, epoch: int, progress: bool) -> dict:
        """The steps of ``epoch`` (from ``start_step`` in a resumed one); returns their sums. Every
        rank stops at the same step: :class:`TrainingDiverged` when a loss is not finite,
        :class:`TrainingInterrupted` after Ctrl-C (once ``last.pt`` holds the steps done)."""
        cfg, d, steps_per_epoch = self.cfg, self.d, self.batches.steps_per_epoch
        self.net.train()
        order = _epoch_order(self.batches.n_train, cfg.seed, epoch)[d.rank::d.world][:self.batches.per_rank]
        run = self.running or {"loss": 0.0, "correct": 0.0, "n": 0.0, "time": 0.0, "steps": 0,
                               **{f"loss_{k}": 0.0 for k in self.hooks.loss_terms}}
        self.running = None
        bar = _progress(range(self.start_step, steps_per_epoch), progress and d.main,
                        f"epoch {epoch + 1}/{cfg.epochs}", steps_per_epoch, self.start_step)
        for step in bar:
            bad = self.train_step(run, order, epoch, step)
            stop = (self.interrupted, bad is not None)
            if d.world > 1:  # one collective for both: every rank stops at the same step
                stop = tuple(v > 0 for v in _all_reduce_sum([float(stop[0]), float(stop[1])], d))
            if stop[1]:
                raise self.diverged(bad or "the loss is not finite on another rank", epoch, step)
            if stop[0]:
                self.save_interrupted(epoch, step, run)
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{run['loss'] / run['n']:.3f}", acc=f"{run['correct'] / run['n']:.3f}")
        self.start_step = 0
        return run

    def train_step(self, run: dict, order: Tensor, epoch: int, step: int) -> str | None:
        """One optimizer step on the ``step``-th batch of ``order``, its sums added to ``run``;
        what was not finite (``None``: everything was)."""
        cfg, hooks, local_batch = self.cfg, self.hooks, self.batches.local_batch
        t0 = time.perf_counter()
        idx = order[step * local_batch:(step + 1) * local_batch]
        x, y = self.train_set.get_batch(idx)
        if cfg.augment:
            x = augment_batch(x, _step_generator(cfg.seed, epoch, step, self.d.rank),
                              pad=max(1, x.shape[-1] // 8), flip=self.train_set.flip_ok)
        x, y = _to_device(x, y, self.device, cfg.channels_last)
        logits = self.net(x)
        loss = classification_loss(logits, y, cfg.label_smoothing, cfg.logit_scale, cfg.loss, cfg.margin, cfg.hkr_alpha)
        total = loss
        bad = None
        for name, term in hooks.loss_terms.items():
            v = term(self.model)
            value = float(v.detach())
            run[f"loss_{name}"] += value
            if not math.isfinite(value):
                bad = bad or f"the loss term {name!r} is {value}"
            total = total + v
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        self.optimizer.step()
        self.scheduler.step()
        value = loss.item()
        if not math.isfinite(value):
            bad = f"the loss is {value}"
        run["loss"] += value * len(y)
        run["correct"] += (logits.argmax(1) == y).sum().item()
        run["n"] += len(y)
        run["steps"] += 1
        run["time"] += time.perf_counter() - t0
        return bad

    def save_interrupted(self, epoch: int, step: int, run: dict) -> None:
        """Ctrl-C: ``last.pt`` holds the steps done so far (rank 0), then :class:`TrainingInterrupted`."""
        def save():
            what = _nonfinite_param(self.model)
            if what:
                raise self.diverged(what, epoch, step)
            self.checkpoint(epoch, step + 1, run, self.ckpt_path)
        _on_rank0(self.d, save)
        raise TrainingInterrupted(self.ckpt_path if self.d.main else None)

    def end_epoch(self, epoch: int, run: dict) -> dict:
        """The epoch's metrics (training sums of every rank, the test pass, loss terms, epoch-end
        hooks on rank 0), saved by :meth:`save_epoch`; returns them."""
        cfg, d = self.cfg, self.d
        sums = _all_reduce_sum([run["loss"], run["correct"], run["n"]], d)
        test_loss, test_acc = evaluate(self.net, self.test_set, cfg.eval_batch_size, self.device, cfg.channels_last, d)
        rec = {
            "epoch": epoch + 1,
            "train_loss": sums[0] / sums[2], "train_acc": sums[1] / sums[2],
            "test_loss": test_loss, "test_acc": test_acc,
            "lr": self.optimizer.param_groups[0]["lr"],
            "time_per_step": run["time"] / max(run["steps"], 1),
            "steps": self.batches.steps_per_epoch,
        }
        for name in self.hooks.loss_terms:
            rec[f"loss_{name}"] = run[f"loss_{name}"] / max(run["steps"], 1)
        if d.main and self.hooks.epoch_end:
            self.model.eval()
            for h in self.hooks.epoch_end:
                rec.update(h(self.model, epoch + 1))
            self.model.train()
        self.save_epoch(epoch, rec, test_acc)
        return rec

    def save_epoch(self, epoch: int, rec: dict, test_acc: float) -> None:
        """Rank 0 writes ``best.pt`` (a better test accuracy), then ``last.pt``, then
        ``metrics.jsonl``; a non-finite weight or metric is :class:`TrainingDiverged` and nothing
        of the epoch is kept (``records`` and ``best_acc`` stay as they were)."""
        is_best = test_acc > self.best_acc

        def save():
            what = _nonfinite_param(self.model) or next(
                (f"{k} is {v}" for k, v in rec.items()
                 if isinstance(v, float) and not math.isfinite(v)), None)
            if what:
                raise self.diverged(what, epoch)
            self.records.append(rec)
            try:  # best.pt, then last.pt, then the metrics (which the checkpoint also holds)
                if is_best:
                    self.checkpoint(epoch + 1, 0, None, self.out / "best.pt")
                self.checkpoint(epoch + 1, 0, None, self.ckpt_path)
            except BaseException:
                self.records.pop()
                raise
            atomic_write_text(self.out / "metrics.jsonl", _jsonl(self.records))
        best_before = self.best_acc
        self.best_acc = max(self.best_acc, test_acc)
        try:
            _on_rank0(self.d, save)
        except BaseException:
            self.best_acc = best_before
            raise
        if not self.d.main:
            self.records.append(rec)
        self.last_saved = (epoch + 1, 0)

    def finish(self) -> TrainResult:
        """Rank 0 writes the model of the last finished epoch (``model/``) and ``summary.json``.

        ``model/`` is the last epoch's, as ``last.pt`` and the returned model are, not the epoch of
        the best test accuracy (``best.pt``): the data have no validation split, and a model picked
        by its test accuracy would make that accuracy an optimistic estimate of its own."""
        in_sync = _ranks_in_sync(self.model, self.d)
        accs = [r.get("test_acc") for r in self.records]
        best_epoch = next((i + 1 for i, a in enumerate(accs) if a == self.best_acc), None)
        last_acc = accs[-1] if accs else None

        def write():
            save_model(self.model, self.out / "model")
            summary = {"best_acc": self.best_acc, "best_epoch": best_epoch, "last_acc": last_acc,
                       "epochs": len(self.records), "world_size": self.d.world, "ranks_in_sync": in_sync}
            atomic_write_text(self.out / "summary.json", json.dumps(summary, indent=2) + "\n")
        _on_rank0(self.d, write)
        return TrainResult(self.model, self.history, self.best_acc, self.out, in_sync, self.d.main,
                           epochs=len(self.records), best_epoch=best_epoch, last_acc=last_acc)


@contextlib.contextmanager
def _catch_sigint(job: _Run) -> Iterator[None]:
    """For the block, SIGINT (Ctrl-C) sets ``job.interrupted`` (the loop finishes the step and
    writes ``last.pt``); a second one raises ``KeyboardInterrupt`` at once. Only the main thread
    may set a signal handler; elsewhere the block runs with the handler it had."""
    def on_sigint(signum, frame):
        if job.interrupted:  # second Ctrl-C: give up at once
            raise KeyboardInterrupt
        job.interrupted = True

    old_handler = signal.signal(signal.SIGINT, on_sigint) if _in_main_thread() else None
    try:
        yield
    finally:
        if old_handler is not None:
            signal.signal(signal.SIGINT, old_handler)


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _progress(it, enabled: bool, desc: str, total: int, initial: int):
    if not enabled:
        return it
    return tqdm(it, desc=desc, total=total, initial=initial, leave=False, dynamic_ncols=True,
                disable=None)  # None: a bar on a terminal only, no residue in a log file


def _certify_line(test_set) -> str:
    """What ``--certify``'s metrics measure, said once before the epochs' lines."""
    std = min(test_set.std)
    return (f"certify: cert_acc@EPS = certified accuracy at pixel-l2 radius EPS (images in [0, 1]); the network sees "
            f"(x - mean) / std, min std {std:.4g}, so lipschitz_pixel = lipschitz_bound / {std:.4g}")


def _summary_line(rec: dict, epochs: int) -> str:
    extra = " ".join(f"{k}={v:.4g}" for k, v in rec.items()
                     if k not in {"epoch", "train_loss", "train_acc", "test_loss", "test_acc", "lr",
                                  "time_per_step", "steps"} and isinstance(v, (int, float)))
    return (f"epoch {rec['epoch']}/{epochs}  train loss {rec['train_loss']:.4f} acc {rec['train_acc']:.4f}  "
            f"test loss {rec['test_loss']:.4f} acc {rec['test_acc']:.4f}  "
            f"{1000 * rec['time_per_step']:.1f} ms/step" + (f"  {extra}" if extra else ""))
