"""Argument types of the ``sepconv`` command (each parses one string or raises
:class:`argparse.ArgumentTypeError`, a one-line usage error, exit status 2) and the arguments and
helpers several commands share."""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable

from torch import nn

from ..errors import ConfigError
from ..models import default_input_shape

__all__ = ["add_threads", "add_trust_code", "energy_arg", "input_shape", "model_arg", "nonneg_float", "number",
           "positive_float", "positive_int", "rank_arg", "speedup_arg", "unit_float"]


def number(cast: Callable[[str], float], ok: Callable[[float], bool], expected: str) -> Callable[[str], float]:
    """An argument type: ``cast(s)`` (``int`` or ``float``) when ``ok`` of it holds, else the usage
    error "expected <expected>, got 's'"."""

    def parse(s: str):
        try:
            v = cast(s)
        except ValueError:
            v = None
        if v is None or not ok(v):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {s!r}")
        return v

    return parse


positive_int = number(int, lambda v: v >= 1, "a positive integer")
positive_float = number(float, lambda v: 0 < v < math.inf, "a positive finite number")
nonneg_float = number(float, lambda v: 0 <= v < math.inf, "a finite number >= 0")
unit_float = number(float, lambda v: 0 <= v < 1, "a number in [0, 1)")
energy_arg = number(float, lambda v: 0 < v <= 1, "a number in (0, 1]")
speedup_arg = number(float, lambda v: 1 < v < math.inf, "a finite number > 1")


def model_arg(s: str) -> tuple[str, object]:
    """KEY=VALUE, VALUE parsed as JSON when it parses (numbers, true/false, lists), else a string."""
    key, eq, value = s.partition("=")
    if not eq or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {s!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def rank_arg(s: str):
    if s == "full":
        return s
    return positive_int(s)


def add_trust_code(parser, source: str = "a model directory's") -> None:
    """``--trust-code``: the one switch that lets a saved model's ``config.json`` run code."""
    parser.add_argument("--trust-code", action="store_true",
                        help=f"let {source} config.json name a factory to import and run "
                             "(refused by default: a directory is data from elsewhere)")


def input_shape(model, args) -> tuple[int, int, int]:
    """``(C, H, W)``: C from the first layer, H and W from ``--input-size`` or the model's registered
    size; a model with neither is asked for ``--input-size`` (never a guessed size)."""
    first = next((m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))), None)
    if first is None:
        raise ConfigError(f"{args.model}: the model has no Conv2d or Linear layer")
    channels = first.in_channels if isinstance(first, nn.Conv2d) else first.in_features
    if args.input_size:
        return (channels, *args.input_size)
    default = default_input_shape(model)
    if default is None:
        raise ConfigError(f"{args.model}: the model has no registered input size; pass --input-size H W")
    return (channels, *default[1:])


def add_threads(parser, default: int | None = None) -> None:
    """``--threads N``: torch's intra-op threads for the command (one is often fastest on a shared machine)."""
    parser.add_argument("--threads", type=positive_int, default=default, metavar="N",
                        help="torch threads (default: torch's own choice)" if default is None
                        else f"torch threads (default {default})")
