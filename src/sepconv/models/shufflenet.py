"""ShuffleNetV2 (Ma et al., ECCV 2018), ImageNet and CIFAR.

The ImageNet models follow torchvision's module layout exactly (``conv1``, ``maxpool``,
``stage2..4`` of ``InvertedResidual`` units with ``branch1``/``branch2``, ``conv5``,
``fc``; default PyTorch initialisation, as torchvision), so a torchvision checkpoint
loads with ``strict=True``.

``conv=``: ShuffleNetV2 is depthwise separable by design, so ``"regular"`` and ``"dsc"``
both build the published network; the 3x3 stem stays regular. BSConv variants are not
defined for it (the BSConv paper and reference zoo have none) and raise.

The CIFAR variants (``cifar_shufflenet_v2_*``) use a stride-1 stem without the max-pool,
the same choice as the CIFAR MobileNets of the BSConv reference zoo; the three stages
then take 32x32 to 4x4.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ._registry import register_model

__all__ = ["ShuffleNetV2", "InvertedResidual", "channel_shuffle"]

# Ma et al. 2018, Table 5: output channels of conv1, stage2-4, conv5 per width; repeats.
STAGE_REPEATS = (4, 8, 4)
STAGE_CHANNELS = {
    "x0_5": (24, 48, 96, 192, 1024),
    "x1_0": (24, 116, 232, 464, 1024),
    "x1_5": (24, 176, 352, 704, 1024),
    "x2_0": (24, 244, 488, 976, 2048),
}


def channel_shuffle(x: Tensor, groups: int) -> Tensor:
    """Interleave the channel groups: ``(g, c/g)`` -> ``(c/g, g)`` (Zhang et al. 2018, ShuffleNet)."""
    b, c, h, w = x.shape
    return x.view(b, groups, c // groups, h, w).transpose(1, 2).contiguous().view(b, c, h, w)


def _depthwise(c: int, stride: int) -> nn.Conv2d:
    return nn.Conv2d(c, c, 3, stride, 1, groups=c, bias=False)


class InvertedResidual(nn.Module):
    """ShuffleNetV2 unit. Stride 1: split channels, ``branch2`` on one half, concatenate,
    shuffle. Stride 2: ``branch1`` (DW-BN-PW-BN-ReLU) and ``branch2`` (PW-BN-ReLU-DW-BN-PW-
    BN-ReLU) both on the input, concatenate, shuffle."""

    def __init__(self, inp: int, oup: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        branch = oup // 2
        if stride == 1 and inp != 2 * branch:
            raise ConfigError(f"ShuffleNetV2 unit: stride 1 needs in_channels == out_channels (even), "
                              f"got {inp} -> {oup}")
        if stride > 1:
            self.branch1 = nn.Sequential(_depthwise(inp, stride), nn.BatchNorm2d(inp),
                                         nn.Conv2d(inp, branch, 1, bias=False), nn.BatchNorm2d(branch),
                                         nn.ReLU(inplace=True))
        else:
            self.branch1 = nn.Sequential()
        self.branch2 = nn.Sequential(
            nn.Conv2d(inp if stride > 1 else branch, branch, 1, bias=False), nn.BatchNorm2d(branch),
            nn.ReLU(inplace=True), _depthwise(branch, stride), nn.BatchNorm2d(branch),
            nn.Conv2d(branch, branch, 1, bias=False), nn.BatchNorm2d(branch), nn.ReLU(inplace=True))

    def forward(self, x: Tensor) -> Tensor:
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return channel_shuffle(out, 2)


class ShuffleNetV2(nn.Module):
    """torchvision's ``ShuffleNetV2``; ``cifar=True`` makes the stem stride 1 and drops the max-pool."""

    def __init__(self, stages_out_channels: tuple[int, ...], stages_repeats: tuple[int, ...] = STAGE_REPEATS,
                 num_classes: int = 1000, in_chans: int = 3, cifar: bool = False) -> None:
        super().__init__()
        c = stages_out_channels[0]
        self.conv1 = nn.Sequential(nn.Conv2d(in_chans, c, 3, 1 if cifar else 2, 1, bias=False),
                                   nn.BatchNorm2d(c), nn.ReLU(inplace=True))
        self.maxpool = nn.Identity() if cifar else nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        cin = c
        for name, repeats, cout in zip(("stage2", "stage3", "stage4"), stages_repeats, stages_out_channels[1:]):
            units = [InvertedResidual(cin, cout, 2)] + [InvertedResidual(cout, cout, 1) for _ in range(repeats - 1)]
            setattr(self, name, nn.Sequential(*units))
            cin = cout
        c = stages_out_channels[-1]
        self.conv5 = nn.Sequential(nn.Conv2d(cin, c, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True))
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.conv1(x))
        x = self.conv5(self.stage4(self.stage3(self.stage2(x))))
        return self.fc(x.mean([2, 3]))


def _factory(size: str, cifar: bool):
    def build(num_classes=1000, in_chans=3, conv="regular", width=1.0):
        if width != 1.0:
            raise ConfigError(f"ShuffleNetV2 takes its width from the model name ({size}); got width={width!r}")
        return ShuffleNetV2(STAGE_CHANNELS[size], num_classes=num_classes, in_chans=in_chans, cifar=cifar)

    name = f"{'cifar_' if cifar else ''}shufflenet_v2_{size}"
    build.__name__ = build.__qualname__ = name
    build.__doc__ = (f"ShuffleNetV2 {size.replace('_', '.')} (Ma et al. 2018"
                     + ("; 32x32 input: stride-1 stem, no max-pool)." if cifar else "; torchvision layout).")
                     + " ``conv``: regular = dsc = the published net.")
    return register_model(family="shufflenet", convs=("regular", "dsc"),
                          input_size=(3, 32, 32) if cifar else (3, 224, 224),
                          tags=("cifar",) if cifar else ("imagenet", "torchvision"))(build)


for _size in STAGE_CHANNELS:
    for _cifar in (False, True):
        _factory(_size, _cifar)
