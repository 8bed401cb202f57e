"""The spectral method registry: a bound registered in one place is usable everywhere.

A toy certified bound, ``sqrt(k_h k_w) ||W||_F`` (each kernel tap is a partial permutation of
norm <= 1, so ``||T|| <= sum_a ||K_a|| <= sqrt(k_h k_w) ||W||_F`` for zero padding, any stride,
dilation and groups), is registered by the fixture below and nowhere else; the tests find it in
``spectral_norm``, ``analyze``, ``lipschitz_bound``, ``spectral_normalize``, a saved model's
recipe and the ``sepconv`` command's choices.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

import sepconv.normalize
import sepconv.spectral.network
from sepconv.cli import build_parser, main
from sepconv.errors import ConfigError
from sepconv.io import load_model, save_model
from sepconv.models import create_model
from sepconv.normalize import BoundNorm, spectral_normalize
from sepconv.spectral import (
    ConvSpec,
    analyze,
    get_method,
    lipschitz_bound,
    method_names,
    register_method,
    spectral_norm,
    unregister_method,
)


def toy_bound(weight: torch.Tensor, spec: ConvSpec) -> torch.Tensor:
    kh, kw = weight.shape[-2:]
    return torch.sqrt(weight.pow(2).sum() * (kh * kw))


@pytest.fixture
def toy():
    """The one place the toy bound is registered (and removed again)."""
    register_method("toy", toy_bound, kind="certified", needs_in_size=False, differentiable=True,
                    description="sqrt(kh kw) times the Frobenius norm of the kernel")
    yield "toy"
    unregister_method("toy")


def dense_sigma(weight: torch.Tensor, spec: ConvSpec) -> float:
    return float(torch.linalg.svdvals(spec.dense_operator(weight))[0])


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, stride=2, padding=1),
                         nn.ReLU(), nn.Flatten(), nn.Linear(6 * 4 * 4, 3)).double()


@pytest.mark.parametrize("geometry", [dict(), dict(stride=2), dict(dilation=2, padding=2), dict(groups=2)])
def test_the_toy_bound_is_certified_against_the_dense_operator(toy, geometry):
    torch.manual_seed(1)
    conv = nn.Conv2d(4, 6, 3, **{"padding": 1, **geometry}).double()
    spec = ConvSpec.of(conv, (7, 6))
    value = spectral_norm(conv.weight.detach(), spec, method="toy")
    assert value.dim() == 0 and float(value) >= dense_sigma(conv.weight.detach(), spec) * (1 - 1e-12)
    assert float(value) == pytest.approx(3 * float(conv.weight.detach().norm()), rel=1e-12)


def test_a_registered_method_is_listed_by_every_consumer(toy):
    assert "toy" in method_names() and "toy" in method_names(kind="certified")
    assert "toy" in method_names(differentiable=True) and "toy" not in method_names(kind="exact")
    # the old constants are read from the registry when accessed
    assert "toy" in sepconv.spectral.network.ANALYZE_METHODS and "toy" in sepconv.spectral.network.BOUND_METHODS
    assert "toy" in sepconv.normalize.METHODS and "toy" in sepconv.normalize.FULL_CONV
    entry = get_method("toy")
    assert entry.kind == "certified" and not entry.needs_in_size and entry.options == ()
    assert "toy" not in method_names(kind="estimate")


def test_analyze_and_lipschitz_bound_use_the_registered_bound(toy):
    model = small_model().eval()
    records = analyze(model, (2, 8, 8), methods=["exact", "toy"])
    convs = [r for r in records if r.kind == "Conv2d"]
    assert len(convs) == 2 and all(r.values["toy"] >= r.values["exact"] * (1 - 1e-9) for r in convs)
    L = lipschitz_bound(model, (2, 8, 8), method="toy")
    w = [model[0].weight.detach(), model[2].weight.detach(), model[5].weight.detach()]
    expected = 3 * float(w[0].norm()) * 3 * float(w[1].norm()) * float(torch.linalg.svdvals(w[2])[0])
    assert L == pytest.approx(expected, rel=1e-9)
    assert L >= lipschitz_bound(model, (2, 8, 8), method="upper") * (1 - 1e-9)


@pytest.mark.parametrize("how", ["method", "full_conv"])
def test_spectral_normalize_with_the_toy_bound_keeps_every_layer_within_the_target(toy, how):
    model = small_model()
    kw = dict(method="toy") if how == "method" else dict(method="dsc", full_conv="toy")
    summary = spectral_normalize(model, target=0.5, in_size=(2, 8, 8), **kw)
    assert summary.certified
    model.eval()
    for conv in (model[0], model[2]):
        p = conv.parametrizations.weight[0]
        assert isinstance(p, BoundNorm) and p.method == "toy" and p.certified
        assert float(toy_bound(conv.weight.detach(), None)) <= 0.5 * (1 + 1e-12)


def test_a_model_normalized_with_the_toy_bound_is_saved_and_rebuilt(toy, tmp_path):
    model = create_model("simple_cnn", num_classes=3)
    spectral_normalize(model, method="toy", target=0.5, in_size=(3, 8, 8))
    save_model(model, tmp_path / "m")  # the recipe names the method; loading replays it
    loaded = load_model(tmp_path / "m").eval()
    assert loaded.features[3].parametrizations.weight[0].method == "toy"
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(loaded(x), model.eval()(x))


def test_the_command_line_offers_a_method_registered_at_run_time(toy, capsys):
    parser = build_parser()
    args = parser.parse_args(["spectrum", "simple_cnn", "--method", "exact", "toy", "--bound", "toy"])
    assert args.method == ["exact", "toy"] and args.bound == "toy"
    assert parser.parse_args(["train", "--sn", "toy"]).sn == "toy"
    argv = ["spectrum", "simple_cnn", "--input-size", "8", "8", "--method", "exact", "toy", "--bound", "toy", "--json"]
    assert main(argv) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["bound_method"] == "toy" and doc["lipschitz_bound"] > 0
    assert all(r["values"]["toy"] >= r["values"]["exact"] * (1 - 1e-6) for r in doc["layers"])


def test_after_unregistering_the_command_line_refuses_the_name(capsys):
    register_method("toy", toy_bound, kind="certified", differentiable=True)
    unregister_method("toy")
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["spectrum", "simple_cnn", "--bound", "toy"])
    assert e.value.code == 2 and "invalid choice: 'toy'" in capsys.readouterr().err


def test_a_name_is_registered_once_unless_replaced(toy):
    with pytest.raises(ConfigError, match="already registered"):
        register_method("toy", toy_bound, kind="certified")
    with pytest.raises(ConfigError, match="already registered"):
        register_method("fft", toy_bound, kind="certified")
    order = method_names()
    replaced = register_method("toy", toy_bound, kind="certified", description="again", replace=True)
    assert get_method("toy") is replaced and method_names() == order  # same place in the order
    with pytest.raises(ConfigError, match="kind"):
        register_method("toy2", toy_bound, kind="bound")
    with pytest.raises(ConfigError, match="identifier"):
        register_method("no good", toy_bound, kind="certified")


def test_the_decorator_form_returns_the_function_and_registers_it():
    @register_method("toy_decorated", kind="heuristic", needs_in_size=False)
    def value(weight, spec, scale=1.0):
        return weight.abs().max() * scale

    try:
        assert callable(value) and get_method("toy_decorated").options == ("scale",)
        w = torch.ones(2, 2, 3, 3, dtype=torch.float64)
        assert float(spectral_norm(w, ConvSpec((5, 5), 1, 1), "toy_decorated", scale=2.0)) == 2.0
    finally:
        unregister_method("toy_decorated")


def test_unknown_names_list_the_known_ones(toy):
    w = torch.randn(2, 2, 3, 3, dtype=torch.float64)
    with pytest.raises(ConfigError, match="unknown method 'nope'.*exact.*toy"):
        spectral_norm(w, ConvSpec((5, 5), 1, 1), "nope")
    with pytest.raises(ConfigError, match="unregister_method: unknown method 'nope'"):
        unregister_method("nope")
    with pytest.raises(ConfigError, match="'upper', 'fft', 'gram', 'fantastic4', 'toy'"):
        lipschitz_bound(small_model(), (2, 8, 8), method="power")  # an estimate is no bound
    with pytest.raises(ConfigError, match="choose one of dsc, operator, exact, fft, gram, fantastic4, toy, reshape"):
        spectral_normalize(small_model(), method="power", in_size=(2, 8, 8))
    assert math.isfinite(float(spectral_norm(w, ConvSpec((5, 5), 1, 1), "toy")))
