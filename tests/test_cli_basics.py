import subprocess
import sys

import pytest

import sepconv
from sepconv.cli import main


def test_version_and_help_exit_cleanly(capsys):
    for argv in (["--version"], ["--help"]):
        try:
            main(argv)
        except SystemExit as e:
            assert e.code == 0
    out = capsys.readouterr().out
    assert sepconv.__version__ in out and "usage" in out


def test_python_dash_m_runs_the_same_cli():
    r = subprocess.run([sys.executable, "-m", "sepconv", "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == f"sepconv {sepconv.__version__}"


def test_usage_error_is_one_line_with_status_2(capsys):
    try:
        main(["no-such-command"])
    except SystemExit as e:
        assert e.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "error" in err


def test_every_command_takes_threads_and_applies_it(capsys):
    import torch

    from sepconv.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert set(sub.choices) >= {"demo", "train", "models", "spectrum", "convert", "export", "latency"}
    for name, p in sub.choices.items():
        assert "--threads" in p._option_string_actions, name
    before = torch.get_num_threads()
    want = 1 if before != 1 else 2
    try:
        assert main(["models", "--threads", str(want)]) == 0
        assert torch.get_num_threads() == want
    finally:
        torch.set_num_threads(before)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:  # not a positive integer: a usage error, one line, status 2
        main(["models", "--threads", "0"])
    assert e.value.code == 2 and len(capsys.readouterr().err.strip().splitlines()) == 1
