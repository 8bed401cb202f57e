"""No file from elsewhere runs code: a model directory's config.json may name registry models and
sepconv recipe steps only; a factory in it is refused unless the user opts in (--trust-code)."""

from __future__ import annotations

import json

import pytest
import torch

from sepconv.errors import SepconvError, WeightsError
from sepconv.io import load_model, model_from_spec, save_model
from sepconv.models import create_model

from .conftest import assert_one_line, run_cli


def _evil_dir(tmp_path, factory="os:system", **kwargs):
    marker = tmp_path / "pwned"
    d = tmp_path / "evil"
    d.mkdir()
    kwargs = kwargs or {"command": f"touch {marker}"}
    (d / "config.json").write_text(json.dumps({"factory": factory, "kwargs": kwargs}))
    return d, marker


@pytest.mark.parametrize("argv", [
    ["spectrum", "{d}"],
    ["spectrum", "{d}", "--json"],
    ["convert", "{d}", "--out", "{out}"],
    ["train", "--init", "{d}", "--epochs", "1", "--out", "{out}"],
])
def test_a_factory_in_a_model_directory_is_refused_by_every_command(capsys, tmp_path, argv):
    d, marker = _evil_dir(tmp_path)
    code, _, err = run_cli(capsys, *[a.format(d=d, out=tmp_path / "o") for a in argv])
    assert_one_line(code, err, "os:system", "--trust-code")
    assert not marker.exists()


def test_training_from_a_factory_directory_is_refused_in_python(tmp_path):
    from sepconv.train import TrainConfig, train

    d, marker = _evil_dir(tmp_path)
    with pytest.raises(WeightsError, match="trust"):  # the Python API's default is the CLI's: no code
        train(TrainConfig(init=str(d), epochs=1, train_images=32, out=str(tmp_path / "py")), progress=False)
    assert not marker.exists()


def test_trust_is_given_per_invocation_not_remembered_by_a_run(capsys, tmp_path):
    m = create_model("simple_cnn", num_classes=10, in_chans=1)
    save_model(m, tmp_path / "m", config={"factory": "sepconv.models:create_model",
                                          "kwargs": {"name": "simple_cnn", "num_classes": 10, "in_chans": 1}})
    run = ["train", "--init", tmp_path / "m", "--epochs", "2", "--train-images", "32", "--out", tmp_path / "o"]
    code, _, err = run_cli(capsys, *run, "--trust-code", "--stop-after", "1")
    assert code == 0, err
    code, _, err = run_cli(capsys, *run, "--resume")  # the checkpoint names the directory; no opt-in now
    assert_one_line(code, err, "sepconv.models:create_model", "--trust-code")


@pytest.mark.parametrize("factory", ["os:system", "subprocess:call", "builtins:exec", "sepconv.models:create_model"])
def test_load_model_refuses_any_factory_without_trust_code(tmp_path, factory):
    d, marker = _evil_dir(tmp_path, factory)
    with pytest.raises(WeightsError, match="trust"):
        load_model(d)
    with pytest.raises(WeightsError, match="trust"):
        model_from_spec(str(d))
    assert not marker.exists()


def test_trust_code_is_the_explicit_opt_in(tmp_path):
    torch.manual_seed(0)
    m = create_model("simple_cnn", num_classes=3, in_chans=1)
    cfg = {"factory": "sepconv.models:create_model",
           "kwargs": {"name": "simple_cnn", "num_classes": 3, "in_chans": 1}}
    save_model(m, tmp_path / "m", config=cfg)
    with pytest.raises(WeightsError):
        load_model(tmp_path / "m")
    back = load_model(tmp_path / "m", trust_code=True)
    x = torch.randn(1, 1, 8, 8)
    assert torch.equal(back.eval()(x), m.eval()(x))


def test_trust_code_flag_lets_the_cli_load_a_trusted_factory(capsys, tmp_path):
    m = create_model("simple_cnn", num_classes=3, in_chans=1)
    save_model(m, tmp_path / "m", config={"factory": "sepconv.models:create_model",
                                          "kwargs": {"name": "simple_cnn", "num_classes": 3, "in_chans": 1}})
    code, out, err = run_cli(capsys, "spectrum", tmp_path / "m", "--trust-code", "--input-size", "8", "8",
                             "--method", "fft", "--bound", "fft")
    assert code == 0, err
    assert "network Lipschitz bound" in out


