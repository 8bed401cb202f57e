"""Files written whole or not at all, and the first bytes of a file read with a clear error.

The ground floor of sepconv's file handling (used by :mod:`sepconv.io`, :mod:`sepconv.report`
and :mod:`sepconv.train`): every output goes through :func:`atomic_path` (a temporary file in
the same directory, flushed, then ``os.replace``), so an interrupted write never leaves a torn
file, and an ``OSError`` (full disk, read-only directory) becomes one
:class:`~sepconv.errors.OutputError` line naming the file.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
from pathlib import Path
from typing import Any

import torch

from .errors import OutputError, SepconvError, WeightsError
from .guard import os_reason

__all__ = ["TMP_PATTERN", "atomic_path", "atomic_torch_save", "atomic_write_text", "read_head",
           "remove_stale_temporaries"]

#: Name pattern of the temporary files :func:`atomic_path` writes (``.NAME.RANDOM.tmp``).
TMP_PATTERN = ".*.*.tmp"
_UMASK_LOCK = threading.Lock()


def _umask() -> int:
    with _UMASK_LOCK:  # the only portable way to read the umask is to set it
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path next to ``path``; on success it replaces ``path`` atomically.

    On any exception the temporary file is removed and ``path`` is left untouched. The new
    file gets the permissions of a file created with ``open()`` (0666 less the umask), not
    ``mkstemp``'s 0600. An ``OSError`` (a full disk, a read-only directory, a directory in the
    way) becomes :class:`~sepconv.errors.OutputError` naming ``path`` and the reason.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        yield Path(tmp)
        with open(tmp, "rb") as f:  # flush to disk before the rename
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        if isinstance(e, OSError) and not isinstance(e, SepconvError):
            raise OutputError(f"{path}: cannot write ({os_reason(e)})") from None
        raise


def remove_stale_temporaries(directory: str | os.PathLike) -> list[Path]:
    """Remove the temporary files an interrupted :func:`atomic_path` left in ``directory``
    (``.NAME.RANDOM.tmp``); call it only where no other process is writing (e.g. under a run's
    lock). Returns the removed paths."""
    gone = []
    for p in Path(directory).glob(TMP_PATTERN):
        if p.is_file() and p.name.startswith(".") and len(p.name.split(".")) >= 4:
            with contextlib.suppress(OSError):
                p.unlink()
                gone.append(p)
    return gone


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` through :func:`atomic_path` (for checkpoints of plain tensors/dicts).

    torch reports a failed write (a full disk) as ``RuntimeError: unexpected pos``; writing
    through a Python file keeps the ``OSError`` behind it, which is what gets reported."""
    with atomic_path(path) as tmp:
        try:
            with open(tmp, "wb") as f:
                torch.save(obj, f)
        except RuntimeError as e:
            if isinstance(e.__context__, OSError):
                raise e.__context__ from None
            raise


def read_head(path: Path, what: str, n: int = 16, error: type[SepconvError] = WeightsError,
              missing: str | None = None) -> bytes:
    """The first ``n`` bytes of ``path`` (to tell its format); a missing, unreadable or
    non-regular file is an ``error`` that says which of these it is (``missing``: the words for
    a missing file, default "no such WHAT")."""
    try:
        with open(path, "rb") as f:
            return f.read(n)
    except FileNotFoundError:
        raise error(f"{path}: {missing or 'no such ' + what}") from None
    except IsADirectoryError:
        raise error(f"{path}: is a directory, not a {what}") from None
    except OSError as e:
        raise error(f"{path}: cannot read the {what} ({os_reason(e)})") from None
