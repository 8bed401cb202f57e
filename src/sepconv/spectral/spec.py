"""The geometry of a 2-D convolution: :class:`ConvSpec`.

A convolution layer is a linear map ``x (C_in, H, W) -> y (C_out, H_out, W_out)`` fixed by
its weight and its *geometry*: the input size, stride, padding (per side) and padding
mode, dilation and groups. Everything in :mod:`sepconv.spectral` is a pure function of
``(weight, spec)``; the bias is an affine offset and plays no part in any norm.

:meth:`ConvSpec.apply` is exactly what :class:`torch.nn.Conv2d` computes (minus the bias),
:meth:`ConvSpec.adjoint` is its exact adjoint (never the unflipped-kernel shortcut), and
:meth:`ConvSpec.dense_operator` builds the explicit matrix -- the ground truth of the tests.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError, UnsupportedLayerError
from ..guard import tensor_bytes
from .budget import check_memory

__all__ = ["PADDING_MODES", "ConvSpec", "norm_of_padding", "pad_copies", "tap_matrices_1d", "tap_sources_1d"]

PADDING_MODES = ("zeros", "circular", "reflect", "replicate")
_TORCH_PAD_MODE = {"zeros": "constant", "circular": "circular", "reflect": "reflect", "replicate": "replicate"}

Pair = tuple[int, int]
Padding = str | tuple[int, int, int, int]


def _is_int(a) -> bool:
    return isinstance(a, numbers.Integral) and not isinstance(a, bool)


def _pair(v: int | Sequence[int], name: str) -> Pair:
    if _is_int(v):
        v = (v, v)
    try:
        v = tuple(v)
    except TypeError:
        raise ConfigError(f"ConvSpec: {name} must be an int or a pair of ints, got {v!r}") from None
    if len(v) != 2 or not all(_is_int(a) for a in v):
        raise ConfigError(f"ConvSpec: {name} must be an int or a pair of ints, got {v!r}")
    return (int(v[0]), int(v[1]))


def _padding(p: int | str | Sequence[int]) -> Padding:
    """Normalise padding to ``"same"``/``"valid"`` or per-side ``(top, bottom, left, right)``."""
    if isinstance(p, str):
        if p not in ("same", "valid"):
            raise ConfigError(f"ConvSpec: padding must be an int, a tuple, 'same' or 'valid', got {p!r}")
        return p
    if _is_int(p):
        p = (p, p)
    try:
        p = tuple(p)
    except TypeError:
        p = (p,)
    if len(p) == 2:
        p = (p[0], p[0], p[1], p[1])
    if len(p) != 4 or not all(_is_int(a) and a >= 0 for a in p):
        raise ConfigError(
            f"ConvSpec: padding must be 'same', 'valid', an int >= 0, (pad_h, pad_w) or "
            f"(top, bottom, left, right), got {p!r}"
        )
    return tuple(int(a) for a in p)  # type: ignore[return-value]


@dataclass(frozen=True)
class ConvSpec:
    """Geometry of a 2-D convolution acting on inputs of ``in_size = (H, W)``.

    ``padding`` is an int, ``(pad_h, pad_w)``, per-side ``(top, bottom, left, right)``,
    ``"same"`` or ``"valid"``; ``"same"`` splits an odd total padding as PyTorch does (the
    extra row/column at the bottom/right) -- except with ``padding_mode="circular"``, where
    that split would be a silent convention and is refused (give explicit per-side pads).
    """

    in_size: Pair
    stride: Pair = (1, 1)
    padding: Padding = (0, 0, 0, 0)
    padding_mode: str = "zeros"
    dilation: Pair = (1, 1)
    groups: int = 1

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "in_size", _pair(self.in_size, "in_size"))
        set_(self, "stride", _pair(self.stride, "stride"))
        set_(self, "dilation", _pair(self.dilation, "dilation"))
        set_(self, "padding", _padding(self.padding))
        if min(self.in_size) < 1:
            raise ConfigError(f"ConvSpec: in_size must be positive, got {self.in_size}")
        if min(self.stride) < 1 or min(self.dilation) < 1:
            raise ConfigError(f"ConvSpec: stride and dilation must be >= 1, got {self.stride}, {self.dilation}")
        if not isinstance(self.padding_mode, str) or self.padding_mode not in PADDING_MODES:
            raise ConfigError(f"ConvSpec: padding_mode must be one of {PADDING_MODES}, got {self.padding_mode!r}")
        if not _is_int(self.groups) or self.groups < 1:
            raise ConfigError(f"ConvSpec: groups must be a positive int, got {self.groups!r}")
        set_(self, "groups", int(self.groups))
        if self.padding == "same" and self.stride != (1, 1):
            raise ConfigError("ConvSpec: padding='same' needs stride 1 (as in PyTorch)")

    # ------------------------------------------------------------------ construction

    @classmethod
    def of(cls, conv: nn.Module, in_size: int | Sequence[int]) -> ConvSpec:
        """The geometry of ``conv`` (an :class:`torch.nn.Conv2d`) on inputs of ``in_size``.

        Padding is recorded per side exactly as the module pads (``"same"`` resolved).
        Other modules (``ConvTranspose2d``, ``Conv1d``, ``Conv3d``, ...) are refused.
        """
        if not isinstance(conv, nn.Conv2d) or isinstance(conv, nn.modules.conv._ConvTransposeNd):
            raise UnsupportedLayerError(
                f"ConvSpec.of: {type(conv).__name__} is not supported (only torch.nn.Conv2d; "
                "transposed, 1-D and 3-D convolutions are not)"
            )
        if isinstance(conv.padding, str):
            left_w, right_w, top, bottom = conv._reversed_padding_repeated_twice
            pads = (top, bottom, left_w, right_w)
        else:
            pads = (conv.padding[0], conv.padding[0], conv.padding[1], conv.padding[1])
        return cls(in_size=_pair(in_size, "in_size"), stride=tuple(conv.stride), padding=pads,
                   padding_mode=conv.padding_mode, dilation=tuple(conv.dilation), groups=conv.groups)

    # ------------------------------------------------------------------ derived geometry

    def pads(self, kernel_size: Sequence[int]) -> tuple[int, int, int, int]:
        """Per-side padding ``(top, bottom, left, right)`` for a kernel of ``kernel_size``."""
        if self.padding == "valid":
            return (0, 0, 0, 0)
        if self.padding == "same":
            out = []
            for k, d in zip(kernel_size, self.dilation):
                total = d * (k - 1)
                if total % 2 and self.padding_mode == "circular":
                    raise ConfigError(
                        f"ConvSpec: kernel {tuple(kernel_size)} with dilation {self.dilation} and circular "
                        f"'same' padding needs an odd total padding of {total}: the split between the two "
                        "sides is a convention; give explicit (top, bottom, left, right) padding"
                    )
                out += [total // 2, total - total // 2]
            return tuple(out)  # type: ignore[return-value]
        return self.padding  # type: ignore[return-value]

    def extent(self, kernel_size: Sequence[int]) -> Pair:
        """Receptive field of the dilated kernel, ``d (k - 1) + 1`` per dimension."""
        return tuple(d * (k - 1) + 1 for k, d in zip(kernel_size, self.dilation))  # type: ignore[return-value]

    def out_size(self, kernel_size: Sequence[int]) -> Pair:
        t, b, l, r = self.pads(kernel_size)
        (H, W), (eh, ew), (sh, sw) = self.in_size, self.extent(kernel_size), self.stride
        return ((H + t + b - eh) // sh + 1, (W + l + r - ew) // sw + 1)

    def is_circulant(self, kernel_size: Sequence[int]) -> bool:
        """True when the operator is (a stride-subsampling of) a doubly block-circulant matrix:
        circular padding whose total is exactly ``d (k - 1)`` per dimension (output aligned with
        the input) and a stride dividing the input size; or a 1x1 kernel that never reads a
        padded value (then the padding mode is irrelevant)."""
        t, b, l, r = self.pads(kernel_size)
        divides = all(n % s == 0 for n, s in zip(self.in_size, self.stride))
        if tuple(kernel_size) == (1, 1) and (t, b, l, r) == (0, 0, 0, 0):
            return divides
        if self.padding_mode != "circular":
            return False
        (eh, ew) = self.extent(kernel_size)
        return divides and t + b == eh - 1 and l + r == ew - 1

    def describe(self, kernel_size: Sequence[int] | None = None) -> str:
        """A compact one-line description, e.g. ``32x32 k3x3 s2 p1 zeros d1 g1``."""
        pads = self.pads(kernel_size) if kernel_size is not None else self.padding
        ps = pads if isinstance(pads, str) else (str(pads[0]) if len(set(pads)) == 1 else ",".join(map(str, pads)))
        k = f" k{kernel_size[0]}x{kernel_size[1]}" if kernel_size is not None else ""
        s = self.stride[0] if self.stride[0] == self.stride[1] else f"{self.stride[0]},{self.stride[1]}"
        d = self.dilation[0] if self.dilation[0] == self.dilation[1] else f"{self.dilation[0]},{self.dilation[1]}"
        return f"{self.in_size[0]}x{self.in_size[1]}{k} s{s} p{ps} {self.padding_mode} d{d} g{self.groups}"

    # ------------------------------------------------------------------ validation

    def check(self, weight: Tensor, name: str = "weight") -> tuple[int, int]:
        """Validate ``weight`` against this geometry; return its kernel size.

        Raises :class:`~sepconv.errors.ConfigError` for a weight that is not a real, dense,
        4-D floating tensor with values (complex, integer, meta and sparse tensors are refused),
        whose channels do not fit ``groups``, that holds NaN/Inf, whose dilated kernel is larger
        than the padded input, or whose padding the padding mode cannot realise.
        """
        if not isinstance(weight, Tensor) or weight.dim() != 4:
            shape = tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__
            raise ConfigError(f"{name}: expected a 4-D conv weight (C_out, C_in/groups, kh, kw), got {shape}")
        if weight.is_complex() or not weight.is_floating_point():
            raise ConfigError(f"{name}: expected a real floating-point weight, got {weight.dtype}")
        if weight.device.type == "meta" or weight.layout != torch.strided:
            meta = weight.device.type == "meta"
            what = "a meta tensor (shapes only, no values)" if meta else f"a {weight.layout} tensor"
            raise ConfigError(f"{name}: expected a dense weight with values, got {what}")
        c_out, _, kh, kw = weight.shape
        if c_out % self.groups:
            raise ConfigError(f"{name}: {c_out} output channels are not divisible by groups={self.groups}")
        if weight.numel() == 0:
            raise ConfigError(f"{name}: empty weight of shape {tuple(weight.shape)}")
        lo, hi = (float(v) for v in torch.aminmax(weight.detach()))
        if not (math.isfinite(lo) and math.isfinite(hi)):  # NaN propagates
            raise ConfigError(f"{name}: weight holds NaN or Inf values")
        big = max(-lo, hi)
        work = weight.dtype if weight.element_size() >= 4 else torch.float32  # half is computed in float32
        limit = math.sqrt(torch.finfo(work).max) * 1e-3
        if big > limit:
            raise ConfigError(f"{name}: weight values of magnitude {big:.3g} would overflow {work} "
                              f"arithmetic (squares near its largest value); rescale the weight or pass float64")
        t, b, l, r = self.pads((kh, kw))
        (H, W), (eh, ew) = self.in_size, self.extent((kh, kw))
        if eh > H + t + b or ew > W + l + r:
            raise ConfigError(
                f"{name}: the dilated kernel ({eh}x{ew}) is larger than the padded input "
                f"({H + t + b}x{W + l + r}) for input {H}x{W} with padding {(t, b, l, r)}"
            )
        if self.padding_mode == "reflect" and (max(t, b) >= H or max(l, r) >= W):
            raise ConfigError(f"{name}: reflect padding {(t, b, l, r)} must be smaller than the input {H}x{W}")
        if self.padding_mode == "circular" and (max(t, b) > H or max(l, r) > W):
            raise ConfigError(f"{name}: circular padding {(t, b, l, r)} wraps around the input {H}x{W} more than once")
        return kh, kw

    # ------------------------------------------------------------------ the operator

    def input_shape(self, weight: Tensor) -> tuple[int, int, int]:
        return (weight.shape[1] * self.groups, *self.in_size)

    def apply(self, x: Tensor, weight: Tensor) -> Tensor:
        """``y = conv(x)``, exactly what ``nn.Conv2d`` computes without its bias (``x`` batched)."""
        t, b, l, r = self.pads(weight.shape[-2:])
        if (t, b, l, r) != (0, 0, 0, 0):
            x = F.pad(x, (l, r, t, b), mode=_TORCH_PAD_MODE[self.padding_mode])
        return F.conv2d(x, weight, None, self.stride, 0, self.dilation, self.groups)

    def adjoint(self, y: Tensor, weight: Tensor) -> Tensor:
        """The exact adjoint ``x = conv^T(y)``: the transposed convolution onto the padded input
        (with the output padding that restores its size), then the adjoint of the padding
        (cropping for zeros; folding wrapped/reflected/replicated values back for the others)."""
        t, b, l, r = self.pads(weight.shape[-2:])
        H, W = self.in_size
        padded = (y.shape[0], weight.shape[1] * self.groups, H + t + b, W + l + r)
        xp = torch.nn.grad.conv2d_input(padded, weight, y, self.stride, 0, self.dilation, self.groups)
        if (t, b, l, r) == (0, 0, 0, 0):
            return xp
        if self.padding_mode == "zeros":
            return xp[..., t:t + H, l:l + W]
        with torch.enable_grad():  # the padding's adjoint is its vector-Jacobian product
            z = torch.zeros(y.shape[0], padded[1], H, W, dtype=y.dtype, device=y.device, requires_grad=True)
            zp = F.pad(z, (l, r, t, b), mode=_TORCH_PAD_MODE[self.padding_mode])
            (g,) = torch.autograd.grad(zp, z, xp, create_graph=xp.requires_grad)
        return g

    def spatial_taps(self, kernel_size: Sequence[int], dtype=torch.float64, device=None,
                     max_memory: float | None = None) -> Tensor:
        """``(kh*kw, H_out*W_out, H*W)``: for each kernel tap, the 0/1 matrix saying which input
        pixel (after padding, stride and dilation) feeds which output pixel: the Kronecker product
        of the two 1-D tap matrices (:func:`tap_matrices_1d`; every padding mode pads each dimension
        on its own). Exact. Refuses (:class:`~sepconv.errors.ResourceError`) above ``max_memory``
        bytes (default 2 GiB; :func:`sepconv.spectral.budget.budget`)."""
        kh, kw = (int(k) for k in kernel_size)
        (H, W), (Ho, Wo) = self.in_size, self.out_size((kh, kw))
        nbytes = 2 * tensor_bytes((kh * kw, Ho * Wo, H * W), dtype)
        check_memory(nbytes, f"the tap matrices of {self.describe((kh, kw))}", max_memory)
        Ph, Pw = self._taps_1d((kh, kw), dtype, device)
        return torch.einsum("axy,bzv->abxzyv", Ph, Pw).reshape(kh * kw, Ho * Wo, H * W)

    def _taps_1d(self, kernel_size: Sequence[int], dtype, device) -> tuple[Tensor, Tensor]:
        (kh, kw), (t, b, l, r) = kernel_size, self.pads(kernel_size)
        (H, W), (sh, sw), (dh, dw) = self.in_size, self.stride, self.dilation
        return (tap_matrices_1d(H, kh, sh, dh, t, b, self.padding_mode, dtype).to(device),
                tap_matrices_1d(W, kw, sw, dw, l, r, self.padding_mode, dtype).to(device))

    def operator_bytes(self, weight: Tensor, n_groups: int | None = None, whole: bool = False) -> int:
        """Estimated peak bytes of building ``n_groups`` diagonal blocks (:meth:`group_operators`;
        default all) -- or, with ``whole``, the block-diagonal :meth:`dense_operator` -- and taking
        their SVD: twice the matrices (the construction's reordering copy; LAPACK's copy of its
        input, whose ``jobz='N'`` workspace is ``O(rows + cols)`` besides), in ``weight``'s dtype."""
        kh, kw = weight.shape[-2:]
        g = self.groups
        n = g if n_groups is None else n_groups
        rows = weight.shape[0] // g * math.prod(self.out_size((kh, kw)))
        cols = weight.shape[1] * math.prod(self.in_size)
        blocks = g * g if whole and g > 1 else n
        return 2 * tensor_bytes((blocks, rows, cols), weight.dtype) + 64 * (rows + cols) * g

    def dense_operator(self, weight: Tensor, max_memory: float | None = None) -> Tensor:
        """The explicit matrix of the map (rows ``C_out*H_out*W_out``, columns ``C_in*H*W``,
        both flattened channel-major), differentiable in ``weight``: per group the Kronecker
        sum ``sum_a K_a (x) P_a`` of tap matrices (:meth:`spatial_taps`). Exact; memory
        ``O(rows * cols)`` -- for tests and small layers: refused
        (:class:`~sepconv.errors.ResourceError`, with the estimate of :meth:`operator_bytes`) above
        ``max_memory`` bytes (default 2 GiB; :func:`sepconv.spectral.budget.budget`). A grouped
        conv's blocks alone are :meth:`group_operators`, ``groups`` times smaller."""
        kh, kw = self.check(weight)
        check_memory(self.operator_bytes(weight, whole=True), self._operator_what(weight, (kh, kw), True),
                              max_memory)
        blocks = self.group_operators(weight, max_memory=float("inf"))
        return torch.block_diag(*blocks) if self.groups > 1 else blocks[0]

    def _operator_what(self, weight: Tensor, ks: tuple[int, int], whole: bool, n: int | None = None) -> str:
        g = self.groups
        rows = weight.shape[0] // g * math.prod(self.out_size(ks))
        cols = weight.shape[1] * math.prod(self.in_size)
        if whole:
            return (f"the dense operator ({g * rows}x{g * cols}) of the conv {tuple(weight.shape)} "
                    f"{self.describe(ks)}")
        return (f"the dense operators of {g if n is None else n} group(s) ({rows}x{cols} each) of the conv "
                f"{tuple(weight.shape)} {self.describe(ks)}")

    def group_operators(self, weight: Tensor, groups: Tensor | None = None, max_memory: float | None = None) -> Tensor:
        """The diagonal blocks of :meth:`dense_operator`, one per group: ``(g, C_out/g * H_out W_out,
        C_in/g * H W)`` (only the groups listed in ``groups`` when given). A grouped convolution is
        block-diagonal, so its singular values are the union of theirs. Exact; built from the 1-D
        tap matrices (no ``(H W)^2`` identity image), refused above ``max_memory`` bytes (default
        2 GiB) like :meth:`dense_operator`."""
        kh, kw = self.check(weight)
        g = self.groups
        c_out, ci = weight.shape[:2]
        co = c_out // g
        w = weight.reshape(g, co, ci, kh, kw)
        if groups is not None:
            w = w[groups]
        check_memory(self.operator_bytes(weight, w.shape[0]),
                              self._operator_what(weight, (kh, kw), False, w.shape[0]), max_memory)
        Ph, Pw = self._taps_1d((kh, kw), weight.dtype, weight.device)  # (kh, Ho, H), (kw, Wo, W)
        part = torch.einsum("goiab,axy->goibxy", w, Ph)  # small: (n, co, ci, kw, Ho, H)
        blocks = torch.einsum("goibxy,bzv->goxziyv", part, Pw)  # (n, co, Ho, Wo, ci, H, W)
        return blocks.reshape(w.shape[0], co * Ph.shape[1] * Pw.shape[1], ci * math.prod(self.in_size))


