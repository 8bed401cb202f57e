"""Spectral norms of convolutions: exact values, certified bounds, network Lipschitz bounds.

Pure functions of ``(weight, ConvSpec)``; no module state. Every function says whether its
result is **exact**, a **certified upper bound**, or an **estimate**.

>>> from sepconv.spectral import ConvSpec, spectral_norm, norm_bracket
>>> spec = ConvSpec.of(conv, in_size=(32, 32))
>>> spectral_norm(conv.weight, spec, method="exact")
"""

from .bounds import fantastic_four, fantastic_four_terms, fft_bound, gram_iteration, reshape_norm
from .composite import batchnorm_lipschitz, chain_norm, linear_norm, merge_chain
from .exact import (
    METHODS,
    Bracket,
    bracket,
    circulant_norm,
    depthwise_channel_norms,
    depthwise_norm,
    depthwise_norms,
    exact_norm,
    norm_bracket,
    singular_values,
    spectral_norm,
)
from .iterative import power_iteration
from .network import Certificate, LayerRecord, analyze, certified_accuracy, certified_radii, lipschitz_bound
from .spec import PADDING_MODES, ConvSpec

__all__ = [
    "Certificate",
    "LayerRecord",
    "METHODS",
    "PADDING_MODES",
    "Bracket",
    "ConvSpec",
    "analyze",
    "batchnorm_lipschitz",
    "bracket",
    "certified_accuracy",
    "certified_radii",
    "chain_norm",
    "circulant_norm",
    "depthwise_channel_norms",
    "depthwise_norm",
    "depthwise_norms",
    "exact_norm",
    "fantastic_four",
    "fantastic_four_terms",
    "fft_bound",
    "gram_iteration",
    "linear_norm",
    "lipschitz_bound",
    "merge_chain",
    "norm_bracket",
    "power_iteration",
    "reshape_norm",
    "singular_values",
    "spectral_norm",
]
