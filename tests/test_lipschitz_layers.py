"""1-Lipschitz layers (sepconv.lipschitz): exact constants against ground truth (Jacobians, dense
operators and their SVD in float64), certification by lipschitz_bound (the declared-constant
protocol included), and clear errors for bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from sepconv.errors import ConfigError, UnsupportedLayerError
from sepconv.layers import compose_depthwise_separable
from sepconv.lipschitz import (
    BjorckOrthonormal,
    BoundedBatchNorm2d,
    CompositeNorm,
    ConvexResidual,
    GroupSort,
    L2Pool2d,
    LipschitzSeparableConv2d,
    MaxMin,
    ParaunitaryDepthwise,
    bjorck_orthonormalize,
    lipschitz_conv2d,
    lipschitz_linear,
    lipschitz_pointwise,
    orthogonal_depthwise,
    separable_norm,
)
from sepconv.spectral import ConvSpec, lipschitz_bound

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64


def _svd_max(mat: torch.Tensor) -> float:
    return float(torch.linalg.svdvals(mat.detach().to(F64))[0])


def _block_operator_norm(block: LipschitzSeparableConv2d, size) -> float:
    """Ground truth: the dense matrix of the composed (dw then pw) conv on inputs of ``size``, SVD in float64."""
    with torch.no_grad():
        weight = compose_depthwise_separable(block.dw.weight.to(F64), block.pw.weight.to(F64), block.dw.in_channels)
        spec = ConvSpec.of(block.dw, size)
        spec = ConvSpec(spec.in_size, spec.stride, spec.padding, spec.padding_mode, spec.dilation, 1)
        return _svd_max(spec.dense_operator(weight))


def _lower_bound(f, shape, pairs: int = 64, seed: int = 0) -> float:
    """Largest ||f(x) - f(y)|| / ||x - y|| over random pairs, some of them very close (a lower bound)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(pairs, *shape, generator=g, dtype=F64)
    scale = torch.logspace(-6, 0, pairs, dtype=F64).reshape(-1, *([1] * len(shape)))
    y = x + scale * torch.randn(pairs, *shape, generator=g, dtype=F64)
    with torch.no_grad():
        return float(((f(x) - f(y)).flatten(1).norm(dim=1) / (x - y).flatten(1).norm(dim=1)).max())


# ----------------------------------------------------------------- activations


@pytest.mark.parametrize("act", [MaxMin(), GroupSort(2), GroupSort(4), GroupSort(8)], ids=repr)
def test_sorting_activations_are_exactly_1_lipschitz_and_norm_preserving(act):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 256, 8, 3, 3, generator=g, dtype=F64)
    fx, fy = act(x), act(y)
    assert torch.allclose(fx.flatten(1).norm(dim=1), x.flatten(1).norm(dim=1), rtol=0, atol=1e-12)
    assert ((fx - fy).flatten(1).norm(dim=1) <= (x - y).flatten(1).norm(dim=1) * (1 + 1e-12)).all()
    # within one linear piece the constant 1 is attained: the map permutes coordinates
    d = 1e-9 * torch.randn(x.shape, generator=g, dtype=F64)
    ratio = (act(x + d) - fx).flatten(1).norm(dim=1) / d.flatten(1).norm(dim=1)
    assert torch.allclose(ratio, torch.ones_like(ratio), atol=1e-6)
    # the Jacobian is a permutation: every singular value is 1 (gradient-norm preserving)
    J = torch.autograd.functional.jacobian(act, torch.randn(1, 8, 2, 2, generator=g, dtype=F64)).reshape(32, 32)
    assert torch.allclose(torch.linalg.svdvals(J), torch.ones(32, dtype=F64), atol=1e-12)
    assert sorted(J.abs().sum(0).tolist()) == [1.0] * 32


def test_maxmin_outputs_pairwise_max_then_min_and_groupsort_sorts_each_group():
    x = torch.tensor([[3.0, -1.0, 2.0, 5.0]])
    assert MaxMin()(x).tolist() == [[3.0, 5.0, 2.0, -1.0]]
    assert GroupSort(2)(x).tolist() == [[-1.0, 3.0, 2.0, 5.0]]
    assert GroupSort(4)(x).tolist() == [[-1.0, 2.0, 3.0, 5.0]]


