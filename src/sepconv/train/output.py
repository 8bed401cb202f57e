"""The output directory ``out`` of a run: claimed before any work, written atomically, never mixed.

A run holds an exclusive lock on ``out/.lock`` for its whole length (a second run into the same
``out`` is refused); a fresh run refuses an ``out`` that holds a previous run (:data:`RUN_FILES`)
unless ``resume=True`` continues it or ``force=True`` replaces it; ``out`` is proved writable
before any work; temporary files a killed run left behind are removed. ``metrics.jsonl`` holds
one JSON line per finished epoch.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from pathlib import Path

from ..errors import OutputError
from ..files import atomic_write_text, remove_stale_temporaries
from ..guard import os_reason, writable_dir
from ..io import CONFIG_NAME, WEIGHTS_NAME
from .config import TrainConfig

__all__ = ["LOCK_NAME", "RUN_FILES"]

#: What a run writes into ``out`` (``model`` is a directory). A fresh run refuses an ``out`` that
#: holds any of them, unless ``force=True``.
RUN_FILES = ("last.pt", "best.pt", "metrics.jsonl", "summary.json", "model")
#: The lock file a run holds for its whole length (it names the holder's pid).
LOCK_NAME = ".lock"


@contextlib.contextmanager
def _run_lock(out: Path):
    """Hold an exclusive ``flock`` on ``out/.lock`` for the block (the kernel releases it when the
    process ends, however it ends); :class:`OutputError` naming ``out`` when another run holds it."""
    path = out / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        raise OutputError(f"{path}: cannot create the run's lock file ({os_reason(e)})") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            who = f" (pid {holder})" if holder.isdigit() else ""
            raise OutputError(f"--out {out}: another run{who} holds it ({path} is locked); wait for that run "
                              "to end or choose another --out") from None
        except OSError as e:
            raise OutputError(f"{path}: cannot lock the output directory ({os_reason(e)})") from None
        with contextlib.suppress(OSError):  # who holds it, for a second run's message (a full disk may refuse)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield path
    finally:
        os.close(fd)


def _claim_output(out: Path, resume: bool, force: bool, held: contextlib.ExitStack) -> None:
    """Before any work: ``out`` is a writable directory, this run holds its lock (kept in ``held``),
    nothing is in the way of the run's files, a fresh run does not silently replace a previous one,
    and temporary files a killed run left are gone."""
    writable_dir(out, "--out")
    held.enter_context(_run_lock(out))
    for name in (*RUN_FILES, "train_config.json"):
        p = out / name
        if name == "model" and p.exists() and not p.is_dir():
            raise OutputError(f"{p}: is in the way of the run's model directory (it is a file)")
        if name != "model" and p.is_dir():
            raise OutputError(f"{p}: is in the way of the run's {name} (it is a directory)")
    if not resume and not force:
        there = [f"{n}/" if n == "model" else n for n in RUN_FILES if (out / n).exists()]
        if there:
            raise OutputError(f"--out {out}: holds a previous run ({', '.join(there)}); continue it with --resume "
                              "or replace it with --force")
    for directory in (out, out / "model"):
        if directory.is_dir():
            remove_stale_temporaries(directory)


def _remove_previous_run(out: Path) -> None:
    """``force=True``: the previous run's files go before the new run writes its own (never a mix)."""
    for p in [out / n for n in RUN_FILES if n != "model"] + [out / "model" / CONFIG_NAME, out / "model" / WEIGHTS_NAME]:
        try:
            p.unlink()
        except FileNotFoundError:
            pass
        except OSError as e:
            raise OutputError(f"{p}: cannot remove the previous run's file ({os_reason(e)})") from None
    with contextlib.suppress(OSError):  # left in place when it holds files of the user's
        (out / "model").rmdir()


def _jsonl(records: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def _metrics_upto(path: Path, epoch: int) -> list[dict]:
    """The complete lines of ``metrics.jsonl`` for epochs 1..``epoch`` (a checkpoint without its own
    metrics): what a crash after the metrics but before the checkpoint wrote is cut off."""
    records = []
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return records
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            break
        if not (isinstance(rec, dict) and rec.get("epoch") == len(records) + 1 and len(records) < epoch):
            break
        records.append(rec)
    return records


def _start_output(out: Path, cfg: TrainConfig, resume: bool, force: bool, records: list[dict]) -> None:
    """Every check passed: from here on the run writes. ``force``: the previous run's files go
    first; ``resume``: ``metrics.jsonl`` is cut to the checkpoint's ``records`` (no epoch twice,
    none after the checkpoint)."""
    if force and not resume:
        _remove_previous_run(out)
    atomic_write_text(out / "train_config.json", json.dumps(cfg.to_dict(), indent=2) + "\n")
    if resume and (records or (out / "metrics.jsonl").exists()):
        atomic_write_text(out / "metrics.jsonl", _jsonl(records))
