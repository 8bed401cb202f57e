"""State dicts of the ImageNet models follow torchvision's naming and shapes exactly.

torchvision cannot be installed here, so the expected keys and shapes are written out
independently below, from torchvision's model definitions (``torchvision/models/
resnet.py``, ``mobilenetv2.py``, ``mobilenetv3.py``, ``shufflenetv2.py``): a generator per
family that lists ``name -> shape`` the way torchvision's modules would register them.
The generated dicts also reproduce torchvision's published parameter counts.
"""

import io

import pytest
import torch

from sepconv.models import create_model

Spec = dict[str, tuple[int, ...]]


def _bn(d: Spec, name: str, c: int) -> None:
    for s in ("weight", "bias", "running_mean", "running_var"):
        d[f"{name}.{s}"] = (c,)
    d[f"{name}.num_batches_tracked"] = ()


def _conv(d: Spec, name: str, o: int, i: int, k: int, bias: bool = False) -> None:
    d[f"{name}.weight"] = (o, i, k, k)
    if bias:
        d[f"{name}.bias"] = (o,)


def _linear(d: Spec, name: str, o: int, i: int) -> None:
    d[f"{name}.weight"], d[f"{name}.bias"] = (o, i), (o,)


def tv_resnet(bottleneck: bool, layers: list[int]) -> Spec:
    d: Spec = {}
    _conv(d, "conv1", 64, 3, 7), _bn(d, "bn1", 64)
    inp = 64
    for li, (planes, n) in enumerate(zip((64, 128, 256, 512), layers)):
        out = planes * (4 if bottleneck else 1)
        for b in range(n):
            p = f"layer{li + 1}.{b}"
            if bottleneck:
                _conv(d, f"{p}.conv1", planes, inp, 1), _bn(d, f"{p}.bn1", planes)
                _conv(d, f"{p}.conv2", planes, planes, 3), _bn(d, f"{p}.bn2", planes)
                _conv(d, f"{p}.conv3", out, planes, 1), _bn(d, f"{p}.bn3", out)
            else:
                _conv(d, f"{p}.conv1", planes, inp, 3), _bn(d, f"{p}.bn1", planes)
                _conv(d, f"{p}.conv2", planes, planes, 3), _bn(d, f"{p}.bn2", planes)
            if b == 0 and (li > 0 or inp != out):
                _conv(d, f"{p}.downsample.0", out, inp, 1), _bn(d, f"{p}.downsample.1", out)
            inp = out
    _linear(d, "fc", 1000, inp)
    return d


def tv_mobilenet_v2() -> Spec:
    d: Spec = {}
    _conv(d, "features.0.0", 32, 3, 3), _bn(d, "features.0.1", 32)
    inp, i = 32, 1
    for t, c, n, _ in [[1, 16, 1, 1], [6, 24, 2, 2], [6, 32, 3, 2], [6, 64, 4, 2], [6, 96, 3, 1],
                       [6, 160, 3, 2], [6, 320, 1, 1]]:
        for _ in range(n):
            p, j, hid = f"features.{i}.conv", 0, inp * t
            if t != 1:
                _conv(d, f"{p}.0.0", hid, inp, 1), _bn(d, f"{p}.0.1", hid)
                j = 1
            d[f"{p}.{j}.0.weight"] = (hid, 1, 3, 3)
            _bn(d, f"{p}.{j}.1", hid)
            _conv(d, f"{p}.{j + 1}", c, hid, 1), _bn(d, f"{p}.{j + 2}", c)
            inp, i = c, i + 1
    _conv(d, f"features.{i}.0", 1280, inp, 1), _bn(d, f"features.{i}.1", 1280)
    _linear(d, "classifier.1", 1000, 1280)
    return d


