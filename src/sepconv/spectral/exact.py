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

import inspect
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import ConfigError, ResourceError
from . import bounds, certify, fourier, iterative, validate
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
    estimated top right singular vector ``(C_in, H, W)`` where an iteration produced one;
    ``freq`` and ``group`` the maximising frequency block (circulant) or group (grouped dense SVDs)."""

    lower: float
    upper: float
    how: str
    vector: Tensor | None = None
    freq: tuple[int, int] | None = None
    group: int | None = None


def _circulant(weight: Tensor, spec: ConvSpec) -> tuple[Tensor, tuple[int, int]]:
    kernel = fourier.circulant_kernel(weight, spec.stride, spec.dilation, spec.groups)
    return kernel, (spec.in_size[0] // spec.stride[0], spec.in_size[1] // spec.stride[1])


def _problem_what(where: str, weight: Tensor, spec: ConvSpec, ks, grid) -> str:
    return (f"{where}: the frequency blocks of the conv {tuple(weight.shape)} {spec.describe(ks)} on a "
            f"{grid[0]}x{grid[1]} grid")


def check_problem(weight: Tensor, spec: ConvSpec, ks, grid, stride, where: str, max_memory: float | None,
                  kind: str = "max") -> None:
    """Refuse (:class:`~sepconv.errors.ResourceError`) a circulant problem on ``grid`` whose estimated
    memory (:func:`fourier.problem_bytes`) exceeds the budget, naming the layer geometry."""
    nbytes = fourier.problem_bytes(weight, grid, stride, spec.dilation, spec.groups, kind)
    validate.check_memory(nbytes, _problem_what(where, weight, spec, ks, grid), max_memory)


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
    kernel, grid = _circulant(weight, spec)
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


def depthwise_channel_norms(weights: list[Tensor], specs: list[ConvSpec], max_memory: float | None = None) -> list[Tensor]:
    """Per-channel spectral norms of many depthwise convolutions at once, differentiable: one
    ``(groups,)`` tensor per layer (a channel with depth multiplier ``m`` is its ``m`` filters).

    Layers with the same kernel size and circulant majorant are stacked along the channel axis
    and evaluated by one separable DFT (:func:`fourier.vector_block_power`):
    ``sigma_c^2 = max_w (1/s^2) sum_q |K^_c(w + qN/s)|^2`` (Sedghi et al. 2019; Runkel et al. 2021,
    arXiv 2102.06496); with a depth multiplier ``m`` *and* a stride the polyphase blocks are
    ``m x s^2`` matrices, so their largest singular value per frequency is taken instead. **Exact** for circulant geometries (circular padding); for zero,
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
            raise ConfigError(f"depthwise_norms: weights[{i}] {tuple(w.shape)} is not depthwise (C_in/groups must be 1)")
        maj = fourier.majorant(spec, ks)
        majorants.append(maj)
        key = (tuple(ks), maj.grid, maj.stride, spec.dilation, w.shape[0] // spec.groups, w.dtype, w.device)
        batches.setdefault(key, []).append(i)
        need[key] = need.get(key, 0) + fourier.problem_bytes(w, maj.grid, maj.stride, spec.dilation, spec.groups)
        validate.check_memory(need[key], f"depthwise_norms: the spectra of weights[{i}] {tuple(w.shape)} "
                              f"{spec.describe(ks)} and the layers batched with it", max_memory)
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
        kernel, grid = _circulant(weight, spec)
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
            seed: int = 0, lower: bool = True, max_memory: float | None = None) -> Bracket:
    """Certified ``lower <= sigma_max(T) <= upper`` for any geometry, aiming at ``upper/lower <= 1 + tol``.

    Circulant: exact (both ends within ``tol``). Grouped convs (depthwise included) are
    block-diagonal, ``sigma = max_g sigma(T_g)``: small groups are solved by dense SVDs, in the
    order of their certified Fantastic Four bounds, until no remaining group can hold the
    maximum (the maximising group is recorded in ``group``). Small operators: a dense SVD.
    Otherwise block LOBPCG until the top residual is ``<= tol/10`` relative (the *residual
    rule*: an eigenvalue of ``T^T T`` lies that close to the top Ritz value), then the upper end
    is the smallest of the circulant majorant, Fantastic Four, and -- if affordable -- the banded
    Cholesky certificate at ``lower (1 + tol)``. If nothing certifies ``tol`` the bracket is
    still valid, only wider. ``lower=False`` skips the iteration when no certificate can use it
    (the lower end is then 0).

    Memory: every route estimates its bytes first (dense operators and their SVD workspace, the
    frequency grid, the LOBPCG vectors, the certificate) and stays within ``max_memory`` bytes
    (default 2 GiB, :func:`sepconv.spectral.validate.budget`): a route that does not fit is
    skipped for the next cheaper certified one (dense SVD -> LOBPCG + certificate; majorant ->
    Fantastic Four), and when none fits a :class:`~sepconv.errors.ResourceError` names the layer
    geometry and the estimate. Arguments are validated: ``0 < tol < 1``, ``1 <= max_iter <= 10^6``,
    finite weights; half/bfloat16 weights are computed like the others (in float64).
    """
    weight, ks = validate.conv_weight(weight, spec, "bracket")
    args = _bracket_args("bracket", tol, max_iter, certificate_flops, dense_flops, seed, max_memory)
    return _bracket(weight, spec, ks, *args, lower=bool(lower))


