"""Shared tools of the hostile-input tests: run the CLI in-process or in a subprocess, make a
directory read-only or a disk full for real (as root, where permission bits do not bind), and
assert the promise: exit status 2, one line on stderr, no traceback, no payload ran."""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sepconv.cli import main

MARKER = "SEPCONV_PWNED"


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """``sepconv ARGV`` in this process: (exit status, stdout, stderr)."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # argparse
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def run_sub(*argv, cwd=None, env=None, fsize: int | None = None, timeout: float = 300,
            stdin=None) -> subprocess.CompletedProcess:
    """``python -m sepconv ARGV`` in a child process; ``fsize`` caps the size of every file it
    writes (RLIMIT_FSIZE: writes beyond it fail with EFBIG, as on a full disk)."""
    def limit():
        if fsize is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
    full_env = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    return subprocess.run([sys.executable, "-m", "sepconv", *map(str, argv)], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout, preexec_fn=limit, stdin=stdin)


def assert_one_line(code, err, *words, status: int = 2) -> str:
    """Exit ``status``, exactly one line on stderr that holds every word, and no traceback."""
    assert code == status, f"exit {code}: {err}"
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err, err
    for w in words:
        assert str(w).lower() in err.lower(), (w, err)
    return lines[0]


@pytest.fixture
def readonly_dir(tmp_path):
    """A directory nobody can write, root included: ``chattr +i`` (immutable) when running as
    root, else mode 0555."""
    d = tmp_path / "readonly"
    d.mkdir()
    (d / "existing.txt").write_text("keep me\n")
    if os.geteuid() == 0:
        if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(d)]).returncode:
            pytest.fail("running as root and chattr +i is unavailable: cannot make a read-only directory")
        yield d
        subprocess.run(["chattr", "-i", str(d)])
    else:
        d.chmod(0o555)
        yield d
        d.chmod(0o755)


@pytest.fixture
def full_disk(tmp_path):
    """A directory on a real, tiny, full file system (a 256 KiB tmpfs, as root) -- or, where
    mounting is not allowed, ``None``: the tests then cap file sizes with RLIMIT_FSIZE instead."""
    d = tmp_path / "full"
    d.mkdir()
    mounted = os.geteuid() == 0 and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(d)], capture_output=True).returncode == 0
    if not mounted:
        yield None
        return
    try:
        with contextlib.suppress(OSError):  # fill it
            with open(d / "filler", "wb") as f:
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
        yield d
    finally:
        subprocess.run(["umount", str(d)])


@pytest.fixture
def public_tmp():
    """A temporary directory that every user can traverse (``tmp_path`` lives under a 0700
    directory), for tests that run as the unprivileged user."""
    import tempfile

    d = Path(tempfile.mkdtemp(prefix="sepconv-hostile-", dir="/tmp"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@contextlib.contextmanager
def unprivileged():
    """Run the block as the user ``nobody`` when the tests run as root (permission bits do not
    bind root); a no-op otherwise."""
    if os.geteuid() != 0:
        yield
        return
    os.setegid(65534)
    os.seteuid(65534)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)
