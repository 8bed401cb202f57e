"""Converting trained regular convolutions into depthwise separable ones.

``convert(model, to="dsc"|"bsconv_u"|"bsconv_s"|"channel", rank=.. | energy=.. | speedup=..,
method="svd"|"gsvd", data=...) -> (model, ConversionReport)`` (:mod:`.convert`), built on the
pure factorizations of :mod:`.factor`: depth-wise decomposition (He et al., arXiv 1910.09455),
blueprint / BSConv-U and BSConv-S (Haase & Amthor, arXiv 2003.13549; Guo et al., arXiv
1808.05517), channel decomposition (Zhang et al., arXiv 1505.06798), with data-driven (GSVD,
least-squares) fits on calibration patches.

The conversion targets are objects in one registry (:mod:`.targets`): ``register_target`` adds
one, and ``convert``, ``load_model``'s recipe replay and ``sepconv convert --to`` offer it.
"""

from .convert import METHODS, ConversionReport, build_block, convert, convert_layer, dense_weight, full_rank, layer_macs
from .factor import (
    Moments,
    blueprint_factors,
    blueprint_spectrum,
    channel_factors,
    channel_spectrum,
    depthwise_factors,
    depthwise_spectrum,
    energy_rank,
    extract_patches,
    patch_moments,
    refit_pointwise,
    response_error,
    retained_energy,
    sample_patches,
    subspace_factors,
)
from .targets import ConversionTarget, get_target, register_target, target_names, unregister_target

__all__ = [
    "METHODS",
    "ConversionReport",
    "ConversionTarget",
    "Moments",
    "blueprint_factors",
    "blueprint_spectrum",
    "build_block",
    "channel_factors",
    "channel_spectrum",
    "convert",
    "convert_layer",
    "dense_weight",
    "depthwise_factors",
    "depthwise_spectrum",
    "energy_rank",
    "extract_patches",
    "full_rank",
    "get_target",
    "layer_macs",
    "patch_moments",
    "refit_pointwise",
    "register_target",
    "response_error",
    "retained_energy",
    "sample_patches",
    "subspace_factors",
    "target_names",
    "unregister_target",
]
