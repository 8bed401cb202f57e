"""What a training run is: :class:`TrainConfig` (saved in every checkpoint) and its checks.

:meth:`TrainConfig.validate` refuses a setting out of range with one
:class:`~sepconv.errors.ConfigError` line naming it, before any data is read or any file written.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from .. import normalize
from ..data.base import check_folds
from ..errors import ConfigError
from ..losses import LOSSES, canonical_loss, get_loss

__all__ = ["OPTIMIZERS", "SCHEDULES", "TrainConfig"]

#: Optimizers :func:`~sepconv.train.make_optimizer` builds (``TrainConfig.optimizer``).
OPTIMIZERS = ("sgd", "adamw")
#: Learning-rate schedules :func:`~sepconv.train.lr_factor` follows (``TrainConfig.schedule``).
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
    # cross-validation (sepconv.data.load_dataset): folds=K >= 2 trains on K-1 folds of the pooled train and test
    # splits and tests on fold `fold` (0..K-1); folds=0: the dataset's own train/test split (fold must be 0)
    folds: int = 0
    fold: int = 0
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
    # the training loss (sepconv.losses.LOSSES: ce, hinge, hkr; tau_ce is ce) and the settings it reads:
    # ce: cross_entropy(s * logits) / s with s = logit_scale (Bethune et al. 2022), for Lipschitz-bounded
    # networks, whose logits are small; the certificate always uses the raw logits
    loss: str = "ce"
    logit_scale: float = 1.0
    # hinge, hkr: the logit margin m asked of every training image. A test image with margin m is
    # certified at pixel-l2 radius m * min(std) / (sqrt(2) L), L the network's bound (lipschitz_bound in
    # the metrics): to aim for a pixel-l2 radius eps, m = sqrt(2) * L * eps / min(std)
    margin: float = 1.0
    hkr_alpha: float = 0.99  # hkr: alpha * hinge - (1 - alpha) * Kantorovich-Rubinstein, alpha in (0, 1]
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
    curvature_beta: float = 0.0  # weight of the curvature penalty (Singla & Feizi; smooth activations only)
    # pixel-l2 radii (images in [0, 1]): Lipschitz bound and certified accuracy after each epoch
    certify: tuple[float, ...] = ()
    extra: dict = field(default_factory=dict)  # room for later options (kept in checkpoints)

    def __post_init__(self) -> None:
        self.loss = canonical_loss(self.loss)  # another name of a loss is that loss (tau_ce: ce)

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
        self._validate_loss()
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
        check_folds(self.folds, self.fold)  # ConfigError: folds 0 or >= 2, fold in 0..folds-1
        if not (self.bsconv_alpha >= 0):
            bad(f"bsconv_alpha must be >= 0, got {self.bsconv_alpha!r}")
        # NB: read at call time, not import time: a method registered later is a valid choice
        if self.sn is not None and self.sn not in normalize.METHODS:
            bad(f"unknown spectral normalization {self.sn!r}; choose one of {', '.join(normalize.METHODS)}")
        if not (isinstance(self.sn_target, (int, float)) and math.isfinite(self.sn_target) and self.sn_target > 0):
            bad(f"sn_target must be a positive finite number, got {self.sn_target!r}")
        if self.sn_mode not in normalize.MODES:
            bad(f"sn_mode must be one of {', '.join(normalize.MODES)}, got {self.sn_mode!r}")
        if self.sn_batchnorm and self.sn is None:
            bad("sn_batchnorm needs a spectral normalization method (sn)")
        if not (self.ff_beta >= 0 and math.isfinite(self.ff_beta)):
            bad(f"ff_beta must be >= 0, got {self.ff_beta!r}")
        if not (self.curvature_beta >= 0 and math.isfinite(self.curvature_beta)):
            bad(f"curvature_beta must be >= 0, got {self.curvature_beta!r}")
        if any(not (isinstance(e, (int, float)) and math.isfinite(e) and e >= 0) for e in self.certify):
            bad(f"certify radii must be finite and >= 0, got {list(self.certify)}")
        if not (self.eval_batch_size >= 1):
            bad(f"eval_batch_size must be positive, got {self.eval_batch_size!r}")
        return self

    def _validate_loss(self) -> None:
        """The loss is registered, its settings in range, and no setting it does not read is set
        (a ``margin`` with ``ce``, a ``logit_scale`` with ``hinge``: the run would silently ignore it)."""
        spec = get_loss(self.loss)  # NB: read at call time: a loss registered later is a valid choice
        if not (isinstance(self.margin, (int, float)) and math.isfinite(self.margin) and self.margin > 0):
            raise ConfigError(f"margin must be a positive finite number (a logit margin), got {self.margin!r}")
        if not (isinstance(self.hkr_alpha, (int, float)) and 0 < self.hkr_alpha <= 1):
            raise ConfigError(f"hkr_alpha must be in (0, 1], got {self.hkr_alpha!r}")
        default = TrainConfig.__dataclass_fields__
        for name in ("logit_scale", "label_smoothing", "margin", "hkr_alpha"):
            if name not in spec.options.values() and getattr(self, name) != default[name].default:
                users = [n for n, s in LOSSES.items() if name in s.options.values()]
                raise ConfigError(f"{name} is read by loss {' or '.join(users)} only, not by loss {self.loss!r}: "
                                  f"drop --{name.replace('_', '-')} or choose --loss {users[0]}")

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
