"""Our zoo computes the same functions as the `bsconv` reference zoo where both define a
model: same parameter shapes in the same order and the same outputs once the weights are
copied over (the reference's input BatchNorm ``data_bn`` set to the identity, its 1x1-conv
classifier reshaped into our Linear). And the BSConv-S MobileNet penalty equals the
reference's ``reg_loss`` on the same projection weights."""

import pytest
import torch
from bsconv.pytorch import get_model
from bsconv.pytorch.mobilenet import LinearBottleneck
from torch import nn

from sepconv.layers import orthonormal_penalty, penalty_sources
from sepconv.models import create_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _copy_reference_into_ours(ref: nn.Module, ours: nn.Module) -> None:
    rsd = {k: v for k, v in ref.state_dict().items() if not k.startswith("backbone.data_bn.")}
    osd = ours.state_dict()
    assert len(rsd) == len(osd)
    new = {}
    for (rk, rv), (ok, ov) in zip(rsd.items(), osd.items()):
        assert rv.numel() == ov.numel() and rk.rsplit(".", 1)[-1] == ok.rsplit(".", 1)[-1], (rk, ok)
        assert rv.shape == ov.shape or rk.startswith("classifier."), (rk, ok)
        new[ok] = rv.reshape(ov.shape)
    ours.load_state_dict(new, strict=True)


CASES = [
    # (ours, kwargs, reference name, input size)
    ("resnet20", dict(shortcut="B"), "cifar_resnet20", 32),
    ("resnet20", dict(shortcut="B", conv="bsconv_u"), "cifar_resnet20_bsconvu", 32),
    ("resnet20", dict(shortcut="B", conv="bsconv_s"), "cifar_resnet20_bsconvs_p1d4", 32),
    ("resnet20", dict(shortcut="B", conv="bsconv_s", bsconv_p=1 / 8), "cifar_resnet20_bsconvs_p1d8", 32),
    ("wrn16_4", dict(), "cifar_wrn16_4", 32),
    ("wrn16_2", dict(conv="bsconv_u"), "cifar_wrn16_2_bsconvu", 32),
    ("wrn16_2", dict(conv="bsconv_s"), "cifar_wrn16_2_bsconvs_p1d4", 32),
    ("resnet18", dict(), "resnet18", 64),
    ("resnet18", dict(conv="bsconv_u"), "resnet18_bsconvu", 64),
    ("resnet18", dict(conv="bsconv_s"), "resnet18_bsconvs_p1d4", 64),
    ("cifar_mobilenet_v1", dict(), "cifar_mobilenetv1_w1", 32),
    ("cifar_mobilenet_v1", dict(conv="bsconv_u"), "cifar_mobilenetv1_w1_bsconvu", 32),
    ("cifar_mobilenet_v1", dict(width=0.5, conv="bsconv_u"), "cifar_mobilenetv1_w1d2_bsconvu", 32),
]


@pytest.mark.parametrize("name,kw,ref_name,size", CASES, ids=[c[2] for c in CASES])
def test_same_function_as_the_reference_zoo(name, kw, ref_name, size):
    torch.manual_seed(0)
    ref = get_model(ref_name, num_classes=10).double().eval()
    with torch.no_grad():
        for m in ref.modules():  # non-trivial BN statistics
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1), m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5), m.bias.normal_(0, 0.1)
        bn = ref.backbone.data_bn
        bn.weight.fill_(1), bn.bias.zero_(), bn.running_mean.zero_(), bn.running_var.fill_(1 - bn.eps)
    ours = create_model(name, num_classes=10, **kw).double().eval()
    _copy_reference_into_ours(ref, ours)
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name,ref_name", [("cifar_mobilenet_v2", "cifar_mobilenetv2_w1_bsconvs_p1d6"),
                                           ("cifar_mobilenet_v3_large", "cifar_mobilenetv3_large_w1_bsconvs_p1d6"),
                                           ("cifar_mobilenet_v3_small", "cifar_mobilenetv3_small_w1_bsconvs_p1d6")])
def test_mobilenet_penalty_equals_the_reference_reg_loss(name, ref_name):
    torch.manual_seed(0)
    ref = get_model(ref_name, num_classes=10)
    ours = create_model(name, num_classes=10, conv="bsconv_s")
    ref_proj = [m.conv3.conv for m in ref.modules() if isinstance(m, LinearBottleneck)]
    our_proj = [c for _, c in penalty_sources(ours)]
    assert [c.weight.shape for c in our_proj] == [c.weight.shape for c in ref_proj]
    with torch.no_grad():
        for a, b in zip(our_proj, ref_proj):
            b.weight.copy_(a.weight)
    a, b = orthonormal_penalty(ours, alpha=0.1), ref.reg_loss(alpha=0.1)
    torch.testing.assert_close(a, b)
    a.backward(), b.backward()
    for pa, pb in zip(our_proj, ref_proj):
        torch.testing.assert_close(pa.weight.grad, pb.weight.grad)
