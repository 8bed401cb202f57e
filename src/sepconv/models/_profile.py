"""Parameters and FLOPs of any model, counted by torch's own FlopCounterMode."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..probe import dry_forward


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


def profile(model: nn.Module, input_size: tuple[int, ...]) -> Profile:
    """Parameters and forward FLOPs of ``model`` on one input of ``input_size`` = (C, H, W).

    FLOPs are those ``torch.utils.flop_counter.FlopCounterMode`` counts (matmuls and
    convolutions, 2 FLOPs per multiply-add); elementwise ops are not counted. One dry forward
    pass (:func:`sepconv.probe.dry_forward`: eval mode, zeros, the mode restored; a model on the
    ``meta`` device is counted without any arithmetic).
    """
    run = dry_forward(model, input_size, flops=True, where="profile")
    return Profile(params=count_params(model), flops=run.flops)
