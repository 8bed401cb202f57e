"""Inference latency, measured per runtime.

A runtime (:data:`RUNTIMES`) turns a model into a function of one prepared input batch:

* ``torch`` -- PyTorch eager, NCHW (``torch.inference_mode``);
* ``torch-cl`` -- PyTorch eager, model and input in ``channels_last`` (NHWC) memory format;
* ``torch-compile`` -- ``torch.compile`` (inductor; needs a C++ compiler; compile time excluded);
* ``onnxruntime`` -- the model exported by :func:`~sepconv.deploy.export_onnx` (verified against
  torch), run by ONNX Runtime's CPU provider with every graph optimization on.

Every runtime runs :func:`~sepconv.deploy.deployable` of the model (eval mode, normalized weights
baked, BatchNorm folded). :func:`measure` times several such functions *interleaved* (one call of
each per round, so drifts of a shared machine hit all alike) and reports the median and
quartiles of each; :func:`measure_latency` is the one-model form. Interleave functions of one
runtime only: with more than one thread, ONNX Runtime's and OpenMP's idle threads spin for a while
after each call and steal the cores from a different runtime called next (measured: 2-thread
eager calls 2-20x slower when interleaved with ONNX Runtime sessions).
"""

from __future__ import annotations

import contextlib
import copy
import math
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError
from ..evidence import Comparison, compare
from .export import _check_shape, export_onnx, onnx_session, require
from .fold import deployable

__all__ = ["RUNTIMES", "Latency", "Runtime", "latency_ratio", "measure", "measure_latency", "require_runtime", "runner",
           "torch_threads"]


@dataclass(frozen=True)
class Latency:
    """Wall-clock time of one forward pass, in milliseconds: median and quartiles over ``n`` calls."""

    median: float
    q1: float
    q3: float
    n: int
    samples: tuple[float, ...] = ()  # every call's time in ms, in call order (paired across interleaved fns)

    def __str__(self) -> str:
        return f"{self.median:.3g} ms ({self.q1:.3g}-{self.q3:.3g})"

    def __add__(self, more: Latency) -> Latency:
        """The calls of both measurements pooled (``samples`` in call order: this one's, then ``more``'s)."""
        return Latency.of([t / 1e3 for t in self.samples + more.samples])

    @classmethod
    def of(cls, seconds: Sequence[float]) -> Latency:
        ms = [1e3 * s for s in seconds]
        q = statistics.quantiles(ms, n=4, method="inclusive") if len(ms) > 1 else [ms[0]] * 3
        return cls(q[1], q[0], q[2], len(ms), tuple(ms))


