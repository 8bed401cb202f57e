"""Conversion targets are objects in one registry: a toy target registered in one place (the
fixture below) converts exactly through ``convert``, survives ``save_model`` / ``load_model``
(the recipe replays it) and is offered by ``sepconv convert --to``; every target's cost model
matches the blocks it builds; duplicates and unknown names are clear errors."""

import json

import pytest
import torch
from torch import nn

from sepconv.cli import main
from sepconv.decompose import (
    ConversionTarget,
    convert,
    convert_layer,
    get_target,
    register_target,
    target_names,
    unregister_target,
)
from sepconv.decompose.targets import conv_out_size, factory_kwargs, spatial_kwargs
from sepconv.errors import ConfigError, WeightsError
from sepconv.io import load_model, save_model
from sepconv.models import count_params, create_model, profile

pytestmark = pytest.mark.usefixtures("one_thread")

TOY = "toy_pw_first"


class PointwiseFirst(ConversionTarget):
    """A toy target: a 1x1 conv ``c -> r`` (no bias), then the k x k conv ``r -> n`` with the
    conv's geometry and bias, so ``W[o, i] = sum_j W2[o, j] P[j, i]``: the ``c x (n K)`` matrix of
    the input-channel slices is ``P^T W2``, fitted by its truncated SVD; exact at ``r = min(c, n K)``."""

    name = TOY

    @staticmethod
    def _matrix(weight):
        return weight.detach().to(torch.float64).transpose(0, 1).reshape(weight.shape[1], -1)

    def build(self, conv, rank, mid=None):
        return nn.Sequential(nn.Conv2d(conv.in_channels, rank, 1, bias=False, **factory_kwargs(conv)),
                             nn.Conv2d(rank, conv.out_channels, **spatial_kwargs(conv)))

    def fit(self, block, weight, rank, mid, mom):
        if mom is not None:
            raise ConfigError(f"{TOY}: data-free fits only")
        n, c, kh, kw = weight.shape
        u, s, vh = torch.linalg.svd(self._matrix(weight), full_matrices=False)
        block[0].weight.copy_(u[:, :rank].T.reshape(rank, c, 1, 1))
        block[1].weight.copy_((s[:rank, None] * vh[:rank]).reshape(rank, n, kh, kw).transpose(0, 1))

    def dense_weight(self, block):
        return torch.einsum("ojhw,ji->oihw", block[1].weight, block[0].weight[:, :, 0, 0])

    def output_bias(self, block):
        return block[1].bias

    def full_rank(self, conv):
        return min(conv.in_channels, conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1])

    def spectrum(self, conv):
        return torch.linalg.svdvals(self._matrix(conv.weight))[None]

    def params(self, conv, rank, mid=None):
        k = conv.kernel_size[0] * conv.kernel_size[1]
        bias = conv.out_channels if conv.bias is not None else 0
        return conv.in_channels * rank + rank * conv.out_channels * k + bias

    def macs(self, conv, in_hw, rank, mid=None):
        k = conv.kernel_size[0] * conv.kernel_size[1]
        ho, wo = conv_out_size(conv, in_hw)
        return conv.in_channels * rank * in_hw[0] * in_hw[1] + rank * conv.out_channels * k * ho * wo


@pytest.fixture
def toy():
    """The one place the toy target is registered; removed again after the test."""
    target = register_target(PointwiseFirst())
    yield target
    if TOY in target_names():
        unregister_target(TOY)


def _rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def _model(dtype=torch.float64):
    torch.manual_seed(0)
    model = create_model("simple_cnn", in_chans=2, num_classes=5, channels=(4, 6, 8)).to(dtype).eval()
    for m in model.modules():  # non-trivial biases and BatchNorm statistics
        if isinstance(m, nn.Conv2d) and m.bias is not None:
            m.bias.data.uniform_(-0.5, 0.5)
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2)
    return model


