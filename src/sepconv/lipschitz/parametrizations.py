"""The spectral-normalization parametrizations: one concept per class
(:func:`sepconv.normalize.spectral_normalize` applies them to a model).

Each is a :mod:`torch.nn.utils.parametrize` parametrization of a layer's ``weight`` that divides
it by its norm ``sigma`` -- exact, a certified upper bound or an estimate, as each class says --
with the shared formula :func:`rescale` (mode ``clip`` or ``scale``). The pure formulas come
first, then the classes.
"""

from __future__ import annotations

import contextlib
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..spectral import iterative
from ..spectral.exact import depthwise_channel_norms
from ..spectral.methods import get_method
from ..spectral.spec import ConvSpec

__all__ = ["BatchNormLipschitz", "BoundNorm", "DepthwiseFFTNorm", "DepthwiseGroup", "MatrixNorm", "OperatorNorm",
           "ReshapeNorm", "WARMUP_ITERATIONS", "bn_lipschitz_clip", "frozen_state", "matrix_power_iteration",
           "rescale", "scale_factor"]

#: Power-iteration steps run once when a stateful parametrization is created (as torch's spectral_norm).
WARMUP_ITERATIONS = 15

_FROZEN = [0]  # depth of frozen_state() contexts


@contextlib.contextmanager
def frozen_state():
    """Inside this context the stateful parametrizations (:class:`MatrixNorm`, :class:`OperatorNorm`,
    :class:`ReshapeNorm`) compute their weights as usual but do not advance their persistent
    vectors: for a loss term that reads the normalized weights a second time in one training step
    (the Fantastic Four penalty), so that the power iteration still takes ``n_power_iterations``
    steps per step, as without the term."""
    _FROZEN[0] += 1
    try:
        yield
    finally:
        _FROZEN[0] -= 1



# --------------------------------------------------------------------------- formulas


def rescale(weight: Tensor, sigma: Tensor, target: float, mode: str) -> Tensor:
    """The normalized weight: ``W / max(1, sigma / target)`` (``clip``: only shrinks, so a layer
    already within ``target`` is returned bit-identical) or ``W target / sigma`` (``scale``; Miyato
    et al. 2018, arXiv 1802.05957, Eq. 8 with a target). ``sigma`` is a scalar or broadcasts
    against ``weight`` (per channel)."""
    if mode == "clip":
        return weight / torch.clamp(sigma / target, min=1.0)
    return weight * (target / sigma.clamp_min(torch.finfo(sigma.dtype).tiny))


def matrix_power_iteration(mat: Tensor, u: Tensor, iters: int) -> tuple[Tensor, Tensor, Tensor]:
    """``iters`` steps of ``v <- W^T u / ||W^T u||``, ``u <- W v / ||W v||`` on a batch of matrices
    ``mat`` ``(g, m, n)`` (Miyato et al. 2018, arXiv 1802.05957, Alg. 1); returns ``(u, v, sigma)``
    with ``sigma = ||W v|| = u^T W v`` per matrix, an **estimate from below** of ``||W_g||_2``
    converging at rate ``(sigma_2/sigma_1)^(2 iters)``. Only ``u`` needs to persist between calls
    (``v`` is a function of it), which halves the state of torch's ``spectral_norm``."""
    v = sigma = None
    for _ in range(max(1, iters)):
        v = F.normalize(torch.bmm(mat.mT, u[..., None])[..., 0], dim=-1, eps=1e-12)
        wv = torch.bmm(mat, v[..., None])[..., 0]
        sigma = torch.linalg.vector_norm(wv, dim=-1)
        u = wv / sigma.clamp_min(1e-12)[:, None]
    return u, v, sigma


def scale_factor(sigma: float, target: float, mode: str) -> tuple[float, float]:
    """``(s, ds/dsigma)`` of :func:`rescale`'s factor: ``s = 1 / max(1, sigma / target)`` (clip) or
    ``target / sigma`` (scale); the slope is ``-target / sigma^2`` where the factor is active."""
    sigma = max(sigma, 1e-30)
    if mode == "clip" and sigma <= target:
        return 1.0, 0.0
    return target / sigma, -target / sigma ** 2


