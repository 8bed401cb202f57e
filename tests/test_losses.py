"""The loss registry (sepconv.losses, ``sepconv train --loss``): hand-computed values, gradient
signs, margins driven up on a separable problem, the settings each loss reads, resume, bad input."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sepconv.errors import CheckpointError, ConfigError
from sepconv.losses import (
    LOSSES,
    cross_entropy,
    get_loss,
    hkr,
    kantorovich_rubinstein,
    loss_names,
    margin_cross_entropy,
    multiclass_hinge,
    one_vs_all_hinge,
)
from sepconv.train import TrainConfig, classification_loss, train

pytestmark = pytest.mark.usefixtures("one_thread")

# two samples, three classes: sample 0 is right with room to spare, sample 1 is wrong (class 2, z = 0)
Z = [[2.0, 0.0, -1.0], [0.5, 1.0, 0.0]]
Y = [0, 2]


def _z(requires_grad=False):
    return torch.tensor(Z, dtype=torch.float64, requires_grad=requires_grad), torch.tensor(Y)


def test_cross_entropy_by_hand_and_tau_ce_is_the_same_loss():
    z, y = _z()
    # CE(z) = mean_i log(sum_j exp(z_ij - z_iy)); with s = 2: CE(2 z) / 2
    by_hand = lambda s: (math.log(1 + math.exp(-2 * s) + math.exp(-3 * s))  # noqa: E731
                         + math.log(math.exp(0.5 * s) + math.exp(1.0 * s) + 1)) / 2 / s
    assert cross_entropy(z, y).item() == pytest.approx(by_hand(1.0), rel=1e-12)
    assert cross_entropy(z, y, logit_scale=2.0).item() == pytest.approx(by_hand(2.0), rel=1e-12)
    assert get_loss("tau_ce") is LOSSES["ce"] and "tau_ce" not in loss_names() and "tau_ce" in loss_names(True)
    assert TrainConfig(loss="tau_ce").loss == "ce"
    assert torch.equal(classification_loss(z, y), F.cross_entropy(z, y))  # the default is unchanged


def test_margin_cross_entropy_by_hand_is_cross_entropy_of_the_lowered_true_logit():
    z, y = _z()
    # the true logits lowered by m = 0.5: sample 0 [1.5, 0, -1] (y = 0), sample 1 [0.5, 1, -0.5] (y = 2); s = 2
    s, m = 2.0, 0.5
    by_hand = (math.log(1 + math.exp(-1.5 * s) + math.exp(-2.5 * s))
               + math.log(math.exp(1.0 * s) + math.exp(1.5 * s) + 1)) / 2 / s
    assert margin_cross_entropy(z, y, margin=m, logit_scale=s).item() == pytest.approx(by_hand, rel=1e-12)
    got = classification_loss(z, y, loss="margin_ce", margin=m, logit_scale=s)
    assert got.item() == pytest.approx(by_hand, rel=1e-12)
    # it penalises a right sample that is not past the margin more than plain cross-entropy does
    assert margin_cross_entropy(z, y, margin=m).item() > cross_entropy(z, y).item()


def test_multiclass_hinge_by_hand_equals_torch_multi_margin_loss():
    z, y = _z()
    # sample 0: max(0, 1 - (2 - 0)) + max(0, 1 - (2 + 1)) = 0; sample 1 (z_y = 0): (1 + 0.5) + (1 + 1) = 3.5;
    # each divided by K = 3, then the mean over the 2 samples
    assert multiclass_hinge(z, y, margin=1.0).item() == pytest.approx(3.5 / 6, rel=1e-12)
    torch.testing.assert_close(multiclass_hinge(z, y, margin=0.7), F.multi_margin_loss(z, y, margin=0.7))
    assert classification_loss(z, y, loss="hinge", margin=1.0).item() == pytest.approx(3.5 / 6, rel=1e-12)


def test_hkr_by_hand():
    z, y = _z()
    # one-vs-all hinge, m = 1: sample 0: 2 * (0.5 - 2)_+ + (0.5 + 0)_+ + (0.5 - 1)_+ = 0.5;
    # sample 1: 2 * (0.5 - 0)_+ + (0.5 + 0.5)_+ + (0.5 + 1)_+ = 3.5; each / K = 3, mean over 2: 4 / 6
    assert one_vs_all_hinge(z, y, 1.0).item() == pytest.approx(4 / 6, rel=1e-12)
    # KR, per class: mean over its samples - mean over the others: class 0: 2 - 0.5; class 1 (no sample):
    # 0 - (0 + 1) / 2; class 2: 0 - (-1); averaged: (1.5 - 0.5 + 1) / 3
    assert kantorovich_rubinstein(z, y).item() == pytest.approx(2 / 3, rel=1e-12)
    assert hkr(z, y, margin=1.0, alpha=0.9).item() == pytest.approx(0.9 * 4 / 6 - 0.1 * 2 / 3, rel=1e-12)
    assert hkr(z, y, margin=1.0, alpha=1.0).item() == pytest.approx(4 / 6, rel=1e-12)
    got = classification_loss(z, y, loss="hkr", margin=1.0, hkr_alpha=0.9)
    assert got.item() == pytest.approx(0.9 * 4 / 6 - 0.1 * 2 / 3, rel=1e-12)


@pytest.mark.parametrize("name", ["ce", "margin_ce", "hinge", "hkr"])
def test_every_loss_pushes_the_true_logit_up_and_the_violating_ones_down(name):
    z, y = _z(requires_grad=True)
    get_loss(name)(z, y, margin=1.0, hkr_alpha=0.9).backward()
    g = z.grad
    true = g.gather(1, y[:, None]).squeeze(1)
    assert (true[1] < 0).item()  # the wrong sample: raise z_y ...
    assert (g[1, :2] > 0).all()  # ... and lower both classes above it
    if name == "hinge":  # sample 0 has margin 2 >= 1 on every pair: no gradient
        assert torch.equal(g[0], torch.zeros(3, dtype=g.dtype))
    if name == "hkr":  # the KR term pulls every sample: down on the others, up on its class
        assert (true < 0).all() and (g[0, 1:] > 0).all()


def _blobs(n=60, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.tensor([[4.0, 0.0], [-2.0, 3.5], [-2.0, -3.5]], dtype=torch.float64)
    y = torch.arange(3).repeat_interleave(n // 3)
    return centers[y] + 0.4 * torch.randn(n, 2, generator=g, dtype=torch.float64), y


class _OneLipschitzLinear(nn.Module):
    """z = W x / ||W||_2 + b: 1-Lipschitz, so a margin cannot be bought by scaling the logits."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 3).double()

    def forward(self, x):
        return F.linear(x, self.lin.weight / torch.linalg.matrix_norm(self.lin.weight, 2), self.lin.bias)


