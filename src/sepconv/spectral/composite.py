"""Composite linear blocks: exact norms of conv chains with nothing nonlinear in between.

A depthwise-separable block (DSC: depthwise then pointwise), BSConv-U (pointwise then
depthwise) and BSConv-S (two pointwise then depthwise), with or without an eval-mode
BatchNorm between the parts, is one linear map -- and, when at most one of its parts is
spatial, exactly *one* convolution. Padding maps copy pixels and commute with per-pixel
channel mixing, so

* pointwise ``P`` after a conv ``K``: the conv with weight ``P K`` (``(P K)[o, i] = sum_m P[o, m] K[m, i]``);
* pointwise ``P`` before a conv ``K``: the conv with weight ``K P``, on ``K``'s geometry;
* BatchNorm (eval): a per-channel scale on the adjacent conv's output (or input) channels;
  its shift is an affine constant, irrelevant for norms and Lipschitz constants.

The merged weight is dense (``groups=1``) unless nothing was merged; its per-frequency blocks
are exactly ``P diag(K^(w))`` for DSC and ``diag(K^(w)) P`` for BSConv (docs/spectral.md
Sec. 9), so :func:`sepconv.spectral.spectral_norm` on it is the block's exact norm where the
geometry is circulant, and its certified bracket elsewhere.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

from ..errors import ConfigError, UnsupportedLayerError
from .methods import spectral_norm
from .spec import ConvSpec

__all__ = ["batchnorm_lipschitz", "batchnorm_scale", "chain_norm", "is_unpadded_1x1", "linear_norm", "merge_chain"]


def batchnorm_scale(bn: nn.modules.batchnorm._BatchNorm, name: str = "", detach: bool = True) -> Tensor:
    """Per-channel slope ``gamma / sqrt(running_var + eps)`` of an eval-mode BatchNorm (exact).
    Refuses (naming the layer ``name``) statistics without a linear map: none recorded, NaN/Inf,
    or ``running_var + eps <= 0`` (a variance is never negative). ``detach=False`` keeps the
    gradient to ``gamma`` and leaves NaN/Inf to the caller (a training loss reports divergence)."""
    what = f"{type(bn).__name__}{f' {name!r}' if name else ''}"
    if bn.running_var is None:
        raise UnsupportedLayerError(f"{what} without running statistics has no fixed linear map")
    var = bn.running_var.detach() + bn.eps
    if not detach:
        return torch.rsqrt(var) * (1 if bn.weight is None else bn.weight)
    if not bool(torch.isfinite(var).all()) or (bn.weight is not None and not bool(torch.isfinite(bn.weight).all())):
        raise ConfigError(f"{what}: running_var or weight holds NaN or Inf values")
    if not bool((var > 0).all()):
        raise ConfigError(f"{what}: running_var + eps must be positive, got {float(var.min()):.3g}")
    scale = torch.rsqrt(var)
    return scale * bn.weight.detach() if bn.weight is not None else scale


def batchnorm_lipschitz(bn: nn.modules.batchnorm._BatchNorm, name: str = "") -> Tensor:
    """Lipschitz constant of an eval-mode BatchNorm: ``max_c |gamma_c| / sqrt(var_c + eps)``.
    **Exact** (the map is diagonal; Gouk et al. 2021, arXiv 1804.04368, Sec. 3). Train-mode
    BatchNorm depends on the batch and has no such constant."""
    return batchnorm_scale(bn, name).abs().max()


def linear_norm(linear: nn.Linear) -> Tensor:
    """Spectral norm ``||W||_2`` of a fully connected layer: **exact** (matrix 2-norm; the map acts
    on the last dimension, so any leading dimensions leave it unchanged)."""
    return torch.linalg.matrix_norm(linear.weight, ord=2)


def _dense(weight: Tensor, groups: int) -> Tensor:
    """A grouped conv weight ``(C_out, C_in/g, kh, kw)`` as the equivalent ``groups=1`` weight."""
    if groups == 1:
        return weight
    c_out, ci, kh, kw = weight.shape
    co = c_out // groups
    out = weight.new_zeros(c_out, ci * groups, kh, kw)
    for g in range(groups):
        out[g * co:(g + 1) * co, g * ci:(g + 1) * ci] = weight[g * co:(g + 1) * co]
    return out


def is_unpadded_1x1(conv: nn.Conv2d) -> bool:
    """A 1x1 kernel with no padding at all (``"same"`` pads a 1x1 kernel by nothing): per output pixel
    a channel-mixing matrix, so it commutes with the padding of a neighbouring spatial conv and
    merges into it (:func:`merge_chain`). Exact test of the module's settings."""
    return tuple(conv.kernel_size) == (1, 1) and (conv.padding in ("valid", (0, 0)) or conv.padding == "same")


