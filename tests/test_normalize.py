"""Spectral normalization (sepconv.normalize) and Lipschitz training.

Ground truth is independent of the code under test: the dense operator matrix of the
*effective* (parametrized) weight and its SVD in float64 (per channel for depthwise layers,
whose operator is block-diagonal), or the exact circulant norm for pointwise layers.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from sepconv.errors import ConfigError, UnsupportedLayerError
from sepconv.io import load_model, load_state_dict, save_model
from sepconv.models import create_model
from sepconv.normalize import (
    BatchNormLipschitz,
    BoundNorm,
    DepthwiseFFTNorm,
    MatrixNorm,
    OperatorNorm,
    ReshapeNorm,
    remove_spectral_normalization,
    rescale,
    spectral_normalize,
)
from sepconv.spectral import ConvSpec, batchnorm_lipschitz, fantastic_four, spectral_norm
from sepconv.spectral.network import layer_inputs
from sepconv.train import TrainConfig, train

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
TOL = 1e-3


pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------- ground truth


def dense_norm(weight: torch.Tensor, spec: ConvSpec) -> float:
    """Largest singular value of the explicit operator matrix, float64; block-diagonal groups
    (depthwise layers) are solved per group."""
    w = weight.detach().to(torch.float64)
    ks = spec.check(w)
    taps = spec.spatial_taps(ks)  # (kh*kw, P, Q)
    g = spec.groups
    c_out, ci = w.shape[:2]
    blocks = torch.einsum("goia,apq->gopiq", w.reshape(g, c_out // g, ci, -1), taps)
    blocks = blocks.reshape(g, (c_out // g) * taps.shape[1], ci * taps.shape[2])
    return float(torch.linalg.matrix_norm(blocks, ord=2).max())


def effective(mod: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return mod.weight.detach().clone()


def _depthwise(c, m, k, stride, dilation, mode, scale=3.0, seed=0):
    torch.manual_seed(seed)
    conv = nn.Conv2d(c, c * m, k, stride, padding=dilation * (k - 1) // 2, dilation=dilation, groups=c,
                     bias=False, padding_mode=mode)
    with torch.no_grad():
        conv.weight.mul_(scale)
    return conv


DW_GEOMETRIES = [  # (C, multiplier, k, stride, dilation, padding mode, n)
    (3, 1, 3, 1, 1, "zeros", 8),
    (4, 1, 3, 2, 1, "zeros", 8),
    (3, 2, 3, 1, 2, "zeros", 9),
    (4, 1, 3, 1, 1, "circular", 8),
    (2, 2, 5, 2, 1, "circular", 8),
    (3, 1, 3, 2, 1, "zeros", 7),
]


# --------------------------------------------------------------------------- parametrizations


@pytest.mark.parametrize("geom", DW_GEOMETRIES, ids=lambda g: "-".join(map(str, g)))
@pytest.mark.parametrize("mode", ["clip", "scale"])
@pytest.mark.parametrize("per_channel", [False, True])
def test_depthwise_fft_norm_is_certified_and_scale_hits_the_target(geom, mode, per_channel):
    c, m, k, s, d, pm, n = geom
    conv = _depthwise(c, m, k, s, d, pm)
    model = nn.Sequential(conv)
    summary = spectral_normalize(model, "dsc", target=0.7, mode=mode, in_size=(c, n, n), per_channel=per_channel)
    assert [r.parametrization for r in summary.layers] == ["DepthwiseFFTNorm"] and summary.certified
    spec = ConvSpec.of(conv, (n, n))
    for training in (True, False):
        model.train(training)
        w = effective(conv)
        true = dense_norm(w, spec)
        assert true <= 0.7 * (1 + TOL)
        if mode == "scale" and pm == "circular":  # exact: the target is hit
            assert true == pytest.approx(0.7, rel=1e-5)
            if per_channel:  # every channel at the target
                for ch in range(c):
                    one = ConvSpec(spec.in_size, spec.stride, spec.padding, spec.padding_mode, spec.dilation, 1)
                    assert dense_norm(w[ch * m:(ch + 1) * m], one) == pytest.approx(0.7, rel=1e-5)


@pytest.mark.parametrize("kind", ["pointwise", "grouped_pointwise", "strided_pointwise", "linear"])
@pytest.mark.parametrize("mode", ["clip", "scale"])
def test_matrix_norm_is_exact_in_eval_and_converges_in_training(kind, mode):
    torch.manual_seed(1)
    layer = {"pointwise": nn.Conv2d(6, 10, 1, bias=False), "grouped_pointwise": nn.Conv2d(6, 8, 1, groups=2),
             "strided_pointwise": nn.Conv2d(5, 7, 1, stride=2), "linear": nn.Linear(9, 4)}[kind]
    with torch.no_grad():
        layer.weight.mul_(5)
    model = nn.Sequential(layer)
    channels = layer.weight.shape[1] * getattr(layer, "groups", 1)
    spectral_normalize(model, "dsc", target=2.0, mode=mode, in_size=(channels, 6, 6))
    assert isinstance(layer.parametrizations.weight[0], MatrixNorm)
    model.eval()
    w = effective(layer)
    if kind == "linear":
        true = float(torch.linalg.matrix_norm(w.double(), 2))
    else:
        true = dense_norm(w, ConvSpec.of(layer, (6, 6)))
    assert true <= 2.0 * (1 + 1e-6)
    assert true == pytest.approx(2.0, rel=1e-6)  # both modes: the weights were far above the target
    model.train()
    for _ in range(30):
        w_train = effective(layer)
    est = float(torch.linalg.matrix_norm(w_train.double().reshape(w_train.shape[0], -1), 2)) \
        if kind != "grouped_pointwise" \
        else dense_norm(w_train, ConvSpec.of(layer, (6, 6)))
    assert est == pytest.approx(2.0, rel=1e-3)


def test_fused_matrix_gradient_equals_autograd_of_the_formula():
    torch.manual_seed(2)
    for mode in ("clip", "scale"):
        for shape in [(6, 4, 1, 1), (5, 7), (3, 2, 3, 3)]:
            W = (3 * torch.randn(*shape, dtype=torch.float64)).requires_grad_()
            matrix = len(shape) < 4 or shape[-1] == 1
            p = MatrixNorm(W.detach(), 1.0, mode) if matrix else ReshapeNorm(W.detach(), 1.0, mode)
            p.train()
            u0 = p.u.clone()
            g = torch.randn(shape, dtype=torch.float64)
            (p(W) * g).sum().backward()
            fused = W.grad.clone()
            W.grad = None
            p.u.copy_(u0)
            (rescale(W, p.sigma(W), 1.0, mode) * g).sum().backward()  # plain autograd through u^T W v
            torch.testing.assert_close(fused, W.grad, rtol=1e-10, atol=1e-12)


FULL_GEOMETRIES = [  # (c_in, c_out, k, stride, dilation, groups, padding mode, n)
    (3, 4, 3, 1, 1, 1, "zeros", 6),
    (4, 4, 3, 2, 1, 2, "zeros", 7),
    (2, 3, 3, 1, 2, 1, "circular", 8),
    (3, 5, 2, 2, 1, 1, "zeros", 6),
]


def _full(c_in, c_out, k, s, d, g, pm, n, scale=2.0, seed=0):
    torch.manual_seed(seed)
    conv = nn.Conv2d(c_in, c_out, k, s, padding=d * (k - 1) // 2, dilation=d, groups=g, bias=False, padding_mode=pm)
    with torch.no_grad():
        conv.weight.mul_(scale)
    return conv


@pytest.mark.parametrize("geom", FULL_GEOMETRIES, ids=lambda g: "-".join(map(str, g)))
@pytest.mark.parametrize("method", ["fantastic4", "gram"])
def test_certified_bounds_keep_every_geometry_below_the_target(geom, method):
    conv = _full(*geom)
    n = geom[-1]
    model = nn.Sequential(conv)
    summary = spectral_normalize(model, method, target=1.0, in_size=(geom[0], n, n))
    assert isinstance(conv.parametrizations.weight[0], BoundNorm) and summary.certified
    spec = ConvSpec.of(conv, (n, n))
    for training in (True, False):
        model.train(training)
        assert dense_norm(effective(conv), spec) <= 1 + TOL


@pytest.mark.parametrize("geom", FULL_GEOMETRIES, ids=lambda g: "-".join(map(str, g)))
def test_operator_power_iteration_is_an_estimate_that_converges_to_the_target(geom):
    conv = _full(*geom)
    n = geom[-1]
    model = nn.Sequential(conv)
    summary = spectral_normalize(model, "operator", target=1.0, in_size=(geom[0], n, n), n_power_iterations=3)
    assert isinstance(conv.parametrizations.weight[0], OperatorNorm)
    assert not summary.certified and "not certified" in str(summary)
    model.train()
    for _ in range(40):
        effective(conv)
    model.eval()
    true = dense_norm(effective(conv), ConvSpec.of(conv, (n, n)))
    # an estimate from below of the true norm: the normalized layer sits at or slightly above 1
    assert 1 - 1e-6 <= true <= 1.02


@pytest.mark.parametrize("method", ["dsc", "operator", "fantastic4", "gram", "reshape"])
def test_clip_leaves_an_already_small_layer_unchanged(method):
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1, groups=3), nn.Conv2d(3, 6, 1), nn.Conv2d(6, 4, 3, padding=1),
                          nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 8 * 8, 5))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1e-2)
        model[3].weight.fill_(1e-3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    spectral_normalize(model, method, target=1.0, in_size=(3, 8, 8), batchnorm=True)
    for training in (True, False):
        model.train(training)
        for i, key in [(0, "0.weight"), (1, "1.weight"), (2, "2.weight"), (3, "3.weight"), (5, "5.weight")]:
            assert torch.equal(effective(model[i]), before[key]), (method, key, training)


def test_batchnorm_control_bounds_the_eval_lipschitz_constant_per_channel():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4))
    bn = model[1]
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([3.0, -0.1, 0.5, -4.0]))
        bn.running_var.copy_(torch.tensor([1.0, 1.0, 4.0, 0.25]))
    spectral_normalize(model, "fantastic4", target=1.0, in_size=(2, 6, 6), batchnorm=True)
    assert isinstance(bn.parametrizations.weight[0], BatchNormLipschitz)
    model.eval()
    slopes = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach()
    assert float(batchnorm_lipschitz(bn)) <= 1 + 1e-6
    # clipped channels sit at the target, the small one (-0.1) is untouched, signs are kept
    assert slopes[0] == pytest.approx(1.0, rel=1e-6) and slopes[3] == pytest.approx(-1.0, rel=1e-6)
    assert bn.weight[1].item() == pytest.approx(-0.1) and bn.weight[2].item() == pytest.approx(0.5)


def test_reshape_pitfall_a_normalized_depthwise_layer_exceeds_the_target():
    conv = nn.Conv2d(2, 2, 3, padding=1, groups=2, bias=False, padding_mode="circular")
    with torch.no_grad():
        conv.weight.fill_(1.0)  # true norm 9 (the kernel sum); reshape norm sqrt(18)
    model = nn.Sequential(conv)
    summary = spectral_normalize(model, "reshape", in_size=(2, 8, 8))
    assert isinstance(conv.parametrizations.weight[0], ReshapeNorm) and not summary.certified
    model.eval()
    assert dense_norm(effective(conv), ConvSpec.of(conv, (8, 8))) == pytest.approx(9 / math.sqrt(18), rel=1e-5)


def test_dsc_with_full_conv_fft_certifies_the_stem_and_the_recipe_round_trips(tmp_path):
    torch.manual_seed(8)
    model = create_model("cifar_mobilenet_v2", num_classes=10, in_chans=1, width=0.25)
    with torch.no_grad():
        model.features[0][0].weight.mul_(3.0)  # the stem above the target
    summary = spectral_normalize(model, "dsc", in_size=(1, 8, 8), full_conv="fft")
    stem = model.features[0][0]
    p = stem.parametrizations.weight[0]
    assert isinstance(p, BoundNorm) and p.method == "fft" and summary.certified
    with pytest.warns(DeprecationWarning, match="BoundNorm.method"):  # the old name keeps working
        assert p.bound == "fft"
    model.eval()
    true = dense_norm(effective(stem), ConvSpec.of(stem, (8, 8)))
    assert 0.9 < true <= 1 + 1e-5
    save_model(model, tmp_path / "m")
    assert isinstance(load_model(tmp_path / "m").features[0][0].parametrizations.weight[0], BoundNorm)
    # the default stays the operator power iteration (an estimate: the summary says not certified)
    fresh = create_model("cifar_mobilenet_v2", num_classes=10, in_chans=1, width=0.25)
    assert not spectral_normalize(fresh, "dsc", in_size=(1, 8, 8)).certified
    assert isinstance(fresh.features[0][0].parametrizations.weight[0], OperatorNorm)


def test_batched_depthwise_norms_equal_per_layer_norms_with_the_same_gradients():
    torch.manual_seed(5)
    model = create_model("cifar_mobilenet_v2", num_classes=10, in_chans=1, width=0.25)
    spectral_normalize(model, "dsc", in_size=(1, 16, 16), full_conv="fantastic4")
    dws = [m for m in model.modules() if parametrize.is_parametrized(m, "weight")
           and isinstance(m.parametrizations.weight[0], DepthwiseFFTNorm)]
    assert len(dws) == 17
    group = model._sepconv_dw_group
    x = torch.randn(2, 1, 16, 16)
    model.train()
    seen = []
    hooks = [m.register_forward_hook(lambda mod, i, o: seen.append(mod.weight)) for m in dws]
    model(x)  # inside the model's forward: one batched call for all 17 layers
    for h in hooks:
        h.remove()
    batched = torch.stack([w.sum() for w in seen]).sum()
    batched.backward()
    g_batched = [m.parametrizations.weight.original.grad.clone() for m in dws]
    model.zero_grad()
    assert not group.active
    alone = torch.stack([m.weight.sum() for m in dws]).sum()  # outside: each layer alone
    alone.backward()
    torch.testing.assert_close(batched, alone)
    for a, b in zip(g_batched, [m.parametrizations.weight.original.grad for m in dws]):
        torch.testing.assert_close(a, b)
    # the cache follows the weights: after an in-place update the next forward sees new norms
    p0 = dws[0].parametrizations.weight
    with torch.no_grad():
        p0.original.mul_(3.0)
        seen.clear()
        hooks = [m.register_forward_hook(lambda mod, i, o: seen.append(mod.weight)) for m in dws[:1]]
        model(x)
        for h in hooks:
            h.remove()
        spec = p0[0].spec
        alone = rescale(p0.original, spectral_norm(p0.original, spec, "fft"), 1.0, "clip")
    torch.testing.assert_close(seen[0], alone)
    assert float(spectral_norm(seen[0].double(), spec, "fft")) <= 1 + 1e-6


# --------------------------------------------------------------------------- MobileNetV2 acceptance


@pytest.fixture(scope="module")
def trained_dsc(tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("dsc")
    res = train(TrainConfig(model="cifar_mobilenet_v2", width=0.25, data="digits", image_size=16, batch_size=64,
                            epochs=1, lr=0.05, sn="dsc", out=str(out)), progress=False)
    return res.model, out


def _dw_pw(model, shape):
    for name, (mod, inp) in layer_inputs(model, shape, types=(nn.Conv2d,)).items():
        depthwise = mod.groups == mod.in_channels and mod.in_channels > 1
        kind = "dw" if depthwise else "pw" if mod.kernel_size == (1, 1) else "full"
        yield name, kind, mod, ConvSpec.of(mod, inp[-2:])


def test_after_training_mobilenet_v2_with_dsc_every_dw_and_pw_conv_has_exact_norm_at_most_1(trained_dsc):
    model, _ = trained_dsc
    model.eval()
    kinds = {"dw": 0, "pw": 0}
    for name, kind, mod, spec in _dw_pw(model, (1, 16, 16)):
        if kind == "full":
            continue
        w = effective(mod).double()
        true = dense_norm(w, spec) if kind == "dw" else float(spectral_norm(w, spec, "exact"))
        assert true <= 1 + TOL, (name, true)
        kinds[kind] += 1
    assert kinds == {"dw": 17, "pw": 34}


@pytest.mark.parametrize("method", ["fantastic4", "gram", "operator", "reshape"])
def test_mobilenet_v2_norms_after_each_method(method):
    torch.manual_seed(6)
    model = create_model("cifar_mobilenet_v2", num_classes=10, in_chans=1, width=0.25)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.mul_(2.0)  # every layer above the target
    summary = spectral_normalize(model, method, in_size=(1, 8, 8), n_power_iterations=2)
    model.train()
    for _ in range(5):  # a few training forwards advance the persistent vectors
        model(torch.randn(2, 1, 8, 8))
    model.eval()
    worst = 0.0
    for _name, kind, mod, spec in _dw_pw(model, (1, 8, 8)):
        if kind == "full":
            continue
        true = dense_norm(effective(mod), spec)
        worst = max(worst, true)
    if method in ("fantastic4", "gram"):
        assert summary.certified and worst <= 1 + TOL
    elif method == "operator":  # an estimate: close to 1, not certified
        assert not summary.certified and 1 - 1e-6 <= worst <= 1.05
    else:  # reshape: the pitfall, a depthwise layer far above 1
        assert not summary.certified and worst > 1.2


# --------------------------------------------------------------------------- save / load / bake


def test_normalized_model_round_trips_through_save_and_load_and_bakes(trained_dsc, tmp_path):
    model, out = trained_dsc
    x = torch.randn(3, 1, 16, 16)
    model.eval()
    with torch.no_grad():
        ref = model(x)
    loaded = load_model(out / "model").to(memory_format=torch.channels_last)  # as trained
    loaded.eval()
    assert loaded.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    assert any(k.endswith("parametrizations.weight.original") for k in loaded.state_dict())
    assert any(k.endswith("parametrizations.weight.0.u") for k in loaded.state_dict())
    with torch.no_grad():
        assert torch.equal(loaded(x), ref)
    remove_spectral_normalization(loaded)
    assert not any(parametrize.is_parametrized(m) for m in loaded.modules())
    assert not loaded._forward_pre_hooks and not loaded._forward_hooks
    assert not any(s["op"] == "spectral_normalize" for s in loaded.sepconv_config["recipe"])
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), ref, rtol=1e-5, atol=1e-6)
    save_model(loaded, tmp_path / "baked")
    plain = load_model(tmp_path / "baked")
    assert not any(parametrize.is_parametrized(m) for m in plain.modules())
    plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(x), ref, rtol=1e-5, atol=1e-6)


def test_operator_and_batchnorm_state_round_trips(tmp_path):
    torch.manual_seed(7)
    model = create_model("simple_cnn", conv="dsc", width=0.5, in_chans=1, num_classes=10)
    summary = spectral_normalize(model, "operator", target=0.9, mode="scale", in_size=(1, 16, 16), batchnorm=True)
    assert any(r.parametrization == "BatchNormLipschitz" for r in summary.layers)
    model.train()
    for _ in range(3):
        model(torch.randn(4, 1, 16, 16))
    save_model(model, tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    sd, sd2 = model.state_dict(), loaded.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    assert any(k.endswith("parametrizations.weight.0.x") for k in sd)
    model.eval()
    loaded.eval()
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


# --------------------------------------------------------------------------- training integration


TINY = dict(model="simple_cnn", conv="dsc", width=0.5, data="digits", image_size=16, batch_size=32, lr=0.05)


def test_stop_and_resume_with_sn_gives_bit_identical_weights_and_buffers(tmp_path):
    straight = train(TrainConfig(**TINY, epochs=2, sn="dsc", out=str(tmp_path / "a")), progress=False)
    train(TrainConfig(**TINY, epochs=2, sn="dsc", out=str(tmp_path / "b")), progress=False, stop_after_epochs=1)
    resumed = train(TrainConfig(**TINY, epochs=2, sn="dsc", out=str(tmp_path / "b")), progress=False, resume=True)
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.endswith(".u") for k in a)
    wa, wb = load_state_dict(tmp_path / "a" / "model"), load_state_dict(tmp_path / "b" / "model")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.slow
def test_on_digits_sn_dsc_keeps_accuracy_lowers_the_bound_and_certifies_more(tmp_path):
    """Issue 5's digits claim at the benchmark's setting (BENCHMARKS.md, normalize): ``--sn dsc``
    with the scaled loss is within 2 points of the unnormalized model, with a lower certified
    network Lipschitz bound and a higher certified accuracy at a small radius: 3e-4 in pixel l2 (what
    ``certify`` measures), about 1e-3 (3e-4 / 0.324, digits' std) in the normalized units the network sees."""
    cfg = dict(model="simple_cnn", conv="dsc", data="digits", image_size=32, epochs=10, batch_size=32, lr=0.05,
               certify=(3e-4,))
    plain = train(TrainConfig(**cfg, out=str(tmp_path / "none")), progress=False).history[-1]
    sn = train(TrainConfig(**cfg, sn="dsc", logit_scale=10.0, out=str(tmp_path / "sn")), progress=False).history[-1]
    assert plain["test_acc"] > 0.9 and sn["test_acc"] >= plain["test_acc"] - 0.02, (plain, sn)
    assert sn["lipschitz_bound"] < plain["lipschitz_bound"] / 2, (plain, sn)
    assert sn["cert_acc@0.0003"] > plain["cert_acc@0.0003"] + 0.1, (plain, sn)


def test_frozen_state_computes_the_weights_without_advancing_the_persistent_vectors():
    from sepconv.normalize import frozen_state

    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.Conv2d(6, 5, 1))
    spectral_normalize(model, "dsc", in_size=(4, 8, 8), full_conv="operator")
    model.train()
    bufs = lambda: [b.clone() for n, b in model.named_buffers() if n.endswith((".u", ".x"))]  # noqa: E731
    before = bufs()
    assert len(before) == 2
    with frozen_state():
        w = [model[0].weight, model[1].weight]
    assert all(torch.equal(a, b) for a, b in zip(before, bufs()))
    assert all(torch.isfinite(t).all() for t in w)
    model[0].weight, model[1].weight  # outside: each access takes a power-iteration step
    assert not any(torch.equal(a, b) for a, b in zip(before, bufs()))


