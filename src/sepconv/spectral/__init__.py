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
:class:`~sepconv.errors.ResourceError` with the estimate. **Work**: a zero-padded layer's upper end
is certified to ``tol`` by a banded Cholesky factorisation when it costs at most 2e11 flops;
``with certificate_budget(flops):`` raises that for every call inside (``sepconv spectrum
--certificate-flops``), and ``analyze``/``lipschitz_bound(progress=True)`` show the long searches'
progress inside each layer.

>>> from sepconv.spectral import ConvSpec, spectral_norm, norm_bracket
>>> spec = ConvSpec.of(conv, in_size=(32, 32))
>>> spectral_norm(conv.weight, spec, method="exact")

**Methods** are a registry (:mod:`sepconv.spectral.methods`): :func:`method_names` lists them,
:func:`register_method` adds one (a function ``fn(weight, spec, **options)``, its kind -- exact,
certified, estimate or heuristic -- and whether it is differentiable and needs the input size),
and :func:`spectral_norm`, :func:`analyze`, :func:`lipschitz_bound`,
:func:`sepconv.normalize.spectral_normalize` and the ``sepconv`` command all read it.
``METHODS`` is :func:`method_names` at the time it is read.
"""

from .bounds import fantastic_four, fantastic_four_terms, fft_bound, gram_iteration, majorant_kernel, reshape_norm
from .bracketing import certificate_budget
from .certificates import Certificate, certified_accuracy, certified_radii, margin_radii, pairwise_radii
from .composite import batchnorm_lipschitz, chain_norm, linear_norm, merge_chain
from .curvature import curvature_bound, curvature_penalty
from .exact import (
    Bracket,
    bracket,
    circulant_norm,
    depthwise_channel_norms,
    depthwise_norm,
    depthwise_norms,
    exact_norm,
    norm_bracket,
    singular_values,
    upper_bound,
)
from .fourier import all_block_singular_values
from .iterative import power_iteration
from .lipschitz import lipschitz_bound
from .methods import SpectralMethod, get_method, method_names, register_method, spectral_norm, unregister_method
from .network import LayerRecord, analyze, layer_inputs
from .spec import PADDING_MODES, ConvSpec
from .validate import MAX_MEMORY

__all__ = [
    "Certificate",
    "LayerRecord",
    "MAX_MEMORY",
    "PADDING_MODES",
    "Bracket",
    "ConvSpec",
    "SpectralMethod",
    "all_block_singular_values",
    "analyze",
    "batchnorm_lipschitz",
    "bracket",
    "certificate_budget",
    "certified_accuracy",
    "certified_radii",
    "chain_norm",
    "circulant_norm",
    "curvature_bound",
    "curvature_penalty",
    "depthwise_channel_norms",
    "depthwise_norm",
    "depthwise_norms",
    "exact_norm",
    "fantastic_four",
    "fantastic_four_terms",
    "fft_bound",
    "get_method",
    "gram_iteration",
    "layer_inputs",
    "linear_norm",
    "lipschitz_bound",
    "majorant_kernel",
    "margin_radii",
    "merge_chain",
    "method_names",
    "norm_bracket",
    "pairwise_radii",
    "power_iteration",
    "register_method",
    "reshape_norm",
    "singular_values",
    "spectral_norm",
    "unregister_method",
    "upper_bound",
    "METHODS",  # noqa: F822 -- from __getattr__: the registry's names when read
]


def __getattr__(name: str) -> tuple[str, ...]:
    if name == "METHODS":
        return method_names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
