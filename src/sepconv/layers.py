"""Separable convolution blocks that drop into any model: DSC, BSConv-U, BSConv-S.

Every block takes ``nn.Conv2d``'s arguments (``kernel_size``, ``stride``, ``padding``
including ``"same"``/``"valid"``, ``dilation``, ``bias``, ``padding_mode``) and is built of
plain ``nn.Conv2d`` / ``nn.BatchNorm2d`` children, applied in the order they are
registered, so spectral tools and conversions see ordinary convolutions:

============================  ==============================================================
``DepthwiseSeparableConv2d``  ``dw`` (k x k, groups=in) -> ``mid_norm`` -> ``mid_act`` -> ``pw`` (1x1)
``BSConvU``                   ``pw`` (1x1) -> [``bn``] -> ``dw`` (k x k, groups=out)
``BSConvS``                   ``pw1`` (1x1, in->mid) -> [``bn1``] -> ``pw2`` (1x1, mid->out) -> [``bn2``] -> ``dw``
============================  ==============================================================

The block's ``bias`` sits on its last convolution (``pw`` for DSC, ``dw`` for BSConv), so
a linear block computes ``conv2d(x, block.dense_weight(), bias)`` exactly.

``padding="same"`` follows PyTorch: it is allowed only with stride 1 (PyTorch pads
asymmetrically for even kernels then). With stride > 1 the blocks raise
:class:`~sepconv.errors.ConfigError` instead of padding TF-style, because TF "same"
padding depends on the input size and could not live in a plain ``nn.Conv2d``; pass an
explicit padding (``dilation * (k - 1) // 2`` keeps ``ceil(H / stride)`` for odd k).

The BSConv-S regularizer is :func:`orthonormality_defect` (a pure function) applied to
every convolution marked with :func:`mark_orthonormal`; :func:`orthonormal_penalty`
sums it over a model. ``BSConvS`` marks its ``pw1``; the BSConv-S MobileNets mark each
block's projection.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from .errors import ConfigError, UnsupportedLayerError

__all__ = [
    "CONV_KINDS",
    "BSConvS",
    "BSConvU",
    "DepthwiseSeparableConv2d",
    "bsconv_s_mid_channels",
    "compose_blueprint",
    "compose_depthwise_separable",
    "make_spatial_conv",
    "mark_orthonormal",
    "orthonormal_penalty",
    "orthonormality_defect",
    "penalty_sources",
]

IntPair = int | tuple[int, int]
Padding = str | int | tuple[int, int]
ModuleSpec = nn.Module | Callable[..., nn.Module] | None

#: The convolution flavours a model's spatial convolutions can take (see ``make_spatial_conv``).
CONV_KINDS = ("regular", "dsc", "bsconv_u", "bsconv_s")

#: Attribute set on a convolution whose weight rows the BSConv-S penalty pushes to orthonormality.
ORTHONORMAL_MARK = "sepconv_orthonormal"


# ----------------------------------------------------------------- pure functions


def orthonormality_defect(weight: Tensor) -> Tensor:
    """``||W W^T - I||_F`` (Frobenius norm, not squared) with ``W = weight.flatten(1)``.

    The BSConv-S regularization term of Haase & Amthor, "Rethinking Depthwise Separable
    Convolutions" (CVPR 2020, arXiv 2003.13549; the BSConv-S loss): it pushes the rows of the
    first pointwise matrix ``W in R^{M' x M}`` towards an orthonormal basis of a
    subspace. Exact (no approximation); ``I`` is the ``rows x rows`` identity, as in the
    reference code (``bsconv.pytorch.BSConvS._reg_loss``).
    """
    w = weight.flatten(1)
    gram = w @ w.transpose(0, 1)
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    return torch.linalg.matrix_norm(gram - eye, ord="fro")


def bsconv_s_mid_channels(in_channels: int, p: float, min_mid_channels: int = 4) -> int:
    """Width ``M' = min(M, max(min_mid_channels, ceil(p * M)))`` of the BSConv-S subspace
    (Haase & Amthor 2020, BSConv-S; the cap and the minimum as in the reference code ``bsconv`` 0.4.0)."""
    if not 0.0 <= p <= 1.0:
        raise ConfigError(f"BSConvS: p must be in [0, 1], got {p!r}")
    if min_mid_channels < 1:
        raise ConfigError(f"BSConvS: min_mid_channels must be >= 1, got {min_mid_channels!r}")
    return min(in_channels, max(min_mid_channels, math.ceil(p * in_channels)))


def compose_depthwise_separable(dw_weight: Tensor, pw_weight: Tensor, in_channels: int) -> Tensor:
    """Dense ``(out, in, k, k)`` kernel of a depthwise-then-pointwise convolution.

    ``dw_weight`` is ``(in * d, 1, k, k)`` (depth multiplier ``d``; channel ``i * d + j``
    reads input ``i``, PyTorch's grouped-conv layout) and ``pw_weight`` is
    ``(out, in * d, 1, 1)``; then ``F[o, i] = sum_j pw[o, i*d + j] * dw[i*d + j]``
    (the factorization of Howard et al. 2017, multiplied out). Exact for every padding mode: a
    bias-free pointwise convolution commutes with per-channel padding.
    """
    mid, k = dw_weight.shape[0], dw_weight.shape[-2:]
    if mid % in_channels:
        raise ConfigError(f"depthwise weight has {mid} channels, not a multiple of in_channels={in_channels}")
    prod = pw_weight[:, :, 0, 0, None, None] * dw_weight[None, :, 0]  # (out, in*d, k, k)
    return prod.reshape(pw_weight.shape[0], in_channels, mid // in_channels, *k).sum(2)


def compose_blueprint(pw_weight: Tensor, dw_weight: Tensor) -> Tensor:
    """Dense ``(out, in, k, k)`` kernel of pointwise-then-depthwise convolution (BSConv-U).

    ``F[n, m] = w[n, m] * B[n]`` with ``w = pw_weight[:, :, 0, 0]`` (``out x in``) and the
    blueprints ``B = dw_weight[:, 0]`` (``out x k x k``): the blueprint definition of Haase & Amthor 2020
    ("each filter is one blueprint scaled along depth"). Exact for every padding mode,
    since a bias-free pointwise convolution commutes with per-channel padding.

    With ``b`` blueprints per filter (``pw_weight`` is ``(out * b, in, 1, 1)`` and ``dw_weight``
    ``(out, b, k, k)``, a grouped conv reading ``b`` channels per output) the kernel is the sum
    of ``b`` blueprint terms, ``F[n, m] = sum_j w[n*b + j, m] B[n, j]`` (the ``K``-path form of
    Network Decoupling, Guo et al. 2018, arXiv 1808.05517); ``b = 1`` is the formula above.
    """
    out, b = dw_weight.shape[0], dw_weight.shape[1]
    w = pw_weight[:, :, 0, 0].reshape(out, b, -1)  # (out, b, in)
    return torch.einsum("ojm,ojhw->omhw", w, dw_weight)


# ----------------------------------------------------------------- helpers


def _pair(v: IntPair) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)  # type: ignore[return-value]


def _check_geometry(block: str, in_channels: int, out_channels: int, stride: IntPair, padding: Padding) -> None:
    for arg, v in (("in_channels", in_channels), ("out_channels", out_channels)):
        if not isinstance(v, int) or v < 1:
            raise ConfigError(f"{block}: {arg} must be a positive integer, got {v!r}")
    if isinstance(padding, str):
        if padding not in ("same", "valid"):
            raise ConfigError(f"{block}: padding must be 'same', 'valid', an int or a pair, got {padding!r}")
        if padding == "same" and _pair(stride) != (1, 1):
            raise ConfigError(
                f"{block}: padding='same' needs stride 1 (got stride={stride!r}); as in PyTorch, pass an "
                "explicit padding such as dilation*(kernel_size-1)//2 for strided convolutions")


def _check_blueprints(block: str, blueprints: int) -> None:
    if isinstance(blueprints, bool) or not isinstance(blueprints, int) or blueprints < 1:
        raise ConfigError(f"{block}: blueprints must be a positive integer, got {blueprints!r}")


def _make_norm(spec: ModuleSpec, channels: int) -> nn.Module:
    """``None`` -> Identity; a module -> itself; a callable (``nn.BatchNorm2d``) -> ``spec(channels)``."""
    if spec is None:
        return nn.Identity()
    return spec if isinstance(spec, nn.Module) else spec(channels)


def _make_act(spec: ModuleSpec) -> nn.Module:
    """``None`` -> Identity; a module -> itself; a callable (``nn.ReLU``) -> ``spec()``."""
    if spec is None:
        return nn.Identity()
    return spec if isinstance(spec, nn.Module) else spec()


class ChannelRepeat(nn.Module):
    """``m`` copies of the input stacked along channels: ``(N, C, H, W) -> (N, m C, H, W)``."""

    def __init__(self, copies: int) -> None:
        super().__init__()
        self.copies = copies

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([x] * self.copies, dim=1)

    def extra_repr(self) -> str:
        return f"copies={self.copies}"


class GroupSum(nn.Module):
    """The sum of ``parts`` consecutive channel slices: ``(N, p C, H, W) -> (N, C, H, W)``,
    ``y[:, c] = sum_j x[:, j C + c]``. In ``channels_last`` memory the slices are added one by one
    (``p - 1`` adds) instead of reduced over the slice axis, which is strided in that layout."""

    def __init__(self, parts: int) -> None:
        super().__init__()
        self.parts = parts

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or not x.is_contiguous(memory_format=torch.channels_last) or x.is_contiguous():
            return x.unflatten(1, (self.parts, -1)).sum(1)
        c = x.shape[1] // self.parts
        y = x[:, :c] + x[:, c:2 * c]
        for j in range(2, self.parts):
            y = y + x[:, j * c:(j + 1) * c]
        return y

    def extra_repr(self) -> str:
        return f"parts={self.parts}"


class Branches(nn.Module):
    """The sum of its branches' outputs on one input: ``y = sum_i f_i(x)``."""

    def __init__(self, *branches: nn.Module) -> None:
        super().__init__()
        self.branches = nn.ModuleList(branches)

    def forward(self, x: Tensor) -> Tensor:
        y = self.branches[0](x)
        for f in self.branches[1:]:
            y = y + f(x)
        return y


def _interleave(outer: int, inner: int, device=None) -> Tensor:
    """The channel permutation ``new j * outer + o <- old o * inner + j`` (an index, new -> old)."""
    return torch.arange(outer * inner, device=device).view(outer, inner).t().reshape(-1)


def _flat_depthwise(like: nn.Conv2d, weight: Tensor, bias: Tensor | None) -> nn.Conv2d:
    """A multiplier-1 depthwise conv on ``weight.shape[0]`` channels with ``like``'s geometry
    (kernel, stride, padding, dilation, padding mode), holding ``weight`` and ``bias``."""
    n = weight.shape[0]
    new = nn.Conv2d(n, n, like.kernel_size, like.stride, like.padding, like.dilation, groups=n, bias=bias is not None,
                    padding_mode=like.padding_mode, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias)
    return new


def _pointwise(weight: Tensor, bias: Tensor | None) -> nn.Conv2d:
    """A 1x1 conv holding ``weight`` ``(out, in)`` and ``bias``."""
    new = nn.Conv2d(weight.shape[1], weight.shape[0], 1, bias=bias is not None, device=weight.device,
                    dtype=weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight.reshape(new.weight.shape))
        if bias is not None:
            new.bias.copy_(bias)
    return new


#: activations that act on each value alone (they commute with a permutation of channels)
_STATELESS_ACTS = (nn.Identity, nn.ReLU, nn.ReLU6, nn.Hardswish, nn.Hardtanh, nn.SiLU, nn.GELU, nn.ELU,
                   nn.LeakyReLU, nn.Sigmoid, nn.Tanh, nn.Softplus)


class _SeparableBlock(nn.Module):
    """Shared plumbing: children run in registration order; ``nn.Conv2d``-like attributes."""

    spatial: str  # name of the k x k child
    last: str  # name of the child that carries the block's bias

    def forward(self, x: Tensor) -> Tensor:
        for m in self.children():
            x = m(x)
        return x

    def deploy_form(self, in_shape: tuple[int, ...] | None = None, for_onnx: bool = False) -> nn.Module:
        """The block's children without the ``nn.Identity`` ones (an absent or folded norm, no
        activation), as an ``nn.Sequential``: the same map with fewer Python calls, which at batch 1
        cost as much as a small conv (:func:`sepconv.deploy.deployable` uses it; ``for_onnx``: the
        form for an ONNX graph, where it differs)."""
        return nn.Sequential(*(m for m in self.children() if not isinstance(m, nn.Identity)))

    def dense_form(self, in_shape: tuple[int, ...]) -> nn.Conv2d | None:
        """The regular conv computing the same map on inputs of ``in_shape`` ``(C, H, W)``, or None
        when there is none.

        A linear block is ``x -> A x + r`` with ``A`` the regular conv of :meth:`dense_weight` (the
        composed kernel; exact for every padding mode, as its 1x1 convs commute with padding) and
        ``r`` the block's response to a zero input: its convs' biases carried through the block (a
        folded BatchNorm leaves one on an inner conv). The block is a regular conv when ``r`` is the
        same at every position (within float rounding), ``r`` then being the conv's bias; it is not
        when an inner bias meets zero padding (BSConv-U with a folded ``bn``: the padded border sees
        0, not the bias), nor with a norm or activation between the convs (None then too);
        docs/decomposition.md Sec. 4."""
        try:
            weight = self.dense_weight()
        except UnsupportedLayerError:
            return None
        with torch.no_grad():
            r = self(weight.new_zeros(1, *in_shape)).flatten(2)[0]  # (out, positions)
            bias = r.mean(1)
            if r.shape[1] == 0 or (r - bias[:, None]).abs().max() > 1e-6 * (1.0 + float(bias.abs().max())):
                return None
            conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                             self.dilation, bias=bool(bias.any()), padding_mode=self.padding_mode,
                             device=weight.device, dtype=weight.dtype)
            conv.weight.copy_(weight)
            if conv.bias is not None:
                conv.bias.copy_(bias)
        return conv

    @property
    def in_channels(self) -> int:
        return next(m for m in self.children() if isinstance(m, nn.Conv2d)).in_channels

    @property
    def out_channels(self) -> int:
        return getattr(self, self.last).out_channels

    @property
    def kernel_size(self) -> tuple[int, int]:
        return getattr(self, self.spatial).kernel_size

    @property
    def stride(self) -> tuple[int, int]:
        return getattr(self, self.spatial).stride

    @property
    def padding(self):
        return getattr(self, self.spatial).padding

    @property
    def dilation(self) -> tuple[int, int]:
        return getattr(self, self.spatial).dilation

    @property
    def padding_mode(self) -> str:
        return getattr(self, self.spatial).padding_mode

    @property
    def bias(self) -> Tensor | None:
        """The block's output bias (on its last convolution), or None."""
        return getattr(self, self.last).bias

    def _require_linear(self, between: list[str]) -> None:
        bad = [n for n in between if not isinstance(getattr(self, n, nn.Identity()), nn.Identity)]
        if bad:
            raise UnsupportedLayerError(
                f"{type(self).__name__}: no dense equivalent with {', '.join(bad)} between the convolutions")

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}")


