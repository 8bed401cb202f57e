"""Model surgery: convert the trained regular convs of a model into separable blocks.

:func:`convert` picks the eligible convs (``nn.Conv2d`` with ``groups=1`` and a kernel
larger than 1x1, or the user's selection), chooses a rank per layer (:mod:`.ranks`), fits the
factors of the conversion target (:mod:`.targets`: data-free SVD, or on calibration images,
:mod:`.calibration`), replaces each conv by the target's block and returns
``(new_model, ConversionReport)`` (:mod:`.report`). The input model is never modified. The
targets -- ``"dsc"``, ``"bsconv_u"``, ``"bsconv_s"``, ``"channel"`` and any registered with
:func:`~sepconv.decompose.targets.register_target` -- are listed in :mod:`.targets`.

Ranks: ``rank`` (an int for every layer, ``"full"`` = exact, or ``{layer: int}``),
``energy`` (per layer the smallest rank whose mean retained energy of the weight spectra
reaches it, Network Decoupling's rule), or ``speedup`` (the converted layers' FLOPs come to
about ``1 / speedup`` of the originals: every layer first gets the largest rank within its
own share ``flops / speedup`` (at least 1), then ranks are raised greedily by best gain in
retained energy per FLOP while the total stays within the budget). Ranks are always chosen
from the (data-free) weight spectra.

Data: ``method="svd"`` fits without data; ``method="gsvd"`` fits on patches of calibration
images (``data``: a tensor ``(N, C, H, W)``, a sepconv dataset, or an iterable of
``(x, y)`` batches; ``num_samples`` images, ``max_patches`` sampled patch positions per
layer). With ``multilayer=True`` each layer is fit on its inputs in the partly converted
network (``xh``, earlier layers already converted) against the original network's
responses (``W x``); with ``multilayer=False`` on the original inputs. BatchNorm is not
folded: it stays after the converted conv and sees the same (approximated) pre-activations,
so folding is not needed for correctness. Layers with a bias are fit about the patch means
and their bias is re-fitted (``b' = b + W E[x] - W' E[xh]``); bias-free layers stay bias-free.

The report's per-layer ``output_error`` is the relative error of the layer's output in
the converted network against the original network: on the calibration patches when
``data`` is given (inputs from the converted prefix), else on one Gaussian random input of
the layer's size, at most 16 x 16 (the layer alone); ``local_error`` (with data only) is
the layer alone on the original inputs.
"""

from __future__ import annotations

import copy
import math
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..errors import ConfigError, DataError, UnsupportedLayerError
from ..guard import check_finite
from ..models import count_params, default_input_shape
from ..probe import dry_forward, input_dtype
from ..recipes import record_recipe, register_recipe
from . import factor as fz
from .calibration import Calibration, calibration_images
from .ranks import choose_ranks
from .report import RANDOM_INPUT_MAX as RANDOM_INPUT_MAX  # re-exported: it lived here before .report
from .report import ConversionReport, conversion_totals, layer_record
from .targets import ConversionTarget, conv_macs, get_target, target_names

__all__ = [  # noqa: F822  (TARGETS is served by the module __getattr__ below)
    "ConversionReport", "METHODS", "TARGETS", "build_block", "convert", "convert_layer", "dense_weight", "full_rank",
    "layer_macs",
]

#: The ways to fit: data-free (``"svd"``) or on calibration images (``"gsvd"``).
METHODS = ("svd", "gsvd")


def __getattr__(name: str):
    # NB: TARGETS is read from the registry on every access, so a target registered later (a
    # plug-in, a test) is in it too; a module-level tuple would freeze the built-ins.
    if name == "TARGETS":
        return target_names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ----------------------------------------------------------------- one layer (by target name)


def build_block(to: str, conv: nn.Conv2d, rank: int, mid: int | None = None) -> nn.Module:
    """The (uninitialised) block of target ``to`` that replaces ``conv`` at ``rank``; ``mid`` is
    BSConv-S's ``M'`` (:meth:`ConversionTarget.build`)."""
    return get_target(to).build(conv, rank, mid)


def dense_weight(to: str, block: nn.Module) -> Tensor:
    """The ``(n, c, kh, kw)`` kernel of the regular conv that ``block`` (from :func:`build_block`) computes."""
    return get_target(to).dense_weight(block)


def full_rank(to: str, conv: nn.Conv2d) -> int:
    """The rank at which conversion to ``to`` is exact: ``min(n, K)`` (DSC), ``min(c, K)``
    (BSConv), ``min(n, c K)`` (channel)."""
    return get_target(to).full_rank(conv)


