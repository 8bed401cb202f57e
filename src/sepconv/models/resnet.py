"""ResNets (He et al. 2016) for ImageNet and CIFAR, and wide ResNets (Zagoruyko &
Komodakis 2016), in every conv flavour.

- ``resnet18/34/50``: torchvision's layout exactly (``conv1``, ``bn1``, ``layer1..4`` of
  ``BasicBlock``/``Bottleneck`` with ``downsample``, ``fc``; ResNet-50 is "v1.5", stride on
  the 3x3; torchvision's initialisation), so a torchvision checkpoint loads strictly.
- ``resnet20/32/44/56/110``: the CIFAR ResNets of He et al. 2016, Sect. 4.2: 3x3 stem with
  16 channels, three stages of ``(depth - 2) / 6`` basic blocks with 16/32/64 channels.
  ``shortcut="A"`` (default, the paper's CIFAR choice): identity, subsampled and padded
  with zero channels where the shape changes (no parameters; resnet20 has 0.27 M
  parameters at 10 classes). ``shortcut="B"``: 1x1 conv + BN projections there, as the
  BSConv reference zoo (its ``cifar_resnet*``).
- ``wrnD_K``: pre-activation wide ResNets WRN-D-K: 3x3 stem with 16 channels, three stages
  of ``(D - 4) / 6`` pre-activation blocks with 16K/32K/64K channels, 1x1 conv shortcuts
  where the shape changes, final BN-ReLU; ``dropout`` between the two convs of a block
  (default 0, as the BSConv reference; the WRN paper also uses 0.3).

``conv=`` replaces every 3x3 convolution (the CIFAR stems included), keeping the 1x1
shortcuts and the 7x7 ImageNet stem regular, as the BSConv reference zoo does (its
replacers touch 3x3 and 5x5 convs only): ``"dsc"`` = depthwise 3x3 then pointwise, no
norm or activation between (the block's own BN follows); ``"bsconv_u"`` = BSConv-U
without BN; ``"bsconv_s"`` = BSConv-S with BN between the pointwise convs and
``p = bsconv_p`` (default 1/4). See :func:`sepconv.layers.make_spatial_conv`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..errors import ConfigError
from ..layers import CONV_KINDS, make_spatial_conv
from ._registry import register_model
from ._util import check_bsconv_p, scale_channels

__all__ = ["BasicBlock", "Bottleneck", "CifarResNet", "PreActBlock", "ResNet", "WideResNet", "ZeroPadShortcut"]

SpatialConv = Callable[..., nn.Module]  # (in, out, stride) -> module


def _init_resnet(model: nn.Module) -> None:
    """torchvision's ResNet initialisation: He-normal (fan_out) convs, unit BN; linears keep
    PyTorch's default."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)


def _conv3x3(conv: str, bsconv_p: float) -> SpatialConv:
    return lambda cin, cout, stride=1: make_spatial_conv(conv, cin, cout, 3, stride, 1, bias=False,
                                                         bsconv_p=bsconv_p)