# ----------------------------------------------------------------- blocks


class DepthwiseSeparableConv2d(_SeparableBlock):
    """Depthwise k x k convolution, then pointwise 1x1 (Sifre 2014; Howard et al. 2017).

    Children: ``dw`` (``Conv2d(in, in * depth_multiplier, k, groups=in, bias=False)``,
    carrying stride, padding, dilation and padding mode), ``mid_norm`` and ``mid_act``
    (``nn.Identity`` unless given), ``pw`` (``Conv2d(in * depth_multiplier, out, 1,
    bias=bias)``). ``mid_norm`` is a module or a factory called with the channel count
    (e.g. ``nn.BatchNorm2d``); ``mid_act`` is a module or a factory called without
    arguments (e.g. ``nn.ReLU``). Without them the block is linear (Xception-style, like
    Keras' ``SeparableConv2D``) and :meth:`dense_weight` gives its regular-conv kernel.
    """

    spatial, last = "dw", "pw"

    def __init__(self, in_channels: int, out_channels: int, kernel_size: IntPair, stride: IntPair = 1,
                 padding: Padding = 0, dilation: IntPair = 1, bias: bool = True, padding_mode: str = "zeros",
                 depth_multiplier: int = 1, mid_norm: ModuleSpec = None, mid_act: ModuleSpec = None,
                 device=None, dtype=None) -> None:
        super().__init__()
        _check_geometry(type(self).__name__, in_channels, out_channels, stride, padding)
        if not isinstance(depth_multiplier, int) or depth_multiplier < 1:
            raise ConfigError(f"DepthwiseSeparableConv2d: depth_multiplier must be a positive integer, "
                              f"got {depth_multiplier!r}")
        mid = in_channels * depth_multiplier
        fk = dict(device=device, dtype=dtype)
        self.dw = nn.Conv2d(in_channels, mid, kernel_size, stride, padding, dilation, groups=in_channels,
                            bias=False, padding_mode=padding_mode, **fk)
        self.mid_norm = _make_norm(mid_norm, mid).to(**fk)
        self.mid_act = _make_act(mid_act)
        self.pw = nn.Conv2d(mid, out_channels, 1, bias=bias, **fk)

    @property
    def depth_multiplier(self) -> int:
        return self.dw.out_channels // self.dw.in_channels

    def deploy_form(self, in_shape: tuple[int, ...] | None = None, for_onnx: bool = False) -> nn.Module:
        """The block without its identity children; with a depth multiplier ``m > 1`` (and nothing
        but a stateless activation between the convs) the same map in the form a runtime has fast kernels
        for. For PyTorch eager the depthwise conv reads ``m`` copies of its input as one multiplier-1
        depthwise conv on ``m C`` channels, its filters and the pointwise conv's columns permuted to match
        (a multiplier-m depthwise conv runs eager's generic grouped-conv path). ``for_onnx``: ``m``
        branches, each a multiplier-1 depthwise conv (filters ``j, j + m, ...``) and a pointwise conv (the
        matching columns), summed (:class:`Branches`): no input copies, and ONNX Runtime fuses each
        pointwise conv with the add after it (BENCHMARKS.md, "Deploy forms against the modules as built")."""
        m, dw = self.depth_multiplier, self.dw
        if m == 1 or not isinstance(self.mid_norm, nn.Identity) or not isinstance(self.mid_act, _STATELESS_ACTS):
            return super().deploy_form(in_shape)
        if for_onnx:
            return Branches(*(self._branch(j) for j in range(m)))
        perm = _interleave(dw.in_channels, m, dw.weight.device)
        new = _flat_depthwise(dw, dw.weight[perm], None if dw.bias is None else dw.bias[perm])
        pw = copy.deepcopy(self.pw)
        with torch.no_grad():
            pw.weight.copy_(self.pw.weight[:, perm])
        parts = [ChannelRepeat(m), new, self.mid_act, pw]
        return nn.Sequential(*(p for p in parts if not isinstance(p, nn.Identity)))

    def _branch(self, j: int) -> nn.Sequential:
        """Branch ``j`` of the ``for_onnx`` deploy form: the ``j``-th filter of each input's ``m``, the
        activation, and the pointwise conv's columns they feed (the bias once, in branch 0). The block is
        the sum of these ``m`` paths: depth multiplier ``m`` read as ``m`` parallel DW->PW paths (Network
        Decoupling's ``-DP`` form, Guo et al., BMVC 2018, arXiv 1808.05517; docs/decomposition.md Sec. 1)."""
        m, dw, pw = self.depth_multiplier, self.dw, self.pw
        depthwise = _flat_depthwise(dw, dw.weight[j::m], None if dw.bias is None else dw.bias[j::m])
        point = _pointwise(pw.weight[:, j::m], pw.bias if j == 0 else None)
        return nn.Sequential(*(p for p in (depthwise, self.mid_act, point) if not isinstance(p, nn.Identity)))

    def dense_weight(self) -> Tensor:
        """The ``(out, in, k, k)`` kernel of the regular conv computing the same map (exact;
        needs ``mid_norm`` and ``mid_act`` to be absent). See :func:`compose_depthwise_separable`."""
        self._require_linear(["mid_norm", "mid_act"])
        return compose_depthwise_separable(self.dw.weight, self.pw.weight, self.dw.in_channels)


