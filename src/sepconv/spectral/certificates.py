"""Lipschitz-margin certificates: per-sample certified l2 radii and certified accuracy.

Two certificates, both valid, of which :func:`certified_radii` keeps the larger for every sample:

* **global** (Tsuzuku, Sato, Sugiyama, NeurIPS 2018, arXiv 1802.04034, Prop. 1): when ``L`` bounds
  the Lipschitz constant of the logits ``z``, each difference ``z_y - z_j`` is ``sqrt(2) L``-Lipschitz,
  so no input within ``(z_y - max_{j != y} z_j) / (sqrt(2) L)`` changes the prediction
  (:func:`margin_radii`);
* **pairwise**, when the logits are a final ``nn.Linear`` of features ``h(x)``: ``z_y - z_j =
  (w_y - w_j) . h + b_y - b_j`` is ``L_h ||w_y - w_j||``-Lipschitz, ``L_h`` a Lipschitz bound of
  ``h``, so the radius is ``min_{j != y} (z_y - z_j) / (L_h ||w_y - w_j||_2)`` -- the per-pair
  Lipschitz constants of the top layer (Leino, Wang, Fredrikson, "Globally-Robust Neural
  Networks", ICML 2021, arXiv 2102.08452; Li et al., NeurIPS 2019, arXiv 1911.00937)
  (:func:`pairwise_radii`). As ``||w_y - w_j|| <= sqrt(2) ||W||_2``, it is never below the global
  certificate with ``L = L_h ||W||_2`` (the composition bound :func:`lipschitz_bound` gives).

**Units.** A radius is an l2 norm of a perturbation of what the radius is measured on. By default
that is the model's own input. A data pipeline that feeds ``(x - mean) / std`` (per channel) maps a
perturbation ``d`` of the pixels ``x`` to ``d / std``, of norm at most ``||d|| / min(std)`` (the exact
norm of that diagonal map); so with ``input_scale=std`` the radii are in pixel units:
``r_pixel = r * min(std)``. ``sepconv train --certify`` passes the dataset's ``std``: its radii are
pixel-l2 radii on images scaled to [0, 1].
"""

from __future__ import annotations

import copy
import math
import numbers
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError, SepconvError
from ..probe import LayerStack
from . import validate
from .lipschitz import lipschitz_bound

__all__ = ["Certificate", "certified_accuracy", "certified_radii", "margin_radii", "pairwise_radii"]


class Certificate(NamedTuple):
    """Result of :func:`certified_accuracy`: clean accuracy, the fraction certified robust at radius
    ``eps`` (correct *and* certified radius ``> eps``), the network's Lipschitz bound (w.r.t. its own
    input) and ``eps`` (in the units of ``input_scale``: pixels when it is the data's std)."""

    accuracy: float
    certified: float
    lipschitz: float
    eps: float


# ---------------------------------------------------------------------------- the two formulas


def _correct(logits: Tensor, y: Tensor) -> Tensor:
    return logits.topk(2, dim=1).indices[:, 0] == y.to(logits.device)


def margin_radii(logits: Tensor, y: Tensor, lipschitz: float) -> Tensor:
    """Certified l2 radius of each sample by the global Lipschitz-margin certificate (Tsuzuku, Sato,
    Sugiyama, NeurIPS 2018, arXiv 1802.04034, Prop. 1): ``(z_y - max_{j != y} z_j) / (sqrt(2) L)``
    for a correct prediction, ``-inf`` for a wrong one (float64). A **certificate** when ``L``
    bounds the Lipschitz constant of the logits; ``L = 0`` certifies every positive margin at
    any radius."""
    top2 = logits.topk(2, dim=1)
    margin = (top2.values[:, 0] - top2.values[:, 1]).double()
    r = margin / (math.sqrt(2) * lipschitz) if lipschitz > 0 else torch.where(margin > 0, math.inf, 0.0)
    return torch.where(_correct(logits, y), r, -math.inf)