def _div8(v: float) -> int:
    n = max(8, int(v + 4) // 8 * 8)
    return n + 8 if n < 0.9 * v else n


def tv_mobilenet_v3(large: bool) -> Spec:
    # torchvision's bneck_conf rows: input, kernel, expanded, out, use_se
    rows = ([(16, 3, 16, 16, 0), (16, 3, 64, 24, 0), (24, 3, 72, 24, 0), (24, 5, 72, 40, 1), (40, 5, 120, 40, 1),
             (40, 5, 120, 40, 1), (40, 3, 240, 80, 0), (80, 3, 200, 80, 0), (80, 3, 184, 80, 0), (80, 3, 184, 80, 0),
             (80, 3, 480, 112, 1), (112, 3, 672, 112, 1), (112, 5, 672, 160, 1), (160, 5, 960, 160, 1),
             (160, 5, 960, 160, 1)] if large else
            [(16, 3, 16, 16, 1), (16, 3, 72, 24, 0), (24, 3, 88, 24, 0), (24, 5, 96, 40, 1), (40, 5, 240, 40, 1),
             (40, 5, 240, 40, 1), (40, 5, 120, 48, 1), (48, 5, 144, 48, 1), (48, 5, 288, 96, 1), (96, 5, 576, 96, 1),
             (96, 5, 576, 96, 1)])
    d: Spec = {}
    _conv(d, "features.0.0", 16, 3, 3), _bn(d, "features.0.1", 16)
    for i, (inp, k, exp, out, se) in enumerate(rows, start=1):
        p, j = f"features.{i}.block", 0
        if exp != inp:
            _conv(d, f"{p}.0.0", exp, inp, 1), _bn(d, f"{p}.0.1", exp)
            j = 1
        d[f"{p}.{j}.0.weight"] = (exp, 1, k, k)
        _bn(d, f"{p}.{j}.1", exp)
        if se:
            sq = _div8(exp // 4)
            j += 1
            _conv(d, f"{p}.{j}.fc1", sq, exp, 1, bias=True), _conv(d, f"{p}.{j}.fc2", exp, sq, 1, bias=True)
        _conv(d, f"{p}.{j + 1}.0", out, exp, 1), _bn(d, f"{p}.{j + 1}.1", out)
    last_in = rows[-1][3]
    i = len(rows) + 1
    _conv(d, f"features.{i}.0", 6 * last_in, last_in, 1), _bn(d, f"features.{i}.1", 6 * last_in)
    hidden = 1280 if large else 1024
    _linear(d, "classifier.0", hidden, 6 * last_in), _linear(d, "classifier.3", 1000, hidden)
    return d


def tv_shufflenet_v2(channels: list[int]) -> Spec:
    d: Spec = {}
    _conv(d, "conv1.0", channels[0], 3, 3), _bn(d, "conv1.1", channels[0])
    inp = channels[0]
    for s, (n, out) in enumerate(zip((4, 8, 4), channels[1:4]), start=2):
        b = out // 2
        for u in range(n):
            p = f"stage{s}.{u}"
            if u == 0:
                d[f"{p}.branch1.0.weight"] = (inp, 1, 3, 3)
                _bn(d, f"{p}.branch1.1", inp)
                _conv(d, f"{p}.branch1.2", b, inp, 1), _bn(d, f"{p}.branch1.3", b)
            _conv(d, f"{p}.branch2.0", b, inp if u == 0 else b, 1), _bn(d, f"{p}.branch2.1", b)
            d[f"{p}.branch2.3.weight"] = (b, 1, 3, 3)
            _bn(d, f"{p}.branch2.4", b)
            _conv(d, f"{p}.branch2.5", b, b, 1), _bn(d, f"{p}.branch2.6", b)
        inp = out
    _conv(d, "conv5.0", channels[4], inp, 1), _bn(d, "conv5.1", channels[4])
    _linear(d, "fc", 1000, channels[4])
    return d


TORCHVISION = {
    "resnet18": (lambda: tv_resnet(False, [2, 2, 2, 2]), 11_689_512),
    "resnet34": (lambda: tv_resnet(False, [3, 4, 6, 3]), 21_797_672),
    "resnet50": (lambda: tv_resnet(True, [3, 4, 6, 3]), 25_557_032),
    "mobilenet_v2": (tv_mobilenet_v2, 3_504_872),
    "mobilenet_v3_large": (lambda: tv_mobilenet_v3(True), 5_483_032),
    "mobilenet_v3_small": (lambda: tv_mobilenet_v3(False), 2_542_856),
    "shufflenet_v2_x0_5": (lambda: tv_shufflenet_v2([24, 48, 96, 192, 1024]), 1_366_792),
    "shufflenet_v2_x1_0": (lambda: tv_shufflenet_v2([24, 116, 232, 464, 1024]), 2_278_604),
    "shufflenet_v2_x1_5": (lambda: tv_shufflenet_v2([24, 176, 352, 704, 1024]), 3_503_624),
    "shufflenet_v2_x2_0": (lambda: tv_shufflenet_v2([24, 244, 488, 976, 2048]), 7_393_996),
}


@pytest.mark.parametrize("name", sorted(TORCHVISION))
def test_state_dict_keys_and_shapes_are_torchvisions(name):
    make, params = TORCHVISION[name]
    expected = make()
    n_params = sum(torch.Size(s).numel() for k, s in expected.items()
                   if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))
    assert n_params == params  # the written-out spec is torchvision's network
    with torch.device("meta"):
        ours = {k: tuple(v.shape) for k, v in create_model(name).state_dict().items()}
    assert ours == expected
    assert list(ours) == list(expected)  # registration order too


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "mobilenet_v3_small", "shufflenet_v2_x0_5"])
def test_a_torchvision_keyed_checkpoint_reloads_strictly_and_computes_the_same_function(name):
    torch.manual_seed(0)
    src = create_model(name).eval()
    with torch.no_grad():  # non-trivial BN statistics, so that eval mode is a real test
        for m in src.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1), m.running_var.uniform_(0.5, 1.5)
    buf = io.BytesIO()
    torch.save(src.state_dict(), buf)  # what a torchvision checkpoint file holds: a plain state dict
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    assert set(sd) == set(TORCHVISION[name][0]())
    dst = create_model(name).eval()
    dst.load_state_dict(sd, strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(dst(x), src(x), rtol=0, atol=0)


def test_torchvision_spot_keys():
    with torch.device("meta"):
        keys = {n: {k: tuple(v.shape) for k, v in create_model(n).state_dict().items()}
                for n in ("mobilenet_v2", "resnet50", "shufflenet_v2_x1_0", "mobilenet_v3_large")}
    assert keys["mobilenet_v2"]["features.0.0.weight"] == (32, 3, 3, 3)
    assert keys["mobilenet_v2"]["features.18.0.weight"] == (1280, 320, 1, 1)
    assert keys["resnet50"]["layer1.0.conv1.weight"] == (64, 64, 1, 1)
    assert keys["resnet50"]["layer4.0.downsample.0.weight"] == (2048, 1024, 1, 1)
    assert keys["shufflenet_v2_x1_0"]["stage2.0.branch1.0.weight"] == (24, 1, 3, 3)
    assert keys["mobilenet_v3_large"]["features.4.block.2.fc1.weight"] == (24, 72, 1, 1)
    assert keys["mobilenet_v3_large"]["classifier.3.weight"] == (1000, 1280)
