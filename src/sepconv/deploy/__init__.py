"""Deploying separable networks: BatchNorm folding, verified ONNX export, measured latency.

Model tools above :mod:`sepconv.io` (DESIGN: math -> modules -> model tools -> application):

* :mod:`.fold` -- :func:`fold_batchnorm`, :func:`bake_parametrizations`, :func:`deployable`;
* :mod:`.export` -- :func:`export_onnx` (``sepconv export``), verified in ONNX Runtime before
  the file is written;
* :mod:`.latency` -- :data:`RUNTIMES`, :func:`measure_latency`, :func:`measure` (``sepconv latency``);
* :mod:`.choose` -- :func:`choose_forms`: each separable block as its deploy form or its dense conv,
  whichever is measured faster in the target runtime (``--forms fastest``).

onnx, onnxscript and onnxruntime are the optional extra ``sepconv[deploy]``; without them
everything here but the ONNX parts works, and those say which extra to install.
"""

from .choose import ChosenForms, FormChoice, choose_forms
from .export import DEFAULT_OPSET, ExportCheck, ExportResult, export_onnx, relative_error
from .fold import bake_parametrizations, deployable, fold_batchnorm, folded_affine
from .latency import (
    RUNTIMES,
    Latency,
    Runtime,
    latency_ratio,
    measure,
    measure_latency,
    require_runtime,
    runner,
    torch_threads,
)

__all__ = ["DEFAULT_OPSET", "RUNTIMES", "ChosenForms", "ExportCheck", "ExportResult", "FormChoice", "Latency",
           "Runtime", "bake_parametrizations", "choose_forms", "deployable", "export_onnx", "fold_batchnorm",
           "folded_affine", "latency_ratio", "measure", "measure_latency", "relative_error", "require_runtime",
           "runner", "torch_threads"]
