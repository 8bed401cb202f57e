"""The 2-D DFT of small kernels: frequency grids, per-frequency blocks, and frequency chunks.

A circular stride-1 convolution on an ``N_h x N_w`` grid acts on frequency ``w`` as the
``C_out x C_in`` matrix ``K^(w) = sum_a K[:, :, a] e^{-2 pi i <w, a>/N}`` (Sedghi, Gupta, Long
2019, Thm. 6; docs/spectral.md Sec. 1). Kernels are far smaller than the grid, so these are
*direct* DFTs -- a matmul by a table of phases (:func:`phases`) -- at chosen frequencies, not
FFTs of a zero-padded kernel; taps wider than the grid wrap around correctly.

* :func:`unique_frequencies` / :func:`all_frequencies` -- which frequencies to visit;
* :func:`symbol` -- the blocks ``K^(w)``;
* :func:`vector_block_power` (the whole half grid) and :func:`vector_block_power_at` -- the
  closed form ``||K^(w)||_F^2`` for vector blocks (depthwise convolutions);
* :func:`chunks` -- frequency slices within :data:`CHUNK_BYTES`, so memory stays bounded.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

__all__ = [
    "CHUNK_BYTES",
    "all_frequencies",
    "chunks",
    "phases",
    "symbol",
    "unique_frequencies",
    "vector_block_power",
    "vector_block_power_at",
]

#: Memory budget (bytes) of one chunk of per-frequency blocks.
CHUNK_BYTES = 64 * 2**20


def chunks(n: int, bytes_per_item: int, budget: int = CHUNK_BYTES) -> Iterator[slice]:
    """Slices of ``range(n)`` whose items take at most ``budget`` bytes (at least one item)."""
    step = max(1, budget // max(1, bytes_per_item))
    step = -(-n // -(-n // step)) if n else 1  # as many slices, of balanced sizes
    for i in range(0, n, step):
        yield slice(i, min(n, i + step))


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
    """Every frequency ``(u, v)`` of the ``N_h x N_w`` grid, row-major: two ``(N_h N_w,)`` tensors."""
    uu, vv = torch.meshgrid(torch.arange(grid[0], device=device), torch.arange(grid[1], device=device), indexing="ij")
    return uu.flatten(), vv.flatten()


def phases(fh: Tensor, fw: Tensor, grid: Sequence[int], pos_h: Tensor, pos_w: Tensor, dtype) -> tuple[Tensor, Tensor]:
    """cos and sin of ``2 pi (u a / N_h + v b / N_w)`` for frequencies ``(u, v)`` (F) and tap
    positions ``(a, b)`` (T, flattened row-major): two real ``(T, F)`` matrices."""
    ang = (pos_h.to(torch.float64)[:, None] * fh.to(torch.float64)[None, :]).remainder(grid[0]) / grid[0]
    ang = ang[:, None, :] + ((pos_w.to(torch.float64)[:, None] * fw.to(torch.float64)[None, :]).remainder(grid[1])
                             / grid[1])[None, :, :]
    ang = (2 * math.pi) * ang.reshape(-1, fh.numel())
    return torch.cos(ang).to(dtype), torch.sin(ang).to(dtype)


def _dft(flat: Tensor, c: Tensor, s: Tensor) -> Tensor:
    """``sum_t flat[:, t] e^{-i angle[t, f]}`` given ``c = cos angle``, ``s = sin angle``: ``(F, rows)``
    complex, by one complex matmul laid out so that no transposing copy follows."""
    cplx = torch.complex(c, -s).T  # (F, T)
    return cplx @ flat.T.to(cplx.dtype)


def symbol(kernel: Tensor, grid: Sequence[int], fh: Tensor, fw: Tensor) -> Tensor:
    """Per-frequency blocks ``K^(w) = sum_a K[..., a] e^{-2 pi i <w, a>/N}`` at the given
    frequencies: ``(F, *kernel.shape[:-2])`` complex. Exact (a direct DFT, so kernels wider
    than the grid wrap around correctly)."""
    qh, qw = kernel.shape[-2:]
    lead = kernel.shape[:-2]
    c, s = phases(fh, fw, grid, torch.arange(qh, device=kernel.device), torch.arange(qw, device=kernel.device),
                   kernel.dtype)
    return _dft(kernel.reshape(-1, qh * qw), c, s).reshape(fh.numel(), *lead)


@functools.lru_cache(maxsize=64)
def _real_dft_tables(qh: int, qw: int, nh: int, nw: int, dtype: torch.dtype,
                     device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """``[cos | sin]`` along w ``(qw, 2 (nw//2 + 1))`` and the two halves ``[cos; -sin]``,
    ``[sin; cos]`` of the rotation along h ``(2 qh, nh)`` of :func:`vector_block_power`
    (constants, cached per shape)."""

    def cs(q: int, n: int, m: int) -> tuple[Tensor, Tensor]:
        ang = (torch.arange(q, dtype=torch.float64)[:, None] * torch.arange(m, dtype=torch.float64)[None, :]) % n
        ang = ang * (2 * math.pi / n)
        return torch.cos(ang).to(device, dtype), torch.sin(ang).to(device, dtype)

    with torch.inference_mode(False), torch.no_grad():  # cached: must be usable in autograd later
        cw, sw = cs(qw, nw, nw // 2 + 1)  # (qw, Mw')
        ch, sh = cs(qh, nh, nh)  # (qh, Mh)
        return torch.cat([cw, sw], 1), torch.cat([ch, -sh], 0), torch.cat([sh, ch], 0)


def vector_block_power(kernel: Tensor, grid: Sequence[int]) -> Tensor:
    """``||K^(w)||_F^2`` on the half grid ``(g, N_h, N_w//2 + 1)`` by a separable real DFT of the
    kernel (two small matmuls; taps wider than the grid wrap around). For blocks that are
    vectors (depthwise convs; with a depth multiplier or a stride, not both) this is
    ``sigma_max(K^(w))^2``: the closed form ``max |K^_c(w)|^2`` summed over aliases
    (docs/spectral.md Sec. 1). Exact."""
    nh, nw = grid
    qh, qw = kernel.shape[-2:]
    csw, rot_re, rot_im = _real_dft_tables(qh, qw, nh, nw, kernel.dtype, kernel.device)
    lead = kernel.shape[:-2]
    n, mw = math.prod(lead), nw // 2 + 1
    # stage 1 (along w): [A | B] = K [cos | sin]; stage 2 (along h), one GEMM each for
    # re = A cos_h - B sin_h and im = A sin_h + B cos_h (minus the imaginary part), so that both
    # come out contiguous and |K^|^2 = re^2 + im^2 is formed in place (memory-bound: one pass)
    AB = (kernel.reshape(n * qh, qw) @ csw).reshape(n, qh, 2, mw)
    AB = AB.permute(0, 3, 2, 1).reshape(n * mw, 2 * qh)  # rows (item, v), columns (A | B, a)
    re, im = AB @ rot_re, AB @ rot_im  # (n Mw', Mh) each
    if kernel.requires_grad and torch.is_grad_enabled():
        power = torch.addcmul(re * re, im, im)
    else:  # no graph to keep: square in place
        power = re.mul_(re).addcmul_(im, im)
    power = power.view(*lead, mw, nh)  # (g, co, ci, Mw', Mh)
    power = power.sum((1, 2)) if power.shape[1] * power.shape[2] > 1 else power[:, 0, 0]
    return power.transpose(-1, -2)


def vector_block_power_at(kernel: Tensor, grid: Sequence[int], fh: Tensor, fw: Tensor) -> Tensor:
    """``||K_g^(w_g)||_F^2`` of each group ``g`` at its own frequency ``(fh[g], fw[g])``: ``(g,)``,
    differentiable. With ``w_g`` the argmax of :func:`vector_block_power` (found without a graph)
    this is the same maximum, and its gradient is the subgradient of the max -- at the cost of one
    frequency per channel instead of a backward pass through the whole spectrum. Exact."""
    qh, qw = kernel.shape[-2:]
    c, s = phases(fh, fw, grid, torch.arange(qh, device=kernel.device), torch.arange(qw, device=kernel.device),
                   kernel.dtype)  # (taps, g): column g holds group g's own frequency
    g = kernel.shape[0]
    k = kernel.reshape(g, -1, qh * qw)
    re, im = k @ c.T[:, :, None], k @ s.T[:, :, None]
    return (re.square() + im.square()).reshape(g, -1).sum(1)