def latency_ratio(a: Latency, b: Latency, claim: str = "less", delta: float = 0.0,
                  level: float = 0.95) -> Comparison:
    """``a`` against ``b`` timed in the same interleaved rounds (:func:`measure`): the paired comparison of
    their log times (:func:`sepconv.evidence.compare`; ``exp`` of its mean, ``lo`` and ``hi`` is the
    geometric-mean latency ratio ``a / b`` and its interval at ``level``). The default claim: ``a`` is faster."""
    return compare([math.log(t) for t in a.samples], [math.log(t) for t in b.samples], claim, delta, level)


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """``torch.set_num_threads(n)`` for the block, the previous count restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _eager(channels_last: bool):
    def build(net: nn.Module, x: torch.Tensor, threads: int, tmp: Path) -> Callable[[], object]:
        if channels_last:
            net, x = net.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)

        def call():
            with torch.inference_mode():
                return net(x)
        return call
    return build


def _compiled(net: nn.Module, x: torch.Tensor, threads: int, tmp: Path) -> Callable[[], object]:
    # every model instance compiles anew; past dynamo's default limit (8) it would silently run eager
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
    fn = torch.compile(net)

    def call():
        with torch.inference_mode():
            return fn(x)
    call()  # compiles (minutes are not latency)
    return call


def _onnxruntime(net: nn.Module, x: torch.Tensor, threads: int, tmp: Path) -> Callable[[], object]:
    path = tmp / "model.onnx"
    export_onnx(net, path, tuple(x.shape[1:]))
    session = onnx_session(path, threads)
    feed = {session.get_inputs()[0].name: x.numpy()}
    return lambda: session.run(None, feed)


@dataclass(frozen=True)
class Runtime:
    name: str
    help: str
    build: Callable[[nn.Module, torch.Tensor, int, Path], Callable[[], object]]
    for_onnx: bool = False  # runs an ONNX graph: the deploy forms for ONNX (``deployable(..., for_onnx=True)``)


RUNTIMES: dict[str, Runtime] = {r.name: r for r in (
    Runtime("torch", "PyTorch eager, NCHW", _eager(False)),
    Runtime("torch-cl", "PyTorch eager, channels_last", _eager(True)),
    Runtime("torch-compile", "torch.compile (inductor); compile time excluded", _compiled),
    Runtime("onnxruntime", "ONNX Runtime CPU, the verified ONNX export, all graph optimizations", _onnxruntime,
            for_onnx=True),
)}


def require_runtime(runtime: str) -> None:
    """Refuse, in one line naming the extra to install, a runtime whose packages are missing -- before
    any work is done (ONNX Runtime needs onnxruntime, onnx and onnxscript: ``sepconv[deploy]``)."""
    if runtime not in RUNTIMES:
        raise ConfigError(f"unknown runtime {runtime!r}; choose from {', '.join(RUNTIMES)}")
    if runtime == "onnxruntime":
        for dep in ("onnxruntime", "onnx", "onnxscript"):
            require(dep, f"--runtime {runtime}")


def runner(model: nn.Module, input_shape: Sequence[int], runtime: str = "torch", batch: int = 1, threads: int = 1,
           workdir: str | Path | None = None, seed: int = 0) -> Callable[[], object]:
    """A function running one forward pass of :func:`~sepconv.deploy.deployable` of ``model`` on a
    fixed random batch of ``(batch, *input_shape)`` in ``runtime`` (:data:`RUNTIMES`) with ``threads``
    threads (ONNX Runtime's are fixed here; for the torch runtimes call it inside
    :func:`torch_threads`). ``workdir`` holds the ONNX file (default: a temporary directory)."""
    if runtime not in RUNTIMES:
        raise ConfigError(f"unknown runtime {runtime!r}; choose from {', '.join(RUNTIMES)}")
    if not isinstance(batch, int) or batch < 1 or not isinstance(threads, int) or threads < 1:
        raise ConfigError(f"batch and threads must be positive integers, got {batch!r} and {threads!r}")
    shape = _check_shape(input_shape)
    net = deployable(model, shape, RUNTIMES[runtime].for_onnx)
    p = next(iter(net.parameters()), None)
    x = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(seed))
    if p is not None and p.is_floating_point():
        x = x.to(p.dtype)
    with contextlib.ExitStack() as stack:
        tmp = Path(workdir) if workdir is not None else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        with torch_threads(threads):
            return RUNTIMES[runtime].build(copy.deepcopy(net), x, threads, tmp)


def measure(fns: Mapping[str, Callable[[], object]], repeats: int = 30, warmup: int = 2,
            max_seconds: float = 30.0, min_repeats: int = 5) -> dict[str, Latency]:
    """Time each function of ``fns`` ``repeats`` times, interleaved (one call of each per round),
    after ``warmup`` rounds; fewer rounds (at least ``min_repeats``) when the rounds would take
    more than ``max_seconds``. Returns each one's :class:`Latency`."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(warmup):
        for f in fns.values():
            f()
    start = time.perf_counter()
    for r in range(max(repeats, 1)):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
        if r + 1 >= min_repeats and time.perf_counter() - start > max_seconds:
            break
    return {k: Latency.of(v) for k, v in times.items()}


def measure_latency(model: nn.Module, input_shape: Sequence[int], runtime: str = "torch", batch: int = 1,
                    threads: int = 1, repeats: int = 30, warmup: int = 2, max_seconds: float = 30.0) -> Latency:
    """Latency of one forward pass of ``model`` on a batch of ``(batch, *input_shape)`` in ``runtime``
    with ``threads`` threads (median and quartiles, :func:`measure`)."""
    with tempfile.TemporaryDirectory() as tmp, torch_threads(threads):
        fn = runner(model, input_shape, runtime, batch, threads, tmp)
        return measure({runtime: fn}, repeats, warmup, max_seconds)[runtime]
