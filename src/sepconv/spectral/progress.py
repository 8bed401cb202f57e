"""Progress inside one layer's spectral search: its LOBPCG iterations and its certificate's rows.

A zero-padded layer can take minutes (a 64-channel 3x3 conv at 56x56: a certificate of 1.9e13
flops). :func:`analyze` and :func:`lipschitz_bound` with ``progress=True`` run each layer inside
:func:`layer`; the search then shows a bar (stderr, removed when done) for each step that runs
longer than :data:`DELAY` seconds -- the lower end's LOBPCG iterations, and the banded Cholesky
certificate's block rows with their count. Outside :func:`layer` the bars are disabled no-ops.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

from tqdm import tqdm

__all__ = ["DELAY", "bar", "layer"]

#: Seconds a step runs before its bar appears (short steps show nothing).
DELAY = 2.0
_LABEL: ContextVar[str | None] = ContextVar("sepconv_progress", default=None)


@contextlib.contextmanager
def layer(label: str | None) -> Iterator[None]:
    """Inside the block, the search's steps show bars named ``label`` (``None``: none)."""
    token = _LABEL.set(label)
    try:
        yield
    finally:
        _LABEL.reset(token)


def bar(what: str, total: int | None = None, unit: str = "it") -> tqdm:
    """A bar for one step of the search, ``"<layer>: <what>"``; disabled outside :func:`layer`."""
    label = _LABEL.get()
    return tqdm(total=total, desc=f"{label}: {what}", unit=unit, leave=False, delay=DELAY,
                disable=label is None, dynamic_ncols=True)
