"""One model probe: a dry forward pass, and what it tells about a model.

Every tool that needs to know what a model does to an input -- the input size each layer sees
(spectral analysis, normalization, conversion), the FLOPs of a forward pass (profiles, conversion
reports), whether an input fits at all -- runs :func:`dry_forward`: the model in eval mode, no
gradients, one batch of zeros in the dtype and device of its parameters, the previous mode
restored afterwards. The pass is estimated on the meta device first and refused above the
memory budget (:func:`sepconv.guard.forward_memory`), and a failure inside the model is one
:class:`~sepconv.errors.ConfigError` naming the model input and the layer that failed
(:class:`LayerStack`), never a raw torch error.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from . import guard
from .errors import ConfigError, SepconvError

__all__ = ["DryRun", "LayerStack", "dry_forward", "eval_mode", "input_dtype", "check_forward_memory"]


def input_dtype(model: nn.Module) -> tuple[torch.dtype, torch.device]:
    """The dtype and device a model's inputs should have: those of its first floating parameter
    (float32 on the CPU for a model without one)."""
    p = next(iter(model.parameters()), None)
    if p is not None and p.is_floating_point():
        return p.dtype, p.device
    return torch.float32, (p.device if p is not None else torch.device("cpu"))


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model.eval()`` for the block, the previous train/eval mode restored afterwards."""
    was = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was)


def check_forward_memory(model: nn.Module, shape: Sequence[int], where: str, budget: float | None = None,
                         copies: float = 1.0, hint: str = "") -> None:
    """Estimate the peak activation memory of one forward pass on ``(1, *shape)`` on the meta device
    (:func:`sepconv.guard.forward_memory`; at least the input itself when the model cannot run on
    meta) and refuse it (:class:`~sepconv.errors.ResourceError`) above ``budget`` bytes (default the
    machine's, :func:`sepconv.guard.memory_budget`) -- before any real allocation. ``copies``
    accounts for extra copies the caller keeps of each activation."""
    dtype, _ = input_dtype(model)
    est = guard.forward_memory(model, tuple(shape), dtype=dtype)
    if est is None:
        est = guard.tensor_bytes((1, *shape), dtype)
    guard.check_memory(est * copies, f"{where}: a forward pass of {type(model).__name__} on an input of shape "
                       f"{tuple(shape)}", budget=None if budget is None else int(min(budget, 2**63 - 1)), hint=hint)


