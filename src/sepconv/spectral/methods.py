"""The spectral method registry: every way of computing a convolution's spectral norm, by name.

One entry per method (:class:`SpectralMethod`): its function, called ``fn(weight, spec, **options)``
and returning a 0-dim tensor; its **kind** -- ``exact`` (the true largest singular value, within a
tolerance), ``certified`` (a mathematical upper bound), ``estimate`` (e.g. power iteration, from
below) or ``heuristic`` (torch's reshape value, neither) -- whether it needs the input size
(``spec.in_size``), whether it is differentiable (usable inside training), and one line saying
what it is. Every consumer reads the registry, so adding a bound is one :func:`register_method`
call:

* :func:`spectral_norm` -- any method, by name;
* :func:`sepconv.spectral.analyze` -- every method, per layer (``sepconv spectrum --method``);
* :func:`sepconv.spectral.lipschitz_bound` -- the ``certified`` ones as per-layer bounds
  (``sepconv spectrum --bound``);
* :func:`sepconv.normalize.spectral_normalize` -- the differentiable ``exact`` and ``certified``
  ones as ``method`` or ``full_conv`` (``sepconv train --sn``).

The built-in methods are registered at the end of this module, in one place (the math of each is
in docs/spectral.md: Sec. 1 exact values, 2 and 5 the circulant-embedding bound, 3 power
iteration, 4 Gram iteration, 6 Fantastic Four, 8 torch's reshape value).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from torch import Tensor

from ..errors import ConfigError
from . import bounds, exact, iterative, validate
from .spec import ConvSpec

__all__ = ["KINDS", "SpectralMethod", "get_method", "keywords", "method_names", "power_estimate", "register_method",
           "reshape_value", "spectral_norm", "unregister_method"]

#: The kinds of value a method computes, from the strongest guarantee to none.
KINDS = ("exact", "certified", "estimate", "heuristic")


@dataclass(frozen=True)
class SpectralMethod:
    """One registered way of computing the spectral norm of a convolution ``(weight, spec)``.

    ``fn(weight, spec, **options) -> Tensor`` (0-dim); ``options`` the keywords it takes;
    ``kind`` one of :data:`KINDS`; ``needs_in_size`` whether the value depends on
    ``spec.in_size``; ``differentiable`` whether gradients flow to the weight (usable in
    training: spectral normalization, penalties); ``uses_tol`` whether callers that own a
    relative tolerance (:func:`~sepconv.spectral.analyze`, :func:`~sepconv.spectral.lipschitz_bound`)
    pass theirs as ``tol`` (``False``: the method keeps its own accuracy, as the cheap bounds do);
    ``train_options`` keywords used when it runs inside training (e.g. a looser ``tol``).
    """

    name: str
    fn: Callable[..., Tensor]
    kind: str
    needs_in_size: bool
    differentiable: bool
    description: str
    options: tuple[str, ...] = ()
    uses_tol: bool = False
    train_options: Mapping[str, object] = field(default_factory=dict, compare=False)

    def caller_options(self, tol: float | None = None, max_memory: float | None = None) -> dict[str, float]:
        """The keywords a caller passes along: its relative ``tol`` only when :attr:`uses_tol`, its
        memory budget ``max_memory`` only when the method takes one (how
        :func:`~sepconv.spectral.analyze` and :func:`~sepconv.spectral.lipschitz_bound` call it)."""
        options: dict[str, float] = {}
        if tol is not None and self.uses_tol:
            options["tol"] = tol
        if max_memory is not None and "max_memory" in self.options:
            options["max_memory"] = max_memory
        return options


_METHODS: dict[str, SpectralMethod] = {}


def keywords(fn: Callable) -> tuple[str, ...]:
    """The keyword options of a method function: its parameters after ``(weight, spec)``."""
    params = list(inspect.signature(fn).parameters.values())[2:]
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return tuple(p.name for p in params if p.kind in named)


def register_method(name: str, fn: Callable[..., Tensor] | None = None, *, kind: str, needs_in_size: bool = True,
                    differentiable: bool = False, description: str = "", options: Iterable[str] | None = None,
                    uses_tol: bool = False, train_options: Mapping[str, object] | None = None,
                    replace: bool = False):
    """Register ``fn`` as the spectral method ``name`` (see :class:`SpectralMethod` for the fields).

    A call (``register_method("toy", fn, kind="certified")``) returns the entry; without ``fn`` it is
    a decorator returning the function unchanged. ``options`` defaults to the keyword parameters
    of ``fn`` after ``(weight, spec)``. Registering a name already taken is a
    :class:`~sepconv.errors.ConfigError` unless ``replace=True`` (the entry keeps its place in the
    order of :func:`method_names`). A ``certified`` method must be a mathematical upper bound on
    the largest singular value for every geometry it accepts: :func:`~sepconv.spectral.lipschitz_bound`
    certifies networks with it.
    """
    if fn is None:
        def decorate(f: Callable[..., Tensor]) -> Callable[..., Tensor]:
            register_method(name, f, kind=kind, needs_in_size=needs_in_size, differentiable=differentiable,
                            description=description, options=options, uses_tol=uses_tol,
                            train_options=train_options, replace=replace)
            return f

        return decorate
    if not (isinstance(name, str) and name.isidentifier()):
        raise ConfigError(f"register_method: a method name must be an identifier (a command-line choice), got {name!r}")
    if kind not in KINDS:
        raise ConfigError(f"register_method: kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if not callable(fn):
        raise ConfigError(f"register_method: fn must be callable, got {type(fn).__name__}")
    if name in _METHODS and not replace:
        raise ConfigError(f"register_method: method {name!r} is already registered (pass replace=True to replace it)")
    entry = SpectralMethod(name, fn, kind, bool(needs_in_size), bool(differentiable), description,
                           tuple(options) if options is not None else keywords(fn), bool(uses_tol),
                           MappingProxyType(dict(train_options or {})))
    _METHODS[name] = entry
    return entry


def unregister_method(name: str) -> SpectralMethod:
    """Remove the method ``name`` (for tests); returns its entry."""
    get_method(name, "unregister_method")
    return _METHODS.pop(name)


def get_method(name: str, where: str = "spectral_norm") -> SpectralMethod:
    """The entry of method ``name``; an unknown name is a :class:`~sepconv.errors.ConfigError` from
    ``where`` listing the known ones."""
    entry = _METHODS.get(name) if isinstance(name, str) else None
    if entry is None:
        raise ConfigError(f"{where}: unknown method {name!r}; choose one of {', '.join(_METHODS)}")
    return entry


def method_names(kind: str | Iterable[str] | None = None, differentiable: bool | None = None) -> tuple[str, ...]:
    """Names of the registered methods, in registration order: all of them, or those of ``kind`` (one
    kind or several) and/or with the given ``differentiable``."""
    kinds = (kind,) if isinstance(kind, str) else tuple(kind) if kind is not None else KINDS
    return tuple(m.name for m in _METHODS.values()
                 if m.kind in kinds and (differentiable is None or m.differentiable == differentiable))


def spectral_norm(weight: Tensor, spec: ConvSpec, method: str = "exact", **kw) -> Tensor:
    """Spectral norm of the convolution ``(weight, spec)`` by the registered ``method``, a 0-dim tensor.

    The built-in methods:

    * ``exact`` -- the true largest singular value within ``tol`` (:func:`~sepconv.spectral.exact_norm`);
    * ``upper`` -- the tightest certified upper bound available (:func:`~sepconv.spectral.exact.upper_bound`);
    * ``fft`` -- certified upper bound by circular embedding (exact for circular padding;
      :func:`~sepconv.spectral.fft_bound`);
    * ``gram`` -- certified upper bound by Gram iteration, Delattre et al. 2023
      (:func:`~sepconv.spectral.gram_iteration`, ``iters``);
    * ``fantastic4`` -- certified upper bound of Singla & Feizi 2021 (:func:`~sepconv.spectral.fantastic_four`);
    * ``power`` -- operator power iteration, an estimate from below (:func:`~sepconv.spectral.power_iteration`,
      ``iters``, ``x``);
    * ``reshape`` -- torch's ``spectral_norm`` value, neither a bound nor exact
      (:func:`~sepconv.spectral.reshape_norm`).

    :func:`method_names` lists every registered one. Keywords go to the method's function (an
    unknown one is a :class:`~sepconv.errors.ConfigError`); ``max_memory`` (bytes, default 2 GiB)
    bounds the memory of ``exact``, ``upper``, ``fft``, ``gram`` and ``power``. Half/bfloat16
    weights are computed in float32 and the result is float32.
    """
    entry = get_method(method)
    weight, _ = validate.conv_weight(weight, spec, "spectral_norm")
    bad = [k for k in kw if k not in entry.options]
    if bad:
        raise ConfigError(f"spectral_norm: method {method!r} takes no argument {bad[0]!r} "
                          f"(it takes {', '.join(entry.options) or 'no options'})")
    out = entry.fn(weight, spec, **kw)
    validate.finite_result(out, f"spectral_norm (method {method!r})")
    return out


# --------------------------------------------------------------------------- the built-in methods


def power_estimate(weight: Tensor, spec: ConvSpec, **options) -> Tensor:
    """``sigma`` of :func:`~sepconv.spectral.power_iteration` (its vector dropped): an **estimate from
    below** by operator power iteration (Gouk et al. 2018, arXiv 1804.04368)."""
    return iterative.power_iteration(weight, spec, **options)[0]


def reshape_value(weight: Tensor, spec: ConvSpec) -> Tensor:
    """:func:`~sepconv.spectral.reshape_norm` of the weight (the geometry plays no part): torch's
    ``spectral_norm`` value, **neither a bound nor exact** (docs/spectral.md Sec. 8)."""
    return bounds.reshape_norm(weight)


# NB: the order here is the order of every listing (method_names, the CLI's choices, analyze's columns).
register_method("exact", exact.exact_norm, kind="exact", differentiable=True, uses_tol=True,
                description="the largest singular value within tol: FFT, dense SVD or a certified bracket")
register_method("upper", exact.upper_bound, kind="certified", uses_tol=True,
                description="the tightest certified bound available: the upper end of norm_bracket")
# NB: in training the fft bound's block maximum is certified to 1e-4 relative, not 1e-6: the bound
# stays certified (fft_bound rounds it up by the tolerance) and each step is cheaper.
register_method("fft", bounds.fft_bound, kind="certified", differentiable=True, train_options={"tol": 1e-4},
                description="circular-embedding bound (exact for circular padding)")
register_method("gram", bounds.gram_iteration, kind="certified", differentiable=True,
                description="Gram iteration bound on the circulant majorant (Delattre et al. 2023)")
register_method("fantastic4", bounds.fantastic_four, kind="certified", needs_in_size=False, differentiable=True,
                description="smallest of the four reshape bounds (Singla & Feizi 2021)")
register_method("power", power_estimate, kind="estimate", differentiable=True,
                options=keywords(iterative.power_iteration),
                description="operator power iteration, an estimate from below")
register_method("reshape", reshape_value, kind="heuristic", needs_in_size=False, differentiable=True,
                description="torch's spectral_norm value (kernel reshaped to a matrix), neither bound nor exact")
