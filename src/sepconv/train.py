"""The training engine behind ``sepconv train``.

One function, :func:`train`, runs a classification training from a :class:`TrainConfig`:

* SGD (momentum, optional Nesterov) or AdamW; a per-step learning-rate schedule (cosine,
  step at epoch milestones, or constant), with optional linear warm-up; weight decay on
  weights only (biases and normalization parameters are not decayed); optional label
  smoothing; channels_last memory format; a progress bar per epoch.
* Extra loss terms through :class:`Hooks` (``loss = cross-entropy + sum of terms``): the
  BSConv-S orthonormal penalty, the Fantastic Four penalty, ... each reported by name in
  ``metrics.jsonl``; epoch-end hooks add their own metrics (certified accuracy, ...).
* Files in ``out``: ``metrics.jsonl`` (one line per epoch: losses, accuracies, lr, time
  per step), ``last.pt`` and ``best.pt`` (full checkpoints: model, optimizer, scheduler,
  RNG states, epoch and step, and the metrics of the epochs so far), and ``model/`` (the
  final model as a sepconv model directory: ``config.json`` + ``model.safetensors``).
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
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import math
import os
import pickle
import random
import signal
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import CheckpointError, ConfigError, OutputError, WeightsError
from .guard import check_finite, os_reason, writable_dir
from .io import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    atomic_torch_save,
    atomic_write_text,
    read_head,
    remove_stale_temporaries,
    save_model,
)

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "step", "constant")


@dataclass
class TrainConfig:
    """Everything that defines a training run (saved in every checkpoint)."""

    model: str = "simple_cnn"
    conv: str = "regular"
    width: float = 1.0
    model_kwargs: dict = field(default_factory=dict)
    init: str | None = None  # a saved model directory to start from (fine-tuning)
    data: str = "digits"
    data_dir: str | None = None
    image_size: int | None = None
    train_images: int | None = None  # train on the first N images of the train split only (None: all)
    augment: bool = True
    epochs: int = 10
    batch_size: int = 32
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    milestones: tuple[int, ...] = ()  # epochs at which "step" multiplies the lr by gamma
    gamma: float = 0.1
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.0
    # training loss = cross_entropy(s * logits) / s (Bethune et al. 2022): for Lipschitz-bounded
    # networks, whose logits are small; the certificate always uses the raw logits
    logit_scale: float = 1.0
    channels_last: bool = True
    seed: int = 0
    device: str = "cpu"
    out: str = "runs/train"
    eval_batch_size: int = 500
    # regularizers and certification (issues 3 and 5)
    bsconv_alpha: float = 0.0
    sn: str | None = None  # spectral normalization method (sepconv.normalize.METHODS)
    sn_target: float = 1.0
    sn_mode: str = "clip"
    sn_batchnorm: bool = False
    ff_beta: float = 0.0  # weight of the Fantastic Four penalty (sum of the per-conv bounds)
    certify: tuple[float, ...] = ()  # l2 radii: Lipschitz bound and certified accuracy after each epoch
    extra: dict = field(default_factory=dict)  # room for later options (kept in checkpoints)

    def validate(self) -> TrainConfig:
        def bad(msg: str):
            raise ConfigError(msg)

        if not (isinstance(self.epochs, int) and self.epochs >= 1):
            bad(f"epochs must be a positive integer, got {self.epochs!r}")
        if not (isinstance(self.batch_size, int) and self.batch_size >= 1):
            bad(f"batch_size must be a positive integer, got {self.batch_size!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            bad(f"lr must be a positive finite number, got {self.lr!r}")
        if not (0 <= self.momentum < 1):
            bad(f"momentum must be in [0, 1), got {self.momentum!r}")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            bad(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if not (0 <= self.label_smoothing < 1):
            bad(f"label_smoothing must be in [0, 1), got {self.label_smoothing!r}")
        if not (isinstance(self.logit_scale, (int, float)) and math.isfinite(self.logit_scale)
                and self.logit_scale > 0):
            bad(f"logit_scale must be a positive finite number, got {self.logit_scale!r}")
        if self.optimizer not in OPTIMIZERS:
            bad(f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            bad(f"unknown schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        if self.schedule == "step" and not self.milestones:
            bad("schedule 'step' needs milestones (epochs at which the lr is multiplied by gamma)")
        if any(not (0 < m) for m in self.milestones):
            bad(f"milestones must be positive epochs, got {list(self.milestones)}")
        if not (0 < self.gamma <= 1):
            bad(f"gamma must be in (0, 1], got {self.gamma!r}")
        if not (0 <= self.warmup_epochs < self.epochs or self.warmup_epochs == 0):
            bad(f"warmup_epochs must be in [0, epochs), got {self.warmup_epochs!r}")
        if self.train_images is not None and not (isinstance(self.train_images, int) and self.train_images >= 1):
            bad(f"train_images must be a positive integer, got {self.train_images!r}")
        if self.image_size is not None and not (isinstance(self.image_size, int) and self.image_size >= 1):
            bad(f"image_size must be a positive integer, got {self.image_size!r}")
        if not (self.bsconv_alpha >= 0):
            bad(f"bsconv_alpha must be >= 0, got {self.bsconv_alpha!r}")
        from .normalize import METHODS as SN_METHODS
        from .normalize import MODES as SN_MODES

        if self.sn is not None and self.sn not in SN_METHODS:
            bad(f"unknown spectral normalization {self.sn!r}; choose one of {', '.join(SN_METHODS)}")
        if not (isinstance(self.sn_target, (int, float)) and math.isfinite(self.sn_target) and self.sn_target > 0):
            bad(f"sn_target must be a positive finite number, got {self.sn_target!r}")
        if self.sn_mode not in SN_MODES:
            bad(f"sn_mode must be one of {', '.join(SN_MODES)}, got {self.sn_mode!r}")
        if self.sn_batchnorm and self.sn is None:
            bad("sn_batchnorm needs a spectral normalization method (sn)")
        if not (self.ff_beta >= 0 and math.isfinite(self.ff_beta)):
            bad(f"ff_beta must be >= 0, got {self.ff_beta!r}")
        if any(not (isinstance(e, (int, float)) and math.isfinite(e) and e >= 0) for e in self.certify):
            bad(f"certify radii must be finite and >= 0, got {list(self.certify)}")
        if not (self.eval_batch_size >= 1):
            bad(f"eval_batch_size must be positive, got {self.eval_batch_size!r}")
        return self

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["milestones"] = list(self.milestones)
        d["certify"] = list(self.certify)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in names}
        for key in ("milestones", "certify"):
            if key in d:
                d[key] = tuple(d[key])
        return cls(**d)


# ----------------------------------------------------------------------------- hooks

LossTerm = Callable[[nn.Module], Tensor]
EpochHook = Callable[[nn.Module, int], dict]


@dataclass
class Hooks:
    """Extension points for later features.

    ``loss_terms``: name -> f(model) returning a 0-dim tensor added to the loss each step
    (the model passed is the bare model, not the DDP wrapper); its epoch mean is logged
    under ``loss_<name>``. ``epoch_end``: f(model, epoch) -> dict of extra metrics, run on
    rank 0 in eval mode after the test evaluation. ``prepare``: f(model) -> model, applied
    once after the model is built and before the optimizer sees its parameters (e.g.
    spectral normalization); it must be deterministic so that resuming rebuilds the same
    structure.
    """

    loss_terms: dict[str, LossTerm] = field(default_factory=dict)
    epoch_end: list[EpochHook] = field(default_factory=list)
    prepare: list[Callable[[nn.Module], nn.Module]] = field(default_factory=list)


def default_hooks(cfg: TrainConfig, input_shape: tuple[int, int, int] | None = None, test_set=None,
                  device: torch.device | str = "cpu") -> Hooks:
    """Hooks implied by the config's options (regularizers known to sepconv).

    ``input_shape`` ``(C, H, W)`` of the data is needed by spectral normalization (``sn``), the
    Fantastic Four penalty (``ff_beta``) and certification (``certify``), which also needs the
    ``test_set`` (and the ``device`` the model lives on)."""
    hooks = Hooks()
    if cfg.bsconv_alpha > 0:
        from .layers import orthonormal_penalty

        alpha = cfg.bsconv_alpha
        hooks.loss_terms["bsconv"] = lambda m: orthonormal_penalty(m, alpha=alpha)
    if (cfg.sn or cfg.ff_beta > 0 or cfg.certify) and input_shape is None:
        raise ConfigError("default_hooks: sn, ff_beta and certify need the data's input_shape (C, H, W)")
    if cfg.sn:
        hooks.prepare.append(_sn_prepare(cfg, tuple(input_shape)))
    if cfg.ff_beta > 0:
        record, term = _fantastic_four_penalty(cfg.ff_beta, tuple(input_shape))
        hooks.prepare.append(record)
        hooks.loss_terms["ff"] = term
    if cfg.certify:
        if test_set is None:
            raise ConfigError("default_hooks: certify needs the test set")
        hooks.epoch_end.append(_certify_hook(cfg, tuple(input_shape), test_set, device))
    return hooks


def _sn_prepare(cfg: TrainConfig, input_shape: tuple[int, int, int]) -> Callable[[nn.Module], nn.Module]:
    def prepare(model: nn.Module) -> nn.Module:
        from .normalize import spectral_normalize

        spectral_normalize(model, cfg.sn, cfg.sn_target, cfg.sn_mode, in_size=input_shape, batchnorm=cfg.sn_batchnorm)
        return model
    return prepare


def _fantastic_four_penalty(beta: float, input_shape: tuple[int, int, int]):
    """``beta * sum_l F4(W_l)`` over the model's Conv2d layers: Singla & Feizi (ICLR 2021, arXiv
    1911.10258, Sec. 5) penalize the sum of the layers' Fantastic Four bounds (differentiable).
    The layers' geometries are recorded once, by a ``prepare`` hook (one dry forward pass)."""
    convs: list[tuple[nn.Module, object]] = []

    def record(model: nn.Module) -> nn.Module:
        from .spectral import ConvSpec
        from .spectral.network import layer_inputs

        convs.clear()
        for mod, shape in layer_inputs(model, input_shape, types=(nn.Conv2d,)).values():
            if not isinstance(mod, nn.modules.conv._ConvTransposeNd):
                convs.append((mod, ConvSpec.of(mod, shape[-2:])))
        return model

    def term(model: nn.Module) -> Tensor:
        from .normalize import frozen_state
        from .spectral import fantastic_four

        with frozen_state():  # the forward pass already advanced any spectral normalization's state
            return beta * sum(fantastic_four(mod.weight, spec) for mod, spec in convs)
    return record, term