class BSConvU(_SeparableBlock):
    """Unconstrained blueprint separable convolution: pointwise 1x1, then depthwise k x k
    (Haase & Amthor, CVPR 2020).

    Children: ``pw`` (``Conv2d(in, out, 1, bias=False)``), ``bn``
    (``BatchNorm2d(out, **bn_kwargs)``, only with ``with_bn=True``), ``dw``
    (``Conv2d(out, out, k, groups=out, bias=bias)`` with stride, padding, dilation and
    padding mode). Same parameters, names and function as ``bsconv.pytorch.BSConvU``.

    ``blueprints=b > 1`` (not in ``bsconv``) gives each filter ``b`` blueprints: ``pw`` is
    ``Conv2d(in, out * b, 1)``, ``bn`` has ``out * b`` channels and ``dw`` is the grouped
    ``Conv2d(out * b, out, k, groups=out)`` -- the ``K``-path PW->DW form of Network
    Decoupling (Guo et al. 2018), which :mod:`sepconv.decompose` produces at rank ``b``.
    """

    spatial, last = "dw", "dw"

    def __init__(self, in_channels: int, out_channels: int, kernel_size: IntPair, stride: IntPair = 1,
                 padding: Padding = 0, dilation: IntPair = 1, bias: bool = True, padding_mode: str = "zeros",
                 with_bn: bool = False, bn_kwargs: dict | None = None, blueprints: int = 1,
                 device=None, dtype=None) -> None:
        super().__init__()
        _check_geometry(type(self).__name__, in_channels, out_channels, stride, padding)
        _check_blueprints(type(self).__name__, blueprints)
        fk = dict(device=device, dtype=dtype)
        mid = out_channels * blueprints
        self.pw = nn.Conv2d(in_channels, mid, 1, bias=False, **fk)
        if with_bn:
            self.bn = nn.BatchNorm2d(mid, **(bn_kwargs or {}), **fk)
        self.dw = nn.Conv2d(mid, out_channels, kernel_size, stride, padding, dilation,
                            groups=out_channels, bias=bias, padding_mode=padding_mode, **fk)

    @property
    def blueprints(self) -> int:
        return self.dw.in_channels // self.dw.out_channels

    def deploy_form(self, in_shape: tuple[int, ...] | None = None, for_onnx: bool = False) -> nn.Module:
        """The block without its identity children; with ``b > 1`` blueprints (and no ``bn``, or one
        folded away) the same map in the form a runtime has fast kernels for. For PyTorch eager the
        grouped ``dw`` (``b`` inputs per output) becomes a multiplier-1 depthwise conv on the ``b C``
        channels followed by the sum of its ``b`` channel slices (:class:`GroupSum`), ``pw``'s rows
        permuted to match (eager's generic grouped-conv path is slow). ``for_onnx``: ``b`` branches, each
        a pointwise conv (``pw``'s rows ``j, j + b, ...``) and a multiplier-1 depthwise conv (each output's
        ``j``-th blueprint), summed (:class:`Branches`): ONNX Runtime has no fast slice sum and fuses the
        add instead (BENCHMARKS.md, "Deploy forms against the modules as built")."""
        b, dw = self.blueprints, self.dw
        if b == 1 or not isinstance(getattr(self, "bn", nn.Identity()), nn.Identity):
            return super().deploy_form(in_shape)
        if for_onnx:
            return Branches(*(self._branch(j) for j in range(b)))
        o = dw.out_channels
        perm = _interleave(o, b, dw.weight.device)
        bias = None if dw.bias is None else torch.cat([dw.bias, dw.bias.new_zeros((b - 1) * o)])  # once, 1st slice
        new = _flat_depthwise(dw, dw.weight.reshape(o * b, 1, *dw.kernel_size)[perm], bias)
        pw = copy.deepcopy(self.pw)
        with torch.no_grad():
            pw.weight.copy_(self.pw.weight[perm])
            if pw.bias is not None:
                pw.bias.copy_(self.pw.bias[perm])
        return nn.Sequential(pw, new, GroupSum(b))

    def _branch(self, j: int) -> nn.Sequential:
        """Branch ``j`` of the ``for_onnx`` deploy form: the pointwise rows feeding each output's ``j``-th
        blueprint, then those blueprints as a multiplier-1 depthwise conv (the bias once, in branch 0). The
        block is the sum of these ``b`` paths: the ``K``-path PW->DW form of Network Decoupling (Guo et al.,
        BMVC 2018, arXiv 1808.05517) with ``K = b``; docs/decomposition.md Sec. 3."""
        b, dw, pw = self.blueprints, self.dw, self.pw
        point = _pointwise(pw.weight[j::b], None if pw.bias is None else pw.bias[j::b])
        return nn.Sequential(point, _flat_depthwise(dw, dw.weight[:, j:j + 1], dw.bias if j == 0 else None))

    def dense_weight(self) -> Tensor:
        """The ``(out, in, k, k)`` kernel ``F[n, m] = w[n, m] B[n]`` of the regular conv
        computing the same map (exact; needs ``with_bn=False``)."""
        self._require_linear(["bn"])
        return compose_blueprint(self.pw.weight, self.dw.weight)


