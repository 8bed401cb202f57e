"""The curvature bound: a certified bound on the input Hessian of a network with smooth activations.

Singla & Feizi (ICML 2020, "Second-order provable defenses against adversarial attacks", arXiv
2006.00731, Sec. 4; ICLR 2021, arXiv 1911.10258, Sec. 5) bound the curvature of a network -- the
largest absolute eigenvalue of the Hessian of a logit with respect to the input -- from the
spectral norms of its layers and the first and second derivative bounds of its activations. In
the form used here every node ``a(x)`` of the ``torch.fx`` graph carries two constants, valid at
every input ``x`` and unit direction ``v``:

* ``L(a) >= ||d/dt a(x + t v)||`` -- the Lipschitz constant (:func:`~sepconv.spectral.lipschitz_bound`);
* ``C(a) >= ||d^2/dt^2 a(x + t v)||`` -- the curvature constant.

A linear node (convolution, BatchNorm, pooling by averages, addition, reshape, ...) maps both
alike: ``C`` follows the same rule as ``L`` (a chain of norm ``n`` multiplies by ``n``, a sum adds,
a concatenation adds in quadrature). An elementwise activation ``s`` with ``g >= sup |s'|`` and
``h >= sup |s''|`` gives, from ``d^2/dt^2 s(u) = s''(u) (du)^2 + s'(u) d^2u`` and
``||(du)^2||_2 = ||du||_4^2 <= ||du||_2^2``,

    ``C(s(u)) <= g C(u) + h L(u)^2``   (Singla & Feizi 2020, Thm. 2, node by node).

For a network output ``f``, ``|v^T (d^2 (w^T f)/dx^2) v| <= ||w|| C(f)``: the output's ``C`` bounds the
largest absolute Hessian eigenvalue of every logit and of every unit combination of logits
(a logit difference ``z_i - z_j`` by ``sqrt(2) C``), i.e. the Lipschitz constant of every such
input gradient. The per-layer norms come from any certified method of the registry (``upper``:
the tightest; ``fantastic4``: the papers' own choice), so the bound is certified.

Non-smooth operations have no such bound and are refused with one line naming the node: ReLU and
its piecewise-linear kin, max pooling, ELU with ``alpha != 1`` and SELU (a jump in the derivative),
products of two input-dependent tensors. ELU (``alpha = 1``), CELU and softsign have a bounded but
discontinuous second derivative: the bound holds for the Lipschitz constant of the gradient.
torch's ``Softplus`` is linear above ``threshold / beta`` (default 20): its slope jumps there by
``sigmoid(-threshold) ~ 2e-9``; the bound is that of the smooth softplus it approximates.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError, UnsupportedLayerError
from . import validate
from .lipschitz import _Propagator, evaluating, propagator
from .lipschitz_rules import (
    FUNCTION_ACTIVATIONS,
    METHOD_ACTIVATIONS,
    MODULE_ACTIVATIONS,
    MUL_OPS,
    declared_lipschitz,
)

__all__ = ["ACTIVATION_CURVATURE", "curvature_bound", "curvature_penalty"]

#: ``sup |s''|`` of the smooth elementwise activations (at their default parameters; Softplus
#: scales by ``beta``, CELU by ``1 / alpha``), rounded *up* in the 5th digit where irrational:
#: tanh ``4 / (3 sqrt 3) = 0.769800`` (at ``tanh x = 1/sqrt 3``), sigmoid ``1 / (6 sqrt 3) = 0.096225``,
#: softplus ``1/4`` (at 0), GELU ``sqrt(2/pi) = 0.797885`` (at 0; also its tanh form), SiLU ``1/2``
#: (at 0), Mish 0.644205 (at x = -0.088, numerically on a 1e-5 grid), ELU and CELU 1 (at 0-),
#: softsign 2 (at 0). Identity and dropout (eval) are linear.
ACTIVATION_CURVATURE: dict[str, float] = {
    "identity": 0.0, "dropout": 0.0, "tanh": 0.76981, "sigmoid": 0.096226, "softplus": 0.25, "gelu": 0.79789,
    "silu": 0.5, "mish": 0.64421, "celu": 1.0, "elu": 1.0, "softsign": 2.0,
}

_SMOOTH_NAMES = "softplus, tanh, sigmoid, ELU, CELU, SiLU, GELU, Mish"


def _scale(key: str, params: dict) -> float:
    """``h`` of activation ``key`` with its parameters (Softplus ``beta``, CELU ``alpha``); raises
    ``ValueError`` with the reason where the parameters make it non-smooth (ELU ``alpha != 1``)."""
    if key == "softplus":
        return ACTIVATION_CURVATURE[key] * abs(float(params.get("beta", 1.0)))
    if key == "celu":
        alpha = float(params.get("alpha", 1.0))
        if alpha <= 0:
            raise ValueError(f"alpha={alpha:g} is not positive")
        return 1.0 / alpha
    if key == "elu" and float(params.get("alpha", 1.0)) != 1.0:
        raise ValueError(f"alpha={float(params['alpha']):g} makes its slope jump at 0 (only alpha=1 is smooth)")
    return ACTIVATION_CURVATURE[key]


def _args(n: torch.fx.Node, names: Sequence[str]) -> dict:
    """An fx call's parameters after the input, by name (positional or keyword)."""
    out = dict(zip(names, n.args[1:]))
    out.update({k: v for k, v in n.kwargs.items() if k in names})
    return out