def _certify_hook(cfg: TrainConfig, input_shape: tuple[int, int, int], test_set, device) -> EpochHook:
    """After each epoch: the certified network Lipschitz bound (``lipschitz_bound``, method ``fft``)
    and the certified accuracy at each radius of ``cfg.certify`` (Tsuzuku et al. 2018) on the test set."""

    def batches():
        idx = torch.arange(len(test_set))
        for i in range(0, len(idx), cfg.eval_batch_size):
            x, y = test_set.get_batch(idx[i:i + cfg.eval_batch_size])
            yield _to_device(x, y, device, cfg.channels_last)

    def hook(model: nn.Module, epoch: int) -> dict:
        from .spectral import certified_radii, lipschitz_bound

        L = lipschitz_bound(model, input_shape, method="fft")
        radii, _ = certified_radii(model, batches(), lipschitz=L)
        return {"lipschitz_bound": L,
                **{f"cert_acc@{eps:g}": float((radii > eps).double().mean()) for eps in cfg.certify}}
    return hook


class TrainingInterrupted(KeyboardInterrupt):
    """Raised after SIGINT once the checkpoint is safely written (by rank 0 under torchrun:
    ``checkpoint`` is ``None`` on the other ranks)."""

    def __init__(self, checkpoint: Path | None):
        super().__init__(f"interrupted; checkpoint written to {checkpoint}" if checkpoint is not None
                         else "interrupted; rank 0 wrote the checkpoint")
        self.checkpoint = checkpoint


class TrainingDiverged(ConfigError):
    """The loss, a metric or the weights became NaN or Inf. Nothing of the epoch in which it
    happened is saved; the last good ``last.pt`` (if any) is kept."""


@dataclass
class TrainResult:
    model: nn.Module
    history: list[dict]
    best_acc: float
    out: Path
    ranks_in_sync: bool | None = None  # under DDP: parameters bit-identical on every rank
    is_main: bool = True  # rank 0 (the process that writes files and prints the final lines)


# ----------------------------------------------------------------------------- pieces


