"""MobileNetV1 (Howard et al. 2017), MobileNetV2 (Sandler et al. 2018) and MobileNetV3
(Howard et al. 2019), for ImageNet and CIFAR, with the BSConv variants of Haase & Amthor
(CVPR 2020).

ImageNet V2/V3 follow torchvision's module layout exactly (state-dict keys, shapes, op
order, BatchNorm eps/momentum, initialisation, classifier dropout), so a torchvision
checkpoint loads with ``strict=True``. V1 is not in torchvision; it follows the paper's
Table 1 in the same style (``features``, ``classifier``).

**What** ``conv=`` **means here.** MobileNets are depthwise separable by design, so
``"regular"`` and ``"dsc"`` both build the published network (the stem is the only
groups=1 spatial conv and stays regular in every flavour, as in the BSConv reference zoo).

- ``mobilenet_v1``: ``"bsconv_u"`` turns each ``DW-BN-ReLU-PW-BN-ReLU`` unit into
  ``BSConvU(in, out, 3, stride)-BN-ReLU`` (the paper's Sect. 4.1 and ``bsconv``'s
  ``transform_mobilenetv1``): same parameters up to the mid BN, about 1.4x the MACs.
  ``"bsconv_s"`` is undefined for V1 and raises.
- ``mobilenet_v2`` / ``_v3_*``: ``"bsconv_s"`` keeps the architecture (same parameters and
  FLOPs) and marks each block's projection 1x1 (``out x mid``) for the orthonormality
  penalty: the projection of block i with the expansion and depthwise of block i+1 form a
  BSConv-S with ``p = 1/expansion`` (paper Sect. 4.2, ``bsconv``'s
  ``transform_mobilenetv2``). Train with ``loss + sepconv.layers.orthonormal_penalty(model)``.
  ``"bsconv_u"`` is undefined for V2/V3 and raises.

**CIFAR variants** (``cifar_*``; 32x32 input) follow the BSConv reference zoo: a stride-1
stem and one stride-2 stage fewer (V1/V2: the 128/24-channel stage keeps stride 1; V3-large:
the 24-channel stage; V3-small: the first block), so 32 -> 4 at the last stage, and no
classifier dropout. V3 takes the reference's light head (no hidden 1280/1024 linear layer).
Parameter counts match the reference (less its input BatchNorm) for V1; for V2 up to the
1x1 expansion the reference keeps in the t=1 block; for V3 up to its unrounded SE widths,
the expansion it keeps in the first large block, and the SE it adds to V3-small's last conv.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..layers import BSConvU, DepthwiseSeparableConv2d, mark_orthonormal
from ._registry import register_model
from ._util import ConvNormAct, make_divisible

__all__ = ["MobileNetV1", "MobileNetV2", "MobileNetV3", "InvertedResidual", "InvertedResidualV3",
           "SqueezeExcitation"]

_IMAGENET = (3, 224, 224)
_CIFAR = (3, 32, 32)


def _init_mobilenet(model: nn.Module) -> None:
    """torchvision's MobileNet initialisation: He-normal (fan_out) convs, unit BN, N(0, 0.01) linears."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)


# ============================================================== MobileNetV1

# Howard et al. 2017, Table 1: (output channels, stride) of the 13 separable units.
V1_UNITS = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
            (512, 1), (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1)]


