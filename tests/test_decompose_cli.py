"""`sepconv convert`: report table and JSON, the saved model fine-tunes with `sepconv train --init`,
bad input is one line with exit status 2."""

import json

import pytest
import torch

from sepconv.cli import main
from sepconv.io import load_model


def run(capsys, *argv):
    try:
        code = main(list(argv))
    except SystemExit as e:  # argparse
        code = e.code
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def test_convert_prints_the_table_writes_the_report_and_a_model_that_fine_tunes(capsys, tmp_path):
    out = tmp_path / "cv"
    code, stdout, err = run(capsys, "convert", "simple_cnn", "--to", "dsc", "--rank", "1", "--method", "gsvd",
                            "--data", "digits", "--image-size", "16", "--samples", "64", "--max-patches", "512",
                            "--out", str(out), "--no-progress")
    assert code == 0, err
    assert "features.0" in stdout and "mean output error" in stdout
    doc = json.loads((out / "report.json").read_text())
    assert doc["settings"]["to"] == "dsc" and doc["totals"]["error_on"] == "calibration"
    assert len(doc["layers"]) == 4
    model = load_model(out / "model")
    assert model(torch.zeros(1, 1, 16, 16)).shape == (1, 10)
    code, stdout, err = run(capsys, "train", "--init", str(out / "model"), "--data", "digits", "--image-size", "16",
                            "--epochs", "1", "--batch-size", "64", "--lr", "0.01", "--out", str(tmp_path / "ft"),
                            "--no-progress")
    assert code == 0, err
    assert (tmp_path / "ft" / "model" / "model.safetensors").is_file()


def test_convert_json_output(capsys, tmp_path):
    code, stdout, err = run(capsys, "convert", "resnet20", "--to", "channel", "--speedup", "3", "--input-size",
                            "16", "16", "--json", "--out", str(tmp_path / "cv"))
    assert code == 0, err
    doc = json.loads(stdout)
    assert doc["totals"]["flops_after"] < doc["totals"]["flops_before"]
    assert doc["settings"]["speedup"] == 3.0


@pytest.mark.parametrize("argv,words", [
    (["--rank", "0"], ["--rank"]),
    (["--rank", "10"], ["conv1", "full rank"]),
    (["--energy", "1.5"], ["--energy"]),
    (["--energy", "0"], ["--energy"]),
    (["--speedup", "0.5"], ["--speedup"]),
    (["--rank", "1", "--energy", "0.9"], ["not allowed"]),
    (["--method", "gsvd"], ["--data"]),
    (["--data", "no_such_data"], ["no_such_data"]),
    (["--to", "cp"], ["--to"]),
])
def test_bad_convert_input_gives_one_line_and_status_2(capsys, tmp_path, argv, words):
    code, _, err = run(capsys, "convert", "resnet20", *argv, "--out", str(tmp_path / "cv"), "--no-progress")
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for w in words:
        assert w in err, (w, err)


def test_model_without_eligible_convs_and_wrong_calibration_data_are_one_line_errors(capsys, tmp_path):
    code, _, err = run(capsys, "convert", "torch.nn:Identity", "--input-size", "8", "8", "--out", str(tmp_path / "a"))
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    # a 3-channel model calibrated on 1-channel digits
    code, _, err = run(capsys, "convert", "tests.test_decompose_cli:rgb_cnn", "--data", "digits", "--method", "gsvd",
                       "--out", str(tmp_path / "b"))
    assert code == 2 and len(err.strip().splitlines()) == 1 and "calibration" in err, err


def rgb_cnn(num_classes=10):
    from torch import nn
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, num_classes))
