"""Spectral normalization of a whole model: :func:`spectral_normalize` and its undoing.

:func:`spectral_normalize` plans which layers to normalize (:func:`_plan`), finds the input size
each one sees from one dry forward pass, gives each layer its parametrization
(:mod:`sepconv.lipschitz.parametrizations`) and records the step in the model's recipe, which
:func:`sepconv.io.load_model` replays (:func:`_replay`). The ``method`` names are normalize's own
modes (``dsc``, ``operator``, ``reshape``) and the registered spectral methods usable in training
(:func:`full_conv_methods`), read from :mod:`sepconv.spectral.methods` when called.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..errors import ConfigError, UnsupportedLayerError
from ..lipschitz.parametrizations import (
    BatchNormLipschitz,
    BoundNorm,
    DepthwiseFFTNorm,
    DepthwiseGroup,
    MatrixNorm,
    OperatorNorm,
    ReshapeNorm,
)
from ..models import default_input_shape
from ..recipes import record_recipe, register_recipe
from ..spectral.methods import method_names
from ..spectral.network import layer_inputs
from ..spectral.spec import ConvSpec

__all__ = ["MAX_POWER_ITERATIONS", "MODES", "LayerSN", "SNSummary", "full_conv_methods", "normalize_methods",
           "remove_spectral_normalization", "spectral_normalize"]

MODES = ("clip", "scale")


def full_conv_methods() -> tuple[str, ...]:
    """What a full conv may be normalized by (``full_conv`` of ``dsc``, or ``method`` itself):
    ``operator`` (power iteration, an estimate) and every registered spectral method that is
    differentiable and exact or certified (:func:`sepconv.spectral.method_names`), in registry order."""
    usable = method_names(kind=("exact", "certified"), differentiable=True)
    return tuple(dict.fromkeys(("operator", *(m for m in usable if m not in ("dsc", "reshape")))))


def normalize_methods() -> tuple[str, ...]:
    """The ``method`` choices of :func:`spectral_normalize` (``sepconv train --sn``): ``dsc``, those of
    :func:`full_conv_methods`, and ``reshape`` (torch's value, for comparison)."""
    return ("dsc", *full_conv_methods(), "reshape")


@dataclass
class LayerSN:
    """What :func:`spectral_normalize` did to one layer."""

    name: str
    module: str
    parametrization: str
    geometry: str
    in_size: tuple[int, ...] | None
    certified: bool


@dataclass
class SNSummary:
    """Result of :func:`spectral_normalize`: one :class:`LayerSN` per normalized layer, plus the
    layers left alone and why. ``certified``: every normalized layer's eval-mode norm is
    guaranteed ``<= target``."""

    method: str
    target: float
    mode: str
    layers: list[LayerSN] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def certified(self) -> bool:
        return all(r.certified for r in self.layers)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["certified"] = self.certified
        return d

    def __str__(self) -> str:
        counts: dict[str, int] = {}
        for r in self.layers:
            counts[r.parametrization] = counts.get(r.parametrization, 0) + 1
        head = (f"spectral_normalize(method={self.method!r}, target={self.target:g}, mode={self.mode!r}): "
                f"{len(self.layers)} layers ({', '.join(f'{v} {k}' for k, v in counts.items())}); "
                f"{'certified' if self.certified else 'NOT certified'} in eval mode")
        width = max([len(r.name) for r in self.layers] + [5])
        lines = [head] + [f"  {r.name:<{width}}  {r.module:<12} {r.parametrization:<18} {r.geometry}"
                          f"{'' if r.certified else '  [not certified]'}" for r in self.layers]
        lines += [f"  {n:<{width}}  skipped: {why}" for n, why in self.skipped]
        return "\n".join(lines)


_OURS = (DepthwiseFFTNorm, MatrixNorm, OperatorNorm, BoundNorm, BatchNormLipschitz)


def _is_depthwise(conv: nn.Conv2d) -> bool:
    """A depthwise conv: one group per input channel, a spatial kernel. A 1 -> 1 conv (the first
    depthwise conv of a separable model on grayscale input) is one too; a 1 -> m regular stem is
    left to ``full_conv`` (its FFT normalization costs accuracy, see :func:`spectral_normalize`)."""
    return (conv.groups == conv.in_channels and (conv.in_channels > 1 or conv.out_channels == 1)
            and tuple(conv.kernel_size) != (1, 1))


def _is_pixelwise_matrix(conv: nn.Conv2d) -> bool:
    """1x1 kernel reading no padded value that is a copy (zero padding, or none): the operator is
    ``I (x) W`` on the output pixels, so its norm is the matrix norm, at any input size and stride."""
    pads = conv.padding if not isinstance(conv.padding, str) else (0, 0)
    return tuple(conv.kernel_size) == (1, 1) and (conv.padding_mode == "zeros" or tuple(pads) == (0, 0))


def _resolve_in_size(model: nn.Module, in_size) -> tuple[int, int, int]:
    if in_size is None:
        shape = default_input_shape(model)  # a registry model's size
        if shape is None:
            raise ConfigError("spectral_normalize: in_size is needed (the model's input (C, H, W) or (H, W)): "
                              "the layers' input sizes come from one forward pass")
        return shape
    if isinstance(in_size, int):
        in_size = (in_size, in_size)
    in_size = tuple(int(v) for v in in_size)
    if len(in_size) == 2:
        first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
        if first is None:
            raise ConfigError("spectral_normalize: in_size (H, W) needs a Conv2d to tell the channels; give (C, H, W)")
        in_size = (first.in_channels, *in_size)
    if len(in_size) != 3 or min(in_size) < 1:
        raise ConfigError(f"spectral_normalize: in_size must be (C, H, W) or (H, W) of positive ints, got {in_size}")
    return in_size  # type: ignore[return-value]


@dataclass(frozen=True)
class _Settings:
    """The validated arguments of one :func:`spectral_normalize` call (``full_conv``: what full
    convs get under ``dsc``; the others get ``method`` itself)."""

    method: str
    target: float
    mode: str
    n_power_iterations: int
    per_channel: bool  # as given (DepthwiseFFTNorm keeps it)
    full_conv: str

    @property
    def conv_method(self) -> str:
        """The method of a conv that is neither depthwise nor a matrix under ``dsc``."""
        return self.full_conv if self.method == "dsc" else self.method


def _check_args(method, target, mode, n_power_iterations, per_channel, full_conv) -> _Settings:
    methods = normalize_methods()
    if method not in methods:
        raise ConfigError(f"spectral_normalize: unknown method {method!r}; choose one of {', '.join(methods)}")
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not (math.isfinite(target) and target > 0):
        raise ConfigError(f"spectral_normalize: target must be a positive finite number, got {target!r}")
    if mode not in MODES:
        raise ConfigError(f"spectral_normalize: mode must be 'clip' or 'scale', got {mode!r}")
    if not (isinstance(n_power_iterations, int) and n_power_iterations >= 1):
        raise ConfigError(f"spectral_normalize: n_power_iterations must be a positive int, got {n_power_iterations!r}")
    if full_conv is not None and method != "dsc":
        raise ConfigError(f"spectral_normalize: full_conv applies to method 'dsc' only, not {method!r}")
    choices = full_conv_methods()
    if (full_conv or "operator") not in choices:
        raise ConfigError(f"spectral_normalize: full_conv must be one of {', '.join(choices)}, got {full_conv!r}")
    return _Settings(method, float(target), mode, n_power_iterations, per_channel, full_conv or "operator")


def _plan(model: nn.Module, method: str, batchnorm: bool) -> list[tuple[str, nn.Module, str]]:
    """``(name, module, kind)`` for every layer to normalize; kind in dw, pw, full, linear, bn, other."""
    plan = []
    for name, mod in model.named_modules():
        kind = None
        if isinstance(mod, nn.Conv2d) and not isinstance(mod, nn.modules.conv._ConvTransposeNd):
            kind = "dw" if _is_depthwise(mod) else "pw" if _is_pixelwise_matrix(mod) else "full"
        elif isinstance(mod, nn.Linear):
            kind = "linear"
        elif isinstance(mod, nn.modules.conv._ConvNd):
            if method != "reshape":
                raise UnsupportedLayerError(
                    f"spectral_normalize: layer {name!r} ({type(mod).__name__}) cannot be bounded by method "
                    f"{method!r} (only Conv2d and Linear; method 'reshape' normalizes any conv, without a bound)")
            kind = "other"
        elif isinstance(mod, nn.Bilinear):
            raise UnsupportedLayerError(f"spectral_normalize: layer {name!r} (Bilinear) has no operator norm to bound")
        elif batchnorm and isinstance(mod, nn.modules.batchnorm._BatchNorm):
            if mod.weight is None or mod.running_var is None:
                raise UnsupportedLayerError(
                    f"spectral_normalize: layer {name!r} ({type(mod).__name__}) needs affine=True and running "
                    "statistics for batchnorm=True")
            kind = "bn"
        if kind is None:
            continue
        if parametrize.is_parametrized(mod, "weight"):
            raise ConfigError(f"spectral_normalize: layer {name!r} is already parametrized (normalized twice?)")
        if not bool(torch.isfinite(mod.weight.detach()).all()):
            raise ConfigError(f"spectral_normalize: layer {name!r} ({type(mod).__name__}) has NaN or Inf weights")
        plan.append((name, mod, kind))
    return plan


def _needs_spec(kind: str, method: str) -> bool:
    """Whether the layer's input size enters its norm (then a dry forward pass must find it)."""
    return (kind in ("dw", "full") and method != "reshape") or (kind == "pw" and method == "operator")


def _layer_sizes(model: nn.Module, plan: list, method: str, in_size) -> tuple[tuple[int, int, int] | None, dict]:
    """``(model input shape, {name: (module, input shape)})`` from one dry forward pass, when a
    planned layer needs its input size; ``(None, {})`` otherwise."""
    if not any(_needs_spec(kind, method) for _, _, kind in plan):
        return None, {}
    shape = _resolve_in_size(model, in_size)
    try:
        return shape, layer_inputs(model, shape)
    except RuntimeError as e:
        raise ConfigError(f"spectral_normalize: a forward pass on an input of shape {shape} failed "
                          f"({' '.join(str(e).split())[:160]})") from None


def _parametrization(mod: nn.Module, kind: str, spec: ConvSpec | None, s: _Settings,
                     group: DepthwiseGroup) -> nn.Module:
    """The parametrization of one planned layer (see the table of :mod:`sepconv.normalize`)."""
    w = mod.weight.detach()
    kw = dict(target=s.target, mode=s.mode)
    if kind == "bn":
        return BatchNormLipschitz(mod, **kw)
    if kind == "linear" or (kind == "pw" and s.method == "dsc"):
        return MatrixNorm(w, groups=getattr(mod, "groups", 1), n_power_iterations=s.n_power_iterations, **kw)
    if s.method == "reshape":
        return ReshapeNorm(w, dim=1 if isinstance(mod, nn.modules.conv._ConvTransposeNd) else 0,
                           n_power_iterations=s.n_power_iterations, **kw)
    if kind == "dw" and s.method == "dsc":
        return DepthwiseFFTNorm(spec, per_channel=s.per_channel, group=group, conv=mod, **kw)
    if s.conv_method == "operator":
        return OperatorNorm(w, spec, n_power_iterations=s.n_power_iterations, **kw)
    return BoundNorm(spec if kind != "pw" else ConvSpec((1, 1), groups=mod.groups), method=s.conv_method, **kw)


def _layer_summary(name: str, mod: nn.Module, kind: str, p: nn.Module, spec: ConvSpec | None,
                   seen: dict) -> LayerSN:
    # NB: torch's reshape value is the exact norm of an ungrouped 1x1 conv, so that one is certified too
    certified = p.certified or (isinstance(p, ReshapeNorm) and kind == "pw" and mod.groups == 1)
    if spec is not None:
        geometry = f"{mod.in_channels}->{mod.out_channels} {spec.describe(mod.kernel_size)}"
    elif kind == "bn":
        geometry = f"{mod.num_features} channels"
    elif kind == "linear":
        geometry = f"{mod.in_features}->{mod.out_features}"
    else:
        geometry = f"{mod.in_channels}->{mod.out_channels} k{'x'.join(map(str, mod.kernel_size))} g{mod.groups}"
    return LayerSN(name, type(mod).__name__.replace("Parametrized", ""), type(p).__name__, geometry,
                   tuple(seen[name][1]) if name in seen else None, bool(certified))


def spectral_normalize(model: nn.Module, method: str = "dsc", target: float = 1.0, mode: str = "clip",
                       in_size: Sequence[int] | int | None = None, batchnorm: bool = False,
                       n_power_iterations: int = 1, per_channel: bool = False,
                       full_conv: str | None = None) -> SNSummary:
    """Spectrally normalize ``model`` in place; return what was done (:class:`SNSummary`).

    ``method``:

    * ``dsc`` (Runkel et al. 2021, arXiv 2102.06496): depthwise convs -> :class:`DepthwiseFFTNorm`
      (all of them batched in one DFT per forward; ``per_channel`` divides each channel by its
      own factor), pointwise convs and ``Linear`` -> :class:`MatrixNorm`, remaining full convs ->
      ``full_conv``: ``operator`` (default, :class:`OperatorNorm`: an estimate, cheapest for wide
      full convs), or a registered differentiable certified (or exact) method (:class:`BoundNorm`):
      ``fft`` (the circular-embedding bound, tight for the stem convs separable networks have;
      certifies the whole eval-mode model, but a MobileNetV2 trained on 16x16 digits reached 0.56
      test accuracy with it against 0.80 with ``operator``), ``fantastic4``, ``gram``, ``exact``;
    * ``operator`` (:class:`OperatorNorm`) or a registered method of :func:`full_conv_methods`
      (``fantastic4``, ``gram``, ``fft``, ``exact``, ...; :class:`BoundNorm`): that method for every
      conv, :class:`MatrixNorm` for ``Linear``;
    * ``reshape``: torch's reshape value for every conv (:class:`ReshapeNorm`), for comparison.

    ``target`` > 0, ``mode`` ``clip`` (shrink only) or ``scale``; ``batchnorm=True`` also bounds
    each BatchNorm's eval-mode Lipschitz constant (:class:`BatchNormLipschitz`).
    ``in_size``: the model's input ``(C, H, W)`` or ``(H, W)`` for the one dry forward pass that
    records every conv's input size (default: the registered size of a sepconv model).
    The step is recorded in the model's recipe, so :func:`sepconv.io.save_model` /
    :func:`~sepconv.io.load_model` round-trip it; :func:`remove_spectral_normalization` bakes it.
    """
    s = _check_args(method, target, mode, n_power_iterations, per_channel, full_conv)
    plan = _plan(model, method, batchnorm)
    if not any(kind != "bn" for _, _, kind in plan):
        raise UnsupportedLayerError(
            f"spectral_normalize: {type(model).__name__} has no layer to normalize (no Conv2d or Linear)")
    shape, seen = _layer_sizes(model, plan, method, in_size)
    summary = SNSummary(method, s.target, mode)
    group = DepthwiseGroup()
    for name, mod, kind in plan:
        spec = None
        if _needs_spec(kind, method):
            if name not in seen:
                summary.skipped.append((name, "not called by a forward pass; input size unknown"))
                continue
            spec = ConvSpec.of(mod, seen[name][1][-2:])
        p = _parametrization(mod, kind, spec, s, group)
        parametrize.register_parametrization(mod, "weight", p)
        summary.layers.append(_layer_summary(name, mod, kind, p, spec, seen))
    if group.convs:
        model.register_forward_pre_hook(group.begin)
        model.register_forward_hook(group.end)
        model._sepconv_dw_group = group
    record_recipe(model, "spectral_normalize", method=method, target=s.target, mode=mode,
                  in_size=list(shape) if shape is not None else None, batchnorm=bool(batchnorm),
                  n_power_iterations=n_power_iterations, per_channel=bool(per_channel),
                  full_conv=s.full_conv if method == "dsc" else None)
    return summary


#: Most power-iteration steps per training step a replayed recipe may ask for (a file from
#: elsewhere must not buy unbounded work per forward pass).
MAX_POWER_ITERATIONS = 100


@register_recipe("spectral_normalize")
def _replay(model: nn.Module, step: dict) -> nn.Module:
    args = {k: v for k, v in step.items() if k != "op"}
    known = set(inspect.signature(spectral_normalize).parameters) - {"model"}
    unknown = sorted(set(args) - known)
    if unknown:
        raise ConfigError(f"spectral_normalize recipe: unknown argument {unknown[0]!r:.40}")
    n = args.get("n_power_iterations", 1)
    if isinstance(n, int) and n > MAX_POWER_ITERATIONS:
        raise ConfigError(f"spectral_normalize recipe: n_power_iterations {n} is above {MAX_POWER_ITERATIONS}")
    size = args.get("in_size")
    if size is not None and not (isinstance(size, list) and all(isinstance(v, int) and not isinstance(v, bool)
                                                                for v in size)):
        raise ConfigError(f"spectral_normalize recipe: in_size must be a list of integers, got {size!r:.60}")
    spectral_normalize(model, **args)
    return model


def remove_spectral_normalization(model: nn.Module) -> nn.Module:
    """Bake the normalization into plain weights and remove every parametrization
    :func:`spectral_normalize` registered, its forward hooks and its recipe step.

    The weights baked are the **eval-mode** ones (exact matrix norms, the current running
    variance), so the baked model computes what the normalized model computes in eval mode."""
    was_training = model.training
    model.eval()
    try:
        found = False
        for mod in model.modules():
            if not parametrize.is_parametrized(mod, "weight"):
                continue
            plist = mod.parametrizations.weight
            if not all(isinstance(p, _OURS) for p in plist):
                continue
            found = True
            parametrize.remove_parametrizations(mod, "weight", leave_parametrized=True)
    finally:
        model.train(was_training)
    group = model.__dict__.pop("_sepconv_dw_group", None)
    if group is not None:
        for hooks in (model._forward_pre_hooks, model._forward_hooks):
            for k in [k for k, h in hooks.items() if getattr(h, "__self__", None) is group]:
                del hooks[k]
    if not found:
        raise ConfigError(f"remove_spectral_normalization: {type(model).__name__} is not spectrally normalized")
    cfg = getattr(model, "sepconv_config", None)
    if cfg and cfg.get("recipe"):
        recipe = cfg["recipe"]
        last = max(i for i, s in enumerate(recipe) if s.get("op") == "spectral_normalize") \
            if any(s.get("op") == "spectral_normalize" for s in recipe) else None
        if last is not None:
            del recipe[last]
    return model
