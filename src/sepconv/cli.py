"""The ``sepconv`` command.

Each sub-command is a pair of functions, ``_add_<name>(subparsers)`` declaring its
arguments and ``_run_<name>(args) -> int``, listed in ``COMMANDS``. Bad input raises a
:class:`~sepconv.errors.SepconvError` (or an argparse error); :func:`main` prints one line
on stderr and returns exit status 2 -- never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

from . import __version__
from .errors import ConfigError, SepconvError

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is a single line (and exit status 2)."""

    def error(self, message: str):  # noqa: D401
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message}\n")


# ----------------------------------------------------------------- argument types


def positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}")
    return v


def nonneg_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {s!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {s!r}")
    return v


def positive_float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {s!r}") from None
    if not v > 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {s!r}")
    return v


def nonneg_float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {s!r}") from None
    if not v >= 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {s!r}")
    return v


def unit_float(s: str) -> float:
    """A number in [0, 1)."""
    v = nonneg_float(s)
    if v >= 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {s!r}")
    return v


# ----------------------------------------------------------------- sepconv models


def _add_models(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("models", help="list the model registry with parameters and FLOPs",
                       description="List the registered models with their parameters and forward FLOPs "
                                   "(2 per multiply-add, torch's FlopCounterMode) at their default input size.")
    p.add_argument("pattern", nargs="?", help="glob filter, e.g. 'resnet*'")
    p.add_argument("--conv", choices=("regular", "dsc", "bsconv_u", "bsconv_s"), default="regular",
                   help="profile this conv flavour (models that do not support it are left out)")
    p.add_argument("--num-classes", type=positive_int, default=None,
                   help="classifier size (default: 1000 for ImageNet models, 10 for the others)")
    p.add_argument("--no-flops", action="store_true", help="skip the FLOP count (faster)")
    return p


def _run_models(args) -> int:
    import torch

    from .models import count_params, create_model, list_models, model_info, profile

    names = [n for n in list_models(args.pattern) if args.conv in model_info(n).convs]
    if not names:
        raise ConfigError(f"no registered model matches {args.pattern or '*'!r} with conv={args.conv!r}")
    rows = []
    for n in names:
        info = model_info(n)
        with torch.device("meta"):  # shapes only: no memory, no initialisation, no arithmetic
            classes = args.num_classes or (1000 if "imagenet" in info.tags else 10)
            m = create_model(n, num_classes=classes, in_chans=info.input_size[0], conv=args.conv)
        flops = None if args.no_flops else profile(m, info.input_size).flops
        rows.append((n, info.family, "x".join(map(str, info.input_size[1:])), str(classes), f"{count_params(m):,}",
                     "-" if flops is None else f"{flops / 1e6:,.1f}", ",".join(info.convs)))
    header = ("model", "family", "input", "classes", "params", "MFLOPs", "conv=")
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    for r in [header] + rows:
        print("  ".join(str(c).ljust(w) if i in (0, 1, 2, 6) else str(c).rjust(w)
                        for i, (c, w) in enumerate(zip(r, widths))).rstrip())
    return 0


# ----------------------------------------------------------------- registry of commands

COMMANDS: list[tuple[Callable, Callable]] = [
    (_add_models, _run_models),
]


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sepconv", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--version", action="version", version=f"sepconv {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for add, run in COMMANDS:
        p = add(sub)
        p.set_defaults(_run=run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except SepconvError as e:
        print(f"sepconv {args.command}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"sepconv {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
