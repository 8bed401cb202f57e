"""Frequency-domain building blocks: the per-frequency matrices of circulant convolutions.

A circular convolution on an ``N_h x N_w`` grid is diagonalised by the 2-D DFT: it acts
on frequency ``w`` as the ``C_out x C_in`` matrix ``K^(w) = sum_a K[:, :, a] e^{-2 pi i <w, a>/N}``
(Sedghi, Gupta, Long 2019, Thm. 6). Three reductions bring every circulant geometry to that
stride-1 form, all exact:

* **dilation** -- the kernel's taps sit at positions ``d a``;
* **stride** (``s | N``) -- the polyphase (space-to-depth) split ``x_phi[m] = x[s m + phi]``
  is a permutation of the input, after which the strided convolution is a stride-1
  convolution on the ``N/s`` grid with ``C_in s_h s_w`` input channels. Its blocks are a
  unitary recombination of the alias blocks ``(1/s)[K^(xi + qN/s)]_q`` (Senderovich et al.,
  NeurIPS 2022; reference/spectral.md Sec. 1);
* **groups** -- the operator is block-diagonal, one problem per group.

The Gram blocks ``K^(w)^H K^(w)`` are computed either in frequency (one batched matmul per
frequency) or, usually much cheaper, from the *spatial* Gram kernel
``G[delta] = sum_a K_a^T K_{a+delta}`` (``(2k-1)^2`` small matrices) followed by a DFT; a
cost model picks the cheaper route. Everything works on frequency chunks, so memory stays
bounded for large layers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch import Tensor

from .spec import ConvSpec, norm_of_padding

#: Memory budget (bytes) of one chunk of per-frequency blocks.
CHUNK_BYTES = 64 * 2**20


def circulant_kernel(weight: Tensor, stride: Sequence[int], dilation: Sequence[int], groups: int) -> Tensor:
    """The stride-1 kernel equivalent to ``weight`` under dilation and stride (exact).

    Returns ``(g, C_out/g, C_in/g * s_h * s_w, ceil(E_h/s_h), ceil(E_w/s_w))`` where
    ``E = d (k - 1) + 1``: the dilated kernel, split into its ``s_h s_w`` polyphase
    components (input channel index ``(c, phi_h, phi_w)``), grouped.
    """
    c_out, ci, kh, kw = weight.shape
    (dh, dw), (sh, sw) = dilation, stride
    eh, ew = dh * (kh - 1) + 1, dw * (kw - 1) + 1
    qh, qw = -(-eh // sh), -(-ew // sw)
    k = weight.new_zeros(c_out, ci, qh * sh, qw * sw)
    k[:, :, : eh : dh, : ew : dw] = weight
    k = k.reshape(c_out, ci, qh, sh, qw, sw).permute(0, 1, 3, 5, 2, 4).reshape(c_out, ci * sh * sw, qh, qw)
    return k.reshape(groups, c_out // groups, ci * sh * sw, qh, qw)


def unique_frequencies(grid: Sequence[int], device=None) -> tuple[Tensor, Tensor]:
    """One representative ``(u, v)`` of each conjugate pair ``{w, -w}`` of the ``N_h x N_w`` grid.

    For a real kernel ``K^(-w) = conj(K^(w))``: both blocks have the same singular values,
    so a norm needs only these ``~N_h N_w / 2`` frequencies.
    """
    nh, nw = grid
    u = torch.arange(nh, device=device)
    v = torch.arange(nw // 2 + 1, device=device)
    uu, vv = torch.meshgrid(u, v, indexing="ij")
    uu, vv = uu.flatten(), vv.flatten()
    self_conj_col = (vv == 0) | ((nw % 2 == 0) & (vv == nw // 2))
    keep = ~self_conj_col | (uu <= nh // 2)
    return uu[keep], vv[keep]


def all_frequencies(grid: Sequence[int], device=None) -> tuple[Tensor, Tensor]:
    uu, vv = torch.meshgrid(torch.arange(grid[0], device=device), torch.arange(grid[1], device=device), indexing="ij")
    return uu.flatten(), vv.flatten()


def _phases(fh: Tensor, fw: Tensor, grid: Sequence[int], pos_h: Tensor, pos_w: Tensor, dtype) -> tuple[Tensor, Tensor]:
    """cos and sin of ``2 pi (u a / N_h + v b / N_w)`` for frequencies ``(u, v)`` (F) and tap
    positions ``(a, b)`` (T, flattened row-major): two real ``(T, F)`` matrices."""
    ang = (pos_h.to(torch.float64)[:, None] * fh.to(torch.float64)[None, :]).remainder(grid[0]) / grid[0]
    ang = ang[:, None, :] + ((pos_w.to(torch.float64)[:, None] * fw.to(torch.float64)[None, :]).remainder(grid[1])
                             / grid[1])[None, :, :]
    ang = (2 * math.pi) * ang.reshape(-1, fh.numel())
    return torch.cos(ang).to(dtype), torch.sin(ang).to(dtype)


def symbol(kernel: Tensor, grid: Sequence[int], fh: Tensor, fw: Tensor) -> Tensor:
    """Per-frequency blocks ``K^(w) = sum_a K[..., a] e^{-2 pi i <w, a>/N}`` at the given
    frequencies: ``(F, *kernel.shape[:-2])`` complex. Exact (a direct DFT, so kernels wider
    than the grid wrap around correctly)."""
    qh, qw = kernel.shape[-2:]
    lead = kernel.shape[:-2]
    c, s = _phases(fh, fw, grid, torch.arange(qh, device=kernel.device), torch.arange(qw, device=kernel.device),
                   kernel.dtype)
    flat = kernel.reshape(-1, qh * qw)
    out = torch.complex(flat @ c, -(flat @ s))  # (prod(lead), F)
    return out.T.reshape(fh.numel(), *lead)


def spatial_gram(kernel: Tensor, side: str) -> Tensor:
    """The spatial Gram kernel of a stride-1 grouped kernel ``(g, co, ci, qh, qw)``.

    ``side="in"``: ``G[delta] = sum_a K_a^T K_{a + delta}`` (``ci x ci``), the kernel of
    ``T^T T``; ``side="out"``: ``sum_a K_{a + delta} K_a^T`` (``co x co``), that of ``T T^T``.
    Returns ``(g, m, m, 2 qh - 1, 2 qw - 1)`` with offset ``delta`` at index ``delta + q - 1``.
    Its DFT is exactly the Gram block ``K^(w)^H K^(w)`` (resp. ``K^(w) K^(w)^H``). Exact.
    """
    g, co, ci, qh, qw = kernel.shape
    t = qh * qw
    if side == "in":
        taps = kernel.permute(0, 3, 4, 2, 1).reshape(g, t * ci, co)  # rows (a, i)
        m = ci
    else:
        taps = kernel.permute(0, 3, 4, 1, 2).reshape(g, t * co, ci)  # rows (a, o)
        m = co
    pairs = (taps @ taps.transpose(1, 2)).reshape(g, t, m, t, m)  # [a, i, b, j] = <K_a row i, K_b row j>
    ah, aw = torch.arange(qh).repeat_interleave(qw), torch.arange(qw).repeat(qh)
    # side "in": delta = pos(b) - pos(a) ; side "out": delta = pos(a) - pos(b)
    sign = 1 if side == "in" else -1
    dh = sign * (ah[None, :] - ah[:, None]) + qh - 1  # (a, b)
    dw = sign * (aw[None, :] - aw[:, None]) + qw - 1
    idx = (dh * (2 * qw - 1) + dw).flatten().to(kernel.device)  # (t*t,)
    pairs = pairs.permute(0, 2, 4, 1, 3).reshape(g, m, m, t * t)
    out = kernel.new_zeros(g, m, m, (2 * qh - 1) * (2 * qw - 1))
    out.index_add_(3, idx, pairs)
    return out.reshape(g, m, m, 2 * qh - 1, 2 * qw - 1)


def gram_symbol_from_spatial(gk: Tensor, grid: Sequence[int], fh: Tensor, fw: Tensor) -> Tensor:
    """DFT of a spatial Gram kernel ``(g, m, m, Dh, Dw)`` at the given frequencies:
    ``(F, g, m, m)`` Hermitian blocks (made exactly Hermitian). Exact."""
    g, m, _, dh, dw = gk.shape
    c, s = _phases(fh, fw, grid, torch.arange(dh, device=gk.device) - (dh - 1) // 2,
                   torch.arange(dw, device=gk.device) - (dw - 1) // 2, gk.dtype)
    flat = gk.reshape(-1, dh * dw)
    out = torch.complex(flat @ c, -(flat @ s)).T.reshape(fh.numel(), g, m, m)
    return 0.5 * (out + out.mH)


@dataclass(frozen=True)
class GramPlan:
    """How to produce the Gram blocks of one circulant problem: the side (``in``: ``K^H K``,
    ``out``: ``K K^H``), the block size ``m``, and the route (spatial Gram kernel + DFT, or the
    frequency symbol + batched matmul) chosen by a flop count."""

    side: str
    m: int
    spatial: bool


def gram_plan(kernel: Tensor, n_freq: int) -> GramPlan:
    g, co, ci, qh, qw = kernel.shape
    side, m, big = ("in", ci, co) if ci <= co else ("out", co, ci)
    t, d2 = qh * qw, (2 * qh - 1) * (2 * qw - 1)
    spatial_cost = t * t * m * m * big + 2 * d2 * m * m * n_freq
    freq_cost = 2 * co * ci * t * n_freq + 4 * n_freq * m * m * big
    return GramPlan(side, m, spatial_cost <= freq_cost)


def gram_blocks(kernel: Tensor, grid: Sequence[int], fh: Tensor, fw: Tensor, plan: GramPlan,
                spatial: Tensor | None = None) -> Tensor:
    """Gram blocks ``(F, g, m, m)`` at the given frequencies, by the route of ``plan``
    (``spatial`` is the precomputed spatial Gram kernel when the plan uses it)."""
    if plan.spatial:
        if spatial is None:
            spatial = spatial_gram(kernel, plan.side)
        return gram_symbol_from_spatial(spatial, grid, fh, fw)
    k = symbol(kernel, grid, fh, fw)  # (F, g, co, ci)
    return k.mH @ k if plan.side == "in" else k @ k.mH


def chunks(n: int, bytes_per_item: int, budget: int = CHUNK_BYTES) -> Iterator[slice]:
    """Slices of ``range(n)`` whose items take at most ``budget`` bytes (at least one item)."""
    step = max(1, budget // max(1, bytes_per_item))
    for i in range(0, n, step):
        yield slice(i, min(n, i + step))


# --------------------------------------------------------------------------- majorants


@dataclass(frozen=True)
class Majorant:
    """A circulant operator that dominates a convolution: ``sigma_i(T) <= factor * sigma_i(C)``
    for every ``i``, where ``C`` is the circular convolution with the same kernel on ``grid``
    with stride ``stride`` (``stride`` divides ``grid``). ``exact`` when ``T`` *is* ``C``
    (up to permutations)."""

    grid: tuple[int, int]
    stride: tuple[int, int]
    factor: float
    exact: bool


def majorant(spec: ConvSpec, kernel_size: Sequence[int]) -> Majorant:
    """The tightest circulant majorant this library knows for ``spec`` (per dimension).

    * circulant geometry: the operator itself (``exact``);
    * zero padding: the zero-padded map is a submatrix (selected output rows, input columns)
      of the strided circular convolution on ``N`` points as soon as wrapped indices land in
      the zero region and taps stay distinct: ``N >= max(n + p_lo, j_max + 1, E, s H_out)``,
      rounded up to a multiple of ``s`` (``j_max`` the last input index read, ``E`` the
      dilated extent) -- a refinement of ``N >= n + d(k - 1)`` (reference/spectral.md Sec. 2);
    * circular padding not aligned with the input (cropped or repeated outputs, ``s`` not
      dividing ``n``): selected rows, with repetition, of the circular convolution on ``n``
      (strided when ``s | n``); ``factor`` = sqrt of the largest repetition;
    * reflect / replicate: the valid convolution of the padded input (a submatrix of the
      circulant on ``N >= n + p_lo + p_hi``) after the padding map, whose norm enters ``factor``.

    By interlacing (submatrices) and ``R^T R <= mult I``, every singular value is dominated.
    """
    pads = spec.pads(kernel_size)
    ext = spec.extent(kernel_size)
    out = spec.out_size(kernel_size)
    grid, stride, mult = [], [], 1
    exact = spec.is_circulant(kernel_size)
    for dim in range(2):
        n, s, e, ho = spec.in_size[dim], spec.stride[dim], ext[dim], out[dim]
        lo, hi = pads[2 * dim], pads[2 * dim + 1]
        if exact:
            grid.append(n)
            stride.append(s)
            continue
        if spec.padding_mode == "circular":
            # y[i] = z[(s i) mod n] for the stride-1 circular convolution z (shift absorbed)
            counts = torch.bincount((s * torch.arange(ho)) % n, minlength=n)
            mult *= int(counts.max())
            grid.append(n)
            stride.append(s if n % s == 0 else 1)
            continue
        if spec.padding_mode == "zeros":
            jmax = s * (ho - 1) + e - 1 - lo
            N = max(n + lo, jmax + 1, e, s * ho)
        else:  # reflect / replicate: valid conv on the padded input
            N = max(n + lo + hi, s * ho)
        grid.append(-(-N // s) * s)
        stride.append(s)
    factor = math.sqrt(mult) * (norm_of_padding(spec, kernel_size) if spec.padding_mode in ("reflect", "replicate") else 1.0)
    return Majorant(tuple(grid), tuple(stride), factor, exact)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- block maxima

#: Blocks up to this size get a full eigvalsh; larger ones the certify-by-Cholesky path.
SMALL_BLOCK = 12


@dataclass(frozen=True)
class BlockMax:
    """Largest Gram eigenvalue (``sigma_max^2``) over the frequency blocks of one circulant problem.

    ``value`` is the exact largest eigenvalue of the maximising block (a lower bound on the
    maximum; LAPACK ``eigvalsh`` in float64, backward stable); every other block is certified
    ``<= upper`` (a Cholesky factorisation of ``upper I - G(w)`` succeeded, or its eigenvalues
    were computed). ``freq`` ``(u, v)`` and ``group`` locate the maximising block."""

    value: float
    upper: float
    freq: tuple[int, int]
    group: int


def _rayleigh_lower(G: Tensor, iters: int = 4) -> Tensor:
    """Rayleigh quotients of ``iters`` power steps on each block of ``G`` (``(..., m, m)``):
    cheap lower bounds of each block's largest eigenvalue, used to pick candidates."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    v = torch.randn(G.shape[-1], 1, generator=gen, dtype=G.real.dtype).to(G.device, G.dtype).expand(*G.shape[:-1], 1)
    for _ in range(iters):
        v = G @ v
        v = v / v.norm(dim=-2, keepdim=True).clamp_min(torch.finfo(G.real.dtype).tiny)
    return (v.mH @ G @ v).real[..., 0, 0]


