"""``sepconv latency``: measured inference latency of a model per runtime, batch and thread count."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys

from ..deploy import RUNTIMES, choose_forms, measure, require_runtime, runner, torch_threads
from ..io import model_from_spec
from ..models import profile
from ..runtime import oversubscription, tune_allocator
from .args import add_trust_code, input_shape, positive_int

DEFAULT_RUNTIMES = ("torch", "torch-cl", "onnxruntime")


def add(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("latency", help="measure inference latency per runtime (torch, channels_last, ONNX Runtime)",
                       description="Time one forward pass of MODEL's deployable form (eval mode, BatchNorm folded, "
                                   "normalized weights baked) in each runtime, batch size and thread count: median "
                                   "and quartiles over --repeats calls, one runtime after the other. Run it on an idle "
                                   "machine: two threads beside another busy process are many times slower. glibc's "
                                   "malloc is first set to keep freed memory (sepconv.runtime.tune_allocator; "
                                   "SEPCONV_TUNE_MALLOC=0 to opt out), as in sepconv train. "
                                   + "; ".join(f"{r.name}: {r.help}" for r in RUNTIMES.values()) + ".")
    p.add_argument("model", metavar="MODEL", help="registry name, saved model directory, or package.module:callable")
    p.add_argument("--runtime", nargs="+", choices=list(RUNTIMES), metavar="RUNTIME",
                   help=f"runtimes, any of {', '.join(RUNTIMES)} (default: {' '.join(DEFAULT_RUNTIMES)}; "
                        "onnxruntime only where installed)")
    p.add_argument("--batch", nargs="+", type=positive_int, default=[1], metavar="N", help="batch sizes (default 1)")
    p.add_argument("--threads", nargs="+", type=positive_int, default=[1], metavar="N",
                   help="thread counts (default 1)")
    p.add_argument("--repeats", type=positive_int, default=30, help="timed calls per measurement (default 30)")
    p.add_argument("--max-seconds", type=positive_int, default=30,
                   help="stop repeating (after at least 5 calls) when one measurement took this long (default 30)")
    p.add_argument("--input-size", nargs=2, type=positive_int, metavar=("H", "W"),
                   help="input height and width (default: the model's registered size)")
    p.add_argument("--weights", metavar="FILE", help="state dict (.safetensors or .pt) loaded strictly on top")
    p.add_argument("--num-classes", type=positive_int, default=None, help="classifier size (to match --weights)")
    p.add_argument("--forms", choices=["separable", "fastest"], default="separable",
                   help="separable (default): every block as built; fastest: each linear separable block as its "
                        "deploy form or its dense conv, whichever is measured faster in that runtime, batch and "
                        "thread count (chosen before each measurement; the table adds the blocks made dense and the "
                        "FLOPs of the model measured)")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of the table")
    add_trust_code(p)
    return p


def run(args) -> int:
    runtimes = args.runtime
    skipped = []
    if runtimes is None:
        runtimes = [r for r in DEFAULT_RUNTIMES if r != "onnxruntime" or importlib.util.find_spec("onnxruntime")]
        skipped = [r for r in DEFAULT_RUNTIMES if r not in runtimes]
    for r in runtimes:
        require_runtime(r)
    model = model_from_spec(args.model, weights=args.weights, num_classes=args.num_classes,
                            trust_code=args.trust_code)
    shape = input_shape(model, args)
    prof = profile(model, shape)
    tuned = tune_allocator()  # freed activations stay mapped, as in sepconv train (see sepconv.runtime)
    busy = oversubscription(max(args.threads))
    if busy:
        print(f"sepconv latency: warning: {busy}", file=sys.stderr)
    rows = []
    for threads in args.threads:
        for batch in args.batch:
            lat, dense = {}, {}
            with torch_threads(threads):
                for r in runtimes:  # one runtime at a time: idle threads of another would spin beside it
                    net = model
                    if args.forms == "fastest":
                        chosen = choose_forms(model, shape, r, batch, threads)
                        net = chosen.model
                        dense[r] = dict(dense_blocks=f"{len(chosen.dense)}/{len(chosen.choices)}",
                                        branch_blocks=f"{len(chosen.branches)}/{len(chosen.choices)}",
                                        flops=profile(net, shape).flops)
                    lat[r] = measure({r: runner(net, shape, r, batch, threads)}, args.repeats,
                                     max_seconds=args.max_seconds)[r]
            rows += [dict(runtime=r, batch=batch, threads=threads, median_ms=lat[r].median, q1_ms=lat[r].q1,
                          q3_ms=lat[r].q3, calls=lat[r].n, images_per_s=1e3 * batch / lat[r].median,
                          **dense.get(r, {}))
                     for r in runtimes]
    doc = dict(model=args.model, input_shape=list(shape), params=prof.params, flops=prof.flops, forms=args.forms,
               allocator_tuned=tuned, rows=rows, skipped=skipped)
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    print(f"{args.model}: {prof.params:,} parameters, {prof.flops / 1e6:,.1f} MFLOPs per image at "
          f"{'x'.join(map(str, shape))}; deployable form (eval, BatchNorm folded); median (quartiles) of "
          f"up to {args.repeats} calls" + ("; fastest forms, 'dense' = blocks run as their dense conv, "
                                             "'branches' = as their summed branches"
                                             if args.forms == "fastest" else ""))
    header = ("runtime", "batch", "threads", "median ms", "quartiles ms", "images/s") + (
        ("dense", "branches", "MFLOPs") if args.forms == "fastest" else ())
    table = [(r["runtime"], str(r["batch"]), str(r["threads"]), f"{r['median_ms']:.3f}",
              f"{r['q1_ms']:.3f}-{r['q3_ms']:.3f}", f"{r['images_per_s']:,.0f}")
             + ((r["dense_blocks"], r["branch_blocks"], f"{r['flops'] / 1e6:,.1f}") if "dense_blocks" in r else ())
             for r in rows]
    widths = [max(len(t[i]) for t in table + [header]) for i in range(len(header))]
    for t in [header] + table:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(t, widths))))
    if skipped:
        print(f"not measured: {', '.join(skipped)} (pip install 'sepconv[deploy]')", file=sys.stderr)
    return 0
