"""The exceptions sepconv raises for bad input.

Every error is a :class:`SepconvError`; the command line turns one into a single line on
stderr and exit status 2. Each subclass also derives from the built-in exception a Python
user would expect (``ValueError``, ``FileNotFoundError``, ``KeyError``...), so generic
``except ValueError`` code keeps working. Messages name the layer, file or argument at
fault and the reason, in one line.
"""

from __future__ import annotations

__all__ = [
    "SepconvError",
    "ConfigError",
    "DataError",
    "DataNotFoundError",
    "ModelError",
    "UnknownModelError",
    "UnsupportedLayerError",
    "WeightsError",
    "CheckpointError",
    "ResourceError",
    "OutputError",
    "MissingDependencyError",
    "ExportError",
    "one_line",
]


def one_line(e: BaseException) -> str:
    """``e``'s message on one line (white space folded), or its type's name when it has none."""
    return " ".join(str(e).split()) or type(e).__name__


class SepconvError(Exception):
    """Base class of every error sepconv raises on purpose."""


class ConfigError(SepconvError, ValueError):
    """An argument or setting is out of range or inconsistent (epochs 0, lr < 0, ...)."""


class DataError(SepconvError, ValueError):
    """A dataset is unknown, or its files are missing or malformed."""


class DataNotFoundError(DataError, FileNotFoundError):
    """The files a dataset needs are not in the given directory."""


class ModelError(SepconvError, ValueError):
    """A model name is unknown, or a model/combination of options makes no sense."""


class UnknownModelError(ModelError, KeyError):
    """No model of that name is registered."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class UnsupportedLayerError(ModelError):
    """A layer or operation that a tool cannot handle (and will not silently ignore)."""


class WeightsError(SepconvError, ValueError):
    """A weights or model file is missing, malformed, or unsafe (e.g. a pickle)."""


class CheckpointError(SepconvError, ValueError):
    """A training checkpoint is missing, malformed or does not match the run."""


class ResourceError(SepconvError, MemoryError):
    """The work would need more memory than the budget (:func:`sepconv.guard.memory_budget`)."""


class OutputError(SepconvError, OSError):
    """An output cannot be written: a read-only or missing directory, a file in the way, a full disk."""

    def __str__(self) -> str:  # OSError would format (errno, strerror)
        return str(self.args[0]) if self.args else ""


class MissingDependencyError(SepconvError, ImportError):
    """An optional dependency is not installed; the message names the extra that brings it."""


class ExportError(SepconvError, ValueError):
    """A model cannot be exported, or its exported file does not compute what the model computes."""
