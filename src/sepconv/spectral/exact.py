"""Exact singular values and norms, and certified brackets, for every conv geometry.

* **Circulant geometries** (circular padding aligned with the input, stride dividing it;
  1x1 kernels reading no padding): the operator is block-diagonalised by the 2-D DFT, so
  the norm is ``max_w sigma_max(K^(w))`` over per-frequency blocks -- with the polyphase
  form for stride, dilated kernels, the maximum over groups, and ``max |K^_c(w)|`` for
  depthwise (Sedghi et al. 2019; Senderovich et al. 2022; reference/spectral.md Sec. 1).
  :func:`fourier.block_max` finds it without a full SVD per frequency.
* **Everything else** (zero, reflect, replicate padding; cropped or repeated outputs):
  no closed form. A certified bracket: the lower end is a Rayleigh quotient from block
  LOBPCG on ``T^T T`` (warm-started from the circulant majorant's top mode), the upper end
  the tightest certified bound available -- the circulant majorant / Fantastic Four, and a
  block-banded Cholesky certificate of ``mu I - T^T T`` at ``mu = (lower (1 + tol))^2``
  (:mod:`sepconv.spectral.certify`) whenever its cost fits the budget; tiny layers are
  solved by a dense SVD.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import ConfigError
from . import bounds, certify, fourier, iterative
from .spec import ConvSpec

#: Dense SVD of the operator when ``rows * cols * min(rows, cols)`` is at most this.
DENSE_FLOPS = 3e9
#: Banded Cholesky certificate when its flop count and memory are at most these.
CERTIFICATE_FLOPS = 2e11
CERTIFICATE_BYTES = 1.5e9


@dataclass
class Bracket:
    """``lower <= sigma_max <= upper`` (certified); ``how`` names what certified the upper end
    (``circulant``, ``dense``, ``cholesky``, ``majorant``, ``fantastic4``); ``vector`` the
    estimated top right singular vector ``(C_in, H, W)`` where an iteration produced one."""

    lower: float
    upper: float
    how: str
    vector: Tensor | None = None
    freq: tuple[int, int] | None = None
    group: int | None = None


def _circulant(weight: Tensor, spec: ConvSpec) -> tuple[Tensor, tuple[int, int]]:
    kernel = fourier.circulant_kernel(weight, spec.stride, spec.dilation, spec.groups)
    return kernel, (spec.in_size[0] // spec.stride[0], spec.in_size[1] // spec.stride[1])


def circulant_norm(weight: Tensor, spec: ConvSpec, tol: float = 1e-6) -> Tensor:
    """**Exact** spectral norm of a convolution in a circulant geometry (raises otherwise).

    ``sigma = max_w ||M(w)||_2`` where ``M(w)`` is the polyphase block of the dilated kernel
    (``C_out/g x C_in s_h s_w / g``) at each frequency of the ``N/s`` grid, maximised over
    groups (a grouped convolution is block-diagonal: the norm is the **max** over groups, not
    a product); for depthwise ``sigma^2 = max_c max_xi (1/s^2) sum_q |K^_c(xi + qN/s)|^2``
    (Sedghi, Gupta, Long, ICLR 2019, Thm. 6; Senderovich et al., NeurIPS 2022, Sec. 3). Within
    relative ``tol`` (float64; see :func:`fourier.block_max`), differentiable in ``weight``.
    """
    ks = spec.check(weight)
    if not spec.is_circulant(ks):
        raise ConfigError(f"circulant_norm: {spec.describe(ks)} is not a circulant geometry")
    kernel, grid = _circulant(weight, spec)
    top = fourier.block_max(kernel.detach(), grid, tol)
    return fourier.block_value(kernel, grid, top.freq, top.group, top.value)


def depthwise_norm(weight: Tensor, spec: ConvSpec) -> Tensor:
    """Exact spectral norm of a depthwise convolution (``groups == C_in``) in a circulant geometry.

    Each channel acts as a doubly block-circulant matrix, diagonalised by the 2-D DFT, so
    ``sigma = max_c max_w |K_c(w)|``; with stride ``s`` the aliased frequencies add up:
    ``sigma^2 = max_c max_w (1/s^2) sum_q |K_c(w + qN/s)|^2`` (Sedghi et al. 2019; Runkel et
    al. 2021, arXiv 2102.06496); with a depth multiplier ``m`` the ``m`` outputs of a channel
    add their powers. Exact for circular padding; for zero padding use :func:`spectral_norm`
    with ``method="fft"`` (a certified upper bound) or ``"exact"``.
    """
    ks = spec.check(weight)
    if weight.shape[1] != 1:
        raise ConfigError(f"depthwise_norm: weight {tuple(weight.shape)} is not depthwise (C_in/groups must be 1)")
    return circulant_norm(weight, spec)


def depthwise_channel_norms(weights: list[Tensor], specs: list[ConvSpec]) -> list[Tensor]:
    """Per-channel spectral norms of many depthwise convolutions at once, differentiable: one
    ``(groups,)`` tensor per layer (a channel with depth multiplier ``m`` is its ``m`` filters).

    Layers with the same kernel size and circulant majorant are stacked along the channel axis
    and evaluated by one separable DFT (:func:`fourier.vector_block_power`):
    ``sigma_c^2 = max_w (1/s^2) sum_q |K^_c(w + qN/s)|^2`` (Sedghi et al. 2019; Runkel et al. 2021,
    arXiv 2102.06496); with a depth multiplier ``m`` *and* a stride the polyphase blocks are
    ``m x s^2`` matrices, so their largest singular value per frequency is taken instead. **Exact** for circulant geometries (circular padding); for zero,
    reflect or replicate padding each value is the **certified upper bound** of
    :func:`bounds.fft_bound` for that channel alone (circular embedding; times the padding factor).
    """
    if len(weights) != len(specs):
        raise ConfigError(f"depthwise_norms: {len(weights)} weights but {len(specs)} specs")
    out: list[Tensor | None] = [None] * len(weights)
    batches: dict[tuple, list[int]] = {}
    majorants = []
    for i, (w, spec) in enumerate(zip(weights, specs)):
        ks = spec.check(w, name=f"weights[{i}]")
        if w.shape[1] != 1:
            raise ConfigError(f"depthwise_norms: weights[{i}] {tuple(w.shape)} is not depthwise (C_in/groups must be 1)")
        maj = fourier.majorant(spec, ks)
        majorants.append(maj)
        key = (tuple(ks), maj.grid, maj.stride, spec.dilation, w.shape[0] // spec.groups, w.dtype, w.device)
        batches.setdefault(key, []).append(i)
    for (ks, grid, stride, dilation, *_), idx in batches.items():
        kernels = [fourier.circulant_kernel(weights[i], stride, dilation, specs[i].groups) for i in idx]
        kernel, sub = torch.cat(kernels, 0), (grid[0] // stride[0], grid[1] // stride[1])
        if kernel.shape[1] > 1 and kernel.shape[2] > 1:
            # depth multiplier *and* stride: each block is an m x s^2 matrix, not a vector
            fh, fw = fourier.unique_frequencies(sub, kernel.device)
            peak = torch.linalg.matrix_norm(fourier.symbol(kernel, sub, fh, fw), ord=2).amax(0)
        elif kernel.requires_grad and torch.is_grad_enabled():
            # find each channel's peak without a graph, then differentiate there only
            with torch.no_grad():
                power = fourier.vector_block_power(kernel, sub).flatten(1)  # (g, Mh * (Mw//2 + 1))
                arg = power.argmax(1)
            fh, fw = arg // (sub[1] // 2 + 1), arg % (sub[1] // 2 + 1)
            peak = fourier.vector_block_power_at(kernel, sub, fh, fw).sqrt()
        else:
            peak = fourier.vector_block_power(kernel, sub).amax((-2, -1)).sqrt()
        start = 0
        for i, k in zip(idx, kernels):
            f = majorants[i].factor
            out[i] = peak[start: start + k.shape[0]] * f if f != 1.0 else peak[start: start + k.shape[0]]
            start += k.shape[0]
    return out  # type: ignore[return-value]


def depthwise_norms(weights: list[Tensor], specs: list[ConvSpec]) -> Tensor:
    """Spectral norms of many depthwise convolutions at once, differentiable: ``(len(weights),)``.

    The maximum over channels of :func:`depthwise_channel_norms` (one batched DFT per kernel size
    and majorant): ``sigma^2 = max_c max_w (1/s^2) sum_q |K^_c(w + qN/s)|^2`` (Sedghi et al. 2019;
    Runkel et al. 2021, arXiv 2102.06496). **Exact** for circulant geometries (circular padding);
    for zero, reflect or replicate padding the value is the **certified upper bound** of
    :func:`bounds.fft_bound` (circular embedding; times the padding factor). Gradients flow to
    every weight (the subgradient of the maximum).
    """
    return torch.stack([n.max() for n in depthwise_channel_norms(weights, specs)])


def singular_values(weight: Tensor, spec: ConvSpec, dense_limit: float = DENSE_FLOPS) -> Tensor:
    """Every singular value of the layer (``min(rows, cols)`` of them), sorted descending.

    Circulant geometries: **exact**, the union over frequencies (and groups) of the
    singular values of the polyphase blocks (Sedghi et al. 2019, Thm. 6). Other geometries
    have no such structure: small ones are answered by a dense SVD of the operator (exact),
    larger ones are refused.
    """
    ks = spec.check(weight)
    if spec.is_circulant(ks):
        kernel, grid = _circulant(weight, spec)
        return fourier.all_block_singular_values(kernel, grid)
    rows = weight.shape[0] * math.prod(spec.out_size(ks))
    cols = math.prod(spec.input_shape(weight))
    if rows * cols * min(rows, cols) > dense_limit:
        raise ConfigError(
            f"singular_values: {spec.describe(ks)} is not circulant and its {rows}x{cols} operator is too "
            "large for a dense SVD; use norm_bracket for the largest singular value"
        )
    with fourier.lapack_threads():
        return torch.linalg.svdvals(spec.dense_operator(weight))


def _warm_start(op: iterative.GramOperator, kernel: Tensor, maj: fourier.Majorant, top: fourier.BlockMax,
                b: int, seed: int) -> Tensor:
    """Starting block for LOBPCG: the real and imaginary parts of the majorant's top circulant
    mode (a plane wave times the top right singular vector of its frequency block, mapped from
    polyphase to pixel coordinates and cut to the input window), then random vectors."""
    X = iterative.random_block(op, b, seed)
    (sh, sw), (mh, mw) = maj.stride, (maj.grid[0] // maj.stride[0], maj.grid[1] // maj.stride[1])
    blk = fourier.symbol(kernel[top.group: top.group + 1].to(torch.float64), (mh, mw),
                         torch.tensor([top.freq[0]]), torch.tensor([top.freq[1]]))[0, 0]
    v = torch.linalg.svd(blk)[2][0].conj()  # top right singular vector, (c * sh * sw,)
    c = v.numel() // (sh * sw)
    ph = torch.exp(2j * math.pi * (top.freq[0] * torch.arange(mh, dtype=torch.float64)[:, None] / mh
                                   + top.freq[1] * torch.arange(mw, dtype=torch.float64)[None, :] / mw))
    img = (v.reshape(c, sh, sw)[:, :, :, None, None] * ph.conj()).permute(0, 3, 1, 4, 2).reshape(c, mh * sh, mw * sw)
    H, W = op.spec.in_size
    img = img[:, :H, :W]
    k = 0
    for part in (img.real, img.imag):
        if k < b and img.shape[1:] == (H, W) and float(part.norm()) > 1e-8:
            X[top.group, :, k] = part.reshape(-1).to(X)
            k += 1
    return X


def bracket(weight: Tensor, spec: ConvSpec, tol: float = 1e-6, max_iter: int = 500,
            certificate_flops: float = CERTIFICATE_FLOPS, dense_flops: float = DENSE_FLOPS,
            seed: int = 0, lower: bool = True) -> Bracket:
    """Certified ``lower <= sigma_max(T) <= upper`` for any geometry, aiming at ``upper/lower <= 1 + tol``.

    Circulant: exact (both ends within ``tol``). Small operators: a dense SVD. Otherwise
    block LOBPCG until the top residual is ``<= tol/10`` relative (the *residual rule*: an
    eigenvalue of ``T^T T`` lies that close to the top Ritz value), then the upper end is the
    smallest of the circulant majorant, Fantastic Four, and -- if affordable -- the banded
    Cholesky certificate at ``lower (1 + tol)``. If nothing certifies ``tol`` the bracket is
    still valid, only wider. ``lower=False`` skips the iteration when no certificate can use it
    (the lower end is then 0).
    """
    ks = spec.check(weight)
    w64 = weight.detach().to(torch.float64)
    if spec.is_circulant(ks):
        kernel, grid = _circulant(w64, spec)
        top = fourier.block_max(kernel, grid, tol)
        return Bracket(math.sqrt(top.value), math.sqrt(top.upper), "circulant", None, top.freq, top.group)
    maj = fourier.majorant(spec, ks)
    kernel = fourier.circulant_kernel(w64, maj.stride, spec.dilation, spec.groups)
    top = fourier.block_max(kernel, (maj.grid[0] // maj.stride[0], maj.grid[1] // maj.stride[1]), tol)
    upper, how = maj.factor * math.sqrt(top.upper), "majorant"
    f4 = float(bounds.fantastic_four(w64, spec))
    if f4 < upper:
        upper, how = f4, "fantastic4"
    if spec.groups > 1:  # block-diagonal: the groups' dense SVDs, never the whole operator's
        br = _grouped_dense_bracket(w64, spec, ks, upper, how, dense_flops)
        if br is not None:
            return br
    rows = weight.shape[0] * math.prod(spec.out_size(ks))
    cols = math.prod(spec.input_shape(weight))
    if rows * cols * min(rows, cols) <= dense_flops:
        with fourier.lapack_threads():
            s = float(torch.linalg.svdvals(spec.dense_operator(w64))[0])
        margin = 4 * max(rows, cols) * torch.finfo(torch.float64).eps  # LAPACK: |s - sigma| <= p(n) u sigma
        return Bracket(s * (1 - margin), min(upper, s * (1 + margin)), "dense")
    flops, nbytes = certify.certificate_cost(w64, spec)
    affordable = flops <= certificate_flops and nbytes <= CERTIFICATE_BYTES
    if not lower and not affordable:
        return Bracket(0.0, upper, how)
    op = iterative.GramOperator(w64, spec)
    b = iterative.block_size(op)
    # Ritz values converge like residual^2 / gap: start loose, tighten only if the certificate fails
    rtol = min(1e-2, 0.1 * math.sqrt(tol)) if affordable else tol / 10
    ritz = iterative.lobpcg(op, _warm_start(op, kernel, maj, top, b, seed), rtol=rtol, max_iter=max_iter)
    lo = math.sqrt(max(0.0, float(ritz.theta[:, 0].max())))
    if upper > lo * (1 + tol) and affordable:
        bg = certify.BandedGram(w64, spec)
        for attempt in range(4):
            mu = (lo * (1 + tol)) ** 2
            if bool(certify.cholesky_certificate(bg, mu).all()):
                upper, how = min(upper, math.sqrt(mu)), "cholesky"
                break
            # some group has an eigenvalue above mu: iterate further (the last attempt from a fresh block)
            rtol /= 10
            X0 = ritz.X if attempt < 2 else iterative.random_block(op, min(op.dim, b + 2), seed + attempt + 1)
            ritz = iterative.lobpcg(op, X0, rtol=rtol, max_iter=max_iter)
            lo = max(lo, math.sqrt(max(0.0, float(ritz.theta[:, 0].max()))))
    return Bracket(lo, max(upper, lo), how, iterative.top_vector(op, ritz))


def _grouped_dense_bracket(w64: Tensor, spec: ConvSpec, ks: tuple[int, int], upper: float, how: str,
                           dense_flops: float, budget_bytes: float = 2**27) -> Bracket | None:
    """A grouped (e.g. depthwise) convolution is block-diagonal: ``sigma = max_g sigma(T_g)``, and
    each group is a small operator. Groups are visited in decreasing order of their certified
    Fantastic Four bound and solved by a dense SVD in batches, until every remaining group's bound
    is below the best value found (then none of them can hold the maximum). Exact (LAPACK's
    backward-stable SVD, with its rounding margin); ``None`` when one group is too large for a
    dense SVD."""
    g = spec.groups
    rows = (w64.shape[0] // g) * math.prod(spec.out_size(ks))
    cols = w64.shape[1] * math.prod(spec.in_size)
    if rows * cols * min(rows, cols) > dense_flops:
        return None
    f4 = bounds._fantastic_four_groups(w64, spec).min(0).values  # certified, per group
    order = f4.argsort(descending=True)
    margin = 4 * max(rows, cols) * torch.finfo(torch.float64).eps
    step = max(1, int(budget_bytes // (8 * rows * cols)))
    best = 0.0
    for i in range(0, g, step):
        idx = order[i:i + step]
        if float(f4[idx[0]]) <= best * (1 - margin):
            break  # every remaining group is certified below the best one
        with fourier.lapack_threads():
            best = max(best, float(torch.linalg.svdvals(spec.group_operators(w64, idx))[:, 0].max()))
    return Bracket(best * (1 - margin), min(upper, best * (1 + margin)), "dense")


def exact_norm(weight: Tensor, spec: ConvSpec, tol: float = 1e-6, max_iter: int = 500,
               certificate_flops: float = CERTIFICATE_FLOPS, dense_flops: float = DENSE_FLOPS) -> Tensor:
    """The largest singular value of the map ``nn.Conv2d`` computes at ``spec.in_size``, within ``tol``.

    **Exact** and certified for circulant geometries (:func:`circulant_norm`) and small
    operators (dense SVD). Elsewhere the value is the lower end of :func:`bracket`: a
    Rayleigh quotient of the converged top Ritz vector, exact to ``tol`` under the residual
    rule, and *certified* to ``tol`` when the banded Cholesky certificate fits the budget
    (``norm_bracket`` reports the guaranteed interval in every case). Differentiable: the
    gradient is that of ``||T v||`` at the (fixed) top singular vector ``v``.
    """
    ks = spec.check(weight)
    if spec.is_circulant(ks):
        return circulant_norm(weight, spec, tol)
    br = bracket(weight, spec, tol, max_iter, certificate_flops, dense_flops)
    if br.how == "dense" or br.vector is None:
        with fourier.lapack_threads():
            return torch.linalg.svdvals(spec.dense_operator(weight))[0]
    v = br.vector.to(weight.dtype)[None]
    return spec.apply(v, weight).norm() / v.norm()


def norm_bracket(weight: Tensor, spec: ConvSpec, tol: float = 1e-4, **kw) -> tuple[Tensor, Tensor]:
    """``(lower, upper)`` with ``lower <= sigma_max <= upper`` **guaranteed**, for any geometry.

    The lower end comes from the iteration (a Rayleigh quotient), the upper end is the
    tightest certified bound available for the geometry: exact where circulant, a dense SVD
    for tiny layers, the banded Cholesky certificate (within ``tol``) when affordable, else the
    circulant majorant or Fantastic Four. See :func:`bracket` for the options.
    """
    br = bracket(weight, spec, tol, **kw)
    return _outward(br.lower, weight, -math.inf), _outward(br.upper, weight, math.inf)


def _outward(v: float, like: Tensor, direction: float) -> Tensor:
    """``v`` in ``like``'s dtype, rounded towards ``direction`` so a bracket stays a bracket."""
    t = torch.tensor(v, dtype=like.dtype, device=like.device)
    if (float(t) - v) * direction < 0:
        t = torch.nextafter(t, torch.tensor(direction, dtype=like.dtype, device=like.device))
    return t