def pairwise_radii(logits: Tensor, y: Tensor, weight: Tensor, features_lipschitz: float) -> Tensor:
    """Certified l2 radius of each sample by the pairwise certificate of a final linear layer
    ``z = W h(x) + b``: ``min_{j != y} (z_y - z_j) / (L_h ||w_y - w_j||_2)`` for a correct
    prediction, ``-inf`` for a wrong one (float64), with ``L_h`` a Lipschitz bound of the features
    ``h`` and ``w_k`` the rows of ``weight``: ``z_y - z_j`` is ``L_h ||w_y - w_j||``-Lipschitz (the
    top layer's pairwise constants of Leino, Wang, Fredrikson, ICML 2021, arXiv 2102.08452). A
    **certificate**, at least the global one with ``L = L_h ||W||_2`` (``||w_y - w_j|| <= sqrt(2)
    ||W||_2``); a pair with ``L_h ||w_y - w_j|| = 0`` never changes order, so it limits nothing
    when ``z_y > z_j``."""
    z = logits.detach().double()
    y = y.to(z.device, torch.int64)
    w = weight.detach().double().to(z.device)
    diff = z.gather(1, y[:, None]) - z  # (N, K): z_y - z_j
    dist = torch.cdist(w, w, compute_mode="donot_use_mm_for_euclid_dist")[y]  # (N, K): ||w_y - w_j||
    denom = features_lipschitz * dist
    r = torch.where(denom > 0, diff / torch.where(denom > 0, denom, 1.0), torch.where(diff > 0, math.inf, 0.0))
    r = r.scatter(1, y[:, None], math.inf).min(dim=1).values
    return torch.where(_correct(logits, y), r, -math.inf)


# ---------------------------------------------------------------------------- arguments


def _input_scale(scale, where: str) -> Tensor:
    """``input_scale`` as a 1-D float64 tensor of positive finite values (one, or one per channel)."""
    bad = ConfigError(f"{where}: input_scale must be a finite number > 0 or one per input channel (the std the "
                      f"data is divided by), got {scale!r:.80}")
    if isinstance(scale, Tensor):
        if scale.dim() > 1 or not scale.is_floating_point() or scale.device.type == "meta":
            raise bad
        values = scale.detach().double().cpu().reshape(-1)
    elif isinstance(scale, numbers.Real) and not isinstance(scale, bool):
        values = torch.tensor([float(scale)], dtype=torch.float64)
    elif isinstance(scale, Sequence) and not isinstance(scale, (str, bytes)):
        if not all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in scale):
            raise bad
        values = torch.tensor([float(v) for v in scale], dtype=torch.float64)
    else:
        raise bad
    if values.numel() == 0 or not bool(((values > 0) & torch.isfinite(values)).all()):
        raise bad
    return values


def _bound(v, where: str, name: str) -> float | None:
    if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= float(v) < math.inf):
        raise ConfigError(f"{where}: {name} must be a finite number >= 0, got {v!r}")
    return None if v is None else float(v)


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


# ---------------------------------------------------------------------------- the final linear layer


class _Head(NamedTuple):
    """The ``nn.Linear`` whose output is the model's output: its name in the model and weight."""

    name: str
    module: nn.Linear
    weight: Tensor  # (classes, features), float64


def _forward(model: nn.Module, x: Tensor, find_head: bool, where: str) -> tuple[Tensor, _Head | None]:
    """``model(x)`` (logits ``(N, classes >= 2)``, checked) and, with ``find_head``, the final
    ``nn.Linear``: the one call of a Linear whose output *is* the model's output, applied once, to
    features ``(N, F)``, and whose weight and bias reproduce the logits (so nothing changed them in
    place after); ``None`` when there is no such layer."""
    calls: list[tuple[nn.Module, object, object]] = []
    hooks = [m.register_forward_hook(lambda mod, args, out: calls.append((mod, args[0] if args else None, out)))
             for m in model.modules() if find_head and isinstance(m, nn.Linear)]
    try:
        logits = model(x)
    finally:
        for h in hooks:
            h.remove()
    if not (isinstance(logits, Tensor) and logits.dim() == 2 and logits.shape[1] >= 2):
        got = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ConfigError(f"{where}: the model must return logits (N, classes >= 2), got {got}")
    final = [c for c in calls if c[2] is logits]
    if len(final) != 1 or sum(c[0] is final[0][0] for c in calls) != 1:
        return logits, None
    mod, h, _ = final[0]
    if not (isinstance(h, Tensor) and h.dim() == 2):
        return logits, None
    w = mod.weight.detach().double()
    b = mod.bias.detach().double() if mod.bias is not None else None
    again = F.linear(h.detach().double(), w.to(h.device), None if b is None else b.to(h.device))
    if not torch.allclose(again, logits.double(), rtol=1e-4, atol=1e-5 * (1.0 + float(again.abs().max()))):
        return logits, None
    name = next(n for n, m in model.named_modules() if m is mod)
    return logits, _Head(name, mod, w)


