"""A certified Lipschitz bound of a whole network, by propagation over its graph.

:func:`lipschitz_bound` propagates Lipschitz constants (for the Euclidean norm of one
sample) through the ``torch.fx`` graph of a model in eval mode:

* chains of linear layers with nothing nonlinear between them -- convolutions, eval-mode
  BatchNorm, pointwise convs, dropout -- are merged into one convolution
  (:func:`composite.merge_chain`) and bounded as a whole, which is exact for a DSC or BSConv
  block instead of a product of per-layer norms;
* every convolution is bounded at the input size it actually sees, by a certified method;
* composition multiplies, residual additions add, concatenation adds in quadrature, slicing,
  reshaping and channel shuffles keep the constant; pooling gets its exact constant from the
  window geometry (overlaps included); activations their true constants (Hardswish 1.5,
  SiLU 1.0998..., GELU 1.1290..., Hardsigmoid 1/6, ...);
* a product of two input-dependent tensors (squeeze-excitation gates, ``x * sigmoid(x)``
  written out) has no global Lipschitz constant; with ``input_bound`` (the largest input
  norm) it is bounded on that ball by the product rule
  ``||d(ab)|| <= sup|b| ||da|| + sup||a|| ||db||``, using the known range of gates
  (sigmoid, hardsigmoid in [0, 1]) and value bounds ``||v(x)|| <= ||v(0)|| + L_v R``;
  without it, a clear error.

* a module without parameters or buffers whose class declares ``lipschitz_constant`` (the duck-typed
  protocol of :func:`~sepconv.spectral.lipschitz_rules.declared_lipschitz`; e.g. ``MaxMin``,
  ``GroupSort``, ``L2Pool2d`` of :mod:`sepconv.lipschitz`) is kept a leaf of the graph by
  :func:`trace` and multiplies by its declared constant; a module with parameters never does --
  it is traced through and its weights are bounded here.

Any operation without a rule is a clear :class:`~sepconv.errors.UnsupportedLayerError`
naming it -- never a silent 1.
"""


from __future__ import annotations

import contextlib
import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from ..errors import ConfigError, SepconvError, UnsupportedLayerError
from ..probe import LayerStack, check_forward_memory, input_dtype
from . import composite, validate
from . import progress as spectral_progress
from .lipschitz_rules import (
    ACTIVATION_LIPSCHITZ,
    ACTIVATION_RANGE,
    ADD_OPS,
    CAT_OPS,
    DIV_OPS,
    FUNCTION_ACTIVATIONS,
    MEAN_OPS,
    METHOD_ACTIVATIONS,
    MODULE_ACTIVATIONS,
    MUL_OPS,
    SHAPE_OPS,
    declared_lipschitz,
    pad_lipschitz,
    pool_lipschitz,
)
from .methods import SpectralMethod, get_method, method_names
from .spec import ConvSpec

__all__ = ["lipschitz_bound", "trace"]


class _Tracer(torch.fx.Tracer):
    """fx's tracer, with modules that declare their Lipschitz constant (:func:`declared_lipschitz`)
    kept as leaves, so that the propagator sees them as one node."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return declared_lipschitz(m) is not None or super().is_leaf_module(m, module_qualified_name)


def trace(model: nn.Module) -> torch.fx.GraphModule:
    """``torch.fx.symbolic_trace`` (keeping modules with a declared Lipschitz constant as leaves; a
    root that is itself a leaf -- one layer, e.g. a parametrized conv -- wrapped so that it stays one)
    with a one-line error for models fx cannot trace."""
    tracer = _Tracer()
    if tracer.is_leaf_module(model, ""):
        model = nn.Sequential(model)
    try:
        graph = tracer.trace(model)
        return torch.fx.GraphModule(tracer.root, graph, type(model).__name__)
    except SepconvError:
        raise
    except Exception as e:  # fx raises many types (TraceError, TypeError, ...)
        raise UnsupportedLayerError(
            f"{type(model).__name__} cannot be traced by torch.fx "
            f"({type(e).__name__}: {' '.join(str(e).split())[:160]})"
        ) from None


class _Recorder(torch.fx.Interpreter):
    """Runs the graph once on a zero input; records each tensor node's shape and value norms."""

    def __init__(self, gm: torch.fx.GraphModule, names: LayerStack | None = None):
        super().__init__(gm)
        self.names = names
        self.extra_traceback = names is None  # errors are rewritten into one line naming the node
        self.shape: dict[torch.fx.Node, tuple[int, ...]] = {}
        self.norm2: dict[torch.fx.Node, float] = {}
        self.norminf: dict[torch.fx.Node, float] = {}
        self.minabs: dict[torch.fx.Node, float] = {}
        self.value: dict[torch.fx.Node, object] = {}

    def run_node(self, n: torch.fx.Node):
        try:
            out = super().run_node(n)
        except SepconvError:
            raise
        except Exception as e:  # noqa: BLE001 -- becomes one line naming the layer (see LayerStack)
            if self.names is None:
                raise
            raise self.names.error(e, n.name) from None
        self.value[n] = out if not isinstance(out, Tensor) else None
        if isinstance(out, Tensor) and out.is_floating_point():
            v = out.detach().to(torch.float64)
            self.shape[n] = tuple(out.shape)
            self.norm2[n] = float(v.norm())
            self.norminf[n] = float(v.abs().max()) if v.numel() else 0.0
            self.minabs[n] = float(v.abs().min()) if v.numel() else 0.0
        return out


