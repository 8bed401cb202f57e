"""How a run ends: :class:`TrainResult`, or :class:`TrainingInterrupted` (Ctrl-C, checkpoint
written) or :class:`TrainingDiverged` (NaN or Inf, nothing of the epoch saved)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from ..errors import ConfigError

__all__ = ["TrainResult", "TrainingDiverged", "TrainingInterrupted"]


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
    """A finished run (or invocation): ``model`` is the last epoch's, the one ``out/model/`` holds;
    ``history`` the metrics of this invocation's epochs; ``best_acc`` the best test accuracy of the
    whole run, reached at epoch ``best_epoch`` (whose checkpoint is ``out/best.pt``); ``epochs`` the
    epochs finished so far and ``last_acc`` the last one's test accuracy (``model``'s)."""

    model: nn.Module
    history: list[dict]
    best_acc: float
    out: Path
    ranks_in_sync: bool | None = None  # under DDP: parameters bit-identical on every rank
    is_main: bool = True  # rank 0 (the process that writes files and prints the final lines)
    epochs: int = 0
    best_epoch: int | None = None
    last_acc: float | None = None