def _margins(model, x, y):
    z = model(x)
    top = z.gather(1, y[:, None]).squeeze(1)
    other = z.scatter(1, y[:, None], -math.inf).max(1).values
    return top - other


@pytest.mark.parametrize("name", ["hinge", "hkr", "margin_ce"])
def test_margin_losses_drive_the_margins_of_a_1_lipschitz_model_above_the_margin(name):
    torch.manual_seed(0)
    x, y = _blobs()
    model = _OneLipschitzLinear()
    m = 1.0
    before = _margins(model, x, y).detach()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(300):
        opt.zero_grad()
        options = {"margin": m, "logit_scale": 4.0} if name == "margin_ce" else {"margin": m, "hkr_alpha": 0.9}
        get_loss(name)(model(x), y, **options).backward()
        opt.step()
    after = _margins(model, x, y).detach()
    assert (before >= m).double().mean() < 0.5, before
    assert (after >= m).all() and after.mean() > before.mean() + 1, after


def test_losses_refuse_bad_settings_and_shapes():
    z, y = _z()
    for call, word in [(lambda: multiclass_hinge(z, y, margin=0.0), "margin"),
                       (lambda: margin_cross_entropy(z, y, margin=-1.0), "margin"),
                       (lambda: margin_cross_entropy(z, y, logit_scale=0.0), "logit_scale"),
                       (lambda: multiclass_hinge(z, y, margin=math.nan), "margin"),
                       (lambda: one_vs_all_hinge(z, y, margin=-1.0), "margin"),
                       (lambda: hkr(z, y, alpha=0.0), "alpha"),
                       (lambda: hkr(z, y, alpha=1.5), "alpha"),
                       (lambda: cross_entropy(z, y, logit_scale=math.inf), "logit_scale"),
                       (lambda: multiclass_hinge(z[0], y), "logits"),
                       (lambda: hkr(z, y.double()), "labels"),
                       (lambda: get_loss("nope"), "nope")]:
        with pytest.raises(ConfigError, match=word):
            call()


