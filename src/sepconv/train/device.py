"""The device a run computes on, batches moved onto it, and the evaluation pass.

:func:`resolve_device` turns ``--device`` into a ``torch.device`` this machine has (a clear
:class:`~sepconv.errors.ConfigError` otherwise); :func:`evaluate` is the test pass of every
epoch (all ranks together under torchrun).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from .distributed import _ONE_PROCESS, _all_reduce_sum, _Dist

__all__ = ["evaluate", "resolve_device"]


@torch.no_grad()
def evaluate(model: nn.Module, data, batch_size: int = 500, device: torch.device | str = "cpu",
             channels_last: bool = False, d: _Dist = _ONE_PROCESS) -> tuple[float, float]:
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