class BSConvS(_SeparableBlock):
    """Subspace blueprint separable convolution: pointwise into ``M'`` channels, pointwise
    out, depthwise k x k (Haase & Amthor, CVPR 2020).

    ``M' = min(in, max(min_mid_channels, ceil(p * in)))``. Children: ``pw1``
    (``Conv2d(in, M', 1, bias=False)``, marked for the orthonormality penalty), ``bn1``
    (``BatchNorm2d(M')``, only with ``with_bn``), ``pw2`` (``Conv2d(M', out, 1,
    bias=False)``), ``bn2`` (``BatchNorm2d(out)``, only with ``with_bn``), ``dw``
    (``Conv2d(out, out, k, groups=out, bias=bias)``). Same parameters, names and function
    as ``bsconv.pytorch.BSConvS``. Train with ``loss + orthonormal_penalty(model)``.

    Two options beyond ``bsconv`` (used by :mod:`sepconv.decompose`): ``mid_channels``
    sets ``M'`` directly (instead of ``p``), and ``blueprints=b`` gives each filter ``b``
    blueprints as in :class:`BSConvU` (``pw2`` then has ``out * b`` channels and ``dw`` is
    grouped, ``b`` inputs per output).
    """

    spatial, last = "dw", "dw"

    def __init__(self, in_channels: int, out_channels: int, kernel_size: IntPair, stride: IntPair = 1,
                 padding: Padding = 0, dilation: IntPair = 1, bias: bool = True, padding_mode: str = "zeros",
                 p: float = 0.25, min_mid_channels: int = 4, with_bn: bool = False,
                 bn_kwargs: dict | None = None, blueprints: int = 1, mid_channels: int | None = None,
                 device=None, dtype=None) -> None:
        super().__init__()
        _check_geometry(type(self).__name__, in_channels, out_channels, stride, padding)
        _check_blueprints(type(self).__name__, blueprints)
        if mid_channels is None:
            mid = bsconv_s_mid_channels(in_channels, p, min_mid_channels)
        elif isinstance(mid_channels, bool) or not isinstance(mid_channels, int) or mid_channels < 1:
            raise ConfigError(f"BSConvS: mid_channels must be a positive integer, got {mid_channels!r}")
        else:
            mid = mid_channels
        fk = dict(device=device, dtype=dtype)
        bk = bn_kwargs or {}
        out_b = out_channels * blueprints
        self.pw1 = mark_orthonormal(nn.Conv2d(in_channels, mid, 1, bias=False, **fk))
        if with_bn:
            self.bn1 = nn.BatchNorm2d(mid, **bk, **fk)
        self.pw2 = nn.Conv2d(mid, out_b, 1, bias=False, **fk)
        if with_bn:
            self.bn2 = nn.BatchNorm2d(out_b, **bk, **fk)
        self.dw = nn.Conv2d(out_b, out_channels, kernel_size, stride, padding, dilation,
                            groups=out_channels, bias=bias, padding_mode=padding_mode, **fk)

    @property
    def blueprints(self) -> int:
        return self.dw.in_channels // self.dw.out_channels

    @property
    def mid_channels(self) -> int:
        return self.pw1.out_channels

    def penalty(self) -> Tensor:
        """This block's unweighted regularization term ``||W W^T - I||_F`` on ``pw1``
        (see :func:`orthonormality_defect`)."""
        return orthonormality_defect(self.pw1.weight)

    def dense_weight(self) -> Tensor:
        """The ``(out, in, k, k)`` kernel of the regular conv computing the same map:
        blueprint composition with ``w = W_A W_B`` (exact; needs ``with_bn=False``)."""
        self._require_linear(["bn1", "bn2"])
        w = torch.einsum("om,mi->oi", self.pw2.weight[:, :, 0, 0], self.pw1.weight[:, :, 0, 0])
        return compose_blueprint(w[:, :, None, None], self.dw.weight)


