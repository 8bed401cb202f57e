"""``sepconv export``: a deployable file of a model, verified against torch before it is written."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ..data import list_datasets, load_dataset
from ..deploy import DEFAULT_OPSET, choose_forms, export_onnx
from ..errors import ConfigError
from ..guard import writable_file
from ..io import model_from_spec
from .args import add_threads, add_trust_code, input_shape, number, positive_float, positive_int


def _batch_arg(s: str) -> int | None:
    return None if s == "dynamic" else positive_int(s)


def add(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("export", help="export a model to ONNX (BatchNorm folded, normalized weights baked), "
                                      "verified in ONNX Runtime",
                       description="Export MODEL to an ONNX file: eval mode, parametrized (spectrally normalized) "
                                   "weights baked, BatchNorm folded; depthwise convs stay grouped Conv nodes. The "
                                   "graph is run in ONNX Runtime on random inputs (and --data images) and the file "
                                   "is written only if it agrees with torch to --rtol. Needs the extra "
                                   "sepconv[deploy] (onnx, onnxscript, onnxruntime).")
    p.add_argument("model", metavar="MODEL", help="registry name, saved model directory, or package.module:callable")
    p.add_argument("--format", choices=["onnx"], default="onnx", help="file format (default onnx)")
    p.add_argument("--out", metavar="FILE", help="output file (default: MODEL/model.onnx for a model directory, "
                                                  "else NAME.onnx)")
    p.add_argument("--opset", type=number(int, lambda v: 14 <= v <= 23, "an integer from 14 to 23"),
                   default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    p.add_argument("--batch", type=_batch_arg, default=None, metavar="dynamic|N",
                   help="batch dimension: dynamic (default) or a fixed size N")
    p.add_argument("--input-size", nargs=2, type=positive_int, metavar=("H", "W"),
                   help="input height and width (default: --data's, else the model's registered size)")
    p.add_argument("--weights", metavar="FILE", help="state dict (.safetensors or .pt) loaded strictly on top")
    p.add_argument("--num-classes", type=positive_int, default=None, help="classifier size (to match --weights)")
    p.add_argument("--data", metavar="NAME", help=f"also verify on real images: the test split of one of "
                                                  f"{', '.join(list_datasets())}")
    p.add_argument("--data-dir", metavar="DIR", help="directory holding the dataset's files")
    p.add_argument("--samples", type=positive_int, default=64, help="--data images verified (default 64)")
    p.add_argument("--rtol", type=positive_float, default=1e-5,
                   help="largest relative error max|onnx - torch| / max|torch| accepted (default 1e-5)")
    p.add_argument("--forms", choices=["separable", "fastest"], default="separable",
                   help="separable (default): every block as converted; fastest: each linear separable block as "
                        "its deploy form or its dense conv, whichever ONNX Runtime runs faster at --batch (1 for "
                        "dynamic) and --threads (default 1), measured before the export")
    add_threads(p)
    add_trust_code(p)
    return p


def run(args) -> int:
    out = writable_file(args.out if args.out else Path(args.model) / "model.onnx" if Path(args.model).is_dir()
                        else f"{args.model.split(':')[-1]}.onnx", "--out")  # before the work, not after it
    data = None
    if args.data:
        if args.input_size and args.input_size[0] != args.input_size[1]:
            raise ConfigError("--data with --input-size: datasets are resized to squares; give H = W")
        data = load_dataset(args.data, args.data_dir, split="test",
                            image_size=args.input_size[0] if args.input_size else None)
    model = model_from_spec(args.model, weights=args.weights, num_classes=args.num_classes,
                            in_chans=data.in_chans if data is not None else None, trust_code=args.trust_code)
    shape = input_shape(model, args)
    images = None
    if data is not None:
        if data.in_chans != shape[0]:
            raise ConfigError(f"--data {args.data}: {data.in_chans}-channel images, the model takes {shape[0]}")
        shape = (shape[0], *data.image_size)
        images, _ = data.get_batch(torch.arange(min(args.samples, len(data))))
    if args.forms == "fastest":
        chosen = choose_forms(model, shape, "onnxruntime", batch=args.batch or 1, threads=args.threads or 1)
        print(chosen.summary())
        model = chosen.model
    result = export_onnx(model, out, shape, opset=args.opset, batch=args.batch, inputs=images, rtol=args.rtol)
    print(result.summary())
    return 0
