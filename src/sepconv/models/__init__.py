"""Model zoo: ``create_model(name, num_classes, in_chans, conv, width, **kw)``, ``list_models()``,
``profile(model, input_size)``. One file per model family; each registers its members:

- ``mobilenet.py``: ``mobilenet_v1``, ``mobilenet_v2``, ``mobilenet_v3_large/small`` and their
  ``cifar_`` variants;
- ``shufflenet.py``: ``shufflenet_v2_x0_5 .. x2_0`` and their ``cifar_`` variants;
- ``resnet.py``: ``resnet18/34/50`` (ImageNet), ``resnet20/32/44/56/110`` (CIFAR), ``wrnD_K``;
- ``simple.py``: ``simple_cnn``.

The ImageNet models carry torchvision's state-dict keys and shapes. What each ``conv=``
flavour means for a family is written in that family's module docstring; a flavour a
family does not define raises :class:`~sepconv.errors.ModelError`. Models with BSConv-S
parts train with ``loss + sepconv.layers.orthonormal_penalty(model)``.
"""

from ._profile import Profile, count_params, profile
from ._registry import CONV_KINDS, ModelInfo, create_model, default_input_shape, list_models, model_info, register_model

# model families (importing registers them)
from . import lipschitz, mobilenet, resnet, shufflenet, simple  # noqa: F401  isort: skip

__all__ = [
    "CONV_KINDS",
    "ModelInfo",
    "Profile",
    "count_params",
    "create_model",
    "default_input_shape",
    "list_models",
    "model_info",
    "profile",
    "register_model",
]
