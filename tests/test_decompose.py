"""Converting regular convs into separable ones (sepconv.decompose): exactness at full rank,
the closed-form truncation error, data-driven fits against data-free ones, ranks, FLOPs,
save/load, and bad input."""

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from sepconv.decompose import (
    blueprint_factors,
    blueprint_spectrum,
    channel_factors,
    channel_spectrum,
    convert,
    convert_layer,
    dense_weight,
    depthwise_factors,
    depthwise_spectrum,
    extract_patches,
    full_rank,
    sample_patches,
    subspace_factors,
)
from sepconv.errors import ConfigError, DataError, UnsupportedLayerError
from sepconv.io import load_model, save_model
from sepconv.layers import (
    BSConvS,
    BSConvU,
    DepthwiseSeparableConv2d,
    compose_blueprint,
    compose_depthwise_separable,
    orthonormality_defect,
)
from sepconv.models import create_model, profile

SETTINGS = settings(max_examples=30, deadline=None)
TARGETS = ("dsc", "bsconv_u", "bsconv_s", "channel")


pytestmark = pytest.mark.usefixtures("one_thread")


def _rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


@st.composite
def geometries(draw):
    k = draw(st.sampled_from([2, 3, 5, (3, 1), (1, 3), (2, 3), (3, 5)]))
    kh, kw = (k, k) if isinstance(k, int) else k
    mode = draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]))
    dilation = draw(st.sampled_from([1, 2, (1, 2), (2, 1)]))
    max_pad = min(kh, kw) // 2 if mode != "zeros" else 2
    return dict(in_channels=draw(st.integers(1, 7)), out_channels=draw(st.integers(1, 7)), kernel_size=k,
                stride=draw(st.sampled_from([1, 2, 3, (1, 2), (3, 1)])), padding=draw(st.integers(0, max_pad)),
                dilation=dilation, bias=draw(st.booleans()), padding_mode=mode)


def _conv(g, seed=0):
    torch.manual_seed(seed)
    return nn.Conv2d(**g).double()


# ----------------------------------------------------------------- exactness at full rank


@SETTINGS
@given(g=geometries(), to=st.sampled_from(TARGETS), seed=st.integers(0, 10_000))
def test_full_rank_conversion_reproduces_the_conv_for_any_geometry(g, to, seed):
    conv = _conv(g, seed)
    r = full_rank(to, conv)
    mid = min(conv.out_channels * r, conv.in_channels) if to == "bsconv_s" else None
    block = convert_layer(conv, to, r, mid)
    x = torch.randn(2, g["in_channels"], 11, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        assert _rel(block(x), conv(x)) <= 1e-6
        assert _rel(dense_weight(to, block), conv.weight) <= 1e-9


def test_products_are_the_existing_blocks_with_geometry_on_the_spatial_part_and_bias_last():
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=2, padding_mode="reflect", bias=True)
    dsc = convert_layer(conv, "dsc", 2)
    assert isinstance(dsc, DepthwiseSeparableConv2d) and dsc.depth_multiplier == 2
    assert dsc.dw.stride == (2, 2) and dsc.dw.dilation == (2, 2) and dsc.dw.padding_mode == "reflect"
    assert dsc.dw.bias is None and dsc.pw.bias is not None
    bu = convert_layer(conv, "bsconv_u", 2)
    assert isinstance(bu, BSConvU) and bu.blueprints == 2 and bu.pw.bias is None and bu.dw.bias is not None
    assert bu.dw.groups == 6 and bu.dw.stride == (2, 2)
    bs = convert_layer(conv, "bsconv_s", 1, mid=4)
    assert isinstance(bs, BSConvS) and bs.mid_channels == 4
    assert float(orthonormality_defect(bs.pw1.weight.detach())) < 1e-5  # orthonormal rows: the penalty starts at 0
    ch = convert_layer(conv, "channel", 5)
    assert isinstance(ch, nn.Sequential) and ch[0].out_channels == 5 and ch[0].stride == (2, 2)
    assert ch[0].bias is None and ch[1].bias is not None