def _features_bound(model: nn.Module, head: _Head, shape: tuple[int, ...], method: str, input_bound,
                    where: str) -> float:
    """A certified Lipschitz bound of the features the final Linear reads: :func:`lipschitz_bound` of
    a deep copy of ``model`` whose final Linear is ``nn.Identity`` under every name it has (the model
    itself is untouched)."""
    if head.name == "":
        return 1.0  # the model is the Linear: its features are its input
    features = copy.deepcopy(model)
    target = features.get_submodule(head.name)
    for name in [n for n, m in features.named_modules(remove_duplicate=False) if m is target]:
        parent, _, leaf = name.rpartition(".")
        setattr(features.get_submodule(parent) if parent else features, leaf, nn.Identity())
    try:
        return lipschitz_bound(features, shape, method=method, input_bound=input_bound)
    except SepconvError as e:
        raise type(e)(str(e).replace("lipschitz_bound:", f"{where}:", 1)) from None


def _bounds(model: nn.Module, head: _Head | None, shape: tuple[int, ...], lipschitz: float | None,
            features_lipschitz: float | None, method: str, input_bound, where: str) -> tuple[float, float | None]:
    """``(L, L_h)``: the bound of the logits (given, else computed) and of the final Linear's
    features for the pairwise certificate (given, else computed when ``L`` is; ``None``: none).
    With ``L_h``, the computed ``L`` is the composition bound ``L_h ||W||_2`` (what
    :func:`lipschitz_bound`'s propagation gives for a final Linear), so one bound serves both."""
    if features_lipschitz is None and head is not None and lipschitz is None:
        features_lipschitz = _features_bound(model, head, shape, method, input_bound, where)
    if lipschitz is None:
        if features_lipschitz is not None:
            lipschitz = features_lipschitz * float(torch.linalg.matrix_norm(head.weight, ord=2)) * (1 + 1e-12)
        else:
            try:
                lipschitz = lipschitz_bound(model, shape, method=method, input_bound=input_bound)
            except SepconvError as e:
                raise type(e)(str(e).replace("lipschitz_bound:", f"{where}:", 1)) from None
    return float(lipschitz), features_lipschitz


# ---------------------------------------------------------------------------- the public functions