def tap_sources_1d(n: int, k: int, s: int, d: int, lo: int, hi: int, mode: str) -> Tensor:
    """``(k, n_out)`` long: the input index that output ``y`` reads through tap ``a`` along one
    dimension -- the padding map (zeros, circular, reflect, replicate) composed with the tap's
    selection -- and ``-1`` where it reads a zero of the padding. Exact, ``O(k n)``."""
    idx = torch.arange(n, dtype=torch.float64).reshape(1, 1, n)
    if lo or hi:
        extra = {"value": -1.0} if mode == "zeros" else {}
        idx = F.pad(idx, (lo, hi), mode=_TORCH_PAD_MODE[mode], **extra)
    idx = idx.flatten().long()
    n_out = (n + lo + hi - d * (k - 1) - 1) // s + 1
    y = torch.arange(n_out)
    return torch.stack([idx[s * y + d * a] for a in range(k)])


def tap_matrices_1d(n: int, k: int, s: int, d: int, lo: int, hi: int, mode: str, dtype=torch.float64) -> Tensor:
    """``(k, n_out, n)``: ``P_a[y, x]`` = 1 when output ``y`` reads input ``x`` through tap ``a`` along
    one dimension (the padding map ``J`` composed with the tap's selection; :func:`tap_sources_1d`)."""
    src = tap_sources_1d(n, k, s, d, lo, hi, mode)
    P = torch.zeros(k, src.shape[1], n + 1, dtype=dtype)
    P.scatter_(2, (src + 1)[..., None], 1.0)  # column 0 collects the zero padding: dropped
    return P[..., 1:]


