"""1-Lipschitz convolutions and linear layers: plain ``nn.Conv2d`` / ``nn.Linear`` modules with
:mod:`torch.nn.utils.parametrize` parametrizations, so that every tool (and
:func:`sepconv.spectral.lipschitz_bound`, which bounds them from their actual weights) sees
ordinary layers.

* :func:`lipschitz_linear` -- torch's ``orthogonal`` (norm exactly 1), Björck or the matrix norm
  (:class:`~sepconv.normalize.MatrixNorm`): norm <= 1;
* :func:`lipschitz_pointwise` -- a 1x1 conv by Björck or the matrix norm: norm <= 1 (certified);
* :func:`orthogonal_depthwise` -- a depthwise conv ``C -> m C`` of paraunitary filter banks: an isometry
  (circular padding) or norm <= 1;
* :func:`lipschitz_conv2d` -- a regular conv by a certified bound (:class:`~sepconv.normalize.BoundNorm`):
  norm <= 1 (certified);
* :class:`LipschitzSeparableConv2d` -- depthwise by its FFT norm and pointwise by its matrix norm or
  Björck (*product*), the block by its own norm (*composite*), or both factors orthogonal
  (*orthogonal*: paraunitary depthwise, Björck pointwise): norm <= 1 (certified).

"certified" holds in eval mode; :class:`~sepconv.normalize.MatrixNorm` estimates its norm by power
iteration in training mode (Miyato et al. 2018) and uses the exact one in eval mode.
Parametrizations are registered with ``unsafe=True`` (each keeps the weight's shape and dtype) and
pass a ``meta`` weight through unchanged, so that the layers can be built and run on the ``meta``
device (shape probes: ``create_model``, ``sepconv models``, the trainer's memory estimate). torch's
``orthogonal`` cannot be built there (its basis stays unset), so the models use Björck heads.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import orthogonal

from ..errors import ConfigError
from ..layers import DepthwiseSeparableConv2d
from ..spectral import ConvSpec
from .bjorck import BJORCK_ITERATIONS, BjorckOrthonormal
from .composite import CompositeNorm, composite_methods
from .parametrizations import BoundNorm, DepthwiseFFTNorm, MatrixNorm
from .paraunitary import ParaunitaryDepthwise

__all__ = ["LINEAR_KINDS", "LipschitzSeparableConv2d", "NORMS", "POINTWISE_KINDS", "lipschitz_conv2d",
           "lipschitz_linear", "lipschitz_pointwise", "orthogonal_depthwise"]

#: How a Linear layer is kept 1-Lipschitz: torch's orthogonal parametrization, Björck, matrix norm.
LINEAR_KINDS = ("orthogonal", "bjorck", "normalized")
#: How a pointwise conv is kept 1-Lipschitz (``none``: only with the composite normalization).
POINTWISE_KINDS = ("bjorck", "normalized", "none")
#: How a separable block is kept 1-Lipschitz: each factor normalized alone, the block normalized as one
#: operator, or both factors orthogonal (paraunitary depthwise, Björck pointwise).
NORMS = ("product", "composite", "orthogonal")


class _ShapesOnMeta:
    """Mixin for a parametrization: a ``meta`` weight (shapes only, no values to normalize) passes through."""

    def forward(self, weight: Tensor) -> Tensor:
        return weight if weight.is_meta else super().forward(weight)  # type: ignore[misc]


class _DepthwiseNorm(_ShapesOnMeta, DepthwiseFFTNorm):
    """:class:`~sepconv.normalize.DepthwiseFFTNorm` (exact / certified FFT norm), shapes only on meta."""


class _MatrixNorm(_ShapesOnMeta, MatrixNorm):
    """:class:`~sepconv.normalize.MatrixNorm` (exact matrix norm in eval mode), shapes only on meta."""


class _BoundNorm(_ShapesOnMeta, BoundNorm):
    """:class:`~sepconv.normalize.BoundNorm` (a certified bound), shapes only on meta."""


def _choice(layer: str, what: str, value, choices: Sequence[str]) -> str:
    """``value`` if it is one of ``choices``, else a one-line ConfigError naming ``layer`` and ``what``."""
    if not isinstance(value, str) or value not in choices:
        raise ConfigError(f"{layer}: {what} must be one of {', '.join(map(repr, choices))}, got {value!r:.40}")
    return value


def _register(module: nn.Module, parametrization: nn.Module) -> None:
    """Parametrize ``module.weight`` (``unsafe``: shape and dtype are kept, so nothing is evaluated here)."""
    parametrize.register_parametrization(module, "weight", parametrization, unsafe=True)


def _matrix(module: nn.Module, kind: str, iters: int) -> None:
    """Björck (weight initialised orthogonal: a fixed point of the iteration) or the matrix norm."""
    if kind == "bjorck":
        nn.init.orthogonal_(module.weight)
        _register(module, BjorckOrthonormal(iters))
    elif kind == "normalized":
        _register(module, _MatrixNorm(module.weight, 1.0, "scale"))


def lipschitz_linear(in_features: int, out_features: int, bias: bool = True, kind: str = "orthogonal",
                     iters: int = BJORCK_ITERATIONS) -> nn.Linear:
    """An ``nn.Linear`` with spectral norm 1 (Anil et al. 2019, arXiv 1811.05381, Sec. 5):

    * ``orthogonal``: torch's :func:`torch.nn.utils.parametrizations.orthogonal` with the matrix
      exponential map (orthonormal rows or columns; norm **exactly** 1 up to float rounding). Not its
      Householder map, the default for non-square weights: it reads the sign of each reflection from
      the diagonal of the parameter cast to int, so weight decay (``-1 -> -0.9999``) turns the whole
      weight into zeros after one step;
    * ``bjorck``: :class:`BjorckOrthonormal` (``iters`` steps, then an exact normalization: **<= 1**);
    * ``normalized``: ``W / ||W||_2`` (:class:`~sepconv.normalize.MatrixNorm`: exact in eval mode).
    """
    _choice("lipschitz_linear", "kind", kind, LINEAR_KINDS)
    layer = nn.Linear(in_features, out_features, bias=bias)
    if kind == "orthogonal":
        orthogonal(layer, orthogonal_map="matrix_exp")
    else:
        _matrix(layer, kind, iters)
    return layer


def lipschitz_pointwise(in_channels: int, out_channels: int, bias: bool = True, kind: str = "bjorck",
                        stride: int = 1, iters: int = BJORCK_ITERATIONS) -> nn.Conv2d:
    """A 1x1 ``nn.Conv2d`` (no padding) whose matrix ``W`` (``C_out x C_in``) has ``||W||_2 <= 1``,
    so the layer has norm **<= 1** at every input size (it is ``W`` at each pixel; a stride only
    drops pixels): ``bjorck`` (:class:`BjorckOrthonormal`, near-orthonormal) or ``normalized``
    (``W / ||W||_2`` by :class:`~sepconv.normalize.MatrixNorm`, exact in eval mode)."""
    _choice("lipschitz_pointwise", "kind", kind, POINTWISE_KINDS[:2])
    conv = nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=bias)
    _matrix(conv, kind, iters)
    return conv


def orthogonal_depthwise(in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                         padding: int | None = None, *, bias: bool = True, padding_mode: str = "zeros") -> nn.Conv2d:
    """A depthwise ``nn.Conv2d`` ``C_in -> C_out = m C_in`` (``groups=C_in``, ``m >= 2``) whose channels are
    paraunitary filter banks (:class:`~sepconv.lipschitz.ParaunitaryDepthwise`): an **isometry** with
    circular padding, norm **<= 1** otherwise. The orthogonal separable block without its pointwise
    part: an orthogonal ``m x m`` pointwise conv after it adds nothing (it only rotates the bank's
    projections), so where the widths allow (``C_out`` a multiple of ``C_in``, as for a first layer on
    one input channel) this is the cheaper layer. ``padding`` defaults to ``(k - 1) // 2``."""
    if in_channels < 1 or out_channels % in_channels:
        raise ConfigError(f"orthogonal_depthwise: {out_channels} output channels are not a multiple of "
                          f"{in_channels} input channels")
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, (kernel_size - 1) // 2 if padding is None
                     else padding, groups=in_channels, bias=bias, padding_mode=padding_mode)
    _register(conv, ParaunitaryDepthwise(out_channels // in_channels, conv.kernel_size))
    return conv


def lipschitz_conv2d(in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                     padding: int | None = None, *, in_size: int | Sequence[int], bias: bool = True,
                     padding_mode: str = "zeros", method: str = "fft", mode: str = "scale") -> nn.Conv2d:
    """A regular ``nn.Conv2d`` divided by a differentiable certified bound on its norm at ``in_size``
    (:class:`~sepconv.normalize.BoundNorm`; ``fft``: the circular-embedding bound, **exact** for
    circular padding, **certified** for zero padding; Sedghi et al. 2019). ``mode="scale"``: norm
    ``target = 1`` (circular) or at most 1; ``"clip"``: at most 1. ``padding`` defaults to
    ``(k - 1) // 2``. With zero padding a smaller input sees a submatrix of the operator, so the
    bound also holds for inputs smaller than ``in_size``."""
    _choice("lipschitz_conv2d", "method", method, composite_methods())
    _choice("lipschitz_conv2d", "mode", mode, ("scale", "clip"))
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, (kernel_size - 1) // 2 if padding is None
                     else padding, bias=bias, padding_mode=padding_mode)
    _register(conv, _BoundNorm(ConvSpec.of(conv, in_size), 1.0, mode, method))
    return conv


class LipschitzSeparableConv2d(DepthwiseSeparableConv2d):
    """A depthwise-separable conv (``dw`` k x k, ``groups=C_in``, depth multiplier ``m``; then ``pw``
    1x1) with norm **<= 1** at inputs of ``in_size`` (Runkel et al. 2021, arXiv 2102.06496):

    * ``norm="product"``: ``dw`` divided by its FFT norm (:class:`~sepconv.normalize.DepthwiseFFTNorm`:
      **exact** for circular padding, **certified** for zero padding) and ``pw`` by its matrix norm
      (``pointwise="normalized"``, exact in eval mode) or orthonormalized (``"bjorck"``), so
      ``||pw dw|| <= ||pw|| ||dw|| <= 1``;
    * ``norm="composite"``: the block divided by its own norm, per frequency ``||P diag(D^(w))||``
      (:class:`CompositeNorm`, registry ``method``, default ``fft``: **exact** for circular padding,
      **certified** otherwise), so its norm is 1 (circular) or at most 1 -- never below it because
      the two factors' maxima do not align. ``dw`` keeps its FFT normalization (it only fixes the
      scale shared by the two factors); ``pointwise`` defaults to ``"none"`` (``"bjorck"`` makes
      ``pw`` near-orthonormal before the block is normalized);
    * ``norm="orthogonal"``: ``dw`` a paraunitary filter bank per channel
      (:class:`~sepconv.lipschitz.ParaunitaryDepthwise`; needs ``depth_multiplier >= 2``: an
      **isometry** from ``C_in`` to ``m C_in`` channels with circular padding, norm <= 1 otherwise) and
      ``pw`` orthonormalized (``pointwise="bjorck"``, the default here) -- no normalization that caps
      the gain of the weaker directions: with ``m C_in = C_out`` and circular padding the block is an
      isometry (gradient-norm preserving, as the orthogonal convs of Li et al. 2019 and Trockman &
      Kolter 2021 are).

    ``padding`` defaults to ``dilation (k - 1) // 2``. An ``nn.Module`` subclass of
    :class:`~sepconv.layers.DepthwiseSeparableConv2d` (children ``dw``, ``mid_norm``, ``mid_act``, ``pw``),
    so :func:`sepconv.spectral.lipschitz_bound` merges ``dw`` and ``pw`` into one operator and bounds
    it from the actual (parametrized) weights -- the independent check of the normalization.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 padding: int | None = None, *, in_size: int | Sequence[int], norm: str = "product",
                 pointwise: str | None = None, bias: bool = True, padding_mode: str = "zeros",
                 depth_multiplier: int = 1, dilation: int = 1, method: str = "fft",
                 iters: int = BJORCK_ITERATIONS):
        name = type(self).__name__
        _choice(name, "norm", norm, NORMS)
        pointwise = pointwise or {"product": "normalized", "composite": "none", "orthogonal": "bjorck"}[norm]
        _choice(name, "pointwise", pointwise, POINTWISE_KINDS if norm == "composite" else POINTWISE_KINDS[:2])
        _choice(name, "method", method, composite_methods())
        padding = dilation * (kernel_size - 1) // 2 if padding is None else padding
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, bias, padding_mode,
                         depth_multiplier)
        self.norm, self.pointwise_kind = norm, pointwise
        spec = ConvSpec.of(self.dw, in_size)
        self.in_size = spec.in_size
        if norm == "orthogonal":
            _register(self.dw, ParaunitaryDepthwise(depth_multiplier, self.dw.kernel_size))
        else:
            _register(self.dw, _DepthwiseNorm(spec, 1.0, "scale"))
        _matrix(self.pw, pointwise, iters)
        if norm == "composite":
            _register(self.pw, CompositeNorm(self.dw, spec, 1.0, "scale", method))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, in_size={self.in_size}, norm={self.norm!r}, pointwise={self.pointwise_kind!r}"