def test_logit_scale_is_cross_entropy_of_scaled_logits_over_the_scale():
    from sepconv.train import classification_loss

    logits, y = torch.randn(8, 5, dtype=torch.float64), torch.randint(0, 5, (8,))
    assert torch.equal(classification_loss(logits, y), torch.nn.functional.cross_entropy(logits, y))
    torch.testing.assert_close(classification_loss(logits, y, logit_scale=10.0),
                               torch.nn.functional.cross_entropy(10 * logits, y) / 10)


def test_certify_and_ff_beta_write_metrics_and_the_penalty_lowers_the_bounds(tmp_path):
    runs = {}
    for beta in (0.0, 0.05):
        res = train(TrainConfig(**TINY, epochs=1, ff_beta=beta, certify=(0.0, 0.1), out=str(tmp_path / f"b{beta}")),
                    progress=False)
        rec = json.loads((tmp_path / f"b{beta}" / "metrics.jsonl").read_text().splitlines()[-1])
        assert {"lipschitz_bound", "cert_acc@0", "cert_acc@0.1"} <= rec.keys()
        assert rec["lipschitz_bound"] > 0 and 0 <= rec["cert_acc@0.1"] <= rec["cert_acc@0"] == rec["test_acc"]
        assert ("loss_ff" in rec) == (beta > 0)
        shapes = layer_inputs(res.model, (1, 16, 16), types=(nn.Conv2d,))
        runs[beta] = sum(float(fantastic_four(m.weight.detach(), ConvSpec.of(m, s[-2:]))) for m, s in shapes.values())
    assert runs[0.05] < runs[0.0]


