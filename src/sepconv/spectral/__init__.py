"""Spectral norms of convolutions: exact values, certified bounds, network Lipschitz bounds.

Pure functions of ``(weight, ConvSpec)``; no module state. Every function says whether its
result is **exact**, a **certified upper bound**, or an **estimate**.

Hostile input (:mod:`sepconv.spectral.validate`): every public function checks its arguments
before any work -- tolerances ``0 < tol < 1``, iteration counts, real finite 4-D weights with
values (meta, sparse, complex and integer tensors are refused), weights that fit the geometry,
model input shapes, finite weights and BatchNorm statistics in every layer -- and raises one
:class:`~sepconv.errors.SepconvError` naming the function, argument or layer. **Precision**:
half and bfloat16 weights are computed in float32 (LAPACK has no half precision, and a bound
rounded to half would no longer be a bound); results are float32 (``depthwise_norms`` and
``depthwise_channel_norms``, which scale the weight, return its dtype). **Memory**: every path
that builds a dense operator, a frequency grid, LOBPCG vectors or a dry forward pass estimates
its bytes first and stays within ``max_memory`` (bytes; default 2 GiB, or
``$SEPCONV_MEMORY_LIMIT``): it takes a cheaper certified route where one exists, else raises a
:class:`~sepconv.errors.ResourceError` with the estimate.

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
from .validate import MAX_MEMORY

__all__ = [
    "Certificate",
    "LayerRecord",
    "MAX_MEMORY",
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