def norm_of_padding(spec: ConvSpec, kernel_size: Sequence[int]) -> float:
    """Exact operator norm of the padding map ``x -> pad(x)`` (1 for zeros padding).

    Padding copies input values; the map is a 0/1 matrix with one 1 per row, so its norm is
    ``sqrt`` of the largest number of copies of one input value -- a product over the two
    dimensions. Used to turn bounds for the unpadded (valid) convolution into certified
    bounds for reflect, replicate and circular padding. ``O(1)`` in the input size
    (:func:`pad_copies`).
    """
    pads = spec.pads(kernel_size)
    if spec.padding_mode == "zeros" or pads == (0, 0, 0, 0):
        return 1.0
    copies = 1
    for n, lo, hi in ((spec.in_size[0], pads[0], pads[1]), (spec.in_size[1], pads[2], pads[3])):
        copies *= pad_copies(n, lo, hi, spec.padding_mode)
    return math.sqrt(copies)


def pad_copies(n: int, lo: int, hi: int, mode: str) -> int:
    """The largest number of copies of one of ``n`` values after padding ``(lo, hi)`` along one
    dimension (PyTorch's ``F.pad`` modes: reflect needs ``lo, hi < n``, circular ``lo, hi <= n``).
    Closed form: each side's padding copies a run of values next to its edge once (reflect:
    ``1..lo`` and ``n-1-hi..n-2``; circular: ``n-lo..n-1`` and ``0..hi-1``), or the edge value
    ``lo`` (``hi``) times (replicate); the runs of the two sides may overlap. Exact."""
    if mode in ("zeros", "constant") or (lo, hi) == (0, 0):
        return 1
    if mode == "replicate":
        return 1 + lo + hi if n == 1 else 1 + max(lo, hi)
    if mode == "reflect":
        left, right = (1, lo), (n - 1 - hi, n - 2)
    elif mode == "circular":
        left, right = (n - lo, n - 1), (0, hi - 1)
    else:
        raise ConfigError(f"pad_copies: unknown padding mode {mode!r}")
    overlap = lo > 0 and hi > 0 and max(left[0], right[0]) <= min(left[1], right[1])
    return 3 if overlap else 2
