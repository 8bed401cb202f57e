"""Upper bounds on a convolution's spectral norm, and the reshape value torch reports.

Every bound here is **certified** for every geometry (a mathematical upper bound on the true
largest singular value of the map ``nn.Conv2d`` computes), differentiable in the weight,
and cheap; :func:`reshape_norm` is the exception -- neither a bound nor exact. Arguments are
validated (:mod:`sepconv.spectral.validate`); half and bfloat16 weights are computed in float32.

All of them go through :func:`sepconv.spectral.fourier.majorant`: a circulant operator ``M``
(and a factor ``f``: row repetitions, the norm of a reflect/replicate padding map) with
``||T|| <= f ||M||``. For circular geometries ``M = T`` and :func:`fft_bound` is exact.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..errors import ConfigError
from . import fourier, validate
from .spec import ConvSpec

__all__ = ["fantastic_four", "fantastic_four_terms", "fft_bound", "gram_iteration", "majorant_kernel", "reshape_norm"]


def majorant_kernel(weight: Tensor, spec: ConvSpec, where: str = "fft_bound", max_memory: float | None = None,
                    kind: str = "max") -> tuple[fourier.Majorant, Tensor, tuple[int, int]]:
    """The circulant majorant of ``(weight, spec)`` (:func:`fourier.majorant`: a circulant operator
    ``M`` and factor ``f`` with ``||T|| <= f ||M||``; docs/spectral.md Sec. 2), its polyphase kernel
    (:func:`fourier.circulant_kernel`) and frequency grid, after the memory of the problem on that
    grid (:func:`fourier.problem_bytes`, ``kind`` ``max``/``gram``/``all``) was checked against
    ``max_memory``; ``where`` names the caller in errors. Exact construction, no bound yet."""
    kh, kw = spec.check(weight, name=f"{where}: weight")
    maj = fourier.majorant(spec, (kh, kw))
    nbytes = fourier.problem_bytes(weight, maj.grid, maj.stride, spec.dilation, spec.groups, kind)
    validate.check_memory(nbytes, f"{where}: the frequency blocks of the conv {tuple(weight.shape)} "
                          f"{spec.describe((kh, kw))} on its {maj.grid[0]}x{maj.grid[1]} circulant grid", max_memory)
    kernel = fourier.circulant_kernel(weight, maj.stride, spec.dilation, spec.groups)
    return maj, kernel, (maj.grid[0] // maj.stride[0], maj.grid[1] // maj.stride[1])


#: The old private name of :func:`majorant_kernel`.
_majorant_kernel = majorant_kernel


def fft_bound(weight: Tensor, spec: ConvSpec, tol: float = 1e-6, max_memory: float | None = None) -> Tensor:
    """Circular-embedding bound ``f * max_w sigma_max(K^(w))`` on the majorant's grid.

    Zero padding: the layer is a submatrix of the strided circular convolution on
    ``N >= n + max(p_lo, p_hi)`` points (``N`` a multiple of the stride; see
    :func:`fourier.majorant`), so its norm is at most the circulant's -- a **certified upper
    bound**, converging to the exact value as ``n`` grows (docs/spectral.md Sec. 2;
    FFT(n) at ``N = n`` is *not* a bound). Circular geometries: **exact** (Sedghi et al. 2019,
    Thm. 6, with the polyphase form for stride). The block maximum is certified per
    frequency (:func:`fourier.block_max`, relative ``tol``); differentiable through the
    maximising block. Computed in the weight's precision: float64 weights make the guarantee
    hold beyond float32 rounding (~1e-6 relative); half/bfloat16 weights are computed in float32.
    ``0 < tol < 1``; the grid's memory is estimated first and refused above ``max_memory``
    bytes (default 2 GiB).
    """
    weight, _ = validate.conv_weight(weight, spec, "fft_bound")
    tol = validate.tolerance(tol, "fft_bound")
    maj, kernel, grid = majorant_kernel(weight, spec, "fft_bound", max_memory)
    top = fourier.block_max(kernel.detach(), grid, tol)
    value = fourier.block_value(kernel, grid, top.freq, top.group, top.value)
    # the certified side: the block maximum may exceed the argmax block by tol (rounding of ~1e-16)
    return maj.factor * value * (math.sqrt(top.upper / top.value) if top.value > 0 else 1.0)


def gram_iteration(weight: Tensor, spec: ConvSpec, iters: int = 6, max_memory: float | None = None) -> Tensor:
    """Gram iteration bound (Delattre, Barthelemy, Araujo, Allauzen, ICML 2023, arXiv 2305.16173,
    Alg. 2 / Thm. 3) on the majorant's frequency blocks, times ``f``: a **certified upper bound**.

    After ``t = iters`` Gram steps each block holds its Schatten ``2^t`` norm
    ``(sum_i sigma_i^(2^t))^(2^-t)``, which is ``>= sigma_1`` and ``<= rank^(2^-t) sigma_1``
    (super-linear convergence); Frobenius rescaling with the logarithms carried separately
    keeps it finite. The first step is the Gram block ``K^(w)^H K^(w)`` itself (computed from
    the spatial Gram kernel when cheaper). Differentiable through the maximising block.
    ``1 <= iters <= 64`` (it converges in a handful); half/bfloat16 weights are computed in
    float32; the grid's memory is estimated first and refused above ``max_memory`` bytes
    (default 2 GiB).
    """
    weight, _ = validate.conv_weight(weight, spec, "gram_iteration")
    iters = validate.count(iters, "gram_iteration", "iters", 1, 64)
    maj, kernel, grid = majorant_kernel(weight, spec, "gram_iteration", max_memory, kind="gram")

    def schatten(G: Tensor) -> Tensor:
        log_scale = torch.zeros(G.shape[:-2], dtype=G.real.dtype, device=G.device)
        for _ in range(iters - 1):
            r = torch.linalg.matrix_norm(G).clamp_min(torch.finfo(log_scale.dtype).tiny)
            G = G / r[..., None, None]
            log_scale = 2 * (log_scale + r.log())
            G = G.mH @ G
        fro = torch.linalg.matrix_norm(G).clamp_min(torch.finfo(log_scale.dtype).tiny)
        return torch.exp((log_scale + fro.log()) / 2 ** iters)

    fh, fw = fourier.unique_frequencies(grid, weight.device)
    with torch.no_grad():
        plan = fourier.gram_plan(kernel, fh.numel())
        spatial = fourier.HalfGram.of_kernel(kernel.detach(), plan.side) if plan.spatial else None
        g = kernel.shape[0]
        best, arg = -1.0, (0, 0)
        for sl in fourier.chunks(fh.numel(), g * plan.m * plan.m * kernel.element_size() * 8):
            v = schatten(fourier.gram_blocks(kernel.detach(), grid, fh[sl], fw[sl], plan, spatial)).flatten()
            i = int(v.argmax())
            if float(v[i]) > best:
                best, arg = float(v[i]), (sl.start + i // g, i % g)
    fi, grp = arg
    blk = fourier.gram_blocks(kernel[grp: grp + 1], grid, fh[fi: fi + 1], fw[fi: fi + 1],
                              fourier.GramPlan(plan.side, plan.m, False))
    return maj.factor * schatten(blk)[0, 0]


def _fantastic_four_groups(weight: Tensor, spec: ConvSpec) -> Tensor:
    """``sqrt(h w) factor (||R_g||, ||S_g||, ||T_g||, ||U_g||)`` per group ``g``: ``(4, groups)``."""
    kh, kw = spec.check(weight)
    g = spec.groups
    c_out, ci = weight.shape[:2]
    k = weight.reshape(g, c_out // g, ci, kh, kw)
    co = c_out // g
    mats = (
        k.permute(0, 1, 3, 2, 4).reshape(g, co * kh, ci * kw),  # R
        k.permute(0, 1, 4, 2, 3).reshape(g, co * kw, ci * kh),  # S
        k.reshape(g, co, ci * kh * kw),  # T
        k.permute(0, 2, 1, 3, 4).reshape(g, ci, co * kh * kw),  # U
    )
    with fourier.lapack_threads():
        norms = torch.stack([torch.linalg.matrix_norm(m, ord=2) for m in mats])
    return fourier.majorant(spec, (kh, kw)).factor * math.sqrt(kh * kw) * norms


def fantastic_four_terms(weight: Tensor, spec: ConvSpec) -> Tensor:
    """The four Fantastic Four bounds ``sqrt(h w) (||R||, ||S||, ||T||, ||U||)`` (Singla & Feizi,
    ICLR 2021, arXiv 1911.10258, Thm. 1), each maximised over groups: a ``(4,)`` tensor of
    **certified upper bounds**; :func:`fantastic_four` is their minimum.

    ``R, S, T, U`` are the four reshapes of the ``(c_out, c_in, h, w)`` kernel (``R``:
    ``(c_out h) x (c_in w)``, ``S``: ``(c_out w) x (c_in h)``, ``T``: ``c_out x (c_in h w)``, ``U``:
    ``c_in x (c_out h w)``); the norms are exact matrix 2-norms. The proof writes the layer as
    ``sum_ab L_ab (x) P_ab`` with shift matrices of norm <= 1, so it holds for zero and circular
    padding, any stride and dilation, independently of the input size; for reflect/replicate
    padding and repeated circular outputs it is multiplied by the majorant factor (the norm of
    the padding map / row repetition). A grouped conv is block-diagonal, so each bound is the
    maximum over groups. Differentiable; half/bfloat16 weights are computed in float32.
    """
    weight, _ = validate.conv_weight(weight, spec, "fantastic_four_terms")
    return _fantastic_four_groups(weight, spec).max(1).values


def fantastic_four(weight: Tensor, spec: ConvSpec) -> Tensor:
    """Fantastic Four bound ``sqrt(h w) min(||R||, ||S||, ||T||, ||U||)`` (Singla & Feizi, ICLR 2021,
    arXiv 1911.10258, Thm. 1), the smallest of the four per group, maximised over groups (the
    operator is block-diagonal): a **certified upper bound** for zero and circular padding, any
    stride and dilation (see :func:`fantastic_four_terms`). Differentiable; half/bfloat16 weights
    are computed in float32. Independent of the input size (``O(1)`` in it).
    """
    weight, _ = validate.conv_weight(weight, spec, "fantastic_four")
    return _fantastic_four_groups(weight, spec).min(0).values.max()


def reshape_norm(weight: Tensor) -> Tensor:
    """``||W.reshape(C_out, -1)||_2``: the value ``torch.nn.utils.parametrizations.spectral_norm``
    converges to (Miyato et al. 2018). **Neither a bound nor exact** for spatial kernels: for
    depthwise layers it lies anywhere in ``[sigma/k, sqrt(C) sigma]`` (docs/spectral.md
    Sec. 8); exact only for 1x1 convolutions without groups. Reported for comparison.
    Half/bfloat16 weights are computed in float32."""
    weight = validate.tensor(weight, "reshape_norm")
    if weight.dim() < 2 or weight.numel() == 0:
        raise ConfigError("reshape_norm: expected a non-empty weight with at least 2 dimensions, "
                          f"got {tuple(weight.shape)}")
    if not bool(torch.isfinite(weight).all()):
        raise ConfigError("reshape_norm: weight holds NaN or Inf values")
    return torch.linalg.matrix_norm(weight.reshape(weight.shape[0], -1), ord=2)
