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
  RNG states, epoch and step, written atomically), and ``model/`` (the final model as a
  sepconv model directory: ``config.json`` + ``model.safetensors``).
* ``resume=True`` continues from ``last.pt`` exactly: the data order and augmentation of
  every step are functions of (seed, epoch, step), and every other source of randomness
  is restored, so an interrupted run that is resumed ends with bit-identical weights on
  the CPU. SIGINT (Ctrl-C) finishes the current step, writes ``last.pt`` and raises
  :class:`TrainingInterrupted` (the command line exits with status 130).
* Under ``torchrun`` the model is wrapped in DistributedDataParallel (gloo on CPU, nccl on
  CUDA); every rank takes every ``world``-th sample of the same shuffled order, so the
  global batch equals a single-process batch of the same size; only rank 0 writes files.
  BatchNorm statistics are per rank, as usual with DDP (``sync_bn`` converts them on CUDA).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import CheckpointError, ConfigError
from .io import atomic_torch_save, atomic_write_text, save_model

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

    def validate(self) -> "TrainConfig":
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
        from .normalize import METHODS as SN_METHODS, MODES as SN_MODES

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
    def from_dict(cls, d: dict) -> "TrainConfig":
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
    """Raised after SIGINT once the checkpoint is safely written."""

    def __init__(self, checkpoint: Path | None):
        super().__init__(f"interrupted; checkpoint written to {checkpoint}")
        self.checkpoint = checkpoint


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


def _epoch_order(n: int, seed: int, epoch: int) -> Tensor:
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=g)


def _step_generator(seed: int, epoch: int, step: int, rank: int) -> torch.Generator:
    return torch.Generator().manual_seed(((seed * 1_000_003 + epoch) * 1_000_003 + step) * 257 + rank)


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


def _restore_rng(st: dict) -> None:
    np_state = st["numpy"]
    st = dict(st)
    st["numpy"] = (np_state[0], np.asarray(np_state[1], dtype=np.uint32), int(np_state[2]),
                   int(np_state[3]), float(np_state[4]))
    py = st["python"]
    st["python"] = (py[0], tuple(py[1]), py[2])
    _set_rng_state(st)


# ----------------------------------------------------------------------------- distributed


@dataclass(frozen=True)
class _Dist:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def _init_distributed(device: torch.device) -> _Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return _Dist(dist.get_rank(), dist.get_world_size())


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


# ----------------------------------------------------------------------------- main loop


def build_model(cfg: TrainConfig, num_classes: int, in_chans: int, hooks: Hooks,
                trust_code: bool = False) -> nn.Module:
    """The model a run trains: a saved model (``init``) or a registry model, then ``prepare`` hooks.

    ``trust_code``: let ``init``'s ``config.json`` name a factory to import and run (refused by
    default; see :func:`sepconv.io.build_from_config`)."""
    from .io import load_model
    from .models import create_model

    if cfg.init:
        model = load_model(cfg.init, trust_code=trust_code)
    else:
        model = create_model(cfg.model, num_classes=num_classes, in_chans=in_chans, conv=cfg.conv,
                             width=cfg.width, **cfg.model_kwargs)
    for prep in hooks.prepare:
        model = prep(model)
    return model