@pytest.mark.parametrize("layer,shape", [(MaxMin(), (6, 5, 5)), (GroupSort(4), (8, 4, 4)), (L2Pool2d(2), (3, 8, 8)),
                                         (L2Pool2d(), (3, 5, 5)), (L2Pool2d((2, 3)), (2, 7, 9))], ids=repr)
def test_parameter_free_layers_are_certified_by_their_declared_constant(layer, shape):
    assert layer.lipschitz_constant == 1.0
    assert lipschitz_bound(layer, shape) == 1.0  # the layer alone: traced as a leaf of a wrapper
    model = nn.Sequential(nn.Conv2d(shape[0], shape[0], 1, bias=False), layer, nn.Flatten())
    with torch.no_grad():
        model[0].weight.copy_(3 * torch.eye(shape[0])[:, :, None, None])
    assert lipschitz_bound(model, shape) == pytest.approx(3.0, rel=1e-6)
    assert _lower_bound(layer, shape) <= 1.0 + 1e-9


# ----------------------------------------------------------------- L2 pooling


def test_l2_pool_is_the_window_norm_exactly_1_lipschitz_and_finite_at_zero():
    x = torch.zeros(1, 1, 4, 4, dtype=F64, requires_grad=True)
    y = L2Pool2d(2)(x)
    y.sum().backward()
    assert torch.isfinite(x.grad).all() and y.abs().max() < 1e-12
    z = torch.randn(2, 3, 6, 6, dtype=F64)
    ref = z.unfold(2, 2, 2).unfold(3, 2, 2).pow(2).sum((-1, -2)).sqrt()
    assert torch.allclose(L2Pool2d(2)(z), ref, atol=1e-5)
    assert torch.allclose(L2Pool2d()(z)[..., 0, 0], z.flatten(2).norm(dim=2), atol=1e-5)
    # the constant 1 is attained by scaling one window: ||2v|| - ||v|| = ||2v - v||
    v = torch.zeros(1, 1, 4, 4, dtype=F64)
    v[0, 0, :2, :2] = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    gain = (L2Pool2d(2)(2 * v) - L2Pool2d(2)(v)).norm() / v.norm()
    assert gain == pytest.approx(1.0, abs=1e-9)


# ----------------------------------------------------------------- Björck and orthonormal layers


@pytest.mark.parametrize("shape", [(32, 32), (16, 48), (48, 16), (3, 8, 24)])
def test_bjorck_output_is_orthonormal_for_a_well_conditioned_matrix(shape):
    g = torch.Generator().manual_seed(0)
    u = torch.linalg.qr(torch.randn(*shape[:-2], max(shape[-2:]), max(shape[-2:]), generator=g, dtype=F64))[0]
    v = torch.linalg.qr(torch.randn(*shape[:-2], min(shape[-2:]), min(shape[-2:]), generator=g, dtype=F64))[0]
    s = torch.logspace(0, -2, min(shape[-2:]), dtype=F64)  # condition number 100
    core = u[..., :, : min(shape[-2:])] * s @ v.mT
    mat = 5 * (core if shape[-2] >= shape[-1] else core.mT)
    q = bjorck_orthonormalize(mat)
    assert torch.allclose(torch.linalg.svdvals(q), torch.ones(*shape[:-2], min(shape[-2:]), dtype=F64), atol=1e-6)


def test_bjorck_norm_is_at_most_one_even_when_the_iteration_has_not_converged():
    g = torch.Generator().manual_seed(1)
    mat = torch.randn(40, 40, generator=g, dtype=F64) @ torch.diag(torch.logspace(0, -6, 40, dtype=F64))
    for iters in (0, 1, 3, 20):
        assert _svd_max(bjorck_orthonormalize(mat, iters)) <= 1.0 + 1e-12


