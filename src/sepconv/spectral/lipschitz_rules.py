"""Lipschitz constants of the parameter-free operations of a network (l2, one sample).

What :func:`sepconv.spectral.lipschitz_bound` multiplies by between the linear layers:
activations (the sup of ``|f'|``; docs/spectral.md Sec. 9), pooling (from the window geometry,
overlaps included) and padding (from the number of copies of one input value), and the sets of
``torch.fx`` targets that are additions, products, divisions, concatenations, means and pure
reshapes. Each constant is **exact** or a **certified upper bound**, as its docstring says.

**Declared constants** (:func:`declared_lipschitz`): a module class may state its exact Lipschitz
constant as the class attribute ``lipschitz_constant`` (e.g. the norm-preserving activations and
L2 pooling of :mod:`sepconv.lipschitz`, which this package must not import). The propagator
takes it -- and keeps such a module a leaf of the ``torch.fx`` graph -- **only when the module
has no parameters and no buffers**: a module with state is traced through and bounded from its
actual weights, so a declaration can never vouch for weights the engine has not checked.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from numbers import Real

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError

__all__ = ["ACTIVATION_LIPSCHITZ", "ACTIVATION_RANGE", "ADD_OPS", "CAT_OPS", "DIV_OPS", "FUNCTION_ACTIVATIONS",
           "LIPSCHITZ_ATTRIBUTE", "MEAN_OPS", "METHOD_ACTIVATIONS", "MODULE_ACTIVATIONS", "MUL_OPS", "SHAPE_OPS",
           "declared_lipschitz", "pad_lipschitz", "pool_lipschitz"]

#: The class attribute by which a parameter-free module declares its exact Lipschitz constant.
LIPSCHITZ_ATTRIBUTE = "lipschitz_constant"

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

#: Activation modules, functions and tensor methods -> their key in :data:`ACTIVATION_LIPSCHITZ`.
MODULE_ACTIVATIONS = {
    nn.ReLU: "relu", nn.ReLU6: "relu6", nn.Hardtanh: "hardtanh", nn.Tanh: "tanh", nn.Identity: "identity",
    nn.Softplus: "softplus", nn.CELU: "celu", nn.Softsign: "softsign", nn.Softmax: "softmax",
    nn.Sigmoid: "sigmoid", nn.Hardsigmoid: "hardsigmoid", nn.Hardswish: "hardswish", nn.GELU: "gelu",
    nn.SiLU: "silu", nn.Mish: "mish", nn.SELU: "selu", nn.Dropout: "dropout", nn.Dropout2d: "dropout",
    nn.AlphaDropout: "dropout",
}
FUNCTION_ACTIVATIONS = {
    F.relu: "relu", torch.relu: "relu", F.relu6: "relu6", F.hardtanh: "hardtanh", torch.tanh: "tanh",
    F.tanh: "tanh", F.softplus: "softplus", F.celu: "celu", F.softsign: "softsign", F.softmax: "softmax",
    torch.softmax: "softmax", torch.sigmoid: "sigmoid", F.sigmoid: "sigmoid", F.hardsigmoid: "hardsigmoid",
    F.hardswish: "hardswish", F.gelu: "gelu", F.silu: "silu", F.mish: "mish", F.selu: "selu",
    F.dropout: "dropout", F.dropout2d: "dropout", F.relu_: "relu",
}
METHOD_ACTIVATIONS = {"relu": "relu", "relu_": "relu", "sigmoid": "sigmoid", "tanh": "tanh", "softmax": "softmax"}

#: ``torch.fx`` targets by rule: sums (constants add), products, divisions, concatenations
#: (constants add in quadrature), means, and pure reshapes/copies (the constant is kept).
ADD_OPS = {operator.add, operator.iadd, torch.add, operator.sub, operator.isub, torch.sub, "add", "add_", "sub", "sub_"}
MUL_OPS = {operator.mul, operator.imul, torch.mul, "mul", "mul_"}
DIV_OPS = {operator.truediv, operator.itruediv, torch.div, torch.true_divide, "div", "div_", "true_divide"}
CAT_OPS = {torch.cat, torch.concat, torch.stack, torch.concatenate}
SHAPE_OPS = {
    torch.flatten, torch.reshape, torch.permute, torch.transpose, torch.squeeze, torch.unsqueeze, torch.t,
    torch.chunk, torch.split, torch.tensor_split, torch.unbind, torch.channel_shuffle, torch.swapaxes,
    torch.movedim, torch.narrow, F.channel_shuffle, operator.neg, torch.neg, torch.clone,
    "flatten", "view", "reshape", "permute", "transpose", "contiguous", "squeeze", "unsqueeze", "chunk",
    "split", "unbind", "t", "view_as", "reshape_as", "swapaxes", "movedim", "narrow", "neg", "clone",
    "tensor_split", "unflatten", torch.unflatten, "to", "float", "type_as",
}
MEAN_OPS = {torch.mean, "mean"}


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


def declared_lipschitz(module: nn.Module) -> float | None:
    """The Lipschitz constant ``module``'s class declares (:data:`LIPSCHITZ_ATTRIBUTE`), or ``None``.

    ``None`` when the class declares nothing, **or when the module has any parameter or buffer**
    (its own or a child's): a declaration is trusted only for a stateless map, whose constant the
    class's author states once for every instance (the docstring must say why it holds). A module
    with state is traced through and bounded from its weights by the engine instead. Only the
    *class* attribute counts (an instance attribute cannot change it). A declared value that is not
    a finite real ``>= 0`` is a :class:`~sepconv.errors.ConfigError` naming the class.
    """
    value = getattr(type(module), LIPSCHITZ_ATTRIBUTE, None)
    if value is None or any(True for _ in module.parameters()) or any(True for _ in module.buffers()):
        return None
    if isinstance(value, bool) or not isinstance(value, Real) or not 0 <= float(value) < math.inf:
        raise ConfigError(f"{type(module).__name__}: {LIPSCHITZ_ATTRIBUTE} must be a finite number >= 0, "
                          f"got {value!r:.40}")
    return float(value)
