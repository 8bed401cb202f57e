"""`sepconv export`, `sepconv latency` and `sepconv convert --latency`: the outputs, and bad input as
one line with exit status 2."""

import json
import sys

import onnx
import pytest

from sepconv.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


def run(capsys, *argv):
    try:
        code = main(list(argv))
    except SystemExit as e:  # argparse
        code = e.code
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def test_export_writes_a_verified_onnx_file(capsys, tmp_path):
    out = tmp_path / "m.onnx"
    code, stdout, err = run(capsys, "export", "simple_cnn", "--num-classes", "10", "--input-size", "16", "16",
                            "--data", "digits", "--samples", "8", "--out", str(out))
    assert code == 0, err
    assert "verified against torch in ONNX Runtime" in stdout and "data batch 8" in stdout
    graph = onnx.load(str(out)).graph
    assert [d.dim_param or d.dim_value for d in graph.input[0].type.tensor_type.shape.dim][1:] == [1, 16, 16]


def test_export_of_a_saved_converted_model_goes_next_to_it(capsys, tmp_path):
    code, _, err = run(capsys, "convert", "simple_cnn", "--to", "dsc", "--input-size", "16", "16",
                       "--out", str(tmp_path / "cv"), "--no-progress")
    assert code == 0, err
    code, stdout, err = run(capsys, "export", str(tmp_path / "cv" / "model"), "--input-size", "16", "16",
                            "--batch", "4")
    assert code == 0, err
    assert (tmp_path / "cv" / "model" / "model.onnx").is_file() and "batch 4;" in stdout


def test_latency_table_and_json(capsys):
    code, stdout, err = run(capsys, "latency", "simple_cnn", "--input-size", "16", "16", "--batch", "1", "2",
                            "--repeats", "2", "--json")
    assert code == 0, err
    doc = json.loads(stdout)
    assert [(r["runtime"], r["batch"]) for r in doc["rows"]] == [
        ("torch", 1), ("torch-cl", 1), ("onnxruntime", 1), ("torch", 2), ("torch-cl", 2), ("onnxruntime", 2)]
    assert all(r["calls"] == 2 and r["q1_ms"] <= r["median_ms"] <= r["q3_ms"] for r in doc["rows"])
    code, stdout, err = run(capsys, "latency", "simple_cnn", "--input-size", "16", "16", "--runtime", "torch",
                            "--repeats", "2")
    assert code == 0, err
    assert "median ms" in stdout and stdout.count("\ntorch ") == 1


def test_convert_reports_latency_next_to_flops(capsys, tmp_path):
    code, stdout, err = run(capsys, "convert", "simple_cnn", "--input-size", "16", "16", "--latency", "torch",
                            "--out", str(tmp_path / "cv"), "--no-progress")
    assert code == 0, err
    assert "latency torch (batch 1, 1 thread" in stdout and "FLOPs" in stdout
    doc = json.loads((tmp_path / "cv" / "report.json").read_text())
    (row,) = doc["latency"]
    assert row["runtime"] == "torch" and row["before_ms"] > 0 and row["after_ms"] > 0 and 0 < row["flop_ratio"] < 1


BRANCHY = '''
import torch
from torch import nn


class Branchy(nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return x * 2
        return x


def make(num_classes=10):
    return nn.Sequential(nn.Conv2d(3, 4, 3), Branchy(), nn.Flatten(), nn.LazyLinear(num_classes))
'''


def test_export_bad_input_is_one_line_with_exit_2(capsys, tmp_path, monkeypatch):
    (tmp_path / "branchy_factory.py").write_text(BRANCHY)
    monkeypatch.syspath_prepend(str(tmp_path))
    code, _, err = run(capsys, "export", "branchy_factory:make", "--input-size", "8", "8",
                       "--out", str(tmp_path / "b.onnx"))
    assert code == 2 and err.count("\n") == 1 and "1 (Branchy) cannot be exported" in err
    (tmp_path / "file").write_text("")
    code, _, err = run(capsys, "export", "simple_cnn", "--out", str(tmp_path / "file" / "m.onnx"))
    assert code == 2 and err.count("\n") == 1 and "file" in err
    code, _, err = run(capsys, "latency", "simple_cnn", "--runtime", "tensorrt")
    assert code == 2 and err.count("\n") == 1 and "invalid choice" in err
    code, _, err = run(capsys, "export", "simple_cnn", "--batch", "0")
    assert code == 2 and err.count("\n") == 1


def test_missing_onnxruntime_names_the_extra(capsys, tmp_path, monkeypatch):
    for name in ("onnxruntime", "onnx", "onnxscript"):
        monkeypatch.setitem(sys.modules, name, None)  # import fails as if not installed
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None)
    code, _, err = run(capsys, "export", "simple_cnn", "--out", str(tmp_path / "m.onnx"))
    assert code == 2 and err.count("\n") == 1 and "pip install 'sepconv[deploy]'" in err
    code, _, err = run(capsys, "latency", "simple_cnn", "--runtime", "onnxruntime")
    assert code == 2 and err.count("\n") == 1 and "pip install 'sepconv[deploy]'" in err
    code, stdout, err = run(capsys, "latency", "simple_cnn", "--input-size", "8", "8", "--repeats", "1")
    assert code == 0 and "onnxruntime" not in stdout and "not measured: onnxruntime" in err
    # refused before converting: nothing written
    for flag in (["--where-faster", "onnxruntime"], ["--latency", "onnxruntime"]):
        code, _, err = run(capsys, "convert", "simple_cnn", "--input-size", "8", "8", "--out", str(tmp_path / "cv"),
                           "--no-progress", *flag)
        assert code == 2 and err.count("\n") == 1 and "pip install 'sepconv[deploy]'" in err
        assert not (tmp_path / "cv" / "report.json").exists()


def test_fastest_forms_in_latency_and_export(capsys, tmp_path):
    code, _, err = run(capsys, "convert", "simple_cnn", "--to", "dsc", "--rank", "2", "--input-size", "16", "16",
                       "--out", str(tmp_path / "cv"), "--no-progress")
    assert code == 0, err
    model = str(tmp_path / "cv" / "model")
    code, stdout, err = run(capsys, "latency", model, "--input-size", "16", "16", "--runtime", "torch",
                            "onnxruntime", "--repeats", "2", "--forms", "fastest", "--json")
    assert code == 0, err
    doc = json.loads(stdout)
    assert doc["forms"] == "fastest" and [r["runtime"] for r in doc["rows"]] == ["torch", "onnxruntime"]
    assert isinstance(doc["allocator_tuned"], bool)
    for r in doc["rows"]:
        made, total = map(int, r["dense_blocks"].split("/"))
        branches, total2 = map(int, r["branch_blocks"].split("/"))
        assert total == total2 == 4 and 0 <= made <= 4 and 0 <= branches <= 4 - made and r["flops"] > 0
        assert r["runtime"] == "torch" or branches == 0  # ONNX Runtime's deploy form is the branches
    code, stdout, err = run(capsys, "export", model, "--input-size", "16", "16", "--forms", "fastest")
    assert code == 0, err
    assert "fastest forms in onnxruntime (batch 1, 1 thread):" in stdout and "of 4 separable blocks" in stdout
    assert "verified against torch in ONNX Runtime" in stdout
