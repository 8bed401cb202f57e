"""``sepconv models``: the model registry with parameters and FLOPs."""

from __future__ import annotations

import argparse

import torch

from ..errors import ConfigError
from ..layers import CONV_KINDS
from ..models import count_params, create_model, list_models, model_info, profile
from .args import positive_int


def add(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("models", help="list the model registry with parameters and FLOPs",
                       description="List the registered models with their parameters and forward FLOPs "
                                   "(2 per multiply-add, torch's FlopCounterMode) at their default input size.")
    p.add_argument("pattern", nargs="?", help="glob filter, e.g. 'resnet*'")
    p.add_argument("--conv", choices=CONV_KINDS, default="regular",
                   help="profile this conv flavour (models that do not support it are left out)")
    p.add_argument("--num-classes", type=positive_int, default=None,
                   help="classifier size (default: 1000 for ImageNet models, 10 for the others)")
    p.add_argument("--no-flops", action="store_true", help="skip the FLOP count (faster)")
    return p


def run(args) -> int:


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
