"""Whole networks: per-layer analysis, a certified Lipschitz bound, certified accuracy.

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

Any operation without a rule is a clear :class:`~sepconv.errors.UnsupportedLayerError`
naming it -- never a silent 1.
"""

from __future__ import annotations

import math
import operator
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn

from .. import guard
from ..errors import ConfigError, SepconvError, UnsupportedLayerError
from ..probe import LayerStack, check_forward_memory, dry_forward, input_dtype
from . import bounds, composite, exact, validate
from .spec import ConvSpec

# --------------------------------------------------------------------------- constants

#: Lipschitz constants (sup |f'|) of elementwise activations. Piecewise-linear ones are exact;
#: the smooth ones are the maximum of |f'| (found where f'' = 0) rounded *up* in the 4th digit:
#: GELU Phi(sqrt 2) + sqrt 2 phi(sqrt 2) = 1.12899 (tanh form 1.12900), SiLU 1.09984 at
#: x = 2.3994, Mish 1.08850, SELU scale * alpha = 1.75810, Hardswish (2x + 3)/6 at x = 3 = 1.5.
ACTIVATION_LIPSCHITZ: dict[str, float] = {
    "relu": 1.0, "relu6": 1.0, "hardtanh": 1.0, "tanh": 1.0, "identity": 1.0, "dropout": 1.0,
    "softplus": 1.0, "celu": 1.0, "softsign": 1.0, "softmax": 1.0,
    "sigmoid": 0.25, "hardsigmoid": 1 / 6, "hardswish": 1.5,
    "gelu": 1.1291, "silu": 1.0999, "mish": 1.0886, "selu": 1.7582,
}
#: Output ranges of bounded activations (used for gates in products).
ACTIVATION_RANGE: dict[str, float] = {"sigmoid": 1.0, "hardsigmoid": 1.0, "tanh": 1.0, "relu6": 6.0, "softmax": 1.0}

_MODULE_ACT = {
    nn.ReLU: "relu", nn.ReLU6: "relu6", nn.Hardtanh: "hardtanh", nn.Tanh: "tanh", nn.Identity: "identity",
    nn.Softplus: "softplus", nn.CELU: "celu", nn.Softsign: "softsign", nn.Softmax: "softmax",
    nn.Sigmoid: "sigmoid", nn.Hardsigmoid: "hardsigmoid", nn.Hardswish: "hardswish", nn.GELU: "gelu",
    nn.SiLU: "silu", nn.Mish: "mish", nn.SELU: "selu", nn.Dropout: "dropout", nn.Dropout2d: "dropout",
    nn.AlphaDropout: "dropout",
}
_FUNC_ACT = {
    F.relu: "relu", torch.relu: "relu", F.relu6: "relu6", F.hardtanh: "hardtanh", torch.tanh: "tanh",
    F.tanh: "tanh", F.softplus: "softplus", F.celu: "celu", F.softsign: "softsign", F.softmax: "softmax",
    torch.softmax: "softmax", torch.sigmoid: "sigmoid", F.sigmoid: "sigmoid", F.hardsigmoid: "hardsigmoid",
    F.hardswish: "hardswish", F.gelu: "gelu", F.silu: "silu", F.mish: "mish", F.selu: "selu",
    F.dropout: "dropout", F.dropout2d: "dropout", F.relu_: "relu",
}
_METHOD_ACT = {"relu": "relu", "relu_": "relu", "sigmoid": "sigmoid", "tanh": "tanh", "softmax": "softmax"}

_ADD = {operator.add, operator.iadd, torch.add, operator.sub, operator.isub, torch.sub, "add", "add_", "sub", "sub_"}
_MUL = {operator.mul, operator.imul, torch.mul, "mul", "mul_"}
_DIV = {operator.truediv, operator.itruediv, torch.div, torch.true_divide, "div", "div_", "true_divide"}
_CAT = {torch.cat, torch.concat, torch.stack, torch.concatenate}
_SHAPE_ONLY = {
    torch.flatten, torch.reshape, torch.permute, torch.transpose, torch.squeeze, torch.unsqueeze, torch.t,
    torch.chunk, torch.split, torch.tensor_split, torch.unbind, torch.channel_shuffle, torch.swapaxes,
    torch.movedim, torch.narrow, F.channel_shuffle, operator.neg, torch.neg, torch.clone,
    "flatten", "view", "reshape", "permute", "transpose", "contiguous", "squeeze", "unsqueeze", "chunk",
    "split", "unbind", "t", "view_as", "reshape_as", "swapaxes", "movedim", "narrow", "neg", "clone",
    "tensor_split", "unflatten", torch.unflatten, "to", "float", "type_as",
}
_MEAN = {torch.mean, "mean"}