def lr_factor(cfg: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """Learning-rate multiplier at a global step (warm-up, then the schedule)."""
    epoch = step / steps_per_epoch
    if cfg.warmup_epochs > 0 and epoch < cfg.warmup_epochs:
        return (step + 1) / (cfg.warmup_epochs * steps_per_epoch)
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "step":
        return cfg.gamma ** sum(epoch >= m for m in cfg.milestones)
    total = cfg.epochs * steps_per_epoch
    warm = cfg.warmup_epochs * steps_per_epoch
    t = min(1.0, (step - warm) / max(1.0, total - warm))
    return 0.5 * (1.0 + math.cos(math.pi * t))


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim > 1 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    groups = _param_groups(model, cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0)
    return torch.optim.AdamW(groups, lr=cfg.lr)


def classification_loss(logits: Tensor, y: Tensor, label_smoothing: float = 0.0, logit_scale: float = 1.0) -> Tensor:
    """``cross_entropy(s * logits, y) / s``: plain cross-entropy at ``s = 1``. For a network with a
    small Lipschitz bound (spectrally normalized, BatchNorm bounded) the logits, and so the
    softmax's gradients, are small; a scale ``s > 1`` (the temperature ``tau`` of Bethune et al.
    2022, "Pay attention to your loss") lets it reach large margins, which is what the
    Lipschitz-margin certificate (Tsuzuku et al. 2018) needs. Dividing by ``s`` keeps the
    gradient's size; as ``s`` grows the loss tends to a multi-class hinge on the margin."""
    if logit_scale == 1.0:
        return F.cross_entropy(logits, y, label_smoothing=label_smoothing)
    return F.cross_entropy(logits * logit_scale, y, label_smoothing=label_smoothing) / logit_scale


#: Generators are seeded modulo this (torch's seed range); any integer is a valid ``seed``.
SEED_MODULUS = 2**64


def _epoch_order(n: int, seed: int, epoch: int) -> Tensor:
    g = torch.Generator().manual_seed((seed * 100_003 + epoch) % SEED_MODULUS)
    return torch.randperm(n, generator=g)


def _step_generator(seed: int, epoch: int, step: int, rank: int) -> torch.Generator:
    return torch.Generator().manual_seed((((seed * 1_000_003 + epoch) * 1_000_003 + step) * 257 + rank) % SEED_MODULUS)


def _seed_everything(seed: int) -> None:
    """Seed torch, numpy and Python's ``random`` from any integer (torch and numpy take it modulo
    their seed ranges; torch maps a negative seed onto the same value modulo 2**64 itself)."""
    torch.manual_seed(seed % SEED_MODULUS)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def _rng_state() -> dict:
    st = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    np.random.set_state(st["numpy"])
    random.setstate(st["python"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def _checkpoint_safe(obj):
    """numpy/python RNG states as plain lists so that ``torch.load(weights_only=True)`` reads them."""
    if isinstance(obj, dict):
        return {k: _checkpoint_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_checkpoint_safe(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj.copy())
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def _rng_native(st, bad: Callable[[str], None]) -> dict:
    """The RNG states of a checkpoint (as :func:`_checkpoint_safe` stored them) in the form the
    generators take, each tried on a throw-away generator first; ``bad(msg)`` raises."""
    for key in ("torch", "numpy", "python"):
        if key not in st:
            bad(f"'rng' has no {key!r} state")
    t = st["torch"]
    want = torch.get_rng_state()
    if not (isinstance(t, Tensor) and t.dtype == torch.uint8 and t.shape == want.shape):
        bad(f"'rng' torch state is not a generator state (a uint8 tensor of {want.numel()} bytes), got "
            + (f"{t.dtype} {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__))
    try:
        torch.Generator().set_state(t)
        n = st["numpy"]
        numpy_state = (str(n[0]), np.asarray(n[1], dtype=np.uint32), int(n[2]), int(n[3]), float(n[4]))
        np.random.RandomState().set_state(numpy_state)
    except (TypeError, ValueError, IndexError, KeyError, OverflowError, RuntimeError) as e:
        bad(f"'rng' numpy or torch state is malformed ({_one_line(e)[:120]})")
    try:
        py = st["python"]
        python_state = (int(py[0]), tuple(int(v) for v in py[1]), None if py[2] is None else float(py[2]))
        random.Random().setstate(python_state)
    except (TypeError, ValueError, IndexError, KeyError, OverflowError) as e:
        bad(f"'rng' python state is malformed ({_one_line(e)[:120]})")
    out = {"torch": t, "numpy": numpy_state, "python": python_state}
    if "cuda" in st:
        if not (isinstance(st["cuda"], (list, tuple)) and all(isinstance(c, Tensor) for c in st["cuda"])):
            bad("'rng' cuda state is not a list of generator states")
        out["cuda"] = list(st["cuda"])
    return out


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


# ----------------------------------------------------------------------------- distributed


@dataclass(frozen=True)
class _Dist:
    rank: int = 0
    world: int = 1
    owned: bool = False  # this module created the process group (and so destroys it when train() ends)

    @property
    def main(self) -> bool:
        return self.rank == 0


def _init_distributed(device: torch.device) -> _Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    import torch.distributed as dist

    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return _Dist(dist.get_rank(), dist.get_world_size(), owned)


def _close_process_group() -> None:
    """Meet every rank, then destroy the process group: a rank that destroyed its gloo connections
    while another was still using them aborted both ("terminate called without an active
    exception"). The barrier is bounded, so a rank that died cannot hang the others here."""
    from datetime import timedelta

    import torch.distributed as dist

    with contextlib.suppress(RuntimeError):
        dist.monitored_barrier(timeout=timedelta(seconds=120))
    dist.destroy_process_group()


def _all_reduce_sum(values: list[float], d: _Dist) -> list[float]:
    if d.world == 1:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def _any_rank(flag: bool, d: _Dist) -> bool:
    return _all_reduce_sum([float(flag)], d)[0] > 0 if d.world > 1 else flag


def _params_digest(model: nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(model: nn.Module, data, batch_size: int = 500, device: torch.device | str = "cpu",
             channels_last: bool = False, d: _Dist = _Dist()) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of ``model`` on ``data`` (all ranks together)."""
    was = model.training
    model.eval()
    idx = torch.arange(d.rank, len(data), d.world)
    loss_sum, correct = 0.0, 0.0
    for i in range(0, len(idx), batch_size):
        x, y = data.get_batch(idx[i:i + batch_size])
        x, y = _to_device(x, y, device, channels_last)
        logits = model(x)
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
    model.train(was)
    loss_sum, correct, n = _all_reduce_sum([loss_sum, correct, float(len(idx))], d)
    return loss_sum / max(n, 1), correct / max(n, 1)


def resolve_device(name: str) -> torch.device:
    """``cpu``, ``cuda``, ``cuda:N``, ``mps`` or ``auto`` (CUDA when present, else CPU) as a
    ``torch.device``; a clear :class:`ConfigError` for a malformed name or a device this
    machine does not have."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"device {name!r} is not a device name (cpu, cuda, cuda:N, mps or auto)") from None
    if dev.type == "cuda" and not (torch.cuda.is_available() and (dev.index or 0) < torch.cuda.device_count()):
        raise ConfigError(f"device {name!r} is not available on this machine "
                          f"({torch.cuda.device_count()} CUDA devices); use --device cpu")
    if dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ConfigError(f"device {name!r} is not available on this machine; use --device cpu")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"device {name!r} is not supported (cpu, cuda, cuda:N, mps or auto)")
    return dev


def _to_device(x: Tensor, y: Tensor, device, channels_last: bool) -> tuple[Tensor, Tensor]:
    x = x.to(device, non_blocking=True)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y.to(device, non_blocking=True)


# ----------------------------------------------------------------------------- the model


def build_model(cfg: TrainConfig, num_classes: int, in_chans: int, hooks: Hooks,
                trust_code: bool = False) -> nn.Module:
    """The model a run trains: a saved model (``init``) or a registry model, then ``prepare`` hooks.

    ``trust_code``: let ``init``'s ``config.json`` name a factory to import and run (refused by
    default; see :func:`sepconv.io.build_from_config`). ``model_kwargs`` may not set what the run
    sets itself (the data's ``num_classes`` and ``in_chans``, ``conv``, ``width``, the model
    ``name``) to another value: a :class:`ConfigError` names both values; nor may it be given
    with ``init`` (the directory's ``config.json`` defines the model)."""
    from .io import load_model
    from .models import create_model

    if cfg.init:
        if cfg.model_kwargs:
            key = next(iter(cfg.model_kwargs))
            raise ConfigError(f"--model-arg {key}={cfg.model_kwargs[key]!r:.40} does not apply with --init {cfg.init} "
                              "(the directory's config.json defines the model)")
        model = load_model(cfg.init, trust_code=trust_code)
    else:
        kwargs = dict(cfg.model_kwargs)
        own = {"num_classes": (num_classes, f"the {num_classes} classes of the data ({cfg.data})"),
               "in_chans": (in_chans, f"the {in_chans} input channels of the data ({cfg.data})"),
               "conv": (cfg.conv, f"--conv {cfg.conv}"), "width": (cfg.width, f"--width {cfg.width:g}"),
               "name": (cfg.model, f"--model {cfg.model}")}
        for key, (value, what) in own.items():
            if key in kwargs:
                if not (type(kwargs[key]) in (int, float, str) and kwargs[key] == value):
                    raise ConfigError(f"--model-arg {key}={kwargs[key]!r:.40} clashes with {what}")
                del kwargs[key]  # the same value twice: harmless
        model = create_model(cfg.model, num_classes=num_classes, in_chans=in_chans, conv=cfg.conv,
                             width=cfg.width, **kwargs)
    for prep in hooks.prepare:
        model = prep(model)
    return model


def _model_io(model: nn.Module, input_shape: tuple[int, int, int]) -> tuple[int | None, int | None]:
    """(input channels of the first Conv2d, classes of the output) of ``model``; the classes from a
    forward pass on the ``meta`` device (shapes only), else the last Linear layer. ``None`` where
    the model does not say."""
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    chans = first.in_channels if first is not None else None
    classes = None
    if chans in (None, input_shape[0]):
        was = model.training
        try:
            meta = {k: torch.empty_like(v, device="meta") for k, v in
                    [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]}
            with torch.no_grad():
                y = torch.func.functional_call(model.eval(), meta, (torch.empty((2, *input_shape), device="meta"),),
                                               strict=False, tie_weights=True)
            if isinstance(y, Tensor) and y.ndim == 2:
                classes = int(y.shape[1])
        except Exception:  # noqa: BLE001 -- a model that cannot run on meta: ask its last layer
            pass
        finally:
            model.train(was)
    if classes is None:
        last = [m for m in model.modules() if isinstance(m, nn.Linear)]
        classes = last[-1].out_features if last else None
    return chans, classes


def _check_fits_data(model: nn.Module, cfg: TrainConfig, num_classes: int, input_shape: tuple[int, int, int]) -> None:
    """A :class:`ConfigError` naming both numbers when the model's input channels or classes are
    not the data's (an ``init`` directory made for other data)."""
    src = f"--init {cfg.init}" if cfg.init else f"model {cfg.model!r}"
    chans, classes = _model_io(model, input_shape)
    if chans is not None and chans != input_shape[0]:
        raise ConfigError(f"{src} takes {chans} input channels, but the data ({cfg.data}) has {input_shape[0]}")
    if classes is not None and classes != num_classes:
        raise ConfigError(f"{src} has {classes} output classes, but the data ({cfg.data}) has {num_classes}")


def _check_step_memory(model: nn.Module, cfg: TrainConfig, input_shape: tuple[int, int, int], batch: int,
                       eval_batch: int) -> None:
    """Refuse (:class:`~sepconv.errors.ResourceError`, with the estimate) a run whose training step
    would need more than the memory budget: the activations a forward pass keeps for the backward
    (:func:`sepconv.guard.forward_memory`, on the ``meta`` device), or those of an evaluation
    batch, plus the weights, their gradients and the optimizer's state. An estimate (the backward
    pass's transient buffers are not counted), meant to refuse what cannot fit, not to be tight."""
    from .guard import check_memory, format_bytes, forward_memory, model_bytes

    with torch.random.fork_rng(devices=[]):  # the estimate must not move the run's random streams
        act = forward_memory(model, input_shape, batch, training=True)
        ev = forward_memory(model, input_shape, eval_batch, training=False)
    if act is None and ev is None:
        return
    states = {"sgd": 1 if cfg.momentum > 0 else 0, "adamw": 2}[cfg.optimizer]
    weights = model_bytes(model)
    need = max(act or 0, ev or 0) + weights * (2 + states)
    shape = "x".join(map(str, input_shape))
    check_memory(need, f"a training step (batch {batch} of {shape} images: activations "
                       f"{format_bytes(max(act or 0, ev or 0))}, weights, gradients and optimizer state "
                       f"{format_bytes(weights * (2 + states))})",
                 hint="lower --batch-size, --image-size or --width")


# ----------------------------------------------------------------------------- the output directory

#: What a run writes into ``out`` (``model`` is a directory). A fresh run refuses an ``out`` that
#: holds any of them, unless ``force=True``.
RUN_FILES = ("last.pt", "best.pt", "metrics.jsonl", "summary.json", "model")
LOCK_NAME = ".lock"


@contextlib.contextmanager
def _run_lock(out: Path):
    """Hold an exclusive ``flock`` on ``out/.lock`` for the block (the kernel releases it when the
    process ends, however it ends); :class:`OutputError` naming ``out`` when another run holds it."""
    path = out / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        raise OutputError(f"{path}: cannot create the run's lock file ({os_reason(e)})") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            who = f" (pid {holder})" if holder.isdigit() else ""
            raise OutputError(f"--out {out}: another run{who} holds it ({path} is locked); wait for that run "
                              "to end or choose another --out") from None
        except OSError as e:
            raise OutputError(f"{path}: cannot lock the output directory ({os_reason(e)})") from None
        with contextlib.suppress(OSError):  # who holds it, for a second run's message (a full disk may refuse)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield path
    finally:
        os.close(fd)


def _claim_output(out: Path, resume: bool, force: bool, held: contextlib.ExitStack) -> None:
    """Before any work: ``out`` is a writable directory, this run holds its lock (kept in ``held``),
    nothing is in the way of the run's files, a fresh run does not silently replace a previous one,
    and temporary files a killed run left are gone."""
    writable_dir(out, "--out")
    held.enter_context(_run_lock(out))
    for name in (*RUN_FILES, "train_config.json"):
        p = out / name
        if name == "model" and p.exists() and not p.is_dir():
            raise OutputError(f"{p}: is in the way of the run's model directory (it is a file)")
        if name != "model" and p.is_dir():
            raise OutputError(f"{p}: is in the way of the run's {name} (it is a directory)")
    if not resume and not force:
        there = [f"{n}/" if n == "model" else n for n in RUN_FILES if (out / n).exists()]
        if there:
            raise OutputError(f"--out {out}: holds a previous run ({', '.join(there)}); continue it with --resume "
                              "or replace it with --force")
    for directory in (out, out / "model"):
        if directory.is_dir():
            remove_stale_temporaries(directory)


def _remove_previous_run(out: Path) -> None:
    """``force=True``: the previous run's files go before the new run writes its own (never a mix)."""
    for p in [out / n for n in RUN_FILES if n != "model"] + [out / "model" / CONFIG_NAME, out / "model" / WEIGHTS_NAME]:
        try:
            p.unlink()
        except FileNotFoundError:
            pass
        except OSError as e:
            raise OutputError(f"{p}: cannot remove the previous run's file ({os_reason(e)})") from None
    with contextlib.suppress(OSError):  # left in place when it holds files of the user's
        (out / "model").rmdir()


def _jsonl(records: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def _on_rank0(d: _Dist, fn: Callable[[], object]) -> None:
    """Run ``fn`` (file work) on rank 0 only; an exception there is raised on every rank, so that no
    rank waits in a collective for a rank that gave up."""
    err = None
    if d.main:
        try:
            fn()
        except Exception as e:  # noqa: BLE001 -- re-raised below, on every rank
            err = e
    if d.world > 1:
        import torch.distributed as dist

        box = [err]
        if err is not None:
            try:
                pickle.dumps(err)
            except Exception:  # noqa: BLE001
                box = [RuntimeError(f"rank 0: {type(err).__name__}: {_one_line(err)}")]
        dist.broadcast_object_list(box, src=0)
        if not d.main and box[0] is not None:
            raise box[0]
    if err is not None:
        raise err


# ----------------------------------------------------------------------------- checkpoints

#: Settings a resumed run may change; every other :class:`TrainConfig` field must match the
#: checkpoint's, since ``--resume`` continues the same run (its model, data, order of samples,
#: optimizer and loss). ``epochs`` may grow (or shrink to no less than the checkpoint's epoch; the
#: cosine schedule stretches from there); ``out`` and ``data_dir`` may move; ``device``,
#: ``channels_last`` and ``eval_batch_size`` change how, not what, is computed; ``certify`` and
#: ``extra`` only add measurements. A different setting is a new run: ``--force`` (or ``--init``
#: from the run's ``model/``).
RESUME_MAY_CHANGE = frozenset({"epochs", "out", "data_dir", "device", "channels_last", "eval_batch_size",
                               "certify", "extra"})

#: Entries of a checkpoint and what each must be.
_CHECKPOINT_ENTRIES = {"config": (dict, "a dict"), "model": (dict, "a state dict"),
                       "optimizer": (dict, "an optimizer state dict"), "scheduler": (dict, "a scheduler state dict"),
                       "rng": (dict, "a dict of RNG states"), "epoch": (int, "an integer"),
                       "step": (int, "an integer"), "best_acc": ((int, float), "a number")}


def _read_checkpoint(path: Path) -> dict:
    """A checkpoint read with ``torch.load(weights_only=True)``: tensors, numbers, strings, lists and
    dicts only; a file that needs more (a pickled object, a code payload) is refused unread."""
    head = read_head(path, "checkpoint", 4, CheckpointError, missing="no checkpoint to resume from")
    if not head:
        raise CheckpointError(f"{path}: is empty, not a checkpoint")
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):
        raise CheckpointError(f"{path}: not a torch checkpoint (it starts with {head!r})")
    try:
        with warnings.catch_warnings():  # torch warns about a foreign pickle protocol: the error says enough
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path}: refused to load: the file needs arbitrary unpickling, which can run code "
                              f"(a checkpoint holds tensors, numbers, strings, lists and dicts; "
                              f"{_one_line(e)[:100]})") from None
    except Exception as e:  # noqa: BLE001 -- zip, EOF and format errors of a damaged file
        raise CheckpointError(f"{path}: not a readable checkpoint ({_one_line(e)[:160]})") from None


def _equal(a, b) -> bool:
    try:
        return bool(a == b) and type(a) is not Tensor
    except Exception:  # noqa: BLE001 -- a value that does not compare (a tensor in a hostile config)
        return False


def _check_checkpoint(state, path: Path, cfg: TrainConfig, steps_per_epoch: int, loss_terms) -> dict:
    """Check a checkpoint's entries against the run before anything is built; returns what the
    run resumes from (``epoch``, ``step``, ``best_acc``, ``running``, ``records``, ``rng``).
    :class:`CheckpointError` naming ``path`` and the entry otherwise."""
    def bad(msg: str):
        raise CheckpointError(f"{path}: {msg}")

    if not isinstance(state, dict):
        bad(f"not a training checkpoint (it holds a {type(state).__name__}, not a dict)")
    missing = [k for k in _CHECKPOINT_ENTRIES if k not in state]
    if missing:
        bad(f"not a complete training checkpoint: no {', '.join(map(repr, missing))} "
            f"entr{'y' if len(missing) == 1 else 'ies'}")
    for key, (types, what) in _CHECKPOINT_ENTRIES.items():
        v = state[key]
        if isinstance(v, bool) or not isinstance(v, types):
            bad(f"{key!r} must be {what}, got {type(v).__name__} {v!r:.40}")
    try:
        old = TrainConfig.from_dict(state["config"])
    except (TypeError, ValueError) as e:
        bad(f"'config' is malformed ({_one_line(e)[:120]})")
    for f in dataclasses.fields(TrainConfig):
        a, b = getattr(old, f.name), getattr(cfg, f.name)
        if f.name not in RESUME_MAY_CHANGE and not _equal(a, b):
            bad(f"the checkpoint was trained with {f.name}={a!r:.60}, not {b!r:.60} (--resume continues the "
                f"same run: only {', '.join(sorted(RESUME_MAY_CHANGE))} may change; --force starts afresh)")
    epoch, step = state["epoch"], state["step"]
    if epoch < 0:
        bad(f"'epoch' is {epoch}: not a number of finished epochs")
    if epoch > cfg.epochs or (epoch == cfg.epochs and step > 0):
        bad(f"the checkpoint is at epoch {epoch}{f' step {step}' if step else ''}, past --epochs {cfg.epochs} "
            f"(resume with --epochs {epoch + (step > 0)} or more)")
    if not 0 <= step <= steps_per_epoch:
        bad(f"'step' is {step}, outside the {steps_per_epoch} steps of an epoch (0..{steps_per_epoch})")
    best = state["best_acc"]
    if not (math.isfinite(best) and -1 <= best <= 1):
        bad(f"'best_acc' is {best!r}, not an accuracy")
    running = state.get("running")
    if step == 0:
        running = None
    else:
        need = ("loss", "correct", "n", "time", "steps", *(f"loss_{k}" for k in loss_terms))
        if not (isinstance(running, dict) and all(
                isinstance(running.get(k), (int, float)) and not isinstance(running.get(k), bool)
                and math.isfinite(running[k]) and running[k] >= 0 for k in need)):
            bad(f"'running' (the sums of the epoch's first {step} steps) is missing or malformed")
        if running["steps"] != step:
            bad(f"'running' counts {running['steps']!r} steps, but 'step' is {step}")
        running = {k: running[k] for k in need}
    records = state.get("history")
    if records is not None:
        if not (isinstance(records, list) and len(records) == epoch
                and all(isinstance(r, dict) and r.get("epoch") == i + 1 for i, r in enumerate(records))):
            bad(f"'history' does not hold the metrics of epochs 1..{epoch}")
        try:
            json.dumps(records)
        except (TypeError, ValueError) as e:
            bad(f"'history' is not plain numbers and text ({_one_line(e)[:80]})")
    rng = _rng_native(state["rng"], bad)
    return {"epoch": epoch, "step": step, "best_acc": float(best), "running": running, "records": records,
            "rng": rng}


def _metrics_upto(path: Path, epoch: int) -> list[dict]:
    """The complete lines of ``metrics.jsonl`` for epochs 1..``epoch`` (a checkpoint without its own
    metrics): what a crash after the metrics but before the checkpoint wrote is cut off."""
    records = []
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return records
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            break
        if not (isinstance(rec, dict) and rec.get("epoch") == len(records) + 1 and len(records) < epoch):
            break
        records.append(rec)
    return records


def _load_checkpoint(state: dict, path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                     scheduler, global_step: int) -> None:
    """Load the model, optimizer and scheduler states, each checked against what this run built;
    :class:`CheckpointError` naming the entry (and the key) that does not fit."""
    from .io import load_weights_into

    def bad(msg: str):
        raise CheckpointError(f"{path}: {msg}")

    sd = state["model"]
    wrong = next((k for k, v in sd.items() if not (isinstance(k, str) and isinstance(v, Tensor))), None)
    if wrong is not None:
        bad(f"'model' entry {wrong!r:.60} is not a named tensor")
    try:
        load_weights_into(model, sd, source=f"{path}: 'model'")
        check_finite(model, f"{path}: 'model'")
    except (WeightsError, ConfigError) as e:
        raise CheckpointError(str(e)) from None
    opt = state["optimizer"]
    if not (isinstance(opt.get("state"), dict) and isinstance(opt.get("param_groups"), list)):
        bad("'optimizer' is not an optimizer state dict (it needs 'state' and 'param_groups')")
    try:
        optimizer.load_state_dict(opt)
    except (ValueError, KeyError, TypeError, RuntimeError, IndexError, AttributeError) as e:
        bad(f"'optimizer' does not fit this run's {type(optimizer).__name__} ({_one_line(e)[:120]})")
    names = {id(p): n for n, p in model.named_parameters()}
    for group in optimizer.param_groups:
        for key, v in group.items():
            if key != "params" and isinstance(v, float) and not math.isfinite(v):
                bad(f"'optimizer' has {key}={v}")
        for p in group["params"]:
            for key, v in optimizer.state.get(p, {}).items():
                if isinstance(v, Tensor):
                    if v.ndim and v.shape != p.shape:
                        bad(f"'optimizer' state {key!r} of {names.get(id(p), '?')} has shape {tuple(v.shape)}, "
                            f"the parameter {tuple(p.shape)}")
                    if v.is_floating_point() and not torch.isfinite(v).all():
                        bad(f"'optimizer' state {key!r} of {names.get(id(p), '?')} holds NaN or Inf")
                elif not (v is None or isinstance(v, (int, float))):
                    bad(f"'optimizer' state {key!r} of {names.get(id(p), '?')} is a {type(v).__name__}")
    sch, own = state["scheduler"], scheduler.state_dict()
    unknown = [k for k in sch if k not in own]
    if unknown:
        bad(f"'scheduler' has an entry {unknown[0]!r:.60} a {type(scheduler).__name__} does not have")
    if sch.get("last_epoch") != global_step or isinstance(sch.get("last_epoch"), bool):
        bad(f"'scheduler' is at step {sch.get('last_epoch')!r:.40}, but the checkpoint's epoch and step make "
            f"step {global_step}")
    base = sch.get("base_lrs", own["base_lrs"])
    if not (isinstance(base, list) and len(base) == len(own["base_lrs"]) and all(
            isinstance(b, (int, float)) and not isinstance(b, bool) and math.isfinite(b) and b >= 0 for b in base)):
        bad("'scheduler' base_lrs are not one finite learning rate per parameter group")
    if any(fn is not None for fn in sch.get("lr_lambdas", [])):
        bad("'scheduler' lr_lambdas must be empty (the schedule comes from the config)")
    for k, v in sch.items():
        if k not in ("base_lrs", "lr_lambdas", "_last_lr") and type(v) is not type(own[k]) and not (
                isinstance(v, (int, float)) and isinstance(own[k], (int, float))):
            bad(f"'scheduler' {k} is a {type(v).__name__}, not a {type(own[k]).__name__}")
    scheduler.load_state_dict(sch)


def _nonfinite_param(model: nn.Module) -> str | None:
    try:
        check_finite(model)
    except ConfigError as e:
        return str(e)
    return None


# ----------------------------------------------------------------------------- main loop


def train(cfg: TrainConfig, hooks: Hooks | None = None, resume: bool = False, progress: bool = True,
          stop_after_epochs: int | None = None, log: bool | None = None, force: bool = False,
          trust_code: bool = False) -> TrainResult:
    """Train ``cfg.model`` on ``cfg.data``; see the module docstring for what is written.

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


def _train_locked(cfg: TrainConfig, hooks: Hooks | None, resume: bool, force: bool, progress: bool,
                  stop_after_epochs: int | None, log: bool | None, trust_code: bool, device: torch.device, d: _Dist,
                  out: Path, ckpt_path: Path) -> TrainResult:
    """:func:`train` once this process holds ``out`` (rank 0) or rank 0 holds it (the other ranks)."""
    from .data import augment_batch, load_dataset

    train_set = load_dataset(cfg.data, cfg.data_dir, split="train", image_size=cfg.image_size)
    test_set = load_dataset(cfg.data, cfg.data_dir, split="test", image_size=cfg.image_size)
    input_shape = (train_set.in_chans, *train_set.image_size)
    if hooks is None:
        hooks = default_hooks(cfg, input_shape, test_set, device)
    local_batch = cfg.batch_size // d.world
    n_train = len(train_set) if cfg.train_images is None else min(len(train_set), cfg.train_images)
    per_rank = n_train // d.world
    steps_per_epoch = per_rank // local_batch
    if steps_per_epoch < 1:
        raise ConfigError(f"batch_size {cfg.batch_size} is larger than the {n_train} training images")

    state = resumed = None
    if resume:
        state = _read_checkpoint(ckpt_path)
        resumed = _check_checkpoint(state, ckpt_path, cfg, steps_per_epoch, hooks.loss_terms)

    _seed_everything(cfg.seed)
    model = build_model(cfg, train_set.num_classes, train_set.in_chans, hooks, trust_code=trust_code)
    _check_fits_data(model, cfg, train_set.num_classes, input_shape)
    eval_batch = min(cfg.eval_batch_size, max(1, -(-len(test_set) // d.world)))
    _check_step_memory(model, cfg, input_shape, local_batch, eval_batch)
    model = model.to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(cfg, model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(cfg, step, steps_per_epoch))

    start_epoch, start_step, best_acc, running, records = 0, 0, -1.0, None, []
    last_saved: tuple[int, int] | None = None  # (epoch, step) of the last.pt this run may fall back on
    if resumed is not None:
        _load_checkpoint(state, ckpt_path, model, optimizer, scheduler,
                         resumed["epoch"] * steps_per_epoch + resumed["step"])
        start_epoch, start_step = resumed["epoch"], resumed["step"]
        best_acc, running = resumed["best_acc"], resumed["running"]
        records = resumed["records"]
        if records is None:  # a checkpoint without its metrics: the file's, cut to the checkpoint's epoch
            records = _metrics_upto(out / "metrics.jsonl", start_epoch)
        last_saved = (start_epoch, start_step)
        _set_rng_state(resumed["rng"])
        del state
    net: nn.Module = model
    if d.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        if cfg.extra.get("sync_bn") and device.type == "cuda":
            net = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        net = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)

    def start() -> None:  # every check passed: from here on the run writes
        if force and not resume:
            _remove_previous_run(out)
        atomic_write_text(out / "train_config.json", json.dumps(cfg.to_dict(), indent=2) + "\n")
        if resume and (records or (out / "metrics.jsonl").exists()):
            atomic_write_text(out / "metrics.jsonl", _jsonl(records))  # no epoch twice, none after the checkpoint
    _on_rank0(d, start)
    history: list[dict] = []
    interrupted = {"flag": False}

    def on_sigint(signum, frame):
        if interrupted["flag"]:  # second Ctrl-C: give up at once
            raise KeyboardInterrupt
        interrupted["flag"] = True

    old_handler = signal.signal(signal.SIGINT, on_sigint) if _in_main_thread() else None

    def checkpoint(epoch: int, step: int, run: dict | None, path: Path) -> None:
        atomic_torch_save(_checkpoint_safe({
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "epoch": epoch, "step": step,
            "best_acc": best_acc, "running": run, "rng": _rng_state(), "config": cfg.to_dict(),
            "sepconv_config": getattr(model, "sepconv_config", None), "history": list(records),
        }), path)

    def diverged(what: str, epoch: int, step: int | None = None) -> TrainingDiverged:
        where = f"epoch {epoch + 1}/{cfg.epochs}" + (f", step {step + 1}/{steps_per_epoch}" if step is not None else "")
        kept = (f"the last good checkpoint {ckpt_path} (epoch {last_saved[0]}"
                + (f" step {last_saved[1]}" if last_saved[1] else "") + ") is kept"
                if last_saved is not None else "no checkpoint was written")
        return TrainingDiverged(f"training diverged at {where}: {what}; nothing of this epoch was saved and {kept} "
                                f"(a smaller --lr than {cfg.lr:g} may help)")

    epochs_run = 0
    try:
        for epoch in range(start_epoch, cfg.epochs):
            net.train()
            order = _epoch_order(n_train, cfg.seed, epoch)[d.rank::d.world][:per_rank]
            run = running or {"loss": 0.0, "correct": 0.0, "n": 0.0, "time": 0.0, "steps": 0,
                              **{f"loss_{k}": 0.0 for k in hooks.loss_terms}}
            running = None
            bar = _progress(range(start_step, steps_per_epoch), progress and d.main,
                            f"epoch {epoch + 1}/{cfg.epochs}", steps_per_epoch, start_step)
            for step in bar:
                t0 = time.perf_counter()
                idx = order[step * local_batch:(step + 1) * local_batch]
                x, y = train_set.get_batch(idx)
                if cfg.augment:
                    x = augment_batch(x, _step_generator(cfg.seed, epoch, step, d.rank),
                                      pad=max(1, x.shape[-1] // 8), flip=train_set.flip_ok)
                x, y = _to_device(x, y, device, cfg.channels_last)
                logits = net(x)
                loss = classification_loss(logits, y, cfg.label_smoothing, cfg.logit_scale)
                total = loss
                bad = None
                for name, term in hooks.loss_terms.items():
                    v = term(model)
                    value = float(v.detach())
                    run[f"loss_{name}"] += value
                    if not math.isfinite(value):
                        bad = bad or f"the loss term {name!r} is {value}"
                    total = total + v
                optimizer.zero_grad(set_to_none=True)
                total.backward()
                optimizer.step()
                scheduler.step()
                value = loss.item()
                if not math.isfinite(value):
                    bad = f"the loss is {value}"
                run["loss"] += value * len(y)
                run["correct"] += (logits.argmax(1) == y).sum().item()
                run["n"] += len(y)
                run["steps"] += 1
                run["time"] += time.perf_counter() - t0
                stop = (interrupted["flag"], bad is not None)
                if d.world > 1:  # one collective for both: every rank stops at the same step
                    stop = tuple(v > 0 for v in _all_reduce_sum([float(stop[0]), float(stop[1])], d))
                if stop[1]:
                    raise diverged(bad or "the loss is not finite on another rank", epoch, step)
                if stop[0]:
                    def save_interrupted():
                        what = _nonfinite_param(model)
                        if what:
                            raise diverged(what, epoch, step)
                        checkpoint(epoch, step + 1, run, ckpt_path)
                    _on_rank0(d, save_interrupted)
                    raise TrainingInterrupted(ckpt_path if d.main else None)
                if hasattr(bar, "set_postfix"):
                    bar.set_postfix(loss=f"{run['loss'] / run['n']:.3f}", acc=f"{run['correct'] / run['n']:.3f}")
            start_step = 0
            sums = _all_reduce_sum([run["loss"], run["correct"], run["n"]], d)
            test_loss, test_acc = evaluate(net, test_set, cfg.eval_batch_size, device, cfg.channels_last, d)
            rec = {
                "epoch": epoch + 1,
                "train_loss": sums[0] / sums[2], "train_acc": sums[1] / sums[2],
                "test_loss": test_loss, "test_acc": test_acc,
                "lr": optimizer.param_groups[0]["lr"],
                "time_per_step": run["time"] / max(run["steps"], 1),
                "steps": steps_per_epoch,
            }
            for name in hooks.loss_terms:
                rec[f"loss_{name}"] = run[f"loss_{name}"] / max(run["steps"], 1)
            if d.main and hooks.epoch_end:
                model.eval()
                for h in hooks.epoch_end:
                    rec.update(h(model, epoch + 1))
                model.train()
            is_best = test_acc > best_acc

            def save_epoch():
                what = _nonfinite_param(model) or next(
                    (f"{k} is {v}" for k, v in rec.items()
                     if isinstance(v, float) and not math.isfinite(v)), None)
                if what:
                    raise diverged(what, epoch)
                records.append(rec)
                try:  # best.pt, then last.pt, then the metrics (which the checkpoint also holds)
                    if is_best:
                        checkpoint(epoch + 1, 0, None, out / "best.pt")
                    checkpoint(epoch + 1, 0, None, ckpt_path)
                except BaseException:
                    records.pop()
                    raise
                atomic_write_text(out / "metrics.jsonl", _jsonl(records))
            best_before = best_acc
            best_acc = max(best_acc, test_acc)
            try:
                _on_rank0(d, save_epoch)
            except BaseException:
                best_acc = best_before
                raise
            if not d.main:
                records.append(rec)
            last_saved = (epoch + 1, 0)
            history.append(rec)
            if d.main and (progress if log is None else log):
                print(_summary_line(rec, cfg.epochs), flush=True)
            epochs_run += 1
            if stop_after_epochs is not None and epochs_run >= stop_after_epochs:
                break
    finally:
        if old_handler is not None:
            signal.signal(signal.SIGINT, old_handler)

    in_sync = None
    if d.world > 1:
        import torch.distributed as dist

        digests = [None] * d.world
        dist.all_gather_object(digests, _params_digest(model))
        in_sync = len(set(digests)) == 1

    def finish():
        save_model(model, out / "model")
        summary = {"best_acc": best_acc, "epochs": len(records), "world_size": d.world, "ranks_in_sync": in_sync}
        atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    _on_rank0(d, finish)
    return TrainResult(model, history, best_acc, out, in_sync, d.main)


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _progress(it, enabled: bool, desc: str, total: int, initial: int):
    if not enabled:
        return it
    from tqdm.auto import tqdm

    return tqdm(it, desc=desc, total=total, initial=initial, leave=False, dynamic_ncols=True,
                disable=None)  # None: a bar on a terminal only, no residue in a log file


def _summary_line(rec: dict, epochs: int) -> str:
    extra = " ".join(f"{k}={v:.4g}" for k, v in rec.items()
                     if k not in {"epoch", "train_loss", "train_acc", "test_loss", "test_acc", "lr",
                                  "time_per_step", "steps"} and isinstance(v, (int, float)))
    return (f"epoch {rec['epoch']}/{epochs}  train loss {rec['train_loss']:.4f} acc {rec['train_acc']:.4f}  "
            f"test loss {rec['test_loss']:.4f} acc {rec['test_acc']:.4f}  "
            f"{1000 * rec['time_per_step']:.1f} ms/step" + (f"  {extra}" if extra else ""))
