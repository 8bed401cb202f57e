"""Hostile runs of `sepconv train`: a second run into the same --out, a fresh run over a finished
one, a crash between files, a diverging loss, a full disk, a read-only or file --out, damaged or
doctored checkpoints, clashing arguments. Each is refused with one line (exit 2) and nothing is
lost: the first run's last.pt, best.pt, model/ and metrics.jsonl stay byte for byte."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sepconv.errors import CheckpointError
from sepconv.train import Hooks, TrainConfig, TrainingDiverged, train

from .conftest import assert_one_line, run_cli, run_sub

TINY = ["--model", "simple_cnn", "--width", "0.25", "--image-size", "8", "--train-images", "64",
        "--batch-size", "16", "--no-progress"]
TINY_CFG = dict(model="simple_cnn", width=0.25, image_size=8, train_images=64, batch_size=16, epochs=2)
RUN_OUTPUTS = ("last.pt", "best.pt", "metrics.jsonl", "model/config.json", "model/model.safetensors")


def _train(capsys, out, *argv):
    return run_cli(capsys, "train", *TINY, "--out", out, *argv)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two tiny runs of the same 2-epoch config: ``done`` finished, ``half`` stopped after epoch 1."""
    torch.set_num_threads(1)
    from sepconv.cli import main

    base = tmp_path_factory.mktemp("runs")
    assert main(["train", *TINY, "--epochs", "2", "--out", str(base / "done")]) == 0
    assert main(["train", *TINY, "--epochs", "2", "--stop-after", "1", "--out", str(base / "half")]) == 0
    return base


@pytest.fixture
def done(runs, tmp_path):
    return Path(shutil.copytree(runs / "done", tmp_path / "done"))


@pytest.fixture
def half(runs, tmp_path):
    return Path(shutil.copytree(runs / "half", tmp_path / "half"))


def snapshot(d: Path) -> dict[str, bytes]:
    """Every file under ``d`` (but the lock, which holds the last holder's pid) and its bytes."""
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file() and p.name != ".lock"}


def assert_run_intact(d: Path, before: dict[str, bytes], started: bool = False) -> None:
    """The run's outputs are byte for byte what they were; unless a new invocation ``started``
    (and rewrote train_config.json), every other file too."""
    after = snapshot(d)
    for name in (*RUN_OUTPUTS, "summary.json"):
        if name in before:
            assert after.get(name) == before[name], f"{name} changed or vanished"
    if started:
        assert set(after) == set(before), set(after) ^ set(before)
    else:
        assert after == before


def metrics(d: Path) -> list[dict]:
    return [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]


def without_time(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "time_per_step"} for r in records]


def edit_checkpoint(path: Path, fn) -> None:
    state = torch.load(path, weights_only=True)
    fn(state)  # edits in place
    torch.save(state, path)


