"""ONNX export, verified against torch before the file is written.

:func:`export_onnx` exports :func:`~sepconv.deploy.fold.deployable` (eval mode, normalized
weights baked, BatchNorm folded) with torch's ``torch.export``-based exporter
(``torch.onnx.export(dynamo=True)``), runs the exported graph in ONNX Runtime on the same
inputs as the torch model -- random ones, and real images when given -- and writes the file
(atomically) only when every output agrees to ``rtol``. Depthwise convs stay grouped ``Conv``
nodes (``group`` = channels), the form every runtime has a depthwise kernel for.

onnx, onnxscript and onnxruntime come with the optional extra ``sepconv[deploy]``.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import logging
import os
import re
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import ConfigError, ExportError, MissingDependencyError, SepconvError, UnsupportedLayerError, one_line
from ..files import atomic_path
from .fold import deployable

__all__ = ["DEFAULT_OPSET", "ExportCheck", "ExportResult", "export_onnx", "onnx_session", "relative_error",
           "require"]

DEFAULT_OPSET = 18
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
#: inputs of the check: a batch of this many random images (and batch 1 with a dynamic batch)
CHECK_BATCH = 2


def require(module: str, what: str = "ONNX export") -> object:
    """Import an optional dependency, or say in one line which extra brings it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingDependencyError(f"{what} needs the Python package {module!r}, which is not installed: "
                                     "pip install 'sepconv[deploy]'") from None


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    """``max |got - want| / max |want|`` (the largest error relative to the output's scale)."""
    scale = float(np.abs(want).max()) if want.size else 0.0
    err = float(np.abs(got.astype(np.float64) - want.astype(np.float64)).max()) if want.size else 0.0
    return err / scale if scale > 0 else err


@dataclass(frozen=True)
class ExportCheck:
    """One comparison of the exported graph with torch: which inputs, and the relative error."""

    inputs: str  # "random" or "data"
    batch: int
    error: float


@dataclass
class ExportResult:
    path: Path
    opset: int
    batch: int | None  # None: dynamic
    rtol: float
    checks: list[ExportCheck] = field(default_factory=list)
    nodes: dict[str, int] = field(default_factory=dict)  # op type -> count in the exported graph
    depthwise: int = 0  # grouped Conv nodes with one input channel per group

    @property
    def max_error(self) -> float:
        return max((c.error for c in self.checks), default=0.0)

    def summary(self) -> str:
        checks = ", ".join(f"{c.inputs} batch {c.batch} {c.error:.1e}" for c in self.checks)
        convs = self.nodes.get("Conv", 0)
        return (f"{self.path}: ONNX opset {self.opset}, {sum(self.nodes.values())} nodes ({convs} Conv, "
                f"{self.depthwise} of them depthwise), batch {'dynamic' if self.batch is None else self.batch}; "
                f"verified against torch in ONNX Runtime: max relative error {self.max_error:.1e} "
                f"<= {self.rtol:g} ({checks})")


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The exporter's warnings and log lines (optional torchvision ops, deprecations) are not the
    user's business: errors still raise."""
    loggers = [logging.getLogger(n) for n in ("torch", "torch.onnx", "torch.export", "torch._export", "torch._dynamo",
                                              "torch.fx", "torch.fx.experimental.symbolic_shapes", "onnxscript")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):  # a failed capture prints its graph
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


def onnx_session(path: str | os.PathLike, threads: int = 1):
    """An ONNX Runtime CPU session on ``path`` with ``threads`` intra-op threads (all graph
    optimizations on, sequential execution)."""
    ort = require("onnxruntime", "ONNX Runtime")
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _check_shape(input_shape: Sequence[int]) -> tuple[int, ...]:
    try:
        shape = tuple(int(v) for v in input_shape)
    except (TypeError, ValueError):
        shape = ()
    if len(shape) < 2 or any(v < 1 for v in shape):
        raise ConfigError(f"export_onnx: input_shape must be positive sizes (C, H, W) without the batch, "
                          f"got {input_shape!r}")
    return shape


def _untraceable(model: nn.Module, example: Tensor) -> tuple[str, nn.Module, str]:
    """The deepest submodule that ``torch.export`` cannot capture on the inputs it sees in the
    model (children tried in call order), and the reason, for an error that names it."""
    seen: dict[str, tuple] = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args, n=n: seen.setdefault(n, args) and None)
             for n, m in model.named_modules()]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in hooks:
            h.remove()
    name, mod, reason = "", model, ""
    while True:
        for child_name, child in mod.named_children():
            full = f"{name}.{child_name}" if name else child_name
            why = _export_failure(child, seen[full]) if full in seen else None
            if why is not None:
                name, mod, reason = full, child, why
                break
        else:
            return name, mod, reason


