"""The model zoo: published sizes and FLOPs, every model and flavour runs forward and
backward, what conv= means per family, and clear errors for what makes no sense."""

import pytest
import torch
from torch import nn

from sepconv.errors import ConfigError, ModelError, UnknownModelError
from sepconv.layers import BSConvS, BSConvU, DepthwiseSeparableConv2d, orthonormal_penalty, penalty_sources
from sepconv.models import count_params, create_model, list_models, model_info, profile

# torchvision's published parameter counts and GFLOPS (multiply-adds / 1e9) at 224x224
TORCHVISION = {
    "mobilenet_v2": (3_504_872, 0.301),
    "mobilenet_v3_large": (5_483_032, 0.217),
    "mobilenet_v3_small": (2_542_856, 0.057),
    "resnet18": (11_689_512, 1.814),
    "resnet34": (21_797_672, 3.664),
    "resnet50": (25_557_032, 4.089),
    "shufflenet_v2_x0_5": (1_366_792, 0.040),
    "shufflenet_v2_x1_0": (2_278_604, 0.145),
    "shufflenet_v2_x1_5": (3_503_624, 0.296),
    "shufflenet_v2_x2_0": (7_393_996, 0.583),
}


pytestmark = pytest.mark.usefixtures("one_thread")


def _meta(name, **kw):
    with torch.device("meta"):
        return create_model(name, **kw)


@pytest.mark.parametrize("name", sorted(TORCHVISION))
def test_imagenet_models_have_torchvisions_published_size_and_flops(name):
    params, gflops = TORCHVISION[name]
    m = _meta(name)
    p = profile(m, model_info(name).input_size)
    assert count_params(m) == p.params == params
    assert round(p.macs / 1e9, 3) == gflops


def test_mobilenet_v1_has_the_papers_size_and_mult_adds():
    # Howard et al. 2017, Table 8: 1.0 MobileNet-224 has 4.2 M parameters and 569 M mult-adds
    p = profile(_meta("mobilenet_v1"), (3, 224, 224))
    assert round(p.params / 1e6, 1) == 4.2 and round(p.macs / 1e6) == 569


@pytest.mark.parametrize("name,params", [("resnet20", 0.27), ("resnet32", 0.46), ("resnet44", 0.66),
                                         ("resnet56", 0.85), ("resnet110", 1.7)])
def test_cifar_resnets_have_the_papers_sizes(name, params):
    # He et al. 2016, Table 6 (option A shortcuts, CIFAR-10)
    n = count_params(_meta(name, num_classes=10))
    assert round(n / 1e6, 1 if params == 1.7 else 2) == params


def test_wide_resnets_have_the_papers_sizes():
    # Zagoruyko & Komodakis 2016, Table 3 / Table 4 (CIFAR-10): WRN-28-10 36.5 M, WRN-40-2 2.2 M, WRN-16-8 11.0 M
    assert round(count_params(_meta("wrn28_10", num_classes=10)) / 1e6, 1) == 36.5
    assert round(count_params(_meta("wrn40_2", num_classes=10)) / 1e6, 1) == 2.2
    assert round(count_params(_meta("wrn16_8", num_classes=10)) / 1e6, 1) == 11.0


def _flops_by_hand(model: nn.Module, size) -> int:
    """Multiply-adds of every conv and linear layer, counted from their shapes via hooks."""
    total = 0

    def hook(m, inp, out):
        nonlocal total
        if isinstance(m, nn.Conv2d):
            total += out[0].numel() * m.weight[0].numel()
        else:
            total += m.in_features * m.out_features

    hs = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, *size))
    for h in hs:
        h.remove()
    return total


@pytest.mark.parametrize("name,conv", [("resnet20", "bsconv_s"), ("resnet20", "dsc"),
                                       ("cifar_mobilenet_v3_small", "regular"), ("cifar_shufflenet_v2_x0_5", "dsc")])
def test_profile_counts_every_conv_and_linear_multiply_add(name, conv):
    m = create_model(name, num_classes=10, conv=conv)
    assert profile(m, (3, 32, 32)).macs == _flops_by_hand(m, (3, 32, 32))


# ----------------------------------------------------------------- forward + backward of everything

_BIG = {"wrn16_8", "wrn28_10"}  # 11 M and 36 M parameters: only their regular form


def _cases():
    """Every registered model in every flavour it supports, on small inputs: 32x32 for the
    ImageNet models (1x1 at their last stage), 16x16 for the CIFAR ones."""
    for name in list_models():
        info = model_info(name)
        for conv in ("regular",) if name in _BIG else info.convs:
            yield name, conv, 32 if info.input_size[1] > 32 else 16