class _CurvaturePropagator(_Propagator):
    """The Lipschitz propagator plus the curvature pass (:func:`curvature_bound`): every chain
    factor is computed once and shared by both passes."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self._factors: dict[tuple, tuple] = {}

    def chain_factor(self, chain):
        key = tuple(chain)
        if key not in self._factors:
            self._factors[key] = super().chain_factor(chain)
        return self._factors[key]

    def smooth(self, n: torch.fx.Node) -> float | None:
        """``h`` of an elementwise activation node; ``None`` for a node that is not an activation.
        Raises (one line naming the node) for non-smooth operations."""
        what, key, params = None, None, {}
        if n.op == "call_module":
            mod = self.modules[n.target]
            what = f"module {n.target!r} ({type(mod).__name__})"
            key = next((k for cls, k in MODULE_ACTIVATIONS.items() if type(mod) is cls), None)
            if isinstance(mod, nn.ELU):
                key, params = "elu", {"alpha": mod.alpha}
            elif isinstance(mod, nn.Softplus):
                params = {"beta": mod.beta}
            elif isinstance(mod, nn.CELU):
                params = {"alpha": mod.alpha}
            elif isinstance(mod, (nn.LeakyReLU, nn.PReLU, nn.MaxPool2d, nn.AdaptiveMaxPool2d)):
                key = "max" if "Max" in type(mod).__name__ else "leaky_relu"
            elif key is None and declared_lipschitz(mod) is not None:
                key = type(mod).__name__
        elif n.op in ("call_function", "call_method"):
            t = n.target
            what = f"{'method' if n.op == 'call_method' else 'function'} {getattr(t, '__name__', t)!r}"
            key = FUNCTION_ACTIVATIONS.get(t) if callable(t) else METHOD_ACTIVATIONS.get(t)
            if t in (F.elu, "elu"):
                key, params = "elu", _args(n, ("alpha",))
            elif t is F.softplus:
                params = _args(n, ("beta", "threshold"))
            elif t is F.celu:
                params = _args(n, ("alpha",))
            elif t in (F.leaky_relu, "leaky_relu", F.max_pool2d, F.adaptive_max_pool2d):
                key = "leaky_relu" if "relu" in str(getattr(t, "__name__", t)) else "max"
            elif t in MUL_OPS:
                a, b = n.args[0], n.args[1] if len(n.args) > 1 else n.kwargs.get("other")
                if all(isinstance(v, torch.fx.Node) and self.L[v] > 0 for v in (a, b)):
                    raise self.fail(n, "the product of two input-dependent tensors", "no curvature rule")
        if key is None:
            return None
        if key == "softmax":
            raise self.fail(n, what, "no curvature rule")
        if key not in ACTIVATION_CURVATURE:
            raise UnsupportedLayerError(
                f"{self.ctx.where}: {what} (node {n.name!r}) is not twice differentiable; the curvature bound "
                f"needs smooth activations ({_SMOOTH_NAMES})")
        try:
            return _scale(key, params)
        except ValueError as e:
            raise UnsupportedLayerError(f"{self.ctx.where}: {what} (node {n.name!r}): {e}") from None

    def curvature(self) -> tuple[float, float]:
        """``(L, C)`` of the model's output: the Lipschitz pass, then the curvature pass."""
        lip = self.run()
        L, C = self.L, {}
        kept = len(self.records)
        out = 0.0
        for n in self.gm.graph.nodes:
            if n in self.interior:
                continue
            if n.op in ("placeholder", "get_attr"):
                C[n] = 0.0
            elif n.op == "output":
                res = n.args[0]
                out = C[res] if isinstance(res, torch.fx.Node) else sum(C[r] ** 2 for r in res) ** 0.5
            else:
                h = self.smooth(n)
                if h is not None:
                    x = n.args[0]
                    g = self.L[n] / L[x] if isinstance(x, torch.fx.Node) and L[x] > 0 else 0.0  # the rule's slope
                    C[n] = g * C[x] + h * L[x] ** 2 if isinstance(x, torch.fx.Node) else 0.0
                    continue
                # a linear node: the Lipschitz rule applied to the inputs' curvature constants
                self.L = C
                try:
                    C[n] = self._module(n) if n.op == "call_module" else self._function(n)
                finally:
                    self.L = L
        del self.records[kept:]
        return lip, out


