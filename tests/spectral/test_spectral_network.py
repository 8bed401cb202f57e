"""Network-level tools: merged linear chains, the fx Lipschitz bound, certified accuracy."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sepconv.errors import UnsupportedLayerError
from sepconv.models import create_model, list_models, model_info
from sepconv.spectral.composite import batchnorm_lipschitz, chain_norm, linear_norm, merge_chain
from sepconv.spectral.network import (
    ACTIVATION_LIPSCHITZ,
    analyze,
    certified_accuracy,
    certified_radii,
    lipschitz_bound,
    pad_lipschitz,
    pool_lipschitz,
)


def _randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            if m.weight is not None:
                m.weight.data.copy_(torch.randn(m.num_features, generator=g))
    return model.eval()


def empirical_lipschitz(model: nn.Module, shape, steps: int = 60, restarts: int = 3, radius: float | None = None,
                        seed: int = 0) -> float:
    """Largest ||f(x) - f(y)|| / ||x - y|| found by gradient ascent on input pairs (a lower bound).
    With ``radius``, both points stay in the ball ``||x|| <= radius``."""
    g = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype if any(True for _ in model.parameters()) else torch.float64
    best = 0.0
    model.eval()

    def project(v, r):
        return v * (r / v.flatten(1).norm(dim=1).clamp_min(r))[:, None, None, None]

    for _ in range(restarts):
        x = torch.randn(4, *shape, generator=g, dtype=dtype).requires_grad_(True)
        d = (1e-2 * torch.randn(4, *shape, generator=g, dtype=dtype)).requires_grad_(True)
        opt = torch.optim.Adam([x, d], lr=0.05)
        for _ in range(steps):
            if radius is not None:
                with torch.no_grad():
                    x.copy_(project(x, 0.9 * radius))
                    d.copy_(project(d, 0.1 * radius))
            ratio = (model(x + d) - model(x)).flatten(1).norm(dim=1) / d.flatten(1).norm(dim=1)
            best = max(best, float(ratio.max().detach()))
            opt.zero_grad()
            (-ratio.sum()).backward()
            opt.step()
    return best


# ----------------------------------------------------------------------------- composites


def test_merged_chain_is_the_same_linear_map_and_its_norm_exact():
    torch.manual_seed(0)
    chains = [
        [nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False), nn.BatchNorm2d(4), nn.Conv2d(4, 6, 1)],  # DSC
        # BSConv-U
        [nn.Conv2d(4, 3, 1, bias=False), nn.BatchNorm2d(3), nn.Conv2d(3, 3, 3, stride=2, padding=1, groups=3)],
        [nn.Conv2d(4, 2, 1, bias=False), nn.Conv2d(2, 3, 1, bias=False), nn.BatchNorm2d(3),
         nn.Conv2d(3, 3, 3, padding=1, groups=3, padding_mode="circular")],  # BSConv-S
        [nn.BatchNorm2d(4), nn.Conv2d(4, 5, 3, padding=1), nn.Conv2d(5, 2, 1, stride=2)],
    ]
    for mods in chains:
        mods = [_randomize_bn(m.double()) for m in mods]
        W, spec = merge_chain(mods, (6, 7))
        x = torch.randn(2, 4, 6, 7, dtype=torch.float64)

        def f(v):
            for m in mods:
                v = m(v)
            return v
        torch.testing.assert_close(spec.apply(x, W), f(x) - f(torch.zeros_like(x)), rtol=1e-10, atol=1e-10)
        dense = float(torch.linalg.svdvals(spec.dense_operator(W))[0])
        assert math.isclose(float(chain_norm(mods, (6, 7))), dense, rel_tol=1e-6)


def test_dsc_norm_is_max_over_frequencies_of_pointwise_times_depthwise_symbol():
    C, Co, n = 4, 5, 8
    dw = torch.randn(C, 1, 3, 3, dtype=torch.float64)
    P = torch.randn(Co, C, dtype=torch.float64)
    Kf = torch.fft.fft2(dw[:, 0], s=(n, n))  # (C, n, n)
    blocks = P[None, None] * Kf.permute(1, 2, 0)[:, :, None, :]  # P diag(K^(w))
    expected = float(torch.linalg.matrix_norm(blocks, ord=2).max())
    mods = [nn.Conv2d(C, C, 3, padding=1, groups=C, bias=False, padding_mode="circular").double(),
            nn.Conv2d(C, Co, 1, bias=False).double()]
    mods[0].weight.data.copy_(dw)
    mods[1].weight.data.copy_(P[:, :, None, None])
    assert math.isclose(float(chain_norm(mods, (n, n))), expected, rel_tol=1e-9)


def test_two_spatial_convs_do_not_merge():
    with pytest.raises(UnsupportedLayerError, match="not a single convolution"):
        merge_chain([nn.Conv2d(2, 2, 3, padding=1), nn.Conv2d(2, 2, 3, padding=1)], (5, 5))


def test_linear_and_batchnorm_constants_are_exact():
    lin = nn.Linear(7, 5).double().requires_grad_(False)
    x = torch.randn(1000, 7, dtype=torch.float64)
    with torch.no_grad():
        ratio = float((lin(x) - lin(torch.zeros(7, dtype=torch.float64))).norm(dim=1).div(x.norm(dim=1)).max())
    assert float(linear_norm(lin)) >= ratio
    bn = _randomize_bn(nn.BatchNorm2d(6).double()).requires_grad_(False)
    expected = float((bn.weight.abs() / (bn.running_var + bn.eps).sqrt()).max())
    assert math.isclose(float(batchnorm_lipschitz(bn)), expected, rel_tol=1e-12)


# ----------------------------------------------------------------------------- constants


@pytest.mark.parametrize("name, fn", [
    ("gelu", F.gelu), ("silu", F.silu), ("mish", F.mish), ("hardswish", F.hardswish), ("selu", F.selu),
    ("sigmoid", torch.sigmoid), ("hardsigmoid", F.hardsigmoid), ("softplus", F.softplus), ("tanh", torch.tanh),
])
def test_activation_constants_bound_the_derivative_tightly(name, fn):
    x = torch.linspace(-12, 12, 400_001, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(fn(x).sum(), x)
    top = float(g.abs().max())  # (torch's hardsigmoid gradient uses a float32 1/6: allow 1e-7)
    assert top <= ACTIVATION_LIPSCHITZ[name] * (1 + 1e-7) and ACTIVATION_LIPSCHITZ[name] <= top * 1.001


@pytest.mark.parametrize("pad,mode,shape", [
    ((1, 1, 1, 1), "constant", (2, 5, 5)), ((0, 2, 1, 0), "constant", (1, 4, 3)),
    ((-1, 1, 0, 0), "constant", (1, 4, 4)),
    ((1, 1, 1, 1), "reflect", (2, 5, 5)), ((2, 1, 0, 2), "reflect", (1, 4, 3)), ((1, 2, 2, 1), "replicate", (1, 3, 4)),
    ((2, 2, 1, 1), "circular", (1, 3, 4)), ((3, 0), "replicate", (2, 5)),
])
def test_padding_constant_equals_the_dense_operator_norm(pad, mode, shape):
    D = math.prod(shape)
    eye = torch.eye(D, dtype=torch.float64).reshape(D, *shape)
    if mode == "constant":
        op = F.pad(eye, pad) - F.pad(torch.zeros_like(eye), pad)
    else:
        op = F.pad(eye, pad, mode=mode)
    true = float(torch.linalg.svdvals(op.reshape(D, -1))[0])
    assert pad_lipschitz(shape, pad, mode) == pytest.approx(true, rel=1e-12)


@pytest.mark.parametrize("pool, shape", [
    (nn.MaxPool2d(3, 2, 1), (1, 3, 9, 8)), (nn.MaxPool2d(2), (1, 3, 8, 8)), (nn.AvgPool2d(3, 1, 1), (1, 2, 7, 7)),
    (nn.AvgPool2d(3, 2, 1, count_include_pad=False), (1, 2, 7, 6)), (nn.AvgPool2d(2), (1, 2, 6, 6)),
    (nn.AdaptiveAvgPool2d(1), (1, 3, 5, 7)), (nn.AdaptiveAvgPool2d((3, 2)), (1, 2, 7, 5)),
    (nn.AdaptiveMaxPool2d(2), (1, 2, 5, 5)), (nn.AvgPool2d(3, 2, 1, divisor_override=4), (1, 1, 6, 6)),
])
def test_pooling_constants_are_certified_and_exact_when_windows_do_not_overlap(pool, shape):
    x = torch.randn(*shape, dtype=torch.float64)
    out = pool(x).shape[-2:]
    kind = {nn.MaxPool2d: "max", nn.AvgPool2d: "avg", nn.AdaptiveAvgPool2d: "adaptive_avg",
            nn.AdaptiveMaxPool2d: "adaptive_max"}[type(pool)]
    kw = {}
    if kind == "max":
        kw = dict(kernel=pool.kernel_size, stride=pool.stride, padding=pool.padding, dilation=pool.dilation)
    elif kind == "avg":
        kw = dict(kernel=pool.kernel_size, stride=pool.stride, padding=pool.padding,
                  count_include_pad=pool.count_include_pad, divisor_override=pool.divisor_override)
    L = pool_lipschitz(kind, shape[-2:], out, **kw)
    if kind in ("avg", "adaptive_avg"):  # linear: compare with the exact operator norm
        D = math.prod(shape[1:])
        eye = torch.eye(D, dtype=torch.float64).reshape(D, *shape[1:])
        true = float(torch.linalg.svdvals(pool(eye).reshape(D, -1))[0])
    else:
        true = empirical_lipschitz(pool.double(), shape[1:], steps=30, restarts=2)
    assert true <= L * (1 + 1e-9)
    non_overlapping = (isinstance(pool, nn.AvgPool2d) and pool.kernel_size == pool.stride == 2) or (
        isinstance(pool, nn.AdaptiveAvgPool2d) and pool.output_size == 1)
    if non_overlapping:
        assert math.isclose(L, true, rel_tol=1e-9)


# ----------------------------------------------------------------------------- networks


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.pw = nn.Conv2d(8, 8, 1)
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = F.relu(self.bn(self.stem(x)))
        x = x + F.hardswish(self.pw(self.dw(x)))  # residual over a DSC block
        x = self.pool(x)
        return self.head(x.mean((2, 3)))


class ConcatShuffle(nn.Module):
    """ShuffleNet-like: split, branch, concat, channel shuffle; squeeze-excitation gate."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b1 = nn.Conv2d(4, 4, 1)
        self.b2 = nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.se1 = nn.Linear(8, 4)
        self.se2 = nn.Linear(4, 8)
        self.avg = nn.AvgPool2d(2)
        self.fc = nn.Linear(8 * 3 * 3, 3)

    def forward(self, x):
        x = F.leaky_relu(self.a(x), 0.2)
        left, right = x.chunk(2, dim=1)
        right = F.silu(self.b2(self.b1(right)))
        x = torch.cat([left, right], 1)
        n, c, h, w = x.shape
        x = x.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)  # channel shuffle
        s = F.hardsigmoid(self.se2(F.relu(self.se1(x.mean((2, 3))))))
        x = x * s[:, :, None, None]
        return self.fc(torch.flatten(self.avg(x), 1))