def test_two_process_ddp_with_sn_keeps_ranks_in_sync(tmp_path):
    args = ["train", "--model", "simple_cnn", "--conv", "dsc", "--model-arg", "norm=false", "--width", "0.5",
            "--image-size", "16", "--batch-size", "32", "--epochs", "1", "--no-augment", "--no-progress",
            "--lr", "0.02", "--sn", "dsc", "--sn-target", "0.9"]
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", "29631", "-m", "sepconv", *args, "--out", str(tmp_path / "ddp")],
                         env=ENV, capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-2000:]
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["ranks_in_sync"] is True
    single = subprocess.run([sys.executable, "-m", "sepconv", *args, "--out", str(tmp_path / "one")],
                            env=ENV, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-2000:]
    a, b = load_state_dict(tmp_path / "ddp" / "model"), load_state_dict(tmp_path / "one" / "model")
    assert a.keys() == b.keys() and any(k.endswith(".u") for k in a)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)


# --------------------------------------------------------------------------- bad input


def _small():
    return nn.Sequential(nn.Conv2d(2, 2, 3, padding=1, groups=2), nn.Conv2d(2, 3, 1))


@pytest.mark.parametrize("kwargs,exc,words", [
    (dict(target=0), ConfigError, ["target"]),
    (dict(target=-1.0), ConfigError, ["target"]),
    (dict(target=float("nan")), ConfigError, ["target"]),
    (dict(method="spectral"), ConfigError, ["method", "spectral"]),
    (dict(mode="half"), ConfigError, ["mode"]),
    (dict(n_power_iterations=0), ConfigError, ["n_power_iterations"]),
    (dict(method="operator", full_conv="gram"), ConfigError, ["full_conv"]),
    (dict(full_conv="svd"), ConfigError, ["full_conv"]),
    (dict(in_size=None), ConfigError, ["in_size"]),
])
def test_bad_arguments_are_clear_errors(kwargs, exc, words):
    kw = dict(in_size=(2, 6, 6)) | kwargs
    with pytest.raises(exc) as e:
        spectral_normalize(_small(), **kw)
    msg = str(e.value)
    assert "\n" not in msg and all(w in msg for w in words), msg