@pytest.mark.parametrize("to", TARGETS)
def test_full_rank_convert_reproduces_whole_model_outputs(to):
    torch.manual_seed(0)
    for model, shape in [(create_model("simple_cnn", in_chans=2, num_classes=5), (2, 16, 16)),
                         (create_model("resnet20", in_chans=1, num_classes=3, width=0.5), (1, 12, 12))]:
        model = model.double().eval()
        for m in model.modules():  # non-trivial BN statistics
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2)
        new, rep = convert(model, to=to, rank="full", input_size=shape)
        x = torch.randn(3, *shape, dtype=torch.float64)
        with torch.no_grad():
            assert _rel(new.eval()(x), model(x)) <= 1e-6
        assert all(r["output_error"] <= 1e-6 for r in rep.layers)
        n_eligible = sum(1 for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1))
        assert rep.totals["layers"] == n_eligible


def test_convert_does_not_mutate_the_input_model():
    model = create_model("simple_cnn", in_chans=1, num_classes=4)
    before = copy.deepcopy(model.state_dict())
    recipe = list(model.sepconv_config["recipe"])
    model.train()
    new, _ = convert(model, to="dsc", rank=1, data=torch.randn(8, 1, 16, 16), method="gsvd", max_patches=256)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.sepconv_config["recipe"] == recipe and model.training
    assert any(isinstance(m, DepthwiseSeparableConv2d) for m in new.modules())
    assert not any(isinstance(m, DepthwiseSeparableConv2d) for m in model.modules())


# ----------------------------------------------------------------- truncation error in closed form


@pytest.mark.parametrize("seed", [0, 1])
def test_rank_r_weight_error_is_the_sum_of_discarded_squared_singular_values(seed):
    torch.manual_seed(seed)
    w = torch.randn(6, 5, 3, 3, dtype=torch.float64)
    for r in (1, 2, 4):
        dw, pw = depthwise_factors(w, r)
        s = depthwise_spectrum(w)
        err = (w - compose_depthwise_separable(dw, pw, 5)).pow(2).sum()
        assert torch.allclose(err, s[:, r:].pow(2).sum(), rtol=1e-10)
        pw, dwb = blueprint_factors(w, r)
        s = blueprint_spectrum(w)
        err = (w - compose_blueprint(pw, dwb)).pow(2).sum()
        assert torch.allclose(err, s[:, r:].pow(2).sum(), rtol=1e-10)
        first, second = channel_factors(w, r)
        s = channel_spectrum(w)
        approx = (second[:, :, 0, 0] @ first.reshape(r, -1)).reshape_as(w)
        assert torch.allclose((w - approx).pow(2).sum(), s[r:].pow(2).sum(), rtol=1e-10)
        # and against an independent SVD of the first input channel's slice
        sv = torch.linalg.svdvals(w[:, 0].reshape(6, 9))
        assert torch.allclose(depthwise_spectrum(w)[0], sv)


def test_subspace_factors_are_orthonormal_and_optimal():
    torch.manual_seed(0)
    pw = torch.randn(12, 7, 1, 1, dtype=torch.float64)
    for m in (2, 7):
        pw1, pw2 = subspace_factors(pw, m)
        w1 = pw1[:, :, 0, 0]
        assert torch.allclose(w1 @ w1.T, torch.eye(m, dtype=torch.float64), atol=1e-10)
        s = torch.linalg.svdvals(pw[:, :, 0, 0])
        err = (pw[:, :, 0, 0] - pw2[:, :, 0, 0] @ w1).pow(2).sum()
        assert torch.allclose(err, s[m:].pow(2).sum(), atol=1e-10)


