"""Small helpers shared by the model families."""

from __future__ import annotations

from torch import nn

from ..errors import ConfigError


def check_bsconv_p(conv: str, bsconv_p: float | None, default: float = 0.25) -> float:
    """``bsconv_p`` if it applies (``conv="bsconv_s"``), else the default; a clear error when
    it is given for another flavour or lies outside [0, 1]."""
    if bsconv_p is None:
        return default
    if conv != "bsconv_s":
        raise ConfigError(f"bsconv_p only applies to conv='bsconv_s' (got conv={conv!r})")
    if not 0.0 <= float(bsconv_p) <= 1.0:
        raise ConfigError(f"bsconv_p must be in [0, 1], got {bsconv_p!r}")
    return float(bsconv_p)


def make_divisible(v: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round a channel count to a multiple of ``divisor``, never below 90% of ``v`` (the
    rounding of the MobileNet reference implementations and torchvision)."""
    min_value = divisor if min_value is None else min_value
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


def scale_channels(c: int, width: float) -> int:
    """``round(c * width)``, at least 1."""
    return max(1, int(round(c * width)))


class ConvNormAct(nn.Sequential):
    """``Conv2d -> norm -> activation`` as an ``nn.Sequential`` with children ``0``, ``1``
    (and ``2``), the layout of torchvision's ``Conv2dNormActivation`` (so the keys are
    ``<name>.0.weight``, ``<name>.1.running_mean``...). Padding keeps the size at stride 1."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 groups: int = 1, norm: type[nn.Module] | None = nn.BatchNorm2d,
                 act: type[nn.Module] | None = nn.ReLU, dilation: int = 1):
        padding = (kernel_size - 1) // 2 * dilation
        layers: list[nn.Module] = [nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation,
                                             groups=groups, bias=norm is None)]
        if norm is not None:
            layers.append(norm(out_channels))
        if act is not None:
            layers.append(act(inplace=True))
        super().__init__(*layers)
