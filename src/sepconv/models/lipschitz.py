"""1-Lipschitz networks, certified by :func:`sepconv.spectral.lipschitz_bound` (issue 15).

Every layer is 1-Lipschitz by construction (:mod:`sepconv.lipschitz`): convolutions normalized by
their exact or certified norm at the layer's input size, orthonormal or normalized pointwise and
linear layers, MaxMin / GroupSort activations (Anil, Lucas, Grosse 2019, arXiv 1811.05381),
optional BatchNorm with clipped slopes, convex residuals, and an orthonormal classifier on the
flattened last feature map (``head="pool"``: on global L2 pooling, for any input size). The
network's constant in eval mode is then at most 1 -- and :func:`~sepconv.spectral.lipschitz_bound`
checks it independently from the weights. The norms are computed at ``image_size`` (default 32),
the size the flattened head takes; with ``head="pool"`` and zero padding a smaller input sees a
submatrix of each operator, so the certificate also covers smaller inputs.

* ``lip_simple_cnn`` -- the layout of the 1-Lipschitz CNNs of deel-torchlip's and orthogonium's
  tutorials: 2 regular 3x3 conv stages (16, 32 channels), each conv divided by its certified norm
  (Sedghi et al. 2019) and followed by the activation and 2x2 L2 pooling, then an orthonormal
  hidden layer (64) and the orthonormal classifier on the flattened map;
* ``lip_sep_cnn`` -- the same layout with :class:`~sepconv.lipschitz.LipschitzSeparableConv2d`
  stages, by default **orthogonal** (``norm="orthogonal"``: a paraunitary depthwise part, an isometry,
  and a Björck pointwise part) rather than normalized (``product``, Runkel et al. 2021, arXiv
  2102.06496; ``composite``);
* ``lip_sep_mobilenet`` -- MobileNet-style: separable stem and strided separable downsampling, and per
  stage :class:`~sepconv.lipschitz.ConvexResidual` inverted-residual units (Björck pointwise
  expansion, activation, separable projection).

Options shared by all: ``head`` (``flatten`` or ``pool``), ``act`` (``maxmin``, ``groupsort``
with groups of 4, ``relu``), ``bn`` (``False``: none, ``"bounded"``:
:class:`~sepconv.lipschitz.BoundedBatchNorm2d` after each conv), ``image_size``; the separable
ones also ``norm`` (``orthogonal``, ``product`` or ``composite``; see
:class:`~sepconv.lipschitz.LipschitzSeparableConv2d`); the CNNs also ``downsample`` (``pool``: 2x2
L2 pooling after each stage, or ``stride``: every stage but the first at stride 2, no pooling),
``hidden`` (the width of an orthonormal hidden layer before the classifier, scaled by ``width``;
0: none) and, for ``lip_sep_cnn``, ``depth_multiplier`` (the least depth multiplier of its
separable convs; ``orthogonal`` needs 2 and takes ``ceil(C_out / C_in)`` by default). ``conv``:
``regular`` (= ``dsc`` for the separable ones, which are separable by design). Channels are rounded
to multiples of what the activation needs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import nn

from ..errors import ConfigError
from ..lipschitz.activations import activation, channel_multiple
from ..lipschitz.blocks import BoundedBatchNorm2d, ConvexResidual, L2Pool2d
from ..lipschitz.convs import (
    LipschitzSeparableConv2d,
    lipschitz_conv2d,
    lipschitz_linear,
    lipschitz_pointwise,
    orthogonal_depthwise,
)
from ..spectral import ConvSpec
from ._registry import register_model

__all__ = ["HEADS", "LipschitzCNN", "LipschitzMobileNet", "lip_sep_cnn", "lip_sep_mobilenet", "lip_simple_cnn"]

_INPUT = (3, 32, 32)
_GROUP = 4  # GroupSort's group size


def _image_size(image_size) -> tuple[int, int]:
    """``(H, W)`` the layers are normalized at, from an int or a pair."""
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if len(size) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in size):
        raise ConfigError(f"image_size must be a positive int or a pair, got {image_size!r:.40}")
    return size  # type: ignore[return-value]


def _channels(c: float, width: float, multiple: int) -> int:
    """``c * width`` rounded to a multiple of ``multiple`` (what the activation groups need), at least one."""
    return max(multiple, int(round(c * width / multiple)) * multiple)


def _bn(bn, c: int) -> list[nn.Module]:
    """No layer (``bn=False``) or a :class:`~sepconv.lipschitz.BoundedBatchNorm2d` (``"bounded"``)."""
    if bn is False or bn is None:
        return []
    if bn != "bounded":
        raise ConfigError(f"bn must be False or 'bounded', got {bn!r:.40}")
    return [BoundedBatchNorm2d(c)]


def _out(conv: nn.Conv2d, size: tuple[int, int]) -> tuple[int, int]:
    """Output size of ``conv`` on inputs of ``size``: the next layer's normalization size."""
    return ConvSpec.of(conv, size).out_size(conv.kernel_size)


