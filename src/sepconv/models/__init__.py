"""Model zoo: ``create_model(name, num_classes, in_chans, conv, width, **kw)``, ``list_models()``,
``profile(model, input_size)``. One file per model family; each registers its members."""

from ._profile import Profile, count_params, profile
from ._registry import CONV_KINDS, ModelInfo, create_model, list_models, model_info, register_model

# model families (importing registers them)
from . import mobilenet, resnet, shufflenet, simple  # noqa: F401  isort: skip

__all__ = [
    "CONV_KINDS",
    "ModelInfo",
    "Profile",
    "count_params",
    "create_model",
    "list_models",
    "model_info",
    "profile",
    "register_model",
]