@pytest.mark.parametrize("kind", ["orthogonal", "bjorck", "normalized"])
def test_lipschitz_linear_has_norm_one_and_survives_sgd_with_weight_decay(kind):
    torch.manual_seed(0)
    layer = lipschitz_linear(64, 10, kind=kind).double()
    opt = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    for _ in range(3):
        loss = layer(torch.randn(16, 64, dtype=F64)).pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    layer.eval()
    s = torch.linalg.svdvals(layer.weight.detach())
    assert abs(float(s[0]) - 1) <= 1e-6  # spectral norm 1 up to float32 rounding (not a collapsed weight)
    if kind != "normalized":
        assert torch.allclose(s, torch.ones_like(s), atol=1e-6)  # orthonormal rows
    assert lipschitz_bound(nn.Sequential(nn.Flatten(), layer), (64, 1, 1)) == pytest.approx(float(s[0]), rel=1e-9)


@pytest.mark.parametrize("kind", ["bjorck", "normalized"])
def test_lipschitz_pointwise_is_certified_at_most_one(kind):
    torch.manual_seed(0)
    conv = lipschitz_pointwise(24, 16, kind=kind).double().eval()
    norm = _svd_max(conv.weight[:, :, 0, 0])
    assert norm <= 1 + 1e-9 and norm >= 1 - 1e-6
    assert lipschitz_bound(conv, (24, 5, 5)) <= 1 + 1e-9


def test_bjorck_parametrization_caches_in_eval_mode_only_until_the_weight_changes():
    conv = lipschitz_pointwise(8, 8, kind="bjorck").eval()
    with torch.no_grad():
        first = conv.weight
        assert conv.weight.data_ptr() == first.data_ptr()  # the cached result
        conv.parametrizations.weight.original.mul_(2).add_(0.1)
        assert conv.weight.data_ptr() != first.data_ptr() and not torch.equal(conv.weight, first)


def test_lipschitz_conv2d_is_certified_against_the_dense_operator():
    torch.manual_seed(0)
    for mode in ("zeros", "circular"):
        conv = lipschitz_conv2d(3, 8, 3, 2, in_size=8, padding_mode=mode).double().eval()
        true = _svd_max(ConvSpec.of(conv, 8).dense_operator(conv.weight.detach()))
        assert true <= 1 + 1e-9
        if mode == "circular":
            assert true == pytest.approx(1.0, abs=1e-6)  # the fft bound is exact for circular padding


# ----------------------------------------------------------------- separable blocks: product vs composite


@pytest.mark.parametrize("stride,mult", [(1, 1), (2, 1), (1, 2)])
@pytest.mark.parametrize("padding_mode", ["circular", "zeros"])
def test_composite_normalization_against_the_dense_operator(stride, mult, padding_mode):
    torch.manual_seed(0)
    size = (8, 8)
    comp = LipschitzSeparableConv2d(6, 10, 3, stride, in_size=size, norm="composite", padding_mode=padding_mode,
                                    depth_multiplier=mult).double().eval()
    prod = LipschitzSeparableConv2d(6, 10, 3, stride, in_size=size, norm="product", padding_mode=padding_mode,
                                    depth_multiplier=mult).double().eval()
    true_comp, true_prod = _block_operator_norm(comp, size), _block_operator_norm(prod, size)
    assert true_comp <= 1 + 1e-6 and true_prod <= 1 + 1e-6
    if padding_mode == "circular":
        assert true_comp == pytest.approx(1.0, abs=1e-6)  # exact: per frequency ||P diag(D(w))||
    else:
        assert true_comp >= 0.8  # a certified bound, within the circular embedding's slack
    assert true_prod < 0.95 * true_comp  # the product of the factors' norms wastes Lipschitz budget
    # lipschitz_bound merges dw and pw and bounds the block from its weights: the same value
    assert lipschitz_bound(comp, (6, *size)) == pytest.approx(true_comp, rel=1e-3)
    assert lipschitz_bound(comp, (6, *size)) >= true_comp * (1 - 1e-9)


def test_composite_normalization_is_differentiable_in_both_factors():
    torch.manual_seed(0)
    block = LipschitzSeparableConv2d(4, 6, 3, in_size=6, norm="composite", pointwise="bjorck").double()
    block(torch.randn(2, 4, 6, 6, dtype=F64)).pow(2).sum().backward()
    for p in (block.dw.parametrizations.weight.original, block.pw.parametrizations.weight.original):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().max() > 0
    sigma = separable_norm(block.dw.weight, block.pw.weight, ConvSpec.of(block.dw, 6), "fft").detach()
    assert float(sigma) == pytest.approx(1.0, abs=1e-6)  # the block is normalized to its bound