_CHAIN_TYPES = (nn.Conv2d, nn.BatchNorm2d, nn.Identity, nn.Dropout, nn.Dropout2d)


def _is_pw(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and composite.is_unpadded_1x1(m)


def _mergeable(mods: list[nn.Module]) -> bool:
    """Whether :func:`composite.merge_chain` accepts ``mods``: pointwise (stride 1) and BatchNorm
    parts around at most one spatial-or-strided conv, after which only pointwise convs follow."""
    seen = False
    for m in mods:
        if not isinstance(m, nn.Conv2d):
            continue
        spatial = not _is_pw(m) or tuple(m.stride) != (1, 1)
        if seen and not _is_pw(m):
            return False
        seen |= spatial
    return True


@dataclass
class _Ctx:
    method: SpectralMethod  # a certified one
    tol: float
    input_bound: float | None
    max_memory: float | None = None
    where: str = "lipschitz_bound"  # the public function, named in errors
    progress: bool = False  # a progress bar over the layers bounded (stderr)



class _Propagator:
    """Lipschitz constants of every node of a traced model with respect to its input."""

    def __init__(self, model: nn.Module, input_shape: Sequence[int], ctx: _Ctx):
        self.gm = trace(model)
        self.modules = dict(self.gm.named_modules())
        self.ctx = ctx
        dtype, device = input_dtype(model)
        x = torch.zeros(1, *input_shape, dtype=dtype, device=device)
        with LayerStack(self.gm, ctx.where, input_shape) as names, torch.no_grad():
            self.rec = _Recorder(self.gm, names)
            self.rec.run(x)
        self.L: dict[torch.fx.Node, float] = {}
        self.chain_of: dict[torch.fx.Node, list[torch.fx.Node]] = {}
        self.interior: set[torch.fx.Node] = set()
        self.bounded: set[torch.fx.Node] = set()  # outputs of range-bounded activations
        self.records: list[tuple[str, str, float]] = []  # (node, what, factor) for reports
        self._find_chains()

    # ---------------------------------------------------------------- structure

    def _chainable(self, n: torch.fx.Node) -> bool:
        return (n.op == "call_module" and isinstance(self.modules[n.target], _CHAIN_TYPES)
                and not isinstance(self.modules[n.target], nn.modules.conv._ConvTransposeNd))

    def _find_chains(self) -> None:
        for n in self.gm.graph.nodes:
            if not self._chainable(n):
                continue
            prev = n.args[0] if n.args else None
            chain = [n]
            if (isinstance(prev, torch.fx.Node) and prev in self.chain_of and len(prev.users) == 1
                    and _mergeable([self.modules[c.target] for c in self.chain_of[prev] + [n]])):
                chain = self.chain_of[prev] + [n]
                self.interior.add(prev)
            self.chain_of[n] = chain

    def tick(self) -> None:
        if getattr(self, "bar", None) is not None:
            self.bar.update()

    def hw(self, n: torch.fx.Node) -> tuple[int, int]:
        return tuple(self.rec.shape[n][-2:])  # type: ignore[return-value]

    def fail(self, n: torch.fx.Node, what: str, why: str = "no Lipschitz rule") -> UnsupportedLayerError:
        return UnsupportedLayerError(f"{self.ctx.where}: cannot bound {what} (node {n.name!r}): {why}")

    # ---------------------------------------------------------------- norms

    def conv_norm(self, weight: Tensor, spec: ConvSpec, layer: str = "") -> float:
        """The certified bound of the context's method on one (merged) convolution, in float64."""
        w = weight.detach().to(torch.float64)
        method = self.ctx.method
        try:
            with spectral_progress.layer(layer if self.ctx.progress else None):  # bars inside a long layer
                return float(method.fn(w, spec, **method.caller_options(self.ctx.tol, self.ctx.max_memory)))
        except SepconvError as e:
            raise type(e)(f"{self.ctx.where}: layer {layer!r} ({spec.describe(weight.shape[-2:])}): {e}") from None

    def matrix_norm(self, weight: Tensor) -> float:
        """``||W||_2`` of a fully connected layer (float64 SVD, rounded up by a relative 1e-12)."""
        return float(torch.linalg.svdvals(weight.detach().to(torch.float64))[0]) * (1 + 1e-12)

    def chain_factor(self, chain: list[torch.fx.Node]) -> tuple[float, str]:
        mods = [self.modules[c.target] for c in chain]
        names = "+".join(type(m).__name__ for m in mods if not isinstance(m, (nn.Identity, nn.Dropout, nn.Dropout2d)))
        if any(isinstance(m, nn.Conv2d) for m in mods):
            layer = ".".join(str(c.target) for c in chain)
            try:
                weight, spec = composite.merge_chain(mods, self.hw(chain[0].args[0]))
            except SepconvError as e:
                raise type(e)(f"{self.ctx.where}: layer {layer!r}: {e}") from None
            return self.conv_norm(weight, spec, layer), names
        scale = torch.ones((), dtype=torch.float64)
        for m in mods:
            if isinstance(m, nn.BatchNorm2d):
                scale = scale * composite.batchnorm_scale(m, str(chain[0].target)).to(torch.float64)
        return float(scale.abs().max()), names or "Identity"

    # ---------------------------------------------------------------- propagation

    def arg_L(self, a) -> float:
        return self.L[a] if isinstance(a, torch.fx.Node) else 0.0

    def rep(self, a: torch.fx.Node, out: torch.fx.Node) -> float:
        """Broadcast replication of ``a`` in ``out`` (each value of ``a`` copied this many times)."""
        na, no = math.prod(self.rec.shape.get(a, (1,))), math.prod(self.rec.shape.get(out, (1,)))
        return max(1.0, no / max(1, na))

    def sup2(self, a: torch.fx.Node) -> float:
        """``sup ||a(x)||_2`` over inputs with ``||x|| <= input_bound``."""
        return self.rec.norm2[a] + self.L[a] * self.ctx.input_bound  # type: ignore[operator]

    def supinf(self, a: torch.fx.Node) -> float:
        bound = self.sup2(a) if self.L[a] > 0 else self.rec.norminf[a]
        if a in self.bounded:
            bound = min(bound, self.bounded_range[a])
        return bound

    def run(self) -> float:
        self.bounded_range: dict[torch.fx.Node, float] = {}
        placeholders = [n for n in self.gm.graph.nodes if n.op == "placeholder"]
        if len(placeholders) != 1:
            raise UnsupportedLayerError(f"{self.ctx.where}: the model must take one input tensor, "
                                        f"it takes {len(placeholders)}")
        bar = None
        if self.ctx.progress:
            layers = [n for n in self.chain_of if n not in self.interior]
            layers += [n for n in self.gm.graph.nodes if n.op == "call_module" and n not in self.chain_of
                       and isinstance(self.modules[n.target], nn.Linear)]
            bar = tqdm(total=len(layers), desc=self.ctx.where, unit="layer", leave=False)
        self.bar = bar
        try:
            return self._walk()
        finally:
            if bar is not None:
                bar.close()
            self.bar = None

    def _walk(self) -> float:
        out = 0.0
        for n in self.gm.graph.nodes:
            if n in self.interior:
                continue
            if n.op == "placeholder":
                self.L[n] = 1.0
            elif n.op == "get_attr":
                self.L[n] = 0.0
            elif n.op == "output":
                res = n.args[0]
                if isinstance(res, torch.fx.Node):
                    out = self.L[res]
                elif isinstance(res, (tuple, list)) and all(isinstance(r, torch.fx.Node) for r in res):
                    out = sum(self.L[r] ** 2 for r in res) ** 0.5
                else:
                    raise self.fail(n, "the model output", "expected a tensor or a tuple of tensors")
            elif n.op == "call_module":
                self.L[n] = self._module(n)
            else:
                self.L[n] = self._function(n)
        return out

    def _module(self, n: torch.fx.Node) -> float:
        mod = self.modules[n.target]
        name = f"module {n.target!r} ({type(mod).__name__})"
        if n in self.chain_of:
            chain = self.chain_of[n]
            factor, what = self.chain_factor(chain)
            self.tick()
            self.records.append((".".join(str(c.target) for c in chain), what, factor))
            return self.arg_L(chain[0].args[0]) * factor
        x = n.args[0] if n.args else None
        Lx = self.arg_L(x)
        if isinstance(mod, nn.Linear):
            factor = self.matrix_norm(mod.weight)
            self.tick()
            self.records.append((str(n.target), "Linear", factor))
            return Lx * factor
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            factor = float(composite.batchnorm_lipschitz(mod, str(n.target)))
            self.records.append((str(n.target), type(mod).__name__, factor))
            return Lx * factor
        for cls, key in MODULE_ACTIVATIONS.items():
            if type(mod) is cls:
                if key in ACTIVATION_RANGE:
                    self.bounded.add(n)
                    self.bounded_range[n] = ACTIVATION_RANGE[key]
                return Lx * ACTIVATION_LIPSCHITZ[key]
        if isinstance(mod, nn.LeakyReLU):
            return Lx * max(1.0, abs(mod.negative_slope))
        if isinstance(mod, nn.ELU):
            return Lx * max(1.0, mod.alpha)
        if isinstance(mod, nn.PReLU):
            return Lx * max(1.0, float(mod.weight.detach().abs().max()))
        if isinstance(mod, (nn.Flatten, nn.Unflatten, nn.ChannelShuffle)):
            return Lx
        if isinstance(mod, (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
            kind = {nn.MaxPool2d: "max", nn.AvgPool2d: "avg", nn.AdaptiveAvgPool2d: "adaptive_avg",
                    nn.AdaptiveMaxPool2d: "adaptive_max"}[type(mod)]
            kw = {}
            if kind == "max":
                kw = dict(kernel=mod.kernel_size, stride=mod.stride, padding=mod.padding, dilation=mod.dilation)
            elif kind == "avg":
                kw = dict(kernel=mod.kernel_size, stride=mod.stride, padding=mod.padding,
                          count_include_pad=mod.count_include_pad, divisor_override=mod.divisor_override)
            return Lx * pool_lipschitz(kind, self.hw(x), self.hw(n), **kw)
        declared = declared_lipschitz(mod)
        if declared is not None:
            return Lx * declared
        raise self.fail(n, name)

    def _function(self, n: torch.fx.Node) -> float:
        t = n.target
        what = f"{'method' if n.op == 'call_method' else 'function'} {getattr(t, '__name__', t)!r}"
        if n not in self.rec.shape:  # not a floating-point tensor
            val = self.rec.value.get(n)
            if isinstance(val, (tuple, list)) and any(isinstance(v, Tensor) for v in val):  # chunk / split parts
                if t in SHAPE_OPS:
                    return self.arg_L(n.args[0])
                raise self.fail(n, what)
            return 0.0  # sizes and shape arithmetic: constants
        args = n.args
        x = args[0] if args else None
        act = FUNCTION_ACTIVATIONS.get(t) if callable(t) else METHOD_ACTIVATIONS.get(t)  # type: ignore[arg-type]
        if act is not None:
            if act in ACTIVATION_RANGE:
                self.bounded.add(n)
                self.bounded_range[n] = ACTIVATION_RANGE[act]
            return self.arg_L(x) * ACTIVATION_LIPSCHITZ[act]
        if t in (F.leaky_relu, "leaky_relu"):
            slope = args[1] if len(args) > 1 else n.kwargs.get("negative_slope", 0.01)
            return self.arg_L(x) * max(1.0, abs(slope))
        if t in (F.elu, "elu"):
            return self.arg_L(x) * max(1.0, args[1] if len(args) > 1 else n.kwargs.get("alpha", 1.0))
        if t in ADD_OPS:
            alpha = abs(n.kwargs.get("alpha", 1.0))
            terms = [a for a in list(args) + [n.kwargs.get("other")] if isinstance(a, torch.fx.Node)]
            return sum(self.L[a] * math.sqrt(self.rep(a, n)) * (alpha if i == 1 else 1.0) for i, a in enumerate(terms))
        if t in MUL_OPS:
            return self._product(n, args[0], args[1] if len(args) > 1 else n.kwargs.get("other"))
        if t in DIV_OPS:
            a, b = args[0], args[1] if len(args) > 1 else n.kwargs.get("other")
            if isinstance(b, torch.fx.Node) and self.L[b] > 0:
                raise self.fail(n, what, "division by an input-dependent tensor")
            denom = abs(b) if not isinstance(b, torch.fx.Node) else self.rec.minabs[b]
            if denom == 0:
                raise self.fail(n, what, "division by a value that can be zero")
            return self.arg_L(a) * math.sqrt(self.rep(a, n) if isinstance(a, torch.fx.Node) else 1) / denom
        if t in CAT_OPS:
            parts = args[0] if args else n.kwargs.get("tensors")
            return sum(self.arg_L(a) ** 2 for a in parts) ** 0.5
        if t is operator.getitem:
            if isinstance(x, torch.fx.Node) and x not in self.rec.shape:  # element of chunk/split
                return self.arg_L(x)
            idx = args[1] if isinstance(args[1], tuple) else (args[1],)
            if all(i is None or i is Ellipsis or isinstance(i, (int, slice)) for i in idx):
                return self.arg_L(x)
            raise self.fail(n, what, "advanced indexing can repeat elements")
        if t in SHAPE_OPS:
            return self.arg_L(x)
        if t in MEAN_OPS or t in (torch.sum, "sum"):
            k = math.prod(self.rec.shape[x]) / max(1, math.prod(self.rec.shape[n]))
            return self.arg_L(x) * (1 / math.sqrt(k) if t in MEAN_OPS else math.sqrt(k))
        pools = {F.adaptive_avg_pool2d: "adaptive_avg", F.adaptive_max_pool2d: "adaptive_max",
                 F.avg_pool2d: "avg", F.max_pool2d: "max"}
        if t in pools:
            kind = pools[t]
            names = {"max": ["kernel", "stride", "padding", "dilation"],
                     "avg": ["kernel", "stride", "padding", "ceil_mode", "count_include_pad",
                             "divisor_override"]}.get(kind, [])
            kw = dict(zip(names, args[1:]))
            kw.update({("kernel" if k == "kernel_size" else k): v for k, v in n.kwargs.items()
                       if k in names + ["kernel_size"]})
            kw.pop("ceil_mode", None)
            return self.arg_L(x) * pool_lipschitz(kind, self.hw(x), self.hw(n), **kw)
        if t is F.pad:
            pad = args[1] if len(args) > 1 else n.kwargs["pad"]
            mode = args[2] if len(args) > 2 else n.kwargs.get("mode", "constant")
            return self.arg_L(x) * pad_lipschitz(self.rec.shape[x], pad, mode)
        if t is F.linear:
            w = args[1]
            if not (isinstance(w, torch.fx.Node) and w.op == "get_attr"):
                raise self.fail(n, what, "the weight is not a fixed parameter")
            weight = self.gm.get_parameter(w.target) if "." in w.target or hasattr(self.gm, w.target) else None
            return self.arg_L(x) * self.matrix_norm(weight)
        raise self.fail(n, what)

    def _product(self, n: torch.fx.Node, a, b) -> float:
        dep = [v for v in (a, b) if isinstance(v, torch.fx.Node) and self.L[v] > 0]
        if not dep:
            return 0.0
        if len(dep) == 1:
            d = dep[0]
            other = b if d is a else a
            c = abs(other) if not isinstance(other, torch.fx.Node) else self.rec.norminf[other]
            return c * self.L[d] * math.sqrt(self.rep(d, n))
        if self.ctx.input_bound is None:
            raise self.fail(n, "the product of two input-dependent tensors",
                            "it has no global Lipschitz constant; pass input_bound=R to bound it for inputs "
                            "with ||x|| <= R")
        # d(ab) = da * b(x) + a(y) * db, bounded either way round; broadcast copies enter once
        one = (self.supinf(b) * self.L[a] * math.sqrt(self.rep(a, n))
               + self.sup2(a) * math.sqrt(self.rep(a, n)) * self.L[b])
        two = (self.supinf(a) * self.L[b] * math.sqrt(self.rep(b, n))
               + self.sup2(b) * math.sqrt(self.rep(b, n)) * self.L[a])
        return min(one, two)



def lipschitz_bound(model: nn.Module, input_shape: Sequence[int], method: str = "upper", tol: float = 1e-3,
                    input_bound: float | None = None, max_memory: float | None = None, progress: bool = False) -> float:
    """A **certified upper bound** on the Lipschitz constant of ``model`` (l2, one sample of
    ``input_shape = (C, H, W)``), in eval mode, by propagation over its ``torch.fx`` graph: the
    composition bound of Szegedy et al. 2014 (arXiv 1312.6199, Sec. 4.3) with the refinements
    of the module docstring.

    Linear chains (conv, BatchNorm, pointwise conv) are merged before they are bounded;
    convolutions are bounded at the input size they see by ``method``, any ``certified`` method
    of the registry (:func:`sepconv.spectral.method_names`): ``upper`` (the tightest certified
    bound, :func:`sepconv.spectral.norm_bracket`'s upper end at relative ``tol``), ``fft``,
    ``gram``, ``fantastic4``, or one registered by :func:`~sepconv.spectral.register_method`
    (``tol`` reaches those whose entry ``uses_tol``). ``input_bound`` (``R``) is needed only for
    products of two input-dependent tensors (squeeze-excitation): the bound then holds on
    the ball ``||x|| <= R``. The model's train/eval mode is restored afterwards.

    Validated before any work: the input shape (positive ints; a wrong channel count or an
    input smaller than a kernel is a :class:`~sepconv.errors.ConfigError` naming the layer),
    ``0 < tol < 1``, the method, a finite ``input_bound > 0``, finite weights and BatchNorm
    statistics in every layer (:func:`sepconv.guard.check_finite`); the dry forward pass is
    estimated on the meta device and refused above ``max_memory`` bytes (default 2 GiB), which
    also bounds each layer's computation. ``progress=True`` shows a bar over the layers (stderr), and
    bars inside a layer whose search runs long (:mod:`sepconv.spectral.progress`).
    A conv whose bracket was just searched (by :func:`~sepconv.spectral.analyze` at the same
    ``tol``, say) is not searched again, nor is a multiple of it (a conv times a uniform BatchNorm
    scale): :class:`sepconv.spectral.bracketing._Recent`.
    """
    with evaluating(model):
        L = propagator(model, input_shape, method, tol, input_bound, max_memory, "lipschitz_bound",
                       progress=progress).run()
    validate.finite_result(L, "lipschitz_bound")
    return L


def propagator(model: nn.Module, input_shape: Sequence[int], method: str, tol: float, input_bound: float | None,
               max_memory: float | None, where: str, cls: type[_Propagator] | None = None,
               progress: bool = False) -> _Propagator:
    """The validated arguments of :func:`lipschitz_bound` (as ``where``) and a propagator of class
    ``cls`` on the traced model, its shapes recorded by one pass on zeros; nothing bounded yet.
    Call it and bound inside :func:`evaluating` (a parametrized weight may change when read in
    training mode)."""
    validate.model(model, where)
    shape = validate.shape(input_shape, where, dims=(3, 4))[-3:]
    certified = method_names(kind="certified")
    if method not in certified:
        raise ConfigError(f"{where}: method must be one of {', '.join(map(repr, certified))}, got {method!r}")
    tol = validate.tolerance(tol, where)
    if input_bound is not None:
        input_bound = validate.positive(input_bound, where, "input_bound")
    validate.budget(max_memory)
    # copies: the activations plus the float64 copy of each node's value (the recorder's norms)
    check_forward_memory(model, shape, where, validate.budget(max_memory), copies=3.0)
    ctx = _Ctx(get_method(method, where), tol, input_bound, max_memory, where, bool(progress))
    return (cls or _Propagator)(model, shape, ctx)


@contextlib.contextmanager
def evaluating(model: nn.Module):
    """``model`` in eval mode inside the block, its train/eval mode restored afterwards (anything
    else passes through, for :func:`propagator` to refuse with its one-line error)."""
    if not isinstance(model, nn.Module):
        yield model
        return
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)
