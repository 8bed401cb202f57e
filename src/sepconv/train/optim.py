"""What one training step optimizes: the loss, the optimizer and its learning-rate schedule.

SGD (momentum, optional Nesterov) or AdamW; a per-step learning-rate schedule (cosine, step at
epoch milestones, or constant), with optional linear warm-up; weight decay on weights only
(biases and normalization parameters are not decayed); optional label smoothing and logit scale.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

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
