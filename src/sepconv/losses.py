"""Classification losses, margin losses for Lipschitz networks among them: one registry.

Every loss is a pure function ``fn(logits, y, **options) -> 0-dim tensor`` of logits ``(N, K)`` and
integer labels ``(N,)``; :data:`LOSSES` names them (``sepconv train --loss``), with the options
each one reads (the :class:`~sepconv.train.TrainConfig` fields of the same names):

========  ==============================  ===========================================================
name      options                         loss
========  ==============================  ===========================================================
``ce``    ``logit_scale``,                cross-entropy of scaled logits, ``CE(s z, y) / s``
          ``label_smoothing``             (``tau_ce``: the same, Bethune et al.'s name)
``margin_ce`` ``margin``, ``logit_scale``  cross-entropy with the true logit lowered by the margin,
                                          ``CE(s (z - m e_y), y) / s``
``hinge`` ``margin``                      multi-class hinge ``(1/K) sum_{j != y} max(0, m - (z_y - z_j))``
``hkr``   ``margin``, ``hkr_alpha``       hinge-regularized Kantorovich-Rubinstein (one-vs-all)
========  ==============================  ===========================================================

:func:`fantastic_four_penalty` is the one model regularizer here: the sum of a model's conv layers'
Fantastic Four bounds, a function of the weights to add to any of these losses.

**Margins and certificates.** ``margin`` is a margin of the logits, the quantity the
Lipschitz-margin certificate divides (:mod:`sepconv.spectral.certificates`): a sample whose margin
``z_y - max_{j != y} z_j`` is at least ``m`` is certified at radius ``m / (sqrt(2) L)`` in the
network's input units, ``L`` its Lipschitz bound -- at pixel-l2 radius ``eps = m min(std) /
(sqrt(2) L)`` when the data are fed as ``(x - mean) / std``. To aim for a pixel-l2 radius ``eps``,
train with ``m = sqrt(2) L eps / min(std)``: the margin Li et al. (NeurIPS 2019, arXiv 1911.00937)
and Trockman & Kolter (ICLR 2021, arXiv 2104.07167) give the hinge for 1-Lipschitz networks
(``L = 1``). The hinge losses are meant for networks with a bounded Lipschitz constant: on a free
network any margin is reached by scaling the logits, and the Kantorovich-Rubinstein term of
``hkr``, linear in the logits, is then unbounded below.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass, field

import torch.nn.functional as F
from torch import Tensor, nn

from .errors import ConfigError

__all__ = ["LOSSES", "LOSS_ALIASES", "LossSpec", "canonical_loss", "cross_entropy", "fantastic_four_penalty",
           "get_loss", "hkr", "kantorovich_rubinstein", "loss_names", "margin_cross_entropy", "multiclass_hinge",
           "one_vs_all_hinge", "register_loss"]


# ---------------------------------------------------------------------------- checks


def _check(logits: Tensor, y: Tensor, where: str) -> None:
    """Logits ``(N, K >= 2)`` floating, labels ``(N,)`` integers in ``0..K-1``."""
    if not (isinstance(logits, Tensor) and logits.dim() == 2 and logits.shape[1] >= 2 and logits.is_floating_point()):
        got = f"{logits.dtype} {tuple(logits.shape)}" if isinstance(logits, Tensor) else type(logits).__name__
        raise ConfigError(f"{where}: logits must be a floating tensor (N, classes >= 2), got {got}")
    if not (isinstance(y, Tensor) and y.dim() == 1 and y.shape[0] == logits.shape[0]
            and not y.is_floating_point() and not y.is_complex()):
        got = f"{y.dtype} {tuple(y.shape)}" if isinstance(y, Tensor) else type(y).__name__
        raise ConfigError(f"{where}: labels must be integers ({logits.shape[0]},), got {got}")


def _positive(v, where: str, name: str, upper: float = math.inf, closed: bool = False) -> float:
    ok = isinstance(v, numbers.Real) and not isinstance(v, bool) and 0 < float(v) and (
        float(v) <= upper if closed else float(v) < upper)
    if not ok:
        top = f"<= {upper:g}" if closed else "finite" if upper == math.inf else f"< {upper:g}"
        raise ConfigError(f"{where}: {name} must be a number > 0 and {top}, got {v!r}")
    return float(v)


# ---------------------------------------------------------------------------- the losses


def cross_entropy(logits: Tensor, y: Tensor, logit_scale: float = 1.0, label_smoothing: float = 0.0) -> Tensor:
    """``CE(s z, y) / s``, the mean cross-entropy of the logits scaled by ``s`` (plain
    cross-entropy at ``s = 1``): the tau-CCE of Bethune, Boissin, Serrurier, Mamalet, Friedrich,
    Gonzalez-Sanz, "Pay attention to your loss", NeurIPS 2022 (arXiv 2104.05097), temperature
    ``tau = s``. A network with a small Lipschitz bound has small logits, whose softmax gradients
    vanish; ``s > 1`` lets it reach the large margins a certificate needs, and dividing by ``s``
    keeps the gradient's size. As ``s`` grows it tends to the hinge ``max_j (z_j - z_y)_+``."""
    _check(logits, y, "cross_entropy")
    s = _positive(logit_scale, "cross_entropy", "logit_scale")
    if not (isinstance(label_smoothing, numbers.Real) and 0 <= float(label_smoothing) < 1):
        raise ConfigError(f"cross_entropy: label_smoothing must be in [0, 1), got {label_smoothing!r}")
    if s == 1.0:
        return F.cross_entropy(logits, y, label_smoothing=label_smoothing)
    return F.cross_entropy(logits * s, y, label_smoothing=label_smoothing) / s


