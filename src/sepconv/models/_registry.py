"""The model registry: one decorator, one constructor, one listing (in the style of timm).

Every registered factory takes the same keyword arguments: ``num_classes``, ``in_chans``,
``conv`` (which convolution flavour replaces the spatial convs) and ``width`` (a channel
multiplier), plus its own extras. :func:`create_model` records the name and arguments on
the model (``model.sepconv_config``) so that :func:`sepconv.io.save_model` can rebuild it.
"""

from __future__ import annotations

import contextlib
import difflib
import fnmatch
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import ConfigError, ModelError, SepconvError, UnknownModelError
from ..guard import check_memory, model_bytes
from ..layers import CONV_KINDS
from ._profile import count_params


@dataclass(frozen=True)
class ModelInfo:
    """What the registry knows about a model family member."""

    name: str
    fn: Callable[..., nn.Module]
    family: str
    convs: tuple[str, ...] = ("regular",)
    input_size: tuple[int, int, int] = (3, 224, 224)  # default (C, H, W) for profiling
    tags: tuple[str, ...] = field(default_factory=tuple)
    doc: str = ""


_MODELS: dict[str, ModelInfo] = {}


def register_model(
    *,
    family: str,
    convs: tuple[str, ...] = ("regular",),
    input_size: tuple[int, int, int] = (3, 224, 224),
    tags: tuple[str, ...] = (),
    name: str | None = None,
):
    """Decorator: register a model factory under its function name (or ``name``)."""

    bad = [c for c in convs if c not in CONV_KINDS]
    if bad:
        raise ConfigError(f"register_model: unknown conv kinds {bad}; known: {CONV_KINDS}")

    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        key = name or fn.__name__
        if key in _MODELS:
            raise ConfigError(f"register_model: model {key!r} is registered twice")
        doc = inspect.getdoc(fn) or ""
        _MODELS[key] = ModelInfo(key, fn, family, tuple(convs), tuple(input_size), tuple(tags), doc)
        return fn

    return wrap


def list_models(pattern: str | None = None, family: str | None = None) -> list[str]:
    """Sorted names of the registered models, optionally filtered by a glob and family."""
    names = sorted(_MODELS)
    if pattern:
        names = [n for n in names if fnmatch.fnmatch(n, pattern)]
    if family:
        names = [n for n in names if _MODELS[n].family == family]
    return names


def model_info(name: str) -> ModelInfo:
    """The registry entry of ``name``; a clear error listing close names if unknown."""
    try:
        return _MODELS[name]
    except KeyError:
        close = difflib.get_close_matches(name, _MODELS, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else " (see `sepconv models`)"
        raise UnknownModelError(f"unknown model {name!r}{hint}") from None


def create_model(
    name: str,
    num_classes: int = 1000,
    in_chans: int = 3,
    conv: str = "regular",
    width: float = 1.0,
    **kwargs,
) -> nn.Module:
    """Build a registered model.

    Args:
        name: a name from :func:`list_models`.
        num_classes: size of the classifier output.
        in_chans: channels of the input image.
        conv: ``"regular"``, ``"dsc"``, ``"bsconv_u"`` or ``"bsconv_s"`` -- which
            convolution flavour the model's spatial convs use; what each means for a
            family is written in that family's docstring.
        width: channel multiplier.
        **kwargs: family-specific options.
    """
    info = model_info(name)
    if conv not in CONV_KINDS:
        raise ModelError(f"unknown conv kind {conv!r}; choose one of {', '.join(CONV_KINDS)}")
    if conv not in info.convs:
        raise ModelError(
            f"model {name!r} does not support conv={conv!r} (it supports {', '.join(info.convs)})"
        )
    for key, v in (("num_classes", num_classes), ("in_chans", in_chans)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"{key} must be a positive integer, got {v!r:.80}")
    if isinstance(width, bool) or not isinstance(width, (int, float)) or not (0 < width < math.inf):
        raise ConfigError(f"width must be a positive finite number, got {width!r:.80}")
    params = inspect.signature(info.fn).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        unknown = sorted(set(kwargs) - set(params))
        if unknown:
            own = [n for n in params if n not in ("num_classes", "in_chans", "conv", "width")]
            raise ConfigError(f"model {name!r} has no option {', '.join(unknown)} "
                              f"(its options: {', '.join(own) or 'none'})")
    args = dict(num_classes=num_classes, in_chans=in_chans, conv=conv, width=width, **kwargs)
    if torch.get_default_device().type != "meta":  # shapes first: refuse what would not fit
        probe = _build(info, args, meta=True)
        check_memory(model_bytes(probe), f"model {name!r} ({count_params(probe):,} parameters)")
    model = _build(info, args)
    model.sepconv_config = {
        "name": name,
        "kwargs": dict(num_classes=num_classes, in_chans=in_chans, conv=conv, width=width, **kwargs),
        "recipe": [],
    }
    return model


def _build(info: ModelInfo, args: dict, meta: bool = False) -> nn.Module:
    """``info.fn(**args)`` (on the meta device: shapes only); an argument the family cannot build
    with (a string width, a channel count that overflows) is a :class:`ModelError` naming it."""
    try:
        with torch.device("meta") if meta else contextlib.nullcontext():
            return info.fn(**args)
    except SepconvError:
        raise
    except (TypeError, ValueError, OverflowError, ZeroDivisionError, RuntimeError) as e:
        shown = ", ".join(f"{k}={v!r:.40}" for k, v in args.items())
        raise ModelError(f"model {info.name!r} cannot be built with {shown} "
                         f"({type(e).__name__}: {' '.join(str(e).split())[:160]})") from None


def default_input_shape(model: nn.Module) -> tuple[int, int, int] | None:
    """The input ``(C, H, W)`` a model takes by default, or ``None`` when nothing tells it.

    A model built by :func:`create_model` (also after a conversion or a normalization, which keep
    its recorded config) takes its family's registered size; the channels are its ``in_chans``
    (or its first convolution's input channels). The one resolver every tool uses: a caller that
    gets ``None`` asks the user for the size rather than guessing one."""
    cfg = getattr(model, "sepconv_config", None) or {}
    name = cfg.get("name")
    if not isinstance(name, str) or name not in _MODELS:
        return None
    c, h, w = _MODELS[name].input_size
    chans = (cfg.get("kwargs") or {}).get("in_chans")
    if not isinstance(chans, int) or isinstance(chans, bool):
        first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
        chans = first.in_channels if first is not None else c
    return (int(chans), int(h), int(w))
