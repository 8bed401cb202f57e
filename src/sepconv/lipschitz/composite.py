"""Normalizing a depthwise-separable block as **one** operator (depthwise, then pointwise).

Normalizing the two factors separately (the *product* normalization: ``||D|| <= 1`` and
``||P|| <= 1``) guarantees ``||P D|| <= ||P|| ||D|| <= 1``, but the product of norms is loose:
with circular padding the block is block-diagonalised by the 2-D DFT into the per-frequency blocks
``P diag(D^(w))`` (``C_out x C_in``; Sedghi et al. 2019; Runkel et al. 2021, arXiv 2102.06496), and
``max_w ||P diag(D^(w))||`` sits below ``||P|| max_w max_c |D^_c(w)|`` unless the largest entries of
both align. :class:`CompositeNorm` divides the pointwise weight by the norm of the *composite*
operator instead, so the block's norm is exactly the target (circular padding) or at most it
(zero padding, certified), and no Lipschitz budget is wasted between the two factors.
"""

from __future__ import annotations

from torch import Tensor, nn

from ..errors import ConfigError
from ..layers import compose_depthwise_separable
from ..spectral import ConvSpec, get_method, method_names
from .parametrizations import rescale

__all__ = ["CompositeNorm", "composite_methods", "separable_norm"]


def composite_methods() -> tuple[str, ...]:
    """Registry methods a layer may be normalized by: differentiable **certified** upper bounds
    (:func:`sepconv.spectral.method_names`; ``fft``, ``gram``, ``fantastic4`` and any registered one),
    read when called. ``exact`` is left out: for zero padding it is the lower end of a bracket, so a
    layer divided by it could exceed 1 by the tolerance (``fft`` is already exact for circular padding)."""
    return method_names(kind="certified", differentiable=True)


def separable_norm(dw_weight: Tensor, pw_weight: Tensor, spec: ConvSpec, method: str = "fft",
                   **options) -> Tensor:
    """Spectral norm of depthwise ``dw_weight`` ``(C_in m, 1, k, k)`` then pointwise ``pw_weight``
    ``(C_out, C_in m, 1, 1)`` as one operator: the composed dense kernel
    (:func:`sepconv.layers.compose_depthwise_separable`, exact for every padding mode) on the
    depthwise conv's geometry ``spec`` (``spec.groups = C_in``; the merged conv has ``groups=1``) by
    the registry ``method``. Whether
    the value is exact, a certified bound or an estimate is the method's kind: ``fft`` is **exact**
    for circular padding (per frequency ``||P diag(D^(w))||``) and a **certified** upper bound for
    zero padding. Differentiable when the method is."""
    if dw_weight.dim() != 4 or dw_weight.shape[1] != 1 or dw_weight.shape[0] % spec.groups:
        raise ConfigError(f"separable_norm: {tuple(dw_weight.shape)} is not a depthwise weight for "
                          f"groups={spec.groups} input channels")
    weight = compose_depthwise_separable(dw_weight, pw_weight, spec.groups)
    merged = ConvSpec(spec.in_size, spec.stride, spec.padding, spec.padding_mode, spec.dilation, 1)
    return get_method(method, "separable_norm").fn(weight, merged, **options)


class CompositeNorm(nn.Module):
    """Parametrization of the **pointwise** weight of a depthwise-then-pointwise block that divides it
    by the norm ``sigma`` of the whole block (:func:`separable_norm`): ``P <- rescale(P, sigma)``,
    ``mode="scale"`` (``P target / sigma``: the block's norm equals ``target`` when ``sigma`` is
    exact) or ``"clip"`` (``P / max(1, sigma / target)``).

    ``sigma`` comes from the registry method ``method`` (default ``fft``; any of
    :func:`composite_methods`, certified upper bounds): with ``fft`` the block is normalized by its
    **exact** norm for circular padding and by a **certified** upper bound for zero padding, so its
    norm is ``<= target`` in training and eval mode alike (``fft`` rounds its block maximum up by its
    training tolerance ``1e-4``, so an exact norm lands within ``1e-4`` below the target).

    ``depthwise`` is the block's depthwise conv, read through its own parametrization if any (held as
    a plain reference, as :class:`~sepconv.normalize.BatchNormLipschitz` holds its BatchNorm);
    ``spec`` its geometry at the block's input size. Stateless; differentiable in both factors.
    """

    def __init__(self, depthwise: nn.Conv2d, spec: ConvSpec, target: float = 1.0, mode: str = "scale",
                 method: str = "fft", options: dict | None = None):
        super().__init__()
        if method not in composite_methods():
            raise ConfigError(f"CompositeNorm: method must be one of {', '.join(map(repr, composite_methods()))} "
                              f"(differentiable, certified), got {method!r:.40}")
        if mode not in ("scale", "clip"):
            raise ConfigError(f"CompositeNorm: mode must be 'scale' or 'clip', got {mode!r:.40}")
        if depthwise.groups != depthwise.in_channels:
            raise ConfigError(f"CompositeNorm: the depthwise conv has groups={depthwise.groups}, "
                              f"not its {depthwise.in_channels} input channels")
        self._dw = [depthwise]  # a plain reference: the block owns the conv
        self.spec, self.target, self.mode, self.method = spec, float(target), mode, method
        self.options = dict(get_method(method).train_options if options is None else options)

    def sigma(self, pw_weight: Tensor) -> Tensor:
        """The certified (or exact) norm of the block with this pointwise weight."""
        return separable_norm(self._dw[0].weight, pw_weight, self.spec, self.method, **self.options)

    def forward(self, pw_weight: Tensor) -> Tensor:
        if pw_weight.is_meta:  # shapes only (create_model's probe)
            return pw_weight
        return rescale(pw_weight, self.sigma(pw_weight), self.target, self.mode)

    def extra_repr(self) -> str:
        return f"target={self.target}, mode={self.mode!r}, method={self.method!r}, {self.spec.describe()}"
