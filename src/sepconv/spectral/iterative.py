"""Iterations on the true operator: power iteration and block LOBPCG.

The operator is what ``nn.Conv2d`` computes (:meth:`ConvSpec.apply`) and its exact adjoint
(:meth:`ConvSpec.adjoint`: the transposed convolution followed by the adjoint of the padding
map) -- never the channel-swapped, unflipped kernel, which is the adjoint only for centrally
symmetric kernels (docs/spectral.md Sec. 3). Iterations give **lower** bounds: every
Ritz value is a Rayleigh quotient of ``A = T^T T``. Upper bounds come from
:mod:`sepconv.spectral.certify` and :mod:`sepconv.spectral.bounds`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import ConfigError
from . import validate
from .spec import ConvSpec

__all__ = ["FLOAT32_RTOL", "GramOperator", "Ritz", "block_size", "iterate", "lobpcg", "lobpcg_bytes", "orthonormalize",
           "power_iteration", "random_block", "rayleigh_ritz", "top_vector", "vector_bytes"]


def power_iteration(weight: Tensor, spec: ConvSpec, iters: int = 50, x: Tensor | None = None,
                    generator: torch.Generator | None = None, max_memory: float | None = None) -> tuple[Tensor, Tensor]:
    """Operator power iteration ``x <- T^T T x / ||T^T T x||`` (Gouk et al. 2018, arXiv
    1804.04368; Farnia et al. 2019, arXiv 1811.07457), ``iters`` steps from ``x`` (the
    persistent vector of a previous call, shape ``(C_in, H, W)``) or a random start.

    Returns ``(sigma, x)``: ``sigma = ||T x|| / ||x||`` is differentiable in ``weight`` (``x``
    is held constant, as in torch's spectral_norm) and is an **estimate from below**: a
    Rayleigh quotient, ``<= sigma_max`` always, converging at rate ``(sigma_2/sigma_1)^(2 iters)``.
    With a persistent ``x`` one step per training step is enough. Entries below
    ``sqrt(tiny)`` of the unit-norm iterate (1e-19 in float32) are flushed to zero: on depthwise
    layers the vector collapses onto the top channel and the others would decay into subnormal
    floats, which slow every convolution several-fold (BENCHMARKS.md); they contribute
    less than ``tiny`` to ``||x||^2``, so the Rayleigh quotient is unaffected.

    Validated: ``0 <= iters <= 10^6``, ``x`` finite with ``C_in H W`` entries; half/bfloat16
    weights are computed in float32 (and so are ``sigma`` and ``x``); the vectors' memory is
    estimated first and refused above ``max_memory`` bytes (default 2 GiB).
    """
    weight, ks = validate.conv_weight(weight, spec, "power_iteration")
    iters = validate.count(iters, "power_iteration", "iters", 0)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ConfigError(f"power_iteration: generator must be a torch.Generator, got {type(generator).__name__}")
    shape = (1, *spec.input_shape(weight))
    validate.check_memory(vector_bytes(weight, spec, ks, weight.element_size()) * 3,
                          f"power_iteration: the vectors of the conv {tuple(weight.shape)} {spec.describe(ks)}",
                          max_memory)
    if x is not None:
        x = validate.tensor(x, "power_iteration", "x")
        if x.numel() != math.prod(shape):
            raise ConfigError(f"power_iteration: x has shape {tuple(x.shape)}, expected {shape[1:]} (the conv's input)")
        peak = float(x.detach().abs().amax()) if x.numel() else 0.0  # NaN propagates
        if not 0 < peak < math.inf:
            raise ConfigError(f"power_iteration: x must be finite and nonzero, its largest magnitude is {peak}")
    if x is None:
        x = torch.randn(shape, generator=generator, dtype=weight.dtype, device=weight.device)
    x = x.detach().reshape(shape).to(weight.dtype)
    with torch.no_grad():
        w = weight.detach()
        for _ in range(iters):
            y = spec.adjoint(spec.apply(x, w), w)
            n = y.norm()
            y = y / n.clamp_min(torch.finfo(x.dtype).tiny)
            y = y.masked_fill(y.abs() < math.sqrt(torch.finfo(x.dtype).tiny), 0.0)
            x = torch.where(n > 0, y, x)  # x in the null space (a zero weight): keep it, sigma is 0
    # norms accumulated in float64: a float32 sum over a large output loses ~1e-5 relative
    num = torch.linalg.vector_norm(spec.apply(x, weight), dtype=torch.float64)
    sigma = (num / torch.linalg.vector_norm(x, dtype=torch.float64)).to(weight.dtype)
    return sigma, x[0]


class GramOperator:
    """``A = T^T T`` on the input side in ``dtype`` (float64 by default), vectors laid out per
    group ``(g, D_g, b)``.

    The groups of a grouped convolution are independent problems; they share every
    convolution call (one ``conv2d`` and one transposed convolution per block of vectors)."""

    def __init__(self, weight: Tensor, spec: ConvSpec, dtype: torch.dtype = torch.float64):
        self.weight = weight.detach().to(dtype)
        self.spec = spec
        self.g = spec.groups
        self.c_in = spec.input_shape(weight)[0]
        self.dim = self.c_in // self.g * spec.in_size[0] * spec.in_size[1]
        self.applications = 0

    def to_image(self, X: Tensor) -> Tensor:
        return X.permute(2, 0, 1).reshape(X.shape[-1], self.c_in, *self.spec.in_size)

    def from_image(self, x: Tensor) -> Tensor:
        return x.reshape(x.shape[0], self.g, self.dim).permute(1, 2, 0)

    def __call__(self, X: Tensor) -> Tensor:
        self.applications += X.shape[-1]
        return self.from_image(self.spec.adjoint(self.spec.apply(self.to_image(X), self.weight), self.weight))


def orthonormalize(Z: Tensor, against: Tensor | None = None) -> Tensor:
    """An orthonormal basis of ``span(Z)`` per group, orthogonal to the orthonormal columns of
    ``against``: two rounds of projection + SVQB (Stathopoulos & Wu 2002). Numerically
    dependent directions become zero columns (harmless in a Rayleigh--Ritz step)."""
    tiny, drop = torch.finfo(Z.dtype).tiny, max(1e-12, 100 * torch.finfo(Z.dtype).eps)
    for _ in range(2):
        if against is not None:
            Z = Z - against @ (against.mT @ Z)
        G = Z.mT @ Z
        d = G.diagonal(dim1=-2, dim2=-1).clamp_min(tiny).rsqrt()
        lam, V = torch.linalg.eigh(d[..., :, None] * G * d[..., None, :])
        keep = lam > drop * lam[..., -1:].clamp_min(tiny)
        scale = torch.where(keep, lam.clamp_min(tiny).rsqrt(), torch.zeros_like(lam))
        Z = Z @ (d[..., :, None] * V * scale[..., None, :])
    return Z


def rayleigh_ritz(X: Tensor, AX: Tensor, b: int) -> tuple[Tensor, Tensor, Tensor]:
    """Top-``b`` Ritz values (descending) and vectors of ``A`` in ``span(X)`` (``X`` orthonormal)."""
    H = X.mT @ AX
    theta, S = torch.linalg.eigh(0.5 * (H + H.mT))
    theta, S = theta.flip(-1)[..., :b], S.flip(-1)[..., :b]
    return theta, X @ S, AX @ S


@dataclass
class Ritz:
    """Result of :func:`lobpcg`: per-group top Ritz values ``theta`` ``(g, b)`` of exactly
    applied vectors ``X`` ``(g, D, b)``, their residual norms ``(g, b)``, and the cost."""

    theta: Tensor
    X: Tensor
    residual: Tensor
    iterations: int
    applications: int


def lobpcg(op: GramOperator, X0: Tensor, rtol: float = 1e-9, max_iter: int = 300, target: float = math.inf,
           bar=None) -> Ritz:
    """Largest eigenpairs of ``A = T^T T`` per group by block LOBPCG without preconditioner
    (Knyazev 2001, SIAM J. Sci. Comput. 23(2)), until the top residual of every group is
    ``<= rtol * theta_1`` (then an eigenvalue lies within ``rtol theta_1`` of ``theta_1``), the
    largest Ritz value reaches ``target`` (a lower bound good enough for the caller: e.g. within
    ``tol`` of a certified upper bound), or ``max_iter`` iterations. The search directions are
    applied to ``A`` explicitly each step (no implicit updates of ``A P``, whose rounding would
    corrupt converged residuals), and the final Ritz values come from freshly applied vectors:
    they are Rayleigh quotients. ``bar`` (a tqdm bar, optional) advances once per iteration.
    """
    b = X0.shape[-1]
    X = orthonormalize(X0)
    AX, P = op(X), None
    it = 0
    for it in range(1, max_iter + 1):  # noqa: B007 -- the count is reported after the loop
        theta, X, AX = rayleigh_ritz(X, AX, b)
        R = AX - X * theta[:, None, :]
        res = R.norm(dim=1)
        if bool((res[:, 0] <= rtol * theta[:, 0].abs()).all()) or float(theta[:, 0].max()) >= target:
            break
        if bar is not None:
            bar.update()
        W = orthonormalize(torch.cat([R, P], -1) if P is not None else R, X)
        _, Xn, AXn = rayleigh_ritz(torch.cat([X, W], -1), torch.cat([AX, op(W)], -1), b)
        P = Xn - X @ (X.mT @ Xn)
        X, AX = Xn, AXn
    AX = op(X)  # fresh: the reported values are exact Rayleigh quotients
    theta, X, AX = rayleigh_ritz(X, AX, b)
    res = (AX - X * theta[:, None, :]).norm(dim=1)
    return Ritz(theta, X, res, it, op.applications)


#: :func:`iterate` runs float32 LOBPCG first when the residual asked is at least this (relative): float32
#: iterations are faster (BENCHMARKS.md, engine internals); far below it float32's rounding would stall them.
FLOAT32_RTOL = 1e-5


def iterate(op: GramOperator, X0: Tensor, rtol: float, max_iter: int = 300, target: float = math.inf,
            bar=None) -> Ritz:
    """:func:`lobpcg` on ``op`` (float64) to the same stopping rule, the bulk of it in float32: with
    ``rtol >= FLOAT32_RTOL`` the iteration runs on a float32 copy of the operator first, then
    float64 LOBPCG continues from its vectors -- its first Rayleigh--Ritz step on freshly applied
    float64 vectors checks the rule again, so the result (values, vectors, residuals) is float64
    and what :func:`lobpcg` promises. The float32 phase only saves time: a lower end stays a
    Rayleigh quotient of the float64 operator. It gets half of ``max_iter`` (should it stall above
    ``rtol``, float64 has the rest). ``bar``: as in :func:`lobpcg`, over both phases."""
    iterations = 0
    if rtol >= FLOAT32_RTOL and op.weight.dtype == torch.float64 and max_iter > 1:
        fast = GramOperator(op.weight, op.spec, torch.float32)
        first = lobpcg(fast, X0.to(torch.float32), rtol, max_iter // 2, target, bar)
        X0, iterations = first.X.to(torch.float64), first.iterations
        op.applications += fast.applications
        del first, fast
    ritz = lobpcg(op, X0, rtol, max(1, max_iter - iterations), target, bar)
    ritz.iterations += iterations
    return ritz


def vector_bytes(weight: Tensor, spec: ConvSpec, ks: tuple[int, int], itemsize: int = 8) -> int:
    """Bytes of applying ``T^T T`` to one vector: the input, its padded copy, the output, the
    transposed convolution's padded result and the cropped (or folded) copy."""
    t, b, l, r = spec.pads(ks)
    (H, W), c_in = spec.in_size, spec.input_shape(weight)[0]
    pixels = c_in * H * W
    padded = c_in * (H + t + b) * (W + l + r)
    return itemsize * (2 * pixels + 2 * padded + weight.shape[0] * math.prod(spec.out_size(ks)))


def lobpcg_bytes(op: GramOperator, b: int) -> int:
    """Estimated peak bytes of :func:`lobpcg` with ``b`` vectors per group (float64): about 16
    blocks of ``(g, D, b)`` (``X``, ``AX``, ``P``, the residuals, the search directions and their
    images, the Rayleigh--Ritz concatenations) and the convolutions of ``2 b`` vectors at once."""
    ks = tuple(op.weight.shape[-2:])
    return 8 * 16 * b * op.g * op.dim + 2 * b * vector_bytes(op.weight, op.spec, ks)


def block_size(op: GramOperator, memory_budget: float = 1.0e9, cap: int = 6) -> int:
    """LOBPCG block size: ``cap`` vectors per group, fewer if the ~8 blocks of float64 vectors
    LOBPCG keeps would exceed ``memory_budget`` bytes."""
    return max(1, min(cap, op.dim, int(memory_budget // (8 * 8 * op.g * op.dim))))


def random_block(op: GramOperator, b: int, seed: int = 0) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(op.g, op.dim, b, generator=gen, dtype=torch.float64).to(op.weight.device)


def top_vector(op: GramOperator, ritz: Ritz) -> Tensor:
    """The top Ritz vector of the group holding the largest Ritz value, as an input image."""
    gi = int(ritz.theta[:, 0].argmax())
    mask = (torch.arange(op.g, device=ritz.X.device) == gi).to(ritz.X.dtype)[:, None, None]
    return op.to_image(ritz.X[:, :, :1] * mask)[0]