def _exact_top(kernel: Tensor, grid: Sequence[int], plan: GramPlan, f: tuple[int, int], grp: int) -> float:
    """Largest eigenvalue of one Gram block, recomputed in float64 from the kernel."""
    k64 = kernel[grp: grp + 1].to(torch.float64)
    fh, fw = torch.tensor([f[0]], device=kernel.device), torch.tensor([f[1]], device=kernel.device)
    return float(torch.linalg.svdvals(symbol(k64, grid, fh, fw)[0, 0]).max()) ** 2


def block_max(kernel: Tensor, grid: Sequence[int], tol: float = 1e-6) -> BlockMax:
    """``max_w sigma_max(K^(w))^2`` over the unique frequencies of ``grid`` and all groups.

    ``kernel`` is a stride-1 grouped kernel (:func:`circulant_kernel`). Exact: blocks up to
    :data:`SMALL_BLOCK` get their eigenvalues; larger ones are never fully decomposed --
    candidates are picked by a few power steps, the best ones are solved exactly, and every
    other block is *certified* below ``value (1 + tol)^2`` by one Cholesky factorisation of
    ``mu I - G(w)`` (positive definite iff ``lambda_max(G(w)) < mu``); a block that fails is
    solved exactly. The Gram blocks come from :func:`gram_blocks` in memory-bounded chunks.
    Cost ``~ F m^3 / 3`` instead of the ``~ 20 F m^3`` of a full per-frequency SVD (Sedghi et
    al. 2019). Certified up to the rounding of the Cholesky factorisation in ``kernel.dtype``
    (relative ``O(m u)``; float64 recommended for guarantees).
    """
    with torch.no_grad():
        fh, fw = unique_frequencies(grid, kernel.device)
        F_, g = fh.numel(), kernel.shape[0]
        plan = gram_plan(kernel, F_)
        m = plan.m
        spatial = spatial_gram(kernel, plan.side) if plan.spatial else None
        per_freq = 2 * kernel.element_size() * g * 3 * max(m * m, 0 if plan.spatial else kernel.shape[1] * kernel.shape[2])
        parts = list(chunks(F_, per_freq))
        cache: list[Tensor] = []

        def blocks(sl: slice) -> Tensor:
            if len(parts) == 1 and cache:
                return cache[0]
            G = gram_blocks(kernel, grid, fh[sl], fw[sl], plan, spatial)
            if len(parts) == 1:
                cache.append(G)
            return G

        if m <= SMALL_BLOCK:
            best, arg = -1.0, (0, 0)
            for sl in parts:
                G = blocks(sl)
                lam = G.real[..., 0, 0] if m == 1 else torch.linalg.eigvalsh(G)[..., -1]  # (f, g)
                i = int(lam.argmax())
                if float(lam.flatten()[i]) > best:
                    best, arg = float(lam.flatten()[i]), (sl.start + i // g, i % g)
            f = (int(fh[arg[0]]), int(fw[arg[0]]))
            value = _exact_top(kernel, grid, plan, f, arg[1]) if kernel.dtype != torch.float64 else best
            return BlockMax(value, value * (1 + 16 * m * torch.finfo(torch.float64).eps), f, arg[1])

        # phase A: candidates by Rayleigh quotients
        rq = torch.cat([_rayleigh_lower(blocks(sl)).flatten() for sl in parts])
        n_cand = min(2, rq.numel())
        best, arg = -1.0, ((0, 0), 0)
        for i in rq.topk(n_cand).indices.tolist():
            f, grp = (int(fh[i // g]), int(fw[i // g])), i % g
            lam = _exact_top(kernel, grid, plan, f, grp)
            if lam > best:
                best, arg = lam, (f, grp)
        # phase B: certify every block below mu, solve the ones that fail
        eye = torch.eye(m, dtype=kernel.dtype, device=kernel.device)
        mu = best * (1 + tol) ** 2
        for sl in parts:
            G = blocks(sl)
            info = torch.linalg.cholesky_ex(mu * eye - G).info  # (f, g); > 0: not positive definite
            for i in torch.nonzero(info.flatten() > 0).flatten().tolist():
                fi, grp = sl.start + i // g, i % g
                f = (int(fh[fi]), int(fw[fi]))
                lam = _exact_top(kernel, grid, plan, f, grp)
                if lam > best:
                    best, arg = lam, (f, grp)
            mu = max(mu, best * (1 + tol) ** 2)
        rounding = 8 * m * torch.finfo(kernel.dtype).eps
        return BlockMax(best, mu * (1 + rounding), arg[0], arg[1])


def block_value(kernel: Tensor, grid: Sequence[int], freq: tuple[int, int], group: int) -> Tensor:
    """``sigma_max(K^(w))`` of one block, differentiable with respect to ``kernel`` (the
    gradient of a maximum over blocks is that of its maximising block)."""
    fh = torch.tensor([freq[0]], device=kernel.device)
    fw = torch.tensor([freq[1]], device=kernel.device)
    blk = symbol(kernel[group: group + 1], grid, fh, fw)[0, 0]
    if min(blk.shape) == 1:
        return blk.abs().pow(2).sum().sqrt()
    return torch.linalg.matrix_norm(blk, ord=2)


def all_block_singular_values(kernel: Tensor, grid: Sequence[int]) -> Tensor:
    """Every singular value of the circulant operator: the union over all frequencies (and
    groups) of the singular values of ``K^(w)``, sorted descending (Sedghi et al. 2019,
    Thm. 6). Exact; a full SVD per frequency, in chunks."""
    fh, fw = all_frequencies(grid, kernel.device)
    g, co, ci = kernel.shape[:3]
    out = []
    for sl in chunks(fh.numel(), g * co * ci * kernel.element_size() * 4):
        out.append(torch.linalg.svdvals(symbol(kernel, grid, fh[sl], fw[sl])).flatten())
    return torch.cat(out).sort(descending=True).values


def top_eigenvalues(kernel: Tensor, grid: Sequence[int], count: int) -> Tensor:
    """The ``count`` largest eigenvalues (with multiplicity, conjugate frequencies included) of
    the Gram operator ``C^T C`` on the *input* side of the circulant convolution, per group:
    ``(g, count)``, descending, zero-filled. Exact (eigvalsh per frequency block, in chunks)."""
    with torch.no_grad():
        fh, fw = unique_frequencies(grid, kernel.device)
        g, co, ci = kernel.shape[:3]
        nh, nw = grid
        twin = ~(((fh * 2) % nh == 0) & ((fw * 2) % nw == 0))  # w != -w: the block appears twice
        plan = gram_plan(kernel, fh.numel())
        spatial = spatial_gram(kernel, plan.side) if plan.spatial else None
        best = kernel.new_zeros(g, 0)
        for sl in chunks(fh.numel(), g * plan.m * plan.m * kernel.element_size() * 6):
            lam = torch.linalg.eigvalsh(gram_blocks(kernel, grid, fh[sl], fw[sl], plan, spatial))  # (f, g, m)
            lam = torch.cat([lam, lam[twin[sl]]], 0)  # duplicate the conjugate twins
            lam = lam.permute(1, 0, 2).reshape(g, -1)
            best = torch.cat([best, lam], 1).topk(min(count, best.shape[1] + lam.shape[1]), dim=1).values
        if best.shape[1] < count:
            best = torch.cat([best, best.new_zeros(g, count - best.shape[1])], 1)
        return best.clamp_min(0)
