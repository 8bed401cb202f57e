"""Blocks of sepconv.layers against the `bsconv` reference package and exact reconstruction."""

import math

import pytest
import torch
from bsconv.pytorch import BSConvS as RefBSConvS
from bsconv.pytorch import BSConvS_ModelRegLossMixin
from bsconv.pytorch import BSConvU as RefBSConvU
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from sepconv.errors import ConfigError, UnsupportedLayerError
from sepconv.layers import (
    BSConvS,
    BSConvU,
    DepthwiseSeparableConv2d,
    bsconv_s_mid_channels,
    make_spatial_conv,
    mark_orthonormal,
    orthonormal_penalty,
    orthonormality_defect,
    penalty_sources,
)

SETTINGS = settings(max_examples=25, deadline=None)


pytestmark = pytest.mark.usefixtures("one_thread")


@st.composite
def geometries(draw):
    k = draw(st.sampled_from([1, 2, 3, 5, (3, 1), (1, 5), (2, 3)]))
    kh, kw = (k, k) if isinstance(k, int) else k
    dilation = draw(st.sampled_from([1, 2, (1, 2)]))
    mode = draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]))
    max_pad = min(kh, kw) // 2 if mode != "zeros" else 2
    return dict(
        in_channels=draw(st.integers(1, 9)),
        out_channels=draw(st.integers(1, 9)),
        kernel_size=k,
        stride=draw(st.sampled_from([1, 2, 3, (1, 2)])),
        padding=draw(st.integers(0, max_pad)),
        dilation=dilation,
        bias=draw(st.booleans()),
        padding_mode=mode,
    )


def _input(g, seed=0):
    torch.manual_seed(seed)
    return torch.randn(2, g["in_channels"], 11, 12, dtype=torch.float64)


def _assert_same_function(ours: nn.Module, ref: nn.Module, x: torch.Tensor) -> None:
    """Outputs and input/parameter gradients agree, in train mode (batch stats) and eval mode."""
    ours.double(), ref.double()
    for train in (True, False):
        ours.train(train), ref.train(train)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = ours(xa), ref(xb)
        torch.testing.assert_close(ya, yb, rtol=1e-10, atol=1e-10)
        ya.square().sum().backward()
        yb.square().sum().backward()
        torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-9, atol=1e-10)
    for (na, pa), (nb, pb) in zip(ours.named_parameters(), ref.named_parameters()):
        assert na == nb
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-9, atol=1e-10)
    # running statistics moved identically in the train pass
    for (na, ba), (nb, bb) in zip(ours.named_buffers(), ref.named_buffers()):
        assert na == nb and torch.equal(ba, bb)


@SETTINGS
@given(g=geometries(), with_bn=st.booleans())
def test_bsconv_u_computes_the_reference_function_for_any_geometry(g, with_bn):
    ref = RefBSConvU(**g, with_bn=with_bn, bn_kwargs={"momentum": 0.3})
    ours = BSConvU(**g, with_bn=with_bn, bn_kwargs={"momentum": 0.3})
    assert [(n, p.shape) for n, p in ours.state_dict().items()] == \
           [(n, p.shape) for n, p in ref.state_dict().items()]
    ours.load_state_dict(ref.state_dict(), strict=True)
    _assert_same_function(ours, ref, _input(g))


@SETTINGS
@given(g=geometries(), with_bn=st.booleans(), p=st.sampled_from([0.0, 0.1, 0.25, 0.5, 1 / 3, 1.0]),
       min_mid=st.sampled_from([1, 2, 4]))
def test_bsconv_s_computes_the_reference_function_for_any_geometry(g, with_bn, p, min_mid):
    ref = RefBSConvS(**g, p=p, min_mid_channels=min_mid, with_bn=with_bn)
    ours = BSConvS(**g, p=p, min_mid_channels=min_mid, with_bn=with_bn)
    assert [(n, p.shape) for n, p in ours.state_dict().items()] == \
           [(n, p.shape) for n, p in ref.state_dict().items()]
    ours.load_state_dict(ref.state_dict(), strict=True)
    _assert_same_function(ours, ref, _input(g))
    torch.testing.assert_close(ours.penalty(), ref._reg_loss())


class _RefNet(nn.Sequential, BSConvS_ModelRegLossMixin):
    pass


