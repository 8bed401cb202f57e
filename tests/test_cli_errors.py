"""Bad input on the command line: one line on stderr, exit status 2, no traceback."""

import json
import pickle

import pytest

from sepconv.cli import main


def run(capsys, *argv):
    try:
        code = main(list(argv))
    except SystemExit as e:  # argparse
        code = e.code
    err = capsys.readouterr().err
    return code, err


def assert_one_line(code, err, *words):
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for w in words:
        assert w in err, (w, err)


@pytest.mark.parametrize("argv,words", [
    (["train", "--epochs", "0"], ["--epochs"]),
    (["train", "--lr", "-0.1"], ["--lr"]),
    (["train", "--image-size", "0"], ["--image-size"]),
    (["train", "--batch-size", "abc"], ["--batch-size"]),
    (["train", "--model", "no_such_net", "--epochs", "1"], ["no_such_net"]),
    (["train", "--data", "no_such_data", "--epochs", "1"], ["no_such_data"]),
    (["models", "zzz*"], ["zzz"]),
])
def test_nonsense_arguments_give_one_line_and_status_2(capsys, tmp_path, argv, words):
    code, err = run(capsys, *argv, *(["--out", str(tmp_path)] if argv[0] == "train" else []))
    assert_one_line(code, err, *words)


def test_missing_data_directory_names_the_directory(capsys, tmp_path):
    missing = tmp_path / "nowhere"
    code, err = run(capsys, "train", "--data", "cifar10", "--data-dir", str(missing), "--out", str(tmp_path / "o"))
    assert_one_line(code, err, "nowhere")


def test_corrupt_data_file_names_the_file(capsys, tmp_path):
    d = tmp_path / "cifar-10-batches-bin"
    d.mkdir()
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        (d / name).write_bytes(b"\x00" * 1000)  # not a multiple of the 3073-byte record
    code, err = run(capsys, "train", "--data", "cifar10", "--data-dir", str(tmp_path), "--out", str(tmp_path / "o"))
    assert_one_line(code, err, "data_batch_1.bin")


def test_a_pickle_where_weights_are_expected_is_refused(capsys, tmp_path):
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"name": "simple_cnn", "kwargs": {"num_classes": 10, "in_chans": 1}}))
    (d / "model.safetensors").write_bytes(pickle.dumps({"weight": [1, 2, 3]}))
    code, err = run(capsys, "train", "--init", str(d), "--epochs", "1", "--out", str(tmp_path / "o"))
    assert_one_line(code, err, "model.safetensors")


def test_resume_without_checkpoint_is_a_clear_error(capsys, tmp_path):
    code, err = run(capsys, "train", "--resume", "--out", str(tmp_path / "empty"), "--epochs", "1")
    assert_one_line(code, err, "last.pt")


@pytest.mark.parametrize("argv,words", [
    (["demo", "--data", "no_such_data"], ["no_such_data"]),
    (["demo", "--data", "cifar10"], ["cifar10"]),  # no --data-dir: nothing to read
    (["demo", "--device", "cuda:7"], ["cuda:7"]),
    (["demo", "--device", "toaster"], ["toaster"]),
    (["train", "--device", "cuda:7", "--epochs", "1"], ["cuda:7"]),
])
def test_demo_and_train_refuse_bad_data_and_devices_before_any_work(capsys, tmp_path, argv, words):
    code, err = run(capsys, *argv, "--out", str(tmp_path / "o"))
    assert_one_line(code, err, *words)
    assert not (tmp_path / "o" / "runs").exists()


def test_demo_with_a_missing_data_directory_names_it(capsys, tmp_path):
    code, err = run(capsys, "demo", "--data", "mnist", "--data-dir", str(tmp_path / "nowhere"),
                    "--out", str(tmp_path / "o"))
    assert_one_line(code, err, "nowhere")
