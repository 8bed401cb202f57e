"""Hostile input to the spectral Python API: every bad argument is one ``SepconvError`` of the right
kind, in one line naming the function, argument or layer -- never a raw torch/LAPACK error, never a
silently wrong value (a NaN tolerance making every test pass, a half weight failing deep inside) --
and memory is estimated before anything is allocated."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from sepconv.errors import ConfigError, ResourceError, SepconvError
from sepconv.models import create_model
from sepconv.spectral import (
    ConvSpec,
    analyze,
    bracket,
    certified_radii,
    circulant_norm,
    depthwise_norm,
    depthwise_norms,
    exact_norm,
    fantastic_four,
    fft_bound,
    gram_iteration,
    lipschitz_bound,
    norm_bracket,
    power_iteration,
    reshape_norm,
    singular_values,
    spectral_norm,
)
from sepconv.spectral.network import layer_inputs

from .conftest import assert_one_line, run_cli, run_sub


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def W(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


SPEC = ConvSpec((8, 8), 1, 1)
CIRC = ConvSpec((8, 8), 1, 1, "circular")
w4 = W(4, 4, 3, 3)


def with_value(value, where=(0, 0, 0, 0)):
    w = w4.clone()
    w[where] = value
    return w


def one_line(e: BaseException) -> str:
    msg = str(e)
    assert "\n" not in msg and msg.strip(), msg
    assert "Traceback" not in msg
    return msg


# ----------------------------------------------------------------------------- arguments of the functions

CASES = {
    # tolerances and iteration counts
    "norm_bracket tol=nan": (
        lambda: norm_bracket(w4, SPEC, tol=float("nan")),
        ConfigError,
        ["norm_bracket", "tol", "nan"],
    ),
    "norm_bracket tol=-1": (lambda: norm_bracket(w4, SPEC, tol=-1), ConfigError, ["norm_bracket", "tol"]),
    "norm_bracket tol=inf": (lambda: norm_bracket(w4, SPEC, tol=math.inf), ConfigError, ["tol", "inf"]),
    "bracket tol=2": (lambda: bracket(w4, SPEC, tol=2.0), ConfigError, ["bracket", "tol < 1"]),
    "exact_norm tol=0": (lambda: exact_norm(w4, SPEC, tol=0), ConfigError, ["exact_norm", "tol"]),
    "fft_bound tol=str": (lambda: fft_bound(w4, SPEC, tol="1e-3"), ConfigError, ["fft_bound", "tol"]),
    "circulant_norm tol=nan": (lambda: circulant_norm(w4, CIRC, tol=math.nan), ConfigError, ["circulant_norm", "tol"]),
    "spectral_norm exact tol=-1": (lambda: spectral_norm(w4, SPEC, "exact", tol=-1e-3), ConfigError, ["tol"]),
    "bracket max_iter=0": (lambda: bracket(w4, ConvSpec((40, 40), 1, 1), max_iter=0), ConfigError, ["max_iter"]),
    "exact_norm max_iter=2.5": (lambda: exact_norm(w4, SPEC, max_iter=2.5), ConfigError, ["max_iter", "2.5"]),
    "norm_bracket max_iter=1e12": (lambda: norm_bracket(w4, SPEC, max_iter=10**12), ConfigError, ["max_iter"]),
    "norm_bracket dense_flops=nan": (
        lambda: norm_bracket(w4, SPEC, dense_flops=math.nan),
        ConfigError,
        ["dense_flops"],
    ),
    "gram_iteration iters=0": (lambda: gram_iteration(w4, SPEC, iters=0), ConfigError, ["gram_iteration", "iters"]),
    "gram_iteration iters=2000": (lambda: gram_iteration(w4, SPEC, iters=2000), ConfigError, ["iters", "2000"]),
    "power_iteration iters=-1": (
        lambda: power_iteration(w4, SPEC, iters=-1),
        ConfigError,
        ["power_iteration", "iters"],
    ),
    "power_iteration x of the wrong shape": (
        lambda: power_iteration(w4, SPEC, x=torch.randn(3, 8, 8)),
        ConfigError,
        ["power_iteration", "x", "(4, 8, 8)"],
    ),
    "power_iteration x NaN": (
        lambda: power_iteration(w4, SPEC, x=torch.full((4, 8, 8), math.nan)),
        ConfigError,
        ["power_iteration", "x", "finite"],
    ),
    "power_iteration x zero": (
        lambda: power_iteration(w4, SPEC, x=torch.zeros(4, 8, 8)),
        ConfigError,
        ["x", "nonzero"],
    ),
    "power_iteration generator=0": (lambda: power_iteration(w4, SPEC, generator=0), ConfigError, ["generator"]),
    "norm_bracket seed=-1": (lambda: norm_bracket(w4, SPEC, seed=-1), ConfigError, ["norm_bracket", "seed"]),
    "singular_values dense_limit=-1": (lambda: singular_values(w4, SPEC, dense_limit=-1), ConfigError, ["dense_limit"]),
    "max_memory=-1": (lambda: exact_norm(w4, SPEC, max_memory=-1), ConfigError, ["max_memory"]),
    # the weight
    "meta weight": (lambda: spectral_norm(w4.to("meta"), SPEC), ConfigError, ["spectral_norm", "weight", "meta"]),
    "complex weight": (
        lambda: norm_bracket(w4.to(torch.complex128), SPEC),
        ConfigError,
        ["norm_bracket", "complex128"],
    ),
    "integer weight": (lambda: fantastic_four(w4.int(), SPEC), ConfigError, ["fantastic_four", "int32"]),
    "bool weight": (lambda: gram_iteration(w4 > 0, SPEC), ConfigError, ["gram_iteration", "bool"]),
    "sparse weight": (lambda: singular_values(w4.to_sparse(), CIRC), ConfigError, ["singular_values", "sparse"]),
    "3-D weight": (lambda: spectral_norm(w4[0], SPEC), ConfigError, ["weight", "4-D", "(4, 3, 3)"]),
    "5-D weight": (lambda: fft_bound(w4[None], SPEC), ConfigError, ["fft_bound", "4-D"]),
    "empty weight": (lambda: exact_norm(w4[:0], SPEC), ConfigError, ["empty"]),
    "a list, not a tensor": (lambda: fantastic_four(w4.tolist(), SPEC), ConfigError, ["fantastic_four", "list"]),
    "channels not divisible by groups": (
        lambda: norm_bracket(w4, ConvSpec((8, 8), 1, 1, groups=3)),
        ConfigError,
        ["norm_bracket", "4 output channels", "groups=3"],
    ),
    "not depthwise": (lambda: depthwise_norm(w4, CIRC), ConfigError, ["depthwise_norm", "not depthwise"]),
    "kernel larger than the input": (
        lambda: spectral_norm(W(2, 2, 11, 11), SPEC),
        ConfigError,
        ["larger than the padded input"],
    ),
    "float32 weight that overflows": (
        lambda: fft_bound(with_value(1e30).float(), SPEC),
        ConfigError,
        ["fft_bound", "overflow", "float32"],
    ),
    "depthwise_norms: lists of unequal length": (
        lambda: depthwise_norms([W(4, 1, 3, 3)], [CIRC, CIRC]),
        ConfigError,
        ["depthwise_norms", "1 weights but 2 specs"],
    ),
    "depthwise_norms: a NaN weight in the list": (
        lambda: depthwise_norms([W(4, 1, 3, 3), W(4, 1, 3, 3) * math.nan], [ConvSpec((8, 8), 1, 1, groups=4)] * 2),
        ConfigError,
        ["depthwise_norms", "weights[1]", "NaN"],
    ),
    "reshape_norm NaN": (lambda: reshape_norm(with_value(math.nan)), ConfigError, ["reshape_norm", "NaN"]),
    "reshape_norm 1-D": (lambda: reshape_norm(torch.ones(3)), ConfigError, ["reshape_norm", "2 dimensions"]),
    # the geometry and the dispatcher
    "spec not a ConvSpec": (lambda: spectral_norm(w4, (8, 8)), ConfigError, ["spectral_norm", "ConvSpec", "tuple"]),
    "unknown method": (lambda: spectral_norm(w4, SPEC, "svd"), ConfigError, ["unknown method", "'svd'"]),
    "keyword the method does not take": (
        lambda: spectral_norm(w4, SPEC, "fft", iters=3),
        ConfigError,
        ["spectral_norm", "'fft'", "'iters'"],
    ),
    "ConvSpec stride 0": (lambda: ConvSpec((8, 8), 0, 1), ConfigError, ["ConvSpec", "stride"]),
    "ConvSpec negative padding": (lambda: ConvSpec((8, 8), 1, -1), ConfigError, ["ConvSpec", "padding"]),
    "ConvSpec dilation 0": (lambda: ConvSpec((8, 8), 1, 1, dilation=0), ConfigError, ["ConvSpec", "dilation"]),
    "ConvSpec in_size 0": (lambda: ConvSpec((0, 8)), ConfigError, ["ConvSpec", "in_size", "positive"]),
    "ConvSpec in_size float": (lambda: ConvSpec((8.5, 8)), ConfigError, ["ConvSpec", "in_size", "8.5"]),
    "ConvSpec in_size None": (lambda: ConvSpec(None), ConfigError, ["ConvSpec", "in_size"]),
    "ConvSpec groups 0": (lambda: ConvSpec((8, 8), groups=0), ConfigError, ["ConvSpec", "groups"]),
    "ConvSpec groups 1.5": (lambda: ConvSpec((8, 8), groups=1.5), ConfigError, ["ConvSpec", "groups", "1.5"]),
    "ConvSpec padding_mode": (
        lambda: ConvSpec((8, 8), padding_mode="mirror"),
        ConfigError,
        ["padding_mode", "'mirror'"],
    ),
    "ConvSpec padding_mode not a string": (
        lambda: ConvSpec((8, 8), padding_mode=["zeros"]),
        ConfigError,
        ["padding_mode"],
    ),
    "ConvSpec padding 1.5": (lambda: ConvSpec((8, 8), 1, 1.5), ConfigError, ["ConvSpec", "padding"]),
    # memory, before anything is allocated
    "dense operator of a large depthwise layer": (
        lambda: ConvSpec((64, 64), 1, 1, groups=32).dense_operator(W(32, 1, 3, 3)),
        ResourceError,
        ["dense operator", "64x64 k3x3 s1 p1 zeros d1 g32", "GiB"],
    ),
    "fft_bound at 100000x100000": (
        lambda: fft_bound(w4, ConvSpec((100_000, 100_000), 1, 1)),
        ResourceError,
        ["fft_bound", "100000x100000", "memory budget"],
    ),
    "gram at 100000x100000": (
        lambda: spectral_norm(w4, ConvSpec((100_000, 100_000), 1, 1), "gram"),
        ResourceError,
        ["gram_iteration", "100000x100000"],
    ),
    "circulant singular values at 30000x30000": (
        lambda: singular_values(w4, ConvSpec((30_000, 30_000), 1, 1, "circular")),
        ResourceError,
        ["singular_values", "30000x30000"],
    ),
    "non-circulant singular values too large": (
        lambda: singular_values(w4, ConvSpec((64, 64), 1, 1)),
        ConfigError,
        ["singular_values", "too large for a dense SVD", "norm_bracket"],
    ),
    "power iteration at 100000x100000": (
        lambda: power_iteration(w4, ConvSpec((100_000, 100_000), 1, 1)),
        ResourceError,
        ["power_iteration", "100000x100000"],
    ),
    "exact_norm under a 1 MiB budget": (
        lambda: exact_norm(w4, ConvSpec((64, 64), 1, 1), max_memory=2**20),
        ResourceError,
        ["64x64 k3x3", "1 MiB"],
    ),
    "depthwise_norms at 100000x100000": (
        lambda: depthwise_norms([W(8, 1, 3, 3)], [ConvSpec((100_000, 100_000), 1, 1, groups=8)]),
        ResourceError,
        ["depthwise_norms", "weights[0]", "100000x100000"],
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_arguments_are_one_clear_error(name):
    call, kind, words = CASES[name]
    with pytest.raises(kind) as info:
        call()
    assert isinstance(info.value, SepconvError)
    msg = one_line(info.value)
    for w in words:
        assert w.lower() in msg.lower(), (w, msg)


NAN_FUNCTIONS = {
    "spectral_norm exact": lambda w: spectral_norm(w, SPEC, "exact"),
    "spectral_norm power": lambda w: spectral_norm(w, SPEC, "power"),
    "norm_bracket": lambda w: norm_bracket(w, SPEC),
    "bracket": lambda w: bracket(w, SPEC),
    "fantastic_four": lambda w: fantastic_four(w, SPEC),
    "gram_iteration": lambda w: gram_iteration(w, SPEC),
    "fft_bound": lambda w: fft_bound(w, SPEC),
    "singular_values": lambda w: singular_values(w, CIRC),
    "circulant_norm": lambda w: circulant_norm(w, CIRC),
}


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("fn", list(NAN_FUNCTIONS))
def test_non_finite_weights_are_refused_by_every_function(fn, value):
    with pytest.raises(ConfigError, match="NaN or Inf") as info:
        NAN_FUNCTIONS[fn](with_value(value, (3, 2, 1, 0)))
    assert fn.split()[0] in one_line(info.value)


# ----------------------------------------------------------------------------- half precision: computed in float32


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("method", ["exact", "fft", "gram", "fantastic4", "power", "reshape"])
def test_half_weights_are_computed_in_float32_and_give_the_float32_answer(dtype, method):
    w = W(6, 4, 3, 3).to(dtype)  # the values the user holds
    ref = w.float()  # the same values in float32: the ground truth of the computation
    kw = {"x": torch.ones(4, 8, 8)} if method == "power" else {}
    got = spectral_norm(w, SPEC, method, **kw)
    want = spectral_norm(ref, SPEC, method, **kw)
    assert got.dtype == torch.float32
    assert math.isclose(float(got), float(want), rel_tol=1e-6)


def test_half_weights_keep_the_bracket_certified_and_every_singular_value():
    w = W(3, 3, 3, 3).half()
    truth = float(torch.linalg.svdvals(SPEC.dense_operator(w.double()))[0])
    lo, up = norm_bracket(w, SPEC, tol=1e-6)
    assert lo.dtype == up.dtype == torch.float32 and float(lo) <= truth <= float(up)
    sv = singular_values(w, CIRC)
    dense = torch.linalg.svdvals(CIRC.dense_operator(w.double()))
    assert sv.dtype == torch.float32
    torch.testing.assert_close(sv.double(), dense, rtol=1e-5, atol=1e-5)


def test_half_weights_pass_gradients_back_to_the_half_parameter():
    conv = nn.Conv2d(4, 4, 3, padding=1).half()
    spec = ConvSpec.of(conv, (8, 8))
    fft_bound(conv.weight, spec).backward()
    assert conv.weight.grad is not None and conv.weight.grad.dtype == torch.float16
    assert bool(torch.isfinite(conv.weight.grad).all()) and float(conv.weight.grad.abs().sum()) > 0


def test_numpy_integers_and_sizes_are_accepted_as_ints():
    spec = ConvSpec(np.array([8, 8]), np.int64(1), np.int32(1), groups=np.int64(1))
    assert (
        spec == SPEC
        and all(type(v) is int for v in spec.in_size + spec.stride + spec.padding)
        and type(spec.groups) is int
    )
    assert float(spectral_norm(w4, spec, "fft")) == float(spectral_norm(w4, SPEC, "fft"))


# ----------------------------------------------------------------------------- models


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    return create_model("resnet20").eval()


def poisoned(attr: str, value=math.nan, model="resnet20"):
    m = create_model(model).eval()
    mod_name, name = attr.rsplit(".", 1)
    with torch.no_grad():
        getattr(m.get_submodule(mod_name), name).view(-1)[0] = value
    return m


def loader(shape=(3, 16, 16), n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, *shape, generator=g), torch.randint(0, 10, (n,), generator=g))]


MODEL_CASES = {
    "lipschitz_bound: wrong channel count": (
        lambda m: lipschitz_bound(m, (5, 16, 16)),
        ConfigError,
        ["lipschitz_bound", "(5, 16, 16)", "'conv1'", "3 input channels, got 5"],
    ),
    "analyze: wrong channel count": (
        lambda m: analyze(m, (1, 16, 16), methods=["fft"]),
        ConfigError,
        ["analyze", "'conv1'", "got 1"],
    ),
    "layer_inputs: wrong channel count": (
        lambda m: layer_inputs(m, (2, 8, 8)),
        ConfigError,
        ["layer_inputs", "'conv1'"],
    ),
    "certified_radii: wrong channel count": (
        lambda m: certified_radii(m, loader((4, 16, 16))),
        ConfigError,
        ["certified_radii", "'conv1'", "got 4"],
    ),
    "certified_radii with a given L: wrong channel count": (
        lambda m: certified_radii(m, loader((4, 16, 16)), lipschitz=2.0),
        ConfigError,
        ["certified_radii", "'conv1'"],
    ),
    "lipschitz_bound: 0x0 input": (
        lambda m: lipschitz_bound(m, (3, 0, 0)),
        ConfigError,
        ["lipschitz_bound", "input_shape"],
    ),
    "lipschitz_bound: 0 channels": (lambda m: lipschitz_bound(m, (0, 8, 8)), ConfigError, ["input_shape", "(0, 8, 8)"]),
    "analyze: negative size": (lambda m: analyze(m, (3, -4, 16)), ConfigError, ["analyze", "input_shape"]),
    "lipschitz_bound: float size": (lambda m: lipschitz_bound(m, (3, 16.5, 16)), ConfigError, ["input_shape", "16.5"]),
    "lipschitz_bound: two dims": (
        lambda m: lipschitz_bound(m, (16, 16)),
        ConfigError,
        ["lipschitz_bound", "input_shape"],
    ),
    "lipschitz_bound: not a shape": (lambda m: lipschitz_bound(m, 16), ConfigError, ["lipschitz_bound", "input_shape"]),
    "analyze: a string shape": (lambda m: analyze(m, "3x16x16"), ConfigError, ["analyze", "input_shape"]),
    "lipschitz_bound: tol nan": (
        lambda m: lipschitz_bound(m, (3, 8, 8), tol=math.nan),
        ConfigError,
        ["lipschitz_bound", "tol"],
    ),
    "lipschitz_bound: unknown method": (
        lambda m: lipschitz_bound(m, (3, 8, 8), method="exact"),
        ConfigError,
        ["lipschitz_bound", "method", "'exact'"],
    ),
    "lipschitz_bound: input_bound inf": (
        lambda m: lipschitz_bound(m, (3, 8, 8), input_bound=math.inf),
        ConfigError,
        ["input_bound"],
    ),
    "analyze: no methods": (lambda m: analyze(m, (3, 8, 8), methods=[]), ConfigError, ["analyze", "methods"]),
    "analyze: tol -1": (lambda m: analyze(m, (3, 8, 8), tol=-1), ConfigError, ["analyze", "tol"]),
    "certified_radii: lipschitz nan": (
        lambda m: certified_radii(m, loader(), lipschitz=math.nan),
        ConfigError,
        ["certified_radii", "lipschitz"],
    ),
    "certified_radii: NaN inputs": (
        lambda m: certified_radii(m, [(torch.full((2, 3, 8, 8), math.nan), torch.zeros(2).long())], lipschitz=1.0),
        ConfigError,
        ["certified_radii", "batch 0", "NaN"],
    ),
    "certified_radii: labels of another length": (
        lambda m: certified_radii(m, [(torch.zeros(2, 3, 8, 8), torch.zeros(3).long())], lipschitz=1.0),
        ConfigError,
        ["batch 0", "2 labels"],
    ),
    "certified_radii: batches of another size": (
        lambda m: certified_radii(m, loader((3, 8, 8)) + loader((3, 12, 12)), method="fft"),
        ConfigError,
        ["certified_radii", "batch 1", "(3, 12, 12)", "(3, 8, 8)"],
    ),
    "certified_radii: not pairs": (
        lambda m: certified_radii(m, [torch.zeros(3, 8, 8)], lipschitz=1.0),
        ConfigError,
        ["certified_radii", "batch 0"],
    ),
    "certified_radii: a number per batch": (
        lambda m: certified_radii(m, [1.0], lipschitz=1.0),
        ConfigError,
        ["certified_radii", "pair"],
    ),
    "certified_radii: empty loader": (lambda m: certified_radii(m, [], lipschitz=1.0), ConfigError, ["no samples"]),
    "lipschitz_bound: not a model": (lambda m: lipschitz_bound(m.state_dict(), (3, 8, 8)), ConfigError, ["nn.Module"]),
    "lipschitz_bound: forward at 30000x30000": (
        lambda m: lipschitz_bound(m, (3, 30_000, 30_000)),
        ResourceError,
        ["lipschitz_bound", "forward pass", "(3, 30000, 30000)", "GiB"],
    ),
    "analyze: forward at 100000x100000": (
        lambda m: analyze(m, (3, 100_000, 100_000)),
        ResourceError,
        ["analyze", "forward pass", "TiB"],
    ),
    "layer_inputs: forward over a 1 MiB budget": (
        lambda m: layer_inputs(m, (3, 64, 64), max_memory=2**20),
        ResourceError,
        ["layer_inputs", "1 MiB"],
    ),
    "analyze: exact at 2000x2000 over the budget": (
        lambda m: analyze(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1)), (3, 2000, 2000), methods=["exact"]),
        ResourceError,
        ["analyze", "layer '0'", "2000x2000 k3x3", "LOBPCG"],
    ),
}


@pytest.mark.parametrize("name", list(MODEL_CASES))
def test_bad_model_inputs_are_one_error_naming_the_input_and_the_layer(name, resnet):
    call, kind, words = MODEL_CASES[name]
    with pytest.raises(kind) as info:
        call(resnet)
    msg = one_line(info.value)
    for w in words:
        assert w.lower() in msg.lower(), (w, msg)


@pytest.mark.parametrize("attr", ["fc.weight", "conv1.weight", "bn1.running_var", "bn1.running_mean",
                                  "layer3.2.bn2.weight", "fc.bias"])
@pytest.mark.parametrize("call", [
    lambda m: lipschitz_bound(m, (3, 8, 8)),
    lambda m: analyze(m, (3, 8, 8), methods=["fft"]),
    lambda m: certified_radii(m, loader((3, 8, 8))),
    lambda m: certified_radii(m, loader((3, 8, 8)), lipschitz=1.0),
], ids=["lipschitz_bound", "analyze", "certified_radii", "certified_radii-given-L"])
def test_non_finite_weights_or_statistics_anywhere_name_the_layer(attr, call):
    with pytest.raises(ConfigError) as info:
        call(poisoned(attr))
    msg = one_line(info.value)
    assert repr(attr.rsplit(".", 1)[0]) in msg and "NaN" in msg


def test_a_negative_running_variance_names_the_batchnorm():
    m = poisoned("bn1.running_var", -1.0)
    with pytest.raises(ConfigError, match=r"'conv1\.bn1'.*running_var \+ eps must be positive"):
        lipschitz_bound(m, (3, 8, 8))


def test_meta_parameters_and_inputs_smaller_than_a_kernel_name_the_layer():
    with torch.device("meta"):
        meta = create_model("resnet20")
    with pytest.raises(ConfigError, match="layer 'conv1' has meta tensors"):
        lipschitz_bound(meta, (3, 8, 8))
    net = nn.Sequential(nn.Conv2d(3, 4, 5), nn.ReLU(), nn.Conv2d(4, 4, 5))
    with pytest.raises(ConfigError, match=r"\(3, 7, 7\) does not fit layer '2' \(Conv2d\)") as info:
        lipschitz_bound(net, (3, 7, 7))
    one_line(info.value)
    with pytest.raises(ConfigError, match=r"does not fit layer '2'"):
        analyze(net, (3, 7, 7), methods=["fft"])


def test_a_valid_batch_shape_still_gives_the_certificate_of_the_given_bound(resnet):
    x, y = loader((3, 8, 8), n=6)[0]
    radii, L = certified_radii(resnet, [(x, y)], lipschitz=3.0)
    top2 = resnet(x).topk(2, dim=1)
    margin = (top2.values[:, 0] - top2.values[:, 1]).double()
    want = torch.where(top2.indices[:, 0] == y, margin / (math.sqrt(2) * 3.0), -math.inf)
    assert L == 3.0 and torch.equal(radii, want)


# ----------------------------------------------------------------------------- the command line


@pytest.mark.parametrize("size", ["100000", "30000"])
def test_spectrum_at_a_huge_input_size_is_one_line_with_the_estimate(capsys, size):
    code, out, err = run_cli(capsys, "spectrum", "resnet20", "--input-size", size, size)
    line = assert_one_line(
        code, err, "forward pass", f"({', '.join(['3', size, size])})", "memory budget", "SEPCONV_MEMORY_LIMIT"
    )
    assert "iB" in line and not out


def test_spectrum_at_a_huge_input_size_in_a_fresh_process():
    r = run_sub("spectrum", "resnet20", "--input-size", "100000", "100000", timeout=120)
    assert_one_line(r.returncode, r.stderr, "forward pass", "TiB", "memory budget")


def test_depthwise_norms_of_half_weights_come_back_in_the_weight_dtype():
    w = W(8, 1, 3, 3).half()
    spec = ConvSpec((8, 8), 1, 1, "circular", groups=8)
    from sepconv.spectral import depthwise_channel_norms

    got = depthwise_channel_norms([w], [spec])[0]
    want = depthwise_channel_norms([w.float()], [spec])[0]
    assert got.dtype == torch.float16 and torch.allclose(got.float(), want, rtol=1e-3)