def _export_failure(mod: nn.Module, args: tuple) -> str | None:
    """Why ``torch.export`` cannot capture ``mod`` on ``args`` (its error's first line), or None."""
    try:
        with _quiet():
            torch.export.export(mod, tuple(args), strict=False)
        return None
    except Exception as e:  # torch.export raises many types
        return _ANSI.sub("", str(e)).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _graph_stats(path: Path) -> tuple[dict[str, int], int]:
    onnx = require("onnx")
    graph = onnx.load(str(path), load_external_data=False).graph
    nodes: dict[str, int] = {}
    shapes = {t.name: tuple(t.dims) for t in graph.initializer}
    depthwise = 0
    for n in graph.node:
        nodes[n.op_type] = nodes.get(n.op_type, 0) + 1
        if n.op_type == "Conv":
            group = next((a.i for a in n.attribute if a.name == "group"), 1)
            w = shapes.get(n.input[1])
            depthwise += bool(group > 1 and w is not None and len(w) > 1 and w[1] == 1)
    return nodes, depthwise


def export_onnx(model: nn.Module, path: str | os.PathLike, input_shape: Sequence[int], *,
                opset: int = DEFAULT_OPSET, batch: int | None = None, inputs: Tensor | None = None,
                rtol: float = 1e-5, seed: int = 0, forms: bool = True) -> ExportResult:
    """Export ``model`` to an ONNX file at ``path`` for inputs of ``input_shape`` = ``(C, H, W)``.

    What is exported is :func:`~sepconv.deploy.fold.deployable` of the model (eval mode,
    parametrizations baked, BatchNorm folded, and with ``forms`` its modules in their deploy forms for
    ONNX; ``forms=False`` exports them as built). Before the file is written the exported graph runs
    in ONNX Runtime on random inputs and on ``inputs`` (real images, ``(N, C, H, W)``) when
    given; ``batch=None`` exports a dynamic batch dimension (checked at batch 2 and 1, and all of
    ``inputs``), an int a fixed one (``inputs`` checked in chunks of it). The file is written only if every
    output's relative error (:func:`relative_error`) is at most ``rtol``, else
    :class:`~sepconv.errors.ExportError`. A model ``torch.export`` cannot capture raises
    :class:`~sepconv.errors.UnsupportedLayerError` naming the submodule that fails; an
    unwritable ``path`` raises :class:`~sepconv.errors.OutputError`.
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"export_onnx: model must be a torch.nn.Module, got {type(model).__name__}")
    shape = _check_shape(input_shape)
    if not isinstance(opset, int) or not 14 <= opset <= 23:
        raise ConfigError(f"export_onnx: opset must be an integer from 14 to 23, got {opset!r}")
    if inputs is not None and (not isinstance(inputs, Tensor) or tuple(inputs.shape[1:]) != shape):
        raise ConfigError(f"export_onnx: inputs must be a tensor of shape (N, {', '.join(map(str, shape))}), "
                          f"got {tuple(inputs.shape) if isinstance(inputs, Tensor) else type(inputs).__name__}")
    if batch is not None and (isinstance(batch, bool) or not isinstance(batch, int) or batch < 1):
        raise ConfigError(f"export_onnx: batch must be a positive integer or None (dynamic), got {batch!r}")
    for dep in ("onnx", "onnxscript", "onnxruntime"):
        require(dep)
    path = Path(path)
    net = deployable(model, shape, for_onnx=True) if forms else deployable(model)
    p = next(iter(net.parameters()), None)
    dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32
    gen = torch.Generator().manual_seed(seed)
    example = torch.randn(batch or CHECK_BATCH, *shape, generator=gen).to(dtype)
    kw = {}
    if batch is None:
        kw["dynamic_shapes"] = ({0: torch.export.Dim("batch", min=1, max=1 << 20)},)
    with atomic_path(path) as tmp:
        try:
            with _quiet(), torch.no_grad():
                torch.onnx.export(net, (example,), str(tmp), dynamo=True, opset_version=opset, verbose=False,
                                  input_names=["input"], output_names=["output"], external_data=False, **kw)
        except SepconvError:
            raise
        except Exception as e:  # the exporter raises many types
            name, mod, reason = _untraceable(net, example)
            where = f"{name} ({type(mod).__name__})" if name else type(mod).__name__
            reason = reason or _ANSI.sub("", one_line(e))
            raise UnsupportedLayerError(f"export: {where} cannot be exported to ONNX ({reason[:200]})") from None
        result = ExportResult(path, opset, batch, rtol)
        result.nodes, result.depthwise = _graph_stats(tmp)
        checks = [("random", example)]
        if batch is None:
            checks.append(("random", example[:1]))
        if inputs is not None:
            data = inputs.to(dtype)
            if batch is None:
                checks.append(("data", data))
            else:  # whole chunks of the fixed batch, the last one filled up from the first images
                data = torch.cat([data] * -(-batch // len(data))) if len(data) < batch else data
                checks += [("data", data[i:i + batch]) for i in range(0, len(data) - batch + 1, batch)]
        session = onnx_session(tmp)
        for what, x in checks:
            with torch.no_grad():
                want = net(x).numpy()
            try:
                got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
            except Exception as e:  # onnxruntime raises its own types
                raise ExportError(f"export: ONNX Runtime cannot run the exported graph on a batch of "
                                  f"{x.shape[0]} ({one_line(e)[:200]})") from None
            err = relative_error(got, want) if got.shape == want.shape else float("inf")
            result.checks.append(ExportCheck(what, int(x.shape[0]), err))
            if not err <= rtol:
                raise ExportError(f"export: the exported graph differs from the torch model on {what} inputs "
                                  f"(batch {x.shape[0]}): relative error {err:.2e} > {rtol:g}; nothing written")
    return result