def layer_macs(to: str | None, conv: nn.Conv2d, in_hw: tuple[int, int], rank: int = 1, mid: int | None = None) -> int:
    """Multiply-adds of ``conv`` (``to=None``) or of its conversion to ``to`` at ``rank`` on one
    input of size ``in_hw`` (docs/decomposition.md Sec. 1 cost; BSConv's pointwise runs at input
    resolution; :meth:`ConversionTarget.macs`)."""
    return conv_macs(conv, in_hw) if to is None else get_target(to).macs(conv, in_hw, rank, mid)


@torch.no_grad()
def convert_layer(conv: nn.Conv2d, to: str = "dsc", rank: int = 1, mid: int | None = None,
                  mom: fz.Moments | None = None) -> nn.Module:
    """Convert one ``nn.Conv2d`` (groups 1) into the block ``to`` at ``rank``: data-free
    (``mom=None``) or fit to the patch :class:`~sepconv.decompose.factor.Moments`."""
    if not isinstance(conv, nn.Conv2d) or conv.groups != 1:
        raise UnsupportedLayerError(f"convert_layer: expected an nn.Conv2d with groups=1, got {conv!r}")
    return _convert_layer(get_target(to), conv, rank, mid, mom)


@torch.no_grad()
def _convert_layer(target: ConversionTarget, conv: nn.Conv2d, rank: int, mid: int | None,
                   mom: fz.Moments | None) -> nn.Module:
    w = conv.weight.detach()
    block = target.build(conv, rank, mid)
    target.fit(block, w, rank, mid, mom)
    bias = target.output_bias(block)
    if bias is not None:
        b = conv.bias.detach().to(torch.float64)
        if mom is not None and mom.centered:  # b' = b + W E[x] - W' E[xh]
            wf = w.reshape(w.shape[0], -1).to(torch.float64)
            af = target.dense_weight(block).reshape(w.shape[0], -1).to(torch.float64)
            b = b + wf @ mom.mean_x - af @ mom.mean_h
        bias.copy_(b.to(bias.dtype))
    return block


# ----------------------------------------------------------------- convert


