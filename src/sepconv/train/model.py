"""The model a run trains: built from the registry or a saved directory, then checked against the
data (input channels, classes) and the memory budget before any training.
"""

from __future__ import annotations

import inspect

import torch
from torch import Tensor, nn

from ..errors import ConfigError, SepconvError
from ..guard import check_finite, check_memory, format_bytes, forward_memory, meta_forward, model_bytes
from ..io import load_model
from ..models import create_model, model_info
from .config import TrainConfig
from .hooks import Hooks

__all__ = ["build_model"]


def build_model(cfg: TrainConfig, num_classes: int, in_chans: int, hooks: Hooks,
                trust_code: bool = False, image_size: tuple[int, int] | None = None) -> nn.Module:
    """The model a run trains: a saved model (``init``) or a registry model, then ``prepare`` hooks.

    ``image_size``: the data's ``(H, W)``, given to a registry model whose builder takes an
    ``image_size`` (the Lipschitz family: its norms are computed at that size and its flattened
    head reads that map) unless ``model_kwargs`` sets one -- so ``--data mnist`` builds a 28x28 model.

    ``trust_code``: let ``init``'s ``config.json`` name a factory to import and run (refused by
    default; see :func:`sepconv.io.build_from_config`). ``model_kwargs`` may not set what the run
    sets itself (the data's ``num_classes`` and ``in_chans``, ``conv``, ``width``, the model
    ``name``) to another value: a :class:`ConfigError` names both values; nor may it be given
    with ``init`` (the directory's ``config.json`` defines the model)."""
    if cfg.init:
        if cfg.model_kwargs:
            key = next(iter(cfg.model_kwargs))
            raise ConfigError(f"--model-arg {key}={cfg.model_kwargs[key]!r:.40} does not apply with --init {cfg.init} "
                              "(the directory's config.json defines the model)")
        model = load_model(cfg.init, trust_code=trust_code)
    else:
        kwargs = dict(cfg.model_kwargs)
        own = {"num_classes": (num_classes, f"the {num_classes} classes of the data ({cfg.data})"),
               "in_chans": (in_chans, f"the {in_chans} input channels of the data ({cfg.data})"),
               "conv": (cfg.conv, f"--conv {cfg.conv}"), "width": (cfg.width, f"--width {cfg.width:g}"),
               "name": (cfg.model, f"--model {cfg.model}")}
        for key, (value, what) in own.items():
            if key in kwargs:
                if not (type(kwargs[key]) in (int, float, str) and kwargs[key] == value):
                    raise ConfigError(f"--model-arg {key}={kwargs[key]!r:.40} clashes with {what}")
                del kwargs[key]  # the same value twice: harmless
        if image_size is not None and "image_size" not in kwargs and _takes(cfg.model, "image_size"):
            kwargs["image_size"] = tuple(image_size)
        model = create_model(cfg.model, num_classes=num_classes, in_chans=in_chans, conv=cfg.conv,
                             width=cfg.width, **kwargs)
    for prep in hooks.prepare:
        model = prep(model)
    return model


def _takes(name: str, arg: str) -> bool:
    """Whether the registry model ``name``'s builder has a parameter ``arg`` (False for an unknown name:
    ``create_model`` then says what is wrong)."""
    try:
        return arg in inspect.signature(model_info(name).fn).parameters
    except SepconvError:
        return False


def _model_io(model: nn.Module, input_shape: tuple[int, int, int]) -> tuple[int | None, int | None]:
    """(input channels of the first Conv2d, classes of the output) of ``model``; the classes from a
    forward pass on the ``meta`` device (shapes only), else the last Linear layer. ``None`` where
    the model does not say."""
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    chans = first.in_channels if first is not None else None
    classes = None
    if chans in (None, input_shape[0]):
        y = meta_forward(model, input_shape, batch=2)  # None: a model that cannot run on meta
        if isinstance(y, Tensor) and y.ndim == 2:
            classes = int(y.shape[1])
    if classes is None:
        last = [m for m in model.modules() if isinstance(m, nn.Linear)]
        classes = last[-1].out_features if last else None
    return chans, classes


def _check_fits_data(model: nn.Module, cfg: TrainConfig, num_classes: int, input_shape: tuple[int, int, int]) -> None:
    """A :class:`ConfigError` naming both numbers when the model's input channels or classes are
    not the data's (an ``init`` directory made for other data)."""
    src = f"--init {cfg.init}" if cfg.init else f"model {cfg.model!r}"
    chans, classes = _model_io(model, input_shape)
    if chans is not None and chans != input_shape[0]:
        raise ConfigError(f"{src} takes {chans} input channels, but the data ({cfg.data}) has {input_shape[0]}")
    if classes is not None and classes != num_classes:
        raise ConfigError(f"{src} has {classes} output classes, but the data ({cfg.data}) has {num_classes}")


def _check_step_memory(model: nn.Module, cfg: TrainConfig, input_shape: tuple[int, int, int], batch: int,
                       eval_batch: int) -> None:
    """Refuse (:class:`~sepconv.errors.ResourceError`, with the estimate) a run whose training step
    would need more than the memory budget: the activations a forward pass keeps for the backward
    (:func:`sepconv.guard.forward_memory`, on the ``meta`` device), or those of an evaluation
    batch, plus the weights, their gradients and the optimizer's state. An estimate (the backward
    pass's transient buffers are not counted), meant to refuse what cannot fit, not to be tight."""
    with torch.random.fork_rng(devices=[]):  # the estimate must not move the run's random streams
        act = forward_memory(model, input_shape, batch, training=True)
        ev = forward_memory(model, input_shape, eval_batch, training=False)
    if act is None and ev is None:
        return
    states = {"sgd": 1 if cfg.momentum > 0 else 0, "adamw": 2}[cfg.optimizer]
    weights = model_bytes(model)
    need = max(act or 0, ev or 0) + weights * (2 + states)
    shape = "x".join(map(str, input_shape))
    check_memory(need, f"a training step (batch {batch} of {shape} images: activations "
                       f"{format_bytes(max(act or 0, ev or 0))}, weights, gradients and optimizer state "
                       f"{format_bytes(weights * (2 + states))})",
                 hint="lower --batch-size, --image-size or --width")


def _nonfinite_param(model: nn.Module) -> str | None:
    try:
        check_finite(model)
    except ConfigError as e:
        return str(e)
    return None