def test_patches_match_the_conv_for_every_padding_mode():
    for mode in ("zeros", "reflect", "replicate", "circular"):
        conv = nn.Conv2d(3, 4, (3, 2), stride=(2, 1), padding=1, dilation=(1, 2), padding_mode=mode).double()
        x = torch.randn(2, 3, 9, 10, dtype=torch.float64)
        pt = extract_patches(x, conv.kernel_size, conv.stride, conv._reversed_padding_repeated_twice,
                             conv.dilation, mode)
        y = (conv.weight.reshape(4, -1) @ pt + conv.bias[:, None]).reshape(conv(x).shape)
        assert torch.allclose(y, conv(x))
        idx = torch.randperm(pt.shape[0] * pt.shape[2])[:17]
        rows = sample_patches(x, conv.kernel_size, conv.stride, conv._reversed_padding_repeated_twice,
                              conv.dilation, mode, idx)
        assert torch.equal(rows, pt.transpose(1, 2).reshape(-1, pt.shape[1])[idx])


# ----------------------------------------------------------------- data-driven fits on real activations


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A simple CNN trained one epoch on the bundled digits (real activations), and calibration data."""
    from sepconv.data import load_dataset
    from sepconv.train import TrainConfig, train

    out = tmp_path_factory.mktemp("trained")
    res = train(TrainConfig(model="simple_cnn", data="digits", image_size=16, epochs=1, batch_size=64,
                            out=str(out / "run")), progress=False)
    calib = load_dataset("digits", split="train", image_size=16)
    return res.model.eval(), calib, out


@pytest.mark.parametrize("to,rank", [("dsc", 1), ("bsconv_u", 1), ("channel", 6), ("dsc", 2)])
def test_data_driven_fit_is_no_worse_than_data_free_on_every_layer(trained, to, rank):
    model, calib, _ = trained
    kw = dict(to=to, rank=rank, data=calib, num_samples=256, max_patches=2048)
    _, free = convert(model, method="svd", **kw)
    _, single = convert(model, method="gsvd", multilayer=False, **kw)
    _, multi = convert(model, method="gsvd", multilayer=True, **kw)
    for f, s in zip(free.layers, single.layers):
        assert s["local_error"] <= f["local_error"] * (1 + 1e-4) + 1e-7, (to, f["name"], s, f)
    for f, m in zip(free.layers, multi.layers):  # in the converted networks, against the original's outputs
        assert m["output_error"] <= f["output_error"] * (1 + 1e-4) + 1e-7, (to, f["name"], m, f)
    assert multi.totals["mean_output_error"] < free.totals["mean_output_error"]
    assert multi.totals["error_on"] == "calibration"


def test_converted_model_saves_reloads_and_fine_tunes(trained, tmp_path):
    from sepconv.train import TrainConfig, train

    model, calib, _ = trained
    new, rep = convert(model, to="dsc", rank=1, method="gsvd", data=calib, num_samples=64, max_patches=512)
    save_model(new, tmp_path / "m")
    back = load_model(tmp_path / "m")
    x = calib.get_batch(torch.arange(8))[0]
    with torch.no_grad():
        assert torch.equal(back.eval()(x), new.eval()(x))
    res = train(TrainConfig(init=str(tmp_path / "m"), data="digits", image_size=16, epochs=1, batch_size=64,
                            lr=0.01, out=str(tmp_path / "ft")), progress=False)
    assert res.history and any(isinstance(m, DepthwiseSeparableConv2d) for m in res.model.modules())
    assert (tmp_path / "ft" / "model" / "config.json").is_file()


@pytest.mark.parametrize("to,kw", [("bsconv_u", dict(rank=2)), ("bsconv_s", dict(rank=1, p=0.5)),
                                   ("channel", dict(speedup=3.0)), ("dsc", dict(energy=0.8))])
def test_save_load_round_trip_rebuilds_per_layer_structure(tmp_path, to, kw):
    torch.manual_seed(0)
    model = create_model("resnet20", in_chans=3, num_classes=3, width=0.5)
    new, rep = convert(model, to=to, input_size=(3, 12, 12), **kw)
    save_model(new, tmp_path / "m")
    back = load_model(tmp_path / "m")
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        assert torch.equal(back.eval()(x), new.eval()(x))
    assert [r["rank"] for r in rep.layers] == [s["rank"] for s in back.sepconv_config["recipe"][-1]["layers"]]


# ----------------------------------------------------------------- ranks and costs


def test_reported_flops_and_params_match_the_profiler():
    torch.manual_seed(0)
    model = create_model("resnet20", in_chans=3, num_classes=3, width=0.5)
    for to, kw in [("dsc", dict(rank=2)), ("bsconv_u", dict(rank=1)), ("bsconv_s", dict(rank=2)),
                   ("channel", dict(rank=4))]:
        new, rep = convert(model, to=to, input_size=(3, 12, 12), **kw)
        t = rep.totals
        assert t["flops_before"] == profile(model, (3, 12, 12)).flops
        assert t["flops_after"] == profile(new, (3, 12, 12)).flops, to
        assert t["params_after"] == profile(new, (3, 12, 12)).params, to
        assert t["flops_before"] - t["flops_after"] == t["layer_flops_before"] - t["layer_flops_after"], to
        assert t["params_before"] - t["params_after"] == t["layer_params_before"] - t["layer_params_after"], to


def test_energy_picks_the_smallest_rank_reaching_it_and_one_means_exact():
    torch.manual_seed(0)
    model = create_model("simple_cnn", in_chans=1, num_classes=3)
    _, rep = convert(model, to="dsc", energy=1.0, input_size=(1, 16, 16))
    assert all(r["output_error"] < 1e-5 for r in rep.layers)
    _, rep = convert(model, to="bsconv_u", energy=0.6, input_size=(1, 16, 16))
    for r, m in zip(rep.layers, [m for m in model.modules() if isinstance(m, nn.Conv2d)]):
        s2 = blueprint_spectrum(m.weight.detach()).pow(2)
        frac = (s2.cumsum(-1) / s2.sum(-1, keepdim=True)).mean(0)
        assert frac[r["rank"] - 1] >= 0.6 - 1e-9 and (r["rank"] == 1 or frac[r["rank"] - 2] < 0.6)
        assert abs(r["energy"] - float(frac[r["rank"] - 1])) < 1e-9


@pytest.mark.parametrize("to", ["dsc", "channel", "bsconv_u"])
def test_speedup_keeps_the_converted_layers_within_the_flop_budget(to):
    model = create_model("resnet20", in_chans=3, num_classes=10)
    _, rep = convert(model, to=to, speedup=4.0, input_size=(3, 32, 32))
    t = rep.totals
    assert t["layer_flops_after"] <= t["layer_flops_before"] / 4.0
    if to == "channel":  # fine-grained ranks: close to the budget
        assert t["layer_flops_after"] >= 0.9 * t["layer_flops_before"] / 4.0


def test_layers_argument_selects_convs():
    model = create_model("simple_cnn", in_chans=1, num_classes=3)
    _, rep = convert(model, layers=["features.3"], input_size=(1, 16, 16))
    assert [r["name"] for r in rep.layers] == ["features.3"]
    _, rep = convert(model, layers=lambda n, m: m.out_channels >= 64, input_size=(1, 16, 16))
    assert [r["name"] for r in rep.layers] == ["features.6", "features.9"]


def test_report_serialises_and_tabulates():
    import json

    model = create_model("simple_cnn", in_chans=1, num_classes=3)
    _, rep = convert(model, to="bsconv_s", rank=1, input_size=(1, 16, 16))
    d = json.loads(json.dumps(rep.to_dict()))
    assert set(d["totals"]) >= {"params_before", "params_after", "flops_before", "flops_after",
                                "mean_output_error", "seconds"}
    assert {"name", "shape", "rank", "weight_error", "output_error", "seconds"} <= set(d["layers"][0])
    assert d["totals"]["error_on"] == "random"
    assert "features.0" in rep.table() and "mean output error" in rep.table()


# ----------------------------------------------------------------- bad input


@pytest.mark.parametrize("kw,exc,words", [
    (dict(rank=0), ConfigError, ["rank"]),
    (dict(rank=10), ConfigError, ["features.0", "full rank is 9"]),
    (dict(rank=True), ConfigError, ["rank"]),
    (dict(energy=0.0), ConfigError, ["energy", "(0, 1]"]),
    (dict(energy=1.5), ConfigError, ["energy"]),
    (dict(speedup=0.5), ConfigError, ["speedup"]),
    (dict(rank=1, energy=0.9), ConfigError, ["exactly one"]),
    (dict(method="gsvd"), ConfigError, ["data"]),
    (dict(method="nope"), ConfigError, ["method"]),
    (dict(to="cp"), ConfigError, ["cp"]),
    (dict(method="gsvd", data=torch.randn(4, 3, 16, 16)), DataError, ["calibration"]),
    (dict(method="gsvd", data=torch.randn(4, 16, 16)), DataError, ["(N, C, H, W)"]),
    (dict(layers=["nope"]), UnsupportedLayerError, ["nope"]),
])
def test_bad_input_gives_a_clear_error(kw, exc, words):
    model = create_model("simple_cnn", in_chans=1, num_classes=3)
    with pytest.raises(exc) as e:
        convert(model, **({"input_size": (1, 16, 16)} | kw))
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_a_model_without_eligible_convs_is_refused():
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 3, groups=8), nn.Flatten(), nn.LazyLinear(2))
    with pytest.raises(UnsupportedLayerError, match="no eligible"):
        convert(model, input_size=(3, 8, 8))


@pytest.mark.parametrize("to", TARGETS)
def test_data_driven_fit_at_full_rank_is_exact_too(to):
    torch.manual_seed(0)
    model = create_model("simple_cnn", in_chans=2, num_classes=4, channels=(4, 6, 8)).double().eval()
    x = torch.randn(16, 2, 12, 12, dtype=torch.float64)
    new, rep = convert(model, to=to, rank="full", method="gsvd", data=x, max_patches=1024)
    with torch.no_grad():
        assert _rel(new.eval()(x), model(x)) <= 1e-5
    assert all(r["output_error"] <= 1e-5 for r in rep.layers)


def test_blueprint_fit_survives_degenerate_filters_and_rank_deficient_patches():
    """Dead filters (all zero) and patches that span only a few directions make the alternating
    least-squares systems singular; the fit must still return finite factors no worse than the SVD."""
    from sepconv.decompose.factor import _ridge_solve, blueprint_factors, patch_moments, response_error

    torch.manual_seed(0)
    n, c, k = 6, 4, 3
    w = torch.randn(n, c, k, k, dtype=torch.float64)
    w[2] = 0.0
    w[4] *= 1e-150
    basis = torch.randn(3, c * k * k, dtype=torch.float64)
    px = torch.randn(500, 3, dtype=torch.float64) @ basis  # rank-3 patches in 36 dimensions
    mom = patch_moments(px)
    from sepconv.layers import compose_blueprint

    for r in (1, 2, 4):
        pw, dw = blueprint_factors(w, r, mom)
        assert torch.isfinite(pw).all() and torch.isfinite(dw).all()
        fit = response_error(w, compose_blueprint(pw, dw), mom)
        free = response_error(w, compose_blueprint(*blueprint_factors(w, r)), mom)
        energy = response_error(w, torch.zeros_like(w), mom)
        assert fit <= free * (1 + 1e-9) + 1e-12 * energy  # at full rank both are rounding-level
    h = torch.stack([torch.eye(2, dtype=torch.float64), torch.full((2, 2), float("nan"), dtype=torch.float64)])
    x = _ridge_solve(h, torch.ones(2, 2, 1, dtype=torch.float64))
    assert torch.allclose(x[0], torch.ones(2, 1, dtype=torch.float64), atol=1e-6) and torch.isnan(x[1]).all()
