"""Data files looked up and read as hostile input: regular files only, sizes checked first.

Every data file is from elsewhere. These helpers read only regular files (a FIFO, ``/dev/zero`` or
a directory in a data file's place is refused, without blocking), report a permission error as one
(never as "does not exist"), check a file's size against the memory budget
(:func:`sepconv.guard.check_memory`) before reading it, and raise one-line
:class:`~sepconv.errors.DataError` / :class:`~sepconv.errors.DataNotFoundError` naming the path.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

from ..errors import DataError, DataNotFoundError
from ..guard import check_memory, os_reason

__all__ = ["check_root", "file_kind", "find_file", "locate", "open_regular", "read_bytes", "reason",
           "stat_or_none"]


def reason(e: OSError) -> str:
    """Why an OS call failed, for a message (``os_reason``, with ELOOP named as a link loop)."""
    return "a symbolic link loop" if e.errno == errno.ELOOP else os_reason(e)


def file_kind(mode: int) -> str:
    """What a non-regular file is, for a message: ``'a FIFO (named pipe)'``."""
    for test, what in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return what
    return "a regular file" if stat.S_ISREG(mode) else "a special file"


def stat_or_none(path: Path) -> os.stat_result | None:
    """``os.stat(path)`` (links followed); ``None`` when nothing is there (a broken link included);
    :class:`DataError` naming the path and the reason when it cannot be looked at -- permission
    denied is never reported as "does not exist"."""
    try:
        return os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:
        raise DataError(f"{path}: cannot access it ({reason(e)})") from None
    except ValueError as e:  # an embedded NUL
        raise DataError(f"{str(path)!r}: not a valid path ({e})") from None


def open_regular(path: Path) -> tuple[BinaryIO, int]:
    """``(file, size)`` of ``path`` opened for reading, if it is a regular file. The open does not
    block (a FIFO where a data file belongs is refused at once, not waited on), and ``/dev/zero`` or
    a directory is refused before a byte is read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise DataError(f"{path}: cannot read it ({reason(e)})") from None
    try:
        mode, size = (st := os.fstat(fd)).st_mode, st.st_size
        if not stat.S_ISREG(mode):
            raise DataError(f"{path}: is {file_kind(mode)}, not a regular file")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "rb"), size


def read_bytes(path: Path, what: str, limit: int | None = None) -> bytes:
    """The whole of regular file ``path`` (``what``, for messages), checked against ``limit`` bytes
    and the memory budget before it is read."""
    f, size = open_regular(path)
    with f:
        if limit is not None and size > limit:
            raise DataError(f"{path}: {size} bytes, too large for {what} (at most {limit})")
        check_memory(size, f"reading {path}")
        try:
            data = f.read(size)
        except OSError as e:
            raise DataError(f"{path}: cannot read it ({reason(e)})") from None
    if len(data) != size:
        raise DataError(f"{path}: {len(data)} of {size} bytes read (the file shrank while being read)")
    return data


def find_file(path: Path, gz_ok: bool) -> Path | None:
    """``path`` (or ``path.gz``) when it is there; :class:`DataError` when what is there is not a
    regular file (a directory, a FIFO, a device, a broken link) or cannot be looked at."""
    for p in (path, path.with_name(path.name + ".gz")) if gz_ok else (path,):
        st = stat_or_none(p)
        if st is None:
            if os.path.islink(p):
                raise DataError(f"{p}: a broken symbolic link (its target does not exist)")
            continue
        if not stat.S_ISREG(st.st_mode):
            raise DataError(f"{p}: is {file_kind(st.st_mode)}, not a regular file")
        return p
    return None


def check_root(name: str, root: Path, expected: str) -> None:
    """``root`` is a directory; else :class:`DataNotFoundError` (nothing there) or
    :class:`DataError` (a file, or no permission), naming it."""
    st = stat_or_none(root)
    if st is None:
        raise DataNotFoundError(f"{name}: directory {root} does not exist; expected {expected}")
    if not stat.S_ISDIR(st.st_mode):
        raise DataError(f"{name}: {root} is {file_kind(st.st_mode)}, not a directory; expected {expected}")


def locate(name: str, root: Path, layouts: Sequence[tuple[str, Sequence[str]]],
           gz_ok: bool = False) -> tuple[int, list[Path]]:
    """First layout ``(subdir, files)`` whose files all exist under ``root``: (index, paths).

    Raises :class:`DataNotFoundError` naming the directory and the files expected there.
    """
    suffix = " (optionally .gz)" if gz_ok else ""
    expected = " or ".join(f"{(root / sub)}/{{{', '.join(files)}}}" for sub, files in layouts)
    check_root(name, root, expected + suffix)
    partial = None
    for k, (sub, files) in enumerate(layouts):
        found = [find_file(root / sub / f, gz_ok) for f in files]
        if all(found):
            return k, found  # type: ignore[return-value]
        if partial is None and any(found):
            missing = [f for f, p in zip(files, found) if p is None]
            partial = (root / sub, missing, files)
    if partial is not None:
        d, missing, files = partial
        raise DataNotFoundError(f"{name}: {d} lacks {', '.join(missing)}; expected there: "
                                f"{', '.join(files)}{suffix}")
    raise DataNotFoundError(f"{name}: no {name} files in {root}; expected {expected}{suffix}")
