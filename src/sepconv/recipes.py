"""Recipes: the structural changes made to a model after construction, recorded and replayed.

A model converted by :func:`sepconv.decompose.convert` or normalized by
:func:`sepconv.normalize.spectral_normalize` no longer matches its registry constructor. Each
such change appends a JSON step (``{"op": NAME, ...arguments}``) to
``model.sepconv_config["recipe"]`` with :func:`record_recipe`; the module that makes the change
registers how to redo it with :func:`register_recipe`; :func:`sepconv.io.load_model` replays the
steps in order, then loads the weights. Only registered ops run: a file cannot name code.

This module sits low in the layering (it imports nothing of sepconv's but the errors); the
modules that register ops import it, and :mod:`sepconv.io` imports those modules explicitly.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from torch import nn

from .errors import SepconvError, WeightsError, one_line

__all__ = ["record_recipe", "recipe_ops", "register_recipe", "replay"]

# op name -> function(model, step: dict) -> model, replaying a structural change.
_RECIPES: dict[str, Callable[[nn.Module, dict], nn.Module]] = {}


def register_recipe(op: str):
    """Decorator: ``fn(model, step) -> model`` rebuilds the structure a recipe step made."""

    def wrap(fn):
        _RECIPES[op] = fn
        return fn

    return wrap


def record_recipe(model: nn.Module, op: str, **args) -> None:
    """Append a structural change to ``model.sepconv_config['recipe']`` (JSON-serialisable)."""
    cfg = getattr(model, "sepconv_config", None)
    if cfg is None:
        cfg = {"recipe": []}
        model.sepconv_config = cfg
    cfg.setdefault("recipe", []).append({"op": op, **json.loads(json.dumps(args))})


def recipe_ops() -> tuple[str, ...]:
    """The names of the registered ops, sorted."""
    return tuple(sorted(_RECIPES))


def replay(model: nn.Module, step: dict, where: str = "config.json") -> nn.Module:
    """Redo one recorded step on ``model``; anything wrong with the step is a
    :class:`~sepconv.errors.WeightsError` naming ``where`` and the op."""
    op = step.get("op")
    if op not in _RECIPES:
        raise WeightsError(f"{where}: unknown op {op!r} (known: {', '.join(recipe_ops())})")
    try:
        return _RECIPES[op](model, step)
    except SepconvError as e:
        raise WeightsError(f"{where} ({op}): {one_line(e)}") from None
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, OverflowError) as e:
        raise WeightsError(f"{where} ({op}): malformed step ({type(e).__name__}: {one_line(e)})") from None