class _MatrixRescale(torch.autograd.Function):
    """``W s(sigma)`` with Miyato's ``sigma = u^T W v`` (``u``, ``v`` constants), fused: one pass
    forward; backward ``dL/dW = s G + s'(sigma) <G, W> u v^T`` (the gradient of ``u^T W v`` is
    ``u v^T``) as one ``vdot`` and one ``addr`` instead of autograd's seven passes over a
    weight-sized tensor. ``s`` and the slope are Python floats (one host read of ``sigma``)."""

    @staticmethod
    def forward(ctx, weight: Tensor, u: Tensor, v: Tensor, s: float, slope: float) -> Tensor:
        ctx.save_for_backward(weight, u, v)
        ctx.s, ctx.slope = s, slope
        return weight * s

    @staticmethod
    def backward(ctx, grad: Tensor):
        weight, u, v = ctx.saved_tensors
        g = grad.reshape(u.numel(), v.numel())
        if ctx.slope == 0.0:
            out = g * ctx.s if ctx.s != 1.0 else g
        else:
            coeff = ctx.slope * float(torch.vdot(g.reshape(-1), weight.reshape(-1)))
            out = torch.addr(g, u, v, beta=ctx.s, alpha=coeff)
        return out.reshape(weight.shape), None, None, None, None


def bn_lipschitz_clip(gamma: Tensor, std: Tensor, target: float) -> Tensor:
    """``gamma_c / max(1, |gamma_c| / (target std_c))``: the per-channel slope ``|gamma_c| / std_c`` of
    an eval-mode BatchNorm (``std_c = sqrt(running_var_c + eps)``) clipped to ``target``, so its
    Lipschitz constant ``max_c |gamma_c| / std_c`` (Gouk et al. 2021, arXiv 1804.04368, Sec. 3) is
    at most ``target``. **Exact**."""
    return gamma / torch.clamp(gamma.abs() / (target * std), min=1.0)


# --------------------------------------------------------------------------- parametrizations


class _Normalizer(nn.Module):
    """Common part: the ``target`` constant and the mode, and :func:`rescale`."""

    #: whether the eval-mode normalized layer is *certified* to have norm <= target
    certified = True

    def __init__(self, target: float, mode: str):
        super().__init__()
        self.target = float(target)
        self.mode = mode

    def sigma(self, weight: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, weight: Tensor) -> Tensor:
        return rescale(weight, self.sigma(weight), self.target, self.mode)

    def extra_repr(self) -> str:
        return f"target={self.target}, mode={self.mode!r}"


class DepthwiseGroup:
    """The depthwise layers of one model, normalized together: all their norms come from **one**
    call of :func:`~sepconv.spectral.exact.depthwise_channel_norms` (one batched DFT per kernel
    size and grid) per forward pass of the model, instead of one FFT per layer.

    The root model's forward pre-hook opens a cache scope, its forward hook closes it; inside it
    the first depthwise parametrization evaluated computes every layer's norms (with autograd,
    so gradients flow through the shared graph) and the others read theirs. The cache is keyed by
    the weights' version counters and the grad mode, so an in-place update or a switch to
    ``no_grad`` recomputes. Outside a forward of the root (``lipschitz_bound``'s traced graph, a
    loss term, baking) each layer is computed alone -- same values. Not an ``nn.Module``: it holds
    plain references to the convs, which ``deepcopy`` maps consistently.
    """

    def __init__(self) -> None:
        self.convs: list[nn.Module] = []
        self.specs: list[ConvSpec] = []
        self.active = False
        self._cache: tuple[tuple, list[Tensor]] | None = None

    def add(self, conv: nn.Module, spec: ConvSpec) -> int:
        self.convs.append(conv)
        self.specs.append(spec)
        return len(self.convs) - 1

    def begin(self, module: nn.Module, args) -> None:
        self.active, self._cache = True, None

    def end(self, module: nn.Module, args, output) -> None:
        self.active, self._cache = False, None

    def channel_norms(self, index: int, weight: Tensor) -> Tensor:
        if not self.active:
            return depthwise_channel_norms([weight], [self.specs[index]])[0]
        originals = [c.parametrizations.weight.original for c in self.convs]
        key = (torch.is_grad_enabled(), *((id(w), w._version) for w in originals))
        if self._cache is None or self._cache[0] != key:
            originals[index] = weight
            self._cache = (key, depthwise_channel_norms(originals, self.specs))
        return self._cache[1][index]


