"""``sepconv convert``: convert a model's trained regular convs into separable ones."""

from __future__ import annotations

import argparse
import importlib.util
import json

from torch import nn

from ..data import list_datasets, load_dataset
from ..decompose import METHODS as CONVERT_METHODS
from ..decompose import convert, target_names
from ..deploy import RUNTIMES, choose_forms, measure, require_runtime, runner, torch_threads
from ..errors import ConfigError
from ..guard import writable_dir
from ..io import atomic_write_text, model_from_spec, save_model
from ..models import default_input_shape, profile
from ..runtime import tune_allocator
from .args import add_trust_code, energy_arg, positive_int, rank_arg, speedup_arg


def add(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("convert", help="convert a model's trained regular convs into separable ones (He et al.)",
                       description="Replace every regular k x k conv (groups 1) by a depthwise separable block: "
                                   "depth-wise decomposition (dsc), BSConv-U/S, or channel decomposition; "
                                   "data-free (svd) or fitted on calibration images (gsvd). Prints the per-layer "
                                   "report, writes OUT/report.json and the model to OUT/model (fine-tune it with "
                                   "`sepconv train --init OUT/model`).")
    p.add_argument("model", metavar="MODEL", help="registry name, saved model directory, or package.module:callable")
    p.add_argument("--to", choices=target_names(), default="dsc",
                   help="target form (default dsc: depthwise then pointwise)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--rank", type=rank_arg, metavar="R", help="per-layer rank, or 'full' (exact); default 1")
    g.add_argument("--energy", type=energy_arg, metavar="E",
                   help="per layer the smallest rank whose mean retained spectral energy reaches E in (0, 1]")
    g.add_argument("--speedup", type=speedup_arg, metavar="S",
                   help="ranks such that the converted layers' FLOPs are about 1/S of the originals")
    p.add_argument("--method", choices=CONVERT_METHODS, default="svd",
                   help="svd: data-free; gsvd: fitted on calibration images (needs --data)")
    p.add_argument("--single-layer", dest="multilayer", action="store_false",
                   help="gsvd: fit each layer on the original inputs (default: on the partly converted network's)")
    p.add_argument("--p", type=energy_arg, default=None, metavar="P",
                   help="bsconv_s: subspace fraction as in BSConv-S (default: keep the pointwise rank)")
    p.add_argument("--data", metavar="NAME",
                   help=f"calibration dataset (its train split), one of {', '.join(list_datasets())}")
    p.add_argument("--data-dir", metavar="DIR", help="directory holding the dataset's files")
    p.add_argument("--image-size", type=positive_int, help="resize calibration images to this size")
    p.add_argument("--samples", type=positive_int, default=512, help="calibration images (default 512)")
    p.add_argument("--max-patches", type=positive_int, default=4096, help="sampled patches per layer (default 4096)")
    p.add_argument("--input-size", nargs=2, type=positive_int, metavar=("H", "W"),
                   help="input height and width without --data (default: the model's registered size)")
    p.add_argument("--weights", metavar="FILE", help="state dict (.safetensors or .pt) loaded strictly on top")
    p.add_argument("--num-classes", type=positive_int, default=None, help="classifier size (to match --weights)")
    p.add_argument("--out", metavar="DIR",
                   help="output directory (default runs/convert-TO); the model goes to OUT/model")
    p.add_argument("--latency", nargs="*", choices=list(RUNTIMES), metavar="RUNTIME",
                   help="also measure one-thread latency at --deploy-batch before and after in these runtimes "
                        "(default with no RUNTIME: torch-cl, and onnxruntime where installed); costs seconds to "
                        "minutes")
    p.add_argument("--where-faster", metavar="RUNTIME", choices=list(RUNTIMES),
                   help="convert only the layers whose separable form runs faster than the regular conv it equals "
                        "in RUNTIME (at --deploy-batch, --threads or 1; measured as `sepconv latency --forms "
                        "fastest`): the others keep their trained weights, exactly; costs seconds to minutes")
    p.add_argument("--deploy-batch", type=positive_int, default=1, metavar="N",
                   help="the batch size --latency and --where-faster measure at (default 1)")
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of the table")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    add_trust_code(p)
    return p


def run(args) -> int:
    if args.method == "gsvd" and not args.data:
        raise ConfigError("--method gsvd fits on calibration images: give --data NAME (or use --method svd)")
    out = writable_dir(args.out or f"runs/convert-{args.to}", "--out")  # before the work, not after it
    for r in (args.latency or []) + ([args.where_faster] if args.where_faster else []):
        require_runtime(r)
    if args.latency is not None or args.where_faster:
        tune_allocator()  # latency as sepconv latency measures it: freed activations stay mapped
    data = None
    kw = {}
    if args.data:
        data = load_dataset(args.data, args.data_dir, split="train", image_size=args.image_size)
        kw = dict(in_chans=data.in_chans, num_classes=args.num_classes or data.num_classes)
    elif args.num_classes:
        kw = dict(num_classes=args.num_classes)
    model = model_from_spec(args.model, weights=args.weights, trust_code=args.trust_code, **kw)
    input_size = None
    if data is None and args.input_size:
        first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
        if first is None:
            raise ConfigError(f"{args.model}: the model has no Conv2d layer to convert")
        input_size = (first.in_channels, *args.input_size)
    how = dict(to=args.to, method=args.method, data=data, multilayer=args.multilayer, input_size=input_size,
               num_samples=args.samples, max_patches=args.max_patches, p=args.p,
               progress=None if args.progress and not args.json else False)  # None: a bar on a terminal
    shape = (data.in_chans, *data.image_size) if data is not None else input_size or default_input_shape(model)
    if shape is None and (args.latency is not None or args.where_faster):  # before the work, not after it
        raise ConfigError(f"{args.model}: --latency and --where-faster need the input size: pass --input-size H W")
    new, rep = convert(model, rank=args.rank, energy=args.energy, speedup=args.speedup, **how)
    where = None
    if args.where_faster:
        chosen = choose_forms(new, tuple(shape), args.where_faster, batch=args.deploy_batch,
                              threads=args.threads or 1)
        slower = set(chosen.dense)
        ranks = {r["name"]: r["rank"] for r in rep.layers}
        keep = [n for n in ranks if n not in slower]
        where = dict(runtime=args.where_faster, batch=args.deploy_batch, threads=args.threads or 1, plan=chosen.plan,
                     kept_regular=sorted(slower), summary=chosen.summary())
        if not keep:
            doc = {"model": args.model, "data": args.data, "where_faster": where, "converted": []}
            atomic_write_text(out / "report.json", json.dumps(doc, indent=2) + "\n")
            print(json.dumps(doc, indent=2) if args.json else
                  f"{chosen.summary()}\nnothing converted: no layer's separable form is faster in "
                  f"{args.where_faster}; no model written (report: {out / 'report.json'})")
            return 0
        if slower:  # the same ranks, on the layers that gain
            new, rep = convert(model, rank={n: ranks[n] for n in keep}, layers=keep, **how)
    doc = {"model": args.model, "data": args.data, **rep.to_dict()}
    if where:
        doc["where_faster"] = where
    if args.latency is not None:
        doc["latency"] = _latency(model, new, tuple(shape), args.latency, args.deploy_batch)
    save_model(new, out / "model")
    atomic_write_text(out / "report.json", json.dumps(doc, indent=2) + "\n")
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print(rep.table())
        if where:
            print(f"{where['summary']}; kept regular: {', '.join(where['kept_regular']) or 'none'}")
        for r in doc.get("latency", []):
            print(f"latency {r['runtime']} (batch {r['batch']}, 1 thread, median of {r['calls']}): "
                  f"{r['before_ms']:.3f} -> {r['after_ms']:.3f} ms ({r['ratio']:.3f}x; FLOPs {r['flop_ratio']:.3f}x)")
        print(f"model saved to {out / 'model'} (fine-tune: sepconv train --init {out / 'model'}); "
              f"report: {out / 'report.json'}")
    return 0


def _latency(before: nn.Module, after: nn.Module, shape: tuple[int, ...], runtimes: list[str],
             batch: int = 1) -> list[dict]:
    """One-thread latency at ``batch`` of the model before and after, each runtime's pair interleaved."""
    if not runtimes:
        runtimes = ["torch-cl"] + (["onnxruntime"] if importlib.util.find_spec("onnxruntime") else [])
    flops = profile(before, shape).flops, profile(after, shape).flops
    rows = []
    with torch_threads(1):
        for r in runtimes:
            lat = measure({"before": runner(before, shape, r, batch), "after": runner(after, shape, r, batch)})
            rows.append(dict(runtime=r, batch=batch, calls=lat["after"].n, before_ms=lat["before"].median,
                             after_ms=lat["after"].median, ratio=lat["after"].median / lat["before"].median,
                             flop_ratio=flops[1] / max(flops[0], 1)))
    return rows
