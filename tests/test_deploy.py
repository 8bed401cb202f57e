"""sepconv.deploy: BatchNorm folding and the deployable form are exact (float64, every zoo family),
the ONNX export round-trips in ONNX Runtime for every zoo family in regular and separable flavours,
converted and spectrally normalized models, at batch 1 and a dynamic batch; bad input is one
clear error."""

import copy

import onnx
import pytest
import torch
from torch import nn

from sepconv.decompose import convert
from sepconv.deploy import (
    bake_parametrizations,
    deployable,
    export_onnx,
    fold_batchnorm,
    measure_latency,
    relative_error,
)
from sepconv.deploy.export import onnx_session
from sepconv.errors import ConfigError, ExportError, MissingDependencyError, OutputError, UnsupportedLayerError
from sepconv.layers import Branches, BSConvS, BSConvU, DepthwiseSeparableConv2d
from sepconv.models import create_model
from sepconv.models.resnet import ZeroPadShortcut
from sepconv.normalize import spectral_normalize

pytestmark = pytest.mark.usefixtures("one_thread")

# (name, conv flavour, input (C, H, W)); every family, regular and separable flavours; ImageNet
# families at a small input (they are fully convolutional)
ZOO = [
    ("resnet20", "regular", (3, 32, 32)),
    ("resnet20", "dsc", (3, 32, 32)),
    ("resnet20", "bsconv_u", (3, 32, 32)),
    ("resnet20", "bsconv_s", (3, 32, 32)),
    ("resnet18", "regular", (3, 64, 64)),
    ("resnet50", "dsc", (3, 64, 64)),
    ("wrn16_2", "dsc", (3, 32, 32)),
    ("mobilenet_v1", "bsconv_u", (3, 64, 64)),
    ("mobilenet_v2", "regular", (3, 64, 64)),
    ("cifar_mobilenet_v2", "bsconv_s", (3, 32, 32)),
    ("mobilenet_v3_small", "regular", (3, 64, 64)),
    ("shufflenet_v2_x0_5", "regular", (3, 64, 64)),
    ("cifar_shufflenet_v2_x0_5", "dsc", (3, 32, 32)),
    ("simple_cnn", "regular", (3, 32, 32)),
    ("simple_cnn", "bsconv_s", (3, 32, 32)),
    ("lip_sep_cnn", "dsc", (1, 32, 32)),
    ("lip_simple_cnn", "regular", (1, 32, 32)),
]


def _trained_like(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial statistics and affine parameters (fresh ones are the identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) * 2 + 0.2)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    return model.eval()


def _zoo(name: str, conv: str, shape) -> nn.Module:
    kw = dict(in_chans=shape[0], num_classes=10)
    if not name.startswith("lip_"):
        kw["conv"] = conv
    return _trained_like(create_model(name, **kw))


