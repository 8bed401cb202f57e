"""Spectral normalization as :mod:`torch.nn.utils.parametrize` parametrizations.

:func:`spectral_normalize` walks a model and parametrizes the ``weight`` of every layer it
can bound, so that the layer's operator norm stays at most ``target`` (mode ``clip``: divide
by ``max(1, sigma / target)``, leaving satisfying layers untouched) or equals it (mode
``scale``: always divide, Miyato et al. 2018). One concept per parametrization:

============================  ==========================================  ============================
layer                         parametrization                             the value ``sigma``
============================  ==========================================  ============================
depthwise conv (``dsc``)      :class:`DepthwiseFFTNorm` (stateless)       exact (circular) / certified
                                                                          bound (zero padding), FFT
pointwise 1x1 conv, Linear    :class:`MatrixNorm` (``u``)                 estimate in training,
                                                                          exact in eval mode
any conv (``operator``)       :class:`OperatorNorm` (``x``, input-sized)  estimate (from below)
any conv (``fantastic4``,     :class:`BoundNorm` (stateless)              certified upper bound
``gram``, ``fft``, any                                                    (``exact``: exact within
registered differentiable                                                 ``tol``)
certified or exact method)
any conv (``reshape``)        :class:`ReshapeNorm` (``u``)                torch's value, no bound
BatchNorm (``batchnorm``)     :class:`BatchNormLipschitz` (stateless)     exact (eval mode)
============================  ==========================================  ============================

State lives in buffers (saved in the ``state_dict``, broadcast by DDP); targets and modes
are constants, recorded in the model's recipe so that :func:`sepconv.io.load_model` rebuilds
the same parametrizations before it loads the weights. For ``dsc`` the depthwise norms of
all layers are computed by **one** batched DFT per forward pass of the model
(:class:`DepthwiseGroup`, :func:`sepconv.spectral.exact.depthwise_channel_norms`).

The classes live in :mod:`sepconv.lipschitz.parametrizations`, the model-level call in
:mod:`sepconv.normalize.model`. ``METHODS`` and ``FULL_CONV`` are :func:`normalize_methods` and
:func:`full_conv_methods` when read: a spectral method registered at run time
(:func:`sepconv.spectral.register_method`) is in them.
"""

from __future__ import annotations

from ..lipschitz.parametrizations import (
    WARMUP_ITERATIONS,
    BatchNormLipschitz,
    BoundNorm,
    DepthwiseFFTNorm,
    DepthwiseGroup,
    MatrixNorm,
    OperatorNorm,
    ReshapeNorm,
    bn_lipschitz_clip,
    frozen_state,
    matrix_power_iteration,
    rescale,
    scale_factor,
)
from .model import (
    MAX_POWER_ITERATIONS,
    MODES,
    LayerSN,
    SNSummary,
    full_conv_methods,
    normalize_methods,
    remove_spectral_normalization,
    spectral_normalize,
)

__all__ = ["BatchNormLipschitz", "BoundNorm", "DepthwiseFFTNorm", "DepthwiseGroup", "LayerSN", "MAX_POWER_ITERATIONS",
           "MODES", "MatrixNorm", "OperatorNorm", "ReshapeNorm", "SNSummary", "WARMUP_ITERATIONS", "bn_lipschitz_clip",
           "frozen_state", "full_conv_methods", "matrix_power_iteration", "normalize_methods",
           "remove_spectral_normalization", "rescale", "scale_factor", "spectral_normalize",
           "FULL_CONV", "METHODS"]  # noqa: F822 -- these two come from __getattr__ (the registry, when read)


def __getattr__(name: str) -> tuple[str, ...]:
    if name == "METHODS":
        return normalize_methods()
    if name == "FULL_CONV":
        return full_conv_methods()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