# ----------------------------------------------------------------- BatchNorm and residuals


def test_bounded_batchnorm_clips_every_slope_and_is_certified():
    torch.manual_seed(0)
    bn = BoundedBatchNorm2d(6).double()
    bn.train()
    for _ in range(5):  # small batch variance -> large slopes in a plain BatchNorm
        bn(0.05 * torch.randn(16, 6, 4, 4, dtype=F64))
    with torch.no_grad():
        bn.parametrizations.weight.original.copy_(torch.tensor([3.0, -2.0, 0.01, 1.0, -0.02, 0.5]))
    bn.eval()
    slopes = (bn.weight.abs() / torch.sqrt(bn.running_var + bn.eps)).detach()
    assert slopes.max() <= 1 + 1e-6 and slopes.max() >= 1 - 1e-6
    assert float(slopes[2]) == pytest.approx(0.01 / float(torch.sqrt(bn.running_var[2] + bn.eps)))  # unclipped
    assert lipschitz_bound(nn.Sequential(bn).eval(), (6, 4, 4)) <= 1 + 1e-6
    assert _lower_bound(bn, (6, 4, 4)) <= 1 + 1e-6
    plain = nn.BatchNorm2d(6).double().eval()
    plain.load_state_dict({"weight": bn.parametrizations.weight.original, "bias": bn.bias,
                           "running_mean": bn.running_mean, "running_var": bn.running_var,
                           "num_batches_tracked": bn.num_batches_tracked})
    assert lipschitz_bound(nn.Sequential(plain), (6, 4, 4)) > 3  # what the clip prevents
    # merged into the conv chain before it is bounded
    block = nn.Sequential(LipschitzSeparableConv2d(6, 6, 3, in_size=4, norm="composite").double(), bn, MaxMin()).eval()
    assert lipschitz_bound(block, (6, 4, 4)) <= 1 + 1e-6


def test_convex_residual_is_certified_and_checked_empirically():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 4, 3, padding=1, bias=False).double()
    block_L = lipschitz_bound(conv, (4, 6, 6))
    res = ConvexResidual(conv, alpha=0.25).eval()
    assert lipschitz_bound(res, (4, 6, 6)) == pytest.approx(0.25 + 0.75 * block_L, rel=1e-9)
    body = nn.Sequential(LipschitzSeparableConv2d(4, 4, 3, in_size=6, norm="composite"), MaxMin(),
                         LipschitzSeparableConv2d(4, 4, 3, in_size=6, norm="composite")).double()
    res = ConvexResidual(body, alpha=0.5).eval()
    L = lipschitz_bound(res, (4, 6, 6))
    assert L <= 1 + 1e-6
    with parametrize.cached():
        assert _lower_bound(res, (4, 6, 6)) <= L
    x = torch.randn(2, 4, 6, 6, dtype=F64)
    assert torch.allclose(res(x), 0.5 * x + 0.5 * body(x))


# ----------------------------------------------------------------- the declared-constant protocol


class _Halve(nn.Module):
    lipschitz_constant = 0.5

    def forward(self, x):
        return torch.maximum(x, 0.5 * x) * 0.5  # 0.5-Lipschitz; torch.maximum alone has no rule


class _Liar(nn.Module):
    lipschitz_constant = 0.0  # never trusted: the module has parameters

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 1, bias=False)

    def forward(self, x):
        return self.conv(x)


class _Undeclared(nn.Module):
    def forward(self, x):
        return torch.maximum(x, -x)


class _BadDeclaration(nn.Module):
    lipschitz_constant = -1.0

    def forward(self, x):
        return x


