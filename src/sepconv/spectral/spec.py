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
from dataclasses import dataclass
from typing import Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError, UnsupportedLayerError

PADDING_MODES = ("zeros", "circular", "reflect", "replicate")
_TORCH_PAD_MODE = {"zeros": "constant", "circular": "circular", "reflect": "reflect", "replicate": "replicate"}

Pair = tuple[int, int]
Padding = Union[str, tuple[int, int, int, int]]


def _pair(v: int | Sequence[int], name: str) -> Pair:
    if isinstance(v, int) and not isinstance(v, bool):
        v = (v, v)
    v = tuple(v)
    if len(v) != 2 or not all(isinstance(a, int) and not isinstance(a, bool) for a in v):
        raise ConfigError(f"ConvSpec: {name} must be an int or a pair of ints, got {v!r}")
    return v  # type: ignore[return-value]


def _padding(p: int | str | Sequence[int]) -> Padding:
    """Normalise padding to ``"same"``/``"valid"`` or per-side ``(top, bottom, left, right)``."""
    if isinstance(p, str):
        if p not in ("same", "valid"):
            raise ConfigError(f"ConvSpec: padding must be an int, a tuple, 'same' or 'valid', got {p!r}")
        return p
    if isinstance(p, int) and not isinstance(p, bool):
        p = (p, p)
    p = tuple(p)
    if len(p) == 2:
        p = (p[0], p[0], p[1], p[1])
    if len(p) != 4 or not all(isinstance(a, int) and not isinstance(a, bool) and a >= 0 for a in p):
        raise ConfigError(
            f"ConvSpec: padding must be 'same', 'valid', an int >= 0, (pad_h, pad_w) or "
            f"(top, bottom, left, right), got {p!r}"
        )
    return p  # type: ignore[return-value]


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
        if self.padding_mode not in PADDING_MODES:
            raise ConfigError(f"ConvSpec: padding_mode must be one of {PADDING_MODES}, got {self.padding_mode!r}")
        if not isinstance(self.groups, int) or self.groups < 1:
            raise ConfigError(f"ConvSpec: groups must be a positive int, got {self.groups!r}")
        if self.padding == "same" and self.stride != (1, 1):
            raise ConfigError("ConvSpec: padding='same' needs stride 1 (as in PyTorch)")

    # ------------------------------------------------------------------ construction

    @classmethod
    def of(cls, conv: nn.Module, in_size: int | Sequence[int]) -> "ConvSpec":
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

        Raises :class:`~sepconv.errors.ConfigError` for a weight that is not 4-D, whose
        channels do not fit ``groups``, that holds NaN/Inf, whose dilated kernel is larger
        than the padded input, or whose padding the padding mode cannot realise.
        """
        if not isinstance(weight, Tensor) or weight.dim() != 4:
            shape = tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__
            raise ConfigError(f"{name}: expected a 4-D conv weight (C_out, C_in/groups, kh, kw), got {shape}")
        if weight.is_complex() or not weight.is_floating_point():
            raise ConfigError(f"{name}: expected a real floating-point weight, got {weight.dtype}")
        c_out, _, kh, kw = weight.shape
        if c_out % self.groups:
            raise ConfigError(f"{name}: {c_out} output channels are not divisible by groups={self.groups}")
        if weight.numel() == 0:
            raise ConfigError(f"{name}: empty weight of shape {tuple(weight.shape)}")
        if not all(math.isfinite(float(v)) for v in torch.aminmax(weight.detach())):  # NaN propagates
            raise ConfigError(f"{name}: weight holds NaN or Inf values")
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

    def spatial_taps(self, kernel_size: Sequence[int], dtype=torch.float64, device=None) -> Tensor:
        """``(kh*kw, H_out*W_out, H*W)``: for each kernel tap, the 0/1 matrix saying which input
        pixel (after padding, stride and dilation) feeds which output pixel. Exact."""
        kh, kw = kernel_size
        H, W = self.in_size
        bank = torch.eye(kh * kw, dtype=dtype, device=device).reshape(kh * kw, 1, kh, kw)
        eye = torch.eye(H * W, dtype=dtype, device=device).reshape(H * W, 1, H, W)
        one = ConvSpec(self.in_size, self.stride, self.pads(kernel_size), self.padding_mode, self.dilation, 1)
        return one.apply(eye, bank).reshape(H * W, kh * kw, -1).permute(1, 2, 0)

    def dense_operator(self, weight: Tensor) -> Tensor:
        """The explicit matrix of the map (rows ``C_out*H_out*W_out``, columns ``C_in*H*W``,
        both flattened channel-major), differentiable in ``weight``: per group the Kronecker
        sum ``sum_a K_a (x) P_a`` of tap matrices and :meth:`spatial_taps`. Exact; memory
        ``O(rows * cols)`` -- for tests and small layers."""
        blocks = self.group_operators(weight)
        return torch.block_diag(*blocks) if self.groups > 1 else blocks[0]

    def group_operators(self, weight: Tensor, groups: Tensor | None = None) -> Tensor:
        """The diagonal blocks of :meth:`dense_operator`, one per group: ``(g, C_out/g * H_out W_out,
        C_in/g * H W)`` (only the groups listed in ``groups`` when given). A grouped convolution is
        block-diagonal, so its singular values are the union of theirs. Exact."""
        kh, kw = self.check(weight)
        taps = self.spatial_taps((kh, kw), weight.dtype, weight.device)
        g = self.groups
        c_out, ci = weight.shape[:2]
        w = weight.reshape(g, c_out // g, ci, kh * kw)
        if groups is not None:
            w = w[groups]
        blocks = torch.einsum("goia,apq->gopiq", w, taps)
        return blocks.reshape(w.shape[0], (c_out // g) * taps.shape[1], ci * taps.shape[2])


def norm_of_padding(spec: ConvSpec, kernel_size: Sequence[int]) -> float:
    """Exact operator norm of the padding map ``x -> pad(x)`` (1 for zeros padding).

    Padding copies input values; the map is a 0/1 matrix with one 1 per row, so its norm is
    ``sqrt`` of the largest number of copies of one input value -- a product over the two
    dimensions. Used to turn bounds for the unpadded (valid) convolution into certified
    bounds for reflect, replicate and circular padding.
    """
    pads = spec.pads(kernel_size)
    if spec.padding_mode == "zeros" or pads == (0, 0, 0, 0):
        return 1.0
    copies = 1
    for n, lo, hi in ((spec.in_size[0], pads[0], pads[1]), (spec.in_size[1], pads[2], pads[3])):
        idx = torch.arange(n, dtype=torch.float64).reshape(1, 1, n)
        padded = F.pad(idx, (lo, hi), mode=_TORCH_PAD_MODE[spec.padding_mode])
        copies *= int(torch.bincount(padded.flatten().long(), minlength=n).max())
    return math.sqrt(copies)