def certified_radii(model: nn.Module, loader: Iterable, lipschitz: float | None = None,
                    input_bound: float | None = None, method: str = "upper", *, input_scale=1.0,
                    pairwise: bool = True, features_lipschitz: float | None = None) -> tuple[Tensor, float]:
    """Per-sample certified l2 radius: the larger of the global certificate ``margin / (sqrt(2) L)``
    (Tsuzuku, Sato, Sugiyama, NeurIPS 2018, arXiv 1802.04034, Prop. 1; :func:`margin_radii`) and,
    when the model's output is a final ``nn.Linear``'s and ``pairwise``, the pairwise certificate
    ``min_{j != y} (z_y - z_j) / (L_h ||w_y - w_j||)`` (Leino et al., ICML 2021, arXiv 2102.08452;
    :func:`pairwise_radii`); ``-inf`` for a wrong prediction. Returns ``(radii, L)``, ``L`` the
    bound of the logits w.r.t. the model's input: one pass over the loader serves every radius. A
    **certificate**, valid for every input of the loader (and, with ``input_bound``, for inputs
    within that norm).

    Bounds are computed (by :func:`lipschitz_bound` with ``method``, from the first batch's shape)
    only when none is given: without ``lipschitz``, ``L_h`` is the bound of the model with its final
    Linear replaced by ``nn.Identity`` (a deep copy) and ``L = L_h ||W||_2``, or ``L`` is the model's
    bound when there is no final Linear (or ``pairwise=False``). With ``lipschitz``, only the global
    certificate of that bound -- plus the pairwise one when ``features_lipschitz`` (``L_h``) is given.

    ``input_scale``: the units of the radii. Default 1: the model's input. A data pipeline feeding
    ``(x - mean) / std`` passes ``input_scale=std`` (a number or one per channel) to get radii of
    perturbations of ``x`` (pixel l2 on images in [0, 1]): every radius is multiplied by ``min(std)``,
    as ``1 / min(std)`` is the exact norm of the map ``d -> d / std``. ``L`` stays the model's.
    ``pairwise=False``: the global certificate only (``features_lipschitz`` is then not used).

    Validated: finite weights in every layer, finite bounds ``>= 0`` when given, ``input_scale > 0``
    (one value, or one per input channel), batches of finite floating inputs ``(N, C, H, W)`` with
    ``N`` labels, and -- when a bound is computed here -- every batch of the shape it was computed
    for (a Lipschitz bound holds for one input size).
    """
    where = "certified_radii"
    validate.model(model, where)
    lipschitz = _bound(lipschitz, where, "lipschitz")
    features_lipschitz = _bound(features_lipschitz, where, "features_lipschitz")
    if input_bound is not None:
        input_bound = validate.positive(input_bound, where, "input_bound")
    scale = _input_scale(input_scale, where)
    if not pairwise:
        features_lipschitz = None
    was_training = model.training
    model.eval()
    L, L_h, radii, shape, head_name = lipschitz, features_lipschitz, [], None, None
    try:
        for i, batch in enumerate(loader):
            x, y = _batch(batch, i, where)
            if scale.numel() > 1 and scale.numel() != x.shape[1]:
                raise ConfigError(f"{where}: input_scale has {scale.numel()} values, the inputs {x.shape[1]} channels")
            if shape is not None and lipschitz is None and tuple(x.shape[1:]) != shape:
                raise ConfigError(f"{where}: batch {i} has inputs of shape {tuple(x.shape[1:])}, but the Lipschitz "
                                  f"bound was computed for {shape} (pass lipschitz= to reuse one)")
            with torch.no_grad(), LayerStack(model, where, tuple(x.shape[1:])):
                logits, head = _forward(model, x, pairwise and (lipschitz is None or L_h is not None), where)
            if i == 0:
                shape, head_name = tuple(x.shape[1:]), None if head is None else head.name
                if L_h is not None and head is None:
                    raise ConfigError(f"{where}: features_lipschitz is given, but the model's output is not that of "
                                      "a final nn.Linear (applied once, its output returned unchanged)")
                with torch.no_grad():
                    L, L_h = _bounds(model, head, shape, L, L_h, method, input_bound, where)
                model.eval()
            elif (None if head is None else head.name) != head_name:
                raise ConfigError(f"{where}: batch {i} ends in another layer than batch 0 (a model whose graph "
                                  "depends on its input has no single Lipschitz bound)")
            if y.numel() and (y.is_floating_point() or int(y.min()) < 0 or int(y.max()) >= logits.shape[1]):
                raise ConfigError(f"{where}: batch {i}: labels must be integers in 0..{logits.shape[1] - 1} (the "
                                  f"model's classes), got {y.dtype} {int(y.min())}..{int(y.max())}")
            with torch.no_grad():
                r = margin_radii(logits, y, L)
                if L_h is not None:
                    r = torch.maximum(r, pairwise_radii(logits, y, head.weight, L_h))
            radii.append((r * float(scale.min())).cpu())
    finally:
        model.train(was_training)
    if not radii or sum(r.numel() for r in radii) == 0:
        raise ConfigError(f"{where}: the loader yielded no samples")
    return torch.cat(radii), float(L)


def certified_accuracy(model: nn.Module, loader: Iterable, eps: float, lipschitz: float | None = None,
                       input_bound: float | None = None, method: str = "upper", *, input_scale=1.0,
                       pairwise: bool = True, features_lipschitz: float | None = None) -> Certificate:
    """Lipschitz-margin certification at l2 radius ``eps`` (Tsuzuku, Sato, Sugiyama, NeurIPS 2018,
    arXiv 1802.04034, Prop. 1; with the pairwise certificate of a final Linear, Leino et al., ICML
    2021): the fraction of samples predicted correctly with certified radius ``> eps``
    (:func:`certified_radii`, whose arguments it shares; ``eps`` is in the units of
    ``input_scale``: pixel l2 with ``input_scale=std``). A **certificate**, valid for every input of
    the loader (and, with ``input_bound``, for inputs within that norm)."""
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not float(eps) >= 0:
        raise ConfigError(f"certified_accuracy: eps must be a number >= 0, got {eps!r}")
    radii, L = certified_radii(model, loader, lipschitz, input_bound, method, input_scale=input_scale,
                               pairwise=pairwise, features_lipschitz=features_lipschitz)
    return Certificate(float((radii > -math.inf).double().mean()), float((radii > eps).double().mean()), L, float(eps))