def test_bad_models_are_clear_errors_naming_the_layer():
    with pytest.raises(UnsupportedLayerError, match="no layer to normalize"):
        spectral_normalize(nn.Sequential(nn.ReLU(), nn.Dropout()), in_size=(1, 4, 4))
    for layer in (nn.ConvTranspose2d(2, 2, 3), nn.Conv3d(2, 2, 3), nn.Conv1d(2, 2, 3)):
        with pytest.raises(UnsupportedLayerError, match=rf"'1'.*{type(layer).__name__}"):
            spectral_normalize(nn.Sequential(nn.Conv2d(2, 2, 1), layer), in_size=(2, 6, 6))
    m = nn.Sequential(nn.Conv2d(2, 2, 1), nn.Conv3d(2, 2, 3))
    summary = spectral_normalize(m, "reshape", in_size=(2, 6, 6))  # reshape normalizes any conv, uncertified
    assert [r.parametrization for r in summary.layers] == ["ReshapeNorm", "ReshapeNorm"]
    bad = _small()
    with torch.no_grad():
        bad[1].weight[0, 0] = float("nan")
    with pytest.raises(ConfigError, match=r"'1'.*NaN"):
        spectral_normalize(bad, in_size=(2, 6, 6))
    done = _small()
    spectral_normalize(done, in_size=(2, 6, 6))
    with pytest.raises(ConfigError, match="already"):
        spectral_normalize(done, in_size=(2, 6, 6))
    with pytest.raises(ConfigError, match="not spectrally normalized"):
        remove_spectral_normalization(_small())