def test_a_declared_constant_is_used_only_for_modules_without_state():
    assert lipschitz_bound(nn.Sequential(_Halve(), _Halve()), (2, 3, 3)) == 0.25
    liar = _Liar()
    with torch.no_grad():
        liar.conv.weight.copy_(2 * torch.eye(2)[:, :, None, None])
    assert lipschitz_bound(nn.Sequential(liar), (2, 3, 3)) == pytest.approx(2.0, rel=1e-6)
    with pytest.raises(UnsupportedLayerError, match="maximum"):
        lipschitz_bound(nn.Sequential(_Undeclared()), (2, 3, 3))
    with pytest.raises(ConfigError, match="_BadDeclaration: lipschitz_constant"):
        lipschitz_bound(nn.Sequential(_BadDeclaration()), (2, 3, 3))


# ----------------------------------------------------------------- errors


@pytest.mark.parametrize("make,call,match", [
    (lambda: GroupSort(4), lambda m: m(torch.zeros(1, 6, 2, 2)), "GroupSort.*6 input channels.*divisible by 4"),
    (lambda: GroupSort(1), None, "GroupSort: group_size"),
    (lambda: MaxMin(), lambda m: m(torch.zeros(1, 3)), "MaxMin: 3 input channels"),
    (lambda: ConvexResidual(nn.Identity(), alpha=-0.1), None, r"ConvexResidual: alpha must be a number in \[0, 1\]"),
    (lambda: ConvexResidual(nn.Identity(), alpha=True), None, "ConvexResidual: alpha"),
    (lambda: L2Pool2d(0), None, "L2Pool2d: kernel_size"),
    (lambda: L2Pool2d(4), lambda m: m(torch.zeros(1, 1, 2, 2)), "L2Pool2d: input"),
    (lambda: BoundedBatchNorm2d(4, target=0), None, "BoundedBatchNorm2d: target"),
    (lambda: BjorckOrthonormal(iters=-1), None, "BjorckOrthonormal: iters"),
    (lambda: lipschitz_linear(4, 2, kind="cayley"), None, "lipschitz_linear: kind"),
    (lambda: LipschitzSeparableConv2d(4, 4, in_size=8, norm="spectral"), None, "LipschitzSeparableConv2d: norm"),
    (lambda: LipschitzSeparableConv2d(4, 4, in_size=8, pointwise="none"), None, "LipschitzSeparableConv2d: pointwise"),
    (lambda: LipschitzSeparableConv2d(4, 4, in_size=8, method="power"), None, "LipschitzSeparableConv2d: method"),
    (lambda: CompositeNorm(nn.Conv2d(4, 4, 3, groups=4), ConvSpec((8, 8)), method="reshape"), None,
     "CompositeNorm: method"),
])
def test_bad_input_is_a_one_line_config_error_naming_the_layer(make, call, match):
    with pytest.raises(ConfigError, match=match) as info:
        m = make()
        call(m)
    assert "\n" not in str(info.value)


# ----------------------------------------------------------------- orthogonal (paraunitary) depthwise


def _dense(conv: nn.Conv2d, size) -> torch.Tensor:
    """The dense matrix of ``conv`` (no bias) on inputs ``(C, *size)``, float64, by its Jacobian."""
    x = torch.zeros(conv.in_channels, *size, dtype=F64)
    with torch.no_grad():
        weight = conv.weight.to(F64)
    f = lambda v: F.conv2d(F.pad(v[None], conv._reversed_padding_repeated_twice, "circular")  # noqa: E731
                           if conv.padding_mode == "circular" else v[None], weight, None, conv.stride,
                           0 if conv.padding_mode == "circular" else conv.padding, conv.dilation, conv.groups)[0]
    return torch.autograd.functional.jacobian(f, x).reshape(-1, x.numel())


@pytest.mark.parametrize("m,k,size", [(2, (3, 3), (6, 6)), (3, (3, 5), (7, 8)), (9, (3, 3), (5, 5)),
                                      (4, (1, 1), (4, 4))])
