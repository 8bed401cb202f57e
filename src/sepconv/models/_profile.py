"""Parameters and FLOPs of any model, counted by torch's own FlopCounterMode."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


@dataclass(frozen=True)
class Profile:
    params: int  # trainable + frozen parameters (not buffers)
    flops: int  # floating-point operations of one forward pass, batch 1 (torch convention: 2 per MAC)

    @property
    def macs(self) -> int:
        return self.flops // 2


def count_params(model: nn.Module) -> int:
    """Number of parameters (shared parameters counted once)."""
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def profile(model: nn.Module, input_size: tuple[int, ...]) -> Profile:
    """Parameters and forward FLOPs of ``model`` on one input of ``input_size`` = (C, H, W).

    FLOPs are those ``torch.utils.flop_counter.FlopCounterMode`` counts (matmuls and
    convolutions, 2 FLOPs per multiply-add); elementwise ops are not counted. The model
    is run in eval mode on a zero tensor and restored to its previous mode.
    """
    was_training = model.training
    model.eval()
    p = next(iter(model.parameters()), None)
    x = torch.zeros(1, *input_size, dtype=p.dtype if p is not None else torch.float32,
                    device=p.device if p is not None else "cpu")
    try:
        with FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
    return Profile(params=count_params(model), flops=int(counter.get_total_flops()))