@contextlib.contextmanager
def held_lock(d: Path):
    fd = os.open(d / ".lock", os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.ftruncate(fd, 0)
        os.write(fd, b"4242\n")
        yield
    finally:
        os.close(fd)


def lock_is_free(d: Path) -> bool:
    fd = os.open(d / ".lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


# ------------------------------------------------------------------ one run at a time


@pytest.mark.parametrize("extra", [[], ["--resume"], ["--force"]])
def test_a_second_run_into_a_locked_out_is_refused_and_the_first_keeps_its_files(capsys, done, extra):
    before = snapshot(done)
    with held_lock(done):
        code, _, err = _train(capsys, done, "--epochs", "3", *extra)
    assert_one_line(code, err, str(done), "another run", "4242")
    assert_run_intact(done, before)


def test_two_real_runs_into_one_out_the_second_is_refused_while_the_first_runs(capsys, tmp_path):
    out = tmp_path / "shared"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    first = subprocess.Popen([sys.executable, "-m", "sepconv", "train", *TINY, "--epochs", "10000", "--out", str(out)],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not ((out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text()) \
                and first.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert first.poll() is None, first.communicate()
        for extra in ([], ["--resume"], ["--force"]):
            code, _, err = _train(capsys, out, "--epochs", "2", *extra)
            assert_one_line(code, err, str(out), "another run", str(first.pid))
    finally:
        first.send_signal(signal.SIGINT)
        _, err = first.communicate(timeout=120)
    assert first.returncode == 130, err
    ck = torch.load(out / "last.pt", weights_only=True)  # the first run's checkpoint, whole
    assert ck["config"]["epochs"] == 10000 and ck["epoch"] >= 1
    assert [r["epoch"] for r in metrics(out)] == list(range(1, ck["epoch"] + 1))


def test_the_lock_is_released_when_a_run_fails_or_ends(capsys, done):
    code, _, err = _train(capsys, done, "--epochs", "2", "--resume", "--optimizer", "adamw")
    assert code == 2 and lock_is_free(done)
    code, _, err = _train(capsys, done, "--epochs", "2", "--resume")
    assert code == 0, err
    assert lock_is_free(done)


# ------------------------------------------------------------------ a fresh run over a previous one


@pytest.mark.parametrize("keep", ["last.pt", "best.pt", "model", "metrics.jsonl", "summary.json", None])
def test_a_fresh_run_never_silently_replaces_a_previous_run(capsys, done, keep):
    for name in ("last.pt", "best.pt", "metrics.jsonl", "summary.json", "model"):
        if keep is not None and name != keep:
            shutil.rmtree(done / name) if name == "model" else (done / name).unlink()
    before = snapshot(done)
    code, _, err = _train(capsys, done, "--epochs", "1")
    assert_one_line(code, err, str(done), keep or "last.pt", "--resume", "--force")
    assert_run_intact(done, before)


def test_force_replaces_the_previous_run_whole(capsys, done):
    (done / "model" / "notes.txt").write_text("mine\n")
    old_best = (done / "best.pt").read_bytes()
    code, _, err = _train(capsys, done, "--epochs", "1", "--force", "--seed", "7")
    assert code == 0, err
    assert [r["epoch"] for r in metrics(done)] == [1]
    assert torch.load(done / "last.pt", weights_only=True)["epoch"] == 1
    assert (done / "best.pt").read_bytes() != old_best
    assert json.loads((done / "summary.json").read_text())["epochs"] == 1
    assert (done / "model" / "notes.txt").read_text() == "mine\n"  # a file of the user's is not ours to remove


def test_force_removes_nothing_when_a_check_refuses_the_new_run(capsys, done):
    before = snapshot(done)
    code, _, err = _train(capsys, done, "--epochs", "1", "--force", "--model-arg", "num_classes=5")
    assert_one_line(code, err, "num_classes=5", "10")
    assert_run_intact(done, before)


# ------------------------------------------------------------------ crash between files


@pytest.mark.parametrize("damage", ["repeated epochs", "partial line", "old checkpoint without metrics", "no metrics"])
def test_resume_cuts_metrics_back_to_the_checkpoint(capsys, half, runs, damage):
    lines = (half / "metrics.jsonl").read_text()
    one = json.loads(lines)
    if damage == "repeated epochs":  # a crash after the metrics of epoch 2, before its checkpoint
        (half / "metrics.jsonl").write_text(lines + json.dumps({**one, "epoch": 2}) + "\n")
    elif damage == "partial line":
        (half / "metrics.jsonl").write_text(lines + '{"epoch": 2, "train_lo')
    elif damage == "old checkpoint without metrics":
        edit_checkpoint(half / "last.pt", lambda s: s.pop("history") and None)
        (half / "metrics.jsonl").write_text(lines + json.dumps({**one, "epoch": 2}) + "\n" + lines)
    else:  # a crash after the checkpoint, before the metrics
        (half / "metrics.jsonl").unlink()
    code, _, err = _train(capsys, half, "--epochs", "2", "--resume")
    assert code == 0, err
    got = metrics(half)
    assert [r["epoch"] for r in got] == [1, 2]
    assert without_time(got) == without_time(metrics(runs / "done"))
    assert (half / "model" / "model.safetensors").read_bytes() == (
        runs / "done" / "model" / "model.safetensors"
    ).read_bytes()


# ------------------------------------------------------------------ divergence


def test_a_diverging_loss_stops_with_one_line_and_saves_nothing(capsys, tmp_path):
    out = tmp_path / "nan"
    code, out_text, err = _train(capsys, out, "--epochs", "2", "--lr", "1e30")
    assert_one_line(code, err, "diverged", "epoch 1/2", "step", "nan", "--lr")
    for name in ("last.pt", "best.pt", "model", "metrics.jsonl", "summary.json"):
        assert not (out / name).exists(), name
    assert "best test accuracy" not in out_text


def _poison_weights(model, epoch):
    with torch.no_grad():
        model.classifier.weight[0, 0] = float("inf")
    return {}


@pytest.mark.parametrize("hooks,words", [
    (Hooks(loss_terms={"boom": lambda m: torch.tensor(float("nan"))}), ["epoch 2/2", "step 1/4", "boom"]),
    (Hooks(epoch_end=[_poison_weights]), ["epoch 2/2", "classifier", "Inf"]),
])
def test_divergence_after_a_good_epoch_keeps_its_checkpoint_and_writes_no_nan_model(half, hooks, words):
    before = snapshot(half)
    with pytest.raises(TrainingDiverged) as e:
        train(TrainConfig(**TINY_CFG, out=str(half)), hooks=hooks, resume=True, progress=False)
    msg = str(e.value)
    assert "\n" not in msg and "last.pt (epoch 1) is kept" in msg
    for w in words:
        assert w in msg, (w, msg)
    assert_run_intact(half, before, started=True)
    assert lock_is_free(half)


def test_a_checkpoint_holding_nan_weights_is_refused(capsys, half):
    edit_checkpoint(half / "last.pt", lambda s: s["model"]["features.0.weight"].view(-1).__setitem__(0, float("nan")))
    before = snapshot(half)
    code, _, err = _train(capsys, half, "--epochs", "2", "--resume")
    assert_one_line(code, err, "last.pt", "features.0", "NaN")
    assert_run_intact(half, before)


# ------------------------------------------------------------------ permissions and leftovers


@pytest.mark.parametrize("umask,file_mode,dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_every_file_of_a_run_honours_the_umask(capsys, tmp_path, umask, file_mode, dir_mode):
    out = tmp_path / "u"
    old = os.umask(umask)
    try:
        code, _, err = _train(capsys, out, "--epochs", "1")
    finally:
        os.umask(old)
    assert code == 0, err
    files = [p for p in out.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"last.pt", "best.pt", "metrics.jsonl", "summary.json", "train_config.json",
                                      ".lock", "config.json", "model.safetensors"}
    for p in files:
        assert p.stat().st_mode & 0o777 == file_mode, (p, oct(p.stat().st_mode))
    for p in (out, out / "model"):
        assert p.stat().st_mode & 0o777 == dir_mode, (p, oct(p.stat().st_mode))


def test_stale_temporary_files_of_a_killed_run_are_removed_by_the_next_run(capsys, half):
    stale = [
        half / ".last.pt.k1ll3d.tmp",
        half / ".metrics.jsonl.x8y9z0.tmp",
        half / "model" / ".model.safetensors.ab12cd.tmp",
    ]
    for p in stale:
        p.write_bytes(b"\0" * 100)
    keep = half / "notes.tmp"  # not one of ours
    keep.write_text("mine")
    with held_lock(half):  # not while another run holds the directory
        code, _, err = _train(capsys, half, "--epochs", "2", "--resume")
    assert code == 2 and all(p.exists() for p in stale)
    code, _, err = _train(capsys, half, "--epochs", "2", "--resume")
    assert code == 0, err
    assert not any(p.exists() for p in stale) and keep.read_text() == "mine"


# ------------------------------------------------------------------ full disk, unwritable --out


def test_a_full_disk_during_training_is_one_line_and_resume_works_once_space_is_back(capsys, half, runs):
    before = snapshot(half)
    p = run_sub("train", *TINY, "--epochs", "2", "--resume", "--out", half, fsize=40_000,
                env={"OMP_NUM_THREADS": "1"})
    line = assert_one_line(p.returncode, p.stderr, ".pt", "file size limit")
    assert str(half) in line
    assert_run_intact(half, before, started=True)
    assert torch.load(half / "last.pt", weights_only=True)["epoch"] == 1
    code, _, err = _train(capsys, half, "--epochs", "2", "--resume")
    assert code == 0, err
    assert without_time(metrics(half)) == without_time(metrics(runs / "done"))


def _fill(d: Path) -> None:
    with contextlib.suppress(OSError):
        with open(d / "filler", "wb") as f:
            while True:
                f.write(b"\0" * 4096)
                f.flush()


def test_a_really_full_disk_keeps_the_run_whole(capsys, full_disk, runs, tmp_path):
    if full_disk is None:
        pytest.skip("cannot mount a tmpfs here (not root); the RLIMIT_FSIZE test covers a full disk")
    (full_disk / "filler").unlink()
    run = Path(shutil.copytree(runs / "half", full_disk / "run"))
    _fill(full_disk)
    before = snapshot(run)
    code, _, err = _train(capsys, run, "--epochs", "2", "--resume")
    assert_one_line(code, err, str(run), "No space left on device")
    assert_run_intact(run, before)
    moved = Path(shutil.copytree(run, tmp_path / "moved"))  # space is back (elsewhere): the run goes on
    code, _, err = _train(capsys, moved, "--epochs", "2", "--resume")
    assert code == 0, err
    assert [r["epoch"] for r in metrics(moved)] == [1, 2]


def test_out_naming_a_file_is_refused_before_any_work(capsys, tmp_path):
    f = tmp_path / "results.txt"
    f.write_text("precious\n")
    code, _, err = _train(capsys, f, "--epochs", "1")
    assert_one_line(code, err, str(f), "not a directory")
    assert f.read_text() == "precious\n"


@pytest.mark.parametrize("sub", ["", "run"])
def test_a_read_only_out_is_refused_before_any_work(capsys, readonly_dir, sub):
    out = readonly_dir / sub if sub else readonly_dir
    code, _, err = _train(capsys, out, "--epochs", "1")
    assert_one_line(code, err, str(out))
    assert sorted(p.name for p in readonly_dir.iterdir()) == ["existing.txt"]


@pytest.mark.parametrize("name", ["last.pt", "metrics.jsonl", "model"])
def test_something_in_the_way_of_a_run_file_is_named(capsys, done, name):
    target = done / name
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    if name == "model":
        target.write_text("a file where the model directory goes\n")
    else:
        target.mkdir()
    before = snapshot(done)
    code, _, err = _train(capsys, done, "--epochs", "2", "--force")
    assert_one_line(code, err, str(target), "in the way")
    assert snapshot(done) == before


# ------------------------------------------------------------------ checkpoints for --resume


def _resume(capsys, d, *extra):
    return _train(capsys, d, "--epochs", "2", "--resume", *extra)


@pytest.mark.parametrize("key", ["config", "model", "optimizer", "scheduler", "rng", "epoch", "step", "best_acc"])
def test_a_checkpoint_missing_an_entry_is_refused_naming_it(capsys, half, key):
    edit_checkpoint(half / "last.pt", lambda s: s.pop(key) and None)
    before = snapshot(half)
    code, _, err = _resume(capsys, half)
    assert_one_line(code, err, "last.pt", f"'{key}'")
    assert_run_intact(half, before)


@pytest.mark.parametrize("key,value", [("epoch", "1"), ("epoch", 1.0), ("epoch", True), ("step", 0.5),
                                       ("model", [1, 2]), ("rng", None), ("config", "simple_cnn"),
                                       ("best_acc", "high"), ("optimizer", torch.zeros(3))])
def test_a_checkpoint_entry_of_the_wrong_type_is_refused(capsys, half, key, value):
    edit_checkpoint(half / "last.pt", lambda s: s.__setitem__(key, value))
    before = snapshot(half)
    code, _, err = _resume(capsys, half)
    assert_one_line(code, err, "last.pt", f"'{key}'")
    assert_run_intact(half, before)


@pytest.mark.parametrize("patch,words", [
    ({"epoch": -4}, ["'epoch' is -4"]),
    ({"epoch": 5}, ["epoch 5", "--epochs 2"]),
    ({"step": 99}, ["'step' is 99", "4 steps"]),
    ({"step": 2}, ["'running'"]),
    ({"epoch": 2, "step": 1}, ["past --epochs 2"]),
    ({"best_acc": float("nan")}, ["best_acc"]),
    ({"history": [{"epoch": 7}]}, ["history"]),
])
def test_a_checkpoint_at_an_impossible_place_is_refused(capsys, half, patch, words):
    edit_checkpoint(half / "last.pt", lambda s: s.update(patch))
    before = snapshot(half)
    code, _, err = _resume(capsys, half)
    assert_one_line(code, err, "last.pt", *words)
    assert_run_intact(half, before)


@pytest.mark.parametrize("extra,key", [
    (["--optimizer", "adamw"], "optimizer"), (["--train-images", "48"], "train_images"), (["--lr", "0.01"], "lr"),
    (["--seed", "1"], "seed"), (["--width", "0.5"], "width"), (["--no-augment"], "augment"),
    (["--label-smoothing", "0.1"], "label_smoothing"), (["--batch-size", "8"], "batch_size"),
])
def test_resume_refuses_settings_that_would_make_it_another_run(capsys, half, extra, key):
    before = snapshot(half)
    code, _, err = _resume(capsys, half, *extra)
    assert_one_line(code, err, "last.pt", key, "--force")
    assert_run_intact(half, before)


def test_resume_may_grow_the_epochs_and_change_how_it_runs(capsys, done):
    first = (done / "metrics.jsonl").read_text()
    code, _, err = _train(capsys, done, "--epochs", "3", "--resume", "--no-channels-last")
    assert code == 0, err
    assert (done / "metrics.jsonl").read_text().startswith(first)
    assert [r["epoch"] for r in metrics(done)] == [1, 2, 3]


@pytest.mark.parametrize(
    "edit,words",
    [
        (lambda s: s["model"].pop("classifier.bias"), ["'model'", "classifier.bias"]),
        (lambda s: s["model"].__setitem__("extra.weight", torch.zeros(2)), ["'model'", "extra.weight"]),
        (lambda s: s["model"].__setitem__("classifier.weight", torch.zeros(3, 3)), ["classifier.weight", "(3, 3)"]),
        (lambda s: s["optimizer"]["param_groups"].pop(), ["'optimizer'"]),
        (
            lambda s: s["optimizer"]["state"][0].__setitem__("momentum_buffer", torch.zeros(5)),
            ["'optimizer'", "momentum_buffer", "(5,)"],
        ),
        (lambda s: s["scheduler"].__setitem__("last_epoch", 3), ["'scheduler'", "step 4"]),
        (lambda s: s["scheduler"].__setitem__("optimizer", 1), ["'scheduler'", "optimizer"]),
    ],
)
def test_states_that_do_not_fit_the_model_are_refused_naming_the_key(capsys, half, edit, words):
    edit_checkpoint(half / "last.pt", edit)
    before = snapshot(half)
    code, _, err = _resume(capsys, half)
    assert_one_line(code, err, "last.pt", *words)
    assert_run_intact(half, before)


@pytest.mark.parametrize("edit,words", [
    (lambda s: s["rng"].__setitem__("torch", torch.zeros(10, dtype=torch.uint8)), ["torch state"]),
    (lambda s: s["rng"].__setitem__("torch", torch.zeros(5056)), ["torch state"]),
    (lambda s: s["rng"]["numpy"].__setitem__(1, torch.zeros(3, dtype=torch.int64)), ["numpy"]),
    (lambda s: s["rng"].__setitem__("python", [3, [1, 2, 3], None]), ["python state"]),
    (lambda s: s["rng"].__setitem__("python", "seeded"), ["python state"]),
    (lambda s: s["rng"].pop("numpy"), ["'numpy'"]),
])
def test_a_malformed_rng_state_is_refused(capsys, half, edit, words):
    edit_checkpoint(half / "last.pt", edit)
    before = snapshot(half)
    state = torch.random.get_rng_state()
    code, _, err = _resume(capsys, half)
    assert_one_line(code, err, "last.pt", "'rng'", *words)
    assert_run_intact(half, before)
    assert torch.equal(torch.random.get_rng_state(), state)  # refused before any generator was touched


@pytest.mark.parametrize("content,words", [
    (b"", ["empty"]),
    (b"epoch=1\nthis is not a checkpoint\n", ["not a torch checkpoint"]),
    ("truncated", ["not a readable checkpoint"]),
    ("directory", ["is a directory"]),
])
def test_a_file_that_is_not_a_checkpoint_is_refused(capsys, half, content, words):
    ck = half / "last.pt"
    if content == "truncated":
        ck.write_bytes(ck.read_bytes()[: ck.stat().st_size // 2])
    elif content == "directory":
        ck.unlink()
        ck.mkdir()
    else:
        ck.write_bytes(content)
    before = snapshot(half)
    code, _, err = _resume(capsys, half)
    assert_one_line(code, err, "last.pt", *words)
    assert snapshot(half) == before


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("how", ["pickle", "torch.save"])
def test_a_pickle_payload_in_last_pt_never_runs(capsys, half, tmp_path, how):
    marker = tmp_path / "SEPCONV_PWNED"
    if how == "pickle":
        (half / "last.pt").write_bytes(pickle.dumps(_Payload(marker)))
    else:
        state = torch.load(half / "last.pt", weights_only=True)
        state["rng"] = _Payload(marker)
        torch.save(state, half / "last.pt")
    before = snapshot(half)
    code, _, err = _resume(capsys, half)
    assert_one_line(code, err, "last.pt", "refused", "run code")
    assert not marker.exists()
    assert snapshot(half) == before
    with pytest.raises(CheckpointError):  # the library says the same
        train(TrainConfig(**TINY_CFG, out=str(half)), resume=True, progress=False)
    assert not marker.exists()


# ------------------------------------------------------------------ arguments


@pytest.mark.parametrize("kwargs,words", [
    ({"num_classes": 5, "in_chans": 1}, ["5 output classes", "has 10"]),
    ({"num_classes": 10, "in_chans": 3}, ["3 input channels", "has 1"]),
])
def test_init_made_for_other_data_is_refused_naming_both_numbers(capsys, tmp_path, kwargs, words):
    from sepconv.io import save_model
    from sepconv.models import create_model

    save_model(create_model("simple_cnn", width=0.25, **kwargs), tmp_path / "m")
    code, _, err = _train(capsys, tmp_path / "o", "--epochs", "1", "--init", tmp_path / "m")
    assert_one_line(code, err, "--init", str(tmp_path / "m"), *words)
    assert not (tmp_path / "o" / "last.pt").exists()


@pytest.mark.parametrize("arg,words", [
    ("num_classes=5", ["num_classes=5", "10 classes"]),
    ("in_chans=3", ["in_chans=3", "1 input channels"]),
    ("conv=dsc", ["conv='dsc'", "--conv regular"]),
    ("width=2", ["width=2", "--width 0.25"]),
    ("name=resnet20", ["name='resnet20'", "--model simple_cnn"]),
])
def test_model_args_clashing_with_a_flag_or_the_data_are_refused(capsys, tmp_path, arg, words):
    code, _, err = _train(capsys, tmp_path / "o", "--epochs", "1", "--model-arg", arg)
    assert_one_line(code, err, "--model-arg", *words)
    assert not (tmp_path / "o" / "train_config.json").exists()


def test_model_args_do_not_apply_with_init(capsys, done, tmp_path):
    code, _, err = _train(
        capsys, tmp_path / "o", "--epochs", "1", "--init", done / "model", "--model-arg", "norm=false"
    )
    assert_one_line(code, err, "--model-arg", "--init")


@pytest.mark.parametrize("seed", [100000000000000000, -1, 2**70 + 3])
def test_any_integer_seed_trains_and_equals_its_value_modulo_2_64(capsys, tmp_path, seed):
    code, _, err = _train(capsys, tmp_path / "a", "--epochs", "1", "--seed", seed)
    assert code == 0, err
    code, _, err = _train(capsys, tmp_path / "b", "--epochs", "1", "--seed", seed % 2**64 + (2**64 if seed < 0 else 0))
    assert code == 0, err
    assert (tmp_path / "a" / "model" / "model.safetensors").read_bytes() == \
        (tmp_path / "b" / "model" / "model.safetensors").read_bytes()


def test_a_training_step_above_the_memory_budget_is_refused_with_the_estimate(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("SEPCONV_MEMORY_LIMIT", "100M")
    out = tmp_path / "big"
    code, _, err = run_cli(capsys, "train", "--model", "simple_cnn", "--width", "2", "--image-size", "32",
                           "--train-images", "1024", "--batch-size", "1024", "--epochs", "1", "--out", out)
    assert_one_line(code, err, "training step", "batch 1024", "needs about", "MiB", "--batch-size")
    assert sorted(p.name for p in out.iterdir()) == [".lock"]


@pytest.mark.parametrize("extra,words", [
    (["--width", "1e308"], ["width"]),
    (["--batch-size", str(10**9)], ["1000000000", "64 training images"]),
    (["--epochs", str(10**12), "--warmup-epochs", "1e13"], ["warmup"]),
])
def test_absurd_sizes_are_one_line_errors(capsys, tmp_path, extra, words):
    code, _, err = _train(capsys, tmp_path / "o", *extra)
    assert_one_line(code, err, *words)
