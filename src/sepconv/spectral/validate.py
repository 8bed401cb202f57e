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
* models -- :func:`model`: an ``nn.Module`` whose parameters and buffers hold finite values;
* memory -- :func:`budget` and :func:`check_memory` (:mod:`sepconv.spectral.budget`, re-exported
  here): every path that builds a dense matrix, a
  frequency grid or a block of vectors estimates its bytes first and refuses
  (:class:`~sepconv.errors.ResourceError`, with the estimate) above ``max_memory``, by default
  :data:`MAX_MEMORY` (2 GiB, or ``$SEPCONV_MEMORY_LIMIT`` when set).
"""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .. import guard
from ..errors import ConfigError
from .budget import MAX_MEMORY, budget, check_memory
from .spec import ConvSpec

__all__ = ["MAX_COUNT", "MAX_MEMORY", "budget", "check_memory", "conv_weight", "count", "finite_result", "model",
           "nonnegative", "positive", "shape", "spec", "tensor", "tolerance"]

#: Iteration counts above this are refused (a typo such as ``max_iter=1e9`` would never end).
MAX_COUNT = 10**6


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
        raise ConfigError(f"{where}: input_shape must be a sequence of ints such as (C, H, W), "
                          f"got {input_shape!r}") from None
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
    if isinstance(value, Tensor):
        v = float(value.detach().double().max()) if value.numel() else 0.0
    else:
        v = float(value)
    if math.isnan(v):
        raise ConfigError(f"{where}: the computation produced NaN (weights too large for their dtype?); "
                          "pass float64 weights")



def positive(v, where: str, name: str) -> float:
    """A finite real number ``> 0`` (e.g. ``input_bound``, the largest input norm)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0 < float(v) < math.inf):
        raise ConfigError(f"{where}: {name} must be a finite number > 0, got {v!r}")
    return float(v)


def model(m, where: str) -> nn.Module:
    """``m`` is an ``nn.Module`` whose parameters and buffers hold finite values (not meta)."""
    if not isinstance(m, nn.Module):
        raise ConfigError(f"{where}: model must be a torch.nn.Module, got {type(m).__name__}")
    for name, t in [*m.named_parameters(), *m.named_buffers()]:
        if t.device.type == "meta":
            layer = name.rsplit(".", 1)[0] if "." in name else name
            raise ConfigError(f"{where}: layer {layer!r} has meta tensors ({name!r}: shapes only, no values); "
                              "load the weights first")
    guard.check_finite(m, where)
    return m