def test_a_registered_target_converts_a_model_exactly_at_full_rank(toy):
    model = _model()
    new, rep = convert(model, to=TOY, rank="full", input_size=(2, 12, 12))
    x = torch.randn(3, 2, 12, 12, dtype=torch.float64)
    with torch.no_grad():
        assert _rel(new.eval()(x), model(x)) <= 1e-10
    eligible = [nm for nm, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1)]
    assert rep.settings["to"] == TOY and [r["name"] for r in rep.layers] == eligible and eligible
    assert all(r["weight_error"] <= 1e-12 and r["output_error"] <= 1e-10 for r in rep.layers)
    assert all(type(new.get_submodule(nm)) is nn.Sequential for nm in eligible)
    # the report counts with the target's cost model, which the profiler confirms
    assert rep.totals["flops_after"] == profile(new, (2, 12, 12)).flops
    assert rep.totals["params_after"] == count_params(new)
    # and a truncated rank is ranked by the target's spectrum
    _, rep = convert(model, to=TOY, energy=0.5, input_size=(2, 12, 12))
    assert all(1 <= r["rank"] <= toy.full_rank(model.get_submodule(r["name"])) for r in rep.layers)


def test_a_registered_target_survives_save_and_load(toy, tmp_path):
    model = _model(torch.float32)  # saved models load in float32
    new, _ = convert(model, to=TOY, rank=1)
    save_model(new, tmp_path / "m")
    back = load_model(tmp_path / "m")
    x = torch.randn(2, 2, 12, 12)
    with torch.no_grad():
        assert torch.equal(back.eval()(x), new.eval()(x))
    assert back.sepconv_config["recipe"][-1]["to"] == TOY
    unregister_target(TOY)  # without the target the recipe cannot be replayed: a clear error, no guess
    with pytest.raises(WeightsError, match=TOY):
        load_model(tmp_path / "m")


def test_sepconv_convert_offers_and_runs_a_registered_target(toy, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:  # the --to choices are read from the registry when the parser is built
        main(["convert", "--help"])
    assert e.value.code == 0 and TOY in capsys.readouterr().out
    out = tmp_path / "cv"
    code = main(["convert", "simple_cnn", "--to", TOY, "--rank", "full", "--input-size", "16", "16", "--json",
                 "--no-progress", "--out", str(out)])
    cap = capsys.readouterr()
    assert code == 0, cap.err
    doc = json.loads(cap.out)
    assert doc["settings"]["to"] == TOY and doc["totals"]["mean_output_error"] < 1e-4
    model = load_model(out / "model")
    assert sum(isinstance(m, nn.Sequential) for m in model.modules()) >= len(doc["layers"])


def test_an_unregistered_target_is_not_a_cli_choice(capsys, tmp_path):
    assert TOY not in target_names()
    with pytest.raises(SystemExit) as e:
        main(["convert", "simple_cnn", "--to", TOY, "--out", str(tmp_path / "cv")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--to" in err and TOY in err


def test_duplicate_registration_is_refused(toy):
    with pytest.raises(ConfigError, match="already registered"):
        register_target(PointwiseFirst())
    with pytest.raises(ConfigError, match="already registered"):
        register_target(type("Again", (PointwiseFirst,), {"name": "dsc"})())
    with pytest.raises(ConfigError, match="identifier"):
        register_target(type("Nameless", (PointwiseFirst,), {"name": ""})())
    assert get_target(TOY) is toy and get_target("dsc").name == "dsc"


def test_an_unknown_target_lists_the_known_ones(toy):
    for call in (lambda: get_target("cp"), lambda: convert(_model(), to="cp"),
                 lambda: convert_layer(nn.Conv2d(2, 3, 3), to="cp")):
        with pytest.raises(ConfigError) as e:
            call()
        assert "'cp'" in str(e.value) and all(name in str(e.value) for name in target_names())
    assert set(target_names()) == {"dsc", "bsconv_u", "bsconv_s", "channel", TOY}


@pytest.mark.parametrize("geometry", [dict(kernel_size=3, padding=1), dict(kernel_size=(3, 5), stride=2, padding=2,
                                                                           dilation=(1, 2), bias=False)])
def test_every_targets_cost_model_matches_the_block_it_builds(toy, geometry):
    conv = nn.Conv2d(5, 7, **geometry).double()
    for name in target_names():
        target = get_target(name)
        for rank in sorted({1, target.full_rank(conv)}):
            mid = target.mid_channels(conv, rank, None)
            block = convert_layer(conv, name, rank, mid)
            assert target.params(conv, rank, mid) == count_params(block), (name, rank)
            assert 2 * target.macs(conv, (11, 13), rank, mid) == profile(block, (5, 11, 13)).flops, (name, rank)
            exact = rank == target.full_rank(conv)
            assert _rel(target.dense_weight(block).detach(), conv.weight.detach()) <= (1e-12 if exact else 1)