@pytest.mark.parametrize("alpha", [0.1, 1.0, 0.013])
def test_orthonormal_penalty_equals_reference_reg_loss_with_gradients(alpha):
    torch.manual_seed(1)
    specs = [(3, 16, 0.25), (16, 32, 0.5), (32, 32, 1 / 6), (32, 8, 1.0), (8, 8, 0.0)]
    ref = _RefNet(*[RefBSConvS(i, o, 3, padding=1, p=p, with_bn=True) for i, o, p in specs])
    ours = nn.Sequential(*[BSConvS(i, o, 3, padding=1, p=p, with_bn=True) for i, o, p in specs])
    ours.load_state_dict(ref.state_dict())
    a, b = orthonormal_penalty(ours, alpha), ref.reg_loss(alpha=alpha)
    torch.testing.assert_close(a, b)
    a.backward(), b.backward()
    for pa, pb in zip(ours.parameters(), ref.parameters()):
        if pb.grad is None:
            assert pa.grad is None or not pa.grad.any()
        else:
            torch.testing.assert_close(pa.grad, pb.grad)
    assert [n for n, _ in penalty_sources(ours)] == [f"{i}.pw1" for i in range(len(specs))]


def test_orthonormality_defect_vanishes_exactly_on_orthonormal_rows():
    torch.manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(12, 5, dtype=torch.float64))  # 5 orthonormal columns
    w = q.T.reshape(5, 12, 1, 1)
    assert orthonormality_defect(w).item() < 1e-14
    # scaling the rows by s gives ||(s^2 - 1) I_5||_F = |s^2 - 1| sqrt(5): unsquared Frobenius norm
    torch.testing.assert_close(orthonormality_defect(2 * w), torch.tensor(3 * math.sqrt(5), dtype=torch.float64))


def test_penalty_of_a_model_without_bsconv_s_is_a_zero_scalar():
    m = nn.Sequential(nn.Conv2d(3, 4, 3), BSConvU(4, 4, 3))
    pen = orthonormal_penalty(m)
    assert pen.shape == () and pen.item() == 0.0 and penalty_sources(m) == []
    # marking any conv makes it a source
    mark_orthonormal(m[0])
    assert [n for n, _ in penalty_sources(m)] == ["0"]
    torch.testing.assert_close(orthonormal_penalty(m, 0.5), 0.5 * orthonormality_defect(m[0].weight))


@SETTINGS
@given(g=geometries(), dm=st.integers(1, 3), kind=st.sampled_from(["dsc", "bsconv_u", "bsconv_s"]))
def test_linear_blocks_equal_the_regular_conv_with_their_dense_weight(g, dm, kind):
    args = dict(g)
    if kind == "dsc":
        block = DepthwiseSeparableConv2d(**args, depth_multiplier=dm).double()
    elif kind == "bsconv_u":
        block = BSConvU(**args).double()
    else:
        block = BSConvS(**args, p=0.5).double()
    x = _input(g)
    w = block.dense_weight()
    assert w.shape == (g["out_channels"], g["in_channels"], *block.kernel_size)
    dense = nn.Conv2d(g["in_channels"], g["out_channels"], g["kernel_size"], g["stride"], g["padding"],
                      g["dilation"], bias=g["bias"], padding_mode=g["padding_mode"]).double()
    with torch.no_grad():
        dense.weight.copy_(w)
        if g["bias"]:
            dense.bias.copy_(block.bias)
    torch.testing.assert_close(block(x), dense(x), rtol=1e-10, atol=1e-10)


def test_dense_weight_is_refused_when_a_norm_or_activation_sits_between():
    for block in (DepthwiseSeparableConv2d(4, 4, 3, mid_norm=nn.BatchNorm2d),
                  DepthwiseSeparableConv2d(4, 4, 3, mid_act=nn.ReLU),
                  BSConvU(4, 4, 3, with_bn=True), BSConvS(4, 4, 3, with_bn=True)):
        with pytest.raises(UnsupportedLayerError):
            block.dense_weight()


