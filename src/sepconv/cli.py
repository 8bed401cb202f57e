"""The ``sepconv`` command.

Each sub-command is a pair of functions, ``_add_<name>(subparsers)`` declaring its
arguments and ``_run_<name>(args) -> int``, listed in ``COMMANDS``. Bad input raises a
:class:`~sepconv.errors.SepconvError` (or an argparse error); :func:`main` prints one line
on stderr and returns exit status 2 -- never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from . import __version__
from .errors import ConfigError, ResourceError, SepconvError

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


# ----------------------------------------------------------------- sepconv train


def _model_arg(s: str) -> tuple[str, object]:
    """KEY=VALUE, VALUE parsed as JSON when it parses (numbers, true/false, lists), else a string."""
    import json

    key, eq, value = s.partition("=")
    if not eq or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {s!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _add_train(sub) -> argparse.ArgumentParser:
    from .normalize import METHODS as SN_METHODS
    from .normalize import MODES as SN_MODES
    from .train import OPTIMIZERS, SCHEDULES, TrainConfig

    d = TrainConfig()
    p = sub.add_parser("train", help="train a model (single process, or under torchrun with DDP)",
                       description="Train a classifier. Under `torchrun --nproc_per_node N -m sepconv train ...` "
                                   "it runs DistributedDataParallel (gloo on CPU, nccl on CUDA).")
    g = p.add_argument_group("model")
    g.add_argument("--model", default=d.model, help=f"registry name (see `sepconv models`; default {d.model})")
    g.add_argument("--conv", default=d.conv, choices=("regular", "dsc", "bsconv_u", "bsconv_s"),
                   help="convolution flavour of the model's spatial convs")
    g.add_argument("--width", type=positive_float, default=d.width, help="channel multiplier")
    g.add_argument("--model-arg", type=_model_arg, action="append", default=[], metavar="KEY=VALUE",
                   help="extra constructor argument (repeatable)")
    g.add_argument("--init", metavar="DIR", help="start from a saved model directory (fine-tuning)")
    g.add_argument("--trust-code", action="store_true",
                   help="let --init DIR's config.json name a factory to import and run "
                        "(refused by default: a directory is data from elsewhere)")
    g = p.add_argument_group("data")
    g.add_argument("--data", default=d.data, help="digits (bundled, default), cifar10, cifar100, mnist, "
                   "fashion_mnist, imagefolder")
    g.add_argument("--data-dir", metavar="DIR", help="directory holding the dataset's files")
    g.add_argument("--image-size", type=positive_int, help="resize images to this size (default: the dataset's)")
    g.add_argument("--train-images", type=positive_int, metavar="N",
                   help="train on the first N images of the train split only (smoke tests; default: all)")
    g.add_argument("--no-augment", dest="augment", action="store_false", help="no random crop / flip")
    g = p.add_argument_group("optimization")
    g.add_argument("--epochs", type=positive_int, default=d.epochs)
    g.add_argument("--batch-size", type=positive_int, default=d.batch_size, help="global batch size")
    g.add_argument("--optimizer", choices=OPTIMIZERS, default=d.optimizer)
    g.add_argument("--lr", type=positive_float, default=d.lr)
    g.add_argument("--momentum", type=unit_float, default=d.momentum)
    g.add_argument("--no-nesterov", dest="nesterov", action="store_false", help="plain momentum for SGD")
    g.add_argument("--weight-decay", type=nonneg_float, default=d.weight_decay,
                   help="decay of weights (biases and norm parameters are not decayed)")
    g.add_argument("--schedule", choices=SCHEDULES, default=d.schedule)
    g.add_argument("--milestones", type=positive_int, nargs="+", default=[], metavar="EPOCH",
                   help="epochs at which --schedule step multiplies the lr by --gamma")
    g.add_argument("--gamma", type=positive_float, default=d.gamma)
    g.add_argument("--warmup-epochs", type=nonneg_float, default=d.warmup_epochs)
    g.add_argument("--label-smoothing", type=unit_float, default=d.label_smoothing)
    g.add_argument("--logit-scale", type=positive_float, default=d.logit_scale, metavar="S",
                   help="train on cross_entropy(S * logits) / S (default 1); S ~ 10 lets a spectrally "
                        "normalized network reach the margins a certificate needs")
    g.add_argument("--bsconv-alpha", type=nonneg_float, default=None,
                   help="weight of the BSConv-S orthonormal penalty (default 0.1 when the model has "
                        "BSConv-S parts, else 0)")
    g = p.add_argument_group("spectral normalization and certification")
    g.add_argument("--sn", choices=SN_METHODS, default=None,
                   help="spectrally normalize every layer: dsc (depthwise FFT + pointwise matrix norms), operator, "
                        "fantastic4, gram, or reshape (torch's, for comparison)")
    g.add_argument("--sn-target", type=positive_float, default=d.sn_target, metavar="C",
                   help="largest allowed norm per layer (default 1)")
    g.add_argument("--sn-mode", choices=SN_MODES, default=d.sn_mode,
                   help="clip: shrink layers above the target (default); scale: always divide by the norm")
    g.add_argument("--sn-batchnorm", action="store_true", help="also bound each BatchNorm's Lipschitz constant")
    g.add_argument("--ff-beta", type=nonneg_float, default=d.ff_beta, metavar="B",
                   help="add B * (sum of the convs' Fantastic Four bounds) to the loss (Singla & Feizi)")
    g.add_argument("--certify", type=nonneg_float, nargs="+", default=[], metavar="EPS",
                   help="after each epoch, log the network Lipschitz bound and the certified accuracy at these l2 radii")
    g = p.add_argument_group("run")
    g.add_argument("--out", metavar="DIR", help="output directory (default runs/MODEL-DATA)")
    g.add_argument("--resume", action="store_true",
                   help="continue from OUT/last.pt; the settings must be the checkpoint's, except --epochs (may "
                        "grow), --out, --data-dir, --device, --no-channels-last and --certify")
    g.add_argument("--force", action="store_true",
                   help="start afresh in an OUT that holds another run (its checkpoints, metrics and model are "
                        "removed once every check has passed); without it such an OUT is refused")
    g.add_argument("--stop-after", type=positive_int, metavar="N",
                   help="stop this invocation after N epochs (continue later with --resume)")
    g.add_argument("--seed", type=int, default=d.seed,
                   help="any integer (generators take it modulo 2**64: seeds 2**64 apart give the same run)")
    g.add_argument("--device", default=d.device, help="cpu (default), cuda, cuda:N or auto")
    g.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    g.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bars (the per-epoch summary lines stay)")
    return p


def _train_config(args) -> TrainConfig:
    from .train import TrainConfig

    alpha = args.bsconv_alpha
    if alpha is None:
        alpha = 0.1 if args.conv == "bsconv_s" else 0.0
    return TrainConfig(
        model=args.model, conv=args.conv, width=args.width, model_kwargs=dict(args.model_arg),
        init=args.init, data=args.data, data_dir=args.data_dir, image_size=args.image_size,
        train_images=args.train_images,
        augment=args.augment, epochs=args.epochs, batch_size=args.batch_size, optimizer=args.optimizer,
        lr=args.lr, momentum=args.momentum, nesterov=args.nesterov, weight_decay=args.weight_decay,
        schedule=args.schedule, milestones=tuple(args.milestones), gamma=args.gamma,
        warmup_epochs=args.warmup_epochs, label_smoothing=args.label_smoothing,
        logit_scale=args.logit_scale, channels_last=args.channels_last,
        seed=args.seed, device=args.device, bsconv_alpha=alpha,
        sn=args.sn, sn_target=args.sn_target, sn_mode=args.sn_mode, sn_batchnorm=args.sn_batchnorm,
        ff_beta=args.ff_beta, certify=tuple(args.certify),
        out=args.out or f"runs/{args.model if not args.init else 'init'}-{args.data}",
    )


def _run_train(args) -> int:
    from .runtime import tune_allocator
    from .train import train

    cfg = _train_config(args)
    tune_allocator()  # freed step buffers stay mapped (see sepconv.runtime)
    res = train(cfg, resume=args.resume, progress=args.progress, stop_after_epochs=args.stop_after, log=True,
                force=args.force, trust_code=args.trust_code)
    if res.history and res.is_main:
        print(f"best test accuracy {res.best_acc:.4f}; model saved to {res.out / 'model'}")
    return 0


# ----------------------------------------------------------------- sepconv demo


def _add_demo(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("demo", help="reproduce the four papers' headline claims at small scale (report.md + plots)",
                       description="Train small networks on the bundled digits data (or --data) and measure each "
                                   "paper's claim; writes OUT/report.md, OUT/report.json and OUT/plots/. "
                                   "Runs in OUT/runs/ are reused, so an interrupted demo resumes.")
    p.add_argument("--out", default="demo", metavar="DIR", help="output directory (default: demo)")
    p.add_argument("--quick", action="store_true", help="tiny budgets (about a minute; for tests and CI)")
    p.add_argument("--data", default="digits", help="dataset (default: the bundled digits)")
    p.add_argument("--data-dir", metavar="DIR", help="directory holding the dataset's files")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--readme", metavar="FILE", help="also rewrite FILE's demo-results block from the new report")
    return p


def _run_demo(args) -> int:
    from .data import DATASETS
    from .demo import run_demo
    from .errors import DataError
    from .guard import writable_dir
    from .runtime import tune_allocator

    if args.data not in DATASETS:
        raise DataError(f"unknown dataset {args.data!r}; known: {', '.join(DATASETS)}")
    if args.readme is not None:
        from .report import check_readme

        check_readme(args.readme)  # before the long work
    writable_dir(args.out, "--out")
    tune_allocator()  # freed step buffers stay mapped (see sepconv.runtime)
    path = run_demo(args.out, quick=args.quick, data=args.data, data_dir=args.data_dir, device=args.device,
                    progress=args.progress, readme=args.readme)
    print(f"report written to {path}")
    return 0

# ----------------------------------------------------------------- sepconv spectrum


def _add_spectrum(sub) -> argparse.ArgumentParser:
    from .spectral.network import ANALYZE_METHODS

    p = sub.add_parser("spectrum", help="per-layer spectral norms (exact and bounds) and a certified network Lipschitz bound")
    p.add_argument("model", metavar="MODEL", help="registry name, saved model directory, or package.module:callable")
    p.add_argument("--weights", metavar="FILE", help="state dict (.safetensors or .pt) loaded strictly on top")
    p.add_argument("--num-classes", type=positive_int, default=None, help="classifier size (to match --weights)")
    p.add_argument("--input-size", nargs=2, type=positive_int, metavar=("H", "W"),
                   help="input height and width (default: the model's registered size, else 224 224)")
    p.add_argument("--method", nargs="+", choices=ANALYZE_METHODS, metavar="METHOD",
                   default=["exact", "upper", "fft", "gram", "fantastic4", "reshape"],
                   help=f"per-layer methods, any of {', '.join(ANALYZE_METHODS)} (default: all but power)")
    p.add_argument("--bound", choices=["upper", "fft", "gram", "fantastic4"], default="upper",
                   help="certified method for the network Lipschitz bound (default: upper)")
    p.add_argument("--input-bound", type=positive_float, metavar="R",
                   help="largest input l2 norm; needed to bound products of activations (squeeze-excitation)")
    p.add_argument("--tol", type=positive_float, default=1e-4, help="relative tolerance of exact values (default 1e-4)")
    p.add_argument("--layer", metavar="NAME", help="layer whose singular value spectrum is plotted (default: largest norm)")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of the table")
    p.add_argument("--plot", metavar="FILE", help="write a PNG: per-layer norms by method and one layer's spectrum")
    p.add_argument("--trust-code", action="store_true",
                   help="let a model directory's config.json name a factory to import and run "
                        "(refused by default: a directory is data from elsewhere)")
    return p


def _spectrum_input_shape(model, args) -> tuple[int, int, int]:
    from torch import nn

    from .errors import UnknownModelError
    from .models import model_info

    first = next((m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))), None)
    if first is None:
        raise ConfigError(f"{args.model}: the model has no Conv2d or Linear layer")
    channels = first.in_channels if isinstance(first, nn.Conv2d) else first.in_features
    if args.input_size:
        return (channels, *args.input_size)
    name = (getattr(model, "sepconv_config", None) or {}).get("name", args.model)
    try:
        return (channels, *model_info(name).input_size[1:])
    except UnknownModelError:
        return (channels, 224, 224)


def _spectrum_plot(path: str, records, model, shape, layer: str | None) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from .io import atomic_path
    from .spectral import ConvSpec, singular_values
    from .spectral.bounds import _majorant_kernel
    from .spectral.fourier import all_block_singular_values
    from .spectral.network import layer_inputs

    convs = [r for r in records if r.kind == "Conv2d"]
    if layer is None and convs:
        key = "exact" if "exact" in convs[0].values else next(iter(convs[0].values))
        layer = max(convs, key=lambda r: r.values[key]).name
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.5))
    methods = list(records[0].values) if records else []
    for m in methods:
        ax1.plot(range(len(records)), [r.values[m] for r in records], marker="o", ms=3, label=m)
    ax1.set_xticks(range(len(records)), [r.name for r in records], rotation=90, fontsize=6)
    ax1.set_ylabel("spectral norm")
    ax1.set_yscale("log")
    ax1.set_title("per-layer norms by method")
    ax1.legend(fontsize=7)
    title = "no convolution to show"
    if layer is not None:
        found = layer_inputs(model, shape).get(layer)
        if found is None or not isinstance(found[0], torch.nn.Conv2d):
            raise ConfigError(f"--layer {layer!r}: no such Conv2d in the model")
        mod, in_shape = found
        w = mod.weight.detach().to(torch.float64)
        spec = ConvSpec.of(mod, in_shape[-2:])
        try:
            sv, what = singular_values(w, spec), "exact"
        except (ConfigError, ResourceError):  # not circulant and too large: the majorant's spectrum dominates index by index
            maj, kernel, grid = _majorant_kernel(w, spec)
            sv, what = maj.factor * all_block_singular_values(kernel, grid), "circulant majorant (upper bound per index)"
        ax2.semilogy(sv.numpy() if sv.numel() else [], lw=1)
        ax2.set_xlabel("index")
        ax2.set_ylabel("singular value")
        title = f"{layer}: {spec.describe(mod.kernel_size)}\n{what}"
    ax2.set_title(title, fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=130)
    plt.close(fig)
    return layer or ""


def _run_spectrum(args) -> int:
    import json
    import time

    from torch import nn

    from .guard import writable_file
    from .io import model_from_spec
    from .spectral.network import analyze, lipschitz_bound

    if args.plot:
        writable_file(args.plot, "--plot")  # before the work, not after it
    model = model_from_spec(args.model, num_classes=args.num_classes, weights=args.weights,
                            trust_code=args.trust_code)
    shape = _spectrum_input_shape(model, args)
    if args.layer is not None and not isinstance(dict(model.named_modules()).get(args.layer), nn.Conv2d):
        raise ConfigError(f"--layer {args.layer!r}: no such Conv2d in the model")
    t = time.perf_counter()
    records = analyze(model, shape, methods=args.method, tol=args.tol, progress=not args.json and sys.stderr.isatty())
    t_layers = time.perf_counter() - t
    t = time.perf_counter()
    L = lipschitz_bound(model, shape, method=args.bound, input_bound=args.input_bound)
    t_net = time.perf_counter() - t
    ref = "exact" if "exact" in args.method else None
    plotted = _spectrum_plot(args.plot, records, model, shape, args.layer) if args.plot else None
    if args.json:
        doc = {
            "model": args.model, "input_shape": list(shape), "methods": args.method,
            "layers": [{"name": r.name, "type": r.kind, "geometry": r.geometry, "values": r.values,
                        "seconds": r.seconds} for r in records],
            "lipschitz_bound": L, "bound_method": args.bound, "input_bound": args.input_bound,
            "seconds": {"layers": t_layers, "network": t_net}, "plot": args.plot, "plotted_layer": plotted,
        }
        print(json.dumps(doc, indent=2))
        return 0
    header = ["layer", "type", "geometry"] + list(args.method)
    if ref:
        header += [f"{m}/exact" for m in args.method if m not in ("exact", "power")]
    header += ["time"]
    rows = []
    for r in records:
        row = [r.name, r.kind, r.geometry] + [f"{r.values[m]:.5g}" for m in args.method]
        if ref:
            row += [f"{r.values[m] / r.values[ref]:.4f}" if r.values[ref] > 0 else "-"
                    for m in args.method if m not in ("exact", "power")]
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
    if args.plot:
        print(f"plot: {args.plot} (spectrum of {plotted})")
    return 0


# ----------------------------------------------------------------- sepconv convert


def _rank_arg(s: str):
    if s == "full":
        return s
    return positive_int(s)


def _energy_arg(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {s!r}") from None
    if not 0 < v <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {s!r}")
    return v


def _speedup_arg(s: str) -> float:
    v = positive_float(s)
    if not v > 1:
        raise argparse.ArgumentTypeError(f"expected a number > 1, got {s!r}")
    return v


def _add_convert(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("convert", help="convert a model's trained regular convs into separable ones (He et al.)",
                       description="Replace every regular k x k conv (groups 1) by a depthwise separable block: "
                                   "depth-wise decomposition (dsc), BSConv-U/S, or channel decomposition; "
                                   "data-free (svd) or fitted on calibration images (gsvd). Prints the per-layer "
                                   "report, writes OUT/report.json and the model to OUT/model (fine-tune it with "
                                   "`sepconv train --init OUT/model`).")
    p.add_argument("model", metavar="MODEL", help="registry name, saved model directory, or package.module:callable")
    p.add_argument("--to", choices=("dsc", "bsconv_u", "bsconv_s", "channel"), default="dsc",
                   help="target form (default dsc: depthwise then pointwise)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--rank", type=_rank_arg, metavar="R", help="per-layer rank, or 'full' (exact); default 1")
    g.add_argument("--energy", type=_energy_arg, metavar="E",
                   help="per layer the smallest rank whose mean retained spectral energy reaches E in (0, 1]")
    g.add_argument("--speedup", type=_speedup_arg, metavar="S",
                   help="ranks such that the converted layers' FLOPs are about 1/S of the originals")
    p.add_argument("--method", choices=("svd", "gsvd"), default="svd",
                   help="svd: data-free; gsvd: fitted on calibration images (needs --data)")
    p.add_argument("--single-layer", dest="multilayer", action="store_false",
                   help="gsvd: fit each layer on the original inputs (default: on the partly converted network's)")
    p.add_argument("--p", type=_energy_arg, default=None, metavar="P",
                   help="bsconv_s: subspace fraction as in BSConv-S (default: keep the pointwise rank)")
    p.add_argument("--data", metavar="NAME", help="calibration dataset (digits, cifar10, ...; its train split)")
    p.add_argument("--data-dir", metavar="DIR", help="directory holding the dataset's files")
    p.add_argument("--image-size", type=positive_int, help="resize calibration images to this size")
    p.add_argument("--samples", type=positive_int, default=512, help="calibration images (default 512)")
    p.add_argument("--max-patches", type=positive_int, default=4096, help="sampled patches per layer (default 4096)")
    p.add_argument("--input-size", nargs=2, type=positive_int, metavar=("H", "W"),
                   help="input height and width without --data (default: the model's registered size)")
    p.add_argument("--weights", metavar="FILE", help="state dict (.safetensors or .pt) loaded strictly on top")
    p.add_argument("--num-classes", type=positive_int, default=None, help="classifier size (to match --weights)")
    p.add_argument("--out", metavar="DIR", help="output directory (default runs/convert-TO); the model goes to OUT/model")
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of the table")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--trust-code", action="store_true",
                   help="let a model directory's config.json name a factory to import and run "
                        "(refused by default: a directory is data from elsewhere)")
    return p


def _run_convert(args) -> int:
    import json

    from torch import nn

    from .decompose import convert
    from .guard import writable_dir
    from .io import atomic_write_text, model_from_spec, save_model

    if args.method == "gsvd" and not args.data:
        raise ConfigError("--method gsvd fits on calibration images: give --data NAME (or use --method svd)")
    out = writable_dir(args.out or f"runs/convert-{args.to}", "--out")  # before the work, not after it
    data = None
    kw = {}
    if args.data:
        from .data import load_dataset

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
    new, rep = convert(model, to=args.to, rank=args.rank, energy=args.energy, speedup=args.speedup,
                       method=args.method, data=data, multilayer=args.multilayer, input_size=input_size,
                       num_samples=args.samples, max_patches=args.max_patches, p=args.p,
                       progress=None if args.progress and not args.json else False)  # None: a bar on a terminal
    doc = {"model": args.model, "data": args.data, **rep.to_dict()}
    save_model(new, out / "model")
    atomic_write_text(out / "report.json", json.dumps(doc, indent=2) + "\n")
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print(rep.table())
        print(f"model saved to {out / 'model'} (fine-tune: sepconv train --init {out / 'model'}); "
              f"report: {out / 'report.json'}")
    return 0


# ----------------------------------------------------------------- registry of commands

COMMANDS: list[tuple[Callable, Callable]] = [
    (_add_demo, _run_demo),
    (_add_train, _run_train),
    (_add_models, _run_models),
    (_add_spectrum, _run_spectrum),
    (_add_convert, _run_convert),
]


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sepconv", description="Depthwise separable convolutions: blocks, exact "
                     "spectral norms, spectral normalization, conversion of trained convs.")
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

    def fail(message: str) -> int:
        print(f"sepconv {args.command}: error: {' '.join(message.split())}", file=sys.stderr)
        return EXIT_BAD_INPUT

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
        from .guard import os_reason

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
    import os

    return os.environ.get("RANK", "0") != "0" and int(os.environ.get("WORLD_SIZE", "1")) > 1


def _silence_stdout() -> None:
    """Point stdout at /dev/null so that Python's final flush cannot raise again."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # stdout replaced by a non-file (tests)
        pass


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