def margin_cross_entropy(logits: Tensor, y: Tensor, margin: float = 1.0, logit_scale: float = 1.0) -> Tensor:
    """``CE(s (z - m e_y), y) / s``: :func:`cross_entropy` (scale ``s``) after the true class's logit is
    lowered by the margin ``m``, so the loss keeps pulling until ``z_y - z_j`` is well past ``m`` --
    a smooth hinge at margin ``m`` (the additive-margin softmax of Wang et al., *CosFace*, CVPR 2018;
    the "cross-entropy with offset" that Prach & Lampert, ECCV 2022, arXiv 2208.03160, Sec. 5, train
    1-Lipschitz networks with: ``m = sqrt(2) eps`` for a radius ``eps``, temperature ``1 / s``)."""
    _check(logits, y, "margin_cross_entropy")
    m = _positive(margin, "margin_cross_entropy", "margin")
    shifted = logits - m * F.one_hot(y.to(logits.device), logits.shape[1]).to(logits.dtype)
    return cross_entropy(shifted, y, logit_scale)


def multiclass_hinge(logits: Tensor, y: Tensor, margin: float = 1.0) -> Tensor:
    """The multi-class hinge ``(1/N) sum_i (1/K) sum_{j != y_i} max(0, m - (z_{i,y_i} - z_{ij}))``
    (Weston & Watkins 1999; ``torch.nn.functional.multi_margin_loss``): zero once every logit
    difference ``z_y - z_j`` reaches the margin ``m``, so once the sample is certified at radius
    ``m / (sqrt(2) L)``. It is the loss Li et al. (NeurIPS 2019, arXiv 1911.00937) and Trockman &
    Kolter (ICLR 2021, arXiv 2104.07167) train Lipschitz networks with, ``m = sqrt(2) L eps`` for
    an l2 radius ``eps``. Sums over the classes (all violated pairs pull), not only the runner-up."""
    _check(logits, y, "multiclass_hinge")
    m = _positive(margin, "multiclass_hinge", "margin")
    idx = y[:, None].to(logits.device)
    viol = F.relu(m - (logits.gather(1, idx) - logits)).scatter(1, idx, 0.0)
    return viol.sum(1).mean() / logits.shape[1]