# ----------------------------------------------------------------- the penalty over a model


def mark_orthonormal(conv: nn.Conv2d) -> nn.Conv2d:
    """Mark ``conv`` so that :func:`orthonormal_penalty` includes ``||W W^T - I||_F`` of its
    weight (rows = output channels). Returns ``conv`` (still a plain ``nn.Conv2d``)."""
    setattr(conv, ORTHONORMAL_MARK, True)
    return conv


def penalty_sources(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every module of ``model`` marked by :func:`mark_orthonormal`
    (the ``pw1`` of each :class:`BSConvS`, the projections of BSConv-S MobileNets)."""
    return [(n, m) for n, m in model.named_modules() if getattr(m, ORTHONORMAL_MARK, False)]


def orthonormal_penalty(model: nn.Module, alpha: float = 0.1) -> Tensor:
    """The BSConv-S regularizer ``alpha * sum_layers ||W W^T - I||_F`` of a model (Haase &
    Amthor 2020; a sum over layers, not a mean, as ``bsconv``'s ``reg_loss``).

    Exact. Returns a 0-dim tensor; a zero (without grad) when the model has no marked
    layer, so ``loss = criterion(out, y) + orthonormal_penalty(model)`` works for any model.
    """
    terms = [orthonormality_defect(m.weight) for _, m in penalty_sources(model)]
    if not terms:
        p = next(iter(model.parameters()), None)
        return torch.zeros((), dtype=p.dtype if p is not None else None, device=p.device if p is not None else None)
    return alpha * torch.stack(terms).sum()


# ----------------------------------------------------------------- the conv= factory


def make_spatial_conv(kind: str, in_channels: int, out_channels: int, kernel_size: IntPair,
                      stride: IntPair = 1, padding: Padding = 0, dilation: IntPair = 1, bias: bool = False,
                      *, padding_mode: str = "zeros", bsconv_p: float = 0.25) -> nn.Module:
    """A spatial (k x k, groups=1) convolution in the flavour ``kind``:

    - ``"regular"``: ``nn.Conv2d``;
    - ``"dsc"``: :class:`DepthwiseSeparableConv2d` without norm/activation in between
      (linear, Xception-style; the mirror image of BSConv-U and the form that converting
      a trained conv produces);
    - ``"bsconv_u"``: :class:`BSConvU` without BN (as ``bsconv``'s ``BSConvU_Replacer``
      in its ResNets);
    - ``"bsconv_s"``: :class:`BSConvS` with BN between the pointwise convs and
      ``p=bsconv_p`` (as the ``bsconv`` ResNets/WRNs, ``BSConvS_Replacer(with_bn=True)``).
    """
    args = (in_channels, out_channels, kernel_size, stride, padding, dilation)
    if kind == "regular":
        return nn.Conv2d(*args, bias=bias, padding_mode=padding_mode)
    if kind == "dsc":
        return DepthwiseSeparableConv2d(*args, bias=bias, padding_mode=padding_mode)
    if kind == "bsconv_u":
        return BSConvU(*args, bias=bias, padding_mode=padding_mode)
    if kind == "bsconv_s":
        return BSConvS(*args, bias=bias, padding_mode=padding_mode, p=bsconv_p, with_bn=True)
    raise ConfigError(f"unknown conv kind {kind!r}; choose one of {', '.join(CONV_KINDS)}")