def test_children_have_the_fixed_names_and_order():
    d = DepthwiseSeparableConv2d(4, 6, 3, depth_multiplier=2, mid_norm=nn.BatchNorm2d, mid_act=nn.ReLU)
    assert [n for n, _ in d.named_children()] == ["dw", "mid_norm", "mid_act", "pw"]
    assert (d.dw.groups, d.dw.out_channels, d.pw.in_channels) == (4, 8, 8)
    assert isinstance(d.mid_norm, nn.BatchNorm2d) and d.mid_norm.num_features == 8
    assert isinstance(d.mid_act, nn.ReLU)
    plain = DepthwiseSeparableConv2d(4, 6, 3)
    assert isinstance(plain.mid_norm, nn.Identity) and isinstance(plain.mid_act, nn.Identity)
    assert plain.dw.bias is None and plain.pw.bias is not None  # the block's bias is its output bias
    assert [n for n, _ in BSConvU(4, 6, 3).named_children()] == ["pw", "dw"]
    assert [n for n, _ in BSConvU(4, 6, 3, with_bn=True).named_children()] == ["pw", "bn", "dw"]
    assert [n for n, _ in BSConvS(4, 6, 3).named_children()] == ["pw1", "pw2", "dw"]
    assert [n for n, _ in BSConvS(4, 6, 3, with_bn=True).named_children()] == ["pw1", "bn1", "pw2", "bn2", "dw"]
    for m in (d, BSConvU(4, 6, 3), BSConvS(4, 6, 3)):
        assert all(type(c) in (nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.Identity) for c in m.children())


def test_blocks_expose_conv2d_geometry():
    for block in (DepthwiseSeparableConv2d(5, 7, 3, 2, 1, 2), BSConvU(5, 7, 3, 2, 1, 2), BSConvS(5, 7, 3, 2, 1, 2)):
        assert (block.in_channels, block.out_channels, block.kernel_size, block.stride, block.padding,
                block.dilation, block.padding_mode) == (5, 7, (3, 3), (2, 2), (1, 1), (2, 2), "zeros")


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("cls", [DepthwiseSeparableConv2d, BSConvU, BSConvS])
def test_same_padding_keeps_the_size_at_stride_one_and_is_refused_when_strided(cls):
    x = torch.randn(1, 4, 9, 10)
    for k in (3, 4, (2, 5)):
        assert cls(4, 6, k, padding="same")(x).shape == (1, 6, 9, 10)
    assert cls(4, 6, 3, padding="valid")(x).shape == (1, 6, 7, 8)
    with pytest.raises(ConfigError, match="stride"):
        cls(4, 6, 3, stride=2, padding="same")
    with pytest.raises(ConfigError):
        cls(4, 6, 3, padding="full")
    with pytest.raises(ConfigError):
        cls(0, 6, 3)


def test_bsconv_s_subspace_width_follows_the_reference_formula():
    assert [bsconv_s_mid_channels(m, p) for m, p in [(3, 0.25), (64, 0.25), (64, 1 / 6), (10, 0.0), (7, 1.0)]] \
        == [3, 16, 11, 4, 7]
    assert BSConvS(64, 32, 3, p=0.125, min_mid_channels=2).mid_channels == 8
    for bad in (-0.1, 1.5):
        with pytest.raises(ConfigError):
            BSConvS(8, 8, 3, p=bad)


def test_spatial_conv_factory_builds_each_flavour_and_rejects_unknown_ones():
    types = {k: type(make_spatial_conv(k, 8, 16, 3, 2, 1)) for k in ("regular", "dsc", "bsconv_u", "bsconv_s")}
    assert types == {"regular": nn.Conv2d, "dsc": DepthwiseSeparableConv2d, "bsconv_u": BSConvU, "bsconv_s": BSConvS}
    s = make_spatial_conv("bsconv_s", 64, 16, 3, bsconv_p=0.125)
    assert s.mid_channels == 8 and hasattr(s, "bn1")
    assert not hasattr(make_spatial_conv("bsconv_u", 8, 8, 3), "bn")
    x = torch.randn(2, 8, 8, 8)
    for k in ("regular", "dsc", "bsconv_u", "bsconv_s"):
        assert make_spatial_conv(k, 8, 16, 3, 2, 1)(x).shape == (2, 16, 4, 4)
    with pytest.raises(ConfigError, match="conv kind"):
        make_spatial_conv("separable", 8, 8, 3)
