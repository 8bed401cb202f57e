"""Deploying separable networks: BatchNorm folding, verified ONNX export, measured latency.

Model tools above :mod:`sepconv.io` (DESIGN: math -> modules -> model tools -> application):

* :mod:`.fold` -- :func:`fold_batchnorm`, :func:`bake_parametrizations`, :func:`deployable`;
* :mod:`.export` -- :func:`export_onnx` (``sepconv export``), verified in ONNX Runtime before
  the file is written;
* :mod:`.latency` -- :data:`RUNTIMES`, :func:`measure_latency`, :func:`measure` (``sepconv latency``).

onnx, onnxscript and onnxruntime are the optional extra ``sepconv[deploy]``; without them
everything here but the ONNX parts works, and those say which extra to install.
"""

from .export import DEFAULT_OPSET, ExportCheck, ExportResult, export_onnx, relative_error
from .fold import bake_parametrizations, deployable, fold_batchnorm, folded_affine
from .latency import RUNTIMES, Latency, Runtime, measure, measure_latency, runner, torch_threads

__all__ = ["DEFAULT_OPSET", "RUNTIMES", "ExportCheck", "ExportResult", "Latency", "Runtime", "bake_parametrizations",
           "deployable", "export_onnx", "fold_batchnorm", "folded_affine", "measure", "measure_latency",
           "relative_error", "runner", "torch_threads"]
