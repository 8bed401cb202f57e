"""Certified radii in the units users read (pixel l2) and the pairwise certificate of a final
Linear: checked against a strong attack (PGD on the pixels, many restarts), which finds no
adversarial image inside any certified radius and finds one just outside an exact radius."""

import math

import pytest
import torch
from torch import nn

from sepconv.errors import ConfigError
from sepconv.spectral import certified_accuracy, certified_radii, lipschitz_bound, margin_radii, pairwise_radii

MEAN, STD = torch.tensor([0.4, 0.5]), torch.tensor([0.3, 0.6])


class Normalized(nn.Module):
    """What the attack sees: pixels in [0, 1] -> ``(x - mean) / std`` -> the network."""

    def __init__(self, net, mean, std):
        super().__init__()
        self.net, self.mean, self.std = net, mean.double().view(1, -1, 1, 1), std.double().view(1, -1, 1, 1)

    def forward(self, x):
        return self.net((x - self.mean) / self.std)


def _convnet(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 3, stride=2, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(24, 4)).double().eval()


def _linear(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(32, 4)).double().eval()


def _pixels(n=24, seed=1):
    return torch.rand(n, 2, 4, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _data(net, mean=MEAN, std=STD, n=24):
    """Pixel images, the normalized batch the network sees, and its own predictions as labels (all
    correct: every sample has a finite radius to attack)."""
    x = _pixels(n)
    xn = (x - mean.double().view(1, -1, 1, 1)) / std.double().view(1, -1, 1, 1)
    with torch.no_grad():
        y = net(xn).argmax(1)
    return x, xn, y


def pgd_flips(model, x, y, radius, steps=100, restarts=32, seed=0):
    """Per sample: whether l2 PGD on the pixels (random starts in the ball, normalized-gradient
    steps of 2.5 r / steps, projection on the ball; no clipping to [0, 1], which would only weaken
    it) finds an image within ``radius`` that the model classifies other than ``y``."""
    g = torch.Generator().manual_seed(seed)
    n = len(x)
    r = radius.view(n, 1, 1, 1, 1).expand(n, restarts, 1, 1, 1)
    d = torch.randn(n, restarts, *x.shape[1:], generator=g, dtype=x.dtype)
    norm = d.flatten(2).norm(dim=2).view(n, restarts, 1, 1, 1)
    u = torch.rand(n, restarts, 1, 1, 1, generator=g, dtype=x.dtype) ** (1 / x[0].numel())
    d = d / norm * u * r
    xs = x[:, None].expand_as(d)
    ys = y[:, None].expand(n, restarts).reshape(-1)
    flipped = torch.zeros(n, dtype=torch.bool)
    for _ in range(steps):
        d.requires_grad_(True)
        z = model((xs + d).reshape(-1, *x.shape[1:]))
        flipped |= (z.argmax(1) != ys).view(n, restarts).any(1)
        other = z.scatter(1, ys[:, None], -math.inf).max(1).values
        (other - z.gather(1, ys[:, None]).squeeze(1)).sum().backward()
        with torch.no_grad():
            gr = d.grad
            d = d + 2.5 * r / steps * gr / gr.flatten(2).norm(dim=2).clamp(min=1e-30).view(n, restarts, 1, 1, 1)
            norm = d.flatten(2).norm(dim=2).view(n, restarts, 1, 1, 1)
            d = d * torch.clamp(r / norm.clamp(min=1e-30), max=1.0)
    with torch.no_grad():
        z = model((xs + d).reshape(-1, *x.shape[1:]))
        flipped |= (z.argmax(1) != ys).view(n, restarts).any(1)
    return flipped


def test_pixel_radii_are_the_network_radii_times_the_smallest_std():
    net = _convnet()
    _, xn, y = _data(net)
    plain, L = certified_radii(net, [(xn, y)], method="fft")
    for scale, factor in [(0.5, 0.5), ((0.3, 0.6), 0.3), (STD, float(STD.min())), ([0.7], 0.7)]:
        pix, L2 = certified_radii(net, [(xn, y)], method="fft", input_scale=scale)
        assert L2 == L
        torch.testing.assert_close(pix, plain * factor, rtol=1e-12, atol=0)
    cert = certified_accuracy(net, [(xn, y)], 0.01, method="fft", input_scale=STD)
    assert cert.lipschitz == L and cert.eps == 0.01
    assert cert.certified == float((plain * float(STD.min()) > 0.01).double().mean())


@pytest.mark.parametrize("which", ["global", "pairwise", "best"])
def test_no_pixel_perturbation_inside_the_certified_radius_flips_a_prediction(which):
    net = _convnet()
    x, xn, y = _data(net)
    if which == "global":
        r, _ = certified_radii(net, [(xn, y)], method="fft", input_scale=STD, pairwise=False)
    elif which == "pairwise":  # the pairwise certificate alone, from the features' own bound
        L_h = lipschitz_bound(nn.Sequential(*list(net)[:-1]), (2, 4, 4), method="fft")
        with torch.no_grad():
            r = pairwise_radii(net(xn), y, net[-1].weight, L_h) * float(STD.min())
    else:
        r, _ = certified_radii(net, [(xn, y)], method="fft", input_scale=STD)
    assert torch.isfinite(r).all() and (r > 0).all()
    flips = pgd_flips(Normalized(net, MEAN, STD), x, y, 0.999 * r)
    assert not flips.any(), r[flips]


@pytest.mark.parametrize("which", ["global", "pairwise"])
def test_the_same_attack_flips_a_linear_model_just_outside_its_exact_radius(which):
    """A linear network that reads only the channel of the smallest std: its certified pixel radius
    is the exact distance to the decision boundary (pairwise: always; global: two classes with
    opposite weights, where sqrt(2) ||W||_2 = ||w_0 - w_1||), so the attack must flip nearly every
    image just beyond it and none just inside -- it is strong enough for the test above to mean
    something, and a radius off by any factor (a std not folded, the largest std, no sqrt(2)) fails."""
    net = _linear()
    with torch.no_grad():
        net[1].weight[:, 16:] = 0.0  # channel 1 (std 0.6) is ignored
        if which == "global":
            net[1] = nn.Linear(32, 2).double()
            net[1].weight[:, 16:] = 0.0
            net[1].weight[1], net[1].bias[1] = -net[1].weight[0], -net[1].bias[0]
    x, xn, y = _data(net)
    r, _ = certified_radii(net, [(xn, y)], method="fft", input_scale=STD, pairwise=which == "pairwise")
    model = Normalized(net, MEAN, STD)
    assert not pgd_flips(model, x, y, 0.999 * r).any()
    assert pgd_flips(model, x, y, 1.01 * r).double().mean() >= 0.9


def test_the_pairwise_radius_is_at_least_the_global_one_when_the_last_layer_is_linear():
    for seed in range(3):
        net = _convnet(seed)
        _, xn, y = _data(net)
        best, L = certified_radii(net, [(xn, y)], method="fft")
        glob, L2 = certified_radii(net, [(xn, y)], method="fft", pairwise=False)
        assert L == pytest.approx(L2, rel=1e-12)  # the composition bound, whichever way it is computed
        assert (best >= glob).all() and (best > glob * 1.01).any()
    # as a formula: pairwise with L_h is at least global with L = L_h ||W||_2, for any logits and labels
    g = torch.Generator().manual_seed(0)
    w, z, y = torch.randn(5, 7, generator=g), torch.randn(50, 5, generator=g), torch.randint(5, (50,), generator=g)
    L_h = 0.7
    glob = margin_radii(z, y, L_h * float(torch.linalg.matrix_norm(w.double(), 2)))
    pair = pairwise_radii(z, y, w, L_h)
    ok = torch.isfinite(glob)
    assert torch.equal(torch.isinf(pair) & (pair < 0), ~ok) and (pair[ok] >= glob[ok] * (1 - 1e-12)).all()


class _Doubled(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return 2 * self.net(x)


class _InPlace(_Doubled):
    def forward(self, x):
        z = self.net(x)
        z.add_(1.0)  # the Linear's output, changed after it: the Linear is not the output map
        return z


@pytest.mark.parametrize("wrap", [_Doubled, _InPlace, lambda net: nn.Sequential(net, nn.ReLU())])
def test_a_model_that_does_not_end_in_its_linear_gets_the_global_certificate(wrap):
    model = wrap(_convnet()).eval()
    _, xn, _ = _data(_convnet())
    with torch.no_grad():
        y = model(xn).argmax(1)
    got, L = certified_radii(model, [(xn, y)], method="fft")
    want, L2 = certified_radii(model, [(xn, y)], method="fft", pairwise=False)
    assert L == L2 and torch.equal(got, want)


def test_given_bounds_are_used_as_given_and_the_model_is_left_as_it_was():
    net = _convnet()
    _, xn, y = _data(net)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    r, L = certified_radii(net, [(xn, y)], lipschitz=5.0)
    with torch.no_grad():
        z = net(xn)
    assert L == 5.0 and torch.equal(r, margin_radii(z, y, 5.0))
    r, L = certified_radii(net, [(xn, y)], lipschitz=5.0, features_lipschitz=2.0, input_scale=0.5)
    want = torch.maximum(margin_radii(z, y, 5.0), pairwise_radii(z, y, net[-1].weight, 2.0)) * 0.5
    assert L == 5.0 and torch.equal(r, want)
    assert isinstance(net[-1], nn.Linear) and all(torch.equal(v, before[k]) for k, v in net.state_dict().items())


@pytest.mark.parametrize("call,words", [
    (lambda m, b: certified_accuracy(m, b, -0.1, lipschitz=1.0), ["eps", "-0.1"]),
    (lambda m, b: certified_accuracy(m, b, math.nan, lipschitz=1.0), ["eps", "nan"]),
    (lambda m, b: certified_accuracy(m, b, "0.1", lipschitz=1.0), ["eps"]),
    (lambda m, b: certified_radii(m, b, lipschitz=1.0, input_scale=0.0), ["input_scale"]),
    (lambda m, b: certified_radii(m, b, lipschitz=1.0, input_scale=-0.3), ["input_scale"]),
    (lambda m, b: certified_radii(m, b, lipschitz=1.0, input_scale=math.nan), ["input_scale"]),
    (lambda m, b: certified_radii(m, b, lipschitz=1.0, input_scale=math.inf), ["input_scale"]),
    (lambda m, b: certified_radii(m, b, lipschitz=1.0, input_scale=(0.3, 0.0)), ["input_scale"]),
    (lambda m, b: certified_radii(m, b, lipschitz=1.0, input_scale=[]), ["input_scale"]),
    (lambda m, b: certified_radii(m, b, lipschitz=1.0, input_scale="std"), ["input_scale"]),
    (lambda m, b: certified_radii(m, b, lipschitz=1.0, input_scale=True), ["input_scale"]),
    (lambda m, b: certified_radii(m, b, lipschitz=1.0, input_scale=(0.3, 0.3, 0.3)), ["3 values", "2 channels"]),
    (lambda m, b: certified_radii(m, b, lipschitz=1.0, features_lipschitz=-1.0), ["features_lipschitz"]),
    (lambda m, b: certified_radii(nn.Sequential(m, nn.ReLU()), b, features_lipschitz=1.0), ["features_lipschitz"]),
    (lambda m, b: certified_radii(m, [(b[0][0], b[0][1] + 10)], lipschitz=1.0), ["labels", "0..3"]),
])
def test_bad_certificate_arguments_are_one_config_error(call, words):
    net = _convnet()
    _, xn, y = _data(net)
    with pytest.raises(ConfigError) as e:
        call(net, [(xn, y)])
    msg = str(e.value)
    assert "\n" not in msg and all(w in msg for w in words), msg
