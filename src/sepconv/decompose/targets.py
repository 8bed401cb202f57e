"""Conversion targets: the forms a trained regular conv can be converted into, as objects.

A :class:`ConversionTarget` holds everything :func:`sepconv.decompose.convert` knows about one
form: the block that replaces a conv (:meth:`~ConversionTarget.build`), how its factors are
fitted, data-free or to patch moments (:meth:`~ConversionTarget.fit`), the regular kernel the
block computes (:meth:`~ConversionTarget.dense_weight`) and the parameter that carries the
conv's bias (:meth:`~ConversionTarget.output_bias`), its cost at a rank
(:meth:`~ConversionTarget.params`, :meth:`~ConversionTarget.macs`), the rank at which it is
exact (:meth:`~ConversionTarget.full_rank`) and the singular values whose energy picks a rank
(:meth:`~ConversionTarget.spectrum`). Targets live in one registry (:func:`register_target`,
:func:`get_target`, :func:`target_names`) that ``convert``, the recipe replay of
:func:`sepconv.io.load_model` and ``sepconv convert --to`` all read: a new target is one class
and one :func:`register_target` call.

The built-in targets, registered at the bottom of this module (stride, padding, padding mode and
dilation on the spatial part; the bias on the last op; ``n`` outputs, ``c`` inputs, ``K`` taps):

===============  ===================================================================
``"dsc"``        :class:`~sepconv.layers.DepthwiseSeparableConv2d` with ``depth_multiplier=r``
``"bsconv_u"``   :class:`~sepconv.layers.BSConvU` with ``blueprints=r`` (plain BSConv-U at r = 1)
``"bsconv_s"``   :class:`~sepconv.layers.BSConvS` with ``blueprints=r`` and ``mid_channels=M'``
                 (``pw1`` has orthonormal rows; ``M' = min(n r, c)`` unless ``p`` is given)
``"channel"``    ``nn.Sequential(Conv2d(c, d', k, ...), Conv2d(d', n, 1, bias))`` (Zhang et al.)
===============  ===================================================================
"""

from __future__ import annotations

import math

from torch import Tensor, nn

from ..errors import ConfigError
from ..layers import (
    BSConvS,
    BSConvU,
    DepthwiseSeparableConv2d,
    bsconv_s_mid_channels,
    compose_blueprint,
    compose_depthwise_separable,
)
from . import factor as fz
from .factor import Moments

__all__ = [
    "BSConvSTarget",
    "BSConvUTarget",
    "ChannelTarget",
    "ConversionTarget",
    "DepthwiseTarget",
    "conv_macs",
    "conv_out_size",
    "factory_kwargs",
    "get_target",
    "register_target",
    "spatial_kwargs",
    "target_names",
    "unregister_target",
]


# ----------------------------------------------------------------- the geometry of the conv being replaced


def conv_out_size(conv: nn.Conv2d, hw: tuple[int, int]) -> tuple[int, int]:
    """Output ``(H', W')`` of ``conv`` on an input of size ``hw``, as ``nn.Conv2d`` computes it
    (``floor((H + pads - d (k - 1) - 1) / s) + 1`` per axis, PyTorch's ``Conv2d`` formula). Exact."""
    left, right, top, bottom = conv._reversed_padding_repeated_twice
    pads = ((top, bottom), (left, right))
    return tuple((hw[a] + sum(pads[a]) - conv.dilation[a] * (conv.kernel_size[a] - 1) - 1) // conv.stride[a] + 1
                 for a in range(2))  # type: ignore[return-value]


def conv_macs(conv: nn.Conv2d, in_hw: tuple[int, int]) -> int:
    """Multiply-adds of the regular conv itself on one input of size ``in_hw``: ``n c K`` per
    output position (docs/decomposition.md Sec. 1, the cost every target is measured against)."""
    n, c, k = _nck(conv)
    return n * c * k * math.prod(conv_out_size(conv, in_hw))


def _nck(conv: nn.Conv2d) -> tuple[int, int, int]:
    """``(n, c, K)``: output channels, input channels and kernel taps of ``conv``."""
    return conv.out_channels, conv.in_channels, conv.kernel_size[0] * conv.kernel_size[1]


def _areas(conv: nn.Conv2d, in_hw: tuple[int, int]) -> tuple[int, int]:
    """``(output positions, input positions)`` of ``conv`` on an input of size ``in_hw``."""
    ho, wo = conv_out_size(conv, in_hw)
    return ho * wo, in_hw[0] * in_hw[1]


