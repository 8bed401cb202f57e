"""Argument checks shared by the public functions of :mod:`sepconv.spectral`.

Every public function validates what it is given *before* any work, so that bad input is one
:class:`~sepconv.errors.SepconvError` naming the function, the argument and the reason -- never
a torch or LAPACK error from deep inside, and never a silently wrong value (a NaN tolerance
that makes every test pass, a half-precision weight rounded into a "certified" bound):

* numbers -- :func:`tolerance` (finite, ``0 < tol < 1``), :func:`count` (iteration counts: an
  int in range), :func:`nonnegative`;
* weights -- :func:`conv_weight`: a real, finite, 4-D floating weight on a real device
  (not ``meta``, not sparse) that fits the geometry; half and bfloat16 weights are
  **computed in float32** (LAPACK has no half precision, and a rounded bound is no bound) and
  the result is float32;
* memory -- :func:`budget` and :func:`check_memory`: every path that builds a dense matrix, a
  frequency grid or a block of vectors estimates its bytes first and refuses
  (:class:`~sepconv.errors.ResourceError`, with the estimate) above ``max_memory``, by default
  :data:`MAX_MEMORY` (2 GiB, or ``$SEPCONV_MEMORY_LIMIT`` when set).
"""

from __future__ import annotations

import math
import numbers
import operator
import os
from collections.abc import Sequence

import torch
from torch import Tensor

from .. import guard
from ..errors import ConfigError

#: Default memory budget (bytes) of one spectral computation: ``max_memory=None``.
MAX_MEMORY = 2 * 2**30
#: Iteration counts above this are refused (a typo such as ``max_iter=1e9`` would never end).
MAX_COUNT = 10**6
_SMALL = 64 * 2**20


def budget(max_memory: float | None = None) -> float:
    """The memory budget in bytes: ``max_memory`` when given (``float('inf')``: no limit), else
    ``$SEPCONV_MEMORY_LIMIT`` when set, else the smaller of :data:`MAX_MEMORY` and the machine's
    budget (:func:`sepconv.guard.memory_budget`)."""
    if max_memory is None:
        if os.environ.get(guard.MEMORY_ENV):
            return guard.memory_budget()
        return min(MAX_MEMORY, guard.memory_budget())
    if isinstance(max_memory, bool) or not isinstance(max_memory, numbers.Real) or not max_memory > 0:
        raise ConfigError(f"max_memory must be a positive number of bytes, got {max_memory!r}")
    return float(max_memory)


def check_memory(nbytes: float, what: str, max_memory: float | None = None) -> None:
    """Refuse (:class:`~sepconv.errors.ResourceError`) when ``what`` needs more than :func:`budget`
    bytes; the message holds the estimate and how to raise the budget. Small requests under the
    default budget return at once (no look-up of the machine's limits in hot loops)."""
    if max_memory is None and nbytes <= _SMALL and not os.environ.get(guard.MEMORY_ENV):
        return
    limit = budget(max_memory)
    if nbytes > limit:
        guard.check_memory(nbytes, what, budget=int(min(limit, 2**63 - 1)),
                           hint="pass max_memory (bytes)")


def tolerance(tol, where: str, name: str = "tol") -> float:
    """A relative tolerance: a finite real number with ``0 < tol < 1``."""
    if isinstance(tol, bool) or not isinstance(tol, numbers.Real) or not (0 < float(tol) < 1):
        raise ConfigError(f"{where}: {name} must be a relative tolerance with 0 < {name} < 1, got {tol!r}")
    return float(tol)


def count(v, where: str, name: str, lo: int = 1, hi: int = MAX_COUNT) -> int:
    """An iteration count: an int with ``lo <= v <= hi``."""
    try:
        n = operator.index(v)
    except TypeError:
        raise ConfigError(f"{where}: {name} must be an int, got {v!r}") from None
    if isinstance(v, bool) or not lo <= n <= hi:
        raise ConfigError(f"{where}: {name} must be an int from {lo} to {hi}, got {v!r}")
    return n


def nonnegative(v, where: str, name: str) -> float:
    """A finite real number ``>= 0`` (work limits such as ``dense_flops``; ``inf`` allowed)."""
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not float(v) >= 0:
        raise ConfigError(f"{where}: {name} must be a number >= 0, got {v!r}")
    return float(v)


def spec(s, where: str):
    """``s`` must be a :class:`~sepconv.spectral.spec.ConvSpec`."""
    from .spec import ConvSpec

    if not isinstance(s, ConvSpec):
        raise ConfigError(f"{where}: spec must be a ConvSpec (ConvSpec(in_size, ...) or ConvSpec.of(conv, in_size)), "
                          f"got {type(s).__name__}")
    return s


def tensor(t, where: str, name: str = "weight") -> Tensor:
    """A real floating tensor with values: not meta, not sparse, not complex or integer, finite;
    half and bfloat16 are returned in float32 (differentiably)."""
    if not isinstance(t, Tensor):
        raise ConfigError(f"{where}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device.type == "meta":
        raise ConfigError(f"{where}: {name} is a meta tensor (shapes only, no values); load or materialise it first")
    if t.layout != torch.strided:
        raise ConfigError(f"{where}: {name} is a {t.layout} tensor; pass a dense one (.to_dense())")
    if t.is_complex() or not t.is_floating_point():
        raise ConfigError(f"{where}: {name} must be a real floating-point tensor, got {t.dtype}")
    if t.dtype in (torch.float16, torch.bfloat16):
        t = t.float()
    return t


def conv_weight(weight, s, where: str, name: str = "weight") -> tuple[Tensor, tuple[int, int]]:
    """``(weight, kernel size)`` after :func:`tensor` and :meth:`ConvSpec.check` (4-D, channels
    divisible by groups, finite, kernel fitting the padded input), the messages prefixed by ``where``."""
    spec(s, where)
    weight = tensor(weight, where, name)
    return weight, s.check(weight, name=f"{where}: {name}")


def shape(input_shape, where: str, dims: Sequence[int] = (3,)) -> tuple[int, ...]:
    """A model input shape: a sequence of ``dims`` positive ints (``(C, H, W)``)."""
    try:
        items = tuple(input_shape)
    except TypeError:
        raise ConfigError(f"{where}: input_shape must be a sequence of ints such as (C, H, W), got {input_shape!r}") from None
    if len(items) not in dims:
        want = " or ".join(f"{d} ints" for d in dims)
        raise ConfigError(f"{where}: input_shape must be {want} ((C, H, W)), got {items!r}")
    out = []
    for v in items:
        try:
            n = operator.index(v)
        except TypeError:
            n = None
        if n is None or isinstance(v, bool) or n < 1:
            raise ConfigError(f"{where}: input_shape {items!r} must hold positive ints (channels, height, width)")
        out.append(n)
    return tuple(out)


def finite_result(value: Tensor | float, where: str) -> None:
    """A computed norm or bound must not be NaN (an overflow to ``inf`` in an upper bound is still
    a valid bound; NaN is never a result)."""
    v = float(value) if not isinstance(value, Tensor) else float(value.detach().double().max()) if value.numel() else 0.0
    if math.isnan(v):
        raise ConfigError(f"{where}: the computation produced NaN (weights too large for their dtype?); "
                          "pass float64 weights")


__all__ = ["MAX_MEMORY", "budget", "check_memory", "conv_weight", "count", "finite_result", "nonnegative", "shape",
           "spec", "tensor", "tolerance"]