def _multiplier(norm: str, c_in: int, c_out: int, first: bool, least: int | None = None) -> int:
    """The depth multiplier of a separable conv ``c_in -> c_out``: ``norm="orthogonal"`` (a paraunitary
    depthwise part, :class:`~sepconv.lipschitz.ParaunitaryDepthwise`) needs ``>= 2`` and takes
    ``ceil(c_out / c_in)`` (so that with ``m c_in = c_out`` the block is an isometry); otherwise 1,
    except for the first layer, whose depthwise part is as wide as its output (for one input
    channel: a regular conv). ``least``: at least this multiplier (a model's ``depth_multiplier``)."""
    m = math.ceil(c_out / c_in) if first else 1
    if norm == "orthogonal":
        m = max(2, math.ceil(c_out / c_in))
    return max(m, least or 1)


HEADS = ("flatten", "pool")
#: How a stage of :class:`LipschitzCNN` halves the resolution: its conv at stride 2, or L2 pooling after it.
DOWNSAMPLES = ("stride", "pool")


class _Head(nn.Sequential):
    """The classifier, a linear layer with orthonormal rows (Björck: torch's ``orthogonal`` cannot be
    built on the meta device, where the registry probes shapes) on

    * ``"flatten"`` (default): the whole last feature map ``C x H x W`` -- the spatial layout reaches
      the classifier, as in the 1-Lipschitz CNNs of Anil et al. 2019 and deel-torchlip; inputs must
      then be of the ``image_size`` the model was built for;
    * ``"pool"``: one number per channel by global L2 pooling (1-Lipschitz, any input size).

    Both are 1-Lipschitz; NB: on digits the flattened head trains to far larger certified margins
    (issue 15's note has the measurement)."""

    def __init__(self, channels: int, num_classes: int, size: tuple[int, int], kind: str = "flatten",
                 hidden: int = 0, act: str = "maxmin"):
        if kind not in HEADS:
            raise ConfigError(f"head must be one of {', '.join(map(repr, HEADS))}, got {kind!r:.40}")
        features = channels * size[0] * size[1] if kind == "flatten" else channels
        pool = [] if kind == "flatten" else [L2Pool2d()]
        mlp = [lipschitz_linear(features, hidden, kind="bjorck"), activation(act, _GROUP)] if hidden else []
        super().__init__(*pool, nn.Flatten(), *mlp, lipschitz_linear(hidden or features, num_classes, kind="bjorck"))