def _bracket_args(where: str, tol, max_iter, certificate_flops, dense_flops, seed, max_memory) -> tuple:
    return (validate.tolerance(tol, where), validate.count(max_iter, where, "max_iter"),
            validate.nonnegative(certificate_flops, where, "certificate_flops"),
            validate.nonnegative(dense_flops, where, "dense_flops"),
            validate.count(seed, where, "seed", 0, 2**63 - 1), validate.budget(max_memory))


def _bracket(weight: Tensor, spec: ConvSpec, ks: tuple[int, int], tol: float, max_iter: int, certificate_flops: float,
             dense_flops: float, seed: int, limit: float, lower: bool = True, split: bool = True) -> Bracket:
    """:func:`bracket` on validated arguments (``limit``: the memory budget in bytes; ``split``:
    whether a grouped conv may be solved group by group)."""
    w64 = weight.detach().to(torch.float64)
    if spec.is_circulant(ks):
        kernel, grid = _circulant(w64, spec)
        try:
            check_problem(w64, spec, ks, spec.in_size, spec.stride, "bracket", limit)
        except ResourceError:
            if lower:
                raise
            return Bracket(0.0, float(bounds.fantastic_four(w64, spec)), "fantastic4")
        top = fourier.block_max(kernel, grid, tol)
        return Bracket(math.sqrt(top.value), math.sqrt(top.upper), "circulant", None, top.freq, top.group)
    if lower:
        _check_lower_end(w64, spec, ks, dense_flops, limit)
    maj = fourier.majorant(spec, ks)
    sub = (maj.grid[0] // maj.stride[0], maj.grid[1] // maj.stride[1])
    upper, how, top, kernel = math.inf, "none", None, None
    try:
        check_problem(w64, spec, ks, maj.grid, maj.stride, "bracket", limit)
    except ResourceError:  # the circulant majorant's grid does not fit: Fantastic Four alone
        pass
    else:
        kernel = fourier.circulant_kernel(w64, maj.stride, spec.dilation, spec.groups)
        top = fourier.block_max(kernel, sub, tol)
        upper, how = maj.factor * math.sqrt(top.upper), "majorant"
    f4 = float(bounds.fantastic_four(w64, spec))
    if f4 < upper:
        upper, how = f4, "fantastic4"
    if spec.groups > 1 and split:  # block-diagonal: group by group, never the whole operator's SVD
        bound = bounds._fantastic_four_groups(w64, spec).min(0).values  # certified, per group
        if kernel is not None and min(kernel.shape[1], kernel.shape[2]) == 1:  # vector blocks: each group's majorant
            power = fourier.vector_block_power(kernel, sub).amax((-2, -1))
            bound = torch.minimum(bound, maj.factor * (power * (1 + 16 * torch.finfo(torch.float64).eps)).sqrt())
        br = _grouped_dense_bracket(w64, spec, ks, upper, bound, dense_flops, limit)
        if br is None and lower:
            br = _grouped_iterative_bracket(w64, spec, ks, upper, bound, tol, max_iter, certificate_flops,
                                            dense_flops, seed, limit)
        if br is not None:
            return br
    rows = weight.shape[0] * math.prod(spec.out_size(ks))
    cols = math.prod(spec.input_shape(weight))
    if (spec.groups == 1 and rows * cols * min(rows, cols) <= dense_flops
            and spec.operator_bytes(w64, whole=True) <= limit):
        with fourier.lapack_threads():
            s = float(torch.linalg.svdvals(spec.dense_operator(w64, max_memory=limit))[0])
        margin = 4 * max(rows, cols) * torch.finfo(torch.float64).eps  # LAPACK: |s - sigma| <= p(n) u sigma
        return Bracket(s * (1 - margin), min(upper, s * (1 + margin)), "dense")
    flops, nbytes = certify.certificate_cost(w64, spec)
    affordable = flops <= certificate_flops and nbytes <= min(CERTIFICATE_BYTES, limit)
    if not lower and not affordable:
        return Bracket(0.0, upper, how)
    op = iterative.GramOperator(w64, spec)
    b = iterative.block_size(op)
    while b > 1 and iterative.lobpcg_bytes(op, b) > limit:
        b -= 1
    need = iterative.lobpcg_bytes(op, b)
    if need > limit:
        if not lower:
            return Bracket(0.0, upper, how)
        validate.check_memory(need, f"bracket: the LOBPCG vectors of the conv {tuple(weight.shape)} "
                              f"{spec.describe(ks)} (a {op.g}x{op.dim} block per vector)", limit)
    # Ritz values converge like residual^2 / gap: start loose, tighten only if the certificate fails;
    # stop as soon as the lower end is within tol of the certified upper end
    rtol = min(1e-2, 0.1 * math.sqrt(tol)) if affordable else tol / 10
    target = (upper / (1 + tol)) ** 2
    X0 = _warm_start(op, kernel, maj, top, b, seed) if top is not None else iterative.random_block(op, b, seed)
    ritz = iterative.lobpcg(op, X0, rtol=rtol, max_iter=max_iter, target=target)
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
            ritz = iterative.lobpcg(op, X0, rtol=rtol, max_iter=max_iter, target=target)
            lo = max(lo, math.sqrt(max(0.0, float(ritz.theta[:, 0].max()))))
    return Bracket(lo, max(upper, lo), how, iterative.top_vector(op, ritz))


def _check_lower_end(w64: Tensor, spec: ConvSpec, ks: tuple[int, int], dense_flops: float, limit: float) -> None:
    """Refuse at once (:class:`~sepconv.errors.ResourceError`) when no route to a lower end fits the
    budget: neither a dense SVD of one group nor LOBPCG with one vector on one group."""
    g = spec.groups
    one = w64[: w64.shape[0] // g]
    spec1 = ConvSpec(spec.in_size, spec.stride, spec.padding, spec.padding_mode, spec.dilation, 1)
    rows, cols = one.shape[0] * math.prod(spec.out_size(ks)), one.shape[1] * math.prod(spec.in_size)
    if rows * cols * min(rows, cols) <= dense_flops and spec1.operator_bytes(one) <= limit:
        return
    need = iterative.lobpcg_bytes(iterative.GramOperator(one, spec1), 1)
    validate.check_memory(need, f"bracket: the LOBPCG vectors of the conv {tuple(w64.shape)} {spec.describe(ks)} "
                          f"(one vector of {cols} values per group)", limit)


def _grouped_iterative_bracket(w64: Tensor, spec: ConvSpec, ks: tuple[int, int], upper: float, bound: Tensor,
                               tol: float, max_iter: int, certificate_flops: float, dense_flops: float, seed: int,
                               limit: float) -> Bracket:
    """A grouped conv whose groups are too large for dense SVDs: the generic bracket (LOBPCG, the
    banded certificate) on the group of largest certified bound ``bound`` alone, then at once on
    every other group whose bound exceeds the lower end found -- the others are certified below
    it (the norm of a block-diagonal operator is the max over its blocks). The upper end is the
    largest upper end of the solved groups (never above ``upper``, the whole conv's bound); the
    vector is the maximising group's, placed in the whole conv's input."""
    g = spec.groups
    c_out, ci, kh, kw = w64.shape
    blocks = w64.reshape(g, c_out // g, ci, kh, kw)
    order = bound.argsort(descending=True).tolist()
    lo, up, how, vec, grp = 0.0, 0.0, "none", None, None
    todo = [order[0]]
    done = set()
    while todo:
        sub = ConvSpec(spec.in_size, spec.stride, spec.padding, spec.padding_mode, spec.dilation, len(todo))
        br = _bracket(blocks[todo].reshape(-1, ci, kh, kw), sub, ks, tol, max_iter, certificate_flops, dense_flops,
                      seed, limit, lower=True, split=False)
        done.update(todo)
        if br.upper > up:
            up, how = br.upper, br.how
        if br.lower > lo and br.vector is not None:
            lo = br.lower
            j = int(br.vector.reshape(len(todo), -1).norm(dim=1).argmax())  # the group holding the vector
            grp = todo[j]
            vec = w64.new_zeros(g * ci, *spec.in_size)
            vec[grp * ci:(grp + 1) * ci] = br.vector[j * ci:(j + 1) * ci]
        todo = [i for i in order if i not in done and float(bound[i]) > lo]
    rest = [float(bound[i]) for i in order if i not in done]
    up = max([up] + rest)  # the unsolved groups are certified below lo <= up
    return Bracket(lo, max(lo, min(upper, up)), how, vec, group=grp)


def _grouped_dense_bracket(w64: Tensor, spec: ConvSpec, ks: tuple[int, int], upper: float, bound: Tensor,
                           dense_flops: float, limit: float, batch_bytes: float = 2**28) -> Bracket | None:
    """A grouped (e.g. depthwise) convolution is block-diagonal: ``sigma = max_g sigma(T_g)``, and
    each group is a small operator. Groups are visited in decreasing order of a certified upper
    bound per group ``bound`` -- the smaller of Fantastic Four and, for vector blocks (depthwise),
    the group's circulant majorant ``max_w |K^_c(w)|`` on the embedding grid, nearly exact -- and solved by
    dense SVDs in batches of growing size (1, 2, 4, ... up to about ``batch_bytes`` of operators
    and SVD copies), until every remaining group's bound is below the best value found (then none
    of them can hold the maximum). Exact (LAPACK's backward-stable SVD, with its rounding margin);
    the maximising group is recorded in ``group``. ``None`` when one group is too large for a
    dense SVD (``dense_flops``) or for the memory budget ``limit`` (bytes)."""
    g = spec.groups
    rows = (w64.shape[0] // g) * math.prod(spec.out_size(ks))
    cols = w64.shape[1] * math.prod(spec.in_size)
    one = spec.operator_bytes(w64, 1)
    if rows * cols * min(rows, cols) > dense_flops or one > limit:
        return None
    order = bound.argsort(descending=True)
    margin = 4 * max(rows, cols) * torch.finfo(torch.float64).eps
    step = max(1, int(min(batch_bytes, limit) // one))
    best, arg, i, n = 0.0, int(order[0]), 0, 1
    while i < g:
        idx = order[i:i + n]
        i, n = i + n, min(2 * n, step)
        if float(bound[idx[0]]) <= best * (1 - margin):
            break  # every remaining group is certified below the best one
        with fourier.lapack_threads():
            top = torch.linalg.svdvals(spec.group_operators(w64, idx, max_memory=limit))[:, 0]
        j = int(top.argmax())
        if float(top[j]) > best:
            best, arg = float(top[j]), int(idx[j])
    return Bracket(best * (1 - margin), min(upper, best * (1 + margin)), "dense", group=arg)


def exact_norm(weight: Tensor, spec: ConvSpec, tol: float = 1e-6, max_iter: int = 500,
               certificate_flops: float = CERTIFICATE_FLOPS, dense_flops: float = DENSE_FLOPS,
               max_memory: float | None = None) -> Tensor:
    """The largest singular value of the map ``nn.Conv2d`` computes at ``spec.in_size``, within ``tol``.

    **Exact** and certified for circulant geometries (:func:`circulant_norm`) and small
    operators (dense SVD; for a grouped or depthwise conv the SVD of the maximising group's
    block only, found by :func:`bracket` -- the norm of a block-diagonal operator is the max
    over its blocks). Elsewhere the value is the lower end of :func:`bracket`: a Rayleigh
    quotient of the converged top Ritz vector, exact to ``tol`` under the residual rule, and
    *certified* to ``tol`` when the banded Cholesky certificate fits the budget
    (``norm_bracket`` reports the guaranteed interval in every case). Differentiable: the
    gradient is that of ``||T v||`` at the (fixed) top singular vector ``v``. Half/bfloat16
    weights are computed in float32 (the result is float32). Memory stays within ``max_memory``
    bytes (default 2 GiB; see :func:`bracket`).
    """
    weight, ks = validate.conv_weight(weight, spec, "exact_norm")
    args = _bracket_args("exact_norm", tol, max_iter, certificate_flops, dense_flops, 0, max_memory)
    if spec.is_circulant(ks):
        return circulant_norm(weight, spec, args[0], max_memory=args[-1])
    br = _bracket(weight, spec, ks, *args)
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
                 certificate_flops: float = CERTIFICATE_FLOPS, dense_flops: float = DENSE_FLOPS, seed: int = 0,
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
    weight, ks = validate.conv_weight(weight, spec, "norm_bracket")
    args = _bracket_args("norm_bracket", tol, max_iter, certificate_flops, dense_flops, seed, max_memory)
    br = _bracket(weight, spec, ks, *args, lower=bool(lower))
    validate.finite_result(br.upper, "norm_bracket")
    return _outward(br.lower, weight, -math.inf), _outward(br.upper, weight, math.inf)


def _outward(v: float, like: Tensor, direction: float) -> Tensor:
    """``v`` in ``like``'s dtype, rounded towards ``direction`` so a bracket stays a bracket."""
    t = torch.tensor(v, dtype=like.dtype, device=like.device)
    if (float(t) - v) * direction < 0:
        t = torch.nextafter(t, torch.tensor(direction, dtype=like.dtype, device=like.device))
    return t


METHODS = ("exact", "fft", "gram", "fantastic4", "power", "reshape")


def _method(method: str):
    return {"exact": exact_norm, "fft": bounds.fft_bound, "gram": bounds.gram_iteration,
            "fantastic4": bounds.fantastic_four, "power": iterative.power_iteration,
            "reshape": bounds.reshape_norm}.get(method) if isinstance(method, str) else None


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

    Keywords go to the method's function (an unknown one is a :class:`~sepconv.errors.ConfigError`);
    ``max_memory`` (bytes, default 2 GiB) bounds the memory of ``exact``, ``fft``, ``gram`` and
    ``power``. Half/bfloat16 weights are computed in float32 and the result is float32.
    """
    fn = _method(method)
    if fn is None:
        raise ConfigError(f"spectral_norm: unknown method {method!r}; choose one of {', '.join(METHODS)}")
    weight, _ = validate.conv_weight(weight, spec, "spectral_norm")
    params = inspect.signature(fn).parameters
    bad = [k for k in kw if k not in params or k in ("weight", "spec")]
    if bad:
        allowed = [k for k in params if k not in ("weight", "spec")]
        raise ConfigError(f"spectral_norm: method {method!r} takes no argument {bad[0]!r} "
                          f"(it takes {', '.join(allowed) or 'no options'})")
    if method == "reshape":
        out = fn(weight, **kw)
    elif method == "power":
        out = fn(weight, spec, **kw)[0]
    else:
        out = fn(weight, spec, **kw)
    validate.finite_result(out, f"spectral_norm (method {method!r})")
    return out