def one_vs_all_hinge(logits: Tensor, y: Tensor, margin: float = 1.0) -> Tensor:
    """The one-vs-all hinge of the multi-class hKR loss: each class ``k`` a binary problem with
    ``z_k >= m/2`` on its samples and ``z_k <= -m/2`` on the others (so ``z_y - z_j >= m`` when it
    is zero), the positive term weighted ``K - 1`` against the ``K - 1`` negative ones:
    ``(1/N) sum_i (1/K) [(K-1) max(0, m/2 - z_{i,y_i}) + sum_{j != y_i} max(0, m/2 + z_{ij})]``
    (Serrurier et al., CVPR 2021, arXiv 2006.06520, multi-class extension; the form of
    deel-torchlip's ``HKRMulticlassLoss``)."""
    _check(logits, y, "one_vs_all_hinge")
    m = _positive(margin, "one_vs_all_hinge", "margin")
    k = logits.shape[1]
    onehot = F.one_hot(y.to(logits.device), k).to(logits.dtype)
    hinge = F.relu(m / 2 - (2 * onehot - 1) * logits) * (1 + (k - 2) * onehot)
    return hinge.mean(1).mean()


def kantorovich_rubinstein(logits: Tensor, y: Tensor) -> Tensor:
    """The Kantorovich-Rubinstein estimate of the Wasserstein-1 distance, one-vs-all and averaged
    over the classes: ``(1/K) sum_k (mean_{i: y_i = k} z_{ik} - mean_{i: y_i != k} z_{ik})`` (a
    class with no sample in the batch, or no other sample, contributes its one side). For a
    1-Lipschitz ``z_k`` its supremum is ``W_1`` between class ``k`` and the rest (Kantorovich-
    Rubinstein duality; Serrurier et al., CVPR 2021, arXiv 2006.06520). Linear in the logits: to
    maximise on a network whose Lipschitz constant is bounded, never alone on a free one."""
    _check(logits, y, "kantorovich_rubinstein")
    onehot = F.one_hot(y.to(logits.device), logits.shape[1]).to(logits.dtype)
    pos = onehot.sum(0)
    neg = logits.shape[0] - pos
    return ((logits * onehot).sum(0) / pos.clamp(min=1) - (logits * (1 - onehot)).sum(0) / neg.clamp(min=1)).mean()


def hkr(logits: Tensor, y: Tensor, margin: float = 1.0, alpha: float = 0.99) -> Tensor:
    """The hinge-regularized Kantorovich-Rubinstein loss of Serrurier, Mamalet, Gonzalez-Sanz,
    Boissin, Loubes, del Barrio, "Achieving robustness in classification using optimal transport
    with hinge regularization", CVPR 2021 (arXiv 2006.06520), multi-class one-vs-all:
    ``alpha * H_m(z, y) - (1 - alpha) * KR(z, y)`` with :func:`one_vs_all_hinge` ``H_m`` and
    :func:`kantorovich_rubinstein` ``KR``; ``alpha`` in ``(0, 1]`` is deel-torchlip's convex weight
    (the paper's ``KR + lambda H`` up to the factor ``1 + lambda``, ``alpha = lambda / (1 + lambda)``;
    ``alpha = 1``: the hinge alone). For networks with a bounded Lipschitz constant (1-Lipschitz
    layers, or spectral normalization with bounded BatchNorm): the KR term is unbounded otherwise."""
    a = _positive(alpha, "hkr", "alpha", upper=1.0, closed=True)
    h = one_vs_all_hinge(logits, y, margin)
    return h if a == 1.0 else a * h - (1 - a) * kantorovich_rubinstein(logits, y)


# ---------------------------------------------------------------------------- the registry


@dataclass(frozen=True)
class LossSpec:
    """A registered loss: ``fn(logits, y, **options)``, ``options`` mapping each keyword of ``fn``
    it reads to the :class:`~sepconv.train.TrainConfig` field (and ``sepconv train`` flag) that
    sets it, and a one-line description for ``--help``."""

    name: str
    fn: Callable[..., Tensor]
    options: dict[str, str] = field(default_factory=dict)
    summary: str = ""

    def __call__(self, logits: Tensor, y: Tensor, **settings) -> Tensor:
        """The loss with the settings it reads, taken by field name (``margin=``, ``hkr_alpha=``...);
        settings it does not read are ignored."""
        return self.fn(logits, y, **{kw: settings[f] for kw, f in self.options.items() if f in settings})


