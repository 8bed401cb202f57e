"""The faster exact form per block (sepconv.deploy.choose_forms): a linear separable block's dense conv
is the same map on every geometry (float64) and is refused where it is not; the choice follows the
paired interval of the measured times (a fake clock makes it deterministic); equal blocks are timed
once; the chosen model computes what the model computes."""

import itertools
import json
import math
import random

import pytest
import torch
from torch import nn

import sepconv.deploy.latency as latency_mod
from sepconv.decompose import convert
from sepconv.deploy import RUNTIMES, Latency, Runtime, choose_forms, latency_ratio
from sepconv.deploy.choose import LEVEL
from sepconv.errors import ConfigError
from sepconv.layers import Branches, BSConvS, BSConvU, ChannelRepeat, DepthwiseSeparableConv2d, GroupSum
from sepconv.models import create_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _randomize(block: nn.Module, seed: int = 0) -> nn.Module:
    """Random biases everywhere a conv has one and trained-like BatchNorm statistics, in float64."""
    g = torch.Generator().manual_seed(seed)
    block = block.double()
    with torch.no_grad():
        for m in block.modules():
            if isinstance(m, nn.Conv2d) and m.bias is not None:
                m.bias.copy_(torch.randn(m.bias.shape, generator=g, dtype=torch.float64))
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g, dtype=torch.float64))
                m.running_var.copy_(torch.rand(m.num_features, generator=g, dtype=torch.float64) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g, dtype=torch.float64))
    return block.eval()


def _folded(block: nn.Module) -> nn.Module:
    from sepconv.deploy import fold_batchnorm
    return fold_batchnorm(block)


GEOMETRIES = [dict(stride=s, padding=p, dilation=d, padding_mode=pm)
              for s, (p, d), pm in itertools.product((1, 2), ((1, 1), (2, 2), (0, 1)), ("zeros", "reflect", "circular"))
              if not (p == 0 and pm != "zeros")]


@pytest.mark.parametrize("geo", GEOMETRIES, ids=lambda g: "-".join(f"{k}{v}" for k, v in g.items()))
def test_dense_form_is_the_same_map_on_every_geometry(geo):
    shape = (4, 9, 10)
    x = torch.randn(3, *shape, dtype=torch.float64)
    blocks = [DepthwiseSeparableConv2d(4, 5, 3, depth_multiplier=2, mid_norm=nn.BatchNorm2d, **geo),  # dw bias
              BSConvU(4, 5, 3, blueprints=3, **geo),
              BSConvS(4, 6, 3, mid_channels=3, blueprints=2, **geo)]
    if geo["padding_mode"] != "zeros" or geo["padding"] == 0:  # an inner bias commutes with these paddings
        blocks.append(BSConvU(4, 5, 3, with_bn=True, blueprints=2, **geo))
    for block in blocks:
        block = _folded(_randomize(block))
        dense = block.dense_form(shape)
        assert isinstance(dense, nn.Conv2d) and dense.groups == 1, type(block).__name__
        with torch.no_grad():
            want = block(x)
            assert (dense(x) - want).abs().max() <= 1e-12 * want.abs().max(), (type(block).__name__, geo)


def test_dense_form_is_refused_where_the_block_is_no_regular_conv():
    shape = (4, 9, 9)
    # a folded BatchNorm's bias before a zero-padded depthwise conv: the border sees 0, not the bias
    bsu = _folded(_randomize(BSConvU(4, 5, 3, padding=1, with_bn=True)))
    assert bsu.dense_form(shape) is None
    # a norm or an activation between the convs
    dsc = _randomize(DepthwiseSeparableConv2d(4, 5, 3, padding=1, mid_act=nn.ReLU))
    assert dsc.dense_form(shape) is None
    assert _randomize(DepthwiseSeparableConv2d(4, 5, 3, padding=1, mid_norm=nn.BatchNorm2d)).dense_form(shape) is None


