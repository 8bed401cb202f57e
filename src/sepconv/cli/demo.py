"""``sepconv demo``: reproduce the four papers' headline claims at small scale."""

from __future__ import annotations

import argparse
import sys

import torch

from ..data import list_datasets
from ..demo import BUDGETS, run_demo
from ..errors import ConfigError, DataError
from ..guard import writable_dir
from ..report import check_readme
from ..runtime import oversubscription, tune_allocator
from .args import positive_int


def add(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("demo", help="reproduce the four papers' headline claims at small scale (report.md + plots)",
                       description="Train small networks on the bundled digits data (or --data) and measure each "
                                   "paper's claim; writes OUT/report.md, OUT/report.json and OUT/plots/. "
                                   "Runs in OUT/runs/ are reused, so an interrupted demo resumes.")
    p.add_argument("--out", default="demo", metavar="DIR", help="output directory (default: demo)")
    p.add_argument("--budget", choices=list(BUDGETS), default=None,
                   help="default: every claim over --seeds seeds, about 10 minutes on 2 idle cores; quick: tiny "
                        "budgets, at most 2 minutes, tests no claim (for CI); full: 5 seeds, longer training")
    p.add_argument("--quick", action="store_true", help="the quick budget (at most 2 minutes; its verdicts are not "
                                                        "tests)")
    p.add_argument("--seeds", type=positive_int, metavar="N",
                   help="paired seeds per comparison, each testing its own fold (default: 3; quick 2, full 5)")
    p.add_argument("--data", default="digits",
                   help=f"dataset, one of {', '.join(list_datasets())} (default: the bundled digits)")
    p.add_argument("--data-dir", metavar="DIR", help="directory holding the dataset's files")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--readme", metavar="FILE", help="also rewrite FILE's demo-results block from the new report")
    return p


def run(args) -> int:
    if args.data not in list_datasets():
        raise DataError(f"unknown dataset {args.data!r}; known: {', '.join(list_datasets())}")
    if args.readme is not None:
        check_readme(args.readme)  # before the long work
    if args.quick and args.budget not in (None, "quick"):
        raise ConfigError(f"--quick and --budget {args.budget} contradict each other; give one")
    writable_dir(args.out, "--out")
    tune_allocator()  # freed step buffers stay mapped (see sepconv.runtime)
    busy = oversubscription(torch.get_num_threads())
    if busy:
        print(f"sepconv demo: warning: {busy}", file=sys.stderr)
    path = run_demo(args.out, data=args.data, data_dir=args.data_dir, device=args.device, progress=args.progress,
                    readme=args.readme, budget="quick" if args.quick else args.budget, seeds=args.seeds)
    print(f"report written to {path}")
    return 0