def _check_args(target, rank, energy, speedup, method, data, num_samples, max_patches, p):
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; choose 'svd' (data-free) or 'gsvd' (needs data)")
    given = [k for k, v in (("rank", rank), ("energy", energy), ("speedup", speedup)) if v is not None]
    if len(given) > 1:
        raise ConfigError(f"give exactly one of rank, energy, speedup (got {', '.join(given)})")
    if energy is not None and (isinstance(energy, bool) or not isinstance(energy, (int, float))
                               or not 0 < energy <= 1):
        raise ConfigError(f"energy must be in (0, 1], got {energy!r}")
    if speedup is not None and (isinstance(speedup, bool) or not isinstance(speedup, (int, float))
                                or not 1 < speedup < math.inf):
        raise ConfigError(f"speedup must be a finite number > 1, got {speedup!r}")
    if rank is not None and not isinstance(rank, dict) and rank != "full" and (
            isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ConfigError(f"rank must be a positive integer, 'full' or a {{layer: rank}} dict, got {rank!r}")
    if method == "gsvd" and data is None:
        raise ConfigError("method='gsvd' fits on calibration images: pass data= (a tensor (N, C, H, W), a dataset "
                          "or an iterable of (x, y) batches), or use method='svd'")
    for nm, v in (("num_samples", num_samples), ("max_patches", max_patches)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"{nm} must be a positive integer, got {v!r}")
    if p is not None and (not target.has_mid or not 0 < p <= 1):
        takes = " or ".join(repr(n) for n in target_names() if get_target(n).has_mid)
        raise ConfigError(f"p (the BSConv-S subspace fraction) must be in (0, 1] and only with to={takes}, got {p!r}")


def convert(model: nn.Module, to: str = "dsc", rank: int | str | dict | None = None, energy: float | None = None,
            speedup: float | None = None, method: str = "svd", data: Any = None,
            layers: Iterable[str] | Callable[[str, nn.Module], bool] | None = None, multilayer: bool = True,
            *, input_size: tuple[int, int, int] | None = None, num_samples: int = 512, max_patches: int = 4096,
            batch_size: int = 64, p: float | None = None, seed: int = 0,
            progress: bool | None = None) -> tuple[nn.Module, ConversionReport]:
    """Convert the regular convs of ``model`` into separable blocks; returns ``(new_model, report)``.

    See the module docstring for targets, rank rules, data and the report. ``to``: a registered
    target (:func:`~sepconv.decompose.targets.target_names`). Exactly one of
    ``rank`` / ``energy`` / ``speedup`` (default ``rank=1``). ``layers``: names, or a predicate
    ``(name, module) -> bool`` (default: every ``nn.Conv2d`` with groups 1 and k > 1).
    ``p`` (BSConv-S only): subspace width ``M' = min(c, max(4, ceil(p c)))`` as in BSConv-S
    (default ``M' = min(n r, c)``, which keeps the BSConv-U product exactly). The result
    keeps ``sepconv_config`` with a ``convert`` recipe step, so ``save_model`` /
    ``load_model`` round-trip.
    """
    t_start = time.perf_counter()
    target = get_target(to)
    _check_args(target, rank, energy, speedup, method, data, num_samples, max_patches, p)
    if rank is None and energy is None and speedup is None:
        rank = 1
    dtype, device = input_dtype(model)
    check_finite(model, "convert")
    images = None if data is None else calibration_images(data, num_samples, seed, dtype, device)
    new = copy.deepcopy(model)
    seen, flops_before, shape = _probe(new, images, input_size, speedup)
    params_before = count_params(new)
    convs = _select(new, seen, layers)
    ranks = choose_ranks(target, convs, rank, energy, speedup, p)
    mids = {nm: target.mid_channels(convs[nm][0], ranks[nm], p) for nm in convs}
    calib = None if images is None else Calibration(images, max_patches, batch_size, seed)
    show = sys.stderr.isatty() if progress is None else progress
    bar = tqdm(list(convs), desc=f"convert -> {to} ({method})", leave=False, dynamic_ncols=True) if show else None
    records = _fit_layers(model, new, target, convs, ranks, mids, calib, method == "gsvd", multilayer, bar)
    new.train(model.training)
    record_recipe(new, "convert", to=to, layers=[{"name": nm, "rank": ranks[nm], "mid": mids[nm]} for nm in convs])
    rep = ConversionReport(layers=records, settings={
        "to": to, "method": method, "rank": rank if not isinstance(rank, dict) else "per-layer",
        "energy": energy, "speedup": speedup, "multilayer": multilayer if method == "gsvd" else None,
        "num_samples": int(images.shape[0]) if images is not None else 0, "max_patches": max_patches,
        "input_shape": list(shape) if shape is not None else None, "p": p})
    rep.totals = conversion_totals(records, params_before, count_params(new), flops_before, images is not None,
                                   time.perf_counter() - t_start)
    return new, rep


def _fit_layers(model: nn.Module, new: nn.Module, target: ConversionTarget, convs: dict, ranks: dict, mids: dict,
                calib: Calibration | None, gsvd: bool, multilayer: bool, bar: Iterable | None) -> list[dict]:
    """Replace every conv of ``convs`` in ``new`` (a copy of ``model``) by its fitted block, in
    forward order, and return the report's records. A data-driven fit (``gsvd``) reads the
    original network's patches and, ``multilayer``, those of the partly converted ``new``."""
    names = list(convs)
    # NB: the original's patches come from a copy: convert never runs or touches the caller's model
    px = calib.capture(copy.deepcopy(model), names, convs) if calib is not None else {}
    ph: dict[str, Tensor] = {}
    records = []
    for nm in bar if bar is not None else names:
        conv = convs[nm][0]
        t = time.perf_counter()
        mom = None
        if gsvd:
            if multilayer:
                ph[nm] = calib.capture(new, [nm], convs, stop_after=nm)[nm]
            mom = fz.patch_moments(px[nm], ph.get(nm), centered=conv.bias is not None)
        block = _convert_layer(target, conv, ranks[nm], mids[nm], mom)
        _set_module(new, nm, block)
        records.append({"name": nm, "seconds": time.perf_counter() - t, "_block": block})
    if calib is not None and not (gsvd and multilayer):
        ph = calib.capture(new, names, convs)
    for rec in records:
        conv, in_shape = convs[rec["name"]]
        rec.update(layer_record(target, conv, in_shape, rec.pop("_block"), ranks[rec["name"]], mids[rec["name"]],
                                px.get(rec["name"]), ph.get(rec["name"])))
    return records


# ----------------------------------------------------------------- the model's shapes and the convs to convert


def _probe(model: nn.Module, images: Tensor | None, input_size, speedup) -> tuple[dict, int | None, tuple | None]:
    """``({name: (conv, input shape)}, FLOPs, input shape)`` of the model's ``nn.Conv2d`` layers from
    one dry forward (:func:`sepconv.probe.dry_forward`), in call order. Without an input shape
    (:func:`_input_shape` gives ``None``): every conv in definition order, input shapes and FLOPs unknown."""
    shape = _input_shape(model, images, input_size, speedup)
    if shape is None:
        return {nm: (m, None) for nm, m in model.named_modules() if isinstance(m, nn.Conv2d)}, None, None
    try:
        run = dry_forward(model, shape, record=(nn.Conv2d,), flops=True,
                          where="convert" if images is None else "calibration data")
    except ConfigError as e:
        if images is None:
            raise
        raise DataError(str(e)) from None  # the images do not fit the model: a data error, as before
    return run.inputs, run.flops, shape


def _input_shape(model: nn.Module, images: Tensor | None, input_size, speedup=None) -> tuple[int, ...] | None:
    """The model's input (C, H, W): from the data, ``input_size`` or the registry
    (:func:`sepconv.models.default_input_shape`); ``None`` when none tells it and none is needed
    (a data-free conversion by rank or energy: the factorization needs no input size, only the
    FLOP report does, which is then unknown)."""
    if images is not None:
        return tuple(images.shape[1:])
    if input_size is not None:
        shape = tuple(int(v) for v in input_size)
        if len(shape) != 3 or min(shape) < 1:
            raise ConfigError(f"input_size must be (C, H, W) with positive entries, got {input_size!r}")
        return shape
    shape = default_input_shape(model)
    if shape is not None or speedup is None:
        return shape
    raise ConfigError("convert: speedup weighs the layers by their FLOPs, which need the model's input size; "
                      "pass input_size=(C, H, W) or data")


def _select(model: nn.Module, seen: dict, layers) -> dict[str, tuple[nn.Conv2d, tuple]]:
    """``{name: (conv, input shape)}`` of the convs to convert, in forward order."""
    mods = dict(model.named_modules())
    if layers is None:
        pick = [nm for nm, (m, _) in seen.items() if _eligible(m)]
    elif callable(layers):
        pick = [nm for nm, (m, _) in seen.items() if layers(nm, m)]
    else:
        pick = list(layers) if not isinstance(layers, str) else [layers]
        for nm in pick:
            if nm not in mods:
                raise UnsupportedLayerError(f"layers: the model has no module {nm!r}")
            if nm not in seen:
                raise UnsupportedLayerError(f"layers: {nm!r} is not an nn.Conv2d run by the model's forward pass")
        pick = [nm for nm in seen if nm in set(pick)]
    for nm in pick:
        m = seen[nm][0]
        if m.groups != 1:
            raise UnsupportedLayerError(f"{nm}: grouped/depthwise conv (groups={m.groups}) cannot be converted")
        if hasattr(m, "parametrizations"):
            raise UnsupportedLayerError(f"{nm}: a parametrized conv (e.g. spectrally normalized) cannot be "
                                        "converted; convert before normalizing")
    if not pick:
        raise UnsupportedLayerError("convert: the model has no eligible convolution (nn.Conv2d with groups=1 and "
                                    "a kernel larger than 1x1)")
    return {nm: seen[nm] for nm in pick}


def _eligible(m: nn.Conv2d) -> bool:
    return isinstance(m, nn.Conv2d) and m.groups == 1 and tuple(m.kernel_size) != (1, 1) \
        and not hasattr(m, "parametrizations")


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


# ----------------------------------------------------------------- recipe replay


@register_recipe("convert")
def _replay_convert(model: nn.Module, step: dict) -> nn.Module:
    """Rebuild the structure a :func:`convert` call made (weights are loaded afterwards)."""
    target, layers = get_target(step.get("to"), where="convert recipe"), step.get("layers")
    if not isinstance(layers, list) or not all(isinstance(e, dict) for e in layers):
        raise ConfigError("convert recipe: 'layers' must be a list of {name, rank, mid} objects")
    mods = dict(model.named_modules())
    for entry in layers:
        nm, rank, mid = entry.get("name"), entry.get("rank"), entry.get("mid")
        conv = mods.get(nm) if isinstance(nm, str) else None
        if not isinstance(conv, nn.Conv2d) or conv.groups != 1:
            raise UnsupportedLayerError(f"convert recipe: the rebuilt model has no nn.Conv2d (groups 1) {nm!r:.80}")
        full = target.full_rank(conv)  # a rank is bounded by the layer: no allocation beyond the original's size
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= full:
            raise ConfigError(f"convert recipe: layer {nm!r}: rank must be an integer in 1..{full}, got {rank!r:.40}")
        top = target.max_mid(conv, rank)  # None: the target has no second width, any recorded mid is ignored
        if top is not None and (isinstance(mid, bool) or not isinstance(mid, int) or not 1 <= mid <= top):
            raise ConfigError(f"convert recipe: layer {nm!r}: mid must be an integer in 1..{top}, got {mid!r:.40}")
        _set_module(model, nm, target.build(conv, rank, mid if top is not None else None))
    return model
