"""Model surgery: convert the trained regular convs of a model into separable blocks.

:func:`convert` picks the eligible convs (``nn.Conv2d`` with ``groups=1`` and a kernel
larger than 1x1, or the user's selection), chooses a rank per layer, fits the factors of
:mod:`sepconv.decompose.factor` (data-free SVD, or on calibration images), replaces each
conv by a block of :mod:`sepconv.layers` and returns ``(new_model, ConversionReport)``.
The input model is never modified.

Products (stride, padding, padding mode and dilation on the spatial part; the bias on the
last op):

===============  ===================================================================
``"dsc"``        :class:`~sepconv.layers.DepthwiseSeparableConv2d` with ``depth_multiplier=r``
``"bsconv_u"``   :class:`~sepconv.layers.BSConvU` with ``blueprints=r`` (plain BSConv-U at r = 1)
``"bsconv_s"``   :class:`~sepconv.layers.BSConvS` with ``blueprints=r`` and ``mid_channels=M'``
                 (``pw1`` has orthonormal rows; ``M' = min(n r, c)`` unless ``p`` is given)
``"channel"``    ``nn.Sequential(Conv2d(c, d', k, ...), Conv2d(d', n, 1, bias))`` (Zhang et al.)
===============  ===================================================================

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
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ConfigError, DataError, UnsupportedLayerError
from ..guard import check_finite, check_memory, forward_memory
from ..recipes import record_recipe, register_recipe
from ..layers import (
    BSConvS,
    BSConvU,
    DepthwiseSeparableConv2d,
    bsconv_s_mid_channels,
    compose_blueprint,
    compose_depthwise_separable,
)
from . import factor as fz

TARGETS = ("dsc", "bsconv_u", "bsconv_s", "channel")
#: Largest side of the Gaussian inputs on which data-free conversions measure the output error.
RANDOM_INPUT_MAX = 16
METHODS = ("svd", "gsvd")


# ----------------------------------------------------------------- the report


@dataclass
class ConversionReport:
    """What :func:`convert` did: one record per converted layer and whole-model totals.

    ``layers``: dicts with ``name, shape ("n x c x kh x kw"), geometry, rank, mid_channels,
    energy, params_before, params_after, flops_before, flops_after, weight_error,
    output_error, local_error, seconds``. ``totals``: ``params_before/after`` and
    ``flops_before/after`` of the whole model (:func:`sepconv.models.profile`), the sums over
    the converted layers (``layer_*``), ``mean_output_error``, ``mean_weight_error``,
    ``error_on`` ("calibration" or "random"), ``seconds``. ``settings``: the arguments.
    """

    layers: list[dict] = field(default_factory=list)
    totals: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"settings": dict(self.settings), "layers": [dict(r) for r in self.layers], "totals": dict(self.totals)}

    def table(self) -> str:
        """A fixed-width text table: one row per layer, then the totals."""
        header = ["layer", "shape", "geometry", "rank", "params", "MFLOPs", "w_err", "out_err", "time"]
        rows = []
        for r in self.layers:
            rank = str(r["rank"]) + (f"/{r['mid_channels']}" if r.get("mid_channels") else "")
            rows.append([r["name"], r["shape"], r["geometry"], rank,
                         f"{r['params_before']:,}->{r['params_after']:,}",
                         f"{_mflops(r['flops_before'])}->{_mflops(r['flops_after'])}",
                         f"{r['weight_error']:.4f}", f"{r['output_error']:.4f}", f"{r['seconds'] * 1e3:.0f} ms"])
        widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
        lines = ["  ".join(str(c).ljust(w) if i < 4 else str(c).rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
                 .rstrip() for row in [header] + rows]
        t = self.totals
        lines.append("")
        lines.append(f"{len(self.layers)} layers converted to {self.settings.get('to')} "
                     f"({self.settings.get('method')}); model params {t['params_before']:,} -> {t['params_after']:,} "
                     f"({t['params_after'] / max(t['params_before'], 1):.3f}x), {_flops_change(t)}; "
                     f"mean output error {t['mean_output_error']:.4f} (on {t['error_on']} inputs); "
                     f"{t['seconds']:.2f} s")
        return "\n".join(lines)


def _mflops(v: int | None) -> str:
    return "?" if v is None else f"{v / 1e6:.2f}"


def _flops_change(t: dict) -> str:
    if t["flops_before"] is None:
        return "FLOPs unknown (no input size; pass input_size or data)"
    return (f"FLOPs {t['flops_before'] / 1e6:,.2f}M -> {t['flops_after'] / 1e6:,.2f}M "
            f"({t['flops_after'] / max(t['flops_before'], 1):.3f}x)")


# ----------------------------------------------------------------- blocks


def build_block(to: str, conv: nn.Conv2d, rank: int, mid: int | None = None) -> nn.Module:
    """The (uninitialised) separable block that replaces ``conv`` at ``rank`` (see the module
    docstring); ``mid`` is BSConv-S's ``M'``. Used by :func:`convert` and the recipe replay."""
    n, c = conv.out_channels, conv.in_channels
    fk = dict(device=conv.weight.device, dtype=conv.weight.dtype)
    geo = dict(kernel_size=conv.kernel_size, stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
               bias=conv.bias is not None, padding_mode=conv.padding_mode)
    if to == "dsc":
        return DepthwiseSeparableConv2d(c, n, depth_multiplier=rank, **geo, **fk)
    if to == "bsconv_u":
        return BSConvU(c, n, blueprints=rank, **geo, **fk)
    if to == "bsconv_s":
        return BSConvS(c, n, blueprints=rank, mid_channels=mid, with_bn=False, **geo, **fk)
    if to == "channel":
        return nn.Sequential(
            nn.Conv2d(c, rank, conv.kernel_size, conv.stride, conv.padding, conv.dilation, bias=False,
                      padding_mode=conv.padding_mode, **fk),
            nn.Conv2d(rank, n, 1, bias=conv.bias is not None, **fk))
    raise ConfigError(f"unknown conversion target {to!r}; choose one of {', '.join(TARGETS)}")


def dense_weight(to: str, block: nn.Module) -> Tensor:
    """The ``(n, c, kh, kw)`` kernel of the regular conv that ``block`` (from :func:`build_block`) computes."""
    if to == "dsc":
        return compose_depthwise_separable(block.dw.weight, block.pw.weight, block.dw.in_channels)
    if to == "bsconv_u":
        return compose_blueprint(block.pw.weight, block.dw.weight)
    if to == "bsconv_s":
        return block.dense_weight()
    first, second = block[0].weight, block[1].weight
    return (second[:, :, 0, 0] @ first.reshape(first.shape[0], -1)).reshape(second.shape[0], *first.shape[1:])


def _block_bias(to: str, block: nn.Module) -> nn.Parameter | None:
    return block[1].bias if to == "channel" else block.bias


def full_rank(to: str, conv: nn.Conv2d) -> int:
    """The rank at which conversion to ``to`` is exact: ``min(n, K)`` (DSC), ``min(c, K)``
    (BSConv), ``min(n, c K)`` (channel)."""
    n, c = conv.out_channels, conv.in_channels
    k = conv.kernel_size[0] * conv.kernel_size[1]
    return {"dsc": min(n, k), "bsconv_u": min(c, k), "bsconv_s": min(c, k), "channel": min(n, c * k)}[to]


def _mid(to: str, conv: nn.Conv2d, rank: int, p: float | None) -> int | None:
    if to != "bsconv_s":
        return None
    if p is None:
        return min(conv.out_channels * rank, conv.in_channels)
    return min(bsconv_s_mid_channels(conv.in_channels, p), conv.out_channels * rank)


@torch.no_grad()
def convert_layer(conv: nn.Conv2d, to: str = "dsc", rank: int = 1, mid: int | None = None,
                  mom: fz.Moments | None = None) -> nn.Module:
    """Convert one ``nn.Conv2d`` (groups 1) into the block ``to`` at ``rank``: data-free
    (``mom=None``) or fit to the patch :class:`~sepconv.decompose.factor.Moments`."""
    if not isinstance(conv, nn.Conv2d) or conv.groups != 1:
        raise UnsupportedLayerError(f"convert_layer: expected an nn.Conv2d with groups=1, got {conv!r}")
    w = conv.weight.detach()
    block = build_block(to, conv, rank, mid)
    if to == "dsc":
        dw, pw = fz.depthwise_factors(w, rank, mom)
        block.dw.weight.copy_(dw)
        block.pw.weight.copy_(pw)
    elif to in ("bsconv_u", "bsconv_s"):
        pw, dw = fz.blueprint_factors(w, rank, mom)
        block.dw.weight.copy_(dw)
        if to == "bsconv_u":
            block.pw.weight.copy_(pw)
        else:
            pw1, pw2 = fz.subspace_factors(pw, mid)
            block.pw1.weight.copy_(pw1)
            block.pw2.weight.copy_(pw2)
    else:
        first, second = fz.channel_factors(w, rank, mom)
        block[0].weight.copy_(first)
        block[1].weight.copy_(second)
    bias = _block_bias(to, block)
    if bias is not None:
        b = conv.bias.detach().to(torch.float64)
        if mom is not None and mom.centered:  # b' = b + W E[x] - W' E[xh]
            wf = w.reshape(w.shape[0], -1).to(torch.float64)
            af = dense_weight(to, block).reshape(w.shape[0], -1).to(torch.float64)
            b = b + wf @ mom.mean_x - af @ mom.mean_h
        bias.copy_(b.to(bias.dtype))
    return block


# ----------------------------------------------------------------- costs and ranks


def _out_size(conv: nn.Conv2d, hw: tuple[int, int]) -> tuple[int, int]:
    left, right, top, bottom = conv._reversed_padding_repeated_twice
    pads = ((top, bottom), (left, right))
    return tuple((hw[a] + sum(pads[a]) - conv.dilation[a] * (conv.kernel_size[a] - 1) - 1) // conv.stride[a] + 1
                 for a in range(2))  # type: ignore[return-value]


def layer_macs(to: str | None, conv: nn.Conv2d, in_hw: tuple[int, int], rank: int = 1, mid: int | None = None) -> int:
    """Multiply-adds of ``conv`` (``to=None``) or of its conversion at ``rank`` on one input of
    size ``in_hw`` (reference Sect. 1(f) cost table; BSConv's pointwise runs at input resolution)."""
    n, c = conv.out_channels, conv.in_channels
    k = conv.kernel_size[0] * conv.kernel_size[1]
    ho, wo = _out_size(conv, in_hw)
    out, inp = ho * wo, in_hw[0] * in_hw[1]
    if to is None:
        return n * c * k * out
    if to == "dsc":
        return rank * (c * k + n * c) * out
    if to == "bsconv_u":
        return n * rank * c * inp + n * rank * k * out
    if to == "bsconv_s":
        return c * mid * inp + mid * n * rank * inp + n * rank * k * out
    return rank * c * k * out + n * rank * out


def _layer_params(to: str, conv: nn.Conv2d, rank: int, mid: int | None) -> int:
    n, c = conv.out_channels, conv.in_channels
    k = conv.kernel_size[0] * conv.kernel_size[1]
    b = n if conv.bias is not None else 0
    return b + {"dsc": rank * (c * k + n * c), "bsconv_u": n * rank * c + n * rank * k,
                "bsconv_s": (c * mid + mid * n * rank + n * rank * k) if mid else 0,
                "channel": rank * (c * k + n)}[to]


def _spectrum(to: str, conv: nn.Conv2d) -> Tensor:
    w = conv.weight.detach()
    if to == "dsc":
        return fz.depthwise_spectrum(w)
    if to in ("bsconv_u", "bsconv_s"):
        return fz.blueprint_spectrum(w)
    return fz.channel_spectrum(w)[None]


def _check_int_rank(name: str, r: Any, full: int) -> int:
    if r == "full":
        return full
    if isinstance(r, bool) or not isinstance(r, int):
        raise ConfigError(f"{name}: rank must be a positive integer or 'full', got {r!r}")
    if r < 1 or r > full:
        raise ConfigError(f"{name}: rank {r} is out of range: this layer's full rank is {full} "
                          f"(rank must be in [1, {full}]; pass a {{layer: rank}} dict or layers= to treat it apart)")
    return r


def _choose_ranks(to: str, convs: dict[str, tuple[nn.Conv2d, tuple]], rank, energy, speedup, p) -> dict[str, int]:
    fulls = {nm: full_rank(to, cv) for nm, (cv, _) in convs.items()}
    if rank is not None:
        if isinstance(rank, dict):
            missing = [nm for nm in convs if nm not in rank]
            if missing:
                raise ConfigError(f"rank: no entry for layer {missing[0]!r}")
            return {nm: _check_int_rank(nm, rank[nm], fulls[nm]) for nm in convs}
        return {nm: _check_int_rank(nm, rank, fulls[nm]) for nm in convs}
    spectra = {nm: _spectrum(to, cv) for nm, (cv, _) in convs.items()}
    if energy is not None:
        return {nm: min(fz.energy_rank(spectra[nm], energy), fulls[nm]) for nm in convs}
    # speedup: uniform per-layer share, then a greedy fill by retained energy per FLOP
    cost = {nm: (lambda r, cv=cv, hw=shape[-2:]: layer_macs(to, cv, hw, r, _mid(to, cv, r, p)))
            for nm, (cv, shape) in convs.items()}
    orig = {nm: layer_macs(None, cv, shape[-2:]) for nm, (cv, shape) in convs.items()}
    budget = sum(orig.values()) / speedup
    ranks = {}
    for nm in convs:
        ok = [r for r in range(1, fulls[nm] + 1) if cost[nm](r) <= orig[nm] / speedup]
        ranks[nm] = max(ok) if ok else 1
    total = sum(cost[nm](ranks[nm]) for nm in convs)
    while True:
        best, best_gain = None, 0.0
        for nm in convs:
            r = ranks[nm]
            if r >= fulls[nm]:
                continue
            extra = cost[nm](r + 1) - cost[nm](r)
            if total + extra > budget:
                continue
            gain = (fz.retained_energy(spectra[nm], r + 1) - fz.retained_energy(spectra[nm], r)) / max(extra, 1)
            if best is None or gain > best_gain:
                best, best_gain = nm, gain
        if best is None:
            break
        total += cost[best](ranks[best] + 1) - cost[best](ranks[best])
        ranks[best] += 1
    return ranks


# ----------------------------------------------------------------- calibration data and patches


def _calibration_images(data, num_samples: int, seed: int, dtype, device) -> Tensor:
    if isinstance(data, Tensor):
        x = data[:num_samples]
    elif hasattr(data, "get_batch") and hasattr(data, "__len__"):
        g = torch.Generator().manual_seed(seed)
        idx = torch.randperm(len(data), generator=g)[:num_samples]
        x = data.get_batch(idx)[0]
    elif isinstance(data, Iterable):
        parts, got = [], 0
        for batch in data:
            xb = batch[0] if isinstance(batch, (tuple, list)) else batch
            if not isinstance(xb, Tensor):
                raise DataError(f"calibration data: expected batches of image tensors (or (x, y) pairs), "
                                f"got {type(xb).__name__}")
            parts.append(xb)
            got += xb.shape[0] if xb.ndim else 0
            if got >= num_samples:
                break
        if not parts:
            raise DataError("calibration data: the iterable yielded no batches")
        try:
            x = torch.cat(parts)[:num_samples]
        except RuntimeError as e:
            raise DataError(f"calibration data: batches of different shapes ({' '.join(str(e).split())[:120]})") from None
    else:
        raise DataError(f"calibration data: expected a tensor (N, C, H, W), a dataset or an iterable of (x, y) "
                        f"batches, got {type(data).__name__}")
    if not isinstance(x, Tensor) or x.ndim != 4 or x.shape[0] == 0:
        raise DataError(f"calibration data: expected images of shape (N, C, H, W) with N >= 1, got shape "
                        f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
    if not x.is_floating_point():
        raise DataError(f"calibration data: expected floating-point images, got {x.dtype}")
    return x.to(device=device, dtype=dtype)


class _Stop(Exception):
    pass


def _sample_index(name: str, batch: int, total: int, take: int, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()) + 7919 * batch)
    return torch.randperm(total, generator=g)[:take]


@torch.no_grad()
def _capture(model: nn.Module, names: list[str], convs: dict, images: Tensor, max_patches: int, batch_size: int,
             seed: int, stop_after: str | None = None) -> dict[str, Tensor]:
    """Sampled input patches ``(m, D)`` of the modules at ``names`` (same positions for the same
    name, batch and shape, so patches of two networks pair up)."""
    found: dict[str, list[Tensor]] = {nm: [] for nm in names}
    per_image = max(1, math.ceil(max_patches / images.shape[0]))
    state = {"batch": 0}

    def hook_for(nm):
        conv = convs[nm][0]

        def hook(mod, inp):
            x = inp[0]
            keep = torch.float64 if x.dtype == torch.float64 else torch.float32  # storage of sampled patches
            bsz = x.shape[0]
            npos = math.prod(_out_size(conv, tuple(x.shape[-2:])))
            take = min(bsz * npos, per_image * bsz)
            idx = _sample_index(nm, state["batch"], bsz * npos, take, seed).to(x.device)
            found[nm].append(fz.sample_patches(x, conv.kernel_size, conv.stride, conv._reversed_padding_repeated_twice,
                                               conv.dilation, conv.padding_mode, idx).to(keep))  # (take, D)
            if nm == stop_after:
                raise _Stop
        return hook

    mods = dict(model.named_modules())
    hooks = [mods[nm].register_forward_pre_hook(hook_for(nm)) for nm in names]
    was = model.training
    model.eval()
    try:
        for b, start in enumerate(range(0, images.shape[0], batch_size)):
            state["batch"] = b
            try:
                model(images[start:start + batch_size])
            except _Stop:
                pass
    finally:
        model.train(was)
        for h in hooks:
            h.remove()
    return {nm: torch.cat(v)[:max_patches] if v else torch.empty(0) for nm, v in found.items()}


# ----------------------------------------------------------------- selection and shapes


def _input_shape(model: nn.Module, images: Tensor | None, input_size, speedup=None) -> tuple[int, ...] | None:
    """The model's input (C, H, W): from the data, ``input_size`` or the registry; ``None`` when
    none tells it and none is needed (a data-free conversion by rank or energy: the factorization
    needs no input size, only the FLOP report does, which is then unknown)."""
    if images is not None:
        return tuple(images.shape[1:])
    if input_size is not None:
        shape = tuple(int(v) for v in input_size)
        if len(shape) != 3 or min(shape) < 1:
            raise ConfigError(f"input_size must be (C, H, W) with positive entries, got {input_size!r}")
        return shape
    name = (getattr(model, "sepconv_config", None) or {}).get("name")
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if name is not None and first is not None:
        from ..models import model_info

        return (first.in_channels, *model_info(name).input_size[1:])
    if speedup is None:
        return None
    raise ConfigError("convert: speedup weighs the layers by their FLOPs, which need the model's input size; "
                      "pass input_size=(C, H, W) or data")


def _modules_in_order(model: nn.Module) -> tuple[dict[str, tuple[nn.Conv2d, None]], None]:
    """``_trace``'s answer without a forward pass: every ``nn.Conv2d`` in definition order, no
    input shapes, FLOPs unknown."""
    return {nm: (m, None) for nm, m in model.named_modules() if isinstance(m, nn.Conv2d)}, None


@torch.no_grad()
def _trace(model: nn.Module, shape) -> tuple[dict[str, tuple[nn.Conv2d, tuple]], int]:
    """One eval-mode forward on zeros of ``shape``: ``{name: (conv, input shape)}`` of every
    ``nn.Conv2d`` in call order (as :func:`sepconv.spectral.network.layer_inputs`), and the
    model's FLOPs (as :func:`sepconv.models.profile`, same counter)."""
    from torch.utils.flop_counter import FlopCounterMode

    seen: dict[str, tuple[nn.Conv2d, tuple]] = {}

    def record(nm):
        def hook(mod, inp):
            seen.setdefault(nm, (mod, tuple(inp[0].shape[1:])))
        return hook

    p = next(iter(model.parameters()), None)
    check_memory(forward_memory(model, shape) or 0, f"convert: a forward pass on an input of shape {tuple(shape)}")
    hooks = [m.register_forward_pre_hook(record(nm)) for nm, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    was = model.training
    model.eval()
    x = torch.zeros(1, *shape, dtype=p.dtype if p is not None else torch.float32,
                    device=p.device if p is not None else "cpu")
    try:
        with FlopCounterMode(display=False) as counter:
            model(x)
    except RuntimeError as e:
        raise DataError(f"convert: the model does not run on inputs of shape {tuple(shape)} "
                        f"({' '.join(str(e).split())[:160]})") from None
    finally:
        model.train(was)
        for h in hooks:
            h.remove()
    return seen, int(counter.get_total_flops())


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


def _geometry(conv: nn.Conv2d) -> str:
    def two(v):
        return str(v[0]) if isinstance(v, tuple) and v[0] == v[1] else str(v)
    pad = conv.padding if isinstance(conv.padding, str) else two(conv.padding)
    return f"s{two(conv.stride)} p{pad} d{two(conv.dilation)} {conv.padding_mode}"


# ----------------------------------------------------------------- convert


def _check_args(to, rank, energy, speedup, method, data, num_samples, max_patches, p):
    if to not in TARGETS:
        raise ConfigError(f"unknown conversion target {to!r}; choose one of {', '.join(TARGETS)}")
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
    if p is not None and (to != "bsconv_s" or not 0 < p <= 1):
        raise ConfigError(f"p (the BSConv-S subspace fraction) must be in (0, 1] and only with to='bsconv_s', got {p!r}")


def convert(model: nn.Module, to: str = "dsc", rank: int | str | dict | None = None, energy: float | None = None,
            speedup: float | None = None, method: str = "svd", data: Any = None,
            layers: Iterable[str] | Callable[[str, nn.Module], bool] | None = None, multilayer: bool = True,
            *, input_size: tuple[int, int, int] | None = None, num_samples: int = 512, max_patches: int = 4096,
            batch_size: int = 64, p: float | None = None, seed: int = 0,
            progress: bool | None = None) -> tuple[nn.Module, ConversionReport]:
    """Convert the regular convs of ``model`` into separable blocks; returns ``(new_model, report)``.

    See the module docstring for targets, rank rules, data and the report. Exactly one of
    ``rank`` / ``energy`` / ``speedup`` (default ``rank=1``). ``layers``: names, or a predicate
    ``(name, module) -> bool`` (default: every ``nn.Conv2d`` with groups 1 and k > 1).
    ``p`` (BSConv-S only): subspace width ``M' = min(c, max(4, ceil(p c)))`` as in BSConv-S
    (default ``M' = min(n r, c)``, which keeps the BSConv-U product exactly). The result
    keeps ``sepconv_config`` with a ``convert`` recipe step, so ``save_model`` /
    ``load_model`` round-trip.
    """
    t_start = time.perf_counter()
    _check_args(to, rank, energy, speedup, method, data, num_samples, max_patches, p)
    if rank is None and energy is None and speedup is None:
        rank = 1
    from ..models import count_params

    param = next(iter(model.parameters()), None)
    dtype = param.dtype if param is not None else torch.float32
    device = param.device if param is not None else torch.device("cpu")
    check_finite(model, "convert")
    images = None if data is None else _calibration_images(data, num_samples, seed, dtype, device)
    new = copy.deepcopy(model)
    shape = _input_shape(new, images, input_size, speedup)
    if images is not None:
        _check_runs(new, images[:1])
    seen, flops_before = _trace(new, shape) if shape is not None else _modules_in_order(new)
    params_before = count_params(new)
    convs = _select(new, seen, layers)
    ranks = _choose_ranks(to, convs, rank, energy, speedup, p)
    mids = {nm: _mid(to, convs[nm][0], ranks[nm], p) for nm in convs}
    names = list(convs)
    ref = copy.deepcopy(model) if images is not None else None
    px = _capture(ref, names, convs, images, max_patches, batch_size, seed) if images is not None else {}
    ph: dict[str, Tensor] = {}
    show = sys.stderr.isatty() if progress is None else progress
    bar = names
    if show:
        from tqdm.auto import tqdm

        bar = tqdm(names, desc=f"convert -> {to} ({method})", leave=False, dynamic_ncols=True)
    records = []
    for nm in bar:
        conv, in_shape = convs[nm]
        t = time.perf_counter()
        mom = None
        if method == "gsvd":
            if multilayer:
                ph[nm] = _capture(new, [nm], convs, images, max_patches, batch_size, seed, stop_after=nm)[nm]
            mom = fz.patch_moments(px[nm], ph.get(nm), centered=conv.bias is not None)
        block = convert_layer(conv, to, ranks[nm], mids[nm], mom)
        _set_module(new, nm, block)
        records.append({"name": nm, "seconds": time.perf_counter() - t, "_block": block})
    if images is not None and not (method == "gsvd" and multilayer):
        ph = _capture(new, names, convs, images, max_patches, batch_size, seed)
    for rec in records:
        nm = rec["name"]
        conv, in_shape = convs[nm]
        block = rec.pop("_block")
        rec.update(_layer_record(to, nm, conv, in_shape, block, ranks[nm], mids[nm], px.get(nm), ph.get(nm)))
    new.train(model.training)
    record_recipe(new, "convert", to=to, layers=[{"name": nm, "rank": ranks[nm], "mid": mids[nm]} for nm in names])
    layer_delta = sum(r["flops_before"] - r["flops_after"] for r in records) if shape is not None else None
    rep = ConversionReport(layers=records, settings={
        "to": to, "method": method, "rank": rank if not isinstance(rank, dict) else "per-layer",
        "energy": energy, "speedup": speedup, "multilayer": multilayer if method == "gsvd" else None,
        "num_samples": int(images.shape[0]) if images is not None else 0, "max_patches": max_patches,
        "input_shape": list(shape) if shape is not None else None, "p": p})
    rep.totals = {
        "layers": len(records),
        "params_before": params_before, "params_after": count_params(new),
        "flops_before": flops_before,  # None: the input size is unknown (data-free, no input_size)
        "flops_after": flops_before - layer_delta if flops_before is not None else None,  # = profile(new): tested
        "layer_params_before": sum(r["params_before"] for r in records),
        "layer_params_after": sum(r["params_after"] for r in records),
        "layer_flops_before": sum(r["flops_before"] for r in records) if shape is not None else None,
        "layer_flops_after": sum(r["flops_after"] for r in records) if shape is not None else None,
        "mean_output_error": sum(r["output_error"] for r in records) / len(records),
        "mean_weight_error": sum(r["weight_error"] for r in records) / len(records),
        "error_on": "calibration" if images is not None else "random",
        "seconds": time.perf_counter() - t_start,
    }
    return new, rep


def _check_runs(model: nn.Module, x: Tensor) -> None:
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(x)
    except RuntimeError as e:
        raise DataError(f"calibration data: images of shape {tuple(x.shape[1:])} (C, H, W) do not fit the model "
                        f"({' '.join(str(e).split())[:160]})") from None
    finally:
        model.train(was)


@torch.no_grad()
def _layer_record(to, nm, conv, in_shape, block, rank, mid, px, ph) -> dict:
    w = conv.weight.detach().to(torch.float64)
    a = dense_weight(to, block).detach().to(torch.float64)
    rec = {
        "shape": " x ".join(map(str, conv.weight.shape)), "geometry": _geometry(conv), "rank": rank,
        "mid_channels": mid, "energy": fz.retained_energy(_spectrum(to, conv), rank),
        "params_before": sum(q.numel() for q in conv.parameters()),
        "params_after": sum(q.numel() for q in block.parameters()),
        "flops_before": 2 * layer_macs(None, conv, in_shape[-2:]) if in_shape is not None else None,
        "flops_after": 2 * layer_macs(to, conv, in_shape[-2:], rank, mid) if in_shape is not None else None,
        "weight_error": float(torch.linalg.norm(w - a) / torch.linalg.norm(w).clamp_min(1e-300)),
    }
    if px is None:  # Gaussian random inputs (the layer's size, at most 16 x 16), the layer alone
        g = torch.Generator(device=conv.weight.device).manual_seed(0)
        if in_shape is not None:
            size = [min(v, RANDOM_INPUT_MAX) for v in in_shape[-2:]]
        else:  # input size unknown: the largest random input, or the smallest the kernel fits on
            size = [max(RANDOM_INPUT_MAX, d * (k - 1) + 1) for k, d in zip(conv.kernel_size, conv.dilation)]
        x = torch.randn(1, conv.in_channels, *size, generator=g, device=conv.weight.device, dtype=conv.weight.dtype)
        y = conv(x)
        rec["output_error"] = float(torch.linalg.norm(block(x) - y) / torch.linalg.norm(y).clamp_min(1e-30))
        rec["local_error"] = None
        return rec
    n = w.shape[0]
    wf, af = w.reshape(n, -1), a.reshape(n, -1)
    b = conv.bias.detach().to(torch.float64) if conv.bias is not None else torch.zeros(n, dtype=torch.float64)
    bias = _block_bias(to, block)
    bb = bias.detach().to(torch.float64) if bias is not None else torch.zeros(n, dtype=torch.float64)
    x, xh = px.to(torch.float64), ph.to(torch.float64)
    y = x @ wf.T + b
    norm = torch.linalg.norm(y).clamp_min(1e-30)
    rec["output_error"] = float(torch.linalg.norm(xh @ af.T + bb - y) / norm)
    rec["local_error"] = float(torch.linalg.norm(x @ af.T + bb - y) / norm)
    return rec


# ----------------------------------------------------------------- recipe replay


@register_recipe("convert")
def _replay_convert(model: nn.Module, step: dict) -> nn.Module:
    """Rebuild the structure a :func:`convert` call made (weights are loaded afterwards)."""
    to, layers = step.get("to"), step.get("layers")
    if to not in TARGETS:
        raise ConfigError(f"convert recipe: unknown target {to!r} (one of {', '.join(TARGETS)})")
    if not isinstance(layers, list) or not all(isinstance(e, dict) for e in layers):
        raise ConfigError("convert recipe: 'layers' must be a list of {name, rank, mid} objects")
    mods = dict(model.named_modules())
    for entry in layers:
        nm, rank, mid = entry.get("name"), entry.get("rank"), entry.get("mid")
        conv = mods.get(nm) if isinstance(nm, str) else None
        if not isinstance(conv, nn.Conv2d) or conv.groups != 1:
            raise UnsupportedLayerError(f"convert recipe: the rebuilt model has no nn.Conv2d (groups 1) {nm!r:.80}")
        full = full_rank(to, conv)  # a rank is bounded by the layer: no allocation beyond the original's size
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= full:
            raise ConfigError(f"convert recipe: layer {nm!r}: rank must be an integer in 1..{full}, got {rank!r:.40}")
        if to == "bsconv_s" and (isinstance(mid, bool) or not isinstance(mid, int)
                                 or not 1 <= mid <= min(conv.in_channels, conv.out_channels * rank)):
            raise ConfigError(f"convert recipe: layer {nm!r}: mid must be an integer in "
                              f"1..{min(conv.in_channels, conv.out_channels * rank)}, got {mid!r:.40}")
        _set_module(model, nm, build_block(to, conv, rank, mid if to == "bsconv_s" else None))
    return model


__all__ = ["ConversionReport", "METHODS", "TARGETS", "build_block", "convert", "convert_layer", "dense_weight",
           "full_rank", "layer_macs"]
