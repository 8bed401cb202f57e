"""``sepconv spectrum``: per-layer spectral norms and a certified network Lipschitz bound."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time

from torch import nn

from ..errors import ConfigError
from ..guard import writable_file
from ..io import model_from_spec
from ..plots import spectrum_plot
from ..spectral import analyze, certificate_budget, curvature_bound, lipschitz_bound, method_names
from .args import add_trust_code, input_shape, model_arg, positive_float, positive_int


def add(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("spectrum", help="per-layer spectral norms (exact and bounds) and a certified "
                                        "network Lipschitz bound")
    p.add_argument("model", metavar="MODEL", help="registry name, saved model directory, or package.module:callable")
    p.add_argument("--weights", metavar="FILE", help="state dict (.safetensors or .pt) loaded strictly on top")
    p.add_argument("--num-classes", type=positive_int, default=None, help="classifier size (to match --weights)")
    p.add_argument("--model-arg", type=model_arg, action="append", default=[], metavar="KEY=VALUE",
                   help="extra constructor argument of a registry model (repeatable), e.g. act=softplus")
    p.add_argument("--input-size", nargs=2, type=positive_int, metavar=("H", "W"),
                   help="input height and width (default: the model's registered size; required for other models)")
    p.add_argument("--method", nargs="+", choices=method_names(), metavar="METHOD",
                   default=["exact", "upper", "fft", "gram", "fantastic4", "reshape"],
                   help=f"per-layer methods, any of {', '.join(method_names())} (default: all but power)")
    p.add_argument("--bound", choices=method_names(kind="certified"), default="upper",
                   help="certified method for the network Lipschitz bound (default: upper)")
    p.add_argument("--input-bound", type=positive_float, metavar="R",
                   help="largest input l2 norm; needed to bound products of activations (squeeze-excitation)")
    p.add_argument("--tol", type=positive_float, default=1e-4,
                   help="relative tolerance of exact values and of the network bound's layers (default 1e-4)")
    p.add_argument("--certificate-flops", type=positive_float, default=None, metavar="FLOPS",
                   help="most a zero-padded layer's certificate may cost (default 2e11: seconds on 2 cores; "
                        "BENCHMARKS.md); more certifies larger layers to --tol, e.g. 2e14 every conv of ResNet-50 "
                        "at 224x224 (with SEPCONV_MEMORY_LIMIT=8G: their certificates take up to 3 GB)")
    p.add_argument("--curvature", action="store_true",
                   help="also the certified curvature bound (largest |eigenvalue| of each logit's input Hessian; "
                        "smooth activations only), from the --bound method's per-layer norms")
    p.add_argument("--layer", metavar="NAME",
                   help="layer whose singular value spectrum is plotted (default: largest norm)")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of the table")
    p.add_argument("--plot", metavar="FILE", help="write a PNG: per-layer norms by method and one layer's spectrum")
    add_trust_code(p)
    return p


def run(args) -> int:
    if args.plot:
        writable_file(args.plot, "--plot")  # before the work, not after it
    model = model_from_spec(args.model, num_classes=args.num_classes, weights=args.weights,
                            trust_code=args.trust_code, **dict(args.model_arg))
    shape = input_shape(model, args)
    if args.layer is not None and not isinstance(dict(model.named_modules()).get(args.layer), nn.Conv2d):
        raise ConfigError(f"--layer {args.layer!r}: no such Conv2d in the model")
    progress = not args.json and sys.stderr.isatty()
    budget = (certificate_budget(args.certificate_flops) if args.certificate_flops is not None
              else contextlib.nullcontext())
    with budget:
        t = time.perf_counter()
        # the network bound at the same tol: it reuses the brackets analyze searched where it can
        records = analyze(model, shape, methods=args.method, tol=args.tol, progress=progress)
        t_layers = time.perf_counter() - t
        t = time.perf_counter()
        C = None
        if args.curvature:  # refuses a non-smooth model with one line naming the node; L from the same norms
            L, C = curvature_bound(model, shape, method=args.bound, tol=args.tol, lipschitz=True, progress=progress)
        if C is None or args.input_bound is not None:
            L = lipschitz_bound(model, shape, method=args.bound, tol=args.tol, input_bound=args.input_bound,
                                progress=progress)
        t_net = time.perf_counter() - t
    ref = "exact" if "exact" in args.method else None
    plotted = spectrum_plot(args.plot, records, model, shape, args.layer) if args.plot else None
    if args.json:
        doc = {
            "model": args.model, "input_shape": list(shape), "methods": args.method,
            "layers": [{"name": r.name, "type": r.kind, "geometry": r.geometry, "values": r.values,
                        "seconds": r.seconds, "certified_by": r.certified_by} for r in records],
            "lipschitz_bound": L, "curvature_bound": C, "bound_method": args.bound, "input_bound": args.input_bound,
            "seconds": {"layers": t_layers, "network": t_net}, "plot": args.plot, "plotted_layer": plotted,
        }
        print(json.dumps(doc, indent=2))
        return 0
    header = ["layer", "type", "geometry"] + list(args.method)
    if ref:
        header += [f"{m}/exact" for m in args.method if m not in ("exact", "power")]
    by = any(r.certified_by for r in records)  # what certified each upper end (cholesky: within --tol)
    header += ["upper by"] * by + ["time"]
    rows = []
    for r in records:
        row = [r.name, r.kind, r.geometry] + [f"{r.values[m]:.5g}" for m in args.method]
        if ref:
            row += [f"{r.values[m] / r.values[ref]:.4f}" if r.values[ref] > 0 else "-"
                    for m in args.method if m not in ("exact", "power")]
        if by:
            row.append(r.certified_by or "-")
        shared = {m: r.seconds[m] for m in ("exact", "upper") if m in r.seconds}  # one bracket serves both
        total = sum(v for m, v in r.seconds.items() if m not in shared) + max(shared.values(), default=0.0)
        row.append(f"{total * 1e3:.1f} ms")
        rows.append(row)
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    for row in [header] + rows:
        print("  ".join(str(c).ljust(w) if i < 3 else str(c).rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
    where = f" for inputs with ||x|| <= {args.input_bound:g}" if args.input_bound else ""
    print(f"\nnetwork Lipschitz bound ({args.bound}, certified{where}): {L:.6g}   "
          f"[{len(records)} layers in {t_layers:.1f} s, network bound in {t_net:.1f} s]")
    if C is not None:
        print(f"network curvature bound ({args.bound}, certified): {C:.6g}   "
              "(largest |eigenvalue| of each logit's input Hessian, at every input)")
    if args.plot:
        print(f"plot: {args.plot} (spectrum of {plotted})")
    return 0