def _read_checkpoint(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read checkpoint ({' '.join(str(e).split())[:160]})") from None


def train(cfg: TrainConfig, hooks: Hooks | None = None, resume: bool = False, progress: bool = True,
          stop_after_epochs: int | None = None, log: bool | None = None, force: bool = False,
          trust_code: bool = False) -> TrainResult:
    """Train ``cfg.model`` on ``cfg.data``; see the module docstring for what is written.

    ``force``: start afresh in an ``out`` that holds another run. ``trust_code``: let ``init``'s
    ``config.json`` name a factory (see :func:`build_model`).

    ``progress``: per-epoch progress bars; ``log`` (default: as ``progress``): one summary line per
    epoch on stdout.

    ``stop_after_epochs`` ends this invocation after that many epochs (a checkpoint is
    written as usual), to be continued later with ``resume=True``.
    """
    from .data import augment_batch, load_dataset

    cfg.validate()
    device = resolve_device(cfg.device)
    d = _init_distributed(device)
    if d.world > 1 and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if cfg.batch_size % d.world:
        raise ConfigError(f"batch_size {cfg.batch_size} is not divisible by the {d.world} processes")
    out = Path(cfg.out)
    ckpt_path = out / "last.pt"

    train_set = load_dataset(cfg.data, cfg.data_dir, split="train", image_size=cfg.image_size)
    test_set = load_dataset(cfg.data, cfg.data_dir, split="test", image_size=cfg.image_size)
    if hooks is None:
        hooks = default_hooks(cfg, (train_set.in_chans, *train_set.image_size), test_set, device)
    local_batch = cfg.batch_size // d.world
    n_train = len(train_set) if cfg.train_images is None else min(len(train_set), cfg.train_images)
    per_rank = n_train // d.world
    steps_per_epoch = per_rank // local_batch
    if steps_per_epoch < 1:
        raise ConfigError(f"batch_size {cfg.batch_size} is larger than the {n_train} training images")

    state = None
    if resume:
        if not ckpt_path.is_file():
            raise CheckpointError(f"{ckpt_path}: no checkpoint to resume from")
        state = _read_checkpoint(ckpt_path)
        old = TrainConfig.from_dict(state["config"])
        for key in ("model", "conv", "width", "model_kwargs", "data", "image_size", "batch_size", "seed",
                    "sn", "sn_batchnorm"):
            if getattr(old, key) != getattr(cfg, key):
                raise CheckpointError(
                    f"{ckpt_path}: the checkpoint was trained with {key}={getattr(old, key)!r}, "
                    f"not {getattr(cfg, key)!r}")

    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed % 2**32)
    random.seed(cfg.seed)
    model = build_model(cfg, train_set.num_classes, train_set.in_chans, hooks, trust_code=trust_code).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(cfg, model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(cfg, step, steps_per_epoch))

    start_epoch, start_step, best_acc, running = 0, 0, -1.0, None
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, start_step = state["epoch"], state["step"]
        best_acc = state["best_acc"]
        running = state.get("running")
        _restore_rng(state["rng"])
    net: nn.Module = model
    if d.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        if cfg.extra.get("sync_bn") and device.type == "cuda":
            net = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        net = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)

    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "train_config.json", json.dumps(cfg.to_dict(), indent=2) + "\n")
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
            "sepconv_config": getattr(model, "sepconv_config", None),
        }), path)

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
                for name, term in hooks.loss_terms.items():
                    v = term(model)
                    run[f"loss_{name}"] += float(v.detach())
                    total = total + v
                optimizer.zero_grad(set_to_none=True)
                total.backward()
                optimizer.step()
                scheduler.step()
                run["loss"] += loss.item() * len(y)
                run["correct"] += (logits.argmax(1) == y).sum().item()
                run["n"] += len(y)
                run["steps"] += 1
                run["time"] += time.perf_counter() - t0
                if _any_rank(interrupted["flag"], d):
                    if d.main:
                        checkpoint(epoch, step + 1, run, ckpt_path)
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
            history.append(rec)
            is_best = test_acc > best_acc
            best_acc = max(best_acc, test_acc)
            if d.main:
                with open(out / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(rec) + "\n")
                checkpoint(epoch + 1, 0, None, ckpt_path)
                if is_best:
                    checkpoint(epoch + 1, 0, None, out / "best.pt")
                if progress if log is None else log:
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
    if d.main:
        save_model(model, out / "model")
        summary = {"best_acc": best_acc, "epochs": len(history), "world_size": d.world, "ranks_in_sync": in_sync}
        atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    return TrainResult(model, history, best_acc, out, in_sync, d.main)


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _progress(it, enabled: bool, desc: str, total: int, initial: int):
    if not enabled:
        return it
    from tqdm.auto import tqdm

    return tqdm(it, desc=desc, total=total, initial=initial, leave=False, dynamic_ncols=True)


def _summary_line(rec: dict, epochs: int) -> str:
    extra = " ".join(f"{k}={v:.4g}" for k, v in rec.items()
                     if k not in {"epoch", "train_loss", "train_acc", "test_loss", "test_acc", "lr",
                                  "time_per_step", "steps"} and isinstance(v, (int, float)))
    return (f"epoch {rec['epoch']}/{epochs}  train loss {rec['train_loss']:.4f} acc {rec['train_acc']:.4f}  "
            f"test loss {rec['test_loss']:.4f} acc {rec['test_acc']:.4f}  "
            f"{1000 * rec['time_per_step']:.1f} ms/step" + (f"  {extra}" if extra else ""))