def _projection(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


class ZeroPadShortcut(nn.Module):
    """Option-A shortcut of He et al. 2016: take every ``stride``-th pixel and append
    ``extra`` zero channels. Linear, no parameters, operator norm 1."""

    def __init__(self, stride: int, extra: int) -> None:
        super().__init__()
        self.stride, self.extra = stride, extra

    def forward(self, x: Tensor) -> Tensor:
        return F.pad(x[:, :, ::self.stride, ::self.stride], (0, 0, 0, 0, 0, self.extra))

    def deploy_form(self, in_shape: tuple[int, ...], for_onnx: bool = False) -> nn.Conv2d:
        """The same map as a fixed 1x1 conv of this stride whose weight is the identity padded with
        zero rows (exact: each output is one input times 1, or 0). Runtimes run it in their conv
        layout, where the strided slice and channel pad would convert layouts twice
        (:func:`sepconv.deploy.deployable` uses it, for every runtime)."""
        cin = in_shape[0]
        conv = nn.Conv2d(cin, cin + self.extra, 1, self.stride, bias=False)
        with torch.no_grad():
            conv.weight.zero_()
            conv.weight[:cin, :, 0, 0] = torch.eye(cin)
        return conv.requires_grad_(False)

    def extra_repr(self) -> str:
        return f"stride={self.stride}, extra={self.extra}"


class BasicBlock(nn.Module):
    """Two 3x3 convs with BN, ReLU after the first and after the residual sum."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int, downsample: nn.Module | None,
                 conv3x3: SpatialConv) -> None:
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carrying the stride: torchvision's "v1.5"), 1x1 expand x4, with BN."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int, downsample: nn.Module | None,
                 conv3x3: SpatialConv) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


def _make_layer(block: type, inplanes: int, planes: int, blocks: int, stride: int, conv3x3: SpatialConv,
                shortcut: str = "B") -> tuple[nn.Sequential, int]:
    out = planes * block.expansion
    downsample = None
    if stride != 1 or inplanes != out:
        downsample = ZeroPadShortcut(stride, out - inplanes) if shortcut == "A" else _projection(inplanes, out, stride)
    layers = [block(inplanes, planes, stride, downsample, conv3x3)]
    layers += [block(out, planes, 1, None, conv3x3) for _ in range(1, blocks)]
    return nn.Sequential(*layers), out


class ResNet(nn.Module):
    """torchvision's ``ResNet``: 7x7 stem (stride 2, regular in every flavour), max-pool,
    four stages, average pool, ``fc``."""

    def __init__(self, block: type, layers: list[int], num_classes: int = 1000, in_chans: int = 3,
                 width: float = 1.0, conv: str = "regular", bsconv_p: float = 0.25) -> None:
        super().__init__()
        c3 = _conv3x3(conv, bsconv_p)
        planes = [scale_channels(c, width) for c in (64, 128, 256, 512)]
        inplanes = planes[0]
        self.conv1 = nn.Conv2d(in_chans, inplanes, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        for i, (p, n) in enumerate(zip(planes, layers)):
            layer, inplanes = _make_layer(block, inplanes, p, n, 1 if i == 0 else 2, c3)
            setattr(self, f"layer{i + 1}", layer)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(inplanes, num_classes)
        _init_resnet(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class CifarResNet(nn.Module):
    """He et al. 2016 (Sect. 4.2) CIFAR ResNet: 3x3 stem (16 ch), three stages of basic
    blocks (16/32/64 ch), average pool, ``fc``; torchvision's names."""

    def __init__(self, depth: int, num_classes: int = 10, in_chans: int = 3, width: float = 1.0,
                 conv: str = "regular", bsconv_p: float = 0.25, shortcut: str = "A") -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ConfigError(f"CIFAR ResNet depth must be 6n + 2, got {depth}")
        if shortcut not in ("A", "B"):
            raise ConfigError(f"shortcut must be 'A' (zero padding) or 'B' (projection), got {shortcut!r}")
        n = (depth - 2) // 6
        c3 = _conv3x3(conv, bsconv_p)
        planes = [scale_channels(c, width) for c in (16, 32, 64)]
        inplanes = planes[0]
        self.conv1 = c3(in_chans, inplanes)
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.relu = nn.ReLU(inplace=True)
        for i, p in enumerate(planes):
            layer, inplanes = _make_layer(BasicBlock, inplanes, p, n, 1 if i == 0 else 2, c3, shortcut)
            setattr(self, f"layer{i + 1}", layer)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(inplanes, num_classes)
        _init_resnet(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class PreActBlock(nn.Module):
    """Pre-activation block (He et al., ECCV 2016; Zagoruyko & Komodakis 2016):
    BN-ReLU-conv3x3-BN-ReLU-[dropout]-conv3x3 plus the shortcut (a 1x1 conv of the
    pre-activated input where the shape changes, else identity)."""

    def __init__(self, inplanes: int, planes: int, stride: int, conv3x3: SpatialConv, dropout: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = conv3x3(planes, planes)
        self.shortcut = (nn.Conv2d(inplanes, planes, 1, stride, bias=False)
                         if stride != 1 or inplanes != planes else None)

    def forward(self, x: Tensor) -> Tensor:
        o = self.relu(self.bn1(x))
        identity = x if self.shortcut is None else self.shortcut(o)
        o = self.conv2(self.dropout(self.relu(self.bn2(self.conv1(o)))))
        return o + identity


class WideResNet(nn.Module):
    """WRN-depth-k (Zagoruyko & Komodakis 2016, Table 1): 3x3 stem (16 ch), three stages
    of pre-activation blocks (16k/32k/64k ch; ``width`` scales these), final BN-ReLU,
    average pool, ``fc``."""

    def __init__(self, depth: int, widen: int, num_classes: int = 10, in_chans: int = 3, width: float = 1.0,
                 conv: str = "regular", bsconv_p: float = 0.25, dropout: float = 0.0) -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise ConfigError(f"WRN depth must be 6n + 4, got {depth}")
        n = (depth - 4) // 6
        c3 = _conv3x3(conv, bsconv_p)
        inplanes = 16
        self.conv1 = c3(in_chans, inplanes)
        for i, c in enumerate((16, 32, 64)):
            planes = scale_channels(c * widen, width)
            blocks = [PreActBlock(inplanes if j == 0 else planes, planes, 2 if (i > 0 and j == 0) else 1, c3, dropout)
                      for j in range(n)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
            inplanes = planes
        self.bn = nn.BatchNorm2d(inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(inplanes, num_classes)
        _init_resnet(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        return self.fc(torch.flatten(self.avgpool(self.relu(self.bn(x))), 1))


# ============================================================== registry

_IMAGENET_CFG = {"resnet18": (BasicBlock, [2, 2, 2, 2]), "resnet34": (BasicBlock, [3, 4, 6, 3]),
                 "resnet50": (Bottleneck, [3, 4, 6, 3])}
_CIFAR_DEPTHS = (20, 32, 44, 56, 110)
_WRN_CFG = ((16, 2), (16, 4), (16, 8), (28, 2), (28, 10), (40, 2))


def _register(name: str, doc: str, input_size: tuple[int, int, int], tags: tuple[str, ...], build) -> None:
    build.__name__ = build.__qualname__ = name
    build.__doc__ = doc
    register_model(family="resnet", convs=CONV_KINDS, input_size=input_size, tags=tags)(build)


def _imagenet(name: str) -> None:
    block, layers = _IMAGENET_CFG[name]

    def build(num_classes=1000, in_chans=3, conv="regular", width=1.0, bsconv_p=None):
        return ResNet(block, layers, num_classes, in_chans, width, conv, check_bsconv_p(conv, bsconv_p))

    _register(name, f"torchvision's {name} (He et al. 2016; {block.__name__} x {layers}). Every 3x3 conv "
              "takes the ``conv`` flavour; the 7x7 stem stays regular. ``bsconv_p``: p of bsconv_s (1/4).",
              (3, 224, 224), ("imagenet", "torchvision"), build)


def _cifar(depth: int) -> None:
    def build(num_classes=1000, in_chans=3, conv="regular", width=1.0, bsconv_p=None, shortcut="A"):
        return CifarResNet(depth, num_classes, in_chans, width, conv, check_bsconv_p(conv, bsconv_p), shortcut)

    _register(f"resnet{depth}", f"CIFAR ResNet-{depth} (He et al. 2016, Sect. 4.2; ``shortcut`` 'A' zero-pad "
              "(default) or 'B' projection). Every 3x3 conv, the stem included, takes the ``conv`` flavour; "
              "``bsconv_p``: p of bsconv_s (1/4).", (3, 32, 32), ("cifar",), build)


def _wrn(depth: int, widen: int) -> None:
    def build(num_classes=1000, in_chans=3, conv="regular", width=1.0, bsconv_p=None, dropout=0.0):
        return WideResNet(depth, widen, num_classes, in_chans, width, conv, check_bsconv_p(conv, bsconv_p), dropout)

    _register(f"wrn{depth}_{widen}", f"WRN-{depth}-{widen} (Zagoruyko & Komodakis 2016; pre-activation, "
              "``dropout`` between the convs, default 0). Every 3x3 conv, the stem included, takes the ``conv`` "
              "flavour; ``bsconv_p``: p of bsconv_s (1/4).", (3, 32, 32), ("cifar",), build)


for _n in _IMAGENET_CFG:
    _imagenet(_n)
for _d in _CIFAR_DEPTHS:
    _cifar(_d)
for _d, _k in _WRN_CFG:
    _wrn(_d, _k)