#: Registered losses by name (:func:`register_loss` adds one); :func:`loss_names` lists them.
LOSSES: dict[str, LossSpec] = {}
#: Other names of registered losses: ``tau_ce`` is ``ce`` (its temperature is ``logit_scale``).
LOSS_ALIASES: dict[str, str] = {}


def register_loss(spec: LossSpec, aliases: tuple[str, ...] = ()) -> LossSpec:
    """Add ``spec`` (and other names for it) to the registry that ``sepconv train --loss``,
    :class:`~sepconv.train.TrainConfig` and :func:`sepconv.train.classification_loss` read."""
    for name in (spec.name, *aliases):
        if name in LOSSES or name in LOSS_ALIASES:
            raise ConfigError(f"register_loss: a loss named {name!r} is already registered")
    LOSSES[spec.name] = spec
    LOSS_ALIASES.update({a: spec.name for a in aliases})
    return spec


def loss_names(aliases: bool = False) -> tuple[str, ...]:
    """The registered losses' names (with ``aliases``: their other names too)."""
    return (*LOSSES, *LOSS_ALIASES) if aliases else tuple(LOSSES)


def canonical_loss(name: str) -> str:
    """``name``, or the loss it is another name of (``tau_ce`` -> ``ce``); unknown names unchanged."""
    return LOSS_ALIASES.get(name, name) if isinstance(name, str) else name


def get_loss(name: str) -> LossSpec:
    """The registered loss ``name`` (or alias); :class:`ConfigError` naming the choices otherwise."""
    spec = LOSSES.get(canonical_loss(name)) if isinstance(name, str) else None
    if spec is None:
        alias = "".join(f", {a} (= {n})" for a, n in LOSS_ALIASES.items())
        raise ConfigError(f"unknown loss {name!r}; choose one of {', '.join(LOSSES)}{alias}")
    return spec


register_loss(LossSpec("ce", cross_entropy, {"logit_scale": "logit_scale", "label_smoothing": "label_smoothing"},
                       "cross-entropy of the logits times --logit-scale S, divided by S (Bethune et al. 2022)"),
              aliases=("tau_ce",))
register_loss(LossSpec("margin_ce", margin_cross_entropy, {"margin": "margin", "logit_scale": "logit_scale"},
                       "cross-entropy with the true logit lowered by --margin M, logits times --logit-scale S "
                       "(Prach & Lampert 2022)"))
register_loss(LossSpec("hinge", multiclass_hinge, {"margin": "margin"},
                       "multi-class hinge with logit margin --margin (Li et al. 2019; Trockman & Kolter 2021)"))
register_loss(LossSpec("hkr", hkr, {"margin": "margin", "alpha": "hkr_alpha"},
                       "hinge-regularized Kantorovich-Rubinstein, one-vs-all (Serrurier et al. 2021)"))


def fantastic_four_penalty(model: nn.Module, input_shape: tuple[int, int, int]) -> Callable[[], Tensor]:
    """The Fantastic Four regularizer of ``model``: a function returning ``sum_l F4(W_l)``, the sum
    over its Conv2d layers of the minimum of their four differentiable reshape bounds on the spectral
    norm (Singla & Feizi, ICLR 2021, arXiv 1911.10258, Sec. 5 and Theorem 1;
    :func:`sepconv.spectral.fantastic_four`). Add ``beta * penalty()`` to the loss of each step.

    The layers and their geometries are found once, here, by one dry forward pass at ``input_shape``
    ``(C, H, W)``; the returned function only reads the current weights (and leaves the state of
    any spectral normalization as the forward pass left it)."""
    # NB: imported here: losses is imported by the training config, the spectral engine is not needed there
    from .normalize import frozen_state  # noqa: PLC0415
    from .spectral import ConvSpec, fantastic_four  # noqa: PLC0415
    from .spectral.network import layer_inputs  # noqa: PLC0415

    convs = [(mod, ConvSpec.of(mod, shape[-2:]))
             for mod, shape in layer_inputs(model, tuple(input_shape), types=(nn.Conv2d,)).values()]

    def penalty() -> Tensor:
        with frozen_state():
            return sum(fantastic_four(mod.weight, spec) for mod, spec in convs)
    return penalty
