"""What one training step optimizes: the loss, the optimizer and its learning-rate schedule.

SGD (momentum, optional Nesterov) or AdamW; a per-step learning-rate schedule (cosine, step at
epoch milestones, or constant), with optional linear warm-up; weight decay on weights only
(biases and normalization parameters are not decayed); the loss of the registry :data:`sepconv.losses.LOSSES`
(cross-entropy with optional label smoothing and logit scale, or a margin loss).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..losses import get_loss
from .config import TrainConfig

__all__ = ["classification_loss", "lr_factor", "make_optimizer"]


def lr_factor(cfg: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """Learning-rate multiplier at a global step (warm-up, then the schedule).

    Warm-up (Goyal et al. 2017, arXiv 1706.02677): ``(step + 1) / W`` over the first ``W`` steps
    (``warmup_epochs`` of them). Then ``constant``: 1; ``step``: ``gamma ** k`` after ``k``
    milestones; ``cosine`` (Loshchilov & Hutter, ICLR 2017, arXiv 1608.03983, without restarts):
    ``(1 + cos(pi t)) / 2`` with ``t`` the fraction of the steps after warm-up done."""
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
    """SGD (Nesterov when asked and ``momentum > 0``) or AdamW at ``cfg.lr``; weight decay on the
    weights only (parameters of two or more dimensions)."""
    groups = _param_groups(model, cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0)
    return torch.optim.AdamW(groups, lr=cfg.lr)


def classification_loss(logits: Tensor, y: Tensor, label_smoothing: float = 0.0, logit_scale: float = 1.0,
                        loss: str = "ce", margin: float = 1.0, hkr_alpha: float = 0.99) -> Tensor:
    """The training loss ``loss`` of the registry :data:`sepconv.losses.LOSSES` with the settings it
    reads: ``ce`` (default), :func:`sepconv.losses.cross_entropy` ``CE(s z, y) / s`` with ``s =
    logit_scale`` (Bethune et al. 2022; plain cross-entropy at ``s = 1``): for a network with a
    small Lipschitz bound, whose logits and softmax gradients are small, ``s > 1`` lets it reach
    the margins the Lipschitz-margin certificate (Tsuzuku et al. 2018) needs; ``hinge``,
    :func:`sepconv.losses.multiclass_hinge` with logit margin ``margin``; ``hkr``,
    :func:`sepconv.losses.hkr` (Serrurier et al. 2021) with ``margin`` and ``hkr_alpha``."""
    return get_loss(loss)(logits, y, label_smoothing=label_smoothing, logit_scale=logit_scale, margin=margin,
                          hkr_alpha=hkr_alpha)