def test_paraunitary_depthwise_is_an_isometry_with_circular_padding(m, k, size):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 3 * m, k, padding=(k[0] // 2, k[1] // 2), groups=3, bias=False, padding_mode="circular")
    parametrize.register_parametrization(conv, "weight", ParaunitaryDepthwise(m, k), unsafe=True)
    s = torch.linalg.svdvals(_dense(conv, size))
    assert torch.allclose(s, torch.ones_like(s), atol=1e-6), (s.min(), s.max())
    h = conv.weight.detach().to(F64).reshape(3, m, *k)  # per channel and frequency sum_j |h_j^(w)|^2 = 1
    power = torch.fft.fft2(h, s=(16, 16)).abs().pow(2).sum(1)
    assert torch.allclose(power, torch.ones_like(power), atol=1e-6)


@pytest.mark.parametrize("stride,padding_mode", [(1, "zeros"), (2, "zeros"), (2, "circular")])
def test_paraunitary_depthwise_has_norm_at_most_one_with_zero_padding_or_stride(stride, padding_mode):
    torch.manual_seed(1)
    conv = nn.Conv2d(4, 8, 3, stride, 1, groups=4, bias=False, padding_mode=padding_mode)
    parametrize.register_parametrization(conv, "weight", ParaunitaryDepthwise(2, (3, 3)), unsafe=True)
    s = torch.linalg.svdvals(_dense(conv, (6, 6)))
    assert s.max() <= 1 + 1e-6 and s.max() > 0.5


def test_orthogonal_separable_block_is_an_isometry_and_certified_at_one():
    torch.manual_seed(2)
    size = (6, 6)
    block = LipschitzSeparableConv2d(4, 8, 3, in_size=size, norm="orthogonal", depth_multiplier=2,
                                     padding_mode="circular").double().eval()
    assert isinstance(block.pw.parametrizations.weight[0], BjorckOrthonormal)
    with torch.no_grad():
        weight = compose_depthwise_separable(block.dw.weight, block.pw.weight, 4)
    s = torch.linalg.svdvals(ConvSpec(size, padding=(1, 1), padding_mode="circular").dense_operator(weight))
    assert torch.allclose(s, torch.ones_like(s), atol=1e-5), (s.min(), s.max())  # every direction kept
    assert lipschitz_bound(block, (4, *size)) <= 1 + 1e-6
    zeros = LipschitzSeparableConv2d(4, 6, 3, 2, in_size=size, norm="orthogonal", depth_multiplier=2).double()
    zeros(torch.randn(2, 4, *size, dtype=F64)).pow(2).sum().backward()  # differentiable in both factors
    for p in (zeros.dw.parametrizations.weight.original, zeros.pw.parametrizations.weight.original):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().max() > 0
    assert _block_operator_norm(zeros.eval(), size) <= 1 + 1e-6
    assert lipschitz_bound(zeros, (4, *size)) <= 1 + 1e-6


def test_paraunitary_depthwise_refuses_a_multiplier_below_two():
    for m in (1, 0, True, 2.0):
        with pytest.raises(ConfigError, match="ParaunitaryDepthwise: the depth multiplier") as info:
            ParaunitaryDepthwise(m, (3, 3))
        assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="ParaunitaryDepthwise"):
        LipschitzSeparableConv2d(4, 4, in_size=8, norm="orthogonal")  # depth multiplier 1


def test_orthogonal_depthwise_is_the_block_without_its_redundant_pointwise_part():
    torch.manual_seed(3)
    conv = orthogonal_depthwise(1, 12, 3, padding_mode="circular").double()
    s = torch.linalg.svdvals(_dense(conv, (5, 5)))
    assert torch.allclose(s, torch.ones_like(s), atol=1e-6)  # 1 -> 12 channels: an isometry
    # an orthogonal pointwise conv after a paraunitary bank gives another paraunitary bank: per frequency
    # U h(w) has the same norm, so the pair is no more expressive and costs a conv more
    u = torch.linalg.qr(torch.randn(12, 12, dtype=F64))[0]
    h = torch.fft.fft2(conv.weight.detach()[:, 0], s=(8, 8))
    rotated = torch.einsum("ij,jxy->ixy", u.to(h.dtype), h)
    assert torch.allclose(rotated.abs().pow(2).sum(0), torch.ones(8, 8, dtype=F64))
    zeros = orthogonal_depthwise(3, 6, 3, 2).double()
    assert torch.linalg.svdvals(_dense(zeros, (6, 6))).max() <= 1 + 1e-6
    with pytest.raises(ConfigError, match="orthogonal_depthwise: 7 output channels are not a multiple of 3"):
        orthogonal_depthwise(3, 7)
