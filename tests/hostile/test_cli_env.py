"""A hostile environment for the commands: outputs that cannot be written, full disks, closed
pipes, misleading paths, absurd sizes, broken weights. Each gets one line on stderr and exit 2,
before the work where it can be told before, and leaves what was there intact."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import save_file

from sepconv.io import load_model, save_model
from sepconv.models import create_model

from .conftest import assert_one_line, run_cli, run_sub, unprivileged

SMALL = ["--input-size", "8", "8"]


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    d = tmp_path / "m"
    save_model(create_model("simple_cnn", num_classes=3, in_chans=1, width=0.5), d)
    return d


# ----------------------------------------------------------------- outputs that cannot be written


@pytest.mark.parametrize("argv,words", [
    (["spectrum", "{m}", *SMALL, "--plot", "{dir}"], ["--plot", "is a directory"]),
    (["spectrum", "{m}", *SMALL, "--plot", "{file}/x.png"], ["--plot"]),
    (["convert", "{m}", "--out", "{file}"], ["--out", "not a directory"]),
    (["convert", "{m}", "--out", "{file}/sub"], ["--out"]),
    (["demo", "--quick", "--out", "{file}"], ["--out", "not a directory"]),
])
def test_outputs_in_the_way_are_refused_before_any_work(capsys, tmp_path, saved, argv, words):
    (tmp_path / "dir").mkdir()
    (tmp_path / "file").write_text("mine\n")
    t = time.perf_counter()
    code, _, err = run_cli(capsys, *[a.format(m=saved, dir=tmp_path / "dir", file=tmp_path / "file") for a in argv])
    assert_one_line(code, err, *words)
    assert (tmp_path / "file").read_text() == "mine\n"
    assert time.perf_counter() - t < 30  # refused up front, not after the demo's training


@pytest.mark.parametrize("argv", [
    ["spectrum", "{m}", *SMALL, "--plot", "{ro}/plot.png"],
    ["convert", "{m}", "--out", "{ro}"],
    ["convert", "{m}", "--out", "{ro}/new"],
    ["demo", "--quick", "--out", "{ro}"],
])
def test_read_only_output_directories_are_refused_before_any_work(capsys, readonly_dir, saved, argv):
    code, out, err = run_cli(capsys, *[a.format(m=saved, ro=readonly_dir) for a in argv])
    assert_one_line(code, err, str(readonly_dir))
    assert "permission" in err.lower() or "not permitted" in err.lower() or "read-only" in err.lower()
    assert out == ""  # no work was reported: the check came first
    assert sorted(p.name for p in readonly_dir.iterdir()) == ["existing.txt"]


@pytest.mark.parametrize("argv,name", [
    (["convert", "{m}", "--out", "{o}"], "model.safetensors"),
    (["spectrum", "{m}", *SMALL, "--plot", "{o}/p.png"], "p.png"),
])
def test_a_full_disk_is_one_line_naming_the_file(tmp_path, full_disk, saved, argv, name):
    out = full_disk if full_disk is not None else tmp_path / "o"
    r = run_sub(*[a.format(m=saved, o=out) for a in argv], fsize=None if full_disk is not None else 4096)
    line = assert_one_line(r.returncode, r.stderr, name)
    assert any(w in line for w in ("No space left", "File too large")), line
    assert not list(out.glob(".*.tmp")), "a temporary file was left behind"


def test_a_full_disk_keeps_the_previous_model_intact(tmp_path, saved):
    out = tmp_path / "o"
    first = run_sub("convert", saved, "--out", out)
    assert first.returncode == 0, first.stderr
    before = (out / "model" / "model.safetensors").read_bytes()
    r = run_sub("convert", saved, "--rank", "2", "--out", out, fsize=len(before) // 2)
    assert_one_line(r.returncode, r.stderr, "model.safetensors")
    assert (out / "model" / "model.safetensors").read_bytes() == before
    load_model(out / "model")  # still a loadable model


def test_a_closed_pipe_is_one_line_not_a_traceback():
    p = subprocess.Popen([sys.executable, "-m", "sepconv", "models"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    p.stdout.close()  # the reader is gone before the first line is written (like `| head -0`)
    err = p.stderr.read()
    p.wait(timeout=120)
    assert_one_line(p.returncode, err, "broken pipe")


# ----------------------------------------------------------------- inputs that mislead


@pytest.mark.parametrize("make,argv,words", [
    (lambda d: None, ["spectrum", "{d}/runs/missing"], ["no such directory"]),
    (lambda d: (d / "f.json").write_text("{}"), ["spectrum", "{d}/f.json"], ["is a file"]),
    (lambda d: (d / "w.txt").write_text("hello, I am not a tensor file\n"),
     ["spectrum", "simple_cnn", *SMALL, "--weights", "{d}/w.txt"], ["w.txt", "not a weights file"]),
    (lambda d: (d / "w.pt").write_bytes(b""), ["spectrum", "simple_cnn", *SMALL, "--weights", "{d}/w.pt"], ["w.pt"]),
    (lambda d: None, ["spectrum", "simple_cnn", *SMALL, "--weights", "{d}/nope.safetensors"], ["no such weights file"]),
    (lambda d: (d / "sub").mkdir(), ["spectrum", "simple_cnn", *SMALL, "--weights", "{d}/sub"], ["sub"]),
    (lambda d: (d / "m").mkdir(), ["spectrum", "{d}/m"], ["missing config.json"]),
])
def test_misleading_inputs_get_the_true_reason(capsys, tmp_path, make, argv, words):
    make(tmp_path)
    code, _, err = run_cli(capsys, *[a.format(d=tmp_path) for a in argv])
    assert_one_line(code, err, *words)
    assert "list index" not in err and "unknown model" not in err


def test_an_unreadable_weights_file_says_permission_not_missing(capsys, public_tmp):
    torch.manual_seed(0)
    w = public_tmp / "w.safetensors"
    save_file(create_model("simple_cnn", num_classes=10, in_chans=3).state_dict(), w)
    w.chmod(0o000)
    with unprivileged():
        code, _, err = run_cli(capsys, "spectrum", "simple_cnn", *SMALL, "--method", "fft", "--weights", w)
    assert_one_line(code, err, "w.safetensors", "permission denied")


def test_an_unreadable_model_directory_says_permission_not_missing(capsys, public_tmp):
    d = public_tmp / "m"
    save_model(create_model("simple_cnn", num_classes=3, in_chans=1), d)
    (d / "config.json").chmod(0o000)
    with unprivileged():
        code, _, err = run_cli(capsys, "spectrum", d, *SMALL)
    assert_one_line(code, err, "config.json", "permission denied")


# ----------------------------------------------------------------- sizes beyond the machine


@pytest.mark.parametrize("argv,words", [
    (["train", "--width", "1e308", "--epochs", "1"], ["width"]),
    (["train", "--width", "100000", "--epochs", "1"], ["memory budget"]),
    (["convert", "resnet20", "--input-size", "100000", "100000"], ["memory budget", "100000"]),
    (["convert", "simple_cnn", "--num-classes", "1000000000000"], ["memory budget"]),
])
def test_absurd_sizes_are_refused_with_the_estimate_before_allocating(capsys, tmp_path, argv, words):
    t = time.perf_counter()
    code, _, err = run_cli(capsys, *argv, "--out", tmp_path / "o")
    assert_one_line(code, err, *words)
    assert time.perf_counter() - t < 30


def test_the_memory_budget_can_be_set_and_names_itself(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("SEPCONV_MEMORY_LIMIT", "1M")
    code, _, err = run_cli(capsys, "convert", "resnet20", "--out", tmp_path / "o")
    assert_one_line(code, err, "SEPCONV_MEMORY_LIMIT", "1 MiB")
    monkeypatch.setenv("SEPCONV_MEMORY_LIMIT", "lots")
    code, _, err = run_cli(capsys, "convert", "resnet20", "--out", tmp_path / "o")
    assert_one_line(code, err, "SEPCONV_MEMORY_LIMIT", "lots")


# ----------------------------------------------------------------- broken weights


@pytest.mark.parametrize("layer", ["features.0.weight", "features.4.bias", "classifier.weight",
                                   "features.1.running_var"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_named_by_layer_in_convert(capsys, tmp_path, saved, layer, value):
    model = load_model(saved)
    sd = model.state_dict()
    if layer not in sd:
        pytest.fail(f"the test model has no {layer}; keys: {list(sd)}")
    sd[layer].view(-1)[0] = value
    save_file(sd, saved / "model.safetensors")
    code, _, err = run_cli(capsys, "convert", saved, "--out", tmp_path / "o")
    assert_one_line(code, err, layer.rsplit(".", 1)[0], "nan" if value != value else "inf")
    assert not (tmp_path / "o" / "model").exists()


# ----------------------------------------------------------------- data-free conversion of any model


def test_a_plain_sequential_converts_without_an_input_size(capsys, tmp_path, monkeypatch):
    (tmp_path / "plainnet.py").write_text(
        "import torch.nn as nn\n"
        "def make():\n"
        "    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3), nn.Flatten())\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    code, out, err = run_cli(capsys, "convert", "plainnet:make", "--rank", "full", "--out", tmp_path / "o")
    assert code == 0, err
    assert "FLOPs unknown" in out
    rep = json.loads((tmp_path / "o" / "report.json").read_text())
    assert rep["totals"]["flops_before"] is None and rep["totals"]["mean_output_error"] < 1e-5


@pytest.mark.parametrize("layer", ["features.0.weight", "classifier.weight", "features.4.running_mean"])
def test_non_finite_weights_are_named_by_layer_in_spectrum(capsys, tmp_path, saved, layer):
    sd = load_model(saved).state_dict()
    sd[layer].view(-1)[-1] = float("inf")
    save_file(sd, tmp_path / "w.safetensors")
    code, out, err = run_cli(capsys, "spectrum", saved, *SMALL, "--weights", tmp_path / "w.safetensors")
    assert_one_line(code, err, layer.rsplit(".", 1)[0], "inf")
    assert out == ""


@pytest.mark.parametrize("argv,words", [
    (["train", "--seed", "1e17"], ["--seed", "1e17"]),
    (["train", "--seed", "ten"], ["--seed"]),
    (["spectrum", "simple_cnn", "--input-size", "0", "8"], ["--input-size"]),
    (["spectrum", "simple_cnn", "--tol", "nan"], ["--tol"]),
    (["convert", "simple_cnn", "--rank", "0"], ["--rank"]),
    (["convert", "simple_cnn", "--energy", "inf"], ["--energy"]),
])
def test_numbers_that_are_not_numbers_are_usage_errors(capsys, tmp_path, argv, words):
    code, _, err = run_cli(capsys, *argv, *(["--out", tmp_path / "o"] if argv[0] != "spectrum" else []))
    assert_one_line(code, err, *words)
