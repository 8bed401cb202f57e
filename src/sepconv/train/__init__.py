"""The training engine behind ``sepconv train``.

One function, :func:`train`, runs a classification training from a :class:`TrainConfig`:

* SGD (momentum, optional Nesterov) or AdamW; a per-step learning-rate schedule (cosine,
  step at epoch milestones, or constant), with optional linear warm-up; weight decay on
  weights only (biases and normalization parameters are not decayed); optional label
  smoothing; channels_last memory format; a progress bar per epoch.
* A loss of the registry :data:`sepconv.losses.LOSSES` (``loss``: cross-entropy with a logit
  scale, the multi-class hinge, hinge-regularized Kantorovich-Rubinstein) and extra loss terms
  through :class:`Hooks` (``loss = that loss + sum of terms``): the
  BSConv-S orthonormal penalty, the Fantastic Four penalty, ... each reported by name in
  ``metrics.jsonl``; epoch-end hooks add their own metrics (``certify``: the certified accuracy at
  pixel-l2 radii of images in [0, 1], ...).
* Files in ``out``: ``metrics.jsonl`` (one line per epoch: losses, accuracies, lr, time
  per step), ``last.pt`` and ``best.pt`` (full checkpoints: model, optimizer, scheduler,
  RNG states, epoch and step, and the metrics of the epochs so far; ``best.pt`` of the epoch
  with the best test accuracy), and ``model/`` (the last epoch's model, as ``last.pt`` holds it,
  in a sepconv model directory: ``config.json`` + ``model.safetensors``; ``summary.json`` says
  its epoch and accuracy beside the best ones). Picking ``model/`` by test accuracy would make
  that accuracy optimistic: the datasets have no validation split.
  Every file is written atomically and honours the umask; at the end of an epoch ``best.pt``
  is written first, then ``last.pt``, then ``metrics.jsonl`` (rewritten from the checkpoint's
  metrics), so a crash or a full disk at any point leaves a ``last.pt`` that ``--resume``
  continues with no epoch lost or repeated in ``metrics.jsonl``.
* Nothing is lost: a run holds an exclusive lock on ``out/.lock`` for its whole length (a
  second run into the same ``out`` is refused); a fresh run refuses an ``out`` that holds a
  previous run (``last.pt``, ``best.pt``, ``model/``, ``metrics.jsonl``, ``summary.json``)
  unless ``resume=True`` continues it or ``force=True`` replaces it; ``out`` is proved
  writable before any work; temporary files a killed run left behind are removed. A loss or
  weights that become NaN or Inf stop the run with :class:`TrainingDiverged` and nothing of
  that epoch is saved (the last good ``last.pt`` stays).
* ``resume=True`` continues from ``last.pt`` exactly: the data order and augmentation of
  every step are functions of (seed, epoch, step), and every other source of randomness
  is restored, so an interrupted run that is resumed ends with bit-identical weights on
  the CPU. The checkpoint is checked entry by entry before any training (a
  :class:`~sepconv.errors.CheckpointError` names what is wrong), and the run's settings must
  match the checkpoint's except those in :data:`RESUME_MAY_CHANGE`. SIGINT (Ctrl-C) finishes
  the current step, writes ``last.pt`` and raises :class:`TrainingInterrupted` (the command
  line exits with status 130).
* Seeds may be any integer: each generator is seeded with the seed (mixed with the epoch and
  step) modulo 2**64 (numpy's modulo 2**32), so seeds that differ by a multiple of 2**64 give
  the same run.
* Under ``torchrun`` the model is wrapped in DistributedDataParallel (gloo on CPU, nccl on
  CUDA); every rank takes every ``world``-th sample of the same shuffled order, so the
  global batch equals a single-process batch of the same size; only rank 0 writes files.
  BatchNorm statistics are per rank, as usual with DDP (``sync_bn`` converts them on CUDA).

One module a concept: ``config`` (:class:`TrainConfig`, its checks), ``optim`` (loss, optimizer,
schedule), ``hooks`` (loss terms, epoch-end metrics, ``prepare``), ``model`` (building the model
and checking it fits the data and the memory budget), ``device`` (devices, :func:`evaluate`),
``rng`` (seeding and RNG states), ``output`` (the ``out`` directory and its lock), ``checkpoint``
(writing, reading and checking ``last.pt``), ``distributed`` (torchrun/DDP), ``outcome`` (how a
run ends) and ``run`` (:func:`train` and its loop).
"""

from __future__ import annotations

from .checkpoint import RESUME_MAY_CHANGE
from .config import OPTIMIZERS, SCHEDULES, TrainConfig
from .device import evaluate, resolve_device
from .hooks import EpochHook, Hooks, LossTerm, default_hooks
from .model import build_model
from .optim import classification_loss, lr_factor, make_optimizer
from .outcome import TrainingDiverged, TrainingInterrupted, TrainResult
from .output import LOCK_NAME, RUN_FILES
from .rng import SEED_MODULUS
from .run import train

__all__ = [
    "EpochHook",
    "Hooks",
    "LOCK_NAME",
    "LossTerm",
    "OPTIMIZERS",
    "RESUME_MAY_CHANGE",
    "RUN_FILES",
    "SCHEDULES",
    "SEED_MODULUS",
    "TrainConfig",
    "TrainResult",
    "TrainingDiverged",
    "TrainingInterrupted",
    "build_model",
    "classification_loss",
    "default_hooks",
    "evaluate",
    "lr_factor",
    "make_optimizer",
    "resolve_device",
    "train",
]
