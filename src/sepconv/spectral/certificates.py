"""Lipschitz-margin certificates: per-sample certified l2 radii and certified accuracy.

A prediction whose logit margin exceeds ``sqrt(2) L eps`` cannot change within l2 radius ``eps``
when ``L`` is a Lipschitz bound of the network (Tsuzuku, Sato, Sugiyama, NeurIPS 2018, arXiv
1802.04034, Prop. 1); ``L`` comes from :func:`sepconv.spectral.lipschitz_bound`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import NamedTuple

import torch
from torch import Tensor, nn

from ..errors import ConfigError, SepconvError
from ..probe import LayerStack
from . import validate
from .lipschitz import lipschitz_bound

__all__ = ["Certificate", "certified_accuracy", "certified_radii"]


class Certificate(NamedTuple):
    """Result of :func:`certified_accuracy`: clean accuracy, the fraction certified robust at radius
    ``eps`` (correct *and* margin ``> sqrt(2) L eps``), the Lipschitz bound used, and ``eps``."""

    accuracy: float
    certified: float
    lipschitz: float
    eps: float


def certified_radii(model: nn.Module, loader: Iterable, lipschitz: float | None = None,
                    input_bound: float | None = None, method: str = "upper") -> tuple[Tensor, float]:
    """Per-sample certified l2 radius of the Lipschitz-margin certificate (Tsuzuku, Sato, Sugiyama,
    NeurIPS 2018, arXiv 1802.04034, Prop. 1): ``margin / (sqrt(2) L)`` for a correct prediction
    (each logit difference is ``sqrt(2) L``-Lipschitz, so no input within that radius changes it),
    ``-inf`` for a wrong one. ``L`` is :func:`lipschitz_bound` (computed from the first batch's shape
    unless given). Returns ``(radii, L)``: one pass over the loader serves every radius. A
    **certificate**, valid for every input of the loader (and, with ``input_bound``, for inputs
    within that norm).

    Validated: finite weights in every layer, a finite ``lipschitz >= 0`` when given, batches of
    finite floating inputs ``(N, C, H, W)`` with ``N`` labels, and -- when ``L`` is computed here --
    every batch of the shape it was computed for (a Lipschitz bound holds for one input size).
    """
    where = "certified_radii"
    validate.model(model, where)
    if lipschitz is not None and (isinstance(lipschitz, bool) or not isinstance(lipschitz, (int, float))
                                  or not 0 <= float(lipschitz) < math.inf):
        raise ConfigError(f"{where}: lipschitz must be a finite number >= 0, got {lipschitz!r}")
    if input_bound is not None:
        input_bound = validate.positive(input_bound, where, "input_bound")
    was_training = model.training
    model.eval()
    L, radii, shape = lipschitz, [], None
    try:
        with torch.no_grad(), LayerStack(model, where, ()) as names:
            for i, batch in enumerate(loader):
                x, y = _batch(batch, i, where)
                if L is None:
                    shape = tuple(x.shape[1:])
                    try:
                        L = lipschitz_bound(model, shape, method=method, input_bound=input_bound)
                    except SepconvError as e:
                        raise type(e)(str(e).replace("lipschitz_bound:", f"{where}:", 1)) from None
                    model.eval()
                elif shape is not None and tuple(x.shape[1:]) != shape:
                    raise ConfigError(f"{where}: batch {i} has inputs of shape {tuple(x.shape[1:])}, but the Lipschitz "
                                      f"bound was computed for {shape} (pass lipschitz= to reuse one)")
                names.shape = tuple(x.shape[1:])
                logits = model(x)
                if not (isinstance(logits, Tensor) and logits.dim() == 2 and logits.shape[1] >= 2):
                    got = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
                    raise ConfigError(f"{where}: the model must return logits (N, classes >= 2), got {got}")
                top2 = logits.topk(2, dim=1)
                margin = (top2.values[:, 0] - top2.values[:, 1]).double()
                ok = top2.indices[:, 0] == y.to(top2.indices.device)
                r = margin / (math.sqrt(2) * L) if L > 0 else torch.where(margin > 0, math.inf, 0.0)
                radii.append(torch.where(ok, r, -math.inf).cpu())
    finally:
        model.train(was_training)
    if not radii or sum(r.numel() for r in radii) == 0:
        raise ConfigError("certified_accuracy: the loader yielded no samples")
    return torch.cat(radii), float(L)


def _batch(batch, i: int, where: str) -> tuple[Tensor, Tensor]:
    """``(x, y)`` of one loader batch, checked: finite floating inputs ``(N, ...)`` and ``N`` labels."""
    try:
        x, y = batch
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: batch {i} must be a pair (inputs, labels), got {type(batch).__name__}") from None
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() < 2:
        got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
        raise ConfigError(f"{where}: batch {i}: inputs must be a floating tensor (N, C, H, W), got {got}")
    if not isinstance(y, Tensor) or y.dim() != 1 or y.shape[0] != x.shape[0]:
        got = tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__
        raise ConfigError(f"{where}: batch {i}: expected {x.shape[0]} labels (N,), got {got}")
    if x.device.type != "meta" and not bool(torch.isfinite(x).all()):
        raise ConfigError(f"{where}: batch {i} holds NaN or Inf inputs")
    return x, y


def certified_accuracy(model: nn.Module, loader: Iterable, eps: float, lipschitz: float | None = None,
                       input_bound: float | None = None, method: str = "upper") -> Certificate:
    """Lipschitz-margin certification (Tsuzuku, Sato, Sugiyama, NeurIPS 2018, arXiv 1802.04034,
    Prop. 1): a prediction is certified at l2 radius ``eps`` when its logit margin exceeds
    ``sqrt(2) L eps`` -- each logit difference is ``sqrt(2) L``-Lipschitz -- so no input within
    ``eps`` can change it. ``L`` is :func:`lipschitz_bound` (computed from the first batch's
    shape unless given); :func:`certified_radii` gives every sample's radius in one pass. A
    **certificate**, valid for every input of the loader (and, with ``input_bound``, for inputs
    within that norm)."""
    if not eps >= 0:
        raise ConfigError(f"certified_accuracy: eps must be >= 0, got {eps!r}")
    radii, L = certified_radii(model, loader, lipschitz, input_bound, method)
    return Certificate(float((radii > -math.inf).double().mean()), float((radii > eps).double().mean()), L, float(eps))