class DepthwiseFFTNorm(_Normalizer):
    """Depthwise conv (``groups == C_in``, depth multiplier ``m``) normalized by its exact FFT norm.

    ``sigma^2 = max_c max_w (1/s^2) sum_q |K^_c(w + qN/s)|^2`` -- each channel is a doubly
    block-circulant map diagonalised by the 2-D DFT, the stride aliases add up (Sedghi et al.
    2019; Runkel et al. 2021, arXiv 2102.06496, the recipe of docs/spectral.md Sec. 11).
    **Exact** for circular padding; for zero padding the **certified** circular-embedding upper
    bound (:func:`~sepconv.spectral.bounds.fft_bound`). Stateless. ``per_channel``: each channel
    ``c`` is divided by its own ``max(1, sigma_c / target)`` (the layer norm is the max over
    channels, so the bound still holds). Batched across layers by a :class:`DepthwiseGroup`.
    """

    def __init__(self, spec: ConvSpec, target: float, mode: str, per_channel: bool = False,
                 group: DepthwiseGroup | None = None, conv: nn.Module | None = None):
        super().__init__(target, mode)
        self.spec = spec
        self.per_channel = per_channel
        self._group = [group] if group is not None else []
        self._index = group.add(conv, spec) if group is not None else -1

    def channel_sigma(self, weight: Tensor) -> Tensor:
        if self._group:
            return self._group[0].channel_norms(self._index, weight)
        return depthwise_channel_norms([weight], [self.spec])[0]

    def sigma(self, weight: Tensor) -> Tensor:
        s = self.channel_sigma(weight)
        if self.per_channel:
            return s.repeat_interleave(weight.shape[0] // s.shape[0])[:, None, None, None]
        return s.max()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, per_channel={self.per_channel}, {self.spec.describe()}"


class MatrixNorm(_Normalizer):
    """``Linear`` or pointwise 1x1 conv normalized by its matrix norm ``||W||_2`` (max over groups:
    a grouped 1x1 conv is block-diagonal; stride and zero padding leave the norm unchanged).

    Training mode: ``n_power_iterations`` steps of matrix power iteration on the persistent buffer
    ``u`` ``(g, C_out/g)`` under ``no_grad``, then ``sigma = u^T W v`` with
    gradient (Miyato et al. 2018, arXiv 1802.05957, Alg. 1) -- an **estimate** from below. Eval
    mode: the **exact** ``||W||_2`` (SVD; cached per weight version when no gradient is needed),
    so a normalized model in eval mode is certified, not just estimated.
    """

    def __init__(self, weight: Tensor, target: float, mode: str, groups: int = 1, n_power_iterations: int = 1):
        super().__init__(target, mode)
        self.groups = groups
        self.n_power_iterations = n_power_iterations
        mat = self.matrix(weight.detach())
        g, m, n = mat.shape
        u = F.normalize(torch.randn(g, m, dtype=mat.dtype, device=mat.device), dim=-1)
        with torch.no_grad():
            u, _, _ = matrix_power_iteration(mat, u, WARMUP_ITERATIONS)
        self.register_buffer("u", u)
        self._eval_cache: tuple | None = None

    def matrix(self, weight: Tensor) -> Tensor:
        return weight.reshape(self.groups, weight.shape[0] // self.groups, -1)

    def forward(self, weight: Tensor) -> Tensor:
        if self.training and self._fusable() and weight.requires_grad and torch.is_grad_enabled():
            u, v, sigma = self._step(self.matrix(weight))
            s, slope = scale_factor(float(sigma[0]), self.target, self.mode)
            if s == 1.0 and slope == 0.0:  # clip mode, within the target: the weight itself
                return weight
            return _MatrixRescale.apply(weight, u[0], v[0], s, slope)
        return rescale(weight, self.sigma(weight), self.target, self.mode)

    def _fusable(self) -> bool:
        return self.groups == 1

    def _step(self, mat: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """One training step of the power iteration; updates the buffers in place (DDP broadcasts them)."""
        with torch.no_grad():
            u, v, sigma = matrix_power_iteration(mat.detach(), self.u, self.n_power_iterations)
            if not _FROZEN[0]:
                self.u.copy_(u)
        return u, v, sigma

    def sigma(self, weight: Tensor) -> Tensor:
        mat = self.matrix(weight)
        if self.training:
            u, v, _ = self._step(mat)  # fresh tensors: a later in-place update cannot touch this graph
            return (u[:, None, :] @ mat @ v[:, :, None]).max()
        if weight.requires_grad and torch.is_grad_enabled():
            return torch.linalg.matrix_norm(mat, ord=2).max()
        key = (id(weight), weight._version, weight.dtype, weight.device)
        if self._eval_cache is None or self._eval_cache[0] != key:
            self._eval_cache = (key, torch.linalg.matrix_norm(mat.detach(), ord=2).max())
        return self._eval_cache[1]

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, groups={self.groups}, n_power_iterations={self.n_power_iterations}"


class ReshapeNorm(MatrixNorm):
    """**For comparison only**: torch's ``spectral_norm`` of a conv, the matrix norm of the kernel
    reshaped to ``(C_out, C_in/g * kh * kw)`` (``dim=1`` first for transposed convs; groups
    ignored), by the same power iteration (Miyato et al. 2018). **Neither a bound nor exact**
    for spatial kernels: a depthwise layer's true norm ``sigma`` only satisfies
    ``r / sqrt(C) <= sigma <= k r`` for the reshape value ``r`` (docs/spectral.md Sec. 8),
    so a "normalized" layer can exceed the target (or be over-constrained). Exact only for 1x1 convs without groups."""

    certified = False

    def __init__(self, weight: Tensor, target: float, mode: str, dim: int = 0, n_power_iterations: int = 1):
        self.dim = dim
        super().__init__(weight, target, mode, 1, n_power_iterations)

    def _fusable(self) -> bool:
        return self.dim == 0

    def matrix(self, weight: Tensor) -> Tensor:
        if self.dim:
            weight = weight.movedim(self.dim, 0)
        return weight.reshape(1, weight.shape[0], -1)


class OperatorNorm(_Normalizer):
    """Any conv normalized by power iteration on its true operator (Gouk et al. 2018, arXiv
    1804.04368; Farnia et al. 2019, arXiv 1811.07457): ``x <- T^T T x / ||T^T T x||`` with the
    layer's own stride, padding, padding mode, dilation and groups (:meth:`ConvSpec.apply` and
    its exact adjoint :meth:`ConvSpec.adjoint`), ``sigma = ||T x|| / ||x||`` with gradient.

    State: the persistent vector ``x`` of the layer input's shape ``(C_in, H, W)`` (a buffer),
    advanced ``n_power_iterations`` steps per training forward, fixed in eval mode; tiny entries
    are flushed (:func:`~sepconv.spectral.iterative.power_iteration`). An **estimate** from
    below in both modes: not certified.
    """

    certified = False

    def __init__(self, weight: Tensor, spec: ConvSpec, target: float, mode: str, n_power_iterations: int = 1):
        super().__init__(target, mode)
        self.spec = spec
        self.n_power_iterations = n_power_iterations
        x0 = torch.randn(spec.input_shape(weight), dtype=weight.dtype, device=weight.device)
        _, x = iterative.power_iteration(weight.detach(), spec, iters=WARMUP_ITERATIONS, x=x0)
        self.register_buffer("x", x / x.norm())

    def sigma(self, weight: Tensor) -> Tensor:
        iters = self.n_power_iterations if self.training else 0
        sigma, x = iterative.power_iteration(weight, self.spec, iters=iters, x=self.x)
        if iters and not _FROZEN[0]:
            with torch.no_grad():
                self.x.copy_(x)
        return sigma

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, n_power_iterations={self.n_power_iterations}, {self.spec.describe()}"


class BoundNorm(_Normalizer):
    """Any conv normalized by a registered spectral method (:mod:`sepconv.spectral.methods`) that is
    differentiable and **certified** (an upper bound) or **exact**, stateless:

    * ``fantastic4``: ``sqrt(h w) min(||R||, ||S||, ||T||, ||U||)`` of the four kernel reshapes
      (Singla & Feizi, ICLR 2021, arXiv 1911.10258, Thm. 1);
    * ``gram``: Gram iteration on the frequency blocks of the circulant majorant (Delattre et
      al., ICML 2023, arXiv 2305.16173, Thm. 3);
    * ``fft``: the circular-embedding bound (:func:`~sepconv.spectral.bounds.fft_bound`; exact for
      circular padding, within a few per cent for zero padding), certified block by block --
      tight and cheap for a stem conv with few input channels, costly for wide full convs;
    * ``exact``: the layer's exact norm within ``tol`` (:func:`~sepconv.spectral.exact_norm`) --
      not certified where it is the lower end of a bracket (zero padding), and costly;
    * any differentiable certified method registered by :func:`~sepconv.spectral.register_method`.

    ``options``: keywords for the method's function (default: its entry's ``train_options``, e.g.
    ``fft`` at ``tol=1e-4``). With a certified method the normalized layer's norm is at most
    ``target`` in training and eval mode alike. For a pointwise conv the geometry passed is
    ``1x1`` (its norm does not depend on the input size). ``bound=`` is the deprecated name of
    ``method``.
    """

    def __init__(self, spec: ConvSpec, target: float, mode: str, method: str = "fantastic4",
                 options: dict | None = None, *, bound: str | None = None):
        super().__init__(target, mode)
        if bound is not None:
            warnings.warn("BoundNorm(bound=...) is deprecated: use method=...", DeprecationWarning, stacklevel=2)
            method = bound
        entry = get_method(method, "BoundNorm")
        self.spec = spec
        self.method = method
        self.options = dict(entry.train_options if options is None else options)

    @property
    def certified(self) -> bool:  # type: ignore[override]
        """Whether the method is a certified upper bound (``exact`` may be a bracket's lower end)."""
        return get_method(self.method, "BoundNorm").kind == "certified"

    @property
    def bound(self) -> str:
        """Deprecated name of :attr:`method`."""
        warnings.warn("BoundNorm.bound is deprecated: use BoundNorm.method", DeprecationWarning, stacklevel=2)
        return self.method

    def sigma(self, weight: Tensor) -> Tensor:
        return get_method(self.method, "BoundNorm").fn(weight, self.spec, **self.options)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, method={self.method!r}, {self.spec.describe()}"


class BatchNormLipschitz(_Normalizer):
    """BatchNorm ``weight`` (gamma) parametrized so that the eval-mode layer is ``target``-Lipschitz.

    ``clip`` (per channel, the natural choice: channels already within the target are left
    alone): ``gamma_c <- gamma_c / max(1, |gamma_c| / (target std_c))``, ``std_c =
    sqrt(running_var_c + eps)`` (:func:`bn_lipschitz_clip`); ``scale``: ``gamma <- gamma target /
    max_c(|gamma_c| / std_c)``. **Exact** for the eval-mode map (Gouk et al. 2021, arXiv
    1804.04368, Sec. 3); a training-mode BatchNorm uses the batch's variance and has no fixed
    constant. Stateless: it reads the running variance of its BatchNorm at every call.
    """

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm, target: float, mode: str):
        super().__init__(target, mode)
        self._bn = [bn]  # a plain reference: registering the owner as a submodule would be a cycle

    def forward(self, gamma: Tensor) -> Tensor:
        bn = self._bn[0]
        std = torch.sqrt(bn.running_var.detach() + bn.eps).to(gamma.dtype)
        if self.mode == "clip":
            return bn_lipschitz_clip(gamma, std, self.target)
        return rescale(gamma, (gamma.abs() / std).max(), self.target, "scale")
