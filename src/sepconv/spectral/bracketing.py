"""The certified bracket ``lower <= sigma_max <= upper`` of a convolution, for any geometry.

Circulant geometries are solved exactly on their frequency blocks. **Everything else** (zero,
reflect, replicate padding; cropped or repeated outputs) has no closed form: the lower end is a
Rayleigh quotient from block LOBPCG on ``T^T T`` (warm-started from the circulant majorant's top
mode; :mod:`sepconv.spectral.iterative`), the upper end the tightest certified bound available --
the circulant majorant / Fantastic Four (:mod:`sepconv.spectral.bounds`), and a block-banded
Cholesky certificate of ``mu I - T^T T`` at ``mu = (lower (1 + tol))^2``
(:mod:`sepconv.spectral.certify`) whenever its cost fits the budget; tiny layers (or the groups
of a grouped conv) are solved by dense SVDs (docs/spectral.md Sec. 1-6). The public entry points
are :func:`sepconv.spectral.exact.bracket`, :func:`~sepconv.spectral.exact.norm_bracket` and
:func:`~sepconv.spectral.exact.exact_norm`; this module holds the search they share.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import ResourceError
from . import bounds, certify, fourier, iterative, progress, validate
from .spec import ConvSpec, norm_of_padding, tap_sources_1d

__all__ = ["CERTIFICATE_BYTES", "CERTIFICATE_FLOPS", "CERTIFICATE_SHARE", "DENSE_FLOPS", "Bracket", "bracket_args",
           "certificate_budget", "check_problem", "RECENT", "RECENT_BYTES", "circulant_problem", "is_pointwise",
           "outward", "solve"]

#: Dense SVD of the operator when ``rows * cols * min(rows, cols)`` is at most this.
DENSE_FLOPS = 3e9
#: Banded Cholesky certificate when its flop count is at most this (``certificate_flops=None``; raised
#: inside :func:`certificate_budget`) ...
CERTIFICATE_FLOPS = 2e11
#: ... and its memory at most this share of the memory budget (the rest for LOBPCG, the weight and the
#: caller): :data:`CERTIFICATE_BYTES` under the default budget, more where ``$SEPCONV_MEMORY_LIMIT`` allows.
CERTIFICATE_SHARE = 0.7
CERTIFICATE_BYTES = CERTIFICATE_SHARE * validate.MAX_MEMORY


@dataclass
class Bracket:
    """``lower <= sigma_max <= upper`` (certified); ``how`` names what certified the upper end
    (``pointwise``, ``circulant``, ``dense``, ``cholesky``, ``majorant``, ``fantastic4``); ``vector`` the
    estimated top right singular vector ``(C_in, H, W)`` where an iteration produced one;
    ``freq`` and ``group`` the maximising frequency block (circulant) or group (grouped dense SVDs)."""

    lower: float
    upper: float
    how: str
    vector: Tensor | None = None
    freq: tuple[int, int] | None = None
    group: int | None = None


def circulant_problem(weight: Tensor, spec: ConvSpec) -> tuple[Tensor, tuple[int, int]]:
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


_BUDGET: ContextVar[float | None] = ContextVar("sepconv_certificate_flops", default=None)


@contextlib.contextmanager
def certificate_budget(flops: float) -> Iterator[None]:
    """Inside the block, a banded Cholesky certificate may cost up to ``flops`` (default
    :data:`CERTIFICATE_FLOPS`) wherever ``certificate_flops`` is not passed: in :func:`bracket`,
    :func:`norm_bracket`, :func:`upper_bound`, :func:`analyze`, :func:`lipschitz_bound` and what calls
    them (``sepconv spectrum --certificate-flops``). The certificate costs ``H (1/3 + B + B^2 + 1)
    (c W)^3`` flops (:func:`~.certify.certificate_cost`), e.g. 1.9e13 for a 64-channel 3x3 conv at
    56x56; its memory stays within :data:`CERTIFICATE_SHARE` of the memory budget (raise it with
    ``$SEPCONV_MEMORY_LIMIT``). A scoped setting (a context variable, like ``torch.no_grad``): the
    functions stay pure functions of their arguments and of it."""
    token = _BUDGET.set(validate.nonnegative(flops, "certificate_budget", "flops"))
    try:
        yield
    finally:
        _BUDGET.reset(token)


def bracket_args(where: str, tol, max_iter, certificate_flops, dense_flops, seed, max_memory) -> tuple:
    """The search's arguments validated; ``certificate_flops=None``: :func:`certificate_budget`'s, else
    :data:`CERTIFICATE_FLOPS`."""
    if certificate_flops is None:
        certificate_flops = _BUDGET.get()
        certificate_flops = CERTIFICATE_FLOPS if certificate_flops is None else certificate_flops
    return (validate.tolerance(tol, where), validate.count(max_iter, where, "max_iter"),
            validate.nonnegative(certificate_flops, where, "certificate_flops"),
            validate.nonnegative(dense_flops, where, "dense_flops"),
            validate.count(seed, where, "seed", 0, 2**63 - 1), validate.budget(max_memory))


#: Bytes of weights :func:`solve` keeps to recognise a multiple of a weight it solved (:class:`_Recent`).
RECENT_BYTES = 128 * 2**20


class _Recent:
    """The brackets of the last weights :func:`solve` searched, by geometry and arguments: a weight
    ``w' = r w + E`` close to a multiple of a kept ``w`` gets ``|r| [lower, upper]`` widened by
    ``delta = ||pad|| sum_taps ||E_tap||_F >= ||T(E)||`` (each tap is a selection of the padded input
    times ``E_tap``; a grouped ``E_tap`` is block-diagonal, of norm at most its Frobenius norm), used
    when ``delta <= 1e-10 |r| upper`` -- certified, the same bracket up to rounding. Kept by
    geometry, shape, ``tol`` and the certificate's flop and memory budgets (under a smaller one the
    bracket may be wider); a bracket searched with a lower end also serves a request without
    one (its upper end is at least as tight). It spares
    :func:`~sepconv.spectral.lipschitz_bound` the search ``analyze`` just did where a conv's chain
    is the conv itself, or the conv times a uniform BatchNorm scale (a default-initialised network),
    and the curvature and Lipschitz bounds of one model each other's. Keeps copies of at most
    :data:`RECENT_BYTES` bytes of weights, oldest dropped first; a bracket without a lower end (no
    search was run) is not kept."""

    def __init__(self):
        self.entries: dict[tuple, list[tuple[Tensor, bool, Bracket]]] = {}
        self.nbytes = 0

    def get(self, key: tuple, w64: Tensor, spec: ConvSpec, ks: tuple[int, int], lower: bool) -> Bracket | None:
        for kept, searched_lower, br in reversed(self.entries.get(key, [])):
            if lower and not searched_lower:
                continue
            w = kept.to(torch.float64)
            if torch.equal(w, w64):
                return br
            norm2 = float((w * w).sum())
            if norm2 == 0:
                continue
            r = float((w64 * w).sum()) / norm2
            delta = (float((w64 - r * w).square().sum((0, 1)).sqrt().sum()) * norm_of_padding(spec, ks)
                     * (1 + 1e-12))
            if delta <= 1e-10 * abs(r) * br.upper:
                eps = 4 * torch.finfo(torch.float64).eps
                lo, up = (abs(r) * br.lower - delta) * (1 - eps), (abs(r) * br.upper + delta) * (1 + eps)
                return Bracket(max(0.0, lo), up, br.how, br.vector, br.freq, br.group)
        return None

    def put(self, key: tuple, weight: Tensor, lower: bool, br: Bracket) -> None:
        kept = weight.detach().clone()
        if kept.dtype == torch.float64 and torch.equal(kept.to(torch.float32).to(torch.float64), kept):
            kept = kept.to(torch.float32)  # a float32 model's weights, widened: kept at half the bytes, exactly
        size = kept.numel() * kept.element_size()
        if size > RECENT_BYTES:
            return
        self.entries.setdefault(key, []).append((kept, lower, br))
        self.nbytes += size
        while self.nbytes > RECENT_BYTES:  # dicts keep insertion order: the oldest key first
            old = next(iter(self.entries))
            w = self.entries[old].pop(0)[0]
            self.nbytes -= w.numel() * w.element_size()
            if not self.entries[old]:
                del self.entries[old]

    def clear(self) -> None:
        self.entries.clear()
        self.nbytes = 0


RECENT = _Recent()


def solve(weight: Tensor, spec: ConvSpec, ks: tuple[int, int], tol: float, max_iter: int, certificate_flops: float,
          dense_flops: float, seed: int, limit: float, lower: bool = True, split: bool = True) -> Bracket:
    """:func:`bracket` on validated arguments (``limit``: the memory budget in bytes; ``split``:
    whether a grouped conv may be solved group by group). Searches (everything but the closed
    forms: 1x1, circulant) are remembered for a multiple of the same weight (:class:`_Recent`)."""
    if is_pointwise(spec, ks) or spec.is_circulant(ks):
        return _solve(weight, spec, ks, tol, max_iter, certificate_flops, dense_flops, seed, limit, lower, split)
    key = (spec, tuple(weight.shape), str(weight.device), tol, split, certificate_flops, limit)
    br = RECENT.get(key, weight.detach().to(torch.float64), spec, ks, lower)
    if br is None:
        br = _solve(weight, spec, ks, tol, max_iter, certificate_flops, dense_flops, seed, limit, lower, split)
        if br.lower > 0:  # a search (an upper end alone is a bound's value: cheap, not worth the memory)
            RECENT.put(key, weight, lower, br)
    return br


def _solve(weight: Tensor, spec: ConvSpec, ks: tuple[int, int], tol: float, max_iter: int, certificate_flops: float,
           dense_flops: float, seed: int, limit: float, lower: bool = True, split: bool = True) -> Bracket:
    """The search of :func:`solve`."""
    # NB: one function on purpose (~85 lines): the routes -- circulant, grouped, dense SVD, LOBPCG and
    # the certificate -- are tried in order of cost and share the upper end found so far; split up,
    # that state would travel through every helper's arguments.
    w64 = weight.detach().to(torch.float64)
    if is_pointwise(spec, ks):
        g = spec.groups
        mats = w64.reshape(g, w64.shape[0] // g, w64.shape[1])
        with fourier.lapack_threads():
            per_group = torch.linalg.svdvals(mats)[:, 0]
        gi = int(per_group.argmax())
        s = float(per_group[gi])
        margin = 4 * max(mats.shape[1:]) * torch.finfo(torch.float64).eps  # LAPACK: |s - sigma| <= p(n) u sigma
        return Bracket(s * (1 - margin), s * (1 + margin), "pointwise", group=gi if g > 1 else None)
    if spec.is_circulant(ks):
        kernel, grid = circulant_problem(w64, spec)
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
    vector = min(w64.shape[0] // spec.groups, w64.shape[1]) == 1  # depthwise-like: nearly exact group bounds
    if (spec.groups > 1 and split and not vector and lower
            and _whole_is_cheaper(w64, spec, ks, certificate_flops, limit)):
        split = False  # matrix blocks: the certified search on the whole block-diagonal operator is cheaper
    if spec.groups > 1 and split:  # block-diagonal: group by group, never the whole operator's SVD
        bound = bounds._fantastic_four_groups(w64, spec).min(0).values  # certified, per group
        if kernel is not None and min(kernel.shape[1], kernel.shape[2]) == 1:  # vector blocks: each group's majorant
            power = fourier.vector_block_power(kernel, sub).amax((-2, -1))
            bound = torch.minimum(bound, maj.factor * (power * (1 + 16 * torch.finfo(torch.float64).eps)).sqrt())
        br = _grouped_dense_bracket(w64, spec, ks, upper, bound, dense_flops, limit)
        if br is None:  # with or without a lower end asked: the groups' own searches are the cheap route
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
    affordable = flops <= certificate_flops and nbytes <= CERTIFICATE_SHARE * limit
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
    # Ritz values converge like residual^2 / gap: start loose, tighten only if the certificate fails --
    # or, with no certificate affordable, only if the loose lower end leaves the upper end (the majorant,
    # Fantastic Four) within 2 tol, where a tighter one may bring the bracket within tol (a wider bracket's
    # width is the upper end's: a tighter lower end would cost many more iterations and change little);
    # stop as soon as the lower end is within tol of the certified upper end
    target = (upper / (1 + tol)) ** 2

    def search(X0: Tensor, rtol: float) -> tuple[iterative.Ritz, float]:  # LOBPCG from X0: Ritz pairs, lower end
        with progress.bar("lower end (LOBPCG)", unit="iteration") as bar:
            ritz = iterative.iterate(op, X0, rtol=rtol, max_iter=max_iter, target=target, bar=bar)
        return ritz, math.sqrt(max(0.0, float(ritz.theta[:, 0].max())))

    rtol = min(1e-2, 0.1 * math.sqrt(tol))
    X0 = _warm_start(op, kernel, maj, top, b, seed) if top is not None else iterative.random_block(op, b, seed)
    ritz, lo = search(X0, rtol)
    if not affordable and lo * (1 + tol) < upper <= lo * (1 + 2 * tol):
        rtol = tol / 10
        ritz, tighter = search(ritz.X, rtol)
        lo = max(lo, tighter)
    if upper > lo * (1 + tol) and affordable:
        bg = certify.BandedGram(w64, spec)
        for attempt in range(4):
            mu = (lo * (1 + tol)) ** 2
            with progress.bar(f"certificate ({flops:.1e} flops)", total=bg.H, unit="block row") as bar:
                certified = bool(certify.cholesky_certificate(bg, mu, bar).all())
            if certified:
                upper, how = min(upper, math.sqrt(mu)), "cholesky"
                break
            # some group has an eigenvalue above mu: iterate further (the last attempt from a fresh block)
            rtol /= 10
            X0 = ritz.X if attempt < 2 else iterative.random_block(op, min(op.dim, b + 2), seed + attempt + 1)
            ritz, tighter = search(X0, rtol)
            lo = max(lo, tighter)
    return Bracket(lo, max(upper, lo), how, iterative.top_vector(op, ritz))


def is_pointwise(spec: ConvSpec, ks: tuple[int, int]) -> bool:
    """True when the operator is ``S (x) W``: a 1x1 kernel whose padding, if any, is zeros (a
    reflected, replicated or wrapped pixel would be read twice), ``S`` selecting the input pixels
    the outputs read (any stride; rows of the identity, zero rows where an output reads padding).
    Then ``||T|| = ||S|| ||W||_2 = ||W||_2`` -- **exact**, one SVD of the ``C_out x C_in`` matrix (per
    group) -- provided some output reads an input pixel (``||S|| = 1``; else ``T = 0``, left to the
    other routes)."""
    if tuple(ks) != (1, 1) or (spec.padding_mode != "zeros" and any(spec.pads(ks))):
        return False
    t, b, l, r = spec.pads(ks)
    reads = [tap_sources_1d(n, 1, st, 1, lo, hi, "zeros") for n, st, lo, hi in
             ((spec.in_size[0], spec.stride[0], t, b), (spec.in_size[1], spec.stride[1], l, r))]
    return all(bool((src >= 0).any()) for src in reads)


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
        br = solve(blocks[todo].reshape(-1, ci, kh, kw), sub, ks, tol, max_iter, certificate_flops, dense_flops,
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


#: Per-group dense SVDs of at most this many flops (all groups) are always taken: exact, and cheap.
GROUPED_DENSE_ALWAYS = 1e8


def _whole_is_cheaper(w64: Tensor, spec: ConvSpec, ks: tuple[int, int], certificate_flops: float,
                      limit: float) -> bool:
    """Cost-based dispatch for a grouped conv with matrix blocks (``C_in/g, C_out/g > 1``): its
    groups' Fantastic Four bounds are loose, so the per-group dense SVDs visit most groups, ``g
    (8/3) rows cols min(rows, cols)`` flops; the whole operator's search costs its banded Cholesky
    certificate (:func:`~.certify.certificate_cost`, small blocks ``C_in/g W``) plus LOBPCG, about
    30 iterations of 6 vectors at ``4 |w| H_out W_out`` flops each. The whole when affordable and at
    least 2x cheaper (measured: 64->64, 8 groups, 8x8), never below :data:`GROUPED_DENSE_ALWAYS`."""
    g = spec.groups
    out = math.prod(spec.out_size(ks))
    rows, cols = (w64.shape[0] // g) * out, w64.shape[1] * math.prod(spec.in_size)
    dense = g * 8 / 3 * rows * cols * min(rows, cols)
    if dense <= GROUPED_DENSE_ALWAYS:
        return False
    flops, nbytes = certify.certificate_cost(w64, spec)
    if flops > certificate_flops or nbytes > CERTIFICATE_SHARE * limit:
        return False
    return 2 * (flops + 30 * 6 * 4 * w64.numel() * out) < dense


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




def outward(v: float, like: Tensor, direction: float) -> Tensor:
    """``v`` in ``like``'s dtype, rounded towards ``direction`` so a bracket stays a bracket."""
    t = torch.tensor(v, dtype=like.dtype, device=like.device)
    if (float(t) - v) * direction < 0:
        t = torch.nextafter(t, torch.tensor(direction, dtype=like.dtype, device=like.device))
    return t