# --------------------------------------------------------------------------- pooling


def _windows(n: int, n_out: int, k: int, s: int, p: int, d: int = 1, adaptive: bool = False):
    """Along one dimension: the largest number of windows covering one input, and per window
    ``(valid pixels, window length clipped to the padded input)``."""
    cover = [0] * n
    wins = []
    for i in range(n_out):
        if adaptive:
            idx = list(range(math.floor(i * n / n_out), math.ceil((i + 1) * n / n_out)))
        else:
            idx = [j for j in (s * i - p + d * a for a in range(k)) if -p <= j < n + p]
        valid = sum(1 for j in idx if 0 <= j < n)
        for j in idx:
            if 0 <= j < n:
                cover[j] += 1
        wins.append((max(1, valid), max(1, len(idx))))
    return max(cover + [1]), wins


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)  # type: ignore[return-value]


def pool_lipschitz(kind: str, in_hw: Sequence[int], out_hw: Sequence[int], kernel=None, stride=None,
                   padding=0, dilation=1, count_include_pad: bool = True, divisor_override=None) -> float:
    """Lipschitz constant (l2) of 2-D max / average pooling from the window geometry.

    With ``m`` the largest number of windows covering one input pixel: max pooling satisfies
    ``|max a - max b| <= ||a - b||``, so ``L <= sqrt(m)``; an average with ``v`` valid pixels and
    divisor ``D`` has norm ``sqrt(v) / D``, so ``L <= sqrt(m max_w v_w / D_w^2)`` (PyTorch's
    divisors: the window clipped to the padded input, the valid count, or the override).
    Exact for non-overlapping windows (``AvgPool2d(2)``: 1/2; global average ``1/sqrt(HW)``);
    a certified upper bound otherwise. ``kind``: ``max``, ``avg``, ``adaptive_max``, ``adaptive_avg``.
    """
    m_total, r_total = 1.0, 1.0
    for dim in range(2):
        n, n_out = in_hw[dim], out_hw[dim]
        if kind.startswith("adaptive"):
            m, wins = _windows(n, n_out, 0, 0, 0, adaptive=True)
        else:
            k, p, d = _pair(kernel)[dim], _pair(padding)[dim], _pair(dilation)[dim]
            s = _pair(stride if stride else kernel)[dim]
            m, wins = _windows(n, n_out, k, s, p, d)
        m_total *= m
        if kind == "adaptive_avg":
            r_total *= max(1 / v for v, _ in wins)  # D = v
        elif kind == "avg":
            if divisor_override:
                r_total *= max(v for v, _ in wins)  # / D^2 below
            elif count_include_pad:
                r_total *= max(v / ln ** 2 for v, ln in wins)  # D = window clipped to the padded input
            else:
                r_total *= max(1 / v for v, _ in wins)  # D = v
    if kind == "avg" and divisor_override:
        r_total /= divisor_override ** 2
    return math.sqrt(m_total * r_total)


# --------------------------------------------------------------------------- guards


def _check_model(model, where: str) -> nn.Module:
    """``model`` is an ``nn.Module`` whose parameters and buffers hold finite values (not meta)."""
    if not isinstance(model, nn.Module):
        raise ConfigError(f"{where}: model must be a torch.nn.Module, got {type(model).__name__}")
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.device.type == "meta":
            layer = name.rsplit(".", 1)[0] if "." in name else name
            raise ConfigError(f"{where}: layer {layer!r} has meta tensors ({name!r}: shapes only, no values); "
                              "load the weights first")
    guard.check_finite(model, where)
    return model


# --------------------------------------------------------------------------- tracing


