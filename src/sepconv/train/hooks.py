"""Extra loss terms, epoch-end measurements and model preparation: :class:`Hooks`.

``loss = cross-entropy + sum of terms``: the BSConv-S orthonormal penalty, the Fantastic Four
penalty, ... each reported by name in ``metrics.jsonl``; epoch-end hooks add their own metrics
(certified accuracy, ...); ``prepare`` hooks change the model once before training (spectral
normalization). :func:`default_hooks` builds the ones a :class:`~sepconv.train.TrainConfig` asks for.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..layers import orthonormal_penalty
from ..losses import fantastic_four_penalty
from ..normalize import spectral_normalize
from ..spectral import certified_radii, curvature_penalty, lipschitz_bound
from .config import TrainConfig
from .device import _to_device

__all__ = ["EpochHook", "Hooks", "LossTerm", "default_hooks"]

LossTerm = Callable[[nn.Module], Tensor]
EpochHook = Callable[[nn.Module, int], dict]


@dataclass
class Hooks:
    """Extension points for later features.

    ``loss_terms``: name -> f(model) returning a 0-dim tensor added to the loss each step
    (the model passed is the bare model, not the DDP wrapper); its epoch mean is logged
    under ``loss_<name>``. ``epoch_end``: f(model, epoch) -> dict of extra metrics, run on
    rank 0 in eval mode after the test evaluation. ``prepare``: f(model) -> model, applied
    once after the model is built and before the optimizer sees its parameters (e.g.
    spectral normalization); it must be deterministic so that resuming rebuilds the same
    structure.
    """

    loss_terms: dict[str, LossTerm] = field(default_factory=dict)
    epoch_end: list[EpochHook] = field(default_factory=list)
    prepare: list[Callable[[nn.Module], nn.Module]] = field(default_factory=list)


def default_hooks(cfg: TrainConfig, input_shape: tuple[int, int, int] | None = None, test_set=None,
                  device: torch.device | str = "cpu") -> Hooks:
    """Hooks implied by the config's options (regularizers known to sepconv).

    ``input_shape`` ``(C, H, W)`` of the data is needed by spectral normalization (``sn``), the
    Fantastic Four and curvature penalties (``ff_beta``, ``curvature_beta``) and certification
    (``certify``), which also needs the ``test_set`` (and the ``device`` the model lives on)."""
    hooks = Hooks()
    if cfg.bsconv_alpha > 0:
        alpha = cfg.bsconv_alpha
        hooks.loss_terms["bsconv"] = lambda m: orthonormal_penalty(m, alpha=alpha)
    if (cfg.sn or cfg.ff_beta > 0 or cfg.curvature_beta > 0 or cfg.certify) and input_shape is None:
        raise ConfigError("default_hooks: sn, ff_beta, curvature_beta and certify need the data's input_shape "
                          "(C, H, W)")
    if cfg.sn:
        hooks.prepare.append(_sn_prepare(cfg, tuple(input_shape)))
    if cfg.ff_beta > 0:
        record, term = _penalty(cfg.ff_beta, fantastic_four_penalty, tuple(input_shape))
        hooks.prepare.append(record)
        hooks.loss_terms["ff"] = term
    if cfg.curvature_beta > 0:
        record, term = _penalty(cfg.curvature_beta, _log_curvature, tuple(input_shape))
        hooks.prepare.append(record)
        hooks.loss_terms["curvature"] = term
    if cfg.certify:
        if test_set is None:
            raise ConfigError("default_hooks: certify needs the test set")
        hooks.prepare.append(_certifiable(tuple(input_shape)))
        hooks.epoch_end.append(_certify_hook(cfg, test_set, device))
    return hooks


def _certifiable(input_shape: tuple[int, int, int]) -> Callable[[nn.Module], nn.Module]:
    """A ``prepare`` hook for ``certify``: the network's Lipschitz bound once before training, so that a
    model without one (a layer with no Lipschitz rule, a product of two activations: no global
    constant) is refused at once with :func:`~sepconv.spectral.lipschitz_bound`'s one-line error naming
    the layer, not after the first epoch."""
    def prepare(model: nn.Module) -> nn.Module:
        lipschitz_bound(model, input_shape, method="fft")
        return model
    return prepare


def _sn_prepare(cfg: TrainConfig, input_shape: tuple[int, int, int]) -> Callable[[nn.Module], nn.Module]:
    """A ``prepare`` hook: :func:`~sepconv.normalize.spectral_normalize` with the config's ``sn``
    method, target, mode and ``sn_batchnorm`` (in place, deterministic)."""
    def prepare(model: nn.Module) -> nn.Module:
        spectral_normalize(model, cfg.sn, cfg.sn_target, cfg.sn_mode, in_size=input_shape, batchnorm=cfg.sn_batchnorm)
        return model
    return prepare


def _log_curvature(model: nn.Module, input_shape: tuple[int, int, int]) -> Callable[[], Tensor]:
    """``log C``, ``C`` the curvature bound from Fantastic Four norms (:func:`~sepconv.spectral.curvature_penalty`).
    The log, not ``C`` itself (Singla & Feizi add ``gamma C``): ``C`` grows like the product of the
    layers' squared norms, so a fixed step on it overshoots (measured: ``simple_cnn`` with ELU, no
    BatchNorm, on the digits, SGD lr 0.1 diverged within 4 steps at ``beta = 0.01``); the log has the
    same descent direction, ``grad C / C``, at a step that does not depend on the scale of ``C``."""
    curvature = curvature_penalty(model, input_shape)
    return lambda: torch.log(curvature())


def _penalty(beta: float, make: Callable, input_shape: tuple[int, int, int]):
    """``beta * penalty()`` with ``penalty = make(model, input_shape)`` built once by a ``prepare``
    hook: the Fantastic Four penalty (:func:`sepconv.losses.fantastic_four_penalty`, the sum of the
    convs' bounds) or the log of the curvature bound (:func:`_log_curvature`, which refuses a model
    with non-smooth activations there, before the first step)."""
    penalty: list[Callable[[], Tensor]] = []

    def record(model: nn.Module) -> nn.Module:
        penalty[:] = [make(model, input_shape)]
        return model

    def term(model: nn.Module) -> Tensor:
        return beta * penalty[0]()
    return record, term


def _certify_hook(cfg: TrainConfig, test_set, device) -> EpochHook:
    """After each epoch, on the test set: the network's certified Lipschitz bound
    (:func:`~sepconv.spectral.lipschitz_bound`, method ``fft``; ``lipschitz_bound``: w.r.t. the
    normalized input the network sees, ``lipschitz_pixel``: w.r.t. the pixels in [0, 1], that bound
    over ``min(std)``) and the certified accuracy ``cert_acc@EPS`` at each **pixel-l2** radius of
    ``cfg.certify``: correct, with certified radius above ``EPS`` (the larger of the global
    Lipschitz-margin certificate of Tsuzuku et al. 2018 and the pairwise one of a final Linear,
    :func:`~sepconv.spectral.certified_radii` with ``input_scale`` the data's ``std``)."""
    std = getattr(test_set, "std", None)
    if std is None:
        raise ConfigError("default_hooks: certify needs the test set's std (its radii are pixel-l2 radii: the "
                          "network sees (x - mean) / std)")
    scale = tuple(float(s) for s in std)

    def batches():
        idx = torch.arange(len(test_set))
        for i in range(0, len(idx), cfg.eval_batch_size):
            x, y = test_set.get_batch(idx[i:i + cfg.eval_batch_size])
            yield _to_device(x, y, device, cfg.channels_last)

    def hook(model: nn.Module, epoch: int) -> dict:
        radii, L = certified_radii(model, batches(), method="fft", input_scale=scale)
        return {"lipschitz_bound": L, "lipschitz_pixel": L / min(scale),
                **{f"cert_acc@{eps:g}": float((radii > eps).double().mean()) for eps in cfg.certify}}
    return hook