def _bns(model: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _conv_bn_pairs(model: nn.Module, shape) -> int:
    """BatchNorms whose input is exactly the output of a conv or a separable block (found by hooks
    on an eager pass, independently of the fx graph the fold uses)."""
    outs, count = [], [0]  # the outputs themselves are kept: an id() of a freed tensor is reused
    convs = (nn.Conv2d, DepthwiseSeparableConv2d, BSConvU, BSConvS)

    def keep(mod, args, out):
        outs.append(out)

    def check(mod, args):
        count[0] += any(args[0] is o for o in outs)

    hooks = [m.register_forward_hook(keep) for m in model.modules() if isinstance(m, convs)]
    hooks += [m.register_forward_pre_hook(check) for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        model(torch.randn(1, *shape, dtype=next(model.parameters()).dtype))
    for h in hooks:
        h.remove()
    return count[0]


@pytest.mark.parametrize("name,conv,shape", ZOO, ids=[f"{n}-{c}" for n, c, _ in ZOO])
def test_batchnorm_folding_is_exact_on_every_zoo_family(name, conv, shape):
    model = _zoo(name, conv, shape).double()
    pairs = _conv_bn_pairs(model, shape)
    folded = fold_batchnorm(model)
    assert type(folded) is type(model) and _bns(model) >= pairs  # a copy; the model is untouched
    assert _bns(folded) == _bns(model) - pairs  # every BN right after a conv is gone
    x = torch.randn(4, *shape, dtype=torch.float64)
    with torch.no_grad():
        assert _rel(folded(x), model(x)) <= 1e-6
        assert _rel(deployable(model, shape)(x), model(x)) <= 1e-6


def test_folding_reaches_both_convs_of_a_separable_block_with_a_norm_between():
    block = _trained_like(nn.Sequential(
        DepthwiseSeparableConv2d(6, 10, 3, padding=1, bias=False, mid_norm=nn.BatchNorm2d), nn.BatchNorm2d(10)))
    block = block.double()
    folded = fold_batchnorm(block)
    assert _bns(folded) == 0 and folded[0].dw.bias is not None and folded[0].pw.bias is not None
    x = torch.randn(3, 6, 9, 9, dtype=torch.float64)
    with torch.no_grad():
        assert _rel(folded(x), block(x)) <= 1e-12


def test_a_batchnorm_before_a_conv_or_after_a_shared_output_is_left_alone():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.bn0, self.conv2 = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.BatchNorm2d(3), \
                nn.Conv2d(3, 4, 1)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y.mean() + self.conv2(self.bn0(x)).mean()

    model = _trained_like(Shared())
    folded = fold_batchnorm(model)
    assert isinstance(folded.bn, nn.BatchNorm2d) and isinstance(folded.bn0, nn.BatchNorm2d)


def test_baking_keeps_the_normalized_weights_and_leaves_the_original_working():
    model = create_model("simple_cnn", conv="dsc", num_classes=10)
    spectral_normalize(model, method="dsc", in_size=(32, 32))
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = model(x)
        baked = bake_parametrizations(deployable(model, (3, 32, 32)))
        assert not any(hasattr(m, "parametrizations") for m in baked.modules())
        assert _rel(baked(x), want) <= 1e-5
        assert _rel(model(x), want) == 0  # the copy's baking did not reach into the model


def test_deploy_forms_are_the_same_maps():
    short = ZeroPadShortcut(2, 5)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(short.deploy_form((3, 8, 8))(x), short(x))
    block = _trained_like(DepthwiseSeparableConv2d(5, 7, 3, stride=2, padding=1, depth_multiplier=3,
                                                   mid_norm=nn.BatchNorm2d, mid_act=nn.ReLU))
    dep = deployable(block, (5, 11, 11))
    convs = [m for m in dep.modules() if isinstance(m, nn.Conv2d)]
    assert convs[0].groups == convs[0].in_channels == 15  # multiplier 3 -> a multiplier-1 depthwise on 15
    x = torch.randn(2, 5, 11, 11)
    with torch.no_grad():
        assert _rel(dep(x), block(x)) <= 1e-6
    # b blueprints: the grouped dw (b inputs per output) -> a multiplier-1 depthwise on b * out and a slice sum
    bsu = _trained_like(BSConvU(5, 6, 3, stride=2, padding=2, dilation=2, padding_mode="reflect", with_bn=True,
                                blueprints=3))
    dep = deployable(bsu, (5, 11, 11))
    convs = [m for m in dep.modules() if isinstance(m, nn.Conv2d)]
    assert [c.groups for c in convs] == [1, 18] and convs[1].in_channels == 18 and convs[1].padding_mode == "reflect"
    assert not any(isinstance(m, nn.BatchNorm2d) for m in dep.modules())
    with torch.no_grad():
        assert _rel(dep(x), bsu(x)) <= 1e-6
        # in channels_last memory the slice sum adds its slices one by one: the same map, the same layout
        cl = x.contiguous(memory_format=torch.channels_last)
        y = copy.deepcopy(dep).to(memory_format=torch.channels_last)(cl)
        assert _rel(y, bsu(x)) <= 1e-6 and y.is_contiguous(memory_format=torch.channels_last)
    # for ONNX: m (b) branches, each a multiplier-1 depthwise and a pointwise conv, summed
    for mod, parts in ((block, block.depth_multiplier), (bsu, bsu.blueprints)):
        dep = deployable(mod, (5, 11, 11), for_onnx=True)
        branches = next(m for m in dep.modules() if isinstance(m, Branches))
        assert len(branches.branches) == parts
        convs = [m for m in dep.modules() if isinstance(m, nn.Conv2d)]
        assert len(convs) == 2 * parts and all(c.groups in (1, c.in_channels) for c in convs)
        with torch.no_grad():
            assert _rel(dep(x), mod(x)) <= 1e-6


def _depthwise(model: nn.Module) -> int:
    return sum(isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels for m in model.modules())


def _roundtrip(model: nn.Module, shape, tmp_path, **kw):
    path = tmp_path / "m.onnx"
    res = export_onnx(model, path, shape, **kw)
    assert path.is_file() and res.max_error <= 1e-5
    graph = onnx.load(str(path)).graph
    assert sum(n.op_type == "Conv" for n in graph.node) == res.nodes["Conv"]
    # an independent check: a fresh session on the written file, at a batch the export never saw
    sess = onnx_session(path)
    x = torch.randn(kw.get("batch") or 3, *shape)
    with torch.no_grad():
        want = model.eval()(x).numpy()
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    assert relative_error(got, want) <= 1e-5
    return res


@pytest.mark.slow
@pytest.mark.parametrize("name,conv,shape", ZOO, ids=[f"{n}-{c}" for n, c, _ in ZOO])
def test_onnx_export_round_trips_every_zoo_family(name, conv, shape, tmp_path):
    model = _zoo(name, conv, shape)
    res = _roundtrip(model, shape, tmp_path)
    assert [c.batch for c in res.checks] == [2, 1]  # dynamic batch: checked at 2 and at 1
    assert res.depthwise == _depthwise(deployable(model, shape, for_onnx=True))  # depthwise convs stay Conv nodes


@pytest.mark.slow
@pytest.mark.parametrize("how", [dict(to="dsc", rank=1), dict(to="dsc", rank=3), dict(to="bsconv_u", rank=2),
                                 dict(to="bsconv_s", rank=2)], ids=["dsc1", "dsc3", "bsconv_u2", "bsconv_s2"])
def test_onnx_export_round_trips_converted_models(how, tmp_path):
    model = _zoo("resnet20", "regular", (3, 32, 32))
    new, _ = convert(model, input_size=(3, 32, 32), progress=False, **how)
    res = _roundtrip(new, (3, 32, 32), tmp_path, batch=1)
    dep = deployable(new, (3, 32, 32), for_onnx=True)
    assert res.depthwise == _depthwise(dep) and [c.batch for c in res.checks] == [1]
    assert not {"Concat", "ReduceSum"} & set(res.nodes)  # ONNX forms: summed branches, no copies, no slice sums
    assert res.nodes["Conv"] == sum(isinstance(m, nn.Conv2d) for m in dep.modules()) >= 40  # 19 converted, 2+ parts


@pytest.mark.slow
def test_onnx_export_bakes_spectral_normalization(tmp_path):
    model = _zoo("simple_cnn", "dsc", (3, 32, 32))
    spectral_normalize(model, method="dsc", in_size=(32, 32))
    model.eval()
    res = _roundtrip(model, (3, 32, 32), tmp_path, inputs=torch.rand(5, 3, 32, 32))
    assert [c.inputs for c in res.checks] == ["random", "random", "data"]
    nodes = set(res.nodes)
    assert not nodes & {"Svd", "Loop", "ReduceL2", "Sqrt", "DFT"}  # no normalization work left in the graph


def test_export_as_built_keeps_the_grouped_conv_and_forms_export_the_branches(tmp_path):
    block = _trained_like(DepthwiseSeparableConv2d(8, 6, 3, padding=1, depth_multiplier=3)).eval()
    built = export_onnx(block, tmp_path / "built.onnx", (8, 9, 9), forms=False)
    forms = export_onnx(block, tmp_path / "forms.onnx", (8, 9, 9))
    assert built.max_error <= 1e-5 and forms.max_error <= 1e-5  # both verified against torch
    assert built.nodes["Conv"] == 2 and built.depthwise == 1  # the multiplier-3 depthwise conv, one pointwise
    assert "Add" not in built.nodes
    assert forms.nodes["Conv"] == 6 and forms.depthwise == 3 and forms.nodes["Add"] == 2


def test_export_refuses_a_model_it_cannot_capture_and_names_the_module(tmp_path):
    class Branchy(nn.Module):
        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow
                return x * 2
            return x

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Sequential(nn.ReLU(), Branchy()))
    with pytest.raises(UnsupportedLayerError, match=r"1\.1 \(Branchy\)"):
        export_onnx(model, tmp_path / "x.onnx", (3, 8, 8))
    assert not (tmp_path / "x.onnx").exists()


def test_export_writes_nothing_when_the_graph_disagrees(tmp_path):
    with pytest.raises(ExportError, match="relative error"):
        export_onnx(create_model("simple_cnn", num_classes=10), tmp_path / "x.onnx", (3, 16, 16), rtol=1e-15)
    assert list(tmp_path.iterdir()) == []


def test_export_bad_input_is_one_clear_error(tmp_path, monkeypatch):
    model = create_model("simple_cnn", num_classes=10)
    with pytest.raises(ConfigError, match="input_shape"):
        export_onnx(model, tmp_path / "x.onnx", (3, 0, 16))
    with pytest.raises(ConfigError, match="opset"):
        export_onnx(model, tmp_path / "x.onnx", (3, 16, 16), opset=7)
    with pytest.raises(ConfigError, match="batch"):
        export_onnx(model, tmp_path / "x.onnx", (3, 16, 16), batch=0)
    (tmp_path / "file").write_text("")  # a file where a directory should be (chmod means nothing to root)
    with pytest.raises(OutputError, match="cannot write"):
        export_onnx(model, tmp_path / "file" / "x.onnx", (3, 16, 16))
    import sepconv.deploy.export as ex
    real = ex.importlib.import_module

    def no_onnxruntime(name, *a):
        if name == "onnxruntime":
            raise ImportError(name)
        return real(name, *a)

    monkeypatch.setattr(ex.importlib, "import_module", no_onnxruntime)
    with pytest.raises(MissingDependencyError, match=r"sepconv\[deploy\]"):
        export_onnx(model, tmp_path / "x.onnx", (3, 16, 16))


def test_latency_is_measured_in_every_runtime():
    model = create_model("simple_cnn", num_classes=10)
    for runtime in ("torch", "torch-cl", "onnxruntime"):
        lat = measure_latency(model, (3, 16, 16), runtime, batch=2, repeats=3, warmup=1)
        assert lat.n == 3 and 0 < lat.q1 <= lat.median <= lat.q3
    with pytest.raises(ConfigError, match="unknown runtime"):
        measure_latency(model, (3, 16, 16), "tensorrt")