def pad_lipschitz(shape: Sequence[int], pad: Sequence[int], mode: str = "constant") -> float:
    """Exact Lipschitz constant of ``F.pad(x, pad, mode)`` on inputs of ``shape``.

    Constant padding (any fill value) only adds fixed entries (or crops, for negative pads):
    an isometry up to a constant, so 1. Reflect, replicate and circular padding copy input
    values; the map is a 0/1 matrix with one 1 per row, so its norm is ``sqrt`` of the
    largest number of copies of one input value, a product over the padded dimensions
    (as :func:`sepconv.spectral.spec.norm_of_padding`).
    """
    if mode == "constant":
        return 1.0
    copies = 1
    for i in range(len(pad) // 2):
        n = int(shape[-1 - i])
        idx = torch.arange(n, dtype=torch.float64).reshape(1, 1, n)
        padded = F.pad(idx, (pad[2 * i], pad[2 * i + 1]), mode=mode)
        copies *= int(torch.bincount(padded.flatten().long(), minlength=n).max())
    return math.sqrt(copies)


def trace(model: nn.Module) -> torch.fx.GraphModule:
    """``torch.fx.symbolic_trace`` with a one-line error for models fx cannot trace."""
    try:
        return torch.fx.symbolic_trace(model)
    except Exception as e:  # fx raises many types (TraceError, TypeError, ...)
        raise UnsupportedLayerError(
            f"{type(model).__name__} cannot be traced by torch.fx ({type(e).__name__}: {' '.join(str(e).split())[:160]})"
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
    return isinstance(m, nn.Conv2d) and composite._is_pointwise(m)


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
    method: str
    tol: float
    input_bound: float | None
    max_memory: float | None = None


#: Certified per-layer methods of :func:`lipschitz_bound`.
BOUND_METHODS = ("upper", "fft", "gram", "fantastic4")


class _Propagator:
    """Lipschitz constants of every node of a traced model with respect to its input."""

    def __init__(self, model: nn.Module, input_shape: Sequence[int], ctx: _Ctx):
        self.gm = trace(model)
        self.modules = dict(self.gm.named_modules())
        self.ctx = ctx
        dtype, device = input_dtype(model)
        x = torch.zeros(1, *input_shape, dtype=dtype, device=device)
        with LayerStack(self.gm, "lipschitz_bound", input_shape) as names, torch.no_grad():
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

    def hw(self, n: torch.fx.Node) -> tuple[int, int]:
        return tuple(self.rec.shape[n][-2:])  # type: ignore[return-value]

    def fail(self, n: torch.fx.Node, what: str, why: str = "no Lipschitz rule") -> UnsupportedLayerError:
        return UnsupportedLayerError(f"lipschitz_bound: cannot bound {what} (node {n.name!r}): {why}")

    # ---------------------------------------------------------------- norms

    def conv_norm(self, weight: Tensor, spec: ConvSpec, layer: str = "") -> float:
        w = weight.detach().to(torch.float64)
        m, mem = self.ctx.method, self.ctx.max_memory
        try:
            if m == "upper":
                return exact.bracket(w, spec, tol=self.ctx.tol, max_iter=200, lower=False, max_memory=mem).upper
            if m == "fft":
                return float(bounds.fft_bound(w, spec, max_memory=mem))
            if m == "gram":
                return float(bounds.gram_iteration(w, spec, max_memory=mem))
            if m == "fantastic4":
                return float(bounds.fantastic_four(w, spec))
        except SepconvError as e:
            raise type(e)(f"lipschitz_bound: layer {layer!r} ({spec.describe(weight.shape[-2:])}): {e}") from None
        raise ConfigError(f"lipschitz_bound: method must be {', '.join(map(repr, BOUND_METHODS))}, got {m!r}")

    def chain_factor(self, chain: list[torch.fx.Node]) -> tuple[float, str]:
        mods = [self.modules[c.target] for c in chain]
        names = "+".join(type(m).__name__ for m in mods if not isinstance(m, (nn.Identity, nn.Dropout, nn.Dropout2d)))
        if any(isinstance(m, nn.Conv2d) for m in mods):
            layer = ".".join(str(c.target) for c in chain)
            try:
                weight, spec = composite.merge_chain(mods, self.hw(chain[0].args[0]))
            except SepconvError as e:
                raise type(e)(f"lipschitz_bound: layer {layer!r}: {e}") from None
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
            raise UnsupportedLayerError(f"lipschitz_bound: the model must take one input tensor, it takes {len(placeholders)}")
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
                    out = math.sqrt(sum(self.L[r] ** 2 for r in res))
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
            self.records.append((".".join(str(c.target) for c in chain), what, factor))
            return self.arg_L(chain[0].args[0]) * factor
        x = n.args[0] if n.args else None
        Lx = self.arg_L(x)
        if isinstance(mod, nn.Linear):
            factor = float(torch.linalg.svdvals(mod.weight.detach().to(torch.float64))[0]) * (1 + 1e-12)
            self.records.append((str(n.target), "Linear", factor))
            return Lx * factor
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            factor = float(composite.batchnorm_lipschitz(mod, str(n.target)))
            self.records.append((str(n.target), type(mod).__name__, factor))
            return Lx * factor
        for cls, key in _MODULE_ACT.items():
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
        raise self.fail(n, name)

    def _function(self, n: torch.fx.Node) -> float:
        t = n.target
        what = f"{'method' if n.op == 'call_method' else 'function'} {getattr(t, '__name__', t)!r}"
        if n not in self.rec.shape:  # not a floating-point tensor
            val = self.rec.value.get(n)
            if isinstance(val, (tuple, list)) and any(isinstance(v, Tensor) for v in val):  # chunk / split parts
                if t in _SHAPE_ONLY:
                    return self.arg_L(n.args[0])
                raise self.fail(n, what)
            return 0.0  # sizes and shape arithmetic: constants
        args = n.args
        x = args[0] if args else None
        act = _FUNC_ACT.get(t) if callable(t) else _METHOD_ACT.get(t)  # type: ignore[arg-type]
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
        if t in _ADD:
            alpha = abs(n.kwargs.get("alpha", 1.0))
            terms = [a for a in list(args) + [n.kwargs.get("other")] if isinstance(a, torch.fx.Node)]
            return sum(self.L[a] * math.sqrt(self.rep(a, n)) * (alpha if i == 1 else 1.0) for i, a in enumerate(terms))
        if t in _MUL:
            return self._product(n, args[0], args[1] if len(args) > 1 else n.kwargs.get("other"))
        if t in _DIV:
            a, b = args[0], args[1] if len(args) > 1 else n.kwargs.get("other")
            if isinstance(b, torch.fx.Node) and self.L[b] > 0:
                raise self.fail(n, what, "division by an input-dependent tensor")
            denom = abs(b) if not isinstance(b, torch.fx.Node) else self.rec.minabs[b]
            if denom == 0:
                raise self.fail(n, what, "division by a value that can be zero")
            return self.arg_L(a) * math.sqrt(self.rep(a, n) if isinstance(a, torch.fx.Node) else 1) / denom
        if t in _CAT:
            parts = args[0] if args else n.kwargs.get("tensors")
            return math.sqrt(sum(self.arg_L(a) ** 2 for a in parts))
        if t is operator.getitem:
            if isinstance(x, torch.fx.Node) and x not in self.rec.shape:  # element of chunk/split
                return self.arg_L(x)
            idx = args[1] if isinstance(args[1], tuple) else (args[1],)
            if all(i is None or i is Ellipsis or isinstance(i, (int, slice)) for i in idx):
                return self.arg_L(x)
            raise self.fail(n, what, "advanced indexing can repeat elements")
        if t in _SHAPE_ONLY:
            return self.arg_L(x)
        if t in _MEAN or t in (torch.sum, "sum"):
            k = math.prod(self.rec.shape[x]) / max(1, math.prod(self.rec.shape[n]))
            return self.arg_L(x) * (1 / math.sqrt(k) if t in _MEAN else math.sqrt(k))
        pools = {F.adaptive_avg_pool2d: "adaptive_avg", F.adaptive_max_pool2d: "adaptive_max",
                 F.avg_pool2d: "avg", F.max_pool2d: "max"}
        if t in pools:
            kind = pools[t]
            names = {"max": ["kernel", "stride", "padding", "dilation"],
                     "avg": ["kernel", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override"]}.get(kind, [])
            kw = dict(zip(names, args[1:]))
            kw.update({("kernel" if k == "kernel_size" else k): v for k, v in n.kwargs.items() if k in names + ["kernel_size"]})
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
            return self.arg_L(x) * float(torch.linalg.svdvals(weight.detach().to(torch.float64))[0]) * (1 + 1e-12)
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
                            "it has no global Lipschitz constant; pass input_bound=R to bound it for inputs with ||x|| <= R")
        # d(ab) = da * b(x) + a(y) * db, bounded either way round; broadcast copies enter once
        one = self.supinf(b) * self.L[a] * math.sqrt(self.rep(a, n)) + self.sup2(a) * math.sqrt(self.rep(a, n)) * self.L[b]
        two = self.supinf(a) * self.L[b] * math.sqrt(self.rep(b, n)) + self.sup2(b) * math.sqrt(self.rep(b, n)) * self.L[a]
        return min(one, two)


# --------------------------------------------------------------------------- public API


def lipschitz_bound(model: nn.Module, input_shape: Sequence[int], method: str = "upper", tol: float = 1e-3,
                    input_bound: float | None = None, max_memory: float | None = None) -> float:
    """A **certified upper bound** on the Lipschitz constant of ``model`` (l2, one sample of
    ``input_shape = (C, H, W)``), in eval mode, by propagation over its ``torch.fx`` graph: the
    composition bound of Szegedy et al. 2014 (arXiv 1312.6199, Sec. 4.3) with the refinements
    of the module docstring.

    Linear chains (conv, BatchNorm, pointwise conv) are merged before they are bounded;
    convolutions are bounded at the input size they see by ``method``: ``upper`` (the
    tightest certified bound, :func:`sepconv.spectral.norm_bracket`'s upper end at relative
    ``tol``), ``fft``, ``gram`` or ``fantastic4``. ``input_bound`` (``R``) is needed only for
    products of two input-dependent tensors (squeeze-excitation): the bound then holds on
    the ball ``||x|| <= R``. The model's train/eval mode is restored afterwards.

    Validated before any work: the input shape (positive ints; a wrong channel count or an
    input smaller than a kernel is a :class:`~sepconv.errors.ConfigError` naming the layer),
    ``0 < tol < 1``, the method, a finite ``input_bound > 0``, finite weights and BatchNorm
    statistics in every layer (:func:`sepconv.guard.check_finite`); the dry forward pass is
    estimated on the meta device and refused above ``max_memory`` bytes (default 2 GiB), which
    also bounds each layer's computation.
    """
    where = "lipschitz_bound"
    _check_model(model, where)
    shape = validate.shape(input_shape, where, dims=(3, 4))[-3:]
    if method not in BOUND_METHODS:
        raise ConfigError(f"{where}: method must be one of {', '.join(map(repr, BOUND_METHODS))}, got {method!r}")
    tol = validate.tolerance(tol, where)
    if input_bound is not None:
        input_bound = _positive(input_bound, where, "input_bound")
    validate.budget(max_memory)
    was_training = model.training
    model.eval()
    try:
        check_forward_memory(model, shape, where, validate.budget(max_memory), copies=3.0)  # + the float64 copy of each node's value
        L = _Propagator(model, shape, _Ctx(method, tol, input_bound, max_memory)).run()
    finally:
        model.train(was_training)
    validate.finite_result(L, where)
    return L


def _positive(v, where: str, name: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0 < float(v) < math.inf):
        raise ConfigError(f"{where}: {name} must be a finite number > 0, got {v!r}")
    return float(v)


@dataclass
class LayerRecord:
    """One layer of :func:`analyze`: its name, type, geometry, a value and a time per method."""

    name: str
    kind: str
    geometry: str
    values: dict[str, float] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


ANALYZE_METHODS = ("exact", "upper", "fft", "gram", "fantastic4", "power", "reshape")


def layer_inputs(model: nn.Module, input_shape: Sequence[int], types=(nn.Conv2d, nn.Linear),
                 max_memory: float | None = None) -> dict[str, tuple[nn.Module, tuple[int, ...]]]:
    """``{name: (module, input shape)}`` for the modules of ``types``, from one eval-mode forward pass
    on zeros of ``(1, *input_shape)``. The pass is estimated first on the meta device and refused
    (:class:`~sepconv.errors.ResourceError`) above ``max_memory`` bytes (default 2 GiB); an input
    the model cannot take is a :class:`~sepconv.errors.ConfigError` naming the layer."""
    input_shape = validate.shape(input_shape, "layer_inputs", dims=(1, 2, 3, 4))
    return dry_forward(model, input_shape, record=tuple(types), where="layer_inputs",
                       budget=validate.budget(max_memory)).inputs


def analyze(model: nn.Module, input_shape: Sequence[int], methods: Iterable[str] = ANALYZE_METHODS,
            tol: float = 1e-4, progress: bool = False, max_memory: float | None = None) -> list[LayerRecord]:
    """Per-layer spectral norms of every ``Conv2d`` and ``Linear`` of ``model`` at the input sizes
    they see for one input of ``input_shape = (C, H, W)``: one :class:`LayerRecord` each.

    ``methods``: ``exact`` (the lower end of the certified bracket -- exact within ``tol`` when
    certified), ``upper`` (its upper end: the tightest certified bound), and the methods of
    :func:`sepconv.spectral.spectral_norm` (``fft``, ``gram``, ``fantastic4``: certified;
    ``power``: an estimate from below; ``reshape``: torch's value). Linear layers: the exact
    matrix norm for every method.

    Validated before any work like :func:`lipschitz_bound` (input shape, ``0 < tol < 1``, finite
    weights and BatchNorm statistics in every layer); the dry forward pass and each layer's
    computation stay within ``max_memory`` bytes (default 2 GiB), and a layer's error names it.
    """
    where = "analyze"
    methods = (methods,) if isinstance(methods, str) else tuple(methods)
    bad = [m for m in methods if m not in ANALYZE_METHODS]
    if bad or not methods:
        raise ConfigError(f"analyze: unknown methods {bad or '(none given)'}; choose from {', '.join(ANALYZE_METHODS)}")
    tol = validate.tolerance(tol, where)
    _check_model(model, where)
    shape = validate.shape(input_shape, where, dims=(1, 2, 3, 4))[-3:]
    try:
        layers = layer_inputs(model, shape, max_memory=max_memory)
    except SepconvError as e:
        raise type(e)(str(e).replace("layer_inputs:", "analyze:", 1)) from None
    items = list(layers.items())
    if progress:
        from tqdm import tqdm

        items = tqdm(items, desc="layers", unit="layer")
    records = []
    for name, (mod, shape) in items:
        try:
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
                           {m: v for m in methods}, {m: dt for m in methods})
    spec = ConvSpec.of(mod, shape[-2:])
    rec = LayerRecord(name, "Conv2d", f"{mod.in_channels}->{mod.out_channels} {spec.describe(mod.kernel_size)}")
    if "exact" in methods or "upper" in methods:
        t = time.perf_counter()
        br = exact.bracket(w, spec, tol=tol, max_memory=max_memory)
        dt = time.perf_counter() - t
        for m, v in (("exact", br.lower), ("upper", br.upper)):
            if m in methods:
                rec.values[m], rec.seconds[m] = v, dt
    for m in methods:
        if m in ("exact", "upper"):
            continue
        t = time.perf_counter()
        kw = {"max_memory": max_memory} if m in ("fft", "gram", "power") else {}
        rec.values[m] = float(exact.spectral_norm(w, spec, m, **kw))
        rec.seconds[m] = time.perf_counter() - t
    return rec


class Certificate(NamedTuple):
    """Result of :func:`certified_accuracy`: clean accuracy, the fraction certified robust at radius
    ``eps`` (correct *and* margin ``> sqrt(2) L eps``), the Lipschitz bound used, and ``eps``."""

    accuracy: float
    certified: float
    lipschitz: float
    eps: float


def certified_radii(model: nn.Module, loader: Iterable, lipschitz: float | None = None,
                    input_bound: float | None = None, method: str = "upper") -> tuple[Tensor, float]:
    """Per-sample certified l2 radius of the Lipschitz-margin certificate (Tsuzuku, Sato, Sugiyama,
    NeurIPS 2018, arXiv 1802.04034, Prop. 1): ``margin / (sqrt(2) L)`` for a correct prediction
    (each logit difference is ``sqrt(2) L``-Lipschitz, so no input within that radius changes it),
    ``-inf`` for a wrong one. ``L`` is :func:`lipschitz_bound` (computed from the first batch's shape
    unless given). Returns ``(radii, L)``: one pass over the loader serves every radius. A
    **certificate**, valid for every input of the loader (and, with ``input_bound``, for inputs
    within that norm).

    Validated: finite weights in every layer, a finite ``lipschitz >= 0`` when given, batches of
    finite floating inputs ``(N, C, H, W)`` with ``N`` labels, and -- when ``L`` is computed here --
    every batch of the shape it was computed for (a Lipschitz bound holds for one input size).
    """
    where = "certified_radii"
    _check_model(model, where)
    if lipschitz is not None and (isinstance(lipschitz, bool) or not isinstance(lipschitz, (int, float))
                                  or not 0 <= float(lipschitz) < math.inf):
        raise ConfigError(f"{where}: lipschitz must be a finite number >= 0, got {lipschitz!r}")
    if input_bound is not None:
        input_bound = _positive(input_bound, where, "input_bound")
    was_training = model.training
    model.eval()
    L, radii, shape = lipschitz, [], None
    try:
        with torch.no_grad(), LayerStack(model, where, ()) as names:
            for i, batch in enumerate(loader):
                x, y = _batch(batch, i, where)
                if L is None:
                    shape = tuple(x.shape[1:])
                    try:
                        L = lipschitz_bound(model, shape, method=method, input_bound=input_bound)
                    except SepconvError as e:
                        raise type(e)(str(e).replace("lipschitz_bound:", f"{where}:", 1)) from None
                    model.eval()
                elif shape is not None and tuple(x.shape[1:]) != shape:
                    raise ConfigError(f"{where}: batch {i} has inputs of shape {tuple(x.shape[1:])}, but the Lipschitz "
                                      f"bound was computed for {shape} (pass lipschitz= to reuse one)")
                names.shape = tuple(x.shape[1:])
                logits = model(x)
                if not (isinstance(logits, Tensor) and logits.dim() == 2 and logits.shape[1] >= 2):
                    got = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
                    raise ConfigError(f"{where}: the model must return logits (N, classes >= 2), got {got}")
                top2 = logits.topk(2, dim=1)
                margin = (top2.values[:, 0] - top2.values[:, 1]).double()
                ok = top2.indices[:, 0] == y.to(top2.indices.device)
                r = margin / (math.sqrt(2) * L) if L > 0 else torch.where(margin > 0, math.inf, 0.0)
                radii.append(torch.where(ok, r, -math.inf).cpu())
    finally:
        model.train(was_training)
    if not radii or sum(r.numel() for r in radii) == 0:
        raise ConfigError("certified_accuracy: the loader yielded no samples")
    return torch.cat(radii), float(L)


def _batch(batch, i: int, where: str) -> tuple[Tensor, Tensor]:
    """``(x, y)`` of one loader batch, checked: finite floating inputs ``(N, ...)`` and ``N`` labels."""
    try:
        x, y = batch
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: batch {i} must be a pair (inputs, labels), got {type(batch).__name__}") from None
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() < 2:
        got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
        raise ConfigError(f"{where}: batch {i}: inputs must be a floating tensor (N, C, H, W), got {got}")
    if not isinstance(y, Tensor) or y.dim() != 1 or y.shape[0] != x.shape[0]:
        got = tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__
        raise ConfigError(f"{where}: batch {i}: expected {x.shape[0]} labels (N,), got {got}")
    if x.device.type != "meta" and not bool(torch.isfinite(x).all()):
        raise ConfigError(f"{where}: batch {i} holds NaN or Inf inputs")
    return x, y


def certified_accuracy(model: nn.Module, loader: Iterable, eps: float, lipschitz: float | None = None,
                       input_bound: float | None = None, method: str = "upper") -> Certificate:
    """Lipschitz-margin certification (Tsuzuku, Sato, Sugiyama, NeurIPS 2018, arXiv 1802.04034,
    Prop. 1): a prediction is certified at l2 radius ``eps`` when its logit margin exceeds
    ``sqrt(2) L eps`` -- each logit difference is ``sqrt(2) L``-Lipschitz -- so no input within
    ``eps`` can change it. ``L`` is :func:`lipschitz_bound` (computed from the first batch's
    shape unless given); :func:`certified_radii` gives every sample's radius in one pass. A
    **certificate**, valid for every input of the loader (and, with ``input_bound``, for inputs
    within that norm)."""
    if not eps >= 0:
        raise ConfigError(f"certified_accuracy: eps must be >= 0, got {eps!r}")
    radii, L = certified_radii(model, loader, lipschitz, input_bound, method)
    return Certificate(float((radii > -math.inf).double().mean()), float((radii > eps).double().mean()), L, float(eps))


__all__ = ["ACTIVATION_LIPSCHITZ", "ANALYZE_METHODS", "BOUND_METHODS", "Certificate", "LayerRecord", "analyze",
           "certified_accuracy", "certified_radii", "layer_inputs", "lipschitz_bound", "pool_lipschitz", "trace"]