def _v1_unit(kind: str, cin: int, cout: int, stride: int) -> nn.Sequential:
    if kind == "bsconv_u":
        sep: nn.Module = BSConvU(cin, cout, 3, stride, 1, bias=False)
    else:
        sep = DepthwiseSeparableConv2d(cin, cout, 3, stride, 1, bias=False, mid_norm=nn.BatchNorm2d,
                                       mid_act=nn.ReLU(inplace=True))
    return nn.Sequential(sep, nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class MobileNetV1(nn.Module):
    """``features`` = 3x3 stem (32 ch, stride 2) + 13 separable units, global average
    pooling, ``classifier`` = Linear(1024, num_classes) (Howard et al. 2017, Table 1)."""

    def __init__(self, num_classes: int = 1000, in_chans: int = 3, width: float = 1.0, conv: str = "regular",
                 stem_stride: int = 2, units: list[tuple[int, int]] = V1_UNITS) -> None:
        super().__init__()
        ch = lambda c: max(1, int(c * width))  # noqa: E731  (the paper's width multiplier alpha)
        cin = ch(32)
        layers: list[nn.Module] = [ConvNormAct(in_chans, cin, 3, stem_stride)]
        for c, s in units:
            layers.append(_v1_unit(conv, cin, ch(c), s))
            cin = ch(c)
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(cin, num_classes)
        _init_mobilenet(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


# ============================================================== MobileNetV2

# Sandler et al. 2018, Table 2: expansion t, channels c, repeats n, stride s.
V2_SETTING = [[1, 16, 1, 1], [6, 24, 2, 2], [6, 32, 3, 2], [6, 64, 4, 2], [6, 96, 3, 1], [6, 160, 3, 2],
              [6, 320, 1, 1]]


class InvertedResidual(nn.Module):
    """MobileNetV2 block (torchvision layout): ``conv`` = [1x1 expand-BN-ReLU6 (if t != 1)],
    3x3 depthwise-BN-ReLU6, 1x1 projection, BN; identity shortcut when shapes allow."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int,
                 orthonormal_projection: bool = False) -> None:
        super().__init__()
        hidden = int(round(inp * expand_ratio))
        self.use_res_connect = stride == 1 and inp == oup
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvNormAct(inp, hidden, 1, act=nn.ReLU6))
        layers += [ConvNormAct(hidden, hidden, 3, stride, groups=hidden, act=nn.ReLU6),
                   nn.Conv2d(hidden, oup, 1, bias=False), nn.BatchNorm2d(oup)]
        self.conv = nn.Sequential(*layers)
        self.out_channels = oup
        if orthonormal_projection:
            mark_orthonormal(self.projection)

    @property
    def projection(self) -> nn.Conv2d:
        """The projection 1x1 conv (``out x hidden``)."""
        return self.conv[-2]

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    """torchvision's ``MobileNetV2`` (features, Dropout + Linear classifier), with a
    configurable stem stride and block setting for the CIFAR variant."""

    def __init__(self, num_classes: int = 1000, in_chans: int = 3, width: float = 1.0,
                 setting: list[list[int]] = V2_SETTING, stem_stride: int = 2, dropout: float = 0.2,
                 orthonormal_projection: bool = False, round_nearest: int = 8) -> None:
        super().__init__()
        cin = make_divisible(32 * width, round_nearest)
        self.last_channel = make_divisible(1280 * max(1.0, width), round_nearest)
        layers: list[nn.Module] = [ConvNormAct(in_chans, cin, 3, stem_stride, act=nn.ReLU6)]
        for t, c, n, s in setting:
            cout = make_divisible(c * width, round_nearest)
            for i in range(n):
                layers.append(InvertedResidual(cin, cout, s if i == 0 else 1, t, orthonormal_projection))
                cin = cout
        layers.append(ConvNormAct(cin, self.last_channel, 1, act=nn.ReLU6))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(self.last_channel, num_classes))
        _init_mobilenet(self)

    def forward(self, x: Tensor) -> Tensor:
        x = nn.functional.adaptive_avg_pool2d(self.features(x), (1, 1))
        return self.classifier(torch.flatten(x, 1))


# ============================================================== MobileNetV3

# Howard et al. 2019, Tables 1-2 (torchvision's configuration):
# (input, kernel, expanded, output, squeeze-excite, activation, stride)
V3_LARGE = [
    (16, 3, 16, 16, False, "RE", 1), (16, 3, 64, 24, False, "RE", 2), (24, 3, 72, 24, False, "RE", 1),
    (24, 5, 72, 40, True, "RE", 2), (40, 5, 120, 40, True, "RE", 1), (40, 5, 120, 40, True, "RE", 1),
    (40, 3, 240, 80, False, "HS", 2), (80, 3, 200, 80, False, "HS", 1), (80, 3, 184, 80, False, "HS", 1),
    (80, 3, 184, 80, False, "HS", 1), (80, 3, 480, 112, True, "HS", 1), (112, 3, 672, 112, True, "HS", 1),
    (112, 5, 672, 160, True, "HS", 2), (160, 5, 960, 160, True, "HS", 1), (160, 5, 960, 160, True, "HS", 1),
]
V3_SMALL = [
    (16, 3, 16, 16, True, "RE", 2), (16, 3, 72, 24, False, "RE", 2), (24, 3, 88, 24, False, "RE", 1),
    (24, 5, 96, 40, True, "HS", 2), (40, 5, 240, 40, True, "HS", 1), (40, 5, 240, 40, True, "HS", 1),
    (40, 5, 120, 48, True, "HS", 1), (48, 5, 144, 48, True, "HS", 1), (48, 5, 288, 96, True, "HS", 2),
    (96, 5, 576, 96, True, "HS", 1), (96, 5, 576, 96, True, "HS", 1),
]
_V3_NORM = partial(nn.BatchNorm2d, eps=0.001, momentum=0.01)


class SqueezeExcitation(nn.Module):
    """Squeeze-and-excitation (Hu et al. 2018) in torchvision.ops' layout: ``x * hsigmoid(
    fc2(relu(fc1(avgpool(x)))))``."""

    def __init__(self, channels: int, squeeze_channels: int) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze_channels, 1)
        self.fc2 = nn.Conv2d(squeeze_channels, channels, 1)
        self.activation = nn.ReLU()
        self.scale_activation = nn.Hardsigmoid()

    def forward(self, x: Tensor) -> Tensor:
        s = self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))
        return s * x


class InvertedResidualV3(nn.Module):
    """MobileNetV3 block (torchvision layout): ``block`` = [1x1 expand (if expanded != in)],
    k x k depthwise, [SE], 1x1 projection + BN; identity shortcut when shapes allow."""

    def __init__(self, cin: int, kernel: int, expanded: int, cout: int, use_se: bool, activation: str,
                 stride: int, norm: Callable[..., nn.Module] = _V3_NORM,
                 orthonormal_projection: bool = False) -> None:
        super().__init__()
        self.use_res_connect = stride == 1 and cin == cout
        act = nn.Hardswish if activation == "HS" else nn.ReLU
        layers: list[nn.Module] = []
        if expanded != cin:
            layers.append(ConvNormAct(cin, expanded, 1, norm=norm, act=act))
        layers.append(ConvNormAct(expanded, expanded, kernel, stride, groups=expanded, norm=norm, act=act))
        if use_se:
            layers.append(SqueezeExcitation(expanded, make_divisible(expanded // 4, 8)))
        layers.append(ConvNormAct(expanded, cout, 1, norm=norm, act=None))
        self.block = nn.Sequential(*layers)
        self.out_channels = cout
        if orthonormal_projection:
            mark_orthonormal(self.projection)

    @property
    def projection(self) -> nn.Conv2d:
        """The projection 1x1 conv (``out x expanded``)."""
        return self.block[-1][0]

    def forward(self, x: Tensor) -> Tensor:
        y = self.block(x)
        return y + x if self.use_res_connect else y


class MobileNetV3(nn.Module):
    """torchvision's ``MobileNetV3``: features (stem, blocks, 1x1 conv to 6x the last block
    width), average pooling, classifier Linear-Hardswish-Dropout-Linear; BN eps 1e-3,
    momentum 0.01. ``head="light"`` drops the hidden linear layer (Dropout-Linear), as the
    BSConv reference zoo's CIFAR MobileNetV3s."""

    def __init__(self, setting: list[tuple], last_channel: int, num_classes: int = 1000, in_chans: int = 3,
                 width: float = 1.0, stem_stride: int = 2, dropout: float = 0.2,
                 orthonormal_projection: bool = False, head: str = "full") -> None:
        super().__init__()
        if head not in ("full", "light"):
            raise ConfigError(f"MobileNetV3 head must be 'full' or 'light', got {head!r}")
        adj = lambda c: make_divisible(c * width, 8)  # noqa: E731
        cfg = [(adj(i), k, adj(e), adj(o), se, a, s) for i, k, e, o, se, a, s in setting]
        layers: list[nn.Module] = [ConvNormAct(in_chans, cfg[0][0], 3, stem_stride, norm=_V3_NORM,
                                               act=nn.Hardswish)]
        for c in cfg:
            layers.append(InvertedResidualV3(*c, orthonormal_projection=orthonormal_projection))
        last_in = cfg[-1][3]
        last_out = 6 * last_in
        layers.append(ConvNormAct(last_in, last_out, 1, norm=_V3_NORM, act=nn.Hardswish))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        if head == "full":
            hidden = adj(last_channel)
            self.classifier = nn.Sequential(nn.Linear(last_out, hidden), nn.Hardswish(inplace=True),
                                            nn.Dropout(p=dropout, inplace=True), nn.Linear(hidden, num_classes))
        else:
            self.classifier = nn.Sequential(nn.Dropout(p=dropout), nn.Linear(last_out, num_classes))
        _init_mobilenet(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


# ============================================================== registry

_V1_CONVS = ("regular", "dsc", "bsconv_u")
_V23_CONVS = ("regular", "dsc", "bsconv_s")


def _strides(setting: list, strides: dict[int, int], pos: int) -> list:
    """``setting`` with the stride (at tuple position ``pos``) of the listed rows replaced."""
    out = []
    for i, row in enumerate(setting):
        row = list(row)
        row[pos] = strides.get(i, row[pos])
        out.append(tuple(row) if isinstance(setting[i], tuple) else row)
    return out


def _v1(conv: str, cifar: bool, **kw) -> MobileNetV1:
    units = _strides(V1_UNITS, {1: 1}, 1) if cifar else V1_UNITS
    return MobileNetV1(conv=conv, stem_stride=1 if cifar else 2, units=units, **kw)


def _v2(conv: str, cifar: bool, dropout: float, **kw) -> MobileNetV2:
    setting = _strides(V2_SETTING, {1: 1}, 3) if cifar else V2_SETTING
    return MobileNetV2(setting=setting, stem_stride=1 if cifar else 2, dropout=dropout,
                       orthonormal_projection=conv == "bsconv_s", **kw)


def _v3(arch: str, conv: str, cifar: bool, dropout: float, head: str, **kw) -> MobileNetV3:
    large = arch == "large"
    setting = V3_LARGE if large else V3_SMALL
    if cifar:  # the reference zoo's CIFAR strides: large skips the 24-ch stride, small the first
        setting = _strides(setting, {1: 1} if large else {0: 1}, 6)
    return MobileNetV3(setting, 1280 if large else 1024, stem_stride=1 if cifar else 2, dropout=dropout,
                       orthonormal_projection=conv == "bsconv_s", head=head, **kw)


@register_model(family="mobilenet", convs=_V1_CONVS, input_size=_IMAGENET, tags=("imagenet",))
def mobilenet_v1(num_classes=1000, in_chans=3, conv="regular", width=1.0):
    """MobileNetV1 (Howard et al. 2017, Table 1; 4.2 M parameters). ``width`` is the paper's
    alpha (channels ``int(c * alpha)``). ``conv``: regular = dsc = the paper's net;
    bsconv_u = BSConv-U units (Haase & Amthor 2020, Sect. 4.1)."""
    return _v1(conv, False, num_classes=num_classes, in_chans=in_chans, width=width)


@register_model(family="mobilenet", convs=_V1_CONVS, input_size=_CIFAR, tags=("cifar",))
def cifar_mobilenet_v1(num_classes=1000, in_chans=3, conv="regular", width=1.0):
    """MobileNetV1 for 32x32 input (BSConv reference zoo: stride-1 stem, the first
    128-channel unit at stride 1). ``conv`` as for ``mobilenet_v1``."""
    return _v1(conv, True, num_classes=num_classes, in_chans=in_chans, width=width)


@register_model(family="mobilenet", convs=_V23_CONVS, input_size=_IMAGENET, tags=("imagenet", "torchvision"))
def mobilenet_v2(num_classes=1000, in_chans=3, conv="regular", width=1.0, dropout=0.2):
    """torchvision's MobileNetV2 (Sandler et al. 2018; 3,504,872 parameters; channels
    rounded to multiples of 8 under ``width``). ``conv``: regular = dsc = the published net;
    bsconv_s = the same net with the orthonormality penalty on every projection 1x1
    (Haase & Amthor 2020, Sect. 4.2)."""
    return _v2(conv, False, dropout, num_classes=num_classes, in_chans=in_chans, width=width)


@register_model(family="mobilenet", convs=_V23_CONVS, input_size=_CIFAR, tags=("cifar",))
def cifar_mobilenet_v2(num_classes=1000, in_chans=3, conv="regular", width=1.0, dropout=0.0):
    """MobileNetV2 for 32x32 input (BSConv reference zoo: stride-1 stem, the 24-channel
    stage at stride 1; no dropout, as the reference). ``conv`` as for ``mobilenet_v2``."""
    return _v2(conv, True, dropout, num_classes=num_classes, in_chans=in_chans, width=width)


@register_model(family="mobilenet", convs=_V23_CONVS, input_size=_IMAGENET, tags=("imagenet", "torchvision"))
def mobilenet_v3_large(num_classes=1000, in_chans=3, conv="regular", width=1.0, dropout=0.2, head="full"):
    """torchvision's MobileNetV3-Large (Howard et al. 2019; 5,483,032 parameters).
    ``conv`` as for ``mobilenet_v2``."""
    return _v3("large", conv, False, dropout, head, num_classes=num_classes, in_chans=in_chans, width=width)


@register_model(family="mobilenet", convs=_V23_CONVS, input_size=_IMAGENET, tags=("imagenet", "torchvision"))
def mobilenet_v3_small(num_classes=1000, in_chans=3, conv="regular", width=1.0, dropout=0.2, head="full"):
    """torchvision's MobileNetV3-Small (Howard et al. 2019; 2,542,856 parameters).
    ``conv`` as for ``mobilenet_v2``."""
    return _v3("small", conv, False, dropout, head, num_classes=num_classes, in_chans=in_chans, width=width)


@register_model(family="mobilenet", convs=_V23_CONVS, input_size=_CIFAR, tags=("cifar",))
def cifar_mobilenet_v3_large(num_classes=1000, in_chans=3, conv="regular", width=1.0, dropout=0.0,
                             head="light"):
    """MobileNetV3-Large for 32x32 input (stride-1 stem, the 24-channel stage at stride 1,
    as the BSConv reference zoo) and its light head (``head="light"``: no hidden
    linear layer; ``"full"`` for torchvision's); no dropout. ``conv`` as for ``mobilenet_v2``."""
    return _v3("large", conv, True, dropout, head, num_classes=num_classes, in_chans=in_chans, width=width)


@register_model(family="mobilenet", convs=_V23_CONVS, input_size=_CIFAR, tags=("cifar",))
def cifar_mobilenet_v3_small(num_classes=1000, in_chans=3, conv="regular", width=1.0, dropout=0.0,
                             head="light"):
    """MobileNetV3-Small for 32x32 input (stride-1 stem, the first block at stride 1, as the
    BSConv reference zoo) and its light head (``head="light"``: no hidden linear layer;
    ``"full"`` for torchvision's); no dropout. ``conv`` as for ``mobilenet_v2``."""
    return _v3("small", conv, True, dropout, head, num_classes=num_classes, in_chans=in_chans, width=width)
