"""Process-level settings for CPU training and inference: keep freed memory for reuse instead of returning it.

A training step on the CPU allocates and frees the same large activation and gradient buffers
every step. glibc's malloc serves blocks above its mmap threshold (128 KiB at start, raised
dynamically up to 32 MiB, so a MobileNetV2 activation of 48 MiB at batch 64 is always above it)
with fresh ``mmap`` pages, unmaps them on free, and trims the heap top back to the kernel, so
each step pays the page faults of touching new memory again. On the virtual
machines we measure on a page fault costs ~2.6 us (0.65 ms per MiB touched, against 0.1 ms
to rewrite memory already mapped), enough to add several per cent to a MobileNetV2 step, and
more where a model allocates more (BENCHMARKS.md, spectral normalization). Inference pays the same
for its activations on every call: a separable network in PyTorch eager at a large batch, with its
input copies and wide depthwise outputs, most (BENCHMARKS.md, "Deployment speed", the allocator
table). :func:`tune_allocator` is what the ``sepconv train``, ``demo`` and ``latency`` commands call at
start (opt out with ``SEPCONV_TUNE_MALLOC=0``); a library user may call it too, or preload jemalloc/tcmalloc, which
the PyTorch CPU performance guides recommend for the same reason.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os

__all__ = ["TOP_PAD", "TRIM_THRESHOLD", "oversubscription", "tune_allocator"]

#: glibc ``mallopt`` parameters (``malloc.h``).
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX = -1, -2, -4
#: Never trim the heap top (``mallopt`` takes an int).
TRIM_THRESHOLD = 2**31 - 1
#: Grow the heap in steps of this much, so that growing it is rare.
TOP_PAD = 256 * 2**20

@functools.cache
def tune_allocator() -> bool:
    """Make glibc's malloc keep freed memory: every block comes from the heap (no ``mmap`` of its
    own, ``M_MMAP_MAX = 0``), the heap is never trimmed, and it grows by :data:`TOP_PAD` at a
    time. Freed memory then stays resident for the next step -- the process's RSS stays near its
    peak, as with jemalloc or tcmalloc. Idempotent; returns whether the settings are in effect
    (``False`` without glibc, or with ``SEPCONV_TUNE_MALLOC=0``)."""
    if os.environ.get("SEPCONV_TUNE_MALLOC", "1") == "0":
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return all(mallopt(p, v) == 1 for p, v in ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, TRIM_THRESHOLD),
                                               (_M_TOP_PAD, TOP_PAD)))


def oversubscription(threads: int, cores: int | None = None, load: float | None = None) -> str | None:
    """Why the machine is oversubscribed for work on ``threads`` threads, or ``None`` when it is not.

    Oversubscribed: the 1-minute load average (other runnable work, ``os.getloadavg``) plus our
    threads exceeds the cores by one or more: OpenMP threads then wait on each other at every
    barrier while the other work holds a core, so the message suggests ``--threads``. ``cores`` and ``load`` default to
    the machine's (``os.cpu_count()``, ``os.getloadavg()[0]``); without a load average: ``None``."""
    cores = cores or os.cpu_count() or 1
    if load is None:
        try:
            load = os.getloadavg()[0]
        except (AttributeError, OSError):
            return None
    if load + threads < cores + 1:
        return None
    fewer = max(1, min(threads - 1, int(cores - load + 0.5)))
    return (f"the machine is busy (load average {load:.1f} on {cores} cores) and this run uses {threads} torch "
            f"thread{'s' if threads > 1 else ''}: timings will be slow and noisy; stop the other work"
            + (f" or use --threads {fewer}" if threads > 1 else ""))
