"""The memory budget of one spectral computation.

Every path of :mod:`sepconv.spectral` that builds a dense matrix, a frequency grid or a block of
vectors estimates its bytes first and refuses (:class:`~sepconv.errors.ResourceError`, with the
estimate) above ``max_memory`` bytes -- by default :data:`MAX_MEMORY` (2 GiB), or
``$SEPCONV_MEMORY_LIMIT`` when set. The lowest module of the package (:mod:`~sepconv.spectral.spec`
and :mod:`~sepconv.spectral.validate` both use it); :mod:`~sepconv.spectral.validate` re-exports it.
"""

from __future__ import annotations

import numbers
import os

from .. import guard
from ..errors import ConfigError

__all__ = ["MAX_MEMORY", "budget", "check_memory"]

#: Default memory budget (bytes) of one spectral computation: ``max_memory=None``.
MAX_MEMORY = 2 * 2**30
_SMALL = 64 * 2**20


def budget(max_memory: float | None = None) -> float:
    """The memory budget in bytes: ``max_memory`` when given (``float('inf')``: no limit), else
    ``$SEPCONV_MEMORY_LIMIT`` when set, else the smaller of :data:`MAX_MEMORY` and the machine's
    budget (:func:`sepconv.guard.memory_budget`)."""
    if max_memory is None:
        if os.environ.get(guard.MEMORY_ENV):
            return guard.memory_budget()
        return min(MAX_MEMORY, guard.memory_budget())
    if isinstance(max_memory, bool) or not isinstance(max_memory, numbers.Real) or not max_memory > 0:
        raise ConfigError(f"max_memory must be a positive number of bytes, got {max_memory!r}")
    return float(max_memory)


def check_memory(nbytes: float, what: str, max_memory: float | None = None) -> None:
    """Refuse (:class:`~sepconv.errors.ResourceError`) when ``what`` needs more than :func:`budget`
    bytes; the message holds the estimate and how to raise the budget. Small requests under the
    default budget return at once (no look-up of the machine's limits in hot loops)."""
    if max_memory is None and nbytes <= _SMALL and not os.environ.get(guard.MEMORY_ENV):
        return
    limit = budget(max_memory)
    if nbytes > limit:
        guard.check_memory(nbytes, what, budget=int(min(limit, 2**63 - 1)),
                           hint="pass max_memory (bytes)")
