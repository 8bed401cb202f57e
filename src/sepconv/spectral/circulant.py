"""A convolution as a circulant problem: the majorant geometry, the stride-1 kernel, the memory.

Every spectral computation of :mod:`sepconv.spectral` on a convolution goes through the same
three steps before any frequency is visited:

* :func:`majorant` -- the circulant operator (grid, stride, factor) that dominates the
  convolution singular value by singular value: the operator itself for circular padding
  aligned with the input (``exact``), else one of which it is a (scaled) submatrix
  (docs/spectral.md Sec. 2);
* :func:`circulant_kernel` -- three exact reductions bring that circulant operator to a
  stride-1 one: **dilation** (the kernel's taps sit at positions ``d a``), **stride**
  (``s | N``: the polyphase split ``x_phi[m] = x[s m + phi]`` is a permutation of the input,
  after which the strided convolution is a stride-1 convolution on the ``N/s`` grid with
  ``C_in s_h s_w`` input channels; Senderovich et al., NeurIPS 2022; docs/spectral.md Sec. 1)
  and **groups** (block-diagonal: one problem per group);
* :func:`problem_bytes` -- the peak memory of the problem, estimated before anything is
  allocated, so that callers can refuse or take a cheaper route.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor

from .dft import CHUNK_BYTES
from .spec import ConvSpec, norm_of_padding

__all__ = ["Majorant", "circulant_kernel", "majorant", "problem_bytes"]


def circulant_kernel(weight: Tensor, stride: Sequence[int], dilation: Sequence[int], groups: int) -> Tensor:
    """The stride-1 kernel equivalent to ``weight`` under dilation and stride (exact).

    Returns ``(g, C_out/g, C_in/g * s_h * s_w, ceil(E_h/s_h), ceil(E_w/s_w))`` where
    ``E = d (k - 1) + 1``: the dilated kernel, split into its ``s_h s_w`` polyphase
    components (input channel index ``(c, phi_h, phi_w)``), grouped.
    """
    c_out, ci, kh, kw = weight.shape
    (dh, dw), (sh, sw) = dilation, stride
    if (dh, dw, sh, sw) == (1, 1, 1, 1):
        return weight.reshape(groups, c_out // groups, ci, kh, kw)  # a view: nothing to dilate or split
    eh, ew = dh * (kh - 1) + 1, dw * (kw - 1) + 1
    qh, qw = -(-eh // sh), -(-ew // sw)
    k = weight.new_zeros(c_out, ci, qh * sh, qw * sw)
    k[:, :, : eh : dh, : ew : dw] = weight
    k = k.reshape(c_out, ci, qh, sh, qw, sw).permute(0, 1, 3, 5, 2, 4).reshape(c_out, ci * sh * sw, qh, qw)
    return k.reshape(groups, c_out // groups, ci * sh * sw, qh, qw)


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
    """The tightest circulant majorant this library knows for ``spec``; see :func:`_majorant`
    (cached: a geometry's majorant is a constant)."""
    return _majorant(spec, tuple(int(k) for k in kernel_size))


@functools.lru_cache(maxsize=1024)
def _majorant(spec: ConvSpec, kernel_size: tuple[int, int]) -> Majorant:
    """The tightest circulant majorant this library knows for ``spec`` (per dimension).

    * circulant geometry: the operator itself (``exact``);
    * zero padding: the zero-padded map is a submatrix (selected output rows, input columns)
      of the strided circular convolution on ``N`` points as soon as wrapped indices land in
      the zero region and taps stay distinct: ``N >= max(n + p_lo, j_max + 1, E, s H_out)``,
      rounded up to a multiple of ``s`` (``j_max`` the last input index read, ``E`` the
      dilated extent) -- a refinement of ``N >= n + d(k - 1)`` (docs/spectral.md Sec. 2);
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
            # y[i] = z[(s i) mod n] for the stride-1 circular convolution z (shift absorbed): s i mod n
            # has period P = n / gcd(s, n) in i, so the most repeated value occurs ceil(ho / P) times
            mult *= -(-ho // (n // math.gcd(s, n)))
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
    padding = norm_of_padding(spec, kernel_size) if spec.padding_mode in ("reflect", "replicate") else 1.0
    factor = math.sqrt(mult) * padding
    return Majorant(tuple(grid), tuple(stride), factor, exact)  # type: ignore[arg-type]


def problem_bytes(weight: Tensor, grid: Sequence[int], stride: Sequence[int], dilation: Sequence[int], groups: int,
                  kind: str = "max") -> int:
    """Estimated peak bytes of one circulant problem on ``grid`` for ``weight`` (the stride-1 kernel of
    :func:`circulant_kernel`, then): ``kind="max"`` -- :func:`~sepconv.spectral.fourier.block_max`
    (vector blocks: the power spectrum of every channel; matrix blocks: the unique frequencies, the
    per-block scores and the full-grid peak search, the spatial Gram basis, the chunks of blocks);
    ``"gram"`` -- the Gram iteration's frequencies and chunks; ``"all"`` -- every singular value
    (:func:`~sepconv.spectral.fourier.all_block_singular_values`). An estimate of the leading terms
    (the chunks are capped at :data:`CHUNK_BYTES`, at least one frequency's blocks), made before
    anything is allocated."""
    c_out, ci, kh, kw = weight.shape
    (sh, sw), (dh, dw) = stride, dilation
    qh, qw = -(-(dh * (kh - 1) + 1) // sh), -(-(dw * (kw - 1) + 1) // sw)
    el = max(weight.element_size(), 4)
    g, co, cin = groups, c_out // groups, ci * sh * sw
    kernel = c_out * cin * qh * qw * el * (2 if (sh, sw, dh, dw) != (1, 1, 1, 1) else 0)
    nh, nw = grid[0] // sh, grid[1] // sw
    half, full = nh * (nw // 2 + 1), nh * nw
    m = min(co, cin)
    per_freq = g * max(m * m, co * cin) * 2 * el  # one frequency's complex blocks
    # chunks of at most CHUNK_BYTES, at least one frequency
    chunk = 4 * max(min(CHUNK_BYTES, half * per_freq), per_freq)
    if kind == "all":
        return kernel + 3 * full * g * m * 8 + 4 * full * 8 + chunk
    freqs = 6 * half * 8  # unique_frequencies: fh, fw and the meshgrid's flattened copies and masks
    basis = ((2 * qh - 1) * (2 * qw - 1) // 2 * 2 + 1) * g * (m * (m + 1) // 2) * 2 * el
    if kind == "gram":
        return kernel + freqs + basis + chunk
    if m == 1:  # vector blocks: |K^|^2 on the half grid for every (group, out, in) pair, real and imaginary parts
        return kernel + 3 * g * co * cin * half * el + g * half * el
    return kernel + freqs + basis + chunk + g * half * 8 + 5 * g * full * 8