def _double(model: nn.Module, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.normal_(m.weight, std=1.0 / math.sqrt(m.weight[0].numel()))
    return _randomize_bn(model.double(), seed)


def test_lipschitz_bound_holds_on_residual_dsc_net():
    model = _double(Residual(), 1)
    L = lipschitz_bound(model, (3, 6, 6))
    emp = empirical_lipschitz(model, (3, 6, 6))
    assert emp <= L
    # chains are merged: the DSC block is bounded as one operator, not a product
    assert L < lipschitz_bound(model, (3, 6, 6), method="fantastic4")


def test_lipschitz_bound_with_concat_shuffle_and_squeeze_excitation_needs_and_uses_an_input_bound():
    model = _double(ConcatShuffle(), 2)
    with pytest.raises(UnsupportedLayerError, match="product of two input-dependent tensors.*input_bound"):
        lipschitz_bound(model, (3, 6, 6))
    R = 5.0
    L = lipschitz_bound(model, (3, 6, 6), input_bound=R)
    assert empirical_lipschitz(model, (3, 6, 6), radius=R) <= L


def test_an_operation_without_a_rule_is_a_clear_error():
    class Odd(nn.Module):
        def forward(self, x):
            return torch.cumsum(x, 1)

    with pytest.raises(UnsupportedLayerError, match="cumsum"):
        lipschitz_bound(Odd(), (2, 3, 3))

    class Up(nn.Module):
        def __init__(self):
            super().__init__()
            self.up = nn.Upsample(scale_factor=2)

        def forward(self, x):
            return self.up(x)

    with pytest.raises(UnsupportedLayerError, match="Upsample"):
        lipschitz_bound(Up(), (2, 3, 3))
    with pytest.raises(UnsupportedLayerError, match="ConvTranspose2d"):
        lipschitz_bound(nn.Sequential(nn.ConvTranspose2d(2, 2, 3)), (2, 4, 4))


@pytest.mark.parametrize("name", list_models())
def test_lipschitz_bound_exceeds_the_empirical_ratio_for_every_zoo_model(name):
    info = model_info(name)
    c = info.input_size[0]
    width = {} if info.family == "shufflenet" else {"width": 0.25}  # ShuffleNets take width from the name
    if "lipschitz" in info.tags:  # normalized at (and its head flattening) the size it is built for
        width["image_size"] = 16
    model = _randomize_bn(create_model(name, num_classes=5, in_chans=c, **width).double(), 3)
    shape = (c, 16, 16)
    try:  # the circular-embedding bound: certified and cheap enough for deep zoo models
        L = lipschitz_bound(model, shape, method="fft")
        radius = None
    except UnsupportedLayerError as e:
        if "input_bound" not in str(e):
            raise
        radius = 10.0
        L = lipschitz_bound(model, shape, method="fft", input_bound=radius)
    # products of two input-dependent signals (squeeze-excitation) compose quadratically:
    # the bound on a ball stays certified but may overflow to inf in deep SE networks
    assert L > 0 and (math.isfinite(L) or radius is not None)
    assert empirical_lipschitz(model, shape, steps=20, restarts=1, radius=radius) <= L


def test_analyze_reports_every_conv_and_linear_with_bounds_above_exact():
    model = _randomize_bn(create_model("simple_cnn", num_classes=4, in_chans=1).double())
    recs = analyze(model, (1, 8, 8), methods=("exact", "upper", "fft", "fantastic4", "reshape"))
    n_conv = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    assert [r.kind for r in recs] == ["Conv2d"] * n_conv + ["Linear"]
    for r in recs:
        assert r.values["exact"] <= r.values["upper"] * (1 + 1e-12)
        for m in ("fft", "fantastic4"):
            assert r.values[m] >= r.values["exact"] * (1 - 1e-9)
        assert set(r.seconds) == set(r.values)


def test_certified_accuracy_certifies_only_margins_above_sqrt2_L_eps():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3)).double()
    x = torch.randn(64, 1, 2, 2, dtype=torch.float64)
    with torch.no_grad():
        y = model(x).argmax(1)
    loader = [(x[:32], y[:32]), (x[32:], y[32:])]
    L = float(linear_norm(model[1]))
    cert = certified_accuracy(model, loader, eps=0.05, pairwise=False)  # the global certificate alone
    assert cert.accuracy == 1.0 and math.isclose(cert.lipschitz, L, rel_tol=1e-9)
    logits = model(x)
    top = logits.topk(2, 1).values
    expected = float(((top[:, 0] - top[:, 1]) > math.sqrt(2) * L * 0.05).double().mean())
    assert cert.certified == expected
    assert certified_accuracy(model, loader, eps=0.0, pairwise=False).certified == 1.0
    # by default the final Linear's pairwise certificate is used too: never fewer samples certified
    assert certified_accuracy(model, loader, eps=0.05).certified >= expected


