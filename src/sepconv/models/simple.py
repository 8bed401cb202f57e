"""A small plain CNN: quick to train on the bundled digits data; used by tests and examples."""

from __future__ import annotations

from torch import nn

from ..errors import ConfigError
from ..layers import CONV_KINDS, make_spatial_conv
from ._registry import register_model
from ._util import check_bsconv_p

__all__ = ["SimpleCNN", "simple_cnn"]


#: ``act`` of :func:`simple_cnn`: ReLU, or a smooth activation (the curvature bound needs one:
#: :func:`sepconv.spectral.curvature_bound`).
ACTS = {"relu": nn.ReLU, "softplus": nn.Softplus, "tanh": nn.Tanh, "elu": nn.ELU, "silu": nn.SiLU, "gelu": nn.GELU}


def _round(c: float) -> int:
    return max(1, int(round(c)))


class SimpleCNN(nn.Module):
    """Four conv-BN-activation stages (16, 32, 64, 128 channels x width), all but the first halving
    the size, then global average pooling and a linear classifier. ``conv`` sets the flavour of the
    3x3 convs (see :func:`sepconv.layers.make_spatial_conv`), ``act`` the activation (:data:`ACTS`)."""

    def __init__(self, num_classes: int = 10, in_chans: int = 3, width: float = 1.0,
                 channels: tuple[int, ...] = (16, 32, 64, 128), norm: bool = True, conv: str = "regular",
                 bsconv_p: float = 0.25, act: str = "relu"):
        super().__init__()
        if not isinstance(act, str) or act not in ACTS:
            raise ConfigError(f"simple_cnn: act must be one of {', '.join(ACTS)}, got {act!r:.40}")
        layers: list[nn.Module] = []
        c_in = in_chans
        for i, c in enumerate(channels):
            c = _round(c * width)
            layers.append(make_spatial_conv(conv, c_in, c, 3, stride=1 if i == 0 else 2, padding=1,
                                            bias=not norm, bsconv_p=bsconv_p))
            if norm:
                layers.append(nn.BatchNorm2d(c))
            layers.append(nn.ReLU(inplace=True) if act == "relu" else ACTS[act]())
            c_in = c
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(c_in, num_classes)

    def forward(self, x):
        return self.classifier(self.flatten(self.pool(self.features(x))))


@register_model(family="simple", convs=CONV_KINDS, input_size=(3, 32, 32))
def simple_cnn(num_classes=1000, in_chans=3, conv="regular", width=1.0, channels=(16, 32, 64, 128),
               norm=True, bsconv_p=None, act="relu"):
    """Small CNN (4 conv stages + linear). ``norm=False`` drops BatchNorm. Every 3x3 conv,
    the first included, takes the ``conv`` flavour; ``bsconv_p`` (default 0.25) sets p of
    ``conv="bsconv_s"``; ``act`` is ``relu`` (default) or a smooth activation of :data:`ACTS`."""
    return SimpleCNN(num_classes=num_classes, in_chans=in_chans, width=width, channels=tuple(channels),
                     norm=norm, conv=conv, bsconv_p=check_bsconv_p(conv, bsconv_p), act=act)