@pytest.mark.parametrize("name,conv,size", list(_cases()))
def test_every_model_and_flavour_trains_forward_and_backward(name, conv, size):
    torch.manual_seed(0)
    # the Lipschitz family normalizes its layers at the size it is built for (and its head flattens it)
    kw = dict(image_size=size) if "lipschitz" in model_info(name).tags else {}
    m = create_model(name, num_classes=7, conv=conv, **kw).train()
    x = torch.randn(2, 3, size, size)
    y = m(x)
    assert y.shape == (2, 7) and torch.isfinite(y).all()
    loss = y.logsumexp(1).mean() + orthonormal_penalty(m)
    loss.backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None]
    assert not missing, f"parameters without gradient: {missing[:5]}"


def test_in_chans_and_width_are_honoured():
    m = create_model("cifar_mobilenet_v2", num_classes=10, in_chans=1, width=0.5)
    assert m(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    assert count_params(m) < count_params(create_model("cifar_mobilenet_v2", num_classes=10))
    assert create_model("resnet20", width=2.0, num_classes=10).fc.in_features == 128
    assert create_model("mobilenet_v1", width=0.25).classifier.in_features == 256
    assert create_model("resnet18", in_chans=1).conv1.in_channels == 1


# ----------------------------------------------------------------- what conv= means

def _regular_spatial(m):
    return [n for n, c in m.named_modules()
            if type(c) is nn.Conv2d and c.groups == 1 and max(c.kernel_size) > 1]


@pytest.mark.parametrize("name", ["resnet20", "resnet18", "resnet50", "wrn16_2", "simple_cnn"])
@pytest.mark.parametrize("conv,block", [("dsc", DepthwiseSeparableConv2d), ("bsconv_u", BSConvU),
                                        ("bsconv_s", BSConvS)])
def test_resnet_flavours_replace_every_3x3_conv_and_keep_the_7x7_stem(name, conv, block):
    regular = create_model(name, conv="regular")
    m = create_model(name, conv=conv)
    n3 = sum(1 for c in regular.modules() if isinstance(c, nn.Conv2d) and c.kernel_size == (3, 3))
    assert sum(1 for c in m.modules() if type(c) is block) == n3
    assert _regular_spatial(m) == (["conv1"] if name in ("resnet18", "resnet50") else [])
    if conv == "bsconv_s":
        assert len(penalty_sources(m)) == n3 and all(hasattr(c, "bn1") for c in m.modules() if type(c) is BSConvS)
    else:
        assert penalty_sources(m) == []
    if conv == "bsconv_u":
        assert not any(hasattr(c, "bn") for c in m.modules() if type(c) is BSConvU)


def test_bsconv_p_sets_the_subspace_width_and_applies_only_to_bsconv_s():
    m = create_model("resnet20", conv="bsconv_s", bsconv_p=0.5, num_classes=10)
    assert m.layer3[1].conv1.mid_channels == 32
    assert create_model("resnet20", conv="bsconv_s", num_classes=10).layer3[1].conv1.mid_channels == 16
    with pytest.raises(ConfigError, match="bsconv_p"):
        create_model("resnet20", conv="dsc", bsconv_p=0.5)
    with pytest.raises(ConfigError, match="bsconv_p"):
        create_model("resnet20", conv="bsconv_s", bsconv_p=2.0)


@pytest.mark.parametrize("name,blocks", [("mobilenet_v2", 17), ("cifar_mobilenet_v2", 17),
                                         ("mobilenet_v3_large", 15), ("mobilenet_v3_small", 11)])
def test_bsconv_s_mobilenets_keep_the_architecture_and_penalise_each_projection(name, blocks):
    base, s = create_model(name), create_model(name, conv="bsconv_s")
    assert [(k, v.shape) for k, v in base.state_dict().items()] == [(k, v.shape) for k, v in s.state_dict().items()]
    src = penalty_sources(s)
    assert len(src) == blocks and penalty_sources(base) == []
    for n, conv in src:  # the projection: 1x1, out x mid with mid > out... or the t=1 block
        assert conv.kernel_size == (1, 1) and conv.groups == 1 and n.endswith((".conv.1", ".conv.2", ".block.2.0",
                                                                              ".block.3.0", ".block.1.0"))
    assert orthonormal_penalty(s).item() > 0 and orthonormal_penalty(base).item() == 0


def test_dsc_and_regular_are_the_same_native_mobilenet_and_shufflenet():
    for name in ("mobilenet_v1", "mobilenet_v2", "mobilenet_v3_small", "shufflenet_v2_x0_5"):
        a, b = create_model(name, conv="regular"), create_model(name, conv="dsc")
        assert [(k, v.shape) for k, v in a.state_dict().items()] == [(k, v.shape) for k, v in b.state_dict().items()]


def test_bsconv_u_mobilenet_v1_reorders_each_unit():
    m = create_model("mobilenet_v1", conv="bsconv_u")
    units = [u for u in m.features[1:]]
    assert len(units) == 13 and all(type(u[0]) is BSConvU and u[0].bias is None and not hasattr(u[0], "bn")
                                    for u in units)
    assert _regular_spatial(m) == ["features.0.0"]  # the stem stays
    dsc = create_model("mobilenet_v1")
    # parameters differ only by the removed mid BN; MACs grow ~1.4x (Haase & Amthor 2020, Sect. 4.1)
    mid_bn = sum(2 * u[0].dw.in_channels for u in dsc.features[1:])
    assert count_params(m) == count_params(dsc) - mid_bn + sum(9 * (u[0].pw.out_channels - u[0].dw.in_channels)
                                                               for u in dsc.features[1:])
    # the BSConv README's CIFAR MobileNetV1: 179.34 -> 254.64 MFLOPs (1.42x, counting BN and ReLU too)
    pm, pd = (profile(create_model("cifar_mobilenet_v1", conv=c), (3, 32, 32)).macs for c in ("bsconv_u", "dsc"))
    assert 1.40 < pm / pd < 1.47


def test_mobilenet_v3_uses_torchvisions_batchnorm_settings_and_dropout():
    m = create_model("mobilenet_v3_large")
    bns = [b for b in m.modules() if isinstance(b, nn.BatchNorm2d)]
    assert bns and all(b.eps == 1e-3 and b.momentum == 0.01 for b in bns)
    assert [type(c) for c in m.classifier] == [nn.Linear, nn.Hardswish, nn.Dropout, nn.Linear]
    assert m.classifier[2].p == 0.2 and create_model("mobilenet_v2").classifier[0].p == 0.2
    assert all(b.eps == 1e-5 for b in create_model("mobilenet_v2").modules() if isinstance(b, nn.BatchNorm2d))


def test_cifar_models_downsample_32_to_4():
    for name in ("cifar_mobilenet_v1", "cifar_mobilenet_v2", "cifar_mobilenet_v3_large", "cifar_mobilenet_v3_small",
                 "cifar_shufflenet_v2_x1_0"):
        m = create_model(name, num_classes=10).eval()
        body = m.features if hasattr(m, "features") else nn.Sequential(m.conv1, m.maxpool, m.stage2, m.stage3, m.stage4)
        assert body(torch.zeros(1, 3, 32, 32)).shape[-2:] == (4, 4), name


def test_option_a_and_b_shortcuts():
    a = create_model("resnet20", num_classes=10)
    b = create_model("resnet20", num_classes=10, shortcut="B")
    assert count_params(b) - count_params(a) == (16 * 32 + 2 * 32) + (32 * 64 + 2 * 64)
    x = torch.randn(2, 16, 8, 8)
    y = a.layer2[0].downsample(x)
    assert y.shape == (2, 32, 4, 4) and torch.equal(y[:, :16], x[:, :, ::2, ::2]) and not y[:, 16:].any()


# ----------------------------------------------------------------- errors

@pytest.mark.parametrize("name,conv", [("mobilenet_v1", "bsconv_s"), ("mobilenet_v2", "bsconv_u"),
                                       ("mobilenet_v3_small", "bsconv_u"), ("shufflenet_v2_x1_0", "bsconv_s"),
                                       ("cifar_shufflenet_v2_x1_0", "bsconv_u")])
def test_combinations_that_make_no_sense_are_clear_errors(name, conv):
    with pytest.raises(ModelError, match=f"does not support conv='{conv}'"):
        create_model(name, conv=conv)


def test_bad_options_are_clear_errors():
    with pytest.raises(UnknownModelError, match="did you mean"):
        create_model("resnet21")
    with pytest.raises(ConfigError, match="no option"):
        create_model("resnet20", dropout=0.1)
    with pytest.raises(ConfigError, match="shortcut"):
        create_model("resnet20", shortcut="C")
    with pytest.raises(ConfigError, match="width"):
        create_model("shufflenet_v2_x1_0", width=0.5)
    with pytest.raises(ConfigError, match="head"):
        create_model("mobilenet_v3_small", head="tiny")


def test_create_model_records_its_recipe():
    m = create_model("wrn16_2", num_classes=10, conv="bsconv_s", bsconv_p=0.5, dropout=0.3)
    assert m.sepconv_config["name"] == "wrn16_2"
    assert m.sepconv_config["kwargs"] == dict(num_classes=10, in_chans=3, conv="bsconv_s", width=1.0,
                                              bsconv_p=0.5, dropout=0.3)
    assert m.layer1[0].dropout.p == 0.3


def test_penalty_gradient_reaches_only_the_marked_convs_and_lowers_the_penalty():
    torch.manual_seed(0)
    m = create_model("cifar_mobilenet_v2", num_classes=10, conv="bsconv_s")
    marked = {id(c.weight) for _, c in penalty_sources(m)}
    opt = torch.optim.SGD(m.parameters(), lr=0.01)
    before = orthonormal_penalty(m).item()
    for _ in range(5):
        opt.zero_grad()
        orthonormal_penalty(m).backward()
        assert all((p.grad is not None and p.grad.any()) == (id(p) in marked) for p in m.parameters())
        opt.step()
    assert orthonormal_penalty(m).item() < before