@pytest.mark.parametrize("kwargs,words", [
    (dict(loss="nope"), ["unknown loss", "'nope'", "ce, margin_ce, hinge, hkr"]),
    (dict(loss="hinge", margin=0.0), ["margin"]),
    (dict(loss="hinge", margin=-1.0), ["margin"]),
    (dict(loss="hinge", margin=math.nan), ["margin"]),
    (dict(loss="hkr", hkr_alpha=0.0), ["hkr_alpha"]),
    (dict(loss="hkr", hkr_alpha=1.01), ["hkr_alpha"]),
    (dict(loss="ce", margin=2.0), ["margin", "margin_ce or hinge or hkr", "--loss margin_ce"]),
    (dict(loss="hinge", logit_scale=10.0), ["logit_scale", "--loss ce"]),
    (dict(loss="hinge", label_smoothing=0.1), ["label_smoothing"]),
    (dict(loss="hinge", hkr_alpha=0.5), ["hkr_alpha", "--loss hkr"]),
])
def test_train_config_refuses_a_bad_loss_setting_in_one_line(kwargs, words):
    with pytest.raises(ConfigError) as e:
        TrainConfig(**kwargs).validate()
    msg = str(e.value)
    assert "\n" not in msg and all(w in msg for w in words), msg


def _cli(capsys, *argv):
    from sepconv.cli import main

    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr()


@pytest.mark.parametrize("argv,words", [
    (["--loss", "nope"], ["--loss", "nope", "hinge", "hkr"]),
    (["--loss", "hinge", "--margin", "0"], ["--margin"]),
    (["--loss", "hinge", "--margin", "-1"], ["--margin"]),
    (["--loss", "hinge", "--margin", "nan"], ["--margin"]),
    (["--loss", "hkr", "--hkr-alpha", "2"], ["--hkr-alpha"]),
    (["--margin", "2"], ["margin", "--loss margin_ce"]),
])
def test_cli_bad_loss_options_give_one_line_and_status_2(capsys, tmp_path, argv, words):
    code, cap = _cli(capsys, "train", *argv, "--epochs", "1", "--out", tmp_path / "o")
    lines = cap.err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in cap.err, cap.err
    assert all(w in cap.err for w in words), cap.err
    assert not (tmp_path / "o" / "last.pt").exists()


def test_cli_loss_choices_come_from_the_registry(capsys):
    code, cap = _cli(capsys, "train", "--help")
    assert code == 0
    text = " ".join(cap.out.split())
    assert all(n in text for n in loss_names(aliases=True)) and "--margin" in text and "pixel-l2" in text


TINY = dict(model="simple_cnn", width=0.25, data="digits", image_size=8, train_images=64, batch_size=16, lr=0.05)


def test_a_hinge_run_resumes_only_with_its_own_loss_settings(tmp_path):
    out = str(tmp_path / "h")
    train(TrainConfig(**TINY, epochs=2, loss="hinge", margin=0.5, out=out), progress=False, stop_after_epochs=1)
    for other in (dict(loss="hinge", margin=1.0), dict(loss="ce"), dict(loss="hkr", margin=0.5)):
        with pytest.raises(CheckpointError, match=r"(loss|margin)="):
            train(TrainConfig(**TINY, epochs=2, **other, out=out), progress=False, resume=True)
    res = train(TrainConfig(**TINY, epochs=2, loss="hinge", margin=0.5, out=out), progress=False, resume=True)
    assert [r["epoch"] for r in res.history] == [2] and math.isfinite(res.history[0]["train_loss"])


def test_a_checkpoint_from_before_the_loss_settings_resumes_as_cross_entropy(tmp_path):
    out = tmp_path / "old"
    train(TrainConfig(**TINY, epochs=2, out=str(out)), progress=False, stop_after_epochs=1)
    state = torch.load(out / "last.pt", weights_only=True)
    for key in ("loss", "margin", "hkr_alpha"):
        del state["config"][key]
    torch.save(state, out / "last.pt")
    res = train(TrainConfig(**TINY, epochs=2, out=str(out)), progress=False, resume=True)
    assert [r["epoch"] for r in res.history] == [2]


def test_fantastic_four_penalty_is_the_sum_of_the_conv_layers_bounds_and_differentiable():
    import torch

    from sepconv.losses import fantastic_four_penalty
    from sepconv.models import create_model
    from sepconv.spectral import ConvSpec, fantastic_four

    torch.manual_seed(0)
    net = create_model("simple_cnn", num_classes=10, in_chans=1, conv="dsc")
    penalty = fantastic_four_penalty(net, (1, 8, 8))
    seen = {}  # each conv's input size, by forward hooks

    def hook(m, args, out):
        seen[m] = tuple(args[0].shape[-2:])

    handles = [m.register_forward_hook(hook) for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    net.eval()(torch.zeros(1, 1, 8, 8))
    net.train()
    for h in handles:
        h.remove()
    expected = sum(fantastic_four(m.weight, ConvSpec.of(m, seen[m])) for m in seen)
    assert len(seen) == 8
    value = penalty()
    assert torch.allclose(value, expected)
    value.backward()
    assert all(m.weight.grad is not None and m.weight.grad.abs().sum() > 0
               for m in net.modules() if isinstance(m, torch.nn.Conv2d))
