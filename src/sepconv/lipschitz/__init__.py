"""Layers that are 1-Lipschitz **by construction**, for (separable) networks with a certified bound.

Each layer's constant is exact or certified, as its docstring says; the network's constant is
then certified independently by :func:`sepconv.spectral.lipschitz_bound`, which bounds every
convolution from its actual (parametrized) weights and merges depthwise-then-pointwise chains
into one operator. The parameter-free layers here declare their exact constant
(``lipschitz_constant = 1.0``), which the engine reads through a duck-typed protocol
(:func:`sepconv.spectral.lipschitz_rules.declared_lipschitz`) without importing this package.

======================================  =========================================================
activations (:mod:`.activations`)        :class:`MaxMin`, :class:`GroupSort` -- exactly 1-Lipschitz,
                                        gradient-norm preserving (Anil, Lucas, Grosse 2019)
orthonormal weights (:mod:`.bjorck`)     :class:`BjorckOrthonormal` (Björck & Bowie 1971)
orthogonal depthwise                    :class:`ParaunitaryDepthwise`: per channel a paraunitary
(:mod:`.paraunitary`)                    filter bank (an isometry from ``C`` to ``m C`` channels)
layers (:mod:`.convs`)                   :func:`lipschitz_linear`, :func:`lipschitz_pointwise`,
                                        :func:`lipschitz_conv2d`, :class:`LipschitzSeparableConv2d`,
                                        :func:`orthogonal_depthwise`
composite norm (:mod:`.composite`)       :class:`CompositeNorm`: a separable block normalized as
                                        one operator (per frequency ``||P diag(D^(w))||``)
normalized weights                       :class:`DepthwiseFFTNorm`, :class:`MatrixNorm`, :class:`BoundNorm`,
(:mod:`.parametrizations`)               :class:`OperatorNorm`, :class:`ReshapeNorm`, :class:`BatchNormLipschitz`:
                                        the spectral-normalization parametrizations that
                                        :func:`sepconv.normalize.spectral_normalize` applies to a model
structure (:mod:`.blocks`)               :class:`BoundedBatchNorm2d`, :class:`L2Pool2d`,
                                        :class:`ConvexResidual`
======================================  =========================================================

The Lipschitz models of the zoo (``lip_simple_cnn``, ``lip_sep_cnn``, ``lip_sep_mobilenet``) are
built from these (:mod:`sepconv.models.lipschitz`).
"""

from __future__ import annotations

from .activations import ACTIVATIONS, GroupSort, MaxMin, activation, channel_multiple, group_sort, max_min
from .bjorck import BJORCK_ITERATIONS, BjorckOrthonormal, bjorck_orthonormalize
from .blocks import BoundedBatchNorm2d, ConvexResidual, L2Pool2d, l2_pool2d
from .composite import CompositeNorm, composite_methods, separable_norm
from .convs import (
    LINEAR_KINDS,
    NORMS,
    POINTWISE_KINDS,
    LipschitzSeparableConv2d,
    lipschitz_conv2d,
    lipschitz_linear,
    lipschitz_pointwise,
    orthogonal_depthwise,
)
from .paraunitary import ParaunitaryDepthwise, paraunitary_filters

__all__ = ["ACTIVATIONS", "BJORCK_ITERATIONS", "BjorckOrthonormal", "BoundedBatchNorm2d", "CompositeNorm",
           "ConvexResidual", "GroupSort", "L2Pool2d", "LINEAR_KINDS", "LipschitzSeparableConv2d", "MaxMin", "NORMS",
           "POINTWISE_KINDS", "ParaunitaryDepthwise", "activation", "bjorck_orthonormalize", "channel_multiple",
           "composite_methods", "group_sort", "l2_pool2d", "lipschitz_conv2d", "lipschitz_linear",
           "lipschitz_pointwise", "max_min", "orthogonal_depthwise", "paraunitary_filters", "separable_norm"]
