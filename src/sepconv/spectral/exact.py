"""Exact singular values and norms, and certified brackets, for every conv geometry.

* **Circulant geometries** (circular padding aligned with the input, stride dividing it;
  1x1 kernels reading no padding): the operator is block-diagonalised by the 2-D DFT, so
  the norm is ``max_w sigma_max(K^(w))`` over per-frequency blocks -- with the polyphase
  form for stride, dilated kernels, the maximum over groups, and ``max |K^_c(w)|`` for
  depthwise (Sedghi et al. 2019; Senderovich et al. 2022; docs/spectral.md Sec. 1).
  :func:`fourier.block_max` finds it without a full SVD per frequency.
* **Everything else** (zero, reflect, replicate padding; cropped or repeated outputs):
  no closed form; a certified bracket (:func:`bracket`, :func:`norm_bracket`), searched by
  :mod:`sepconv.spectral.bracketing`: LOBPCG from below, the circulant majorant, Fantastic Four
  and a banded Cholesky certificate from above, dense SVDs for tiny layers.

:func:`~sepconv.spectral.methods.spectral_norm` (by method name) lives in
:mod:`sepconv.spectral.methods`, the method registry.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..errors import ConfigError
from . import fourier, validate
from .bracketing import (
    CERTIFICATE_BYTES,
    CERTIFICATE_FLOPS,
    DENSE_FLOPS,
    Bracket,
    bracket_args,
    check_problem,
    circulant_problem,
    is_pointwise,
    outward,
    solve,
)
from .spec import ConvSpec

__all__ = ["CERTIFICATE_BYTES", "CERTIFICATE_FLOPS", "DENSE_FLOPS", "Bracket", "bracket", "check_problem",
           "circulant_norm", "depthwise_channel_norms", "depthwise_norm", "depthwise_norms", "exact_norm",
           "norm_bracket", "singular_values", "upper_bound"]


def circulant_norm(weight: Tensor, spec: ConvSpec, tol: float = 1e-6, max_memory: float | None = None) -> Tensor:
    """**Exact** spectral norm of a convolution in a circulant geometry (raises otherwise).

    ``sigma = max_w ||M(w)||_2`` where ``M(w)`` is the polyphase block of the dilated kernel
    (``C_out/g x C_in s_h s_w / g``) at each frequency of the ``N/s`` grid, maximised over
    groups (a grouped convolution is block-diagonal: the norm is the **max** over groups, not
    a product); for depthwise ``sigma^2 = max_c max_xi (1/s^2) sum_q |K^_c(xi + qN/s)|^2``
    (Sedghi, Gupta, Long, ICLR 2019, Thm. 6; Senderovich et al., NeurIPS 2022, Sec. 3). Within
    relative ``tol`` (``0 < tol < 1``; float64; see :func:`fourier.block_max`), differentiable in
    ``weight``; half/bfloat16 weights are computed in float32. The frequency grid's memory is
    estimated first and refused above ``max_memory`` bytes (default 2 GiB).
    """
    weight, ks = validate.conv_weight(weight, spec, "circulant_norm")
    tol = validate.tolerance(tol, "circulant_norm")
    if not spec.is_circulant(ks):
        raise ConfigError(f"circulant_norm: {spec.describe(ks)} is not a circulant geometry")
    kernel, grid = circulant_problem(weight, spec)
    check_problem(weight, spec, ks, spec.in_size, spec.stride, "circulant_norm", max_memory)
    top = fourier.block_max(kernel.detach(), grid, tol)
    return fourier.block_value(kernel, grid, top.freq, top.group, top.value)


def depthwise_norm(weight: Tensor, spec: ConvSpec, max_memory: float | None = None) -> Tensor:
    """Exact spectral norm of a depthwise convolution (``groups == C_in``) in a circulant geometry.

    Each channel acts as a doubly block-circulant matrix, diagonalised by the 2-D DFT, so
    ``sigma = max_c max_w |K_c(w)|``; with stride ``s`` the aliased frequencies add up:
    ``sigma^2 = max_c max_w (1/s^2) sum_q |K_c(w + qN/s)|^2`` (Sedghi et al. 2019; Runkel et
    al. 2021, arXiv 2102.06496); with a depth multiplier ``m`` the ``m`` outputs of a channel
    add their powers. Exact for circular padding; for zero padding use :func:`spectral_norm`
    with ``method="fft"`` (a certified upper bound) or ``"exact"``.
    """
    weight, ks = validate.conv_weight(weight, spec, "depthwise_norm")
    if weight.shape[1] != 1:
        raise ConfigError(f"depthwise_norm: weight {tuple(weight.shape)} is not depthwise (C_in/groups must be 1)")
    return circulant_norm(weight, spec, max_memory=max_memory)


def depthwise_channel_norms(weights: list[Tensor], specs: list[ConvSpec],
                            max_memory: float | None = None) -> list[Tensor]:
    """Per-channel spectral norms of many depthwise convolutions at once, differentiable: one
    ``(groups,)`` tensor per layer (a channel with depth multiplier ``m`` is its ``m`` filters).

    Layers with the same kernel size and circulant majorant are stacked along the channel axis
    and evaluated by one separable DFT (:func:`fourier.vector_block_power`):
    ``sigma_c^2 = max_w (1/s^2) sum_q |K^_c(w + qN/s)|^2`` (Sedghi et al. 2019; Runkel et al. 2021,
    arXiv 2102.06496); with a depth multiplier ``m`` *and* a stride the polyphase blocks are
    ``m x s^2`` matrices, so their largest singular value per frequency is taken instead.
    **Exact** for circulant geometries (circular padding); for zero,
    reflect or replicate padding each value is the **certified upper bound** of
    :func:`bounds.fft_bound` for that channel alone (circular embedding; times the padding factor).
    Half/bfloat16 weights are computed in float32 and their norms returned in the weight's dtype
    (they scale that weight, e.g. in spectral normalization); each batch's spectra are estimated
    first and refused above ``max_memory`` bytes (default 2 GiB).
    """
    try:
        weights, specs = list(weights), list(specs)
    except TypeError:
        raise ConfigError("depthwise_norms: weights and specs must be lists of tensors and ConvSpecs") from None
    if len(weights) != len(specs):
        raise ConfigError(f"depthwise_norms: {len(weights)} weights but {len(specs)} specs")
    out: list[Tensor | None] = [None] * len(weights)
    batches: dict[tuple, list[int]] = {}
    majorants = []
    need: dict[tuple, int] = {}
    dtypes = [w.dtype if isinstance(w, Tensor) else None for w in weights]
    for i, (w, spec) in enumerate(zip(weights, specs)):
        w, ks = validate.conv_weight(w, spec, "depthwise_norms", name=f"weights[{i}]")
        weights[i] = w
        if w.shape[1] != 1:
            raise ConfigError(f"depthwise_norms: weights[{i}] {tuple(w.shape)} is not depthwise "
                              "(C_in/groups must be 1)")
        maj = fourier.majorant(spec, ks)
        majorants.append(maj)
        key = (tuple(ks), maj.grid, maj.stride, spec.dilation, w.shape[0] // spec.groups, w.dtype, w.device)
        batches.setdefault(key, []).append(i)
        need[key] = need.get(key, 0) + fourier.problem_bytes(w, maj.grid, maj.stride, spec.dilation, spec.groups)
        validate.check_memory(need[key], f"depthwise_norms: the spectra of weights[{i}] {tuple(w.shape)} "
                              f"{spec.describe(ks)} and the layers batched with it", max_memory)
    for (_, grid, stride, dilation, *_), idx in batches.items():
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
            if dtypes[i] != out[i].dtype:  # half / bfloat16: back to the weight's dtype
                out[i] = out[i].to(dtypes[i])
            start += k.shape[0]
    return out  # type: ignore[return-value]


def depthwise_norms(weights: list[Tensor], specs: list[ConvSpec], max_memory: float | None = None) -> Tensor:
    """Spectral norms of many depthwise convolutions at once, differentiable: ``(len(weights),)``.

    The maximum over channels of :func:`depthwise_channel_norms` (one batched DFT per kernel size
    and majorant): ``sigma^2 = max_c max_w (1/s^2) sum_q |K^_c(w + qN/s)|^2`` (Sedghi et al. 2019;
    Runkel et al. 2021, arXiv 2102.06496). **Exact** for circulant geometries (circular padding);
    for zero, reflect or replicate padding the value is the **certified upper bound** of
    :func:`bounds.fft_bound` (circular embedding; times the padding factor). Gradients flow to
    every weight (the subgradient of the maximum). Half/bfloat16 weights are computed in float32
    (the stacked result is in the weights' common promoted dtype).
    """
    return torch.stack([n.max() for n in depthwise_channel_norms(weights, specs, max_memory)])



def singular_values(weight: Tensor, spec: ConvSpec, dense_limit: float = DENSE_FLOPS,
                    max_memory: float | None = None) -> Tensor:
    """Every singular value of the layer (``min(rows, cols)`` of them), sorted descending.

    Circulant geometries: **exact**, the union over frequencies (and groups) of the
    singular values of the polyphase blocks (Sedghi et al. 2019, Thm. 6). Other geometries
    have no such structure: small ones are answered by dense SVDs of the operator -- one per
    group, a grouped conv being block-diagonal -- (exact), larger ones (more than
    ``dense_limit`` flops) are refused with a :class:`~sepconv.errors.ConfigError`. Half/bfloat16
    weights are computed in float32 (the result is float32). The memory of either route is
    estimated first and refused (:class:`~sepconv.errors.ResourceError`) above ``max_memory``
    bytes (default 2 GiB).
    """
    weight, ks = validate.conv_weight(weight, spec, "singular_values")
    dense_limit = validate.nonnegative(dense_limit, "singular_values", "dense_limit")
    if spec.is_circulant(ks):
        kernel, grid = circulant_problem(weight, spec)
        check_problem(weight, spec, ks, spec.in_size, spec.stride, "singular_values", max_memory, kind="all")
        return fourier.all_block_singular_values(kernel, grid)
    g = spec.groups
    rows = weight.shape[0] // g * math.prod(spec.out_size(ks))
    cols = weight.shape[1] * math.prod(spec.in_size)
    if g * rows * cols * min(rows, cols) > dense_limit:
        raise ConfigError(
            f"singular_values: {spec.describe(ks)} is not circulant and its {g} {rows}x{cols} operator block(s) are "
            "too large for a dense SVD; use norm_bracket for the largest singular value"
        )
    with fourier.lapack_threads():
        sv = torch.linalg.svdvals(spec.group_operators(weight, max_memory=max_memory))
    return sv.flatten().sort(descending=True).values if g > 1 else sv[0]


def bracket(weight: Tensor, spec: ConvSpec, tol: float = 1e-6, max_iter: int = 500,
            certificate_flops: float | None = None, dense_flops: float = DENSE_FLOPS,
            seed: int = 0, lower: bool = True, max_memory: float | None = None) -> Bracket:
    """Certified ``lower <= sigma_max(T) <= upper`` for any geometry, aiming at ``upper/lower <= 1 + tol``.

    Circulant: exact (both ends within ``tol``). A 1x1 conv with zero padding, any stride: exact,
    ``||W||_2`` by one SVD (:func:`~.bracketing.is_pointwise`). Grouped convs (depthwise included) are
    block-diagonal, ``sigma = max_g sigma(T_g)``: small groups are solved by dense SVDs, in the
    order of their certified Fantastic Four bounds, until no remaining group can hold the
    maximum (the maximising group is recorded in ``group``), or, where that would cost more than
    the whole operator's certified search (matrix blocks, by a flop estimate:
    :func:`~.bracketing._whole_is_cheaper`), by that search. Small operators: a dense SVD.
    Otherwise block LOBPCG until the top residual is ``<= min(1e-2, 0.1 sqrt(tol))`` relative (the
    *residual rule*: an eigenvalue of ``T^T T`` lies that close to the top Ritz value; float32
    iterations first, the rule checked in float64: :func:`~.iterative.iterate`), then the upper end
    is the smallest of the circulant majorant, Fantastic Four, and -- if affordable -- the banded
    Cholesky certificate at ``lower (1 + tol)``; the iteration goes on, to ``tol/10`` and below,
    where the certificate fails or, with none affordable, where the upper end lies within ``2 tol``
    of the lower one. If nothing certifies ``tol`` the bracket is still valid, only wider.
    ``lower=False`` skips the iteration when no certificate can use it (the lower end is then 0).

    Memory: every route estimates its bytes first (dense operators and their SVD workspace, the
    frequency grid, the LOBPCG vectors, the certificate) and stays within ``max_memory`` bytes
    (default 2 GiB, :func:`sepconv.spectral.validate.budget`): a route that does not fit is
    skipped for the next cheaper certified one (dense SVD -> LOBPCG + certificate; majorant ->
    Fantastic Four), and when none fits a :class:`~sepconv.errors.ResourceError` names the layer
    geometry and the estimate. Arguments are validated: ``0 < tol < 1``, ``1 <= max_iter <= 10^6``,
    finite weights; half/bfloat16 weights are computed like the others (in float64).
    ``certificate_flops``: the most the certificate may cost (default ``None``:
    :data:`~.bracketing.CERTIFICATE_FLOPS`, 2e11, or what :func:`~.bracketing.certificate_budget`
    sets around the call).
    """
    weight, ks = validate.conv_weight(weight, spec, "bracket")
    args = bracket_args("bracket", tol, max_iter, certificate_flops, dense_flops, seed, max_memory)
    return solve(weight, spec, ks, *args, lower=bool(lower))



def exact_norm(weight: Tensor, spec: ConvSpec, tol: float = 1e-6, max_iter: int = 500,
               certificate_flops: float | None = None, dense_flops: float = DENSE_FLOPS,
               max_memory: float | None = None) -> Tensor:
    """The largest singular value of the map ``nn.Conv2d`` computes at ``spec.in_size``, within ``tol``.

    **Exact** and certified for circulant geometries (:func:`circulant_norm`), 1x1 convs with
    zero padding at any stride (``||W||_2``, the max over groups) and small operators (dense SVD;
    for a grouped or depthwise conv the SVD of the maximising group's block only, found by
    :func:`bracket` -- the norm of a block-diagonal operator is the max over its blocks).
    Elsewhere the value is the lower end of :func:`bracket`: a Rayleigh quotient of the converged
    top Ritz vector, exact to ``tol`` under the residual rule, and *certified* to ``tol`` when the
    banded Cholesky certificate fits the budget (``norm_bracket`` reports the guaranteed interval
    in every case). Differentiable: the gradient is that of ``||T v||`` at the (fixed) top singular
    vector ``v``. Half/bfloat16 weights are computed in float32 (the result is float32). Memory
    stays within ``max_memory`` bytes (default 2 GiB; see :func:`bracket`).
    """
    weight, ks = validate.conv_weight(weight, spec, "exact_norm")
    args = bracket_args("exact_norm", tol, max_iter, certificate_flops, dense_flops, 0, max_memory)
    if is_pointwise(spec, ks):  # a 1x1 conv, zero padding, any stride: ||W||_2, the max over groups
        g = spec.groups
        mats = weight.to(torch.float64).reshape(g, weight.shape[0] // g, weight.shape[1])
        with fourier.lapack_threads():
            return torch.linalg.matrix_norm(mats, ord=2).max().to(weight.dtype)
    if spec.is_circulant(ks):
        return circulant_norm(weight, spec, args[0], max_memory=args[-1])
    br = solve(weight, spec, ks, *args)
    if br.how == "dense":  # the SVD in float64 (the bracket's), differentiably cast back to the weight's dtype
        w64 = weight.to(torch.float64)
        with fourier.lapack_threads():
            if br.group is not None:  # grouped: the maximising block alone
                idx = torch.tensor([br.group], device=weight.device)
                s = torch.linalg.svdvals(spec.group_operators(w64, idx, max_memory=args[-1]))[0, 0]
            else:
                s = torch.linalg.svdvals(spec.dense_operator(w64, max_memory=args[-1]))[0]
        return s.to(weight.dtype)
    if br.vector is None:  # not reached: with a lower end every other route iterates
        return torch.tensor(br.lower, dtype=weight.dtype, device=weight.device)
    v = br.vector.to(weight.dtype)[None]
    # norms accumulated in float64: a float32 sum over a large output loses ~1e-5 relative
    num = torch.linalg.vector_norm(spec.apply(v, weight), dtype=torch.float64)
    return (num / torch.linalg.vector_norm(v, dtype=torch.float64)).to(weight.dtype)



def norm_bracket(weight: Tensor, spec: ConvSpec, tol: float = 1e-4, max_iter: int = 500,
                 certificate_flops: float | None = None, dense_flops: float = DENSE_FLOPS, seed: int = 0,
                 lower: bool = True, max_memory: float | None = None) -> tuple[Tensor, Tensor]:
    """``(lower, upper)`` with ``lower <= sigma_max <= upper`` **guaranteed**, for any geometry.

    The lower end comes from the iteration (a Rayleigh quotient), the upper end is the
    tightest certified bound available for the geometry: exact where circulant, a dense SVD
    for tiny layers (per group for grouped convs), the banded Cholesky certificate (within
    ``tol``) when affordable, else the circulant majorant or Fantastic Four. See :func:`bracket`
    for the options, the validation (``0 < tol < 1``) and the memory budget ``max_memory``
    (default 2 GiB). Returned in the weight's dtype -- float32 for half/bfloat16 weights, which
    are computed like the others -- rounded outwards so the bracket stays a bracket.
    """
    return _norm_bracket("norm_bracket", weight, spec, tol, max_iter, certificate_flops, dense_flops, seed,
                         lower=lower, max_memory=max_memory)


def upper_bound(weight: Tensor, spec: ConvSpec, tol: float = 1e-4, max_iter: int = 200,
                max_memory: float | None = None) -> Tensor:
    """The tightest **certified upper bound** available for the geometry: the upper end of
    :func:`norm_bracket` with ``lower=False`` (exact where circulant, a dense SVD for tiny layers,
    the banded Cholesky certificate within ``tol`` when affordable -- its LOBPCG lower end, of at
    most ``max_iter`` iterations, only sharpens it -- else the circulant majorant or Fantastic
    Four; docs/spectral.md Sec. 2-6). Not differentiable (a number from the search, returned in
    the weight's dtype, rounded upwards). Validated and memory-bounded like :func:`bracket`.
    """
    return _norm_bracket("upper_bound", weight, spec, tol, max_iter, None, DENSE_FLOPS, 0,
                         lower=False, max_memory=max_memory)[1]


def _norm_bracket(where: str, weight: Tensor, spec: ConvSpec, *args, lower: bool, max_memory) -> tuple[Tensor, Tensor]:
    """:func:`norm_bracket` as ``where``: ``args`` are its ``tol, max_iter, certificate_flops,
    dense_flops, seed``."""
    weight, ks = validate.conv_weight(weight, spec, where)
    br = solve(weight, spec, ks, *bracket_args(where, *args, max_memory), lower=bool(lower))
    validate.finite_result(br.upper, where)
    return outward(br.lower, weight, -math.inf), outward(br.upper, weight, math.inf)