@pytest.mark.parametrize("recipe,words", [
    ([{"op": "os.system", "command": "touch x"}], ["unknown op"]),
    ("convert", ["recipe"]),
    ([["convert"]], ["recipe step 0"]),
    ([{"to": "dsc"}], ["recipe step 0"]),
    ([{"op": "convert", "to": "dsc", "layers": [{"name": "features.0"}]}], ["recipe step 0", "convert"]),
    ([{"op": "convert", "to": "dsc", "layers": "all"}], ["recipe step 0", "convert"]),
    ([{"op": "spectral_normalize", "method": "dsc", "evil": 1}], ["recipe step 0", "spectral_normalize"]),
    ([{"op": "spectral_normalize", "method": "dsc", "n_power_iterations": 10**9}], ["n_power_iterations"]),
    ([{"op": "spectral_normalize", "method": "dsc", "in_size": "huge"}], ["in_size"]),
    ([{"op": "convert", "to": "dsc", "layers": [{"name": "features.0", "rank": 10**12}]}], ["rank", "features.0"]),
    ([{"op": "convert", "to": "dsc", "layers": [{"name": "features.0", "rank": 1.5}]}], ["rank"]),
    ([{"op": "convert", "to": "bsconv_s", "layers": [{"name": "features.3", "rank": 1, "mid": 10**9}]}], ["mid"]),
    ([{"op": "convert", "to": "toaster", "layers": []}], ["toaster"]),
    ([{"op": "convert", "to": "dsc", "layers": [{"name": "classifier", "rank": 1}]}], ["classifier"]),
])
def test_malformed_recipes_are_one_line_errors(capsys, tmp_path, recipe, words):
    d = tmp_path / "m"
    save_model(create_model("simple_cnn", num_classes=3, in_chans=1), d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["recipe"] = recipe
    (d / "config.json").write_text(json.dumps(cfg))
    code, _, err = run_cli(capsys, "spectrum", d, "--input-size", "8", "8")
    assert_one_line(code, err, "config.json", *words)
    with pytest.raises(SepconvError):
        load_model(d)


@pytest.mark.parametrize("patch,words", [
    ({"kwargs": [1, 2]}, ["kwargs"]),
    ({"kwargs": {"width": "wide"}}, ["width"]),
    ({"kwargs": {"width": 1e308}}, ["width"]),
    ({"kwargs": {"num_classes": 10**12}}, ["memory budget"]),
    ({"kwargs": {"num_classes": 2.5}}, ["num_classes"]),
    ({"kwargs": {"in_chans": True}}, ["in_chans"]),
    ({"kwargs": {"no_such_option": 1}}, ["no_such_option"]),
    ({"name": ["simple_cnn"]}, ["name"]),
    ({"name": "no_such_net"}, ["no_such_net"]),
])
def test_malformed_config_values_are_one_line_errors(capsys, tmp_path, patch, words):
    d = tmp_path / "m"
    save_model(create_model("simple_cnn", num_classes=3, in_chans=1), d)
    cfg = json.loads((d / "config.json").read_text())
    for k, v in patch.items():
        cfg[k] = v if k != "kwargs" or not isinstance(v, dict) else {**cfg["kwargs"], **v}
    (d / "config.json").write_text(json.dumps(cfg))
    code, _, err = run_cli(capsys, "spectrum", d, "--input-size", "8", "8")
    assert_one_line(code, err, "config.json", *words)


def test_non_finite_json_constants_are_refused(capsys, tmp_path):
    d = tmp_path / "m"
    save_model(create_model("simple_cnn", num_classes=3, in_chans=1), d)
    text = (d / "config.json").read_text().replace('"width": 1.0', '"width": Infinity')
    (d / "config.json").write_text(text)
    code, _, err = run_cli(capsys, "spectrum", d)
    assert_one_line(code, err, "config.json", "Infinity")
