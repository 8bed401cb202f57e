"""The ``sepconv`` command.

Each sub-command is one module of this package with two functions, ``add(subparsers)``
declaring its arguments and ``run(args) -> int``, listed in :data:`COMMANDS`; argument types
shared between commands are in :mod:`sepconv.cli.args`. Bad input raises a
:class:`~sepconv.errors.SepconvError` (or an argparse error); :func:`main` prints one line on
stderr and returns exit status 2 -- never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from .. import __version__
from ..errors import SepconvError
from ..guard import os_reason
from . import convert, demo, export, latency, models, spectrum, train
from .args import add_threads

__all__ = ["COMMANDS", "EXIT_BAD_INPUT", "EXIT_INTERRUPTED", "build_parser", "main"]

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is a single line (and exit status 2)."""

    def error(self, message: str):  # noqa: D401
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message}\n")


# ----------------------------------------------------------------- registry of commands

# a new command: a module with add(sub) and run(args), and one line here
COMMANDS: list[tuple[Callable, Callable]] = [
    (demo.add, demo.run),
    (train.add, train.run),
    (models.add, models.run),
    (spectrum.add, spectrum.run),
    (convert.add, convert.run),
    (export.add, export.run),
    (latency.add, latency.run),
]


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sepconv", description="Depthwise separable convolutions: blocks, exact "
                     "spectral norms, spectral normalization, conversion of trained convs.")
    parser.add_argument("--version", action="version", version=f"sepconv {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for add, run in COMMANDS:
        p = add(sub)
        if "--threads" not in p._option_string_actions:  # every command takes --threads N
            add_threads(p)
        p.set_defaults(_run=run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)

    def fail(message: str) -> int:
        print(f"sepconv {args.command}: error: {' '.join(message.split())}", file=sys.stderr)
        return EXIT_BAD_INPUT

    if isinstance(getattr(args, "threads", None), int):  # (sepconv latency takes a list: it sets its own)
        import torch  # noqa: PLC0415 -- every command imports it anyway; --help and usage errors need not wait

        torch.set_num_threads(args.threads)
    try:
        code = int(args._run(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
        return code
    except SepconvError as e:
        if _other_rank():  # under torchrun every rank raises the same error: rank 0 says it once
            return EXIT_BAD_INPUT
        return fail(str(e))
    except BrokenPipeError:  # `sepconv models | head`: the reader left; say so once, quietly
        _silence_stdout()
        return fail("standard output was closed before all output was written (broken pipe)")
    except OSError as e:  # the environment (a full disk, a read-only file) beyond the checked outputs

        return fail(f"{e.filename + ': ' if getattr(e, 'filename', None) else ''}{os_reason(e)}")
    except MemoryError:
        return fail("out of memory (lower the sizes, or set SEPCONV_MEMORY_LIMIT to have sepconv refuse "
                    "such work up front)")
    except KeyboardInterrupt as e:
        where = f" ({e})" if str(e) else ""
        print(f"sepconv {args.command}: interrupted{where}", file=sys.stderr)
        return EXIT_INTERRUPTED


def _other_rank() -> bool:
    """A process of a torchrun job other than rank 0."""
    return os.environ.get("RANK", "0") != "0" and int(os.environ.get("WORLD_SIZE", "1")) > 1


def _silence_stdout() -> None:
    """Point stdout at /dev/null so that Python's final flush cannot raise again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # stdout replaced by a non-file (tests)
        pass


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