def test_certified_radii_are_margin_over_sqrt2_L_and_minus_inf_when_wrong():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3)).double()
    x = torch.randn(40, 1, 2, 2, dtype=torch.float64)
    with torch.no_grad():
        logits = model(x)
    y = logits.argmax(1)
    y[:10] = (y[:10] + 1) % 3  # ten wrong labels
    radii, L = certified_radii(model, [(x, y)], lipschitz=2.0)
    top = logits.topk(2, 1).values
    assert L == 2.0 and torch.isinf(radii[:10]).all() and (radii[:10] < 0).all()
    torch.testing.assert_close(radii[10:], (top[10:, 0] - top[10:, 1]) / (math.sqrt(2) * 2.0))
    for eps in (0.0, 0.01, 0.1):
        cert = certified_accuracy(model, [(x, y)], eps, lipschitz=2.0)
        assert cert.accuracy == 0.75 and cert.certified == float((radii > eps).double().mean())


def test_the_network_bounds_show_progress_over_their_layers_when_asked(capsys):
    from sepconv.spectral import curvature_bound

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Tanh(), nn.Conv2d(4, 4, 3, padding=1),
                        nn.Tanh(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).eval()
    quiet = lipschitz_bound(net, (1, 6, 6))
    assert capsys.readouterr().err == ""
    assert lipschitz_bound(net, (1, 6, 6), progress=True) == quiet
    err = capsys.readouterr().err
    assert "lipschitz_bound" in err and "/3 " in err  # conv+BN, conv, linear
    curvature_bound(net, (1, 6, 6), progress=True)
    assert "curvature_bound" in capsys.readouterr().err