class LayerStack:
    """Forward hooks that know which layer is running, so that a failure inside the model (an input
    with the wrong channel count, smaller than a kernel, ...) becomes one
    :class:`~sepconv.errors.ConfigError` naming the model input and that layer."""

    def __init__(self, model: nn.Module, where: str, shape: Sequence[int]):
        self.model, self.where, self.shape = model, where, tuple(shape)
        self.stack: list[tuple[str, nn.Module, tuple | None]] = []
        self.hooks = []

    def __enter__(self) -> LayerStack:
        for name, mod in self.model.named_modules():
            if mod is self.model:
                continue
            self.hooks.append(mod.register_forward_pre_hook(self._enter(name)))
            self.hooks.append(mod.register_forward_hook(self._leave))
        return self

    def _enter(self, name: str):
        def hook(mod, args):
            first = args[0] if args else None
            self.stack.append((name, mod, tuple(first.shape) if isinstance(first, Tensor) else None))
        return hook

    def _leave(self, mod, args, out):
        if self.stack:
            self.stack.pop()

    def __exit__(self, kind, exc, tb) -> None:
        for h in self.hooks:
            h.remove()
        ours = isinstance(exc, (SepconvError, KeyboardInterrupt, MemoryError))
        if exc is not None and not ours and isinstance(exc, Exception):
            raise self.error(exc) from None

    def error(self, exc: BaseException, node: str | None = None) -> ConfigError:
        reason = " ".join(str(exc).split("While executing")[0].split())[:200] or type(exc).__name__
        where = f"{self.where}: the model input of shape {self.shape}"
        if not self.stack:
            at = f" (node {node!r})" if node else ""
            return ConfigError(f"{where} fails in the model{at}: {reason}")
        name, mod, got = self.stack[-1]
        fits = self._misfit(mod, got)
        if fits is None:
            return ConfigError(f"{where} fails in layer {name!r} ({type(mod).__name__}): {reason}")
        return ConfigError(f"{where} does not fit layer {name!r} ({type(mod).__name__}): {fits}")

    @staticmethod
    def _misfit(mod: nn.Module, got: tuple | None) -> str | None:
        """Why the input ``got`` does not fit ``mod`` (channels, features, a kernel larger than the
        padded input), or ``None`` when it is none of these."""
        if got is None:
            return None
        if isinstance(mod, nn.Conv2d) and len(got) == 4:
            if got[1] != mod.in_channels:
                return f"it expects {mod.in_channels} input channels, got {got[1]}"
            if isinstance(mod.padding, tuple):
                ext = [d * (k - 1) + 1 for k, d in zip(mod.kernel_size, mod.dilation)]
                if any(n + 2 * p < e for n, p, e in zip(got[2:], mod.padding, ext)):
                    return (f"its {ext[0]}x{ext[1]} (dilated) kernel is larger than its {got[2]}x{got[3]} input "
                            f"padded by {tuple(mod.padding)}")
        if isinstance(mod, nn.Linear) and got[-1] != mod.in_features:
            return f"it expects {mod.in_features} input features, got {got[-1]} (input shape {got})"
        if isinstance(mod, nn.modules.batchnorm._BatchNorm) and len(got) > 1 and got[1] != mod.num_features:
            return f"it expects {mod.num_features} channels, got {got[1]}"
        return None


@dataclass
class DryRun:
    """What :func:`dry_forward` saw: ``inputs`` maps the name of every recorded module to
    ``(module, input shape without the batch dimension)``, in call order (first call); ``flops``
    is the pass's FLOPs as ``torch.utils.flop_counter.FlopCounterMode`` counts them (2 per
    multiply-add; ``None`` unless asked for)."""

    inputs: dict[str, tuple[nn.Module, tuple[int, ...]]] = field(default_factory=dict)
    flops: int | None = None


def dry_forward(model: nn.Module, input_shape: Sequence[int], *, record: tuple[type, ...] = (),
                flops: bool = False, where: str = "dry_forward", budget: float | None = None,
                copies: float = 1.0, hint: str = "") -> DryRun:
    """One eval-mode, no-grad forward pass of ``model`` on zeros of ``(1, *input_shape)`` (the
    parameters' dtype and device); the model's mode is restored afterwards.

    ``record``: module types whose input shapes to record (``DryRun.inputs``); ``flops``: count
    the pass's FLOPs. The memory of the pass is checked first (:func:`check_forward_memory`,
    ``budget`` bytes, ``copies``, ``hint``) and a failure inside the model becomes one
    :class:`~sepconv.errors.ConfigError` naming ``where``, the input and the layer."""
    if not isinstance(model, nn.Module):
        raise ConfigError(f"{where}: model must be a torch.nn.Module, got {type(model).__name__}")
    shape = tuple(int(v) for v in input_shape)
    run = DryRun()

    def recorder(name: str):
        def hook(mod, args):
            first = args[0] if args else None
            if isinstance(first, Tensor):
                run.inputs.setdefault(name, (mod, tuple(first.shape[1:])))
        return hook

    hooks = [m.register_forward_pre_hook(recorder(n)) for n, m in model.named_modules()
             if record and isinstance(m, record)]
    dtype, device = input_dtype(model)
    try:
        check_forward_memory(model, shape, where, budget, copies, hint)
        counter = FlopCounterMode(display=False) if flops else contextlib.nullcontext()
        with eval_mode(model), LayerStack(model, where, shape), torch.no_grad(), counter:
            model(torch.zeros(1, *shape, dtype=dtype, device=device))
    finally:
        for h in hooks:
            h.remove()
    if flops:
        run.flops = int(counter.get_total_flops())
    return run