def merge_chain(modules: Sequence[nn.Module], in_size: Sequence[int], detach: bool = True) -> tuple[Tensor, ConvSpec]:
    """One convolution ``(weight, spec)`` equal to the linear part of ``modules`` applied in order.

    ``modules`` are ``nn.Conv2d`` (at most one of them spatial -- a kernel larger than 1x1 or
    padding -- and no stride before it), eval-mode ``BatchNorm2d``, ``Identity`` or ``Dropout``
    (identity in eval mode). **Exact**: the merged
    layer computes the same linear map (biases and BatchNorm shifts dropped), on inputs of
    ``in_size``. Raises :class:`~sepconv.errors.UnsupportedLayerError` for anything else.
    The merged weight is a float64 copy (the precision every certified method computes in);
    ``detach=False`` keeps it in the layers' dtype, differentiable in their weights.
    """
    weight: Tensor | None = None  # merged so far, with its groups
    groups = 1
    spec: ConvSpec | None = None  # geometry of the spatial (or strided) part, once seen
    in_scale: Tensor | None = None  # BatchNorm before the first conv
    for mod in modules:
        if isinstance(mod, (nn.Identity, nn.Dropout, nn.Dropout2d)):
            continue
        if isinstance(mod, nn.BatchNorm2d):
            s = batchnorm_scale(mod, detach=detach)
            if weight is None:
                in_scale = s if in_scale is None else in_scale * s
            else:
                weight = weight * s.to(weight)[:, None, None, None]
            continue
        if not isinstance(mod, nn.Conv2d) or isinstance(mod, nn.modules.conv._ConvTransposeNd):
            raise UnsupportedLayerError(f"merge_chain: cannot merge {type(mod).__name__} into a convolution")
        w = mod.weight.detach().to(torch.float64) if detach else mod.weight
        pointwise = is_unpadded_1x1(mod)
        if weight is None:
            weight, groups = w, mod.groups
            if not pointwise or tuple(mod.stride) != (1, 1):
                spec = ConvSpec.of(mod, in_size)
            if in_scale is not None:
                dense = _dense(weight, groups)
                weight, groups = dense * in_scale.to(dense)[None, :, None, None], 1
        elif pointwise and (spec is not None or tuple(mod.stride) == (1, 1)):
            # pointwise after the merged part: P K; its stride subsamples the merged output
            P = _dense(w, mod.groups)[:, :, 0, 0]
            K = _dense(weight, groups)
            weight, groups = torch.einsum("om,miab->oiab", P.to(K), K), 1
            if tuple(mod.stride) != (1, 1):
                base = spec or ConvSpec(tuple(in_size))
                spec = ConvSpec(base.in_size, (base.stride[0] * mod.stride[0], base.stride[1] * mod.stride[1]),
                                base.padding, base.padding_mode, base.dilation, 1)
        elif spec is None:
            # spatial conv after pointwise part(s): K P, on the spatial conv's geometry
            K = _dense(w, mod.groups)
            P = _dense(weight, groups)[:, :, 0, 0]
            weight, groups = torch.einsum("omab,mi->oiab", K, P.to(K)), 1
            spec = ConvSpec.of(mod, in_size)
        else:
            raise UnsupportedLayerError(
                "merge_chain: a spatial or strided convolution after another one is not a single convolution")
    if weight is None:
        raise ConfigError("merge_chain: the chain holds no convolution")
    if spec is None:  # all pointwise
        spec = ConvSpec(tuple(in_size), 1, 0, "zeros", 1, groups)
    return weight, ConvSpec(spec.in_size, spec.stride, spec.padding, spec.padding_mode, spec.dilation, groups)


def chain_norm(modules: Iterable[nn.Module], in_size: Sequence[int], method: str = "exact", **kw) -> Tensor:
    """Spectral norm of a linear conv chain (e.g. a DSC or BSConv block with its BatchNorm, in
    eval mode) by ``method`` (see :func:`sepconv.spectral.spectral_norm`): **exact** for
    ``method="exact"`` (per frequency ``||P diag(K^(w))||`` in circulant geometries), certified
    for the bounds. Uses :func:`merge_chain`."""
    weight, spec = merge_chain(list(modules), in_size)
    return spectral_norm(weight, spec, method=method, **kw)