METHODS = ("exact", "fft", "gram", "fantastic4", "power", "reshape")


def spectral_norm(weight: Tensor, spec: ConvSpec, method: str = "exact", **kw) -> Tensor:
    """Spectral norm of the convolution ``(weight, spec)`` by ``method``, a 0-dim tensor.

    * ``exact`` -- the true largest singular value within ``tol`` (:func:`exact_norm`);
    * ``fft`` -- certified upper bound by circular embedding (exact for circular padding;
      :func:`bounds.fft_bound`);
    * ``gram`` -- certified upper bound by Gram iteration, Delattre et al. 2023
      (:func:`bounds.gram_iteration`, ``iters``);
    * ``fantastic4`` -- certified upper bound of Singla & Feizi 2021 (:func:`bounds.fantastic_four`);
    * ``power`` -- operator power iteration, an estimate from below (:func:`iterative.power_iteration`,
      ``iters``, ``x``);
    * ``reshape`` -- torch's ``spectral_norm`` value, neither a bound nor exact (:func:`bounds.reshape_norm`).
    """
    spec.check(weight)
    if method == "exact":
        return exact_norm(weight, spec, **kw)
    if method == "fft":
        return bounds.fft_bound(weight, spec, **kw)
    if method == "gram":
        return bounds.gram_iteration(weight, spec, **kw)
    if method == "fantastic4":
        return bounds.fantastic_four(weight, spec, **kw)
    if method == "power":
        return iterative.power_iteration(weight, spec, **kw)[0]
    if method == "reshape":
        return bounds.reshape_norm(weight, **kw)
    raise ConfigError(f"spectral_norm: unknown method {method!r}; choose one of {', '.join(METHODS)}")