def spatial_kwargs(conv: nn.Conv2d) -> dict:
    """The keyword arguments that put ``conv``'s geometry (and its bias, if any) on a block of
    :mod:`sepconv.layers`, in ``conv``'s device and dtype."""
    return dict(kernel_size=conv.kernel_size, stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
                bias=conv.bias is not None, padding_mode=conv.padding_mode, **factory_kwargs(conv))


def factory_kwargs(conv: nn.Conv2d) -> dict:
    """``device`` and ``dtype`` of ``conv``'s weight, for building its replacement alike."""
    return dict(device=conv.weight.device, dtype=conv.weight.dtype)


# ----------------------------------------------------------------- the protocol


class ConversionTarget:
    """One form a regular ``nn.Conv2d`` (groups 1) can be converted into.

    Subclass it, set :attr:`name`, implement the methods that raise ``NotImplementedError`` and
    register an instance with :func:`register_target`; :func:`sepconv.decompose.convert` then
    converts to it (``to=name``), :func:`sepconv.io.load_model` rebuilds its blocks from the
    recorded recipe and ``sepconv convert --to name`` offers it. A target is stateless: every
    method takes the conv (or the block) it is about.

    The contract :func:`~sepconv.decompose.convert` relies on: ``build(conv, r, mid)`` followed
    by ``fit`` gives a linear block computing ``conv2d(x, dense_weight(block), output_bias(block))``
    with ``conv``'s geometry, and at ``r = full_rank(conv)`` the data-free fit reproduces
    ``conv.weight`` (up to rounding).
    """

    #: The name ``convert(to=...)``, the recipe and the command line use.
    name: str = ""
    #: True when the block has a second width ``M'`` (:meth:`mid_channels`, chosen by ``p``).
    has_mid: bool = False

    def build(self, conv: nn.Conv2d, rank: int, mid: int | None = None) -> nn.Module:
        """The (uninitialised) block replacing ``conv`` at ``rank`` (``mid``: the second width)."""
        raise NotImplementedError

    def fit(self, block: nn.Module, weight: Tensor, rank: int, mid: int | None, mom: Moments | None) -> None:
        """Copy the factors of ``weight`` at ``rank`` into ``block``'s weights: data-free
        (``mom=None``) or fitted to the patch :class:`~sepconv.decompose.factor.Moments`. The
        bias is not touched (:func:`~sepconv.decompose.convert_layer` re-fits it)."""
        raise NotImplementedError

    def dense_weight(self, block: nn.Module) -> Tensor:
        """The ``(n, c, kh, kw)`` kernel of the regular conv that ``block`` computes."""
        raise NotImplementedError

    def output_bias(self, block: nn.Module) -> nn.Parameter | None:
        """The parameter carrying the conv's bias (on the block's last op): ``block.bias``."""
        return block.bias

    def full_rank(self, conv: nn.Conv2d) -> int:
        """The smallest rank at which the conversion of ``conv`` is exact."""
        raise NotImplementedError

    def spectrum(self, conv: nn.Conv2d) -> Tensor:
        """Singular values ``(rows, full_rank)`` (descending per row) whose mean retained energy
        decides the rank (:func:`~sepconv.decompose.factor.energy_rank`)."""
        raise NotImplementedError

    def params(self, conv: nn.Conv2d, rank: int, mid: int | None = None) -> int:
        """Parameters of the block replacing ``conv`` at ``rank``, its bias included."""
        raise NotImplementedError

    def macs(self, conv: nn.Conv2d, in_hw: tuple[int, int], rank: int, mid: int | None = None) -> int:
        """Multiply-adds of the block on one input of size ``in_hw`` (bias adds not counted, as
        ``torch.utils.flop_counter`` does not count them)."""
        raise NotImplementedError

    def mid_channels(self, conv: nn.Conv2d, rank: int, p: float | None) -> int | None:
        """The block's second width ``M'`` for the subspace fraction ``p``; ``None`` (the
        default) for a target without one (:attr:`has_mid` false)."""
        return None

    def max_mid(self, conv: nn.Conv2d, rank: int) -> int | None:
        """The largest ``M'`` a recipe may ask for at ``rank``; ``None`` without a second width."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


def _bias_params(conv: nn.Conv2d) -> int:
    return conv.out_channels if conv.bias is not None else 0


# ----------------------------------------------------------------- the built-in targets


class DepthwiseTarget(ConversionTarget):
    """Depth-wise decomposition (He et al., arXiv 1910.09455; docs/decomposition.md Sec. 1):
    ``W ~ DW -> PW`` as :class:`~sepconv.layers.DepthwiseSeparableConv2d` with depth multiplier
    ``r``; exact at ``r = min(n, K)``; ``r (c K + n c)`` MACs per output position."""

    name = "dsc"

    def build(self, conv, rank, mid=None):
        return DepthwiseSeparableConv2d(conv.in_channels, conv.out_channels, depth_multiplier=rank,
                                        **spatial_kwargs(conv))

    def fit(self, block, weight, rank, mid, mom):
        dw, pw = fz.depthwise_factors(weight, rank, mom)
        block.dw.weight.copy_(dw)
        block.pw.weight.copy_(pw)

    def dense_weight(self, block):
        return compose_depthwise_separable(block.dw.weight, block.pw.weight, block.dw.in_channels)

    def full_rank(self, conv):
        n, _, k = _nck(conv)
        return min(n, k)

    def spectrum(self, conv):
        return fz.depthwise_spectrum(conv.weight.detach())

    def params(self, conv, rank, mid=None):
        n, c, k = _nck(conv)
        return _bias_params(conv) + rank * (c * k + n * c)

    def macs(self, conv, in_hw, rank, mid=None):
        n, c, k = _nck(conv)
        return rank * (c * k + n * c) * _areas(conv, in_hw)[0]


class BSConvUTarget(ConversionTarget):
    """BSConv-U conversion (Haase & Amthor, arXiv 2003.13549; Network Decoupling, Guo et al.,
    arXiv 1808.05517; docs/decomposition.md Sec. 3): ``W ~ PW -> DW`` as
    :class:`~sepconv.layers.BSConvU` with ``r`` blueprints per filter; exact at ``r = min(c, K)``;
    the pointwise part runs at input resolution: ``n r c`` MACs per input and ``n r K`` per
    output position."""

    name = "bsconv_u"

    def build(self, conv, rank, mid=None):
        return BSConvU(conv.in_channels, conv.out_channels, blueprints=rank, **spatial_kwargs(conv))

    def fit(self, block, weight, rank, mid, mom):
        pw, dw = fz.blueprint_factors(weight, rank, mom)
        block.dw.weight.copy_(dw)
        block.pw.weight.copy_(pw)

    def dense_weight(self, block):
        return compose_blueprint(block.pw.weight, block.dw.weight)

    def full_rank(self, conv):
        _, c, k = _nck(conv)
        return min(c, k)

    def spectrum(self, conv):
        return fz.blueprint_spectrum(conv.weight.detach())

    def params(self, conv, rank, mid=None):
        n, c, k = _nck(conv)
        return _bias_params(conv) + n * rank * c + n * rank * k

    def macs(self, conv, in_hw, rank, mid=None):
        n, c, k = _nck(conv)
        out, inp = _areas(conv, in_hw)
        return n * rank * c * inp + n * rank * k * out


class BSConvSTarget(BSConvUTarget):
    """BSConv-S conversion (Haase & Amthor, arXiv 2003.13549, BSConv-S; docs/decomposition.md
    Sec. 3): the BSConv-U factors, then the pointwise ``(n r) x c`` matrix factored through an
    ``M'``-dimensional subspace with orthonormal rows (:func:`~sepconv.decompose.factor.subspace_factors`),
    as :class:`~sepconv.layers.BSConvS`. ``M' = min(n r, c)`` keeps the BSConv-U product exactly;
    with ``p``, ``M' = min(M'(c, p), n r)`` as in BSConv-S. ``c M' + M' n r`` MACs per input
    position, ``n r K`` per output position."""

    name = "bsconv_s"
    has_mid = True

    def build(self, conv, rank, mid=None):
        return BSConvS(conv.in_channels, conv.out_channels, blueprints=rank, mid_channels=mid, with_bn=False,
                       **spatial_kwargs(conv))

    def fit(self, block, weight, rank, mid, mom):
        pw, dw = fz.blueprint_factors(weight, rank, mom)
        block.dw.weight.copy_(dw)
        pw1, pw2 = fz.subspace_factors(pw, mid)
        block.pw1.weight.copy_(pw1)
        block.pw2.weight.copy_(pw2)

    def dense_weight(self, block):
        return block.dense_weight()

    def params(self, conv, rank, mid=None):
        n, c, k = _nck(conv)
        mid = self.mid_channels(conv, rank, None) if mid is None else mid
        return _bias_params(conv) + c * mid + mid * n * rank + n * rank * k

    def macs(self, conv, in_hw, rank, mid=None):
        n, c, k = _nck(conv)
        mid = self.mid_channels(conv, rank, None) if mid is None else mid
        out, inp = _areas(conv, in_hw)
        return c * mid * inp + mid * n * rank * inp + n * rank * k * out

    def mid_channels(self, conv, rank, p):
        if p is None:
            return min(conv.out_channels * rank, conv.in_channels)
        return min(bsconv_s_mid_channels(conv.in_channels, p), conv.out_channels * rank)

    def max_mid(self, conv, rank):
        return min(conv.in_channels, conv.out_channels * rank)


class ChannelTarget(ConversionTarget):
    """Channel decomposition (Zhang, Zou, He, Sun, arXiv 1505.06798; docs/decomposition.md Sec. 2),
    the baseline: ``d'`` regular filters then a ``1 x 1`` conv, as ``nn.Sequential(Conv2d(c, d', k),
    Conv2d(d', n, 1, bias))``; exact at ``d' = min(n, c K)``; ``d' (c K + n)`` MACs per output position."""

    name = "channel"

    def build(self, conv, rank, mid=None):
        fk = factory_kwargs(conv)
        return nn.Sequential(
            nn.Conv2d(conv.in_channels, rank, conv.kernel_size, conv.stride, conv.padding, conv.dilation, bias=False,
                      padding_mode=conv.padding_mode, **fk),
            nn.Conv2d(rank, conv.out_channels, 1, bias=conv.bias is not None, **fk))

    def fit(self, block, weight, rank, mid, mom):
        first, second = fz.channel_factors(weight, rank, mom)
        block[0].weight.copy_(first)
        block[1].weight.copy_(second)

    def dense_weight(self, block):
        first, second = block[0].weight, block[1].weight
        return (second[:, :, 0, 0] @ first.reshape(first.shape[0], -1)).reshape(second.shape[0], *first.shape[1:])

    def output_bias(self, block):
        return block[1].bias

    def full_rank(self, conv):
        n, c, k = _nck(conv)
        return min(n, c * k)

    def spectrum(self, conv):
        return fz.channel_spectrum(conv.weight.detach())[None]

    def params(self, conv, rank, mid=None):
        n, c, k = _nck(conv)
        return _bias_params(conv) + rank * (c * k + n)

    def macs(self, conv, in_hw, rank, mid=None):
        n, c, k = _nck(conv)
        return (rank * c * k + n * rank) * _areas(conv, in_hw)[0]


# ----------------------------------------------------------------- the registry

_TARGETS: dict[str, ConversionTarget] = {}


def register_target(target: ConversionTarget) -> ConversionTarget:
    """Add ``target`` under ``target.name`` (a non-empty identifier); returns it. A name already
    registered is refused (:class:`~sepconv.errors.ConfigError`): unregister the old one first."""
    if not isinstance(target, ConversionTarget):
        raise ConfigError(f"register_target: expected a ConversionTarget instance, got {type(target).__name__}")
    name = target.name
    if not isinstance(name, str) or not name.isidentifier():
        raise ConfigError(f"register_target: a target's name must be an identifier, got {name!r}")
    if name in _TARGETS:
        raise ConfigError(f"register_target: a conversion target named {name!r} is already registered "
                          f"({_TARGETS[name]!r}); unregister_target({name!r}) first")
    _TARGETS[name] = target
    return target


def unregister_target(name: str) -> ConversionTarget:
    """Remove the target registered as ``name`` and return it (models converted to it can no
    longer be loaded until it is registered again)."""
    target = get_target(name)
    del _TARGETS[name]
    return target


def get_target(name: str, where: str = "") -> ConversionTarget:
    """The target registered as ``name``; an unknown name is a :class:`~sepconv.errors.ConfigError`
    listing the known ones (prefixed by ``where``, e.g. ``"convert recipe"``)."""
    target = _TARGETS.get(name) if isinstance(name, str) else None
    if target is None:
        raise ConfigError(f"{where + ': ' if where else ''}unknown conversion target {name!r:.80}; "
                          f"choose one of {', '.join(target_names())}")
    return target


def target_names() -> tuple[str, ...]:
    """The registered targets' names, in registration order (the built-ins first)."""
    return tuple(_TARGETS)


for _builtin in (DepthwiseTarget(), BSConvUTarget(), BSConvSTarget(), ChannelTarget()):
    register_target(_builtin)
del _builtin
