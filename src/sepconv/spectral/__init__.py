"""Spectral norms of convolutions: exact values, certified bounds, network Lipschitz bounds.

Pure functions of ``(weight, ConvSpec)``; no module state. Every function says whether its
result is **exact**, a **certified upper bound**, or an **estimate**.

>>> from sepconv.spectral import ConvSpec, spectral_norm, norm_bracket
>>> spec = ConvSpec.of(conv, in_size=(32, 32))
>>> spectral_norm(conv.weight, spec, method="exact")
"""

from .bounds import fantastic_four, fft_bound, gram_iteration, reshape_norm
from .exact import (
    METHODS,
    Bracket,
    bracket,
    circulant_norm,
    depthwise_norm,
    exact_norm,
    norm_bracket,
    singular_values,
    spectral_norm,
)
from .iterative import power_iteration
from .spec import PADDING_MODES, ConvSpec

__all__ = [
    "METHODS",
    "PADDING_MODES",
    "Bracket",
    "ConvSpec",
    "bracket",
    "circulant_norm",
    "depthwise_norm",
    "exact_norm",
    "fantastic_four",
    "fft_bound",
    "gram_iteration",
    "norm_bracket",
    "power_iteration",
    "reshape_norm",
    "singular_values",
    "spectral_norm",
]