def curvature_bound(model: nn.Module, input_shape: Sequence[int], method: str = "upper", tol: float = 1e-3,
                    max_memory: float | None = None, lipschitz: bool = False,
                    progress: bool = False) -> float | tuple[float, float]:
    """A **certified upper bound** on the curvature of ``model`` (eval mode) for one input of
    ``input_shape = (C, H, W)``: ``sup_x sup_{||v|| = 1} ||d^2/dt^2 f(x + t v)||_2``, which bounds the
    largest absolute eigenvalue of the input Hessian of every logit (and of every unit-norm
    combination of logits; a logit difference by ``sqrt(2)`` times it). Singla & Feizi, ICML 2020
    (arXiv 2006.00731), Thm. 2, and ICLR 2021 (arXiv 1911.10258), Sec. 5, propagated node by node
    over the ``torch.fx`` graph (module docstring): linear chains are merged and bounded by
    ``method`` (any certified method: ``upper``, the tightest, at relative ``tol``; ``fantastic4``,
    the papers'); activations by ``sup |s'|`` and ``sup |s''|`` (:data:`ACTIVATION_CURVATURE`).

    Non-smooth operations (ReLU, max pooling, ...) are refused with an
    :class:`~sepconv.errors.UnsupportedLayerError` naming the node. Validated and memory-bounded
    like :func:`~sepconv.spectral.lipschitz_bound`. ``lipschitz=True`` returns ``(L, C)``: the
    network Lipschitz bound from the same per-layer norms, computed once for both. ``progress=True``
    shows a bar over the layers (stderr).
    """
    with evaluating(model):
        prop = propagator(model, input_shape, method, tol, None, max_memory, "curvature_bound", _CurvaturePropagator,
                          progress)
        L, C = prop.curvature()
    validate.finite_result(C, "curvature_bound")
    return (L, C) if lipschitz else C


class _Differentiable(_CurvaturePropagator):
    """The curvature pass on differentiable per-layer norms (no memo: the weights change)."""

    def chain_factor(self, chain):
        key = tuple(chain)
        if key not in self._factors:
            from . import composite  # noqa: PLC0415

            mods = [self.modules[c.target] for c in chain]
            if any(isinstance(m, nn.Conv2d) for m in mods):
                weight, spec = composite.merge_chain(mods, self.hw(chain[0].args[0]), detach=False)
                self._factors[key] = (self.ctx.method.fn(weight, spec), "")
            else:
                self._factors[key] = super().chain_factor(chain)
        return self._factors[key]

    def matrix_norm(self, weight: Tensor):
        return torch.linalg.matrix_norm(weight, ord=2)


def curvature_penalty(model: nn.Module, input_shape: Sequence[int],
                      method: str = "fantastic4") -> Callable[[], Tensor]:
    """The curvature regularizer of ``model``: a function returning :func:`curvature_bound` computed
    with a differentiable certified ``method`` (default ``fantastic4``, as Singla & Feizi train
    with it), a tensor carrying gradients to every conv, BatchNorm and linear weight. Add
    ``beta * penalty()`` to the loss of each step. The graph and its shapes are found once, here
    (the model must be smooth: non-smooth activations are refused now, not at the first step)."""
    from .methods import get_method  # noqa: PLC0415

    if not get_method(method, "curvature_penalty").differentiable:
        raise ConfigError(f"curvature_penalty: method {method!r} is not differentiable")
    with evaluating(model):
        prop = propagator(model, input_shape, method, 1e-3, None, None, "curvature_penalty", _Differentiable)
        prop.curvature()  # refuses non-smooth models at once

    def penalty() -> Tensor:
        from ..normalize import frozen_state  # noqa: PLC0415

        prop._factors.clear()
        with frozen_state():
            C = prop.curvature()[1]
        return C if isinstance(C, Tensor) else torch.tensor(float(C))
    return penalty
