import subprocess
import sys

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
