"""Per-layer spectral analysis of a network, and the whole-network tools under their old names.

:func:`analyze` computes, for every ``Conv2d`` and ``Linear`` of a model at the input size it
sees, the spectral norm by each registered method (:mod:`sepconv.spectral.methods`). The
network Lipschitz bound lives in :mod:`sepconv.spectral.lipschitz` (its rules for parameter-free
operations in :mod:`sepconv.spectral.lipschitz_rules`), the margin certificates in
:mod:`sepconv.spectral.certificates`; they are re-exported here, where they used to live.

``ANALYZE_METHODS`` and ``BOUND_METHODS`` are read from the registry when accessed
(:func:`~sepconv.spectral.methods.method_names`: all methods, the certified ones), so a method
registered at run time is in them.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm import tqdm

from ..errors import ConfigError, SepconvError
from ..probe import dry_forward
from . import exact, validate
from . import progress as spectral_progress
from .certificates import Certificate, certified_accuracy, certified_radii
from .lipschitz import lipschitz_bound, trace
from .lipschitz_rules import ACTIVATION_LIPSCHITZ, ACTIVATION_RANGE, pad_lipschitz, pool_lipschitz
from .methods import get_method, method_names, spectral_norm
from .spec import ConvSpec

__all__ = ["ACTIVATION_LIPSCHITZ", "ACTIVATION_RANGE", "Certificate", "LayerRecord", "analyze", "certified_accuracy",
           "certified_radii", "layer_inputs", "lipschitz_bound", "pad_lipschitz", "pool_lipschitz", "trace",
           "ANALYZE_METHODS", "BOUND_METHODS"]  # noqa: F822 -- these two come from __getattr__ (the registry)


def __getattr__(name: str) -> tuple[str, ...]:
    if name == "ANALYZE_METHODS":  # every registered method
        return method_names()
    if name == "BOUND_METHODS":  # the certified ones: lipschitz_bound's per-layer bounds
        return method_names(kind="certified")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass
class LayerRecord:
    """One layer of :func:`analyze`: its name, type, geometry, a value and a time per method, and --
    where ``exact`` or ``upper`` was asked -- what certified the upper end (``certified_by``, as
    :attr:`~sepconv.spectral.Bracket.how`: ``cholesky``, ``circulant``, ``pointwise`` and ``dense``
    certify the norm within ``tol``; ``majorant`` and ``fantastic4`` are wider bounds)."""

    name: str
    kind: str
    geometry: str
    values: dict[str, float] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    certified_by: str | None = None



def layer_inputs(model: nn.Module, input_shape: Sequence[int], types=(nn.Conv2d, nn.Linear),
                 max_memory: float | None = None) -> dict[str, tuple[nn.Module, tuple[int, ...]]]:
    """``{name: (module, input shape)}`` for the modules of ``types``, from one eval-mode forward pass
    on zeros of ``(1, *input_shape)``. The pass is estimated first on the meta device and refused
    (:class:`~sepconv.errors.ResourceError`) above ``max_memory`` bytes (default 2 GiB); an input
    the model cannot take is a :class:`~sepconv.errors.ConfigError` naming the layer."""
    input_shape = validate.shape(input_shape, "layer_inputs", dims=(1, 2, 3, 4))
    return dry_forward(model, input_shape, record=tuple(types), where="layer_inputs",
                       budget=validate.budget(max_memory)).inputs


def analyze(model: nn.Module, input_shape: Sequence[int], methods: Iterable[str] | None = None,
            tol: float = 1e-4, progress: bool = False, max_memory: float | None = None) -> list[LayerRecord]:
    """Per-layer spectral norms of every ``Conv2d`` and ``Linear`` of ``model`` at the input sizes
    they see for one input of ``input_shape = (C, H, W)``: one :class:`LayerRecord` each.

    ``methods`` (default: every registered one, :func:`~sepconv.spectral.method_names`): ``exact``
    (the lower end of the certified bracket -- exact within ``tol`` when certified) and ``upper``
    (its upper end: the tightest certified bound), both from one bracket per layer, and every
    other method of the registry through :func:`sepconv.spectral.spectral_norm` (``fft``,
    ``gram``, ``fantastic4``: certified; ``power``: an estimate from below; ``reshape``: torch's
    value; ``tol`` reaches those whose entry ``uses_tol``). Linear layers: the exact matrix norm
    for every method.

    Validated before any work like :func:`lipschitz_bound` (input shape, ``0 < tol < 1``, finite
    weights and BatchNorm statistics in every layer); the dry forward pass and each layer's
    computation stay within ``max_memory`` bytes (default 2 GiB), and a layer's error names it.
    ``progress=True``: a bar over the layers, and inside a layer whose search runs long, bars over
    its LOBPCG iterations and its certificate's block rows (stderr; :mod:`sepconv.spectral.progress`).
    """
    where = "analyze"
    known = method_names()
    methods = known if methods is None else (methods,) if isinstance(methods, str) else tuple(methods)
    bad = [m for m in methods if m not in known]
    if bad or not methods:
        raise ConfigError(f"analyze: unknown methods {bad or '(none given)'}; choose from {', '.join(known)}")
    tol = validate.tolerance(tol, where)
    validate.model(model, where)
    shape = validate.shape(input_shape, where, dims=(1, 2, 3, 4))[-3:]
    try:
        layers = layer_inputs(model, shape, max_memory=max_memory)
    except SepconvError as e:
        raise type(e)(str(e).replace("layer_inputs:", "analyze:", 1)) from None
    items = list(layers.items())
    if progress:
        items = tqdm(items, desc="layers", unit="layer")
    records = []
    for name, (mod, shape) in items:
        try:
            with spectral_progress.layer(name if progress else None):  # bars inside a long layer
                records.append(_analyze_layer(name, mod, shape, methods, tol, max_memory))
        except SepconvError as e:
            raise type(e)(f"analyze: layer {name!r} ({type(mod).__name__}): {e}") from None
    return records


def _analyze_layer(name: str, mod: nn.Module, shape: tuple[int, ...], methods: tuple[str, ...], tol: float,
                   max_memory: float | None) -> LayerRecord:
    w = mod.weight.detach().to(torch.float64)
    if isinstance(mod, nn.Linear):
        validate.check_memory(3 * w.numel() * 8, f"the SVD of the {tuple(w.shape)} weight", max_memory)
        t = time.perf_counter()
        v = float(torch.linalg.svdvals(w)[0])
        dt = time.perf_counter() - t
        return LayerRecord(name, "Linear", f"{mod.in_features}->{mod.out_features}",
                           {m: v for m in methods}, {m: dt for m in methods},
                           "dense" if {"exact", "upper"} & set(methods) else None)
    spec = ConvSpec.of(mod, shape[-2:])
    rec = LayerRecord(name, "Conv2d", f"{mod.in_channels}->{mod.out_channels} {spec.describe(mod.kernel_size)}")
    # NB: "exact" and "upper" are the two ends of one certified bracket: computed once for both
    if "exact" in methods or "upper" in methods:
        t = time.perf_counter()
        br = exact.bracket(w, spec, tol=tol, max_memory=max_memory)
        dt = time.perf_counter() - t
        rec.certified_by = br.how
        for m, v in (("exact", br.lower), ("upper", br.upper)):
            if m in methods:
                rec.values[m], rec.seconds[m] = v, dt
    for m in methods:
        if m in ("exact", "upper"):
            continue
        t = time.perf_counter()
        options = get_method(m, "analyze").caller_options(tol, max_memory)
        rec.values[m] = float(spectral_norm(w, spec, m, **options))
        rec.seconds[m] = time.perf_counter() - t
    return rec
