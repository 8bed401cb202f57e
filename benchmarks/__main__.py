"""Run the benchmarks and rewrite their sections of BENCHMARKS.md.

    python -m benchmarks                 # every benchmarks/bench_*.py
    python -m benchmarks spectral models # only these (bench_spectral.py, bench_models.py)
    python -m benchmarks --quick         # tiny sizes, to check the scripts run
    python -m benchmarks certified       # certified robustness against deel-torchlip and orthogonium
                                         # (bench_certified.py; 3 seeds x 40 epochs: the longest section)

Each ``bench_<name>.py`` defines ``TITLE`` and ``run(quick: bool) -> str`` (Markdown).
Only the sections that ran are replaced; the others are kept as they were.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import pkgutil
import re
import sys
import time
from pathlib import Path

import torch

from ._util import machine

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "BENCHMARKS.md"
HEADER = """# Benchmarks

Written by `make bench` (`python -m benchmarks`); do not edit by hand. Every figure is a
median over repeats; every ratio compares methods measured side by side in the same run
(absolute times drift 10-20% between runs on shared machines, ratios much less).
"""


def _available() -> list[str]:
    here = Path(__file__).resolve().parent
    return sorted(m.name[len("bench_"):] for m in pkgutil.iter_modules([str(here)]) if m.name.startswith("bench_"))


def _sections(text: str) -> dict[str, str]:
    return {m.group(1): m.group(0) for m in re.finditer(
        r"<!-- bench:(\w+) -->.*?<!-- /bench:\1 -->", text, flags=re.S)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks")
    ap.add_argument("names", nargs="*", help=f"benchmarks to run (default: all of {_available()})")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (checks the scripts; numbers are meaningless)")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args(argv)
    names = args.names or _available()
    unknown = [n for n in names if n not in _available()]
    if unknown:
        print(f"unknown benchmark(s) {unknown}; available: {_available()}", file=sys.stderr)
        return 2
    torch.set_num_threads(min(2, torch.get_num_threads()))
    out = Path(args.out)
    old = _sections(out.read_text()) if out.exists() else {}
    for name in names:
        mod = importlib.import_module(f"benchmarks.bench_{name}")
        print(f"== {name}: {mod.TITLE}", flush=True)
        t = time.perf_counter()
        body = mod.run(quick=args.quick)
        took = time.perf_counter() - t
        stamp = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
        old[name] = (f"<!-- bench:{name} -->\n## {mod.TITLE}\n\n"
                     f"*Measured {stamp}{' (--quick: sizes too small to mean anything)' if args.quick else ''}; "
                     f"{machine()}; benchmark took {took:.0f} s.*\n\n{body.strip()}\n<!-- /bench:{name} -->")
        print(body, flush=True)
    order = [n for n in _available() if n in old] + [n for n in old if n not in _available()]
    out.write_text(HEADER + "\n" + "\n\n".join(old[n] for n in order) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