class _Clock:
    """A fake ``time.perf_counter``: each call of a timed function advances it by that function's cost."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


@pytest.fixture
def fake_runtime(monkeypatch):
    """A runtime 'fake' whose calls cost (on a fake clock) 1 unit per conv, except a dense 3x3 conv:
    ``dense_cost`` units (or ``dense_cost(conv)``) alone, ``dense_in_graph`` units inside a whole model (a
    network with a Linear head), ``copy_cost`` units per input copy or slice sum (eager's deploy forms of
    a multiplier-m DSC and a b-blueprint BSConv-U); +-10 % noise, the same in every function of a round,
    or with ``jitter`` set, independent uniform +-``jitter`` noise per call (seeded: deterministic).
    ``calls`` counts the calls of whole models."""
    clock = _Clock()
    monkeypatch.setattr(latency_mod.time, "perf_counter", clock)
    state = dict(dense_cost=3.0, dense_in_graph=None, builds=[], batches=set(), jitter=None, calls=0, copy_cost=0.0)

    def build(net, x, threads, tmp):
        whole = any(isinstance(m, nn.Linear) for m in net.modules())
        state["builds"].append("model" if whole else "block")
        state["batches"].add(x.shape[0])
        dense_cost = state["dense_in_graph"] if whole and state["dense_in_graph"] else state["dense_cost"]
        cost = 1e-3 * sum((dense_cost(m) if callable(dense_cost) else dense_cost)
                          if m.groups == 1 and m.kernel_size != (1, 1) else 1.0
                          for m in net.modules() if isinstance(m, nn.Conv2d))
        cost += 1e-3 * state["copy_cost"] * sum(isinstance(m, (ChannelRepeat, GroupSum)) for m in net.modules())
        noise = itertools.cycle((0.9, 1.1, 1.0))
        rng = random.Random(len(state["builds"]))

        def call():
            state["calls"] += whole
            clock.now += cost * (1 + rng.uniform(-state["jitter"], state["jitter"]) if state["jitter"] else next(noise))
        return call

    monkeypatch.setitem(RUNTIMES, "fake", Runtime("fake", "a fake clock", build))
    return state


def _converted(rank=1):
    base = create_model("resnet20", num_classes=10)
    return convert(base, input_size=(3, 32, 32), progress=False, to="dsc", rank=rank)[0].eval()


def _dense_3x3(model):
    return sum(isinstance(m, nn.Conv2d) and m.groups == 1 and m.kernel_size == (3, 3) for m in model.modules())


def test_the_choice_follows_the_measured_times_and_equal_blocks_are_timed_once(fake_runtime):
    net = _converted()
    blocks = sorted(n for n, m in net.named_modules() if isinstance(m, DepthwiseSeparableConv2d))
    fake_runtime["dense_cost"] = 3.0  # a DSC (2 convs) costs 2: every block stays separable
    chosen = choose_forms(net, (3, 32, 32), "fake")
    assert [c.name for c in chosen.choices] == blocks and chosen.dense == [] and chosen.plan == "all separable"
    assert all(c.lo > 1.0 for c in chosen.choices)  # decided, not tied
    # ResNet-20 has 19 separable blocks but 6 distinct (form, input shape) pairs, each timed once (2 builds);
    # then the whole model: all separable (= the per-block plan) and all dense
    assert fake_runtime["builds"] == ["block"] * 12 + ["model"] * 2
    assert list(chosen.whole) == ["all separable", "all dense"] and _dense_3x3(chosen.model) == 0
    fake_runtime["dense_cost"] = 1.0  # now the dense conv is faster: every block becomes it
    chosen = choose_forms(net, (3, 32, 32), "fake")
    assert chosen.dense == blocks and chosen.plan == "per block" and "19 of 19" in chosen.summary()
    assert _dense_3x3(chosen.model) == 19 and not any(
        isinstance(m, nn.Conv2d) and m.groups > 1 for m in chosen.model.modules())
    fake_runtime["dense_cost"] = 2.0  # a tie: the interval does not lie below 1, the block stays separable
    assert choose_forms(net, (3, 32, 32), "fake").dense == []


def test_the_whole_model_overrules_blocks_timed_alone(fake_runtime):
    net = _converted()
    fake_runtime.update(dense_cost=3.0, dense_in_graph=1.0)  # slower alone, faster in the graph
    chosen = choose_forms(net, (3, 32, 32), "fake")
    assert all(c.hi > 1.0 for c in chosen.choices)  # alone, every dense conv was slower
    assert chosen.plan == "all dense" and len(chosen.dense) == 19 and _dense_3x3(chosen.model) == 19
    assert chosen.whole["all dense"].median < chosen.whole["all separable"].median
    assert "(all dense; whole model: all separable" in chosen.summary()


@pytest.mark.parametrize("to", ["dsc", "bsconv_u"])
def test_eager_blocks_of_rank_above_1_may_run_as_their_summed_branches(fake_runtime, to):
    base = create_model("resnet20", num_classes=10)
    net = convert(base, input_size=(3, 32, 32), progress=False, to=to, rank=2)[0].eval()
    # eager's deploy form: 2 convs and a copy or slice sum (2 + 3); the 2 branches: 4 convs; dense: 6
    fake_runtime.update(dense_cost=6.0, copy_cost=3.0)
    chosen = choose_forms(net, (3, 32, 32), "fake")
    assert len(chosen.branches) == 19 and chosen.dense == [] and chosen.plan == "per block"
    assert all(c.form == "branches" and c.branches.median < c.separable.median for c in chosen.choices)
    assert sum(isinstance(m, Branches) for m in chosen.model.modules()) == 19
    assert not any(isinstance(m, (ChannelRepeat, GroupSum)) for m in chosen.model.modules())
    assert "19 as summed branches" in chosen.summary()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = net(x)
        assert (chosen.model(x) - want).abs().max() <= 1e-5 * want.abs().max()
    # branches dearer than the copies (4 > 2 + 1): the deploy form stays; dense cheaper than both: dense
    fake_runtime.update(copy_cost=1.0)
    assert choose_forms(net, (3, 32, 32), "fake").branches == []
    fake_runtime.update(dense_cost=2.5)
    chosen = choose_forms(net, (3, 32, 32), "fake")
    assert len(chosen.dense) == 19 and chosen.branches == []


def test_a_whole_model_comparison_left_open_is_timed_again_until_it_decides(fake_runtime):
    net = _converted()
    # alone every dense conv is slower (blocks stay separable); in the graph all dense is 3 % faster, under
    # +-10 % independent noise per call: 20 rounds leave the interval open, the longer looks decide
    fake_runtime.update(dense_cost=3.0, dense_in_graph=1.94, jitter=0.1)
    chosen = choose_forms(net, (3, 32, 32), "fake")
    first = chosen.whole["all separable"].n
    assert first == 20 and latency_ratio(chosen.whole["all dense"], chosen.whole["all separable"],
                                         level=LEVEL).held is None
    assert chosen.plan == "all dense" and len(chosen.dense) == 19
    assert fake_runtime["calls"] > 2 * first and fake_runtime["builds"].count("model") == 2  # timed again, not rebuilt
    # a true tie stays open through all the looks (20 + 40 + 80 rounds of the two plans): the blocks stay separable
    fake_runtime.update(dense_in_graph=2.0, calls=0)
    chosen = choose_forms(net, (3, 32, 32), "fake")
    assert chosen.plan == "all separable" and chosen.dense == []
    assert fake_runtime["calls"] == 2 * (20 + 40 + 80) + 2 * (2 + 1 + 1)  # rounds and warm-ups of the three looks


def test_chosen_forms_compute_what_the_model_computes():
    net = _converted(rank=2)
    x = torch.randn(2, 3, 32, 32)
    chosen = choose_forms(net, (3, 32, 32), "torch", repeats=5)
    assert len(chosen.choices) == 19
    with torch.no_grad():
        want = net(x)
        assert (chosen.model(x) - want).abs().max() <= 1e-5 * want.abs().max()
    with pytest.raises(ConfigError, match="unknown runtime"):
        choose_forms(net, (3, 32, 32), "tensorrt")
    with pytest.raises(ConfigError, match="batch must be a positive integer"):
        choose_forms(net, (3, 32, 32), "torch", batch=0)


def test_convert_where_faster_converts_only_the_layers_that_gain(fake_runtime, tmp_path, capsys):
    from sepconv.cli import main
    from sepconv.io import load_model, save_model

    # a dense conv costs in_channels / 16 units, its DSC 2: features.0 (3 in) and .3 (16 in) run faster dense,
    # .6 (32 in) ties, .9 (64 in) runs faster separable
    fake_runtime["dense_cost"] = lambda conv: conv.in_channels / 16
    original, out = create_model("simple_cnn", num_classes=10), tmp_path / "cv"
    save_model(original, tmp_path / "trained")
    argv = ["convert", str(tmp_path / "trained"), "--input-size", "16", "16", "--rank", "2",
            "--where-faster", "fake", "--out", str(out), "--no-progress", "--json"]
    assert main(argv) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["where_faster"]["kept_regular"] == ["features.0", "features.3"]
    assert [r["name"] for r in doc["layers"]] == ["features.6", "features.9"]
    assert {r["rank"] for r in doc["layers"]} == {2}
    model = load_model(out / "model")
    for name in ("features.0", "features.3"):  # the trained weights, exactly
        assert torch.equal(model.get_submodule(name).weight, original.get_submodule(name).weight)
    assert all(isinstance(model.get_submodule(n), DepthwiseSeparableConv2d) for n in ("features.6", "features.9"))
    # at the batch asked, and --latency measures there too
    fake_runtime["batches"].clear()
    assert main(argv[:-3] + [str(tmp_path / "cv3"), "--deploy-batch", "3", "--latency", "fake", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["where_faster"]["batch"] == 3 and doc["latency"][0]["batch"] == 3 and fake_runtime["batches"] == {3}
    fake_runtime["dense_cost"] = 0.5  # every layer faster dense: nothing converted, no model written
    assert main(argv[:-4] + ["--out", str(tmp_path / "none"), "--no-progress"]) == 0
    assert "nothing converted" in capsys.readouterr().out and not (tmp_path / "none" / "model").exists()
    assert json.loads((tmp_path / "none" / "report.json").read_text())["converted"] == []


def test_latency_ratio_pairs_the_rounds():
    # a is 0.8x b in every round although both drift 4x over the rounds: paired, the interval is tight
    b = Latency.of([0.001 * k for k in (1, 2, 3, 4)])
    a = Latency.of([0.0008 * k for k in (1, 2, 3, 4)])
    c = latency_ratio(a, b)
    assert c.held and abs(c.mean - math.log(0.8)) < 1e-12 and c.hi < 0
    assert latency_ratio(b, a).held is False and latency_ratio(a, b, "no_greater").held
