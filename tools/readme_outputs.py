"""Regenerate every command output shown in README.md from the code that ships.

A README block of console output is a fenced block whose lines start with ``$ sepconv ...``: each
such command is run (in order, in one scratch directory, so a later command may read an earlier
one's ``runs/``) and the lines under it, up to the next ``$`` line or the end of the block, are
replaced by what it printed. Commands a block needs but does not show are named in an HTML comment
before it, ``<!-- readme-setup: sepconv train ... -->``, and run first. The demo's results block
is not touched here: ``sepconv demo --readme README.md`` writes it.

    python tools/readme_outputs.py            # rewrite README.md in place (a few minutes, 1 thread)
    python tools/readme_outputs.py --check    # only parse: every command must be a valid sepconv command

Run it on an idle machine: the outputs include timings.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FENCE = re.compile(r"^```(\w*)\s*$")
SETUP = re.compile(r"<!--\s*readme-setup:\s*(.+?)\s*-->")


@dataclass
class Command:
    line: int  # index of the ``$`` line in the README's lines
    end: int  # index one past the last output line
    argv: list[str]


def parse(lines: list[str]) -> tuple[list[list[str]], list[Command]]:
    """The setup commands and the shown commands of a README (as lines), in order."""
    setups, commands = [], []
    i, n = 0, len(lines)
    while i < n:
        setups += [shlex.split(m.group(1)) for m in SETUP.finditer(lines[i])]
        fence = FENCE.match(lines[i])
        if not fence:
            i += 1
            continue
        j = i + 1
        while j < n and not FENCE.match(lines[j]):
            j += 1
        if fence.group(1) == "":  # console blocks carry no language tag
            dollars = [k for k in range(i + 1, j) if lines[k].startswith("$ ")]
            for a, k in enumerate(dollars):
                argv = shlex.split(lines[k][2:])
                if argv and argv[0] == "sepconv":
                    commands.append(Command(k, dollars[a + 1] if a + 1 < len(dollars) else j, argv))
        i = j + 1
    return setups, commands  # (the setups all run first, in README order)


def run(argv: list[str], cwd: Path) -> str:
    """Run a ``sepconv ...`` command in ``cwd`` with this Python; its stdout and stderr, as shown."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
    res = subprocess.run([sys.executable, "-m", "sepconv", *argv[1:]], cwd=cwd, env=env, capture_output=True,
                         text=True, check=False)
    if res.returncode != 0:
        raise SystemExit(f"`{shlex.join(argv)}` failed with status {res.returncode}:\n{res.stderr}")
    return (res.stdout + res.stderr).rstrip("\n")


def check(commands: list[Command], setups: list[list[str]]) -> None:
    """Every command parses as a sepconv command line (no work is done)."""
    from sepconv.cli import build_parser  # noqa: PLC0415

    parser = build_parser()
    for argv in [*setups, *(c.argv for c in commands)]:
        parser.parse_args(argv[1:])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--readme", type=Path, default=ROOT / "README.md")
    p.add_argument("--check", action="store_true", help="only check that every command parses")
    args = p.parse_args()
    lines = args.readme.read_text().splitlines()
    setups, commands = parse(lines)
    check(commands, setups)
    if args.check:
        print(f"{args.readme}: {len(commands)} commands and {len(setups)} setup commands parse")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        cwd = Path(tmp)
        for argv in setups:
            print("setup:", shlex.join(argv), flush=True)
            run(argv, cwd)
        outputs = []
        for c in commands:
            print("$", shlex.join(c.argv), flush=True)
            outputs.append(run(c.argv, cwd))
    for c, out in sorted(zip(commands, outputs), key=lambda t: -t[0].line):  # from the end: indices stay valid
        lines[c.line + 1:c.end] = out.splitlines()
    args.readme.write_text("\n".join(lines) + "\n")
    print(f"{args.readme}: {len(commands)} outputs regenerated")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
