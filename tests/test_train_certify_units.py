"""What ``sepconv train`` reports: ``--certify`` radii are pixel-l2 radii (the dataset's std folded
into the certificate), and the final line says which epoch ``model/`` holds."""

import json

import pytest
import torch
from torch import nn

from sepconv.data import load_dataset
from sepconv.io import load_state_dict
from sepconv.spectral import certified_radii
from sepconv.train import TrainConfig, train

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(model="simple_cnn", width=0.25, data="digits", image_size=8, train_images=64, batch_size=16, lr=0.05)


def test_certify_logs_the_certified_accuracy_at_pixel_l2_radii(tmp_path):
    cfg = TINY | dict(train_images=None, epochs=1, sn="dsc", loss="hinge", margin=0.5, certify=(0.0, 0.003, 0.01))
    res = train(TrainConfig(**cfg, out=str(tmp_path)), progress=False)
    rec = res.history[-1]
    test = load_dataset("digits", split="test", image_size=8)
    x, y = test.get_batch(torch.arange(len(test)))
    radii, L = certified_radii(res.model, [(x.contiguous(memory_format=torch.channels_last), y)], method="fft",
                               input_scale=test.std)
    assert rec["lipschitz_bound"] == pytest.approx(L, rel=1e-9)
    assert rec["lipschitz_pixel"] == pytest.approx(L / min(test.std), rel=1e-9)
    assert rec["cert_acc@0"] == rec["test_acc"] > 0.5
    for eps in (0.003, 0.01):
        assert rec[f"cert_acc@{eps:g}"] == float((radii > eps).double().mean())
    # in the network's own units the same images have radii 1 / min(std) ~ 3 times larger
    net_radii, _ = certified_radii(res.model, [(x.contiguous(memory_format=torch.channels_last), y)], lipschitz=L,
                                   features_lipschitz=L / float(torch.linalg.matrix_norm(
                                       res.model.classifier.weight.detach().double(), 2)))
    torch.testing.assert_close(radii, net_radii * min(test.std), rtol=1e-6, atol=0)


def test_the_final_line_says_model_holds_the_last_epoch_and_where_the_best_is(tmp_path, capsys):
    from sepconv.cli import main

    out = tmp_path / "run"
    assert main(["train", "--model", "simple_cnn", "--width", "0.25", "--image-size", "8", "--train-images", "64",
                 "--batch-size", "16", "--epochs", "3", "--certify", "0.01", "--no-progress", "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    accs = [r["test_acc"] for r in recs]
    best_epoch = accs.index(max(accs)) + 1
    assert stdout.count("pixel-l2") == 1 and stdout.count("best test accuracy") == 1, stdout
    last = stdout.strip().splitlines()[-1]
    assert last == (f"best test accuracy {max(accs):.4f} at epoch {best_epoch}; model saved to {out / 'model'}: the "
                    f"last epoch's (3/3, test accuracy {accs[-1]:.4f}); the best epoch's checkpoint is "
                    f"{out / 'best.pt'}"), last
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["best_epoch"], summary["last_acc"], summary["epochs"]) == (best_epoch, accs[-1], 3)
    saved, ckpt = load_state_dict(out / "model"), torch.load(out / "last.pt", weights_only=True)["model"]
    assert saved.keys() == ckpt.keys() and all(torch.equal(saved[k], ckpt[k]) for k in saved)
    assert torch.load(out / "best.pt", weights_only=True)["epoch"] == best_epoch


class _Square(nn.Module):
    def forward(self, x):
        return x * x  # no global Lipschitz constant


def test_a_model_without_a_lipschitz_bound_asked_for_certificates_is_refused_before_training(tmp_path, capsys,
                                                                                              monkeypatch):
    from sepconv.cli import main
    from sepconv.models import _registry, register_model

    monkeypatch.setattr(_registry, "_MODELS", dict(_registry._MODELS))  # the test's model is gone afterwards

    @register_model(family="test", input_size=(1, 8, 8))
    def _test_square_net(num_classes=10, in_chans=1, conv="regular", width=1.0):
        return nn.Sequential(nn.Conv2d(in_chans, 4, 3, padding=1), _Square(), nn.Flatten(),
                             nn.Linear(4 * 64, num_classes))

    out = tmp_path / "run"
    argv = ["train", "--model", "_test_square_net", "--image-size", "8", "--train-images", "16", "--batch-size", "8",
            "--epochs", "1", "--no-progress"]
    try:
        code = main([*argv, "--certify", "0.1", "--out", str(out)])
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert "no global Lipschitz constant" in err and "mul" in err, err
    assert not (out / "last.pt").exists()  # refused before any training step
    assert main([*argv, "--out", str(tmp_path / "free")]) == 0  # without --certify it trains


@pytest.mark.parametrize("eps", ["nan", "-1", "inf"])
def test_certify_refuses_a_negative_or_nan_radius_in_one_line(tmp_path, capsys, eps):
    from sepconv.cli import main

    try:
        code = main(["train", "--certify", eps, "--epochs", "1", "--out", str(tmp_path)])
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--certify" in err and "Traceback" not in err, err


def test_a_lipschitz_model_is_built_at_the_data_size_and_trains_with_a_margin_loss(tmp_path):
    """``lip_sep_cnn`` takes the data's image size (its norms and its flattened head depend on it): digits at
    16x16 trains without ``--model-arg image_size=16``, and its certificate holds (bound <= 1)."""
    cfg = TrainConfig(model="lip_sep_cnn", data="digits", image_size=16, train_images=64, batch_size=16, epochs=1,
                      optimizer="adamw", lr=3e-3, loss="margin_ce", margin=2.0, certify=(0.1,), out=str(tmp_path))
    res = train(cfg, progress=False, log=False)
    assert res.model.features[0].weight.shape[0] == 16  # the orthogonal first layer: 1 -> 16, no pointwise part
    h = res.history[-1]
    assert 0.5 < h["lipschitz_bound"] <= 1 + 1e-6 and 0 <= h["cert_acc@0.1"] <= 1
    saved = json.loads((tmp_path / "model" / "config.json").read_text())
    assert list(saved["kwargs"]["image_size"]) == [16, 16], saved
