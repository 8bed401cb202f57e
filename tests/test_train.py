"""The training engine: exact resume, SIGINT, DDP, metrics, accuracy on digits."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from sepconv.train import Hooks, TrainConfig, lr_factor, train

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
TINY = dict(model="simple_cnn", width=0.5, data="digits", image_size=16, batch_size=32, lr=0.05)


def _weights(path):
    from sepconv.io import load_state_dict

    return load_state_dict(path / "model")


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_stop_and_resume_gives_bit_identical_weights(tmp_path):
    torch.set_num_threads(1)
    straight = train(TrainConfig(**TINY, epochs=2, out=str(tmp_path / "a")), progress=False)
    train(TrainConfig(**TINY, epochs=2, out=str(tmp_path / "b")), progress=False, stop_after_epochs=1)
    resumed = train(TrainConfig(**TINY, epochs=2, out=str(tmp_path / "b")), progress=False, resume=True)
    assert _same(straight.model.state_dict(), resumed.model.state_dict())
    assert _same(_weights(tmp_path / "a"), _weights(tmp_path / "b"))
    lines = [json.loads(l) for l in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2]
    assert lines == [json.loads(l) | {"time_per_step": lines[i]["time_per_step"]}
                     for i, l in enumerate((tmp_path / "a" / "metrics.jsonl").read_text().splitlines())]
    ck = torch.load(tmp_path / "b" / "last.pt", weights_only=True)
    assert {"model", "optimizer", "scheduler", "rng", "epoch", "step"} <= ck.keys() and ck["epoch"] == 2
    assert (tmp_path / "b" / "best.pt").is_file()


def _cli(*args, **kw):
    return subprocess.Popen([sys.executable, "-m", "sepconv", *args], env=ENV, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def test_sigint_saves_a_checkpoint_exits_130_and_resumes_exactly(tmp_path):
    common = ["train", "--model", "simple_cnn", "--width", "0.5", "--image-size", "16", "--batch-size", "16",
              "--epochs", "6", "--no-progress"]
    p = _cli(*common, "--out", str(tmp_path / "int"))
    metrics = tmp_path / "int" / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.exists() and metrics.read_text().strip()) and p.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    ck = torch.load(tmp_path / "int" / "last.pt", weights_only=True)
    assert ck["epoch"] < 6
    done = len(metrics.read_text().splitlines())
    r = _cli(*common, "--out", str(tmp_path / "int"), "--resume")
    straight = _cli(*common, "--out", str(tmp_path / "straight"))
    assert r.wait(300) == 0 and straight.wait(300) == 0
    assert _same(_weights(tmp_path / "int"), _weights(tmp_path / "straight"))
    assert len(metrics.read_text().splitlines()) == 6 and done >= 1


def test_two_process_ddp_matches_single_process_and_ranks_agree(tmp_path):
    args = ["train", "--model", "simple_cnn", "--model-arg", "norm=false", "--width", "0.5", "--image-size", "16",
            "--batch-size", "32", "--epochs", "1", "--no-augment", "--no-progress", "--lr", "0.02"]
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", "29617", "-m", "sepconv", *args, "--out", str(tmp_path / "ddp")],
                         env=ENV, capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-2000:]
    single = subprocess.run([sys.executable, "-m", "sepconv", *args, "--out", str(tmp_path / "one")],
                            env=ENV, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-2000:]
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["ranks_in_sync"] is True
    # only rank 0 prints: one summary line per epoch and one final line, as a single process does
    assert ddp.stdout.count("epoch 1/1 ") == 1 and ddp.stdout.count("best test accuracy") == 1, ddp.stdout
    head = lambda text: [line.split("  ")[0].split(";")[0] for line in text.splitlines()]  # noqa: E731
    assert head(ddp.stdout) == head(single.stdout)
    a, b = _weights(tmp_path / "ddp"), _weights(tmp_path / "one")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
    assert not any(torch.equal(a[k], torch.zeros_like(a[k])) for k in a if k.endswith("weight"))


def test_three_epochs_on_digits_reach_90_percent(tmp_path):
    res = train(TrainConfig(model="simple_cnn", data="digits", epochs=3, out=str(tmp_path)), progress=False)
    assert res.history[-1]["test_acc"] >= 0.90, res.history


def test_loss_terms_are_added_and_logged():
    calls = []

    def term(model):
        calls.append(1)
        return 1e-3 * sum(p.square().sum() for p in model.parameters())

    import tempfile

    with tempfile.TemporaryDirectory() as d:
        res = train(TrainConfig(**TINY, epochs=1, out=d), hooks=Hooks(loss_terms={"l2": term}), progress=False)
        rec = json.loads(open(os.path.join(d, "metrics.jsonl")).read())
    assert len(calls) == res.history[0]["steps"] and rec["loss_l2"] > 0


def test_train_images_limits_each_epoch_to_the_first_n_images(tmp_path, capsys):
    res = train(TrainConfig(**TINY, epochs=1, train_images=70, out=str(tmp_path / "a")), progress=False)
    assert res.history[0]["steps"] == 2  # 70 images, batch 32
    from sepconv.cli import main

    try:
        code = main(["train", "--train-images", "0", "--out", str(tmp_path / "b")])
    except SystemExit as e:
        code = e.code
    assert code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--train-images" in err


@pytest.mark.parametrize("schedule,expect", [("constant", [1, 1, 1]), ("step", [1, 0.1, 0.01]),
                                             ("cosine", [1, 0.5, 0])])
def test_learning_rate_schedules(schedule, expect):
    cfg = TrainConfig(epochs=2, schedule=schedule, milestones=(1, 2) if schedule == "step" else ())
    got = [lr_factor(cfg, s, 10) for s in (0, 10, 20)]
    assert got == pytest.approx(expect, abs=1e-12)


def test_resume_refuses_a_checkpoint_of_another_model(tmp_path):
    from sepconv.errors import CheckpointError

    train(TrainConfig(**TINY, epochs=1, out=str(tmp_path)), progress=False)
    with pytest.raises(CheckpointError, match="width"):
        train(TrainConfig(**{**TINY, "width": 1.0}, epochs=2, out=str(tmp_path)), progress=False, resume=True)


def test_bsconv_s_mobilenet_trains_with_the_penalty_logged_and_falling(tmp_path):
    from sepconv.cli import main

    torch.set_num_threads(1)
    out = tmp_path / "bss"
    assert main(["train", "--model", "cifar_mobilenet_v2", "--conv", "bsconv_s", "--width", "0.25",
                 "--image-size", "8", "--epochs", "3", "--batch-size", "64", "--no-progress", "--out", str(out)]) == 0
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2, 3]
    pen = [r["loss_bsconv"] for r in lines]  # alpha defaults to 0.1 for conv=bsconv_s
    assert all(p > 0 for p in pen) and pen[-1] < pen[0]
    cfg = json.loads((out / "train_config.json").read_text())
    assert cfg["bsconv_alpha"] == 0.1


def test_under_torchrun_an_error_is_said_once_not_once_per_rank(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "last.pt").write_bytes(b"someone else's run")
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", "29618", "-m", "sepconv", "train", "--model", "simple_cnn",
                          "--width", "0.5", "--image-size", "16", "--epochs", "1", "--no-progress", "--out", str(out)],
                         env=ENV, capture_output=True, text=True, timeout=300)
    assert ddp.returncode != 0
    assert ddp.stderr.count("sepconv train: error:") == 1, ddp.stderr[-2000:]
    assert "--force" in ddp.stderr and (out / "last.pt").read_bytes() == b"someone else's run"