class LipschitzCNN(nn.Module):
    """Conv stages ``conv -> [BoundedBatchNorm2d] -> act``, then :class:`_Head` (with an orthonormal
    hidden layer of ``hidden`` units if ``hidden > 0``). ``downsample="pool"``: every conv at stride 1
    and 2x2 L2 pooling after each stage; ``"stride"``: the first at stride 1 and the others at stride
    2. ``separable``: each conv is a :class:`~sepconv.lipschitz.LipschitzSeparableConv2d` (depth
    multipliers by :func:`_multiplier`; with ``norm="orthogonal"`` a first layer whose width is a
    multiple of the input's is :func:`~sepconv.lipschitz.orthogonal_depthwise` alone), else a regular
    conv divided by its certified norm (:func:`~sepconv.lipschitz.lipschitz_conv2d`)."""

    def __init__(self, num_classes: int, in_chans: int, channels: Sequence[int], image_size: tuple[int, int],
                 act: str = "maxmin", bn=False, separable: bool = False, norm: str = "composite",
                 head: str = "flatten", downsample: str = "stride", hidden: int = 0,
                 depth_multiplier: int | None = None):
        super().__init__()
        if downsample not in DOWNSAMPLES:
            raise ConfigError(f"downsample must be one of {', '.join(map(repr, DOWNSAMPLES))}, got {downsample!r:.40}")
        layers: list[nn.Module] = []
        c_in, size = in_chans, image_size
        for i, c in enumerate(channels):
            stride = 1 if i == 0 or downsample == "pool" else 2
            if separable and norm == "orthogonal" and i == 0 and c % c_in == 0 and c // c_in >= 2:
                conv = orthogonal_depthwise(c_in, c, 3, stride, bias=not bn)  # its pointwise part would add nothing
                size = _out(conv, size)
            elif separable:
                conv = LipschitzSeparableConv2d(c_in, c, 3, stride, in_size=size, norm=norm, bias=not bn,
                                                depth_multiplier=_multiplier(norm, c_in, c, i == 0, depth_multiplier))
                size = _out(conv.dw, size)
            else:
                conv = lipschitz_conv2d(c_in, c, 3, stride, in_size=size, bias=not bn)
                size = _out(conv, size)
            layers += [conv, *_bn(bn, c), activation(act, _GROUP)]
            if downsample == "pool":
                layers.append(L2Pool2d(2))
                size = (size[0] // 2, size[1] // 2)
            c_in = c
        self.features = nn.Sequential(*layers)
        self.head = _Head(c_in, num_classes, size, head, hidden, act)

    def forward(self, x):
        return self.head(self.features(x))


class LipschitzMobileNet(nn.Module):
    """Separable stem; per stage (the first at stride 1, the others after a strided separable conv)
    ``blocks[i]`` units ``ConvexResidual(pw expand (Björck) -> [bn] -> act -> separable projection
    -> [bn], alpha)``; then :class:`_Head`. Every unit is 1-Lipschitz, so the network is."""

    def __init__(self, num_classes: int, in_chans: int, channels: Sequence[int], blocks: Sequence[int],
                 image_size: tuple[int, int], expand: int = 2, alpha: float = 0.5, act: str = "maxmin", bn=False,
                 norm: str = "composite", head: str = "flatten"):
        super().__init__()
        if len(blocks) != len(channels):
            raise ConfigError(f"blocks {tuple(blocks)} must give one count per stage of channels {tuple(channels)}")
        c0 = channels[0]
        stem = LipschitzSeparableConv2d(in_chans, c0, 3, in_size=image_size, norm=norm, bias=not bn,
                                        depth_multiplier=_multiplier(norm, in_chans, c0, True))
        layers: list[nn.Module] = [stem, *_bn(bn, c0), activation(act, _GROUP)]
        c_in, size = c0, image_size
        for i, (c, n) in enumerate(zip(channels, blocks)):
            if i:
                down = LipschitzSeparableConv2d(c_in, c, 3, 2, in_size=size, norm=norm, bias=not bn,
                                                depth_multiplier=_multiplier(norm, c_in, c, False))
                size = _out(down.dw, size)
                layers += [down, *_bn(bn, c), activation(act, _GROUP)]
            for _ in range(n):
                body = nn.Sequential(lipschitz_pointwise(c, c * expand, bias=not bn), *_bn(bn, c * expand),
                                     activation(act, _GROUP),
                                     LipschitzSeparableConv2d(c * expand, c, 3, in_size=size, norm=norm, bias=not bn,
                                                              depth_multiplier=_multiplier(norm, c * expand, c, False)),
                                     *_bn(bn, c))
                layers.append(ConvexResidual(body, alpha))
            c_in = c
        self.features = nn.Sequential(*layers)
        self.head = _Head(c_in, num_classes, size, head)

    def forward(self, x):
        return self.head(self.features(x))


def _widths(channels, width: float, act: str) -> tuple[int, ...]:
    """The stage widths under ``width``, multiples of the activation's group size."""
    activation(act, _GROUP)  # a clear error for an unknown name, before any layer is built
    return tuple(_channels(c, width, channel_multiple(act, _GROUP)) for c in channels)


def _hidden(hidden, width: float, act: str) -> int:
    """The hidden layer's width under ``width`` (0: no hidden layer)."""
    if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 0:
        raise ConfigError(f"hidden must be an integer >= 0, got {hidden!r:.40}")
    return _channels(hidden, width, channel_multiple(act, _GROUP)) if hidden else 0


@register_model(family="lipschitz", input_size=_INPUT, tags=("lipschitz",))
def lip_simple_cnn(num_classes=1000, in_chans=3, conv="regular", width=1.0, channels=(16, 32), act="maxmin",
                   bn=False, image_size=32, head="flatten", downsample="pool", hidden=64):
    """1-Lipschitz CNN: regular 3x3 conv stages, each divided by its certified norm (``fft`` bound at
    its input size), ``act`` activations, 2x2 L2 pooling (``downsample="stride"``: strided convs),
    an orthonormal hidden layer of ``hidden`` units and the orthonormal classifier on the flattened
    last feature map (``head="pool"``: global L2 pooling first); ~137 k parameters for digits."""
    return LipschitzCNN(num_classes, in_chans, _widths(channels, width, act), _image_size(image_size), act, bn,
                        head=head, downsample=downsample, hidden=_hidden(hidden, width, act))


@register_model(family="lipschitz", convs=("regular", "dsc"), input_size=_INPUT, tags=("lipschitz",))
def lip_sep_cnn(num_classes=1000, in_chans=3, conv="regular", width=1.0, channels=(16, 32), act="groupsort",
                norm="orthogonal", bn=False, image_size=32, head="flatten", downsample="pool", hidden=64,
                depth_multiplier=4):
    """1-Lipschitz separable CNN: ``lip_simple_cnn``'s layout with
    :class:`~sepconv.lipschitz.LipschitzSeparableConv2d` stages (``norm``: ``orthogonal``, ``product``
    or ``composite``), GroupSort (groups of 4) and depth multiplier 4 (each channel's four filters a
    paraunitary bank); ~135 k parameters for digits, nearly all in the hidden layer on the flattened
    map. On digits it certifies more than ``act="maxmin", depth_multiplier=None`` (the minimal
    multiplier, 2): BENCHMARKS.md, "Certified robustness"."""
    return LipschitzCNN(num_classes, in_chans, _widths(channels, width, act), _image_size(image_size), act, bn,
                        separable=True, norm=norm, head=head, downsample=downsample, hidden=_hidden(hidden, width, act),
                        depth_multiplier=depth_multiplier)


@register_model(family="lipschitz", convs=("regular", "dsc"), input_size=_INPUT, tags=("lipschitz",))
def lip_sep_mobilenet(num_classes=1000, in_chans=3, conv="regular", width=1.0, channels=(16, 32, 64, 128),
                      blocks=(1, 1, 1, 1), expand=2, alpha=0.5, act="maxmin", norm="composite", bn=False,
                      image_size=32, head="flatten"):
    """1-Lipschitz MobileNet-style separable net: stem, strided separable downsampling, per stage
    ``blocks[i]`` convex-residual inverted-residual units (expansion ``expand``, ``alpha`` of the
    identity), orthonormal classifier on the flattened last feature map (``head="pool"``: global L2
    pooling first); ~125 k parameters for digits."""
    if isinstance(expand, bool) or not isinstance(expand, int) or expand < 1:
        raise ConfigError(f"expand must be a positive integer, got {expand!r:.40}")
    return LipschitzMobileNet(num_classes, in_chans, _widths(channels, width, act), tuple(blocks),
                              _image_size(image_size), expand, alpha, act, bn, norm, head)