def test_registered_models_need_no_in_size_and_the_summary_is_readable():
    model = create_model("cifar_mobilenet_v2", num_classes=10, in_chans=1, width=0.25)
    summary = spectral_normalize(model, "dsc", full_conv="fantastic4")
    assert summary.certified and summary.layers[0].in_size == (1, 32, 32)
    d = summary.to_dict()
    assert d["certified"] and len(d["layers"]) == 53
    text = str(summary)
    assert "17 DepthwiseFFTNorm" in text and "35 MatrixNorm" in text and "BoundNorm" in text


def run_cli(capsys, *argv):
    from sepconv.cli import main

    try:
        code = main(list(argv))
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize("argv,word", [
    (["--sn", "spectral"], "--sn"),
    (["--sn", "dsc", "--sn-target", "0"], "--sn-target"),
    (["--sn", "dsc", "--sn-target", "-2"], "--sn-target"),
    (["--sn", "dsc", "--sn-mode", "half"], "--sn-mode"),
    (["--ff-beta", "-1"], "--ff-beta"),
    (["--logit-scale", "0"], "--logit-scale"),
    (["--logit-scale", "inf"], "--logit-scale"),
    (["--certify", "-0.1"], "--certify"),
    (["--certify", "abc"], "--certify"),
    (["--sn-batchnorm", "--epochs", "1"], "sn_batchnorm"),
])
def test_cli_bad_sn_options_give_one_line_and_status_2(capsys, tmp_path, argv, word):
    code, err = run_cli(capsys, "train", *argv, "--out", str(tmp_path))
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err and word in err, err


def test_a_one_to_one_depthwise_conv_of_a_grayscale_separable_model_is_certified():
    """The first depthwise conv of a separable model on 1-channel input is 1 -> 1 (groups 1): it is
    depthwise, normalized by the FFT like the others, and the whole model is certified."""
    torch.manual_seed(0)
    model = create_model("simple_cnn", num_classes=10, in_chans=1, conv="dsc")
    summary = spectral_normalize(model, "dsc", in_size=(1, 16, 16))
    first = next(r for r in summary.layers if r.name == "features.0.dw")
    assert first.parametrization == "DepthwiseFFTNorm" and first.certified
    assert summary.certified
    from sepconv.spectral import ConvSpec, spectral_norm

    model.eval()
    conv = model.features[0].dw
    exact = spectral_norm(conv.weight.detach().double(), ConvSpec.of(conv, (16, 16)), method="exact")
    assert float(exact) <= 1 + 1e-6
